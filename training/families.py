"""How each family fits, in the order `run` calls them: scratch, transfer, vgg16.

Each takes the resolved config and the dataset and hands back a `Trained`: the two-output model,
its per-epoch rows and the family's own facts for metrics.json (transfer: accuracies per phase;
vgg16: the feature cache and, when fine-tuned, the accuracy before and after).
"""

from __future__ import annotations

import hashlib
import logging
import os
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import keras
import numpy as np

from training import models, reports
from training.config import VGG16_BLOCKS, Augmentation, TrainConfig
from training.data import Dataset, select_classes
from training.errors import ConfigError
from training.fit import Fitted, Recipe, fit, learning_rate, make_optimizer, split_validation

log = logging.getLogger(__name__)

DEFAULT_CACHE_DIR = Path.home() / ".cache" / "cnn-serving"  # VGG16 features, without --cache-dir
DRIFT_IMAGES = 64  # test images the assembled VGG16 model must answer as its head does


@dataclass
class Trained:
    """What a family's fitting hands to the common evaluate/save/report steps."""

    model: keras.Model
    rows: list[dict[str, Any]]
    extra: dict[str, Any] = field(default_factory=dict)  # merged into metrics.json
    bottleneck_before: np.ndarray | None = None  # transfer: the test set after pretraining
    stops: list[dict[str, Any]] = field(default_factory=list)  # early stopping, per phase

    def add(self, fitted: Fitted, phase: str, patience: int) -> None:
        """Append a phase's rows and, with early stopping on, where it stopped."""
        self.rows += fitted.rows
        if patience:
            self.stops.append(early_stop(fitted, phase))


def early_stop(fitted: Fitted, phase: str) -> dict[str, Any]:
    """metrics.json's record of one phase under early stopping."""
    return {
        "phase": phase,
        "epochs_run": len(fitted.rows),
        "last_epoch": fitted.rows[-1]["epoch"] if fitted.rows else None,
        "stopped_early": fitted.stopped_early,
        "best_epoch": fitted.best_epoch,  # the epoch whose weights the model keeps
    }


def recipe(config: TrainConfig) -> Recipe:
    return Recipe(
        epochs=config.epochs,
        batch_size=config.batch_size,
        learning_rate=config.learning_rate,
        schedule=config.schedule,
        seed=config.seed,
        augment=config.augment,
        optimizer=config.optimizer,
        momentum=config.momentum,
        patience=config.patience,
    )


def fit_scratch(config: TrainConfig, data: Dataset) -> Trained:
    model = models.build_scratch(config.arch, data.image_shape, len(data.labels))
    log.info("model: scratch/%s, %d parameters", config.arch, model.count_params())
    x, y, x_val, y_val = split_validation(data.x_train, data.y_train, config.val_split, config.seed)
    trained = Trained(model, [])
    trained.add(
        fit(models.classifier_view(model), (x, y), (x_val, y_val), recipe(config)),
        "train",
        config.patience,
    )
    return trained


def fit_transfer(config: TrainConfig, data: Dataset) -> Trained:
    """The seed's experiment: pretrain on some classes, then retrain on all classes (every
    layer, or with --transfer-trainable dense only the dense layers); accuracy overall, on the
    pretrain classes and on the new ones."""
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
    trained = Trained(model, [])
    x_pre, y_pre = select_classes(data.x_train, data.y_train, pretrain)
    x, y, x_val, y_val = split_validation(x_pre, y_pre, config.val_split, config.seed)
    pre = replace(recipe(config), epochs=config.pretrain_epochs or config.epochs)
    optimizer = make_optimizer(pre.optimizer, learning_rate(pre, len(x)), pre.momentum)
    view = models.classifier_view(model)
    fitted = fit(view, (x, y), (x_val, y_val), pre, phase="pretrain", optimizer=optimizer)
    trained.add(fitted, "pretrain", config.patience)
    before = models.predict(model, data.x_test)

    for layer in model.layers:  # dense: only the dense layers learn from here on
        layer.trainable = config.transfer_trainable == "all" or isinstance(
            layer, keras.layers.Dense
        )
    if config.transfer_reinit:
        reinitialise_dense(model, config.seed)
    x, y, x_val, y_val = split_validation(data.x_train, data.y_train, config.val_split, config.seed)
    fitted = fit(
        view,
        (x, y),
        (x_val, y_val),
        recipe(config),
        phase="transfer",
        first_epoch=len(trained.rows) + 1,
        optimizer=optimizer if config.transfer_optimizer == "continue" else None,
    )
    trained.add(fitted, "transfer", config.patience)
    after = models.predict(model, data.x_test)

    def accuracies(outputs: dict[str, np.ndarray]) -> dict[str, float]:
        predicted = outputs["probabilities"].argmax(axis=1)
        return {
            "all": reports.accuracy_on(data.y_test, predicted),
            "pretrain_classes": reports.accuracy_on(data.y_test, predicted, pretrain),
            "new_classes": reports.accuracy_on(data.y_test, predicted, new),
        }

    trained.extra["transfer"] = {
        "pretrain_classes": pretrain,
        "new_classes": new,
        "after_pretrain": accuracies(before),
        "after_transfer": accuracies(after),
    }
    for phase in ("after_pretrain", "after_transfer"):
        acc = trained.extra["transfer"][phase]
        log.info(
            "%s: accuracy all %.4f, pretrain classes %.4f, new classes %.4f",
            phase.replace("_", " "),
            acc["all"],
            acc["pretrain_classes"],
            acc["new_classes"],
        )
    trained.bottleneck_before = before["bottleneck"]
    return trained


