"""Latency histograms the data path fills and ``/metrics`` reads.

Owns the bucket bounds and one ``observe`` per request: a C bisect and two
integer adds. Never formats, locks or allocates on the request path.
"""

from __future__ import annotations

from bisect import bisect_left

# Seconds. 1 ms (a backend on the same rack) to 30 s (a report that times out):
# about three buckets a decade so a p99 is readable, and few enough that
# per-backend histograms stay cheap to scrape.
BUCKETS: tuple[float, ...] = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)


class Histogram:
    """Counts per bucket (not cumulative: one add per observation); summed at scrape time."""

    __slots__ = ("counts", "sum")

    def __init__(self) -> None:
        self.counts = [0] * (len(BUCKETS) + 1)  # the last one: above 30 s (+Inf)
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        # bisect_left: a value equal to a bound lands in that bound's bucket (Prometheus' `le`).
        self.counts[bisect_left(BUCKETS, seconds)] += 1
        self.sum += seconds

    def cumulative(self) -> list[int]:
        """Counts per ``le`` bound, BUCKETS then +Inf, as the exposition wants them."""
        out, total = [], 0
        for c in self.counts:
            total += c
            out.append(total)
        return out
