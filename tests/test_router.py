"""The router node as a real process; the test plays the matchers and the clients.

A fake matcher is a DEALER with the matcher's name as routing id, connected to the router's
back, that says HELLO / HB / BYE and answers the requests of a REQS batch with REPS by hand
(docs/wire.md). News from
a matcher (HELLO, BYE, a closed connection) and a client's request travel on different
connections, so a request may overtake the news: helpers retry until the behaviour shows
(a forwarded request, an ``unavailable`` reply), and time only the reply that shows it.
"""

from __future__ import annotations

import logging
import random
import re
import time
from collections import deque
from collections.abc import Iterator
from pathlib import Path

import msgpack
import pytest
import zmq
from nodes import Cluster, NodeProcess, write_topology

from zmx import codec
from zmx.commands import SubmitOrder
from zmx.events import OrderAccepted
from zmx.model import OrderType, Side, TimeInForce
from zmx.node.client import Client, Reply, encode_header
from zmx.node.router import MAX_HEADER_BYTES, REPLY_RETRY_S, UNSENT_CLIENTS_MAX, Malformed, MatcherTable, _Router
from zmx.node.runtime import load_topology
from zmx.node.wire import pack_replies, unpack_requests
from zmx.topology import Topology, parse_topology

FAST = 0.1  # an error reply the router gives on the spot must come within this many seconds


def order(symbol: str, order_id: str = "o1", account: str = "alice") -> SubmitOrder:
    return SubmitOrder(order_id, account, symbol, Side.BUY, OrderType.LIMIT, TimeInForce.GTC, 3_000_000, 500)


def accepted(cmd: SubmitOrder) -> OrderAccepted:
    return OrderAccepted(cmd.symbol, 0, 1, cmd.order_id, cmd.account, cmd.side, cmd.type, cmd.time_in_force,
                         cmd.price, cmd.quantity)


class FakeMatcher:
    """The test's hands on the back side: one DEALER with a matcher's routing id."""

    def __init__(self, context: zmq.Context[zmq.Socket[bytes]], back: str, name: str,
                 symbols: list[str], epoch: int = 1) -> None:
        self.name, self.symbols, self.epoch = name, symbols, epoch
        self.socket = context.socket(zmq.DEALER)
        self.socket.setsockopt(zmq.ROUTING_ID, name.encode())
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.connect(back)
        self.pending: deque[list[bytes]] = deque()  # requests of a batch not yet taken by recv

    def hello(self) -> None:
        self.socket.send_multipart([b"HELLO", msgpack.packb(
            {"node": self.name, "symbols": self.symbols, "epoch": self.epoch})])

    def heartbeat(self) -> None:
        self.socket.send_multipart([b"HB", msgpack.packb(self.epoch)])

    def bye(self) -> None:
        self.socket.send_multipart([b"BYE"])

    def recv(self, timeout: float) -> list[bytes] | None:
        """The next request, ``[client id, header, body]``, out of the REQS batches received."""
        if not self.pending:
            if not self.socket.poll(int(timeout * 1000)):
                return None
            frames = self.socket.recv_multipart()
            assert len(frames) == 2 and frames[0] == b"REQS", frames
            records, problem = unpack_requests(frames[1])
            assert not problem, problem
            self.pending.extend(list(r) for r in records)
        return self.pending.popleft()

    def drain(self) -> None:
        while self.recv(0) is not None:
            pass

    def answer(self, req: list[bytes], status: bytes = b"ok", payload: bytes | None = None) -> None:
        """A REPS of one reply to a request; by default ``ok`` with the OrderAccepted of the
        order it carries."""
        client, header, body = req
        if payload is None:
            payload = codec.encode_batch([accepted(codec.decode(body))])  # type: ignore[arg-type]
        self.socket.send_multipart([b"REPS", pack_replies([(client, header, status, payload)])])

    def close(self) -> None:
        self.socket.close(linger=0)


