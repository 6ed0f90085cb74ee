"""What every HTTP request goes through, like `service.servicers.calls` for gRPC (and sharing
its `Calls`, so a drain waits for both transports): the bearer token, refusal while draining
(503), in-flight counting, the request metrics (api `http.v2` or `http.v1`), the error
taxonomy turned into statuses, and a request body read within its size and time limits.
"""

from __future__ import annotations

import asyncio
import contextvars
import hmac
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import TypeVar

from starlette.requests import ClientDisconnect
from starlette.responses import Response

from service.config import MiB
from service.errors import Code, InvalidInput, ServingError, Unauthenticated
from service.rest.protocol import Exchange
from service.rest.status import (
    BodiesBusy,
    BodyTimeout,
    ClientGone,
    PayloadTooLarge,
    error_response,
    internal_error,
)
from service.servicers.calls import Call, Calls

Answer = TypeVar("Answer")
Headers = Mapping[str, str]  # lower-case names (Starlette's Headers, or a dict of them)
NUMBER = re.compile(r"[0-9]{1,18}")
# The body bytes the current request holds: one list per request task, released by `handle`.
HELD: contextvars.ContextVar[list[int]] = contextvars.ContextVar("held_body_bytes")
NO_TOKEN = Unauthenticated(
    "missing or wrong bearer token (send the header 'Authorization: Bearer <token>')"
)


class HttpCalls:
    """The per-request behaviour of the HTTP endpoints over the server's shared `Calls`."""

    def __init__(
        self,
        calls: Calls,
        token: str | None,
        max_body_bytes: int,
        body_timeout_s: float,
        body_budget_bytes: int,
    ) -> None:
        self.calls = calls
        self.engine = calls.engine
        self.max_body_bytes = max_body_bytes
        self.body_timeout_s = body_timeout_s
        self.body_budget_bytes = body_budget_bytes
        self.bodies_in_flight = 0  # bytes of request bodies held now (one event loop: no lock)
        self._expected = f"Bearer {token}".encode() if token else None

    def authorized(self, headers: Headers) -> bool:
        if self._expected is None:
            return True
        given = headers.get("authorization", "").encode("latin-1")
        return hmac.compare_digest(given, self._expected)

    async def handle(
        self,
        headers: Headers,
        api: str,
        method: str,
        work: Callable[[Call], Awaitable[Answer]],
    ) -> Answer | Response:
        """Run `work(call)` as one counted request: its answer, or the error Response: 401
        without the token, 503 while draining, the error taxonomy's status for a ServingError,
        500 (logged) for anything else."""
        call = Call(api, method, started=time.monotonic())
        if not self.authorized(headers):
            return error_response(NO_TOKEN)
        calls = self.calls
        try:
            calls.enter()
        except ServingError as exc:  # draining: this client should go elsewhere, and stay
            calls.record(call, exc.code)
            return error_response(exc, {"Connection": "close", "Retry-After": "1"})
        code = Code.OK
        held = HELD.set([0])  # body bytes this request holds (see `body`)
        try:
            return await work(call)
        except ServingError as exc:
            code = exc.code
            return error_response(exc)
        except asyncio.CancelledError:
            code = Code.CANCELLED
            raise
        except Exception as exc:
            code = Code.INTERNAL
            return internal_error(method, exc)
        finally:
            self.bodies_in_flight -= HELD.get()[0]
            HELD.reset(held)
            calls.leave()
            calls.record(call, code)

    async def body(
        self,
        headers: Headers,
        stream: AsyncIterator[bytes],
        small: int | None = None,
        exchange: Exchange | None = None,
    ) -> bytes:
        """The whole body (inside `handle`), refused with 413 past --max-message-bytes (or
        `small` bytes, a route's own lower limit) without reading further, 408 when it takes
        longer than --http-body-timeout-s to arrive (a slow-loris client), 429 when the bodies
        this process holds would pass --http-body-budget-mib. The bytes count against that
        budget until the request ends. A body that has arrived whole (`exchange.complete`) is read
        without a timer (nearly every small request arrives whole before its handler starts)."""
        limit = self.max_body_bytes if small is None else min(small, self.max_body_bytes)
        why = "--max-message-bytes" if limit == self.max_body_bytes else "for this request"
        declared = headers.get("content-length")
        if declared is not None:
            length = byte_count(declared)
            if length is None:
                raise InvalidInput(f"Content-Length {declared[:40]!r} is not a byte count")
            if length > limit:
                raise PayloadTooLarge(_too_large(length, limit, why))
            self._hold(length)
        chunks: list[bytes] = []
        try:
            if exchange is not None and exchange.complete:  # nothing to wait for
                await self._read(stream, chunks, limit, why, declared is None)
            else:
                async with asyncio.timeout(self.body_timeout_s):
                    await self._read(stream, chunks, limit, why, declared is None)
        except TimeoutError:
            raise BodyTimeout(
                f"the request body did not arrive within {self.body_timeout_s:g} s "
                f"({sum(map(len, chunks)):,} bytes came; --http-body-timeout-s)"
            ) from None
        except ClientDisconnect:
            raise ClientGone("the client went away while sending the body") from None
        return b"".join(chunks)

    async def _read(
        self, stream: AsyncIterator[bytes], chunks: list[bytes], limit: int, why: str, hold: bool
    ) -> None:
        size = 0
        async for chunk in stream:
            size += len(chunk)
            if size > limit:
                raise PayloadTooLarge(_too_large(size, limit, why, "at least "))
            if hold:  # no Content-Length: count the bytes as they come
                self._hold(len(chunk))
            chunks.append(chunk)

    def _hold(self, nbytes: int) -> None:
        """Count `nbytes` more of this request's body against --http-body-budget-mib."""
        held = HELD.get()[0] + nbytes
        if held > self.body_budget_bytes:  # could never fit, even alone
            raise PayloadTooLarge(
                f"request body of {held:,} bytes is more than the whole --http-body-budget-mib "
                f"({self.body_budget_bytes // MiB:,} MiB)"
            )
        if self.bodies_in_flight + nbytes > self.body_budget_bytes:
            raise BodiesBusy(
                f"request bodies held by this process would pass --http-body-budget-mib "
                f"({self.body_budget_bytes // MiB:,} MiB); retry later"
            )
        self.bodies_in_flight += nbytes
        HELD.get()[0] += nbytes


def byte_count(text: str) -> int | None:
    """A header's non-negative integer (ASCII digits only: "²".isdigit() is True), or None."""
    return int(text) if NUMBER.fullmatch(text) else None


def _too_large(size: int, limit: int, why: str, qualifier: str = "") -> str:
    return f"request body of {qualifier}{size:,} bytes is over the limit of {limit:,} bytes ({why})"
