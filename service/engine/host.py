"""The engine process: one `Engine` (sessions, one batch queue per version, the repository
poller) serving every front-end process over a local Unix socket.

    started by `python -m service serve --frontends N` (service.supervisor); not run by hand

A front end sends `Infer` records naming where its pixels are in shared memory; requests from
all front ends join the same batch queues. Answers go back as `Result` or `Failure`, at most one
write per front end per loop turn. A `Catalogue` of what is loaded goes to every front end on
its hello and on every change. The engine also serves the one /metrics of the whole server.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import logging
import math
import os
import sys
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from service.config import ServeConfig
from service.core import Outputs, Stats
from service.engine.core import Engine, LoadedModel
from service.errors import ServingError
from service.ipc import records as rec
from service.ipc.channel import Channel
from service.ipc.link import ChildLink, child_main, child_parser, serve_child
from service.ipc.shm import Segments
from service.logs import configure as configure_logging
from service.metrics import Metrics

log = logging.getLogger("service.engine.host")  # not "__main__" when run with -m
INTERNAL = ("INTERNAL", "internal error (see server log)")  # never an internal error's text
# How long a model-control answer waits for every front end to apply the new catalogue (a front
# end that does not answer in this long is stuck, and the supervisor's business).
APPLIED_TIMEOUT_S = 5.0


@dataclass(eq=False)
class Peer:
    """One connected front end."""

    pid: int = 0
    requests: dict[int, asyncio.Future[Outputs]] = field(default_factory=dict)
    applied: int = 0  # the newest catalogue generation it has put in force


def catalogue(engine: Engine, generation: int) -> dict[str, Any]:
    models = [_describe(m) for m in engine.loaded()]
    return {"ready": engine.ready, "models": models, "generation": generation}


def _describe(model: LoadedModel) -> dict[str, Any]:
    return {"spec": model.spec.to_dict(), "providers": list(model.providers)}


class EngineHost:
    def __init__(self, engine: Engine, socket_path: Path, segment_prefix: str) -> None:
        self.engine = engine
        self._path = socket_path
        self._segments = Segments(segment_prefix)
        self._peers: dict[Channel, Peer] = {}
        self._server: asyncio.AbstractServer | None = None
        self._broadcast_armed = False
        self._generation = 0  # of the catalogue last sent
        self._applied = asyncio.Condition()  # a front end applied a catalogue
        self._tasks: set[asyncio.Task[None]] = set()
        engine.processes = self._processes  # the process metrics cover the front ends too

    def _processes(self) -> list[tuple[str, int]]:
        peers = sorted(peer.pid for peer in self._peers.values() if peer.pid)
        return [("engine", os.getpid()), *(("frontend", pid) for pid in peers)]

    async def start(self) -> None:
        await self.engine.start()
        self.engine.on_model_change(lambda name, serving: self._changed())
        self._path.unlink(missing_ok=True)
        loop = asyncio.get_running_loop()
        self._server = await loop.create_unix_server(
            lambda: Channel(self._frame, self._lost), str(self._path)
        )

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for channel in list(self._peers):
            channel.close()
        await self.engine.stop()
        self._path.unlink(missing_ok=True)

    # ---- catalogue

    def _changed(self) -> None:
        if not self._broadcast_armed:  # one catalogue per loop turn, however many changes
            self._broadcast_armed = True
            asyncio.get_running_loop().call_soon(self._broadcast)

    def _broadcast(self) -> None:
        self._broadcast_armed = False
        self._generation += 1
        payload = rec.Control(catalogue(self.engine, self._generation)).encode()
        for channel in self._peers:
            channel.send(rec.Kind.CATALOGUE, payload)

    async def _in_force(self) -> None:
        """Wait until every front end has applied the last catalogue sent (so that a model
        loaded or unloaded is so on every port once the caller hears it is), or for
        APPLIED_TIMEOUT_S; a front end that takes longer is logged."""
        if self._broadcast_armed:
            self._broadcast()
        generation = self._generation

        def applied() -> bool:
            return all(peer.applied >= generation for peer in self._peers.values() if peer.pid)

        async with self._applied:
            try:
                await asyncio.wait_for(self._applied.wait_for(applied), APPLIED_TIMEOUT_S)
            except TimeoutError:
                late = [p.pid for p in self._peers.values() if p.pid and p.applied < generation]
                log.error(
                    "front ends %s did not apply catalogue %d in %.0f s",
                    late,
                    generation,
                    APPLIED_TIMEOUT_S,
                )

    async def _recount(self) -> None:
        """A front end applied a catalogue, or went away: `_in_force` checks again."""
        async with self._applied:
            self._applied.notify_all()

    # ---- frames from front ends

    def _frame(self, channel: Channel, kind: rec.Kind, payload: bytes) -> None:
        peer = self._peers.get(channel)
        if peer is None:  # its first frame (no Peer made per frame on the hot path)
            peer = self._peers[channel] = Peer()
        if kind is rec.Kind.INFER:
            self._infer(channel, peer, rec.Infer.decode(payload))
        elif kind is rec.Kind.DONE:
            self._done(rec.Done.decode(payload))
        elif kind is rec.Kind.CANCEL:
            future = peer.requests.pop(rec.Cancel.decode(payload).request, None)
            if future is not None:
                future.cancel()
        elif kind is rec.Kind.HELLO:
            peer.pid = int(rec.Control.decode(payload).body["pid"])
            body = catalogue(self.engine, self._generation)
            channel.send(rec.Kind.CATALOGUE, rec.Control(body).encode())
        elif kind is rec.Kind.APPLIED:
            generation = int(rec.Control.decode(payload).body["generation"])
            peer.applied = max(peer.applied, generation)
            self._spawn(self._recount())
        elif kind is rec.Kind.STATS_ASK:
            self._stats(channel, rec.Control.decode(payload).body)
        elif kind is rec.Kind.CONTROL_ASK:
            self._spawn(self._control(channel, rec.Control.decode(payload).body))
        else:
            log.error("unexpected %s record from front end %d; ignored", kind.name, peer.pid)

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)  # held until done (a loop keeps only weak references)
        task.add_done_callback(self._tasks.discard)

    def _infer(self, channel: Channel, peer: Peer, record: rec.Infer) -> None:
        try:
            model = self.engine.resolve(record.model, record.version, record.shape, record.labels)
            shape = record.shape
            size = record.count * math.prod(shape)
            pixels = self._segments.view(record.segment, record.offset, size, record.transient)
            future = self.engine.submit(
                model, pixels.reshape(record.count, *shape), _deadline(record)
            )
        except ServingError as exc:
            channel.send(rec.Kind.FAILURE, rec.Failure.of(record.request, exc).encode())
            return
        except FileNotFoundError:  # its caller went away and took its one-off segment along
            log.debug("front end %d: segment %s is gone", peer.pid, record.segment)
            failure = rec.Failure(record.request, "UNAVAILABLE", "the request was withdrawn")
            channel.send(rec.Kind.FAILURE, failure.encode())
            return
        except (ValueError, OSError) as exc:  # a front end's bug: refuse the request, say why
            log.error("front end %d: bad request record: %s", peer.pid, exc)
            channel.send(rec.Kind.FAILURE, rec.Failure(record.request, *INTERNAL).encode())
            return
        peer.requests[record.request] = future
        future.add_done_callback(functools.partial(self._answer, channel, peer, record.request))

    def _answer(
        self, channel: Channel, peer: Peer, request: int, future: asyncio.Future[Outputs]
    ) -> None:
        peer.requests.pop(request, None)
        if channel.closed or future.cancelled():
            return
        error = future.exception()
        if error is None:
            outputs = future.result()
            result = rec.Result(request, outputs["probabilities"], outputs["bottleneck"])
            channel.send(rec.Kind.RESULT, result.encode())
            return
        if not isinstance(error, ServingError):
            log.error("request failed", exc_info=error)
            channel.send(rec.Kind.FAILURE, rec.Failure(request, *INTERNAL).encode())
            return
        channel.send(rec.Kind.FAILURE, rec.Failure.of(request, error).encode())

    def _done(self, record: rec.Done) -> None:
        try:
            model = self.engine.model(record.model, record.version)
        except ServingError:
            return  # unloaded since: its statistics went with it
        model.stats.record_requests(record.ok, record.ok_ns, record.failed, record.failed_ns)

    def _stats(self, channel: Channel, body: dict[str, Any]) -> None:
        answers = []
        for name, version in body["models"]:
            try:
                answers.append(self.engine.model(name, version).stats.to_dict())
            except ServingError:
                answers.append(Stats().to_dict())
        reply = rec.Control({"request": body["request"], "stats": answers})
        channel.send(rec.Kind.STATS, reply.encode())

    async def _control(self, channel: Channel, body: dict[str, Any]) -> None:
        """A repository index, load or unload for a front end; the answer goes once every front
        end has applied the catalogue it changed, so the change is in force on every port
        when the caller hears of it."""
        reply: dict[str, Any] = {"request": body["request"]}
        try:
            if body["op"] == "index":
                entries = await self.engine.repository_index(bool(body.get("ready")))
                reply["index"] = [entry.to_dict() for entry in entries]
            elif body["op"] == "load":
                await self.engine.load_model(str(body["name"]))
            else:
                await self.engine.unload_model(str(body["name"]))
        except ServingError as exc:
            reply["error"] = [exc.code.name, str(exc)]
        except Exception:
            log.exception("model control (%s) failed", body.get("op"))
            reply["error"] = list(INTERNAL)
        if body["op"] != "index":
            await self._in_force()
        if not channel.closed:
            channel.send(rec.Kind.CONTROL, rec.Control(reply).encode())

    def _lost(self, channel: Channel) -> None:
        peer = self._peers.pop(channel, None)
        if peer is None:
            return
        for future in peer.requests.values():
            future.cancel()
        self._segments.forget(peer.pid)
        self._spawn(self._recount())
        log.info("front end %d disconnected", peer.pid)


def _deadline(record: rec.Infer) -> float | None:
    return record.deadline if record.deadline > 0 else None


# ---- the process


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    return child_parser("python -m service.engine.host", __doc__).parse_args(argv)


async def serve(args: argparse.Namespace) -> None:
    config = ServeConfig.from_json(args.config)
    # beside the socket, in the supervisor's folder: it outlives this process, not the server
    state = args.socket.with_name("loaded-models.json")
    engine = Engine(config, Metrics(args.metrics_dir), state_path=state)
    host = EngineHost(engine, args.socket, args.segment_prefix)

    async def start() -> dict[str, Any]:
        await host.start()
        metrics_port = -1
        if config.metrics_port >= 0:
            metrics_port = engine.metrics.serve(config.host, config.metrics_port)
        loaded = [f"{m.spec.name} v{m.spec.version} on {m.providers[0]}" for m in engine.loaded()]
        return {"metrics_port": metrics_port, "models": loaded}

    async def stop() -> None:
        await host.stop()
        engine.metrics.close()
        log.info("stopped (pid %d)", os.getpid())

    await serve_child(ChildLink(args.link_fd), start, stop)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    config = ServeConfig.from_json(args.config)
    configure_logging(config.log_level, "engine", config.log_format)
    return child_main(lambda: serve(args), args.link_fd, config.event_loop)


if __name__ == "__main__":
    sys.exit(main())
