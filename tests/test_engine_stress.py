"""The matching engine against a naive reference model on a long random flow.

``tests/reference_book.py`` implements docs/matching.md with plain lists. A seeded random
flow of commands (limits of every time in force, market orders, cancels, amends, a few
accounts so that self-trades happen, now and then an invalid command) goes to both, and
after every command the events must be equal, the book's invariants hold, ``seq`` follow
the rules, and an L2 mirror fed only the engine's ``BookChanged`` events must equal the
engine's depth, checksum included.

The same flow also checks determinism: snapshot/restore gives byte-identical events, and
a process with another hash seed gives the same event stream.

Run as a script (``python tests/test_engine_stress.py COUNT``) it prints the digest of the
engine's encoded events for COUNT commands of the flow; the hash-seed test uses that.
"""

from __future__ import annotations

import gc
import hashlib
import os
import random
import subprocess
import sys
from collections import Counter
from collections.abc import Callable, Iterable
from functools import lru_cache
from pathlib import Path

import pytest
import reference_book
from reference_book import ReferenceBook

import zmx.engine

from zmx.codec import decode, encode, join_batch, pack_records
from zmx.commands import AmendOrder, CancelOrder, SubmitOrder
from zmx.depth import L2Mirror, book_checksum
from zmx.engine import MatchingEngine
from zmx.events import BookChanged, OrderCanceled
from zmx.exceptions import DecodeError
from zmx.model import OrderType, Side, SymbolSpec, TimeInForce

SYMBOL = "BTC-USDT"
# 1 lot = 0.001; orders of 2 to 200 lots are valid, so 0, 1 and 201 are not.
SPEC = SymbolSpec(SYMBOL, "0.01", "0.001", min_quantity="0.002", max_quantity="0.2")
ACCOUNTS = ("alice", "bob", "carol", "dave")
SEED = 20240611
STRESS_COMMANDS = 100_000
FULL_COMPARE_EVERY = 1_000


class _MemoSpec:
    """SPEC with its number formatting memoised: ``book_checksum`` after every command
    formats about 30 levels, and that was a third of this test's time."""

    ticks_to_price = staticmethod(lru_cache(maxsize=None)(SPEC.ticks_to_price))
    lots_to_quantity = staticmethod(lru_cache(maxsize=None)(SPEC.lots_to_quantity))


MEMO_SPEC = _MemoSpec()
TARGET_RESTING = 60

BUY, SELL = Side.BUY, Side.SELL
LIMIT, MARKET = OrderType.LIMIT, OrderType.MARKET
GTC, IOC, FOK, POST_ONLY = TimeInForce.GTC, TimeInForce.IOC, TimeInForce.FOK, TimeInForce.POST_ONLY
LIMIT_TIFS = (GTC,) * 10 + (IOC,) * 4 + (FOK,) * 3 + (POST_ONLY,) * 3
MARKET_TIFS = (GTC,) * 8 + (IOC,) * 6 + (FOK,) * 5 + (POST_ONLY,)


