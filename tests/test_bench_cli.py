"""``zmx bench``: scenarios, the progress bar, plots and the README's performance table.

No real benchmark runs here: the scenarios are tiny scripts in a temporary perf directory
(``--perf-dir``), the real scripts are only given arguments they must refuse before anything
runs, and the report works on a temporary README and results directory.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from types import ModuleType

import pytest
from click.testing import CliRunner

from zmx.cli import TABLE_END, TABLE_START, main, performance_table, replace_table

REPO = Path(__file__).resolve().parent.parent
PERF = REPO / "perf"

try:
    import matplotlib  # noqa: F401
    HAVE_MATPLOTLIB = True
except ImportError:
    HAVE_MATPLOTLIB = False


def load_perf_module(name: str) -> ModuleType:
    """A module of perf/ (a directory of scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(f"perf_{name}", PERF / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def summary_row(benchmark: str, zmx: str, baseline: str = "", ratio: str = "", target: str = "",
                met: bool | None = None) -> dict[str, object]:
    return {"benchmark": benchmark, "zmx": zmx, "baseline": baseline, "ratio": ratio, "target": target, "met": met}


# A scenario that does what a benchmark does, in a blink: prints, reports its steps, writes results.
FAKE = textwrap.dedent('''\
    """Fake benchmark: three steps and a results file."""
    import json, os, sys
    from pathlib import Path

    def progress(done, label):
        if os.environ.get("ZMX_BENCH_PROGRESS") == "1":
            print(f"PROGRESS {done}/3 {label}", file=sys.stderr, flush=True)

    print("fake benchmark, args:", " ".join(sys.argv[1:]))
    for i, label in enumerate(("warm-up", "round 1", "round 2"), 1):
        progress(i, label)
    print("WARNING: the machine was busy", file=sys.stderr)
    if "--fail" in sys.argv:
        sys.exit(3)
    if "--quick" not in sys.argv:
        results = Path(__file__).resolve().parent / "results"
        results.mkdir(exist_ok=True)
        figures = {
            "benchmark": "fake",
            "ack_us": {"p50": 800.0, "p99": 4000.0, "p99.9": 9000.0, "max": 12000.0},
            "symbol_counts": {"1": {"zmx": {"publications_per_s": 1000}},
                              "10": {"zmx": {"publications_per_s": 900}}},
            "ceiling": {"round_trips_per_s": 5000},
            "summary": [{"benchmark": "fake scenario", "zmx": "1,000/s", "baseline": "bare loop: 5,000/s",
                         "ratio": "0.20x", "target": ">= 0.5x", "met": False}],
        }
        (results / "fake.json").write_text(json.dumps(figures))
        print("wrote results/fake.json")
''')


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


@pytest.fixture
def perf_dir(tmp_path: Path) -> Path:
    """A perf directory with the fake scenario, a second one, and the real plots module."""
    perf = tmp_path / "perf"
    perf.mkdir()
    (perf / "bench_fake.py").write_text(FAKE, encoding="utf-8")
    (perf / "bench_other.py").write_text('"""Another scenario."""\n', encoding="utf-8")
    shutil.copy(PERF / "plots.py", perf / "plots.py")
    return perf


# -- scenarios -----------------------------------------------------------------------------------


@pytest.mark.parametrize("args", [["bench"], ["bench", "list"]])
def test_bench_lists_the_scenarios_of_this_checkout(runner: CliRunner, args: list[str]) -> None:
    result = runner.invoke(main, args, env={"ZMX_PERF_DIR": None})
    assert result.exit_code == 0, result.output
    for name in ("engine", "orders", "pub"):
        assert name in result.output
    assert "Matching engine throughput" in result.output  # the first line of the script's docstring
    assert "``" not in result.output and "(issue" not in result.output  # read as text, not as reST notes


def test_bench_lists_the_scripts_of_a_perf_dir(runner: CliRunner, perf_dir: Path) -> None:
    result = runner.invoke(main, ["bench", "--perf-dir", str(perf_dir)])
    assert result.exit_code == 0, result.output
    assert "fake" in result.output and "other" in result.output
    assert "engine" not in result.output


def test_bench_lists_when_each_results_file_was_measured(runner: CliRunner, perf_dir: Path) -> None:
    """The run's own time from the results file (a fresh clone's files all have the clone's
    time), or the file's time marked as such when the file has none."""
    (perf_dir / "results").mkdir(exist_ok=True)
    (perf_dir / "results" / "fake.json").write_text(json.dumps({"timestamp": "2026-01-02T03:04:05+00:00"}))
    (perf_dir / "results" / "other.json").write_text("{}")
    result = runner.invoke(main, ["bench", "--perf-dir", str(perf_dir)], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    fake = next(line for line in result.output.splitlines() if " fake " in line)
    other = next(line for line in result.output.splitlines() if " other " in line)
    assert "results/fake.json (2026-01-02 03:04 UTC)" in fake, result.output
    assert "results/other.json (" in other and "(file)" in other, result.output


def test_unknown_scenario_lists_the_available_ones(runner: CliRunner, perf_dir: Path) -> None:
    result = runner.invoke(main, ["bench", "--perf-dir", str(perf_dir), "nope"])
    assert result.exit_code == 2
    assert "unknown scenario 'nope'" in result.stderr
    assert "available: fake, other" in result.stderr
    for name in ("s" * 300, "../fake", "fake.py"):  # (a name too long for a file name was a traceback)
        result = runner.invoke(main, ["bench", "--perf-dir", str(perf_dir), name])
        assert result.exit_code == 2 and "unknown scenario" in result.stderr, (name, result.output)


def test_without_a_perf_dir_says_benchmarks_need_a_checkout(runner: CliRunner, tmp_path: Path) -> None:
    result = runner.invoke(main, ["bench", "--perf-dir", str(tmp_path / "missing"), "list"])
    assert result.exit_code == 1
    assert "source checkout" in result.stderr


# -- running a scenario ---------------------------------------------------------------------------


def test_scenario_runs_with_a_progress_bar_and_its_results_are_plotted(runner: CliRunner, perf_dir: Path) -> None:
    result = runner.invoke(main, ["bench", "--perf-dir", str(perf_dir), "fake", "--n", "7"])
    assert result.exit_code == 0, result.output
    assert "fake benchmark, args: --n 7" in result.stdout  # extra args go to the script
    assert "WARNING: the machine was busy" in result.stderr  # its stderr passes through
    assert "PROGRESS" not in result.output  # the progress lines became the bar
    assert "fake: done" in result.stderr and "3/3" in result.stderr  # (not a terminal: the last state)
    assert "bare loop: 5,000/s" in result.stdout  # the summary rows, with the baseline of the run
    results = perf_dir / "results"
    if not HAVE_MATPLOTLIB:
        assert "matplotlib is not installed" in result.stderr
        return
    for name in ("fake_latency_cdf.png", "fake_throughput.png"):
        png = results / name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert png.stat().st_size < 100_000
        assert f"wrote {png}" in result.stdout


def test_without_matplotlib_the_results_are_still_written(
        runner: CliRunner, perf_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib... raises ImportError
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    result = runner.invoke(main, ["bench", "--perf-dir", str(perf_dir), "fake"])
    assert result.exit_code == 0, result.output
    assert json.loads((perf_dir / "results" / "fake.json").read_text())["benchmark"] == "fake"
    assert "matplotlib is not installed" in result.stderr
    assert not list((perf_dir / "results").glob("*.png"))
    plot = runner.invoke(main, ["bench", "--perf-dir", str(perf_dir), "plot", "fake"])
    assert plot.exit_code == 1
    assert "matplotlib is not installed" in plot.stderr


def test_a_run_without_results_draws_nothing(runner: CliRunner, perf_dir: Path) -> None:
    result = runner.invoke(main, ["bench", "--perf-dir", str(perf_dir), "fake", "--quick"])
    assert result.exit_code == 0, result.output
    assert "no results file written" in result.stdout
    assert not (perf_dir / "results").exists()


def test_a_failing_scenario_fails_zmx_bench(runner: CliRunner, perf_dir: Path) -> None:
    result = runner.invoke(main, ["bench", "--perf-dir", str(perf_dir), "fake", "--fail"])
    assert result.exit_code == 1
    assert "benchmark fake failed (exit status 3)" in result.stderr


# A scenario that works until it is interrupted, then cleans up, as the real ones do; a second
# signal (the SIGTERM zmx bench may send) comes in the middle of its cleanup.
SLOW = textwrap.dedent('''\
    """A scenario that cleans up when interrupted."""
    import os, signal
    from pathlib import Path
    from _common import shielded

    try:
        print("working", flush=True)
        signal.pause()  # the work, until a signal
    finally:
        with shielded():
            os.kill(os.getpid(), signal.SIGTERM)  # held off until the cleanup is done
            Path(__file__).with_name("cleaned").write_text("yes")
''')


def test_an_interrupted_scenario_cleans_up_before_zmx_bench_exits(perf_dir: Path) -> None:
    """A SIGINT to ``zmx bench`` alone (not to its process group) reaches the scenario too, which
    then cleans up; a SIGTERM, as zmx bench sent at once before, killed it with nothing cleaned."""
    shutil.copy(PERF / "_common.py", perf_dir / "_common.py")
    (perf_dir / "bench_slow.py").write_text(SLOW, encoding="utf-8")
    proc = subprocess.Popen([sys.executable, "-m", "zmx.cli", "bench", "--perf-dir", str(perf_dir), "slow"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                            start_new_session=True)
    try:
        assert proc.stdout is not None
        assert select.select([proc.stdout], [], [], 30)[0], "the scenario never started"
        assert proc.stdout.readline() == "working\n"  # the scenario runs
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    finally:
        with contextlib.suppress(ProcessLookupError):  # zmx bench and the scenario, whatever happened
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == 130, err
    assert (perf_dir / "cleaned").read_text() == "yes"
    assert "slow: interrupted" in err and "slow: stopped" in err


@pytest.mark.parametrize("signals", [[signal.SIGINT], [signal.SIGINT, signal.SIGTERM]])
def test_shielded_holds_signals_off_until_the_cleanup_is_done(tmp_path: Path, signals: list[int]) -> None:
    script = tmp_path / "s.py"
    script.write_text(textwrap.dedent(f'''\
        import os, sys
        sys.path.insert(0, {str(PERF)!r})
        from _common import shielded
        with shielded():
            for sig in {[int(s) for s in signals]!r}:
                os.kill(os.getpid(), sig)
            print("cleaned up", flush=True)
        print("not reached", flush=True)
    '''))
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=30)
    assert done.stdout == "cleaned up\n"
    assert done.returncode == -signal.SIGINT  # the first signal, delivered once the block ended
    assert "KeyboardInterrupt" in done.stderr


@pytest.mark.parametrize(("args", "error"), [
    (["engine", "--n", "-5"], "argument --n: must be at least 1, got -5"),
    (["engine", "--repeat", "0"], "argument --repeat: must be at least 1, got 0"),
    (["orders", "--window", "0"], "argument --window: must be at least 1, got 0"),
    (["pub", "--symbols", "10", "0"], "argument --symbols: must be at least 1, got 0"),
    (["fanout", "--high", "nan"], "argument --high: must be a number above 0, got nan"),
    (["soak", "--minutes", "x"], "argument --minutes: 'x' is not a number"),
])
def test_a_benchmark_refuses_counts_and_rates_it_cannot_run(args: list[str], error: str) -> None:
    """Refused before anything runs, in the words of the command that was typed (a negative
    --n once ran, printed a negative rate and wrote it to the committed results file). With
    --quick, so that a benchmark that no longer refused them would write no results file."""
    proc = subprocess.Popen([sys.executable, "-m", "zmx.cli", "bench", *args, "--quick"], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env={k: v for k, v in os.environ.items() if k != "ZMX_PERF_DIR"})
    try:
        _, err = proc.communicate(timeout=60)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == 2  # a usage error, said once (not also as "benchmark ... failed")
    assert f"zmx bench {args[0]}: error: {error}" in err and "failed" not in err, err


@pytest.mark.parametrize(("text", "error"), [("{not json", "not a readable results file"),
                                             ("[1, 2]", "not a results file (a JSON object expected)")])
def test_plot_of_a_broken_results_file_says_so(runner: CliRunner, perf_dir: Path, tmp_path: Path, text: str,
                                               error: str) -> None:
    (tmp_path / "pub.json").write_text(text)
    result = runner.invoke(main, ["bench", "--perf-dir", str(perf_dir), "plot", "pub", "--results", str(tmp_path)])
    assert result.exit_code == 1
    assert f"{tmp_path / 'pub.json'}: {error}" in result.stderr
    assert result.exception is None or isinstance(result.exception, SystemExit)


def test_plot_draws_an_existing_results_file(runner: CliRunner, perf_dir: Path, tmp_path: Path) -> None:
    results = tmp_path / "results"
    results.mkdir()
    missing = runner.invoke(main, ["bench", "--perf-dir", str(perf_dir), "plot", "pub", "--results", str(results)])
    assert missing.exit_code == 1 and "no results file" in missing.stderr
    if not HAVE_MATPLOTLIB:
        pytest.skip("matplotlib is not installed")
    (results / "pub.json").write_text(json.dumps({
        "benchmark": "pub",
        "symbol_counts": {"1": {"zmx": {"publications_per_s": 15_000, "latency_us": {"p50": 6000.0, "p99": 15000.0}}},
                          "10": {"zmx": {"publications_per_s": 14_000, "latency_us": {"p50": 7000.0, "p99": 13000.0}}}},
    }))
    result = runner.invoke(main, ["bench", "--perf-dir", str(perf_dir), "plot", "pub", "--results", str(results)])
    assert result.exit_code == 0, result.output
    assert (results / "pub_throughput.png").is_file()
    assert (results / "pub_latency_cdf.png").is_file()
    assert f"wrote {results / 'pub_throughput.png'}" in result.stdout


# A scenario with plots of its own: ``draw(results)`` at top level, found by plots.py.
OWN = textwrap.dedent('''\
    """A scenario that draws a plot of its own."""
    import json, sys
    from pathlib import Path

    def draw(results):
        figures = json.loads(results.read_text())
        if figures.get("needs") == "matplotlib":
            import matplotlib.not_a_module  # what a draw without matplotlib meets
        if figures.get("needs") == "something else":
            import zmx_no_such_module
        out = results.with_name(results.stem + "_own.png")
        out.write_text(f"curve of {figures['points']} points")
        return [out]

    if __name__ == "__main__":
        sys.exit("not run by plots")
''')


def test_plot_draws_what_a_scenario_draws_itself_and_imports_no_script_without_a_draw(
        runner: CliRunner, perf_dir: Path, tmp_path: Path) -> None:
    (perf_dir / "bench_own.py").write_text(OWN, encoding="utf-8")
    results = tmp_path / "results"
    results.mkdir()
    (results / "own.json").write_text(json.dumps({"benchmark": "own", "points": 12}))
    result = runner.invoke(main, ["bench", "--perf-dir", str(perf_dir), "plot", "own", "--results", str(results)])
    assert result.exit_code == 0, result.output
    assert (results / "own_own.png").read_text() == "curve of 12 points"
    assert f"wrote {results / 'own_own.png'}" in result.stdout
    assert "nothing to plot" not in result.stdout

    # bench_fake.py has no draw, and code at top level: it is not imported (it would print)
    (results / "fake.json").write_text(json.dumps({"benchmark": "fake"}))
    fake = runner.invoke(main, ["bench", "--perf-dir", str(perf_dir), "plot", "fake", "--results", str(results)])
    assert fake.exit_code == 0, fake.output
    assert "fake benchmark" not in fake.output and "nothing to plot" in fake.stdout

    # a draw that needs matplotlib, which is missing: said so, as for the other plots
    (results / "own.json").write_text(json.dumps({"benchmark": "own", "points": 3, "needs": "matplotlib"}))
    missing = runner.invoke(main, ["bench", "--perf-dir", str(perf_dir), "plot", "own", "--results", str(results)])
    assert missing.exit_code == 1
    assert "matplotlib is not installed" in missing.stderr
    # any other import that fails is a bug of the script, not a missing plotting library
    (results / "own.json").write_text(json.dumps({"benchmark": "own", "points": 3, "needs": "something else"}))
    broken = runner.invoke(main, ["bench", "--perf-dir", str(perf_dir), "plot", "own", "--results", str(results)])
    assert isinstance(broken.exception, ModuleNotFoundError)
    assert (results / "own_own.png").read_text() == "curve of 12 points"


# -- plots: what is found in a results file ---------------------------------------------------------


def test_plots_find_latency_percentiles_and_series_over_n() -> None:
    plots = load_perf_module("plots")
    data = {
        "zmx": {"1_matcher": {"orders_per_s": 11_000, "ack_us": {"p50": 18_000.0, "p99": 32_000.0, "max": 40_000.0}},
                "2_matcher": {"orders_per_s": 10_000, "ack_us": {"p50": 19_000.0, "p99": 33_000.0}}},
        "ceiling": {"python_loop": {"round_trips_per_s": 15_000, "ack_us": {"p50": 12_000.0, "p99": 22_000.0}}},
        "fdatasync_us": {"p50": 190.0, "p99": 4600.0},
        "rounds": [{"ack_us": {"p50": 1.0, "p99": 2.0}}],  # lists are rounds: not plotted
    }
    curves = {c.label: c.points for c in plots.latency_curves(data)}
    assert curves["zmx 1 matcher ack"] == [(18.0, 0.5), (32.0, 0.99)]  # ms; max has no place in a CDF
    assert set(curves) == {"zmx 1 matcher ack", "zmx 2 matcher ack", "ceiling python loop ack", "fdatasync"}
    [panel] = plots.throughput_panels(data)
    assert panel.n_label == "matchers"
    assert [(c.label, c.points) for c in panel.lines] == [("orders/s", [(1, 11_000), (2, 10_000)])]
    assert panel.references == [("ceiling python loop round trips/s", 15_000)]


def test_plots_split_a_grid_of_cells_by_its_second_key() -> None:
    plots = load_perf_module("plots")
    cells = [{"n": n, "k": k, "gateway": {"delivered_per_s": n * k}} for k in (1, 10) for n in (500, 5000)]
    panels = plots.throughput_panels({"cells": cells})
    assert [(p.title, p.lines[0].points) for p in panels] == [
        ("cells, k = 1", [(500, 500), (5000, 5000)]), ("cells, k = 10", [(500, 5000), (5000, 50000)])]


def test_the_scenarios_with_plots_of_their_own_are_found() -> None:
    """``zmx bench plot`` draws these from a results file as it draws the generic plots (it drew
    only those before); the others have none, and are not imported to find out."""
    plots = load_perf_module("plots")
    found = {name: plots.scenario_draw(PERF / "results" / f"{name}.json")
             for name in ("engine", "orders", "pub", "fanout", "connections", "hosts", "soak")}
    assert {name for name, draw in found.items() if draw is not None} == {"connections", "hosts", "soak"}
    assert all(draw.__name__ == "draw" and draw.__module__ == f"bench_{name}"
               for name, draw in found.items() if draw is not None)


def test_plots_of_a_file_without_latency_or_series_are_none(tmp_path: Path) -> None:
    plots = load_perf_module("plots")
    path = tmp_path / "engine.json"
    path.write_text(json.dumps({"benchmark": "engine", "engine_ops_per_s": 260_000, "baseline_ops_per_s": 720_000}))
    stale = tmp_path / "engine_latency_cdf.png"
    stale.write_bytes(b"old")
    assert plots.latency_curves(json.loads(path.read_text())) == []
    assert plots.throughput_panels(json.loads(path.read_text())) == []
    assert plots.plot_results(path) == []  # no matplotlib needed when there is nothing to draw
    assert not stale.exists()


# -- the README's table ----------------------------------------------------------------------------

README = f"""\
# project

Some text | with a pipe, and a table of its own:

| a | b |
|---|---|
| 1 | 2 |

## Performance

Latest figures:

{TABLE_START}
| benchmark (results file) | zmx | baseline in the same run | ratio | target | met |
|---|---|---|---|---|---|
| old row | 1 | 2 | | | no |
{TABLE_END}

Where the time goes: elsewhere.
"""


def write_results(directory: Path, name: str, summary: list[dict[str, object]] | None) -> None:
    data: dict[str, object] = {"benchmark": name, "figure": 1}
    if summary is not None:
        data["summary"] = summary
    (directory / f"{name}.json").write_text(json.dumps(data), encoding="utf-8")


def test_report_rebuilds_only_the_table(runner: CliRunner, tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    readme.write_text(README, encoding="utf-8")
    results = tmp_path / "results"
    results.mkdir()
    write_results(results, "pub", [summary_row("`perf/bench_pub.py` (`pub.json`): publications", "15,081/s; 0 gaps",
                                               "the probe: ~125,000/s", "0.12x", "no gaps", True)])
    write_results(results, "engine", [
        summary_row("`perf/bench_engine.py` (`engine.json`): commands", "260,551 ops/s", "bare book: 727,388 ops/s",
                    "0.36x", ">= 0.5x", False),
        summary_row("codec (`engine.json`)", "encode 0.9 us | decode 5.3 us", target="measured")])
    write_results(results, "fanout", None)  # written by a benchmark that has no summary yet

    result = runner.invoke(main, ["bench", "report", "--readme", str(readme), "--results", str(results)])
    assert result.exit_code == 0, result.output
    assert "note:" in result.stderr and "fanout.json has no summary rows" in result.stderr
    text = readme.read_text(encoding="utf-8")
    head, rest = README.split(TABLE_START)
    _, tail = rest.split(TABLE_END)
    assert text.startswith(head + TABLE_START + "\n") and text.endswith(TABLE_END + tail)
    table = text[len(head + TABLE_START + "\n"):-len(TABLE_END + tail)]
    assert table == (
        "| benchmark (results file) | zmx | baseline in the same run | ratio | target | met |\n"
        "|---|---|---|---|---|---|\n"
        "| `perf/bench_engine.py` (`engine.json`): commands | 260,551 ops/s | bare book: 727,388 ops/s | 0.36x "
        "| >= 0.5x | no |\n"
        "| codec (`engine.json`) | encode 0.9 us \\| decode 5.3 us | | | measured | |\n"
        "| `perf/bench_pub.py` (`pub.json`): publications | 15,081/s; 0 gaps | the probe: ~125,000/s | 0.12x "
        "| no gaps | yes |\n")  # engine before pub: the order, not the alphabet

    again = runner.invoke(main, ["bench", "report", "--readme", str(readme), "--results", str(results)])
    assert again.exit_code == 0 and "already up to date" in again.stdout
    assert readme.read_text(encoding="utf-8") == text


def test_report_needs_the_markers(runner: CliRunner, tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    readme.write_text("# project\n\nno table here\n", encoding="utf-8")
    results = tmp_path / "results"
    results.mkdir()
    result = runner.invoke(main, ["bench", "report", "--readme", str(readme), "--results", str(results)])
    assert result.exit_code == 1
    assert TABLE_START in result.stderr
    assert readme.read_text(encoding="utf-8") == "# project\n\nno table here\n"


def test_the_readme_has_the_markers_around_its_table() -> None:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    assert text.count(TABLE_START) == 1 and text.count(TABLE_END) == 1
    table = text.split(TABLE_START)[1].split(TABLE_END)[0]
    assert table.startswith("\n| benchmark (results file) |")


def test_the_readme_table_is_the_one_the_committed_results_give() -> None:
    """A results file committed without ``zmx bench report`` would leave old figures on show."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    table, used, _ = performance_table(PERF / "results")
    assert used, "no results files with summary rows in perf/results"
    assert replace_table(text, table) == text, "the README's table is stale: run `zmx bench report`"


def test_scaling_md_holds_the_arithmetic_of_the_committed_results() -> None:
    """SCALING.md's tables are what ``perf/scaling.py`` computes from perf/results."""
    inputs_table, plan_table = load_perf_module("scaling").tables()
    text = (PERF / "SCALING.md").read_text(encoding="utf-8")
    for marker, table in (("inputs", inputs_table), ("plan", plan_table)):
        written = text.split(f"<!-- scaling:{marker}:start -->\n")[1].split(f"\n<!-- scaling:{marker}:end -->")[0]
        assert written == table, f"SCALING.md's {marker} table is stale: run `.venv/bin/python perf/scaling.py --write`"


# -- summaries and progress lines of the benchmarks ---------------------------------------------------


@pytest.mark.parametrize("name", ["engine", "orders", "pub"])
def test_summary_rows_read_the_results_files_of_this_checkout(name: str) -> None:
    path = PERF / "results" / f"{name}.json"
    if not path.is_file():
        pytest.skip(f"no {path}")
    summaries = load_perf_module("summaries")
    rows = summaries.summarize(name, json.loads(path.read_text(encoding="utf-8")))
    assert rows and all(set(row) == set(summaries.COLUMNS) for row in rows)
    assert f"`{name}.json`" in rows[0]["benchmark"]
    assert "no summary" not in rows[0]["zmx"]


def test_the_fanout_summary_shows_the_feed_alone_and_the_gateways_own_figures_beside_the_p99_at_500() -> None:
    summaries = load_perf_module("summaries")
    cells = [{"k": 1, "p99_ms_at_500_per_process": 6.1, "p99_500_met": False, "moderate_feed_p99_ms": 4.2},
             {"k": 10, "p99_ms_at_500_per_process": 1.0, "p99_500_met": True, "moderate_feed_p99_ms": 0.93}]
    assert summaries.feed_alone(cells) == ("the matcher's feed alone, at a bare SUB in the same rounds: "
                                           "p99 4.2 ms (1 channel), p99 0.93 ms (10 channels)")
    assert summaries.feed_alone([{k: v for k, v in c.items() if k != "moderate_feed_p99_ms"} for c in cells]) == ""
    cells[0].update(moderate_gateway_feed_lag_p99_ms=0.9, moderate_gateway_turn_p99_ms=5.8)
    assert summaries.feed_alone(cells) == ("the matcher's feed alone, at a bare SUB in the same rounds: "
                                           "p99 4.2 ms (1 channel), p99 0.93 ms (10 channels); the gateway's own log: "
                                           "feed lag p99 0.9 ms, fan-out turn p99 5.8 ms (1 channel)")


def test_summary_of_unreadable_figures_says_so() -> None:
    summaries = load_perf_module("summaries")
    [row] = summaries.summarize("pub", {"benchmark": "pub"})
    assert "no summary: KeyError" in row["zmx"]


def test_progress_lines_only_when_zmx_bench_asks(monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    common = load_perf_module("_common")
    monkeypatch.delenv("ZMX_BENCH_PROGRESS", raising=False)
    common.Progress(2).step("quiet")
    assert capsys.readouterr().err == ""
    monkeypatch.setenv("ZMX_BENCH_PROGRESS", "1")
    progress = common.Progress(2)
    progress.step("warm-up")
    run = progress.counted("engine round", lambda: 0.5)
    assert run() == 0.5 and run() == 0.5  # the round's own seconds, unchanged
    assert capsys.readouterr().err.splitlines() == [
        "PROGRESS 1/2 warm-up", "PROGRESS 2/2 engine round 1", "PROGRESS 3/3 engine round 2"]


# -- the hosts benchmark's claims ----------------------------------------------------------------


@pytest.fixture
def hosts(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    monkeypatch.syspath_prepend(str(PERF))  # it imports the other benchmarks, as a script would
    return load_perf_module("bench_hosts")


def scaling_round(g: int, delivered: int, busy: float, lag: float = 1.0) -> dict:
    """One round of bench_hosts' scaling run, with what ``scaling_claim`` reads."""
    return {"run": f"scale-g{g}", "round": "scaling", "gateways": g, "delivered_per_s": delivered,
            "offered_per_s": 700_000 * g, "keep_up": 1.0, "lag_s": lag,
            "cores_while_driven": {"gateways": [0.25] * g, "clients": 0.5 * g, "order_path": 0.2, "relays": 0.02,
                                   "ours": busy, "irq": 0.1, "others": 0.0, "machine": busy},
            "gateway_cpu_us_per_delivered": 0.4, "clients_cpu_us_per_delivered": 0.8,
            "matcher_threads_us_per_published": {"python": 300.0, "zmq_io": 100.0},
            "tcp_mem_pages_at_driven_end": 1000, "tcp_mem_pressure_pages": 400_000}


def test_scaling_claim_met_by_growth_then_a_plateau(hosts: ModuleType) -> None:
    c3 = hosts.scaling_claim([scaling_round(1, 500_000, 0.95), scaling_round(2, 950_000, 1.6),
                              scaling_round(3, 1_400_000, 1.95), scaling_round(4, 1_450_000, 1.97)], 2, 0.25)
    assert c3["met"], c3["verdict"]
    assert [m["owed"] for m in c3["moves"]] == ["grow", "grow", "flat"]


def test_scaling_claim_takes_the_median_round_of_each_gateway_count(hosts: ModuleType) -> None:
    """One disturbed round of a count (here a fast one at G=4, and a slow one at G=2) does not
    decide a step: the round with the median delivered/s does, with its own cores."""
    rounds = [scaling_round(1, 500_000, 0.95), scaling_round(2, 600_000, 1.5), scaling_round(2, 950_000, 1.6),
              scaling_round(2, 980_000, 1.7), scaling_round(3, 1_400_000, 1.95), scaling_round(4, 1_900_000, 1.99),
              scaling_round(4, 1_450_000, 1.97), scaling_round(4, 1_420_000, 1.96)]
    c3 = hosts.scaling_claim(rounds, 2, 0.25)
    assert [s["delivered_per_s"] for s in c3["steps"]] == [500_000, 950_000, 1_400_000, 1_450_000]
    assert c3["steps"][1]["machine_cores_busy"] == 1.6
    assert c3["steps"][3]["rounds_delivered_per_s"] == [1_900_000, 1_450_000, 1_420_000]
    assert c3["met"], c3["verdict"]


def test_scaling_claim_counts_a_fall_past_the_cores_against_it(hosts: ModuleType) -> None:
    """A round that broke down after the cores were used up is no plateau, and the idle cores
    of that broken round do not make the next step owe growth."""
    c3 = hosts.scaling_claim([scaling_round(1, 500_000, 0.95), scaling_round(2, 950_000, 1.6),
                              scaling_round(3, 1_400_000, 1.95), scaling_round(4, 800_000, 1.3, lag=8.0),
                              scaling_round(5, 1_050_000, 1.9)], 2, 0.25)
    assert not c3["met"]
    assert [m["owed"] for m in c3["moves"]] == ["grow", "grow", "flat", "flat"]
    assert "G=3->4 with the cores used up: 0.57x (FELL)" in c3["verdict"]
    assert "G=4->5 with the cores used up: 1.31x (still GREW)" in c3["verdict"]
    assert "G=4 delivered 800,000/s" in c3["verdict"] and "8.0 s after the last order" in c3["verdict"]


def relay_round(run: str, g: int, matcher_us: float, io_us: float, clients: int = 10) -> dict:
    """One moderate round of bench_hosts' runs 1-3, with what ``relay_claim`` reads."""
    return {"run": run, "round": "moderate", "gateways": g, "clients_per_gateway": clients,
            "matcher_cpu_us_per_published": matcher_us, "router_cpu_us_per_order": matcher_us / 2,
            "matcher_threads_us_per_published": {"python": matcher_us - io_us, "zmq_io": io_us}}


def test_relay_claim_wants_no_growth_over_gateways_and_more_cost_per_direct_subscriber(hosts: ModuleType) -> None:
    """Claim (2): a matcher that got cheaper as gateways were added (the machine busier) meets
    it; one that got dearer by more than ``FLAT`` does not, nor one whose I/O thread cost less
    with the gateways straight on it than with two relays at the same gateway count."""
    def claim(over_g: list[float], direct_io: float) -> dict:
        gw = [relay_round(f"g{g}", g, m, 50.0 - 3 * g) for g, m in enumerate(over_g, 1)]
        clients = [gw[0], relay_round("g1-clients20", 1, over_g[0] * 0.95, 45.0, 20)]
        relays2 = [relay_round("r2-g2", 2, 230.0, 60.0), relay_round("r2-g4", 4, 180.0, 41.0)]
        return hosts.relay_claim(gw, clients, relays2, [relay_round("direct-g4", 4, 200.0, direct_io)])

    falling = claim([250.0, 228.0, 198.0, 181.0], 62.0)
    assert falling["met"] and falling["growth_over_gateways"] == 1.0
    assert falling["spread_over_gateways"] > hosts.FLAT  # two-sided, it would have failed
    assert not claim([180.0, 200.0, 230.0, 250.0], 62.0)["met"]  # 1.39x up
    # 4 gateways straight on it against two relays at G = 4 (41 us), not their mean over G (50.5)
    assert claim([250.0, 228.0, 198.0, 181.0], 45.0)["met"]
    assert not claim([250.0, 228.0, 198.0, 181.0], 40.0)["met"]


@pytest.fixture
def fanout(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    monkeypatch.syspath_prepend(str(PERF))
    return load_perf_module("bench_fanout")


def test_a_matcher_fed_ceiling_makes_of_a_publication_the_frames_the_gateway_makes(fanout: ModuleType) -> None:
    """The ceilings fed by the matcher (``--ceiling-feed matcher``) write, for each publication,
    what the gateway writes: a ``trade`` per trade, then a ``depth_update``, each with its event's
    ``ts``; nothing for a heartbeat or a symbol it does not serve."""
    from zmx.codec import encode_publication
    from zmx.events import BookChanged, FeedHeartbeat, TradeOccurred
    from zmx.model import Side, SymbolSpec
    from zmx.protocol import Channel

    symbol = fanout.SYMBOLS[1]
    ts = 1_764_000_000_123_456_789
    trades = [TradeOccurred(symbol, 8, ts + i, 40 + i, 2_999_990 + i, 5, Side.BUY) for i in range(2)]
    publication = [*trades, BookChanged(symbol, 8, ts + 7, (), ((2_999_991, 0), (2_999_995, 20)))]
    gateway = Channel(SymbolSpec(symbol, "0.01", "0.001"))
    gateway.load_snapshot(7, [(2_999_000, 10)], [(2_999_991, 5), (2_999_995, 25)])
    wanted = [(m["type"], m["data"]["ts"]) for m in map(json.loads, gateway.publish(publication))]
    assert wanted == [("trade", ts), ("trade", ts + 1), ("depth_update", ts + 7)]

    server = fanout.CeilingServer("coalesce", 2, fanout.default_examples(), matcher_feed=True)
    channel, frames = server.publication_frames(encode_publication(symbol, publication))
    assert channel == symbol
    made = []
    for frame in frames:
        (opcode, start, end), = fanout.server_frames(frame)
        assert opcode == 1 and end == len(frame)
        message = json.loads(frame[start:end])
        assert message["channel"] == symbol
        made.append((message["type"], message["data"]["ts"]))
    assert made == wanted
    assert server.publication_frames(encode_publication(symbol, [FeedHeartbeat(symbol, 8, ts)])) == (symbol, [])
    other = fanout.SYMBOLS[2]  # not among the 2 channels it serves
    assert server.publication_frames(encode_publication(other, [BookChanged(other, 1, ts, ((5, 1),), ())]))[1] == []
