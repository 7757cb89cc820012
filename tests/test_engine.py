"""The matching rules of docs/matching.md, one test per rule, asserting the events a user sees."""

from __future__ import annotations

import msgpack
import pytest

from zmx.commands import AmendOrder, CancelOrder, SubmitOrder
from zmx.engine import MAX_MATCHES, MatchingEngine
from zmx.events import (
    AmendRejected,
    BookChanged,
    CancelRejected,
    OrderAccepted,
    OrderAmended,
    OrderCanceled,
    OrderFilled,
    OrderRejected,
    TradeOccurred,
)
from zmx.model import MAX_UNITS, OrderType, Side, SymbolSpec, TimeInForce

SYM = "BTC-USDT"
# 1 lot = 0.001: valid quantities are 2 to 1000 lots.
SPEC = SymbolSpec(SYM, "0.01", "0.001", min_quantity="0.002", max_quantity="1")
TS = 1_764_218_885_123_456_789

BUY, SELL = Side.BUY, Side.SELL
LIMIT, MARKET = OrderType.LIMIT, OrderType.MARKET
GTC, IOC, FOK, POST_ONLY = TimeInForce.GTC, TimeInForce.IOC, TimeInForce.FOK, TimeInForce.POST_ONLY


# -- helpers ---------------------------------------------------------------------------------


def limit(order_id: str, side: Side, price: int | None, quantity: int, account: str = "alice",
          tif: TimeInForce = GTC, symbol: str = SYM) -> SubmitOrder:
    return SubmitOrder(order_id, account, symbol, side, LIMIT, tif, price, quantity)


def market(order_id: str, side: Side, quantity: int, account: str = "alice", tif: TimeInForce = GTC,
           price: int | None = None) -> SubmitOrder:
    return SubmitOrder(order_id, account, SYM, side, MARKET, tif, price, quantity)


def cancel(order_id: str, account: str = "alice", symbol: str = SYM) -> CancelOrder:
    return CancelOrder(order_id, account, symbol)


def amend(order_id: str, price: int | None = None, quantity: int | None = None, account: str = "alice"
          ) -> AmendOrder:
    return AmendOrder(order_id, account, SYM, price, quantity)


def run(engine: MatchingEngine, cmd, ts: int = TS) -> list:
    """Handle one command and check what holds for every command."""
    seq_before = engine.seq
    events = engine.handle(cmd, ts_ns=ts)
    engine.book._check()
    assert events
    assert all(e.seq == engine.seq and e.ts_ns == ts and e.symbol == SYM for e in events), events
    changed = type(events[-1]) is BookChanged
    assert engine.seq == seq_before + changed
    assert sum(type(e) is BookChanged for e in events) == changed
    return events


def accepted(seq: int, order_id: str, side: Side, price: int | None, quantity: int, account: str = "alice",
             type: OrderType = LIMIT, tif: TimeInForce = GTC) -> OrderAccepted:
    return OrderAccepted(SYM, seq, TS, order_id, account, side, type, tif, price, quantity)


def rejected(seq: int, order_id: str, reason: str, account: str = "alice") -> OrderRejected:
    return OrderRejected(SYM, seq, TS, order_id, account, reason)


def trade(seq: int, trade_id: int, price: int, quantity: int, taker_side: Side) -> TradeOccurred:
    return TradeOccurred(SYM, seq, TS, trade_id, price, quantity, taker_side)


def filled(seq: int, order_id: str, side: Side, trade_id: int, price: int, quantity: int, total: int,
           remaining: int, maker: bool, account: str = "alice") -> OrderFilled:
    return OrderFilled(SYM, seq, TS, order_id, account, side, trade_id, price, quantity, total, remaining, maker)


def canceled(seq: int, order_id: str, side: Side, price: int | None, filled: int, canceled: int, reason: str,
             account: str = "alice") -> OrderCanceled:
    return OrderCanceled(SYM, seq, TS, order_id, account, side, price, filled, canceled, reason)


def amended(seq: int, order_id: str, side: Side, price: int, quantity: int, remaining: int,
            account: str = "alice") -> OrderAmended:
    return OrderAmended(SYM, seq, TS, order_id, account, side, price, quantity, remaining)


def book(seq: int, bids=(), asks=()) -> BookChanged:
    return BookChanged(SYM, seq, TS, tuple(bids), tuple(asks))


def resting(engine: MatchingEngine, side: Side) -> list[tuple]:
    """(order_id, account, price, quantity, filled, remaining) in priority order."""
    return [(o.order_id, o.account, o.price, o.quantity, o.filled, o.remaining) for o in engine.book.orders(side)]


@pytest.fixture
def engine() -> MatchingEngine:
    return MatchingEngine(SPEC)


# -- the engine's identity -------------------------------------------------------------------


def test_a_new_engine_is_empty_at_seq_zero(engine):
    assert engine.spec is SPEC
    assert engine.symbol == SYM
    assert engine.seq == 0
    assert engine.depth() == ([], [])


# -- limit orders ----------------------------------------------------------------------------


def test_limit_order_rests_and_book_changed_shows_the_level(engine):
    assert run(engine, limit("a1", BUY, 100, 5)) == [accepted(1, "a1", BUY, 100, 5), book(1, bids=[(100, 5)])]
    assert run(engine, limit("a2", BUY, 100, 3)) == [accepted(2, "a2", BUY, 100, 3), book(2, bids=[(100, 8)])]
    assert run(engine, limit("a3", SELL, 103, 4)) == [accepted(3, "a3", SELL, 103, 4), book(3, asks=[(103, 4)])]
    assert engine.depth() == ([(100, 8)], [(103, 4)])


def test_depth_is_best_first_and_can_be_limited(engine):
    for i, price in enumerate((100, 102, 101)):
        run(engine, limit(f"b{i}", BUY, price, 2))
        run(engine, limit(f"s{i}", SELL, price + 10, 3))
    assert engine.depth() == ([(102, 2), (101, 2), (100, 2)], [(110, 3), (111, 3), (112, 3)])
    assert engine.depth(2) == ([(102, 2), (101, 2)], [(110, 3), (111, 3)])


def test_price_time_priority_at_the_same_price(engine):
    run(engine, limit("a1", SELL, 100, 5, account="alice"))
    run(engine, limit("b1", SELL, 100, 5, account="bob"))
    assert run(engine, limit("c1", BUY, 100, 7, account="carol")) == [
        accepted(3, "c1", BUY, 100, 7, account="carol"),
        trade(3, 1, 100, 5, BUY),
        filled(3, "a1", SELL, 1, 100, 5, 5, 0, True, account="alice"),
        filled(3, "c1", BUY, 1, 100, 5, 5, 2, False, account="carol"),
        trade(3, 2, 100, 2, BUY),
        filled(3, "b1", SELL, 2, 100, 2, 2, 3, True, account="bob"),
        filled(3, "c1", BUY, 2, 100, 2, 7, 0, False, account="carol"),
        book(3, asks=[(100, 3)]),
    ]
    assert resting(engine, SELL) == [("b1", "bob", 100, 5, 2, 3)]


