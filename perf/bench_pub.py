"""Publications a matcher sends and a probe receives, with 1, 10 and 100 symbols, beside the
probe's own ceiling, measured in the same run.

For each symbol count K, real processes on free ports (a topology in a temporary directory,
``fsync: batch``): a router and one matcher that owns K symbols. The feed is driven by
pipelined orders through the router (``zmx.node.client.Client``, ``--window`` in flight), the
workload of ``bench_orders.py`` spread round-robin over the K symbols: gtc limit orders that
rest and cancels of resting orders, so every command changes its book once and the matcher
publishes exactly one frame for it on the symbol's topic (a ``BookChanged``; the private
``@account`` frames are filtered out by the subscription).

The consumer is a probe process (``--role probe``, this file): a SUB to the matcher's PUB,
subscribed to the K topics, every frame fed to ``zmx.node.probe.ProbeStats`` as ``zmx probe``
does. It says it is ready once every symbol's idle heartbeat has reached it (so every
subscription is live), counts the publications of the round, their ``seq`` gaps and the
publish-to-receive latency (from the events' ``ts_ns``), and reports publications/s from the
arrival of the first to the last one.

The ceiling (``--role blast``): a bare PUB process that sends N pre-encoded publications of
the same shape and size (one ``BookChanged`` of one level, K symbols in turn, consecutive
``seq`` per symbol) as fast as it can, to the same probe. N is below what the queues between
them hold (100,000 messages on each side), so nothing is dropped and the probe runs flat out:
its rate there is the most it can take. Its latency is not reported (the frames were encoded
before the blast).

Rounds of zmx and the blast are taken in turn for each K (``_common.interleaved``), the best
of ``--repeat`` counts. If the probe sees gaps at the maximum rate, the zmx rounds are taken
again paced at half of that rate (open loop) and reported beside them.

Run: ``.venv/bin/python perf/bench_pub.py`` (``--quick`` for a smoke run). Writes
``perf/results/pub.json``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import zmq
from _common import (ROOT, Progress, arguments, at_least_one, interleaved, machine_busy, noise_note, remove_directory,
                     shielded, warn, write_results)
from bench_orders import (
    MID,
    STALL_S,
    NoiseWatch,
    Processes,
    Workload,
    await_route,
    paced,
    pipelined,
    print_rows,
    stop_on_sigterm,
    watchdog,
)
from nodes import free_ports  # tests/nodes.py, on the path through bench_orders
from summaries import summarize

from zmx.codec import encode_publication
from zmx.events import BookChanged
from zmx.node.client import Client
from zmx.node.probe import RCVHWM, ProbeStats
from zmx.node.runtime import Stopper, announce_ready, load_topology
from zmx.topics import topic

SCRIPT = Path(__file__).resolve()
SYMBOL_COUNTS = (1, 10, 100)
PUB_HWM = 100_000  # as the matcher's PUB
DRAIN_LIMIT = 10_000  # as zmx.node.probe.run_probe
READY_TIMEOUT_S = 30.0
IDLE_END_S = 3.0  # a probe round ends this long after the last publication if not all arrived


def symbols_for(count: int) -> list[str]:
    return [f"S{i:03d}-USDT" for i in range(count)]


# -- helper processes (this file run with --role) ------------------------------------------------


def role_probe(endpoint: str, symbols: Sequence[str], expected: int, stopper: Stopper) -> None:
    """Count one round of publications with ``ProbeStats``; print the figures as one JSON line."""
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    try:
        sub.setsockopt(zmq.LINGER, 0)
        sub.setsockopt(zmq.RCVHWM, RCVHWM)
        for symbol in symbols:
            sub.setsockopt(zmq.SUBSCRIBE, topic(symbol))
        sub.connect(endpoint)
        recv, noblock, again = sub.recv, zmq.NOBLOCK, zmq.Again
        now_ns, clock = time.time_ns, time.perf_counter

        # Ready when every symbol has been heard from (its idle heartbeat): every topic is live.
        warmup = ProbeStats()
        give_up = clock() + READY_TIMEOUT_S
        while len(warmup.symbols) < len(symbols) and not stopper.stopped:
            if clock() > give_up:
                print(json.dumps({"error": f"only {len(warmup.symbols)} of {len(symbols)} symbols heard "
                                           f"within {READY_TIMEOUT_S} s"}), flush=True)
                return
            if sub.poll(100):
                for _ in range(DRAIN_LIMIT):
                    try:
                        warmup.feed(recv(noblock), now_ns())
                    except again:
                        break
        announce_ready("probe", "probe", endpoint=endpoint, symbols=len(symbols))

        stats = ProbeStats()
        feed, latency = stats.feed, stats.latency
        first = last = None
        seen = 0
        start = clock()
        while not stopper.stopped:
            if not sub.poll(100):
                now = clock()
                if (last is not None and now - last > IDLE_END_S) or now - start > 600:
                    break
                continue
            batch_start = clock()
            for _ in range(DRAIN_LIMIT):
                try:
                    frame = recv(noblock)
                except again:
                    break
                feed(frame, now_ns())
            if latency.count != seen:  # publications with events (heartbeats have none)
                last = clock()
                if first is None:
                    first = batch_start
                seen = latency.count
                if seen >= expected:
                    break
        seconds = (last - first) if first is not None and last is not None else 0.0
        summary = stats.summary(seconds or 1e-9)
        per_symbol = summary.pop("symbols")
        summary.update({
            "publications": seen,
            "expected": expected,
            "seconds": round(seconds, 4),
            "publications_per_s": round(seen / seconds) if seconds else None,
            "backwards": sum(s["backwards"] for s in per_symbol.values()),
            "symbols_seen": len(per_symbol),
            "bytes_per_message": round(summary["bytes"] / summary["messages"], 1) if summary["messages"] else None,
        })
        print(json.dumps(summary), flush=True)
        while not stopper.stopped:  # stay until stopped, so the benchmark can read its CPU time
            time.sleep(0.05)
    finally:
        sub.close(0)
        ctx.term()


def role_blast(endpoint: str, symbols: Sequence[str], n: int, stopper: Stopper) -> None:
    """Heartbeat every symbol until ``go`` arrives on stdin, then send ``n`` pre-encoded
    publications as fast as possible; print the seconds it took as one JSON line."""
    import selectors

    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    pub = ctx.socket(zmq.PUB)
    try:
        pub.setsockopt(zmq.LINGER, 0)
        pub.setsockopt(zmq.SNDHWM, PUB_HWM)
        pub.bind(endpoint)
        seq = dict.fromkeys(symbols, 0)
        ts = time.time_ns()
        frames = []
        for i in range(n):  # what a matcher publishes for a resting order: one level changed
            symbol = symbols[i % len(symbols)]
            seq[symbol] += 1
            price, lots = MID - 1 - i % 20, 1 + i * 7 % 5_000
            levels = ((price, lots),)
            frames.append(encode_publication(symbol, [BookChanged(symbol, seq[symbol], ts + i, levels, ())]
                                                      if i % 2 else
                                                      [BookChanged(symbol, seq[symbol], ts + i, (), levels)]))
        heartbeats = [encode_publication(symbol, ()) for symbol in symbols]
        announce_ready("blast", "blast", endpoint=endpoint, symbols=len(symbols), frames=n)
        send, noblock = pub.send, zmq.NOBLOCK
        with selectors.DefaultSelector() as sel:
            sel.register(sys.stdin, selectors.EVENT_READ)
            while not stopper.stopped:
                for frame in heartbeats:
                    send(frame, noblock)
                if sel.select(timeout=0.05):
                    if sys.stdin.readline().strip() == "go":
                        break
                    return  # end of input: the benchmark is gone
        start = time.perf_counter()
        for frame in frames:
            send(frame, noblock)
        seconds = time.perf_counter() - start
        print(json.dumps({"sent": n, "seconds": round(seconds, 4), "per_s": round(n / seconds)}), flush=True)
        while not stopper.stopped:  # keep the socket (and its queue) until stopped
            time.sleep(0.05)
    finally:
        pub.close(0)
        ctx.term()


def role_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="bench_pub.py --role")
    parser.add_argument("role", choices=("probe", "blast"))
    parser.add_argument("endpoint")
    parser.add_argument("--symbols", type=int, required=True, help="how many symbols (symbols_for)")
    parser.add_argument("--n", type=int, required=True, help="publications expected (probe) or sent (blast)")
    parser.add_argument("--max-seconds", type=float, default=900.0)
    args = parser.parse_args(argv)
    watchdog(args.max_seconds)
    stopper = Stopper().install()
    if args.role == "probe":
        role_probe(args.endpoint, symbols_for(args.symbols), args.n, stopper)
    else:
        role_blast(args.endpoint, symbols_for(args.symbols), args.n, stopper)
    return 0


# -- the run ---------------------------------------------------------------------------------------


class SymbolCountRun:
    """The rounds of one symbol count: a cluster whose matcher owns ``count`` symbols, its
    probe rounds driven by orders, and the blast rounds beside them."""

    def __init__(self, count: int, args: argparse.Namespace, procs: Processes, rounds: itertools.count[int],
                 budget: float, progress: Progress) -> None:
        self.count = count
        self.progress = progress
        self.args = args
        self.procs = procs
        self.rounds = rounds
        self.budget = budget
        self.symbols = symbols_for(count)
        self.zmx: list[dict[str, Any]] = []
        self.blast: list[dict[str, Any]] = []
        self.paced: list[dict[str, Any]] = []

    def run(self) -> dict[str, Any]:
        args, procs = self.args, self.procs
        cluster, topology_path = procs.cluster(f"k{self.count}", {"m1": self.symbols})
        topology = load_topology(topology_path)
        self.pub_endpoint = topology.node("m1").pub  # type: ignore[union-attr]
        self.client = Client.from_topology(topology)
        try:
            await_route(self.client, self.symbols)
            self.flow = Workload(args.seed, self.symbols)
            pipelined(self.client, self.flow.take(min(args.n, 3_000), "wo"), args.window, 60.0)  # warm-up
            step = f"{self.count} symbol{'s' if self.count > 1 else ''}"
            self.progress.step(f"{step}: cluster up, warmed up")
            with NoiseWatch(procs) as during:
                interleaved(args.repeat, {
                    "zmx": self.progress.counted(f"{step}: zmx round", lambda: self.zmx_round(None, self.zmx)),
                    "blast": self.progress.counted(f"{step}: probe ceiling round", self.blast_round)})
            best_rate = max(r["publications_per_s"] or 0 for r in self.zmx)
            paced_repeat = args.paced_repeat
            if any(r["gaps"] or r["publications"] < args.n for r in self.zmx):
                warn(f"{self.count} symbols: gaps at the maximum rate; measuring {args.repeat} rounds at half of it, "
                     f"{best_rate // 2:,}/s")
                paced_repeat = max(paced_repeat, args.repeat)
                self.progress.total += paced_repeat - args.paced_repeat
            with NoiseWatch(procs) as during_paced:
                for i in range(paced_repeat):
                    self.zmx_round(best_rate / 2, self.paced)
                    self.progress.step(f"{step}: half-rate round {i + 1}")
        finally:
            self.client.close()
            cluster.stop_all()
            procs.clusters.remove(cluster)
        for watch, what in ((during, "maximum-rate"), (during_paced, "half-rate")):
            note = noise_note(watch, f"{self.count} symbols, {what} rounds")
            if note:
                warn(note)
        return {"zmx": self.zmx, "blast": self.blast, "paced": self.paced,
                "noise": {"others_cpus": during.others, "steal_cpus": during.steal,
                          "others_cpus_half_rate": during_paced.others, "steal_cpus_half_rate": during_paced.steal}}

    def probe_round(self, drive: Callable[[], dict[str, Any]], endpoint: str, tag: str) -> dict[str, Any]:
        """Start a probe on ``endpoint``, run ``drive`` once it is ready, return its figures."""
        probe = self.procs.helper(f"probe-{tag}-{next(self.rounds)}", "probe", endpoint, "--symbols",
                                  str(self.count), "--n", str(self.args.n), max_seconds=self.budget)
        try:
            driven = drive()
            line = json.loads(probe.line(STALL_S + IDLE_END_S + 5))
        finally:
            probe.stop()
        if "error" in line:
            raise RuntimeError(f"probe: {line['error']}")
        return {**line, "driver": driven}

    def zmx_round(self, rate: float | None, into: list[dict[str, Any]]) -> float:
        """Orders through the router (pipelined, or paced at ``rate``), the probe on the matcher."""
        n = self.args.n
        commands = self.flow.take(n, f"r{next(self.rounds):03d}o")

        def drive() -> dict[str, Any]:
            if rate is None:
                r = pipelined(self.client, commands, self.args.window, 120.0)
            else:
                r = paced(self.client, commands, rate, 120.0 + n / rate)
            if r.not_ok:
                warn(f"{self.count} symbols: replies not ok: {dict(r.not_ok)}")
            return {"acks_per_s": round(n / r.seconds), "not_ok": dict(r.not_ok)}

        figures = self.probe_round(drive, self.pub_endpoint, f"zmx{self.count}")
        into.append(figures)
        return figures["seconds"] or float("inf")

    def blast_round(self) -> float:
        """The probe's ceiling: a bare PUB sends pre-encoded publications as fast as it can."""
        endpoint = f"tcp://127.0.0.1:{free_ports(1)[0]}"
        blaster = self.procs.helper(f"blast-{self.count}-{next(self.rounds)}", "blast", endpoint, "--symbols",
                                    str(self.count), "--n", str(self.args.n), max_seconds=self.budget)
        try:
            def drive() -> dict[str, Any]:
                blaster.write("go")
                return json.loads(blaster.line(30.0))

            figures = self.probe_round(drive, endpoint, f"blast{self.count}")
        finally:
            blaster.stop()
        self.blast.append(figures)
        return figures["seconds"] or float("inf")


