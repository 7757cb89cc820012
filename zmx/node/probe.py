"""The probe: a SUB socket on any PUB endpoint (a matcher's or a relay's) that measures the feed.

Three layers, so tests and benchmarks can use the measuring without the screen:

- ``ProbeStats`` is the measuring core: fed each received frame with its receive time
  (``time.time_ns()``), it counts messages and bytes, follows each symbol's ``seq`` and counts
  the gaps, and records publish-to-receive latency. No sockets, no clock of its own.
- ``run_probe`` is the socket loop: it subscribes, feeds every frame to a ``ProbeStats`` and
  hands an ``Interval`` to a callback once a second, until the duration is over or the
  ``Stopper`` is set.
- ``interval_table`` and ``summary_table`` draw them with ``rich``; the CLI (``zmx probe``)
  shows the first in a ``rich.live.Live`` and prints the second at the end.

What counts (docs/wire.md: one frame per command per symbol):

- a **message** is a frame that decodes (``codec.decode_publication``); a ``FeedHeartbeat``
  (or an empty publication, which has no ``seq``) is a symbol's **heartbeat**. A frame that
  does not decode counts as a **decode error** (and its bytes as bytes), never as a message,
  and never stops the probe.
- a **gap** is a missing ``seq``: a publication of a symbol whose ``seq`` is more than 1 above
  the last one seen for that symbol adds the difference minus one. The first publication of a
  symbol only sets the starting point. A heartbeat carries the ``seq`` of the symbol's last
  publication: one above the last seen adds the difference (the publications in between were
  lost). A ``seq`` at or below the last one (a matcher that lost its state, a duplicate; below
  it for a heartbeat) is counted as **backwards** and becomes the new starting point.
- **latency** is the receive time minus the ``ts_ns`` of the publication's events (all events
  of one command share one ``ts_ns``), one sample per publication but heartbeats. Both are wall
  clocks; across machines the figure includes their offset, so a negative one is taken as 0.
- private publications (``@account`` topics) are counted as messages, under ``private`` (a
  row ``(private)`` of the tables), with no ``seq`` to follow: an account's events do not
  advance by exactly one.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import zmq
from rich.table import Table

from zmx.codec import MAX_PUBLICATION_BYTES, decode_publication
from zmx.events import FeedHeartbeat
from zmx.exceptions import DecodeError
from zmx.node.histogram import LatencyHistogram
from zmx.node.runtime import POLL_MS, Stopper, connect
from zmx.topics import is_private, topic

__all__ = ["Interval", "LatencyHistogram", "ProbeStats", "SymbolStats", "interval_table", "run_probe",
           "summary_table"]

# -- the measuring core ----------------------------------------------------------------------


@dataclass(slots=True)
class SymbolStats:
    """What the probe knows about one symbol's stream."""

    messages: int = 0
    heartbeats: int = 0
    last_seq: int | None = None
    gaps: int = 0
    backwards: int = 0

    def as_dict(self) -> dict[str, int | None]:
        return {"messages": self.messages, "heartbeats": self.heartbeats, "last_seq": self.last_seq,
                "gaps": self.gaps, "backwards": self.backwards}


@dataclass(frozen=True, slots=True)
class Interval:
    """What arrived since the previous ``ProbeStats.interval`` call."""

    seconds: float
    messages: int
    bytes: int
    decode_errors: int
    gaps: int
    latency_p50_us: float | None
    latency_p99_us: float | None

    @property
    def messages_per_s(self) -> float:
        return self.messages / self.seconds if self.seconds > 0 else 0.0

    @property
    def bytes_per_s(self) -> float:
        return self.bytes / self.seconds if self.seconds > 0 else 0.0


