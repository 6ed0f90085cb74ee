"""The real server on free ports, talked to over real channels with our client."""

from __future__ import annotations

import asyncio
import re
import shutil
import signal
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2

from service._proto.classifier.v1 import classifier_pb2 as pb
from service._proto.classifier.v1 import classifier_pb2_grpc as pb_grpc
from service._proto.inference import grpc_predict_v2_pb2 as v2
from service._proto.inference import grpc_predict_v2_pb2_grpc as v2_grpc
from service.client import Client, ClientError
from tests.conftest import MODEL, Served, eventually, png, reference, scrape, start_server
from tests.service.test_images import bomb_png

pytestmark = pytest.mark.usefixtures("frontends")  # both server modes


def test_classify_answers_like_onnxruntime(server: Served, repository: Path, sample_images):
    x, _ = sample_images
    want = reference(repository, x[:8])
    with Client(server.target) as client:
        encoded = client.classify([png(image) for image in x[:4]], MODEL, top_k=3)
        raw = client.classify(list(x[4:8]), MODEL, version=1)
    for i, p in enumerate(encoded + raw):
        assert p.ok and p.model == MODEL and p.version == 1 and p.index == i % 4
        np.testing.assert_allclose(p.probabilities, want["probabilities"][i], atol=1e-6)
        assert (p.bottleneck_x, p.bottleneck_y) == pytest.approx(want["bottleneck"][i], abs=1e-4)
        assert p.label_index == int(np.argmax(want["probabilities"][i]))
    labels = client_labels(server)
    assert encoded[0].label == labels[encoded[0].label_index]
    assert len(encoded[0].top_k) == 3 and len(raw[0].top_k) == 5
    assert encoded[0].top_k[0].score >= encoded[0].top_k[1].score


def client_labels(server: Served) -> tuple[str, ...]:
    with Client(server.target) as client:
        return client.get_model(MODEL).labels


def test_one_bad_image_does_not_fail_the_others(server: Served, sample_images):
    x, _ = sample_images
    with Client(server.target) as client:
        answers = client.classify([png(x[0]), b"<html>", bomb_png(20_000, 20_000), x[1]], MODEL)
    assert [p.ok for p in answers] == [True, False, False, True]
    assert answers[1].error_code == "INVALID_ARGUMENT"
    assert answers[1].error.startswith("model 'fashion' version 1, image 1: not a readable image")
    assert "image 2: image of 20000x20000 = 400,000,000 pixels exceeds" in answers[2].error


def test_models_are_listed_and_described(server: Served):
    with Client(server.target) as client:
        assert client.list_models() == {MODEL: [1]}
        info = client.get_model(MODEL)
    assert info.version == 1 and info.input_shape == (28, 28, 1) and len(info.labels) == 10
    assert info.execution_providers == ("CPUExecutionProvider",)
    assert info.metadata["onnx"]["sha256"] and info.metadata["name"] == MODEL


@pytest.mark.parametrize(
    ("call", "code", "message"),
    [
        (lambda c: c.classify([b"x"], "nope"), "NOT_FOUND", "model 'nope' is not loaded"),
        (lambda c: c.classify([b"x"], MODEL, 9), "NOT_FOUND", "'fashion' has no version 9"),
        (lambda c: c.get_model(MODEL, 3), "NOT_FOUND", "has no version 3 (loaded: 1)"),
        (lambda c: c.classify([], MODEL), "INVALID_ARGUMENT", "holds no images"),
    ],
)
def test_request_errors_have_precise_codes(server: Served, call, code, message):
    with Client(server.target) as client, pytest.raises(ClientError) as caught:
        call(client)
    assert caught.value.code.name == code and message in caught.value.message


def v2_request(images: np.ndarray, **fields) -> v2.ModelInferRequest:
    request = v2.ModelInferRequest(model_name=MODEL, **fields)
    request.inputs.add(name="images", datatype="UINT8", shape=images.shape)
    request.raw_input_contents.append(images.tobytes())
    return request