def reinitialise_dense(model: keras.Model, seed: int) -> None:
    """Every Dense layer's weights drawn again from its initialisers (seeded)."""
    dense = [layer for layer in model.layers if isinstance(layer, keras.layers.Dense)]
    for i, layer in enumerate(dense):
        initializer = layer.kernel_initializer
        config = initializer.get_config()
        if "seed" in config:  # not pretraining's draw again
            initializer = initializer.from_config({**config, "seed": seed + 1000 + i})
        layer.kernel.assign(initializer(layer.kernel.shape))
        if layer.bias is not None:
            layer.bias.assign(layer.bias_initializer(layer.bias.shape))
    log.info("transfer: the dense layers start the second phase from new weights")


def fit_vgg16(config: TrainConfig, data: Dataset) -> Trained:
    """Frozen VGG16 base run once over the data (cached), a dense head fit on its features;
    with --fine-tune-blocks, then the last blocks and the head trained end to end on images."""
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
    head_recipe = replace(recipe(config), augment=Augmentation())  # features: nothing to augment
    phase = "head" if config.fine_tune_blocks else ""
    fitted = fit(models.classifier_view(head), (x, y), (x_val, y_val), head_recipe, phase=phase)
    model = models.assemble_vgg16(extractor, head)
    _check_assembly(model, head, f_test, data.x_test)
    trained = Trained(
        model,
        [],
        {
            "feature_seconds": round(feature_seconds, 1),
            "base_weights_real": config.base_weights_real,
        },
    )
    trained.add(fitted, "head", config.patience)
    if config.fine_tune_blocks:
        fine_tune(config, data, base, trained)
    return trained


def _check_assembly(
    model: keras.Model, head: keras.Model, f_test: np.ndarray, x_test: np.ndarray
) -> None:
    head_test = models.predict(head, f_test[:DRIFT_IMAGES])["probabilities"]
    full_test = models.predict(model, x_test[:DRIFT_IMAGES])["probabilities"]
    drift = float(np.abs(head_test - full_test).max())
    if drift > 1e-3:
        raise RuntimeError(f"assembled VGG16 model disagrees with its head by {drift:.2e}")


def fine_tune(config: TrainConfig, data: Dataset, base: keras.Model, trained: Trained) -> None:
    """Unfreeze the last --fine-tune-blocks blocks of the base and train them with the head,
    end to end on the images, at --fine-tune-learning-rate for --fine-tune-epochs; the test
    accuracy before goes to metrics.json, beside the run's own (after)."""
    model = trained.model
    before = _test_accuracy(model, data)
    unfrozen = models.unfreeze_last_blocks(base, config.fine_tune_blocks)
    log.info(
        "fine-tuning: last %d of %d blocks (%s) and the head, lr %.1e, epochs %d; "
        "test accuracy before %.4f",
        config.fine_tune_blocks,
        VGG16_BLOCKS,
        ", ".join(unfrozen),
        config.fine_tune_learning_rate,
        config.fine_tune_epochs,
        before,
    )
    x, y, x_val, y_val = split_validation(data.x_train, data.y_train, config.val_split, config.seed)
    tune = replace(
        recipe(config), epochs=config.fine_tune_epochs, learning_rate=config.fine_tune_learning_rate
    )
    fitted = fit(
        models.classifier_view(model),
        (x, y),
        (x_val, y_val),
        tune,
        phase="fine-tune",
        first_epoch=len(trained.rows) + 1,
    )
    trained.add(fitted, "fine-tune", config.patience)
    trained.extra["fine_tune"] = {
        "blocks": config.fine_tune_blocks,
        "trainable_layers": unfrozen,
        "learning_rate": config.fine_tune_learning_rate,
        "epochs": len(fitted.rows),
        "test_accuracy_before": before,
        "test_accuracy_after": None,  # the run's test accuracy: `run` evaluates the model once
    }


def _test_accuracy(model: keras.Model, data: Dataset) -> float:
    predicted = models.predict(model, data.x_test)["probabilities"].argmax(axis=1)
    return reports.accuracy_on(data.y_test, predicted)


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
