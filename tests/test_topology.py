"""Topology files: what loads, and what a user is told when a file breaks a rule."""

from __future__ import annotations

import dataclasses
import re
import textwrap
from pathlib import Path

import pytest

from zmx.exceptions import TopologyError, ZmxError
from zmx.model import SymbolSpec
from zmx.node.runtime import load_topology
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

REPO = Path(__file__).resolve().parent.parent
SOURCE = "topology/test.yaml"

# A valid topology; tests replace one line of it. Line numbers are those of the text.
BASE = """\
cluster: local
symbols:
  BTC-USDT: {matcher: m1, tick_size: "0.01", lot_size: "0.00001"}
  ETH-USDT: {matcher: m2, tick_size: "0.01", lot_size: "0.0001"}
nodes:
  r1: {role: router, front: "tcp://127.0.0.1:5550", back: "tcp://127.0.0.1:5551"}
  m1: {role: matcher, pub: "tcp://127.0.0.1:5560", snapshot: "tcp://127.0.0.1:5561", data_dir: "var/m1"}
  m2: {role: matcher, pub: "tcp://127.0.0.1:5562", snapshot: "tcp://127.0.0.1:5563", data_dir: "var/m2"}
  g1: {role: gateway, listen: "127.0.0.1:8765"}
"""


def parse(text: str) -> Topology:
    return parse_topology(textwrap.dedent(text), SOURCE)


def replace_line(number: int, new: str, text: str = BASE) -> str:
    """``text`` with its line ``number`` (1-based) replaced by ``new`` (may be several lines)."""
    lines = text.splitlines()
    lines[number - 1] = new
    return "\n".join(lines) + "\n"


def error_of(text: str) -> str:
    with pytest.raises(TopologyError) as info:
        parse(text)
    return str(info.value)


def assert_error(text: str, line: int, *fragments: str) -> str:
    message = error_of(text)
    assert message.startswith(f"{SOURCE}:{line}: "), message
    for fragment in fragments:
        assert fragment in message, message
    return message


# -- what loads -----------------------------------------------------------------------------


def test_base_topology_loads_with_defaults() -> None:
    topology = parse(BASE)
    assert topology.cluster == "local"
    assert topology.source == SOURCE
    assert list(topology.nodes) == ["r1", "m1", "m2", "g1"]
    assert list(topology.symbols) == ["BTC-USDT", "ETH-USDT"]
    assert topology.symbols["BTC-USDT"] == SymbolSpec("BTC-USDT", "0.01", "0.00001")
    assert topology.node("r1") == RouterNode(name="r1", front="tcp://127.0.0.1:5550", back="tcp://127.0.0.1:5551",
                                             heartbeat_timeout_ms=1000)
    m1 = topology.node("m1")
    assert m1 == MatcherNode(name="m1", pub="tcp://127.0.0.1:5560", snapshot="tcp://127.0.0.1:5561",
                             data_dir="var/m1", fsync="batch", snapshot_every=100_000, heartbeat_ms=200)
    assert m1.role == "matcher"
    g1 = topology.node("g1")
    assert isinstance(g1, GatewayNode)
    assert g1.role == "gateway"
    assert g1.workers == 1
    assert g1.upstream == ("m1", "m2")  # no relay: every matcher
    assert g1.limits == GatewayLimits(max_message_bytes=65_536, send_queue_bytes=1_048_576,
                                      slow_consumer_ms=5000, rate_limit_per_s=100, ping_interval_s=20,
                                      ping_timeout_s=20, heartbeat_s=5)
    assert (g1.host, g1.port, g1.url) == ("127.0.0.1", 8765, "ws://127.0.0.1:8765")


def test_helpers() -> None:
    topology = parse(BASE)
    assert topology.symbols_of("m1") == ("BTC-USDT",)
    assert topology.symbols_of("m2") == ("ETH-USDT",)
    assert topology.owner_of("ETH-USDT") == "m2"
    assert [n.name for n in topology.nodes_by_role("matcher")] == ["m1", "m2"]
    assert topology.nodes_by_role("relay") == ()
    assert topology.matchers_behind("g1") == ("m1", "m2")
    assert topology.upstream_endpoints("g1") == ("tcp://127.0.0.1:5560", "tcp://127.0.0.1:5562")


def test_helper_errors_name_what_exists() -> None:
    topology = parse(BASE)
    with pytest.raises(TopologyError, match=r"no node named 'm9' \(nodes: r1, m1, m2, g1\)"):
        topology.node("m9")
    with pytest.raises(TopologyError, match="node 'g1' is a gateway, not a matcher"):
        topology.symbols_of("g1")
    with pytest.raises(TopologyError, match=r"unknown symbol 'DOGE-USDT' \(symbols: BTC-USDT, ETH-USDT\)"):
        topology.owner_of("DOGE-USDT")
    with pytest.raises(TopologyError, match="unknown role 'matchr'"):
        topology.nodes_by_role("matchr")


def test_all_keys_of_every_role() -> None:
    topology = parse("""\
        cluster: full
        symbols:
          BTC-USDT: {matcher: m1, tick_size: "0.5", lot_size: "0.001", min_quantity: "0.01", max_quantity: "100"}
        nodes:
          r1: {role: router, front: "ipc://@zmx-front", back: "ipc:///tmp/zmx-back", heartbeat_timeout_ms: 3000}
          m1:
            role: matcher
            pub: "tcp://*:5560"
            snapshot: "tcp://[::1]:5561"
            data_dir: data/m1
            fsync: always
            snapshot_every: 5000
            heartbeat_ms: 100
          x1: {role: relay, pub: "tcp://127.0.0.1:5570"}
          g1:
            role: gateway
            listen: "0.0.0.0:8765"
            workers: 2
            limits: {max_message_bytes: 4096, send_queue_bytes: 65536, slow_consumer_ms: 1000,
                     rate_limit_per_s: 10, ping_interval_s: 5, ping_timeout_s: 6, heartbeat_s: 1}
        """)
    assert topology.node("r1") == RouterNode(name="r1", front="ipc://@zmx-front", back="ipc:///tmp/zmx-back",
                                             heartbeat_timeout_ms=3000)
    assert topology.node("m1") == MatcherNode(name="m1", pub="tcp://*:5560", snapshot="tcp://[::1]:5561",
                                              data_dir="data/m1", fsync="always", snapshot_every=5000,
                                              heartbeat_ms=100)
    assert topology.node("x1") == RelayNode(name="x1", pub="tcp://127.0.0.1:5570", upstream=("m1",))
    g1 = topology.node("g1")
    assert isinstance(g1, GatewayNode)
    assert g1.upstream == ("x1",)  # a relay exists: the default goes through it
    assert g1.workers == 2
    assert g1.limits == GatewayLimits(max_message_bytes=4096, send_queue_bytes=65536, slow_consumer_ms=1000,
                                      rate_limit_per_s=10, ping_interval_s=5, ping_timeout_s=6, heartbeat_s=1)
    assert g1.url == "ws://127.0.0.1:8765"  # 0.0.0.0 is reached through the loopback
    assert topology.symbols["BTC-USDT"].describe() == {
        "symbol": "BTC-USDT", "tick_size": "0.5", "lot_size": "0.001", "min_quantity": "0.01", "max_quantity": "100"}
    assert topology.upstream_endpoints("g1") == ("tcp://127.0.0.1:5570",)
    assert topology.upstream_endpoints("x1") == ("tcp://127.0.0.1:5560",)  # the * is for bind only
    assert topology.matchers_behind("g1") == ("m1",)


