"""The gateway under load and trouble: real processes, real WebSocket clients (``tests/ws.py``).

- a seeded random order flow of 2,000 orders from several connections: every subscriber's book
  (checksum verified on every update) ends equal to the matcher's own book;
- slow consumers: one that reads late is resynced (``slow_consumer`` then a fresh snapshot), one
  that stops reading is closed with 1013, the others are served all along;
- keepalive: heartbeats on an idle channel, 1011 for a client that stops answering pings, 1001
  when the gateway stops;
- a matcher restarted (SIGTERM, then kill -9) under a subscribed gateway;
- a gateway with ``workers: 2``: which process serves which connection is read from ``/proc``.

A slow or stopped reader is a ``WsClient`` on ``ws.slow_socket`` (tiny kernel buffers) whose
library stops reading the socket once 4 frames are unread; the test simply does not pull from it.
Durations that a rule is about (``slow_consumer_ms``) are passed while the market keeps moving
and the other clients are checked, never in a bare sleep.

Each test starts its own cluster with the ``cluster`` fixture, which stops every process at the
end, pass or fail. Random flows use fixed seeds.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import re
import shutil
import signal
import socket
import time
from collections import Counter
from collections.abc import Callable
from typing import Any
from decimal import Decimal
from pathlib import Path

import pytest
import zmq
from nodes import Cluster, NodeProcess, write_topology
from websockets.client import ClientProtocol
from websockets.frames import Frame, Opcode
from websockets.protocol import State
from websockets.uri import parse_uri
from ws import ChannelBook, Clients, WsClient, matcher_book, same_book, slow_socket

from zmx.commands import SubmitOrder
from zmx.node.client import Client, RequestTimeout
from zmx.node.runtime import load_topology
from zmx.topology import Topology

MIDS = {"BTC-USDT": 30000, "SOL-USDT": 150, "ETH-USDT": 2000}  # in whole units; tick 0.01, lot 0.001


def start(cluster: Cluster, matchers: dict[str, list[str]], limits: str = "", workers: int = 1,
          relay: bool = False, standby_relay: bool = False, routers: int = 1) -> Topology:
    """Matchers, router r1 (r1..rN with ``routers``), gateway g1 (and relay x1 between them with
    ``relay``; and x2, the gateway's standby of x1, with ``standby_relay``), all ready."""
    extra = "".join([f", workers: {workers}" if workers != 1 else "", f", limits: {{{limits}}}" if limits else ""])
    cluster.topology = write_topology(cluster.directory, matchers=matchers, relay=relay, gateways=1,
                                      extra_gateway=extra, standby_relay=standby_relay, routers=routers)
    relays = ("x1", "x2") if standby_relay else ("x1",) if relay else ()
    for name in (*matchers, *(f"r{n}" for n in range(1, routers + 1)), *relays, "g1"):
        cluster.start(name)
    return load_topology(cluster.topology)


def start_only(cluster: Cluster, names: tuple[str, ...], **layout: bool) -> Topology:
    """m1 (BTC-USDT), r1, g1 and the relays ``layout`` asks for in the topology; only ``names`` started."""
    cluster.topology = write_topology(cluster.directory, matchers={"m1": ["BTC-USDT"]}, gateways=1, **layout)
    for name in names:
        cluster.start(name)
    return load_topology(cluster.topology)


def node(cluster: Cluster, name: str) -> NodeProcess:
    return next(p for p in reversed(cluster.procs) if p.name == name)


def price(symbol: str, offset_ticks: int) -> str:
    ticks = MIDS[symbol] * 100 + offset_ticks
    return f"{ticks // 100}.{ticks % 100:02d}"


def lots(n: int) -> str:
    return f"{n // 1000}.{n % 1000:03d}"


def until_accepted(client: WsClient, symbol: str, tag: str, timeout: float = 15.0) -> None:
    """A far-away order through the gateway until it is accepted: the gateway's way to the
    matcher is up (``unavailable`` until the router has heard the matcher)."""
    deadline = time.monotonic() + timeout
    for n in itertools.count():
        ident = f"{tag}-{n}"
        client.send({"action": "submit_order", "order_id": ident, "symbol": symbol, "side": "buy",
                     "price": price(symbol, -5000), "quantity": "0.001", "id": ident})
        update = client.expect({"type": "order_update", "id": ident}, timeout=7.0)
        if update["data"]["status"] == "accepted":
            return
        assert update["data"].get("reason") == "unavailable", update
        assert time.monotonic() < deadline, f"never accepted through the gateway: {update}"


def synced_client(topology: Topology, clients: Clients, maker: RouterMaker, *channels: str
                  ) -> tuple[WsClient, ChannelBook, int]:
    """A client of g1 that holds ``channels`` (BTC-USDT among them), synced past a far-away
    BTC-USDT buy that ``maker`` placed first; with that book and the order's seq."""
    clients.url = topology.nodes["g1"].url  # type: ignore[union-attr]
    first = maker.place("BTC-USDT", "buy", price("BTC-USDT", -100), "0.001")
    client = clients()
    client.subscribe(*channels)
    return client, client.wait_seq("BTC-USDT", first), first


class RouterMaker:
    """Orders straight to the router, pipelined, each with an account of its own (no self-trade)."""

    def __init__(self, topology: Topology, context: zmq.Context) -> None:
        self.client = Client.from_topology(topology, context=context)
        self.ids = itertools.count(1)

    def command(self, symbol: str, side: str, price_text: str | None, quantity: str, **kind: str) -> SubmitOrder:
        n = next(self.ids)
        return self.client.submit_command(f"o{n}", f"a{n}", symbol, side, price_text, quantity, **kind)

    def place(self, symbol: str, side: str, price_text: str, quantity: str, timeout: float = 15.0) -> int:
        """One order, sent again while the router answers ``unavailable`` (a matcher starting); its seq."""
        cmd = self.command(symbol, side, price_text, quantity)
        deadline = time.monotonic() + timeout
        while True:
            try:
                reply = self.client.request(cmd, timeout=1.0)
            except RequestTimeout:
                reply = None
            if reply is not None and reply.ok:
                return reply.events[-1].seq
            assert reply is None or reply.status == "unavailable", reply
            assert time.monotonic() < deadline, f"never accepted: {cmd} ({reply})"
            cmd = self.command(symbol, side, price_text, quantity)

    def burst(self, commands: list[SubmitOrder], timeout: float = 30.0) -> int:
        """Send all, then take every reply; the highest seq."""
        for cmd in commands:
            self.client.send(cmd)
        deadline = time.monotonic() + timeout
        top = 0
        for _ in commands:
            reply = self.client.recv(max(0.0, deadline - time.monotonic()))
            assert reply is not None and reply.ok, reply
            top = max(top, reply.events[-1].seq)
        return top

    def close(self) -> None:
        self.client.close()


def paced_burst(maker: RouterMaker, commands: list, healthy: WsClient, symbol: str, chunk: int = 25) -> int:
    """The commands in chunks, each one sent on once ``healthy`` has the previous one: a continuous
    feed, not one batch that the gateway might read in one go. The last seq."""
    top = 0
    for start_at in range(0, len(commands), chunk):
        top = maker.burst(commands[start_at:start_at + chunk])
        healthy.wait_seq(symbol, top, timeout=10.0)
    return top


def random_flow(rng: random.Random, maker: RouterMaker, symbol: str, count: int) -> list:
    """Limit orders around the mid, a third of them crossing: book changes and trades."""
    return [maker.command(symbol, side, price(symbol, rng.randint(-20, 20) + (4 if side == "buy" else -4)),
                          lots(rng.randint(1, 40)))
            for side in (rng.choice(("buy", "sell")) for _ in range(count))]


# -- the book under a random flow ----------------------------------------------------------------


def test_seeded_order_flow_from_several_connections_leaves_every_book_equal_to_the_matchers(
        cluster: Cluster, clients: Clients, context: zmq.Context) -> None:
    topology = start(cluster, {"m1": ["BTC-USDT", "SOL-USDT"], "m2": ["ETH-USDT"]}, "rate_limit_per_s: 100000")
    clients.url = topology.nodes["g1"].url  # type: ignore[union-attr]
    symbols = list(MIDS)
    early = clients("early")
    early.subscribe(*symbols)
    traders = [clients(f"trader{n}") for n in range(4)]
    for symbol in symbols:
        until_accepted(traders[0], symbol, f"warm-{symbol}")

    rng = random.Random(20251127)  # the orders are fixed; how the connections interleave at the gateway is not
    sent: dict[WsClient, list[int]] = {t: [] for t in traders}
    placed: dict[WsClient, list[tuple[str, str]]] = {t: [] for t in traders}
    late = None
    orders = 2000
    request_ids = itertools.count(1)
    for n in range(orders):
        if n == orders // 2:  # a subscriber that joins in the middle of the flow
            late = clients("late")
            late.send({"action": "subscribe", "channels": symbols})
        trader = rng.choice(traders)
        symbol = rng.choice(symbols)
        ident = next(request_ids)
        roll = rng.random()
        if roll < 0.15 and placed[trader]:
            cancel_symbol, order_id = rng.choice(placed[trader])
            trader.send({"action": "cancel_order", "symbol": cancel_symbol, "order_id": order_id, "id": ident})
        else:
            side = rng.choice(("buy", "sell"))
            order = {"action": "submit_order", "order_id": f"t{ident}", "symbol": symbol, "side": side,
                     "quantity": lots(rng.randint(1, 50)), "id": ident}
            if roll < 0.19:
                order |= {"type": "market", "quantity": lots(rng.randint(1, 20))}
            else:  # bids from 40 ticks under the mid to 5 over it, asks the other way round: they overlap
                offset = rng.randint(-40, 5) if side == "buy" else rng.randint(-5, 40)
                order |= {"price": price(symbol, offset)}
                if roll < 0.30:
                    order |= {"time_in_force": "ioc"}
            trader.send(order)
            placed[trader].append((symbol, order["order_id"]))
        sent[trader].append(ident)

    # Every request is answered, with its id: order_updates, or unknown_order for a cancel of an
    # order that has ended already. Nothing is unavailable in a healthy cluster.
    for trader, idents in sent.items():
        answered: set[int] = set()
        scanned = [0]

        def all_answered(trader: WsClient = trader, answered: set[int] = answered, scanned: list[int] = scanned,
                         expected: int = len(idents)) -> bool:
            for message in trader.received[scanned[0]:]:
                if isinstance(message.get("id"), int):
                    answered.add(message["id"])
                    assert message["type"] == "order_update" or message.get("code") == "unknown_order", message
                    assert message.get("data", {}).get("reason") != "unavailable", message
            scanned[0] = len(trader.received)
            return len(answered) >= expected

        trader.wait_until(all_answered, f"answers to {len(idents)} requests", timeout=60.0)
        assert answered == set(idents)
    assert late is not None
    for symbol in symbols:
        late.expect({"type": "subscription_ack", "channel": symbol})
    fresh = clients("fresh")
    fresh.subscribe(*symbols)
    for symbol in symbols:
        seq, bids, asks = matcher_book(topology, symbol, context)
        assert len(bids) > 25 and len(asks) > 25, (symbol, bids, asks)  # deeper than the checksum
        for client in (early, late, fresh):
            book = client.wait_seq(symbol, seq, timeout=30.0)
            assert book.seq == seq, (client.name, symbol)
            assert same_book(book, bids, asks), (client.name, symbol, book.levels(), bids, asks)
    traded = sum(len(early.books[s].trades) for s in symbols)
    assert traded > 100, f"only {traded} trades: the flow does not exercise matching"
    for client in (early, late, fresh, *traders):
        assert not client.since(0, {"type": "error", "code": "slow_consumer"}), client.name
    # Nothing was lost on the way either: a gateway resyncs (a second depth_snapshot to every client)
    # only when its own feed from the matcher has a gap, and this cluster is local and healthy.
    resynced = {s: early.books[s].snapshots - 1 for s in symbols if early.books[s].snapshots > 1}
    why = [line for line in node(cluster, "g1").log().splitlines()
           if "resync" in line or "behind" in line or "expected seq" in line or "way here" in line]
    assert not resynced, f"the gateway resynced {resynced}: {why}"


# -- slow consumers ------------------------------------------------------------------------------

SLOW_MS = 1500
SLOW_LIMITS = f"send_queue_bytes: 8192, slow_consumer_ms: {SLOW_MS}, rate_limit_per_s: 100000"


def stalled_client(clients: Clients, name: str, url: str) -> WsClient:
    """A client that stops reading as soon as the test stops pulling from it: tiny kernel buffers
    (``ws.slow_socket``) and a library that stops reading the socket past 4 unread frames."""
    return clients(name, sock=slow_socket(url), max_queue=(4, 1), compression=None)


def test_a_slow_reader_gets_slow_consumer_then_a_fresh_snapshot_and_keeps_a_correct_book(
        cluster: Cluster, clients: Clients, context: zmq.Context) -> None:
    """``send_queue_bytes: 8192``; the slow client reads nothing while 600 orders (about 200 KB for each
    subscriber) are published, then reads again well within ``slow_consumer_ms`` (10 s)."""
    topology = start(cluster, {"m1": ["BTC-USDT"]}, SLOW_LIMITS.replace(str(SLOW_MS), "10000"))
    url = clients.url = topology.nodes["g1"].url  # type: ignore[union-attr]
    maker = RouterMaker(topology, context)
    try:
        maker.place("BTC-USDT", "buy", price("BTC-USDT", -5000), "0.001")  # the router knows m1
        healthy = clients("healthy")
        healthy.subscribe("BTC-USDT")
        slow = stalled_client(clients, "slow", url)
        slow.subscribe("BTC-USDT")

        last = paced_burst(maker, random_flow(random.Random(7), maker, "BTC-USDT", 600), healthy, "BTC-USDT")
        # `slow` was not read meanwhile; now it is, long before slow_consumer_ms (10 s here) is up

        error = slow.expect({"type": "error", "code": "slow_consumer", "channel": "BTC-USDT"}, timeout=5.0)
        missed = error.get("data", {})
        fields = ("missed_updates", "missed_trades", "from_seq", "to_seq")
        assert all(isinstance(missed.get(k), int) for k in fields), error
        assert missed["missed_updates"] > 0 and missed["from_seq"] <= missed["to_seq"] <= last, error
        # what it missed starts right after the last update it got (the error comes after them)
        assert missed["from_seq"] == slow.books["BTC-USDT"].seq + 1, (error, slow.books["BTC-USDT"].seq)
        slow.wait_seq("BTC-USDT", last, timeout=10.0)  # a fresh depth_snapshot first (ws.ChannelBook checks)
        assert slow.books["BTC-USDT"].snapshots >= 2  # (more if it fell behind again while catching up)

        rng = random.Random(8)
        for _ in range(20):  # the stream goes on from the fresh snapshot
            seq = maker.place("BTC-USDT", rng.choice(("buy", "sell")), price("BTC-USDT", rng.randint(-20, 20)),
                              "0.001")
        seq, bids, asks = matcher_book(topology, "BTC-USDT", context)
        for client in (healthy, slow):
            book = client.wait_seq("BTC-USDT", seq)
            assert book.seq == seq and same_book(book, bids, asks), client.name
        assert not healthy.since(0, "error") and healthy.books["BTC-USDT"].snapshots == 1
    finally:
        maker.close()


def test_a_reader_that_stops_is_closed_1013_while_the_others_keep_receiving(
        cluster: Cluster, clients: Clients, context: zmq.Context) -> None:
    topology = start(cluster, {"m1": ["BTC-USDT"]}, SLOW_LIMITS)
    url = clients.url = topology.nodes["g1"].url  # type: ignore[union-attr]
    maker = RouterMaker(topology, context)
    try:
        maker.place("BTC-USDT", "buy", price("BTC-USDT", -5000), "0.001")
        healthy = clients("healthy")
        healthy.subscribe("BTC-USDT")
        stopped = stalled_client(clients, "stopped", url)
        stopped.subscribe("BTC-USDT")

        paced_burst(maker, random_flow(random.Random(7), maker, "BTC-USDT", 600), healthy, "BTC-USDT")  # unread
        behind_since = time.monotonic()  # behind by now at the latest
        # The market goes on while `stopped` stays behind past slow_consumer_ms; `healthy` follows it.
        rng = random.Random(8)
        while time.monotonic() < behind_since + SLOW_MS / 1000 + 1.0:
            seq = maker.place("BTC-USDT", rng.choice(("buy", "sell")), price("BTC-USDT", rng.randint(-20, 20)),
                              "0.001")
            healthy.wait_seq("BTC-USDT", seq)
        code = stopped.expect_close(timeout=10.0)  # what was on its way, then the close
        assert code == 1013, f"closed with {code} {stopped.close_reason!r}"

        seq, bids, asks = matcher_book(topology, "BTC-USDT", context)
        book = healthy.wait_seq("BTC-USDT", seq)
        assert book.seq == seq and same_book(book, bids, asks)
        assert not healthy.since(0, "error") and book.snapshots == 1
        assert healthy.request({"action": "ping", "id": 1}, "pong") == {"type": "pong", "id": 1}
    finally:
        maker.close()


# -- keepalive ----------------------------------------------------------------------------------


def test_idle_channels_get_heartbeats_a_client_that_stops_answering_pings_is_closed_1011(
        cluster: Cluster, clients: Clients, context: zmq.Context) -> None:
    """``heartbeat_s: 1``, ``ping_interval_s: 3``, ``ping_timeout_s: 1``. The mute client reads on but
    its pongs are dropped before they leave: it is closed about a second after the ping, not at the
    next ping's turn. A client that answers stays. At the end the gateway stops: its clients are
    told 1001 (going away)."""
    topology = start(cluster, {"m1": ["BTC-USDT", "SOL-USDT"]}, "heartbeat_s: 1, ping_interval_s: 3, ping_timeout_s: 1")
    clients.url = topology.nodes["g1"].url  # type: ignore[union-attr]
    maker = RouterMaker(topology, context)
    try:
        seq = maker.place("SOL-USDT", "buy", price("SOL-USDT", -5000), "0.001")
        live = clients("live")
        live.subscribe("SOL-USDT")
        assert live.books["SOL-USDT"].seq == seq
        for _ in range(2):  # an idle channel: heartbeats carrying its seq
            beat = live.expect({"type": "heartbeat", "channel": "SOL-USDT"}, timeout=4.0)
            assert beat["data"]["seq"] == seq, beat

        mute = clients("mute")
        protocol = mute.ws.protocol
        send_frame = protocol.send_frame
        pinged: list[float] = []  # when the gateway's pings came (their pongs are dropped)

        def drop_pongs(frame: Frame) -> None:
            if frame.opcode is Opcode.PONG:
                pinged.append(time.monotonic())
            else:
                send_frame(frame)
        protocol.send_frame = drop_pongs  # type: ignore[method-assign]
        code = mute.expect_close(timeout=8.0)
        closed = time.monotonic()
        assert code == 1011, f"closed with {code} {mute.close_reason!r}"
        assert len(pinged) == 1 and closed - pinged[0] < 2.0, (
            f"closed {closed - pinged[0]:.2f} s after the ping; ping_timeout_s is 1 (ping_interval_s 3)")
        assert not live.closed
        assert live.request({"action": "ping", "id": "alive"}, "pong") == {"type": "pong", "id": "alive"}

        assert node(cluster, "g1").stop() == 0
        assert live.expect_close() == 1001
    finally:
        maker.close()


def test_the_heartbeats_of_a_connections_idle_channels_come_due_together_and_leave_in_one_write(
        cluster: Cluster, context: zmq.Context) -> None:
    """``heartbeat_s: 2``. One connection holds BTC-USDT and SOL-USDT; BTC-USDT goes quiet, SOL-USDT
    trades on for another 1.2 s (a paced order flow), then goes quiet too, so their heartbeats come
    due at different times. The client reads the raw socket, so it sees which frames came in one
    read: soon both heartbeats come in one (one write), and from then on every time, each channel
    still heard from at least every 2 s plus a tick."""
    topology = start(cluster, {"m1": ["BTC-USDT", "SOL-USDT"]}, "heartbeat_s: 2")
    url = topology.nodes["g1"].url  # type: ignore[union-attr]
    protocol = ClientProtocol(parse_uri(url))
    host, port = url.removeprefix("ws://").rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), timeout=10)
    maker = RouterMaker(topology, context)
    try:
        def write() -> None:
            for data in protocol.data_to_send():
                sock.sendall(data)

        def read() -> list[dict]:
            """The messages of one read of the socket (pongs answered)."""
            data = sock.recv(65536)
            assert data, "the gateway closed the connection"
            protocol.receive_data(data)
            messages = []
            for event in protocol.events_received():
                if isinstance(event, Frame) and event.opcode is Opcode.TEXT:
                    messages.append(json.loads(event.data))
            write()
            return messages

        def until(what: Callable[[dict], bool], name: str) -> None:
            """Read until a message that ``what`` accepts arrives (10 s at most)."""
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                if any(map(what, read())):
                    return
            raise AssertionError(f"no {name} in 10 s")

        def of(kind: str, channel: str, seq: int | None = None) -> Callable[[dict], bool]:
            return lambda m: (m.get("type") == kind and m.get("channel") == channel
                              and (seq is None or m["data"]["seq"] == seq))

        protocol.send_request(protocol.connect())
        write()
        while protocol.state is not State.OPEN:
            read()
        protocol.send_text(b'{"action":"subscribe","channels":["BTC-USDT","SOL-USDT"]}')
        write()
        snapshots: set[str] = set()
        while len(snapshots) < 2:  # both may come in one read; each read times out after 10 s
            snapshots |= {m["channel"] for m in read() if m.get("type") == "depth_snapshot"}
        until(of("heartbeat", "BTC-USDT"), "heartbeat of BTC-USDT")
        # SOL-USDT trades on for 1.2 s after that heartbeat: an order every 0.1 s, each one's update
        # seen on the channel before the next
        for n in range(12):
            seq = maker.place("SOL-USDT", "buy", price("SOL-USDT", -5000 - n), "0.001")
            until(of("depth_update", "SOL-USDT", seq), f"update {seq} of SOL-USDT")
            time.sleep(0.1)  # paces the order flow (a load generator); it waits for nothing

        reads: list[tuple[float, set[str]]] = []  # (when, channels whose heartbeat came in that read)
        deadline = time.monotonic() + 12
        while time.monotonic() < deadline:
            beats = {m["channel"] for m in read() if m.get("type") == "heartbeat"}
            if beats:
                reads.append((time.monotonic(), beats))
        together = [i for i, (_, beats) in enumerate(reads) if beats == {"BTC-USDT", "SOL-USDT"}]
        assert together, f"the heartbeats never came in one read: {reads}"
        assert together[0] <= 2, f"not together from the third read on: {reads}"
        assert all(beats == {"BTC-USDT", "SOL-USDT"} for _, beats in reads[together[0]:]), reads
        assert len(reads) - together[0] >= 3, reads  # and it lasts (12 s, one read every 2 s)
        gaps = [b - a for (a, _), (b, _) in zip(reads, reads[1:])]
        assert max(gaps) < 2 + 1.0, gaps  # heartbeat_s, a tick and slack for a slow machine
    finally:
        maker.close()
        sock.close()


