"""A typed Python client for cnn-serving's own API (classifier.v1) and its health service.

    with Client("localhost:8001") as client:
        for p in client.classify([Path("shoe.png").read_bytes()], model="fashion"):
            print(p.label, p.confidence, p.bottleneck_x, p.bottleneck_y)

Every failure is a `ClientError` carrying the `grpc.StatusCode`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service._proto.classifier.v1 import classifier_pb2 as pb
from service._proto.classifier.v1 import classifier_pb2_grpc as pb_grpc
from service.bottleneck_map import BottleneckMap, Centroid
from service.config import MiB, channel_options
from service.predictions import ClassScore, Prediction

DEFAULT_TIMEOUT_S = 30.0


class ClientError(Exception):
    """An RPC failed; `code` is the grpc.StatusCode, `message` the server's explanation."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message


@dataclass(frozen=True)
class ModelInfo:
    name: str
    version: int
    versions: tuple[int, ...]
    labels: tuple[str, ...]
    input_shape: tuple[int, int, int]  # (H, W, C) uint8
    execution_providers: tuple[str, ...]
    metadata: dict[str, Any]
    bottleneck_map: BottleneckMap | None = None  # None: see map_absent_reason
    map_absent_reason: str = ""


class Client:
    """Connects lazily; use as a context manager (or call `close`).

    target: "host:port". token: sent as `authorization: Bearer <token>`. tls: use TLS, trusting
    `root_certificates` (PEM bytes; None: the system's roots). timeout_s: per call, None for no
    deadline. max_message_bytes: the largest request or response (default 64 MiB, as the server).
    """

    def __init__(
        self,
        target: str,
        *,
        token: str | None = None,
        tls: bool = False,
        root_certificates: bytes | None = None,
        timeout_s: float | None = DEFAULT_TIMEOUT_S,
        max_message_bytes: int = 64 * MiB,
    ) -> None:
        options = channel_options(max_message_bytes)
        if tls:
            credentials = grpc.ssl_channel_credentials(root_certificates)
            self._channel = grpc.secure_channel(target, credentials, options=options)
        else:
            self._channel = grpc.insecure_channel(target, options=options)
        self.target = target
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self._timeout_s = timeout_s
        self._stub = pb_grpc.ClassifierStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def _call(self, method: Any, request: Any, timeout_s: float | None = None) -> Any:
        try:
            return method(request, timeout=timeout_s or self._timeout_s, metadata=self._metadata)
        except grpc.RpcError as exc:
            raise _error(exc, self.target) from None

    def classify(
        self,
        images: Sequence[bytes | np.ndarray | Path],
        model: str,
        version: int = 0,
        top_k: int = 5,
        timeout_s: float | None = None,
    ) -> list[Prediction]:
        """One Prediction per image, in order. An image is an encoded file (bytes, or a Path
        to read) or raw (H, W, C) uint8 pixels. A bad image comes back with `error_code` set;
        a failure of the whole call (unknown model, unreachable server) raises ClientError;
        an unreadable Path raises OSError and a malformed array ValueError, before any call."""
        request = pb.ClassifyRequest(
            model=model, version=version, top_k=top_k, images=[_image(item) for item in images]
        )
        response = self._call(self._stub.Classify, request, timeout_s)
        return [_prediction(r, response.model, response.version) for r in response.results]

    def list_models(self) -> dict[str, list[int]]:
        """{model name: ready versions, ascending}."""
        response = self._call(self._stub.ListModels, pb.ListModelsRequest())
        return {m.name: list(m.versions) for m in response.models}

    def get_model(self, name: str, version: int = 0) -> ModelInfo:
        r = self._call(self._stub.GetModel, pb.GetModelRequest(name=name, version=version))
        return ModelInfo(
            name=r.name,
            version=r.version,
            versions=tuple(r.versions),
            labels=tuple(r.labels),
            input_shape=(r.input.height, r.input.width, r.input.channels),
            execution_providers=tuple(r.execution_providers),
            metadata=json.loads(r.metadata_json) if r.metadata_json else {},
            bottleneck_map=_map(r) if r.HasField("map") else None,
            map_absent_reason=r.map_absent_reason,
        )

    def health(self, service: str = "") -> str:
        """ "SERVING", "NOT_SERVING", ... for the server ("") or a model name."""
        request = health_pb2.HealthCheckRequest(service=service)
        response = self._call(self._health.Check, request)
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(response.status))

    def wait_ready(self, timeout_s: float = 60.0, service: str = "") -> None:
        """Block until health says SERVING; ClientError(DEADLINE_EXCEEDED) after timeout_s."""
        deadline = time.monotonic() + timeout_s
        request = health_pb2.HealthCheckRequest(service=service)
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ClientError(
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                    f"{self.target} not SERVING after {timeout_s} s",
                )
            try:
                for update in self._health.Watch(
                    request, timeout=remaining, metadata=self._metadata, wait_for_ready=True
                ):
                    if update.status == health_pb2.HealthCheckResponse.SERVING:
                        return
            except grpc.RpcError as exc:
                if exc.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED):
                    raise _error(exc, self.target) from None
                time.sleep(min(0.05, max(remaining, 0)))  # server restarting: retry the watch


def _map(response: pb.GetModelResponse) -> BottleneckMap:
    m = response.map
    return BottleneckMap(
        labels=tuple(response.labels),
        x=tuple(m.x),
        y=tuple(m.y),
        label=tuple(m.label_index),
        centroids=tuple(Centroid(c.label_index, c.label, c.x, c.y, c.count) for c in m.centroids),
        extent=(m.x_min, m.x_max, m.y_min, m.y_max),
        source=m.source,
        document={},
    )


def _image(item: bytes | np.ndarray | Path) -> pb.Image:
    if isinstance(item, Path):
        return pb.Image(encoded=item.read_bytes(), id=str(item))
    if isinstance(item, np.ndarray):
        if item.ndim == 2:
            item = item[:, :, None]
        if item.ndim != 3 or item.dtype != np.uint8:
            raise ValueError(f"raw pixels must be (H, W, C) uint8, got {item.shape} {item.dtype}")
        h, w, c = item.shape
        tensor = pb.Tensor(height=h, width=w, channels=c, data=np.ascontiguousarray(item).tobytes())
        return pb.Image(tensor=tensor)
    return pb.Image(encoded=bytes(item))


def _prediction(result: pb.Result, model: str, version: int) -> Prediction:
    return Prediction(
        index=result.index,
        model=model,
        version=version,
        id=result.id,
        label=result.label,
        label_index=result.label_index if not result.HasField("error") else -1,
        confidence=result.confidence,
        top_k=tuple(ClassScore(s.label, s.index, s.score) for s in result.top_k),
        probabilities=tuple(result.probabilities),
        bottleneck_x=result.bottleneck_x,
        bottleneck_y=result.bottleneck_y,
        error_code=result.error.code,
        error=result.error.message,
    )


def _error(exc: grpc.RpcError, target: str) -> ClientError:
    code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
    details = exc.details() if hasattr(exc, "details") else str(exc)
    if code == grpc.StatusCode.UNAVAILABLE and "connect" in (details or "").lower():
        details = f"cannot reach {target}: {details}"
    return ClientError(code, details or code.name)