class Setup:
    def __init__(self, cluster: Cluster, topology: Topology) -> None:
        self.cluster = cluster
        self.topology = topology
        self.router: NodeProcess = cluster.start("r1")
        self.context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        self.back = topology.nodes["r1"].back  # type: ignore[union-attr]
        self.front = topology.nodes["r1"].front  # type: ignore[union-attr]
        self.closeables: list[FakeMatcher | Client | zmq.Socket[bytes]] = []

    def matcher(self, name: str, epoch: int = 1) -> FakeMatcher:
        m = FakeMatcher(self.context, self.back, name, list(self.topology.symbols_of(name)), epoch)
        self.closeables.append(m)
        return m

    def client(self) -> Client:
        c = Client.from_topology(self.topology, context=self.context)
        self.closeables.append(c)
        return c

    def raw(self, name: bytes | None = None) -> zmq.Socket[bytes]:
        """A bare DEALER on the router's front, to send anything at all; ``name``: its routing id."""
        s = self.context.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        if name is not None:
            s.setsockopt(zmq.ROUTING_ID, name)
        s.connect(self.front)
        self.closeables.append(s)
        return s

    def totals(self) -> str:
        """Stop the router and return its last log line of totals."""
        assert self.router.stop() == 0, self.router.log()
        lines = [line for line in self.router.log().splitlines() if "totals:" in line]
        assert lines, self.router.log()
        return lines[-1]

    def close(self) -> None:
        for c in self.closeables:
            c.close()
        self.context.term()


def _setup(cluster: Cluster, heartbeat_timeout_ms: int) -> Iterator[Setup]:
    cluster.topology = write_topology(cluster.directory,
                                      extra_router=f", heartbeat_timeout_ms: {heartbeat_timeout_ms}")
    s = Setup(cluster, load_topology(cluster.topology))
    try:
        yield s
    finally:
        s.close()


@pytest.fixture
def setup(cluster: Cluster) -> Iterator[Setup]:
    """Router r1 (m1: BTC-USDT, SOL-USDT; m2: ETH-USDT); a timeout no test phase reaches."""
    yield from _setup(cluster, 20_000)


@pytest.fixture
def quick_setup(cluster: Cluster) -> Iterator[Setup]:
    """The same with a 300 ms heartbeat timeout."""
    yield from _setup(cluster, 300)


def reply_to(client: Client, request_id: int, timeout: float) -> Reply | None:
    """The reply to ``request_id`` within ``timeout`` s, skipping late replies to earlier tries."""
    deadline = time.monotonic() + timeout
    while True:
        reply = client.recv(max(0.0, deadline - time.monotonic()))
        if reply is None or reply.request_id == request_id:
            return reply


def wait_routed(client: Client, matcher: FakeMatcher, symbol: str, timeout: float = 10.0) -> Reply:
    """Send orders for ``symbol`` until one reaches ``matcher`` (answered ok); that reply."""
    deadline = time.monotonic() + timeout
    n = 0
    while time.monotonic() < deadline:
        n += 1
        request_id = client.send(order(symbol, f"w{n}"))
        req = matcher.recv(0.5)
        if req is not None:
            matcher.answer(req)
            reply = reply_to(client, request_id, 5.0)
            assert reply is not None and reply.ok, reply
            return reply
        # Refused (the router has not heard the news yet), or lost with a dropped connection.
        reply = reply_to(client, request_id, 0.5)
        assert reply is None or reply.status == "unavailable", reply
    raise AssertionError(f"{symbol} never reached {matcher.name}")


def timed_refusal(client: Client, symbol: str, status: str, matcher: FakeMatcher | None = None) -> Reply:
    """Send orders for ``symbol`` until one is answered ``status``; assert that one came fast.

    A request that overtook the news reaches ``matcher`` instead and gets no answer; the next
    one is sent after a short wait."""
    deadline = time.monotonic() + 10.0
    while time.monotonic() < deadline:
        start = time.perf_counter()
        request_id = client.send(order(symbol))
        reply = reply_to(client, request_id, 0.5)
        elapsed = time.perf_counter() - start
        if reply is not None:
            assert reply.status == status, reply
            assert elapsed < FAST, f"{status} after {elapsed * 1000:.1f} ms"
            return reply
        if matcher is not None:
            matcher.drain()
    raise AssertionError(f"no {status} reply for {symbol}")


