"""The resolved configuration of one training run (saved as the run's config.json)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from imaging.policy import MAX_IMAGE_PIXELS

FAMILIES = ("scratch", "vgg16", "transfer")
SCHEDULES = ("cosine", "constant")

# Per architecture: what `--epochs`, `--batch-size`, `--learning-rate`, `--schedule` and
# `--augment` mean when not given. The seed network keeps the seed notebook's recipe.
ARCH_DEFAULTS: dict[str, dict[str, Any]] = {
    "seed": {
        "epochs": 50,
        "batch_size": 32,
        "learning_rate": 1e-3,
        "schedule": "constant",
        "augment": False,
    },
    "default": {
        "epochs": 12,
        "batch_size": 128,
        "learning_rate": 2e-3,
        "schedule": "cosine",
        "augment": True,
    },
    "vgg16": {
        "epochs": 15,
        "batch_size": 128,
        "learning_rate": 1e-3,
        "schedule": "cosine",
        "augment": False,
    },
}


@dataclass(frozen=True)
class TrainConfig:
    family: str
    arch: str
    out: str
    epochs: int
    batch_size: int
    learning_rate: float
    schedule: str
    augment: bool
    seed: int = 0
    val_split: float = 0.1
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
    # transfer
    pretrain_classes: tuple[int, ...] = field(default_factory=tuple)
    pretrain_epochs: int | None = None

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
        return data

    @classmethod
    def load(cls, path: Path) -> TrainConfig:
        data = json.loads(path.read_text())["config"]
        data["pretrain_classes"] = tuple(data.get("pretrain_classes", ()))
        return cls(**data)
