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


def test_help_explains_every_option() -> None:
    parser = build_parser()
    sub = parser._subparsers._group_actions[0].choices  # noqa: SLF001 - argparse has no API
    for family, subparser in sub.items():
        for action in subparser._actions:  # noqa: SLF001
            if action.option_strings and action.dest != "help":
                assert action.help, f"{family} {action.option_strings} has no help"
    for family in ("scratch", "vgg16", "transfer"):
        text = _cli(family, "--help").stdout
        for option in (
            "--data-dir",
            "--epochs",
            "--batch-size",
            "--learning-rate",
            "--seed",
            "--out",
        ):
            assert option in text, (family, option)


def test_missing_data_dir_is_one_line(tmp_path: Path) -> None:
    line = _one_error_line(
        _cli("scratch", "--data-dir", str(tmp_path / "nowhere"), "--out", str(tmp_path / "run"))
    )
    assert line == f"error: {tmp_path / 'nowhere'}: no such directory (--data-dir)"
    assert not (tmp_path / "run" / "model.keras").exists()


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
