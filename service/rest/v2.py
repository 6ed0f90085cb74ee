"""The Open Inference Protocol over HTTP (KServe V2 REST) with Triton's extensions (binary
tensors, classification, model configuration, statistics): the same answers as the gRPC
`inference.GRPCInferenceService`, from the same code (service.servicers.inference).

    GET  /v2                                  server metadata
    GET  /v2/health/live | /v2/health/ready   probes (no token, answered while draining)
    GET  /v2/models/{m}[/versions/{v}]        model metadata
    GET  /v2/models/{m}[/versions/{v}]/ready  200 when ready, else 503 (404: no such model)
    GET  /v2/models/{m}[/versions/{v}]/config Triton's model configuration
    GET  /v2/models[/{m}[/versions/{v}]]/stats Triton's statistics
    POST /v2/models/{m}[/versions/{v}]/infer  inference
    POST /v2/repository/index                 Triton's repository index ({"ready": true})
    POST /v2/repository/models/{m}/load       load or reload (--model-control-mode explicit)
    POST /v2/repository/models/{m}/unload     drain, then unload (explicit)
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from importlib import metadata
from typing import Any

from fastapi import APIRouter
from google.protobuf.json_format import MessageToDict
from google.protobuf.message import Message
from starlette.requests import Request
from starlette.responses import Response

from service.core import Core
from service.errors import InvalidInput, ServingError, shorten
from service.rest import v2_direct, v2_json
from service.rest.calls import NO_TOKEN, Headers, HttpCalls
from service.rest.protocol import Exchange, exchange_of
from service.rest.status import error_response, json_response
from service.servicers import inference, v2_codec
from service.servicers.calls import Call

API = "http.v2"
# 64-bit integers that protobuf's JSON mapping writes as strings and Triton's REST API as
# numbers (tritonclient.http and perf_analyzer read them as numbers).
NUMBERS = {
    "count", "ns", "last_inference", "inference_count", "execution_count", "batch_size",
    "dims", "shape", "max_queue_delay_microseconds",
}  # fmt: skip
CONTROL_VALUES = 1000  # a repository request holds a few parameters at most...
CONTROL_BODY_BYTES = 64 * 1024  # ...in a few bytes
INFER_BODY = {
    "requestBody": {
        "description": "V2 inference request: JSON, or JSON of Inference-Header-Content-Length "
        "bytes followed by the binary tensors",
        "content": {
            "application/json": {"schema": {"type": "object"}},
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
        },
    }
}


def as_json(message: Message) -> dict[str, Any]:
    document = MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
    return _numbers(document)  # type: ignore[no-any-return]


def _numbers(value: Any, key: str = "") -> Any:
    if isinstance(value, dict):
        return {k: _numbers(v, k) for k, v in value.items()}
    if isinstance(value, list):
        return [_numbers(v, key) for v in value]
    if key in NUMBERS and isinstance(value, str):
        return int(value)
    return value


def router(http: HttpCalls) -> APIRouter:
    engine = http.engine
    api = APIRouter(tags=["Open Inference Protocol (V2)"])

    @api.get("/v2", summary="Server metadata")
    async def server_metadata(request: Request) -> Response:
        async def work(call: Call) -> Response:
            return json_response(
                {
                    "name": "cnn-serving",
                    "version": metadata.version("cnn-serving"),
                    "extensions": inference.EXTENSIONS + ["binary_tensor_data"],
                }
            )

        return await http.handle(request.headers, API, "ServerMetadata", work)

    @api.get("/v2/health/live", summary="Liveness: 200 while the process answers")
    async def live() -> Response:
        return json_response({"live": True})

    @api.get("/v2/health/ready", summary="Readiness: 200 when a model is ready, else 503")
    async def ready() -> Response:
        serving = engine.serving
        return json_response({"ready": serving}, 200 if serving else 503)

    # before /v2/models/{name}: a model named "stats" must not hide the server's statistics
    for prefix in ("/v2/models", "/v2/models/{name}", "/v2/models/{name}/versions/{version}"):

        @api.get(prefix + "/stats", summary="Triton's statistics")
        async def stats(request: Request, name: str = "", version: str = "") -> Response:
            async def work(call: Call) -> Response:
                models = inference.stats_models(engine, name, version, call)
                answer = inference.statistics(models, await engine.statistics(models))
                return json_response(as_json(answer))

            return await http.handle(request.headers, API, "ModelStatistics", work)

    for prefix in ("/v2/models/{name}", "/v2/models/{name}/versions/{version}"):

        @api.get(prefix, summary="Model metadata")
        async def model_metadata(request: Request, name: str, version: str = "") -> Response:
            async def work(call: Call) -> Response:
                model = inference.resolve(engine, name, version, call)
                message = v2_codec.model_metadata(model.spec, engine.versions(name))
                return json_response(as_json(message))

            return await http.handle(request.headers, API, "ModelMetadata", work)

        @api.get(prefix + "/ready", summary="Model readiness: 200 when ready, else 503")
        async def model_ready(request: Request, name: str, version: str = "") -> Response:
            if not http.authorized(request.headers):  # as gRPC ModelReady: not a health probe
                return error_response(NO_TOKEN)
            try:
                inference.resolve(engine, name, version, Call(API, "ModelReady"))
            except ServingError as exc:
                return error_response(exc)
            ready = engine.ready and not engine.draining
            return json_response({"name": name, "ready": ready}, 200 if ready else 503)

        @api.get(prefix + "/config", summary="Triton's model configuration")
        async def model_config(request: Request, name: str, version: str = "") -> Response:
            async def work(call: Call) -> Response:
                model = inference.resolve(engine, name, version, call)
                config = engine.config
                message = v2_codec.model_config(
                    model.spec, config.max_batch_size, config.max_queue_delay_ms, model.on_cuda
                )
                return json_response(as_json(message.config))

            return await http.handle(request.headers, API, "ModelConfig", work)

        @api.post(prefix + "/infer", summary="Inference", openapi_extra=INFER_BODY)
        async def model_infer(request: Request, name: str, version: str = "") -> Response:
            """(Served by rest/fast.py ahead of the router; this route documents it and
            answers when the fast path is not in front.)"""

            async def work(call: Call) -> Response:
                stream, exchange = request.stream(), exchange_of(request.scope)
                answer = await infer(http, request.headers, stream, exchange, name, version, call)
                return Response(*answer)

            return await http.handle(request.headers, API, "ModelInfer", work)

    control_router(http, api)
    return api


def control_router(http: HttpCalls, api: APIRouter) -> None:
    """Triton's model repository extension over HTTP, as tritonclient.http calls it."""
    engine = http.engine

    @api.post("/v2/repository/index", summary="Repository index: every version and its state")
    async def repository_index(request: Request) -> Response:
        async def work(call: Call) -> Response:
            document = await _control_body(http, request, "repository index")
            ready = document.get("ready", False)
            if not isinstance(ready, bool):
                raise InvalidInput("repository index: 'ready' must be true or false")
            entries = await engine.repository_index(ready)
            return json_response([entry.to_dict() for entry in entries])

        return await http.handle(request.headers, API, "RepositoryIndex", work)

    for action, control, method, summary in (
        ("load", inference.load, "RepositoryModelLoad", "Load or reload a model"),
        ("unload", inference.unload, "RepositoryModelUnload", "Drain, then unload a model"),
    ):
        api.add_api_route(
            f"/v2/repository/models/{{name}}/{action}",
            _control_route(http, action, control, method),
            methods=["POST"],
            summary=summary,
            name=method,
        )


