"""Topology: one YAML file describes a cluster; every node is started from it by name.

``parse_topology(text, source)`` turns the YAML text into a validated, frozen ``Topology``
and does no I/O (``zmx.node.runtime.load_topology(path)`` reads a file and hands it over). A topology that
breaks a rule is refused with a ``TopologyError`` whose message names the file, the line
and the problem, like ``topology/local.yaml:7: node 'm3': unknown role 'matchr' (expected
one of: gateway, matcher, relay, router)``. Only the first problem is reported.

Numbers: the YAML loader resolves no floats. ``tick_size: 0.01`` stays the string
``"0.01"`` exactly as written (a float would be ``0.01000000000000000020816...``), and
integers are only the plain decimal ones (``010`` is not octal 8 and ``0x10`` is not 16:
both stay strings), so a decimal field is always exactly the text in the file.

Layout of the file::

    cluster: local
    symbols:
      BTC-USDT: {matcher: m1, tick_size: "0.01", lot_size: "0.00001"}
    nodes:
      r1: {role: router, front: "tcp://127.0.0.1:5550", back: "tcp://127.0.0.1:5551"}
      m1: {role: matcher, pub: "tcp://127.0.0.1:5560", snapshot: "tcp://127.0.0.1:5561", data_dir: "var/m1"}
      g1: {role: gateway, listen: "127.0.0.1:8765"}

The node dataclasses below document every key of every role and its default.
"""

from __future__ import annotations

import posixpath
import re
from collections.abc import Hashable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, ClassVar, Literal

import yaml
from yaml.constructor import ConstructorError
from yaml.nodes import MappingNode
from yaml.nodes import Node as YamlNode
from yaml.reader import ReaderError

from zmx.exceptions import InvalidNumber, TopologyError
from zmx.model import SymbolSpec

__all__ = [
    "FSYNC_MODES",
    "ROLES",
    "SNAPSHOT_EVERY",
    "GatewayLimits",
    "GatewayNode",
    "MatcherNode",
    "Node",
    "RelayNode",
    "RouterNode",
    "Topology",
    "connect_endpoint",
    "parse_topology",
]

ROLES = ("gateway", "matcher", "relay", "router")
FSYNC_MODES = ("batch", "always", "never")
SNAPSHOT_EVERY = 100_000  # a matcher's default: a snapshot every this many journaled commands
MAX_WORKERS = 256  # gateway processes of one node, at most (a process each: one per core is the idea)


# -- nodes ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class RouterNode:
    """A stateless router.

    - ``front``: ZeroMQ endpoint of the ROUTER socket that gateways and SDK clients connect to.
    - ``back``: ZeroMQ endpoint of the ROUTER socket that matchers connect to.
    - ``heartbeat_timeout_ms``: a matcher silent for this long is considered down, and its
      symbols' orders get an ``unavailable`` reply at once (default 1000, at most an hour).
    """

    name: str
    role: Literal["router"] = field(default="router", init=False)
    front: str
    back: str
    heartbeat_timeout_ms: int = 1000

    @property
    def endpoints(self) -> tuple[tuple[str, str], ...]:
        """What this node binds, as (key, endpoint)."""
        return (("front", self.front), ("back", self.back))


@dataclass(frozen=True, slots=True, kw_only=True)
class MatcherNode:
    """A matcher process: one matching engine per symbol it owns (``Topology.symbols_of``).

    - ``pub``: endpoint of the PUB socket it binds and publishes every event on.
    - ``snapshot``: endpoint of the ROUTER socket answering "book of SYMBOL".
    - ``data_dir``: the directory of its journal and snapshots, exactly as written in the
      file: an absolute path, or a relative one that the process that starts the node
      resolves against its working directory. Two matchers never share or nest data
      directories (as written: a relative and an absolute path are not compared).
    - ``fsync``: when the journal is flushed to disk: ``batch`` (once per batch of commands,
      before the batch is answered; the default), ``always`` (after every command) or
      ``never`` (left to the operating system).
    - ``snapshot_every``: write a book snapshot every this many journaled commands, so a
      restart replays at most that many (default 100000, at most ``SNAPSHOT_EVERY_MAX``).
      A replay reads and runs 100,000 to 200,000 commands a second here (decode and engine,
      each about 240,000 a second), so a longer one delays the matcher's start; it says how
      far it is as it goes (``zmx up`` waits as long as it does; docs/operations.md, "Ready").
    - ``heartbeat_ms``: interval of its heartbeats to the routers (default 200, at most a minute).
    """

    name: str
    role: Literal["matcher"] = field(default="matcher", init=False)
    pub: str
    snapshot: str
    data_dir: str
    fsync: str = "batch"
    snapshot_every: int = SNAPSHOT_EVERY
    heartbeat_ms: int = 200

    @property
    def endpoints(self) -> tuple[tuple[str, str], ...]:
        """What this node binds, as (key, endpoint)."""
        return (("pub", self.pub), ("snapshot", self.snapshot))


@dataclass(frozen=True, slots=True, kw_only=True)
class RelayNode:
    """An XSUB/XPUB proxy between matchers and gateways.

    - ``pub``: endpoint of the XPUB socket it binds (gateways connect their SUB to it).
    - ``upstream``: names of the matchers whose PUB its XSUB connects to; in the file it
      defaults to every matcher, here it is always the resolved list.
    """

    name: str
    role: Literal["relay"] = field(default="relay", init=False)
    pub: str
    upstream: tuple[str, ...]

    @property
    def endpoints(self) -> tuple[tuple[str, str], ...]:
        """What this node binds, as (key, endpoint)."""
        return (("pub", self.pub),)