# -- routing ------------------------------------------------------------------------------


def test_orders_reach_their_owner_and_replies_their_sender(setup: Setup) -> None:
    m1, m2 = setup.matcher("m1"), setup.matcher("m2")
    m1.hello()
    m2.hello()
    alice, bob = setup.client(), setup.client()
    wait_routed(alice, m1, "BTC-USDT")
    wait_routed(bob, m2, "ETH-USDT")

    commands = [(alice, order("BTC-USDT", "a1")), (alice, order("ETH-USDT", "a2")),
                (bob, order("SOL-USDT", "b1", "bob")), (bob, order("ETH-USDT", "b2", "bob"))]
    sent = {cmd.order_id: (client, client.send(cmd), cmd) for client, cmd in commands}
    requests: dict[str, list[list[bytes]]] = {"m1": [], "m2": []}
    for m in (m1, m2):
        while len(requests[m.name]) < 2:
            req = m.recv(5.0)
            assert req is not None, f"{m.name} got {requests[m.name]}"
            requests[m.name].append(req)
        assert m.recv(0.05) is None
    # Each matcher got exactly its symbols, frames as the client sent them.
    assert sorted(codec.decode(r[2]).symbol for r in requests["m1"]) == ["BTC-USDT", "SOL-USDT"]
    assert sorted(codec.decode(r[2]).symbol for r in requests["m2"]) == ["ETH-USDT", "ETH-USDT"]
    client_ids: dict[bytes, Client] = {}
    for req in requests["m1"] + requests["m2"]:
        client_id, header, body = req
        client, request_id, cmd = sent[codec.decode(body).order_id]  # type: ignore[union-attr]
        assert header == encode_header(request_id, cmd.symbol)
        assert body == codec.encode(cmd)
        assert client_ids.setdefault(client_id, client) is client
    assert len(client_ids) == 2  # alice's and bob's

    # Answer in reverse order of arrival: each reply goes to the client that sent the request.
    for m in (m2, m1):
        for req in reversed(requests[m.name]):
            m.answer(req)
    for client in (alice, bob):
        replies = {}
        for _ in range(2):
            reply = client.recv(5.0)
            assert reply is not None and reply.ok, reply
            replies[reply.request_id] = reply
        assert client.recv(0.05) is None
        for owner, request_id, cmd in sent.values():
            if owner is client:
                assert replies[request_id].events == (accepted(cmd),)


def test_error_status_and_message_from_a_matcher_reach_the_client(setup: Setup) -> None:
    m1 = setup.matcher("m1")
    m1.hello()
    client = setup.client()
    wait_routed(client, m1, "BTC-USDT")
    request_id = client.send(order("BTC-USDT"))
    req = m1.recv(5.0)
    assert req is not None
    m1.answer(req, b"bad_request", "body: no, ünïcode".encode())
    assert client.recv(5.0) == Reply(request_id, "bad_request", (), "body: no, ünïcode")


def test_unknown_symbol_is_refused_at_once(setup: Setup) -> None:
    m1 = setup.matcher("m1")
    m1.hello()
    client = setup.client()
    wait_routed(client, m1, "BTC-USDT")
    for symbol in ("DOGE-USDT", "BTC-USD", "BTC-USDTX", "btc-usdt"):
        reply = timed_refusal(client, symbol, "unknown_symbol")
        assert symbol in reply.message
    assert m1.recv(0.05) is None


# -- unavailable ---------------------------------------------------------------------------


def test_unavailable_when_the_owner_never_connected(setup: Setup) -> None:
    client = setup.client()
    reply = timed_refusal(client, "ETH-USDT", "unavailable")
    assert "m2" in reply.message


def test_unavailable_after_bye_until_hello(setup: Setup) -> None:
    m1 = setup.matcher("m1")
    m1.hello()
    client = setup.client()
    wait_routed(client, m1, "SOL-USDT")
    m1.bye()
    reply = timed_refusal(client, "SOL-USDT", "unavailable", m1)
    assert "m1 said BYE" in reply.message
    timed_refusal(client, "BTC-USDT", "unavailable", m1)
    m1.epoch = 2
    m1.hello()
    wait_routed(client, m1, "BTC-USDT")
    assert "m1 up: BTC-USDT, SOL-USDT (epoch 2)" in setup.router.log()


