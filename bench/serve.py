"""Serving benchmark: the real gRPC server against a compute and a transport ceiling.

    .venv/bin/python bench/serve.py                        # all three models, 8 s per scenario
    .venv/bin/python bench/serve.py --duration-s 2 --models scratch --json build/bench.json
    .venv/bin/python bench/serve.py --load perf-analyzer --models seed,scratch --frontends 0,2
    .venv/bin/python bench/serve.py --protocol http --models seed,scratch --frontends 0,2

For each model the real server (`python -m service serve`) runs as a subprocess; a separate
client process (one asyncio loop, N concurrent tasks) sends Open Inference Protocol ModelInfer
requests carrying real Fashion-MNIST pixels as a UINT8 [n, H, W, C] raw tensor. Scenarios: 1, 8
and 64 closed-loop clients sending single images, 8 clients sending batches of 32, and an
open-loop run at half the peak single-image rate (latency counted from each request's scheduled
send time, so a stalled client cannot hide queueing). Each runs a 1 s warm-up, not counted.
Client-side latencies include the gRPC round trip; "server p99" is the server's own
cnn_serving_request_duration_seconds over the measured window, read the way Prometheus's
histogram_quantile() reads it (receipt of the RPC to its answer). The open-loop run is repeated
against the bare transport server at the same rate, so the round trip's own p99 is known.

Ceilings, measured in the same run: compute is in-process onnxruntime on the same model.onnx at
the mean batch size the server formed; transport is a bare grpc.aio server that answers every
ModelInfer with a pre-built response of the same size, driven by the same client code. The CPU
columns are each server process's CPU time (all threads, from /proc) per image: unlike images/s
they hardly move when the shared machine speeds up or slows down.

Without --repository, models are trained for 1 epoch on the committed sample
tests/data/fashion-mnist and exported to build/bench-models (reused when present): their accuracy
is meaningless, only their speed matters. Models: `seed` and `scratch` (the scratch family's seed
network, 4,320 parameters, and its default network, 390k) and `vgg16`, whose random frozen base
(--base-weights none) computes exactly as much as the ImageNet one. Server and client share one
2-core box here, so absolute numbers are modest; the ratios are the point.

--load perf-analyzer drives the server with Triton's perf_analyzer instead (C++, gRPC,
synchronous clients; bench/perf_analyzer.py fetches it into build/perf_analyzer): single-64 and
batch32-8 by default (closed-loop scenarios only), --duration-s as its measurement window (-p),
up to 6 windows until 3 agree within 25 %. Its latencies are client side; no ceilings are run.
Server CPU per image and mean batch cover the whole perf_analyzer run: CPU of the server's
process tree over the images its cnn_serving_batch_size histogram counted in that time.

--protocol http (or both) adds V2 REST over HTTP (bench/http_load.py: an aiohttp client process,
keep-alive connections) with binary tensors and with JSON bodies at single-64 and batch32-8,
and gRPC against the same server for comparison; the HTTP ceiling is a bare ASGI app on the
same uvicorn (httptools) that reads each body and answers a canned reply of the right size.
Server CPU is per image over warm-up + window, of the server's whole process tree. Each of
--rounds rounds runs the ceiling and every server back to back; a table row is the target's
median round, and its ratio the median of its per-round ratios (range in brackets), since
windows minutes apart on this shared VM differ by up to a third.

--frontends 0,2 starts one server per value with `--frontends N` on its command line (0: the
single process; N >= 1: N front-end processes and one engine process, children of the serve
process) and prints a "split / single" ratio row against 0 for every other value. In both modes
the server's CPU is that of the serve process and every descendant (/proc, by parent pid),
sampled at the start and end of the window; a process that appears in between counts from 0.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import logging
import multiprocessing
import os
import re
import resource
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import grpc
import http_load  # bench/http_load.py
import numpy as np
import onnxruntime as ort
import perf_analyzer  # bench/perf_analyzer.py
from prepare import MODELS, ROOT, SAMPLE, prepare_repository  # bench/prepare.py
from prometheus_client.parser import text_string_to_metric_families

from service import repository
from service._proto.inference import grpc_predict_v2_pb2 as pb
from service._proto.inference import grpc_predict_v2_pb2_grpc as pb_grpc
from service.config import channel_options
from service.repository import ModelSpec
from training.data import read_idx

log = logging.getLogger("bench.serve")

# name -> (concurrent clients, images per request); "open-loop" follows the single-image ones.
CLOSED = {"single-1": (1, 1), "single-8": (8, 1), "single-64": (64, 1), "batch32-8": (8, 32)}
OPEN = "open-loop"
WARMUP_S = 1.0
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
PERF_ANALYZER_SCENARIOS = ("single-1", "single-8", "single-64", "batch32-8")  # the sweep
LOADS = ("python", "perf-analyzer")
PROTOCOLS = ("grpc", "http", "both")
HTTP_SCENARIOS = ("single-64", "batch32-8")
HEAD = (
    "scenario | clients | images/s | p50 ms | p95 ms | p99 ms | server p99 ms | mean batch | "
    "transport ceiling img/s | compute ceiling img/s | ratio vs transport | ratio vs compute | "
    "server CPU ms/img | transport CPU ms/img"
)
OPTIONS = (  # flag, default (shown by --help), type, help
    ("--repository", None, Path, "model repository; none: build/bench-models, made on first use"),
    ("--models", "seed,scratch,vgg16", str, "comma-separated models to benchmark: seed and "
     "scratch are the scratch family's seed and default networks"),
    ("--device", "cpu", str, "auto, cpu or cuda: the server's and the compute ceiling's"),
    ("--duration-s", 8.0, float, "seconds measured per scenario, after a 1 s warm-up; --load "
     "perf-analyzer: its measurement window (-p), up to 6 of them"),
    ("--intra-op-threads", 0, int, "onnxruntime threads per run, server and compute ceiling; "
     "0: onnxruntime's default (one per physical core)"),
    ("--max-batch-size", 64, int, "the server's, in images"),
    ("--max-queue-delay-ms", 2.0, float, "the server's, in milliseconds"),
    ("--load", "python", str, "python: the asyncio client process, with compute and transport "
     "ceilings; perf-analyzer: Triton's perf_analyzer (closed-loop scenarios, no ceilings)"),
    ("--frontends", "", str, "comma-separated values for the server's --frontends (e.g. 0,2), "
     "one server per value; empty: the flag is not passed (the server's own default)"),
    ("--scenarios", None, str, f"comma-separated subset of {', '.join([*CLOSED, OPEN])}; none: "
     f"all with --load python, {','.join(PERF_ANALYZER_SCENARIOS)} with perf-analyzer; "
     "open-loop sends single images at half the best single-* rate, so it needs one of those"),
    ("--protocol", "grpc", str, "grpc: today's tables; http: V2 REST with binary tensors and "
     "with JSON at single-64 and batch32-8, beside gRPC, against a bare ASGI app on the same "
     "uvicorn (the HTTP transport ceiling); both: the two (--load python only)"),
    ("--rounds", 3, int, "--protocol http|both: every HTTP and gRPC run this many times, each "
     "round the ceiling and the servers back to back; tables give the median round and the "
     "ratio's range"),
    ("--json", None, Path, "also write every number to this file as JSON; none: do not"),
    ("--profile-dir", None, Path, "run each server under cProfile into DIR/MODEL.prof (slows "
     "it); none: no profile"),
)  # fmt: skip
# model -> (yardstick, the least server/yardstick ratio at 64 clients)
TARGETS = {"seed": ("transport", 0.7), "scratch": ("transport", 0.7), "vgg16": ("compute", 0.8)}


@dataclass(frozen=True)
class Load:
    """One scenario for the client process; rate > 0 makes it open-loop."""

    target: str
    model: str
    input_name: str
    clients: int
    batch: int
    rate: float
    duration_s: float
    metrics_port: int | None


@dataclass
class Row:
    scenario: str
    clients: str
    images_per_s: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    mean_batch: float | None
    errors: dict[str, int] = field(default_factory=dict)
    transport: float | None = None  # images/s of the bare gRPC server, same scenario
    compute: float | None = None  # images/s of onnxruntime at round(mean_batch)
    batch_ms: float | None = None  # one onnxruntime run at round(mean_batch)
    batch_cpu_ms: float | None = None  # its CPU time (all onnxruntime threads)
    client_cpu: float = 0.0  # CPU seconds per second of the client process (it shares the box)
    server_cpu_ms: float | None = None  # server process CPU per image (ms), from /proc
    # The server's own view, from its /metrics histograms over the measured window:
    server_p50_ms: float | None = None  # request latency, receipt to answer (Prometheus-style)
    server_p99_ms: float | None = None
    server_batch_ms: float | None = None  # mean onnxruntime run per batch
    transport_cpu_ms: float | None = None  # the same for the bare gRPC server
    transport_client_ms: float | None = None  # the client's CPU per image against it
    transport_p99_ms: float | None = None  # client-side p99 of the bare server, same scenario


# ----------------------------------------------------------------------------- client process


def _request(load: Load, pixels: np.ndarray) -> pb.ModelInferRequest:
    tensor = pb.ModelInferRequest.InferInputTensor(
        name=load.input_name, datatype="UINT8", shape=list(pixels.shape)
    )
    return pb.ModelInferRequest(
        model_name=load.model, inputs=[tensor], raw_input_contents=[pixels.tobytes()]
    )


Histogram = dict[str, float]  # "sum", "count" and one cumulative count per bucket bound


def _histograms(port: int, model: str) -> dict[str, Histogram]:
    """The server's own histograms for `model` (every version and API summed), from /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    found: dict[str, Histogram] = {}
    for family in text_string_to_metric_families(text):
        if family.type != "histogram" or not family.name.startswith("cnn_serving_"):
            continue
        totals = found.setdefault(family.name, collections.defaultdict(float))
        for sample in family.samples:
            if sample.labels.get("model") != model:
                continue
            kind = sample.name.rsplit("_", 1)[-1]
            if kind == "bucket":
                totals[sample.labels["le"]] += sample.value
            elif kind in ("sum", "count"):
                totals[kind] += sample.value
    return found


