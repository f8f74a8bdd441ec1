"""Rotation policies: ``round_robin`` and ``weighted_round_robin`` (nginx's smooth WRR).

Owns the rotation order: a precomputed cycle identical to nginx's smooth
weighted round robin (O(1) per pick), or an earliest-deadline-first heap
(O(log n)) when the cycle is too long to precompute or a weight was raised to
a fraction. Pure: no clock, no I/O; randomness only from the injected rng.
"""

from __future__ import annotations

import heapq
import math
import random
from collections.abc import Iterator, Sequence
from operator import length_hint
from typing import TYPE_CHECKING

from lbnode.balance.weighted_random import weighted_choice
from lbnode.balance.weights import TableWeights
from lbnode.model import Backend

if TYPE_CHECKING:
    from lbnode.balance import PickContext, Usable

# Work allowed to precompute one exact cycle: cycle length x distinct weights.
# 2**18 steps of the per-class loop take about 20 ms, paid once per snapshot
# or weight change; beyond that the EDF heap gives the same shares in O(log n).
SCHEDULE_BUDGET = 1 << 18
# Entries walked past unusable backends before drawing among the usable ones:
# with half of the pool down, 32 misses in a row happen once in 4 billion picks.
SKIP_LIMIT = 32
_GOLDEN = 0.6180339887498949


