"""Orders through a real cluster against a bare Python forwarding loop, measured in the same run.

Real processes, on free ports, with a topology written to a temporary directory (the
matchers' ``data_dir`` in it too, ``fsync: batch``):

- **zmx, 1 matcher**: a router and one matcher that owns the four symbols;
- **zmx, 2 matchers**: a router and two matchers, two symbols each;
- **python loop** (the ceiling): the least a symbol-keyed router must do, written below: a
  ROUTER front and a DEALER back, poll, drain each socket without blocking, read the symbol
  from the header, forward the frames (received and sent the way the router does it);
  behind it a process that only echoes each request as a reply in the router's reply
  format (``header, b"ok", payload``, the payload a pre-encoded ``OrderAccepted`` batch, so
  the client decodes what it decodes from a matcher);
- **zmq.proxy**: the same, with ``zmq.proxy`` (C) in place of the Python loop;
- **client alone**: the client straight to an echo process, nothing between: what the
  client itself can do, which bounds every other figure.

Every target is driven the same way, through a ``zmx.node.client.Client``'s DEALER with the
same wire frames (a 17-byte header and the ``codec.encode``d command; not the ``reply_to``
frame that ``Client.send`` adds, which the bare loop would not read: the router reads one
frame more for a client's request, about 1 us of its CPU): each round's commands
are encoded before its timing starts (``Requests``), the timed loop only hands frames to
ZeroMQ and takes replies (header, status, payload), and the payloads are decoded and checked
after the round. (The loop used to call ``Client.send`` / ``Client.recv``, which encode each
command and decode each reply's events inside the timing. That made the client the bottleneck
of the ceilings -- on the same two-core machine: client alone about 29,000 round trips/s
then, 79,000 now; python loop 15,000 then, 28,000 now, its forwarder and echo receiving
frames as the router now does -- and so flattered the ratio of zmx to the python loop; at
half rate it cost about 0.1 of a core more, on a machine where the client, the router and the
matchers share two cores.) The order flow is seeded and generated outside the timing
(``Workload``): round-robin over four symbols, gtc limit orders resting 1-20 ticks from a
fixed mid (none crosses) and cancels of resting orders, 45% of the time or whenever
``LIVE_CAP`` orders of a symbol rest; each round continues the flow with ids of its own, so
the books stay bounded for the whole run.

Two measures per target:

1. **maximum rate**: ``--window`` requests kept in flight (new ones are sent as replies come
   back), ``--n`` orders; orders/s = acks / seconds from the first send to the last ack;
   ack latency = send to reply, per order (p50 / p99 / p99.9). Rounds of the targets are
   taken in turn (``_common.interleaved``); the best of ``--repeat`` counts.
2. **half rate, open loop**: ``--paced-n`` orders sent on a fixed schedule at half of the
   best rate zmx reached with that many matchers, whatever the replies do; ack latency from
   the moment each request was handed to ZeroMQ to the moment its reply was taken (every
   sample counted), and also from each order's scheduled time (which adds any lag of the
   sender). The python loop is paced at the same rate in turn, as the reference of what the
   client and the machine add. The round with the median p99 is reported; every round is in
   the JSON, with the CPU cores each process of the target used and the CPUs other processes
   of the machine kept busy meanwhile. Before those rounds, ``fsync_probe`` measures this
   disk's ``fdatasync`` (each zmx acknowledgement waits for at least one).

Targets (issue 3): zmx orders/s at least 0.6x the python loop's round trips/s, and ack p99
at most 5 ms at half of the maximum rate.

Run: ``.venv/bin/python perf/bench_orders.py`` (``--quick`` for a smoke run). Writes
``perf/results/orders.json``. The helper processes are this file run with ``--role``.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import os
import random
import selectors
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple, Self

import zmq
from _common import (
    ROOT,
    CpuWatch,
    Progress,
    arguments,
    at_least_one,
    interleaved,
    machine_busy,
    noise_note,
    remove_directory,
    shielded,
    warn,
    write_results,
)
from summaries import summarize

sys.path.insert(0, str(ROOT / "tests"))
from nodes import Cluster, free_ports, write_topology

from zmx import codec
from zmx.codec import encode_batch
from zmx.commands import CancelOrder, Command, SubmitOrder
from zmx.events import OrderAccepted
from zmx.model import OrderType, Side, TimeInForce
from zmx.exceptions import DecodeError
from zmx.node.client import Client, encode_header
from zmx.node.runtime import Stopper, announce_ready, load_topology, parse_ready

SCRIPT = Path(__file__).resolve()

# Targets of the issue.
TARGET_RATIO = 0.6  # zmx orders/s / python-loop round trips/s, fsync: batch
TARGET_P99_MS = 5.0  # ack p99 at half of the maximum rate

SYMBOLS = ("BTC-USDT", "ETH-USDT", "SOL-USDT", "XRP-USDT")
LAYOUTS = {  # matcher count -> matcher -> symbols
    1: {"m1": list(SYMBOLS)},
    2: {"m1": [SYMBOLS[0], SYMBOLS[2]], "m2": [SYMBOLS[1], SYMBOLS[3]]},
}

# Workload shape.
MID = 3_000_000  # 30000.00 in ticks (tick 0.01, lot 0.001 in the test topology)
MAX_DISTANCE = 20
LOTS = (1, 500)
CANCEL_SHARE = 0.45
LIVE_CAP = 1_000  # orders resting per symbol before every command is a cancel
ACCOUNTS = tuple(f"acct{i}" for i in range(10))
BUY, SELL, LIMIT, GTC = Side.BUY, Side.SELL, OrderType.LIMIT, TimeInForce.GTC

BATCH = 1024  # messages a helper drains from one socket per turn (as the router)
HWM = 100_000
STALL_S = 10.0  # a round fails when no reply comes for this long
_backend_send = zmq.backend.Socket.send  # type: ignore[attr-defined]  # as the router: no Python wrapper
_backend_recv = zmq.backend.Socket.recv  # type: ignore[attr-defined]  # as the router: zmq.Frame, no RCVMORE calls
_NOBLOCK, _SEND_MORE = int(zmq.NOBLOCK), int(zmq.NOBLOCK | zmq.SNDMORE)


# -- workload ------------------------------------------------------------------------------------


class Workload:
    """A seeded, endless order flow over ``symbols``; each ``take`` continues where the last
    one stopped, so the books stay bounded however many rounds are taken.

    Each symbol in turn gets a resting gtc limit order or, 45% of the time (always when
    ``LIVE_CAP`` of its orders rest), a cancel of one of its resting orders. No order crosses,
    so every submit rests and every cancel finds its order: each command changes the book once.
    The same seed gives the same commands but for the ``prefix`` of the order ids.
    """

    def __init__(self, seed: int, symbols: Sequence[str] = SYMBOLS) -> None:
        self.rng = random.Random(seed)
        self.symbols = tuple(symbols)
        self.live: dict[str, list[tuple[str, str]]] = {s: [] for s in symbols}
        self.turn = 0

    def take(self, n: int, prefix: str) -> list[Command]:
        rng = self.rng
        rand, randint, randrange = rng.random, rng.randint, rng.randrange
        symbols, live = self.symbols, self.live
        commands: list[Command] = []
        for i in range(n):
            symbol = symbols[self.turn % len(symbols)]
            self.turn += 1
            resting = live[symbol]
            if resting and (len(resting) >= LIVE_CAP or rand() < CANCEL_SHARE):
                j = randrange(len(resting))
                order_id, account = resting[j]
                resting[j] = resting[-1]
                resting.pop()
                commands.append(CancelOrder(order_id, account, symbol))
                continue
            side = BUY if rand() < 0.5 else SELL
            distance = randint(1, MAX_DISTANCE)
            price = MID - distance if side is BUY else MID + distance
            order_id = f"{prefix}{i}"
            account = ACCOUNTS[randrange(len(ACCOUNTS))]
            commands.append(SubmitOrder(order_id, account, symbol, side, LIMIT, GTC, price, randint(*LOTS)))
            resting.append((order_id, account))
        return commands

    def resting(self) -> int:
        return sum(map(len, self.live.values()))


def ack_payload(symbol: str = SYMBOLS[0]) -> bytes:
    """What the echo process answers: the batch a matcher answers a resting order with."""
    return encode_batch([OrderAccepted(symbol, 123_456, time.time_ns(), "r001o12345", ACCOUNTS[3], BUY,
                                       LIMIT, GTC, MID - 7, 250)])


# -- helper processes (this file run with --role) ------------------------------------------------


def _socket(ctx: zmq.Context[zmq.Socket[bytes]], kind: int) -> zmq.Socket[bytes]:
    s = ctx.socket(kind)
    s.setsockopt(zmq.LINGER, 0)
    s.setsockopt(zmq.SNDHWM, HWM)
    s.setsockopt(zmq.RCVHWM, HWM)
    return s


def watchdog(max_seconds: float) -> None:
    """End this helper if the benchmark that started it is gone, or after ``max_seconds``."""
    parent = os.getppid()
    end = time.monotonic() + max_seconds

    def watch() -> None:
        while True:
            time.sleep(0.5)
            if os.getppid() != parent or time.monotonic() > end:
                os._exit(3)

    threading.Thread(target=watch, daemon=True, name="watchdog").start()


def role_echo(bind: str, stopper: Stopper) -> None:
    """Answer every request ``client, header, body`` with ``client, header, b"ok", ACK`` (and a
    request ``header, body`` straight from a client with ``header, b"ok", ACK``); ACK is an
    ``OrderAccepted`` of the symbol the header names, as a matcher's reply holds its own symbol's
    events (a client takes any other for a bad reply)."""
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    sock = _socket(ctx, zmq.DEALER)
    try:
        sock.bind(bind)
        announce_ready("echo", "echo", bind=bind)
        acks = {symbol.encode(): ack_payload(symbol) for symbol in SYMBOLS}
        ack_of, other = acks.get, ack_payload()
        recv, send = _backend_recv.__get__(sock), _backend_send.__get__(sock)
        noblock, more, again, ok = _NOBLOCK, _SEND_MORE, zmq.Again, b"ok"
        timeout = 100
        while not stopper.stopped:
            if not sock.poll(timeout):
                timeout = 100
                continue
            for _ in range(BATCH):
                try:
                    frame = recv(noblock, False)
                except again:
                    timeout = 100
                    break
                msg = [frame.bytes]
                while frame.more:
                    frame = recv(0, False)
                    msg.append(frame.bytes)
                if len(msg) == 3:  # through a forwarder: client, header, body
                    send(msg[0], more)
                    send(msg[1], more)
                    send(ok, more)
                    send(ack_of(msg[1][9:], other), noblock)
                elif len(msg) == 2:  # from the client itself: header, body
                    send(msg[0], more)
                    send(ok, more)
                    send(ack_of(msg[0][9:], other), noblock)
            else:
                timeout = 0
    finally:
        sock.close(0)
        ctx.term()


def role_forward(front_ep: str, back_ep: str, symbols: Sequence[str], stopper: Stopper) -> None:
    """The python-loop ceiling: ROUTER front -> DEALER back, forward by symbol, replies back."""
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    front, back = _socket(ctx, zmq.ROUTER), _socket(ctx, zmq.DEALER)
    try:
        back.connect(back_ep)
        front.bind(front_ep)
        announce_ready("forward", "forward", front=front_ep, back=back_ep)
        owned = frozenset(s.encode() for s in symbols)
        frecv, fsend = _backend_recv.__get__(front), _backend_send.__get__(front)
        brecv, bsend = _backend_recv.__get__(back), _backend_send.__get__(back)
        poller = zmq.Poller()
        poller.register(front, zmq.POLLIN)
        poller.register(back, zmq.POLLIN)
        poll = poller.poll
        noblock, more, again = _NOBLOCK, _SEND_MORE, zmq.Again
        timeout = 100
        while not stopper.stopped:
            ready = dict(poll(timeout))
            busy = False
            if back in ready:
                for _ in range(BATCH):
                    try:
                        frame = brecv(noblock, False)
                    except again:
                        break
                    msg = [frame.bytes]
                    while frame.more:
                        frame = brecv(0, False)
                        msg.append(frame.bytes)
                    if len(msg) == 4:  # client, header, status, payload
                        fsend(msg[0], more)
                        fsend(msg[1], more)
                        fsend(msg[2], more)
                        fsend(msg[3], noblock)
                else:
                    busy = True
            if front in ready:
                for _ in range(BATCH):
                    try:
                        frame = frecv(noblock, False)
                    except again:
                        break
                    msg = [frame.bytes]
                    while frame.more:
                        frame = frecv(0, False)
                        msg.append(frame.bytes)
                    if len(msg) == 3 and msg[1][9:] in owned:  # client, header, body
                        bsend(msg[0], more)
                        bsend(msg[1], more)
                        bsend(msg[2], noblock)
                else:
                    busy = True
            timeout = 0 if busy else 100
    finally:
        front.close(0)
        back.close(0)
        ctx.term()


def role_proxy(front_ep: str, back_ep: str) -> None:
    """The same forwarding by ``zmq.proxy`` in C; ends with SIGTERM's default action."""
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    front, back = _socket(ctx, zmq.ROUTER), _socket(ctx, zmq.DEALER)
    back.connect(back_ep)
    front.bind(front_ep)
    announce_ready("proxy", "proxy", front=front_ep, back=back_ep)
    zmq.proxy(front, back)


