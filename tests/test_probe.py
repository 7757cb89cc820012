"""The probe: its measuring core (``ProbeStats``) on frames made here, and ``zmx probe`` as a
real process against a publisher that the test owns."""

from __future__ import annotations

import json
import math
import random
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq
from click.testing import CliRunner
from nodes import free_ports, write_topology
from rich.console import Console

from zmx.cli import main
from zmx.codec import encode_account_publication, encode_publication
from zmx.events import BookChanged, FeedHeartbeat, OrderCanceled, TradeOccurred
from zmx.model import Side
from zmx.node.probe import LatencyHistogram, ProbeStats, interval_table, summary_table
from zmx.node.runtime import load_topology
from zmx.topics import topic

TIMEOUT_MS = 10_000


def book(symbol: str, seq: int, ts_ns: int = 1) -> bytes:
    return encode_publication(symbol, [BookChanged(symbol, seq, ts_ns, ((100, 1),), ())])


def trade_and_book(symbol: str, seq: int, ts_ns: int) -> bytes:
    return encode_publication(symbol, [TradeOccurred(symbol, seq, ts_ns, 1, 100, 1, Side.BUY),
                                       BookChanged(symbol, seq, ts_ns, ((100, 0),), ())])


def heartbeat(symbol: str) -> bytes:
    """The heartbeat of a matcher before they carried a seq (still taken)."""
    return encode_publication(symbol, ())


def beat(symbol: str, seq: int) -> bytes:
    return encode_publication(symbol, (FeedHeartbeat(symbol, seq, 5),))


# -- ProbeStats ------------------------------------------------------------------------------


def test_gaps_are_the_missing_seqs_of_each_symbol() -> None:
    stats = ProbeStats()
    for seq in (1, 2, 3, 5, 6, 9):  # 4, 7 and 8 missing
        stats.feed(book("BTC-USDT", seq), 10)
    for seq in (100, 101):  # a probe that attaches mid-stream sees no gap before its first message
        stats.feed(book("ETH-USDT", seq), 10)
    btc, eth = stats.symbols["BTC-USDT"], stats.symbols["ETH-USDT"]
    assert (btc.messages, btc.last_seq, btc.gaps) == (6, 9, 3)
    assert (eth.messages, eth.last_seq, eth.gaps) == (2, 101, 0)
    assert stats.gaps == 3
    assert stats.messages == 8


def test_a_heartbeat_carries_the_seq_of_its_symbols_last_publication() -> None:
    """At that seq: nothing missed. Above it: the publications in between were lost. Below it:
    the matcher lost its history (backwards)."""
    stats = ProbeStats()
    for frame in (book("BTC-USDT", 1), beat("BTC-USDT", 1), beat("BTC-USDT", 1), book("BTC-USDT", 2),
                  beat("BTC-USDT", 4), book("BTC-USDT", 5), beat("BTC-USDT", 2)):
        stats.feed(frame, 10)
    btc = stats.symbols["BTC-USDT"]
    assert (btc.messages, btc.heartbeats, btc.last_seq, btc.gaps, btc.backwards) == (7, 4, 2, 2, 1)
    assert stats.latency.count == 3  # publications only


def test_heartbeats_are_messages_without_a_seq() -> None:
    stats = ProbeStats()
    stats.feed(book("BTC-USDT", 1), 10)
    stats.feed(heartbeat("BTC-USDT"), 10)
    stats.feed(heartbeat("BTC-USDT"), 10)
    stats.feed(book("BTC-USDT", 2), 10)
    stats.feed(heartbeat("SOL-USDT"), 10)
    btc = stats.symbols["BTC-USDT"]
    assert (btc.messages, btc.heartbeats, btc.last_seq, btc.gaps) == (4, 2, 2, 0)
    sol = stats.symbols["SOL-USDT"]
    assert (sol.messages, sol.heartbeats, sol.last_seq) == (1, 1, None)
    assert stats.messages == 5
    assert stats.latency.count == 2  # heartbeats have no ts_ns to measure


def test_a_seq_that_goes_back_is_counted_and_followed() -> None:
    stats = ProbeStats()
    for seq in (10, 11, 11, 1, 2):  # a duplicate, then a publisher that started over
        stats.feed(book("BTC-USDT", seq), 10)
    btc = stats.symbols["BTC-USDT"]
    assert (btc.backwards, btc.gaps, btc.last_seq) == (2, 0, 2)


