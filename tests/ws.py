"""WebSocket clients of the gateway for integration tests, and a client-side book that checks the feed.

``WsClient`` wraps ``websockets.sync.client``: a background thread of the library reads the
socket (``max_queue=None``: it never stops reading, so a test that looks elsewhere for a while
does not turn its clients into slow consumers), and every message that arrives is checked
against the public contract (``DESIGN.md`` "WebSocket protocol", ``docs/protocol.md``) the
moment the test pulls it:

- a channel message (``depth_snapshot``, ``depth_update``, ``trade``, ``heartbeat``) comes only
  for a channel the client holds: after its ``subscription_ack`` and before its
  ``unsubscription_ack``;
- ``ChannelBook`` applies ``depth_snapshot`` and ``depth_update``: the first depth message of a
  subscription is a snapshot, each update's ``prev_seq`` is the ``seq`` of the previous depth
  message, levels are best first, and the ``checksum`` (computed here, independently of
  ``zmx.depth``) matches after every update; a ``slow_consumer`` error of a channel must be
  followed by a fresh ``depth_snapshot`` before any update; trades come before the
  ``depth_update`` of their ``seq``.

A violation raises ``FeedError`` (an ``AssertionError``) in the test at once.

``expect(what, timeout)`` waits for the first unread message that matches ``what`` (a ``type``
string, a dict that the message must contain, or a predicate) and leaves the others unread
for later ``expect`` calls; ``next`` returns the very next message, for order checks. Every
wait has a timeout; nothing here sleeps to wait for something.
"""

from __future__ import annotations

import contextlib
import json
import socket
import time
import zlib
from collections import deque
from collections.abc import Callable, Iterable
from decimal import Decimal
from functools import lru_cache
from typing import Any
from urllib.parse import urlsplit

import msgpack
import zmq
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect

from zmx.model import SymbolSpec
from zmx.topology import Topology, connect_endpoint

TIMEOUT = 5.0  # seconds any single expected message may take
CHECKSUM_DEPTH = 25
CHANNEL_TYPES = frozenset({"depth_snapshot", "depth_update", "trade", "heartbeat"})
ABNORMAL_CLOSURE = 1006  # what the client reports when the connection ended without a close frame

Message = dict[str, Any]
Level = list[str]
Match = str | dict[str, Any] | Callable[[Message], bool]

_decimal = lru_cache(maxsize=1 << 16)(Decimal)


class FeedError(AssertionError):
    """The gateway sent something that breaks the public contract."""


def checksum(bids: Iterable[Level], asks: Iterable[Level]) -> int:
    """DESIGN.md: CRC32 (unsigned) of ``bid1p:bid1q:ask1p:ask1q:bid2p:...`` over the top 25 levels
    of each side, a side that runs out skipped, prices and quantities exactly as sent."""
    top_bids, top_asks = list(bids)[:CHECKSUM_DEPTH], list(asks)[:CHECKSUM_DEPTH]
    parts: list[str] = []
    for i in range(max(len(top_bids), len(top_asks))):
        for side in (top_bids, top_asks):
            if i < len(side):
                parts += side[i][:2]
    return zlib.crc32(":".join(parts).encode())


def matches(message: Message, what: Match) -> bool:
    """``what`` is a ``type``, a dict whose items the message has (nested dicts compared the same way),
    or a predicate."""
    if isinstance(what, str):
        return message.get("type") == what
    if isinstance(what, dict):
        return _contains(message, what)
    return bool(what(message))


def _contains(value: Any, pattern: Any) -> bool:
    if isinstance(pattern, dict):
        return isinstance(value, dict) and all(k in value and _contains(value[k], v) for k, v in pattern.items())
    return type(value) is type(pattern) and value == pattern  # 1 != True != 1.0 here


