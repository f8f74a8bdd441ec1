import pytest

from lbnode.logthrottle import LogThrottle


def test_a_burst_per_window_then_lines_are_counted_and_reported_by_the_next_one() -> None:
    t = LogThrottle(window=10.0, burst=3)
    assert [t.admit(408, 0.0 + i * 0.01) for i in range(3)] == [0, 0, 0]
    assert [t.admit(408, 1.0) for _ in range(1000)] == [None] * 1000  # the flood: counted, not logged
    assert t.admit(408, 10.0) == 1000  # a new window: the first line tells how many were left out
    assert t.admit(408, 10.5) == 0


def test_kinds_are_throttled_apart() -> None:
    t = LogThrottle(window=10.0, burst=1)
    assert t.admit(("web", 429), 0.0) == 0
    assert t.admit(("web", 429), 0.1) is None
    assert t.admit(("web", 408), 0.1) == 0  # another kind still gets its line
    assert t.admit(("api", 429), 0.1) == 0


def test_at_most_burst_lines_over_any_window() -> None:
    t = LogThrottle(window=2.0, burst=5)
    logged = [i * 0.01 for i in range(10_000) if t.admit("k", i * 0.01) is not None]
    for i, at in enumerate(logged):
        later = [x for x in logged[i:] if x < at + 2.0]
        assert len(later) <= 2 * 5  # two windows can straddle an interval of one window's length
    assert len(logged) == 5 * 50  # 100 s of a steady flood: 5 lines per 2 s window


def test_a_clock_that_steps_back_starts_a_new_window_instead_of_silencing_the_kind() -> None:
    t = LogThrottle(window=10.0, burst=1)
    assert t.admit("k", 100.0) == 0
    assert t.admit("k", 100.5) is None
    assert t.admit("k", 50.0) == 1


@pytest.mark.parametrize(("window", "burst"), [(0.0, 1), (1.0, 0)])
def test_bad_settings_are_refused(window: float, burst: int) -> None:
    with pytest.raises(ValueError):
        LogThrottle(window, burst)
