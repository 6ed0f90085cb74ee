"""Requests whose cost could grow faster than their size (issue 14 part 1): each is answered
at once with a precise status, and the server goes on answering health checks meanwhile."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service._proto.classifier.v1 import classifier_pb2 as pb
from service._proto.inference import grpc_predict_v2_pb2 as v2
from tests.conftest import MODEL, Served, start_server

pytestmark = pytest.mark.usefixtures("frontends")  # both server modes

N = 40_000
# A health check answers within 100 ms; on a shared 2-core machine the scheduler alone can
# delay one now and then, so 5 % may take longer (a stall per hostile call would be about 10 %),
# but none a whole second (a stall blocks one probe for as long as it lasts: 2.5 s for the
# first request here at 10,000 names).
HEALTH_BOUND_S = 0.1
STALL_S = 1.0
CHANNELS = 4  # connections of each kind, so that with front ends some share a process


@pytest.fixture(scope="module")
def server(repository: Path, frontends: str) -> Iterator[Served]:
    served = start_server(repository)
    yield served
    assert served.stop() == 0


def infer(**fields) -> v2.ModelInferRequest:
    request = v2.ModelInferRequest(model_name=MODEL, **fields)
    if "inputs" not in fields:
        request.inputs.add(name="images", datatype="UINT8", shape=[1, 28, 28, 1])
        request.raw_input_contents.append(bytes(784))
    return request


def many_outputs(names: list[str]) -> v2.ModelInferRequest:
    request = infer()
    for name in names:
        request.outputs.add(name=name)
    return request


def hostile() -> list[tuple[str, bytes]]:
    """(method, serialized request): each a few hundred KB, each once quadratic or worse."""
    distinct = [f"out{i}" for i in range(N)]
    shape = v2.ModelInferRequest()
    shape.inputs.add(name="images", datatype="UINT8", shape=[1] * N)
    params = infer()
    for i in range(N):
        params.parameters[f"p{i}"].bool_param = True
    classify = pb.ClassifyRequest(model=MODEL)
    for _ in range(N):
        classify.images.add(encoded=b"x")
    flood = infer()  # 15 MB of small entries: 2 s of parsing, on the loop
    for i in range(1_000_000):
        flood.parameters[f"k{i}"].bool_param = True
    v2_infer = "/inference.GRPCInferenceService/ModelInfer"
    requests = [
        (v2_infer, many_outputs([*distinct, distinct[-1]])),  # the duplicate comes last
        (v2_infer, many_outputs(["probabilities"] * N)),
        (v2_infer, infer(inputs=[v2.ModelInferRequest.InferInputTensor(name="images")] * N)),
        (v2_infer, infer(raw_input_contents=[b"\0"] * N)),
        (v2_infer, v2.ModelInferRequest(model_name=MODEL, inputs=shape.inputs)),
        (v2_infer, params),
        (v2_infer, flood),
        ("/classifier.v1.Classifier/Classify", classify),
    ]
    return [(method, request.SerializeToString()) for method, request in requests]


def call(channel: grpc.Channel, method: str, payload: bytes) -> grpc.StatusCode:
    send = channel.unary_unary(method)  # bytes in, bytes out: no client-side cost
    try:
        send(payload, timeout=60)
    except grpc.RpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


def test_hostile_requests_are_refused_and_health_keeps_answering(server: Served):
    health_channels = [grpc.insecure_channel(server.target) for _ in range(CHANNELS)]
    channels = [grpc.insecure_channel(server.target) for _ in range(CHANNELS)]
    probes = [health_pb2_grpc.HealthStub(c) for c in health_channels]
    for probe in probes:  # connected before the clock starts
        probe.Check(health_pb2.HealthCheckRequest(), timeout=10)
    latencies: list[float] = []
    done = threading.Event()

    def watch() -> None:
        while not done.is_set() and len(latencies) < 100_000:
            for probe in probes:
                started = time.monotonic()
                probe.Check(health_pb2.HealthCheckRequest(), timeout=30)
                latencies.append(time.monotonic() - started)
            done.wait(0.005)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    codes = {}
    try:
        for method, payload in hostile():
            for channel in channels:
                codes.setdefault(method, []).append(call(channel, method, payload))
                assert codes[method][-1] in (
                    grpc.StatusCode.INVALID_ARGUMENT,
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                ), (method, codes)
    finally:
        done.set()
        watcher.join(60)
        for channel in channels + health_channels:
            channel.close()
    slow = [t for t in latencies if t >= HEALTH_BOUND_S]
    assert latencies and max(latencies) < STALL_S, sorted(latencies)[-5:]
    assert len(slow) <= len(latencies) // 20, (len(latencies), sorted(latencies)[-5:])


def test_a_request_of_too_many_fields_is_refused_unparsed(server: Served):
    flood = infer()
    flood.outputs.add(name="probabilities")
    for i in range(20_000):  # in a nested message: counted the same
        flood.outputs[0].parameters[f"k{i}"].bool_param = True
    with grpc.insecure_channel(server.target) as channel:
        send = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
        with pytest.raises(grpc.RpcError) as caught:
            send(flood.SerializeToString(), timeout=30)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details() == (
        "ModelInfer: the request holds more than 9,216 protobuf fields, more than any request "
        "within --max-queue-size can use; split it"
    )


def test_too_many_outputs_is_named(server: Served):
    with grpc.insecure_channel(server.target) as channel:
        send = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
        with pytest.raises(grpc.RpcError) as caught:
            send(many_outputs(["probabilities", "bottleneck", "x"]).SerializeToString(), timeout=10)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details() == (
        "model 'fashion' version 1: 3 outputs requested; the model has 2 "
        "(probabilities, bottleneck)"
    )
