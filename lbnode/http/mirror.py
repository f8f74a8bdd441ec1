"""Request mirroring (a route's ``mirror``): a copy of a sampled share of the requests goes
to another pool, fire and forget.

Owns the copies' tasks (in a nursery of their own, started by the node beside its
listeners), their bound in flight per route, and their counters. A copy never delays or
fails the request it copies: ``submit`` only counts or starts a task and returns; the
copy's connect, send and read run on the mirror pool's timeouts in that task, and every
outcome (no backend, refused, slow, broken) is counted and dropped there.
"""

from __future__ import annotations

import logging
import socket as stdsocket
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import trio

from lbnode.balance import PickContext
from lbnode.http.framing import End, ParseError
from lbnode.http.headers import ResponseHead
from lbnode.http.upstream import UpstreamConn, UpstreamPool
from lbnode.logthrottle import LogThrottle
from lbnode.proxyaccept import header_for
from lbnode.routing import Mirror, Route
from lbnode.runtime import PoolRuntime, Snapshot
from lbnode.sockio import recv_within, send_all

log = logging.getLogger("lbnode.http.mirror")

RECV_SIZE = 64 * 1024
# Why a copy was not sent (the label values of fulcrum_mirror_dropped_total, all shown).
DROP_REASONS = ("full", "body", "no_pool", "stopped")


@dataclass
class MirrorStats:
    """One route's copies, read by /metrics at scrape time."""

    pool: str
    inflight: int = 0
    answered: int = 0  # the mirror backend's response was read to its end (any status)
    failed: int = 0  # no usable backend, connect error, timeout, broken response
    dropped: dict[str, int] = field(default_factory=lambda: dict.fromkeys(DROP_REASONS, 0))


class Mirrors:
    """A listener's mirrored copies. ``run`` must be going for copies to leave (until then,
    and after the node stopped it, they are dropped as ``stopped``)."""

    def __init__(self, snapshot: Callable[[], Snapshot], upstreams: UpstreamPool, routes: Sequence[Route] = ()) -> None:
        self._snapshot = snapshot
        self.upstreams = upstreams
        # By the route's name; node.toml's mirroring routes have counters from the start, a route
        # added through the store from its first copy.
        self.stats: dict[str, MirrorStats] = {
            r.name: MirrorStats(r.mirror.pool) for r in routes if r.mirror is not None}
        self._nursery: trio.Nursery | None = None
        self._logged = LogThrottle(window=10.0, burst=5)

    def attach(self, nursery: trio.Nursery) -> None:
        """Run the copies in ``nursery``: the node's, since copies outlive the connection they
        copy and the listener settings a reload replaces; cancelled when the node stops."""
        self._nursery = nursery

    def submit(self, route: str, mirror: Mirror, data: bytes | None, method: bytes, client_ip: str,
               client_sock: stdsocket.socket) -> None:
        """Copy a request (``data``: its head and whole body as sent to the real backend;
        None when its body is streamed, so not in hand) to ``mirror.pool``. Never waits."""
        stats = self.stats.get(route)
        if stats is None:
            stats = self.stats[route] = MirrorStats(mirror.pool)
        if data is None:
            stats.dropped["body"] += 1
            return
        nursery = self._nursery
        if nursery is None:
            stats.dropped["stopped"] += 1
            return
        if stats.inflight >= mirror.max_inflight:
            stats.dropped["full"] += 1
            return
        pool = self._snapshot().pools.get(mirror.pool)
        if pool is None:
            stats.dropped["no_pool"] += 1
            return
        preamble = b""
        if pool.spec.send_proxy is not None:
            try:
                preamble = header_for(pool.spec.send_proxy, client_sock)
            except OSError:  # the client has gone: its request is still copied, without it
                stats.dropped["stopped"] += 1
                return
        try:
            nursery.start_soon(self._copy, stats, pool, data, method, client_ip, preamble)
        except RuntimeError:  # the node's nursery has closed: it stopped
            stats.dropped["stopped"] += 1
            return
        stats.inflight += 1

    async def _copy(self, stats: MirrorStats, pool: PoolRuntime, data: bytes, method: bytes, client_ip: str,
                    preamble: bytes) -> None:
        up: UpstreamConn | None = None
        reusable = False
        try:
            spec = pool.spec
            backend = pool.choose(PickContext(client_ip=client_ip), trio.current_time())
            if backend is None:
                stats.failed += 1
                return
            key = backend.upstream_key if not preamble else f"{backend.upstream_key} mirror proxy {preamble.hex()}"
            if not preamble:
                up = self.upstreams.take(key, trio.current_time())
            if up is None:
                up = await self.upstreams.connect(backend.spec.address, spec.timeouts.connect, spec.tls, key, preamble)
            with trio.move_on_after(spec.timeouts.response) as scope:
                await send_all(up.sock, data, spec.timeouts.response)
                reusable = await _read_response(up, method, spec.timeouts.response)
            if scope.cancelled_caught:
                raise TimeoutError(f"no whole response within {spec.timeouts.response:g}s")
            stats.answered += 1
        except Exception as exc:  # noqa: BLE001 - a copy's failure of any kind must stay in its task
            # (it would otherwise end the nursery and the node with it): counted, logged sparingly.
            reusable = False
            stats.failed += 1
            left_out = self._logged.admit(stats.pool, trio.current_time())
            if left_out is not None:
                more = f" ({left_out} more not logged)" if left_out else ""
                log.info("mirror to pool %s: %s: %s%s", stats.pool, type(exc).__name__, exc, more)
        finally:
            stats.inflight -= 1
            if up is not None:
                if reusable and not preamble:
                    self.upstreams.give_back(up, trio.current_time(), pool.spec.max_idle_per_backend)
                else:
                    up.close()


async def _read_response(up: UpstreamConn, method: bytes, timeout: float) -> bool:
    """Read and drop the response; True if the connection can carry another request."""
    reader = up.response_reader(method)
    events = reader.events
    final: ResponseHead | None = None
    while True:
        while events:
            ev = events.popleft()
            if isinstance(ev, ResponseHead):
                if ev.status >= 200:
                    final = ev
            elif isinstance(ev, End):
                if final is not None:
                    return final.keep_alive and not reader.broken
            elif isinstance(ev, ParseError):
                raise ValueError(f"invalid response: {ev.reason}")
            elif not isinstance(ev, bytes):
                return False  # an upgrade: nothing more to read that matters
        data = await recv_within(up.sock, RECV_SIZE, timeout, expect_wait=final is None)
        if data is None:
            raise TimeoutError(f"no response within {timeout:g}s")
        if not data:
            if final is not None and final.content_length is None and not final.chunked:
                return False  # a close-delimited body ended
            raise ConnectionError("the backend closed the connection before its response ended")
        reader.feed(data)