def test_unavailable_when_the_matcher_connection_is_gone_then_a_restart_takes_over(setup: Setup) -> None:
    m1 = setup.matcher("m1")
    m1.hello()
    client = setup.client()
    wait_routed(client, m1, "BTC-USDT")
    m1.close()
    reply = timed_refusal(client, "BTC-USDT", "unavailable")
    assert "m1" in reply.message
    # The matcher comes back under the same routing id (ROUTER_HANDOVER) with a new epoch.
    restarted = setup.matcher("m1", epoch=2)
    restarted.hello()
    wait_routed(client, restarted, "BTC-USDT")


def test_a_second_connection_with_the_same_name_takes_over(setup: Setup) -> None:
    old = setup.matcher("m1")
    old.hello()
    client = setup.client()
    wait_routed(client, old, "BTC-USDT")
    new = setup.matcher("m1", epoch=2)
    new.hello()
    wait_routed(client, new, "BTC-USDT")
    old.drain()  # tries that reached it before the new connection took over
    for n in range(5):
        client.send(order("BTC-USDT", f"n{n}"))
        req = new.recv(5.0)
        assert req is not None
        new.answer(req)
        assert client.recv(5.0).ok  # type: ignore[union-attr]
    assert old.recv(0.05) is None


def test_silence_past_the_heartbeat_timeout_means_unavailable(quick_setup: Setup) -> None:
    setup = quick_setup
    m1 = setup.matcher("m1")
    m1.hello()
    client = setup.client()
    wait_routed(client, m1, "BTC-USDT")
    # Heartbeats alone keep it up for twice the timeout.
    until = time.monotonic() + 0.6
    while time.monotonic() < until:
        m1.heartbeat()
        assert m1.recv(0.1) is None
    wait_routed(client, m1, "BTC-USDT", timeout=1.0)

    silent_since = time.monotonic()  # the REP above was m1's last word
    while True:
        start = time.perf_counter()
        request_id = client.send(order("BTC-USDT"))
        reply = client.recv(0.05)
        if reply is not None:
            break
        m1.drain()  # forwarded, left unanswered: m1 is still taken for alive
        assert time.monotonic() - silent_since < 2.0, "m1 was never taken for dead"
    silent = time.monotonic() - silent_since
    assert reply.request_id == request_id and reply.status == "unavailable", reply
    assert time.perf_counter() - start < FAST
    assert silent >= 0.3, f"taken for dead after {silent * 1000:.0f} ms of silence"
    assert "m1 has been silent for" in reply.message
    # A heartbeat brings it back (as after a router restart: no HELLO needed).
    m1.heartbeat()
    wait_routed(client, m1, "BTC-USDT")


# -- malformed input -----------------------------------------------------------------------


def recv_raw(sock: zmq.Socket[bytes], timeout: float = 5.0) -> list[bytes] | None:
    return sock.recv_multipart() if sock.poll(int(timeout * 1000)) else None