@pytest.mark.parametrize(
    ("mutate", "code", "message"),
    [
        (lambda r: r.inputs[0].ClearField("shape") or r.inputs[0].shape.extend([1, 28, 28, 3]),
         "INVALID_ARGUMENT", "UINT8 input shape must be [N, 28, 28, 1], got [1, 28, 28, 3]"),
        (lambda r: setattr(r.inputs[0], "datatype", "FP32"), "INVALID_ARGUMENT",
         "input datatype 'FP32' is not supported"),
        (lambda r: setattr(r.inputs[0], "name", "pixels"), "INVALID_ARGUMENT",
         "unknown input 'pixels'"),
        (lambda r: r.outputs.add(name="logits"), "INVALID_ARGUMENT", "unknown output 'logits'"),
        (lambda r: setattr(r, "model_version", "7"), "NOT_FOUND", "has no version 7"),
        (lambda r: setattr(r, "model_version", "latest"), "NOT_FOUND", "no version 'latest'"),
        (lambda r: setattr(r, "model_version", "\u00b2"), "NOT_FOUND", "versions are integers"),
        (lambda r: r.outputs.add(name="bottleneck") and r.outputs.add(name="bottleneck"),
         "INVALID_ARGUMENT", "output 'bottleneck' is requested twice"),
        (lambda r: r.inputs[0].contents.uint_contents.extend([0] * 784), "INVALID_ARGUMENT",
         "both raw_input_contents and typed contents"),
        (lambda r: setattr(r.inputs[0], "datatype", "Q" * 50_000), "INVALID_ARGUMENT",
         "is not supported"),  # the message echoes it cut short, within gRPC's limits
        (lambda r: r.outputs.add(name="probabilities").parameters["class_count"].int64_param
         .__class__, "INVALID_ARGUMENT",
         "output 'probabilities': parameter 'class_count' is not supported (supported: "
         "classification, binary_data)"),
        (lambda r: r.outputs.add(name="bottleneck").parameters["classification"]
         .__setattr__("int64_param", 2), "INVALID_ARGUMENT",
         "classification applies to 'probabilities'"),
        (lambda r: r.outputs.add(name="probabilities").parameters["classification"]
         .__setattr__("string_param", "3"), "INVALID_ARGUMENT",
         "expected an int parameter, got string_param"),
        (lambda r: r.raw_input_contents.__setitem__(0, b"\x00" * 10), "INVALID_ARGUMENT",
         "needs 784 bytes, raw_input_contents has 10"),
    ],
)  # fmt: skip
def test_v2_errors_have_precise_codes(server: Served, mutate, code, message):
    request = v2_request(np.zeros((1, 28, 28, 1), np.uint8))
    mutate(request)
    with grpc.insecure_channel(server.target) as channel:
        with pytest.raises(grpc.RpcError) as caught:
            v2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=10)
    assert caught.value.code().name == code
    assert message in caught.value.details() and "model 'fashion'" in caught.value.details()


GARBAGE = b"\xff\xff\xff"  # field 31 with wire type 7: no message of any type parses from it