# -- a matcher restarted -----------------------------------------------------------------------


def test_a_matcher_restarted_under_the_gateway_gives_a_fresh_snapshot_then_correct_updates(
        cluster: Cluster, clients: Clients, context: zmq.Context) -> None:
    topology = start(cluster, {"m1": ["BTC-USDT"]})
    clients.url = topology.nodes["g1"].url  # type: ignore[union-attr]
    maker = RouterMaker(topology, context)
    rng = random.Random(11)
    try:
        maker.place("BTC-USDT", "buy", price("BTC-USDT", -5000), "0.001")
        client = clients()
        client.subscribe("BTC-USDT")
        book = client.books["BTC-USDT"]
        client.wait_seq("BTC-USDT", maker.burst(random_flow(rng, maker, "BTC-USDT", 50)))
        for how in ("stop", "kill"):
            snapshots = book.snapshots
            m1 = node(cluster, "m1")
            if how == "stop":
                assert m1.stop() == 0  # SIGTERM
            else:
                m1.kill()  # kill -9
            cluster.start("m1")
            maker.place("BTC-USDT", "buy", price("BTC-USDT", -4000), "0.001")  # served again
            client.wait_until(lambda snapshots=snapshots: book.snapshots > snapshots and not book.awaiting_snapshot,
                              f"a fresh depth_snapshot after the {how}", timeout=15.0)
            client.wait_seq("BTC-USDT", maker.burst(random_flow(rng, maker, "BTC-USDT", 50)))
            seq, bids, asks = matcher_book(topology, "BTC-USDT", context)
            assert client.wait_seq("BTC-USDT", seq).seq == seq and same_book(book, bids, asks), how
    finally:
        maker.close()