def test_malformed_requests_get_bad_request_and_good_ones_still_work(setup: Setup) -> None:
    m1 = setup.matcher("m1")
    m1.hello()
    client = setup.client()
    wait_routed(client, m1, "BTC-USDT")
    raw = setup.raw()
    rng = random.Random(3)
    header = encode_header(77, "BTC-USDT")
    body = codec.encode(order("BTC-USDT"))
    junk = rng.randbytes(200)
    cases = [  # frames sent, header echoed in the bad_request reply, what the message says
        ([junk], junk[:MAX_HEADER_BYTES], "2 frames"),
        ([b""], b"", "2 frames"),
        ([header], header, "2 frames"),
        ([header, body, b"gw", b"more"], header, "2 frames"),
        ([header, body, b""], header, "reply_to"),
        ([header, body, b"\x00\x80\x00\x00\x01"], header, "reply_to"),  # ZeroMQ's kind of name
        ([header, body, b"g" * 256], header, "reply_to"),
        ([b"\x02" + header[1:], body], b"\x02" + header[1:], "version"),
        ([b"\x01\x00\x00", body], b"\x01\x00\x00", "header"),
        ([header[:9], body], header[:9], "header"),
        ([header + b"X" * 100, body], (header + b"X" * 100)[:MAX_HEADER_BYTES], "header"),
        ([b"", body], b"", "header"),
    ]
    for frames, echo, words in cases:
        raw.send_multipart(frames)
        reply = recv_raw(raw)
        assert reply is not None and len(reply) == 3, frames
        assert reply[0] == echo
        assert reply[1] == b"bad_request"
        assert words in reply[2].decode()
    assert m1.recv(0.05) is None  # none of them reached the matcher

    # The router never decodes the body: a garbage body goes to the matcher as it came.
    raw.send_multipart([header, junk])
    req = m1.recv(5.0)
    assert req is not None and req[1:] == [header, junk]
    m1.answer(req, b"bad_request", b"not a command")
    assert recv_raw(raw) == [header, b"bad_request", b"not a command"]

    # A frame above the size limit: ZeroMQ drops that connection; the client reconnects.
    client.send_frames([encode_header(999_999, "BTC-USDT"), b"\x01" + bytes(2 << 20)])
    wait_routed(client, m1, "BTC-USDT")  # requests sent meanwhile may be lost with the connection
    assert all(r.request_id != 999_999 for r in iter(lambda: client.recv(0.1), None))  # no answer to it
    totals = setup.totals()
    assert re.search(rf"malformed: client {len(cases)} \(", totals), totals


def test_a_reply_goes_to_the_dealer_its_request_names(setup: Setup) -> None:
    """A request's third frame, ``reply_to``, names the DEALER its reply goes to: the
    matcher's answer, and the router's own refusals."""
    m1 = setup.matcher("m1")
    m1.hello()
    client = setup.client()
    wait_routed(client, m1, "BTC-USDT")
    named, sender = setup.raw(b"gw.0.7"), setup.raw()
    body = codec.encode(order("BTC-USDT"))
    header = encode_header(1, "BTC-USDT")
    sender.send_multipart([header, body, b"gw.0.7"])
    req = m1.recv(5.0)
    assert req is not None and req == [b"gw.0.7", header, body]
    m1.answer(req)
    assert recv_raw(named) == [header, b"ok", codec.encode_batch([accepted(order("BTC-USDT"))])]
    unknown = encode_header(2, "XRP-USDT")
    sender.send_multipart([unknown, body, b"gw.0.7"])
    reply = recv_raw(named)
    assert reply is not None and reply[:2] == [unknown, b"unknown_symbol"]
    assert recv_raw(sender, 0.05) is None


