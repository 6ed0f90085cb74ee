"""The link between the supervisor and each process it starts: a socketpair whose child end
the child inherits. The child writes one JSON line when it is ready (`ready`); the supervisor
closing its end, or dying, is the child's signal to drain and exit (`watch`), so no process
outlives a killed supervisor."""

from __future__ import annotations

import asyncio
import json
import os
import socket
from collections.abc import Callable
from typing import Any


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
