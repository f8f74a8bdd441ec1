"""Rate limits and retry budget: pure, time passed in."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lbnode import limits
from lbnode.limits import RateLimiter, RetryBudget, TokenBucket, retry_after_seconds

# --------------------------------------------------------------------------- token bucket


def test_a_full_bucket_allows_burst_at_once_then_refuses() -> None:
    bucket = TokenBucket(rate=10.0, burst=5)
    assert [bucket.take(0.0) for _ in range(5)] == [0.0] * 5
    assert bucket.take(0.0) == pytest.approx(0.1)


def test_tokens_come_back_at_rate() -> None:
    bucket = TokenBucket(rate=4.0, burst=1)
    assert bucket.take(0.0) == 0.0
    assert bucket.take(0.1) == pytest.approx(0.15)  # 0.4 token there, 0.6 missing at 4/s
    assert bucket.take(0.25) == 0.0
    # steady state: exactly `rate` per second
    allowed = sum(1 for i in range(1, 4001) if bucket.take(0.25 + i * 0.001) == 0.0)
    assert allowed == 16


def test_a_refused_request_costs_nothing() -> None:
    bucket = TokenBucket(rate=1.0, burst=1)
    bucket.take(0.0)
    for _ in range(100):
        assert bucket.take(0.5) > 0
    assert bucket.take(1.0) == 0.0


def test_the_bucket_never_holds_more_than_burst() -> None:
    bucket = TokenBucket(rate=100.0, burst=3)
    assert [bucket.take(3600.0) for _ in range(4)][-1] > 0


def test_a_clock_stepping_back_mints_nothing() -> None:
    bucket = TokenBucket(rate=1.0, burst=1, now=10.0)
    assert bucket.take(10.0) == 0.0
    assert bucket.take(5.0) > 0
    assert bucket.take(10.5) == pytest.approx(0.5)


def test_bad_limits_are_refused() -> None:
    with pytest.raises(ValueError):
        TokenBucket(rate=0.0, burst=1)
    with pytest.raises(ValueError):
        TokenBucket(rate=1.0, burst=0)


@given(
    st.floats(0.01, 1000.0),
    st.integers(1, 50),
    st.lists(st.floats(0.0, 2.0), min_size=1, max_size=300),
)
def test_never_more_than_burst_plus_rate_times_t_in_any_window(
    rate: float, burst: int, gaps: list[float]
) -> None:
    bucket = TokenBucket(rate, burst)
    now, allowed_at = 0.0, []
    for gap in gaps:
        now += gap
        if bucket.take(now) == 0.0:
            allowed_at.append(now)
    for i, start in enumerate(allowed_at):
        for j in range(i, len(allowed_at)):
            window = allowed_at[j] - start
            assert j - i + 1 <= burst + rate * window + 1e-6


@given(st.floats(0.01, 100.0), st.integers(1, 20), st.floats(0.0, 10.0))
def test_the_wait_returned_is_exactly_enough(rate: float, burst: int, after: float) -> None:
    bucket = TokenBucket(rate, burst)
    while bucket.take(0.0) == 0.0:
        pass
    wait = bucket.take(after)
    if wait > 0:
        assert bucket.take(after + wait * 0.99) > 0
        assert bucket.take(after + wait * 1.000001) == 0.0


# --------------------------------------------------------------------------- Retry-After


def test_retry_after_is_whole_seconds_rounded_up_and_at_least_one() -> None:
    assert retry_after_seconds(0.001) == 1
    assert retry_after_seconds(1.0) == 1
    assert retry_after_seconds(1.2) == 2
    assert retry_after_seconds(59.5) == 60


def test_retry_after_of_a_429_lets_the_client_through_when_it_obeys() -> None:
    limiter = RateLimiter(rate=0.5, burst=2)
    limiter.take("203.0.113.9", 0.0)
    limiter.take("203.0.113.9", 0.0)
    wait = limiter.take("203.0.113.9", 0.0)
    assert retry_after_seconds(wait) == 2
    assert limiter.take("203.0.113.9", float(retry_after_seconds(wait))) == 0.0


# --------------------------------------------------------------------------- rate limiter


def test_each_client_has_its_own_bucket() -> None:
    limiter = RateLimiter(rate=1.0, burst=2)
    assert limiter.take("192.0.2.1", 0.0) == 0.0
    assert limiter.take("192.0.2.1", 0.0) == 0.0
    assert limiter.take("192.0.2.1", 0.0) > 0
    assert limiter.take("192.0.2.2", 0.0) == 0.0


def test_memory_stays_bounded_under_a_flood_of_clients() -> None:
    limiter = RateLimiter(rate=1.0, burst=5, max_clients=100)
    for i in range(10_000):
        limiter.take(f"127.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}", 0.0)
        assert len(limiter) <= 100
    assert limiter.evicted_early > 0


def test_idle_clients_whose_bucket_refilled_are_dropped() -> None:
    limiter = RateLimiter(rate=1.0, burst=2, max_clients=1000)
    for i in range(50):
        limiter.take(f"198.51.100.{i}", 0.0)
    # after burst / rate seconds their buckets are full: forgetting them loses nothing
    for i in range(50):
        limiter.take("192.0.2.1", 10.0 + i)
    assert len(limiter) == 1
    assert limiter.evicted_early == 0


def test_a_busy_client_sweeps_the_table_at_most_every_interval_and_never_itself() -> None:
    limiter = RateLimiter(rate=1.0, burst=2, max_clients=1000)
    for i in range(200):
        limiter.take(f"203.0.113.{i}", 0.0)
    busy = "203.0.113.199"  # known, so its requests sweep only on the interval
    sizes = []
    for step in range(10):  # every 0.6 intervals: a sweep (up to 64 refilled clients) every other step
        limiter.take(busy, 10.0 + step * limits._SWEEP_INTERVAL * 0.6)
        sizes.append(len(limiter))
    assert sizes == [136, 136, 72, 72, 8, 8, 1, 1, 1, 1]
    assert limiter.evicted_early == 0


def test_an_active_abuser_keeps_its_empty_bucket_while_others_come_and_go() -> None:
    limiter = RateLimiter(rate=1.0, burst=1, max_clients=3)
    now = 0.0
    for i in range(100):
        now += 0.01
        limiter.take("198.51.100.7", now)  # the abuser: seen on every step, stays recent
        limiter.take(f"203.0.113.{i}", now)
    assert limiter.take("198.51.100.7", now) > 0


# --------------------------------------------------------------------------- retry budget


def test_retries_are_limited_to_a_percentage_of_recent_requests() -> None:
    budget = RetryBudget(percent=20.0, min_per_second=0.0)
    now = 0.0
    for _ in range(100):
        budget.record_request(now)
    granted = sum(budget.try_acquire(now) for _ in range(100))
    assert granted == 20
    assert budget.refused == 80


def test_the_reserve_lets_a_quiet_pool_retry_and_comes_back_as_the_window_slides() -> None:
    budget = RetryBudget(percent=20.0, min_per_second=0.5, window=6.0)  # a reserve of 3 per 6 s
    assert [budget.try_acquire(0.5) for _ in range(4)] == [True, True, True, False]
    assert budget.try_acquire(3.5) is False  # the reserve is per window, not per second
    assert budget.try_acquire(6.5) is True  # the retries of second 0 left the window


def test_the_reserve_adds_to_the_share() -> None:
    budget = RetryBudget(percent=20.0, min_per_second=1.0, window=10.0)  # 20 % + 10
    for _ in range(100):
        budget.record_request(0.0)
    assert sum(budget.try_acquire(0.0) for _ in range(100)) == 20 + 10


@pytest.mark.parametrize(
    ("rate", "failing", "lost_before", "lost_now"),
    [
        # requests/s, share of first tries that fail; % of all requests answered with the failure
        (20, 1 / 3, 13.3, 0.0),
        (50, 1 / 3, 13.3, 0.0),
        (100, 1 / 3, 13.3, 3.3),
        (1000, 1 / 3, 13.3, 12.3),
        (50, 1 / 2, 30.0, 10.0),
        (1000, 1 / 5, 0.0, 0.0),
    ],
)
def test_the_default_budget_in_numbers(rate: int, failing: float, lost_before: float, lost_now: float) -> None:
    """Steady state (the last 30 of 60 s) of one retry wanted by each failing first try: the
    figures in docs/configuration.md. ``lost_before``: the old default (the share, or 3 in
    the current second); ``lost_now``: the share plus a reserve of 10/s."""

    def lost(budget: RetryBudget) -> float:
        every = round(1 / failing)
        refused = counted = 0
        for i in range(rate * 60):
            now = i / rate
            budget.record_request(now)
            wanted = i % every == 0
            granted = budget.try_acquire(now) if wanted else True
            if now >= 30:
                counted += 1
                refused += not granted
        return 100 * refused / counted

    assert lost(RetryBudget(20.0)) == pytest.approx(lost_now, abs=0.1)
    assert lost(OldBudget(20.0, 3.0)) == pytest.approx(lost_before, abs=0.1)


class OldBudget(RetryBudget):
    """The budget before the reserve: the share, or 3 retries in the current second."""

    def try_acquire(self, now: float) -> bool:
        bucket = self._current(now)
        if self.retries < self.requests * self.percent / 100.0 or bucket[2] < self.min_per_second:
            bucket[2] += 1
            self.retries += 1
            return True
        return False


def test_old_requests_leave_the_window() -> None:
    budget = RetryBudget(percent=50.0, min_per_second=0.0, window=10.0)
    for _ in range(100):
        budget.record_request(0.0)
    assert budget.try_acquire(9.5) is True
    assert budget.try_acquire(20.0) is False  # the 100 requests are older than 10 s


def test_sustained_traffic_keeps_retries_at_the_percentage() -> None:
    budget = RetryBudget(percent=10.0, min_per_second=1.0)
    granted = 0
    for i in range(6000):  # 100 requests/s for 60 s, every one wanting a retry
        now = i / 100.0
        budget.record_request(now)
        granted += budget.try_acquire(now)
    # 10 % of 6000, plus at most the floor of 1/s over 60 s
    assert 600 <= granted <= 600 + 60


def test_no_percent_and_no_floor_means_no_retries() -> None:
    budget = RetryBudget(percent=0.0, min_per_second=0.0)
    budget.record_request(0.0)
    assert budget.try_acquire(0.0) is False


def test_bad_budget_is_refused() -> None:
    with pytest.raises(ValueError):
        RetryBudget(percent=120.0)


@given(
    st.floats(0.0, 100.0),
    st.lists(st.tuples(st.booleans(), st.floats(0.0, 0.3)), max_size=400),
)
def test_retries_in_any_window_stay_under_percent_plus_floor(
    percent: float, events: list[tuple[bool, float]]
) -> None:
    floor = 3.0
    budget = RetryBudget(percent=percent, min_per_second=floor, window=10.0)
    now, requests, retries = 0.0, [], []
    for is_request, step in events:
        now += step
        if is_request:
            budget.record_request(now)
            requests.append(now)
        elif budget.try_acquire(now):
            retries.append(now)
    # Over the budget's bucketed window (10 buckets of 1 s), retries are bounded
    # by the percentage of requests in it plus the per-second floor.
    for t in retries:
        bucket = math.floor(t)
        lo = bucket - 9
        in_window = [r for r in retries if lo <= math.floor(r) <= bucket and r <= t]
        reqs = [r for r in requests if lo <= math.floor(r) <= bucket and r <= t]
        assert len(in_window) <= percent / 100 * len(reqs) + floor * 10 + 1
