"""The one image policy: an encoded file in, (H, W, C) uint8 at a model's input size out.

Every path that turns a file into pixels calls `decode` (or `decode_file`, its reader for
files on disk): training's labelled folders (and so export's parity samples, which are
training's test images), the server, the in-process CLI and directory scoring. A model is
therefore served exactly the pixels it was trained on. This module imports Pillow and numpy
only (no grpc, onnxruntime or TensorFlow), so training uses it without the serving stack and
the service without TensorFlow; tests/service/test_layering.py holds that.

The policy:
1. Any format Pillow reads of `FORMATS` (PNG, JPEG, WebP, BMP, TIFF, GIF); of an animation or
   a multi-page file, the first frame.
2. The pixel count is checked from the header, before any pixel is decoded: more than
   `max_pixels` is rejected (a decompression bomb costs nothing).
3. EXIF orientation is applied (a photo taken sideways is classified upright). An image more
   than 4x the model's size is first box-reduced by an integer factor (JPEGs are decoded at a
   reduced scale), which keeps huge files cheap and changes nothing visible at the model's size;
   the reduced image is the one turned upright, so no full-size copy is ever made.
4. Modes: 16- and 32-bit integer images are scaled to 8 bits by their range (65535 -> 255);
   float images are taken as 0-1 when their maximum is at most 1, else as 0-255; an alpha
   channel (RGBA, LA, palette transparency) is composited onto black, the background of
   Fashion-MNIST; CMYK, YCbCr, palette and the rest go through RGB. Then to the model's channels:
   gray by ITU-R 601-2 luma, or gray repeated to RGB.
5. Resized to the model's height and width with bilinear filtering (Pillow's, antialiased when
   shrinking), stretching rather than cropping, so the whole picture is seen.

A file that breaks the policy (unreadable, corrupt, too many pixels, another format) raises
`ImageError`: the service answers it as InvalidInput (service/images.py), training skips the
file or, with --strict, stops.
"""

from __future__ import annotations

import io
import os
import stat
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import BinaryIO, Protocol

import numpy as np
from PIL import ExifTags, Image, UnidentifiedImageError

# The formats we open; others (EPS runs Ghostscript, rare decoders are fragile) are refused.
FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "TIFF", "GIF")
# The file names taken for images of those formats (any case): training folders, scoring jobs.
IMAGE_EXTENSIONS = frozenset(
    {".png", ".jpg", ".jpeg", ".jpe", ".jfif", ".webp", ".bmp", ".dib", ".tif", ".tiff", ".gif"}
)
# 16 MP: a 4000x4000 picture or any 12 MP photo, for models that read 28x28 or 32x32 pixels;
# the default of --max-image-pixels in training and serving alike (the server's decode budget
# is sized so that every image it allows fits alone: service/config.py).
MAX_IMAGE_PIXELS = 16_000_000
SMALL_FILE_BYTES = 1 << 20  # read at once; larger files are decoded from the open file, so a
# huge file or a pixel bomb costs its header, not its size

_WIDE_INT_MODES = {"I;16": 65535, "I;16L": 65535, "I;16B": 65535, "I;16N": 65535, "I": 65535}
_NUMPY_REDUCED = {"I;16", "I;16L", "I;16B", "I;16N"}  # "I" goes through reduce() itself
_T = Image.Transpose
_ORIENTATIONS = {
    2: _T.FLIP_LEFT_RIGHT,
    3: _T.ROTATE_180,
    4: _T.FLIP_TOP_BOTTOM,
    5: _T.TRANSPOSE,
    6: _T.ROTATE_270,
    7: _T.TRANSVERSE,
    8: _T.ROTATE_90,
}  # EXIF orientation -> the transposition that shows the image upright (as exif_transpose)
_QUARTER_TURNS = {_T.TRANSPOSE, _T.ROTATE_270, _T.TRANSVERSE, _T.ROTATE_90}

# Peak bytes per pixel of decoding a large image, by the mode Pillow decodes to: the image (1,
# 2 or 4 bytes a pixel) plus what is made at full size before the box reduction: a palette's
# colours (P: +4), a mode reduce() cannot take (1: +1, 16-bit: the numpy copy +4 at its peak),
# reduce()'s premultiplied copy of an alpha image (+4). Measured at 16 MP (bench/decode_memory.py).
_PEAK_BYTES = {
    "1": 2, "L": 1, "P": 5, "I;16": 6, "I;16L": 6, "I;16B": 6, "I;16N": 6,
    "LA": 8, "PA": 8, "La": 4, "RGB": 4, "RGBA": 8, "RGBa": 4, "RGBX": 4,
    "CMYK": 4, "YCbCr": 4, "LAB": 4, "HSV": 4, "I": 4, "F": 4,
}  # fmt: skip
_UNKNOWN_MODE_BYTES = 8
_UNREDUCED_BYTES = 16  # converted, composited and resized at its own (small) size
_WEBP_BUFFER_BYTES = 12  # libwebp decodes into buffers of its own, then Pillow copies


