"""The engine: loaded model versions, their batchers and onnxruntime sessions.

It loads every version in the repository at start, then polls for new and removed versions: a
new one is loaded and warmed up before it takes traffic, a broken one is logged and skipped (and
retried when its files change), a removed one is unloaded after its queue drains. In
`serve --frontends 0` the servicers call it directly; otherwise it runs in the engine process
(`service.engine.host`) and the front ends reach it over a local socket.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import os
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from prometheus_client import PlatformCollector, ProcessCollector

from service import memory, repository
from service.batcher import Batcher, BatchReport
from service.config import ServeConfig
from service.core import Core, IndexEntry, Model, Outputs, Stats
from service.engine import control
from service.engine.gauges import LiveGauges, record_batch
from service.errors import (
    ConfigError,
    ControlRefused,
    ModelLoadError,
    ModelNotFound,
    Unavailable,
    shorten,
)
from service.metrics import Metrics
from service.process_metrics import Processes, ServerProcesses, gpu_collector
from service.repository import ModelSpec
from service.runtime import Runtime, Session

log = logging.getLogger(__name__)

# Batches the CPU computes in less than this (by the warm-up timing) run on the event loop
# thread: on a small CPU box the hand-off to a thread and back (and the GIL traffic while the
# loop keeps taking requests) costs more than the loop pausing this long. Measured with
# `bench/serve.py --models scratch --scenarios single-64` on 2 cores: 5 ms against 1 ms took
# the default scratch net from 0.57-0.63x to 0.67-0.74x of the transport ceiling and its
# server-side p99 from 23-28 ms to 5 ms; larger models (VGG16) still run in a thread.
INLINE_BELOW_S = 0.005
# How long a version that was unloaded or replaced goes on taking the requests that looked it up
# before (they decode their images between the lookup and the queue; a front end learns of the
# change a moment after the engine).
RETIRE_GRACE_S = 1.0


@dataclass(eq=False)
class LoadedModel(Model):
    session: Session
    batcher: Batcher
    stats: Stats
    signature: tuple[int, ...] = ()  # of its files when loaded (a reload on request: changed?)


class Engine(Core):
    def __init__(
        self, config: ServeConfig, metrics: Metrics | None = None, state_path: Path | None = None
    ) -> None:
        """`state_path`: where the models loaded on request are kept (explicit mode), so that
        an engine restarted by the supervisor loads them again; None: nowhere."""
        super().__init__(config, metrics)
        self.state_path = state_path
        self.runtime = Runtime(config.device, config.intra_op_threads)
        self._failed: dict[tuple[str, int], tuple[tuple[int, ...], str]] = {}  # signature, why
        self._changing: dict[tuple[str, int], str] = {}  # versions LOADING or UNLOADING now
        self._control = asyncio.Lock()  # one change at a time: scans, loads, unloads
        self._policy = config.versions
        self._explicit: set[str] = set()  # explicit mode: the models loaded on request
        self._changes: set[asyncio.Task[None]] = set()  # loads and unloads under way
        self._retiring: dict[tuple[str, int], list[LoadedModel]] = {}  # see _retire
        self._on_disk: dict[str, list[int]] = {}
        self._compute = ThreadPoolExecutor(max_workers=8, thread_name_prefix="infer")
        self._loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="load")
        self._poller: asyncio.Task[None] | None = None
        self.found: set[str] = set()  # the model names of the last repository scan
        self._stopping = threading.Event()  # tells a warm-up in the loader thread to give up
        self.metrics.add_live(LiveGauges(self))
        # Which processes serve with this engine: set by the engine process for its front
        # ends (service.engine.host); alone, this one.
        self.processes: Processes = lambda: [("server", os.getpid())]
        self.metrics.add_live(ServerProcesses(lambda: self.processes()))
        self.metrics.add_live(ProcessCollector(registry=None))
        self.metrics.add_live(PlatformCollector(registry=None))
        gpus = gpu_collector()
        if gpus is not None:
            self.metrics.add_live(gpus)

    # ---- lifecycle

    async def start(self) -> None:
        """Load the repository once (ConfigError for an unusable --device cuda, or a
        --load-model not in the repository), then poll (--model-control-mode poll)."""
        async with self._control:
            found = await self._scan()
            if self.config.model_control_mode == "explicit":
                self._explicit = self._initial(found)
            await self._apply(found)
        self.ready = True
        self._notify("", True)
        if self.config.model_control_mode == "poll" and self.config.poll_interval_s > 0:
            self._poller = asyncio.get_running_loop().create_task(self._poll(), name="poll")

    def _initial(self, found: dict[str, list[int]]) -> set[str]:
        """Explicit mode: the models to load at start. After a restart of this engine, those
        it had loaded on request (`state_path`); the first time, --load-model's."""
        remembered = self._remembered()
        if remembered is None:
            return control.initial(self.config.load_models, found, str(self.config.repository))
        names = set(remembered)
        for name in sorted(names - set(found)):
            log.warning("model %r was loaded before the engine restarted and is gone now", name)
        log.info("loading the models loaded before the engine restarted: %s", sorted(names))
        return names & set(found)

    def _remembered(self) -> list[str] | None:
        if self.state_path is None or not self.state_path.exists():
            return None
        try:
            names = json.loads(self.state_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            log.error("cannot read %s (%s): loading the --load-model models", self.state_path, exc)
            return None
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            log.error("%s is not a list of model names: loading the --load-model models",
                      self.state_path)  # fmt: skip
            return None
        return names

    async def stop(self) -> None:
        self.ready = False
        self._stopping.set()
        for retiring in [m for models in self._retiring.values() for m in models]:
            await retiring.batcher.close(graceful=False)  # as every loaded version, below
        if self._poller is not None:
            self._poller.cancel()
            await asyncio.gather(self._poller, return_exceptions=True)
        for change in list(self._changes):  # a load or unload under way: cut at shutdown
            change.cancel()
        await asyncio.gather(*self._changes, return_exceptions=True)
        for model in self.loaded():  # after the drain: whatever is left is cut
            await model.batcher.close(graceful=False)
        for pool in (self._compute, self._loader):
            pool.shutdown(wait=False, cancel_futures=True)
        await super().stop()

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.config.poll_interval_s)
            try:
                await self.refresh()
            except ConfigError as exc:  # e.g. the repository is briefly missing
                log.error("repository scan: %s; retrying in %ss", exc, self.config.poll_interval_s)
            except Exception:  # a scan must never kill the poller
                log.exception(
                    "repository scan failed; retrying in %ss", self.config.poll_interval_s
                )

    async def refresh(self) -> None:
        """Scan the repository and follow it: load versions that appeared or came into the
        version policy, unload versions that disappeared or fell out of it."""
        async with self._control:  # one change at a time: scans, loads, unloads
            await self._apply(await self._scan())

    async def _scan(self, unavailable: bool = False) -> dict[str, list[int]]:
        """What the repository holds now (`unavailable`: a missing repository is UNAVAILABLE,
        as for a request, not the ConfigError it is at start)."""
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._loader, repository.scan, self.config.repository)
        except ConfigError as exc:
            if not unavailable:
                raise
            raise _repository_gone(exc) from exc

    async def _apply(self, found: dict[str, list[int]], only: str | None = None) -> None:
        """Serve what `found` and the mode ask for (`only`: change that model alone)."""
        self._on_disk = found
        serving = control.active(self.config.model_control_mode, found, self._explicit)
        self.found = set(serving)
        unloads: list[tuple[str, int, str]] = []
        for name in serving:
            if only is not None and name != only:
                continue
            if name not in self._models:
                self._notify(name, False)  # known, not (yet) serving: health NOT_SERVING
            chosen = await self._load_versions(name, found[name])
            dropped = [v for v in self.versions(name) if v not in chosen]
            for version in dropped:
                gone = version not in found[name]
                why = "gone from the repository" if gone else f"out of {self._policy_text}"
                unloads.append((name, version, why))
        for name in self.names():
            if name not in serving and (only is None or name == only):
                unloads += [(name, v, "gone from the repository") for v in self.versions(name)]
        await asyncio.gather(*(self._unload(*u) for u in unloads))  # they retire side by side

    async def _load_versions(self, name: str, versions: list[int]) -> list[int]:
        """Load the versions the policy picks among those that load (a failed one is passed
        over: latest:1 then keeps the last good version); returns the picked ones."""
        candidates = [v for v in versions if not self._known_broken(name, v)]
        while True:
            chosen = self._policy.select(candidates)
            missing = [v for v in chosen if v not in self._models.get(name, {})]
            if not missing:
                return chosen
            for version in missing:
                if not await self._load(name, version):
                    candidates.remove(version)
                    break

    def _known_broken(self, name: str, version: int) -> bool:
        """Failed before, with the same files (retried once they change)."""
        failed = self._failed.get((name, version))
        folder = self.config.repository / name / str(version)
        return failed is not None and failed[0] == _signature(folder)

    async def _load(self, name: str, version: int) -> bool:
        loop = asyncio.get_running_loop()
        signature = _signature(self.config.repository / name / str(version))
        self._changing[(name, version)] = control.LOADING
        try:
            spec, session = await loop.run_in_executor(self._loader, self._open, name, version)
        except ModelLoadError as exc:
            log.error("skipping %s", exc)
            self._failed[(name, version)] = (signature, self._for_clients(str(exc)))
            return False
        finally:
            self._changing.pop((name, version), None)
        self._failed.pop((name, version), None)
        stats = Stats()
        model = LoadedModel(
            spec,
            session.providers,
            self.metrics.decode_duration.labels(name, str(version)),
            session,
            self._batcher(spec, session, stats),
            stats,
            signature,
        )
        model.batcher.start()
        self._models.setdefault(name, {})[version] = model  # replaces the old one (a reload)
        log.info(
            "loaded model %r version %d on %s, %s (batch of %d: %.1f ms; batches up to %d "
            "run on the event loop)",
            name,
            version,
            ", ".join(session.providers),
            session.threads,
            self.config.max_batch_size,
            session.max_batch_s * 1000,
            model.batcher.inline_up_to,
        )
        self._notify(name, True)
        return True

    # ---- model control (Triton's model repository extension)

    async def repository_index(self, ready_only: bool = False) -> list[IndexEntry]:
        # what is on disk now, scanned beside the loader thread (which may be warming up)
        try:
            found = await asyncio.to_thread(repository.scan, self.config.repository)
        except ConfigError as exc:
            raise _repository_gone(exc) from exc
        loaded = {name: self.versions(name) for name in self.names()}
        failed = {key: message for key, (_, message) in self._failed.items()}
        mode = self.config.model_control_mode
        serving = self.found if mode == "none" else control.active(mode, found, self._explicit)
        entries = control.index(found, serving, loaded, self._changing, failed, self._policy, mode)
        return [e for e in entries if e.state == control.READY or not ready_only]

    async def load_model(self, name: str) -> None:
        self._check_control("load")
        await self._to_the_end(functools.partial(self._load_model, name))

    async def unload_model(self, name: str) -> None:
        self._check_control("unload")
        await self._to_the_end(functools.partial(self._unload_model, name))

    async def _to_the_end(self, change: Callable[[], Awaitable[None]]) -> None:
        """One change at a time. A caller that goes away while it waits for its turn drops out;
        once its change has begun, it runs to its end as the engine's own task (a cancelled
        RPC must not leave a version half loaded or half unloaded)."""
        await self._control.acquire()

        async def run() -> None:
            try:
                await change()
            finally:
                self._control.release()

        task = asyncio.get_running_loop().create_task(run())
        self._changes.add(task)  # held until done (a loop keeps only weak references)
        task.add_done_callback(self._changes.discard)
        task.add_done_callback(_finished_change)
        await asyncio.shield(task)

    async def _load_model(self, name: str) -> None:
        found = await self._scan(unavailable=True)
        if name not in found:
            raise ModelNotFound(f"model {shorten(name)!r}: no such model in the repository")
        self._remember(self._explicit | {name})
        for key in [key for key in self._failed if key[0] == name]:
            del self._failed[key]  # asked again: try again, even with the same files
        await self._apply(found, only=name)
        problems = self._load_problems(name, found[name]) + await self._reload_changed(name)
        serving = self.versions(name)
        if problems:
            now = f"version {', '.join(map(str, serving))} serves" if serving else "nothing serves"
            raise ModelLoadError(f"model {name!r}: {'; '.join(problems)}; {now}")
        log.info("model %r loaded on request: versions %s", name, serving)

    def _load_problems(self, name: str, versions: list[int]) -> list[str]:
        """Why versions the policy asks for are not serving after a load."""
        if not versions:
            return ["it has no version folders"]
        wanted = self._policy.select(versions)
        problems = [self._failed[(name, v)][1] for v in wanted if (name, v) in self._failed]
        if self._policy.kind == "specific":
            missing = sorted(self._policy.versions - set(versions))
            if missing:
                folders = ", ".join(map(str, missing))
                problems.append(f"no version folder {folders} ({self._policy_text})")
        if not wanted and not problems:
            have = ", ".join(map(str, versions))
            problems.append(f"{self._policy_text} picks none of its versions ({have})")
        return problems

    async def _reload_changed(self, name: str) -> list[str]:
        """Reload the loaded versions whose files changed on disk (Triton's reload): the new
        session takes the traffic once warm, then the old one drains. A version that fails to
        reload keeps serving its old files; returns why each failed."""
        failures = []
        for version, model in list(self._models.get(name, {}).items()):
            old = self._loaded(model)
            if _signature(self.config.repository / name / str(version)) == old.signature:
                continue
            if not await self._load(name, version):
                why = self._failed[(name, version)][1]
                failures.append(f"reloading failed ({why}); its old files keep serving")
                continue
            log.info("reloaded model %r version %d: draining the old session", name, version)
            await self._retire(old)
        return failures

    async def _unload_model(self, name: str) -> None:
        if name not in self._explicit and name not in self._models:
            found = await self._scan(unavailable=True)
            if name not in found:
                raise ModelNotFound(f"model {shorten(name)!r}: no such model in the repository")
            return  # not loaded: nothing to do (as Triton answers)
        self._remember(self._explicit - {name})
        self.found.discard(name)
        for key in [key for key in self._failed if key[0] == name]:
            del self._failed[key]  # an old failure is no reason once unloaded
        unloads = [self._unload(name, v, "unloaded on request") for v in self.versions(name)]
        await asyncio.gather(*unloads)

    def _remember(self, names: set[str]) -> None:
        """The models loaded on request, kept in `state_path` (if any) for a restarted engine;
        a file that cannot be written is logged, and the change goes on."""
        self._explicit = names
        if self.state_path is None:
            return
        staging = self.state_path.with_name(f".{self.state_path.name}.{os.getpid()}")
        try:
            staging.write_text(json.dumps(sorted(names)), encoding="utf-8")
            staging.replace(self.state_path)  # whole or not at all
        except OSError as exc:
            log.error(
                "cannot keep the models loaded on request in %s (%s): an engine restarted "
                "now would load --load-model's instead",
                self.state_path,
                exc,
            )

    def _check_control(self, what: str) -> None:
        mode = self.config.model_control_mode
        if mode != "explicit":
            how = "follows the repository on disk" if mode == "poll" else "loaded it once"
            raise ControlRefused(
                f"cannot {what} models: this server runs --model-control-mode {mode} (it "
                f"{how}); start it with --model-control-mode explicit to load and unload "
                "models on request"
            )

    def _for_clients(self, message: str) -> str:
        """A load error as clients see it (in load answers and the index): the repository's
        place on this machine left out (the log has it)."""
        paths = {str(self.config.repository.resolve()), str(self.config.repository)}
        for path in sorted(paths, key=len, reverse=True):
            message = message.replace(path + os.sep, "").replace(path, "<repository>")
        return message

    @property
    def _policy_text(self) -> str:
        return f"--version-policy {self._policy}"

    def _open(self, name: str, version: int) -> tuple[ModelSpec, Session]:
        spec = repository.read_spec(self.config.repository, name, version)
        session = self._warmed(spec, self.config.intra_op_threads)
        if self.config.intra_op_threads == 0 and self._all_inline(session):
            # Every batch runs on the event loop, which waits for it however many threads
            # share it; one thread spends the least CPU (measured: the seed network on 2 cores
            # took 50 % more CPU per image on two threads, and longer at batches of 8-32).
            single = self._warmed(spec, 1)
            if self._all_inline(single):
                session = single
        return spec, session

    def _warmed(self, spec: ModelSpec, threads: int) -> Session:
        session = self.runtime.session(spec, threads)
        started = time.monotonic()
        try:
            session.warm_up(self.config.max_batch_size, self._stopping)
        except Exception as exc:
            raise ModelLoadError(
                f"model {spec.name!r} version {spec.version}: warm-up failed: {exc}"
            ) from exc
        log.debug(
            "warmed up %r v%d on %s in %.2fs",
            spec.name,
            spec.version,
            session.threads,
            time.monotonic() - started,
        )
        return session

    def _all_inline(self, session: Session) -> bool:
        return self._inline_up_to(session) >= self.config.max_batch_size

    def _inline_up_to(self, session: Session) -> int:
        """The largest batch that runs on the event loop: what the CPU computes in about
        INLINE_BELOW_S, by the warm-up's timing (never on CUDA: its runs wait on the device)."""
        if session.on_cuda:
            return 0
        per_image_s = session.max_batch_s / self.config.max_batch_size
        return int(INLINE_BELOW_S / per_image_s) if per_image_s > 0 else 0

    def _batcher(self, spec: ModelSpec, session: Session, stats: Stats) -> Batcher:
        labels = (spec.name, str(spec.version))
        batch_size = self.metrics.batch_size.labels(*labels)
        inference = self.metrics.inference_duration.labels(*labels)
        queue = self.metrics.queue_duration.labels(*labels)

        def report(batch: BatchReport) -> None:
            batch_size.observe(batch.size)
            inference.observe(batch.compute_s)
            for queued in batch.queue_s:
                queue.observe(queued)
            record_batch(stats, batch)

        return Batcher(
            session.run,
            self._compute,
            self.config.max_batch_size,
            self.config.max_queue_delay_s,
            self.config.max_queue_size,
            report,
            name=f"model {spec.name!r} version {spec.version}",
            inline_up_to=self._inline_up_to(session),
        )

    async def _unload(self, name: str, version: int, why: str) -> None:
        """Refuse new lookups of the version at once; retire it (below); then free it."""
        model = self._loaded(self._models[name].pop(version))
        if not self._models[name]:
            del self._models[name]
        self._notify(name, name in self._models)
        log.info("unloading model %r version %d (%s): draining its queue", name, version, why)
        self._changing[(name, version)] = control.UNLOADING
        try:
            await self._retire(model)
        finally:
            self._changing.pop((name, version), None)
            self.metrics.forget(name, version)
            del model  # the last reference: its session and arena are freed here...
        loop = asyncio.get_running_loop()  # ...and given back to the system, off the loop
        await loop.run_in_executor(self._loader, memory.release_unloaded)
        log.info("unloaded model %r version %d (%s)", name, version, why)

    async def _retire(self, model: LoadedModel) -> None:
        """A version no lookup finds any more (unloaded, or replaced by a reload) still takes,
        for RETIRE_GRACE_S, the requests that looked it up before: they are answered by the
        version they resolved, with its labels. Then its queue drains and it closes."""
        key = (model.spec.name, model.spec.version)
        self._retiring.setdefault(key, []).append(model)
        try:
            await asyncio.sleep(RETIRE_GRACE_S)
            await model.batcher.close()
        finally:
            self._retiring[key].remove(model)
            if not self._retiring[key]:
                del self._retiring[key]

    # ---- lookups and work

    def loaded(self) -> list[LoadedModel]:
        return [
            model  # type: ignore[misc]
            for versions in list(self._models.values())
            for model in list(versions.values())
        ]

    def model(self, name: str, version: int | None = None) -> LoadedModel:
        return super().model(name, version)  # type: ignore[return-value]

    async def run(self, model: Model, batch: np.ndarray, deadline: float | None) -> Outputs:
        future = self.submit(model, batch, deadline)
        try:
            return await future
        finally:
            future.cancel()  # a caller that went away withdraws its request

    def submit(
        self, model: Model, batch: np.ndarray, deadline: float | None
    ) -> asyncio.Future[Outputs]:
        """Queue a checked (N, H, W, C) uint8 batch; cancel the future to withdraw it."""
        return self._loaded(model).batcher.put(batch, deadline)

    def resolve(
        self, name: str, version: int, shape: tuple[int, int, int], labels: int
    ) -> LoadedModel:
        """The session a front end's request goes to: the version it names, with the input
        shape and labels it resolved (a version replaced by a reload or unloaded a moment ago
        still takes such requests while it retires); else UNAVAILABLE, to be retried."""
        current = self._models.get(name, {}).get(version)
        if current is not None and _answers_as(current.spec, shape, labels):  # nearly always
            return self._loaded(current)
        for model in self._retiring.get((name, version), ()):
            if _answers_as(model.spec, shape, labels):
                return model
        raise Unavailable(
            f"model {shorten(name)!r} version {version} was unloaded or replaced while the "
            "request was on its way; retry"
        )

    async def statistics(self, models: Sequence[Model]) -> list[Stats]:
        return [self._loaded(model).stats for model in models]

    def record_request(self, model: Model, ok: bool, seconds: float) -> None:
        self._loaded(model).stats.record_request(ok, seconds)

    @staticmethod
    def _loaded(model: Model) -> LoadedModel:
        if not isinstance(model, LoadedModel):  # a bug, not a client mistake
            raise TypeError(f"{model.where} does not belong to this engine")
        return model


def _answers_as(spec: ModelSpec, shape: tuple[int, int, int], labels: int) -> bool:
    """The version takes `shape` images and answers with the labels of checksum `labels`."""
    return spec.image_shape == shape and spec.labels_crc == labels


def _repository_gone(exc: ConfigError) -> Unavailable:
    log.error("model control: %s", exc)  # the path is for the log, not for clients
    return Unavailable("the model repository is missing or unreadable; retry")


def _finished_change(task: asyncio.Task[None]) -> None:
    """A load or unload whose caller went away: its error is logged here, not lost."""
    if not task.cancelled() and (error := task.exception()) is not None:
        if not isinstance(error, ModelNotFound | ModelLoadError | Unavailable | ControlRefused):
            log.error("model change failed", exc_info=error)


def _signature(folder: Path) -> tuple[int, ...]:
    """Changes when a version's files change (so a broken version is retried once fixed)."""
    stamps = []
    for name in ("metadata.json", "model.onnx"):
        try:
            stat = (folder / name).stat()
            stamps += [stat.st_mtime_ns, stat.st_size]
        except OSError:
            stamps += [0, 0]
    return tuple(stamps)
