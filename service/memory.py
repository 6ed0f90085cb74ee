"""Giving freed memory back to the operating system.

glibc's malloc keeps what a process freed (an unloaded onnxruntime session, a burst of large
decodes) for reuse, in heaps it rarely shrinks on its own: measured here, 20 version rollouts of
a small model grew a server by 33 MB without any object left alive, and by nothing once
`malloc_trim(0)` ran after each. Elsewhere (musl, macOS) this does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging

log = logging.getLogger(__name__)


@functools.cache
def _malloc_trim() -> ctypes._CFuncPtr | None:  # type: ignore[name-defined]
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):
        log.debug("no malloc_trim in this C library (%s): freed memory stays with malloc", name)
        return None


def release() -> bool:
    """Return the C heap's free memory to the system; True when it could be asked. Costs a
    walk of the heap (milliseconds): call it after a rare event, off the event loop."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True