def test_partial_limits_keep_the_other_defaults() -> None:
    topology = parse(replace_line(9, '  g1: {role: gateway, listen: "127.0.0.1:8765", limits: {heartbeat_s: 2}}'))
    assert topology.node("g1").limits == dataclasses.replace(GatewayLimits(), heartbeat_s=2)  # type: ignore[union-attr]


def test_connect_endpoint() -> None:
    assert connect_endpoint("tcp://*:5560") == "tcp://127.0.0.1:5560"
    assert connect_endpoint("tcp://0.0.0.0:5560") == "tcp://127.0.0.1:5560"
    assert connect_endpoint("tcp://10.0.0.2:5560") == "tcp://10.0.0.2:5560"
    assert connect_endpoint("ipc:///tmp/x") == "ipc:///tmp/x"


def test_a_matcher_may_own_no_symbol() -> None:
    text = replace_line(4, '  ETH-USDT: {matcher: m1, tick_size: "0.01", lot_size: "0.0001"}')
    assert parse(text).symbols_of("m2") == ()


# -- numbers stay exact ---------------------------------------------------------------------


@pytest.mark.parametrize("tick", ["0.01", "0.1", "0.00000001", "0.10", "1", "25", "010"])
def test_unquoted_numbers_stay_the_exact_text(tick: str) -> None:
    topology = parse(replace_line(3, f"  BTC-USDT: {{matcher: m1, tick_size: {tick}, lot_size: 0.00001}}"))
    spec = topology.symbols["BTC-USDT"]
    assert spec.tick_size == tick
    assert isinstance(spec.tick_size, str)
    assert spec.lot_size == "0.00001"


def test_integer_bounds_become_decimal_strings() -> None:
    topology = parse(replace_line(
        3, "  BTC-USDT: {matcher: m1, tick_size: 1, lot_size: 1, min_quantity: 2, max_quantity: 1000}"))
    spec = topology.symbols["BTC-USDT"]
    assert (spec.tick_size, spec.lot_size, spec.min_quantity, spec.max_quantity) == ("1", "1", "2", "1000")


@pytest.mark.parametrize("tick, problem", [
    ('"0"', "tick_size must be greater than zero"),
    ("-0.01", "tick_size '-0.01' is not a plain decimal number"),
    ("1e-2", "tick_size '1e-2' is not a plain decimal number"),
    (".nan", "tick_size '.nan' is not a plain decimal number"),
    ('""', "tick_size is empty"),
    ("0x10", "tick_size '0x10' is not a plain decimal number"),
])
def test_bad_tick_size_names_the_line(tick: str, problem: str) -> None:
    text = replace_line(3, "  BTC-USDT:\n    matcher: m1\n    tick_size: " + tick + '\n    lot_size: "0.1"')
    assert_error(text, 5, "symbol 'BTC-USDT': ", problem)


def test_bad_tick_size_type() -> None:
    text = replace_line(3, '  BTC-USDT: {matcher: m1, tick_size: [1], lot_size: "0.1"}')
    assert_error(text, 3, "symbol 'BTC-USDT': tick_size must be a decimal number", "got a list")
    text = replace_line(3, '  BTC-USDT: {matcher: m1, tick_size: true, lot_size: "0.1"}')
    assert_error(text, 3, "tick_size must be a decimal number", "got a boolean")


def test_bad_lot_size_and_bounds() -> None:
    text = replace_line(3, "  BTC-USDT:\n    matcher: m1\n    tick_size: 0.01\n    lot_size: 0")
    assert_error(text, 6, "symbol 'BTC-USDT': lot_size must be greater than zero")
    text = replace_line(3, "  BTC-USDT:\n    matcher: m1\n    tick_size: 0.01\n    lot_size: 0.1\n"
                           "    min_quantity: 0.05")
    assert_error(text, 7, "symbol 'BTC-USDT': min_quantity 0.05", "decimals")
    text = replace_line(3, "  BTC-USDT:\n    matcher: m1\n    tick_size: 0.01\n    lot_size: 0.1\n"
                           "    min_quantity: 5\n    max_quantity: 1")
    assert_error(text, 7, "min_quantity 5 is above max_quantity 1")
    # a step so small that a price of 1 would be more than 2^63 - 1 ticks: nothing could trade
    text = replace_line(3, '  BTC-USDT: {matcher: m1, tick_size: "0.000000000000000000000000000001", lot_size: "0.1"}')
    assert_error(text, 3, "tick_size 0.000000000000000000000000000001 is too small")


def test_invalid_symbol_name() -> None:
    text = replace_line(3, '  btc usdt: {matcher: m1, tick_size: "0.01", lot_size: "0.00001"}')
    assert_error(text, 3, ":3: symbol 'btc usdt' is not a valid name")
    text = replace_line(3, '  ABCDEFGHIJKLMNOPQRST: {matcher: m1, tick_size: "0.01", lot_size: "0.00001"}')
    assert_error(text, 3, "is not a valid name (1 to 3 parts of 1 to 15 upper-case letters and digits")
    text = replace_line(3, '  123: {matcher: m1, tick_size: "0.01", lot_size: "0.00001"}')
    assert_error(text, 3, "a symbol name must be text like BTC-USDT; YAML reads it as an integer (123), not as text",
                 "put the name in quotes")
    text = replace_line(3, '  ON: {matcher: m1, tick_size: "0.01", lot_size: "0.00001"}')
    assert_error(text, 3, "YAML reads it as a boolean (true), not as text", "put the name in quotes")


# -- symbols and owners ---------------------------------------------------------------------


def test_symbol_owned_by_no_matcher() -> None:
    text = replace_line(3, '  BTC-USDT: {tick_size: "0.01", lot_size: "0.00001"}')
    assert_error(text, 3, "symbol 'BTC-USDT': missing key 'matcher'")


def test_symbol_owner_is_not_a_node() -> None:
    text = replace_line(3, '  BTC-USDT: {matcher: m9, tick_size: "0.01", lot_size: "0.00001"}')
    assert_error(text, 3, "symbol 'BTC-USDT': owner 'm9' is not a node (matchers: m1, m2)")


def test_symbol_owner_is_not_a_matcher() -> None:
    text = replace_line(3, '  BTC-USDT: {matcher: g1, tick_size: "0.01", lot_size: "0.00001"}')
    assert_error(text, 3, "symbol 'BTC-USDT': owner 'g1' is a gateway, not a matcher (matchers: m1, m2)")


