"""The model repository layout (the same shape as Triton's):

    REPO/NAME/VERSION/{model.onnx, saved_model/, metadata.json}

VERSION is a positive integer; an existing version is never overwritten. A version is written
in a hidden temporary folder beside it and renamed into place only when complete, so a server
watching the repository never sees a half-written version.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from export.errors import ExportError

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


def validate_name(name: str) -> str:
    if not NAME_PATTERN.match(name):
        raise ExportError(
            f"model name {name!r} must be 1-128 letters, digits, '_', '.' or '-', "
            "starting with a letter or digit"
        )
    return name


def versions(model_dir: Path) -> list[int]:
    """The versions present under REPO/NAME, ascending (non-numeric entries are ignored)."""
    if not model_dir.is_dir():
        return []
    return sorted(
        int(p.name)
        for p in model_dir.iterdir()
        if p.is_dir() and p.name.isdigit() and int(p.name) > 0
    )


def choose_version(model_dir: Path, requested: int | None) -> int:
    """`requested` if it is free, else an error; without a request, one past the newest."""
    existing = versions(model_dir)
    if requested is None:
        return (existing[-1] + 1) if existing else 1
    if requested <= 0:
        raise ExportError(f"--version must be a positive integer, got {requested}")
    if (model_dir / str(requested)).exists():
        raise ExportError(
            f"{model_dir / str(requested)} already exists; versions are never "
            "overwritten (omit --version to take the next free one)"
        )
    return requested


@contextmanager
def staged_version(model_dir: Path, version: int) -> Iterator[Path]:
    """A temporary folder to write the version into; renamed to REPO/NAME/VERSION on success,
    removed on any error."""
    model_dir.mkdir(parents=True, exist_ok=True)
    staging = model_dir / f".{version}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        yield staging
        final = model_dir / str(version)
        if final.exists():
            raise ExportError(
                f"{final} appeared while exporting; nothing was overwritten, run the export again"
            )
        staging.rename(final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
