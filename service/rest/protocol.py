"""uvicorn's httptools protocol with the two limits it lacks against hostile clients, the size of
a request's head (URL and headers) and the time the head may take to arrive, a lingering close,
and what one request's handler and its connection tell each other (Exchange).

Without the limits one client can grow a header without end (memory, and a quadratic URL join),
or hold a connection open forever by sending one header byte now and then: uvicorn's keep-alive
timer stops at the first byte. A head over MAX_HEAD_BYTES is answered 400 by uvicorn's own
parser-error path; one slower than --http-body-timeout-s is answered 408 and the connection
closed. The body has its own limits (rest/calls.py).

A lingering close (what nginx and Apache do): an answer sent before the request's body was read
(413, 429, 401, 503 while draining) is followed by a close, and closing a socket that still has
unread bytes makes the kernel send a reset, which can destroy that answer in the client before
the client reads it (it sees "connection reset" instead of 413). So the connection stops
sending, then reads and drops what the client still sends, until the client closes or LINGER_S
pass, and only then closes. Only then: a connection closed between requests (idle keep-alive,
shutdown) has nothing unread and closes at once.

Each request's handler gets an `Exchange` in its scope: the connection marks it complete once
the whole request has arrived (its body is then read with no timer), and the handler may ask
that the answer's head wait for its body, so both leave in one write. The head's timer, too, is
armed only for a head that did not arrive whole: most requests arm no timer at all.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

MAX_HEAD_BYTES = 64 * 1024  # URL plus every header name and value of one request
LINGER_S = 2.0  # longest a closing connection reads and drops what its client still sends
_BODY = b'{"error": "the request head did not arrive in time (--http-body-timeout-s)"}'
TIMEOUT_408 = (
    b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
    b"connection: close\r\ncontent-length: %d\r\n\r\n%s" % (len(_BODY), _BODY)
)


EXCHANGE = "cnn_serving.exchange"  # the scope's key for the request's Exchange


class Exchange:
    """What one request's handler and its connection tell each other: whether all of the
    request (head and body) has arrived, so the handler reads its body without arming a timer;
    and, set by the handler, that the answer's head is to wait for its body, so both leave in
    one write (one system call and one TCP segment instead of two)."""

    __slots__ = ("complete", "one_write")

    def __init__(self) -> None:
        self.complete = False
        self.one_write = False


def exchange_of(scope: Any) -> Exchange | None:
    """The request's Exchange where GuardedHttpTools serves it, else None."""
    return scope.get(EXCHANGE)  # type: ignore[no-any-return]


class HeadTooLarge(Exception):
    """Raised inside a parser callback: httptools turns it into a parser error (400, closed)."""


class GuardedHttpTools(HttpToolsProtocol):
    """uvicorn builds one protocol per connection from the class it is given: `guarded(s)`
    makes the class for a head timeout of `s` seconds."""

    head_timeout_s = 30.0
    _head_bytes = 0
    _head_timer: asyncio.TimerHandle | None = None
    _lingering = False
    _in_message = False  # a request has begun and not all of it has arrived
    _in_head = False  # ... and not all of its head
    _head_began = 0.0  # loop.time() when it began
    _exchange: Exchange | None = None  # the current request's

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        # uvicorn closes through self.transport (the protocol's and each request's): linger
        self.transport = Lingering(transport, self)  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self._lingering:  # the rest of an answered request, dropped
            return
        super().data_received(data)
        if self._in_head and self._head_timer is None:  # a head still to come: time it
            deadline = self._head_began + self.head_timeout_s
            self._head_timer = self.loop.call_at(deadline, self._head_timeout)

    def eof_received(self) -> None:
        if self._lingering:
            self.transport.close()  # the client is done sending: close now
        super().eof_received()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_message = self._in_head = True
        self._head_bytes = 0
        self._disarm()
        # the head's timer is armed only if the head is not whole at the end of the data
        # that began it (data_received): nearly every head arrives in one piece
        self._head_began = self.loop.time()

    def on_url(self, url: bytes) -> None:
        self._count(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count(len(name) + len(value))
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._disarm()
        self._exchange = self.scope[EXCHANGE] = Exchange()  # type: ignore[literal-required]
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._in_message = False
        if self._exchange is not None:
            self._exchange.complete = True
        super().on_message_complete()

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


class Lingering:
    """A transport whose close() lingers (see the module's docstring); the rest is the
    transport's own."""

    def __init__(self, transport: asyncio.Transport, protocol: GuardedHttpTools) -> None:
        self._transport = transport
        self._protocol = protocol
        self._closing = False
        self._held = b""  # an answer's head, waiting for its body (see `write`)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)

    def write(self, data: bytes) -> None:
        """Write, holding an answer's head when its handler asked (Exchange.one_write) until
        the body's write, which takes it along."""
        if self._held:
            data, self._held = self._held + data, b""
        else:
            exchange = self._protocol._exchange
            if exchange is not None and exchange.one_write:
                exchange.one_write = False
                self._held = bytes(data)
                return
        self._transport.write(data)

    def is_closing(self) -> bool:
        return self._closing or self._transport.is_closing()

    def close(self) -> None:
        transport = self._transport
        if self._held:  # a head whose body never came: it goes out as it would have
            transport.write(self._held)
            self._held = b""
        if self._closing:
            if not transport.is_closing():
                transport.close()  # the second close (the client's EOF, or LINGER_S): now
            return
        self._closing = True
        if transport.is_closing():
            return
        if not self._protocol._in_message:  # nothing unread: no reset to fear
            transport.close()
            return
        self._protocol._lingering = True
        if transport.can_write_eof():  # TCP: FIN after the answer (TLS cannot half-close)
            transport.write_eof()
        transport.resume_reading()  # uvicorn may have paused it: the client must not stall
        self._protocol.loop.call_later(LINGER_S, self.close)