def test_symbol_missing_tick_and_unknown_key() -> None:
    text = replace_line(3, '  BTC-USDT: {matcher: m1, lot_size: "0.00001"}')
    assert_error(text, 3, "symbol 'BTC-USDT': missing key 'tick_size'")
    text = replace_line(3, '  BTC-USDT:\n    matcher: m1\n    tick_size: "0.01"\n    lot_size: "0.1"\n    tick: 1')
    assert_error(text, 7, "symbol 'BTC-USDT': unknown key 'tick' (expected one of: matcher, tick_size, lot_size")


def test_symbol_entry_not_a_mapping() -> None:
    assert_error(replace_line(3, "  BTC-USDT: m1"), 3, "symbol 'BTC-USDT' must be a mapping", "got a string ('m1')")


def test_no_symbols() -> None:
    text = replace_line(2, "symbols: {}", replace_line(3, "", replace_line(4, "")))
    assert_error(text, 2, "symbols is empty")


# -- the file's shape -----------------------------------------------------------------------


def test_yaml_syntax_error_names_the_line() -> None:
    text = replace_line(7, '  m1: {role: matcher, pub: "tcp://127.0.0.1:5560"')
    message = assert_error(text, 8, "YAML syntax error: while parsing a flow mapping, expected ',' or '}'")
    assert "Traceback" not in message


def test_yaml_indentation_error() -> None:
    text = replace_line(6, '  r1: {role: router}\n    bad: indentation\n  oops')
    assert re.match(rf"{re.escape(SOURCE)}:\d+: YAML syntax error: ", error_of(text))


@pytest.mark.parametrize("character, shown", [("\x00", "#x0000"), ("\x07", "#x0007"), ("\ufffe", "#xfffe")])
def test_a_character_yaml_does_not_allow_is_named_with_its_line_and_column(character: str, shown: str) -> None:
    line = BASE.splitlines()[5]  # a node's line, somewhere in the middle of the file
    text = replace_line(6, line[:4] + character + line[4:])
    assert_error(text, 6, f"YAML syntax error: character {shown} at column 5 is not allowed in YAML")


@pytest.mark.parametrize("value, says", [
    ("!!int abc", "cannot read 'abc' as int"),
    ("!!float abc", "cannot read 'abc' as float"),
    ("!!bool maybe", "cannot read 'maybe' as bool"),
    ("!!timestamp abc", "cannot read 'abc' as timestamp"),
    ("9" * 5000, "cannot read '9999"),  # more digits than Python turns into an int
])
def test_a_value_yaml_cannot_construct_is_an_error_at_its_line(value: str, says: str) -> None:
    """PyYAML's constructors raise plain Python errors for these: a traceback from zmx check."""
    text = replace_line(9, f'  g1: {{role: gateway, listen: "127.0.0.1:8765", workers: {value}}}')
    message = assert_error(text, 9, f"YAML error: {says}")
    assert len(message) < 400, message  # the value is not repeated whole


@pytest.mark.parametrize("line, where", [
    ('  m1: {role: matcher, pub: "tcp://127.0.0.1:5560", snapshot: "tcp://127.0.0.1:5561", data_dir: "var/\\0m1"}',
     "node 'm1': data_dir 'var/\\x00m1' holds a control character (U+0000 at 5)"),
    ('  m1: {role: matcher, pub: "ipc:///tmp/a\\0b", snapshot: "tcp://127.0.0.1:5561", data_dir: "var/m1"}',
     "node 'm1': pub 'ipc:///tmp/a\\x00b' holds a control character (U+0000 at 13)"),
    ('  m1: {role: matcher, pub: "tcp://127.0.0.1:5560", snapshot: "tcp://127.0.0.1:5561", data_dir: "var/m1\\n"}',
     "node 'm1': data_dir 'var/m1\\n' holds a control character (U+000A at 7)"),
])
def test_a_control_character_in_a_path_or_an_endpoint_is_refused(line: str, where: str) -> None:
    """Checked as valid, a NUL in data_dir then stopped the matcher with a traceback, and one
    in an ipc endpoint made ZeroMQ bind the path cut at it (two such endpoints clashed
    unseen); a newline made a directory whose name ends in one."""
    assert_error(replace_line(7, line), 7, where)


def test_a_port_of_six_digits_is_said_to_be_out_of_range() -> None:
    text = replace_line(7, '  m1: {role: matcher, pub: "tcp://127.0.0.1:151062", snapshot: "tcp://127.0.0.1:5561", '
                           'data_dir: "var/m1"}')
    assert_error(text, 7, "pub 'tcp://127.0.0.1:151062': port 151062 is not in 1-65535")


def _on_hosts(text: str) -> str:
    """BASE with r1 on 10.0.0.1, the matchers on 10.0.0.2 and the gateway listening everywhere."""
    text = text.replace("tcp://127.0.0.1:555", "tcp://10.0.0.1:555")
    text = text.replace("tcp://127.0.0.1:556", "tcp://10.0.0.2:556")
    return text.replace('listen: "127.0.0.1:8765"', 'listen: "0.0.0.0:8765"')


def test_a_wildcard_endpoint_in_a_topology_over_several_hosts_is_refused() -> None:
    assert parse(_on_hosts(BASE)).node("m1").pub == "tcp://10.0.0.2:5560"  # type: ignore[union-attr]
    text = _on_hosts(BASE).replace("tcp://10.0.0.2:5560", "tcp://*:5560")
    assert_error(text, 7, "node 'm1': pub 'tcp://*:5560' has a wildcard host, which the nodes that connect to it "
                 "take as 127.0.0.1, their own host", "several hosts (10.0.0.1: r1, 10.0.0.2: m1)",
                 "give m1's own address")
    text = _on_hosts(BASE).replace("tcp://10.0.0.1:5551", "tcp://0.0.0.0:5551")
    assert_error(text, 6, "node 'r1': back 'tcp://0.0.0.0:5551' has a wildcard host")


def test_wildcard_endpoints_on_one_machine_are_fine() -> None:
    topology = parse(BASE.replace("tcp://127.0.0.1:", "tcp://*:"))
    assert topology.node("m1").pub == "tcp://*:5560"  # type: ignore[union-attr]


def test_a_loopback_endpoint_that_a_node_on_another_host_connects_to_is_refused() -> None:
    # m1 is on 10.0.0.2 (its snapshot says so); its pub on loopback reaches no gateway elsewhere
    text = _on_hosts(BASE).replace("tcp://10.0.0.2:5560", "tcp://127.0.0.1:5560")
    text = text.replace('listen: "0.0.0.0:8765"', 'listen: "10.0.0.3:8765"')
    assert_error(text, 7, "node 'm1': pub 'tcp://127.0.0.1:5560' is a loopback address, which only the nodes on "
                 "m1's host (10.0.0.2) can reach, and g1 connects to it from 10.0.0.3",
                 "give m1's own address on the network")
    # a router's back on localhost, its front on 10.0.0.1: the matchers on 10.0.0.2 cannot reach it
    text = _on_hosts(BASE).replace("tcp://10.0.0.1:5551", "tcp://localhost:5551")
    assert_error(text, 6, "node 'r1': back 'tcp://localhost:5551' is a loopback address", "m1 connects to it from "
                 "10.0.0.2")


