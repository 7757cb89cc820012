"""The ``zmx`` command line.

``zmx check TOPOLOGY`` validates a topology and prints its layout; ``zmx up [TOPOLOGY]`` runs
every node of it as a child process and supervises them (``zmx.node.supervisor``); ``zmx node
NAME -t TOPOLOGY`` runs one node in this process; ``zmx probe TARGET`` measures a feed
(``zmx.node.probe``). A bad topology is reported on stderr as ``Error: FILE:LINE: problem``
with exit status 2, never a traceback.
"""

from __future__ import annotations

import time
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

import zmx
from zmx.exceptions import TopologyError, ZmxError
from zmx.node.runtime import load_topology
from zmx.topology import (
    GatewayNode,
    MatcherNode,
    RelayNode,
    RouterNode,
    Topology,
    connect_endpoint,
)

EXIT_BAD_TOPOLOGY = 2


class TopologyFailure(click.ClickException):
    """A topology that cannot be used: ``Error: <message>`` on stderr, exit status 2."""

    exit_code = EXIT_BAD_TOPOLOGY


def builtin_topology_path() -> Path:
    """``topology/local.yaml`` of the source tree zmx runs from (the default of ``zmx up``)."""
    return Path(zmx.__file__).resolve().parent.parent / "topology" / "local.yaml"


def _load(path: Path) -> Topology:
    try:
        return load_topology(path)
    except TopologyError as e:
        raise TopologyFailure(str(e)) from None


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


def _print_layout(console: Console, topology: Topology) -> None:
    console.print(_nodes_table(topology))
    console.print(_symbols_table(topology))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(zmx.__version__, "--version", "-V", prog_name="zmx")
def main() -> None:
    """zmx: a brokerless ZeroMQ exchange cluster."""


@main.command()
@click.argument("topology", type=click.Path(dir_okay=False, path_type=Path))
def check(topology: Path) -> None:
    """Validate TOPOLOGY (a YAML file) and print its layout."""
    loaded = _load(topology)
    console = Console(highlight=False)
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
def up(topology: Path | None, restart: bool, dry_run: bool) -> None:
    """Run every node of TOPOLOGY on this machine (default: the built-in topology/local.yaml).

    Each node is a child process, started matchers first, then routers, relays and gateways;
    each one is up once it says it is serving. Ctrl-C or SIGTERM stops them all (exit 0). A node
    that fails to start, or dies, is reported and the cluster stopped (exit 1), unless --restart.
    Relative data_dirs are resolved against the current directory.
    """
    from zmx.node.supervisor import Supervisor

    topology = _topology_or_builtin(topology)
    loaded = _load(topology)
    supervisor = Supervisor(loaded, topology, restart=restart)
    if dry_run:
        console = Console(highlight=False)
        console.print(f"cluster {loaded.cluster!r} from {topology}", soft_wrap=True)
        _print_layout(console, loaded)
        nodes = supervisor.plan()
        console.print(f"would start {len(nodes)} node(s): {', '.join(n.name for n in nodes)}", soft_wrap=True)
        for gateway in loaded.nodes_by_role("gateway"):
            assert isinstance(gateway, GatewayNode)
            console.print(f"clients connect to {gateway.url} (gateway {gateway.name})", soft_wrap=True)
        return
    raise SystemExit(supervisor.run())


@main.command()
@click.argument("target")
@click.option("-t", "--topology", "topology_path", type=click.Path(dir_okay=False, path_type=Path),
              help="the topology that names TARGET (default: the built-in topology/local.yaml)")
@click.option("--symbol", "-s", "symbols", multiple=True, metavar="SYMBOL",
              help="only this symbol's channel (repeatable; default: everything the target publishes)")
@click.option("--duration", "-d", type=click.FloatRange(min=0, min_open=True), metavar="SECONDS",
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
    console = Console(highlight=False)
    if as_json:
        stats, elapsed = run_probe(endpoint, symbols=symbols, duration=duration, stopper=stopper)
        click.echo(json.dumps({"target": target, "endpoint": endpoint, **stats.summary(elapsed)}))
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
    if stats.decode_errors:
        console.print(f"{stats.decode_errors} frame(s) did not decode; the last: {stats.last_error}", soft_wrap=True)


def _probe_endpoint(target: str, topology_path: Path | None, symbols: tuple[str, ...]) -> str:
    """TARGET as an endpoint to connect a SUB to: itself, or the pub of the node it names."""
    if "://" in target:
        if not target.startswith(("tcp://", "ipc://", "inproc://")):
            raise click.BadParameter(f"{target!r} is not a ZeroMQ endpoint (tcp://host:port or ipc://path) "
                                     "nor a node name", param_hint="'TARGET'")
        return target
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
def node(name: str, topology_path: Path) -> None:
    """Run node NAME of a topology in this process (for a cluster across machines)."""
    from zmx.node.runtime import run_node

    topology = _load(topology_path)
    try:
        topology.node(name)
    except TopologyError as e:
        raise TopologyFailure(str(e)) from None
    try:
        code = run_node(topology, name)
    except (ZmxError, OSError) as e:  # e.g. its port is taken: say so, without a traceback
        raise click.ClickException(f"node {name}: {e}") from None
    raise SystemExit(code)


if __name__ == "__main__":
    main(prog_name="zmx")
