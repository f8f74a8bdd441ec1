"""One lbnode process: its listeners, admin endpoint, snapshot and lifecycle.

Owns the order of things: bind everything first (so a port in use is a clear
error before anything serves), serve, and on SIGTERM/SIGINT stop accepting,
let in-flight requests finish up to ``drain_timeout``, then return. Holds the
current ``Snapshot`` and swaps it whole when the configuration changes.
"""

from __future__ import annotations

import logging
import signal
import socket as stdsocket
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from lbnode import accesslog
from lbnode.admin.access import AdminAccess, load_access
from lbnode.admin.server import serve_admin
from lbnode.affinity import AffinityTable
from lbnode.cluster.affinity import ClusterAffinity
from lbnode.cluster.lastconfig import LastConfig, iso
from lbnode.cluster.membership import ClusterAgent
from lbnode.cluster.store import PoolStore
from lbnode.cluster.sync import StoreFollower
from lbnode.cluster.vips import VipClaimer
from lbnode.control.events import EventHub
from lbnode.health.checker import HealthChecker
from lbnode.health.state import Transition
from lbnode.http.proxy import HttpProxy
from lbnode.http.upstream import UpstreamPool
from lbnode.listen import (
    Bound,
    ConnectionGate,
    Handler,
    accept_loop,
    accept_pending,
    bind_tcp,
    set_vip_filter,
)
from lbnode.model import Config, Listener, Pool
from lbnode.runtime import Snapshot
from lbnode.tls.expiry_warnings import ExpiryWarnings

if TYPE_CHECKING:
    from lbnode.tls.terminate import Inner

log = logging.getLogger("lbnode")

# Served certificates are checked for expiry on every change and this often besides, so one
# that crosses into its last 14 days (or expires) while nothing changes is still reported.
EXPIRY_CHECK_INTERVAL = 3600.0


# How long start-up waits for the pool store's first read before serving without it. A
# healthy etcd answers in milliseconds (well under this on a loaded host), so a node
# restarted beside a working etcd serves its current pools from the first request; an
# etcd without quorum (after a power cut it may boot after the balancers) would hold a
# read up to 2 call deadlines (4 s) per attempt, and the node must not wait on that:
# past this bound it serves its cached configuration and follows the store once it answers.
FIRST_READ_WAIT = 1.0


@dataclass(frozen=True, slots=True)
class ConfigSource:
    """Where the pools being served came from, for ``/status`` and the log."""

    source: str  # "file" (node.toml), "store" (etcd or the standalone store), "cache" (state_dir)
    stale: bool  # the store could not be read: this may not be the cluster's configuration
    revision: int | None = None  # store revision (of the cache's save, for "cache")
    saved_at: float | None = None  # wall time the cache was written ("cache" only)
    path: str | None = None  # the cache file ("cache" only)

    def document(self) -> dict[str, object]:
        out: dict[str, object] = {"source": self.source, "stale": self.stale, "revision": self.revision}
        if self.saved_at is not None:
            out["saved_at"] = iso(self.saved_at)
            out["file"] = self.path
        return out


