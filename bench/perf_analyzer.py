"""Triton's perf_analyzer (the C++ load generator) against a gRPC server, without a GPU.

    .venv/bin/python bench/perf_analyzer.py --fetch-only          # fetch and cache, nothing else
    .venv/bin/python bench/perf_analyzer.py -m seed -u 127.0.0.1:8001 --shape images:28,28,1

fetch() caches everything under build/perf_analyzer (idempotent; FACTS.md "Measured
2026-12-01"): the binary from PyPI's tritonclient 2.50.0 manylinux wheel (pip download, unzipped),
libcudart.so.12 from PyPI's nvidia-cuda-runtime-cu12 (pip install --target, not into .venv) and
Debian's libb64-0d (apt-get; the one system package). run() starts

    perf_analyzer -m MODEL -u URL -i grpc --concurrency-range C -b B --shape NAME:H,W,C
                  -p INTERVAL_MS --stability-percentage 25 --max-trials T -f CSV

and returns images/s (perf_analyzer's infer/sec: one inference is one image), its client-side
p50/p90/p95/p99 latencies in ms, and the server's own breakdown of a request that it reads from
ModelStatistics (overhead, queue, compute input / infer / output; its "Server:" block). Before
cnn-serving's statistics had Triton's meaning, perf_analyzer aborted at its very end with
"Server side statistics compute counts must be the same"; a run that still aborts after its
"Client:" block is read from stdout and says `aborted`.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HOME = ROOT / "build" / "perf_analyzer"
VERSION = "2.50.0"
WHEEL = f"tritonclient-{VERSION}-py3-none-manylinux1_x86_64.whl"
BINARY = HOME / f"tritonclient-{VERSION}.data" / "data" / "bin" / "perf_analyzer"
CUDART = HOME / "cudart" / "nvidia" / "cuda_runtime" / "lib"
LIBB64 = "libb64-0d"
MAX_TRIALS = 6  # windows per run: 3 must agree within --stability-percentage
STABILITY_PERCENT = 25  # 64 clients on 2 cores rarely agree within the default 10 %
ABORT = "Server side statistics compute counts must be the same"


class FetchError(RuntimeError):
    """perf_analyzer or a library it needs could not be fetched (one line, the reason)."""


@dataclass
class Result:
    """One perf_analyzer run at one concurrency; latencies are client side, in ms."""

    images_per_s: float | None
    p50_ms: float | None
    p90_ms: float | None
    p95_ms: float | None
    p99_ms: float | None
    avg_ms: float | None
    aborted: bool  # it exited non-zero (the ModelStatistics check or anything else)
    source: str  # "csv", "stdout" or "none" (no client measurement: see error)
    returncode: int
    error: str | None = None  # the last stderr/stdout lines when there are no numbers
    wall_s: float = 0.0  # the whole run: connection, every trial, the final check
    # The server's view, per request, from its ModelStatistics ("Server:" block), in ms:
    server_ms: float | None = None  # average request latency inside the server
    overhead_ms: float | None = None  # what no statistics part covers (decoding, transport)
    queue_ms: float | None = None
    compute_input_ms: float | None = None
    compute_infer_ms: float | None = None
    compute_output_ms: float | None = None

    def as_dict(self) -> dict:
        return asdict(self)


def _have_libb64() -> bool:
    folders = ("/usr/lib/x86_64-linux-gnu", "/usr/lib")
    return any(next(Path(d).glob("libb64.so.0*"), None) for d in folders)  # a glob is truthy


def _pip() -> list[str]:
    return [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]


def _step(command: list[str], what: str) -> None:
    try:
        done = subprocess.run(command, cwd=HOME, capture_output=True, text=True)
    except FileNotFoundError as exc:
        raise FetchError(f"{what}: {command[0]} not found ({exc})") from None
    if done.returncode:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        raise FetchError(f"{what}: `{' '.join(command)}` exited {done.returncode}: {tail[0]}")


def fetch() -> Path:
    """The perf_analyzer binary, fetching what is missing into build/perf_analyzer first."""
    HOME.mkdir(parents=True, exist_ok=True)
    if not BINARY.is_file():
        if not (HOME / WHEEL).is_file():
            spec = f"tritonclient=={VERSION}"
            flags = ["--no-deps", "--platform", "manylinux1_x86_64", "--only-binary=:all:"]
            _step([*_pip(), "download", *flags, "-d", str(HOME), spec], "pip download")
        with zipfile.ZipFile(HOME / WHEEL) as wheel:
            wheel.extract(str(BINARY.relative_to(HOME)), HOME)
        BINARY.chmod(0o755)
    if not (CUDART / "libcudart.so.12").is_file():
        target = HOME / "cudart"
        _step([*_pip(), "install", "--target", str(target), "nvidia-cuda-runtime-cu12"], "pip")
    if not _have_libb64():
        if shutil.which("apt-get") is None:
            raise FetchError(f"perf_analyzer needs Debian's {LIBB64}, and there is no apt-get")
        _step(["apt-get", "update", "-qq"], "apt-get update")
        _step(["apt-get", "install", "-y", "-qq", LIBB64], f"apt-get install {LIBB64}")
    return BINARY


def environment() -> dict[str, str]:
    """os.environ with the cached libcudart first on LD_LIBRARY_PATH."""
    paths = [str(CUDART), *filter(None, os.environ.get("LD_LIBRARY_PATH", "").split(":"))]
    return {**os.environ, "LD_LIBRARY_PATH": ":".join(paths)}


def command(
    model: str, url: str, shape: str, concurrency: int, batch: int, interval_ms: int,
    csv_path: Path, max_trials: int = MAX_TRIALS,
) -> list[str]:  # fmt: skip
    """perf_analyzer's command line; shape is "INPUT:H,W,C" (one image, no batch dimension)."""
    return [
        str(BINARY), "-m", model, "-u", url, "-i", "grpc",
        "--concurrency-range", str(concurrency), "-b", str(batch), "--shape", shape,
        "-p", str(interval_ms), "--stability-percentage", str(STABILITY_PERCENT),
        "--max-trials", str(max_trials), "-f", str(csv_path),
    ]  # fmt: skip


