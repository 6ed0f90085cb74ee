"""Files -> pixels for scoring jobs: the one image policy (imaging/policy.py, as the server and
training apply it) applied to files, one batch per call. Runs in worker processes (local engine)
and Ray tasks, so it imports nothing heavier than Pillow and numpy."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from imaging import policy
from service.errors import InvalidInput


@dataclass(frozen=True)
class Decoded:
    pixels: np.ndarray  # (N, H, W, C) uint8, the files that decoded
    good: list[int]  # their positions in the batch
    errors: dict[int, str]  # position -> short reason, the files that did not


def decode_files(paths: Sequence[str], shape: tuple[int, int, int], max_pixels: int) -> Decoded:
    arrays: list[np.ndarray] = []
    good: list[int] = []
    errors: dict[int, str] = {}
    for position, path in enumerate(paths):
        try:
            arrays.append(decode_file(path, shape, max_pixels))
            good.append(position)
        except InvalidInput as exc:
            errors[position] = str(exc)
        except OSError as exc:
            errors[position] = read_error(exc)
    pixels = np.stack(arrays) if arrays else np.empty((0, *shape), dtype=np.uint8)
    return Decoded(pixels, good, errors)


def decode_file(path: str, shape: tuple[int, int, int], max_pixels: int) -> np.ndarray:
    """`imaging.policy.decode_file`; raises InvalidInput, and OSError when unreadable."""
    try:
        return policy.decode_file(path, shape, max_pixels)
    except policy.ImageError as exc:
        raise InvalidInput(str(exc)) from exc


def check_regular(path: str) -> None:
    """A FIFO or a device named like an image would block or never end: refuse it unread."""
    try:
        policy.check_regular(path)
    except policy.ImageError as exc:
        raise InvalidInput(str(exc)) from exc


def read_error(exc: OSError) -> str:
    """The reason a file could not be read, without the path (the row already names it)."""
    return f"cannot read the file: {exc.strerror or type(exc).__name__}"


def ready() -> int:
    """A task that only proves a worker process is up (its imports done)."""
    return os.getpid()


def watch_parent(pid: int, every_s: float = 1.0) -> None:
    """A worker's initializer: exit when the job's process `pid` is gone (killed with -9, say),
    instead of lingering as an orphan."""

    def watch() -> None:
        while True:
            time.sleep(every_s)
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                os._exit(0)
            except PermissionError:  # the pid now belongs to someone else's process
                os._exit(0)

    threading.Thread(target=watch, name="watch-parent", daemon=True).start()
