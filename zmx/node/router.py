"""The router node: forwards each order to the matcher that owns its symbol.

Stateless: it keeps no request (a reply whose client is not connected at that moment is
kept ``REPLY_RETRY_S`` at most). Its front ROUTER takes requests from clients and gateways,
its back ROUTER is where every matcher connects with its node name as routing id. The
frames are those of ``docs/wire.md``; the router reads the symbol from the request header
(``header[9:]``) and never decodes the order itself. A reply goes to the DEALER that the
request's ``reply_to`` frame names (gateways and Python clients send one), else to the
connection it came on.

What it knows about matchers comes from their ``HELLO`` / ``HB`` / ``BYE`` and from
ZeroMQ: a send to a routing id whose connection is gone fails at once (``ROUTER_MANDATORY``
-> ``EHOSTUNREACH``), and a restarted matcher with the same name takes its id over
(``ROUTER_HANDOVER``). A request for a symbol whose owner is not connected, said ``BYE``,
or has been silent past ``heartbeat_timeout_ms`` is answered ``unavailable`` on the spot.
At start the back is bound first and the front once every matcher has said ``HELLO``, or
``START_WAIT_S`` has passed: no order meets a router that has not heard its matcher yet.

The loop is the hot path of the cluster: poll both sockets, then drain each without
blocking, up to ``BATCH`` messages a socket a turn (the matchers' side first, so replies
and liveness news are seen before new requests). Forwarding a request is one dict lookup
and a record appended to its matcher's batch; each matcher gets the requests of one drain
as one ``REQS`` message (``zmx.node.wire``), and a matcher's ``REPS`` is split into one
reply per client. Everything rarer (errors, control messages, logging) is in
methods off that path. Peer input never raises out of the loop: it is answered
``bad_request`` when the client can be told, otherwise dropped, and always counted.
"""

from __future__ import annotations

import logging
import time
from collections import Counter, deque
from typing import Any

import msgpack
import zmq

from zmx.codec import MAX_ID_LENGTH, MAX_MESSAGE_BYTES, MAX_REPLY_BYTES, VERSION
from zmx.node.runtime import POLL_MS, Stopper, announce_ready, bind, cannot_bind
from zmx.node.wire import BATCH_BYTES, REPS, REQS, REQUEST_HEAD, unpack_replies
from zmx.node.wire import show as _show
from zmx.topology import RouterNode, Topology

__all__ = ["BATCH", "MAX_HEADER_BYTES", "MAX_REPLY_TO", "Malformed", "MatcherTable", "run"]

log = logging.getLogger("zmx.router")
_backend_send = zmq.backend.Socket.send  # type: ignore[attr-defined]  # the Cython send, without sugar
_backend_recv = zmq.backend.Socket.recv  # type: ignore[attr-defined]  # the Cython recv, without sugar

HEADER_PREFIX = 9  # version byte + 8-byte request id; the symbol follows
MAX_HEADER_BYTES = HEADER_PREFIX + MAX_ID_LENGTH
# A request's optional third frame names the DEALER its reply goes to (a ZeroMQ routing id).
# Why not the id ZeroMQ gives the request: with ROUTER_HANDOVER, a client's new connection
# takes its name over, and what the router reads afterwards from the old one comes under a
# name ZeroMQ made up (a zero byte and four more), which nobody holds once that one is closed.
MAX_REPLY_TO = 255
# ZeroMQ drops a connection that sends a frame above MAXMSGSIZE (before Python sees it).
# A request body is at most the codec's 1 MiB, which is also the matchers' own limit: no
# frame the router forwards can make a matcher drop its connection. A reply carries every
# event of one command, which a large sweep can push past 1 MiB, and comes from one of ours.
FRONT_MAX_FRAME = MAX_MESSAGE_BYTES
BACK_MAX_FRAME = MAX_REPLY_BYTES  # a reply batch, each reply whole
BATCH = 1024  # messages drained from one socket per turn before looking at the other
HWM = 100_000  # queue bound of each socket direction (messages); a full queue is reported, never waited on
# At start the front waits this long at most for every matcher's HELLO (ZeroMQ connects a
# matcher again 0.1-0.3 s after its router restarted): a matcher still silent then is down.
START_WAIT_S = 0.5
# A reply whose client is not connected at that moment, or not reading, is tried again for this
# long: a gateway whose pings dropped this router while it hung connects again under the same
# name (ROUTER_HANDOVER), a few milliseconds after the router goes on and answers what it held.
REPLY_RETRY_S = 2.0
UNSENT_MAX = 100_000  # replies kept to try again, at most (past it they are dropped, counted)
# Clients whose replies are kept, at most: each sweep tries each one's first reply again (about 4
# us a try), so requests that name thousands of DEALERs that do not exist (``reply_to``) would
# otherwise take the router's time (a review's 5,000 a second put the other clients' acks at 86-194
# ms p50). Past it a reply to one more client is dropped (counted). A router's clients are its
# gateways and API clients, and a handover keeps the replies of one of them.
UNSENT_CLIENTS_MAX = 256
SWEEP_EVERY_S = 0.01  # how often silent matchers are looked for
STATS_EVERY_S = 10.0
MALFORMED_LOG_EVERY_S = 1.0

