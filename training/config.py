"""The resolved configuration of one training run (saved as the run's config.json)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from imaging.policy import MAX_IMAGE_PIXELS
from training.errors import ConfigError

FAMILIES = ("scratch", "vgg16", "transfer")
TRANSFER_TRAINABLE = ("dense", "all")  # what learns in the transfer's second phase
TRANSFER_OPTIMIZER = ("fresh", "continue")  # the second phase's optimizer: new, or pretraining's
SCHEDULES = ("cosine", "constant")
OPTIMIZERS = ("adam", "sgd")
SGD_LEARNING_RATE = 0.01  # --optimizer sgd without --learning-rate: the cats/dogs recipe's
SGD_MOMENTUM = 0.9  # --optimizer sgd without --momentum: the cats/dogs recipe's
VGG16_BLOCKS = 5  # convolutional blocks of VGG16 (block1 ... block5), what fine-tuning counts

# Augmentation presets: (shear, zoom, flip). Shear and zoom are fractions of the image side;
# flip mirrors a random half of the images left-right. kdnuggets is the cats/dogs article's
# ImageDataGenerator(shear_range=0.2, zoom_range=0.2, horizontal_flip=True); its shear of 0.2
# radians (the Keras of 2017) is a horizontal shear of about 0.2 of the height.
AUGMENT_PRESETS: dict[str, tuple[float, float, bool]] = {
    "none": (0.0, 0.0, False),
    "flip": (0.0, 0.0, True),
    "kdnuggets": (0.2, 0.2, True),
}

# Per architecture: what `--epochs`, `--batch-size`, `--learning-rate`, `--schedule` and
# `--augment` mean when not given. The seed network keeps the seed notebook's recipe.
ARCH_DEFAULTS: dict[str, dict[str, Any]] = {
    "seed": {
        "epochs": 50,
        "batch_size": 32,
        "learning_rate": 1e-3,
        "schedule": "constant",
        "augment": "none",
    },
    "default": {
        "epochs": 12,
        "batch_size": 128,
        "learning_rate": 2e-3,
        "schedule": "cosine",
        "augment": "flip",
    },
    "vgg16": {
        "epochs": 15,
        "batch_size": 128,
        "learning_rate": 1e-3,
        "schedule": "cosine",
        "augment": "none",
    },
}


@dataclass(frozen=True)
class Augmentation:
    """Random changes to training images only (never in the model): shear and zoom as
    fractions of the side, flip of a random half left-right."""

    shear: float = 0.0
    zoom: float = 0.0
    flip: bool = False

    @classmethod
    def preset(cls, name: str) -> Augmentation:
        if name not in AUGMENT_PRESETS:
            raise ConfigError(
                f"unknown --augment {name!r}; choose one of {', '.join(AUGMENT_PRESETS)}"
            )
        shear, zoom, flip = AUGMENT_PRESETS[name]
        return cls(shear, zoom, flip)

    @property
    def active(self) -> bool:
        return self.shear > 0 or self.zoom > 0 or self.flip

    @property
    def name(self) -> str:
        """The preset these amounts are, or "custom"."""
        amounts = (self.shear, self.zoom, self.flip)
        return next((n for n, p in AUGMENT_PRESETS.items() if p == amounts), "custom")


@dataclass(frozen=True)
class TrainConfig:
    family: str
    arch: str
    out: str
    epochs: int
    batch_size: int
    learning_rate: float
    schedule: str
    augment: Augmentation = field(default_factory=Augmentation)
    seed: int = 0
    val_split: float = 0.1
    optimizer: str = "adam"
    momentum: float | None = None  # SGD's; None with Adam
    patience: int = 0  # early stopping on the validation loss; 0: off
    data_dir: str | None = None
    image_dir: str | None = None
    image_size: int | None = None
    channels: int = 3
    test_split: float = 0.2
    max_image_pixels: int = MAX_IMAGE_PIXELS  # image files above it are skipped (as the server)
    strict: bool = False  # an image file that does not decode stops the run
    # vgg16
    base_weights: str = "none"
    cache_dir: str | None = None
    head_units: int = 256
    fine_tune_blocks: int = 0  # last N of VGG16's 5 blocks trained end to end after the head
    fine_tune_learning_rate: float = 1e-5
    fine_tune_epochs: int = 5
    # transfer
    pretrain_classes: tuple[int, ...] = field(default_factory=tuple)
    pretrain_epochs: int | None = None
    transfer_trainable: str = "all"  # TRANSFER_TRAINABLE (all: what reproduces the seed)
    transfer_optimizer: str = "fresh"  # TRANSFER_OPTIMIZER
    transfer_reinit: bool = False  # the dense layers start the second phase from new weights

    @property
    def base_weights_real(self) -> bool:
        """False only for a VGG16 run on a random base: every report must say so."""
        return self.family != "vgg16" or self.base_weights != "none"

    @property
    def run_dir(self) -> Path:
        return Path(self.out)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["pretrain_classes"] = list(self.pretrain_classes)
        data["augment"] = {"preset": self.augment.name, **asdict(self.augment)}
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TrainConfig:
        """The inverse of `to_json`; a run written before augmentation had amounts
        (`augment: true` meant flips) reads as the same recipe."""
        values = dict(data)
        values["pretrain_classes"] = tuple(values.get("pretrain_classes", ()))
        augment = values.get("augment", False)
        if isinstance(augment, bool):
            values["augment"] = Augmentation.preset("flip" if augment else "none")
        else:
            amounts = {k: v for k, v in augment.items() if k != "preset"}
            values["augment"] = Augmentation(**amounts)
        return cls(**values)

    @classmethod
    def load(cls, path: Path) -> TrainConfig:
        return cls.from_json(json.loads(path.read_text())["config"])


def check(config: TrainConfig) -> None:
    """Refuse combinations that cannot work, before any data is read (ConfigError)."""
    problems = _problems(config)
    if problems:
        raise ConfigError(problems[0])


def _problems(config: TrainConfig) -> list[str]:
    problems = []
    augment = config.augment
    if not 0.0 <= augment.shear <= 1.0 or not 0.0 <= augment.zoom < 1.0:
        problems.append(
            f"--shear must be in [0, 1] and --zoom in [0, 1), got {augment.shear} and "
            f"{augment.zoom}"
        )
    if config.optimizer not in OPTIMIZERS:
        problems.append(f"unknown --optimizer {config.optimizer!r}; choose adam or sgd")
    if config.optimizer != "sgd" and config.momentum is not None:
        problems.append("--momentum is SGD's: it needs --optimizer sgd")
    if config.momentum is not None and not 0.0 <= config.momentum < 1.0:
        problems.append(f"--momentum must be in [0, 1), got {config.momentum}")
    if config.patience < 0:
        problems.append(f"--patience must be 0 (off) or more epochs, got {config.patience}")
    if config.patience > 0 and config.val_split <= 0:
        problems.append("--patience watches the validation loss: it needs --val-split above 0")
    problems.extend(_fine_tune_problems(config))
    return problems


def _fine_tune_problems(config: TrainConfig) -> list[str]:
    blocks = config.fine_tune_blocks
    if config.family != "vgg16":
        return [f"--fine-tune-blocks is vgg16's, not {config.family}'s"] if blocks else []
    problems = []
    if not 0 <= blocks <= VGG16_BLOCKS:
        problems.append(f"--fine-tune-blocks must be 0 (off) to {VGG16_BLOCKS}, got {blocks}")
    if blocks and (config.fine_tune_learning_rate <= 0 or config.fine_tune_epochs < 1):
        problems.append("--fine-tune-learning-rate and --fine-tune-epochs must be positive")
    if config.augment.active and not blocks:
        problems.append(
            f"vgg16's head trains on cached features, which augmentation cannot change: "
            f"--augment {config.augment.name} needs --fine-tune-blocks 1 or more (it then "
            f"augments the images of the fine-tuning phase)"
        )
    return problems