def smooth_schedule(weights: Sequence[int]) -> list[int]:
    """One full cycle of nginx's smooth weighted round robin over integer weights.

    nginx adds every weight to a current value, picks the largest (first on a
    tie) and takes the total off the winner: O(n) per step. After t steps
    backend i's current value is ``t*w_i - total*k_i`` (k_i = times picked), so
    backends of equal weight differ only by k_i: within one weight class the
    next candidate is the one picked least, lowest index first, i.e. a plain
    rotation. Comparing one candidate per class gives the same sequence in
    O(classes) per step. Zero weights never appear. The cycle length is the
    sum of the weights; repeating it continues nginx's sequence exactly.
    """
    members: dict[int, list[int]] = {}
    for i, w in enumerate(weights):
        if w > 0:
            members.setdefault(w, []).append(i)
    total = sum(w * len(idx) for w, idx in members.items())
    classes = [(w, idx, len(idx)) for w, idx in members.items()]
    picks = [0] * len(classes)  # picks so far per class
    out: list[int] = []
    append = out.append
    if len(classes) == 1:
        _, idx, _ = classes[0]
        return [idx[t % len(idx)] for t in range(total)]
    for t in range(1, total + 1):
        best_c = -1
        best_key = 0
        best_i = 0
        for c, (w, idx, m) in enumerate(classes):
            k = picks[c]
            i = idx[k % m]
            key = t * w - total * (k // m)
            if best_c < 0 or key > best_key or (key == best_key and i < best_i):
                best_c, best_key, best_i = c, key, i
        picks[best_c] += 1
        append(best_i)
    return out


class WeightedRoundRobin:
    """``weighted_round_robin``: nginx's smooth WRR; weights 5,1,1 give a a b a c a a.

    An unusable backend is skipped: the rotation moves on to the next entry of
    the cycle, so its turns go to whoever follows it. A weight lowered below
    the one the cycle was built from (slow start) keeps the cycle: the backend
    takes that fraction of its turns (a credit per backend, so it is spread
    evenly) and passes the others on, which makes ``set_weight`` O(1). A
    weight raised above it rebuilds the cycle on the next pick.
    """

    def __init__(
        self, backends: Sequence[Backend], rng: random.Random, *, random_start: bool = False
    ) -> None:
        self._tw = TableWeights([b.weight for b in backends])  # the cycle is built from .table
        # Spread starting credits (golden ratio steps) so that backends ramping
        # together do not all pass their turns in the same stretch of the cycle.
        self._credit = [(i * _GOLDEN) % 1.0 for i in range(len(backends))]
        self._rng = rng
        self._random_start = random_start
        self._schedule: list[int] = []  # exact cycle (integer weights within budget)
        self._pos = 0  # where the cycle stood at the last rebuild
        self._heap: list[tuple[float, int]] = []  # EDF fallback: (deadline, index)
        self._step: list[float] = []  # EDF: 1 / weight
        # Entries still to come: the rest of the current cycle, or the endless EDF order.
        self._entries: Iterator[int] = iter(())
        self._built = False
        self._dirty = True

    @property
    def exact(self) -> bool:
        """True while the cycle is nginx's sequence (not the EDF approximation)."""
        if self._dirty:
            self._rebuild()
        return bool(self._schedule) or not self._heap

    def set_weight(self, index: int, weight: float) -> None:
        if self._tw.set(index, weight):
            self._dirty = True  # rebuilt on the next pick: a burst of raises costs one rebuild

    def on_start(self, index: int) -> None:
        pass

    def on_finish(self, index: int, latency: float, now: float) -> None:
        pass

    def _rebuild(self) -> None:
        self._dirty = False
        first = not self._built
        self._built = True
        sched = self._schedule
        if sched:  # next position in the old cycle
            self._pos = (len(sched) - length_hint(self._entries)) % len(sched)
        weights = self._tw.table
        positive = [(i, w) for i, w in enumerate(weights) if w > 0]
        self._schedule, self._heap = [], []
        self._entries = iter(())
        if not positive:
            return
        if all(w.is_integer() for _, w in positive):
            ints = [int(w) for w in weights]
            g = math.gcd(*(w for w in ints if w > 0))
            ints = [w // g for w in ints]  # same sequence, shorter cycle
            total = sum(ints)
            if total * len({w for w in ints if w > 0}) <= SCHEDULE_BUDGET:
                self._schedule = smooth_schedule(ints)
                if first:
                    self._pos = self._rng.randrange(total) if self._random_start else 0
                else:
                    self._pos %= total  # keep going from about the same place
                self._entries = iter(self._schedule[self._pos :])
                return
        # EDF: each backend's next turn is one 1/weight further in virtual time;
        # random phases so that a rebuild favours nobody.
        rng = self._rng
        self._step = [1.0 / w if w > 0 else 0.0 for w in weights]
        self._heap = [(rng.random() / w, i) for i, w in positive]
        heapq.heapify(self._heap)
        self._entries = self._edf(self._heap, self._step)

    @staticmethod
    def _edf(heap: list[tuple[float, int]], step: list[float]) -> Iterator[int]:
        """Backends in the order of their deadlines, endlessly."""
        while True:
            d, i = heap[0]
            heapq.heapreplace(heap, (d + step[i], i))
            yield i

    def _advance(self) -> int:
        """The next entry of the rotation; -1 when no backend has weight > 0."""
        i = next(self._entries, -1)
        if i < 0 and self._schedule:  # end of the cycle: start the next one
            self._entries = iter(self._schedule)
            i = next(self._entries)
        return i

    def pick(self, ctx: PickContext, usable: Usable, *, retry: bool = False) -> int | None:
        if retry:
            return self._retry(usable)
        if self._dirty:
            self._rebuild()
        i = next(self._entries, -1)  # _advance's common case, inlined for speed
        if i < 0:
            i = self._advance()
            if i < 0:
                return None
        if self._tw.lowered:
            return self._walk(usable, i, {})
        if usable(i):
            return i
        return self._walk(usable, self._advance(), {i: False})

    def _retry(self, usable: Usable) -> int | None:
        """A retry: a weighted draw among the usable backends, the rotation left untouched.

        Taking the next turn instead would move every later first try one step on: with
        A refusing in A B C, first tries would go A C A C... (A half of them, B none)."""
        weights = self._tw.weights
        eligible = [j for j, w in enumerate(weights) if w > 0 and usable(j)]
        return weighted_choice(eligible, weights, self._rng) if eligible else None

    def _walk(self, usable: Usable, i: int, known: dict[int, bool]) -> int | None:
        """From entry ``i`` on: the first backend that is due and usable."""
        tw, credit = self._tw, self._credit
        ratio, scale = tw.ratio, tw.scale
        if scale < 0:
            scale = tw.rescale()
        if scale <= 0:
            return None  # every weight is 0
        for _ in range(SKIP_LIMIT):
            r = ratio[i]
            if r >= scale:
                ok = known.get(i)
                if ok is None:
                    ok = known[i] = usable(i)
                if ok:
                    return i
            elif r > 0:
                c = credit[i] + r / scale
                if c < 1.0:
                    credit[i] = c  # passes this turn on
                else:
                    ok = known.get(i)
                    if ok is None:
                        ok = known[i] = usable(i)
                    if ok:
                        credit[i] = c - 1.0
                        return i
                    credit[i] = 1.0  # owed one turn while unusable, never more
            i = self._advance()
        weights = tw.weights
        eligible = [
            j for j, w in enumerate(weights) if w > 0 and (known[j] if j in known else usable(j))
        ]
        return weighted_choice(eligible, weights, self._rng) if eligible else None


class RoundRobin(WeightedRoundRobin):
    """``round_robin``: the same weighted rotation, started at a random point of the cycle.

    With equal weights this is plain rotation. The random start keeps several
    nodes (and successive snapshots) from all sending their first requests to
    the same backend.
    """

    def __init__(self, backends: Sequence[Backend], rng: random.Random) -> None:
        super().__init__(backends, rng, random_start=True)
