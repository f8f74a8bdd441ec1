"""Live per-node state of pools and backends, and the immutable snapshot the data plane reads.

State flows one way: a ``Config`` (file today, etcd watch later) becomes a
``Snapshot``; listeners read ``Node.snapshot`` once per connection or request
and never mutate the config. Counters (in-flight, connections, health) live in
``BackendState`` objects that are carried over, by backend id, when a new
snapshot replaces the old one, so a config change drops nothing in flight.
Runs on the Trio thread only: no locks.
"""

from __future__ import annotations

import logging
import random
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import trio

from lbnode.affinity import SharedAffinity, Stickiness
from lbnode.balance import PickContext, Policy, make_policy
from lbnode.health.state import OutlierDetector, slow_start_factor
from lbnode.histogram import Histogram
from lbnode.limits import RetryBudget
from lbnode.model import Backend, Config, Listener, Pool
from lbnode.routing import RouteTable
from lbnode.tls.certs import Certificate, SniTable

log = logging.getLogger("lbnode.pool")

# Slow-start weights are recomputed this often, not on every request.
RAMP_STEP = 0.1

# Admin states an operator sets; health is separate and set by the checkers.
ENABLED, DRAINING, DISABLED = "enabled", "draining", "disabled"


class BackendState:
    """One backend as this node sees it right now."""

    __slots__ = (
        "spec",
        "id",
        "index",
        "health",
        "health_reason",
        "ejected_until",
        "inflight",
        "connections",
        "requests",
        "failures",
        "up_since",
        "upstream_key",
        "responses",
        "response_seconds",
    )

    def __init__(self, spec: Backend, index: int, health: str = "up", reason: str = "") -> None:
        self.spec = spec
        self.id = spec.id  # (its spec never changes: a changed backend is a new BackendState)
        self.upstream_key = str(spec.address)  # its idle connections' key in the UpstreamPool
        self.index = index
        self.health = health  # "up" | "down" | "unknown" (serving until the first check); set by checks
        self.health_reason = reason
        self.up_since: float | None = None  # when it last came up, for slow start
        self.ejected_until = 0.0  # passive outlier ejection, in trio clock seconds
        self.inflight = 0  # L7 requests in flight
        self.connections = 0  # L4 connections open
        self.requests = 0
        self.failures = 0
        # For /metrics: responses relayed, by status // 100 (index 0: none of 1xx..5xx), and
        # the time from picking this backend to the end of its response (connect included).
        self.responses = [0] * 6
        self.response_seconds = Histogram()

    @property
    def admin(self) -> str:
        """Set by operators through the pool spec (enabled, draining, disabled)."""
        return self.spec.admin

    def takes_new(self, now: float) -> bool:
        """May receive a new request or connection (health, admin state, ejection)."""
        return (
            self.admin == ENABLED
            and self.health != "down"
            and self.spec.weight > 0
            and now >= self.ejected_until
        )

    def has_room(self) -> bool:
        spec = self.spec
        if spec.max_inflight is not None and self.inflight >= spec.max_inflight:
            return False
        return spec.max_connections is None or self.connections < spec.max_connections


class PoolStats:
    """A pool's lifetime counters for /metrics; carried over snapshot swaps like the queue."""

    __slots__ = ("retries", "queue_timeouts", "queue_full", "affinity_hits", "affinity_misses")

    def __init__(self) -> None:
        self.retries = 0  # requests sent again to another backend (or again on a fresh connection)
        self.queue_timeouts = 0  # waited queue_timeout for a backend with room, in vain
        self.queue_full = 0  # turned away at once: max_queue requests were waiting already
        self.affinity_hits = 0  # requests (L4: connections) sent to the backend their session is bound to
        self.affinity_misses = 0  # with affinity on, a new session or one whose backend can no longer serve it