def test_better_price_first_whatever_the_time(engine):
    run(engine, limit("a1", SELL, 101, 5, account="alice"))
    run(engine, limit("b1", SELL, 100, 5, account="bob"))
    events = run(engine, limit("c1", BUY, 101, 5, account="carol"))
    assert events[1:4] == [
        trade(3, 1, 100, 5, BUY),
        filled(3, "b1", SELL, 1, 100, 5, 5, 0, True, account="bob"),
        filled(3, "c1", BUY, 1, 100, 5, 5, 0, False, account="carol"),
    ]
    assert engine.depth() == ([], [(101, 5)])


def test_a_trade_happens_at_the_maker_price(engine):
    run(engine, limit("a1", BUY, 100, 5, account="alice"))
    assert run(engine, limit("b1", SELL, 95, 5, account="bob")) == [
        accepted(2, "b1", SELL, 95, 5, account="bob"),
        trade(2, 1, 100, 5, SELL),
        filled(2, "a1", BUY, 1, 100, 5, 5, 0, True, account="alice"),
        filled(2, "b1", SELL, 1, 100, 5, 5, 0, False, account="bob"),
        book(2, bids=[(100, 0)]),
    ]


def test_partial_fills_report_filled_and_remaining(engine):
    run(engine, limit("a1", SELL, 100, 10, account="alice"))
    assert run(engine, limit("b1", BUY, 100, 4, account="bob")) == [
        accepted(2, "b1", BUY, 100, 4, account="bob"),
        trade(2, 1, 100, 4, BUY),
        filled(2, "a1", SELL, 1, 100, 4, 4, 6, True, account="alice"),
        filled(2, "b1", BUY, 1, 100, 4, 4, 0, False, account="bob"),
        book(2, asks=[(100, 6)]),
    ]
    # The rest of the incoming order rests at its own price.
    assert run(engine, limit("b2", BUY, 100, 10, account="bob")) == [
        accepted(3, "b2", BUY, 100, 10, account="bob"),
        trade(3, 2, 100, 6, BUY),
        filled(3, "a1", SELL, 2, 100, 6, 10, 0, True, account="alice"),
        filled(3, "b2", BUY, 2, 100, 6, 6, 4, False, account="bob"),
        book(3, bids=[(100, 4)], asks=[(100, 0)]),
    ]
    assert resting(engine, BUY) == [("b2", "bob", 100, 10, 6, 4)]
    assert resting(engine, SELL) == []


def test_ioc_remainder_is_canceled_with_reason_ioc(engine):
    run(engine, limit("a1", SELL, 100, 5, account="alice"))
    run(engine, limit("a2", SELL, 101, 5, account="alice"))
    assert run(engine, limit("b1", BUY, 100, 8, account="bob", tif=IOC)) == [
        accepted(3, "b1", BUY, 100, 8, account="bob", tif=IOC),
        trade(3, 1, 100, 5, BUY),
        filled(3, "a1", SELL, 1, 100, 5, 5, 0, True, account="alice"),
        filled(3, "b1", BUY, 1, 100, 5, 5, 3, False, account="bob"),
        canceled(3, "b1", BUY, 100, 5, 3, "ioc", account="bob"),
        book(3, asks=[(100, 0)]),
    ]
    assert engine.depth() == ([], [(101, 5)])


def test_ioc_that_finds_nothing_changes_nothing(engine):
    run(engine, limit("a1", SELL, 101, 5, account="alice"))
    assert run(engine, limit("b1", BUY, 100, 8, account="bob", tif=IOC)) == [
        accepted(1, "b1", BUY, 100, 8, account="bob", tif=IOC),
        canceled(1, "b1", BUY, 100, 0, 8, "ioc", account="bob"),
    ]
    assert engine.seq == 1
    assert engine.depth() == ([], [(101, 5)])


def test_fok_without_enough_liquidity_is_accepted_then_canceled_and_the_book_is_untouched(engine):
    run(engine, limit("a1", SELL, 100, 5, account="alice"))
    run(engine, limit("a2", SELL, 101, 5, account="alice"))
    run(engine, limit("a3", SELL, 102, 5, account="alice"))
    before = engine.depth(), resting(engine, SELL)
    # 15 lots rest, but only 10 at 101 or better.
    assert run(engine, limit("b1", BUY, 101, 11, account="bob", tif=FOK)) == [
        accepted(3, "b1", BUY, 101, 11, account="bob", tif=FOK),
        canceled(3, "b1", BUY, 101, 0, 11, "fok", account="bob"),
    ]
    assert engine.seq == 3
    assert (engine.depth(), resting(engine, SELL)) == before
    # The next trade is still trade 1: the failed FOK traded nothing.
    assert run(engine, limit("b2", BUY, 100, 2, account="bob"))[1] == trade(4, 1, 100, 2, BUY)


def test_fok_fills_exactly_what_is_there(engine):
    run(engine, limit("a1", SELL, 100, 5, account="alice"))
    run(engine, limit("a2", SELL, 101, 5, account="alice"))
    assert run(engine, limit("b1", BUY, 101, 10, account="bob", tif=FOK)) == [
        accepted(3, "b1", BUY, 101, 10, account="bob", tif=FOK),
        trade(3, 1, 100, 5, BUY),
        filled(3, "a1", SELL, 1, 100, 5, 5, 0, True, account="alice"),
        filled(3, "b1", BUY, 1, 100, 5, 5, 5, False, account="bob"),
        trade(3, 2, 101, 5, BUY),
        filled(3, "a2", SELL, 2, 101, 5, 5, 0, True, account="alice"),
        filled(3, "b1", BUY, 2, 101, 5, 10, 0, False, account="bob"),
        book(3, asks=[(100, 0), (101, 0)]),
    ]
    assert engine.depth() == ([], [])


def test_fok_does_not_count_the_accounts_own_orders(engine):
    run(engine, limit("a1", SELL, 100, 5, account="alice"))
    run(engine, limit("b1", SELL, 100, 5, account="bob"))
    # 10 lots rest, 5 of them alice's own: not enough for 6.
    assert run(engine, limit("a2", BUY, 100, 6, account="alice", tif=FOK)) == [
        accepted(2, "a2", BUY, 100, 6, account="alice", tif=FOK),
        canceled(2, "a2", BUY, 100, 0, 6, "fok", account="alice"),
    ]
    assert resting(engine, SELL) == [("a1", "alice", 100, 5, 0, 5), ("b1", "bob", 100, 5, 0, 5)]
    # Enough for 5: it fills, and the own resting order meets the self-trade rule on the way.
    assert run(engine, limit("a3", BUY, 100, 5, account="alice", tif=FOK)) == [
        accepted(3, "a3", BUY, 100, 5, account="alice", tif=FOK),
        canceled(3, "a1", SELL, 100, 0, 5, "self_trade", account="alice"),
        trade(3, 1, 100, 5, BUY),
        filled(3, "b1", SELL, 1, 100, 5, 5, 0, True, account="bob"),
        filled(3, "a3", BUY, 1, 100, 5, 5, 0, False, account="alice"),
        book(3, asks=[(100, 0)]),
    ]


