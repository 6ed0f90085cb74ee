"""Service fixtures: a real model repository exported from a 1-epoch run, and a real server
process on free ports, found ready by reading its log (never by sleeping)."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
READY = re.compile(r"ready: serving .* on port (\d+)")
METRICS = re.compile(r"metrics on :(\d+)/metrics")
MODEL = "fashion"


@pytest.fixture(scope="session")
def repository(seed_run: Path, tmp_path_factory) -> Path:
    """REPO/fashion/1 exported from the seed run (read-only for tests: copy it to change it)."""
    from export.core import export_run

    repo = tmp_path_factory.mktemp("repo")
    export_run(seed_run, repo, MODEL, None)
    return repo


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

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self, timeout_s: float = 30) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout_s)


def start_server(repo: Path, *options: str, env: dict[str, str] | None = None) -> Served:
    """`python -m service serve` on free ports; returns once it logs that it is ready."""
    command = [sys.executable, "-m", "service", "serve", "--repository", str(repo),
               "--host", "127.0.0.1", "--grpc-port", "0", "--metrics-port", "0",
               "--device", "cpu", *options]  # fmt: skip
    process = subprocess.Popen(
        command, cwd=ROOT, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
        env={**os.environ, **(env or {})},
    )  # fmt: skip
    log = LogWatcher(process.stderr)
    try:
        port = int(log.wait_for(READY, 120).group(1))
        metrics_port = int(log.wait_for(METRICS, 1).group(1))
    except AssertionError:
        process.kill()
        raise
    return Served(process, port, metrics_port, log)


@pytest.fixture(scope="module")
def server(repository: Path) -> Iterator[Served]:
    served = start_server(repository, "--max-queue-delay-ms", "5")
    yield served
    assert served.stop() == 0


@pytest.fixture
def private_repo(repository: Path, tmp_path: Path) -> Path:
    """A copy of the repository a test may change."""
    copy = tmp_path / "repo"
    shutil.copytree(repository, copy)
    return copy
