"""One training run, in the order it happens: data -> model -> fit -> evaluate -> save -> report.

`run(config)` writes the run directory:
    model.keras  config.json  metrics.json  history.csv  samples.npz  figures/*.png
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path
from typing import Any

import keras
import numpy as np

from training import config as configuration
from training import figures, models, reports
from training.config import VGG16_BLOCKS, TrainConfig
from training.data import Dataset, load_fashion_mnist, load_image_folder
from training.errors import ConfigError
from training.families import Trained, fit_scratch, fit_transfer, fit_vgg16
from training.fit import seed_everything

log = logging.getLogger(__name__)

SAMPLE_IMAGES = 64  # test images kept beside the model for the export's parity check
SKIPPED_LISTED = 100  # image files that did not decode listed by name in config.json
MOST_WRONG = 16  # test images in figures/most_wrong.png and metrics.json's most_wrong
ACTIVATION_CLASSES = 10  # rows of figures/activations.png: one test image per class


def run(config: TrainConfig, overwrite: bool = False) -> dict[str, Any]:
    """Train, evaluate and report one run; returns the summary that `__main__` prints."""
    configuration.check(config)
    check_run_dir(config.run_dir, overwrite)  # fail before any work, touch nothing yet
    seed_everything(config.seed)
    data = load_dataset(config)
    log.info(
        "data: %s from %s: %d train, %d test images of %s, %d classes",
        data.name,
        data.source,
        len(data.x_train),
        len(data.x_test),
        data.image_shape,
        len(data.labels),
    )
    started = time.monotonic()
    trained = {"scratch": fit_scratch, "vgg16": fit_vgg16, "transfer": fit_transfer}[config.family](
        config, data
    )
    train_seconds = time.monotonic() - started
    outputs = models.predict(trained.model, data.x_test)
    test = reports.evaluation(data.y_test, outputs["probabilities"], data.labels)
    log.info("test accuracy %.4f on %d images", test["accuracy"], test["size"])
    if "fine_tune" in trained.extra:
        trained.extra["fine_tune"]["test_accuracy_after"] = test["accuracy"]
    metrics = {
        "family": config.family,
        "arch": config.arch,
        "dataset": data.name,
        "base_weights": config.base_weights if config.family == "vgg16" else None,
        "test_accuracy": test["accuracy"],
        "test": test,
        "train_seconds": round(train_seconds, 1),
        "epochs": trained.rows,
        **_early_stopping(config, trained),
        "most_wrong": most_wrong(data, outputs["probabilities"]),
        **trained.extra,
    }
    run_dir = prepare_run_dir(config.run_dir, overwrite)  # a previous run goes only now
    figure_paths = save_run(run_dir, config, data, trained, outputs, metrics)
    return {
        "run_dir": str(run_dir),
        "title": run_title(config),
        "test_accuracy": test["accuracy"],
        "train_seconds": round(train_seconds, 1),
        "recipe": recipe_summary(config),
        "figures": [str(p) for p in figure_paths],
        **({"skipped_files": len(data.skipped)} if config.image_dir is not None else {}),
        **{k: metrics[k] for k in ("early_stopping", "transfer", "fine_tune") if k in metrics},
    }


def recipe_summary(config: TrainConfig) -> dict[str, Any]:
    """The settings that say how the run fitted, for the printed summary."""
    optimizer: dict[str, Any] = {"name": config.optimizer, "learning_rate": config.learning_rate}
    if config.momentum is not None:
        optimizer["momentum"] = config.momentum
    return {
        "optimizer": optimizer,
        "schedule": config.schedule,
        "batch_size": config.batch_size,
        "augment": config.to_json()["augment"],
        "patience": config.patience,
    }


def _early_stopping(config: TrainConfig, trained: Trained) -> dict[str, Any]:
    if not config.patience:
        return {}
    return {
        "early_stopping": {
            "monitor": "val_loss",
            "patience": config.patience,
            "phases": trained.stops,
        }
    }


def most_wrong(data: Dataset, probabilities: np.ndarray) -> list[dict[str, Any]]:
    """metrics.json's most confidently misread test images (index into the test set)."""
    rows = []
    for index in reports.most_wrong(data.y_test, probabilities, MOST_WRONG):
        predicted = int(probabilities[index].argmax())
        rows.append(
            {
                "index": int(index),
                "true": data.labels[int(data.y_test[index])],
                "predicted": data.labels[predicted],
                "confidence": float(probabilities[index, predicted]),
            }
        )
    return rows


