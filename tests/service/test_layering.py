"""The layering of DESIGN.md, checked on real imports: the core is transport-free (no grpc, no
HTTP framework), nothing in service/ imports TensorFlow, and the image policy that training and
the service share imports Pillow and numpy only, so training's loader has no serving stack."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT

CORE = [
    "service.core", "service.engine", "service.engine.core", "service.engine.host",
    "service.batcher", "service.runtime", "service.repository", "service.images",
    "service.metrics", "service.errors", "service.memory", "service.predictions",
    "service.bottleneck_map",
]  # fmt: skip
TRANSPORTS = ("grpc", "google.protobuf", "starlette", "fastapi", "uvicorn")


def imported_by(modules: list[str]) -> set[str]:
    """Top-level packages and `google.protobuf` loaded by importing `modules` in a fresh
    interpreter."""
    code = (
        "import importlib, json, sys\n"
        f"for name in {modules!r}: importlib.import_module(name)\n"
        "print(json.dumps(sorted(sys.modules)))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    return set(json.loads(done.stdout))


@pytest.mark.parametrize("module", CORE)
def test_the_core_imports_no_transport(module: str):
    loaded = imported_by([module])
    leaked = sorted(
        name for name in loaded if any(name == t or name.startswith(t + ".") for t in TRANSPORTS)
    )
    assert leaked == [], f"{module} pulls in {leaked[:5]}"


def test_the_service_never_imports_tensorflow():
    loaded = imported_by(["service.server", "service.rest.app", "service.__main__",
                          "service.scoring.job", "service.supervisor"])  # fmt: skip
    assert not {name for name in loaded if name.split(".")[0] in ("tensorflow", "keras")}


HEAVY = ("grpc", "google.protobuf", "onnxruntime", "tensorflow", "keras", "service", "training")


def third_party(loaded: set[str]) -> set[str]:
    """The top-level packages among `loaded` that are not the standard library's."""
    return {n.split(".")[0] for n in loaded} - set(sys.stdlib_module_names) - {"__main__"}


def test_the_image_policy_imports_pillow_and_numpy_only():
    loaded = imported_by(["imaging.policy"])
    leaked = sorted(name for name in third_party(loaded) if not name.startswith("_"))
    assert leaked == ["PIL", "imaging", "numpy"]  # "_" names: the editable install's finder
    assert not {name for name in loaded if name.split(".")[0] in HEAVY}


def test_trainings_folder_loader_imports_no_serving_stack():
    loaded = imported_by(["training.data", "training.config"])
    assert not {name for name in loaded if name.split(".")[0] in HEAVY[:-1]}
