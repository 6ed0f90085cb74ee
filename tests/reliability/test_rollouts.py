"""Version rollouts leave nothing behind (issue 14 part 2): ten versions rolled out one after
another through a real server, its memory (every process of it) stays flat after the second."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from service.client import Client
from tests.conftest import MODEL, Served, eventually, scrape, start_server

pytestmark = pytest.mark.usefixtures("frontends")  # both server modes

ROLLOUTS = 10
# After the second rollout, against the least of the last three samples (a new version's warm-up
# arena comes and goes: +-5 MB). Leaks were 24 MB per version (a 1.5 MB model; about 3 MB for
# this small one with malloc keeping what was freed).
GROWTH_BOUND_MB = 8.0


def tree_rss_mb(pid: int) -> float:
    """Resident memory of a process and all its descendants, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            parent = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(parent, []).append(int(entry))
    total_kb, todo = 0, [pid]
    while todo:
        current = todo.pop()
        todo += children.get(current, [])
        try:
            status = Path(f"/proc/{current}/status").read_text()
        except OSError:
            continue
        total_kb += next(
            int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:")
        )
    return total_kb / 1024


def roll_out(repo: Path, served: Served, version: int) -> None:
    """Publish `version` as the exporter does (staged, then renamed), retire `version - 1`,
    and classify with the new one."""
    staging = repo / MODEL / f".{version}.partial-test"
    shutil.copytree(repo / ".v", staging)
    staging.rename(repo / MODEL / str(version))
    served.log.wait_for(rf"loaded model 'fashion' version {version} ", 60)
    shutil.rmtree(repo / MODEL / str(version - 1))
    served.log.wait_for(rf"unloaded model 'fashion' version {version - 1} ", 60)
    with Client(served.target) as client:
        # front ends hear of it a moment after the engine's log line
        assert eventually(lambda: client.list_models() == {MODEL: [version]})
        answer = client.classify([np.zeros((28, 28, 1), np.uint8)] * 8, MODEL)
    assert all(p.ok and p.version == version for p in answer)


def test_ten_rollouts_leave_memory_and_metrics_flat(private_repo: Path):
    shutil.copytree(private_repo / MODEL / "1", private_repo / ".v")  # the source of each copy
    served = start_server(private_repo, "--poll-interval-s", "0.1")
    try:
        rss = []
        for version in range(2, ROLLOUTS + 2):
            roll_out(private_repo, served, version)
            rss.append(tree_rss_mb(served.process.pid))
        families = scrape(served)
    finally:
        assert served.stop() == 0
    growth = min(rss[-3:]) - rss[1]
    assert growth < GROWTH_BOUND_MB, [round(r, 1) for r in rss]
    # the single-process server keeps no series of a gone version (front ends: their files do)
    if served.log.text.count("front end") == 0:
        versions = {
            s.labels["version"] for name, samples in families.items() for s in samples
            if "version" in s.labels and name.startswith("cnn_serving_")  # not python_info
        }  # fmt: skip
        assert versions - {""} == {str(ROLLOUTS + 1)}, versions  # "": calls of no model
