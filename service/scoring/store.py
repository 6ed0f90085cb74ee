"""Where a scoring job keeps its results while it runs, so a crash loses at most one chunk.

Beside the output FILE, the folder FILE.parts/ holds:
- `job.json`: what the rows were scored with (input folder, model, version); a resumed job with
  other settings is refused rather than mixing rows;
- `chunk-NNNNNN.parquet`: the rows, each chunk written to a temporary name, synced and renamed,
  so a chunk is there whole or not at all (`kill -9` at any moment);
- `lock`: held (flock) while a job runs, so two jobs never write the same output.

Rows already done are the union of a finished FILE (when there is one) and the chunks: running
the same command again scores only what is missing. Each row comes back with the time its file
was last seen unchanged (`VALID_SINCE`): the walk of the run that scored it (kept in the chunk,
and in FILE.summary.json for a finished FILE), so the job can redo the files changed since.
When the job ends, FILE and its companions are replaced atomically, then FILE.parts/ is removed
and only then the lock released.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from service.errors import ScoringError
from service.scoring import table as tables
from service.scoring.files import under

log = logging.getLogger(__name__)


def companions(out: Path) -> list[Path]:
    """The files a job writes besides FILE itself."""
    return [_sibling(out, ".summary.json"), _sibling(out, ".bottleneck.png")]


def _sibling(out: Path, suffix: str) -> Path:
    return out.with_name(out.name + suffix)


VALID_SINCE = "_valid_since_ns"  # a column of the rows already done; never written to FILE
_LISTED_AT = b"listed_at_ns"  # a chunk's metadata: when the run that wrote it walked DIR


class ChunkStore:
    def __init__(self, out: Path, fmt: str, job: dict[str, Any], listed_at_ns: int) -> None:
        """`listed_at_ns`: when this run walked the input folder (time.time_ns(), taken before
        the walk); every row this run writes describes its file as it was then, or later."""
        self.out, self.fmt, self.job = out, fmt, job
        self.listed_at_ns = listed_at_ns
        self.parts = _sibling(out, ".parts")
        self._lock: int | None = None
        self._next = 0

    # ---- life cycle

    def open(self, overwrite: bool) -> pa.Table:
        """Take the lock and return the rows already done (an empty table when starting),
        with their VALID_SINCE column. Every check runs before anything is written, so a
        refused run leaves no trace."""
        self.parts.mkdir(parents=True, exist_ok=True)
        self._take_lock()
        try:
            if overwrite:
                self._remove_previous()
            self._remove_temporaries()
            before = self._read_job()
            if before is not None and before != self.job:
                raise ScoringError(_mismatch(self.out, before, self.job))
            done = self._read_done()
            if before is None:
                with tables.atomically(self.parts / "job.json") as temporary:
                    temporary.write_text(json.dumps(self.job, indent=2), encoding="utf-8")
        except BaseException:
            if not self._chunks():  # nothing scored here yet: leave no folder behind
                shutil.rmtree(self.parts, ignore_errors=True)
            self.close()
            raise
        self._next = 1 + max((_number(p) for p in self._chunks()), default=0)
        return done

    def write(self, rows: pa.Table) -> None:
        """One chunk, whole or not at all."""
        if not rows.num_rows:
            return
        rows = rows.replace_schema_metadata({_LISTED_AT: str(self.listed_at_ns).encode()})
        with tables.atomically(self.parts / f"chunk-{self._next:06d}.parquet") as temporary:
            pq.write_table(rows, temporary)
        self._next += 1

    def finish(self, rows: pa.Table, companions: Callable[[], None]) -> None:
        """Replace FILE with the complete table, write its `companions` (the summary, which
        records `listed_at_ns`, and the plot), then forget the chunks and release the lock."""
        tables.write(rows, self.out, self.fmt)
        companions()
        shutil.rmtree(self.parts, ignore_errors=True)
        self.close()

    def close(self) -> None:
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None

    # ---- helpers

    def _take_lock(self) -> None:
        self._lock = os.open(self.parts / "lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.close()
            raise ScoringError(
                f"another scoring job is writing {self.out} (lock {self.parts / 'lock'})"
            ) from None

    def _read_job(self) -> dict[str, Any] | None:
        try:
            job = json.loads((self.parts / "job.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None  # a new job
        return job if isinstance(job, dict) else None

    def _remove_temporaries(self) -> None:
        """What a crash left half-written: chunks (FILE.parts/ is this job's alone), and the
        temporaries of FILE and its companions, by their exact names (we hold the lock, so no
        other job is writing them; another output in the same folder keeps its own)."""
        stale = [
            *self.parts.glob(".*.tmp-*"),
            *(t for path in (self.out, *companions(self.out)) for t in tables.temporaries(path)),
        ]
        for path in stale:
            path.unlink(missing_ok=True)

    def _read_done(self) -> pa.Table:
        parts = []
        if self.out.exists():
            try:
                finished = tables.read(self.out, self.fmt)
            except (OSError, pa.ArrowException, ValueError) as exc:
                raise ScoringError(
                    f"{self.out} exists but cannot be read as {self.fmt} ({exc}); "
                    "use --overwrite to start afresh"
                ) from exc
            self._check_rows(finished)
            parts.append(_finished_since(finished, self._check_summary()))
        for chunk in self._chunks():
            listed_at = (pq.read_schema(chunk).metadata or {}).get(_LISTED_AT, b"0")
            rows = pq.read_table(chunk, schema=tables.SCHEMA)
            parts.append(_since(rows, int(listed_at)))
        if not parts:
            return _since(tables.empty(), 0)
        return _last_per_path(pa.concat_tables(parts))

    def _check_rows(self, done: pa.Table) -> None:
        """A finished FILE scored with another model or version is not resumed."""
        if not done.num_rows:
            return
        pairs = done.group_by(["model", "version"]).aggregate([]).to_pylist()
        theirs = [(p["model"], p["version"]) for p in pairs]
        if theirs != [(self.job["model"], self.job["version"])]:
            scored = ", ".join(f"{m} v{v}" for m, v in theirs)
            raise ScoringError(
                f"{self.out} holds rows of {scored}, not {self.job['model']} "
                f"v{self.job['version']}: use --overwrite to start afresh, or another --out"
            )

    def _check_summary(self) -> dict[str, Any]:
        """A finished FILE of another input folder is not resumed: its rows would be taken for
        files of the same relative paths here. Returns the summary ({} when there is none)."""
        try:
            summary = json.loads(companions(self.out)[0].read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}  # no summary (a crash just before it was written): every row is redone
        if not isinstance(summary, dict):
            return {}
        before = {key: summary.get(key) for key in self.job}
        if before != self.job:
            raise ScoringError(_mismatch(self.out, before, self.job, finished=True))
        return summary

    def _chunks(self) -> list[Path]:
        return sorted(self.parts.glob("chunk-*.parquet"))

    def _remove_previous(self) -> None:
        for path in (self.out, *companions(self.out)):
            path.unlink(missing_ok=True)
        for path in self.parts.iterdir():
            if path.name != "lock":
                path.unlink()


def _number(chunk: Path) -> int:
    return int(chunk.stem.split("-")[1])


def _since(rows: pa.Table, listed_at_ns: int | list[int]) -> pa.Table:
    values = listed_at_ns if isinstance(listed_at_ns, list) else [listed_at_ns] * rows.num_rows
    return rows.append_column(VALID_SINCE, pa.array(values, pa.int64()))


def _finished_since(rows: pa.Table, summary: dict[str, Any]) -> pa.Table:
    """A finished FILE's rows are valid since its run's walk, except those under folders that
    run could not list: kept from before unchecked, they are checked again now (since 0)."""
    listed_at = summary.get("listed_at_ns")
    listed_at = listed_at if isinstance(listed_at, int) else 0
    folders = summary.get("unreadable_folders") or []
    unlisted = under([folder for folder in folders if isinstance(folder, str)])
    if not unlisted:
        return _since(rows, listed_at)
    paths = rows["path"].to_pylist()
    return _since(rows, [0 if p.startswith(unlisted) else listed_at for p in paths])


def _last_per_path(done: pa.Table) -> pa.Table:
    """Each path once, its newest row: the chunks come after FILE, in the order written (a
    crash between writing FILE and removing the chunks leaves rows in both)."""
    if not done.num_rows:
        return done
    indices = pa.table({"path": done["path"], "i": pa.array(range(done.num_rows))})
    last = indices.group_by("path").aggregate([("i", "max")])["i_max"]
    return done.take(sorted(last.to_pylist()))


def _mismatch(
    out: Path, before: dict[str, Any], now: dict[str, Any], finished: bool = False
) -> str:
    changed = ", ".join(
        f"{key} {before.get(key)!r} -> {now.get(key)!r}"
        for key in sorted(set(before) | set(now))
        if before.get(key) != now.get(key)
    )
    if finished:
        return (
            f"{out} holds the results of another job ({changed}): use --overwrite to replace "
            "it, or another --out"
        )
    return (
        f"{out}: an unfinished job with other settings is in {out.name}.parts ({changed}); "
        "run it with the same settings to finish it, or use --overwrite to start afresh"
    )
