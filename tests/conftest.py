"""Shared fixtures: the committed Fashion-MNIST sample, small real training runs, a model
repository exported from one, and a real server process on free ports, found ready by reading
its log (never by sleeping)."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

ROOT = Path(__file__).resolve().parents[1]
SAMPLE_DIR = ROOT / "tests" / "data" / "fashion-mnist"


@pytest.fixture(scope="session")
def sample_dir() -> Path:
    return SAMPLE_DIR


def train_config(out: Path, family: str = "scratch", **changes):
    """A 1-epoch config on the committed sample (the smoke-test shape of every run)."""
    from training.config import ARCH_DEFAULTS, Augmentation, TrainConfig

    arch = changes.pop("arch", "seed" if family != "vgg16" else "vgg16")
    defaults = ARCH_DEFAULTS[arch]
    values = {
        "family": family,
        "arch": arch,
        "out": str(out),
        "epochs": 1,
        "batch_size": defaults["batch_size"],
        "learning_rate": defaults["learning_rate"],
        "schedule": defaults["schedule"],
        "augment": Augmentation.preset(defaults["augment"]),
        "data_dir": str(SAMPLE_DIR),
        "seed": 7,
    }
    if family == "vgg16":
        values |= {"base_weights": "none", "image_size": 32}
    if family == "transfer":
        values |= {"pretrain_classes": (3, 4, 5, 6, 7, 8, 9)}
    return TrainConfig(**(values | changes))


@pytest.fixture(scope="session")
def seed_run(tmp_path_factory) -> Path:
    """The seed network trained for one epoch on the sample: a finished run directory."""
    from training.run import run

    out = tmp_path_factory.mktemp("runs") / "seed"
    run(train_config(out))
    return out


@pytest.fixture(scope="session")
def vgg16_run(tmp_path_factory) -> Path:
    """VGG16 (random frozen base, 32x32) with its head trained for one epoch on the sample."""
    from training.run import run

    root = tmp_path_factory.mktemp("runs")
    run(train_config(root / "vgg16", "vgg16", cache_dir=str(root / "cache")))
    return root / "vgg16"


READY = re.compile(r"ready: serving .* on port (\d+)")
METRICS = re.compile(r"metrics on :(\d+)/metrics")
HTTP = re.compile(r"HTTP listening on https?://[^ ]+:(\d+) |HTTP (off)")
MODEL = "fashion"


@pytest.fixture(scope="session")
def repository(seed_run: Path, tmp_path_factory) -> Path:
    """REPO/fashion/1 exported from the seed run (read-only for tests: copy it to change it)."""
    from export.core import export_run

    repo = tmp_path_factory.mktemp("repo")
    export_run(seed_run, repo, MODEL, None)
    return repo


@pytest.fixture
def private_repo(repository: Path, tmp_path: Path) -> Path:
    """A copy of the repository a test may change."""
    copy = tmp_path / "repo"
    shutil.copytree(repository, copy)
    return copy


@pytest.fixture(scope="session")
def sample_images(sample_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """32 real Fashion-MNIST test images (N, 28, 28, 1) uint8 and their labels."""
    from training.data import read_fashion_mnist_dir

    data = read_fashion_mnist_dir(sample_dir)
    return data.x_test[:32], data.y_test[:32]


def png(image: np.ndarray, mode: str | None = None, fmt: str = "PNG", **save) -> bytes:
    import io

    from PIL import Image

    picture = Image.fromarray(image.squeeze(-1) if image.ndim == 3 else image)
    if mode:
        picture = picture.convert(mode)
    buffer = io.BytesIO()
    picture.save(buffer, format=fmt, **save)
    return buffer.getvalue()


def reference(repo: Path, images: np.ndarray, version: int = 1) -> dict[str, np.ndarray]:
    """What in-process onnxruntime answers for (N, H, W, C) uint8 images."""
    import onnxruntime as ort

    session = ort.InferenceSession(
        str(repo / MODEL / str(version) / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    probabilities, bottleneck = session.run(["probabilities", "bottleneck"], {"images": images})
    return {"probabilities": probabilities, "bottleneck": bottleneck}


class LogWatcher:
    """Collects a server's log lines from its stderr; waits on them with a condition."""

    def __init__(self, stream) -> None:
        self.lines: list[str] = []
        self.changed = threading.Condition()
        threading.Thread(target=self._read, args=(stream,), daemon=True).start()

    def _read(self, stream) -> None:
        with stream:
            for line in stream:
                with self.changed:
                    self.lines.append(line)
                    self.changed.notify_all()

    def wait_for(self, pattern: str | re.Pattern, timeout_s: float = 60) -> re.Match:
        regex = re.compile(pattern)
        with self.changed:
            found = self.changed.wait_for(
                lambda: any(regex.search(line) for line in self.lines), timeout_s
            )
            if not found:
                tail = "".join(self.lines[-30:])
                raise AssertionError(f"no log line matched {regex.pattern!r}; log:\n{tail}")
            return next(m for line in self.lines if (m := regex.search(line)))

    @property
    def text(self) -> str:
        with self.changed:
            return "".join(self.lines)


