"""Metrics of a finished run and the files that hold them (metrics.json, history.csv)."""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """(K, K) int64: row = true class, column = predicted class."""
    matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(matrix, (y_true.astype(np.int64), y_pred.astype(np.int64)), 1)
    return matrix


def accuracy_on(
    y_true: np.ndarray, y_pred: np.ndarray, classes: Sequence[int] | None = None
) -> float:
    """Accuracy over all samples, or over the samples whose true class is in `classes`."""
    mask = np.ones(len(y_true), bool) if classes is None else np.isin(y_true, list(classes))
    if not mask.any():
        return float("nan")
    return float(np.mean(y_true[mask] == y_pred[mask]))


def evaluation(
    y_true: np.ndarray, probabilities: np.ndarray, labels: Sequence[str]
) -> dict[str, Any]:
    """Accuracy, per-class accuracy and confusion matrix of softmax outputs."""
    y_pred = probabilities.argmax(axis=1)
    matrix = confusion_matrix(y_true, y_pred, len(labels))
    support = matrix.sum(axis=1)
    per_class = {
        label: (float(matrix[i, i] / support[i]) if support[i] else None)
        for i, label in enumerate(labels)
    }
    return {
        "accuracy": accuracy_on(y_true, y_pred),
        "size": int(len(y_true)),
        "per_class_accuracy": per_class,
        "confusion_matrix": matrix.tolist(),
    }


def write_history_csv(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    """One row per epoch; the columns of the first row (every row has the same keys)."""
    if not rows:
        path.write_text("")
        return
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, allow_nan=True) + "\n")


def most_wrong(y_true: np.ndarray, probabilities: np.ndarray, limit: int = 16) -> np.ndarray:
    """Indices of the wrongly predicted samples, most confident first, at most `limit`:
    confidence is the probability of the predicted (wrong) class; ties keep sample order."""
    predicted = probabilities.argmax(axis=1)
    wrong = np.flatnonzero(predicted != y_true)
    confidence = probabilities[wrong, predicted[wrong]]
    order = np.argsort(-confidence, kind="stable")
    return wrong[order[:limit]]


def one_per_class(y_true: np.ndarray, num_classes: int, limit: int) -> list[tuple[int, int]]:
    """(class, index of its first sample) for the first `limit` classes that have one."""
    chosen = []
    for label in range(num_classes):
        found = np.flatnonzero(y_true == label)
        if len(found):
            chosen.append((label, int(found[0])))
        if len(chosen) == limit:
            break
    return chosen
