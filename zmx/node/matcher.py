"""The matcher node: the matching engines of its symbols behind ZeroMQ sockets.

``run(topology, name, stopper)`` serves matcher ``name`` until ``stopper.stopped``:

- one ``MatchingEngine`` per symbol it owns (``Topology.symbols_of``), restored at start
  from its journal (``zmx.node.journal``): the newest snapshot, then every journaled command
  replayed with its recorded ``ts_ns`` (nothing is published during replay), so books,
  ``seq`` and trade ids are exactly what they were and publishing goes on at ``seq + 1``;
- one DEALER per router, routing id = the node name, connected to the router's ``back``;
  ``HELLO`` each time a connection to a router is established (a socket monitor reports
  it) and every ``HELLO_INTERVAL_S`` as a safety net, ``HB`` every ``heartbeat_ms``, ``BYE``
  on a clean stop (docs/wire.md);
- a PUB socket bound at ``pub`` and a ROUTER bound at ``snapshot`` (Clone pattern), which
  also answers a gateway that lost its feed with the fills of an account's resting orders it
  published lately (``zmx.node.recentfills``).

The loop: poll, then drain each ready socket without blocking (at most ``BATCH`` requests
each; once the batch has taken ``DRAIN_BUDGET_S``, a router not read yet gets one message
read and the batch ends), run the commands through the engines, append the batch to the
journal and make it durable (``fsync`` mode), and only then answer each request on the
DEALER it came from and publish the events: per command and symbol one frame of public
events, per account one frame of private events. Book requests are answered after that, so
a snapshot is always taken between two published commands. Every ``snapshot_every`` commands
the journal starts a new segment and a forked child process writes the engines' snapshot
(``fork_snapshot``), so the loop never waits for it. The order ids used before a snapshot
move out of the engines' memory into an archive on disk (``zmx.node.usedids``): a matcher's
memory does not grow with every order it ever accepted, and an id is still never reused.

Nothing a peer sends can stop the loop: malformed messages are answered with
``bad_request`` where the sender can be told, else dropped, and counted; the counts are
logged at most once a second. A journal that cannot be written stops the process (exit 1)
before anything of that batch is answered.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import signal
import sqlite3
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator

import msgpack
import zmq
from zmq.utils.monitor import recv_monitor_message

from zmx.codec import (
    MAX_INT,
    MAX_MESSAGE_BYTES,
    decode,
    encode_publication,
    join_account_publication,
    join_batch,
    join_publication,
    pack_records,
)
from zmx.commands import COMMAND_TYPES, CancelOrder, Command
from zmx.engine import MAX_MATCHES, NO_MATCH_LIMIT, MatchingEngine
from zmx.events import PUBLIC_EVENT_TYPES, FeedHeartbeat, OrderFilled
from zmx.exceptions import DecodeError, ZmxError
from zmx.model import SymbolSpec
from zmx.node.journal import Journal, JournalError
from zmx.node.recentfills import RecentFills
from zmx.node.runtime import (
    POLL_MS,
    StartProgress,
    StartStopped,
    Stopper,
    announce_ready,
    bind,
    cannot_bind,
    connect,
    die_with_parent,
    keep_mmap_threshold,
    settle_collector,
    watch_peer,
)
from zmx.node.usedids import ArchiveMismatch, UsedIds
from zmx.node.usedids import store as store_used_ids
from zmx.node.wire import BATCH_BYTES, REPLY_HEAD, REPS, REQS, show, unpack_requests
from zmx.topics import SUBSCRIPTION_MAX_BYTES
from zmx.topology import MatcherNode, RouterNode, Topology, connect_endpoint

__all__ = ["BATCH", "MAX_FRAME_BYTES", "run"]

log = logging.getLogger("zmx.matcher")

BATCH = 512  # requests (or book requests) drained from one socket before the batch is committed
WELCOMED_PREFIXES = 16  # distinct prefix subscriptions answered per loop turn (see Matcher.welcome)
# A batch also ends once its requests have taken this long to read and run: its replies wait
# for the whole batch, and requests that keep arriving while one is read would otherwise keep
# it open. Measured through a router with one matcher on the two-core machine: with requests
# kept in flight, mostly 18,000-19,400 orders/s instead of 15,200-17,400 (the replies of a
# batch leave while the next one is read, so client, router and matcher overlap; 0.5-2 ms all
# did as well, 4 ms 16,200-17,600); at 8,000 orders/s, one drain that went on for 27 ms (246
# requests, each slowed by the other processes on the cores) no longer happens, and the worst
# ack of a round fell from 15-51 ms to 14-20 ms.
DRAIN_BUDGET_S = 0.002
MAX_FRAME_BYTES = MAX_MESSAGE_BYTES  # ZMQ_MAXMSGSIZE: a bigger frame makes ZeroMQ drop the connection
# On the DEALERs to the routers: a REQS frame is at most BATCH_BYTES or one request, whose body
# is at most MAX_MESSAGE_BYTES, plus its record head, client id (< 256) and header (< 256).
MAX_BATCH_FRAME_BYTES = MAX_MESSAGE_BYTES + 1024
PUB_HWM = 100_000  # messages queued per subscriber before ZeroMQ drops (the subscriber sees a seq gap)
# Accounts whose private frames are counted (codec: a counted account frame), about 150 bytes
# each; past it all counts are let go at once, and an account with frames again gets a new one
# (a new ``start``: a gateway takes its frames before the first one it sees as lost)
ACCOUNTS_COUNTED = 100_000
DEALER_HWM = 100_000
HELLO_INTERVAL_S = 5.0
IDLE_HEARTBEAT_S = 1.0  # a symbol with no public event for this long gets an empty publication
IDLE_CHECK_S = 0.25
STATS_INTERVAL_S = 10.0
PROBLEM_LOG_S = 1.0
# Used ids moved into the archive's filters per loop turn, at about 1.5 us each (the turn's
# replies have left by then). While any are left the loop polls without waiting, so an idle
# matcher absorbs a generation quickly and a request that arrives meanwhile waits for one
# slice at most (a slice of 2,000 after an idle poll used to hold new requests 5-7 ms).
ABSORB_SLICE = 200
# while the filters fill after a start: ids a query, and how long a loop turn puts them in
LOAD_SLICE, LOAD_BUDGET_S = 500, 0.002
STOP_LINGER_MS = 500  # BYE and the last batch's replies and events may take this long to leave
# Room kept free on the data directory's file system: below it, new orders and amends are
# refused ``unavailable`` and cancels go on (each a journal record of a few dozen bytes), so
# that a disk filling up leaves clients able to take their orders off the book, the feed
# running, and room for snapshots, instead of stopping the matcher with every symbol when the
# journal can take no more. A small file system keeps a sixteenth of its size instead.
DISK_RESERVE_BYTES = 64 << 20
DISK_RESERVE_SHARE = 16

HEADER_VERSION = 1
HEADER_MIN = 10  # version byte + 8-byte request id + at least one byte of symbol

HELLO, HB, BYE = b"HELLO", b"HB", b"BYE"
OK, BAD_REQUEST, UNKNOWN_SYMBOL, UNAVAILABLE = b"ok", b"bad_request", b"unknown_symbol", b"unavailable"
SNAP, FILLS, ERR = b"SNAP", b"FILLS", b"ERR"
FILLS_ACCOUNT_MAX = 128  # bytes of an account in a fills request (an account topic holds at most 126)
FILLS_REQUEST_MAX = 64 * 1024  # bytes of a fills request's trade ids

_COMMANDS = frozenset(COMMAND_TYPES)
_PUBLIC = frozenset(PUBLIC_EVENT_TYPES)
_NOBLOCK = int(zmq.NOBLOCK)
_MORE = int(zmq.NOBLOCK | zmq.SNDMORE)
# The hot loop calls the Cython socket methods directly: pyzmq's Python layer adds about a
# microsecond per call, and recv_multipart asks ZMQ_RCVMORE through getsockopt, which builds
# an enum member each time; a received Frame knows whether more parts follow.
_send = zmq.backend.Socket.send
_recv = zmq.backend.Socket.recv
_MAX_FD = os.sysconf("SC_OPEN_MAX") if hasattr(os, "sysconf") else 65536


class _StartFailure(Exception):
    """The matcher cannot start; the message says why."""


class _Link:
    """The DEALER to one router and the monitor that reports its connections."""

    __slots__ = ("dealer", "endpoint", "monitor", "router")

    def __init__(self, router: str, endpoint: str, dealer: zmq.Socket, monitor: zmq.Socket) -> None:
        self.router = router
        self.endpoint = endpoint
        self.dealer = dealer
        self.monitor = monitor


def filters_text(used_ids: UsedIds) -> str:
    """The log's words for the memory of a matcher's order-id filters (``perf/bench_soak.py``
    reads the number)."""
    return f"this matcher's order-id filters hold {used_ids.filter_bytes} bytes"


def hold_fills(fills: RecentFills, events: Iterable[object]) -> None:
    """Keep the resting orders' fills among replayed ``events`` (``Matcher.publish`` keeps
    those of the commands it serves)."""
    for event in events:
        if type(event) is OrderFilled and event.maker:
            fills.add(event.account, event.symbol, event.trade_id, event.ts_ns, pack_records((event,))[0])


# Symbols whose books a matcher may drop at start although orders rest on them (a comma-separated
# list; see _restore): the operator's word that the loss is meant
DROP_BOOKS_ENV = "ZMX_DROP_BOOKS"


def _any_order_engine(symbol: str, topology: Topology) -> MatchingEngine | None:
    """An engine for ``symbol`` that takes any order (its grid as the topology has it, or one
    tick and lot of 1; no quantity limits); None if the name cannot be a symbol's."""
    spec = topology.symbols.get(symbol)
    try:
        return MatchingEngine(SymbolSpec(symbol, spec.tick_size if spec else "1", spec.lot_size if spec else "1"),
                              max_matches=NO_MATCH_LIMIT)  # (only the journal has it: an older zmx handled it)
    except ZmxError:
        return None


