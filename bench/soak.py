"""Long reliability checks of a real server, not run by `make test`: a long soak, version
rollouts, a storm of short deadlines beside normal clients, and SIGTERM under load, with the
resident memory (RSS) of every server process (supervisor, engine, front ends) read from /proc.

    .venv/bin/python bench/soak.py                    # 100,000 requests, 20 rollouts, 15 s storm
    .venv/bin/python bench/soak.py --requests 10000 --rollouts 4 --storm-s 5   # a quick look

One server (`python -m service serve`, 127.0.0.1, free ports) serves a private copy of one
model's directory (the repository given is never touched), polling it every --poll-interval-s:

1. soak: --requests V2 ModelInfer calls of one image from --clients closed-loop clients;
2. rollouts: --rollouts times, the newest version directory is copied as version N+1 (renamed
   into place, as an export does); once N+1 answers, version N is removed and the script waits
   until the server has unloaded it, while --rollout-clients keep sending (no version: newest);
3. storm: --storm-s seconds of --storm-clients with 1-5 ms deadlines on one connection beside
   --normal-clients with 10 s deadlines on another (issue 14's deadline storm);
4. sigterm: --clients clients sending, then SIGTERM to the server, which must exit 0; its
   clients may see OK, UNAVAILABLE (refused while draining, or nothing listening any more) and
   at most one CANCELLED per client and front end (grpc/grpc#41785), nothing else.

RSS is summed over the server's process tree at the start and after each quarter of a scenario
(of its requests, rollouts or seconds); growth is the last sample less the first. Every loop is
bounded by a count and by --scenario-timeout-s; all traffic goes to 127.0.0.1. Prints one table
(and /metrics' view of the storm); exits 1 when a scenario failed: a timeout, the normal clients
of the storm getting CANCELLED or fewer than 90 % OK, or SIGTERM ending badly.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
from prepare import ROOT, prepare_repository  # bench/prepare.py
from prometheus_client.parser import text_string_to_metric_families

from service import repository
from service._proto.inference import grpc_predict_v2_pb2 as pb
from service._proto.inference import grpc_predict_v2_pb2_grpc as pb_grpc

MiB = 1024 * 1024
PAGE = os.sysconf("SC_PAGE_SIZE")
STORM_DEADLINE_S = (0.001, 0.005)
NORMAL_DEADLINE_S = 10.0
SOAK_DEADLINE_S = 30.0
SIGTERM_AFTER_S = 1.0  # of load before the signal
OWN_CONNECTION = [("grpc.use_local_subchannel_pool", 1)]  # a channel that shares no connection
Codes = collections.Counter[str]


# ----------------------------------------------------------------------------- the server


def process_tree(pid: int) -> list[int]:
    """pid and every live descendant, by each process's parent pid."""
    children: dict[int, list[int]] = collections.defaultdict(list)
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int(
                    Path(f"/proc/{entry.name}/stat").read_text().rsplit(")", 1)[1].split()[1]
                )
            except (OSError, IndexError, ValueError):
                continue
            children[parent].append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        found.append(current := todo.pop())
        todo.extend(children.get(current, []))
    return found


def tree_rss_mib(pid: int) -> float:
    """Resident memory of pid and its descendants, MiB (/proc/PID/statm, shared pages in each
    process that maps them: an upper bound of what the tree holds)."""
    total = 0
    for member in process_tree(pid):
        try:
            total += int(Path(f"/proc/{member}/statm").read_text().split()[1]) * PAGE
        except (OSError, IndexError, ValueError):
            continue  # gone meanwhile
    return total / MiB