class LbNode:
    """One node. With a ``store`` its pools come from the store (etcd, or the standalone
    file store) and follow its changes; without one, from the config file alone."""

    def __init__(
        self,
        config: Config,
        store: PoolStore | None = None,
        agent: ClusterAgent | None = None,
        affinity: ClusterAffinity | None = None,
        *,
        seed: tuple[Pool, ...] = (),
        last_config: LastConfig | None = None,
    ) -> None:
        self.config = config
        self.store = store
        self._seed = seed  # pools created in the store if absent (a cluster node's node.toml pools)
        # The last configuration applied from the store, served at start while the store is down.
        self.last_config = last_config
        self.config_source = ConfigSource("file", stale=False) if store is None else ConfigSource("file", stale=True)
        # Cluster membership: which backends this node checks, and the others' verdicts.
        self.agent = agent
        # Affinity tables and cookie key shared through etcd (None: this node's own, in memory).
        self.affinity = affinity
        self._checked: dict[str, set[str]] = {}  # pool -> backend ids whose observations we publish
        self.events = EventHub()  # pool, backend health and node changes, for the control API's WatchEvents
        self.control_port: int | None = None
        self.vips: VipClaimer | None = None  # virtual IPs this node may hold ([[cluster.vips]])
        self.follower: StoreFollower | None = None
        self._snapshot = Snapshot.build(config, shared_affinity=affinity)
        # [node] max_connections: every listener's gate answers to this one (not admin, not control).
        self.connection_gate = ConnectionGate(config.node.max_connections)
        self._retain_affinity_tables()
        self.wall_clock: Callable[[], datetime] = lambda: datetime.now(UTC)  # certificate expiry
        self._expiry = ExpiryWarnings()
        self._draining = False
        self._stop = trio.Event()
        self.upstreams = UpstreamPool(
            max_idle=max((p.max_idle_per_backend for p in config.pools), default=128),
            idle_timeout=min((p.timeouts.idle for p in config.pools), default=60.0),
        )
        self.http_proxies: dict[str, HttpProxy] = {}
        self.tcp_proxies: dict[str, object] = {}
        self.tls_terminators: dict[str, Any] = {}  # listener -> TlsTerminator (https, tls)
        self.proxy_receivers: dict[str, Any] = {}  # listener -> ProxyHeaderReceiver ([listeners.proxy_protocol])
        self.connection_gates: dict[str, ConnectionGate] = {}  # listener -> its gate (connection counters)
        # [listeners.access_log]: each listener's buffer and counters, one writer per file (or stdout)
        self.access_logs, self.access_log_writers = accesslog.build(config.listeners)
        self.bound: Bound | None = None
        self.health_checkers: dict[str, HealthChecker] = {}
        self._checker_scopes: dict[str, trio.CancelScope] = {}
        self._health_nursery: trio.Nursery | None = None

    # --------------------------------------------------------------- state
    @property
    def snapshot(self) -> Snapshot:
        return self._snapshot

    @property
    def draining(self) -> bool:
        return self._draining

    def apply(self, config: Config) -> None:
        """Swap in a new configuration; connections in flight keep their backends."""
        self.config = config
        self._snapshot = Snapshot.build(config, self._snapshot, shared_affinity=self.affinity)
        self._retain_affinity_tables()
        self._sync_health()
        log.info("configuration version %d applied", self._snapshot.version)
        self._warn_expiring_certificates()

    def _warn_expiring_certificates(self) -> None:
        for line in self._expiry.check(self._snapshot.certificates.values(), self.wall_clock()):
            log.warning("%s", line)

    async def _check_certificate_expiry(self) -> None:
        while True:
            self._warn_expiring_certificates()
            await trio.sleep(EXPIRY_CHECK_INTERVAL)

    def _apply_from_store(self, config: Config) -> None:
        """The store answered: its pools replace whatever was served (node.toml's, or the cache)."""
        assert self.follower is not None
        if self.config_source.source == "cache":
            log.info("pool store answered: its configuration (revision %d) replaces the cached one",
                     self.follower.revision)
        self.config_source = ConfigSource("store", stale=False, revision=self.follower.revision)
        self.apply(config)

    def _serve_cached(self) -> None:
        """Start-up without the store: serve the last configuration applied from it, if any.

        node.toml's pools that are not in the cache are kept (they would have been seeded:
        a pool already in the store is left as it is)."""
        cached = self.last_config.load() if self.last_config is not None else None
        if cached is None:
            log.warning("pool store not readable at start and no cached configuration: serving the "
                        "config file's %d pools until it answers", len(self.config.pools))
            return
        pools = {r.pool.name: r.pool for r in cached.pools}
        for pool in self.config.pools:
            pools.setdefault(pool.name, pool)
        assert self.last_config is not None
        self.config_source = ConfigSource(
            "cache", stale=True, revision=cached.revision, saved_at=cached.saved_at, path=str(self.last_config.path)
        )
        log.warning("pool store not readable at start: serving the cached configuration %s (revision %d, "
                    "saved %s, %d pools); it may be stale until the store answers",
                    self.last_config.path, cached.revision, cached.saved_at_iso, len(cached.pools))
        # The store's certificates as cached, then node.toml's for the names it did not have
        # (as the follower merges them).
        certificates = [r.certificate for r in cached.certificates]
        cached_names = {c.name for c in certificates}
        certificates += [c for c in self.config.certificates if c.name not in cached_names]
        self.apply(replace(self.config, pools=tuple(pools[n] for n in sorted(pools)), certificates=tuple(certificates)))

    def _retain_affinity_tables(self) -> None:
        """Shared tables of pools removed (or no longer in a table mode) stop following etcd."""
        if self.affinity is None:
            return
        tables: list[AffinityTable] = []
        for pool in self._snapshot.pools.values():
            if pool.stickiness is not None and pool.stickiness.table is not None:
                tables.append(pool.stickiness.table)
        self.affinity.retain(tables)

    def stop(self) -> None:
        """Begin a graceful stop (what SIGTERM does)."""
        self._stop.set()

    def drain(self) -> list[str]:
        """``lbctl nodes drain``: the graceful stop (VIPs released first, then in-flight work
        finishes and the process exits 0); returns the VIPs held when it was asked."""
        held = sorted(self.vips.held) if self.vips is not None else []
        self.stop()
        return held

    # --------------------------------------------------------------- lifecycle
    async def run(self, *, handle_signals: bool = True, task_status: trio.TaskStatus[Bound] = trio.TASK_STATUS_IGNORED) -> None:
        config = self.config
        access = self._admin_access()
        sockets = []
        admin_sock = None
        try:
            for li in config.listeners:
                sockets.append((li, bind_tcp(li.bind, li.backlog, f"listener {li.name}")))
            admin_sock = bind_tcp(config.node.admin, 128, "node.admin") if config.node.admin else None
            for writer in self.access_log_writers:
                writer.open()
        except BaseException:
            for _, s in sockets:
                s.close()
            if admin_sock is not None:
                admin_sock.close()
            for writer in self.access_log_writers:
                writer.close()
            raise
        self.bound = Bound(
            listeners={li.name: s.getsockname()[:2] for li, s in sockets},
            admin=admin_sock.getsockname()[:2] if admin_sock is not None else None,
        )
        async with trio.open_nursery() as outer:
            if handle_signals:
                outer.start_soon(self._watch_signals, outer.cancel_scope)
            if self.agent is not None:
                self.agent.on_assignment_change(self._sync_health)
                self.agent.on_verdict(self._on_verdict)
                self.events.follow_cluster(self.agent)
                await outer.start(self.agent.run)
                if config.cluster is not None and config.cluster.vips:
                    self.vips = VipClaimer(config.cluster, config.node.id, self.agent.conn, self.agent)
                    self.vips.on_moved(self.events.vip_moved)
                    self.vips.on_moving(lambda out, in_: self._filter_moving_vips(out, in_, sockets))
                    await outer.start(self.vips.run)
            if self.affinity is not None:
                await outer.start(self.affinity.run)
            if self.store is not None:
                self.follower = StoreFollower(self.store, lambda: self.config, self._apply_from_store, seed=self._seed)
                self.events.follow(self.follower)
                if self.last_config is not None:
                    self.follower.on_applied(self.last_config.note)
                    outer.start_soon(self.last_config.run)
                outer.start_soon(self.follower.run)
                with trio.move_on_after(FIRST_READ_WAIT):
                    await self.follower.settled.wait()
                if not self.follower.synced.is_set():
                    self._serve_cached()
            if config.control is not None and self.store is not None:
                from lbnode.control.server import serve_control

                self.control_port = await outer.start(serve_control, config.control, self.store, self)
            if admin_sock is not None:
                outer.start_soon(serve_admin, admin_sock, self, access)
            outer.start_soon(self._check_certificate_expiry)
            access_log_scope = trio.CancelScope()
            if self.access_log_writers:
                outer.start_soon(self._run_access_logs, access_log_scope)
            self._health_nursery = outer
            self._sync_health()
            await self._serve_listeners(sockets, task_status)
            access_log_scope.cancel()
            await self._flush_access_logs()
            self.upstreams.close()
            log.info("stopped")
            outer.cancel_scope.cancel()

    async def _serve_listeners(
        self, sockets: list[tuple[Listener, stdsocket.socket]], task_status: trio.TaskStatus[Bound]
    ) -> None:
        """Accept on every listener until stopped, then drain: VIPs handed over first, the
        connections already queued taken, the sockets closed, in-flight work given
        ``drain_timeout``. A supervisor (``lbnode.supervisor``) hands the sockets to its
        workers instead; a worker (``lbnode.workers``) runs this on the sockets it received."""
        config = self.config
        assert self.bound is not None
        async with trio.open_nursery() as connections:
            accepting: list[tuple[stdsocket.socket, Handler, ConnectionGate]] = []
            async with trio.open_nursery() as accept_loops:
                for li, sock in sockets:
                    handler, gate = self._listener_handler(li)
                    accepting.append((sock, handler, gate))
                    accept_loops.start_soon(accept_loop, sock, handler, connections, gate, li.name)
                for li, _ in sockets:
                    log.info("listener %s: %s on %s -> pool %s", li.name, li.protocol, li.bind, li.pool)
                task_status.started(self.bound)
                await self._stop.wait()
                self._draining = True
                for proxy in self.http_proxies.values():
                    proxy.drain()  # idle keep-alive connections close now (before a VIP moves)
                await self._hand_over_vips()
                accept_loops.cancel_scope.cancel()
            for sock, handler, gate in accepting:
                await accept_pending(sock, handler, connections, gate)
            for _, sock in sockets:
                sock.close()
            drain = config.node.drain_timeout
            log.info("draining: no new connections; waiting up to %gs for requests in flight", drain)
            connections.cancel_scope.deadline = trio.current_time() + drain
        if connections.cancel_scope.cancelled_caught:
            log.warning("drain timeout: closed connections still in flight")

    async def _hand_over_vips(self) -> None:
        """Planned stop: hand the VIPs over first (make-before-break), so clients move before
        we drain. Meanwhile new connections to them are refused silently (their SYNs go
        again a second later, to the new holder); the accept loops go on for the handshakes
        already under way."""
        if self.vips is not None and self.vips.held:
            with trio.move_on_after(2 * self.vips.conn.timeout):
                await self.vips.release_all()

    def _listener_handler(self, li: Listener) -> tuple[Handler, ConnectionGate]:
        """One listener's connection handler and gate, registered for the admin endpoint's
        counters: the PROXY header receiver (outermost: the header comes before the TLS
        handshake and the ClientHello), then the TLS terminator, then HTTP or TCP."""
        assert self.bound is not None
        gate = ConnectionGate(li.max_connections, parent=self.connection_gate)
        self.connection_gates[li.name] = gate
        handler: Handler
        inner: Inner  # what a TLS listener's terminator calls after the handshake
        access_log = self.access_logs.get(li.name)
        if li.protocol in ("http", "https"):
            proxy = HttpProxy(li, self, port=self.bound.listeners[li.name][1], access_log=access_log)
            self.http_proxies[li.name] = proxy
            handler = inner = proxy.handle
        else:
            from lbnode.tcp.proxy import TcpProxy

            tcp = TcpProxy(li, self, access_log=access_log)
            self.tcp_proxies[li.name] = tcp
            handler = inner = tcp.handle
        if li.tls is not None:
            from lbnode.tls.terminate import TlsTerminator

            terminator = TlsTerminator(li, self, inner)
            self.tls_terminators[li.name] = terminator
            handler = terminator.handle
        if li.proxy_protocol is not None:
            from lbnode.proxyaccept import ProxyHeaderReceiver

            receiver = ProxyHeaderReceiver(li, handler)
            self.proxy_receivers[li.name] = receiver
            handler = receiver.handle
        return handler, gate

    def _admin_access(self) -> AdminAccess:
        """[admin]'s token and TLS context, read before anything binds (a file changed since
        the config was checked is one line, like every other config error)."""
        from lbnode.model import ConfigError, ConfigFileError

        try:
            return load_access(self.config.admin)
        except ConfigError as exc:
            raise ConfigFileError(str(exc)) from None

    @staticmethod
    def _filter_moving_vips(
        handing_off: frozenset[str], taking_over: frozenset[str], sockets: list[tuple[Listener, stdsocket.socket]]
    ) -> None:
        """While VIPs move, every listener drops what would break a connection (``set_vip_filter``)."""
        for li, sock in sockets:
            if sock.fileno() < 0:
                continue  # closed: the node has stopped
            try:
                set_vip_filter(sock, sorted(handing_off), sorted(taking_over))
            except OSError as exc:
                log.warning("listener %s: cannot filter the packets of moving VIPs (%s, %s): %s",
                            li.name, sorted(handing_off), sorted(taking_over), exc)

    # --------------------------------------------------------------- health
    def _sync_health(self) -> None:
        """One checker per pool with [pools.health], following pool changes."""
        if self._health_nursery is None:
            return
        wanted = {p.name: p for p in self.config.pools if p.health is not None}
        agent = self.agent
        for name in list(self.health_checkers):
            if name not in wanted:
                self._checker_scopes.pop(name).cancel()
                del self.health_checkers[name]
        if agent is not None:
            for name in list(self._checked):
                if name not in wanted:
                    agent.retract(name)
                    del self._checked[name]
        for name, pool in wanted.items():
            assert pool.health is not None
            # In a cluster each backend is checked by a few nodes only; the rest follow their verdict.
            mine = [b for b in pool.backends if agent is None or agent.assigned(name, b.id)]
            if agent is not None:
                ids = {b.id for b in mine}
                gone = self._checked.get(name, set()) - ids
                if gone:
                    agent.retract(name, gone)
                self._checked[name] = ids
                # The agent tells a verdict once, when it changes: one told before this pool
                # reached the node (it came from etcd a moment after the shared health) found
                # no backend then. Take what the cluster says now for those we do not check.
                for b in pool.backends:
                    if b.id not in ids:
                        up = agent.verdict(name, b.id)
                        if up is not None:
                            self._on_verdict(name, b.id, up, "the checkers' latest results, as the pool arrived")
            checker = self.health_checkers.get(name)
            if checker is not None:
                checker.tls, checker.send_proxy = pool.tls, pool.send_proxy
                checker.update(mine, pool.health)
                continue
            on_observation = (
                (lambda o, n=name: agent.publish(o, n, period=self._check_period(n))) if agent is not None else _ignore
            )
            checker = HealthChecker(
                name, pool.health, mine, on_transition=self._transition_for(name), on_observation=on_observation,
                tls=pool.tls, send_proxy=pool.send_proxy,
            )
            scope = trio.CancelScope()
            self.health_checkers[name] = checker
            self._checker_scopes[name] = scope
            self._health_nursery.start_soon(self._run_checker, checker, scope)

    def _check_period(self, pool_name: str) -> float:
        """The longest a live checker of this pool goes without a result: interval (with jitter) + timeout."""
        pool = self._snapshot.pools.get(pool_name)
        health = pool.spec.health if pool is not None else None
        return health.interval * (1 + health.jitter) + health.timeout if health is not None else 0.0

    def _transition_for(self, pool_name: str) -> Callable[[str, Transition], None]:
        def on_transition(backend_id: str, t: Transition) -> None:
            pool = self._snapshot.pools.get(pool_name)
            if pool is not None:
                pool.health_changed(backend_id, t.new, t.reason, t.at)
            self.events.backend_health(pool_name, backend_id, t)

        return on_transition

    def _on_verdict(self, pool_name: str, backend_id: str, up: bool, reason: str) -> None:
        """The cluster's verdict on a backend this node does not check itself."""
        pool = self._snapshot.pools.get(pool_name)
        if pool is None:
            return
        new = "up" if up else "down"
        for b in pool.backends:
            if b.id == backend_id and b.health != new:  # a repeated "up" would restart slow start
                old = b.health
                log.info("pool %s backend %s %s -> %s (cluster verdict: %s)", pool_name, backend_id, old, new, reason)
                pool.health_changed(backend_id, new, reason, trio.current_time())
                self.events.cluster_health(pool_name, backend_id, old, new, reason)

    @staticmethod
    async def _run_checker(checker: HealthChecker, scope: trio.CancelScope) -> None:
        with scope:
            await checker.run()

    # --------------------------------------------------------------- access log
    async def _run_access_logs(self, scope: trio.CancelScope) -> None:
        with scope:
            async with trio.open_nursery() as writers:
                for writer in self.access_log_writers:
                    writers.start_soon(writer.run)

    async def _flush_access_logs(self) -> None:
        """At the end: what the listeners still buffer is written (within a bound), files closed."""
        with trio.move_on_after(accesslog.FINAL_FLUSH_TIMEOUT) as scope:
            for writer in self.access_log_writers:
                await writer.flush()
        if scope.cancelled_caught:
            log.warning("access log: the last entries were not written within %gs (a stdout nobody reads?)",
                        accesslog.FINAL_FLUSH_TIMEOUT)
        else:
            for writer in self.access_log_writers:
                writer.close()

    def reopen_access_logs(self) -> int:
        """SIGUSR1 (logrotate's postrotate): every access log file is opened again by its name."""
        files = [w for w in self.access_log_writers if not w.to_stdout]
        for writer in files:
            writer.reopen()
        return len(files)

    async def _watch_signals(self, everything: trio.CancelScope) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGUSR1) as signals:
            async for signum in signals:
                if signum == signal.SIGUSR1:
                    # Caught even without an access log file: its default action would kill the node.
                    n = self.reopen_access_logs()
                    log.info("SIGUSR1: reopening %d access log file(s)", n)
                    continue
                if not self._stop.is_set():
                    log.info("%s: stopping gracefully", signal.Signals(signum).name)
                    self.stop()
                else:
                    log.warning("%s again: stopping now", signal.Signals(signum).name)
                    everything.cancel()
                    return


