"""The matching engine of one symbol: commands in, events out, nothing else.

``MatchingEngine(spec).handle(cmd, *, ts_ns) -> list[Event]`` is deterministic: the same
commands with the same timestamps give the same events, byte for byte, which is what
journal replay and standby matchers rely on. The rules are in ``docs/matching.md``; this
module is their only implementation.

Hot path notes (profiled, see perf/bench_engine.py): events are NamedTuples built with
``tuple.__new__`` (no keyword parsing), the matching loop touches the book's levels and
queues directly, and the levels a command touched are collected in a small dict per side
and turned into one ``BookChanged`` at the end.
"""

from __future__ import annotations

from collections.abc import Callable, Container

import msgpack

from zmx.book import BookSide, Order, OrderBook
from zmx.commands import AmendOrder, CancelOrder, SubmitOrder
from zmx.events import (
    AmendRejected,
    BookChanged,
    CancelRejected,
    Event,
    OrderAccepted,
    OrderAmended,
    OrderCanceled,
    OrderFilled,
    OrderRejected,
    TradeOccurred,
)
from zmx.model import MAX_UNITS, OrderType, Side, SymbolSpec, TimeInForce

_new = tuple.__new__
BUY, SELL = Side.BUY, Side.SELL
LIMIT, MARKET = OrderType.LIMIT, OrderType.MARKET
GTC, IOC, FOK, POST_ONLY = TimeInForce.GTC, TimeInForce.IOC, TimeInForce.FOK, TimeInForce.POST_ONLY
_NO_LIMIT = 1 << 64  # a limit key beyond every price (market orders), below book.EMPTY

SNAPSHOT_VERSION = 3  # 2 added ``changed_ns``, 3 ``max_matches``; restore() still reads 1 and 2

# The most resting orders one command may meet (each fill and each self-trade cancel counts):
# it bounds the work of one command, which every other command of the matcher waits for. An
# order that reaches it while it still crosses ends there; what is left is canceled with
# reason ``match_limit`` (docs/matching.md "Match limit").
MAX_MATCHES = 1000
# The limit of an engine restored from a snapshot older than the limit (version 1 or 2): none.
# Its journal was handled without one, and a replay must answer exactly as the engine did then.
NO_MATCH_LIMIT = 1 << 62


