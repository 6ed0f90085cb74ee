"""Write test images of a dataset as PNG files, one sub-folder per class: material for demos and
for trying the classifier on real files.

    python -m training.write_images OUT [--data-dir DIR] [--per-class N]

Files are named OUT/<label>/<index>.png (labels made filesystem-safe: "T-shirt/top" becomes
"T-shirt-top"). Existing files are never overwritten.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from training.data import load_fashion_mnist
from training.errors import DataError


def safe(label: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in label)


def write_images(out: Path, data_dir: Path | None, per_class: int) -> list[Path]:
    from PIL import Image  # noqa: PLC0415

    data = load_fashion_mnist(data_dir)
    written: list[Path] = []
    counts = dict.fromkeys(range(len(data.labels)), 0)
    for index, (image, label) in enumerate(zip(data.x_test, data.y_test, strict=True)):
        if counts[int(label)] >= per_class:
            continue
        counts[int(label)] += 1
        path = out / safe(data.labels[int(label)]) / f"{index:05d}.png"
        if path.exists():
            raise DataError(f"{path} exists; choose an empty folder")
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image[:, :, 0] if image.shape[-1] == 1 else image).save(path)
        written.append(path)
        if all(c >= per_class for c in counts.values()):
            break
    return written


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m training.write_images", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("out", type=Path, help="folder to write OUT/<label>/<index>.png into")
    parser.add_argument(
        "--data-dir",
        type=Path,
        help="Fashion-MNIST IDX folder (default: as "
        "for training: Debian's dataset-fashion-mnist, else Keras's download)",
    )
    parser.add_argument(
        "--per-class", type=int, default=2, help="images written per class (default: %(default)s)"
    )
    args = parser.parse_args(argv)
    try:
        written = write_images(args.out, args.data_dir, args.per_class)
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
