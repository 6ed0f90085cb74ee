"""`serve --frontends N`: front ends and one engine as separate processes, under load and faults.

Each test starts the real server (supervisor, engine, front ends) on free ports and talks to it
over many real connections; processes are found by the pids the supervisor logs.
"""

from __future__ import annotations

import os
import shutil
import signal
import threading
import time
from collections import Counter
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service._proto.classifier.v1 import classifier_pb2 as cpb
from service._proto.classifier.v1 import classifier_pb2_grpc as cpb_grpc
from service._proto.inference import grpc_predict_v2_pb2 as v2
from service._proto.inference import grpc_predict_v2_pb2_grpc as v2_grpc
from service.ipc import shm
from tests.conftest import MODEL, Served, reference, scrape, start_server

SERVING = health_pb2.HealthCheckResponse.SERVING


def connection(served: Served) -> grpc.Channel:
    """A channel on its own TCP connection (the kernel picks its front end per connection)."""
    return grpc.insecure_channel(served.target, options=[("grpc.use_local_subchannel_pool", 1)])


def infer_request(images: np.ndarray) -> v2.ModelInferRequest:
    request = v2.ModelInferRequest(model_name=MODEL)
    request.inputs.add(name="images", datatype="UINT8", shape=images.shape)
    request.raw_input_contents.append(images.tobytes())
    return request


def pid_of(served: Served, role: str, after: int = 0) -> int:
    """The pid the supervisor logged for `role` (engine, frontend-N), other than `after`."""
    pattern = rf"(?:started|is back) {role} \(pid (?!{after}\))(\d+)\)|{role} is back \(pid (\d+)\)"
    match = served.log.wait_for(pattern, 60)
    return int(match.group(1) or match.group(2))


def segments(served: Served) -> list[str]:
    supervisor = served.process.pid
    return sorted(p.name for p in shm.SHM_DIR.glob(f"cnn-serving-{supervisor}.*"))


class Load:
    """`threads` clients, each on its own connection, sending 1-image ModelInfer calls until
    stopped; every outcome is counted by status code."""

    def __init__(self, served: Served, images: np.ndarray, threads: int = 8) -> None:
        self.codes: Counter[str] = Counter()
        self.before: Counter[str] = Counter()  # of the calls started before `mark()`
        self.marked = float("inf")
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [
            threading.Thread(target=self._run, args=(served, images[i % len(images)]))
            for i in range(threads)
        ]
        for thread in self._threads:
            thread.start()

    def _run(self, served: Served, image: np.ndarray) -> None:
        request = infer_request(image[None])
        while not self._stop.is_set():
            with connection(served) as channel:
                stub = v2_grpc.GRPCInferenceServiceStub(channel)
                for _ in range(20):  # a fresh connection now and then: both front ends get load
                    started = time.monotonic()
                    try:
                        stub.ModelInfer(request, timeout=15)
                        code = "OK"
                    except grpc.RpcError as exc:
                        code = exc.code().name
                    with self._lock:
                        self.codes[code] += 1
                        if started < self.marked:
                            self.before[code] += 1
                    if self._stop.is_set() or code != "OK":
                        break

    def mark(self) -> None:
        self.marked = time.monotonic()

    def wait_for(self, count: int, timeout_s: float = 60) -> None:
        deadline = time.monotonic() + timeout_s
        while self.codes["OK"] < count and time.monotonic() < deadline:
            time.sleep(0.05)

    def stop(self) -> Counter[str]:
        self._stop.set()
        for thread in self._threads:
            thread.join(60)
            assert not thread.is_alive(), "a client hung"
        return self.codes


@pytest.fixture
def split(repository: Path):
    served = start_server(repository, "--frontends", "2", "--max-queue-delay-ms", "20")
    yield served
    if served.process.poll() is None:
        assert served.stop() == 0
    assert segments(served) == []  # every segment removed at the end


