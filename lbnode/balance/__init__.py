"""Balancing policies: given the backends of a pool, which one serves next.

Owns the policy interface and ``make_policy``; each algorithm family lives in
its own module. Pure: no I/O, no clock, no global state. Time comes in as
``now`` arguments, randomness as an injected ``random.Random``. Health,
draining and limits stay outside the policy: the caller passes ``usable(i)``
and the policy only picks among the backends for which it is true.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from lbnode.balance.least_connections import LeastConnections
from lbnode.balance.maglev import ConsistentHash, MaglevTable, SourceHash
from lbnode.balance.power_of_two import LeastLatency, LeastLoaded
from lbnode.balance.round_robin import RoundRobin, WeightedRoundRobin
from lbnode.balance.weighted_random import WeightedRandom
from lbnode.model import Pool

Usable = Callable[[int], bool]

__all__ = [
    "ConsistentHash",
    "LeastConnections",
    "LeastLatency",
    "LeastLoaded",
    "MaglevTable",
    "PickContext",
    "Policy",
    "RoundRobin",
    "SourceHash",
    "Usable",
    "WeightedRandom",
    "WeightedRoundRobin",
    "make_policy",
]


@dataclass(frozen=True, slots=True)
class PickContext:
    """What a policy may know of the request being balanced."""

    client_ip: str = ""
    hash_key: bytes | None = None  # the pool's hash_key value, extracted by the caller


class Policy(Protocol):
    """The operations every algorithm family implements (HAProxy's lb_* shape).

    Weights: a backend whose effective weight is 0 is never picked. ``pick``
    returns None only when no backend with weight > 0 is usable.
    """

    def pick(self, ctx: PickContext, usable: Usable, *, retry: bool = False) -> int | None:
        """Index of the backend to use, or None when no backend is usable.

        ``retry``: the request already tried another backend. A policy with a rotation
        leaves it where it is, so a failing backend gets no more first tries than its
        share (a retry that took the next turn would hand the turn after it back to the
        failing backend's neighbour, and its own turn would come round sooner)."""
        ...

    def set_weight(self, index: int, weight: float) -> None:
        """Effective weight of one backend changed (admin change, slow start)."""
        ...

    def on_start(self, index: int) -> None:
        """A request/connection was sent to backend ``index``."""
        ...

    def on_finish(self, index: int, latency: float, now: float) -> None:
        """That request/connection ended after ``latency`` seconds, at time ``now``."""
        ...


def make_policy(
    pool: Pool,
    rng: random.Random | None = None,
    active: Sequence[int] | None = None,
) -> Policy:
    """The policy named by ``pool.algorithm`` over ``pool.backends``.

    Called once per configuration snapshot. ``active`` optionally carries the
    requests already in flight per backend (index-aligned), so a new snapshot
    does not forget the load the previous policy was tracking.
    """
    rng = rng or random.Random()
    backends = pool.backends
    algorithm = pool.algorithm
    policy: Policy
    if algorithm == "random":
        policy = WeightedRandom(backends, rng)
    elif algorithm == "round_robin":
        policy = RoundRobin(backends, rng)
    elif algorithm == "weighted_round_robin":
        policy = WeightedRoundRobin(backends, rng)
    elif algorithm == "least_connections":
        policy = LeastConnections(backends, rng, active)
    elif algorithm == "least_loaded":
        policy = LeastLoaded(backends, rng, active)
    elif algorithm == "least_latency":
        policy = LeastLatency(backends, rng, active, decay=pool.latency_decay)
    elif algorithm == "source_hash":
        policy = SourceHash(backends, rng, table_size=pool.maglev_table_size)
    elif algorithm == "consistent_hash":
        policy = ConsistentHash(backends, rng, table_size=pool.maglev_table_size)
    else:
        # model.parse_pool validates the name; reaching this is a programming error.
        raise ValueError(f'pool "{pool.name}": unknown algorithm "{algorithm}"')
    return policy