def _restoring(progress: StartProgress, symbol: str) -> Callable[[int, int], None]:
    """``MatchingEngine.restore``'s progress callback for ``symbol``."""
    def tell(done: int, total: int) -> None:
        if progress.due():
            progress.say(f"restoring the book of {symbol}: {done:,} of {total:,} resting orders")
    return tell


def _saying(replay: list[tuple[int, Command]], progress: StartProgress) -> Iterator[tuple[int, Command]]:
    """The journal's commands, in order, saying every 16,384 how far the replay is."""
    for start in range(0, len(replay), 0x4000):
        if progress.due():
            progress.say(f"replaying the journal: {start:,} of {len(replay):,} commands")
        yield from replay[start:start + 0x4000]


def _restore(topology: Topology, name: str, journal: Journal, fills: RecentFills, epoch: int,
             progress: StartProgress) -> tuple[dict[str, MatchingEngine], str, UsedIds, list[str]]:
    """The engines of ``name``'s symbols as the journal left them, the snapshot to write at
    once, and the archive of their old order ids (``zmx.node.usedids``), attached to them
    before the replay: a command is replayed against the ids it was first checked against.
    The replayed commands' fills of resting orders go into ``fills``. A long read, replay or
    restore says so through ``progress`` (and gives up on a stop: ``StartStopped``).

    The snapshot to write at once: ``"must"`` when there is none yet or a symbol is new here
    (it must land before anything is handled: it records the new symbols' specs), ``"may"``
    when a symbol left this matcher (its book is out of the journal's replay from then on,
    once it lands) or an engine's match limit changes (the symbols of the last value: their
    snapshot is older than the limit; if the snapshot does not land, they must go back to
    ``NO_MATCH_LIMIT``), else ``""``.

    A snapshot records each symbol's spec, and a matcher writes one at its first start and
    at the first start that gives it a new symbol, so the journal always says which spec its
    commands were handled with. A topology that gives a symbol another spec (tick, lot, or
    quantity limits) is refused: replaying the journal under it could answer differently than
    the matcher did.
    """
    symbols = topology.symbols_of(name)
    started = time.perf_counter()
    states, replay = journal.recover(progress)
    if states is None and not replay:  # say where it looked: a data_dir is relative to the working directory
        if epoch == 1:  # a first start here (or the matcher was started from another directory)
            log.info("new data_dir %s: empty books from seq 0", journal.directory.resolve())
        else:
            log.warning("no journal in %s, where this matcher ran %d time(s) before: empty books from seq 0",
                        journal.directory.resolve(), epoch - 1)
    try:
        used_ids = UsedIds(journal.directory, symbols, journal.snapshot_segment, journal.snapshot_archived,
                           journal.segment)
    except ArchiveMismatch as e:
        raise _StartFailure(str(e)) from None
    except sqlite3.Error as e:
        raise _StartFailure(f"cannot open the archive of used order ids in {journal.directory}: {e}") from None
    if used_ids.dropped:
        log.warning("%d archived order id(s) of a snapshot that did not land were dropped; the journal replay "
                    "uses them again", used_ids.dropped)
    engines: dict[str, MatchingEngine] = {}
    for symbol in symbols:
        spec = topology.symbols[symbol]
        state = states.get(symbol) if states else None
        if state is None:
            # Any command of it in the journal was handled before a snapshot recorded the match
            # limit (by an older zmx): it is replayed without one, as it was handled.
            engines[symbol] = MatchingEngine(spec, max_matches=NO_MATCH_LIMIT)
            continue
        try:
            engine = MatchingEngine.restore(state, _restoring(progress, symbol))
        except Exception as e:  # noqa: BLE001 - any failure to read it is reported the same way
            raise _StartFailure(f"{symbol}: the engine snapshot in the journal cannot be restored: {e}") from None
        if engine.spec.describe() != spec.describe():
            was, now = engine.spec.describe(), spec.describe()
            diff = ", ".join(f"{key} {was[key]} -> {now[key]}" for key in now if was[key] != now[key])
            raise _StartFailure(
                f"{symbol}: the topology changes the symbol's spec ({diff}); the journal was handled with the "
                "old one (prices in ticks, quantities in lots), and replaying it under a new one could answer "
                "differently. Keep the spec, or give the symbol a new, empty data_dir")
        engines[symbol] = engine
    for symbol, engine in engines.items():
        engine.archive = used_ids.symbols[symbol]
    gone = sorted(set(states or ()) - set(engines))
    # Symbols the journal holds that the topology no longer gives this matcher: replayed on
    # engines of their own, only to count the orders resting on them (which would be lost). A
    # symbol without a snapshot here gets a spec without quantity limits (they may have changed
    # meanwhile, or the symbol may be gone from the topology). Without the archive of used order
    # ids, an order refused then as a reused id is taken: the count errs toward orders resting
    # (ZMX_DROP_BOOKS lets the operator drop such a book all the same).
    leaving: dict[str, MatchingEngine | None] = {}
    for symbol in gone:
        try:
            leaving[symbol] = MatchingEngine.restore(states[symbol])  # type: ignore[index]
        except Exception:  # noqa: BLE001 - its orders cannot be counted: refused below, as if some rested
            leaving[symbol] = None
    # Every fill stamped after the snapshot's last book change (a fill changes the book) is
    # replayed below; without a snapshot, every fill ever. A snapshot of format 1 does not say
    # when its books changed: complete from now on only.
    changes = [e.changed_ns for e in engines.values() if e.seq]
    fills.complete_since_ns = 0 if states is None else max(changes, default=0) + 1 if all(changes) else time.time_ns()
    skipped: Counter[str] = Counter()
    failed = 0
    for ts_ns, cmd in _saying(replay, progress):
        engine = engines.get(cmd.symbol)
        if engine is None:
            skipped[cmd.symbol] += 1
            if cmd.symbol not in leaving:
                leaving[cmd.symbol] = _any_order_engine(cmd.symbol, topology)
            left = leaving[cmd.symbol]
            if left is not None:
                with contextlib.suppress(Exception):
                    left.handle(cmd, ts_ns=ts_ns)
            continue
        try:
            events = engine.handle(cmd, ts_ns=ts_ns)
        except Exception:  # noqa: BLE001 - it failed the same way when it was first handled
            failed += 1
            continue
        hold_fills(fills, events)
    dropping = {s.strip() for s in os.environ.get(DROP_BOOKS_ENV, "").split(",") if s.strip()}
    resting = {symbol: None if engine is None else engine.resting() for symbol, engine in leaving.items()}
    kept = {symbol: n for symbol, n in resting.items() if n != 0 and symbol not in dropping}
    if kept:
        said = "; ".join(f"{symbol}: {'orders it cannot count' if n is None else f'{n} resting order(s)'}"
                         for symbol, n in sorted(kept.items()))
        raise _StartFailure(
            f"the journal in {journal.directory} holds books of symbols the topology no longer gives {name} ({said}): "
            f"they would be lost. A symbol moves to another matcher only with its book, which zmx does not do: keep "
            f"it on {name} until its orders are cancelled, or start {name} once with "
            f"{DROP_BOOKS_ENV}={','.join(sorted(kept))} to drop them")
    for symbol in sorted(leaving):
        n = resting[symbol]
        book = ("its book, empty," if n == 0 else
                f"its book ({'orders it cannot count' if n is None else f'{n} resting order(s)'}, {DROP_BOOKS_ENV})")
        log.warning("%s: in the journal but no longer owned by %s; %s is dropped%s", symbol, name, book,
                    f" ({skipped[symbol]} journaled command(s) skipped)" if skipped[symbol] else "")
    if failed:
        log.warning("%d journaled command(s) failed in the engine again on replay", failed)
    took_ms = (time.perf_counter() - started) * 1000
    seqs = ", ".join(f"{s} seq {e.seq}" for s, e in engines.items())
    base = "no snapshot" if states is None else f"the snapshot before segment {journal.snapshot_segment}"
    log.info("recovered from %s + %d journaled command(s) in %.0f ms: %s", base, len(replay), took_ms,
             seqs or "no symbols")
    if used_ids.loading:
        log.info("%d archived order id(s): their filters fill while the matcher serves (about 3 s a million); "
                 "until then each new order id is looked up in the archive", used_ids.total)
    else:
        log.info("%d archived order id(s); %s", used_ids.total, filters_text(used_ids))
    # A symbol new here (in no snapshot): without one that records its spec now, its commands
    # would be replayed under whatever spec a later topology gives it.
    new = states is None or any(symbol not in states for symbol in engines)
    # An engine replayed under another match limit than this zmx's (its snapshot is older than
    # the limit): the limit changes now, if the snapshot written now lands, so that every
    # command is replayed later under the limit it was handled with.
    older = sorted(symbol for symbol, engine in engines.items() if engine.max_matches != MAX_MATCHES)
    for symbol in older:
        engines[symbol].max_matches = MAX_MATCHES
    if older and states is not None and any(symbol in states for symbol in older):
        log.info("%s: handled without a match limit until now (a snapshot of an older zmx); one command meets "
                 "at most %d resting orders from the snapshot written now on", ", ".join(older), MAX_MATCHES)
    # A symbol that left (``leaving`` holds those only the journal had, too): a snapshot takes
    # its book out of the replay, so that what was dropped stays dropped.
    return engines, "must" if new else "may" if leaving or older else "", used_ids, older


