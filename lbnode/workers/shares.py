"""Each worker's share of a node's limits: pure, no I/O.

A user configures one node; with N workers each enforces ``ceil(limit / N)`` of every count
limit (a backend's ``max_inflight`` and ``max_connections``, a pool's ``max_queue``, a
listener's and the node's ``max_connections``) and ``1/N`` of every rate (a listener's
``rate_limit``: rate / N, burst ceil(burst / N)). Summed over the workers a count limit is
then at most ``limit + N - 1``; and a worker never borrows another's spare share, so the
node may hold less than the limit while one worker is full (documented in
docs/configuration.md, "Limits with several workers"). The retry budget is a percentage of
each worker's own requests, so it needs no share.
"""

from __future__ import annotations

import math
from dataclasses import replace

from lbnode.model import Backend, Config, Listener, Pool


def share(limit: int | None, workers: int) -> int | None:
    return None if limit is None else max(1, math.ceil(limit / workers))


def _backend(b: Backend, n: int) -> Backend:
    if b.max_inflight is None and b.max_connections is None:
        return b
    return replace(b, max_inflight=share(b.max_inflight, n), max_connections=share(b.max_connections, n))


def _pool(p: Pool, n: int) -> Pool:
    return replace(p, backends=tuple(_backend(b, n) for b in p.backends), max_queue=math.ceil(p.max_queue / n))


def _listener(li: Listener, n: int) -> Listener:
    rate_limit = li.rate_limit
    if rate_limit is not None:
        rate_limit = replace(rate_limit, rate=rate_limit.rate / n, burst=share(rate_limit.burst, n) or 1)
    return replace(li, max_connections=share(li.max_connections, n), rate_limit=rate_limit)


def worker_config(config: Config, workers: int) -> Config:
    """The configuration one of ``workers`` workers enforces (itself when ``workers`` is 1)."""
    if workers <= 1:
        return config
    return replace(
        config,
        node=replace(config.node, max_connections=share(config.node.max_connections, workers)),
        pools=tuple(_pool(p, workers) for p in config.pools),
        listeners=tuple(_listener(li, workers) for li in config.listeners),
    )
