"""Shared memory for pixels: a front end writes a request's (n, H, W, C) uint8 images into its
own segment and sends the engine their offset; the engine maps the segment read-only and views
them in place, without a copy through the socket.

Segments are files in /dev/shm (what POSIX shm_open makes on Linux), named
`<prefix>.<pid>.<n>`: the prefix is the supervisor's, so it can reclaim a crashed front end's
segments by name. (Not multiprocessing.shared_memory: on Python 3.11 a process that merely
attaches a segment registers it with a resource tracker that unlinks it when that process
exits.) Each front end has one arena, a ring used in request order; a request that does not fit
in what is free gets a one-off segment of its own, unlinked when the request ends.

Releasing is safe at any time: the engine only reads, and copies every batch out (`merge`)
before running it, so a region reused after its request was cancelled can only change the answer
that nobody is waiting for.
"""

from __future__ import annotations

import collections
import itertools
import logging
import mmap
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from service.errors import ConfigError, QueueFull

log = logging.getLogger(__name__)

SHM_DIR = Path("/dev/shm")
ALIGN = 64  # bytes: each region starts on a cache line
NAME = re.compile(r"[A-Za-z0-9_.-]{1,200}")


def _create(name: str, size: int) -> mmap.mmap:
    """A new segment of `size` bytes, its space reserved now (a full /dev/shm fails here, with a
    clear error, not later with SIGBUS on a write)."""
    path = SHM_DIR / name
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.posix_fallocate(fd, 0, size)
        return mmap.mmap(fd, size)
    except OSError:
        os.unlink(path)
        raise
    finally:
        os.close(fd)


def _unlink(name: str) -> None:
    try:
        os.unlink(SHM_DIR / name)
    except FileNotFoundError:
        pass


@dataclass(eq=False)
class Lease:
    """Where one request's images are; `release()` when its answer (or its end) came."""

    segment: str
    offset: int
    size: int
    transient: bool
    _arena: Arena | None = field(default=None, repr=False)
    _released: bool = False

    def release(self) -> None:
        if not self._released:
            self._released = True
            if self._arena is not None:
                self._arena._free(self)


class Arena:
    """One front end's segment, used as a ring; `put(images)` -> Lease."""

    def __init__(self, prefix: str, size: int) -> None:
        self.prefix = f"{prefix}.{os.getpid()}"
        self.name = f"{self.prefix}.0"
        self.size = size
        self._ids = itertools.count(1)
        try:
            self._map = _create(self.name, size)
        except OSError as exc:
            raise ConfigError(
                f"cannot make a {size / 2**20:.0f} MiB shared-memory segment in {SHM_DIR}: "
                f"{exc.strerror} (give the container more /dev/shm, or lower --frontend-shm-mib)"
            ) from exc
        self._head = 0  # next free byte after the newest region
        self._live: collections.deque[Lease] = collections.deque()  # oldest first
        self._transient: dict[str, mmap.mmap] = {}

    def put(self, images: np.ndarray) -> Lease:
        """Copy (n, H, W, C) uint8 `images` into shared memory; raises QueueFull when even a
        one-off segment cannot be had."""
        data = memoryview(np.ascontiguousarray(images).reshape(-1))  # type: ignore[arg-type]
        offset = self._reserve(len(data))
        if offset is None:
            return self._one_off(data)
        self._map[offset : offset + len(data)] = data
        lease = Lease(self.name, offset, _aligned(len(data)), False, self)
        self._live.append(lease)
        self._head = offset + lease.size
        return lease

    def _reserve(self, size: int) -> int | None:
        """Where `size` bytes fit in the ring, or None."""
        size = _aligned(size)
        if not self._live:
            self._head = 0
            return 0 if size <= self.size else None
        oldest = self._live[0].offset
        if self._head > oldest:  # free: [head, end) and [0, oldest)
            if self._head + size <= self.size:
                return self._head
            return 0 if size <= oldest else None
        return self._head if self._head + size <= oldest else None

    def _one_off(self, data: memoryview) -> Lease:
        name = f"{self.prefix}.{next(self._ids)}"
        try:
            segment = _create(name, max(len(data), 1))
        except OSError as exc:
            raise QueueFull(
                f"no shared memory for a request of {len(data):,} bytes ({exc.strerror}); "
                "retry later"
            ) from exc
        segment[: len(data)] = data
        self._transient[name] = segment
        return Lease(name, 0, len(data), True, self)

    def _free(self, lease: Lease) -> None:
        if lease.transient:
            self._transient.pop(lease.segment).close()
            _unlink(lease.segment)
            return
        while self._live and self._live[0]._released:
            self._live.popleft()

    @property
    def segments(self) -> int:
        return 1 + len(self._transient)

    def close(self) -> None:
        for name, segment in self._transient.items():
            segment.close()
            _unlink(name)
        self._transient.clear()
        self._map.close()
        _unlink(self.name)


def _aligned(size: int) -> int:
    return (size + ALIGN - 1) // ALIGN * ALIGN


class Segments:
    """The engine's read-only maps of front ends' segments, by name (arenas kept, one-off
    segments mapped per request)."""

    def __init__(self, prefix: str) -> None:
        self._prefix = prefix + "."
        self._maps: dict[str, mmap.mmap] = {}

    def view(self, name: str, offset: int, size: int, transient: bool) -> np.ndarray:
        """`size` bytes at `offset` of segment `name`, as a read-only uint8 array."""
        segment = self._maps.get(name)
        if segment is None:
            segment = self._open(name)
            if not transient:
                self._maps[name] = segment
        if offset + size > len(segment):
            raise ValueError(f"region {offset}+{size} is outside segment {name}")
        return np.frombuffer(segment, np.uint8, count=size, offset=offset)

    def _open(self, name: str) -> mmap.mmap:
        if not name.startswith(self._prefix) or not NAME.fullmatch(name):
            raise ValueError(f"segment {name!r} is not one of this server's")
        fd = os.open(SHM_DIR / name, os.O_RDONLY)
        try:
            return mmap.mmap(fd, 0, prot=mmap.PROT_READ)
        finally:
            os.close(fd)

    def forget(self, pid: int) -> None:
        """Drop the maps of a front end that went away (unmapped once no batch views them)."""
        mine = f"{self._prefix}{pid}."
        for name in [n for n in self._maps if n.startswith(mine)]:
            del self._maps[name]


def reclaim(prefix: str, pid: int | None = None) -> int:
    """Unlink the segments of front end `pid` (None: of every process) under `prefix`; returns
    how many. For the supervisor, after a front end died or at the end."""
    pattern = f"{prefix}.{pid}." if pid is not None else f"{prefix}."
    removed = 0
    for path in SHM_DIR.glob(f"{pattern}*"):
        _unlink(path.name)
        removed += 1
    return removed


def reclaim_orphans(family: str) -> int:
    """Unlink segments `<family>-<supervisor pid>.*` whose supervisor is gone (killed before
    it could clean up); returns how many."""
    removed = 0
    for path in SHM_DIR.glob(f"{family}-*"):
        owner = path.name[len(family) + 1 :].split(".", 1)[0]
        if owner.isdigit() and not _alive(int(owner)):
            _unlink(path.name)
            removed += 1
    if removed:
        log.info("removed %d shared-memory segments left by a server that was killed", removed)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
