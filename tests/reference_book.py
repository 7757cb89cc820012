"""A naive reference model of the matching rules, written from docs/matching.md alone.

The stress test runs it side by side with ``zmx.engine.MatchingEngine`` and compares every
event. It is deliberately simple and slow: each side is one plain list of resting orders
in priority order (best price first, oldest first within a price), scanned from the front;
the L2 book is recomputed from scratch; ``BookChanged`` is the difference between the L2
book before and after the command. Nothing here is shared with the engine but the command
and event classes, so that a misreading of the rules has to be made twice to go unseen.

Where docs/matching.md is silent, the choices are:

- every event carries the engine's own symbol (also ``OrderRejected(unknown_symbol)``);
- a cancel or an amend for another symbol is refused with reason ``unknown_symbol``;
- an amend is checked in the order: unknown order, price, quantity (the submit order);
- "would trade at once" for a post-only order means its price crosses the best opposite
  price, whoever owns the resting order there.
"""

from __future__ import annotations

from zmx.commands import AmendOrder, CancelOrder, SubmitOrder
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
from zmx.model import OrderType, Side, SymbolSpec, TimeInForce

MAX_INT64 = 2**63 - 1
MAX_MATCHES = 1000  # docs/matching.md "Match limit": the resting orders one command may meet
PENDING = -1  # the seq of an event until the command knows whether it moved seq


class RefOrder:
    """A resting order. ``quantity`` is the total, filled part included."""

    def __init__(self, order_id: str, account: str, side: Side, price: int, quantity: int,
                 time_in_force: TimeInForce) -> None:
        self.order_id = order_id
        self.account = account
        self.side = side
        self.price = price
        self.quantity = quantity
        self.filled = 0
        self.time_in_force = time_in_force

    @property
    def remaining(self) -> int:
        return self.quantity - self.filled

    def as_tuple(self) -> tuple:
        """What the stress test compares with the engine's resting orders."""
        return (self.order_id, self.account, self.side, self.price, self.quantity, self.filled,
                self.remaining)

    def __repr__(self) -> str:
        return (f"RefOrder({self.order_id!r}, {self.account!r}, {self.side.value}, price={self.price}, "
                f"quantity={self.quantity}, filled={self.filled}, {self.time_in_force.value})")


def _is_int(value: object) -> bool:
    return type(value) is int  # bool is not a price or a quantity


def _better_or_equal(side: Side, price: int, than: int) -> bool:
    """Whether a ``side`` order at ``price`` is at least as good as one at ``than``."""
    return price >= than if side is Side.BUY else price <= than