@dataclass(frozen=True, slots=True, kw_only=True)
class GatewayLimits:
    """What a gateway allows each WebSocket client (the ``limits`` mapping of a gateway).

    All values are integers; none is a float. Each has a largest value (``LIMIT_MAXIMA``: an
    hour for the times, 64 MiB for a message, 1 GiB for a queue, 10^6 messages a second).

    - ``max_message_bytes``: largest frame accepted from a client; a larger one closes the
      connection with code 1009. Default 64 KiB (the largest request, a subscription to 100
      channels, is under 8 KiB).
    - ``send_queue_bytes``: bytes queued for one client before its depth is conflated into a
      fresh snapshot. Default 1 MiB.
    - ``slow_consumer_ms``: a client that stays behind this long is disconnected (1013).
      Default 5000.
    - ``rate_limit_per_s``: messages per second a client may send before it gets
      ``rate_limited`` (a message counts once per ``protocol.RATE_UNIT_BYTES`` begun; pings,
      unasked pongs, binary frames and one in 8 of a message's fragments count too). Default 100.
    - ``ping_interval_s``: seconds between the server's WebSocket pings. Default 20.
    - ``ping_timeout_s``: seconds a client has to answer a ping before it is closed. Default 20.
    - ``heartbeat_s``: an idle channel gets a ``heartbeat`` message this often. Default 5.
    - ``handshake_timeout_s``: a connection that has not finished its WebSocket handshake
      this long after it connected is cut. Default 10.
    - ``order_timeout_s``: an order, cancel or amend with no answer from the cluster this long
      after it was sent is answered ``unavailable`` with ``outcome_unknown``; an answer that
      comes later is still passed on, without the request's ``id``. Default 5.
    """

    max_message_bytes: int = 65_536  # (the largest each may be: LIMIT_MAXIMA)
    send_queue_bytes: int = 1_048_576
    slow_consumer_ms: int = 5000
    rate_limit_per_s: int = 100
    ping_interval_s: int = 20
    ping_timeout_s: int = 20
    heartbeat_s: int = 5
    handshake_timeout_s: int = 10
    order_timeout_s: int = 5


# The largest heartbeat interval and timeout, and snapshot interval: far above any use, low enough
# that a typo is refused by ``zmx check`` (a router that never declares a silent matcher down; a
# matcher whose memory and restart time grow without end).
HEARTBEAT_MAX_MS = 3_600_000  # a router's heartbeat_timeout_ms
MATCHER_HEARTBEAT_MAX_MS = 60_000  # a matcher's heartbeat_ms (a router's timeout must be above it)
SNAPSHOT_EVERY_MAX = 100_000_000

# The largest value of each gateway limit: far above any use, and low enough that a typo (a
# ping interval of 10^11 s would make the gateway build a ping slot per quarter second of it)
# is refused by ``zmx check`` instead of hanging a gateway.
LIMIT_MAXIMA = {
    "max_message_bytes": 64 << 20,
    "send_queue_bytes": 1 << 30,
    "slow_consumer_ms": 3_600_000,
    "rate_limit_per_s": 1_000_000,
    "ping_interval_s": 3600,
    "ping_timeout_s": 3600,
    "heartbeat_s": 3600,
    "handshake_timeout_s": 3600,
    "order_timeout_s": 3600,
}


@dataclass(frozen=True, slots=True, kw_only=True)
class GatewayNode:
    """A WebSocket gateway.

    - ``listen``: ``host:port`` its WebSocket server listens on (``0.0.0.0:8765`` for every
      interface; an IPv6 host goes in brackets, ``[::1]:8765``).
    - ``workers``: number of gateway processes sharing the port (default 1, at most
      ``MAX_WORKERS``).
    - ``upstream``: names of the matchers or relays whose PUB its SUB connects to; in the
      file it defaults to every relay if there is one, else every matcher. Here it is always
      the resolved list. It never reaches a matcher twice (directly and through a relay), and
      it reaches every matcher that owns a symbol (each symbol is a channel of every gateway).
    - ``standby``: relays (or matchers) the gateway switches to when the feed of one of its
      upstream nodes is lost: each carries the same matchers as one upstream node and takes
      its place (``Topology.feed_paths``). Default none.
    - ``limits``: ``GatewayLimits``.
    """

    name: str
    role: Literal["gateway"] = field(default="gateway", init=False)
    listen: str
    workers: int = 1
    upstream: tuple[str, ...]
    standby: tuple[str, ...] = ()
    limits: GatewayLimits = GatewayLimits()

    @property
    def endpoints(self) -> tuple[tuple[str, str], ...]:
        """What this node binds, as (key, ``host:port``)."""
        return (("listen", self.listen),)

    @property
    def host(self) -> str:
        """The host part of ``listen``, brackets of an IPv6 address removed."""
        return _split_host_port(self.listen)[0].strip("[]")

    @property
    def port(self) -> int:
        return int(_split_host_port(self.listen)[1])

    @property
    def url(self) -> str:
        """Where a client on this machine connects: ``ws://127.0.0.1:8765``.

        A wildcard host (``0.0.0.0``, ``[::]``) is replaced by the loopback address.
        """
        host, port = _split_host_port(self.listen)
        return f"ws://{_connect_host(host)}:{port}"

    @property
    def page_url(self) -> str:
        """Where a browser on this machine opens the gateway's page: ``http://127.0.0.1:8765/``."""
        return "http" + self.url[2:] + "/"


Node = RouterNode | MatcherNode | RelayNode | GatewayNode


