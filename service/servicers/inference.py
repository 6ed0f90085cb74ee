"""`inference.GRPCInferenceService`: the Open Inference Protocol (KServe V2) plus Triton's
ModelConfig and ModelStatistics, so tritonclient, perf_analyzer and KServe clients work as is."""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from importlib import metadata

import numpy as np

from service._proto.inference import grpc_predict_v2_pb2 as pb
from service._proto.inference import grpc_predict_v2_pb2_grpc as pb_grpc
from service.core import Core, Model, Stats
from service.errors import InvalidInput, ServingError, shorten
from service.servicers import v2_codec
from service.servicers.calls import Call, Calls, deadline, one_message, ordered, stream, unary

API = "inference.v2"
EXTENSIONS = ["classification", "model_configuration", "model_repository", "statistics"]
UNLOAD_PARAMETERS = {"unload_dependents"}  # read and needless: there are no ensembles here


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, calls: Calls) -> None:
        self.calls = calls
        self.engine = calls.engine

    def _model(self, name: str, version: str, call: Call) -> Model:
        return resolve(self.engine, name, version, call)

    @unary(API, while_draining=True)
    async def ServerLive(self, request, context, call):  # type: ignore[no-untyped-def]
        return pb.ServerLiveResponse(live=True)

    @unary(API, while_draining=True)
    async def ServerReady(self, request, context, call):  # type: ignore[no-untyped-def]
        return pb.ServerReadyResponse(ready=self.engine.serving)

    @unary(API, while_draining=True)
    async def ModelReady(self, request, context, call):  # type: ignore[no-untyped-def]
        try:
            self._model(request.name, request.version, call)
        except ServingError:
            return pb.ModelReadyResponse(ready=False)
        # a front end keeps its catalogue while its engine restarts: not ready then
        return pb.ModelReadyResponse(ready=self.engine.ready and not self.engine.draining)

    @unary(API)
    async def ServerMetadata(self, request, context, call):  # type: ignore[no-untyped-def]
        return pb.ServerMetadataResponse(
            name="cnn-serving", version=metadata.version("cnn-serving"), extensions=EXTENSIONS
        )

    @unary(API)
    async def ModelMetadata(self, request, context, call):  # type: ignore[no-untyped-def]
        model = self._model(request.name, request.version, call)
        return v2_codec.model_metadata(model.spec, self.engine.versions(request.name))

    @unary(API)
    async def ModelConfig(self, request, context, call):  # type: ignore[no-untyped-def]
        model = self._model(request.name, request.version, call)
        config = self.engine.config
        return v2_codec.model_config(
            model.spec, config.max_batch_size, config.max_queue_delay_ms, model.on_cuda
        )

    @unary(API)
    async def ModelStatistics(self, request, context, call):  # type: ignore[no-untyped-def]
        models = stats_models(self.engine, request.name, request.version, call)
        return statistics(models, await self.engine.statistics(models))

    @unary(API)
    async def RepositoryIndex(self, request, context, call):  # type: ignore[no-untyped-def]
        entries = await self.engine.repository_index(request.ready)
        index = pb.RepositoryIndexResponse.ModelIndex
        return pb.RepositoryIndexResponse(models=[index(**e.to_dict()) for e in entries])

    @unary(API)
    async def RepositoryModelLoad(self, request, context, call):  # type: ignore[no-untyped-def]
        await load(self.engine, request.model_name, request.parameters.keys())
        return pb.RepositoryModelLoadResponse()

    @unary(API)
    async def RepositoryModelUnload(self, request, context, call):  # type: ignore[no-untyped-def]
        await unload(self.engine, request.model_name, request.parameters.keys())
        return pb.RepositoryModelUnloadResponse()

    @unary(API)
    async def ModelInfer(self, request, context, call):  # type: ignore[no-untyped-def]
        return await infer(self.engine, request, call, deadline(context))

    @stream(API)
    async def ModelStreamInfer(self, requests, context):  # type: ignore[no-untyped-def]
        """Triton's streaming inference: one response per request, in request order; a request
        that fails gets its `error_message` and the stream goes on."""

        async def answer(request: pb.ModelInferRequest) -> pb.ModelStreamInferResponse:
            call = Call(API, "ModelStreamInfer", started=time.monotonic())

            def failed(exc: ServingError) -> pb.ModelStreamInferResponse:
                # The request's id comes back with its error, so a client knows which failed.
                return pb.ModelStreamInferResponse(
                    error_message=f"[{exc.code.name}] {exc}",
                    infer_response=pb.ModelInferResponse(id=getattr(request, "id", "")),
                )

            async def respond(call: Call) -> pb.ModelStreamInferResponse:
                response = await infer(self.engine, request, call, deadline(context))
                if _flag(request, "triton_enable_empty_final_response"):
                    # Every answer here is its request's only one, so it is also its final one.
                    response.parameters["triton_final_response"].bool_param = True
                return pb.ModelStreamInferResponse(infer_response=response)

            return await one_message(self.calls, call, context, request, respond, failed)

        async for response in ordered(requests, answer):
            yield response


