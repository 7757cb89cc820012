"""Matching engine throughput against a bare order book, measured in the same run.

A seeded workload on one symbol (BTC-USDT, tick 0.01, lot 0.00001) is generated once:

- 60% gtc limit orders resting 1-20 ticks from a mid that drifts as a random walk (when
  the mid has moved, some of them cross and trade);
- 30% cancels of a random id the generator placed, almost always one still resting; a few
  are for orders that have ended (the engine answers ``unknown_order``);
- 10% aggressive orders (80% ioc limits, 20% market) priced and sized to sweep 1-3 levels
  of the other side, sometimes with a remainder that is canceled.

Ten accounts trade, so self-trade prevention happens too. To aim the cancels and sweeps,
the generator keeps a shadow ``BareBook``; generation is not timed.

The same command list is fed to ``MatchingEngine.handle`` (every event and ``BookChanged``
diff built) and to ``BareBook``: the baseline written here, the least a price-time
matcher must do in pure Python. Both loops are timed with ``perf_counter`` around the
loop only, gc on, a fresh book for each round, engine and baseline rounds taken in turn so
that load from elsewhere hits both alike; the best of ``--repeat`` counts. Both must agree
on the number of trades and on the final book; a warning says when they do not.

Then every event of the workload is encoded and decoded with ``zmx.codec``.

Run: ``.venv/bin/python perf/bench_engine.py`` (``--quick`` for a smoke run, ``--profile``
for the engine loop under cProfile). Writes ``perf/results/engine.json``.
"""

from __future__ import annotations

import cProfile
import gc
import pstats
import random
import sys
import time
from collections import Counter, deque
from typing import Any

from sortedcontainers import SortedList

from _common import (CpuWatch, Progress, arguments, at_least_one, best_of, interleaved, machine_busy, noise_note, warn,
                     write_results)
from summaries import summarize
from zmx.commands import CancelOrder, SubmitOrder
from zmx.model import OrderType, Side, SymbolSpec, TimeInForce

SPEC = SymbolSpec("BTC-USDT", "0.01", "0.00001")
SYMBOL = SPEC.symbol
BUY, SELL = Side.BUY, Side.SELL
LIMIT, MARKET = OrderType.LIMIT, OrderType.MARKET
GTC, IOC = TimeInForce.GTC, TimeInForce.IOC

# Targets of the issue, on one core.
TARGET_ENGINE_OPS = 500_000
TARGET_RATIO = 0.5

# Workload shape.
START_MID = 3_000_000  # 30000.00 in ticks
DRIFT_PROBABILITY = 0.1  # per command, the mid moves one tick up or down
MAX_DISTANCE = 20  # limit orders rest 1..20 ticks from the mid
LIMIT_LOTS = (1, 500)
ACCOUNTS = tuple(f"acct{i}" for i in range(10))
STALE_CANCEL_PROBABILITY = 0.05  # an ended id the generator meets is still sent this often
MARKET_SHARE = 0.2  # of the aggressive orders
TS0 = 1_700_000_000_000_000_000

_NO_LIMIT = 1 << 64


# -- baseline ------------------------------------------------------------------------------------


