"""The transport-free core of the server: loaded model versions, decoding, batching, inference.

Both gRPC APIs (and the in-process CLI) call an `Engine`; it never sees a protobuf. It loads
every version in the repository at start, then polls for new and removed versions: a new one is
loaded and warmed up before it takes traffic, a broken one is logged and skipped (and retried
when its files change), a removed one is unloaded after its queue drains.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from prometheus_client import Histogram

from service import images as imaging
from service import repository
from service.batcher import Batcher, BatchReport, Outputs
from service.config import ServeConfig
from service.errors import (
    ConfigError,
    InvalidInput,
    ModelLoadError,
    ModelNotFound,
    ServingError,
    Unavailable,
    shorten,
)
from service.metrics import Metrics
from service.predictions import DEFAULT_TOP_K, Prediction, failed, from_outputs
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
ImageInput = bytes | np.ndarray  # encoded file, or raw (H, W, C) uint8 pixels


@dataclass
class Stats:
    """Per-version counters behind Triton's ModelStatistics (nanoseconds, counts)."""

    inference_count: int = 0  # images computed
    execution_count: int = 0  # batches computed
    last_inference_ms: int = 0
    success: list[int] = field(default_factory=lambda: [0, 0])  # [count, ns] whole requests
    fail: list[int] = field(default_factory=lambda: [0, 0])
    queue: list[int] = field(default_factory=lambda: [0, 0])
    compute: list[int] = field(default_factory=lambda: [0, 0])
    batches: dict[int, list[int]] = field(default_factory=dict)  # batch size -> [count, ns]

    def record_batch(self, report: BatchReport) -> None:
        compute_ns = int(report.compute_s * 1e9)
        self.execution_count += 1
        self.inference_count += report.size
        self.last_inference_ms = int(time.time() * 1000)
        _add(self.compute, compute_ns)
        _add(self.batches.setdefault(report.size, [0, 0]), compute_ns)
        for queued in report.queue_s:
            _add(self.queue, int(queued * 1e9))

    def record_request(self, ok: bool, seconds: float) -> None:
        _add(self.success if ok else self.fail, int(seconds * 1e9))


def _add(pair: list[int], ns: int) -> None:
    pair[0] += 1
    pair[1] += ns


@dataclass
class LoadedModel:
    spec: ModelSpec
    session: Session
    batcher: Batcher
    stats: Stats
    decode_seconds: Histogram  # this version's series of cnn_serving_decode_duration_seconds

    @property
    def where(self) -> str:
        return f"model {self.spec.name!r} version {self.spec.version}"