class Server:
    """`python -m service serve` on 127.0.0.1 and free ports; stderr kept in a thread."""

    def __init__(self, repo: Path, args: argparse.Namespace) -> None:
        command = [sys.executable, "-m", "service", "serve", "--repository", str(repo),
                   "--host", "127.0.0.1", "--grpc-port", "0", "--metrics-port", "0",
                   "--http-port", "0",
                   "--device", args.device, "--frontends", str(args.frontends),
                   "--poll-interval-s", str(args.poll_interval_s)]  # fmt: skip
        env = {k: v for k, v in os.environ.items() if not k.startswith("CNN_SERVING_")}
        self.process = subprocess.Popen(
            command, cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True
        )
        assert self.process.stderr is not None
        self.tail: collections.deque[str] = collections.deque(maxlen=50)
        self.port = self.metrics_port = -1
        deadline = time.monotonic() + args.scenario_timeout_s
        for line in self.process.stderr:
            self.tail.append(line)
            if found := re.search(r"metrics on :(\d+)/metrics", line):
                self.metrics_port = int(found[1])
            if found := re.search(r"ready: serving .* on port (\d+)", line):
                self.port = int(found[1])
                break
            if time.monotonic() > deadline:
                break
        if self.port < 0:
            self.stop()
            raise RuntimeError("the server was not ready:\n" + "".join(self.tail))
        self.target = f"127.0.0.1:{self.port}"
        threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.tail.append(line)

    def rss_mib(self) -> float:
        return tree_rss_mib(self.process.pid)

    def metrics(self) -> dict[str, list]:
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            text = response.read().decode()
        return {f.name: f.samples for f in text_string_to_metric_families(text)}

    def stop(self) -> int:
        """SIGTERM (the serve process stops its own children), SIGKILL after 120 s."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=120)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()


# ----------------------------------------------------------------------------- clients


def infer_request(
    model: str, spec: repository.ModelSpec, version: str = ""
) -> pb.ModelInferRequest:
    """One image of random pixels, raw uint8 NHWC."""
    shape = (1, spec.height, spec.width, spec.channels)
    pixels = np.random.default_rng(7).integers(0, 256, shape, dtype=np.uint8)
    tensor = pb.ModelInferRequest.InferInputTensor(
        name=spec.input_name, datatype="UINT8", shape=list(shape)
    )
    return pb.ModelInferRequest(
        model_name=model, model_version=version, inputs=[tensor],
        raw_input_contents=[pixels.tobytes()],
    )  # fmt: skip


async def closed_loop(
    stub: pb_grpc.GRPCInferenceServiceStub, request: pb.ModelInferRequest, clients: int,
    keep_going: Callable[[], bool], deadline_s: Callable[[], float], codes: Codes,
    done: Callable[[], None] | None = None,
) -> None:  # fmt: skip
    """`clients` callers, each sending its next call when its last one ends, while
    `keep_going()`; codes counted by name; `done()` after each call."""

    async def caller() -> None:
        while keep_going():
            try:
                await stub.ModelInfer(request, timeout=deadline_s())
                codes["OK"] += 1
            except grpc.aio.AioRpcError as exc:
                codes[exc.code().name] += 1
            if done is not None:
                done()

    await asyncio.gather(*(caller() for _ in range(clients)))


@dataclass
class Row:
    scenario: str
    requests: int = 0
    codes: Codes = field(default_factory=collections.Counter)
    rss_mib: list[float | None] = field(default_factory=list)  # start, 25, 50, 75, 100 %
    failed: str = ""  # why the scenario failed; "" when it passed


class Quarters:
    """RSS at the start, then once each time `progress` passes a quarter of `total`."""

    def __init__(self, server: Server, row: Row, total: float) -> None:
        self.server, self.row, self.total = server, row, total
        row.rss_mib = [server.rss_mib()]

    def at(self, progress: float) -> None:
        while len(self.row.rss_mib) < 5 and progress >= self.total * len(self.row.rss_mib) / 4:
            self.row.rss_mib.append(self.server.rss_mib())


async def bounded(awaitable: Awaitable[None], timeout_s: float, row: Row) -> None:
    try:
        await asyncio.wait_for(awaitable, timeout_s)
    except TimeoutError:
        row.failed = f"not done in {timeout_s:g} s"


# ----------------------------------------------------------------------------- scenarios


async def soak(server: Server, args: argparse.Namespace, request: pb.ModelInferRequest) -> Row:
    row = Row("soak")
    quarters = Quarters(server, row, args.requests)
    started = 0

    def more() -> bool:
        nonlocal started
        started += 1
        return started <= args.requests

    def done() -> None:
        row.requests = row.codes.total()
        quarters.at(row.requests)

    async with grpc.aio.insecure_channel(server.target, options=OWN_CONNECTION) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        run = closed_loop(stub, request, args.clients, more, lambda: SOAK_DEADLINE_S,
                          row.codes, done)  # fmt: skip
        await bounded(run, args.scenario_timeout_s, row)
    return row


def versions_of(repo: Path, model: str) -> list[int]:
    return sorted(int(p.name) for p in (repo / model).iterdir() if p.name.isdigit())


async def ready(stub: pb_grpc.GRPCInferenceServiceStub, model: str, version: int) -> bool:
    try:
        answer = await stub.ModelReady(
            pb.ModelReadyRequest(name=model, version=str(version)), timeout=5
        )
    except grpc.aio.AioRpcError:
        return False
    return bool(answer.ready)


async def wait_until(check: Callable[[], Awaitable[bool]], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if await check():
            return True
        await asyncio.sleep(0.05)
    return False


async def roll_once(
    stub: pb_grpc.GRPCInferenceServiceStub, repo: Path, model: str, wait_s: float
) -> str:
    """Copy the newest version N as N+1, wait until it answers, remove N, wait until it is
    unloaded; the failure, or ""."""
    old = versions_of(repo, model)[-1]
    staging = repo.parent / f"staging-{old + 1}"
    shutil.copytree(repo / model / str(old), staging)
    staging.rename(repo / model / str(old + 1))  # appears whole, as an export does

    async def new_ready() -> bool:
        return await ready(stub, model, old + 1)

    async def old_gone() -> bool:
        return not await ready(stub, model, old)

    if not await wait_until(new_ready, wait_s):
        return f"version {old + 1} never became ready"
    shutil.rmtree(repo / model / str(old))
    if not await wait_until(old_gone, wait_s):
        return f"version {old} was never unloaded"
    return ""


async def rollouts(
    server: Server, args: argparse.Namespace, repo: Path, request: pb.ModelInferRequest
) -> Row:
    row = Row("rollouts")
    quarters = Quarters(server, row, args.rollouts)
    stop = False
    wait_s = max(30.0, 20 * args.poll_interval_s)
    async with grpc.aio.insecure_channel(server.target, options=OWN_CONNECTION) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        traffic = asyncio.ensure_future(
            closed_loop(
                stub,
                request,
                args.rollout_clients,
                lambda: not stop,
                lambda: SOAK_DEADLINE_S,
                row.codes,
            )  # fmt: skip
        )

        async def roll() -> None:
            for done in range(1, args.rollouts + 1):
                row.failed = await roll_once(stub, repo, args.model, wait_s)
                if row.failed:
                    return
                quarters.at(done)

        await bounded(roll(), args.scenario_timeout_s, row)
        stop = True
        await traffic
    row.requests = row.codes.total()
    return row


async def storm(
    server: Server, args: argparse.Namespace, request: pb.ModelInferRequest
) -> tuple[Row, Row]:
    normal, short = Row("storm: normal clients"), Row("storm: 1-5 ms deadlines")
    quarters = Quarters(server, normal, args.storm_s)
    start = time.monotonic()
    until = start + args.storm_s

    def going() -> bool:
        return time.monotonic() < until

    async def sample() -> None:
        while len(normal.rss_mib) < 5:
            await asyncio.sleep(args.storm_s / 8)
            quarters.at(time.monotonic() - start)

    async with (
        grpc.aio.insecure_channel(server.target, options=OWN_CONNECTION) as normal_channel,
        grpc.aio.insecure_channel(server.target, options=OWN_CONNECTION) as storm_channel,
    ):
        both = asyncio.gather(
            closed_loop(pb_grpc.GRPCInferenceServiceStub(normal_channel), request,
                        args.normal_clients, going, lambda: NORMAL_DEADLINE_S, normal.codes),
            closed_loop(pb_grpc.GRPCInferenceServiceStub(storm_channel), request,
                        args.storm_clients, going, lambda: random.uniform(*STORM_DEADLINE_S),
                        short.codes),
            sample(),
        )  # fmt: skip
        await bounded(both, args.storm_s + args.scenario_timeout_s, normal)
    normal.requests, short.requests = normal.codes.total(), short.codes.total()
    ok = normal.codes["OK"]
    if normal.codes["CANCELLED"] or ok < 0.9 * normal.requests or not ok:
        normal.failed = normal.failed or "normal clients got CANCELLED or under 90 % OK"
    return normal, short


async def sigterm(server: Server, args: argparse.Namespace, request: pb.ModelInferRequest) -> Row:
    row = Row("sigterm under load")
    row.rss_mib = [server.rss_mib()]
    stop_at = time.monotonic() + args.scenario_timeout_s
    loop = asyncio.get_running_loop()

    def going() -> bool:
        return server.process.poll() is None and time.monotonic() < stop_at

    async def signal_later() -> None:
        await asyncio.sleep(SIGTERM_AFTER_S)
        row.rss_mib.append(server.rss_mib())
        server.process.send_signal(signal.SIGTERM)

    async with grpc.aio.insecure_channel(server.target, options=OWN_CONNECTION) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        await asyncio.gather(
            closed_loop(stub, request, args.clients, going, lambda: SOAK_DEADLINE_S, row.codes),
            signal_later(),
        )
    status = await loop.run_in_executor(None, server.stop)
    row.requests = row.codes.total()
    allowed = {"OK", "UNAVAILABLE", "CANCELLED"}
    cancelled_bound = args.clients * max(1, args.frontends)
    if status != 0:
        row.failed = f"exit status {status}"
    elif set(row.codes) - allowed or row.codes["CANCELLED"] > cancelled_bound:
        row.failed = "codes other than OK/UNAVAILABLE, or too many CANCELLED"
    return row


# ----------------------------------------------------------------------------- report


def table(rows: list[Row]) -> str:
    lines = [
        "scenario | requests | errors by code | RSS MiB at start / 25 / 50 / 75 / 100 % "
        "| growth MiB | result",
        "---|---|---|---|---|---",
    ]
    for r in rows:
        errors = ", ".join(f"{k} {v:,}" for k, v in sorted(r.codes.items()) if k != "OK") or "none"
        rss = " / ".join("-" if v is None else f"{v:,.0f}" for v in r.rss_mib) or "-"
        growth = f"{r.rss_mib[-1] - r.rss_mib[0]:+,.1f}" if len(r.rss_mib) > 1 else "-"
        lines.append(
            f"{r.scenario} | {r.requests:,} | {errors} | {rss} | {growth} | {r.failed or 'ok'}"
        )
    return "\n".join(lines)


def total(metrics: dict[str, list], family: str) -> float:
    """The sum of a counter's inference.v2 samples."""
    return sum(
        s.value for s in metrics.get(family, [])
        if s.name == f"{family}_total" and s.labels.get("api") == "inference.v2"
    )  # fmt: skip


