"""One lbnode process: its listeners, admin endpoint, snapshot and lifecycle.

Owns the order of things: bind everything first (so a port in use is a clear
error before anything serves), serve, and on SIGTERM/SIGINT stop accepting,
let in-flight requests finish up to ``drain_timeout``, then return. Holds the
current ``Snapshot`` and swaps it whole when the configuration changes.
"""

from __future__ import annotations

import logging
import os
import signal
import socket as stdsocket
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import trio

from lbnode import accesslog, stopsignals
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
from lbnode.http2.exchange import H2Transport
from lbnode.listen import (
    BindError,
    Bound,
    ConnectionGate,
    Handler,
    bind_tcp,
    set_vip_filter,
)
from lbnode.listeners import ListenerSet, ListenerSlot
from lbnode.model import Config, ConfigFileError, ControlSettings, Listener, Pool, listener_routes
from lbnode.reloadplan import ReloadPlan, ReloadRefused, plan_reload, socket_key
from lbnode.routing import Route
from lbnode.runtime import Snapshot
from lbnode.tls.expiry_warnings import ExpiryWarnings
from lbnode.trioloop import fast_instruments

if TYPE_CHECKING:
    from lbnode.cluster.ticketkey import ClusterTicketKey  # (imported when used: it loads ctypes)
    from lbnode.handover import CommandConn, CommandSocket, Takeover
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

