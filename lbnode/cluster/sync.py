"""Following a pool store: every change of a pool, a certificate or a route becomes a new snapshot on this node.

Owns the one-way flow store -> node: for pools, certificates and routes each, a
first full read, then a watch run in one thread that hands events to Trio
through a memory channel. The data plane never waits on it: while the store is
unreachable the node serves on its last snapshot, logs once, and retries with
backoff (static stability). Never logs a private key. A cluster node's
node.toml pools and routes seed the store here, in the same thread as the first read.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import replace
from typing import Any

import trio

from lbnode.cluster.store import (
    AlreadyExists,
    CertificateEvent,
    CertificateRecord,
    CertificateResync,
    PoolEvent,
    PoolRecord,
    PoolStore,
    Resync,
    RouteEvent,
    RouteRecord,
    RouteResync,
    StopFlag,
    StoreError,
)
from lbnode.cluster.watch import follow_watch
from lbnode.model import Config, Listener, Pool
from lbnode.routing import Route
from lbnode.tls.certs import Certificate

log = logging.getLogger("lbnode.cluster")

AppliedCallback = Callable[
    [Mapping[str, PoolRecord], int, Mapping[str, CertificateRecord], "Mapping[tuple[str, str], RouteRecord] | None"],
    None,
]
RouteCallback = Callable[[str, str, RouteRecord | None, RouteRecord | None], None]
CertificateCallback = Callable[[str, CertificateRecord | None, CertificateRecord | None], None]

# Retry delays after the store failed: short first, never hammering a sick etcd.
BACKOFF_FIRST = 0.2
BACKOFF_MAX = 5.0
# How often the follower reads the store's newest pool revision to see whether its watch
# lags: one keys-only read of one key a second per node. It is also the lag's resolution.
LAG_CHECK = 1.0


class WatchLag:
    """How long this node has been behind the newest pool write it knows the store has.

    A watch normally delivers a write within milliseconds; one that is stuck (a wedged
    stream, a thread starved of the GIL) leaves the node serving an old configuration
    while every read of the store still works, so ``etcd reachable`` stays 1. A periodic
    read of the store's newest revision finds it: from the first read that shows a
    revision above the applied one until the node applies it, the node lags. Pure: ``now``
    is passed in; the lag is measured from that first read, so it is short by at most
    one check interval.
    """

    __slots__ = ("store_revision", "_behind_since")

    def __init__(self) -> None:
        self.store_revision = 0  # the newest pool revision read from the store
        self._behind_since: float | None = None

    def observed(self, store_revision: int, applied: int, now: float) -> None:
        """A read of the store found ``store_revision``; the node has applied ``applied``."""
        self.store_revision = max(self.store_revision, store_revision)
        self.caught_up(applied)
        if applied < self.store_revision and self._behind_since is None:
            self._behind_since = now

    def caught_up(self, applied: int) -> None:
        """The node applied up to ``applied``."""
        if applied >= self.store_revision:
            self._behind_since = None

    def seconds(self, now: float) -> float:
        return 0.0 if self._behind_since is None else max(0.0, now - self._behind_since)


class StoreFollower:
    """Keeps ``apply(config)`` fed with the store's pools and certificates.

    ``revision`` is the last pool revision applied (what ``lbctl status`` shows);
    ``certificate_revision`` the last certificate one. A certificate in the store
    wins over node.toml's ``[[certificates]]`` entry of the same name; node.toml's
    stay for the names the store does not have. Routes: once the store's routes were read,
    they are every listener's routes (node.toml's only seed the store); before, the
    listeners keep the routes they have (node.toml's, or the cache's).
    """

    def __init__(
        self,
        store: PoolStore,
        base: Callable[[], Config],
        apply: Callable[[Config], None],
        *,
        seed: Sequence[Pool] = (),
        seed_routes: Sequence[tuple[str, Route]] = (),
    ) -> None:
        self.store = store
        self._base = base  # the node's config (listeners, node settings) to put the pools into
        self._apply = apply
        # Pools created in the store if absent, before the first read (a pool already there
        # is left as it is); retried with the read until the store answers.
        self._seed: Sequence[Pool] | None = seed or None
        self._seed_routes: Sequence[tuple[str, Route]] | None = seed_routes or None
        self.pools: dict[str, PoolRecord] = {}
        self.revision = 0
        self.certificates: dict[str, CertificateRecord] = {}
        self.certificate_revision = 0
        # None until the store's routes were read once (the listeners keep theirs until then).
        self.routes: dict[tuple[str, str], RouteRecord] | None = None
        self.route_revision = 0
        self._logged_orphans: set[tuple[str, str]] = set()
        self.lag = WatchLag()  # read by /metrics
        self._clock = trio.current_time
        # node.toml's certificates, taken now: base() later returns the applied config,
        # which holds the store's certificates too.
        self.file_certificates: tuple[Certificate, ...] = base().certificates
        # Set after the first full read of pools: nothing is applied before it (a certificate
        # read that wins the race must not replace the cached or file pools with none).
        self.synced = trio.Event()
        # Set once the first read of pools and the first of certificates each succeeded or
        # failed: a node starting beside its store serves both from its first connection.
        self.settled = trio.Event()
        self._settled: set[str] = set()
        self._failing: set[str] = set()  # "pool", "certificate", "route": what the store did not answer lately
        self._on_change: list[Callable[[str, PoolRecord | None], None]] = []
        self._on_certificate: list[CertificateCallback] = []
        self._on_route: list[RouteCallback] = []
        self._on_applied: list[AppliedCallback] = []

    def watch_lag(self) -> float:
        """Seconds this node has been behind a pool write the store has (WatchLag), now."""
        return self.lag.seconds(self._clock())

    @property
    def failing(self) -> bool:
        """The store could not be read or watched, and has not answered since."""
        return bool(self._failing)

    def subscribe(self, callback: Callable[[str, PoolRecord | None], None]) -> None:
        """``callback(name, record)`` after each applied pool change (None: deleted)."""
        self._on_change.append(callback)

    def on_applied(self, callback: AppliedCallback) -> None:
        """``callback(pools, revision, certificates, routes)`` after each configuration applied from the
        store (``routes`` None until the store's routes were read once)."""
        self._on_applied.append(callback)

    def subscribe_routes(self, callback: RouteCallback) -> None:
        """``callback(listener, name, old, new)`` after each applied route change (new None: deleted)."""
        self._on_route.append(callback)

    def subscribe_certificates(self, callback: CertificateCallback) -> None:
        """``callback(name, old, new)`` after each applied change of a store certificate (new None: deleted)."""
        self._on_certificate.append(callback)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Follow pools and certificates; ``started`` once both were read (or failed) once."""
        async with trio.open_nursery() as nursery:
            await nursery.start(
                self._follow, "pool", self._seed_and_list,
                lambda stop: self.store.watch_pools(self.revision, stop), self._replace_pools, self._on_pool_event,
            )
            certs = self.store.certificates
            await nursery.start(
                self._follow, "certificate", certs.list_certificates,
                lambda stop: certs.watch_certificates(self.certificate_revision, stop),
                self._replace_certificates, self._on_certificate_event,
            )
            routes = self.store.routes
            await nursery.start(
                self._follow, "route", self._seed_and_list_routes,
                lambda stop: routes.watch_routes(self.route_revision, stop),
                self._replace_routes, self._on_route_event,
            )
            nursery.start_soon(self._check_lag)
            task_status.started()

    async def _check_lag(self) -> None:
        """Every LAG_CHECK, compare the store's newest pool revision with the applied one."""
        while True:
            await trio.sleep(LAG_CHECK)
            if not self.synced.is_set():
                continue  # nothing applied from the store yet: `failing` tells that story
            try:
                latest = await trio.to_thread.run_sync(self.store.latest_pool_revision, abandon_on_cancel=True)
            except StoreError:
                continue  # the watch's own retries log and mark the store failing
            self.lag.observed(latest, self.revision, self._clock())

    async def _follow(
        self,
        what: str,
        read: Callable[[], tuple[list[Any], int]],
        watch: Callable[[StopFlag], Iterable[Any]],
        replace_all: Callable[[list[Any], int], None],
        on_event: Callable[[Any], None],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        started = False
        delay = BACKOFF_FIRST
        failing = False
        while True:
            try:
                records, revision = await trio.to_thread.run_sync(read, abandon_on_cancel=True)
                replace_all(records, revision)
                if failing:
                    log.info("%s store reachable again; following changes from revision %d", what, revision)
                failing, delay = False, BACKOFF_FIRST
                self._failing.discard(what)
                if not started:
                    started = True
                    self._settle(what)
                    task_status.started()
                await follow_watch(watch, on_event)
            except StoreError as exc:
                if not failing:
                    if self.synced.is_set():
                        log.warning("%s store unavailable (%s); serving the last configuration", what, exc)
                    else:
                        log.warning("%s store unavailable at start (%s); following it once it answers", what, exc)
                    failing = True
                self._failing.add(what)
                if not started:
                    started = True
                    self._settle(what)
                    task_status.started()
            await trio.sleep(delay)
            delay = min(delay * 2, BACKOFF_MAX)

    def _settle(self, what: str) -> None:
        self._settled.add(what)
        if self._settled >= {"pool", "certificate", "route"}:
            self.settled.set()

    # ------------------------------------------------------------------ pools
    def _seed_and_list(self) -> tuple[list[PoolRecord], int]:
        """In a worker thread: seed (once it works), then read every pool."""
        if self._seed is not None:
            for pool in self._seed:
                try:
                    self.store.create_pool(pool)
                except AlreadyExists:
                    pass
            self._seed = None
        return self.store.list_pools()

    def _on_pool_event(self, event: PoolEvent | Resync) -> None:
        if isinstance(event, Resync):
            self._replace_pools(list(event.records), event.revision)
        else:
            self._pool_change(event)

    def _replace_pools(self, records: list[PoolRecord], revision: int) -> None:
        old = self.pools
        self.pools = {r.pool.name: r for r in records}
        self.revision = revision
        self.lag.caught_up(revision)
        self.synced.set()
        self._push()
        for name in set(old) | set(self.pools):
            if old.get(name) != self.pools.get(name):
                self._notify(name, self.pools.get(name))

    def _pool_change(self, event: PoolEvent) -> None:
        if event.record is None:
            self.pools.pop(event.name, None)
        else:
            self.pools[event.name] = event.record
        self.revision = max(self.revision, event.revision)
        self.lag.caught_up(self.revision)
        self._push()
        self._notify(event.name, event.record)

    # ------------------------------------------------------------------ certificates
    def _on_certificate_event(self, event: CertificateEvent | CertificateResync) -> None:
        if isinstance(event, CertificateResync):
            self._replace_certificates(list(event.records), event.revision)
            return
        old = self.certificates.get(event.name)
        if event.record is None:
            self.certificates.pop(event.name, None)
        else:
            self.certificates[event.name] = event.record
        self.certificate_revision = max(self.certificate_revision, event.revision)
        self._push()
        self._certificate_changed(event.name, old, event.record)

    def _replace_certificates(self, records: list[CertificateRecord], revision: int) -> None:
        old = self.certificates
        self.certificates = {r.certificate.name: r for r in records}
        self.certificate_revision = revision
        self._push()
        for name in sorted(set(old) | set(self.certificates)):
            before, after = old.get(name), self.certificates.get(name)
            if (before and before.certificate) != (after and after.certificate):
                self._certificate_changed(name, before, after)

    def _certificate_changed(self, name: str, old: CertificateRecord | None, new: CertificateRecord | None) -> None:
        _log_certificate_change(name, old, new, self._file_certificate(name))
        for callback in self._on_certificate:
            callback(name, old, new)

    def _file_certificate(self, name: str) -> Certificate | None:
        return next((c for c in self.file_certificates if c.name == name), None)

    def merged_certificates(self) -> tuple[Certificate, ...]:
        """The store's certificates, then node.toml's for the names the store does not have."""
        from_store = [r.certificate for _, r in sorted(self.certificates.items())]
        return (*from_store, *(c for c in self.file_certificates if c.name not in self.certificates))

    # ------------------------------------------------------------------ routes
    def _seed_and_list_routes(self) -> tuple[list[RouteRecord], int]:
        """In a worker thread: node.toml's routes created if absent (once it works), then every route."""
        if self._seed_routes is not None:
            for listener, route in self._seed_routes:
                try:
                    self.store.routes.put_route(listener, route, 0)
                except AlreadyExists:
                    pass
            self._seed_routes = None
        return self.store.routes.list_routes()

    def _on_route_event(self, event: RouteEvent | RouteResync) -> None:
        if isinstance(event, RouteResync):
            self._replace_routes(list(event.records), event.revision)
            return
        routes = dict(self.routes or {})
        old = routes.get((event.listener, event.name))
        if event.record is None:
            routes.pop((event.listener, event.name), None)
        else:
            routes[(event.listener, event.name)] = event.record
        self.routes = routes
        self.route_revision = max(self.route_revision, event.revision)
        self._push()
        for callback in self._on_route:
            callback(event.listener, event.name, old, event.record)

    def _replace_routes(self, records: list[RouteRecord], revision: int) -> None:
        old = self.routes or {}
        self.routes = {r.key: r for r in records}
        self.route_revision = revision
        self._push()
        for key in sorted(set(old) | set(self.routes)):
            before, after = old.get(key), self.routes.get(key)
            if (before and before.route.spec) != (after and after.route.spec):
                for callback in self._on_route:
                    callback(key[0], key[1], before, after)

    def with_routes(self, listeners: Sequence[Listener]) -> tuple[Listener, ...]:
        """``listeners`` with the store's routes (as they are before the first read of routes).

        An L7 listener gets its routes whole, as a new tuple: the snapshot compiles a new
        table for it and swaps it in with the rest. Routes of a listener this node does not
        have (or that is not http/https) are logged once and left out."""
        if self.routes is None:
            return tuple(listeners)
        by_listener: dict[str, list[Route]] = {}
        for (listener, _), record in sorted(self.routes.items()):
            by_listener.setdefault(listener, []).append(record.route)
        l7 = {li.name for li in listeners if li.protocol in ("http", "https")}
        for key in sorted(self.routes):
            if key[0] not in l7 and key not in self._logged_orphans:
                self._logged_orphans.add(key)
                log.warning('route "%s" of listener "%s" is in the store, but this node has no http or https '
                            "listener of that name: not served here", key[1], key[0])
        return tuple(
            replace(li, routes=tuple(by_listener.get(li.name, ()))) if li.name in l7 else li for li in listeners
        )

    # ------------------------------------------------------------------ all
    def _push(self) -> None:
        if not self.synced.is_set():
            return  # certificates and routes read before the pools wait for them (see synced)
        pools: tuple[Pool, ...] = tuple(r.pool for _, r in sorted(self.pools.items()))
        base = self._base()
        self._apply(replace(base, pools=pools, certificates=self.merged_certificates(),
                            listeners=self.with_routes(base.listeners)))
        for callback in self._on_applied:
            callback(self.pools, self.revision, self.certificates, self.routes)

    def _notify(self, name: str, record: PoolRecord | None) -> None:
        for callback in self._on_change:
            callback(name, record)


def _log_certificate_change(
    name: str, old: CertificateRecord | None, new: CertificateRecord | None, from_file: Certificate | None
) -> None:
    """One line per certificate this node starts serving, rotates or drops (never the key)."""
    if new is None:
        fallback = "node.toml's [[certificates]] entry again" if from_file is not None else "nothing: handshakes that need it fail"
        log.info("certificate %s deleted from the store; serving %s", name, fallback)
        return
    cert = new.certificate
    verb = "rotated" if old is not None else "added"
    log.info(
        "certificate %s %s (store revision %d): %s, %s, not after %s, sha256 %s",
        name, verb, new.revision, ", ".join(cert.names), cert.key_type, cert.not_after.isoformat(), cert.fingerprint,
    )
