"""The Ray engine: Ray Data decodes and scores batches on a pool of actors, each holding one
onnxruntime session; the driver (this process) receives the results batch by batch and writes
them in chunks exactly as the local engine does, so a job resumes the same way.

`--ray-address` joins a running cluster (`auto`: the one this machine belongs to); without it
a local Ray starts and stops with the job. On a cluster, the input folder and the model
repository must be readable at the same paths on every node (a shared file system), as for any
Ray Data job reading files. Ray is the optional extra `cnn-serving[ray]`.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from service import bottleneck_map
from service.errors import ScoringError
from service.repository import ModelSpec
from service.scoring.engines import Result
from service.scoring.files import Item

log = logging.getLogger(__name__)


def _ray() -> Any:
    try:
        import ray  # noqa: PLC0415 - optional
        import ray.data  # noqa: PLC0415, F401
    except ImportError:
        raise ScoringError("--engine ray needs Ray: pip install 'cnn-serving[ray]'") from None
    return ray


class _Scorer:
    """A Ray actor: decodes a batch of files and runs the model on the ones that decoded."""

    def __init__(self, spec: ModelSpec, device: str, max_pixels: int) -> None:
        from service.runtime import Runtime  # noqa: PLC0415 - inside the actor

        self.spec = spec
        self.session = Runtime(device, intra_op_threads=1).session(spec)
        self.max_pixels = max_pixels

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from service.scoring.decoding import decode_files  # noqa: PLC0415

        paths = [os.fsdecode(bytes(p)) for p in batch["path"]]
        decoded = decode_files(paths, self.spec.image_shape, self.max_pixels)
        count, classes = len(paths), len(self.spec.labels)
        probabilities = np.zeros((count, classes), np.float32)
        bottleneck = np.zeros((count, 2), np.float32)
        if decoded.good:
            outputs = self.session.run(decoded.pixels)
            probabilities[decoded.good] = outputs["probabilities"]
            bottleneck[decoded.good] = outputs["bottleneck"]
        errors = np.array([decoded.errors.get(i, "") for i in range(count)], dtype=object)
        return {
            "key": batch["key"],
            "probabilities": probabilities,
            "bottleneck": bottleneck,
            "error": errors,
        }


class RayEngine:
    kind = "ray"

    def __init__(
        self,
        spec: ModelSpec,
        device: str,
        address: str | None,
        workers: int,
        batch_size: int,
        max_pixels: int,
    ) -> None:
        self.ray = _ray()
        self.spec = spec
        self.model, self.version, self.labels = spec.name, spec.version, spec.labels
        self.bottleneck_map = bottleneck_map.load(spec).map
        self.device = f"ray {address or 'local'} ({device})"
        self.batch_size = batch_size
        self.max_pixels = max_pixels
        self.device_policy = device
        self._started = False
        if not self.ray.is_initialized():
            if address and address != "auto":
                _probe(address)
            try:
                self.ray.init(
                    address=address,
                    num_cpus=None if address else (workers or None),
                    include_dashboard=False,
                    log_to_driver=False,
                    logging_level=logging.WARNING,
                )
            except (ConnectionError, ValueError, RuntimeError) as exc:
                raise ScoringError(f"--ray-address {address}: {exc}") from None
            self._started = True
        cpus = int(self.ray.cluster_resources().get("CPU", 1))
        self.workers = workers or max(1, cpus)
        logging.getLogger("ray.data").setLevel(logging.ERROR)
        context = self.ray.data.DataContext.get_current()
        context.enable_progress_bars = False  # ours counts the same images
        context.print_on_execution_start = False

    def score(self, items: Sequence[Item]) -> Iterator[Result]:
        if not items:
            return
        rows = [{"key": item.key, "path": os.fsencode(item.path)} for item in items]
        dataset = self.ray.data.from_items(rows).map_batches(
            _Scorer,
            fn_constructor_kwargs={
                "spec": self.spec,
                "device": self.device_policy,
                "max_pixels": self.max_pixels,
            },
            batch_size=self.batch_size,
            batch_format="numpy",
            compute=self.ray.data.ActorPoolStrategy(size=self.workers),
            num_cpus=1,
            num_gpus=1 if self.device_policy == "cuda" else 0,
        )
        for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
            yield _result(batch)

    def close(self) -> None:
        if self._started:
            self.ray.shutdown()
            self._started = False


def _probe(address: str, timeout_s: float = 10.0) -> None:
    """Fail in one line when a cluster address does not answer (Ray itself retries for
    minutes)."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise ScoringError(f"--ray-address {address}: expected HOST:PORT, ray://HOST:PORT or auto")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as exc:
        raise ScoringError(
            f"--ray-address {address}: cannot connect: {exc.strerror or exc}"
        ) from None


def _result(batch: dict[str, np.ndarray]) -> Result:
    errors = [str(e) for e in batch["error"]]
    good = [i for i, e in enumerate(errors) if not e]
    keys = [str(k) for k in batch["key"]]
    return Result(
        keys=[keys[i] for i in good],
        probabilities=np.asarray(batch["probabilities"], np.float32)[good],
        bottleneck=np.asarray(batch["bottleneck"], np.float32)[good],
        errors=[(keys[i], errors[i]) for i, e in enumerate(errors) if e],
    )
