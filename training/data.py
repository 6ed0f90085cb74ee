"""Datasets: Fashion-MNIST from IDX files and labelled image folders.

Both loaders return a `Dataset` of raw `uint8` NHWC pixels and integer labels; scaling and
resizing to the network's needs are layers of the model, not steps here, with one exception:
image files are decoded to the model's input size by the one image policy (imaging/policy.py),
the function the server decodes them with, so a model is served the pixels it was trained on.
A file that does not decode is skipped with one warning line naming it (or, with --strict, is
an error); the skipped files are part of the Dataset and of the run's config.json.

Fashion-MNIST is looked up in this order: `--data-dir`, then Debian's
`/usr/share/datasets/fashion-mnist/` (package `dataset-fashion-mnist`), then Keras's downloader.
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from imaging import policy
from training.errors import DataError

log = logging.getLogger(__name__)

FASHION_MNIST_LABELS = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_FILES = {
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}
# The file names taken for images in a labelled folder (any case): those the server decodes.
IMAGE_EXTENSIONS = policy.IMAGE_EXTENSIONS

_IDX_DTYPES: dict[int, str] = {
    0x08: "u1",
    0x09: "i1",
    0x0B: ">i2",
    0x0C: ">i4",
    0x0D: ">f4",
    0x0E: ">f8",
}


@dataclass(frozen=True)
class Skipped:
    """A file of a labelled folder that the image policy refuses, and why."""

    path: Path
    reason: str


@dataclass(frozen=True)
class Dataset:
    """Images as (N, H, W, C) uint8 and labels as (N,) int64, split into train and test."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    labels: tuple[str, ...]
    source: str  # where it was read from, for reports
    name: str  # "fashion-mnist" or the folder's name
    skipped: tuple[Skipped, ...] = ()  # image files that did not decode, in folder order

    @property
    def image_shape(self) -> tuple[int, int, int]:
        h, w, c = self.x_train.shape[1:]
        return int(h), int(w), int(c)

    def fingerprint(self) -> str:
        """A sha256 over all pixels and labels: the cache key of anything derived from them."""
        digest = hashlib.sha256()
        for array in (self.x_train, self.y_train, self.x_test, self.y_test):
            digest.update(str(array.shape).encode())
            digest.update(np.ascontiguousarray(array).tobytes())
        digest.update("\n".join(self.labels).encode())
        return digest.hexdigest()


# ----------------------------------------------------------------------------- IDX files