# -- the topology ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Topology:
    """A validated cluster layout. Mappings keep the order of the file and are read-only.

    - ``symbols``: symbol name -> ``SymbolSpec``.
    - ``owners``: symbol name -> name of the matcher node that owns it.
    - ``nodes``: node name -> ``RouterNode | MatcherNode | RelayNode | GatewayNode``.
    - ``source``: where it was read from (a file path or ``"<string>"``), for messages.
    """

    cluster: str
    symbols: Mapping[str, SymbolSpec]
    owners: Mapping[str, str]
    nodes: Mapping[str, Node]
    source: str = "<string>"

    def __post_init__(self) -> None:
        for name in ("symbols", "owners", "nodes"):
            object.__setattr__(self, name, MappingProxyType(dict(getattr(self, name))))

    def __hash__(self) -> int:
        return hash((self.cluster, tuple(self.symbols.items()), tuple(self.owners.items()),
                     tuple(self.nodes.items()), self.source))

    def node(self, name: str) -> Node:
        """The node called ``name``; ``TopologyError`` listing the known names if there is none."""
        try:
            return self.nodes[name]
        except (KeyError, TypeError):
            raise TopologyError(
                f"{self.source}: no node named {name!r} (nodes: {', '.join(self.nodes)})") from None

    def nodes_by_role(self, role: str) -> tuple[Node, ...]:
        """Every node of ``role``, in file order."""
        if role not in ROLES:
            raise TopologyError(f"{self.source}: unknown role {role!r} (expected one of: {', '.join(ROLES)})")
        return tuple(n for n in self.nodes.values() if n.role == role)

    def symbols_of(self, matcher_name: str) -> tuple[str, ...]:
        """The symbols a matcher owns, in file order (possibly none)."""
        node = self.node(matcher_name)
        if node.role != "matcher":
            raise TopologyError(f"{self.source}: node {matcher_name!r} is a {node.role}, not a matcher")
        return tuple(s for s, owner in self.owners.items() if owner == matcher_name)

    def owner_of(self, symbol: str) -> str:
        """The name of the matcher that owns ``symbol``."""
        try:
            return self.owners[symbol]
        except (KeyError, TypeError):
            raise TopologyError(
                f"{self.source}: unknown symbol {symbol!r} (symbols: {', '.join(self.symbols)})") from None

    def matchers_behind(self, name: str) -> tuple[str, ...]:
        """The matchers a relay or gateway receives from, relays expanded (a matcher: itself)."""
        node = self.node(name)
        if isinstance(node, MatcherNode):
            return (node.name,)
        if isinstance(node, (RelayNode, GatewayNode)):
            return tuple(m for up in node.upstream for m in self.matchers_behind(up))
        raise TopologyError(f"{self.source}: node {name!r} is a {node.role}; it has no upstream")

    def feed_paths(self, gateway: str) -> tuple[tuple[str, ...], ...]:
        """A gateway's ways to its feeds: for each upstream node, that node and then its standby
        nodes (those that carry the same matchers), in the order of the topology. The gateway
        takes the first of each and moves to the next when it loses that one's feed."""
        node = self.node(gateway)
        if not isinstance(node, GatewayNode):
            raise TopologyError(f"{self.source}: node {gateway!r} is a {node.role}, not a gateway")
        return tuple((up, *(s for s in node.standby
                            if sorted(self.matchers_behind(s)) == sorted(self.matchers_behind(up))))
                     for up in node.upstream)

    def upstream_endpoints(self, name: str) -> tuple[str, ...]:
        """The PUB endpoints a relay's or gateway's SUB connects to, ready for ``connect``."""
        node = self.node(name)
        if not isinstance(node, (RelayNode, GatewayNode)):
            raise TopologyError(f"{self.source}: node {name!r} is a {node.role}; it has no upstream")
        return tuple(connect_endpoint(self.nodes[up].pub) for up in node.upstream)  # type: ignore[union-attr]


# -- endpoints ------------------------------------------------------------------------------

_HOST = r"(?:\[[0-9A-Fa-f:.]+(?:%[A-Za-z0-9_.-]+)?\]|[^\s:/\[\]]+)"  # ([fe80::1%eth0]: a zone)
_TCP = re.compile(rf"tcp://({_HOST}):([0-9]{{1,10}})")  # (range-checked where used)
_HOST_PORT = re.compile(rf"({_HOST}):([0-9]{{1,10}})")
_IPC = re.compile(r"(ipc)://(\S+)")
_WILDCARD_HOSTS = frozenset({"*", "0.0.0.0", "[::]", "::"})
_CONNECTED_TO = {"router": ("front", "back"), "matcher": ("pub", "snapshot"), "relay": ("pub",)}  # by other nodes
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def _split_host_port(text: str) -> tuple[str, str]:
    host, _, port = text.rpartition(":")
    return host, port


def _connect_host(host: str) -> str:
    if host in ("[::]", "::"):
        return "[::1]"
    if host in _WILDCARD_HOSTS:
        return "127.0.0.1"
    return host


def connect_endpoint(endpoint: str) -> str:
    """The endpoint to ``connect`` to for one that is bound: ``tcp://*:5560`` -> ``tcp://127.0.0.1:5560``.

    A wildcard host only makes sense for ``bind``; on this machine the loopback address
    reaches it. Other endpoints are returned unchanged. A port outside 1-65535 raises
    ``TopologyError`` (ZeroMQ would take it modulo 65536: another node's port), and so does a
    ``tcp://`` endpoint that is not ``tcp://host:port``.
    """
    m = _TCP.fullmatch(endpoint)
    if m is None:
        if endpoint.startswith("tcp://"):  # (ZeroMQ takes tcp://:5560 or tcp://host:5560;x as something else)
            raise TopologyError(f"{endpoint!r:.80} is not tcp://host:port")
        return endpoint
    if not 0 < int(m.group(2)) <= 65535:
        raise TopologyError(f"port {m.group(2)} of {endpoint} is not one of 1-65535")
    return f"tcp://{_connect_host(m.group(1))}:{m.group(2)}"


@dataclass(frozen=True, slots=True)
class _Address:
    """What an endpoint occupies: ``("tcp", host, port)`` or ``("ipc", path, 0)``."""

    transport: str
    host: str
    port: int

    def clashes(self, other: _Address) -> bool:
        if self.transport != other.transport:
            return False
        if self.transport != "tcp":
            return self.host == other.host
        if self.port != other.port:
            return False
        return self.host == other.host or self.host in _WILDCARD_HOSTS or other.host in _WILDCARD_HOSTS


def _place(data_dir: str) -> tuple[int, tuple[str, ...]]:
    """Where a data dir is, to compare with another: ``(-1, parts)`` for an absolute path,
    ``(climbs, parts after them)`` for a relative one (``../../a/b`` -> ``(2, ("a", "b"))``;
    ``.`` -> ``(0, ())``). Backslashes are taken as slashes, ``//`` as ``/``."""
    path = posixpath.normpath(re.sub("/+", "/", data_dir.replace("\\", "/")))
    if path.startswith("/"):
        return -1, tuple(p for p in path.split("/") if p)
    parts = [] if path == "." else path.split("/")
    up = 0
    while up < len(parts) and parts[up] == "..":
        up += 1
    return up, tuple(parts[up:])


def _normal_host(host: str) -> str:
    return "127.0.0.1" if host.lower() == "localhost" else host.lower()


# -- YAML loading ---------------------------------------------------------------------------

_FLOAT_TAG = "tag:yaml.org,2002:float"
_INT_TAG = "tag:yaml.org,2002:int"


class _DuplicateKey(ConstructorError):
    """A key given twice in one mapping (PyYAML would silently keep the last)."""


class _Map(dict):  # type: ignore[type-arg]
    """A YAML mapping that remembers its line and the line of each key (1-based)."""

    __slots__ = ("key_lines", "line")

    line: int
    key_lines: dict[Any, int]


def _short(text: str, most: int = 60) -> str:
    """``text`` quoted, cut to ``most`` characters (a message must not repeat a huge value)."""
    return repr(text) if len(text) <= most else repr(text[:most]) + f"... ({len(text):,} characters)"