def storm_metrics(before: dict[str, list], after: dict[str, list]) -> str:
    def grew(family: str) -> float:
        return total(after, family) - total(before, family)

    received = grew("cnn_serving_rpcs_received")
    answered = grew("cnn_serving_requests")
    expired = grew("cnn_serving_rpcs_expired")
    return (
        f"/metrics during the storm (inference.v2): {received:,.0f} RPCs received, "
        f"{answered:,.0f} answered ({expired:,.0f} of them expired before their handler "
        f"started), {received - answered:,.0f} dropped by grpc unanswered (client gone); "
        "calls refused before reaching the server's code (UNAVAILABLE above) are not counted"
    )


async def scenarios(server: Server, args: argparse.Namespace, repo: Path) -> list[Row]:
    spec = repository.read_spec(repo, args.model, versions_of(repo, args.model)[-1])
    request = infer_request(args.model, spec)
    rows = [await soak(server, args, request)]
    if args.rollouts:
        rows.append(await rollouts(server, args, repo, request))
    if args.storm_s > 0:
        before = await asyncio.to_thread(server.metrics)
        rows += await storm(server, args, request)
        after = await asyncio.to_thread(server.metrics)
        print(storm_metrics(before, after), file=sys.stderr)
    rows.append(await sigterm(server, args, request))
    return rows