def main(argv: list[str] | None = None) -> int:
    parser = arguments(__doc__)
    parser.add_argument("--n", type=at_least_one, default=50_000, help="orders (= publications) per round (50000)")
    parser.add_argument("--window", type=at_least_one, default=256, help="requests in flight (256)")
    parser.add_argument("--repeat", type=at_least_one, default=3, help="rounds per target; the best counts (3)")
    parser.add_argument("--paced-repeat", type=at_least_one, default=1,
                        help="rounds at half of the best rate (1; --repeat of them when there were gaps)")
    parser.add_argument("--seed", type=int, default=1, help="workload seed (default 1)")
    parser.add_argument("--symbols", type=at_least_one, nargs="+", default=list(SYMBOL_COUNTS),
                        help="symbol counts (default 1 10 100)")
    parser.add_argument("--quick", action="store_true", help="a smoke run (3000 orders, 1 round), no results file")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (logs, journals)")
    args = parser.parse_args(argv)
    if args.quick:
        args.n, args.repeat, args.paced_repeat = 3_000, 1, 1
    if args.n > PUB_HWM:
        parser.error(f"--n above {PUB_HWM:,} would let the blast overflow the queues")
    stop_on_sigterm()
    before = machine_busy()
    note = noise_note(before, "before the run")
    if note:
        warn(note)
    print(f"{args.n:,} orders (= publications) a round, window {args.window}, best of {args.repeat}; "
          f"symbol counts {', '.join(map(str, args.symbols))}")

    directory = Path(tempfile.mkdtemp(prefix="zmx-bench-pub-"))
    procs = Processes(directory, SCRIPT)
    rounds = itertools.count(1)
    results: dict[str, Any] = {}
    # steps per symbol count: the cluster's warm-up, the rounds of zmx and the ceiling, the half-rate rounds
    progress = Progress(len(args.symbols) * (1 + 2 * args.repeat + args.paced_repeat))
    try:
        for count in args.symbols:
            results[str(count)] = SymbolCountRun(count, args, procs, rounds, budget=900.0, progress=progress).run()
    finally:
        with shielded():
            procs.stop_all()
            remove_directory(directory, args.keep)

    # -- figures -----------------------------------------------------------------------------
    def best(rounds: list[dict[str, Any]]) -> dict[str, Any]:
        return max(rounds, key=lambda r: r["publications_per_s"] or 0)

    def brief(r: dict[str, Any]) -> dict[str, Any]:
        return {"publications_per_s": r["publications_per_s"], "publications": r["publications"],
                "gaps": r["gaps"], "backwards": r["backwards"], "decode_errors": r["decode_errors"],
                "bytes_per_message": r["bytes_per_message"], "latency_us": r["latency_us"], "driver": r["driver"]}

    figures: dict[str, Any] = {"orders": args.n, "window": args.window, "repeat": args.repeat,
                               "paced_repeat": args.paced_repeat, "seed": args.seed, "fsync": "batch",
                               "noise_before": {"others_cpus": before.others, "steal_cpus": before.steal},
                               "symbol_counts": {}}
    rows = []
    all_clean = True
    for count, got in results.items():
        z, b = best(got["zmx"]), best(got["blast"])
        gaps = sum(r["gaps"] for r in got["zmx"])
        missing = sum(args.n - r["publications"] for r in got["zmx"])
        entry = {
            "zmx": {**brief(z), "gaps_all_rounds": gaps, "missing_all_rounds": missing,
                    "rounds_per_s": [r["publications_per_s"] for r in got["zmx"]]},
            "probe_ceiling": {**brief(b), "latency_us": None, "gaps_all_rounds": sum(r["gaps"] for r in got["blast"]),
                              "rounds_per_s": [r["publications_per_s"] for r in got["blast"]]},
            "ratio_to_probe_ceiling": round((z["publications_per_s"] or 0) / (b["publications_per_s"] or 1), 3),
            "noise": got["noise"],
        }
        if got["paced"]:
            by_p99 = sorted(got["paced"], key=lambda r: r["latency_us"]["p99"] or 0.0)
            p = by_p99[len(by_p99) // 2]  # the round with the median p99
            entry["zmx_half_rate"] = {
                **brief(p), "target_rate": round(z["publications_per_s"] / 2),
                "gaps_all_rounds": sum(r["gaps"] for r in got["paced"]),
                "missing_all_rounds": sum(args.n - r["publications"] for r in got["paced"]),
                "rounds_latency_us": [r["latency_us"] for r in got["paced"]]}
        # The sustained rate is the maximum when it had no gaps, else half of it.
        clean_max = not gaps and not missing
        sustained = entry["zmx"] if clean_max or "zmx_half_rate" not in entry else entry["zmx_half_rate"]
        entry["sustained"] = "maximum" if sustained is entry["zmx"] else "half"
        entry["no_gaps_at_sustained_rate"] = not sustained["gaps_all_rounds"] and not sustained["missing_all_rounds"]
        all_clean = all_clean and entry["no_gaps_at_sustained_rate"]
        figures["symbol_counts"][count] = entry
        lat = z["latency_us"]
        rows.append([count, f"{z['publications_per_s']:,}", f"{z['driver']['acks_per_s']:,}", f"{gaps:,}",
                     f"{lat['p50'] / 1000:.2f}" if lat["p50"] is not None else "-",
                     f"{lat['p99'] / 1000:.2f}" if lat["p99"] is not None else "-",
                     f"{b['publications_per_s']:,}", f"{entry['probe_ceiling']['gaps_all_rounds']:,}",
                     f"{b['driver']['per_s']:,}", f"{entry['ratio_to_probe_ceiling']:.2f}x"])
        if got["paced"]:
            p = entry["zmx_half_rate"]
            rows.append([f"{count} (half rate)", f"{p['publications_per_s']:,}", f"{p['driver']['acks_per_s']:,}",
                         f"{p['gaps_all_rounds']:,}", f"{p['latency_us']['p50'] / 1000:.2f}",
                         f"{p['latency_us']['p99'] / 1000:.2f}", "", "", "", ""])
    figures["no_gaps_at_sustained_rate"] = all_clean
    figures["summary"] = summarize("pub", figures)
    print_rows(f"publications: {args.n:,} orders a round, window {args.window}, best of {args.repeat}",
               ["symbols", "zmx pub/s", "acks/s", "gaps", "lat p50 ms", "lat p99 ms",
                "probe ceiling/s", "gaps", "blast sent/s", "zmx / ceiling"],
               [[str(c) for c in row] for row in rows])
    if not args.quick:
        path = write_results("pub", figures)
        print(f"wrote {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--role":
        sys.exit(role_main(sys.argv[2:]))
    sys.exit(main())
