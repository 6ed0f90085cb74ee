"""Train a classifier and write a run directory.

    python -m training scratch [--arch seed|default] --out runs/scratch
    python -m training vgg16 --base-weights none --out runs/vgg16
    python -m training transfer --pretrain-classes 3-9 --out runs/transfer

Every option can also be set with an environment variable CNN_SERVING_<OPTION> (for example
CNN_SERVING_EPOCHS=5); a command-line option wins over the variable.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from imaging.policy import MAX_IMAGE_PIXELS
from training.config import ARCH_DEFAULTS, SCHEDULES, TrainConfig
from training.errors import TrainingError
from training.logs import setup_cli_logging

log = logging.getLogger("training")

DEFAULTS_NOTE = "default: per architecture, see the epilog"


def _env(name: str, default: Any = None) -> Any:
    return os.environ.get(f"CNN_SERVING_{name.upper()}", default)


def _on(text: str | bool | None) -> bool | None:
    """A flag's value from the environment (1/true/yes/on or not); None stays None."""
    if text is None or isinstance(text, bool):
        return text
    return text.lower() in ("1", "true", "yes", "on")


def parse_classes(text: str) -> tuple[int, ...]:
    """'3-9' or '3,4,5' or '0-2,7' -> sorted class indices."""
    classes: set[int] = set()
    try:
        for part in text.split(","):
            if "-" in part:
                low, high = (int(v) for v in part.split("-", 1))
                classes.update(range(low, high + 1))
            elif part.strip():
                classes.add(int(part))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a class list like 3-9 or 0,2,5: {text!r}") from None
    if not classes:
        raise argparse.ArgumentTypeError("empty class list")
    return tuple(sorted(classes))


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return value


def _common(parser: argparse.ArgumentParser, family: str) -> None:
    data = parser.add_argument_group("data")
    data.add_argument(
        "--data-dir",
        metavar="DIR",
        type=Path,
        default=_env("data_dir"),
        help="folder with the four Fashion-MNIST IDX files (gzipped or not); "
        "default: /usr/share/datasets/fashion-mnist (Debian package "
        "dataset-fashion-mnist), else Keras's download",
    )
    data.add_argument(
        "--image-dir",
        metavar="DIR",
        type=Path,
        default=_env("image_dir"),
        help="train on labelled image folders instead (one sub-folder per class, "
        "any format Pillow reads); default: none (Fashion-MNIST)",
    )
    data.add_argument(
        "--image-size",
        metavar="PIXELS",
        type=_positive_int,
        default=_env("image_size"),
        help="with --image-dir: the side in pixels images are resized to (required); "
        "vgg16: the side VGG16 sees (default 32, at least 32)",
    )
    data.add_argument(
        "--channels",
        type=int,
        choices=(1, 3),
        default=int(_env("channels", 3)),
        help="with --image-dir: 1 (grayscale) or 3 (RGB) (default: %(default)s)",
    )
    data.add_argument(
        "--test-split",
        metavar="FRACTION",
        type=_fraction,
        default=float(_env("test_split", 0.2)),
        help="with --image-dir: share of each class held out as the test set, "
        "fixed by --seed (default: %(default)s)",
    )
    data.add_argument(
        "--max-image-pixels",
        metavar="PIXELS",
        type=_positive_int,
        default=_env("max_image_pixels", MAX_IMAGE_PIXELS),
        help="with --image-dir: an image file of more pixels (width x height, read from its "
        "header before decoding) is skipped, as the server refuses it "
        "(default: %(default)s, the server's)",
    )
    data.add_argument(
        "--strict",
        action="store_true",
        default=bool(_on(_env("strict"))),
        help="with --image-dir: stop at the first image file that does not decode "
        "(corrupt, unreadable, too many pixels) instead of skipping it with a warning "
        "(default: skip; skipped files are listed in config.json)",
    )
    data.add_argument(
        "--val-split",
        metavar="FRACTION",
        type=_fraction,
        default=float(_env("val_split", 0.1)),
        help="share of the training set held out for validation curves; 0: none "
        "(default: %(default)s)",
    )
    fit = parser.add_argument_group("fitting")
    fit.add_argument(
        "--epochs",
        metavar="N",
        type=_positive_int,
        default=_env("epochs"),
        help=f"passes over the training set ({DEFAULTS_NOTE})",
    )
    fit.add_argument(
        "--batch-size",
        metavar="N",
        type=_positive_int,
        default=_env("batch_size"),
        help=f"images per step ({DEFAULTS_NOTE})",
    )
    fit.add_argument(
        "--learning-rate",
        metavar="RATE",
        type=float,
        default=_env("learning_rate"),
        help=f"Adam's (initial) learning rate ({DEFAULTS_NOTE})",
    )
    fit.add_argument(
        "--schedule",
        choices=SCHEDULES,
        default=_env("schedule"),
        help=f"learning rate: cosine decay to 1%% or constant ({DEFAULTS_NOTE})",
    )
    fit.add_argument(
        "--augment",
        action=argparse.BooleanOptionalAction,
        default=_env("augment"),
        help=f"random left-right mirroring of half the images ({DEFAULTS_NOTE})",
    )
    fit.add_argument(
        "--seed",
        metavar="N",
        type=int,
        default=int(_env("seed", 0)),
        help="seeds splits, initialisation and shuffling: same seed, same data, same "
        "numbers (default: %(default)s)",
    )
    out = parser.add_argument_group("output")
    out.add_argument(
        "--out",
        metavar="RUN",
        type=Path,
        default=_env("out", Path("runs") / family),
        help="run directory to write (default: %(default)s)",
    )
    out.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing run directory (default: refuse)",
    )
    out.add_argument("--quiet", action="store_true", help="only errors and the final summary")