def check_run_dir(run_dir: Path, overwrite: bool) -> None:
    """Refuse an existing run without `overwrite`, and anything that is not a run at all."""
    if not run_dir.exists():
        return
    if not run_dir.is_dir():
        raise ConfigError(f"{run_dir}: exists and is not a directory (--out)")
    if not any(run_dir.iterdir()):
        return
    if not overwrite:
        raise ConfigError(
            f"{run_dir}: already holds files; choose another --out or pass --overwrite"
        )
    if not (run_dir / "config.json").is_file():
        raise ConfigError(
            f"{run_dir}: not a training run (no config.json); refusing to overwrite it"
        )


def prepare_run_dir(run_dir: Path, overwrite: bool) -> Path:
    """An empty run directory with figures/; an existing run is replaced only with `overwrite`."""
    check_run_dir(run_dir, overwrite)
    if run_dir.exists():
        shutil.rmtree(run_dir)
    (run_dir / "figures").mkdir(parents=True)
    return run_dir


def load_dataset(config: TrainConfig) -> Dataset:
    if config.image_dir is not None:
        if config.image_size is None:
            raise ConfigError("--image-size is required with --image-dir")
        return load_image_folder(
            Path(config.image_dir),
            config.image_size,
            config.channels,
            config.test_split,
            config.seed,
            config.max_image_pixels,
            config.strict,
        )
    return load_fashion_mnist(Path(config.data_dir) if config.data_dir else None)


def save_run(
    run_dir: Path,
    config: TrainConfig,
    data: Dataset,
    trained: Trained,
    outputs: dict[str, np.ndarray],
    metrics: dict[str, Any],
) -> list[Path]:
    """model.keras, config.json, metrics.json, history.csv, samples.npz and the figures."""
    model = trained.model
    model.save(run_dir / "model.keras")
    reports.write_json(
        run_dir / "config.json",
        {
            "config": config.to_json(),
            "dataset": {
                "name": data.name,
                "source": data.source,
                "labels": list(data.labels),
                "image_shape": list(data.image_shape),
                "train_size": len(data.x_train),
                "test_size": len(data.x_test),
                "fingerprint": data.fingerprint(),
                **(skipped_files(data) if config.image_dir is not None else {}),
            },
            "model": {
                "parameters": int(model.count_params()),
                "outputs": list(model.output_names),
                "base_weights_real": config.base_weights_real,
            },
            "versions": {
                "keras": keras.__version__,
                "tensorflow": _tf_version(),
                "numpy": np.__version__,
            },
        },
    )
    reports.write_json(run_dir / "metrics.json", metrics)
    reports.write_history_csv(run_dir / "history.csv", trained.rows)
    np.savez_compressed(
        run_dir / "samples.npz",
        images=data.x_test[:SAMPLE_IMAGES],
        labels=data.y_test[:SAMPLE_IMAGES],
    )
    return draw_figures(run_dir / "figures", config, data, trained, outputs, metrics)


def skipped_files(data: Dataset) -> dict[str, Any]:
    """config.json's record of the image files that did not decode: their count, and the
    first SKIPPED_LISTED of them (path relative to the folder, reason)."""
    root = Path(data.source)
    listed = [
        {"path": str(s.path.relative_to(root)), "reason": s.reason}
        for s in data.skipped[:SKIPPED_LISTED]
    ]
    return {"skipped_files": len(data.skipped), "skipped": listed}


