"""The HTTP front door over the wire: tritonclient.http (binary and JSON), the classification
extension on both protocols, the curl commands of the README and docs/, the status of every
error, token and TLS, the body limits, a drain with requests in flight, and a batch shared by
REST and gRPC."""

from __future__ import annotations

import base64
import http.client
import json
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
from PIL import Image

from service._proto.inference import grpc_predict_v2_pb2 as v2
from service._proto.inference import grpc_predict_v2_pb2_grpc as v2_grpc
from tests.conftest import MODEL, ROOT, Served, eventually, png, reference, scrape, start_server
from tests.service.test_images import bomb_png
from tests.service.test_security_and_tools import self_signed

pytestmark = pytest.mark.usefixtures("frontends")  # both server modes


def call(
    served: Served,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
    context: ssl.SSLContext | None = None,
) -> tuple[int, dict[str, str], bytes]:
    """One request on a fresh connection: (status, headers, body)."""
    if context is None:
        connection = http.client.HTTPConnection("127.0.0.1", served.http_port, timeout=60)
    else:
        connection = http.client.HTTPSConnection(
            "127.0.0.1", served.http_port, timeout=60, context=context
        )
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        connection.close()


def v2_json(images: np.ndarray, **extra) -> bytes:
    tensor = {"name": "images", "datatype": "UINT8", "shape": list(images.shape)}
    return json.dumps({"inputs": [{**tensor, "data": images.ravel().tolist()}], **extra}).encode()


def grpc_infer(served: Served, images: np.ndarray, classes: int = 0) -> v2.ModelInferResponse:
    """V2 ModelInfer over gRPC (tritonclient.grpc cannot share this process with our protos:
    tests/service/triton_probe.py runs it on its own)."""
    request = v2.ModelInferRequest(model_name=MODEL)
    request.inputs.add(name="images", datatype="UINT8", shape=list(images.shape))
    request.raw_input_contents.append(images.tobytes())
    if classes:
        request.outputs.add(name="probabilities").parameters["classification"].int64_param = classes
    with grpc.insecure_channel(served.target) as channel:
        return v2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=60)


def test_tritonclient_http_answers_like_grpc_and_onnxruntime(
    server: Served, repository: Path, sample_images
):
    import tritonclient.http as th

    x = sample_images[0][:6]
    want = reference(repository, x)
    client = th.InferenceServerClient(server.http)
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready(MODEL)
    metadata = client.get_model_metadata(MODEL)
    assert metadata["inputs"][0] == {
        "name": "images",
        "datatype": "UINT8",
        "shape": [-1, 28, 28, 1],
    }
    assert client.get_model_config(MODEL)["max_batch_size"] == 64
    answers = {}
    for binary in (True, False):
        tensor = th.InferInput("images", list(x.shape), "UINT8")
        tensor.set_data_from_numpy(x, binary_data=binary)
        outputs = [th.InferRequestedOutput(n, binary_data=binary) for n in want]
        result = client.infer(MODEL, [tensor], outputs=outputs, request_id="r7")
        assert result.get_response()["id"] == "r7"
        answers[binary] = {n: result.as_numpy(n) for n in want}
    over_grpc = grpc_infer(server, x)
    for i, name in enumerate(want):
        from_grpc = np.frombuffer(over_grpc.raw_output_contents[i], "<f4").reshape(len(x), -1)
        for got in (answers[True][name], answers[False][name], from_grpc):
            np.testing.assert_allclose(got, want[name], atol=1e-6)
        np.testing.assert_array_equal(answers[True][name], from_grpc)  # the same bits


def test_compressed_bodies_and_the_server_wide_statistics(server: Served, sample_images):
    import tritonclient.http as th

    x = sample_images[0][:2]
    client = th.InferenceServerClient(server.http)
    tensor = th.InferInput("images", list(x.shape), "UINT8")
    tensor.set_data_from_numpy(x)
    plain = client.infer(MODEL, [tensor]).as_numpy("probabilities")
    for algorithm in ("gzip", "deflate"):
        packed = client.infer(MODEL, [tensor], request_compression_algorithm=algorithm)
        np.testing.assert_array_equal(packed.as_numpy("probabilities"), plain)
    # GET /v2/models/stats (every model), what get_inference_statistics() asks with no name
    stats = client.get_inference_statistics()
    assert [s["name"] for s in stats["model_stats"]] == [MODEL]