def test_malformed_matcher_messages_are_dropped_and_counted(setup: Setup) -> None:
    m1, m2 = setup.matcher("m1"), setup.matcher("m2")
    client = setup.client()
    stranger = FakeMatcher(setup.context, setup.back, "zz", ["BTC-USDT"])
    setup.closeables.append(stranger)
    stranger.hello()  # a routing id the topology does not know
    stranger.heartbeat()
    hello = {"node": "m1", "symbols": ["BTC-USDT", "SOL-USDT"], "epoch": 1}
    nobody = pack_replies([(b"\x00nobody", encode_header(1, "BTC-USDT"), b"ok", b"\x01\x90")])
    bad = [
        [b"NOPE"],
        [b"NOPE", b"x"],
        [b"HELLO"],
        [b"HELLO", b"\xc1"],
        [b"HELLO", msgpack.packb([1, 2, 3])],
        [b"HELLO", msgpack.packb({**hello, "node": "m2"})],
        [b"HELLO", msgpack.packb({**hello, "epoch": -1})],
        [b"HELLO", msgpack.packb({**hello, "symbols": "BTC-USDT"})],
        [b"HELLO", msgpack.packb({**hello, "extra": 1})],
        [b"HELLO", msgpack.packb(hello), b"more"],
        [b"HB", msgpack.packb("1")],
        [b"HB"],
        [b"BYE", b"now"],
        [b"REPS"],
        [b"REPS", b"x", b"y"],
        [b"REP", b"\x00nobody", encode_header(1, "BTC-USDT"), b"ok", b"\x01\x90"],  # not batched: unknown
        [b"REPS", b"\x00\x01"],  # a record head cut short
        [b"REPS", nobody[:-1]],  # a record that runs past the end of the frame
        [b"REPS", bytes(7 * 100_000)],  # zeros: as many empty records as heads fit, no client id
        [random.Random(5).randbytes(100)],
    ]
    for frames in bad:
        m1.socket.send_multipart(frames)
    # A reply for a client that does not exist: dropped (counted apart).
    m1.socket.send_multipart([b"REPS", nobody])
    # None of it brought m1 or m2 up; a good HELLO after it (same connection, so it is read
    # after all of them) does.
    timed_refusal(client, "ETH-USDT", "unavailable")
    m1.hello()
    wait_routed(client, m1, "BTC-USDT")
    timed_refusal(client, "ETH-USDT", "unavailable", m1)

    # A frame above the back's size limit drops m1's connection; m1's DEALER reconnects with
    # the same routing id and requests reach it again.
    m1.socket.send_multipart([b"REPS", bytes(17 << 20)])
    # Requests sent meanwhile get unavailable (the send failed) until m1's next word.
    m1.heartbeat()
    wait_routed(client, m1, "BTC-USDT")
    m2.hello()
    wait_routed(client, m2, "ETH-USDT")

    totals = setup.totals()
    strays = 2  # the stranger's HELLO and HB
    assert re.search(rf"malformed: matcher {len(bad) + strays} \(", totals), totals
    assert re.search(r"[1-9]\d* replies dropped", totals), totals


def test_log_names_matchers_going_up_and_down(setup: Setup, tmp_path: Path) -> None:
    m1 = setup.matcher("m1", epoch=3)
    m1.hello()
    client = setup.client()
    wait_routed(client, m1, "SOL-USDT")
    m1.bye()
    timed_refusal(client, "SOL-USDT", "unavailable", m1)
    setup.totals()
    log = setup.router.log()
    assert "m1 up: BTC-USDT, SOL-USDT (epoch 3)" in log
    assert "m1 down: said BYE; BTC-USDT, SOL-USDT unavailable" in log
    assert re.search(r"totals: \d+ forwarded, \d+ replies, unavailable [1-9]", log), log


# -- the matcher table, in process ---------------------------------------------------------


TABLE_YAML = """
cluster: t
symbols:
  BTC-USDT: {matcher: m1, tick_size: "0.01", lot_size: "0.001"}
  SOL-USDT: {matcher: m1, tick_size: "0.01", lot_size: "0.001"}
  ETH-USDT: {matcher: m2, tick_size: "0.01", lot_size: "0.001"}
nodes:
  r1: {role: router, front: "tcp://127.0.0.1:1", back: "tcp://127.0.0.1:2"}
  m1: {role: matcher, pub: "tcp://127.0.0.1:3", snapshot: "tcp://127.0.0.1:4", data_dir: var/m1}
  m2: {role: matcher, pub: "tcp://127.0.0.1:5", snapshot: "tcp://127.0.0.1:6", data_dir: var/m2}
"""


def table(timeout_s: float = 1.0) -> MatcherTable:
    return MatcherTable(parse_topology(TABLE_YAML), timeout_s)


def hello(symbols: list[str], epoch: int = 1, node: str = "m1") -> bytes:
    return msgpack.packb({"node": node, "symbols": symbols, "epoch": epoch})