def test_malformed_frames_are_counted_never_raised() -> None:
    stats = ProbeStats()
    rng = random.Random(7)
    good = book("BTC-USDT", 1)
    bad = [
        b"",
        b"no topic at all",
        rng.randbytes(200),
        b"BTC-USDT\x00",  # a topic and no body
        b"BTC-USDT\x00\x09" + good[len(topic("BTC-USDT")) + 1:],  # an unknown version byte
        good[:-3],  # truncated
        book("ETH-USDT", 1).replace(b"ETH-USDT\x00", b"BTC-USDT\x00", 1),  # another symbol's event
        topic("BTC-USDT") + b"\x01" + b"\x91" * 5000,  # nested too deeply
    ]
    for frame in bad:
        stats.feed(frame, 10)
    stats.feed(good, 10)
    assert stats.decode_errors == len(bad)
    assert stats.messages == 1
    assert stats.bytes == sum(map(len, bad)) + len(good)
    assert stats.last_error
    assert stats.symbols["BTC-USDT"].last_seq == 1


def test_private_publications_are_counted_apart() -> None:
    stats = ProbeStats()
    event = OrderCanceled("BTC-USDT", 3, 1, "o1", "alice", Side.BUY, 100, 0, 1, "user")
    stats.feed(encode_account_publication("alice", [event]), 10)
    assert (stats.messages, stats.private, stats.gaps) == (1, 1, 0)
    assert "@alice" not in stats.symbols


def test_latency_is_receive_time_minus_the_events_ts() -> None:
    stats = ProbeStats()
    for seq in range(1, 101):  # latencies 1 µs .. 100 µs
        stats.feed(trade_and_book("BTC-USDT", seq, ts_ns=1_000_000), 1_000_000 + seq * 1000)
    summary = stats.summary(1.0)["latency_us"]
    assert summary["samples"] == 100
    assert summary["p50"] == pytest.approx(50, rel=0.01)
    assert summary["p99"] == pytest.approx(99, rel=0.01)
    assert summary["max"] == 100.0
    stats.feed(book("BTC-USDT", 101, ts_ns=5000), 4000)  # clocks apart: counted as 0, not negative
    assert stats.latency.percentile(0.5) == 0


def test_latency_percentiles_are_within_one_percent() -> None:
    rng = random.Random(11)
    values = [int(rng.lognormvariate(11, 1.5)) for _ in range(20_000)]
    histogram = LatencyHistogram()
    for value in values:
        histogram.add(value)
    values.sort()
    for p in (1, 50, 90, 99, 99.9, 100):
        exact = values[max(1, math.ceil(len(values) * p / 100)) - 1]
        assert histogram.percentile(p) == pytest.approx(exact, rel=0.01), p
    assert histogram.max == values[-1]
    assert LatencyHistogram().percentile(50) is None


def test_an_interval_counts_since_the_previous_one() -> None:
    stats = ProbeStats()
    stats.feed(book("BTC-USDT", 1, ts_ns=0), 2000)
    stats.feed(book("BTC-USDT", 3, ts_ns=0), 4000)
    stats.feed(b"junk", 4000)
    first = stats.interval(0.5)
    assert (first.messages, first.bytes, first.gaps, first.decode_errors) == (
        2, 2 * len(book("BTC-USDT", 1)) + 4, 1, 1)
    assert first.messages_per_s == 4
    assert first.latency_p50_us == pytest.approx(2.0, rel=0.01)
    second = stats.interval(1.0)
    assert (second.messages, second.bytes, second.gaps, second.latency_p50_us) == (0, 0, 0, None)
    assert stats.messages == 2  # the totals stay


def test_tables_show_rates_symbols_and_gaps() -> None:
    stats = ProbeStats()
    for seq in (1, 2, 4):
        stats.feed(book("BTC-USDT", seq, ts_ns=0), 3000)
    console = Console(record=True, width=80)  # a plain terminal: every header and figure whole
    console.print(interval_table("m1", stats.interval(1.0), stats, 1.0))
    console.print(summary_table("m1 (tcp://127.0.0.1:5560)", stats.summary(1.0)))
    text = console.export_text()
    assert "msgs/s" in text and "p99 µs" in text and "undecoded" in text and "max µs" in text
    assert "…" not in text, text
    assert "BTC-USDT" in text
    assert "summary" in text
    assert "(private)" not in text


def test_tables_show_a_seq_that_went_back() -> None:
    """A matcher that restarted without its history: no gap, and until the tables had a column
    for it only --json said so."""
    stats = ProbeStats()
    for seq in (5, 6, 1):
        stats.feed(book("BTC-USDT", seq, ts_ns=0), 3000)
    console = Console(record=True, width=80)
    console.print(interval_table("m1", stats.interval(1.0), stats, 1.0))
    console.print(summary_table("m1", stats.summary(1.0)))
    text = console.export_text()
    headers = [[c.strip() for c in line.split("┃")] for line in text.splitlines() if "last seq" in line]
    rows = [[c.strip() for c in line.split("│")] for line in text.splitlines() if "BTC-USDT" in line]
    assert len(headers) == len(rows) == 2, text
    for header, row in zip(headers, rows):
        assert dict(zip(header, row))["back"] == "1" and dict(zip(header, row))["gaps"] == "0", text


