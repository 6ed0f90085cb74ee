"""Decoding memory: what one large image costs to decode, and what a burst of them does to a
real server's memory and CPU, with this checkout and (--before) another one.

    .venv/bin/python bench/decode_memory.py --before ../main     # about a minute on 2 cores

Two tables:
1. modes: one 4000x4000 (16 MP) image per mode and format, each decoded in a fresh process
   (python -c, with the checkout as its working directory): the decode's peak memory (its
   VmHWM rise) and, with this checkout, the estimate the decode budget reserves for it.
2. burst: `python -m service serve --frontends 0` on the seed model, then --requests
   concurrent Classify calls of --images black RGB PNGs each: the issue's 7000x7000 (49 MP)
   ones, then 4000x4000 ones (within the new default --max-image-pixels). The server's RSS
   before, its peak (VmHWM: the high-water mark since it started) and its RSS after the burst
   (malloc_trim, when on, has run by then: the last decode runs it before answering), its CPU
   seconds, and the answers by status code. "trim off" replaces
   service.memory.release_freed_memory with a no-op in the server (the comparison without it).
"""

from __future__ import annotations

import argparse
import collections
import io
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.prepare import prepare_repository  # noqa: E402
from service.client import Client  # noqa: E402

MiB = 1024 * 1024
SIDE = 4000  # 16 MP: the new default --max-image-pixels allows it
MODES = [
    ("L", "PNG", {}),
    ("RGB", "PNG", {}),
    ("RGBA", "PNG", {}),
    ("P", "PNG", {}),
    ("I;16", "PNG", {}),
    ("RGB", "WEBP", {"lossless": True}),
    ("RGB", "BMP", {}),
    ("CMYK", "TIFF", {}),
    ("RGB", "JPEG", {}),
    ("RGB", "JPEG", {"progressive": True}),
]
MEASURE = """
import io, re, sys
from PIL import Image
import service.images as images
try:
    from imaging import policy
except ImportError:  # a checkout from before the policy had its own module
    policy = images
path, mode, fmt = sys.argv[1:]
data = open(path, "rb").read()
warm = io.BytesIO()
Image.new(mode, (300, 300)).save(warm, fmt)
images.decode(warm.getvalue(), (28, 28, 1), 10**9)
estimate = -1
if hasattr(policy, "decoding_bytes"):
    with Image.open(io.BytesIO(data)) as opened:
        stored = opened.width * opened.height
        if opened.format == "JPEG":
            opened.draft(None, (56, 56))
        estimate = policy.decoding_bytes(opened, stored, (28, 28, 1))
def hwm():
    text = open("/proc/self/status").read()
    return int(re.search(r"VmHWM:\\s+(\\d+) kB", text).group(1)) * 1024
before = hwm()
images.decode(data, (28, 28, 1), 10**9)
print(estimate, hwm() - before)
"""
NO_TRIM = (
    "import sys, service.memory as m; m.release_freed_memory = lambda: None; "
    "from service.__main__ import main; sys.exit(main(sys.argv[1:]))"
)


# ---- table 1: one decode per mode


def mode_files(folder: Path) -> list[tuple[str, Path]]:
    noise = Image.frombytes("RGB", (SIDE, SIDE), os.urandom(SIDE * SIDE * 3))
    files = []
    for mode, fmt, save in MODES:
        name = f"{mode} {fmt}{' progressive' if save.get('progressive') else ''}"
        path = folder / f"{len(files)}.{fmt.lower()}"
        picture = noise if fmt == "JPEG" else Image.new("RGB", (SIDE, SIDE), (90, 90, 90))
        picture.convert(mode).save(path, format=fmt, **save)
        files.append((name, path))
    return files


def measure_mode(checkout: Path, path: Path, mode: str, fmt: str) -> tuple[int, int]:
    done = subprocess.run(
        [sys.executable, "-c", MEASURE, str(path), mode, fmt],
        cwd=checkout,
        capture_output=True,
        text=True,
        check=True,
    )
    estimate, peak = map(int, done.stdout.split())
    return estimate, peak


def modes_table(before: Path | None) -> str:
    lines = [
        f"one {SIDE}x{SIDE} image ({SIDE * SIDE / 1e6:.0f} MP) decoded to 28x28x1; MiB",
        "",
        "image | file KiB | before: peak | after: peak | after: estimate | after: MiB per MP",
        "---|---|---|---|---|---",
    ]
    with tempfile.TemporaryDirectory(prefix="decode-memory-") as folder:
        for (name, path), (mode, fmt, _) in zip(mode_files(Path(folder)), MODES, strict=True):
            old = measure_mode(before, path, mode, fmt)[1] if before else None
            estimate, peak = measure_mode(ROOT, path, mode, fmt)
            lines.append(
                f"{name} | {path.stat().st_size / 1024:,.0f} | "
                f"{'-' if old is None else f'{old / MiB:.1f}'} | {peak / MiB:.1f} | "
                f"{estimate / MiB:.1f} | {peak / MiB / (SIDE * SIDE / 1e6):.2f}"
            )
    return "\n".join(lines)


# ---- table 2: a burst against a real server