OK = b"ok"
UNKNOWN_SYMBOL = b"unknown_symbol"
UNAVAILABLE = b"unavailable"
BAD_REQUEST = b"bad_request"
HELLO = b"HELLO"
HB = b"HB"
BYE = b"BYE"
_CONTROL_FRAMES = {HELLO: 3, HB: 3, BYE: 2, REPS: 3}


class Malformed(Exception):
    """Peer input that breaks the wire contract. ``kind`` is a short, bounded category for
    the counters; the message says what exactly was wrong."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


def _unpack_control(payload: bytes, what: str) -> Any:
    try:
        return msgpack.unpackb(payload, raw=False, strict_map_key=True, max_bin_len=0, max_ext_len=0,
                               max_str_len=4 * MAX_ID_LENGTH, max_array_len=65536, max_map_len=16)
    except Exception as e:  # noqa: BLE001 - msgpack raises many kinds; all of them mean "not valid"
        raise Malformed(f"bad {what}", f"{what} payload is not valid msgpack ({type(e).__name__})") from None


def _epoch(value: object, what: str) -> int:
    if type(value) is not int or value < 0:
        raise Malformed(f"bad {what}", f"{what} epoch must be a non-negative integer, got {value!r:.40}")
    return value


class _Matcher:
    __slots__ = ("down_reason", "epoch", "ident", "name", "owned", "silent", "symbols", "up")

    def __init__(self, name: str, owned: tuple[str, ...]) -> None:
        self.name = name
        self.ident = name.encode()
        self.owned = owned  # what the topology gives it
        self.symbols: tuple[str, ...] = ()  # what it serves now: owned and announced
        self.epoch = -1
        self.up = False
        self.down_reason = "is not connected (no HELLO yet)"
        self.silent = False  # down because it went silent: a refusal says for how long by then


class MatcherTable:
    """Which matcher is alive and which symbols it serves: the router's only state.

    ``route`` maps a symbol (bytes) to the routing id of its owner, and holds only the
    symbols whose owner is up and announced them; the loop forwards when ``route`` has the
    symbol and answers ``unavailable`` or ``unknown_symbol`` otherwise. ``last_seen`` maps
    each matcher's routing id to when it was last heard (``HELLO``, ``HB`` or ``REPS``);
    ``sweep`` takes down whoever has been silent past the timeout.

    A matcher is up after a ``HELLO`` or an ``HB`` (an ``HB`` without a ``HELLO``, as after
    a router restart, brings it up with the symbols the topology gives it), and down after
    ``BYE``, a lost connection or silence.
    """

    def __init__(self, topology: Topology, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self.owners: dict[bytes, str] = {s.encode(): owner for s, owner in topology.owners.items()}
        self.matchers: dict[bytes, _Matcher] = {}
        for node in topology.nodes_by_role("matcher"):
            m = _Matcher(node.name, topology.symbols_of(node.name))
            self.matchers[m.ident] = m
        self.route: dict[bytes, bytes] = {}
        self.last_seen: dict[bytes, float] = dict.fromkeys(self.matchers, float("-inf"))
        # the router's own stop (serve sets it): the poll a SIGTERM broke into goes on, and
        # matchers stopped by the same signal may say BYE meanwhile
        self.stopper: Stopper | None = None

    def _matcher(self, ident: bytes, what: str) -> _Matcher:
        m = self.matchers.get(ident)
        if m is None:
            if len(ident) == 5 and ident[0] == 0:
                # ZeroMQ's own kind of routing id: the one a connection gets when a new connection
                # takes its name over (ROUTER_HANDOVER), with what was still queued on it.
                raise Malformed("from a replaced connection",
                                f"{what} from a connection without a name of its own ({_show(ident)}): a "
                                "matcher's old connection, renamed when it connected again, with what was "
                                "still queued on it (or a peer that never gave a name)")
            raise Malformed("not a matcher", f"{what} from {_show(ident)}, which is no matcher of the topology")
        return m

    # -- control messages ---------------------------------------------------------------

    def hello(self, ident: bytes, payload: bytes, now: float) -> None:
        m = self._matcher(ident, "HELLO")
        data = _unpack_control(payload, "HELLO")
        if type(data) is not dict or set(data) != {"node", "symbols", "epoch"}:
            raise Malformed("bad HELLO", f"HELLO must be a map with node, symbols and epoch, got {data!r:.80}")
        if data["node"] != m.name:
            raise Malformed("bad HELLO", f"HELLO from routing id {m.name!r} names node {data['node']!r:.40}")
        symbols = data["symbols"]
        if type(symbols) is not list or not all(type(s) is str for s in symbols):
            raise Malformed("bad HELLO", f"HELLO symbols must be a list of strings, got {symbols!r:.80}")
        epoch = _epoch(data["epoch"], "HELLO")
        if epoch < m.epoch:
            log.warning("%s: HELLO with epoch %d after epoch %d: a second process using this name, or a matcher "
                        "whose data directory is new (its books start empty, and old order ids are free again)",
                        m.name, epoch, m.epoch)
        announced, owned = set(symbols), set(m.owned)  # (sets: a matcher may own thousands of symbols)
        foreign = [s for s in symbols if s not in owned]
        if foreign:
            log.warning("%s announces %s, which the topology does not give it: not routed there",
                        m.name, ", ".join(foreign))
        missing = [s for s in m.owned if s not in announced]
        if missing:
            log.warning("%s does not announce %s, which the topology gives it: unavailable until it does",
                        m.name, ", ".join(missing))
        self._up(m, tuple(s for s in m.owned if s in announced), epoch, now)

    def heartbeat(self, ident: bytes, payload: bytes, now: float) -> None:
        m = self._matcher(ident, "HB")
        epoch = _epoch(_unpack_control(payload, "HB"), "HB")
        if epoch < m.epoch:
            raise Malformed("stale HB", f"{m.name}: HB with epoch {epoch} after epoch {m.epoch}: ignored")
        if m.up and epoch == m.epoch:
            self.last_seen[ident] = now
            return
        # No HELLO for this epoch (the router restarted, or the HELLO was lost): the topology
        # says what it serves.
        self._up(m, m.symbols if m.epoch == epoch and m.symbols else m.owned, epoch, now)

    def bye(self, ident: bytes) -> None:
        self.down(self._matcher(ident, "BYE"), "said BYE")

    def lost(self, ident: bytes) -> None:
        """A send to ``ident`` failed with EHOSTUNREACH: its connection is gone."""
        m = self.matchers.get(ident)
        if m is not None and m.up:
            self.down(m, "lost its connection")

    def forgive(self, stalled_s: float) -> None:
        """This router did not run for ``stalled_s`` (stopped, or starved of CPU): the matchers'
        silence meanwhile is its own (their heartbeats wait unread in its queue), so it does
        not count against them."""
        for ident in self.last_seen:
            self.last_seen[ident] += stalled_s

    def sweep(self, now: float) -> None:
        """Take down every matcher silent for longer than the timeout."""
        deadline = now - self.timeout_s
        for ident, seen in self.last_seen.items():
            if seen < deadline:
                m = self.matchers[ident]
                if m.up:
                    self.down(m, self._silence(seen, now))
                    m.silent = True

    def _silence(self, seen: float, now: float) -> str:
        return f"has been silent for {(now - seen) * 1000:.0f} ms (heartbeat timeout {self.timeout_s * 1000:.0f} ms)"

    def _up(self, m: _Matcher, symbols: tuple[str, ...], epoch: int, now: float) -> None:
        changed = not m.up or m.epoch != epoch or m.symbols != symbols
        for s in m.symbols:
            self.route.pop(s.encode(), None)
        m.symbols, m.epoch, m.up = symbols, epoch, True
        for s in symbols:
            self.route[s.encode()] = m.ident
        self.last_seen[m.ident] = now
        if changed:
            log.info("%s up: %s (epoch %d)", m.name, ", ".join(symbols) or "no symbols", epoch)

    def down(self, m: _Matcher, reason: str) -> None:
        for s in m.symbols:
            self.route.pop(s.encode(), None)
        was_up, m.up, m.down_reason, m.silent = m.up, False, reason, False
        if was_up:
            level = logging.INFO if self.stopper is not None and self.stopper.stopped else logging.WARNING
            log.log(level, "%s down: %s; %s unavailable", m.name, reason, ", ".join(m.symbols) or "no symbols")

    # -- answers ------------------------------------------------------------------------

    def refusal(self, symbol: bytes, now: float | None = None) -> tuple[bytes, bytes]:
        """Status and message for a request whose symbol is not in ``route`` (at ``now``: how
        long a matcher that went silent has been silent by then)."""
        owner = self.owners.get(symbol)
        if owner is None:
            return UNKNOWN_SYMBOL, f"no matcher of the cluster owns symbol {_show(symbol, 40)}".encode()
        m = self.matchers[owner.encode()]
        name = symbol.decode()
        if m.up:  # up, but did not announce this symbol
            return UNAVAILABLE, f"{name}: its matcher {owner} does not serve it (epoch {m.epoch})".encode()
        reason = self._silence(self.last_seen[m.ident], now) if m.silent and now is not None else m.down_reason
        return UNAVAILABLE, f"{name}: its matcher {owner} {reason}".encode()

    def describe(self) -> str:
        return "; ".join(f"{m.name} up (epoch {m.epoch})" if m.up else f"{m.name} down: {m.down_reason}"
                         for m in self.matchers.values())


def _reply_to_ok(name: bytes) -> bool:
    """Whether a request's ``reply_to`` frame can name a DEALER: 1 to 255 bytes, and not the
    kind of routing id that ZeroMQ makes up for a peer (a zero byte first)."""
    return 0 < len(name) <= MAX_REPLY_TO and name[0] != 0


def _front_problem(msg: list[bytes]) -> tuple[bytes, str, str]:
    """Why a request from a client is not forwardable: (header to echo, kind, message).

    Only called for requests that are not a routable ``header, body[, reply_to]``; returns
    kind "" for a well-formed request (whose symbol is then unknown or unavailable)."""
    echo = msg[1][:MAX_HEADER_BYTES] if len(msg) > 1 else b""
    if len(msg) not in (3, 4):
        return echo, "wrong frame count", ("a request is 2 frames (header, body) or 3 (header, body, reply_to), "
                                           f"got {len(msg) - 1}")
    if len(msg) == 4 and not _reply_to_ok(msg[3]):
        return echo, "bad reply_to", (f"reply_to is a routing id of 1 to {MAX_REPLY_TO} bytes that does not start "
                                      f"with a zero byte, got {len(msg[3])} bytes {_show(msg[3][:16])}")
    header = msg[1]
    if not header:
        return echo, "short header", "empty header frame"
    if header[0] != VERSION:
        return echo, "bad version byte", f"header version byte {header[0]}, this router speaks {VERSION}"
    if len(header) <= HEADER_PREFIX:
        return echo, "short header", (f"a header is version + 8-byte request id + symbol, "
                                      f"got {len(header)} bytes")
    if len(header) > MAX_HEADER_BYTES:
        return echo, "long header", f"header is {len(header)} bytes, at most {MAX_HEADER_BYTES}"
    return echo, "", ""


class _Counts:
    """The router's counters; the loop keeps its hottest ones in locals and adds them here."""

    def __init__(self, symbols: list[bytes]) -> None:
        self.forwarded: dict[bytes, int] = dict.fromkeys(symbols, 0)
        self.replies = 0
        self.refused: Counter[bytes] = Counter()  # status -> count (unknown_symbol, unavailable, bad_request)
        self.malformed: dict[str, Counter[str]] = {"client": Counter(), "matcher": Counter()}
        self.dropped_replies = 0  # to a client that is gone or whose queue is full

    def total(self) -> int:
        return (sum(self.forwarded.values()) + self.replies + sum(self.refused.values())
                + sum(sum(c.values()) for c in self.malformed.values()) + self.dropped_replies)


