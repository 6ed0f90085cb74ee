"""The bottleneck map of a version: where the run's test set lies in the 2-D bottleneck plane.

`python -m export` writes it into every version as `bottleneck_map.json` (its sha256 in
metadata.json under `bottleneck_map`), computed with the exported ONNX file itself, so the map
shows exactly the coordinates the server answers. The server hands it out (GetModel,
`GET /v1/models/{m}/map`), the page draws it, and the classify and score plots put new images
on it. Re-exporting an old run makes one, as long as its dataset can still be read.

The file (format "cnn-serving/bottleneck-map/1"):

    {"format": "cnn-serving/bottleneck-map/1",
     "labels": ["T-shirt/top", ...],                  # output order
     "source": {"dataset": "fashion-mnist", "split": "test", "size": 10000},
     "points": {"x": [...], "y": [...], "label": [...]},   # at most 5,000, stratified by class
     "centroids": [{"label_index": 0, "label": "T-shirt/top", "x": .., "y": .., "count": 1000}],
     "extent": {"x_min": .., "x_max": .., "y_min": .., "y_max": ..}}

Centroids and extent are over the whole test set; the points are a sample drawn per class in
proportion to its size (every point when the test set has at most 5,000), with a fixed seed.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

FILE = "bottleneck_map.json"
FORMAT = "cnn-serving/bottleneck-map/1"
MAX_POINTS = 5000
SEED = 0
BATCH = 256


def bottleneck_of(onnx_path: Path, images: np.ndarray) -> np.ndarray:
    """(N, H, W, C) uint8 -> (N, 2) float32 bottleneck coordinates, by onnxruntime on the CPU."""
    import onnxruntime as ort  # noqa: PLC0415 - only export needs it here

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    parts = [
        session.run(["bottleneck"], {name: images[start : start + BATCH]})[0]
        for start in range(0, len(images), BATCH)
    ]
    return np.concatenate(parts).astype(np.float32)


def sample(classes: np.ndarray, limit: int = MAX_POINTS, seed: int = SEED) -> np.ndarray:
    """Indices of at most `limit` points, each class in proportion to its size (at least one
    point for every class present), in ascending order."""
    if len(classes) <= limit:
        return np.arange(len(classes))
    rng = np.random.default_rng(seed)
    present, counts = np.unique(classes, return_counts=True)
    quotas = np.maximum(1, np.floor(counts * limit / len(classes))).astype(int)
    while quotas.sum() > limit:  # many tiny classes, each kept once: trim the largest share
        quotas[np.argmax(quotas)] -= 1
    chosen = [
        rng.choice(np.flatnonzero(classes == c), size=min(q, n), replace=False)
        for c, q, n in zip(present, quotas, counts, strict=True)
    ]
    return np.sort(np.concatenate(chosen))


def build(
    points: np.ndarray, classes: np.ndarray, labels: list[str], source: dict[str, Any]
) -> dict[str, Any]:
    """The map document for (N, 2) `points` of true classes (N,)."""
    keep = sample(classes)
    centroids = [
        {
            "label_index": int(c),
            "label": labels[int(c)],
            "x": _round(points[classes == c, 0].mean()),
            "y": _round(points[classes == c, 1].mean()),
            "count": int((classes == c).sum()),
        }
        for c in np.unique(classes)
    ]
    return {
        "format": FORMAT,
        "labels": list(labels),
        "source": source,
        "points": {
            "x": [_round(v) for v in points[keep, 0]],
            "y": [_round(v) for v in points[keep, 1]],
            "label": [int(c) for c in classes[keep]],
        },
        "centroids": centroids,
        "extent": {
            "x_min": _round(points[:, 0].min()),
            "x_max": _round(points[:, 0].max()),
            "y_min": _round(points[:, 1].min()),
            "y_max": _round(points[:, 1].max()),
        },
    }


def _round(value: Any) -> float:
    return float(f"{float(value):.6g}")  # a float32 has about 7 significant digits


def write(folder: Path, document: dict[str, Any]) -> dict[str, Any]:
    """Write the map into a version folder; returns its entry for metadata.json."""
    data = (json.dumps(document, separators=(",", ":")) + "\n").encode()
    (folder / FILE).write_bytes(data)
    return {
        "file": FILE,
        "format": FORMAT,
        "sha256": hashlib.sha256(data).hexdigest(),
        "points": len(document["points"]["x"]),
        "source": document["source"],
    }


def make(folder: Path, onnx_path: Path, config: dict[str, Any]) -> dict[str, Any]:
    """The map of the run's test set in `folder`, or, when the dataset cannot be read again,
    no file and an entry saying why (logged as a warning: the version still serves)."""
    from training.errors import TrainingError  # noqa: PLC0415

    try:
        x_test, y_test, fingerprint_ok = _test_set(config)
    except (OSError, ValueError, KeyError, TypeError, TrainingError) as exc:
        # the run's data is gone or unreadable: say so, export anyway
        reason = f"the run's test set cannot be read again ({type(exc).__name__}: {exc})"
        log.warning("no bottleneck map: %s", reason)
        return {"file": None, "reason": reason}
    if not fingerprint_ok:
        reason = "the run's dataset changed since training (fingerprint differs)"
        log.warning("no bottleneck map: %s", reason)
        return {"file": None, "reason": reason}
    try:
        points = bottleneck_of(onnx_path, x_test)
    except (RuntimeError, ValueError, MemoryError) as exc:  # onnxruntime's errors
        reason = f"the test set could not be run through the model ({type(exc).__name__}: {exc})"
        log.warning("no bottleneck map: %s", reason)
        return {"file": None, "reason": reason}
    dataset = config["dataset"]
    source = {"dataset": dataset["name"], "split": "test", "size": int(len(x_test))}
    entry = write(folder, build(points, y_test, list(dataset["labels"]), source))
    log.info("bottleneck map: %d of %d test images", entry["points"], len(x_test))
    return entry


def _test_set(config: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, bool]:
    from training.config import TrainConfig  # noqa: PLC0415 - TensorFlow-free, but heavy
    from training.run import load_dataset  # noqa: PLC0415

    data = load_dataset(TrainConfig.from_json(config["config"]))
    expected = config["dataset"].get("fingerprint")
    return data.x_test, data.y_test, expected is None or expected == data.fingerprint()
