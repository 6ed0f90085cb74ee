"""The cats/dogs recipe: augmentation in the input pipeline only (never in the model or its
export), early stopping on the validation loss, SGD with momentum; every setting recorded."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from PIL import Image

from export.core import export_run
from tests.conftest import train_config
from training.__main__ import build_parser, config_from_args
from training.config import Augmentation, TrainConfig, check
from training.errors import ConfigError
from training.fit import train_pipeline
from training.run import run

RANDOM_OPS = {
    "RandomUniform",
    "RandomNormal",
    "RandomUniformLike",
    "RandomNormalLike",
    "Multinomial",
    "Bernoulli",
}


def _config(*argv: str) -> TrainConfig:
    return config_from_args(build_parser().parse_args(list(argv)))


@pytest.mark.parametrize(
    ("argv", "amounts", "name"),
    [
        (["scratch", "--arch", "seed"], (0.0, 0.0, False), "none"),
        (["scratch"], (0.0, 0.0, True), "flip"),  # the default network's measured recipe
        (["scratch", "--arch", "seed", "--augment"], (0.0, 0.0, True), "flip"),
        (["scratch", "--no-augment"], (0.0, 0.0, False), "none"),
        (["scratch", "--augment", "kdnuggets"], (0.2, 0.2, True), "kdnuggets"),
        (["scratch", "--augment", "kdnuggets", "--zoom", "0.1"], (0.2, 0.1, True), "custom"),
        (["transfer", "--shear", "0.3", "--no-flip"], (0.3, 0.0, False), "custom"),
        (["vgg16"], (0.0, 0.0, False), "none"),
    ],
)
def test_presets_and_amounts(argv: list[str], amounts: tuple, name: str) -> None:
    augment = _config(*argv).augment
    assert (augment.shear, augment.zoom, augment.flip) == amounts
    assert augment.name == name


def test_environment_variables_set_the_recipe(monkeypatch) -> None:
    for name, value in {
        "AUGMENT": "kdnuggets",
        "SHEAR": "0.3",
        "FLIP": "0",
        "OPTIMIZER": "sgd",
        "MOMENTUM": "0.5",
        "PATIENCE": "3",
    }.items():
        monkeypatch.setenv(f"CNN_SERVING_{name}", value)
    config = _config("scratch")
    assert config.augment == Augmentation(shear=0.3, zoom=0.2, flip=False)
    assert (config.optimizer, config.momentum, config.patience) == ("sgd", 0.5, 3)
    monkeypatch.setenv("CNN_SERVING_AUGMENT", "true")  # the variable's yes/no of old: flips
    monkeypatch.delenv("CNN_SERVING_SHEAR")
    monkeypatch.delenv("CNN_SERVING_FLIP")
    assert _config("scratch", "--arch", "seed").augment.name == "flip"


def test_sgd_takes_the_recipes_rate_and_momentum_unless_told() -> None:
    sgd = _config("scratch", "--optimizer", "sgd")
    assert (sgd.learning_rate, sgd.momentum) == (0.01, 0.9)
    mine = _config("scratch", "--optimizer", "sgd", "--learning-rate", "0.05", "--momentum", "0")
    assert (mine.learning_rate, mine.momentum) == (0.05, 0.0)
    adam = _config("scratch")
    assert (adam.optimizer, adam.learning_rate, adam.momentum) == ("adam", 2e-3, None)


def test_the_saved_config_reads_back_and_old_runs_still_read(tmp_path: Path) -> None:
    config = _config("scratch", "--augment", "kdnuggets", "--zoom", "0.1", "--optimizer", "sgd")
    saved = config.to_json()
    assert saved["augment"] == {"preset": "custom", "shear": 0.2, "zoom": 0.1, "flip": True}
    assert TrainConfig.from_json(json.loads(json.dumps(saved))) == config
    old = {k: v for k, v in saved.items() if k not in ("optimizer", "momentum", "patience")}
    assert TrainConfig.from_json(old | {"augment": True}).augment == Augmentation(flip=True)
    assert TrainConfig.from_json(old | {"augment": False}).augment == Augmentation()


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"patience": 2, "val_split": 0.0}, "--patience watches the validation loss"),
        ({"momentum": 0.5}, "--momentum is SGD's: it needs --optimizer sgd"),
        ({"augment": Augmentation(zoom=1.0)}, r"--zoom in \[0, 1\)"),
        ({"optimizer": "rmsprop"}, "unknown --optimizer 'rmsprop'"),
    ],
)
def test_combinations_that_cannot_work_are_refused(
    changes: dict, message: str, tmp_path: Path
) -> None:
    with pytest.raises(ConfigError, match=message):
        check(train_config(tmp_path / "run", **changes))


def test_vgg16_refuses_augmentation_of_cached_features_in_one_line(
    sample_dir: Path, tmp_path: Path
) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "training", "vgg16", "--base-weights", "none",
         "--augment", "kdnuggets", "--data-dir", str(sample_dir), "--out", str(tmp_path / "r")],
        capture_output=True, text=True, timeout=300, env=dict(os.environ),
    )  # fmt: skip
    assert result.returncode == 2 and "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines == [
        "error: vgg16's head trains on cached features, which augmentation cannot change: "
        "--augment kdnuggets needs --fine-tune-blocks 1 or more (it then augments the images "
        "of the fine-tuning phase)"
    ]
    assert not (tmp_path / "r").exists()


def _batches(x: np.ndarray, augment: Augmentation, seed: int = 3) -> list[np.ndarray]:
    """Two epochs of the training pipeline, labels being the image indices."""
    data = train_pipeline(x, np.arange(len(x)), 8, seed, augment)
    return [np.concatenate([b[0] for b in data.as_numpy_iterator()]) for _ in range(2)]


def _with_order(x: np.ndarray, augment: Augmentation) -> tuple[np.ndarray, np.ndarray]:
    data = train_pipeline(x, np.arange(len(x)), 8, 3, augment)
    images, order = zip(*data.as_numpy_iterator(), strict=True)
    return np.concatenate(images), np.concatenate(order)


def test_the_pipeline_augments_reproducibly_and_keeps_pixels() -> None:
    x = np.random.default_rng(0).integers(0, 256, (16, 12, 12, 1), dtype=np.uint8)
    plain, order = _with_order(x, Augmentation())
    np.testing.assert_array_equal(plain, x[order])  # no augmentation: the images themselves
    kdnuggets = Augmentation.preset("kdnuggets")
    first, second = _batches(x, kdnuggets)
    assert first.dtype == np.uint8 and first.shape == x.shape  # still pixels, for the model
    again, _ = _batches(x, kdnuggets)
    np.testing.assert_array_equal(first, again)  # same seed, same augmented images
    assert not np.array_equal(first, second)  # a new draw every epoch
    moved, order = _with_order(x, Augmentation(zoom=0.2))
    assert np.mean(moved != x[order]) > 0.5  # the zoom moved most pixels


def _shape_folders(root: Path, per_class: int = 12) -> Path:
    """Three classes a small net can learn: a bright disc, a bar, a cross on noise, 32x32."""
    rng = np.random.default_rng(1)
    yy, xx = np.mgrid[0:32, 0:32]
    shapes = {
        "disc": (yy - 16) ** 2 + (xx - 16) ** 2 < 60,
        "bar": np.abs(xx - 16) < 3,
        "cross": (np.abs(xx - 16) < 2) | (np.abs(yy - 16) < 2),
    }
    for name, mask in shapes.items():
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 60, (32, 32, 3))
            pixels[mask] = 200 + rng.integers(0, 55, 3)
            Image.fromarray(pixels.astype(np.uint8)).save(root / name / f"{i}.png")
    return root


@pytest.mark.slow
def test_an_augmented_folder_run_exports_no_random_op(tmp_path: Path) -> None:
    config = train_config(
        tmp_path / "run",
        data_dir=None,
        image_dir=str(_shape_folders(tmp_path / "shapes")),
        image_size=32,
        epochs=2,
        augment=Augmentation.preset("kdnuggets"),
        optimizer="sgd",
        learning_rate=0.01,
        momentum=0.9,
        patience=1,
        val_split=0.2,
    )
    summary = run(config)
    assert summary["recipe"]["augment"]["preset"] == "kdnuggets"
    assert summary["recipe"]["optimizer"] == {"name": "sgd", "learning_rate": 0.01,
                                              "momentum": 0.9}  # fmt: skip
    saved = json.loads((tmp_path / "run" / "config.json").read_text())["config"]
    assert saved["augment"] == {"preset": "kdnuggets", "shear": 0.2, "zoom": 0.2, "flip": True}
    assert (saved["optimizer"], saved["momentum"], saved["patience"]) == ("sgd", 0.9, 1)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    (phase,) = metrics["early_stopping"]["phases"]
    assert phase["epochs_run"] == len(metrics["epochs"]) and phase["best_epoch"] in (1, 2)

    meta = export_run(tmp_path / "run", tmp_path / "repo", "shapes")
    assert meta["parity"]["onnxruntime"]["max_abs_diff"] <= meta["parity"]["tolerance"]
    assert meta["parity"]["savedmodel"]["argmax_mismatches"] == 0
    graph = onnx.load(tmp_path / "repo" / "shapes" / "1" / "model.onnx").graph
    ops = {node.op_type for node in graph.node}
    assert ops and not ops & RANDOM_OPS, sorted(ops)
    assert not [n.name for n in graph.node if "shear" in n.name or "zoom" in n.name]


def test_early_stopping_stops_and_keeps_the_best_epoch(tmp_path: Path) -> None:
    # A learning rate of 0 leaves the weights, and so the validation loss, as they are: no
    # epoch improves on the first, and patience 1 stops after the second.
    config = train_config(
        tmp_path / "run", epochs=5, learning_rate=0.0, schedule="constant", patience=1
    )
    summary = run(config)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert [row["epoch"] for row in metrics["epochs"]] == [1, 2]
    assert summary["early_stopping"] == metrics["early_stopping"] == {
        "monitor": "val_loss",
        "patience": 1,
        "phases": [
            {"phase": "train", "epochs_run": 2, "last_epoch": 2, "stopped_early": True,
             "best_epoch": 1}
        ],
    }  # fmt: skip
    described = subprocess.run(
        [sys.executable, "-m", "training.summary", str(tmp_path / "run")],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert "early stopping train: stopped after epoch 2 (patience 1), weights of epoch 1" in (
        described.stdout
    )