def test_requests_from_many_connections_share_batches_and_totals_add_up(
    split: Served, repository: Path, sample_images
):
    x, _ = sample_images
    want = reference(repository, x)
    channels = [connection(split) for _ in range(32)]
    futures = []
    for round_ in range(4):
        for i, channel in enumerate(channels):
            stub = v2_grpc.GRPCInferenceServiceStub(channel)
            image = x[(i + round_) % len(x)]
            futures.append(
                (
                    (i + round_) % len(x),
                    stub.ModelInfer.future(infer_request(image[None]), timeout=30),
                )
            )
    for index, future in futures:
        answer = future.result()
        probabilities = np.frombuffer(answer.raw_output_contents[0], "<f4")
        np.testing.assert_allclose(probabilities, want["probabilities"][index], atol=1e-6)
    stub = v2_grpc.GRPCInferenceServiceStub(channels[0])
    deadline = time.monotonic() + 10
    while True:  # each front end sends its tally of finished requests once per loop turn
        answer = stub.ModelStatistics(v2.ModelStatisticsRequest(name=MODEL), timeout=10)
        stats = answer.model_stats[0]
        if stats.inference_stats.success.count >= 128 or time.monotonic() > deadline:
            break
        time.sleep(0.01)
    for channel in channels:
        channel.close()
    assert stats.inference_count == 128 and stats.inference_stats.success.count == 128
    assert stats.execution_count <= 64  # shared batches: fewer runs than requests
    assert max(b.batch_size for b in stats.batch_stats) >= 4
    metrics = scrape(split)
    ok = {"model": MODEL, "version": "1", "api": "inference.v2", "code": "OK"}

    def total(family: str, name: str) -> float:
        return sum(
            s.value for s in metrics[family]
            if s.name == name and all(s.labels.get(k) == v for k, v in ok.items())
        )  # fmt: skip

    assert total("cnn_serving_requests", "cnn_serving_requests_total") == 128
    assert total("cnn_serving_images", "cnn_serving_images_total") == 128
    batched = [s for s in metrics["cnn_serving_batch_size"] if s.name.endswith("_sum")]
    assert sum(s.value for s in batched) == 128  # the engine's histogram, same totals
    depth = metrics["cnn_serving_queue_depth"]
    assert [(s.labels, s.value) for s in depth] == [({"model": MODEL, "version": "1"}, 0.0)]


def test_a_killed_front_end_comes_back_and_only_its_requests_fail(split: Served, sample_images):
    x, _ = sample_images
    victim = pid_of(split, "frontend-1")
    load = Load(split, x)
    load.wait_for(200)
    os.kill(victim, signal.SIGKILL)
    back = pid_of(split, "frontend-1", after=victim)
    load.wait_for(load.codes["OK"] + 300)
    codes = load.stop()
    assert back != victim and codes["OK"] >= 500
    assert set(codes) <= {"OK", "UNAVAILABLE"}, codes  # its connections broke; nothing else
    assert codes["UNAVAILABLE"] <= 8 * 3  # about one call per client that was on it
    after = Load(split, x, threads=4)
    after.wait_for(100)
    assert set(after.stop()) == {"OK"}
    assert len(segments(split)) == 2  # the dead one's arena reclaimed, the new one's made
    assert split.log.wait_for(rf"frontend-1 \(pid {victim}\) exited .* 1 shared-memory segments")


def test_a_killed_engine_turns_front_ends_not_serving_then_traffic_resumes(
    split: Served, sample_images
):
    x, _ = sample_images
    engine = pid_of(split, "engine")
    load = Load(split, x)
    load.wait_for(200)
    statuses = []
    with connection(split) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        os.kill(engine, signal.SIGKILL)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            status = health.Check(health_pb2.HealthCheckRequest(), timeout=5).status
            statuses.append(status)
            if status == SERVING and len(set(statuses)) > 1:
                break
            time.sleep(0.005)
    assert health_pb2.HealthCheckResponse.NOT_SERVING in statuses and statuses[-1] == SERVING
    assert pid_of(split, "engine", after=engine) != engine
    load.wait_for(load.codes["OK"] + 300)
    codes = load.stop()
    assert set(codes) <= {"OK", "UNAVAILABLE"}, codes  # no hang, no DEADLINE_EXCEEDED
    assert codes["OK"] >= 500
    with connection(split) as channel:  # the model and its statistics are back
        stub = v2_grpc.GRPCInferenceServiceStub(channel)
        assert stub.ModelReady(v2.ModelReadyRequest(name=MODEL), timeout=10).ready
        stats = stub.ModelStatistics(v2.ModelStatisticsRequest(name=MODEL), timeout=10)
        assert stats.model_stats[0].inference_count > 0  # the new engine's own count


