"""Live per-node state of pools and backends, and the immutable snapshot the data plane reads.

State flows one way: a ``Config`` (file today, etcd watch later) becomes a
``Snapshot``; listeners read ``Node.snapshot`` once per connection or request
and never mutate the config. Counters (in-flight, connections, health) live in
``BackendState`` objects that are carried over, by backend id, when a new
snapshot replaces the old one, so a config change drops nothing in flight.
Runs on the Trio thread only: no locks.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass

from lbnode.balance import PickContext, Policy, make_policy
from lbnode.model import Backend, Config, Listener, Pool

# Admin states an operator sets; health is separate and set by the checkers.
ENABLED, DRAINING, DISABLED = "enabled", "draining", "disabled"


class BackendState:
    """One backend as this node sees it right now."""

    __slots__ = (
        "spec",
        "index",
        "admin",
        "health",
        "health_reason",
        "ejected_until",
        "inflight",
        "connections",
        "requests",
        "failures",
    )

    def __init__(self, spec: Backend, index: int) -> None:
        self.spec = spec
        self.index = index
        self.admin = ENABLED
        self.health = "up"  # "up" | "down" | "unknown"; set by health checks
        self.health_reason = ""
        self.ejected_until = 0.0  # passive outlier ejection, in trio clock seconds
        self.inflight = 0  # L7 requests in flight
        self.connections = 0  # L4 connections open
        self.requests = 0
        self.failures = 0

    @property
    def id(self) -> str:
        return self.spec.id

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


class PoolRuntime:
    """A pool's backends, their live state and the balancing policy over them."""

    def __init__(self, spec: Pool, previous: PoolRuntime | None = None, rng: random.Random | None = None) -> None:
        self.spec = spec
        old = {b.id: b for b in previous.backends} if previous is not None else {}
        self.backends: list[BackendState] = []
        for i, b in enumerate(spec.backends):
            state = old.get(b.id)
            if state is None:
                state = BackendState(b, i)
            else:
                state.spec, state.index = b, i
            self.backends.append(state)
        self.policy: Policy = make_policy(spec, rng or random.Random())

    def choose(self, ctx: PickContext, now: float, exclude: frozenset[int] = frozenset()) -> BackendState | None:
        backends = self.backends

        def usable(i: int) -> bool:
            b = backends[i]
            return i not in exclude and b.takes_new(now) and b.has_room()

        i = self.policy.pick(ctx, usable)
        return None if i is None else backends[i]

    def started(self, backend: BackendState) -> None:
        backend.requests += 1
        if backend.index < len(self.backends) and self.backends[backend.index] is backend:
            self.policy.on_start(backend.index)

    def finished(self, backend: BackendState, latency: float, now: float) -> None:
        # A backend removed by a newer snapshot is no longer in this policy.
        if backend.index < len(self.backends) and self.backends[backend.index] is backend:
            self.policy.on_finish(backend.index, latency, now)


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Immutable view of the configuration plus the live pool objects it uses."""

    config: Config
    pools: Mapping[str, PoolRuntime]
    listeners: Mapping[str, Listener]
    version: int = 0

    @classmethod
    def build(cls, config: Config, previous: Snapshot | None = None, rng: random.Random | None = None) -> Snapshot:
        old_pools = previous.pools if previous is not None else {}
        pools = {p.name: PoolRuntime(p, old_pools.get(p.name), rng) for p in config.pools}
        return cls(
            config=config,
            pools=pools,
            listeners={li.name: li for li in config.listeners},
            version=(previous.version + 1) if previous is not None else 1,
        )
