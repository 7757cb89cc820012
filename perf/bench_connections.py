"""Connections on one box: at least 100,000 concurrent subscribed WebSocket connections held by
one gateway (``workers`` processes), a low fixed feed through them, then a reconnect storm
(issue 5).

Real processes on free ports, the topology, journals and logs in a temporary directory: a
router, one matcher that owns ``--symbols`` (12) symbols (``fsync: never``: the journal is not
what is measured), and one gateway ``g1`` with ``--workers`` processes (default: one per 12,500
connections) sharing the port with ``SO_REUSEPORT``. Helper processes are this file run with
``--role``:

- **clients** (``ceil(N / 14,000)`` processes, each under the ~19,900 sockets a process may
  open here): raw asyncio (uvloop) WebSocket clients, spread over ``--sources`` loopback
  source addresses 127.0.0.2... (bound with ``IP_BIND_ADDRESS_NO_PORT``, so each source address
  has its own ~28,000 ephemeral ports towards the gateway). Connection ``g`` subscribes one,
  two or three channels in one ``subscribe`` (``channels_of``: 3/4 of them one, 1/8 two, 1/8
  three), and is *subscribed* once it has the ``depth_snapshot`` of each. Every connection
  walks every frame it gets (cheap at this rate): it counts ``depth_update`` s per channel,
  checks ``prev_seq`` against the last ``seq`` it had, takes the latency ``read time - data.ts``
  (the matcher's ``time.time_ns()`` when it handled the order; one clock on one machine) of
  each one, and answers the gateway's pings. Every ``SAMPLE_EVERY``-th connection (17) is a
  *sampler* read through ``bench_fanout.StampedSocket``: it also takes the push latency to the
  update's *arrival*, the kernel's stamp on its TCP segment. The push latency reported (and set
  beside the model) is the samplers' arrival: the read time adds the wait of a client process
  for a core that gateway workers and other clients share, which clients on their own hosts
  would not pay; it is reported beside (``read_latency_ms``). Handshakes in flight are bounded
  (``--concurrency`` per client process).
- **probe**: a SUB on the matcher's PUB: what the matcher published per symbol in the window
  (the reference every connection's count is compared with) and the matcher -> SUB latency.
- **driver**: ``zmx.node.client.Client`` to the router, paced open loop
  (``bench_orders.paced``), the symbols in turn: resting limit orders 1-20 ticks from the
  mid that never cross, and cancels of them; each order is exactly one publication, one
  ``depth_update`` per subscriber.
- **writecost**: a small raw loop in the same run, the ``cost of one write`` of the latency
  model: a uvloop process writes one gateway-sized frame with ``transport.write`` to each of
  1,000 loopback TCP connections (the other ends in the same process, read outside the
  timing), CPU time per write over 30 rounds.

Phases (each with a timeout):

1. **connect**: every client process opens its connections at once (waves bounded by
   ``--concurrency``); connect time = the coordinator's start to the last connection
   subscribed; the curve of subscribed connections over time.
2. **held**: a few seconds idle, then the gateway's RSS (all processes of the gateway, its
   parent included) minus its RSS before the first connection, per connection; kernel memory
   beside it: ``/proc/net/sockstat`` TCP ``mem`` pages (socket buffers) and ``/proc/meminfo``
   ``Slab`` (socket structures, file, epoll entries), per connection (both ends of each
   connection are on this machine: two sockets); the gateway's sockets per worker.
3. **feed**: ``--rate`` depth updates/s per symbol for ``--seconds`` (all symbols, the
   driver paced); then the counts: every connection must have exactly what the probe saw the
   matcher publish on each of its channels (none lost, none extra, no ``prev_seq`` break, no
   fresh snapshot); push latency p50 / p99 / p99.9 to arrival (samplers) and to the read (every
   delivered update); the CPU of every process; the gateway's CPU per delivered message. The p99 is set beside the model
   ``subscribers per gateway process x cost of one write`` (the writecost loop), and beside
   the same with the two cores shared by every gateway worker and client process.
4. **storm**: every client process aborts all of its connections at once (RST) and opens
   them again at once; storm time = the coordinator's start to the last connection
   subscribed again. Then the feed again (``--seconds / 2``), counted the same way, and the
   gateway's memory after the storm.
5. The gateway's log (stderr of every worker): ERROR / CRITICAL lines and tracebacks (must
   be 0), WARNING lines, and the counts each worker logs when it stops.

Targets: ``TARGETS``. Run: ``.venv/bin/python perf/bench_connections.py`` (100,000
connections, about 5 minutes), ``--connections N``, or ``--quick`` (5,000 connections, 2
workers, under a minute, no results file). Writes ``perf/results/connections.json``;
``zmx bench connections`` (or ``zmx bench plot connections`` later) draws the plots
``connections_latency_cdf.png`` (``plots.py``) and ``connections_connect.png`` (the connect
and storm curves, ``draw`` here).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import math
import os
import random
import re
import resource
import socket
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson
from _common import (ROOT, Progress, above_zero, arguments, at_least_one, machine_busy, noise_note, remove_directory,
                     shielded, warn, write_results)
from bench_fanout import (
    HZ,
    Run,
    StampedSocket,
    StdinLines,
    bucket_us,
    client_frame,
    hist_percentiles,
    jiffies,
    received_publications,
    rss_kb,
    server_frame,
    server_frames,
    tree,
)
from bench_orders import (
    ACCOUNTS,
    MAX_DISTANCE,
    MID,
    Helper,
    await_route,
    paced,
    pipelined,
    print_rows,
    stop_on_sigterm,
    watchdog,
)
from nodes import free_ports  # tests/nodes.py, on the path through bench_orders
from summaries import summarize

from zmx.commands import CancelOrder, Command, SubmitOrder
from zmx.model import OrderType, Side, TimeInForce
from zmx.node.runtime import announce_ready

SCRIPT = Path(__file__).resolve()
PER_WORKER = 12_500  # connections per gateway process (a process may open ~19,900 sockets)
PER_CLIENT_PROC = 14_000  # connections per client process, at most
IP_BIND_ADDRESS_NO_PORT = 24  # Linux: bind() picks no port; connect() picks one per destination
HELPER_MAX_S = 1800  # a helper ends by itself after this long (or as soon as the benchmark is gone)
BUCKET_NS = 100_000_000  # connect curve resolution: 0.1 s
PRIME_PER_SIDE = 10
LIVE_CAP = 20
PAGE = os.sysconf("SC_PAGE_SIZE")
# Every 17th connection is a sampler: 17 shares no factor with the 12 symbols nor with the
# 8-connection cycle of channels_of, so the samplers hold every channel and kind of subscription
# in the same shares as all connections (every 16th would hold only symbols 0, 4 and 8).
SAMPLE_EVERY = 17

TARGETS = {
    "connections": 100_000,  # held, subscribed, at once
    "lost_updates": 0,  # every update published on a channel reaches every subscriber of it
    "gateway_kb_per_connection": 3.2,  # RSS delta of every gateway process / N (user space)
    "storm_s": 60.0,  # reconnect storm back to fully subscribed
    "gateway_errors": 0,  # ERROR / CRITICAL lines and tracebacks in the gateway's log
}


def symbols(k: int) -> tuple[str, ...]:
    return tuple(f"C{i:02d}-USDT" for i in range(k))


def channels_of(g: int, k: int) -> tuple[int, ...]:
    """The channels (symbol indexes) connection ``g`` subscribes: 3/4 one, 1/8 two, 1/8 three."""
    n = 3 if g % 8 == 7 else 2 if g % 8 == 3 else 1
    step = max(1, k // 3)
    return tuple((g + j * step) % k for j in range(n))


def subscribers_per_symbol(n: int, k: int) -> list[int]:
    out = [0] * k
    for g in range(n):
        for s in channels_of(g, k):
            out[s] += 1
    return out


# -- load clients (--role clients) ------------------------------------------------------------------

HANDSHAKE, SETUP, OPEN, DEAD = range(4)


class ClientProc:
    """What one client process knows (shared by its connections)."""

    def __init__(self, names: Sequence[str], host: bytes) -> None:
        self.names = names
        self.index = {name.encode(): i for i, name in enumerate(names)}
        self.host = host
        self.window = False
        self.lost = 0  # connections closed that we did not close
        self.closes: Counter[int] = Counter()  # close codes the server sent
        self.pongs = 0
        self.connect_errors: Counter[str] = Counter()
        self.failed = 0
        self.subscribed = 0
        self.want = 0
        self.t0 = 0
        self.done: Counter[int] = Counter()  # subscribed connections per BUCKET_NS since t0
        self.last_done = 0
        self.all_done = asyncio.Event()
        self.reset()

    def reset(self) -> None:
        self.depth = 0
        self.hist: Counter[int] = Counter()  # ts -> arrival in this host's kernel (samplers)
        self.hist_read: Counter[int] = Counter()  # ts -> read by this process (every connection)
        self.breaks = 0
        self.snapshots = 0  # depth_snapshots in the window (a resync, a slow consumer)
        self.heartbeats = 0
        self.errors: Counter[str] = Counter()
        self.other: Counter[str] = Counter()

    def subscribed_one(self) -> None:
        now = time.time_ns()
        self.subscribed += 1
        self.done[(now - self.t0) // BUCKET_NS] += 1
        self.last_done = now
        if self.subscribed >= self.want:
            self.all_done.set()


class Conn(asyncio.Protocol):
    """One load connection; see the module documentation."""

    __slots__ = ("arrived_ns", "buf", "chans", "counts", "pending", "proc", "seqs", "state", "transport",
                 "upgraded")

    def __init__(self, proc: ClientProc, chans: tuple[int, ...]) -> None:
        self.proc = proc
        self.chans = chans
        self.counts = [0] * len(chans)
        self.seqs = [-1] * len(chans)
        self.pending = len(chans)
        self.state = HANDSHAKE
        self.buf = b""
        self.arrived_ns = 0  # a sampler's chunk: when its last segment reached the kernel (StampedSocket)
        self.transport: asyncio.Transport | StampedSocket | None = None
        self.upgraded: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        key = base64.b64encode(os.urandom(16))
        transport.write(b"GET / HTTP/1.1\r\nHost: " + self.proc.host + b"\r\nUpgrade: websocket\r\n"  # type: ignore
                        b"Connection: Upgrade\r\nSec-WebSocket-Key: " + key + b"\r\nSec-WebSocket-Version: 13\r\n\r\n")

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if self.state != DEAD:
            self.state = DEAD
            self.proc.lost += 1
        if not self.upgraded.done():
            self.upgraded.set_exception(ConnectionError(f"closed before the upgrade: {exc}"))

    def abort(self) -> None:
        self.state = DEAD
        if self.transport is not None:
            self.transport.abort()

    def data_received(self, data: bytes) -> None:
        if self.state == HANDSHAKE:
            buf = self.buf + data
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                self.buf = buf
                return
            self.buf = b""
            if not buf.startswith(b"HTTP/1.1 101"):
                self.proc.connect_errors[buf.split(b"\r\n", 1)[0].decode(errors="replace")[:80]] += 1
                self.abort()
                if not self.upgraded.done():
                    self.upgraded.set_exception(ConnectionError("upgrade refused"))
                return
            self.state = SETUP
            self.upgraded.set_result(None)
            names = self.proc.names
            request = b'{"action":"subscribe","channels":[' + b",".join(
                b'"' + names[c].encode() + b'"' for c in self.chans) + b"]}"
            self.transport.write(client_frame(1, request))  # type: ignore[union-attr]
            data = buf[end + 4:]
            if not data:
                return
        buf = self.buf + data if self.buf else data
        now = 0
        i = 0
        for opcode, start, end in server_frames(buf):
            if opcode == 1:
                if not now:
                    now = time.time_ns()
                try:
                    self._message(buf[start:end], now)
                except (ValueError, KeyError, IndexError) as e:
                    self.proc.errors[f"client could not read a message: {type(e).__name__}"] += 1
            elif opcode == 9:
                if self.transport is not None:
                    self.transport.write(client_frame(0xA, buf[start:end]))
                    self.proc.pongs += 1
            elif opcode == 8:
                self.proc.closes[int.from_bytes(buf[start:start + 2], "big") if end - start >= 2 else 1005] += 1
            i = end
        self.buf = buf[i:] if i < len(buf) else b""

    def _message(self, p: bytes, now: int) -> None:
        proc = self.proc
        if not p.startswith(b'{"channel":"'):
            if p.startswith(b'{"type":"subscription_ack"'):
                return
            msg = orjson.loads(p)
            if msg.get("type") == "error":
                proc.errors[str(msg.get("code"))] += 1
            else:
                proc.other[str(msg.get("type"))] += 1
            return
        j = p.index(b'"', 12)
        pos = self.chans.index(proc.index[p[12:j]])
        kind = p[j + 10:j + 17]
        if kind == b"depth_u":
            s = p.index(b'"seq":', j) + 6
            c = p.index(b",", s)
            seq = int(p[s:c])
            ps = p.index(b'"prev_seq":', c) + 11
            prev = p[ps:p.index(b",", ps)]
            last = self.seqs[pos]
            if last >= 0 and prev != b"%d" % last:
                proc.breaks += 1
            self.seqs[pos] = seq
            if proc.window:
                self.counts[pos] += 1
                proc.depth += 1
                t = p.rindex(b'"ts":') + 5
                ts = int(p[t:p.index(b"}", t)])
                proc.hist_read[bucket_us((now - ts) // 1000)] += 1
                if self.arrived_ns:
                    proc.hist[bucket_us((self.arrived_ns - ts) // 1000)] += 1
        elif kind == b"depth_s":
            s = p.index(b'"seq":', j) + 6
            self.seqs[pos] = int(p[s:p.index(b",", s)])
            if self.state == SETUP:
                self.pending -= 1
                if self.pending <= 0:
                    self.state = OPEN
                    proc.subscribed_one()
            elif proc.window:
                proc.snapshots += 1
        elif kind == b"heartbe":
            proc.heartbeats += 1
        else:
            proc.other[kind.decode(errors="replace")] += 1


class ClientRunner:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.proc = ClientProc(symbols(args.symbols), f"{args.host}:{args.port}".encode())
        self.conns: list[Conn | None] = [None] * args.count
        self.addrs = [f"127.0.0.{2 + i}" for i in range(args.sources)] if args.host.startswith("127.") else []

    async def open_one(self, g: int, gate: asyncio.Semaphore) -> None:
        loop = asyncio.get_running_loop()
        proc, args = self.proc, self.args
        for attempt in range(5):
            conn = Conn(proc, channels_of(g, args.symbols))
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                async with gate:
                    sock.setblocking(False)
                    if self.addrs:
                        sock.setsockopt(socket.SOL_IP, IP_BIND_ADDRESS_NO_PORT, 1)
                        sock.bind((self.addrs[g % len(self.addrs)], 0))
                    await loop.sock_connect(sock, (args.host, args.port))
                    if g % SAMPLE_EVERY == 0:  # a sampler: its latency to arrival (bench_fanout.StampedSocket)
                        StampedSocket(loop, sock, conn)  # type: ignore[arg-type]
                    else:
                        await loop.create_connection(lambda c=conn: c, sock=sock)  # type: ignore[misc]
                    await asyncio.wait_for(conn.upgraded, 30.0)
                self.conns[g - args.first] = conn
                return
            except (OSError, ConnectionError, TimeoutError) as e:
                proc.connect_errors[f"{type(e).__name__}: {str(e)[:60]}"] += 1
                if conn.transport is not None:
                    conn.abort()
                else:
                    conn.state = DEAD
                    sock.close()
                await asyncio.sleep(0.2 * (attempt + 1))
        proc.failed += 1

    async def connect_all(self, t0: int, timeout: float) -> dict[str, Any]:
        proc, args = self.proc, self.args
        proc.t0, proc.want, proc.subscribed, proc.failed = t0, args.count, 0, 0
        proc.done.clear()
        proc.all_done.clear()
        proc.connect_errors.clear()
        gate = asyncio.Semaphore(args.concurrency)
        lost_before = proc.lost

        async def everything() -> None:
            await asyncio.gather(*(self.open_one(g, gate) for g in range(args.first, args.first + args.count)))
            await proc.all_done.wait()

        timed_out = False
        try:
            await asyncio.wait_for(everything(), timeout)
        except TimeoutError:
            timed_out = True
        return {"want": args.count, "subscribed": proc.subscribed, "timed_out": timed_out, "failed": proc.failed,
                "last_ns": proc.last_done, "done": dict(proc.done), "connect_errors": dict(proc.connect_errors),
                "lost": proc.lost - lost_before, "open": self.open()}

    def open(self) -> int:
        return sum(1 for c in self.conns if c is not None and c.transport is not None)

    async def storm(self, t0: int, timeout: float) -> dict[str, Any]:
        started = time.time_ns()
        for conn in self.conns:
            if conn is not None:
                conn.abort()
        aborted = time.time_ns()
        self.conns = [None] * self.args.count
        await asyncio.sleep(0)  # the aborted sockets are closed in the next loop turn
        result = await self.connect_all(t0, timeout)
        result["abort_start_ns"], result["abort_s"] = started, (aborted - started) / 1e9
        return result

    def stop(self) -> dict[str, Any]:
        proc = self.proc
        proc.window = False
        per: dict[int, Counter[int]] = {}
        for conn in self.conns:
            if conn is None:
                continue
            for c, n in zip(conn.chans, conn.counts, strict=True):
                per.setdefault(c, Counter())[n] += 1
        return {"depth": proc.depth, "per_channel": {proc.names[c]: dict(v) for c, v in per.items()},
                "hist": dict(proc.hist), "hist_read": dict(proc.hist_read), "prev_seq_breaks": proc.breaks,
                "snapshots": proc.snapshots,
                "heartbeats": proc.heartbeats, "errors": dict(proc.errors), "other": dict(proc.other),
                "lost": proc.lost, "closes": dict(proc.closes), "pongs": proc.pongs, "open": self.open()}

    async def main(self) -> None:
        loop = asyncio.get_running_loop()
        announce_ready("clients", "clients", count=self.args.count, first=self.args.first,
                       fd_limit=resource.getrlimit(resource.RLIMIT_NOFILE)[0])
        reader = asyncio.StreamReader()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        while True:
            words = (await reader.readline()).decode().split()
            if not words or words[0] == "quit":
                break
            cmd = words[0]
            if cmd == "connect":  # connect T0_NS TIMEOUT_S
                out = await self.connect_all(int(words[1]), float(words[2]))
            elif cmd == "storm":  # storm T0_NS TIMEOUT_S
                out = await self.storm(int(words[1]), float(words[2]))
            elif cmd == "start":
                for conn in self.conns:
                    if conn is not None:
                        conn.counts = [0] * len(conn.chans)
                self.proc.reset()
                self.proc.window = True
                out = {"ok": True, "pongs": self.proc.pongs}
            elif cmd == "poll":
                out = {"depth": self.proc.depth, "open": self.open()}
            elif cmd == "stop":
                out = self.stop()
            else:
                out = {"error": f"unknown command {cmd}"}
            print(json.dumps(out), flush=True)
        for conn in self.conns:
            if conn is not None:
                conn.abort()


# -- probe (--role probe): what the matcher published --------------------------------------------------


def role_probe(pub: str, k: int) -> None:
    import zmq

    from zmx.events import BookChanged
    from zmx.topics import topic

    names = symbols(k)
    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.linger = 0
    sub.rcvhwm = 100_000
    sub.connect(pub)
    for name in names:
        sub.subscribe(topic(name))
    poller = zmq.Poller()
    poller.register(sub, zmq.POLLIN)
    stdin = StdinLines()
    poller.register(stdin.fd, zmq.POLLIN)
    seen: set[str] = set()
    ready = False
    window = False
    counts: Counter[str] = Counter()
    hist: Counter[int] = Counter()
    deadline = time.monotonic() + 30.0
    while True:
        events = dict(poller.poll(500))
        if sub in events:
            for now, name, published in received_publications(sub):
                seen.add(name)
                if window:
                    for event in published:
                        if type(event) is BookChanged:
                            counts[name] += 1
                            hist[bucket_us((now - event.ts_ns) // 1000)] += 1
        if not ready:
            if len(seen) == len(names):
                ready = True
                announce_ready("probe", "probe", symbols=len(names))
            elif time.monotonic() > deadline:
                print(json.dumps({"error": f"probe: heard {len(seen)} of {len(names)} symbols in 30 s"}), flush=True)
                return
        if stdin.fd in events:
            lines = stdin.read()
            for word in ["quit"] if lines is None else lines:
                if word == "quit":
                    return
                if word == "start":
                    counts.clear()
                    hist.clear()
                    window = True
                    print(json.dumps({"ok": True}), flush=True)
                elif word == "count":
                    print(json.dumps({"total": sum(counts.values())}), flush=True)
                elif word == "stop":
                    window = False
                    print(json.dumps({"published": dict(counts), "hist": dict(hist)}), flush=True)


# -- order driver (--role driver) ------------------------------------------------------------------


class Flow:
    """A seeded order flow, the symbols in turn: a resting limit order 1-20 ticks from the mid
    (buys below, sells above: nothing ever crosses) or a cancel of a resting one, so each order
    is exactly one ``BookChanged``: one ``depth_update`` for each subscriber."""

    def __init__(self, seed: int, names: Sequence[str]) -> None:
        self.rng = random.Random(seed)
        self.names = tuple(names)
        self.live: dict[str, list[tuple[str, str]]] = {s: [] for s in names}
        self.turn = 0
        self.ids = 0

    def _rest(self, symbol: str, prefix: str) -> SubmitOrder:
        rng = self.rng
        self.ids += 1
        side = Side.BUY if rng.random() < 0.5 else Side.SELL
        distance = rng.randint(1, MAX_DISTANCE)
        price = MID - distance if side is Side.BUY else MID + distance
        order_id, account = f"{prefix}{self.ids}", ACCOUNTS[rng.randrange(len(ACCOUNTS))]
        self.live[symbol].append((order_id, account))
        return SubmitOrder(order_id, account, symbol, side, OrderType.LIMIT, TimeInForce.GTC, price,
                           rng.randint(1, 500))

    def prime(self, per_symbol: int) -> list[Command]:
        return [self._rest(s, "p") for s in self.names for _ in range(per_symbol)]

    def take(self, n: int, prefix: str) -> list[Command]:
        out: list[Command] = []
        for _ in range(n):
            symbol = self.names[self.turn % len(self.names)]
            self.turn += 1
            resting = self.live[symbol]
            if resting and (len(resting) >= LIVE_CAP or self.rng.random() < 0.45):
                j = self.rng.randrange(len(resting))
                order_id, account = resting[j]
                resting[j] = resting[-1]
                resting.pop()
                out.append(CancelOrder(order_id, account, symbol))
            else:
                out.append(self._rest(symbol, prefix))
        return out


def role_driver(front: str, k: int, seed: int) -> None:
    from zmx.node.client import Client

    names = symbols(k)
    client = Client([front])
    try:
        await_route(client, names)
        flow = Flow(seed, names)
        primed = pipelined(client, flow.prime(2 * PRIME_PER_SIDE), 256, 60.0)
        announce_ready("driver", "driver", primed=len(names) * 2 * PRIME_PER_SIDE, not_ok=dict(primed.not_ok))
        for rounds, line in enumerate(sys.stdin, 1):
            words = line.split()
            if not words or words[0] == "quit":
                break
            rate, seconds = float(words[1]), float(words[2])  # paced RATE SECONDS (rate: orders/s, all symbols)
            commands = flow.take(max(1, round(rate * seconds)), f"r{rounds}o")
            r = paced(client, commands, rate, seconds + 60.0)
            print(json.dumps({"orders": len(commands), "seconds": round(r.seconds, 3),
                              "orders_per_s": round(len(commands) / r.seconds, 1) if r.seconds else None,
                              "not_ok": dict(r.not_ok)}), flush=True)
    finally:
        client.close()


# -- the cost of one write (--role writecost) --------------------------------------------------------


async def _write_cost(conns: int, rounds: int, size: int) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    servers: list[asyncio.Transport] = []
    got = [0]

    class Server(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            servers.append(transport)  # type: ignore[arg-type]

    class Sink(asyncio.Protocol):
        def data_received(self, data: bytes) -> None:
            got[0] += len(data)

    srv = await loop.create_server(Server, "127.0.0.1", 0, backlog=4096)
    port = srv.sockets[0].getsockname()[1]
    sinks = [await loop.create_connection(Sink, "127.0.0.1", port) for _ in range(conns)]
    while len(servers) < conns:
        await asyncio.sleep(0.01)
    frame = server_frame(b'{"channel":"C00-USDT","type":"depth_update","data":{"seq":1234,"prev_seq":1233,"bids":'
                         b'[["29999.87","0.377"]],"asks":[],"checksum":3366291421,"ts":1764218885123456789}}'
                         .ljust(size, b" "))
    cpu_us, wall_us = [], []
    for _ in range(rounds):
        want = got[0] + len(frame) * conns
        c0, w0 = time.process_time_ns(), time.perf_counter_ns()
        for transport in servers:
            transport.write(frame)
        c1, w1 = time.process_time_ns(), time.perf_counter_ns()
        cpu_us.append((c1 - c0) / conns / 1000)
        wall_us.append((w1 - w0) / conns / 1000)
        end = time.monotonic() + 10
        while got[0] < want and time.monotonic() < end:
            await asyncio.sleep(0.001)
        await asyncio.sleep(0.02)
    for transport, _ in sinks:
        transport.abort()
    for transport in servers:
        transport.abort()
    srv.close()
    cpu_us.sort()
    wall_us.sort()
    return {"connections": conns, "rounds": rounds, "frame_bytes": len(frame),
            "cpu_us_per_write": {"median": round(cpu_us[len(cpu_us) // 2], 2), "min": round(cpu_us[0], 2)},
            "wall_us_per_write": {"median": round(wall_us[len(wall_us) // 2], 2), "min": round(wall_us[0], 2)}}


def role_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="bench_connections.py --role")
    parser.add_argument("role", choices=("clients", "probe", "driver", "writecost"))
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--count", type=int, default=0)
    parser.add_argument("--first", type=int, default=0)
    parser.add_argument("--symbols", type=int, default=12)
    parser.add_argument("--sources", type=int, default=8)
    parser.add_argument("--concurrency", type=int, default=256)
    parser.add_argument("--endpoint", default="")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--max-seconds", type=float, default=HELPER_MAX_S)
    args = parser.parse_args(argv)
    watchdog(args.max_seconds)
    if args.role == "probe":
        role_probe(args.endpoint, args.symbols)
        return 0
    if args.role == "driver":
        role_driver(args.endpoint, args.symbols, args.seed)
        return 0
    import uvloop

    if args.role == "writecost":
        result = uvloop.run(_write_cost(args.count or 1000, 30, 180))
        announce_ready("writecost", "writecost", **result)
        return 0
    uvloop.run(ClientRunner(args).main())
    return 0


# -- measuring from outside ------------------------------------------------------------------------------


def sockstat() -> dict[str, int]:
    """``/proc/net/sockstat``: sockets used, TCP inuse / orphan / tw / alloc / mem (pages)."""
    out: dict[str, int] = {}
    try:
        with open("/proc/net/sockstat", encoding="ascii") as f:
            for line in f:
                head, _, rest = line.partition(":")
                words = rest.split()
                if head == "sockets":
                    out["sockets_used"] = int(words[1])
                elif head == "TCP":
                    for key, value in zip(words[::2], words[1::2], strict=True):
                        out[f"tcp_{key}"] = int(value)
    except (OSError, ValueError):
        pass
    return out


def meminfo() -> dict[str, int]:
    out: dict[str, int] = {}
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in ("MemTotal", "MemAvailable", "Slab", "SUnreclaim"):
                    out[key] = int(rest.split()[0])
    except (OSError, ValueError):
        pass
    return out


def slabinfo() -> dict[str, int]:
    """Bytes in each kernel slab cache (``/proc/slabinfo``: objects x object size; needs root)."""
    out: dict[str, int] = {}
    try:
        with open("/proc/slabinfo", encoding="ascii") as f:
            for line in f:
                words = line.split()
                if len(words) > 3 and words[0] not in ("slabinfo", "#") and words[2].isdigit():
                    out[words[0]] = int(words[2]) * int(words[3])
    except (OSError, ValueError):
        pass
    return out


def sockets_of(pid: int) -> int:
    try:
        return sum(1 for fd in os.listdir(f"/proc/{pid}/fd")
                   if os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:"))
    except OSError:
        return 0


def fds_of(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0


def read_int(path: str) -> str | None:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return None


def machine() -> dict[str, Any]:
    mem = meminfo()
    return {"cpus": os.cpu_count(), "mem_total_gib": round(mem.get("MemTotal", 0) / 2**20, 1),
            "kernel": os.uname().release, "fd_limit": list(resource.getrlimit(resource.RLIMIT_NOFILE)),
            "ip_local_port_range": read_int("/proc/sys/net/ipv4/ip_local_port_range"),
            "somaxconn": read_int("/proc/sys/net/core/somaxconn"),
            "tcp_mem_pages": read_int("/proc/sys/net/ipv4/tcp_mem"),
            "page_bytes": PAGE}


SOCKET_CACHES = ("TCP", "sock_inode_cache", "filp", "dentry", "eventpoll_epi", "eventpoll_pwq")
LOG_ERROR = re.compile(r" (ERROR|CRITICAL) |Traceback \(most recent call last\)")
LOG_WARNING = re.compile(r" WARNING ")
LOG_COUNTS = re.compile(r"stopped; counts: (.*)$")


def read_log(path: Path, offset: int = 0) -> dict[str, Any]:
    """ERROR / CRITICAL lines and tracebacks, WARNING lines, and the examples, from ``offset``."""
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            text = f.read().decode(errors="replace")
    except OSError:
        return {"errors": 0, "warnings": 0, "error_examples": [], "warning_examples": []}
    lines = text.splitlines()
    errors = [line for line in lines if LOG_ERROR.search(line)]
    warnings = [line for line in lines if LOG_WARNING.search(line)]
    counts: Counter[str] = Counter()
    for line in lines:
        m = LOG_COUNTS.search(line)
        if m and m[1] != "none":
            for item in m[1].split(", "):
                key, _, value = item.partition("=")
                with contextlib.suppress(ValueError):
                    counts[key] += int(value)
    return {"errors": len(errors), "warnings": len(warnings), "error_examples": errors[:5],
            "warning_examples": warnings[:5], "stop_counts": dict(counts)}


def log_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def write_topology(path: Path, ports: dict[str, int], k: int, workers: int) -> Path:
    lines = ["cluster: bench-connections", "symbols:"]
    lines += [f'  {s}: {{matcher: m1, tick_size: "0.01", lot_size: "0.001"}}' for s in symbols(k)]
    lines += ["nodes:",
              f'  r1: {{role: router, front: "tcp://127.0.0.1:{ports["front"]}", '
              f'back: "tcp://127.0.0.1:{ports["back"]}"}}',
              f'  m1: {{role: matcher, pub: "tcp://127.0.0.1:{ports["pub"]}", '
              f'snapshot: "tcp://127.0.0.1:{ports["snapshot"]}", data_dir: "var/m1", fsync: never, '
              f"snapshot_every: 10000000}}",
              f'  g1: {{role: gateway, listen: "127.0.0.1:{ports["gateway"]}", workers: {workers}}}']
    path.write_text("\n".join(lines) + "\n")
    return path


def curve(done: Counter[int], step: int = 1) -> list[list[float]]:
    """[[seconds, subscribed so far], ...] from subscribed-per-bucket counts."""
    out, total = [], 0
    last = max(done) if done else 0
    for b in range(0, last + 1):
        total += done.get(b, 0)
        if b % step == 0 or b == last:
            out.append([round((b + 1) * BUCKET_NS / 1e9, 2), total])
    return out


class Bench:
    def __init__(self, args: argparse.Namespace, run: Run, progress: Progress) -> None:
        self.args = args
        self.run = run
        self.progress = progress
        self.names = symbols(args.symbols)
        self.subs = subscribers_per_symbol(args.connections, args.symbols)
        self.clients: list[Helper] = []

    # -- setup ---------------------------------------------------------------------------------------

    def start(self) -> dict[str, Any]:
        args, run = self.args, self.run
        ports = dict(zip(("front", "back", "pub", "snapshot", "gateway"), free_ports(5), strict=True))
        self.ports = ports
        topo = write_topology(run.directory / "cluster.yaml", ports, args.symbols, args.workers)
        self.matcher = run.node(topo, "m1")
        self.router = run.node(topo, "r1")
        self.gateway = run.node(topo, "g1")
        self.gateway_log = run.directory / "g1.log"
        self.progress.step("cluster up")
        sym = ["--symbols", str(args.symbols)]
        self.probe, _ = run.helper("probe", "probe", "--endpoint", f"tcp://127.0.0.1:{ports['pub']}", *sym)
        self.driver, _ = run.helper("driver", "driver", "--endpoint", f"tcp://127.0.0.1:{ports['front']}",
                                    "--seed", str(args.seed), *sym, ready_timeout=90.0)
        wc, write_cost = run.helper("writecost", "writecost", "--count", "1000", ready_timeout=120.0)
        run.end(wc)
        per = math.ceil(args.connections / args.client_procs)
        first = 0
        for i in range(args.client_procs):
            count = min(per, args.connections - first)
            h = Helper(SCRIPT, f"clients-{i}", ["clients", "--port", str(ports["gateway"]), "--count", str(count),
                                                "--first", str(first), "--sources", str(args.sources),
                                                "--concurrency", str(args.concurrency), *sym,
                                                "--max-seconds", str(HELPER_MAX_S)], run.directory)
            run.helpers.append(h)
            self.clients.append(h)
            first += count
        for h in self.clients:
            run.ready(h, 60.0)
        self.progress.step("helpers ready")
        return {"node": "writecost", **{k: v for k, v in write_cost.items() if k not in ("node", "role")}}

    def gateway_pids(self) -> list[int]:
        return tree(self.gateway.proc.pid)

    def workers(self) -> list[int]:
        """The gateway processes that serve connections (the parent itself when there is one worker)."""
        return [p for p in self.gateway_pids() if p != self.gateway.proc.pid] or [self.gateway.proc.pid]

    def memory(self) -> dict[str, Any]:
        pids = self.gateway_pids()
        return {"gateway_rss_kb": rss_kb(pids), "worker_rss_kb": sorted(rss_kb([p]) for p in self.workers()),
                "clients_rss_kb": rss_kb([h.proc.pid for h in self.clients]),
                "sockstat": sockstat(), "meminfo_kb": meminfo(), "slab_bytes": slabinfo()}

    def ask(self, helpers: Sequence[Helper], command: str, timeout: float) -> list[dict[str, Any]]:
        for h in helpers:
            h.write(command)
        return [json.loads(h.line(timeout)) for h in helpers]

    def groups(self) -> dict[str, list[int]]:
        return {"gateway": self.gateway_pids(), "clients": [h.proc.pid for h in self.clients],
                "matcher": [self.matcher.proc.pid], "router": [self.router.proc.pid],
                "driver": [self.driver.proc.pid], "probe": [self.probe.proc.pid]}

    # -- phases ----------------------------------------------------------------------------------------

    def connect(self, command: str, timeout: float) -> dict[str, Any]:
        """``connect`` or ``storm`` in every client process at once; the time to fully subscribed."""
        cpu0 = {k: jiffies(v) for k, v in self.groups().items()}
        workers = self.workers()
        peak = {p: fds_of(p) if command == "storm" else 0 for p in workers}
        sampling = threading.Event()

        def sample() -> None:  # the most descriptors each gateway process held meanwhile (limit ~19,900)
            # only in the storm: listing /proc/PID/fd makes a proc inode and a dentry per descriptor, which
            # would count as kernel memory of the connections in the held phase
            while command == "storm" and not sampling.wait(0.5):
                for p in workers:
                    peak[p] = max(peak[p], fds_of(p))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        t0 = time.time_ns()
        try:
            for h in self.clients:
                h.write(f"{command} {t0} {timeout:.1f}")
            results = [json.loads(h.line(timeout + 60)) for h in self.clients]
        finally:
            sampling.set()
            sampler.join()
        wall = (time.time_ns() - t0) / 1e9
        cpu = {k: round((jiffies(v) - cpu0[k]) / HZ, 2) for k, v in self.groups().items()}
        done: Counter[int] = Counter()
        errors: Counter[str] = Counter()
        for r in results:
            done.update({int(b): n for b, n in r["done"].items()})
            errors.update(r["connect_errors"])
        subscribed = sum(r["subscribed"] for r in results)
        last = max((r["last_ns"] for r in results if r["last_ns"]), default=0)
        seconds = (last - t0) / 1e9 if last and subscribed == self.args.connections else None
        out = {"wanted": self.args.connections, "subscribed": subscribed, "seconds": round(seconds, 2)
               if seconds is not None else None, "wall_s": round(wall, 2),
               "per_s": round(subscribed / seconds) if seconds else None,
               "timed_out": sum(1 for r in results if r["timed_out"]), "failed": sum(r["failed"] for r in results),
               "connect_errors": dict(errors.most_common(10)), "connect_error_count": sum(errors.values()),
               "lost": sum(r["lost"] for r in results), "open": sum(r["open"] for r in results),
               "cpu_s": cpu, "gateway_cpu_us_per_connection": round(cpu["gateway"] / subscribed * 1e6)
               if subscribed else None,
               # what the phase would take if the gateway had every core to itself (the clients share them here)
               "gateway_cpu_s_over_cores": round(cpu["gateway"] / (os.cpu_count() or 1), 1),
               "gateway_fds_peak_per_worker": sorted(peak.values()) if command == "storm" else None,
               "curve": curve(done, max(1, (max(done) if done else 0) // 150))}
        if command == "storm":
            out["abort_s_max"] = round(max(r["abort_s"] for r in results), 3)
            out["abort_spread_s"] = round((max(r["abort_start_ns"] for r in results)
                                           - min(r["abort_start_ns"] for r in results)) / 1e9, 3)
        return out

    def sockets_per_worker(self) -> list[int]:
        return sorted(sockets_of(p) for p in self.workers())

    def idle(self, seconds: float) -> dict[str, Any]:
        """CPU of everything over ``seconds`` of nothing published (pings, heartbeats), and those counted."""
        groups = self.groups()
        pongs0 = sum(r["pongs"] for r in self.ask(self.clients, "start", 30.0))
        cpu0 = {k: jiffies(v) for k, v in groups.items()}
        time.sleep(seconds)
        cpu = {k: (jiffies(v) - cpu0[k]) / HZ for k, v in groups.items()}
        stats = self.ask(self.clients, "stop", 60.0)
        return {"seconds": seconds, "cpu_cores": {k: round(v / seconds, 3) for k, v in cpu.items()},
                "cpu_s": {k: round(v, 2) for k, v in cpu.items()},
                "heartbeats": sum(st["heartbeats"] for st in stats),
                "pings": sum(st["pongs"] for st in stats) - pongs0}

    def feed(self, seconds: float) -> dict[str, Any]:
        """Publish ``--rate`` updates/s per symbol for ``seconds``; every connection's counts."""
        args = self.args
        rate = args.rate * args.symbols
        pongs0 = sum(r["pongs"] for r in self.ask(self.clients, "start", 30.0))
        self.ask([self.probe], "start", 10.0)
        groups = self.groups()
        cpu0 = {k: jiffies(v) for k, v in groups.items()}
        t0 = time.perf_counter()
        self.driver.write(f"paced {rate:.4f} {seconds:.3f}")
        driven = json.loads(self.driver.line(seconds + 120))
        # every order is one publication: wait until the probe has them all (the matcher may lag behind the acks)
        ok = driven["orders"] - sum(driven["not_ok"].values())
        end = time.monotonic() + 20.0
        while self.ask([self.probe], "count", 10.0)[0]["total"] < ok and time.monotonic() < end:
            time.sleep(0.1)
        time.sleep(0.2)
        probe = self.ask([self.probe], "stop", 10.0)[0]
        published = {s: probe["published"].get(s, 0) for s in self.names}
        expected = sum(published[s] * self.subs[i] for i, s in enumerate(self.names))
        # wait for the last deliveries: until the clients have every expected update, or stop growing
        end = time.monotonic() + max(30.0, seconds)
        last, still, have = -1, 0, 0
        while time.monotonic() < end:
            have = sum(r["depth"] for r in self.ask(self.clients, "poll", 30.0))
            if have >= expected:
                break
            still = still + 1 if have == last else 0
            if still >= 10:
                break
            last = have
            time.sleep(0.5)
        wall = time.perf_counter() - t0
        cpu = {k: round((jiffies(v) - cpu0[k]) / HZ, 2) for k, v in groups.items()}
        stats = self.ask(self.clients, "stop", 60.0)
        hist: Counter[int] = Counter()
        hist_read: Counter[int] = Counter()
        per: dict[str, Counter[int]] = {s: Counter() for s in self.names}
        for st in stats:
            hist.update({int(b): n for b, n in st["hist"].items()})
            hist_read.update({int(b): n for b, n in st["hist_read"].items()})
            for s, dist in st["per_channel"].items():
                per[s].update({int(c): n for c, n in dist.items()})
        lost = extra = short_conns = long_conns = 0
        channels = {}
        for i, s in enumerate(self.names):
            want = published[s]
            dist = per[s]
            conns = sum(dist.values())
            short = {c: n for c, n in dist.items() if c < want}
            long = {c: n for c, n in dist.items() if c > want}
            lost += sum((want - c) * n for c, n in short.items())
            extra += sum((c - want) * n for c, n in long.items())
            short_conns += sum(short.values())
            long_conns += sum(long.values())
            channels[s] = {"published": want, "subscribers": conns, "subscribers_planned": self.subs[i],
                           "min": min(dist) if dist else None, "max": max(dist) if dist else None}
        delivered = sum(st["depth"] for st in stats)
        gw_cpu = cpu["gateway"]
        errors: Counter[str] = Counter()
        closes: Counter[str] = Counter()
        for st in stats:
            errors.update(st["errors"])
            closes.update({str(k): v for k, v in st["closes"].items()})
        return {
            "rate_per_symbol": args.rate, "seconds": seconds, "driver": driven,
            "published": sum(published.values()), "expected_deliveries": expected, "delivered": delivered,
            "lost_updates": lost, "extra_updates": extra, "connections_short": short_conns,
            "connections_over": long_conns, "prev_seq_breaks": sum(st["prev_seq_breaks"] for st in stats),
            "snapshots_in_window": sum(st["snapshots"] for st in stats),
            "heartbeats_in_window": sum(st["heartbeats"] for st in stats),
            "pings_in_window": sum(st["pongs"] for st in stats) - pongs0,
            "client_errors": dict(errors), "server_closes": dict(closes),
            "lost_connections": sum(st["lost"] for st in stats), "open_connections": sum(st["open"] for st in stats),
            "channels": channels,
            "push_latency_ms": hist_percentiles(hist) | self._more_percentiles(hist),  # samplers, to arrival
            "read_latency_ms": hist_percentiles(hist_read),  # every connection, to the client's read
            "matcher_to_probe_latency_ms": hist_percentiles(Counter({int(b): n for b, n in probe["hist"].items()})),
            "wall_s": round(wall, 2), "cpu_s": cpu,
            "delivered_per_s": round(delivered / wall) if wall else None,
            "gateway_cpu_us_per_delivered": round(gw_cpu / delivered * 1e6, 2) if delivered else None,
            "clients_cpu_us_per_delivered": round(cpu["clients"] / delivered * 1e6, 2) if delivered else None,
        }

    @staticmethod
    def _more_percentiles(hist: Counter[int]) -> dict[str, float | None]:
        """p10 ... p99.99 besides hist_percentiles' p50 / p99 / p99.9, for the CDF plot."""
        total = sum(hist.values())
        out: dict[str, float | None] = {}
        keys = sorted(hist)
        for name, p in (("p10", 0.10), ("p25", 0.25), ("p75", 0.75), ("p90", 0.90), ("p95", 0.95),
                        ("p99.99", 0.9999)):
            if not total:
                out[name] = None
                continue
            want, seen = math.ceil(total * p), 0
            for key in keys:
                seen += hist[key]
                if seen >= want:
                    out[name] = round(key / 1000, 3)
                    break
        return out


