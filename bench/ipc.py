"""The cost of the process split alone: the same closed-loop inference load on the in-process
`Engine` and through `EngineClient` -> engine process (records over the Unix socket, pixels in
shared memory), without gRPC in either.

    .venv/bin/python bench/ipc.py                     # seed net, 64 callers x 1 image, 5 s
    .venv/bin/python bench/ipc.py --model scratch --callers 8 --images 32

For each path: requests/s, round-trip p50/p99 and the CPU per request of each process (from
/proc). The difference between the two rows is what crossing processes costs per request;
what the split buys is a second event loop (and core) for gRPC, which this does not measure
(bench/serve.py does, end to end).
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import tempfile
import time
from pathlib import Path

import numpy as np
from prepare import prepare_repository  # bench/prepare.py

from service.config import ServeConfig
from service.engine import Engine
from service.engine.host import EngineHost
from service.frontend import EngineClient
from service.metrics import Metrics

PREFIX = f"cnn-serving-{os.getpid()}"


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def closed_loop(core, model, images: np.ndarray, callers: int, seconds: float) -> dict:
    latencies: list[float] = []
    stop = time.monotonic() + seconds

    async def caller() -> None:
        while time.monotonic() < stop:
            started = time.monotonic()
            await core.infer(model, images)
            latencies.append(time.monotonic() - started)

    await asyncio.gather(*(caller() for _ in range(callers)))  # warm-up, not counted
    latencies.clear()
    stop = time.monotonic() + seconds
    started, before = time.monotonic(), cpu_s(os.getpid())
    await asyncio.gather(*(caller() for _ in range(callers)))
    elapsed, used = time.monotonic() - started, cpu_s(os.getpid()) - before
    ordered = sorted(latencies)
    return {
        "requests/s": len(ordered) / elapsed,
        "p50 ms": ordered[len(ordered) // 2] * 1e3,
        "p99 ms": ordered[int(len(ordered) * 0.99)] * 1e3,
        "caller CPU us/req": used / len(ordered) * 1e6,
        "seconds": elapsed,
        "count": len(ordered),
    }


def config(repo: Path) -> ServeConfig:
    return ServeConfig(repo, device="cpu", poll_interval_s=0, metrics_port=-1)


async def in_process(repo: Path, name: str, args: argparse.Namespace) -> dict:
    engine = Engine(config(repo))
    await engine.start()
    model = engine.model(name)
    images = np.zeros((args.images, *model.spec.image_shape), np.uint8)
    try:
        return await closed_loop(engine, model, images, args.callers, args.duration_s)
    finally:
        await engine.stop()


def engine_main(repo: Path, socket: Path, prefix: str, ready) -> None:  # type: ignore[no-untyped-def]
    async def serve() -> None:
        host = EngineHost(Engine(config(repo)), socket, prefix)
        await host.start()
        ready.set()
        await asyncio.Event().wait()

    asyncio.run(serve())


async def split(repo: Path, name: str, args: argparse.Namespace, engine_pid: int, socket: Path):
    client = EngineClient(config(repo), Metrics(), socket, PREFIX)
    await client.start()
    model = client.model(name)
    images = np.zeros((args.images, *model.spec.image_shape), np.uint8)
    before = cpu_s(engine_pid)
    try:
        result = await closed_loop(client, model, images, args.callers, args.duration_s)
    finally:
        await client.stop()
    # the engine's CPU over warm-up and run alike: divide by both runs' requests
    result["engine CPU us/req"] = (cpu_s(engine_pid) - before) / (2 * result["count"]) * 1e6
    return result


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="seed", help="seed, scratch or vgg16 (default: seed)")
    p.add_argument("--callers", type=int, default=64, help="concurrent callers (default: 64)")
    p.add_argument("--images", type=int, default=1, help="images per request (default: 1)")
    p.add_argument("--duration-s", type=float, default=5.0, help="seconds per path (default: 5)")
    return p


def main() -> None:
    args = build_parser().parse_args()
    repo = prepare_repository([args.model])
    rows = {"in-process Engine": asyncio.run(in_process(repo, args.model, args))}
    with tempfile.TemporaryDirectory() as folder:
        socket = Path(folder) / "engine.sock"
        ready = multiprocessing.get_context("spawn").Event()
        engine = multiprocessing.get_context("spawn").Process(
            target=engine_main, args=(repo, socket, PREFIX, ready), daemon=True
        )
        engine.start()
        ready.wait(120)
        try:
            rows["EngineClient -> engine process"] = asyncio.run(
                split(repo, args.model, args, engine.pid, socket)
            )
        finally:
            engine.terminate()
            engine.join(10)
    columns = ["requests/s", "p50 ms", "p99 ms", "caller CPU us/req", "engine CPU us/req"]
    print(f"model {args.model}, {args.callers} callers x {args.images} images, "
          f"{args.duration_s:g} s, cpus {os.cpu_count()}\n")  # fmt: skip
    print("| path | " + " | ".join(columns) + " |")
    print("|---|" + "---|" * len(columns))
    for name, row in rows.items():
        cells = [f"{row[c]:,.1f}" if c in row else "-" for c in columns]
        print(f"| {name} | " + " | ".join(cells) + " |")
    split_row, single = rows["EngineClient -> engine process"], rows["in-process Engine"]
    extra = split_row["caller CPU us/req"] + split_row["engine CPU us/req"]
    extra -= single["caller CPU us/req"]
    print(f"\nCPU the split adds per request (both processes, less in-process): {extra:,.0f} us")


if __name__ == "__main__":
    main()
