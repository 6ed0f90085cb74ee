"""Rebuild tests/data/fashion-mnist/: a stratified real sample of Fashion-MNIST in its own format.

    python tests/data/make_fashion_mnist_sample.py [SOURCE_DIR]

2,000 training images (200 per class) and 500 test images (50 per class), drawn with a fixed
seed from the full dataset (default source: Debian's /usr/share/datasets/fashion-mnist) and
written as gzipped IDX files under the original names.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from training.data import (
    DEBIAN_FASHION_MNIST,
    FASHION_MNIST_FILES,
    read_fashion_mnist_dir,
    write_idx,
)

PER_CLASS = {"train": 200, "test": 50}
SEED = 20261123


def stratified(labels: np.ndarray, per_class: int, rng: np.random.Generator) -> np.ndarray:
    picked = [rng.choice(np.flatnonzero(labels == c), per_class, replace=False) for c in range(10)]
    return rng.permutation(np.concatenate(picked))


def main() -> None:
    source = Path(sys.argv[1]) if len(sys.argv) > 1 else DEBIAN_FASHION_MNIST
    data = read_fashion_mnist_dir(source)
    out = Path(__file__).parent / "fashion-mnist"
    out.mkdir(exist_ok=True)
    rng = np.random.default_rng(SEED)
    for split, x, y in (("train", data.x_train, data.y_train), ("test", data.x_test, data.y_test)):
        index = stratified(y, PER_CLASS[split], rng)
        write_idx(out / f"{FASHION_MNIST_FILES['x_' + split]}.gz", x[index, :, :, 0])
        write_idx(out / f"{FASHION_MNIST_FILES['y_' + split]}.gz", y[index].astype(np.uint8))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