def test_post_only_that_would_cross_is_rejected_and_seq_stays(engine):
    run(engine, limit("a1", SELL, 100, 5, account="alice"))
    assert run(engine, limit("b1", BUY, 100, 5, account="bob", tif=POST_ONLY)) == [
        rejected(1, "b1", "would_cross", account="bob"),
    ]
    assert run(engine, limit("b1", BUY, 105, 5, account="bob", tif=POST_ONLY)) == [
        rejected(1, "b1", "would_cross", account="bob"),
    ]
    assert engine.seq == 1
    assert engine.depth() == ([], [(100, 5)])


def test_post_only_would_cross_also_against_the_accounts_own_order(engine):
    # "would cross" is about the price: the order would meet the book, whoever rests there.
    run(engine, limit("a1", SELL, 100, 5, account="alice"))
    assert run(engine, limit("a2", BUY, 100, 5, account="alice", tif=POST_ONLY)) == [
        rejected(1, "a2", "would_cross"),
    ]
    assert resting(engine, SELL) == [("a1", "alice", 100, 5, 0, 5)]


def test_post_only_that_does_not_cross_rests(engine):
    run(engine, limit("a1", SELL, 100, 5, account="alice"))
    assert run(engine, limit("b1", BUY, 99, 5, account="bob", tif=POST_ONLY)) == [
        accepted(2, "b1", BUY, 99, 5, account="bob", tif=POST_ONLY),
        book(2, bids=[(99, 5)]),
    ]
    # and it is an ordinary maker afterwards
    events = run(engine, limit("c1", SELL, 99, 2, account="carol"))
    assert events[1] == trade(3, 1, 99, 2, SELL)


# -- market orders ---------------------------------------------------------------------------


def _three_asks(engine: MatchingEngine) -> None:
    run(engine, limit("s1", SELL, 100, 5, account="bob"))
    run(engine, limit("s2", SELL, 101, 5, account="bob"))
    run(engine, limit("s3", SELL, 103, 5, account="bob"))


def test_market_order_sweeps_levels_and_cancels_the_rest_with_no_liquidity(engine):
    _three_asks(engine)
    assert run(engine, market("m1", BUY, 20)) == [
        accepted(4, "m1", BUY, None, 20, type=MARKET),
        trade(4, 1, 100, 5, BUY),
        filled(4, "s1", SELL, 1, 100, 5, 5, 0, True, account="bob"),
        filled(4, "m1", BUY, 1, 100, 5, 5, 15, False),
        trade(4, 2, 101, 5, BUY),
        filled(4, "s2", SELL, 2, 101, 5, 5, 0, True, account="bob"),
        filled(4, "m1", BUY, 2, 101, 5, 10, 10, False),
        trade(4, 3, 103, 5, BUY),
        filled(4, "s3", SELL, 3, 103, 5, 5, 0, True, account="bob"),
        filled(4, "m1", BUY, 3, 103, 5, 15, 5, False),
        canceled(4, "m1", BUY, None, 15, 5, "no_liquidity"),
        book(4, asks=[(100, 0), (101, 0), (103, 0)]),
    ]


def test_market_order_that_fills_ends_without_a_cancel(engine):
    _three_asks(engine)
    events = run(engine, market("m1", BUY, 12, tif=IOC))
    assert events[-2:] == [filled(4, "m1", BUY, 3, 103, 2, 12, 0, False), book(4, asks=[(100, 0), (101, 0), (103, 3)])]
    assert not any(type(e) is OrderCanceled for e in events)


@pytest.mark.parametrize("tif", [GTC, IOC])
def test_market_order_on_an_empty_book_is_canceled_no_liquidity(engine, tif):
    assert run(engine, market("m1", SELL, 5, tif=tif)) == [
        accepted(0, "m1", SELL, None, 5, type=MARKET, tif=tif),
        canceled(0, "m1", SELL, None, 0, 5, "no_liquidity"),
    ]
    assert engine.seq == 0
    # the id is used for good all the same
    assert run(engine, market("m1", SELL, 5, tif=tif)) == [rejected(0, "m1", "duplicate_order_id")]


def test_market_fok_fills_completely_or_is_canceled_fok(engine):
    _three_asks(engine)
    assert run(engine, market("m1", BUY, 16, tif=FOK)) == [
        accepted(3, "m1", BUY, None, 16, type=MARKET, tif=FOK),
        canceled(3, "m1", BUY, None, 0, 16, "fok"),
    ]
    assert engine.depth() == ([], [(100, 5), (101, 5), (103, 5)])
    events = run(engine, market("m2", BUY, 15, tif=FOK))
    assert [type(e) for e in events].count(TradeOccurred) == 3
    assert events[-1] == book(4, asks=[(100, 0), (101, 0), (103, 0)])


def test_market_post_only_is_rejected_invalid_field(engine):
    _three_asks(engine)
    assert run(engine, market("m1", BUY, 5, tif=POST_ONLY)) == [rejected(3, "m1", "invalid_field")]
    assert engine.depth() == ([], [(100, 5), (101, 5), (103, 5)])


def test_market_order_with_a_price_is_rejected_invalid_price(engine):
    assert run(engine, market("m1", BUY, 5, price=100)) == [rejected(0, "m1", "invalid_price")]


# -- validation ------------------------------------------------------------------------------


def test_unknown_symbol_is_rejected(engine):
    assert run(engine, limit("a1", BUY, 100, 5, symbol="ETH-USDT")) == [rejected(0, "a1", "unknown_symbol")]


@pytest.mark.parametrize("price", [None, 0, -1])
def test_limit_order_without_a_positive_price_is_rejected(engine, price):
    assert run(engine, limit("a1", BUY, price, 5)) == [rejected(0, "a1", "invalid_price")]


@pytest.mark.parametrize("quantity", [0, -5, 1, 1001], ids=["zero", "negative", "below_min", "above_max"])
def test_quantity_outside_the_limits_is_rejected(engine, quantity):
    assert run(engine, limit("a1", BUY, 100, quantity)) == [rejected(0, "a1", "invalid_quantity")]
    assert run(engine, market("m1", BUY, quantity)) == [rejected(0, "m1", "invalid_quantity")]


