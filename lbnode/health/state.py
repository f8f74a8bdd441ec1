"""Backend health rules: the active-check state machine, passive outlier ejection, slow start.

Owns the decisions "is this backend up?", "eject it, until when?" and "how much
of its weight may it take yet?". Pure: no I/O and no clock reads; every
``now`` is passed in (trio clock seconds in the node), so tests need no sockets.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable
from dataclasses import dataclass
from typing import Final, Generic, Literal, TypeVar

from lbnode.histogram import Histogram
from lbnode.model import HealthCheck, Outlier

HealthName = Literal["unknown", "up", "down"]
# Final: each keeps its literal type, so a HealthName can be set from one.
UNKNOWN: Final = "unknown"
UP: Final = "up"
DOWN: Final = "down"

K = TypeVar("K", bound=Hashable)


@dataclass(frozen=True, slots=True)
class Observation:
    """One check result as this node saw it; what the cluster agent publishes to etcd."""

    backend_id: str
    ok: bool
    reason: str  # "status 200", "connection refused", "timeout after 1.0s while connecting"
    at: float


@dataclass(frozen=True, slots=True)
class Transition:
    """A backend's health changed; ``reason`` is the result that tipped it."""

    old: HealthName
    new: HealthName
    reason: str
    at: float

    def __str__(self) -> str:
        return f"{self.old} -> {self.new}: {self.reason}"


class HealthState:
    """Active-check state of one backend: ``unknown`` until the first result, then up or down.

    - From ``up``, exactly ``fall`` consecutive failed checks make it ``down``.
    - From ``down``, exactly ``rise`` consecutive passed checks make it ``up``.
    - From ``unknown`` (no result yet), the first result decides at once, like
      HAProxy's ``init-state up|down``: a node that just started or a backend
      just added should not wait ``rise`` or ``fall`` intervals to be judged.

    While ``unknown``, ``serving`` follows ``initial_state``: ``"up"`` sends it
    traffic before the first check (the default: a restart of the balancer
    must not black-hole a pool), ``"down"`` keeps it out until a check passes.
    Admin states (draining, disabled) are not health and live elsewhere.
    """

    __slots__ = (
        "rise",
        "fall",
        "initial_state",
        "state",
        "since",
        "successes",
        "failures",
        "last_ok",
        "last_reason",
        "last_at",
        "checks",
        "passed",
        "inconclusive",
        "stalled_in_a_row",
        "durations",
    )

    def __init__(
        self, rise: int = 2, fall: int = 3, initial_state: str = UP, now: float = 0.0
    ) -> None:
        if rise < 1 or fall < 1:
            raise ValueError(f"rise and fall must be >= 1, got rise={rise} fall={fall}")
        if initial_state not in (UP, DOWN):
            raise ValueError(f'initial_state must be "up" or "down", got {initial_state!r}')
        self.rise = rise
        self.fall = fall
        self.initial_state = initial_state
        self.state: HealthName = UNKNOWN
        self.since = now  # when ``state`` was entered; slow start ramps from an up's ``since``
        self.successes = 0  # consecutive passed checks
        self.failures = 0  # consecutive failed checks
        self.last_ok: bool | None = None  # for the status page: last result, reason and time
        self.last_reason = ""
        self.last_at: float | None = None
        self.checks = 0
        self.passed = 0  # of ``checks``, for /metrics (failed = checks - passed)
        # Failed probes not counted because this process was stalled past their timeout (the
        # checker decides; not in ``checks``), and how many of those came in a row.
        self.inconclusive = 0
        self.stalled_in_a_row = 0
        self.durations = Histogram()  # how long each check took (filled by the checker), for /metrics

    @classmethod
    def for_check(cls, check: HealthCheck, now: float = 0.0) -> HealthState:
        return cls(rise=check.rise, fall=check.fall, initial_state=check.initial_state, now=now)

    @property
    def serving(self) -> bool:
        """Whether active checks allow traffic now (``unknown`` resolved by ``initial_state``)."""
        if self.state == UNKNOWN:
            return self.initial_state == UP
        return self.state == UP

    def observe(self, ok: bool, reason: str, now: float) -> Transition | None:
        """Feed one check result; returns the transition it caused, if any."""
        self.checks += 1
        self.last_ok, self.last_reason, self.last_at = ok, reason, now
        if ok:
            self.passed += 1
            self.successes += 1
            self.failures = 0
        else:
            self.failures += 1
            self.successes = 0
        new: HealthName
        if self.state == UNKNOWN:
            new = UP if ok else DOWN
        elif self.state == UP and self.failures >= self.fall:
            new = DOWN
        elif self.state == DOWN and self.successes >= self.rise:
            new = UP
        else:
            return None
        return self._enter(new, reason, now)

    def _enter(self, new: HealthName, reason: str, now: float) -> Transition:
        transition = Transition(self.state, new, reason, now)
        self.state, self.since = new, now
        return transition