def test_encoded_files_as_binary_bytes_and_as_base64_json(
    server: Served, repository, sample_images
):
    import tritonclient.http as th

    x = sample_images[0][:3]
    files = np.array([png(image) for image in x], dtype=np.object_)
    tensor = th.InferInput("images", [3], "BYTES")
    tensor.set_data_from_numpy(files, binary_data=True)
    got = th.InferenceServerClient(server.http).infer(MODEL, [tensor]).as_numpy("probabilities")
    np.testing.assert_allclose(got, reference(repository, x)["probabilities"], atol=1e-6)
    data = [base64.b64encode(f).decode() for f in files]
    body = json.dumps(
        {"inputs": [{"name": "images", "datatype": "BYTES", "shape": [3], "data": data}]}
    )
    status, headers, answer = call(server, "POST", f"/v2/models/{MODEL}/infer", body.encode())
    assert status == 200 and headers["content-type"] == "application/json"
    outputs = {o["name"]: o for o in json.loads(answer)["outputs"]}
    np.testing.assert_allclose(
        np.array(outputs["probabilities"]["data"]).reshape(3, 10), got, atol=1e-6
    )


def test_classification_extension_over_http_and_grpc(server: Served, repository, sample_images):
    import tritonclient.http as th

    from service.servicers.v2_codec import unpack_bytes

    x = sample_images[0][:4]
    scores = reference(repository, x)["probabilities"]
    labels = json.loads(call(server, "GET", f"/v1/models/{MODEL}")[2])["labels"]
    expected = [
        [f"{scores[row, i]:f}:{i}:{labels[i]}" for i in np.argsort(-scores[row], kind="stable")[:3]]
        for row in range(4)
    ]
    http_client = th.InferenceServerClient(server.http)
    for binary in (True, False):
        tensor = th.InferInput("images", list(x.shape), "UINT8")
        tensor.set_data_from_numpy(x)
        wanted = [th.InferRequestedOutput("probabilities", binary_data=binary, class_count=3)]
        got = http_client.infer(MODEL, [tensor], outputs=wanted).as_numpy("probabilities")
        assert got.shape == (4, 3)
        assert [[_text(v) for v in row] for row in got] == expected
    answer = grpc_infer(server, x, classes=3)  # tritonclient.grpc: tests/service/test_triton.py
    assert answer.outputs[0].datatype == "BYTES" and list(answer.outputs[0].shape) == [4, 3]
    items = [v.decode() for v in unpack_bytes(answer.raw_output_contents[0], 12, "")]
    assert [items[i : i + 3] for i in range(0, 12, 3)] == expected
    # more classes than the model has: every class, ranked (as Triton answers)
    assert list(grpc_infer(server, x, classes=50).outputs[0].shape) == [4, 10]


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


CURL = shutil.which("curl")


def curl_commands(path: Path) -> list[str]:
    return re.findall(r"^(curl [^\n]*:classify[^\n]*)$", path.read_text(), flags=re.M)