def test_prices_up_to_the_64_bit_limit_rest_and_trade(engine):
    top = MAX_UNITS  # integers inside fit a signed 64-bit word
    assert run(engine, limit("a1", BUY, top, 5)) == [accepted(1, "a1", BUY, top, 5), book(1, bids=[(top, 5)])]
    assert run(engine, limit("a2", BUY, top + 1, 5)) == [rejected(1, "a2", "invalid_price")]
    events = run(engine, limit("b1", SELL, 1, 5, account="bob"))
    assert events[1] == trade(2, 1, top, 5, SELL)
    assert run(engine, limit("b2", SELL, top, 5, account="bob"))[-1] == book(3, asks=[(top, 5)])
    assert run(engine, limit("a3", BUY, 1, 5))[-1] == book(4, bids=[(1, 5)])
    assert engine.depth() == ([(1, 5)], [(top, 5)])


def test_a_price_level_never_holds_more_than_the_64_bit_limit():
    """With no max_quantity an order may be 2^63 - 1 lots; two of them at one price would make
    a level total the wire cannot carry (a BookChanged no codec packs): the order that would
    take the level past it is rejected, a submit or an amend, and the book stays as it was."""
    engine = MatchingEngine(SymbolSpec(SYM, "0.01", "0.001"))
    assert engine.spec.max_lots == MAX_UNITS
    assert run(engine, limit("a1", SELL, 100, MAX_UNITS - 5))[-1] == book(1, asks=[(100, MAX_UNITS - 5)])
    assert run(engine, limit("a2", SELL, 100, 6)) == [rejected(1, "a2", "invalid_quantity")]
    assert run(engine, limit("a3", SELL, 100, 5))[-1] == book(2, asks=[(100, MAX_UNITS)])  # exactly at the limit
    assert run(engine, limit("a4", SELL, 101, 7))[-1] == book(3, asks=[(101, 7)])  # another level has room
    reject = AmendRejected(SYM, 3, TS, "a4", "alice", "invalid_quantity")
    assert run(engine, amend("a4", price=100)) == [reject]  # moved onto the full level
    assert run(engine, amend("a3", quantity=6)) == [AmendRejected(SYM, 3, TS, "a3", "alice", "invalid_quantity")]
    assert run(engine, amend("a3", quantity=4))[-1] == book(4, asks=[(100, MAX_UNITS - 1)])  # smaller: fine
    assert run(engine, amend("a3", quantity=5))[-1] == book(5, asks=[(100, MAX_UNITS)])  # its own lots count once
    assert engine.depth() == ([], [(100, MAX_UNITS), (101, 7)])
    # a market order never rests: it may take the whole level
    assert run(engine, market("b1", BUY, MAX_UNITS, account="bob"))[-1] == book(6, asks=[(100, 0)])
    assert engine.depth() == ([], [(101, 7)])


@pytest.mark.parametrize("price", [100.0, "100"])
def test_a_price_that_is_not_an_integer_is_rejected(engine, price):
    assert run(engine, limit("a1", BUY, price, 5)) == [rejected(0, "a1", "invalid_price")]


@pytest.mark.parametrize("quantity", [5.0, "5"])
def test_a_quantity_that_is_not_an_integer_is_rejected(engine, quantity):
    assert run(engine, limit("a1", BUY, 100, quantity)) == [rejected(0, "a1", "invalid_quantity")]


def test_quantity_at_the_limits_is_accepted(engine):
    assert run(engine, limit("a1", BUY, 100, 2))[0] == accepted(1, "a1", BUY, 100, 2)
    assert run(engine, limit("a2", BUY, 100, 1000))[0] == accepted(2, "a2", BUY, 100, 1000)


def test_duplicate_order_id_while_the_order_rests(engine):
    run(engine, limit("a1", BUY, 100, 5))
    assert run(engine, limit("a1", BUY, 99, 5)) == [rejected(1, "a1", "duplicate_order_id")]
    assert run(engine, limit("a1", SELL, 120, 5)) == [rejected(1, "a1", "duplicate_order_id")]
    assert engine.depth() == ([(100, 5)], [])


@pytest.mark.parametrize("end", ["filled", "canceled", "ioc", "fok", "self_trade"])
def test_duplicate_order_id_after_the_order_ended(engine, end):
    if end == "filled":
        run(engine, limit("a1", BUY, 100, 5))
        run(engine, limit("b1", SELL, 100, 5, account="bob"))
    elif end == "canceled":
        run(engine, limit("a1", BUY, 100, 5))
        run(engine, cancel("a1"))
    elif end == "ioc":
        run(engine, limit("a1", BUY, 100, 5, tif=IOC))
    elif end == "fok":
        run(engine, limit("a1", BUY, 100, 5, tif=FOK))
    else:
        run(engine, limit("a1", BUY, 100, 5))
        run(engine, limit("a9", SELL, 100, 5))
    assert "a1" not in [o[0] for o in resting(engine, BUY)]
    assert run(engine, limit("a1", BUY, 100, 5)) == [rejected(engine.seq, "a1", "duplicate_order_id")]


def test_another_account_may_use_the_same_order_id(engine):
    run(engine, limit("x1", BUY, 100, 5, account="alice"))
    assert run(engine, limit("x1", BUY, 100, 5, account="bob")) == [
        accepted(2, "x1", BUY, 100, 5, account="bob"),
        book(2, bids=[(100, 10)]),
    ]


@pytest.mark.parametrize("bad", [
    limit("r1", BUY, 100, 5, symbol="ETH-USDT"),
    limit("r1", BUY, 0, 5),
    limit("r1", BUY, 100, 0),
    limit("r1", SELL, 100, 5, tif=POST_ONLY),
    market("r1", BUY, 5, tif=POST_ONLY),
], ids=["unknown_symbol", "invalid_price", "invalid_quantity", "would_cross", "invalid_field"])
def test_a_rejected_order_id_may_be_sent_again(engine, bad):
    run(engine, limit("b1", BUY, 100, 5, account="bob"))
    assert type(run(engine, bad)[0]) is OrderRejected
    assert run(engine, limit("r1", BUY, 99, 5)) == [accepted(2, "r1", BUY, 99, 5), book(2, bids=[(99, 5)])]


@pytest.mark.parametrize("cmd, reason", [
    (limit("a1", BUY, 0, 0, symbol="ETH-USDT"), "unknown_symbol"),
    (limit("a1", BUY, None, 0), "invalid_price"),
    (market("a1", BUY, 0, price=100, tif=POST_ONLY), "invalid_price"),
    (limit("a1", SELL, 100, 0), "invalid_quantity"),
    (limit("a1", SELL, 100, 5, tif=POST_ONLY), "duplicate_order_id"),
    (market("a1", BUY, 0, tif=POST_ONLY), "invalid_quantity"),
    (market("a1", BUY, 5, tif=POST_ONLY), "duplicate_order_id"),
    (market("m1", BUY, 5, tif=POST_ONLY), "invalid_field"),
    (limit("p1", SELL, 100, 5, tif=POST_ONLY), "would_cross"),
])
def test_validation_order_the_first_failed_check_gives_the_reason(engine, cmd, reason):
    run(engine, limit("a1", BUY, 100, 5))  # a1 is used; a bid at 100 rests
    assert run(engine, cmd) == [rejected(1, cmd.order_id, reason)]


