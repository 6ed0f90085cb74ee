"""Dynamic batching, one `Batcher` per model version.

Concurrent `submit` calls are merged into one batch of up to `max_batch_size` images, waiting at
most `max_delay_s` after the oldest queued request for more to arrive; the batch runs once off
the event loop and each caller gets its own rows back. While a batch computes, the next one
gathers, so under load batches fill without waiting.

The queue is bounded in images: a submit that would overflow it fails at once with QueueFull
(RESOURCE_EXHAUSTED) instead of growing memory. A request whose deadline has passed, or whose
caller went away, is dropped before it is computed.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field

import numpy as np

from service.errors import DeadlineExceeded, QueueFull, ServingError, Unavailable

log = logging.getLogger(__name__)

Outputs = dict[str, np.ndarray]


@dataclass
class BatchReport:
    """What one executed batch did, for metrics and statistics."""

    size: int  # images
    queue_s: list[float]  # per request: enqueue -> batch start
    compute_s: float  # the model run alone, in its thread
    ok: bool


@dataclass(eq=False)
class _Pending:
    images: np.ndarray  # (n, H, W, C) uint8
    future: asyncio.Future[Outputs]
    deadline: float | None  # time.monotonic() by which the answer is useless
    enqueued: float = field(default_factory=time.monotonic)


def merge(images: Sequence[np.ndarray]) -> tuple[np.ndarray, list[int]]:
    """Concatenate per-request (n_i, H, W, C) arrays; offsets[i] is where request i starts
    (plus a final end offset)."""
    offsets = [0]
    for array in images:
        offsets.append(offsets[-1] + len(array))
    return np.concatenate(images, axis=0), offsets


def split(outputs: Outputs, offsets: Sequence[int]) -> list[Outputs]:
    """Undo `merge` on every output: one {name: rows} per request."""
    return [
        {name: value[start:end] for name, value in outputs.items()}
        for start, end in zip(offsets[:-1], offsets[1:], strict=True)
    ]


class Batcher:
    def __init__(
        self,
        run: Callable[[np.ndarray], Outputs],
        executor: Executor,
        max_batch_size: int,
        max_delay_s: float,
        max_queue_images: int,
        report: Callable[[BatchReport], None] | None = None,
        name: str = "",
        inline_up_to: int = 0,
    ) -> None:
        self._run = run
        self._executor = executor
        # Batches of up to `inline_up_to` images run on the event loop thread: when a run takes
        # well under a millisecond, the hand-off to a thread costs more than the run itself.
        self.inline_up_to = inline_up_to
        self.max_batch_size = max_batch_size
        self._max_delay_s = max_delay_s
        self._max_queue = max_queue_images
        self._report = report
        self._name = name
        self._pending: collections.deque[_Pending] = collections.deque()
        self._queued_images = 0
        self._arrived = asyncio.Event()
        self._worker: asyncio.Task[None] | None = None
        self._closed = False
        self._gathering = False  # the worker is waiting for a batch to fill

    @property
    def depth(self) -> int:
        """Images waiting (not yet in a running batch)."""
        return self._queued_images

    def start(self) -> None:
        self._worker = asyncio.get_running_loop().create_task(self._loop(), name=self._name)

    async def close(self, graceful: bool = True) -> None:
        """Stop taking requests and stop the worker. Graceful: answer everything queued or
        running first; otherwise fail it with UNAVAILABLE at once."""
        self._closed = True
        if not graceful:
            while self._pending:
                item = self._pending.popleft()
                self._queued_images -= len(item.images)
                if not item.future.done():
                    item.future.set_exception(Unavailable(f"{self._name}: shutting down"))
            if self._worker is not None:
                self._worker.cancel()
        self._arrived.set()
        if self._worker is not None:
            await asyncio.gather(self._worker, return_exceptions=True)

    async def submit(self, images: np.ndarray, deadline: float | None = None) -> Outputs:
        """Infer (n, H, W, C) uint8 images; a request above max_batch_size is cut into
        batch-sized pieces. Raises QueueFull, DeadlineExceeded, Unavailable."""
        if self._closed:
            raise Unavailable(f"{self._name}: this model version is being unloaded")
        n = len(images)
        if self._queued_images + n > self._max_queue:
            raise QueueFull(
                f"{self._name}: queue full ({self._queued_images} images waiting, "
                f"--max-queue-size {self._max_queue}); retry later"
            )
        loop = asyncio.get_running_loop()
        pieces = []
        for start in range(0, n, self.max_batch_size):
            chunk = images[start : start + self.max_batch_size]
            item = _Pending(chunk, loop.create_future(), deadline)
            self._pending.append(item)
            self._queued_images += len(item.images)
            pieces.append(item.future)
        # Wake the worker only when it has something to decide: it is idle, or a batch is
        # full. While it gathers a batch it wakes at the deadline of its window anyway.
        if not self._gathering or self._queued_images >= self.max_batch_size:
            self._arrived.set()
        if len(pieces) == 1:  # the common case, without gather's bookkeeping
            try:
                return await pieces[0]
            finally:
                pieces[0].cancel()  # a caller that went away leaves its piece unanswered
        return await self._gather(pieces)

    @staticmethod
    async def _gather(pieces: list[asyncio.Future[Outputs]]) -> Outputs:
        try:
            results = await asyncio.gather(*pieces, return_exceptions=True)
        finally:
            for future in pieces:  # a caller that went away cancels its queued pieces
                future.cancel()
        answers: list[Outputs] = []
        for result in results:
            if isinstance(result, BaseException):
                raise result
            answers.append(result)
        return {name: np.concatenate([a[name] for a in answers]) for name in answers[0]}

    async def _loop(self) -> None:
        while True:
            if not self._pending:
                if self._closed:
                    return  # closed and nothing left: every caller has its answer
                self._arrived.clear()
                await self._arrived.wait()
                continue
            self._gathering = True
            try:
                await self._gather_window()
            finally:
                self._gathering = False
            batch = self._take()
            if batch:
                await self._execute(batch)

    async def _gather_window(self) -> None:
        """Wait until a full batch is queued or the oldest request has waited max_delay_s."""
        close_at = self._pending[0].enqueued + self._max_delay_s
        while self._queued_images < self.max_batch_size:
            remaining = close_at - time.monotonic()
            if remaining <= 0:
                return
            self._arrived.clear()
            try:
                async with asyncio.timeout(remaining):  # cheaper than wait_for: no new task
                    await self._arrived.wait()
            except TimeoutError:
                return

    def _take(self) -> list[_Pending]:
        """Pop requests in arrival order up to max_batch_size images, dropping the expired."""
        batch: list[_Pending] = []
        size = 0
        now = time.monotonic()
        while self._pending:
            item = self._pending[0]
            if size and size + len(item.images) > self.max_batch_size:
                break
            self._pending.popleft()
            self._queued_images -= len(item.images)
            if item.future.done():  # cancelled by its caller
                continue
            if item.deadline is not None and now > item.deadline:
                item.future.set_exception(
                    DeadlineExceeded(
                        f"{self._name}: deadline passed after {now - item.enqueued:.3f} s in the "
                        "queue; dropped before computing"
                    )
                )
                continue
            batch.append(item)
            size += len(item.images)
        return batch

    def _timed(self, images: np.ndarray) -> tuple[Outputs, float]:
        """Run the model in the executor; the time is the model's alone (no hand-offs)."""
        started = time.monotonic()
        outputs = self._run(images)
        return outputs, time.monotonic() - started

    async def _execute(self, batch: list[_Pending]) -> None:
        started = time.monotonic()
        images, offsets = merge([item.images for item in batch])
        loop = asyncio.get_running_loop()
        ok = True
        compute_s = 0.0
        try:
            if len(images) <= self.inline_up_to:
                await asyncio.sleep(0)  # let the loop serve I/O between batches: never starve it
                outputs, compute_s = self._timed(images)
            else:
                outputs, compute_s = await loop.run_in_executor(self._executor, self._timed, images)
        except BaseException as exc:  # answer every caller; the batcher itself must survive
            ok = False
            if isinstance(exc, asyncio.CancelledError):  # the worker is being cancelled
                for item in batch:
                    if not item.future.done():
                        item.future.set_exception(Unavailable(f"{self._name}: shutting down"))
                raise
            if not isinstance(exc, ServingError):
                log.exception("%s: inference failed for a batch of %d", self._name, len(images))
                exc = ServingError(f"{self._name}: inference failed")
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(exc)
        else:
            for item, rows in zip(batch, split(outputs, offsets), strict=True):
                if not item.future.done():
                    item.future.set_result(rows)
        if self._report is not None:
            self._report(
                BatchReport(
                    size=len(images),
                    queue_s=[started - item.enqueued for item in batch],
                    compute_s=compute_s,
                    ok=ok,
                )
            )