def test_a_loopback_endpoint_for_the_nodes_of_its_own_host_is_fine() -> None:
    # the matchers and the gateway on 10.0.0.2, the gateway reading the matchers over loopback;
    # the router on 10.0.0.1
    text = _on_hosts(BASE).replace("tcp://10.0.0.2:556", "tcp://127.0.0.1:556")
    text = text.replace('listen: "0.0.0.0:8765"', 'listen: "10.0.0.2:8765"')
    text = text.replace('snapshot: "tcp://127.0.0.1:5561"', 'snapshot: "tcp://10.0.0.2:5561"')
    assert parse(text).node("m1").pub == "tcp://127.0.0.1:5560"  # type: ignore[union-attr]
    # a node with loopback addresses only could be on any host
    assert parse(_on_hosts(BASE).replace("tcp://10.0.0.2:556", "tcp://127.0.0.1:556")).node("m2")


def test_several_documents_and_python_tags_are_refused() -> None:
    assert_error(BASE + "---\ncluster: other\n", 10, "expected a single document in the stream, but found another")
    assert_error("cluster: !!python/object:os.system x\n", 1, "YAML error: could not determine a constructor")


@pytest.mark.parametrize("text, what", [
    ("", "the topology is empty"),
    ("- a\n- b\n", "the topology is a list, not a mapping"),
    ("just text\n", "the topology is a string ('just text'), not a mapping"),
])
def test_top_level_not_a_mapping(text: str, what: str) -> None:
    assert_error(text, 1, what, "expected a mapping with keys cluster, symbols, nodes")


@pytest.mark.parametrize("key", ["cluster", "symbols", "nodes"])
def test_missing_top_level_key(key: str) -> None:
    kept = [line for line in BASE.splitlines() if not line.startswith(key)]
    if key != "cluster":  # drop the entries of the removed mapping too
        start = BASE.splitlines().index(f"{key}:")
        entries = {"symbols": 2, "nodes": 4}[key]
        kept = BASE.splitlines()[:start] + BASE.splitlines()[start + 1 + entries:]
    message = error_of("\n".join(kept) + "\n")
    assert re.match(rf"{re.escape(SOURCE)}:1: missing key '{key}' \(a topology has: cluster, symbols, nodes\)",
                    message), message


def test_unknown_top_level_key() -> None:
    assert_error(BASE + "node:\n  x: 1\n", 10, "unknown key 'node' (expected one of: cluster, symbols, nodes)")


def test_bad_cluster_name() -> None:
    assert_error(replace_line(1, "cluster: [a]"), 1, "cluster must be a string", "got a list")
    assert_error(replace_line(1, "cluster: 'my cluster'"), 1, "cluster name 'my cluster' is not valid")


def test_duplicate_key_is_refused_with_both_lines() -> None:
    text = BASE + '  m1: {role: relay, pub: "tcp://127.0.0.1:5590"}\n'
    assert_error(text, 10, "duplicate key 'm1' (first at line 7)")


def test_duplicate_key_inside_a_flow_mapping() -> None:
    text = replace_line(6, '  r1: {role: router, front: "tcp://127.0.0.1:5550", back: "tcp://127.0.0.1:5551",\n'
                           '       front: "tcp://127.0.0.1:5552"}')
    assert_error(text, 7, "duplicate key 'front' (first at line 6)")


def test_duplicate_symbol() -> None:
    text = replace_line(4, '  BTC-USDT: {matcher: m2, tick_size: "0.01", lot_size: "0.0001"}')
    assert_error(text, 4, "duplicate key 'BTC-USDT' (first at line 3)")


def test_yaml_merge_keys_are_not_duplicates() -> None:
    text = replace_line(4, '  ETH-USDT: {<<: *grid, matcher: m2}',
                        replace_line(3, '  BTC-USDT: &grid {matcher: m1, tick_size: "0.01", lot_size: "0.00001"}'))
    assert parse(text).symbols["ETH-USDT"] == SymbolSpec("ETH-USDT", "0.01", "0.00001")
    assert parse(text).owner_of("ETH-USDT") == "m2"


# -- nodes ----------------------------------------------------------------------------------


def test_unknown_role_lists_the_valid_ones() -> None:
    text = replace_line(8, '  m3: {role: matchr}')
    message = error_of(text)
    assert message == f"{SOURCE}:8: node 'm3': unknown role 'matchr' (expected one of: gateway, matcher, relay, router)"


def test_unknown_role_on_its_own_line() -> None:
    text = replace_line(9, "  g1:\n    listen: 127.0.0.1:8765\n    role: gatway")
    assert_error(text, 11, "node 'g1': unknown role 'gatway'")


def test_missing_role() -> None:
    assert_error(replace_line(9, '  g1: {listen: "127.0.0.1:8765"}'), 9,
                 "node 'g1': missing key 'role' (one of: gateway, matcher, relay, router)")


def test_missing_required_key() -> None:
    text = replace_line(7, '  m1: {role: matcher, pub: "tcp://127.0.0.1:5560", data_dir: "var/m1"}')
    assert_error(text, 7, "node 'm1': missing key 'snapshot' (a matcher needs: pub, snapshot, data_dir)")
    assert_error(replace_line(6, '  r1: {role: router, front: "tcp://127.0.0.1:5550"}'), 6,
                 "node 'r1': missing key 'back'")
    assert_error(replace_line(9, "  g1: {role: gateway}"), 9, "node 'g1': missing key 'listen'")
    assert_error(replace_line(9, "  x1: {role: relay}"), 9, "node 'x1': missing key 'pub'")


def test_unknown_key_catches_a_typo() -> None:
    text = replace_line(9, '  g1:\n    role: gateway\n    listen: "127.0.0.1:8765"\n    worker: 4')
    assert_error(text, 12, "node 'g1': unknown key 'worker' (expected one of: role, listen, workers, upstream, "
                           "standby, limits)")


def test_unknown_limit_key() -> None:
    text = replace_line(9, '  g1:\n    role: gateway\n    listen: "127.0.0.1:8765"\n    limits:\n      max_msg: 5')
    assert_error(text, 13, "node 'g1': limits: unknown key 'max_msg' (expected one of: max_message_bytes")


@pytest.mark.parametrize("value, got", [
    ('"4"', "got a string ('4')"),
    ("2.5", "got 2.5"),
    ("2.0", "got 2.0"),
    ("1e3", "got 1e3"),
    ("true", "got a boolean (true)"),
    ("[1]", "got a list"),
])
def test_wrong_type_of_an_integer(value: str, got: str) -> None:
    text = replace_line(9, f'  g1:\n    role: gateway\n    listen: "127.0.0.1:8765"\n    workers: {value}')
    assert_error(text, 12, "node 'g1': workers must be a whole number like 1", got)