class ReferenceBook:
    """The matching rules of docs/matching.md, the slow and obvious way."""

    def __init__(self, spec: SymbolSpec) -> None:
        self.spec = spec
        self.symbol = spec.symbol
        self.seq = 0
        self.next_trade_id = 1
        self.bids: list[RefOrder] = []  # priority order: highest price first, then oldest
        self.asks: list[RefOrder] = []  # priority order: lowest price first, then oldest
        self.used_ids: set[tuple[str, str]] = set()  # (account, order_id) of accepted orders
        self._depth: tuple[list[tuple[int, int]], list[tuple[int, int]]] = ([], [])  # after the last command

    # -- the book --------------------------------------------------------------------------

    def side_list(self, side: Side) -> list[RefOrder]:
        return self.bids if side is Side.BUY else self.asks

    def orders(self, side: Side) -> list[RefOrder]:
        return list(self.side_list(side))

    def find(self, account: str, order_id: str) -> RefOrder | None:
        for order in self.bids + self.asks:
            if order.account == account and order.order_id == order_id:
                return order
        return None

    def _insert(self, order: RefOrder) -> None:
        """Put ``order`` behind every order at its price or better (the back of its queue)."""
        orders = self.side_list(order.side)
        position = 0
        while position < len(orders) and _better_or_equal(order.side, orders[position].price, order.price):
            position += 1
        orders.insert(position, order)

    def _remove(self, order: RefOrder) -> None:
        orders = self.side_list(order.side)
        for i, other in enumerate(orders):
            if other is order:
                del orders[i]
                return
        raise AssertionError(f"{order} is not on the book")

    @staticmethod
    def _levels(orders: list[RefOrder]) -> list[tuple[int, int]]:
        levels: list[tuple[int, int]] = []
        for order in orders:  # already best first
            if levels and levels[-1][0] == order.price:
                levels[-1] = (order.price, levels[-1][1] + order.remaining)
            else:
                levels.append((order.price, order.remaining))
        return levels

    def depth(self) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
        """The L2 book: (bids, asks), best first, each level (price, total lots)."""
        return self._depth

    def _compute_depth(self) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
        return self._levels(self.bids), self._levels(self.asks)

    def _crosses(self, side: Side, price: int | None, orders: list[RefOrder]) -> bool:
        """Whether an incoming ``side`` order with limit ``price`` (None: market) meets ``orders[0]``."""
        if not orders:
            return False
        if price is None:
            return True
        return price >= orders[0].price if side is Side.BUY else price <= orders[0].price

    @staticmethod
    def _within(side: Side, limit: int | None, price: int) -> bool:
        """Whether a resting order at ``price`` is at the incoming ``side`` order's limit or better."""
        if limit is None:
            return True
        return price <= limit if side is Side.BUY else price >= limit

    # -- commands --------------------------------------------------------------------------

    def handle(self, cmd: SubmitOrder | CancelOrder | AmendOrder, *, ts_ns: int) -> list:
        before = self._depth
        if type(cmd) is SubmitOrder:
            events = self._submit(cmd, ts_ns)
        elif type(cmd) is CancelOrder:
            events = self._cancel(cmd, ts_ns)
        elif type(cmd) is AmendOrder:
            events = self._amend(cmd, ts_ns)
        else:
            raise TypeError(cmd)
        after = self._depth = self._compute_depth()
        bids = self._diff(before[0], after[0], reverse=True)
        asks = self._diff(before[1], after[1], reverse=False)
        traded = any(type(e) is TradeOccurred for e in events)
        if traded:
            assert bids or asks, "a trade always changes the maker's level"
        if bids or asks:
            self.seq += 1
            events.append(BookChanged(self.symbol, PENDING, ts_ns, bids, asks))
        return [e._replace(seq=self.seq) for e in events]

    @staticmethod
    def _diff(before: list[tuple[int, int]], after: list[tuple[int, int]], *, reverse: bool
              ) -> tuple[tuple[int, int], ...]:
        old, new = dict(before), dict(after)
        changed = [(price, new.get(price, 0)) for price in set(old) | set(new)
                   if old.get(price, 0) != new.get(price, 0)]
        changed.sort(reverse=reverse)
        return tuple(changed)

    # -- submit ----------------------------------------------------------------------------

    def _submit(self, cmd: SubmitOrder, ts: int) -> list:
        sym = self.symbol

        def rejected(reason: str) -> list:
            return [OrderRejected(sym, PENDING, ts, cmd.order_id, cmd.account, reason)]

        if cmd.symbol != self.symbol:
            return rejected("unknown_symbol")
        if cmd.type is OrderType.LIMIT:
            if not (_is_int(cmd.price) and 0 < cmd.price <= MAX_INT64):
                return rejected("invalid_price")
        elif cmd.price is not None:
            return rejected("invalid_price")
        if not (_is_int(cmd.quantity) and self.spec.min_lots <= cmd.quantity <= self.spec.max_lots):
            return rejected("invalid_quantity")
        if (cmd.account, cmd.order_id) in self.used_ids:
            return rejected("duplicate_order_id")
        if cmd.type is OrderType.MARKET and cmd.time_in_force is TimeInForce.POST_ONLY:
            return rejected("invalid_field")
        opposite = self.side_list(cmd.side.opposite)
        if cmd.time_in_force is TimeInForce.POST_ONLY and self._crosses(cmd.side, cmd.price, opposite):
            return rejected("would_cross")

        self.used_ids.add((cmd.account, cmd.order_id))
        events: list = [OrderAccepted(sym, PENDING, ts, cmd.order_id, cmd.account, cmd.side, cmd.type,
                                      cmd.time_in_force, cmd.price, cmd.quantity)]
        if cmd.time_in_force is TimeInForce.FOK:
            within = [o for o in opposite if self._within(cmd.side, cmd.price, o.price)][:MAX_MATCHES]
            available = sum(o.remaining for o in within if o.account != cmd.account)
            if available < cmd.quantity:
                events.append(OrderCanceled(sym, PENDING, ts, cmd.order_id, cmd.account, cmd.side, cmd.price,
                                            0, cmd.quantity, "fok"))
                return events

        filled = self._match(cmd.side, cmd.price, cmd.order_id, cmd.account, cmd.quantity, 0, events, ts)
        left = cmd.quantity - filled
        if left:
            if self._crosses(cmd.side, cmd.price, opposite):
                events.append(OrderCanceled(sym, PENDING, ts, cmd.order_id, cmd.account, cmd.side, cmd.price,
                                            filled, left, "match_limit"))
            elif cmd.type is OrderType.LIMIT and cmd.time_in_force in (TimeInForce.GTC, TimeInForce.POST_ONLY):
                order = RefOrder(cmd.order_id, cmd.account, cmd.side, cmd.price, cmd.quantity, cmd.time_in_force)
                order.filled = filled
                self._insert(order)
            else:
                assert cmd.time_in_force is not TimeInForce.FOK, "a FOK that passed the check fills in full"
                reason = "no_liquidity" if cmd.type is OrderType.MARKET else "ioc"
                events.append(OrderCanceled(sym, PENDING, ts, cmd.order_id, cmd.account, cmd.side, cmd.price,
                                            filled, left, reason))
        return events

    def _match(self, side: Side, limit: int | None, order_id: str, account: str, quantity: int,
               filled: int, events: list, ts: int) -> int:
        """Trade an incoming order (``quantity`` total, ``filled`` so far); return its new ``filled``."""
        sym = self.symbol
        opposite = self.side_list(side.opposite)
        met = 0
        while filled < quantity and opposite and self._within(side, limit, opposite[0].price) and met < MAX_MATCHES:
            met += 1
            maker = opposite[0]
            if maker.account == account:
                events.append(OrderCanceled(sym, PENDING, ts, maker.order_id, maker.account, maker.side,
                                            maker.price, maker.filled, maker.remaining, "self_trade"))
                del opposite[0]
                continue
            qty = min(maker.remaining, quantity - filled)
            trade_id = self.next_trade_id
            self.next_trade_id += 1
            maker.filled += qty
            filled += qty
            events.append(TradeOccurred(sym, PENDING, ts, trade_id, maker.price, qty, side))
            events.append(OrderFilled(sym, PENDING, ts, maker.order_id, maker.account, maker.side, trade_id,
                                      maker.price, qty, maker.filled, maker.remaining, True))
            events.append(OrderFilled(sym, PENDING, ts, order_id, account, side, trade_id,
                                      maker.price, qty, filled, quantity - filled, False))
            if maker.remaining == 0:
                del opposite[0]
        return filled

    # -- cancel ----------------------------------------------------------------------------

    def _cancel(self, cmd: CancelOrder, ts: int) -> list:
        sym = self.symbol
        if cmd.symbol != self.symbol:
            return [CancelRejected(sym, PENDING, ts, cmd.order_id, cmd.account, "unknown_symbol")]
        order = self.find(cmd.account, cmd.order_id)
        if order is None:
            return [CancelRejected(sym, PENDING, ts, cmd.order_id, cmd.account, "unknown_order")]
        self._remove(order)
        return [OrderCanceled(sym, PENDING, ts, order.order_id, order.account, order.side, order.price,
                              order.filled, order.remaining, "user")]

    # -- amend -----------------------------------------------------------------------------

    def _amend(self, cmd: AmendOrder, ts: int) -> list:
        sym = self.symbol

        def rejected(reason: str) -> list:
            return [AmendRejected(sym, PENDING, ts, cmd.order_id, cmd.account, reason)]

        if cmd.symbol != self.symbol:
            return rejected("unknown_symbol")
        order = self.find(cmd.account, cmd.order_id)
        if order is None:
            return rejected("unknown_order")
        price = order.price if cmd.price is None else cmd.price
        quantity = order.quantity if cmd.quantity is None else cmd.quantity
        if not (_is_int(price) and 0 < price <= MAX_INT64):
            return rejected("invalid_price")
        if not (_is_int(quantity) and self.spec.min_lots <= quantity <= self.spec.max_lots
                and quantity > order.filled):
            return rejected("invalid_quantity")
        amended = OrderAmended(sym, PENDING, ts, order.order_id, order.account, order.side, price, quantity,
                               quantity - order.filled)
        if price == order.price and quantity == order.quantity:
            return [amended]
        opposite = self.side_list(order.side.opposite)
        if order.time_in_force is TimeInForce.POST_ONLY and self._crosses(order.side, price, opposite):
            return rejected("would_cross")
        events: list = [amended]
        if price == order.price and quantity < order.quantity:
            order.quantity = quantity  # keeps its place in the queue
            return events
        self._remove(order)
        order.price = price
        order.quantity = quantity
        order.filled = self._match(order.side, price, order.order_id, order.account, quantity, order.filled,
                                   events, ts)
        if order.remaining and self._crosses(order.side, price, opposite):
            events.append(OrderCanceled(sym, PENDING, ts, order.order_id, order.account, order.side, price,
                                        order.filled, order.remaining, "match_limit"))
        elif order.remaining:
            self._insert(order)
        return events
