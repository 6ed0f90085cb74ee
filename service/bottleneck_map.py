"""A version's bottleneck map (`bottleneck_map.json`, written by `python -m export`; its format is
in export/bottleneck_map.py): where the run's test set lies in the 2-D bottleneck plane.

`load(spec)` reads and checks it once per version (sha256 from metadata.json, shapes, label
indices). A version exported before maps existed, or whose map is damaged, still serves
everything; its map is absent, with the reason (logged once for a damaged one).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from service.errors import ServingError
from service.predictions import Prediction
from service.repository import ModelSpec

log = logging.getLogger(__name__)

FORMAT = "cnn-serving/bottleneck-map/1"


@dataclass(frozen=True)
class Centroid:
    label_index: int
    label: str
    x: float
    y: float
    count: int


@dataclass(frozen=True)
class BottleneckMap:
    labels: tuple[str, ...]
    x: tuple[float, ...]  # the sampled points
    y: tuple[float, ...]
    label: tuple[int, ...]  # their true class (index into labels)
    centroids: tuple[Centroid, ...]  # over the whole source set
    extent: tuple[float, float, float, float]  # x_min, x_max, y_min, y_max
    source: str  # e.g. "fashion-mnist test set, 10,000 images"
    document: dict[str, Any]  # the file as written, for HTTP


@dataclass(frozen=True)
class Found:
    map: BottleneckMap | None
    reason: str = ""  # why there is none


def load(spec: ModelSpec) -> Found:
    entry = spec.metadata.get("bottleneck_map")
    if not isinstance(entry, dict) or not entry.get("file"):
        reason = (entry or {}).get("reason") if isinstance(entry, dict) else None
        return Found(None, reason or "exported before bottleneck maps existed (re-export it)")
    key = (str(spec.path / str(entry["file"])), str(entry.get("sha256", "")))
    found = _maps.get(key)
    if found is None:
        found = _read(key[0], key[1], spec)
        if found.map is not None:  # a failure (even a passing one: EMFILE) is tried again
            if len(_maps) >= MAX_CACHED:
                _maps.pop(next(iter(_maps)))
            _maps[key] = found
    return found


MAX_CACHED = 256  # maps kept parsed (one per version folder and digest)
_maps: dict[tuple[str, str], Found] = {}


def _read(path: str, sha256: str, spec: ModelSpec) -> Found:
    try:
        with open(path, "rb") as handle:
            data = handle.read()
        if hashlib.sha256(data).hexdigest() != sha256:
            raise ValueError("its sha256 differs from metadata.json's")
        return Found(parse(json.loads(data), spec.labels))
    except (OSError, ValueError, KeyError, TypeError, IndexError) as exc:
        reason = f"the version's bottleneck map is unusable ({exc})"  # no server path in it
        log.error("model %r version %d: %s: %s; serving without it", spec.name, spec.version,
                  path, reason)  # fmt: skip
        return Found(None, reason)


def parse(document: dict[str, Any], model_labels: tuple[str, ...] | None = None) -> BottleneckMap:
    """Check and read a map; `model_labels`: the version's, which the map must repeat."""
    if document.get("format") != FORMAT:
        raise ValueError(f"format {document.get('format')!r} is not {FORMAT!r}")
    labels = tuple(str(label) for label in document["labels"])
    if model_labels is not None and labels != model_labels:
        raise ValueError("its labels are not the model's")
    points = document["points"]
    x, y = tuple(map(float, points["x"])), tuple(map(float, points["y"]))
    classes = tuple(map(int, points["label"]))
    if not len(x) == len(y) == len(classes):
        raise ValueError("its point columns differ in length")
    if any(not 0 <= c < len(labels) for c in classes):
        raise ValueError("a point's label is not one of the model's")
    centroids = tuple(
        Centroid(
            int(c["label_index"]), str(c["label"]), float(c["x"]), float(c["y"]), int(c["count"])
        )
        for c in document["centroids"]
    )
    if any(not 0 <= c.label_index < len(labels) for c in centroids):
        raise ValueError("a centroid's label is not one of the model's")
    e = document["extent"]
    numbers = (*x, *y, *(v for c in centroids for v in (c.x, c.y)), *map(float, e.values()))
    if not all(math.isfinite(v) for v in numbers):
        raise ValueError("it holds a coordinate that is not a finite number")
    source = document["source"]
    return BottleneckMap(
        labels=labels,
        x=x,
        y=y,
        label=classes,
        centroids=centroids,
        extent=(float(e["x_min"]), float(e["x_max"]), float(e["y_min"]), float(e["y_max"])),
        source=f"{source['dataset']} {source['split']} set, {int(source['size']):,} images",
        document=document,
    )


def draw(axes: Any, found: BottleneckMap, colours: Any, alpha: float = 0.18) -> None:
    """The map's class clouds, faint, with each class's name at its centroid: the background
    that new images are drawn on (`classify --plot`, the scoring job's plot)."""
    import numpy as np  # noqa: PLC0415

    x, y, label = np.asarray(found.x), np.asarray(found.y), np.asarray(found.label)
    for index in range(len(found.labels)):
        mine = label == index
        if mine.any():
            axes.scatter(x[mine], y[mine], s=6, alpha=alpha, color=colours(index % colours.N),
                         linewidths=0, label="_nolegend_")  # fmt: skip
    for c in found.centroids:
        axes.annotate(c.label, (c.x, c.y), ha="center", va="center", fontsize=8, alpha=0.75,
                      color=colours(c.label_index % colours.N), weight="bold")  # fmt: skip


def plot_images(path: Path, found: Found, predictions: Sequence[Prediction], title: str) -> None:
    """Classified images as marked points, labelled by file name, on the version's map (its
    class clouds; without one, the points alone and the reason in the title), into a PNG."""
    import matplotlib  # noqa: PLC0415 - slow import, only when asked for a plot

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    good = [p for p in predictions if p.ok]
    names = [Path(p.id).name or str(p.index) for p in good]
    if len(set(names)) < len(names):  # e.g. 0001.png in several folders: say which
        names = [str(Path(*Path(p.id).parts[-2:])) if p.id else str(p.index) for p in good]
    figure, axes = plt.subplots(figsize=(8, 6.5), dpi=110)
    labels = found.map.labels if found.map else tuple(p.label for p in good)
    colours = plt.get_cmap("tab10" if len(labels) <= 10 else "tab20")
    if found.map is not None:
        draw(axes, found.map, colours, alpha=0.25)
    for p, name in zip(good, names, strict=True):
        axes.scatter(
            [p.bottleneck_x],
            [p.bottleneck_y],
            s=90,
            marker="*",
            zorder=3,
            color=colours(p.label_index % colours.N),
            edgecolors="black",
            linewidths=0.8,
        )
        axes.annotate(name, (p.bottleneck_x, p.bottleneck_y),
                      xytext=(6, 6), textcoords="offset points", fontsize=8, zorder=4)  # fmt: skip
    axes.set_xlabel("bottleneck x")
    axes.set_ylabel("bottleneck y")
    version = good[0].version if good else ""
    where = found.map.source if found.map else f"no map: {found.reason}"
    failed = len(predictions) - len(good)
    note = f", {failed} could not be classified" if failed else ""
    axes.set_title(f"{title} v{version}: {len(good)} images (stars){note}\nbehind: {where}",
                   fontsize=10)  # fmt: skip
    figure.tight_layout()
    try:
        figure.savefig(path, format="png")
    except OSError as exc:
        raise ServingError(f"--plot {path}: {exc.strerror}") from exc
    finally:
        plt.close(figure)