class BareBook:
    """Price-time matching with no events, no validation, no ``seq``: the floor.

    Each side is a dict from a sort key to a level ``[total, deque of orders]`` plus a
    ``SortedList`` of its keys: what a ``SortedDict`` is inside, kept by hand because
    ``keys[0]`` is 2-3x cheaper than ``SortedDict.peekitem(0)`` and every submit looks at the
    best level. The key is the price for asks and minus the price for bids, so the best level
    of either side is ``keys[0]`` and one loop serves both. An order is a list
    ``[remaining, account, order_id, level, side levels, side keys, key]``.

    Cancels use lazy deletion: the order (found through the ``orders`` dict) is marked dead
    (``remaining = 0``) and its lots taken off the level total; the level goes when its
    total reaches 0, and dead orders still queued are skipped when matching reaches them.
    That is O(1) per cancel where ``deque.remove`` would scan the queue.

    It does what this workload needs: limit gtc rests, limit ioc and market orders discard
    what is left, self-trade prevention cancels the resting order. No FOK, post-only or
    amend, no duplicate-id check; order ids are unique across accounts in this workload.
    """

    __slots__ = ("ask_keys", "ask_levels", "bid_keys", "bid_levels", "orders", "trades")

    def __init__(self) -> None:
        self.bid_levels: dict[int, list[Any]] = {}
        self.bid_keys = SortedList()
        self.ask_levels: dict[int, list[Any]] = {}
        self.ask_keys = SortedList()
        self.orders: dict[str, list[Any]] = {}
        self.trades = 0

    def handle(self, cmd: SubmitOrder | CancelOrder, *, ts_ns: int) -> None:
        orders = self.orders
        if type(cmd) is CancelOrder:
            order_id, account, _symbol = cmd
            order = orders.pop(order_id, None)
            if order is None:
                return
            if order[1] != account:
                orders[order_id] = order
                return
            level = order[3]
            level[0] -= order[0]
            order[0] = 0
            if not level[0]:
                key = order[6]
                del order[4][key]
                order[5].remove(key)
            return

        order_id, account, _symbol, side, otype, tif, price, quantity = cmd
        if side is BUY:
            levels, keys = self.ask_levels, self.ask_keys
            limit_key = _NO_LIMIT if price is None else price
        else:
            levels, keys = self.bid_levels, self.bid_keys
            limit_key = _NO_LIMIT if price is None else -price
        remaining = quantity
        trades = 0
        while levels:  # in step with keys, and a dict tests empty in C
            key = keys[0]
            if key > limit_key:
                break
            level = levels[key]
            queue = level[1]
            while True:
                maker = queue[0]
                maker_left = maker[0]
                if not maker_left:  # canceled earlier
                    queue.popleft()
                    continue
                if maker[1] == account:  # self-trade prevention: cancel the resting order
                    maker[0] = 0
                    queue.popleft()
                    del orders[maker[2]]
                    level[0] -= maker_left
                elif maker_left <= remaining:
                    trades += 1
                    remaining -= maker_left
                    maker[0] = 0
                    queue.popleft()
                    del orders[maker[2]]
                    level[0] -= maker_left
                else:
                    trades += 1
                    maker[0] = maker_left - remaining
                    level[0] -= remaining
                    remaining = 0
                    break
                if not level[0] or not remaining:
                    break
            if not level[0]:
                keys.pop(0)
                del levels[key]
            if not remaining:
                break
        if trades:
            self.trades += trades
        if remaining and otype is LIMIT and tif is GTC:
            if side is BUY:
                levels, keys, key = self.bid_levels, self.bid_keys, -price
            else:
                levels, keys, key = self.ask_levels, self.ask_keys, price
            level = levels.get(key)
            if level is None:
                level = levels[key] = [0, deque()]
                keys.add(key)
            order = [remaining, account, order_id, level, levels, keys, key]
            level[1].append(order)
            level[0] += remaining
            orders[order_id] = order

    def best(self, side: Side, depth: int) -> list[tuple[int, int]]:
        """The first ``depth`` levels of ``side`` as (sort key, total lots)."""
        levels, keys = (self.bid_levels, self.bid_keys) if side is BUY else (self.ask_levels, self.ask_keys)
        return [(key, levels[key][0]) for key in keys[:depth]]

    def depth(self) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
        """(bids best first, asks best first), each level (price, total lots)."""
        return ([(-key, self.bid_levels[key][0]) for key in self.bid_keys],
                [(key, self.ask_levels[key][0]) for key in self.ask_keys])


# -- workload ------------------------------------------------------------------------------------


