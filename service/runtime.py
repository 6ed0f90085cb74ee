"""onnxruntime sessions: one per loaded model version, on the device the config asks for.

Never a silent fallback. onnxruntime-gpu lists CUDA among its *available* providers even on a
machine without a GPU, and a session asked for CUDA then quietly runs on the CPU; so the
providers a session really uses are read back with `session.get_providers()`:
- `cuda`: CUDA must really load, else the model fails to load with a one-line reason (the
  server stops at startup).
- `auto`: CUDA when it really loads, else the CPU; the choice is logged and exported as a metric.
- `cpu`: the CPU provider only.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterator, Sequence

import numpy as np
import onnxruntime as ort

from service.errors import ConfigError, ModelLoadError
from service.repository import OUTPUT_NAMES, ModelSpec

log = logging.getLogger(__name__)

CUDA = "CUDAExecutionProvider"
ORT_DEFAULT_SEVERITY = 2  # onnxruntime's default logger: warnings and above


@contextlib.contextmanager
def quiet_provider_bridge() -> Iterator[None]:
    """Without a usable CUDA, onnxruntime's default logger prints two ANSI-coloured lines
    (provider_bridge_ort.cc, "Failed to create CUDAExecutionProvider") straight to stderr,
    outside logging; while the first session probes CUDA only fatal ones get through."""
    ort.set_default_logger_severity(4)
    try:
        yield
    finally:
        ort.set_default_logger_severity(ORT_DEFAULT_SEVERITY)


CPU = "CPUExecutionProvider"


class Session:
    """One model version on onnxruntime: `run(batch) -> {output name: array}`."""

    def __init__(
        self,
        spec: ModelSpec,
        providers: Sequence[str],
        intra_op_threads: int = 0,
        io_binding: bool | None = None,
    ) -> None:
        options = ort.SessionOptions()
        options.intra_op_num_threads = intra_op_threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3  # onnxruntime's own warnings would bypass logging
        # Idle onnxruntime threads would spin for work, taking a core from the event loop that
        # feeds them (measured: a whole core of 2 under load); block instead.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self._session = ort.InferenceSession(
                str(spec.onnx_path), sess_options=options, providers=list(providers)
            )
        except Exception as exc:  # onnxruntime raises its own untyped exceptions
            raise ModelLoadError(
                f"model {spec.name!r} version {spec.version}: onnxruntime cannot load "
                f"{spec.onnx_path}: {exc}"
            ) from exc
        self.spec = spec
        self.providers: tuple[str, ...] = tuple(self._session.get_providers())
        self.on_cuda = CUDA in self.providers
        self._check_signature()
        use_binding = self.on_cuda if io_binding is None else io_binding
        self._device = "cuda" if self.on_cuda else "cpu"
        self._binding = threading.local() if use_binding else None
        self.max_batch_s = float("inf")  # seconds for the largest batch, measured by warm_up
        self.threads = (  # for the log
            f"{intra_op_threads} onnxruntime thread{'s' if intra_op_threads > 1 else ''}"
            if intra_op_threads
            else "onnxruntime's default threads"
        )

    @property
    def provider(self) -> str:
        """The provider doing the work (the first one the session really uses)."""
        return self.providers[0]

    def _check_signature(self) -> None:
        where = f"model {self.spec.name!r} version {self.spec.version}"
        inputs = self._session.get_inputs()
        if len(inputs) != 1 or inputs[0].name != self.spec.input_name:
            names = [i.name for i in inputs]
            raise ModelLoadError(
                f"{where}: expected one input {self.spec.input_name!r}, ONNX has {names}"
            )
        if inputs[0].type != "tensor(uint8)" or list(inputs[0].shape[1:]) != list(
            self.spec.image_shape
        ):
            raise ModelLoadError(
                f"{where}: ONNX input is {inputs[0].type} {inputs[0].shape}, metadata.json "
                f"says uint8 [N, {', '.join(map(str, self.spec.image_shape))}]"
            )
        outputs = {o.name for o in self._session.get_outputs()}
        missing = [name for name in OUTPUT_NAMES if name not in outputs]
        if missing:
            raise ModelLoadError(f"{where}: ONNX lacks outputs {missing} (has {sorted(outputs)})")

    def run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        """(N, H, W, C) uint8 -> {"probabilities": (N, K) float32, "bottleneck": (N, 2)}."""
        if self._binding is None:
            feeds = {self.spec.input_name: batch}
            values = self._session.run(list(OUTPUT_NAMES), feeds)
            return dict(zip(OUTPUT_NAMES, values, strict=True))
        return self._run_bound(batch)

    def _run_bound(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        # IO binding: outputs are allocated on the device and copied back once, instead of
        # onnxruntime staging every output through its own host copies.
        binding = getattr(self._binding, "value", None)
        if binding is None:
            binding = self._session.io_binding()
            self._binding.value = binding  # type: ignore[union-attr]
        binding.bind_cpu_input(self.spec.input_name, np.ascontiguousarray(batch))
        for name in OUTPUT_NAMES:
            binding.bind_output(name, self._device)
        self._session.run_with_iobinding(binding)
        values = binding.copy_outputs_to_cpu()
        binding.clear_binding_inputs()
        binding.clear_binding_outputs()
        return dict(zip(OUTPUT_NAMES, values, strict=True))

    def warm_up(self, max_batch_size: int, stop: threading.Event | None = None) -> None:
        """Run every batch size 1..max_batch_size once, so no request pays for a first run
        (allocations, CUDA kernel selection) at a size the batcher forms. `stop` set: give up
        (ModelLoadError) at the next size."""
        for size in range(1, max_batch_size + 1):
            if stop is not None and stop.is_set():
                raise ModelLoadError(
                    f"model {self.spec.name!r} version {self.spec.version}: "
                    "warm-up interrupted by shutdown"
                )
            self.run(np.zeros((size, *self.spec.image_shape), dtype=np.uint8))
        largest = np.zeros((max_batch_size, *self.spec.image_shape), dtype=np.uint8)
        timings = []
        for _ in range(3):
            started = time.perf_counter()
            self.run(largest)
            timings.append(time.perf_counter() - started)
        self.max_batch_s = sorted(timings)[1]


class Runtime:
    """Makes sessions on the configured device and remembers whether CUDA really works."""

    def __init__(self, device: str, intra_op_threads: int = 0) -> None:
        if device not in ("auto", "cuda", "cpu"):
            raise ConfigError(f"unknown device {device!r}")
        self.device = device
        self.intra_op_threads = intra_op_threads
        self._cuda_works: bool | None = None if device != "cpu" else False
        self._lock = threading.Lock()

    def providers(self) -> list[str]:
        if self.device == "cpu" or self._cuda_works is False:
            return [CPU]
        return [CUDA, CPU]

    def session(self, spec: ModelSpec, intra_op_threads: int | None = None) -> Session:
        """A session for `spec` (on `intra_op_threads`, else the configured number); raises
        ModelLoadError (and ConfigError for `--device cuda` without a working CUDA provider)."""
        threads = self.intra_op_threads if intra_op_threads is None else intra_op_threads
        with self._lock:  # the first session decides whether CUDA works
            if self._cuda_works is None:  # the probe: our own line says how it went
                with quiet_provider_bridge():
                    session = Session(spec, self.providers(), threads)
            else:
                session = Session(spec, self.providers(), threads)
            if self.device != "cpu" and not session.on_cuda:
                if self.device == "cuda":
                    raise ConfigError(
                        "--device cuda: onnxruntime's CUDAExecutionProvider did not load "
                        f"(the session runs on {list(session.providers)}); check the GPU, the "
                        "driver and the CUDA 13 / cuDNN 9 libraries, or use --device auto"
                    )
                if self._cuda_works is None:
                    log.warning(
                        "--device auto: CUDA is not usable here "
                        "(onnxruntime's CUDAExecutionProvider did not load); running on the CPU"
                    )
                self._cuda_works = False
            elif session.on_cuda:
                self._cuda_works = True
        return session