@pytest.mark.skipif(CURL is None, reason="curl is not installed")
def test_the_documented_curl_commands(server: Served, tmp_path: Path, sample_images):
    assert len(curl_commands(ROOT / "README.md")) >= 2, "the README's quick start shows them"
    documents = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    commands = sorted({c for document in documents for c in curl_commands(document)})
    (tmp_path / "shoe.png").write_bytes(png(sample_images[0][0]))
    for command in commands:
        line = command.replace("localhost:8000", server.http)
        done = subprocess.run(
            ["bash", "-c", f"{line} --fail-with-body -sS"],
            cwd=tmp_path, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert done.returncode == 0, (command, done.stderr, done.stdout)
        answer = json.loads(done.stdout)
        result = answer["results"][0]
        assert answer["model"] == MODEL and result["label"] and "error" not in result
        assert set(result["bottleneck"]) == {"x", "y"} and len(result["probabilities"]) == 10


def test_classify_takes_forms_json_and_reports_each_image(server: Served, sample_images):
    x = sample_images[0][:2]
    boundary = "cnnserving"
    parts = []
    for name, data in (("a.png", png(x[0])), ("bad.png", b"<html>"), ("b.png", png(x[1]))):
        parts.append(
            f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{name}"\r\n'
            f"Content-Type: image/png\r\n\r\n".encode()
            + data
            + b"\r\n"
        )
    parts.append(
        f'--{boundary}\r\nContent-Disposition: form-data; name="top_k"\r\n\r\n2\r\n'.encode()
    )
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    headers = {"Content-Type": f"multipart/form-data; boundary={boundary}"}
    status, _, answer = call(server, "POST", f"/v1/models/{MODEL}:classify", body, headers)
    results = json.loads(answer)["results"]
    assert status == 200 and [r["id"] for r in results] == ["a.png", "bad.png", "b.png"]
    assert len(results[0]["top_k"]) == 2 and results[1]["error"]["code"] == "INVALID_ARGUMENT"
    assert "image 1: not a readable image" in results[1]["error"]["message"]
    document = {"images": [{"b64": base64.b64encode(png(x[0])).decode(), "id": "one"}], "top_k": 1}
    status, _, answer = call(
        server, "POST", f"/v1/models/{MODEL}/versions/1:classify", json.dumps(document).encode(),
        {"Content-Type": "application/json"},
    )  # fmt: skip
    result = json.loads(answer)["results"][0]
    assert status == 200 and result["id"] == "one" and len(result["top_k"]) == 1
    assert result["label"] == results[0]["label"]
    status, _, answer = call(server, "GET", "/v1/models")
    assert json.loads(answer) == {
        "models": [{"name": MODEL, "versions": [1], "default_version": 1}]
    }


INFER = f"/v2/models/{MODEL}/infer"
PIXELS = np.zeros((1, 28, 28, 1), np.uint8)


@pytest.mark.parametrize(
    ("method", "path", "body", "headers", "status", "message"),
    [
        ("POST", "/v2/models/nope/infer", v2_json(PIXELS), {}, 404, "model 'nope' is not loaded"),
        ("POST", f"/v2/models/{MODEL}/versions/9/infer", v2_json(PIXELS), {}, 404, "no version 9"),
        ("GET", "/v2/models/nope/ready", None, {}, 404, "model 'nope' is not loaded"),
        ("GET", "/nowhere", None, {}, 404, "GET /nowhere: Not Found"),
        ("GET", INFER, None, {}, 405, "Method Not Allowed"),
        ("GET", "/v2/models/stats/ready", None, {}, 404, "model 'stats' is not loaded"),
        ("POST", INFER, b"{", {}, 400, "the body is not valid JSON"),
        ("POST", INFER, b"[1]", {}, 400, "the body must be a JSON object"),
        ("POST", INFER, v2_json(np.zeros((1, 28, 28, 3), np.uint8)), {}, 400,
         "UINT8 input shape must be [N, 28, 28, 1], got [1, 28, 28, 3]"),
        ("POST", INFER, json.dumps({"inputs": [{"name": "images", "datatype": "UINT8",
         "shape": [1, 28, 28, 1], "data": [300] * 784}]}).encode(), {}, 400, "outside 0-255"),
        ("POST", INFER, json.dumps({"inputs": [{"name": "images", "datatype": "BYTES",
         "shape": [1], "data": ["aGk="]}]}).encode(), {}, 400, "image 0: not a readable image"),
        ("POST", INFER, v2_json(PIXELS, parameters={"timeout": 1}), {}, 504, "deadline passed"),
        ("POST", INFER, b"a,b", {"Content-Type": "text/csv"}, 400, "not valid JSON"),
        ("POST", INFER, v2_json(PIXELS), {"Content-Type": "image/png"}, 415,
         "images go to /v1/models/{model}:classify"),
        ("POST", INFER, v2_json(PIXELS), {"Content-Encoding": "br"}, 415, "Content-Encoding"),
        ("POST", INFER, v2_json(PIXELS), {"Content-Encoding": "gzip"}, 400,
         "cannot be decompressed"),
        ("POST", INFER, v2_json(PIXELS), {"Inference-Header-Content-Length": "\u00b2"}, 400,
         "is not a length"),
        ("POST", INFER, v2_json(PIXELS), {"Inference-Header-Content-Length": "9" * 5000}, 400,
         "is not a length"),
        ("POST", f"/v1/models/{MODEL}:classify?top_k=%C2%B2", b"x", {"Content-Type": "image/png"},
         400, "top_k must be an integer"),
        ("POST", f"/v1/models/{MODEL}:classify?top_k={'9' * 5000}", b"x",
         {"Content-Type": "image/png"}, 400, "top_k must be an integer"),
        ("POST", f"/v1/models/{MODEL}:classify", b"x", {"Content-Type": "text/plain"}, 415,
         "send an image"),
        ("POST", f"/v1/models/{MODEL}:classify?top_k=0", b"x", {"Content-Type": "image/png"},
         400, "top_k must be an integer from 1 to 1000"),
    ],
)  # fmt: skip
def test_each_error_has_its_status_and_message(
    server: Served, method, path, body, headers, status, message
):
    headers = {k: v.encode("utf-8").decode("latin-1") for k, v in headers.items()}  # raw bytes
    got, response_headers, answer = call(server, method, path, body, headers)
    assert got == status, answer
    assert response_headers["content-type"] == "application/json"
    assert message in json.loads(answer)["error"]
    if status == 405:
        assert response_headers["allow"] == "POST"
    assert "internal error" not in server.log.text


def test_decode_budget_is_429(repository: Path):
    served = start_server(repository, "--decode-budget-mib", "1")
    try:
        big = png(np.zeros((2000, 2000, 1), np.uint8))  # 4 MB of pixels to decode
        body = json.dumps({"inputs": [{"name": "images", "datatype": "BYTES", "shape": [1],
                           "data": [base64.b64encode(big).decode()]}]}).encode()  # fmt: skip
        status, _, answer = call(served, "POST", INFER, body)
        assert status == 429 and "--decode-budget-mib" in json.loads(answer)["error"]
    finally:
        assert served.stop() == 0


@pytest.fixture(scope="module")
def guarded(repository: Path, tmp_path_factory, frontends: str):
    """A server with TLS, a token, a 64 KiB body limit and a 1 s body timeout."""
    folder = tmp_path_factory.mktemp("guarded")
    cert, key = self_signed(folder)
    (folder / "token").write_text("s3cret\n")
    served = start_server(
        repository, "--tls-cert", str(cert), "--tls-key", str(key),
        "--auth-token-file", str(folder / "token"), "--max-message-bytes", "65536",
        "--http-body-timeout-s", "1",
    )  # fmt: skip
    context = ssl.create_default_context(cafile=str(cert))
    yield served, context
    assert served.stop() == 0


TOKEN = {"Authorization": "Bearer s3cret"}


def test_token_and_tls_over_http(guarded, sample_images):
    served, context = guarded
    body = v2_json(sample_images[0][:1])
    status, headers, answer = call(served, "POST", INFER, body, {}, context)
    assert status == 401 and "bearer token" in json.loads(answer)["error"]
    assert headers["www-authenticate"].startswith("Bearer")
    status, _, _ = call(served, "POST", INFER, body, {"Authorization": "Bearer wrong"}, context)
    assert status == 401
    status, _, answer = call(served, "POST", INFER, body, TOKEN, context)
    assert status == 200 and json.loads(answer)["outputs"][0]["shape"] == [1, 10]
    # the probes need no token, and plain HTTP is not answered on the TLS port
    assert call(served, "GET", "/v2/health/ready", None, {}, context)[0] == 200
    with pytest.raises((http.client.HTTPException, ConnectionError)):
        call(served, "GET", "/v2/health/ready")


def test_a_body_over_the_limit_is_413_and_not_read(guarded):
    served, context = guarded
    big = b"{" + b" " * 100_000 + b"}"
    status, headers, answer = call(served, "POST", INFER, big, TOKEN, context)
    assert status == 413 and "over the limit of 65,536 bytes" in json.loads(answer)["error"]
    assert headers["connection"] == "close"
    # a chunked body (no Content-Length) is cut off as it passes the limit
    raw = socket.create_connection(("127.0.0.1", served.http_port), timeout=30)
    with context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
        tls.sendall(
            f"POST {INFER} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer s3cret\r\n"
            "Transfer-Encoding: chunked\r\n\r\n".encode()
        )
        chunk = b"x" * 16384
        for _ in range(6):
            tls.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        answer = tls.recv(65536)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:100]


