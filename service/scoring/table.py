"""The result table: one row per image file, the same columns whichever engine scored it, written
as Parquet, CSV or JSON Lines (chosen by the output's extension) and read back from any of them.

Columns: path (relative to the input folder), label, label_index, confidence, probabilities
(one float per class, in the model's label order), bottleneck_x, bottleneck_y, model, version,
error (null when scored, else a short reason) and true_label (the class named by the file's
folder, else null). Floats are float32, as the model computes them, so every format round-trips
them exactly. In CSV, `probabilities` is a JSON list in one cell.
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.json as pa_json
import pyarrow.parquet as pq

from service.errors import ConfigError

SCHEMA = pa.schema(
    [
        ("path", pa.string()),
        ("label", pa.string()),
        ("label_index", pa.int32()),
        ("confidence", pa.float32()),
        ("probabilities", pa.list_(pa.float32())),
        ("bottleneck_x", pa.float32()),
        ("bottleneck_y", pa.float32()),
        ("model", pa.string()),
        ("version", pa.int64()),
        ("error", pa.string()),
        ("true_label", pa.string()),
    ]
)
FORMATS = {".parquet": "parquet", ".csv": "csv", ".jsonl": "jsonl"}


def output_format(path: Path) -> str:
    """ "parquet", "csv" or "jsonl" from the file's extension; ConfigError otherwise."""
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise ConfigError(
            f"--out {path}: name the output .parquet, .csv or .jsonl (the format follows "
            "the extension)"
        )
    return fmt


class Rows:
    """Collects rows a batch at a time, each batch built column-wise from its arrays (no
    per-row Python objects: this runs in the loop that feeds the model); `table()` joins them
    into one pyarrow Table of SCHEMA."""

    def __init__(self, model: str, version: int, labels: tuple[str, ...]) -> None:
        self.model, self.version = model, version
        self.labels = pa.array(labels, pa.string())
        self._parts: list[pa.Table] = []
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def scored(
        self,
        keys: list[str],
        true_labels: list[str | None],
        probabilities: np.ndarray,  # (N, K) float32
        bottleneck: np.ndarray,  # (N, 2) float32
    ) -> None:
        probabilities = np.ascontiguousarray(probabilities, dtype=np.float32)
        bottleneck = np.asarray(bottleneck, dtype=np.float32)
        count, classes = probabilities.shape
        best = np.argmax(probabilities, axis=1).astype(np.int32)  # first of equal maxima
        offsets = pa.array(np.arange(0, (count + 1) * classes, classes, dtype=np.int32))
        columns = {
            "label": self.labels.take(pa.array(best)),
            "label_index": pa.array(best),
            "confidence": pa.array(probabilities[np.arange(count), best]),
            "probabilities": pa.ListArray.from_arrays(offsets, pa.array(probabilities.ravel())),
            "bottleneck_x": pa.array(bottleneck[:, 0]),
            "bottleneck_y": pa.array(bottleneck[:, 1]),
        }
        self._add(keys, true_labels, [None] * count, columns)

    def failed(self, keys: list[str], true_labels: list[str | None], errors: list[str]) -> None:
        self._add(keys, true_labels, errors, {})

    def _add(
        self,
        keys: list[str],
        true_labels: Sequence[str | None],
        errors: Sequence[str | None],
        scores: dict[str, pa.Array],
    ) -> None:
        count = len(keys)
        given = {
            "path": pa.array(keys, pa.string()),
            "model": pa.array([self.model] * count, pa.string()),
            "version": pa.array([self.version] * count, pa.int64()),
            "error": pa.array(errors, pa.string()),
            "true_label": pa.array(true_labels, pa.string()),
            **scores,
        }
        arrays = [given.get(f.name, pa.nulls(count, f.type)) for f in SCHEMA]
        self._parts.append(pa.Table.from_arrays(arrays, schema=SCHEMA))
        self._count += count

    def table(self) -> pa.Table:
        return pa.concat_tables(self._parts) if self._parts else empty()

    def clear(self) -> None:
        self._parts.clear()
        self._count = 0


def empty() -> pa.Table:
    return SCHEMA.empty_table()


# ---- formats


_TEMPORARY = ".{name}.tmp-"  # + the writer's pid: the one place temporary names are made


def temporary(path: Path, pid: int) -> Path:
    """The name process `pid` writes `path` under before renaming it (`atomically`)."""
    return path.with_name(_TEMPORARY.format(name=path.name) + str(pid))


def temporaries(path: Path) -> list[Path]:
    """What any process left of writing `path` (a crash before its rename): exactly the names
    `temporary(path, pid)`, not those of another file whose name starts with `path`'s."""
    prefix = _TEMPORARY.format(name=path.name)
    candidates = path.parent.glob(glob.escape(prefix) + "*")
    return [p for p in candidates if p.name.removeprefix(prefix).isdigit()]


@contextmanager
def atomically(path: Path) -> Iterator[Path]:
    """A temporary name beside `path` to write; on success it is synced and renamed to `path`,
    so a reader (or a crash) never sees half a file."""
    temporary_path = temporary(path, os.getpid())
    try:
        yield temporary_path
        with open(temporary_path, "rb") as written:
            os.fsync(written.fileno())
        os.replace(temporary_path, path)
    finally:
        temporary_path.unlink(missing_ok=True)


def write(table: pa.Table, path: Path, fmt: str) -> None:
    """Write `table` to `path` atomically in format `fmt`."""
    with atomically(path) as temporary:
        if fmt == "parquet":
            pq.write_table(table, temporary)
        elif fmt == "csv":
            pa_csv.write_csv(_with_json_lists(table), temporary)
        else:
            _write_jsonl(table, temporary)


def read(path: Path, fmt: str) -> pa.Table:
    """A table written by `write` (in any format) as SCHEMA."""
    if fmt != "parquet" and path.stat().st_size == 0:  # no rows (and, in CSV, no header)
        return empty()
    if fmt == "parquet":
        return pq.read_table(path, schema=SCHEMA)
    if fmt == "csv":
        types = {f.name: (pa.string() if f.name == "probabilities" else f.type) for f in SCHEMA}
        options = pa_csv.ConvertOptions(column_types=types, strings_can_be_null=True)
        table = pa_csv.read_csv(path, convert_options=options)
        lists = [None if v is None else json.loads(v) for v in table["probabilities"].to_pylist()]
        column = pa.array(lists, type=pa.list_(pa.float32()))
        table = table.set_column(
            table.schema.get_field_index("probabilities"), "probabilities", column
        )
        return table.select(SCHEMA.names).cast(SCHEMA)
    options = pa_json.ParseOptions(explicit_schema=SCHEMA)
    return pa_json.read_json(path, parse_options=options).select(SCHEMA.names)


def _with_json_lists(table: pa.Table) -> pa.Table:
    values = table["probabilities"].to_pylist()
    cells = [None if v is None else json.dumps(v) for v in values]
    index = table.schema.get_field_index("probabilities")
    return table.set_column(index, "probabilities", pa.array(cells, type=pa.string()))


def _write_jsonl(table: pa.Table, path: Path) -> None:
    with open(path, "w", encoding="utf-8") as out:
        for row in table.to_pylist():
            out.write(json.dumps(row, ensure_ascii=False, allow_nan=False))
            out.write("\n")