def test_health_and_reflection_refuse_malformed_requests_quietly(server: Served):
    """Health (exempt from the token) and reflection answer bytes that are not their message
    INVALID_ARGUMENT, with no traceback in the log, and go on answering good requests."""
    lines_before = len(server.log.lines)
    with grpc.insecure_channel(server.target) as channel:
        calls = [
            channel.unary_unary("/grpc.health.v1.Health/Check"),
            lambda payload, timeout: list(
                channel.unary_stream("/grpc.health.v1.Health/Watch")(payload, timeout=timeout)
            ),
            lambda payload, timeout: list(
                channel.stream_stream(
                    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"
                )(iter([payload]), timeout=timeout)
            ),
        ]
        for _ in range(50):
            for send in calls:
                with pytest.raises(grpc.RpcError) as caught:
                    send(b"\x00", timeout=10)
                assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert "not a valid protobuf message" in caught.value.details()
        assert (
            health_pb2_grpc.HealthStub(channel)
            .Check(health_pb2.HealthCheckRequest(), timeout=10)
            .status
            == health_pb2.HealthCheckResponse.SERVING
        )
        reflect = channel.stream_stream(
            "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
            request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
            response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
        )
        listed = list(reflect(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
    names = [s.name for s in listed[0].list_services_response.service]
    assert "grpc.health.v1.Health" in names and "classifier.v1.Classifier" in names
    assert "Traceback" not in "".join(server.log.lines[lines_before:])


def test_malformed_messages_are_invalid_argument(server: Served):
    """Bytes that are not a protobuf message of the method's type: INVALID_ARGUMENT (gRPC's own
    answer would be UNKNOWN), and in a stream only that message fails."""
    good = v2_request(np.zeros((1, 28, 28, 1), np.uint8), id="a").SerializeToString()
    wrong_type = v2_request(np.zeros((1, 28, 28, 1), np.uint8), id="b")
    wrong_type.inputs[0].datatype = "FP32"
    classify = pb.ClassifyRequest(model=MODEL, images=[pb.Image(encoded=b"x")])
    with grpc.insecure_channel(server.target) as channel:
        for method in (
            "/inference.GRPCInferenceService/ModelInfer",
            "/inference.GRPCInferenceService/ServerLive",
            "/classifier.v1.Classifier/Classify",
        ):
            with pytest.raises(grpc.RpcError) as caught:
                channel.unary_unary(method)(GARBAGE, timeout=10)
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, method
            assert "not a valid protobuf message" in caught.value.details()
        v2_stream = channel.stream_stream(
            "/inference.GRPCInferenceService/ModelStreamInfer",
            response_deserializer=v2.ModelStreamInferResponse.FromString,
        )
        messages = [good, GARBAGE, wrong_type.SerializeToString(), good]
        answers = list(v2_stream(iter(messages), timeout=30))
        classify_stream = channel.stream_stream(
            "/classifier.v1.Classifier/ClassifyStream",
            response_deserializer=pb.ClassifyResponse.FromString,
        )
        classified = list(
            classify_stream(iter([GARBAGE, classify.SerializeToString()]), timeout=30)
        )
        with pytest.raises(grpc.RpcError) as caught:
            v2_grpc.GRPCInferenceServiceStub(channel).ModelStatistics(
                v2.ModelStatisticsRequest(version="7"), timeout=10
            )
    assert [a.infer_response.id for a in answers] == ["a", "", "b", "a"]
    bad = "[INVALID_ARGUMENT]"
    assert [a.error_message[:18] for a in answers] == ["", bad, bad, ""]
    assert (
        "ModelStreamInfer: the request is not a valid protobuf message" in answers[1].error_message
    )
    assert "datatype 'FP32' is not supported" in answers[2].error_message
    assert list(answers[3].infer_response.outputs[0].shape) == [1, 10]
    assert classified[0].error.code == "INVALID_ARGUMENT" and not classified[0].results
    assert classified[1].results[0].error.code == "INVALID_ARGUMENT"  # b"x": its own error
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "a version needs a model name" in caught.value.details()


def test_v2_bytes_tensor_names_the_bad_image(server: Served, sample_images):
    from service.servicers.v2_codec import pack_bytes

    x, _ = sample_images
    request = v2.ModelInferRequest(model_name=MODEL)
    request.inputs.add(name="images", datatype="BYTES", shape=[3])
    request.raw_input_contents.append(pack_bytes([png(x[0]), png(x[1]), b"GIF89a?"]))
    with grpc.insecure_channel(server.target) as channel:
        with pytest.raises(grpc.RpcError) as caught:
            v2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=10)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "model 'fashion' version 1, image 2:" in caught.value.details()


def test_too_large_a_message_is_resource_exhausted(repository: Path):
    served = start_server(repository, "--max-message-bytes", "100000")
    try:
        with Client(served.target) as client, pytest.raises(ClientError) as caught:
            client.classify([b"\x00" * 200_000], MODEL)
        assert caught.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    finally:
        assert served.stop() == 0


async def _hammer(target: str, x: np.ndarray, n: int) -> list[pb.ClassifyResponse]:
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.ClassifierStub(channel)

        async def one(i: int) -> pb.ClassifyResponse:
            image = pb.Image(tensor=pb.Tensor(height=28, width=28, channels=1,
                                              data=x[i % len(x)].tobytes()))  # fmt: skip
            return await stub.Classify(pb.ClassifyRequest(model=MODEL, images=[image]), timeout=60)

        return await asyncio.gather(*(one(i) for i in range(n)))


def sample(metrics: dict[str, list], family: str, name: str, **labels) -> float:
    """The sum of matching samples; 0 before any process has written the family (with several
    processes a family appears in /metrics only once a value has been written)."""
    return sum(
        s.value for s in metrics.get(family, [])
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    )  # fmt: skip


def test_256_concurrent_requests_are_batched_and_answered_right(
    server: Served, repository: Path, sample_images
):
    x, _ = sample_images
    before = scrape(server)
    responses = asyncio.run(_hammer(server.target, x, 256))
    after = scrape(server)
    want = reference(repository, x)
    for i, response in enumerate(responses):
        result = response.results[0]
        assert not result.HasField("error")
        assert result.label_index == int(np.argmax(want["probabilities"][i % len(x)]))
        np.testing.assert_allclose(result.probabilities, want["probabilities"][i % len(x)],
                                   atol=1e-6)  # fmt: skip
    labels = {"model": MODEL, "version": "1"}
    images = sample(after, "cnn_serving_batch_size", "cnn_serving_batch_size_sum", **labels) - (
        sample(before, "cnn_serving_batch_size", "cnn_serving_batch_size_sum", **labels)
    )
    batches = sample(after, "cnn_serving_batch_size", "cnn_serving_batch_size_count", **labels) - (
        sample(before, "cnn_serving_batch_size", "cnn_serving_batch_size_count", **labels)
    )
    assert images == 256
    assert images / batches > 1.0, f"{batches} batches for 256 images: no batching happened"


def test_metrics_are_exported_with_their_labels(server: Served, sample_images):
    x, _ = sample_images
    missing = {"model": "", "api": "classifier.v1", "code": "NOT_FOUND"}  # never a made-up name
    family = "cnn_serving_requests"
    before = sample(scrape(server), family, "cnn_serving_requests_total", **missing)
    with Client(server.target) as client:
        client.classify([png(x[0]), b"junk"], MODEL)
        with pytest.raises(ClientError):
            client.classify([b"x"], "nope")
    metrics = scrape(server)
    ok = {"model": MODEL, "version": "1", "api": "classifier.v1", "code": "OK"}
    assert sample(metrics, "cnn_serving_requests", "cnn_serving_requests_total", **ok) >= 1
    assert sample(metrics, "cnn_serving_images", "cnn_serving_images_total", **ok) >= 2
    assert sample(metrics, family, "cnn_serving_requests_total", **missing) == before + 1
    labels = {"model": MODEL, "version": "1"}
    for family in ("cnn_serving_request_duration_seconds", "cnn_serving_queue_duration_seconds",
                   "cnn_serving_decode_duration_seconds",
                   "cnn_serving_inference_duration_seconds", "cnn_serving_batch_size"):  # fmt: skip
        assert sample(metrics, family, f"{family}_count", **labels) >= 1, family
        assert any(s.name == f"{family}_bucket" for s in metrics[family])  # a histogram
    assert sample(metrics, "cnn_serving_model_ready", "cnn_serving_model_ready", **labels) == 1
    assert sample(metrics, "cnn_serving_queue_depth", "cnn_serving_queue_depth", **labels) == 0
    provider = {**labels, "provider": "CPUExecutionProvider", "device": "cpu"}
    info = "cnn_serving_execution_provider_info"
    assert sample(metrics, info, info, **provider) == 1


def test_health_for_server_and_models(server: Served):
    with grpc.insecure_channel(server.target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)

        def status(service: str) -> int:
            return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status

        assert status("") == health_pb2.HealthCheckResponse.SERVING
        assert status(MODEL) == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as caught:
            status("nope")
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND


def test_deadline_exceeded_while_queued(repository: Path, sample_images):
    # One image per batch: 20,000 images take well over the 0.3 s deadline, so the server sees
    # the deadline pass while most of the request is still queued, and drops the rest.
    served = start_server(repository, "--max-batch-size", "1", "--max-queue-size", "100000")
    x, _ = sample_images
    try:
        with Client(served.target) as client:
            with pytest.raises(ClientError) as caught:
                client.classify([x[0]] * 20_000, MODEL, timeout_s=0.3)
        assert caught.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
        # model "fashion" when the batch queue dropped it, "" when the deadline had already
        # passed as the handler started (a loaded box: receiving 16 MB took longer), answered
        # before any work
        expired = {"api": "classifier.v1", "code": "DEADLINE_EXCEEDED"}
        deadline = time.monotonic() + 30
        while not sample(scrape(served), "cnn_serving_requests", "cnn_serving_requests_total",
                         **expired):  # fmt: skip
            assert time.monotonic() < deadline, "the server never recorded the expiry"
        computed = sample(scrape(served), "cnn_serving_batch_size", "cnn_serving_batch_size_sum",
                          model=MODEL, version="1")  # fmt: skip
        assert computed < 20_000, "expired images were computed anyway"
    finally:
        assert served.stop() == 0


def test_queue_overflow_is_resource_exhausted(repository: Path, sample_images):
    # One image per batch and requests that fill the queue alone: while the first is computed,
    # the others of a concurrent burst find the queue full.
    served = start_server(repository, "--max-queue-size", "64", "--max-batch-size", "1")
    x, _ = sample_images
    image = pb.Image(tensor=pb.Tensor(height=28, width=28, channels=1, data=x[0].tobytes()))

    async def burst() -> list:
        async with grpc.aio.insecure_channel(served.target) as channel:
            stub = pb_grpc.ClassifierStub(channel)
            request = pb.ClassifyRequest(model=MODEL, images=[image] * 64)
            calls = [stub.Classify(request, timeout=60) for _ in range(40)]
            return await asyncio.gather(*calls, return_exceptions=True)

    try:
        answers = asyncio.run(burst())
        refused = [a for a in answers if isinstance(a, grpc.aio.AioRpcError)]
        assert refused and len(refused) < 40  # some were queued and answered, some refused
        for error in refused:
            assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "queue full" in error.details() and "--max-queue-size 64" in error.details()
        with Client(served.target) as client, pytest.raises(ClientError) as caught:
            client.classify([x[0]] * 65, MODEL)  # could never fit: the client's mistake
        assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert "65 images in one request; at most 64 (--max-queue-size)" in caught.value.message
    finally:
        assert served.stop() == 0


def test_hot_reload_of_a_new_version(private_repo: Path, sample_images):
    served = start_server(private_repo, "--poll-interval-s", "0.2")
    x, _ = sample_images
    try:
        staging = private_repo / MODEL / ".2.partial-test"
        shutil.copytree(private_repo / MODEL / "1", staging)
        staging.rename(private_repo / MODEL / "2")
        served.log.wait_for(r"loaded model 'fashion' version 2", 60)
        with Client(served.target) as client:
            # With front ends, the engine's catalogue reaches them a moment after its log line.
            assert eventually(lambda: client.list_models() == {MODEL: [1, 2]})
            assert client.classify([x[0]], MODEL)[0].version == 2  # newest by default
            assert client.classify([x[0]], MODEL, version=1)[0].version == 1
            shutil.rmtree(private_repo / MODEL / "1")
            served.log.wait_for(r"unloaded model 'fashion' version 1", 60)
            assert eventually(lambda: client.list_models() == {MODEL: [2]})
            # A broken version is logged and skipped; the others keep serving.
            (private_repo / MODEL / "3").mkdir()
            served.log.wait_for(r"skipping model 'fashion' version 3 .*no metadata.json", 60)
            assert client.classify([x[0]], MODEL)[0].version == 2
    finally:
        assert served.stop() == 0


def test_readiness_needs_a_ready_model_and_liveness_does_not(private_repo: Path):
    """Health `""` (the readiness probes) is NOT_SERVING while no model has a ready version,
    and so is V2 ServerReady; `liveness` stays SERVING (the process is fine). Both modes."""
    served = start_server(private_repo, "--poll-interval-s", "0.2")
    try:
        with grpc.insecure_channel(served.target) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            v2_stub = v2_grpc.GRPCInferenceServiceStub(channel)

            def statuses() -> tuple[str, str, str, bool]:
                def check(service: str) -> str:
                    request = health_pb2.HealthCheckRequest(service=service)
                    status = health.Check(request, timeout=10).status
                    return health_pb2.HealthCheckResponse.ServingStatus.Name(status)

                ready = v2_stub.ServerReady(v2.ServerReadyRequest(), timeout=10).ready
                return check(""), check("liveness"), check(MODEL), ready

            assert statuses() == ("SERVING", "SERVING", "SERVING", True)
            shutil.move(private_repo / MODEL / "1", private_repo.parent / "kept")
            served.log.wait_for(r"unloaded model 'fashion' version 1", 60)
            gone = ("NOT_SERVING", "SERVING", "NOT_SERVING", False)
            assert eventually(lambda: statuses() == gone), statuses()
            assert "no model is ready: health '' NOT_SERVING" in served.log.text
            ready = [(s.labels, s.value) for s in scrape(served)["cnn_serving_model_ready"]]
            assert ready == [({"model": MODEL, "version": ""}, 0.0)]  # what the alert reads
            shutil.move(private_repo.parent / "kept", private_repo / MODEL / "1")
            assert eventually(lambda: statuses() == ("SERVING", "SERVING", "SERVING", True))
    finally:
        assert served.stop() == 0


def test_broken_model_is_skipped_at_start(private_repo: Path, sample_images):
    (private_repo / "broken" / "1").mkdir(parents=True)
    served = start_server(private_repo)
    try:
        assert "skipping model 'broken' version 1" in served.log.text
        with Client(served.target) as client:
            assert client.list_models() == {MODEL: [1]}
    finally:
        assert served.stop() == 0


def test_device_cuda_without_gpu_stops_the_server(repository: Path):
    import subprocess
    import sys

    from tests.service.test_runtime import cuda_really_works

    if cuda_really_works(repository):
        pytest.skip("this machine has a working CUDA provider")
    done = subprocess.run(
        [sys.executable, "-m", "service", "serve", "--repository", str(repository),
         "--grpc-port", "0", "--http-port", "0", "--metrics-port", "-1", "--device", "cuda"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 2
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("error: --device cuda: onnxruntime's CUDAExecutionProvider did not")


def wait_for_queue(served: Served, minimum: int, timeout_s: float = 30) -> None:
    """Until the server reports more than `minimum` images waiting in its queue."""
    deadline = time.monotonic() + timeout_s
    labels = {"model": MODEL, "version": "1"}
    while sample(scrape(served), "cnn_serving_queue_depth", "cnn_serving_queue_depth",
                 **labels) <= minimum:  # fmt: skip
        assert time.monotonic() < deadline, "the requests never reached the queue"


def test_sigterm_drains_requests_in_flight(repository: Path, sample_images):
    served = start_server(repository, "--max-batch-size", "1", "--drain-timeout-s", "60",
                          "--max-queue-size", "100000")  # fmt: skip
    x, _ = sample_images
    image = pb.Image(tensor=pb.Tensor(height=28, width=28, channels=1, data=x[0].tobytes()))
    request = pb.ClassifyRequest(model=MODEL, images=[image] * 10_000)

    async def scenario() -> tuple[list, list]:
        async with grpc.aio.insecure_channel(served.target) as channel:
            stub = pb_grpc.ClassifierStub(channel)
            inflight = [asyncio.ensure_future(stub.Classify(request, timeout=120))
                        for _ in range(3)]  # fmt: skip
            # More than 20,000 images queued: all three requests have arrived.
            await asyncio.get_running_loop().run_in_executor(None, wait_for_queue, served, 20_000)
            served.process.send_signal(signal.SIGTERM)
            await asyncio.get_running_loop().run_in_executor(
                None, served.log.wait_for, "draining", 30
            )
            late = []
            try:
                await stub.Classify(request, timeout=10)
            except grpc.aio.AioRpcError as exc:
                late.append(exc.code())
            health = health_pb2_grpc.HealthStub(channel)
            for service in ("", MODEL, "liveness"):  # liveness: a probe must not kill a drain
                check = health_pb2.HealthCheckRequest(service=service)
                late.append((await health.Check(check, timeout=10)).status)
            v2_stub = v2_grpc.GRPCInferenceServiceStub(channel)
            late.append((await v2_stub.ServerLive(v2.ServerLiveRequest(), timeout=10)).live)
            late.append((await v2_stub.ServerReady(v2.ServerReadyRequest(), timeout=10)).ready)
            return await asyncio.gather(*inflight), late

    try:
        answers, late = asyncio.run(scenario())
        assert served.process.wait(60) == 0
    finally:
        if served.process.poll() is None:  # only after a failure above
            served.process.kill()
            served.process.wait()
    assert all(len(a.results) == 10_000 and not a.results[0].HasField("error") for a in answers)
    serving, not_serving = (
        health_pb2.HealthCheckResponse.SERVING,
        health_pb2.HealthCheckResponse.NOT_SERVING,
    )
    assert late == [grpc.StatusCode.UNAVAILABLE, not_serving, not_serving, serving, True, False]
    served.log.wait_for(r"draining: (\d+) RPCs in flight", 1)
    in_flight = re.findall(r"draining: (\d+) RPCs in flight", served.log.text)  # per front end
    assert max(int(n) for n in in_flight) >= 1
