"""`Prediction`: one image's answer, the same whether it came from the in-process engine, the
gRPC client or a scoring job."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

DEFAULT_TOP_K = 5


@dataclass(frozen=True)
class ClassScore:
    label: str
    index: int
    score: float


@dataclass(frozen=True)
class Prediction:
    index: int  # position of the image in its request
    model: str
    version: int
    id: str = ""
    label: str = ""
    label_index: int = -1
    confidence: float = 0.0
    top_k: tuple[ClassScore, ...] = ()
    probabilities: tuple[float, ...] = field(default=(), repr=False)
    bottleneck_x: float = 0.0
    bottleneck_y: float = 0.0
    error_code: str = ""  # a grpc.StatusCode name when this image failed
    error: str = ""

    @property
    def ok(self) -> bool:
        return not self.error_code


def from_outputs(
    index: int,
    probabilities: np.ndarray,  # (K,) float32
    bottleneck: np.ndarray,  # (2,) float32
    labels: tuple[str, ...],
    model: str,
    version: int,
    top_k: int = DEFAULT_TOP_K,
    image_id: str = "",
) -> Prediction:
    k = min(top_k or DEFAULT_TOP_K, len(labels))
    order = np.argsort(-probabilities, kind="stable")[:k]
    best = int(order[0])
    return Prediction(
        index=index,
        model=model,
        version=version,
        id=image_id,
        label=labels[best],
        label_index=best,
        confidence=float(probabilities[best]),
        top_k=tuple(ClassScore(labels[i], int(i), float(probabilities[i])) for i in order),
        probabilities=tuple(float(p) for p in probabilities),
        bottleneck_x=float(bottleneck[0]),
        bottleneck_y=float(bottleneck[1]),
    )


def failed(
    index: int, model: str, version: int, code: str, message: str, image_id: str = ""
) -> Prediction:
    return Prediction(
        index=index, model=model, version=version, id=image_id, error_code=code, error=message
    )