_CLIENT = {  # stdout "Client:" block: key -> (regex, scale to the unit of Result)
    "images_per_s": (r"Throughput: ([\d.]+) infer/sec", 1.0),
    "avg_ms": (r"Avg latency: (\d+) usec", 1e-3),
    "p50_ms": (r"p50 latency: (\d+) usec", 1e-3),
    "p90_ms": (r"p90 latency: (\d+) usec", 1e-3),
    "p95_ms": (r"p95 latency: (\d+) usec", 1e-3),
    "p99_ms": (r"p99 latency: (\d+) usec", 1e-3),
}
_CSV = {  # CSV column -> (Result field, scale); latencies in usec
    "Inferences/Second": ("images_per_s", 1.0),
    "Avg latency": ("avg_ms", 1e-3),
    "p50 latency": ("p50_ms", 1e-3),
    "p90 latency": ("p90_ms", 1e-3),
    "p95 latency": ("p95_ms", 1e-3),
    "p99 latency": ("p99_ms", 1e-3),
}


def parse_stdout(text: str) -> dict[str, float]:
    """The numbers of the last "Client:" block of perf_analyzer's stdout; {} without one."""
    blocks = text.split("Client:")
    if len(blocks) < 2:
        return {}
    block = blocks[-1].split("Server:")[0]
    found = {}
    for key, (pattern, scale) in _CLIENT.items():
        if match := re.search(pattern, block):
            found[key] = float(match[1]) * scale
    return found if "images_per_s" in found else {}


_SERVER = re.compile(
    r"Avg request latency: (\d+) usec \(overhead (\d+) usec \+ queue (\d+) usec \+ "
    r"compute input (\d+) usec \+ compute infer (\d+) usec \+ compute output (\d+) usec\)"
)
SERVER_FIELDS = (
    "server_ms", "overhead_ms", "queue_ms", "compute_input_ms", "compute_infer_ms",
    "compute_output_ms",
)  # fmt: skip