class MatchingEngine:
    """Price-time priority matching for one symbol (see docs/matching.md)."""

    __slots__ = ("spec", "symbol", "seq", "changed_ns", "next_trade_id", "book", "archive", "_used_ids", "_handed",
                 "_bids", "_asks", "_index", "_min_lots", "_max_lots", "max_matches")

    def __init__(self, spec: SymbolSpec, *, max_matches: int | None = None) -> None:
        """``max_matches``: the match limit (default ``MAX_MATCHES``); part of the engine's state,
        kept in its snapshot, so that a replay meets the limit the commands first met."""
        self.max_matches = MAX_MATCHES if max_matches is None else max_matches
        self.spec = spec
        self.symbol = spec.symbol
        self.seq = 0
        self.changed_ns = 0  # the ts_ns of the command that made the current seq (0: none yet)
        self.next_trade_id = 1
        self.book = OrderBook()
        # Every (account, order_id) ever accepted, as one string "account\x00order_id": ids are
        # printable ASCII, so the NUL cannot be in either, and one string takes about half the
        # memory of a tuple of two. Ids are never reused; this set holds those of the current
        # generation, ``_handed`` those of the previous one while they are being archived, and
        # ``archive`` (any container of keys; a matcher's is zmx.node.usedids.SymbolIds) the
        # older ones, so that a long-lived engine need not keep them all in memory.
        self._used_ids: set[str] = set()
        self._handed: set[str] = set()
        self.archive: Container[str] | None = None
        # Shortcuts for the hot paths (one attribute load instead of two).
        self._bids = self.book.bids
        self._asks = self.book.asks
        self._index = self.book.index
        self._min_lots = spec.min_lots
        self._max_lots = spec.max_lots

    # -- public API ----------------------------------------------------------------------------

    def handle(self, cmd: SubmitOrder | CancelOrder | AmendOrder, *, ts_ns: int) -> list[Event]:
        kind = type(cmd)
        if kind is SubmitOrder:
            return self._submit(cmd, ts_ns)
        if kind is CancelOrder:
            return self._cancel(cmd, ts_ns)
        if kind is AmendOrder:
            return self._amend(cmd, ts_ns)
        raise TypeError(f"not a command: {cmd!r}")

    def depth(self, limit: int | None = None) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
        """The L2 book: (bids best first, asks best first), each level (price, total lots)."""
        return self.book.depth(limit)

    # -- submit --------------------------------------------------------------------------------

    def _reject(self, cmd: SubmitOrder, ts_ns: int, reason: str) -> list[Event]:
        return [_new(OrderRejected, (self.symbol, self.seq, ts_ns, cmd.order_id, cmd.account, reason))]

    def _submit(self, cmd: SubmitOrder, ts_ns: int) -> list[Event]:
        order_id, account, symbol, side, otype, tif, price, quantity = cmd
        if symbol != self.symbol:
            return self._reject(cmd, ts_ns, "unknown_symbol")
        if side is BUY:
            own, opposite = self._bids, self._asks
        elif side is SELL:
            own, opposite = self._asks, self._bids
        else:
            return self._reject(cmd, ts_ns, "invalid_field")
        if otype is LIMIT:
            if type(price) is not int or not 0 < price <= MAX_UNITS:
                return self._reject(cmd, ts_ns, "invalid_price")
            limit_key = price if side is BUY else -price
        elif otype is MARKET:
            if price is not None:
                return self._reject(cmd, ts_ns, "invalid_price")
            limit_key = _NO_LIMIT
        else:
            return self._reject(cmd, ts_ns, "invalid_field")
        if tif is not GTC and tif is not IOC and tif is not FOK and tif is not POST_ONLY:
            return self._reject(cmd, ts_ns, "invalid_field")
        if type(quantity) is not int or not self._min_lots <= quantity <= self._max_lots:
            return self._reject(cmd, ts_ns, "invalid_quantity")
        # The level it may rest at: its total must stay a 64-bit integer (the wire's limit).
        level = own.levels.get(-limit_key) if otype is LIMIT else None
        if level is not None and level.total > MAX_UNITS - quantity:
            return self._reject(cmd, ts_ns, "invalid_quantity")
        used_key = f"{account}\x00{order_id}"
        used_ids = self._used_ids
        if used_key in used_ids or self._used_before(used_key):
            return self._reject(cmd, ts_ns, "duplicate_order_id")
        if otype is MARKET and tif is POST_ONLY:
            return self._reject(cmd, ts_ns, "invalid_field")

        crosses = opposite.best <= limit_key
        if tif is POST_ONLY and crosses:
            return self._reject(cmd, ts_ns, "would_cross")
        used_ids.add(used_key)

        if not crosses:
            if otype is LIMIT and (tif is GTC or tif is POST_ONLY):
                # The common case: a passive limit order joins the book.
                seq = self.seq = self.seq + 1
                self.changed_ns = ts_ns
                order = self._index[(account, order_id)] = Order(order_id, account, side, price, quantity, 0,
                                                                 quantity, tif)
                # BookSide.append, inlined: this is the most frequent path of all.
                if level is None:
                    level = own.append(order)
                else:
                    level.queue.append(order)
                    level.total += quantity
                changed = ((price, level.total),)
                return [
                    _new(OrderAccepted, (symbol, seq, ts_ns, order_id, account, side, otype, tif, price, quantity)),
                    _new(BookChanged, (symbol, seq, ts_ns, changed, ()) if side is BUY
                         else (symbol, seq, ts_ns, (), changed)),
                ]
            # Nothing to trade with and nothing rests: accepted and ended, the book is as it was.
            seq = self.seq
            reason = "fok" if tif is FOK else "no_liquidity" if otype is MARKET else "ioc"
            return [
                _new(OrderAccepted, (symbol, seq, ts_ns, order_id, account, side, otype, tif, price, quantity)),
                _new(OrderCanceled, (symbol, seq, ts_ns, order_id, account, side, price, 0, quantity, reason)),
            ]
        if tif is FOK and not self._available(opposite, limit_key, account, quantity):
            seq = self.seq
            return [
                _new(OrderAccepted, (symbol, seq, ts_ns, order_id, account, side, otype, tif, price, quantity)),
                _new(OrderCanceled, (symbol, seq, ts_ns, order_id, account, side, price, 0, quantity, "fok")),
            ]

        seq = self.seq = self.seq + 1
        self.changed_ns = ts_ns
        events: list[Event] = [_new(OrderAccepted, (symbol, seq, ts_ns, order_id, account, side, otype, tif,
                                                    price, quantity))]
        touched_opposite: dict[int, int] = {}
        remaining, filled = self._match(opposite, limit_key, side, order_id, account, quantity, 0,
                                        events, touched_opposite, seq, ts_ns)
        touched_own: dict[int, int] = {}
        if remaining:
            if otype is LIMIT and (tif is GTC or tif is POST_ONLY) and opposite.best > limit_key:
                order = Order(order_id, account, side, price, quantity, filled, remaining, tif)
                self._index[(account, order_id)] = order
                level = own.append(order)
                touched_own[level.key] = level.price
            else:
                if opposite.best <= limit_key:  # stopped by the match limit with more to trade with
                    reason = "match_limit"
                else:
                    reason = "no_liquidity" if otype is MARKET else "ioc"  # a FOK that got here filled in full
                events.append(_new(OrderCanceled, (symbol, seq, ts_ns, order_id, account, side, price, filled,
                                                   remaining, reason)))
        events.append(self._book_changed(seq, ts_ns, side, touched_own, touched_opposite))
        return events

    def _available(self, opposite: BookSide, limit_key: int, account: str, wanted: int) -> bool:
        """Whether ``opposite`` holds ``wanted`` lots within ``limit_key`` from other accounts,
        in its first ``max_matches`` orders (the account's own count: matching cancels them)."""
        levels = opposite.levels
        found = 0
        met = 0
        most = self.max_matches
        for key in opposite.keys:  # best first
            if key > limit_key:
                return False
            for order in levels[key].live():
                met += 1
                if met > most:
                    return False
                if order.account != account:
                    found += order.remaining
                    if found >= wanted:
                        return True
        return False

    def _match(self, opposite: BookSide, limit_key: int, side: Side, order_id: str, account: str,
               remaining: int, filled: int, events: list[Event], touched: dict[int, int],
               seq: int, ts_ns: int) -> tuple[int, int]:
        """Trade an incoming order against ``opposite`` while it crosses, meeting at most
        ``max_matches`` resting orders; return what is left (the caller tells "stopped by the
        limit" from "nothing more to trade with" by whether ``opposite`` still crosses)."""
        symbol = self.symbol
        levels = opposite.levels
        index = self._index
        append = events.append
        met = 0
        most = self.max_matches
        while remaining and met < most:
            key = opposite.best
            if key > limit_key:
                break
            level = levels[key]
            price = level.price
            touched[key] = price
            queue = level.queue
            while True:
                maker = queue[0]
                maker_left = maker.remaining
                if not maker_left:  # canceled earlier, still queued
                    queue.popleft()
                    level.dead -= 1
                    continue
                met += 1
                if maker.account == account:
                    # Self-trade prevention: cancel the resting order, keep matching.
                    append(_new(OrderCanceled, (symbol, seq, ts_ns, maker.order_id, account, maker.side,
                                                price, maker.filled, maker_left, "self_trade")))
                    level.total -= maker_left
                    maker.remaining = 0
                else:
                    qty = maker_left if maker_left < remaining else remaining
                    trade_id = self.next_trade_id
                    self.next_trade_id = trade_id + 1
                    maker_left -= qty
                    maker.remaining = maker_left
                    maker_filled = maker.filled = maker.filled + qty
                    level.total -= qty
                    remaining -= qty
                    filled += qty
                    append(_new(TradeOccurred, (symbol, seq, ts_ns, trade_id, price, qty, side)))
                    append(_new(OrderFilled, (symbol, seq, ts_ns, maker.order_id, maker.account, maker.side,
                                              trade_id, price, qty, maker_filled, maker_left, True)))
                    append(_new(OrderFilled, (symbol, seq, ts_ns, order_id, account, side,
                                              trade_id, price, qty, filled, remaining, False)))
                    if maker_left:
                        break  # the incoming order is done; the maker stays at the head
                # The maker is done (filled, or canceled by self-trade prevention).
                queue.popleft()
                del index[(maker.account, maker.order_id)]
                if not remaining or not level.total or met >= most:
                    break
            if not level.total:
                opposite.drop(level)
        return remaining, filled

    def _book_changed(self, seq: int, ts_ns: int, side: Side, touched_own: dict[int, int],
                      touched_opposite: dict[int, int]) -> BookChanged:
        """The ``BookChanged`` of a command by an order of ``side``: the levels it touched on
        its own side and on the other, each with its new total."""
        touched_bids, touched_asks = (touched_own, touched_opposite) if side is BUY else (touched_opposite, touched_own)
        return _new(BookChanged, (self.symbol, seq, ts_ns, self._levels_after(self._bids, touched_bids),
                                  self._levels_after(self._asks, touched_asks)))

    @staticmethod
    def _levels_after(book_side: BookSide, touched: dict[int, int]) -> tuple[tuple[int, int], ...]:
        """The new total of each touched level (0 = gone), best first."""
        if not touched:
            return ()
        levels = book_side.levels
        if len(touched) == 1:
            for key, price in touched.items():
                level = levels.get(key)
                return ((price, level.total if level is not None else 0),)
        out = []
        for key in sorted(touched):
            level = levels.get(key)
            out.append((touched[key], level.total if level is not None else 0))
        return tuple(out)

    # -- cancel ---------------------------------------------------------------------------------

    def _cancel(self, cmd: CancelOrder, ts_ns: int) -> list[Event]:
        order_id, account, symbol = cmd
        if symbol != self.symbol:
            return [_new(CancelRejected, (self.symbol, self.seq, ts_ns, order_id, account, "unknown_symbol"))]
        order = self._index.pop((account, order_id), None)
        if order is None:
            return [_new(CancelRejected, (self.symbol, self.seq, ts_ns, order_id, account, "unknown_order"))]
        seq = self.seq = self.seq + 1
        self.changed_ns = ts_ns
        side = order.side
        canceled = order.remaining
        level = (self._bids if side is BUY else self._asks).remove(order)
        changed = ((level.price, level.total),)  # total is 0 when the level went away
        return [
            _new(OrderCanceled, (symbol, seq, ts_ns, order_id, account, side, order.price, order.filled,
                                 canceled, "user")),
            _new(BookChanged, (symbol, seq, ts_ns, changed, ()) if side is BUY else (symbol, seq, ts_ns, (), changed)),
        ]

    # -- amend ----------------------------------------------------------------------------------

    def _amend(self, cmd: AmendOrder, ts_ns: int) -> list[Event]:
        order_id, account, symbol, new_price, new_quantity = cmd

        def rejected(reason: str) -> list[Event]:
            return [_new(AmendRejected, (self.symbol, self.seq, ts_ns, order_id, account, reason))]

        if symbol != self.symbol:
            return rejected("unknown_symbol")
        book = self.book
        order = book.index.get((account, order_id))
        if order is None:
            return rejected("unknown_order")
        price = order.price if new_price is None else new_price
        quantity = order.quantity if new_quantity is None else new_quantity
        if type(price) is not int or not 0 < price <= MAX_UNITS:
            return rejected("invalid_price")
        spec = self.spec
        if (type(quantity) is not int or not spec.min_lots <= quantity <= spec.max_lots
                or quantity <= order.filled):
            return rejected("invalid_quantity")
        side = order.side
        remaining = quantity - order.filled
        own = book.side(side)
        target = own.levels.get(own.sign * price)  # the level it will rest at: its total stays 64-bit
        if target is not None and target.total - (order.remaining if price == order.price else 0) > \
                MAX_UNITS - remaining:
            return rejected("invalid_quantity")
        if price == order.price and quantity == order.quantity:
            return [_new(OrderAmended, (symbol, self.seq, ts_ns, order_id, account, side, price, quantity,
                                        remaining))]
        opposite = book.asks if side is BUY else book.bids
        limit_key = price if side is BUY else -price
        crosses = opposite.best <= limit_key
        if crosses and order.time_in_force is POST_ONLY:
            return rejected("would_cross")

        seq = self.seq = self.seq + 1
        self.changed_ns = ts_ns
        events: list[Event] = [_new(OrderAmended, (symbol, seq, ts_ns, order_id, account, side, price, quantity,
                                                   remaining))]
        touched_own: dict[int, int] = {}
        touched_opposite: dict[int, int] = {}
        if price == order.price and quantity < order.quantity:
            # Smaller at the same price: keeps its place in the queue.
            level = own.levels[own.sign * price]
            level.total -= order.remaining - remaining
            order.remaining = remaining
            order.quantity = quantity
            touched_own[level.key] = level.price
        else:
            # A new price or more quantity: out of its queue, matched if it crosses, then
            # back at the end of the queue at its price as a new entry.
            filled = order.filled
            level = book.remove(order)
            touched_own[level.key] = level.price
            if crosses:
                remaining, filled = self._match(opposite, limit_key, side, order_id, account, remaining, filled,
                                                events, touched_opposite, seq, ts_ns)
                if remaining and opposite.best <= limit_key:  # stopped by the match limit: it must not rest crossed
                    events.append(_new(OrderCanceled, (symbol, seq, ts_ns, order_id, account, side, price, filled,
                                                       remaining, "match_limit")))
                    remaining = 0
            if remaining:
                level = book.add(Order(order_id, account, side, price, quantity, filled, remaining,
                                       order.time_in_force))
                touched_own[level.key] = level.price
        events.append(self._book_changed(seq, ts_ns, side, touched_own, touched_opposite))
        return events

    # -- used order ids -------------------------------------------------------------------------

    def _used_before(self, key: str) -> bool:
        """Whether an earlier generation used ``key`` (the current one was looked at already)."""
        archive = self.archive
        return (bool(self._handed) and key in self._handed) or (archive is not None and key in archive)

    def hand_over_used_ids(self) -> None:
        """Start a new generation of used ids. The current one is being archived: it is still
        looked up here until ``take_handed`` has given all of it to the archive."""
        if self._handed:
            raise RuntimeError(f"{self.symbol}: the previous generation of used ids is not archived yet")
        self._handed, self._used_ids = self._used_ids, set()

    def take_handed(self, limit: int) -> list[str]:
        """Up to ``limit`` keys of the handed generation, which the caller's archive holds from
        now on: the engine forgets them."""
        handed = self._handed
        return [handed.pop() for _ in range(min(limit, len(handed)))]

    def keep_handed(self) -> None:
        """Archiving the handed generation failed: it goes back into the current one."""
        self._used_ids |= self._handed
        self._handed = set()

    def pop_used_ids(self) -> set[str]:
        """The current generation of used ids, forgotten by the engine (the caller stores
        them for good: a snapshot's child does, before it writes a snapshot without them)."""
        ids, self._used_ids = self._used_ids, set()
        return ids

    @property
    def handed(self) -> int:
        """How many keys of the handed generation the engine still holds."""
        return len(self._handed)

    # -- state ----------------------------------------------------------------------------------

    def snapshot(self) -> bytes:
        """Everything that decides future events, as bytes (deterministic for a given state),
        but the order ids in ``archive``: those a matcher keeps in its data directory."""
        spec = self.spec
        orders = [
            [o.order_id, o.account, o.side.value, o.price, o.quantity, o.filled, o.remaining, o.time_in_force.value]
            for side in (BUY, SELL) for o in self.book.orders(side)
        ]
        state = [
            SNAPSHOT_VERSION,
            [spec.symbol, spec.tick_size, spec.lot_size, spec.min_quantity, spec.max_quantity],
            self.seq,
            self.next_trade_id,
            sorted(tuple(key.split("\x00", 1)) for key in self._used_ids | self._handed),
            orders,
            self.changed_ns,
            self.max_matches,
        ]
        return msgpack.packb(state)

    @classmethod
    def restore(cls, data: bytes, progress: Callable[[int, int], None] | None = None) -> MatchingEngine:
        """An engine in exactly the state that ``snapshot()`` recorded; ``progress(done, total)``
        is called every 16,384 resting orders put back (a book of millions takes seconds)."""
        version, spec_fields, seq, next_trade_id, used_ids, orders, *rest = msgpack.unpackb(data)
        if version not in (1, 2, SNAPSHOT_VERSION) or len(rest) != version - 1:
            raise ValueError(f"engine snapshot version {version} is not supported (expected {SNAPSHOT_VERSION})")
        engine = cls(SymbolSpec(*spec_fields), max_matches=rest[1] if version >= 3 else NO_MATCH_LIMIT)
        engine.seq = seq
        engine.changed_ns = rest[0] if rest else 0  # version 1 did not keep it: unknown until the next change
        engine.next_trade_id = next_trade_id
        engine._used_ids = {f"{account}\x00{order_id}" for account, order_id in used_ids}
        add = engine.book.add
        for start in range(0, len(orders), 0x4000):
            if progress is not None:
                progress(start, len(orders))
            for order_id, account, side, price, quantity, filled, remaining, tif in orders[start:start + 0x4000]:
                add(Order(order_id, account, Side(side), price, quantity, filled, remaining, TimeInForce(tif)))
        return engine

    def resting(self) -> int:
        """How many orders rest on the book."""
        return len(self.book.index)
