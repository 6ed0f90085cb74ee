"""The in-process engine: what an unloaded version leaves behind; its onnxruntime threads."""

from __future__ import annotations

import asyncio
import gc
import shutil
import weakref
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from service.config import ServeConfig
from service.engine import Engine
from service.engine import core as engine_core
from tests.conftest import MODEL


def test_an_unloaded_version_is_collected_and_its_gauges_are_gone(private_repo: Path) -> None:
    shutil.copytree(private_repo / MODEL / "1", private_repo / MODEL / "2")

    async def scenario() -> tuple[weakref.ref, set[str]]:
        engine = Engine(ServeConfig(private_repo, device="cpu", poll_interval_s=0))
        await engine.start()
        for version in (1, 2):  # every per-version series gets a child
            model = engine.model(MODEL, version)
            await engine.run(model, np.zeros((2, 28, 28, 1), np.uint8), None)
            engine.metrics.request_series((MODEL, str(version), "inference.v2", "OK"))[0].inc()
        first = weakref.ref(engine.model(MODEL, 1))
        del model
        shutil.rmtree(private_repo / MODEL / "1")
        await engine.refresh()
        text = generate_latest(engine.metrics.registry).decode()
        versions: dict[str, set[str]] = {}
        for family in text_string_to_metric_families(text):
            if not family.name.startswith("cnn_serving_"):  # python_info has a `version` too
                continue
            for sample in family.samples:
                if "version" in sample.labels:
                    versions.setdefault(family.name, set()).add(sample.labels["version"])
        await engine.stop()
        return first, versions

    first, versions = asyncio.run(scenario())
    gc.collect()
    assert first() is None  # nothing (a gauge's callback, a batcher) keeps the session alive
    # Gauges, histograms (batch, queue, inference, decode) and request counters: version 2 only.
    per_version = {"cnn_serving_model_ready", "cnn_serving_queue_depth", "cnn_serving_batch_size",
                   "cnn_serving_queue_duration_seconds", "cnn_serving_decode_duration_seconds",
                   "cnn_serving_requests", "cnn_serving_request_duration_seconds"}  # fmt: skip
    assert per_version <= versions.keys()
    assert all(seen == {"2"} for seen in versions.values()), versions


@pytest.mark.parametrize(
    ("configured", "inline_below_s", "expected"),
    [
        (0, 1.0, "1 onnxruntime thread"),  # a small net: every batch on the event loop
        (0, 0.0, "onnxruntime's default threads"),  # batches in a thread: they use the cores
        (2, 1.0, "2 onnxruntime threads"),  # a number given is kept
    ],
)
def test_automatic_threads_are_one_for_a_model_run_on_the_event_loop(
    private_repo: Path, monkeypatch, configured: int, inline_below_s: float, expected: str
) -> None:
    monkeypatch.setattr(engine_core, "INLINE_BELOW_S", inline_below_s)

    async def scenario() -> tuple[str, int, dict[str, np.ndarray]]:
        config = ServeConfig(private_repo, device="cpu", poll_interval_s=0)
        engine = Engine(replace(config, intra_op_threads=configured))
        await engine.start()
        model = engine.model(MODEL)
        outputs = await engine.run(model, np.zeros((3, 28, 28, 1), np.uint8), None)
        await engine.stop()
        return model.session.threads, model.batcher.inline_up_to, outputs

    threads, inline_up_to, outputs = asyncio.run(scenario())
    assert threads == expected
    assert (inline_up_to >= 64) == (inline_below_s > 0)
    assert outputs["probabilities"].shape == (3, 10)
    np.testing.assert_allclose(outputs["probabilities"].sum(axis=1), 1, rtol=1e-5)