def model(args: argparse.Namespace, subs: list[int], write_cost: dict[str, Any], feed: dict[str, Any],
          idle: dict[str, Any]) -> dict[str, Any]:
    """The p99 against ``subscribers per gateway process x cost of one write``."""
    cores = os.cpu_count() or 1
    per_pub = sum(subs) / len(subs)  # subscribers of one publication, on average over the symbols
    per_proc = per_pub / args.workers
    raw_us = write_cost["cpu_us_per_write"]["median"]
    gw_us = feed["gateway_cpu_us_per_delivered"]
    cl_us = feed["clients_cpu_us_per_delivered"]
    # the gateway's CPU of the feed alone: less what the same processes took when idle (pings, heartbeats)
    gw_feed_us = None
    if feed["delivered"]:
        idle_s = idle["cpu_cores"]["gateway"] * feed["wall_s"]
        gw_feed_us = round(max(0.0, feed["cpu_s"]["gateway"] - idle_s) / feed["delivered"] * 1e6, 2)
    # gateway CPU = writes x w + pings x c (a ping sent and its pong read), from the idle window and the feed
    solved = None
    if "pings" in idle and "pings_in_window" in feed:
        a1, b1, g1 = idle["heartbeats"], idle["pings"], idle["cpu_s"]["gateway"]
        a2, b2, g2 = feed["delivered"] + feed["heartbeats_in_window"], feed["pings_in_window"], feed["cpu_s"]["gateway"]
        det = a1 * b2 - a2 * b1
        if det and abs(det) > 0.05 * max(abs(a1 * b2), abs(a2 * b1)):
            write_us, ping_us = (g1 * b2 - g2 * b1) / det * 1e6, (a1 * g2 - a2 * g1) / det * 1e6
            # A negative cost means the two windows do not fit one linear model (noise, or
            # costs that are not per write or per ping): no split rather than a wrong one.
            if write_us >= 0 and ping_us >= 0:
                solved = {"write_us": round(write_us, 2), "ping_pong_us": round(ping_us, 2)}
    p99 = feed["push_latency_ms"]["p99"]
    per_process_ms = per_proc * raw_us / 1000
    per_process_gw_ms = per_proc * gw_us / 1000 if gw_us else None
    shared_ms = per_pub * ((gw_us or raw_us) + (cl_us or 0)) / cores / 1000
    return {
        "subscribers_per_publication": round(per_pub), "subscribers_per_gateway_process": round(per_proc),
        "write_cost_us_raw_loop": raw_us, "gateway_cpu_us_per_delivered": gw_us,
        "gateway_cpu_us_per_delivered_less_idle": gw_feed_us, "clients_cpu_us_per_delivered": cl_us,
        "gateway_cpu_split": solved,
        "cores": cores,
        "per_process_ms": round(per_process_ms, 2),
        "per_process_gateway_cost_ms": round(per_process_gw_ms, 2) if per_process_gw_ms else None,
        "shared_cores_ms": round(shared_ms, 2),
        "measured_p99_ms": p99,
        "p99_over_per_process": round(p99 / per_process_ms, 2) if p99 and per_process_ms else None,
        "p99_over_shared_cores": round(p99 / shared_ms, 2) if p99 and shared_ms else None,
        "what": "per_process: subscribers of one publication in one gateway process x the raw loop's CPU per "
                "write (each process on a core of its own); per_process_gateway_cost: the same with the "
                "gateway's own CPU per delivered message; shared_cores: every subscriber of one publication x "
                "(gateway + client CPU per delivered message) / cores, as here where all gateway workers and "
                "client processes share the cores; gateway_cpu_us_per_delivered_less_idle: less the idle window's "
                "CPU (its channel heartbeats included, which the feed mostly replaces: a lower bound); "
                "gateway_cpu_split: writes (updates and heartbeats) and pings (sent, pong read) solved from the "
                "idle window and the feed",
    }