def role_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="bench_orders.py --role")
    parser.add_argument("role", choices=("echo", "forward", "proxy"))
    parser.add_argument("endpoints", nargs="+")
    parser.add_argument("--symbols", default=",".join(SYMBOLS))
    parser.add_argument("--max-seconds", type=float, default=900.0)
    args = parser.parse_args(argv)
    watchdog(args.max_seconds)
    if args.role == "proxy":
        role_proxy(*args.endpoints)
        return 0
    stopper = Stopper().install()
    if args.role == "echo":
        role_echo(args.endpoints[0], stopper)
    else:
        role_forward(args.endpoints[0], args.endpoints[1], args.symbols.split(","), stopper)
    return 0


def cpu_jiffies(pid: int) -> int:
    """Clock ticks of CPU that process ``pid`` has used so far (0 if it is gone or not on Linux)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            fields = f.read().rpartition(")")[2].split()
    except (OSError, ValueError):
        return 0
    return int(fields[11]) + int(fields[12])  # utime + stime


class Helper:
    """A helper process of a benchmark (``script --role ...``); its stderr goes to ``<cwd>/<name>.log``.

    It proves it is serving with a ``READY`` line on stdout (``zmx.node.runtime``); other
    lines it writes are read with ``line``, and ``write`` sends it a line on its stdin.
    """

    def __init__(self, script: Path, name: str, args: Sequence[str], cwd: Path) -> None:
        self.name = name
        self.log_path = cwd / f"{name}.log"
        self._buffer = b""
        self.final_jiffies = 0  # its CPU when it was stopped (what /proc no longer tells)
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen([sys.executable, str(script), "--role", *args], cwd=cwd, env=env,
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-3000:]
        except OSError:
            return ""

    def line(self, timeout: float) -> str:
        """The next line it writes on stdout (``RuntimeError`` with its log if none in time)."""
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        with selectors.DefaultSelector() as sel:
            sel.register(self.proc.stdout, selectors.EVENT_READ)
            while b"\n" not in self._buffer:
                left = deadline - time.monotonic()
                if left <= 0 or not sel.select(timeout=left):
                    raise RuntimeError(f"{self.name}: no line within {timeout} s:\n{self.log()}")
                chunk = os.read(self.proc.stdout.fileno(), 65536)
                if not chunk:
                    raise RuntimeError(f"{self.name} exited ({self.proc.wait()}):\n{self.log()}")
                self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line.decode(errors="replace")

    def wait_ready(self, timeout: float = 20.0) -> dict[str, Any]:
        while True:
            details = parse_ready(self.line(timeout))
            if details is not None:
                return details

    def write(self, text: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(text.encode() + b"\n")
        self.proc.stdin.flush()

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM, then SIGKILL if it is still running after ``timeout``."""
        if self.proc.poll() is None:
            self.final_jiffies = cpu_jiffies(self.proc.pid)
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                try:
                    stream.close()
                except OSError:
                    pass


