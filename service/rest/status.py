"""The error taxonomy as HTTP statuses: the one table of this transport, and the errors only
HTTP has (a body over the limit, a body too slow to arrive, a content type we do not read).

Every error answer is `{"error": "<message>"}`, the message naming model, version and image as
the gRPC ones do (Triton's HTTP error body has the same shape, so tritonclient.http shows it).
"""

from __future__ import annotations

import logging

import orjson
from starlette.responses import Response

from service.errors import Code, InvalidInput, ServingError

log = logging.getLogger(__name__)

HTTP_STATUS: dict[Code, int] = {
    Code.OK: 200,
    Code.CANCELLED: 499,  # the client went away (nginx's name for it); nobody reads the answer
    Code.UNKNOWN: 500,
    Code.INVALID_ARGUMENT: 400,
    Code.DEADLINE_EXCEEDED: 504,
    Code.NOT_FOUND: 404,
    Code.RESOURCE_EXHAUSTED: 429,
    Code.FAILED_PRECONDITION: 400,
    Code.INTERNAL: 500,
    Code.UNAVAILABLE: 503,
    Code.UNAUTHENTICATED: 401,
}
JSON = "application/json"


class PayloadTooLarge(ServingError):
    """The request body is over --max-message-bytes: 413, and the rest of it is not read."""

    code = Code.RESOURCE_EXHAUSTED
    http_status = 413


class BodyTimeout(ServingError):
    """The request body did not arrive within --http-body-timeout-s: 408."""

    code = Code.DEADLINE_EXCEEDED
    http_status = 408


class BodiesBusy(ServingError):
    """The request bodies this process holds would pass --http-body-budget-mib: 429."""

    code = Code.RESOURCE_EXHAUSTED


class ClientGone(ServingError):
    """The client closed the connection before its body arrived (nobody reads the answer)."""

    code = Code.CANCELLED


class UnsupportedMediaType(InvalidInput):
    """A Content-Type (or Content-Encoding) the endpoint does not read: 415."""

    http_status = 415


def http_status(exc: ServingError) -> int:
    return getattr(exc, "http_status", None) or HTTP_STATUS[exc.code]


def error_response(exc: ServingError, headers: dict[str, str] | None = None) -> Response:
    status = http_status(exc)
    extra = dict(headers or {})
    if status == 401:
        extra["WWW-Authenticate"] = 'Bearer realm="cnn-serving"'
    if status in (413, 408):  # the body was not read to its end: the connection cannot go on
        extra["Connection"] = "close"
    if status == 429:
        extra.setdefault("Retry-After", "1")
    return Response(orjson.dumps({"error": str(exc)}), status, extra, media_type=JSON)


def internal_error(what: str, exc: BaseException) -> Response:
    """A bug: logged with its traceback, answered 500 without its text."""
    log.error("%s failed", what, exc_info=exc)
    body = orjson.dumps({"error": f"{what}: internal error (see server log)"})
    return Response(body, 500, media_type=JSON)


def json_response(document: object, status: int = 200) -> Response:
    return Response(orjson.dumps(document), status, media_type=JSON)
