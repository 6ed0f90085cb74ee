"""What an operator looks for first, read at scrape time: every server process's memory, CPU,
open files and start time (/proc), and the GPUs (NVML), for the one /metrics.

- `cnn_serving_process_*{process, pid}`: this process ("server" with --frontends 0, else
  "engine") and every front end connected to it. prometheus_client's own `process_*` and
  `python_info` are there too, for the process serving /metrics alone.
- `cnn_serving_gpu_*{gpu_uuid}`: utilization, memory used and total, power, through
  nvidia-ml-py; exported only where NVML finds a GPU. Without one, nothing is exported and one
  line says so at start (`gpu_collector`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

PAGE = os.sysconf("SC_PAGE_SIZE")
TICK = os.sysconf("SC_CLK_TCK")
Processes = Callable[[], list[tuple[str, int]]]  # (role, pid) of each live server process


def _boot_time() -> float:
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith("btime "):
            return float(line.split()[1])
    return 0.0


BOOT = _boot_time()


def read_process(pid: int) -> tuple[int, float, int, float] | None:
    """(resident bytes, CPU seconds, open fds, start time in Unix seconds) of a live process,
    from /proc; None once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        resident = int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE
        fds = len(os.listdir(f"/proc/{pid}/fd"))
    except (OSError, IndexError, ValueError):
        return None
    cpu = (int(fields[11]) + int(fields[12])) / TICK
    return resident, cpu, fds, BOOT + int(fields[19]) / TICK


class ServerProcesses(Collector):
    def __init__(self, processes: Processes) -> None:
        self._processes = processes

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        labels = ["process", "pid"]
        rss = GaugeMetricFamily(
            "cnn_serving_process_resident_memory_bytes",
            "Resident memory of each server process, in bytes.",
            labels=labels,
        )
        cpu = CounterMetricFamily(
            "cnn_serving_process_cpu_seconds",
            "User and system CPU time of each server process, all threads, in seconds.",
            labels=labels,
        )
        fds = GaugeMetricFamily(
            "cnn_serving_process_open_fds",
            "Open file descriptors of each server process.",
            labels=labels,
        )
        start = GaugeMetricFamily(
            "cnn_serving_process_start_time_seconds",
            "Start time of each server process, in seconds since the Unix epoch.",
            labels=labels,
        )
        for role, pid in self._processes():
            found = read_process(pid)
            if found is None:
                continue
            values = [role, str(pid)]
            rss.add_metric(values, found[0])
            cpu.add_metric(values, found[1])
            fds.add_metric(values, found[2])
            start.add_metric(values, found[3])
        yield from (rss, cpu, fds, start)


class GpuCollector(Collector):
    """cnn_serving_gpu_* per device, read through NVML at scrape time."""

    def __init__(self, nvml: object, count: int) -> None:
        self._nvml = nvml
        self._count = count

    def collect(self) -> Iterator[GaugeMetricFamily]:
        nvml: object = self._nvml
        label = ["gpu_uuid"]
        utilization = GaugeMetricFamily(
            "cnn_serving_gpu_utilization_ratio",
            "Fraction of the last sample period the GPU was busy (0-1).",
            labels=label,
        )
        used = GaugeMetricFamily(
            "cnn_serving_gpu_memory_used_bytes", "GPU memory in use.", labels=label
        )
        total = GaugeMetricFamily("cnn_serving_gpu_memory_total_bytes", "GPU memory.", labels=label)
        power = GaugeMetricFamily("cnn_serving_gpu_power_watts", "GPU power draw.", labels=label)
        for index in range(self._count):
            try:
                handle = nvml.nvmlDeviceGetHandleByIndex(index)  # type: ignore[attr-defined]
                uuid = [_text(nvml.nvmlDeviceGetUUID(handle))]  # type: ignore[attr-defined]
                rates = nvml.nvmlDeviceGetUtilizationRates(handle)  # type: ignore[attr-defined]
                memory = nvml.nvmlDeviceGetMemoryInfo(handle)  # type: ignore[attr-defined]
                utilization.add_metric(uuid, rates.gpu / 100)
                used.add_metric(uuid, memory.used)
                total.add_metric(uuid, memory.total)
                milliwatts = nvml.nvmlDeviceGetPowerUsage(handle)  # type: ignore[attr-defined]
                power.add_metric(uuid, milliwatts / 1000)
            except Exception as exc:  # a device NVML cannot read now: skipped, said in debug
                log.debug("NVML: GPU %d unreadable: %s", index, exc)
        yield from (utilization, used, total, power)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def gpu_collector() -> GpuCollector | None:
    """The GPU collector where NVML sees a GPU; None (and one line saying why) elsewhere."""
    try:
        import pynvml  # noqa: PLC0415 - nvidia-ml-py: ctypes over libnvidia-ml, no GPU needed

        pynvml.nvmlInit()
        count = int(pynvml.nvmlDeviceGetCount())
    except Exception as exc:  # NVMLError_LibraryNotFound, _DriverNotLoaded, ImportError, ...
        log.info("no GPU metrics: NVML finds no GPU here (%s)", exc or type(exc).__name__)
        return None
    if count == 0:
        log.info("no GPU metrics: NVML reports no GPU")
        return None
    log.info("GPU metrics for %d GPU(s) from NVML (cnn_serving_gpu_*)", count)
    return GpuCollector(pynvml, count)