@dataclass
class Scenario:
    name: str
    checkout: Path
    options: tuple[str, ...] = ()
    trim: bool = True


class Server:
    """`python -m service serve --frontends 0` on free ports, serving the seed model alone."""

    def __init__(self, scenario: Scenario, repo: Path) -> None:
        self._view = tempfile.TemporaryDirectory(prefix="bench-repo-")
        (Path(self._view.name) / "seed").symlink_to((repo / "seed").resolve())
        start = ["-m", "service"] if scenario.trim else ["-c", NO_TRIM]
        command = [sys.executable, *start, "serve", "--repository", self._view.name]
        command += ["--frontends", "0", "--grpc-port", "0", "--metrics-port", "-1"]
        command += ["--http-port", "-1"]
        command += ["--host", "127.0.0.1", "--device", "cpu", "--poll-interval-s", "0"]
        command += list(scenario.options)
        env = {k: v for k, v in os.environ.items() if not k.startswith("CNN_SERVING_")}
        self.process = subprocess.Popen(
            command, cwd=scenario.checkout, env=env, stderr=subprocess.PIPE, text=True
        )
        self.tail: collections.deque[str] = collections.deque(maxlen=30)
        self.port = self._wait_ready()
        threading.Thread(target=self._drain, daemon=True).start()

    def _wait_ready(self) -> int:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.tail.append(line)
            if found := re.search(r"ready: serving .* on port (\d+)", line):
                return int(found[1])
        raise RuntimeError("server exited before it was ready:\n" + "".join(self.tail))

    def _drain(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.tail.append(line)

    def status(self) -> dict[str, float]:
        """VmRSS and VmHWM (MiB) and CPU seconds (user + system, all threads)."""
        text = Path(f"/proc/{self.process.pid}/status").read_text()
        kib = {k: int(v) for k, v in re.findall(r"(VmRSS|VmHWM):\s+(\d+) kB", text)}
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        return {"rss": kib["VmRSS"] / 1024, "hwm": kib["VmHWM"] / 1024, "cpu": cpu}

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(60)
        self._view.cleanup()


def black_png(side: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (side, side)).save(buffer, format="PNG")
    return buffer.getvalue()


def burst(scenario: Scenario, repo: Path, image: bytes, args: argparse.Namespace) -> str:
    server = Server(scenario, repo)
    try:
        target = f"127.0.0.1:{server.port}"
        with Client(target, timeout_s=300) as client:
            client.classify([black_png(28)], "seed")  # warm: the first request's costs
            before = server.status()
            started = time.monotonic()
            with ThreadPoolExecutor(args.requests) as pool:
                calls = [
                    pool.submit(client.classify, [image] * args.images, "seed")
                    for _ in range(args.requests)
                ]
                answers = [p for call in calls for p in call.result()]
            wall = time.monotonic() - started
            after = server.status()
    finally:
        server.stop()
    codes = collections.Counter(p.error_code or "OK" for p in answers)
    answered = ", ".join(f"{code} {n}" for code, n in sorted(codes.items()))
    return (
        f"{scenario.name} | {before['rss']:.0f} | {after['hwm']:.0f} | {after['rss']:.0f} | "
        f"{after['cpu'] - before['cpu']:.1f} | {wall:.1f} | {answered}"
    )


def burst_table(args: argparse.Namespace, repo: Path) -> str:
    after = Scenario("after", ROOT)
    scenarios: list[tuple[int, list[Scenario]]] = [
        (7000, [*([Scenario("before", args.before)] if args.before else []), after]),
        (
            SIDE,
            [
                *([Scenario("before", args.before)] if args.before else []),
                after,
                Scenario("after, trim off", ROOT, trim=False),
                Scenario("after, --decode-threads 16", ROOT, ("--decode-threads", "16")),
                Scenario(
                    "after, --decode-threads 16, trim off",
                    ROOT,
                    ("--decode-threads", "16"),
                    trim=False,
                ),
            ],
        ),
    ]
    lines = [
        f"{args.requests} concurrent Classify requests x {args.images} black RGB PNGs, "
        f"--frontends 0, --device cpu, cpus {os.cpu_count()} (affinity "
        f"{len(os.sched_getaffinity(0))}); MiB",
        "",
        "images | server | RSS before | peak RSS | RSS after | CPU s | wall s | answers",
        "---|---|---|---|---|---|---|---",
    ]
    for side, group in scenarios:
        image = black_png(side)
        for scenario in group:
            lines.append(f"{side}x{side} | " + burst(scenario, repo, image, args))
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--before", type=Path, help="another checkout to compare with (e.g. main)")
    p.add_argument("--repository", type=Path, help="model repository holding 'seed'")
    p.add_argument("--requests", type=int, default=2, help="concurrent Classify calls")
    p.add_argument("--images", type=int, default=16, help="images per call")
    p.add_argument("--part", choices=("modes", "burst", "all"), default="all")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.before is not None:
        args.before = args.before.resolve()
    if args.part in ("modes", "all"):
        print(modes_table(args.before), end="\n\n", flush=True)
    if args.part in ("burst", "all"):
        repo = args.repository or prepare_repository(["seed"])
        print(burst_table(args, repo), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
