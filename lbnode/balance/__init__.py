"""Balancing policies: given the backends of a pool, which one serves next.

Pure: no I/O, no clock, no global state. Time comes in as ``now`` arguments,
randomness as an injected ``random.Random``. Health, draining and limits stay
outside the policy: the caller passes ``usable(i)`` and the policy only picks
among the backends for which it is true.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from lbnode.model import Backend, Pool

Usable = Callable[[int], bool]


@dataclass(frozen=True, slots=True)
class PickContext:
    """What a policy may know of the request being balanced."""

    client_ip: str = ""
    hash_key: bytes | None = None  # the pool's hash_key value, extracted by the caller


class Policy(Protocol):
    def pick(self, ctx: PickContext, usable: Usable) -> int | None:
        """Index of the backend to use, or None when no backend is usable."""

    def set_weight(self, index: int, weight: float) -> None:
        """Effective weight of one backend changed (admin change, slow start)."""

    def on_start(self, index: int) -> None:
        """A request/connection was sent to backend ``index``."""

    def on_finish(self, index: int, latency: float, now: float) -> None:
        """That request/connection ended after ``latency`` seconds, at time ``now``."""


class RoundRobin:
    """Plain rotation over usable backends with weight > 0."""

    def __init__(self, backends: Sequence[Backend], rng: random.Random) -> None:
        self._weights = [float(b.weight) for b in backends]
        self._next = rng.randrange(len(backends)) if backends else 0

    def pick(self, ctx: PickContext, usable: Usable) -> int | None:
        n = len(self._weights)
        for step in range(n):
            i = (self._next + step) % n
            if self._weights[i] > 0 and usable(i):
                self._next = i + 1
                return i
        return None

    def set_weight(self, index: int, weight: float) -> None:
        self._weights[index] = weight

    def on_start(self, index: int) -> None:
        pass

    def on_finish(self, index: int, latency: float, now: float) -> None:
        pass


def make_policy(pool: Pool, rng: random.Random | None = None) -> Policy:
    rng = rng or random.Random()
    return RoundRobin(pool.backends, rng)
