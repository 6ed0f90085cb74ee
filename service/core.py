"""The transport-free core that both gRPC APIs (and the in-process CLI) call: `Core`.

Two implementations share everything here but where inference happens:
- `service.engine.Engine` holds the onnxruntime sessions and batchers in this process
  (`serve --frontends 0`, the CLI, tests);
- `service.frontend.EngineClient` is a front-end process's view of the one engine process,
  reached over a local socket with pixels in shared memory (`serve --frontends N`).

Either way a servicer resolves a `Model` (`model(name, version)`), decodes images here, in the
process that received them (`decode`, off the event loop), and awaits `infer`. A `Model` is
what the transports may know of a loaded version: its spec and the providers it really runs on.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from prometheus_client import Histogram

from service import images, memory
from service.config import MiB, ServeConfig
from service.cpus import available_cpus
from service.errors import (
    DecodeBudgetExceeded,
    InvalidInput,
    ModelNotFound,
    ServingError,
    Unavailable,
    shorten,
)
from service.memory import DecodeBudget
from service.metrics import Metrics
from service.predictions import DEFAULT_TOP_K, Prediction, failed, from_outputs
from service.repository import ModelSpec

ImageInput = bytes | np.ndarray  # encoded file, or raw (H, W, C) uint8 pixels
Outputs = dict[str, np.ndarray]
SERVER = ""  # the name a model-change listener gets for the whole server's readiness


@dataclass
class Stats:
    """Per-version counters behind Triton's ModelStatistics, with Triton's meaning: the
    request parts are [count, ns] summed per request (a batch of 3 requests adds 3 counts and
    3 times its duration), so every part counts the same requests; execution_count counts
    batches, inference_count images; `batches` per executed batch size [batches, input ns,
    infer ns, output ns]."""

    inference_count: int = 0  # images computed
    execution_count: int = 0  # batches computed
    last_inference_ms: int = 0
    success: list[int] = field(default_factory=lambda: [0, 0])  # [count, ns] whole requests
    fail: list[int] = field(default_factory=lambda: [0, 0])
    queue: list[int] = field(default_factory=lambda: [0, 0])
    compute_input: list[int] = field(default_factory=lambda: [0, 0])  # merging the pixels
    compute: list[int] = field(default_factory=lambda: [0, 0])  # the model run (compute_infer)
    compute_output: list[int] = field(default_factory=lambda: [0, 0])  # splitting the outputs
    batches: dict[int, list[int]] = field(default_factory=dict)

    def record_request(self, ok: bool, seconds: float) -> None:
        _add(self.success if ok else self.fail, int(seconds * 1e9))

    def record_requests(self, ok: int, ok_ns: int, failed: int, failed_ns: int) -> None:
        """Several finished requests at once (their summed durations)."""
        self.success[0] += ok
        self.success[1] += ok_ns
        self.fail[0] += failed
        self.fail[1] += failed_ns

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Stats:
        batches = {int(size): list(pair) for size, pair in values["batches"].items()}
        return cls(**{**values, "batches": batches})


@dataclass(frozen=True)
class IndexEntry:
    """One line of the repository index (Triton's RepositoryIndex): a model version on disk
    (version "" for a model with none) and its state: READY, LOADING, UNLOADING or
    UNAVAILABLE, with the reason when it is not READY."""

    name: str
    version: str
    state: str
    reason: str = ""

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


def _add(pair: list[int], ns: int) -> None:
    pair[0] += 1
    pair[1] += ns


@dataclass(eq=False)
class Model:
    """A loaded version as the transports see it."""

    spec: ModelSpec
    providers: tuple[str, ...]  # what onnxruntime really runs it on, first one doing the work
    decode_seconds: Histogram  # this version's series of cnn_serving_decode_duration_seconds

    @property
    def on_cuda(self) -> bool:
        return "CUDAExecutionProvider" in self.providers

    @property
    def where(self) -> str:
        return f"model {self.spec.name!r} version {self.spec.version}"


class Core:
    """Lookups, decoding and classification over an abstract `infer`."""

    def __init__(self, config: ServeConfig, metrics: Metrics | None = None) -> None:
        self.config = config
        self.metrics = metrics or Metrics()
        self.ready = False
        self.draining = False
        self._models: dict[str, dict[int, Model]] = {}
        self._listeners: list[Callable[[str, bool], None]] = []
        self._decode = ThreadPoolExecutor(
            max_workers=config.decode_threads or available_cpus(), thread_name_prefix="decode"
        )
        self.decode_budget = DecodeBudget(
            config.decode_budget_mib * MiB,
            on_change=self.metrics.decode_in_flight.set,
            on_idle=memory.release_freed_memory,
        )

    # ---- what an implementation provides

    async def start(self) -> None:
        raise NotImplementedError

    async def stop(self) -> None:
        self._decode.shutdown(wait=False, cancel_futures=True)

    async def run(self, model: Model, batch: np.ndarray, deadline: float | None) -> Outputs:
        """(N, H, W, C) uint8, already checked -> outputs."""
        raise NotImplementedError

    async def statistics(self, models: Sequence[Model]) -> list[Stats]:
        raise NotImplementedError

    def record_request(self, model: Model, ok: bool, seconds: float) -> None:
        """One finished inference request of `model`, for its statistics."""
        raise NotImplementedError

    # ---- model control (Triton's model repository extension)

    async def repository_index(self, ready_only: bool = False) -> list[IndexEntry]:
        """Every model version in the repository and its state (only READY ones if asked)."""
        raise NotImplementedError

    async def load_model(self, name: str) -> None:
        """Load (or reload) `name`'s versions under the version policy; returns once they
        are warm and taking traffic. Only with --model-control-mode explicit."""
        raise NotImplementedError

    async def unload_model(self, name: str) -> None:
        """Stop serving `name`: new requests are refused at once, queued ones finish, then its
        sessions are freed. Only with --model-control-mode explicit."""
        raise NotImplementedError

    # ---- model changes

    def on_model_change(self, listener: Callable[[str, bool], None]) -> None:
        """Call `listener(name, serving)` whenever a model's versions change (`serving`: it has
        a ready version), and `listener(SERVER, ready)` when the whole server's readiness does."""
        self._listeners.append(listener)

    def _notify(self, name: str, serving: bool) -> None:
        for listener in self._listeners:
            listener(name, serving)

    @property
    def serving(self) -> bool:
        """Ready for inference (the server's readiness): the repository loaded, not draining,
        and at least one model with a ready version."""
        return self.ready and not self.draining and bool(self._models)

    # ---- lookups

    def names(self) -> list[str]:
        return sorted(self._models)

    def versions(self, name: str) -> list[int]:
        return sorted(self._models.get(name, {}))

    def model(self, name: str, version: int | None = None) -> Model:
        """The requested version, or the newest one; raises ModelNotFound."""
        versions = self._models.get(name)
        if not versions and not self.ready:
            raise Unavailable(f"model {shorten(name)!r}: the server is still loading its models")
        if not versions:
            known = ", ".join(self.names()) or "none"
            raise ModelNotFound(f"model {shorten(name)!r} is not loaded (loaded models: {known})")
        if version is None or version == 0:
            return versions[max(versions)]
        if version not in versions:
            have = ", ".join(map(str, sorted(versions)))
            raise ModelNotFound(f"model {name!r} has no version {version} (loaded: {have})")
        return versions[version]

    # ---- work

    async def infer(
        self, model: Model, batch: np.ndarray, deadline: float | None = None
    ) -> Outputs:
        """(N, H, W, C) uint8 -> outputs, through the version's batcher."""
        images.check_tensor(batch, model.spec.image_shape)
        self.check_count(model, len(batch))
        return await self.run(model, batch, deadline)

    def check_count(self, model: Model, count: int) -> None:
        """A request must hold 1 to --max-queue-size images (more could never be queued);
        checked before any decoding."""
        limit = self.config.max_queue_size
        if count == 0:
            raise InvalidInput(f"{model.where}: the request holds no images")
        if count > limit:
            raise InvalidInput(
                f"{model.where}: {count:,} images in one request; at most {limit:,} "
                "(--max-queue-size): split the request"
            )

    async def decode(
        self, model: Model, inputs: Sequence[ImageInput | InvalidInput]
    ) -> list[np.ndarray | ServingError]:
        """Each input -> (H, W, C) uint8, or the error that says why not (naming the model,
        version and image index): InvalidInput, or DecodeBudgetExceeded when decoding it
        would pass --decode-budget-mib. Encoded images decode in parallel, off the loop."""
        loop = asyncio.get_running_loop()
        jobs = {
            i: loop.run_in_executor(self._decode, self._decode_one, model, i, item)
            for i, item in enumerate(inputs)
            if isinstance(item, bytes)  # real work: off the loop, in parallel
        }
        decoded = dict(zip(jobs, await asyncio.gather(*jobs.values()), strict=True))
        return [
            decoded[i] if i in decoded else self._decode_one(model, i, item)
            for i, item in enumerate(inputs)
        ]

    def _decode_one(
        self, model: Model, index: int, item: ImageInput | InvalidInput
    ) -> np.ndarray | ServingError:
        shape = model.spec.image_shape
        started = time.monotonic()
        try:
            if isinstance(item, InvalidInput):
                raise item
            if isinstance(item, np.ndarray):
                return images.check_tensor(item, shape)
            limit = self.config.max_image_pixels
            array = images.decode(item, shape, limit, self.decode_budget)
            model.decode_seconds.observe(time.monotonic() - started)
            return array
        except DecodeBudgetExceeded as exc:
            self.metrics.decode_refused.labels(model.spec.name, str(model.spec.version)).inc()
            return DecodeBudgetExceeded(f"{model.where}, image {index}: {exc}")
        except InvalidInput as exc:
            return InvalidInput(f"{model.where}, image {index}: {exc}")

    async def classify(
        self,
        model: Model,
        inputs: Sequence[ImageInput | InvalidInput],
        top_k: int = DEFAULT_TOP_K,
        deadline: float | None = None,
        ids: Sequence[str] = (),
    ) -> list[Prediction]:
        """One Prediction per input, in order; a bad image gets its own error, the rest are
        answered."""
        self.check_count(model, len(inputs))
        spec = model.spec
        ids = list(ids) + [""] * (len(inputs) - len(ids))
        decoded = await self.decode(model, inputs)
        good = [i for i, item in enumerate(decoded) if isinstance(item, np.ndarray)]
        results: list[Prediction] = [
            failed(i, spec.name, spec.version, item.code.name, str(item), ids[i])
            for i, item in enumerate(decoded)
            if isinstance(item, ServingError)
        ]
        if good:
            batch = np.stack([decoded[i] for i in good])  # type: ignore[misc]
            outputs = await self.infer(model, batch, deadline)
            for row, i in enumerate(good):
                results.append(
                    from_outputs(
                        i,
                        outputs["probabilities"][row],
                        outputs["bottleneck"][row],
                        spec.labels,
                        spec.name,
                        spec.version,
                        top_k,
                        ids[i],
                    )
                )
        return sorted(results, key=lambda p: p.index)