class _Router:
    def __init__(self, topology: Topology, node: RouterNode, context: zmq.Context[zmq.Socket[bytes]]) -> None:
        self.name = node.name
        self.node = node
        self.table = MatcherTable(topology, node.heartbeat_timeout_ms / 1000)
        self.front = self._socket(context, FRONT_MAX_FRAME)
        self.back = self._socket(context, BACK_MAX_FRAME)
        self.back.setsockopt(zmq.ROUTER_HANDOVER, 1)
        # a gateway's connection made again (after its pings dropped a router that hung) takes
        # its routing id over, so the replies to what it sent before reach it
        self.front.setsockopt(zmq.ROUTER_HANDOVER, 1)
        self.counts = _Counts(list(self.table.owners))
        self.window = _Counts(list(self.table.owners))  # since the last stats line
        self.malformed_logged: dict[str, Counter[str]] = {"client": Counter(), "matcher": Counter()}
        self.last_problem: dict[str, str] = {}
        # replies ZeroMQ did not take, oldest first: (until when, client, frames); and their clients
        self.unsent: deque[tuple[float, bytes, tuple[bytes, ...]]] = deque()
        self.unsent_clients: set[bytes] = set()

    @staticmethod
    def _socket(context: zmq.Context[zmq.Socket[bytes]], max_frame: int) -> zmq.Socket[bytes]:
        s = context.socket(zmq.ROUTER)
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.ROUTER_MANDATORY, 1)  # an unroutable send raises instead of vanishing
        s.setsockopt(zmq.MAXMSGSIZE, max_frame)
        s.setsockopt(zmq.SNDHWM, HWM)
        s.setsockopt(zmq.RCVHWM, HWM)
        return s

    def bind(self, what: str) -> None:
        sock, endpoint = (self.front, self.node.front) if what == "front" else (self.back, self.node.back)
        try:
            bind(sock, endpoint)
        except zmq.ZMQError as e:
            log.error("%s", cannot_bind(f"the {what} socket", endpoint, e.errno, e.strerror))
            raise SystemExit(1) from None

    def await_matchers(self, stopper: Stopper, grace_s: float) -> None:
        """Before the front is bound: read the matchers' news on the back until every matcher
        of the topology is up, or ``grace_s`` has passed. A matcher's connection and HELLO come
        a few hundred milliseconds after a router (re)starts; a router that took orders at once
        answered them ``unavailable`` meanwhile, while the matcher was fine."""
        table, back = self.table, self.back
        deadline = time.monotonic() + grace_s
        while not stopper.stopped and not all(m.up for m in table.matchers.values()):
            left = deadline - time.monotonic()
            if left <= 0:
                log.info("no word from %s yet: their symbols will be unavailable until then",
                         ", ".join(m.name for m in table.matchers.values() if not m.up))
                return
            if back.poll(max(1, int(min(left * 1000, POLL_MS)))):
                while True:
                    try:
                        msg = back.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    self.from_matcher(msg, time.monotonic())

    def close(self) -> None:
        self.front.close(linger=0)
        self.back.close(linger=0)

    # -- the off-path cases ----------------------------------------------------------------

    def refuse(self, client: bytes, header: bytes, status: bytes, message: bytes) -> None:
        """Answer a client request with an error status (never blocks)."""
        self.window.refused[status] += 1
        self.reply((client, header, status, message), time.monotonic())

    def reply(self, frames: tuple[bytes, ...], now: float) -> bool:
        """Send a reply (``client, header, status, payload``) off the fast path: after the
        replies kept for its client, if any, else at once; kept (``keep``) if ZeroMQ does not
        take it. True if it left."""
        if frames[0] not in self.unsent_clients:
            try:
                self.front.send_multipart(frames, zmq.NOBLOCK)
                return True
            except zmq.ZMQError:  # the client is not connected (EHOSTUNREACH) or not reading (EAGAIN)
                pass
        self.keep(frames, now)
        return False

    def keep(self, frames: tuple[bytes, ...], now: float) -> None:
        """A reply to try again until ``REPLY_RETRY_S`` from now (``retry_unsent``)."""
        client = frames[0]
        if len(self.unsent) >= UNSENT_MAX or (client not in self.unsent_clients
                                              and len(self.unsent_clients) >= UNSENT_CLIENTS_MAX):
            self.window.dropped_replies += 1
            return
        self.unsent.append((now + REPLY_RETRY_S, client, frames))
        self.unsent_clients.add(client)

    def retry_unsent(self, now: float) -> int:
        """Send the kept replies that ZeroMQ takes now, each client's in order; drop (count)
        those past their time. The number sent."""
        kept: deque[tuple[float, bytes, tuple[bytes, ...]]] = deque()
        refused: set[bytes] = set()  # a client that did not take one: its later replies wait too
        sent = 0
        for until, client, frames in self.unsent:
            if client not in refused:
                try:
                    self.front.send_multipart(frames, zmq.NOBLOCK)
                    sent += 1
                    continue
                except zmq.ZMQError:
                    refused.add(client)
            if until <= now:
                self.window.dropped_replies += 1
                refused.add(client)  # the ones after it keep their own time
            else:
                kept.append((until, client, frames))
        self.unsent = kept
        self.unsent_clients = {client for _, client, _ in kept}
        return sent

    def from_client(self, msg: list[bytes]) -> None:
        """A request the fast path did not forward."""
        try:
            self._from_client(msg)
        except Exception as e:  # noqa: BLE001 - a bug here must not stop the router for everyone
            self.internal_error("client", e)

    def _from_client(self, msg: list[bytes]) -> None:
        echo, kind, message = _front_problem(msg)
        if not kind:  # well-formed: its symbol is unknown, or its owner unavailable
            status, message_bytes = self.table.refusal(msg[1][HEADER_PREFIX:], time.monotonic())
            self.refuse(msg[3] if len(msg) == 4 else msg[0], msg[1], status, message_bytes)
            return
        self.malformed("client", kind, message)
        self.refuse(msg[0], echo, BAD_REQUEST, message.encode())

    def forward_failed(self, ident: bytes, parts: list[bytes], error: zmq.ZMQError,
                       forwarded: dict[bytes, int]) -> None:
        """Sending a batch of requests to its matcher failed; tell each client at once.

        ``parts`` is the batch as the loop built it: record head, client id, header, body."""
        name = ident.decode(errors="replace")
        if error.errno == zmq.EHOSTUNREACH:
            self.table.lost(ident)
            why = f"its matcher {name} {self.table.matchers[ident].down_reason}"
        elif error.errno == zmq.EAGAIN:
            why = f"its matcher {name} is overloaded ({HWM} batches of requests queued)"
        else:
            why = f"cannot reach its matcher {name}: {error.strerror}"
        for client, header in zip(parts[1::4], parts[2::4]):
            symbol = header[HEADER_PREFIX:]
            forwarded[symbol] -= 1
            self.refuse(client, header, UNAVAILABLE, f"{symbol.decode()}: {why}".encode())

    def bad_batch(self, ident: bytes, problem: str) -> None:
        self.malformed("matcher", "bad REPS batch", f"REPS from {_show(ident)}: {problem}; the rest dropped")

    def from_matcher(self, msg: list[bytes], now: float) -> None:
        """A message from the back socket that is not a well-formed REPS."""
        try:
            self._from_matcher(msg, now)
        except Exception as e:  # noqa: BLE001 - a bug here must not stop the router for everyone
            self.internal_error("matcher", e)

    def _from_matcher(self, msg: list[bytes], now: float) -> None:
        ident = msg[0]
        if len(msg) < 2:
            self.malformed("matcher", "wrong frame count", f"empty message from {_show(ident)}")
            return
        kind = msg[1]
        expected = _CONTROL_FRAMES.get(kind)
        if expected is None:
            self.malformed("matcher", "unknown kind", f"unknown kind {_show(kind)} from {_show(ident)}")
            return
        if len(msg) != expected:
            self.malformed("matcher", "wrong frame count",
                           f"{kind.decode()} from {_show(ident)} has {len(msg) - 1} frames, not {expected - 1}")
            return
        try:
            if kind == HB:
                self.table.heartbeat(ident, msg[2], now)
            elif kind == HELLO:
                self.table.hello(ident, msg[2], now)
            elif kind == BYE:
                self.table.bye(ident)
            else:  # pragma: no cover - REPS of the right length takes the fast path
                raise Malformed("unknown kind", f"unexpected {kind!r}")
        except Malformed as e:
            self.malformed("matcher", e.kind, str(e))

    def internal_error(self, side: str, error: Exception) -> None:
        """Counted with the malformed input; the first one of each kind is logged in full."""
        kind = f"internal error {type(error).__name__}"
        if not self.counts.malformed[side][kind] and not self.window.malformed[side][kind]:
            log.error("internal error on a message from a %s (counted, not logged again)", side, exc_info=error)
        self.malformed(side, kind, f"{type(error).__name__}: {error}")

    def malformed(self, side: str, kind: str, message: str) -> None:
        self.window.malformed[side][kind] += 1
        self.last_problem[side] = message

    # -- logging -------------------------------------------------------------------------

    def log_malformed(self) -> None:
        """At most once a second: what malformed input arrived since the last time."""
        parts = []
        for side, counter in self.window.malformed.items():
            fresh = counter - self.malformed_logged[side]
            if fresh:
                action = "answered bad_request" if side == "client" else "dropped"
                kinds = ", ".join(f"{kind} {n}" for kind, n in fresh.most_common())
                parts.append(f"{sum(fresh.values())} from {side}s ({action}: {kinds}; last: {self.last_problem[side]})")
                self.malformed_logged[side] = counter.copy()
        if parts:
            log.warning("malformed input: %s", "; ".join(parts))

    def flush_window(self, forwarded: dict[bytes, int], replies: int) -> None:
        """Add the loop's local counters to the window."""
        w = self.window
        for symbol, n in forwarded.items():
            w.forwarded[symbol] += n
        w.replies += replies

    def log_stats(self, seconds: float) -> None:
        """The window's counts per matcher and symbol, then the window is added to the totals."""
        w, t = self.window, self.counts
        if w.total():
            per_matcher = []
            for m in self.table.matchers.values():
                symbols = ", ".join(f"{s} {w.forwarded[s.encode()]}" for s in m.owned)
                state = f"up, epoch {m.epoch}" if m.up else "down"
                per_matcher.append(f"{m.name} ({state}): {symbols}")
            errors = ", ".join(f"{status.decode()} {n}" for status, n in sorted(w.refused.items())) or "no errors"
            bad = sum(sum(c.values()) for c in w.malformed.values())
            log.info("last %.0f s: %d forwarded [%s], %d replies, %s, %d malformed, %d replies dropped",
                     seconds, sum(w.forwarded.values()), "; ".join(per_matcher), w.replies, errors, bad,
                     w.dropped_replies)
        for symbol, n in w.forwarded.items():
            t.forwarded[symbol] += n
        t.replies += w.replies
        t.refused.update(w.refused)
        for side, counter in w.malformed.items():
            t.malformed[side].update(counter)
        t.dropped_replies += w.dropped_replies
        self.window = _Counts(list(self.table.owners))
        self.malformed_logged = {"client": Counter(), "matcher": Counter()}

    def log_totals(self) -> None:
        t = self.counts
        errors = ", ".join(f"{status.decode()} {n}" for status, n in sorted(t.refused.items())) or "no errors"
        malformed = "; ".join(f"{side} {sum(c.values())} ({', '.join(f'{k} {n}' for k, n in c.most_common())})"
                              for side, c in t.malformed.items() if c) or "none"
        log.info("totals: %d forwarded, %d replies, %s, malformed: %s, %d replies dropped; matchers: %s",
                 sum(t.forwarded.values()), t.replies, errors, malformed, t.dropped_replies, self.table.describe())

    # -- the loop ------------------------------------------------------------------------

    def serve(self, stopper: Stopper) -> None:
        front, back, table = self.front, self.back, self.table
        # Frame by frame with the backend's own send/recv: faster here than recv_multipart /
        # send_multipart, whose Python wrappers check every frame and ask RCVMORE through
        # another wrapper. Frames are received as zmq.Frame (copy=False), which say whether
        # more parts follow without a getsockopt(RCVMORE) per frame, and copied out with
        # .bytes: 3.4 us of CPU per 3-frame request against 5.1 us for recv() + get(RCVMORE)
        # (measured over inproc, ~90-byte requests). A multipart message is atomic: when its
        # first frame is accepted, so are the others.
        frecv, fsend = _backend_recv.__get__(front), _backend_send.__get__(front)
        brecv, bsend = _backend_recv.__get__(back), _backend_send.__get__(back)
        route, last_seen = table.route, table.last_seen
        unsent_clients = self.unsent_clients  # (retry_unsent makes a new set: taken again after it)
        table.stopper = stopper
        from_client, from_matcher, forward_failed = self.from_client, self.from_matcher, self.forward_failed
        poller = zmq.Poller()
        poller.register(front, zmq.POLLIN)
        poller.register(back, zmq.POLLIN)
        poll = poller.poll
        noblock, more = int(zmq.NOBLOCK), int(zmq.NOBLOCK | zmq.SNDMORE)
        again, zmq_error, monotonic = zmq.Again, zmq.ZMQError, time.monotonic
        reps, req_head, req_size = REPS, REQUEST_HEAD.pack, REQUEST_HEAD.size
        batch_bytes, bad_batch, reply_to_ok = BATCH_BYTES, self.bad_batch, _reply_to_ok
        outbox: dict[bytes, list[bytes]] = {}  # matcher -> this drain's requests for it, as REQS parts
        outsize: dict[bytes, int] = {}

        def send_batch(ident: bytes, parts: list[bytes]) -> None:
            try:
                bsend(ident, more)
            except zmq_error as e:
                forward_failed(ident, parts, e, forwarded)
                return
            bsend(REQS, more)
            bsend(b"".join(parts), noblock)

        forwarded = dict.fromkeys(table.owners, 0)
        replies = 0
        now = monotonic()
        next_sweep = now + SWEEP_EVERY_S
        next_malformed_log = now + MALFORMED_LOG_EVERY_S
        stats_since = now
        timeout = POLL_MS
        turn = now
        stall_s = max(table.timeout_s / 2, 2 * POLL_MS / 1000)  # a turn waits in poll for POLL_MS at most
        while not stopper.stopped:
            ready = dict(poll(timeout))
            now = monotonic()
            if now - turn > stall_s:
                table.forgive(now - turn)
                log.warning("this router did not run for %.0f ms (stopped, or starved of CPU): the matchers' "
                            "silence meanwhile is not held against them", (now - turn) * 1000)
            turn = now
            if now >= next_sweep:
                table.sweep(now)
                if self.unsent:
                    replies += self.retry_unsent(now)
                    unsent_clients = self.unsent_clients
                next_sweep = now + SWEEP_EVERY_S
                if now >= next_malformed_log:
                    self.flush_window(forwarded, replies)
                    forwarded = dict.fromkeys(table.owners, 0)
                    replies = 0
                    self.log_malformed()
                    next_malformed_log = now + MALFORMED_LOG_EVERY_S
                    if now - stats_since >= STATS_EVERY_S:
                        self.log_stats(now - stats_since)
                        stats_since = now
            busy = False
            if back in ready:
                # Replies and matcher news first: they free memory and update liveness.
                for _ in range(BATCH):
                    try:
                        frame = brecv(noblock, False)
                    except again:
                        break
                    msg = [frame.bytes]
                    while frame.more:
                        frame = brecv(0, False)
                        msg.append(frame.bytes)
                    if len(msg) == 3 and msg[1] == reps:
                        ident = msg[0]
                        if ident in last_seen:
                            last_seen[ident] = now
                        records, problem = unpack_replies(msg[2])
                        if problem:
                            bad_batch(ident, problem)
                        for client, header, status, payload in records:
                            if unsent_clients and client in unsent_clients:
                                self.keep((client, header, status, payload), now)  # after its kept ones
                                continue
                            try:
                                fsend(client, more)
                            except zmq_error:  # the client is not connected now, or not reading
                                self.keep((client, header, status, payload), now)
                                continue
                            fsend(header, more)
                            fsend(status, more)
                            fsend(payload, noblock)
                            replies += 1
                    else:
                        from_matcher(msg, now)
                else:
                    busy = True
            if front in ready:
                # Each matcher's requests of this drain leave as one REQS message (several if
                # they pass BATCH_BYTES): one send for the batch instead of four per request.
                for _ in range(BATCH):
                    try:
                        frame = frecv(noblock, False)
                    except again:
                        break
                    msg = [frame.bytes]
                    while frame.more:
                        frame = frecv(0, False)
                        msg.append(frame.bytes)
                    n = len(msg)
                    if n == 3 or (n == 4 and reply_to_ok(msg[3])):
                        header = msg[1]
                        symbol = header[9:]
                        ident = route.get(symbol)
                        if ident is not None and header[0] == 1:
                            client = msg[3] if n == 4 else msg[0]
                            body = msg[2]
                            size = req_size + len(client) + len(header) + len(body)
                            parts = outbox.get(ident)
                            if parts is None:
                                outbox[ident] = parts = []
                                outsize[ident] = size
                            else:
                                total = outsize[ident] + size
                                if total > batch_bytes:
                                    send_batch(ident, parts)
                                    parts.clear()
                                    total = size
                                outsize[ident] = total
                            parts += (req_head(len(client), len(header), len(body)), client, header, body)
                            forwarded[symbol] += 1
                            continue
                    from_client(msg)
                else:
                    busy = True
                for ident, parts in outbox.items():
                    send_batch(ident, parts)
                outbox.clear()
            # A full batch means more is waiting: look again without sleeping in poll.
            timeout = 0 if busy else POLL_MS
        if self.unsent:
            replies += self.retry_unsent(time.monotonic())
            self.window.dropped_replies += len(self.unsent)  # the router stops: they never leave
            self.unsent.clear()
        self.flush_window(forwarded, replies)
        self.log_malformed()
        self.log_stats(time.monotonic() - stats_since)
        self.log_totals()


def run(topology: Topology, name: str, stopper: Stopper) -> None:
    """Serve router ``name`` of ``topology`` until ``stopper`` is set."""
    node = topology.node(name)
    assert isinstance(node, RouterNode), f"{name} is a {node.role}, not a router"
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    router = _Router(topology, node, context)
    try:
        router.bind("back")
        # the front only once the matchers are known: until it is bound, clients and gateways
        # send nothing here (they send to connected routers only)
        router.await_matchers(stopper, min(START_WAIT_S, node.heartbeat_timeout_ms / 1000))
        router.bind("front")
        log.info("front %s, back %s, heartbeat timeout %d ms; matchers: %s", node.front, node.back,
                 node.heartbeat_timeout_ms, ", ".join(
                     f"{m.name} ({', '.join(m.owned) or 'no symbols'})" for m in router.table.matchers.values()))
        announce_ready(name, "router", front=node.front, back=node.back)
        router.serve(stopper)
    finally:
        router.close()
        context.term()