def _ignore(*args: object) -> None:
    pass


def node_from_config(config: Config, kind: type[LbNode] = LbNode) -> LbNode:
    """The node ``lbnode run`` serves: standalone, or a cluster member when [cluster] is set.

    In a cluster the pools live in etcd; the pools of node.toml seed it (a pool
    already in etcd is left as it is). Each configuration applied from etcd is
    cached in state_dir; with etcd unreachable at start the node serves that cache
    (or, without one, the file's pools) and follows etcd once it answers.
    Affinity tables and the generated cookie key are shared through etcd too.
    ``kind``: ``LbNode``, or ``lbnode.supervisor.Supervisor`` for ``[node] workers`` >= 2.
    """
    if config.cluster is None:
        if config.control is None:
            return kind(config)
        # Standalone with a control API: changes persist in state_dir; node.toml seeds it once.
        from lbnode.cluster.filestore import FileStore

        return kind(config, store=FileStore(Path(config.node.state_dir), config.pools))
    from lbnode.cluster.etcd import EtcdStore, connect
    from lbnode.model import ConfigError, ConfigFileError

    try:
        connection = connect(config.cluster)
    except ConfigError as exc:  # a certificate file changed since the config was loaded
        raise ConfigFileError(str(exc)) from None
    store = EtcdStore(config.cluster, connection=connection)
    info: dict[str, object] = {
        "addresses": [str(li.bind) for li in config.listeners],
        # who we are beyond the id: a restart of this node is told from another node with our id
        "host": stdsocket.gethostname(),
        "state_dir": str(Path(config.node.state_dir).resolve()),
    }
    if config.control is not None:
        info["control"] = str(config.control.bind)
    agent = ClusterAgent(config.cluster, config.node.id, info, connection=connection)
    affinity = ClusterAffinity(config.cluster, config.node.id, Path(config.node.state_dir), connection=connection)
    return kind(
        config, store=store, agent=agent, affinity=affinity,
        seed=config.pools, last_config=LastConfig(Path(config.node.state_dir), prefix=config.cluster.prefix),
    )