def kernel_memory(before: dict[str, Any], held: dict[str, Any], n: int) -> dict[str, Any]:
    s0, s1 = before["sockstat"], held["sockstat"]
    m0, m1 = before["meminfo_kb"], held["meminfo_kb"]
    mem_pages = s1.get("tcp_mem", 0) - s0.get("tcp_mem", 0)
    slab_kb = m1.get("Slab", 0) - m0.get("Slab", 0)
    sockets = s1.get("tcp_alloc", 0) - s0.get("tcp_alloc", 0)
    slab0, slab1 = before.get("slab_bytes", {}), held.get("slab_bytes", {})
    caches = sorted(((name, slab1[name] - slab0.get(name, 0)) for name in slab1), key=lambda kv: -kv[1])[:8]
    return {
        "slab_caches_bytes_per_connection": {name: round(delta / n) for name, delta in caches if delta > 0},
        "socket_slab_kb_per_connection": round(sum(slab1.get(c, 0) - slab0.get(c, 0) for c in SOCKET_CACHES)
                                               / 1024 / n, 3) if slab1 else None,
        "tcp_mem_pages_delta": mem_pages, "tcp_alloc_delta": sockets,
        "tcp_buffers_kb_per_connection": round(mem_pages * PAGE / 1024 / n, 3),
        "tcp_buffers_kb_per_socket": round(mem_pages * PAGE / 1024 / sockets, 3) if sockets else None,
        "slab_kb_delta": slab_kb, "slab_kb_per_connection": round(slab_kb / n, 3),
        "slab_kb_per_socket": round(slab_kb / sockets, 3) if sockets else None,
        "note": "both ends of every connection are on this machine (client and gateway sockets); tcp buffers "
                "from /proc/net/sockstat TCP mem (pages), slab from /proc/meminfo Slab (all caches) and "
                "/proc/slabinfo (socket_slab: the TCP socket, its inode, file, dentry and epoll entries), "
                "machine-wide deltas: anything else that ran meanwhile is in them",
    }


