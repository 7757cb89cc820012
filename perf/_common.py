"""Shared helpers of the benchmarks in ``perf/``: timing, metadata and the results files.

Every benchmark writes ``perf/results/<name>.json`` through ``write_results``, which adds
the same metadata to each file (Python, platform, CPU count, load, git commit, time), so
figures from different runs and machines can be told apart.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

PERF_DIR = Path(__file__).resolve().parent
ROOT = PERF_DIR.parent
RESULTS_DIR = PERF_DIR / "results"


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(["git", *args], check=False, cwd=ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def git_commit() -> str:
    """``HEAD``'s hash, with ``-dirty`` when tracked files have changes (other than the results
    files: a benchmark run after another one finds the first one's results changed, and its
    code is still ``HEAD``'s); ``unknown`` outside a repository or before its first commit."""
    head = _git("rev-parse", "--verify", "--quiet", "HEAD")
    if not head:
        return "unknown"
    status = _git("status", "--porcelain", "--untracked-files=no", "--", ".",
                  f":(exclude){RESULTS_DIR.relative_to(ROOT).as_posix()}")
    return head + "-dirty" if status else head


def metadata() -> dict[str, Any]:
    """Where and when the figures were measured."""
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        usable = os.cpu_count()
    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        load = None
    return {
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "cpu_usable": usable,
        "loadavg": load,
        "commit": git_commit(),
        "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def write_results(name: str, figures: dict[str, Any]) -> Path:
    """Write ``{"benchmark": name, **figures, **metadata()}`` to ``perf/results/<name>.json``."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    data = {"benchmark": name, **figures, **metadata()}
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    tmp.replace(path)
    return path


@contextlib.contextmanager
def shielded() -> Iterator[None]:
    """Hold SIGINT and SIGTERM off while the block runs, then deliver the first that came.

    For a benchmark's cleanup (stopping its processes, removing its temporary directory): a
    Ctrl-C reaches the benchmark and ``zmx bench`` at once, and ``zmx bench`` then passes it on;
    a second signal in the middle of the cleanup would cut it short and leave processes or
    files behind. A cleanup that hangs is still ended by SIGKILL (``zmx bench`` sends one if
    the benchmark has not stopped a minute after it was interrupted)."""
    came: list[int] = []
    held = (signal.SIGINT, signal.SIGTERM)
    before = {sig: signal.signal(sig, lambda signum, _frame: came.append(signum)) for sig in held}
    try:
        yield
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)
        if came:
            signal.raise_signal(came[0])


PROG_ENV = "ZMX_BENCH_PROG"  # set by zmx bench: the command that runs the benchmark


def arguments(doc: str) -> argparse.ArgumentParser:
    """A benchmark's parser, described by the first paragraph of its docstring ``doc``; under
    ``zmx bench`` its usage and errors name that command rather than the script."""
    return argparse.ArgumentParser(prog=os.environ.get(PROG_ENV) or None, description=doc.split("\n\n")[0])


def at_least_one(text: str) -> int:
    """An argparse type: a whole number of at least 1 (rounds, orders, connections, processes)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def above_zero(text: str) -> float:
    """An argparse type: a number above 0 (a rate, a length of time, a share)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a number above 0, got {text}")
    return value


def remove_directory(directory: Path, keep: bool) -> None:
    """A benchmark's temporary directory at its end: removed, or kept (``--keep``) and named."""
    if keep:
        print(f"kept {directory}")
    else:
        shutil.rmtree(directory, ignore_errors=True)


class Timer:
    """``with Timer() as t: ...`` then ``t.seconds``: ``time.perf_counter`` around the block."""

    __slots__ = ("seconds", "start")

    def __enter__(self) -> Timer:
        self.seconds = 0.0
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self.start


def best_of(repeat: int, run: Callable[[], float]) -> tuple[float, list[float]]:
    """Call ``run`` ``repeat`` times; it times its own loop and returns seconds.

    Garbage from the previous round is collected before each round (outside the timing);
    gc stays enabled while ``run`` runs, as in production. Returns (best, all rounds).
    """
    rounds = []
    for _ in range(max(1, repeat)):
        gc.collect()
        rounds.append(run())
    return min(rounds), rounds


def interleaved(repeat: int, runs: dict[str, Callable[[], float]]) -> dict[str, list[float]]:
    """Rounds of several runs taken in turn (A B, B A, A B, ...), so that a burst of load
    from elsewhere on the machine hits all of them alike; each run times its own loop and
    returns seconds. Garbage is collected before each run, outside the timing. Returns the
    seconds of every round by name; take ``min`` of each for best-of figures."""
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    order = list(runs)
    for i in range(max(1, repeat)):
        for name in order if i % 2 == 0 else reversed(order):
            gc.collect()
            seconds[name].append(runs[name]())
    return seconds


def proc_stat_cpu() -> list[int] | None:
    """Clock ticks of the whole machine so far, from ``/proc/stat``: user, nice, system, idle,
    iowait, irq, softirq, steal (0 where the kernel gives fewer); None where it is missing."""
    try:
        with open("/proc/stat", encoding="ascii") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    return (fields + [0] * 8)[:8]


def _cpu_jiffies() -> tuple[int, int] | None:
    """(busy, steal) clock ticks of the whole machine so far, from ``/proc/stat``; None elsewhere."""
    fields = proc_stat_cpu()
    if fields is None:
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    return user + nice + system + irq + softirq, steal


class CpuWatch:
    """How much else ran on the machine during a block: ``with CpuWatch() as w: ...``.

    ``others`` is the average number of CPUs that other processes kept busy, ``steal`` the
    average number the hypervisor gave to other machines (both None where ``/proc/stat`` is
    missing). Either above about 0.5 means the figures of the block are suspect.
    """

    __slots__ = ("_own", "_start", "_wall", "others", "steal")

    def __enter__(self) -> CpuWatch:
        self.others = self.steal = None
        self._start = _cpu_jiffies()
        own = os.times()
        self._own = own.user + own.system
        self._wall = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        wall = time.perf_counter() - self._wall
        end = _cpu_jiffies()
        own = os.times()
        if self._start is None or end is None or wall <= 0:
            return
        hz = os.sysconf("SC_CLK_TCK")
        busy = (end[0] - self._start[0]) / hz - (own.user + own.system - self._own)
        self.others = round(max(0.0, busy) / wall, 2)
        self.steal = round((end[1] - self._start[1]) / hz / wall, 2)


def machine_busy(seconds: float = 1.0) -> CpuWatch:
    """Watch an idle second: what the rest of the machine is doing right now."""
    with CpuWatch() as watch:
        time.sleep(seconds)
    return watch


def noise_note(watch: CpuWatch, what: str) -> str | None:
    """A warning when other processes or the hypervisor took CPU during ``what``."""
    if watch.others is None:
        return None
    if watch.others > 0.5 or (watch.steal or 0) > 0.5:
        return (f"{what}, other processes kept {watch.others} CPUs busy (hypervisor steal {watch.steal}): "
                "the figures are suspect; re-run when the machine is idle")
    return None


def warn(message: str) -> None:
    print(f"WARNING: {message}", file=sys.stderr)


# -- progress ------------------------------------------------------------------------------------

PROGRESS_ENV = "ZMX_BENCH_PROGRESS"  # set by ``zmx bench``: the benchmark then reports its steps


class Progress:
    """The steps of a benchmark as lines ``PROGRESS done/total label`` on stderr, which ``zmx
    bench`` turns into a progress bar; silent unless ``ZMX_BENCH_PROGRESS=1`` is in the
    environment, so a benchmark run by hand prints what it always printed.

    Call ``step`` after each step (a timed round, a warm-up), never inside a timed loop;
    ``total`` may grow when a benchmark decides to take more rounds.
    """

    __slots__ = ("done", "enabled", "total")

    def __init__(self, total: int) -> None:
        self.done = 0
        self.total = max(1, total)
        self.enabled = os.environ.get(PROGRESS_ENV) == "1"

    def step(self, label: str = "") -> None:
        self.done += 1
        self.total = max(self.total, self.done)
        if self.enabled:
            print(f"PROGRESS {self.done}/{self.total} {label}".rstrip(), file=sys.stderr, flush=True)

    def counted(self, label: str, run: Callable[[], float]) -> Callable[[], float]:
        """``run`` (a round that times itself), reporting a step after each call: for ``interleaved``."""
        rounds = 0

        def counted_run() -> float:
            nonlocal rounds
            seconds = run()
            rounds += 1
            self.step(f"{label} {rounds}")
            return seconds

        return counted_run
