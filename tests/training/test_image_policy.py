"""One image policy: a file in a labelled training folder becomes the same pixels in training as
the same file does when the server (or a scoring job) decodes it, for every awkward kind of
file; files the policy refuses are skipped, named and counted, or stop a --strict run."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from service.config import ServeConfig
from service.images import decode
from service.memory import DecodeBudget
from service.scoring.decoding import decode_file
from tests.service.test_images import bomb_png
from training.data import list_labelled_images, load_image_folder, stratified_split
from training.errors import DataError

H, W = 120, 160  # stored size: more than 4x a 28x28 input (box-reduced first), not of a 32x32
SHAPES = [(28, 28, 1), (32, 32, 3)]
MiB = 1024 * 1024


def _picture() -> np.ndarray:
    """(H, W, 3) uint8 that no transposition or crop leaves alike: a bright block in the top
    left corner on colour gradients."""
    y, x = np.mgrid[0:H, 0:W]
    rgb = np.stack([x * 255 // W, y * 255 // H, (x + y) * 255 // (W + H)], axis=-1)
    rgb[: H // 4, : W // 4] = (250, 240, 30)
    return rgb.astype(np.uint8)


def _encoded(image: Image.Image, fmt: str, **save) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **save)
    return buffer.getvalue()


def _rgba() -> bytes:
    alpha = np.tile(np.linspace(0, 255, W, dtype=np.uint8), (H, 1))  # transparent to opaque
    alpha[:, : W // 8] = 0  # fully transparent over coloured pixels
    return _encoded(Image.fromarray(np.dstack([_picture(), alpha]), "RGBA"), "PNG")


def _la() -> bytes:
    gray = Image.fromarray(_picture()).convert("L")
    alpha = np.tile(np.linspace(255, 0, H, dtype=np.uint8)[:, None], (1, W))  # by rows
    alpha[-H // 4 :] = 0  # the bottom quarter fully transparent
    return _encoded(Image.merge("LA", (gray, Image.fromarray(alpha))), "PNG")


def _palette() -> bytes:
    image = Image.fromarray(_picture()).quantize(16)
    return _encoded(image, "PNG", transparency=3)  # index 3, a real colour, is transparent


def _sixteen_bit() -> bytes:
    values = np.tile(np.linspace(0, 65535, W), (H, 1)).astype(np.uint16)  # the whole range
    values[: H // 4, : W // 4] = 60000
    image = Image.fromarray(values)
    assert image.mode == "I;16"
    return _encoded(image, "PNG")


def _cmyk() -> bytes:
    return _encoded(Image.fromarray(_picture()).convert("CMYK"), "JPEG", quality=92)


def _exif_rotated() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # displayed turned 90 degrees clockwise: the block ends top right
    return _encoded(Image.fromarray(_picture()), "JPEG", exif=exif, quality=92)


def _animated() -> bytes:
    frames = [Image.fromarray(_picture()), Image.fromarray(255 - _picture())]
    return _encoded(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100)


KINDS = {
    "rgba.png": _rgba,
    "la.png": _la,
    "palette.png": _palette,
    "sixteen-bit.png": _sixteen_bit,
    "cmyk.jpg": _cmyk,
    "exif-rotated.jpg": _exif_rotated,
    "animated.gif": _animated,
}


@pytest.fixture(scope="module")
def awkward(tmp_path_factory) -> Path:
    """A labelled folder (two classes) holding one file of each awkward kind."""
    root = tmp_path_factory.mktemp("awkward")
    for i, (name, make) in enumerate(KINDS.items()):
        folder = root / ("first" if i % 2 == 0 else "second")
        folder.mkdir(exist_ok=True)
        (folder / name).write_bytes(make())
    return root


def training_pixels(root: Path, shape: tuple[int, int, int]) -> dict[str, np.ndarray]:
    """What training's loader made of each file, by name: its train and test rows put back in
    the order of the files."""
    data = load_image_folder(root, shape[0], shape[2], test_split=0.5, seed=0)
    assert data.skipped == ()
    classes, files = list_labelled_images(root)
    labels = np.array([label for _, label in files])
    train, test = stratified_split(labels, len(classes), 0.5, 0)
    rows = np.empty((len(files), *shape), np.uint8)
    rows[train], rows[test] = data.x_train, data.x_test
    np.testing.assert_array_equal(labels[train], data.y_train)
    return {path.name: rows[i] for i, (path, _) in enumerate(files)}


def served_pixels(path: Path, shape: tuple[int, int, int]) -> np.ndarray:
    """What the server's decode makes of the file's bytes (the call the servicers and the
    in-process CLI make: the model's input shape, the default limit, a decode budget)."""
    limit = ServeConfig(repository=Path("models")).max_image_pixels
    return decode(path.read_bytes(), shape, limit, DecodeBudget(256 * MiB))


@pytest.mark.parametrize("shape", SHAPES, ids=["gray-28", "rgb-32"])
def test_training_and_serving_decode_every_awkward_file_alike(awkward: Path, shape) -> None:
    trained = training_pixels(awkward, shape)
    assert sorted(trained) == sorted(KINDS)
    for path in sorted(awkward.rglob("*.*")):
        served = served_pixels(path, shape)
        assert served.shape == shape and served.dtype == np.uint8
        assert np.array_equal(trained[path.name], served), path.name
        scored = decode_file(str(path), shape, ServeConfig(repository=Path(".")).max_image_pixels)
        assert np.array_equal(scored, served), path.name


def test_the_shared_pixels_follow_the_policy(awkward: Path) -> None:
    """The pixels both agree on are the policy's, not Pillow's defaults (alpha dropped,
    16-bit clipped, the stored orientation, the last frame)."""
    gray = training_pixels(awkward, (28, 28, 1))
    rgb = training_pixels(awkward, (32, 32, 3))
    assert rgb["rgba.png"][:, :3].max() == 0  # transparent on coloured pixels: black
    assert rgb["rgba.png"][-1, -1].min() > 100  # opaque: its colour
    assert gray["la.png"][-3:].max() == 0 and gray["la.png"][:2].mean() > 40  # alpha by rows
    sixteen = gray["sixteen-bit.png"][..., 0]
    assert sixteen[-1, -1] >= 250 and 110 < sixteen[20, 14] < 145  # scaled by range, not clipped
    assert sixteen[:5, :5].min() > 225  # 60000 / 65535 of white
    upright = _reference(Image.fromarray(_picture()).transpose(Image.Transpose.ROTATE_270), 28)
    stored = _reference(Image.fromarray(_picture()), 28)
    turned = gray["exif-rotated.jpg"][..., 0]
    assert _distance(turned, upright) < 8 and _distance(turned, stored) > 30  # shown upright
    first = rgb["animated.gif"]
    assert _distance(first, _resize_rgb(_picture(), 32)) < 12  # the first frame
    assert _distance(first, _resize_rgb(255 - _picture(), 32)) > 60  # not the second
    block = rgb["cmyk.jpg"][:6, :6].reshape(-1, 3).mean(axis=0)
    assert block[0] > 200 and block[1] > 190 and block[2] < 90  # yellow stays yellow
    transparent = rgb["palette.png"]
    assert (transparent.reshape(-1, 3).max(axis=1) == 0).any()  # its transparent index: black


def _resize_rgb(pixels: np.ndarray, side: int) -> np.ndarray:
    return np.asarray(Image.fromarray(pixels).resize((side, side), Image.Resampling.BILINEAR))


def _reference(image: Image.Image, side: int) -> np.ndarray:
    return np.asarray(image.convert("L").resize((side, side), Image.Resampling.BILINEAR))


def _distance(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(int) - b.astype(int)).mean())


