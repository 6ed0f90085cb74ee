"""The IDX reader, the Fashion-MNIST loader and the labelled-folder loader."""

from __future__ import annotations

import gzip
import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from training.data import (
    FASHION_MNIST_LABELS,
    list_labelled_images,
    load_fashion_mnist,
    load_image_folder,
    parse_idx,
    read_fashion_mnist_dir,
    read_idx,
    write_idx,
)
from training.errors import DataError


@pytest.mark.parametrize("name", ["x.idx", "x.idx.gz"])
def test_idx_round_trip_gzipped_or_not(tmp_path: Path, name: str) -> None:
    array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    write_idx(tmp_path / name, array)
    assert (tmp_path / name).read_bytes()[:2] == (b"\x1f\x8b" if name.endswith(".gz") else b"\0\0")
    np.testing.assert_array_equal(read_idx(tmp_path / name), array)


def test_idx_header_is_big_endian_with_declared_dims() -> None:
    data = bytes([0, 0, 0x08, 2, 0, 0, 0, 2, 0, 0, 0, 3]) + bytes(range(6))
    array = parse_idx(data)
    assert array.shape == (2, 3) and array.dtype == np.uint8
    assert array[1, 2] == 5


def test_gzip_is_detected_by_content_not_name(tmp_path: Path) -> None:
    path = tmp_path / "labels"  # no .gz suffix, but gzipped bytes
    path.write_bytes(gzip.compress(bytes([0, 0, 0x08, 1, 0, 0, 0, 3, 7, 8, 9])))
    assert read_idx(path).tolist() == [7, 8, 9]


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"PK\x03\x04rest", "bad magic"),
        (bytes([0, 0, 0x08, 3, 0, 0]), "truncated IDX header"),
        (bytes([0, 0, 0x08, 1, 0, 0, 0, 5, 1, 2]), "declares shape (5,)"),
        (bytes([0, 0, 0x42, 1, 0, 0, 0, 1, 1]), "type 0x42"),
    ],
)
def test_malformed_idx_is_a_data_error(data: bytes, message: str) -> None:
    with pytest.raises(DataError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_idx(data, "f.idx")


def test_committed_sample_is_real_fashion_mnist_in_the_original_format(sample_dir: Path) -> None:
    names = sorted(p.name for p in sample_dir.iterdir())
    assert names == [
        "t10k-images-idx3-ubyte.gz",
        "t10k-labels-idx1-ubyte.gz",
        "train-images-idx3-ubyte.gz",
        "train-labels-idx1-ubyte.gz",
    ]
    data = read_fashion_mnist_dir(sample_dir)
    assert data.x_train.shape == (2000, 28, 28, 1) and data.x_train.dtype == np.uint8
    assert data.x_test.shape == (500, 28, 28, 1)
    assert set(data.y_train.tolist()) == set(range(10)) == set(data.y_test.tolist())
    assert data.labels == FASHION_MNIST_LABELS and len(data.labels) == 10
    # Real pictures, not noise: Fashion-MNIST's mean pixel is about 73 (black background).
    assert 60 < data.x_train.mean() < 90


def test_data_dir_wins_and_missing_dir_is_named(sample_dir: Path, tmp_path: Path) -> None:
    assert load_fashion_mnist(sample_dir).source == str(sample_dir)
    with pytest.raises(DataError, match=str(tmp_path / "nope")):
        load_fashion_mnist(tmp_path / "nope")


def test_missing_idx_file_is_named(sample_dir: Path, tmp_path: Path) -> None:
    for path in sample_dir.iterdir():
        if "t10k-labels" not in path.name:
            (tmp_path / path.name).write_bytes(path.read_bytes())
    with pytest.raises(DataError, match="missing t10k-labels-idx1-ubyte"):
        read_fashion_mnist_dir(tmp_path)


def test_images_and_labels_must_match_in_count(sample_dir: Path, tmp_path: Path) -> None:
    for path in sample_dir.iterdir():
        (tmp_path / path.name).write_bytes(path.read_bytes())
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.zeros(3, np.uint8))
    with pytest.raises(DataError, match="500 test images but 3 labels"):
        read_fashion_mnist_dir(tmp_path)


def _save(path: Path, image: Image.Image, **kwargs) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **kwargs)


def test_folder_loader_decodes_any_mode_and_splits_by_class(tmp_path: Path) -> None:
    for i in range(5):
        _save(tmp_path / "cats" / f"c{i}.png", Image.new("RGBA", (40, 30), (200, 10, 10, 255)))
        _save(
            tmp_path / "dogs" / f"d{i}.JPG",
            Image.new("CMYK", (20, 20), (0, 255, 0, 0)),
            format="JPEG",
        )
    _save(tmp_path / "dogs" / "deep" / "d9.tiff", Image.new("I;16", (8, 8), 40000))
    (tmp_path / "dogs" / "notes.txt").write_text("not an image")
    data = load_image_folder(tmp_path, image_size=16, channels=3, test_split=0.2, seed=1)
    assert data.labels == ("cats", "dogs")
    assert data.x_train.shape[1:] == (16, 16, 3) and data.x_train.dtype == np.uint8
    assert len(data.x_train) + len(data.x_test) == 11  # notes.txt is not an image
    assert sorted(data.y_test.tolist()) == [0, 1]  # one test image per class
    cats = np.concatenate([data.x_train[data.y_train == 0], data.x_test[data.y_test == 0]])
    assert (cats[..., 0] > 150).all() and (cats[..., 1] < 50).all()  # red stays red
    again = load_image_folder(tmp_path, image_size=16, channels=3, test_split=0.2, seed=1)
    np.testing.assert_array_equal(again.x_test, data.x_test)


def test_folder_loader_applies_exif_orientation(tmp_path: Path) -> None:
    image = Image.new("L", (20, 10), 0)
    image.paste(255, (0, 0, 10, 10))  # left half white
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when displayed
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", exif=exif, quality=95)
    for cls in ("a", "b"):
        (tmp_path / cls).mkdir()
        for name in ("x.jpg", "y.jpg"):
            (tmp_path / cls / name).write_bytes(buffer.getvalue())
    data = load_image_folder(tmp_path, image_size=20, channels=1, test_split=0.5, seed=0)
    shown = data.x_train[0, ..., 0]
    # Displayed upright, the white half is on top.
    assert shown[:8].mean() > 200 and shown[12:].mean() < 50


def test_corrupt_image_and_bad_layout_are_named(tmp_path: Path) -> None:
    _save(tmp_path / "a" / "ok.png", Image.new("L", (4, 4)))
    _save(tmp_path / "a" / "ok2.png", Image.new("L", (4, 4)))
    _save(tmp_path / "b" / "ok.png", Image.new("L", (4, 4)))
    (tmp_path / "b" / "broken.png").write_bytes(b"<html>not a png</html>")
    data = load_image_folder(tmp_path, 8, 1, 0.2, 0)
    assert [(s.path.name, s.reason.split(" (")[0]) for s in data.skipped] == [
        ("broken.png", "not a readable image")
    ]
    with pytest.raises(DataError, match=r"broken.png: not a readable image .*\(--strict\)"):
        load_image_folder(tmp_path, 8, 1, 0.2, 0, strict=True)
    with pytest.raises(DataError, match="at least two"):
        list_labelled_images(tmp_path / "a")
    (tmp_path / "c").mkdir()
    with pytest.raises(DataError, match="holds no image files"):
        list_labelled_images(tmp_path)
