"""Models for the benchmarks: trained for 1 epoch on the committed sample and exported to
build/bench-models on first use (reused afterwards). Their accuracy is meaningless; only their
speed matters. The Keras run directories stay in build/bench-runs (bench/score.py's naive loop
loads model.keras from there)."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

from service import repository

log = logging.getLogger("bench")

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "tests" / "data" / "fashion-mnist"
BUILD = ROOT / "build"
RUNS = BUILD / "bench-runs"
# python -m training arguments per model (VGG16 caches its features in build/ too)
MODELS = {
    "scratch": ["scratch", "--arch", "default"],
    "seed": ["scratch", "--arch", "seed"],
    "vgg16": ["vgg16", "--base-weights", "none", "--cache-dir", str(BUILD / "bench-cache")],
}


def prepare_repository(models: list[str]) -> Path:
    """Train (1 epoch, sample data) and export each missing model into build/bench-models."""
    repo = BUILD / "bench-models"
    for name in models:
        if repo.is_dir() and repository.scan(repo).get(name):
            continue
        log.info("preparing %s (1 epoch on the sample; accuracy is irrelevant here)", name)
        run = str(RUNS / name)
        steps = [
            ["training", *MODELS[name], "--epochs", "1", "--data-dir", str(SAMPLE), "--out", run],
            ["export", run, "--repository", str(repo), "--name", name],
        ]
        steps[0].append("--overwrite")
        for step in steps:
            command = [sys.executable, "-m", *step, "--quiet"]
            subprocess.run(command, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    return repo