# -- self-trade prevention -------------------------------------------------------------------


def test_self_trade_cancels_the_resting_order_and_matching_goes_on(engine):
    run(engine, limit("b1", SELL, 100, 5, account="bob"))
    run(engine, limit("a1", SELL, 100, 3, account="alice"))
    run(engine, limit("b2", SELL, 100, 5, account="bob"))
    run(engine, limit("a2", SELL, 101, 4, account="alice"))
    assert run(engine, limit("a3", BUY, 101, 12, account="alice")) == [
        accepted(5, "a3", BUY, 101, 12),
        trade(5, 1, 100, 5, BUY),
        filled(5, "b1", SELL, 1, 100, 5, 5, 0, True, account="bob"),
        filled(5, "a3", BUY, 1, 100, 5, 5, 7, False),
        canceled(5, "a1", SELL, 100, 0, 3, "self_trade"),
        trade(5, 2, 100, 5, BUY),
        filled(5, "b2", SELL, 2, 100, 5, 5, 0, True, account="bob"),
        filled(5, "a3", BUY, 2, 100, 5, 10, 2, False),
        canceled(5, "a2", SELL, 101, 0, 4, "self_trade"),
        book(5, bids=[(101, 2)], asks=[(100, 0), (101, 0)]),
    ]
    assert resting(engine, BUY) == [("a3", "alice", 101, 12, 10, 2)]


def test_self_trade_reports_what_the_canceled_order_had_filled(engine):
    run(engine, limit("a1", SELL, 100, 10, account="alice"))
    run(engine, limit("b1", BUY, 100, 4, account="bob"))
    assert run(engine, limit("a2", BUY, 100, 2, account="alice", tif=IOC)) == [
        accepted(3, "a2", BUY, 100, 2, tif=IOC),
        canceled(3, "a1", SELL, 100, 4, 6, "self_trade"),
        canceled(3, "a2", BUY, 100, 0, 2, "ioc"),
        book(3, asks=[(100, 0)]),
    ]


def test_no_account_ever_trades_with_itself(engine):
    run(engine, limit("a1", BUY, 100, 5))
    assert run(engine, market("a2", SELL, 5)) == [
        accepted(2, "a2", SELL, None, 5, type=MARKET),
        canceled(2, "a1", BUY, 100, 0, 5, "self_trade"),
        canceled(2, "a2", SELL, None, 0, 5, "no_liquidity"),
        book(2, bids=[(100, 0)]),
    ]


# -- cancel ----------------------------------------------------------------------------------


def test_cancel_removes_the_resting_order(engine):
    run(engine, limit("a1", BUY, 100, 5))
    run(engine, limit("a2", BUY, 100, 3))
    assert run(engine, cancel("a1")) == [canceled(3, "a1", BUY, 100, 0, 5, "user"), book(3, bids=[(100, 3)])]
    assert run(engine, cancel("a2")) == [canceled(4, "a2", BUY, 100, 0, 3, "user"), book(4, bids=[(100, 0)])]
    assert engine.depth() == ([], [])


def test_cancel_of_a_partly_filled_order_reports_filled_and_canceled(engine):
    run(engine, limit("a1", SELL, 100, 10))
    run(engine, limit("b1", BUY, 100, 4, account="bob"))
    assert run(engine, cancel("a1")) == [canceled(3, "a1", SELL, 100, 4, 6, "user"), book(3, asks=[(100, 0)])]


def test_cancel_of_an_unknown_order_is_rejected(engine):
    assert run(engine, cancel("nope")) == [CancelRejected(SYM, 0, TS, "nope", "alice", "unknown_order")]


def test_cancel_of_another_accounts_order_looks_like_an_unknown_order(engine):
    run(engine, limit("a1", BUY, 100, 5, account="alice"))
    assert run(engine, cancel("a1", account="bob")) == [CancelRejected(SYM, 1, TS, "a1", "bob", "unknown_order")]
    assert engine.depth() == ([(100, 5)], [])


@pytest.mark.parametrize("end", ["filled", "canceled", "ioc"])
def test_cancel_of_an_order_that_ended_is_rejected(engine, end):
    if end == "filled":
        run(engine, limit("a1", BUY, 100, 5))
        run(engine, limit("b1", SELL, 100, 5, account="bob"))
    elif end == "canceled":
        run(engine, limit("a1", BUY, 100, 5))
        run(engine, cancel("a1"))
    else:
        run(engine, limit("a1", BUY, 100, 5, tif=IOC))
    seq = engine.seq
    assert run(engine, cancel("a1")) == [CancelRejected(SYM, seq, TS, "a1", "alice", "unknown_order")]


# -- amend -----------------------------------------------------------------------------------


def _two_asks(engine: MatchingEngine) -> None:
    run(engine, limit("a1", SELL, 100, 10, account="alice"))
    run(engine, limit("b1", SELL, 100, 10, account="bob"))


def test_amend_to_a_lower_quantity_keeps_the_place_in_the_queue(engine):
    _two_asks(engine)
    assert run(engine, amend("a1", quantity=6)) == [amended(3, "a1", SELL, 100, 6, 6), book(3, asks=[(100, 16)])]
    events = run(engine, limit("c1", BUY, 100, 6, account="carol"))
    assert events[2] == filled(4, "a1", SELL, 1, 100, 6, 6, 0, True)


def test_amend_to_a_higher_quantity_goes_to_the_back_of_the_queue(engine):
    _two_asks(engine)
    assert run(engine, amend("a1", quantity=12)) == [amended(3, "a1", SELL, 100, 12, 12), book(3, asks=[(100, 22)])]
    assert [o[0] for o in resting(engine, SELL)] == ["b1", "a1"]
    events = run(engine, limit("c1", BUY, 100, 6, account="carol"))
    assert events[2] == filled(4, "b1", SELL, 1, 100, 6, 6, 4, True, account="bob")


def test_amend_to_a_new_price_goes_to_the_back_of_the_queue(engine):
    _two_asks(engine)
    assert run(engine, amend("a1", price=101)) == [
        amended(3, "a1", SELL, 101, 10, 10),
        book(3, asks=[(100, 10), (101, 10)]),
    ]
    assert run(engine, amend("a1", price=100)) == [
        amended(4, "a1", SELL, 100, 10, 10),
        book(4, asks=[(100, 20), (101, 0)]),
    ]
    assert [o[0] for o in resting(engine, SELL)] == ["b1", "a1"]
    events = run(engine, limit("c1", BUY, 100, 6, account="carol"))
    assert events[2] == filled(5, "b1", SELL, 1, 100, 6, 6, 4, True, account="bob")


