"""Soak: minutes of load at about 70% of the capacity measured in the same run; the latency
p99 must stay flat and no process may grow (issue 5).

Real processes on free ports, the topology and logs in a temporary directory, as in
``bench_fanout.py`` (whose pieces this file imports): a router, one matcher that owns ten
symbols (``fsync: never``; a snapshot every ``zmx.topology.SNAPSHOT_EVERY`` commands, as
shipped), a gateway ``g1`` with ``--workers`` processes, and:

- **clients** (``bench_fanout.py --role clients``): ``--client-procs`` raw asyncio processes
  holding ``--n`` WebSocket connections (plus one anchor connection per channel), connection
  ``i`` subscribed to channel ``i % 10``; every connection counts its messages, every 16th
  (a *sampler*) parses each frame and takes the latency ``arrival - data.ts`` (the
  matcher's ``time.time_ns()``; arrival: the kernel's stamp on the segment, see
  ``bench_fanout.StampedSocket``) into a histogram.
- **driver** (``--role driver``, this file): ``zmx.node.client.Client`` to the router, the
  seeded order flow of ``bench_fanout.FanoutFlow`` over the ten symbols (resting orders,
  cancels, ioc orders that trade), generated in chunks of 256 as it goes (memory bounded
  for any length), sent open loop on one fixed schedule (order ``i`` due at ``start + i /
  rate``, never skipped, at most ``MAX_IN_FLIGHT`` unanswered).

Phases:

1. **capacity**: a burst as ``bench_fanout``'s max round (about ``--max-delivered`` messages
   delivered, orders sent as fast as the driver goes, 256 in flight); capacity = delivered
   messages/s the clients saw, from the first to the last feed message.
2. **soak**: orders paced at ``--share`` (0.7) of that capacity (in orders/s: capacity x
   share / subscribers per channel / feed messages per order, both from the burst; at most
   ``--max-rate``) for ``--minutes``. Every ``--interval`` seconds, for that interval only:
   delivered messages/s, latency p50 / p99 / p99.9 (the samplers' histograms, cumulative
   counts subtracted), RSS of the gateway (every process of it, summed), of the matcher and
   of the router, the CPU cores of each (and of the clients, the driver and everything else on
   the machine), orders sent and acknowledged, lost connections and the spread of the
   counts within each channel so far.
3. **end**: the driver stops, the clients' counts settle, and every connection of a channel
   must have the same count since the soak began.

Verdicts (``verdicts`` in the JSON; the first interval is the warm-up and is left out of the
first two): **p99 flat**: the median p99 of the last third of the intervals at most
``P99_RATIO`` (1.5) x that of the first third, and no upward trend: the least-squares line
through the p99s rises by at most ``P99_RISE`` (0.5) x their median over the run (its slope
in ms/min is reported); **RSS flat**, for the gateway, the matcher less its order-id filters
and the router each: the highest RSS of the last third at most ``RSS_GROWTH`` (5%) above the
highest before it, and its
lowest at most 5% above the lowest of the middle third (the means of the first and last
thirds and the slope in KB/min are reported beside). Highs and lows, not means: the matcher
works in cycles (a snapshot every ``SNAPSHOT_EVERY`` commands; while its child stores the
generation's order ids, the parent holds them too), so its RSS goes up and down by a few MB,
and which phase a third ends in would decide a comparison of means. A leak makes new highs
and lifts the lows. The matcher's order-id filters are taken out because they grow by design:
an order id is never reused (DESIGN.md), and the filters in front of the archive of used ids
take 2 bytes an id, allocated a tier at a time (each four times the last; at 3,000 orders/s
the second tier, 5 MB over ten symbols, starts about 6.5 minutes in). The matcher logs the
size of its filters at start and at every new tier; the benchmark reads it from the log at each
interval. The matcher's RSS as measured and the filters' size are reported beside, not judged;
**no connection lost**; **even counts** per channel at the end.

Run: ``.venv/bin/python perf/bench_soak.py`` (2,000 connections, 10 minutes, plus about a
minute to start and measure), ``--minutes 1`` for a short run, ``--quick`` (500 connections,
20 s of soak in 2 s intervals, about 40 s; no results file). Writes
``perf/results/soak.json``; ``zmx bench soak`` (or ``zmx bench plot soak`` later) draws the
plots ``soak_p99.png`` (latency over time) and ``soak_rss.png`` (RSS over time), ``draw`` here.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import re
import select
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import zmq
from _common import (ROOT, Progress, _cpu_jiffies, above_zero, arguments, at_least_one, machine_busy, noise_note,
                     remove_directory, shielded, warn, write_results)
from bench_fanout import (
    CLIENT_SCHED,
    HELPER_MAX_S,
    HZ,
    MAX_PER_PROCESS,
    PRIME_PER_SIDE,
    SAMPLE_EVERY,
    SYMBOLS,
    Clients,
    FanoutFlow,
    Run,
    bucket_us,
    driver_report,
    fmt,
    hist_percentiles,
    jiffies,
    measure_round,
    merge,
    quiesce,
    rss_kb,
    tree,
    write_cluster_topology,
)
from bench_orders import Helper, await_route, pipelined, print_rows, stop_on_sigterm, watchdog
from nodes import free_ports  # tests/nodes.py, on the path through bench_orders
from summaries import summarize

from zmx import codec
from zmx.node.client import encode_header
from zmx.node.runtime import announce_ready
from zmx.topology import SNAPSHOT_EVERY

SCRIPT = Path(__file__).resolve()
K = 10  # channels: one symbol each
CHUNK = 256  # orders the driver generates and encodes at a time
MAX_IN_FLIGHT = 20_000  # unanswered orders at most; the driver waits (and counts it) beyond
STDIN_EVERY_NS = 20_000_000  # the pacing driver looks at its stdin this often
P99_RATIO = 1.5  # last third's median p99 / first third's, at most
P99_RISE = 0.5  # rise of the fitted p99 line over the run / median p99, at most
RSS_GROWTH = 0.05  # last third's mean RSS / first third's - 1, at most
# The matcher is judged less its order-id filters: they grow 2 bytes a new order id by design
# (DESIGN.md: an order_id is never reused), a tier at a time (the second, 5 MB over ten
# symbols, comes about 6.5 minutes into a soak at 3,000 orders/s), and the matcher logs each
# tier it starts.
RSS_CHECKED = ("gateway", "matcher_less_id_filters", "router")
RSS_REPORTED = ("matcher", "matcher_id_filters", "clients", "driver")  # beside them, not judged
FILTERS_RE = re.compile(rb"this matcher's order-id filters hold (\d+) bytes")


def span(minutes: float) -> str:
    """``--minutes`` as a reader takes it: ``20 s`` under a minute, else ``10 min``."""
    return f"{minutes * 60:.0f} s" if minutes < 1 else f"{minutes:.3g} min"


# -- order driver (--role driver) ----------------------------------------------------------------------


class Pacer:
    """The driver's open-loop schedule over as many chunks of the flow as it takes."""

    def __init__(self, client: Any, flow: FanoutFlow, rate: float, k: int, prefix: str) -> None:
        self.client, self.flow, self.rate, self.k, self.prefix = client, flow, rate, k, prefix
        self.sock = client.socket
        self.ids = itertools.count(1 << 60)  # far from pipelined()'s request ids
        self.pending: list[tuple[int, bytes, bytes]] = []
        self.sent_at: dict[int, int] = {}
        self.sent = self.acked = self.waited_full = 0
        self.not_ok: Counter[str] = Counter()
        self.ack_hist: Counter[int] = Counter()  # send -> reply, µs buckets, since the last poll
        self.behind_max = 0  # orders the sender was behind its schedule at most, since the last poll
        self.start = time.perf_counter_ns() + 1_000_000

    def _refill(self) -> None:
        commands = self.flow.take(CHUNK, self.k, self.prefix)
        self.pending = [(rid, encode_header(rid, c.symbol), codec.encode(c))
                        for c, rid in zip(commands, self.ids, strict=False)]
        self.pending.reverse()

    def send_due(self, now: int, halted: bool) -> int:
        """Send what is due; the time the next order is due."""
        due = int((now - self.start) * self.rate / 1e9) + 1
        if halted:
            return now + 1_000_000_000
        while self.sent < due:
            if len(self.sent_at) >= MAX_IN_FLIGHT:
                self.waited_full += 1
                break
            if not self.pending:
                self._refill()
            rid, header, body = self.pending.pop()
            try:
                self.sock.send_multipart((header, body), zmq.NOBLOCK)
            except zmq.Again:
                self.pending.append((rid, header, body))
                self.waited_full += 1
                break
            self.sent_at[rid] = time.perf_counter_ns()
            self.sent += 1
        self.behind_max = max(self.behind_max, due - self.sent)
        return self.start + int(self.sent * 1e9 / self.rate)

    def take_replies(self) -> None:
        sock = self.sock
        while True:
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            if len(frames) != 3 or len(frames[0]) < 9:
                self.not_ok["stray reply"] += 1
                continue
            sent = self.sent_at.pop(int.from_bytes(frames[0][1:9], "big"), None)
            if sent is None:
                self.not_ok["stray reply"] += 1
                continue
            self.acked += 1
            self.ack_hist[bucket_us((time.perf_counter_ns() - sent) // 1000)] += 1
            if frames[1] != b"ok":
                self.not_ok[frames[1].decode(errors="replace")[:40]] += 1

    def report(self) -> dict[str, Any]:
        out = {"sent": self.sent, "acked": self.acked, "in_flight": len(self.sent_at),
               "not_ok": dict(self.not_ok), "waited_full": self.waited_full,
               "behind_max_s": round(self.behind_max / self.rate, 3), "ack_ms": hist_percentiles(self.ack_hist)}
        self.ack_hist = Counter()
        self.behind_max = 0
        return out


def _stdin_lines(buffer: bytearray) -> list[str]:
    """Whole lines waiting on stdin, without blocking (b"" read: the benchmark is gone -> quit)."""
    if not select.select([0], [], [], 0)[0]:
        return []
    chunk = os.read(0, 65536)
    if not chunk:
        return ["quit"]
    buffer += chunk
    lines = []
    while b"\n" in buffer:
        line, _, rest = bytes(buffer).partition(b"\n")
        buffer[:] = rest
        lines.append(line.decode().strip())
    return lines


def pace(client: Any, flow: FanoutFlow, rate: float, k: int, prefix: str, buffer: bytearray) -> bool:
    """Pace until ``halt`` (then wait up to 10 s for the last replies) or ``quit`` (False)."""
    pacer = Pacer(client, flow, rate, k, prefix)
    clock = time.perf_counter_ns
    next_stdin = 0
    halted_at = 0
    print(json.dumps({"ok": True, "rate": rate}), flush=True)
    while True:
        now = clock()
        next_due = pacer.send_due(now, halted_at > 0)
        pacer.take_replies()
        now = clock()
        if now >= next_stdin:
            next_stdin = now + STDIN_EVERY_NS
            for line in _stdin_lines(buffer):
                if line == "poll":
                    print(json.dumps(pacer.report()), flush=True)
                elif line == "halt":
                    halted_at = now
                elif line == "quit":
                    return False
        if halted_at and (not pacer.sent_at or now - halted_at > 10_000_000_000):
            final = pacer.report()
            final["seconds"] = round((halted_at - pacer.start) / 1e9, 3)
            final["orders_per_s"] = round(pacer.sent / final["seconds"]) if final["seconds"] > 0 else None
            print(json.dumps(final), flush=True)
            return True
        wait = min(next_due, next_stdin) - clock()
        if wait >= 1_000_000:
            pacer.sock.poll(wait // 1_000_000)  # a reply wakes it up
        elif wait > 50_000:
            time.sleep((wait - 20_000) / 1e9)


def role_driver(front: str, seed: int) -> None:
    from zmx.node.client import Client

    client = Client([front])
    try:
        await_route(client, SYMBOLS)
        flow = FanoutFlow(seed, SYMBOLS)
        primed = pipelined(client, flow.prime(PRIME_PER_SIDE), 256, 60.0)
        announce_ready("driver", "driver", primed=len(SYMBOLS) * 2 * PRIME_PER_SIDE, not_ok=dict(primed.not_ok))
        buffer = bytearray()
        for rounds in itertools.count(1):
            lines = _stdin_lines(buffer)
            if not lines:
                select.select([0], [], [], 1.0)
                continue
            for line in lines:
                words = line.split()
                if not words:
                    continue
                if words[0] == "quit":
                    return
                if words[0] == "pace":  # pace RATE K: until "halt"
                    if not pace(client, flow, float(words[1]), int(words[2]), f"s{rounds}o", buffer):
                        return
                elif words[0] == "burst":  # burst COUNT K
                    commands = flow.take(int(words[1]), int(words[2]), f"b{rounds}o")
                    r = pipelined(client, commands, 256, 120.0)
                    print(driver_report(commands, r), flush=True)
    finally:
        client.close()


def role_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="bench_soak.py --role")
    parser.add_argument("role", choices=("driver",))
    parser.add_argument("--front", required=True)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--max-seconds", type=float, default=HELPER_MAX_S)
    args = parser.parse_args(argv)
    watchdog(args.max_seconds)
    role_driver(args.front, args.seed)
    return 0


# -- figures over the intervals ----------------------------------------------------------------------------


def slope_per_min(points: list[tuple[float, float]]) -> float | None:
    """Least-squares slope of (minutes, value) points, per minute; None with fewer than 2."""
    if len(points) < 2:
        return None
    mx = sum(x for x, _ in points) / len(points)
    my = sum(y for _, y in points) / len(points)
    sxx = sum((x - mx) ** 2 for x, _ in points)
    if sxx == 0:
        return None
    return sum((x - mx) * (y - my) for x, y in points) / sxx


def thirds(values: list[Any]) -> tuple[list[Any], list[Any]]:
    """The first and the last third of ``values`` (at least one each)."""
    t = max(1, len(values) // 3)
    return values[:t], values[-t:]


def verdict_p99(steady: list[dict[str, Any]]) -> dict[str, Any]:
    points = [(s["t_min"], s["latency_ms"]["p99"]) for s in steady if s["latency_ms"]["p99"] is not None]
    out: dict[str, Any] = {"criteria": f"median p99 of the last third <= {P99_RATIO}x the first third's, and the "
                                       f"least-squares line rises <= {P99_RISE}x the median p99 over the run",
                           "intervals": len(points)}
    if len(points) < 2:
        return {**out, "met": None, "why": "fewer than two intervals with latency samples"}
    first, last = thirds([p for _, p in points])
    m_first, m_last, m_all = statistics.median(first), statistics.median(last), statistics.median(p for _, p in points)
    slope = slope_per_min(points) or 0.0
    span = points[-1][0] - points[0][0]
    rise = slope * span
    ratio = m_last / m_first if m_first > 0 else (1.0 if m_last == 0 else math.inf)
    out.update({"first_third_median_ms": m_first, "last_third_median_ms": m_last, "median_ms": m_all,
                "ratio_last_to_first": round(ratio, 3), "slope_ms_per_min": round(slope, 3),
                "rise_over_run_ms": round(rise, 2), "ratio_met": ratio <= P99_RATIO,
                "trend_met": rise <= P99_RISE * m_all})
    out["met"] = out["ratio_met"] and out["trend_met"]
    return out


def verdict_rss(steady: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {"criteria": f"per process group, the highest RSS of the last third <= {1 + RSS_GROWTH:g}x "
                                       "the highest before it, and its lowest <= "
                                       f"{1 + RSS_GROWTH:g}x the middle third's lowest (the first interval left out "
                                       "as warm-up); the means of the first and last thirds are reported beside"}
    met: bool | None = True
    for group in (*RSS_CHECKED, *RSS_REPORTED):
        points = [(s["t_min"], s["rss_kb"][group]) for s in steady if s["rss_kb"].get(group) is not None]
        if len(points) < 3:
            out[group] = {"met": None}
            met = None
            continue
        values = [v for _, v in points]
        first, last = thirds(values)
        t = len(last)
        before, middle = values[:-t], values[t:-t] or values[:-t]
        a, b = sum(first) / len(first), sum(last) / len(last)
        growth = b / a - 1 if a else 0.0
        high_growth = max(last) / max(before) - 1 if max(before) else 0.0
        low_growth = min(last) / min(middle) - 1 if min(middle) else 0.0
        entry = {"first_third_mean_kb": round(a), "last_third_mean_kb": round(b), "growth": round(growth, 4),
                 "high_before_kb": max(before), "high_last_kb": max(last), "high_growth": round(high_growth, 4),
                 "low_middle_kb": min(middle), "low_last_kb": min(last), "low_growth": round(low_growth, 4),
                 "slope_kb_per_min": round(slope_per_min(points) or 0.0, 1),
                 "min_kb": min(values), "max_kb": max(values)}
        if group in RSS_CHECKED:
            entry["met"] = high_growth <= RSS_GROWTH and low_growth <= RSS_GROWTH
            if met is not None:
                met = met and entry["met"]
        out[group] = entry
    out["met"] = met
    return out


# -- the run -------------------------------------------------------------------------------------------------


class Soak:
    def __init__(self, args: argparse.Namespace, run: Run, progress: Progress) -> None:
        self.args, self.run, self.progress = args, run, progress
        self.intervals: list[dict[str, Any]] = []
        self.matcher_log_read = 0  # bytes of the matcher's log read so far
        self.matcher_filters: int | None = None  # bytes of its order-id filters, as it last logged

    def start(self) -> None:
        args, run = self.args, self.run
        ports = dict(zip(("front", "back", "pub", "snapshot"), free_ports(4), strict=True))
        self.port = free_ports(1)[0]
        # the matcher snapshots as shipped: its memory over the soak includes its snapshots'
        # forks and the order ids they move to the archive (zmx.node.usedids)
        topo = write_cluster_topology(run.directory / "cluster.yaml", ports, self.port, args.workers,
                                      snapshot_every=SNAPSHOT_EVERY)
        self.matcher = run.node(topo, "m1")
        self.router = run.node(topo, "r1")
        run.serial += 1
        self.driver = Helper(SCRIPT, f"driver-{run.serial}", ["driver", "--front", f"tcp://127.0.0.1:{ports['front']}",
                                                              "--seed", str(args.seed), "--max-seconds",
                                                              str(HELPER_MAX_S)], run.directory)
        run.helpers.append(self.driver)
        while not self.driver.line(60.0).startswith("READY "):
            pass
        self.gateway = run.node(topo, "g1", timeout=60.0)
        self.progress.step("cluster up")
        procs = max(args.client_procs, math.ceil(args.n / MAX_PER_PROCESS))
        self.clients = Clients(run, self.port, args.n, K, procs, args.sources, args.clients_sched)
        t0 = time.perf_counter()
        self.clients.anchor()
        self.clients.load()
        self.connect_s = round(time.perf_counter() - t0, 2)
        self.progress.step("connected")

    def rss(self, groups: dict[str, list[int]]) -> dict[str, int | None]:
        """RSS (KB) of each group, and the matcher's less its order-id filters, whose size
        the matcher logs each time it changes (read from its log as it grows)."""
        out: dict[str, int | None] = {g: rss_kb(p) for g, p in groups.items()}
        with open(self.matcher.log_path, "rb") as log:
            log.seek(self.matcher_log_read)
            text = log.read()
        self.matcher_log_read += len(text)
        if found := FILTERS_RE.findall(text):
            self.matcher_filters = int(found[-1])
        filters = self.matcher_filters
        out["matcher_id_filters"] = None if filters is None else filters // 1024
        out["matcher_less_id_filters"] = None if filters is None or out["matcher"] is None \
            else out["matcher"] - filters // 1024
        return out

    def groups(self) -> dict[str, list[int]]:
        return {"gateway": tree(self.gateway.proc.pid), "matcher": [self.matcher.proc.pid],
                "router": [self.router.proc.pid], "clients": self.clients.pids(), "driver": [self.driver.proc.pid]}

    def capacity(self) -> dict[str, Any]:
        args = self.args
        subscribers = (args.n + K) / K
        orders = int(min(20_000, max(100, args.max_delivered / subscribers / 1.3)))

        def burst() -> dict[str, Any]:
            self.driver.write(f"burst {orders} {K}")
            return json.loads(self.driver.line(200.0))

        named = {g: p for g, p in self.groups().items() if g in ("driver", "matcher", "router")}
        r = measure_round(self.run, self.clients, tree(self.gateway.proc.pid), burst, named)
        r.pop("_examples", None)
        per_order = r["feed_messages"] / r["driver"]["orders"] if r["feed_messages"] else 1.3
        r["feed_messages_per_order"] = round(per_order, 3)
        r["subscribers_per_channel"] = subscribers
        self.progress.step("capacity")
        return r

    def soak(self, rate: float) -> dict[str, Any]:
        args, clients = self.args, self.clients
        clients.ask("start")  # every count and histogram from zero: the soak's own
        self.driver.write(f"pace {rate:.3f} {K}")
        json.loads(self.driver.line(30.0))
        n_intervals = max(1, round(args.minutes * 60 / args.interval))
        groups = self.groups()
        ours_pids = sorted({p for pids in groups.values() for p in pids} | {os.getpid()})
        prev = {"cpu": {g: jiffies(p) for g, p in groups.items()}, "ours": jiffies(ours_pids),
                "machine": _cpu_jiffies(), "total": 0, "hist": Counter(), "sent": 0, "acked": 0}
        t_start = last = time.monotonic()
        print(f"  soak: {rate:,.0f} orders/s for {span(args.minutes)}, a row every {args.interval:g} s", flush=True)
        heads = ("minute", "orders/s", "deliv/s", "p50 ms", "p99 ms", "p99.9 ms", "gw MB", "match MB", "route MB",
                 "gw cores", "others", "lost", "spread")
        print("  " + "  ".join(f"{h:>10}" for h in heads), flush=True)
        for i in range(1, n_intervals + 1):
            time.sleep(max(0.0, t_start + i * args.interval - time.monotonic()))
            got = merge(clients.ask("stop"))  # cumulative since "start"; nothing is reset
            self.driver.write("poll")
            driver = json.loads(self.driver.line(30.0))
            now = time.monotonic()
            groups = self.groups()  # the gateway's processes, should one be replaced
            cpu = {g: jiffies(p) for g, p in groups.items()}
            ours_pids = sorted({p for pids in groups.values() for p in pids} | {os.getpid()})
            ours, machine = jiffies(ours_pids), _cpu_jiffies()
            wall = now - last
            hist = Counter({int(k): v for k, v in got["hist"].items()})
            others = None
            if machine and prev["machine"]:
                busy = (machine[0] - prev["machine"][0]) - (ours - prev["ours"])
                others = round(max(0.0, busy / HZ / wall), 2)
            spreads = [hi - lo for _, lo, hi, _ in got["channels"].values()]
            entry = {
                "interval": i, "t_min": round((now - t_start) / 60, 3), "seconds": round(wall, 2),
                "orders_per_s": round((driver["sent"] - prev["sent"]) / wall),
                "acked_per_s": round((driver["acked"] - prev["acked"]) / wall),
                "driver_behind_max_s": driver["behind_max_s"], "orders_in_flight": driver["in_flight"],
                "ack_ms": driver["ack_ms"],
                "delivered": got["total"] - prev["total"],
                "delivered_per_s": round((got["total"] - prev["total"]) / wall),
                "latency_ms": hist_percentiles(hist - prev["hist"]),
                "rss_kb": self.rss(groups),
                "gateway_processes": len(groups["gateway"]),
                "cpu_cores": {**{g: round((cpu[g] - prev["cpu"].get(g, cpu[g])) / HZ / wall, 2) for g in groups},
                              "others": others},
                "loadavg_1m": round(os.getloadavg()[0], 2),
                "lost_connections": got["lost"], "open_connections": got["open"],
                "spread_max": max(spreads) if spreads else None,
                "prev_seq_breaks": got["prev_seq_breaks"], "errors": dict(got["errors"]),
                "not_ok_orders": sum(driver["not_ok"].values()),
            }
            self.intervals.append(entry)
            prev = {"cpu": cpu, "ours": ours, "machine": machine, "total": got["total"], "hist": hist,
                    "sent": driver["sent"], "acked": driver["acked"]}
            last = now
            print_interval(entry)
            self.progress.step(f"minute {entry['t_min']:.1f} of {span(args.minutes)}, "
                               f"p99 {fmt(entry['latency_ms']['p99'], '.1f')} ms")
        # the end: orders stop, the counts settle, every connection of a channel must have the same count
        self.driver.write("halt")
        driver_final = json.loads(self.driver.line(60.0))
        drained = quiesce(clients)
        got = merge(clients.ask("stop"))
        uneven = {ch: {"total": v[0], "min": v[1], "max": v[2], "connections": v[3]}
                  for ch, v in got["channels"].items() if v[1] != v[2]}
        whole = Counter({int(k): v for k, v in got["hist"].items()})
        return {"orders_per_s_planned": round(rate, 1), "driver": driver_final, "drained": drained,
                "delivered": got["total"], "heartbeats": got["heartbeats"], "latency_ms": hist_percentiles(whole),
                "types_sampled": dict(got["types"]), "errors": dict(got["errors"]),
                "prev_seq_breaks": got["prev_seq_breaks"], "lost_connections": got["lost"],
                "open_connections": got["open"], "connections_expected": self.args.n + K,
                "uneven_channels": len(uneven), "uneven": uneven,
                "channels": {ch: {"total": v[0], "min": v[1], "max": v[2], "connections": v[3]}
                             for ch, v in sorted(got["channels"].items())}}


def print_interval(e: dict[str, Any]) -> None:
    lat, rss, cpu = e["latency_ms"], e["rss_kb"], e["cpu_cores"]
    cells = [f"{e['t_min']:.2f}", f"{e['orders_per_s']:,}", f"{e['delivered_per_s']:,}", fmt(lat["p50"], ".1f"),
             fmt(lat["p99"], ".1f"), fmt(lat["p99.9"], ".1f"), f"{rss['gateway'] / 1024:.1f}",
             f"{rss['matcher'] / 1024:.1f}", f"{rss['router'] / 1024:.1f}", fmt(cpu["gateway"], ".2f"),
             fmt(cpu["others"], ".2f"), str(e["lost_connections"]), fmt(e["spread_max"])]
    print("  " + "  ".join(f"{c:>10}" for c in cells), flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = arguments(__doc__)
    parser.add_argument("--n", type=at_least_one, default=None, help="load connections (2000; 500 with --quick)")
    parser.add_argument("--workers", type=at_least_one, default=2, help="gateway worker processes (2)")
    parser.add_argument("--minutes", type=above_zero, default=None, help="length of the soak (10; 1/3 with --quick)")
    parser.add_argument("--interval", type=above_zero, default=None, help="seconds a row covers (10; 2 with --quick)")
    parser.add_argument("--share", type=above_zero, default=0.7, help="soak rate as a share of the capacity (0.7)")
    parser.add_argument("--rate", type=above_zero, default=None,
                        help="orders/s of the soak, instead of --share of the measured capacity")
    parser.add_argument("--max-rate", type=above_zero, default=5_000.0, help="orders/s of the soak at most (5000)")
    parser.add_argument("--max-delivered", type=at_least_one, default=None,
                        help="messages delivered in the capacity burst, about (3000000; 300000 with --quick)")
    parser.add_argument("--client-procs", type=at_least_one, default=2, help="client processes, at least (2)")
    parser.add_argument("--sources", type=at_least_one, default=4, help="loopback source addresses 127.0.0.2... (4)")
    parser.add_argument("--clients-sched", choices=CLIENT_SCHED, default="normal",
                        help="scheduling policy of the client processes, as in bench_fanout.py (normal: the "
                             "soak's verdicts compare the run with itself, and its committed runs used it)")
    parser.add_argument("--seed", type=int, default=1, help="seed of the order flow (1)")
    parser.add_argument("--quick", action="store_true", help="smoke run: N = 500, 20 s of soak, no results file")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (logs)")
    parser.add_argument("--json", type=Path, help="also write the figures here (smoke runs too)")
    args = parser.parse_args(argv)
    if args.quick:
        args.n = args.n or 500
        args.minutes = args.minutes or 1 / 3
        args.interval = args.interval or 2.0
        args.max_delivered = args.max_delivered or 300_000
    args.n = args.n or 2_000
    args.minutes = args.minutes or 10.0
    args.interval = args.interval or 10.0
    args.max_delivered = args.max_delivered or 3_000_000
    if args.minutes * 60 + 600 > HELPER_MAX_S:
        parser.error(f"--minutes: at most {(HELPER_MAX_S - 600) // 60} (the helpers end by themselves after "
                     f"{HELPER_MAX_S} s)")
    if args.interval < 1 or args.minutes * 60 / args.interval < 3:
        parser.error("--interval: at least 1 s, and at least 3 intervals in --minutes")
    if args.n / args.client_procs > MAX_PER_PROCESS * 2:
        parser.error("too many connections per client process")
    stop_on_sigterm()
    n_intervals = max(1, round(args.minutes * 60 / args.interval))
    progress = Progress(4 + n_intervals)
    before = machine_busy()
    note = noise_note(before, "before the run")
    if note:
        warn(note)
    load_before = [round(x, 2) for x in os.getloadavg()]
    print(f"soak: {args.n:,} connections x {K} channels, gateway {args.workers} workers, matcher fsync: never; "
          f"{span(args.minutes)} at {args.share:g} of the capacity (a burst of about {args.max_delivered:,} "
          f"deliveries first), a row every {args.interval:g} s", flush=True)
    directory = Path(tempfile.mkdtemp(prefix="zmx-bench-soak-"))
    run = Run(directory)
    figures: dict[str, Any] = {}
    failure = None
    started = time.monotonic()
    bench = Soak(args, run, progress)
    try:
        bench.start()
        figures["connect_s"] = bench.connect_s
        print(f"  {args.n + K:,} connections subscribed ({args.n:,} and an anchor on each of the {K} channels) in "
              f"{bench.connect_s} s; capacity burst ...", flush=True)
        cap = figures["capacity"] = bench.capacity()
        per_order, subscribers = cap["feed_messages_per_order"], cap["subscribers_per_channel"]
        if args.rate is not None:
            rate = args.rate
        else:
            rate = args.share * (cap["delivered_per_s"] or 0) / subscribers / max(per_order, 0.5)
        if rate > args.max_rate:
            warn(f"{rate:,.0f} orders/s capped at --max-rate {args.max_rate:,.0f}")
        rate = max(1.0, min(rate, args.max_rate))
        planned = rate * per_order * subscribers
        figures["rate"] = {"orders_per_s": round(rate, 1), "delivered_per_s_planned": round(planned),
                           "share_of_capacity": round(planned / cap["delivered_per_s"], 3)
                           if cap["delivered_per_s"] else None, "given": args.rate is not None}
        print(f"    capacity {fmt(cap['delivered_per_s'])} delivered/s (burst of {cap['driver']['orders']:,} orders, "
              f"{per_order:.2f} feed messages an order, p99 {fmt(cap['latency_ms']['p99'], '.0f')} ms); soak at "
              f"{rate:,.0f} orders/s = {figures['rate']['delivered_per_s_planned']:,} delivered/s planned", flush=True)
        figures["end"] = bench.soak(rate)
    except (Exception, KeyboardInterrupt, SystemExit) as e:  # noqa: BLE001 - report what was measured
        failure = f"{type(e).__name__}: {e}"
        warn(failure[:3000])
    finally:
        with shielded():
            run.stop_all()
            progress.step("stopped")
            remove_directory(directory, args.keep)
    figures["intervals"] = bench.intervals
    figures["loadavg_before"] = load_before
    figures["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
    figures["noise_before"] = {"others_cpus": before.others, "steal_cpus": before.steal}
    figures["elapsed_s"] = round(time.monotonic() - started)
    return report(args, figures, failure)


def report(args: argparse.Namespace, f: dict[str, Any], failure: str | None) -> int:
    intervals = f["intervals"]
    steady = intervals[1:]  # the first interval is the warm-up
    end = f.get("end", {})
    lost = end.get("lost_connections")
    open_ = end.get("open_connections")
    v: dict[str, Any] = {
        "warmup_intervals": 1,
        "p99_flat": verdict_p99(steady),
        "rss_flat": verdict_rss(steady),
        "no_connection_lost": {"lost": lost, "open_at_end": open_, "expected": args.n + K,
                               "met": None if lost is None else lost == 0 and open_ == args.n + K},
        "even_counts": {"uneven_channels": end.get("uneven_channels"), "drained": end.get("drained"),
                        "met": None if not end else end["uneven_channels"] == 0 and end["drained"]},
    }
    planned = f.get("rate", {}).get("delivered_per_s_planned")
    sent = end.get("driver", {}).get("sent")
    if end.get("channels") and sent:  # the soak's own feed messages per order (the burst's differ a little)
        feed = sum(ch["max"] for ch in end["channels"].values())
        planned = round(f["rate"]["orders_per_s"] * feed / sent * (args.n + K) / K)
    kept = [e["delivered_per_s"] for e in steady]
    share_kept = round(sum(kept) / len(kept) / planned, 3) if kept and planned else None
    v["kept_up"] = {"delivered_per_s_mean": round(sum(kept) / len(kept)) if kept else None,
                    "delivered_per_s_due": planned, "share": share_kept,
                    "note": "not judged: delivered/s over what the orders sent made due (their feed messages x "
                            "subscribers); below about 0.95 the paced rate is beyond what the gateway sustains, "
                            "and a growing backlog (latency, send queues) is expected"}
    if share_kept is not None and share_kept < 0.95:
        warn(f"delivered {share_kept:.2f}x of the planned rate: the soak rate is beyond what this machine sustains "
             "(the burst overstates the capacity, or other load took CPU); backlog growth is then expected")
    others = [e["cpu_cores"]["others"] for e in intervals if e["cpu_cores"]["others"] is not None]
    v["noise"] = {"others_cpus_mean": round(sum(others) / len(others), 2) if others else None,
                  "others_cpus_max": max(others) if others else None}
    if others and v["noise"]["others_cpus_mean"] > 0.5:
        warn(f"other processes kept {v['noise']['others_cpus_mean']} CPUs busy on average during the soak: "
             "its figures are suspect; re-run when the machine is idle")
    judged = ("p99_flat", "rss_flat", "no_connection_lost", "even_counts")
    v["met"] = failure is None and all(v[k]["met"] for k in judged)
    f["verdicts"] = v
    f["config"] = {"connections": args.n, "channels": K, "workers": args.workers, "minutes": args.minutes,
                   "interval_s": args.interval, "share": args.share, "rate_given": args.rate,
                   "max_rate": args.max_rate, "max_delivered": args.max_delivered,
                   "client_procs": max(args.client_procs, math.ceil(args.n / MAX_PER_PROCESS)),
                   "sources": args.sources, "clients_sched": args.clients_sched, "sample_every": SAMPLE_EVERY,
                   "seed": args.seed,
                   "matcher_fsync": "never", "matcher_snapshot_every": SNAPSHOT_EVERY, "gateway_limits": "defaults",
                   "quick": args.quick}
    if failure:
        f["failure"] = failure
    p, r = v["p99_flat"], v["rss_flat"]

    def rss_cell(group: str) -> str:
        g = r.get(group, {})
        if "high_growth" not in g:
            return "-"
        return (f"highs {g['high_before_kb'] / 1024:.1f} -> {g['high_last_kb'] / 1024:.1f} MB "
                f"({g['high_growth'] * 100:+.1f}%), lows {g['low_middle_kb'] / 1024:.1f} -> "
                f"{g['low_last_kb'] / 1024:.1f} MB ({g['low_growth'] * 100:+.1f}%); means "
                f"{g['first_third_mean_kb'] / 1024:.1f} -> {g['last_third_mean_kb'] / 1024:.1f} MB")

    rows = [
        ["p99 flat", f"{fmt(p.get('first_third_median_ms'), '.1f')} -> {fmt(p.get('last_third_median_ms'), '.1f')} ms "
         f"({fmt(p.get('ratio_last_to_first'), '.2f')}x), slope {fmt(p.get('slope_ms_per_min'), '+.2f')} ms/min",
         f"<= {P99_RATIO}x, rise <= {P99_RISE}x median", str(p["met"])],
        *[[f"RSS {g}", rss_cell(g), f"<= +{RSS_GROWTH:.0%}", str(r.get(g, {}).get("met"))] for g in RSS_CHECKED],
        *[[f"RSS {g} (not judged)", rss_cell(g), "", ""] for g in RSS_REPORTED],
        ["connections lost", f"{fmt(lost)} (open at the end {fmt(open_)} of {args.n + K:,})", "0",
         str(v["no_connection_lost"]["met"])],
        ["channels with uneven counts", f"{fmt(end.get('uneven_channels'))} (drained: {end.get('drained')})", "0",
         str(v["even_counts"]["met"])],
        ["whole soak: delivered, latency", f"{fmt(end.get('delivered'))}, p50 / p99 / p99.9 "
         f"{fmt(end.get('latency_ms', {}).get('p50'), '.1f')} / {fmt(end.get('latency_ms', {}).get('p99'), '.1f')} / "
         f"{fmt(end.get('latency_ms', {}).get('p99.9'), '.1f')} ms", "", ""],
        ["delivered / planned (not judged)", f"{fmt(v['kept_up']['delivered_per_s_mean'])} / {fmt(planned)} /s "
         f"({fmt(share_kept, '.2f')}x)", ">= 0.95x", ""],
        ["seq breaks, client errors, orders not ok", f"{fmt(end.get('prev_seq_breaks'))}, {end.get('errors')}, "
         f"{sum(end.get('driver', {}).get('not_ok', {}).values()) if end else '-'}", "", ""],
    ]
    print_rows(f"soak: {args.n:,} connections, {span(args.minutes)} at "
               f"{fmt(f.get('rate', {}).get('orders_per_s'))} orders/s", ["verdict", "measured", "wanted", "met"],
               rows)
    if failure:
        print(f"FAILED: {failure[:500]}")
    print(f"took {f['elapsed_s']} s; load average before {f['loadavg_before']}, after {f['loadavg_after']}; "
          f"others {v['noise']['others_cpus_mean']} CPUs on average")
    f["summary"] = summarize("soak", f)
    if args.json:
        args.json.write_text(json.dumps({"benchmark": "soak", **f}, indent=2) + "\n")
    if not args.quick and failure is None:
        path = write_results("soak", f)
        print(f"wrote {path.relative_to(ROOT)}")
    return 0 if failure is None else 1


# -- plots ---------------------------------------------------------------------------------------------------


def draw(results: Path) -> list[Path]:
    """``NAME_p99.png`` (latency and delivered/s over time) and ``NAME_rss.png`` (RSS over time)
    beside ``results`` (``plots.py`` calls it)."""
    from matplotlib.figure import Figure
    from plots import _save

    f = json.loads(results.read_text(encoding="utf-8"))
    intervals = f["intervals"]
    if not intervals:
        return []
    cfg = f["config"]
    title = (f"soak: {cfg['connections']:,} connections x {cfg['channels']} channels, {cfg['workers']} workers, "
             f"{f.get('rate', {}).get('orders_per_s', 0):,.0f} orders/s\n({f.get('timestamp', 'now')})")
    xs = [e["t_min"] for e in intervals]
    warm = intervals[0]["t_min"]
    written = []

    fig = Figure(figsize=(7.0, 4.2), dpi=90, layout="constrained")
    ax = fig.add_subplot()
    for key, style in (("p50", ":"), ("p99", "-"), ("p99.9", "--")):
        ys = [e["latency_ms"][key] for e in intervals]
        ax.plot(xs, [math.nan if y is None else y for y in ys], linestyle=style, marker="o", markersize=3,
                label=f"latency {key}")
    p = f["verdicts"]["p99_flat"]
    if p.get("slope_ms_per_min") is not None and len(intervals) > 2:
        pts = [(e["t_min"], e["latency_ms"]["p99"]) for e in intervals[1:] if e["latency_ms"]["p99"] is not None]
        mx, my = sum(x for x, _ in pts) / len(pts), sum(y for _, y in pts) / len(pts)
        s = p["slope_ms_per_min"]
        ax.plot([pts[0][0], pts[-1][0]], [my + s * (pts[0][0] - mx), my + s * (pts[-1][0] - mx)], color="grey",
                linewidth=0.8, label=f"p99 trend {s:+.2f} ms/min")
    ax.axvspan(0, warm, color="grey", alpha=0.12, label="warm-up (not judged)")
    ax.set_xlabel("minutes into the soak")
    ax.set_ylabel("receive - matcher ts (ms)")
    ax.set_ylim(bottom=0)
    ax.grid(True, linewidth=0.3)
    b = ax.twinx()
    b.plot(xs, [e["delivered_per_s"] for e in intervals], color="C4", linewidth=0.8, alpha=0.6,
           label="delivered messages/s")
    b.set_ylabel("delivered messages/s (purple)")
    b.set_ylim(bottom=0)
    lines, labels = ax.get_legend_handles_labels()
    lines2, labels2 = b.get_legend_handles_labels()
    ax.legend(lines + lines2, labels + labels2, fontsize=7, loc="upper left")
    ax.set_title(title, fontsize=9)
    path = results.with_name(f"{results.stem}_p99.png")
    _save(fig, path)
    written.append(path)

    fig = Figure(figsize=(7.0, 8.0), dpi=90, layout="constrained")
    r = f["verdicts"]["rss_flat"]

    def mb(group: str) -> list[float]:
        return [math.nan if e["rss_kb"].get(group) is None else e["rss_kb"][group] / 1024 for e in intervals]

    names = {"matcher_less_id_filters": "matcher RSS less its order-id filters"}
    for i, group in enumerate(RSS_CHECKED):
        ax = fig.add_subplot(len(RSS_CHECKED), 1, i + 1)
        ys = mb(group)
        g = r.get(group, {})
        label = names.get(group, f"{group} RSS")
        if "high_growth" in g:
            label += (f" (last third: highs {g['high_growth'] * 100:+.1f}%, lows {g['low_growth'] * 100:+.1f}%; "
                      f"{g['slope_kb_per_min']:+,.0f} KB/min)")
        ax.plot(xs, ys, marker="o", markersize=3, label=label)
        lo, hi = min(ys), max(ys)
        if group == "matcher_less_id_filters":  # what it was judged less of, and the whole
            whole = mb("matcher")
            ax.plot(xs, whole, color="grey", linewidth=0.8, label="matcher RSS as measured (not judged)")
            ax.plot(xs, mb("matcher_id_filters"), color="C1", linewidth=0.8,
                    label="its order-id filters (2 bytes an id, by design)")
            lo, hi = 0.0, max(hi, *whole)
        if "high_before_kb" in g:
            base = g["high_before_kb"] / 1024
            ax.axhspan(base, base * (1 + RSS_GROWTH), color="C2", alpha=0.12,
                       label=f"the highest before the last third .. +{RSS_GROWTH:.0%}")
        ax.axvspan(0, warm, color="grey", alpha=0.12)
        ax.set_ylabel("MB")
        ax.set_ylim(max(0.0, lo - 0.1 * hi), hi * 1.12)
        ax.grid(True, linewidth=0.3)
        ax.legend(fontsize=7, loc="lower right")
        if i == 0:
            ax.set_title(title, fontsize=9)
    ax.set_xlabel("minutes into the soak")
    path = results.with_name(f"{results.stem}_rss.png")
    _save(fig, path)
    written.append(path)
    return written


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--role":
        sys.exit(role_main(sys.argv[2:]))
    sys.exit(main())
