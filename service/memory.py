"""Decoding memory: `DecodeBudget`, the bytes of decoded pixels in flight in this process, and
`release_freed_memory`, which hands what a burst of decodes freed back to the system.

A decode reserves its estimated peak (imaging/policy.py `decoding_bytes`, from the header,
before any pixel is decoded) and releases it in a `finally`; a reservation that would pass
the budget is refused at once with DecodeBudgetExceeded (RESOURCE_EXHAUSTED), never queued, so
memory stays bounded whatever the number of decoding threads or the size of the images sent.

glibc keeps freed memory in its heaps (Pillow allocates images in 16 MiB blocks, under glibc's
mmap threshold once a first one was freed), so a process that once decoded a burst of large
images stays at the burst's size. When the budget's in-flight bytes return to zero after at
least `TRIM_AFTER_BYTES` were released, it calls `on_idle`, at most once per
`TRIM_INTERVAL_S`: the servers pass `release_freed_memory` (glibc's `malloc_trim(0)`). The
engine calls it too after unloading a version: 20 rollouts of a small model grew a server by
33 MB without it, with no object of theirs left alive, and by nothing with it.
"""

from __future__ import annotations

import ctypes
import functools
import gc
import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from service.errors import DecodeBudgetExceeded

log = logging.getLogger(__name__)

MiB = 1024 * 1024
TRIM_AFTER_BYTES = 32 * MiB  # freed since the last trim: less is not worth a trim
TRIM_INTERVAL_S = 1.0  # at most one trim per second, whatever the traffic
RETRY_LATER = "retry later"  # how a refusal that a retry may cure ends (scoring retries it)


def _nothing(*_: object) -> None:
    return None


class DecodeBudget:
    """Thread-safe accounting of the bytes decodes in this process hold, bounded by `limit`.
    `on_change(bytes in flight)` is called under the lock after each change (a gauge);
    `on_idle()` outside it, as described above. `clock` is for tests."""

    def __init__(
        self,
        limit: int,
        on_change: Callable[[int], None] = _nothing,
        on_idle: Callable[[], None] = _nothing,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.limit = limit
        self._on_change, self._on_idle, self._clock = on_change, on_idle, clock
        self._lock = threading.Lock()
        self._in_flight = 0
        self._released = 0  # since the last on_idle
        self._idle_at = -TRIM_INTERVAL_S  # when on_idle last ran

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @contextmanager
    def reserve(self, nbytes: int, what: str) -> Iterator[None]:
        """Hold `nbytes` for the body's duration; raises DecodeBudgetExceeded (naming `what`,
        e.g. "image of 7000x7000 RGB PNG") when they do not fit beside what is in flight."""
        self._take(nbytes, what)
        try:
            yield
        finally:
            self._give(nbytes)

    def _take(self, nbytes: int, what: str) -> None:
        need, limit = _mib(nbytes), f"--decode-budget-mib {_mib(self.limit)}"
        if nbytes > self.limit:
            raise DecodeBudgetExceeded(
                f"{what} needs about {need} MiB to decode, more than the whole {limit}: "
                "send a smaller image"
            )
        with self._lock:
            if self._in_flight + nbytes > self.limit:
                raise DecodeBudgetExceeded(
                    f"{what} needs about {need} MiB to decode and {_mib(self._in_flight)} MiB "
                    f"of the {limit} are held by images decoding now: {RETRY_LATER}"
                )
            self._in_flight += nbytes
            self._on_change(self._in_flight)

    def _give(self, nbytes: int) -> None:
        with self._lock:
            self._in_flight -= nbytes
            self._released += nbytes
            self._on_change(self._in_flight)
            now = self._clock()
            idle = (
                self._in_flight == 0
                and self._released >= TRIM_AFTER_BYTES
                and now - self._idle_at >= TRIM_INTERVAL_S
            )
            if idle:
                self._released, self._idle_at = 0, now
        if idle:
            self._on_idle()


def _mib(nbytes: int) -> str:
    return f"{nbytes / MiB:,.0f}" if nbytes >= MiB else f"{nbytes / MiB:.2f}"


def release_unloaded() -> None:
    """After a model version is unloaded: collect what only cycles still hold of it (a started
    server's collector runs its full collections rarely: service.loops), then give the freed
    pages back (`release_freed_memory`)."""
    gc.collect()
    release_freed_memory()


def release_freed_memory() -> None:
    """Return the free pages of every malloc arena to the system (glibc's malloc_trim(0));
    nothing where the C library has no malloc_trim (musl, macOS: logged once, at debug)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError, TypeError):
        log.debug("no malloc_trim (not glibc): memory freed after decoding stays in the heap")
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim  # type: ignore[no-any-return]