def test_amend_quantity_is_the_new_total_filled_part_included(engine):
    run(engine, limit("a1", SELL, 100, 10))
    run(engine, limit("x1", SELL, 100, 10, account="bob"))
    run(engine, limit("c1", BUY, 100, 4, account="carol"))  # a1: filled 4, remaining 6
    assert run(engine, amend("a1", quantity=8)) == [amended(4, "a1", SELL, 100, 8, 4), book(4, asks=[(100, 14)])]
    assert resting(engine, SELL) == [("a1", "alice", 100, 8, 4, 4), ("x1", "bob", 100, 10, 0, 10)]


@pytest.mark.parametrize("quantity", [4, 3])
def test_amend_quantity_not_above_what_filled_is_rejected(engine, quantity):
    run(engine, limit("a1", SELL, 100, 10))
    run(engine, limit("c1", BUY, 100, 4, account="carol"))
    assert run(engine, amend("a1", quantity=quantity)) == [AmendRejected(SYM, 2, TS, "a1", "alice", "invalid_quantity")]
    assert resting(engine, SELL) == [("a1", "alice", 100, 10, 4, 6)]
    assert run(engine, amend("a1", quantity=5)) == [amended(3, "a1", SELL, 100, 5, 1), book(3, asks=[(100, 1)])]


@pytest.mark.parametrize("quantity", [1, 0, 1001, 6.0])
def test_amend_quantity_off_the_limits_is_rejected(engine, quantity):
    run(engine, limit("a1", SELL, 100, 10))
    assert run(engine, amend("a1", quantity=quantity)) == [AmendRejected(SYM, 1, TS, "a1", "alice", "invalid_quantity")]


@pytest.mark.parametrize("price", [0, -3, 101.0])
def test_amend_to_a_price_that_is_not_a_positive_integer_is_rejected(engine, price):
    run(engine, limit("a1", SELL, 100, 10))
    assert run(engine, amend("a1", price=price)) == [AmendRejected(SYM, 1, TS, "a1", "alice", "invalid_price")]


def test_amend_of_an_unknown_ended_or_foreign_order_is_rejected(engine):
    run(engine, limit("a1", SELL, 100, 10, account="alice"))
    run(engine, limit("a2", SELL, 101, 10, account="alice"))
    run(engine, cancel("a2"))
    for cmd in (amend("nope", price=99), amend("a2", quantity=5), amend("a1", quantity=5, account="bob")):
        assert run(engine, cmd) == [AmendRejected(SYM, 3, TS, cmd.order_id, cmd.account, "unknown_order")]
    assert resting(engine, SELL) == [("a1", "alice", 100, 10, 0, 10)]


def test_amend_to_a_crossing_price_trades_at_once(engine):
    run(engine, limit("b1", BUY, 99, 5, account="bob"))
    run(engine, limit("a1", SELL, 101, 8, account="alice"))
    assert run(engine, amend("a1", price=98)) == [
        amended(3, "a1", SELL, 98, 8, 8),
        trade(3, 1, 99, 5, SELL),
        filled(3, "b1", BUY, 1, 99, 5, 5, 0, True, account="bob"),
        filled(3, "a1", SELL, 1, 99, 5, 5, 3, False),
        book(3, bids=[(99, 0)], asks=[(98, 3), (101, 0)]),
    ]
    assert resting(engine, SELL) == [("a1", "alice", 98, 8, 5, 3)]


def test_amend_that_crosses_meets_the_self_trade_rule(engine):
    run(engine, limit("a1", BUY, 99, 5, account="alice"))
    run(engine, limit("a2", SELL, 101, 5, account="alice"))
    assert run(engine, amend("a2", price=99)) == [
        amended(3, "a2", SELL, 99, 5, 5),
        canceled(3, "a1", BUY, 99, 0, 5, "self_trade"),
        book(3, bids=[(99, 0)], asks=[(99, 5), (101, 0)]),
    ]


def test_amend_of_a_post_only_order_to_a_crossing_price_is_rejected(engine):
    run(engine, limit("b1", BUY, 99, 5, account="bob"))
    run(engine, limit("a1", SELL, 101, 8, tif=POST_ONLY))
    assert run(engine, amend("a1", price=99)) == [AmendRejected(SYM, 2, TS, "a1", "alice", "would_cross")]
    assert resting(engine, SELL) == [("a1", "alice", 101, 8, 0, 8)]
    # a post-only order may still move where it does not cross
    assert run(engine, amend("a1", price=100)) == [amended(3, "a1", SELL, 100, 8, 8),
                                                   book(3, asks=[(100, 8), (101, 0)])]


@pytest.mark.parametrize("price, quantity", [(None, None), (100, None), (None, 10), (100, 10)])
def test_amend_that_changes_nothing_is_answered_and_does_not_move_seq(engine, price, quantity):
    run(engine, limit("a1", SELL, 100, 10))
    run(engine, limit("b1", SELL, 100, 10, account="bob"))
    assert run(engine, amend("a1", price=price, quantity=quantity)) == [amended(2, "a1", SELL, 100, 10, 10)]
    assert [o[0] for o in resting(engine, SELL)] == ["a1", "b1"]  # and keeps its place


# -- match limit -----------------------------------------------------------------------------


@pytest.fixture
def wide() -> MatchingEngine:
    """An engine whose quantity limits let one order meet more than MAX_MATCHES resting orders."""
    return MatchingEngine(SymbolSpec(SYM, "0.01", "0.001"))


def _asks_of_one_lot(engine: MatchingEngine, count: int, price: int = 100, account: str = "bob") -> None:
    for i in range(count):
        run(engine, limit(f"s{i}", SELL, price, 1, account=account))


def _ends(events: list) -> list:
    """Every event of ``events`` but the fills and trades."""
    return [e for e in events if type(e) not in (TradeOccurred, OrderFilled)]


@pytest.mark.parametrize("order", ["market", "gtc", "ioc"])
def test_an_order_that_meets_max_matches_resting_orders_and_still_crosses_ends_with_match_limit(wide, order):
    _asks_of_one_lot(wide, MAX_MATCHES + 1)
    seq = wide.seq + 1
    cmd = {"market": market("t1", BUY, MAX_MATCHES + 5), "gtc": limit("t1", BUY, 100, MAX_MATCHES + 5),
           "ioc": limit("t1", BUY, 100, MAX_MATCHES + 5, tif=IOC)}[order]
    events = run(wide, cmd)
    assert sum(type(e) is TradeOccurred for e in events) == MAX_MATCHES
    price = None if order == "market" else 100
    assert _ends(events)[1:] == [canceled(seq, "t1", BUY, price, MAX_MATCHES, 5, "match_limit"),
                                 book(seq, asks=[(100, 1)])]
    # Nothing of it rests (a gtc remainder would cross the book); the next resting order waits for the next taker.
    assert resting(wide, BUY) == []
    assert resting(wide, SELL) == [(f"s{MAX_MATCHES}", "bob", 100, 1, 0, 1)]
    assert run(wide, cancel("t1")) == [CancelRejected(SYM, seq, TS, "t1", "alice", "unknown_order")]


