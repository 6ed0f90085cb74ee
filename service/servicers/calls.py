"""What every RPC of both APIs goes through: DEADLINE_EXCEEDED at once for a call whose deadline
passed before its handler started, refusal while draining, the error taxonomy turned into gRPC
status codes, in-flight counting for a clean drain, and the request metrics.

A handler is `async def handler(self, request, context, call)`; it fills `call` (model, version,
images) as it learns them, so metrics carry the resolved version even on errors.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
from google.protobuf.message import DecodeError

from service.core import Core, Model
from service.errors import Code, InvalidInput, ServingError, Unavailable, shorten
from service.servicers import wire

log = logging.getLogger(__name__)
requests_log = logging.getLogger("service.requests")  # --log-requests

Req = TypeVar("Req")
Resp = TypeVar("Resp")
STREAM_WINDOW = 16  # messages of one stream answered concurrently; answers stay in order
DRAINING = "server is shutting down (draining); retry on another replica"
HOLD_S = 2.0  # the longest a call refused while draining waits for gRPC to begin stopping
EXPIRED = "deadline exceeded before the server started the call (it waited in grpc's queue)"
# The error taxonomy's codes as gRPC statuses: the one table of this transport.
GRPC_STATUS: dict[Code, grpc.StatusCode] = {code: grpc.StatusCode[code.name] for code in Code}


class Malformed:
    """What a request that is not a valid message of its type deserializes to (see
    `wellformed_requests`), so that it is answered INVALID_ARGUMENT like any bad data, and in a
    stream fails alone, instead of gRPC's own UNKNOWN for a deserializer error."""

    def __init__(self, method: str, reason: str, message: str | None = None) -> None:
        self.error = InvalidInput(
            message or f"{method}: the request is not a valid protobuf message ({reason})"
        )


def wellformed(request: object) -> None:
    if isinstance(request, Malformed):
        raise request.error


async def abort_malformed(request: object, context: grpc.aio.ServicerContext) -> None:
    """Answer a `Malformed` request INVALID_ARGUMENT (abort raises); anything else passes."""
    if isinstance(request, Malformed):
        await context.abort(GRPC_STATUS[request.error.code], str(request.error))


def wellformed_requests(
    handler: grpc.RpcMethodHandler, method: str, max_fields: int
) -> grpc.RpcMethodHandler:
    """`handler` with a request deserializer that returns `Malformed` instead of raising, and
    for a request of more than `max_fields` protobuf fields (wire.py) without parsing it.
    Only for our own servicers, whose handlers check for it (`unary`, `one_message`)."""
    parse = handler.request_deserializer
    if parse is None:
        return handler
    name = method.rsplit("/", 1)[-1]
    descriptor = getattr(getattr(parse, "__self__", None), "DESCRIPTOR", None)
    too_many = (
        f"{name}: the request holds more than {max_fields:,} protobuf fields, more than any "
        "request within --max-queue-size can use; split it"
    )

    def deserialize(data: bytes) -> object:
        try:
            if descriptor is not None:
                wire.check_fields(data, descriptor, max_fields)
            return parse(data)
        except wire.TooManyFields:
            return Malformed(name, "", too_many)
        except DecodeError as exc:
            return Malformed(name, shorten(str(exc) or "cannot be parsed"))

    return handler._replace(request_deserializer=deserialize)  # type: ignore[attr-defined]


def refuse_malformed(
    handler: grpc.RpcMethodHandler, method: str, max_fields: int
) -> grpc.RpcMethodHandler:
    """`handler` (of a service not ours: health, reflection) answering a request that is not
    valid protobuf INVALID_ARGUMENT, without a traceback in the log; on a request stream the
    first such message ends the stream with that status."""
    if handler.request_deserializer is None:
        return handler
    handler = wellformed_requests(handler, method, max_fields)
    if handler.request_streaming:
        field = "stream_stream" if handler.response_streaming else "stream_unary"
        behavior = getattr(handler, field)

        async def checked(requests: AsyncIterator[object], context: Any) -> AsyncIterator[Any]:
            async for request in requests:
                await abort_malformed(request, context)
                yield request

        if handler.response_streaming:

            async def guarded_stream(requests: Any, context: Any) -> AsyncIterator[Any]:
                async for response in behavior(checked(requests, context), context):
                    yield response

            return handler._replace(stream_stream=guarded_stream)  # type: ignore[attr-defined]

        async def guarded_unary(requests: Any, context: Any) -> Any:
            return await behavior(checked(requests, context), context)

        return handler._replace(stream_unary=guarded_unary)  # type: ignore[attr-defined]
    field = "unary_stream" if handler.response_streaming else "unary_unary"
    behavior = getattr(handler, field)
    if inspect.isasyncgenfunction(behavior):

        async def guarded_gen(request: object, context: Any) -> AsyncIterator[Any]:
            await abort_malformed(request, context)
            async for response in behavior(request, context):
                yield response

        return handler._replace(**{field: guarded_gen})  # type: ignore[attr-defined]

    async def guarded(request: object, context: Any) -> Any:
        await abort_malformed(request, context)
        return await behavior(request, context)

    return handler._replace(**{field: guarded})  # type: ignore[attr-defined]


