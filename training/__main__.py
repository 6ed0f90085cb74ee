"""Train a classifier and write a run directory.

    python -m training scratch [--arch seed|default] --out runs/scratch
    python -m training scratch --image-dir photos/ --image-size 64 --augment kdnuggets
    python -m training vgg16 --base-weights none --fine-tune-blocks 1 --out runs/vgg16
    python -m training transfer --pretrain-classes 3-9 --out runs/transfer

Every option can also be set with an environment variable CNN_SERVING_<OPTION> (for example
CNN_SERVING_EPOCHS=5); a command-line option wins over the variable.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from typing import Any

from training import options
from training.config import (
    ARCH_DEFAULTS,
    SGD_LEARNING_RATE,
    SGD_MOMENTUM,
    Augmentation,
    TrainConfig,
)
from training.errors import TrainingError
from training.logs import setup_cli_logging
from training.options import parse_classes

__all__ = ["build_parser", "config_from_args", "main", "parse_classes"]

log = logging.getLogger("training")


def build_parser() -> argparse.ArgumentParser:
    epilog = "defaults per architecture:\n  arch      epochs  batch  rate   schedule  augment\n"
    for arch, values in ARCH_DEFAULTS.items():
        epilog += (
            f"  {arch:8s}  {values['epochs']:6d}  {values['batch_size']:5d}  "
            f"{values['learning_rate']:.0e}  {values['schedule']:8s}  {values['augment']}\n"
        )
    epilog += (
        f"the rates are Adam's; with --optimizer sgd the rate is {SGD_LEARNING_RATE} and the "
        f"momentum {SGD_MOMENTUM}.\n"
        "every option is also an environment variable CNN_SERVING_<OPTION>."
    )
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
        "transfer": "the seed's transfer experiment: pretrain on some classes, then retrain on "
        "all classes (every layer by default, as the seed's numbers say it did; "
        "--transfer-trainable dense freezes the convolutions, as it says it did)",
    }
    for family, text in kinds.items():
        p = sub.add_parser(
            family,
            help=text,
            description=text,
            epilog=epilog,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        options.family_options(p, family)
        if family == "vgg16":
            options.fine_tune(p)
        options.common(p, family)
    return parser


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    arch = getattr(args, "arch", "vgg16")
    defaults = ARCH_DEFAULTS[arch if args.family != "vgg16" else "vgg16"]

    def pick(name: str, kind: type) -> Any:
        value = getattr(args, name)
        return defaults[name] if value is None else kind(value)

    return TrainConfig(
        family=args.family,
        arch=arch,
        out=str(args.out),
        epochs=pick("epochs", int),
        batch_size=pick("batch_size", int),
        learning_rate=_learning_rate(args, defaults),
        schedule=pick("schedule", str),
        augment=augmentation(args, defaults["augment"]),
        seed=args.seed,
        val_split=args.val_split,
        optimizer=args.optimizer,
        momentum=_momentum(args),
        patience=int(args.patience),
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
        fine_tune_blocks=int(getattr(args, "fine_tune_blocks", 0)),
        fine_tune_learning_rate=float(getattr(args, "fine_tune_learning_rate", 1e-5)),
        fine_tune_epochs=int(getattr(args, "fine_tune_epochs", 5)),
        pretrain_classes=getattr(args, "pretrain_classes", ()),
        pretrain_epochs=(
            int(args.pretrain_epochs) if getattr(args, "pretrain_epochs", None) else None
        ),
        transfer_trainable=getattr(args, "transfer_trainable", "all"),
        transfer_optimizer=getattr(args, "transfer_optimizer", "fresh"),
        transfer_reinit=bool(getattr(args, "transfer_reinit", False)),
    )


def augmentation(args: argparse.Namespace, default_preset: str) -> Augmentation:
    """The preset's amounts (the architecture's preset without --augment), each changed by
    --shear, --zoom or --flip when given."""
    preset = Augmentation.preset(args.augment or default_preset)
    return Augmentation(
        shear=preset.shear if args.shear is None else float(args.shear),
        zoom=preset.zoom if args.zoom is None else float(args.zoom),
        flip=preset.flip if args.flip is None else bool(args.flip),
    )


def _learning_rate(args: argparse.Namespace, defaults: dict[str, Any]) -> float:
    if args.learning_rate is not None:
        return float(args.learning_rate)
    return SGD_LEARNING_RATE if args.optimizer == "sgd" else float(defaults["learning_rate"])


def _momentum(args: argparse.Namespace) -> float | None:
    """SGD's momentum (its default when not given); Adam's stays None, and a --momentum
    given with Adam reaches the config, where the run refuses it."""
    if args.momentum is not None:
        return float(args.momentum)
    return SGD_MOMENTUM if args.optimizer == "sgd" else None


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_cli_logging(args.quiet)
    from training.run import run  # noqa: PLC0415 - keeps --help fast (no TensorFlow import)

    try:
        summary = run(config_from_args(args), overwrite=args.overwrite)
    except TrainingError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