def test_an_early_413_reaches_a_client_that_is_still_sending(server: Served):
    # Answered from Content-Length before the body is read; the client goes on sending 8 MB
    # (more than the sockets' buffers hold) and only then reads. Without a lingering close the
    # server's close would reset the connection under it and the 413 would be lost.
    with socket.create_connection(("127.0.0.1", server.http_port), timeout=30) as raw:
        raw.sendall(f"POST {INFER} HTTP/1.1\r\nHost: x\r\nContent-Length: 100000000\r\n"
                    "\r\n".encode())  # fmt: skip
        raw.sendall(b" " * 8_000_000)
        answer = b""
        while chunk := raw.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 413"), answer[:100]
    assert b"connection: close" in answer.lower()


def test_heads_are_bounded_in_size_and_time(guarded):
    served, context = guarded
    # model readiness tells which models exist: it needs the token, as gRPC ModelReady does
    assert call(served, "GET", f"/v2/models/{MODEL}/ready", None, {}, context)[0] == 401
    assert call(served, "GET", f"/v2/models/{MODEL}/ready", None, TOKEN, context)[0] == 200
    huge = {f"X-Filler-{i}": "y" * 1000 for i in range(100)}  # 100 KB of headers
    status, _, _ = call(served, "GET", "/v2/health/ready", None, huge, context)
    assert status == 400
    raw = socket.create_connection(("127.0.0.1", served.http_port), timeout=30)
    started = time.monotonic()
    with context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
        tls.sendall(b"GET /v2/health/ready HTTP/1.1\r\nHost: x\r\n")
        tls.settimeout(0.2)
        answer = b""
        while time.monotonic() - started < 20:
            try:
                chunk = tls.recv(65536)
            except TimeoutError:
                tls.sendall(b"X-Slow: 1\r\n")  # a header now and then, never the end
                continue
            if not chunk:
                break
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert b"request head did not arrive in time" in answer