def _control_route(
    http: HttpCalls,
    action: str,
    control: Callable[[Core, str, list[str]], Awaitable[None]],
    method: str,
) -> Callable[[Request, str], Awaitable[Response]]:
    """The route of one model load or unload (the same body, answer and errors)."""

    async def route(request: Request, name: str) -> Response:
        async def work(call: Call) -> Response:
            document = await _control_body(http, request, f"{action} {name!r}")
            await control(http.engine, name, _parameters(document))
            return Response(status_code=200)

        return await http.handle(request.headers, API, method, work)

    return route


async def _control_body(http: HttpCalls, request: Request, what: str) -> dict[str, Any]:
    """The small JSON object of a repository request (none: {})."""
    body = await http.body(
        request.headers, request.stream(), CONTROL_BODY_BYTES, exchange_of(request.scope)
    )
    if not body.strip():
        return {}
    return v2_json.parse_json(body, CONTROL_VALUES, shorten(what))


def _parameters(document: dict[str, Any]) -> list[str]:
    parameters = document.get("parameters", {})
    if not isinstance(parameters, dict):
        raise InvalidInput("'parameters' must be a JSON object")
    return list(parameters)


async def infer(
    http: HttpCalls,
    headers: Headers,
    stream: AsyncIterator[bytes],
    exchange: Exchange | None,
    name: str,
    version: str,
    call: Call,
) -> tuple[bytes, int, dict[str, str]]:
    """One V2 REST inference (the route below, and the fast path in rest/fast.py): the
    answer's body, status and headers."""
    engine = http.engine
    v2_json.check_content(headers.get("content-type"), headers.get("content-encoding"))
    model = inference.resolve(engine, name, version, call)  # before reading the body
    body = await http.body(headers, stream, exchange=exchange)
    body = v2_json.decompress(body, headers.get("content-encoding"), http.max_body_bytes)
    text, binary = v2_json.split_body(body, headers.get(v2_json.HEADER_LENGTH))
    budget = v2_json.max_values(model.spec, engine.config.max_queue_size)
    document = v2_json.parse_json(text, budget, model.where)
    deadline = _deadline(document)
    common = v2_direct.common_request(document, binary, model.spec)
    if common is not None:  # nearly every request: no protobuf
        call.images = len(common.images)
        outputs = await engine.infer(model, common.images, deadline)
        content, response_headers = v2_direct.response(common, model.spec, outputs)
        return content, 200, response_headers
    message, binary_default = v2_json.infer_request(document, binary, name, version, model.spec)
    answer = await inference.infer(engine, message, call, deadline)
    content, response_headers = v2_json.infer_response(answer, message, binary_default)
    return content, 200, response_headers


def _deadline(document: dict[str, Any]) -> float | None:
    """Triton's request timeout, in microseconds (tritonclient.http's `timeout`), as a
    time.monotonic() deadline."""
    parameters = document.get("parameters")
    timeout_us = parameters.get("timeout") if type(parameters) is dict else None
    if type(timeout_us) is int and timeout_us > 0:
        return time.monotonic() + timeout_us / 1e6
    return None
