"""Print what a run and its export produced, for people (used by `make demo`).

python -m training.summary RUN [EXPORT_JSON]
python -m training.summary --table RUN...
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any


def describe(run_dir: Path, export: dict[str, Any] | None) -> str:
    metrics = json.loads((run_dir / "metrics.json").read_text())
    config = json.loads((run_dir / "config.json").read_text())
    lines = [
        f"run            {run_dir}",
        f"model          {metrics['family']}/{metrics['arch']}, "
        f"{config['model']['parameters']:,} parameters",
        f"data           {config['dataset']['name']} ({config['dataset']['train_size']:,} train, "
        f"{config['dataset']['test_size']:,} test{_skipped(config['dataset'])}) "
        f"from {config['dataset']['source']}",
        f"epochs         {len(metrics['epochs'])} in {metrics['train_seconds']:.0f} s",
        f"test accuracy  {metrics['test_accuracy']:.4f}",
    ]
    if metrics.get("base_weights") == "none":
        lines.append("               (random frozen VGG16 base: no pretrained weights)")
    lines.extend(_recipe_lines(config["config"], metrics))
    lines.append(
        "figures        "
        + "\n               ".join(str(p) for p in sorted((run_dir / "figures").glob("*.png")))
    )
    if export:
        onnx = export["parity"]["onnxruntime"]["max_abs_diff"]
        lines.append(f"exported       {export['path']} (model.onnx, saved_model/, metadata.json)")
        lines.append(
            f"parity         onnxruntime vs Keras max abs diff {onnx:.2e} on "
            f"{export['parity']['images']} test images"
        )
    return "\n".join(lines)


def _recipe_lines(config: dict[str, Any], metrics: dict[str, Any]) -> list[str]:
    """How it fitted: optimizer, augmentation, early stopping, fine-tuning (when used)."""
    optimizer = f"{config.get('optimizer', 'adam')} lr {config['learning_rate']:.0e}"
    if config.get("momentum") is not None:
        optimizer += f" momentum {config['momentum']}"
    augment = config.get("augment")
    if isinstance(augment, dict):
        flip = "on" if augment["flip"] else "off"
        amounts = f" (shear {augment['shear']:g}, zoom {augment['zoom']:g}, flip {flip})"
        augment = augment["preset"] + ("" if augment["preset"] == "none" else amounts)
    lines = [
        f"recipe         {optimizer}, {config['schedule']} schedule, batch {config['batch_size']}",
        f"augmentation   {augment}",
    ]
    for stop in metrics.get("early_stopping", {}).get("phases", []):
        what = "stopped after" if stop["stopped_early"] else "ran to"
        lines.append(
            f"early stopping {stop['phase']}: {what} epoch {stop['last_epoch']} "
            f"(patience {metrics['early_stopping']['patience']}), "
            f"weights of epoch {stop['best_epoch']}"
        )
    if "fine_tune" in metrics:
        tune = metrics["fine_tune"]
        blocks = sorted({name.split("_")[0] for name in tune["trainable_layers"]})
        lines.append(
            f"fine-tuning    {', '.join(blocks)} and the head, {_count(tune['epochs'], 'epoch')} "
            f"at lr {tune['learning_rate']:.0e}: test accuracy {tune['test_accuracy_before']:.4f}"
            f" before, {tune['test_accuracy_after']:.4f} after"
        )
    return lines


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def _skipped(dataset: dict[str, Any]) -> str:
    count = dataset.get("skipped_files", 0)
    return f"; {count:,} image files skipped, listed in config.json" if count else ""


# What the seed notebooks and articles report for the same experiment (shared/seeds).
SEED_NUMBERS = {
    "scratch/seed": "0.8688 (50 epochs)",
    "scratch/default": "0.8688 (the seed network)",
    "transfer/seed": "0.8649 / 0.8719 / 0.8487",
    "vgg16/vgg16": "none comparable (the seed's VGG16 used ImageNet weights on cats vs dogs)",
}


# Options an experiment may change from the default, named in the table's row so that a row's
# seeds all ran the same recipe: (setting, its default now, what a run recorded without it ran
# with, its flag); the second set is transfer's.
VARIED: tuple[tuple[str, Any, Any, str], ...] = (("val_split", 0.1, 0.1, "--val-split"),)
VARIED_TRANSFER: tuple[tuple[str, Any, Any, str], ...] = (
    ("transfer_trainable", "all", "dense", "--transfer-trainable"),
    ("transfer_optimizer", "fresh", "fresh", "--transfer-optimizer"),
    ("transfer_reinit", False, False, "--transfer-reinit"),
)


def _changed_options(settings: dict[str, Any], family: str) -> str:
    varied = VARIED + (VARIED_TRANSFER if family == "transfer" else ())
    named = ""
    for key, default, unrecorded, flag in varied:
        value = settings.get(key, unrecorded)
        if value != default:
            named += f" {flag}" if value is True else f" {flag} {value}"
    return named


@dataclass(frozen=True)
class Run:
    """What the table needs of one run directory (its metrics.json and config.json)."""

    model: str  # the row's name: family, arch, base weights
    key: str  # the SEED_NUMBERS key
    epochs: str
    minutes: float
    accuracies: tuple[float, ...]  # test accuracy; transfer: all / pretraining / new classes
    seed: int
    labels: tuple[str, ...] = ()  # what each accuracy is, where it is not plain (fine-tuning)

    @classmethod
    def read(cls, run_dir: Path) -> Run:
        metrics = json.loads((run_dir / "metrics.json").read_text())
        config = json.loads((run_dir / "config.json").read_text())
        family, arch = metrics["family"], metrics["arch"]
        model = f"{family} --arch {arch}" if family != "vgg16" else "vgg16"
        accuracies: tuple[float, ...] = (metrics["test_accuracy"],)
        epochs = str(len(metrics["epochs"]))
        settings = config.get("config", config)
        model += _changed_options(settings, family)
        if family == "transfer":
            after = metrics["transfer"]["after_transfer"]
            accuracies = (after["all"], after["pretrain_classes"], after["new_classes"])
            phases = [row["phase"] for row in metrics["epochs"]]
            epochs = f"{phases.count('pretrain')} + {phases.count('transfer')}"
        labels: tuple[str, ...] = ()
        if family == "vgg16":
            model += f" --base-weights {metrics['base_weights']}"
            if "fine_tune" in metrics:
                tune = metrics["fine_tune"]
                model += f" --fine-tune-blocks {tune['blocks']}"
                accuracies = (tune["test_accuracy_before"], tune["test_accuracy_after"])
                labels = ("head only", "fine-tuned")
                phases = [row["phase"] for row in metrics["epochs"]]
                epochs = f"{phases.count('head')} + {phases.count('fine-tune')}"
            if metrics["base_weights"] == "none":
                model += " (random frozen base, no pretrained weights)"
        seed = int(settings.get("seed", 0))
        minutes = metrics["train_seconds"] / 60
        return cls(model, f"{family}/{arch}", epochs, minutes, accuracies, seed, labels)


def runs_in(paths: list[Path]) -> list[Path]:
    """Run directories: each path itself (it holds metrics.json), or the runs below it (a folder
    of committed results, one sub-folder per run)."""
    found = []
    for path in paths:
        if (path / "metrics.json").is_file():
            found.append(path)
            continue
        below = sorted(p.parent for p in path.glob("**/metrics.json"))
        if not below:
            raise ValueError(f"{path}: no metrics.json in it or below it")
        found += below
    return found


def spread(values: list[float]) -> str:
    """mean ± sample standard deviation, and min-max (one value: itself)."""
    if len(values) == 1:
        return f"{values[0]:.4f}"
    mean, sd = statistics.mean(values), statistics.stdev(values)
    return f"{mean:.4f} ± {sd:.4f} ({min(values):.4f}-{max(values):.4f})"


def table_row(group: list[Run]) -> str:
    first = group[0]
    parts = [spread([run.accuracies[i] for run in group]) for i in range(len(first.accuracies))]
    if first.labels:
        accuracy = ", ".join(
            f"{part} {label}" for part, label in zip(parts, first.labels, strict=True)
        )
    else:
        accuracy = " / ".join(parts)
    minutes = statistics.mean(run.minutes for run in group)
    seeds = ", ".join(str(run.seed) for run in sorted(group, key=lambda run: run.seed))
    return (
        f"| {first.model} | {first.epochs} | {len(group)} ({seeds}) | {minutes:.1f} min | "
        f"{accuracy} | {SEED_NUMBERS.get(first.key, '')} |"
    )


def table(paths: list[Path]) -> str:
    """One row per experiment (model and epochs), over however many seeds ran it."""
    groups: dict[tuple[str, str], list[Run]] = {}
    for run_dir in runs_in(paths):
        run = Run.read(run_dir)
        groups.setdefault((run.model, run.epochs), []).append(run)
    header = (
        "| model | epochs | seeds | training time (mean) | test accuracy measured here: "
        "mean ± sd (min-max) | the seed's number |\n| --- | --- | --- | --- | --- | --- |"
    )
    return "\n".join([header, *(table_row(group) for group in groups.values())])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m training.summary",
        usage="python -m training.summary RUN [EXPORT_JSON] | --table RUN...",
        description="Print what a training run (and its export) produced, or, with --table, "
        "one Markdown row per experiment (mean ± sd over the runs of its seeds) beside the "
        "seeds' numbers.",
    )
    parser.add_argument(
        "run", nargs="?", type=Path, metavar="RUN", help="a run directory (python -m training)"
    )
    parser.add_argument(
        "export",
        nargs="?",
        type=Path,
        metavar="EXPORT_JSON",
        help="the JSON that python -m export printed for that run",
    )
    parser.add_argument(
        "--table",
        nargs="+",
        type=Path,
        metavar="RUN",
        help="print the table of these runs: run directories, or folders holding run "
        "directories (e.g. results/, the committed metrics of every seed); runs of the same "
        "model and epochs make one row",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.table is not None:
        if args.run is not None:
            parser.error("--table takes run directories only")
        try:
            print(table(args.table))
        except (OSError, ValueError, KeyError) as exc:
            print(f"error: cannot tabulate: {exc}", file=sys.stderr)
            return 2
        return 0
    if args.run is None:
        parser.error("a run directory, or --table and run directories")
    try:
        export = json.loads(args.export.read_text()) if args.export is not None else None
        print(describe(args.run, export))
    except (OSError, ValueError, KeyError) as exc:
        print(f"error: cannot summarise {args.run}: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
