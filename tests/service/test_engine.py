"""The in-process engine: what an unloaded version leaves behind."""

from __future__ import annotations

import asyncio
import gc
import shutil
import weakref
from pathlib import Path

from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from service.config import ServeConfig
from service.engine import Engine
from tests.conftest import MODEL


def test_an_unloaded_version_is_collected_and_its_gauges_are_gone(private_repo: Path) -> None:
    shutil.copytree(private_repo / MODEL / "1", private_repo / MODEL / "2")

    async def scenario() -> tuple[weakref.ref, set[str]]:
        engine = Engine(ServeConfig(private_repo, device="cpu", poll_interval_s=0))
        await engine.start()
        first = weakref.ref(engine.model(MODEL, 1))
        shutil.rmtree(private_repo / MODEL / "1")
        await engine.refresh()
        text = generate_latest(engine.metrics.registry).decode()
        gauges = {"cnn_serving_model_ready", "cnn_serving_queue_depth",
                  "cnn_serving_execution_provider_info"}  # fmt: skip
        versions = {
            s.labels["version"]
            for f in text_string_to_metric_families(text)
            if f.name in gauges
            for s in f.samples
        }
        await engine.stop()
        return first, versions

    first, versions = asyncio.run(scenario())
    gc.collect()
    assert first() is None  # nothing (a gauge's callback, a batcher) keeps the session alive
    assert versions == {"2"}
