"""The run's figures: learning curves, confusion matrix, bottleneck plane, first-layer filters,
the feature maps of the convolutional layers, and the test images most confidently misread."""

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
    phases = list(dict.fromkeys(row.get("phase", "") for row in rows))  # in the order they ran
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


def _show_image(ax: Any, image: np.ndarray) -> None:
    """One (H, W, C) uint8 image as pixels: gray for one channel, RGB for three."""
    if image.shape[-1] == 1:
        ax.imshow(image[..., 0], cmap="gray", vmin=0, vmax=255, interpolation="nearest")
    else:
        ax.imshow(image, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])


def mosaic(maps: np.ndarray, count: int) -> np.ndarray:
    """The first `count` maps of (H, W, C) as one 2-D array of tiles (each scaled to its own
    range, 0-1) with a one-pixel NaN gap; columns a power of two, about square."""
    h, w, _ = maps.shape
    cols = 2 ** int(np.ceil(np.log2(np.sqrt(count)))) if count > 1 else 1
    rows = int(np.ceil(count / cols))
    sheet = np.full((rows * (h + 1) - 1, cols * (w + 1) - 1), np.nan)
    for index in range(count):
        tile = maps[..., index].astype(np.float64)
        span = tile.max() - tile.min()
        tile = (tile - tile.min()) / span if span > 0 else np.zeros_like(tile)
        r, c = divmod(index, cols)
        sheet[r * (h + 1) : r * (h + 1) + h, c * (w + 1) : c * (w + 1) + w] = tile
    return sheet


def activations(
    path: Path,
    images: np.ndarray,
    classes: Sequence[str],
    maps: Sequence[tuple[str, np.ndarray]],
    title: str,
    max_maps: int = 16,
) -> Path:
    """One row per image (one test image per class): the image, then each convolutional
    layer's feature maps as a mosaic (at most `max_maps` of them, each scaled to its range)."""
    rows, cols = len(images), 1 + len(maps)
    fig, axes = plt.subplots(
        rows, cols, figsize=(1.8 + 2.7 * len(maps), 1.6 * rows + 1.0), squeeze=False
    )
    cmap = plt.get_cmap("viridis").with_extremes(bad="white")
    for row, (image, name) in enumerate(zip(images, classes, strict=True)):
        _show_image(axes[row, 0], image)
        axes[row, 0].set_ylabel(name, rotation=0, ha="right", va="center", fontsize=10)
        for ax in axes[row, 1:]:
            ax.axis("off")
        for col, (_, outputs) in enumerate(maps, start=1):
            count = min(outputs.shape[-1], max_maps)
            axes[row, col].imshow(mosaic(outputs[row], count), cmap=cmap, interpolation="nearest")
    axes[0, 0].set_title("test image", fontsize=10)
    for col, (layer, outputs) in enumerate(maps, start=1):
        _, h, w, c = outputs.shape
        shown = f"\nfirst {max_maps} of {c} maps" if c > max_maps else ""
        axes[0, col].set_title(f"{layer}: {h}x{w}x{c}{shown}", fontsize=10)
    fig.suptitle(f"{title}\neach feature map scaled to its own range: dark low, yellow high")
    return _save(fig, path)


def misread(
    path: Path,
    images: np.ndarray,
    captions: Sequence[str],
    title: str,
    columns: int = 4,
) -> Path:
    """The given (N, H, W, C) uint8 test images in a grid, each with its caption (true and
    predicted label); a short note instead when there are none."""
    count = len(images)
    cols = max(1, min(columns, count))
    rows = max(1, int(np.ceil(count / cols)))
    fig, axes = plt.subplots(
        rows, cols, figsize=(2.6 * cols + 0.4, 2.7 * rows + 0.9), squeeze=False
    )
    for ax in axes.flat:
        ax.axis("off")
    for ax, image, caption in zip(axes.flat, images, captions, strict=False):
        _show_image(ax, image)
        ax.axis("on")
        for spine in ax.spines.values():
            spine.set_visible(False)
        ax.set_title(caption, fontsize=9)
    if not count:
        axes[0, 0].text(0.5, 0.5, "no test image is misread", ha="center", va="center")
    fig.suptitle(title)
    return _save(fig, path)
