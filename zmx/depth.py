"""The L2 (price level) view of a book: checksum, formatting, and a mirror kept from diffs.

A subscriber keeps its copy of a symbol's book the way zguide's Clone pattern does: it
subscribes the updates first and buffers them, asks for a snapshot (the full L2 book and
the ``seq`` it is valid at), loads it, and applies the buffered updates that come after it.
From then on each ``BookChanged`` must carry the next ``seq``; a jump means something was
missed and the copy is thrown away until a fresh snapshot arrives. ``L2Mirror`` is that
state machine, with no I/O: the gateway's channels wrap it (``zmx.protocol.Channel``), and a
Python subscriber of a matcher's feed can too.

Inside, a level is ``(price_ticks, lots)``; at the edge it is ``[price, quantity]`` as
decimal strings (``format_levels``). The checksum is over the strings, so a client checks
exactly what it was sent.
"""

from __future__ import annotations

import zlib
from collections import deque
from collections.abc import Iterable, Sequence
from itertools import islice

from sortedcontainers import SortedDict

from zmx.events import BookChanged, Level
from zmx.exceptions import SequenceGap
from zmx.model import SymbolSpec

__all__ = [
    "CHECKSUM_DEPTH",
    "MAX_BUFFERED",
    "L2Mirror",
    "apply_levels",
    "book_checksum",
    "checksum",
    "format_levels",
]

CHECKSUM_DEPTH = 25
"""How many levels of each side the checksum covers."""

MAX_BUFFERED = 100_000
"""Default bound of the updates an unsynced mirror holds while it waits for a snapshot."""

_LEVEL_TEXT_CACHE = 2048
# L2Mirror memoises each price and quantity text (``texts``, shared by the messages and the
# checksum): formatting a number costs about 1.5-2 us here, and an update's levels are
# formatted twice (the top levels' texts for the checksum, then the message). The checksum
# itself is kept until an update reaches a side's top levels, and each side's top
# "price:quantity" texts are kept and edited in place by the updates. (A memo of whole
# "price:quantity" texts, keyed by price and quantity, missed on 19 of 20 updates: a level's
# new total is almost always new.) The bound keeps a long-lived mirror small: a memo is
# cleared when it passes it. (At 65,536 a busy gateway grew by about 15 MB per side of every
# symbol before the first clear, which the soak benchmark showed as an RSS climb of 20 MB a
# minute.)


def checksum(bids: Sequence[Sequence[str]], asks: Sequence[Sequence[str]]) -> int:
    """CRC32 (unsigned, ``zlib.crc32``) of the top ``CHECKSUM_DEPTH`` levels of each side.

    ``bids`` and ``asks`` are ``(price, quantity)`` string pairs, best first, exactly as
    they are sent to clients. The checksummed text interleaves the sides level by level::

        bid1p:bid1q:ask1p:ask1q:bid2p:bid2q:ask2p:ask2q:...

    up to level 25 of each side; a side that has run out is skipped, levels below the 25th
    are ignored. The text is UTF-8 (ASCII in practice) and an empty book gives
    ``crc32(b"") == 0``.

    Example: bids ``[("30000", "1.5"), ("29999.5", "0.25")]``, asks ``[("30001", "2")]``
    give the text ``30000:1.5:30001:2:29999.5:0.25`` and the checksum
    ``zlib.crc32(b"30000:1.5:30001:2:29999.5:0.25") == 1958360348``.
    """
    parts: list[str] = []
    n_bids = min(len(bids), CHECKSUM_DEPTH)
    n_asks = min(len(asks), CHECKSUM_DEPTH)
    for i in range(max(n_bids, n_asks)):
        if i < n_bids:
            parts.extend(bids[i][:2])
        if i < n_asks:
            parts.extend(asks[i][:2])
    return zlib.crc32(":".join(parts).encode())


