r"""classifier.v1 over HTTP, for people and curl: each image's label, top-k, probabilities and
bottleneck point, or its own error, as the gRPC Classify answers them.

    POST /v1/models/{m}[/versions/{v}]:classify   an image body (Content-Type: image/*),
         a multipart form of one or many files, or JSON {"images": [{"b64": ...}], "top_k": 3}
    GET  /v1/models                                the models and their versions (ListModels)
    GET  /v1/models/{m}[/versions/{v}]             one version's description (GetModel)

    curl -F image=@shoe.png localhost:8000/v1/models/fashion:classify
    curl --data-binary @shoe.png -H 'Content-Type: image/png' \
        localhost:8000/v1/models/fashion:classify
"""

from __future__ import annotations

import asyncio
import base64
import binascii
from collections.abc import AsyncGenerator
from typing import Any

from fastapi import APIRouter
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import Request
from starlette.responses import Response

from service import bottleneck_map
from service.core import ImageInput, Model
from service.errors import InvalidInput, ModelNotFound, shorten
from service.predictions import DEFAULT_TOP_K, Prediction
from service.repository import parse_version
from service.rest import v2_json
from service.rest.calls import HttpCalls, byte_count
from service.rest.protocol import exchange_of
from service.rest.status import UnsupportedMediaType, json_response
from service.servicers.calls import Call

API = "http.v1"
CHUNK = 256 * 1024  # a buffered body is parsed in pieces this big, the loop free in between
MAX_TOP_K = 1000
Images = tuple[list[ImageInput | InvalidInput], list[str], object]  # files, ids, top_k
CLASSIFY_BODY = {
    "requestBody": {
        "description": "one image (image/*), a multipart form of files, or JSON "
        '{"images": [{"b64": "...", "id": "..."}], "top_k": 3}',
        "content": {
            "image/*": {"schema": {"type": "string", "format": "binary"}},
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "image": {"type": "array", "items": {"type": "string", "format": "binary"}}
                    },
                }
            },
            "application/json": {"schema": {"type": "object"}},
        },
    }
}


def prediction_json(p: Prediction) -> dict[str, Any]:
    if not p.ok:
        return {"index": p.index, "id": p.id, "error": {"code": p.error_code, "message": p.error}}
    return {
        "index": p.index,
        "id": p.id,
        "label": p.label,
        "label_index": p.label_index,
        "confidence": p.confidence,
        "top_k": [{"label": s.label, "index": s.index, "score": s.score} for s in p.top_k],
        "probabilities": list(p.probabilities),
        "bottleneck": {"x": p.bottleneck_x, "y": p.bottleneck_y},
    }


def model_json(model: Model, versions: list[int]) -> dict[str, Any]:
    spec = model.spec
    found = bottleneck_map.load(spec)
    return {
        "name": spec.name,
        "version": spec.version,
        "versions": versions,
        "labels": list(spec.labels),
        "input": {
            "name": spec.input_name,
            "dtype": "uint8",
            "layout": "NHWC",
            "height": spec.height,
            "width": spec.width,
            "channels": spec.channels,
        },
        "execution_providers": list(model.providers),
        "metadata": spec.metadata,
        "map": f"/v1/models/{spec.name}/versions/{spec.version}/map" if found.map else None,
        "map_absent_reason": found.reason,
    }


def _version(name: str, text: str) -> int | None:
    if not text:
        return None
    version = parse_version(text)
    if version is None:
        raise ModelNotFound(
            f"model {shorten(name)!r} has no version {shorten(text)!r} (versions are integers)"
        )
    return version


def _top_k(value: object) -> int:
    if value is None or value == "":
        return DEFAULT_TOP_K
    text = str(value)
    number = byte_count(text)
    if number is None or not 1 <= number <= MAX_TOP_K:
        raise InvalidInput(f"top_k must be an integer from 1 to {MAX_TOP_K}, got {shorten(text)!r}")
    return number


async def _pieces(body: bytes) -> AsyncGenerator[bytes, None]:
    for start in range(0, len(body), CHUNK):
        yield body[start : start + CHUNK]
        await asyncio.sleep(0)  # a large form does not hold the event loop in one go


async def _form_images(request: Request, body: bytes, limit: int) -> Images:
    parser = MultiPartParser(
        request.headers, _pieces(body), max_files=limit, max_fields=16, max_part_size=1024
    )
    try:
        form = await parser.parse()
    except MultiPartException as exc:
        raise InvalidInput(f"multipart body: {exc.message}") from None
    images: list[ImageInput | InvalidInput] = []
    ids: list[str] = []
    top_k: object = None
    try:
        for key, value in form.multi_items():
            if isinstance(value, UploadFile):
                images.append(await value.read())
                ids.append(value.filename or key)
            elif key == "top_k":
                top_k = value
    finally:
        await form.close()
    return images, ids, top_k


