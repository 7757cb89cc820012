"""A real cluster: router and matcher processes, orders through ``zmx.node.client``.

Every process is started by the ``cluster`` fixture, which stops all of them at the end.
A SUB socket proves its subscription is live by the first message it gets (a matcher
publishes an empty heartbeat frame for every idle symbol each second), never by a sleep.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator

import pytest
import zmq
from nodes import Cluster, NodeProcess, dropped, write_topology

from zmx.codec import decode_publication
from zmx.events import (
    AmendRejected, BookChanged, FeedHeartbeat, OrderAccepted, OrderAmended, OrderRejected, TradeOccurred,
)
from zmx.exceptions import ZmxError
from zmx.node.client import Client, Reply, RequestTimeout
from zmx.node.runtime import load_topology
from zmx.topics import topic
from zmx.topology import Topology, connect_endpoint

FAST = 0.1  # the router answers unavailable within this many seconds


def start(cluster: Cluster, routers: int = 1, **matchers: list[str]) -> Topology:
    """Write a topology, start every router and matcher of it (each READY), and return it."""
    cluster.topology = write_topology(cluster.directory, routers=routers,
                                      matchers=matchers or {"m1": ["BTC-USDT", "BTC-USDTX"], "m2": ["ETH-USDT"]})
    topology = load_topology(cluster.topology)
    for name in (*(f"r{i}" for i in range(1, routers + 1)), *(matchers or ("m1", "m2"))):
        cluster.start(name)
    return topology


def node(cluster: Cluster, name: str) -> NodeProcess:
    return next(p for p in reversed(cluster.procs) if p.name == name)


def until_ok(client: Client, submit: dict[str, str], timeout: float = 15.0) -> Reply:
    """Submit the same order until it is accepted (the matchers' HELLOs may still be on
    their way to the routers: ``unavailable`` until then); its reply."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            reply = client.submit(**submit, timeout=1.0)  # type: ignore[arg-type]
        except RequestTimeout:
            reply = None
        if reply is not None and reply.ok:
            return reply
        assert reply is None or reply.status == "unavailable", reply
        assert time.monotonic() < deadline, f"never accepted: {submit} ({reply})"


def subscriber(context: zmq.Context[zmq.Socket[bytes]], endpoint: str, *symbols: str) -> zmq.Socket[bytes]:
    sub = context.socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    for symbol in symbols:
        sub.setsockopt(zmq.SUBSCRIBE, topic(symbol))
    sub.connect(endpoint)
    return sub


def publications(sub: zmq.Socket[bytes], timeout: float) -> Iterator[tuple[str, tuple]]:
    """Decoded frames as they arrive, until none comes for ``timeout`` s."""
    while sub.poll(int(timeout * 1000)):
        yield decode_publication(sub.recv())


def wait_live(sub: zmq.Socket[bytes], symbol: str) -> None:
    """Block until ``sub`` receives a frame of ``symbol`` (an idle heartbeat at the latest)."""
    for name, _ in publications(sub, 5.0):
        if name == symbol:
            return
    raise AssertionError(f"no publication of {symbol} within 5 s")


def timed_unavailable(client: Client, submit: dict[str, str]) -> Reply:
    """Submit until the answer is ``unavailable`` and assert that answer came within FAST.

    A request sent just as the matcher went away may be lost with its connection (no
    answer); it is sent again."""
    deadline = time.monotonic() + 10.0
    while True:
        start = time.perf_counter()
        try:
            reply = client.submit(**submit, timeout=0.5)  # type: ignore[arg-type]
        except RequestTimeout:
            assert time.monotonic() < deadline, "no unavailable reply"
            continue
        elapsed = time.perf_counter() - start
        assert reply.status == "unavailable", reply
        assert elapsed < FAST, f"unavailable after {elapsed * 1000:.1f} ms"
        return reply


def btc(order_id: str, account: str, side: str, price: str = "30000", quantity: str = "0.5",
        symbol: str = "BTC-USDT") -> dict[str, str]:
    return {"order_id": order_id, "account": account, "symbol": symbol, "side": side, "price": price,
            "quantity": quantity}