class Processes:
    """Everything a benchmark starts, stopped in reverse order by ``stop_all``."""

    def __init__(self, directory: Path, script: Path = SCRIPT) -> None:
        self.directory = directory
        self.script = script
        self.helpers: list[Helper] = []
        self.clusters: list[Cluster] = []

    def helper(self, name: str, *args: str, max_seconds: float = 900.0) -> Helper:
        h = Helper(self.script, name, [*args, "--max-seconds", str(max_seconds)], self.directory)
        self.helpers.append(h)
        h.wait_ready()
        return h

    def cluster(self, name: str, matchers: dict[str, list[str]]) -> tuple[Cluster, Path]:
        """Start a router and ``matchers`` (each READY) from a topology in ``directory/name``."""
        where = self.directory / name
        where.mkdir()
        cluster = Cluster(where)
        self.clusters.append(cluster)
        cluster.topology = write_topology(where, matchers=matchers, routers=1, fsync="batch")
        for node in ("r1", *matchers):
            cluster.start(node)
        return cluster, cluster.topology

    def jiffies(self) -> int:
        """CPU clock ticks used so far by every process started here, running or stopped."""
        total = sum(h.final_jiffies if h.proc.poll() is not None else cpu_jiffies(h.proc.pid)
                    for h in self.helpers)
        return total + sum(cpu_jiffies(node.proc.pid) for c in self.clusters for node in c.procs)

    def stop_all(self) -> None:
        for h in reversed(self.helpers):
            try:
                h.stop()
            except Exception:  # noqa: BLE001 - keep stopping the others
                h.proc.kill()
        for c in reversed(self.clusters):
            c.stop_all()