def test_behind_a_relay_a_matcher_back_without_its_history_resyncs_the_channel(
        cluster: Cluster, clients: Clients, context: zmq.Context) -> None:
    """The gateway's feed comes from a relay, which stays connected while the matcher behind it
    restarts; this one comes back without its journal (a new host, a wiped disk), so its ``seq``
    starts again from 1. What it publishes (an order's update, or the heartbeat of an idle
    symbol) is the gateway's only sign: a ``seq`` that went back. The channel's clients get a
    fresh ``depth_snapshot`` of the new book, then its updates."""
    topology = start(cluster, {"m1": ["BTC-USDT"]}, relay=True)
    clients.url = topology.nodes["g1"].url  # type: ignore[union-attr]
    maker = RouterMaker(topology, context)
    try:
        for n in range(6):
            before = maker.place("BTC-USDT", "buy", price("BTC-USDT", -100 - n), "0.001")
        client = clients()
        client.subscribe("BTC-USDT")
        book = client.wait_seq("BTC-USDT", before)
        assert len(book.bids) == 6
        snapshots = book.snapshots
        node(cluster, "m1").kill()
        shutil.rmtree(cluster.directory / "var" / "m1")
        cluster.start("m1")
        # The relay's subscription reaches the new matcher some time after it serves orders, and
        # what it publishes before is lost (ZeroMQ's slow joiner): an order at a time until the
        # client has its fresh snapshot.
        for n in range(10):
            seq = maker.place("BTC-USDT", "sell", price("BTC-USDT", 100 + n), "0.001")
            assert seq == n + 1  # a matcher with no history
            try:
                client.wait_until(lambda: book.snapshots > snapshots and not book.awaiting_snapshot,
                                  "a fresh depth_snapshot of the new book", timeout=1.5)
                break
            except AssertionError:
                assert n < 9, "no fresh depth_snapshot after ten orders of the new matcher"
        top = maker.burst([maker.command("BTC-USDT", "sell", price("BTC-USDT", 200 + n), "0.002") for n in range(5)])
        now, bids, asks = matcher_book(topology, "BTC-USDT", context)
        assert now == top
        assert client.wait_seq("BTC-USDT", top).seq == top and same_book(book, bids, asks)
        assert not book.bids and len(book.asks) == seq + 5
    finally:
        maker.close()