def generate(n: int, seed: int) -> list[SubmitOrder | CancelOrder]:
    """``n`` commands, the same for the same seed."""
    rng = random.Random(seed)
    rand, randint, randrange = rng.random, rng.randint, rng.randrange
    shadow = BareBook()  # what the book looks like, to aim cancels and sweeps
    live = shadow.orders
    placed: list[tuple[str, str]] = []  # (order_id, account) that may still rest
    commands: list[SubmitOrder | CancelOrder] = []
    mid = START_MID
    next_id = 0
    for ts in range(TS0, TS0 + n):
        if rand() < DRIFT_PROBABILITY:
            mid += 1 if rand() < 0.5 else -1
        kind = rand()
        cmd: SubmitOrder | CancelOrder | None = None
        if 0.6 <= kind < 0.9:
            while placed and cmd is None:
                i = randrange(len(placed))
                order_id, account = placed[i]
                placed[i] = placed[-1]  # swap-remove
                placed.pop()
                if order_id in live or rand() < STALE_CANCEL_PROBABILITY:
                    cmd = CancelOrder(order_id, account, SYMBOL)
        elif kind >= 0.9:
            side = BUY if rand() < 0.5 else SELL
            swept = shadow.best(SELL if side is BUY else BUY, randint(1, 3))
            if swept:
                before = sum(total for _, total in swept[:-1])
                last = swept[-1][1]
                quantity = before + randint(1, last + last // 4 + 1)  # sometimes more than there is
                key = swept[-1][0]
                price = key if side is BUY else -key
            else:  # an empty side: an ioc that finds nothing
                quantity = randint(*LIMIT_LOTS)
                price = mid + 3 if side is BUY else mid - 3
            next_id += 1
            order_id = f"o{next_id}"
            account = ACCOUNTS[randrange(len(ACCOUNTS))]
            if rand() < MARKET_SHARE:
                cmd = SubmitOrder(order_id, account, SYMBOL, side, MARKET, IOC, None, quantity)
            else:
                cmd = SubmitOrder(order_id, account, SYMBOL, side, LIMIT, IOC, price, quantity)
        if cmd is None:  # a limit order (also when there was nothing left to cancel)
            side = BUY if rand() < 0.5 else SELL
            distance = randint(1, MAX_DISTANCE)
            price = mid - distance if side is BUY else mid + distance
            next_id += 1
            order_id = f"o{next_id}"
            account = ACCOUNTS[randrange(len(ACCOUNTS))]
            cmd = SubmitOrder(order_id, account, SYMBOL, side, LIMIT, GTC, price, randint(*LIMIT_LOTS))
            placed.append((order_id, account))
        shadow.handle(cmd, ts_ns=ts)
        commands.append(cmd)
    return commands


# -- runs ----------------------------------------------------------------------------------------


def timed_loop(book: Any, commands: list[SubmitOrder | CancelOrder]) -> float:
    """Seconds to feed every command to ``book.handle``; the same loop for engine and baseline."""
    handle = book.handle
    start = time.perf_counter()
    for ts, cmd in enumerate(commands, TS0):
        handle(cmd, ts_ns=ts)
    return time.perf_counter() - start


def collect_events(engine: Any, commands: list[SubmitOrder | CancelOrder]) -> list[Any]:
    events: list[Any] = []
    extend = events.extend
    handle = engine.handle
    for ts, cmd in enumerate(commands, TS0):
        extend(handle(cmd, ts_ns=ts))
    return events


def bench_codec(events: list[Any], repeat: int) -> dict[str, Any]:
    """ns per event to encode and to decode every event of the workload."""
    try:
        from zmx.codec import decode, encode
    except ImportError as e:
        warn(f"zmx.codec is not usable ({e}); codec figures skipped")
        return {"codec_error": f"{type(e).__name__}: {e}"}
    mismatches = sum(1 for event in events[:20_000] if decode(encode(event)) != event)
    if mismatches:
        warn(f"codec: {mismatches} of the first {min(len(events), 20_000)} events do not survive encode+decode")
    encoded: list[bytes] = []

    def run_encode() -> float:
        nonlocal encoded
        start = time.perf_counter()
        encoded = [encode(event) for event in events]
        return time.perf_counter() - start

    def run_decode() -> float:
        start = time.perf_counter()
        [decode(data) for data in encoded]
        return time.perf_counter() - start

    encode_s, _ = best_of(repeat, run_encode)
    decode_s, _ = best_of(repeat, run_decode)
    n = len(events) or 1
    return {
        "codec_ns_per_event_encode": round(encode_s / n * 1e9, 1),
        "codec_ns_per_event_decode": round(decode_s / n * 1e9, 1),
        "codec_events_per_s": round(n / (encode_s + decode_s)),
        "codec_bytes_per_event": round(sum(map(len, encoded)) / n, 1),
        "codec_roundtrip_mismatches": mismatches,
    }


def profile_engine(engine_cls: Any, commands: list[SubmitOrder | CancelOrder], top: int = 25) -> None:
    engine = engine_cls(SPEC)
    profiler = cProfile.Profile()
    profiler.enable()
    timed_loop(engine, commands)
    profiler.disable()
    print(f"\nEngine loop under cProfile ({len(commands):,} commands), top {top} by tottime:")
    pstats.Stats(profiler, stream=sys.stdout).sort_stats("tottime").print_stats(top)


def print_table(rows: list[tuple[str, str]], title: str) -> None:
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        print(title)
        for name, value in rows:
            print(f"  {name:<32} {value:>20}")
        return
    table = Table(title=title)
    table.add_column("figure")
    table.add_column("value", justify="right")
    for name, value in rows:
        table.add_row(name, value)
    Console().print(table)


def main(argv: list[str] | None = None) -> int:
    parser = arguments(__doc__)
    parser.add_argument("--n", type=at_least_one, default=200_000, help="commands in the workload (default 200000)")
    parser.add_argument("--seed", type=int, default=1, help="workload seed (default 1)")
    parser.add_argument("--repeat", type=at_least_one, default=3, help="rounds; the best counts (default 3)")
    parser.add_argument("--quick", action="store_true", help="a tiny run (2000 commands, 1 round), no results file")
    parser.add_argument("--profile", action="store_true", help="also run the engine loop under cProfile")
    parser.add_argument("--no-engine", action="store_true", help="baseline only (no zmx.engine needed)")
    args = parser.parse_args(argv)
    if args.quick:
        args.n, args.repeat = 2_000, 1

    before = machine_busy()
    note = noise_note(before, "before the run")
    if note:
        warn(note)

    # steps: the workload, the rounds of both loops, the engine's events, the codec
    progress = Progress(1 + args.repeat * 2 + 2)
    start = time.perf_counter()
    commands = generate(args.n, args.seed)
    progress.step("workload generated")
    kinds = Counter("cancel" if type(c) is CancelOrder else f"{c.type.value} {c.time_in_force.value}" for c in commands)
    print(f"workload: {args.n:,} commands, seed {args.seed}, generated in {time.perf_counter() - start:.2f} s: "
          + ", ".join(f"{k} {v / args.n:.1%}" for k, v in sorted(kinds.items())))

    engine_cls = None
    if not args.no_engine:
        try:
            from zmx.engine import MatchingEngine as engine_cls
        except ImportError as e:
            warn(f"zmx.engine is not usable ({e}); baseline only")

    baseline_books: list[BareBook] = []

    def run_baseline() -> float:
        baseline_books[:] = [BareBook()]
        return timed_loop(baseline_books[0], commands)

    def run_engine() -> float:
        return timed_loop(engine_cls(SPEC), commands)

    runs = {"baseline": run_baseline}
    if engine_cls is not None:
        runs["engine"] = run_engine
    else:
        progress.total -= args.repeat + 2
    runs = {name: progress.counted(f"{name} round", run) for name, run in runs.items()}
    with CpuWatch() as during:
        rounds = interleaved(args.repeat, runs)
    note = noise_note(during, "during the timed rounds")
    if note:
        warn(note)
    baseline_rounds = rounds["baseline"]
    baseline_s = min(baseline_rounds)
    baseline = baseline_books[0]
    bids, asks = baseline.depth()
    figures: dict[str, Any] = {
        "ops": args.n,
        "seed": args.seed,
        "repeat": args.repeat,
        "workload": {k: round(v / args.n, 4) for k, v in sorted(kinds.items())},
        "baseline_ops_per_s": round(args.n / baseline_s),
        "baseline_rounds_s": [round(s, 4) for s in baseline_rounds],
        "baseline_trades": baseline.trades,
        "final_levels": len(bids) + len(asks),
        "final_resting_orders": len(baseline.orders),
        # CPUs that other processes / the hypervisor took, on average: high = noisy figures.
        "noise": {"others_cpus_before": before.others, "others_cpus_during": during.others,
                  "steal_cpus_during": during.steal},
    }
    rows = [
        ("baseline ops/s", f"{figures['baseline_ops_per_s']:,}"),
        ("baseline trades", f"{baseline.trades:,}"),
        ("final book levels / orders", f"{len(bids) + len(asks):,} / {len(baseline.orders):,}"),
    ]

    if engine_cls is not None:
        engine_rounds = rounds["engine"]
        engine_s = min(engine_rounds)
        gc.collect()
        checker = engine_cls(SPEC)
        events = collect_events(checker, commands)
        counts = Counter(type(e).__name__ for e in events)
        trades = counts["TradeOccurred"]
        progress.step("engine events checked")
        if trades != baseline.trades:
            warn(f"engine made {trades:,} trades, the baseline {baseline.trades:,}")
        e_bids, e_asks = checker.depth()
        books_agree = trades == baseline.trades and (e_bids, e_asks) == (bids, asks)
        if (e_bids, e_asks) != (bids, asks):
            warn(f"final books differ: engine {len(e_bids)} bid / {len(e_asks)} ask levels, "
                 f"baseline {len(bids)} / {len(asks)}")
        engine_ops = args.n / engine_s
        ratio = baseline_s / engine_s
        figures.update({
            "engine_ops_per_s": round(engine_ops),
            "engine_rounds_s": [round(s, 4) for s in engine_rounds],
            "ratio": round(ratio, 3),
            "events_per_op": round(len(events) / args.n, 3),
            "events": dict(sorted(counts.items())),
            "trades": trades,
            "ratio_rounds": [round(b / e, 3) for b, e in zip(baseline_rounds, engine_rounds, strict=True)],
            "books_agree": books_agree,
            "targets": {
                "engine_ops_per_s": TARGET_ENGINE_OPS,
                "ratio": TARGET_RATIO,
                "met": engine_ops >= TARGET_ENGINE_OPS and ratio >= TARGET_RATIO,
            },
        })
        rows[:0] = [
            ("engine ops/s", f"{round(engine_ops):,}"),
            ("engine / baseline", f"{ratio:.3f}x"),
        ]
        rows += [
            ("engine trades", f"{trades:,}"),
            ("events per op", f"{len(events) / args.n:.3f}"),
            ("cancels rejected (unknown_order)", f"{counts['CancelRejected']:,}"),
            ("self-trade cancels", f"{sum(1 for e in events if getattr(e, 'reason', None) == 'self_trade'):,}"),
        ]
        figures.update(bench_codec(events, args.repeat))
        progress.step("codec")
        if "codec_ns_per_event_encode" in figures:
            rows += [
                ("codec encode ns/event", f"{figures['codec_ns_per_event_encode']:,.0f}"),
                ("codec decode ns/event", f"{figures['codec_ns_per_event_decode']:,.0f}"),
                ("codec encode+decode events/s", f"{figures['codec_events_per_s']:,}"),
                ("codec bytes/event", f"{figures['codec_bytes_per_event']:.1f}"),
            ]
        del events
        target = figures["targets"]
        rows.append(("books agree (trades, final depth)", str(books_agree)))
        rows.append(("targets met", f"{target['met']} (>= {TARGET_ENGINE_OPS:,} ops/s, >= {TARGET_RATIO}x)"))

    else:
        figures.update({"engine_ops_per_s": None, "ratio": None, "targets": {
            "engine_ops_per_s": TARGET_ENGINE_OPS, "ratio": TARGET_RATIO, "met": False}})

    print_table(rows, f"engine benchmark: {args.n:,} commands, best of {args.repeat}")
    figures["summary"] = summarize("engine", figures)
    if not args.quick:
        path = write_results("engine", figures)
        print(f"wrote {path.relative_to(path.parents[2])}")
    if args.profile and engine_cls is not None:
        gc.collect()
        profile_engine(engine_cls, commands)
    return 0


if __name__ == "__main__":
    sys.exit(main())
