"""The event loop a server process runs on (`--event-loop`), and its garbage collector.

uvloop (libuv's loop, the one uvicorn's standard install picks) by default: profiled with
py-spy under bench/serve.py --protocol http on 2 cores, the loop's own work (callbacks, timers,
socket writes) was about a sixth of the single-process server's time on asyncio's.
`asyncio` keeps the standard library's loop, for a platform or a debugger that needs it.
"""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import Coroutine
from typing import Any, TypeVar

log = logging.getLogger(__name__)
Result = TypeVar("Result")
YOUNG_OBJECTS = 10_000  # the collector's first threshold in a started server (Python's: 700)


def run(main: Coroutine[Any, Any, Result], kind: str) -> Result:
    """`asyncio.run(main)` on the loop `kind` names (service.config.EVENT_LOOPS), logged."""
    log.info("event loop: %s", kind)
    if kind == "asyncio":
        return asyncio.run(main)
    import uvloop  # noqa: PLC0415 - only the servers need it

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main)


def freeze_startup_objects() -> None:
    """Once a server process has started (modules imported, models loaded): move every object
    alive now out of the garbage collector's sight, so that its collections, which the request
    path's short-lived objects set off every few requests, stop walking them. Timed with
    gc.callbacks under bench/http_load.py's 64 clients of single-image requests: collections
    took 7 % of the event loop, more than half of that in full ones; frozen, 3 %."""
    gc.collect()
    gc.freeze()
    # A young generation larger than the objects of the requests in flight (64 clients hold a
    # few thousand): a collection then finds mostly garbage, instead of walking and promoting
    # live requests' objects into older generations to be walked again. Timed the same way:
    # collections went from 3 % to under 1 %. Full collections become rare: an unloaded
    # model version is collected explicitly (memory.release_unloaded).
    gc.set_threshold(YOUNG_OBJECTS, *gc.get_threshold()[1:])
