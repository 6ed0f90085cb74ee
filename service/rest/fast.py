"""The hot endpoint without the framework: `POST /v2/models/{m}[/versions/{v}]/infer` answered by
a thin ASGI layer in front of the FastAPI app, everything else passed through to it.

Measured with py-spy under 64 clients of single-image binary requests: FastAPI's routing,
dependency solving and middleware stack cost more event-loop time per request than our whole
V2 handler. This layer matches the two infer paths by string, reads the headers once, and
runs the same code as the documented route (rest/v2.py `infer`, through `HttpCalls.handle`:
token, drain, metrics, statuses), so both answer alike.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable

from starlette.requests import ClientDisconnect
from starlette.responses import Response
from starlette.types import ASGIApp as App
from starlette.types import Receive, Scope, Send

from service.rest import v2
from service.rest.calls import HttpCalls
from service.rest.protocol import exchange_of
from service.servicers.calls import Call

__all__ = ["App", "FastInfer", "infer_target"]
PREFIX, SUFFIX = "/v2/models/", "/infer"


def infer_target(path: str) -> tuple[str, str] | None:
    """(model, version) of an infer path ("" for the newest), or None for any other path."""
    if not (path.startswith(PREFIX) and path.endswith(SUFFIX)):
        return None
    parts = path[len(PREFIX) : -len(SUFFIX)].split("/")
    if len(parts) == 1 and parts[0]:
        return parts[0], ""
    if len(parts) == 3 and parts[0] and parts[1] == "versions" and parts[2]:
        return parts[0], parts[2]
    return None


class FastInfer:
    def __init__(self, app: App, http: HttpCalls) -> None:
        self.app = app
        self.http = http

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        found = None
        if scope["type"] == "http" and scope["method"] == "POST":
            found = infer_target(scope["path"])
        if found is None:
            await self.app(scope, receive, send)
            return
        name, version = found
        # uvicorn gives lower-case names; a repeated header keeps its first value, as
        # Starlette's Headers.get (the FastAPI route) reads it
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in reversed(scope["headers"])}
        stream, exchange = _body(receive), exchange_of(scope)

        def work(call: Call) -> Awaitable[tuple[bytes, int, dict[str, str]]]:
            return v2.infer(self.http, headers, stream, exchange, name, version, call)

        answer = await self.http.handle(headers, v2.API, "ModelInfer", work)
        if isinstance(answer, Response):  # an error
            await answer(scope, receive, send)
            return
        content, status, extra = answer  # sent as is: no Response object on the hot path
        head = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in extra.items()]
        head.append((b"content-length", str(len(content)).encode()))
        if exchange is not None:  # the head waits for the body: one write for both
            exchange.one_write = True
        try:
            await send({"type": "http.response.start", "status": status, "headers": head})
        finally:
            if exchange is not None:
                exchange.one_write = False  # (already, unless the head was not written)
        await send({"type": "http.response.body", "body": content})


async def _body(receive: Receive) -> AsyncIterator[bytes]:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":  # as Starlette's request.stream() says it
            raise ClientDisconnect()
        yield message.get("body", b"")
        if not message.get("more_body", False):
            return
