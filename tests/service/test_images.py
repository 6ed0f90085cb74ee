"""The image policy (imaging/policy.py), through the service's decode (service/images.py), on
real encoded files of every kind."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from service.errors import InvalidInput
from service.images import check_tensor, decode, tensor_from_bytes
from tests.conftest import png

GRAY = (28, 28, 1)
RGB = (32, 32, 3)
LIMIT = 50_000_000


def encoded(picture: Image.Image, fmt: str, **save) -> bytes:
    buffer = io.BytesIO()
    picture.save(buffer, format=fmt, **save)
    return buffer.getvalue()


def gradient(h: int = 28, w: int = 28) -> np.ndarray:
    return np.tile(np.linspace(0, 255, w, dtype=np.uint8), (h, 1))


@pytest.mark.parametrize("fmt", ["PNG", "BMP", "TIFF", "GIF", "WEBP"])
def test_lossless_formats_give_back_the_pixels(fmt: str) -> None:
    pixels = gradient()
    save = {"lossless": True} if fmt == "WEBP" else {}
    out = decode(encoded(Image.fromarray(pixels), fmt, **save), GRAY, LIMIT)
    assert out.shape == GRAY and out.dtype == np.uint8
    np.testing.assert_array_equal(out[:, :, 0], pixels)


def test_jpeg_is_close_and_rgb_becomes_gray_by_luma() -> None:
    red = np.zeros((28, 28, 3), np.uint8)
    red[..., 0] = 200
    out = decode(encoded(Image.fromarray(red), "JPEG", quality=95), GRAY, LIMIT)
    assert abs(int(out.mean()) - round(200 * 0.299)) <= 3


def test_gray_repeats_to_rgb_and_resizes_to_the_model() -> None:
    out = decode(png(gradient(64, 48)), RGB, LIMIT)
    assert out.shape == RGB
    np.testing.assert_array_equal(out[..., 0], out[..., 2])
    assert out[:, 0, 0].max() < 20 and out[:, -1, 0].min() > 235  # stretched, not cropped


def test_sixteen_bit_is_scaled_not_clipped() -> None:
    pixels = np.full((28, 28), 32768, dtype=np.uint16)  # half of 16-bit range
    out = decode(encoded(Image.fromarray(pixels), "PNG"), GRAY, LIMIT)
    assert int(out.mean()) in (127, 128)


def test_alpha_is_composited_onto_black() -> None:
    rgba = np.zeros((28, 28, 4), np.uint8)
    rgba[..., :3] = 255
    rgba[:, :14, 3] = 255  # left half opaque white, right half transparent
    out = decode(encoded(Image.fromarray(rgba, "RGBA"), "PNG"), GRAY, LIMIT)
    assert out[:, :12].min() == 255 and out[:, 16:].max() == 0


def test_cmyk_and_palette_images_decode() -> None:
    picture = Image.fromarray(gradient()).convert("RGB")
    cmyk = decode(encoded(picture.convert("CMYK"), "JPEG"), GRAY, LIMIT)
    palette = decode(encoded(picture.convert("P"), "PNG"), GRAY, LIMIT)
    assert cmyk.shape == palette.shape == GRAY
    assert abs(int(palette[:, -1].mean()) - 255) < 10


def test_animated_gif_uses_the_first_frame() -> None:
    frames = [Image.fromarray(np.full((28, 28), v, np.uint8)) for v in (10, 250)]
    data = encoded(frames[0], "GIF", save_all=True, append_images=frames[1:])
    assert int(decode(data, GRAY, LIMIT).mean()) == 10


def test_exif_orientation_is_applied() -> None:
    pixels = np.zeros((28, 28), np.uint8)
    pixels[:, :4] = 255  # a bar on the left edge
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display": the bar ends up on the top edge
    out = decode(encoded(Image.fromarray(pixels), "JPEG", exif=exif, quality=95), GRAY, LIMIT)
    assert out[:3].mean() > 200 and out[-3:].mean() < 50


def test_a_large_image_is_reduced_then_turned_upright() -> None:
    """Shrunk first, turned after (no full-size copy): the same picture as turning first. A
    quarter turn of a tall, non-square image swaps which side is reduced by what."""
    pixels = np.zeros((560, 280), np.uint8)
    pixels[:, :40] = 255  # a bar on the left edge
    exif = Image.Exif()
    exif[0x0112] = 6  # displayed turned 90 degrees clockwise: the bar on the top edge
    out = decode(encoded(Image.fromarray(pixels), "PNG", exif=exif), (28, 56, 1), LIMIT)
    assert out.shape == (28, 56, 1)
    assert out[:3].mean() > 200 and out[-3:].max() < 50


@pytest.mark.parametrize("mode", ["P", "1", "I;16", "I"])
def test_large_images_of_modes_reduce_cannot_take_decode(mode: str) -> None:
    """Palette and bilevel images are converted before the box reduction (indices cannot be
    averaged), 16-bit ones are averaged in numpy, 32-bit ones by Pillow."""
    top = {"P": 255, "1": 255, "I;16": 65535, "I": 65535}[mode]
    picture = Image.fromarray(np.zeros((560, 560), np.uint8)).convert(mode)
    picture.paste(top, (0, 0, 280, 560))  # the left half at the top of the mode's range
    fmt = "TIFF" if mode == "I" else "PNG"
    out = decode(encoded(picture, fmt), GRAY, LIMIT)[..., 0]
    assert out[:, :12].min() > 245 and out[:, 16:].max() < 10


def bomb_png(width: int, height: int) -> bytes:
    """A PNG announcing width x height gray pixels, with a highly compressed (here: cut
    short) zero stream behind it: decoding it would allocate width * height bytes."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    data = zlib.compress(b"\x00" * 100_000, 9)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b"")
    )


def test_decompression_bomb_is_rejected_from_the_header() -> None:
    with pytest.raises(InvalidInput, match=r"100000x100000 = 10,000,000,000 pixels exceeds"):
        decode(bomb_png(100_000, 100_000), GRAY, LIMIT)
    with pytest.raises(InvalidInput, match="--max-image-pixels 100"):
        decode(png(gradient()), GRAY, 100)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "empty image"),
        (b"<html>not a picture</html>", "not a readable image"),
        (png(gradient())[:60], "corrupt or truncated"),
    ],
)
def test_bad_bytes_are_invalid_input(data: bytes, message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        decode(data, GRAY, LIMIT)


def test_raw_tensors_are_checked() -> None:
    good = np.zeros(GRAY, np.uint8)
    assert check_tensor(good, GRAY) is good
    with pytest.raises(InvalidInput, match="uint8"):
        check_tensor(good.astype(np.float32), GRAY)
    with pytest.raises(InvalidInput, match=r"got \(28, 28, 3\)"):
        check_tensor(np.zeros((28, 28, 3), np.uint8), GRAY)
    np.testing.assert_array_equal(tensor_from_bytes(good.tobytes(), GRAY, GRAY), good)
    with pytest.raises(InvalidInput, match="expected 784 bytes"):
        tensor_from_bytes(b"\x00" * 700, GRAY, GRAY)
    with pytest.raises(InvalidInput, match="must have shape"):
        tensor_from_bytes(b"\x00" * 784, (28, 28, 3), GRAY)


def test_only_the_listed_formats_are_opened() -> None:
    with pytest.raises(InvalidInput, match="formats: PNG, JPEG, WEBP, BMP, TIFF, GIF"):
        decode(encoded(Image.fromarray(gradient()), "PCX"), GRAY, LIMIT)
