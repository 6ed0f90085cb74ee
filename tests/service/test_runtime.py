"""onnxruntime sessions on real exported models: the device policy is never silent."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from service.errors import ConfigError, ModelLoadError
from service.repository import read_spec, scan
from service.runtime import CPU, CUDA, Runtime, Session
from tests.conftest import MODEL, ROOT, png, reference


def cuda_really_works(repo: Path) -> bool:
    spec = read_spec(repo, MODEL, 1)
    return CUDA in Session(spec, [CUDA, CPU]).providers


def test_cpu_session_answers_like_onnxruntime(repository: Path, sample_images) -> None:
    session = Runtime("cpu").session(read_spec(repository, MODEL, 1))
    assert session.providers == (CPU,)
    x, _ = sample_images
    out = session.run(x)
    want = reference(repository, x)
    np.testing.assert_array_equal(out["probabilities"], want["probabilities"])
    np.testing.assert_array_equal(out["bottleneck"], want["bottleneck"])


def test_io_binding_gives_the_same_answers(repository: Path, sample_images) -> None:
    spec = read_spec(repository, MODEL, 1)
    plain = Session(spec, [CPU])
    bound = Session(spec, [CPU], io_binding=True)
    x, _ = sample_images
    for size in (1, 7, 32):
        a, b = plain.run(x[:size]), bound.run(x[:size])
        np.testing.assert_array_equal(a["probabilities"], b["probabilities"])
        np.testing.assert_array_equal(a["bottleneck"], b["bottleneck"])


def test_device_cuda_without_a_gpu_is_an_error(repository: Path) -> None:
    if cuda_really_works(repository):
        pytest.skip("this machine has a working CUDA provider")
    assert CUDA in ort.get_available_providers()  # the trap: "available" is not "works"
    with pytest.raises(ConfigError, match="--device cuda: onnxruntime's CUDAExecutionProvider"):
        Runtime("cuda").session(read_spec(repository, MODEL, 1))


def test_device_auto_says_it_runs_on_the_cpu(repository: Path, caplog) -> None:
    if cuda_really_works(repository):
        pytest.skip("this machine has a working CUDA provider")
    runtime = Runtime("auto")
    with caplog.at_level(logging.WARNING, logger="service.runtime"):
        session = runtime.session(read_spec(repository, MODEL, 1))
    assert session.providers == (CPU,) and not session.on_cuda
    assert "running on the CPU" in caplog.text
    assert runtime.providers() == [CPU]  # later sessions do not try CUDA again


@pytest.mark.parametrize(("device", "status", "line"), [
    ("auto", 0, "--device auto: CUDA is not usable here"),
    ("cuda", 2, "error: --device cuda: onnxruntime's CUDAExecutionProvider did not load"),
])  # fmt: skip
def test_a_cpu_only_machine_says_it_in_one_line(repository: Path, tmp_path: Path, device,
                                                status, line) -> None:  # fmt: skip
    """Our one line, and not onnxruntime's two coloured provider-bridge lines."""
    if cuda_really_works(repository):
        pytest.skip("this machine has a working CUDA provider")
    image = tmp_path / "x.png"
    image.write_bytes(png(np.zeros((28, 28, 1), np.uint8)))
    done = subprocess.run(
        [sys.executable, "-m", "service", "classify", "--repository", str(repository),
         "--model", MODEL, "--device", device, str(image)],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == status, done.stderr
    assert done.stderr.splitlines() == [next(x for x in done.stderr.splitlines() if line in x)]
    assert "onnxruntime:" not in done.stderr and "\x1b[" not in done.stderr


def test_scan_ignores_staging_and_non_numeric_folders(private_repo: Path) -> None:
    (private_repo / MODEL / ".2.partial-123").mkdir()
    (private_repo / MODEL / "latest").mkdir()
    (private_repo / MODEL / "\u00b3").mkdir()  # "³".isdigit() is True; int("³") fails
    (private_repo / MODEL / "01").mkdir()
    (private_repo / ".hidden" / "1").mkdir(parents=True)
    (private_repo / "empty").mkdir()  # a model without versions (yet): listed, with none
    assert scan(private_repo) == {MODEL: [1], "empty": []}


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda v: (v / "metadata.json").unlink(), "no metadata.json"),
        (lambda v: (v / "metadata.json").write_text("{"), "unreadable metadata.json"),
        (lambda v: (v / "model.onnx").unlink(), "no model.onnx"),
        (lambda v: (v / "model.onnx").write_bytes(b"not onnx"), "onnxruntime cannot load"),
        (
            lambda v: (v / "metadata.json").write_text(
                json.dumps(
                    json.loads((v / "metadata.json").read_text())
                    | {"input": {"name": "images", "height": 32, "width": 32, "channels": 1}}
                )
            ),
            "metadata.json says uint8",
        ),
    ],
)
def test_broken_versions_fail_with_the_reason(private_repo: Path, damage, message) -> None:
    version = private_repo / MODEL / "2"
    shutil.copytree(private_repo / MODEL / "1", version)
    damage(version)
    with pytest.raises(ModelLoadError, match=f"model 'fashion' version 2.*{message}"):
        Runtime("cpu").session(read_spec(private_repo, MODEL, 2))