class _Loader(yaml.SafeLoader):
    """``SafeLoader`` that keeps line numbers, refuses duplicate keys and resolves no floats.

    Implicit floats are not resolved at all (``0.01`` stays the string ``"0.01"``) and only
    plain decimal integers are (``5560``, ``-3``); ``010``, ``0x10``, ``1_000`` and ``1:30``
    stay strings instead of YAML 1.1's octal, hex and sexagesimal readings.
    """

    yaml_implicit_resolvers: ClassVar[dict[str, list[tuple[str, re.Pattern[str]]]]] = {
        first: [(tag, rx) for tag, rx in resolvers if tag not in (_FLOAT_TAG, _INT_TAG)]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }

    def construct_object(self, node: YamlNode, deep: bool = False) -> Any:
        """PyYAML's, with what its constructors raise as plain Python errors (an explicit tag on
        a value it cannot take, ``!!int abc``; an integer of more digits than Python converts)
        turned into a ``ConstructorError`` at the value's line."""
        try:
            return super().construct_object(node, deep=deep)
        except (ValueError, TypeError, KeyError, AttributeError, OverflowError) as e:
            value = node.value if isinstance(node.value, str) else node.id
            raise ConstructorError(None, None, f"cannot read {_short(value)} as {node.tag.rsplit(':', 1)[-1]} "
                                               f"({_short(str(e))})", node.start_mark) from None

    def construct_mapping(self, node: MappingNode, deep: bool = False) -> _Map:  # type: ignore[override]
        if not isinstance(node, MappingNode):
            raise ConstructorError(None, None, f"expected a mapping node, but found {node.id}", node.start_mark)
        self._refuse_duplicates(node)
        self.flatten_mapping(node)  # YAML merge keys (<<): the mapping's own keys win
        mapping = _Map()
        mapping.line = node.start_mark.line + 1
        mapping.key_lines = {}
        for key_node, value_node in node.value:
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, Hashable):
                raise ConstructorError("while constructing a mapping", node.start_mark,
                                       "found an unhashable key", key_node.start_mark)
            mapping[key] = self.construct_object(value_node, deep=deep)
            mapping.key_lines[key] = key_node.start_mark.line + 1
        return mapping

    def _refuse_duplicates(self, node: MappingNode) -> None:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, Hashable):
                continue  # reported by construct_mapping
            line = key_node.start_mark.line + 1
            if key in seen:
                raise _DuplicateKey(None, None, f"duplicate key {key!r} (first at line {seen[key]})",
                                    key_node.start_mark)
            seen[key] = line

    def construct_yaml_map(self, node: MappingNode):  # type: ignore[no-untyped-def, override]
        data = _Map()
        data.line = node.start_mark.line + 1
        data.key_lines = {}
        yield data
        value = self.construct_mapping(node)
        data.update(value)
        data.key_lines = value.key_lines


_Loader.add_implicit_resolver(_INT_TAG, re.compile(r"^[-+]?(?:0|[1-9][0-9]*)$"), list("-+0123456789"))
_Loader.add_constructor("tag:yaml.org,2002:map", _Loader.construct_yaml_map)


# -- validation -----------------------------------------------------------------------------


class _Problem(Exception):
    def __init__(self, line: int, message: str) -> None:
        super().__init__(message)
        self.line = line
        self.message = message


def _not_text(value: object) -> str:
    """Why a name that YAML did not read as text is refused: what it read, and the cure."""
    return (f"YAML reads it as {_kind(value)}, not as text (so it does with yes, no, on, off, null, ~ and "
            "numbers): put the name in quotes")


def _kind(value: object) -> str:
    if value is None:
        return "nothing (null)"
    if isinstance(value, bool):
        return f"a boolean ({str(value).lower()})"
    if isinstance(value, int):
        return f"an integer ({value})"
    if isinstance(value, str):
        return f"a string ({value!r})"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return f"a {type(value).__name__} ({value!r})"


_TOP_KEYS = ("cluster", "symbols", "nodes")
_SYMBOL_KEYS = ("matcher", "tick_size", "lot_size", "min_quantity", "max_quantity")
_DECIMAL_KEYS = ("tick_size", "lot_size", "min_quantity", "max_quantity")
_ZMQ_ENDPOINT_HELP = "expected tcp://host:port with a port 1-65535 or ipc://path"
_LIMIT_KEYS = tuple(GatewayLimits.__dataclass_fields__)
_DECIMAL_TEXT = re.compile(r"[+-]?(\d+\.\d*|\.\d+)([eE][+-]?\d+)?|[+-]?\d+[eE][+-]?\d+")  # 2.5, 2.0, 1e3

# Keys of each role: name -> required. Order is the order of the messages' lists.
_ROLE_KEYS: dict[str, dict[str, bool]] = {
    "router": {"role": True, "front": True, "back": True, "heartbeat_timeout_ms": False},
    "matcher": {"role": True, "pub": True, "snapshot": True, "data_dir": True, "fsync": False,
                "snapshot_every": False, "heartbeat_ms": False},
    "relay": {"role": True, "pub": True, "upstream": False},
    "gateway": {"role": True, "listen": True, "workers": False, "upstream": False, "standby": False,
                "limits": False},
}