def s1_fills(client: WsClient) -> list[tuple[str, str, str, str]]:
    """The fills of order ``s1`` that ``client`` got: (status, filled, remaining, liquidity); trade ids rising."""
    updates = [u["data"] for u in client.orders["s1"] if "trade_id" in u["data"]]
    assert [u["trade_id"] for u in updates] == sorted({u["trade_id"] for u in updates}), "each fill once, in order"
    return [(u["status"], u["filled"], u["remaining"], u["liquidity"]) for u in updates]


def rest_s1(client: WsClient) -> None:
    """``client`` sells 0.003 at mid + 50 ticks (order ``s1``), resting."""
    client.send({"action": "submit_order", "order_id": "s1", "symbol": "BTC-USDT", "side": "sell",
                 "price": price("BTC-USDT", 50), "quantity": "0.003"})
    client.wait_until(lambda: "s1" in client.orders, "s1's order_update")
    assert client.orders["s1"][0]["data"]["status"] == "accepted"


TWO_FILLS = [("partially_filled", "0.001", "0.002", "maker"), ("partially_filled", "0.002", "0.001", "maker")]


@pytest.mark.parametrize("failure", ["matcher kill -9", "relay kill -9"])
def test_a_fill_the_feed_lost_reaches_its_owner_before_the_orders_cancel(
        cluster: Cluster, clients: Clients, context: zmq.Context, failure: str) -> None:
    """The gateway holds none of the matcher's channels, only a client's resting order ``s1``.
    Either the matcher restarts (``kill -9``) behind the relay, whose connection to the gateway
    never breaks, and fills at once, before the relay's subscriptions reach it again (ZeroMQ's
    slow joiner); or the relay dies and the fill is made while the gateway has no feed. The
    client cancels ``s1`` right after the fill: the cancel's reply shows the fill, which never
    came, and waits for it. The client gets the fill, once, then ``canceled``, as the book made
    them."""
    topology = start(cluster, {"m1": ["BTC-USDT"]}, relay=True)
    clients.url = topology.nodes["g1"].url  # type: ignore[union-attr]
    maker = RouterMaker(topology, context)
    try:
        client = clients()
        until_accepted(client, "BTC-USDT", "warm")
        rest_s1(client)
        if failure == "matcher kill -9":
            node(cluster, "m1").kill()
            cluster.start("m1")
        else:
            node(cluster, "x1").kill()
        maker.place("BTC-USDT", "buy", price("BTC-USDT", 50), "0.001")  # the feed does not bring it
        client.send({"action": "cancel_order", "order_id": "s1", "symbol": "BTC-USDT", "id": "c"})
        client.wait_until(lambda: client.orders["s1"][-1]["data"]["status"] == "canceled", "s1 canceled",
                          timeout=15.0)
        client.drain()
        assert [(u["data"]["status"], u["data"]["filled"], u.get("id")) for u in client.orders["s1"]] == [
            ("accepted", "0", None), ("partially_filled", "0.001", None), ("canceled", "0.001", "c")]
        assert s1_fills(client) == TWO_FILLS[:1]
    finally:
        maker.close()


