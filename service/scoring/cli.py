"""`python -m service score`: the command line of a directory scoring job."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any

from service.cli import ENV_PREFIX, add_option, connection_options, make_client
from service.config import DEVICES, ENGINES, MAX_IMAGE_PIXELS, MAX_WORKERS, MiB, ScoreConfig
from service.errors import ConfigError

DESCRIPTION = """\
Classify every image file under DIR once and write one row per file (a result, or an error
saying why not) to FILE: Parquet, CSV or JSON Lines, by FILE's extension. Rows are saved in
chunks as the job runs: after a crash or kill, the same command scores only what is missing.
At the end: FILE.summary.json (counts, per-label counts, accuracy and confusion matrix when files
sit in folders named like classes, throughput), FILE.bottleneck.png (the images in the model's
2-D bottleneck plane) and a summary line on stdout.
"""
EPILOG = """\
engines: --repository REPO runs the model here (local); --server HOST:PORT asks a running
cnn-serving server (remote); --engine ray --repository REPO runs it on Ray Data (the extra
cnn-serving[ray]; DIR and REPO must be readable on every node). Image files: .png .jpg .jpeg
.jpe .jfif .webp .bmp .dib .tif .tiff .gif in any case; other files are skipped and counted.
A rerun keeps the rows already done, except those of files changed since they were scored and
error rows, which are tried again.
Exit status: 0 when the table is complete (even with error rows); 1 when it is written but some
folders could not be listed (their files have no new rows; rows from earlier runs are kept and
checked again next time); 2 when the job cannot start or go on (rows written so far are kept);
130 when interrupted.
"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "score",
        help="score a folder of images into a table",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("directory", type=Path, metavar="DIR", help="folder of image files")
    add_option(p, "--model", "model name", required=f"{ENV_PREFIX}MODEL" not in os.environ)
    add_option(p, "--version", "model version; 0: the newest", type=int, default=0)
    add_option(
        p,
        "--out",
        "output table: .parquet, .csv or .jsonl, outside DIR; FILE.parts/ beside it holds the "
        "chunks of an unfinished job",
        type=str,  # a Path would drop a trailing slash, which names a folder
        metavar="FILE",
        required=f"{ENV_PREFIX}OUT" not in os.environ,
    )
    where = p.add_argument_group("where the model runs")
    add_option(
        where, "--repository", "model repository (local and ray engines)", type=Path, metavar="REPO"
    )
    add_option(
        where, "--server", "a running cnn-serving server (remote engine)", metavar="HOST:PORT"
    )
    add_option(
        where,
        "--engine",
        "default: remote with --server, else local",
        choices=ENGINES,
    )
    add_option(
        where,
        "--ray-address",
        "with --engine ray: a cluster to join ('auto': this machine's); none: start a local Ray",
        metavar="ADDR",
    )
    add_option(
        where, "--device", "local and ray engines: as for serve", choices=DEVICES, default="auto"
    )
    add_option(
        where,
        "--intra-op-threads",
        "local engine: onnxruntime threads; 0: the cores the decoding processes leave, at "
        "least 1 (more only fight the decoders for the same cores)",
        type=int,
        default=0,
    )
    job = p.add_argument_group("the job")
    add_option(job, "--batch-size", "images per inference (or per request)", type=int, default=64)
    add_option(
        job,
        "--workers",
        "decoding processes (local), requests in flight (remote) or actors (ray); "
        "0: one per CPU this process may use, its affinity and cgroup CPU quota (remote: 4); "
        f"at most {MAX_WORKERS}",
        type=int,
        default=0,
    )
    add_option(
        job, "--recursive", "walk sub-folders", action=argparse.BooleanOptionalAction, default=True
    )
    add_option(
        job,
        "--limit",
        "score only the first N image files (stable order); 0: all",
        type=int,
        default=0,
    )
    add_option(
        job,
        "--chunk-rows",
        "rows saved per chunk while the job runs (a chunk is also saved every 10 s): the most "
        "a crash can lose",
        type=int,
        default=1000,
    )
    add_option(
        job, "--overwrite", "discard FILE and unfinished chunks; start afresh", action="store_true"
    )
    add_option(
        job,
        "--max-image-pixels",
        "as for serve: larger images are error rows (remote: the server's limit applies, this one "
        "to files too large for a message, decoded here)",
        type=int,
        default=MAX_IMAGE_PIXELS,
    )
    add_option(
        job,
        "--max-message-bytes",
        "remote engine: largest request, in bytes; a larger file is decoded here and its pixels "
        "sent",
        type=int,
        default=64 * MiB,
    )
    add_option(
        job,
        "--progress",
        "progress bar (only ever on a terminal)",
        action=argparse.BooleanOptionalAction,
        default=True,
    )
    connection_options(p.add_argument_group("connecting to --server (remote engine)"))


def config(args: argparse.Namespace) -> ScoreConfig:
    if args.engine is None and args.server and args.repository:
        raise ConfigError("give --server (remote engine) or --repository (local), not both")
    engine = args.engine or ("remote" if args.server else "local")
    values: dict[str, Any] = {
        name: getattr(args, name)
        for name in ScoreConfig.__dataclass_fields__
        if hasattr(args, name) and name != "engine"
    }
    values["out"] = _file(values["out"])
    return ScoreConfig(**values, engine=engine)


def run(args: argparse.Namespace) -> int:
    from service.scoring import job, report  # noqa: PLC0415 - keeps `--help` fast

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(message)s")
    settings = config(args)
    try:
        if settings.engine == "remote":
            with make_client(args, args.server) as client:
                summary = job.run(settings, client)
        else:
            summary = job.run(settings)
    except KeyboardInterrupt:
        print(
            "interrupted: the rows scored so far are kept; run the same command to resume",
            file=sys.stderr,
        )
        return 130
    print(report.summary_line(summary))
    return 1 if summary.get("unreadable_folders") else 0


def _file(text: str) -> Path:
    """--out: a file's name (a trailing slash names a folder)."""
    if text.endswith(("/", os.sep)):
        raise ConfigError(f"--out {text} names a folder; name a file")
    return Path(text)
