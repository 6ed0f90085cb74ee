"""Shared fixtures: the committed Fashion-MNIST sample and small real training runs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

SAMPLE_DIR = Path(__file__).parent / "data" / "fashion-mnist"


@pytest.fixture(scope="session")
def sample_dir() -> Path:
    return SAMPLE_DIR


def train_config(out: Path, family: str = "scratch", **changes):
    """A 1-epoch config on the committed sample (the smoke-test shape of every run)."""
    from training.config import ARCH_DEFAULTS, TrainConfig

    arch = changes.pop("arch", "seed" if family != "vgg16" else "vgg16")
    defaults = ARCH_DEFAULTS[arch]
    values = {
        "family": family,
        "arch": arch,
        "out": str(out),
        "epochs": 1,
        "batch_size": defaults["batch_size"],
        "learning_rate": defaults["learning_rate"],
        "schedule": defaults["schedule"],
        "augment": defaults["augment"],
        "data_dir": str(SAMPLE_DIR),
        "seed": 7,
    }
    if family == "vgg16":
        values |= {"base_weights": "none", "image_size": 32}
    if family == "transfer":
        values |= {"pretrain_classes": (3, 4, 5, 6, 7, 8, 9)}
    return TrainConfig(**(values | changes))


@pytest.fixture(scope="session")
def seed_run(tmp_path_factory) -> Path:
    """The seed network trained for one epoch on the sample: a finished run directory."""
    from training.run import run

    out = tmp_path_factory.mktemp("runs") / "seed"
    run(train_config(out))
    return out


@pytest.fixture(scope="session")
def vgg16_run(tmp_path_factory) -> Path:
    """VGG16 (random frozen base, 32x32) with its head trained for one epoch on the sample."""
    from training.run import run

    root = tmp_path_factory.mktemp("runs")
    run(train_config(root / "vgg16", "vgg16", cache_dir=str(root / "cache")))
    return root / "vgg16"