def test_fills_the_matcher_did_not_give_in_time_come_once_it_answers_and_the_client_is_told(
        cluster: Cluster, clients: Clients, context: zmq.Context) -> None:
    """The relay dies and ``s1`` fills meanwhile; then the matcher stops answering the gateway
    (``SIGSTOP``: a review cut the gateway off it, its feed coming through a standby relay)
    before the relay is back. The gateway asks for the fill, gets no answer in 10 s, and lets
    what it held go: the client is told (``unavailable`` with the symbols) and, once the
    matcher answers again, gets the fill. (It was never asked again: the fill was lost.)"""
    topology = start(cluster, {"m1": ["BTC-USDT"]}, relay=True)
    clients.url = topology.nodes["g1"].url  # type: ignore[union-attr]
    maker = RouterMaker(topology, context)
    m1 = node(cluster, "m1")
    try:
        client = clients()
        until_accepted(client, "BTC-USDT", "warm")
        rest_s1(client)
        node(cluster, "x1").kill()
        maker.place("BTC-USDT", "buy", price("BTC-USDT", 50), "0.001")  # the feed does not bring it
        m1.proc.send_signal(signal.SIGSTOP)
        cluster.start("x1")  # the feed is back, and the gateway asks m1 for the fills it lost
        told = client.expect({"type": "error", "code": "unavailable"}, timeout=30.0)
        assert told["symbols"] == ["BTC-USDT"] and "no answer in 10 s" in told["message"]
        assert s1_fills(client) == []
        m1.proc.send_signal(signal.SIGCONT)
        client.wait_until(lambda: s1_fills(client) == TWO_FILLS[:1], "s1's fill", timeout=15.0)
        client.send({"action": "cancel_order", "order_id": "s1", "symbol": "BTC-USDT", "id": "c"})
        client.wait_until(lambda: client.orders["s1"][-1]["data"]["status"] == "canceled", "s1 canceled")
        assert [(u["data"]["status"], u["data"]["filled"]) for u in client.orders["s1"]] == [
            ("accepted", "0"), ("partially_filled", "0.001"), ("canceled", "0.001")]
    finally:
        if m1.proc.poll() is None:
            m1.proc.send_signal(signal.SIGCONT)  # so that it can be stopped
        maker.close()


@pytest.mark.parametrize("failure", ["kill -9", "SIGSTOP"])
def test_over_two_routers_a_connections_requests_are_answered_in_the_order_it_sent_them(
        cluster: Cluster, clients: Clients, failure: str) -> None:
    """Two routers: each connection's orders go through one of them while it is up, so an amend
    and the cancel sent right after it reach the book in that order (over both, the cancel
    overtook the amend about one time in three). With that router killed, or hung (its
    connections stay open; ZeroMQ's pings find it), the other one carries the connection's
    orders."""
    topology = start(cluster, {"m1": ["BTC-USDT"]}, routers=2)
    clients.url = topology.nodes["g1"].url  # type: ignore[union-attr]
    traders = [clients(f"t{n}") for n in range(4)]  # spread over both routers
    for trader in traders:
        until_accepted(trader, "BTC-USDT", trader.name)
    for n in range(25):
        for trader in traders:
            order_id = f"p{n}"
            trader.send({"action": "submit_order", "order_id": order_id, "symbol": "BTC-USDT", "side": "buy",
                         "price": price("BTC-USDT", -200 - n), "quantity": "0.002"})
            trader.send({"action": "amend_order", "order_id": order_id, "symbol": "BTC-USDT", "quantity": "0.001"})
            trader.send({"action": "cancel_order", "order_id": order_id, "symbol": "BTC-USDT"})
    for trader in traders:
        trader.wait_until(lambda t=trader: len(t.orders.get("p24", ())) == 3, "the last order's three updates")
        for n in range(25):
            assert [u["data"]["status"] for u in trader.orders[f"p{n}"]] == ["accepted", "amended", "canceled"]
        assert not trader.take({"type": "error"})
    r1 = node(cluster, "r1")
    if failure == "kill -9":
        r1.kill()
    else:
        r1.proc.send_signal(signal.SIGSTOP)
    try:
        for trader in traders:
            until_accepted(trader, "BTC-USDT", f"{trader.name}-after")  # whichever router it had
    finally:
        if r1.proc.poll() is None:
            r1.proc.send_signal(signal.SIGCONT)  # so that it can be stopped


def test_an_order_answered_outcome_unknown_gets_its_late_answer_without_its_id(
        cluster: Cluster, clients: Clients) -> None:
    """The matcher hangs (``SIGSTOP``) past the gateway's ``order_timeout_s`` (1 s here) with
    two orders in it: b's buy, which takes a's resting ask, and a's sell, which meets a's own
    resting bid (self-trade prevention cancels that bid). Each is answered ``unavailable``
    with ``outcome_unknown`` and its ``id``; when the matcher goes on, it runs them, and what
    their answers show reaches the clients then, without an ``id``: b's fill, a's accepted
    sell and its canceled bid. (The gateway used to drop an answer that came after its
    request's ``outcome_unknown``: b never learnt that it had bought.) Both late orders are
    live orders of their connections: cancels settle them."""
    topology = start(cluster, {"m1": ["BTC-USDT"]}, limits="order_timeout_s: 1")
    clients.url = topology.nodes["g1"].url  # type: ignore[union-attr]
    a, b = clients("a"), clients("b")
    for client in (a, b):
        until_accepted(client, "BTC-USDT", client.name)
    ask, bid = price("BTC-USDT", 10), price("BTC-USDT", -10)
    for order_id, side, at in (("a-ask", "sell", ask), ("a-bid", "buy", bid)):
        a.send({"action": "submit_order", "order_id": order_id, "symbol": "BTC-USDT", "side": side, "price": at,
                "quantity": "0.001"})
        a.expect({"type": "order_update", "data": {"order_id": order_id, "status": "accepted"}})
    m1 = node(cluster, "m1")
    m1.proc.send_signal(signal.SIGSTOP)
    try:
        b.send({"action": "submit_order", "order_id": "b-buy", "symbol": "BTC-USDT", "side": "buy", "price": ask,
                "quantity": "0.001", "id": "bb"})
        a.send({"action": "submit_order", "order_id": "a-sell", "symbol": "BTC-USDT", "side": "sell", "price": bid,
                "quantity": "0.002", "id": "as"})
        told = [client.expect({"type": "order_update", "id": rid}, timeout=10.0)["data"]
                for client, rid in ((b, "bb"), (a, "as"))]
    finally:
        m1.proc.send_signal(signal.SIGCONT)
    assert [(t["status"], t["reason"], t.get("outcome_unknown")) for t in told] == [
        ("rejected", "unavailable", True)] * 2, told

    b.wait_until(lambda: any(u["data"]["status"] == "filled" for u in b.orders["b-buy"]), "b-buy's late fill")
    a.wait_until(lambda: any(u["data"]["status"] == "canceled" for u in a.orders["a-bid"]), "a-bid's cancel")
    a.wait_until(lambda: any(u["data"]["status"] == "filled" for u in a.orders["a-ask"]), "a-ask's fill (feed)")
    late_b = [u for u in b.orders["b-buy"] if u["data"]["status"] != "rejected"]
    assert [(u["data"]["status"], u["data"]["filled"], "id" in u) for u in late_b] == [
        ("accepted", "0", False), ("filled", "0.001", False)], late_b
    assert late_b[1]["data"]["liquidity"] == "taker"
    (canceled,) = [u for u in a.orders["a-bid"] if u["data"]["status"] == "canceled"]
    assert (canceled["data"]["reason"], "id" in canceled) == ("self_trade", False)
    assert [(u["data"]["status"], "id" in u) for u in a.orders["a-sell"] if u["data"]["status"] != "rejected"] == [
        ("accepted", False)]

    a.send({"action": "cancel_order", "symbol": "BTC-USDT", "order_id": "a-sell", "id": "c"})
    assert a.expect({"type": "order_update", "id": "c"})["data"]["status"] == "canceled"
    b.send({"action": "cancel_order", "symbol": "BTC-USDT", "order_id": "b-buy", "id": "c"})
    assert b.expect({"type": "error", "id": "c"})["code"] == "unknown_order"  # it filled: nothing to cancel