def parse_idx(data: bytes, source: str = "<bytes>") -> np.ndarray:
    """Decode one IDX file (already gunzipped) into an array of its declared type and shape."""
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise DataError(f"{source}: not an IDX file (bad magic number)")
    dtype_code, ndim = data[2], data[3]
    if dtype_code not in _IDX_DTYPES or ndim == 0:
        raise DataError(f"{source}: not an IDX file (type 0x{dtype_code:02x}, {ndim} dims)")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{source}: truncated IDX header")
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(_IDX_DTYPES[dtype_code])
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(data) - header != expected:
        raise DataError(
            f"{source}: IDX header declares shape {shape} ({expected} bytes of data) "
            f"but the file holds {len(data) - header}"
        )
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(shape).copy()


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file, gzipped or not (told apart by content, not by name)."""
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except (OSError, EOFError) as exc:
        raise DataError(f"{path}: cannot read: {exc}") from exc
    return parse_idx(raw, str(path))


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write a uint8 array as IDX, gzipped when the name ends in .gz (deterministic bytes)."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(
        int(d).to_bytes(4, "big") for d in array.shape
    )
    payload = header + array.tobytes()
    if path.suffix == ".gz":
        payload = gzip.compress(payload, mtime=0)
    path.write_bytes(payload)


def _find_idx(directory: Path, stem: str) -> Path | None:
    for candidate in (directory / f"{stem}.gz", directory / stem):
        if candidate.is_file():
            return candidate
    return None


def read_fashion_mnist_dir(directory: Path) -> Dataset:
    """Read the four Fashion-MNIST IDX files (gzipped or not) from one directory."""
    arrays: dict[str, np.ndarray] = {}
    for key, stem in FASHION_MNIST_FILES.items():
        path = _find_idx(directory, stem)
        if path is None:
            raise DataError(f"{directory}: missing {stem}.gz (or {stem}) of Fashion-MNIST")
        arrays[key] = read_idx(path)
    for split in ("train", "test"):
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        if x.ndim != 3 or y.ndim != 1 or x.dtype != np.uint8:
            raise DataError(
                f"{directory}: {split} images must be a (N, 28, 28) uint8 IDX and labels (N,); "
                f"got {x.shape} {x.dtype} and {y.shape}"
            )
        if len(x) != len(y):
            raise DataError(f"{directory}: {len(x)} {split} images but {len(y)} labels")
        if len(y) and int(y.max()) >= len(FASHION_MNIST_LABELS):
            raise DataError(f"{directory}: {split} label {int(y.max())} is not a class (0-9)")
    return Dataset(
        x_train=arrays["x_train"][..., np.newaxis],
        y_train=arrays["y_train"].astype(np.int64),
        x_test=arrays["x_test"][..., np.newaxis],
        y_test=arrays["y_test"].astype(np.int64),
        labels=FASHION_MNIST_LABELS,
        source=str(directory),
        name="fashion-mnist",
    )


def load_fashion_mnist(data_dir: Path | None = None) -> Dataset:
    """Fashion-MNIST from `data_dir`, else Debian's package, else Keras's downloader."""
    if data_dir is not None:
        if not data_dir.is_dir():
            raise DataError(f"{data_dir}: no such directory (--data-dir)")
        return read_fashion_mnist_dir(data_dir)
    if DEBIAN_FASHION_MNIST.is_dir():
        return read_fashion_mnist_dir(DEBIAN_FASHION_MNIST)
    log.info(
        "no --data-dir and no %s: asking Keras to download Fashion-MNIST", DEBIAN_FASHION_MNIST
    )
    return _download_fashion_mnist()


def _download_fashion_mnist() -> Dataset:
    import keras  # noqa: PLC0415 - only this fallback needs Keras

    try:
        (x_train, y_train), (x_test, y_test) = keras.datasets.fashion_mnist.load_data()
    except Exception as exc:  # noqa: BLE001 - any download failure means the same to the user
        raise DataError(
            f"Fashion-MNIST not found in {DEBIAN_FASHION_MNIST} (apt-get install "
            f"dataset-fashion-mnist) and the download failed: {exc}; pass --data-dir"
        ) from exc
    return Dataset(
        x_train=x_train[..., np.newaxis],
        y_train=y_train.astype(np.int64),
        x_test=x_test[..., np.newaxis],
        y_test=y_test.astype(np.int64),
        labels=FASHION_MNIST_LABELS,
        source="keras.datasets.fashion_mnist",
        name="fashion-mnist",
    )


# ----------------------------------------------------------------------------- image folders


def list_labelled_images(root: Path) -> tuple[tuple[str, ...], list[tuple[Path, int]]]:
    """Class names (sorted sub-folder names) and (path, class index) for every image file."""
    if not root.is_dir():
        raise DataError(f"{root}: no such directory (--image-dir)")
    classes = tuple(
        sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    )
    if len(classes) < 2:
        raise DataError(
            f"{root}: needs one sub-folder per class, at least two; found {len(classes)}"
        )
    files: list[tuple[Path, int]] = []
    for index, name in enumerate(classes):
        found = sorted(p for p in _walk_files(root / name) if p.suffix.lower() in IMAGE_EXTENSIONS)
        if not found:
            raise DataError(f"{root / name}: class folder holds no image files")
        files.extend((p, index) for p in found)
    return classes, files


def _walk_files(folder: Path) -> Iterable[Path]:
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames.sort()
        for filename in filenames:
            yield Path(dirpath) / filename


def decode_labelled(
    files: list[tuple[Path, int]],
    shape: tuple[int, int, int],
    max_pixels: int,
    strict: bool = False,
) -> tuple[np.ndarray, np.ndarray, tuple[Skipped, ...]]:
    """The files that decode, as (N, H, W, C) uint8 with their (N,) labels, and those that do
    not: each gets one warning line; with `strict`, the first is a DataError instead."""
    images: list[np.ndarray] = []
    labels: list[int] = []
    skipped: list[Skipped] = []
    for path, label in files:
        try:
            images.append(policy.decode_file(path, shape, max_pixels))
            labels.append(label)
        except (policy.ImageError, OSError) as exc:
            reason = _reason(exc)
            if strict:
                raise DataError(f"{path}: {reason} (--strict)") from exc
            log.warning("skipped %s: %s", path, reason)
            skipped.append(Skipped(path, reason))
    pixels = np.stack(images) if images else np.empty((0, *shape), dtype=np.uint8)
    return pixels, np.array(labels, dtype=np.int64), tuple(skipped)


def _reason(exc: Exception) -> str:
    if isinstance(exc, OSError):
        return f"cannot read the file: {exc.strerror or type(exc).__name__}"
    return str(exc)


def stratified_split(
    labels: np.ndarray, classes: int, test_split: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Sorted train and test indices: each class gives the same share of its images to the
    test set (at least one, when it has two), the same seed always the same split."""
    rng = np.random.default_rng(seed)
    train_idx: list[int] = []
    test_idx: list[int] = []
    for index in range(classes):
        members = np.flatnonzero(labels == index)
        members = members[rng.permutation(len(members))]
        n_test = max(1, round(len(members) * test_split)) if len(members) > 1 else 0
        test_idx.extend(members[:n_test].tolist())
        train_idx.extend(members[n_test:].tolist())
    return np.array(sorted(train_idx), dtype=np.int64), np.array(sorted(test_idx), dtype=np.int64)


