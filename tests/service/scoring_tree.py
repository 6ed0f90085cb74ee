"""A folder to score, made in the test: real Fashion-MNIST images in class folders, plus every
hostile and awkward file the scoring job must account for. `make_tree` returns what each image
file must become: "ok" (a scored row) or "error" (an error row), and how many files must be
skipped."""

from __future__ import annotations

import io
import os
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from training.write_images import safe


@dataclass
class Tree:
    root: Path
    expected: dict[str, str] = field(default_factory=dict)  # row path -> "ok" | "error"
    labelled: dict[str, str] = field(default_factory=dict)  # row path -> true label
    pixels: dict[str, np.ndarray] = field(default_factory=dict)  # labelled path -> (28, 28, 1)
    skipped: int = 0
    before: list = field(default_factory=list)  # a snapshot of the tree, taken by the test

    def add(self, relative: str, data: bytes, status: str) -> Path:
        path = self.root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        self.expected[relative] = status
        return path


def encode(image: Image.Image, fmt: str, **save) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **save)
    return buffer.getvalue()


def bomb_png(width: int, height: int) -> bytes:
    """A small PNG whose header claims width x height pixels (a decompression bomb's shape)."""
    data = bytearray(encode(Image.new("L", (1, 1)), "PNG"))
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))  # IHDR's CRC
    return bytes(data)


def make_tree(root: Path, images: np.ndarray, labels: np.ndarray, names: list[str]) -> Tree:
    tree = Tree(root)
    for i, (image, label) in enumerate(zip(images, labels, strict=True)):
        relative = f"{safe(names[int(label)])}/{i:03d}.png"
        tree.add(relative, encode(Image.fromarray(image[:, :, 0]), "PNG"), "ok")
        tree.labelled[relative] = names[int(label)]
        tree.pixels[relative] = image
    _hostile(tree, images[0])
    _awkward(tree, images[1])
    _not_images(tree)
    _links_and_specials(tree)
    tree.add("top.png", encode(Image.fromarray(images[2][:, :, 0]), "PNG"), "ok")
    return tree


def _hostile(tree: Tree, image: np.ndarray) -> None:
    good = encode(Image.fromarray(image[:, :, 0]), "PNG")
    tree.add("bad/empty.png", b"", "error")
    tree.add("bad/text.png", b"just some text, not an image\n", "error")
    tree.add("bad/page.jpg", b"<!doctype html><html><body>404</body></html>", "error")
    tree.add("bad/truncated.png", good[: len(good) // 2], "error")
    jpeg = encode(Image.new("RGB", (64, 64), (200, 30, 30)), "JPEG")
    tree.add("bad/corrupt.jpg", jpeg[:20] + os.urandom(300), "error")
    tree.add("bad/bomb.png", bomb_png(20_000, 20_000), "error")


def _awkward(tree: Tree, image: np.ndarray) -> None:
    gray = Image.fromarray(image[:, :, 0])
    rgb = gray.convert("RGB")
    wide = Image.fromarray(image[:, :, 0].astype(np.uint16) * 257)
    tree.add("awkward/sixteen_bit.png", encode(wide, "PNG"), "ok")
    tree.add("awkward/cmyk.jpg", encode(rgb.convert("CMYK"), "JPEG"), "ok")
    tree.add("awkward/rgba.png", encode(rgb.convert("RGBA"), "PNG"), "ok")
    tree.add("awkward/palette.png", encode(rgb.convert("P"), "PNG"), "ok")
    tree.add("awkward/photo.webp", encode(rgb, "WEBP"), "ok")
    tree.add("awkward/bitmap.bmp", encode(rgb, "BMP"), "ok")
    tree.add("awkward/scan.tiff", encode(rgb, "TIFF"), "ok")
    frames = [gray, gray.transpose(Image.Transpose.FLIP_LEFT_RIGHT)]
    tree.add("awkward/animated.gif",
             encode(frames[0], "GIF", save_all=True, append_images=frames[1:]), "ok")  # fmt: skip
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated: displayed turned 90 degrees
    tree.add("awkward/rotated.jpg", encode(rgb, "JPEG", exif=exif), "ok")
    tree.add("awkward/one_pixel.png", encode(Image.new("L", (1, 1), 200), "PNG"), "ok")
    noise = np.random.default_rng(0).integers(0, 256, (3000, 4000, 3), dtype=np.uint8)
    large = encode(Image.fromarray(noise), "JPEG", quality=90)
    assert len(large) > 1 << 20  # decoded from the open file, not from bytes in memory
    tree.add("awkward/large.jpg", large, "ok")
    tree.add("awkward/UPPER.PNG", encode(gray, "PNG"), "ok")
    tree.add("awkward/été_👕 ünïcode.png", encode(gray, "PNG"), "ok")
    raw_name = os.path.join(os.fsencode(tree.root / "awkward"), b"latin1-\xe9.png")
    with open(raw_name, "wb") as out:  # a name that is not valid UTF-8
        out.write(encode(gray, "PNG"))
    tree.expected["awkward/latin1-\\xe9.png"] = "ok"
    # A name with a literal backslash that would read the same: its backslash is doubled.
    (tree.root / "awkward" / "latin1-\\xe9.png").write_bytes(encode(gray, "PNG"))
    tree.expected["awkward/latin1-\\\\xe9.png"] = "ok"


def _not_images(tree: Tree) -> None:
    for relative in ("README.txt", "awkward/.DS_Store", "bad/notes.md", "model.onnx"):
        path = tree.root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"not an image")
        tree.skipped += 1


def _links_and_specials(tree: Tree) -> None:
    (tree.root / "awkward" / "loop").symlink_to("..")  # a loop back to the root
    (tree.root / "again").symlink_to("awkward")  # a second way into a walked folder
    (tree.root / "bad" / "gone.png").symlink_to("does-not-exist.png")
    tree.expected["bad/gone.png"] = "error"
    os.mkfifo(tree.root / "bad" / "pipe.png")  # would block a reader forever
    tree.expected["bad/pipe.png"] = "error"
    (tree.root / "folder.png").mkdir()  # a folder named like an image is walked, not read
