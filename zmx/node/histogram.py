"""A latency histogram of constant size: the probe's and the gateway's.

Log-linear buckets (the HdrHistogram layout): exact below 256 ns, then each power of two cut
into 128 buckets, so a percentile is within 0.8% of the true value, however many samples.
"""

from __future__ import annotations

from itertools import accumulate

__all__ = ["LatencyHistogram"]

_SUB_BITS = 7
_SUB = 1 << _SUB_BITS  # 128 buckets per power of two: a recorded value is off by < 1/128
_EXACT = 2 * _SUB  # values below this (ns) get a bucket of their own


class LatencyHistogram:
    """Counts of nanosecond values in log-linear buckets (the HdrHistogram layout).

    Values below 256 ns are exact; above, each power of two is cut into 128 buckets, so a
    percentile is within 0.8% of the true value, with constant memory however many values
    come. ``max`` is exact.
    """

    __slots__ = ("count", "counts", "max")

    def __init__(self) -> None:
        self.counts: list[int] = [0] * (_SUB * 64)
        self.count = 0
        self.max = 0

    def add(self, value_ns: int) -> None:
        if value_ns < 0:
            value_ns = 0
        shift = value_ns.bit_length() - _SUB_BITS - 1
        if shift <= 0:
            self.counts[value_ns] += 1
        else:
            self.counts[(value_ns >> shift) + _SUB * shift] += 1
        self.count += 1
        if value_ns > self.max:
            self.max = value_ns

    @staticmethod
    def _bucket_value(index: int) -> int:
        """The middle of bucket ``index``'s range of values."""
        if index < _EXACT:
            return index
        shift = index // _SUB - 1
        top = index - _SUB * shift
        return (top << shift) + (1 << (shift - 1))

    def percentile(self, p: float) -> int | None:
        """The value (ns) that ``p`` percent of the samples are at or below; None without samples."""
        if not self.count:
            return None
        rank = max(1, -(-self.count * p // 100))  # nearest rank, ceil(count * p / 100)
        for index, seen in enumerate(accumulate(self.counts)):
            if seen >= rank:
                return min(self._bucket_value(index), self.max)
        return self.max  # unreachable: the last cumulative count is self.count

    def summary_us(self) -> dict[str, float | int | None]:
        """``{"p50": µs, "p99": µs, "max": µs, "samples": n}``, None where there are no samples."""
        def us(ns: int | None) -> float | None:
            return None if ns is None else round(ns / 1000, 1)
        return {"p50": us(self.percentile(50)), "p99": us(self.percentile(99)),
                "max": us(self.max if self.count else None), "samples": self.count}
