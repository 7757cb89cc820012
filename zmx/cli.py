"""The ``zmx`` command line.

``zmx check TOPOLOGY`` validates a topology and prints its layout; ``zmx up [TOPOLOGY]``
shows what it would start (the node processes arrive in a later version). A bad topology
is reported on stderr as ``Error: FILE:LINE: problem`` with exit status 2, never a traceback.
"""

from __future__ import annotations

from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

import zmx
from zmx.exceptions import TopologyError
from zmx.node.runtime import load_topology
from zmx.topology import GatewayNode, MatcherNode, RelayNode, RouterNode, Topology

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
            endpoints = [f"front {node.front}", f"back {node.back}"]
            served = [f"heartbeat timeout {node.heartbeat_timeout_ms} ms"]
        elif isinstance(node, MatcherNode):
            endpoints = [f"pub {node.pub}", f"snapshot {node.snapshot}", f"data {node.data_dir}"]
            served = list(topology.symbols_of(node.name)) or ["(no symbols)"]
        elif isinstance(node, RelayNode):
            endpoints = [f"pub {node.pub}"]
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


@main.command()
@click.argument("topology", required=False, type=click.Path(dir_okay=False, path_type=Path))
def up(topology: Path | None) -> None:
    """Run every node of TOPOLOGY on this machine (default: the built-in topology/local.yaml)."""
    if topology is None:
        topology = builtin_topology_path()
        if not topology.is_file():
            raise TopologyFailure(
                f"the built-in topology {topology} is missing (it ships in the zmx source tree, "
                "next to the zmx package); pass a topology file: zmx up TOPOLOGY")
    loaded = _load(topology)
    console = Console(highlight=False)
    console.print(f"cluster {loaded.cluster!r} from {topology}", soft_wrap=True)
    _print_layout(console, loaded)
    for gateway in loaded.nodes_by_role("gateway"):
        assert isinstance(gateway, GatewayNode)
        console.print(f"clients connect to {gateway.url} (gateway {gateway.name})", soft_wrap=True)
    console.print(f"zmx {zmx.__version__} does not start the node processes yet; this is the layout it will run.",
                  soft_wrap=True)


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
    raise SystemExit(run_node(topology, name))


if __name__ == "__main__":
    main(prog_name="zmx")
