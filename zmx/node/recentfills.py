"""A matcher's recent fills of resting orders, by account: what a gateway asks for after it
lost its feed.

A resting order's fill (an ``OrderFilled`` with ``maker``: another client's order took it)
reaches its owner only through the matcher's PUB, under the account's topic: the owner sent
no request that it could be the reply to. A gateway that had no feed for a while (its relay
died, hung or was replaced by a standby; the matcher restarted) lost those fills, and the
market data's Clone pattern does not bring them back: a book snapshot has no accounts. So a
matcher keeps the packed records of the fills it published in the last ``RETAIN_S``
seconds, at most ``RETAIN_MAX`` of them, and answers a gateway's ``FILLS`` request on its
snapshot socket with an account's fills after the trade ids the gateway already has
(docs/wire.md, "Fills a gateway missed").

``complete_since_ns`` says how far back the answer is whole: every fill stamped at or after
it is held. It starts at the matcher's start (or at the first command its journal replays,
whose fills are added again: a fill published just before a ``kill -9`` is not lost), and
moves forward as fills are dropped for age or count.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping

__all__ = ["RETAIN_MAX", "RETAIN_S", "RecentFills"]

# Ten times the longest outage the cluster's own recovery took here (a standby's switch: 6-7 s),
# and short enough that a busy matcher reaches the bound within its first minutes
RETAIN_S = 120.0
RETAIN_MAX = 100_000  # fills held at most (about 310 bytes each, 31 MB in all)


class RecentFills:
    """Fills of resting orders, oldest first, by account. Not thread-safe; the matcher's loop owns it."""

    __slots__ = ("_accounts", "_order", "complete_since_ns", "limit", "retain_ns")

    def __init__(self, since_ns: int, *, retain_s: float = RETAIN_S, limit: int = RETAIN_MAX) -> None:
        if limit < 1:
            raise ValueError(f"limit must be at least 1, got {limit}")
        self.retain_ns = int(retain_s * 1e9)
        self.limit = limit
        self.complete_since_ns = since_ns
        self._order: deque[tuple[int, str]] = deque()  # (ts_ns, account) of every fill held, oldest first
        # account -> its fills held, oldest first: (symbol, trade_id, packed record)
        self._accounts: dict[str, deque[tuple[str, int, bytes]]] = {}

    def __len__(self) -> int:
        return len(self._order)

    def add(self, account: str, symbol: str, trade_id: int, ts_ns: int, record: bytes) -> None:
        """Hold one fill (fills come in the order the engines made them)."""
        own = self._accounts.get(account)
        if own is None:
            own = self._accounts[account] = deque()
        own.append((symbol, trade_id, record))
        self._order.append((ts_ns, account))
        if len(self._order) > self.limit:
            self._drop_oldest()

    def expire(self, now_ns: int) -> None:
        """Drop the fills older than ``retain_s``."""
        order = self._order
        oldest = now_ns - self.retain_ns
        while order and order[0][0] < oldest:
            self._drop_oldest()

    def of(self, account: str, after: Mapping[str, int]) -> list[bytes]:
        """The records of ``account``'s fills on the symbols of ``after`` whose trade id is above
        the symbol's value there, oldest first."""
        own = self._accounts.get(account)
        if not own:
            return []
        out = []
        for symbol, trade_id, record in own:
            last = after.get(symbol)
            if last is not None and trade_id > last:
                out.append(record)
        return out

    def _drop_oldest(self) -> None:
        ts_ns, account = self._order.popleft()
        own = self._accounts[account]
        own.popleft()  # an account's oldest fill is the oldest of all that are its own
        if not own:
            del self._accounts[account]
        if ts_ns >= self.complete_since_ns:
            self.complete_since_ns = ts_ns + 1

    def _check(self) -> None:
        """The invariants (tests): every fill held is in both views, each in order."""
        assert sum(map(len, self._accounts.values())) == len(self._order) <= self.limit
        assert all(self._accounts.values())
        stamps = [ts for ts, _ in self._order]
        assert stamps == sorted(stamps)