def test_a_router_that_hung_past_the_gateways_pings_answers_late_over_the_new_connection(
        cluster: Cluster, clients: Clients) -> None:
    """The matcher and then the only router hang (``SIGSTOP``) with an order in the router,
    long enough for the gateway's ZeroMQ pings to drop its connection to the router (new
    orders then get ``no router is connected``). The router goes on, passes the order to the
    matcher and answers new orders over the gateway's connection made again; then the matcher
    goes on, and the order's answer reaches the client, late and without an ``id``: the
    gateway's DEALER has a name of its own, which the router hands over to the new connection,
    and its requests name it as their ``reply_to`` (without it, the answer went to the dropped
    connection's old name, and was lost; and ZeroMQ gives a request it reads from the old
    connection after the new one took the name over a name of its own making)."""
    # (no rate limit: until the gateway's DEALER is connected to r1 again, a probe is refused at once)
    topology = start(cluster, {"m1": ["BTC-USDT"]}, limits="order_timeout_s: 1, rate_limit_per_s: 100000")
    clients.url = topology.nodes["g1"].url  # type: ignore[union-attr]
    client = clients("a")
    until_accepted(client, "BTC-USDT", "warm")
    m1, r1 = node(cluster, "m1"), node(cluster, "r1")

    def probe_until(what: str, done: Callable[[dict[str, Any]], bool]) -> None:
        deadline = time.monotonic() + 20.0  # the pings take about 4 s; a reconnection, a fraction of one
        for n in itertools.count():
            client.send({"action": "submit_order", "order_id": f"{what}{n}", "symbol": "BTC-USDT", "side": "buy",
                         "price": price("BTC-USDT", -100), "quantity": "0.001", "id": f"{what}{n}"})
            answer = client.expect({"type": "order_update", "id": f"{what}{n}"}, timeout=10.0)["data"]
            if done(answer):
                return
            assert time.monotonic() < deadline, (n, answer)

    m1.proc.send_signal(signal.SIGSTOP)
    r1.proc.send_signal(signal.SIGSTOP)
    try:
        client.send({"action": "submit_order", "order_id": "held", "symbol": "BTC-USDT", "side": "buy",
                     "price": price("BTC-USDT", -100), "quantity": "0.001", "id": "h"})
        told = client.expect({"type": "order_update", "id": "h"}, timeout=10.0)["data"]
        assert (told["status"], told.get("outcome_unknown")) == ("rejected", True), told
        probe_until("lost", lambda answer: answer.get("message") == "no router is connected")
        # and it says so (logged before that answer was sent)
        assert "no router is connected: orders are refused unavailable" in node(cluster, "g1").log_path.read_text()
        r1.proc.send_signal(signal.SIGCONT)
        # answered through r1 again (outcome unknown: m1 is still stopped; or unavailable once
        # r1 finds it silent): the gateway's new connection is r1's now
        probe_until("back", lambda answer: answer.get("message") != "no router is connected")
    finally:
        r1.proc.send_signal(signal.SIGCONT)
        m1.proc.send_signal(signal.SIGCONT)
    client.wait_until(lambda: any(u["data"]["status"] == "accepted" for u in client.orders["held"]),
                      "the held order's late answer", timeout=15.0)
    (late,) = [u for u in client.orders["held"] if u["data"]["status"] == "accepted"]
    assert "id" not in late


def resyncs_across(topology: Topology, clients: Clients, context: zmq.Context, fail: Callable[[], None],
                   mend: Callable[[], None], what: str) -> None:
    """A client of g1 holds BTC-USDT, synced past an order, and has a sell order resting;
    ``fail`` breaks its feed, another account's order takes part of that sell (orders do not
    pass a relay: the client misses the update, and the fill of its order, which only the
    feed brings), ``mend`` runs. The client must get a fresh ``depth_snapshot`` that holds that
    trade (``what`` brought it) and the fill of its order, once, then follow a burst and a
    second fill to exactly the matcher's book and its order's state."""
    maker = RouterMaker(topology, context)
    try:
        client, book, first = synced_client(topology, clients, maker, "BTC-USDT")
        rest_s1(client)
        client.wait_seq("BTC-USDT", first + 1)
        snapshots = book.snapshots
        fail()
        missed = maker.place("BTC-USDT", "buy", price("BTC-USDT", 50), "0.001")  # s1's first fill
        mend()
        client.wait_until(lambda: book.snapshots > snapshots and not book.awaiting_snapshot,
                          f"a fresh depth_snapshot {what}", timeout=15.0)
        assert book.seq >= missed and len(book.bids) == 1
        assert {Decimal(p): Decimal(q) for p, q in book.asks.items()} == {Decimal(price("BTC-USDT", 50)):
                                                                          Decimal("0.002")}
        client.wait_until(lambda: len(s1_fills(client)) == 1, f"the fill its feed lost, {what}", timeout=15.0)
        top = maker.burst([maker.command("BTC-USDT", "sell", price("BTC-USDT", 100 + n), "0.002") for n in range(5)])
        top = max(top, maker.place("BTC-USDT", "buy", price("BTC-USDT", 50), "0.001"))  # s1's second fill, live
        now, bids, asks = matcher_book(topology, "BTC-USDT", context)
        assert now == top
        assert client.wait_seq("BTC-USDT", top).seq == top and same_book(book, bids, asks)
        client.wait_until(lambda: len(s1_fills(client)) == 2, "the live fill after it", timeout=10.0)
        client.drain()
        assert s1_fills(client) == TWO_FILLS
    finally:
        maker.close()


