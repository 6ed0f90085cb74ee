"""What a finished scoring job reports: the summary (FILE.summary.json and one line on stdout)
and the bottleneck map (FILE.bottleneck.png), both computed from the final table."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from service.bottleneck_map import BottleneckMap
from service.bottleneck_map import draw as draw_map
from service.scoring.table import atomically

ERROR_EXAMPLES = 20
PLOT_POINTS = 20_000  # more points only blacken the picture; a fixed random subset is drawn


def summarize(rows: pa.Table, labels: tuple[str, ...], facts: dict[str, Any]) -> dict[str, Any]:
    """The summary of the final table; `facts` (engine, timings, skipped, ...) are merged in."""
    columns = rows.select(["path", "label", "error", "true_label"]).to_pydict()
    ok = [e is None for e in columns["error"]]
    predicted = [lab for lab, good in zip(columns["label"], ok, strict=True) if good]
    summary: dict[str, Any] = {
        "counts": {
            "images": rows.num_rows,
            "scored": sum(ok),
            "errors": rows.num_rows - sum(ok),
            "skipped": facts.get("skipped", 0),
        }
    }
    summary |= {key: value for key, value in facts.items() if key != "skipped"}
    summary["predicted_labels"] = {label: predicted.count(label) for label in labels}
    summary |= _accuracy(columns, ok, labels)
    summary["error_examples"] = [
        {"path": path, "error": error}
        for path, error in zip(columns["path"], columns["error"], strict=True)
        if error is not None
    ][:ERROR_EXAMPLES]
    return summary


def _accuracy(columns: dict[str, list], ok: list[bool], labels: tuple[str, ...]) -> dict[str, Any]:
    pairs = [
        (truth, label)
        for truth, label, good in zip(columns["true_label"], columns["label"], ok, strict=True)
        if good and truth is not None
    ]
    if not pairs:
        return {"labelled": 0, "accuracy": None, "confusion_matrix": None}
    index = {label: i for i, label in enumerate(labels)}
    matrix = np.zeros((len(labels), len(labels)), dtype=np.int64)
    for truth, label in pairs:
        matrix[index[truth], index[label]] += 1
    return {
        "labelled": len(pairs),
        "accuracy": float(np.trace(matrix) / len(pairs)),
        "confusion_matrix": {
            "rows": "true label",
            "columns": "predicted label",
            "labels": list(labels),
            "matrix": matrix.tolist(),
        },
    }


def summary_line(summary: dict[str, Any]) -> str:
    counts, run = summary["counts"], summary["this_run"]
    errors = f"{counts['errors']:,} error{'' if counts['errors'] == 1 else 's'}"
    line = (
        f"{counts['images']:,} images: {counts['scored']:,} scored, {errors} "
        f"({counts['skipped']:,} other files skipped) with {summary['model']} "
        f"v{summary['version']}, {summary['engine']} engine; this run {run['scored']:,} in "
        f"{run['seconds']:.1f} s ({run['images_per_second']:,.0f} images/s)"
    )
    if summary["accuracy"] is not None:
        line += f"; accuracy {summary['accuracy']:.4f} on {summary['labelled']:,} labelled"
    if summary.get("unreadable_folders"):
        folders = summary["unreadable_folders"]
        line += (
            f"; WARNING: {len(folders):,} folders could not be listed ({', '.join(folders[:3])}): "
            "their files have no new rows"
        )
    return line


def write_summary(summary: dict[str, Any], path: Path) -> None:
    text = json.dumps(summary, indent=2, ensure_ascii=False)
    # One line per row of numbers (the confusion matrix), not one line per number.
    text = re.sub(r"\[\s+([-\d.,\s]+?)\s+\]", lambda m: f"[{' '.join(m[1].split())}]", text)
    with atomically(path) as temporary:
        temporary.write_text(text + "\n", encoding="utf-8")


def plot_bottleneck(
    rows: pa.Table,
    labels: tuple[str, ...],
    title: str,
    path: Path,
    background: BottleneckMap | None = None,
) -> None:
    """The scored images in the bottleneck plane, one colour per true label when every scored
    image has one, else per predicted label; drawn on the version's map (faint) when it has
    one."""
    import matplotlib  # noqa: PLC0415 - slow import, only at the end of a job

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    good = rows.filter(rows["error"].is_null())
    truth = good["true_label"]
    by_truth = good.num_rows > 0 and truth.null_count == 0
    colour_by = truth if by_truth else good["label"]
    names = np.array(colour_by.to_pylist(), dtype=object)
    x = good["bottleneck_x"].to_numpy(zero_copy_only=False)
    y = good["bottleneck_y"].to_numpy(zero_copy_only=False)
    shown = np.arange(good.num_rows)
    if len(shown) > PLOT_POINTS:
        shown = np.sort(np.random.default_rng(0).choice(len(shown), PLOT_POINTS, replace=False))
    figure, axes = plt.subplots(figsize=(8, 6.5), dpi=110)
    colours = plt.get_cmap("tab10" if len(labels) <= 10 else "tab20")
    size = 14 if len(shown) < 2000 else 5
    if background is not None:
        draw_map(axes, background, colours)
    for i, label in enumerate(labels):
        mine = shown[names[shown] == label]
        if len(mine):
            axes.scatter(
                x[mine], y[mine], s=size, alpha=0.7, color=colours(i % colours.N), label=label
            )
    if not len(shown):
        axes.text(0.5, 0.5, "no image was scored", ha="center", transform=axes.transAxes)
    axes.set_xlabel("bottleneck x")
    axes.set_ylabel("bottleneck y")
    subset = f", {len(shown):,} of {good.num_rows:,} shown" if len(shown) < good.num_rows else ""
    colouring = "true" if by_truth else "predicted"
    behind = f"; faint: the map ({background.source})" if background is not None else ""
    axes.set_title(
        f"{title}: {good.num_rows:,} images\ncoloured by {colouring} label{subset}{behind}"
    )
    if len(shown):
        axes.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), markerscale=2, frameon=False)
    figure.tight_layout()
    try:
        with atomically(path) as temporary:
            figure.savefig(temporary, format="png")
    finally:
        plt.close(figure)