@dataclass(slots=True)
class ProbeStats:
    """Counters of a probe, fed one frame at a time with ``feed(frame, received_ns)``."""

    messages: int = 0
    bytes: int = 0
    decode_errors: int = 0
    private: int = 0
    last_error: str | None = None
    symbols: dict[str, SymbolStats] = field(default_factory=dict)
    latency: LatencyHistogram = field(default_factory=LatencyHistogram)
    # the current interval (reset by interval())
    _messages: int = 0
    _bytes: int = 0
    _decode_errors: int = 0
    _gaps: int = 0
    _latency: LatencyHistogram = field(default_factory=LatencyHistogram)

    def feed(self, frame: bytes | bytearray | memoryview, received_ns: int) -> None:
        """Account for one received frame; ``received_ns`` is ``time.time_ns()`` at its arrival."""
        size = len(frame)
        self.bytes += size
        self._bytes += size
        try:
            name, events = decode_publication(frame, MAX_PUBLICATION_BYTES)  # as much as a gateway takes
        except DecodeError as e:
            self.decode_errors += 1
            self._decode_errors += 1
            self.last_error = str(e)
            return
        self.messages += 1
        self._messages += 1
        if is_private(name):
            self.private += 1
            return
        stats = self.symbols.get(name)
        if stats is None:
            stats = self.symbols[name] = SymbolStats()
        stats.messages += 1
        if not events:
            stats.heartbeats += 1
            return
        last_event = events[-1]  # all events of one publication share one seq and one ts_ns
        seq = last_event.seq
        last = stats.last_seq
        beat = type(last_event) is FeedHeartbeat
        if last is not None:
            # a heartbeat is at the seq of its symbol's last publication: counted as the one after it
            follows = seq + 1 if beat else seq
            if follows > last + 1:
                missing = follows - last - 1
                stats.gaps += missing
                self._gaps += missing
            elif follows <= last:
                stats.backwards += 1
        stats.last_seq = seq
        if beat:
            stats.heartbeats += 1
            return
        latency = received_ns - last_event.ts_ns
        self.latency.add(latency)
        self._latency.add(latency)

    @property
    def gaps(self) -> int:
        return sum(s.gaps for s in self.symbols.values())

    def interval(self, seconds: float) -> Interval:
        """The counts since the previous call (``seconds`` ago, by the caller's clock); resets them."""
        p50, p99 = self._latency.percentile(50), self._latency.percentile(99)
        result = Interval(seconds=seconds, messages=self._messages, bytes=self._bytes,
                          decode_errors=self._decode_errors, gaps=self._gaps,
                          latency_p50_us=None if p50 is None else p50 / 1000,
                          latency_p99_us=None if p99 is None else p99 / 1000)
        self._messages = self._bytes = self._decode_errors = self._gaps = 0
        self._latency = LatencyHistogram()
        return result

    def summary(self, duration: float) -> dict[str, Any]:
        """Everything as one JSON-ready dict (what ``zmx probe --json`` prints)."""
        return {
            "duration": round(duration, 3),
            "messages": self.messages,
            "bytes": self.bytes,
            "messages_per_s": round(self.messages / duration, 1) if duration > 0 else None,
            "bytes_per_s": round(self.bytes / duration, 1) if duration > 0 else None,
            "decode_errors": self.decode_errors,
            "last_decode_error": self.last_error,
            "private": self.private,
            "gaps": self.gaps,
            "symbols": {name: s.as_dict() for name, s in sorted(self.symbols.items())},
            "latency_us": self.latency.summary_us(),
        }


# -- the socket loop -------------------------------------------------------------------------

DRAIN_LIMIT = 10_000  # frames read without blocking before the loop looks at its clock again
RCVHWM = 100_000  # generous, so that a gap is the feed's, not the probe's own queue


def subscriptions(symbols: Iterable[str]) -> list[bytes]:
    """The SUB prefixes for ``symbols``: their topics, or everything (``b""``) for none.

    ``ValueError`` for a name that cannot be a symbol.
    """
    topics = [topic(s) for s in symbols]
    return topics or [b""]


def run_probe(endpoint: str, *, symbols: Iterable[str] = (), duration: float | None = None,
              stopper: Stopper | None = None, on_interval: Callable[[Interval, ProbeStats], None] | None = None,
              interval: float = 1.0, stats: ProbeStats | None = None,
              context: zmq.Context | None = None) -> tuple[ProbeStats, float]:
    """Attach to ``endpoint`` and measure until ``duration`` seconds passed or ``stopper`` is set.

    ``on_interval(interval, stats)`` is called every ``interval`` seconds. Returns the stats
    and the seconds measured.
    """
    stats = stats if stats is not None else ProbeStats()
    stopper = stopper if stopper is not None else Stopper()
    prefixes = subscriptions(symbols)
    own_context = context is None
    ctx = zmq.Context() if context is None else context
    sub = ctx.socket(zmq.SUB)
    try:
        sub.linger = 0
        sub.rcvhwm = RCVHWM
        for prefix in prefixes:
            sub.subscribe(prefix)
        connect(sub, endpoint)
        recv = sub.recv
        feed = stats.feed
        now_ns = time.time_ns
        again = zmq.Again
        noblock = zmq.NOBLOCK
        start = last_tick = time.monotonic()
        end = None if duration is None else start + duration
        next_tick = start + interval
        while not stopper.stopped:
            now = time.monotonic()
            if end is not None and now >= end:
                break
            if now >= next_tick:
                report = stats.interval(now - last_tick)
                last_tick = now
                next_tick = max(next_tick + interval, now + interval / 2)
                if on_interval is not None:
                    on_interval(report, stats)
            wake = next_tick if end is None else min(next_tick, end)
            timeout_ms = max(0, min(POLL_MS, int((wake - now) * 1000) + 1))
            if not sub.poll(timeout_ms):
                continue
            for _ in range(DRAIN_LIMIT):
                try:
                    frame = recv(noblock)
                except again:
                    break
                feed(frame, now_ns())
        return stats, time.monotonic() - start
    finally:
        sub.close(linger=0)
        if own_context:
            ctx.term()


