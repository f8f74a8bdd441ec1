"""``least_connections``: the backend with the fewest active requests per unit of weight.

Owns the active counts and a heap ordered by (active / weight, tie key) that
finds the least loaded backend in O(log n), like HAProxy's fwlc tree. Ties
are broken at random in proportion to weight: tie keys are exponential race
times, redrawn whenever a backend is picked or its load changes. Pure: no
clock, no I/O; randomness only from the injected rng.
"""

from __future__ import annotations

import heapq
import math
import random
from collections.abc import Sequence
from typing import TYPE_CHECKING

from lbnode.balance.weighted_random import weighted_choice
from lbnode.model import Backend

if TYPE_CHECKING:
    from lbnode.balance import PickContext, Usable

# Heap entries looked at before scanning the whole pool: more than this many
# unusable (down, full) backends at the top means scanning is as cheap.
DRAW_ATTEMPTS = 8
# Stale entries (superseded by a newer one for the same backend) are dropped
# as they reach the top; the heap is rebuilt when it grows past this many
# entries per backend, which bounds memory and keeps pushes O(log n).
COMPACT_FACTOR = 4

# (active / weight, tie key, backend index, version): only the entry whose
# version is the backend's current one counts.
_Entry = tuple[float, float, int, int]


class LeastConnections:
    """Lowest active / weight wins; ties drawn at random by weight; weight 0 never.

    Tie keys: a backend re-entering the heap gets ``race + Exp(1) / weight``,
    ``race`` being the key of the last pick. Among backends that tie, the
    smallest key wins, so each next tie goes to backend i with probability
    weight_i / sum of tied weights (the first of independent exponential
    clocks): an idle pool is shared by weight, and no index is favoured.
    """

    def __init__(
        self, backends: Sequence[Backend], rng: random.Random, active: Sequence[int] | None = None
    ) -> None:
        n = len(backends)
        self._rng = rng
        self._weights = [float(b.weight) for b in backends]
        self._active = [max(0, int(a)) for a in active] if active is not None else [0] * n
        if len(self._active) != n:
            raise ValueError(f"active has {len(self._active)} counts for {n} backends")
        self._version = [0] * n
        self._key = [0.0] * n
        self._race = 0.0
        self._heap: list[_Entry] = []
        for i, w in enumerate(self._weights):
            if w > 0:
                self._key[i] = self._draw_key(w)
                self._heap.append((self._active[i] / w, self._key[i], i, 0))
        heapq.heapify(self._heap)

    def _draw_key(self, weight: float) -> float:
        return self._race - math.log(1.0 - self._rng.random()) / weight

    def _requeue(self, i: int) -> None:
        """Backend i's load or weight changed: a new entry, the old one goes stale."""
        v = self._version[i] = self._version[i] + 1
        w = self._weights[i]
        if w <= 0:
            return
        key = self._key[i] = self._draw_key(w)
        heap = self._heap
        heapq.heappush(heap, (self._active[i] / w, key, i, v))
        if len(heap) > COMPACT_FACTOR * len(self._weights) + 64:
            self._compact()

    def _compact(self) -> None:
        weights, active, key, version = self._weights, self._active, self._key, self._version
        self._heap = [
            (active[i] / w, key[i], i, version[i]) for i, w in enumerate(weights) if w > 0
        ]
        heapq.heapify(self._heap)

    def set_weight(self, index: int, weight: float) -> None:
        weight = float(weight)
        if self._weights[index] != weight:
            self._weights[index] = weight
            self._requeue(index)

    def on_start(self, index: int) -> None:
        self._active[index] += 1
        self._requeue(index)

    def on_finish(self, index: int, latency: float, now: float) -> None:
        if self._active[index] == 0:
            return  # started under an older snapshot's policy; nothing to undo
        self._active[index] -= 1
        self._requeue(index)

    def active(self, index: int) -> int:
        return self._active[index]

    def pick(self, ctx: PickContext, usable: Usable, *, retry: bool = False) -> int | None:
        heap, version = self._heap, self._version
        passed: list[_Entry] = []  # valid entries of unusable backends, put back after
        chosen: int | None = None
        for _ in range(DRAW_ATTEMPTS):
            while heap and heap[0][3] != version[heap[0][2]]:
                heapq.heappop(heap)  # stale
            if not heap:
                break
            score, key, i, v = heap[0]
            if usable(i):
                # Redraw the winner's tie key so that the next tie goes elsewhere.
                self._race = key
                new_key = self._key[i] = self._draw_key(self._weights[i])
                heapq.heapreplace(heap, (score, new_key, i, v))
                chosen = i
                break
            passed.append(heapq.heappop(heap))
        for entry in passed:
            heapq.heappush(heap, entry)
        if chosen is None and (passed or heap):
            return self._scan(usable)
        return chosen

    def _scan(self, usable: Usable) -> int | None:
        """Every usable backend, O(n): the least loaded were unusable (down, full)."""
        weights, active = self._weights, self._active
        best = math.inf
        tied: list[int] = []
        for i, w in enumerate(weights):
            if w <= 0:
                continue
            score = active[i] / w
            if score > best or not usable(i):
                continue
            if score < best:
                best = score
                tied = [i]
            else:
                tied.append(i)
        return weighted_choice(tied, weights, self._rng) if tied else None