class NoiseWatch:
    """``_common.CpuWatch`` that does not count the benchmark's own child processes as others (the
    short-lived processes that matchers fork to write snapshots still count)."""

    def __init__(self, procs: Processes) -> None:
        self.procs = procs
        self.others: float | None = None
        self.steal: float | None = None

    def __enter__(self) -> Self:
        self._watch = CpuWatch().__enter__()
        self._children = self.procs.jiffies()
        self._wall = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        children = self.procs.jiffies() - self._children
        wall = time.perf_counter() - self._wall
        self._watch.__exit__(*exc)
        self.steal = self._watch.steal
        if self._watch.others is not None and wall > 0:
            self.others = round(max(0.0, self._watch.others - children / os.sysconf("SC_CLK_TCK") / wall), 2)


def stop_on_sigterm() -> None:
    """A SIGTERM to the benchmark unwinds it (so every ``finally`` stops its processes)."""
    def stop(signum: int, _frame: Any) -> None:
        raise SystemExit(128 + signum)
    signal.signal(signal.SIGTERM, stop)


# -- the client side -----------------------------------------------------------------------------


class Round(NamedTuple):
    seconds: float  # first send to last reply
    latency_ns: list[int]  # send -> reply, per request
    late_ns: list[int]  # scheduled send -> reply (paced rounds; else empty)
    not_ok: Counter[str]
    cpu: dict[str, float] | None = None  # paced rounds: CPU cores used by each process of the target
    others: float | None = None  # paced rounds: CPUs kept busy by other processes meanwhile


def fsync_probe(directory: Path, n: int = 2000) -> dict[str, float | None]:
    """fdatasync latency of this disk now: ``n`` writes of 300 bytes one after the other into a
    preallocated file in ``directory`` (where the matchers' journals are, written the same way:
    ``zmx.node.journal``), each synced, 0.5 ms apart. Every acknowledgement of zmx waits for at
    least one of these (``fsync: batch``); the python loop for none."""
    path = directory / "fsync-probe"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    clock, data, took = time.perf_counter_ns, b"x" * 300, []
    try:
        os.posix_fallocate(fd, 0, n * len(data))
        for _ in range(n):
            os.write(fd, data)
            t = clock()
            os.fdatasync(fd)
            took.append(clock() - t)
            time.sleep(0.0005)
    finally:
        os.close(fd)
        path.unlink()
    return percentiles_us(took)


ROUTE_CHECK_IDS = 1 << 62  # request ids of await_route's checks, apart from the rounds' (``Requests``)


def await_route(client: Client, symbols: Sequence[str], timeout: float = 20.0) -> None:
    """Wait until each symbol's requests are answered ``ok`` (the matchers' HELLOs may still
    be on their way to the router: ``unavailable`` until then). Sent as the rounds send theirs
    (``header, body``: the ceilings read no ``reply_to``), with request ids of their own."""
    deadline = time.monotonic() + timeout
    for n, symbol in enumerate(symbols):
        while True:
            request_id = ROUTE_CHECK_IDS + n
            client.send_frames((encode_header(request_id, symbol),
                                codec.encode(CancelOrder("route-check", ACCOUNTS[0], symbol))), timeout=2.0)
            reply = client.recv(2.0)
            while reply is not None and reply.request_id != request_id:  # a late answer to an earlier check
                reply = client.recv(2.0)
            if reply is None:
                raise RuntimeError(f"{symbol}: no answer to a route check within 2 s")
            if reply.ok:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"{symbol}: still {reply.status} after {timeout} s: {reply.message}")
            time.sleep(0.05)