@dataclass
class Served:
    process: subprocess.Popen
    port: int
    metrics_port: int
    log: LogWatcher
    http_port: int = -1

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def http(self) -> str:
        """host:port of the HTTP front door (tritonclient.http's `url`)."""
        return f"127.0.0.1:{self.http_port}"

    def stop(self, timeout_s: float = 30) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout_s)


# The mode of every server a test starts without naming --frontends itself: the split one (what
# `serve` runs by default on this 2-core machine) unless a module's `frontends` fixture
# (tests/service/conftest.py) runs its tests in both modes.
SERVER_MODE = {"frontends": "2"}


@pytest.fixture(scope="module", params=["0", "2"], ids=["single-process", "frontends-2"])
def frontends(request: pytest.FixtureRequest) -> Iterator[str]:
    """Every server the module's tests start runs with `--frontends` 0, then 2: both modes
    pass the same suite."""
    before = SERVER_MODE["frontends"]
    SERVER_MODE["frontends"] = request.param
    yield request.param
    SERVER_MODE["frontends"] = before


def start_server(
    repo: Path,
    *options: str,
    env: dict[str, str] | None = None,
    python: str | Path = sys.executable,
    cwd: Path = ROOT,
) -> Served:
    """`python -m service serve` on free ports; returns once it logs that it is ready.
    `python` and `cwd` choose the interpreter and where it runs (the checkout by default)."""
    if "--frontends" not in options:
        options = ("--frontends", SERVER_MODE["frontends"], *options)
    if "--http-port" not in options:
        options = ("--http-port", "0", *options)
    command = [str(python), "-m", "service", "serve", "--repository", str(repo),
               "--host", "127.0.0.1", "--grpc-port", "0", "--metrics-port", "0",
               "--device", "cpu", *options]  # fmt: skip
    process = subprocess.Popen(
        command, cwd=cwd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
        env={**os.environ, **(env or {})},
    )  # fmt: skip
    log = LogWatcher(process.stderr)
    try:
        port = int(log.wait_for(READY, 120).group(1))
        metrics_port = int(log.wait_for(METRICS, 1).group(1))
        http = log.wait_for(HTTP, 1)
    except AssertionError:
        process.kill()
        raise
    return Served(process, port, metrics_port, log, int(http.group(1) or -1))


def debian_tool(name: str, package: str, make_target: str) -> str:
    """The path of `name` from Debian's `package`. `make test` installs it when it runs as root
    with apt, so there a missing binary is a broken set-up and fails; elsewhere (not root) the
    test is skipped with the reason."""
    path = shutil.which(name)
    if path:
        return path
    if os.geteuid() == 0 and shutil.which("apt-get"):
        pytest.fail(
            f"{name} not found, yet this machine can install it: `make test` (or "
            f"`make {make_target}`) installs Debian's {package} package"
        )
    pytest.skip(f"{name} not found and not root with apt: install Debian's `{package}` package")


def eventually(check, timeout_s: float = 10) -> bool:
    """True once `check()` is (polled until `timeout_s`): for what crosses processes."""
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def scrape(served: Served) -> dict[str, list]:
    """The server's /metrics, parsed: {family name: [samples]}."""
    url = f"http://127.0.0.1:{served.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    return {f.name: f.samples for f in text_string_to_metric_families(text)}