def test_a_relay_restarted_under_the_gateway_costs_its_clients_a_resync_not_their_book(
        cluster: Cluster, clients: Clients, context: zmq.Context) -> None:
    """``kill -9`` of the relay between the matcher and the gateway, an order while it is down,
    the relay started again: the gateway connects to it again and its clients get a fresh
    ``depth_snapshot`` that holds the update they missed, then the updates after it."""
    topology = start(cluster, {"m1": ["BTC-USDT"]}, relay=True)
    resyncs_across(topology, clients, context, node(cluster, "x1").kill, lambda: cluster.start("x1"),
                   "after the relay's restart")


@pytest.mark.parametrize("failure", ["kill -9", "SIGSTOP"])
def test_a_gateway_whose_relay_failed_switches_to_its_standby_and_its_clients_resync(
        cluster: Cluster, clients: Clients, context: zmq.Context, failure: str) -> None:
    """Relays x1 and x2 both carry m1; the gateway takes x1 and has x2 as its standby. x1 dies
    (``kill -9``, and nobody restarts it) or hangs (``SIGSTOP``: its connections stay open and
    its port still takes new ones, as a host that vanished without a reset; ZeroMQ's pings on
    the gateway's SUB notice it): the gateway switches to x2 (topology ``standby``), and its
    clients get a fresh ``depth_snapshot`` that holds what they missed, then the updates after it."""
    topology = start(cluster, {"m1": ["BTC-USDT"]}, standby_relay=True)
    x1 = node(cluster, "x1")
    try:
        resyncs_across(topology, clients, context,
                       x1.kill if failure == "kill -9" else lambda: x1.proc.send_signal(signal.SIGSTOP),
                       lambda: None, "through the standby relay")
        assert "which carries the same matchers (topology standby)" in node(cluster, "g1").log()
    finally:
        if x1.proc.poll() is None:
            x1.proc.send_signal(signal.SIGCONT)  # so that it can be stopped


def test_a_gateway_moves_back_to_its_upstream_relay_when_the_standby_fails_in_turn(
        cluster: Cluster, clients: Clients, context: zmq.Context) -> None:
    """x1 dies, the gateway takes x2 (standby); x1 comes back and x2 dies: the gateway moves back
    to x1, names it as the topology's upstream, and its clients resync and follow the book."""
    topology = start(cluster, {"m1": ["BTC-USDT"]}, standby_relay=True)
    maker = RouterMaker(topology, context)
    try:
        client, book, _ = synced_client(topology, clients, maker, "BTC-USDT")
        g1 = node(cluster, "g1")
        node(cluster, "x1").kill()
        client.wait_until(lambda: "(topology standby)" in g1.log(), "the move to the standby x2", timeout=15.0)
        client.wait_until(lambda: not book.awaiting_snapshot, "the book after the move", timeout=15.0)
        cluster.start("x1")
        snapshots = book.snapshots
        node(cluster, "x2").kill()
        client.wait_until(lambda: "(topology upstream)" in g1.log(), "the move back to x1", timeout=15.0)
        client.wait_until(lambda: book.snapshots > snapshots and not book.awaiting_snapshot,
                          "a fresh depth_snapshot through x1", timeout=15.0)
        top = maker.burst([maker.command("BTC-USDT", "sell", price("BTC-USDT", 100 + n), "0.002") for n in range(3)])
        assert client.wait_seq("BTC-USDT", top).seq == top
        now, bids, asks = matcher_book(topology, "BTC-USDT", context)
        assert now == top and same_book(book, bids, asks)
    finally:
        maker.close()


def test_a_gateway_started_while_its_relay_is_down_takes_its_standby(
        cluster: Cluster, clients: Clients, context: zmq.Context) -> None:
    """x1, the gateway's upstream, never runs; x2, its standby, does. The gateway must not wait
    for x1 for ever (its clients would get a snapshot, then a book that never moves): it moves
    to x2 as it would had it lost x1's feed, says so, and its clients get the live updates."""
    topology = start_only(cluster, ("m1", "r1", "x2", "g1"), standby_relay=True)
    maker = RouterMaker(topology, context)
    try:
        client, book, _ = synced_client(topology, clients, maker, "BTC-USDT")
        g1 = node(cluster, "g1")
        client.wait_until(lambda: "switching to" in g1.log(), "the gateway's move to its standby", timeout=15.0)
        assert "which carries the same matchers (topology standby)" in g1.log()
        client.wait_until(lambda: not book.awaiting_snapshot, "the book after the move", timeout=15.0)
        snapshots = book.snapshots
        top = maker.burst([maker.command("BTC-USDT", "sell", price("BTC-USDT", 100 + n), "0.002") for n in range(3)])
        assert client.wait_seq("BTC-USDT", top).seq == top
        assert book.snapshots == snapshots  # live updates through x2, not another resync
        now, bids, asks = matcher_book(topology, "BTC-USDT", context)
        assert now == top and same_book(book, bids, asks)
    finally:
        maker.close()


def test_a_gateway_started_before_its_relay_says_it_waits_and_when_the_feed_came(
        cluster: Cluster, clients: Clients, context: zmq.Context) -> None:
    """x1, the gateway's only upstream, starts late: the gateway says it has no feed and keeps
    connecting, says when the feed came, and its clients' books move from then on."""
    topology = start_only(cluster, ("m1", "r1", "g1"), relay=True)
    maker = RouterMaker(topology, context)
    try:
        client, book, _ = synced_client(topology, clients, maker, "BTC-USDT")
        g1 = node(cluster, "g1")
        client.wait_until(lambda: "no feed from" in g1.log(), "the gateway's word that it has no feed", timeout=15.0)
        assert "connected, " not in g1.log()
        cluster.start("x1")
        client.wait_until(lambda: "s after the gateway began to wait for it" in g1.log(),
                          "the gateway's word that the feed came", timeout=15.0)
        # (if x1 passed the subscription on to m1 after this update, the next heartbeat's seq resyncs)
        top = maker.place("BTC-USDT", "sell", price("BTC-USDT", 100), "0.001")
        client.wait_until(lambda: book.seq >= top and not book.awaiting_snapshot, "the update through x1",
                          timeout=15.0)
        now, bids, asks = matcher_book(topology, "BTC-USDT", context)
        assert now == top and same_book(book, bids, asks)
    finally:
        maker.close()


def test_a_gateway_says_when_a_feed_behind_its_relay_goes_silent_and_when_it_is_heard_again(
        cluster: Cluster, clients: Clients, context: zmq.Context) -> None:
    """m1 hangs (``SIGSTOP``) behind relay x1: the gateway's connection to x1 stays up, so only
    the silence of BTC-USDT's feed tells; the gateway's log says so, naming the matcher, and
    says when the feed is heard again (``SIGCONT``); the channel's client is told too
    (``unavailable``). (The client also holds ETH-USDT, m2's,
    whose heartbeat each second wakes it up to look at the log.)"""
    topology = start(cluster, {"m1": ["BTC-USDT"], "m2": ["ETH-USDT"]}, limits="heartbeat_s: 1", relay=True)
    maker = RouterMaker(topology, context)
    m1, g1 = node(cluster, "m1"), node(cluster, "g1")
    try:
        client, _, _ = synced_client(topology, clients, maker, "BTC-USDT", "ETH-USDT")
        assert "no message from the feed" not in g1.log()
        m1.proc.send_signal(signal.SIGSTOP)
        client.wait_until(lambda: "no message from the feed of BTC-USDT for 3 s (matcher m1, or relay x1 on the way)"
                          in g1.log(),
                          "the gateway's word that the feed went silent", timeout=15.0)
        client.expect({"type": "error", "code": "unavailable", "channel": "BTC-USDT"})  # and the client's
        m1.proc.send_signal(signal.SIGCONT)
        client.wait_until(lambda: "the feed of BTC-USDT is heard again" in g1.log(),
                          "the gateway's word that the feed is back", timeout=15.0)
    finally:
        if m1.proc.poll() is None:
            m1.proc.send_signal(signal.SIGCONT)  # so that it can be stopped
        maker.close()


