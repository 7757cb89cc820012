"""The benchmarks still run: each scenario's ``--quick`` smoke run ends with exit status 0
and writes no results file.

This checks the tooling, not speed (the figures of a smoke run are not judged). The
scenarios share helpers (``bench_soak`` starts its clients with ``bench_fanout``'s), and a
change to one broke another once without any test noticing: ``zmx bench soak`` failed at
once on a fresh clone. ``hosts`` is left out: it needs root, network namespaces and cgroups,
and takes a minute (run it by hand: ``zmx bench hosts --quick``).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

PERF = Path(__file__).resolve().parent.parent / "perf"
TIMEOUT_S = 240.0


@pytest.mark.parametrize("scenario", ["engine", "orders", "pub", "fanout", "connections", "soak"])
def test_a_quick_run_of_each_benchmark_finishes(scenario: str, tmp_path: Path) -> None:
    results = PERF / "results"
    before = {p.name: p.stat().st_mtime_ns for p in results.iterdir()} if results.is_dir() else {}
    out = tmp_path / "out.txt"
    with out.open("wb") as sink:
        # Its own session: whatever it starts can be stopped with it if it hangs.
        proc = subprocess.Popen([sys.executable, str(PERF / f"bench_{scenario}.py"), "--quick"], cwd=PERF.parent,
                                stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            code = proc.wait(TIMEOUT_S)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
    output = out.read_text(errors="replace")
    assert code == 0, output[-3000:]
    after = {p.name: p.stat().st_mtime_ns for p in results.iterdir()} if results.is_dir() else {}
    assert after == before, "a smoke run wrote to perf/results"
