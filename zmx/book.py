"""The order book of one symbol: price levels, a FIFO queue per level, an index by order.

Each side keeps its levels in a dict keyed by a *sort key* and the keys in a
``sortedcontainers.SortedList``, so that the best level of either side is ``keys[0]``:
the key is the price for asks and minus the price for bids. "An order at key ``k`` is
within a limit key ``lim``" then reads ``k <= lim`` on both sides, and the matching loop in
``engine.py`` is written once.

A level's queue is a ``deque`` of orders. An order leaves it in O(1) by lazy deletion: a
canceled order gets ``remaining = 0`` and its lots leave the level total at once, while its
entry stays queued until matching reaches it (``remaining == 0`` means "skip me") or the
level empties and is dropped whole. A level compacts its queue when dead entries outnumber
live ones, so a busy level that never empties cannot grow without bound. Measured here, a
deque with lazy deletion costs half of a linked list threaded through the orders.
``OrderBook.index`` maps ``(account, order_id)`` to the resting order.

The book holds no matching rules: it only keeps orders and levels consistent. ``_check()``
asserts every invariant and is called by the tests after every command.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from itertools import islice

from sortedcontainers import SortedList

from zmx.model import Side, TimeInForce

COMPACT_AT = 32  # a level rewrites its queue once it holds this many dead entries and more dead than live


class Order:
    """A resting order. Mutable: fills and amends change it in place; ``remaining == 0``
    marks an order that left the book (its queue entry is skipped)."""

    __slots__ = ("order_id", "account", "side", "price", "quantity", "filled", "remaining", "time_in_force")

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

    def __repr__(self) -> str:
        return (f"Order({self.order_id!r}, {self.account!r}, {self.side.value}, price={self.price}, "
                f"quantity={self.quantity}, filled={self.filled}, remaining={self.remaining})")


class Level:
    """One price of one side: the total open quantity and the FIFO queue of orders
    (live ones and not yet skipped dead ones, ``dead`` of them)."""

    __slots__ = ("price", "key", "total", "queue", "dead")

    def __init__(self, price: int, key: int) -> None:
        self.price = price
        self.key = key
        self.total = 0
        self.queue: deque[Order] = deque()
        self.dead = 0

    def live(self) -> Iterator[Order]:
        return (order for order in self.queue if order.remaining)


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
        level.queue.append(order)
        level.total += order.remaining
        return level

    def remove(self, order: Order) -> Level:
        """Take a resting ``order`` off the book (its ``remaining`` becomes 0); the level goes
        when nothing is left in it."""
        level = self.levels[self.sign * order.price]
        level.total -= order.remaining
        order.remaining = 0
        if not level.total:
            self.drop(level)
        else:
            level.dead += 1
            if level.dead >= COMPACT_AT and level.dead * 2 > len(level.queue):
                level.queue = deque(level.live())
                level.dead = 0
        return level

    def drop(self, level: Level) -> None:
        """Forget a level with nothing open in it."""
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
            yield from self.levels[key].live()


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
        return self.side(order.side).remove(order)

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
                total = 0
                for order in level.live():
                    assert order.side is book_side.side, f"{order!r} on the wrong side"
                    assert order.price == level.price, f"{order!r} in level {level.price}"
                    assert order.filled + order.remaining == order.quantity, \
                        f"{order!r}: filled + remaining != quantity"
                    assert self.index.get((order.account, order.order_id)) is order, f"{order!r} not indexed"
                    total += order.remaining
                    seen += 1
                assert total > 0, f"level {level.price} has nothing open"
                assert total == level.total, f"level {level.price}: total {level.total} != sum of orders {total}"
                assert level.dead == sum(1 for o in level.queue if not o.remaining), f"level {level.price} dead count"
        assert seen == len(self.index), f"index holds {len(self.index)} orders, levels {seen}"
        if self.bids.keys and self.asks.keys:
            best_bid = -self.bids.keys[0]
            best_ask = self.asks.keys[0]
            assert best_bid < best_ask, f"book crossed: bid {best_bid} >= ask {best_ask}"
