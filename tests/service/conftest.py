"""Service fixtures: a module-wide server on the shared repository."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import Served, start_server


@pytest.fixture(scope="module")
def server(repository: Path, frontends: str) -> Iterator[Served]:
    served = start_server(repository, "--max-queue-delay-ms", "5")
    yield served
    assert served.stop() == 0
