"""Power-of-two-choices policies: ``least_loaded`` and ``least_latency``.

Owns the in-flight counts and latency estimates (peak EWMA, as in Finagle and
Linkerd) and the two-candidate comparison: draw two distinct backends in
proportion to weight, keep the cheaper. O(log n) per pick, no pool scan.
Pure: time only from the ``now`` given to ``on_finish``; randomness from the
injected rng; never reads the clock.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from typing import TYPE_CHECKING

from lbnode.balance.weighted_random import WeightedSampler, weighted_choice
from lbnode.model import Backend

if TYPE_CHECKING:
    from lbnode.balance import PickContext, Usable

# Pairs drawn before scanning the pool: both candidates of 3 pairs are unusable
# with probability (share unusable)^6, about 1.6% with half of the pool down.
PAIR_ATTEMPTS = 3
# Cost of a backend with no latency observed yet but a request in flight: larger
# than any real cost, so a new (possibly slow) backend holds one request until
# it answers once, instead of drawing a flood before its first observation.
UNOBSERVED_BUSY_COST = 1e9
# Floor of an observed latency, so a backend answering "instantly" still pays
# for its in-flight requests instead of costing 0 however busy it gets.
MIN_LATENCY = 1e-6
# least_latency: a candidate whose latency estimate is this many times the other's is
# "slow" and loses the pair whatever the in-flight counts say. Without it, a closed-loop
# load at saturation (16 connections, 3 backends, one 20 ms late) sent 1.5% of requests
# to the slow backend: (in flight + 1) multiplies the fast backends' cost up to the slow
# one's, and that 1.5% sets everyone's p99. 2: equal backends rarely look twice as slow
# as each other for long (and then the lower one is a fine choice anyway).
SLOW_FACTOR = 2.0
# ...but one in this many pairs a slow candidate lost, it wins: a probe, so that a
# recovered backend is seen and wins its share back. Bounds the slow backend's share by
# 1/PROBE_EVERY (0.4%) at any load, since it counts picks, not time.
PROBE_EVERY = 256
# ...and at most one probe per this many seconds (on the policy's clock, the latest answer's
# time): at high load 256 picks pass in milliseconds, and each probe holds a client for the
# slow backend's whole delay. A closed-loop client (wrk) that waited 20 ms for one answer sent
# nothing else meanwhile: the requests it would have sent count as late too (wrk corrects its
# percentiles for that), so at 13,000 req/s 0.26% of probes set its p99 at 17 ms against a
# 2.6 ms floor. A recovered backend is still seen within this time at any load.
PROBE_INTERVAL = 0.25


class _PowerOfTwo:
    """Shared skeleton: two weighted draws, the cheaper usable one wins."""

    def __init__(
        self, backends: Sequence[Backend], rng: random.Random, active: Sequence[int] | None
    ) -> None:
        n = len(backends)
        self._rng = rng
        self._sampler = WeightedSampler([b.weight for b in backends])
        self._weights = self._sampler.weights  # shared list, kept current by the sampler
        self._active = [max(0, int(a)) for a in active] if active is not None else [0] * n
        if len(self._active) != n:
            raise ValueError(f"active has {len(self._active)} counts for {n} backends")

    def _cost(self, i: int) -> float:
        raise NotImplementedError

    def _prefer(self, j: int, i: int) -> bool:
        """Whether candidate ``j`` beats ``i``. On a tie the first draw wins, so an idle pool
        is shared by weight."""
        return self._cost(j) < self._cost(i)

    def set_weight(self, index: int, weight: float) -> None:
        self._sampler.set_weight(index, weight)

    def on_start(self, index: int) -> None:
        self._active[index] += 1

    def on_finish(self, index: int, latency: float, now: float) -> None:
        if self._active[index] > 0:  # 0: started under an older snapshot's policy
            self._active[index] -= 1

    def active(self, index: int) -> int:
        return self._active[index]

    def pick(self, ctx: PickContext, usable: Usable, *, retry: bool = False) -> int | None:
        sampler, rng = self._sampler, self._rng
        for _ in range(PAIR_ATTEMPTS):
            i = sampler.draw(rng)
            if i is None:
                return None
            j = sampler.draw(rng, exclude=i)
            if j is None:
                if usable(i):
                    return i
                break  # i is the only candidate there is
            if self._prefer(j, i):
                i, j = j, i
            if usable(i):
                return i
            if usable(j):
                return j
        return self._scan(usable)

    def _scan(self, usable: Usable) -> int | None:
        weights = self._weights
        best = -1.0
        tied: list[int] = []
        for i, w in enumerate(weights):
            if w <= 0 or not usable(i):
                continue
            cost = self._cost(i)
            if best < 0 or cost < best:
                best, tied = cost, [i]
            elif cost == best:
                tied.append(i)
        return weighted_choice(tied, weights, self._rng) if tied else None


class LeastLoaded(_PowerOfTwo):
    """``least_loaded``: of two weighted draws, fewer requests in flight per unit of weight."""

    def _cost(self, i: int) -> float:
        return self._active[i] / self._weights[i]


class LeastLatency(_PowerOfTwo):
    """``least_latency``: of two weighted draws, lower peak-EWMA latency x (in flight + 1) / weight.

    Peak EWMA: a latency above the estimate replaces it at once (a slowdown is
    seen on the first slow answer); below it, it is blended in with weight
    ``1 - exp(-dt / decay)``. Between observations the estimate also decays
    toward zero (Finagle's rule) using the latest ``now`` seen by this policy,
    so a backend avoided for being slow is tried again after a while. A
    backend never observed costs 0 while idle (it is tried) and
    ``UNOBSERVED_BUSY_COST`` while it has a request in flight.

    A candidate whose (undecayed) estimate is ``SLOW_FACTOR`` times the other's loses
    the pair outright, except once every ``PROBE_EVERY`` such decisions and at most once
    per ``PROBE_INTERVAL`` (a probe): the slow backend's share stays under 1/PROBE_EVERY at
    any load, and under one request per PROBE_INTERVAL at high load; a probe answered
    ``SLOW_FACTOR`` times faster than its estimate replaces it, so that a recovered
    backend competes again at once.
    """

    def __init__(
        self,
        backends: Sequence[Backend],
        rng: random.Random,
        active: Sequence[int] | None = None,
        *,
        decay: float = 10.0,
    ) -> None:
        super().__init__(backends, rng, active)
        n = len(backends)
        self._decay = decay if decay > 0 else 1e-9
        self._ewma: list[float | None] = [None] * n  # seconds; None = never observed
        self._stamp = [0.0] * n  # time of the estimate
        self._clock = -math.inf  # latest ``now`` seen, the policy's only notion of time
        self._avoided = 0  # pairs a slow candidate lost since the last probe
        self._probed_at = -math.inf  # the policy's clock at the last probe
        self._slow = [False] * n  # lost a pair for being slow since its last fast answer

    def latency(self, index: int) -> float | None:
        """Current estimate (decayed to the latest ``now`` seen), or None if never observed."""
        e = self._ewma[index]
        if e is None:
            return None
        return e * math.exp(-max(0.0, self._clock - self._stamp[index]) / self._decay)

    def on_finish(self, index: int, latency: float, now: float) -> None:
        super().on_finish(index, latency, now)
        latency = max(MIN_LATENCY, latency)
        e = self._ewma[index]
        if e is None or latency > e:
            self._ewma[index] = latency
        elif self._slow[index] and latency * SLOW_FACTOR <= e:
            # a probe answered fast: it competes again at once (blending it in would take
            # about ``decay`` at high load, where probes come milliseconds apart)
            self._ewma[index] = latency
            self._slow[index] = False
        else:
            w = math.exp(-max(0.0, now - self._stamp[index]) / self._decay)
            self._ewma[index] = e * w + latency * (1.0 - w)
        self._stamp[index] = now
        if now > self._clock:
            self._clock = now

    def _prefer(self, j: int, i: int) -> bool:
        ei, ej = self._ewma[i], self._ewma[j]
        if ei is not None and ej is not None:
            if ej * SLOW_FACTOR <= ei:  # i is the slow one
                self._slow[i] = True
                return not self._probe()
            if ei * SLOW_FACTOR <= ej:  # j is
                self._slow[j] = True
                return self._probe()
        return self._cost(j) < self._cost(i)

    def _probe(self) -> bool:
        self._avoided += 1
        if self._avoided >= PROBE_EVERY and self._clock >= self._probed_at + PROBE_INTERVAL:
            self._avoided = 0
            self._probed_at = self._clock
            return True
        return False

    def _cost(self, i: int) -> float:
        e = self._ewma[i]
        a = self._active[i]
        if e is None:
            return 0.0 if a == 0 else UNOBSERVED_BUSY_COST + a / self._weights[i]
        dt = self._clock - self._stamp[i]
        if dt > 0:
            e *= math.exp(-dt / self._decay)
        return e * (a + 1) / self._weights[i]