def test_integers_must_be_positive() -> None:
    text = replace_line(9, '  g1: {role: gateway, listen: "127.0.0.1:8765", workers: 0}')
    assert_error(text, 9, "node 'g1': workers must be at least 1, got 0")
    text = replace_line(9, '  g1: {role: gateway, listen: "127.0.0.1:8765", workers: 1000}')
    assert_error(text, 9, "node 'g1': workers must be at most 256, got 1,000")
    text = replace_line(9, '  g1: {role: gateway, listen: "127.0.0.1:8765", limits: {rate_limit_per_s: -5}}')
    assert_error(text, 9, "node 'g1': limits: rate_limit_per_s must be at least 1, got -5")
    text = replace_line(7, '  m1: {role: matcher, pub: "tcp://127.0.0.1:5560", snapshot: "tcp://127.0.0.1:5561", '
                           'data_dir: "var/m1", snapshot_every: 0}')
    assert_error(text, 7, "node 'm1': snapshot_every must be at least 1")


@pytest.mark.parametrize("limit, value, maximum", [
    ("ping_interval_s", "100000000000", "3,600"), ("heartbeat_s", "3601", "3,600"),
    ("slow_consumer_ms", "100000000000000", "3,600,000"), ("max_message_bytes", "67108865", "67,108,864"),
])
def test_limits_have_a_largest_value(limit: str, value: str, maximum: str) -> None:
    """A typo of a few zeros is refused here: a ping interval of 10^11 s hung a gateway."""
    text = replace_line(9, f'  g1: {{role: gateway, listen: "127.0.0.1:8765", limits: {{{limit}: {value}}}}}')
    assert_error(text, 9, f"node 'g1': limits: {limit} must be at most {maximum}, got {int(value):,}")
    largest = int(maximum.replace(",", ""))
    text = replace_line(9, f'  g1: {{role: gateway, listen: "127.0.0.1:8765", limits: {{{limit}: {largest}}}}}')
    assert getattr(parse(text).node("g1").limits, limit) == largest  # type: ignore[union-attr]


@pytest.mark.parametrize("line, entry, key, maximum", [
    (6, '  r1: {role: router, front: "tcp://127.0.0.1:5550", back: "tcp://127.0.0.1:5551", KEY: VALUE}',
     "heartbeat_timeout_ms", 3_600_000),
    (7, '  m1: {role: matcher, pub: "tcp://127.0.0.1:5560", snapshot: "tcp://127.0.0.1:5561", data_dir: "var/m1", '
        'KEY: VALUE}', "heartbeat_ms", 60_000),
    (7, '  m1: {role: matcher, pub: "tcp://127.0.0.1:5560", snapshot: "tcp://127.0.0.1:5561", data_dir: "var/m1", '
        'KEY: VALUE}', "snapshot_every", 100_000_000),
])
def test_heartbeats_and_snapshot_interval_have_a_largest_value(line: int, entry: str, key: str, maximum: int) -> None:
    # A review's router with heartbeat_timeout_ms 10^23 passed zmx check: it would never have
    # declared a silent matcher down.
    text = replace_line(line, entry.replace("KEY", key).replace("VALUE", str(10**23)))
    assert_error(text, line, f"{key} must be at most {maximum:,}, got {10**23:,}")
    # (the router's timeout must be above the matchers' heartbeat)
    text = replace_line(6, '  r1: {role: router, front: "tcp://127.0.0.1:5550", back: "tcp://127.0.0.1:5551", '
                           'heartbeat_timeout_ms: 3600000}')
    topology = parse(replace_line(line, entry.replace("KEY", key).replace("VALUE", str(maximum)), text))
    assert getattr(topology.node(entry.split(":")[0].strip()), key) == maximum


def test_limits_not_a_mapping() -> None:
    text = replace_line(9, '  g1: {role: gateway, listen: "127.0.0.1:8765", limits: 5}')
    assert_error(text, 9, "node 'g1': limits must be a mapping", "got an integer (5)")


def test_node_not_a_mapping() -> None:
    assert_error(replace_line(9, "  g1: gateway"), 9, "node 'g1' must be a mapping like {role: matcher, ...}")


def test_bad_node_name() -> None:
    assert_error(replace_line(9, '  "g 1": {role: gateway, listen: "127.0.0.1:8765"}'), 9,
                 "node name 'g 1' is not valid")


@pytest.mark.parametrize("name, read_as", [("off", "a boolean (false)"), ("2", "an integer (2)"),
                                           ("null", "nothing (null)")])
def test_a_node_name_that_yaml_does_not_read_as_text_is_refused_with_the_cure(name: str, read_as: str) -> None:
    assert_error(replace_line(9, f'  {name}: {{role: gateway, listen: "127.0.0.1:8765"}}'), 9,
                 f"a node name must be text like m1; YAML reads it as {read_as}, not as text",
                 "put the name in quotes")
    quoted = parse(replace_line(9, f'  "{name}": {{role: gateway, listen: "127.0.0.1:8765"}}'))
    assert quoted.node(name).role == "gateway"


def test_nodes_not_a_mapping() -> None:
    text = "cluster: x\nsymbols: {}\nnodes: [m1]\n"
    assert_error(text, 3, "nodes must be a mapping", "got a list")


def test_fsync_mode() -> None:
    line = ('  m1: {role: matcher, pub: "tcp://127.0.0.1:5560", snapshot: "tcp://127.0.0.1:5561", '
            'data_dir: "var/m1", fsync: %s}')
    for mode in ("batch", "always", "never"):
        assert parse(replace_line(7, line % mode)).node("m1").fsync == mode  # type: ignore[union-attr]
    assert_error(replace_line(7, line % "sometimes"), 7,
                 "node 'm1': fsync 'sometimes' is not one of: batch, always, never")


def test_data_dir_is_absolute_or_relative_to_where_the_node_starts() -> None:
    line = ('  m1: {role: matcher, pub: "tcp://127.0.0.1:5560", snapshot: "tcp://127.0.0.1:5561", '
            'data_dir: "%s"}')
    for data_dir in ("/var/lib/zmx/m1", "var/m1", "../m1"):
        assert parse(replace_line(7, line % data_dir)).node("m1").data_dir == data_dir  # type: ignore[union-attr]
    assert_error(replace_line(7, line % "~/zmx/m1"), 7,
                 "node 'm1': data_dir '~/zmx/m1': '~' is not expanded here; write the whole path")
    assert_error(replace_line(7, line % ""), 7, "node 'm1': data_dir is empty")