def _minus(after: dict[str, Histogram], before: dict[str, Histogram]) -> dict[str, Histogram]:
    return {
        name: {key: value - before.get(name, {}).get(key, 0.0) for key, value in totals.items()}
        for name, totals in after.items()
    }


def quantile(q: float, histogram: Histogram) -> float:
    """The q-quantile of a histogram as Prometheus's histogram_quantile() computes it: linear
    inside the bucket that holds it (the highest finite bound when that is +Inf)."""
    bounds = sorted((float(k), v) for k, v in histogram.items() if k not in ("sum", "count"))
    if not bounds or bounds[-1][1] <= 0:
        return float("nan")
    rank = q * bounds[-1][1]
    lower, below = 0.0, 0.0
    for bound, cumulative in bounds:
        if cumulative >= rank:
            if bound == float("inf"):
                return lower
            return lower + (bound - lower) * (rank - below) / max(cumulative - below, 1e-12)
        lower, below = bound, cumulative
    return lower


def server_view(histograms: dict[str, Histogram]) -> dict[str, float | None]:
    """What the server saw of one scenario: mean batch, its own request-latency quantiles (ms)
    and its mean onnxruntime time per batch (ms)."""
    batches = histograms.get("cnn_serving_batch_size", {})
    requests = histograms.get("cnn_serving_request_duration_seconds", {})
    runs = histograms.get("cnn_serving_inference_duration_seconds", {})

    def mean(h: Histogram, scale: float = 1.0) -> float | None:
        return h["sum"] / h["count"] * scale if h.get("count") else None

    return {
        "mean_batch": mean(batches),
        "server_p50_ms": quantile(0.5, requests) * 1000 if requests.get("count") else None,
        "server_p99_ms": quantile(0.99, requests) * 1000 if requests.get("count") else None,
        "server_batch_ms": mean(runs, 1000.0),
    }


