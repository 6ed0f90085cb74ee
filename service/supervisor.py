"""The supervisor: `python -m service serve --frontends N` (N >= 1) runs here.

It is the only place that starts, watches and stops processes:
1. one engine process (`service.engine.host`): sessions, batch queues, the repository poller
   and the one /metrics; the supervisor waits until it has loaded the repository;
2. N front-end processes (`service.frontend.process`) sharing the gRPC and HTTP ports
   (SO_REUSEPORT);
3. then it logs `ready`. A front end that dies is restarted (only its own in-flight requests
   fail); an engine that dies is restarted and reloads the models, while every front end answers
   UNAVAILABLE and health NOT_SERVING until it is back. A process that keeps dying right after
   its start is restarted after a growing pause (up to MAX_BACKOFF_S).
4. SIGTERM or SIGINT: the front ends drain first (in-flight requests finish), then the engine
   stops; every shared-memory segment is removed; exit 0.

The gRPC and HTTP ports are held by bound (never listening) SO_REUSEPORT sockets for the
supervisor's life, after checking that nothing else listens there, so port 0 resolves once and
a restarted front end gets the same port.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from prometheus_client import multiprocess

from service.config import ServeConfig
from service.errors import ConfigError, ServingError
from service.ipc import link as links
from service.ipc import shm

log = logging.getLogger(__name__)

FAMILY = "cnn-serving"  # shared-memory segment names: FAMILY-<supervisor pid>.<pid>.<n>
QUICK_DEATH_S = 5.0  # a process dying sooner than this after its start is backed off
MAX_BACKOFF_S = 10.0
STOP_GRACE_S = 10.0  # after its own drain time, a child is killed


@dataclass(eq=False)
class Child:
    role: str  # "engine" or "frontend-N"
    command: list[str]
    process: asyncio.subprocess.Process | None = None
    link: socket.socket | None = None
    started: float = 0.0
    failures: int = 0  # quick deaths in a row
    info: dict = field(default_factory=dict)

    @property
    def pid(self) -> int:
        return self.process.pid if self.process is not None else 0


class Supervisor:
    def __init__(self, config: ServeConfig) -> None:
        self.config = config
        self.prefix = f"{FAMILY}-{os.getpid()}"
        self._dir = Path(tempfile.mkdtemp(prefix=f"{FAMILY}-"))
        self._metrics_dir = self._dir / "metrics"
        self._metrics_dir.mkdir()
        self._socket = self._dir / "engine.sock"
        self._guards: list[socket.socket] = []
        self._children: list[Child] = []
        self._stopping = False  # no more restarts
        self._stopped = False
        self._watchers: list[asyncio.Future[None]] = []
        self._env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(self._metrics_dir)}

    # ---- start

    async def start(self) -> None:
        """Engine, then front ends; raises ServingError when one cannot start."""
        shm.reclaim_orphans(FAMILY)
        # Ours too: in a container restarted with the same /dev/shm this supervisor is pid 1
        # again, and its killed predecessor's segments carry this very prefix.
        shm.reclaim(self.prefix)
        config = self.config
        port = self._hold_port(config.grpc_port, "gRPC")
        http_port = -1 if config.http_port < 0 else self._hold_port(config.http_port, "HTTP")
        metrics_port = config.metrics_port
        if metrics_port >= 0:
            metrics_port = _free_port(config.host, metrics_port, "metrics")
        engine_config = replace(config, metrics_port=metrics_port, http_port=-1)
        engine = Child("engine", self._command("service.engine.host", engine_config))
        self._children.append(engine)
        await self._spawn(engine)
        frontend_config = replace(
            config,
            grpc_port=port,
            http_port=http_port,
            metrics_port=-1,
            engine_metrics_port=metrics_port,
        )
        for index in range(1, config.frontends + 1):
            command = self._command("service.frontend.process", frontend_config)
            self._children.append(Child(f"frontend-{index}", [*command, "--index", str(index)]))
        await asyncio.gather(*(self._spawn(child) for child in self._children[1:]))
        log.info(
            "gRPC listening on %s:%d%s; metrics on :%d/metrics",
            config.host,
            port,
            " (TLS)" if config.tls_cert else "",
            engine.info.get("metrics_port", -1),
        )
        if http_port >= 0:
            log.info(
                "HTTP listening on %s://%s:%d (V2 REST, /v1 classify, /docs)",
                "https" if config.tls_cert else "http",
                config.host,
                http_port,
            )
        served = "; ".join(engine.info.get("models", [])) or "nothing"
        log.info(
            "ready: serving %s on port %d (%d front ends, engine pid %d)",
            served,
            port,
            config.frontends,
            engine.pid,
        )

    def _hold_port(self, wanted: int, what: str) -> int:
        """Resolve `wanted` (0: a free port) and hold it with a bound, never listening
        SO_REUSEPORT socket, so that every front end (and a restarted one) gets the same port."""
        config = self.config
        port = _free_port(config.host, wanted, what)
        guard = socket.socket(_family(config.host), socket.SOCK_STREAM)
        guard.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        try:
            guard.bind((config.host, port))
        except OSError as exc:  # e.g. connections of a previous server still in TIME_WAIT
            guard.close()
            raise ConfigError(
                f"cannot listen on {config.host}:{port} ({what}): {exc.strerror}"
            ) from exc
        self._guards.append(guard)
        return port

    def _command(self, module: str, config: ServeConfig) -> list[str]:
        return [
            sys.executable, "-m", module, "--config", config.to_json(),
            "--socket", str(self._socket), "--segment-prefix", self.prefix,
            "--metrics-dir", str(self._metrics_dir),
        ]  # fmt: skip

    async def _spawn(self, child: Child) -> None:
        """Start `child` and wait until it says it is ready; raises ServingError when it exits
        first (its own error line is already on stderr)."""
        ours, fd = links.pair()
        try:
            # Its own session: a terminal's Ctrl-C reaches the supervisor alone, which stops
            # the children in order (front ends first); a killed supervisor closes the link.
            child.process = await asyncio.create_subprocess_exec(
                *child.command,
                "--link-fd",
                str(fd),
                pass_fds=(fd,),
                env=self._env,
                start_new_session=True,
            )
        finally:
            os.close(fd)
        child.link, child.started = ours, time.monotonic()
        log.info("started %s (pid %d)", child.role, child.pid)
        info = await _read_ready(ours)
        if info is None or "error" in info:
            code = await child.process.wait()
            if info is not None:
                raise ServingError(info["error"])
            raise ServingError(f"{child.role} exited with status {code} while starting")
        child.info = info

    # ---- watch

    async def watch(self) -> None:
        """Restart children that die, each on its own (one's backoff never delays another's),
        until `stop`."""
        self._watchers = [asyncio.ensure_future(self._watch(child)) for child in self._children]
        await asyncio.gather(*self._watchers, return_exceptions=True)

    async def _watch(self, child: Child) -> None:
        while not self._stopping:
            assert child.process is not None
            await child.process.wait()
            if self._stopping:
                return
            await self._restart(child)

    async def _restart(self, child: Child) -> None:
        assert child.process is not None
        code, pid = child.process.returncode, child.pid
        if child.link is not None:
            child.link.close()
        removed = shm.reclaim(self.prefix, pid)
        # Its live gauges (bytes decoding) end with it; its counters stay in the sums.
        multiprocess.mark_process_dead(pid, str(self._metrics_dir))
        quick = time.monotonic() - child.started < QUICK_DEATH_S
        child.failures = child.failures + 1 if quick else 0
        pause = min(0.5 * 2 ** (child.failures - 1), MAX_BACKOFF_S) if child.failures else 0.0
        log.error(
            "%s (pid %d) exited with status %s; %d shared-memory segments reclaimed; restarting%s",
            child.role,
            pid,
            code,
            removed,
            f" in {pause:.1f} s" if pause else "",
        )
        while True:
            await asyncio.sleep(pause)
            if self._stopping:
                return
            try:
                await self._spawn(child)
                log.info("%s is back (pid %d)", child.role, child.pid)
                return
            except Exception as exc:  # a restart must never end the watch, whatever failed
                child.failures += 1
                pause = min(0.5 * 2 ** (child.failures - 1), MAX_BACKOFF_S)
                log.error("restarting %s failed: %s; retrying in %.1f s", child.role, exc, pause)

    # ---- stop

    async def stop(self) -> None:
        """Front ends drain, then the engine stops; everything shared is removed (once)."""
        if self._stopped:
            return
        self._stopped = True
        self._stopping = True
        for watcher in self._watchers:  # no restart may start a child behind our back
            watcher.cancel()
        await asyncio.gather(*self._watchers, return_exceptions=True)
        frontends = [c for c in self._children if c.role != "engine"]
        engines = [c for c in self._children if c.role == "engine"]
        await asyncio.gather(*(self._terminate(c) for c in frontends))
        await asyncio.gather(*(self._terminate(c) for c in engines))
        for child in self._children:
            if child.link is not None:
                child.link.close()
        for guard in self._guards:
            guard.close()
        self._guards.clear()
        shm.reclaim(self.prefix)
        shutil.rmtree(self._dir, ignore_errors=True)
        log.info("stopped")

    def kill(self) -> None:
        """A second signal: no more waiting for drains; the stop goes on with the clean-up."""
        log.warning("second signal: killing every child now")
        self._stopping = True
        for child in self._children:
            if child.process is not None and child.process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    child.process.kill()

    async def _terminate(self, child: Child) -> None:
        process = child.process
        if process is None or process.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(process.wait(), self.config.drain_timeout_s + STOP_GRACE_S)
        except TimeoutError:
            log.error("%s (pid %d) did not stop; killing it", child.role, child.pid)
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()


async def _read_ready(sock: socket.socket) -> dict | None:
    loop = asyncio.get_running_loop()
    sock.setblocking(False)
    data = b""
    while not data.endswith(b"\n"):
        chunk = await loop.sock_recv(sock, 4096)
        if not chunk:
            return None
        data += chunk
    return dict(json.loads(data))


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def _free_port(host: str, port: int, what: str) -> int:
    """`port` if nothing listens there (0: a free one), checked by binding it alone."""
    probe = socket.socket(_family(host), socket.SOCK_STREAM)
    try:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind((host, port))
        return int(probe.getsockname()[1])
    except OSError as exc:
        raise ConfigError(f"cannot listen on {host}:{port} ({what}): {exc.strerror}") from exc
    finally:
        probe.close()


async def supervise(config: ServeConfig) -> None:
    """Run until SIGTERM/SIGINT, then stop in order (a second signal kills the children at
    once); raises ServingError for a startup failure."""
    supervisor = Supervisor(config)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    def on_signal() -> None:
        if stop.is_set():
            supervisor.kill()
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)
    stopping = asyncio.ensure_future(stop.wait())
    try:
        starting = asyncio.ensure_future(supervisor.start())
        await asyncio.wait([starting, stopping], return_when=asyncio.FIRST_COMPLETED)
        if not starting.done():
            log.info("signal received while starting; stopping")
            starting.cancel()
            await asyncio.gather(starting, return_exceptions=True)
            return
        starting.result()
        watching = asyncio.ensure_future(supervisor.watch())
        await stopping
        log.info("signal received; draining the front ends, then the engine (again: kill)")
        await supervisor.stop()
        watching.cancel()
        await asyncio.gather(watching, return_exceptions=True)
    finally:
        stopping.cancel()
        await supervisor.stop()