class _Parser:
    def __init__(self, data: _Map) -> None:
        self.data = data
        # (transport, port or ipc path) -> [(address, "node 'm1' pub '...'", line)]: only those can clash
        self.bound: dict[tuple[str, int | str], list[tuple[_Address, str, int]]] = {}

    # -- small checks -------------------------------------------------------------------

    @staticmethod
    def _mapping(value: object, line: int, what: str, example: str) -> _Map:
        if not isinstance(value, _Map):
            raise _Problem(line, f"{what} must be a mapping like {example}, got {_kind(value)}")
        return value

    @staticmethod
    def _check_keys(mapping: _Map, allowed: tuple[str, ...] | Mapping[str, bool], where: str) -> None:
        for key, line in mapping.key_lines.items():
            if key not in allowed:
                raise _Problem(line, f"{where}unknown key {key!r} (expected one of: {', '.join(allowed)})")

    def _int(self, mapping: _Map, key: str, where: str, default: int, minimum: int = 1,
             maximum: int | None = None) -> int:
        if key not in mapping:
            return default
        value = mapping[key]
        line = mapping.key_lines[key]
        if isinstance(value, bool) or not isinstance(value, int):
            # (numbers with a point stay strings in this YAML: prices are decimals)
            got = value if isinstance(value, str) and _DECIMAL_TEXT.fullmatch(value) else _kind(value)
            raise _Problem(line, f"{where}{key} must be a whole number like {default}, got {got}")
        if value < minimum:
            raise _Problem(line, f"{where}{key} must be at least {minimum}, got {value}")
        if maximum is not None and value > maximum:
            raise _Problem(line, f"{where}{key} must be at most {maximum:,}, got {value:,}")
        return value

    @staticmethod
    def _str(mapping: _Map, key: str, where: str, example: str) -> str:
        value = mapping[key]
        line = mapping.key_lines[key]
        if not isinstance(value, str):
            raise _Problem(line, f"{where}{key} must be a string like {example!r}, got {_kind(value)}")
        if not value:
            raise _Problem(line, f"{where}{key} is empty; expected something like {example!r}")
        bad = next((i for i, c in enumerate(value) if c < " " or "\x7f" <= c <= "\x9f"), None)
        if bad is not None:  # a NUL cut a path or an ipc endpoint short where it was used; a newline made a name
            raise _Problem(line, f"{where}{key} {_short(value)} holds a control character (U+{ord(value[bad]):04X} "
                                 f"at {bad + 1}); expected something like {example!r}")
        return value

    # -- endpoints ------------------------------------------------------------------------

    def _zmq_endpoint(self, mapping: _Map, key: str, where: str, example: str) -> str:
        text = self._str(mapping, key, where, example)
        line = mapping.key_lines[key]
        tcp = _TCP.fullmatch(text)
        if tcp is not None:
            port = int(tcp.group(2))
            if not 1 <= port <= 65535:
                raise _Problem(line, f"{where}{key} {text!r}: port {port} is not in 1-65535")
            self._bind(_Address("tcp", _normal_host(tcp.group(1)), port), f"{where}{key} {text!r}", line)
            return text
        other = _IPC.fullmatch(text)
        if other is None and text.startswith("inproc://"):
            raise _Problem(line, f"{where}{key} {text!r}: inproc:// reaches only sockets of the same process, and "
                                 "every node is a process of its own; use tcp://host:port, or ipc://path on one "
                                 "machine")
        if other is None:
            raise _Problem(line, f"{where}{key} {text!r} is not a ZeroMQ endpoint ({_ZMQ_ENDPOINT_HELP}, "
                                 f"like {example!r})")
        path = other.group(2)  # one file however it is spelled (ipc://x.pub, ipc://./x.pub); not an abstract @name
        self._bind(_Address("ipc", path if path.startswith("@") else posixpath.normpath(path), 0),
                   f"{where}{key} {text!r}", line)
        return text

    def _listen(self, mapping: _Map, key: str, where: str) -> str:
        example = "127.0.0.1:8765"
        text = self._str(mapping, key, where, example)
        line = mapping.key_lines[key]
        m = _HOST_PORT.fullmatch(text)
        if m is None:
            raise _Problem(line, f"{where}{key} {text!r} is not host:port (like {example!r}; "
                                 "0.0.0.0:8765 for every interface)")
        port = int(m.group(2))
        if not 1 <= port <= 65535:
            raise _Problem(line, f"{where}{key} {text!r}: port {port} is not in 1-65535")
        self._bind(_Address("tcp", _normal_host(m.group(1)), port), f"{where}{key} {text!r}", line)
        return text

    def _bind(self, address: _Address, what: str, line: int) -> None:
        """Remember an address taken by ``what`` ("node 'm1': pub '...'"); refuse it if taken."""
        taken = self.bound.setdefault((address.transport, address.port if address.transport == "tcp"
                                       else address.host), [])
        for other, other_what, other_line in taken:
            if address.clashes(other):
                if address.transport == "tcp":
                    raise _Problem(line, f"{what} uses port {address.port}, already used by {other_what} "
                                         f"(line {other_line})")
                raise _Problem(line, f"{what} is already used by {other_what} (line {other_line})")
        taken.append((address, what.replace(": ", " ", 1), line))

    # -- the file -------------------------------------------------------------------------

    def parse(self, source: str) -> Topology:
        data = self.data
        self._check_keys(data, _TOP_KEYS, "")
        for key in _TOP_KEYS:
            if key not in data:
                raise _Problem(data.line, f"missing key {key!r} (a topology has: {', '.join(_TOP_KEYS)})")
        cluster = self._str(data, "cluster", "", "local")
        if _NAME.fullmatch(cluster) is None:
            raise _Problem(data.key_lines["cluster"], f"cluster name {cluster!r} is not valid "
                           "(letters, digits, '_', '-' and '.', starting with a letter or digit)")
        nodes = self._nodes(self._mapping(data["nodes"], data.key_lines["nodes"], "nodes",
                                          "{m1: {role: matcher, ...}}"))
        symbols, owners = self._symbols(
            self._mapping(data["symbols"], data.key_lines["symbols"], "symbols",
                          '{BTC-USDT: {matcher: m1, tick_size: "0.01", lot_size: "0.00001"}}'),
            nodes)
        return Topology(cluster=cluster, symbols=symbols, owners=owners, nodes=nodes, source=source)

    def _symbols(self, entries: _Map, nodes: dict[str, Node]) -> tuple[dict[str, SymbolSpec], dict[str, str]]:
        if not entries:
            raise _Problem(self.data.key_lines["symbols"], "symbols is empty; a cluster trades at least one symbol")
        matchers = [n.name for n in nodes.values() if n.role == "matcher"]
        symbols: dict[str, SymbolSpec] = {}
        owners: dict[str, str] = {}
        for symbol, entry in entries.items():
            line = entries.key_lines[symbol]
            if not isinstance(symbol, str):
                raise _Problem(line, f"a symbol name must be text like BTC-USDT; {_not_text(symbol)}")
            where = f"symbol {symbol!r}: "
            entry = self._mapping(entry, line, f"symbol {symbol!r}",
                                  '{matcher: m1, tick_size: "0.01", lot_size: "0.00001"}')
            self._check_keys(entry, _SYMBOL_KEYS, where)
            for key in ("matcher", "tick_size", "lot_size"):
                if key not in entry:
                    raise _Problem(line, f"{where}missing key {key!r}")
            owner = entry["matcher"]
            owner_line = entry.key_lines["matcher"]
            if not isinstance(owner, str):
                raise _Problem(owner_line, f"{where}matcher must be a node name; {_not_text(owner)}")
            if owner not in nodes:
                raise _Problem(owner_line, f"{where}owner {owner!r} is not a node "
                                           f"(matchers: {', '.join(matchers) or 'none'})")
            if nodes[owner].role != "matcher":
                raise _Problem(owner_line, f"{where}owner {owner!r} is a {nodes[owner].role}, not a matcher "
                                           f"(matchers: {', '.join(matchers)})")
            numbers: dict[str, str | None] = {}
            for key in _DECIMAL_KEYS:
                value = entry.get(key)
                if isinstance(value, int) and not isinstance(value, bool):
                    value = str(value)
                if value is not None and not isinstance(value, str):
                    raise _Problem(entry.key_lines[key], f"{where}{key} must be a decimal number like \"0.01\", "
                                                         f"got {_kind(value)}")
                numbers[key] = value
            try:
                spec = SymbolSpec(symbol, numbers["tick_size"], numbers["lot_size"],  # type: ignore[arg-type]
                                  numbers["min_quantity"], numbers["max_quantity"])
            except InvalidNumber as e:
                message = str(e)
                bad = next((k for k in _DECIMAL_KEYS if message.startswith(k) and k in entry), None)
                if message.startswith(f"symbol {symbol!r}"):  # it names the symbol already
                    raise _Problem(line, message) from None
                raise _Problem(entry.key_lines[bad] if bad else line, f"{where}{message}") from None
            symbols[symbol] = spec
            owners[symbol] = owner
        return symbols, owners

    def _nodes(self, entries: _Map) -> dict[str, Node]:
        nodes_line = self.data.key_lines["nodes"]
        raw: list[tuple[str, int, _Map, str]] = []
        for name, entry in entries.items():
            line = entries.key_lines[name]
            if not isinstance(name, str):
                raise _Problem(line, f"a node name must be text like m1; {_not_text(name)}")
            if _NAME.fullmatch(name) is None:
                raise _Problem(line, f"node name {name!r} is not valid "
                                     "(letters, digits, '_', '-' and '.', starting with a letter or digit)")
            entry = self._mapping(entry, line, f"node {name!r}", "{role: matcher, ...}")
            if "role" not in entry:
                raise _Problem(line, f"node {name!r}: missing key 'role' (one of: {', '.join(ROLES)})")
            role = entry["role"]
            if role not in ROLES:
                shown = repr(role) if isinstance(role, str) else _kind(role)
                raise _Problem(entry.key_lines["role"],
                               f"node {name!r}: unknown role {shown} (expected one of: {', '.join(ROLES)})")
            raw.append((name, line, entry, role))
        matchers = tuple(name for name, _, _, role in raw if role == "matcher")
        relays = tuple(name for name, _, _, role in raw if role == "relay")
        if not matchers:
            raise _Problem(nodes_line, "no matcher node; a cluster needs at least one (role: matcher)")
        if not any(role == "router" for _, _, _, role in raw):
            raise _Problem(nodes_line, "no router node; orders reach the matchers only through one (role: router)")
        roles = {name: role for name, _, _, role in raw}
        nodes: dict[str, Node] = {}
        for name, line, entry, role in raw:
            where = f"node {name!r}: "
            keys = _ROLE_KEYS[role]
            self._check_keys(entry, keys, where)
            for key, required in keys.items():
                if required and key not in entry:
                    raise _Problem(line, f"{where}missing key {key!r} (a {role} needs: "
                                         f"{', '.join(k for k, r in keys.items() if r and k != 'role')})")
            nodes[name] = getattr(self, f"_{role}")(name, line, entry, where, roles, matchers, relays)
        self._check_data_dirs(nodes, entries)
        self._check_heartbeats(nodes, entries)
        return nodes

    # -- one builder per role -------------------------------------------------------------

    def _router(self, name: str, line: int, entry: _Map, where: str, *_: object) -> RouterNode:
        return RouterNode(
            name=name,
            front=self._zmq_endpoint(entry, "front", where, "tcp://127.0.0.1:5550"),
            back=self._zmq_endpoint(entry, "back", where, "tcp://127.0.0.1:5551"),
            heartbeat_timeout_ms=self._int(entry, "heartbeat_timeout_ms", where, 1000, maximum=HEARTBEAT_MAX_MS),
        )

    def _matcher(self, name: str, line: int, entry: _Map, where: str, *_: object) -> MatcherNode:
        pub = self._zmq_endpoint(entry, "pub", where, "tcp://127.0.0.1:5560")
        snapshot = self._zmq_endpoint(entry, "snapshot", where, "tcp://127.0.0.1:5561")
        data_dir = self._str(entry, "data_dir", where, f"var/{name}")
        if data_dir.startswith("~"):
            raise _Problem(entry.key_lines["data_dir"],
                           f"{where}data_dir {data_dir!r}: '~' is not expanded here; write the whole path "
                           f"('/home/...'), or a path relative to where the node starts ('var/{name}')")
        fsync = entry.get("fsync", "batch")
        if fsync not in FSYNC_MODES:
            shown = repr(fsync) if isinstance(fsync, str) else _kind(fsync)
            raise _Problem(entry.key_lines["fsync"],
                           f"{where}fsync {shown} is not one of: {', '.join(FSYNC_MODES)}")
        return MatcherNode(
            name=name, pub=pub, snapshot=snapshot, data_dir=data_dir, fsync=fsync,
            snapshot_every=self._int(entry, "snapshot_every", where, SNAPSHOT_EVERY, maximum=SNAPSHOT_EVERY_MAX),
            heartbeat_ms=self._int(entry, "heartbeat_ms", where, 200, maximum=MATCHER_HEARTBEAT_MAX_MS),
        )

    def _relay(self, name: str, line: int, entry: _Map, where: str, roles: dict[str, str],
               matchers: tuple[str, ...], relays: tuple[str, ...]) -> RelayNode:
        pub = self._zmq_endpoint(entry, "pub", where, "tcp://127.0.0.1:5570")
        upstream = self._upstream(entry, where, roles, ("matcher",), matchers)
        return RelayNode(name=name, pub=pub, upstream=upstream)

    def _gateway(self, name: str, line: int, entry: _Map, where: str, roles: dict[str, str],
                 matchers: tuple[str, ...], relays: tuple[str, ...]) -> GatewayNode:
        listen = self._listen(entry, "listen", where)
        workers = self._int(entry, "workers", where, 1, maximum=MAX_WORKERS)
        upstream = self._upstream(entry, where, roles, ("matcher", "relay"), relays or matchers)
        standby = self._upstream(entry, where, roles, ("matcher", "relay"), (), key="standby")
        limits = GatewayLimits()
        if "limits" in entry:
            raw = self._mapping(entry["limits"], entry.key_lines["limits"], f"{where}limits",
                                "{max_message_bytes: 1048576}")
            self._check_keys(raw, _LIMIT_KEYS, f"{where}limits: ")
            defaults = GatewayLimits()
            limits = GatewayLimits(**{k: self._int(raw, k, f"{where}limits: ", getattr(defaults, k),
                                                   maximum=LIMIT_MAXIMA[k]) for k in _LIMIT_KEYS})
        return GatewayNode(name=name, listen=listen, workers=workers, upstream=upstream, standby=standby,
                           limits=limits)

    def _upstream(self, entry: _Map, where: str, roles: dict[str, str], allowed: tuple[str, ...],
                  default: tuple[str, ...], key: str = "upstream") -> tuple[str, ...]:
        """A list of node names of the ``allowed`` roles under ``key`` (``upstream``, ``standby``)."""
        if key not in entry:
            return default
        value = entry[key]
        line = entry.key_lines[key]
        wanted = " or ".join(allowed)
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            if not isinstance(value, list):
                raise _Problem(line, f"{where}{key} must be a list of {wanted} names like [m1, m2], "
                                     f"got {_kind(value)}")
            name = next(v for v in value if not isinstance(v, str))
            raise _Problem(line, f"{where}{key} must be a list of {wanted} names like [m1, m2]; one of them: "
                                 f"{_not_text(name)}")
        if not value:
            raise _Problem(line, f"{where}{key} is empty; leave it out to use the default")
        candidates = [n for n, r in roles.items() if r in allowed]
        for up in value:
            if up not in roles:
                raise _Problem(line, f"{where}{key} {up!r} is not a node "
                                     f"(expected one of: {', '.join(candidates)})")
            if roles[up] not in allowed:
                raise _Problem(line, f"{where}{key} {up!r} is a {roles[up]}, not a {wanted}")
        if len(set(value)) != len(value):
            twice = next(v for v in value if value.count(v) > 1)
            raise _Problem(line, f"{where}{key} names {twice!r} twice")
        return tuple(value)

    # -- checks across nodes --------------------------------------------------------------

    def _check_data_dirs(self, nodes: dict[str, Node], entries: _Map) -> None:
        """No two matchers' data dirs are the same, or one inside the other. A relative one is
        its ``..`` climbs and the rest (``_place``): two with as many climbs nest when one's rest
        starts with the other's; with more climbs, only a bare chain (``..``, ``../..``) holds
        the other (``..`` holds ``.`` and ``../x``, not ``../../y``), whatever the directory
        the nodes start in."""
        seen: dict[tuple[int, tuple[str, ...]], str] = {}  # place -> node name
        around: dict[tuple[int, tuple[str, ...]], str] = {}  # a place holding a seen one -> its node name
        chains: dict[int, str] = {}  # climbs of a bare relative chain ("." is 0) -> node name
        climbs: dict[int, str] = {}  # climbs of any relative one -> node name
        for node in nodes.values():
            if not isinstance(node, MatcherNode):
                continue
            place = _place(node.data_dir)
            line = entries[node.name].key_lines["data_dir"]
            if place in seen:
                raise _Problem(line, f"node {node.name!r}: data_dir {node.data_dir!r} is also the data_dir of "
                                     f"node {seen[place]!r}; two matchers would write the same journal")
            up, rest = place
            outer = [(up, rest[:n]) for n in range(len(rest))]
            other = next((seen[p] for p in outer if p in seen), None) or around.get(place)
            if other is None and up >= 0:  # relative
                other = next((name for c, name in chains.items() if c > up), None)
                if other is None and not rest:
                    other = next((name for c, name in climbs.items() if c < up), None)
            if other is not None:
                other_dir = nodes[other].data_dir  # type: ignore[union-attr]
                raise _Problem(line, f"node {node.name!r}: data_dir {node.data_dir!r} and the data_dir "
                                     f"{other_dir!r} of node {other!r} are nested")
            seen[place] = node.name
            for p in outer:
                around.setdefault(p, node.name)
            if up >= 0:
                climbs.setdefault(up, node.name)
                if not rest:
                    chains[up] = node.name

    def _check_heartbeats(self, nodes: dict[str, Node], entries: _Map) -> None:
        matchers = [n for n in nodes.values() if isinstance(n, MatcherNode)]
        slowest = max(matchers, key=lambda m: m.heartbeat_ms)
        for node in nodes.values():
            if isinstance(node, RouterNode) and node.heartbeat_timeout_ms <= slowest.heartbeat_ms:
                entry = entries[node.name]
                line = entry.key_lines.get("heartbeat_timeout_ms", entries.key_lines[node.name])
                raise _Problem(line, f"node {node.name!r}: heartbeat_timeout_ms {node.heartbeat_timeout_ms} "
                                     f"is not above the heartbeat_ms {slowest.heartbeat_ms} of matcher "
                                     f"{slowest.name!r}; the router would take a live matcher for dead")

    # -- gateway upstream reaching a matcher twice -----------------------------------------

    @staticmethod
    def check_upstream_overlap(topology: Topology, entries: _Map) -> None:
        for node in topology.nodes_by_role("gateway"):
            upstream_line = entries[node.name].key_lines.get("upstream", entries.key_lines[node.name])
            seen: dict[str, str] = {}
            for up in node.upstream:  # type: ignore[union-attr]
                for matcher in topology.matchers_behind(up):
                    if matcher in seen:
                        via = seen[matcher]
                        raise _Problem(
                            upstream_line,
                            f"node {node.name!r}: upstream reaches matcher {matcher!r} twice "
                            f"(through {via!r} and {up!r}); it would receive every message twice")
                    seen[matcher] = up
            placed = {spare for way in topology.feed_paths(node.name) for spare in way[1:]}
            for spare in node.standby:  # type: ignore[union-attr]
                line = entries[node.name].key_lines["standby"]
                if spare in node.upstream:  # type: ignore[union-attr]
                    raise _Problem(line, f"node {node.name!r}: {spare!r} is in both upstream and standby")
                if spare not in placed:
                    carries = sorted(topology.matchers_behind(spare))
                    raise _Problem(line, f"node {node.name!r}: standby {spare!r} carries {', '.join(carries)}, "
                                         "the matchers of none of its upstream nodes; a standby takes the place "
                                         "of an upstream node that carries the same matchers")
            # Every symbol is a channel of every gateway: one whose matcher it never hears from
            # would serve a book that never moves.
            unheard = {m: topology.symbols_of(m) for m in dict.fromkeys(topology.owners.values()) if m not in seen}
            if unheard:
                raise _Problem(
                    upstream_line,
                    f"node {node.name!r}: its upstream reaches no feed of "
                    + "; ".join(f"{', '.join(symbols)} (matcher {m!r})" for m, symbols in unheard.items())
                    + f": its clients would get no update of {'them' if len(unheard) > 1 else 'it'}; add "
                    + " and ".join(repr(m) for m in unheard) + ", or a relay that carries "
                    + ("them" if len(unheard) > 1 else "it") + ", to its upstream")

    @staticmethod
    def check_wildcards(topology: Topology, entries: _Map) -> None:
        """An endpoint is both where its node binds and where the others connect, and the others
        connect to a wildcard host (``*``, ``0.0.0.0``) as the loopback address, on their own host.
        Right on one machine; in a topology whose addresses name two hosts or more, a wildcard
        would have each node connect to itself (a cluster that starts, and whose matchers are
        never heard)."""
        hosts: dict[str, str] = {}  # host address -> the first node found on it
        wild: list[tuple[Node, str, str]] = []
        for node in topology.nodes.values():
            for key in _CONNECTED_TO.get(node.role, ("listen",)):
                endpoint = getattr(node, key)
                host = _endpoint_host(endpoint)
                if host is None:
                    continue
                if host in _WILDCARD_HOSTS:
                    if key != "listen":  # nothing of the cluster connects to a gateway
                        wild.append((node, key, endpoint))
                elif not _is_loopback(host):
                    hosts.setdefault(host, node.name)
        if wild and len(hosts) > 1:
            node, key, endpoint = wild[0]
            line = entries[node.name].key_lines.get(key, entries.key_lines[node.name])
            raise _Problem(line, f"node {node.name!r}: {key} {endpoint!r} has a wildcard host, which the nodes "
                                 "that connect to it take as 127.0.0.1, their own host; this topology's nodes are "
                                 "on several hosts (" + ", ".join(f"{h}: {n}" for h, n in hosts.items())
                                 + f"): give {node.name}'s own address")

    @staticmethod
    def check_loopbacks(topology: Topology, entries: _Map) -> None:
        """A loopback endpoint (``127.0.0.1``, ``localhost``) that other nodes connect to reaches
        only the nodes on its own host. Where the topology shows that one of them is on another
        host (a node is on the hosts its own addresses name; one with loopback and wildcard
        addresses only could be anywhere), the cluster would start and never hear that node."""
        hosts_of: dict[str, frozenset[str]] = {}  # node name -> the hosts its own addresses name
        for node in topology.nodes.values():
            hosts = (_endpoint_host(endpoint) for _key, endpoint in node.endpoints)
            hosts_of[node.name] = frozenset(
                h for h in map(_normal_host, filter(None, hosts)) if h not in _WILDCARD_HOSTS and not _is_loopback(h))

        by_role: dict[str, list[Node]] = {}
        feeds: dict[str, list[Node]] = {}  # a matcher's or relay's name -> the nodes that connect to its pub
        for n in topology.nodes.values():
            by_role.setdefault(n.role, []).append(n)
            if isinstance(n, (RelayNode, GatewayNode)):
                for name in (*n.upstream, *getattr(n, "standby", ())):
                    feeds.setdefault(name, []).append(n)

        def connectors(node: Node, key: str) -> list[Node]:
            if node.role == "router":
                return by_role.get("gateway" if key == "front" else "matcher", [])
            if key == "snapshot":  # every gateway asks books of the matchers themselves
                return by_role.get("gateway", [])
            return feeds.get(node.name, [])

        for node in topology.nodes.values():
            own = hosts_of[node.name]
            if not own:  # a node on loopback and wildcard addresses only could be on any host
                continue
            for key in _CONNECTED_TO.get(node.role, ()):
                endpoint = getattr(node, key)
                host = _endpoint_host(endpoint)
                if host is None or not _is_loopback(_normal_host(host)):
                    continue
                for other in connectors(node, key):
                    theirs = hosts_of[other.name]
                    if own and theirs and not own & theirs:
                        line = entries[node.name].key_lines.get(key, entries.key_lines[node.name])
                        raise _Problem(line, f"node {node.name!r}: {key} {endpoint!r} is a loopback address, which "
                                             f"only the nodes on {node.name}'s host ({', '.join(sorted(own))}) can "
                                             f"reach, and {other.name} connects to it from "
                                             f"{', '.join(sorted(theirs))}: give {node.name}'s own address on the "
                                             "network")


