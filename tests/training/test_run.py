"""Smoke runs of every family for one epoch on the committed sample, and what a run writes."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import train_config
from training.errors import ConfigError
from training.run import run

PNG = b"\x89PNG\r\n\x1a\n"


def _read(run_dir: Path, name: str) -> dict:
    return json.loads((run_dir / name).read_text())


def test_a_run_directory_holds_everything(seed_run: Path) -> None:
    for name in ("model.keras", "config.json", "metrics.json", "history.csv", "samples.npz"):
        assert (seed_run / name).is_file(), name
    figures = sorted(p.name for p in (seed_run / "figures").iterdir())
    assert figures == [
        "activations.png",
        "bottleneck.png",
        "confusion_matrix.png",
        "filters.png",
        "learning_curves.png",
        "most_wrong.png",
    ]
    for figure in figures:
        assert (seed_run / "figures" / figure).read_bytes()[:8] == PNG

    metrics = _read(seed_run, "metrics.json")
    assert len(metrics["epochs"]) == 1
    row = metrics["epochs"][0]
    assert set(row) >= {"epoch", "loss", "accuracy", "val_loss", "val_accuracy", "learning_rate"}
    matrix = np.array(metrics["test"]["confusion_matrix"])
    assert matrix.shape == (10, 10) and matrix.sum() == 500
    assert metrics["test_accuracy"] == pytest.approx(np.trace(matrix) / 500)
    assert set(metrics["test"]["per_class_accuracy"]) == set(
        _read(seed_run, "config.json")["dataset"]["labels"]
    )
    with (seed_run / "history.csv").open() as handle:
        assert [int(r["epoch"]) for r in csv.DictReader(handle)] == [1]

    config = _read(seed_run, "config.json")
    assert config["config"]["family"] == "scratch" and config["config"]["arch"] == "seed"
    assert config["model"]["parameters"] == 4320
    assert config["dataset"]["train_size"] == 2000


def test_same_seed_same_numbers(seed_run: Path, tmp_path: Path) -> None:
    run(train_config(tmp_path / "again"))
    first, second = _read(seed_run, "metrics.json"), _read(tmp_path / "again", "metrics.json")
    assert first["test"] == second["test"]
    assert first["epochs"][0]["loss"] == second["epochs"][0]["loss"]


def test_default_arch_learns_on_the_sample(tmp_path: Path) -> None:
    summary = run(train_config(tmp_path / "default", arch="default", epochs=3))
    metrics = _read(tmp_path / "default", "metrics.json")
    assert summary["test_accuracy"] == metrics["test_accuracy"]
    assert metrics["epochs"][-1]["loss"] < metrics["epochs"][0]["loss"]
    assert metrics["epochs"][0]["learning_rate"] > metrics["epochs"][-1]["learning_rate"]  # cosine


def test_transfer_reports_three_accuracies_per_phase(tmp_path: Path) -> None:
    run(train_config(tmp_path / "transfer", "transfer", pretrain_classes=(3, 4, 5, 6, 7, 8, 9)))
    metrics = _read(tmp_path / "transfer", "metrics.json")
    transfer = metrics["transfer"]
    assert transfer["new_classes"] == [0, 1, 2]
    for phase in ("after_pretrain", "after_transfer"):
        assert set(transfer[phase]) == {"all", "pretrain_classes", "new_classes"}
    # Pretrained on classes 3-9 only, a 10-way softmax never predicts 0-2 correctly... rarely.
    assert transfer["after_pretrain"]["new_classes"] < 0.2
    assert transfer["after_transfer"]["all"] == pytest.approx(metrics["test_accuracy"])
    assert [r["phase"] for r in metrics["epochs"]] == ["pretrain", "transfer"]
    assert (tmp_path / "transfer" / "figures" / "transfer_bottleneck.png").is_file()


def test_vgg16_run_caches_features_and_says_its_base_is_random(vgg16_run: Path) -> None:
    metrics = _read(vgg16_run, "metrics.json")
    config = _read(vgg16_run, "config.json")
    assert metrics["base_weights"] == "none" and metrics["base_weights_real"] is False
    assert config["model"]["base_weights_real"] is False
    cached = list((vgg16_run.parent / "cache").glob("vgg16-features-*.npz"))
    assert len(cached) == 1
    with np.load(cached[0]) as features:
        assert features["train"].shape == (2000, 512) and features["test"].shape == (500, 512)


def test_vgg16_second_run_reads_the_cache(vgg16_run: Path, tmp_path: Path, caplog) -> None:
    caplog.set_level("INFO")
    run(train_config(tmp_path / "again", "vgg16", cache_dir=str(vgg16_run.parent / "cache")))
    assert any("cache hit" in record.getMessage() for record in caplog.records)
    assert (
        _read(tmp_path / "again", "metrics.json")["test"]
        == _read(vgg16_run, "metrics.json")["test"]
    )


def test_run_refuses_to_overwrite(seed_run: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="already holds files"):
        run(train_config(seed_run))
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.txt").write_text("precious")
    with pytest.raises(ConfigError, match="not a training run"):
        run(train_config(tmp_path / "mine"), overwrite=True)
    assert (tmp_path / "mine" / "thesis.txt").read_text() == "precious"


def test_transfer_rejects_classes_outside_the_dataset(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="must name classes 0-9"):
        run(train_config(tmp_path / "t", "transfer", pretrain_classes=(3, 12)))


def _colour_folders(root: Path, per_class: int = 6) -> Path:
    """Two classes anyone can tell apart: reddish and bluish squares, as PNG and JPEG."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for name, colour in (("blue", (20, 40, 220)), ("red", (220, 30, 20))):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = np.clip(np.array(colour) + rng.integers(-20, 20, (40, 40, 3)), 0, 255)
            Image.fromarray(pixels.astype(np.uint8)).save(root / name / f"{i}.png")
    return root


