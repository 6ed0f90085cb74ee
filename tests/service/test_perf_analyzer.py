"""Triton's own load generator, perf_analyzer (C++), against the real server: a short
concurrency sweep that runs to its end (it checks ModelStatistics last and stops when the
counts of its parts differ) and prints the server's breakdown of a request."""

from __future__ import annotations

import importlib.util
import sys

import pytest

from tests.conftest import MODEL, ROOT

pytestmark = pytest.mark.usefixtures("frontends")  # both server modes


def load_tool():
    spec = importlib.util.spec_from_file_location(
        "perf_analyzer", ROOT / "bench" / "perf_analyzer.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("perf_analyzer", module)  # its dataclasses look themselves up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tool():
    module = load_tool()
    if not (module.BINARY.is_file() and module._have_libb64()):
        pytest.skip(
            "perf_analyzer is not in build/perf_analyzer (`make test`'s set-up fetches it: "
            "see build/perf-analyzer-fetch.log)"
        )
    return module


@pytest.mark.parametrize("concurrency", [1, 4])
def test_perf_analyzer_runs_to_its_end_with_the_server_breakdown(server, tool, concurrency):
    result = tool.run(MODEL, server.target, "images:28,28,1", concurrency, interval_ms=1000,
                      max_trials=4)  # fmt: skip
    assert result.returncode == 0 and not result.aborted, result.error
    assert result.source == "csv" and result.images_per_s > 0
    parts = (result.queue_ms, result.compute_input_ms, result.compute_infer_ms,
             result.compute_output_ms)  # fmt: skip
    assert all(part is not None and part >= 0 for part in parts)
    assert result.compute_infer_ms > 0 and result.server_ms >= result.compute_infer_ms
