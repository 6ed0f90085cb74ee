"""Dynamic batching, one `Batcher` per model version.

Concurrent `submit` calls are merged into one batch of up to `max_batch_size` images, waiting at
most `max_delay_s` (and at least 1 ms less: TIMER_SLACK_S) after the oldest queued request for
more to arrive; the batch runs once and each caller gets its own rows back. While a batch
computes, the next one gathers, so under load batches fill without waiting.

The batcher is driven by event-loop callbacks (a timer for the window, a done-callback for a
batch computed in a thread), not by a task of its own: on a CPU-bound server every extra loop
iteration per batch is time taken from the gRPC calls on the same thread.

The queue is bounded in images: a submit that would overflow it fails at once with QueueFull
(RESOURCE_EXHAUSTED) instead of growing memory. A request whose deadline has passed, or whose
caller went away, is dropped before it is computed.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field

import numpy as np

from service.errors import DeadlineExceeded, QueueFull, ServingError, Unavailable

log = logging.getLogger(__name__)

Outputs = dict[str, np.ndarray]

# A loop timer runs up to this long after its time when the loop sleeps: the selector rounds
# epoll's timeout up to whole milliseconds. A window's timer is armed this much early, so a
# window closes between max_delay_s - 1 ms and max_delay_s after it opened, never later (on
# 2 cores this kept the seed and scratch nets' server-side p99 at half load within
# max-queue-delay + two batch runs; armed on time, they overshot by about 1 ms).
TIMER_SLACK_S = 0.001


@dataclass
class BatchReport:
    """What one executed batch did, for metrics and statistics."""

    size: int  # images
    queue_s: list[float]  # per request: enqueue -> batch start
    compute_s: float  # the model run alone, in its thread
    ok: bool
    input_s: float = 0.0  # merging the requests' pixels into the batch
    output_s: float = 0.0  # splitting the outputs back into each request's rows


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
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.Handle | None = None  # the next _fire, when one is arranged
        self._timer_now = False  # that _fire is for a full batch (not a window's end)
        self._running: list[_Pending] | None = None  # the batch computing in a thread
        self._closed = False
        self._drained: asyncio.Future[None] | None = None  # close() waits on it

    @property
    def depth(self) -> int:
        """Images waiting (not yet in a running batch)."""
        return self._queued_images

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()

    async def close(self, graceful: bool = True) -> None:
        """Stop taking requests. Graceful: answer everything queued or running first;
        otherwise fail it with UNAVAILABLE at once."""
        self._closed = True
        if not graceful:
            self._fail_all(Unavailable(f"{self._name}: shutting down"))
        if self._loop is None or (not self._pending and self._running is None):
            return
        self._drained = self._loop.create_future()
        self._schedule()
        await self._drained

    def put(self, images: np.ndarray, deadline: float | None = None) -> asyncio.Future[Outputs]:
        """Queue (n, H, W, C) uint8 images; the future resolves to their rows. A request above
        max_batch_size is cut into batch-sized pieces. Cancelling the future withdraws the
        request (a queued piece is dropped before computing). Raises QueueFull, Unavailable;
        the future may fail with DeadlineExceeded or Unavailable."""
        if self._closed or self._loop is None:
            raise Unavailable(f"{self._name}: this model version is being unloaded")
        n = len(images)
        if self._queued_images + n > self._max_queue:
            raise QueueFull(
                f"{self._name}: queue full ({self._queued_images} images waiting, "
                f"--max-queue-size {self._max_queue}); retry later"
            )
        pieces = []
        for start in range(0, n, self.max_batch_size):
            chunk = images[start : start + self.max_batch_size]
            item = _Pending(chunk, self._loop.create_future(), deadline)
            self._pending.append(item)
            self._queued_images += len(item.images)
            pieces.append(item.future)
        self._schedule()
        if len(pieces) == 1:  # the common case, without gather's bookkeeping
            return pieces[0]
        return asyncio.ensure_future(self._gather(pieces))

    async def submit(self, images: np.ndarray, deadline: float | None = None) -> Outputs:
        """`put`, awaited; a caller that goes away withdraws its request."""
        future = self.put(images, deadline)
        try:
            return await future
        finally:
            future.cancel()

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

    # ---- scheduling: every path ends in _schedule, which arranges the next _fire

    def _schedule(self) -> None:
        """Arrange the next batch: next loop iteration when a full batch waits (or on close),
        else when the oldest request's window ends; nothing while a batch computes in a thread
        (its completion calls this again)."""
        assert self._loop is not None
        if self._running is not None or not self._pending:
            if self._drained is not None and self._running is None and not self._pending:
                if not self._drained.done():
                    self._drained.set_result(None)
            return
        if self._queued_images >= self.max_batch_size or self._closed:
            if self._timer is not None and not self._timer_now:
                self._timer.cancel()
                self._timer = None
            if self._timer is None:
                self._timer, self._timer_now = self._loop.call_soon(self._fire), True
        elif self._timer is None:
            end = self._pending[0].enqueued + self._max_delay_s - TIMER_SLACK_S
            wait = max(end - time.monotonic(), 0.0)
            self._timer, self._timer_now = self._loop.call_later(wait, self._fire), False

    def _fire(self) -> None:
        self._timer = None
        batch = self._take() if self._running is None else []
        if not batch:
            self._schedule()
            return
        started = time.monotonic()
        images, offsets = merge([item.images for item in batch])
        merged = time.monotonic()
        timing = (started, merged - started)
        if len(images) <= self.inline_up_to:
            try:
                outputs: Outputs | BaseException = self._run(images)
            except Exception as exc:  # answer every caller; the batcher itself must survive
                outputs = exc
            self._answer(batch, offsets, outputs, timing, time.monotonic() - merged)
            self._schedule()
            return
        assert self._loop is not None
        self._running = batch
        job = self._loop.run_in_executor(self._executor, self._timed, images)
        job.add_done_callback(functools.partial(self._computed, batch, offsets, timing))

    def _computed(
        self,
        batch: list[_Pending],
        offsets: list[int],
        timing: tuple[float, float],
        job: asyncio.Future[tuple[Outputs, float]],
    ) -> None:
        """Done-callback of a batch computed in a thread."""
        if self._running is batch:
            self._running = None
        try:
            outputs, compute_s = job.result()
        except Exception as exc:
            self._answer(batch, offsets, exc, timing, 0.0)
        else:
            self._answer(batch, offsets, outputs, timing, compute_s)
        self._schedule()

    def _timed(self, images: np.ndarray) -> tuple[Outputs, float]:
        """Run the model in the executor; the time is the model's alone (no hand-offs)."""
        started = time.monotonic()
        outputs = self._run(images)
        return outputs, time.monotonic() - started

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

    def _answer(
        self,
        batch: list[_Pending],
        offsets: list[int],
        outputs: Outputs | BaseException,
        timing: tuple[float, float],
        compute_s: float,
    ) -> None:
        """Give each caller its rows (or the error), then report the batch. `timing`: when
        the batch began (its requests' queueing ends there) and how long merging took."""
        started, input_s = timing
        ok = not isinstance(outputs, BaseException)
        splitting = time.monotonic()
        if isinstance(outputs, BaseException):
            error = outputs
            if not isinstance(error, ServingError):
                log.error(
                    "%s: inference failed for a batch of %d",
                    self._name,
                    offsets[-1],
                    exc_info=error,
                )
                error = ServingError(f"{self._name}: inference failed")
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(error)
        else:
            for item, rows in zip(batch, split(outputs, offsets), strict=True):
                if not item.future.done():
                    item.future.set_result(rows)
        if self._report is not None:
            self._report(
                BatchReport(
                    size=offsets[-1],
                    queue_s=[started - item.enqueued for item in batch],
                    compute_s=compute_s,
                    ok=ok,
                    input_s=input_s,
                    output_s=time.monotonic() - splitting,
                )
            )

    def _fail_all(self, error: ServingError) -> None:
        """Hard close: every queued and running caller gets `error` now (a batch still in its
        thread finishes there, unanswered)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        # a copy: the running batch's list is still its thread's, to answer and report on
        running, self._running = list(self._running or []), None
        while self._pending:
            running.append(self._pending.popleft())
        self._queued_images = 0
        for item in running:
            if not item.future.done():
                item.future.set_exception(error)