def load_image_folder(
    root: Path,
    image_size: int,
    channels: int,
    test_split: float,
    seed: int,
    max_image_pixels: int = policy.MAX_IMAGE_PIXELS,
    strict: bool = False,
) -> Dataset:
    """Labelled folders (one sub-folder per class) decoded at `image_size` by the image policy
    (files it refuses skipped, or with `strict` an error), split with `seed`.

    The split is stratified: each class gives the same share of its images to the test set, and
    the same seed and files always give the same split.
    """
    if not 0.0 < test_split < 1.0:
        raise DataError(f"--test-split must be between 0 and 1, got {test_split}")
    classes, files = list_labelled_images(root)
    shape = (image_size, image_size, channels)
    images, labels, skipped = decode_labelled(files, shape, max_image_pixels, strict)
    if skipped:
        log.warning(
            "skipped %d of %d image files that do not decode (listed in the run's config.json)",
            len(skipped),
            len(files),
        )
    for index, name in enumerate(classes):
        if not (labels == index).any():
            raise DataError(f"{root / name}: none of its image files decodes")
    train, test = stratified_split(labels, len(classes), test_split, seed)
    if not len(test) or not len(train):
        raise DataError(f"{root}: too few images for a train/test split ({len(labels)} images)")
    return Dataset(
        x_train=images[train],
        y_train=labels[train],
        x_test=images[test],
        y_test=labels[test],
        labels=classes,
        source=str(root),
        name=root.name,
        skipped=skipped,
    )


def select_classes(
    x: np.ndarray, y: np.ndarray, classes: Iterable[int]
) -> tuple[np.ndarray, np.ndarray]:
    """The images and labels whose label is one of `classes` (labels keep their numbering)."""
    mask = np.isin(y, list(classes))
    return x[mask], y[mask]