def test_table_names_a_stranger_and_a_replaced_connection_apart() -> None:
    """A peer with a name that is no matcher's is a stranger; one with ZeroMQ's own kind of
    routing id (a zero byte and four more) is a matcher's old connection, renamed when the
    matcher connected again while the router was not reading (a hung router): its queued
    heartbeats are stale, not a stranger's."""
    t = table()
    with pytest.raises(Malformed, match="HB from 'm9', which is no matcher of the topology") as stranger:
        t.heartbeat(b"m9", hello(["BTC-USDT"]), now=0.0)
    assert stranger.value.kind == "not a matcher"
    replaced = "HB from a connection without a name of its own .*: a matcher's old connection"
    with pytest.raises(Malformed, match=replaced) as old:
        t.heartbeat(b"\x00\xe4<\x98i", hello(["BTC-USDT"]), now=0.0)
    assert old.value.kind == "from a replaced connection"
    assert t.route == {}


def test_table_routes_only_what_the_owner_announced_and_the_topology_gives_it() -> None:
    t = table()
    assert t.route == {}
    t.hello(b"m1", hello(["BTC-USDT", "ETH-USDT"]), now=0.0)  # ETH-USDT is m2's
    assert t.route == {b"BTC-USDT": b"m1"}
    assert t.refusal(b"SOL-USDT") == (b"unavailable", b"SOL-USDT: its matcher m1 does not serve it (epoch 1)")
    assert t.refusal(b"ETH-USDT")[0] == b"unavailable"
    assert t.refusal(b"DOGE") == (b"unknown_symbol", b"no matcher of the cluster owns symbol 'DOGE'")
    assert t.refusal(b"D\xffGE") == (b"unknown_symbol", b"no matcher of the cluster owns symbol b'D\\xffGE'")


def test_table_heartbeats_silence_bye_and_lost_connections() -> None:
    t = table(timeout_s=1.0)
    t.heartbeat(b"m1", msgpack.packb(4), now=0.0)  # no HELLO (router restarted): the topology's symbols
    assert t.route == {b"BTC-USDT": b"m1", b"SOL-USDT": b"m1"}
    t.sweep(now=0.9)
    assert t.route
    t.heartbeat(b"m1", msgpack.packb(4), now=0.9)
    t.sweep(now=1.8)
    assert t.route
    t.sweep(now=1.95)
    assert t.route == {}
    assert b"has been silent for 1050 ms" in t.refusal(b"BTC-USDT")[1]
    assert b"has been silent for 2100 ms" in t.refusal(b"BTC-USDT", now=3.0)[1]  # by the time it is asked
    with pytest.raises(Malformed, match="epoch 3 after epoch 4"):
        t.heartbeat(b"m1", msgpack.packb(3), now=2.0)  # a stale epoch brings nothing back
    assert t.route == {}
    t.heartbeat(b"m1", msgpack.packb(4), now=2.0)
    assert t.route == {b"BTC-USDT": b"m1", b"SOL-USDT": b"m1"}
    t.bye(b"m1")
    assert t.route == {} and t.refusal(b"BTC-USDT")[1] == b"BTC-USDT: its matcher m1 said BYE"
    t.hello(b"m1", hello(["BTC-USDT", "SOL-USDT"], epoch=5), now=3.0)
    t.lost(b"m1")
    assert t.route == {} and t.refusal(b"SOL-USDT")[1] == b"SOL-USDT: its matcher m1 lost its connection"


def test_table_refuses_malformed_control_messages() -> None:
    t = table()
    for ident, payload, words in [
        (b"zz", hello(["BTC-USDT"]), "no matcher of the topology"),
        (b"m1", b"\xc1", "not valid msgpack"),
        (b"m1", msgpack.packb([1]), "map with node"),
        (b"m1", hello(["BTC-USDT"], node="m2"), "names node 'm2'"),
        (b"m1", hello(["BTC-USDT"], epoch=-1), "non-negative"),
        (b"m1", msgpack.packb({"node": "m1", "symbols": [1], "epoch": 1}), "list of strings"),
    ]:
        with pytest.raises(Malformed, match=words):
            t.hello(ident, payload, now=0.0)
    with pytest.raises(Malformed, match="non-negative"):
        t.heartbeat(b"m1", msgpack.packb(True), now=0.0)
    assert t.route == {}


