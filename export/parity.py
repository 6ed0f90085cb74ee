"""Parity at export: Keras, the SavedModel and onnxruntime must agree on the same real pixels."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import tensorflow as tf

from export.convert import OUTPUT_NAMES, SERVING_SIGNATURE
from export.errors import ParityError
from training import models

TOLERANCE = 1e-4  # max absolute difference, any output, any image


def savedmodel_outputs(path: Path, images: np.ndarray) -> dict[str, np.ndarray]:
    serve = tf.saved_model.load(str(path)).signatures[SERVING_SIGNATURE]
    result = serve(images=tf.constant(images, dtype=tf.uint8))
    return {name: result[name].numpy() for name in OUTPUT_NAMES}


def onnx_outputs(path: Path, images: np.ndarray) -> dict[str, np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    values = session.run(list(OUTPUT_NAMES), {session.get_inputs()[0].name: images})
    return dict(zip(OUTPUT_NAMES, values, strict=True))


def compare(
    reference: dict[str, np.ndarray], candidate: dict[str, np.ndarray]
) -> dict[str, float | int]:
    """Largest absolute difference over both outputs, and how many argmaxes differ."""
    diff = max(float(np.abs(reference[n] - candidate[n]).max()) for n in OUTPUT_NAMES)
    flips = int(
        np.sum(reference["probabilities"].argmax(1) != candidate["probabilities"].argmax(1))
    )
    return {"max_abs_diff": diff, "argmax_mismatches": flips}


def check(
    model: Any,
    savedmodel: Path,
    onnx_file: Path,
    images: np.ndarray,
    tolerance: float = TOLERANCE,
) -> dict[str, Any]:
    """Run all three on `images`; raise ParityError naming the gap, else return the report."""
    reference = models.predict(model, images)
    report: dict[str, Any] = {"images": int(len(images)), "tolerance": tolerance}
    for name, outputs in (
        ("savedmodel", savedmodel_outputs(savedmodel, images)),
        ("onnxruntime", onnx_outputs(onnx_file, images)),
    ):
        result = compare(reference, outputs)
        report[name] = result
        if result["max_abs_diff"] > tolerance or result["argmax_mismatches"]:
            raise ParityError(
                f"{name} disagrees with Keras on {len(images)} real images: max abs difference "
                f"{result['max_abs_diff']:.3g} (tolerance {tolerance:g}), "
                f"{result['argmax_mismatches']} different predicted classes"
            )
    return report