class Flow:
    """A seeded random stream of commands and their timestamps.

    ``resting()`` lists the orders on the book (objects with ``order_id``, ``account``,
    ``price``, ``quantity`` and ``filled``), so that most cancels and amends hit a live order
    and the book stays small. Prices stay within about 15 ticks of a drifting mid, so orders cross
    often.
    """

    def __init__(self, seed: int, resting: Callable[[], list]) -> None:
        self.rng = random.Random(seed)
        self.resting = resting
        self.mid = 1_000
        self.ts = 1_764_218_885_000_000_000
        self.next_id = 0
        self.sent: list[tuple[str, str]] = []  # (account, order_id) of every submit so far

    def __iter__(self):
        return self

    def __next__(self) -> tuple[SubmitOrder | CancelOrder | AmendOrder, int]:
        rng = self.rng
        self.ts += rng.randint(1, 5_000)
        if rng.random() < 0.02:
            self.mid = max(100, self.mid + rng.choice((-1, 1)))
        r = rng.random()
        if r < 0.55:
            cmd = self._submit(LIMIT)
        elif r < 0.65:
            cmd = self._submit(MARKET)
        elif r < 0.90:
            cmd = self._cancel()
        else:
            cmd = self._amend()
        return cmd, self.ts

    def _symbol(self) -> str:
        return "ETH-USDT" if self.rng.random() < 0.003 else SYMBOL

    def _order_id(self, account: str) -> str:
        rng = self.rng
        r = rng.random()
        if r < 0.02 and self.sent:
            return rng.choice(self.sent)[1]  # maybe this account's (a duplicate), maybe another's
        if r < 0.03 and self.sent:
            for sent_account, order_id in reversed(self.sent[-20:]):
                if sent_account == account:
                    return order_id  # a recent id of this very account
        self.next_id += 1
        return f"o{self.next_id}"

    def _quantity(self) -> int:
        rng = self.rng
        r = rng.random()
        if r < 0.02:
            return rng.choice((0, 1, 201, -3))
        if r < 0.06:
            return rng.randint(13, 200)  # sweeps several levels
        return rng.randint(2, 12)

    def _submit(self, otype: OrderType) -> SubmitOrder:
        rng = self.rng
        account = rng.choice(ACCOUNTS)
        order_id = self._order_id(account)
        side = rng.choice((BUY, SELL))
        if otype is LIMIT:
            tif = rng.choice(LIMIT_TIFS)
            # Mostly on its own side of the mid, now and then across it: a deep book that
            # still trades often.
            distance = rng.randint(-4, 15)
            price: int | None = self.mid - distance if side is BUY else self.mid + distance
            r = rng.random()
            if r < 0.01:
                price = None
            elif r < 0.015:
                price = rng.choice((0, -5))
        else:
            tif = rng.choice(MARKET_TIFS)
            price = self.mid if rng.random() < 0.01 else None
        self.sent.append((account, order_id))
        return SubmitOrder(order_id, account, self._symbol(), side, otype, tif, price, self._quantity())

    def _pick_resting(self):
        resting = self.resting()
        return self.rng.choice(resting) if resting else None

    def _cancel(self) -> CancelOrder:
        rng = self.rng
        # The more orders rest, the more cancels hit one: the book hovers around
        # TARGET_RESTING orders instead of growing or draining.
        resting = self.resting()
        r = rng.random()
        order = rng.choice(resting) if resting and r < min(0.95, len(resting) / TARGET_RESTING) else None
        if order is not None:
            account = order.account if rng.random() < 0.9 else rng.choice(ACCOUNTS)
            return CancelOrder(order.order_id, account, self._symbol())
        if r < 0.97 and self.sent:
            account, order_id = rng.choice(self.sent)  # mostly ended or rejected by now
            return CancelOrder(order_id, account, self._symbol())
        return CancelOrder(f"never{rng.randint(1, 99)}", rng.choice(ACCOUNTS), self._symbol())

    def _amend(self) -> AmendOrder:
        rng = self.rng
        order = self._pick_resting()
        if order is None or rng.random() < 0.05:
            account, order_id = rng.choice(self.sent) if self.sent else ("alice", "o0")
            return AmendOrder(order_id, account, self._symbol(), self.mid, 5)
        account = order.account if rng.random() < 0.95 else rng.choice(ACCOUNTS)
        r = rng.random()
        if r < 0.3:
            price = None
        elif r < 0.4:
            price = order.price
        elif r < 0.75:
            price = order.price + rng.choice((-1, 1)) * rng.randint(1, 6)
        elif r < 0.98:
            price = self._crossing_price(order)
        else:
            price = rng.choice((0, -1))
        r = rng.random()
        if r < 0.25:
            quantity = None
        elif r < 0.3:
            quantity = order.quantity
        elif r < 0.55:
            quantity = rng.randint(order.filled + 1, order.quantity) if order.quantity > order.filled + 1 else None
        elif r < 0.85:
            quantity = rng.randint(order.quantity, order.quantity + 20)
        elif r < 0.95:
            quantity = rng.randint(0, order.filled) if order.filled else rng.choice((0, 1))
        else:
            quantity = rng.choice((201, 400, -2))
        if price is None and quantity is None and rng.random() < 0.7:
            quantity = rng.randint(2, 20)
        return AmendOrder(order.order_id, account, self._symbol(), price, quantity)

    def _crossing_price(self, order) -> int:
        """A price at or a little through the best opposite price, if there is one."""
        opposite = [o.price for o in self.resting() if o.side is not order.side]
        if not opposite:
            return order.price
        if order.side is BUY:
            return min(opposite) + self.rng.randint(0, 3)
        return max(1, max(opposite) - self.rng.randint(0, 3))


