"""Effective weights against the weights a policy's table was built from (slow start).

Owns the bookkeeping shared by the table-based policies (round robin's cycle,
the sampler's cumulative sums, Maglev's slots). Pure: no clock, no I/O.
"""

from __future__ import annotations

from collections.abc import Sequence


class TableWeights:
    """Effective weights measured against the weights a table was built from.

    Lowering a weight keeps the table: the backend's turns are scaled by its
    ``ratio`` (effective / table weight). Raising one above its table weight
    raises the table weight and asks the caller to rebuild (``set`` returns True).
    """

    __slots__ = ("weights", "table", "ratio", "lowered", "full", "scale")

    def __init__(self, weights: Sequence[float]) -> None:
        # The lists are updated in place, never replaced: callers may keep references.
        self.weights = [float(w) for w in weights]  # effective
        self.table = list(self.weights)  # what the table is built from
        self.ratio = [1.0 if w > 0 else 0.0 for w in self.weights]  # effective / table; 0 if off
        self.lowered = 0  # backends in the table with ratio < 1
        self.full = sum(1 for w in self.weights if w > 0)  # backends in the table with ratio 1
        self.scale = 1.0  # largest ratio: 1 unless every backend is lowered; -1 = recompute

    def set(self, index: int, weight: float) -> bool:
        """Backend ``index`` now weighs ``weight``; True when the table must be rebuilt."""
        weight = float(weight)
        if self.weights[index] == weight:
            return False
        self.weights[index] = weight
        base = self.table[index]
        if base > 0:  # leaves its old count
            if self.ratio[index] < 1.0:
                self.lowered -= 1
            else:
                self.full -= 1
        rebuild = weight > base
        if rebuild:
            base = self.table[index] = weight
        if base > 0:  # (a table weight never drops, so otherwise the ratio stays 0)
            ratio = self.ratio[index] = weight / base
            if ratio < 1.0:
                self.lowered += 1
            else:
                self.full += 1
        self.scale = 1.0 if self.full else -1.0
        return rebuild

    def rescale(self) -> float:
        """Recompute ``scale``, the largest ratio in the table (0 when the table is empty)."""
        self.scale = max(
            (r for r, w in zip(self.ratio, self.table, strict=True) if w > 0), default=0.0
        )
        return self.scale
