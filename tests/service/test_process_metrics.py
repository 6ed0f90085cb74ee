"""The metrics an operator looks for first: every server process's memory, CPU, open files and
start time, prometheus_client's process and platform collectors, and the GPUs where NVML sees
one (on a machine without, no GPU series and one line saying so)."""

from __future__ import annotations

import os
import time
from types import SimpleNamespace

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from service.process_metrics import GpuCollector, gpu_collector, read_process
from tests.conftest import scrape

pytestmark = pytest.mark.usefixtures("frontends")  # both server modes


def nvml_sees_a_gpu() -> bool:
    return gpu_collector() is not None


def test_every_server_process_is_measured(server, frontends: str):
    families = scrape(server)
    rss = {(s.labels["process"], s.labels["pid"]): s.value
           for s in families["cnn_serving_process_resident_memory_bytes"]}  # fmt: skip
    expected = ["server"] if frontends == "0" else ["engine", "frontend", "frontend"]
    assert sorted(role for role, _ in rss) == sorted(expected)
    assert all(value > 10_000_000 for value in rss.values())  # every one holds a Python
    pids = {int(pid) for _, pid in rss}
    assert server.process.pid in pids if frontends == "0" else server.process.pid not in pids
    for name in ("cnn_serving_process_cpu_seconds", "cnn_serving_process_open_fds",
                 "cnn_serving_process_start_time_seconds"):  # fmt: skip
        assert {s.labels["pid"] for s in families[name]} == {pid for _, pid in rss}
    started = [s.value for s in families["cnn_serving_process_start_time_seconds"]]
    assert all(time.time() - 3600 < t <= time.time() for t in started)
    assert families["process_resident_memory_bytes"][0].value > 0
    assert families["python_info"][0].labels["major"] == "3"


def test_gpu_series_only_where_nvml_sees_a_gpu(server):
    families = scrape(server)
    gpu = [name for name in families if name.startswith("cnn_serving_gpu_")]
    if nvml_sees_a_gpu():
        assert {"cnn_serving_gpu_memory_total_bytes", "cnn_serving_gpu_utilization_ratio"} <= set(
            gpu
        )
    else:
        assert gpu == []
        assert "no GPU metrics: NVML finds no GPU here" in server.log.text


def test_a_process_is_read_from_proc():
    resident, cpu, fds, started = read_process(os.getpid())
    assert resident > 10_000_000 and cpu > 0 and fds >= 3
    assert time.time() - 7 * 24 * 3600 < started <= time.time()
    assert read_process(2**22 + 12345) is None  # no such process: nothing, no error


class FakeNvml:
    """NVML as nvidia-ml-py presents it, for two GPUs, the second unreadable (fallen off the
    bus): what GpuCollector reads where there is a GPU, on a machine without one."""

    class Error(Exception):
        pass

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:  # noqa: N802 - NVML's names
        if index == 1:
            raise self.Error("GPU is lost")
        return index

    def nvmlDeviceGetUUID(self, handle: int) -> bytes:  # noqa: N802
        return b"GPU-0000-aaaa"

    def nvmlDeviceGetUtilizationRates(self, handle: int):  # noqa: N802
        return SimpleNamespace(gpu=37, memory=12)

    def nvmlDeviceGetMemoryInfo(self, handle: int):  # noqa: N802
        return SimpleNamespace(used=3 * 2**30, total=80 * 2**30, free=77 * 2**30)

    def nvmlDeviceGetPowerUsage(self, handle: int) -> int:  # noqa: N802
        return 215_500  # milliwatts


def test_gpu_collector_reads_each_gpu_and_skips_an_unreadable_one():
    registry = CollectorRegistry()
    registry.register(GpuCollector(FakeNvml(), 2))
    families = {
        f.name: f.samples
        for f in text_string_to_metric_families(generate_latest(registry).decode())
    }
    values = {name: [(s.labels, s.value) for s in samples] for name, samples in families.items()}
    uuid = {"gpu_uuid": "GPU-0000-aaaa"}
    assert values == {
        "cnn_serving_gpu_utilization_ratio": [(uuid, 0.37)],
        "cnn_serving_gpu_memory_used_bytes": [(uuid, 3 * 2**30)],
        "cnn_serving_gpu_memory_total_bytes": [(uuid, 80 * 2**30)],
        "cnn_serving_gpu_power_watts": [(uuid, 215.5)],
    }