def main(argv: list[str] | None = None) -> int:
    parser = arguments(__doc__)
    parser.add_argument("--connections", type=at_least_one, default=None,
                        help="connections held (100000; 5000 with --quick)")
    parser.add_argument("--workers", type=at_least_one, default=None,
                        help="gateway processes (one per 12,500 connections)")
    parser.add_argument("--client-procs", type=at_least_one, default=None,
                        help=f"client processes (one per {PER_CLIENT_PROC:,} connections, at least 2)")
    parser.add_argument("--symbols", type=at_least_one, default=12, help="symbols (channels), at least 3 (12)")
    parser.add_argument("--rate", type=above_zero, default=0.25, help="depth updates/s per symbol in the feed (0.25)")
    parser.add_argument("--seconds", type=above_zero, default=30.0, help="length of the feed (30 s; 5 s with --quick)")
    parser.add_argument("--sources", type=at_least_one, default=8, help="loopback source addresses 127.0.0.2... (8)")
    parser.add_argument("--concurrency", type=at_least_one, default=256, help="handshakes in flight per client process")
    parser.add_argument("--connect-timeout", type=above_zero, default=None,
                        help="connect phase timeout (60 s + N/1000)")
    parser.add_argument("--storm-timeout", type=above_zero, default=120.0, help="reconnect storm timeout (120 s)")
    parser.add_argument("--seed", type=int, default=1, help="seed of the order flow (1)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 5,000 connections, 2 workers, a 5 s feed at 1 update/s per symbol (unless "
                             "--seconds / --rate say otherwise), no results file")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (logs)")
    parser.add_argument("--json", type=Path, help="also write the figures here (smoke runs too)")
    args = parser.parse_args(argv)
    if args.quick:
        args.connections = args.connections or 5_000
        args.workers = args.workers or 2
        args.seconds = 5.0 if args.seconds == 30.0 else args.seconds
        args.rate = 1.0 if args.rate == 0.25 else args.rate
    args.connections = args.connections or 100_000
    args.workers = args.workers or max(1, math.ceil(args.connections / PER_WORKER))
    args.client_procs = args.client_procs or max(2, math.ceil(args.connections / PER_CLIENT_PROC))
    args.connect_timeout = args.connect_timeout or 60.0 + args.connections / 1000
    if args.symbols < 3:
        parser.error("--symbols: at least 3")
    if args.connections / args.client_procs > 19_000 or args.connections / args.workers > 17_000:
        parser.error("too many connections per process: a process may open ~19,900 sockets here")
    if args.connections / args.sources > 25_000:
        parser.error("too few source addresses: about 28,000 ephemeral ports each")
    stop_on_sigterm()
    progress = Progress(9)
    before_busy = machine_busy()
    note = noise_note(before_busy, "before the run")
    if note:
        warn(note)
    load_before = [round(x, 2) for x in os.getloadavg()]
    print(f"{args.connections:,} connections: gateway {args.workers} workers, {args.client_procs} client processes "
          f"from {args.sources} source addresses; {args.symbols} symbols, {args.rate:g} updates/s each for "
          f"{args.seconds:g} s; matcher fsync: never", flush=True)
    directory = Path(tempfile.mkdtemp(prefix="zmx-bench-connections-"))
    run = Run(directory, SCRIPT, HELPER_MAX_S)
    started = time.monotonic()
    figures: dict[str, Any] = {}
    failure = None
    try:
        bench = Bench(args, run, progress)
        figures["write_cost"] = bench.start()
        time.sleep(1.0)
        mem0 = bench.memory()
        print(f"  connecting {args.connections:,} ...", flush=True)
        figures["connect"] = connect = bench.connect("connect", args.connect_timeout)
        progress.step("connected")
        print(f"    {connect['subscribed']:,} subscribed in {connect['seconds']} s "
              f"({connect['connect_error_count']} connect errors, {connect['failed']} failed)", flush=True)
        if connect["subscribed"] != args.connections:
            raise RuntimeError(f"only {connect['subscribed']:,} of {args.connections:,} subscribed: {connect}")
        figures["idle"] = bench.idle(5.0)
        mem1 = bench.memory()
        held = mem1["gateway_rss_kb"] - mem0["gateway_rss_kb"]
        figures["memory"] = {
            "before": {k: v for k, v in mem0.items() if k != "slab_bytes"},
            "held": {k: v for k, v in mem1.items() if k != "slab_bytes"},
            "gateway_kb_per_connection": round(held / args.connections, 3),
            "clients_kb_per_connection": round((mem1["clients_rss_kb"] - mem0["clients_rss_kb"]) / args.connections,
                                               3),
            "kernel": kernel_memory(mem0, mem1, args.connections),
            "gateway_sockets_per_worker": bench.sockets_per_worker(),
        }
        progress.step("held")
        print(f"    gateway {figures['memory']['gateway_kb_per_connection']:.2f} KB/connection (RSS), "
              f"sockets per worker {figures['memory']['gateway_sockets_per_worker']}", flush=True)
        print(f"  feed: {args.rate:g} updates/s x {args.symbols} symbols for {args.seconds:g} s ...", flush=True)
        figures["feed"] = feed = bench.feed(args.seconds)
        progress.step("feed")
        print(f"    delivered {feed['delivered']:,} of {feed['expected_deliveries']:,} expected, lost "
              f"{feed['lost_updates']}, p99 {feed['push_latency_ms']['p99']} ms", flush=True)
        figures["model"] = model(args, bench.subs, figures["write_cost"], feed, figures["idle"])
        log_offset = log_size(bench.gateway_log)
        print("  reconnect storm ...", flush=True)
        figures["storm"] = storm = bench.connect("storm", args.storm_timeout)
        progress.step("storm")
        print(f"    {storm['subscribed']:,} subscribed again in {storm['seconds']} s", flush=True)
        figures["storm"]["gateway_log"] = read_log(bench.gateway_log, log_offset)
        if storm["subscribed"] == args.connections:
            time.sleep(2.0)
            figures["after_storm"] = {"feed": bench.feed(max(2.0, args.seconds / 2))}
            mem2 = bench.memory()
            figures["after_storm"]["memory"] = {
                "gateway_rss_kb": mem2["gateway_rss_kb"],
                "gateway_kb_per_connection": round((mem2["gateway_rss_kb"] - mem0["gateway_rss_kb"])
                                                   / args.connections, 3),
                "gateway_sockets_per_worker": bench.sockets_per_worker()}
        progress.step("after storm")
    except Exception as e:  # noqa: BLE001 - the figures so far are still reported
        failure = f"{type(e).__name__}: {e}"
        warn(failure[:3000])
    finally:
        with shielded():
            # the clients first (their connections aborted), then the nodes: the gateway logs its counts when it stops
            try:
                run.stop_all()
            finally:
                figures["gateway_log"] = read_log(directory / "g1.log")
                progress.step("stopped")
                remove_directory(directory, args.keep)
    figures["loadavg_before"] = load_before
    figures["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
    figures["noise_before"] = {"others_cpus": before_busy.others, "steal_cpus": before_busy.steal}
    figures["elapsed_s"] = round(time.monotonic() - started)
    return report(args, figures, failure, progress)


def report(args: argparse.Namespace, f: dict[str, Any], failure: str | None, progress: Progress) -> int:
    connect, storm, feed, mem = f.get("connect", {}), f.get("storm", {}), f.get("feed", {}), f.get("memory", {})
    after = f.get("after_storm", {}).get("feed", {})
    log = f.get("gateway_log", {})
    storm_log = storm.get("gateway_log", {})
    held = connect.get("subscribed", 0) if connect.get("subscribed") == args.connections else 0
    lost = (feed.get("lost_updates", 0) + feed.get("extra_updates", 0) + feed.get("prev_seq_breaks", 0)
            + feed.get("snapshots_in_window", 0)) if feed else None
    lost_after = (after.get("lost_updates", 0) + after.get("extra_updates", 0) + after.get("prev_seq_breaks", 0)
                  + after.get("snapshots_in_window", 0)) if after else None
    kb = mem.get("gateway_kb_per_connection")
    storm_s = storm.get("seconds")
    errors = log.get("errors")
    met = {
        "connections": held >= TARGETS["connections"],
        "lost_updates": lost == 0 and lost_after in (0, None) and feed.get("lost_connections", 1) == 0,
        "gateway_kb_per_connection": kb is not None and kb <= TARGETS["gateway_kb_per_connection"],
        "storm_s": storm_s is not None and storm_s <= TARGETS["storm_s"],
        "gateway_errors": errors == 0 and storm.get("subscribed") == args.connections,
    }
    f["targets"] = {"wanted": TARGETS, "met_each": met, "met": all(met.values()) and failure is None}
    f["config"] = {"connections": args.connections, "workers": args.workers, "client_procs": args.client_procs,
                   "symbols": args.symbols, "rate_per_symbol": args.rate, "feed_seconds": args.seconds,
                   "sources": args.sources, "concurrency_per_client_proc": args.concurrency,
                   "connect_timeout_s": args.connect_timeout, "storm_timeout_s": args.storm_timeout,
                   "channels_per_connection": "3/4 one, 1/8 two, 1/8 three (channels_of)",
                   "subscriptions": sum(subscribers_per_symbol(args.connections, args.symbols)),
                   "matcher_fsync": "never", "gateway_limits": "defaults", "seed": args.seed, "quick": args.quick}
    f["box"] = machine()  # ("machine" is write_results' platform.machine())
    if failure:
        f["failure"] = failure

    def fmt(x: Any, spec: str = ",") -> str:
        return "-" if x is None else format(x, spec)

    lat = feed.get("push_latency_ms", {})
    kern = mem.get("kernel", {})
    m = f.get("model", {})
    rows = [
        ["connections held (subscribed)", f"{held:,}", f">= {TARGETS['connections']:,}", str(met["connections"])],
        ["connect time (all subscribed)", f"{fmt(connect.get('seconds'))} s ({fmt(connect.get('per_s'))}/s)", "", ""],
        ["gateway RSS per connection", f"{fmt(kb, '.2f')} KB ({args.workers} workers)",
         f"<= {TARGETS['gateway_kb_per_connection']} KB", str(met["gateway_kb_per_connection"])],
        ["gateway RSS per connection after the storm",
         f"{fmt(f.get('after_storm', {}).get('memory', {}).get('gateway_kb_per_connection'), '.2f')} KB", "", ""],
        ["kernel per connection (2 sockets)", f"buffers {fmt(kern.get('tcp_buffers_kb_per_connection'), '.2f')} KB, "
         f"slab {fmt(kern.get('slab_kb_per_connection'), '.2f')} KB (sockets "
         f"{fmt(kern.get('socket_slab_kb_per_connection'), '.2f')})", "reported", ""],
        ["clients RSS per connection", f"{fmt(mem.get('clients_kb_per_connection'), '.2f')} KB", "", ""],
        ["feed delivered / expected", f"{fmt(feed.get('delivered'))} / {fmt(feed.get('expected_deliveries'))}",
         "all", ""],
        ["lost / extra / seq breaks / resyncs", f"{fmt(feed.get('lost_updates'))} / {fmt(feed.get('extra_updates'))}"
         f" / {fmt(feed.get('prev_seq_breaks'))} / {fmt(feed.get('snapshots_in_window'))}", "0",
         str(met["lost_updates"])],
        ["push latency p50 / p99 / p99.9 (arrival)", f"{fmt(lat.get('p50'))} / {fmt(lat.get('p99'))} / "
         f"{fmt(lat.get('p99.9'))} ms", "", ""],
        ["read by the clients p50 / p99", f"{fmt(feed.get('read_latency_ms', {}).get('p50'))} / "
         f"{fmt(feed.get('read_latency_ms', {}).get('p99'))} ms", "", ""],
        ["model: per process / shared cores", f"{fmt(m.get('per_process_ms'))} / {fmt(m.get('shared_cores_ms'))} ms",
         f"p99 = {fmt(m.get('p99_over_per_process'))}x / {fmt(m.get('p99_over_shared_cores'))}x", ""],
        ["write cost: raw loop / gateway per delivered",
         f"{fmt(m.get('write_cost_us_raw_loop'))} / {fmt(m.get('gateway_cpu_us_per_delivered'))} us", "", ""],
        ["reconnect storm to fully subscribed", f"{fmt(storm_s)} s", f"<= {TARGETS['storm_s']:g} s",
         str(met["storm_s"])],
        ["after storm: lost / p99", f"{fmt(after.get('lost_updates'))} / "
         f"{fmt(after.get('push_latency_ms', {}).get('p99'))} ms", "0", ""],
        ["gateway log errors (storm / whole run)", f"{fmt(storm_log.get('errors'))} / {fmt(errors)} "
         f"(warnings {fmt(log.get('warnings'))})", "0", str(met["gateway_errors"])],
    ]
    print_rows(f"connections on one box: {args.connections:,}", ["figure", "measured", "target", "met"], rows)
    if failure:
        print(f"FAILED: {failure[:500]}")
    print(f"took {f['elapsed_s']} s; load average before {f['loadavg_before']}, after {f['loadavg_after']}")
    f["summary"] = summarize("connections", f)
    if args.json:
        args.json.write_text(json.dumps({"benchmark": "connections", **f}, indent=2) + "\n")
    if not args.quick:
        path = write_results("connections", f)
        print(f"wrote {path.relative_to(ROOT)}")
    progress.step("written")
    return 0 if failure is None else 1


def draw(results: Path) -> list[Path]:
    """``NAME_connect.png`` beside ``results``: the connect and storm curves (``plots.py`` calls it
    after the latency CDF)."""
    from matplotlib.figure import Figure
    from plots import _save

    f = json.loads(results.read_text(encoding="utf-8"))
    fig = Figure(figsize=(6.4, 3.8), dpi=90, layout="constrained")
    ax = fig.add_subplot()
    for key, label in (("connect", "connect"), ("storm", "reconnect storm")):
        points = f.get(key, {}).get("curve")
        if points:
            xs, ys = zip(*points, strict=True)
            ax.plot(xs, ys, label=f"{label} ({f[key].get('seconds')} s)")
    ax.set_xlabel("seconds since the start")
    ax.set_ylabel("connections subscribed")
    ax.set_title(f"{f['config']['connections']:,} connections, {f['config']['workers']} gateway workers", fontsize=10)
    ax.grid(True, linewidth=0.3)
    ax.legend(fontsize=8)
    out = results.with_name(f"{results.stem}_connect.png")
    _save(fig, out)
    return [out]


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--role":
        sys.exit(role_main(sys.argv[2:]))
    sys.exit(main())
