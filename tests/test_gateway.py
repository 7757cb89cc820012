"""The WebSocket gateway as users see it: real node processes, real WebSocket clients (``tests/ws.py``).

Most tests share one cluster (module fixture ``shared``: matchers m1 and m2, router r1, gateway
g1 with ``rate_limit_per_s: 20``), started once and stopped at the end of the module even when a
test fails. Each test uses symbols of its own, so the books it looks at start empty, and opens
its own connections (closed at its end). Orders that only make market data go straight to the
router (``Maker``); orders under test go through the gateway.

Every client checks its feed as it reads (``ws.WsClient``): channel messages only while held,
``prev_seq`` continuity and the checksum on every update. "Nothing more arrived" is never shown
by waiting: a message published later on the same matcher (one ordered stream into the
gateway), or a pong asked for afterwards, has to arrive first.

The tests from ``test_the_gateways_subscriptions_follow_its_clients`` on run against a matcher
played by the test itself (``FakeMatcher``, set up by ``gateway_on_fake_matcher``): the only way to
see what the gateway's SUB socket subscribes, to publish or answer what no matcher would (malformed
or oversized frames), or to silence one symbol's feed.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import json
import logging
import queue
import random
import re
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

import msgpack
import pytest
import zmq
from nodes import Cluster, NodeProcess, write_topology
from websockets.exceptions import ConnectionClosed
from websockets.frames import Frame, Opcode
from websockets.streams import StreamReader
from test_gateway_memory import Gateway as OneConnectionGateway
from test_gateway_memory import Transport
from test_gateway_memory import opened as opened_in_process
from ws import Clients, WsClient, as_decimal_levels, checksum, matcher_book, same_book

from zmx import codec
from zmx.codec import encode_publication
from zmx.commands import CancelOrder, SubmitOrder
from zmx.engine import MatchingEngine
from zmx.events import PUBLIC_EVENT_TYPES, BookChanged, CancelRejected, FeedHeartbeat, OrderAccepted, TradeOccurred
from zmx.model import OrderType, Side, TimeInForce
from zmx.node.client import Client, Reply, RequestTimeout
from zmx.node.gateway import (
    PUBLICATION_MAX_BYTES, REJOIN_S, SNAPSHOT_MAX_BYTES, STATS_CHANNEL_LINES, ChannelState, Connection, FillsRequest,
    Gateway, _of_the_order, read_snapshot, text_frame,
)
from zmx.node.runtime import load_topology
from zmx.protocol import Channel, Session, Submit
from zmx.topology import Topology

RATE = 20  # rate_limit_per_s of the shared gateway
SYMBOLS = {
    # m1: BTC isolation/unsubscribe marker, SOL seq order, XRP many, ADA unsubscribe, DOT warm-up, DOGE orders
    "m1": ["BTC-USDT", "SOL-USDT", "XRP-USDT", "ADA-USDT", "DOT-USDT", "DOGE-USDT"],
    # m2: ETH isolation, LTC many, TRX warm-up, AVAX abuse, LINK order validation
    "m2": ["ETH-USDT", "LTC-USDT", "TRX-USDT", "AVAX-USDT", "LINK-USDT"],
}
MAX_MESSAGE_BYTES = 65_536  # the default limit


def dec(text: str) -> Decimal:
    return Decimal(text)


class Maker:
    """Orders straight to the router (not through the gateway), to make market data."""

    _ids = itertools.count(1)  # order ids, and accounts: each order its own, so none trades with itself

    def __init__(self, topology: Topology, context: zmq.Context) -> None:
        self.client = Client.from_topology(topology, context=context)

    def place(self, symbol: str, side: str, price: str | None, quantity: str, *, type: str = "limit",
              time_in_force: str = "gtc", timeout: float = 15.0) -> Reply:
        """Submit until the router takes it (``unavailable`` while the matchers' HELLOs are on their way)."""
        order_id = account = f"mk{next(self._ids)}"
        deadline = time.monotonic() + timeout
        while True:
            try:
                reply = self.client.submit(order_id, account, symbol, side, price, quantity, type=type,
                                           time_in_force=time_in_force, timeout=1.0)
            except RequestTimeout:
                reply = None
            if reply is not None and reply.ok:
                return reply
            assert reply is None or reply.status == "unavailable", reply
            assert time.monotonic() < deadline, f"never accepted: {symbol} {side} {price} {quantity} ({reply})"

    def seq(self, *args: str, **kwargs: str) -> int:
        """Place an order and return the seq its command got."""
        return self.place(*args, **kwargs).events[-1].seq

    def close(self) -> None:
        self.client.close()


@dataclass
class Shared:
    cluster: Cluster
    topology: Topology
    url: str
    maker: Maker
    context: zmq.Context


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Shared]:
    directory = tmp_path_factory.mktemp("gateway")
    cluster = Cluster(directory)
    context: zmq.Context = zmq.Context()
    maker = None
    try:
        cluster.topology = write_topology(directory, matchers=SYMBOLS, gateways=1,
                                          extra_gateway=f", limits: {{rate_limit_per_s: {RATE}}}")
        for name in ("m1", "m2", "r1", "g1"):
            cluster.start(name)
        topology = load_topology(cluster.topology)
        maker = Maker(topology, context)
        url = topology.nodes["g1"].url  # type: ignore[union-attr]
        # The router knows both matchers once an order to each is accepted; the gateway's own
        # connection to the router is up once an order through it is not `unavailable`.
        maker.place("DOT-USDT", "buy", "1", "1")
        maker.place("TRX-USDT", "buy", "1", "1")
        warm = WsClient(url, name="warm-up")
        try:
            for n in itertools.count():
                warm.send({"action": "submit_order", "order_id": f"warm{n}", "symbol": "TRX-USDT", "side": "buy",
                           "price": "1", "quantity": "1", "id": n})
                update = warm.expect({"type": "order_update", "id": n}, timeout=6.0)
                if update["data"]["status"] == "accepted":
                    break
                assert update["data"].get("reason") == "unavailable" and n < 20, update
        finally:
            warm.close()
        yield Shared(cluster, topology, url, maker, context)
    finally:
        if maker is not None:
            maker.close()
        cluster.stop_all()
        context.destroy(linger=0)


@pytest.fixture
def clients(shared: Shared) -> Iterator[Clients]:
    opened = Clients(shared.url)
    try:
        yield opened
    finally:
        opened.close_all()


def only(client: WsClient, what: dict, timeout: float = 5.0) -> dict:
    """The next message that is not a heartbeat, which must contain ``what``."""
    message = client.expect(lambda m: m["type"] != "heartbeat", timeout)
    data = what.get("data", {})
    assert message["type"] == what["type"] and message.get("channel") == what.get("channel"), message
    for key, value in data.items():
        got = message["data"].get(key)
        if isinstance(value, list):  # levels, compared by value
            assert as_decimal_levels(got) == as_decimal_levels(value), (key, message)
        elif isinstance(value, str) and key in ("price", "quantity"):
            assert dec(got) == dec(value), (key, message)
        else:
            assert got == value, (key, message)
    return message


def error_of(client: WsClient, code: str, **fields: object) -> dict:
    """The next error (``code``, the given fields) among the unread messages."""
    message = client.expect(lambda m: m["type"] == "error", timeout=5.0)
    assert message.get("code") == code and all(message.get(k) == v for k, v in fields.items()), message
    assert isinstance(message.get("message"), str) and message["message"], message
    return message


# -- framing -----------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, 125, 126, 127, 65_535, 65_536, 70_000])
def test_the_gateways_own_text_frames_parse_as_websockets_reads_them(size: int) -> None:
    """The gateway frames its messages itself (``text_frame``); each of the three header
    lengths of RFC 6455 is what a client's parser reads back as the same text message."""
    payload = bytes(ord("a") + i % 26 for i in range(size))
    framed = text_frame(payload)
    assert framed == Frame(Opcode.TEXT, payload).serialize(mask=False, extensions=[])
    reader = StreamReader()
    reader.feed_data(framed)
    parser = Frame.parse(reader.read_exact, mask=False, max_size=None, extensions=[])
    try:
        next(parser)
    except StopIteration as done:
        frame = done.value
    else:
        raise AssertionError("the parser wants more bytes than the frame has")
    assert (frame.opcode, frame.fin, frame.data) == (Opcode.TEXT, True, payload)
    assert not reader.buffer, "bytes left over after the frame"


# -- requests without channels -----------------------------------------------------------------


def test_ping_answers_pong_echoing_string_and_integer_ids(clients: Clients) -> None:
    client = clients()
    client.send({"action": "ping"})
    pong = client.next()
    assert pong["type"] == "pong" and "id" not in pong, pong
    for ident in ("abc", "x" * 64, 7, 0, -3, 2**53 + 1, 2**63 - 1):
        client.send({"action": "ping", "id": ident})
        pong = client.next()
        assert pong["type"] == "pong", pong
        assert type(pong.get("id")) is type(ident) and pong["id"] == ident, (ident, pong)
    # an id is a string of at most 64 characters or an integer of 64 bits; anything else is refused
    for ident in (1.5, True, [1], {"n": 1}, "x" * 65, 2**64):
        client.send({"action": "ping", "id": ident})
        error = client.next()
        assert error["type"] == "error" and error.get("code") == "invalid_field", (ident, error)


def test_a_null_id_is_the_same_as_no_id(clients: Clients) -> None:
    """docs/protocol.md: "`null` is the same as no `id`"."""
    client = clients()
    client.send({"action": "ping", "id": None})
    assert client.next() == {"type": "pong"}


def test_symbols_lists_every_symbol_with_its_grid(shared: Shared, clients: Clients) -> None:
    client = clients()
    answer = client.request({"action": "symbols", "id": "s1"}, "symbols")
    assert answer.get("id") == "s1", answer
    listed = {entry["symbol"]: entry for entry in answer["data"]}
    assert len(answer["data"]) == len(listed) and set(listed) == set(shared.topology.symbols)
    for name, spec in shared.topology.symbols.items():
        described = spec.describe()  # tick_size "0.01", lot_size "0.001", min_quantity, max_quantity
        assert {k: listed[name].get(k) for k in described} == described, listed[name]


# -- channels ---------------------------------------------------------------------------------


def test_subscribe_acks_then_snapshot_then_updates_and_trades_in_seq_order(shared: Shared, clients: Clients) -> None:
    client = clients()
    client.send({"action": "subscribe", "channel": "SOL-USDT", "id": "sub-1"})
    ack = client.next()
    assert ack == {"type": "subscription_ack", "channel": "SOL-USDT", "id": "sub-1"}, ack
    snapshot = only(client, {"type": "depth_snapshot", "channel": "SOL-USDT", "data": {"bids": [], "asks": []}})
    assert snapshot["data"]["checksum"] == 0 == checksum([], [])  # an empty book: crc32 of ""
    assert snapshot["data"].get("ts") == 0  # no change yet
    start = snapshot["data"]["seq"]

    s1 = shared.maker.seq("SOL-USDT", "sell", "30010", "1")
    s2 = shared.maker.seq("SOL-USDT", "buy", "29990", "1")
    s3 = shared.maker.seq("SOL-USDT", "buy", "30020", "1.4")  # takes the 1 at 30010, 0.4 rests at 30020
    s4 = shared.maker.seq("SOL-USDT", "sell", "29980", "1.5")  # takes 0.4 at 30020 and 1 at 29990, 0.1 rests
    assert [s1, s2, s3, s4] == [start + 1, start + 2, start + 3, start + 4]

    now = time.time_ns()
    first = only(client, {"type": "depth_update", "channel": "SOL-USDT",
                          "data": {"seq": s1, "prev_seq": start, "bids": [], "asks": [["30010", "1"]]}})
    ts = first["data"]["ts"]
    assert isinstance(ts, int) and abs(now - ts) < 60 * 10**9, first  # nanoseconds since the epoch
    only(client, {"type": "depth_update", "channel": "SOL-USDT",
                  "data": {"seq": s2, "prev_seq": s1, "bids": [["29990", "1"]], "asks": []}})
    trade = only(client, {"type": "trade", "channel": "SOL-USDT",
                          "data": {"seq": s3, "price": "30010", "quantity": "1", "taker_side": "buy"}})
    assert isinstance(trade["data"]["trade_id"], int) and isinstance(trade["data"]["ts"], int), trade
    only(client, {"type": "depth_update", "channel": "SOL-USDT",
                  "data": {"seq": s3, "prev_seq": s2, "bids": [["30020", "0.4"]], "asks": [["30010", "0"]]}})
    t1 = only(client, {"type": "trade", "channel": "SOL-USDT",
                       "data": {"seq": s4, "price": "30020", "quantity": "0.4", "taker_side": "sell"}})
    t2 = only(client, {"type": "trade", "channel": "SOL-USDT",
                       "data": {"seq": s4, "price": "29990", "quantity": "1", "taker_side": "sell"}})
    assert trade["data"]["trade_id"] < t1["data"]["trade_id"] < t2["data"]["trade_id"]
    only(client, {"type": "depth_update", "channel": "SOL-USDT",
                  "data": {"seq": s4, "prev_seq": s3, "bids": [["30020", "0"], ["29990", "0"]],
                           "asks": [["29980", "0.1"]]}})
    book = client.books["SOL-USDT"]
    assert as_decimal_levels(book.levels()[1]) == [(dec("29980"), dec("0.1"))] and not book.bids
    seq, bids, asks = matcher_book(shared.topology, "SOL-USDT", shared.context)
    assert seq == s4 and same_book(book, bids, asks)


