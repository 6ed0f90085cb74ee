"""Scoring engines: lists of files in, `Result`s out (scores or a reason per file), batch by batch.

- `LocalEngine`: onnxruntime in this process; worker processes decode the next batches while
  the current one is inferred.
- `RemoteEngine`: our classifier.v1 API on a running server, several requests in flight,
  retrying while the server is unavailable or its queue is full.
- `RayEngine` (service/scoring/ray_engine.py): Ray Data across a cluster.

Every engine answers with the same decoding policy and the same model, so the rows they produce
are the same.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import re
import threading
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

import grpc
import numpy as np

from service import bottleneck_map
from service.bottleneck_map import BottleneckMap
from service.client import Client, ClientError
from service.config import MAX_IMAGE_PIXELS
from service.cpus import available_cpus
from service.errors import InvalidInput, ScoringError
from service.memory import RETRY_LATER
from service.predictions import Prediction, failed
from service.repository import ModelSpec
from service.runtime import Runtime, Session
from service.scoring.decoding import (
    Decoded,
    check_regular,
    decode_file,
    decode_files,
    read_error,
    ready,
    watch_parent,
)
from service.scoring.files import Item

log = logging.getLogger(__name__)

T = TypeVar("T")
Image = bytes | np.ndarray  # an encoded file, or (H, W, C) uint8 pixels decoded here


@dataclass
class Result:
    """One batch's answers: the files scored (in the arrays' order) and the files that failed."""

    keys: list[str] = field(default_factory=list)
    probabilities: np.ndarray = field(default_factory=lambda: np.empty((0, 0), np.float32))
    bottleneck: np.ndarray = field(default_factory=lambda: np.empty((0, 2), np.float32))
    errors: list[tuple[str, str]] = field(default_factory=list)  # (key, short reason)

    def __len__(self) -> int:
        return len(self.keys) + len(self.errors)


class Engine(Protocol):
    kind: str
    model: str
    version: int
    labels: tuple[str, ...]
    device: str  # where the model runs: an execution provider, or the server's address
    bottleneck_map: BottleneckMap | None  # the version's map, drawn behind the scored points

    def score(self, items: Sequence[Item]) -> Iterator[Result]: ...

    def close(self) -> None: ...


def batches(items: Sequence[T], size: int) -> Iterator[Sequence[T]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def in_order(
    submit: Callable[[Sequence[Item]], Future[T]], items: Sequence[Item], size: int, ahead: int
) -> Iterator[tuple[Sequence[Item], Future[T]]]:
    """Submit batches of `items`, keeping `ahead` in flight, and hand them back in order."""
    pending: deque[tuple[Sequence[Item], Future[T]]] = deque()
    for batch in batches(items, size):
        pending.append((batch, submit(batch)))
        if len(pending) >= ahead:
            yield pending.popleft()
    while pending:
        yield pending.popleft()


def scored(batch: Sequence[Item], decoded: Decoded, session: Session) -> Result:
    """Infer the files of `batch` that decoded."""
    result = Result(errors=[(batch[i].key, reason) for i, reason in decoded.errors.items()])
    result.keys = [batch[i].key for i in decoded.good]
    if decoded.good:
        outputs = session.run(decoded.pixels)
        result.probabilities = outputs["probabilities"]
        result.bottleneck = outputs["bottleneck"]
    return result


class LocalEngine:
    """onnxruntime here; `workers` processes decode (0: one per CPU this process may use).
    Each decodes one file at a time, so the job's decoding memory is `workers` images of at
    most --max-image-pixels (no decode budget: it would only refuse what that limit does).
    onnxruntime gets
    `intra_op_threads`, 0: the cores the decoders leave, at least one (more threads than
    that only fight the decoders for the same cores; measured slower on 2 cores)."""

    kind = "local"

    def __init__(
        self,
        spec: ModelSpec,
        device: str,
        workers: int,
        batch_size: int,
        max_pixels: int,
        intra_op_threads: int = 0,
    ) -> None:
        self.spec = spec
        self.model, self.version, self.labels = spec.name, spec.version, spec.labels
        self.bottleneck_map = bottleneck_map.load(spec).map
        cores = available_cpus()
        self.workers = workers or cores
        threads = intra_op_threads or max(1, cores - self.workers)
        self.session = Runtime(device, threads).session(spec)
        self.device = self.session.provider
        self.batch_size = batch_size
        self.max_pixels = max_pixels
        self._pool: ProcessPoolExecutor | None = None
        self._start()

    def _start(self) -> ProcessPoolExecutor:
        """The decoding processes, started and ready (so a job's throughput is not its
        start-up)."""
        if self._pool is None:
            self._pool = decoders(self.workers)
        return self._pool

    def score(self, items: Sequence[Item]) -> Iterator[Result]:
        for batch, future in in_order(self._submit, items, self.batch_size, 2 * self.workers):
            try:
                decoded = future.result()
            except BrokenProcessPool:  # a decoder died (a crash in a native library, OOM)
                decoded = self._recover(batch)
            yield scored(batch, decoded, self.session)

    def _submit(self, batch: Sequence[Item]) -> Future[Decoded]:
        return self._start().submit(decode_files, _paths(batch), *self._decoding)

    @property
    def _decoding(self) -> tuple[tuple[int, int, int], int]:
        return self.spec.image_shape, self.max_pixels

    def _recover(self, batch: Sequence[Item]) -> Decoded:
        """After a decoder died, every batch in flight failed with it: each is tried again in
        a fresh pool, and the batch that kills that one too is decoded file by file, each file
        alone in a process of its own, so only the culprit becomes an error row."""
        try:
            retry = self._submit(batch)
        except BrokenProcessPool:  # the current pool is the broken one: replace it
            self._discard()
            retry = self._submit(batch)
        try:
            return retry.result()
        except BrokenProcessPool:
            self._discard()
        log.warning(
            "a decoder crashed in a batch of %d files; decoding them one by one", len(batch)
        )
        arrays, good, errors = [], [], {}
        for position, item in enumerate(batch):
            with decoders(1) as alone:
                try:
                    one = alone.submit(decode_files, [item.path], *self._decoding).result()
                except BrokenProcessPool:
                    errors[position] = "the image decoder crashed on this file"
                    continue
            if one.good:
                arrays.append(one.pixels[0])
                good.append(position)
            else:
                errors[position] = one.errors[0]
        pixels = np.stack(arrays) if arrays else np.empty((0, *self.spec.image_shape), np.uint8)
        return Decoded(pixels, good, errors)

    def _discard(self) -> None:
        """Drop a broken pool (its futures have all failed already)."""
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None


def _paths(batch: Sequence[Item]) -> list[str]:
    return [item.path for item in batch]


def decoders(workers: int) -> ProcessPoolExecutor:
    """`workers` decoding processes, started. forkserver: they never inherit onnxruntime's
    threads from this process; each exits by itself if this process is killed."""
    context = multiprocessing.get_context("forkserver")
    pool = ProcessPoolExecutor(
        workers, mp_context=context, initializer=watch_parent, initargs=(os.getpid(),)
    )
    for started in [pool.submit(ready) for _ in range(workers)]:
        started.result()
    return pool


# ---- remote

# Transient: the server is restarting or draining (UNAVAILABLE; CANCELLED for a call caught by
# its shutdown), its queue is full, or a call timed out under load.
RETRIED = (
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.CANCELLED,
    grpc.StatusCode.ABORTED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.DEADLINE_EXCEEDED,
)
# The server names the model, version and position of a failed image; the row names the file.
_WHERE = re.compile(r"^model '.*' version \d+, image \d+: ")
_OVERHEAD_BYTES = 64 * 1024  # room for the request's framing beside the images' bytes


class RemoteEngine:
    """Our gRPC API on a running server; `workers` requests in flight (0: 4)."""

    kind = "remote"

    def __init__(
        self,
        client: Client,
        model: str,
        version: int,
        workers: int,
        batch_size: int,
        max_message_bytes: int,
        max_pixels: int = MAX_IMAGE_PIXELS,
        retries: int = 8,
    ) -> None:
        self.client = client
        try:
            info = client.get_model(model, version)
        except ClientError as exc:
            raise ScoringError(f"--server {client.target}: {exc}") from None
        # The version is pinned: a newer one loaded during the job does not mix into the table.
        self.model, self.version, self.labels = info.name, info.version, info.labels
        self.bottleneck_map = info.bottleneck_map
        self.shape = info.input_shape
        self.max_pixels = max_pixels
        self.device = f"{client.target} ({', '.join(info.execution_providers)})"
        self.workers = workers or 4
        self.batch_size = batch_size
        self.budget = max_message_bytes - _OVERHEAD_BYTES
        self.retries = retries
        self._pool: ThreadPoolExecutor | None = None
        self._stop = threading.Event()  # set by close(): retries end at once

    def score(self, items: Sequence[Item]) -> Iterator[Result]:
        self._pool = self._pool or ThreadPoolExecutor(self.workers, "score-remote")
        pool = self._pool
        for _, future in in_order(
            lambda batch: pool.submit(self._score, batch), items, self.batch_size, 2 * self.workers
        ):
            yield future.result()

    def _score(self, batch: Sequence[Item]) -> Result:
        result = Result()
        keys: list[str] = []
        predictions: list[Prediction] = []
        for request in self._requests(batch, result):
            predictions += self._answered([data for _, data in request])
            keys += [key for key, _ in request]
        good = [(key, p) for key, p in zip(keys, predictions, strict=True) if p.ok]
        result.errors += [
            (k, _WHERE.sub("", p.error)) for k, p in zip(keys, predictions, strict=True) if not p.ok
        ]
        result.keys = [key for key, _ in good]
        if good:
            result.probabilities = np.array([p.probabilities for _, p in good], np.float32)
            result.bottleneck = np.array(
                [(p.bottleneck_x, p.bottleneck_y) for _, p in good], np.float32
            )
        return result

    def _requests(self, batch: Sequence[Item], result: Result) -> Iterator[list[tuple[str, Image]]]:
        """The batch's readable files, grouped into requests under the message limit."""
        request: list[tuple[str, Image]] = []
        size = 0
        for item in batch:
            image = self._read(item, result)
            if image is None:
                continue
            nbytes = len(image) if isinstance(image, bytes) else image.nbytes
            if request and size + nbytes > self.budget:
                yield request
                request, size = [], 0
            request.append((item.key, image))
            size += nbytes
        if request:
            yield request

    def _read(self, item: Item, result: Result) -> Image | None:
        """The file's bytes; a file too large for one message is decoded here instead, by the
        same policy (raw pixels at the model's size travel instead of the file)."""
        try:
            check_regular(item.path)
            with open(item.path, "rb") as file:
                data = file.read(self.budget + 1)
            if len(data) <= self.budget:
                return data
            return decode_file(item.path, self.shape, self.max_pixels)
        except OSError as exc:
            result.errors.append((item.key, read_error(exc)))
        except InvalidInput as exc:
            result.errors.append((item.key, str(exc)))
        return None

    def _answered(self, images: list[Image]) -> list[Prediction]:
        """`_classify`, then again for the images the server's decode budget turned away
        while it was busy ("retry later"), after the pauses of `retrying`, up to `retries`
        times: a busy server does not turn files into error rows."""
        predictions = self._classify(images)
        for attempt in range(self.retries):
            busy = [i for i, p in enumerate(predictions) if _busy(p)]
            if not busy or self._stop.wait(backoff_s(attempt)):
                break
            log.warning(
                "--server %s: %d images refused while its decoding was busy; retrying",
                self.client.target,
                len(busy),
            )
            again = self._classify([images[i] for i in busy])
            for i, prediction in zip(busy, again, strict=True):
                predictions[i] = prediction
        return predictions

    def _classify(self, images: list[Image]) -> list[Prediction]:
        try:
            return retrying(
                lambda: self.client.classify(images, self.model, self.version, top_k=1),
                self.retries,
                f"--server {self.client.target}",
                self._stop,
            )
        except ClientError as exc:  # over the server's message limit: smaller requests
            if len(images) == 1:
                reason = f"file larger than the server accepts in one message ({exc.message})"
                return [failed(0, self.model, self.version, exc.code.name, reason)]
            half = len(images) // 2
            return self._classify(images[:half]) + self._classify(images[half:])

    def close(self) -> None:
        """Stop: queued batches are dropped and retry pauses end (an interrupted job does not
        wait out the back-off); calls in flight end when the client's channel closes."""
        self._stop.set()
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None


