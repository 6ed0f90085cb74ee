"""`EngineClient`: a front end's view of the engine process, the same `Core` the servicers
call in a single process.

What is loaded comes from the engine's `Catalogue` (on connection and on every change). An
inference copies the request's pixels into this process's shared-memory arena and sends an
`Infer` record; the answer comes back as a `Result` or a `Failure`. When the engine goes away,
every request waiting on it fails UNAVAILABLE at once, health turns NOT_SERVING, and the client
reconnects until an engine answers again (the supervisor restarts it).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from service.config import MiB, ServeConfig
from service.core import SERVER, Core, IndexEntry, Model, Outputs, Stats
from service.errors import ServingError, Unavailable
from service.ipc import records as rec
from service.ipc.channel import Channel
from service.ipc.shm import Arena, Lease
from service.metrics import Metrics
from service.repository import ModelSpec

log = logging.getLogger(__name__)

RECONNECT_S = 0.05  # between attempts to reach a (re)starting engine: it is on this machine
STATS_TIMEOUT_S = 10.0


class EngineClient(Core):
    def __init__(
        self, config: ServeConfig, metrics: Metrics, socket_path: Path, segment_prefix: str
    ) -> None:
        super().__init__(config, metrics)
        self._path = socket_path
        self._prefix = segment_prefix
        self._arena: Arena | None = None
        self._channel: Channel | None = None
        self._pending: dict[int, tuple[asyncio.Future[Outputs], Lease]] = {}
        self._asked: dict[int, asyncio.Future[dict[str, Any]]] = {}  # STATS, CONTROL
        self._ids = itertools.count(1)
        self._tally: dict[tuple[str, int], list[int]] = {}  # [ok, ok ns, failed, failed ns]
        self._catalogued = asyncio.Event()
        self._connector: asyncio.Task[None] | None = None
        self._stopping = False

    # ---- lifecycle

    async def start(self) -> None:
        """Make the arena, connect, and wait for the first catalogue."""
        self._arena = Arena(self._prefix, self.config.frontend_shm_mib * MiB)
        self._connector = asyncio.create_task(self._connect())
        await self._catalogued.wait()

    async def stop(self) -> None:
        self._stopping = True
        if self._connector is not None:
            self._connector.cancel()
        if self._channel is not None:
            self._channel.close()
        self._fail_pending(Unavailable("server is shutting down"))
        if self._arena is not None:
            self._arena.close()
        await super().stop()

    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        while not self._stopping:
            try:
                _, channel = await loop.create_unix_connection(
                    lambda: Channel(self._frame, self._lost), str(self._path)
                )
            except OSError:
                await asyncio.sleep(RECONNECT_S)
                continue
            self._channel = channel
            channel.send(rec.Kind.HELLO, rec.Control({"pid": os.getpid()}).encode())
            log.info("connected to the engine")
            return

    def _lost(self, channel: Channel) -> None:
        if channel is not self._channel:
            return
        self._channel = None
        self._fail_pending(Unavailable("the engine process stopped; retry"))
        if self._stopping:
            return
        log.warning("lost the engine; NOT_SERVING until it is back")
        self.ready = False
        self._notify(SERVER, False)
        for name in self.names():
            self._notify(name, False)
        self._connector = asyncio.get_running_loop().create_task(self._connect())

    def _fail_pending(self, error: ServingError) -> None:
        pending, self._pending = self._pending, {}
        for future, lease in pending.values():
            lease.release()
            if not future.done():
                future.set_exception(error)
        asked, self._asked = self._asked, {}
        for waiter in asked.values():
            if not waiter.done():
                waiter.set_exception(error)

    # ---- frames from the engine

    def _frame(self, channel: Channel, kind: rec.Kind, payload: bytes) -> None:
        if kind is rec.Kind.RESULT:
            result = rec.Result.decode(payload)
            self._settle(result.request, result.outputs(), None)
        elif kind is rec.Kind.FAILURE:
            failure = rec.Failure.decode(payload)
            self._settle(failure.request, None, failure.error())
        elif kind is rec.Kind.CATALOGUE:
            self._apply(rec.Control.decode(payload).body)
        elif kind in (rec.Kind.STATS, rec.Kind.CONTROL):
            body = rec.Control.decode(payload).body
            waiter = self._asked.pop(body["request"], None)
            if waiter is not None and not waiter.done():
                waiter.set_result(body)
        else:
            log.error("unexpected %s record from the engine; ignored", kind.name)

    def _settle(self, request: int, outputs: Outputs | None, error: ServingError | None) -> None:
        entry = self._pending.pop(request, None)
        if entry is None:
            return  # its caller went away
        future, lease = entry
        lease.release()
        if future.done():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(outputs)  # type: ignore[arg-type]

    def _apply(self, body: dict[str, Any]) -> None:
        """A new catalogue: the loaded versions, and the listeners told what changed."""
        models: dict[str, dict[int, Model]] = {}
        for item in body["models"]:
            spec = ModelSpec.from_dict(item["spec"])
            old = self._models.get(spec.name, {}).get(spec.version)
            model = old if old is not None and old.spec == spec else self._model(spec, item)
            models.setdefault(spec.name, {})[spec.version] = model
        names = set(self._models) | set(models)
        for name, versions in self._models.items():
            for version in versions.keys() - models.get(name, {}).keys():
                self.metrics.forget(name, version)  # unloaded: its series go
        self._models = models
        self.ready = bool(body["ready"])
        for name in sorted(names):
            self._notify(name, name in models)
        self._notify(SERVER, self.ready)
        self._catalogued.set()
        if self._channel is not None:  # in force here now: a model-control answer waits on it
            applied = rec.Control({"generation": body["generation"]})
            self._channel.send(rec.Kind.APPLIED, applied.encode())

    def _model(self, spec: ModelSpec, item: dict[str, Any]) -> Model:
        decode_seconds = self.metrics.decode_duration.labels(spec.name, str(spec.version))
        return Model(spec, tuple(item["providers"]), decode_seconds)

    # ---- work

    async def run(self, model: Model, batch: np.ndarray, deadline: float | None) -> Outputs:
        channel = self._channel
        if channel is None or self._arena is None:
            raise Unavailable(f"{model.where}: the engine process is restarting; retry")
        lease = self._arena.put(batch)
        request = next(self._ids)
        future: asyncio.Future[Outputs] = asyncio.get_running_loop().create_future()
        self._pending[request] = (future, lease)
        spec = model.spec
        record = rec.Infer(
            request,
            spec.name,
            spec.version,
            len(batch),
            spec.image_shape,
            lease.segment,
            lease.offset,
            deadline or 0.0,
            lease.transient,
            spec.labels_crc,
        )
        channel.send(rec.Kind.INFER, record.encode())
        try:
            return await future
        finally:
            entry = self._pending.pop(request, None)
            if entry is not None:  # the caller went away before the answer
                entry[1].release()
                channel.send(rec.Kind.CANCEL, rec.Cancel(request).encode())

    def record_request(self, model: Model, ok: bool, seconds: float) -> None:
        """Tallied per version and sent once per loop turn (a Done per version)."""
        if not self._tally:
            asyncio.get_running_loop().call_soon(self._send_tally)
        tally = self._tally.setdefault((model.spec.name, model.spec.version), [0, 0, 0, 0])
        slot = 0 if ok else 2
        tally[slot] += 1
        tally[slot + 1] += int(seconds * 1e9)

    def _send_tally(self) -> None:
        tally, self._tally = self._tally, {}
        if self._channel is None:
            return  # the engine went away, and the statistics of its versions with it
        for (name, version), counts in tally.items():
            self._channel.send(rec.Kind.DONE, rec.Done(name, version, *counts).encode())

    async def statistics(self, models: Sequence[Model]) -> list[Stats]:
        self._send_tally()  # what finished before this call counts in its answer
        which = [[m.spec.name, m.spec.version] for m in models]
        answer = await self._ask(rec.Kind.STATS_ASK, {"models": which}, STATS_TIMEOUT_S)
        return [Stats.from_dict(stats) for stats in answer["stats"]]

    # ---- model control: the engine does it

    async def repository_index(self, ready_only: bool = False) -> list[IndexEntry]:
        answer = await self._control({"op": "index", "ready": ready_only})
        return [IndexEntry(**entry) for entry in answer["index"]]

    async def load_model(self, name: str) -> None:
        await self._control({"op": "load", "name": name})

    async def unload_model(self, name: str) -> None:
        await self._control({"op": "unload", "name": name})

    async def _control(self, body: dict[str, Any]) -> dict[str, Any]:
        """No time limit of its own (a load warms a model up): the caller's deadline is."""
        answer = await self._ask(rec.Kind.CONTROL_ASK, body, None)
        if "error" in answer:
            code, message = answer["error"]
            raise rec.ERRORS.get(code, ServingError)(message)
        return answer

    async def _ask(
        self, kind: rec.Kind, body: dict[str, Any], timeout_s: float | None
    ) -> dict[str, Any]:
        """Send a JSON record to the engine and await the answer with the same `request`."""
        channel = self._channel
        if channel is None:
            raise Unavailable("the engine process is restarting; retry")
        request = next(self._ids)
        waiter: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._asked[request] = waiter
        channel.send(kind, rec.Control({**body, "request": request}).encode())
        started = time.monotonic()
        try:
            return await asyncio.wait_for(waiter, timeout_s)
        except TimeoutError as exc:
            waited = time.monotonic() - started
            raise Unavailable(f"the engine did not answer in {waited:.0f} s") from exc
        finally:
            self._asked.pop(request, None)
