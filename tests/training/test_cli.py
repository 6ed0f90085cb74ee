"""`python -m training` as a user meets it: --help, one-line errors, a real run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from training.__main__ import build_parser, parse_classes


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "training", *args],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, **(env or {})},
    )


def _one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    return lines[0]


COMMON = (
    "--data-dir",
    "--image-dir",
    "--image-size",
    "--channels",
    "--test-split",
    "--max-image-pixels",
    "--strict",
    "--val-split",
    "--epochs",
    "--batch-size",
    "--learning-rate",
    "--schedule",
    "--optimizer",
    "--momentum",
    "--patience",
    "--augment",
    "--no-augment",
    "--shear",
    "--zoom",
    "--flip",
    "--seed",
    "--out",
    "--overwrite",
    "--quiet",
)
OWN = {
    "scratch": ("--arch",),
    "vgg16": (
        "--base-weights",
        "--cache-dir",
        "--head-units",
        "--fine-tune-blocks",
        "--fine-tune-learning-rate",
        "--fine-tune-epochs",
    ),
    "transfer": ("--arch", "--pretrain-classes", "--pretrain-epochs"),
}


def _help_block(lines: list[str], option: str) -> str:
    """The help text printed for `option`: its line and the indented lines under it."""
    start = next(i for i, line in enumerate(lines) if line.lstrip().startswith(option))
    block = [lines[start]]
    for line in lines[start + 1 :]:
        if not line.strip() or line.lstrip().startswith("-") or not line.startswith("    "):
            break
        block.append(line)
    words = " ".join(block).split()
    return " ".join(w for w in words if not w.startswith(("-", "{")) and not w.isupper())


@pytest.mark.parametrize("family", sorted(OWN))
def test_help_explains_every_option(family: str, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args([family, "--help"])
    assert exit_info.value.code == 0
    lines = capsys.readouterr().out.splitlines()
    for option in COMMON + OWN[family]:
        assert len(_help_block(lines, option).split()) >= 3, (family, option)
    assert "CNN_SERVING_" in lines[-1]


def test_missing_data_dir_is_one_line(tmp_path: Path) -> None:
    line = _one_error_line(
        _cli("scratch", "--data-dir", str(tmp_path / "nowhere"), "--out", str(tmp_path / "run"))
    )
    assert line == f"error: {tmp_path / 'nowhere'}: no such directory (--data-dir)"
    assert _cli("scratch", "--help").returncode == 0
    assert not (tmp_path / "run").exists()  # nothing is created before the data is read


def test_malformed_idx_is_one_line(sample_dir: Path, tmp_path: Path) -> None:
    for path in sample_dir.iterdir():
        (tmp_path / path.name).write_bytes(path.read_bytes())
    (tmp_path / "train-labels-idx1-ubyte.gz").write_bytes(b"\x1f\x8b\x08\x00truncated")
    line = _one_error_line(
        _cli("scratch", "--data-dir", str(tmp_path), "--out", str(tmp_path / "run"))
    )
    assert line.startswith(f"error: {tmp_path / 'train-labels-idx1-ubyte.gz'}: cannot read")


def test_environment_variables_set_options(sample_dir: Path, tmp_path: Path) -> None:
    result = _cli(
        "scratch",
        "--arch",
        "seed",
        "--quiet",
        env={
            "CNN_SERVING_DATA_DIR": str(sample_dir),
            "CNN_SERVING_EPOCHS": "1",
            "CNN_SERVING_OUT": str(tmp_path / "run"),
        },
    )
    assert result.returncode == 0, result.stderr
    # TensorFlow's chatter, at import and while fitting with validation data, is filtered
    assert "use_unbounded_threadpool" not in result.stderr, result.stderr
    assert "oneDNN" not in result.stderr and "absl::InitializeLog" not in result.stderr
    summary = json.loads(result.stdout)
    assert summary["run_dir"] == str(tmp_path / "run")
    config = json.loads((tmp_path / "run" / "config.json").read_text())["config"]
    assert config["epochs"] == 1 and config["batch_size"] == 32  # the seed recipe's batch


@pytest.mark.parametrize(
    ("text", "classes"),
    [("3-9", (3, 4, 5, 6, 7, 8, 9)), ("0,2,5", (0, 2, 5)), ("7,0-1", (0, 1, 7))],
)
def test_class_lists(text: str, classes: tuple[int, ...]) -> None:
    assert parse_classes(text) == classes


def test_summary_prints_the_run_and_a_table_row(seed_run: Path) -> None:
    metrics = json.loads((seed_run / "metrics.json").read_text())
    one = subprocess.run(
        [sys.executable, "-m", "training.summary", str(seed_run)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert one.returncode == 0, one.stderr
    assert f"test accuracy  {metrics['test_accuracy']:.4f}" in one.stdout
    assert str(seed_run / "figures" / "bottleneck.png") in one.stdout
    table = subprocess.run(
        [sys.executable, "-m", "training.summary", "--table", str(seed_run)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    row = table.stdout.splitlines()[-1]
    assert row.startswith("| scratch --arch seed | 1 |") and "0.8688" in row
    assert f"{metrics['test_accuracy']:.4f}" in row