# -- display ---------------------------------------------------------------------------------


def _us(value: float | None) -> str:
    return "-" if value is None else f"{value:,.1f}"


def _bytes(value: float) -> str:
    for unit in ("B", "KiB", "MiB"):
        if value < 1024:
            return f"{value:,.0f} {unit}" if unit == "B" else f"{value:,.1f} {unit}"
        value /= 1024
    return f"{value:,.1f} GiB"


PRIVATE_ROW = "(private)"  # the row of the accounts' publications (fills of resting orders): no seq of their own
# A symbol's columns: "back" counts its seq going back (a matcher that restarted without its
# history: the event an operator most needs to see, and no gap)


def _symbol_rows(table: Table, stats: ProbeStats) -> None:
    for name, s in sorted(stats.symbols.items()):
        table.add_row(name, f"{s.messages:,}", "-" if s.last_seq is None else str(s.last_seq),
                      f"{s.gaps:,}", f"{s.backwards:,}", f"{s.heartbeats:,}")
    if stats.private:
        table.add_row(PRIVATE_ROW, f"{stats.private:,}", "-", "-", "-", "-")


def _symbols_table(stats: ProbeStats, title: str) -> Table:
    table = Table(title=title, title_justify="left")
    table.add_column("symbol", no_wrap=True)
    table.add_column("messages", justify="right")
    table.add_column("last seq", justify="right")
    table.add_column("gaps", justify="right")
    table.add_column("back", justify="right")
    table.add_column("heartbeats", justify="right")
    _symbol_rows(table, stats)
    return table


def interval_table(target: str, report: Interval, stats: ProbeStats, elapsed: float) -> Table:
    """The live view: this second's rates and latency, then every symbol's stream."""
    grid = Table.grid(padding=(0, 2))
    rates = Table(title=f"probe {target}: {elapsed:,.0f} s (latency: publish to receive)", title_justify="left")
    # short headers: the table fits 80 columns (latency: publish to receive, from the events' ts_ns)
    for column in ("msgs/s", "bytes/s", "p50 µs", "p99 µs", "gaps", "undecoded", "msgs"):
        rates.add_column(column, justify="right", no_wrap=True)
    rates.add_row(f"{report.messages_per_s:,.0f}", f"{_bytes(report.bytes_per_s)}/s", _us(report.latency_p50_us),
                  _us(report.latency_p99_us), f"{stats.gaps:,}", f"{stats.decode_errors:,}", f"{stats.messages:,}")
    grid.add_row(rates)
    grid.add_row(_symbols_table(stats, "symbols"))
    return grid


def summary_table(target: str, summary: dict[str, Any]) -> Table:
    """The end of a probe run: totals, latency and every symbol."""
    latency = summary["latency_us"]
    grid = Table.grid(padding=(0, 2))
    totals = Table(title=f"probe {target}: summary of {summary['duration']:,.1f} s (latency: publish to receive)",
                   title_justify="left")
    for column in ("msgs", "msgs/s", "bytes", "gaps", "undecoded", "p50 µs", "p99 µs", "max µs"):
        totals.add_column(column, justify="right", no_wrap=True)
    rate = summary["messages_per_s"]
    totals.add_row(f"{summary['messages']:,}", "-" if rate is None else f"{rate:,.0f}", _bytes(summary["bytes"]),
                   f"{summary['gaps']:,}", f"{summary['decode_errors']:,}", _us(latency["p50"]),
                   _us(latency["p99"]), _us(latency["max"]))
    grid.add_row(totals)
    symbols = Table(title="symbols", title_justify="left")
    for column in ("symbol", "messages", "last seq", "gaps", "back", "heartbeats"):
        symbols.add_column(column, justify="left" if column == "symbol" else "right", no_wrap=True)
    for name, s in summary["symbols"].items():
        symbols.add_row(name, f"{s['messages']:,}", "-" if s["last_seq"] is None else str(s["last_seq"]),
                        f"{s['gaps']:,}", f"{s['backwards']:,}", f"{s['heartbeats']:,}")
    if summary["private"]:
        symbols.add_row(PRIVATE_ROW, f"{summary['private']:,}", "-", "-", "-", "-")
    grid.add_row(symbols)
    return grid
