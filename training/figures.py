"""The run's figures: learning curves, confusion matrix, bottleneck plane, first-layer filters."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; never a window

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

_DPI = 120


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=_DPI)
    plt.close(fig)
    return path


def learning_curves(path: Path, rows: Sequence[dict[str, Any]], title: str) -> Path:
    """Loss and accuracy per epoch, training and validation side by side."""
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    epochs = [row["epoch"] for row in rows]
    phases = sorted({row.get("phase", "") for row in rows})
    for ax, key, name in ((ax_loss, "loss", "loss"), (ax_acc, "accuracy", "accuracy")):
        ax.plot(epochs, [r[key] for r in rows], "o-", ms=3, label=f"training {name}")
        ax.plot(epochs, [r[f"val_{key}"] for r in rows], "s-", ms=3, label=f"validation {name}")
        for phase in phases[1:]:
            start = next(r["epoch"] for r in rows if r.get("phase") == phase)
            ax.axvline(start - 0.5, color="grey", ls="--", lw=1)
            ax.text(start - 0.4, ax.get_ylim()[1], phase, va="top", fontsize=8, color="grey")
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    return _save(fig, path)


def confusion(path: Path, matrix: np.ndarray, labels: Sequence[str], title: str) -> Path:
    """Row-normalised confusion matrix with the counts written in each cell."""
    matrix = np.asarray(matrix)
    rates = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    size = max(5.0, 0.6 * len(labels) + 2)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    image = ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(image, ax=ax, fraction=0.046, label="share of the true class")
    ticks = np.arange(len(labels))
    ax.set_xticks(ticks, labels, rotation=45, ha="right")
    ax.set_yticks(ticks, labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if len(labels) <= 20:
        for i in range(len(labels)):
            for j in range(len(labels)):
                color = "white" if rates[i, j] > 0.5 else "black"
                ax.text(j, i, str(matrix[i, j]), ha="center", va="center", fontsize=7, color=color)
    ax.set_title(title)
    return _save(fig, path)


def _scatter(ax: Any, points: np.ndarray, classes: np.ndarray, labels: Sequence[str]) -> None:
    cmap = plt.get_cmap("tab10" if len(labels) <= 10 else "tab20")
    for index, label in enumerate(labels):
        mask = classes == index
        ax.scatter(
            points[mask, 0],
            points[mask, 1],
            s=4,
            alpha=0.5,
            color=cmap(index % cmap.N),
            label=label,
            rasterized=True,
        )
    ax.set_xlabel("bottleneck x")
    ax.set_ylabel("bottleneck y")
    ax.grid(alpha=0.3)
    legend = ax.legend(markerscale=3, fontsize=8, loc="best", framealpha=0.8)
    for handle in legend.legend_handles:
        if handle is not None:
            handle.set_alpha(1)


def bottleneck(
    path: Path, points: np.ndarray, classes: np.ndarray, labels: Sequence[str], title: str
) -> Path:
    """The test set in the 2-D bottleneck plane, coloured by true class."""
    fig, ax = plt.subplots(figsize=(7, 6))
    _scatter(ax, points, classes, labels)
    ax.set_title(title)
    return _save(fig, path)


def bottleneck_pair(
    path: Path,
    before: np.ndarray,
    after: np.ndarray,
    classes: np.ndarray,
    labels: Sequence[str],
    titles: tuple[str, str],
) -> Path:
    """Two bottleneck planes side by side (transfer: after pretraining, after retraining)."""
    fig, axes = plt.subplots(1, 2, figsize=(13, 6))
    for ax, points, title in zip(axes, (before, after), titles, strict=True):
        _scatter(ax, points, classes, labels)
        ax.set_title(title)
    return _save(fig, path)


def filters(path: Path, kernel: np.ndarray, title: str) -> Path:
    """First-layer filters, one tile per (output filter, input channel)."""
    kernel = np.asarray(kernel)  # (kh, kw, in, out)
    _, _, n_in, n_out = kernel.shape
    cols = min(n_out, 8)
    rows = int(np.ceil(n_out / cols)) * n_in
    width = max(1.3 * cols, 6.0)  # room for the title even with four filters
    fig, axes = plt.subplots(rows, cols, figsize=(width, 1.3 * rows + 0.9), squeeze=False)
    limit = float(np.abs(kernel).max()) or 1.0
    for ax in axes.flat:
        ax.axis("off")
    for f in range(n_out):
        for c in range(n_in):
            ax = axes[(f // cols) * n_in + c, f % cols]
            ax.imshow(kernel[:, :, c, f], cmap="RdBu_r", vmin=-limit, vmax=limit)
            ax.set_title(f"#{f}" + (f" ch{c}" if n_in > 1 else ""), fontsize=7)
    fig.suptitle(f"{title}\nweights: red > 0 > blue")
    return _save(fig, path)