class Engine:
    def __init__(self, config: ServeConfig, metrics: Metrics | None = None) -> None:
        self.config = config
        self.metrics = metrics or Metrics()
        self.runtime = Runtime(config.device, config.intra_op_threads)
        self._models: dict[str, dict[int, LoadedModel]] = {}
        self._failed: dict[tuple[str, int], tuple[int, ...]] = {}
        self._compute = ThreadPoolExecutor(max_workers=8, thread_name_prefix="infer")
        self._decode = ThreadPoolExecutor(
            max_workers=os.cpu_count() or 2, thread_name_prefix="decode"
        )
        self._loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="load")
        self._poller: asyncio.Task[None] | None = None
        self._listeners: list[Callable[[str, bool], None]] = []
        self.ready = False
        self.draining = False
        self._stopping = threading.Event()  # tells a warm-up in the loader thread to give up

    # ---- lifecycle

    def on_model_change(self, listener: Callable[[str, bool], None]) -> None:
        """Call `listener(name, serving)` whenever a model gains its first or loses its last
        ready version."""
        self._listeners.append(listener)

    async def start(self) -> None:
        """Load the repository once (ConfigError for an unusable --device cuda), then poll."""
        await self.refresh()
        self.ready = True
        if self.config.poll_interval_s > 0:
            self._poller = asyncio.get_running_loop().create_task(self._poll(), name="poll")

    async def stop(self) -> None:
        self.ready = False
        self._stopping.set()
        if self._poller is not None:
            self._poller.cancel()
            await asyncio.gather(self._poller, return_exceptions=True)
        for versions in self._models.values():
            for model in versions.values():  # after the drain: whatever is left is cut
                await model.batcher.close(graceful=False)
        for pool in (self._compute, self._decode, self._loader):
            pool.shutdown(wait=False, cancel_futures=True)

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
        """Load versions that appeared, unload versions that disappeared."""
        loop = asyncio.get_running_loop()
        found = await loop.run_in_executor(self._loader, repository.scan, self.config.repository)
        for name, versions in found.items():
            if name not in self._models:
                self._notify(name, False)  # known, not (yet) serving: health NOT_SERVING
            for version in versions:
                if version not in self._models.get(name, {}):
                    await self._load(name, version)
        for name in list(self._models):
            for version in list(self._models[name]):
                if version not in found.get(name, []):
                    await self._unload(name, version)

    async def _load(self, name: str, version: int) -> None:
        loop = asyncio.get_running_loop()
        signature = _signature(self.config.repository / name / str(version))
        if self._failed.get((name, version)) == signature:
            return  # already reported; retried when its files change
        try:
            spec, session = await loop.run_in_executor(self._loader, self._open, name, version)
        except ModelLoadError as exc:
            self._failed[(name, version)] = signature
            log.error("skipping %s", exc)
            return
        self._failed.pop((name, version), None)
        stats = Stats()
        decode_seconds = self.metrics.decode_duration.labels(name, str(version))
        batcher = self._batcher(spec, session, stats)
        model = LoadedModel(spec, session, batcher, stats, decode_seconds)
        model.batcher.start()
        first = not self._models.get(name)
        self._models.setdefault(name, {})[version] = model
        labels = (name, str(version))
        self.metrics.model_ready.labels(*labels).set(1)
        self.metrics.queue_depth.labels(*labels).set_function(lambda: model.batcher.depth)
        device = "cuda" if session.on_cuda else "cpu"
        self.metrics.provider.labels(*labels, session.provider, device).set(1)
        log.info(
            "loaded model %r version %d on %s (batch of %d: %.1f ms; batches up to %d run on "
            "the event loop)",
            name,
            version,
            ", ".join(session.providers),
            self.config.max_batch_size,
            session.max_batch_s * 1000,
            model.batcher.inline_up_to,
        )
        if first:
            self._notify(name, True)

    def _open(self, name: str, version: int) -> tuple[ModelSpec, Session]:
        spec = repository.read_spec(self.config.repository, name, version)
        session = self.runtime.session(spec)
        started = time.monotonic()
        try:
            session.warm_up(self.config.max_batch_size, self._stopping)
        except Exception as exc:
            raise ModelLoadError(
                f"model {name!r} version {version}: warm-up failed: {exc}"
            ) from exc
        log.debug("warmed up %r v%d in %.2fs", name, version, time.monotonic() - started)
        return spec, session

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
            stats.record_batch(batch)

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

    async def _unload(self, name: str, version: int) -> None:
        model = self._models[name].pop(version)
        if not self._models[name]:
            del self._models[name]
            self._notify(name, False)
        self.metrics.model_ready.labels(name, str(version)).set(0)
        self.metrics.queue_depth.labels(name, str(version)).set(0)
        self.metrics.provider.labels(
            name, str(version), model.session.provider, "cuda" if model.session.on_cuda else "cpu"
        ).set(0)
        log.info("unloaded model %r version %d (gone from the repository)", name, version)
        await model.batcher.close()

    def _notify(self, name: str, serving: bool) -> None:
        for listener in self._listeners:
            listener(name, serving)

    # ---- lookups

    def names(self) -> list[str]:
        return sorted(self._models)

    def versions(self, name: str) -> list[int]:
        return sorted(self._models.get(name, {}))

    def model(self, name: str, version: int | None = None) -> LoadedModel:
        """The requested version, or the newest one; raises ModelNotFound."""
        versions = self._models.get(name)
        if not versions and not self.ready:
            raise Unavailable(f"model {shorten(name)!r}: the server is still loading its models")
        if not versions:
            known = ", ".join(self.names()) or "none"
            raise ModelNotFound(f"model {shorten(name)!r} is not loaded (loaded models: {known})")
        if version is None or version == 0:
            return versions[max(versions)]
        if version not in versions:
            have = ", ".join(map(str, sorted(versions)))
            raise ModelNotFound(f"model {name!r} has no version {version} (loaded: {have})")
        return versions[version]

    # ---- work

    async def decode(
        self, model: LoadedModel, inputs: Sequence[ImageInput | InvalidInput]
    ) -> list[np.ndarray | InvalidInput]:
        """Each input -> (H, W, C) uint8, or the InvalidInput that says why not (naming the
        model, version and image index). Encoded images decode in parallel, off the loop."""
        loop = asyncio.get_running_loop()
        jobs = {
            i: loop.run_in_executor(self._decode, self._decode_one, model, i, item)
            for i, item in enumerate(inputs)
            if isinstance(item, bytes)  # real work: off the loop, in parallel
        }
        decoded = dict(zip(jobs, await asyncio.gather(*jobs.values()), strict=True))
        return [
            decoded[i] if i in decoded else self._decode_one(model, i, item)
            for i, item in enumerate(inputs)
        ]

    def _decode_one(
        self, model: LoadedModel, index: int, item: ImageInput | InvalidInput
    ) -> np.ndarray | InvalidInput:
        shape = model.spec.image_shape
        started = time.monotonic()
        try:
            if isinstance(item, InvalidInput):
                raise item
            if isinstance(item, np.ndarray):
                return imaging.check_tensor(item, shape)
            array = imaging.decode(item, shape, self.config.max_image_pixels)
            model.decode_seconds.observe(time.monotonic() - started)
            return array
        except InvalidInput as exc:
            return InvalidInput(f"{model.where}, image {index}: {exc}")

    async def infer(
        self, model: LoadedModel, batch: np.ndarray, deadline: float | None = None
    ) -> Outputs:
        """(N, H, W, C) uint8 -> outputs, through the version's batcher."""
        imaging.check_tensor(batch, model.spec.image_shape)
        self.check_count(model, len(batch))
        return await model.batcher.submit(batch, deadline)

    def check_count(self, model: LoadedModel, count: int) -> None:
        """A request must hold 1 to --max-queue-size images (more could never be queued);
        checked before any decoding."""
        limit = self.config.max_queue_size
        if count == 0:
            raise InvalidInput(f"{model.where}: the request holds no images")
        if count > limit:
            raise InvalidInput(
                f"{model.where}: {count:,} images in one request; at most {limit:,} "
                "(--max-queue-size): split the request"
            )

    async def classify(
        self,
        model: LoadedModel,
        inputs: Sequence[ImageInput | InvalidInput],
        top_k: int = DEFAULT_TOP_K,
        deadline: float | None = None,
        ids: Sequence[str] = (),
    ) -> list[Prediction]:
        """One Prediction per input, in order; a bad image gets its own error, the rest are
        answered."""
        self.check_count(model, len(inputs))
        spec = model.spec
        ids = list(ids) + [""] * (len(inputs) - len(ids))
        decoded = await self.decode(model, inputs)
        good = [i for i, item in enumerate(decoded) if isinstance(item, np.ndarray)]
        results: list[Prediction] = [
            failed(i, spec.name, spec.version, item.code.name, str(item), ids[i])
            for i, item in enumerate(decoded)
            if isinstance(item, ServingError)
        ]
        if good:
            batch = np.stack([decoded[i] for i in good])  # type: ignore[misc]
            outputs = await self.infer(model, batch, deadline)
            for row, i in enumerate(good):
                results.append(
                    from_outputs(
                        i,
                        outputs["probabilities"][row],
                        outputs["bottleneck"][row],
                        spec.labels,
                        spec.name,
                        spec.version,
                        top_k,
                        ids[i],
                    )
                )
        return sorted(results, key=lambda p: p.index)


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