class PoolRuntime:
    """A pool's backends, their live state and the balancing policy over them.

    Also owns what must outlive a snapshot swap: passive outlier state, the
    retry budget and the queue of requests waiting for a backend with room
    (all carried over from ``previous``).
    """

    def __init__(
        self,
        spec: Pool,
        previous: PoolRuntime | None = None,
        rng: random.Random | None = None,
        state_dir: Path = Path("state"),
        shared_affinity: SharedAffinity | None = None,
    ) -> None:
        self.spec = spec
        old = {b.id: b for b in previous.backends} if previous is not None else {}
        waits_for_check = spec.health is not None and spec.health.initial_state == "down"
        self.backends: list[BackendState] = []
        for i, b in enumerate(spec.backends):
            state = old.get(b.id)
            if state is None:
                if waits_for_check:
                    state = BackendState(b, i, "down", "no health check passed yet")
                else:
                    state = BackendState(b, i, "unknown" if spec.health else "up")
            else:
                state.spec, state.index = b, i
                state.upstream_key = str(b.address)
            self.backends.append(state)
        if spec.tls is not None:
            # TLS connections idle apart from plain ones to the same address (and from
            # another pool's TLS with other settings).
            for state in self.backends:
                state.upstream_key = f"{state.spec.address} tls {hash(spec.tls):x}"
        # Requests already in flight count for the least-* policies of the new snapshot too.
        self.policy: Policy = make_policy(
            spec, rng or random.Random(), active=[b.inflight + b.connections for b in self.backends]
        )
        self._by_id = {b.id: b for b in self.backends}
        self.retry_on = frozenset(spec.retry_on)  # statuses retried elsewhere (when the method allows)
        self.stickiness: Stickiness | None = None
        if spec.affinity is not None:
            self.stickiness = Stickiness.build(
                spec.affinity,
                state_dir,
                previous.stickiness if previous is not None else None,
                pool=spec.name,
                shared=shared_affinity,
            )
        ids = [b.id for b in spec.backends]
        if previous is not None and previous.outlier is not None and spec.outlier is not None:
            self.outlier: OutlierDetector[str] | None = previous.outlier
            self.outlier.update(ids, spec.outlier)
        else:
            self.outlier = OutlierDetector(spec.outlier, ids) if spec.outlier is not None else None
        if previous is not None and previous.spec.retry_budget_percent == spec.retry_budget_percent:
            self.retry_budget: RetryBudget = previous.retry_budget
        else:
            self.retry_budget = RetryBudget(spec.retry_budget_percent)
        # Requests waiting for a backend below max_inflight/max_connections, oldest first.
        self.waiters: deque[trio.Event] = previous.waiters if previous is not None else deque()
        self.stats: PoolStats = previous.stats if previous is not None else PoolStats()
        # Backends in their slow-start ramp: index -> time they came up.
        self._ramping: dict[int, float] = {}
        self._next_ramp = 0.0
        if spec.slow_start > 0:
            for state in self.backends:
                if state.up_since is not None:
                    self._ramping[state.index] = state.up_since

    # ------------------------------------------------------------------ picking
    def choose(
        self, ctx: PickContext, now: float, exclude: frozenset[int] = frozenset(), *, retry: bool = False
    ) -> BackendState | None:
        """The backend for a request; ``retry`` when it already tried one (see ``Policy.pick``)."""
        backends = self.backends
        if self._ramping and now >= self._next_ramp:
            self._ramp(now)

        def usable(i: int) -> bool:
            b = backends[i]
            return i not in exclude and b.takes_new(now) and b.has_room()

        i = self.policy.pick(ctx, usable, retry=retry)
        return None if i is None else backends[i]

    def sticky(self, backend_id: str | None, now: float) -> BackendState | None:
        """The backend a session is bound to, if it may still serve it.

        A draining backend keeps its sessions (no new ones); a down, disabled,
        ejected or full one loses them to a fresh pick.
        """
        if backend_id is None:
            return None
        b = self._by_id.get(backend_id)
        if b is None or b.admin == DISABLED or b.health == "down" or now < b.ejected_until or b.spec.weight <= 0:
            return None
        return b if b.has_room() else None

    def saturated(self, now: float, exclude: frozenset[int] = frozenset()) -> bool:
        """Some backend could serve, but every such backend is at its limit."""
        return any(b.index not in exclude and b.takes_new(now) for b in self.backends)

    async def wait_for_room(self, deadline: float) -> bool:
        """Queue (FIFO) until a backend frees a slot; False at the deadline or when the queue is full."""
        if len(self.waiters) >= self.spec.max_queue:
            self.stats.queue_full += 1
            return False
        event = trio.Event()
        self.waiters.append(event)
        with trio.move_on_at(deadline):
            await event.wait()
            return True
        try:
            self.waiters.remove(event)
        except ValueError:
            self._wake_one()  # it was woken just as it gave up: pass the slot on
        self.stats.queue_timeouts += 1
        return False

    def _wake_one(self) -> None:
        if self.waiters:
            self.waiters.popleft().set()

    def started(self, backend: BackendState) -> None:
        backend.requests += 1
        if self._current(backend):
            self.policy.on_start(backend.index)

    def finished(self, backend: BackendState, latency: float, now: float) -> None:
        # A backend removed by a newer snapshot is no longer in this policy.
        if self._current(backend):
            self.policy.on_finish(backend.index, latency, now)
        if self.waiters:
            self._wake_one()

    def _current(self, backend: BackendState) -> bool:
        return backend.index < len(self.backends) and self.backends[backend.index] is backend

    # ------------------------------------------------------------------ health
    def report(self, backend: BackendState, failure: str | None, now: float) -> None:
        """Outcome of one attempt for passive checks: None = success, else a failure kind."""
        if failure is None:  # the common case, first
            # Not only for a backend still in this pool's list (as failures are): the detector
            # outlives snapshots and is keyed by backend id, so a success reported through an
            # older snapshot resets the right record, and a removed backend has none.
            outlier = self.outlier
            if outlier is not None:
                outlier.record_success(backend.id, now)
            return
        backend.failures += 1
        if not self._current(backend):
            return
        if self.outlier is None:
            if failure in ("connect_error", "timeout"):
                self._eject_unreachable(backend, now)
            return
        until = self.outlier.record_failure(backend.id, failure, now)
        if until is not None:
            backend.ejected_until = until
            log.warning(
                "pool %s backend %s ejected for %.1fs: %d consecutive failures (last: %s)",
                self.spec.name, backend.id, until - now, self.outlier.outlier.consecutive_failures, failure,
            )

    def _eject_unreachable(self, backend: BackendState, now: float) -> None:
        """Without [pools.outlier], a backend this node cannot connect to is ejected here at once,
        whatever the active checks (or the cluster's verdict) say: for the pool's ``connect_ejection``
        (0: never), and never the last backend still taking requests (then retries and 502s tell
        the truth)."""
        seconds = self.spec.connect_ejection
        if seconds <= 0 or now < backend.ejected_until:
            return
        others = any(b is not backend and b.takes_new(now) for b in self.backends)
        if not others:
            return
        backend.ejected_until = now + seconds
        log.warning("pool %s backend %s ejected on this node for %gs: cannot connect",
                    self.spec.name, backend.id, seconds)

    def health_changed(self, backend_id: str, new: str, reason: str, now: float) -> None:
        """An active check moved a backend up or down."""
        for state in self.backends:
            if state.id != backend_id:
                continue
            state.health, state.health_reason = new, reason
            if new == "up":
                state.up_since = now
                state.ejected_until = 0.0
                if self.outlier is not None:
                    self.outlier.unejected(backend_id, now)
                if self.spec.slow_start > 0:
                    self._ramping[state.index] = now
                    self._ramp(now)
                if self.waiters:
                    self._wake_one()

    def _ramp(self, now: float) -> None:
        self._next_ramp = now + RAMP_STEP
        for i, since in list(self._ramping.items()):
            factor = slow_start_factor(since, now, self.spec.slow_start)
            self.policy.set_weight(i, self.backends[i].spec.weight * factor)
            if factor >= 1.0:
                del self._ramping[i]


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Immutable view of the configuration plus the live pool objects it uses."""

    config: Config
    pools: Mapping[str, PoolRuntime]
    listeners: Mapping[str, Listener]
    version: int = 0
    certificates: Mapping[str, Certificate] = field(default_factory=dict)
    # TLS listeners' SNI choice over the certificates they name that this snapshot has
    # (None: it has none of them; the listener's handshakes fail, counted).
    sni: Mapping[str, SniTable | None] = field(default_factory=dict)
    # Each L7 listener's routes, compiled. A listener whose routes did not change keeps its
    # table; one whose routes changed gets a new one, swapped in with this snapshot (a request
    # reads the snapshot once: it sees the old table or the new one, never half of either).
    routes: Mapping[str, RouteTable] = field(default_factory=dict)

    @classmethod
    def build(
        cls,
        config: Config,
        previous: Snapshot | None = None,
        rng: random.Random | None = None,
        shared_affinity: SharedAffinity | None = None,
    ) -> Snapshot:
        """``shared_affinity``: the cluster's affinity tables and cookie key (None when standalone)."""
        old_pools = previous.pools if previous is not None else {}
        state_dir = Path(config.node.state_dir)
        pools = {
            p.name: PoolRuntime(p, old_pools.get(p.name), rng, state_dir, shared_affinity)
            for p in config.pools
        }
        certificates = {c.name: c for c in config.certificates}
        sni: dict[str, SniTable | None] = {}
        for li in config.listeners:
            if li.tls is not None:
                named = [certificates[n] for n in li.tls.certificates if n in certificates]
                sni[li.name] = SniTable(named) if named else None
        old_routes = previous.routes if previous is not None else {}
        routes: dict[str, RouteTable] = {}
        for li in config.listeners:
            if li.protocol in ("http", "https"):
                table = old_routes.get(li.name)
                routes[li.name] = table if table is not None and table.same(li.routes) else RouteTable(li.routes)
        return cls(
            config=config,
            pools=pools,
            listeners={li.name: li for li in config.listeners},
            version=(previous.version + 1) if previous is not None else 1,
            certificates=certificates,
            sni=sni,
            routes=routes,
        )