class Matcher:
    """One matcher node's state and sockets; ``run`` drives it."""

    def __init__(self, topology: Topology, name: str) -> None:
        node = topology.node(name)
        if not isinstance(node, MatcherNode):
            raise _StartFailure(f"node {name!r} is a {node.role}, not a matcher")
        self.topology = topology
        self.name = name
        self.node = node
        self.symbols = topology.symbols_of(name)
        self.routers: tuple[RouterNode, ...] = tuple(
            r for r in topology.nodes_by_role("router") if isinstance(r, RouterNode))
        self.epoch = 0
        self.engines: dict[str, MatchingEngine] = {}
        self.header_symbols: dict[bytes, str] = {}  # the symbol as a request header holds it -> symbol
        self.journal: Journal | None = None
        self.fills = RecentFills(time.time_ns())  # resting orders' fills, for gateways that lost their feed
        # account -> (its count's start, its frames published in it), so that a gateway sees one
        # that its feed lost (docs/wire.md); the starts are numbered from 1 in each epoch
        self.account_frames: dict[str, tuple[int, int]] = {}
        self.account_starts = 0
        self.ctx: zmq.Context | None = None
        self.pub: zmq.Socket | None = None
        self.snap: zmq.Socket | None = None
        self.links: list[_Link] = []
        self.dealers: set[zmq.Socket] = set()
        self.monitors: dict[zmq.Socket, _Link] = {}
        self.poller = zmq.Poller()
        self.hello = b""
        self.hb = b""
        self.snapshot_child: tuple[int, int, float] | None = None  # pid, snapshot number, start time
        self.used_ids: UsedIds | None = None
        self.absorbing = False  # engines hold a handed generation of used ids that the archive has stored
        self.loading_ids = False  # the archive's filters are filling with the ids stored before this start
        self.started_at = time.monotonic()
        # statistics
        self.commands: Counter[str] = Counter()
        self._reported: Counter[str] = Counter()
        self.problems: Counter[str] = Counter()  # since the last problem log line
        # serve's: once it says stop (SIGTERM), the poll that the signal broke into goes on and
        # may see a router that stopped at the same signal leave
        self.stopper: Stopper | None = None
        self.problems_total: Counter[str] = Counter()
        self.served = False  # it started serving (a start that failed ends with its error, no summary)
        self.dropped_replies = 0
        self.cancels_only = b""  # while the disk is nearly full: why new orders and amends are refused
        self._last_conn_log: dict[str, float] = {}
        self._last_engine_log = -1e9
        # What a snapshot's child runs first: it is killed with this process. A child left
        # writing into a data directory that a restarted matcher owns by then would hold the
        # archive's lock (that start failed with "database is locked") and could write a
        # snapshot older than the new one's. A snapshot killed half-way leaves nothing that
        # counts (a temporary file, a rolled-back transaction). Made once: it costs milliseconds.
        self.orphaned = die_with_parent(signal.SIGKILL)

    # -- start ------------------------------------------------------------------------------

    def start(self, stopper: Stopper | None = None) -> None:
        """Bind, recover the books (giving up on a stop: ``StartStopped``), connect."""
        node = self.node
        progress = StartProgress(self.name, stopper)  # a long start says so: zmx up waits as long as it goes on
        self.ctx = zmq.Context()
        # An XPUB, to hear each new subscription to a symbol (XPUB_VERBOSE: every subscriber's,
        # not only the first) and answer it with the symbol's heartbeat at once; see welcome().
        self.pub = self._bind(zmq.XPUB, node.pub, "pub", {zmq.SNDHWM: PUB_HWM, zmq.XPUB_VERBOSE: 1,
                                                          zmq.MAXMSGSIZE: SUBSCRIPTION_MAX_BYTES})
        self.snap = self._bind(zmq.ROUTER, node.snapshot, "snapshot")
        try:
            self.journal = Journal(node.data_dir, fsync=node.fsync)
            self.epoch = self.journal.bump_epoch()
            self.engines, snapshot_now, self.used_ids, older = _restore(self.topology, self.name, self.journal,
                                                                        self.fills, self.epoch, progress)
            self.loading_ids = self.used_ids.loading
            landed = True
            if snapshot_now or self.journal.since_snapshot >= node.snapshot_every:
                landed = self.snapshot_at_start(progress, required=snapshot_now == "must")
            if not landed and older:  # replayed next time from the older snapshot: as it was handled
                for symbol in older:
                    self.engines[symbol].max_matches = NO_MATCH_LIMIT
                log.warning("%s: no match limit until a start writes its snapshot", ", ".join(older))
        except (JournalError, OSError) as e:
            raise _StartFailure(f"cannot recover from data_dir {node.data_dir!r}: {e}") from None
        self.header_symbols = {symbol.encode(): symbol for symbol in self.engines}
        self.hello = msgpack.packb({"node": self.name, "symbols": list(self.symbols), "epoch": self.epoch})
        self.hb = msgpack.packb(self.epoch)
        for router in self.routers:
            self.links.append(self._link(router.name, connect_endpoint(router.back)))
        self.poller.register(self.snap, zmq.POLLIN)
        self.poller.register(self.pub, zmq.POLLIN)

    def snapshot_at_start(self, progress: StartProgress, *, required: bool) -> bool:
        """A snapshot of the recovered engines, written here, before serving: the first one of a
        data directory, and the first after a symbol came to this matcher, which record each
        symbol's spec so that a later replay uses the right one (``required``); then one
        whenever the replay was long or a symbol left this matcher.

        Only a required one must land. Any other may fail (a nearly full disk: a start that
        failed for want of room for it would leave the matcher down although its journal had
        room for more orders): the journal goes on in the new segment, and the next snapshot
        is due after ``snapshot_every`` commands, as after one that failed while serving.
        Whether it landed."""
        journal, used_ids = self.journal, self.used_ids
        assert journal is not None and used_ids is not None
        number = journal.rotate()
        states = {}
        for i, (symbol, engine) in enumerate(self.engines.items()):
            if progress.due():
                progress.say(f"writing snapshot {number}: {i} of {len(self.engines)} books ({symbol} next)")
            states[symbol] = engine.snapshot()
        if progress.due():
            progress.say(f"writing snapshot {number}")
        try:
            journal.store_snapshot(number, states, used_ids.total)
        except OSError as e:
            if required:
                raise
            log.error("cannot write snapshot %d at start (%s); serving on without it, the journal replays from "
                      "snapshot %d", number, e, journal.snapshot_segment)
            return False
        journal.remove_obsolete()
        journal.snapshot_stored(number)
        return True

    def _link(self, router: str, endpoint: str) -> _Link:
        """A new DEALER connected to a router's back, registered with the poller."""
        dealer = self._socket(zmq.DEALER)
        dealer.setsockopt(zmq.MAXMSGSIZE, MAX_BATCH_FRAME_BYTES)
        dealer.setsockopt(zmq.ROUTING_ID, self.name.encode())
        dealer.setsockopt(zmq.IMMEDIATE, 1)  # nothing queues for a router that is down
        dealer.setsockopt(zmq.SNDHWM, DEALER_HWM)
        dealer.setsockopt(zmq.RCVHWM, DEALER_HWM)
        watch_peer(dealer)  # a router that vanished is noticed, and one back is connected again within a second
        monitor = dealer.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED)
        monitor.setsockopt(zmq.LINGER, 0)
        connect(dealer, endpoint)
        link = _Link(router, endpoint, dealer, monitor)
        self.dealers.add(dealer)
        self.monitors[monitor] = link
        self.poller.register(dealer, zmq.POLLIN)
        self.poller.register(monitor, zmq.POLLIN)
        return link

    def _unlink(self, link: _Link) -> int:
        """Close a link's sockets; how many requests were still queued on it (dropped)."""
        self.poller.unregister(link.dealer)
        self.poller.unregister(link.monitor)
        self.dealers.discard(link.dealer)
        del self.monitors[link.monitor]
        pending = 0
        while True:
            try:
                frames = link.dealer.recv_multipart(_NOBLOCK)
            except zmq.Again:
                break
            pending += len(unpack_requests(frames[1])[0]) if len(frames) == 2 and frames[0] == REQS else 1
        link.dealer.disable_monitor()
        link.monitor.close(0)
        link.dealer.close(0)
        return pending

    def _socket(self, kind: int) -> zmq.Socket:
        assert self.ctx is not None
        sock = self.ctx.socket(kind)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.MAXMSGSIZE, MAX_FRAME_BYTES)
        return sock

    def _bind(self, kind: int, endpoint: str, what: str, options: dict[int, int] | None = None) -> zmq.Socket:
        """A socket of ``kind`` bound at ``endpoint``, with ``options`` set first: the connections
        a bound socket accepts take the options it had when it was bound (a PUB whose SNDHWM was
        set after ``bind`` kept ZeroMQ's default of 1,000 for every subscriber)."""
        sock = self._socket(kind)
        for option, value in (options or {}).items():
            sock.setsockopt(option, value)
        try:
            bind(sock, endpoint)
        except zmq.ZMQError as e:
            sock.close(0)
            raise _StartFailure(cannot_bind(f"the {what} socket", endpoint, e.errno, e.strerror)) from None
        return sock

    def ready_details(self) -> dict[str, object]:
        return {"pub": self.node.pub, "snapshot": self.node.snapshot, "symbols": list(self.symbols),
                "epoch": self.epoch, "seq": {s: e.seq for s, e in self.engines.items()}}

    # -- the loop ---------------------------------------------------------------------------

    def serve(self, stopper: Stopper) -> None:
        assert self.journal is not None and self.pub is not None and self.snap is not None
        self.stopper = stopper
        journal = self.journal
        snap, pub = self.snap, self.pub
        poll = self.poller.poll
        dealers = self.dealers  # the set itself: _link and _unlink keep it up to date
        monitors = self.monitors
        monotonic, clock = time.monotonic, time.perf_counter
        snapshot_every = self.node.snapshot_every
        hb_interval = self.node.heartbeat_ms / 1000
        now = monotonic()
        next_hb = now  # the first heartbeat goes at once
        next_hello = now + HELLO_INTERVAL_S
        next_idle = now + IDLE_CHECK_S
        next_stats = now + STATS_INTERVAL_S
        next_problem_log = now
        last_public = dict.fromkeys(self.engines, now)
        records: list[tuple[int, bytes]] = []
        replies: list[tuple[zmq.Socket, bytes, bytes, bytes, object]] = []
        published: list[tuple[str, list, list[bytes]]] = []

        while not stopper.stopped:
            busy = self.absorbing or self.loading_ids  # work of its own between batches: no wait
            timeout = 0 if busy else max(0, min(POLL_MS, int((next_hb - now) * 1000) + 1))
            try:
                ready = poll(timeout)
            except zmq.ZMQError as e:
                if e.errno == zmq.EINTR:
                    continue
                raise
            now = monotonic()
            if ready:
                snap_ready = subscribed = False
                events_from: list[zmq.Socket] = []
                deadline = clock() + DRAIN_BUDGET_S  # one budget for the batch, whichever routers fill it
                self.check_disk()  # once a turn, whichever routers have requests
                for sock, _ in ready:
                    if sock in dealers:
                        self.drain_requests(sock, records, replies, published, deadline)
                    elif sock is snap:
                        snap_ready = True
                    elif sock is pub:
                        subscribed = True
                    elif sock in monitors:
                        events_from.append(sock)
                if records:
                    try:
                        journal.append_batch(records)
                        journal.sync()
                    except OSError as e:
                        log.critical("cannot write the journal in %s (%s); stopping before this batch of %d "
                                     "command(s) is answered", self.node.data_dir, e, len(records))
                        self.problems["not answered: the journal could not take them"] += len(records)
                        raise SystemExit(1) from None
                    records.clear()
                if replies:
                    self.send_replies(replies)
                    replies.clear()
                if published:
                    self.publish(published, last_public, now)
                    published.clear()
                if snap_ready:
                    self.serve_snapshots()
                if subscribed:
                    self.welcome(last_public, now)
                for monitor in events_from:
                    self.connection_events(monitor, now)
                if journal.since_snapshot >= snapshot_every and self.snapshot_child is None and not self.absorbing:
                    self.fork_snapshot()
            if self.snapshot_child is not None:
                self.reap_snapshot(os.WNOHANG)
            elif self.absorbing:
                self.absorb_used_ids(ABSORB_SLICE)
            if self.loading_ids:
                self.load_used_ids(LOAD_BUDGET_S)
            if now >= next_hb:
                self.broadcast(HB, self.hb)
                next_hb += hb_interval
                if next_hb <= now:  # fell behind (a long batch): no burst of heartbeats
                    next_hb = now + hb_interval
                if now >= next_hello:
                    self.broadcast(HELLO, self.hello)
                    next_hello = now + HELLO_INTERVAL_S
            if now >= next_idle:
                self.idle_heartbeats(last_public, now)
                self.fills.expire(time.time_ns())
                next_idle = now + IDLE_CHECK_S
            if self.problems and now >= next_problem_log:
                self.log_problems()
                next_problem_log = now + PROBLEM_LOG_S
            if now >= next_stats:
                self.log_stats()
                next_stats = now + STATS_INTERVAL_S

    def drain_requests(self, dealer: zmq.Socket, records: list, replies: list, published: list,
                       deadline: float) -> None:
        """Read request batches from one router until BATCH requests were run through the
        engines, none is waiting, or ``time.perf_counter()`` passed ``deadline`` (each router
        gets at least one message read per turn, however long another one took)."""
        recv = _recv
        engines = self.engines
        header_symbols = self.header_symbols
        counts = self.commands
        time_ns = time.time_ns
        add_record, add_reply, add_published = records.append, replies.append, published.append
        commands = _COMMANDS
        clock = time.perf_counter
        handled = 0
        cancels_only = self.cancels_only  # (check_disk: at the start of the turn)
        while handled < BATCH and not (handled and clock() >= deadline):
            try:
                frame = recv(dealer, _NOBLOCK, False)
            except zmq.Again:
                return
            frames = [frame.bytes]
            while frame.more:
                frame = recv(dealer, _NOBLOCK, False)
                frames.append(frame.bytes)
            if len(frames) != 2 or frames[0] != REQS:
                self.malformed_request(frames)
                continue
            requests, problem = unpack_requests(frames[1])
            if problem:
                self.problems["bad REQS batch (rest dropped)"] += 1
            handled += len(requests)
            for client, header, body in requests:
                if len(header) < HEADER_MIN or header[0] != HEADER_VERSION:
                    add_reply((dealer, client, header, BAD_REQUEST, self.refuse(
                        "bad header", f"the header is not {HEADER_VERSION:#04x} + 8-byte request id + symbol")))
                    continue
                try:
                    cmd = decode(body)
                except DecodeError as e:
                    add_reply((dealer, client, header, BAD_REQUEST, self.refuse("undecodable body", str(e))))
                    continue
                if type(cmd) not in commands:
                    add_reply((dealer, client, header, BAD_REQUEST, self.refuse(
                        "not a command", f"the body is a {type(cmd).__name__}, not a command")))
                    continue
                symbol = cmd.symbol  # type: ignore[union-attr]
                if header_symbols.get(header[9:]) != symbol:
                    if header[9:] != symbol.encode():
                        add_reply((dealer, client, header, BAD_REQUEST, self.refuse(
                            "symbol mismatch", f"the header names symbol {show(header[9:], 64)}, the body {symbol!r}")))
                    else:
                        self.problems["unknown symbol"] += 1
                        add_reply((dealer, client, header, UNKNOWN_SYMBOL,
                                   f"matcher {self.name} does not own {symbol}".encode()))
                    continue
                if cancels_only and type(cmd) is not CancelOrder:
                    self.problems["refused: the disk is nearly full"] += 1
                    add_reply((dealer, client, header, UNAVAILABLE, cancels_only))
                    continue
                ts_ns = time_ns()
                add_record((ts_ns, body))  # it reaches the engine: journaled, whatever happens in there
                try:
                    events = engines[symbol].handle(cmd, ts_ns=ts_ns)  # type: ignore[arg-type]
                    packed = pack_records(events)  # each event packed once: reply and publications
                except Exception:  # noqa: BLE001 - a bug must not stop the other symbols
                    # (an event that cannot be packed is one too: the seq it took is never
                    # published, and the gateways resync at the gap)
                    self.engine_failed(symbol, cmd)
                    add_reply((dealer, client, header, BAD_REQUEST, self.refuse(
                        "engine failure", "internal error: the matcher failed on this command")))
                    continue
                counts[symbol] += 1
                add_reply((dealer, client, header, OK, packed))
                add_published((symbol, events, packed))

    def check_disk(self) -> None:
        """Cancels only once the data directory's file system has less than its reserve free
        (``DISK_RESERVE_BYTES``), until it has a quarter more than that; said when it starts
        and when it ends."""
        assert self.journal is not None
        try:
            free, size = self.journal.disk_space()
        except OSError:
            return  # the next write says what is wrong
        reserve = min(DISK_RESERVE_BYTES, size // DISK_RESERVE_SHARE)
        if free < reserve and not self.cancels_only:
            self.cancels_only = (f"matcher {self.name}: its disk is nearly full ({free // 1024} KiB free, "
                                 f"{reserve // 1024} KiB kept); cancels only").encode()
            log.error("the disk of %s has %d KiB free, less than the %d KiB kept: new orders and amends are refused "
                      "unavailable until there is room again; cancels go on", self.node.data_dir, free // 1024,
                      reserve // 1024)
        elif free >= reserve + reserve // 4 and self.cancels_only:  # a margin: no flapping at the edge
            self.cancels_only = b""
            log.info("the disk of %s has %d KiB free again: orders are taken again", self.node.data_dir, free // 1024)

    def engine_failed(self, symbol: str, cmd: object) -> None:
        """Log an engine exception (a bug), at most once a second with its traceback."""
        now = time.monotonic()
        if now - self._last_engine_log >= PROBLEM_LOG_S:
            self._last_engine_log = now
            log.exception("%s: the engine failed on %r", symbol, cmd)

    def refuse(self, problem: str, message: str) -> bytes:
        self.problems[problem] += 1
        return message.encode()

    def malformed_request(self, frames: list[bytes]) -> None:
        """A message from a router that is not ``REQS`` + one frame: dropped, counted (no
        client can be named in it)."""
        if frames[0] == REQS:
            self.problems["wrong frame count (dropped)"] += 1
        else:
            self.problems["unknown message kind (dropped)"] += 1

    def send_replies(self, replies: Iterable[tuple[zmq.Socket, bytes, bytes, bytes, object]]) -> None:
        """The replies of a batch, one ``REPS`` message per router (more past BATCH_BYTES)."""
        head = REPLY_HEAD.pack
        outbox: dict[zmq.Socket, list] = {}  # dealer -> [bytes so far, parts: 5 per reply]
        for dealer, client, header, status, payload in replies:
            if status is OK:
                payload = join_batch(payload)  # type: ignore[arg-type]
            size = REPLY_HEAD.size + len(client) + len(header) + len(status) + len(payload)  # type: ignore[arg-type]
            out = outbox.get(dealer)
            if out is None:
                outbox[dealer] = out = [0, []]
            elif out[1] and out[0] + size > BATCH_BYTES:
                self._send_batch(dealer, out)
            out[0] += size
            out[1] += (head(len(client), len(header), len(status), len(payload)),  # type: ignore[arg-type]
                       client, header, status, payload)
        for dealer, out in outbox.items():
            self._send_batch(dealer, out)

    def _send_batch(self, dealer: zmq.Socket, out: list) -> None:
        parts = out[1]
        try:
            _send(dealer, REPS, _MORE)
        except zmq.Again:
            self.dropped_replies += len(parts) // 5  # that router is gone: its clients' connections went with it
        else:
            _send(dealer, b"".join(parts), _NOBLOCK)  # the first part was accepted: so is this one
        out[0] = 0
        parts.clear()

    def publish(self, published: Iterable[tuple[str, list, list[bytes]]], last_public: dict[str, float],
                now: float) -> None:
        pub = self.pub
        public_types = _PUBLIC
        hold = self.fills.add
        counts, epoch = self.account_frames, self.epoch
        for symbol, events, records in published:
            public = []
            private: dict[str, list[bytes]] = {}
            for event, record in zip(events, records):
                if type(event) in public_types:
                    public.append(record)
                else:
                    account = event.account
                    held = private.get(account)
                    if held is None:
                        private[account] = [record]
                    else:
                        held.append(record)
                    if type(event) is OrderFilled and event.maker:
                        hold(account, symbol, event.trade_id, event.ts_ns, record)
            if public:
                _send(pub, join_publication(symbol, public), _NOBLOCK)
                last_public[symbol] = now
            for account, own in private.items():
                count = counts.get(account)
                if count is None:
                    if len(counts) >= ACCOUNTS_COUNTED:
                        counts.clear()  # (cheaper than letting go one at a time: a new start is safe)
                    self.account_starts += 1
                    count = (self.account_starts, 1)
                else:
                    count = (count[0], count[1] + 1)
                counts[account] = count
                _send(pub, join_account_publication(account, own, (epoch, *count)), _NOBLOCK)

    def heartbeat(self, symbol: str, last_public: dict[str, float], now: float) -> None:
        """Publish ``symbol``'s heartbeat: the ``seq`` it is at, and when."""
        beat = FeedHeartbeat(symbol, self.engines[symbol].seq, time.time_ns())
        self.pub.send(encode_publication(symbol, (beat,)), _NOBLOCK)  # type: ignore[union-attr]
        last_public[symbol] = now

    def idle_heartbeats(self, last_public: dict[str, float], now: float) -> None:
        for symbol, last in last_public.items():
            if now - last >= IDLE_HEARTBEAT_S:
                self.heartbeat(symbol, last_public, now)

    def welcome(self, last_public: dict[str, float], now: float) -> None:
        """Answer each new subscription to one of this matcher's symbols with the symbol's
        heartbeat (its current ``seq``), at once.

        A gateway asks for a symbol's snapshot once a message of the symbol proves that its
        subscription reached the publisher (docs/wire.md, "Snapshots"); without this, a quiet
        symbol's first subscriber waited for the next idle heartbeat, up to 1.25 s. Relays pass
        their subscribers' subscriptions on (XPUB_VERBOSE) for the same reason. The heartbeat
        goes to every subscriber of the symbol, and says nothing new to the others. A prefix
        subscription gets the heartbeat of each symbol it covers (the empty one, of every
        symbol: ``zmx probe`` without ``--symbol``): up to ``WELCOMED_PREFIXES`` distinct
        prefixes a call, so that a peer sending them in a loop costs a scan of the symbols for
        each of 16, not of 512. Unsubscribe messages, other topics (accounts) and anything else
        a peer sends are read and dropped; at most one heartbeat per symbol goes out per call,
        so a peer that sends subscriptions in a loop costs the matcher a read each, and its
        subscribers little.
        """
        pub = self.pub
        assert pub is not None
        symbols = self.header_symbols
        # One heartbeat per symbol however many subscriptions came: each of them is in the
        # XPUB's filter once read, so one heartbeat sent after reading reaches them all.
        welcomed: set[str] = set()
        prefixes: set[bytes] = set()
        for _ in range(BATCH):
            try:
                message = pub.recv(_NOBLOCK)
            except zmq.Again:
                break
            if message[:1] != b"\x01":
                continue
            if message[-1:] == b"\x00":
                symbol = symbols.get(message[1:-1])
                if symbol is not None:
                    welcomed.add(symbol)
            elif len(prefixes) < WELCOMED_PREFIXES:  # a prefix (b"": everything, as zmx probe without --symbol)
                prefixes.add(message[1:])
        if b"" in prefixes:
            welcomed.update(symbols.values())
        elif prefixes:  # each symbol a prefix covers (the others get their idle heartbeat within a second)
            welcomed.update(symbol for topic, symbol in symbols.items()
                            if any((topic + b"\x00").startswith(prefix) for prefix in prefixes))
        for symbol in welcomed:
            self.heartbeat(symbol, last_public, now)

    def serve_snapshots(self) -> None:
        """Answer up to BATCH book requests (Clone pattern); see docs/wire.md."""
        snap = self.snap
        assert snap is not None
        recv, send = snap.recv_multipart, snap.send_multipart
        engines = self.header_symbols
        for _ in range(BATCH):
            try:
                frames = recv(_NOBLOCK)
            except zmq.Again:
                return
            peer, request = frames[0], frames[1:]
            envelope: list[bytes] = []
            if request and request[0] == b"":  # a REQ socket's delimiter: echo it
                envelope, request = [b""], request[1:]
            symbol = request[1] if len(request) >= 2 and len(request[1]) <= 128 else b""
            if len(request) == 2 and request[0] == SNAP:
                name = engines.get(symbol)
                if name is None:
                    self.problems["snapshot: unknown symbol"] += 1
                    what = (f"symbol {show(symbol, 64)}" if symbol or not request[1] else
                            f"a symbol of {len(request[1])} bytes (a symbol has at most 127)")
                    reply = [ERR, symbol, f"matcher {self.name} does not own {what}".encode()]
                else:
                    engine = self.engines[name]
                    bids, asks = engine.depth()
                    # and when it was taken (an update of a seq up to this one stamped later comes
                    # from a matcher that lost its history), and when the book last changed (the
                    # depth_snapshot's ts): docs/wire.md
                    reply = [SNAP, symbol, msgpack.packb([engine.seq, bids, asks, time.time_ns(), engine.changed_ns])]
            elif len(request) == 3 and request[0] == FILLS:
                reply = self.fills_reply(request[1], request[2])
            else:
                reply = [ERR, symbol, self.refuse(
                    "snapshot: malformed request",
                    f"a book request is 2 frames, {SNAP!r} and a symbol (a fills request 3, {FILLS!r}, an account "
                    f"and the trade ids it has); got {len(request)} frame(s)"
                    + (f" starting {request[0][:16]!r}" if request else ""))]
            try:
                send([peer, *envelope, *reply], _NOBLOCK)
            except zmq.ZMQError:
                self.problems["snapshot: reply dropped"] += 1

    def fills_reply(self, account_bytes: bytes, body: bytes) -> list[bytes]:
        """The answer to a gateway's ``FILLS`` request: ``account``'s fills of resting orders
        on the symbols it names, after the trade id it gives for each (docs/wire.md, "Fills a
        gateway missed")."""
        try:
            if len(body) > FILLS_REQUEST_MAX:
                raise ValueError(f"the trade ids are {len(body)} bytes, at most {FILLS_REQUEST_MAX}")
            if len(account_bytes) > FILLS_ACCOUNT_MAX:  # account_topic below has the exact limit
                raise ValueError(f"the account is {len(account_bytes)} bytes, at most {FILLS_ACCOUNT_MAX - 2}")
            account = account_bytes.decode("utf-8")
            try:
                after = msgpack.unpackb(body)
            except (ValueError, msgpack.UnpackException) as e:
                raise ValueError(f"the trade ids are not msgpack ({str(e) or type(e).__name__})") from None
            if not account:
                raise ValueError("the account is empty")
            wanted = "a msgpack map of symbol -> the last trade id the gateway has of it (0 for none)"
            if type(after) is not dict:
                raise ValueError(f"the trade ids are not {wanted}")
            for symbol, trade_id in after.items():
                if type(symbol) is not str or type(trade_id) is not int or not 0 <= trade_id <= MAX_INT:
                    raise ValueError(f"the trade ids hold {symbol!r}: {trade_id!r}; expected {wanted}")
            publication = join_account_publication(account, self.fills.of(account, after))  # checks the account
        except ValueError as e:  # UnicodeDecodeError is one
            return [ERR, account_bytes[:FILLS_ACCOUNT_MAX], self.refuse("fills: malformed request", str(e))]
        # each symbol's seq now: the answer holds every fill up to it (served between batches)
        seqs = {symbol: self.engines[symbol].seq for symbol in after if symbol in self.engines}
        # and the trade ids asked, so that a gateway tells this answer from one to an earlier request
        answer = [self.name, self.fills.complete_since_ns, publication, seqs, after]
        return [FILLS, account_bytes, msgpack.packb(answer)]

    def connection_events(self, monitor: zmq.Socket, now: float) -> None:
        """HELLO on every new connection to a router; a new DEALER for a lost one.

        A lost connection is never left to ZeroMQ to restore: after a protocol error (such
        as a frame over MAXMSGSIZE) libzmq gives the connection up for good.
        """
        link = self.monitors[monitor]
        router = link.router
        while True:
            try:
                event = recv_monitor_message(monitor, zmq.NOBLOCK)
            except zmq.Again:
                return
            except Exception:  # noqa: BLE001 - a monitor message we cannot read is not worth stopping for
                return
            kind = event["event"]  # type: ignore[index]
            quiet = now - self._last_conn_log.get(router, -1e9) < PROBLEM_LOG_S
            if not quiet:
                self._last_conn_log[router] = now
            if kind == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                try:
                    link.dealer.send(HELLO, _MORE)
                    link.dealer.send(self.hello, _NOBLOCK)
                except zmq.Again:
                    pass  # gone again already: the next connection says HELLO
                if not quiet:
                    log.info("connected to router %s: HELLO sent (epoch %d)", router, self.epoch)
            elif kind == zmq.EVENT_DISCONNECTED:
                if self.stopper is not None and self.stopper.stopped:
                    return  # the cluster stops: its routers go too, and that is no problem to report
                self.problems[f"connection to router {router} lost"] += 1
                dropped = self._unlink(link)
                self.links[self.links.index(link)] = self._link(router, link.endpoint)
                if dropped:
                    self.problems[f"requests dropped with the connection to router {router}"] += dropped
                if not quiet:
                    log.warning("lost the connection to router %s (it went away, or sent a frame over %d bytes); "
                                "connecting again", router, MAX_BATCH_FRAME_BYTES)
                return  # that monitor is closed

    def broadcast(self, kind: bytes, body: bytes) -> None:
        for link in self.links:
            try:
                link.dealer.send(kind, _MORE)
                link.dealer.send(body, _NOBLOCK)
            except zmq.Again:
                pass  # not connected to that router now (IMMEDIATE): nothing to tell it

    def fork_snapshot(self) -> None:
        """Snapshot every engine in a forked child process, so the loop never waits for it.

        ``engine.snapshot()`` costs time in proportion to a symbol's book and the order ids
        used since the last snapshot: tens to hundreds of milliseconds for a busy one, which
        would stall every order behind it. The child gets a copy-on-write image of the engines
        at the moment the journal starts its new segment, stores their used ids in the archive
        (``zmx.node.usedids``), writes the snapshot file without them and exits; the parent
        goes on serving and reaps it (``reap_snapshot``), then moves that generation of ids
        from the engines' memory into the archive's filters (``absorb_used_ids``).
        """
        journal = self.journal
        assert journal is not None
        try:
            number = journal.rotate()
        except OSError as e:
            log.critical("cannot start a new journal segment in %s (%s); stopping", self.node.data_dir, e)
            raise SystemExit(1) from None
        used_ids = self.used_ids
        assert used_ids is not None
        used_ids.release()
        # Every object alive now moves to the collector's permanent generation: a collection
        # while the child lives would otherwise walk (and so copy, page by page) the whole heap
        # the two processes share (measured: a full collection right after a fork stalled the
        # loop 65 ms). Frozen objects are still freed when their last reference goes; only a
        # reference cycle among them would never be collected, and the order path makes none
        # (tests/test_engine_stress.py checks).
        gc.freeze()
        orphaned = self.orphaned
        try:
            pid = os.fork()
        except OSError as e:
            self.reopen_used_ids()
            log.error("cannot fork to write a snapshot (%s); the journal goes on without it", e)
            return
        if pid == 0:  # the child: no sockets, no cleanup, only the files (and its error, if any)
            status = 1
            try:
                if orphaned is not None:
                    orphaned()
                gc.disable()  # a short-lived process: no collection (which would copy pages) in it
                os.closerange(3, _MAX_FD)  # not its sockets, nor the data directory's lock
                os.nice(19)  # the serving process comes first
                # The ids go to the archive, durably, before the snapshot that no longer holds them.
                archived = store_used_ids(journal.directory, number,
                                          [(s, e.pop_used_ids()) for s, e in self.engines.items()])
                journal.store_snapshot(number, {s: e.snapshot() for s, e in self.engines.items()}, archived)
                status = 0
                with contextlib.suppress(OSError):  # left for the next snapshot, or the next start
                    journal.remove_obsolete()
            except BaseException as e:  # noqa: BLE001 - said, then the parent reports the status
                # (logging is safe here: it resets its locks in a forked child; the log goes to stderr)
                log.error("the process writing snapshot %d failed: %s", number, e)
            finally:
                os._exit(status)
        self.reopen_used_ids()
        for engine in self.engines.values():
            engine.hand_over_used_ids()  # still looked up in memory until the child has stored them
        self.snapshot_child = (pid, number, time.perf_counter())

    def reopen_used_ids(self) -> None:
        """The archive's connection again after a fork; without it no order id can be checked."""
        assert self.used_ids is not None
        try:
            self.used_ids.reopen()
        except sqlite3.Error as e:
            log.critical("cannot reopen the archive of used order ids in %s (%s); stopping", self.node.data_dir, e)
            raise SystemExit(1) from None

    def reap_snapshot(self, flags: int) -> None:
        """Collect the snapshot child if it ended (``os.WNOHANG``), or wait for it (``0``)."""
        assert self.snapshot_child is not None and self.journal is not None
        pid, number, started = self.snapshot_child
        try:
            done, status = os.waitpid(pid, flags)
        except ChildProcessError:
            done, status = pid, -1
        if not done:
            return
        self.snapshot_child = None
        took_ms = (time.perf_counter() - started) * 1000
        if status == 0:
            self.journal.snapshot_stored(number)
            self.absorbing = True
            (log.info if took_ms > 1000 else log.debug)(
                "snapshot %d of %d engine(s) written in %.0f ms (by process %d)", number, len(self.engines),
                took_ms, pid)
        else:
            for engine in self.engines.values():
                engine.keep_handed()  # the next snapshot's child stores them
            log.error("the process writing snapshot %d ended with status %#x; the journal goes on without it, "
                      "a later snapshot replaces it", number, status)

    def load_used_ids(self, budget_s: float) -> None:
        """Fill the archive's filters with more of the ids stored before this start, for about
        ``budget_s`` (a slice per loop turn, as ``absorb_used_ids``); say when they are whole."""
        assert self.used_ids is not None
        deadline = time.perf_counter() + budget_s
        while self.used_ids.load(LOAD_SLICE) and time.perf_counter() < deadline:
            pass
        if not self.used_ids.loading:
            self.loading_ids = False
            log.info("order-id filters filled with the %d archived id(s) in %.1f s; %s", self.used_ids.total,
                     time.monotonic() - self.started_at, filters_text(self.used_ids))

    def absorb_used_ids(self, limit: int) -> None:
        """Move up to ``limit`` ids of the stored generation from the engines' memory into the
        archive's filters (a slice per loop turn: a whole generation at once would stall the
        loop for tens of milliseconds)."""
        assert self.used_ids is not None
        for symbol, engine in self.engines.items():
            if engine.handed:
                ids = self.used_ids.symbols[symbol]
                tiers = len(ids.tiers)
                ids.absorb(engine.take_handed(limit))
                if len(ids.tiers) != tiers:  # a step in the matcher's memory, by design: say so
                    log.info("%s: order-id filter tier %d of %d KiB started for %d ids; %s", symbol, len(ids.tiers),
                             len(ids.tiers[-1].bits) // 1024, ids.tiers[-1].capacity, filters_text(self.used_ids))
                return
        self.absorbing = False

    # -- logs -------------------------------------------------------------------------------

    def log_problems(self) -> None:
        self.problems_total.update(self.problems)
        counts = ", ".join(f"{what} {n}" for what, n in sorted(self.problems.items()))
        log.warning("refused, dropped or lost in the last %.0f s: %s", PROBLEM_LOG_S, counts)
        self.problems.clear()

    def log_stats(self) -> None:
        for symbol, engine in self.engines.items():
            total = self.commands[symbol]
            new = total - self._reported[symbol]
            if new:
                log.info("%s: %d command(s) (+%d in %.0f s), %d trade(s), seq %d, %d resting order(s)",
                         symbol, total, new, STATS_INTERVAL_S, engine.next_trade_id - 1, engine.seq,
                         engine.resting())
                self._reported[symbol] = total
        if self.dropped_replies:
            log.warning("%d repl(y/ies) dropped: their router was not connected", self.dropped_replies)
            self.dropped_replies = 0

    # -- stop -------------------------------------------------------------------------------

    def close(self) -> None:
        """Let a snapshot being written finish, sync the journal, say BYE, close every socket
        (what is queued may leave for ``STOP_LINGER_MS``)."""
        if self.snapshot_child is not None:
            self.reap_snapshot(0)
        if self.journal is not None:
            try:
                self.journal.close()
            except OSError as e:
                log.error("cannot close the journal cleanly on stop (the next start takes it for a crash): %s", e)
        for link in self.links:
            try:
                link.dealer.send(BYE, _NOBLOCK)
            except zmq.ZMQError:
                pass
            link.dealer.disable_monitor()
            link.monitor.close(0)
            link.dealer.close(STOP_LINGER_MS)
        if self.pub is not None:
            self.pub.close(STOP_LINGER_MS)
        if self.snap is not None:
            self.snap.close(0)
        if self.ctx is not None:
            self.ctx.term()
        if self.used_ids is not None:
            self.used_ids.close()
        if not self.served:
            return
        self.problems_total.update(self.problems)
        total = sum(self.commands.values())
        problems = ", ".join(f"{what} {n}" for what, n in sorted(self.problems_total.items())) or "none"
        log.info("stopped after %d command(s) this run; refused, dropped or lost since start: %s", total, problems)


def run(topology: Topology, name: str, stopper: Stopper) -> None:
    """Serve matcher ``name`` until ``stopper.stopped``; exit status 1 if it cannot start."""
    keep_mmap_threshold()  # before recovery builds the books and the id filters
    try:
        matcher = Matcher(topology, name)
    except _StartFailure as e:
        log.error("%s", e)
        raise SystemExit(1) from None
    try:
        try:
            matcher.start(stopper)
        except _StartFailure as e:
            log.error("%s", e)
            raise SystemExit(1) from None
        except StartStopped:
            log.info("stopped while starting; the next start recovers from where this one began")
            return
        # The collector's full passes would otherwise stall the loop for tens of milliseconds
        # (measured: p99 ack latency).
        settle_collector()
        matcher.served = True
        announce_ready(name, "matcher", **matcher.ready_details())
        log.info("serving %s (epoch %d, fsync %s) on pub %s, snapshot %s, routers %s",
                 ", ".join(matcher.symbols) or "no symbols", matcher.epoch, matcher.node.fsync,
                 matcher.node.pub, matcher.node.snapshot, ", ".join(r.name for r in matcher.routers) or "none")
        matcher.serve(stopper)
    finally:
        matcher.close()
