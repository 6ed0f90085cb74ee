"""`classifier.v1.Classifier`: our own API. Each image gets its label, top-k, probabilities and
bottleneck, or its own error; protobuf <-> engine types are converted here and nowhere else."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc

from service import bottleneck_map
from service._proto.classifier.v1 import classifier_pb2 as pb
from service._proto.classifier.v1 import classifier_pb2_grpc as pb_grpc
from service.core import ImageInput, Model
from service.errors import InvalidInput, ServingError, shorten
from service.images import tensor_from_bytes
from service.predictions import Prediction
from service.servicers.calls import Call, Calls, deadline, one_message, ordered, stream, unary

API = "classifier.v1"


def decode_images(request: pb.ClassifyRequest, model: Model) -> list[ImageInput | InvalidInput]:
    """Encoded files stay bytes (the engine decodes them); a raw tensor becomes (H, W, C) uint8,
    or the InvalidInput that fails only its own image."""
    inputs: list[ImageInput | InvalidInput] = []
    for image in request.images:
        if image.WhichOneof("source") != "tensor":
            inputs.append(image.encoded)
            continue
        t = image.tensor
        try:
            shape = (t.height, t.width, t.channels)
            inputs.append(tensor_from_bytes(t.data, shape, model.spec.image_shape))
        except InvalidInput as exc:
            inputs.append(exc)
    return inputs


def encode_result(prediction: Prediction) -> pb.Result:
    result = pb.Result(index=prediction.index, id=prediction.id)
    if not prediction.ok:
        result.error.code = prediction.error_code
        result.error.message = prediction.error
        return result
    result.label = prediction.label
    result.label_index = prediction.label_index
    result.confidence = prediction.confidence
    result.top_k.extend(
        pb.ClassScore(label=s.label, index=s.index, score=s.score) for s in prediction.top_k
    )
    result.probabilities.extend(prediction.probabilities)
    result.bottleneck_x = prediction.bottleneck_x
    result.bottleneck_y = prediction.bottleneck_y
    return result


class ClassifierServicer(pb_grpc.ClassifierServicer):
    def __init__(self, calls: Calls) -> None:
        self.calls = calls
        self.engine = calls.engine

    async def _classify(
        self, request: pb.ClassifyRequest, context: grpc.aio.ServicerContext, call: Call
    ) -> pb.ClassifyResponse:
        model = self.engine.model(request.model, request.version or None)
        call.set_model(request.model, model.spec.version, model)
        call.images = len(request.images)
        self.engine.check_count(model, call.images)
        predictions = await self.engine.classify(
            model,
            decode_images(request, model),
            top_k=request.top_k,
            deadline=deadline(context),
            ids=[image.id for image in request.images],
        )
        return pb.ClassifyResponse(
            model=model.spec.name,
            version=model.spec.version,
            results=[encode_result(p) for p in predictions],
        )

    @unary(API)
    async def Classify(self, request, context, call):  # type: ignore[no-untyped-def]
        return await self._classify(request, context, call)

    @stream(API)
    async def ClassifyStream(  # type: ignore[no-untyped-def]
        self, requests: AsyncIterator[pb.ClassifyRequest], context
    ):
        def failed(model: str) -> Callable[[ServingError], pb.ClassifyResponse]:
            return lambda exc: pb.ClassifyResponse(
                model=shorten(model), error=pb.Error(code=exc.code.name, message=str(exc))
            )

        async def answer(request: pb.ClassifyRequest) -> pb.ClassifyResponse:
            call = Call(API, "ClassifyStream", started=time.monotonic())
            return await one_message(
                self.calls,
                call,
                context,
                request,
                lambda call: self._classify(request, context, call),
                failed(getattr(request, "model", "")),
            )

        async for response in ordered(requests, answer):
            yield response

    @unary(API)
    async def ListModels(self, request, context, call):  # type: ignore[no-untyped-def]
        models = []
        for name in self.engine.names():
            versions = self.engine.versions(name)
            models.append(
                pb.ModelSummary(name=name, versions=versions, default_version=max(versions))
            )
        return pb.ListModelsResponse(models=models)

    @unary(API)
    async def GetModel(self, request, context, call):  # type: ignore[no-untyped-def]
        model = self.engine.model(request.name, request.version or None)
        spec = model.spec
        call.set_model(spec.name, spec.version)
        return pb.GetModelResponse(
            name=spec.name,
            version=spec.version,
            versions=self.engine.versions(spec.name),
            labels=list(spec.labels),
            input=pb.InputSpec(
                name=spec.input_name,
                dtype="uint8",
                layout="NHWC",
                height=spec.height,
                width=spec.width,
                channels=spec.channels,
            ),
            execution_providers=list(model.providers),
            metadata_json=json.dumps(spec.metadata, sort_keys=True),
            **encode_map(bottleneck_map.load(spec)),
        )


def encode_map(found: bottleneck_map.Found) -> dict[str, Any]:
    """GetModelResponse's `map` (or `map_absent_reason`) fields."""
    m = found.map
    if m is None:
        return {"map_absent_reason": found.reason}
    x_min, x_max, y_min, y_max = m.extent
    return {
        "map": pb.BottleneckMap(
            x=m.x,
            y=m.y,
            label_index=m.label,
            centroids=[
                pb.Centroid(label_index=c.label_index, label=c.label, x=c.x, y=c.y, count=c.count)
                for c in m.centroids
            ],
            x_min=x_min,
            x_max=x_max,
            y_min=y_min,
            y_max=y_max,
            source=m.source,
        )
    }