def format_levels(spec: SymbolSpec, levels: Iterable[Level]) -> list[list[str]]:
    """``[(ticks, lots), ...]`` -> ``[[price, quantity], ...]`` as sent to clients (0 lots -> ``"0"``)."""
    price, quantity = spec.ticks_to_price, spec.lots_to_quantity
    return [[price(ticks), quantity(lots)] for ticks, lots in levels]


def book_checksum(spec: SymbolSpec, bids: Iterable[Level], asks: Iterable[Level]) -> int:
    """The ``checksum`` of a book given as integer levels, best first (only the top 25 are read)."""
    return checksum(format_levels(spec, islice(bids, CHECKSUM_DEPTH)),
                    format_levels(spec, islice(asks, CHECKSUM_DEPTH)))


def apply_levels(side: SortedDict, levels: Iterable[Level], sign: int) -> None:
    """Set each level's new total on one side; 0 lots removes it (absent is fine).

    The side is keyed by ``sign * ticks``: ``-1`` for bids so that the best (highest)
    bid sorts first, ``1`` for asks. One dict operation per level.
    """
    for ticks, lots in levels:
        if lots:
            side[sign * ticks] = lots
        else:
            side.pop(sign * ticks, None)


class L2Mirror:
    """An L2 copy of one symbol's book, kept from a snapshot plus ``BookChanged`` diffs.

    States: *unsynced* (``seq is None``, empty book; updates are buffered) and *synced*
    (``seq`` is the last update applied). ``load_snapshot`` goes from any state to synced;
    a sequence gap goes back to unsynced and raises ``SequenceGap`` so the holder asks for
    a new snapshot.
    """

    __slots__ = ("_ask_top", "_asks", "_bid_top", "_bids", "_buffer", "_checksum", "_prices", "_quantities",
                 "_text_spec", "seq", "symbol")

    def __init__(self, symbol: str, *, max_buffered: int = MAX_BUFFERED) -> None:
        self.symbol = symbol
        self.seq: int | None = None
        self._bids: SortedDict = SortedDict()  # -ticks -> lots
        self._asks: SortedDict = SortedDict()  # ticks -> lots
        # Bounded: past the bound the oldest update is dropped, and load_snapshot then sees
        # that it cannot bridge the snapshot to what is left.
        self._buffer: deque[BookChanged] = deque(maxlen=max_buffered)
        self._text_spec: SymbolSpec | None = None
        self._prices: dict[int, str] = {}  # ticks -> price text
        self._quantities: dict[int, str] = {}  # lots -> quantity text (the level's new total usually
        # comes in an update first: its text is then made once, for the message and the checksum)
        # The checksum of the book as it is (None once an update changed a side's top
        # CHECKSUM_DEPTH levels), and each side's top-level texts, best first: made by the first
        # checksum(), then edited by every update that reaches them (_apply_keeping_top).
        self._checksum: int | None = None
        self._bid_top: list[str] | None = None
        self._ask_top: list[str] | None = None

    @property
    def synced(self) -> bool:
        return self.seq is not None

    @property
    def buffered(self) -> int:
        """How many updates wait for a snapshot."""
        return len(self._buffer)

    def apply(self, change: BookChanged) -> bool:
        """Apply the next update; ``True`` if it changed the mirror.

        Synced: an old or repeated ``seq`` is ignored (``False``); the next one is applied;
        a later one raises ``SequenceGap``, and the mirror becomes unsynced with that update
        as the first one buffered (a snapshot at or after ``change.seq - 1`` bridges it).
        Unsynced: the update is buffered for ``load_snapshot`` (``False``).
        """
        if change.symbol != self.symbol:
            raise ValueError(f"{self.symbol} mirror got an update of {change.symbol}")
        seq = self.seq
        if seq is None:
            self._buffer.append(change)
            return False
        if change.seq <= seq:
            return False
        if change.seq != seq + 1:
            self.reset()
            self._buffer.append(change)
            raise SequenceGap(self.symbol, seq + 1, change.seq)
        if change.bids:
            top = self._bid_top
            if top is None:
                apply_levels(self._bids, change.bids, -1)
            elif self._apply_keeping_top(self._bids, change.bids, -1, top):
                self._checksum = None
        if change.asks:
            top = self._ask_top
            if top is None:
                apply_levels(self._asks, change.asks, 1)
            elif self._apply_keeping_top(self._asks, change.asks, 1, top):
                self._checksum = None
        self.seq = change.seq
        return True

    def _apply_keeping_top(self, side: SortedDict, levels: Iterable[Level], sign: int, top: list[str]) -> bool:
        """``apply_levels``, and the side's top ``CHECKSUM_DEPTH`` texts (``top``, known)
        edited in place: a level changed, added or removed there is one list operation at its
        position, instead of the whole list made again (most updates reach the top levels).
        Whether the top changed."""
        depth = CHECKSUM_DEPTH
        changed = False
        for ticks, lots in levels:
            key = sign * ticks
            if lots:
                known = key in side
                side[key] = lots
                pos = side.index(key)
                if pos < depth:
                    text = self._level_text(ticks, lots)
                    if known:
                        top[pos] = text
                    else:
                        top.insert(pos, text)
                        del top[depth:]
                    changed = True
            elif key in side:
                pos = side.index(key)
                del side[key]
                if pos < depth:
                    del top[pos]
                    if len(side) >= depth:
                        key, lots = side.peekitem(depth - 1)
                        top.append(self._level_text(sign * key, lots))
                    changed = True
        return changed

    def load_snapshot(self, seq: int, bids: Iterable[Level], asks: Iterable[Level]) -> list[BookChanged]:
        """Replace the book with a snapshot valid at ``seq`` and catch up from the buffer.

        ``bids`` and ``asks`` are ``(ticks, lots)`` levels. Buffered updates at or before
        ``seq`` are dropped (the snapshot already holds them); the ones after it are applied
        in order and returned, so the holder can forward them. If they do not follow on
        (the first is not ``seq + 1``, or one is missing further on) this raises
        ``SequenceGap`` and the mirror stays unsynced with the buffer kept from the first
        update after the hole, so that a newer snapshot can still bridge it.
        """
        buffered = self._buffer
        self._forget_checksum()
        self._bids.clear()
        self._asks.clear()
        apply_levels(self._bids, bids, -1)
        apply_levels(self._asks, asks, 1)
        applied: list[BookChanged] = []
        while buffered:
            change = buffered[0]
            if change.seq <= seq:
                buffered.popleft()  # already in the snapshot, or a repeat
                continue
            if change.seq != seq + 1:
                self._bids.clear()
                self._asks.clear()
                self.seq = None
                raise SequenceGap(self.symbol, seq + 1, change.seq)
            buffered.popleft()
            apply_levels(self._bids, change.bids, -1)
            apply_levels(self._asks, change.asks, 1)
            seq = change.seq
            applied.append(change)
        self.seq = seq
        return applied

    def levels(self, limit: int | None = None) -> tuple[list[Level], list[Level]]:
        """``(bids, asks)`` as ``(ticks, lots)``, best first, at most ``limit`` per side."""
        bids = [(-key, lots) for key, lots in self._bids.items()[:limit]]
        asks = self._asks.items()[:limit]
        return bids, asks

    def checksum(self, spec: SymbolSpec) -> int:
        """The ``checksum`` clients compute on their copy after the last update.

        Equal to ``book_checksum(spec, *self.levels())``, with each level's text memoised.
        """
        if spec is not self._text_spec:
            self._use_spec(spec)
        elif self._checksum is not None:
            return self._checksum  # no update reached the top levels since it was computed
        bids = self._bid_top
        if bids is None:
            bids = self._bid_top = self._top_texts(self._bids, -1)
        asks = self._ask_top
        if asks is None:
            asks = self._ask_top = self._top_texts(self._asks, 1)
        # The same text as checksum(): the levels interleaved, bid first, the longer side's
        # rest after them. Slice assignment interleaves in C: a comprehension over zip() took
        # more time than the join and the CRC together.
        n_bids, n_asks = len(bids), len(asks)
        n = min(n_bids, n_asks)
        parts: list[str] = [""] * (2 * n)
        parts[::2] = bids if n_bids == n else bids[:n]
        parts[1::2] = asks if n_asks == n else asks[:n]
        if n_bids != n_asks:
            parts += bids[n:] or asks[n:]
        self._checksum = zlib.crc32(":".join(parts).encode())
        return self._checksum

    def texts(self, spec: SymbolSpec, levels: Iterable[Level]) -> list[list[str]]:
        """``[[price, quantity], ...]`` of ``(ticks, lots)`` levels, the strings clients get
        (``format_levels``), memoised: formatting a number costs about 1.5 us here."""
        if spec is not self._text_spec:
            self._use_spec(spec)
        prices, quantities = self._prices, self._quantities
        if len(prices) > _LEVEL_TEXT_CACHE:
            prices.clear()
        if len(quantities) > _LEVEL_TEXT_CACHE:
            quantities.clear()
        out = []
        for ticks, lots in levels:
            price = prices.get(ticks)
            if price is None:
                price = prices[ticks] = spec.ticks_to_price(ticks)
            quantity = quantities.get(lots)
            if quantity is None:
                quantity = quantities[lots] = spec.lots_to_quantity(lots)
            out.append([price, quantity])
        return out

    def _top_texts(self, side: SortedDict, sign: int) -> list[str]:
        """The "price:quantity" texts of a side's top levels, best first, in ``_text_spec``'s units."""
        level_text = self._level_text
        return [level_text(sign * key, lots) for key, lots in side.items()[:CHECKSUM_DEPTH]]

    def _level_text(self, ticks: int, lots: int) -> str:
        """One level's "price:quantity" text in ``_text_spec``'s units (its two halves memoised)."""
        price = self._prices.get(ticks)
        quantity = self._quantities.get(lots)
        if price is None or quantity is None:
            (price, quantity), = self.texts(self._text_spec, ((ticks, lots),))  # type: ignore[arg-type]
        return f"{price}:{quantity}"

    def _use_spec(self, spec: SymbolSpec) -> None:
        """Texts from now on in ``spec``'s units: every memo goes."""
        self._text_spec = spec
        self._prices.clear()
        self._quantities.clear()
        self._forget_checksum()

    def _forget_checksum(self) -> None:
        self._checksum = self._bid_top = self._ask_top = None

    def reset(self) -> None:
        """Forget everything: unsynced, empty book, empty buffer."""
        self.seq = None
        self._forget_checksum()
        self._bids.clear()
        self._asks.clear()
        self._buffer.clear()

    def _check(self) -> None:
        """Assert the invariants (tests call this)."""
        for side in (self._bids, self._asks):
            side._check()
            for key, lots in side.items():
                assert isinstance(key, int) and isinstance(lots, int), (key, lots)
                assert lots > 0, (key, lots)
        if self.seq is None:
            assert not self._bids and not self._asks
        else:
            assert not self._buffer, "a synced mirror buffers nothing"
        spec = self._text_spec
        for top, side, sign in ((self._bid_top, self._bids, -1), (self._ask_top, self._asks, 1)):
            if top is not None and spec is not None:  # kept by the updates: equal to one made afresh
                fresh = [f"{price}:{quantity}" for price, quantity in format_levels(
                    spec, ((sign * key, lots) for key, lots in side.items()[:CHECKSUM_DEPTH]))]
                assert top == fresh, (top, fresh)

    def __repr__(self) -> str:
        state = f"seq={self.seq}" if self.synced else f"unsynced, {len(self._buffer)} buffered"
        return f"<L2Mirror {self.symbol} {state}, {len(self._bids)} bids, {len(self._asks)} asks>"
