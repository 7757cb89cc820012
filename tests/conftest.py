from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq

sys.path.insert(0, str(Path(__file__).resolve().parent))

from nodes import Cluster  # noqa: E402
from ws import Clients  # noqa: E402


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    """Node processes for one test; all of them are stopped when the test ends, pass or fail."""
    c = Cluster(tmp_path)
    try:
        yield c
    finally:
        c.stop_all()


@pytest.fixture
def context() -> Iterator[zmq.Context]:
    """A ZeroMQ context for the test's own sockets, destroyed at its end."""
    ctx: zmq.Context = zmq.Context()
    try:
        yield ctx
    finally:
        ctx.destroy(linger=0)


@pytest.fixture
def clients() -> Iterator[Clients]:
    """WebSocket clients of the test (``ws.Clients``; set ``url`` once the gateway is up), all
    closed at its end."""
    opened = Clients("")
    try:
        yield opened
    finally:
        opened.close_all()