def as_decimal_levels(levels: Iterable[Level]) -> list[tuple[Decimal, Decimal]]:
    """Levels compared by value (``"30000"`` equals ``"30000.00"``)."""
    return [(Decimal(p), Decimal(q)) for p, q in levels]


class ChannelBook:
    """One channel as a client sees it: the L2 book from snapshot + updates, checked on every message."""

    def __init__(self, channel: str) -> None:
        self.channel = channel
        self.seq: int | None = None  # seq of the last depth message applied
        self.bids: dict[str, str] = {}
        self.asks: dict[str, str] = {}
        self.snapshots = 0
        self.updates = 0
        self.trades: list[dict[str, Any]] = []
        self.heartbeats = 0
        self.slow_consumer_errors: list[Message] = []
        self.awaiting_snapshot = True
        self._pending_trades: list[dict[str, Any]] = []  # trades waiting for the update of their seq

    def fail(self, problem: str, message: Message) -> None:
        raise FeedError(f"{self.channel}: {problem}: {json.dumps(message)[:600]}")

    def levels(self) -> tuple[list[Level], list[Level]]:
        """(bids, asks) as ``[price, quantity]`` strings, best first."""
        bids = sorted(self.bids.items(), key=lambda pq: _decimal(pq[0]), reverse=True)
        asks = sorted(self.asks.items(), key=lambda pq: _decimal(pq[0]))
        return [list(level) for level in bids], [list(level) for level in asks]

    def checksum(self) -> int:
        return checksum(*self.levels())

    def _levels(self, message: Message, data: dict[str, Any], key: str, *, snapshot: bool) -> list[Level]:
        levels = data.get(key)
        if not isinstance(levels, list):
            self.fail(f"{key} is not a list", message)
        prices = []
        for level in levels:
            if not (isinstance(level, list) and len(level) == 2 and all(isinstance(x, str) for x in level)):
                self.fail(f"a level of {key} is not [price, quantity] as strings", message)
            price, quantity = _decimal(level[0]), _decimal(level[1])
            if price <= 0 or quantity < 0 or (snapshot and quantity == 0):
                self.fail(f"level {level} of {key} is not a price and a quantity", message)
            prices.append(price)
        best_first = sorted(prices, reverse=key == "bids")
        if prices != best_first or len(set(prices)) != len(prices):
            self.fail(f"{key} are not distinct levels, best first", message)
        return levels

    def _check_checksum(self, message: Message, data: dict[str, Any], *, required: bool) -> None:
        if "checksum" not in data:
            if required:
                self.fail("no checksum", message)
            return
        mine = self.checksum()
        if data["checksum"] != mine:
            bids, asks = self.levels()
            self.fail(f"checksum {data['checksum']} but the book here gives {mine} (bids {bids[:5]}..., "
                      f"asks {asks[:5]}...)", message)

    def on_message(self, message: Message) -> None:
        kind = message["type"]
        data = message.get("data")
        if not isinstance(data, dict) or not isinstance(data.get("seq"), int) or isinstance(data["seq"], bool):
            self.fail("no data.seq integer", message)
        seq = data["seq"]
        if kind == "depth_snapshot":
            bids = self._levels(message, data, "bids", snapshot=True)
            asks = self._levels(message, data, "asks", snapshot=True)
            self.bids = {p: q for p, q in bids}
            self.asks = {p: q for p, q in asks}
            self._check_checksum(message, data, required=True)
            # a fresh snapshot replaces the book: trades of seqs it holds are in it already
            self._pending_trades = [t for t in self._pending_trades if t["seq"] > seq]
            self.seq = seq
            self.snapshots += 1
            self.awaiting_snapshot = False
        elif kind == "depth_update":
            if self.awaiting_snapshot:
                self.fail("depth_update before the depth_snapshot of the subscription (or of a slow_consumer "
                          "resync)", message)
            if data.get("prev_seq") != self.seq:
                self.fail(f"prev_seq {data.get('prev_seq')} but the last depth message here had seq {self.seq}",
                          message)
            assert self.seq is not None
            if seq <= self.seq:
                self.fail(f"seq {seq} does not grow past {self.seq}", message)
            for key, side in (("bids", self.bids), ("asks", self.asks)):
                for price, quantity in self._levels(message, data, key, snapshot=False):
                    if _decimal(quantity) == 0:
                        side.pop(price, None)
                    else:
                        side[price] = quantity
            self._check_checksum(message, data, required=True)
            late = [t for t in self._pending_trades if t["seq"] > seq]
            if late:
                self.fail(f"trade of seq {late[0]['seq']} came before an update of seq {seq}", message)
            self._pending_trades = []
            self.seq = seq
            self.updates += 1
        elif kind == "trade":
            if self.seq is not None and not self.awaiting_snapshot and seq <= self.seq:
                self.fail(f"trade of seq {seq} after the depth message of seq {self.seq}", message)
            if self._pending_trades and seq < self._pending_trades[-1]["seq"]:
                self.fail("trades out of seq order", message)
            self.trades.append(data)
            self._pending_trades.append(data)
        elif kind == "heartbeat":
            if self.seq is not None and not self.awaiting_snapshot and seq < self.seq:
                self.fail(f"heartbeat of seq {seq} behind the book's seq {self.seq}", message)
            self.heartbeats += 1

    def on_slow_consumer(self, message: Message) -> None:
        self.slow_consumer_errors.append(message)
        self.awaiting_snapshot = True


