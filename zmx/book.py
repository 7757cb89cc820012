"""The order book of one symbol: price levels, a FIFO queue per level, an index by order.

Each side keeps its levels in a dict keyed by a *sort key* and the keys in a
``sortedcontainers.SortedList``, so that the best level of either side is ``keys[0]``:
the key is the price for asks and minus the price for bids. "An order at key ``k`` is
within a limit key ``lim``" then reads ``k <= lim`` on both sides, and the matching loop in
``engine.py`` is written once.

A level's queue is a doubly linked list threaded through the orders themselves, so an order
leaves its queue in O(1) from anywhere (cancel) and the head is taken in O(1) (fills).
``OrderBook.index`` maps ``(account, order_id)`` to the resting order.

The book holds no matching rules: it only keeps orders and levels consistent. ``_check()``
asserts every invariant and is called by the tests after every command.
"""

from __future__ import annotations

from collections.abc import Iterator
from itertools import islice

from sortedcontainers import SortedList

from zmx.model import Side, TimeInForce


class Order:
    """A resting order. Mutable: fills and amends change it in place."""

    __slots__ = ("order_id", "account", "side", "price", "quantity", "filled", "remaining",
                 "time_in_force", "level", "prev", "next")

    def __init__(self, order_id: str, account: str, side: Side, price: int, quantity: int,
                 filled: int, remaining: int, time_in_force: TimeInForce) -> None:
        self.order_id = order_id
        self.account = account
        self.side = side
        self.price = price
        self.quantity = quantity  # total, filled part included
        self.filled = filled
        self.remaining = remaining
        self.time_in_force = time_in_force
        # level, prev and next are set when the order joins a queue (BookSide.append).

    def __repr__(self) -> str:
        return (f"Order({self.order_id!r}, {self.account!r}, {self.side.value}, price={self.price}, "
                f"quantity={self.quantity}, filled={self.filled}, remaining={self.remaining})")


class Level:
    """One price of one side: the total open quantity and the FIFO queue of orders."""

    __slots__ = ("price", "key", "total", "head", "tail")

    def __init__(self, price: int, key: int) -> None:
        self.price = price
        self.key = key
        self.total = 0
        self.head: Order | None = None
        self.tail: Order | None = None


EMPTY = 1 << 65  # the best key of an empty side: above every limit key, so nothing crosses it


class BookSide:
    """One side of the book. ``best`` caches ``keys[0]`` (``EMPTY`` when there is no level):
    the matching loop reads it on every order, and an attribute costs a tenth of a
    ``SortedList`` index here."""

    __slots__ = ("side", "sign", "levels", "keys", "best")

    def __init__(self, side: Side) -> None:
        self.side = side
        self.sign = -1 if side is Side.BUY else 1  # key = sign * price
        self.levels: dict[int, Level] = {}
        self.keys = SortedList()
        self.best = EMPTY

    def append(self, order: Order) -> Level:
        """Put ``order`` at the back of the queue at its price, creating the level if needed."""
        key = self.sign * order.price
        level = self.levels.get(key)
        if level is None:
            level = self.levels[key] = Level(order.price, key)
            self.keys.add(key)
            if key < self.best:
                self.best = key
        tail = level.tail
        order.level = level
        order.prev = tail
        order.next = None
        if tail is None:
            level.head = order
        else:
            tail.next = order
        level.tail = order
        level.total += order.remaining
        return level

    def unlink(self, order: Order) -> Level:
        """Take ``order`` out of its queue (anywhere in it); drop the level if it empties."""
        level = order.level
        assert level is not None
        prev, nxt = order.prev, order.next
        if prev is None:
            level.head = nxt
        else:
            prev.next = nxt
        if nxt is None:
            level.tail = prev
        else:
            nxt.prev = prev
        level.total -= order.remaining
        order.level = order.prev = order.next = None
        if level.head is None:
            self.drop(level)
        return level

    def drop(self, level: Level) -> None:
        """Forget an empty level."""
        key = level.key
        del self.levels[key]
        keys = self.keys
        keys.remove(key)
        if key == self.best:
            self.best = keys[0] if keys else EMPTY

    def depth(self, limit: int | None = None) -> list[tuple[int, int]]:
        levels = self.levels
        return [(levels[k].price, levels[k].total) for k in islice(self.keys, limit)]

    def orders(self) -> Iterator[Order]:
        """Resting orders in priority order: best price first, then time."""
        for key in self.keys:
            order = self.levels[key].head
            while order is not None:
                yield order
                order = order.next


class OrderBook:
    __slots__ = ("bids", "asks", "index")

    def __init__(self) -> None:
        self.bids = BookSide(Side.BUY)
        self.asks = BookSide(Side.SELL)
        self.index: dict[tuple[str, str], Order] = {}

    def side(self, side: Side) -> BookSide:
        return self.bids if side is Side.BUY else self.asks

    def add(self, order: Order) -> Level:
        self.index[(order.account, order.order_id)] = order
        return self.side(order.side).append(order)

    def remove(self, order: Order) -> Level:
        del self.index[(order.account, order.order_id)]
        return self.side(order.side).unlink(order)

    def orders(self, side: Side) -> Iterator[Order]:
        return self.side(side).orders()

    def depth(self, limit: int | None = None) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
        return self.bids.depth(limit), self.asks.depth(limit)

    def _check(self) -> None:
        """Assert every invariant of the book (slow; for tests)."""
        seen = 0
        for book_side in (self.bids, self.asks):
            book_side.keys._check()
            assert book_side.best == (book_side.keys[0] if book_side.keys else EMPTY), "stale best key"
            assert set(book_side.keys) == set(book_side.levels), "keys and levels disagree"
            for key, level in book_side.levels.items():
                assert level.key == key == book_side.sign * level.price, f"level key {key} / price {level.price}"
                assert level.head is not None and level.head.prev is None, f"level {level.price} has no head"
                total = 0
                prev = None
                order = level.head
                while order is not None:
                    assert order.prev is prev, f"broken back link at {order!r}"
                    assert order.level is level, f"{order!r} points at another level"
                    assert order.side is book_side.side, f"{order!r} on the wrong side"
                    assert order.price == level.price, f"{order!r} in level {level.price}"
                    assert order.remaining > 0, f"{order!r} rests with nothing open"
                    assert order.filled + order.remaining == order.quantity, f"{order!r}: filled + remaining != quantity"
                    assert self.index.get((order.account, order.order_id)) is order, f"{order!r} not indexed"
                    total += order.remaining
                    seen += 1
                    prev, order = order, order.next
                assert level.tail is prev, f"level {level.price} tail is wrong"
                assert total == level.total, f"level {level.price}: total {level.total} != sum of orders {total}"
        assert seen == len(self.index), f"index holds {len(self.index)} orders, levels {seen}"
        if self.bids.keys and self.asks.keys:
            best_bid = -self.bids.keys[0]
            best_ask = self.asks.keys[0]
            assert best_bid < best_ask, f"book crossed: bid {best_bid} >= ask {best_ask}"
