"""Reliability fixtures: the hypothesis profiles of the fuzz suite, and its server (one per
module, in both modes: `frontends`) with the checks every fuzz example ends with; one V2
request of a real image (the deadline storm's).

HYPOTHESIS_PROFILE chooses the profile: "ci" (the default, what `make test` runs: a bounded
set of examples, the same on every run, no example database) or "long" (many more examples,
freshly random on each run, for a long local run: `HYPOTHESIS_PROFILE=long pytest
tests/reliability`; a failure prints the `@reproduce_failure` line that replays it)."""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, settings

from service._proto.inference import grpc_predict_v2_pb2 as v2
from tests.conftest import MODEL, Served, start_server

# Hypothesis keeps caches (no examples: database=None) in ./.hypothesis unless told otherwise:
# nothing is written in the checkout.
os.environ.setdefault(
    "HYPOTHESIS_STORAGE_DIRECTORY", os.path.join(tempfile.gettempdir(), "cnn-serving-hypothesis")
)
# A fuzz example is a round trip to a real server (and a health check): never "too slow".
_QUIET = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example]
settings.register_profile(
    "ci", max_examples=100, deadline=None, derandomize=True, database=None,
    suppress_health_check=_QUIET, print_blob=False,
)  # fmt: skip
settings.register_profile(
    "long", max_examples=5_000, deadline=None, database=None,
    suppress_health_check=_QUIET, print_blob=True,
)  # fmt: skip
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def share(divisor: int) -> settings:
    """The profile's examples over `divisor` (at least 10): for a test whose example is many
    requests, or one of many tests of a kind."""
    return settings(max_examples=max(10, settings().max_examples // divisor))


TIMEOUT_S = 30  # per call: a hung server fails the example (DEADLINE_EXCEEDED is not allowed)
RECORD = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} ", re.MULTILINE)


def problems(log: str) -> list[str]:
    """The log records of `log` that are an ERROR or hold a traceback."""
    starts = [m.start() for m in RECORD.finditer(log)] + [len(log)]
    records = [log[a:b] for a, b in zip(starts, starts[1:], strict=False)]
    return [r for r in records if " ERROR " in r.split("\n", 1)[0] or "Traceback" in r]


@dataclass
class Fuzzed:
    """A server under fuzz and one channel to it."""

    served: Served
    channel: grpc.Channel

    def mark(self) -> int:
        return len(self.served.log.lines)

    def check_alive(self, since: int) -> None:
        """The server still answers health SERVING, and logged no problem since `mark()`."""
        health = health_pb2_grpc.HealthStub(self.channel)
        answer = health.Check(health_pb2.HealthCheckRequest(), timeout=TIMEOUT_S)
        assert answer.status == health_pb2.HealthCheckResponse.SERVING
        assert not problems("".join(self.served.log.lines[since:]))


@pytest.fixture(scope="module")
def fuzzed(repository: Path, frontends: str) -> Iterator[Fuzzed]:
    """The module's server, in the `frontends` mode (both, one after the other)."""
    served = start_server(repository, "--poll-interval-s", "0")
    channel = grpc.insecure_channel(served.target)
    try:
        yield Fuzzed(served, channel)
    finally:
        channel.close()
        code = served.stop()
    assert code == 0
    assert not problems(served.log.text)


@pytest.fixture(scope="session")
def infer_request(sample_images) -> v2.ModelInferRequest:
    """One real Fashion-MNIST image as a V2 ModelInfer request, raw uint8 NHWC."""
    x, _ = sample_images
    pixels = np.ascontiguousarray(x[:1])  # (1, 28, 28, 1) uint8
    tensor = v2.ModelInferRequest.InferInputTensor(
        name="images", datatype="UINT8", shape=list(pixels.shape)
    )
    return v2.ModelInferRequest(
        model_name=MODEL, inputs=[tensor], raw_input_contents=[pixels.tobytes()]
    )