# --------------------------------------------------------------------------- outlier detection

CONNECT_ERROR, RESET, TIMEOUT, HTTP_5XX = "connect_error", "reset", "timeout", "http_5xx"
FAILURE_KINDS = (CONNECT_ERROR, RESET, TIMEOUT, HTTP_5XX)

# Envoy's default cap on one ejection: repeated ejections grow linearly, not forever.
MAX_EJECTION_TIME = 300.0


class _OutlierRecord:
    __slots__ = ("failures", "ejected_until", "multiplier", "ejections")

    def __init__(self) -> None:
        self.failures = 0  # consecutive failures since the last success or ejection
        self.ejected_until = 0.0  # end of the last ejection, also once it is over
        self.multiplier = 0  # ejections that still lengthen the next one (decays while healthy)
        self.ejections = 0  # lifetime count, for metrics and the status page


class OutlierDetector(Generic[K]):
    """Passive health of one pool's backends, from the outcome of real traffic (Envoy-like).

    After ``consecutive_failures`` failures in a row (connect errors, resets,
    timeouts; 5xx responses only with ``eject_on_5xx``) a backend is ejected
    for ``base_ejection_time`` x its ejection count, capped at
    ``max(MAX_EJECTION_TIME, base_ejection_time)``; the count decays by one for
    every ``base_ejection_time`` the backend then stays un-ejected, so an old
    incident does not lengthen today's ejection.

    ``max_ejection_percent`` follows Envoy: a backend may be ejected while the
    share already ejected is below the percentage, so any percent above 0
    allows at least one ejection, even in a pool of one (a pool whose only
    backend refuses connections gets nothing from it anyway). 0 disables
    ejection. A 5xx without ``eject_on_5xx`` counts as a success: the backend
    answered. Failures reported while a backend is ejected (requests that were
    already in flight) are ignored.

    Keys are whatever identifies a backend to the caller; use backend ids,
    which survive a snapshot swap, and call ``update`` when the pool changes.
    """

    def __init__(self, outlier: Outlier, backends: Iterable[K] = ()) -> None:
        self.outlier = outlier
        self._records: dict[K, _OutlierRecord] = {k: _OutlierRecord() for k in backends}

    def update(self, backends: Iterable[K], outlier: Outlier | None = None) -> None:
        """Follow a pool change: keep the state of backends that stay, forget the others."""
        if outlier is not None:
            self.outlier = outlier
        old = self._records
        self._records = {k: old.get(k) or _OutlierRecord() for k in backends}

    def record_success(self, key: K, now: float) -> None:
        record = self._records.get(key)
        if record is not None:
            record.failures = 0

    def record_failure(self, key: K, kind: str, now: float) -> float | None:
        """Count one failed request; returns the ejected-until time if this failure ejected it."""
        if kind not in FAILURE_KINDS:
            raise ValueError(
                f"unknown failure kind {kind!r}; expected one of {', '.join(FAILURE_KINDS)}"
            )
        record = self._records.get(key)
        if record is None:  # removed from the pool by a newer snapshot
            return None
        if kind == HTTP_5XX and not self.outlier.eject_on_5xx:
            record.failures = 0
            return None
        if now < record.ejected_until:
            return None
        record.failures += 1
        # Re-tried on every further failure: an ejection refused by the
        # percentage cap happens as soon as another backend comes back.
        if record.failures < self.outlier.consecutive_failures or not self._may_eject(now):
            return None
        return self._eject(record, now)

    def failures(self, key: K) -> int:
        """The backend's current run: failures since its last success or ejection."""
        record = self._records.get(key)
        return 0 if record is None else record.failures

    def record_run(self, key: K, failures: int, now: float) -> float | None:
        """``failures`` in a row seen elsewhere (a node's workers' runs added up): ejected, as
        ``record_failure`` would, if they reach ``consecutive_failures``; returns the
        ejected-until time if this ejected it."""
        record = self._records.get(key)
        if record is None or now < record.ejected_until:
            return None
        record.failures = failures
        if failures < self.outlier.consecutive_failures or not self._may_eject(now):
            return None
        return self._eject(record, now)

    def adopt_ejection(self, key: K, until: float, now: float) -> bool:
        """An ejection decided elsewhere (another worker of this node, or the supervisor's sum):
        counted here as if decided here, so the next ejection grows the same on every worker;
        False if this detector already had the backend ejected (nothing changes)."""
        record = self._records.get(key)
        if record is None or now < record.ejected_until or until <= now:
            return False
        base = self.outlier.base_ejection_time
        if record.ejections and base > 0:
            record.multiplier = max(0, record.multiplier - int((now - record.ejected_until) // base))
        record.multiplier += 1
        record.ejections += 1
        record.failures = 0
        record.ejected_until = until
        return True

    def unejected(self, key: K, now: float) -> None:
        """End an ejection early (an active check passed); the caller clears ``ejected_until``."""
        record = self._records.get(key)
        if record is not None and now < record.ejected_until:
            record.ejected_until = now

    def is_ejected(self, key: K, now: float) -> bool:
        record = self._records.get(key)
        return record is not None and now < record.ejected_until

    def ejected_until(self, key: K) -> float:
        record = self._records.get(key)
        return 0.0 if record is None else record.ejected_until

    def ejections(self, key: K) -> int:
        """How many times this backend was ejected (lifetime counter)."""
        record = self._records.get(key)
        return 0 if record is None else record.ejections

    def ejected_count(self, now: float) -> int:
        return sum(1 for r in self._records.values() if now < r.ejected_until)

    def _may_eject(self, now: float) -> bool:
        percent = self.outlier.max_ejection_percent
        if percent <= 0 or not self._records:
            return False
        return 100.0 * self.ejected_count(now) / len(self._records) < percent

    def _eject(self, record: _OutlierRecord, now: float) -> float:
        base = self.outlier.base_ejection_time
        if record.ejections and base > 0:
            healthy_for = now - record.ejected_until
            record.multiplier = max(0, record.multiplier - int(healthy_for // base))
        record.multiplier += 1
        record.ejections += 1
        record.failures = 0
        duration = min(base * record.multiplier, max(MAX_EJECTION_TIME, base))
        record.ejected_until = now + duration
        return record.ejected_until


# --------------------------------------------------------------------------- slow start

# Share of its weight a backend gets the moment it comes up: enough for its
# first requests to warm caches and prove it, small enough not to swamp it
# (Envoy's slow start min_weight_percent default is 10%).
SLOW_START_FLOOR = 0.1


def slow_start_factor(up_since: float, now: float, window: float) -> float:
    """Weight multiplier in (0, 1] for a backend up since ``up_since``: a linear ramp over ``window``."""
    if window <= 0:
        return 1.0
    elapsed = now - up_since
    if elapsed >= window:
        return 1.0
    return max(SLOW_START_FLOOR, elapsed / window)