def test_each_new_subscriber_gets_its_symbols_heartbeat_at_once_direct_or_through_a_relay(
        cluster: Cluster, context: zmq.Context[zmq.Socket[bytes]]) -> None:
    # A gateway asks for a channel's snapshot once the feed's first message shows that its
    # subscription took hold. The matcher answers each subscription to one of its symbols with
    # the symbol's heartbeat (its current seq), through a relay as well: the relay passes on
    # every subscriber's subscription, not only the topic's first.
    cluster.topology = write_topology(cluster.directory, matchers={"m1": ["BTC-USDT", "SOL-USDT"]}, relay=True)
    topology = load_topology(cluster.topology)
    for name in ("r1", "m1", "x1"):
        cluster.start(name)
    until_ok(Client.from_topology(topology, context=context), btc("a0", "alice", "buy", "29000"))
    direct = connect_endpoint(topology.nodes["m1"].pub)  # type: ignore[union-attr]
    relayed = connect_endpoint(topology.nodes["x1"].pub)  # type: ignore[union-attr]
    watcher = subscriber(context, direct, "BTC-USDT")
    wait_live(watcher, "BTC-USDT")

    firsts = []
    for endpoint in (direct, relayed, relayed, direct, relayed):  # one after another
        sub = subscriber(context, endpoint, "BTC-USDT")
        assert sub.poll(10_000), "no message after subscribing"
        symbol, events = decode_publication(sub.recv())
        assert symbol == "BTC-USDT" and [type(e) for e in events] == [FeedHeartbeat], events
        assert events[0].seq == 1  # the book's seq after the one order: nothing more was published
        firsts.append(events[0].ts_ns)
        sub.close()
    # An idle symbol's periodic heartbeats are at least 1 s apart (the matcher's own clock):
    # five of them would span 4 s. These came with the subscriptions.
    assert max(firsts) - min(firsts) < 1_000_000_000, firsts


def test_orders_reach_their_matcher_replies_their_sender_events_the_right_pub(
        cluster: Cluster, context: zmq.Context[zmq.Socket[bytes]]) -> None:
    topology = start(cluster)
    m1_pub, m2_pub = topology.nodes["m1"].pub, topology.nodes["m2"].pub  # type: ignore[union-attr]
    on_m1 = subscriber(context, m1_pub, "BTC-USDT", "ETH-USDT")
    on_m2 = subscriber(context, m2_pub, "ETH-USDT", "BTC-USDT")
    alice = Client.from_topology(topology, context=context)
    bob = Client.from_topology(topology, context=context)
    wait_live(on_m1, "BTC-USDT")
    wait_live(on_m2, "ETH-USDT")
    # Seen accepted once, both matchers are connected to the router.
    until_ok(alice, btc("a0", "alice", "buy", "29000"))
    until_ok(bob, btc("b0", "bob", "buy", "1999", "1", "ETH-USDT"))

    # Published before the orders below, so on_m1 would have it before theirs if it matched.
    assert alice.submit(**btc("x1", "alice", "buy", symbol="BTC-USDTX")).ok
    sent = {
        alice: [btc("a1", "alice", "buy"), btc("a2", "alice", "sell", "2000", "1", "ETH-USDT")],
        bob: [btc("b1", "bob", "sell", quantity="0.2"), btc("b2", "bob", "buy", "2000", "1", "ETH-USDT")],
    }
    ids = {client: {client.send(client.submit_command(**o)): o for o in orders} for client, orders in sent.items()}
    for client, mine in ids.items():
        for _ in mine:
            reply = client.recv(5.0)
            assert reply is not None and reply.ok, reply
            order = mine[reply.request_id]  # a reply to one of this client's own requests
            first = reply.events[0]
            assert isinstance(first, OrderAccepted), reply
            assert (first.order_id, first.account, first.symbol) == (order["order_id"], order["account"],
                                                                     order["symbol"])
        assert client.recv(0.05) is None

    # m1 published BTC-USDT only (not BTC-USDTX, which merely starts the same), m2 ETH-USDT only;
    # the seq of each symbol's book changes grows by exactly 1.
    for sub, symbol, changes in ((on_m1, "BTC-USDT", 3), (on_m2, "ETH-USDT", 3)):
        seqs, trades = [], 0
        for name, events in publications(sub, 2.0):
            assert name == symbol
            seqs += [e.seq for e in events if isinstance(e, BookChanged)]
            trades += sum(isinstance(e, TradeOccurred) for e in events)
            if len(seqs) == changes:
                break
        assert len(seqs) == changes and seqs == list(range(seqs[0], seqs[0] + changes)), seqs
        assert trades == 1

    # the client amends in decimal strings too; the book answers with the order as it now is
    moved = alice.amend("a0", "alice", "BTC-USDT", price="29000.5", quantity="0.25")
    assert moved.ok and isinstance(moved.events[0], OrderAmended), moved
    spec = topology.symbols["BTC-USDT"]
    assert (moved.events[0].price, moved.events[0].remaining) == (spec.to_ticks("29000.5"), spec.to_lots("0.25"))
    assert isinstance(bob.amend("a0", "bob", "BTC-USDT", quantity="0.1").events[0], AmendRejected)  # not bob's
    with pytest.raises(ZmxError, match="give at least one"):
        alice.amend("a0", "alice", "BTC-USDT")
    for client in (alice, bob):
        client.close()