# After a takeover, how long the old process still answers the admin connections it accepted
# before the new process took the socket: a request already sent arrives within milliseconds
# (2 s leaves room for a busy host); a client silent longer is closed, so that the old
# process's drain is not held for the admin endpoint's READ_TIMEOUT (10 s).
ADMIN_HANDOVER_GRACE = 2.0


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
        seed_routes: tuple[tuple[str, Route], ...] = (),
        last_config: LastConfig | None = None,
    ) -> None:
        self.config = config
        self.store = store
        self._seed = seed  # pools created in the store if absent (a cluster node's node.toml pools)
        self._seed_routes = seed_routes  # and routes (listener, route): node.toml's [[listeners.routes]]
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
        self.ticket_key: bytes | None = None  # shared session ticket key (use_ticket_key)
        self.ticket_keys: ClusterTicketKey | None = None  # the cluster's, followed once a TLS listener exists
        self.proxy_receivers: dict[str, Any] = {}  # listener -> ProxyHeaderReceiver ([listeners.proxy_protocol])
        self.connection_gates: dict[str, ConnectionGate] = {}  # listener -> its gate (connection counters)
        # [listeners.access_log]: each listener's buffer and counters, one writer per file (or stdout)
        self.access_logs, self.access_log_writers = accesslog.build(config.listeners)
        self.bound: Bound | None = None
        # the listening sockets from before they are served: a VIP filter set while the cluster
        # starts (a takeover's dropped VIP is released at once) goes on them (_filter_moving_vips)
        self._sockets_at_start: list[tuple[Listener, stdsocket.socket]] = []
        # Each listening socket and the handler accepting on it (changed by reloads).
        self.listeners = ListenerSet(self._listener_parts, self.connection_gate, lambda: self.config.node.drain_timeout)
        self.config_path: Path | None = None  # node.toml, read again by SIGHUP
        self.command_socket: CommandSocket | None = None  # state_dir/lbnode.sock (lbnode run)
        self.takeover: Takeover | None = None  # the running node whose sockets this one takes
        self._admin_scope = trio.CancelScope()  # the admin endpoint, its connections too
        self._admin_accepting = trio.CancelScope()  # its accept loop only
        self._admin_done = trio.Event()
        self._control_scope: trio.CancelScope | None = None
        self._control_stopped = trio.Event()
        self.state_lock: IO[str] | None = None  # state_dir/lock, held open (lbnode run): handed over by a takeover
        self._admin_sock: stdsocket.socket | None = None
        self._handed_over = False  # a new process serves our sockets: drain without closing idle ones
        # One change of the listener set at a time (docs/reload.md "A reload during a takeover"):
        # reloads wait for each other; a reload is refused during a takeover and a takeover
        # during a reload, naming what is in progress.
        self._reload_lock = trio.Lock()
        self._taking_over: str | None = None  # "lbnode pid N": the new process taking our sockets
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
        snapshot = Snapshot.build(config, self._snapshot, shared_affinity=self.affinity)  # may raise: nothing changed
        self.config, self._snapshot = config, snapshot
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
        listeners = self.config.listeners
        if cached.routes is not None:  # the store's routes as cached replace node.toml's (they seeded it)
            by_listener: dict[str, list[Route]] = {}
            for record in cached.routes:
                by_listener.setdefault(record.listener, []).append(record.route)
            listeners = tuple(replace(li, routes=tuple(by_listener.get(li.name, ())))
                              if li.protocol in ("http", "https") else li for li in listeners)
        self.apply(replace(self.config, pools=tuple(pools[n] for n in sorted(pools)), certificates=tuple(certificates),
                           listeners=listeners))

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

    # --------------------------------------------------------------- reload
    def reload(self, new: Config) -> str:
        """Apply a new node.toml to the running node, all or nothing; the one-line summary.

        Listeners added (bound first: a port in use refuses the whole reload), changed (same
        socket, new handler; connections in flight finish on the old one) and removed (stop
        accepting, finish up to drain_timeout, close). Pools and certificates of a node
        without a store are replaced; with a store (cluster, [control]) they stay the
        store's. Raises ``ReloadRefused`` with one line: the node goes on as it was.
        A supervisor (``lbnode.supervisor``) carries the same plan out through its workers."""
        plan, bound, new, pools_note = self._prepare_reload(new)
        try:
            self.apply(new)
        except Exception:
            for _, sock in bound:
                sock.close()
            raise
        self._take_plan(new, plan, bound)
        if self._health_nursery is not None:
            self._share_ticket_keys(self._health_nursery)  # (a first TLS listener added)
        summary = f"reloaded: {plan.summary()}; {len(new.pools)} pools{pools_note}"
        log.info("%s", summary)
        return summary

    def _prepare_reload(self, new: Config) -> tuple[ReloadPlan, list[tuple[Listener, stdsocket.socket]], Config, str]:
        """What a reload does before anything changes: the plan (refused for what needs a
        restart), the added listeners' sockets bound (a port in use refuses it all), and the
        configuration to apply (a store's pools stay); the note for the summary line."""
        if not self._accepting():
            raise ReloadRefused("the node is not serving (starting or draining)")
        plan = plan_reload(self.config, new)
        bound: list[tuple[Listener, stdsocket.socket]] = []
        try:
            for li in plan.added:
                bound.append((li, bind_tcp(li.bind, li.backlog, f"listener {li.name}")))
        except BindError as exc:
            for _, sock in bound:
                sock.close()
            raise ReloadRefused(str(exc)) from None
        pools_note = ""
        if self.store is not None:
            # The store owns the pools: node.toml's only seeded it at the first start.
            certificates = self.config.certificates
            if self.follower is not None:
                self.follower.file_certificates = new.certificates
                certificates = self.follower.merged_certificates() if self.follower.synced.is_set() else new.certificates
            new = replace(new, pools=self.config.pools, certificates=certificates)
            pools_note = "; pools stay the store's (node.toml's pools only seed it: lbctl changes them)"
        return plan, bound, new, pools_note

    def _take_plan(self, new: Config, plan: ReloadPlan, bound: list[tuple[Listener, stdsocket.socket]]) -> None:
        """The applied configuration's node limits, and its listeners on this process's sockets
        (a worker runs this with the sockets its supervisor bound)."""
        self.connection_gate.set_limit(new.node.max_connections)
        self.upstreams.max_idle = max((p.max_idle_per_backend for p in new.pools), default=128)
        self.upstreams.idle_timeout = min((p.timeouts.idle for p in new.pools), default=60.0)
        self._apply_plan(plan, bound)

    def _accepting(self) -> bool:
        """Serving, neither starting nor draining: what a reload and a takeover need."""
        return self.listeners.nursery is not None and not self._draining

    def _apply_plan(self, plan: ReloadPlan, bound: list[tuple[Listener, stdsocket.socket]]) -> None:
        changed = {name: li for name, li in plan.changed}
        for key, slot in list(self.listeners.slots.items()):
            name = slot.listener.name
            if name in plan.removed:
                log.info("listener %s: removed; no new connections on %s, finishing those in flight",
                         name, slot.listener.bind)
                self.listeners.stop(key)
                self._stop_registries(name)
        for key, slot in list(self.listeners.slots.items()):
            li = changed.get(slot.listener.name)
            if li is not None:
                if li.name != slot.listener.name:
                    self._stop_registries(slot.listener.name)
                self.listeners.swap(key, li)
                log.info("listener %s: new settings on %s (connections in flight finish on the previous ones)",
                         li.name, li.bind)
        for li, sock in bound:
            self.listeners.serve(li, sock)
            log.info("listener %s: %s on %s -> pool %s", li.name, li.protocol, li.bind, li.pool)

    def _stop_registries(self, name: str) -> None:
        """A removed or renamed listener's counters leave the admin endpoint under its old name."""
        if self.bound is not None:
            self.bound.listeners.pop(name, None)
        for registry in (self.http_proxies, self.tcp_proxies, self.tls_terminators, self.proxy_receivers,
                         self.connection_gates):
            registry.pop(name, None)

    async def reload_file(self, path: Path) -> str:
        """Read ``path`` and ``reload`` it; an unreadable or invalid file is a ``ReloadRefused``."""
        from lbnode.config import load_config

        try:
            new = await trio.to_thread.run_sync(load_config, path)
        except ConfigFileError as exc:
            raise ReloadRefused(str(exc)) from None
        return self.reload(new)

    async def reload_one_at_a_time(self, path: Path) -> str:
        """``lbnode reload`` and SIGHUP: ``reload_file``, refused while a takeover is in progress
        (its sockets are being handed over: a reload would close one the new process is being
        given, or change the set it was given) and after any other reload still running."""
        self._refuse_during_takeover()
        async with self._reload_lock:
            self._refuse_during_takeover()  # a takeover may have begun while this one waited
            return await self.reload_file(path)

    def _refuse_during_takeover(self) -> None:
        if self._taking_over is not None and self._handed_over:
            raise ReloadRefused(f"this node handed its sockets to {self._taking_over} (lbnode run --takeover) and "
                                "is draining; the next `lbnode reload` reaches that process")
        if self._taking_over is not None:
            raise ReloadRefused(
                f"a takeover is in progress: {self._taking_over} (lbnode run --takeover) is taking over this "
                "node's sockets; reload once it serves them (the next `lbnode reload` reaches it), or again "
                "here if it gives up")

    async def _command(self, request: dict[str, Any], conn: CommandConn) -> None:
        """One command from the command socket (``lbnode reload``, ``lbnode run --takeover``)."""
        command = request.get("command")
        if command == "reload":
            path = Path(str(request.get("config") or self.config_path or ""))
            try:
                message = await self.reload_one_at_a_time(path)
            except ReloadRefused as exc:
                log.error("reload refused, serving the previous configuration: %s", exc)
                await conn.answer({"ok": False, "message": f"reload refused: {exc}"})
                return
            await conn.answer({"ok": True, "message": message})
        elif command == "takeover":
            await self._hand_over(conn)
        else:
            await conn.answer({"ok": False, "message": f"unknown command {command!r}"})

    async def _hand_over(self, conn: CommandConn) -> None:
        """A new process asks for our sockets; once it serves them it says "drain" and we stop.

        With [control] it first asks us to stop the control API ("release-control": the gRPC
        port is bound anew, and the store file must have one writer). With [cluster] it asks us
        to stop acting as the member ("release-cluster") and adopts the lease and VIPs. If it
        goes away before "drain" (it could not start: a port, a bad file), we go on, with the
        control API and the membership again.

        One at a time, and never during a reload (docs/reload.md): a second takeover, or one
        asked while a reload runs, is refused in one line naming what is in progress."""
        if not self._accepting():
            await conn.answer({"ok": False, "message": "takeover refused: the running node is not serving"})
            return
        busy = None
        if self._taking_over is not None:
            busy = f"another takeover is in progress ({self._taking_over} is taking over this node's sockets)"
        elif self._reload_lock.locked():
            busy = "a reload is in progress (lbnode reload or SIGHUP); try again once it has answered"
        if busy is not None:
            log.warning("takeover refused: %s", busy)
            await conn.answer({"ok": False, "message": f"takeover refused: {busy}"})
            return
        pid = conn.peer_pid()
        self._taking_over = f"lbnode pid {pid}" if pid else "a new lbnode process"
        try:
            await self._hand_over_sockets(conn)
        finally:
            if not self._handed_over:  # given up: this node goes on, and reloads again
                self._taking_over = None

    async def _hand_over_sockets(self, conn: CommandConn) -> None:
        """``_hand_over`` once it is the only change in progress: the conversation itself."""
        from lbnode.handover import clock_offset

        listening = self._listening_sockets()
        keys = [socket_key(li.name, li.bind) for li, _ in listening]
        fds = [sock.fileno() for _, sock in listening]
        admin_bind = None
        if self.config.node.admin is not None and self.bound is not None and self.bound.admin is not None:
            if self._admin_sock is not None and self._admin_sock.fileno() >= 0:
                keys.append("admin")
                fds.append(self._admin_sock.fileno())
                admin_bind = str(self.config.node.admin)
        if self.state_lock is not None:
            keys.append("lock")  # the state_dir lock (flock goes with the open file)
            fds.append(self.state_lock.fileno())
        cluster: dict[str, Any] | None = None
        if self.config.cluster is not None and self.agent is not None:
            # the member's identity goes too ("release-cluster"): the heartbeat socket and the VIP
            # guard's pipe now, so that the new process has them ready before we stop claiming
            cluster = {"node": self.config.node.id, "prefix": self.config.cluster.prefix, "vips": self.vips is not None}
            if self.vips is not None:
                heartbeat_fd = self.vips.heartbeat_fd()
                if heartbeat_fd is not None:
                    keys.append("heartbeat")
                    fds.append(heartbeat_fd)
                for i, fd in enumerate(self.vips.guard_pipes()):
                    keys.append(f"vipguard{i}")
                    fds.append(fd)
                cluster["guarded"] = self.vips.guarded()
        await conn.answer({"ok": True, "sockets": keys, "admin_bind": admin_bind, "pid": os.getpid(),
                           "clock": clock_offset(), "cluster": cluster}, fds)
        log.info("takeover: %d sockets handed to a new process; serving until it says it serves them", len(fds))
        released = False
        cluster_state: dict[str, Any] | None = None
        while True:
            request = await conn.next_line()
            command = request.get("command") if request is not None else None
            if command == "release-cluster" and cluster is not None and cluster_state is None:
                cluster_state = await self._release_cluster()
                await conn.answer({"ok": True, "state": cluster_state})
                continue
            if command == "release-control" and self._control_scope is not None:
                log.info("takeover: stopping the control API for the new process")
                self._control_scope.cancel()
                await self._control_stopped.wait()
                released = True
                await conn.answer({"ok": True})
                continue
            break
        if command != "drain":
            log.warning("takeover abandoned: the new process went away before serving; this node goes on")
            if released and self.config.control is not None and self.store is not None and self._health_nursery:
                await self._health_nursery.start(self._serve_control, self.config.control, self.store)
            if cluster_state is not None:
                await self._resume_cluster(cluster_state)
            return
        log.info("takeover: the new process serves our sockets; draining and exiting")
        self._handed_over = True
        self._admin_accepting.cancel()  # its socket is the new process's now: we accept no more
        if admin_bind is not None:
            # The connections we accepted are answered first, a request still on its way too (a
            # CI run saw one closed unanswered when they were cancelled with the accept loop),
            # and before the stop below: they must say "ok", not "draining". A client that sends
            # nothing within ADMIN_HANDOVER_GRACE is closed, not waited for READ_TIMEOUT.
            with trio.move_on_after(ADMIN_HANDOVER_GRACE):
                await self._admin_done.wait()
        self._admin_scope.cancel()
        self.stop()
        await conn.answer({"ok": True, "message": "draining"})

    async def _release_cluster(self) -> dict[str, Any]:
        """A takeover's "release-cluster": stop acting as the member (VIP claimer first, so that no
        VIP is claimed under a lease nobody renews, then the agent) without revoking the lease or
        removing the VIPs; the new process adopts them (docs/reload.md)."""
        assert self.agent is not None
        vips = await self.vips.hand_over() if self.vips is not None else None
        agent = await self.agent.hand_over()
        log.info("takeover: lease %s, VIPs %s and heartbeats handed to the new process",
                 f"{agent['lease']:x}" if agent.get("lease") else "(none)",
                 ", ".join(sorted(vips["held"])) if vips else "(none)")
        return {"agent": agent, "vips": vips}

    async def _resume_cluster(self, state: dict[str, Any]) -> None:
        """The new process went away after "release-cluster": be the member again, as it would have."""
        assert self.agent is not None and self._health_nursery is not None
        log.warning("takeover abandoned after the cluster membership was handed over: taking it back")
        self.agent.adopt(state.get("agent") or {})
        await self._health_nursery.start(self.agent.run)
        if self.vips is not None:
            self.vips.adopt(state.get("vips"), None)
            await self._health_nursery.start(self.vips.run)

    async def _take_over_cluster(self, takeover: Takeover) -> None:
        """``--takeover`` of a cluster member: be ready to claim (netlink, the VIP guard), then
        have the old process stop acting as the member, and adopt its lease and VIPs (the
        hand-off window is what happens between the two: milliseconds)."""
        from lbnode.handover import CommandError

        assert self.agent is not None and takeover.cluster is not None
        if self.vips is not None:
            await self.vips.prepare(takeover.guard_pipes, takeover.cluster.get("guarded", ()))
            takeover.guard_pipes = []  # the claimer's now
        try:
            state = await trio.to_thread.run_sync(takeover.release_cluster)
        except CommandError as exc:
            # Registering anew would revoke the running node's lease under its VIPs ("previous
            # run"): give up instead, and it goes on (or takes back what it handed over).
            raise CommandError(f"the running node did not hand over its cluster membership: {exc}") from None
        self.agent.adopt(state.get("agent") or {})
        self.agent.keep_lease_on_exit = True  # until the old process drains: it takes them back if we fail
        if self.vips is not None:
            self.vips.adopt(state.get("vips"), takeover.heartbeat)
            self.vips.keep_on_exit = True
            takeover.heartbeat = None

    async def _serve_control(
        self, settings: ControlSettings, store: PoolStore, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """The control API, until the node stops or a takeover asks for its port."""
        from lbnode.control.server import serve_control

        self._control_scope = scope = trio.CancelScope()
        self._control_stopped = trio.Event()
        try:
            with scope:
                await serve_control(settings, store, self, task_status=task_status)
        finally:
            self._control_stopped.set()

    # --------------------------------------------------------------- lifecycle
    async def run(self, *, handle_signals: bool = True, task_status: trio.TaskStatus[Bound] = trio.TASK_STATUS_IGNORED) -> None:
        fast_instruments()  # a C lookup, not a Python call, at each of Trio's task steps
        config = self.config
        access = self._admin_access()
        sockets: list[tuple[Listener, stdsocket.socket]] = []
        admin_sock = None
        takeover = self.takeover
        try:
            for li in config.listeners:
                sock = takeover.take(socket_key(li.name, li.bind)) if takeover is not None else None
                sockets.append((li, sock or bind_tcp(li.bind, li.backlog, f"listener {li.name}")))
            if config.node.admin is not None:
                if takeover is not None and takeover.admin is not None and takeover.admin_bind == str(config.node.admin):
                    admin_sock, takeover.admin = takeover.admin, None
                else:
                    admin_sock = bind_tcp(config.node.admin, 128, "node.admin")
            for writer in self.access_log_writers:
                writer.open()
        except BaseException:
            for _, s in sockets:
                s.close()
            if admin_sock is not None:
                admin_sock.close()
            for writer in self.access_log_writers:
                writer.close()
            if takeover is not None:
                takeover.abandon()
            raise
        if takeover is not None:
            for key in takeover.close_unused():
                log.info("takeover: the running node's socket %s is not in this configuration: it closes "
                         "once that node has drained", key)
            if takeover.admin is not None:
                takeover.admin.close()
                takeover.admin = None
        self._admin_sock = admin_sock
        self._sockets_at_start = sockets
        self.bound = Bound(
            listeners={li.name: s.getsockname()[:2] for li, s in sockets},
            admin=admin_sock.getsockname()[:2] if admin_sock is not None else None,
        )
        try:
            async with trio.open_nursery() as outer:
                if handle_signals:  # open before anything serves: a signal from then on is handled
                    await outer.start(self._watch_signals, outer.cancel_scope)
                if self.agent is not None:
                    self.agent.on_assignment_change(self._sync_health)
                    self.agent.on_verdict(self._on_verdict)
                    self.events.follow_cluster(self.agent)
                    if config.cluster is not None and config.cluster.vips:
                        self.vips = VipClaimer(config.cluster, config.node.id, self.agent.conn, self.agent)
                        self.vips.on_moved(self.events.vip_moved)
                        self.vips.on_moving(self._filter_moving_vips)
                    if takeover is not None and takeover.cluster is not None:
                        await self._take_over_cluster(takeover)
                    await outer.start(self.agent.run)
                    if self.vips is not None:
                        await outer.start(self.vips.run)
                if self.affinity is not None:
                    await outer.start(self.affinity.run)
                self._share_ticket_keys(outer)
                if self.store is not None:
                    self.follower = StoreFollower(self.store, lambda: self.config, self._apply_from_store, seed=self._seed,
                                                  seed_routes=self._seed_routes)
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
                    self.control_port = await outer.start(self._serve_control, config.control, self.store)
                if admin_sock is not None:
                    outer.start_soon(self._serve_admin, admin_sock, access)
                outer.start_soon(self._check_certificate_expiry)
                access_log_scope = trio.CancelScope()
                if self.access_log_writers:
                    outer.start_soon(self._run_access_logs, access_log_scope)
                self._health_nursery = outer
                self._sync_health()
                await self._serve_listeners(sockets, outer, takeover, task_status=task_status)
                access_log_scope.cancel()
                await self._flush_access_logs()
                self.upstreams.close()
                if self.command_socket is not None:
                    self.command_socket.close()
                log.info("stopped")
                outer.cancel_scope.cancel()
        except BaseException:
            if self.takeover is not None:
                # failed before serving: hand the old process back what it gave (its sockets, and
                # its cluster membership, which our agent and claimer left as they found it) now,
                # not at the end of the interpreter: its heartbeats must resume within DETECT_AFTER
                self.takeover.abandon()
                self.takeover = None
            raise

    async def _serve_listeners(
        self, sockets: list[tuple[Listener, stdsocket.socket]], outer: trio.Nursery, takeover: Takeover | None,
        *, task_status: trio.TaskStatus[Bound] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Accept on every listener until stopped, then drain: VIPs handed over first, the
        listeners stopped, in-flight work given ``drain_timeout``. A supervisor
        (``lbnode.supervisor``) hands the sockets to its workers instead; a worker
        (``lbnode.workers``) runs this on the sockets it received."""
        config = self.config
        assert self.bound is not None
        async with trio.open_nursery() as listeners:
            self.listeners.nursery = listeners
            for li, sock in sockets:
                self.listeners.serve(li, sock)
            for li in config.listeners:
                log.info("listener %s: %s on %s -> pool %s", li.name, li.protocol, li.bind, li.pool)
            if takeover is not None:
                await trio.to_thread.run_sync(takeover.finish)
                if self.agent is not None:  # the membership is ours alone now
                    self.agent.keep_lease_on_exit = False
                if self.vips is not None:
                    self.vips.keep_on_exit = False
                log.info("takeover: serving the sockets of lbnode pid %d, which drains and exits", takeover.pid)
                self.takeover = None
            if self.command_socket is not None:
                command_socket = self.command_socket
                if command_socket.bind(replace_live=takeover is not None):
                    outer.start_soon(command_socket.serve, self._command)
            task_status.started(self.bound)
            await self._stop.wait()
            self._draining = True
            if not self._handed_over:
                for proxy in self.http_proxies.values():
                    proxy.drain()  # idle keep-alive connections close now (before a VIP moves)
            await self._hand_over_vips()
            self.listeners.stop_all()
            drain = self.config.node.drain_timeout
            log.info("draining: no new connections; waiting up to %gs for requests in flight", drain)
        self.listeners.nursery = None
        if self.listeners.drain_cut:
            log.warning("drain timeout: closed connections still in flight")

    async def _hand_over_vips(self) -> None:
        """Planned stop: hand the VIPs over first (make-before-break), so clients move before
        we drain. Meanwhile new connections to them are refused silently (their SYNs go
        again a second later, to the new holder); the accept loops go on for the handshakes
        already under way."""
        if self.vips is not None and self.vips.held:
            with trio.move_on_after(2 * self.vips.conn.timeout):
                await self.vips.release_all()

    async def _serve_admin(self, sock: stdsocket.socket, access: AdminAccess) -> None:
        """The admin endpoint, until the node stops or a new process takes its socket over."""
        try:
            with self._admin_scope:
                await serve_admin(sock, self, access, self._admin_accepting)
        finally:
            self._admin_done.set()

    def _listener_parts(self, li: Listener, slot: ListenerSlot) -> tuple[Handler, list[Callable[[], None]]]:
        """For ``ListenerSet``: the handler chain on the slot's gate, and what to tell it when a
        reload replaces or removes it (an HTTP proxy stops keep-alive)."""
        assert self.bound is not None
        self.bound.listeners[li.name] = slot.sock.getsockname()[:2]
        handler, _ = self._listener_handler(li, slot.gate)
        proxy = self.http_proxies.get(li.name)
        return handler, [proxy.retire] if proxy is not None else []

    def _listener_handler(self, li: Listener, gate: ConnectionGate | None = None) -> tuple[Handler, ConnectionGate]:
        """One listener's connection handler and gate, registered for the admin endpoint's
        counters: the PROXY header receiver (outermost: the header comes before the TLS
        handshake and the ClientHello), then the TLS terminator, then HTTP or TCP. ``gate``:
        the one its socket already has (a reload keeps it: its count includes the connections
        the previous settings still serve)."""
        assert self.bound is not None
        if gate is None:
            gate = ConnectionGate(li.max_connections, parent=self.connection_gate)
        self.connection_gates[li.name] = gate
        handler: Handler
        inner: Inner  # what a TLS listener's terminator calls after the handshake
        access_log = self.access_logs.get(li.name)
        # A reload may change what the listener is made of: parts it no longer has leave /metrics.
        for registry, kept in ((self.http_proxies, li.protocol in ("http", "https")),
                               (self.tcp_proxies, li.protocol not in ("http", "https")),
                               (self.tls_terminators, li.tls is not None),
                               (self.proxy_receivers, li.proxy_protocol is not None)):
            if not kept:
                registry.pop(li.name, None)
        if li.protocol in ("http", "https"):
            proxy_class = HttpProxy
            if li.http2 is not None:
                from lbnode.http2.proxy import Http2Proxy  # HTTP/2 clients (issue 14)

                proxy_class = Http2Proxy
            # Every L7 listener can reach protocol = "h2" pools: one may be created or changed
            # through the control API at any time, with no listener rebuilt for it.
            proxy = proxy_class(li, self, port=self.bound.listeners[li.name][1], access_log=access_log,
                                transports={"h2": H2Transport()})
            previous = self.http_proxies.get(li.name)
            if previous is not None:  # a reload changed this listener: its counters go on
                proxy.carry_counters(previous)
                previous.route_like(proxy)
                proxy.mirrors = previous.mirrors  # and its route mirrors' copies and counters
            elif self._health_nursery is not None:  # the node's own nursery, open while it runs
                proxy.mirrors.attach(self._health_nursery)
            self.http_proxies[li.name] = proxy
            handler = inner = proxy.handle
        else:
            from lbnode.tcp.proxy import TcpProxy

            tcp = TcpProxy(li, self, access_log=access_log)
            previous_tcp = self.tcp_proxies.get(li.name)
            if isinstance(previous_tcp, TcpProxy):
                tcp.carry_counters(previous_tcp)
            self.tcp_proxies[li.name] = tcp
            handler = inner = tcp.handle
        if li.tls is not None:
            from lbnode.tls.terminate import TlsTerminator

            terminator = TlsTerminator(li, self, inner)
            if self.ticket_key is not None:
                terminator.use_ticket_key(self.ticket_key)
            self.tls_terminators[li.name] = terminator
            handler = terminator.handle
        if li.proxy_protocol is not None:
            from lbnode.proxyaccept import ProxyHeaderReceiver

            receiver = ProxyHeaderReceiver(li, handler)
            self.proxy_receivers[li.name] = receiver
            handler = receiver.handle
        return handler, gate

    def _share_ticket_keys(self, nursery: trio.Nursery) -> None:
        """Once the node has a TLS listener (at start, or added by a reload), a cluster member
        seals its session tickets with the cluster's key (lbnode.cluster.ticketkey), followed
        in ``nursery``."""
        config = self.config
        if self.ticket_keys is not None or self.agent is None or config.cluster is None or not has_tls_listener(config):
            return
        from lbnode.cluster.ticketkey import ClusterTicketKey

        self.ticket_keys = ClusterTicketKey(config.cluster, self.agent.conn)
        self.ticket_keys.on_key(self.use_ticket_key)
        nursery.start_soon(self.ticket_keys.run)

    def use_ticket_key(self, key: bytes | None) -> None:
        """Seal and open the TLS session tickets of every TLS listener with ``key`` (the cluster's,
        or the one a supervisor gives its workers), now and after a reload; None: each
        listener's own (lbnode.tls.ticketkeys)."""
        self.ticket_key = key
        for terminator in self.tls_terminators.values():
            terminator.use_ticket_key(key)

    def _admin_access(self) -> AdminAccess:
        """[admin]'s token and TLS context, read before anything binds (a file changed since
        the config was checked is one line, like every other config error)."""
        from lbnode.model import ConfigError, ConfigFileError

        try:
            return load_access(self.config.admin)
        except ConfigError as exc:
            raise ConfigFileError(str(exc)) from None

    def _listening_sockets(self) -> list[tuple[Listener, stdsocket.socket]]:
        """The sockets this node accepts on now (a supervisor: the ones its workers accept on):
        what a VIP filter is attached to, and what a takeover hands over (by ``socket_key``)."""
        return [(slot.listener, slot.sock) for slot in self.listeners.slots.values()]

    def _filter_moving_vips(self, handing_off: frozenset[str], taking_over: frozenset[str]) -> None:
        """While VIPs move, every listener drops what would break a connection (``set_vip_filter``).

        Before the listeners are served, on the sockets they will serve: a takeover's claimer
        releases a VIP the new node.toml dropped as it starts, while the old process still
        accepts on these sockets. Without the filter a handshake completed there just before
        the new holder's gratuitous ARP would be cut (the client's request reaches a host that
        does not know the connection, which answers with a reset)."""
        for listener, sock in self._listening_sockets() or self._sockets_at_start:
            if sock.fileno() < 0:
                continue  # closed: the node has stopped
            try:
                set_vip_filter(sock, sorted(handing_off), sorted(taking_over))
            except OSError as exc:
                log.warning("listener %s: cannot filter the packets of moving VIPs (%s, %s): %s",
                            listener.name, sorted(handing_off), sorted(taking_over), exc)

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
                checker.tls, checker.send_proxy, checker.protocol = pool.tls, pool.send_proxy, pool.protocol
                checker.update(mine, pool.health)
                continue
            on_observation = (
                (lambda o, n=name: agent.publish(o, n, period=self._check_period(n))) if agent is not None else _ignore
            )
            checker = HealthChecker(
                name, pool.health, mine, on_transition=self._transition_for(name), on_observation=on_observation,
                tls=pool.tls, send_proxy=pool.send_proxy, protocol=pool.protocol,
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

    async def _reload_on_signal(self) -> None:
        """SIGHUP: node.toml read again and applied; refused (one line in the log) if it cannot be."""
        if self.config_path is None:
            log.warning("SIGHUP: this node was not started from a file; nothing to reload")
            return
        log.info("SIGHUP: reloading %s", self.config_path)
        try:
            await self.reload_one_at_a_time(self.config_path)
        except ReloadRefused as exc:
            log.error("reload refused, serving the previous configuration: %s", exc)

    async def _watch_signals(self, everything: trio.CancelScope, *,
                             task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        with stopsignals.receiver(signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGHUP) as signals:
            task_status.started()
            async for signum in signals:
                if signum == signal.SIGHUP:
                    await self._reload_on_signal()
                    continue
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


def has_tls_listener(config: Config) -> bool:
    """A listener terminates TLS (https, tls): session tickets to share."""
    return any(li.tls is not None for li in config.listeners)


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

        return kind(config, store=FileStore(Path(config.node.state_dir), config.pools,
                                            listener_routes(config.listeners)))
    from lbnode.cluster.etcd import EtcdStore, connect, quiet_grpc_waits
    from lbnode.model import ConfigError, ConfigFileError

    quiet_grpc_waits()  # this process waits on gRPC only in worker threads

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
        seed=config.pools, seed_routes=tuple(listener_routes(config.listeners)), last_config=LastConfig(Path(config.node.state_dir), prefix=config.cluster.prefix),
    )
