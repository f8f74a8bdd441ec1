"""Active-check state machine and slow start: pure, time passed in."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lbnode.health.state import (
    SLOW_START_FLOOR,
    HealthState,
    Observation,
    Transition,
    slow_start_factor,
)
from lbnode.model import HealthCheck


def settle(state: HealthState, ok: bool, now: float = 0.0) -> None:
    """Bring a fresh state out of ``unknown``."""
    assert state.observe(ok, "first", now) is not None


def test_unknown_until_the_first_result_and_serving_follows_initial_state() -> None:
    assert HealthState(initial_state="up").state == "unknown"
    assert HealthState(initial_state="up").serving is True
    assert HealthState(initial_state="down").serving is False


@pytest.mark.parametrize("initial_state", ["up", "down"])
def test_first_result_decides_at_once(initial_state: str) -> None:
    failing = HealthState(rise=5, fall=5, initial_state=initial_state)
    t = failing.observe(False, "connection refused", 1.0)
    assert t == Transition("unknown", "down", "connection refused", 1.0)
    assert not failing.serving

    passing = HealthState(rise=5, fall=5, initial_state=initial_state)
    t = passing.observe(True, "status 200", 2.0)
    assert t == Transition("unknown", "up", "status 200", 2.0)
    assert passing.serving and passing.since == 2.0


@pytest.mark.parametrize("fall", [1, 2, 3, 7])
def test_up_goes_down_after_exactly_fall_consecutive_failures(fall: int) -> None:
    state = HealthState(rise=2, fall=fall)
    settle(state, True)
    for i in range(fall - 1):
        assert state.observe(False, "status 500", 1.0 + i) is None
        assert state.state == "up"
    t = state.observe(False, "status 503", 10.0)
    assert t == Transition("up", "down", "status 503", 10.0)
    assert state.state == "down" and state.since == 10.0


@pytest.mark.parametrize("rise", [1, 2, 5])
def test_down_comes_up_after_exactly_rise_consecutive_passes(rise: int) -> None:
    state = HealthState(rise=rise, fall=3)
    settle(state, False)
    for _ in range(rise - 1):
        assert state.observe(True, "status 200", 1.0) is None
        assert state.state == "down"
    t = state.observe(True, "status 204", 5.0)
    assert t is not None and (t.old, t.new, t.reason) == ("down", "up", "status 204")


def test_a_pass_in_between_resets_the_failure_count() -> None:
    state = HealthState(rise=2, fall=3)
    settle(state, True)
    for _ in range(5):
        assert state.observe(False, "timeout after 1.0s", 1.0) is None
        assert state.observe(False, "timeout after 1.0s", 2.0) is None
        assert state.observe(True, "status 200", 3.0) is None
    assert state.state == "up"


def test_a_failure_in_between_resets_the_rise_count() -> None:
    state = HealthState(rise=3, fall=1)
    settle(state, False)
    for _ in range(5):
        state.observe(True, "status 200", 1.0)
        state.observe(True, "status 200", 1.0)
        state.observe(False, "status 500", 1.0)
    assert state.state == "down"


def test_last_result_is_kept_for_the_status_page() -> None:
    state = HealthState()
    assert state.last_ok is None and state.last_at is None
    state.observe(True, "status 200", 3.0)
    state.observe(False, "connection refused", 4.5)
    assert (state.last_ok, state.last_reason, state.last_at, state.checks) == (
        False,
        "connection refused",
        4.5,
        2,
    )


def test_for_check_takes_thresholds_from_the_config() -> None:
    state = HealthState.for_check(HealthCheck(rise=4, fall=6, initial_state="down"), now=7.0)
    assert (state.rise, state.fall, state.initial_state, state.since) == (4, 6, "down", 7.0)


def test_bad_thresholds_are_refused() -> None:
    with pytest.raises(ValueError):
        HealthState(rise=0)
    with pytest.raises(ValueError):
        HealthState(initial_state="unknown")


def test_transition_reads_like_the_log_line() -> None:
    assert str(Transition("up", "down", "status 500", 1.0)) == "up -> down: status 500"


def test_observation_is_a_small_frozen_record() -> None:
    obs = Observation("web1", False, "connection refused", 12.5)
    with pytest.raises(AttributeError):
        obs.ok = True  # type: ignore[misc]
    assert obs == Observation("web1", False, "connection refused", 12.5)


@given(st.lists(st.booleans(), max_size=60), st.integers(1, 5), st.integers(1, 5))
def test_state_only_changes_after_rise_or_fall_identical_results(
    results: list[bool], rise: int, fall: int
) -> None:
    state = HealthState(rise=rise, fall=fall)
    for i, ok in enumerate(results):
        before = state.state
        t = state.observe(ok, "r", float(i))
        if t is None:
            assert state.state == before
            continue
        assert t.new == ("up" if ok else "down")
        if before != "unknown":
            needed = rise if ok else fall
            assert results[i + 1 - needed : i + 1] == [ok] * needed


# --------------------------------------------------------------------------- slow start


def test_slow_start_is_off_with_no_window() -> None:
    assert slow_start_factor(up_since=100.0, now=100.0, window=0.0) == 1.0


def test_slow_start_ramps_linearly_from_a_floor_to_full_weight() -> None:
    assert slow_start_factor(10.0, 10.0, 30.0) == SLOW_START_FLOOR
    assert slow_start_factor(10.0, 25.0, 30.0) == pytest.approx(0.5)
    assert slow_start_factor(10.0, 40.0, 30.0) == 1.0
    assert slow_start_factor(10.0, 1000.0, 30.0) == 1.0


def test_slow_start_never_starves_a_new_backend_even_if_the_clock_steps_back() -> None:
    assert slow_start_factor(10.0, 5.0, 30.0) == SLOW_START_FLOOR


@given(
    st.floats(0, 1e6),
    st.floats(0.001, 1e4),
    st.lists(st.floats(0, 2e4), min_size=2, max_size=20),
)
def test_slow_start_is_monotone_and_in_range(
    up_since: float, window: float, offsets: list[float]
) -> None:
    factors = [slow_start_factor(up_since, up_since + dt, window) for dt in sorted(offsets)]
    assert all(0 < f <= 1 for f in factors)
    assert factors == sorted(factors)