class Pause(Protocol):
    def wait(self, timeout: float) -> bool: ...

    def is_set(self) -> bool: ...


def retrying(call: Callable[[], T], retries: int, where: str, stop: Pause) -> T:
    """`call()`, again after 0.1, 0.2, 0.4 ... 5 s while the failure is transient (RETRIED),
    unless `stop` is set. A message over the size limit raises its ClientError at once;
    anything else, or no success after `retries` retries, is a ScoringError."""
    attempt = 0
    while True:
        try:
            return call()
        except ClientError as exc:
            if _too_large(exc):
                raise
            if exc.code not in RETRIED or attempt >= retries or stop.is_set():
                raise ScoringError(f"{where}: {exc}") from None
            pause = backoff_s(attempt)
            log.warning("%s: %s; retrying in %.1f s", where, exc.code.name, pause)
            if stop.wait(pause):
                raise ScoringError(f"{where}: {exc}") from None
            attempt += 1


def backoff_s(attempt: int) -> float:
    """The pause before retry `attempt` (from 0): 0.1, 0.2, 0.4 ... 5 s."""
    return min(5.0, 0.1 * 2**attempt)


def _busy(prediction: Prediction) -> bool:
    """Refused by the server's --decode-budget-mib while other images decoded (not an image
    too large for the whole budget, which no retry helps)."""
    return prediction.error_code == "RESOURCE_EXHAUSTED" and prediction.error.endswith(RETRY_LATER)


def _too_large(exc: ClientError) -> bool:
    return exc.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "larger than max" in exc.message