def resolve(engine: Core, name: str, version: str, call: Call) -> Model:
    """The version a V2 request names ("" : the newest), set on `call` for the metrics."""
    # Labels only once resolved: a client must not grow the metrics with made-up names.
    model = engine.model(name, v2_codec.parse_version(name, version))
    call.set_model(name, model.spec.version, model)
    return model


async def infer(
    engine: Core, request: pb.ModelInferRequest, call: Call, deadline: float | None
) -> pb.ModelInferResponse:
    """A V2 inference request, over gRPC or HTTP (service.rest builds the same message)."""
    model = resolve(engine, request.model_name, request.model_version, call)
    requested = v2_codec.requested_outputs(request, model.spec)
    tensor, raw = v2_codec.image_tensor(request, model.spec)
    if tensor.shape:  # before converting any data
        engine.check_count(model, tensor.shape[0])
    images = v2_codec.decode_input(tensor, raw, model.spec)
    call.images = len(images)
    if isinstance(images, list):  # encoded files: all must decode (V2 has no per-image error)
        decoded = await engine.decode(model, images)
        for item in decoded:
            if isinstance(item, ServingError):  # the first bad image fails the request
                raise item
        images = np.stack(decoded)  # type: ignore[arg-type]
    outputs = await engine.infer(model, images, deadline)
    return v2_codec.encode_response(request, model.spec, requested, outputs)


async def load(engine: Core, name: str, parameters: Iterable[str]) -> None:
    """RepositoryModelLoad, over gRPC or HTTP: no parameter is read (a config override or
    files sent along would make a version that is not on disk), so any is refused."""
    _check_control_request(name, "load", set(parameters))
    await engine.load_model(name)


async def unload(engine: Core, name: str, parameters: Iterable[str]) -> None:
    _check_control_request(name, "unload", set(parameters) - UNLOAD_PARAMETERS)
    await engine.unload_model(name)


def _check_control_request(name: str, what: str, unread: set[str]) -> None:
    if not name:
        raise InvalidInput(f"which model to {what}? model_name is empty")
    if unread:
        raise InvalidInput(
            f"model {shorten(name)!r}: {what} parameters not supported: "
            f"{shorten(', '.join(sorted(unread)))} (cnn-serving reads every version from the "
            "repository on disk: metadata.json and model.onnx; no config override or files "
            "in the request)"
        )


def statistics(models: Sequence[Model], stats: Sequence[Stats]) -> pb.ModelStatisticsResponse:
    return pb.ModelStatisticsResponse(
        model_stats=[_statistics(m, s) for m, s in zip(models, stats, strict=True)]
    )


def stats_models(engine: Core, name: str, version: str, call: Call) -> list[Model]:
    """The versions a ModelStatistics request covers: one, every one of a model, or all."""
    if version and not name:
        raise InvalidInput(
            f"statistics of version {shorten(version)!r} of which model? "
            "(a version needs a model name)"
        )
    if not name:
        return [engine.model(n, v) for n in engine.names() for v in engine.versions(n)]
    if version:
        return [resolve(engine, name, version, call)]
    engine.model(name)  # NOT_FOUND for an unknown name
    return [engine.model(name, v) for v in engine.versions(name)]


def _flag(request: pb.ModelInferRequest, name: str) -> bool:
    return name in request.parameters and request.parameters[name].bool_param


def _statistics(model: Model, stats: Stats) -> pb.ModelStatistics:
    duration = pb.StatisticDuration
    return pb.ModelStatistics(
        name=model.spec.name,
        version=str(model.spec.version),
        last_inference=stats.last_inference_ms,
        inference_count=stats.inference_count,
        execution_count=stats.execution_count,
        inference_stats=pb.InferStatistics(
            success=duration(count=stats.success[0], ns=stats.success[1]),
            fail=duration(count=stats.fail[0], ns=stats.fail[1]),
            queue=duration(count=stats.queue[0], ns=stats.queue[1]),
            compute_input=duration(count=stats.compute_input[0], ns=stats.compute_input[1]),
            compute_infer=duration(count=stats.compute[0], ns=stats.compute[1]),
            compute_output=duration(count=stats.compute_output[0], ns=stats.compute_output[1]),
        ),
        batch_stats=[
            pb.InferBatchStatistics(
                batch_size=size,
                compute_input=duration(count=count, ns=input_ns),
                compute_infer=duration(count=count, ns=infer_ns),
                compute_output=duration(count=count, ns=output_ns),
            )
            for size, (count, input_ns, infer_ns, output_ns) in sorted(stats.batches.items())
        ],
    )