def test_two_matchers_never_share_a_data_dir() -> None:
    line = ('  m2: {role: matcher, pub: "tcp://127.0.0.1:5562", snapshot: "tcp://127.0.0.1:5563", '
            'data_dir: "%s"}')
    assert_error(replace_line(8, line % "var/./m1"), 8,
                 "node 'm2': data_dir 'var/./m1' is also the data_dir of node 'm1'")
    assert_error(replace_line(8, line % "var/m1/sub"), 8,
                 "node 'm2': data_dir 'var/m1/sub' and the data_dir 'var/m1' of node 'm1' are nested")
    assert parse(replace_line(8, line % "var/m10")).node("m2").data_dir == "var/m10"  # type: ignore[union-attr]
    m1 = ('  m1: {role: matcher, pub: "tcp://127.0.0.1:5560", snapshot: "tcp://127.0.0.1:5561", '
          'data_dir: "%s"}')
    for outer, inner in (("/srv/zmx/m1", "/srv/zmx/m1/sub"), ("/", "/srv/zmx/m2"), (".", "var/m2"),
                         ("..", "../m2"), ("../zmx", "../zmx/m2"), ("..", "."), ("../..", "var/m2"),
                         ("../..", "../m2"), (".", "..foo"), ("/", "//srv/m2")):
        assert_error(replace_line(8, line % inner, replace_line(7, m1 % outer)), 8,
                     f"node 'm2': data_dir '{inner}' and the data_dir '{outer}' of node 'm1' are nested")
        assert_error(replace_line(8, line % outer, replace_line(7, m1 % inner)), 8,  # either way round
                     f"node 'm2': data_dir '{outer}' and the data_dir '{inner}' of node 'm1' are nested")
    for first, second in ((".", "../m2"), ("var/m1", "../var/m1"), ("/srv/a", "/srv/ab"), ("../a", "../../b"),
                          (".", "/srv/m2")):  # side by side (the last two nest only if started in ../b, /srv)
        topology = parse(replace_line(8, line % second, replace_line(7, m1 % first)))
        assert topology.node("m2").data_dir == second  # type: ignore[union-attr]


def test_no_matcher() -> None:
    text = "cluster: x\nsymbols:\n  BTC-USDT: {matcher: g1, tick_size: 1, lot_size: 1}\nnodes:\n" \
           "  g1: {role: gateway, listen: '127.0.0.1:8765'}\n"
    assert_error(text, 4, "no matcher node; a cluster needs at least one")


def test_no_router() -> None:
    text = "cluster: x\nsymbols:\n  BTC-USDT: {matcher: m1, tick_size: 1, lot_size: 1}\nnodes:\n" \
           "  m1: {role: matcher, pub: 'tcp://127.0.0.1:5560', snapshot: 'tcp://127.0.0.1:5561', data_dir: var/m1}\n" \
           "  g1: {role: gateway, listen: '127.0.0.1:8765'}\n"
    assert_error(text, 4, "no router node; orders reach the matchers only through one")


def test_router_timeout_must_exceed_matcher_heartbeat() -> None:
    text = replace_line(6, '  r1: {role: router, front: "tcp://127.0.0.1:5550", back: "tcp://127.0.0.1:5551",\n'
                           '       heartbeat_timeout_ms: 200}')
    assert_error(text, 7, "node 'r1': heartbeat_timeout_ms 200 is not above the heartbeat_ms 200 of matcher 'm1'")


# -- endpoints ------------------------------------------------------------------------------


@pytest.mark.parametrize("endpoint", [
    "127.0.0.1:5550", "tcp://127.0.0.1", "tcp://127.0.0.1:0", "tcp://127.0.0.1:65536", "tcp://127.0.0.1:abc",
    "udp://127.0.0.1:5550", "tcp://:5550", "tcp://127.0.0.1:5550/x", "ipc://", "tcp://*:*",
])
def test_bad_zmq_endpoint(endpoint: str) -> None:
    text = replace_line(6, f'  r1: {{role: router, front: "{endpoint}", back: "tcp://127.0.0.1:5551"}}')
    message = assert_error(text, 6, f"node 'r1': front '{endpoint}'")
    assert "is not a ZeroMQ endpoint" in message or "is not in 1-65535" in message, message


def test_an_inproc_endpoint_is_refused_every_node_being_a_process_of_its_own() -> None:
    # A review's cluster with a matcher on inproc:// passed zmx check and started; its gateway
    # then waited for the feed forever.
    text = replace_line(7, '  m1: {role: matcher, pub: "inproc://m1pub", snapshot: "tcp://127.0.0.1:5561", '
                           'data_dir: "var/m1"}')
    assert_error(text, 7, "node 'm1': pub 'inproc://m1pub': inproc:// reaches only sockets of the same process")


def test_endpoint_wrong_type() -> None:
    text = replace_line(6, '  r1: {role: router, front: 5550, back: "tcp://127.0.0.1:5551"}')
    assert_error(text, 6, "node 'r1': front must be a string like 'tcp://127.0.0.1:5550', got an integer (5550)")


@pytest.mark.parametrize("endpoint", ["tcp://localhost:5550", "tcp://eth0:5550", "tcp://[::1]:5550",
                                      "ipc:///tmp/zmx-front", "tcp://*:65535"])
def test_good_zmq_endpoints(endpoint: str) -> None:
    text = replace_line(6, f'  r1: {{role: router, front: "{endpoint}", back: "tcp://127.0.0.1:5551"}}')
    assert parse(text).node("r1").front == endpoint  # type: ignore[union-attr]


@pytest.mark.parametrize("listen", ["8765", "ws://127.0.0.1:8765", "127.0.0.1:99999", "127.0.0.1:0", ":8765"])
def test_bad_gateway_listen(listen: str) -> None:
    text = replace_line(9, f'  g1: {{role: gateway, listen: "{listen}"}}')
    assert_error(text, 9, f"node 'g1': listen '{listen}'")


def test_same_endpoint_twice() -> None:
    text = replace_line(8, '  m2: {role: matcher, pub: "tcp://127.0.0.1:5560", snapshot: "tcp://127.0.0.1:5563", '
                           'data_dir: "var/m2"}')
    assert_error(text, 8, "node 'm2': pub 'tcp://127.0.0.1:5560' uses port 5560, already used by node 'm1' pub "
                          "'tcp://127.0.0.1:5560' (line 7)")


def test_same_endpoint_twice_in_one_node() -> None:
    text = replace_line(6, '  r1: {role: router, front: "tcp://127.0.0.1:5550", back: "tcp://127.0.0.1:5550"}')
    assert_error(text, 6, "node 'r1': back 'tcp://127.0.0.1:5550' uses port 5550, already used by node 'r1' front")


@pytest.mark.parametrize("first, second", [
    ("tcp://*:5550", "tcp://127.0.0.1:5550"),
    ("tcp://127.0.0.1:5550", "tcp://0.0.0.0:5550"),
    ("tcp://localhost:5550", "tcp://127.0.0.1:5550"),
])
def test_wildcard_host_clashes_by_port(first: str, second: str) -> None:
    text = replace_line(6, f'  r1: {{role: router, front: "{first}", back: "tcp://127.0.0.1:5551"}}\n'
                           f'  r2: {{role: router, front: "{second}", back: "tcp://127.0.0.1:5552"}}')
    assert_error(text, 7, f"node 'r2': front '{second}' uses port 5550, already used by node 'r1' front")


def test_different_hosts_may_share_a_port() -> None:
    text = replace_line(6, '  r1: {role: router, front: "tcp://10.0.0.1:5550", back: "tcp://10.0.0.1:5551"}\n'
                           '  r2: {role: router, front: "tcp://10.0.0.2:5550", back: "tcp://10.0.0.2:5551"}')
    assert len(parse(text).nodes_by_role("router")) == 2


def test_gateway_listen_clashes_with_a_zmq_port() -> None:
    text = replace_line(9, '  g1: {role: gateway, listen: "0.0.0.0:5561"}')
    assert_error(text, 9, "node 'g1': listen '0.0.0.0:5561' uses port 5561, already used by node 'm1' snapshot "
                          "'tcp://127.0.0.1:5561' (line 7)")