def test_tables_count_the_private_publications_in_a_row_of_their_own() -> None:
    """The messages column adds up to the total: the accounts' publications (fills of
    resting orders) are a row, not missing."""
    stats = ProbeStats()
    stats.feed(book("BTC-USDT", 1, ts_ns=0), 3000)
    for n in range(2):
        event = OrderCanceled("BTC-USDT", 3, 1, f"o{n}", "alice", Side.BUY, 100, 0, 1, "user")
        stats.feed(encode_account_publication("alice", [event]), 3000)
    console = Console(record=True, width=80)
    console.print(interval_table("m1", stats.interval(1.0), stats, 1.0))
    console.print(summary_table("m1", stats.summary(1.0)))
    rows = [line.split("│") for line in console.export_text().splitlines() if "(private)" in line]
    assert [row[2].strip() for row in rows] == ["2", "2"], console.export_text()


# -- zmx probe as a process ------------------------------------------------------------------


class ProbeProcess:
    def __init__(self, args: list[str], cwd: Path) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "zmx.cli", "probe", *args], cwd=cwd,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                                     text=True)

    def finish(self, timeout: float = 30) -> tuple[int, str, str]:
        out, err = self.proc.communicate(timeout=timeout)
        return self.proc.returncode, out, err

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.communicate()


@pytest.fixture
def probes() -> Iterator[list[ProbeProcess]]:
    started: list[ProbeProcess] = []
    try:
        yield started
    finally:
        for probe in started:
            probe.stop()


def publisher(ctx: zmq.Context, endpoint: str) -> zmq.Socket:
    xpub = ctx.socket(zmq.XPUB)
    xpub.linger = 0
    xpub.bind(endpoint)
    return xpub


def wait_subscription(xpub: zmq.Socket, probe: ProbeProcess) -> bytes:
    if not xpub.poll(TIMEOUT_MS):
        probe.stop()
        raise AssertionError(f"the probe never subscribed: {probe.proc.stderr.read() if probe.proc.stderr else ''}")
    return xpub.recv()


def test_zmx_probe_json_counts_messages_and_a_gap(tmp_path: Path, context: zmq.Context,
                                                  probes: list[ProbeProcess]) -> None:
    endpoint = f"tcp://127.0.0.1:{free_ports(1)[0]}"
    xpub = publisher(context, endpoint)
    probe = ProbeProcess([endpoint, "--duration", "2", "--json"], tmp_path)
    probes.append(probe)
    assert wait_subscription(xpub, probe) == b"\x01"  # everything
    for seq in (1, 2, 3, 5):  # 4 is missing
        xpub.send(trade_and_book("BTC-USDT", seq, time.time_ns()))
    xpub.send(heartbeat("BTC-USDT"))
    for seq in (10, 11):
        xpub.send(book("ETH-USDT", seq, time.time_ns()))
    xpub.send(b"garbage that is no publication")
    code, out, err = probe.finish()
    assert code == 0, err
    lines = out.splitlines()
    assert len(lines) == 1, out  # one JSON object, no table
    summary = json.loads(lines[0])
    assert summary["messages"] == 7
    assert summary["decode_errors"] == 1
    assert summary["gaps"] == 1
    assert summary["symbols"]["BTC-USDT"] == {"messages": 5, "heartbeats": 1, "last_seq": 5, "gaps": 1,
                                              "backwards": 0}
    assert summary["symbols"]["ETH-USDT"]["last_seq"] == 11
    assert summary["symbols"]["ETH-USDT"]["gaps"] == 0
    assert summary["latency_us"]["samples"] == 6
    assert 0 <= summary["latency_us"]["p50"] <= summary["latency_us"]["p99"] <= summary["latency_us"]["max"]
    assert summary["latency_us"]["max"] < 10_000_000  # well under 10 s on one machine
    assert summary["bytes"] > 0
    assert 2 <= summary["duration"] < 10
    assert summary["endpoint"] == endpoint


def test_zmx_probe_a_node_of_a_topology_for_one_symbol(tmp_path: Path, context: zmq.Context,
                                                       probes: list[ProbeProcess]) -> None:
    """TARGET as a node name: the probe connects to that matcher's pub and subscribes one topic;
    the live table and the summary are printed."""
    path = write_topology(tmp_path)
    m1 = load_topology(path).nodes["m1"]
    xpub = publisher(context, m1.pub)  # type: ignore[union-attr]
    probe = ProbeProcess(["m1", "-t", path.name, "--symbol", "BTC-USDT", "--duration", "1.5"], tmp_path)
    probes.append(probe)
    assert wait_subscription(xpub, probe) == b"\x01" + topic("BTC-USDT")
    xpub.send(book("SOL-USDT", 1))  # nobody subscribed: dropped at the publisher
    xpub.send(book("BTC-USDT", 41))
    xpub.send(book("BTC-USDT", 42))
    code, out, err = probe.finish()
    assert code == 0, err
    assert "summary" in out
    assert "BTC-USDT" in out and "42" in out
    assert "SOL-USDT" not in out


