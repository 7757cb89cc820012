"""What every node process shares: reading its topology file."""

from __future__ import annotations

from os import PathLike

from zmx.exceptions import TopologyError
from zmx.topology import Topology, parse_topology


def load_topology(path: str | PathLike[str]) -> Topology:
    """Read and validate the topology file at ``path``; messages name it as given."""
    source = str(path)
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise TopologyError(f"{source}: cannot read the topology: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise TopologyError(f"{source}: the topology is not UTF-8 text ({e.reason})") from None
    return parse_topology(text, source)