def test_subscribe_many_answers_each_channel_in_order_and_a_held_one_again_changes_nothing(
        shared: Shared, clients: Clients) -> None:
    before = shared.maker.seq("XRP-USDT", "buy", "0.5", "3")
    client = clients()
    client.send({"action": "subscribe", "channels": ["XRP-USDT", "NOPE-USDT", "LTC-USDT"], "id": 5})
    answers = [client.expect(lambda m: m["type"] in ("subscription_ack", "error")) for _ in range(3)]
    assert [(a["type"], a.get("channel"), a.get("code"), a.get("id")) for a in answers] == [
        ("subscription_ack", "XRP-USDT", None, 5),
        ("error", "NOPE-USDT", "unknown_channel", 5),
        ("subscription_ack", "LTC-USDT", None, 5),
    ], answers
    xrp = client.expect({"type": "depth_snapshot", "channel": "XRP-USDT"})
    assert xrp["data"]["seq"] == before and xrp["data"]["asks"] == []
    assert as_decimal_levels(xrp["data"]["bids"]) == [(dec("0.5"), dec("3"))]
    client.expect({"type": "depth_snapshot", "channel": "LTC-USDT"})

    client.send({"action": "subscribe", "channel": "NOPE-USDT", "id": "n"})
    error_of(client, "unknown_channel", channel="NOPE-USDT", id="n")

    # Subscribing a held channel is acknowledged again: no second snapshot, no second stream.
    mark = len(client.received)
    client.send({"action": "subscribe", "channel": "XRP-USDT", "id": "again"})
    client.expect({"type": "subscription_ack", "channel": "XRP-USDT", "id": "again"})
    seqs = [shared.maker.seq("XRP-USDT", "buy", "0.4", "1"), shared.maker.seq("XRP-USDT", "sell", "0.6", "2")]
    client.wait_seq("XRP-USDT", seqs[-1])
    client.send({"action": "ping", "id": "after"})
    client.expect({"type": "pong", "id": "after"})
    assert client.since(mark, {"type": "depth_snapshot"}) == []
    updates = client.since(mark, {"type": "depth_update", "channel": "XRP-USDT"})
    assert [u["data"]["seq"] for u in updates] == seqs  # each once
    assert client.since(mark, {"type": "subscription_ack"}) == [
        {"type": "subscription_ack", "channel": "XRP-USDT", "id": "again"}]


def test_unsubscribe_acks_and_nothing_more_of_the_channel_follows(shared: Shared, clients: Clients) -> None:
    leaving, staying = clients("leaving"), clients("staying")
    leaving.subscribe("ADA-USDT", "BTC-USDT")
    staying.subscribe("ADA-USDT")
    shared.maker.seq("ADA-USDT", "buy", "0.3", "5")
    leaving.send({"action": "unsubscribe", "channel": "ADA-USDT", "id": 9})
    ack = leaving.expect("unsubscription_ack")
    assert ack == {"type": "unsubscription_ack", "channel": "ADA-USDT", "id": 9}, ack
    mark = len(leaving.received)

    # Published after the ack: an ADA trade, then a BTC update on the same matcher (m1), so the
    # gateway gets them in this order. `staying` proves the ADA messages were sent out.
    ada = [shared.maker.seq("ADA-USDT", "sell", "0.3", "2"), shared.maker.seq("ADA-USDT", "buy", "0.2", "1")]
    btc = shared.maker.seq("BTC-USDT", "buy", "100", "1")
    staying.wait_seq("ADA-USDT", ada[-1])
    assert staying.books["ADA-USDT"].trades[-1]["seq"] == ada[0]
    leaving.wait_seq("BTC-USDT", btc)
    assert leaving.since(mark, {"channel": "ADA-USDT"}) == []  # (ws.WsClient also fails on one)

    # A channel not held, an unknown name and a list: each acknowledged, in order.
    leaving.send({"action": "unsubscribe", "channels": ["ADA-USDT", "NOPE-USDT", "BTC-USDT"], "id": "u"})
    acks = [leaving.expect(lambda m: m["type"] in ("unsubscription_ack", "error")) for _ in range(3)]
    assert acks == [{"type": "unsubscription_ack", "channel": c, "id": "u"}
                    for c in ("ADA-USDT", "NOPE-USDT", "BTC-USDT")], acks

    # Back again: a fresh snapshot, the same book as the client that stayed.
    leaving.subscribe("ADA-USDT")
    book, other = leaving.books["ADA-USDT"], staying.books["ADA-USDT"]
    assert book.seq == other.seq == ada[-1] and book.levels() == other.levels()


def test_two_channels_are_isolated(shared: Shared, clients: Clients) -> None:
    on_btc, on_eth = clients("btc"), clients("eth")
    on_btc.subscribe("BTC-USDT")
    on_eth.subscribe("ETH-USDT")
    eth = shared.maker.seq("ETH-USDT", "buy", "2000", "1")
    btc = shared.maker.seq("BTC-USDT", "buy", "101", "1")
    eth2 = shared.maker.seq("ETH-USDT", "sell", "2001", "1")
    on_eth.wait_seq("ETH-USDT", eth2)
    on_btc.wait_seq("BTC-USDT", btc)
    for client in (on_btc, on_eth):  # anything sent to it before the pong has arrived by now
        client.send({"action": "ping", "id": "end"})
        client.expect({"type": "pong", "id": "end"})
    assert {m.get("channel") for m in on_btc.received if "channel" in m} == {"BTC-USDT"}
    assert {m.get("channel") for m in on_eth.received if "channel" in m} == {"ETH-USDT"}
    assert on_eth.books["ETH-USDT"].seq == eth2 > eth


# -- orders -----------------------------------------------------------------------------------


def updates_of(client: WsClient, what: dict, count: int) -> list[dict]:
    return client.expect_all(lambda m: m["type"] == "order_update" and all(
        m.get(k) == v if k != "data" else all(m["data"].get(dk) == dv for dk, dv in v.items())
        for k, v in what.items()), count)


def test_submit_and_cancel_answer_order_updates_to_their_connection_only(shared: Shared, clients: Clients) -> None:
    maker, taker = clients("maker"), clients("taker")
    maker.subscribe("DOGE-USDT")
    maker.send({"action": "submit_order", "order_id": "a-1", "symbol": "DOGE-USDT", "side": "buy", "price": "0.5",
                "quantity": "10", "id": 11})
    accepted = maker.expect({"type": "order_update", "id": 11})
    assert accepted["data"]["status"] == "accepted", accepted
    data = accepted["data"]
    assert (data["order_id"], data["symbol"], data["side"], dec(data["price"]), dec(data["quantity"]),
            dec(data["filled"]), dec(data["remaining"])) == ("a-1", "DOGE-USDT", "buy", dec("0.5"), dec("10"), 0,
                                                             dec("10")), accepted
    assert data.get("type") == "limit" and data.get("time_in_force") == "gtc", accepted

    taker.send({"action": "submit_order", "order_id": "b-1", "symbol": "DOGE-USDT", "side": "sell", "price": "0.5",
                "quantity": "4", "id": "b1"})
    mine = updates_of(taker, {"id": "b1"}, 2)
    assert [u["data"]["status"] for u in mine] == ["accepted", "filled"], mine
    fill = mine[1]["data"]
    assert (dec(fill["filled"]), dec(fill["remaining"]), dec(fill["last_price"]), dec(fill["last_quantity"]),
            fill["liquidity"]) == (dec("4"), 0, dec("0.5"), dec("4"), "taker"), fill
    # the resting order's fill reaches its owner, without an id (no request of it caused it)
    resting = maker.expect({"type": "order_update", "data": {"order_id": "a-1", "status": "partially_filled"}})
    assert "id" not in resting, resting
    made = resting["data"]
    assert (dec(made["filled"]), dec(made["remaining"]), dec(made["last_price"]), dec(made["last_quantity"]),
            made["liquidity"], made["trade_id"]) == (dec("4"), dec("6"), dec("0.5"), dec("4"), "maker",
                                                     fill["trade_id"]), made
    assert (made.get("type"), made.get("time_in_force")) == ("limit", "gtc"), made  # kept from its accepted
    trade = maker.expect({"type": "trade", "channel": "DOGE-USDT"})
    assert trade["data"]["trade_id"] == fill["trade_id"] and trade["data"]["taker_side"] == "sell", trade

    # Another connection's order does not exist for this one; the owner cancels it.
    taker.send({"action": "cancel_order", "symbol": "DOGE-USDT", "order_id": "a-1", "id": "steal"})
    error_of(taker, "unknown_order", id="steal")
    maker.send({"action": "cancel_order", "symbol": "DOGE-USDT", "order_id": "a-1", "id": 12})
    canceled = maker.expect({"type": "order_update", "id": 12})
    assert (canceled["data"]["order_id"], canceled["data"]["status"], canceled["data"].get("reason")) == (
        "a-1", "canceled", "user"), canceled
    assert (canceled["data"].get("type"), canceled["data"].get("time_in_force")) == ("limit", "gtc"), canceled
    maker.send({"action": "cancel_order", "symbol": "DOGE-USDT", "order_id": "a-1", "id": 13})
    error_of(maker, "unknown_order", id=13)
    maker.send({"action": "cancel_order", "symbol": "DOGE-USDT", "order_id": "never-placed", "id": 14})
    error_of(maker, "unknown_order", id=14)
    maker.send({"action": "submit_order", "order_id": "a-1", "symbol": "DOGE-USDT", "side": "buy", "price": "0.5",
                "quantity": "1", "id": 15})  # an order_id is never reused, not even after the order ended
    again = maker.expect({"type": "order_update", "id": 15})
    assert (again["data"]["status"], again["data"].get("reason")) == ("rejected", "duplicate_order_id"), again
    # on another symbol (here: of another matcher) the same id is another order (docs/protocol.md, "Orders")
    maker.send({"action": "submit_order", "order_id": "a-1", "symbol": "LINK-USDT", "side": "buy", "price": "0.01",
                "quantity": "1", "time_in_force": "ioc", "id": "elsewhere"})
    elsewhere = maker.expect({"type": "order_update", "id": "elsewhere", "data": {"status": "accepted"}})
    assert elsewhere["data"]["symbol"] == "LINK-USDT", elsewhere
    assert set(taker.orders) == {"b-1"} and set(maker.orders) == {"a-1"}  # nobody hears another's orders

    # Orders stay on the book when their connection closes.
    maker.send({"action": "submit_order", "order_id": "a-2", "symbol": "DOGE-USDT", "side": "buy", "price": "0.4",
                "quantity": "1", "id": 16})
    assert maker.expect({"type": "order_update", "id": 16})["data"]["status"] == "accepted"
    maker.close()
    late = clients("late")
    late.subscribe("DOGE-USDT")
    bids, asks = late.books["DOGE-USDT"].levels()
    assert as_decimal_levels(bids) == [(dec("0.4"), dec("1"))] and asks == []
    taker.send({"action": "submit_order", "order_id": "b-2", "symbol": "DOGE-USDT", "side": "sell",
                "price": "0.4", "quantity": "1", "id": "b2"})
    assert [u["data"]["status"] for u in updates_of(taker, {"id": "b2"}, 2)] == ["accepted", "filled"]


def test_submit_order_refuses_bad_fields_and_rejects_what_the_book_cannot_take(clients: Clients) -> None:
    good = {"action": "submit_order", "order_id": "v-1", "symbol": "LINK-USDT", "side": "buy", "price": "1",
            "quantity": "1"}
    fields = clients("fields")
    for n, missing in enumerate(("order_id", "symbol", "side", "quantity", "price")):
        fields.send({k: v for k, v in good.items() if k != missing} | {"id": n})
        error = error_of(fields, "missing_field", id=n)
        assert missing in json.dumps(error), error
    wrong = {"price": 1, "quantity": 1, "side": "hold", "type": "stop", "time_in_force": "gtd", "symbol": 5}
    for n, (field, value) in enumerate(wrong.items(), start=10):
        fields.send(good | {field: value, "id": n})
        error = error_of(fields, "invalid_field", id=n)
        assert field in json.dumps(error), error

    book = clients("book")

    def outcome(order: dict, n: int) -> tuple[str, str | None]:
        book.send(good | order | {"id": n})
        last = book.expect({"type": "order_update", "id": n})
        ends_at_once = order.get("type") == "market" or order.get("time_in_force") in ("ioc", "fok")
        while ends_at_once and last["data"]["status"] == "accepted":  # its end follows
            last = book.expect({"type": "order_update", "id": n})
        return last["data"]["status"], last["data"].get("reason")

    assert outcome({"order_id": "v-2", "symbol": "NOPE-USDT"}, 1) == ("rejected", "unknown_symbol")
    assert outcome({"order_id": "v-3", "price": "1.001"}, 2) == ("rejected", "invalid_price")
    assert outcome({"order_id": "v-4", "quantity": "0.0001"}, 3) == ("rejected", "invalid_quantity")
    assert outcome({"order_id": "v-5", "type": "market", "price": None}, 4) == ("canceled", "no_liquidity")
    assert outcome({"order_id": "v-6", "side": "sell", "price": "2"}, 5) == ("accepted", None)
    assert outcome({"order_id": "v-7", "price": "2", "time_in_force": "post_only"}, 6) == ("rejected", "would_cross")
    assert outcome({"order_id": "v-8", "price": "1.5", "time_in_force": "ioc"}, 7) == ("canceled", "ioc")
    assert outcome({"order_id": "v-9", "price": "2", "quantity": "5", "time_in_force": "fok"}, 8) == (
        "canceled", "fok")
    # LINK-USDT has no max_quantity: one order may be 2^63 - 1 lots, but a price level never holds
    # more (two such orders once crashed the matcher on a BookChanged it could not pack)
    most = {"side": "sell", "price": "77777", "quantity": "9223372036854775.807"}
    assert outcome({"order_id": "v-10", **most}, 9) == ("accepted", None)
    assert outcome({"order_id": "v-11", **most}, 10) == ("rejected", "invalid_quantity")
    assert outcome({"order_id": "v-12", **most, "quantity": "0.001"}, 11) == ("rejected", "invalid_quantity")
    assert outcome({"order_id": "v-13", "side": "sell", "price": "77778"}, 12) == ("accepted", None)  # still serving
    book.send({"action": "cancel_order", "symbol": "LINK-USDT", "order_id": "v-10", "id": 13})
    assert book.expect({"type": "order_update", "id": 13})["data"]["status"] == "canceled"

    # docs/protocol.md: an order_id is 1-64 printable ASCII characters
    for n, order_id in enumerate(("x" * 65, "", "tab\tid", "ünï"), start=20):
        fields.send(good | {"order_id": order_id, "id": n})
        answer = fields.expect({"id": n})
        assert answer["type"] == "error" and answer.get("code") == "invalid_field", (order_id, answer)