def two_routers(cluster: Cluster, context: zmq.Context[zmq.Socket[bytes]]) -> Client:
    """Routers r1 and r2, each of which has heard m1 (BTC-USDT); a client of both that has
    placed orders through each."""
    topology = start(cluster, routers=2, m1=["BTC-USDT"])
    fronts = {name: topology.nodes[name].front for name in ("r1", "r2")}  # type: ignore[union-attr]
    for name, front in fronts.items():  # each router has heard m1's HELLO
        with Client([front], context=context, symbols=dict(topology.symbols)) as one:
            until_ok(one, btc(f"hello-{name}", "carol", "buy", "1000"))
    client = Client.from_topology(topology, context=context)
    for n in range(10):  # the DEALER spreads these over both routers
        assert client.submit(**btc(f"before{n}", "alice", "buy", "1000"), timeout=5.0).ok
    return client


def resent_until_answered(client: Client, n: int, tries: int) -> tuple[list[int], list[Reply]]:
    """Orders after0..after{n-1}, one at a time, each sent again when it times out (up to
    ``tries`` sends): the index of the order at each timeout, and each order's reply."""
    lost: list[int] = []
    replies = []
    for k in range(n):
        order = btc(f"after{k}", "alice", "buy", "1000")
        for _ in range(tries):
            try:
                replies.append(client.submit(**order, timeout=1.0))
                break
            except RequestTimeout:
                lost.append(k)
        else:
            raise AssertionError(f"{order['order_id']} never answered; timeouts at orders {lost}")
    return lost, replies


def test_two_routers_one_killed_orders_go_through_the_other(cluster: Cluster,
                                                            context: zmq.Context[zmq.Socket[bytes]]) -> None:
    client = two_routers(cluster, context)
    node(cluster, "r1").kill()

    lost, replies = resent_until_answered(client, 50, 3)  # lost: on its way to r1 when it died
    for reply in replies:
        assert reply.ok, reply
        first = reply.events[0]
        # a resend of an order that did arrive is refused as a duplicate: placed once either way
        assert isinstance(first, OrderAccepted) or (
            isinstance(first, OrderRejected) and first.reason == "duplicate_order_id"), reply
    assert len(lost) <= 2, f"{len(lost)} requests lost after r1 died"
    client.close()


def test_two_routers_one_hung_orders_go_through_the_other(cluster: Cluster,
                                                          context: zmq.Context[zmq.Socket[bytes]]) -> None:
    """r1 hangs (``SIGSTOP``: its connections stay open). ZeroMQ's pings find it within a few
    seconds and the client's requests all go through r2 from then on (without the pings, every
    other request went to r1 and timed out for as long as it hung, as a review found)."""
    client = two_routers(cluster, context)
    r1 = node(cluster, "r1").proc
    r1.send_signal(signal.SIGSTOP)
    try:
        lost, replies = resent_until_answered(client, 40, 10)  # lost: sent to r1
    finally:
        r1.send_signal(signal.SIGCONT)
    assert all(reply.ok for reply in replies), replies
    assert lost and max(lost) < 20, f"timeouts at orders {lost}: r1 kept its share of the requests"
    client.close()


def test_a_router_that_did_not_run_holds_its_own_silence_against_no_matcher(
        cluster: Cluster, context: zmq.Context[zmq.Socket[bytes]]) -> None:
    """r1 stopped (``SIGSTOP``) past its heartbeat timeout, then going on: the matcher's
    heartbeats wait unread in its queue, so the silence is the router's own. It says so and
    takes no matcher down (it logged "m1 down: has been silent for ..." for every matcher, as a
    review found); the order it held meanwhile is answered when it goes on."""
    topology = start(cluster, m1=["BTC-USDT"])
    client = Client.from_topology(topology, context=context)
    until_ok(client, btc("warm", "alice", "buy", "1000"))
    r1 = node(cluster, "r1")
    r1.proc.send_signal(signal.SIGSTOP)
    try:
        with pytest.raises(RequestTimeout):  # r1 holds it
            client.submit(**btc("held", "alice", "buy", "1000"), timeout=2.0)
    finally:
        r1.proc.send_signal(signal.SIGCONT)
    late = client.recv(5.0)
    assert late is not None and late.ok and isinstance(late.events[0], OrderAccepted), late
    assert client.submit(**btc("after", "alice", "buy", "1000"), timeout=5.0).ok
    log = r1.log()
    assert "this router did not run for" in log and "m1 down" not in log, log


