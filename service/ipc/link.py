"""The link between the supervisor and each process it starts: a socketpair whose child end
the child inherits. The child writes one JSON line when it is ready (`ready`); the supervisor
closing its end, or dying, is the child's signal to drain and exit (`watch`), so no process
outlives a killed supervisor."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any

from service import loops
from service.errors import ServingError


class ChildLink:
    def __init__(self, fd: int) -> None:
        self._sock = socket.socket(fileno=fd)
        self._sock.setblocking(False)

    def ready(self, **info: Any) -> None:
        self._send(info)

    def failed(self, message: str) -> None:
        """The one-line reason this child cannot start (the supervisor prints it)."""
        self._send({"error": message})

    def _send(self, info: dict[str, Any]) -> None:
        self._sock.setblocking(True)
        try:
            self._sock.sendall((json.dumps(info) + "\n").encode())
        except OSError:
            pass  # the supervisor is gone; the watch ends this process
        self._sock.setblocking(False)

    def watch(self, on_gone: Callable[[], None]) -> None:
        """Call `on_gone` (once) when the supervisor's end closes."""
        loop = asyncio.get_running_loop()

        def readable() -> None:
            try:
                data = self._sock.recv(4096)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data:
                loop.remove_reader(self._sock.fileno())
                on_gone()

        loop.add_reader(self._sock.fileno(), readable)


def pair() -> tuple[socket.socket, int]:
    """(the supervisor's end, the child's inheritable fd)."""
    ours, theirs = socket.socketpair()
    os.set_inheritable(theirs.fileno(), True)
    fd = theirs.detach()
    return ours, fd


def child_parser(prog: str, description: str | None) -> argparse.ArgumentParser:
    """The command line the supervisor gives every child (service.supervisor builds it)."""
    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument("--config", required=True, help="the ServeConfig, as JSON")
    p.add_argument("--socket", required=True, type=Path, help="the engine's Unix socket")
    p.add_argument("--segment-prefix", required=True, help="front ends' shared-memory prefix")
    p.add_argument("--metrics-dir", type=Path, help="prometheus_client multiprocess folder")
    p.add_argument("--link-fd", type=int, required=True, help="the supervisor's link")
    return p


async def serve_child(
    link: ChildLink,
    start: Callable[[], Awaitable[dict[str, Any]]],
    stop: Callable[[], Awaitable[None]],
) -> None:
    """A child's life: `start()` (its result goes to the supervisor as the ready line), run
    until SIGTERM or until the supervisor is gone, then `stop()`; a stop request while starting
    abandons the start."""
    stopping = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stopping.set)
    link.watch(stopping.set)
    starting = asyncio.ensure_future(start())
    waiting = asyncio.ensure_future(stopping.wait())
    await asyncio.wait([starting, waiting], return_when=asyncio.FIRST_COMPLETED)
    try:
        if not starting.done():
            starting.cancel()
            await asyncio.gather(starting, return_exceptions=True)
            return
        info = starting.result()
        loops.freeze_startup_objects()
        link.ready(**info)
        await waiting
    finally:
        waiting.cancel()
        await stop()


def child_main(run: Callable[[], Coroutine[Any, Any, None]], link_fd: int, event_loop: str) -> int:
    """Run a child's event loop (--event-loop); a ServingError while starting goes to the
    supervisor, which prints it as the server's one-line error. Ctrl-C is the supervisor's."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        loops.run(run(), event_loop)
    except ServingError as exc:
        ChildLink(link_fd).failed(str(exc))
        return 2
    return 0