class WsClient:
    """A WebSocket client of the gateway whose every received message is checked (module docstring)."""

    def __init__(self, url: str, *, name: str = "", max_queue: int | tuple[int, int] | None = None,
                 sock: socket.socket | None = None, compression: str | None = "deflate",
                 timeout: float = TIMEOUT) -> None:
        self.url = url
        self.name = name or url
        self.ws: ClientConnection = connect(url, sock=sock, max_queue=max_queue, max_size=None,
                                            compression=compression, open_timeout=timeout, close_timeout=2,
                                            legacy=True)
        self.books: dict[str, ChannelBook] = {}
        self.held: set[str] = set()
        self.received: list[Message] = []  # everything, in arrival order
        self.unread: deque[Message] = deque()
        self.orders: dict[str, list[Message]] = {}  # order_id -> its order_updates
        self.close_code: int | None = None
        self.close_reason = ""

    # -- sending ---------------------------------------------------------------------------

    def send(self, message: Any) -> None:
        """One JSON text frame."""
        self.ws.send(json.dumps(message, separators=(",", ":")))

    def send_raw(self, data: str | bytes) -> None:
        """A text frame (str) or a binary frame (bytes), as is."""
        self.ws.send(data)

    # -- receiving -------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self.close_code is not None

    def _pull(self, timeout: float) -> bool:
        """Receive one message (checked, kept unread); False on timeout or when the connection is closed."""
        if self.closed:
            return False
        try:
            raw = self.ws.recv(timeout=max(0.0, timeout))
        except TimeoutError:
            return False
        except ConnectionClosed as e:
            self.close_code = e.rcvd.code if e.rcvd is not None else ABNORMAL_CLOSURE
            self.close_reason = e.rcvd.reason if e.rcvd is not None else ""
            return False
        if not isinstance(raw, str):
            raise FeedError(f"{self.name}: a binary frame ({len(raw)} bytes); the gateway sends JSON text frames")
        try:
            message = json.loads(raw)
        except ValueError:
            raise FeedError(f"{self.name}: a frame that is not JSON: {raw[:200]!r}") from None
        if not isinstance(message, dict) or not isinstance(message.get("type"), str):
            raise FeedError(f"{self.name}: a message without a type: {raw[:200]!r}")
        self.received.append(message)
        self.unread.append(message)
        self._check(message)
        return True

    def _check(self, message: Message) -> None:
        kind = message["type"]
        channel = message.get("channel")
        if kind == "subscription_ack":
            if channel not in self.held:
                self.books[channel] = ChannelBook(channel)
                self.held.add(channel)
        elif kind == "unsubscription_ack":
            self.held.discard(channel)
        elif kind in CHANNEL_TYPES:
            if channel not in self.held:
                raise FeedError(f"{self.name}: {kind} of {channel!r}, a channel not held (held: "
                                f"{sorted(self.held)}): {json.dumps(message)[:300]}")
            self.books[channel].on_message(message)
        elif kind == "error" and message.get("code") == "slow_consumer":
            if channel not in self.held:
                raise FeedError(f"{self.name}: slow_consumer of a channel not held: {message}")
            self.books[channel].on_slow_consumer(message)
        elif kind == "order_update":
            data = message.get("data")
            if not isinstance(data, dict) or not isinstance(data.get("order_id"), str):
                raise FeedError(f"{self.name}: order_update without data.order_id: {message}")
            self.orders.setdefault(data["order_id"], []).append(message)

    def drain(self) -> None:
        """Pull whatever has arrived already, without waiting."""
        while self._pull(0):
            pass

    def next(self, timeout: float = TIMEOUT) -> Message:
        """The next unread message, whatever it is."""
        if not self.unread and not self._pull(timeout):
            self._fail_waiting("any message", timeout)
        return self.unread.popleft()

    def expect(self, what: Match, timeout: float = TIMEOUT) -> Message:
        """The first unread message matching ``what`` (the others stay unread); fails after ``timeout``."""
        deadline = time.monotonic() + timeout
        scanned = 0
        while True:
            for i in range(scanned, len(self.unread)):
                if matches(self.unread[i], what):
                    message = self.unread[i]
                    del self.unread[i]
                    return message
            scanned = len(self.unread)
            if not self._pull(deadline - time.monotonic()) and (self.closed or time.monotonic() >= deadline):
                self._fail_waiting(what, timeout)

    def expect_all(self, what: Match, count: int, timeout: float = TIMEOUT) -> list[Message]:
        """``count`` messages matching ``what``, within ``timeout`` in all."""
        deadline = time.monotonic() + timeout
        return [self.expect(what, max(0.0, deadline - time.monotonic())) for _ in range(count)]

    def wait_until(self, condition: Callable[[], bool], what: str, timeout: float = TIMEOUT) -> None:
        """Pull messages until ``condition()`` holds (checked after each one)."""
        deadline = time.monotonic() + timeout
        while not condition():
            if not self._pull(deadline - time.monotonic()) and (self.closed or time.monotonic() >= deadline):
                if condition():
                    return
                self._fail_waiting(what, timeout)

    def expect_close(self, timeout: float = TIMEOUT) -> int:
        """Read until the server closes the connection; its close code (1006 if it sent none)."""
        deadline = time.monotonic() + timeout
        while not self.closed:
            if not self._pull(deadline - time.monotonic()) and not self.closed and time.monotonic() >= deadline:
                self._fail_waiting("the connection to close", timeout)
        assert self.close_code is not None
        return self.close_code

    def take(self, what: Match) -> list[Message]:
        """Every unread message matching ``what`` (removed from the unread ones)."""
        taken = [m for m in self.unread if matches(m, what)]
        self.unread = deque(m for m in self.unread if not matches(m, what))
        return taken

    def since(self, mark: int, what: Match) -> list[Message]:
        """Messages received after ``mark`` (a ``len(client.received)`` taken earlier) that match ``what``."""
        return [m for m in self.received[mark:] if matches(m, what)]

    def _fail_waiting(self, what: object, timeout: float) -> None:
        state = f"closed with {self.close_code} {self.close_reason!r}" if self.closed else f"open after {timeout} s"
        last = [json.dumps(m)[:200] for m in list(self.unread)[-5:]]
        raise AssertionError(f"{self.name}: waited for {what!r}, connection {state}; last unread: {last}")

    # -- requests ----------------------------------------------------------------------------

    def request(self, message: Message, what: Match, timeout: float = TIMEOUT) -> Message:
        self.send(message)
        return self.expect(what, timeout)

    def subscribe(self, *channels: str, timeout: float = TIMEOUT) -> None:
        """Subscribe and wait for each channel's ack and first depth_snapshot."""
        self.send({"action": "subscribe", "channels": list(channels)} if len(channels) > 1
                  else {"action": "subscribe", "channel": channels[0]})
        for channel in channels:
            self.expect({"type": "subscription_ack", "channel": channel}, timeout)
            self.expect({"type": "depth_snapshot", "channel": channel}, timeout)

    def wait_seq(self, channel: str, seq: int, timeout: float = TIMEOUT) -> ChannelBook:
        """Pull until the channel's book is at ``seq`` (or past it); the book."""
        book = self.books[channel]
        self.wait_until(lambda: book.seq is not None and book.seq >= seq and not book.awaiting_snapshot,
                        f"{channel} at seq {seq} (book at {book.seq})", timeout)
        return book

    def close(self) -> None:
        with contextlib.suppress(Exception):  # best effort at the end of a test, whatever state it is in
            self.ws.close()


