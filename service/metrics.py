"""Prometheus metrics: one registry per server (no global state), served on --metrics-port.

Every series carries `model` and `version` (but the process-wide bytes of images decoding, and
the two counters of RPCs no handler worked on, received and expired, which carry `api` and
`method`: no model is known before a handler reads the request); request counters add `api`
(classifier.v1 or inference.v2) and `code` (the gRPC status name). Durations are histograms, so
any quantile can be computed across replicas.

With front-end processes (`serve --frontends N`) every process writes its counters and
histograms to prometheus_client's multiprocess files (the supervisor sets
PROMETHEUS_MULTIPROC_DIR for its children, which prometheus_client reads at import); the engine
serves one /metrics that sums them over all processes, dead ones included (counters never go
back), plus the gauges it reads live at scrape time. The decoding bytes gauge sums the live
processes only (the supervisor drops a dead one's file).
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import Any
from wsgiref.simple_server import WSGIServer

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    start_http_server,
    values,
)
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from service.errors import ConfigError

log = logging.getLogger(__name__)

# Seconds: sub-millisecond queueing up to multi-second CPU batches of large models. Dense from
# 0.25 to 5 ms (steps of at most 25%), where a small model's p99 lives, so that a quantile read
# from them (histogram_quantile) is within a fraction of a millisecond there.
LATENCY_BUCKETS = (
    0.00025, 0.0005, 0.00075, 0.001, 0.00125, 0.0015, 0.00175, 0.002, 0.0025, 0.003, 0.0035,
    0.004, 0.005, 0.006, 0.008, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.06, 0.08, 0.1, 0.15,
    0.25, 0.4, 0.6, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
BATCH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 256)


def _remove(metric: Counter | Histogram, labels: tuple[str, ...]) -> None:
    try:
        with warnings.catch_warnings():
            # multiprocess mode: it keeps the files' series (said in Metrics.forget) and warns
            warnings.filterwarnings("ignore", "Removal of labels", UserWarning)
            metric.remove(*labels)
    except KeyError:  # never created in this process
        pass


class Metrics:
    """`multiprocess_dir`: this process is one of several writing there (see above)."""

    def __init__(self, multiprocess_dir: Path | None = None) -> None:
        if multiprocess_dir is not None:
            # prometheus_client asks os.getpid() (a system call) on every update, to notice a
            # fork; our processes are started fresh and never fork, so their pid is fixed
            # (measured: getpid was 3.6 % of a front end's samples under load).
            pid = os.getpid()
            values.ValueClass = values.MultiProcessValue(lambda: pid)
        self.multiprocess_dir = multiprocess_dir
        self._live: list[Collector] = []
        self.registry = CollectorRegistry()
        reg = self.registry
        mv = ["model", "version"]
        self.requests = Counter(
            "cnn_serving_requests",
            "RPCs answered, by API and gRPC status code.",
            [*mv, "api", "code"],
            registry=reg,
        )
        self.images = Counter(
            "cnn_serving_images",
            "Images received in requests, by API and status code.",
            [*mv, "api", "code"],
            registry=reg,
        )
        self.rpcs_received = Counter(
            "cnn_serving_rpcs_received",
            "RPCs grpc handed to the server, counted before any handler ran. Those never "
            "answered (in cnn_serving_requests_total) were dropped by grpc because their "
            "client had gone (its deadline passed or it cancelled) before a handler took them.",
            ["api", "method"],
            registry=reg,
        )
        self.rpcs_expired = Counter(
            "cnn_serving_rpcs_expired",
            "RPCs whose deadline had already passed when their handler started: answered "
            "DEADLINE_EXCEEDED at once, without any work (also counted as answered).",
            ["api", "method"],
            registry=reg,
        )
        self.request_duration = Histogram(
            "cnn_serving_request_duration_seconds",
            "Time from receiving an RPC to answering it.",
            [*mv, "api"],
            buckets=LATENCY_BUCKETS,
            registry=reg,
        )
        self.queue_duration = Histogram(
            "cnn_serving_queue_duration_seconds",
            "Time a request waited in the batch queue before its batch started.",
            mv,
            buckets=LATENCY_BUCKETS,
            registry=reg,
        )
        self.decode_duration = Histogram(
            "cnn_serving_decode_duration_seconds",
            "Time to decode, convert and resize one encoded image.",
            mv,
            buckets=LATENCY_BUCKETS,
            registry=reg,
        )
        self.decode_refused = Counter(
            "cnn_serving_decode_refused",
            "Encoded images refused before decoding because --decode-budget-mib was full "
            "(or too small for them): answered RESOURCE_EXHAUSTED.",
            mv,
            registry=reg,
        )
        self.decode_in_flight = Gauge(
            "cnn_serving_decode_bytes_in_flight",
            "Estimated bytes of images being decoded now, summed over the processes that "
            "decode; each is bounded by --decode-budget-mib.",
            registry=reg,
            multiprocess_mode="livesum",
        )
        self.inference_duration = Histogram(
            "cnn_serving_inference_duration_seconds",
            "Time of one onnxruntime run of a whole batch.",
            mv,
            buckets=LATENCY_BUCKETS,
            registry=reg,
        )
        self.batch_size = Histogram(
            "cnn_serving_batch_size",
            "Images per executed batch.",
            mv,
            buckets=BATCH_BUCKETS,
            registry=reg,
        )
        self._server: WSGIServer | None = None
        # Labelled children of the request metrics, looked up once per label set (labels()
        # costs a lock and a dict lookup: measurable at thousands of requests per second).
        self._requests: dict[tuple[str, str, str, str], tuple[Any, Any, Any]] = {}

    def request_series(self, key: tuple[str, str, str, str]) -> tuple[Any, Any, Any]:
        """(requests, images, request_duration) children for (model, version, api, code)."""
        series = self._requests.get(key)
        if series is None:
            series = (
                self.requests.labels(*key),
                self.images.labels(*key),
                self.request_duration.labels(*key[:3]),
            )
            self._requests[key] = series
        return series

    def forget(self, name: str, version: int) -> None:
        """Drop every series of an unloaded version, so that neither it nor what it held
        stays. With front ends (multiprocess mode) a process's files keep what it counted:
        prometheus_client cannot remove those series, only stop updating them."""
        labels = (name, str(version))
        for key in [k for k in self._requests if k[:2] == labels]:
            del self._requests[key]
            _remove(self.requests, key)
            _remove(self.images, key)
            _remove(self.request_duration, key[:3])
        for metric in (
            self.queue_duration,
            self.decode_duration,
            self.inference_duration,
            self.batch_size,
            self.decode_refused,
        ):
            _remove(metric, labels)

    def add_live(self, collector: Collector) -> None:
        """A collector read at scrape time, from this process's own state."""
        self._live.append(collector)
        self.registry.register(collector)

    def exposed(self) -> CollectorRegistry:
        """What /metrics shows: this registry, or every process's files plus the live ones."""
        if self.multiprocess_dir is None:
            return self.registry
        registry = CollectorRegistry()
        MultiProcessCollector(registry, str(self.multiprocess_dir))
        for collector in self._live:
            registry.register(collector)
        return registry

    def serve(self, host: str, port: int) -> int:
        """Start /metrics on host:port (0: a free port); returns the real port. Raises
        ConfigError when it cannot listen there."""
        try:
            server, _thread = start_http_server(port, addr=host, registry=self.exposed())
        except OSError as exc:
            raise ConfigError(f"cannot listen on {host}:{port} (metrics): {exc.strerror}") from exc
        self._server = server
        return int(server.server_port)

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