def build_parser() -> argparse.ArgumentParser:
    intro, epilog = __doc__.split("\n\n", 1)
    p = argparse.ArgumentParser(
        description=intro, epilog=epilog,
        formatter_class=type("F", (argparse.RawDescriptionHelpFormatter,
                                   argparse.ArgumentDefaultsHelpFormatter), {}),
    )  # fmt: skip
    add = p.add_argument
    add("--repository", type=Path, default=None,
        help="model repository to copy the model from; none: build/bench-models, made on "
        "first use")  # fmt: skip
    add("--model", default="seed", help="model name (bench models: seed, scratch, vgg16)")
    add("--frontends", type=int, default=2, help="the server's --frontends (0: one process)")
    add("--device", default="cpu", help="the server's --device: auto, cpu or cuda")
    add("--poll-interval-s", type=float, default=0.2,
        help="the server's repository scan interval, seconds (rollouts wait on it)")  # fmt: skip
    add("--requests", type=int, default=100_000, help="calls of the soak scenario")
    add("--clients", type=int, default=16,
        help="concurrent closed-loop clients of the soak and sigterm scenarios")  # fmt: skip
    add("--rollouts", type=int, default=20, help="version rollouts; 0: skip the scenario")
    add("--rollout-clients", type=int, default=4, help="clients sending during the rollouts")
    add("--storm-s", type=float, default=15.0,
        help="seconds of the deadline storm; 0: skip the scenario")  # fmt: skip
    add(
        "--storm-clients",
        type=int,
        default=48,
        help="clients with 1-5 ms deadlines, one connection",
    )
    add(
        "--normal-clients",
        type=int,
        default=8,
        help="clients with 10 s deadlines, another connection",
    )
    add("--scenario-timeout-s", type=float, default=1200.0,
        help="longest a scenario may take, seconds, before it is stopped and marked "
        "failed")  # fmt: skip
    return p


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = build_parser()
    return check_args(p, p.parse_args(argv))


def check_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.Namespace:
    """What argparse cannot check (p.error on a bad combination)."""
    counts = (args.requests, args.clients, args.rollout_clients, args.storm_clients,
              args.normal_clients)  # fmt: skip
    if min(counts) < 1 or args.rollouts < 0 or args.storm_s < 0 or args.frontends < 0:
        p.error("counts must be positive (--rollouts, --storm-s, --frontends: >= 0)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    source = args.repository or prepare_repository([args.model])
    with tempfile.TemporaryDirectory(prefix="soak-") as tmp:
        repo = Path(tmp) / "repo"
        newest = versions_of(source, args.model)[-1]
        shutil.copytree(source / args.model / str(newest), repo / args.model / "1")
        server = Server(repo, args)
        try:
            rows = asyncio.run(scenarios(server, args, repo))
        finally:
            server.stop()
    print(f"server: --frontends {args.frontends}, --device {args.device}, model {args.model}; "
          f"{os.cpu_count()} cores", file=sys.stderr)  # fmt: skip
    print(table(rows))
    return 1 if any(r.failed for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