def test_an_order_whose_max_matches_th_resting_order_is_the_last_it_crosses_rests_as_usual(wide):
    _asks_of_one_lot(wide, MAX_MATCHES)
    run(wide, limit("far", SELL, 105, 1, account="bob"))
    events = run(wide, limit("t1", BUY, 100, MAX_MATCHES + 5))
    assert not any(type(e) is OrderCanceled for e in events)
    assert resting(wide, BUY) == [("t1", "alice", 100, MAX_MATCHES + 5, MAX_MATCHES, 5)]


def test_self_trade_cancels_count_toward_the_match_limit(wide):
    _asks_of_one_lot(wide, MAX_MATCHES - 1, account="alice")
    _asks_of_one_lot(wide, 2, price=101)
    seq = wide.seq + 1
    events = run(wide, market("t1", BUY, 2))
    assert [e.reason for e in events if type(e) is OrderCanceled] == ["self_trade"] * (MAX_MATCHES - 1) + [
        "match_limit"]
    assert events[-2] == canceled(seq, "t1", BUY, None, 1, 1, "match_limit")
    assert resting(wide, SELL) == [("s1", "bob", 101, 1, 0, 1)]


def test_a_fok_fills_when_max_matches_resting_orders_are_enough_and_is_canceled_when_they_are_not(wide):
    _asks_of_one_lot(wide, MAX_MATCHES + 1)
    seq = wide.seq
    assert run(wide, limit("f1", BUY, 100, MAX_MATCHES + 1, tif=FOK)) == [
        accepted(seq, "f1", BUY, 100, MAX_MATCHES + 1, tif=FOK),
        canceled(seq, "f1", BUY, 100, 0, MAX_MATCHES + 1, "fok"),
    ]
    assert len(resting(wide, SELL)) == MAX_MATCHES + 1
    events = run(wide, limit("f2", BUY, 100, MAX_MATCHES, tif=FOK))
    assert sum(type(e) is TradeOccurred for e in events) == MAX_MATCHES
    assert not any(type(e) is OrderCanceled for e in events)


def test_a_fok_counts_the_accounts_own_orders_toward_the_match_limit(wide):
    _asks_of_one_lot(wide, MAX_MATCHES, account="alice")
    run(wide, limit("big", SELL, 100, 5, account="bob"))
    seq = wide.seq
    assert run(wide, limit("f1", BUY, 100, 5, tif=FOK))[-1] == canceled(seq, "f1", BUY, 100, 0, 5, "fok")
    assert len(resting(wide, SELL)) == MAX_MATCHES + 1


def test_an_amend_that_meets_max_matches_resting_orders_and_still_crosses_ends_with_match_limit(wide):
    run(wide, limit("a1", BUY, 90, MAX_MATCHES + 5))
    _asks_of_one_lot(wide, MAX_MATCHES + 1)
    seq = wide.seq + 1
    events = run(wide, amend("a1", price=100))
    assert sum(type(e) is TradeOccurred for e in events) == MAX_MATCHES
    assert _ends(events) == [amended(seq, "a1", BUY, 100, MAX_MATCHES + 5, MAX_MATCHES + 5),
                             canceled(seq, "a1", BUY, 100, MAX_MATCHES, 5, "match_limit"),
                             book(seq, bids=[(90, 0)], asks=[(100, 1)])]
    assert resting(wide, BUY) == []
    assert run(wide, cancel("a1"))[0].reason == "unknown_order"


# -- seq and trade ids -----------------------------------------------------------------------


def test_seq_grows_by_one_only_for_commands_that_change_the_public_book(engine):
    steps = [
        (limit("a1", SELL, 100, 10), 1),                      # rests
        (limit("a1", SELL, 100, 10), 1),                      # rejected
        (limit("b1", BUY, 99, 5, account="bob", tif=IOC), 1),  # IOC that found nothing
        (limit("b2", BUY, 99, 5, account="bob", tif=FOK), 1),  # failed FOK
        (market("b3", SELL, 5, account="bob"), 1),            # market on an empty side
        (cancel("nope"), 1),                                   # cancel rejected
        (amend("a1"), 1),                                      # amend that changes nothing
        (amend("nope", price=3), 1),                           # amend rejected
        (amend("a1", quantity=8), 2),                          # amend down
        (limit("b4", BUY, 100, 3, account="bob"), 3),          # trade
        (limit("b5", BUY, 99, 3, account="bob"), 4),           # rests
        (cancel("b5", account="bob"), 5),                      # cancel
        (limit("b6", BUY, 100, 3, account="bob", tif=POST_ONLY), 5),  # would cross
    ]
    for cmd, seq in steps:
        run(engine, cmd)
        assert engine.seq == seq, cmd


def test_trade_ids_start_at_one_and_grow_by_one(engine):
    for i in range(3):
        run(engine, limit(f"a{i}", SELL, 100 + i, 5))
    first = run(engine, limit("b1", BUY, 101, 10, account="bob"))
    second = run(engine, limit("b2", BUY, 102, 5, account="bob"))
    ids = [e.trade_id for e in first + second if type(e) is TradeOccurred]
    assert ids == [1, 2, 3]
    assert [e.trade_id for e in first + second if type(e) is OrderFilled] == [1, 1, 2, 2, 3, 3]


def test_all_events_of_a_command_carry_its_timestamp(engine):
    run(engine, limit("a1", SELL, 100, 10), ts=111)
    events = run(engine, limit("b1", BUY, 100, 4, account="bob"), ts=222)
    assert {e.ts_ns for e in events} == {222}


# -- event order and BookChanged -------------------------------------------------------------


def test_event_order_of_a_sweep_over_several_levels_and_makers(engine):
    run(engine, limit("b1", BUY, 105, 2, account="bob"))
    run(engine, limit("c1", BUY, 105, 3, account="carol"))
    run(engine, limit("b2", BUY, 104, 4, account="bob"))
    run(engine, limit("b3", BUY, 102, 4, account="bob"))
    assert run(engine, limit("a1", SELL, 103, 12)) == [
        accepted(5, "a1", SELL, 103, 12),
        trade(5, 1, 105, 2, SELL),
        filled(5, "b1", BUY, 1, 105, 2, 2, 0, True, account="bob"),
        filled(5, "a1", SELL, 1, 105, 2, 2, 10, False),
        trade(5, 2, 105, 3, SELL),
        filled(5, "c1", BUY, 2, 105, 3, 3, 0, True, account="carol"),
        filled(5, "a1", SELL, 2, 105, 3, 5, 7, False),
        trade(5, 3, 104, 4, SELL),
        filled(5, "b2", BUY, 3, 104, 4, 4, 0, True, account="bob"),
        filled(5, "a1", SELL, 3, 104, 4, 9, 3, False),
        book(5, bids=[(105, 0), (104, 0)], asks=[(103, 3)]),
    ]
    assert engine.depth() == ([(102, 4)], [(103, 3)])


