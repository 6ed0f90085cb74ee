"""The options of `python -m training`: their types, their --help (units, defaults, what 0 or
none means) and their CNN_SERVING_<OPTION> environment variables, read while the parser is
built (a command-line option wins over its variable)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from imaging.policy import MAX_IMAGE_PIXELS
from training.config import (
    AUGMENT_PRESETS,
    OPTIMIZERS,
    SCHEDULES,
    SGD_LEARNING_RATE,
    SGD_MOMENTUM,
    TRANSFER_OPTIMIZER,
    TRANSFER_TRAINABLE,
    VGG16_BLOCKS,
)

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


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or a positive integer, got {text}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return value


def _shear(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {text}")
    return value


def _fine_tune_blocks(text: str) -> int:
    value = int(text)
    if not 0 <= value <= VGG16_BLOCKS:
        raise argparse.ArgumentTypeError(f"must be 0 (off) to {VGG16_BLOCKS}, got {text}")
    return value


def _augment_preset(text: str) -> str:
    """A preset name; the yes/no values the variable took when --augment was a switch still
    mean flips / none."""
    word = text.lower()
    if word in AUGMENT_PRESETS:
        return word
    if word in ("1", "true", "yes", "on", "0", "false", "no", "off"):
        return "flip" if _on(word) else "none"
    raise argparse.ArgumentTypeError(f"not one of {', '.join(AUGMENT_PRESETS)}: {text!r}")


def common(parser: argparse.ArgumentParser, family: str) -> None:
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
        help=f"the optimizer's (initial) learning rate ({DEFAULTS_NOTE}; with --optimizer "
        f"sgd: {SGD_LEARNING_RATE})",
    )
    fit.add_argument(
        "--schedule",
        choices=SCHEDULES,
        default=_env("schedule"),
        help=f"learning rate: cosine decay to 1%% or constant ({DEFAULTS_NOTE})",
    )
    fit.add_argument(
        "--optimizer",
        choices=OPTIMIZERS,
        default=_env("optimizer", "adam"),
        help="adam, or sgd with momentum (the cats/dogs recipe) (default: %(default)s)",
    )
    fit.add_argument(
        "--momentum",
        metavar="M",
        type=_fraction,
        default=_env("momentum"),
        help=f"with --optimizer sgd: its momentum, in [0, 1) (default: {SGD_MOMENTUM})",
    )
    fit.add_argument(
        "--patience",
        metavar="EPOCHS",
        type=_non_negative_int,
        default=_env("patience", 0),
        help="stop once the validation loss has not improved for EPOCHS epochs and keep the "
        "best epoch's weights (Keras EarlyStopping); needs --val-split above 0; "
        "0: off, every epoch runs (default: %(default)s)",
    )
    augment = parser.add_argument_group(
        "augmentation",
        "random changes to the training images only, made in the input pipeline: never in\n"
        "the model or its export, never to the validation or test images",
    )
    augment.add_argument(
        "--augment",
        metavar="PRESET",
        nargs="?",
        const="flip",
        type=_augment_preset,
        default=_env("augment"),
        help="none; flip (mirror a random half left-right; alone, --augment means this); "
        "kdnuggets (the cats/dogs article's: shear 0.2, zoom 0.2, flip); "
        "--shear/--zoom/--flip change a preset's amounts; vgg16: only with "
        f"--fine-tune-blocks, for that phase ({DEFAULTS_NOTE})",
    )
    augment.add_argument(
        "--no-augment",
        dest="augment",
        action="store_const",
        const="none",
        help="the same as --augment none",
    )
    augment.add_argument(
        "--shear",
        metavar="FRACTION",
        type=_shear,
        default=_env("shear"),
        help="horizontal shear by up to FRACTION of the image height, either way (Keras "
        "RandomShear); 0: none (default: the preset's; kdnuggets: 0.2)",
    )
    augment.add_argument(
        "--zoom",
        metavar="FRACTION",
        type=_fraction,
        default=_env("zoom"),
        help="zoom in or out by up to FRACTION of the side, height and width apart (Keras "
        "RandomZoom); 0: none (default: the preset's; kdnuggets: 0.2)",
    )
    augment.add_argument(
        "--flip",
        action=argparse.BooleanOptionalAction,
        default=_on(_env("flip")),
        help="mirror a random half of the images left-right (default: the preset's; flip "
        "and kdnuggets: on)",
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


def fine_tune(parser: argparse.ArgumentParser) -> None:
    tune = parser.add_argument_group(
        "fine-tuning",
        "after the head has trained on cached features: the last blocks of the base and the\n"
        "head trained end to end on the images, at a low learning rate",
    )
    tune.add_argument(
        "--fine-tune-blocks",
        metavar="N",
        type=_fine_tune_blocks,
        default=_env("fine_tune_blocks", 0),
        help=f"unfreeze the last N of VGG16's {VGG16_BLOCKS} convolutional blocks (1: block5 "
        "only); 0: off, the base stays frozen (default: %(default)s)",
    )
    tune.add_argument(
        "--fine-tune-learning-rate",
        metavar="RATE",
        type=_positive_float,
        default=_env("fine_tune_learning_rate", 1e-5),
        help="the optimizer's (initial) learning rate while fine-tuning, with --schedule "
        "(default: %(default)s)",
    )
    tune.add_argument(
        "--fine-tune-epochs",
        metavar="N",
        type=_positive_int,
        default=_env("fine_tune_epochs", 5),
        help="epochs of end-to-end training on the images, after the head's --epochs "
        "(default: %(default)s)",
    )


def family_options(p: argparse.ArgumentParser, family: str) -> None:
    """The options only some families have."""
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
        p.add_argument(
            "--transfer-trainable",
            choices=TRANSFER_TRAINABLE,
            default=_env("transfer_trainable", "all"),
            help="what learns in the second phase: all (every layer goes on learning, at the "
            "same learning rate: what reproduces the seed notebook's numbers, see "
            "docs/training.md) or dense (the dense layers only, the convolutions frozen: the "
            "recipe the notebook states) (default: all)",
        )
        p.add_argument(
            "--transfer-optimizer",
            choices=TRANSFER_OPTIMIZER,
            default=_env("transfer_optimizer", "fresh"),
            help="the second phase's optimizer: fresh (a new one, as after compiling again) or "
            "continue (pretraining's, with its moment estimates and step count, as a notebook "
            "that never compiled again would have) (default: fresh)",
        )
        p.add_argument(
            "--transfer-reinit",
            action=argparse.BooleanOptionalAction,
            default=bool(_on(_env("transfer_reinit"))),
            help="start the second phase with the dense layers (bottleneck and classifier) "
            "drawn afresh from their initialisers, instead of as pretraining left them "
            "(default: no)",
        )
