"""The model repository on disk: REPO/NAME/VERSION/{model.onnx, metadata.json}.

`scan` lists what is there; `read_spec` reads one version's metadata.json (written by
`python -m export`) into a `ModelSpec`. Hidden entries (the exporter's `.V.partial-PID` staging
folders) and non-numeric folders are ignored, so a half-written version is never seen.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from service.errors import ConfigError, ModelLoadError

OUTPUT_NAMES = ("probabilities", "bottleneck")
# The health service name of liveness probes (service/server.py): no model may take it.
LIVENESS = "liveness"
VERSION = re.compile(r"[1-9][0-9]{0,17}")  # ASCII only: "\u00b2".isdigit() is True

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelSpec:
    """What the service needs to know about one model version."""

    name: str
    version: int
    path: Path  # the version folder
    labels: tuple[str, ...]
    input_name: str
    height: int
    width: int
    channels: int
    metadata: dict[str, Any]

    @property
    def onnx_path(self) -> Path:
        return self.path / "model.onnx"

    @functools.cached_property
    def image_shape(self) -> tuple[int, int, int]:  # made once: read on every request
        return (self.height, self.width, self.channels)

    @functools.cached_property
    def labels_crc(self) -> int:
        """A checksum of the labels: two versions answer alike only if these agree."""
        return zlib.crc32("\n".join(self.labels).encode())

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (for the engine's catalogue); `from_dict` reads it back."""
        return {**asdict(self), "path": str(self.path), "labels": list(self.labels)}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ModelSpec:
        return cls(**{**values, "path": Path(values["path"]), "labels": tuple(values["labels"])})


def parse_version(text: str) -> int | None:
    """A version folder's (or a request's) number: ASCII digits, no leading zero; else None."""
    return int(text) if VERSION.fullmatch(text) else None


def scan(repository: Path) -> dict[str, list[int]]:
    """{model name: ascending versions} for every REPO/NAME folder (no versions: []). An
    unreadable model folder is logged and skipped."""
    if not repository.is_dir():
        raise ConfigError(f"--repository {repository} is not a directory")
    found: dict[str, list[int]] = {}
    for model_dir in sorted(repository.iterdir()):
        if model_dir.name.startswith(".") or not model_dir.is_dir():
            continue
        if model_dir.name == LIVENESS:
            _reserved(model_dir)
            continue
        try:
            entries = list(os.scandir(model_dir))
        except OSError as exc:
            log.error("skipping %s: %s", model_dir, exc.strerror)
            continue
        versions = sorted(
            version
            for entry in entries
            if (version := parse_version(entry.name)) is not None and entry.is_dir()
        )
        found[model_dir.name] = versions
    return found


@functools.cache  # once per folder, not on every scan
def _reserved(model_dir: Path) -> None:
    log.error(
        "skipping %s: the model name %r is reserved (the health service of liveness probes)",
        model_dir,
        LIVENESS,
    )


def read_spec(repository: Path, name: str, version: int) -> ModelSpec:
    """Parse REPO/NAME/VERSION/metadata.json; raises ModelLoadError saying what is wrong."""
    folder = repository / name / str(version)
    where = f"model {name!r} version {version} ({folder})"
    try:
        metadata = json.loads((folder / "metadata.json").read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ModelLoadError(f"{where}: no metadata.json") from exc
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"{where}: unreadable metadata.json: {exc}") from exc
    if not (folder / "model.onnx").is_file():
        raise ModelLoadError(f"{where}: no model.onnx")
    try:
        spec_in = metadata["input"]
        labels = tuple(str(label) for label in metadata["labels"])
        spec = ModelSpec(
            name=name,
            version=version,
            path=folder,
            labels=labels,
            input_name=str(spec_in["name"]),
            height=int(spec_in["height"]),
            width=int(spec_in["width"]),
            channels=int(spec_in["channels"]),
            metadata=metadata,
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelLoadError(f"{where}: metadata.json lacks a valid {exc}") from exc
    if spec.channels not in (1, 3) or spec.height < 1 or spec.width < 1 or len(labels) < 2:
        raise ModelLoadError(
            f"{where}: metadata.json describes an unsupported model "
            f"(input {spec.image_shape}, {len(labels)} labels)"
        )
    if spec_in.get("dtype", "uint8") != "uint8" or spec_in.get("layout", "NHWC") != "NHWC":
        raise ModelLoadError(f"{where}: input must be uint8 NHWC, metadata says {spec_in}")
    return spec


@dataclass(frozen=True)
class VersionPolicy:
    """Which versions of each model are served (`--version-policy`, Triton's three policies):
    `all`, `latest:N` (the N highest that load: a broken new version leaves the last good one
    serving) or `specific:V,V,...`."""

    kind: str  # "all", "latest" or "specific"
    count: int = 0  # latest:N
    versions: frozenset[int] = frozenset()  # specific:V,...

    @classmethod
    def parse(cls, text: str) -> VersionPolicy:
        """`all`, `latest:N` (N >= 1) or `specific:V[,V...]`; raises ConfigError."""
        kind, _, rest = text.strip().partition(":")
        if kind == "all" and not rest:
            return cls("all")
        if kind == "latest" and (count := parse_version(rest)) is not None:
            return cls("latest", count=count)
        if kind == "specific" and rest:
            versions = [parse_version(part.strip()) for part in rest.split(",")]
            if None not in versions:
                return cls("specific", versions=frozenset(v for v in versions if v))
        raise ConfigError(
            f"--version-policy {text!r}: use all, latest:N (N >= 1) or specific:V[,V...] "
            "(versions are positive integers)"
        )

    def select(self, versions: list[int]) -> list[int]:
        """The versions of `versions` (ascending) this policy serves, ascending."""
        if self.kind == "latest":
            return versions[-self.count :]
        if self.kind == "specific":
            return [v for v in versions if v in self.versions]
        return list(versions)

    def __str__(self) -> str:
        if self.kind == "latest":
            return f"latest:{self.count}"
        if self.kind == "specific":
            return "specific:" + ",".join(map(str, sorted(self.versions)))
        return "all"