async def _drive(load: Load, pixels: np.ndarray) -> dict:
    """Run one scenario; throughput and latencies count the requests that finish after the
    warm-up and before the end."""
    requests = [
        _request(load, pixels[np.arange(i, i + load.batch) % len(pixels)])
        for i in range(0, 64 * load.batch, load.batch)
    ]
    latencies: list[float] = []
    errors: collections.Counter[str] = collections.Counter()
    options = channel_options(MAX_MESSAGE_BYTES)
    async with grpc.aio.insecure_channel(load.target, options=options) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        await stub.ModelInfer(requests[0], timeout=60)  # connects
        start, cpu = time.monotonic(), time.process_time()
        counted_from, end = start + WARMUP_S, start + WARMUP_S + load.duration_s

        async def one(request: pb.ModelInferRequest, sent: float) -> None:
            try:
                await stub.ModelInfer(request, timeout=30)
            except grpc.aio.AioRpcError as exc:
                errors[exc.code().name] += 1
                return
            done = time.monotonic()
            if counted_from <= done <= end:
                latencies.append(done - sent)

        async def closed(offset: int) -> None:
            while (sent := time.monotonic()) < end:
                await one(requests[offset % len(requests)], sent)
                offset += 1

        async def open_loop() -> None:
            tasks, n = set(), 0
            while (due := start + n / load.rate) < end:
                await asyncio.sleep(max(0.0, due - time.monotonic()))
                task = asyncio.create_task(one(requests[n % len(requests)], due))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                n += 1
            await asyncio.gather(*tasks)

        async def server() -> dict[str, float | None]:
            if load.metrics_port is None:
                return {}
            await asyncio.sleep(counted_from - time.monotonic())
            before = await asyncio.to_thread(_histograms, load.metrics_port, load.model)
            await asyncio.sleep(end - time.monotonic())
            after = await asyncio.to_thread(_histograms, load.metrics_port, load.model)
            return server_view(_minus(after, before))

        senders = [open_loop()] if load.rate else [closed(i) for i in range(load.clients)]
        *_, seen = await asyncio.gather(*senders, server())
    return {
        "client_cpu": (time.process_time() - cpu) / (time.monotonic() - start),
        "images": len(latencies) * load.batch,
        "latencies_ms": [s * 1000 for s in latencies],
        "errors": dict(errors),
        "server": seen,
    }


def client_run(load: Load, pixels: np.ndarray) -> dict:
    """Entry point in the client process."""
    return asyncio.run(_drive(load, pixels))


def row_from(scenario: str, clients: str, load: Load, result: dict) -> Row:
    latencies = np.asarray(result["latencies_ms"] or [np.nan])
    p50, p95, p99 = (float(np.percentile(latencies, q)) for q in (50, 95, 99))
    rate = result["images"] / load.duration_s
    seen = result["server"]
    row = Row(scenario, clients, rate, p50, p95, p99, seen.get("mean_batch"), result["errors"])
    row.client_cpu = result["client_cpu"]
    row.server_p50_ms = seen.get("server_p50_ms")
    row.server_p99_ms = seen.get("server_p99_ms")
    row.server_batch_ms = seen.get("server_batch_ms")
    return row


# ----------------------------------------------------------------------------- servers


class TransportServicer(pb_grpc.GRPCInferenceServiceServicer):
    """ModelInfer only: a pre-built response per batch size, no decoding, no inference."""

    def __init__(self, classes: int) -> None:
        self._classes = classes
        self._responses: dict[int, pb.ModelInferResponse] = {}

    async def ModelInfer(self, request, context):  # type: ignore[no-untyped-def]
        n = request.inputs[0].shape[0]
        if n not in self._responses:
            response = pb.ModelInferResponse(model_name=request.model_name, model_version="1")
            for name, width in (("probabilities", self._classes), ("bottleneck", 2)):
                response.outputs.add(name=name, datatype="FP32", shape=[n, width])
                response.raw_output_contents.append(np.zeros((n, width), "<f4").tobytes())
            self._responses[n] = response
        return self._responses[n]


def transport_main(classes: int, port_sink: multiprocessing.connection.Connection) -> None:
    """Entry point of the transport-ceiling process: serve until terminated."""

    async def serve() -> None:
        server = grpc.aio.server(options=channel_options(MAX_MESSAGE_BYTES))
        pb_grpc.add_GRPCInferenceServiceServicer_to_server(TransportServicer(classes), server)
        port_sink.send(server.add_insecure_port("127.0.0.1:0"))
        await server.start()
        await server.wait_for_termination()

    asyncio.run(serve())