def _bad_folder(root: Path) -> Path:
    """Two classes of three good PNGs, plus a corrupt file and a pixel bomb in the second."""
    rng = np.random.default_rng(0)
    for name in ("one", "two"):
        (root / name).mkdir(parents=True)
        for i in range(3):
            pixels = rng.integers(0, 255, (28, 28), dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    jpeg = _encoded(Image.fromarray(_picture()), "JPEG")
    (root / "two" / "corrupt.jpg").write_bytes(jpeg[: len(jpeg) // 3])  # cut short
    (root / "two" / "bomb.png").write_bytes(bomb_png(20_000, 20_000))
    return root


def test_files_the_policy_refuses_are_skipped_and_named(tmp_path: Path, caplog) -> None:
    root = _bad_folder(tmp_path / "images")
    data = load_image_folder(root, 28, 1, test_split=0.5, seed=0)
    assert len(data.x_train) + len(data.x_test) == 6
    assert [(s.path.name, s.reason.split(":")[0]) for s in data.skipped] == [
        ("bomb.png", "image of 20000x20000 = 400,000,000 pixels exceeds --max-image-pixels "
         "16,000,000"),
        ("corrupt.jpg", "corrupt or truncated image"),
    ]  # fmt: skip
    lines = [r.getMessage() for r in caplog.records if r.name == "training.data"]
    assert sum("skipped" in line and "bomb.png" in line for line in lines) == 1
    assert sum("skipped" in line and "corrupt.jpg" in line for line in lines) == 1
    with pytest.raises(DataError, match=r"bomb\.png: image of 20000x20000 .* \(--strict\)"):
        load_image_folder(root, 28, 1, test_split=0.5, seed=0, strict=True)
    with pytest.raises(DataError, match=r"one: none of its image files decodes"):
        load_image_folder(root, 28, 1, 0.5, 0, max_image_pixels=28 * 28 - 1)  # all too large


def test_strict_and_the_pixel_limit_come_from_the_environment(monkeypatch) -> None:
    from training.__main__ import build_parser, config_from_args

    assert config_from_args(build_parser().parse_args(["scratch"])).strict is False
    monkeypatch.setenv("CNN_SERVING_STRICT", "yes")
    monkeypatch.setenv("CNN_SERVING_MAX_IMAGE_PIXELS", "1000")
    config = config_from_args(build_parser().parse_args(["scratch"]))
    assert config.strict is True and config.max_image_pixels == 1000
    assert (
        ServeConfig(repository=Path(".")).max_image_pixels
        == build_parser()
        .parse_args(
            [
                "scratch",
                "--max-image-pixels",
                str(ServeConfig(repository=Path(".")).max_image_pixels),
            ]
        )
        .max_image_pixels
    )


def _train(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "training", "scratch", "--arch", "seed", *args],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, **(env or {})},
    )


@pytest.mark.slow
def test_a_run_counts_skipped_files_and_strict_stops_it(tmp_path: Path) -> None:
    root = _bad_folder(tmp_path / "images")
    common = ("--image-dir", str(root), "--image-size", "28", "--channels", "1", "--epochs", "1")
    done = _train(*common, "--out", str(tmp_path / "run"))
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    for name in ("bomb.png", "corrupt.jpg"):
        named = [line for line in done.stderr.splitlines() if name in line]
        assert len(named) == 1 and named[0].startswith(f"skipped {root / 'two' / name}: ")
    assert json.loads(done.stdout)["skipped_files"] == 2
    dataset = json.loads((tmp_path / "run" / "config.json").read_text())["dataset"]
    assert dataset["skipped_files"] == 2 and dataset["train_size"] + dataset["test_size"] == 6
    assert [s["path"] for s in dataset["skipped"]] == ["two/bomb.png", "two/corrupt.jpg"]
    summary = subprocess.run(
        [sys.executable, "-m", "training.summary", str(tmp_path / "run")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "2 image files skipped" in summary.stdout

    strict = _train(*common, "--strict", "--out", str(tmp_path / "strict"))
    assert strict.returncode == 2
    lines = [line for line in strict.stderr.splitlines() if line.strip()]
    assert lines == [f"error: {root / 'two' / 'bomb.png'}: image of 20000x20000 = 400,000,000 "
                     "pixels exceeds --max-image-pixels 16,000,000 (--strict)"]  # fmt: skip
    assert not (tmp_path / "strict").exists()