def test_two_gateways_on_one_port() -> None:
    text = BASE + '  g2: {role: gateway, listen: "127.0.0.1:8765"}\n'
    assert_error(text, 10, "node 'g2': listen '127.0.0.1:8765' uses port 8765, already used by node 'g1' listen")


def test_same_ipc_endpoint_twice() -> None:
    text = replace_line(6, '  r1: {role: router, front: "ipc:///tmp/zmx", back: "ipc:///tmp/zmx"}')
    assert_error(text, 6, "node 'r1': back 'ipc:///tmp/zmx' is already used by node 'r1' front 'ipc:///tmp/zmx'")


def test_same_ipc_file_spelled_twice() -> None:
    """One file, two spellings: the second node to bind took it from the first (ZeroMQ
    removes the file first), or a node refused its own path as another process's."""
    text = replace_line(6, '  r1: {role: router, front: "ipc://var/r1", back: "ipc://./var//r1"}')
    assert_error(text, 6, "node 'r1': back 'ipc://./var//r1' is already used by node 'r1' front 'ipc://var/r1'")
    parse(replace_line(6, '  r1: {role: router, front: "ipc://@r1", back: "ipc://@./r1"}'))  # abstract: names


# -- upstream -------------------------------------------------------------------------------


RELAY = '  x1: {role: relay, pub: "tcp://127.0.0.1:5570"%s}'


def test_relay_upstream_defaults_to_every_matcher() -> None:
    topology = parse(BASE + RELAY % "" + "\n")
    assert topology.node("x1").upstream == ("m1", "m2")  # type: ignore[union-attr]
    assert topology.node("g1").upstream == ("x1",)  # type: ignore[union-attr]


def test_relay_upstream_unknown_node() -> None:
    text = BASE + RELAY % ", upstream: [m1, m7]" + "\n"
    assert_error(text, 10, "node 'x1': upstream 'm7' is not a node (expected one of: m1, m2)")


def test_relay_upstream_wrong_role() -> None:
    text = BASE + RELAY % ", upstream: [m1, g1]" + "\n"
    assert_error(text, 10, "node 'x1': upstream 'g1' is a gateway, not a matcher")


def test_gateway_upstream_wrong_role() -> None:
    text = replace_line(9, '  g1: {role: gateway, listen: "127.0.0.1:8765", upstream: [r1]}')
    assert_error(text, 9, "node 'g1': upstream 'r1' is a router, not a matcher or relay")


def test_gateway_upstream_unknown_node() -> None:
    text = replace_line(9, '  g1: {role: gateway, listen: "127.0.0.1:8765", upstream: [x9]}')
    assert_error(text, 9, "node 'g1': upstream 'x9' is not a node (expected one of: m1, m2)")


@pytest.mark.parametrize("value, problem", [
    ("m1", "upstream must be a list of matcher or relay names like [m1, m2], got a string ('m1')"),
    ("[]", "upstream is empty"),
    ("[m1, 5]", "upstream must be a list"),
    ("[m1, m1]", "upstream names 'm1' twice"),
])
def test_gateway_upstream_shape(value: str, problem: str) -> None:
    text = replace_line(9, f'  g1: {{role: gateway, listen: "127.0.0.1:8765", upstream: {value}}}')
    assert_error(text, 9, f"node 'g1': {problem}")


def test_gateway_explicit_upstream_mixes_relays_and_matchers() -> None:
    text = replace_line(9, '  g1: {role: gateway, listen: "127.0.0.1:8765", upstream: [x1, m2]}') \
        + RELAY % ", upstream: [m1]" + "\n"
    topology = parse(text)
    assert topology.node("g1").upstream == ("x1", "m2")  # type: ignore[union-attr]
    assert topology.matchers_behind("g1") == ("m1", "m2")
    assert topology.upstream_endpoints("g1") == ("tcp://127.0.0.1:5570", "tcp://127.0.0.1:5562")


def test_gateway_must_not_reach_a_matcher_twice() -> None:
    text = replace_line(9, '  g1: {role: gateway, listen: "127.0.0.1:8765", upstream: [x1, m1]}') \
        + RELAY % "" + "\n"
    assert_error(text, 9, "node 'g1': upstream reaches matcher 'm1' twice (through 'x1' and 'm1')")


@pytest.mark.parametrize("gateway, relay, problem", [
    ("upstream: [m1]", "", "its upstream reaches no feed of ETH-USDT (matcher 'm2'): its clients would get no "
                           "update of it; add 'm2', or a relay that carries it, to its upstream"),
    ("upstream: [x1]", ", upstream: [m2]", "its upstream reaches no feed of BTC-USDT (matcher 'm1')"),
])
def test_a_gateway_must_hear_every_matcher_that_owns_a_symbol(gateway: str, relay: str, problem: str) -> None:
    """Each symbol is a channel of every gateway: one it gets no feed of would show a book that
    never moves, with no error."""
    text = replace_line(9, f'  g1: {{role: gateway, listen: "127.0.0.1:8765", {gateway}}}') + RELAY % relay + "\n"
    assert_error(text, 9, f"node 'g1': {problem}")


def test_a_matcher_that_owns_no_symbol_need_not_be_heard() -> None:
    m3 = '  m3: {role: matcher, pub: "tcp://127.0.0.1:5564", snapshot: "tcp://127.0.0.1:5565", data_dir: "var/m3"}'
    text = BASE.replace("  g1:", m3 + "\n  g1:").replace('"127.0.0.1:8765"}', '"127.0.0.1:8765", upstream: [m1, m2]}')
    assert parse(text).node("g1").upstream == ("m1", "m2")  # type: ignore[union-attr]


RELAY2 = '  x2: {role: relay, pub: "tcp://127.0.0.1:5571"%s}'


def test_a_gateways_standby_takes_the_place_of_the_upstream_node_with_the_same_matchers() -> None:
    text = replace_line(9, '  g1: {role: gateway, listen: "127.0.0.1:8765", upstream: [x1, m2], standby: [x2, m1]}') \
        + RELAY % ", upstream: [m1]" + "\n" + RELAY2 % ", upstream: [m1]" + "\n"
    topology = parse(text)
    assert topology.node("g1").standby == ("x2", "m1")  # type: ignore[union-attr]
    assert topology.feed_paths("g1") == (("x1", "x2", "m1"), ("m2",))
    assert topology.matchers_behind("g1") == ("m1", "m2")  # through the upstream nodes only