def build_parser() -> argparse.ArgumentParser:
    epilog = "defaults per architecture:\n  arch      epochs  batch  rate   schedule  augment\n"
    for arch, values in ARCH_DEFAULTS.items():
        epilog += (
            f"  {arch:8s}  {values['epochs']:6d}  {values['batch_size']:5d}  "
            f"{values['learning_rate']:.0e}  {values['schedule']:8s}  "
            f"{'yes' if values['augment'] else 'no'}\n"
        )
    epilog += "every option is also an environment variable CNN_SERVING_<OPTION>."
    parser = argparse.ArgumentParser(
        prog="python -m training",
        description="Train an image classifier with a 2-D bottleneck and write a run "
        "directory (model.keras, config.json, metrics.json, history.csv, figures/).",
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="family", required=True, metavar="FAMILY")
    kinds = {
        "scratch": "a CNN trained from scratch (the seed network or the stronger default)",
        "vgg16": "a frozen VGG16 base with a dense head trained on cached features",
        "transfer": "the seed's transfer experiment: pretrain on some classes, freeze the "
        "convolutions, retrain the dense layers on all classes",
    }
    for family, text in kinds.items():
        p = sub.add_parser(
            family,
            help=text,
            description=text,
            epilog=epilog,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        if family in ("scratch", "transfer"):
            p.add_argument(
                "--arch",
                choices=("seed", "default"),
                default=_env("arch", "default" if family == "scratch" else "seed"),
                help="seed: the seed notebook's 4,320-parameter network; default: "
                "the stronger 32-64-128 network (default: %(default)s)",
            )
        if family == "vgg16":
            p.add_argument(
                "--base-weights",
                metavar="imagenet|none|PATH",
                default=_env("base_weights", "imagenet"),
                help="imagenet (downloaded by Keras, needs internet), none (random "
                "and frozen: for offline tests; every report says so) or PATH "
                "of a local Keras weights file (default: %(default)s)",
            )
            p.add_argument(
                "--cache-dir",
                metavar="DIR",
                type=Path,
                default=_env("cache_dir"),
                help="where VGG16 features are cached, keyed by data + weights + size "
                "(default: ~/.cache/cnn-serving)",
            )
            p.add_argument(
                "--head-units",
                metavar="N",
                type=_positive_int,
                default=int(_env("head_units", 256)),
                help="units of the dense layer before the bottleneck (default: %(default)s)",
            )
        if family == "transfer":
            p.add_argument(
                "--pretrain-classes",
                metavar="CLASSES",
                type=parse_classes,
                default=parse_classes(_env("pretrain_classes", "3-9")),
                help="classes to pretrain on, like 3-9 or 0,2,4 (default: 3-9)",
            )
            p.add_argument(
                "--pretrain-epochs",
                metavar="N",
                type=_positive_int,
                default=_env("pretrain_epochs"),
                help="epochs of the pretraining phase (default: --epochs)",
            )
        _common(p, family)
    return parser


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    arch = getattr(args, "arch", "vgg16")
    defaults = ARCH_DEFAULTS[arch if args.family != "vgg16" else "vgg16"]

    def pick(name: str, kind: type) -> Any:
        value = getattr(args, name)
        return defaults[name] if value is None else kind(value)

    augment = _on(args.augment)
    return TrainConfig(
        family=args.family,
        arch=arch,
        out=str(args.out),
        epochs=pick("epochs", int),
        batch_size=pick("batch_size", int),
        learning_rate=pick("learning_rate", float),
        schedule=pick("schedule", str),
        augment=defaults["augment"] if augment is None else bool(augment),
        seed=args.seed,
        val_split=args.val_split,
        data_dir=str(args.data_dir) if args.data_dir else None,
        image_dir=str(args.image_dir) if args.image_dir else None,
        image_size=int(args.image_size) if args.image_size else None,
        channels=args.channels,
        test_split=args.test_split,
        max_image_pixels=args.max_image_pixels,
        strict=args.strict,
        base_weights=getattr(args, "base_weights", "none"),
        cache_dir=str(args.cache_dir) if getattr(args, "cache_dir", None) else None,
        head_units=getattr(args, "head_units", 256),
        pretrain_classes=getattr(args, "pretrain_classes", ()),
        pretrain_epochs=(
            int(args.pretrain_epochs) if getattr(args, "pretrain_epochs", None) else None
        ),
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_cli_logging(args.quiet)
    config = config_from_args(args)
    from training.run import run  # noqa: PLC0415 - keeps --help fast (no TensorFlow import)

    try:
        summary = run(config, overwrite=args.overwrite)
    except TrainingError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