def test_book_changed_lists_levels_best_first_on_both_sides(engine):
    run(engine, limit("b1", BUY, 100, 5, account="bob"))
    run(engine, limit("s1", SELL, 110, 5, account="bob"))
    # a bid moving up: highest bid first
    assert run(engine, amend("b1", price=102, account="bob"))[-1] == book(3, bids=[(102, 5), (100, 0)])
    # an ask moving down: lowest ask first
    assert run(engine, amend("s1", price=108, account="bob"))[-1] == book(4, asks=[(108, 5), (110, 0)])
    # and the other way round
    assert run(engine, amend("b1", price=101, account="bob"))[-1] == book(5, bids=[(102, 0), (101, 5)])
    assert run(engine, amend("s1", price=109, account="bob"))[-1] == book(6, asks=[(108, 0), (109, 5)])


# -- state -----------------------------------------------------------------------------------


def test_snapshot_and_restore_round_trip_with_partly_filled_orders(engine):
    run(engine, limit("a1", SELL, 101, 10, account="alice"))
    run(engine, limit("a2", SELL, 101, 6, account="alice", tif=POST_ONLY))
    run(engine, limit("b1", SELL, 102, 7, account="bob"))
    run(engine, limit("c1", BUY, 101, 4, account="carol"))  # a1 filled 4 of 10
    run(engine, limit("c2", BUY, 99, 8, account="carol"))
    run(engine, limit("d1", SELL, 99, 3, account="dave"))  # c2 filled 3 of 8
    run(engine, limit("c3", BUY, 98, 5, account="carol", tif=IOC))  # ended, id used
    run(engine, limit("b9", SELL, 120, 5, account="bob"))
    run(engine, cancel("b9", account="bob"))  # ended, id used

    data = engine.snapshot()
    assert isinstance(data, bytes)
    twin = MatchingEngine.restore(data)
    twin.book._check()
    assert twin.snapshot() == data
    assert (twin.symbol, twin.seq) == (engine.symbol, engine.seq)
    assert twin.depth() == engine.depth() == ([(99, 5)], [(101, 12), (102, 7)])
    for side in (BUY, SELL):
        assert resting(twin, side) == resting(engine, side)
    assert resting(twin, SELL)[0] == ("a1", "alice", 101, 10, 4, 6)

    later = [
        limit("c3", BUY, 98, 5, account="carol"),      # duplicate: used ids survive
        limit("b9", SELL, 120, 5, account="bob"),      # duplicate
        amend("a2", price=99),                         # post-only would cross
        limit("e1", BUY, 102, 15, account="erin"),     # queue order and trade ids continue
        amend("c2", quantity=4, account="carol"),
        limit("d2", SELL, 98, 2, account="dave"),
    ]
    for cmd in later:
        ts = TS + 1
        assert twin.handle(cmd, ts_ns=ts) == engine.handle(cmd, ts_ns=ts), cmd
        twin.book._check()
    assert twin.snapshot() == engine.snapshot()


def test_restore_tells_how_far_it_is_every_16384_resting_orders() -> None:
    """A book of millions takes seconds to restore: a matcher says so while it does (``zmx
    up`` waits for a node only as long as it does)."""
    engine = MatchingEngine(SymbolSpec(SYM, "0.01", "0.001"))
    for i in range(40_000):
        engine.handle(limit(f"o{i}", BUY, 1_000 + i % 500, 1), ts_ns=TS)
    told: list[tuple[int, int]] = []
    twin = MatchingEngine.restore(engine.snapshot(), lambda done, total: told.append((done, total)))
    assert told == [(0, 40_000), (16_384, 40_000), (32_768, 40_000)]
    assert twin.snapshot() == engine.snapshot()


def test_changed_ns_is_the_time_of_the_command_that_made_the_seq_and_survives_a_snapshot(engine):
    assert (engine.seq, engine.changed_ns) == (0, 0)
    run(engine, limit("a1", SELL, 101, 10), ts=TS + 1)
    run(engine, limit("b1", BUY, 90, 1, account="bob", tif=IOC), ts=TS + 2)  # no change to the book
    run(engine, cancel("nope"), ts=TS + 3)  # refused: no change
    assert (engine.seq, engine.changed_ns) == (1, TS + 1)
    run(engine, limit("b2", BUY, 101, 4, account="bob"), ts=TS + 4)  # trades
    run(engine, amend("a1", quantity=8), ts=TS + 5)
    assert (engine.seq, engine.changed_ns) == (3, TS + 5)
    run(engine, cancel("a1"), ts=TS + 6)
    assert (engine.seq, engine.changed_ns) == (4, TS + 6)
    assert MatchingEngine.restore(engine.snapshot()).changed_ns == TS + 6


def test_a_version_1_snapshot_still_restores_without_the_time_of_the_last_change(engine):
    run(engine, limit("a1", SELL, 101, 10))
    version, *fields, changed_ns, max_matches = msgpack.unpackb(engine.snapshot())
    assert (version, changed_ns, max_matches) == (3, TS, MAX_MATCHES)
    old = MatchingEngine.restore(msgpack.packb([1, *fields]))  # as zmx wrote them before
    assert (old.seq, old.depth(), old.changed_ns) == (engine.seq, engine.depth(), 0)
    with pytest.raises(ValueError, match="version 1 is not supported"):
        MatchingEngine.restore(msgpack.packb([1, *fields, changed_ns]))  # a field too many for version 1


def test_an_engine_restored_from_a_snapshot_older_than_the_match_limit_matches_without_one(wide):
    """A journal handled before the limit existed is replayed as it was handled: an order of it
    that met more resting orders than the limit must meet them again (a review's replay of an
    old journal under the limit put a filled maker back on the book and reused trade ids)."""
    _asks_of_one_lot(wide, MAX_MATCHES + 1)
    version, *fields, changed_ns, max_matches = msgpack.unpackb(wide.snapshot())
    assert (version, max_matches) == (3, MAX_MATCHES)
    old = MatchingEngine.restore(msgpack.packb([2, *fields, changed_ns]))  # as zmx wrote them before the limit
    assert old.max_matches > 10**18
    events = old.handle(market("t1", BUY, MAX_MATCHES + 1), ts_ns=TS)
    assert sum(type(e) is TradeOccurred for e in events) == MAX_MATCHES + 1 and old.depth() == ([], [])
    assert MatchingEngine.restore(old.snapshot()).max_matches == old.max_matches  # kept until the matcher changes it
    limited = MatchingEngine.restore(wide.snapshot())
    assert limited.max_matches == MAX_MATCHES
    assert run(limited, market("t1", BUY, MAX_MATCHES + 1))[-2].reason == "match_limit"
