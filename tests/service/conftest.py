"""Service fixtures: a module-wide server on the shared repository, and a private copy of the
repository a test may change."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import Served, start_server


@pytest.fixture(scope="module")
def server(repository: Path, frontends: str) -> Iterator[Served]:
    served = start_server(repository, "--max-queue-delay-ms", "5")
    yield served
    assert served.stop() == 0


@pytest.fixture
def private_repo(repository: Path, tmp_path: Path) -> Path:
    """A copy of the repository a test may change."""
    copy = tmp_path / "repo"
    shutil.copytree(repository, copy)
    return copy
