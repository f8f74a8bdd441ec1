"""Consistent hashing on Maglev lookup tables: ``consistent_hash`` and ``source_hash``.

Owns the weighted lookup table (built once per snapshot, keyed by backend id so
list order does not matter) and the key -> backend mapping: while its backend
is usable a key never moves; an unusable backend's keys walk on to the next
backend in the table, and come back when it is usable again. Pure: no clock,
no I/O; stable hashes (blake2b), so every node maps a key the same way.
"""

from __future__ import annotations

import heapq
import math
import random
from collections.abc import Sequence
from hashlib import blake2b
from typing import TYPE_CHECKING

from lbnode.balance.round_robin import RoundRobin
from lbnode.balance.weights import TableWeights
from lbnode.model import Backend

if TYPE_CHECKING:
    from lbnode.balance import PickContext, Usable

# Distinct blake2b personalisations: the key hash and a backend's permutation
# (offset, skip) must not be correlated.
_KEY_PERSON = b"fulcrum-key"
_OFFSET_PERSON = b"fulcrum-offset"
_SKIP_PERSON = b"fulcrum-skip"
# Table entries walked past unusable backends before checking whether any
# backend is usable at all (so an all-down pool costs O(n), not O(table)).
WALK_LIMIT = 32


def key_hash(key: bytes) -> int:
    """Stable 64-bit hash of a request key (same on every node and every run)."""
    return int.from_bytes(blake2b(key, digest_size=8, person=_KEY_PERSON).digest(), "little")


def _id_hash(backend_id: str, person: bytes) -> int:
    data = backend_id.encode("utf-8", "surrogatepass")
    return int.from_bytes(blake2b(data, digest_size=8, person=person).digest(), "little")


class MaglevTable:
    """Maglev lookup table (Eisenbud et al., NSDI 2016) with weights.

    Each backend walks its own permutation of the slots (offset + j * skip,
    the table size is prime) and claims its next free slot when its turn
    comes. Turns are weighted as in Envoy: in round r a backend of weight w
    takes a slot if r * w >= (slots taken) * max weight, so shares follow
    weights and every backend with weight > 0 gets at least one slot (when the
    table has room). A heap of next turns makes the build O(size log n) plus
    the permutation walks, about 0.1-0.3 s for 65537 slots.
    """

    __slots__ = ("size", "slots")

    def __init__(self, ids: Sequence[str], weights: Sequence[float], size: int) -> None:
        if size < 2:
            raise ValueError(f"Maglev table size must be a prime >= 2, got {size}")
        self.size = size
        self.slots: list[int] = self._build(ids, weights, size)

    @staticmethod
    def _build(ids: Sequence[str], weights: Sequence[float], size: int) -> list[int]:
        members = sorted((ids[i], i) for i, w in enumerate(weights) if w > 0)
        if not members:
            return []
        index = [i for _, i in members]
        weight = [float(weights[i]) for i in index]
        wmax = max(weight)
        cursor = [_id_hash(bid, _OFFSET_PERSON) % size for bid, _ in members]
        skip = [_id_hash(bid, _SKIP_PERSON) % (size - 1) + 1 for bid, _ in members]
        taken = [0] * len(members)
        table = [-1] * size
        turns = [(1, rank) for rank in range(len(members))]  # (round, rank): already a heap
        for _ in range(size):
            rnd, rank = turns[0]
            c, s = cursor[rank], skip[rank]
            while table[c] >= 0:
                c += s
                if c >= size:
                    c -= size
            table[c] = index[rank]
            c += s
            cursor[rank] = c - size if c >= size else c
            taken[rank] += 1
            nxt = max(rnd + 1, math.ceil(taken[rank] * wmax / weight[rank]))
            heapq.heapreplace(turns, (nxt, rank))
        return table

    def lookup(self, key: bytes) -> int | None:
        """Primary backend index of ``key``, ignoring health; None for an empty table."""
        return self.slots[key_hash(key) % self.size] if self.slots else None


