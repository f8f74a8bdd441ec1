"""Weighted random choice: the ``random`` policy and the sampler other policies draw from.

Owns drawing backend indices in proportion to their effective weights: bisect
on cumulative weights (O(log n)); a weight lowered by slow start is applied by
rejection, so ``set_weight`` is O(1) even when called on every request.
Pure: randomness only from the injected ``random.Random``; no clock, no I/O.
"""

from __future__ import annotations

import random
from bisect import bisect_right
from collections.abc import Sequence
from typing import TYPE_CHECKING

from lbnode.balance.weights import TableWeights
from lbnode.model import Backend

if TYPE_CHECKING:
    from lbnode.balance import PickContext, Usable

# Draws before giving up on luck and scanning every backend: with half of the
# weight unusable, 8 draws all miss with probability 1/256.
DRAW_ATTEMPTS = 8
# Rejected draws (slow-start backends) before an exact O(n) draw: only reached
# when nearly all of the weight is ramping from a low factor.
REJECTION_LIMIT = 16


class WeightedSampler:
    """Draws indices with probability effective weight / total; weight 0 is never drawn.

    The cumulative table is built from each backend's table weight (its
    configured weight, or more if ``set_weight`` raised it: that rebuilds, O(n),
    on the next draw). A lower effective weight is a ratio below 1: a draw of
    that backend is kept with probability ratio / largest ratio, which gives
    exactly the effective shares without touching the table.
    """

    __slots__ = ("weights", "_tw", "_table", "_cum", "_total", "_last", "_dirty")

    def __init__(self, weights: Sequence[float]) -> None:
        self._tw = TableWeights(weights)
        self.weights = self._tw.weights  # effective weights (shared list), read by the policies
        self._table = self._tw.table  # shared list: what the cumulative sums are built from
        self._cum: list[float] = []
        self._total = 0.0
        self._last = -1  # highest index with weight > 0, for float round-up at the top
        self._dirty = True

    def set_weight(self, index: int, weight: float) -> None:
        if self._tw.set(index, weight):
            self._dirty = True

    def _rebuild(self) -> None:
        cum: list[float] = []
        total = 0.0
        last = -1
        for i, w in enumerate(self._table):
            if w > 0:
                total += w
                last = i
            cum.append(total)
        self._cum, self._total, self._last, self._dirty = cum, total, last, False

    def _draw_table(self, rng: random.Random, exclude: int) -> int:
        """An index in proportion to table weight, never ``exclude`` (-1: none)."""
        cum = self._cum
        if exclude < 0:
            i = bisect_right(cum, rng.random() * self._total)
        else:
            w = self._table[exclude]
            x = rng.random() * (self._total - w)
            if x >= cum[exclude] - w:
                x += w  # jump over the excluded interval
            i = bisect_right(cum, x)
        # bisect_right lands on the first cumulative value above x, never on a
        # zero-weight backend (its value equals its predecessor's); clamp float round-up.
        return i if i <= self._last else self._last

    def draw(self, rng: random.Random, exclude: int = -1) -> int | None:
        """One index, or None when no backend (other than ``exclude``) has weight > 0."""
        if self._dirty:
            self._rebuild()
        if self._last < 0:
            return None
        if exclude >= 0 and self._total - self._table[exclude] <= 0:
            return None
        i = self._draw_table(rng, exclude)
        if i == exclude:  # float rounding at the interval edge
            return None
        if not self._tw.lowered:
            return i
        return self._accept(rng, i, exclude)

    def _accept(self, rng: random.Random, i: int, exclude: int) -> int | None:
        tw = self._tw
        ratio, scale = tw.ratio, tw.scale
        if scale < 0:
            scale = tw.rescale()
        if scale <= 0:
            return None
        for _ in range(REJECTION_LIMIT):
            r = ratio[i]
            if r >= scale or rng.random() * scale < r:
                return i
            i = self._draw_table(rng, exclude)
            if i == exclude:
                return None
        eligible = [j for j, w in enumerate(self.weights) if w > 0 and j != exclude]
        return weighted_choice(eligible, self.weights, rng) if eligible else None


def weighted_choice(indices: Sequence[int], weights: Sequence[float], rng: random.Random) -> int:
    """One of ``indices`` (non-empty), in proportion to ``weights[index]``."""
    if len(indices) == 1:
        return indices[0]
    return rng.choices(indices, weights=[weights[i] for i in indices])[0]


class WeightedRandom:
    """``random``: each pick draws a backend with probability weight / total weight."""

    def __init__(self, backends: Sequence[Backend], rng: random.Random) -> None:
        self._rng = rng
        self._sampler = WeightedSampler([b.weight for b in backends])

    def pick(self, ctx: PickContext, usable: Usable, *, retry: bool = False) -> int | None:
        sampler, rng = self._sampler, self._rng
        for _ in range(DRAW_ATTEMPTS):
            i = sampler.draw(rng)
            if i is None:
                return None
            if usable(i):
                return i
        # Unlucky or mostly unusable: draw among the usable ones only, which keeps
        # their relative shares exact.
        weights = sampler.weights
        eligible = [i for i, w in enumerate(weights) if w > 0 and usable(i)]
        return weighted_choice(eligible, weights, rng) if eligible else None

    def set_weight(self, index: int, weight: float) -> None:
        self._sampler.set_weight(index, weight)

    def on_start(self, index: int) -> None:
        pass

    def on_finish(self, index: int, latency: float, now: float) -> None:
        pass