class Requests:
    """One round's requests, encoded before the timing starts: ``frames[k]`` is request ``k``'s
    ``(header, body)``, with request id ``base + k`` (a range of its own for each round, so a
    late reply of an earlier round is never taken for one of this round).

    The timed loops below send these frames and read replies straight from the client's
    socket (``Client.socket``, the same DEALER, the same wire frames as ``Client.send`` /
    ``Client.recv``), keeping only the reply's header, status and payload; the payloads are
    decoded after the round (``check``). So the client's own CPU -- encoding each command,
    decoding each reply's events -- stays out of the machine's two cores while the cluster is
    measured, and out of the latencies, for every target alike.
    """

    _rounds = itertools.count(1)

    def __init__(self, commands: Sequence[Command]) -> None:
        self.base = next(self._rounds) << 32
        self.frames = [(encode_header(self.base + k, c.symbol), codec.encode(c)) for k, c in enumerate(commands)]
        self.status: list[bytes] = [b""] * len(commands)
        self.payload: list[bytes] = [b""] * len(commands)
        self.stray = 0  # replies that are not one of these requests' (malformed, or of another round)

    def check(self, kinds: Counter[str] | None = None) -> Counter[str]:
        """The statuses other than ``ok`` (an undecodable ok payload counts as ``bad_reply``);
        ``kinds`` counts the type of each ok reply's first event."""
        not_ok: Counter[str] = Counter()
        for status, payload in zip(self.status, self.payload, strict=True):
            if status != b"ok":
                not_ok[status.decode(errors="replace") or "no reply"] += 1
                continue
            try:
                events = codec.decode_batch(payload, codec.MAX_REPLY_BYTES)
            except DecodeError:
                not_ok["bad_reply"] += 1
                continue
            if kinds is not None:
                kinds[type(events[0]).__name__ if events else "none"] += 1
        if self.stray:
            not_ok["stray reply"] += self.stray
        return not_ok


class _Wire:
    """Send a request's frames / take a reply from a client's socket, without the client's
    encoding and decoding (see ``Requests``)."""

    def __init__(self, client: Client, requests: Requests) -> None:
        self.client = client
        sock = client.socket
        self.send_more = functools.partial(_backend_send, sock, flags=_SEND_MORE)
        self.send_last = functools.partial(_backend_send, sock, flags=_NOBLOCK)
        self.recv, self.poll = _backend_recv.__get__(sock), sock.poll
        self.base, self.n = requests.base, len(requests.frames)
        self.status, self.payload = requests.status, requests.payload
        self.requests = requests

    def send(self, frames: tuple[bytes, bytes]) -> None:
        try:
            self.send_more(frames[0])
        except zmq.Again:  # no router connected, or its queue full: wait as Client.send does
            self.client.send_frames(frames, timeout=STALL_S)
            return
        self.send_last(frames[1])

    def reply(self) -> int:
        """The index of the next reply's request, -1 if none is waiting, -2 for a stray reply."""
        try:
            frame = self.recv(_NOBLOCK, False)
        except zmq.Again:
            return -1
        frames = [frame.bytes]
        while frame.more:
            frame = self.recv(0, False)
            frames.append(frame.bytes)
        k = int.from_bytes(frames[0][1:9], "big") - self.base if len(frames[0]) >= 9 else -1
        if len(frames) != 3 or not 0 <= k < self.n:
            self.requests.stray += 1
            return -2
        self.status[k] = frames[1]
        self.payload[k] = frames[2]
        return k


def pipelined(client: Client, commands: Sequence[Command], window: int, max_seconds: float,
              kinds: Counter[str] | None = None) -> Round:
    """Keep ``window`` requests in flight until every command is answered; ``kinds``, if
    given, counts the type of each ok reply's first event (for the warm-up's check).
    Latency: from the moment the request's frames were handed to ZeroMQ to the reply's."""
    requests = Requests(commands)
    wire = _Wire(client, requests)
    send, reply, poll, frames = wire.send, wire.reply, wire.poll, requests.frames
    n = len(commands)
    clock = time.perf_counter_ns
    sent_at = [0] * n
    latency = [0] * n
    i = received = 0
    start = clock()
    give_up = start + int(max_seconds * 1e9)
    last = start
    while received < n:
        while i < n and i - received < window:
            send(frames[i])
            sent_at[i] = clock()
            i += 1
        if not poll(int(STALL_S * 1000)):
            raise RuntimeError(f"no reply for {STALL_S} s: {received:,} of {n:,} answered")
        k = reply()
        while k != -1:
            if k >= 0:
                last = clock()
                latency[k] = last - sent_at[k]
                received += 1
            k = reply() if received < n else -1
        if last > give_up:
            raise RuntimeError(f"round over {max_seconds} s: {received:,} of {n:,} answered")
    return Round((last - start) / 1e9, latency, [], requests.check(kinds))