@dataclass
class Call:
    api: str
    method: str
    model: str = ""
    version: str = ""
    images: int = 0
    started: float = 0.0
    target: Model | None = None  # the resolved version, for its statistics (inference calls)

    def set_model(self, name: str, version: int | str, target: Model | None = None) -> None:
        self.model, self.version, self.target = name, str(version), target


class Calls:
    """Shared state of the servicers: the engine and the RPCs in flight."""

    def __init__(self, engine: Core) -> None:
        self.engine = engine
        self.in_flight = 0
        self.refused_at = 0.0  # time.monotonic() of the last RPC refused while draining
        # Set once gRPC has begun to stop (its listener closed, GOAWAY sent): refusals wait for
        # it (see `refuse`).
        self.closing = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._expired: dict[tuple[str, str], Any] = {}  # (api, method) -> counter child
        self.log_requests = engine.config.log_requests  # --log-requests: a line per request

    async def wait_idle(self, timeout_s: float) -> bool:
        """Wait until no RPC is in flight; False when `timeout_s` passed first."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
        except TimeoutError:
            return False
        return True

    def expired(self, call: Call, context: grpc.aio.ServicerContext) -> bool:
        """True when the call's deadline passed before its handler started (it waited in grpc's
        queue behind others): counted, and recorded as answered DEADLINE_EXCEEDED."""
        remaining = context.time_remaining()
        if remaining is None or remaining > 0:
            return False
        counter = self._expired.get((call.api, call.method))
        if counter is None:
            counter = self.engine.metrics.rpcs_expired.labels(call.api, call.method)
            self._expired[call.api, call.method] = counter
        counter.inc()
        self.record(call, Code.DEADLINE_EXCEEDED)
        return True

    def enter(self) -> None:
        if self.engine.draining:
            self.refused_at = time.monotonic()
            raise Unavailable(DRAINING)
        self.in_flight += 1
        self._idle.clear()

    async def wait_quiet(self, quiet_s: float, timeout_s: float) -> None:
        """While draining: wait until no RPC was refused for `quiet_s` (clients have moved
        on, or wait in `refuse`), counted from now, at most `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        self.refused_at = max(self.refused_at, time.monotonic())
        while (now := time.monotonic()) < deadline and now - self.refused_at < quiet_s:
            await asyncio.sleep(min(quiet_s, deadline - now))

    async def refuse(self, context: grpc.aio.ServicerContext, error: ServingError) -> None:
        """Answer a call refused while draining. gRPC answers CANCELLED (not UNAVAILABLE) to
        calls it has taken but not yet handed to a handler when it stops (grpc/grpc#41785):
        so a refused call is held until gRPC has begun to stop (GOAWAY sent: the client's next
        call goes elsewhere, not into that queue), at most HOLD_S and never past its deadline,
        and answered UNAVAILABLE then."""
        remaining = context.time_remaining()
        hold_s = HOLD_S if remaining is None else min(HOLD_S, remaining / 2)
        if hold_s > 0 and not self.closing.is_set():
            try:
                await asyncio.wait_for(self.closing.wait(), hold_s)
            except TimeoutError:
                pass
        await context.abort(GRPC_STATUS[error.code], str(error))

    def leave(self) -> None:
        self.in_flight -= 1
        if self.in_flight == 0:
            self._idle.set()

    def record(self, call: Call, code: Code) -> None:
        elapsed = time.monotonic() - call.started
        series = self.engine.metrics.request_series((call.model, call.version, call.api, code.name))
        series[0].inc()
        if call.images:
            series[1].inc(call.images)
        series[2].observe(elapsed)
        if call.images and call.target is not None:
            self.engine.record_request(call.target, code == Code.OK, elapsed)
        if self.log_requests:
            target = f"{call.model} v{call.version}" if call.model else "(no model)"
            requests_log.info(
                "%s %s %s: %s, %d images, %.2f ms",
                call.api, call.method, target, code.name, call.images, elapsed * 1000,
                extra={"model": call.model, "version": call.version, "api": call.api,
                       "method": call.method, "code": code.name, "images": call.images,
                       "duration_ms": round(elapsed * 1000, 3)},
            )  # fmt: skip


async def abort(context: grpc.aio.ServicerContext, exc: BaseException, call: Call) -> None:
    """Answer an exception with its status code; never leak an internal error's text."""
    if isinstance(exc, ServingError):
        await context.abort(GRPC_STATUS[exc.code], str(exc))
    log.error("%s failed", call.method, exc_info=exc)
    await context.abort(grpc.StatusCode.INTERNAL, f"{call.method}: internal error (see server log)")


def status(exc: BaseException, context: grpc.aio.ServicerContext) -> Code:
    """The code an exception stands for (a cancelled call: DEADLINE_EXCEEDED or CANCELLED)."""
    if isinstance(exc, ServingError):
        return exc.code
    if isinstance(exc, asyncio.CancelledError):
        remaining = context.time_remaining()
        expired = remaining is not None and remaining <= 0
        return Code.DEADLINE_EXCEEDED if expired else Code.CANCELLED
    return Code.INTERNAL


def unary(api: str, while_draining: bool = False) -> Callable[..., Any]:
    """Decorate a unary handler `(self, request, context, call)` with the shared behaviour.
    `while_draining`: keep answering during a drain (liveness and readiness probes)."""

    def wrap(handler: Callable[..., Awaitable[Resp]]) -> Callable[..., Awaitable[Resp]]:
        @functools.wraps(handler)
        async def method(self: Any, request: Req, context: grpc.aio.ServicerContext) -> Resp:
            calls: Calls = self.calls
            call = Call(api, handler.__name__, started=time.monotonic())
            code = Code.OK
            if calls.expired(call, context):  # no work for a caller that has given up
                await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, EXPIRED)
            if while_draining:
                await abort_malformed(request, context)
                return await handler(self, request, context, call)
            try:
                calls.enter()
            except ServingError as exc:
                code = exc.code
                calls.record(call, code)
                await calls.refuse(context, exc)
            recorded = False
            try:
                wellformed(request)
                return await handler(self, request, context, call)
            except BaseException as exc:
                code = status(exc, context)
                if isinstance(exc, asyncio.CancelledError):
                    raise
                # abort() sends the status before it raises: count the call first, so that a
                # client that saw its error also sees it in the metrics
                recorded = True
                calls.leave()
                calls.record(call, code)
                await abort(context, exc, call)
                raise  # unreachable: abort raises
            finally:
                if not recorded:
                    calls.leave()
                    calls.record(call, code)

        return method

    return wrap


def stream(api: str) -> Callable[..., Any]:
    """Decorate a streaming handler (an async generator over `(self, requests, context)`).
    A stream is not itself "in flight" (an idle stream must not hold up a drain); each message
    is, through `Calls.enter`/`leave` in the handler."""

    def wrap(handler: Callable[..., AsyncIterator[Resp]]) -> Callable[..., AsyncIterator[Resp]]:
        @functools.wraps(handler)
        async def method(
            self: Any, requests: AsyncIterator[Req], context: grpc.aio.ServicerContext
        ) -> AsyncIterator[Resp]:
            calls: Calls = self.calls
            call = Call(api, handler.__name__, started=time.monotonic())
            if calls.expired(call, context):
                await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, EXPIRED)
            if calls.engine.draining:
                await calls.refuse(context, Unavailable(DRAINING))
            try:
                async for response in handler(self, requests, context):
                    yield response
            except BaseException as exc:
                if isinstance(exc, asyncio.CancelledError | GeneratorExit):
                    raise
                await abort(context, exc, call)

        return method

    return wrap


async def ordered(
    requests: AsyncIterator[Req],
    answer: Callable[[Req], Coroutine[Any, Any, Resp]],
    window: int = STREAM_WINDOW,
) -> AsyncIterator[Resp]:
    """Answer the messages of a request stream up to `window` at once (so they batch with each
    other and with other callers), yielding the answers in the order the requests came."""
    pending: asyncio.Queue[asyncio.Task[Resp] | None] = asyncio.Queue(window)

    async def read() -> None:
        try:
            async for request in requests:
                await pending.put(asyncio.create_task(answer(request)))
        finally:
            await pending.put(None)

    reader = asyncio.create_task(read())
    try:
        while (task := await pending.get()) is not None:
            yield await task
        await reader
    finally:
        reader.cancel()
        while not pending.empty():
            leftover = pending.get_nowait()
            if leftover is not None:
                leftover.cancel()


async def one_message(
    calls: Calls,
    call: Call,
    context: grpc.aio.ServicerContext,
    request: object,
    handle: Callable[[Call], Awaitable[Resp]],
    failed: Callable[[ServingError], Resp],
) -> Resp:
    """One message of a stream, counted and recorded like a unary call. A ServingError (a
    malformed `request` too) becomes the message's own error answer (`failed`), so the stream
    goes on; only a drain (UNAVAILABLE from `enter`) ends the stream."""
    calls.enter()
    code = Code.OK
    try:
        wellformed(request)
        return await handle(call)
    except ServingError as exc:
        code = exc.code
        return failed(exc)
    except BaseException as exc:
        code = status(exc, context)
        raise
    finally:
        calls.leave()
        calls.record(call, code)


def deadline(context: grpc.aio.ServicerContext) -> float | None:
    """The RPC's deadline on the time.monotonic() clock, or None without one."""
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining
