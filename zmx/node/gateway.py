"""The WebSocket gateway node: per-symbol channels and orders for WebSocket clients.

An asyncio shell (uvloop) around two Sans-I/O state machines: ``websockets``'
``ServerProtocol`` (incoming frames, pings, closing, and the handshakes that
``zmx.handshake.upgrade_response`` leaves to it) and ``zmx.protocol`` (``Session`` per
connection, ``Channel`` per subscribed symbol). The protocol is docs/protocol.md.

Market data: one SUB socket connected to the upstream PUBs (matchers or relays). A symbol's
topic is subscribed when the first local client subscribes its channel and unsubscribed when
the last one leaves. Each subscribed channel keeps an L2 mirror (snapshot from the owner's
snapshot service, then updates; Clone pattern); a gap, a reconnection to the upstream (a
restarted matcher) or a feed whose ``seq`` went back (a matcher restarted without its journal,
behind a relay: ``ChannelState.feed_seq``) makes it fetch a fresh snapshot that goes to every
subscriber.

Fan-out: each channel message is JSON-encoded and framed once; the frames of everything
read from the SUB in one loop turn are joined per channel, and each connection gets one
``transport.write`` per turn with all of its channels' bytes. A connection whose unread
bytes pass ``send_queue_bytes`` is *behind* (the transport tells us with ``pause_writing``):
it gets no channel data until it drains, then a ``slow_consumer`` error and a fresh
``depth_snapshot`` per channel it missed; behind for longer than ``slow_consumer_ms`` closes
it with 1013.

Orders: one DEALER to each router's front (docs/wire.md frames); a connection's orders go
through one router while it is up, so those for one matcher stay in the order it sent them.
Each connection is its own account; the account's private topic is subscribed on its first
order, for the fills of its resting orders. Those that a lost feed did not bring are asked of
the matcher once it is back (``_ask_fills``; docs/wire.md, "Fills a gateway missed").

Plain HTTP: a GET that does not ask for ``Upgrade: websocket`` gets the page ``page.html`` at
``/`` (a browser's way to use the gateway over the same port), else 404; a HEAD the same
headers; any other method 405; and the connection is closed.

Workers: ``workers: N`` forks N processes before anything else is created; each one is a
whole gateway (own sockets, own mirrors) listening on the same port with ``SO_REUSEPORT``,
so the kernel spreads connections over them.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import importlib.resources
import logging
import math
import os
import secrets
import signal
import socket
import struct
import sys
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from http import HTTPStatus
from typing import Any, Union
from urllib.parse import urlsplit

import msgpack
import uvloop
import zmq
from websockets.datastructures import Headers
from websockets.exceptions import InvalidMessage, InvalidState, PayloadTooBig, ProtocolError
from websockets.frames import Frame, Opcode
from websockets.http11 import Request, Response
from websockets.protocol import State
from websockets.server import ServerProtocol
from zmq.utils.monitor import recv_monitor_message

from zmx import codec
from zmx.commands import AmendOrder, CancelOrder, SubmitOrder
from zmx.events import FeedHeartbeat, Level, OrderFilled
from zmx.exceptions import DecodeError, SequenceGap, ZmxError
from zmx.handshake import MAX_REQUEST_LINE_BYTES, PAGE_METHODS, cannot_be_http, refused_method, upgrade_response
from zmx.node.client import HWM, Reply, encode_header, parse_reply
from zmx.node.histogram import LatencyHistogram
from zmx.node.runtime import (
    PING_IVL_MS,
    PING_TIMEOUT_MS,
    Stopper,
    announce_ready,
    cannot_bind,
    connect,
    die_with_parent,
    log_as_worker,
    settle_collector,
    watch_peer,
)
from zmx.node.supervisor import describe_status
from zmx.protocol import (
    CLOSE_INVALID_DATA,
    CLOSE_POLICY,
    Amend,
    Cancel,
    Channel,
    Close,
    Send,
    Session,
    Submit,
    Subscribe,
    Unsubscribe,
    error,
)
from zmx.topics import account_topic, is_private, topic
from zmx.topology import GatewayLimits, GatewayNode, MatcherNode, RouterNode, Topology, connect_endpoint

log = logging.getLogger("zmx.gateway")
OrderCommand = Union[SubmitOrder, CancelOrder, AmendOrder]  # what a client may send to the routers

_CLOSE_COUNTS = {CLOSE_POLICY: "rate_limit_closed", CLOSE_INVALID_DATA: "bad_utf8_closed"}  # a session's Close
MESSAGE_SHOWN = 300  # bytes of a peer's refusal text that a log line shows (a peer may send megabytes)
FRAGMENTS_PER_UNIT = 8  # a fragmented text message's fragments count toward the rate limit one in this many
# The most fragments of one message: empty ones add nothing to its size, and a client sending
# them under the rate limit grew its connection without end (12 KiB a second); closed with 1009
MAX_FRAGMENTS = 1024
# A request answered ``unknown_outcome`` (no reply within the limit ``order_timeout_s``) is
# remembered this long: a router or matcher that hung may still run it and answer, and what the
# answer shows (the order's own fills, the self-trade cancels of the connection's other orders,
# or a refusal) reaches the client then. A later answer is dropped (counted), and so is that of
# the oldest such request past LATE_REPLY_KEEP_MAX of them (memory: a few hundred bytes each).
LATE_REPLY_KEEP_S = 600.0
LATE_REPLY_KEEP_MAX = 100_000
SNAPSHOT_RETRY_S = 2.0  # a snapshot request with no answer by then is sent again, on a new connection
SNAPSHOT_RETIRE_S = 30.0  # an old snapshot connection is still read this long: a slow answer still counts
SNAPSHOT_RETIRED_MAX = 2  # old snapshot connections kept per matcher (a matcher that is down makes one every 2 s)
SUBSCRIBE_WAIT_S = 1.5  # longest wait for a new topic's first message before its snapshot is asked
# A channel subscribed again this soon after its last subscriber left: a jump of its feed before the
# subscription's answer is the time the topic was not subscribed, not a loss (ChannelState.rejoined_until)
REJOIN_S = 2.0
SUB_BATCH = 4096  # publications read per loop turn before the connections are written to
CLOSE_GRACE_S = 2.0  # a closing connection that does not finish by then is cut
TICK_S = 0.25
FEED_RECONNECT_S = 2.0  # a feed lost for this long is connected again (see Gateway._reconnect_feed)
FAILOVER_S = 2.0  # a feed with a standby (topology "standby") lost for this long moves to the standby
# The fills of resting orders that a lost feed did not bring are asked of their matcher this long
# after the feed is back (the account topics' subscriptions reach the matcher first, so nothing
# falls between the answer and the live stream), again every SNAPSHOT_RETRY_S, given up after
# FILLS_GIVE_UP_S.
FILLS_WAIT_S = 0.5
FILLS_GIVE_UP_S = 10.0
# The largest publication taken: one command's events, and a market order that sweeps a deep book
# makes thousands of trades at once (about 35 bytes each). A bigger frame makes the SUB socket drop
# the connection, and FEED_RECONNECT_S later the feed is connected again and its channels resync.
PUBLICATION_MAX_BYTES = codec.MAX_PUBLICATION_BYTES
SNAPSHOT_MAX_BYTES = 64 * codec.MAX_MESSAGE_BYTES  # a deep book is a big snapshot (see _renew_snapshot_socket)
# A channel whose feed said nothing for this long (a matcher sends an idle symbol a heartbeat of
# its own every 1-1.25 s) gets no heartbeat from the gateway: its clients can tell that the feed,
# not the market, went quiet.
FEED_SILENT_S = 3.0
BAD_LOG_S = 1.0  # undecodable publications: the first of each second is logged with its reason, the rest counted
STATS_INTERVAL_S = 10.0  # how often the gateway logs what it carried (StatsWindow), as routers and matchers do
STATS_CHANNEL_LINES = 20  # channel lines of a stats window at most (the busiest; one line sums up the rest)
BACKLOG = 16384

CLOSE_GOING_AWAY = 1001
CLOSE_TRY_AGAIN = 1013
CLOSE_PING_TIMEOUT = 1011
CLOSE_INTERNAL_ERROR = 1011  # (RFC 6455's "unexpected condition"; a ping timeout says so with the same code)
CLOSE_TOO_BIG = 1009  # (websockets closes a frame over max_message_bytes with it itself)


# The one thing served over plain HTTP: a page that uses the gateway from a browser (a book,
# trades and an order form over this same port's WebSocket). Static, no outside resources.
PAGE = importlib.resources.files("zmx.node").joinpath("page.html").read_bytes()
PAGE_PATHS = frozenset(("/", "/index.html"))
PAGE_POLICY = ("default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src ws: wss:; "
               "base-uri 'none'; form-action 'none'")
NOT_FOUND = b"Not found. The page is at /; WebSocket clients connect to ws://this-host/.\n"
NOT_ALLOWED = (b"Method not allowed. The page at / answers GET and HEAD; WebSocket clients send a GET "
               b"with Upgrade: websocket.\n")


def http_response(path: str, method: str = "GET") -> Response:
    """The answer to a plain HTTP request (one that is not a WebSocket upgrade): for a GET,
    the page at ``/``, else 404; for a HEAD, the same headers and no body; for any other
    method, 405 with ``Allow: GET, HEAD``."""
    if method not in PAGE_METHODS:
        response = _plain(HTTPStatus.METHOD_NOT_ALLOWED, NOT_ALLOWED, "text/plain; charset=utf-8")
        response.headers["Allow"] = ", ".join(PAGE_METHODS)
        return response
    if urlsplit(path).path in PAGE_PATHS:
        return _plain(HTTPStatus.OK, PAGE, "text/html; charset=utf-8", head=method == "HEAD")
    return _plain(HTTPStatus.NOT_FOUND, NOT_FOUND, "text/plain; charset=utf-8", head=method == "HEAD")


def bad_request(error: Exception) -> Response:
    """The answer to a request that websockets could not read (a GET with a body, a malformed
    header, bytes that are not HTTP): websockets itself closes without a word."""
    reason = "".join(c if " " <= c <= "~" else "?" for c in str(error.__cause__ or error))
    if len(reason) > 120:
        reason = reason[:117] + "..."
    body = (f"Bad request: {reason}. This port takes HTTP/1.1 GET requests: WebSocket upgrades, "
            "and the page at /.\n").encode()
    return _plain(HTTPStatus.BAD_REQUEST, body, "text/plain; charset=utf-8")


def _plain(status: HTTPStatus, body: bytes, kind: str, head: bool = False) -> Response:
    """A plain HTTP response that closes the connection; ``head``: its headers only."""
    headers = Headers([("Date", email.utils.formatdate(usegmt=True)), ("Connection", "close"),
                       ("Content-Length", str(len(body))), ("Content-Type", kind), ("Cache-Control", "no-cache"),
                       ("X-Content-Type-Options", "nosniff"), ("Content-Security-Policy", PAGE_POLICY)])
    return Response(status.value, status.phrase, headers, b"" if head else body)


def wants_websocket(request: Request) -> bool:
    """Whether a request asks for the WebSocket protocol (an ``Upgrade`` that names it); a
    request that asks for another one (``h2c``, say) is a plain HTTP request."""
    return any(token.strip().lower() == "websocket"
               for value in request.headers.get_all("Upgrade") for token in value.split(","))


_TEXT_HEAD = 0x81  # FIN, opcode 1 (text); RFC 6455, 5.2
_SHORT_HEAD = struct.Struct("!BB")
_MEDIUM_HEAD = struct.Struct("!BBH")
_LONG_HEAD = struct.Struct("!BBQ")


def text_frame(payload: bytes) -> bytes:
    """One unmasked text frame (a server's frames are never masked, so the same bytes go to
    every client): the same bytes as websockets' ``Frame(Opcode.TEXT, payload).serialize(mask=False)``,
    made here because it runs for every message of every channel (0.4 us against 2.7)."""
    size = len(payload)
    if size < 126:
        return _SHORT_HEAD.pack(_TEXT_HEAD, size) + payload
    if size < 65536:
        return _MEDIUM_HEAD.pack(_TEXT_HEAD, 126, size) + payload
    return _LONG_HEAD.pack(_TEXT_HEAD, 127, size) + payload


class Connection(asyncio.Protocol):
    """One WebSocket client: the transport, the websockets state machine and the session."""

    __slots__ = ("account_subscribed", "behind", "behind_since", "closing", "fragments", "frames_from", "gateway",
                 "missed", "out", "ping_sent", "ping_slot", "request_start", "session", "transport", "ws")

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.transport: asyncio.Transport | None = None
        # websockets' state machine: none until the first read (which usually holds a request
        # that ``upgrade_response`` answers without one), the handshake's when it does not,
        # then only while it holds state that must last (a partial frame, a fragmented
        # message, a closing handshake); see _open_ws.
        self.ws: ServerProtocol | None = None
        self.session: Session | None = None  # set once the handshake is done
        # What came of a plain HTTP request whose request line has not all come (see _refused)
        self.request_start: bytes | None = None
        # Bytes to write together at the end of the callback that makes them: a fan-out turn's
        # channel frames, a tick's heartbeats, or what one read answers (a handshake's response,
        # a subscription's ack and snapshots, errors, pongs). None outside such a callback:
        # writes go at once.
        self.out: list[bytes] | None = None
        self.behind = False
        self.behind_since = 0.0
        self.missed: dict[str, list[int]] | None = None  # channel -> [updates, trades, from_seq, to_seq]
        self.fragments: list[bytes] | None = None
        self.ping_sent = 0.0
        self.ping_slot = 0
        self.closing = False
        self.account_subscribed = False
        # matcher -> (epoch, start, n) of the last counted frame of this connection's account
        # from it (Gateway._account_frame); None until the first
        self.frames_from: dict[str, tuple[int, int, int]] | None = None

    # -- asyncio.Protocol -------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's TCPTransport
        limit = self.gateway.limits.send_queue_bytes
        transport.set_write_buffer_limits(high=limit, low=limit // 4)
        self.gateway.handshaking[self] = time.monotonic()

    def data_received(self, data: bytes) -> None:
        self.out = []  # one write for all the answers to this read, not one per message
        try:
            ws = self.ws
            if ws is None:
                if self.session is None:  # the connection's first bytes: its handshake
                    accepted = upgrade_response(data, self.gateway.http_date())
                    if accepted is None:  # anything but a plain upgrade request in one read
                        ws = self.ws = ServerProtocol(max_size=self.gateway.limits.max_message_bytes)
                        if self._refused(ws, data):
                            return
                    else:
                        response, end = accepted
                        self.out.append(response)
                        self.gateway.opened(self)
                        if end == len(data):
                            return
                        data = data[end:]  # frames sent right after the request
                        ws = self.ws = self._open_ws()
                else:
                    # (held while this read is handled: a close it makes goes through this
                    # machine, not a second one; _flush_ws below keeps it or lets it go)
                    ws = self.ws = self._open_ws()
            elif self.request_start is not None and self._refused(ws, self.request_start + data):
                return
            failed = ws.parser_exc
            ws.receive_data(data)
            answered = False
            for event in ws.events_received():
                if type(event) is Frame:
                    self._frame(event)
                elif isinstance(event, Request):
                    self._handshake(ws, event)
                    answered = True
                    if ws.state is not State.OPEN:
                        break  # answered as plain HTTP, or refused: a request after it is not read
            if type(ws.handshake_exc) is InvalidMessage and not answered and not self.closing:
                # a request websockets could not read, which it would leave unanswered (too
                # long a line, too many headers: it answers those itself)
                self._write(bad_request(ws.handshake_exc).serialize())
            if ws.parser_exc is not failed and self.session is not None:  # (a plain HTTP client's is no 1002)
                self._count_failure(ws.parser_exc)
            self._flush_ws(ws)
        finally:
            self._write_out()

    def _count_failure(self, exc: Exception | None) -> None:
        """websockets failed the connection on what the client sent, and closes it: a frame over
        ``max_message_bytes`` (1009), or one that breaks the protocol (1002; 1007 for a close
        frame's reason that is not UTF-8). Counted as the gateway's own closes are."""
        if isinstance(exc, PayloadTooBig):
            self.gateway.counts["too_big_closed"] += 1
        elif isinstance(exc, (ProtocolError, UnicodeDecodeError)):
            self.gateway.counts["protocol_error_closed"] += 1

    def _refused(self, ws: ServerProtocol, start: bytes) -> bool:
        """Answer 405 to a request whose method is neither GET nor HEAD (``start``: what came of
        it so far), before websockets parses it: its parser refuses a request with a body, as a
        POST usually has, which would make it a 400. While the request line has not all come,
        ``start`` is kept and looked at again with the next read."""
        method = refused_method(start)
        whole = b"\r\n" in start or len(start) >= MAX_REQUEST_LINE_BYTES  # (too long: websockets refuses it)
        if method is not None or not whole and cannot_be_http(start):
            self.request_start = None
            ws.send_response(http_response("/", method) if method is not None else
                             bad_request(ValueError("these bytes cannot start an HTTP request line")))
            self._flush_ws(ws)
            return True
        self.request_start = None if whole else start
        return False

    def eof_received(self) -> bool | None:
        ws = self.ws
        if ws is None:
            # Open and idle, and the client left without a close frame (most do), or it left
            # before it sent a byte: there is nothing to finish or send, and asyncio closes
            # the transport when this returns.
            # No machine is borrowed for it: 100,000 clients leaving at once would otherwise
            # each make one (a spare serves one at a time) and hold it until connection_lost.
            return None
        ws.receive_eof()
        self._flush_ws(ws)
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.gateway.drop(self)
        self.transport = None
        if self.ws is not None:
            _free(self.ws)
            self.ws = None

    def pause_writing(self) -> None:
        if not self.behind and self.session is not None:
            self.behind = True
            self.behind_since = time.monotonic()
            self.gateway.behind.add(self)

    def resume_writing(self) -> None:
        if self.behind:
            self.behind = False
            self.gateway.behind.discard(self)
            self.gateway.caught_up(self)

    # -- incoming -----------------------------------------------------------------------------------------

    def _open_ws(self) -> ServerProtocol:
        """A state machine for an open connection that holds no state between messages.

        Keeping one ``ServerProtocol`` per connection costs about 3.6 KB (its parser generator
        keeps the handshake request alive), more than the rest of an idle connection. Between
        messages an open connection has no protocol state worth keeping: its machine is OPEN,
        with nothing buffered, no fragment pending and nothing to send, exactly like any other
        idle one. So an idle connection keeps none, and each read (or ping) borrows the
        gateway's spare machine, which ``_flush_ws`` gives back once it is idle again; it
        keeps it only while mid-frame, mid-message or closing. (Making a machine costs about
        25 us here, more than the rest of handling a small message.)
        """
        gateway = self.gateway
        ws = gateway.spare_ws
        if ws is None:
            return ServerProtocol(state=State.OPEN, max_size=gateway.limits.max_message_bytes)
        gateway.spare_ws = None
        return ws

    def _handshake(self, ws: ServerProtocol, request: Request) -> None:
        if not wants_websocket(request):  # not a WebSocket client: a browser asking for the page
            response = http_response(request.path, request.method)
        else:
            response = ws.accept(request)
        if ws.eof_sent:
            # websockets read what came after the request as frames and gave up (a second
            # request sent without waiting, say): this one is answered, and the connection ends.
            # After an upgrade, that was the client's first frame: a WebSocket's failure, counted.
            if response.status_code == 101:
                self._count_failure(ws.parser_exc)
            self._write(response.serialize())
            return
        ws.send_response(response)
        if ws.state is State.OPEN:
            self.gateway.opened(self)

    def _frame(self, frame: Frame) -> None:
        opcode = frame.opcode
        if opcode is Opcode.TEXT and frame.fin:
            self._message(frame.data)  # the usual frame: a whole message, counted by the session
            return
        # Other frames count toward the rate limit too, so that reading them is bounded as
        # reading messages is (websockets has answered a ping with its pong already): each ping,
        # binary frame, and pong that answers no ping of ours, once; a text message's fragments
        # one in FRAGMENTS_PER_UNIT (a message counts once it is whole: a client that sends its
        # messages in a few pieces pays nothing more, one that cuts them in tiny ones does).
        if opcode is Opcode.TEXT:  # the first fragment of a message
            self.fragments = [frame.data]
        elif opcode is Opcode.CONT:
            fragments = self.fragments
            if fragments is None:  # the rest of a refused binary message
                self._flooding(len(frame.data))
                return
            fragments.append(frame.data)
            if len(fragments) > MAX_FRAGMENTS:
                self.fragments = None
                self.gateway.counts["too_big_closed"] += 1
                self.close(CLOSE_TOO_BIG, f"a message in more than {MAX_FRAGMENTS} fragments")
                return
            if not len(fragments) % FRAGMENTS_PER_UNIT and self._flooding(0):
                return
            if frame.fin:
                data, self.fragments = b"".join(fragments), None
                self._message(data)
        elif opcode is Opcode.BINARY:
            self.fragments = None  # (its fragments are dropped as they come)
            if not self._flooding(len(frame.data)):
                self.send(error("bad_json", "binary frames are not accepted; send JSON text"))
        elif opcode is Opcode.PONG:
            if self.ping_sent:
                self.ping_sent = 0.0
            else:
                self._flooding(len(frame.data))
        elif opcode is Opcode.PING:
            self._flooding(len(frame.data))

    def _flooding(self, size: int) -> bool:
        """Count a frame of ``size`` bytes that is not a whole message toward the rate limit;
        whether the connection is closing (for it, or already)."""
        session = self.session
        if session is None or self.closing:
            return True
        for action in session.frame_received(time.monotonic(), size):
            assert type(action) is Close
            self._close_for(action)
            return True
        return False

    def _close_for(self, action: Close) -> None:
        """Close as the session asks (counted). A flood's connection reads nothing more: what it
        sends after the close would still be read and its pings answered until the connection
        is cut, ``CLOSE_GRACE_S`` later."""
        self.gateway.counts[_CLOSE_COUNTS[action.code]] += 1
        self.close(action.code, action.reason)
        transport = self.transport
        if action.code == CLOSE_POLICY and transport is not None and transport.is_reading():
            transport.pause_reading()

    def _message(self, data: bytes) -> None:
        session = self.session
        if session is None or self.closing:
            return
        gateway = self.gateway
        try:
            for action in session.receive(data, time.monotonic()):
                kind = type(action)
                if kind is Send:
                    self.send(action.payload)
                elif kind is Subscribe:
                    gateway.subscribe(self, action.channel)
                elif kind is Unsubscribe:
                    gateway.unsubscribe(self, action.channel)
                elif kind is Submit or kind is Cancel or kind is Amend:
                    gateway.order(self, action.command, action.request_id)
                elif kind is Close:
                    self._close_for(action)  # type: ignore[arg-type]
                    return
        except Exception as e:  # noqa: BLE001 - a bug: this connection ends, said in one line; the others go on
            gateway.counts["internal_error_closed"] += 1
            log.error("connection %s: a message it sent could not be handled (%s: %.200s); closing it",
                      session.account, type(e).__name__, e)
            self.close(CLOSE_INTERNAL_ERROR, "internal error")

    # -- outgoing ----------------------------------------------------------------------------------------

    def send(self, payload: bytes) -> None:
        """Write one message (replies, order updates: never dropped)."""
        if self.transport is not None and not self.closing:
            self._write(text_frame(payload))

    def send_frames(self, frames: bytes) -> None:
        if self.transport is not None and not self.closing:
            self._write(frames)

    def _write(self, data: bytes) -> None:
        out = self.out
        if out is None:
            self.transport.write(data)  # type: ignore[union-attr]  # callers checked it
        else:
            out.append(data)

    def _write_out(self) -> None:
        out, self.out = self.out, None
        if out and self.transport is not None:
            self.transport.write(out[0] if len(out) == 1 else b"".join(out))

    def _flush_ws(self, ws: ServerProtocol) -> None:
        """Write what ``ws`` has to send; keep it only while it holds state that must last."""
        transport = self.transport
        if transport is None:
            return
        for data in ws.data_to_send():
            if data:
                self._write(data)
            else:
                self._write_out()  # what this read answered goes before the end of the stream
                # The protocol is done sending (close frame out). Half-close and go on reading
                # until the client closes its side: closing now while it still sends (say the
                # rest of a frame over the size limit) would reset the connection, and the
                # reset can destroy the close frame before the client reads it.
                self.ws = ws
                if not self.closing:
                    self.closing = True
                    asyncio.get_running_loop().call_later(CLOSE_GRACE_S, self._cut)
                if transport.can_write_eof():
                    transport.write_eof()
                else:
                    transport.close()
                return
        # Closing (a close frame sent or received, or a failed handshake). A machine still in
        # CONNECTING waits for the rest of a request that came in several reads.
        if ws.state is State.CLOSING or ws.state is State.CLOSED or ws.close_expected():
            self.ws = ws
            if not self.closing:
                self.closing = True
                asyncio.get_running_loop().call_later(CLOSE_GRACE_S, self._cut)
        elif ws.reader.buffer or ws.current_size is not None or ws.expect_continuation_frame or self.session is None:
            self.ws = ws  # mid-frame, mid-message (received or sent), or still in the handshake
        else:
            self.ws = None
            spare = self.gateway.spare_ws
            if spare is not None and spare is not ws:
                _free(spare)  # the handshake's machine of a new connection takes its place
            self.gateway.spare_ws = ws  # open and idle: any connection's next read may use it

    def ping(self, now: float) -> None:
        if self.closing or self.transport is None:
            return  # (half-closed: a write would raise)
        ws = self.ws or self._open_ws()
        try:
            ws.send_ping(secrets.token_bytes(4))
        except InvalidState:
            return
        self.ping_sent = now
        self._flush_ws(ws)

    def close(self, code: int, reason: str) -> None:
        """Start the closing handshake with ``code``; cut the connection if it does not finish."""
        if self.transport is None or self.closing:
            return
        ws = self.ws or self._open_ws()
        try:
            ws.send_close(code, reason)
        except InvalidState:
            pass
        self._flush_ws(ws)
        if not self.closing:
            self.closing = True
            asyncio.get_running_loop().call_later(CLOSE_GRACE_S, self._cut)

    def _cut(self) -> None:
        if self.transport is not None:
            self.transport.abort()


def _free(ws: ServerProtocol) -> None:
    """Let go of a state machine now, not at the collector's next full pass.

    A ``ServerProtocol`` is a reference cycle: its parser generator's frame holds it, and so
    does the traceback of the error that stopped the parser (an EOF without a close frame, the
    way most clients leave). The gateway's collector makes its full pass rarely
    (``GC_THRESHOLDS``), so every connection left dead machines behind for a long while (the
    spare its handshake's machine replaced, and the one that saw its end): about 1.9 KB each,
    15 MB after 8,000 connections closed at once (measured), which made a reconnect storm
    raise the gateway's memory per connection from 2.1 to 3.8 KB. Dropping the parser and its
    error breaks the cycle; the machine is not used again.
    """
    ws.parser_exc = None
    ws.parser = None  # type: ignore[assignment]  # the generator goes, and its frame's hold on ws


class ChannelState:
    """A subscribed channel in this gateway: its protocol ``Channel`` and its subscribers."""

    __slots__ = ("channel", "feed_seq", "first_seq", "frames", "heard_at", "lag_max_ns", "last_sent", "published",
                 "rejoined_until", "sent", "snapshot_asked", "snapshot_seq", "snapshot_taken_ns", "subscribed_at",
                 "subscribers", "trades", "updates")

    def __init__(self, channel: Channel) -> None:
        self.channel = channel
        self.subscribers: dict[Connection, None] = {}  # insertion-ordered set
        self.frames: list[bytes] = []  # framed messages of this loop turn
        self.updates = 0  # depth updates and trades among them (counted for slow consumers)
        self.trades = 0
        self.first_seq = 0  # the seq of this turn's first depth update (what a slow consumer missed from)
        self.last_sent = time.monotonic()
        self.snapshot_asked = 0.0  # when the pending snapshot request was sent (0: none pending)
        # When the topic was subscribed, until its first message shows that the publisher has
        # the subscription (0 after that); see Gateway.subscribe.
        self.subscribed_at = self.last_sent
        self.heard_at = self.last_sent  # the last message of its feed (updates and the matcher's heartbeats)
        # How the gateway sees that the matcher came back without the history it had published
        # (a wiped or new data directory) when nothing else tells it: behind a relay, whose
        # connection to the gateway never broke. Its seq starts again from 1.
        # - ``feed_seq``: the seq of the feed's last publication (-1: none since the subscription
        #   or a resync; a quiet symbol's heartbeat says 0). It only grows: one path from a
        #   matcher to here (``zmx.topology`` refuses two), in order. A seq at or below it went
        #   back; one more than a step above it shows publications lost (``_feed_gap``).
        # - ``snapshot_seq`` and ``snapshot_taken_ns``: the last snapshot's seq and when the
        #   matcher took it (its clock; 0: not said). Updates at or below that seq that come after
        #   the snapshot are expected (they were on their way), but they were stamped before it
        #   was taken; one stamped after it went back.
        self.feed_seq = -1
        self.snapshot_seq = 0
        self.snapshot_taken_ns = 0
        # Subscribed again within REJOIN_S of the unsubscription (0: not): a jump of feed_seq
        # before the subscription's answer (the matcher's heartbeat, or the jump itself) is not
        # a loss. Publications queued here before the unsubscription are still read (the topic
        # matches again), and those published while it was unsubscribed never came: a jump,
        # with nothing lost on the way (a review counted 31 "lost" publications, and fills asked
        # again, for a client that resubscribed 100 times). A jump after the answer is a loss,
        # as ever: the first heartbeat or jump ends the exemption, and so does a resync.
        self.rejoined_until = 0.0
        # this stats window (StatsWindow): publications taken, messages written to connections,
        # and the oldest a publication was when it was taken
        self.published = 0
        self.sent = 0
        self.lag_max_ns = 0

    def wrote(self, stats: StatsWindow, messages: int, connections: int) -> None:
        """A turn wrote ``messages`` of this channel to each of ``connections``: counted here and
        in the gateway's stats window."""
        sent = messages * connections
        self.sent += sent
        stats.sent += sent

    def take_turn(self, now: float) -> tuple[bytes, int, int, int]:
        """This loop turn's frames joined, with the depth updates and trades among them and
        the seq of its first depth update; the channel starts the next turn empty."""
        frames = self.frames
        blob = frames[0] if len(frames) == 1 else b"".join(frames)
        counts = self.updates, self.trades, self.first_seq
        self.frames = []
        self.updates = self.trades = 0
        self.last_sent = now
        return blob, *counts


class StatsWindow:
    """What a gateway logs every ``STATS_INTERVAL_S`` (docs/operations.md, "What the nodes say
    every 10 s"), on SIGUSR1, and as it stops.

    - ``feed_lag``: how old each publication was when this gateway took it from its SUB
      socket: the wall clock then, minus the ``ts`` the matcher stamped as it ran the command.
      It holds the rest of the matcher's batch, the way over ZeroMQ (and relays), and the wait
      in this gateway's queue while it wrote to its connections. Across hosts it holds the
      clocks' offset too (an age below 0 counts as 0).
    - ``turns``: how long each fan-out took (a loop turn's writes to every connection that has
      something). A client waits about the feed lag plus up to one turn.

    Each ``ChannelState`` counts its own publications, messages written and largest lag.
    """

    __slots__ = ("closed", "counts", "feed_lag", "opened", "published", "sent", "started", "turns")

    def __init__(self, now: float, opened: int, closed: int, counts: dict[str, int]) -> None:
        self.started = now
        self.opened = opened  # the gateway's totals as the window began
        self.closed = closed
        self.counts = dict(counts)
        self.published = 0  # publications taken (heartbeats apart)
        self.sent = 0  # channel messages written, one per connection each
        self.feed_lag = LatencyHistogram()
        self.turns = LatencyHistogram()


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _ms_figures(histogram: LatencyHistogram) -> str:
    """``p50 0.4 ms, p99 4.2 ms, max 4.7 ms``"""
    p50, p99 = histogram.percentile(50) or 0, histogram.percentile(99) or 0
    return f"p50 {p50 / 1e6:.2f} ms, p99 {p99 / 1e6:.2f} ms, max {histogram.max / 1e6:.2f} ms"


class FillsRequest:
    """A connection's fills of resting orders on one matcher's symbols, to be asked of the
    matcher after its feed was lost (``Session.begin_fill_replay``)."""

    __slots__ = ("after", "again", "conn", "due", "give_up", "lost_ns", "sent")

    def __init__(self, conn: Connection, after: dict[str, int], due: float, lost_ns: int) -> None:
        self.conn = conn
        self.after = after  # symbol -> the trade id of the last fill passed on
        self.due = due  # when to send it
        self.sent = 0.0  # when it was last sent (0: not yet)
        self.give_up = due + FILLS_GIVE_UP_S
        self.lost_ns = lost_ns  # the feed was lost at about this time (wall clock, ns)
        self.again = False  # lost again after it was sent: ask again once it is answered


class Gateway:
    """One gateway process (a worker): its WebSocket server and its ZeroMQ sockets."""

    def __init__(self, topology: Topology, node: GatewayNode, worker: int) -> None:
        self.topology = topology
        self.node = node
        self.worker = worker
        self.limits: GatewayLimits = node.limits
        self.symbols = dict(topology.symbols)
        self.account_prefix = f"{node.name}.{worker}." if node.workers > 1 else f"{node.name}."
        self.handshaking: dict[Connection, float] = {}  # -> when it connected (oldest first)
        self.connections: set[Connection] = set()
        self.behind: set[Connection] = set()
        self.accounts: dict[str, Connection] = {}
        self.channels: dict[str, ChannelState] = {}
        self.requests: OrderedDict[int, tuple[Connection, OrderCommand, object, float]] = OrderedDict()
        # requests answered unknown_outcome, oldest first: request id -> (connection, command, until when)
        self.timed_out: OrderedDict[int, tuple[Connection, OrderCommand, float]] = OrderedDict()
        self.counts: dict[str, int] = {key: 0 for key in (
            "slow_consumer", "slow_consumer_closed", "ping_timeout_closed", "rate_limit_closed", "bad_utf8_closed",
            "too_big_closed", "protocol_error_closed", "handshake_timeout_closed", "bad_publication", "bad_reply",
            "gaps", "account_frames_lost", "feed_went_back", "feed_failovers", "resyncs", "fills_replayed",
            "fills_incomplete", "fills_asked_again", "internal_errors", "orders_timed_out", "late_replies",
            "late_replies_dropped", "orders_no_router", "rejoin_jumps")}
        self._request_ids = 0
        self._fills_due = False  # a fills request made while the SUB is read, to send after its batch
        self._bad_unlogged = 0  # undecodable publications since the last one logged
        self._bad_logged_at = -BAD_LOG_S
        self._logged_at: dict[str, float] = {}  # what _log_due said last, when
        self._dirty: list[ChannelState] = []
        self._left: dict[str, float] = {}  # symbol -> when its last subscriber left (its topic unsubscribed)
        self._ping_turn = 0
        self._opened = 0  # WebSocket sessions opened and closed, since the start
        self._closed = 0
        self.stats = StatsWindow(time.monotonic(), 0, 0, self.counts)
        # connections in ping_interval_s / TICK_S slots; one slot is pinged per tick, and the
        # slot pinged ping_timeout_s ago is checked for pongs that did not come
        slots = max(1, round(self.limits.ping_interval_s / TICK_S))
        self.ping_slots: list[set[Connection]] = [set() for _ in range(slots)]
        self._ping_wait_ticks = math.ceil(self.limits.ping_timeout_s / TICK_S)
        self.server: asyncio.AbstractServer | None = None
        # ZeroMQ
        self.context = zmq.Context()
        self.sub = self.context.socket(zmq.SUB)
        self.sub.linger = 0
        self.sub.rcvhwm = HWM
        self.sub.maxmsgsize = PUBLICATION_MAX_BYTES
        watch_peer(self.sub)  # a publisher that stops answering counts as lost about 4 s later
        self.upstream_symbols: dict[str, tuple[str, ...]] = {}  # SUB endpoint -> symbols coming through it
        self.upstream_matchers: dict[str, tuple[str, ...]] = {}  # SUB endpoint -> matchers whose feed it carries
        # Each feed's ways, the one in use first (Topology.feed_paths): an upstream node, then its
        # standby nodes. endpoint -> its way's list (one list shared by the endpoints of a way).
        self.feed_paths: dict[str, list[str]] = {}
        self.feed_node: dict[str, str] = {}  # SUB endpoint -> the node that binds it
        self.symbol_way: dict[str, list[str]] = {}  # symbol -> its feed's way (way[0]: the one in use)
        ways = []
        for names in topology.feed_paths(node.name):
            way = [connect_endpoint(topology.node(name).pub) for name in names]  # type: ignore[union-attr]
            matchers = topology.matchers_behind(names[0])
            symbols = tuple(s for m in matchers for s in topology.symbols_of(m))
            for endpoint, name in zip(way, names, strict=True):
                self.upstream_symbols[endpoint] = symbols
                self.upstream_matchers[endpoint] = matchers
                self.feed_paths[endpoint] = way
                self.feed_node[endpoint] = name
            for symbol in symbols:
                self.symbol_way[symbol] = way
            ways.append(way)
        self.upstream_nodes = {way[0] for way in ways}  # the topology's upstream (the others: standby)
        # A feed is back when its ZMTP handshake is done, not at the TCP connection: a publisher
        # whose process is stopped (or hung) still has its port accept connections.
        self.monitor = self.sub.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED)
        for way in ways:
            connect(self.sub, way[0])
        self.connected_once: set[str] = set()
        # SUB endpoint -> when it was lost. A feed counts as lost from the start until its first
        # handshake: a gateway started while its upstream node is down moves to that node's
        # standby (or connects to it again, and says so) as it would had the feed been lost later.
        now = time.monotonic()
        self.feed_lost: dict[str, float] = {way[0]: now for way in ways}
        self.silent: set[str] = set()  # subscribed symbols whose feed said nothing for FEED_SILENT_S
        self.feed_retry: dict[str, float] = {}  # SUB endpoint -> when to connect to it again
        # matcher name -> when its feed, or the connection to its snapshot service, was lost (until it is back)
        self.matcher_lost: dict[str, float] = {}
        self.fills_requests: dict[tuple[str, str], FillsRequest] = {}  # (matcher name, account) -> request
        # (matcher name, account) of the fills answer being passed on: a request that the answer
        # itself leaves wanted is sent FILLS_WAIT_S later, not at once (an answer that never
        # settles it, from a matcher that lost its history or is no matcher, is not asked again
        # in a loop); one that later evidence makes goes at once, as ever
        self._answering: tuple[str, str] | None = None
        self.snapshot_up: set[str] = set()  # matchers whose snapshot service this gateway is connected to now
        # matcher name -> when to ask again for the fills that a give-up let go, its snapshot
        # service connected all along (no handshake to come, which would ask: _snapshot_service_event)
        self.fills_reask: dict[str, float] = {}
        # One DEALER per router, and each connection's orders through one of them while it is
        # up: a connection's requests reach the matcher, and its replies come back, in the order
        # it sent them (over several routers, a cancel could overtake the amend sent before it).
        self.dealers: list[zmq.Socket[bytes]] = []
        # NAME.WORKER.PID for the logs, and 48 random bits: a router's client that does not know
        # the name cannot make the router answer a request of its own to this DEALER (reply_to),
        # as its refusals of a made-up request with a guessed request id (a review did that)
        self.reply_to = f"{node.name}.{worker}.{os.getpid()}.{secrets.token_hex(6)}".encode()
        for router in topology.nodes_by_role("router"):
            assert isinstance(router, RouterNode)
            dealer = self.context.socket(zmq.DEALER)
            dealer.linger = 0
            dealer.immediate = 1  # a router that is down takes nothing: the next one is tried
            dealer.sndhwm = dealer.rcvhwm = HWM
            # ZeroMQ's pings: a router that hangs loses its connection, and its orders go to the next
            watch_peer(dealer)
            # A name of its own, which the router hands over to a new connection (ROUTER_HANDOVER),
            # and which every request names as its reply_to (``order``): a router that hung past
            # the pings answers what it held once it goes on, over the connection made again,
            # instead of to the one the pings dropped.
            dealer.routing_id = self.reply_to
            connect(dealer, connect_endpoint(router.front))
            self.dealers.append(dealer)
        self.snapshot_sockets: dict[str, zmq.Socket[bytes]] = {}  # matcher name -> DEALER to its snapshot service
        self.snapshot_renewed: dict[str, float] = {}  # matcher name -> when its DEALER was last made anew
        # matcher name -> (since when, new connections made) while its snapshot requests go unanswered
        self.snapshot_outages: dict[str, tuple[float, int]] = {}
        self.snapshot_monitors: dict[str, zmq.Socket[bytes]] = {}  # matcher name -> its DEALER's monitor
        # old snapshot DEALERs still read: (socket, when to close it, matcher name), oldest first
        self.retired_snapshot_sockets: list[tuple[zmq.Socket[bytes], float, str]] = []
        for matcher in topology.nodes_by_role("matcher"):
            assert isinstance(matcher, MatcherNode)
            self.snapshot_sockets[matcher.name] = self._snapshot_socket(matcher)
        self._readers: list[tuple[zmq.Socket[bytes], Callable[[], None]]] = []
        self.spare_ws: ServerProtocol | None = None  # see Connection._open_ws
        self._date = (0, "")  # the second and its HTTP date, for handshake responses

    # -- lifetime ---------------------------------------------------------------------------------------

    async def serve(self, stop: asyncio.Event, ready: Callable[[], None]) -> None:
        loop = asyncio.get_running_loop()
        self._watch(self.sub, self._read_sub)
        for dealer in self.dealers:
            self._watch(dealer, lambda d=dealer: self._read_replies(d))
        self._watch(self.monitor, self._read_monitor)
        for name, sock in self.snapshot_sockets.items():
            self._watch(sock, lambda s=sock: self._read_snapshots(s))
            self._monitor_snapshot_socket(name, sock)
        node = self.node
        try:
            self.server = await loop.create_server(
                lambda: Connection(self), node.host, node.port, reuse_port=node.workers > 1 or None,
                backlog=BACKLOG)
        except OSError as e:
            raise ZmxError(_cannot_listen(node, e)) from None
        ticker = loop.create_task(self._tick())
        ready()
        try:
            await stop.wait()
        finally:
            ticker.cancel()
            await self.shutdown()

    async def shutdown(self) -> None:
        self.log_stats(time.monotonic())  # the last window, with the connections it had
        if self.server is not None:
            self.server.close()
        for conn in [*self.connections, *self.handshaking]:
            if conn.session is not None:
                conn.close(CLOSE_GOING_AWAY, "gateway stopping")
            elif conn.transport is not None:
                conn.transport.abort()
        deadline = time.monotonic() + 1.0
        while (self.connections or self.handshaking) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)  # let the close frames go out
        for conn in [*self.connections, *self.handshaking]:
            conn._cut()
        loop = asyncio.get_running_loop()
        for sock, _ in self._readers:
            loop.remove_reader(sock.getsockopt(zmq.FD))
        self.sub.disable_monitor()
        for name in list(self.snapshot_monitors):
            self._unmonitor_snapshot_socket(name)
        for sock in (self.monitor, self.sub, *self.dealers, *self.snapshot_sockets.values(),
                     *(old for old, _, _ in self.retired_snapshot_sockets)):
            sock.close(linger=0)
        self.context.term()
        log.info("stopped; counts: %s", ", ".join(f"{k}={v}" for k, v in self.counts.items() if v) or "none")

    def _watch(self, sock: zmq.Socket[bytes], read: Callable[[], None]) -> None:
        """Call ``read`` whenever ``sock`` may have messages (ZeroMQ's FD is edge-triggered:
        ``read`` drains until ``zmq.Again`` or reschedules itself). The tick calls every
        reader too, so that a missed edge can never leave messages unread for long."""
        asyncio.get_running_loop().add_reader(sock.getsockopt(zmq.FD), self._run_reader, read)
        self._readers.append((sock, read))
        asyncio.get_running_loop().call_soon(self._run_reader, read)

    def _unwatch(self, sock: zmq.Socket[bytes]) -> None:
        """Undo ``_watch``: ``sock``'s reader is called no more (before the socket is closed)."""
        asyncio.get_running_loop().remove_reader(sock.getsockopt(zmq.FD))
        self._readers = [(watched, read) for watched, read in self._readers if watched is not sock]

    def _run_reader(self, read: Callable[[], None]) -> None:
        """Run a socket reader; a bug in it is logged and the reader runs again (what it had
        not read yet is still waiting, and its FD will not fire for it)."""
        try:
            read()
        except Exception:  # noqa: BLE001 - a gateway keeps serving its other clients
            self.counts["internal_errors"] += 1
            log.exception("internal error while reading a ZeroMQ socket")
            asyncio.get_running_loop().call_soon(self._run_reader, read)

    # -- connections --------------------------------------------------------------------------------------

    def http_date(self) -> str:
        """The current time as an HTTP ``Date`` value, formatted once a second (formatting it
        costs more than the rest of a handshake's response)."""
        now = int(time.time())
        second, text = self._date
        if second != now:
            text = email.utils.formatdate(now, usegmt=True)
            self._date = (now, text)
        return text

    def opened(self, conn: Connection) -> None:
        self.handshaking.pop(conn, None)
        conn.session = Session(self.account_prefix + secrets.token_hex(6), self.symbols,
                               rate_limit_per_s=self.limits.rate_limit_per_s)
        self.connections.add(conn)
        self._opened += 1
        conn.ping_slot = self._opened % len(self.ping_slots)
        self.ping_slots[conn.ping_slot].add(conn)

    def drop(self, conn: Connection) -> None:
        """``conn`` is gone: it leaves its channels; its orders stay on the books."""
        self.handshaking.pop(conn, None)
        if conn in self.connections:
            self.connections.remove(conn)
            self._closed += 1
        self.behind.discard(conn)
        self.ping_slots[conn.ping_slot].discard(conn)
        session = conn.session
        if session is None:
            return
        for channel in list(session.channels):
            self.unsubscribe(conn, channel)
        session.channels.clear()
        if conn.account_subscribed:
            self.accounts.pop(session.account, None)
            self.sub.unsubscribe(account_topic(session.account))
            self._rearm(self.sub, self._read_sub)

    # -- channels -----------------------------------------------------------------------------------------

    def subscribe(self, conn: Connection, symbol: str) -> None:
        state = self.channels.get(symbol)
        if state is None:
            # First the updates, then the snapshot (Clone pattern). A ZeroMQ subscription takes a
            # while to reach the publisher, and a snapshot taken before it arrives would be
            # followed by a gap; so the snapshot is asked when the topic's first message (the
            # heartbeat the matcher answers each subscription with, or an update) proves it
            # arrived, or after SUBSCRIBE_WAIT_S at the latest (the matcher may be down).
            state = self.channels[symbol] = ChannelState(Channel(self.symbols[symbol]))
            left = self._left.pop(symbol, None)
            if left is not None and state.subscribed_at - left < REJOIN_S:
                state.rejoined_until = state.subscribed_at + REJOIN_S
            self.sub.subscribe(topic(symbol))
            self._rearm(self.sub, self._read_sub)
        elif symbol in self.silent:
            conn.send(_silence_error(symbol))  # after its ack: the feed it joins is silent (_log_silence)
        state.subscribers[conn] = None
        if state.channel.synced:
            conn.send(state.channel.snapshot_message())

    def unsubscribe(self, conn: Connection, symbol: str) -> None:
        state = self.channels.get(symbol)
        if state is None:
            return
        state.subscribers.pop(conn, None)
        if conn.missed is not None:
            conn.missed.pop(symbol, None)
        if not state.subscribers:
            del self.channels[symbol]
            self._left[symbol] = time.monotonic()
            if self.sub.closed:  # a connection lost after shutdown closed the ZeroMQ sockets
                return
            self.sub.unsubscribe(topic(symbol))
            self._rearm(self.sub, self._read_sub)

    def _ask_snapshot(self, state: ChannelState) -> None:
        symbol = state.channel.symbol
        sock = self.snapshot_sockets[self.topology.owner_of(symbol)]
        try:
            sock.send_multipart((b"SNAP", symbol.encode()), zmq.NOBLOCK)
        except zmq.Again:
            pass  # retried by the tick
        state.snapshot_asked = time.monotonic()
        self._rearm(sock, lambda: self._read_snapshots(sock))

    def _snapshot_socket(self, matcher: MatcherNode) -> zmq.Socket[bytes]:
        sock = self.context.socket(zmq.DEALER)
        sock.linger = 0
        sock.maxmsgsize = SNAPSHOT_MAX_BYTES
        watch_peer(sock)  # a matcher cut off is seen as gone (its monitor), and back within a second
        connect(sock, connect_endpoint(matcher.snapshot))
        return sock

    def _renew_snapshot_socket(self, name: str) -> None:
        """A snapshot request of matcher ``name`` went unanswered: ask on a new connection, at
        most once per ``SNAPSHOT_RETRY_S``. ZeroMQ gives a connection up for good after a
        protocol error (a reply over ``maxmsgsize``, a broken stream), and a DEALER has no other
        way to say so; a matcher that is merely down costs a new socket every few seconds. The old
        one is still read for ``SNAPSHOT_RETIRE_S`` (the last ``SNAPSHOT_RETIRED_MAX`` of a matcher
        only), so that a matcher slower than ``SNAPSHOT_RETRY_S`` to answer is still heard."""
        now = time.monotonic()
        last = self.snapshot_renewed.get(name)
        if last is not None and now - last < SNAPSHOT_RETRY_S:
            return
        self.snapshot_renewed[name] = now
        # Said once an outage: a matcher that stays down would otherwise put a line in the log
        # every SNAPSHOT_RETRY_S for as long as a client holds one of its channels. An outage
        # is a run of renewals that follow on (the tick renews at most every SNAPSHOT_RETRY_S);
        # the answer that ends it is said too (_snapshot_reply).
        outage = self.snapshot_outages.get(name)
        if outage is None or last is None or now - last > 2 * SNAPSHOT_RETRY_S + 1.0:
            self.snapshot_outages[name] = (now - SNAPSHOT_RETRY_S, 1)
            log.info("snapshot request to %s unanswered for %g s: asking on a new connection, and again every %g s "
                     "until it answers", name, SNAPSHOT_RETRY_S, SNAPSHOT_RETRY_S)
        else:
            self.snapshot_outages[name] = (outage[0], outage[1] + 1)
        retired = self.retired_snapshot_sockets
        self._unmonitor_snapshot_socket(name)
        self.snapshot_up.discard(name)  # until the new connection's handshake
        retired.append((self.snapshot_sockets[name], now + SNAPSHOT_RETIRE_S, name))
        own = [entry for entry in retired if entry[2] == name]
        for entry in own[:-SNAPSHOT_RETIRED_MAX]:
            retired.remove(entry)
            self._close_snapshot_socket(entry[0])
        matcher = self.topology.node(name)
        assert isinstance(matcher, MatcherNode)
        sock = self.snapshot_sockets[name] = self._snapshot_socket(matcher)
        self._watch(sock, lambda: self._read_snapshots(sock))
        self._monitor_snapshot_socket(name, sock)

    def _monitor_snapshot_socket(self, name: str, sock: zmq.Socket[bytes]) -> None:
        """Watch the connection of matcher ``name``'s snapshot DEALER: it is the gateway's own
        line to the matcher, so it shows a matcher that restarted behind a relay, whose feed
        to the gateway never broke (``_read_snapshot_monitor``)."""
        monitor = sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED)
        self.snapshot_monitors[name] = monitor
        self._watch(monitor, lambda: self._read_snapshot_monitor(name, monitor))

    def _unmonitor_snapshot_socket(self, name: str) -> None:
        monitor = self.snapshot_monitors.pop(name)
        self._unwatch(monitor)
        self.snapshot_sockets[name].disable_monitor()
        monitor.close(linger=0)

    def _read_snapshot_monitor(self, name: str, monitor: zmq.Socket[bytes]) -> None:
        self._drain_monitor(monitor, lambda event, _: self._snapshot_service_event(name, event),
                            lambda: self._read_snapshot_monitor(name, monitor))

    def _snapshot_service_event(self, name: str, event: int) -> None:
        """A matcher whose snapshot service was lost and is back may have restarted: the fills
        of resting orders it published before the relays' subscriptions reached it again are
        lost to their owners, and asked of it (``_ask_fills``); and its channels are synced
        again, as a feed straight from it does when it comes back (``_feed_event``). Behind a
        relay whose feed never broke, a matcher that came back without its history is seen by
        its seq going back, but not if it was at the same seq again by the time the relay's
        subscription reached it: its book is another one all the same."""
        now = time.monotonic()
        if event == zmq.EVENT_DISCONNECTED:
            self.snapshot_up.discard(name)
            log.info("lost the connection to %s's snapshot service", name)
            self.matcher_lost.setdefault(name, now)
            self._feed_lost(name)  # it may be restarting: what it publishes before the feed reaches it is lost
        elif event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
            self.snapshot_up.add(name)
            if name not in self.matcher_lost:
                return
            log.info("connected to %s's snapshot service again; resyncing its channels", name)
            self._resync_held(self.topology.symbols_of(name),
                              f"{name}'s snapshot service is back: the matcher may have restarted")
            self._ask_fills(name, self.matcher_lost.pop(name), now)

    def _read_snapshots(self, sock: zmq.Socket[bytes]) -> None:
        if sock.closed:
            return  # a retired connection, closed meanwhile; a read of it was still scheduled
        for _ in range(64):
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            self._snapshot_reply(frames)
        self._rearm(sock, lambda: self._read_snapshots(sock))

    def _snapshot_reply(self, frames: list[bytes]) -> None:
        if len(frames) != 3:
            self.counts["bad_reply"] += 1
            return
        kind, symbol_bytes, body = frames
        if kind == b"FILLS":
            self._fills_reply(symbol_bytes, body)
            return
        if kind == b"ERR" and self.fills_requests and self._fills_refused(symbol_bytes, body):
            return
        state = self.channels.get(symbol_bytes.decode("ascii", errors="replace"))
        if state is None or not state.snapshot_asked:
            return  # nobody holds the channel any more, or it is synced already
        symbol = state.channel.symbol
        owner = self.topology.owner_of(symbol)
        outage = self.snapshot_outages.pop(owner, None)
        if outage is not None:
            log.info("%s answered a snapshot request again, after %.1f s and %d new connection(s)", owner,
                     time.monotonic() - outage[0], outage[1])
        if kind != b"SNAP":
            log.warning("%s: snapshot refused: %s", symbol, body[:MESSAGE_SHOWN].decode("utf-8", errors="replace"))
            return  # asked again by the tick
        try:
            seq, levels, when = read_snapshot(body)
        except (ValueError, TypeError, msgpack.UnpackException) as e:
            log.warning("%s: undecodable snapshot: %s", symbol, str(e) or type(e).__name__)
            self.counts["bad_reply"] += 1
            return
        try:
            message = state.channel.load_snapshot(seq, *levels, changed_ns=when[1] if len(when) == 2 else None)
        except SequenceGap as e:
            log.info("%s: snapshot at seq %d does not reach the buffered updates (%s); asking again", symbol,
                     seq, e)
            self._ask_snapshot(state)
            return
        if state.channel.seq is not None and state.channel.seq < state.feed_seq:
            # Older than what the feed showed since the channel was opened: the answer to a
            # request of the channel held before (its last client left and another came while
            # the book was on its way). Loaded, it would be a book that misses what came between.
            # The channel's own request is usually on its way, and its answer is loaded as it
            # comes; if none comes, the tick asks again as for an unanswered request (not at once:
            # a matcher that answers with an old book every time would be asked in a loop).
            log.info("%s: a book at seq %d came after the feed here showed seq %d: the answer to an earlier "
                     "request; waiting for the answer to the last one", symbol, seq, state.feed_seq)
            state.channel.reset()
            return
        state.snapshot_asked = 0.0
        state.snapshot_seq, state.snapshot_taken_ns = (seq, when[0]) if when else (0, 0)
        frame = text_frame(message)
        for conn in state.subscribers:
            if conn.behind:
                self._miss(conn, symbol, 0, state.channel.seq, 0, 0)
            else:
                conn.send_frames(frame)
        state.last_sent = time.monotonic()

    def _resync_held(self, symbols: Iterable[str], why: str) -> None:
        """Resync the channels of ``symbols`` that this gateway holds."""
        for symbol in symbols:
            state = self.channels.get(symbol)
            if state is not None:
                self._resync(state, why)

    def _resync(self, state: ChannelState, why: str) -> None:
        self.counts["resyncs"] += 1
        log.info("%s: resync (%s)", state.channel.symbol, why)
        state.channel.reset()
        state.snapshot_asked = 0.0
        state.subscribed_at = time.monotonic()  # the subscription is sent again on reconnection
        state.feed_seq, state.snapshot_seq = -1, 0  # a restarted publisher may go on from any seq
        state.rejoined_until = 0.0

    # -- market data --------------------------------------------------------------------------------------

    def _read_sub(self) -> None:
        sub = self.sub
        channels = self.channels
        dirty = self._dirty
        stats = self.stats
        feed_lag, time_ns = stats.feed_lag.add, time.time_ns
        now = time.monotonic()
        for _ in range(SUB_BATCH):
            try:
                frame = sub.recv(zmq.NOBLOCK)
            except zmq.Again:
                break
            try:
                name, events, counted = codec.decode_counted_publication(frame, PUBLICATION_MAX_BYTES)
            except DecodeError as e:
                self._bad_publication(e)
                continue
            if is_private(name):
                conn = self.accounts.get(name[1:])
                if conn is not None and conn.session is not None:
                    if counted is not None and events:
                        self._account_frame(conn, conn.session, events[0].symbol, counted)  # type: ignore[union-attr]
                    self._deliver(conn, conn.session.on_private(events))
                continue
            state = channels.get(name)
            if state is None:
                continue  # unsubscribed a moment ago
            beat = False
            if events:
                last = events[-1]
                beat = type(last) is FeedHeartbeat
                # A heartbeat is at the seq of its symbol's last publication: it is checked as the
                # publication after it would be.
                seq = last.seq + 1 if beat else last.seq
                if seq <= state.feed_seq or seq <= state.snapshot_seq and last.ts_ns > state.snapshot_taken_ns:
                    self._went_back(state, last.seq)  # see ChannelState.feed_seq
                else:
                    jump = seq > state.feed_seq + 1 and state.feed_seq >= 0
                    if jump:
                        if state.rejoined_until and now < state.rejoined_until:
                            self.counts["rejoin_jumps"] += 1  # the time it was not subscribed (REJOIN_S)
                        else:
                            self._feed_gap(state, seq)
                    if jump or beat:
                        state.rejoined_until = 0.0  # the subscription's answer, or its jump, came
                    if beat:
                        self._heartbeat_ahead(state, last.seq)
                state.feed_seq = last.seq
            state.heard_at = now
            if state.subscribed_at:
                state.subscribed_at = 0.0
                self._ask_snapshot(state)
            if beat or not events:
                continue  # the matcher's heartbeat (an empty one has no seq)
            lag = time_ns() - last.ts_ns
            feed_lag(lag)
            stats.published += 1
            state.published += 1
            if lag > state.lag_max_ns:
                state.lag_max_ns = lag
            try:
                messages = state.channel.publish(events)
            except SequenceGap as e:  # (counted, and its fills asked for, by _feed_gap)
                log.info("%s: the book here needs a snapshot: %s", name, e)
                state.channel.reset()
                self._ask_snapshot(state)
                continue
            if messages:
                if not state.frames:
                    dirty.append(state)
                if not state.updates:
                    state.first_seq = events[-1].seq
                state.frames.extend(map(text_frame, messages))
                state.updates += 1  # a publication is its trades, then one depth update
                state.trades += len(messages) - 1
        else:
            self._rearm(sub, self._read_sub)
        if self._fills_due:
            self._fills_due = False
            self._send_fills_requests(time.monotonic())
        if dirty:
            self._fan_out()

    def _heartbeat_ahead(self, state: ChannelState, seq: int) -> None:
        """The matcher's heartbeat of an idle symbol says it is at ``seq``. Above the channel's
        book, a publication was lost on its way here (``_feed_gap`` counted it), and nothing
        else would tell until the market moves again: a resync."""
        book = state.channel.seq
        if book is not None and seq > book:
            self._resync(state, f"the book is at seq {book}, the matcher's heartbeat at {seq}")

    def _feed_gap(self, state: ChannelState, seq: int) -> None:
        """Publication ``seq`` (a heartbeat: one past its seq) came after ``state.feed_seq``: the
        ones between were lost (a high-water mark), whatever the book here: a snapshot taken
        ahead of the feed holds what they did to the book, but not the fills that went with
        them. The book resyncs if it needs to (``SequenceGap``, ``_heartbeat_ahead``)."""
        self.counts["gaps"] += 1
        first, last = state.feed_seq + 1, seq - 1
        log.warning("%s: %s lost on %s way here", state.channel.symbol,
                    f"publication {first} was" if first == last else f"publications {first} to {last} were",
                    "its" if first == last else "their")
        self._fills_lost_in_gap(state.channel.symbol, state.feed_seq, time.monotonic())

    def _fills_lost_in_gap(self, symbol: str, seq: int, now: float) -> None:
        """The feed of ``symbol`` lost publications after ``seq``: fills of resting orders may
        have been lost with them, and some made after them may have come (an account's fills
        follow their command's public part): every connection asks the matcher from below
        those (``Session.fills_lost_after``)."""
        for conn in self.accounts.values():
            if conn.session is not None:
                conn.session.fills_lost_after(symbol, seq)
        self._ask_fills(self.topology.owner_of(symbol), now - FEED_SILENT_S, now)

    def _went_back(self, state: ChannelState, seq: int) -> None:
        """The feed of ``state``'s symbol went back to ``seq``: its matcher lost its history, and
        its book is not the mirror's any more. The publication being read is the new matcher's
        first one here; the resync buffers it for the snapshot it asks."""
        self.counts["feed_went_back"] += 1
        log.warning("%s: the feed went back to seq %d (it was at %d): its matcher restarted without its history",
                    state.channel.symbol, seq, max(state.feed_seq, state.snapshot_seq))
        for conn in self.accounts.values():
            if conn.session is not None:
                conn.session.forget_fills(state.channel.symbol)  # its trade ids start again too
        self._resync(state, "the feed's seq went back")

    def _bad_publication(self, error: DecodeError) -> None:
        """Drop and count an undecodable publication. The first of each ``BAD_LOG_S`` is logged
        with what is wrong with it, the ones after it in one line at a later tick: a publisher
        that sends garbage must not flood the log."""
        self.counts["bad_publication"] += 1
        now = time.monotonic()
        if now - self._bad_logged_at >= BAD_LOG_S:
            self._bad_logged_at = now
            log.warning("dropped an undecodable publication: %s", error)
        else:
            self._bad_unlogged += 1

    def _fan_out(self) -> None:
        """Write this turn's channel bytes (``_write_turn``), timed for the stats."""
        started = time.perf_counter_ns()
        self._write_turn()
        self.stats.turns.add(time.perf_counter_ns() - started)

    def _write_turn(self) -> None:
        """Write this turn's channel bytes: one write per connection."""
        now = time.monotonic()
        dirty = self._dirty
        stats = self.stats
        if len(dirty) == 1:  # one busy channel (the usual case): no per-connection joining
            state = dirty.pop()
            blob, updates, trades, first = state.take_turn(now)
            skipped = 0
            for conn in state.subscribers:
                if conn.behind or conn.closing:
                    skipped += 1
                    if conn.behind and (updates or trades):  # a heartbeat alone is nothing missed
                        self._miss(conn, state.channel.symbol, first, state.channel.seq, updates, trades)
                else:
                    conn.transport.write(blob)  # type: ignore[union-attr]  # subscribers are connected
            state.wrote(stats, updates + trades, len(state.subscribers) - skipped)
            return
        touched: list[Connection] = []
        for state in dirty:
            blob, updates, trades, first = state.take_turn(now)
            skipped = 0
            for conn in state.subscribers:
                if conn.behind or conn.closing:
                    skipped += 1
                    if conn.behind and (updates or trades):
                        self._miss(conn, state.channel.symbol, first, state.channel.seq, updates, trades)
                    continue
                out = conn.out
                if out is None:
                    conn.out = [blob]
                    touched.append(conn)
                else:
                    out.append(blob)
            state.wrote(stats, updates + trades, len(state.subscribers) - skipped)
        dirty.clear()
        for conn in touched:
            out = conn.out
            conn.out = None
            transport = conn.transport
            if transport is not None and not conn.closing:
                transport.write(out[0] if len(out) == 1 else b"".join(out))  # type: ignore[index]

    def _miss(self, conn: Connection, symbol: str, first: int, seq: int | None, updates: int,
              trades: int) -> None:
        """``conn`` is behind: a turn of ``symbol`` (its depth updates from seq ``first`` to
        ``seq``) is dropped for it, and counted for its ``slow_consumer`` error."""
        missed = conn.missed
        if missed is None:
            missed = conn.missed = {}
        entry = missed.get(symbol)
        if entry is None:
            missed[symbol] = [updates, trades, first or seq or 0, seq or 0]
        else:
            entry[0] += updates
            entry[1] += trades
            entry[3] = seq or entry[3]

    def caught_up(self, conn: Connection) -> None:
        """``conn`` drained below the low-water mark: what it missed, then fresh snapshots."""
        missed, conn.missed = conn.missed, None
        if not missed:
            return
        self.counts["slow_consumer"] += 1
        log.info("%s fell behind and caught up: fresh snapshots of %s", conn.session.account if conn.session else "?",
                 ", ".join(missed))
        for symbol, (updates, trades, first, last) in missed.items():
            state = self.channels.get(symbol)
            conn.send(error("slow_consumer", f"this connection fell behind on {symbol}: {updates} depth updates "
                            f"and {trades} trades were dropped; a fresh depth_snapshot follows", channel=symbol,
                            data={"missed_updates": updates, "missed_trades": trades, "from_seq": first,
                                  "to_seq": last}))
            if state is not None and state.channel.synced:
                conn.send(state.channel.snapshot_message())

    def _drain_monitor(self, monitor: zmq.Socket[bytes], handle: Callable[[int, str], None],
                       reader: Callable[[], None]) -> None:
        """Hand each event waiting on a socket monitor to ``handle(event, endpoint)``, at most
        64 a turn (``reader`` reads the rest at the next one)."""
        if monitor.closed:
            return  # unmonitored meanwhile; a read of it was still scheduled
        for _ in range(64):
            try:
                message = recv_monitor_message(monitor, zmq.NOBLOCK)
            except zmq.Again:
                return
            except RuntimeError:  # not a monitor event (pyzmq's check): skipped
                continue
            handle(message["event"], message["endpoint"].decode(errors="replace"))
        self._rearm(monitor, reader)

    def _read_monitor(self) -> None:
        self._drain_monitor(self.monitor, self._feed_event, self._read_monitor)

    def _feed_event(self, event: int, endpoint: str) -> None:
        """A connection of the SUB to a publisher was lost, or made (again)."""
        way = self.feed_paths.get(endpoint)
        if way is not None and way[0] != endpoint:
            return  # a way this gateway left for a standby (its last events may still come)
        now = time.monotonic()
        if event == zmq.EVENT_DISCONNECTED:
            log.warning("lost the feed from %s", endpoint)
            self.feed_lost[endpoint] = now
            for matcher in self.upstream_matchers.get(endpoint, ()):
                self.matcher_lost.setdefault(matcher, now)
                self._feed_lost(matcher)
        elif event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
            since = self.feed_lost.pop(endpoint, None)
            warned = self.feed_retry.pop(endpoint, None) is not None
            if endpoint not in self.connected_once and warned and since is not None:
                log.info("feed from %s connected, %.1f s after the gateway began to wait for it", endpoint,
                         now - since)  # after "no feed from ...": the word that it came
            if endpoint in self.connected_once:
                # Reconnected: the publisher may have restarted, what it sent meanwhile is lost.
                log.info("feed from %s is back; resyncing its channels", endpoint)
                self._resync_held(self.upstream_symbols.get(endpoint, ()), f"reconnected to {endpoint}")
                for matcher in self.upstream_matchers.get(endpoint, ()):
                    self._ask_fills(matcher, self.matcher_lost.pop(matcher, now), now)
            self.connected_once.add(endpoint)

    # -- orders ---------------------------------------------------------------------------------------------

    def order(self, conn: Connection, command: OrderCommand, request_id: object) -> None:
        session = conn.session
        assert session is not None
        if type(command) is SubmitOrder and not conn.account_subscribed:
            conn.account_subscribed = True
            self.accounts[session.account] = conn
            self.sub.subscribe(account_topic(session.account))
        self._request_ids += 1
        rid = self._request_ids
        frames = (encode_header(rid, command.symbol), codec.encode(command), self.reply_to)
        dealers = self.dealers
        first = hash(session.account) % len(dealers)  # this connection's router, while it is up
        for n in range(len(dealers)):
            dealer = dealers[(first + n) % len(dealers)]
            try:
                dealer.send_multipart(frames, zmq.NOBLOCK)
                break
            except zmq.Again:
                continue
        else:
            self.counts["orders_no_router"] += 1
            if self._log_due("no router"):
                log.warning("no router is connected: orders are refused unavailable (%d so far)",
                            self.counts["orders_no_router"])
            self._deliver(conn, session.on_reply(command, request_id, "unavailable", (), "no router is connected"))
            return
        self.requests[rid] = (conn, command, request_id, time.monotonic() + self.limits.order_timeout_s)
        self._rearm(dealer, lambda: self._read_replies(dealer))
        self._rearm(self.sub, self._read_sub)

    def _read_replies(self, dealer: zmq.Socket[bytes]) -> None:
        for _ in range(1024):
            try:
                frames = dealer.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            reply = parse_reply(frames)
            if reply is None:
                self.counts["bad_reply"] += 1
                continue
            entry = self.requests.pop(reply.request_id, None)
            if entry is None:
                self._late_reply(reply)
                continue
            conn, command, request_id, _ = entry
            if conn.session is None or conn.transport is None:
                continue
            if _unreadable(reply, command):
                self.counts["bad_reply"] += 1
                payloads = conn.session.on_reply(command, request_id, "unknown_outcome", (),
                                                 "the reply could not be read; the outcome is unknown")
            else:
                payloads = conn.session.on_reply(command, request_id, reply.status, reply.events, reply.message)
            self._deliver(conn, payloads)
        self._rearm(dealer, lambda: self._read_replies(dealer))

    def _late_reply(self, reply: Reply) -> None:
        """The reply to a request answered ``unknown_outcome`` already: what it shows goes to
        the connection all the same, without the request's ``id`` (docs/protocol.md, "Orders").
        A reply that cannot be read leaves the outcome unknown, as it was."""
        late = self.timed_out.pop(reply.request_id, None)
        if late is None or late[0].session is None or late[0].transport is None:
            self.counts["late_replies_dropped"] += 1  # its connection closed, or past LATE_REPLY_KEEP_S
            return
        conn, command, _ = late
        session = conn.session
        assert session is not None
        if _unreadable(reply, command):
            self.counts["bad_reply"] += 1
            return
        self.counts["late_replies"] += 1
        if self._log_due("late reply"):  # a hung router holds many
            log.info("the answer (%s) to %s %s on %s came after its client was told the outcome is unknown; "
                     "passed on (late answers so far: %d)", reply.status, type(command).__name__,
                     command.order_id, command.symbol, self.counts["late_replies"])
        self._deliver(conn, session.on_reply(command, None, reply.status, reply.events, reply.message, late=True))

    def _log_due(self, what: str) -> bool:
        """Whether a line about ``what`` may be logged now: one a ``BAD_LOG_S`` at most (the
        lines carry counts of what went unsaid)."""
        now = time.monotonic()
        if now - self._logged_at.get(what, -BAD_LOG_S) < BAD_LOG_S:
            return False
        self._logged_at[what] = now
        return True

    def _deliver(self, conn: Connection, payloads: list[bytes]) -> None:
        """Send a session's answer to the cluster; if its order's own events proved fills
        missing (``Session.fills_wanted``), ask the matcher for them."""
        for payload in payloads:
            conn.send(payload)
        session = conn.session
        if session is None or not session.fills_wanted:
            return
        now = time.monotonic()
        for matcher in {self.topology.owner_of(symbol) for symbol in session.fills_wanted}:
            self._ask_now(conn, session, matcher, now)
        self._send_fills_requests(now)

    def _ask_now(self, conn: Connection, session: Session, matcher: str, now: float) -> None:
        """Ask ``matcher`` at once for the fills ``session`` wants (``begin_fill_replay``); if the
        answer being passed on is what left them wanted, FILLS_WAIT_S later."""
        old = self.fills_requests.get((matcher, session.account))
        if old is None:
            wait = FILLS_WAIT_S if self._answering == (matcher, session.account) else 0.0
            if wait:
                self.counts["fills_asked_again"] += 1
                if self._log_due("fills asked again"):
                    log.info("%s: the answer of %s left fills wanted; asking again in %.1f s (so far: %d)",
                             session.account, matcher, wait, self.counts["fills_asked_again"])
            self._ask_account_fills(matcher, session.account, conn, time.time_ns(), now, wait=wait)
        elif old.sent:
            old.again = True  # asked again once it is answered, from the trade id wanted
        else:
            self._ask_lower(old, session, matcher)

    def _account_frame(self, conn: Connection, session: Session, symbol: str,
                       counted: tuple[int, int, int]) -> None:
        """A counted frame ``(epoch, start, n)`` of the connection's account
        (``codec.decode_counted_publication``) from the matcher of ``symbol``, before its events
        are taken: if the account's frames from that matcher skip a number, the feed lost one (a
        high-water mark drops single messages, a private frame too while its command's public
        one came), and the fills it held are asked for from what was passed on before this
        frame. A new count (another epoch or start) goes from 1: frames of it before the first
        one seen here were lost, or went out before the account's subscription reached the
        matcher (an account is new with its connection, and is subscribed with its first
        order, which can be faster); a resting order's fill among them would never come."""
        matcher = self.topology.owners.get(symbol)
        if matcher is None:
            return
        seen = conn.frames_from
        if seen is None:
            seen = conn.frames_from = {}
        last = seen.get(matcher)
        n = counted[2]
        if last is not None and last[:2] == counted[:2]:
            if n <= last[2]:
                return  # one that came late or again (from a relay the feed left for its standby)
            lost = n - last[2] - 1
        else:
            lost = n - 1  # a new count: the account's first frames here, a new epoch, a count let go
        seen[matcher] = counted
        if lost:
            self.counts["account_frames_lost"] += lost
            session.fills_lost(self.topology.symbols_of(matcher))
            self._ask_now(conn, session, matcher, time.monotonic())
            self._fills_due = True  # sent once the SUB's batch is read (_read_sub)

    def _ask_lower(self, request: FillsRequest, session: Session, matcher: str) -> None:
        """``request`` is not sent yet: it asks from the lower trade ids that ``session`` wants
        now (``begin_fill_replay`` takes them)."""
        for symbol, after in (session.begin_fill_replay(self.topology.symbols_of(matcher)) or {}).items():
            request.after[symbol] = min(after, request.after.get(symbol, after))

    # -- fills a lost feed did not bring (docs/protocol.md, "Orders") -------------------------------------

    def _ask_fills(self, matcher: str, lost: float, now: float) -> None:
        """The feed of ``matcher`` was lost at about ``lost`` (monotonic) and is back: every
        connection that placed orders on its symbols asks it for the fills of its resting orders
        made meanwhile (they came only through the feed), ``FILLS_WAIT_S`` from now."""
        # the feed may have gone silent a ping's timeout before it was found lost
        lost_ns = time.time_ns() - int((now - lost + (PING_IVL_MS + PING_TIMEOUT_MS) / 1000) * 1e9)
        for account, conn in self.accounts.items():
            old = self.fills_requests.get((matcher, account))
            if old is None:
                self._ask_account_fills(matcher, account, conn, lost_ns, now)
            else:  # one is on its way: it covers this loss, or (sent already) another one follows its answer
                old.lost_ns = min(old.lost_ns, lost_ns)
                if conn.session is None:
                    continue
                if old.sent:
                    # from no higher than that one asked: its answer may have been made before this
                    # loss, and live fills passed on with it would raise the trade ids above it
                    old.again = True
                    conn.session.fills_lost(self.topology.symbols_of(matcher))
                else:
                    self._ask_lower(old, conn.session, matcher)  # what the loss wants asked (_feed_lost)

    def _feed_lost(self, matcher: str) -> None:
        """The feed of ``matcher`` was cut: the fills it publishes now do not come. Once it is
        back, every connection asks for them (``_ask_fills``) from no higher than what it has
        passed on now, whichever live fills come before it asks."""
        symbols = self.topology.symbols_of(matcher)
        for conn in self.accounts.values():
            if conn.session is not None:
                conn.session.fills_lost(symbols)

    def _ask_account_fills(self, matcher: str, account: str, conn: Connection, lost_ns: int, now: float,
                           wait: float = FILLS_WAIT_S) -> None:
        session = conn.session
        after = session.begin_fill_replay(self.topology.symbols_of(matcher)) if session is not None else None
        if after is not None:
            self.fills_requests[(matcher, account)] = FillsRequest(conn, after, now + wait, lost_ns)

    def _send_fills_requests(self, now: float) -> None:
        for matcher, due in list(self.fills_reask.items()):
            if now >= due:
                del self.fills_reask[matcher]
                if matcher in self.matcher_lost:  # no handshake has asked since
                    log.info("asking %s again for the fills it did not give (its snapshot service stayed connected)",
                             matcher)
                    self._ask_fills(matcher, self.matcher_lost.pop(matcher), now)
        for (matcher, account), request in list(self.fills_requests.items()):
            if request.conn.session is None or request.conn.transport is None:
                del self.fills_requests[(matcher, account)]  # the connection is gone
            elif now >= request.give_up:
                del self.fills_requests[(matcher, account)]
                self.counts["fills_incomplete"] += 1
                log.warning("%s: no answer from %s about the fills its feed lost, in %g s; asked again once its "
                            "snapshot service is connected again, or in %g s if it is", account, matcher,
                            FILLS_GIVE_UP_S, FILLS_GIVE_UP_S)
                # The matcher may be cut off from this gateway alone (its feed comes through a relay):
                # the next handshake with its snapshot service asks every connection's fills again
                # (_snapshot_service_event), and the client is told meanwhile. If it is connected
                # (the matcher is busy, or its answer was lost), a timer asks (fills_reask).
                self.matcher_lost.setdefault(matcher, now - (time.time_ns() - request.lost_ns) / 1e9)
                if matcher in self.snapshot_up:
                    self.fills_reask.setdefault(matcher, now + FILLS_GIVE_UP_S)
                symbols = sorted(request.after)
                request.conn.send(error(
                    "unavailable", f"fills of this connection's resting orders on {', '.join(symbols)} that the "
                    f"gateway's feed lost could not be asked of their matcher (no answer in {FILLS_GIVE_UP_S:g} s); "
                    "they come once it answers", symbols=symbols))
                if request.conn.session is not None:
                    request.conn.session.fills_lost(request.after)  # asked again from no higher than now
                self._end_fills_request(request, ())
            elif now >= request.due and (not request.sent or now - request.sent >= SNAPSHOT_RETRY_S):
                if request.sent:
                    self._renew_snapshot_socket(matcher)
                request.sent = now
                sock = self.snapshot_sockets[matcher]
                try:
                    sock.send_multipart((b"FILLS", account.encode(), msgpack.packb(request.after)), zmq.NOBLOCK)
                except zmq.Again:
                    continue  # sent again at the next retry
                self._rearm(sock, lambda sock=sock: self._read_snapshots(sock))

    def _fills_reply(self, account_bytes: bytes, body: bytes) -> None:
        account = account_bytes.decode("utf-8", errors="replace")
        try:
            # then the seqs the answer is whole up to and the trade ids it answers, each left out
            # by older matchers, and whatever a later matcher adds (docs/wire.md)
            matcher, complete_since_ns, publication, *more = msgpack.unpackb(body)
            request = self.fills_requests.get((matcher, account))
            if request is None:
                return  # answered already (asked twice), or the connection is gone
            name, events = codec.decode_publication(publication, SNAPSHOT_MAX_BYTES)
            if name != "@" + account or type(complete_since_ns) is not int:
                raise ValueError(f"an answer about {name}, complete since {complete_since_ns!r}")
            upto = more[0] if more else None
            if upto is not None and (type(upto) is not dict or not all(
                    type(s) is str and type(q) is int for s, q in upto.items())):
                raise ValueError(f"after the fills, a map of symbol to seq, got {upto!r}"[:200])
            asked = more[1] if len(more) > 1 else None
        except (ValueError, TypeError, DecodeError, msgpack.UnpackException) as e:
            log.warning("undecodable answer about the fills of %s: %s", account, e)
            self.counts["bad_reply"] += 1
            return
        if asked is not None and asked != request.after:
            # the late answer to an earlier request (sent again on a connection since retired):
            # its fills start after other trade ids; this request waits for its own answer
            log.info("%s: a late answer from %s to an earlier request for its fills (after %s, now %s): dropped",
                     account, matcher, asked, request.after)
            return
        del self.fills_requests[(matcher, account)]
        fills = [e for e in events if type(e) is OrderFilled and e.symbol in request.after]
        self._answering = (matcher, account)
        try:
            self._end_fills_request(request, fills, upto)
        finally:
            self._answering = None
        if fills:  # counted, not logged at info: on a busy gateway a cancel often overtakes its order's fill
            self.counts["fills_replayed"] += len(fills)
            log.debug("%s: %s sent %d fill(s) of resting orders that its feed lost", account, matcher, len(fills))
        if complete_since_ns > request.lost_ns:
            self.counts["fills_incomplete"] += 1
            log.warning("%s: %s holds fills since %.1f s after its feed was lost only; older ones may be missing",
                        account, matcher, (complete_since_ns - request.lost_ns) / 1e9)
        if request.again and (matcher, account) not in self.fills_requests:
            # (a request made while the answer was passed on, for fills it showed missing, asks
            # from lower trade ids already: it covers this one)
            self._ask_account_fills(matcher, account, request.conn, time.time_ns(), time.monotonic())

    def _fills_refused(self, account_bytes: bytes, message: bytes) -> bool:
        """An ``ERR`` answer about an account with a fills request on its way (a matcher that
        does not know ``FILLS``, or a request over its limits): asking again would not help, so
        what was held for the request goes out now. False if it is not about such an account."""
        account = account_bytes.decode("utf-8", errors="replace")
        refused = [key for key, request in self.fills_requests.items() if key[1] == account and request.sent]
        for key in refused:
            request = self.fills_requests.pop(key)
            self.counts["fills_incomplete"] += 1
            log.warning("%s: %s refused the request for the fills its feed lost: %s", account, key[0],
                        message[:MESSAGE_SHOWN].decode("utf-8", errors="replace"))
            self._end_fills_request(request, ())
        return bool(refused)

    def _end_fills_request(self, request: FillsRequest, fills: list[OrderFilled] | tuple[()],
                           upto: dict[str, int] | None = None) -> None:
        """Pass on ``fills`` (the matcher's answer, whole up to the seqs ``upto``; or nothing)
        with what was held for ``request``."""
        conn = request.conn
        if conn.session is not None and conn.transport is not None:
            self._deliver(conn, conn.session.end_fill_replay(request.after, fills, upto))

    # -- housekeeping -------------------------------------------------------------------------------------

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(TICK_S)
            for _, read in self._readers:
                self._run_reader(read)
            try:
                self._housekeeping(time.monotonic())
            except Exception:  # noqa: BLE001 - the next tick must still come
                self.counts["internal_errors"] += 1
                log.exception("internal error in the gateway's housekeeping")

    def _reconnect_feed(self, endpoint: str) -> None:
        """Connect the SUB to ``endpoint`` afresh. ZeroMQ connects a dropped connection again by
        itself, except one it dropped for a protocol error (a frame over ``maxmsgsize``, a broken
        stream): that one it gives up for good, and the channels behind it would go quiet for
        ever. Once back, the feed's channels resync (``_read_monitor``)."""
        with contextlib.suppress(zmq.ZMQError):  # a connection given up is no longer known to the socket
            self.sub.disconnect(endpoint)
        connect(self.sub, endpoint)

    def _fail_over(self, way: list[str], now: float) -> None:
        """The feed of ``way[0]`` is lost: move to the next way (a standby; after the last, the
        first again). Its channels resync once it is connected (``_read_monitor``)."""
        old = way.pop(0)
        way.append(old)
        new = way[0]
        self.counts["feed_failovers"] += 1
        log.warning("no feed from %s for %.1f s: switching to %s, which carries the same matchers (%s)",
                    old, now - self.feed_lost[old], new,
                    "topology upstream" if new in self.upstream_nodes else "topology standby")
        self.feed_lost.pop(old, None)
        self.feed_retry.pop(old, None)
        with contextlib.suppress(zmq.ZMQError):  # a connection ZeroMQ gave up is no longer known to the socket
            self.sub.disconnect(old)
        self.feed_lost[new] = now  # until it is connected: one that never is gives way to the next in turn
        self.connected_once.add(new)  # so its connection resyncs the channels: what was lost meanwhile is lost
        connect(self.sub, new)

    def _close_retired_snapshot_sockets(self, now: float) -> None:
        retired = self.retired_snapshot_sockets
        while retired and retired[0][1] <= now:
            self._close_snapshot_socket(retired.pop(0)[0])

    def _close_snapshot_socket(self, old: zmq.Socket[bytes]) -> None:
        self._unwatch(old)
        old.close(linger=0)

    def _housekeeping(self, now: float) -> None:
        limits = self.limits
        self._close_retired_snapshot_sockets(now)
        if now - self.stats.started >= STATS_INTERVAL_S:
            self.log_stats(now)
        if self.fills_requests or self.fills_reask:
            self._send_fills_requests(now)
        for endpoint, since in list(self.feed_lost.items()):
            way = self.feed_paths.get(endpoint)
            if way is not None and len(way) > 1:
                if now - since >= FAILOVER_S:
                    self._fail_over(way, now)
                continue
            if now >= self.feed_retry.get(endpoint, since + FEED_RECONNECT_S):
                if endpoint not in self.feed_retry:
                    log.warning("no feed from %s for %.1f s: connecting to it again, every %g s until it is back",
                                endpoint, now - since, FEED_RECONNECT_S)
                self._reconnect_feed(endpoint)
                self.feed_retry[endpoint] = now + FEED_RECONNECT_S
        if self._bad_unlogged and now - self._bad_logged_at >= BAD_LOG_S:
            log.warning("dropped %d more undecodable publication(s) in the last %.1f s", self._bad_unlogged,
                        now - self._bad_logged_at)
            self._bad_unlogged = 0
            self._bad_logged_at = now
        # orders without a reply
        requests, timed_out = self.requests, self.timed_out
        while requests:
            rid, (conn, command, request_id, deadline) = next(iter(requests.items()))
            if deadline > now:
                break
            del requests[rid]
            if conn.session is not None and conn.transport is not None:
                self.counts["orders_timed_out"] += 1
                timed_out[rid] = (conn, command, now + LATE_REPLY_KEEP_S)
                self._deliver(conn, conn.session.on_reply(
                    command, request_id, "unknown_outcome", (),
                    f"no answer within {limits.order_timeout_s} s; the outcome is unknown"))
        while timed_out:
            rid, (conn, _, until) = next(iter(timed_out.items()))
            if until > now and conn.transport is not None:
                break
            del timed_out[rid]  # most never get an answer: the router that held them died
        while len(timed_out) > LATE_REPLY_KEEP_MAX:
            timed_out.popitem(last=False)
        # connections that do not finish their handshake (or never start it) hold a socket
        # each: cut them, as websockets' own server does
        handshaking = self.handshaking
        while handshaking:
            conn, since = next(iter(handshaking.items()))
            if now - since < limits.handshake_timeout_s:
                break
            del handshaking[conn]
            conn._cut()
            self.counts["handshake_timeout_closed"] += 1
        # slow consumers that stay behind
        for conn in list(self.behind):
            if now - conn.behind_since > limits.slow_consumer_ms / 1000:
                self.behind.discard(conn)
                self.counts["slow_consumer_closed"] += 1
                conn.close(CLOSE_TRY_AGAIN, "too slow to keep up")
        # snapshots not answered, heartbeats of idle channels
        heartbeat_s = limits.heartbeat_s
        for state in self.channels.values():
            if state.subscribed_at and now - state.subscribed_at > SUBSCRIBE_WAIT_S:
                state.subscribed_at = 0.0  # no message yet: the publisher may be down; ask anyway
                self._ask_snapshot(state)
            elif state.snapshot_asked and now - state.snapshot_asked > SNAPSHOT_RETRY_S:
                self._renew_snapshot_socket(self.topology.owner_of(state.channel.symbol))
                self._ask_snapshot(state)
        # a channel whose feed went silent gets no heartbeat: its clients see the feed is gone
        live = []
        silent = set()
        for symbol, state in self.channels.items():
            if now - state.heard_at <= FEED_SILENT_S:
                if state.channel.synced:
                    live.append(state)
            else:
                silent.add(symbol)  # synced or not: a feed that never came (its matcher down) is as silent
        self._log_silence(silent)
        if any(now - state.last_sent >= heartbeat_s for state in live):
            # The channels idle for half the interval beat along with the ones due, so that the
            # idle channels of a connection come due in the same tick and their heartbeats leave
            # in one write (no channel waits longer than heartbeat_s for one).
            self._heartbeats([state for state in live if now - state.last_sent >= heartbeat_s / 2])
        # pings: each connection once per ping_interval_s, one slot of them per tick (a ping
        # still unanswered is not renewed). A connection is closed once its ping has waited
        # ping_timeout_s for the pong: looked at in the tick that comes that long after the ping
        # (within half a tick: ticks run late, never early).
        slots = self.ping_slots
        turn = self._ping_turn = (self._ping_turn + 1) % len(slots)
        for conn in list(slots[(turn - self._ping_wait_ticks) % len(slots)]):
            if conn.ping_sent and now - conn.ping_sent >= limits.ping_timeout_s - TICK_S / 2 and not conn.closing:
                self.counts["ping_timeout_closed"] += 1
                conn.close(CLOSE_PING_TIMEOUT, "no pong")
        for conn in list(slots[turn]):
            if not conn.ping_sent:
                conn.ping(now)

    def log_stats(self, now: float, asked: bool = False) -> None:
        """What this gateway carried since the last time: a line for the whole, then one per
        channel that had publications; nothing when nothing happened, unless ``asked`` (SIGUSR1).
        A new window begins."""
        w = self.stats
        opened, closed = self._opened - w.opened, self._closed - w.closed
        counted = {k: v - w.counts.get(k, 0) for k, v in self.counts.items() if v != w.counts.get(k, 0)}
        if asked or opened or closed or counted or w.published:
            parts = [f"last {now - w.started:.0f} s: {_count(len(self.connections), 'connection')} (+{opened} "
                     f"-{closed}), {_count(len(self.channels), 'channel')}, {_count(w.published, 'publication')} in, "
                     f"{_count(w.sent, 'message')} out"]
            if w.feed_lag.count:
                parts.append(f"feed lag {_ms_figures(w.feed_lag)}")
            if w.turns.count:
                parts.append(f"{_count(w.turns.count, 'fan-out turn')}, {_ms_figures(w.turns)}")
            if counted:
                parts.append(", ".join(f"{k} {v}" for k, v in counted.items()))
            log.info("%s", "; ".join(parts))
            busy = sorted((state for state in self.channels.values() if state.published),
                          key=lambda state: state.published, reverse=True)
            for state in busy[:STATS_CHANNEL_LINES]:
                log.info("%s: %s, %s in, %s out, feed lag max %.2f ms", state.channel.symbol,
                         _count(len(state.subscribers), "subscriber"), _count(state.published, "publication"),
                         _count(state.sent, "message"), state.lag_max_ns / 1e6)
            rest = busy[STATS_CHANNEL_LINES:]
            if rest:
                log.info("%s: %s in, %s out, feed lag max %.2f ms", _count(len(rest), "more channel"),
                         _count(sum(state.published for state in rest), "publication"),
                         _count(sum(state.sent for state in rest), "message"),
                         max(state.lag_max_ns for state in rest) / 1e6)
        for state in self.channels.values():
            state.published = state.sent = state.lag_max_ns = 0
        self.stats = StatsWindow(now, self._opened, self._closed, self.counts)

    def _log_silence(self, silent: set[str]) -> None:
        """Say when subscribed channels' feed goes silent (its matcher hangs, its host or the way
        to it is cut: a relay in between stays connected, so only the silence tells), in the
        log and to each channel's clients (``_silence_error``), and when it is heard again (in
        the log: the clients see heartbeats again). ``silent``: the channels not heard for ``FEED_SILENT_S`` now, each
        counted from its subscription on (``_housekeeping``)."""
        was = self.silent
        if silent == was:
            return
        gone = sorted(silent - was)
        back = sorted(symbol for symbol in was - silent if symbol in self.channels)  # not just unsubscribed
        if gone:
            log.warning("no message from the feed of %s for %.0f s (%s): their clients get no heartbeats until it "
                        "is back", ", ".join(gone), FEED_SILENT_S, self._blame(gone))
            for symbol in gone:  # and each of their clients is told, once
                message = _silence_error(symbol)
                for conn in self.channels[symbol].subscribers:
                    conn.send(message)
        if back:
            log.info("the feed of %s is heard again", ", ".join(back))
        self.silent = silent

    def _blame(self, symbols: list[str]) -> str:
        """Who may be at fault for the silence of ``symbols``: their matchers, and the nodes in
        between that the gateway takes them from ("matcher m1, or relay x1 on the way")."""
        causes = []
        for symbol in symbols:
            owner = self.topology.owner_of(symbol)
            way = self.symbol_way.get(symbol)
            via = self.feed_node.get(way[0], owner) if way else owner
            cause = f"matcher {owner}" if via == owner else f"matcher {owner}, or relay {via} on the way"
            if cause not in causes:
                causes.append(cause)
        return "; ".join(causes)

    def _heartbeats(self, states: list[ChannelState]) -> None:
        """A heartbeat on each of ``states``, written as a turn of the fan-out: one write per
        connection, whatever it holds of them (a connection behind misses nothing it must be
        told of: a heartbeat is no update)."""
        for state in states:
            state.frames.append(text_frame(state.channel.heartbeat_message()))
            self._dirty.append(state)
        self._fan_out()

    def _rearm(self, sock: zmq.Socket[bytes], read: Callable[[], None]) -> None:
        """After a send (or a partial read) on ``sock``, look again: its edge-triggered FD may
        not fire for messages that arrived meanwhile."""
        asyncio.get_running_loop().call_soon(self._run_reader, read)


# -- process --------------------------------------------------------------------------------------------------

def _unreadable(reply: Reply, command: SubmitOrder | CancelOrder | AmendOrder) -> bool:
    """Whether a reply to ``command`` cannot be what the matcher made of it: one ``parse_reply``
    refused, or an ok one with no event of the order itself."""
    return reply.status == "bad_reply" or reply.status == "ok" and not _of_the_order(reply.events, command)


def _of_the_order(events: Iterable[object], command: SubmitOrder | CancelOrder | AmendOrder) -> bool:
    """Whether a reply holds an event of the command's own order (its account's, its order id's),
    as every reply a matcher makes does: its accepted, rejected, canceled or amended."""
    order_id, account = command.order_id, command.account
    return any(getattr(e, "order_id", None) == order_id and getattr(e, "account", None) == account for e in events)


def _levels(side: object, sign: int, what: str) -> list[Level]:
    """One side of a snapshot's book: ``(ticks, lots)`` pairs of integers in [1, 2^63 - 1],
    best first (``sign`` -1: prices falling, bids; 1: rising, asks)."""
    if type(side) is not tuple:
        raise ValueError(f"{what} are not an array")
    out: list[Level] = []
    last = None
    top = codec.MAX_INT
    for level in side:
        if type(level) is not tuple or len(level) != 2:
            raise ValueError(f"a level of the {what} is not [price, quantity]")
        price, lots = level
        if type(price) is not int or type(lots) is not int or not (0 < price <= top and 0 < lots <= top):
            raise ValueError(f"a level of the {what} is not two integers from 1 to 2^63 - 1: {repr(level)[:60]}")
        if last is not None and (price - last) * sign <= 0:
            raise ValueError(f"the {what} are not in order, best first")
        last = price
        out.append((price, lots))
    return out


def read_snapshot(body: bytes) -> tuple[int, tuple[list[Level], list[Level]], tuple[int, ...]]:
    """A matcher's ``SNAP`` answer (docs/wire.md, "Snapshots") -> ``(seq, (bids, asks), when)``,
    ``when`` the times it was taken and the book last changed, either or both left out by older
    matchers. Anything else raises ``ValueError`` (or msgpack's errors) saying what is wrong."""
    try:
        book = msgpack.unpackb(body, use_list=False)
    except (ValueError, msgpack.UnpackException) as e:
        raise ValueError(f"not one msgpack value: {str(e) or type(e).__name__}") from None
    if type(book) is not tuple or not 3 <= len(book) <= 5:
        raise ValueError("a book is [seq, bids, asks, taken_ns, changed_ns]")
    seq, bids, asks, *when = book
    if type(seq) is not int or not 0 <= seq <= codec.MAX_INT:
        raise ValueError(f"seq is not an integer from 0 to 2^63 - 1: {repr(seq)[:40]}")
    levels = _levels(bids, -1, "bids"), _levels(asks, 1, "asks")
    if levels[0] and levels[1] and levels[0][0][0] >= levels[1][0][0]:
        raise ValueError("the book is crossed: its best bid is not below its best ask")
    if (when and (type(when[0]) is not int or not 0 < when[0] <= codec.MAX_INT)
            or len(when) == 2 and (type(when[1]) is not int or not 0 <= when[1] <= codec.MAX_INT)):
        raise ValueError("after the levels, only the time the snapshot was taken (a positive integer) "
                         "and the time of the book's last change (an integer, 0 if none)")
    return seq, levels, tuple(when)


def _silence_error(symbol: str) -> bytes:
    """What a channel's clients are told when its feed has been silent for ``FEED_SILENT_S``
    (its matcher down, hung or cut off): once, and to each client that subscribes meanwhile."""
    return error("unavailable", f"no message from the feed of {symbol} for {FEED_SILENT_S:.0f} s: no heartbeats "
                 "until it is back, then its updates, or a fresh depth_snapshot", channel=symbol)


def _standby_text(node: GatewayNode) -> str:
    return f", standby {', '.join(node.standby)}" if node.standby else ""


def _serve(topology: Topology, node: GatewayNode, worker: int, ready: Callable[[], None]) -> None:
    # websockets logs "connection open" / "connection closed" at INFO for every connection:
    # 100,000 clients reconnecting made 200,000 lines and a fair part of the storm's CPU.
    # The gateway says what matters itself (counts, slow consumers, resyncs).
    logging.getLogger("websockets").setLevel(logging.WARNING)
    settle_collector()

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        gateway = Gateway(topology, node, worker)
        loop.add_signal_handler(signal.SIGUSR1, lambda: gateway.log_stats(time.monotonic(), asked=True))
        await gateway.serve(stop, ready)

    uvloop.run(main())


def run(topology: Topology, name: str, stopper: Stopper) -> None:
    """Serve gateway ``name`` of ``topology`` until SIGINT/SIGTERM."""
    node = topology.node(name)
    if not isinstance(node, GatewayNode):
        raise TypeError(f"node {name!r} is a {node.role}, not a gateway")
    details: dict[str, Any] = {"url": node.url, "listen": node.listen, "workers": node.workers}
    # SIGUSR1 logs the stats at once (Gateway.log_stats; with workers, this process passes it on
    # to them): until a loop takes it, it is ignored rather than fatal, here and in the workers
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    if node.workers == 1:
        def ready() -> None:  # once the port is bound
            log.info("serving %s, upstream %s%s", node.url, ", ".join(node.upstream), _standby_text(node))
            announce_ready(name, "gateway", **details)

        _serve(topology, node, 0, ready)
        return
    _run_workers(topology, node, details)


def _run_workers(topology: Topology, node: GatewayNode, details: dict[str, Any]) -> None:
    """Fork ``node.workers`` gateway processes on one port; READY once all of them are."""
    _check_port(node)
    read_end, write_end = os.pipe()
    children: dict[int, int] = {}
    die_with_me = die_with_parent()  # a kill -9 of this process must not leave workers serving the port
    for worker in range(node.workers):
        pid = os.fork()
        if pid == 0:
            os.close(read_end)
            code = 0
            try:
                if die_with_me is not None:
                    die_with_me()
                signal.signal(signal.SIGINT, signal.SIG_DFL)
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                log_as_worker(worker)
                _serve(topology, node, worker, lambda w=worker: os.write(write_end, bytes((w,))))
            except BaseException:  # noqa: BLE001 - a worker must never return into the parent's code
                log.exception("failed")
                code = 1
            finally:
                os._exit(code)
        children[pid] = worker
    os.close(write_end)
    stopping = False

    def stop_children(signum: int, _frame: Any) -> None:
        nonlocal stopping
        stopping = True
        for pid in children:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass

    def pass_on(signum: int, _frame: Any) -> None:
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    signal.signal(signal.SIGINT, stop_children)
    signal.signal(signal.SIGTERM, stop_children)
    signal.signal(signal.SIGUSR1, pass_on)
    ready = 0
    while ready < node.workers:
        try:
            data = os.read(read_end, 64)
        except InterruptedError:
            continue
        if not data:
            break  # every worker exited before it was ready
        ready += len(data)
    os.close(read_end)
    if ready == node.workers and not stopping:
        log.info("serving %s with %d workers, upstream %s%s", node.url, node.workers, ", ".join(node.upstream),
                 _standby_text(node))
        announce_ready(node.name, "gateway", **details)
    failed: list[str] = []
    while children:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            break
        except InterruptedError:
            continue
        worker = children.pop(pid, None)
        code = os.waitstatus_to_exitcode(status)
        if not stopping:
            failed.append(f"worker {worker} stopped: {describe_status(code)}")
            stop_children(signal.SIGTERM, None)
    if failed:
        raise ZmxError("; ".join(failed))


def _check_port(node: GatewayNode) -> None:
    """Workers share the port with SO_REUSEPORT, which would also let them join a stranger
    that listens there with it: refuse a port that is already taken."""
    family = socket.AF_INET6 if ":" in node.host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as asyncio's server does
        try:
            probe.bind((node.host, node.port))
            probe.listen(1)
        except OSError as e:
            raise ZmxError(_cannot_listen(node, e)) from None


def _cannot_listen(node: GatewayNode, error: OSError) -> str:
    """(``zmx node`` puts the node's name before it.) The reason as the system names its error
    number: asyncio's own text repeats the address."""
    if isinstance(error, socket.gaierror):  # a host that does not resolve: its errno is no errno code
        reason = error.strerror or str(error)
    else:
        reason = os.strerror(error.errno) if error.errno else str(error)
    return cannot_bind("the listening socket", node.listen, error.errno, reason)


if __name__ == "__main__":  # pragma: no cover
    sys.exit("start a gateway with: zmx node NAME -t TOPOLOGY")