# -- workers ----------------------------------------------------------------------------------


def _descendants(pid: int) -> set[int]:
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            parents[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
    found, frontier = {pid}, [pid]
    while frontier:
        parent = frontier.pop()
        children = [p for p, pp in parents.items() if pp == parent and p not in found]
        found.update(children)
        frontier.extend(children)
    return found


def serving_processes(gateway_pid: int, port: int, client_ports: list[int]) -> dict[int, int]:
    """client port -> pid of the gateway process holding the server side of that connection (/proc)."""
    inode_of: dict[int, str] = {}  # client port -> socket inode of the server side
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            local_port = int(fields[1].rsplit(":", 1)[1], 16)
            remote_port = int(fields[2].rsplit(":", 1)[1], 16)
            if local_port == port and remote_port in client_ports and fields[3] == "01":  # ESTABLISHED
                inode_of[remote_port] = fields[9]
    owner: dict[str, int] = {}
    for pid in _descendants(gateway_pid):
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:["):
                    owner[target[8:-1]] = pid
        except OSError:
            continue
    return {client_port: owner[inode] for client_port, inode in inode_of.items() if inode in owner}


def test_a_gateway_with_two_workers_serves_one_port_from_two_processes(
        cluster: Cluster, clients: Clients, context: zmq.Context) -> None:
    # heartbeats every second: the wait for the workers' stats lines looks at the log after each message
    topology = start(cluster, {"m1": ["BTC-USDT"]}, limits="heartbeat_s: 1", workers=2)
    gateway = topology.nodes["g1"]
    clients.url = gateway.url  # type: ignore[union-attr]
    maker = RouterMaker(topology, context)
    try:
        maker.place("BTC-USDT", "buy", price("BTC-USDT", -5000), "0.001")
        connections = [clients(f"c{n}") for n in range(16)]
        for n, client in enumerate(connections):
            client.subscribe("BTC-USDT")
            until_accepted(client, "BTC-USDT", f"c{n}")
        seq = maker.place("BTC-USDT", "sell", price("BTC-USDT", 100), "0.5")
        for client in connections:
            assert client.wait_seq("BTC-USDT", seq).asks, client.name
            assert client.request({"action": "symbols", "id": 1}, "symbols")["id"] == 1
        ports = [client.ws.socket.getsockname()[1] for client in connections]
        owners = serving_processes(node(cluster, "g1").proc.pid, gateway.port, ports)  # type: ignore[union-attr]
        assert set(owners) == set(ports), f"server side not found for {set(ports) - set(owners)}"
        assert len(set(owners.values())) == 2, f"connections per process: {owners}"
        # SIGUSR1 to the node: each worker logs its stats at once, its connections among them,
        # and goes on serving
        g1 = node(cluster, "g1")
        g1.proc.send_signal(signal.SIGUSR1)
        lines = re.compile(r"worker (\d): last \d+ s: (\d+) connections?")
        connections[0].wait_until(lambda: len(set(lines.findall(g1.log()))) == 2, "a stats line of each worker")
        held = dict(lines.findall(g1.log()))
        assert sorted(held) == ["0", "1"], g1.log()
        assert sorted(map(int, held.values())) == sorted(Counter(owners.values()).values()), (held, owners)
        assert g1.proc.poll() is None
        for client in connections:
            assert client.request({"action": "symbols", "id": 2}, "symbols")["id"] == 2
    finally:
        maker.close()


def test_a_gateway_stopped_under_a_subscriber_that_never_closes_logs_no_error(cluster: Cluster) -> None:
    """A subscriber that never answers the gateway's close: its connection is cut after the
    grace second, once the ZeroMQ sockets are closed; losing it must not touch them (it logged
    a traceback, "Socket operation on non-socket", on every such stop)."""
    topology = start(cluster, {"m1": ["BTC-USDT"]})
    url = topology.nodes["g1"].url  # type: ignore[union-attr]
    protocol = ClientProtocol(parse_uri(url))
    host, port = url.removeprefix("ws://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        protocol.send_request(protocol.connect())
        for data in protocol.data_to_send():
            sock.sendall(data)
        while protocol.state is not State.OPEN:  # each recv times out after 10 s
            data = sock.recv(65536)
            assert data, "the gateway closed the connection"
            protocol.receive_data(data)
        protocol.send_text(b'{"action":"subscribe","channel":"BTC-USDT"}')
        for data in protocol.data_to_send():
            sock.sendall(data)
        got = b""
        while b"depth_snapshot" not in got:  # each recv times out after 10 s
            data = sock.recv(65536)
            assert data, "the gateway closed the connection"
            got += data
        gateway = node(cluster, "g1")
        assert gateway.stop() == 0  # this client reads nothing more: the close frame stays unanswered
    log = gateway.log()
    assert "stopped; counts" in log and "Traceback" not in log and "ZMQError" not in log, log


def test_every_line_a_worker_logs_says_which_worker_it_is() -> None:
    """A gateway's workers share its log: each line of a worker process (its events, not only
    its stats) starts with ``worker N:``, once, whatever the handlers."""
    import io
    import logging

    from zmx.node.runtime import log_as_worker

    root = logging.getLogger()
    streams = [io.StringIO(), io.StringIO()]
    handlers = [logging.StreamHandler(stream) for stream in streams]
    saved = {handler: list(handler.filters) for handler in root.handlers}
    for handler in handlers:
        root.addHandler(handler)
    old_level = root.level
    root.setLevel(logging.INFO)
    try:
        log_as_worker(1)
        logging.getLogger("zmx.gateway").warning("lost the feed from %s", "tcp://127.0.0.1:5560")
    finally:
        root.setLevel(old_level)
        for handler in handlers:
            root.removeHandler(handler)
        for handler, filters in saved.items():
            handler.filters[:] = filters
    assert [stream.getvalue() for stream in streams] == ["worker 1: lost the feed from tcp://127.0.0.1:5560\n"] * 2


def test_a_gateway_whose_worker_dies_stops_whole_and_says_which(cluster: Cluster) -> None:
    """A worker killed: the gateway node stops its other workers, reaps them and exits
    non-zero, naming the worker, so that its supervisor (``zmx up --restart``) starts all of
    them again on the shared port."""
    topology = start(cluster, {"m1": ["BTC-USDT"]}, workers=2)
    gateway = node(cluster, "g1")
    workers = _descendants(gateway.proc.pid) - {gateway.proc.pid}
    assert len(workers) == 2, workers
    os.kill(min(workers), signal.SIGKILL)
    assert gateway.proc.wait(timeout=15) != 0
    assert re.search(r"worker \d stopped: killed by signal SIGKILL \(9\)", gateway.log()), gateway.log()
    lasts = re.findall(r"(worker \d: )?stopped; counts", gateway.log())
    assert lasts and all(lasts), gateway.log()  # the other worker's last line says whose it is
    assert not [pid for pid in workers if Path(f"/proc/{pid}").exists()], "a worker outlived its gateway"
    with socket.socket() as probe:
        assert probe.connect_ex(("127.0.0.1", topology.nodes["g1"].port)) != 0  # type: ignore[union-attr]