def _json_images(body: bytes, limit: int, where: str) -> Images:
    document = v2_json.parse_json(body, 4 * limit + v2_json.SPARE_VALUES, where)
    items = document.get("images")
    if not isinstance(items, list):
        raise InvalidInput(f'{where}: JSON body needs "images": [{{"b64": "..."}}, ...]')
    if len(items) > limit:
        raise InvalidInput(
            f"{where}: {len(items):,} images in one request; at most {limit:,} "
            "(--max-queue-size): split the request"
        )
    images: list[ImageInput | InvalidInput] = []
    ids: list[str] = []
    for i, item in enumerate(items):
        if not isinstance(item, dict) or not isinstance(item.get("b64"), str):
            raise InvalidInput(f'{where}: image {i} must be an object {{"b64": "<base64>"}}')
        try:
            images.append(base64.b64decode(item["b64"], validate=True))
        except (binascii.Error, ValueError):
            images.append(InvalidInput("b64 is not valid base64"))
        image_id = item.get("id", "")
        ids.append(image_id if isinstance(image_id, str) else str(image_id))
    return images, ids, document.get("top_k")


async def _images(http: HttpCalls, request: Request, model: Model) -> Images:
    """The request's images (encoded files), their ids and the body's top_k, if any."""
    limit = http.engine.config.max_queue_size
    kind = (request.headers.get("content-type") or "").split(";", 1)[0].strip().lower()
    if request.headers.get("content-encoding", "identity").lower() != "identity":
        raise UnsupportedMediaType("Content-Encoding is not supported; send the body uncompressed")
    image = kind.startswith("image/") or kind == v2_json.BINARY
    if image or kind in ("multipart/form-data", "application/json"):
        exchange = exchange_of(request.scope)
        body = await http.body(request.headers, request.stream(), exchange=exchange)
        if image:
            return [body], [""], None
        if kind == "application/json":
            return _json_images(body, limit, model.where)
        return await _form_images(request, body, limit)
    raise UnsupportedMediaType(
        f"Content-Type {shorten(kind or 'none', 60)!r}: send an image (Content-Type: image/png, "
        "image/jpeg, ...), a multipart form of files (curl -F image=@FILE) or JSON "
        '{"images": [{"b64": "..."}]}'
    )


def router(http: HttpCalls) -> APIRouter:
    engine = http.engine
    api = APIRouter(tags=["classifier.v1"])

    for prefix in ("/v1/models/{name}", "/v1/models/{name}/versions/{version}"):

        @api.post(prefix + ":classify", summary="Classify images", openapi_extra=CLASSIFY_BODY)
        async def classify(request: Request, name: str, version: str = "") -> Response:
            async def work(call: Call) -> Response:
                model = engine.model(name, _version(name, version))
                call.set_model(name, model.spec.version, model)
                top_k = _top_k(request.query_params.get("top_k"))
                images, ids, body_top_k = await _images(http, request, model)
                if body_top_k is not None:
                    top_k = _top_k(body_top_k)
                call.images = len(images)
                predictions = await engine.classify(model, images, top_k=top_k, ids=ids)
                return json_response(
                    {
                        "model": model.spec.name,
                        "version": model.spec.version,
                        "results": [prediction_json(p) for p in predictions],
                    }
                )

            return await http.handle(request.headers, API, "Classify", work)

        @api.get(prefix + "/map", summary="The version's bottleneck map")
        async def get_map(request: Request, name: str, version: str = "") -> Response:
            """Where the run's test set lies in the bottleneck plane (export/bottleneck_map.py
            documents the format); 404 for a version exported without one, saying why."""

            async def work(call: Call) -> Response:
                model = engine.model(name, _version(name, version))
                call.set_model(name, model.spec.version)
                found = bottleneck_map.load(model.spec)
                if found.map is None:
                    raise ModelNotFound(f"{model.where} has no bottleneck map: {found.reason}")
                return json_response(found.map.document)

            return await http.handle(request.headers, API, "GetMap", work)

        @api.get(prefix, summary="A model version's description")
        async def get_model(request: Request, name: str, version: str = "") -> Response:
            async def work(call: Call) -> Response:
                model = engine.model(name, _version(name, version))
                call.set_model(name, model.spec.version)
                return json_response(model_json(model, engine.versions(name)))

            return await http.handle(request.headers, API, "GetModel", work)

    @api.get("/v1/models", summary="The models and their versions")
    async def list_models(request: Request) -> Response:
        async def work(call: Call) -> Response:
            models = [
                {
                    "name": n,
                    "versions": engine.versions(n),
                    "default_version": max(engine.versions(n)),
                }
                for n in engine.names()
            ]
            return json_response({"models": models})

        return await http.handle(request.headers, API, "ListModels", work)

    return api
