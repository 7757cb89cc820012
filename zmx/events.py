"""Events: what happened in a matching engine (past-tense names).

Every event starts with ``symbol``, ``seq`` and ``ts_ns``. All events produced by one
command share one ``seq``: the symbol's sequence number, which grows by exactly 1 for each
command that changes the public book or trades, so a subscriber can tell when it missed
something. Events of a command that changed nothing public (a rejection, an IOC that found
nothing) carry the current ``seq`` without moving it.

Public events (``TradeOccurred``, ``BookChanged``) go to the symbol's channel; the others are
private to the order's account. Prices are ticks, quantities lots. ``FeedHeartbeat`` is no
engine's: a matcher publishes it for a symbol that had nothing to publish for a while, so
that its subscribers can tell a quiet market from a dead feed, and see the ``seq`` it is at.
"""

from __future__ import annotations

from typing import NamedTuple, Union

from zmx._record import typed_equality
from zmx.model import OrderType, Side, TimeInForce

Level = tuple[int, int]  # (price ticks, total lots); 0 lots = the level is gone


@typed_equality
class OrderAccepted(NamedTuple):
    symbol: str
    seq: int
    ts_ns: int
    order_id: str
    account: str
    side: Side
    type: OrderType
    time_in_force: TimeInForce
    price: int | None
    quantity: int


@typed_equality
class OrderRejected(NamedTuple):
    """A ``SubmitOrder`` that was refused; nothing changed."""

    symbol: str
    seq: int
    ts_ns: int
    order_id: str
    account: str
    reason: str


@typed_equality
class OrderFilled(NamedTuple):
    """One side of one trade. ``quantity`` is this fill, ``filled`` the order's total so far,
    ``remaining`` what is still open. ``maker`` tells the resting side from the taker."""

    symbol: str
    seq: int
    ts_ns: int
    order_id: str
    account: str
    side: Side
    trade_id: int
    price: int
    quantity: int
    filled: int
    remaining: int
    maker: bool


@typed_equality
class OrderCanceled(NamedTuple):
    """An order left the book (or never rested) unfilled in part. ``canceled`` is the open
    quantity that was removed; ``reason`` is ``user``, ``ioc``, ``fok``, ``no_liquidity``,
    ``self_trade`` or ``match_limit``."""

    symbol: str
    seq: int
    ts_ns: int
    order_id: str
    account: str
    side: Side
    price: int | None
    filled: int
    canceled: int
    reason: str


@typed_equality
class OrderAmended(NamedTuple):
    symbol: str
    seq: int
    ts_ns: int
    order_id: str
    account: str
    side: Side
    price: int
    quantity: int
    remaining: int


@typed_equality
class CancelRejected(NamedTuple):
    symbol: str
    seq: int
    ts_ns: int
    order_id: str
    account: str
    reason: str


@typed_equality
class AmendRejected(NamedTuple):
    symbol: str
    seq: int
    ts_ns: int
    order_id: str
    account: str
    reason: str


@typed_equality
class TradeOccurred(NamedTuple):
    symbol: str
    seq: int
    ts_ns: int
    trade_id: int
    price: int
    quantity: int
    taker_side: Side


@typed_equality
class BookChanged(NamedTuple):
    """The levels one command changed, each with its new total, best first."""

    symbol: str
    seq: int
    ts_ns: int
    bids: tuple[Level, ...]
    asks: tuple[Level, ...]


@typed_equality
class FeedHeartbeat(NamedTuple):
    """An idle symbol's feed is alive, at ``seq`` (the last one it published); published alone."""

    symbol: str
    seq: int
    ts_ns: int


Event = Union[
    OrderAccepted, OrderRejected, OrderFilled, OrderCanceled, OrderAmended,
    CancelRejected, AmendRejected, TradeOccurred, BookChanged, FeedHeartbeat,
]
EVENT_TYPES: tuple[type, ...] = (
    OrderAccepted, OrderRejected, OrderFilled, OrderCanceled, OrderAmended,
    CancelRejected, AmendRejected, TradeOccurred, BookChanged, FeedHeartbeat,
)
PUBLIC_EVENT_TYPES: tuple[type, ...] = (TradeOccurred, BookChanged, FeedHeartbeat)
