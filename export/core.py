"""Export one training run into a model repository version, with the parity check."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

import keras
import numpy as np
import onnx

import training.models  # noqa: F401 - registers the custom layers model.keras refers to
from export import bottleneck_map, convert, parity
from export.errors import ExportError
from export.repository import choose_version, staged_version, validate_name

log = logging.getLogger(__name__)

PACKAGES = (
    "tensorflow-cpu",
    "tensorflow",
    "keras",
    "tf2onnx",
    "onnx",
    "onnxruntime-gpu",
    "onnxruntime",
    "numpy",
)


def load_run(run_dir: Path) -> tuple[keras.Model, dict[str, Any], dict[str, Any], np.ndarray]:
    """The run's model, config.json, metrics.json and parity images; clear errors if absent."""
    if not run_dir.is_dir():
        raise ExportError(f"{run_dir}: no such run directory")
    files = {
        name: run_dir / name
        for name in ("model.keras", "config.json", "metrics.json", "samples.npz")
    }
    missing = [name for name, path in files.items() if not path.is_file()]
    if missing:
        raise ExportError(f"{run_dir}: not a finished training run (missing {', '.join(missing)})")
    try:
        config = json.loads(files["config.json"].read_text())
        metrics = json.loads(files["metrics.json"].read_text())
        with np.load(files["samples.npz"]) as samples:
            images = samples["images"]
        model = keras.saving.load_model(files["model.keras"])
    except (OSError, ValueError, KeyError) as exc:
        raise ExportError(f"{run_dir}: cannot read the run: {exc}") from exc
    convert.check_model(model)
    return model, config, metrics, images


def package_versions() -> dict[str, str]:
    found = {}
    for package in PACKAGES:
        try:
            found[package] = importlib_metadata.version(package)
        except importlib_metadata.PackageNotFoundError:
            continue
    return found


def build_metadata(
    name: str, version: int, model: keras.Model, config: dict[str, Any], metrics: dict[str, Any]
) -> dict[str, Any]:
    """The facts of metadata.json (all but the ONNX file's own sha256, added after writing)."""
    train = config["config"]
    _, height, width, channels = model.inputs[0].shape
    labels = config["dataset"]["labels"]
    base_weights = train["base_weights"] if train["family"] == "vgg16" else None
    return {
        "name": name,
        "version": version,
        "family": train["family"],
        "arch": train["arch"],
        "labels": labels,
        "input": {
            "name": convert.INPUT_NAME,
            "dtype": "uint8",
            "layout": "NHWC",
            "height": int(height),
            "width": int(width),
            "channels": int(channels),
        },
        "outputs": [
            {"name": "probabilities", "dtype": "float32", "shape": [-1, len(labels)]},
            {"name": "bottleneck", "dtype": "float32", "shape": [-1, 2]},
        ],
        "training": {
            "dataset": config["dataset"]["name"],
            "dataset_source": config["dataset"]["source"],
            "train_size": config["dataset"]["train_size"],
            "test_size": config["dataset"]["test_size"],
            "epochs": len(metrics["epochs"]),
            "test_accuracy": metrics["test_accuracy"],
            "seed": train["seed"],
            "base_weights": base_weights,
            "base_weights_real": config["model"]["base_weights_real"],
            "parameters": config["model"]["parameters"],
            **{k: metrics[k] for k in ("transfer", "fine_tune") if k in metrics},
        },
        "packages": package_versions(),
        "exported_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def export_run(
    run_dir: Path,
    repository: Path,
    name: str,
    version: int | None = None,
    tolerance: float = parity.TOLERANCE,
) -> dict[str, Any]:
    """Write REPO/NAME/V/{model.onnx, saved_model/, metadata.json, bottleneck_map.json};
    returns metadata.json."""
    validate_name(name)
    model, config, metrics, images = load_run(run_dir)
    model_dir = repository / name
    chosen = choose_version(model_dir, version)
    metadata = build_metadata(name, chosen, model, config, metrics)
    with staged_version(model_dir, chosen) as staging:
        log.info("exporting %s as %s version %d", run_dir, name, chosen)
        model(images[:1], training=False)  # a loaded model must be called once before export
        convert.save_savedmodel(model, staging / "saved_model")
        proto = convert.to_onnx(model, metadata, chosen)
        onnx.save_model(proto, staging / "model.onnx")
        report = parity.check(
            model, staging / "saved_model", staging / "model.onnx", images, tolerance
        )
        metadata["parity"] = report
        metadata["onnx"] = {
            "file": "model.onnx",
            "opset": convert.OPSET,
            "sha256": sha256_file(staging / "model.onnx"),
        }
        metadata["bottleneck_map"] = bottleneck_map.make(staging, staging / "model.onnx", config)
        (staging / "metadata.json").write_text(json.dumps(metadata, indent=2) + "\n")
    log.info(
        "parity on %d images: savedmodel %.2e, onnxruntime %.2e (max abs)",
        len(images),
        report["savedmodel"]["max_abs_diff"],
        report["onnxruntime"]["max_abs_diff"],
    )
    return metadata | {"path": str(model_dir / str(chosen))}
