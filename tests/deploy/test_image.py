"""The serving image, checked without Docker: hadolint, what the Dockerfile says it runs (parsed
and fed to the real CLI), its CUDA base against the installed onnxruntime-gpu, its build
context, and a fresh virtual environment with only the `serve` extra serving a model."""

from __future__ import annotations

import importlib.metadata
import json
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest

from service.__main__ import build_parser, serve_config
from service.client import Client
from tests.conftest import MODEL, ROOT, png, reference, start_server
from tests.deploy.conftest import (
    DOCKERFILE,
    Instruction,
    docker_context,
    dockerfile_stages,
    run_tool,
    stage_env,
    venv_tool,
)

# Packages of the train extra and our own non-serving code: none may be importable where only
# the `serve` extra is installed.
NOT_SERVING = ("tensorflow", "keras", "tf2onnx", "onnx", "training", "export")


def final_stage() -> list[Instruction]:
    return dockerfile_stages()[-1]


def only(stage: list[Instruction], keyword: str) -> Instruction:
    found = [i for i in stage if i.keyword == keyword]
    assert len(found) == 1, f"expected one {keyword} in the final stage, found {len(found)}"
    return found[0]


def test_hadolint_reports_nothing():
    result = run_tool(venv_tool("hadolint"), DOCKERFILE)
    assert (result.returncode, result.stdout + result.stderr) == (0, "")
    # The one exemption, explained beside it: apt packages follow the base image's tag.
    ignored = re.findall(r"# hadolint ignore=(\S+)", DOCKERFILE.read_text(encoding="utf-8"))
    assert set(ignored) == {"DL3008"}


def test_final_stage_is_the_cuda_runtime_that_onnxruntime_gpu_needs():
    from onnxruntime.capi import build_and_package_info

    stages = dockerfile_stages()
    assert len(stages) >= 2, "multi-stage: build tools stay out of the serving image"
    base = stages[-1][0].value
    match = re.fullmatch(r"nvidia/cuda:(\d+)\.\d+\.\d+-cudnn-runtime-ubuntu[\d.]+", base)
    assert match, f"final stage {base!r}: not an official CUDA runtime image with cuDNN"
    assert match.group(1) == build_and_package_info.cuda_version.split(".")[0]
    # The CUDA libraries come from the base image, so not the NVIDIA wheels as well.
    requires = importlib.metadata.requires("onnxruntime-gpu") or []
    cudnn = next(r for r in requires if r.startswith("nvidia-cudnn-cu"))
    assert re.match(rf"nvidia-cudnn-cu{match.group(1)}~=9\b", cudnn), cudnn  # CUDA 13 image: 9
    serve = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert not [r for r in serve["optional-dependencies"]["serve"] if "[cuda" in r]


def test_image_runs_the_gpu_server_as_a_non_root_user(monkeypatch):
    stage = final_stage()
    user = only(stage, "USER").value.split(":")[0]
    assert user.isdigit() and int(user) != 0, "a numeric non-root UID (runAsNonRoot checks it)"
    defaults = build_parser().parse_args(["serve", "--repository", "x"])
    exposed = {int(port) for port in only(stage, "EXPOSE").value.split()}
    assert exposed == {defaults.http_port, defaults.grpc_port, defaults.metrics_port}

    command = only(stage, "ENTRYPOINT").exec_form + only(stage, "CMD").exec_form
    assert command[:3] == ["python", "-m", "service"]
    for name, value in stage_env(stage).items():
        monkeypatch.setenv(name, value)
    config = serve_config(build_parser().parse_args(command[3:]))
    assert (str(config.repository), config.device) == ("/models", "cuda")
    monkeypatch.setenv("CNN_SERVING_DEVICE", "auto")  # `docker run -e ...` allows the CPU
    assert serve_config(build_parser().parse_args(command[3:])).device == "auto"

    check = only(stage, "HEALTHCHECK").exec_form
    assert check[:3] == ["python", "-m", "service"]
    health = build_parser().parse_args(check[3:])
    assert (health.command, health.model) == ("health", "")  # the whole server
    assert health.server.rsplit(":", 1)[1] == str(defaults.grpc_port)


def test_dependencies_install_before_the_code_is_copied():
    build = dockerfile_stages()[0]
    installs = [i for i, x in enumerate(build) if x.keyword == "RUN" and "pip install" in x.value]
    copies = [(i, x.value.split()[:-1]) for i, x in enumerate(build) if x.keyword == "COPY"]
    deps = next(i for i in installs if "requirements.txt" in build[i].value)
    assert "optional-dependencies']['serve']" in build[deps].value
    assert [sources for i, sources in copies if i < deps] == [["pyproject.toml"]]
    assert any(sources == ["service/"] for i, sources in copies if i > deps)
    assert any(sources == ["imaging/"] for i, sources in copies if i > deps)


def test_build_context_holds_the_service_and_nothing_else():
    context = docker_context()
    wanted = {"pyproject.toml", "README.md", "service/__main__.py", "imaging/policy.py"}
    assert wanted <= set(context)
    outside = [n for n in context if not n.startswith(("service/", "imaging/"))]
    assert sorted(outside) == ["README.md", "pyproject.toml"]
    assert not [n for n in context if "__pycache__" in n]
    for stage in dockerfile_stages():
        for copy in (i for i in stage if i.keyword == "COPY" and "--from" not in i.value):
            for source in copy.value.split()[:-1]:
                assert any(n == source or n.startswith(source) for n in context), source


@pytest.fixture(scope="module")
def serve_only_python(tmp_path_factory) -> Path:
    """A fresh virtual environment holding what the image holds: the build context (the
    checkout through .dockerignore) installed with the `serve` extra, and nothing else."""
    root = tmp_path_factory.mktemp("serve-only")
    context = root / "context"
    for name in docker_context():
        (context / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, context / name)
    subprocess.run([sys.executable, "-m", "venv", root / "venv"], check=True)
    python = root / "venv" / "bin" / "python"
    subprocess.run(
        [
            python,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            f"{context}[serve]",
        ],
        check=True,
        timeout=600,
    )
    return python


def test_serve_extra_alone_serves_a_classification(
    serve_only_python: Path, repository: Path, sample_images, tmp_path: Path
):
    probe = (
        "import importlib.util, json, service;"
        f"print(json.dumps([service.__file__, [n for n in {NOT_SERVING!r} "
        "if importlib.util.find_spec(n)]]))"
    )
    found = subprocess.run(
        [serve_only_python, "-c", probe], cwd=tmp_path, capture_output=True, text=True, check=True
    )
    location, importable = json.loads(found.stdout)
    assert importable == []  # no TensorFlow, no training or export code
    assert Path(location).is_relative_to(serve_only_python.parents[1])  # not the checkout

    served = start_server(repository, python=serve_only_python, cwd=tmp_path)
    try:
        x, _ = sample_images
        with Client(served.target) as client:
            predictions = client.classify([png(image) for image in x[:3]], MODEL)
        want = reference(repository, x[:3])
        for i, p in enumerate(predictions):
            assert p.ok and p.label_index == int(np.argmax(want["probabilities"][i]))
            np.testing.assert_allclose(p.probabilities, want["probabilities"][i], atol=1e-6)
    finally:
        assert served.stop() == 0
