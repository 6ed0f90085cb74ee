"""uvicorn's httptools protocol with the two limits it lacks against hostile clients: the size of
a request's head (URL and headers) and the time the head may take to arrive.

Without them one client can grow a header without end (memory, and a quadratic URL join), or
hold a connection open forever by sending one header byte now and then: uvicorn's keep-alive
timer stops at the first byte. A head over MAX_HEAD_BYTES is answered 400 by uvicorn's own
parser-error path; one slower than --http-body-timeout-s is answered 408 and the connection
closed. The body has its own limits (rest/calls.py).
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

MAX_HEAD_BYTES = 64 * 1024  # URL plus every header name and value of one request
_BODY = b'{"error": "the request head did not arrive in time (--http-body-timeout-s)"}'
TIMEOUT_408 = (
    b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
    b"connection: close\r\ncontent-length: %d\r\n\r\n%s" % (len(_BODY), _BODY)
)


class HeadTooLarge(Exception):
    """Raised inside a parser callback: httptools turns it into a parser error (400, closed)."""


class GuardedHttpTools(HttpToolsProtocol):
    """uvicorn builds one protocol per connection from the class it is given: `guarded(s)`
    makes the class for a head timeout of `s` seconds."""

    head_timeout_s = 30.0
    _head_bytes = 0
    _head_timer: asyncio.TimerHandle | None = None

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._head_bytes = 0
        self._disarm()
        self._head_timer = self.loop.call_later(self.head_timeout_s, self._head_timeout)

    def on_url(self, url: bytes) -> None:
        self._count(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count(len(name) + len(value))
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._disarm()
        super().on_headers_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _count(self, size: int) -> None:
        self._head_bytes += size
        if self._head_bytes > MAX_HEAD_BYTES:
            raise HeadTooLarge(f"request head over {MAX_HEAD_BYTES:,} bytes")

    def _disarm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timeout(self) -> None:
        self._head_timer = None
        transport: Any = self.transport
        if not transport.is_closing():
            transport.write(TIMEOUT_408)  # no response has begun: the head never completed
            transport.close()


def guarded(head_timeout_s: float) -> type[GuardedHttpTools]:
    """The protocol class for one server (a subclass, so that no server changes another's)."""
    return type("GuardedHttpTools", (GuardedHttpTools,), {"head_timeout_s": head_timeout_s})