def slow_socket(url: str, rcvbuf: int = 2048, mss: int = 536) -> socket.socket:
    """A connected TCP socket to the gateway whose kernel buffers barely hold anything.

    A small receive buffer alone is not enough on loopback: the server's send buffer is sized
    from the MSS (64 KiB on lo), so it would hold megabytes; a small MSS, announced in the SYN,
    keeps the server side small too (about 40 KiB in all, measured)."""
    parts = urlsplit(url)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, mss)
    sock.settimeout(TIMEOUT)
    sock.connect((parts.hostname, parts.port))
    sock.settimeout(None)
    return sock


# -- the matcher's side, for comparisons ------------------------------------------------------


def matcher_book(topology: Topology, symbol: str, context: zmq.Context,
                 timeout: float = TIMEOUT) -> tuple[int, list[Level], list[Level]]:
    """(seq, bids, asks) from the owner's snapshot service (docs/wire.md "Snapshots"), levels as strings."""
    owner = topology.nodes[topology.owner_of(symbol)]
    spec: SymbolSpec = topology.symbols[symbol]
    dealer = context.socket(zmq.DEALER)
    dealer.linger = 0
    try:
        dealer.connect(connect_endpoint(owner.snapshot))  # type: ignore[union-attr]
        dealer.send_multipart([b"SNAP", symbol.encode()])
        assert dealer.poll(int(timeout * 1000)), f"no answer from the snapshot service of {owner.name}"
        frames = dealer.recv_multipart()
    finally:
        dealer.close(linger=0)
    assert frames[0] == b"SNAP", frames
    seq, bids, asks, *_times = msgpack.unpackb(frames[2])
    fmt = spec.ticks_to_price, spec.lots_to_quantity
    return seq, [[fmt[0](p), fmt[1](q)] for p, q in bids], [[fmt[0](p), fmt[1](q)] for p, q in asks]


def same_book(book: ChannelBook, bids: list[Level], asks: list[Level]) -> bool:
    mine = book.levels()
    theirs = as_decimal_levels(bids), as_decimal_levels(asks)
    return (as_decimal_levels(mine[0]), as_decimal_levels(mine[1])) == theirs


class Clients:
    """Opens ``WsClient``s for one test and closes every one of them at its end (see the ``clients`` fixtures)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.opened: list[WsClient] = []

    def __call__(self, name: str = "", url: str | None = None, **options: Any) -> WsClient:
        client = WsClient(url or self.url, name=name or f"client{len(self.opened) + 1}", **options)
        self.opened.append(client)
        return client

    def close_all(self) -> None:
        for client in self.opened:
            client.close()
