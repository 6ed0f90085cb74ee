"""The event loop a server process runs on (`--event-loop`).

uvloop (libuv's loop, the one uvicorn's standard install picks) by default: measured with
`bench/serve.py --protocol http` on 2 cores, the loop's own work (callbacks, timers, socket
writes) was a fifth of the single-process server's time on asyncio's pure-Python loop.
`asyncio` keeps the standard library's loop, for a platform or a debugger that needs it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

Result = TypeVar("Result")


def run(main: Coroutine[Any, Any, Result], kind: str) -> Result:
    """`asyncio.run(main)` on the loop `kind` names (service.config.EVENT_LOOPS)."""
    if kind == "asyncio":
        return asyncio.run(main)
    import uvloop  # noqa: PLC0415 - only the servers need it

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main)