def paced(client: Client, commands: Sequence[Command], rate: float, max_seconds: float) -> Round:
    """Send on a fixed schedule (``rate`` per second, open loop) and take replies as they come.

    Request ``k`` is due at ``start + k / rate``; it is sent as soon as the loop sees it due
    (late ones go out at once, in order, never skipped). Two latencies per request: from the
    moment its frames were handed to ZeroMQ (``latency_ns``, the ack latency reported) and
    from the moment it was due (``late_ns``, which adds the sender's own lag). Between sends
    the loop waits in ``poll`` on the socket, so a reply is timestamped when it arrives, not
    when the next send is done."""
    requests = Requests(commands)
    wire = _Wire(client, requests)
    send, reply, poll, frames = wire.send, wire.reply, wire.poll, requests.frames
    n = len(commands)
    clock = time.perf_counter_ns
    interval = 1e9 / rate
    sent_at = [0] * n
    latency = [0] * n
    late = [0] * n
    i = received = 0
    start = clock() + 1_000_000
    give_up = start + int(max_seconds * 1e9)
    last = start
    due = start
    while received < n:
        now = clock()
        while i < n and due <= now:
            send(frames[i])
            sent_at[i] = now = clock()
            i += 1
            due = start + int(i * interval)
        k = reply()
        got = False
        while k != -1:
            if k >= 0:
                got = True
                last = clock()
                latency[k] = last - sent_at[k]
                late[k] = last - (start + int(k * interval))
                received += 1
            k = reply() if received < n else -1
        if got or received >= n:
            continue
        now = clock()
        if now > give_up:
            raise RuntimeError(f"paced round over {max_seconds} s: {received:,} of {n:,} answered")
        if i < n:
            wait = due - now
            if wait > 0:
                # ZeroMQ's poll counts whole milliseconds: wait in it for the whole ones (a reply
                # wakes it up), then in a sleep for the rest of the way to the next send. Never
                # spin: on this 2-core box a client that spins takes CPU that the router and the
                # matcher need (0.63-0.71 of a core at 13,000 orders/s with a 50 us spin, 0.53-0.60
                # without).
                if wait >= 1_000_000:
                    poll(wait // 1_000_000)
                else:
                    time.sleep(wait / 1e9)
        elif not poll(int(STALL_S * 1000)):
            raise RuntimeError(f"no reply for {STALL_S} s: {received:,} of {n:,} answered")
    return Round((last - start) / 1e9, latency, late, requests.check())


def percentiles_us(values_ns: Sequence[int]) -> dict[str, float | None]:
    """p50 / p99 / p99.9 / max of ``values_ns`` in µs (nearest rank)."""
    if not values_ns:
        return {"p50": None, "p99": None, "p99.9": None, "max": None}
    ordered = sorted(values_ns)
    n = len(ordered)

    def rank(p: float) -> float:
        return round(ordered[max(0, min(n - 1, int(-(-n * p // 100)) - 1))] / 1000, 1)

    return {"p50": rank(50), "p99": rank(99), "p99.9": rank(99.9), "max": round(ordered[-1] / 1000, 1)}


# -- the run ---------------------------------------------------------------------------------------


def print_rows(title: str, columns: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        print(title)
        for row in [columns, *rows]:
            print("  " + "  ".join(f"{cell:>14}" for cell in row))
        return
    table = Table(title=title)
    for i, column in enumerate(columns):
        table.add_column(column, justify="left" if i == 0 else "right")
    for row in rows:
        table.add_row(*row)
    console = Console()
    if not console.is_terminal:
        console = Console(width=160)
    console.print(table)


def ms(us: float | None) -> str:
    return "-" if us is None else f"{us / 1000:.2f}"


def main(argv: list[str] | None = None) -> int:
    parser = arguments(__doc__)
    parser.add_argument("--n", type=at_least_one, default=50_000, help="orders per round (default 50000)")
    parser.add_argument("--window", type=at_least_one, default=256, help="requests in flight at the maximum rate (256)")
    parser.add_argument("--repeat", type=at_least_one, default=5,
                        help="maximum-rate rounds per target; the best counts (5)")
    parser.add_argument("--paced-n", type=at_least_one, default=25_000, help="orders per half-rate round (25000)")
    parser.add_argument("--paced-repeat", type=at_least_one, default=5, help="half-rate rounds per target (5)")
    parser.add_argument("--seed", type=int, default=1, help="workload seed (default 1)")
    parser.add_argument("--quick", action="store_true", help="a smoke run (3000 orders, 1 round), no results file")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (logs, journals)")
    args = parser.parse_args(argv)
    if args.quick:
        args.n, args.paced_n, args.repeat, args.paced_repeat = 3_000, 3_000, 1, 1
    warmup = min(args.n, 3_000)
    stop_on_sigterm()

    before = machine_busy()
    note = noise_note(before, "before the run")
    if note:
        warn(note)
    sample = Workload(args.seed).take(args.n, "r000o")
    kinds = Counter(type(c).__name__ for c in sample)
    print(f"workload: {args.n:,} orders a round over {len(SYMBOLS)} symbols, seed {args.seed}: "
          + ", ".join(f"{k} {v / args.n:.1%}" for k, v in sorted(kinds.items()))
          + f"; window {args.window}, best of {args.repeat}")

    directory = Path(tempfile.mkdtemp(prefix="zmx-bench-orders-"))
    procs = Processes(directory)
    clients: dict[str, Client] = {}
    pids: dict[str, dict[str, int]] = {}  # target -> its processes (paced rounds report their CPU)
    round_no = 0

    workloads: dict[str, Workload] = {}  # one order flow per target, each from the same seed

    def workload(name: str, n: int = args.n) -> list[Command]:
        nonlocal round_no
        round_no += 1
        return workloads[name].take(n, f"r{round_no:03d}o")

    try:
        budget = 900.0
        for count, layout in LAYOUTS.items():
            cluster, topology_path = procs.cluster(f"zmx{count}", layout)
            clients[f"zmx {count}m"] = Client.from_topology(load_topology(topology_path))
            pids[f"zmx {count}m"] = {node.name: node.proc.pid for node in cluster.procs}
        echo1, echo2, echo3, front1, front2 = (f"tcp://127.0.0.1:{p}" for p in free_ports(5))
        procs.helper("echo-loop", "echo", echo1, max_seconds=budget)
        procs.helper("forward", "forward", front1, echo1, max_seconds=budget)
        procs.helper("echo-proxy", "echo", echo2, max_seconds=budget)
        procs.helper("proxy", "proxy", front2, echo2, max_seconds=budget)
        clients["python loop"] = Client([front1])
        pids["python loop"] = {h.name: h.proc.pid for h in procs.helpers if h.name in ("forward", "echo-loop")}
        clients["zmq.proxy"] = Client([front2])
        procs.helper("echo-direct", "echo", echo3, max_seconds=budget)
        clients["client alone"] = Client([echo3])
        for name, client in clients.items():
            await_route(client, SYMBOLS)
            workloads[name] = Workload(args.seed)
        round_max_s = max(60.0, args.n / 1_000)
        progress = Progress(1 + args.repeat * len(clients) + 2 * args.paced_repeat * len(LAYOUTS))
        for name, client in clients.items():  # warm-up: connections, caches, the engines
            replied: Counter[str] = Counter()
            result = pipelined(client, workload(name, warmup), args.window, round_max_s, replied)
            if result.not_ok:
                warn(f"{name}: warm-up replies not ok: {dict(result.not_ok)}")
            if name.startswith("zmx") and set(replied) - {"OrderAccepted", "OrderCanceled"}:
                warn(f"{name}: warm-up replies other than accepted / canceled: {dict(replied)}")
        progress.step("warm-up")

        # 1. maximum rate, rounds in turn
        results: dict[str, list[Round]] = {name: [] for name in clients}

        def max_round(name: str) -> Callable[[], float]:
            def run() -> float:
                commands = workload(name)
                r = pipelined(clients[name], commands, args.window, round_max_s)
                results[name].append(r)
                progress.step(f"{name}: round {len(results[name])}")
                return r.seconds
            return run

        with NoiseWatch(procs) as during_max:
            rounds_s = interleaved(args.repeat, {name: max_round(name) for name in clients})
        note = noise_note(during_max, "during the maximum-rate rounds")
        if note:
            warn(note)

        def best(name: str) -> tuple[float, Round]:
            i = min(range(len(rounds_s[name])), key=rounds_s[name].__getitem__)
            return args.n / rounds_s[name][i], results[name][i]

        # 2. half rate, open loop, zmx and the python loop at the same rate in turn
        fsync_us = fsync_probe(directory)
        print(f"fdatasync on this disk now: p50 {ms(fsync_us['p50'])} ms, p99 {ms(fsync_us['p99'])} ms, "
              f"p99.9 {ms(fsync_us['p99.9'])} ms, max {ms(fsync_us['max'])} ms")
        paced_results: dict[str, dict[str, list[Round]]] = {}
        tick = os.sysconf("SC_CLK_TCK")
        with NoiseWatch(procs) as during_paced:
            for count in LAYOUTS:
                zname = f"zmx {count}m"
                rate = best(zname)[0] / 2
                runs: dict[str, list[Round]] = {zname: [], "python loop": []}
                paced_results[zname] = runs

                def paced_round(name: str, rate: float = rate, runs: dict[str, list[Round]] = runs
                                ) -> Callable[[], float]:
                    def run() -> float:
                        commands = workload(name, args.paced_n)
                        before = {p: cpu_jiffies(pid) for p, pid in pids[name].items()}
                        own = time.process_time()
                        with NoiseWatch(procs) as noise:
                            r = paced(clients[name], commands, rate, round_max_s + args.paced_n / rate)
                        cpu = {p: round((cpu_jiffies(pid) - before[p]) / tick / r.seconds, 2)
                               for p, pid in pids[name].items()}
                        cpu["client"] = round((time.process_time() - own) / r.seconds, 2)
                        runs[name].append(r._replace(cpu=cpu, others=noise.others))
                        progress.step(f"{name}: half-rate round {len(runs[name])}")
                        return r.seconds
                    return run

                interleaved(args.paced_repeat, {name: paced_round(name) for name in runs})
        note = noise_note(during_paced, "during the half-rate rounds")
        if note:
            warn(note)
    finally:
        with shielded():
            for client in clients.values():
                client.close()
            procs.stop_all()
            remove_directory(directory, args.keep)

    # -- figures -----------------------------------------------------------------------------
    loop_rate, _ = best("python loop")
    figures: dict[str, Any] = {
        "orders": args.n,
        "window": args.window,
        "repeat": args.repeat,
        "paced_repeat": args.paced_repeat,
        "paced_orders": args.paced_n,
        "seed": args.seed,
        "symbols": list(SYMBOLS),
        "workload": {k: round(v / args.n, 4) for k, v in sorted(kinds.items())},
        "fsync": "batch",
        "fdatasync_us": fsync_us,
        "zmx": {},
        "ceiling": {},
    }

    def max_figures(name: str) -> dict[str, Any]:
        rate, r = best(name)
        bad = sum((x.not_ok for x in results[name]), Counter())
        return {"per_s": round(rate), "rounds_s": [round(s, 4) for s in rounds_s[name]],
                "ack_us": percentiles_us(r.latency_ns), "not_ok": dict(bad)}

    def median_round(rounds: list[Round]) -> tuple[Round, list[dict[str, Any]]]:
        stats = [percentiles_us(r.latency_ns) for r in rounds]
        order = sorted(range(len(rounds)), key=lambda i: stats[i]["p99"] or 0.0)
        listed = [{"rate": round(args.paced_n / r.seconds), "ack_us": s,
                   "ack_from_schedule_us": percentiles_us(r.late_ns), "cpu_cores": r.cpu,
                   "others_cpus": r.others}
                  for r, s in zip(rounds, stats, strict=True)]
        return rounds[order[len(order) // 2]], listed

    table: list[list[str]] = []
    targets: dict[str, Any] = {"ratio": TARGET_RATIO, "ack_p99_ms_at_half_rate": TARGET_P99_MS}
    met_all = True
    for count in LAYOUTS:
        zname = f"zmx {count}m"
        f = max_figures(zname)
        f["orders_per_s"] = f.pop("per_s")
        f["ratio_to_python_loop"] = round(f["orders_per_s"] / loop_rate, 3)
        f["ratio_rounds"] = [round(loop_s / z_s, 3) for z_s, loop_s in
                             zip(rounds_s[zname], rounds_s["python loop"], strict=True)]
        half = paced_results[zname]
        zr, zlisted = median_round(half[zname])
        lr, llisted = median_round(half["python loop"])
        rate = best(zname)[0] / 2
        f["half_rate"] = {
            "target_rate": round(rate),
            "rate": round(args.paced_n / zr.seconds),
            "ack_us": percentiles_us(zr.latency_ns),
            "ack_from_schedule_us": percentiles_us(zr.late_ns),
            "not_ok": dict(sum((x.not_ok for x in half[zname]), Counter())),
            "rounds": zlisted,
            "python_loop_same_rate": {"ack_us": percentiles_us(lr.latency_ns), "rounds": llisted},
        }
        met_ratio = f["ratio_to_python_loop"] >= TARGET_RATIO
        p99 = f["half_rate"]["ack_us"]["p99"]
        met_p99 = p99 is not None and p99 <= TARGET_P99_MS * 1000
        targets[f"{count}_matcher"] = {"ratio_met": met_ratio, "ack_p99_met": met_p99}
        met_all = met_all and met_ratio and met_p99
        figures["zmx"][f"{count}_matcher"] = f
        a, h, hl = f["ack_us"], f["half_rate"]["ack_us"], f["half_rate"]["python_loop_same_rate"]["ack_us"]
        table.append([f"zmx, {count} matcher{'s' if count > 1 else ''}", f"{f['orders_per_s']:,}",
                      f"{f['ratio_to_python_loop']:.2f}x", ms(a["p50"]), ms(a["p99"]), ms(a["p99.9"]),
                      f"{f['half_rate']['rate']:,}", ms(h["p50"]), ms(h["p99"]), ms(h["p99.9"])])
        table.append(["  python loop at that rate", "", "", "", "", "", f"{round(args.paced_n / lr.seconds):,}",
                      ms(hl["p50"]), ms(hl["p99"]), ms(hl["p99.9"])])
    labels = {"python_loop": "python loop (ceiling)", "zmq_proxy": "zmq.proxy (C reference)",
              "client_alone": "client -> echo, nothing between"}
    for name, key in (("python loop", "python_loop"), ("zmq.proxy", "zmq_proxy"), ("client alone", "client_alone")):
        f = max_figures(name)
        f["round_trips_per_s"] = f.pop("per_s")
        figures["ceiling"][key] = f
        a = f["ack_us"]
        table.append([labels[key],
                      f"{f['round_trips_per_s']:,}", f"{f['round_trips_per_s'] / loop_rate:.2f}x",
                      ms(a["p50"]), ms(a["p99"]), ms(a["p99.9"]), "", "", "", ""])
    targets["met"] = met_all
    figures["targets"] = targets
    figures["noise"] = {"others_cpus_before": before.others, "others_cpus_during_max": during_max.others,
                        "steal_cpus_during_max": during_max.steal, "others_cpus_during_half": during_paced.others,
                        "steal_cpus_during_half": during_paced.steal}
    for name, rounds in results.items():
        bad = sum((r.not_ok for r in rounds), Counter())
        if bad:
            warn(f"{name}: replies that were not ok: {dict(bad)}")

    print_rows(f"orders: {args.n:,} a round, window {args.window}, fsync batch; best of {args.repeat} "
               f"(max), median p99 of {args.paced_repeat} (half rate)",
               ["target", "orders/s", "vs loop", "p50 ms", "p99 ms", "p99.9 ms",
                "half: rate", "p50 ms", "p99 ms", "p99.9 ms"], table)
    for count in LAYOUTS:
        t = targets[f"{count}_matcher"]
        print(f"{count} matcher(s): ratio >= {TARGET_RATIO}x: {t['ratio_met']}; "
              f"ack p99 <= {TARGET_P99_MS:g} ms at half rate: {t['ack_p99_met']}")
    figures["summary"] = summarize("orders", figures)
    if not args.quick:
        path = write_results("orders", figures)
        print(f"wrote {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--role":
        sys.exit(role_main(sys.argv[2:]))
    sys.exit(main())