def test_amend_order_changes_a_resting_order_of_its_connection_and_is_told_as_amended(clients: Clients) -> None:
    """``amend_order`` (docs/protocol.md, "Orders"; the rules in docs/matching.md, "Amend"): a
    smaller quantity, then a new price that crosses and trades at once; another connection
    cannot amend the order; what the gateway or the book refuses comes back as an error."""
    owner, other = clients("amender"), clients("other")

    def amend(client: WsClient, n: int, **fields: str) -> None:
        client.send({"action": "amend_order", "symbol": "LINK-USDT", "order_id": "am-1", **fields, "id": n})

    owner.send({"action": "submit_order", "order_id": "am-1", "symbol": "LINK-USDT", "side": "buy",
                "price": "0.5", "quantity": "4", "id": 1})
    assert updates_of(owner, {"id": 1}, 1)[0]["data"]["status"] == "accepted"
    amend(owner, 2, quantity="3")
    (smaller,) = updates_of(owner, {"id": 2}, 1)
    assert {k: smaller["data"][k] for k in ("order_id", "symbol", "status", "side", "price", "quantity", "filled",
                                            "remaining")} == {
        "order_id": "am-1", "symbol": "LINK-USDT", "status": "amended", "side": "buy", "price": "0.5",
        "quantity": "3", "filled": "0", "remaining": "3"}, smaller
    amend(other, 3, quantity="2")
    error_of(other, "unknown_order", id=3, order_id="am-1", symbol="LINK-USDT")

    other.send({"action": "submit_order", "order_id": "am-s", "symbol": "LINK-USDT", "side": "sell",
                "price": "1.9", "quantity": "1", "id": 4})
    assert updates_of(other, {"id": 4}, 1)[0]["data"]["status"] == "accepted"
    amend(owner, 5, price="1.9")  # crosses the ask: trades at once, the rest rests at 1.9
    moved, fill = updates_of(owner, {"id": 5}, 2)
    assert (moved["data"]["status"], moved["data"]["price"], moved["data"]["remaining"]) == ("amended", "1.9", "3")
    assert {k: fill["data"][k] for k in ("status", "price", "last_price", "last_quantity", "filled", "remaining",
                                         "liquidity")} == {
        "status": "partially_filled", "price": "1.9", "last_price": "1.9", "last_quantity": "1", "filled": "1",
        "remaining": "2", "liquidity": "taker"}, fill
    made = other.expect({"type": "order_update", "data": {"order_id": "am-s", "status": "filled"}})
    assert made["data"]["trade_id"] == fill["data"]["trade_id"], made

    amend(owner, 6, price="1.901")
    error_of(owner, "invalid_price", id=6)
    amend(owner, 7, quantity="0.5")  # not above the 1 filled already: the book refuses it
    error_of(owner, "invalid_quantity", id=7, order_id="am-1")
    amend(owner, 8)
    error_of(owner, "missing_field", id=8)
    owner.send({"action": "cancel_order", "symbol": "LINK-USDT", "order_id": "am-1", "id": 9})
    (gone,) = updates_of(owner, {"id": 9}, 1)
    assert (gone["data"]["status"], gone["data"]["filled"], gone["data"]["quantity"]) == ("canceled", "1", "3"), gone


# -- bad clients -------------------------------------------------------------------------------


def test_bad_input_gets_a_clear_error_and_the_connection_stays_open(clients: Clients) -> None:
    client = clients()
    for raw in ("{not json", "[1, 2]", "42", '"ping"', "null", b'{"action": "ping"}'):
        client.send_raw(raw)
        error = client.next()
        assert error["type"] == "error" and error.get("code") == "bad_json" and error.get("message"), (raw, error)
    client.send({"id": 3})
    error_of(client, "missing_field", id=3)
    client.send({"action": 5, "id": 4})
    error_of(client, "invalid_field", id=4)
    client.send({"action": "fly", "id": "f"})
    error_of(client, "unknown_action", id="f")
    client.send({"action": "ping", "id": 8, "tag": {"mine": [1, 2]}})  # unknown keys are ignored
    assert client.next() == {"type": "pong", "id": 8}

    channels = clients("channels")
    requests = [
        ({"action": "subscribe"}, "missing_field"),
        ({"action": "subscribe", "channel": 5}, "invalid_field"),
        ({"action": "subscribe", "channels": []}, "invalid_field"),
        ({"action": "subscribe", "channels": "BTC-USDT"}, "invalid_field"),
        ({"action": "subscribe", "channels": [1]}, "invalid_field"),
        ({"action": "subscribe", "channels": [f"C{n}-USDT" for n in range(101)]}, "invalid_field"),
        ({"action": "subscribe", "channel": "BTC-USDT", "channels": ["ETH-USDT"]}, "invalid_field"),
        ({"action": "unsubscribe"}, "missing_field"),
    ]
    for n, (request, code) in enumerate(requests):
        channels.send(request | {"id": n})
        error_of(channels, code, id=n)
    assert not channels.held  # none of them subscribed anything
    for one in (client, channels):
        assert one.request({"action": "ping", "id": "still"}, "pong") == {"type": "pong", "id": "still"}


def test_rate_limit_answers_rate_limited_and_does_not_close_below_twice_the_limit(clients: Clients) -> None:
    client = clients()
    burst = RATE * 3 // 2
    for n in range(burst):
        client.send({"action": "ping", "id": n})
    answers: list[dict] = []
    try:
        while len(answers) < burst:
            answers.append(client.expect(lambda m: m["type"] in ("pong", "error"), timeout=3.0))
    except AssertionError:
        pass  # shown below
    seen = [(a["type"], a.get("code"), a.get("id")) for a in answers]
    # each one answered, its id echoed (docs/protocol.md: every reply echoes the id, errors included)
    assert sorted(a.get("id", -1) for a in answers) == list(range(burst)), f"{burst} pings answered by {seen}"
    limited = [a for a in answers if a["type"] == "error"]
    assert all(a.get("code") == "rate_limited" for a in limited), limited
    assert limited and len(answers) - len(limited) <= RATE, [(a["id"], a["type"]) for a in answers]
    assert not client.closed


def send_10_mb(client: WsClient) -> None:
    try:
        client.send_raw('{"action": "ping", "pad": "' + "x" * 10_000_000 + '"}')
    except (ConnectionClosed, OSError):
        pass  # closed while it was still sending


def test_pings_and_big_messages_count_toward_the_rate_limit(clients: Clients) -> None:
    """Reading is what the limit bounds: a ping storm is closed as a message flood is (each ping
    counts once, though websockets answers it by itself), and a message counts once per 4 KiB
    begun, so a few big ones reach twice the limit (40 here) as many small ones do."""
    pinger = clients("pinger")
    try:
        for _ in range(20 * RATE):
            pinger.ws.ping()
    except (ConnectionClosed, OSError):
        pass  # closed while it was still sending
    code = pinger.expect_close()
    assert code == 1008, f"closed with {code} {pinger.close_reason!r}"
    big = clients("big")
    pad = "x" * (15 * 4096 - 100)  # 15 units a message: the third within a second closes
    try:
        for n in range(5):  # (a window boundary among them leaves three or more on one side)
            big.send({"action": "ping", "id": n, "pad": pad})
    except (ConnectionClosed, OSError):
        pass
    code = big.expect_close()
    assert code == 1008, f"closed with {code} {big.close_reason!r}"
    assert len(big.since(0, "pong")) < 5
    other = clients("other")
    assert other.request({"action": "ping", "id": 1}, "pong") == {"type": "pong", "id": 1}


def frame(opcode: Opcode, data: bytes, fin: bool = True) -> bytes:
    """A client frame (masked), to send on a connection's socket as it is."""
    return Frame(opcode, data, fin=fin).serialize(mask=True, extensions=[])


def test_a_message_the_gateway_fails_on_closes_that_connection_alone_with_1011(
        caplog: pytest.LogCaptureFixture) -> None:
    """(In process, the gateway played by the harness of test_gateway_memory.) A bug in handling
    a message, as the error message of a value nested too deep to show was, killed the
    connection with a traceback in the log: it is one ERROR line, a close with 1011 and a count."""

    class Broken:
        account = "g1.alice"

        def receive(self, data: bytes, now: float) -> list:
            raise RecursionError("maximum recursion depth exceeded")

    async def run() -> tuple[OneConnectionGateway, Transport]:
        gateway = OneConnectionGateway()
        gateway.counts = collections.Counter()  # type: ignore[attr-defined]
        conn, transport, _ = opened_in_process(gateway, split=False)
        conn.session = Broken()  # type: ignore[assignment]
        transport.written.clear()
        conn.data_received(frame(Opcode.TEXT, b'{"action": "ping"}'))
        return gateway, transport

    with caplog.at_level(logging.ERROR, logger="zmx.gateway"):
        gateway, transport = asyncio.run(run())
    assert gateway.counts == {"internal_error_closed": 1}  # type: ignore[attr-defined]
    assert transport.written[:1] == b"\x88" and transport.written[2:4] == (1011).to_bytes(2, "big"), transport.written
    assert ("connection g1.alice: a message it sent could not be handled (RecursionError: maximum recursion depth "
            "exceeded); closing it") in caplog.text
    assert "Traceback" not in caplog.text


def test_a_message_in_fragments_is_read_whole_whatever_other_connections_send_meanwhile(clients: Clients) -> None:
    """A connection whose message is cut in fragments keeps its half-read message between reads;
    another connection's message meanwhile is read on its own (idle connections share one
    websockets machine, which once went back to the others while still holding a fragment:
    both connections were closed with 1002). A client that sends every message in a few pieces
    is not rate-limited for them."""
    cutter, other = clients("cutter"), clients("other")
    cutter.ws.socket.sendall(frame(Opcode.TEXT, b'{"action": "ping", ', fin=False))
    assert cutter.ws.ping().wait(5.0), "no pong"  # (a control frame may come between fragments) read so far
    assert other.request({"action": "ping", "id": 1}, "pong") == {"type": "pong", "id": 1}
    cutter.ws.socket.sendall(frame(Opcode.CONT, b'"id": "a"}'))
    assert cutter.expect("pong") == {"type": "pong", "id": "a"}
    burst = RATE // 2  # in three pieces each: at 4 units a message (each piece and the whole) this closed at 40
    for n in range(burst):
        cutter.ws.socket.sendall(frame(Opcode.TEXT, b'{"action": ', fin=False)
                                 + frame(Opcode.CONT, b'"ping", ', fin=False) + frame(Opcode.CONT, b'"id": %d}' % n))
    answers = [cutter.expect(lambda m: m["type"] in ("pong", "error")) for _ in range(burst)]
    assert answers == [{"type": "pong", "id": n} for n in range(burst)], [a for a in answers if a["type"] != "pong"]


def test_of_the_order_tells_a_reply_that_holds_the_orders_own_event() -> None:
    """A matcher's reply always holds an event of the command's own order; one that does not (a
    book change alone, another order's or account's accepted) cannot answer it."""
    command = SubmitOrder("o1", "alice", "BTC-USDT", Side.BUY, OrderType.LIMIT, TimeInForce.GTC, 100, 5)

    def accepted(order_id: str, account: str) -> OrderAccepted:
        return OrderAccepted("BTC-USDT", 4, 9, order_id, account, Side.BUY, OrderType.LIMIT, TimeInForce.GTC, 100, 5)
    book = BookChanged("BTC-USDT", 4, 9, ((100, 5),), ())
    assert _of_the_order((accepted("o1", "alice"), book), command)
    assert _of_the_order((book, accepted("o2", "alice"), accepted("o1", "alice")), command)
    assert not _of_the_order((book,), command)
    assert not _of_the_order((accepted("o2", "alice"),), command)
    assert not _of_the_order((accepted("o1", "bob"),), command)
    assert _of_the_order((CancelRejected("BTC-USDT", 4, 9, "o1", "alice", "unknown_order"),),
                         CancelOrder("o1", "alice", "BTC-USDT"))


def test_a_frame_over_the_size_limit_closes_the_connection_with_1009(clients: Clients) -> None:
    client = clients("big")
    pad = "x" * (MAX_MESSAGE_BYTES - 1000)  # just under the limit (64 KiB by default): served
    assert client.request({"action": "ping", "id": 1, "pad": pad}, "pong") == {"type": "pong", "id": 1}
    send_10_mb(client)
    code = client.expect_close()
    assert code == 1009, f"closed with {code} {client.close_reason!r}"


def test_a_text_message_that_is_not_utf8_closes_the_connection_with_1007(clients: Clients) -> None:
    """RFC 6455, 8.1: an endpoint that gets a text message that is not UTF-8 fails the connection
    (it was answered as bad JSON, "surrogates not allowed")."""
    client = clients("utf8")
    client.ws.send(b'{"action":"ping","x":"\xff\xfe","id":1}', text=True)
    code = client.expect_close()
    assert code == 1007, f"closed with {code} {client.close_reason!r}"
    other = clients("after-utf8")
    assert other.request({"action": "ping", "id": 2}, "pong") == {"type": "pong", "id": 2}


def test_abusive_clients_are_answered_or_closed_and_the_others_keep_being_served(
        shared: Shared, clients: Clients) -> None:
    watcher = clients("watcher")
    watcher.subscribe("AVAX-USDT")
    seqs = [shared.maker.seq("AVAX-USDT", "buy", f"{10 + n}", "1") for n in range(5)]
    watcher.wait_seq("AVAX-USDT", seqs[-1])

    noisy = clients("noisy")
    for raw in ("{nope", "[]", b"\x00\xff", '{"action": ["subscribe"]}', '{"action": "subscribe", "channel": {}}'):
        noisy.send_raw(raw)
        assert noisy.next()["type"] == "error"
    big = clients("big")
    send_10_mb(big)
    big.expect_close()  # (its close code: test_a_frame_over_the_size_limit_closes_the_connection_with_1009)
    flood = clients("flood")
    try:
        for n in range(20 * RATE):
            flood.send({"action": "ping", "id": n})
    except (ConnectionClosed, OSError):
        pass
    code = flood.expect_close()
    assert code == 1008, f"closed with {code} {flood.close_reason!r}"
    assert flood.since(0, {"type": "error", "code": "rate_limited"}), "no rate_limited error before the close"

    seqs += [shared.maker.seq("AVAX-USDT", "sell", f"{20 + n}", "1") for n in range(5)]
    book = watcher.wait_seq("AVAX-USDT", seqs[-1])
    assert book.snapshots == 1 and book.updates == len(seqs)  # no loss, no resync
    assert not watcher.since(0, "error")
    seq, bids, asks = matcher_book(shared.topology, "AVAX-USDT", shared.context)
    assert seq == seqs[-1] and same_book(book, bids, asks)
    for client in (watcher, noisy):
        assert client.request({"action": "ping", "id": "ok"}, "pong") == {"type": "pong", "id": "ok"}