def test_a_router_that_hung_past_the_clients_pings_answers_late_over_the_new_connection(
        cluster: Cluster, context: zmq.Context[zmq.Socket[bytes]]) -> None:
    """The matcher and then r1 hang (``SIGSTOP``) with an order in r1, long enough for the
    client's ZeroMQ pings to drop its connection (its socket monitor says so; the matcher is
    stopped too so that its own pings keep its connection to r1). Both go on: the client's
    DEALER connects again under its own name, which r1 hands over to the new connection, and
    the held order's answer, sent to the request's ``reply_to``, comes out of ``recv``. (A
    client without a name of its own lost it: it went to the id ZeroMQ had made up for the
    dropped connection.)"""
    topology = start(cluster, m1=["BTC-USDT"])
    client = Client.from_topology(topology, context=context)
    until_ok(client, btc("warm", "alice", "buy", "1000"))
    m1, r1 = node(cluster, "m1"), node(cluster, "r1")
    try:
        with dropped(client.socket, "the client's pings never dropped the hung router's connection", 15_000):
            m1.proc.send_signal(signal.SIGSTOP)
            r1.proc.send_signal(signal.SIGSTOP)
            held = client.send(client.submit_command(**btc("held", "alice", "buy", "1000")))
    finally:
        r1.proc.send_signal(signal.SIGCONT)
        m1.proc.send_signal(signal.SIGCONT)
    late = client.recv(10.0)
    assert late is not None and late.request_id == held, late
    assert late.ok and isinstance(late.events[0], OrderAccepted) and late.events[0].order_id == "held", late
    client.close()


def test_a_restarted_router_takes_orders_once_it_knows_its_matcher(
        cluster: Cluster, context: zmq.Context[zmq.Socket[bytes]]) -> None:
    """r1 killed and started again while m1 runs: it binds its front only once m1 has said
    HELLO (or its heartbeat timeout has passed), so an order sent to it as soon as it is ready
    is accepted (it was answered ``unavailable`` in the first few hundred milliseconds, before
    m1 had connected again, as a review found)."""
    topology = start(cluster, m1=["BTC-USDT"])
    front = topology.nodes["r1"].front  # type: ignore[union-attr]
    for n in range(3):
        node(cluster, "r1").kill()
        cluster.start("r1")
        with Client([front], context=context, symbols=dict(topology.symbols)) as client:
            reply = client.submit(**btc(f"first{n}", "alice", "buy", "1000"), timeout=5.0)
        assert reply.ok and isinstance(reply.events[0], OrderAccepted), reply
    assert "m1 up" in node(cluster, "r1").log()


def test_matcher_stopped_is_unavailable_at_once_and_serves_again_after_restart(
        cluster: Cluster, context: zmq.Context[zmq.Socket[bytes]]) -> None:
    topology = start(cluster, m1=["BTC-USDT"], m2=["ETH-USDT"])
    client = Client.from_topology(topology, context=context)
    until_ok(client, btc("o1", "alice", "buy"))
    until_ok(client, btc("e1", "alice", "buy", "2000", "1", "ETH-USDT"))

    assert node(cluster, "m1").stop() == 0  # clean stop: BYE
    reply = timed_unavailable(client, btc("o2", "alice", "buy"))
    assert "m1" in reply.message
    assert client.submit(**btc("e2", "alice", "buy", "2000", "1", "ETH-USDT")).ok  # m2 unaffected

    cluster.start("m1")
    accepted = until_ok(client, btc("o3", "alice", "buy")).events[0]
    assert isinstance(accepted, OrderAccepted)
    # The restarted matcher kept its state: o1 is still known, seq went on.
    again = client.submit(**btc("o1", "alice", "buy")).events[0]
    assert isinstance(again, OrderRejected) and again.reason == "duplicate_order_id"

    node(cluster, "m1").kill()  # no BYE: the router learns it from the lost connection
    timed_unavailable(client, btc("o4", "alice", "buy"))
    cluster.start("m1")
    until_ok(client, btc("o5", "alice", "buy"))
    client.close()