def _endpoint_host(endpoint: str) -> str | None:
    """The host of ``tcp://HOST:PORT`` or a ``listen`` address ``HOST:PORT`` as written (None for
    ``ipc://``)."""
    m = _TCP.fullmatch(endpoint) or _HOST_PORT.fullmatch(endpoint)
    return m.group(1) if m is not None else None


def _is_loopback(host: str) -> bool:
    return host.startswith("127.") or host in ("localhost", "[::1]", "::1")


def parse_topology(text: str, source: str = "<string>") -> Topology:
    """Parse and validate a topology from YAML text. ``source`` names it in error messages."""
    try:
        data = yaml.load(text, Loader=_Loader)  # a SafeLoader subclass
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = f"{mark.line + 1}:" if mark is not None else ""
        problem = ", ".join(p for p in (e.context, e.problem) if p)
        kind = "" if isinstance(e, _DuplicateKey) else "YAML error: " if isinstance(e, ConstructorError) \
            else "YAML syntax error: "
        raise TopologyError(f"{source}:{line} {kind}{problem}") from None
    except ReaderError as e:  # a character YAML does not allow: say on which line
        line = text.count("\n", 0, e.position) + 1
        column = e.position - (text.rfind("\n", 0, e.position) + 1) + 1
        raise TopologyError(f"{source}:{line}: YAML syntax error: character #x{e.character:04x} at column "
                            f"{column} is not allowed in YAML ({e.reason})") from None
    except yaml.YAMLError as e:
        raise TopologyError(f"{source}: YAML syntax error: {e}") from None
    except RecursionError:  # collections nested hundreds deep: PyYAML builds them recursively
        raise TopologyError(f"{source}: YAML nested too deeply to be a topology") from None
    if not isinstance(data, _Map):
        what = "empty" if data is None else f"{_kind(data)}, not a mapping"
        raise TopologyError(f"{source}:1: the topology is {what}; expected a mapping with keys "
                            f"{', '.join(_TOP_KEYS)}")
    try:
        topology = _Parser(data).parse(source)
        _Parser.check_upstream_overlap(topology, data["nodes"])
        _Parser.check_wildcards(topology, data["nodes"])
        _Parser.check_loopbacks(topology, data["nodes"])
    except _Problem as p:
        raise TopologyError(f"{source}:{p.line}: {p.message}") from None
    return topology