# -- what the gateway subscribes upstream ------------------------------------------------------


class FakeMatcher:
    """A matcher played by the test: binds m1's ``pub`` endpoint as an XPUB and its ``snapshot``
    endpoint as a ROUTER, in a thread of its own.

    With ``XPUB_VERBOSE`` and ``XPUB_VERBOSER`` the XPUB hands over every subscribe and unsubscribe
    message the gateway's SUB socket sends, duplicates included: exactly what the gateway
    subscribes, in order. Book requests get ``books[symbol]`` as docs/wire.md "Snapshots" says;
    subscribed symbols get an idle heartbeat every 0.25 s like a real matcher's (but the ones in
    ``muted``), and ``publish`` sends a symbol's events.
    """

    def __init__(self, pub: str, snapshot: str, books: dict[str, tuple[int, list, list]]) -> None:
        self.books = dict(books)
        self.muted: set[str] = set()  # symbols whose idle heartbeats are not sent
        self.oversized_replies = 0  # answer this many book requests with a frame over the gateway's limit
        self._rebind = threading.Event()  # restart_snapshot_service
        self.reply_delay_s = 0.0  # answer book requests this late
        self.subscriptions: queue.Queue[tuple[str, str]] = queue.Queue()
        self.requests: queue.Queue[str] = queue.Queue()
        self._outbox: queue.Queue[bytes] = queue.Queue()
        self._stop = threading.Event()
        self.context: zmq.Context = zmq.Context()
        self.xpub = self.context.socket(zmq.XPUB)
        self.router = self.context.socket(zmq.ROUTER)
        for sock in (self.xpub, self.router):
            sock.linger = 0
        self.xpub.setsockopt(zmq.XPUB_VERBOSE, 1)
        self.xpub.setsockopt(zmq.XPUB_VERBOSER, 1)
        self.xpub.bind(pub)
        self.router.bind(snapshot)
        self.thread = threading.Thread(target=self._run, name="fake-matcher", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        poller = zmq.Poller()
        poller.register(self.xpub, zmq.POLLIN)
        poller.register(self.router, zmq.POLLIN)
        held: dict[bytes, int] = {}
        late: list[tuple[float, list[bytes]]] = []  # (when, reply) of book requests answered late
        next_heartbeat = time.monotonic()
        while not self._stop.is_set():
            if self._rebind.is_set():  # its connections drop; the gateway's come back to the new socket
                poller.unregister(self.router)
                endpoint = self.router.getsockopt_string(zmq.LAST_ENDPOINT)
                self.router.close(linger=0)
                self.router = self.context.socket(zmq.ROUTER)
                self.router.linger = 0
                for _ in range(500):  # the old socket's port is let go by ZeroMQ's own thread, soon after
                    try:
                        self.router.bind(endpoint)
                        break
                    except zmq.ZMQError:
                        self._stop.wait(0.01)
                else:
                    raise RuntimeError(f"the fake matcher cannot bind {endpoint} again")
                poller.register(self.router, zmq.POLLIN)
                self._rebind.clear()
            while late and late[0][0] <= time.monotonic():
                self.router.send_multipart(late.pop(0)[1])
            for sock, _ in poller.poll(20):
                if sock is self.xpub:
                    message = self.xpub.recv()
                    if message[:1] in (b"\x00", b"\x01"):
                        topic = message[1:]
                        held[topic] = held.get(topic, 0) + (1 if message[0] else -1)
                        name = topic[:-1].decode(errors="replace") if topic.endswith(b"\x00") else repr(topic)
                        self.subscriptions.put(("+" if message[0] else "-", name))
                else:
                    frames = self.router.recv_multipart()
                    envelope, request = frames[:1], frames[1:]
                    if request[:1] == [b""]:  # a REQ socket's delimiter
                        envelope, request = envelope + [b""], request[1:]
                    symbol = request[1].decode() if len(request) == 2 else ""
                    self.requests.put(symbol)
                    if request[:1] == [b"SNAP"] and symbol in self.books and self.oversized_replies:
                        self.oversized_replies -= 1
                        self.router.send_multipart(envelope + [b"SNAP", request[1], b"\x90" * (SNAPSHOT_MAX_BYTES + 1)])
                    elif request[:1] == [b"SNAP"] and symbol in self.books:
                        reply = envelope + [b"SNAP", request[1], msgpack.packb(list(self.books[symbol]))]
                        if self.reply_delay_s:
                            late.append((time.monotonic() + self.reply_delay_s, reply))
                        else:
                            self.router.send_multipart(reply)
                    else:
                        self.router.send_multipart(envelope + [b"ERR", request[1] if len(request) > 1 else b"",
                                                               b"not mine"])
            while not self._outbox.empty():
                self.xpub.send(self._outbox.get())
            if time.monotonic() >= next_heartbeat:
                next_heartbeat += 0.25
                for topic, count in held.items():
                    if count > 0 and topic.endswith(b"\x00") and not topic.startswith(b"@") \
                            and topic[:-1].decode() not in self.muted:
                        self.xpub.send(encode_publication(topic[:-1].decode(), ()))

    def publish(self, symbol: str, *events: BookChanged | FeedHeartbeat) -> None:
        self._outbox.put(encode_publication(symbol, events))

    def restart_snapshot_service(self) -> None:
        """Close the snapshot ROUTER and bind a new one, the feed left as it is: a matcher that
        restarted behind a relay, as the gateway sees it."""
        self._rebind.set()

    def publish_raw(self, frame: bytes) -> None:
        """Any bytes as a published message (its subscribers get it if it starts with their topic)."""
        self._outbox.put(frame)

    def next_subscription(self, timeout: float = 5.0) -> tuple[str, str]:
        """The next subscribe ("+") or unsubscribe ("-") of a symbol (accounts' topics are left out)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                sign, name = self.subscriptions.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"the gateway subscribed nothing more within {timeout} s") from None
            if not name.startswith("@"):
                return sign, name

    def close(self) -> None:
        self._stop.set()
        self.thread.join(5)
        self.xpub.close(linger=0)
        self.router.close(linger=0)
        self.context.term()


@contextlib.contextmanager
def gateway_on_fake_matcher(cluster: Cluster, tmp_path: Path, books: dict[str, tuple[int, list, list]],
                            extra_gateway: str = "") -> Iterator[tuple[FakeMatcher, Clients, NodeProcess]]:
    """Gateway g1 started, its matcher m1 (the owner of ``books``' symbols) played by a
    ``FakeMatcher``; the fake, a ``Clients`` factory and the gateway's process. Everything is
    stopped at the end, even when the test fails."""
    cluster.topology = write_topology(tmp_path, matchers={"m1": list(books)}, gateways=1, extra_gateway=extra_gateway)
    topology = load_topology(cluster.topology)
    m1 = topology.nodes["m1"]
    fake = FakeMatcher(m1.pub, m1.snapshot, books)  # type: ignore[union-attr]
    try:
        opened = Clients(topology.nodes["g1"].url)  # type: ignore[union-attr]
        try:
            yield fake, opened, cluster.start("g1")
        finally:
            opened.close_all()
            cluster.stop_all()
    finally:
        fake.close()


def test_a_message_in_more_than_1024_fragments_closes_the_connection_with_1009(
        cluster: Cluster, tmp_path: Path) -> None:
    """Empty fragments add nothing to a message's size, and one in 8 of them counts toward the
    rate limit: a client sending them kept its connection growing without end (12 KiB a
    second). Past 1,024 fragments the message is too big all the same."""
    with gateway_on_fake_matcher(cluster, tmp_path, {"BTC-USDT": (0, [], [])}) as (_, opened, g1):
        cutter = opened("cutter")
        cutter.ws.socket.sendall(frame(Opcode.TEXT, b'{"action": "ping"', fin=False)
                                 + frame(Opcode.CONT, b"", fin=False) * 1100)
        assert cutter.expect_close() == 1009
        assert cutter.close_reason == "a message in more than 1024 fragments"
        other = opened("other")
        assert other.request({"action": "ping", "id": 1}, "pong") == {"type": "pong", "id": 1}


def test_the_connections_websockets_fails_are_counted_by_cause(cluster: Cluster, tmp_path: Path) -> None:
    """A frame over ``max_message_bytes`` (1009) and a frame that breaks the protocol (1002: a
    client frame without a mask) are refused by websockets itself, not by the session; the
    gateway counts them all the same (``too_big_closed``, ``protocol_error_closed``), as it
    counts its own closes, and goes on serving."""
    with gateway_on_fake_matcher(cluster, tmp_path, {"BTC-USDT": (0, [], [])}) as (_, opened, g1):
        big = opened("big")
        send_10_mb(big)
        assert big.expect_close() == 1009
        unmasked = opened("unmasked")
        unmasked.ws.socket.sendall(b"\x81\x11" + b'{"action":"ping"}')
        assert unmasked.expect_close() == 1002
        # The same frame in the read of its upgrade request, one websockets parses itself (a
        # subprotocol asked): answered 101, then failed, and counted all the same.
        gateway = load_topology(cluster.topology).nodes["g1"]
        with socket.create_connection((gateway.host, gateway.port), timeout=10) as raw:  # type: ignore[union-attr]
            raw.sendall(b"GET / HTTP/1.1\r\nHost: zmx\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
                        b"Sec-WebSocket-Protocol: chat\r\n\r\n\x81\x05hello")
            answer = b""
            while chunk := raw.recv(65536):  # until the gateway closes it
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 101 "), answer
        other = opened("other")
        assert other.request({"action": "ping", "id": 1}, "pong") == {"type": "pong", "id": 1}
        assert g1.stop() == 0
        counts = re.findall(r"stopped; counts: (.*)", g1.log_path.read_text())
    assert counts and "too_big_closed=1" in counts[0] and "protocol_error_closed=2" in counts[0], counts


def test_the_gateways_orders_name_its_dealer_as_their_reply_to(cluster: Cluster, tmp_path: Path) -> None:
    """The router is played by the test: an order from a WebSocket client arrives as ``header,
    body, reply_to`` (docs/wire.md), the reply_to being the routing id of the gateway's DEALER,
    and an answer sent to that name reaches the client."""
    with gateway_on_fake_matcher(cluster, tmp_path, {"BTC-USDT": (0, [], [])}) as (_, opened, _):
        context: zmq.Context = zmq.Context()
        router = context.socket(zmq.ROUTER)
        router.linger = 0
        try:
            router.bind(load_topology(cluster.topology).nodes["r1"].front)  # type: ignore[union-attr]
            client = opened("a")
            request = {"action": "submit_order", "symbol": "BTC-USDT", "side": "buy", "price": "30000",
                       "quantity": "0.5"}
            for n in itertools.count():  # refused "no router is connected" until its DEALER is
                client.send({**request, "order_id": f"o{n}", "id": n})
                if router.poll(1000):
                    break
                client.expect({"type": "order_update", "id": n})
                assert n < 10, "the gateway never connected to the router"
            ident, header, body, reply_to = router.recv_multipart()
            assert reply_to == ident and re.fullmatch(rb"g1\.0\.\d+\.[0-9a-f]{12}", reply_to), reply_to
            command = codec.decode(body)
            assert isinstance(command, SubmitOrder) and command.symbol == "BTC-USDT"
            n = int(command.order_id[1:])  # the try that got through
            accepted = OrderAccepted(command.symbol, 1, time.time_ns(), command.order_id, command.account,
                                     command.side, command.type, command.time_in_force, command.price,
                                     command.quantity)
            router.send_multipart([reply_to, header, b"ok", codec.encode_batch([accepted])])
            update = client.expect({"type": "order_update", "id": n})
            assert update["data"]["order_id"] == f"o{n}" and update["data"]["status"] == "accepted", update
        finally:
            router.close()
            context.term()


def test_the_gateways_subscriptions_follow_its_clients(cluster: Cluster, tmp_path: Path) -> None:
    """First client of a channel in: the gateway subscribes; last one out (unsubscribe or close):
    it unsubscribes; in between it sends nothing upstream about that channel. Shown in order:
    each step ends with a subscription change of another channel, which the one SUB socket sends
    after anything about the first."""
    with gateway_on_fake_matcher(cluster, tmp_path, {
        "BTC-USDT": (7, [[2999000, 1500]], [[3001000, 2000]]),
        "SOL-USDT": (3, [], [[15000, 1000]]),
        "XRP-USDT": (0, [], []),
    }) as (fake, opened, _):
        a, b = opened("a"), opened("b")
        a.subscribe("BTC-USDT")
        assert fake.next_subscription() == ("+", "BTC-USDT")
        book = a.books["BTC-USDT"]
        assert book.seq == 7 and same_book(book, [["29990", "1.5"]], [["30010", "2"]])

        b.subscribe("BTC-USDT")  # held already: served from the gateway's copy
        assert b.books["BTC-USDT"].seq == 7
        b.subscribe("SOL-USDT")
        assert fake.next_subscription() == ("+", "SOL-USDT")  # and nothing about BTC before it

        fake.publish("BTC-USDT", BookChanged("BTC-USDT", 8, time.time_ns(), ((2999000, 2500),), ()))
        for client in (a, b):
            assert same_book(client.wait_seq("BTC-USDT", 8), [["29990", "2.5"]], [["30010", "2"]])

        a.request({"action": "unsubscribe", "channel": "BTC-USDT"}, "unsubscription_ack")  # b still holds it
        b.request({"action": "unsubscribe", "channel": "SOL-USDT"}, "unsubscription_ack")
        assert fake.next_subscription() == ("-", "SOL-USDT")  # and nothing about BTC before it
        b.request({"action": "unsubscribe", "channel": "BTC-USDT"}, "unsubscription_ack")
        assert fake.next_subscription() == ("-", "BTC-USDT")

        # Unsubscribed upstream, the gateway's copy is stale: the next subscriber gets the book of now.
        fake.books["BTC-USDT"] = (20, [[2998000, 100]], [])
        b.subscribe("BTC-USDT")
        assert fake.next_subscription() == ("+", "BTC-USDT")
        assert b.books["BTC-USDT"].seq == 20 and same_book(b.books["BTC-USDT"], [["29980", "0.1"]], [])

        a.subscribe("XRP-USDT")
        assert fake.next_subscription() == ("+", "XRP-USDT")
        a.close()  # the last client of XRP goes away without unsubscribing
        assert fake.next_subscription() == ("-", "XRP-USDT")
        assert [s for s in list(fake.subscriptions.queue) if not s[1].startswith("@")] == []


WINDOW_LINE = re.compile(
    r"last \d+ s: (\d+) connections? \(\+(\d+) -(\d+)\), (\d+) channels?, (\d+) publications? in, (\d+) messages? "
    r"out; feed lag p50 ([\d.]+) ms, p99 ([\d.]+) ms, max ([\d.]+) ms; (\d+) fan-out turns?, p50 [\d.]+ ms, p99 [\d.]+ "
    r"ms, max [\d.]+ ms")
CHANNEL_LINE = re.compile(r"(\S+): (\d+) subscribers?, (\d+) publications? in, (\d+) messages? out, "
                          r"feed lag max ([\d.]+) ms")


def test_the_gateway_logs_what_it_carried_and_how_old_the_feed_was(cluster: Cluster, tmp_path: Path) -> None:
    """Every STATS_INTERVAL_S, on SIGUSR1, and once more as it stops, a gateway logs its
    connections, the publications it took and the messages it wrote, how old the publications
    were when it took them (from the matcher's ``ts``) and how long its fan-out turns took; then
    a line per channel. Each line covers the time since the one before. Publications stamped
    80 ms ago show a lag of at least 80 ms. (Heartbeats every second: ``wait_until`` looks at the
    log after each message.)"""
    with gateway_on_fake_matcher(cluster, tmp_path, {
        "BTC-USDT": (7, [[2999000, 1500]], [[3001000, 2000]]),
        "SOL-USDT": (3, [], [[15000, 1000]]),
    }, extra_gateway=", limits: {heartbeat_s: 1}") as (fake, opened, g1):
        a, b, c = opened("a"), opened("b"), opened("c")
        for client in (a, b):
            client.subscribe("BTC-USDT")
        c.subscribe("SOL-USDT")
        assert [fake.next_subscription(), fake.next_subscription()] == [("+", "BTC-USDT"), ("+", "SOL-USDT")]
        stamped = time.time_ns() - 80_000_000
        for seq in range(8, 13):
            fake.publish("BTC-USDT", BookChanged("BTC-USDT", seq, stamped, ((2999000, 1500 + seq),), ()))
        for client in (a, b):
            client.wait_seq("BTC-USDT", 12)
        g1.proc.send_signal(signal.SIGUSR1)
        a.wait_until(lambda: WINDOW_LINE.search(g1.log_path.read_text()), "the line SIGUSR1 asked for")
        fake.publish("BTC-USDT", BookChanged("BTC-USDT", 13, time.time_ns(), ((2999000, 1600),), ()))
        a.wait_seq("BTC-USDT", 13)
        b.wait_seq("BTC-USDT", 13)
        c.close()
        assert fake.next_subscription() == ("-", "SOL-USDT")  # the gateway saw c go
        assert g1.stop() == 0
        log = g1.log_path.read_text()
    asked, stopping = WINDOW_LINE.findall(log)  # the run is shorter than STATS_INTERVAL_S: no other line
    connections, opened_, closed, channels, publications, messages, p50, p99, most, turns = asked
    assert (connections, opened_, closed, channels, publications, messages) == ("3", "3", "0", "2", "5", "10"), log
    assert 80 <= float(p50) <= float(p99) <= float(most) and int(turns) >= 1, log
    connections, opened_, closed, channels, publications, messages, p50, p99, most, turns = stopping
    assert (connections, opened_, closed, channels, publications, messages) == ("2", "0", "1", "1", "1", "2"), log
    assert int(turns) >= 1, log  # and the turns of the channels' heartbeats, if one was due
    per_channel = [line[:4] for line in CHANNEL_LINE.findall(log)]
    assert per_channel == [("BTC-USDT", "2", "5", "10"), ("BTC-USDT", "2", "1", "2")], log  # SOL had no publication
    assert float(CHANNEL_LINE.findall(log)[0][4]) >= 80, log


def test_a_stats_window_names_the_busiest_channels_and_sums_up_the_rest(cluster: Cluster, tmp_path: Path) -> None:
    """With more busy channels than STATS_CHANNEL_LINES, the window names the busiest ones (by
    publications, most first) and sums the others up in one line."""
    symbols = [f"C{i:02}-USDT" for i in range(STATS_CHANNEL_LINES + 3)]
    with gateway_on_fake_matcher(cluster, tmp_path, {symbol: (1, [], []) for symbol in symbols},
                                 extra_gateway=", limits: {heartbeat_s: 1}") as (fake, opened, g1):
        a = opened("a")
        a.subscribe(*symbols)
        stamped = time.time_ns()
        for i, symbol in enumerate(symbols):  # C00 one publication, C01 two, ...
            for seq in range(2, i + 3):
                fake.publish(symbol, BookChanged(symbol, seq, stamped, ((10000 + seq, 1000),), ()))
        for i, symbol in enumerate(symbols):
            a.wait_seq(symbol, i + 2)
        assert g1.stop() == 0
        log = g1.log_path.read_text()
    named = [(symbol, int(publications)) for symbol, _, publications, _, _ in CHANNEL_LINE.findall(log)]
    busiest = sorted(((symbol, i + 1) for i, symbol in enumerate(symbols)), key=lambda x: -x[1])
    assert named == busiest[:STATS_CHANNEL_LINES], log
    rest = re.findall(r"(\d+) more channels: (\d+) publications in, (\d+) messages out", log)
    assert rest == [("3", "6", "6")], log  # C00, C01 and C02: 1 + 2 + 3 publications, one subscriber


def test_malformed_publications_are_dropped_counted_and_change_nothing(cluster: Cluster, tmp_path: Path) -> None:
    """Whatever comes from upstream under a channel's topic that is not a valid publication of
    that symbol (no body, an unknown wire version, cut short, another symbol's event, not a batch
    of events, an unknown event type, random bytes) is dropped and counted. The channel's book and
    ``seq`` do not move, its clients get no resync, the next valid update follows on, and the log
    names the first problem without a line for each of the others (``heartbeat_s: 1``: the
    channel's heartbeats tell the test that the second in which the rest are summed up is over)."""
    with gateway_on_fake_matcher(cluster, tmp_path, {
        "BTC-USDT": (7, [[2999000, 1500]], [[3001000, 2000]]),
        "SOL-USDT": (3, [], [[15000, 1000]]),
    }, extra_gateway=", limits: {heartbeat_s: 1}") as (fake, opened, gateway):
        a, b = opened("a"), opened("b")
        a.subscribe("BTC-USDT")
        b.subscribe("SOL-USDT")
        good = encode_publication("BTC-USDT", (BookChanged("BTC-USDT", 8, time.time_ns(), ((2999000, 2500),), ()),))
        body = good[len(b"BTC-USDT\x00"):]
        other = encode_publication("ETH-USDT", (BookChanged("ETH-USDT", 8, time.time_ns(), ((2999000, 2500),), ()),))
        rng = random.Random(7)
        bad = [
            b"BTC-USDT\x00",  # no body
            b"BTC-USDT\x00" + bytes((body[0] + 1,)) + body[1:],  # an unknown wire version
            good[:-3],  # cut short
            b"BTC-USDT\x00" + other[len(b"ETH-USDT\x00"):],  # another symbol's event under this topic
            b"BTC-USDT\x00" + body[:1] + msgpack.packb({"seq": 8}),  # not a batch of events
            b"BTC-USDT\x00" + body[:1] + msgpack.packb([[250, "BTC-USDT", 8]]),  # an unknown event type
        ] + [b"BTC-USDT\x00" + body[:1] + rng.randbytes(rng.randint(1, 200)) for _ in range(300)]  # msgpack fuzz
        for frame in bad:
            fake.publish_raw(frame)
        fake.publish("SOL-USDT", BookChanged("SOL-USDT", 4, time.time_ns(), (), ((15000, 0), (15100, 500))))
        fake.publish_raw(good)  # after every bad one, on the same stream: it arrives last

        book = a.wait_seq("BTC-USDT", 8)
        assert same_book(book, [["29990", "2.5"]], [["30010", "2"]])
        assert (book.snapshots, book.updates) == (1, 1), "the bad publications made the channel resync"
        update = a.take(lambda m: m.get("type") == "depth_update")
        assert [(m["data"]["seq"], m["data"]["prev_seq"]) for m in update] == [(8, 7)]
        assert same_book(b.wait_seq("SOL-USDT", 4), [], [["151", "0.5"]])
        assert a.request({"action": "ping", "id": 1}, "pong")["id"] == 1

        # the first problem is logged with what is wrong; the rest are counted on one line a second later
        for _ in range(5):
            if "more undecodable publication" in gateway.log():
                break
            a.expect(lambda m: m.get("type") == "heartbeat" and m.get("channel") == "BTC-USDT", timeout=5.0)
        assert gateway.stop() == 0
        log = gateway.log_path.read_text(errors="replace")
        first = re.findall(r"dropped an undecodable publication: (.+)", log)
        more = [int(n) for n in re.findall(r"dropped (\d+) more undecodable publication", log)]
        assert first and more, log[-3000:]
        assert "publication body" in first[0] or "empty" in first[0], first[0]  # the first one: no body
        assert len(first) + sum(more) == len(bad)
        assert len(first) + len(more) <= 4, "one log line for each bad publication"
        assert f"bad_publication={len(bad)}" in log


def test_a_sweep_of_thousands_of_trades_is_one_publication_and_every_trade_arrives(
        cluster: Cluster, tmp_path: Path) -> None:
    """One command can make thousands of trades (a market order through a deep book of small
    orders): 45,000 of them, about 1.5 MB in one publication, more than the 1 MiB a command or
    a reply may have, reach the channel's client one by one, then the book's update."""
    with gateway_on_fake_matcher(cluster, tmp_path, {"BTC-USDT": (7, [[2999000, 1500]], [[3001000, 90000]])}) as (
            fake, opened, _):
        a = opened("a")
        a.subscribe("BTC-USDT")
        ts = time.time_ns()
        trades = [TradeOccurred("BTC-USDT", 8, ts, 1000 + i, 3001000, 3, Side.BUY) for i in range(45_000)]
        frame = encode_publication("BTC-USDT", (*trades, BookChanged("BTC-USDT", 8, ts, (), ((3001000, 0),))))
        assert len(frame) > 1_500_000 > MAX_MESSAGE_BYTES  # the limit of a command or a reply
        fake.publish_raw(frame)
        book = a.wait_seq("BTC-USDT", 8, timeout=30.0)
        assert same_book(book, [["29990", "1.5"]], [])
        assert [t["trade_id"] for t in book.trades] == list(range(1000, 46_000))
        assert book.snapshots == 1


def test_a_publication_over_the_size_limit_costs_the_feed_a_reconnect_and_the_channel_a_resync(
        cluster: Cluster, tmp_path: Path) -> None:
    """A frame over the gateway's limit for a publication never reaches its code: the SUB socket
    refuses it by dropping the connection to that publisher, and ZeroMQ does not connect again
    after such a drop. The gateway does, 2 s later (``FEED_RECONNECT_S``), and its channels
    resync: their clients get a fresh ``depth_snapshot`` (the book of now) and then the updates
    that follow it."""
    with gateway_on_fake_matcher(cluster, tmp_path, {"BTC-USDT": (7, [[2999000, 1500]], [[3001000, 2000]])}) as (
            fake, opened, gateway):
        a = opened("a")
        a.subscribe("BTC-USDT")
        assert a.books["BTC-USDT"].seq == 7
        fake.books["BTC-USDT"] = (9, [[2999000, 500]], [[3001000, 2000]])  # the book moves on meanwhile
        fake.publish_raw(b"BTC-USDT\x00" + b"\x01" + b"\x90" * PUBLICATION_MAX_BYTES)
        snapshot = a.expect(lambda m: m.get("type") == "depth_snapshot" and m["data"]["seq"] == 9, timeout=15.0)
        assert snapshot["channel"] == "BTC-USDT"
        fake.publish("BTC-USDT", BookChanged("BTC-USDT", 10, time.time_ns(), (), ((3001000, 0),)))
        assert same_book(a.wait_seq("BTC-USDT", 10), [["29990", "0.5"]], [])
        log = gateway.log()
        assert "lost the feed from" in log and "connecting to it again" in log and "resyncing its channels" in log


def test_a_depth_snapshot_says_when_the_book_last_changed_at_the_matcher(cluster: Cluster, tmp_path: Path) -> None:
    """A ``depth_snapshot``'s ``ts`` is the time of the book's last change: the matcher's
    ``changed_ns`` (the snapshot reply's fifth element, docs/wire.md), also when a resync loads
    a book whose updates the gateway never saw; 0 for a book that never changed, and for an
    older matcher's reply without it when the gateway saw no update either."""
    minute_ago = time.time_ns() - 60 * 10**9
    with gateway_on_fake_matcher(cluster, tmp_path, {
        "BTC-USDT": (7, [[2999000, 1500]], [[3001000, 2000]], time.time_ns(), minute_ago),
        "ETH-USDT": (0, [], [], time.time_ns(), 0),
        "SOL-USDT": (3, [], [[15000, 1000]]),  # an older matcher's reply: no times
    }) as (fake, opened, _):
        a = opened("a")
        a.subscribe("BTC-USDT", "ETH-USDT", "SOL-USDT")
        first = {m["channel"]: m["data"]["ts"] for m in a.received if m["type"] == "depth_snapshot"}
        assert first == {"BTC-USDT": minute_ago, "ETH-USDT": 0, "SOL-USDT": 0}

        # seq 9 after 7: a gap; the gateway asks again and gets the book at 9, which holds the
        # update that showed the gap (the gateway skips it): the ts is the matcher's, not an old one
        at_9 = time.time_ns()
        fake.books["BTC-USDT"] = (9, [[2999000, 500]], [[3001000, 2000]], time.time_ns(), at_9)
        mark = len(a.received)
        fake.publish("BTC-USDT", BookChanged("BTC-USDT", 9, at_9, ((2999000, 500),), ()))
        assert a.wait_seq("BTC-USDT", 9).snapshots == 2
        assert [m["data"]["ts"] for m in a.since(mark, {"type": "depth_snapshot"})] == [at_9]


def test_an_update_older_than_the_snapshot_is_skipped_unless_stamped_after_it(
        cluster: Cluster, tmp_path: Path) -> None:
    """Right after a snapshot (seq 5, taken at T), updates of seq 5 or less may still come: they
    were on their way (Clone pattern), stamped before T, and are skipped. One stamped after T
    comes from a matcher that restarted without its history (docs/wire.md), behind a relay or
    with no reconnection to tell: the channel resyncs on the new matcher's book."""
    taken = time.time_ns()
    with gateway_on_fake_matcher(cluster, tmp_path, {"BTC-USDT": (5, [[2999000, 1500]], [], taken)}) as (
            fake, opened, gateway):
        a = opened("a")
        a.subscribe("BTC-USDT")
        book = a.books["BTC-USDT"]
        assert (book.seq, book.snapshots) == (5, 1)
        fake.publish("BTC-USDT", BookChanged("BTC-USDT", 4, taken - 1_000_000, ((2999000, 1500),), ()))
        fake.books["BTC-USDT"] = (2, [], [[3005000, 10]], time.time_ns() + 1_000_000)  # the new matcher's book
        fake.publish("BTC-USDT", BookChanged("BTC-USDT", 2, time.time_ns(), (), ((3005000, 10),)))
        a.expect(lambda m: m.get("type") == "depth_snapshot" and m["data"]["seq"] == 2, timeout=10.0)
        fake.publish("BTC-USDT", BookChanged("BTC-USDT", 3, time.time_ns(), ((2990000, 3),), ()))
        assert same_book(a.wait_seq("BTC-USDT", 3), [["29900", "0.003"]], [["30050", "0.01"]])
        # one snapshot for the restart, none for the update that was on its way
        assert [m["data"]["seq"] for m in a.received if m.get("type") == "depth_snapshot"] == [5, 2]
        a.wait_until(lambda: "the feed went back to seq 2 (it was at 5)" in gateway.log(), "the gateway's warning")
        assert gateway.log().count("the feed went back") == 1


def test_a_matchers_heartbeat_tells_the_gateway_what_its_feed_lost(cluster: Cluster, tmp_path: Path) -> None:
    """A matcher's heartbeat of an idle symbol carries the seq it is at. Above the channel's
    book: the last publication before the quiet spell was lost on its way (here: never sent),
    and without the heartbeat the clients would keep the old book until the market moves. Below
    what the feed brought: the matcher came back without its history. Both resync the channel."""
    with gateway_on_fake_matcher(cluster, tmp_path, {"BTC-USDT": (5, [[2999000, 1500]], [], time.time_ns())}) as (
            fake, opened, gateway):
        a = opened("a")
        a.subscribe("BTC-USDT")
        fake.publish("BTC-USDT", BookChanged("BTC-USDT", 6, time.time_ns(), ((2998000, 10),), ()))
        a.wait_seq("BTC-USDT", 6)
        fake.books["BTC-USDT"] = (7, [[2999000, 1500], [2998000, 10]], [[3001000, 4]], time.time_ns())
        fake.publish("BTC-USDT", FeedHeartbeat("BTC-USDT", 7, time.time_ns()))  # seq 7 never came
        assert same_book(a.wait_seq("BTC-USDT", 7), [["29990", "1.5"], ["29980", "0.01"]], [["30010", "0.004"]])
        fake.publish("BTC-USDT", FeedHeartbeat("BTC-USDT", 7, time.time_ns()))  # in step: nothing to do
        fake.books["BTC-USDT"] = (1, [], [[3002000, 1]], time.time_ns() + 1_000_000)
        fake.publish("BTC-USDT", FeedHeartbeat("BTC-USDT", 1, time.time_ns()))  # back to 1: a new matcher
        snapshot = a.expect(lambda m: m.get("type") == "depth_snapshot" and m["data"]["seq"] == 1, timeout=10.0)
        assert (snapshot["data"]["bids"], snapshot["data"]["asks"]) == ([], [["30020", "0.001"]])
        assert [m["data"]["seq"] for m in a.received if m.get("type") == "depth_snapshot"] == [5, 7, 1]
        a.wait_until(lambda: "the feed went back to seq 1 (it was at 7)" in gateway.log(), "the gateway's warning")
        assert "BTC-USDT: publication 7 was lost on its way here" in gateway.log()


def test_a_book_asked_for_a_channel_left_meanwhile_is_not_given_to_the_next_one(
        cluster: Cluster, tmp_path: Path) -> None:
    """The only client of BTC-USDT leaves while the gateway's book request is on its way (the
    matcher answers 3 s late); another client comes, and the feed says the book is at seq 9
    before that old answer (seq 7) arrives. The new client's first ``depth_snapshot`` is the
    book at seq 9, not the old answer: that would miss what came between, until the next
    update showed a gap."""
    with gateway_on_fake_matcher(cluster, tmp_path, {"BTC-USDT": (7, [[2999000, 1500]], [], time.time_ns())}) as (
            fake, opened, gateway):
        fake.reply_delay_s = 3.0
        a = opened("a")
        a.send({"action": "subscribe", "channel": "BTC-USDT"})
        a.expect({"type": "subscription_ack", "channel": "BTC-USDT"})
        assert fake.next_subscription() == ("+", "BTC-USDT")
        assert fake.requests.get(timeout=5.0) == "BTC-USDT"  # the book at seq 7 is on its way
        a.send({"action": "unsubscribe", "channel": "BTC-USDT"})
        a.expect({"type": "unsubscription_ack", "channel": "BTC-USDT"})
        assert fake.next_subscription() == ("-", "BTC-USDT")
        fake.books["BTC-USDT"] = (9, [[2999000, 1500], [2998000, 10]], [[3001000, 4]], time.time_ns())
        b = opened("b")
        b.send({"action": "subscribe", "channel": "BTC-USDT"})
        b.expect({"type": "subscription_ack", "channel": "BTC-USDT"})
        assert fake.next_subscription() == ("+", "BTC-USDT")
        fake.publish("BTC-USDT", FeedHeartbeat("BTC-USDT", 9, time.time_ns()))  # two updates went by meanwhile
        b.wait_until(lambda: "BTC-USDT: a book at seq 7 came after the feed here showed seq 9" in gateway.log(),
                     "the gateway's word that the old answer came")
        snapshot = b.expect({"type": "depth_snapshot", "channel": "BTC-USDT"}, timeout=10.0)
        assert snapshot["data"]["seq"] == 9
        assert same_book(b.books["BTC-USDT"], [["29990", "1.5"], ["29980", "0.01"]], [["30010", "0.004"]])
        assert " way here" not in gateway.log()  # (no publication lost: "... lost on its way here")


def test_a_matcher_that_answers_an_old_book_every_time_is_not_asked_in_a_loop(
        cluster: Cluster, tmp_path: Path) -> None:
    """The feed says seq 9 and the matcher's book says 7 (a bug of its own, or a peer that is
    no matcher): the gateway waits for the next answer, then asks again after
    ``SNAPSHOT_RETRY_S`` (2 s), not at once (a loop of thousands of requests a second)."""
    with gateway_on_fake_matcher(cluster, tmp_path, {"BTC-USDT": (7, [[2999000, 1500]], [], time.time_ns())}) as (
            fake, opened, gateway):
        fake.muted.add("BTC-USDT")  # the first message of the feed is the heartbeat at seq 9
        a = opened("a")
        a.send({"action": "subscribe", "channel": "BTC-USDT"})
        a.expect({"type": "subscription_ack", "channel": "BTC-USDT"})
        assert fake.next_subscription() == ("+", "BTC-USDT")
        fake.publish("BTC-USDT", FeedHeartbeat("BTC-USDT", 9, time.time_ns()))
        assert fake.requests.get(timeout=5.0) == "BTC-USDT"
        a.wait_until(lambda: "BTC-USDT: a book at seq 7 came after the feed here showed seq 9" in gateway.log(),
                     "the gateway's word that the old book came")
        deadline, again = time.monotonic() + 1.0, 0
        while deadline > time.monotonic():
            try:
                fake.requests.get(timeout=deadline - time.monotonic())
            except queue.Empty:
                break
            again += 1
        assert again <= 1, f"asked {again} more times within a second"  # (the tick's retry may fall within)
        fake.books["BTC-USDT"] = (9, [[2999000, 1500], [2998000, 10]], [], time.time_ns())
        snapshot = a.expect({"type": "depth_snapshot", "channel": "BTC-USDT"}, timeout=10.0)
        assert snapshot["data"]["seq"] == 9


@pytest.mark.parametrize(("book", "problem"), [
    ([0, [[float("inf"), 1]], []], "a level of the bids is not two integers from 1 to 2^63 - 1: (inf, 1)"),
    ([1, [[-5, 1]], []], "a level of the bids is not two integers"),
    ([1, [], [[100.5, 2]]], "a level of the asks is not two integers"),
    ([1, [[True, True]], []], "a level of the bids is not two integers"),
    ([1, [[100, 0]], []], "a level of the bids is not two integers"),
    ([1, [[2**63, 1]], []], "a level of the bids is not two integers"),
    ([1, [["100", "2"]], []], "a level of the bids is not two integers"),
    ([1, [[100, 1, 3]], []], "a level of the bids is not [price, quantity]"),
    ([1, [[100, 1], [300, 1]], []], "the bids are not in order, best first"),
    ([1, [], [[100, 1], [100, 2]]], "the asks are not in order, best first"),
    ([1, [[100, 1]], [[100, 1]]], "the book is crossed"),
    ([-7, [], []], "seq is not an integer from 0 to 2^63 - 1: -7"),
    ([2**64 - 1, [], []], "seq is not an integer from 0 to 2^63 - 1"),
    ([1, [], [], 0], "only the time the snapshot was taken (a positive integer)"),
    ([1, []], "a book is [seq, bids, asks, taken_ns, changed_ns]"),
    (5, "a book is [seq, bids, asks, taken_ns, changed_ns]"),
])
def test_a_snapshot_that_is_no_book_is_refused_saying_why(book: object, problem: str) -> None:
    with pytest.raises(ValueError) as refused:
        read_snapshot(msgpack.packb(book))
    assert problem in str(refused.value), refused.value


def test_a_snapshot_is_read_with_its_times() -> None:
    assert read_snapshot(msgpack.packb([3, [[10, 1], [9, 2]], [[11, 1]], 5, 0])) == (
        3, ([(10, 1), (9, 2)], [(11, 1)]), (5, 0))
    assert read_snapshot(msgpack.packb([0, [], []])) == (0, ([], []), ())
    with pytest.raises(ValueError, match="not one msgpack value: FormatError"):
        read_snapshot(b"\xc1\xc1")


def test_a_matcher_back_behind_a_feed_that_never_broke_is_synced_again(cluster: Cluster, tmp_path: Path) -> None:
    """The matcher restarted without its history and came back at the seq it was at, with
    another book; the feed (through a relay, say) never broke, so nothing in it shows the
    change. The gateway's own connection to the matcher's snapshot service broke and came
    back: its clients get a fresh ``depth_snapshot`` of the book the matcher has now."""
    with gateway_on_fake_matcher(cluster, tmp_path, {"BTC-USDT": (7, [[2999000, 1500]], [], time.time_ns())}) as (
            fake, opened, gateway):
        a = opened("a")
        a.subscribe("BTC-USDT")
        assert same_book(a.books["BTC-USDT"], [["29990", "1.5"]], [])
        fake.books["BTC-USDT"] = (7, [[2998000, 10]], [[3001000, 4]], time.time_ns())
        fake.restart_snapshot_service()
        snapshot = a.expect({"type": "depth_snapshot", "channel": "BTC-USDT"}, timeout=10.0)
        assert snapshot["data"]["seq"] == 7
        assert same_book(a.books["BTC-USDT"], [["29980", "0.01"]], [["30010", "0.004"]])
        assert "connected to m1's snapshot service again; resyncing its channels" in gateway.log()


def test_a_channel_whose_feed_goes_silent_gets_no_more_heartbeats(cluster: Cluster, tmp_path: Path) -> None:
    """``heartbeat_s: 1``. The matcher stops its idle heartbeats of BTC-USDT (its feed goes
    silent) and goes on with SOL-USDT's: the client's SOL-USDT heartbeats go on, its BTC-USDT
    heartbeats stop within ``FEED_SILENT_S`` and a tick, so it can tell a dead feed from a quiet
    market. They come back once the feed speaks again."""
    with gateway_on_fake_matcher(cluster, tmp_path, {
        "BTC-USDT": (7, [[2999000, 1500]], [[3001000, 2000]]),
        "SOL-USDT": (3, [], [[15000, 1000]]),
    }, extra_gateway=", limits: {heartbeat_s: 1}") as (fake, opened, _):
        a = opened("a")
        a.subscribe("BTC-USDT", "SOL-USDT")

        def heartbeat(channel: str) -> Callable[[dict], bool]:
            return lambda m: m.get("type") == "heartbeat" and m.get("channel") == channel

        a.expect(heartbeat("BTC-USDT"))  # its feed speaks: it beats
        fake.muted.add("BTC-USDT")
        muted_at = len(a.received)
        a.expect_all(heartbeat("SOL-USDT"), 7, timeout=20.0)  # 7 s or more, over twice FEED_SILENT_S
        after = a.received[muted_at:]
        btc = [i for i, m in enumerate(after) if heartbeat("BTC-USDT")(m)]
        sol = [i for i, m in enumerate(after) if heartbeat("SOL-USDT")(m)]
        assert len(btc) <= 4 and (not btc or btc[-1] < sol[4]), (btc, sol)  # none after about 4.4 s
        fake.muted.discard("BTC-USDT")
        a.expect(heartbeat("BTC-USDT"), timeout=5.0)


def test_a_connection_that_does_not_finish_its_handshake_is_cut(cluster: Cluster, tmp_path: Path) -> None:
    """``handshake_timeout_s: 1``. One client connects and sends nothing, another sends half
    a request and stops: each is cut about a second after it connected (each held a socket of
    the gateway's), while a client that finished its handshake at the same time is served
    before and after."""
    with gateway_on_fake_matcher(cluster, tmp_path, {"BTC-USDT": (7, [[2999000, 1500]], [[3001000, 2000]])},
                                 extra_gateway=", limits: {handshake_timeout_s: 1}") as (fake, opened, gateway):
        host, port = opened.url.removeprefix("ws://").rsplit(":", 1)
        with contextlib.ExitStack() as stack:
            connected = time.monotonic()  # no later than the gateway's clock for either starts
            silent = stack.enter_context(socket.create_connection((host, int(port)), timeout=10))
            half = stack.enter_context(socket.create_connection((host, int(port)), timeout=10))
            half.sendall(b"GET / HTTP/1.1\r\nHost: zmx\r\nUpgrade: websocket\r\n")
            a = opened("a")
            a.subscribe("BTC-USDT")
            for sock in (silent, half):
                try:
                    assert sock.recv(65536) == b""  # nothing was ever answered: the gateway closes
                except ConnectionResetError:
                    pass  # cut with a reset: as good
                assert 1.0 <= time.monotonic() - connected < 6.0
        fake.publish("BTC-USDT", BookChanged("BTC-USDT", 8, time.time_ns(), ((2999000, 0),), ()))
        assert same_book(a.wait_seq("BTC-USDT", 8), [], [["30010", "2"]])
        assert a.request({"action": "ping", "id": 1}, lambda m: m.get("type") == "pong")["id"] == 1
        assert gateway.stop() == 0
        assert "handshake_timeout_closed=2" in gateway.log()


def test_a_snapshot_reply_over_the_size_limit_is_asked_again_on_a_new_connection(
        cluster: Cluster, tmp_path: Path) -> None:
    """The matcher answers the first book request with a frame over the gateway's 64 MiB limit
    for a snapshot: ZeroMQ drops that connection and never makes it again. The unanswered request
    is asked again 2 s later (``SNAPSHOT_RETRY_S``) on a new connection, and the client gets its
    ``depth_snapshot`` and then updates."""
    with gateway_on_fake_matcher(cluster, tmp_path, {"BTC-USDT": (7, [[2999000, 1500]], [[3001000, 2000]])}) as (
            fake, opened, gateway):
        fake.oversized_replies = 1
        a = opened("a")
        a.subscribe("BTC-USDT", timeout=15.0)
        assert same_book(a.books["BTC-USDT"], [["29990", "1.5"]], [["30010", "2"]])
        fake.publish("BTC-USDT", BookChanged("BTC-USDT", 8, time.time_ns(), ((2999000, 0),), ()))
        assert same_book(a.wait_seq("BTC-USDT", 8), [], [["30010", "2"]])
        assert "asking on a new connection" in gateway.log()
        assert re.search(r"m1 answered a snapshot request again, after [\d.]+ s and 1 new connection", gateway.log())
        assert fake.oversized_replies == 0


def test_a_channel_whose_matcher_is_down_is_told_and_logged_once_and_served_when_it_comes(
        cluster: Cluster, tmp_path: Path) -> None:
    """A client subscribes a channel whose matcher (m2) is not running. After 3 s it is told
    (``unavailable`` with the channel), and so is a client that subscribes then. The gateway's
    log says once that the feed is silent and once that its book request goes unanswered, not
    every ``SNAPSHOT_RETRY_S`` for as long as the matcher stays down (the gateway's heartbeats
    on BTC-USDT, once a second, time the wait: five of them span two more retries). When m2
    comes, the log says it answered, and both clients get the book."""
    cluster.topology = write_topology(tmp_path, matchers={"m1": ["BTC-USDT"], "m2": ["ETH-USDT"]}, gateways=1,
                                      extra_gateway=", limits: {heartbeat_s: 1}")
    topology = load_topology(cluster.topology)
    m1, m2 = topology.nodes["m1"], topology.nodes["m2"]
    fake = FakeMatcher(m1.pub, m1.snapshot, {"BTC-USDT": (3, [], [[15000, 1000]])})  # type: ignore[union-attr]
    fake.muted.add("ETH-USDT")  # it would beat every topic subscribed to it, m2's too
    late = None
    try:
        opened = Clients(topology.nodes["g1"].url)  # type: ignore[union-attr]
        try:
            gateway = cluster.start("g1")
            a = opened("a")
            a.subscribe("BTC-USDT")
            a.send({"action": "subscribe", "channel": "ETH-USDT"})
            a.expect({"type": "subscription_ack", "channel": "ETH-USDT"})
            told = a.expect({"type": "error", "code": "unavailable", "channel": "ETH-USDT"}, timeout=10.0)
            assert "no message from the feed of ETH-USDT for 3 s" in told["message"], told
            a.wait_until(lambda: "no message from the feed of ETH-USDT for 3 s (matcher m2)" in gateway.log(),
                         "the gateway's word that ETH-USDT's feed is silent", timeout=10.0)
            b = opened("b")  # joins the silent channel: told at once, after its ack
            b.send({"action": "subscribe", "channel": "ETH-USDT"})
            b.expect({"type": "subscription_ack", "channel": "ETH-USDT"})
            assert b.next()["code"] == "unavailable"
            a.wait_until(lambda: "snapshot request to m2 unanswered" in gateway.log(), "the first retry")
            mark = len(a.received)
            a.wait_until(lambda: len(a.since(mark, {"type": "heartbeat", "channel": "BTC-USDT"})) >= 5,
                         "five more heartbeats of BTC-USDT", timeout=10.0)
            assert gateway.log().count("snapshot request to m2 unanswered") == 1, gateway.log()
            assert gateway.log().count("no message from the feed") == 1, gateway.log()
            late = FakeMatcher(m2.pub, m2.snapshot,  # type: ignore[union-attr]
                               {"ETH-USDT": (5, [[2999000, 1500]], [])})
            message = a.expect({"type": "depth_snapshot", "channel": "ETH-USDT"}, timeout=10.0)
            assert message["data"]["seq"] == 5
            assert b.expect({"type": "depth_snapshot", "channel": "ETH-USDT"})["data"]["seq"] == 5
            assert len(a.since(0, {"type": "error", "channel": "ETH-USDT"})) == 1  # told once
            answered = re.findall(r"m2 answered a snapshot request again, after [\d.]+ s and (\d+) new connection",
                                  gateway.log())
            assert len(answered) == 1 and int(answered[0]) >= 2, gateway.log()  # the retries went on, unsaid
        finally:
            opened.close_all()
            cluster.stop_all()
    finally:
        fake.close()
        if late is not None:
            late.close()


def test_a_matcher_slower_than_the_retry_to_answer_a_book_request_is_still_heard(
        cluster: Cluster, tmp_path: Path) -> None:
    """Every book request is answered 3 s late, after the gateway has asked again on a new
    connection (``SNAPSHOT_RETRY_S``, 2 s): the answer on the old one still counts, and the
    client gets its ``depth_snapshot``."""
    with gateway_on_fake_matcher(cluster, tmp_path, {"BTC-USDT": (7, [[2999000, 1500]], [[3001000, 2000]])}) as (
            fake, opened, gateway):
        fake.reply_delay_s = 3.0
        a = opened("a")
        a.subscribe("BTC-USDT", timeout=15.0)
        assert same_book(a.books["BTC-USDT"], [["29990", "1.5"]], [["30010", "2"]])
        assert "asking on a new connection" in gateway.log()


# -- answers about fills a lost feed missed (docs/wire.md, "Fills a gateway missed") ------------------------


@contextlib.contextmanager
def gateway_with_a_resting_order(tmp_path: Path) -> Iterator[tuple[Gateway, Connection, Session, MatchingEngine]]:
    """Gateway g1 of a topology whose matcher m1 owns BTC-USDT, with no node running (its
    methods are called as its readers would), and a connection of account g1.alice (its
    session) whose sell a1 (0.3 at 30000) rests on ``engine``, accepted."""
    topology = load_topology(write_topology(tmp_path, matchers={"m1": ["BTC-USDT"]}, gateways=1))
    gateway = Gateway(topology, topology.node("g1"), 0)  # type: ignore[arg-type]
    try:
        conn = Connection(gateway)
        conn.transport = Transport()  # type: ignore[assignment]
        alice = conn.session = Session("g1.alice", topology.symbols)
        gateway.accounts["g1.alice"] = conn
        engine = MatchingEngine(topology.symbols["BTC-USDT"])
        submit = next(a for a in alice.receive(json.dumps({
            "action": "submit_order", "order_id": "a1", "symbol": "BTC-USDT", "side": "sell", "price": "30000",
            "quantity": "0.3"}), 0.0) if type(a) is Submit)
        alice.on_reply(submit.command, None, "ok", engine.handle(submit.command, ts_ns=1))
        yield gateway, conn, alice, engine
    finally:
        gateway.context.destroy(linger=0)


def test_a_closing_connection_is_not_pinged(tmp_path: Path) -> None:
    """A connection half-closed by the gateway (its close frame sent, its side of TCP ended)
    takes no more writes: its ping, due in the grace before it is cut, is not sent (uvloop
    raised on the write, and the housekeeping logged an internal error for each)."""
    with gateway_with_a_resting_order(tmp_path) as (_, conn, _alice, _engine):
        conn.transport.written.clear()  # type: ignore[union-attr]
        conn.closing = True
        conn.ping(time.monotonic())
        assert not conn.transport.written and not conn.ping_sent  # type: ignore[union-attr]


def test_a_late_answer_to_an_earlier_fills_request_is_not_taken_for_the_one_on_its_way(tmp_path: Path) -> None:
    """A fills request sent again on a new connection can be answered twice, and the second
    answer can come once the gateway asks again from lower trade ids. The answer says which
    trade ids it answers: one to other trade ids is dropped, and the request waits for its own,
    whose fill goes out. (No node runs: the gateway's methods are called as its readers would.)"""
    with gateway_with_a_resting_order(tmp_path) as (gateway, conn, alice, engine):
        fill = [e for e in engine.handle(SubmitOrder("b1", "bob", "BTC-USDT", Side.BUY, OrderType.LIMIT,
                                                     TimeInForce.GTC, 3_000_000, 100), ts_ns=2)
                if getattr(e, "account", None) == "g1.alice"]
        alice.fills_lost(["BTC-USDT"])  # the feed was cut; it lost the fill
        after = alice.begin_fill_replay(["BTC-USDT"])
        assert after == {"BTC-USDT": 0}
        request = gateway.fills_requests[("m1", "g1.alice")] = FillsRequest(conn, after, 0.0, time.time_ns())
        request.sent = time.monotonic()

        def answer(asked: dict[str, int], fills: list) -> bytes:
            return msgpack.packb(["m1", 0, codec.encode_account_publication("g1.alice", fills),
                                  {"BTC-USDT": engine.seq}, asked])

        gateway._fills_reply(b"g1.alice", answer({"BTC-USDT": 1}, []))  # to an earlier request, after trade 1
        assert gateway.fills_requests[("m1", "g1.alice")] is request and not conn.transport.written
        gateway._fills_reply(b"g1.alice", answer({"BTC-USDT": 0}, fill))
        assert ("m1", "g1.alice") not in gateway.fills_requests
        written = bytes(conn.transport.written)  # one unmasked text frame
        update = json.loads(written[written.index(b"{"):])
        assert (update["data"]["order_id"], update["data"]["status"], update["data"]["filled"]) == (
            "a1", "partially_filled", "0.1")


def feed_gateway(gateway: Gateway, topics: list[str], frames: list[bytes],
                 until: Callable[[], bool] | None = None, endpoint: str = "inproc://feed") -> None:
    """Subscribe ``gateway``'s SUB to ``topics``, publish ``frames`` to it, and let it read them
    as its reader would (no event loop runs) until ``until()`` (None: once; over inproc every
    frame is there as soon as it is sent). A test that feeds more than once gives each feed an
    ``endpoint`` of its own (an inproc name is free again only some time after its close)."""
    pub = gateway.context.socket(zmq.XPUB)
    try:
        pub.bind(endpoint)
        gateway.sub.connect(endpoint)
        for name in topics:
            gateway.sub.subscribe(name.encode() + b"\0")
            assert pub.poll(5000) and pub.recv()[0] == 1  # the subscription is in
        for frame in frames:
            pub.send(frame)
        if until is None:
            assert gateway.sub.poll(5000)
            gateway._read_sub()
            return
        for _ in frames:
            if not gateway.sub.poll(5000):
                break  # all read
            gateway._read_sub()
            if until():
                return
        raise AssertionError("the gateway read every frame, and what was awaited did not happen")
    finally:
        gateway.sub.disconnect(endpoint)
        pub.close(linger=0)


@contextlib.contextmanager
def gateway_with_two_resting_orders(tmp_path: Path) -> Iterator[tuple[Gateway, Connection, Session, MatchingEngine]]:
    """``gateway_with_a_resting_order``, and alice's sell a2 (1 at 30001) resting too; the
    gateway runs no event loop (its readers are called by the test)."""
    with gateway_with_a_resting_order(tmp_path) as (gateway, conn, alice, engine):
        gateway._rearm = lambda sock, read: None  # type: ignore[method-assign]
        a2 = next(a for a in alice.receive(json.dumps({
            "action": "submit_order", "order_id": "a2", "symbol": "BTC-USDT", "side": "sell", "price": "30001",
            "quantity": "1"}), 0.0) if type(a) is Submit)
        alice.on_reply(a2.command, None, "ok", engine.handle(a2.command, ts_ns=2))
        yield gateway, conn, alice, engine


@pytest.mark.parametrize("case, counted", [("at-once", "rejoin_jumps"), ("late", "gaps"), ("answered", "gaps")])
def test_the_feed_jump_of_a_channel_subscribed_again_at_once_is_no_loss(tmp_path: Path, case: str,
                                                                         counted: str) -> None:
    """The channel's only subscriber leaves and comes back: what was published while the topic
    was not subscribed never came, so the feed jumps. Just after, before the subscription's
    answer, that is no loss (counted ``rejoin_jumps``, no fills asked; a review saw 31 "lost"
    publications warned of, and every account's fills asked again). A jump REJOIN_S after, or
    after the matcher's heartbeat answered the subscription, is a loss as ever: a gap, and
    alice's fills asked. (No node runs.)"""
    with gateway_with_two_resting_orders(tmp_path) as (gateway, conn, _alice, engine):

        def publication(ts: int) -> bytes:
            events = engine.handle(SubmitOrder(f"b{ts}", "bob", "BTC-USDT", Side.BUY, OrderType.LIMIT,
                                               TimeInForce.GTC, 2_900_000 + ts, 1), ts_ns=ts)
            return codec.encode_publication("BTC-USDT", [e for e in events if type(e) in PUBLIC_EVENT_TYPES])

        frames = [publication(ts) for ts in range(10, 15)]  # seq 3 to 7
        gateway.subscribe(conn, "BTC-USDT")
        feed_gateway(gateway, ["BTC-USDT"], frames[:2], until=lambda: gateway.channels["BTC-USDT"].feed_seq == 4,
                     endpoint="inproc://feed-1")
        gateway.unsubscribe(conn, "BTC-USDT")
        if case == "late":
            gateway._left["BTC-USDT"] -= REJOIN_S + 1
        gateway.subscribe(conn, "BTC-USDT")
        if case == "answered":  # nothing was published meanwhile: the answer is at 4, and 5 is lost on the way
            answer = codec.encode_publication("BTC-USDT", [FeedHeartbeat("BTC-USDT", 4, 20)])
            feed_gateway(gateway, ["BTC-USDT"], [answer], endpoint="inproc://feed-2")
            feed_gateway(gateway, ["BTC-USDT"], frames[3:4], endpoint="inproc://feed-3")  # seq 6
            assert gateway.channels["BTC-USDT"].feed_seq == 6
        else:
            feed_gateway(gateway, ["BTC-USDT"], frames[2:3], endpoint="inproc://feed-2")  # seq 5: it had read 4
            feed_gateway(gateway, ["BTC-USDT"], frames[4:], endpoint="inproc://feed-3")  # seq 7: 6 never came
            assert gateway.channels["BTC-USDT"].feed_seq == 7
        assert {key: gateway.counts[key] for key in ("gaps", "rejoin_jumps")} == {
            "gaps": 0, "rejoin_jumps": 0, counted: 1}
        assert (("m1", "g1.alice") in gateway.fills_requests) == (counted == "gaps")
        gateway.unsubscribe(conn, "BTC-USDT")


@pytest.mark.parametrize("missed", ["on-the-way", "before-the-first-seen"])
def test_a_lost_frame_of_an_account_is_seen_in_the_count_of_its_next_one(tmp_path: Path, missed: str) -> None:
    """The matcher counts each account's frames. Some of alice's never come: a1's last fill
    (its command's public frame came: no gap in any channel, and nothing else of a1 will tell),
    lost on the way; or her first two frames, published before her account's subscription
    reached the matcher. The next one, a2's fill, shows it in its number: the gateway asks for
    alice's fills from what it had passed on before, holds a2's fill, and a1's come first. (No
    node runs.)"""
    with gateway_with_two_resting_orders(tmp_path) as (gateway, conn, alice, engine):

        def alices(price: int, lots: int, ts_ns: int) -> list:
            return [e for e in engine.handle(SubmitOrder(f"b{ts_ns}", "bob", "BTC-USDT", Side.BUY, OrderType.LIMIT,
                                                         TimeInForce.GTC, price, lots), ts_ns=ts_ns)
                    if getattr(e, "account", None) == "g1.alice"]

        first, lost, past = alices(3_000_000, 100, 3), alices(3_000_000, 200, 4), alices(3_000_100, 400, 5)
        shown = [(first, 1), (past, 3)] if missed == "on-the-way" else [(past, 3)]
        conn.transport.written.clear()
        feed_gateway(gateway, ["@g1.alice"], [codec.encode_account_publication("g1.alice", events, (4, 1, n))
                                              for events, n in shown],
                     until=lambda: gateway.counts["account_frames_lost"] > 0)
        passed = [("a1", 1, "0.1")] if missed == "on-the-way" else []
        assert fill_updates(conn) == passed  # a2's waits
        assert gateway.counts["account_frames_lost"] == 3 - len(shown)
        request = gateway.fills_requests[("m1", "g1.alice")]
        assert request.after == {"BTC-USDT": len(passed)}
        request.sent = time.monotonic()
        gateway._fills_reply(b"g1.alice", msgpack.packb([
            "m1", 0, codec.encode_account_publication("g1.alice", first + lost + past), {"BTC-USDT": engine.seq},
            request.after]))
        assert passed + fill_updates(conn) == [("a1", 1, "0.1"), ("a1", 2, "0.3"), ("a2", 3, "0.4")]


def test_an_answer_that_leaves_fills_wanted_is_asked_again_after_a_wait_not_at_once(tmp_path: Path) -> None:
    """A fills answer whole only up to a seq below a fill the gateway holds (from a matcher that
    lost its history, or a peer that is no matcher) leaves the fill wanted. The next request goes
    FILLS_WAIT_S (0.5 s) later: sent at once, it was answered the same way, thousands of times a
    second. (No node runs.)"""
    with gateway_with_two_resting_orders(tmp_path) as (gateway, conn, alice, engine):

        def alices(price: int, lots: int, ts_ns: int) -> list:
            return [e for e in engine.handle(SubmitOrder(f"b{ts_ns}", "bob", "BTC-USDT", Side.BUY, OrderType.LIMIT,
                                                         TimeInForce.GTC, price, lots), ts_ns=ts_ns)
                    if getattr(e, "account", None) == "g1.alice"]

        # a1's three fills of 0.1 (seqs 3, 4, 5); the second is lost, the third shows it missing
        first, _, past = (alices(3_000_000, 100, ts) for ts in (3, 4, 5))
        feed_gateway(gateway, ["@g1.alice"], [codec.encode_account_publication("g1.alice", events, (4, 1, n))
                                              for events, n in ((first, 1), (past, 3))],
                     until=lambda: gateway.counts["account_frames_lost"] > 0)
        request = gateway.fills_requests[("m1", "g1.alice")]
        request.sent = time.monotonic()
        gateway._fills_reply(b"g1.alice", msgpack.packb([
            "m1", 0, codec.encode_account_publication("g1.alice", []), {"BTC-USDT": 1}, request.after]))
        again = gateway.fills_requests[("m1", "g1.alice")]  # a1's third fill is still held: asked again ...
        assert again is not request and not again.sent  # ... but not yet
        assert again.due >= time.monotonic() + 0.3
        assert gateway.counts["fills_asked_again"] == 1


@pytest.mark.parametrize("counts, lost", [
    ([(4, 1, 1), (4, 1, 2)], 0),
    ([(4, 1, 2)], 1),  # the first one seen is not number 1
    ([(4, 1, 1), (4, 1, 3)], 1),
    ([(4, 1, 1), (5, 1, 1)], 0),  # a new epoch (the matcher restarted)
    ([(4, 1, 1), (4, 2, 1)], 0),  # a new count (the matcher let the old one go)
    ([(4, 1, 1), (4, 2, 2)], 1),  # ... whose first frame was lost
    ([(4, 1, 5), (4, 1, 3), (4, 1, 6)], 4),  # one came late (a relay left for its standby): not a new count
], ids=["in-order", "first-not-1", "skipped", "new-epoch", "new-count", "new-count-skipped", "late"])
def test_which_counts_of_an_accounts_frames_show_frames_lost(tmp_path: Path, counts: list, lost: int) -> None:
    """The gateway's decision on each count of a connection's frames: the frames it counts as
    lost, and whether it asks the matcher for the connection's fills. (No node runs.)"""
    with gateway_with_two_resting_orders(tmp_path) as (gateway, conn, alice, engine):
        refused = engine.handle(CancelOrder("x", "g1.alice", "BTC-USDT"), ts_ns=3)  # a private event of alice's
        feed_gateway(gateway, ["@g1.alice"], [codec.encode_account_publication("g1.alice", refused, count)
                                              for count in counts])
        assert gateway.counts["account_frames_lost"] == lost
        assert (("m1", "g1.alice") in gateway.fills_requests) == (lost > 0)


def fill_updates(conn: Connection) -> list[tuple[str, int, str]]:
    """(order_id, trade_id, filled) of the order_updates written to ``conn`` (the gateway's own
    unmasked text frames) since the last call."""
    data = bytes(conn.transport.written)  # type: ignore[union-attr]
    conn.transport.written.clear()  # type: ignore[union-attr]
    out, at = [], 0
    while at < len(data):
        size, at = data[at + 1] & 0x7F, at + 2
        if size == 126:
            size, at = int.from_bytes(data[at:at + 2], "big"), at + 2
        elif size == 127:
            size, at = int.from_bytes(data[at:at + 8], "big"), at + 8
        update = json.loads(data[at:at + size])
        at += size
        out.append((update["data"]["order_id"], update["data"]["trade_id"], update["data"]["filled"]))
    return out


def test_a_publication_lost_after_a_quiet_symbols_heartbeat_at_seq_0_is_a_gap(tmp_path: Path) -> None:
    """A symbol that never moved: its heartbeat says seq 0, then publication 1 is lost and 2
    comes, while the channel waits for its snapshot. The gateway counts the gap and asks for
    its connections' fills from before it. (No node runs.)"""
    with gateway_with_a_resting_order(tmp_path) as (gateway, _, _, _):
        gateway._rearm = lambda sock, read: None  # type: ignore[method-assign]  # (no event loop)
        state = gateway.channels["BTC-USDT"] = ChannelState(Channel(gateway.symbols["BTC-USDT"]))
        state.subscribed_at = 0.0
        feed_gateway(gateway, ["BTC-USDT"], [
            encode_publication("BTC-USDT", [FeedHeartbeat("BTC-USDT", 0, 7)]),
            encode_publication("BTC-USDT", [BookChanged("BTC-USDT", 2, 8, ((3_000_000, 100),), ())])],
            until=lambda: gateway.counts["gaps"] > 0)
        assert gateway.fills_requests[("m1", "g1.alice")].after == {"BTC-USDT": 0}


@pytest.mark.parametrize("shown_by", ["update", "update-resyncing", "update-snapshot-ahead", "heartbeat"])
def test_a_gap_in_a_channels_feed_asks_for_fills_from_below_one_that_came_past_the_gap(
        tmp_path: Path, shown_by: str) -> None:
    """A high-water mark dropped the public part of two commands and a1's fill that completes
    it, but a2's fill of the second command got through and went out. The next update shows
    the loss: while the channel is synced, while it waits for a snapshot after an earlier gap,
    or synced from a snapshot taken ahead of the feed (the update is older than the book here,
    and the lost ones too); or the matcher's heartbeat does. The gateway asks for a1's fills
    from below the lost one, not from a2's, and a1's fill comes. (No node runs: the gateway
    reads its SUB, fed by a PUB in the test, as its reader would.)"""
    with gateway_with_two_resting_orders(tmp_path) as (gateway, conn, alice, engine):
        bob = (SubmitOrder(f"b{n}", "bob", "BTC-USDT", Side.BUY, OrderType.LIMIT, TimeInForce.GTC, price, lots)
               for n, (price, lots) in enumerate([(3_000_000, 100), (3_000_000, 200), (3_000_100, 400),
                                                  (2_900_000, 100)]))

        def alices(events: list) -> list:
            return [e for e in events if getattr(e, "account", None) == "g1.alice"]

        assert len(alice.on_private(alices(engine.handle(next(bob), ts_ns=3)))) == 1
        state = gateway.channels["BTC-USDT"] = ChannelState(Channel(gateway.symbols["BTC-USDT"]))
        state.subscribed_at, state.feed_seq = 0.0, engine.seq  # the feed's last publication here
        if shown_by in ("update", "heartbeat"):
            state.channel.load_snapshot(engine.seq, [], [])
        lost = alices(engine.handle(next(bob), ts_ns=4))
        past = alices(engine.handle(next(bob), ts_ns=5))
        shows = [e for e in engine.handle(next(bob), ts_ns=6) if type(e) is BookChanged]
        if shown_by == "update-snapshot-ahead":
            state.channel.load_snapshot(engine.seq, [], [])
        conn.transport.written.clear()
        feed_gateway(gateway, ["BTC-USDT", "@g1.alice"], [
            codec.encode_account_publication("g1.alice", past),
            encode_publication("BTC-USDT", [FeedHeartbeat("BTC-USDT", engine.seq, 7)] if shown_by == "heartbeat"
                               else shows)], until=lambda: gateway.counts["gaps"] > 0)
        written = bytes(conn.transport.written)
        update = json.loads(written[written.index(b"{"):])
        assert (update["data"]["order_id"], update["data"]["filled"]) == ("a2", "0.4")  # a2's went out
        assert gateway.counts["gaps"] == 1
        request = gateway.fills_requests[("m1", "g1.alice")]
        assert request.after == {"BTC-USDT": 1}
        request.sent = time.monotonic()
        conn.transport.written.clear()
        gateway._fills_reply(b"g1.alice", msgpack.packb([
            "m1", 0, codec.encode_account_publication("g1.alice", lost + past), {"BTC-USDT": engine.seq},
            request.after]))
        written = bytes(conn.transport.written)
        update = json.loads(written[written.index(b"{"):])
        assert (update["data"]["order_id"], update["data"]["status"], update["data"]["filled"]) == (
            "a1", "filled", "0.3")
        assert written.count(b"order_update") == 1  # a2's fill does not come twice


@pytest.mark.parametrize("connected", [True, False], ids=["service-connected", "service-lost"])
def test_fills_a_give_up_let_go_are_asked_again_later_if_the_matchers_snapshot_service_stayed_connected(
        tmp_path: Path, connected: bool) -> None:
    """The matcher gave no answer about a lost fill in 10 s, and the gateway let go what it held.
    With its snapshot service lost, the handshake that comes when it is back asks again. With
    the service connected all along (the matcher busy, or its answer lost), no handshake comes:
    a timer asks again 10 s later, from below the lost fill. (No node runs.)"""
    with gateway_with_a_resting_order(tmp_path) as (gateway, conn, alice, _):
        if connected:
            gateway._snapshot_service_event("m1", zmq.EVENT_HANDSHAKE_SUCCEEDED)
        alice.fills_lost(["BTC-USDT"])
        now = time.monotonic()
        request = FillsRequest(conn, alice.begin_fill_replay(["BTC-USDT"]), now - 11, time.time_ns())
        request.sent, request.give_up = now - 11, now - 1
        gateway.fills_requests[("m1", "g1.alice")] = request
        gateway._send_fills_requests(now)  # given up: the client is told
        assert b'"symbols":["BTC-USDT"]' in conn.transport.written and not gateway.fills_requests
        gateway._send_fills_requests(now + 9)
        assert not gateway.fills_requests
        gateway._send_fills_requests(now + 10)
        if connected:
            assert gateway.fills_requests[("m1", "g1.alice")].after == {"BTC-USDT": 0}
        else:
            assert not gateway.fills_requests and "m1" in gateway.matcher_lost  # the handshake will ask