def test_a_compressed_bomb_is_413(guarded):
    import gzip

    served, context = guarded
    bomb = gzip.compress(b"{" + b" " * 10_000_000 + b"}")  # 10 MB in about 10 KB
    headers = {**TOKEN, "Content-Encoding": "gzip"}
    status, _, answer = call(served, "POST", INFER, bomb, headers, context)
    assert status == 413 and "inflates past the limit" in json.loads(answer)["error"]


def test_bodies_held_at_once_are_bounded(repository: Path):
    served = start_server(repository, "--http-body-budget-mib", "1")
    try:
        raw = socket.create_connection(("127.0.0.1", served.http_port), timeout=30)
        with raw:
            # one body of 800 KB on its way (half sent) holds 800 KB of the 1 MiB budget
            raw.sendall(
                f"POST {INFER} HTTP/1.1\r\nHost: x\r\nContent-Length: 800000\r\n\r\n".encode()
                + b" " * 400_000
            )

            answers = []

            def busy() -> bool:  # with front ends, once a connection lands where it is held
                answers.append(call(served, "POST", INFER, b" " * 400_000))
                return answers[-1][0] == 429

            assert eventually(busy, 20)  # a second one does not fit beside it now
            _, headers, answer = answers[-1]
            assert headers["retry-after"] == "1"
            assert "--http-body-budget-mib" in json.loads(answer)["error"]
            status, _, answer = call(served, "POST", INFER, b" " * 2_000_000)
            assert status == 413 and "more than the whole" in json.loads(answer)["error"]
        # the first client gave up: its bytes are released, and it is no server error
        assert eventually(lambda: call(served, "POST", INFER, b"{}")[0] == 400, 20)
        assert "internal error" not in served.log.text
    finally:
        assert served.stop() == 0


