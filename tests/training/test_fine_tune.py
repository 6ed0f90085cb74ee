"""Fine-tuning VGG16: after the head trains on cached features, the last blocks and the head
train end to end; the report shows the accuracy before and after, a random base stays named."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from export.core import export_run
from tests.conftest import train_config
from training.__main__ import build_parser
from training.config import check
from training.errors import ConfigError
from training.run import run

KERNEL = re.compile(r"block(\d)_conv(\d)")


@pytest.fixture(scope="module")
def tuned_run(vgg16_run: Path, tmp_path_factory) -> Path:
    """The vgg16_run's recipe (same seed, same cached features), then block5 fine-tuned for
    one epoch."""
    out = tmp_path_factory.mktemp("runs") / "tuned"
    config = train_config(
        out,
        "vgg16",
        cache_dir=str(vgg16_run.parent / "cache"),
        fine_tune_blocks=1,
        fine_tune_epochs=1,
    )
    run(config)
    return out


def _read(run_dir: Path, name: str) -> dict:
    return json.loads((run_dir / name).read_text())


def test_the_report_shows_accuracy_before_and_after(tuned_run: Path, vgg16_run: Path) -> None:
    metrics = _read(tuned_run, "metrics.json")
    tune = metrics["fine_tune"]
    # the head trains as in the head-only run: the same accuracy before fine-tuning
    assert tune["test_accuracy_before"] == _read(vgg16_run, "metrics.json")["test_accuracy"]
    assert tune["test_accuracy_after"] == metrics["test_accuracy"]
    assert tune["trainable_layers"] == ["block5_conv1", "block5_conv2", "block5_conv3"]
    assert (tune["blocks"], tune["epochs"], tune["learning_rate"]) == (1, 1, 1e-5)
    assert [(row["epoch"], row["phase"]) for row in metrics["epochs"]] == [
        (1, "head"),
        (2, "fine-tune"),
    ]
    assert metrics["epochs"][1]["learning_rate"] < 1e-5  # the fine-tuning rate, decayed
    config = _read(tuned_run, "config.json")
    assert config["config"]["fine_tune_blocks"] == 1
    assert metrics["base_weights_real"] is False and config["model"]["base_weights_real"] is False


def test_a_random_base_is_named_as_in_every_random_base_run(tuned_run: Path) -> None:
    described = subprocess.run(
        [sys.executable, "-m", "training.summary", str(tuned_run)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert described.returncode == 0, described.stderr
    metrics = _read(tuned_run, "metrics.json")
    tune = metrics["fine_tune"]
    assert "(random frozen VGG16 base: no pretrained weights)" in described.stdout
    assert (
        f"fine-tuning    block5 and the head, 1 epoch at lr 1e-05: test accuracy "
        f"{tune['test_accuracy_before']:.4f} before, {tune['test_accuracy_after']:.4f} after"
    ) in described.stdout
    table = subprocess.run(
        [sys.executable, "-m", "training.summary", "--table", str(tuned_run)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    row = table.stdout.splitlines()[-1]
    assert row.startswith(
        "| vgg16 --base-weights none --fine-tune-blocks 1 (random frozen base, no pretrained "
        "weights) | 1 + 1 |"
    )


def _kernels(path: Path) -> dict[tuple[int, int], np.ndarray]:
    """VGG16's conv kernels in an ONNX file, by (block, conv)."""
    found = {}
    for init in onnx.load(path).graph.initializer:
        match = KERNEL.search(init.name)
        if match and len(init.dims) == 4:
            found[int(match[1]), int(match[2])] = numpy_helper.to_array(init)
    return found


@pytest.mark.slow
def test_the_export_differs_in_block5_only_and_keeps_parity(
    tuned_run: Path, vgg16_run: Path, tmp_path: Path
) -> None:
    tuned = export_run(tuned_run, tmp_path, "tuned")
    head_only = export_run(vgg16_run, tmp_path, "head")
    assert tuned["parity"]["onnxruntime"]["max_abs_diff"] <= tuned["parity"]["tolerance"]
    assert tuned["parity"]["onnxruntime"]["argmax_mismatches"] == 0
    assert tuned["training"]["fine_tune"]["blocks"] == 1
    assert tuned["training"]["base_weights_real"] is False
    mine = _kernels(Path(tuned["path"]) / "model.onnx")
    theirs = _kernels(Path(head_only["path"]) / "model.onnx")
    assert len(mine) == len(theirs) == 13  # VGG16's 13 conv layers
    changed = sorted(key for key in mine if not np.array_equal(mine[key], theirs[key]))
    assert changed == [(5, 1), (5, 2), (5, 3)]


def test_fine_tuning_is_vgg16s_and_counts_five_blocks(tmp_path: Path, capsys) -> None:
    with pytest.raises(ConfigError, match="--fine-tune-blocks is vgg16's, not scratch's"):
        check(train_config(tmp_path / "r", fine_tune_blocks=1))
    with pytest.raises(ConfigError, match=r"--fine-tune-blocks must be 0 \(off\) to 5, got 6"):
        check(train_config(tmp_path / "r", "vgg16", fine_tune_blocks=6))
    for argv in (["scratch", "--fine-tune-blocks", "1"], ["vgg16", "--fine-tune-blocks", "6"]):
        with pytest.raises(SystemExit) as exit_info:
            build_parser().parse_args(argv)
        assert exit_info.value.code == 2
    errors = capsys.readouterr().err
    assert "unrecognized arguments: --fine-tune-blocks 1" in errors
    assert "must be 0 (off) to 5, got 6" in errors
