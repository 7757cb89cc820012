"""Fan-out: what a gateway delivers to many WebSocket clients, beside two raw asyncio ceilings
measured in the same run (issue 4).

Real processes on free ports, the topology and logs in a temporary directory: a router and one
matcher that owns ten symbols (``fsync: never``: the matcher's journal is not what is measured
here, and with it every figure would wait for the disk), and per cell (N connections, K
channels) a fresh gateway (``zmx node g1``, ``--workers``). The load is:

- **clients** (``--role clients``, this file): several processes, each under the ~19,900
  sockets a process may open (at most ``MAX_PER_PROCESS`` connections each), spread over
  several loopback source addresses (bind with ``IP_BIND_ADDRESS_NO_PORT`` before connect, so
  ephemeral ports never run short). Connection ``i`` subscribes channel ``i % K``. They are raw
  asyncio (uvloop) protocols, not ``websockets``: they share the two cores with the server,
  and ``websockets``' per-frame Python work (about 10 µs a frame) would make them the
  bottleneck. A client does the HTTP upgrade, sends its masked ``subscribe`` and walks the
  frames with a small parser until its ``depth_snapshot``; after it, all connections but the
  samplers (below) only *count* messages: ``bytes.count(b'"type":"')`` over each chunk (plus the
  occurrences split between two chunks), exact because every server message is one JSON
  object with one top-level ``type`` and nothing else in a feed frame holds that text; they
  answer pings (``0x89 0x04``: a 4-byte ping). Every ``SAMPLE_EVERY``-th connection of each
  channel is a *sampler*: it walks every frame, parses its JSON (orjson), counts types, checks
  ``prev_seq`` and takes the latency of every ``trade`` and ``depth_update`` from ``data.ts``
  (the matcher's ``time.time_ns()``; the same clock on one machine) twice: to the message's
  *arrival*, the time the kernel stamped on its TCP segment (``SO_TIMESTAMPNS``, read with
  ``recvmsg``: see ``StampedSocket``), and to the time this process *read* it. Arrival is the
  push latency of the server: on this 2-core box the read time adds the wait of a Python client
  process for a core it shares with the server, which a client on its own host would not pay.
  Every connection's count is kept, so an uneven channel (a connection that got fewer
  messages than another of its channel) shows. The client processes run under
  ``SCHED_BATCH`` (``--clients-sched``): the kernel then never lets a client that a frame
  woke preempt the server in the middle of a walk over its connections, as clients on hosts
  of their own could not. They keep their full share of the cores, unlike clients pinned to
  a core of their own (at 5,000 connections those became the bottleneck). ``normal`` runs
  them as before.
- **driver** (``--role driver``): ``zmx.node.client.Client`` against the router, a seeded flow
  over the K symbols: resting limit orders near a mid (55%), cancels (30%), and ioc orders
  that cross (15%) and make trades, so the feed is ``depth_update`` s and ``trade`` s.
  Before the first cell it rests 20 orders a side on every symbol.

Rounds of a cell (the same for every target):

1. **moderate**: ``--moderate`` orders/s per channel for ``--moderate-seconds``, paced open loop
   (``bench_orders.paced``), lowered where it would make more than ``--moderate-cap``
   deliveries/s (``moderate_rate``: at N = 5,000 and 15,000 the full rate would keep even the
   raw servers' walks busy most of the time, and the round would measure their backlogs).
   ``--moderate-rounds`` (3) such rounds, one after the other, and the one with the median
   p99 counts (``moderate``; every round is in ``moderate_rounds``): the p99 ratio between
   servers is a target, and one disturbance of the machine inside a single round moved it
   4x (a cell at 4.17x gave 1.0x rerun at once).
2. **max**: a burst of orders sent as fast as the driver goes (256 in flight); the count is
   chosen so that about ``--max-delivered`` messages are delivered (at most 20,000 orders). The
   gateway takes them as fast as it can: delivered/s and CPU per message at saturation; the
   latency of this round is mostly the backlog the burst leaves.
3. **high**: paced again for ``--seconds``, at ``--high`` (half) of the delivered rate the burst
   reached (at most ``MAX_PACED`` orders/s): the latency near the maximum, without a backlog.

The ceilings (``--role ceiling``, this file): a bare asyncio (uvloop) WebSocket server that
accepts the same clients (handshake, ``subscription_ack``, a snapshot) and sends frames of the
gateway's shape and size (captured from the gateway's own feed by the samplers; a made-up
feed of the same shape when there is no gateway). Its feed is the gateway's own
(``--ceiling-feed matcher``, the default since the results files with that
``config.ceiling_feed``): a SUB on the matcher's PUB, subscribed to the cell's K symbols, and
the driver sends the orders of the gateway's round of the same kind (``Bench.commands``; the
write ceiling's max round: a fifth of the burst, as at about 5 µs a delivery it would take
minutes). Of each publication the ceiling makes the frames the gateway makes of it, a
``trade`` per trade and a ``depth_update`` per book change, from ready-made templates with the
event's ``ts`` written in (the records unpacked with ``msgpack``, nothing checked, no book
kept): so its latency starts at the matcher's ``ts``, as the gateway's does, and the order
path's share of a round (the matcher's batch, its publication, the machine it shares) is in
both. ``--ceiling-feed zeromq`` (the files before) feeds them from a feeder process
(``--role feeder``) instead, over ZeroMQ too, which sends the ready-made frames at the feed
rate and with the message count the gateway's round had, ``ts`` written as it sends: then the
gateway's latency holds the matcher's part and the ceilings' does not (the matcher adds about
0.3 ms at p50 before a publication reaches a bare SUB, and at p99 up to 16 ms in a busy cell).
The ceiling reads up to 4,096 publications a loop turn (the gateway's ``SUB_BATCH``) and then:

- **write**: one ``transport.write`` per message per connection;
- **coalesce**: the frames of a loop turn joined per channel, each connection one write per
  loop turn with all of its bytes (the gateway's own fan-out, without anything else).

Both stop reading the feed while any connection's transport is paused, so they never drop
(the feed waits in ZeroMQ's queue). A ceiling that made its feed in its own loop would leave
out the ZeroMQ hop that every gateway pays (0.2-0.5 ms at p50 here), which at small N is most
of the gateway's p99: the ratio would measure the hop, not the server.

Figures per round: delivered messages/s (every message every client counted, over the time from
the first to the last feed message a sampler received), server CPU (utime + stime from
``/proc``, every gateway worker) per million delivered messages and delivered per CPU-second,
latency p50 / p99 / p99.9 to arrival (``latency_ms``; the targets) and to the read
(``read_latency_ms``) from the samplers, in the moderate rounds of every server fed by the
matcher the latency of the feed alone (``feed_latency_ms``: a bare SUB on the matcher's PUB at
``SCHED_FIFO``, ``role_feedprobe``: its share of the gateway's latency, and of a matcher-fed
ceiling's), in every round of the gateway its own figures of it (``gateway_log``: the stats line
that SIGUSR1 makes it log, asked before and after the round; the feed's lag as it took each
publication and its fan-out turns, p50 / p99 / max; the ceilings' walks over their connections,
timed the same way, in ``driver.turn_ms``), the CPU of the clients, driver, matcher and router,
and per cell the server's RSS delta per idle subscribed connection (RSS once all N subscribed
and idle, minus RSS with one anchor connection per channel, / N). Targets: ``TARGETS``.

Cells are measured one after the other, the three targets of a cell in turn (gateway first: the
ceilings get the orders or the feed rates of its rounds); no best-of: one high round,
``--moderate-rounds`` (3) moderate rounds of which the one with the median p99 counts (above),
and ``--max-rounds`` (3) bursts for the gateway and for each ceiling, of which the one with the
median delivered messages per CPU-second counts (``max``; every burst is in ``max_rounds``).
One burst is a second or two, and how many publications each write carries in it moves
from burst to burst: the CPU ratio of one cell moved between 0.49 and 0.88 over three runs
of the same code with a single burst.

Run: ``.venv/bin/python perf/bench_fanout.py`` (N = 500, 1,000, 5,000, 15,000; K = 1, 10;
about 14 minutes) or ``--quick`` (N = 200, about a minute, no results file). Writes
``perf/results/fanout.json`` when it measured the whole matrix (every N, K and target): a run
of some cells (``--n 500 --k 1``) keeps its figures only with ``--json FILE``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import hashlib
import json
import math
import os
import random
import re
import signal
import socket
import subprocess
import struct
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import msgpack
import orjson
from _common import (ROOT, _cpu_jiffies, above_zero, arguments, at_least_one, machine_busy, noise_note,
                     remove_directory, shielded, warn, write_results)
from summaries import summarize
from bench_orders import (
    ACCOUNTS,
    MAX_DISTANCE,
    MID,
    Helper,
    await_route,
    cpu_jiffies,
    paced,
    pipelined,
    print_rows,
    stop_on_sigterm,
    watchdog,
)
from nodes import (  # tests/nodes.py, on the path through bench_orders
    NodeProcess,
    free_ports,
)

from zmx.codec import TYPE_CODES
from zmx.commands import CancelOrder, Command, SubmitOrder
from zmx.events import BookChanged, TradeOccurred
from zmx.model import OrderType, Side, TimeInForce
from zmx.node.histogram import LatencyHistogram
from zmx.node.runtime import announce_ready
from zmx.topics import topic

SCRIPT = Path(__file__).resolve()
SYMBOLS = tuple(f"S{i:03d}-USDT" for i in range(10))
MAX_PER_PROCESS = 15_000  # connections per client process (a process may open ~19,900 sockets)
CLIENT_SCHED = ("batch", "normal")
SAMPLE_EVERY = 16  # every 16th connection parses its frames (latency, types, prev_seq)
PAT = b'"type":"'  # once in every server message
PING = b"\x89\x04"  # a ping frame with a 4-byte payload (what the gateway sends)
HEARTBEAT = b'"type":"heartbeat"'  # counted apart: idle-channel heartbeats are not feed
IP_BIND_ADDRESS_NO_PORT = 24  # Linux: bind() picks no port; connect() picks one per destination
SO_TIMESTAMPNS = 35  # Linux (SO_TIMESTAMPNS_OLD): recvmsg gives the kernel's receive time; not in ``socket``
STAMP_SPACE = socket.CMSG_SPACE(16)  # one struct timespec
HELPER_MAX_S = 3600  # a helper ends by itself after this long (or as soon as the benchmark is gone)
MAX_PACED = 3_000.0  # orders/s the driver is asked for at most in a paced round
WRITE_MAX_SHARE = 5  # the write ceiling's max round emits 1/5 of the gateway's burst (same rate)
FEEDPROBE_PRIORITY = 10  # its SCHED_FIFO priority (role_feedprobe)
TRADE_CODE, BOOK_CODE = TYPE_CODES[TradeOccurred], TYPE_CODES[BookChanged]  # a matcher-fed ceiling's records
# What feeds the ceilings: the matcher's PUB, as the gateway is fed (``matcher``), or a feeder
# process that replays the gateway round's rate with frames stamped as it sends them (``zeromq``).
CEILING_FEEDS = ("matcher", "zeromq")
TURN_CAP = 4096  # messages a ceiling emits per loop turn when behind (the gateway's SUB_BATCH)
FULL_N = [500, 1_000, 5_000, 15_000]  # the whole matrix: only its runs go to perf/results/fanout.json
FULL_K = [1, 10]
FULL_TARGETS = ["gateway", "write", "coalesce"]
SEND_QUEUE_BYTES = 1_048_576  # the ceilings' transport high-water mark (the gateway's default bound)
WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

TARGETS = {
    "delivered_per_cpu_s_vs_coalesce": 0.8,  # gateway / coalescing ceiling, delivered per server CPU-second
    "delivered_per_s_at_5000": 1_000_000,
    "kb_per_idle_connection": 3.2,
    "p99_vs_raw": 1.2,  # gateway p99 / raw (write) ceiling p99, same N and rate (see SAME_RATE)
    "p99_ms_at_500_per_process": 5.0,
}
FEED_PER_ORDER = 1.2  # feed messages an order of the flow makes, about (measured: 1.2-1.3)
SAME_RATE = 0.9  # a round's p99 is compared with the raw server's only if it kept this share of the rate

# order flow
CROSS_SHARE, CANCEL_SHARE = 0.15, 0.30
LIVE_CAP = 300
PRIME_PER_SIDE = 20
BUY, SELL, LIMIT, GTC, IOC = Side.BUY, Side.SELL, OrderType.LIMIT, TimeInForce.GTC, TimeInForce.IOC


# -- order flow --------------------------------------------------------------------------------------


class FanoutFlow:
    """A seeded order flow: per command one symbol of the first ``k`` in turn gets a resting
    limit order 1-20 ticks from the mid, a cancel of one of its resting orders, or an ioc order
    priced through the whole book range, which trades against what rests and leaves nothing."""

    def __init__(self, seed: int, symbols: Sequence[str]) -> None:
        self.rng = random.Random(seed)
        self.symbols = tuple(symbols)
        self.live: dict[str, list[tuple[str, str]]] = {s: [] for s in symbols}
        self.turn = 0
        self.ids = 0

    def _rest(self, symbol: str, side: Side, prefix: str) -> SubmitOrder:
        rng = self.rng
        self.ids += 1
        order_id, account = f"{prefix}{self.ids}", ACCOUNTS[rng.randrange(len(ACCOUNTS))]
        distance = rng.randint(1, MAX_DISTANCE)
        price = MID - distance if side is BUY else MID + distance
        self.live[symbol].append((order_id, account))
        return SubmitOrder(order_id, account, symbol, side, LIMIT, GTC, price, rng.randint(1, 500))

    def prime(self, per_side: int) -> list[Command]:
        return [self._rest(symbol, side, "p") for symbol in self.symbols for side in (BUY, SELL)
                for _ in range(per_side)]

    def take(self, n: int, k: int, prefix: str) -> list[Command]:
        rng = self.rng
        out: list[Command] = []
        for _ in range(n):
            symbol = self.symbols[self.turn % k]
            self.turn += 1
            resting = self.live[symbol]
            r = rng.random()
            if resting and (len(resting) >= LIVE_CAP or r < CANCEL_SHARE):
                j = rng.randrange(len(resting))
                order_id, account = resting[j]
                resting[j] = resting[-1]
                resting.pop()
                out.append(CancelOrder(order_id, account, symbol))
            elif r < CANCEL_SHARE + CROSS_SHARE:
                self.ids += 1
                side = BUY if rng.random() < 0.5 else SELL
                price = MID + MAX_DISTANCE if side is BUY else MID - MAX_DISTANCE
                out.append(SubmitOrder(f"{prefix}{self.ids}", ACCOUNTS[rng.randrange(len(ACCOUNTS))], symbol, side,
                                       LIMIT, IOC, price, rng.randint(1, 300)))
            else:
                out.append(self._rest(symbol, BUY if rng.random() < 0.5 else SELL, prefix))
        return out


# -- WebSocket bits shared by the client and the ceiling ----------------------------------------------


def _mask(payload: bytes, key: bytes) -> bytes:
    n = len(payload)
    if not n:
        return b""
    return (int.from_bytes(payload, "big") ^ int.from_bytes((key * (n // 4 + 1))[:n], "big")).to_bytes(n, "big")


def client_frame(opcode: int, payload: bytes) -> bytes:
    """A masked frame, as a client must send (payload below 64 KiB)."""
    key = os.urandom(4)
    n = len(payload)
    head = bytes((0x80 | opcode, 0x80 | n)) if n < 126 else bytes((0x80 | opcode, 0xFE)) + n.to_bytes(2, "big")
    return head + key + _mask(payload, key)


def server_frames(buf: bytes) -> Iterator[tuple[int, int, int]]:
    """``(opcode, payload start, end)`` of each whole (unmasked) server frame at the start of
    ``buf``, in order; what follows the last one's ``end`` is a frame still incomplete."""
    i, size = 0, len(buf)
    while size - i >= 2:
        b1 = buf[i + 1] & 0x7F
        if b1 < 126:
            h, length = 2, b1
        elif b1 == 126:
            if size - i < 4:
                return
            h, length = 4, (buf[i + 2] << 8) | buf[i + 3]
        else:
            if size - i < 10:
                return
            h, length = 10, int.from_bytes(buf[i + 2:i + 10], "big")
        end = i + h + length
        if end > size:
            return
        yield buf[i] & 0x0F, i + h, end
        i = end


