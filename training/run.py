"""One training run, in the order it happens: data -> model -> fit -> evaluate -> save -> report.

`run(config)` writes the run directory:
    model.keras  config.json  metrics.json  history.csv  samples.npz  figures/*.png
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import keras
import numpy as np

from training import figures, models, reports
from training.config import TrainConfig
from training.data import Dataset, load_fashion_mnist, load_image_folder, select_classes
from training.errors import ConfigError
from training.fit import fit, seed_everything, split_validation

log = logging.getLogger(__name__)

SAMPLE_IMAGES = 64  # test images kept beside the model for the export's parity check
SKIPPED_LISTED = 100  # image files that did not decode listed by name in config.json
DEFAULT_CACHE_DIR = Path.home() / ".cache" / "cnn-serving"  # VGG16 features, without --cache-dir


@dataclass
class Trained:
    """What a family's fitting hands to the common evaluate/save/report steps."""

    model: keras.Model
    rows: list[dict[str, Any]]
    extra: dict[str, Any] = field(default_factory=dict)  # merged into metrics.json
    bottleneck_before: np.ndarray | None = None  # transfer: the test set after pretraining


def run(config: TrainConfig, overwrite: bool = False) -> dict[str, Any]:
    """Train, evaluate and report one run; returns the summary that `__main__` prints."""
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
    trained = {"scratch": _fit_scratch, "vgg16": _fit_vgg16, "transfer": _fit_transfer}[
        config.family
    ](config, data)
    train_seconds = time.monotonic() - started
    outputs = models.predict(trained.model, data.x_test)
    test = reports.evaluation(data.y_test, outputs["probabilities"], data.labels)
    log.info("test accuracy %.4f on %d images", test["accuracy"], test["size"])
    metrics = {
        "family": config.family,
        "arch": config.arch,
        "dataset": data.name,
        "base_weights": config.base_weights if config.family == "vgg16" else None,
        "test_accuracy": test["accuracy"],
        "test": test,
        "train_seconds": round(train_seconds, 1),
        "epochs": trained.rows,
        **trained.extra,
    }
    run_dir = prepare_run_dir(config.run_dir, overwrite)  # a previous run goes only now
    figure_paths = save_run(run_dir, config, data, trained, outputs, metrics)
    return {
        "run_dir": str(run_dir),
        "test_accuracy": test["accuracy"],
        "train_seconds": round(train_seconds, 1),
        "figures": [str(p) for p in figure_paths],
        **({"skipped_files": len(data.skipped)} if config.image_dir is not None else {}),
        **({"transfer": trained.extra["transfer"]} if "transfer" in trained.extra else {}),
    }


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


def _fit_args(config: TrainConfig) -> dict[str, Any]:
    return {
        "epochs": config.epochs,
        "batch_size": config.batch_size,
        "learning_rate": config.learning_rate,
        "schedule": config.schedule,
        "augment": config.augment,
        "seed": config.seed,
    }


def _fit_scratch(config: TrainConfig, data: Dataset) -> Trained:
    model = models.build_scratch(config.arch, data.image_shape, len(data.labels))
    log.info("model: scratch/%s, %d parameters", config.arch, model.count_params())
    x, y, x_val, y_val = split_validation(data.x_train, data.y_train, config.val_split, config.seed)
    rows = fit(models.classifier_view(model), (x, y), (x_val, y_val), **_fit_args(config))
    return Trained(model, rows)


def _fit_transfer(config: TrainConfig, data: Dataset) -> Trained:
    """The seed's experiment: pretrain on some classes, freeze the convolutions, retrain the
    dense layers on all classes; accuracy overall, on the pretrain classes and on the new ones."""
    num_classes = len(data.labels)
    pretrain = sorted(config.pretrain_classes)
    if not pretrain or min(pretrain) < 0 or max(pretrain) >= num_classes:
        raise ConfigError(f"--pretrain-classes {pretrain} must name classes 0-{num_classes - 1}")
    new = [c for c in range(num_classes) if c not in pretrain]
    model = models.build_scratch(config.arch, data.image_shape, num_classes)
    log.info(
        "model: transfer/%s, %d parameters; pretrain on classes %s, new classes %s",
        config.arch,
        model.count_params(),
        pretrain,
        new,
    )

    x_pre, y_pre = select_classes(data.x_train, data.y_train, pretrain)
    x, y, x_val, y_val = split_validation(x_pre, y_pre, config.val_split, config.seed)
    args = _fit_args(config) | {"epochs": config.pretrain_epochs or config.epochs}
    rows = fit(models.classifier_view(model), (x, y), (x_val, y_val), phase="pretrain", **args)
    before = models.predict(model, data.x_test)

    for layer in model.layers:  # only the dense layers learn from here on
        layer.trainable = isinstance(layer, keras.layers.Dense)
    x, y, x_val, y_val = split_validation(data.x_train, data.y_train, config.val_split, config.seed)
    rows += fit(
        models.classifier_view(model),
        (x, y),
        (x_val, y_val),
        phase="transfer",
        first_epoch=len(rows) + 1,
        **_fit_args(config),
    )
    after = models.predict(model, data.x_test)

    def accuracies(outputs: dict[str, np.ndarray]) -> dict[str, float]:
        predicted = outputs["probabilities"].argmax(axis=1)
        return {
            "all": reports.accuracy_on(data.y_test, predicted),
            "pretrain_classes": reports.accuracy_on(data.y_test, predicted, pretrain),
            "new_classes": reports.accuracy_on(data.y_test, predicted, new),
        }

    extra: dict[str, Any] = {
        "transfer": {
            "pretrain_classes": pretrain,
            "new_classes": new,
            "after_pretrain": accuracies(before),
            "after_transfer": accuracies(after),
        }
    }
    for phase in ("after_pretrain", "after_transfer"):
        acc = extra["transfer"][phase]
        log.info(
            "%s: accuracy all %.4f, pretrain classes %.4f, new classes %.4f",
            phase.replace("_", " "),
            acc["all"],
            acc["pretrain_classes"],
            acc["new_classes"],
        )
    return Trained(model, rows, extra, bottleneck_before=before["bottleneck"])


