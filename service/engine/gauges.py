"""What the engine reports of itself: each executed batch into its version's Stats (Triton's
statistics), and the gauges read at scrape time (readiness, queue depth, provider)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from service.batcher import BatchReport
from service.core import Stats, _add

if TYPE_CHECKING:
    from service.engine.core import Engine


def record_batch(stats: Stats, report: BatchReport) -> None:
    """One executed batch, in Triton's terms (see Stats): each of its requests counts once in
    queue and in each compute part, with the whole part's duration."""
    requests = len(report.queue_s)
    parts = [int(seconds * 1e9) for seconds in (report.input_s, report.compute_s, report.output_s)]
    stats.execution_count += 1
    stats.inference_count += report.size
    stats.last_inference_ms = int(time.time() * 1000)
    for pair, ns in zip(
        (stats.compute_input, stats.compute, stats.compute_output), parts, strict=True
    ):
        pair[0] += requests
        pair[1] += requests * ns
    entry = stats.batches.setdefault(report.size, [0, 0, 0, 0])
    entry[0] += 1
    for i, ns in enumerate(parts, start=1):
        entry[i] += ns
    for queued in report.queue_s:
        _add(stats.queue, int(queued * 1e9))


class LiveGauges(Collector):
    """The gauges read from the engine at scrape time (readiness, provider, queue depth): only
    loaded versions have series, so an unloaded version leaves nothing behind; a model in the
    repository without a ready version has one `cnn_serving_model_ready` series at 0 (version
    "")."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    def collect(self) -> Iterator[GaugeMetricFamily]:
        mv = ["model", "version"]
        ready = GaugeMetricFamily(
            "cnn_serving_model_ready", "1 when the version is loaded and takes traffic.", labels=mv
        )
        depth = GaugeMetricFamily(
            "cnn_serving_queue_depth", "Images waiting in the batch queue.", labels=mv
        )
        provider = GaugeMetricFamily(
            "cnn_serving_execution_provider_info",
            "1 for the onnxruntime execution provider each loaded version really runs on.",
            labels=[*mv, "provider", "device"],
        )
        loaded = self._engine.loaded()
        for name in sorted(self._engine.found - {m.spec.name for m in loaded}):
            ready.add_metric([name, ""], 0)  # in the repository, no version ready (an alert)
        for model in loaded:
            labels = [model.spec.name, str(model.spec.version)]
            ready.add_metric(labels, 1)
            depth.add_metric(labels, model.batcher.depth)
            device = "cuda" if model.on_cuda else "cpu"
            provider.add_metric([*labels, model.providers[0], device], 1)
        yield from (ready, depth, provider)
