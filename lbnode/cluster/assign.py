"""Who actively checks which backend, and what the cluster concludes from their results.

Owns the rendezvous (highest-random-weight) assignment of backends to checker nodes and
the majority rule over their observations. Pure: no I/O, no clock, no randomness.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence


def backend_key(pool: str, backend_id: str) -> str:
    """The name a backend is hashed by: the same on every node."""
    return f"{pool}/{backend_id}"


def _weight(node: str, key: str) -> int:
    # NUL cannot occur in a node id or a pool name, so (node, key) pairs never collide as text
    digest = hashlib.blake2b(node.encode() + b"\0" + key.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def checkers_for(backend_key: str, live_nodes: Iterable[str], k: int) -> list[str]:
    """The ``k`` live nodes (fewer if fewer are live) that check ``backend_key``, best first.

    Rendezvous hashing: each node scores the backend, the highest scores win. Every node
    computes the same answer from the same set of live nodes, whatever its order; when a
    node leaves, only the backends it checked get a new checker (the next best score), and
    a node that joins takes about k/N of the backends, from every other node evenly.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    ranked = sorted(set(live_nodes), key=lambda node: (_weight(node, backend_key), node), reverse=True)
    return ranked[:k]


def fresh_verdict(
    observations: Mapping[str, tuple[bool, float]], checkers: Sequence[str], now: float
) -> bool | None:
    """``cluster_verdict`` ignoring the observations that are too old at ``now``.

    ``observations``: node id -> (passed, the time from which it is too old, on the
    caller's clock). A checker whose observation is that old has fallen silent while its node lives (its
    lease keeps the key): its last word is ignored and it is left out of the count, as if
    it were not a checker, so the others decide. A checker that has not spoken yet still
    counts (a new assignment must not let one checker eject a backend for everyone).
    """
    fresh: dict[str, bool] = {}
    silent: set[str] = set()
    for node, (ok, stale_at) in observations.items():
        if now >= stale_at:
            silent.add(node)
        else:
            fresh[node] = ok
    return cluster_verdict(fresh, [c for c in checkers if c not in silent])


def cluster_verdict(observations: Mapping[str, bool], checkers: Sequence[str]) -> bool | None:
    """Is the backend up, judging by its checkers' latest results (node id -> passed)?

    Down when a strict majority of the checkers say down (with 2 checkers, both must:
    one node with a bad network path must not eject a backend for everyone); up when at
    least one checker has spoken and they are not a majority for down; None when no
    checker has spoken yet. Observations from nodes that are not checkers are ignored
    (they are stale: left over from before the assignment changed).
    """
    spoken = [observations[node] for node in checkers if node in observations]
    if not spoken:
        return None
    down = sum(1 for ok in spoken if not ok)
    return not (2 * down > len(checkers))