def test_sigterm_under_load_fails_nothing_in_flight_and_exits_0(split: Served, sample_images):
    x, _ = sample_images
    load = Load(split, x)
    load.wait_for(300)
    load.mark()
    split.process.send_signal(signal.SIGTERM)
    assert split.process.wait(90) == 0
    codes = load.stop()
    # Every call a front end had begun to handle finished: no drain ran out of time...
    assert "drain timeout" not in split.log.text
    # ...and the clients saw answers or refusals (UNAVAILABLE: draining, or no listener any
    # more), never CANCELLED (calls refused while draining are held until gRPC has sent its
    # GOAWAY: tests/reliability/test_drain.py), DEADLINE_EXCEEDED or INTERNAL.
    assert set(codes) <= {"OK", "UNAVAILABLE"}, codes
    assert load.before["OK"] >= 300, codes
    assert split.log.wait_for(r"\[supervisor\] .*: stopped", 1)


def test_a_second_sigterm_stops_at_once_and_leaves_nothing(repository: Path, sample_images):
    x, _ = sample_images
    served = start_server(repository, "--frontends", "2", "--max-batch-size", "1",
                          "--max-queue-size", "100000", "--drain-timeout-s", "120")  # fmt: skip
    request = infer_request(np.repeat(x[:1], 20_000, axis=0))  # seconds of batches of one
    with connection(served) as channel:
        call = v2_grpc.GRPCInferenceServiceStub(channel).ModelInfer.future(request, timeout=60)
        served.log.wait_for(r"front end \d serving", 10)
        time.sleep(0.5)  # the call reaches a front end (nothing to wait on from outside)
        served.process.send_signal(signal.SIGTERM)
        served.log.wait_for(r"draining: 1 RPCs in flight", 30)
        served.process.send_signal(signal.SIGTERM)
        assert served.process.wait(30) == 0  # not the 120 s drain
        assert call.exception(30) is not None  # cut, as asked
    assert "second signal: killing every child now" in served.log.text
    assert segments(served) == []


def test_a_new_version_is_seen_by_every_front_end(private_repo: Path):
    served = start_server(private_repo, "--frontends", "2", "--poll-interval-s", "0.2")
    try:
        shutil.copytree(private_repo / MODEL / "1", private_repo / MODEL / ".2.partial")
        (private_repo / MODEL / ".2.partial").rename(private_repo / MODEL / "2")
        deadline = time.monotonic() + 60
        first_seen = None
        seen = 0
        while seen < 16 and time.monotonic() < deadline:
            with connection(served) as channel:
                stub = cpb_grpc.ClassifierStub(channel)
                listed = stub.ListModels(cpb.ListModelsRequest(), timeout=10).models
                versions = list(listed[0].versions)
            if versions == [1, 2]:
                first_seen = first_seen or time.monotonic()
                seen += 1
            else:  # once one front end has it, the other must follow within a catalogue push
                assert first_seen is None or time.monotonic() - first_seen < 2, versions
        assert seen == 16
    finally:
        assert served.stop() == 0


def test_a_request_bigger_than_the_arena_gets_its_own_segment(repository: Path, sample_images):
    x, _ = sample_images
    served = start_server(
        repository, "--frontends", "1", "--frontend-shm-mib", "1", "--max-queue-size", "4096"
    )
    try:
        images = np.concatenate([x] * 50)  # 1,600 images: 1.25 MB > the 1 MiB arena
        with connection(served) as channel:
            stub = v2_grpc.GRPCInferenceServiceStub(channel)
            answer = stub.ModelInfer(infer_request(images), timeout=60)
        assert answer.outputs[0].shape == [1600, 10]
        assert len(segments(served)) == 1  # the one-off segment went with its request
    finally:
        assert served.stop() == 0
    assert segments(served) == []


def test_an_engine_that_cannot_start_is_one_line_and_exit_2(repository: Path):
    import subprocess
    import sys

    from tests.service.test_runtime import cuda_really_works

    if cuda_really_works(repository):
        pytest.skip("this machine has a working CUDA provider")

    done = subprocess.run(
        [sys.executable, "-m", "service", "serve", "--repository", str(repository),
         "--frontends", "2", "--device", "cuda", "--grpc-port", "0", "--http-port", "0",
         "--metrics-port", "-1"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert done.returncode == 2
    assert errors == [errors[0]] and "--device cuda" in errors[0]
