"""Triton's own Python client (tritonclient.grpc), unchanged, against our server."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from tests.conftest import MODEL, Served, png, reference

PROBE = Path(__file__).with_name("triton_probe.py")


def test_tritonclient_works_unchanged(
    server: Served, repository: Path, sample_images, tmp_path: Path
):
    x, _ = sample_images
    np.save(tmp_path / "images.npy", x[:5])
    for i, image in enumerate(x[5:8]):
        (tmp_path / f"{i}.png").write_bytes(png(image))
    done = subprocess.run(
        [sys.executable, str(PROBE), server.target, MODEL, str(tmp_path / "images.npy"),
         str(tmp_path)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    answers = json.loads(done.stdout)
    assert answers["live"] and answers["ready"] and answers["model_ready"]
    assert set(answers["server"]["extensions"]) >= {
        "classification",
        "model_configuration",
        "statistics",
    }
    metadata = answers["metadata"]
    assert metadata["inputs"] == [{"name": "images", "datatype": "UINT8",
                                   "shape": ["-1", "28", "28", "1"]}]  # fmt: skip
    assert [o["name"] for o in metadata["outputs"]] == ["probabilities", "bottleneck"]
    config = answers["config"]["config"]
    assert int(config["max_batch_size"]) == 64
    assert config["input"][0]["data_type"] == "TYPE_UINT8"
    assert config["input"][0]["dims"] == ["28", "28", "1"]
    assert config["output"][0]["dims"] == ["10"] and config["output"][1]["dims"] == ["2"]
    assert int(config["dynamic_batching"]["max_queue_delay_microseconds"]) == 5000

    want = reference(repository, x[:8])
    np.testing.assert_allclose(answers["uint8"]["probabilities"], want["probabilities"][:5],
                               atol=1e-6)  # fmt: skip
    np.testing.assert_allclose(answers["uint8"]["bottleneck"], want["bottleneck"][:5], atol=1e-4)
    labels = metadata_labels(repository)
    scores = want["probabilities"][:5]
    assert answers["classification"] == [
        [f"{row[i]:f}:{i}:{labels[i]}" for i in np.argsort(-row, kind="stable")[:3]]
        for row in scores
    ]
    np.testing.assert_allclose(answers["bytes"]["bottleneck"], want["bottleneck"][5:8], atol=1e-4)
    assert answers["bytes"]["probabilities"] is True  # not requested, not sent
    # The stream: one answer per request, in order, the bad one an error that did not end it.
    stream = answers["stream"]
    assert [a.get("id") for a in stream] == ["r0", "r1", None, "r2", "r3", "r4"]
    assert "[NOT_FOUND] model 'no-such-model' is not loaded" in stream[2]["error"]
    good = [a for a in stream if "error" not in a]
    np.testing.assert_allclose([a["probabilities"][0] for a in good], want["probabilities"][:5],
                               atol=1e-6)  # fmt: skip
    assert [a["final"] for a in good] == [None, None, None, None, True]
    assert answers["error"]["status"] == "StatusCode.NOT_FOUND"
    assert "model 'no-such-model' is not loaded" in answers["error"]["message"]
    stats = answers["statistics"]["model_stats"][0]
    assert stats["name"] == MODEL and stats["version"] == "1"
    assert int(stats["inference_count"]) >= 8 and int(stats["execution_count"]) >= 2
    assert int(stats["inference_stats"]["success"]["count"]) >= 2
    parts = stats["inference_stats"]
    counts = {int(parts[p]["count"]) for p in ("compute_input", "compute_infer", "compute_output")}
    assert len(counts) == 1 and counts.pop() >= 2  # what perf_analyzer requires at its end


def metadata_labels(repository: Path) -> list[str]:
    metadata = json.loads((repository / MODEL / "1" / "metadata.json").read_text())
    return list(metadata["labels"])