def server_frame(payload: bytes, opcode: int = 1) -> bytes:
    """An unmasked frame, as a server sends."""
    n = len(payload)
    if n < 126:
        head = bytes((0x80 | opcode, n))
    elif n < 65536:
        head = bytes((0x80 | opcode, 126)) + n.to_bytes(2, "big")
    else:
        head = bytes((0x80 | opcode, 127)) + n.to_bytes(8, "big")
    return head + payload


def bucket_us(us: int) -> int:
    """Latency histogram bucket (µs): 10 µs wide below 1 ms, 100 µs below 10 ms, then 1 ms, 10 ms."""
    if us < 1_000:
        return us // 10 * 10 if us > 0 else 0
    if us < 10_000:
        return us // 100 * 100
    if us < 100_000:
        return us // 1_000 * 1_000
    return us // 10_000 * 10_000


def hist_percentiles(hist: dict[int, int]) -> dict[str, float | None]:
    """p50 / p99 / p99.9 / max in ms of a merged histogram (bucket lower bounds)."""
    total = sum(hist.values())
    out: dict[str, float | None] = {"samples": total, "p50": None, "p99": None, "p99.9": None, "max": None}
    if not total:
        return out
    keys = sorted(hist)
    for name, p in (("p50", 0.50), ("p99", 0.99), ("p99.9", 0.999)):
        want = math.ceil(total * p)
        seen = 0
        for k in keys:
            seen += hist[k]
            if seen >= want:
                out[name] = round(k / 1000, 3)
                break
    out["max"] = round(keys[-1] / 1000, 3)
    return out


# -- load clients (--role clients) ------------------------------------------------------------------

HANDSHAKE, SETUP, COUNT, WALK = range(4)


class ClientProc:
    """What one client process knows (shared by its connections)."""

    def __init__(self, want: int) -> None:
        self.want = want
        self.ready = 0
        self.all_ready = asyncio.Event()
        self.first_ns = 0
        self.last_ns = 0
        self.lost = 0
        self.pongs = 0
        self.connect_errors: Counter[str] = Counter()
        self.reset()
        self.examples: dict[str, str] = {}

    def reset(self) -> None:
        self.first_ns = self.last_ns = 0
        self.hist: Counter[int] = Counter()  # ts -> arrival in the client's kernel (µs buckets)
        self.hist_read: Counter[int] = Counter()  # ts -> read by the client process
        self.types: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        self.breaks = 0


