from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from nodes import Cluster  # noqa: E402


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    """Node processes for one test; all of them are stopped when the test ends, pass or fail."""
    c = Cluster(tmp_path)
    try:
        yield c
    finally:
        c.stop_all()