def test_a_slow_body_is_408(guarded):
    served, context = guarded
    raw = socket.create_connection(("127.0.0.1", served.http_port), timeout=30)
    started = time.monotonic()
    with context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
        tls.sendall(
            f"POST {INFER} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer s3cret\r\n"
            "Content-Length: 1000\r\n\r\n{".encode()
        )
        tls.settimeout(0.2)
        answer = b""
        while not answer and time.monotonic() - started < 20:
            try:
                answer = tls.recv(65536)
            except TimeoutError:
                tls.sendall(b" ")  # a byte now and then: never done, never idle
        tls.settimeout(10)
        while chunk := tls.recv(65536):  # the server closes the connection after its answer
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert b"did not arrive within 1 s" in answer


def test_rest_and_grpc_requests_share_a_batch(repository: Path, sample_images):
    served = start_server(repository, "--max-batch-size", "2", "--max-queue-delay-ms", "3000")
    x = sample_images[0][:2]
    try:
        request = v2.ModelInferRequest(model_name=MODEL)
        request.inputs.add(name="images", datatype="UINT8", shape=[1, 28, 28, 1])
        request.raw_input_contents.append(x[1:2].tobytes())
        with grpc.insecure_channel(served.target) as channel, ThreadPoolExecutor(2) as pool:
            stub = v2_grpc.GRPCInferenceServiceStub(channel)
            over_grpc = pool.submit(stub.ModelInfer, request, timeout=60)
            over_http = pool.submit(call, served, "POST", INFER, v2_json(x[:1]))
            started = time.monotonic()
            assert over_http.result()[0] == 200 and over_grpc.result().outputs
            # the batch was full (2 images) long before its 3 s window closed
            assert time.monotonic() - started < 2.5
        status, _, answer = call(served, "GET", f"/v2/models/{MODEL}/stats")
        stats = json.loads(answer)["model_stats"][0]
        assert (stats["inference_count"], stats["execution_count"]) == (2, 1)
        batches = stats["batch_stats"]
        assert [(b["batch_size"], b["compute_infer"]["count"]) for b in batches] == [(2, 1)]
        assert batches[0]["compute_input"]["count"] == batches[0]["compute_output"]["count"] == 1
        # Triton's meaning: each of the two requests counts once in every part (perf_analyzer
        # stops when these differ), with the batch's whole duration
        parts = stats["inference_stats"]
        counts = {p: parts[p]["count"] for p in ("queue", "compute_input", "compute_infer",
                                                  "compute_output")}  # fmt: skip
        assert counts == dict.fromkeys(counts, 2)
        assert parts["compute_infer"]["ns"] == 2 * batches[0]["compute_infer"]["ns"]
        counted = scrape(served)["cnn_serving_requests"]
        apis = {s.labels["api"] for s in counted if s.name.endswith("_total") and s.value}
        assert {"http.v2", "inference.v2"} <= apis
    finally:
        assert served.stop() == 0


def test_drain_over_http_finishes_requests_in_flight(repository: Path, sample_images):
    served = start_server(repository, "--max-queue-delay-ms", "1500", "--max-batch-size", "64")
    body = v2_json(sample_images[0][:1])
    with ThreadPoolExecutor(8) as pool:
        flying = [pool.submit(call, served, "POST", INFER, body) for _ in range(8)]

        def queued() -> bool:
            depth = scrape(served).get("cnn_serving_queue_depth", [])
            return sum(s.value for s in depth) >= 8

        assert eventually(queued, 20), "the requests never queued"
        served.process.send_signal(signal.SIGTERM)
        late = []

        def refused() -> bool:
            try:
                late.append(call(served, "GET", "/v2/health/ready")[0])
            except OSError:
                late.append("closed")
            return late[-1] != 200

        assert eventually(refused, 10)
        answers = [f.result() for f in flying]
    assert [a[0] for a in answers] == [200] * 8
    assert late[-1] in (503, "closed")
    assert served.process.wait(30) == 0


