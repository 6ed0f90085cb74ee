"""A directory scoring job from start to finish:

    walk the folder -> keep the rows already done that still stand -> score the rest in
    batches (an engine) -> write rows in atomic chunks as they come -> assemble FILE in the
    walk's order -> FILE.summary.json, FILE.bottleneck.png, one summary line

A row already done stands unless its file changed since (see files.changed_since) or it is an
error row of a file this run covers: errors are tried again (a file fixed, a link mended, a
read that failed for a moment).

`run(config)` returns the summary; it raises ScoringError (or another ServingError) with a
one-line reason when the job cannot start or go on; rows written until then are kept, and the
same command resumes.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from tqdm import tqdm

from service.client import Client
from service.config import ScoreConfig
from service.errors import ModelNotFound, ScoringError
from service.repository import ModelSpec, read_spec, scan
from service.scoring import report
from service.scoring import table as tables
from service.scoring.engines import Engine, LocalEngine, RemoteEngine, Result
from service.scoring.files import (
    Item,
    Walk,
    changed_since,
    label_matcher,
    true_label,
    under,
    walk,
)
from service.scoring.store import VALID_SINCE, ChunkStore, companions

log = logging.getLogger(__name__)

# File times come from a coarse clock that may lag time.time_ns() by a tick, so a file changed
# just after the walk could carry a time just before it: taking the walk's time this much
# earlier sends such a file to be scored again by the next run, rather than never.
CLOCK_MARGIN_NS = 50_000_000


def run(config: ScoreConfig, client: Client | None = None) -> dict[str, Any]:
    """Score `config.directory` into `config.out`; `client` is required by the remote engine."""
    fmt = tables.output_format(config.out)
    directory = _input_folder(config.directory)
    _check_out(config.out, directory)
    engine = make_engine(config, client)
    try:
        _make_folder(config.out)  # only now: a refused run leaves nothing behind
        return _score(config, engine, fmt, directory)
    except OSError as exc:  # the output side: a full disk, a read-only folder, ...
        where = exc.filename or config.out
        raise ScoringError(f"cannot write {where}: {exc.strerror or exc}") from None
    finally:
        engine.close()


def _input_folder(directory: Path) -> Path:
    if not directory.exists():
        raise ScoringError(f"{directory}: no such directory")
    if not directory.is_dir():
        raise ScoringError(f"{directory}: not a directory")
    try:
        with os.scandir(directory):
            pass
    except OSError as exc:
        raise ScoringError(f"{directory}: cannot list it: {exc.strerror}") from None
    return directory.resolve()


def _check_out(out: Path, directory: Path) -> None:
    where = out.resolve()
    if where.is_relative_to(directory):
        raise ScoringError(
            f"--out {out} is inside {directory}: the input folder is never written to; "
            "choose an output outside it"
        )
    if where.is_dir():
        raise ScoringError(f"--out {out} is a directory; name a file")


def _make_folder(out: Path) -> None:
    try:
        out.resolve().parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ScoringError(f"--out {out}: cannot create its folder: {exc.strerror}") from None


def model_spec(repository: Path, name: str, version: int) -> ModelSpec:
    """The version to score with from the repository (0: the newest)."""
    found = scan(repository)
    if name not in found:
        have = ", ".join(n for n, versions in found.items() if versions) or "none"
        raise ModelNotFound(f"model {name!r} is not in {repository} (models there: {have})")
    if not found[name] or (version and version not in found[name]):
        wanted = f"version {version}" if version else "version"
        raise ModelNotFound(
            f"model {name!r} has no {wanted} in {repository} "
            f"(versions: {', '.join(map(str, found[name])) or 'none'})"
        )
    return read_spec(repository, name, version or found[name][-1])


def make_engine(config: ScoreConfig, client: Client | None) -> Engine:
    if config.engine == "remote":
        if client is None:
            raise ScoringError("the remote engine needs a client")
        return RemoteEngine(
            client,
            config.model,
            config.version,
            config.workers,
            config.batch_size,
            config.max_message_bytes,
            config.max_image_pixels,
        )
    if config.repository is None:
        raise ScoringError(f"--engine {config.engine} needs --repository")
    spec = model_spec(config.repository, config.model, config.version)
    if config.engine == "ray":
        from service.scoring.ray_engine import RayEngine  # noqa: PLC0415 - optional extra

        return RayEngine(
            spec,
            config.device,
            config.ray_address,
            config.workers,
            config.batch_size,
            config.max_image_pixels,
        )
    return LocalEngine(
        spec,
        config.device,
        config.workers,
        config.batch_size,
        config.max_image_pixels,
        config.intra_op_threads,
    )


def _score(config: ScoreConfig, engine: Engine, fmt: str, directory: Path) -> dict[str, Any]:
    listed_at = time.time_ns() - CLOCK_MARGIN_NS
    found = walk(directory, config.recursive)
    _skip_own_outputs(found, config.out)
    items = found.items[: config.limit or None]
    job = {
        "directory": str(directory),
        "recursive": config.recursive,
        "model": engine.model,
        "version": engine.version,
    }
    store = ChunkStore(config.out, fmt, job, listed_at)
    done = store.open(config.overwrite)
    try:
        done = _standing(done, found.items, items)
        finished = set(done["path"].to_pylist())
        todo = [item for item in items if item.key not in finished]
        started = time.monotonic()
        new = _score_items(config, engine, store, items, todo)
        seconds = time.monotonic() - started
        # Rows of files beyond --limit stay (a smaller limit never deletes work); rows of files
        # gone from DIR go, but not those under folders that could not be listed this time.
        final = _in_walk_order(pa.concat_tables([done, *new]), found)
        facts = {
            "directory": str(directory),
            "recursive": config.recursive,
            "output": str(config.out),
            "format": fmt,
            "engine": engine.kind,
            "device": engine.device,
            "model": engine.model,
            "version": engine.version,
            "skipped": found.skipped,
            "unreadable_folders": found.unreadable_folders,
            "listed_at_ns": listed_at,
            "this_run": {
                "scored": len(todo),
                "already_done": len(items) - len(todo),
                "seconds": round(seconds, 3),
                "images_per_second": round(len(todo) / seconds, 1) if seconds > 0 else 0.0,
            },
        }
        summary = report.summarize(final, engine.labels, facts)

        def write_companions() -> None:
            summary_path, plot_path = companions(config.out)
            report.write_summary(summary, summary_path)
            title = f"{engine.model} v{engine.version}: {directory.name or directory}"
            report.plot_bottleneck(final, engine.labels, title, plot_path, engine.bottleneck_map)

        store.finish(final, write_companions)
    finally:
        store.close()
    return summary


def _skip_own_outputs(found: Walk, out: Path) -> None:
    """A link inside DIR may lead to this job's own outputs (FILE, its summary or plot): they
    are counted as skipped files, never scored. Only linked items can be: --out is outside DIR."""
    ours = {os.path.realpath(path) for path in (out, *companions(out))}
    own = {i.key for i in found.items if i.linked and os.path.realpath(i.path) in ours}
    if own:
        found.items = [item for item in found.items if item.key not in own]
        found.skipped += len(own)


def _standing(done: pa.Table, found: list[Item], items: list[Item]) -> pa.Table:
    """The rows already done that stand (see the module's docstring), without VALID_SINCE.
    Rows of files not found now are left to `_in_walk_order`."""
    where = {item.key: item.path for item in found}
    covered = {item.key for item in items}
    columns = done.select(["path", "error", VALID_SINCE]).to_pydict()
    keep = []
    for i, (key, error, since) in enumerate(zip(*columns.values(), strict=True)):
        path = where.get(key)
        if path is None or (error is not None and key not in covered):
            keep.append(i)  # not found now, or an error row beyond --limit: as it is
        elif error is None and not changed_since(path, since):
            keep.append(i)
    return done.take(pa.array(keep, pa.int64())).drop_columns([VALID_SINCE])


def _score_items(
    config: ScoreConfig, engine: Engine, store: ChunkStore, items: list[Item], todo: list[Item]
) -> list[pa.Table]:
    """Score `todo`, writing a chunk every `chunk_rows` rows or `chunk_interval_s` seconds;
    returns the chunks written."""
    matcher = label_matcher(engine.labels)
    truth = {item.key: true_label(item, matcher) for item in todo}
    rows = tables.Rows(engine.model, engine.version, engine.labels)
    written: list[pa.Table] = []

    def flush() -> None:
        if len(rows):
            chunk = rows.table()
            store.write(chunk)
            written.append(chunk)
            rows.clear()

    bar = tqdm(
        total=len(items),
        initial=len(items) - len(todo),
        unit="img",
        desc="scoring",
        disable=None if config.progress else True,  # None: off when not a terminal
        dynamic_ncols=True,
    )
    last = time.monotonic()
    try:
        for result in engine.score(todo):
            _add(rows, result, truth)
            bar.update(len(result))
            if len(rows) >= config.chunk_rows or time.monotonic() - last >= config.chunk_interval_s:
                flush()
                last = time.monotonic()
    except ScoringError as exc:
        flush()
        raise ScoringError(f"{exc} ({_kept(written)}; run the same command to resume)") from None
    finally:
        flush()
        bar.close()
    return written


def _add(rows: tables.Rows, result: Result, truth: dict[str, str | None]) -> None:
    if result.keys:
        labels = [truth[key] for key in result.keys]
        rows.scored(result.keys, labels, result.probabilities, result.bottleneck)
    if result.errors:
        keys = [key for key, _ in result.errors]
        rows.failed(keys, [truth[key] for key in keys], [reason for _, reason in result.errors])


def _kept(written: list[pa.Table]) -> str:
    return f"{sum(t.num_rows for t in written):,} new rows kept"


def _in_walk_order(rows: pa.Table, found: Walk) -> pa.Table:
    """The rows of the files found, in the walk's order, then those of files under folders that
    could not be listed this time (kept as they were; the next run checks them again)."""
    position = {item.key: i for i, item in enumerate(found.items)}
    unlisted = under(found.unreadable_folders)
    last = len(position)  # after every file found, in their earlier order (a stable sort)
    places = np.array(
        [
            position.get(key, last if unlisted and key.startswith(unlisted) else -1)
            for key in rows["path"].to_pylist()
        ],
        dtype=np.int64,
    )
    keep = np.flatnonzero(places >= 0)
    return rows.take(keep[np.argsort(places[keep], kind="stable")])