class ImageError(ValueError):
    """A file the policy refuses: empty, unreadable, corrupt or truncated, of a format not in
    FORMATS, or with more pixels than the limit. The message says which, without the path."""


class Budget(Protocol):
    """Where a decode holds its estimated peak memory while it runs (the service's
    DecodeBudget); `reserve` raises, before any pixel is decoded, when it does not fit."""

    def reserve(self, nbytes: int, what: str) -> AbstractContextManager[None]: ...


def decode(
    data: bytes | BinaryIO,
    shape: tuple[int, int, int],
    max_pixels: int,
    budget: Budget | None = None,
) -> np.ndarray:
    """Decode one encoded image (its bytes, or an open binary file, read from its start: only
    the header before the pixel check) to `shape` = (H, W, C) uint8; raises ImageError. With a
    `budget`, the decode holds its estimated peak memory (`decoding_bytes`) there while it
    runs; what the budget raises when that does not fit passes through unchanged."""
    size = len(data) if isinstance(data, bytes) else os.fstat(data.fileno()).st_size
    if not size:
        raise ImageError("empty image (0 bytes)")
    # Our own limit, checked from the header below, replaces Pillow's global one.
    Image.MAX_IMAGE_PIXELS = None
    with _refusals(size):
        opened = Image.open(io.BytesIO(data) if isinstance(data, bytes) else data, formats=FORMATS)
    with opened:
        with _refusals(size):
            stored = _check_pixels(opened, max_pixels)
            opened.seek(0)  # first frame of animations and multi-page files
            if opened.format == "JPEG":  # decode big JPEGs at a fraction of their size
                opened.draft(None, (shape[1] * 2, shape[0] * 2))
            need = decoding_bytes(opened, stored, shape)
        held = nullcontext() if budget is None else budget.reserve(need, _described(opened))
        with held, _refusals(size):  # the budget's refusal is not one of Pillow's errors
            try:
                return _pixels(opened, shape)
            finally:  # the full-size pixels freed before the budget is (and trimmed)
                opened.close()


@contextmanager
def _refusals(size: int) -> Iterator[None]:
    """Pillow's many exception types on hostile data -> ImageError (a `size`-byte file)."""
    try:
        yield
    except ImageError:
        raise
    except UnidentifiedImageError as exc:
        raise ImageError(
            f"not a readable image ({size:,} bytes; formats: {', '.join(FORMATS)})"
        ) from exc
    except Exception as exc:  # Pillow's decoders raise many types on hostile data
        raise ImageError(f"corrupt or truncated image: {exc or type(exc).__name__}") from exc


def decode_file(
    path: str | os.PathLike[str], shape: tuple[int, int, int], max_pixels: int
) -> np.ndarray:
    """`decode` of the file at `path`: a small one read at once, a large one from the open
    file (a huge file or a pixel bomb costs its header, not its size); raises ImageError, and
    OSError when the file cannot be read."""
    check_regular(path)
    with open(path, "rb") as file:
        size = file.seek(0, 2)
        file.seek(0)
        if size <= SMALL_FILE_BYTES:
            return decode(file.read(), shape, max_pixels)
        return decode(file, shape, max_pixels)


def check_regular(path: str | os.PathLike[str]) -> None:
    """A FIFO or a device named like an image would block or never end: refuse it unread."""
    if not stat.S_ISREG(os.stat(path).st_mode):
        raise ImageError("not a regular file")


def _check_pixels(opened: Image.Image, max_pixels: int) -> int:
    """The image's pixel count, from its header; ImageError above `max_pixels`."""
    width, height = opened.size
    if width * height > max_pixels:
        raise ImageError(
            f"image of {width}x{height} = {width * height:,} pixels exceeds "
            f"--max-image-pixels {max_pixels:,}"
        )
    return width * height


def _pixels(opened: Image.Image, shape: tuple[int, int, int]) -> np.ndarray:
    """The decoding itself: steps 3 to 5 of the policy. -> (H, W, C) uint8"""
    image = _upright(opened, shape)
    image = _to_channels(image, shape[2])
    if image.size != (shape[1], shape[0]):
        image = image.resize((shape[1], shape[0]), Image.Resampling.BILINEAR)
    return np.asarray(image, dtype=np.uint8).reshape(shape)