def resting_orders_of(engine: MatchingEngine) -> Callable[[], list]:
    return lambda: [*engine.book.orders(BUY), *engine.book.orders(SELL)]


def resting_orders_of_reference(ref: ReferenceBook) -> Callable[[], list]:
    return lambda: ref.bids + ref.asks


def engine_orders(engine: MatchingEngine, side: Side) -> list[tuple]:
    return [(o.order_id, o.account, o.side, o.price, o.quantity, o.filled, o.remaining)
            for o in engine.book.orders(side)]


def reference_orders(ref: ReferenceBook, side: Side) -> list[tuple]:
    return [o.as_tuple() for o in ref.orders(side)]


def _explain(i: int, cmd: object, got: list, want: list) -> str:
    lines = [f"command #{i}: {cmd!r}", "engine events:"]
    lines += [f"  {e!r}" for e in got]
    lines.append("reference events:")
    lines += [f"  {e!r}" for e in want]
    for j in range(max(len(got), len(want))):
        a = got[j] if j < len(got) else None
        b = want[j] if j < len(want) else None
        if a != b:
            lines.append(f"first difference at event {j}: engine {a!r} != reference {b!r}")
            break
    return "\n".join(lines)


@pytest.mark.parametrize("max_matches, count", [(None, STRESS_COMMANDS), (3, STRESS_COMMANDS // 5)],
                         ids=["as_shipped", "match_limit_3"])
def test_engine_matches_the_reference_model_on_a_random_flow(monkeypatch, max_matches, count):
    """With the match limit as shipped, and with a limit of 3 so that the flow meets it often."""
    if max_matches is not None:
        monkeypatch.setattr(zmx.engine, "MAX_MATCHES", max_matches)
        monkeypatch.setattr(reference_book, "MAX_MATCHES", max_matches)
    engine = MatchingEngine(SPEC)
    ref = ReferenceBook(SPEC)
    mirror = L2Mirror(SYMBOL)
    mirror.load_snapshot(0, [], [])
    flow = Flow(SEED, resting_orders_of_reference(ref))
    seq = 0
    depth = engine.depth()
    kinds: dict[str, int] = {}
    reasons: Counter[str] = Counter()
    max_resting = 0
    for i in range(count):
        cmd, ts = next(flow)
        got = engine.handle(cmd, ts_ns=ts)
        want = ref.handle(cmd, ts_ns=ts)
        if got != want:
            raise AssertionError(_explain(i, cmd, got, want))
        engine.book._check()

        # seq: one value per command, +1 exactly when the book changed, BookChanged last.
        assert got, f"command #{i} {cmd!r} gave no event"
        last = got[-1]
        changed = type(last) is BookChanged
        assert engine.seq == seq + changed, (i, cmd, engine.seq, seq)
        seq = engine.seq
        for event in got:
            assert event.seq == seq and event.ts_ns == ts and event.symbol == SYMBOL, (i, event)
        assert sum(type(e) is BookChanged for e in got) == changed, (i, got)
        kinds[type(got[0]).__name__] = kinds.get(type(got[0]).__name__, 0) + 1
        reasons.update(e.reason for e in got if type(e) is OrderCanceled)

        previous, depth = depth, engine.depth()
        assert depth == ref.depth(), (i, cmd, depth, ref.depth())
        if not changed:
            # Nothing public changed, so the mirror (unchanged) still equals the book.
            assert depth == previous, (i, cmd)
        else:
            assert last.bids or last.asks, (i, last)
            assert mirror.apply(last) is True
            bids, asks = mirror.levels()
            assert list(bids) == depth[0] and list(asks) == depth[1], (i, cmd)
            assert mirror.checksum(SPEC) == book_checksum(MEMO_SPEC, *depth), (i, cmd)
            max_resting = max(max_resting, len(ref.bids) + len(ref.asks))
        if i % FULL_COMPARE_EVERY == 0:
            for side in (BUY, SELL):
                assert engine_orders(engine, side) == reference_orders(ref, side), (i, side)
    assert mirror.seq == engine.seq == ref.seq
    for side in (BUY, SELL):
        assert engine_orders(engine, side) == reference_orders(ref, side), side
    assert engine.depth() == ref.depth()
    # The flow exercised what it is meant to: a busy book and every kind of answer.
    assert seq > count // 3, seq
    assert ref.next_trade_id > count // 10, ref.next_trade_id
    for name in ("OrderAccepted", "OrderRejected", "OrderCanceled", "CancelRejected", "OrderAmended",
                 "AmendRejected"):
        assert kinds.get(name, 0) > 100, kinds
    assert max_resting < 2_000, max_resting
    # The shipped limit is far above what this flow's orders meet; a limit of 3 is met often.
    assert reasons["match_limit"] > 100 if max_matches is not None else reasons["match_limit"] == 0, reasons


# -- determinism -----------------------------------------------------------------------------


def _encoded(events: Iterable) -> list[bytes]:
    return [encode(e) for e in events]


def test_restored_engine_answers_byte_identically():
    engine = MatchingEngine(SPEC)
    flow = Flow(SEED + 1, resting_orders_of(engine))
    for _ in range(20_000):
        cmd, ts = next(flow)
        engine.handle(cmd, ts_ns=ts)
    assert engine.book.index, "the snapshot should hold resting orders"
    assert any(o.filled for s in (BUY, SELL) for o in engine.book.orders(s)), "and partly filled ones"

    data = engine.snapshot()
    twin = MatchingEngine.restore(data)
    twin.book._check()
    assert twin.snapshot() == data
    assert twin.seq == engine.seq
    assert twin.depth() == engine.depth()
    for side in (BUY, SELL):
        assert engine_orders(twin, side) == engine_orders(engine, side)

    for i in range(5_000):
        cmd, ts = next(flow)
        a = _encoded(engine.handle(cmd, ts_ns=ts))
        b = _encoded(twin.handle(cmd, ts_ns=ts))
        assert a == b, (i, cmd)
    assert twin.snapshot() == engine.snapshot()


def flow_digest(count: int, seed: int = SEED + 2) -> str:
    """sha256 of the encoded events of ``count`` commands of the flow, command by command."""
    engine = MatchingEngine(SPEC)
    flow = Flow(seed, resting_orders_of(engine))
    digest = hashlib.sha256()
    for _ in range(count):
        cmd, ts = next(flow)
        events = engine.handle(cmd, ts_ns=ts)
        digest.update(len(events).to_bytes(2, "big"))
        for event in events:
            digest.update(encode(event))
    digest.update(engine.snapshot())
    return digest.hexdigest()


DIGEST_COMMANDS = 50_000


def test_events_do_not_depend_on_the_hash_seed():
    here = Path(__file__).resolve()
    assert flow_digest(2_000) != flow_digest(2_000, seed=SEED + 3), "the digest must depend on the events"
    expected = flow_digest(DIGEST_COMMANDS)
    for hash_seed in ("0", "4242"):
        env = dict(os.environ, PYTHONHASHSEED=hash_seed)
        out = subprocess.run(
            [sys.executable, str(here), str(DIGEST_COMMANDS)],
            env=env, cwd=here.parent.parent, capture_output=True, text=True, timeout=120, check=False,
        )
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == expected, f"PYTHONHASHSEED={hash_seed} gave other events"


if __name__ == "__main__":
    print(flow_digest(int(sys.argv[1])))


def test_the_order_path_leaves_no_reference_cycles():
    """The matcher freezes its heap out of the garbage collector at every snapshot
    (``Matcher.fork_snapshot``): that is only safe while nothing on the order path leaves
    cyclic garbage, which refcounting alone would never free. Decode, handle, pack the events
    as the matcher does, hand the used ids over as a snapshot does: the collector finds
    nothing to collect."""
    engine = MatchingEngine(SPEC)
    flow = Flow(SEED + 3, resting_orders_of(engine))
    gc.collect()
    enabled = gc.isenabled()
    gc.disable()
    try:
        kinds: Counter[str] = Counter()
        for i in range(20_000):
            cmd, ts = next(flow)
            try:
                cmd = decode(encode(cmd))
            except DecodeError as e:  # off the wire's range (a negative quantity): a matcher refuses it
                kinds["refused"] += len(str(e)) > 0  # and puts the message in its reply
            events = engine.handle(cmd, ts_ns=ts)
            kinds.update(type(e).__name__ for e in events)
            join_batch(pack_records(events))
            if i % 5_000 == 4_999:
                engine.hand_over_used_ids()
                engine.take_handed(10**9)
        assert {"TradeOccurred", "OrderAmended", "OrderRejected", "OrderCanceled", "refused"} <= set(kinds), kinds
        assert gc.collect() == 0
    finally:
        if enabled:
            gc.enable()