def _fit_vgg16(config: TrainConfig, data: Dataset) -> Trained:
    """Frozen VGG16 base run once over the data (cached), a dense head fit on its features."""
    image_size = config.image_size or 32
    base = models.vgg16_base(image_size, config.base_weights)
    extractor = models.vgg16_features(data.image_shape, image_size, base)
    started = time.monotonic()
    f_train, f_test = _cached_features(config, data, extractor, image_size)
    feature_seconds = time.monotonic() - started
    head = models.vgg16_head(f_train.shape[1], len(data.labels), config.head_units)
    log.info(
        "model: vgg16 base (%s weights, %dx%d) + head of %d parameters on %d features",
        config.base_weights,
        image_size,
        image_size,
        head.count_params(),
        f_train.shape[1],
    )
    x, y, x_val, y_val = split_validation(f_train, data.y_train, config.val_split, config.seed)
    rows = fit(
        models.classifier_view(head),
        (x, y),
        (x_val, y_val),
        **(_fit_args(config) | {"augment": False}),
    )
    model = models.assemble_vgg16(extractor, head)
    head_test = models.predict(head, f_test)["probabilities"]
    full_test = models.predict(model, data.x_test[:SAMPLE_IMAGES])["probabilities"]
    drift = float(np.abs(head_test[:SAMPLE_IMAGES] - full_test).max())
    if drift > 1e-3:
        raise RuntimeError(f"assembled VGG16 model disagrees with its head by {drift:.2e}")
    return Trained(
        model,
        rows,
        {
            "feature_seconds": round(feature_seconds, 1),
            "base_weights_real": config.base_weights_real,
        },
    )


def _weights_id(config: TrainConfig) -> str:
    if config.base_weights == "none":
        return f"none(seed={config.seed})"  # the random base depends on the seed
    if config.base_weights == "imagenet":
        return "imagenet"
    return "sha256:" + hashlib.sha256(Path(config.base_weights).read_bytes()).hexdigest()


def _cached_features(
    config: TrainConfig, data: Dataset, extractor: keras.Model, image_size: int
) -> tuple[np.ndarray, np.ndarray]:
    """VGG16 bottleneck features of train and test, cached on disk by data + weights + size."""
    facts = f"{data.fingerprint()}|{_weights_id(config)}|{image_size}|keras {keras.__version__}"
    key = hashlib.sha256(facts.encode()).hexdigest()[:24]
    cache_dir = Path(config.cache_dir) if config.cache_dir else DEFAULT_CACHE_DIR
    path = cache_dir / f"vgg16-features-{key}.npz"
    if path.is_file():
        with np.load(path) as cached:
            log.info("vgg16 features: cache hit %s", path)
            return cached["train"], cached["test"]
    log.info(
        "vgg16 features: computing for %d images (cache %s)",
        len(data.x_train) + len(data.x_test),
        path,
    )
    f_train = _extract(extractor, data.x_train, "train features")
    f_test = _extract(extractor, data.x_test, "test features")
    cache_dir.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.tmp.npz")
    np.savez(partial, train=f_train, test=f_test)
    partial.replace(path)  # atomic: a crash never leaves a half-written cache entry
    return f_train, f_test


def _extract(
    extractor: keras.Model, images: np.ndarray, what: str, chunk: int = 2048
) -> np.ndarray:
    from tqdm import tqdm  # noqa: PLC0415

    parts = []
    with tqdm(total=len(images), desc=what, unit="img", disable=not sys.stderr.isatty()) as bar:
        for start in range(0, len(images), chunk):
            parts.append(
                extractor.predict(images[start : start + chunk], batch_size=256, verbose=0)
            )
            bar.update(len(parts[-1]))
    return np.concatenate(parts).astype(np.float32)


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
    """How figures and summaries name a run; a random VGG16 base is always said out loud."""
    if config.family != "vgg16":
        return f"{config.family}/{config.arch}"
    if config.base_weights == "none":
        return "vgg16 (random frozen base: no pretrained weights)"
    if config.base_weights == "imagenet":
        return "vgg16 (ImageNet base)"
    return f"vgg16 (base weights {Path(config.base_weights).name})"


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
    conv = models.conv_layers(trained.model)
    if config.family != "vgg16" and conv:
        paths.append(
            figures.filters(
                folder / "filters.png", conv[0].get_weights()[0], f"{name}: first-layer filters"
            )
        )
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


def _tf_version() -> str:
    import tensorflow as tf  # noqa: PLC0415

    return str(tf.__version__)
