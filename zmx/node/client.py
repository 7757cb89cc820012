"""A small synchronous client of the routers, for tests, benchmarks and the gateway.

One DEALER socket connected to the ``front`` of every router, with ``ZMQ_IMMEDIATE=1``:
a message is only queued on a connection that is up, so nothing waits in a queue for a
router that is down, and the DEALER's round robin spreads requests over the routers that
are up. The frames are those of ``docs/wire.md``.

    with Client.from_topology(topology) as client:
        reply = client.submit("o1", "alice", "BTC-USDT", "buy", "30000", "0.5")
        assert reply.ok, reply.message

Errors (each a ``ZmxError``): ``InvalidNumber`` for a price or quantity off the symbol's grid,
``InvalidOrder`` for a symbol, side, type or time in force the cluster does not take,
``NoRouter`` when no router took a request in time, ``RequestTimeout`` when no reply came in
time, ``ClientClosed`` after ``close``; a front endpoint that is not one gives a ``ZmxError``
when the client is made. Replies say what the cluster refused (``Reply.status``, and the
events' reasons).

``submit``, ``cancel`` and ``amend`` check their arguments before anything is sent: an
``order_id`` or ``account`` that is not 1-64 printable ASCII characters, a symbol the client's
topology does not have (unless a ``spec`` of it is given), or a ``spec`` of another symbol
raise ``InvalidOrder``. ``send`` refuses a symbol that is not ASCII, and a command of more than
``codec.MAX_MESSAGE_BYTES``, which a router would answer by cutting the client's connection and
every request on it (``InvalidOrder``).

``send`` / ``recv`` pipeline (many requests in flight, replies in any order, matched by
``request_id``); ``request`` sends one command and waits for its reply, keeping the other
replies that arrive meanwhile for later ``recv`` calls. A timeout may be ``float("inf")``
(wait as long as it takes). A client is one ZeroMQ socket: use it from one thread, and in the
process that made it (a forked child makes its own: one used after a fork raises ``ZmxError``).

Losing a router
---------------
When one of several routers dies, its connection drops and the DEALER stops sending to it;
new requests go to the others. One that hangs (stopped, or a host that no longer answers)
keeps its connection open, so ZeroMQ's pings find it: its connection is dropped once it has
not answered for ``runtime.PING_TIMEOUT_MS``, about 4 s after it hung (until then it takes its share
of the requests, which time out). A request that was already on its way to the dead router,
or waiting there for its matcher's reply, is lost with it: no reply comes, and ``request``
raises ``RequestTimeout``. One that hung and goes on answers what it held over the
connection made again (the DEALER has a name of its own, ``name``, which the router hands
over to the new connection and which every request names as its ``reply_to``): such a late
reply comes out of ``recv`` like any other, with the ``request_id`` of the request that
timed out. The caller may send the same command again (it then goes
through a router that is up). A command that did reach its matcher is answered the second
time as a duplicate (a ``SubmitOrder`` with ``OrderRejected(reason="duplicate_order_id")``, a
``CancelOrder`` with ``CancelRejected(reason="unknown_order")``), so a resend never places an
order twice; the first answer was the one that counted.
"""

from __future__ import annotations

import itertools
import os
import secrets
import time
from collections import deque
from collections.abc import Sequence
from enum import Enum
from types import TracebackType
from typing import NamedTuple, Self, TypeVar

import zmq

from zmx import codec
from zmx.commands import AmendOrder, CancelOrder, Command, SubmitOrder
from zmx.events import EVENT_TYPES, Event, FeedHeartbeat
from zmx.exceptions import DecodeError, InvalidOrder, TopologyError, ZmxError
from zmx.model import OrderType, Side, SymbolSpec, TimeInForce
from zmx.node.runtime import connect, watch_peer
from zmx.topology import RouterNode, Topology, connect_endpoint

__all__ = ["BAD_REPLY", "Client", "ClientClosed", "NoRouter", "Reply", "RequestTimeout", "encode_header", "parse_reply"]

VERSION_BYTE = bytes((codec.VERSION,))
# A reply whose payload this client could not decode gets this status (it is not on the wire).
BAD_REPLY = "bad_reply"
E = TypeVar("E", bound=Enum)
HWM = 100_000  # queue bound per direction; the routers' replies must never be dropped for lack of room
_POLL_MAX_MS = 2**31 - 1  # the longest wait one poll takes (a longer timeout waits in several)
REPLY_MESSAGE_MAX = 1000  # bytes of a refusal's text that a Reply keeps


class NoRouter(ZmxError, TimeoutError):
    """No router took the request in time: none is connected, or every queue is full."""


class ClientClosed(ZmxError):
    """The client was closed: it sends and receives nothing more."""


class RequestTimeout(ZmxError, TimeoutError):
    """No reply to a request in time (its router or matcher may have died on the way)."""

    def __init__(self, message: str, request_id: int) -> None:
        super().__init__(message)
        self.request_id = request_id


class Reply(NamedTuple):
    """The answer to one request.

    ``status`` is ``"ok"`` with the command's ``events`` (its acknowledgement, fills,
    rejection ...), or an error status of ``docs/wire.md`` (``unknown_symbol``,
    ``unavailable``, ``bad_request``) with a human ``message``; ``BAD_REPLY`` when the reply
    could not be decoded here.
    """

    request_id: int
    status: str
    events: tuple[Event, ...]
    message: str

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def encode_header(request_id: int, symbol: str) -> bytes:
    """The request header: version byte, 8-byte big-endian request id, ASCII symbol."""
    return VERSION_BYTE + request_id.to_bytes(8, "big") + symbol.encode("ascii")


# What an ok reply may hold: the events a command made (a heartbeat is only ever published)
_REPLY_EVENTS = frozenset(EVENT_TYPES) - {FeedHeartbeat}


def parse_reply(frames: Sequence[bytes]) -> Reply | None:
    """A router's reply frames (``header, status, payload``) -> ``Reply``; None when there is
    no header to tell which request it answers. An ok payload that is not what a command
    makes (it does not decode, it holds no event, or something other than events of the
    request's symbol, which the header names) gives a ``BAD_REPLY`` reply."""
    if len(frames) != 3 or len(frames[0]) < 9:
        return None
    header, status, payload = frames
    request_id = int.from_bytes(header[1:9], "big")
    try:
        status_text = bytes(status).decode("ascii")
    except UnicodeDecodeError:
        return Reply(request_id, BAD_REPLY, (), f"status {bytes(status[:40])!r} is not ASCII")
    if not status_text:
        return Reply(request_id, BAD_REPLY, (), "an empty status")
    if status_text == "ok":
        try:
            events = codec.decode_batch(payload, codec.MAX_REPLY_BYTES)
        except DecodeError as e:
            return Reply(request_id, BAD_REPLY, (), f"ok reply with an undecodable payload: {e}")
        if not events:
            return Reply(request_id, BAD_REPLY, (), "ok reply with no event (a command makes at least one)")
        symbol = bytes(header[9:]).decode("utf-8", errors="replace")
        for event in events:
            if type(event) not in _REPLY_EVENTS:
                return Reply(request_id, BAD_REPLY, (), f"ok reply holding a {type(event).__name__}, which no "
                                                        "command makes")
            named = event.symbol  # type: ignore[union-attr]
            if named != symbol:
                return Reply(request_id, BAD_REPLY, (), f"ok reply with an event of {named!r} to a request of "
                                                        f"{symbol!r}")
        return Reply(request_id, "ok", events, "")  # type: ignore[arg-type]
    # (a refusal says why in a line: more is not passed on, a peer's megabytes of it included)
    return Reply(request_id, status_text, (), bytes(payload[:REPLY_MESSAGE_MAX]).decode("utf-8", errors="replace"))


def _poll_ms(seconds: float) -> int:
    """A wait of ``seconds`` (> 0, maybe infinite) as one poll's milliseconds: at least 1, at
    most what a poll takes (``int(inf)`` raised, after the request had gone out)."""
    return 1 if seconds < 0.001 else _POLL_MAX_MS if seconds * 1000 >= _POLL_MAX_MS else int(seconds * 1000)


def _choice(kind: type[E], value: object, what: str) -> E:
    try:
        return kind(value)
    except ValueError:
        raise InvalidOrder(f"{what} {value!r} is not one of {', '.join(repr(k.value) for k in kind)}") from None


class Client:
    """A DEALER to every router front; see the module documentation."""

    def __init__(self, front_endpoints: Sequence[str], *, context: zmq.Context[zmq.Socket[bytes]] | None = None,
                 symbols: dict[str, SymbolSpec] | None = None) -> None:
        if isinstance(front_endpoints, str):
            raise ZmxError(f"front_endpoints is a list of router front endpoints: Client([{front_endpoints!r}]), "
                           f"not Client({front_endpoints!r})")
        if not front_endpoints:
            raise ValueError("a client needs at least one router front endpoint")
        self._context = context or zmq.Context.instance()
        sock = self._context.socket(zmq.DEALER)
        sock.setsockopt(zmq.IMMEDIATE, 1)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, HWM)
        sock.setsockopt(zmq.RCVHWM, HWM)
        # ZeroMQ's pings: a router that hangs loses its connection (without them it went on
        # taking every other request, each lost until it went on)
        watch_peer(sock)
        # A name of its own, which every request names as its reply_to (docs/wire.md): a router
        # that hung past the pings answers what it held over the connection made again.
        self._pid = os.getpid()  # a forked child must not use this socket (see _check_process)
        self.name = f"client.{self._pid}.{secrets.token_hex(6)}".encode()
        sock.setsockopt(zmq.ROUTING_ID, self.name)
        for endpoint in front_endpoints:
            if not isinstance(endpoint, str):
                sock.close(linger=0)
                raise ZmxError(f"a router front endpoint is a str (tcp://HOST:PORT or ipc://PATH), got "
                               f"{type(endpoint).__name__} {endpoint!r:.60}")
            try:
                connect(sock, connect_endpoint(endpoint))
            except (zmq.ZMQError, TopologyError) as e:
                sock.close(linger=0)
                raise ZmxError(f"cannot connect to the router front {endpoint!r}: {e} "
                               "(expected tcp://HOST:PORT or ipc://PATH)") from None
        self.socket = sock
        self.endpoints = tuple(front_endpoints)
        self.symbols = dict(symbols or {})
        self._ids = itertools.count(1)
        self._kept: deque[Reply] = deque()  # replies that arrived while request() waited for another
        self.undecodable = 0  # replies without a readable header: counted, never returned

    @classmethod
    def from_topology(cls, topology: Topology, *, context: zmq.Context[zmq.Socket[bytes]] | None = None) -> Client:
        """A client of every router of ``topology``, converting prices with its symbols' specs."""
        fronts = [n.front for n in topology.nodes_by_role("router") if isinstance(n, RouterNode)]
        return cls(fronts, context=context, symbols=dict(topology.symbols))

    # -- lifetime ---------------------------------------------------------------------------

    def close(self) -> None:
        self.socket.close(linger=0)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # -- requests and replies -------------------------------------------------------------

    def send(self, command: Command, *, timeout: float = 5.0) -> int:
        """Send ``command`` to the router of its symbol's choosing; its request id.

        Returns as soon as ZeroMQ has taken the message. It waits (up to ``timeout`` s, then
        ``NoRouter``) only while no router is connected -- just after the client is made, or
        when every router is down -- or while every queue is full."""
        symbol = command.symbol
        if not isinstance(symbol, str) or not symbol.isascii():
            raise InvalidOrder(f"a symbol is ASCII text like 'BTC-USDT', got {symbol!r:.80}")
        body = codec.encode(command)
        if len(body) > codec.MAX_MESSAGE_BYTES:
            raise InvalidOrder(f"a {type(command).__name__} of {len(body):,} bytes is over the "
                               f"{codec.MAX_MESSAGE_BYTES:,} a router takes (which would cut this client's "
                               "connection, and every request on it)")
        request_id = next(self._ids)
        self.send_frames((encode_header(request_id, symbol), body, self.name), timeout=timeout)
        return request_id

    def send_frames(self, frames: Sequence[bytes], *, timeout: float = 5.0) -> None:
        """Send raw frames (any, even malformed ones: for tests) with ``send``'s waiting rule."""
        self._check_process()
        try:
            self.socket.send_multipart(frames, zmq.NOBLOCK)
            return
        except zmq.Again:
            pass
        except zmq.ZMQError:
            self._check_open()
            raise
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not self.socket.poll(_poll_ms(left), zmq.POLLOUT):
                if time.monotonic() < deadline:
                    continue  # a wait longer than one poll
                raise NoRouter(f"no router took the request within {timeout} s "
                               f"(routers: {', '.join(self.endpoints)})")
            try:
                self.socket.send_multipart(frames, zmq.NOBLOCK)
                return
            except zmq.Again:  # another thread's message took the room; wait again
                continue

    def recv(self, timeout: float) -> Reply | None:
        """The next reply, waiting up to ``timeout`` s (0: only one already here); None if
        there is none by then. Replies kept by ``request`` come first."""
        self._check_process()
        if self._kept:
            return self._kept.popleft()
        return self._recv(time.monotonic() + timeout)

    def request(self, command: Command, timeout: float = 5.0) -> Reply:
        """Send ``command`` and wait for its reply (``RequestTimeout`` after ``timeout`` s, which
        must be above 0: a request cannot be answered in no time).

        Other replies that arrive meanwhile are kept, in order, for ``recv`` (among them the late
        reply to a request that timed out: call ``recv`` to see them, or they stay here)."""
        if not timeout > 0:
            raise ValueError(f"a request's timeout must be above 0 seconds, got {timeout!r}")
        deadline = time.monotonic() + timeout
        request_id = self.send(command, timeout=timeout)
        while True:
            # The kept replies are not ours: they arrived before our request was sent.
            reply = self._recv(deadline)
            if reply is None:
                raise RequestTimeout(f"no reply to request {request_id} ({type(command).__name__} "
                                     f"{command.symbol}) within {timeout} s", request_id)
            if reply.request_id == request_id:
                return reply
            self._kept.append(reply)

    def _recv(self, deadline: float) -> Reply | None:
        sock = self.socket
        while True:
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                pass
            except zmq.ZMQError:
                self._check_open()
                raise
            else:
                reply = self._parse(frames)
                if reply is not None:
                    return reply
                continue
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            if not sock.poll(_poll_ms(left), zmq.POLLIN) and deadline - time.monotonic() <= 0:
                return None

    def _check_process(self) -> None:
        if os.getpid() != self._pid:
            raise ZmxError(f"this client was made in process {self._pid}; a process forked from it makes a "
                           "client of its own (the socket is the parent's: used here, it never answers)")

    def _check_open(self) -> None:
        if self.socket.closed:
            raise ClientClosed("this client is closed (close() or the end of its with block)")

    def _parse(self, frames: list[bytes]) -> Reply | None:
        reply = parse_reply(frames)
        if reply is None:
            self.undecodable += 1
        return reply

    # -- orders -------------------------------------------------------------------------

    def _check_order(self, order_id: object, account: object, symbol: object, spec: SymbolSpec | None = None
                     ) -> None:
        """``InvalidOrder`` unless the ids are ids and the symbol one this client may know (its
        topology's, or the one of the ``spec`` given)."""
        for name, value in (("order_id", order_id), ("account", account)):
            if not codec.is_valid_id(value):
                raise InvalidOrder(f"{name} must be 1 to {codec.MAX_ID_LENGTH} printable ASCII characters, got "
                                   f"{value!r:.80}")
        listed = self.symbols and (spec is None or spec.symbol != symbol)  # (a spec of its own names it)
        if not codec.is_valid_id(symbol) or (listed and symbol not in self.symbols):
            has = f": the topology of this client has {', '.join(self.symbols)}" if self.symbols else ""
            raise InvalidOrder(f"unknown symbol {symbol!r:.80}{has}")

    def _spec(self, symbol: str, spec: SymbolSpec | None) -> SymbolSpec:
        if spec is not None:
            if spec.symbol != symbol:
                raise InvalidOrder(f"spec is the one of {spec.symbol!r}, not of {symbol!r}: its grid is not "
                                   f"{symbol!r}'s")
            return spec
        try:
            return self.symbols[symbol]
        except KeyError:
            if self.symbols:
                raise InvalidOrder(f"unknown symbol {symbol!r}: the topology of this client has "
                                   f"{', '.join(self.symbols)}") from None
            raise InvalidOrder(f"no tick and lot size for {symbol!r}: a client made without a topology needs "
                               "spec=SymbolSpec(...) to turn decimal strings into ticks and lots") from None

    def submit_command(self, order_id: str, account: str, symbol: str, side: str, price: str | None,
                       quantity: str, *, type: str = "limit", time_in_force: str = "gtc",
                       spec: SymbolSpec | None = None) -> SubmitOrder:
        """A ``SubmitOrder`` from decimal strings (``InvalidNumber`` if off the symbol's grid)."""
        self._check_order(order_id, account, symbol, spec)
        grid = self._spec(symbol, spec)
        ticks = None if price is None else grid.to_ticks(price)
        return SubmitOrder(order_id, account, symbol, _choice(Side, side, "side"), _choice(OrderType, type, "type"),
                           _choice(TimeInForce, time_in_force, "time_in_force"), ticks, grid.to_lots(quantity))

    def submit(self, order_id: str, account: str, symbol: str, side: str, price: str | None, quantity: str, *,
               type: str = "limit", time_in_force: str = "gtc", spec: SymbolSpec | None = None,
               timeout: float = 5.0) -> Reply:
        """Submit an order (price and quantity as decimal strings; ``price=None`` for a
        market order) and wait for its reply."""
        command = self.submit_command(order_id, account, symbol, side, price, quantity, type=type,
                                      time_in_force=time_in_force, spec=spec)
        return self.request(command, timeout)

    def cancel(self, order_id: str, account: str, symbol: str, *, timeout: float = 5.0) -> Reply:
        """Cancel a resting order and wait for the reply."""
        self._check_order(order_id, account, symbol)
        return self.request(CancelOrder(order_id, account, symbol), timeout)

    def amend(self, order_id: str, account: str, symbol: str, *, price: str | None = None,
              quantity: str | None = None, spec: SymbolSpec | None = None, timeout: float = 5.0) -> Reply:
        """Amend a resting order (a new price, a new total quantity with the filled part
        included, or both; ``None`` keeps one as it is; docs/matching.md, "Amend") and wait for
        the reply."""
        if price is None and quantity is None:
            raise ZmxError("an amend changes the price, the quantity or both: give at least one")
        self._check_order(order_id, account, symbol, spec)
        grid = self._spec(symbol, spec)
        command = AmendOrder(order_id, account, symbol, None if price is None else grid.to_ticks(price),
                             None if quantity is None else grid.to_lots(quantity))
        return self.request(command, timeout)