def test_a_reply_whose_client_is_not_connected_is_sent_once_it_is_in_order_or_dropped_in_time() -> None:
    """A gateway whose pings dropped a router that hung connects again under the same name a
    few milliseconds after the router goes on and answers what it held: those replies are kept
    and sent once the client is there (they were dropped: the client never learnt that its
    order had filled), each client's in order; after ``REPLY_RETRY_S`` they are dropped and
    counted."""
    topology = parse_topology(TABLE_YAML)
    node = topology.node("r1")
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    router = _Router(topology, node, context)  # type: ignore[arg-type]
    client = context.socket(zmq.DEALER)
    try:
        router.front.bind("inproc://front")
        now = time.monotonic()
        assert not router.reply((b"g1.0.1", b"h1", b"ok", b"first"), now)  # nobody of that name: kept
        client.routing_id = b"g1.0.1"
        client.connect("inproc://front")
        assert not router.reply((b"g1.0.1", b"h2", b"ok", b"second"), now)  # behind the first, whatever ZeroMQ says
        deadline = time.monotonic() + 5.0
        sent = 0
        while sent < 2 and time.monotonic() < deadline:  # the connection is made in the background
            sent += router.retry_unsent(time.monotonic())
            client.poll(10)
        assert sent == 2
        assert [client.recv_multipart(zmq.NOBLOCK) for _ in range(2)] == [
            [b"h1", b"ok", b"first"], [b"h2", b"ok", b"second"]]
        assert not router.unsent and not router.unsent_clients

        router.reply((b"gone", b"h3", b"ok", b"third"), now)
        assert router.retry_unsent(now + REPLY_RETRY_S / 2) == 0 and len(router.unsent) == 1
        assert router.retry_unsent(now + REPLY_RETRY_S + 0.1) == 0
        assert not router.unsent and router.window.dropped_replies == 1
    finally:
        client.close(0)
        router.close()
        context.term()


def test_replies_are_kept_for_a_bounded_number_of_clients() -> None:
    """Requests naming DEALERs that do not exist (``reply_to``) must not fill the router with
    replies to try again every sweep: past ``UNSENT_CLIENTS_MAX`` clients, a reply to one more
    is dropped at once (counted), while a client already waiting keeps getting its replies kept,
    in order."""
    topology = parse_topology(TABLE_YAML)
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    router = _Router(topology, topology.node("r1"), context)  # type: ignore[arg-type]
    try:
        router.front.bind("inproc://front-bounded")
        now = time.monotonic()
        for i in range(UNSENT_CLIENTS_MAX + 500):
            router.reply((b"ghost%d" % i, b"h", b"unknown_symbol", b""), now)
        assert len(router.unsent_clients) == UNSENT_CLIENTS_MAX
        assert len(router.unsent) == UNSENT_CLIENTS_MAX and router.window.dropped_replies == 500
        router.reply((b"ghost0", b"h2", b"ok", b"later"), now)  # waiting already: kept behind its first
        assert [f for _, c, f in router.unsent if c == b"ghost0"] == [
            (b"ghost0", b"h", b"unknown_symbol", b""), (b"ghost0", b"h2", b"ok", b"later")]
        assert router.retry_unsent(now + REPLY_RETRY_S + 0.1) == 0 and not router.unsent_clients
        assert not router.reply((b"ghost-next", b"h", b"ok", b""), now) and router.unsent_clients == {b"ghost-next"}
    finally:
        router.close()
        context.term()


def test_table_a_matcher_back_with_an_earlier_epoch_is_served_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    """A matcher whose data directory is new (lost) starts at epoch 1 again: it serves (it is
    the owner), and the router says what that may mean."""
    t = table(timeout_s=1.0)
    t.hello(b"m1", hello(["BTC-USDT", "SOL-USDT"], epoch=7), now=0.0)
    t.bye(b"m1")
    with caplog.at_level(logging.WARNING, logger="zmx.router"):
        t.hello(b"m1", hello(["BTC-USDT", "SOL-USDT"], epoch=1), now=1.0)
    assert t.route == {b"BTC-USDT": b"m1", b"SOL-USDT": b"m1"}
    assert "m1: HELLO with epoch 1 after epoch 7: a second process using this name, or a matcher whose data " \
           "directory is new" in caplog.text
