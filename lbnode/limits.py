"""Overload protection arithmetic: per-client rate limits and the pool retry budget.

Owns "may this request / this retry go now, and if not, for how long must it
wait?". Pure: no I/O and no clock reads; every ``now`` is passed in.
"""

from __future__ import annotations

import math
from collections import OrderedDict, deque


class TokenBucket:
    """``burst`` requests at once, then ``rate`` per second; starts full.

    Over any interval of length T it allows at most ``burst + rate * T``
    requests. A refused request costs nothing.
    """

    __slots__ = ("rate", "burst", "tokens", "updated")

    def __init__(self, rate: float, burst: float, now: float = 0.0) -> None:
        if not rate > 0 or not burst >= 1:
            raise ValueError(f"need rate > 0 and burst >= 1, got rate={rate} burst={burst}")
        self.rate = rate
        self.burst = float(burst)
        self.tokens = float(burst)
        self.updated = now

    def take(self, now: float) -> float:
        """0.0 when allowed (one token spent), else the seconds until a token is there."""
        # The refill first (here, not in a method of its own: a call per request less). A clock
        # that steps back must not mint tokens, nor jam the bucket.
        if now > self.updated:
            self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate)
            self.updated = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / self.rate

    def full_at(self) -> float:
        """When the bucket will be full again if nothing is taken (a full bucket is a fresh one)."""
        return self.updated + (self.burst - self.tokens) / self.rate


def retry_after_seconds(wait: float) -> int:
    """``Retry-After`` value for a 429: whole seconds, rounded up, at least 1."""
    return max(1, math.ceil(wait))


# How many of the least recently seen clients a new client's arrival inspects for removal:
# a constant, so a call stays O(1), and above 1 so the table shrinks while clients come.
_SWEEP_PER_CALL = 2
# A known client's request sweeps too, but at most every _SWEEP_INTERVAL seconds and then up
# to _SWEEP_PER_INTERVAL clients, so that the table also shrinks while the same clients stay
# (at up to 640 clients a second) without a sweep on every request of a busy client.
_SWEEP_INTERVAL = 0.1
_SWEEP_PER_INTERVAL = 64


class RateLimiter:
    """One ``TokenBucket`` per client key (the client IP), at most ``max_clients`` of them.

    Memory is bounded: clients whose bucket has refilled are dropped (they
    would get a fresh full bucket anyway, so nothing is lost), and when the
    table is full the least recently seen client is dropped even if its
    bucket is not full, which hands that client a new burst. Size
    ``max_clients`` above the number of clients active within ``burst / rate``
    seconds and that never happens.
    """

    def __init__(self, rate: float, burst: int, max_clients: int = 100_000) -> None:
        if max_clients < 1:
            raise ValueError(f"max_clients must be >= 1, got {max_clients}")
        TokenBucket(rate, burst)  # validates rate and burst with the same message
        self.rate = rate
        self.burst = burst
        self.max_clients = max_clients
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()
        self._sweep_at = -math.inf  # when a known client's request next sweeps
        self.evicted_early = 0  # clients dropped before their bucket was full

    def __len__(self) -> int:
        return len(self._buckets)

    def take(self, client: str, now: float) -> float:
        """0.0 when the client may go on, else seconds until it may (for ``Retry-After``)."""
        buckets = self._buckets
        bucket = buckets.get(client)
        if bucket is None:
            self._sweep(now, _SWEEP_PER_CALL)
            while len(buckets) >= self.max_clients:
                _, oldest = buckets.popitem(last=False)
                if oldest.full_at() > now:
                    self.evicted_early += 1
            bucket = buckets[client] = TokenBucket(self.rate, self.burst, now)
            return bucket.take(now)
        buckets.move_to_end(client)
        wait = bucket.take(now)
        # After the take, not before: a client whose bucket had refilled since its last request
        # (a client at a low rate: most of them) keeps it rather than have it swept and made
        # again, and being the most recent now, it is where the sweep stops.
        if now >= self._sweep_at:
            self._sweep_at = now + _SWEEP_INTERVAL
            self._sweep(now, _SWEEP_PER_INTERVAL)
        return wait

    def _sweep(self, now: float, most: int) -> None:
        """Drop up to ``most`` of the least recently seen clients whose bucket is full again."""
        for _ in range(most):
            if not self._buckets:
                return
            client, bucket = next(iter(self._buckets.items()))
            if bucket.full_at() > now:
                return
            del self._buckets[client]


# The retry budget's reserve, in retries per second over its window (Finagle's default).
# With the old floor (3 in the current second, instead of the share, not on top of it) one
# failing backend of three at 20 req/s or more answered 13 % of the requests with its 503.
MIN_RETRIES_PER_SECOND = 10.0


class RetryBudget:
    """Retries allowed as a share of recent requests, so retries cannot multiply an overload.

    A retry is allowed while retries over the last ``window`` seconds stay
    below ``percent`` % of the requests over the same window plus a reserve of
    ``min_per_second`` x ``window`` (Finagle's budget: 20 % and 10/s). The
    reserve adds to the share, so a pool at a moderate rate can retry every
    request that one failing backend of three gets, while an overload can
    still multiply the load by at most 1 + percent/100 (plus the reserve).
    Call ``record_request`` once per client request (not per retry);
    ``try_acquire`` counts the retry it grants.
    """

    # Width of one counting bucket: the window slides one bucket at a time.
    BUCKET_SECONDS = 1.0

    def __init__(self, percent: float, min_per_second: float = MIN_RETRIES_PER_SECOND, window: float = 10.0) -> None:
        if not 0 <= percent <= 100 or min_per_second < 0 or window < self.BUCKET_SECONDS:
            raise ValueError(
                f"need 0 <= percent <= 100, min_per_second >= 0, window >= 1s; "
                f"got {percent}, {min_per_second}, {window}"
            )
        self.percent = percent
        self.min_per_second = min_per_second
        self._buckets_in_window = math.ceil(window / self.BUCKET_SECONDS)
        self._reserve = min_per_second * self._buckets_in_window * self.BUCKET_SECONDS
        # [bucket number, requests, retries], oldest first
        self._buckets: deque[list[int]] = deque()
        self.requests = 0  # totals over the window
        self.retries = 0
        self.refused = 0  # lifetime count of retries refused, for metrics
        # Time span of the newest bucket: a ``now`` inside it needs no bucket arithmetic.
        self._newest_from = math.inf
        self._newest_until = -math.inf

    def record_request(self, now: float) -> None:
        self._current(now)[1] += 1
        self.requests += 1

    def try_acquire(self, now: float) -> bool:
        bucket = self._current(now)
        allowed = self.retries < self.requests * self.percent / 100.0 + self._reserve
        if allowed:
            bucket[2] += 1
            self.retries += 1
        else:
            self.refused += 1
        return allowed

    def _current(self, now: float) -> list[int]:
        if self._newest_from <= now < self._newest_until:
            return self._buckets[-1]  # the common case: a request in the same second as the last
        number = math.floor(now / self.BUCKET_SECONDS)
        buckets = self._buckets
        while buckets and buckets[0][0] <= number - self._buckets_in_window:
            _, requests, retries = buckets.popleft()
            self.requests -= requests
            self.retries -= retries
        if buckets and buckets[-1][0] >= number:
            return buckets[-1]  # same bucket, or a clock that stepped back: count it here
        bucket = [number, 0, 0]
        buckets.append(bucket)
        self._newest_from = number * self.BUCKET_SECONDS
        self._newest_until = (number + 1) * self.BUCKET_SECONDS
        return bucket