@pytest.mark.parametrize("gateway, problem", [
    ("upstream: [x1], standby: [x1]", "'x1' is in both upstream and standby"),
    ("upstream: [x1], standby: [m2]", "standby 'm2' carries m2, the matchers of none of its upstream nodes"),
    ("upstream: [x1], standby: [x2]", "standby 'x2' carries m1, m2, the matchers of none of its upstream nodes"),
    ("upstream: [x1], standby: [r1]", "standby 'r1' is a router, not a matcher or relay"),
    ("upstream: [x1], standby: []", "standby is empty"),
    ("upstream: [x1], standby: [5]", "standby must be a list of matcher or relay names like [m1, m2]; one of them: "
                                     "YAML reads it as an integer (5), not as text"),
    ("upstream: x1", "upstream must be a list of matcher or relay names like [m1, m2], got a string ('x1')"),
])
def test_a_standby_that_cannot_take_an_upstream_nodes_place_is_refused(gateway: str, problem: str) -> None:
    text = replace_line(9, f'  g1: {{role: gateway, listen: "127.0.0.1:8765", {gateway}}}') \
        + RELAY % ", upstream: [m1]" + "\n" + RELAY2 % "" + "\n"
    assert_error(text, 9, f"node 'g1': {problem}")


# -- immutability ---------------------------------------------------------------------------


def test_everything_is_frozen() -> None:
    topology = parse(BASE + RELAY % "" + "\n")
    with pytest.raises(dataclasses.FrozenInstanceError):
        topology.cluster = "other"  # type: ignore[misc]
    with pytest.raises(TypeError):
        topology.nodes["m9"] = topology.node("m1")  # type: ignore[index]
    with pytest.raises(TypeError):
        topology.symbols["DOGE-USDT"] = topology.symbols["BTC-USDT"]  # type: ignore[index]
    with pytest.raises(TypeError):
        del topology.owners["BTC-USDT"]  # type: ignore[attr-defined]
    for node in topology.nodes.values():
        with pytest.raises(dataclasses.FrozenInstanceError):
            node.name = "other"  # type: ignore[misc]
        with pytest.raises((AttributeError, TypeError)):
            node.extra = 1  # type: ignore[union-attr]  # slots: no new attributes
    with pytest.raises(dataclasses.FrozenInstanceError):
        topology.node("g1").limits.heartbeat_s = 1  # type: ignore[union-attr, misc]
    assert isinstance(topology.node("x1").upstream, tuple)  # type: ignore[union-attr]
    assert hash(topology) == hash(parse(BASE + RELAY % "" + "\n"))
    assert topology == parse(BASE + RELAY % "" + "\n")


def test_a_topology_built_by_hand_is_frozen_too() -> None:
    symbols = {"BTC-USDT": SymbolSpec("BTC-USDT", "0.01", "0.001")}
    topology = Topology(cluster="x", symbols=symbols, owners={"BTC-USDT": "m1"}, nodes={})
    symbols.clear()
    assert list(topology.symbols) == ["BTC-USDT"]


# -- files ----------------------------------------------------------------------------------


def test_shipped_local_topology() -> None:
    topology = load_topology(REPO / "topology" / "local.yaml")
    assert topology.cluster == "local"
    assert [n.name for n in topology.nodes_by_role("router")] == ["r1"]
    r1 = topology.node("r1")
    assert (r1.front, r1.back) == ("tcp://127.0.0.1:5550", "tcp://127.0.0.1:5551")  # type: ignore[union-attr]
    assert [n.name for n in topology.nodes_by_role("matcher")] == ["m1", "m2"]
    assert topology.node("m1").data_dir == "var/m1"  # type: ignore[union-attr]
    assert topology.node("m2").data_dir == "var/m2"  # type: ignore[union-attr]
    assert topology.node("m1").pub == "tcp://127.0.0.1:5560"  # type: ignore[union-attr]
    assert topology.node("m2").snapshot == "tcp://127.0.0.1:5563"  # type: ignore[union-attr]
    assert {"BTC-USDT", "ETH-USDT"} <= set(topology.symbols)
    assert topology.owner_of("BTC-USDT") == "m1"
    assert topology.owner_of("ETH-USDT") == "m2"
    assert topology.symbols["BTC-USDT"].tick_size == "0.01"
    assert topology.symbols["BTC-USDT"].lot_size == "0.00001"
    assert len(topology.symbols_of("m1")) >= 2 and len(topology.symbols_of("m2")) >= 2
    (gateway,) = topology.nodes_by_role("gateway")
    assert gateway.url == "ws://127.0.0.1:8765"  # type: ignore[union-attr]
    assert topology.source.endswith("local.yaml")


def test_shipped_sharded_topology() -> None:
    topology = load_topology(REPO / "topology" / "sharded.yaml")
    assert len(topology.nodes_by_role("router")) == 2
    matchers = topology.nodes_by_role("matcher")
    assert len(matchers) == 4
    assert len(topology.symbols) >= 8
    assert all(len(topology.symbols_of(m.name)) >= 2 for m in matchers)
    relay, spare = topology.nodes_by_role("relay")
    assert relay.upstream == spare.upstream == tuple(m.name for m in matchers)  # type: ignore[union-attr]
    gateways = topology.nodes_by_role("gateway")
    assert len(gateways) == 2
    assert all(g.upstream == (relay.name,) and g.standby == (spare.name,) for g in gateways)  # type: ignore
    assert all(topology.feed_paths(g.name) == ((relay.name, spare.name),) for g in gateways)
    assert len({g.port for g in gateways}) == 2  # type: ignore[union-attr]
    ports = [int(e.rsplit(":", 1)[1]) for n in topology.nodes.values()
             for e in (getattr(n, k, None) for k in ("front", "back", "pub", "snapshot", "listen")) if e]
    assert all(5700 <= p < 5800 for p in ports), ports
    assert len(ports) == len(set(ports))


def test_load_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(replace_line(8, "  m3: {role: matchr}"), encoding="utf-8")
    with pytest.raises(TopologyError) as info:
        load_topology(path)
    assert str(info.value) == (f"{path}:8: node 'm3': unknown role 'matchr' "
                               "(expected one of: gateway, matcher, relay, router)")


def test_missing_and_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(TopologyError, match=r"nope\.yaml: cannot read the topology"):
        load_topology(tmp_path / "nope.yaml")
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"cluster: \xff\xfe\n")
    with pytest.raises(TopologyError, match="not UTF-8"):
        load_topology(binary)


def test_a_file_too_big_to_be_a_topology_is_refused_before_it_is_read_whole(tmp_path: Path) -> None:
    """A device such as /dev/zero, or the wrong file: refused once it is past 1 MiB, not read
    until the memory runs out."""
    huge = tmp_path / "huge.yaml"
    huge.write_text("# " + "x" * (1 << 20) + "\n", encoding="utf-8")
    with pytest.raises(TopologyError, match=r"huge\.yaml: more than 1,048,576 characters: not a topology"):
        load_topology(huge)
    with pytest.raises(TopologyError, match="more than 1,048,576 characters"):
        load_topology("/dev/zero")


@pytest.mark.parametrize("nested", ["cluster: " + "[" * 2000 + "]" * 2000, "cluster: " + "{a: " * 2000 + "}" * 2000])
def test_yaml_nested_too_deeply_is_refused_with_a_message(nested: str) -> None:
    """PyYAML builds nested collections recursively: past the interpreter's recursion limit
    the topology gets an error of its own, not a traceback."""
    assert error_of(nested) == f"{SOURCE}: YAML nested too deeply to be a topology"


def test_topology_error_is_a_zmx_error() -> None:
    assert issubclass(TopologyError, ZmxError)