class ConsistentHash:
    """``consistent_hash``: Maglev over ``ctx.hash_key``; round robin when the request has no key.

    ``set_weight`` below the configured weight (slow start) keeps the table and
    sends that fraction of the backend's keys on to their next backend, chosen
    per key by a stable coin, so keys come back monotonically as the weight
    grows (O(1) per call). Weight 0 sends all of them on. A weight above the
    one the table was built with rebuilds the table on the next pick.
    """

    def __init__(
        self, backends: Sequence[Backend], rng: random.Random, *, table_size: int = 65537
    ) -> None:
        self._ids = [b.id for b in backends]
        self._tw = TableWeights([b.weight for b in backends])  # the table is built from .table
        self._share = self._tw.ratio  # shared list: effective / built-with weight
        self._size = table_size
        self._table = MaglevTable(self._ids, self._tw.table, table_size)
        self._slots = self._table.slots
        self._dirty = False
        self._fallback = RoundRobin(backends, rng)

    @property
    def table(self) -> MaglevTable:
        if self._dirty:
            self._rebuild()
        return self._table

    def _key(self, ctx: PickContext) -> bytes | None:
        return ctx.hash_key

    def set_weight(self, index: int, weight: float) -> None:
        self._fallback.set_weight(index, weight)
        if self._tw.set(index, weight):
            self._dirty = True

    def _rebuild(self) -> None:
        self._dirty = False
        self._table = MaglevTable(self._ids, self._tw.table, self._size)
        self._slots = self._table.slots

    def on_start(self, index: int) -> None:
        pass

    def on_finish(self, index: int, latency: float, now: float) -> None:
        pass

    def pick(self, ctx: PickContext, usable: Usable, *, retry: bool = False) -> int | None:
        key = self._key(ctx)
        if key is None:
            return self._fallback.pick(ctx, usable, retry=retry)
        if self._dirty:
            self._rebuild()
        slots = self._slots
        if not slots:
            return None
        h = int.from_bytes(blake2b(key, digest_size=8, person=_KEY_PERSON).digest(), "little")
        s = h % self._size
        i = slots[s]
        if (not self._tw.lowered or self._share[i] >= 1.0) and usable(i):
            return i
        return self._walk(s, h, usable)

    def _walk(self, s: int, h: int, usable: Usable) -> int | None:
        """Next entries of the table from slot ``s``: the key's preference order."""
        slots, share = self._slots, self._share
        size = len(slots)
        # Stable per key and independent of the slot. Scaled by the largest share
        # so that a pool ramping up all together moves no key.
        scale = self._tw.scale
        if scale < 0:
            scale = self._tw.rescale()
        coin = (h // size) / (2**64 // size + 1) * scale
        known: dict[int, bool] = {}
        first_usable = -1  # usable but this key is outside its (slow start) share
        for step in range(size):
            i = slots[s]
            ok = known.get(i)
            if ok is None:
                ok = known[i] = share[i] > 0 and usable(i)
            if ok:
                if coin < share[i]:
                    return i
                if first_usable < 0:
                    first_usable = i
            if step == WALK_LIMIT:
                for j in range(len(share)):
                    if j not in known:
                        known[j] = share[j] > 0 and usable(j)
                if not any(known.values()):
                    return None
            s += 1
            if s == size:
                s = 0
        if first_usable >= 0:
            return first_usable
        # Usable backends that own no slot (a table smaller than the pool).
        eligible = [j for j in range(len(share)) if share[j] > 0 and usable(j)]
        return eligible[0] if eligible else None


class SourceHash(ConsistentHash):
    """``source_hash``: Maglev over the client IP; round robin when it is unknown."""

    def _key(self, ctx: PickContext) -> bytes | None:
        return ctx.client_ip.encode("ascii", "replace") if ctx.client_ip else None