@pytest.mark.parametrize("family", ["scratch", "vgg16"])
def test_image_folders_train_both_families(family: str, tmp_path: Path) -> None:
    images = _colour_folders(tmp_path / "images")
    config = train_config(
        tmp_path / "run",
        family,
        arch="seed" if family == "scratch" else "vgg16",
        data_dir=None,
        image_dir=str(images),
        image_size=32,
        val_split=0.0,
        epochs=2,
        cache_dir=str(tmp_path / "cache"),
    )
    run(config)
    run_config = _read(tmp_path / "run", "config.json")
    assert run_config["dataset"]["labels"] == ["blue", "red"]
    assert run_config["dataset"]["image_shape"] == [32, 32, 3]
    assert run_config["dataset"]["train_size"] + run_config["dataset"]["test_size"] == 12
    assert len(_read(tmp_path / "run", "metrics.json")["epochs"]) == 2


def test_transfer_trainable_all_goes_on_training_the_convolutions(tmp_path: Path) -> None:
    import keras

    kernels = {}
    for trainable in ("dense", "all"):
        out = tmp_path / trainable
        run(train_config(out, "transfer", transfer_trainable=trainable))
        assert _read(out, "config.json")["config"]["transfer_trainable"] == trainable
        model = keras.saving.load_model(out / "model.keras", compile=False)
        conv = next(layer for layer in model.layers if isinstance(layer, keras.layers.Conv2D))
        kernels[trainable] = conv.get_weights()[0]
    # the same seed: the same pretraining, so the convolutions differ only if phase 2 moved them
    assert not np.allclose(kernels["dense"], kernels["all"])


def test_transfer_experiments_continue_the_optimizer_and_reinitialise_the_head(
    tmp_path: Path,
) -> None:
    import keras

    def dense_weights(out: Path) -> list[np.ndarray]:
        model = keras.saving.load_model(out / "model.keras", compile=False)
        return [w for layer in model.layers if isinstance(layer, keras.layers.Dense)
                for w in layer.get_weights()]  # fmt: skip

    runs = {
        "plain": {},
        "continue": {"transfer_optimizer": "continue"},
        "reinit": {"transfer_reinit": True},
    }
    weights = {}
    for name, options in runs.items():
        run(train_config(tmp_path / name, "transfer", **options))
        config = _read(tmp_path / name, "config.json")["config"]
        assert config["transfer_optimizer"] == options.get("transfer_optimizer", "fresh")
        assert config["transfer_reinit"] == options.get("transfer_reinit", False)
        weights[name] = dense_weights(tmp_path / name)
    # one seed, one pretraining: the second phase alone makes them differ
    for name in ("continue", "reinit"):
        assert not all(
            np.allclose(a, b) for a, b in zip(weights["plain"], weights[name], strict=True)
        )


def test_a_continued_optimizer_keeps_its_state_across_phases() -> None:
    import keras

    from training.fit import Recipe, fit, learning_rate, make_optimizer

    x = np.random.default_rng(0).integers(0, 255, (64, 8, 8, 1), dtype=np.uint8)
    y = np.arange(64) % 2
    inputs = keras.Input((8, 8, 1))
    outputs = keras.layers.Dense(2, activation="softmax")(keras.layers.Flatten()(inputs))
    model = keras.Model(inputs, outputs)
    recipe = Recipe(epochs=2, batch_size=16, learning_rate=1e-3, schedule="constant", seed=0)
    optimizer = make_optimizer("adam", learning_rate(recipe, len(x)), None)
    fit(model, (x, y), (x[:0], y[:0]), recipe, optimizer=optimizer)
    assert int(optimizer.iterations) == 8  # 2 epochs of 4 steps
    fit(model, (x, y), (x[:0], y[:0]), recipe, optimizer=optimizer)
    assert int(optimizer.iterations) == 16  # went on counting: its moments went on too
