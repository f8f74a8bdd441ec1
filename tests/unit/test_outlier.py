"""Passive outlier ejection: pure, time passed in."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lbnode.health.state import MAX_EJECTION_TIME, OutlierDetector
from lbnode.model import Outlier

BACKENDS = ["a", "b", "c", "d"]


def detector(**kw: object) -> OutlierDetector[str]:
    settings = {"consecutive_failures": 3, "base_ejection_time": 30.0, "max_ejection_percent": 50}
    settings.update(kw)
    return OutlierDetector(Outlier(**settings), BACKENDS)  # type: ignore[arg-type]


def fail(
    d: OutlierDetector[str], key: str, times: int, now: float, kind: str = "connect_error"
) -> float | None:
    result = None
    for _ in range(times):
        result = d.record_failure(key, kind, now)
    return result


@pytest.mark.parametrize("kind", ["connect_error", "reset", "timeout"])
def test_ejected_after_exactly_consecutive_failures(kind: str) -> None:
    d = detector()
    assert fail(d, "a", 2, 10.0, kind) is None
    assert not d.is_ejected("a", 10.0)
    assert d.record_failure("a", kind, 10.0) == 40.0
    assert d.is_ejected("a", 39.9) and d.ejected_until("a") == 40.0
    assert d.ejections("a") == 1


def test_a_success_resets_the_count() -> None:
    d = detector()
    for _ in range(10):
        fail(d, "a", 2, 1.0)
        d.record_success("a", 1.0)
    assert d.ejections("a") == 0


def test_5xx_counts_only_with_eject_on_5xx() -> None:
    off = detector()
    assert fail(off, "a", 10, 1.0, "http_5xx") is None
    # a 5xx shows the backend answered: it breaks a run of connect errors
    fail(off, "a", 2, 1.0)
    off.record_failure("a", "http_5xx", 1.0)
    assert fail(off, "a", 2, 1.0) is None

    on = detector(eject_on_5xx=True)
    assert fail(on, "a", 3, 1.0, "http_5xx") == 31.0


def test_unknown_failure_kind_is_a_bug() -> None:
    with pytest.raises(ValueError, match="unknown failure kind"):
        detector().record_failure("a", "oops", 1.0)


def test_ejection_time_grows_with_each_ejection() -> None:
    d = detector()
    assert fail(d, "a", 3, 0.0) == 30.0
    assert fail(d, "a", 3, 30.0) == 30.0 + 60.0  # fails again right after coming back
    assert fail(d, "a", 3, 90.0) == 90.0 + 90.0
    assert d.ejections("a") == 3


def test_ejection_time_is_capped() -> None:
    d = detector(base_ejection_time=100.0)
    now, durations = 0.0, []
    for _ in range(5):
        until = fail(d, "a", 3, now)  # fails again as soon as it comes back
        assert until is not None
        durations.append(until - now)
        now = until
    assert durations == [100.0, 200.0, MAX_EJECTION_TIME, MAX_EJECTION_TIME, MAX_EJECTION_TIME]


def test_the_multiplier_decays_while_the_backend_stays_healthy() -> None:
    d = detector()
    fail(d, "a", 3, 0.0)  # ejected until 30
    fail(d, "a", 3, 30.0)  # ejected until 90 (x2)
    # healthy from 90 to 150: two base periods, so the next ejection is x1 again
    assert fail(d, "a", 3, 150.0) == 180.0


def test_ejection_expires() -> None:
    d = detector()
    fail(d, "a", 3, 0.0)
    assert d.is_ejected("a", 29.999)
    assert not d.is_ejected("a", 30.0)
    assert d.ejected_count(30.0) == 0


def test_unejected_ends_an_ejection_early() -> None:
    d = detector()
    fail(d, "a", 3, 0.0)
    d.unejected("a", 5.0)
    assert not d.is_ejected("a", 5.0)
    assert d.ejected_until("a") == 5.0
    assert d.ejections("a") == 1


def test_failures_while_ejected_are_ignored() -> None:
    d = detector()
    fail(d, "a", 3, 0.0)
    assert fail(d, "a", 10, 1.0) is None  # in-flight requests failing after the ejection
    assert d.ejections("a") == 1
    assert d.ejected_until("a") == 30.0


def test_max_ejection_percent_is_respected() -> None:
    d = detector(max_ejection_percent=50)  # 4 backends: 2 at most
    assert fail(d, "a", 3, 0.0) is not None
    assert fail(d, "b", 3, 0.0) is not None
    assert fail(d, "c", 3, 0.0) is None
    assert d.ejected_count(0.0) == 2
    # once a comes back, the next failure of c ejects it
    d.unejected("a", 1.0)
    assert d.record_failure("c", "reset", 1.0) is not None
    assert d.ejected_count(1.0) == 2


def test_a_small_percent_still_allows_one_ejection_like_envoy() -> None:
    d = detector(max_ejection_percent=10)
    assert fail(d, "a", 3, 0.0) is not None
    assert fail(d, "b", 3, 0.0) is None


def test_zero_percent_disables_ejection() -> None:
    d = detector(max_ejection_percent=0)
    assert fail(d, "a", 100, 0.0) is None


def test_update_keeps_state_of_backends_that_stay() -> None:
    d = detector()
    fail(d, "a", 3, 0.0)
    fail(d, "b", 2, 0.0)
    d.update(["a", "b", "e"])
    assert d.is_ejected("a", 1.0) and d.ejections("a") == 1
    assert d.record_failure("b", "reset", 1.0) is not None  # its 2 earlier failures still count
    assert d.record_failure("gone", "reset", 1.0) is None
    d.record_success("gone", 1.0)
    assert d.ejections("gone") == 0


@given(
    st.lists(
        st.tuples(
            st.sampled_from(BACKENDS), st.sampled_from(["fail", "ok", "uneject"]), st.floats(0, 5)
        ),
        max_size=200,
    ),
    st.integers(1, 100),
)
def test_never_more_ejected_than_the_percentage_allows(
    events: list[tuple[str, str, float]], percent: int
) -> None:
    d = detector(consecutive_failures=2, max_ejection_percent=percent, base_ejection_time=3.0)
    # Envoy's rule: eject while the ejected share is below the percent, so at
    # most ceil(n * percent / 100) backends (at least one) are out at once.
    limit = max(1, -(-len(BACKENDS) * percent // 100))
    now = 0.0
    for key, event, step in events:
        now += step
        if event == "fail":
            d.record_failure(key, "timeout", now)
        elif event == "ok":
            d.record_success(key, now)
        else:
            d.unejected(key, now)
        assert d.ejected_count(now) <= limit


def test_runs_added_up_elsewhere_eject_at_the_threshold() -> None:
    """The supervisor of several workers: their runs added up, as one node's."""
    d = detector()
    assert d.record_run("a", 2, 10.0) is None and not d.is_ejected("a", 10.0)
    assert d.record_run("a", 3, 10.0) == 40.0
    assert d.ejections("a") == 1 and d.failures("a") == 0
    assert d.record_run("a", 5, 11.0) is None  # ejected already: nothing more
    assert d.ejections("a") == 1


def test_runs_respect_the_ejection_percent() -> None:
    d = detector(max_ejection_percent=25)  # one backend of four
    assert d.record_run("a", 3, 10.0) == 40.0
    assert d.record_run("b", 3, 10.0) is None
    assert not d.is_ejected("b", 10.0)


def test_an_adopted_ejection_counts_like_one_decided_here() -> None:
    """A worker told of an ejection another worker (or the sum) decided: its own count resets,
    late failures are ignored, and the next ejection it decides is twice as long."""
    d = detector()
    fail(d, "a", 2, 10.0)
    assert d.failures("a") == 2
    assert d.adopt_ejection("a", 40.0, 10.0)
    assert d.is_ejected("a", 39.0) and d.failures("a") == 0 and d.ejections("a") == 1
    assert fail(d, "a", 3, 20.0) is None  # in flight while ejected: ignored
    assert not d.adopt_ejection("a", 45.0, 20.0)  # ejected here already
    assert fail(d, "a", 3, 41.0) == 41.0 + 60.0  # the second ejection: 2 x base
    assert d.ejections("a") == 2
