"""`python -m training.summary --table`: one row per experiment, mean ± sd over its seeds."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest

from training.summary import main, spread, table


def write_run(
    folder: Path, family: str, accuracy: float, seed: int, settings=None, **extra
) -> None:
    folder.mkdir(parents=True)
    epochs = [{"phase": "pretrain"}] * 2 + [{"phase": "transfer"}] * 2
    metrics = {"family": family, "arch": "seed", "test_accuracy": accuracy,
               "epochs": epochs if family == "transfer" else [{}] * 3,
               "train_seconds": 120.0 + seed, **extra}  # fmt: skip
    (folder / "metrics.json").write_text(json.dumps(metrics))
    (folder / "config.json").write_text(json.dumps({"config": {"seed": seed, **(settings or {})}}))


def test_runs_of_one_experiment_make_one_row_with_mean_and_sd(tmp_path: Path, capsys) -> None:
    results = tmp_path / "results"
    for seed, accuracy in enumerate([0.86, 0.87, 0.85]):
        write_run(results / f"seed-{seed}", "scratch", accuracy, seed)
    transfer = {"after_transfer": {"all": 0.8, "pretrain_classes": 0.9, "new_classes": 0.7}}
    write_run(results / "transfer-0", "transfer", 0.8, 0, transfer=transfer)
    write_run(results / "transfer-all-0", "transfer", 0.8, 0, {"transfer_trainable": "all"},
              transfer=transfer)  # fmt: skip
    varied = {"transfer_trainable": "all", "transfer_optimizer": "continue",
              "transfer_reinit": True, "val_split": 0.2}  # fmt: skip
    write_run(results / "transfer-varied-0", "transfer", 0.8, 0, varied, transfer=transfer)
    assert main(["--table", str(results)]) == 0
    rows = capsys.readouterr().out.splitlines()
    assert len(rows) == 6  # header, separator, four experiments
    sd = statistics.stdev([0.86, 0.87, 0.85])
    assert rows[2] == (
        f"| scratch --arch seed | 3 | 3 (0, 1, 2) | 2.0 min | 0.8600 ± {sd:.4f} (0.8500-0.8700) "
        "| 0.8688 (50 epochs) |"
    )
    # a run that did not record what learnt in phase 2 ran before `all` became the default
    assert rows[3].startswith("| transfer --arch seed --transfer-trainable dense | 2 + 2 | 1 (0) "
                              "| 2.0 min | 0.8000 / 0.9000 / 0.7000 |")  # fmt: skip
    assert rows[4].startswith("| transfer --arch seed | 2 + 2 | 1 (0) |")
    assert rows[5].startswith(
        "| transfer --arch seed --val-split 0.2 --transfer-optimizer continue --transfer-reinit "
        "| 2 + 2 |"
    )


def test_spread_of_one_value_is_the_value() -> None:
    assert spread([0.5]) == "0.5000"
    assert spread([0.5, 0.7]) == "0.6000 ± 0.1414 (0.5000-0.7000)"


def test_a_folder_without_runs_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no metrics.json"):
        table([tmp_path])
    assert main(["--table", str(tmp_path)]) == 2
