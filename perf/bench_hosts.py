"""Fan-out across hosts: matchers, relays, gateways and clients each on a host of their own
(network namespaces), to show where the cost of the fan-out lands as it grows (issue 5).

Hosts are network namespaces that the benchmark creates and removes itself: ``zmxh-br`` holds
a bridge (``zmxhbr0``); every other namespace is one host, a veth pair from its ``eth0``
(an address in ``10.77.0.0/24``) to the bridge. Nothing is created in the root namespace and
nothing routes out of the namespaces (no default route): the traffic stays on the bridge.

- ``zmxh-m`` (10.77.0.10): the matcher ``m1`` (ten symbols, ``fsync: never``) and the router ``r1``;
- ``zmxh-d`` (10.77.0.11): the order driver (``--role driver``, this file): ``zmx.node.client.Client``
  against the router, a seeded flow paced open loop over the ten symbols (resting limit orders,
  cancels and ioc orders that trade), so the feed is ``depth_update`` s and ``trade`` s;
- ``zmxh-x1``, ``zmxh-x2`` (10.77.0.21-22): relays (``zmx node x1``), upstream the matcher;
- ``zmxh-g1`` ... (10.77.0.31-): one gateway each (``workers: 1``: one process), upstream a relay
  (gateways split round robin over the relays), or the matcher itself in the ``direct`` runs;
- ``zmxh-c1`` ... (10.77.0.41-): client processes (``--role clients``): raw asyncio (uvloop)
  WebSocket connections, ``--clients`` per gateway, each subscribed to ``--channels`` symbols
  (all ten by default), that count every message exactly (``"type":"`` in each chunk, the
  occurrences split between two chunks included; heartbeats, snapshots and errors apart).

Every node is started with ``ip netns exec NS python -m zmx.cli node NAME -t TOPOLOGY`` (the
topology uses the hosts' addresses) and waited for by its ``READY`` line; a client process
is ready once every connection has its ``depth_snapshot`` of every channel.

A round: the client counters are reset, the driver sends orders at a fixed rate for ``--seconds``,
the benchmark waits until no client receives anything more, then reads

- messages published by the matcher: the growth of each symbol's ``seq`` (asked from the
  matcher's snapshot service before and after; every public publication is one ``seq``);
- CPU seconds from ``/proc/PID/stat`` (utime + stime) of the matcher, router, relays, each
  gateway, the client processes and the driver, over the whole round and over the time the
  orders were sent (``cores_while_driven``: the steady state); the matcher's split between its
  Python thread and ZeroMQ's I/O thread from ``/proc/PID/task/TID/schedstat`` (ns); the
  machine's busy time from ``/proc/stat`` (others' = the machine's less ours) and the interrupt
  work within it (much of the network path; this kernel also charges it to the process it
  interrupted, so it is part of the processes' figures, not beside them);
- delivered messages per gateway (its clients' exact counts), delivered messages/s (first to
  last arrival at any client, so a backlog drained after the orders stopped counts against it),
  what was offered (what the best-served connection got, times the connections, per second of
  orders) and how long after the last order the last message arrived (``lag_s``);
- ``keep_up`` ("all got all" in the tables): delivered / (what the best-served connection got x
  the connections), 1.0 when every connection got every message in the end. It says nothing of
  the rate: delivered/s against offered/s does.

Derived: gateway (and clients') CPU µs per delivered message, matcher CPU µs per published message.

Runs (each a fresh set of relays, gateways and clients; the matcher, router and driver stay):

1. **gateways** G = 1, 2, 3, 4 behind one relay, ``--clients`` per gateway, ``moderate`` rounds
   (``--rate`` orders/s) -> claims (1) and (2);
2. **clients**: at G = 1, more connections per gateway (``--more-clients``), moderate rounds -> (2);
3. **relays**: R = 2 with G = 2 and 4 (gateways split over them), and gateways straight on the
   matcher (``direct``, no relay), moderate rounds -> (2), against R = 1 of run 1;
4. **scaling** G = 1-6 (``--scale-gateways``) behind one relay, ``--scale-repeat`` (3) rounds each
   (``--scale-seconds``, 4 s; the one with the median delivered/s counts: with one round each,
   the steps past the cores read 0.93-1.26x over the last six committed runs) at a low order
   rate (``--scale-rate``, 200 orders/s: the matcher, router and driver take about a tenth of
   the cores) with many connections per gateway (``--scale-clients``, 2000, split over
   ``--scale-client-procs`` client processes, 2, so one client process does not cap a
   gateway), each on all ten channels, each gateway host capped at ``--scale-gateway-cpu`` (0.15)
   of a core: about 470,000 messages/s offered per gateway, more than one capped gateway
   delivers (about 375,000), and more than the machine delivers from G = 4 on -> claim (3).
   The cap is small because the clients are not capped: they cost about twice the gateway's
   CPU per message, so with 0.25 of a core per gateway the machine was full at G = 2 (1.93 of
   the 2 cores busy), which left one step of growth to see. A round whose
   backlog fills the kernel's TCP buffers to near ``tcp_mem``'s pressure threshold
   (``TCP_NEAR``) is kept but left out of the claim: the kernel then shrinks buffers and the
   round measures that, not the gateways (on this box it happened at G = 6 with 5-second
   rounds: delivered/s fell to a third).

Why run 4 is a run of its own: with few connections and a high order rate (the way claim (3)
was first measured) the order path took most of the two cores at G = 1, and each added gateway
brought its own clients and cost little, so delivered/s grew linearly while "the cores were
used up": the gateways were never what limited delivery. Run 4 makes the gateways and their
clients the limit: the publications are few and cheap, the connections many. And each gateway
host of run 4 has a CPU budget of its own (``--scale-gateway-cpu``, 0.15 of a core: a cgroup
per host, ``CpuCaps``), as a host has cores of its own: without it the clients, which run on
the same two cores and cost at least as much per delivered message as the gateway, fill the
machine with one uncapped gateway, and the growth part of the claim cannot be seen (in the
runs before the cap, 1.94 of the 2 cores were busy at G = 1). What the cap does not remove: a
gateway short of CPU joins more messages into each write (one write per connection per loop
turn), so its cost per message falls as it falls behind (so do the clients', reading bigger
chunks). The step table shows it (CPU per delivered message of the gateways and of the
clients, per G). ``--scale-gateway-cpu 0`` runs it uncapped.

Why the moderate rounds send 1,500 orders/s to 10 connections a gateway (150 to 50 before):
at 150 publications a second the matcher's ZeroMQ I/O thread wakes up for each one, and waking
up was most of what a publication cost it (130-200 us); what one more subscriber adds (5-10 us
on loopback) was lost in how that moved with the rest of the machine, and 4 gateways straight
on the matcher measured cheaper than two relays in two committed runs. At 1,500 a second the
I/O thread took 34-63 us a publication and ordered the subscribers the same way in every run
(one relay, two, four gateways). Fewer connections keep the delivered messages, and so the
gateways' and clients' CPU, about where they were.

Claims checked (``claims`` in the JSON, rows in ``summary``):

1. a gateway's CPU per delivered message does not grow with the number of gateways
   (moderate rounds, G = max over G = 1 at most ``FLAT``);
2. the matcher's CPU per published message grows with the relays it feeds (direct subscribers)
   and not with the gateways or clients behind them: at R = 1, the largest over G, and over
   clients, at most ``FLAT`` times the figure at the fewest (one-sided, as in (1): the whole
   order path gets cheaper as the machine gets busier, the router too, which the JSON keeps as
   a control); the per-subscriber part (the matcher's ZeroMQ I/O thread) higher with two relays
   than with one at the same G, and higher still with the gateways straight on it (against two
   relays at the same G);
3. delivered messages/s grows with the gateway processes until the cores are used up (run 4).
   Per G the JSON keeps delivered/s, offered/s, each gateway's cores, the clients', the order
   path's (matcher + router + driver), the relay's, interrupts, other processes and the machine's
   busy cores, all while the orders were sent. Checked: the gateway at the first G is busy
   (>= ``GATEWAY_BUSY`` of its host's cap, or of a core without one; else the gateways were not
   the limit and nothing is shown);
   each step to one more gateway grows delivered/s by >= ``GROWS`` while the machine had cores
   left at the smaller G, and stays within ``GROWS`` either way (flat) from the first G at which
   >= ``CORES_FULL`` of the cores were busy (a fall counts against the claim, as a growth does);
   both a growth step and a flat step must have been seen. ``verdict`` says in words which part
   was shown and which was not (uncapped, a busy gateway and its clients use up two cores at
   G = 1, and then the growth part cannot be shown here).

Run as root (it creates namespaces and a cgroup per capped host, and removes them):
``.venv/bin/python perf/bench_hosts.py`` (about 6 minutes) or ``--quick`` (about a minute, no
results file). Writes ``perf/results/hosts.json``; ``zmx bench hosts`` (or ``zmx bench plot
hosts`` later) draws the PNGs ``perf/results/hosts_gateway_cpu.png``, ``hosts_matcher_cpu.png``
and ``hosts_delivered.png`` (``draw`` here).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

from _common import (ROOT, Progress, _cpu_jiffies, above_zero, arguments, at_least_one, machine_busy, metadata,
                     noise_note, proc_stat_cpu, remove_directory, shielded, warn, write_results)
from bench_fanout import HZ, client_frame, fmt, median_round
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
from summaries import summarize

from zmx.commands import CancelOrder, Command, SubmitOrder
from zmx.model import OrderType, Side, TimeInForce
from zmx.node.runtime import announce_ready

SCRIPT = Path(__file__).resolve()
SYMBOLS = tuple(f"S{i:03d}-USDT" for i in range(10))

# -- hosts -----------------------------------------------------------------------------------------------

PREFIX = "zmxh-"  # every namespace of the benchmark; leftovers of a crashed run are removed by it
BRIDGE_NS, BRIDGE = "zmxh-br", "zmxhbr0"
SUBNET = "10.77.0"
MATCHER_HOST, DRIVER_HOST = "zmxh-m", "zmxh-d"
ROUTER_FRONT, ROUTER_BACK, MATCHER_PUB, MATCHER_SNAPSHOT, RELAY_PUB, GATEWAY_PORT = 5550, 5551, 5560, 5561, 5570, 8765
MAX_GATEWAYS, MAX_RELAYS, CLIENT_HOSTS = 8, 2, 2


def host_addresses(gateways: int) -> dict[str, str]:
    """Namespace -> address of every host of a run with up to ``gateways`` gateways."""
    hosts = {MATCHER_HOST: f"{SUBNET}.10", DRIVER_HOST: f"{SUBNET}.11"}
    hosts.update({f"{PREFIX}x{i}": f"{SUBNET}.{20 + i}" for i in range(1, MAX_RELAYS + 1)})
    hosts.update({f"{PREFIX}g{i}": f"{SUBNET}.{30 + i}" for i in range(1, gateways + 1)})
    hosts.update({f"{PREFIX}c{i}": f"{SUBNET}.{40 + i}" for i in range(1, CLIENT_HOSTS + 1)})
    return hosts


def _ip(*args: str, check: bool = True) -> str:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=20, check=False)
    if check and done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")
    return done.stdout


def our_namespaces() -> list[str]:
    return [line.split()[0] for line in _ip("netns", "list").splitlines() if line.startswith(PREFIX)]


def remove_namespaces() -> list[str]:
    """Remove every ``zmxh-*`` namespace (with its veths and bridge), after killing what still
    runs in them (only this benchmark starts processes there). The names removed."""
    names = our_namespaces()
    for ns in names:
        for pid in _ip("netns", "pids", ns, check=False).split():
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid), signal.SIGKILL)
    for ns in names:
        _ip("netns", "del", ns, check=False)
    return names


def create_namespaces(hosts: dict[str, str]) -> None:
    """The bridge namespace, then one namespace per host wired to the bridge."""
    _ip("netns", "add", BRIDGE_NS)
    _ip("-n", BRIDGE_NS, "link", "add", BRIDGE, "type", "bridge")
    _ip("-n", BRIDGE_NS, "link", "set", BRIDGE, "up")
    for ns, address in hosts.items():
        veth = "zv-" + ns.removeprefix(PREFIX)
        _ip("netns", "add", ns)
        _ip("-n", BRIDGE_NS, "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
        _ip("-n", BRIDGE_NS, "link", "set", veth, "master", BRIDGE, "up")
        _ip("-n", ns, "addr", "add", f"{address}/24", "dev", "eth0")
        _ip("-n", ns, "link", "set", "eth0", "up")
        _ip("-n", ns, "link", "set", "lo", "up")


# -- CPU budgets of hosts ----------------------------------------------------------------------------------
#
# A namespace shares the machine's cores, where a real host has cores of its own. In the scaling
# run each gateway host gets a budget: a cgroup (named after its namespace) whose processes may
# use at most ``--scale-gateway-cpu`` of a core together, through the scheduler's bandwidth
# control (``quota`` us of CPU in every ``CAP_PERIOD_US``). One gateway host is then smaller than
# the machine, as it is in a deployment where the clients are elsewhere, and what one more
# gateway adds can be seen until the machine's own cores are used up.

CAP_PERIOD_US = 20_000
MIN_CAP = 0.05  # the kernel's smallest quota is 1 ms a period
CGROUP_V1_CPU = Path("/sys/fs/cgroup/cpu")  # cgroup v1, the cpu controller's hierarchy
CGROUP_V2 = Path("/sys/fs/cgroup")  # cgroup v2 (unified) mounted here


def _cgroup_root() -> tuple[Path, bool] | None:
    """Where CPU caps are made and whether that is cgroup v2; None when neither is usable."""
    if (CGROUP_V1_CPU / "cpu.cfs_quota_us").exists():
        return CGROUP_V1_CPU, False
    with contextlib.suppress(OSError):
        if "cpu" in (CGROUP_V2 / "cgroup.controllers").read_text().split():
            return CGROUP_V2, True
    return None


class CpuCaps:
    """CPU caps of hosts: ``cap(host, share, pid)`` puts a process in the host's cgroup, made
    on first use; ``remove_cpu_caps`` deletes them once their processes have ended."""

    def __init__(self) -> None:  # noqa: D107
        found = _cgroup_root()
        if found is None:
            raise RuntimeError(f"CPU caps for hosts need the cgroup v1 cpu controller ({CGROUP_V1_CPU}) or "
                               f"cgroup v2 with the cpu controller ({CGROUP_V2}); run with --scale-gateway-cpu 0 "
                               "to let the gateway hosts share the machine uncapped")
        self.root, self.v2 = found

    def cap(self, host: str, share: float, pid: int) -> None:
        path = self.root / host
        path.mkdir(exist_ok=True)
        quota = round(share * CAP_PERIOD_US)
        if self.v2:
            control = self.root / "cgroup.subtree_control"
            if "cpu" not in control.read_text().split():
                control.write_text("+cpu")
            (path / "cpu.max").write_text(f"{quota} {CAP_PERIOD_US}")
        else:
            (path / "cpu.cfs_period_us").write_text(str(CAP_PERIOD_US))
            (path / "cpu.cfs_quota_us").write_text(str(quota))
        # ``ip netns exec`` execs the command: the pid is the process's own, and its threads and
        # children follow it into the group
        (path / "cgroup.procs").write_text(str(pid))


def remove_cpu_caps() -> list[str]:
    """Delete every ``zmxh-*`` cgroup (their processes must have ended); the names removed."""
    found = _cgroup_root()
    removed = []
    for path in sorted(found[0].glob(f"{PREFIX}*")) if found else []:
        try:
            path.rmdir()
            removed.append(path.name)
        except OSError as e:
            warn(f"cannot remove the cgroup {path}: {e.strerror or e}")
    return removed


# -- processes in namespaces --------------------------------------------------------------------------


class NsProcess(Helper):
    """A process in namespace ``ns`` (``ip netns exec`` execs it: the pid is the process's own);
    stdout read by line (``READY``), stdin written by line, stderr in ``<cwd>/<name>.log``."""

    def __init__(self, ns: str, name: str, argv: Sequence[str], cwd: Path) -> None:  # noqa: D107
        self.name = name
        self.ns = ns
        self.log_path = cwd / f"{name}.log"
        self._buffer = b""
        self.final_jiffies = 0
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(["ip", "netns", "exec", ns, *argv], cwd=cwd, env=env,
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def ask(self, command: str, timeout: float = 30.0) -> dict[str, Any]:
        self.write(command)
        return json.loads(self.line(timeout))


def machine_split() -> tuple[int, int, int] | None:
    """Clock ticks of the whole machine so far, from ``/proc/stat``: (tasks: user + nice + system,
    irq: hard and soft interrupts, steal); None where it is missing."""
    fields = proc_stat_cpu()
    if fields is None:
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    return user + nice + system, irq + softirq, steal


def split_busy(start: tuple[int, int, int] | None, end: tuple[int, int, int] | None,
               wall: float) -> dict[str, float] | None:
    """Cores the machine kept busy between two ``machine_split`` readings ``wall`` seconds apart:
    ``busy`` (all of it), ``irq`` (the interrupt work in it, much of the network path; with tick
    accounting the kernel charges it to the interrupted process as well), ``steal``."""
    if start is None or end is None or wall <= 0:
        return None
    tasks, irq, steal = ((b - a) / HZ / wall for a, b in zip(start, end, strict=True))
    return {"irq": round(irq, 3), "busy": round(tasks + irq, 3), "steal": round(steal, 3)}


def tcp_memory() -> tuple[int, int] | None:
    """Pages the kernel's TCP buffers hold now (one figure for all namespaces) and the pressure
    threshold of ``tcp_mem``, above which the kernel shrinks buffers and the network slows down."""
    try:
        with open("/proc/net/sockstat", encoding="ascii") as f:
            words = next(line for line in f if line.startswith("TCP:")).split()
        with open("/proc/sys/net/ipv4/tcp_mem", encoding="ascii") as f:
            pressure = int(f.read().split()[1])
        return int(words[words.index("mem") + 1]), pressure
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def thread_ns(pid: int) -> dict[str, int]:
    """CPU ns so far of each live thread of ``pid`` by kind: ``main`` (the Python thread),
    ``zmq_io`` (ZeroMQ's I/O threads), ``other``; from ``/proc/PID/task/*/schedstat``."""
    out = {"main": 0, "zmq_io": 0, "other": 0}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat", encoding="ascii") as f:
                ns = int(f.read().split()[0])
            with open(f"/proc/{pid}/task/{tid}/comm", encoding="ascii") as f:
                comm = f.read().strip()
        except (OSError, ValueError, IndexError):
            continue
        kind = "main" if tid == str(pid) else "zmq_io" if comm.startswith("ZMQbg/IO") else "other"
        out[kind] += ns
    return out


# -- order driver (--role driver) ---------------------------------------------------------------------

BUY, SELL, LIMIT, GTC, IOC = Side.BUY, Side.SELL, OrderType.LIMIT, TimeInForce.GTC, TimeInForce.IOC
CROSS_SHARE, CANCEL_SHARE, LIVE_CAP, PRIME_PER_SIDE = 0.15, 0.30, 300, 20


class Flow:
    """Seeded orders over the symbols in turn: a resting limit order 1-20 ticks from the mid
    (55%), a cancel of a resting one (30%), or an ioc order through the book that trades (15%)."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.live: dict[str, list[tuple[str, str]]] = {s: [] for s in SYMBOLS}
        self.turn = self.ids = 0

    def _rest(self, symbol: str, side: Side, prefix: str) -> SubmitOrder:
        rng = self.rng
        self.ids += 1
        order_id, account = f"{prefix}{self.ids}", ACCOUNTS[rng.randrange(len(ACCOUNTS))]
        distance = rng.randint(1, MAX_DISTANCE)
        self.live[symbol].append((order_id, account))
        price = MID - distance if side is BUY else MID + distance
        return SubmitOrder(order_id, account, symbol, side, LIMIT, GTC, price, rng.randint(1, 500))

    def prime(self) -> list[Command]:
        return [self._rest(s, side, "p") for s in SYMBOLS for side in (BUY, SELL) for _ in range(PRIME_PER_SIDE)]

    def take(self, n: int, prefix: str) -> list[Command]:
        rng, out = self.rng, []
        for _ in range(n):
            symbol = SYMBOLS[self.turn % len(SYMBOLS)]
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


def role_driver(front: str, snapshot: str, seed: int) -> None:
    """Prime the books, say READY, then per stdin line: ``paced RATE SECONDS`` (orders, then a
    JSON line of what happened) or ``seqs`` (each symbol's ``seq`` from the snapshot service)."""
    import msgpack
    import zmq

    from zmx.node.client import Client

    client = Client([front])
    snap = client.socket.context.socket(zmq.DEALER)
    snap.linger = 0
    snap.connect(snapshot)
    try:
        await_route(client, SYMBOLS)
        flow = Flow(seed)
        primed = pipelined(client, flow.prime(), 256, 60.0)
        announce_ready("driver", "driver", primed=len(SYMBOLS) * 2 * PRIME_PER_SIDE, not_ok=dict(primed.not_ok))
        for rounds, line in enumerate(sys.stdin, 1):
            words = line.split()
            if not words or words[0] == "quit":
                break
            if words[0] == "seqs":
                seqs = {}
                for symbol in SYMBOLS:
                    snap.send_multipart([b"SNAP", symbol.encode()])
                    if not snap.poll(10_000):
                        raise RuntimeError(f"no snapshot of {symbol} within 10 s")
                    kind, _, body = snap.recv_multipart()
                    if kind != b"SNAP":
                        raise RuntimeError(f"snapshot of {symbol}: {kind!r} {body[:200]!r}")
                    seqs[symbol] = msgpack.unpackb(body)[0]
                print(json.dumps(seqs), flush=True)
                continue
            rate, seconds = float(words[1]), float(words[2])  # paced RATE SECONDS
            commands = flow.take(max(1, round(rate * seconds)), f"r{rounds}o")
            r = paced(client, commands, rate, seconds + 60.0)
            print(json.dumps({"orders": len(commands), "seconds": round(r.seconds, 3),
                              "orders_per_s": round(len(commands) / r.seconds) if r.seconds else None,
                              "not_ok": dict(r.not_ok)}), flush=True)
    finally:
        snap.close(0)
        client.close()


# -- WebSocket clients (--role clients) ----------------------------------------------------------------

PAT = b'"type":"'  # once in every server message (one JSON object with one top-level "type")
HEARTBEAT, SNAPSHOT, ERROR = b'"type":"heartbeat"', b'"type":"depth_snapshot"', b'"type":"error"'
TAIL = len(SNAPSHOT) - 1  # bytes kept from the last chunk: a pattern split between two chunks counts too
PING = b"\x89\x04"  # a server ping with a 4-byte payload
HANDSHAKE, SETUP, COUNT = range(3)


class Conn(asyncio.Protocol):
    """One counting connection: upgrade, subscribe, wait for its snapshots, then count."""

    __slots__ = ("counts", "done", "host", "proc", "setup", "state", "tail", "transport", "want")

    def __init__(self, proc: ClientsProc, host: bytes, want: int) -> None:
        self.proc, self.host, self.want = proc, host, want
        self.state = HANDSHAKE
        self.tail = b""
        self.setup = 0
        self.counts = [0, 0, 0, 0]  # messages, heartbeats, snapshots, errors
        self.transport: asyncio.Transport | None = None
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        key = base64.b64encode(os.urandom(16))
        transport.write(b"GET / HTTP/1.1\r\nHost: " + self.host + b"\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                        b"Sec-WebSocket-Key: " + key + b"\r\nSec-WebSocket-Version: 13\r\n\r\n")

    def connection_lost(self, exc: Exception | None) -> None:
        self.proc.lost += 1
        self.transport = None
        if not self.done.done():
            self.done.set_exception(ConnectionError(f"closed before it was subscribed: {exc}"))

    def data_received(self, data: bytes) -> None:
        both = self.tail + data
        tail = self.tail
        self.tail = both[-TAIL:]
        if self.state == COUNT:  # the hot path
            self.proc.last_ns = now = time.time_ns()
            if not self.proc.first_ns:
                self.proc.first_ns = now
            c = self.counts
            c[0] += both.count(PAT) - tail.count(PAT)
            if b'"h' in data or b'"h' in both[:TAIL + 2]:
                c[1] += both.count(HEARTBEAT) - tail.count(HEARTBEAT)
            if b'"depth_s' in both:
                c[2] += both.count(SNAPSHOT) - tail.count(SNAPSHOT)
            if b'"error"' in both:
                c[3] += both.count(ERROR) - tail.count(ERROR)
            if b"\x89" in data:
                self._pings(data)
            return
        if self.state == HANDSHAKE:
            end = both.find(b"\r\n\r\n")
            if end < 0:
                self.tail = both  # the whole response so far
                return
            if not both.startswith(b"HTTP/1.1 101"):
                self.proc.errors[both.split(b"\r\n", 1)[0].decode(errors="replace")[:80]] = 1
                if self.transport is not None:
                    self.transport.close()
                return
            self.state = SETUP
            both = both[end + 4:]
            tail = b""
            self.tail = both[-TAIL:]
            channels = json.dumps(list(SYMBOLS[:self.want])).encode()
            assert self.transport is not None
            self.transport.write(client_frame(1, b'{"action":"subscribe","channels":' + channels + b"}"))
        self.setup += both.count(SNAPSHOT) - tail.count(SNAPSHOT)
        if self.setup >= self.want:
            self.state = COUNT
            if not self.done.done():
                self.done.set_result(None)

    def _pings(self, data: bytes) -> None:
        i = data.find(PING)
        while i >= 0:
            if i + 6 <= len(data) and self.transport is not None:
                self.transport.write(client_frame(0xA, data[i + 2:i + 6]))
            i = data.find(PING, i + 2)


class ClientsProc:
    def __init__(self) -> None:
        self.first_ns = self.last_ns = 0
        self.lost = 0
        self.errors: dict[str, int] = {}


async def _clients(host: str, port: int, count: int, channels: int, timeout: float) -> None:
    loop = asyncio.get_running_loop()
    proc = ClientsProc()
    conns = [Conn(proc, f"{host}:{port}".encode(), channels) for _ in range(count)]
    gate = asyncio.Semaphore(128)

    async def open_one(conn: Conn) -> None:
        async with gate:
            await loop.create_connection(lambda: conn, host, port)
            await conn.done

    try:
        await asyncio.wait_for(asyncio.gather(*(open_one(c) for c in conns)), timeout)
    except (TimeoutError, OSError, ConnectionError) as e:
        subscribed = sum(1 for c in conns if c.state == COUNT)
        print(json.dumps({"error": f"{subscribed} of {count} connections subscribed: {type(e).__name__}: {e}",
                          "errors": proc.errors, "lost": proc.lost}), flush=True)
        return
    announce_ready("clients", "clients", connections=count, host=host)
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while True:
        line = (await reader.readline()).decode().strip()
        if not line or line == "quit":
            break
        if line == "start":
            for c in conns:
                c.counts = [0, 0, 0, 0]
            proc.first_ns = proc.last_ns = 0
            print(json.dumps({"ok": True}), flush=True)
        elif line == "poll":
            print(json.dumps({"messages": sum(c.counts[0] for c in conns)}), flush=True)
        elif line == "stop":
            feed = [c.counts[0] - c.counts[1] - c.counts[2] - c.counts[3] for c in conns]
            print(json.dumps({
                "messages": sum(c.counts[0] for c in conns), "delivered": sum(feed),
                "heartbeats": sum(c.counts[1] for c in conns), "snapshots": sum(c.counts[2] for c in conns),
                "errors": sum(c.counts[3] for c in conns), "per_connection_min": min(feed),
                "per_connection_max": max(feed), "connections": len(conns),
                "first_ns": proc.first_ns, "last_ns": proc.last_ns,
                "lost": proc.lost, "open": sum(1 for c in conns if c.transport is not None)}), flush=True)
    for c in conns:
        if c.transport is not None:
            c.transport.abort()


def role_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="bench_hosts.py --role")
    parser.add_argument("role", choices=("clients", "driver"))
    parser.add_argument("--host", default="")
    parser.add_argument("--port", type=int, default=GATEWAY_PORT)
    parser.add_argument("--count", type=int, default=1)
    parser.add_argument("--channels", type=int, default=len(SYMBOLS))
    parser.add_argument("--timeout", type=float, default=60.0)
    parser.add_argument("--front", default="")
    parser.add_argument("--snapshot", default="")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--max-seconds", type=float, default=1200.0)
    args = parser.parse_args(argv)
    watchdog(args.max_seconds)
    if args.role == "driver":
        role_driver(args.front, args.snapshot, args.seed)
        return 0
    import uvloop

    uvloop.run(_clients(args.host, args.port, args.count, args.channels, args.timeout))
    return 0


# -- the cluster ------------------------------------------------------------------------------------------


def write_topology(path: Path, hosts: dict[str, str], relays: int, gateways: int, direct: bool) -> Path:
    """The whole cluster on the hosts' addresses: ``relays`` relays and ``gateways`` gateways,
    each gateway on relay ``x{(i - 1) % relays + 1}`` (or on the matcher when ``direct``)."""
    m = hosts[MATCHER_HOST]
    lines = ["cluster: bench-hosts", "symbols:"]
    lines += [f'  {s}: {{matcher: m1, tick_size: "0.01", lot_size: "0.001"}}' for s in SYMBOLS]
    lines += ["nodes:",
              f'  r1: {{role: router, front: "tcp://{m}:{ROUTER_FRONT}", back: "tcp://{m}:{ROUTER_BACK}"}}',
              f'  m1: {{role: matcher, pub: "tcp://{m}:{MATCHER_PUB}", snapshot: "tcp://{m}:{MATCHER_SNAPSHOT}", '
              f'data_dir: "var/m1", fsync: never, snapshot_every: 100000000}}']
    for i in range(1, relays + 1):
        lines.append(f'  x{i}: {{role: relay, pub: "tcp://{hosts[f"{PREFIX}x{i}"]}:{RELAY_PUB}", upstream: [m1]}}')
    # no pings while measured; a client held up by a busy machine is conflated, never disconnected
    limits = "{ping_interval_s: 3600, ping_timeout_s: 3600, slow_consumer_ms: 600000}"
    for i in range(1, gateways + 1):
        upstream = "m1" if direct or not relays else f"x{(i - 1) % relays + 1}"
        lines.append(f'  g{i}: {{role: gateway, listen: "{hosts[f"{PREFIX}g{i}"]}:{GATEWAY_PORT}", '
                     f"upstream: [{upstream}], limits: {limits}}}")
    path.write_text("\n".join(lines) + "\n")
    return path


class Run(NamedTuple):
    """One set of relays, gateways and clients and the rounds measured on it."""

    name: str
    relays: int  # 0 with ``direct``
    gateways: int
    direct: bool  # the gateways straight on the matcher
    rounds: list[tuple[str, float]]  # (label, orders/s); repeated as ``rounds_of`` says
    more_clients: list[int]  # then rounds at these connections per gateway (one client process each more)
    clients: int  # connections per gateway
    client_procs: int  # client processes per gateway they are split over
    seconds: float  # length of a round
    gateway_cpu: float = 0.0  # each gateway host's CPU cap, in cores (0: none, it shares the machine)


def rounds_of(args: argparse.Namespace, label: str) -> int:
    """How many rounds of a run's ``label`` rounds are measured: ``--repeat`` moderate ones,
    ``--scale-repeat`` scaling ones."""
    return args.repeat if label == "moderate" else args.scale_repeat if label == "scaling" else 1


class Bench:
    """Every process of the run; ``stop_all`` ends them in reverse order."""

    def __init__(self, args: argparse.Namespace, directory: Path, hosts: dict[str, str]) -> None:
        self.args = args
        self.directory = directory
        self.hosts = hosts
        self.procs: list[NsProcess] = []
        self.serial = 0
        self.progress = Progress(1)
        self._caps: CpuCaps | None = None

    def caps(self) -> CpuCaps:
        if self._caps is None:
            self._caps = CpuCaps()
        return self._caps

    # -- processes --------------------------------------------------------------------------

    def start(self, ns: str, name: str, argv: Sequence[str]) -> NsProcess:
        self.serial += 1
        p = NsProcess(ns, f"{self.serial:03d}-{name}", argv, self.directory)
        self.procs.append(p)
        return p

    def node(self, ns: str, name: str, topology: Path) -> NsProcess:
        return self.start(ns, name, [sys.executable, "-m", "zmx.cli", "node", name, "-t", str(topology)])

    def role(self, ns: str, name: str, *argv: str) -> NsProcess:
        return self.start(ns, name, [sys.executable, str(SCRIPT), "--role", *argv, "--max-seconds", "1500"])

    @staticmethod
    def ready(procs: Sequence[NsProcess], timeout: float) -> None:
        for p in procs:
            while True:
                line = p.line(timeout)
                if line.startswith("READY "):
                    break
                if line.startswith("{"):
                    raise RuntimeError(f"{p.name}: {line}\n{p.log()}")

    def end(self, procs: Sequence[NsProcess]) -> None:
        for p in reversed(procs):
            with contextlib.suppress(OSError, ValueError):
                p.write("quit")
        for p in reversed(procs):
            try:
                p.stop(10.0)
            except Exception:  # noqa: BLE001 - keep stopping the others
                p.proc.kill()
            if p in self.procs:
                self.procs.remove(p)

    def stop_all(self) -> None:
        self.end(list(self.procs))

    # -- the base: matcher, router, driver --------------------------------------------------------------

    def start_base(self) -> None:
        topo = write_topology(self.directory / "base.yaml", self.hosts, 0, 0, False)
        self.matcher = self.node(MATCHER_HOST, "m1", topo)
        self.ready([self.matcher], 60.0)
        self.router = self.node(MATCHER_HOST, "r1", topo)
        self.ready([self.router], 60.0)
        m = self.hosts[MATCHER_HOST]
        self.driver = self.role(DRIVER_HOST, "driver", "driver", "--front", f"tcp://{m}:{ROUTER_FRONT}",
                                "--snapshot", f"tcp://{m}:{MATCHER_SNAPSHOT}", "--seed", str(self.args.seed))
        self.ready([self.driver], 90.0)
        self.idle = self.idle_cpu()

    def idle_cpu(self, seconds: float = 2.0) -> dict[str, float]:
        """CPU/s of the matcher and router with no orders (their polling and heartbeats)."""
        m0, r0, t0 = cpu_jiffies(self.matcher.pid), cpu_jiffies(self.router.pid), time.perf_counter()
        time.sleep(seconds)
        wall = time.perf_counter() - t0
        return {"matcher_cpus": round((cpu_jiffies(self.matcher.pid) - m0) / HZ / wall, 4),
                "router_cpus": round((cpu_jiffies(self.router.pid) - r0) / HZ / wall, 4)}

    # -- one run: relays, gateways and their clients --------------------------------------------------------

    def run(self, plan: Run) -> list[dict[str, Any]]:
        args = self.args
        name, relays, gateways, direct = plan.name, plan.relays, plan.gateways, plan.direct
        topo = write_topology(self.directory / f"{name}.yaml", self.hosts, relays, gateways, direct)
        started: list[NsProcess] = []
        try:
            xs = [self.node(f"{PREFIX}x{i}", f"x{i}", topo) for i in range(1, relays + 1 if not direct else 1)]
            started += xs
            self.ready(xs, 60.0)
            gws = [self.node(f"{PREFIX}g{i}", f"g{i}", topo) for i in range(1, gateways + 1)]
            started += gws
            if plan.gateway_cpu:
                for i, g in enumerate(gws, 1):
                    self.caps().cap(f"{PREFIX}g{i}", plan.gateway_cpu, g.pid)
            self.ready(gws, 60.0)
            clients: list[list[NsProcess]] = [[] for _ in gws]

            def add_clients(count: int, procs: int) -> None:
                """``count`` more connections per gateway, split over ``procs`` client processes each
                (on the client hosts in turn)."""
                new = []
                for i in range(gateways):
                    for j in range(procs):
                        n = count // procs + (1 if j < count % procs else 0)
                        if not n:
                            continue
                        host = f"{PREFIX}c{(i * procs + j) % CLIENT_HOSTS + 1}"
                        p = self.role(host, f"clients-g{i + 1}-{len(clients[i]) + 1}", "clients", "--host",
                                      self.hosts[f"{PREFIX}g{i + 1}"], "--count", str(n), "--channels",
                                      str(args.channels), "--timeout", str(60 + n / 20))
                        clients[i].append(p)
                        new.append(p)
                started.extend(new)
                self.ready(new, 90 + count / 10)

            add_clients(plan.clients, plan.client_procs)
            clients_per_gateway = plan.clients
            self.progress.step(f"{name}: {relays} relay(s), {gateways} gateway(s) up")
            self.drive(1.0, plan.rounds[0][1])  # warm-up: every path has carried orders before the first round
            quiesce([p for group in clients for p in group])
            results = []
            info = {"relays": 0 if direct else relays, "direct": direct, "gateways": gateways,
                    "channels_per_client": args.channels}
            for label, rate in plan.rounds:
                for repeat in range(rounds_of(args, label)):
                    r = self.measure(xs, gws, clients, rate, plan.seconds)
                    r.update({"run": name, "round": label, "repeat": repeat + 1, **info,
                              "clients_per_gateway": clients_per_gateway,
                              "client_procs_per_gateway": plan.client_procs})
                    results.append(r)
                    self.progress.step(f"{name}: {label} round")
                    show(r)
            for extra in plan.more_clients:
                add_clients(extra - clients_per_gateway, 1)
                clients_per_gateway = extra
                for repeat in range(args.repeat):
                    r = self.measure(xs, gws, clients, args.rate, plan.seconds)
                    r.update({"run": f"{name}-clients{extra}", "round": "moderate", "repeat": repeat + 1, **info,
                              "clients_per_gateway": extra, "client_procs_per_gateway": len(clients[0])})
                    results.append(r)
                    self.progress.step(f"{name}: {extra} clients per gateway")
                    show(r)
            return results
        finally:
            self.end(started)

    def drive(self, seconds: float, rate: float) -> dict[str, Any]:
        return self.driver.ask(f"paced {rate:.3f} {seconds:.3f}", timeout=seconds + 90)

    def measure(self, xs: list[NsProcess], gws: list[NsProcess], clients: list[list[NsProcess]],
                rate: float, seconds: float) -> dict[str, Any]:
        """One round at ``rate`` orders/s for ``seconds``; see the module documentation."""
        all_clients = [p for group in clients for p in group]
        groups: dict[str, list[int]] = {"matcher": [self.matcher.pid], "router": [self.router.pid],
                                        "driver": [self.driver.pid], "relays": [x.pid for x in xs],
                                        "gateways": [g.pid for g in gws], "clients": [p.pid for p in all_clients]}
        singles = [g.pid for g in gws] + [x.pid for x in xs] + [p.pid for p in all_clients]
        for p in all_clients:
            p.ask("start")
        seq0 = self.driver.ask("seqs")
        cpu0 = {pid: cpu_jiffies(pid) for pid in {*singles, self.matcher.pid, self.router.pid, self.driver.pid}}
        threads0 = thread_ns(self.matcher.pid)
        machine0, split0, wall0 = _cpu_jiffies(), machine_split(), time.perf_counter()
        driven = self.drive(seconds, rate)
        cpu_driven = {pid: cpu_jiffies(pid) for pid in cpu0}
        split_driven, driven_end_ns, tcp = machine_split(), time.time_ns(), tcp_memory()
        wall_driven = time.perf_counter() - wall0
        drained = quiesce(all_clients)
        wall = time.perf_counter() - wall0
        cpu1 = {pid: cpu_jiffies(pid) for pid in cpu0}
        threads1 = thread_ns(self.matcher.pid)
        machine1 = _cpu_jiffies()
        seq1 = self.driver.ask("seqs")
        got = [[p.ask("stop") for p in group] for group in clients]

        def cpu(pids: Sequence[int], end: dict[int, int] = cpu1) -> float:
            return sum(end[p] - cpu0[p] for p in pids) / HZ

        published = sum(seq1[s] - seq0[s] for s in SYMBOLS)
        ours = cpu(list(cpu0))
        machine = others = None
        if machine0 and machine1:
            machine = (machine1[0] - machine0[0]) / HZ / wall
            others = round(max(0.0, machine - ours / wall), 2)
        per_gateway = []
        for g, group, stats in zip(gws, clients, got, strict=True):
            delivered = sum(s["delivered"] for s in stats)
            g_cpu = cpu([g.pid])
            per_gateway.append({
                "delivered": delivered, "cpu_s": round(g_cpu, 3),
                "cpu_us_per_delivered": round(g_cpu / delivered * 1e6, 3) if delivered else None,
                "clients_cpu_s": round(cpu([p.pid for p in group]), 3),
                "per_connection_min": min(s["per_connection_min"] for s in stats),
                "per_connection_max": max(s["per_connection_max"] for s in stats),
                "connections": sum(s["connections"] for s in stats),
                "heartbeats": sum(s["heartbeats"] for s in stats), "snapshots": sum(s["snapshots"] for s in stats),
                "errors": sum(s["errors"] for s in stats), "lost": sum(s["lost"] for s in stats),
            })
        flat = [s for stats in got for s in stats]
        delivered = sum(s["delivered"] for s in flat)
        firsts = [s["first_ns"] for s in flat if s["first_ns"]]
        lasts = [s["last_ns"] for s in flat if s["last_ns"]]
        arrivals_s = (max(lasts) - min(firsts)) / 1e9 if firsts and lasts else 0.0
        g_cpu = sum(p["cpu_s"] for p in per_gateway)
        m_cpu = cpu([self.matcher.pid])
        threads = {k: (threads1[k] - threads0[k]) / 1e9 for k in threads0}
        offered = delivered_expected(published, per_gateway)
        cpu_s = {name: round(cpu(pids), 3) for name, pids in groups.items()}
        # where the cores went while the orders were sent (the steady state of the round)
        busy_driven = {name: cpu(pids, cpu_driven) / wall_driven for name, pids in groups.items()}
        ours_driven = cpu(list(cpu0), cpu_driven) / wall_driven
        kernel = split_busy(split0, split_driven, wall_driven)
        while_driven = {
            "seconds": round(wall_driven, 3),
            "gateways": [round(cpu([g.pid], cpu_driven) / wall_driven, 3) for g in gws],
            "clients": round(busy_driven["clients"], 3),
            "order_path": round(busy_driven["matcher"] + busy_driven["router"] + busy_driven["driver"], 3),
            "relays": round(busy_driven["relays"], 3),
            "ours": round(ours_driven, 3),
        }
        if kernel:
            while_driven.update({"machine": kernel["busy"], "irq": kernel["irq"], "steal": kernel["steal"],
                                 "others": round(max(0.0, kernel["busy"] - ours_driven), 3)})
        conns = sum(p["connections"] for p in per_gateway)
        best = max((p["per_connection_max"] for p in per_gateway), default=0)
        return {
            "rate": rate, "driver": driven, "published": published,
            "delivered": delivered, "delivered_seconds": round(arrivals_s, 3),
            "delivered_per_s": round(delivered / arrivals_s) if arrivals_s > 0 else None,
            "delivered_per_published": round(delivered / published, 3) if published else None,
            # every connection holds the same channels: the best-served one got what was offered to each
            "offered_per_s": round(best * conns / driven["seconds"]) if driven.get("seconds") else None,
            "lag_s": round((max(lasts) - driven_end_ns) / 1e9, 3) if lasts else None,
            # the backlog sits in the kernel's TCP buffers: near the pressure threshold the round measures the kernel
            "tcp_mem_pages_at_driven_end": tcp[0] if tcp else None, "tcp_mem_pressure_pages": tcp[1] if tcp else None,
            "even": all(p["per_connection_min"] == p["per_connection_max"] for p in per_gateway)
            and len({p["per_connection_max"] for p in per_gateway}) == 1,
            "keep_up": offered,
            "cpu_s": cpu_s,
            "gateway_cpu_us_per_delivered": round(g_cpu / delivered * 1e6, 3) if delivered else None,
            "clients_cpu_us_per_delivered": round(cpu_s["clients"] / delivered * 1e6, 3) if delivered else None,
            "matcher_cpu_s": round(m_cpu, 3),
            "matcher_cpu_us_per_published": round(m_cpu / published * 1e6, 2) if published else None,
            "matcher_threads_us_per_published": {k: round(v / published * 1e6, 2) if published else None
                                                 for k, v in threads.items()},
            "router_cpu_us_per_order": round(cpu_s["router"] / driven["orders"] * 1e6, 2) if driven["orders"] else None,
            "relay_cpu_us_per_published": round(cpu_s["relays"] / len(xs) / published * 1e6, 2)
            if xs and published else None,
            "per_gateway": per_gateway,
            "cores_busy_ours": round(ours / wall, 3),
            "cores_busy_ours_while_driven": round(ours_driven, 3),
            "cores_while_driven": while_driven,
            "machine_cores_busy": round(machine, 3) if machine is not None else None,
            "others_cpus": others, "wall_s": round(wall, 2), "drained": drained,
        }


def delivered_expected(published: int, per_gateway: list[dict[str, Any]]) -> float | None:
    """Delivered / (what the best-served connection got x the connections): 1.0 when every
    connection got every message (all connections of a run hold the same channels)."""
    best = max((p["per_connection_max"] for p in per_gateway), default=0)
    conns = sum(p["connections"] for p in per_gateway)
    if not best or not conns:
        return None
    return round(sum(p["delivered"] for p in per_gateway) / (best * conns), 4)


def quiesce(clients: Sequence[NsProcess], max_seconds: float = 60.0) -> bool:
    """Wait until the clients' counts stop growing (0.6 s without a message); False on timeout."""
    end = time.monotonic() + max_seconds
    last, still = -1, 0
    while time.monotonic() < end:
        total = sum(p.ask("poll")["messages"] for p in clients)
        still = still + 1 if total == last else 0
        if still >= 2:
            return True
        last = total
        time.sleep(0.3)
    return False


def show(r: dict[str, Any]) -> None:
    print(f"    {r['run']:>14} {r['round']:8} R={r['relays']}{'(direct)' if r['direct'] else ''} G={r['gateways']} "
          f"N={r['clients_per_gateway']}: published {r['published']:,}, delivered {r['delivered']:,} "
          f"({fmt(r['delivered_per_s'])}/s), gateway {fmt(r['gateway_cpu_us_per_delivered'], '.2f')} us/msg, "
          f"matcher {fmt(r['matcher_cpu_us_per_published'], '.1f')} us/pub "
          f"(io {fmt(r['matcher_threads_us_per_published']['zmq_io'], '.1f')}), cores {r['cores_busy_ours']:.2f}"
          f"{'' if r['even'] else ', UNEVEN'}", flush=True)
    if r["round"] == "scaling":
        w = r["cores_while_driven"]
        print(f"{'':19}offered {fmt(r['offered_per_s'])}/s, all got all {fmt(r['keep_up'], '.3f')}, last arrival "
              f"{fmt(r['lag_s'], '.2f')} s after the last order; cores while driven: gateways "
              f"{'+'.join(f'{x:.2f}' for x in w['gateways'])}, clients {w['clients']:.2f}, order path "
              f"{w['order_path']:.2f}, relay {w['relays']:.2f}, others {fmt(w.get('others'), '.2f')}; "
              f"machine {fmt(w.get('machine'), '.2f')} (interrupts in it {fmt(w.get('irq'), '.2f')})", flush=True)


def print_scaling(c3: dict[str, Any]) -> None:
    """Claim (3) step by step: delivered/s and where the cores went."""
    rows = [[str(s["gateways"]), fmt(s["delivered_per_s"]), " ".join(fmt(x) for x in s["rounds_delivered_per_s"]),
             fmt(s["offered_per_s"]), fmt(s["keep_up"], ".3f"),
             fmt(s["lag_s"], ".2f"), "+".join(f"{x:.2f}" for x in s["gateway_cores"]), f"{s['clients_cores']:.2f}",
             f"{s['order_path_cores']:.2f}", f"{s['relay_cores']:.2f}", fmt(s["others_cores"], ".2f"),
             fmt(s["machine_cores_busy"], ".2f"), fmt(s["irq_cores"], ".2f"),
             fmt(s["gateway_cpu_us_per_delivered"], ".2f"), fmt(s["clients_cpu_us_per_delivered"], ".2f")]
            for s in c3["steps"]]
    print_rows(f"claim (3): delivered messages/s vs gateway processes; cores busy while driven (of {c3['cores']})",
               ["G", "deliv/s", "rounds", "offered/s", "all got all", "lag s", "gateways", "clients", "orders", "relay",
                "others", "machine", "of it irq", "gw us/msg", "cl us/msg"], rows)
    print(f"  claim (3) verdict: {c3['verdict']}", flush=True)


# -- the figures -----------------------------------------------------------------------------------------

FLAT = 1.25  # "does not grow": the largest value at most this times the smallest (or than the first)
# Share of the machine's cores kept busy (by anything) that counts as "used up": every round that
# left delivery waiting for CPU read 1.93-1.99 of the 2 cores; one at 1.81 still had room (the
# next gateway got 1.24x more delivered out of it)
CORES_FULL = 0.95
GATEWAY_BUSY = 0.8  # a gateway process using this share of a core is busy: one process can use at most one
GROWS = 1.1  # a step to one more gateway "grows" when delivered/s rises at least this much; "flat" below it
TCP_NEAR = 0.9  # a scaling round whose TCP buffers reach this share of tcp_mem's pressure threshold is left out


def mean(values: Sequence[float | None]) -> float | None:
    got = [v for v in values if v is not None]
    return round(sum(got) / len(got), 3) if got else None


def points(rounds: list[dict[str, Any]], run_prefix: str, label: str, key: str, by: str) -> dict[int, float]:
    """``by`` -> mean of ``key`` over the repeats, rounds of runs starting with ``run_prefix``."""
    grouped: dict[int, list[float | None]] = {}
    for r in rounds:
        if r["run"].startswith(run_prefix) and r["round"] == label:
            value = r
            for part in key.split("."):
                value = value.get(part) if isinstance(value, dict) else None
            grouped.setdefault(r[by], []).append(value)  # type: ignore[arg-type]
    return {k: v for k, v in ((k, mean(vs)) for k, vs in sorted(grouped.items())) if v is not None}


def scaling_claim(rounds: list[dict[str, Any]], cores: int, cap: float) -> dict[str, Any]:
    """Claim (3) from the scaling rounds (per gateway count, the round with the median
    delivered/s; ``rounds_delivered_per_s`` lists them all): each step to one more gateway
    must grow (>= ``GROWS``) while the cores had room at the smaller count, and stay flat (below
    ``GROWS``) once they were used up; and the gateway of the first step must have been busy
    (``GATEWAY_BUSY`` of what it may use: its host's CPU cap ``cap``, or one core without a cap),
    else the gateways were not what limited delivery and nothing is shown. ``verdict`` says in
    words what was and was not shown."""
    repeats: dict[int, list[dict[str, Any]]] = {}
    for r in rounds:
        if r.get("delivered_per_s"):
            repeats.setdefault(r["gateways"], []).append(r)
    # per G the round with the median delivered/s (the lower middle of an even count), all of its figures
    by_g = {g: median_round(rs, lambda r: r["delivered_per_s"], ())[0] for g, rs in repeats.items()}
    steps = []
    for g in sorted(by_g):
        r = by_g[g]
        w = r["cores_while_driven"]
        machine = w.get("machine")
        steps.append({
            "gateways": g, "delivered_per_s": r["delivered_per_s"],
            "rounds_delivered_per_s": [x["delivered_per_s"] for x in repeats[g]], "offered_per_s": r["offered_per_s"],
            "keep_up": r["keep_up"], "lag_s": r["lag_s"],
            "gateway_cores": w["gateways"], "clients_cores": w["clients"], "order_path_cores": w["order_path"],
            "relay_cores": w["relays"], "ours_cores": w["ours"], "irq_cores": w.get("irq"),
            "others_cores": w.get("others"), "machine_cores_busy": machine,
            "cores_used_up": machine is not None and machine >= CORES_FULL * cores,
            "gateway_cpu_us_per_delivered": r["gateway_cpu_us_per_delivered"],
            "clients_cpu_us_per_delivered": r["clients_cpu_us_per_delivered"],
            "tcp_mem_pages": r.get("tcp_mem_pages_at_driven_end"),
            "tcp_memory_pressure": bool(r.get("tcp_mem_pages_at_driven_end") and r.get("tcp_mem_pressure_pages")
                                        and r["tcp_mem_pages_at_driven_end"] >= TCP_NEAR * r["tcp_mem_pressure_pages"]),
        })
    left_out = [s for s in steps if s["tcp_memory_pressure"]]
    kept = [s for s in steps if not s["tcp_memory_pressure"]]
    # Once the cores were used up at some count, more gateways cannot free them: every later
    # step owes "flat", even where a later round had idle cores because its delivery broke down.
    full_at = next((s["gateways"] for s in steps if s["cores_used_up"]), None)
    moves = []
    for a, b in zip(kept, kept[1:]):
        ratio = round(b["delivered_per_s"] / a["delivered_per_s"], 3)
        owed = "flat" if full_at is not None and a["gateways"] >= full_at else "grow"
        moves.append({"from": a["gateways"], "to": b["gateways"], "ratio": ratio, "owed": owed,
                      "ok": ratio >= GROWS if owed == "grow" else 1 / GROWS < ratio < GROWS})
    limit = cap or 1.0  # what one gateway process may use: its host's cap, else one core (one thread)
    budget = f"its host's cap of {cap:g} core" if cap else "one core"
    c3: dict[str, Any] = {
        "steps": steps, "moves": moves, "cores": cores, "gateway_cpu_cap": cap or None,
        "cores_used_up_at_gateways": full_at,
        "wanted": f"the first gateway busy (>= {GATEWAY_BUSY:.0%} of {budget}); each added gateway grows "
                  f"delivered/s >= {GROWS}x while the cores had room, within {GROWS}x either way from the first "
                  f"count with {CORES_FULL:.0%} of them busy"}
    if len(kept) < 2:
        c3.update(met=False, verdict="not measured: fewer than two gateway counts clear of TCP memory pressure")
        return c3
    first = kept[0]

    def where(s: dict[str, Any]) -> str:
        gw = "+".join(f"{x:.2f}" for x in s["gateway_cores"])
        return (f"G={s['gateways']}: {s['machine_cores_busy']} of {cores} cores busy = gateways {gw}, clients "
                f"{s['clients_cores']:.2f}, order path {s['order_path_cores']:.2f}, relay {s['relay_cores']:.2f}, "
                f"others {s['others_cores']} (interrupt work within these: {s['irq_cores']})")

    loaded = max(first["gateway_cores"]) >= GATEWAY_BUSY * limit
    grew = [m for m in moves if m["owed"] == "grow"]
    flat = [m for m in moves if m["owed"] == "flat"]
    parts = []
    if not loaded:
        parts.append(f"not shown: the gateway at G={first['gateways']} used {max(first['gateway_cores']):.2f} "
                     f"of a core, so {budget} was not what limited delivery")
    if grew:
        parts.append("; ".join(f"G={m['from']}->{m['to']} with cores to spare: {m['ratio']:.2f}x "
                               f"({'grew' if m['ok'] else 'did NOT grow'})" for m in grew))
    else:
        parts.append(f"growth not shown: the cores were used up from G={first['gateways']} on")
    if flat:
        parts.append("; ".join(f"G={m['from']}->{m['to']} with the cores used up: {m['ratio']:.2f}x "
                               f"({'flat' if m['ok'] else 'still GREW' if m['ratio'] >= GROWS else 'FELL'})"
                               for m in flat))
    else:
        parts.append("plateau not shown: the cores were never used up")
    fell = [m for m in flat if m["ratio"] <= 1 / GROWS]
    if fell:
        parts.append("delivery broke down past the cores: " + "; ".join(
            f"G={m['to']} delivered {by_g[m['to']]['delivered_per_s']:,}/s with a backlog of "
            f"{by_g[m['to']].get('tcp_mem_pages_at_driven_end') or 0:,} pages in TCP buffers, its last message "
            f"{by_g[m['to']]['lag_s']} s after the last order" for m in fell))
    if any(m["ratio"] >= GROWS for m in flat):
        lo, hi = kept[0], kept[-1]
        parts.append(f"growth went on with the cores busy because the CPU per delivered message fell as the load "
                     f"grew (more messages per write and per read): gateways {lo['gateway_cpu_us_per_delivered']} "
                     f"-> {hi['gateway_cpu_us_per_delivered']} us, clients {lo['clients_cpu_us_per_delivered']} -> "
                     f"{hi['clients_cpu_us_per_delivered']} us from G={lo['gateways']} to G={hi['gateways']}")
    if left_out:
        parts.append("left out: " + ", ".join(f"G={s['gateways']} ({s['tcp_mem_pages']:,} pages in TCP buffers)"
                                              for s in left_out)
                     + f", at >= {TCP_NEAR:.0%} of the kernel's tcp_mem pressure threshold: such a round measures "
                     "the kernel's memory pressure, not the gateways")
    c3["met"] = bool(loaded and grew and flat and all(m["ok"] for m in moves))
    c3["verdict"] = ("met: " if c3["met"] else "NOT met: ") + "; ".join(parts) + " | " + " | ".join(
        where(s) for s in steps)
    return c3


def relay_claim(gw: list[dict[str, Any]], gw_clients: list[dict[str, Any]], relays2: list[dict[str, Any]],
                direct: list[dict[str, Any]]) -> dict[str, Any]:
    """Claim (2) from the moderate rounds with one relay (``gw``: over G; ``gw_clients``: over
    clients per gateway), two (``relays2``) and none (``direct``): the matcher's CPU per
    publication does not grow over G nor over clients (the largest at most ``FLAT`` times the
    figure at the fewest: a matcher that got cheaper as the machine got busier shows nothing
    against the claim), and its ZeroMQ I/O thread costs more with two relays than with one at
    the same gateway counts, and more again with the gateways straight on it."""
    m_g = points(gw, "g", "moderate", "matcher_cpu_us_per_published", "gateways")
    io_g = points(gw, "g", "moderate", "matcher_threads_us_per_published.zmq_io", "gateways")
    m_n = points(gw_clients, "g", "moderate", "matcher_cpu_us_per_published", "clients_per_gateway")
    io_n = points(gw_clients, "g", "moderate", "matcher_threads_us_per_published.zmq_io", "clients_per_gateway")
    m_r2 = points(relays2, "r2-", "moderate", "matcher_cpu_us_per_published", "gateways")
    io_r2 = points(relays2, "r2-", "moderate", "matcher_threads_us_per_published.zmq_io", "gateways")
    m_d = points(direct, "direct-", "moderate", "matcher_cpu_us_per_published", "gateways")
    io_d = points(direct, "direct-", "moderate", "matcher_threads_us_per_published.zmq_io", "gateways")

    def spread(values: dict[int, float]) -> float | None:
        return round(max(values.values()) / min(values.values()), 3) if len(values) > 1 and min(values.values()) \
            else None

    def growth(values: dict[int, float]) -> float | None:  # the largest over the first (fewest gateways, clients)
        return round(max(values.values()) / values[min(values)], 3) if len(values) > 1 and values[min(values)] \
            else None

    # the same gateway counts with one relay and with two (and straight on the matcher)
    same = sorted(set(io_r2) & set(io_g))
    io_r1_same, io_r2_same = mean([io_g[g] for g in same]), mean([io_r2[g] for g in same])
    same_d = sorted(set(io_d) & set(io_g))
    subscribers = {}  # direct subscribers of the matcher -> ZeroMQ I/O thread us per publication
    if io_r1_same is not None:
        subscribers[1] = io_r1_same
    if io_r2_same is not None:
        subscribers[2] = io_r2_same
    for g in same_d:
        subscribers.setdefault(g, io_d[g])
    m_r1_same, m_r2_same = mean([m_g[g] for g in same if g in m_g]), mean([m_r2[g] for g in same if g in m_r2])
    whole = {k: v for k, v in ((1, m_r1_same), (2, m_r2_same)) if v is not None}
    for g in sorted(set(m_d) & set(m_g)):
        whole.setdefault(g, m_d[g])
    router = {"by_gateways_one_relay": points(gw, "g", "moderate", "router_cpu_us_per_order", "gateways"),
              "by_gateways_two_relays": points(relays2, "r2-", "moderate", "router_cpu_us_per_order", "gateways"),
              "by_gateways_direct": points(direct, "direct-", "moderate", "router_cpu_us_per_order", "gateways")}
    c2 = {"router_cpu_us_per_order_control": router,
          "matcher_cpu_us_per_published": {"by_gateways_one_relay": m_g, "by_clients_per_gateway": m_n,
                                           "by_gateways_two_relays": m_r2, "by_gateways_direct": m_d,
                                           "by_direct_subscribers": whole},
          "matcher_io_thread_us_per_published": {"by_gateways_one_relay": io_g, "by_clients_per_gateway": io_n,
                                                 "by_gateways_two_relays": io_r2, "by_gateways_direct": io_d,
                                                 "by_direct_subscribers": subscribers},
          "spread_over_gateways": spread(m_g), "spread_over_clients": spread(m_n),
          "io_spread_over_gateways": spread(io_g), "io_spread_over_clients": spread(io_n),
          "growth_over_gateways": growth(m_g), "growth_over_clients": growth(m_n),
          "io_two_relays_over_one": round(io_r2_same / io_r1_same, 3) if io_r1_same and io_r2_same else None,
          "wanted": f"not growing over gateways and clients (largest <= {FLAT}x the first); the I/O thread's "
                    "share higher with 2 relays than with 1 at the same gateways (and with the gateways straight "
                    "on the matcher)"}
    grows = c2["io_two_relays_over_one"] is not None and c2["io_two_relays_over_one"] > 1.0
    if same_d and io_r2_same is not None:  # against two relays at the same G where there is one
        grows = grows and all(io_d[g] > io_r2.get(g, io_r2_same) for g in same_d if g > 2)
    flat = c2["growth_over_gateways"] is not None and all(
        x is None or x <= FLAT for x in (c2["growth_over_gateways"], c2["growth_over_clients"]))
    c2["met"] = bool(grows and flat)
    return c2


def claims(rounds: list[dict[str, Any]], args: argparse.Namespace, cores: int) -> dict[str, Any]:
    gw = [r for r in rounds if r["run"].startswith("g") and "-clients" not in r["run"]]
    gw_clients = [r for r in rounds if r["run"] == f"g{args.gateways[0]}" or "-clients" in r["run"]]
    relays2 = [r for r in rounds if r["run"].startswith("r2-")]
    direct = [r for r in rounds if r["run"].startswith("direct-")]

    # (1) gateway CPU per delivered message against G (moderate rounds, one relay)
    g_cpu = points(gw, "g", "moderate", "gateway_cpu_us_per_delivered", "gateways")
    one = g_cpu.get(min(g_cpu)) if g_cpu else None
    c1 = {"gateway_cpu_us_per_delivered": g_cpu,
          "ratio_max_to_first": round(max(g_cpu.values()) / one, 3) if one else None,
          "wanted": f"<= {FLAT}x the one-gateway figure"}
    c1["met"] = c1["ratio_max_to_first"] is not None and len(g_cpu) > 1 and c1["ratio_max_to_first"] <= FLAT

    c2 = relay_claim(gw, gw_clients, relays2, direct)

    # (3) delivered messages/s against gateway processes (the scaling run)
    c3 = scaling_claim([r for r in rounds if r["run"].startswith("scale-")], cores, args.scale_gateway_cpu)
    return {"1_gateway_cpu_flat": c1, "2_matcher_cost_by_relays": c2, "3_delivered_scales": c3}


# -- plots -------------------------------------------------------------------------------------------------


def draw(results: Path) -> list[Path]:
    """One PNG a claim beside ``results``: ``NAME_gateway_cpu.png`` (1), ``NAME_matcher_cpu.png``
    (2), ``NAME_delivered.png`` (3) (``plots.py`` calls it)."""
    from matplotlib.figure import Figure
    from plots import _save

    figures = json.loads(results.read_text(encoding="utf-8"))
    c = figures["claims"]
    title = f"bench_hosts ({figures.get('timestamp', '')})"
    written = []

    def axes(fig: Any, n: int) -> list[Any]:
        return [fig.add_subplot(n, 1, i + 1) for i in range(n)]

    def line(ax: Any, data: dict[Any, float], label: str, marker: str = "o") -> None:
        if data:
            xs = sorted(data, key=int)
            ax.plot([int(x) for x in xs], [data[x] for x in xs], marker=marker, label=label)

    # (1) gateway CPU per delivered message vs gateways
    fig = Figure(figsize=(6.4, 4.0), dpi=90, layout="constrained")
    (ax,) = axes(fig, 1)
    line(ax, c["1_gateway_cpu_flat"]["gateway_cpu_us_per_delivered"], "moderate rounds (mean of the gateways)")
    ax.set_xlabel("gateways (one process each, one relay)")
    ax.set_ylabel("gateway CPU µs per delivered message")
    ax.set_ylim(bottom=0)
    ax.set_title(f"(1) gateway CPU per delivered message\n{title}", fontsize=9)
    ax.legend(fontsize=8)
    ax.xaxis.get_major_locator().set_params(integer=True)
    path = results.with_name(f"{results.stem}_gateway_cpu.png")
    _save(fig, path)
    written.append(path)

    # (2) matcher CPU per published message vs relays, gateways, clients
    c2 = c["2_matcher_cost_by_relays"]
    fig = Figure(figsize=(6.4, 10.5), dpi=90, layout="constrained")
    a1, a2, a3 = axes(fig, 3)
    io, total = c2["matcher_io_thread_us_per_published"], c2["matcher_cpu_us_per_published"]
    control = c2["router_cpu_us_per_order_control"]
    line(a1, total["by_direct_subscribers"], "whole matcher")
    line(a1, io["by_direct_subscribers"], "its ZeroMQ I/O thread (the per-subscriber sends)", "x")
    a1.set_xlabel("direct subscribers of the matcher (1 or 2 relays; G gateways straight on it)")
    a1.set_title(f"(2) matcher CPU per published message\n{title}", fontsize=9)
    for name, marker, what in (("by_gateways_one_relay", "o", "1 relay"), ("by_gateways_two_relays", "s", "2 relays"),
                               ("by_gateways_direct", "^", "no relay")):
        line(a2, total[name], f"whole matcher, {what}", marker)
        line(a2, io[name], f"I/O thread, {what}", marker)
        line(a2, control[name], f"control: router µs per order, {what}", marker)
    a2.set_xlabel("gateways")
    line(a3, total["by_clients_per_gateway"], "whole matcher")
    line(a3, io["by_clients_per_gateway"], "I/O thread", "x")
    a3.set_xlabel(f"connections per gateway (one relay, {min(figures['config']['gateways'])} gateway)")
    for a in (a1, a2, a3):
        a.set_ylabel("µs per published message")
        a.set_ylim(bottom=0)
        a.legend(fontsize=7)
        a.xaxis.get_major_locator().set_params(integer=True)
    path = results.with_name(f"{results.stem}_matcher_cpu.png")
    _save(fig, path)
    written.append(path)

    # (3) delivered messages/s vs gateway processes, and where the cores went
    c3 = c["3_delivered_scales"]
    cfg = figures["config"]
    fig = Figure(figsize=(6.4, 8.0), dpi=90, layout="constrained")
    a1, a2 = axes(fig, 2)
    steps = c3["steps"]
    if steps:
        gs = [s["gateways"] for s in steps]
        a1.plot(gs, [s["delivered_per_s"] for s in steps], marker="o", label="delivered messages/s")
        if any(len(s.get("rounds_delivered_per_s", ())) > 1 for s in steps):  # files before the repeats had one
            a1.plot([s["gateways"] for s in steps for _ in s["rounds_delivered_per_s"]],
                    [x for s in steps for x in s["rounds_delivered_per_s"]], marker=".", linestyle="none",
                    color="C0", alpha=0.5, label="each round (the line joins the median of each count)")
        a1.plot(gs, [s["offered_per_s"] or 0 for s in steps], marker="x", linestyle=":", color="C2",
                label="offered (every message to every connection, per second of orders)")
        one = steps[0]["delivered_per_s"] / steps[0]["gateways"]
        a1.plot(gs, [g * one for g in gs], linestyle="--", color="grey", label="linear from the first count")
        for s in steps:
            if s["tcp_memory_pressure"]:
                a1.annotate("TCP memory pressure:\nleft out", (s["gateways"], s["delivered_per_s"]), fontsize=7,
                            xytext=(0, 12), textcoords="offset points", ha="center")
        a1.set_ylabel("messages/s")
        a1.set_ylim(bottom=0)
        a1.legend(fontsize=7, loc="upper left")
        parts = [("gateways", lambda s: sum(s["gateway_cores"])), ("their clients", lambda s: s["clients_cores"]),
                 ("order path (matcher, router, driver)", lambda s: s["order_path_cores"]),
                 ("relay", lambda s: s["relay_cores"]), ("other processes", lambda s: s["others_cores"] or 0)]
        bottom = [0.0] * len(steps)
        for label, get in parts:
            heights = [get(s) for s in steps]
            a2.bar(gs, heights, bottom=bottom, label=label, width=0.6)
            bottom = [b + h for b, h in zip(bottom, heights, strict=True)]
        a2.plot(gs, [s["machine_cores_busy"] or 0 for s in steps], color="black", marker="_", linestyle="none",
                markersize=20, label="machine busy (/proc/stat)")
        a2.plot(gs, [s["irq_cores"] or 0 for s in steps], color="grey", marker="v", linestyle="none",
                label="of it, interrupt work (inside the bars)")
        a2.axhline(c3["cores"], color="C3", linewidth=0.8)
        a2.set_ylabel("cores busy while orders were sent")
        a2.set_ylim(0, c3["cores"] * 1.6)
        a2.legend(fontsize=7, loc="upper left", ncol=2)
        for a in (a1, a2):
            a.set_xlabel("gateway processes (one relay)")
            a.xaxis.get_major_locator().set_params(integer=True)
    cap = cfg.get("scale_gateway_cpu_cap")
    capped = f"each gateway host capped at {cap:g} core (a cgroup)\n" if cap else ""
    a1.set_title(f"(3) delivered messages/s vs gateway processes ({'met' if c3['met'] else 'NOT met'})\n"
                 f"{cfg['scale_clients_per_gateway']:,} connections x {cfg['channels_per_client']} channels per "
                 f"gateway, {cfg['scale_rate_orders_per_s']:g} orders/s\n{capped}{title}", fontsize=9)
    path = results.with_name(f"{results.stem}_delivered.png")
    _save(fig, path)
    written.append(path)
    return written


# -- main ---------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = arguments(__doc__)
    parser.add_argument("--gateways", type=at_least_one, nargs="+", default=[1, 2, 3, 4],
                        help="gateway counts behind one relay (1 2 3 4)")
    parser.add_argument("--relay-gateways", type=at_least_one, nargs="*", default=[2, 4],
                        help="gateway counts split over two relays (2 4)")
    parser.add_argument("--direct-gateways", type=at_least_one, nargs="*", default=[4],
                        help="gateway counts straight on the matcher, no relay (4)")
    parser.add_argument("--clients", type=at_least_one, default=10, help="WebSocket connections per gateway (10)")
    parser.add_argument("--more-clients", type=at_least_one, nargs="*", default=[20, 40],
                        help="connections per gateway of the clients run, at the first gateway count (20 40)")
    parser.add_argument("--channels", type=at_least_one, default=10, help="symbols each connection subscribes (10)")
    parser.add_argument("--rate", type=above_zero, default=1500.0, help="orders/s of the moderate rounds (1500)")
    parser.add_argument("--seconds", type=above_zero, default=8.0, help="length of a round (8 s)")
    parser.add_argument("--scale-gateways", type=at_least_one, nargs="+", default=[1, 2, 3, 4, 5, 6],
                        help="gateway counts of the scaling run, behind one relay (1 2 3 4 5 6)")
    parser.add_argument("--scale-clients", type=at_least_one, default=2000,
                        help="connections per gateway in the scaling run (2000)")
    parser.add_argument("--scale-client-procs", type=at_least_one, default=2,
                        help="client processes per gateway in the scaling run (2)")
    parser.add_argument("--scale-rate", type=above_zero, default=200.0, help="orders/s of the scaling rounds (200)")
    parser.add_argument("--scale-seconds", type=above_zero, default=4.0,
                        help="length of a scaling round (4 s: the backlog of the larger counts stays in RAM)")
    parser.add_argument("--scale-gateway-cpu", type=float, default=0.15,
                        help="CPU cap of each gateway host in the scaling run, in cores (0.15; 0: no cap, the "
                             "gateways share the machine's cores)")
    parser.add_argument("--scale-repeat", type=at_least_one, default=None,
                        help="rounds per gateway count of the scaling run; the one with the median delivered/s "
                             "counts (3; 1 with --quick)")
    parser.add_argument("--repeat", type=at_least_one, default=2, help="moderate rounds per run, averaged (2)")
    parser.add_argument("--seed", type=int, default=1, help="seed of the order flow (1)")
    parser.add_argument("--quick", action="store_true", help="smoke run (under a minute), no results file")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (logs, topologies)")
    parser.add_argument("--json", type=Path, help="also write the figures here (smoke runs too)")
    args = parser.parse_args(argv)
    if args.quick:
        args.gateways, args.relay_gateways, args.direct_gateways = [1, 2], [2], [2]
        args.clients, args.more_clients, args.seconds, args.repeat = 20, [40], 2.0, 1
        args.scale_gateways, args.scale_clients, args.scale_client_procs, args.scale_seconds = [1, 2], 300, 1, 2.0
    args.scale_repeat = args.scale_repeat or (1 if args.quick else 3)
    counts = [*args.gateways, *args.relay_gateways, *args.direct_gateways, *args.scale_gateways]
    if max(counts) > MAX_GATEWAYS:
        parser.error(f"at most {MAX_GATEWAYS} gateways")
    if min(counts) < 1 or not 1 <= args.scale_client_procs <= args.scale_clients:
        parser.error("gateway counts are at least 1; --scale-client-procs is 1 to --scale-clients")
    if not 1 <= args.channels <= len(SYMBOLS):
        parser.error(f"--channels is 1-{len(SYMBOLS)}")
    if args.scale_gateway_cpu and not MIN_CAP <= args.scale_gateway_cpu <= 1:
        parser.error(f"--scale-gateway-cpu is 0 (no cap) or {MIN_CAP} to 1 core: one gateway process runs one thread")
    if os.geteuid() != 0:
        parser.error("network namespaces need root")
    stop_on_sigterm()
    left = remove_namespaces()
    if left:
        warn(f"removed namespaces left by an earlier run: {', '.join(left)}")
    left = remove_cpu_caps()
    if left:
        warn(f"removed CPU caps (cgroups) left by an earlier run: {', '.join(left)}")
    before = machine_busy()
    note = noise_note(before, "before the run")
    if note:
        warn(note)
    load_before = os.getloadavg()
    cap = f"each gateway host capped at {args.scale_gateway_cpu:g} core" if args.scale_gateway_cpu else "no CPU cap"
    print(f"hosts: matcher+router, driver, {MAX_RELAYS} relay hosts, up to {max(counts)} gateway hosts, "
          f"{CLIENT_HOSTS} client hosts (namespaces {PREFIX}*, bridge {BRIDGE} in {BRIDGE_NS}, {SUBNET}.0/24); "
          f"{args.clients} connections per gateway x {args.channels} channels, rounds of {args.seconds:g} s at "
          f"{args.rate:g} orders/s; scaling run: {args.scale_clients} connections per gateway "
          f"({args.scale_client_procs} client process{'es' if args.scale_client_procs > 1 else ''}), "
          f"{args.scale_seconds:g} s at {args.scale_rate:g} orders/s, "
          f"{cap}; "
          f"load average {load_before[0]:.2f}", flush=True)
    directory = Path(tempfile.mkdtemp(prefix="zmx-bench-hosts-"))
    hosts = host_addresses(max(counts))
    moderate = [("moderate", args.rate)]
    plan = [Run(f"g{g}", 1, g, False, moderate, args.more_clients if i == 0 else [], args.clients, 1, args.seconds)
            for i, g in enumerate(args.gateways)]
    plan += [Run(f"r2-g{g}", 2, g, False, moderate, [], args.clients, 1, args.seconds) for g in args.relay_gateways]
    plan += [Run(f"direct-g{g}", 0, g, True, moderate, [], args.clients, 1, args.seconds)
             for g in args.direct_gateways]
    plan += [Run(f"scale-g{g}", 1, g, False, [("scaling", args.scale_rate)], [], args.scale_clients,
                 args.scale_client_procs, args.scale_seconds, args.scale_gateway_cpu) for g in args.scale_gateways]
    bench = Bench(args, directory, hosts)
    bench.progress = Progress(1 + sum(1 + sum(rounds_of(args, label) for label, _ in run.rounds)
                                      + len(run.more_clients) * args.repeat for run in plan))
    rounds: list[dict[str, Any]] = []
    started = time.monotonic()
    try:
        create_namespaces(hosts)
        bench.start_base()
        bench.progress.step("matcher, router and driver up")
        for run in plan:
            print(f"  {run.name}: {'no relay, gateways on the matcher' if run.direct else f'{run.relays} relay(s)'}, "
                  f"{run.gateways} gateway(s), {run.clients} connections each", flush=True)
            rounds += bench.run(run)
    finally:
        with shielded():
            bench.stop_all()
            remove_namespaces()
            remove_cpu_caps()
            remove_directory(directory, args.keep)
    elapsed = time.monotonic() - started
    return report(args, rounds, bench.idle, before, load_before, elapsed)


def report(args: argparse.Namespace, rounds: list[dict[str, Any]], idle: dict[str, float], before: Any,
           load_before: tuple[float, float, float], elapsed: float) -> int:
    rows = []
    for r in rounds:
        rows.append([r["run"], f"{r['round']} {r['repeat']}", f"{r['relays']}{'d' if r['direct'] else ''}",
                     str(r["gateways"]), str(r["clients_per_gateway"]), f"{r['published']:,}",
                     f"{r['delivered']:,}", fmt(r["delivered_per_s"]), fmt(r["keep_up"], ".3f"),
                     fmt(r["gateway_cpu_us_per_delivered"], ".2f"), fmt(r["matcher_cpu_us_per_published"], ".1f"),
                     fmt(r["matcher_threads_us_per_published"]["zmq_io"], ".2f"),
                     fmt(r["relay_cpu_us_per_published"], ".1f"), f"{r['cores_busy_ours_while_driven']:.2f}",
                     fmt(r["others_cpus"], ".2f")])
    print_rows("fan-out across hosts (namespaces): one row per round",
               ["run", "round", "R", "G", "N/gw", "published", "delivered", "deliv/s", "all got all",
                "gw us/msg", "matcher us/pub", "m io us/pub", "relay us/pub", "cores", "others"], rows)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    got = claims(rounds, args, cores)
    for key, c in got.items():
        print(f"  claim {key}: {'met' if c['met'] else 'NOT met'} ({c['wanted']})")
    print_scaling(got["3_delivered_scales"])
    print(f"took {elapsed:.0f} s")
    figures: dict[str, Any] = {
        "config": {"gateways": args.gateways, "relay_gateways": args.relay_gateways,
                   "direct_gateways": args.direct_gateways, "clients_per_gateway": args.clients,
                   "more_clients": args.more_clients, "channels_per_client": args.channels,
                   "rate_orders_per_s": args.rate, "round_seconds": args.seconds,
                   "scale_gateways": args.scale_gateways, "scale_clients_per_gateway": args.scale_clients,
                   "scale_client_procs_per_gateway": args.scale_client_procs,
                   "scale_rate_orders_per_s": args.scale_rate, "scale_round_seconds": args.scale_seconds,
                   "scale_gateway_cpu_cap": args.scale_gateway_cpu or None, "cpu_cap_period_us": CAP_PERIOD_US,
                   "repeat": args.repeat, "scale_repeat": args.scale_repeat, "seed": args.seed,
                   "matcher_fsync": "never",
                   "symbols": len(SYMBOLS), "subnet": f"{SUBNET}.0/24", "namespaces_prefix": PREFIX,
                   "gateway_limits": "ping_interval_s 3600, ping_timeout_s 3600, slow_consumer_ms 600000",
                   "elapsed_s": round(elapsed)},
        "environment": {"cores": cores, "loadavg_before": [round(x, 2) for x in load_before],
                        "loadavg_after": [round(x, 2) for x in os.getloadavg()],
                        "noise_before": {"others_cpus": before.others, "steal_cpus": before.steal},
                        "idle": idle},
        "claims": got,
        "rounds": rounds,
    }
    figures["summary"] = summarize("hosts", figures)
    if args.json:
        args.json.write_text(json.dumps({"benchmark": "hosts", **figures, **metadata()}, indent=2) + "\n")
    if args.quick:
        print("(quick run: no results file)")
        return 0
    path = write_results("hosts", figures)
    print(f"wrote {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--role":
        sys.exit(role_main(sys.argv[2:]))
    sys.exit(main())