class WsClient(asyncio.Protocol):
    """One load connection; see the module documentation. Cheap per message on purpose."""

    __slots__ = ("arrived_ns", "buf", "channel", "depth_seq", "hb", "host", "n", "proc", "sampler", "state", "tail",
                 "transport", "upgraded")

    def __init__(self, proc: ClientProc, channel: str, sampler: bool, host: bytes) -> None:
        self.proc = proc
        self.channel = channel
        self.sampler = sampler
        self.host = host
        self.state = HANDSHAKE
        self.buf = b""
        self.tail = b""
        self.n = 0
        self.hb = 0
        self.depth_seq: int | None = None
        self.arrived_ns = 0  # a sampler's chunk: when its last segment reached the kernel (StampedSocket)
        self.transport: asyncio.Transport | StampedSocket | None = None
        self.upgraded: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        key = base64.b64encode(os.urandom(16))
        transport.write(b"GET / HTTP/1.1\r\nHost: " + self.host + b"\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                        b"Sec-WebSocket-Key: " + key + b"\r\nSec-WebSocket-Version: 13\r\n\r\n")

    def connection_lost(self, exc: Exception | None) -> None:
        self.proc.lost += 1
        self.transport = None
        if not self.upgraded.done():
            self.upgraded.set_exception(ConnectionError(f"closed before the upgrade: {exc}"))

    def data_received(self, data: bytes) -> None:
        if self.state == COUNT:  # the hot path
            # every occurrence inside the chunk, plus those split between the last chunk and this
            # one (the 17 bytes before it and 17 of it hold no whole one: the patterns are longer)
            tail = self.tail
            t = len(tail)
            edge = tail + data[:17]
            self.n += data.count(PAT) + edge[t - 7 if t > 7 else 0:t + 7].count(PAT)
            self.hb += data.count(HEARTBEAT) + edge.count(HEARTBEAT)
            self.tail = data[-17:] if len(data) >= 17 else (tail + data)[-17:]
            if b"\x89" in data:  # (memchr: much faster than looking for the two bytes)
                self._pings(data)
            return
        if self.state == HANDSHAKE:
            buf = self.buf + data
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                self.buf = buf
                return
            self.buf = b""
            if not buf.startswith(b"HTTP/1.1 101"):
                self.proc.connect_errors[buf.split(b"\r\n", 1)[0].decode(errors="replace")[:80]] += 1
                if self.transport is not None:
                    self.transport.close()
                return
            self.state = SETUP
            self.upgraded.set_result(None)
            assert self.transport is not None
            self.transport.write(client_frame(1, b'{"action":"subscribe","channel":"' + self.channel.encode()
                                              + b'"}'))
            data = buf[end + 4:]
            if not data:
                return
        self._walk(data)

    def _pings(self, data: bytes) -> None:
        i = data.find(PING)
        while i >= 0:
            if i + 6 <= len(data) and self.transport is not None:
                self.transport.write(client_frame(0xA, data[i + 2:i + 6]))
                self.proc.pongs += 1
            i = data.find(PING, i + 2)

    def _walk(self, data: bytes) -> None:
        buf = self.buf + data if self.buf else data
        now = time.time_ns()
        arrived = self.arrived_ns or now
        i = 0
        for opcode, start, end in server_frames(buf):
            if opcode == 1:
                self.n += 1
                self._message(buf[start:end], now, arrived)
                if self.state == COUNT:  # its snapshot came: from here on it only counts
                    self.buf = b""
                    rest = buf[end:]
                    if rest:
                        self.data_received(rest)
                    return
            elif opcode == 9 and self.transport is not None:
                self.transport.write(client_frame(0xA, buf[start:end]))
                self.proc.pongs += 1
            i = end
        self.buf = buf[i:]

    def _message(self, payload: bytes, now: int, arrived: int) -> None:
        proc = self.proc
        try:
            msg = orjson.loads(payload)
            kind = msg.get("type")
        except (orjson.JSONDecodeError, AttributeError):
            proc.errors["not_json_object"] += 1
            return
        proc.types[kind] += 1
        if kind == "depth_update" or kind == "trade":
            data = msg["data"]
            if self.state == WALK:  # the round's window: first and last feed message a sampler got
                if not proc.first_ns:
                    proc.first_ns = now
                proc.last_ns = now
                ts = data.get("ts")
                if isinstance(ts, int):
                    proc.hist[bucket_us((arrived - ts) // 1000)] += 1
                    proc.hist_read[bucket_us((now - ts) // 1000)] += 1
                if kind not in proc.examples:
                    proc.examples[kind] = payload.decode()
            if kind == "depth_update":
                if self.depth_seq is not None and data.get("prev_seq") != self.depth_seq:
                    proc.breaks += 1
                self.depth_seq = data.get("seq")
        elif kind == "depth_snapshot":
            self.depth_seq = msg["data"].get("seq")
            if self.state == SETUP:
                if "depth_snapshot" not in proc.examples:
                    proc.examples["depth_snapshot"] = payload.decode()
                self.state = WALK if self.sampler else COUNT
                proc.ready += 1
                if proc.ready >= proc.want:
                    proc.all_ready.set()
        elif kind == "heartbeat":
            self.hb += 1
        elif kind == "error":
            proc.errors[str(msg.get("code"))] += 1


class StampedSocket:
    """A sampler's socket, read without an asyncio transport: ``recvmsg`` with ``SO_TIMESTAMPNS``
    gives each chunk the time its last TCP segment reached this host's kernel, so a sampler's
    latency is the gateway's (and the network's), not the time this Python process took to get
    round to reading it (it shares the two cores with the server and the other clients). A
    chunk's stamp is its last segment's: an earlier frame in it gets a stamp no earlier than its
    own arrival, never a flattering one. The time the message was read is kept beside it.

    The transport methods ``WsClient`` uses: its writes are a handshake, a subscribe and pongs
    (a few hundred bytes); what the socket does not take at once waits for it to be writable."""

    __slots__ = ("closed", "loop", "pending", "protocol", "sock")

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: socket.socket, protocol: WsClient) -> None:
        self.loop, self.sock, self.protocol = loop, sock, protocol
        self.pending = b""
        self.closed = False
        sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        protocol.connection_made(self)  # type: ignore[arg-type]
        loop.add_reader(sock.fileno(), self._readable)

    def _readable(self) -> None:
        try:
            data, ancillary, _, _ = self.sock.recvmsg(262144, STAMP_SPACE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            self._lost(e)
            return
        if not data:
            self._lost(None)
            return
        stamp = 0
        for level, kind, raw in ancillary:
            if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS and len(raw) >= 16:
                sec, nsec = struct.unpack_from("qq", raw)
                stamp = sec * 1_000_000_000 + nsec
        self.protocol.arrived_ns = stamp
        self.protocol.data_received(data)

    def write(self, data: bytes) -> None:
        if self.closed:
            return
        if not self.pending:
            try:
                data = data[self.sock.send(data):]
            except (BlockingIOError, InterruptedError):
                pass
            except OSError as e:
                self._lost(e)
                return
            if not data:
                return
            self.loop.add_writer(self.sock.fileno(), self._writable)
        self.pending += data

    def _writable(self) -> None:
        try:
            self.pending = self.pending[self.sock.send(self.pending):]
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            self._lost(e)
            return
        if not self.pending:
            self.loop.remove_writer(self.sock.fileno())

    def _lost(self, exc: Exception | None) -> None:
        if self.closed:
            return
        self.closed = True
        self.loop.remove_reader(self.sock.fileno())
        if self.pending:
            self.loop.remove_writer(self.sock.fileno())
        self.sock.close()
        self.protocol.connection_lost(exc)

    def close(self) -> None:
        self._lost(None)

    abort = close


async def _clients(host: str, port: int, count: int, first: int, k: int, sources: int, timeout: float) -> None:
    loop = asyncio.get_running_loop()
    proc = ClientProc(count)
    conns: list[WsClient] = []
    host_header = f"{host}:{port}".encode()
    addrs = [f"127.0.0.{2 + i}" for i in range(sources)] if host.startswith("127.") and sources else []
    gate = asyncio.Semaphore(256)  # handshakes in flight: never more than a listen backlog takes

    async def open_one(g: int) -> None:
        # channel g % k; every SAMPLE_EVERY-th connection of each channel (its first one too) samples
        conn = WsClient(proc, SYMBOLS[g % k], (g // k) % SAMPLE_EVERY == 0, host_header)
        conns.append(conn)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            async with gate:
                sock.setblocking(False)
                if addrs:
                    sock.setsockopt(socket.SOL_IP, IP_BIND_ADDRESS_NO_PORT, 1)
                    sock.bind((addrs[g % len(addrs)], 0))
                await loop.sock_connect(sock, (host, port))
                if conn.sampler:
                    StampedSocket(loop, sock, conn)
                else:
                    await loop.create_connection(lambda: conn, sock=sock)
                await conn.upgraded
        except (OSError, ConnectionError) as e:
            proc.connect_errors[type(e).__name__ + ": " + str(e)[:60]] += 1
            sock.close()

    async def connect_all() -> None:
        await asyncio.gather(*(open_one(g) for g in range(first, first + count)))
        await proc.all_ready.wait()

    try:
        await asyncio.wait_for(connect_all(), timeout)
    except TimeoutError:
        print(json.dumps({"error": f"{proc.ready} of {count} connections subscribed within {timeout:g} s",
                          "connect_errors": dict(proc.connect_errors), "lost": proc.lost}), flush=True)
        return
    announce_ready("clients", "clients", connections=count, first=first)

    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while True:
        line = (await reader.readline()).decode().strip()
        if not line or line == "quit":
            break
        if line == "start":
            for c in conns:
                c.n = c.hb = 0
            proc.reset()
            print(json.dumps({"ok": True}), flush=True)
        elif line == "poll":
            print(json.dumps({"total": sum(c.n for c in conns), "last_ns": proc.last_ns}), flush=True)
        elif line == "stop":
            per: dict[str, list[int]] = {}
            for c in conns:
                per.setdefault(c.channel, []).append(c.n - c.hb)
            print(json.dumps({
                "total": sum(c.n for c in conns), "heartbeats": sum(c.hb for c in conns),
                "first_ns": proc.first_ns, "last_ns": proc.last_ns,
                "channels": {ch: [sum(v), min(v), max(v), len(v)] for ch, v in per.items()},
                "hist": proc.hist, "hist_read": proc.hist_read, "types": proc.types, "errors": proc.errors,
                "prev_seq_breaks": proc.breaks,
                "lost": proc.lost, "pongs": proc.pongs, "examples": proc.examples,
                "open": sum(1 for c in conns if c.transport is not None)}), flush=True)
    for c in conns:
        if c.transport is not None:
            c.transport.abort()


# -- ceiling server (--role ceiling) -----------------------------------------------------------------


def default_examples() -> dict[str, str]:
    """Feed messages of the protocol's shape, for when no gateway capture is at hand."""
    ts = time.time_ns()
    return {
        "trade": json.dumps({"channel": SYMBOLS[0], "type": "trade", "data": {
            "seq": 123456, "trade_id": 98765, "price": "29999.87", "quantity": "0.123", "taker_side": "buy",
            "ts": ts}}, separators=(",", ":")),
        "depth_update": json.dumps({"channel": SYMBOLS[0], "type": "depth_update", "data": {
            "seq": 123457, "prev_seq": 123456, "bids": [["29999.87", "0.377"]], "asks": [],
            "checksum": 3366291421, "ts": ts}}, separators=(",", ":")),
        "depth_snapshot": json.dumps({"channel": SYMBOLS[0], "type": "depth_snapshot", "data": {
            "seq": 123450, "bids": [[f"{29999.9 - i / 100:.2f}", "1.5"] for i in range(20)],
            "asks": [[f"{30000.01 + i / 100:.2f}", "1.5"] for i in range(20)], "checksum": 1, "ts": ts}},
            separators=(",", ":")),
    }


def _template(example: str, channel: str) -> tuple[bytes, bytes]:
    """(frame header + payload up to the ts digits, the rest of the payload) of ``example`` on
    ``channel``; the ts written in between must have 19 digits, as the example's."""
    msg = json.loads(example)
    original = msg["channel"]
    payload = example.replace(f'"channel":"{original}"', f'"channel":"{channel}"').encode()
    at = payload.rindex(b'"ts":') + 5
    end = at
    while end < len(payload) and payload[end:end + 1].isdigit():
        end += 1
    if end - at != 19:
        raise ValueError(f"example without a 19-digit ts: {example[:200]}")
    head = server_frame(payload)[:-len(payload)]
    return head + payload[:at], payload[end:]


class CeilingConn(asyncio.Protocol):
    __slots__ = ("buf", "out", "server", "state", "transport", "write")

    def __init__(self, server: CeilingServer) -> None:
        self.server = server
        self.buf = b""
        self.state = HANDSHAKE
        self.out: list[bytes] | None = None
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.write = transport.write
        transport.set_write_buffer_limits(high=SEND_QUEUE_BYTES, low=SEND_QUEUE_BYTES // 4)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        for subs in self.server.subs.values():
            subs.pop(self, None)
        if self.state == -1:
            self.server.resume()

    def pause_writing(self) -> None:
        self.state = -1
        self.server.paused += 1
        self.server.resumed.clear()

    def resume_writing(self) -> None:
        self.state = SETUP
        self.server.resume()

    def data_received(self, data: bytes) -> None:
        buf = self.buf + data
        if self.state == HANDSHAKE:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                self.buf = buf
                return
            key = b""
            for line in buf[:end].split(b"\r\n"):
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"sec-websocket-key":
                    key = value.strip()
            accept = base64.b64encode(hashlib.sha1(key + WS_GUID).digest())
            self.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                       b"Sec-WebSocket-Accept: " + accept + b"\r\n\r\n")
            self.state = SETUP
            buf = buf[end + 4:]
        while len(buf) >= 2:
            b0, b1 = buf[0], buf[1]
            length, h = b1 & 0x7F, 2
            if length == 126:
                if len(buf) < 4:
                    break
                length, h = int.from_bytes(buf[2:4], "big"), 4
            elif length == 127:
                if len(buf) < 10:
                    break
                length, h = int.from_bytes(buf[2:10], "big"), 10
            key = b""
            if b1 & 0x80:
                key, h = buf[h:h + 4], h + 4
            if len(buf) < h + length:
                break
            payload = buf[h:h + length]
            if key:
                payload = _mask(payload, key)
            buf = buf[h + length:]
            opcode = b0 & 0x0F
            if opcode == 1:
                self.server.request(self, payload)
            elif opcode == 8 and self.transport is not None:
                self.transport.close()
                return
        self.buf = buf


class CeilingServer:
    def __init__(self, mode: str, k: int, examples: dict[str, str], matcher_feed: bool = False) -> None:
        self.mode = mode
        self.channels = SYMBOLS[:k]
        # The matcher's own PUB (``--ceiling-feed matcher``): each publication becomes the frames
        # the gateway would make of it, from ready-made templates with its events' ``ts``.
        self.matcher_feed = matcher_feed
        self.topics = {topic(ch): ch for ch in self.channels}
        self.subs: dict[str, dict[CeilingConn, Callable[[bytes], None]]] = {ch: {} for ch in self.channels}
        self.paused = 0
        self.resumed = asyncio.Event()
        self.resumed.set()
        self.templates = {ch: {kind: _template(examples[kind], ch) for kind in ("trade", "depth_update")}
                          for ch in self.channels}
        self.snapshots = {ch: server_frame(examples["depth_snapshot"].replace(
            f'"channel":"{json.loads(examples["depth_snapshot"])["channel"]}"', f'"channel":"{ch}"').encode())
            for ch in self.channels}
        self.frames: dict[str, list[bytes]] = {ch: [] for ch in self.channels}
        self.dirty: list[str] = []
        self.sub: Any = None  # the feed's SUB socket (``_ceiling``)
        self.stalled = False  # a drain stopped on a paused transport: the next resume drains again
        self.drains = self.stalls = self.written = self.skipped = 0
        self.deadline = math.inf  # of the round: what arrives after it is read and dropped
        self.turns = LatencyHistogram()  # each walk over the connections (the gateway's fan-out turns)

    def start_round(self, rate: float, total: int) -> None:
        """A round of ``total`` messages at ``rate`` begins: a server that cannot keep up stops
        writing at twice its planned time (plus 2 s) and drops the rest of the feed, so a
        round ends and its figures (``written`` < the feeder's ``emitted``) say so."""
        self.skip_pending()
        self.drains = self.stalls = self.written = self.skipped = 0
        self.turns = LatencyHistogram()
        self.deadline = time.perf_counter() + 2 * total / rate + 2.0

    def skip_pending(self) -> None:
        import zmq

        while True:
            try:
                self.sub.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            self.skipped += 1

    def resume(self) -> None:
        self.paused = max(0, self.paused - 1)
        if not self.paused:
            self.resumed.set()
            if self.stalled:
                self.stalled = False
                asyncio.get_running_loop().call_soon(self.drain)

    def drain(self) -> None:
        """What the feed brought: up to ``TURN_CAP`` messages a loop turn (the gateway's
        ``SUB_BATCH``), each written to its channel's connections at once (write) or joined
        per connection at the end of the turn (coalesce). Nothing is read while a transport
        is paused, so nothing is dropped: the feed waits in ZeroMQ's queue."""
        import zmq

        recv, again, noblock = self.sub.recv, zmq.Again, zmq.NOBLOCK
        channels, frames, subs = self.channels, self.frames, self.subs
        coalesce, matcher_feed = self.mode == "coalesce", self.matcher_feed
        clock, deadline = time.perf_counter, self.deadline
        walked, walk_ns = self.turns.add, time.perf_counter_ns
        n = 0
        while n < TURN_CAP:
            if clock() > deadline:
                self.stalled = False
                self.skip_pending()
                break
            if self.paused:
                self.stalled = True
                self.stalls += 1
                break
            try:
                msg = recv(noblock)
            except again:
                break
            if matcher_feed:
                ch, made = self.publication_frames(msg)
                if not made:
                    continue  # a heartbeat of an idle symbol, or a topic of no channel here
            else:
                ch, made = channels[msg[0]], (msg[1:],)
            if coalesce:
                if not frames[ch]:
                    self.dirty.append(ch)
                frames[ch].extend(made)
            else:
                for frame in made:
                    started = walk_ns()
                    for write in subs[ch].values():
                        write(frame)
                    walked(walk_ns() - started)
            n += 1
        else:  # more may be waiting, and ZeroMQ's descriptor only signals new arrivals
            asyncio.get_running_loop().call_soon(self.drain)
        self.written += n
        if coalesce and self.dirty:
            started = walk_ns()
            self.flush()
            walked(walk_ns() - started)
        self.drains += 1

    def publication_frames(self, msg: bytes) -> tuple[str, list[bytes]]:
        """A matcher's publication -> (its channel, the frames the gateway makes of it): a
        ``trade`` for each trade, a ``depth_update`` for each book change, each with its event's
        ``ts``. The least a server fed by the matcher does: find the channel, unpack the records
        (msgpack, no checks), write each one's ``ts`` into a ready-made frame."""
        end = msg.find(b"\x00") + 1
        ch = self.topics.get(msg[:end])
        if ch is None:
            return "", []
        trade, depth = self.templates[ch]["trade"], self.templates[ch]["depth_update"]
        made = []
        for record in msgpack.unpackb(memoryview(msg)[end + 1:], use_list=False):  # past the version byte
            head, tail = trade if record[0] == TRADE_CODE else depth if record[0] == BOOK_CODE else (None, None)
            if head is not None:
                made.append(head + b"%d" % record[3] + tail)  # [code, symbol, seq, ts_ns, ...]
        return ch, made

    def request(self, conn: CeilingConn, payload: bytes) -> None:
        msg = json.loads(payload)
        channel = msg.get("channel")
        if msg.get("action") == "subscribe" and channel in self.subs:
            conn.write(server_frame(b'{"type":"subscription_ack","channel":"' + channel.encode() + b'"}')
                       + self.snapshots[channel])
            self.subs[channel][conn] = conn.write

    def flush(self) -> None:
        """The coalescing ceiling's turn: each channel's frames joined once, each connection one
        write with all of its bytes (as the gateway's ``_fan_out``)."""
        touched: list[CeilingConn] = []
        for ch in self.dirty:
            frames = self.frames[ch]
            blob = frames[0] if len(frames) == 1 else b"".join(frames)
            for conn in self.subs[ch]:
                out = conn.out
                if out is None:
                    conn.out = [blob]
                    touched.append(conn)
                else:
                    out.append(blob)
            frames.clear()
        self.dirty.clear()
        for conn in touched:
            out = conn.out
            conn.out = None
            if conn.transport is not None:
                conn.write(out[0] if len(out) == 1 else b"".join(out))  # type: ignore[index]


def load_examples(examples_path: str) -> dict[str, str]:
    examples = default_examples()
    if examples_path:
        examples.update(json.loads(Path(examples_path).read_text()))
    return examples


def histogram_ms(h: LatencyHistogram) -> dict[str, float] | None:
    """``{"p50": ms, "p99": ms, "max": ms}`` of nanosecond samples; None without samples."""
    if not h.count:
        return None
    return {"p50": round((h.percentile(50) or 0) / 1e6, 3), "p99": round((h.percentile(99) or 0) / 1e6, 3),
            "max": round(h.max / 1e6, 3)}


async def _ceiling(mode: str, k: int, examples_path: str, feed: str, feed_kind: str) -> None:
    import zmq

    loop = asyncio.get_running_loop()
    server = CeilingServer(mode, k, load_examples(examples_path), matcher_feed=feed_kind == "matcher")
    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.RCVHWM, 0)  # as the feeder's PUB: a round's feed is bounded, none of it dropped
    for name in server.topics if server.matcher_feed else (b"",):
        sub.setsockopt(zmq.SUBSCRIBE, name)
    sub.connect(feed)
    server.sub = sub
    loop.add_reader(sub.getsockopt(zmq.FD), server.drain)
    srv = await loop.create_server(lambda: CeilingConn(server), "127.0.0.1", 0, backlog=16384)
    port = srv.sockets[0].getsockname()[1]
    announce_ready("ceiling", "ceiling", port=port, mode=mode, channels=k)
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    try:
        while True:
            words = (await reader.readline()).decode().split()
            if not words or words[0] == "quit":
                break
            if words[0] == "round":  # round RATE TOTAL
                server.start_round(float(words[1]), int(words[2]))
                print("{}", flush=True)
            elif words[0] == "stats":
                # once all that came is written (or the round gave up): the feed may still be in
                # ZeroMQ's queue when the feeder is done
                while sub.getsockopt(zmq.EVENTS) & zmq.POLLIN and time.perf_counter() < server.deadline:
                    await asyncio.sleep(0.01)
                print(json.dumps({"written": server.written, "skipped": server.skipped, "drains": server.drains,
                                  "stalls": server.stalls, "connections": sum(map(len, server.subs.values())),
                                  "turns": server.turns.count, "turn_ms": histogram_ms(server.turns)}), flush=True)
    finally:
        srv.close()
        loop.remove_reader(sub.getsockopt(zmq.FD))
        sub.close(0)
        ctx.term()


# -- the ceilings' feed (--role feeder) -----------------------------------------------------------------


def role_feeder(examples_path: str) -> None:
    """The ceilings' feed, over the hop the gateway's feed takes: an XPUB bound on loopback
    TCP that the ceiling's SUB reads, so the ceilings' latency and CPU include ZeroMQ as the
    gateway's do. ``emit RATE TOTAL TRADE_SHARE K`` sends TOTAL messages, channels 0..K-1 in
    turn, at RATE a second (all that is due, up to ``TURN_CAP``, then a sleep until the next
    one is due): each one ZeroMQ message, the channel's index byte and then the WebSocket
    frame of a ``trade`` or ``depth_update`` of the gateway's shape (``TRADE_SHARE`` of them
    trades), its ``ts`` written when it is sent."""
    import zmq

    examples = load_examples(examples_path)
    heads_tails = [tuple((bytes((c,)) + head, tail) for head, tail in
                         (_template(examples["trade"], ch), _template(examples["depth_update"], ch)))
                   for c, ch in enumerate(SYMBOLS)]
    ctx = zmq.Context()
    pub = ctx.socket(zmq.XPUB)
    pub.setsockopt(zmq.LINGER, 0)
    pub.setsockopt(zmq.SNDHWM, 0)
    port = pub.bind_to_random_port("tcp://127.0.0.1")
    announce_ready("feeder", "feeder", endpoint=f"tcp://127.0.0.1:{port}")
    subscribed = False
    try:
        for line in sys.stdin:
            words = line.split()
            if not words or words[0] == "quit":
                break
            if words[0] != "emit":
                continue
            if not subscribed:  # a PUB drops what it sends before the subscription has arrived
                if not pub.poll(30_000):
                    raise SystemExit("feeder: no subscriber within 30 s")
                subscribed = pub.recv()[:1] == b"\x01"
            rate, total, trade_share, k = float(words[1]), int(words[2]), float(words[3]), int(words[4])
            trades = round(trade_share * 100)
            pattern = [(j * trades) // 100 != ((j + 1) * trades) // 100 for j in range(100)]  # spread over 100
            send, now_ns, clock = pub.send, time.time_ns, time.perf_counter
            start = clock()
            i = 0
            while i < total:
                due = min(total, int((clock() - start) * rate) + 1, i + TURN_CAP)
                while i < due:
                    c = i % k
                    head, tail = heads_tails[c][0 if pattern[(i // k) % 100] else 1]
                    send(head + b"%d" % now_ns() + tail)
                    i += 1
                wait = start + i / rate - clock()
                if wait > 0 and i < total:
                    time.sleep(wait)
            print(json.dumps({"emitted": i, "seconds": round(clock() - start, 4)}), flush=True)
    finally:
        pub.close(0)
        ctx.term()


# -- the feed alone (--role feedprobe) -------------------------------------------------------------------


def received_publications(sub: Any) -> Iterator[tuple[int, str, tuple[Any, ...]]]:
    """What the SUB socket ``sub`` has waiting, without blocking: ``(arrival ns, name,
    events)`` a publication (``zmx.codec.decode_publication``)."""
    import zmq

    from zmx.codec import decode_publication

    while True:
        try:
            frame = sub.recv(zmq.NOBLOCK)
        except zmq.Again:
            return
        now = time.time_ns()
        name, events = decode_publication(frame)
        yield now, name, events


class StdinLines:
    """The command lines a helper reads from its standard input, polled with its sockets (the
    descriptor ``fd``): ``read`` after a poll said it is readable gives the whole lines that
    came, None once the input ended."""

    def __init__(self) -> None:
        self.fd = sys.stdin.fileno()
        self.pending = b""

    def read(self) -> list[str] | None:
        chunk = os.read(self.fd, 4096)
        if not chunk:
            return None
        *lines, self.pending = (self.pending + chunk).split(b"\n")
        return [line.decode().strip() for line in lines]


def role_feedprobe(pub: str) -> None:
    """A bare SUB on the matcher's PUB, beside the gateway in its moderate rounds: what the feed
    alone takes, from the matcher's ``ts`` to this process, one sample a publication (its
    first depth change or trade). ``start K`` subscribes channels 0..K-1 and answers once
    each one's first message came (the matcher answers a new subscription with a heartbeat);
    ``stop`` unsubscribes them (nothing comes to it in the bursts) and answers the
    histogram."""
    import zmq

    timed = (BookChanged, TradeOccurred)
    # Its own wait for a core is not the feed's: at SCHED_FIFO (root only), which ZeroMQ's I/O
    # thread, made below, inherits, it takes a publication as soon as it comes. At the normal
    # policy, beside a gateway writing to 500 connections, its p99 was 2.4-3.9 ms while the
    # gateway's own log had the feed's lag at 0.8-1.8 ms. It takes about 100 messages a second.
    try:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(FEEDPROBE_PRIORITY))
        policy = "fifo"
    except OSError:
        policy = "normal"
    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.connect(pub)
    poller = zmq.Poller()
    poller.register(sub, zmq.POLLIN)
    stdin = StdinLines()
    poller.register(stdin.fd, zmq.POLLIN)
    announce_ready("feedprobe", "feedprobe", policy=policy)
    hist: Counter[int] = Counter()
    names: list[str] = []
    heard: set[str] = set()
    waiting_since = 0.0  # when start subscribed, until every channel was heard (0: not waiting)
    try:
        while True:
            events = dict(poller.poll(200))
            if sub in events:
                for now, name, published in received_publications(sub):
                    heard.add(name)
                    for event in published:
                        if type(event) in timed:
                            hist[bucket_us((now - event.ts_ns) // 1000)] += 1
                            break
            if waiting_since and heard >= set(names):
                waiting_since = 0.0
                print(json.dumps({"started": len(names)}), flush=True)
            elif waiting_since and time.monotonic() - waiting_since > 10.0:
                print(json.dumps({"error": f"feedprobe: heard {len(heard)} of {len(names)} channels in 10 s"}),
                      flush=True)
                return
            if stdin.fd in events:
                lines = stdin.read()
                for line in ["quit"] if lines is None else lines:
                    words = line.split()
                    if not words:
                        continue
                    if words[0] == "quit":
                        return
                    if words[0] == "start":
                        names = list(SYMBOLS[:int(words[1])])
                        heard.clear()
                        for name in names:
                            sub.subscribe(topic(name))
                        hist.clear()
                        waiting_since = time.monotonic()
                    elif words[0] == "stop":
                        for name in names:
                            sub.unsubscribe(topic(name))
                        print(json.dumps({"hist": hist}), flush=True)
    finally:
        sub.close(0)
        ctx.term()


# -- order driver (--role driver) ----------------------------------------------------------------------


def role_driver(front: str, seed: int) -> None:
    from zmx.node.client import Client

    client = Client([front])
    try:
        await_route(client, SYMBOLS)
        flow = FanoutFlow(seed, SYMBOLS)
        primed = pipelined(client, flow.prime(PRIME_PER_SIDE), 256, 60.0)
        announce_ready("driver", "driver", primed=len(SYMBOLS) * 2 * PRIME_PER_SIDE, not_ok=dict(primed.not_ok))
        for rounds, line in enumerate(sys.stdin, 1):
            words = line.split()
            if not words or words[0] == "quit":
                break
            if words[0] == "paced":  # paced RATE SECONDS K
                rate, seconds, k = float(words[1]), float(words[2]), int(words[3])
                commands = flow.take(max(1, round(rate * seconds)), k, f"r{rounds}o")
                r = paced(client, commands, rate, seconds + 60.0)
            else:  # burst COUNT K
                count, k = int(words[1]), int(words[2])
                commands = flow.take(count, k, f"r{rounds}o")
                r = pipelined(client, commands, 256, 120.0)
            print(driver_report(commands, r), flush=True)
    finally:
        client.close()


def driver_report(commands: Sequence[Command], r: Any) -> str:
    """The line an order driver prints after a round: orders, seconds, rate, refusals, kinds."""
    kinds = Counter(type(c).__name__ + ("_ioc" if getattr(c, "time_in_force", None) is IOC else "")
                    for c in commands)
    return json.dumps({"orders": len(commands), "seconds": round(r.seconds, 4),
                       "orders_per_s": round(len(commands) / r.seconds) if r.seconds else None,
                       "not_ok": dict(r.not_ok), "kinds": dict(kinds)})


def role_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="bench_fanout.py --role")
    parser.add_argument("role", choices=("clients", "ceiling", "driver", "feeder", "feedprobe"))
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--count", type=int, default=0)
    parser.add_argument("--first", type=int, default=0)
    parser.add_argument("--channels", type=int, default=1)
    parser.add_argument("--sources", type=int, default=4)
    parser.add_argument("--sched", choices=CLIENT_SCHED, default="normal")
    parser.add_argument("--timeout", type=float, default=120.0)
    parser.add_argument("--mode", default="write")
    parser.add_argument("--examples", default="")
    parser.add_argument("--feed", default="")
    parser.add_argument("--feed-kind", choices=CEILING_FEEDS, default="zeromq")
    parser.add_argument("--front", default="")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--max-seconds", type=float, default=1200.0)
    args = parser.parse_args(argv)
    watchdog(args.max_seconds)
    if args.role == "driver":
        role_driver(args.front, args.seed)
        return 0
    if args.role == "feeder":
        role_feeder(args.examples)
        return 0
    if args.role == "feedprobe":
        role_feedprobe(args.feed)
        return 0
    import uvloop

    if args.role == "clients":
        if args.sched == "batch":  # see --clients-sched
            os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
        uvloop.run(_clients(args.host, args.port, args.count, args.first, args.channels, args.sources, args.timeout))
    else:
        uvloop.run(_ceiling(args.mode, args.channels, args.examples, args.feed, args.feed_kind))
    return 0


# -- measuring from outside ------------------------------------------------------------------------------


def tree(pid: int) -> list[int]:
    """``pid`` and every descendant of it (gateway workers), from ``/proc``."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="ascii") as f:
                ppid = int(f.read().rpartition(")")[2].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, ()))
    return out


def rss_kb(pids: Sequence[int]) -> int:
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status", encoding="ascii") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
                        break
        except (OSError, ValueError):
            pass
    return total


def jiffies(pids: Sequence[int]) -> int:
    return sum(cpu_jiffies(p) for p in pids)


HZ = os.sysconf("SC_CLK_TCK")


class Run:
    """Every process of a benchmark: its helpers (``script --role ...``, this file's by default)
    and its nodes; ``stop_all`` asks every helper to quit, then stops the helpers and the nodes,
    each in reverse order. ``bench_connections`` and ``bench_soak`` use it too."""

    def __init__(self, directory: Path, script: Path = SCRIPT, max_seconds: float = HELPER_MAX_S) -> None:
        self.directory = directory
        self.script = script
        self.max_seconds = max_seconds  # a helper ends by itself after this long
        self.helpers: list[Helper] = []
        self.nodes: list[NodeProcess] = []
        self.serial = 0

    def helper(self, name: str, *argv: str, ready_timeout: float = 30.0) -> tuple[Helper, dict[str, Any]]:
        self.serial += 1
        h = Helper(self.script, f"{name}-{self.serial}", [*argv, "--max-seconds", str(self.max_seconds)],
                   self.directory)
        self.helpers.append(h)
        return h, self.ready(h, ready_timeout)

    @staticmethod
    def ready(h: Helper, timeout: float) -> dict[str, Any]:
        """The details of a helper's ``READY`` line; ``RuntimeError`` if it reports an error first."""
        while True:
            line = h.line(timeout)
            if line.startswith("READY "):
                return json.loads(line[6:])  # type: ignore[no-any-return]
            try:
                details = json.loads(line)
            except ValueError:
                continue
            if isinstance(details, dict) and "error" in details:
                raise RuntimeError(f"{h.name}: {details}\n{h.log()}")

    def node(self, topology: Path, name: str, timeout: float = 60.0) -> NodeProcess:
        node = NodeProcess(topology, name, self.directory)
        self.nodes.append(node)
        try:
            node.wait_ready(timeout)
        except AssertionError as e:
            raise RuntimeError(str(e)) from None
        return node

    def end(self, h: Helper, timeout: float = 20.0) -> None:
        """Ask a helper to quit (its connections closed), then ``stop`` it whatever it did."""
        with contextlib.suppress(OSError, subprocess.TimeoutExpired):
            h.write("quit")
            h.proc.wait(timeout)
        h.stop()
        if h in self.helpers:
            self.helpers.remove(h)

    def end_node(self, node: NodeProcess) -> None:
        node.stop(15.0)
        if node in self.nodes:
            self.nodes.remove(node)

    def pids(self) -> list[int]:
        out = [h.proc.pid for h in self.helpers if h.proc.poll() is None]
        for node in self.nodes:
            if node.proc.poll() is None:
                out.extend(tree(node.proc.pid))
        return out

    def stop_all(self) -> None:
        for h in list(self.helpers):
            with contextlib.suppress(Exception):
                h.write("quit")
        for h in reversed(self.helpers):
            try:
                h.stop(15.0)
            except Exception:  # noqa: BLE001 - keep stopping the others
                h.proc.kill()
        self.helpers.clear()
        for node in reversed(self.nodes):
            try:
                node.stop(30.0)
            except Exception:  # noqa: BLE001
                node.kill()
        self.nodes.clear()


def write_cluster_topology(path: Path, ports: dict[str, int], gateway_port: int | None, workers: int,
                           snapshot_every: int = 10_000_000) -> Path:
    """The benchmark's cluster: router r1, matcher m1 (the ten symbols, ``fsync: never``, a
    snapshot every ``snapshot_every`` commands: by default none within a run, so that no
    snapshot's fork is measured), gateway g1 if ``gateway_port``."""
    lines = ["cluster: bench-fanout", "symbols:"]
    lines += [f'  {s}: {{matcher: m1, tick_size: "0.01", lot_size: "0.001"}}' for s in SYMBOLS]
    lines += ["nodes:",
              (f'  r1: {{role: router, front: "tcp://127.0.0.1:{ports["front"]}", '
               f'back: "tcp://127.0.0.1:{ports["back"]}"}}'),
              (f'  m1: {{role: matcher, pub: "tcp://127.0.0.1:{ports["pub"]}", '
               f'snapshot: "tcp://127.0.0.1:{ports["snapshot"]}", data_dir: "var/m1", fsync: never, '
               f'snapshot_every: {snapshot_every}}}')]
    if gateway_port is not None:
        lines.append(f'  g1: {{role: gateway, listen: "127.0.0.1:{gateway_port}", workers: {workers}}}')
    path.write_text("\n".join(lines) + "\n")
    return path


class Clients:
    """The client processes of one target: an anchor (one connection per channel) and the load."""

    def __init__(self, run: Run, port: int, n: int, k: int, procs: int, sources: int, sched: str) -> None:
        self.run, self.port, self.n, self.k, self.procs, self.sources = run, port, n, k, procs, sources
        self.sched = sched  # --clients-sched
        self.helpers: list[Helper] = []

    def _start(self, count: int, first: int, tag: str) -> list[tuple[Helper, int]]:
        started = []
        self.run.serial += 1
        h = Helper(SCRIPT, f"clients-{tag}-{self.run.serial}",
                   ["clients", "--port", str(self.port), "--count", str(count), "--first", str(first),
                    "--channels", str(self.k), "--sources", str(self.sources), "--sched", self.sched,
                    "--timeout", str(self.timeout(count)), "--max-seconds", str(HELPER_MAX_S)], self.run.directory)
        self.run.helpers.append(h)
        self.helpers.append(h)
        started.append((h, count))
        return started

    @staticmethod
    def timeout(count: int) -> float:
        return 60.0 + count / 100

    def wait(self, started: list[tuple[Helper, int]]) -> None:
        for h, count in started:
            while True:
                line = h.line(self.timeout(count) + 15)
                if line.startswith("READY "):
                    break
                if line.startswith("{"):
                    raise RuntimeError(f"{h.name}: {line}\n{h.log()}")

    def anchor(self) -> None:
        self.wait(self._start(self.k, 0, "anchor"))

    def load(self) -> None:
        started = []
        per = math.ceil(self.n / self.procs)
        first = self.k
        for i in range(self.procs):
            count = min(per, self.n - i * per)
            if count > 0:
                started += self._start(count, first, f"load{i}")
                first += count
        self.wait(started)

    def ask(self, command: str, timeout: float = 30.0) -> list[dict[str, Any]]:
        for h in self.helpers:
            h.write(command)
        return [json.loads(h.line(timeout)) for h in self.helpers]

    def pids(self) -> list[int]:
        return [h.proc.pid for h in self.helpers]

    def close(self) -> None:
        for h in self.helpers:
            self.run.end(h)
        self.helpers.clear()


def merge(stats: list[dict[str, Any]]) -> dict[str, Any]:
    hist: Counter[int] = Counter()
    hist_read: Counter[int] = Counter()
    types: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    channels: dict[str, list[int]] = {}
    examples: dict[str, str] = {}
    for s in stats:
        hist.update({int(k): v for k, v in s["hist"].items()})
        hist_read.update({int(k): v for k, v in s.get("hist_read", {}).items()})
        types.update(s["types"])
        errors.update(s["errors"])
        for k, v in s["examples"].items():
            examples.setdefault(k, v)
        for ch, (total, lo, hi, conns) in s["channels"].items():
            have = channels.get(ch)
            channels[ch] = [total, lo, hi, conns] if have is None else \
                [have[0] + total, min(have[1], lo), max(have[2], hi), have[3] + conns]
    firsts = [s["first_ns"] for s in stats if s["first_ns"]]
    lasts = [s["last_ns"] for s in stats if s["last_ns"]]
    return {"total": sum(s["total"] for s in stats), "heartbeats": sum(s["heartbeats"] for s in stats),
            "first_ns": min(firsts) if firsts else 0,
            "last_ns": max(lasts) if lasts else 0, "hist": hist, "hist_read": hist_read, "types": types,
            "errors": errors,
            "channels": channels, "examples": examples, "prev_seq_breaks": sum(s["prev_seq_breaks"] for s in stats),
            "lost": sum(s["lost"] for s in stats), "pongs": sum(s["pongs"] for s in stats),
            "open": sum(s["open"] for s in stats)}


def quiesce(clients: Clients, max_seconds: float = 60.0) -> bool:
    """Wait until the clients' counts stop growing (0.6 s without a message); False on timeout."""
    end = time.monotonic() + max_seconds
    last, still = -1, 0
    while time.monotonic() < end:
        total = sum(r["total"] for r in clients.ask("poll"))
        still = still + 1 if total == last else 0
        if still >= 2:
            return True
        last = total
        time.sleep(0.3)
    return False


_ROUND_FIGURES = ("delivered", "seconds", "delivered_per_s", "server_cpu_s", "delivered_per_server_cpu_s",
                  "gateway_log")


def median_round(rounds: list[dict[str, Any]], by: Callable[[dict[str, Any]], float], figures: tuple[str, ...]
                 ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The round with the median ``by`` (the lower middle of an even count), and each round's
    ``figures`` (those it has) in the order they ran."""
    ranked = sorted(rounds, key=by)
    return ranked[(len(ranked) - 1) // 2], [{key: r[key] for key in figures if key in r} for r in rounds]


def median_p99(rounds: list[dict[str, Any]]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The moderate round with the median latency p99 (a round without latency samples ranks
    last)."""
    def p99(r: dict[str, Any]) -> float:
        value = r["latency_ms"]["p99"]
        return float("inf") if value is None else value
    return median_round(rounds, p99, ("latency_ms", "read_latency_ms", "feed_latency_ms", *_ROUND_FIGURES))


def median_burst(bursts: list[dict[str, Any]]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The burst with the median delivered messages per server CPU-second."""
    return median_round(bursts, lambda r: r["delivered_per_server_cpu_s"] or 0, _ROUND_FIGURES)


def measure_round(run: Run, clients: Clients, server_pids: list[int], drive: Callable[[], dict[str, Any]],
                  named: dict[str, list[int]]) -> dict[str, Any]:
    """One round: counters reset, ``drive()``, wait for the last message, every CPU and count."""
    clients.ask("start")
    groups = {"server": server_pids, "clients": clients.pids(), **named}
    ours = set(run.pids()) | set(server_pids)
    before = {name: jiffies(pids) for name, pids in groups.items()}
    ours_before = jiffies(sorted(ours))
    machine = _cpu_jiffies()
    wall = time.perf_counter()
    driven = drive()
    drained = quiesce(clients)
    wall = time.perf_counter() - wall
    after = {name: jiffies(pids) for name, pids in groups.items()}
    ours_after = jiffies(sorted(ours))
    machine_after = _cpu_jiffies()
    got = merge(clients.ask("stop"))
    cpu = {name: round((after[name] - before[name]) / HZ, 2) for name in groups}
    others = None
    if machine and machine_after:
        busy = (machine_after[0] - machine[0]) - (ours_after - ours_before)
        others = round(max(0.0, busy / HZ / wall), 2)
        if others > 0.5:
            warn(f"other processes kept {others} CPUs busy during a round: its figures are suspect")
    seconds = (got["last_ns"] - got["first_ns"]) / 1e9
    total = got["total"]
    # feed messages of each channel (heartbeats apart): what its best-served connection got
    feed = sum(v[2] for v in got["channels"].values())
    uneven = {ch: v for ch, v in got["channels"].items() if v[1] != v[2]}
    server_cpu = cpu["server"]
    return {
        "delivered": total,
        "heartbeats": got["heartbeats"],
        "seconds": round(seconds, 4),
        "delivered_per_s": round(total / seconds) if seconds > 0 else None,
        "feed_messages": feed,
        "server_cpu_s": server_cpu,
        "server_cpu_s_per_million": round(server_cpu / total * 1e6, 3) if total else None,
        "delivered_per_server_cpu_s": round(total / server_cpu) if server_cpu else None,
        "cpu_s": cpu,
        "latency_ms": hist_percentiles(got["hist"]),  # to the client's kernel (StampedSocket)
        "read_latency_ms": hist_percentiles(got["hist_read"]),  # to the client process reading it
        "types_sampled": dict(got["types"]),
        "errors": dict(got["errors"]),
        "prev_seq_breaks": got["prev_seq_breaks"],
        "uneven_channels": len(uneven),
        "lost_connections": got["lost"],
        "open_connections": got["open"],
        "drained": drained,
        "wall_s": round(wall, 2),
        "others_cpus": others,
        "driver": driven,
        "_examples": got["examples"],
    }


# The gateway's own figures of a round: the stats line (docs/operations.md, "What the nodes say
# every 10 s") that SIGUSR1 makes it log, asked before the round (a fresh window) and after it.
GATEWAY_WINDOW = re.compile(
    r"(?:worker (\d+): )?last \d+ s: \d+ connections? .*?, (\d+) publications? in, (\d+) messages? out"
    r"(?:; feed lag p50 ([\d.]+) ms, p99 ([\d.]+) ms, max ([\d.]+) ms)?"
    r"(?:; (\d+) fan-out turns?, p50 ([\d.]+) ms, p99 ([\d.]+) ms, max ([\d.]+) ms)?")


def gateway_window(node: NodeProcess, workers: int, timeout: float = 10.0) -> list[dict[str, Any]]:
    """SIGUSR1 to the gateway node, then the window line of each of its ``workers`` that it
    logged for it: per worker, publications taken, messages written, the feed's lag as it took
    them and its fan-out turns (``_ms``: p50, p99, max)."""
    start = node.log_path.stat().st_size
    node.proc.send_signal(signal.SIGUSR1)
    deadline = time.monotonic() + timeout
    while True:
        with open(node.log_path, "rb") as f:
            f.seek(start)
            found = GATEWAY_WINDOW.findall(f.read().decode(errors="replace"))
        if len(found) >= workers:
            break
        if time.monotonic() > deadline:
            raise RuntimeError(f"the gateway logged {len(found)} of {workers} stats lines within {timeout} s "
                               f"of SIGUSR1:\n{node.log()}")
        time.sleep(0.02)  # polling a log file: nothing to wait on

    def ms(p50: str, p99: str, most: str) -> dict[str, float] | None:
        return {"p50": float(p50), "p99": float(p99), "max": float(most)} if p50 else None
    return [{"worker": int(w or 0), "publications": int(pubs), "messages": int(msgs),
             "feed_lag_ms": ms(l50, l99, lmax), "turns": int(turns or 0), "turn_ms": ms(t50, t99, tmax)}
            for w, pubs, msgs, l50, l99, lmax, turns, t50, t99, tmax in found[:workers]]


def with_gateway_window(node: NodeProcess, workers: int, go: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """``go()``, a round, with the gateway's own figures of it in ``gateway_log``."""
    gateway_window(node, workers)
    r = go()
    r["gateway_log"] = gateway_window(node, workers)
    return r


# -- the run ---------------------------------------------------------------------------------------------


class Bench:
    def __init__(self, args: argparse.Namespace, run: Run) -> None:
        self.args = args
        self.run = run
        self.examples: dict[str, str] = {}
        self.examples_path = run.directory / "examples.json"
        self.per_order: dict[tuple[int, int], float] = {}  # (n, k) -> feed messages an order (gateway rounds)
        self.best: dict[tuple[int, int], float] = {}  # (n, k) -> delivered/s of the gateway's median burst

    def start_cluster(self) -> None:
        ports = dict(zip(("front", "back", "pub", "snapshot"), free_ports(4), strict=True))
        self.ports = ports
        base = write_cluster_topology(self.run.directory / "cluster.yaml", ports, None, 1)
        self.matcher = self.run.node(base, "m1")
        self.router = self.run.node(base, "r1")
        self.driver, _ = self.run.helper("driver", "driver", "--front", f"tcp://127.0.0.1:{ports['front']}",
                                         "--seed", str(self.args.seed), ready_timeout=60.0)
        self.feedprobe, ready = self.run.helper("feedprobe", "feedprobe", "--feed", f"tcp://127.0.0.1:{ports['pub']}")
        self.args.feedprobe_policy = ready.get("policy")  # in the results' config
        if self.args.feedprobe_policy != "fifo":
            warn("the feed probe could not take SCHED_FIFO (run as root): its latency holds its own wait for a core")

    def named(self) -> dict[str, list[int]]:
        return {"driver": [self.driver.proc.pid], "matcher": [self.matcher.proc.pid],
                "router": [self.router.proc.pid], "feedprobe": [self.feedprobe.proc.pid]}

    def moderate_round(self, clients: Clients, server_pids: list[int], drive: Callable[[], dict[str, Any]],
                       k: int) -> dict[str, Any]:
        """A moderate round of a server fed by the matcher, and beside it the feed alone:
        ``feed_latency_ms``, the matcher's ``ts`` to a bare SUB on its PUB (``role_feedprobe``),
        which that server's latency includes (a feeder's, stamping as it sends, does not)."""
        probe = self.feedprobe
        probe.write(f"start {k}")
        started = json.loads(probe.line(30.0))
        if "error" in started:
            raise RuntimeError(f"{probe.name}: {started}\n{probe.log()}")
        r = measure_round(self.run, clients, server_pids, drive, self.named())
        probe.write("stop")
        got = json.loads(probe.line(30.0))
        r["feed_latency_ms"] = hist_percentiles({int(b): n for b, n in got["hist"].items()})
        return r

    def commands(self, n: int, k: int, burst_share: int = 1) -> dict[str, str]:
        """What the driver is asked in a cell's rounds: ``moderate`` (paced at ``moderate_rate``),
        ``max`` (a burst of about ``--max-delivered`` deliveries) and ``high`` (paced at ``--high``
        of what the gateway's burst delivered, at most ``MAX_PACED`` orders/s). The bursts and the
        high rate follow from the gateway's rounds (messages a publication, its burst's rate) once
        it has had them; a matcher-fed ceiling is driven the same way (the ``write`` one with
        ``1 / burst_share`` of the burst: ``WRITE_MAX_SHARE``)."""
        args = self.args
        per_order = max(self.per_order.get((n, k), 1.3), 0.5)
        subscribers = (n + k) / k
        orders = int(min(20_000, max(100, args.max_delivered / subscribers / per_order)))
        if burst_share > 1:
            orders = max(k, orders // burst_share)
        best = self.best.get((n, k))
        high = (min(MAX_PACED, max(1.0, args.high * best / subscribers * k / per_order)) if best is not None
                else moderate_rate(args, n, k) * 5)
        return {"moderate": f"paced {moderate_rate(args, n, k):.3f} {args.moderate_seconds} {k}",
                "max": f"burst {orders} {k}", "high": f"paced {high:.3f} {args.seconds} {k}"}

    def drive(self, command: str, timeout: float) -> Callable[[], dict[str, Any]]:
        def go() -> dict[str, Any]:
            self.driver.write(command)
            return json.loads(self.driver.line(timeout))
        return go

    def cell(self, n: int, k: int) -> dict[str, Any]:
        args = self.args
        procs = max(args.client_procs, math.ceil(n / MAX_PER_PROCESS))
        out: dict[str, Any] = {"n": n, "k": k, "client_procs": procs, "workers": args.workers}
        gw = None
        if "gateway" in args.targets:
            gw = self.target_gateway(n, k, procs)
            out["gateway"] = gw
        for mode in ("write", "coalesce"):
            if mode in args.targets:
                out[mode] = self.target_ceiling(mode, n, k, procs, gw)
        return out

    def connect(self, port: int, n: int, k: int, procs: int, pids: Callable[[], list[int]]
                ) -> tuple[Clients, dict[str, Any]]:
        clients = Clients(self.run, port, n, k, procs, self.args.sources, self.args.clients_sched)
        clients.anchor()
        time.sleep(0.5)
        rss0 = rss_kb(pids())
        t0 = time.perf_counter()
        clients.load()
        connect_s = time.perf_counter() - t0
        time.sleep(1.0)
        rss1 = rss_kb(pids())
        return clients, {"rss_kb_before": rss0, "rss_kb_after": rss1, "connect_s": round(connect_s, 2),
                         "kb_per_connection": round((rss1 - rss0) / n, 3)}

    def target_gateway(self, n: int, k: int, procs: int) -> dict[str, Any]:
        args, run = self.args, self.run
        port = free_ports(1)[0]
        topo = write_cluster_topology(run.directory / f"gw-{n}-{k}.yaml", self.ports, port, args.workers)
        node = run.node(topo, "g1", timeout=60.0)
        clients = None
        try:
            def pids() -> list[int]:
                return tree(node.proc.pid)
            clients, memory = self.connect(port, n, k, procs, pids)
            result: dict[str, Any] = {"memory": memory}
            paced = self.commands(n, k)["moderate"]
            moderates = [with_gateway_window(node, args.workers, lambda: self.moderate_round(
                clients, pids(), self.drive(paced, args.moderate_seconds + 90), k))
                for _ in range(args.moderate_rounds)]
            result["moderate"], result["moderate_rounds"] = median_p99(moderates)
            moderate = result["moderate"]
            if moderate["feed_messages"]:
                self.per_order[(n, k)] = moderate["feed_messages"] / moderate["driver"]["orders"]
            burst = self.commands(n, k)["max"]
            bursts = [with_gateway_window(node, args.workers, lambda: measure_round(
                run, clients, pids(), self.drive(burst, 200), self.named()))
                for _ in range(args.max_rounds)]
            result["max"], result["max_rounds"] = median_burst(bursts)
            self.best[(n, k)] = result["max"]["delivered_per_s"] or 0
            high = self.commands(n, k)["high"]
            result["high"] = with_gateway_window(node, args.workers, lambda: measure_round(
                run, clients, pids(), self.drive(high, args.seconds + 90), self.named()))
            result["driven"] = self.commands(n, k)
            for r in (*moderates, *bursts, result["high"]):
                for kind, example in r.pop("_examples").items():
                    self.examples.setdefault(kind, example)
            if self.examples:
                self.examples_path.write_text(json.dumps(self.examples))
            progress("gateway", result)
            return result
        finally:
            if clients is not None:
                clients.close()
            run.end_node(node)

    def target_ceiling(self, mode: str, n: int, k: int, procs: int, gw: dict[str, Any] | None) -> dict[str, Any]:
        args, run = self.args, self.run
        examples = ["--examples", str(self.examples_path)] if self.examples_path.exists() else []
        matcher_fed = args.ceiling_feed == "matcher"
        feeder = None
        if matcher_fed:
            feed = f"tcp://127.0.0.1:{self.ports['pub']}"
        else:
            feeder, fed = run.helper(f"feeder-{mode}", "feeder", *examples)
            feed = fed["endpoint"]
        server, ready = run.helper(f"ceiling-{mode}", "ceiling", "--mode", mode, "--channels", str(k),
                                   "--feed", feed, "--feed-kind", args.ceiling_feed, *examples)
        clients = None
        try:
            def pids() -> list[int]:
                return [server.proc.pid]
            clients, memory = self.connect(ready["port"], n, k, procs, pids)
            result: dict[str, Any] = {"memory": memory}
            share = 0.2
            if gw is not None:
                types = gw["moderate"]["types_sampled"]
                feed_kinds = types.get("trade", 0) + types.get("depth_update", 0)
                share = types.get("trade", 0) / feed_kinds if feed_kinds else share
                m_total, m_rate = gw["moderate"]["feed_messages"], None
                if gw["moderate"]["driver"]["seconds"]:
                    m_rate = m_total / gw["moderate"]["driver"]["seconds"]
                x_total = gw["max"]["feed_messages"]
                x_rate = x_total / gw["max"]["driver"]["seconds"] if gw["max"]["driver"]["seconds"] else None
                h_total = gw["high"]["feed_messages"]
                h_rate = h_total / gw["high"]["driver"]["seconds"] if gw["high"]["driver"]["seconds"] else None
            else:
                m_rate = moderate_rate(args, n, k) * 1.3
                m_total = int(m_rate * args.moderate_seconds)
                x_total = int(args.max_delivered / ((n + k) / k))
                x_rate = 15_000.0
                h_rate = m_rate * 5
                h_total = int(h_rate * args.seconds)
            m_rate = m_rate or moderate_rate(args, n, k) * 1.3
            x_rate = x_rate or 15_000.0
            h_rate = h_rate or m_rate * 5
            if mode == "write":  # about 5 µs of CPU a delivery: a fifth of the burst is as telling, and 5x shorter
                x_total = max(k, x_total // WRITE_MAX_SHARE)
            result["share_trades"] = round(share, 3)

            def fed_round(rate: float, total: int, feed: Callable[[int], dict[str, Any]]
                          ) -> Callable[[], dict[str, Any]]:
                """A round of the server: ``feed(planned)`` brings its feed (the feeder, or the
                driver's orders through the matcher), between the server's ``round`` and its
                ``stats``; ``rate`` and ``total`` (the gateway's feed) set when the server gives
                up (``start_round``)."""
                def go() -> dict[str, Any]:
                    planned = max(1, total)
                    server.write(f"round {rate:.3f} {planned}")
                    server.line(30.0)
                    got = feed(planned)
                    server.write("stats")  # answered once the server has written what came, or given up
                    return {**got, "planned": planned, **json.loads(server.line(2 * planned / rate + 60.0))}
                return go

            def emit(rate: float, total: int) -> Callable[[], dict[str, Any]]:
                def feed(planned: int) -> dict[str, Any]:
                    feeder.write(f"emit {rate:.3f} {planned} {share:.4f} {k}")  # type: ignore[union-attr]
                    return json.loads(feeder.line(300.0))  # type: ignore[union-attr,no-any-return]
                return fed_round(rate, total, feed)

            def driven(command: str, timeout: float, rate: float, total: int) -> Callable[[], dict[str, Any]]:
                """The driver sends what it sent in the gateway's round of the same kind."""
                return fed_round(rate, total, lambda _: self.drive(command, timeout)())

            if matcher_fed:
                plan = self.commands(n, k, WRITE_MAX_SHARE if mode == "write" else 1)
                burst = plan["max"]
                moderates = [self.moderate_round(clients, pids(), driven(plan["moderate"], args.moderate_seconds + 90,
                                                                         m_rate, m_total), k)
                             for _ in range(args.moderate_rounds)]
                result["moderate"], result["moderate_rounds"] = median_p99(moderates)
                bursts = [measure_round(run, clients, pids(), driven(burst, 200, x_rate, x_total), self.named())
                          for _ in range(args.max_rounds)]
                result["max"], result["max_rounds"] = median_burst(bursts)
                result["high"] = measure_round(run, clients, pids(), driven(plan["high"], args.seconds + 90, h_rate,
                                                                            h_total), self.named())
                result["driven"] = plan
            else:
                named = {"feeder": [feeder.proc.pid]}  # type: ignore[union-attr]
                moderates = [measure_round(run, clients, pids(), emit(m_rate, m_total), named)
                             for _ in range(args.moderate_rounds)]
                result["moderate"], result["moderate_rounds"] = median_p99(moderates)
                bursts = [measure_round(run, clients, pids(), emit(x_rate, x_total), named)
                          for _ in range(args.max_rounds)]
                result["max"], result["max_rounds"] = median_burst(bursts)
                result["high"] = measure_round(run, clients, pids(), emit(h_rate, h_total), named)
            for r in (*moderates, *bursts, result["high"]):
                r.pop("_examples", None)
                r["prev_seq_breaks"] = None  # the ceilings' frames carry no real sequence
            progress(mode, result)
            return result
        finally:
            if clients is not None:
                clients.close()
            run.end(server)
            if feeder is not None:
                run.end(feeder)


def progress(name: str, result: dict[str, Any]) -> None:
    m, x, h = result["moderate"], result["max"], result["high"]
    print(f"    {name:8} {result['memory']['kb_per_connection']:5.2f} KB/conn | moderate {fmt(m['delivered_per_s'])}/s "
          f"p99 {fmt(m['latency_ms']['p99'], '.2f')} ms (read {fmt(m['read_latency_ms']['p99'], '.1f')}"
          + (f", feed alone {fmt(m['feed_latency_ms']['p99'], '.1f')}" if "feed_latency_ms" in m else "")
          + own_figures(m) + ") | "
          f"max {fmt(x['delivered_per_s'])}/s, "
          f"{fmt(x['server_cpu_s_per_million'], '.2f')} CPU s/M{burst_spread(result)} | "
          f"high {fmt(h['delivered_per_s'])}/s "
          f"p99 {fmt(h['latency_ms']['p99'], '.1f')} ms", flush=True)


def own_p99(r: dict[str, Any], figure: str) -> float | None:
    """The p99 (ms) of ``figure`` (``feed_lag_ms``, ``turn_ms``) in a one-worker gateway's log
    of round ``r``; None where not known."""
    own = r.get("gateway_log") or []
    return own[0][figure]["p99"] if len(own) == 1 and own[0][figure] else None


def turn_p99_ms(r: dict[str, Any]) -> float | None:
    """The p99 of a round's walks over the connections: a one-worker gateway's fan-out turns
    (its log), a ceiling's walks (its stats); None where not known."""
    if "gateway_log" in r:
        return own_p99(r, "turn_ms")
    turns = (r.get("driver") or {}).get("turn_ms")
    return turns["p99"] if turns else None


def own_figures(r: dict[str, Any]) -> str:
    """``, own feed lag 0.9, turns 5.8``: p99s (ms) of the gateway's log (a one-worker gateway),
    or the turns of a ceiling's walks; nothing where not known."""
    lag = own_p99(r, "feed_lag_ms")
    turns = turn_p99_ms(r)
    return ((f", own feed lag {lag:.1f}" if lag is not None else "")
            + (f", turns {turns:.1f}" if turns is not None else ""))


def burst_spread(result: dict[str, Any]) -> str:
    """`` (bursts 0.20-0.29)``: the spread of CPU s per million over the max round's bursts."""
    cpu = [r["server_cpu_s"] / r["delivered"] * 1e6 for r in result.get("max_rounds", ()) if r["delivered"]]
    return f" (bursts {min(cpu):.2f}-{max(cpu):.2f})" if len(cpu) > 1 else ""


def moderate_rate(args: argparse.Namespace, n: int, k: int) -> float:
    """The moderate round's orders/s over the K channels: ``--moderate`` a channel, but no more
    than make about ``--moderate-cap`` deliveries/s in all (at about 1.2 feed messages an order),
    so that the round is moderate for the one-write-per-message server too at every N (it
    delivers some 100,000-150,000 messages/s at most) and compares latency, not backlogs."""
    return min(args.moderate * k, args.moderate_cap / (FEED_PER_ORDER * n) * k)


def gateway_available() -> bool:
    return (ROOT / "zmx" / "node" / "gateway.py").exists()


def fmt(x: float | None, spec: str = ",.0f") -> str:
    return "-" if x is None else format(x, spec)


def main(argv: list[str] | None = None) -> int:
    parser = arguments(__doc__)
    parser.add_argument("--n", type=at_least_one, nargs="+", default=None,
                        help="connections per cell (500 1000 5000 15000; 200 with --quick)")
    parser.add_argument("--k", type=at_least_one, nargs="+", default=FULL_K, help="channels (symbols) per cell (1 10)")
    parser.add_argument("--workers", type=at_least_one, default=1, help="gateway worker processes (1)")
    parser.add_argument("--moderate", type=above_zero, default=20.0,
                        help="orders/s per channel in the moderate round (20)")
    parser.add_argument("--moderate-cap", type=above_zero, default=30_000.0,
                        help="at most this many deliveries/s in the moderate round (30000)")
    parser.add_argument("--moderate-seconds", type=above_zero, default=6.0,
                        help="length of a moderate round (6 s; at large N a 5 s round held only about 30 walks)")
    parser.add_argument("--moderate-rounds", type=at_least_one, default=None,
                        help="moderate rounds per target and cell; the one with the median p99 counts (3; 1 with "
                             "--quick)")
    parser.add_argument("--seconds", type=above_zero, default=5.0, help="length of the high round (5 s)")
    parser.add_argument("--high", type=above_zero, default=0.5,
                        help="the high round's rate, as a share of the gateway's max delivered/s (0.5)")
    parser.add_argument("--max-rounds", type=at_least_one, default=None,
                        help="bursts per target and cell; the median by delivered per CPU-second counts "
                             "(3; 1 with --quick)")
    parser.add_argument("--max-delivered", type=at_least_one, default=3_000_000,
                        help="messages to deliver in the max round, about (3000000)")
    parser.add_argument("--client-procs", type=at_least_one, default=2, help="client processes, at least (2)")
    parser.add_argument("--sources", type=at_least_one, default=4, help="loopback source addresses 127.0.0.2... (4)")
    parser.add_argument("--clients-sched", choices=CLIENT_SCHED, default="batch",
                        help="scheduling policy of the client processes: batch (SCHED_BATCH: a client woken "
                             "by a frame does not preempt the server in the middle of a walk, as clients on "
                             "hosts of their own would not) or normal (batch)")
    parser.add_argument("--targets", nargs="+", default=FULL_TARGETS, choices=FULL_TARGETS,
                        help="the servers measured in each cell: the gateway and the two raw asyncio ceilings "
                             "(gateway write coalesce)")
    parser.add_argument("--ceiling-feed", choices=CEILING_FEEDS, default="matcher",
                        help="what feeds the two ceilings: the matcher's PUB, driven as in the gateway's rounds, so "
                             "that their latency starts at the matcher's ts as the gateway's does (matcher), or a "
                             "feeder process replaying the gateway round's rate, stamping ts as it sends (zeromq; "
                             "the results files before it) (matcher)")
    parser.add_argument("--seed", type=int, default=1, help="seed of the order flow (1)")
    parser.add_argument("--quick", action="store_true", help="smoke run: N = 200, 2 s rounds, no results file")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (logs)")
    parser.add_argument("--json", type=Path, help="also write the figures here (smoke runs too)")
    args = parser.parse_args(argv)
    if args.quick:
        args.n, args.seconds, args.moderate_seconds, args.max_delivered = args.n or [200], 2.0, 2.0, 100_000
    args.n = args.n or FULL_N
    args.max_rounds = args.max_rounds or (1 if args.quick else 3)
    args.moderate_rounds = args.moderate_rounds or (1 if args.quick else 3)
    if "gateway" in args.targets and not gateway_available():
        warn("zmx/node/gateway.py is missing: measuring the ceilings only")
        args.targets = [t for t in args.targets if t != "gateway"]
    if max(args.n) / args.client_procs > MAX_PER_PROCESS * 2:
        parser.error("too many connections per client process")
    stop_on_sigterm()
    before = machine_busy()
    note = noise_note(before, "before the run")
    if note:
        warn(note)
    print(f"cells: N {', '.join(map(str, args.n))} x K {', '.join(map(str, args.k))}; targets "
          f"{', '.join(args.targets)}; moderate {args.moderate:g} orders/s per channel for "
          f"{args.moderate_seconds:g} s x {args.moderate_rounds} (the median p99 counts); "
          f"max: about {args.max_delivered:,} deliveries; matcher fsync: never; gateway workers {args.workers}")
    directory = Path(tempfile.mkdtemp(prefix="zmx-bench-fanout-"))
    run = Run(directory)
    cells: list[dict[str, Any]] = []
    started = time.monotonic()
    try:
        bench = Bench(args, run)
        bench.start_cluster()
        for k in args.k:
            for n in args.n:
                print(f"  N={n:,} K={k} ...", flush=True)
                cells.append(bench.cell(n, k))
    finally:
        with shielded():
            run.stop_all()
            remove_directory(directory, args.keep)
    elapsed = time.monotonic() - started
    return report(args, cells, before, elapsed)


def report(args: argparse.Namespace, cells: list[dict[str, Any]], before: Any, elapsed: float) -> int:
    rows = []
    for c in cells:
        for target in ("gateway", "write", "coalesce"):
            t = c.get(target)
            if t is None:
                continue
            m, x, h = t["moderate"], t["max"], t["high"]
            rows.append([f"{c['n']}x{c['k']} {target}", fmt(m["delivered_per_s"]),
                         fmt(m["latency_ms"]["p50"], ".1f"), fmt(m["latency_ms"]["p99"], ".1f"),
                         fmt(x["delivered_per_s"]), fmt(x["server_cpu_s_per_million"], ".2f"),
                         fmt(x["delivered_per_server_cpu_s"]),
                         fmt(h["delivered_per_s"]), fmt(h["latency_ms"]["p50"], ".1f"),
                         fmt(h["latency_ms"]["p99"], ".1f"),
                         fmt(x["cpu_s"]["clients"] / x["delivered"] * 1e6 if x["delivered"] else None, ".2f"),
                         fmt(t["memory"]["kb_per_connection"], ".2f"),
                         str(sum(r["uneven_channels"] + r["lost_connections"] for r in (m, x, h)))])
    print_rows("fan-out, N connections x K channels: moderate | max (burst) | high (paced)",
               ["NxK target", "mod /s", "p50 ms", "p99 ms", "max /s", "cpu s/M", "/cpu-s",
                "high /s", "p50 ms", "p99 ms", "clients s/M", "KB/conn", "uneven+lost"], rows)

    # targets
    t_cells = []
    curve = []
    met_all = True
    for c in cells:
        gw, wr, co = c.get("gateway"), c.get("write"), c.get("coalesce")
        entry: dict[str, Any] = {"n": c["n"], "k": c["k"]}
        if gw is not None:
            per_proc = round((c["n"] + c["k"]) / c["workers"])
            curve.append({"n": c["n"], "k": c["k"], "connections_per_process": per_proc,
                          "moderate_p50_ms": gw["moderate"]["latency_ms"]["p50"],
                          "moderate_p99_ms": gw["moderate"]["latency_ms"]["p99"],
                          "moderate_read_p99_ms": gw["moderate"]["read_latency_ms"]["p99"],
                          "moderate_feed_p99_ms": gw["moderate"].get("feed_latency_ms", {}).get("p99"),
                          "high_delivered_per_s": gw["high"]["delivered_per_s"],
                          "high_p50_ms": gw["high"]["latency_ms"]["p50"],
                          "high_p99_ms": gw["high"]["latency_ms"]["p99"],
                          "high_read_p99_ms": gw["high"]["read_latency_ms"]["p99"]})
            kb = gw["memory"]["kb_per_connection"]
            entry["kb_per_idle_connection"] = kb
            entry["memory_met"] = kb <= TARGETS["kb_per_idle_connection"]
            met_all &= entry["memory_met"]
            if co is not None and co["max"]["delivered_per_server_cpu_s"]:
                ratio = (gw["max"]["delivered_per_server_cpu_s"] or 0) / co["max"]["delivered_per_server_cpu_s"]
                entry["delivered_per_cpu_s_vs_coalesce"] = round(ratio, 3)
                entry["cpu_met"] = ratio >= TARGETS["delivered_per_cpu_s_vs_coalesce"]
                if co["moderate"]["delivered_per_server_cpu_s"] and gw["moderate"]["delivered_per_server_cpu_s"]:
                    entry["delivered_per_cpu_s_vs_coalesce_moderate"] = round(
                        gw["moderate"]["delivered_per_server_cpu_s"] / co["moderate"]["delivered_per_server_cpu_s"], 3)
                met_all &= entry["cpu_met"]
            if wr is not None:
                for rnd in ("moderate", "high", "max"):
                    g99, w99 = gw[rnd]["latency_ms"]["p99"], wr[rnd]["latency_ms"]["p99"]
                    if g99 is not None and w99:
                        entry[f"p99_vs_raw_{rnd}"] = round(g99 / w99, 3)
                # beside it, not in it: how much of the gateway's p99 the matcher's feed already had,
                # and the gateway's own figures (its log): the feed's lag as it took each publication,
                # and its fan-out turns (one write per connection)
                entry["moderate_feed_p99_ms"] = gw["moderate"].get("feed_latency_ms", {}).get("p99")
                if len(gw["moderate"].get("gateway_log") or []) == 1:
                    entry["moderate_gateway_feed_lag_p99_ms"] = own_p99(gw["moderate"], "feed_lag_ms")
                    entry["moderate_gateway_turn_p99_ms"] = own_p99(gw["moderate"], "turn_ms")
                entry["moderate_write_turn_p99_ms"] = turn_p99_ms(wr["moderate"])  # one message per walk
                # "At the same N and rate": the high round counts only where the one-write-per-
                # message server kept the gateway's rate (it rarely can: it waits rather than
                # queue, so its latency there is that of a lower rate). Compared by how long each
                # took to deliver its round, first message to last: a matcher-fed round has the
                # gateway's orders at the gateway's rate, but its own trades, so its own count.
                compared = [rnd for rnd in ("moderate", "high")
                            if wr[rnd]["seconds"] and gw[rnd]["seconds"]
                            and SAME_RATE * wr[rnd]["seconds"] <= gw[rnd]["seconds"]]
                entry["raw_kept_high_rate"] = "high" in compared
                entry["raw_kept_moderate_rate"] = "moderate" in compared
                entry["p99_met"] = bool(compared) and max(
                    entry.get(f"p99_vs_raw_{rnd}", 99) for rnd in compared) <= TARGETS["p99_vs_raw"]
                met_all &= entry["p99_met"]
            if c["n"] == 5_000:
                entry["delivered_per_s_max"] = gw["max"]["delivered_per_s"]
                entry["rate_met"] = (gw["max"]["delivered_per_s"] or 0) >= TARGETS["delivered_per_s_at_5000"]
                met_all &= entry["rate_met"]
            if 450 <= per_proc <= 550:  # "with 500 connections per gateway process"
                p99 = gw["moderate"]["latency_ms"]["p99"]
                entry["p99_ms_at_500_per_process"] = p99
                entry["p99_500_met"] = p99 is not None and p99 <= TARGETS["p99_ms_at_500_per_process"]
                met_all &= entry["p99_500_met"]
        t_cells.append(entry)
    for e in t_cells:
        print("  " + ", ".join(f"{k}={v}" for k, v in e.items()))
    print(f"took {elapsed:.0f} s")
    figures = {
        "config": {"n": args.n, "k": args.k, "workers": args.workers, "moderate_orders_per_s_per_channel":
                   args.moderate, "moderate_deliveries_per_s_cap": args.moderate_cap,
                   "moderate_seconds": args.moderate_seconds, "moderate_rounds": args.moderate_rounds,
                   "feedprobe_policy": getattr(args, "feedprobe_policy", None),
                   "paced_seconds": args.seconds,
                   "high_share_of_max": args.high, "max_rounds": args.max_rounds,
                   "write_ceiling_max_share": 1 / WRITE_MAX_SHARE, "max_delivered": args.max_delivered,
                   "ceiling_feed": args.ceiling_feed,  # CEILING_FEEDS
                   "client_procs": args.client_procs, "clients_sched": args.clients_sched,
                   "sources": args.sources, "sample_every": SAMPLE_EVERY,
                   "seed": args.seed, "matcher_fsync": "never", "targets": args.targets, "elapsed_s": round(elapsed)},
        "targets": {"wanted": TARGETS, "cells": t_cells, "met": met_all if cells else None},
        "latency_curve": curve,
        "cells": cells,
        "noise_before": {"others_cpus": before.others, "steal_cpus": before.steal},
    }
    if cells and "gateway" in args.targets:
        figures["summary"] = summarize("fanout", figures)
    if args.json:
        args.json.write_text(json.dumps({"benchmark": "fanout", **figures}, indent=2) + "\n")
    partial = (sorted(args.n) != FULL_N or sorted(args.k) != FULL_K
               or sorted(args.targets) != sorted(FULL_TARGETS))
    if partial and not args.quick:
        print("a partial run (other cells or targets than the whole matrix): perf/results/fanout.json, which the "
              "README's table reads, is left as it is" + ("" if args.json else "; --json FILE keeps these figures"))
    elif not args.quick:
        path = write_results("fanout", figures)
        print(f"wrote {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--role":
        sys.exit(role_main(sys.argv[2:]))
    sys.exit(main())