def parse_server(text: str) -> dict[str, float]:
    """The server-side breakdown of the last "Server:" block, in ms; {} without one."""
    found = _SERVER.findall(text)
    return (
        {k: float(v) * 1e-3 for k, v in zip(SERVER_FIELDS, found[-1], strict=True)} if found else {}
    )


def parse_csv(path: Path) -> dict[str, float]:
    """The numbers of the last row of perf_analyzer's -f CSV; {} when it is missing or empty."""
    if not path.is_file():
        return {}
    with path.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    if not rows:
        return {}
    return {
        field: float(rows[-1][column]) * scale
        for column, (field, scale) in _CSV.items()
        if rows[-1].get(column) not in (None, "")
    }


def _last_lines(text: str, count: int = 2) -> str:
    """The last `count` non-blank lines of text, joined with " | "."""
    return " | ".join([line.strip() for line in text.splitlines() if line.strip()][-count:])


def run(
    model: str, url: str, shape: str, concurrency: int, batch: int = 1,
    interval_ms: int = 5000, max_trials: int = MAX_TRIALS, timeout_s: float | None = None,
) -> Result:  # fmt: skip
    """One perf_analyzer run (fetching it first when needed); never raises on its exit status."""
    fetch()
    if timeout_s is None:  # every trial, plus connecting and the final statistics
        timeout_s = max_trials * interval_ms / 1000 * 1.5 + 60
    with tempfile.TemporaryDirectory(prefix="perf-analyzer-") as scratch:
        csv_path = Path(scratch) / "result.csv"
        argv = command(model, url, shape, concurrency, batch, interval_ms, csv_path, max_trials)
        started = time.monotonic()
        try:
            done = subprocess.run(
                argv, env=environment(), capture_output=True, text=True, timeout=timeout_s
            )
            returncode, out, err = done.returncode, done.stdout, done.stderr
        except subprocess.TimeoutExpired as exc:
            returncode = -9
            out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else exc.stdout or ""
            err = f"timed out after {timeout_s:.0f} s"
        wall_s = time.monotonic() - started
        numbers, source = parse_csv(csv_path), "csv"
    if not numbers:
        numbers, source = parse_stdout(out), "stdout"
    error = None
    if not numbers or (returncode and ABORT not in err + out):
        source = source if numbers else "none"
        error = _last_lines(err) or _last_lines(out) or f"exit {returncode}"
    values = {k: numbers.get(k) for k in _CLIENT}
    return Result(
        **values, aborted=returncode != 0, source=source, returncode=returncode,
        error=error, wall_s=wall_s, **parse_server(out),
    )  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Prints the result as JSON; exit status 1 when there are no client numbers, 2 "
        "when fetching fails.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--fetch-only", action="store_true", help="fetch and cache, run nothing")
    p.add_argument("-m", "--model", help="model name (required unless --fetch-only)")
    p.add_argument("-u", "--url", default="127.0.0.1:8001", help="the server's gRPC HOST:PORT")
    p.add_argument("--shape", default="images:28,28,1", help="INPUT:H,W,C of one image")
    p.add_argument("-c", "--concurrency", type=int, default=64, help="concurrent clients")
    p.add_argument("-b", "--batch", type=int, default=1, help="images per request")
    p.add_argument("-p", "--interval-ms", type=int, default=5000, help="measurement window")
    p.add_argument("--max-trials", type=int, default=MAX_TRIALS, help="most windows per run")
    args = p.parse_args(argv)
    try:
        binary = fetch()
    except FetchError as exc:
        print(f"perf_analyzer: {exc}", file=sys.stderr)
        return 2
    if args.fetch_only:
        print(binary)
        return 0
    if not args.model:
        p.error("--model is required unless --fetch-only")
    result = run(
        args.model, args.url, args.shape, args.concurrency, args.batch, args.interval_ms,
        args.max_trials,
    )  # fmt: skip
    print(json.dumps(result.as_dict(), indent=2))
    return 0 if result.source != "none" else 1


if __name__ == "__main__":
    sys.exit(main())