@pytest.mark.parametrize(("args", "message"), [
    (["r1"], "node 'r1' is a router; it publishes nothing"),
    (["nope"], "no node named 'nope'"),
    (["m1", "--symbol", "ETH-USDT"], "node 'm1' does not publish 'ETH-USDT'"),
    (["tcp://127.0.0.1:5999", "--symbol", "@alice"], "must not start with '@'"),
    (["http://127.0.0.1:80"], "is not a ZeroMQ endpoint"),
    (["tcp://bad"], "'tcp://bad' is not tcp://host:port"),  # was a traceback
    # ZeroMQ connected these somewhere, and the probe said "nothing arrived" (exit 1)
    (["tcp://:19990"], "'tcp://:19990' is not tcp://host:port"),
    (["tcp://127.0.0.1:19990;x"], "'tcp://127.0.0.1:19990;x' is not tcp://host:port"),
    (["tcp://127.0.0.1:151062"], "port 151062 of tcp://127.0.0.1:151062 is not one of 1-65535"),
    # ZeroMQ would take the port modulo 65536 (19742): another node's feed
    (["tcp://127.0.0.1:85278"], "port 85278 of tcp://127.0.0.1:85278 is not one of 1-65535"),
    (["m1", "--duration", "nan"], "nan is not a number of seconds"),  # (it ran on forever)
])
def test_zmx_probe_refuses_a_bad_target(tmp_path: Path, args: list[str], message: str) -> None:
    path = write_topology(tmp_path)
    result = CliRunner().invoke(main, ["probe", "-t", str(path), "--duration", "1", *args])
    assert result.exit_code == 2, result.output
    assert message in result.stderr


def test_zmx_probe_takes_a_wildcard_endpoint_as_this_machine(tmp_path: Path, context: zmq.Context,
                                                             probes: list[ProbeProcess]) -> None:
    """An operator pastes a bind address from a topology: ``tcp://*:PORT`` was checked as this
    machine, then connected to as given, and ZeroMQ's refusal came as a traceback."""
    port = free_ports(1)[0]
    xpub = publisher(context, f"tcp://127.0.0.1:{port}")
    probe = ProbeProcess([f"tcp://*:{port}", "--duration", "1", "--json"], tmp_path)
    probes.append(probe)
    wait_subscription(xpub, probe)
    xpub.send(book("BTC-USDT", 7, time.time_ns()))
    code, out, err = probe.finish()
    assert code == 0, err
    summary = json.loads(out)
    assert summary["endpoint"] == f"tcp://127.0.0.1:{port}" and summary["symbols"]["BTC-USDT"]["last_seq"] == 7


def test_zmx_probe_says_when_only_foreign_frames_arrived(tmp_path: Path, context: zmq.Context,
                                                         probes: list[ProbeProcess]) -> None:
    """Frames came, none a zmx publication: another publisher, not a quiet feed. It said
    "nothing arrived ... is one publishing there?", which pointed the other way."""
    endpoint = f"tcp://127.0.0.1:{free_ports(1)[0]}"
    xpub = publisher(context, endpoint)
    probe = ProbeProcess([endpoint, "--duration", "1", "--json"], tmp_path)
    probes.append(probe)
    wait_subscription(xpub, probe)
    for _ in range(3):
        xpub.send(b"garbage")
    code, out, err = probe.finish()
    assert code == 1
    summary = json.loads(out)
    assert summary["decode_errors"] == 3 and summary["messages"] == 0
    assert summary["last_decode_error"] and summary["last_decode_error"] in err
    assert f"3 frame(s) arrived from {endpoint} in " in err and "none was a zmx publication" in err, err
    assert "nothing arrived" not in err


@pytest.mark.parametrize("as_json", [False, True])
def test_zmx_probe_says_when_nothing_arrived_and_exits_1(as_json: bool) -> None:
    (port,) = free_ports(1)  # nobody publishes there: ZeroMQ connects in silence all the same
    endpoint = f"tcp://127.0.0.1:{port}"
    result = CliRunner().invoke(main, ["probe", endpoint, "--duration", "0.3", *(["--json"] if as_json else [])])
    assert result.exit_code == 1, result.output  # a script checking a feed can tell
    assert f"nothing arrived from {endpoint} in 0.3 s" in result.stderr
    if as_json:
        assert json.loads(result.stdout)["messages"] == 0  # stdout stays one JSON document
