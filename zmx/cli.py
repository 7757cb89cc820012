"""The ``zmx`` command line.

``zmx check TOPOLOGY`` validates a topology and prints its layout; ``zmx up [TOPOLOGY]`` runs
every node of it as a child process and supervises them (``zmx.node.supervisor``); ``zmx node
NAME -t TOPOLOGY`` runs one node in this process; ``zmx probe TARGET`` measures a feed
(``zmx.node.probe``); ``zmx bench SCENARIO`` runs a benchmark of ``perf/`` with a progress bar
and plots its results, ``zmx bench report`` rebuilds the README's performance table from them.
A bad topology is reported on stderr as ``Error: FILE:LINE: problem`` with exit status 2, never
a traceback.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import signal
import sys
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.table import Table

import zmx
from zmx.exceptions import TopologyError, ZmxError
from zmx.node.runtime import READY_TIMEOUT, load_topology, read_topology_text
from zmx.topology import (
    GatewayLimits,
    GatewayNode,
    MatcherNode,
    RelayNode,
    RouterNode,
    Topology,
    connect_endpoint,
    parse_topology,
)

EXIT_BAD_TOPOLOGY = 2


class TopologyFailure(click.ClickException):
    """A topology that cannot be used: ``Error: <message>`` on stderr, exit status 2."""

    exit_code = EXIT_BAD_TOPOLOGY


def builtin_topology_path() -> Path:
    """``topology/local.yaml`` of the source tree zmx runs from (the default of ``zmx up``)."""
    return Path(zmx.__file__).resolve().parent.parent / "topology" / "local.yaml"


@contextlib.contextmanager
def _topology_failure() -> Iterator[None]:
    """A ``TopologyError`` inside, as the CLI says it: one line, exit status 2."""
    try:
        yield
    except TopologyError as e:
        raise TopologyFailure(str(e)) from None


def _load(path: Path) -> Topology:
    with _topology_failure():
        return load_topology(path)


def _console(**options: Any) -> Console:
    """A console that prints what it is given as it is: no rich markup (a topology's
    ``var/[red]m1`` is a path; ``[/x]`` in one was a traceback) and no highlighting."""
    return Console(highlight=False, markup=False, **options)


def _nodes_table(topology: Topology) -> Table:
    table = Table(title=f"cluster {topology.cluster}: nodes", title_justify="left")
    table.add_column("name", no_wrap=True)
    table.add_column("role", no_wrap=True)
    table.add_column("endpoints", no_wrap=True)
    table.add_column("symbols / upstream")
    for node in topology.nodes.values():
        if isinstance(node, RouterNode):
            endpoints = [f"{key} {endpoint}" for key, endpoint in node.endpoints]
            served = [f"heartbeat timeout {node.heartbeat_timeout_ms} ms"]
        elif isinstance(node, MatcherNode):
            endpoints = [f"{key} {endpoint}" for key, endpoint in node.endpoints] + [f"data {node.data_dir}"]
            served = list(topology.symbols_of(node.name)) or ["(no symbols)"]
        elif isinstance(node, RelayNode):
            endpoints = [f"{key} {endpoint}" for key, endpoint in node.endpoints]
            served = [f"upstream {', '.join(node.upstream)}"]
        else:
            assert isinstance(node, GatewayNode)
            workers = f" ({node.workers} workers)" if node.workers > 1 else ""
            endpoints = [f"listen {node.url}{workers}"]
            served = [f"upstream {', '.join(node.upstream)}"]
            if node.standby:
                served.append(f"standby {', '.join(node.standby)}")
        table.add_row(node.name, node.role, "\n".join(endpoints), "\n".join(served))
    return table


def _symbols_table(topology: Topology) -> Table:
    table = Table(title=f"cluster {topology.cluster}: symbols", title_justify="left")
    for column in ("symbol", "owner", "tick", "lot", "min", "max"):
        table.add_column(column, no_wrap=True)
    for name, spec in topology.symbols.items():
        described = spec.describe()
        maximum = "-" if spec.max_quantity is None else described["max_quantity"]
        table.add_row(name, topology.owner_of(name), described["tick_size"], described["lot_size"],
                      described["min_quantity"], maximum)
    return table


# Each gateway limit (zmx.topology.GatewayLimits) as the limits table shows it: topology key, unit.
_LIMIT_UNITS = (("max_message_bytes", "bytes"), ("send_queue_bytes", "bytes"), ("slow_consumer_ms", "ms"),
                ("rate_limit_per_s", "/s"), ("ping_interval_s", "s"), ("ping_timeout_s", "s"), ("heartbeat_s", "s"),
                ("handshake_timeout_s", "s"), ("order_timeout_s", "s"))


def _limit_text(value: int, unit: str) -> str:
    if unit == "/s":
        return f"{value}/s"
    if unit != "bytes":
        return f"{value} {unit}"
    for size, name in ((1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")):
        if value % size == 0:
            return f"{value // size} {name}"
    return f"{value} B"


def _limits_table(topology: Topology) -> Table:
    """What each gateway allows its clients (its ``limits``, the defaults where it sets none)."""
    gateways = [node for node in topology.nodes_by_role("gateway") if isinstance(node, GatewayNode)]
    defaults = GatewayLimits()
    changed = any(node.limits != defaults for node in gateways)
    table = Table(title=f"cluster {topology.cluster}: gateway limits", title_justify="left",
                  caption="* not the default" if changed else "all the defaults", caption_justify="left")
    table.add_column("limits:", no_wrap=True)
    for node in gateways:
        table.add_column(node.name, no_wrap=True)
    for key, unit in _LIMIT_UNITS:
        default = getattr(defaults, key)
        cells = [getattr(node.limits, key) for node in gateways]
        table.add_row(key, *(_limit_text(value, unit) + (" *" if value != default else "") for value in cells))
    return table


def _print_layout(console: Console, topology: Topology) -> None:
    console.print(_nodes_table(topology))
    console.print(_symbols_table(topology))
    if topology.nodes_by_role("gateway"):
        console.print(_limits_table(topology))
    for matcher in topology.nodes_by_role("matcher"):
        if not topology.symbols_of(matcher.name):  # valid (a spare), but more often a slip in an owner's name
            click.echo(f"warning: matcher {matcher.name!r} owns no symbol and would run idle (a symbol names its "
                       f"owner with `matcher: {matcher.name}`)", err=True)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(zmx.__version__, "--version", "-V", prog_name="zmx")
def main() -> None:
    """zmx: a brokerless ZeroMQ exchange cluster."""


@main.command()
@click.argument("topology", type=click.Path(dir_okay=False, path_type=Path))
def check(topology: Path) -> None:
    """Validate TOPOLOGY (a YAML file) and print its layout."""
    loaded = _load(topology)
    console = _console()
    counts = ", ".join(f"{len(loaded.nodes_by_role(role))} {role}(s)"
                       for role in ("router", "matcher", "relay", "gateway") if loaded.nodes_by_role(role))
    console.print(f"{topology}: cluster {loaded.cluster!r} is valid: {counts}, {len(loaded.symbols)} symbol(s)",
                  soft_wrap=True)
    _print_layout(console, loaded)


def _topology_or_builtin(topology: Path | None) -> Path:
    if topology is not None:
        return topology
    path = builtin_topology_path()
    if not path.is_file():
        raise TopologyFailure(
            f"the built-in topology {path} is missing (it ships in the zmx source tree, "
            "next to the zmx package); pass a topology file: zmx up TOPOLOGY")
    return path


@main.command()
@click.argument("topology", required=False, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--restart", is_flag=True, help="restart a node that dies (backoff 0.5 s doubling to 10 s) "
                                              "instead of stopping the cluster")
@click.option("--dry-run", is_flag=True, help="print the layout and what would start; start nothing")
@click.option("--ready-timeout", type=click.FloatRange(min=2, max=3600), default=READY_TIMEOUT,
              show_default=True, metavar="SECONDS", callback=lambda _ctx, _param, value: _finite(value),
              help="how long a node may go without being ready or saying that its start goes on (a matcher "
              "replaying its journal says so every second)")
def up(topology: Path | None, restart: bool, dry_run: bool, ready_timeout: float) -> None:
    """Run every node of TOPOLOGY on this machine (default: the built-in topology/local.yaml).

    Each node is a child process, started matchers first, then routers, relays and gateways;
    each one is up once it says it is serving. Ctrl-C or SIGTERM stops them all (exit 0). A node
    that fails to start, or dies, is reported and the cluster stopped (exit 1); once the whole
    cluster is up, --restart restarts a node that dies instead. Restarted nodes run the topology
    as it was when zmx up started.
    Relative data_dirs are resolved against the current directory.
    """
    from zmx.node.supervisor import Supervisor, where_to_connect

    topology = _topology_or_builtin(topology)
    with _topology_failure():
        text = read_topology_text(topology)
        loaded = parse_topology(text, str(topology))
    supervisor = Supervisor(loaded, topology, topology_text=text, restart=restart, ready_timeout=ready_timeout)
    if dry_run:
        console = _console()
        console.print(f"cluster {loaded.cluster!r} from {topology}", soft_wrap=True)
        _print_layout(console, loaded)
        nodes = supervisor.plan()
        console.print(f"would start {len(nodes)} node(s): {', '.join(n.name for n in nodes)}", soft_wrap=True)
        for gateway in loaded.nodes_by_role("gateway"):
            assert isinstance(gateway, GatewayNode)
            console.print(where_to_connect(gateway), soft_wrap=True)
        return
    raise SystemExit(supervisor.run())


@main.command()
@click.argument("target")
@click.option("-t", "--topology", "topology_path", type=click.Path(dir_okay=False, path_type=Path),
              help="the topology that names TARGET (default: the built-in topology/local.yaml)")
@click.option("--symbol", "-s", "symbols", multiple=True, metavar="SYMBOL",
              help="only this symbol's channel (repeatable; default: everything the target publishes)")
@click.option("--duration", "-d", type=click.FloatRange(min=0, min_open=True), metavar="SECONDS",
              callback=lambda _ctx, _param, value: _finite(value),
              help="stop after this many seconds (default: at Ctrl-C)")
@click.option("--json", "as_json", is_flag=True, help="print one JSON summary at the end, no live table")
def probe(target: str, topology_path: Path | None, symbols: tuple[str, ...], duration: float | None,
          as_json: bool) -> None:
    """Measure the feed of TARGET: a node of the topology (a matcher or a relay) or an endpoint.

    Shows messages/s, bytes/s, per-symbol seq and gaps, and publish-to-receive latency
    (p50/p99, from the events' ts_ns) every second, then a summary.
    """
    import json

    from rich.live import Live

    from zmx.node.probe import (
        Interval,
        ProbeStats,
        interval_table,
        run_probe,
        subscriptions,
        summary_table,
    )
    from zmx.node.runtime import Stopper

    endpoint = _probe_endpoint(target, topology_path, symbols)
    try:
        subscriptions(symbols)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="'--symbol'") from None
    stopper = Stopper().install()
    console = _console()
    if as_json:
        stats, elapsed = run_probe(endpoint, symbols=symbols, duration=duration, stopper=stopper)
        click.echo(json.dumps({"target": target, "endpoint": endpoint, **stats.summary(elapsed)}))
        _nothing_arrived(stats, endpoint, elapsed)
        return
    waiting = f"probe {target} ({endpoint}): waiting for the first second of data; Ctrl-C stops"
    with Live(waiting, console=console, auto_refresh=False, transient=False) as live:
        started = time.monotonic()

        def show(report: Interval, stats: ProbeStats) -> None:
            live.update(interval_table(target, report, stats, time.monotonic() - started), refresh=True)

        stats, elapsed = run_probe(endpoint, symbols=symbols, duration=duration, stopper=stopper,
                                   on_interval=show)
    if not console.is_terminal:
        console.line()  # Live ends its last render with a newline only on a terminal
    console.print(summary_table(f"{target} ({endpoint})", stats.summary(elapsed)))
    if stats.decode_errors and stats.messages:  # (with none, _nothing_arrived says it)
        console.print(f"{stats.decode_errors} frame(s) did not decode; the last: {stats.last_error}", soft_wrap=True)
    _nothing_arrived(stats, endpoint, elapsed)


def _nothing_arrived(stats: Any, endpoint: str, elapsed: float) -> None:
    """Say so on stderr, and exit 1, when a probe heard nothing it could read: ZeroMQ connects
    in silence, so an endpoint where nobody publishes looks just like a quiet feed, and a script
    that runs ``zmx probe --duration S`` to check a feed must be able to tell. Frames that all
    failed to decode are another publisher's, not a quiet zmx feed: said so."""
    if stats.messages:
        return
    if stats.decode_errors:
        click.echo(f"zmx probe: {stats.decode_errors} frame(s) arrived from {endpoint} in {elapsed:.1f} s and none "
                   f"was a zmx publication (the last: {stats.last_error}): is it a zmx matcher or relay?", err=True)
    else:
        click.echo(f"zmx probe: nothing arrived from {endpoint} in {elapsed:.1f} s; a matcher or relay sends each "
                   "idle symbol's heartbeat about every second: is one publishing there (and owning the symbols "
                   "asked for)?", err=True)
    raise SystemExit(1)


def _finite(value: float | None) -> float | None:
    """A number option's value, refused if it is not finite (``FloatRange`` lets nan through)."""
    if value is not None and not math.isfinite(value):
        raise click.BadParameter(f"{value} is not a number of seconds")
    return value


def _probe_endpoint(target: str, topology_path: Path | None, symbols: tuple[str, ...]) -> str:
    """TARGET as an endpoint to connect a SUB to: itself, or the pub of the node it names."""
    if "://" in target:
        if not target.startswith(("tcp://", "ipc://")):
            raise click.BadParameter(f"{target!r} is not a ZeroMQ endpoint (tcp://host:port or ipc://path) "
                                     "nor a node name", param_hint="'TARGET'")
        import zmq

        context = zmq.Context()
        try:
            with context.socket(zmq.SUB) as sub:
                sub.linger = 0
                sub.connect(connect_endpoint(target))  # what ZeroMQ makes of it: tcp://bad has no port, for one
        except TopologyError as e:
            raise click.BadParameter(f"{target!r}: {e}", param_hint="'TARGET'") from None
        except zmq.ZMQError as e:
            raise click.BadParameter(f"{target!r}: {zmq.strerror(e.errno)} (expected tcp://host:port or ipc://path)",
                                     param_hint="'TARGET'") from None
        finally:
            context.term()
        return connect_endpoint(target)  # tcp://*:5560 -> tcp://127.0.0.1:5560, as for a node's pub
    loaded = _load(_topology_or_builtin(topology_path))
    try:
        node = loaded.node(target)
    except TopologyError as e:
        raise click.BadParameter(str(e), param_hint="'TARGET'") from None
    if not isinstance(node, (MatcherNode, RelayNode)):
        publishers = [n.name for n in loaded.nodes.values() if isinstance(n, (MatcherNode, RelayNode))]
        raise click.BadParameter(f"node {target!r} is a {node.role}; it publishes nothing. Probe a matcher or a "
                                 f"relay ({', '.join(publishers)}) or a tcp:// endpoint", param_hint="'TARGET'")
    behind = set(loaded.matchers_behind(node.name))
    published = {s for s, owner in loaded.owners.items() if owner in behind}
    for symbol in symbols:
        if symbol not in published:
            raise click.BadParameter(f"node {target!r} does not publish {symbol!r} "
                                     f"(it publishes: {', '.join(sorted(published)) or 'nothing'})",
                                     param_hint="'--symbol'")
    return connect_endpoint(node.pub)


@main.command()
@click.argument("name")
@click.option("-t", "--topology", "topology_path", required=True,
              type=click.Path(dir_okay=False, path_type=Path), help="the cluster's topology file")
@click.option("--topology-on-stdin", is_flag=True, hidden=True,
              help="read the topology's text on standard input; -t names it in messages (zmx up's nodes)")
def node(name: str, topology_path: Path, topology_on_stdin: bool) -> None:
    """Run node NAME of a topology in this process (for a cluster across machines)."""
    from zmx.node.runtime import MAX_TOPOLOGY_BYTES, run_node

    if topology_on_stdin:
        with _topology_failure():
            topology = parse_topology(sys.stdin.read(MAX_TOPOLOGY_BYTES + 1), str(topology_path))
    else:
        topology = _load(topology_path)
    with _topology_failure():
        topology.node(name)
    try:
        code = run_node(topology, name)
    except (ZmxError, OSError) as e:  # e.g. its port is taken: say so, without a traceback
        raise click.ClickException(f"node {name}: {e}") from None
    raise SystemExit(code)


# -- zmx bench -------------------------------------------------------------------------------------

PERF_DIR_ENV = "ZMX_PERF_DIR"
PROGRESS_ENV = "ZMX_BENCH_PROGRESS"  # as in perf/_common.py: the benchmark then prints PROGRESS lines
PROG_ENV = "ZMX_BENCH_PROG"  # as in perf/_common.py: the benchmark's usage line names this command
PROGRESS_LINE = re.compile(r"PROGRESS (\d+)/(\d+)(?: (.*))?")
SCENARIO_ORDER = ("engine", "orders", "pub", "fanout", "connections", "hosts")  # the issue's; others follow
BENCH_COMMANDS = ("list", "plot", "report")
TABLE_START, TABLE_END = "<!-- perf-table:start -->", "<!-- perf-table:end -->"
TABLE_COLUMNS = ("benchmark", "zmx", "baseline", "ratio", "target", "met")
TABLE_HEAD = ("| benchmark (results file) | zmx | baseline in the same run | ratio | target | met |\n"
              "|---|---|---|---|---|---|")


def default_perf_dir() -> Path:
    """``perf/`` of the source tree zmx runs from (the package installed editable from a checkout)."""
    return Path(zmx.__file__).resolve().parent.parent / "perf"


def _perf_dir(ctx: click.Context, required: bool = True) -> Path:
    """``zmx bench --perf-dir`` (or ``ZMX_PERF_DIR``), else the checkout's ``perf/``."""
    chosen = ctx.params.get("perf_dir") or os.environ.get(PERF_DIR_ENV)
    path = Path(chosen) if chosen else default_perf_dir()
    if required and not path.is_dir():
        raise click.ClickException(
            f"no benchmarks at {path}: they run from a source checkout of zmx (clone it, then "
            "pip install -e '.[bench]' in it), not from an installed package; or pass --perf-dir DIR")
    return path


def _order(name: str) -> tuple[int, str]:
    return (SCENARIO_ORDER.index(name) if name in SCENARIO_ORDER else len(SCENARIO_ORDER), name)


SCENARIO_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")


def scenarios(perf_dir: Path) -> list[str]:
    """The scenarios of a perf directory: one per ``bench_NAME.py`` (NAME: ``SCENARIO_NAME``)."""
    names = [p.stem.removeprefix("bench_") for p in perf_dir.glob("bench_*.py")]
    return sorted((n for n in names if n not in BENCH_COMMANDS and SCENARIO_NAME.fullmatch(n)), key=_order)


def _describe(script: Path) -> str:
    """The first paragraph of a benchmark script's docstring, on one line."""
    import ast

    try:
        doc = ast.get_docstring(ast.parse(script.read_text(encoding="utf-8"))) or ""
    except (OSError, SyntaxError, ValueError):
        return ""
    first = doc.split("\n\n")[0].replace("\n", " ")
    # for the reader of a table: no reST literals, no note of the issue it was built for
    return re.sub(r"\s*\(issues? [0-9, and]+\)", "", re.sub(r"``([^`]+)``", r"\1", first))


class BenchGroup(click.Group):
    """``zmx bench list | plot | report`` and one command per ``perf/bench_NAME.py``."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        perf_dir = _perf_dir(ctx, required=False)
        return [*(scenarios(perf_dir) if perf_dir.is_dir() else []), *sorted(self.commands)]

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in self.commands:
            return self.commands[cmd_name]
        if not SCENARIO_NAME.fullmatch(cmd_name):  # (a name too long for a file was a traceback)
            return None
        perf_dir = _perf_dir(ctx, required=False)
        script = perf_dir / f"bench_{cmd_name}.py"
        return _scenario_command(cmd_name, script) if script.is_file() else None

    def resolve_command(self, ctx: click.Context,
                        args: list[str]) -> tuple[str | None, click.Command | None, list[str]]:
        name = args[0]
        if not name.startswith("-") and self.get_command(ctx, name) is None:
            perf_dir = _perf_dir(ctx)
            known = ", ".join(scenarios(perf_dir)) or "none"
            raise click.UsageError(f"unknown scenario {name!r}; available: {known} "
                                   f"(a scenario is a {perf_dir}/bench_NAME.py)", ctx)
        return super().resolve_command(ctx, args)


@main.group(cls=BenchGroup, invoke_without_command=True)
@click.option("--perf-dir", type=click.Path(file_okay=False, path_type=Path), envvar=PERF_DIR_ENV,
              help=f"the benchmarks' directory (default: perf/ of this checkout; env {PERF_DIR_ENV})")
@click.option("--no-plot", is_flag=True, help="after a benchmark, do not draw its plots")
@click.pass_context
def bench(ctx: click.Context, perf_dir: Path | None, no_plot: bool) -> None:
    """Run a benchmark of perf/ (SCENARIO [ARGS]...), list them, plot or report their results.

    zmx bench SCENARIO [ARGS]... runs perf/bench_SCENARIO.py with this Python and ARGS
    (e.g. --quick; --help shows the benchmark's own options) with a progress bar, then
    draws the plots of perf/results/SCENARIO.json and shows its summary rows (the figure
    and the baseline measured in the same run). zmx bench report puts the summary rows of
    every results file into the README's performance table.
    """
    if ctx.invoked_subcommand is None:
        ctx.invoke(bench_list)


@bench.command("list")
@click.pass_context
def bench_list(ctx: click.Context) -> None:
    """List the scenarios (perf/bench_*.py) and their results files."""
    perf_dir = _perf_dir(ctx.parent or ctx)
    table = Table(title=f"benchmarks in {perf_dir}", title_justify="left")
    for column in ("scenario", "what it measures", "results file"):
        table.add_column(column)
    for name in scenarios(perf_dir):
        results = perf_dir / "results" / f"{name}.json"
        table.add_row(name, _describe(perf_dir / f"bench_{name}.py"),
                      f"results/{results.name} ({_run_at(results)})" if results.is_file() else "-")
    _console().print(table)
    click.echo("run one: zmx bench SCENARIO [--quick]; then zmx bench report updates the README's table")


def _run_at(results: Path) -> str:
    """When the run behind a results file happened: its ``timestamp`` (a checkout's files are
    all as old as the clone), else the file's own time."""
    try:
        stamp = json.loads(results.read_text(encoding="utf-8")).get("timestamp")
        return datetime.fromisoformat(stamp).astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    except (OSError, ValueError, TypeError, AttributeError):
        return time.strftime("%Y-%m-%d %H:%M", time.localtime(results.stat().st_mtime)) + " (file)"


def _scenario_command(name: str, script: Path) -> click.Command:
    @click.command(name=name, help=_describe(script) + " (ARGS go to the benchmark; --help shows them)",
                   add_help_option=False,
                   context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
    @click.argument("args", nargs=-1, type=click.UNPROCESSED)
    @click.pass_context
    def run(ctx: click.Context, args: tuple[str, ...]) -> None:
        group = ctx.parent or ctx
        perf_dir = _perf_dir(group)
        results = perf_dir / "results" / f"{name}.json"
        before = results.stat().st_mtime_ns if results.is_file() else None
        code = _run_benchmark(name, script, list(args))
        if code == 2:  # argparse's usage error: the script said what is wrong; nothing ran
            raise SystemExit(2)
        if code != 0:
            raise click.ClickException(f"benchmark {name} failed (exit status {code})" if code > 0 else
                                       f"benchmark {name} was killed by signal {-code}")
        if not results.is_file() or results.stat().st_mtime_ns == before:
            if "--help" not in args and "-h" not in args:
                click.echo(f"{name}: no results file written (a --quick run writes none), so no plots")
            return
        rows = _load_results(results).get("summary")
        if rows:
            _console().print(_summary_table(f"{name}: summary", rows))
        if not group.params.get("no_plot"):
            _plot(perf_dir, results, strict=False)

    return run


def _run_benchmark(name: str, script: Path, args: list[str]) -> int:
    """Run ``script`` with this interpreter; its ``PROGRESS done/total label`` lines (stderr) drive
    a progress bar, everything else passes through to our stdout / stderr. The exit status."""
    import queue
    import subprocess
    import threading

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    console = _console(stderr=True)
    env = {**os.environ, PROGRESS_ENV: "1", PROG_ENV: f"zmx bench {name}", "PYTHONUNBUFFERED": "1"}
    if console.is_terminal and "COLUMNS" not in os.environ:
        env["COLUMNS"] = str(console.width)  # the benchmark's own tables at our width
    proc = subprocess.Popen([sys.executable, str(script), *args], cwd=script.parent.parent, env=env,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, errors="replace", bufsize=1)
    lines: queue.Queue[tuple[bool, str | None]] = queue.Queue()

    def read(stream: Any, is_err: bool) -> None:
        for line in stream:
            lines.put((is_err, line))
        lines.put((is_err, None))

    readers = [threading.Thread(target=read, args=(stream, is_err), daemon=True)
               for stream, is_err in ((proc.stdout, False), (proc.stderr, True))]
    for reader in readers:
        reader.start()
    bar = Progress(SpinnerColumn(), TextColumn("{task.description}", markup=False), BarColumn(), MofNCompleteColumn(),
                   TimeElapsedColumn(), console=console, redirect_stdout=sys.stdout.isatty())
    try:
        with bar:
            task = bar.add_task(f"{name}: starting", total=None)
            open_streams = 2
            while open_streams:
                is_err, line = lines.get()
                if line is None:
                    open_streams -= 1
                    continue
                progress = PROGRESS_LINE.fullmatch(line.rstrip("\r\n")) if is_err else None
                if progress:
                    done, total, label = progress.groups()
                    bar.update(task, completed=int(done), total=int(total), description=f"{name}: {label or ''}")
                else:
                    out = sys.stderr if is_err else sys.stdout
                    out.write(line)
                    out.flush()
            code = proc.wait()
            if bar.tasks[0].total is None:  # no PROGRESS line (e.g. --help): leave no empty bar behind
                bar.remove_task(task)
            elif code == 0:
                bar.update(task, description=f"{name}: done")
    except KeyboardInterrupt:
        code = 130
    finally:
        if proc.poll() is None:
            _stop_benchmark(name, proc, console)
    if code == 130:
        raise SystemExit(130)
    return code


BENCH_STOP_S = (60.0, 10.0)  # after SIGINT, after SIGTERM; then SIGKILL


def _stop_benchmark(name: str, proc: Any, console: Console) -> None:
    """Stop an interrupted benchmark and let it clean up: it stops its processes and removes
    its temporary directory on SIGINT (as after a Ctrl-C, which reaches it too), with signals
    held off meanwhile (``_common.shielded``). SIGTERM if it has not stopped ``BENCH_STOP_S[0]``
    seconds later, SIGKILL after ``BENCH_STOP_S[1]`` more; a second Ctrl-C moves on at once."""
    import subprocess

    console.print(f"{name}: interrupted; waiting for it to stop its processes and remove its temporary files "
                  "(Ctrl-C again to hurry it)")
    for sig, wait in ((signal.SIGINT, BENCH_STOP_S[0]), (signal.SIGTERM, BENCH_STOP_S[1]), (signal.SIGKILL, None)):
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)
        try:
            proc.wait(timeout=wait)
            break
        except subprocess.TimeoutExpired:
            continue
        except KeyboardInterrupt:
            if sig == signal.SIGKILL:
                proc.wait()
            continue
    if proc.returncode == -signal.SIGKILL:
        console.print(f"{name}: killed; its processes or temporary files may be left behind")
    else:
        console.print(f"{name}: stopped")


def _load_results(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise click.ClickException(f"{path}: not a readable results file ({e})") from None
    if not isinstance(data, dict):
        raise click.ClickException(f"{path}: not a results file (a JSON object expected)")
    return data


def _cell(value: Any) -> str:
    if value is True:
        return "yes"
    if value is False:
        return "no"
    return "" if value is None else str(value).replace("\n", " ").replace("|", "\\|")


def _summary_table(title: str, rows: list[dict[str, Any]]) -> Table:
    table = Table(title=title, title_justify="left")
    for column in ("benchmark", "zmx", "baseline in the same run", "ratio", "target", "met"):
        table.add_column(column)
    for row in rows:
        table.add_row(*(_cell(row.get(c)).replace("\\|", "|") for c in TABLE_COLUMNS))
    return table


def _plot(perf_dir: Path, results: Path, strict: bool) -> None:
    """Draw the plots of ``results`` with ``perf/plots.py``; without matplotlib, an error if
    ``strict``, else a note (the results file is written either way)."""
    import importlib.util

    source = perf_dir / "plots.py"
    spec = importlib.util.spec_from_file_location("zmx_perf_plots", source)
    if spec is None or spec.loader is None or not source.is_file():
        message = f"no {source}: no plots"
        if strict:
            raise click.ClickException(message)
        click.echo(message, err=True)
        return
    plots = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = plots  # dataclasses look their module up
    spec.loader.exec_module(plots)
    try:
        written = plots.plot_results(results)
    except plots.PlotsUnavailable as e:
        if strict:
            raise click.ClickException(str(e)) from None
        click.echo(f"note: {e}", err=True)
        return
    for path in written:
        click.echo(f"wrote {path}")
    if not written:
        click.echo(f"{results.name}: no latency percentiles or series over N in it, nothing to plot")


@bench.command("plot")
@click.argument("scenario")
@click.option("--results", "results_dir", type=click.Path(file_okay=False, path_type=Path),
              help="the results directory (default: perf/results)")
@click.pass_context
def bench_plot(ctx: click.Context, scenario: str, results_dir: Path | None) -> None:
    """Draw the plots of an existing results file (RESULTS/SCENARIO.json) next to it."""
    perf_dir = _perf_dir(ctx.parent or ctx)
    results_dir = results_dir or perf_dir / "results"
    results = results_dir / f"{scenario}.json"
    if not results.is_file():
        have = ", ".join(sorted((p.stem for p in results_dir.glob("*.json")), key=_order)) or "none"
        raise click.ClickException(f"no results file {results} (results files: {have})")
    _load_results(results)  # a clear error for a file that is not a results file
    _plot(perf_dir, results, strict=True)


def performance_table(results_dir: Path) -> tuple[str, list[str], list[str]]:
    """The README's performance table from the ``summary`` rows of every results file, in the
    issue's order of the scenarios: (table, files in it, files without summary rows, left out)."""
    lines, used, left_out = [TABLE_HEAD], [], []
    for path in sorted(results_dir.glob("*.json"), key=lambda p: _order(p.stem)):
        rows = _load_results(path).get("summary")
        if not isinstance(rows, list) or not rows:
            left_out.append(path.name)
            continue
        used.append(path.name)
        for row in rows:
            cells = [_cell(row.get(column)) for column in TABLE_COLUMNS] if isinstance(row, dict) else [_cell(row)]
            lines.append("|" + "|".join(f" {cell} " if cell else " " for cell in cells) + "|")
    return "\n".join(lines), used, left_out


def replace_table(text: str, table: str, where: str = "README") -> str:
    """``text`` with what lies between the performance table's markers replaced by ``table``."""
    if text.count(TABLE_START) != 1 or text.count(TABLE_END) != 1 or text.index(TABLE_START) > text.index(TABLE_END):
        raise click.ClickException(f"{where}: expected one {TABLE_START} line and, after it, one {TABLE_END} "
                                   "line around the performance table")
    head, rest = text.split(TABLE_START)
    _, tail = rest.split(TABLE_END)
    return f"{head}{TABLE_START}\n{table}\n{TABLE_END}{tail}"


@bench.command("report")
@click.option("--readme", type=click.Path(dir_okay=False, path_type=Path),
              help="the README to update (default: README.md of the checkout)")
@click.option("--results", "results_dir", type=click.Path(file_okay=False, path_type=Path),
              help="the results directory (default: perf/results)")
@click.pass_context
def bench_report(ctx: click.Context, readme: Path | None, results_dir: Path | None) -> None:
    """Regenerate the README's performance table from the results files' summary rows.

    Only the lines between <!-- perf-table:start --> and <!-- perf-table:end --> change.
    """
    if readme is None or results_dir is None:
        perf_dir = _perf_dir(ctx.parent or ctx)
        readme = readme or perf_dir.parent / "README.md"
        results_dir = results_dir or perf_dir / "results"
    if not results_dir.is_dir():
        raise click.ClickException(f"no results directory {results_dir}")
    try:
        text = readme.read_text(encoding="utf-8")
    except OSError as e:
        raise click.ClickException(f"{readme}: {e.strerror or e}") from None
    table, used, left_out = performance_table(results_dir)
    for name in left_out:
        click.echo(f"note: {results_dir / name} has no summary rows (its benchmark writes none yet); "
                   "not in the table", err=True)
    updated = replace_table(text, table, str(readme))
    files = ", ".join(used) or "no results files"
    if updated == text:
        click.echo(f"{readme}: performance table already up to date ({files})")
        return
    tmp = readme.with_name(readme.name + ".tmp")
    tmp.write_text(updated, encoding="utf-8")
    tmp.replace(readme)
    click.echo(f"{readme}: performance table regenerated from {files}")


if __name__ == "__main__":
    main(prog_name="zmx")