class ModelServer:
    """`python -m service serve` on free ports, serving one model; stderr drained in a thread."""

    def __init__(
        self, repo: Path, spec: ModelSpec, args: argparse.Namespace, frontends: int | None = None
    ) -> None:
        self._view = tempfile.TemporaryDirectory(prefix="bench-repo-")
        (Path(self._view.name) / spec.name).symlink_to((repo / spec.name).resolve())
        command = [sys.executable]
        if args.profile_dir:
            args.profile_dir.mkdir(parents=True, exist_ok=True)
            command += ["-m", "cProfile", "-o", str(args.profile_dir / f"{spec.name}.prof")]
        command += ["-m", "service", "serve", "--repository", self._view.name, "--grpc-port", "0"]
        command += ["--metrics-port", "0", "--http-port", "0", "--host", "127.0.0.1"]
        command += ["--device", args.device]
        command += ["--poll-interval-s", "0", "--intra-op-threads", str(args.intra_op_threads)]
        command += ["--max-batch-size", str(args.max_batch_size)]
        command += ["--max-queue-delay-ms", str(args.max_queue_delay_ms)]
        if frontends is not None:
            command += ["--frontends", str(frontends)]
        env = {k: v for k, v in os.environ.items() if not k.startswith("CNN_SERVING_")}
        self.process = subprocess.Popen(
            command, cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True
        )
        if self.process.stderr is None:
            raise RuntimeError("no stderr pipe")
        self._stderr = self.process.stderr
        self.tail: collections.deque[str] = collections.deque(maxlen=40)
        self.warnings: list[str] = []
        try:
            self.http_port = -1
            self.metrics_port, self.port, self.providers = self._wait_ready()
        except BaseException:  # not ready (or not understood): leave no server behind
            self.stop()
            raise
        self.target = f"127.0.0.1:{self.port}"
        threading.Thread(target=self._drain, daemon=True).start()

    def _wait_ready(self) -> tuple[int, int, list[str]]:
        metrics_port = -1
        for line in self._stderr:
            self._keep(line)
            if found := re.search(r"metrics on :(-?\d+)/metrics", line):
                metrics_port = int(found[1])
            if found := re.search(r"HTTP listening on http://[^ ]+:(\d+) ", line):
                self.http_port = int(found[1])
            if "ready: serving" in line:
                # "... on port N" (--frontends 0), "... on port N (2 front ends, ...)" (>= 1)
                port = int(re.search(r" on port (\d+)\b", line)[1])  # type: ignore[index]
                return metrics_port, port, re.findall(r" v\d+ on (\w+)", line)
        raise RuntimeError("server exited before it was ready:\n" + "".join(self.tail))

    def _keep(self, line: str) -> None:
        self.tail.append(line)
        if " WARNING " in line or " ERROR " in line:
            self.warnings.append(line.rstrip())
        elif self.warnings and not re.match(r"\d{4}-\d\d-\d\d ", line):
            self.warnings[-1] += "\n" + line.rstrip()  # a traceback belongs to its line

    def _drain(self) -> None:
        for line in self._stderr:
            self._keep(line)

    def stop(self) -> None:
        """SIGTERM (the serve process stops its own children), SIGKILL after 120 s."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=120)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._view.cleanup()


# ----------------------------------------------------------------------------- measuring


def load_pixels(spec: ModelSpec, count: int = 512) -> np.ndarray:
    """(count, H, W, C) uint8 test images of the sample, resized (nearest) to the model."""
    images = read_idx(SAMPLE / "t10k-images-idx3-ubyte.gz")[:count]  # (N, 28, 28)
    rows = np.arange(spec.height) * images.shape[1] // spec.height
    cols = np.arange(spec.width) * images.shape[2] // spec.width
    images = images[:, rows][:, :, cols][..., np.newaxis]
    return np.ascontiguousarray(np.repeat(images, spec.channels, axis=3))


def compute_ceiling(
    session: ort.InferenceSession, pixels: np.ndarray, batch: int
) -> tuple[float, float]:
    """Seconds per onnxruntime run at `batch` images (at least 5 runs and 1 s): wall time, and
    CPU time of this process (all of onnxruntime's threads)."""
    feed = {session.get_inputs()[0].name: pixels[np.arange(batch) % len(pixels)]}
    for _ in range(3):
        session.run(None, feed)
    runs, started, cpu = 0, time.monotonic(), time.process_time()
    while runs < 5 or time.monotonic() - started < 1.0:
        session.run(None, feed)
        runs += 1
    return (time.monotonic() - started) / runs, (time.process_time() - cpu) / runs


def make_session(spec: ModelSpec, args: argparse.Namespace) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = args.intra_op_threads
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")  # as the server
    options.log_severity_level = 3
    cpu = ["CPUExecutionProvider"]
    providers = cpu if args.device == "cpu" else ["CUDAExecutionProvider", *cpu]
    return ort.InferenceSession(str(spec.onnx_path), options, providers=providers)


def bench_model(
    spec: ModelSpec,
    repo: Path,
    args: argparse.Namespace,
    pool: ProcessPoolExecutor,
    cache: dict,
    frontends: int | None = None,
) -> dict:
    pixels = load_pixels(spec)

    def measure(
        target: str, metrics: int | None, scenario: str, rate: float = 0.0, pid: int = 0
    ) -> Row:
        clients, batch = CLOSED.get(scenario, (0, 1))
        load = Load(
            target, spec.name, spec.input_name, clients, batch, rate, args.duration_s, metrics
        )
        log.info("%s %s on %s", spec.name, scenario, target)
        label = f"{rate:.0f}/s" if rate else str(clients)
        before = tree_cpu_s(pid)
        row = row_from(scenario, label, load, pool.submit(client_run, load, pixels).result())
        used = cpu_delta_s(before, tree_cpu_s(pid))
        row.server_cpu_ms = cpu_per_image_ms(used, row, args.duration_s)
        return row

    closed = [s for s in CLOSED if s in args.scenarios]
    server = ModelServer(repo, spec, args, frontends)
    try:
        pid = server.process.pid
        rows = [measure(server.target, server.metrics_port, s, pid=pid) for s in closed]
        single = [r.images_per_s for r in rows if CLOSED[r.scenario][1] == 1]
        if OPEN in args.scenarios and single:
            rows.append(measure(server.target, server.metrics_port, OPEN, max(single) / 2, pid=pid))
    finally:
        server.stop()
    session = make_session(spec, args)
    for row in rows:
        if row.mean_batch:
            batch = max(1, round(row.mean_batch))
            wall_s, cpu_s = compute_ceiling(session, pixels, batch)
            row.batch_ms, row.batch_cpu_ms = wall_s * 1000, cpu_s * 1000
            row.compute = batch / row.batch_ms * 1000
    key = (spec.image_shape, len(spec.labels))
    if key not in cache:
        cache[key] = transport_ceilings(len(spec.labels), [(s, 0.0) for s in closed], measure)
    ceilings = dict(cache[key])
    half = [(r.scenario, float(r.clients.removesuffix("/s"))) for r in rows if r.scenario == OPEN]
    if half:  # the bare server at the same open-loop rate: the round trip's own latency
        ceilings.update(transport_ceilings(len(spec.labels), half, measure))
    for row in rows:
        if row.scenario in ceilings:
            ceiling = ceilings[row.scenario]
            row.transport, row.transport_cpu_ms = ceiling.images_per_s, ceiling.server_cpu_ms
            if ceiling.images_per_s:
                row.transport_client_ms = ceiling.client_cpu / ceiling.images_per_s * 1000
            row.transport_p99_ms = ceiling.p99_ms
    training = spec.metadata.get("training", {})
    title = f"{spec.name} v{spec.version}: family {spec.metadata.get('family')}, arch "
    title += f"{spec.metadata.get('arch')}, {training.get('parameters', '?'):,} parameters"
    if not training.get("base_weights_real", True):
        title += ", random frozen base (--base-weights none)"
    if frontends is not None:
        title += f", server --frontends {frontends}"
    return {
        "model": spec.name,
        "title": title,
        "rows": rows,
        "providers": server.providers,
        "warnings": server.warnings,
        "compute_providers": session.get_providers(),
    }


def _stat(pid: int | str) -> list[str] | None:
    """/proc/PID/stat after the command name (fields[0] is the state, [1] the parent pid,
    [11]/[12] utime/stime in clock ticks, [19] the start time); None once it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return None


def process_tree(pid: int) -> list[int]:
    """pid and every live descendant (children of children too), by each process's parent."""
    children: dict[int, list[int]] = collections.defaultdict(list)
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (fields := _stat(entry.name)):
            children[int(fields[1])].append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        found.append(current := todo.pop())
        todo.extend(children.get(current, []))
    return found


def tree_cpu_s(pid: int) -> dict[tuple[int, str], float]:
    """User + system CPU seconds (all threads) of pid and each descendant, keyed by (pid, start
    time) so a reused pid is a new process; {} without a pid."""
    if not pid:
        return {}
    found = {}
    tick = os.sysconf("SC_CLK_TCK")
    for member in process_tree(pid):
        if fields := _stat(member):
            found[(member, fields[19])] = (int(fields[11]) + int(fields[12])) / tick
    return found


def cpu_delta_s(before: dict[tuple[int, str], float], after: dict[tuple[int, str], float]) -> float:
    """CPU seconds the tree used between two tree_cpu_s() samples: a process first seen in
    `after` counts from 0; one gone by then is lost (its last interval uncounted)."""
    return sum(cpu - before.get(key, 0.0) for key, cpu in after.items())


def cpu_per_image_ms(cpu_s: float, row: Row, duration_s: float) -> float | None:
    """Server CPU per image over warm-up + measured window (the same load throughout). Unlike
    images/s this barely moves when a shared machine gets slower or faster."""
    images = row.images_per_s * (duration_s + WARMUP_S)
    return cpu_s / images * 1000 if images and cpu_s else None


def transport_ceilings(
    classes: int, scenarios: list[tuple[str, float]], measure: Callable[..., Row]
) -> dict[str, Row]:
    """The bare gRPC server (its own process) under each (scenario, open-loop rate or 0)."""
    spawn = multiprocessing.get_context("spawn")
    receive, send = spawn.Pipe(duplex=False)
    process = spawn.Process(target=transport_main, args=(classes, send), daemon=True)
    process.start()
    try:
        target = f"127.0.0.1:{receive.recv()}"
        return {s: measure(target, None, s, rate, pid=process.pid or 0) for s, rate in scenarios}
    finally:
        process.terminate()
        process.join()


@dataclass
class PaRow:
    """One perf_analyzer scenario against one server; latencies are client side."""

    model: str
    frontends: str  # the server's --frontends, "-" when not passed
    scenario: str
    clients: int
    batch: int
    images_per_s: float | None
    p50_ms: float | None
    p95_ms: float | None
    p99_ms: float | None
    server_cpu_us: float | None  # server process tree CPU per image, whole run
    mean_batch: float | None  # from cnn_serving_batch_size, whole run
    server_p99_ms: float | None  # the server's request histogram, whole run
    server_processes: int  # the serve process and its descendants at the end
    load_cores: float  # perf_analyzer's own CPU seconds per second (it shares the box)
    aborted: bool  # perf_analyzer exited non-zero (see perf_analyzer.py: usually not fatal)
    source: str  # where the numbers came from: csv, stdout or none
    cpu_basis: str  # images the CPU is divided by: "server histogram" or "client rate x wall"
    error: str | None = None
    # perf_analyzer's server-side breakdown of a request (ModelStatistics), ms
    queue_ms: float | None = None
    compute_input_ms: float | None = None
    compute_infer_ms: float | None = None
    compute_output_ms: float | None = None
    overhead_ms: float | None = None


def bench_model_pa(
    spec: ModelSpec, repo: Path, args: argparse.Namespace, frontends: int | None
) -> list[PaRow]:
    """perf_analyzer's closed-loop scenarios against one server (one model, one --frontends)."""
    shape = f"{spec.input_name}:{spec.height},{spec.width},{spec.channels}"
    rows = []
    server = ModelServer(repo, spec, args, frontends)
    try:
        pid, metrics = server.process.pid, server.metrics_port
        for scenario in args.scenarios:
            clients, batch = CLOSED[scenario]
            log.info("%s %s on %s (--frontends %s)", spec.name, scenario, server.target, frontends)
            seen = _histograms(metrics, spec.name) if metrics > 0 else {}
            cpu, load = tree_cpu_s(pid), resource.getrusage(resource.RUSAGE_CHILDREN)
            result = perf_analyzer.run(
                spec.name, server.target, shape, clients, batch, round(args.duration_s * 1000)
            )
            used = cpu_delta_s(cpu, tree_cpu_s(pid))
            done = resource.getrusage(resource.RUSAGE_CHILDREN)
            load_cpu = done.ru_utime + done.ru_stime - load.ru_utime - load.ru_stime
            view: dict[str, float | None] = {}
            images = 0.0
            if metrics > 0:
                window = _minus(_histograms(metrics, spec.name), seen)
                view = server_view(window)
                images = window.get("cnn_serving_batch_size", {}).get("sum", 0.0)
            basis = "server histogram"
            if not images and result.images_per_s:
                images, basis = result.images_per_s * result.wall_s, "client rate x wall"
            rows.append(
                PaRow(
                    model=spec.name,
                    frontends="-" if frontends is None else str(frontends),
                    scenario=scenario,
                    clients=clients,
                    batch=batch,
                    images_per_s=result.images_per_s,
                    p50_ms=result.p50_ms,
                    p95_ms=result.p95_ms,
                    p99_ms=result.p99_ms,
                    server_cpu_us=used / images * 1e6 if images and used else None,
                    mean_batch=view.get("mean_batch"),
                    server_p99_ms=view.get("server_p99_ms"),
                    server_processes=len(process_tree(pid)),
                    load_cores=load_cpu / result.wall_s if result.wall_s else 0.0,
                    aborted=result.aborted,
                    source=result.source,
                    cpu_basis=basis,
                    error=result.error,
                    queue_ms=result.queue_ms,
                    compute_input_ms=result.compute_input_ms,
                    compute_infer_ms=result.compute_infer_ms,
                    compute_output_ms=result.compute_output_ms,
                    overhead_ms=result.overhead_ms,
                )
            )
    finally:
        server.stop()
    for line in server.warnings:
        log.warning("%s server logged: %s", spec.name, line)
    return rows


PA_HEAD = (
    "model | frontends | scenario | clients x images | images/s | p50 ms | p95 ms | p99 ms | "
    "server p99 ms | server CPU us/img | mean batch | server processes | perf_analyzer cores | "
    "server: queue / input / infer / output / overhead ms"
)


def _over(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}x" if a is not None and b else "n/a"


def pa_table(rows: list[PaRow]) -> str:
    """One row per model x frontends x scenario, then split / single ratios against 0."""
    lines = [f"| {PA_HEAD} |", "|" + "---|" * len(PA_HEAD.split(" | "))]
    for r in rows:
        cells = [r.model, r.frontends, r.scenario, f"{r.clients} x {r.batch}"]
        cells += [_num(r.images_per_s, 0)]
        cells += [_num(v, 2) for v in (r.p50_ms, r.p95_ms, r.p99_ms, r.server_p99_ms)]
        cells += [_num(r.server_cpu_us, 0), _num(r.mean_batch, 2), str(r.server_processes)]
        cells += [_num(r.load_cores, 2)]
        parts = (r.queue_ms, r.compute_input_ms, r.compute_infer_ms, r.compute_output_ms)
        cells += [" / ".join(_num(v, 3) for v in (*parts, r.overhead_ms))]
        lines.append("| " + " | ".join(cells) + " |")
    single = {(r.model, r.scenario): r for r in rows if r.frontends == "0"}
    for r in rows:
        base = single.get((r.model, r.scenario))
        if base is None or r.frontends in ("0", "-"):
            continue
        cells = [r.model, f"split / single ({r.frontends} / 0)", r.scenario, "ratio"]
        cells += [_over(r.images_per_s, base.images_per_s)]
        pairs = [(r.p50_ms, base.p50_ms), (r.p95_ms, base.p95_ms), (r.p99_ms, base.p99_ms)]
        pairs += [(r.server_p99_ms, base.server_p99_ms), (r.server_cpu_us, base.server_cpu_us)]
        pairs += [(r.mean_batch, base.mean_batch)]
        cells += [_over(a, b) for a, b in pairs] + ["", "", ""]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def pa_report(args: argparse.Namespace, rows: list[PaRow]) -> dict:
    print(
        f"cpus {os.cpu_count()}, onnxruntime {ort.__version__}, --load perf-analyzer "
        f"(tritonclient {perf_analyzer.VERSION}, -p {args.duration_s * 1000:.0f} ms, up to "
        f"{perf_analyzer.MAX_TRIALS} windows, --stability-percentage "
        f"{perf_analyzer.STABILITY_PERCENT}), --device {args.device}, --intra-op-threads "
        f"{args.intra_op_threads}, --max-batch-size {args.max_batch_size}, "
        f"--max-queue-delay-ms {args.max_queue_delay_ms:g}.\nLatencies: perf_analyzer's, client "
        "side; server CPU (the serve process and every descendant), mean batch and server p99: "
        "the whole perf_analyzer run.\n"
    )
    print(pa_table(rows) + "\n")
    for r in rows:
        if r.error:
            print(f"- {r.model} --frontends {r.frontends} {r.scenario}: perf_analyzer: {r.error}")
        if r.cpu_basis != "server histogram":
            print(f"- {r.model} --frontends {r.frontends} {r.scenario}: CPU per image over "
                  f"{r.cpu_basis} (no batch histogram on /metrics)")  # fmt: skip
    aborted = sum(r.aborted and r.source != "none" for r in rows)
    if aborted:
        print(f"- {aborted} of {len(rows)} runs: perf_analyzer exited non-zero after measuring "
              "(its ModelStatistics check); numbers read from its stdout")  # fmt: skip
    return {
        "args": {k: str(v) for k, v in vars(args).items()},
        "cpus": os.cpu_count(),
        "onnxruntime": ort.__version__,
        "rows": [asdict(r) for r in rows],
    }


# ----------------------------------------------------------------------------- report


def _num(value: float | None, digits: int = 1) -> str:
    return "n/a" if value is None or value != value else f"{value:,.{digits}f}"


def _ratio(numerator: float, denominator: float | None) -> str:
    return f"{numerator / denominator:.2f}x" if denominator else "n/a"


def table(name: str, rows: list[Row]) -> str:
    head = HEAD.split(" | ")
    lines = [f"### {name}", "", f"| {HEAD} |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r.scenario, r.clients, _num(r.images_per_s)]
        cells += [_num(v, 2) for v in (r.p50_ms, r.p95_ms, r.p99_ms, r.server_p99_ms)]
        cells += [_num(r.mean_batch, 2)]
        cells += [_num(v) for v in (r.transport, r.compute)]
        cells += [_ratio(r.images_per_s, v) for v in (r.transport, r.compute)]
        cells += [_num(v, 3) for v in (r.server_cpu_ms, r.transport_cpu_ms)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def targets(name: str, rows: list[Row], max_delay_ms: float) -> list[tuple[str, bool | None]]:
    """(description, passed) for each target this model's rows can answer; passed is None for
    a line of information."""
    found = []
    by = {r.scenario: r for r in rows}
    peak = by.get("single-64")
    yardstick, least = TARGETS.get(name, ("transport", 0.7))
    ceiling = getattr(peak, yardstick, None) if peak else None
    if peak and ceiling:
        ratio = peak.images_per_s / ceiling
        text = f"{name}: 64 clients >= {least}x {yardstick} ceiling: {ratio:.2f}x"
        found.append((f"{text} ({peak.images_per_s:,.0f} vs {ceiling:,.0f} img/s)", ratio >= least))
    if peak and peak.batch_cpu_ms and peak.mean_batch and peak.transport_cpu_ms:
        model_ms = peak.batch_cpu_ms / peak.mean_batch
        bare_ms = peak.transport_cpu_ms + (peak.transport_client_ms or 0.0)
        bound = bare_ms / (bare_ms + model_ms)
        found.append(
            (
                f"{name}: (bound) CPU per image at 64 clients: the bare server and its client "
                f"{bare_ms:.3f} ms, onnxruntime alone {model_ms:.3f} ms (batches of "
                f"{round(peak.mean_batch)}); where the box's cores are the limit, a server "
                f"doing both cannot pass {bound:.2f}x the transport ceiling, with no overhead "
                "of its own",
                None,
            )
        )
    half = by.get(OPEN)
    if half and half.server_p99_ms is not None and half.server_batch_ms is not None:
        bound = max_delay_ms + 2 * half.server_batch_ms
        text = (
            f"{name}: p99 at half the peak load ({half.clients}), server side (its request "
            f"histogram, as Prometheus reads it) <= max-queue-delay {max_delay_ms:g} ms + 2 x "
            f"{half.server_batch_ms:.2f} ms (its mean batch run at that load, batches of "
            f"{half.mean_batch or 0:.1f}) = {bound:.2f} ms: p99 {half.server_p99_ms:.2f} ms "
            f"(client side {half.p99_ms:.2f} ms; the bare transport server at the same rate: "
            f"{_num(half.transport_p99_ms, 2)} ms)"
        )
        found.append((text, half.server_p99_ms <= bound))
    return found


def report(args: argparse.Namespace, results: dict[str, dict]) -> dict:
    providers = {name: r["providers"] for name, r in results.items()}
    print(
        f"cpus {os.cpu_count()}, onnxruntime {ort.__version__}, grpcio {grpc.__version__}, "
        f"--device {args.device}, server providers {providers}, --intra-op-threads "
        f"{args.intra_op_threads}, --max-batch-size {args.max_batch_size}, "
        f"--max-queue-delay-ms {args.max_queue_delay_ms:g}, {args.duration_s:g} s per scenario."
        "\nCeilings: compute = onnxruntime alone at round(mean batch); transport = a bare "
        "grpc.aio server sending canned replies to the same client.\n"
    )
    verdicts = []
    for name, result in results.items():
        print(table(result["title"], result["rows"]) + "\n")
        for text, passed in targets(result["model"], result["rows"], args.max_queue_delay_ms):
            if passed is None:
                print(f"- {text}")
                continue
            print(f"- target {text}: {'PASS' if passed else 'FAIL'}")
            verdicts.append({"target": text, "passed": passed})
        for row in result["rows"]:
            if row.errors:
                print(f"- {name} {row.scenario}: failed RPCs {row.errors}")
        for line in result["warnings"]:
            print(f"- {name} server logged: {line}")
        print()
    return {
        "args": {k: str(v) for k, v in vars(args).items()},
        "cpus": os.cpu_count(),
        "onnxruntime": ort.__version__,
        "targets": verdicts,
        "models": {n: {**r, "rows": [asdict(x) for x in r["rows"]]} for n, r in results.items()},
    }


# ----------------------------------------------------------------------------- HTTP


@dataclass
class HttpRow:
    round: int  # from 0 (--rounds)
    target: str  # "ceiling" (the bare ASGI app), "server" or "server --frontends N"
    protocol: str  # http or grpc
    encoding: str  # binary, json (HTTP) or raw (gRPC)
    scenario: str
    images_per_s: float
    p50_ms: float
    p99_ms: float
    server_cpu_ms: float | None
    client_cpu: float
    errors: dict[str, int]


def _http_row(round_: int, target: str, protocol: str, encoding: str, scenario: str,
              result: dict, cpu_s: float, duration_s: float) -> HttpRow:  # fmt: skip
    latencies = np.asarray(result["latencies_ms"] or [np.nan])
    rate = result["images"] / duration_s
    images = rate * (duration_s + WARMUP_S)
    return HttpRow(
        round_, target, protocol, encoding, scenario, rate,
        float(np.percentile(latencies, 50)), float(np.percentile(latencies, 99)),
        cpu_s / images * 1000 if images and cpu_s else None,
        result["client_cpu"], result["errors"],
    )  # fmt: skip


def bench_http(
    spec: ModelSpec,
    repo: Path,
    args: argparse.Namespace,
    pool: ProcessPoolExecutor,
    frontends: list[int | None],
) -> list[HttpRow]:
    """V2 REST (binary, JSON) and gRPC against each server, and REST against the bare ASGI
    app, at HTTP_SCENARIOS; each run in the client process, server CPU from /proc."""
    pixels = load_pixels(spec)
    rows: list[HttpRow] = []

    def http_run(name: str, url: str, pid: int, scenario: str, encoding: str, r: int) -> None:
        clients, batch = CLOSED[scenario]
        load = http_load.HttpLoad(url, spec.name, spec.input_name, clients, batch, encoding,
                                  args.duration_s)  # fmt: skip
        before = tree_cpu_s(pid)
        result = pool.submit(http_load.client_run, load, pixels).result()
        cpu = cpu_delta_s(before, tree_cpu_s(pid))
        rows.append(_http_row(r, name, "http", encoding, scenario, result, cpu, args.duration_s))

    def grpc_run(name: str, server: ModelServer, scenario: str, r: int) -> None:
        clients, batch = CLOSED[scenario]
        load = Load(server.target, spec.name, spec.input_name, clients, batch, 0.0,
                    args.duration_s, None)  # fmt: skip
        before = tree_cpu_s(server.process.pid)
        result = pool.submit(client_run, load, pixels).result()
        cpu = cpu_delta_s(before, tree_cpu_s(server.process.pid))
        rows.append(_http_row(r, name, "grpc", "raw", scenario, result, cpu, args.duration_s))

    # Every target is up at once and measured back to back, scenario by scenario, so that a
    # ratio compares runs minutes apart at most (this shared VM drifts by tens of percent).
    spawn = multiprocessing.get_context("spawn")
    receive, send = spawn.Pipe(duplex=False)
    bare = spawn.Process(target=http_load.bare_main, args=(len(spec.labels), send), daemon=True)
    bare.start()
    servers: list[tuple[str, ModelServer]] = []
    try:
        bare_url = f"http://127.0.0.1:{receive.recv()}"
        for n in frontends:
            name = "server" if n is None else f"server --frontends {n}"
            servers.append((name, ModelServer(repo, spec, args, n)))
        for scenario in [s for s in HTTP_SCENARIOS if s in args.scenarios]:
            for r in range(args.rounds):
                for encoding in http_load.ENCODINGS:
                    http_run("ceiling", bare_url, bare.pid or 0, scenario, encoding, r)
                    for name, server in servers:
                        url = f"http://127.0.0.1:{server.http_port}"
                        http_run(name, url, server.process.pid, scenario, encoding, r)
                for name, server in servers:
                    grpc_run(name, server, scenario, r)
    finally:
        for _, server in servers:
            server.stop()
        bare.terminate()
        bare.join()
    return rows


HTTP_HEAD = (
    "target | protocol | body | scenario | images/s | p50 ms | p99 ms | server CPU ms/img | "
    "ratio vs HTTP ceiling | client cores | errors"
)


def http_report(results: dict[str, list[HttpRow]]) -> dict:
    """Print one table per model, a row per target: its median round, and the median and range
    of its per-round ratios to the ceiling; the target: binary REST at 64 clients >= 0.7x."""
    numbers = {}
    for model, rows in results.items():
        ceiling = {(r.round, r.encoding, r.scenario): r.images_per_s
                   for r in rows if r.target == "ceiling"}  # fmt: skip
        groups: dict[tuple[str, str, str, str], list[HttpRow]] = {}
        for r in rows:
            groups.setdefault((r.scenario, r.target, r.protocol, r.encoding), []).append(r)
        lines = [f"\n#### {model}: HTTP (V2 REST) beside gRPC\n", f"| {HTTP_HEAD} |",
                 "|" + "---|" * len(HTTP_HEAD.split("|"))]  # fmt: skip
        targets = []
        for (scenario, target, protocol, encoding), group in groups.items():
            r = sorted(group, key=lambda row: row.images_per_s)[(len(group) - 1) // 2]
            ratios = sorted(
                row.images_per_s / top
                for row in group
                if (top := ceiling.get((row.round, encoding, scenario))) and target != "ceiling"
            )
            ratio = "-"
            if ratios:
                middle = float(np.median(ratios))
                ratio = f"{middle:.2f}x" + (
                    f" ({ratios[0]:.2f}-{ratios[-1]:.2f})" if len(ratios) > 1 else ""
                )
                if (protocol, encoding, scenario) == ("http", "binary", "single-64"):
                    targets.append((target, middle, ratio))
            lines.append(
                f"| {r.target} | {r.protocol} | {r.encoding} | {r.scenario} | "
                f"{r.images_per_s:,.0f} | {r.p50_ms:.2f} | {r.p99_ms:.2f} | "
                f"{_num(r.server_cpu_ms, 3)} | {ratio} | {r.client_cpu:.2f} | "
                f"{sum(r.errors.values()) or ''} |"
            )
        rounds = len({r.round for r in rows})
        for target, middle, ratio in targets:
            met = "met" if middle >= 0.7 else "NOT met"
            lines.append(
                f"\ntarget ({target}): binary REST at 64 clients >= 0.7x the bare ASGI app "
                f"(median of {rounds} round{'s' if rounds > 1 else ''}): {ratio}, {met}"
            )
        print("\n".join(lines), flush=True)
        numbers[model] = [asdict(r) for r in rows]
    return numbers


class _Help(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The module docstring as is, and every option's default."""


def build_parser() -> argparse.ArgumentParser:
    intro, epilog = __doc__.split("\n\n", 1)
    p = argparse.ArgumentParser(description=intro, epilog=epilog, formatter_class=_Help)
    for flag, default, kind, text in OPTIONS:
        metavar = flag.rsplit("-", 1)[-1].upper()  # units where the flag has them: S, MS
        p.add_argument(flag, default=default, type=kind, help=text, metavar=metavar)
    return p


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = build_parser()
    return check_args(p, p.parse_args(argv))


def check_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.Namespace:
    """What argparse cannot check (p.error on a bad combination); lists split at commas."""
    if args.load not in LOADS:
        p.error(f"--load: one of {', '.join(LOADS)}, not {args.load!r}")
    args.models = [m for m in args.models.split(",") if m]
    if args.scenarios is None:
        every = [*CLOSED, OPEN] if args.load == "python" else PERF_ANALYZER_SCENARIOS
        args.scenarios = ",".join(every)
    args.scenarios = [s for s in args.scenarios.split(",") if s]
    unknown = set(args.models) - set(MODELS) | set(args.scenarios) - {*CLOSED, OPEN}
    if unknown or args.device not in ("auto", "cpu", "cuda"):
        p.error(f"unknown model, scenario or device: {', '.join(sorted(unknown))}")
    if args.protocol not in PROTOCOLS:
        p.error(f"--protocol: one of {', '.join(PROTOCOLS)}, not {args.protocol!r}")
    if args.rounds < 1:
        p.error("--rounds: at least 1")
    if args.protocol != "grpc" and args.load != "python":
        p.error("--protocol http|both runs with --load python")
    if args.load == "perf-analyzer" and OPEN in args.scenarios:
        p.error("--load perf-analyzer runs closed-loop scenarios only, not open-loop")
    try:
        args.frontends = [int(n) for n in args.frontends.split(",") if n.strip()]
    except ValueError:
        p.error(f"--frontends: comma-separated integers, not {args.frontends!r}")
    if any(n < 0 for n in args.frontends):
        p.error("--frontends: values >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    repo = args.repository or prepare_repository(args.models)
    frontends: list[int | None] = [*args.frontends] or [None]
    specs = [repository.read_spec(repo, m, max(repository.scan(repo)[m])) for m in args.models]
    if args.load == "perf-analyzer":
        try:
            perf_analyzer.fetch()
        except perf_analyzer.FetchError as exc:
            print(f"perf_analyzer: {exc}", file=sys.stderr)
            return 2
        rows = [r for s in specs for n in frontends for r in bench_model_pa(s, repo, args, n)]
        numbers = pa_report(args, rows)
        if args.json:
            args.json.write_text(json.dumps(numbers, indent=2) + "\n", encoding="utf-8")
        return 0
    results: dict[str, dict] = {}
    cache: dict[tuple, dict[str, float]] = {}  # transport ceilings by (image shape, classes)
    spawn = multiprocessing.get_context("spawn")
    numbers: dict = {}
    with ProcessPoolExecutor(max_workers=1, mp_context=spawn) as pool:
        if args.protocol in ("grpc", "both"):
            for spec in specs:
                for n in frontends:
                    key = spec.name if n is None else f"{spec.name} --frontends {n}"
                    results[key] = bench_model(spec, repo, args, pool, cache, n)
            numbers = report(args, results)
        if args.protocol in ("http", "both"):
            numbers["http"] = http_report(
                {s.name: bench_http(s, repo, args, pool, frontends) for s in specs}
            )
    if args.json:
        args.json.write_text(json.dumps(numbers, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