HOSTILE = [
    ("malformed JSON", INFER, b'{"inputs": [', "application/json"),
    ("10 million elements", INFER,
     b'{"inputs": [{"name": "images", "datatype": "UINT8", "shape": [1], "data": ['
     + b"0," * 10_000_000 + b"0]}]}", "application/json"),
    ("nested 100,000 deep", INFER, b"[" * 100_000 + b"]" * 100_000, "application/json"),
    ("an image to the infer endpoint", INFER, b"\x89PNG", "image/png"),
    ("JSON to classify, not an object", f"/v1/models/{MODEL}:classify", b"[[[[1]]]]",
     "application/json"),
    ("10,000 multipart parts", f"/v1/models/{MODEL}:classify",
     b"".join(b'--b\r\nContent-Disposition: form-data; name="image"; filename="f"\r\n\r\nx\r\n'
              for _ in range(10_000)) + b"--b--\r\n", "multipart/form-data; boundary=b"),
    ("a form without its boundary", f"/v1/models/{MODEL}:classify", b"--b--",
     "multipart/form-data"),
]  # fmt: skip


def test_hostile_bodies_get_4xx_and_do_not_stall_others(server: Served):
    probes: list[float] = []
    stop = threading.Event()

    def probe() -> None:
        connection = http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=30)
        try:
            while not stop.is_set():
                started = time.monotonic()
                connection.request("GET", "/v2/health/ready")
                assert connection.getresponse().read()
                probes.append(time.monotonic() - started)
        finally:
            connection.close()

    prober = threading.Thread(target=probe, daemon=True)
    prober.start()
    try:
        for what, path, body, content_type in HOSTILE:
            status, _, answer = call(server, "POST", path, body, {"Content-Type": content_type})
            assert 400 <= status < 500, (what, status, answer[:200])
            assert json.loads(answer)["error"], what
    finally:
        stop.set()
        prober.join(30)
    assert probes and max(probes) < 1.0, max(probes)
    assert sum(p > 0.1 for p in probes) <= 0.05 * len(probes)


def test_docs_and_openapi_are_served_from_the_package(server: Served):
    status, _, page = call(server, "GET", "/docs")
    assert status == 200 and b"/static/swagger-ui/swagger-ui-bundle.js" in page
    assert b"cdn" not in page.lower()
    status, headers, script = call(server, "GET", "/static/swagger-ui/swagger-ui-bundle.js")
    assert status == 200 and len(script) > 100_000
    schema = json.loads(call(server, "GET", "/openapi.json")[2])
    assert "/v2/models/{name}/infer" in schema["paths"]
    assert "/v1/models/{name}:classify" in schema["paths"]


def test_bomb_over_http_is_refused_like_grpc(server: Served):
    body = bomb_png(20_000, 20_000)
    status, _, answer = call(
        server, "POST", f"/v1/models/{MODEL}:classify", body, {"Content-Type": "image/png"}
    )
    assert status == 200
    assert "exceeds" in json.loads(answer)["results"][0]["error"]["message"]


def test_the_bottleneck_map_over_http_and_grpc(server: Served, repository: Path):
    from service.client import Client

    on_disk = json.loads((repository / MODEL / "1" / "bottleneck_map.json").read_text())
    status, _, answer = call(server, "GET", f"/v1/models/{MODEL}/map")
    assert status == 200 and json.loads(answer) == on_disk
    described = json.loads(call(server, "GET", f"/v1/models/{MODEL}")[2])
    assert described["map"] == f"/v1/models/{MODEL}/versions/1/map"
    with Client(server.target) as client:
        info = client.get_model(MODEL)
    found = info.bottleneck_map
    assert found is not None and info.map_absent_reason == ""
    assert len(found.x) == len(on_disk["points"]["x"]) and found.label == tuple(
        on_disk["points"]["label"]
    )
    assert [c.label for c in found.centroids] == [c["label"] for c in on_disk["centroids"]]
    assert found.source.startswith("fashion-mnist test set")


