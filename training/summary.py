"""Print what a run and its export produced, for people (used by `make demo`).

python -m training.summary RUN [EXPORT_JSON]
python -m training.summary --table RUN...
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
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


def table_row(run_dir: Path) -> str:
    metrics = json.loads((run_dir / "metrics.json").read_text())
    family, arch = metrics["family"], metrics["arch"]
    model = f"{family} --arch {arch}" if family != "vgg16" else "vgg16"
    accuracy = f"{metrics['test_accuracy']:.4f}"
    epochs = str(len(metrics["epochs"]))
    if family == "transfer":
        after = metrics["transfer"]["after_transfer"]
        accuracy = (
            f"{after['all']:.4f} / {after['pretrain_classes']:.4f} / {after['new_classes']:.4f}"
        )
        phases = [row["phase"] for row in metrics["epochs"]]
        epochs = f"{phases.count('pretrain')} + {phases.count('transfer')}"
    if family == "vgg16":
        model += f" --base-weights {metrics['base_weights']}"
        if "fine_tune" in metrics:
            tune = metrics["fine_tune"]
            model += f" --fine-tune-blocks {tune['blocks']}"
            accuracy = (
                f"{tune['test_accuracy_before']:.4f} head only, "
                f"{tune['test_accuracy_after']:.4f} fine-tuned"
            )
            phases = [row["phase"] for row in metrics["epochs"]]
            epochs = f"{phases.count('head')} + {phases.count('fine-tune')}"
        if metrics["base_weights"] == "none":
            model += " (random frozen base, no pretrained weights)"
    seconds = metrics["train_seconds"]
    return (
        f"| {model} | {epochs} | {seconds / 60:.1f} min | {accuracy} | "
        f"{SEED_NUMBERS.get(f'{family}/{arch}', '')} |"
    )


def table(run_dirs: list[Path]) -> str:
    header = (
        "| model | epochs | training time | test accuracy measured here | the seed's number |\n"
        "| --- | --- | --- | --- | --- |"
    )
    return "\n".join([header, *(table_row(run_dir) for run_dir in run_dirs)])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m training.summary",
        usage="python -m training.summary RUN [EXPORT_JSON] | --table RUN...",
        description="Print what a training run (and its export) produced, or, with --table, "
        "one Markdown row per run beside the seeds' numbers.",
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
        "--table", nargs="+", type=Path, metavar="RUN", help="print the table of these runs"
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