def run_title(config: TrainConfig) -> str:
    """How figures and summaries name a run; a random VGG16 base is always said out loud,
    fine-tuned or not."""
    if config.family != "vgg16":
        return f"{config.family}/{config.arch}"
    if config.base_weights == "none":
        title = "vgg16 (random frozen base: no pretrained weights)"
    elif config.base_weights == "imagenet":
        title = "vgg16 (ImageNet base)"
    else:
        title = f"vgg16 (base weights {Path(config.base_weights).name})"
    if config.fine_tune_blocks:
        title += f", last {config.fine_tune_blocks} of {VGG16_BLOCKS} blocks fine-tuned"
    return title


def draw_figures(
    folder: Path,
    config: TrainConfig,
    data: Dataset,
    trained: Trained,
    outputs: dict[str, np.ndarray],
    metrics: dict[str, Any],
) -> list[Path]:
    name = f"{run_title(config)} on {data.name}"
    accuracy = f"test accuracy {metrics['test_accuracy']:.4f}"
    paths = [
        figures.learning_curves(
            folder / "learning_curves.png", trained.rows, f"{name}: learning curves"
        ),
        figures.confusion(
            folder / "confusion_matrix.png",
            np.array(metrics["test"]["confusion_matrix"]),
            data.labels,
            f"{name}\ntest set, {accuracy}",
        ),
        figures.bottleneck(
            folder / "bottleneck.png",
            outputs["bottleneck"],
            data.y_test,
            data.labels,
            f"{name}\ntest set in the 2-D bottleneck, {accuracy}",
        ),
    ]
    paths.append(misread_figure(folder / "most_wrong.png", data, outputs, name))
    conv = models.conv_layers(trained.model)
    if config.family != "vgg16" and conv:
        paths.append(
            figures.filters(
                folder / "filters.png", conv[0].get_weights()[0], f"{name}: first-layer filters"
            )
        )
        paths.append(activation_figure(folder / "activations.png", data, trained.model, name))
    if trained.bottleneck_before is not None:
        transfer = metrics["transfer"]
        paths.append(
            figures.bottleneck_pair(
                folder / "transfer_bottleneck.png",
                trained.bottleneck_before,
                outputs["bottleneck"],
                data.y_test,
                data.labels,
                (
                    f"after pretraining on classes {transfer['pretrain_classes']} "
                    f"(acc {transfer['after_pretrain']['all']:.3f})",
                    f"after retraining the dense layers on all (acc "
                    f"{transfer['after_transfer']['all']:.3f})",
                ),
            )
        )
    return paths


def misread_figure(path: Path, data: Dataset, outputs: dict[str, np.ndarray], name: str) -> Path:
    """figures/most_wrong.png: the test images misread with the highest confidence."""
    probabilities = outputs["probabilities"]
    chosen = reports.most_wrong(data.y_test, probabilities, MOST_WRONG)
    captions = []
    for index in chosen:
        predicted = int(probabilities[index].argmax())
        captions.append(
            f"true {data.labels[int(data.y_test[index])]}\npredicted {data.labels[predicted]} "
            f"({probabilities[index, predicted]:.2f})"
        )
    wrong = int((probabilities.argmax(axis=1) != data.y_test).sum())
    title = (
        f"{name}\nthe {len(chosen)} test images misread with the highest confidence "
        f"({wrong} of {len(data.y_test)} misread)"
    )
    return figures.misread(path, data.x_test[chosen], captions, title)


def activation_figure(path: Path, data: Dataset, model: keras.Model, name: str) -> Path:
    """figures/activations.png: one test image per class through every conv layer."""
    chosen = reports.one_per_class(data.y_test, len(data.labels), ACTIVATION_CLASSES)
    images = data.x_test[[index for _, index in chosen]]
    maps = models.feature_maps(model, images)
    classes = [data.labels[label] for label, _ in chosen]
    return figures.activations(path, images, classes, maps, f"{name}: feature maps")


def _tf_version() -> str:
    import tensorflow as tf  # noqa: PLC0415

    return str(tf.__version__)