def decoding_bytes(opened: Image.Image, stored: int, shape: tuple[int, int, int]) -> int:
    """The most memory `decode` holds at once for `opened` (header read, a JPEG's draft scale
    set; `stored`: its pixel count in the file), in bytes: the decoded image in Pillow's
    layout (RGB takes 4 bytes a pixel) and the full-size buffers made before it is reduced:
    within about 1 MiB of what bench/decode_memory.py measures, per mode."""
    pixels = opened.width * opened.height
    w, h = opened.size
    turned = (shape[1], shape[0], shape[2])  # as `_upright` sees an EXIF quarter turn
    if min(min(w // side[1], h // side[0]) // 2 for side in (shape, turned)) < 2:
        per_pixel = _UNREDUCED_BYTES  # small enough to be converted at its own size
    elif opened.mode == "P" and "transparency" in opened.info:
        per_pixel = _PEAK_BYTES["PA"] + 1
    else:
        per_pixel = _PEAK_BYTES.get(opened.mode, _UNKNOWN_MODE_BYTES)
    extra = _WEBP_BUFFER_BYTES * pixels if opened.format == "WEBP" else 0
    if opened.format == "JPEG" and opened.info.get("progressive"):
        # libjpeg holds a progressive file's coefficients at full size: 2 bytes per sample
        extra = int(2 * stored * _jpeg_samples(opened))
    return pixels * per_pixel + extra


def _jpeg_samples(opened: Image.Image) -> float:
    """Samples per pixel a JPEG stores: its components, each at its subsampling (4:2:0 YCbCr:
    1 + 1/4 + 1/4); 4 when the header does not say."""
    layers = getattr(opened, "layer", None) or []
    if not layers:
        return 4.0
    most = max(h for _, h, _, _ in layers) * max(v for _, _, v, _ in layers)
    return sum(h * v for _, h, v, _ in layers) / most


def _described(opened: Image.Image) -> str:
    return f"image of {opened.width}x{opened.height} {opened.mode} {opened.format}"


def _upright(opened: Image.Image, shape: tuple[int, int, int]) -> Image.Image:
    """Decode, box-reduce (`_shrink`), then apply the EXIF orientation to the reduced image
    (ImageOps.exif_transpose would copy the full-size one: twice the memory)."""
    opened.load()
    method = _ORIENTATIONS.get(opened.getexif().get(ExifTags.Base.Orientation, 1))
    if method in _QUARTER_TURNS:  # the stored image is the displayed one turned sideways
        shape = (shape[1], shape[0], shape[2])
    image = _shrink(opened, shape)
    return image if method is None else image.transpose(method)


def _shrink(image: Image.Image, shape: tuple[int, int, int]) -> Image.Image:
    """Box-reduce an image far larger than the model's input before any full-size mode
    conversion, so converting a huge 16-bit or RGBA file costs memory at about twice the
    model's size."""
    factor = min(image.width // shape[1], image.height // shape[0]) // 2
    if factor < 2:
        return image
    if image.mode in _NUMPY_REDUCED:  # reduce() does not take 16-bit: block means in numpy
        return _block_means(np.asarray(image), factor)
    if image.mode == "1":
        image = image.convert("L")  # 1 byte per pixel either way; reduce() needs "L"
    elif image.mode == "P":  # palette indices cannot be averaged: their colours can
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    try:
        return image.reduce(factor)
    except (ValueError, NotImplementedError):  # a mode reduce() does not handle
        return image


def _block_means(pixels: np.ndarray, factor: int) -> Image.Image:
    """(H, W) integers -> their means over factor x factor blocks, as an "I" image (the
    reshape is a view and the mean is buffered: no full-size temporary)."""
    h, w = (pixels.shape[0] // factor) * factor, (pixels.shape[1] // factor) * factor
    blocks = pixels[:h, :w].reshape(h // factor, factor, w // factor, factor)
    means = blocks.mean(axis=(1, 3), dtype=np.float32)
    return Image.fromarray(np.rint(means).astype(np.int32), mode="I")


def _to_channels(image: Image.Image, channels: int) -> Image.Image:
    """Any Pillow mode -> "L" (channels 1) or "RGB" (channels 3), by the policy above."""
    image = _to_8bit(image)
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("RGBA", "LA", "RGBa", "La", "PA"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        image = Image.alpha_composite(background, rgba)
    target = "L" if channels == 1 else "RGB"
    if image.mode == target:
        return image
    if image.mode not in ("L", "RGB"):
        image = image.convert("RGB")
    return image.convert(target)


def _to_8bit(image: Image.Image) -> Image.Image:
    if image.mode in _WIDE_INT_MODES:
        pixels = np.asarray(image, dtype=np.float32)
        scaled = pixels * (255.0 / _WIDE_INT_MODES[image.mode])
        return Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8), mode="L")
    if image.mode == "F":
        pixels = np.asarray(image, dtype=np.float32)
        scale = 255.0 if pixels.size and np.nanmax(pixels) <= 1.0 else 1.0
        scaled = np.nan_to_num(pixels * scale)
        return Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8), mode="L")
    if image.mode == "1":
        return image.convert("L")
    return image