def test_a_version_without_a_map_still_serves(private_repo: Path, sample_images, tmp_path: Path):
    from service.client import Client

    old = private_repo / MODEL / "2"
    shutil.copytree(private_repo / MODEL / "1", old)
    (old / "bottleneck_map.json").unlink()
    metadata = json.loads((old / "metadata.json").read_text())
    del metadata["bottleneck_map"]  # as exported before maps existed
    metadata["version"] = 2
    (old / "metadata.json").write_text(json.dumps(metadata))
    served = start_server(private_repo)
    try:
        status, _, answer = call(served, "GET", f"/v1/models/{MODEL}/map")
        assert status == 404 and "exported before bottleneck maps existed" in answer.decode()
        assert json.loads(call(served, "GET", f"/v1/models/{MODEL}")[2])["map"] is None
        assert call(served, "GET", f"/v1/models/{MODEL}/versions/1/map")[0] == 200
        with Client(served.target) as client:
            info = client.get_model(MODEL)
            assert info.version == 2 and info.bottleneck_map is None
            assert "re-export" in info.map_absent_reason
            assert client.classify([png(sample_images[0][0])], MODEL)[0].ok
        shoe = tmp_path / "shoe.png"
        shoe.write_bytes(png(sample_images[0][0]))
        for mode in (("--server", served.target), ("--repository", str(private_repo))):
            plot = tmp_path / f"plot{mode[0]}.png"
            done = subprocess.run(
                [sys.executable, "-m", "service", "classify", *mode, "--model", MODEL,
                 "--version", "1", "--plot", str(plot), str(shoe)],
                cwd=ROOT, capture_output=True, text=True, timeout=120,
            )  # fmt: skip
            assert done.returncode == 0, done.stderr
            assert f"plot: {plot}" in done.stderr
            with Image.open(plot) as picture:
                assert picture.format == "PNG" and picture.size[0] > 400
    finally:
        assert served.stop() == 0


def test_http_connections_have_nagle_off():
    """An answer written in two pieces (head, body) must not wait for the client's delayed
    ACK (40 ms per keep-alive request, measured before this): accepted sockets are NODELAY."""
    import asyncio

    from service.rest.app import listen

    async def check() -> int:
        sock = listen("127.0.0.1", 0, shared=False)
        accepted = asyncio.get_running_loop().create_future()

        def connected(reader, writer) -> None:
            raw = writer.get_extra_info("socket")
            accepted.set_result(raw.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            writer.close()

        server = await asyncio.start_server(connected, sock=sock)
        _, writer = await asyncio.open_connection(*sock.getsockname()[:2])
        try:
            return await asyncio.wait_for(accepted, 10)
        finally:
            writer.close()
            server.close()
            await server.wait_closed()

    assert asyncio.run(check()) != 0


def test_both_event_loops_serve_alike(server: Served, repository: Path, sample_images):
    images = sample_images[0][:3]
    expected = reference(repository, images)["probabilities"]
    standard = start_server(repository, env={"CNN_SERVING_EVENT_LOOP": "asyncio"})
    try:
        for served, loop in ((server, "uvloop"), (standard, "asyncio")):
            served.log.wait_for(f"event loop: {loop}", 5)  # every process says which
            assert f"event loop: {'asyncio' if loop == 'uvloop' else 'uvloop'}" not in (
                served.log.text
            )
            body = json.dumps(
                {"inputs": [{"name": "images", "datatype": "UINT8", "shape": list(images.shape),
                             "data": images.ravel().tolist()}]}
            ).encode()  # fmt: skip
            status, _, answer = call(served, "POST", INFER, body)
            assert status == 200, answer
            outputs = {o["name"]: o["data"] for o in json.loads(answer)["outputs"]}
            np.testing.assert_allclose(
                np.reshape(outputs["probabilities"], (3, -1)), expected, atol=1e-5
            )
            over_grpc = grpc_infer(served, images)
            np.testing.assert_allclose(
                np.frombuffer(over_grpc.raw_output_contents[0], "<f4").reshape(3, -1),
                expected,
                atol=1e-5,
            )
    finally:
        standard.process.terminate()
        assert standard.process.wait(60) == 0
