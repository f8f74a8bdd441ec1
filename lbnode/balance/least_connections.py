"""``least_connections``: the backend with the fewest active requests per unit of weight.

Owns the active counts and a heap ordered by (active / weight, tie key) that
finds the least loaded backend in O(log n), like HAProxy's fwlc tree. Ties
are broken at random in proportion to weight: tie keys are exponential race
times, redrawn whenever a backend is picked or its load falls. A rise in load
(a request starting) only counts: the backend's heap entry then understates its
load, which ``pick`` corrects when that entry reaches the top. So a request that
starts and finishes between two picks of others costs the heap nothing. Pure: no
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
        # The score (active / weight) in each backend's current heap entry: at most its
        # real one, since a start does not touch the heap (see ``pick``).
        self._stored = [0.0] * n
        self._key = [0.0] * n
        self._race = 0.0
        self._heap: list[_Entry] = []
        for i, w in enumerate(self._weights):
            if w > 0:
                self._key[i] = self._draw_key(w)
        self._compact()

    def _draw_key(self, weight: float) -> float:
        return self._race - math.log(1.0 - self._rng.random()) / weight

    def _requeue(self, i: int) -> None:
        """Backend i's load or weight changed: a new entry, the old one goes stale."""
        v = self._version[i] = self._version[i] + 1
        w = self._weights[i]
        if w <= 0:
            return
        key = self._key[i] = self._draw_key(w)
        score = self._stored[i] = self._active[i] / w
        heap = self._heap
        heapq.heappush(heap, (score, key, i, v))
        if len(heap) > COMPACT_FACTOR * len(self._weights) + 64:
            self._compact()

    def _compact(self) -> None:
        """The heap made again from the current entries only: one per backend of weight > 0."""
        active, key, version, stored = self._active, self._key, self._version, self._stored
        heap: list[_Entry] = []
        for i, w in enumerate(self._weights):
            if w > 0:
                stored[i] = active[i] / w
                heap.append((stored[i], key[i], i, version[i]))
        heapq.heapify(heap)
        self._heap = heap

    def set_weight(self, index: int, weight: float) -> None:
        weight = float(weight)
        if self._weights[index] != weight:
            self._weights[index] = weight
            self._requeue(index)

    def on_start(self, index: int) -> None:
        # Counted only: the heap entry's lower score is corrected by ``pick`` if it reaches the top.
        self._active[index] += 1

    def on_finish(self, index: int, latency: float, now: float) -> None:
        active = self._active
        if active[index] == 0:
            return  # started under an older snapshot's policy; nothing to undo
        active[index] -= 1
        w = self._weights[index]
        # A new entry only if the current one now overstates the load (pick had corrected it
        # upwards), or if its tie key fell behind the race while the backend was busier than
        # the winners (kept, it would win the next tie at once); else it is exact again.
        if w > 0 and (active[index] / w < self._stored[index] or self._key[index] < self._race):
            self._requeue(index)

    def active(self, index: int) -> int:
        return self._active[index]

    def pick(self, ctx: PickContext, usable: Usable, *, retry: bool = False) -> int | None:
        heap, version, active, weights = self._heap, self._version, self._active, self._weights
        passed: list[_Entry] = []  # valid entries of unusable backends, put back after
        chosen: int | None = None
        attempts = 0
        while attempts < DRAW_ATTEMPTS:
            while heap and heap[0][3] != version[heap[0][2]]:
                heapq.heappop(heap)  # stale
            if not heap:
                break
            score, key, i, v = heap[0]
            current = active[i] / weights[i]
            if score != current:
                # Requests started there since the entry was made: it moves down to its real
                # score (at most once per backend per start), and the new top is looked at.
                self._stored[i] = current
                heapq.heapreplace(heap, (current, key, i, v))
                continue
            if usable(i):
                # Redraw the winner's tie key so that the next tie goes elsewhere.
                self._race = key
                new_key = self._key[i] = self._draw_key(self._weights[i])
                heapq.heapreplace(heap, (score, new_key, i, v))
                chosen = i
                break
            passed.append(heapq.heappop(heap))
            attempts += 1
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
