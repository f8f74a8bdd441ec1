"""lbctl top's arithmetic: rates from two samples, counter resets, sums over nodes with each
node's share, quantiles from histogram differences (as Prometheus' histogram_quantile)."""

from __future__ import annotations

import pytest

from lbctl.top import (
    BackendCounters,
    NodeSample,
    Sample,
    increase,
    quantile,
    render,
    snapshot_dict,
    view,
)

BOUNDS = (0.001, 0.01, 0.1, 1.0)


def counters(requests: int, failures: int = 0, counts: tuple[int, ...] = (0, 0, 0, 0, 0), health: str = "up",
             fivexx: int = 0) -> BackendCounters:
    return BackendCounters(address="192.0.2.1:80", health=health, admin="enabled", inflight=1, connections=0,
                           requests=requests, failures=failures, responses={"2xx": requests - fivexx, "5xx": fivexx},
                           bounds=BOUNDS, counts=counts)


def node(name: str, at: float, backend: BackendCounters, retries: int = 0) -> NodeSample:
    return NodeSample(name, at, {("web", "a"): backend}, {"web": (2, retries)})


def test_quantile_interpolates_inside_the_bucket_like_histogram_quantile() -> None:
    # 10 observations, all in (0.01, 0.1]: the median is half-way through that bucket
    assert quantile(0.5, BOUNDS, [0, 0, 10, 10, 10]) == pytest.approx(0.055)
    # first bucket starts at 0
    assert quantile(0.5, BOUNDS, [4, 4, 4, 4, 4]) == pytest.approx(0.0005)
    # 99 fast and 1 slow: p99 still in the fast bucket, p100 in the slow one
    assert quantile(0.99, BOUNDS, [99, 99, 99, 100, 100]) == pytest.approx(0.001)
    assert quantile(1.0, BOUNDS, [99, 99, 99, 100, 100]) == pytest.approx(1.0)
    # above the last bound: that bound (Prometheus answers the same); nothing observed: no answer
    assert quantile(0.5, BOUNDS, [0, 0, 0, 0, 3]) == 1.0
    assert quantile(0.5, BOUNDS, [0, 0, 0, 0, 0]) is None


def test_a_counter_that_went_down_restarted() -> None:
    assert increase(10, 15) == 5
    assert increase(10, 3) == 3  # the node restarted: all 3 are new


def test_rates_are_differences_over_the_time_between_samples_summed_over_the_nodes() -> None:
    prev = Sample(0.0, {"n1": node("n1", 10.0, counters(100, 1, (0, 50, 100, 100, 100)), retries=5),
                        "n2": node("n2", 10.0, counters(40))})
    cur = Sample(2.0, {"n1": node("n1", 12.0, counters(120, 3, (0, 60, 120, 120, 120), fivexx=2), retries=9),
                       "n2": node("n2", 12.0, counters(50, counts=(10, 10, 10, 10, 10)))})
    (pool,) = view(cur, prev)
    (row,) = pool.backends
    assert row.nodes["n1"].requests_per_s == 10.0 and row.nodes["n2"].requests_per_s == 5.0
    assert row.total.requests_per_s == 15.0 and row.total.requests == 170
    assert row.total.failures_per_s == 1.0 and row.total.error_ratio() == pytest.approx(1 / 15)
    # n1's 20 new observations in (0.001, 0.01] and (0.01, 0.1], n2's 10 in the first bucket:
    # the merged difference is [10, 20, 30, 30, 30]
    assert row.total.bucket_increase == [10, 20, 30, 30, 30]
    # the 15th of 30 is the 5th of the 10 in (0.001, 0.01]: half-way through it
    assert row.total.latency(0.5) == pytest.approx(0.0055)
    assert pool.queue_length == 4 and pool.retries == 9 and pool.retries_per_s == 2.0
    assert row.total.responses_per_s["5xx"] == 1.0


def test_first_sample_has_no_rates_and_a_new_node_adds_counts_but_no_rate() -> None:
    first = Sample(0.0, {"n1": node("n1", 1.0, counters(7))})
    (pool,) = view(first, None)
    assert pool.backends[0].total.requests_per_s is None and pool.backends[0].total.requests == 7
    later = Sample(1.0, {"n1": node("n1", 2.0, counters(9)), "n2": node("n2", 2.0, counters(4, health="down"))})
    (pool,) = view(later, first)
    total = pool.backends[0].total
    assert total.requests == 13 and total.requests_per_s == 2.0  # n2 has no earlier sample to compare
    assert total.health == {"up": 1, "down": 1}


def test_a_histogram_reset_counts_the_whole_new_histogram() -> None:
    prev = Sample(0.0, {"n1": node("n1", 0.0, counters(100, counts=(100, 100, 100, 100, 100)))})
    cur = Sample(1.0, {"n1": node("n1", 1.0, counters(3, counts=(0, 3, 3, 3, 3)))})
    (pool,) = view(cur, prev)
    assert pool.backends[0].total.requests_per_s == 3.0
    assert pool.backends[0].total.bucket_increase == [0, 3, 3, 3, 3]


def test_render_is_plain_text_with_a_pool_line_and_backend_lines() -> None:
    prev = Sample(0.0, {"n1": node("n1", 0.0, counters(10))})
    cur = Sample(1.5, {"n1": node("n1", 2.0, counters(30, counts=(20, 20, 20, 20, 20)))},
                 {"n2": "192.0.2.2:7443: UNAVAILABLE: connection refused"})
    lines = render(cur, prev)
    assert lines[0].startswith("lbctl top  1970-01-01T00:00:01.500Z  1 node (n1), summed; rates over the last 2.00s")
    assert lines[1] == "  n2: not answering: 192.0.2.2:7443: UNAVAILABLE: connection refused"
    assert lines[2].split()[:4] == ["POOL", "BACKEND", "HEALTH", "REQ/S"]
    assert lines[3].split() == ["web", "*", "up", "10.0", "0.0", "0.0%", "0.5ms", "1.0ms", "1", "0", "2", "0.0", "30"]
    assert lines[4].split() == ["a", "up", "10.0", "0.0", "0.0%", "0.5ms", "1.0ms", "1", "0", "30"]
    assert not any("\x1b" in line for line in lines)
    assert render(prev, None)[0].endswith("rates from the next refresh")


def test_json_snapshot_has_the_sum_and_each_nodes_share() -> None:
    prev = Sample(0.0, {"n1": node("n1", 0.0, counters(10)), "n2": node("n2", 0.0, counters(1))})
    cur = Sample(1.0, {"n1": node("n1", 1.0, counters(14)), "n2": node("n2", 1.0, counters(2))})
    snap = snapshot_dict(cur, prev)
    assert snap["nodes"] == ["n1", "n2"] and snap["interval_seconds"] == 1.0
    (backend,) = snap["pools"][0]["backends"]
    assert backend["requests"] == 16 and backend["requests_per_s"] == 5.0
    assert {n: t["requests_per_s"] for n, t in backend["nodes"].items()} == {"n1": 4.0, "n2": 1.0}
    assert backend["p50_seconds"] is None  # nothing observed in the interval
