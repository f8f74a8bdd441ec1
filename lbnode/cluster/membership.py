"""Cluster membership and shared health: this node's lease and node key, every node's observations.

Owns the node lease (grant, keepalive every TTL/3, a new lease after losing it), the set of
live nodes and the health observations read back from etcd, and the cluster verdict on the
backends this node does not check. Never blocks the data plane: etcd calls run in threads,
failures are retried with backoff, and a node without a lease checks every backend itself.

Wiring (what ``LbNode`` does with an agent; all calls from the Trio thread):

- ``agent = ClusterAgent(config.cluster, config.node.id, {"addresses": [...]})`` and
  ``await nursery.start(agent.run)`` next to the store follower (``run`` returns to the
  nursery at once; it never waits for etcd).
- Each pool's ``HealthChecker`` gets only ``[b for b in pool.backends if agent.assigned(pool.name, b.id)]``
  and ``on_observation=lambda o: agent.publish(o, pool.name)``.
- ``agent.on_assignment_change(cb)``: ``cb()`` runs when the set of live nodes or this node's
  lease changed: re-filter every checker with ``checker.update(...)`` as above.
- ``agent.on_verdict(cb)``: ``cb(pool, backend_id, up, reason)`` for backends this node does
  not check: drive ``PoolRuntime.health_changed(backend_id, "up" | "down", reason, now)``.
- ``agent.retract(pool, backend_ids)`` when a pool or backends are removed (``None``: all).
- On stop: cancel ``run`` (the lease is revoked: the node's keys vanish at once).
- ``lbnode run --takeover``: the old process's ``hand_over()`` stops ``run`` without revoking
  and returns the lease; the new one's ``adopt(state)`` before its ``run`` keeps it alive.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import trio

from lbnode import __version__
from lbnode.cluster.assign import backend_key, checkers_for, fresh_verdict
from lbnode.cluster.etcd import Compacted, EtcdConnection, KeyEvent, KeyValue, LeaseNotFound
from lbnode.cluster.store import StoreError
from lbnode.cluster.watch import follow_watch
from lbnode.health.state import Observation
from lbnode.model import NAME_RE, ClusterSettings

log = logging.getLogger("lbnode.cluster")

# Retry delays after etcd failed: short first, never hammering a sick etcd.
BACKOFF_FIRST = 0.2
BACKOFF_MAX = 5.0
# The lease is kept alive this fraction of its TTL after the last answered keepalive.
KEEPALIVE_FRACTION = 1 / 3
# While keepalives fail, they are retried this often (not every TTL/3) until the lease expires.
KEEPALIVE_RETRY = 0.2
# Deadline of one keepalive attempt (two attempts per call, then KEEPALIVE_RETRY). When the etcd
# leader's host dies, a keepalive sent to a member that still forwards to the dead leader hangs
# until its deadline: with the ordinary 2 s, the survivors of a 2 s lease lost it (and dropped
# their own VIPs) in 2 of 60 host-loss trials. A short attempt is tried again and reaches
# the new leader one election (0.5-1 s) after the loss. A healthy etcd answers in milliseconds.
KEEPALIVE_TIMEOUT = 0.5
# An unchanged observation is written again this often, so its "at" shows it is fresh;
# a change of ok/not-ok is written at once. Checks themselves run far more often.
HEALTH_REFRESH = 5.0
# An observation not written again for this many of its writer's write intervals is ignored:
# its checker fell silent while its node lives (the lease keeps its key). A checker writes
# at least every max(refresh_interval, check interval + timeout) while it checks (its value
# says so: "every"); three of them (15 s with the defaults: refresh 5 s, checks every 2 s)
# let two writes in a row be late or lost (a slow etcd write, a busy node) before a live
# checker's word is dropped, and bound how long a silent one's last word stands. Ages run
# on this node's clock from when it saw the write (the wall-clock "at" is used only for
# what a full read finds), so skew between the nodes' clocks does not matter.
OBSERVATION_MAX_AGE_WRITES = 3
# Puts per transaction (etcd's default limit is 128 operations).
TXN_MAX_OPS = 100

BackendRef = tuple[str, str]  # (pool, backend id)
VerdictCallback = Callable[[str, str, bool, str], object]
NodeCallback = Callable[[str], object]


@dataclass(frozen=True, slots=True)
class SharedObservation:
    """One node's latest result for one backend, as read from etcd."""

    node: str
    ok: bool
    reason: str
    at: float  # wall-clock seconds when the observing node wrote it
    seen: float = 0.0  # Trio clock of this node when it saw that write (its age starts there)
    every: float = HEALTH_REFRESH  # the writer rewrites it at least this often while it checks

    @property
    def stale_at(self) -> float:
        """From then on (Trio clock) its checker is taken as silent and it is ignored."""
        return self.seen + OBSERVATION_MAX_AGE_WRITES * self.every


@dataclass(frozen=True, slots=True)
class _Written:
    ok: bool
    lease: int
    at: float  # Trio clock
    checked_at: float  # the written observation's check time: a refresh needs a newer check


class DuplicateNodeId(StoreError):
    """Another live node has registered with this node's id."""


class ClusterAgent:
    """This node's membership in the cluster (see the module docstring for the wiring).

    ``live_nodes`` is the set of nodes whose key exists in etcd (this one included once
    registered); while etcd is unreachable it keeps its last value. ``lease_ok_since``,
    ``lease_expires_at`` and ``lease_lost_at`` (Trio clock) are for fencing: the lease may
    have expired in etcd any time after ``lease_expires_at`` (a conservative bound: the last
    keepalive's send time plus the TTL).
    """

    def __init__(
        self,
        settings: ClusterSettings,
        node_id: str,
        node_info: dict[str, Any],
        *,
        connection: EtcdConnection | None = None,
        keepalive_connection: EtcdConnection | None = None,
        wall_clock: Callable[[], float] = time.time,
        refresh_interval: float = HEALTH_REFRESH,
    ) -> None:
        self.settings = settings
        self.node_id = node_id
        self.node_info = dict(node_info)
        self.conn = connection if connection is not None else EtcdConnection(settings.etcd)
        self._owns_connection = connection is None
        # short deadlines (see KEEPALIVE_TIMEOUT); made from ``connection`` unless given (the tests
        # give one through a relay they can stall, as a member forwarding to a dead leader does)
        self._keepalive_conn: EtcdConnection | None = keepalive_connection
        self._owns_keepalive_connection = keepalive_connection is None
        self.k = settings.health_checkers
        self.refresh_interval = refresh_interval
        self._period: dict[str, float] = {}  # pool -> its check interval + timeout (what publish was told)
        self._wall = wall_clock
        self.node_key = f"{settings.prefix}/nodes/{node_id}"
        self.node_prefix = f"{settings.prefix}/nodes/"
        self.health_prefix = f"{settings.prefix}/health/"
        # the lease
        self.lease_id: int | None = None
        self.lease_ttl = 0  # as granted by etcd
        self.lease_ok_since: float | None = None
        self.lease_expires_at: float | None = None
        self.lease_lost_at: float | None = None
        self.lease_renewals = 0  # keepalives etcd answered, for /metrics
        self.lease_renewal_failures = 0  # keepalives that failed or got no answer in time
        self.registered = trio.Event()  # set when the node key was first written
        # what etcd says
        self.nodes: dict[str, dict[str, Any]] = {}
        self.live_nodes: frozenset[str] = frozenset()
        self._health: dict[BackendRef, dict[str, SharedObservation]] = {}
        self._told: dict[BackendRef, bool] = {}  # last verdict handed to the callbacks
        # Backends whose every checker fell silent: this node checks them itself meanwhile.
        self._covering: set[BackendRef] = set()
        # what this node publishes
        self._latest: dict[BackendRef, Observation] = {}
        self._written: dict[BackendRef, _Written] = {}
        self._retracted: set[BackendRef] = set()
        self._wake = trio.Event()
        # callbacks
        self._on_join: list[NodeCallback] = []
        self._on_leave: list[NodeCallback] = []
        self._on_verdict: list[VerdictCallback] = []
        self._on_assignment: list[Callable[[], object]] = []
        self._scope: trio.CancelScope | None = None
        self._revoke_on_exit = True
        self._done = trio.Event()  # ``run`` has returned (its lease revoked, or handed over)
        self._adopted: int | None = None  # a lease taken over from the process this one replaces
        # Set while a takeover is not finished: if this process fails, the one it replaces takes
        # the lease back, so ending ``run`` must not revoke it.
        self.keep_lease_on_exit = False
        self._logged_bad: set[tuple[str, int]] = set()
        self._started = 0.0

    # ------------------------------------------------------------------ wiring
    def on_join(self, callback: NodeCallback) -> None:
        self._on_join.append(callback)

    def on_leave(self, callback: NodeCallback) -> None:
        self._on_leave.append(callback)

    def on_verdict(self, callback: VerdictCallback) -> None:
        """``callback(pool, backend_id, up, reason)`` when the cluster's view of a backend this
        node does not check changes (and once when this node stops checking it)."""
        self._on_verdict.append(callback)

    def on_assignment_change(self, callback: Callable[[], object]) -> None:
        """``callback()`` when ``assigned`` may answer differently (nodes joined/left, lease lost/back)."""
        self._on_assignment.append(callback)

    @property
    def isolated(self) -> bool:
        """No lease: nobody else counts on this node's checks, so it checks everything itself."""
        return self.lease_id is None

    def checkers(self, pool: str, backend_id: str) -> list[str]:
        live = set(self.live_nodes)
        if not self.isolated:
            live.add(self.node_id)  # our key exists even if the watch has not shown it yet
        return checkers_for(backend_key(pool, backend_id), live, self.k)

    def assigned(self, pool: str, backend_id: str) -> bool:
        """Must this node actively check this backend? (Also while all its checkers are silent.)"""
        return (
            self.isolated
            or self.node_id in self.checkers(pool, backend_id)
            or (pool, backend_id) in self._covering
        )

    def publish(self, observation: Observation, pool: str, *, period: float = 0.0) -> None:
        """Share a check result; written at once when ok/not-ok changed, else every ``refresh_interval``.

        ``period``: the pool's check interval + timeout, the longest a live checker goes
        without a result; with the refresh interval it says how soon readers may take this
        node as silent. Only a new result is ever written: a checker that stops checking
        stops refreshing, and its word ages out everywhere."""
        ref = (pool, observation.backend_id)
        if not self.isolated and not self.assigned(*ref):
            return  # a checker not yet re-filtered; its results are not ours to share
        previous = self._latest.get(ref)
        self._latest[ref] = observation
        self._period[pool] = period
        self._retracted.discard(ref)
        written = self._written.get(ref)
        if (written is None or written.ok != observation.ok or written.lease != self.lease_id
                or trio.current_time() - written.at >= self.refresh_interval
                # the first new result since the last write: the loop's next refresh time moves
                or previous is None or previous.at <= written.checked_at):
            self._wake.set()

    def retract(self, pool: str, backend_ids: Iterable[str] | None = None) -> None:
        """Stop sharing results for these backends of ``pool`` (all when None); their keys are deleted."""
        wanted = None if backend_ids is None else set(backend_ids)
        for ref in list(self._latest) + list(self._written):
            if ref[0] == pool and (wanted is None or ref[1] in wanted):
                self._latest.pop(ref, None)
                if ref in self._written:
                    self._retracted.add(ref)
        self._wake.set()

    def observations(self, pool: str, backend_id: str) -> dict[str, SharedObservation]:
        """Every node's latest shared result for this backend (for the status page)."""
        return dict(self._health.get((pool, backend_id), {}))

    def verdict(self, pool: str, backend_id: str) -> bool | None:
        obs = self._health.get((pool, backend_id), {})
        return self._verdict(obs, self.checkers(pool, backend_id))

    def _verdict(self, observations: dict[str, SharedObservation], checkers: list[str]) -> bool | None:
        return fresh_verdict({n: (o.ok, o.stale_at) for n, o in observations.items()}, checkers, trio.current_time())

    def stop(self, *, revoke: bool = True) -> None:
        """End ``run``. ``revoke=False`` leaves the lease to expire, as if the node had died."""
        self._revoke_on_exit = revoke
        if self._scope is not None:
            self._scope.cancel()

    # ------------------------------------------------------------------ hand-over
    async def hand_over(self) -> dict[str, Any]:
        """``lbnode run --takeover``: stop ``run`` without revoking the lease (no more keepalives,
        watches or writes from this process) and return what the new process needs to keep
        it alive under the same node id (``adopt``). Its node key, health observations and
        VIP keys stay in etcd: the other nodes see no change."""
        lease = self.lease_id
        self.stop(revoke=False)
        await self._done.wait()
        now = trio.current_time()
        return {"lease": lease, "ttl": self.lease_ttl, "expires_at": self.lease_expires_at, "ok_since": self.lease_ok_since,
                "handed_at": now}

    def adopt(self, state: dict[str, Any]) -> None:
        """Before ``run``: go on with the lease of the process this one replaces (``hand_over``).

        Set at once, so that the VIP claimer started next sees it; ``run`` renews it first
        thing, and registers afresh if etcd says it has ended. ``expires_at`` is on the same
        Trio clock (the new process runs on the old one's, ``handover.HandoverClock``), so the
        fencing rules go on from where the old process left them."""
        lease, expires_at = state.get("lease"), state.get("expires_at")
        if not isinstance(lease, int) or not lease or not isinstance(expires_at, int | float):
            return
        self.lease_id, self.lease_ttl = lease, int(state.get("ttl") or 0)
        self.lease_expires_at = float(expires_at)
        self.lease_ok_since = float(state.get("ok_since") or trio.current_time())
        self._adopted = lease

    async def _renew_adopted(self) -> bool:
        """The first keepalive of an adopted lease, at once; False when etcd says it has ended
        (or it may have: past ``lease_expires_at`` without an answer)."""
        lease = self.lease_id
        assert lease is not None and self.lease_expires_at is not None
        while trio.current_time() < self.lease_expires_at:
            answer = await self._keepalive_once(lease)
            if isinstance(answer, StoreError):
                log.warning("lease %x taken over by node %s: keepalive failed (%s); retrying", lease,
                            self.node_id, answer)
                await trio.sleep(KEEPALIVE_RETRY)
                continue
            if answer is None or answer <= 0:
                break
            return True
        self._lose(lease, "it ended before the new process renewed it")
        return False

    async def _take_over_lease(self) -> bool:
        """Keep the adopted lease (True), with our node key rewritten (version, start time);
        False: it ended, register as any start does."""
        lease = self._adopted
        self._adopted = None
        assert lease is not None
        if not await self._renew_adopted():
            return False
        try:
            await trio.to_thread.run_sync(self.conn.put, self.node_key, self._node_value(), lease, abandon_on_cancel=True)
        except StoreError as exc:  # the key from the old process stays (same lease): only its version is old
            log.warning("node %s: could not rewrite its node key (%s)", self.node_id, exc)
        log.info("node %s registered in etcd (lease %x taken over from the process it replaces, ttl %ds)",
                 self.node_id, lease, self.lease_ttl)
        self.registered.set()
        self._wake.set()
        self._assignments_changed()
        return True

    # ------------------------------------------------------------------ run
    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self._started = self._wall()
        self._done = trio.Event()
        self._revoke_on_exit = True
        try:
            await self._run(task_status)
        finally:
            self._done.set()

    async def _run(self, task_status: trio.TaskStatus[None]) -> None:
        with trio.CancelScope() as self._scope:
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._keep_lease)
                    nursery.start_soon(self._follow, self.node_prefix, self._reset_nodes, self._node_changed, "node list")
                    nursery.start_soon(
                        self._follow, self.health_prefix, self._reset_health, self._health_changed, "shared health"
                    )
                    nursery.start_soon(self._publish_loop)
                    nursery.start_soon(self._age_loop)
                    task_status.started()
            finally:
                await self._leave()

    async def _leave(self) -> None:
        lease, self.lease_id = self.lease_id, None
        with trio.CancelScope(shield=True):
            if lease is not None and self._revoke_on_exit and not self.keep_lease_on_exit:
                with trio.move_on_after(self.conn.timeout):
                    try:
                        await trio.to_thread.run_sync(self.conn.revoke, lease, abandon_on_cancel=True)
                        log.info("node %s left the cluster (lease %x revoked)", self.node_id, lease)
                    except StoreError as exc:
                        log.warning("could not revoke lease %x (%s); node %s's keys expire within %ds",
                                    lease, exc, self.node_id, self.lease_ttl)
            if self._owns_connection:
                self.conn.close()
            if self._keepalive_conn is not None and self._owns_keepalive_connection:
                self._keepalive_conn.close()
                self._keepalive_conn = None

    # ------------------------------------------------------------------ lease
    async def _keep_lease(self) -> None:
        delay, failing = BACKOFF_FIRST, False
        if self._adopted is not None and await self._take_over_lease():
            await self._keep_alive()
        while True:
            try:
                await self._register()
            except StoreError as exc:
                if not failing:
                    (log.error if isinstance(exc, DuplicateNodeId) else log.warning)(
                        "node %s cannot register in etcd (%s); serving on, checking every backend, retrying",
                        self.node_id, exc)
                    failing = True
                await trio.sleep(delay)
                delay = min(delay * 2, BACKOFF_MAX)
                continue
            if failing:
                log.info("node %s registered in etcd again (lease %x)", self.node_id, self.lease_id)
            delay, failing = BACKOFF_FIRST, False
            await self._keep_alive()  # returns once the lease is lost; then register again at once

    async def _register(self) -> None:
        ttl = max(1, math.ceil(self.settings.lease_ttl))
        sent = trio.current_time()
        lease_id, granted = await trio.to_thread.run_sync(self.conn.grant, ttl, abandon_on_cancel=True)
        try:
            await trio.to_thread.run_sync(self._claim_node_key, lease_id, abandon_on_cancel=True)
        except DuplicateNodeId:
            with trio.CancelScope(shield=True):
                try:
                    await trio.to_thread.run_sync(self.conn.revoke, lease_id)
                except StoreError:
                    pass  # it expires on its own
            raise
        self.lease_id, self.lease_ttl = lease_id, granted
        self.lease_expires_at = sent + granted
        self.lease_ok_since = trio.current_time()
        self.lease_lost_at = None
        log.info("node %s registered in etcd (lease %x, ttl %ds)", self.node_id, lease_id, granted)
        self.registered.set()
        self._wake.set()  # every observation is written again under the new lease
        self._assignments_changed()

    async def _keep_alive(self) -> None:
        lease_id = self.lease_id
        assert lease_id is not None and self.lease_expires_at is not None
        failing = False
        while True:
            interval = self.lease_ttl * KEEPALIVE_FRACTION
            await trio.sleep(min(interval, KEEPALIVE_RETRY) if failing else interval)
            answer = await self._keepalive_once(lease_id)
            remaining = answer if isinstance(answer, int) else None
            error = answer if isinstance(answer, StoreError) else None
            if remaining is not None and remaining <= 0:
                self._lose(lease_id, "etcd says it expired")
                return
            if remaining is not None:
                if failing:
                    log.info("lease %x of node %s kept alive again", lease_id, self.node_id)
                failing = False
                continue
            if trio.current_time() >= self.lease_expires_at:
                self._lose(lease_id, f"no keepalive answered within its {self.lease_ttl}s TTL"
                           + (f": {error}" if error else ""))
                return
            if not failing:
                log.warning("lease %x of node %s: keepalive failed (%s); it expires in %.1fs unless etcd answers",
                            lease_id, self.node_id, error, self.lease_expires_at - trio.current_time())
                failing = True

    async def _keepalive_once(self, lease_id: int, conn: EtcdConnection | None = None) -> int | StoreError | None:
        """One keepalive of ``lease_id``: the TTL etcd answered (0: it says the lease has ended),
        the error, or None when no answer came before ``lease_expires_at`` (past it etcd may have
        dropped our keys: a later answer proves nothing, stop waiting for it).

        An answer moves ``lease_expires_at`` to the send time plus that TTL (the lease cannot end
        in etcd before then), never back: another keepalive (``renew``) may have answered
        meanwhile. ``conn``: the keepalive connection unless given."""
        assert self.lease_expires_at is not None
        if conn is None:
            if self._keepalive_conn is None:
                self._keepalive_conn = self.conn.with_timeout(KEEPALIVE_TIMEOUT)
            conn = self._keepalive_conn
        sent = trio.current_time()
        answer: int | StoreError | None = None
        with trio.move_on_at(self.lease_expires_at):
            try:
                answer = await trio.to_thread.run_sync(conn.keepalive, lease_id, abandon_on_cancel=True)
            except LeaseNotFound:
                answer = 0
            except StoreError as exc:
                answer = exc
        if isinstance(answer, int) and answer > 0:
            self.lease_renewals += 1
            if lease_id == self.lease_id and self.lease_expires_at is not None:
                self.lease_expires_at = max(self.lease_expires_at, sent + answer)
        else:
            self.lease_renewal_failures += 1
        return answer

    async def renew(self, lease_id: int) -> bool:
        """Renew ``lease_id`` now, out of the keepalive rhythm, through the main connection; True
        when etcd answered with a TTL (``lease_expires_at`` moved on).

        For a caller that has just written under the lease through that connection while the
        keepalives fail (the VIP claimer after a claim, see ``VipClaimer._confirm_lease``): the
        member that answered the write knows the current etcd leader, when the keepalives may
        still be stuck on a member that forwards to a dead one. Never ends the lease here: an
        answer "not found" is left to the keepalive loop, which finds it at its next try."""
        if lease_id != self.lease_id or self.lease_expires_at is None:
            return False
        answer = await self._keepalive_once(lease_id, self.conn)
        return isinstance(answer, int) and answer > 0

    def _lose(self, lease_id: int, why: str) -> None:
        log.warning("lease %x of node %s lost (%s): its node key and health observations are gone; "
                    "checking every backend locally and registering again", lease_id, self.node_id, why)
        self.lease_id = None
        self.lease_ok_since = None
        self.lease_lost_at = trio.current_time()
        self._assignments_changed()

    def _claim_node_key(self, lease_id: int) -> None:
        """Create our node key under ``lease_id`` (blocking: run in a thread).

        The key exists already while a node with our id is alive, or until the lease of our
        own previous run expires (a crash). Our previous run (same host and state_dir, which
        ``lbnode run`` holds a lock on) has its lease revoked at once: its keys go, including
        any VIPs it held. Anyone else is another node configured with our id:
        ``DuplicateNodeId``, and we keep trying until it is gone.
        """
        key, value = self.node_key, self._node_value()

        def create(c: Any) -> tuple[bool, list[Any]]:
            return c.transaction(  # type: ignore[no-any-return]
                compare=[c.transactions.create(key) == 0],
                success=[c.transactions.put(key, value, lease=lease_id)],
                failure=[c.transactions.get(key)],
            )

        (created, responses), maybe_applied = self.conn.call_retried(f"register node {self.node_id}", create)
        if created:
            return
        found = responses[0][0] if responses and responses[0] else None
        if found is None:  # gone in between: try again on the next round
            raise StoreError(f"node key {key} vanished while registering")
        existing_value, meta = bytes(found[0]), found[1]
        existing_lease = int(getattr(meta, "lease_id", 0) or 0)
        if existing_lease == lease_id or (maybe_applied and existing_value == value):
            return  # our own write, retried after a lost answer
        try:
            theirs = json.loads(existing_value)
        except ValueError:
            theirs = {}
        ours = self.node_info
        if not isinstance(theirs, dict) or (theirs.get("host"), theirs.get("state_dir")) != (
            ours.get("host"), ours.get("state_dir")
        ):
            where = theirs.get("addresses") if isinstance(theirs, dict) else None
            raise DuplicateNodeId(
                f"node id {self.node_id!r} is registered in etcd by another live node "
                f"(host {theirs.get('host', '?') if isinstance(theirs, dict) else '?'}, listeners {where}, "
                f"lease {existing_lease:x}): every node needs its own [node] id; "
                "this node serves on without joining the cluster until that key is gone"
            )
        log.info("node %s: revoking lease %x of this node's previous run (its keys, VIPs included, go now)",
                 self.node_id, existing_lease)
        if existing_lease:
            self.conn.revoke(existing_lease)
        self.conn.put(key, value, lease_id)

    def _node_value(self) -> bytes:
        info = {**self.node_info, "id": self.node_id, "started": self._started, "version": __version__}
        return json.dumps(info, sort_keys=True).encode()

    # ------------------------------------------------------------------ publishing
    async def _publish_loop(self) -> None:
        delay, failing = BACKOFF_FIRST, False
        while True:
            with trio.move_on_at(self._next_refresh()):
                await self._wake.wait()
            self._wake = trio.Event()
            lease = self.lease_id
            if lease is None:
                continue  # woken again on registration
            now = trio.current_time()
            puts = [
                (ref, obs) for ref, obs in self._latest.items()
                if (w := self._written.get(ref)) is None
                or w.ok != obs.ok or w.lease != lease
                or (now - w.at >= self.refresh_interval and obs.at > w.checked_at)  # a new result only
            ]
            deletes = [ref for ref in self._retracted if ref in self._written]
            try:
                for i in range(0, len(puts), TXN_MAX_OPS):
                    chunk = puts[i:i + TXN_MAX_OPS]
                    items = [(self._health_key(ref), self._health_value(ref, obs)) for ref, obs in chunk]
                    await trio.to_thread.run_sync(self.conn.put_many, items, lease, abandon_on_cancel=True)
                    for ref, obs in chunk:
                        self._written[ref] = _Written(obs.ok, lease, now, obs.at)
                for i in range(0, len(deletes), TXN_MAX_OPS):
                    gone = deletes[i:i + TXN_MAX_OPS]
                    keys = [self._health_key(ref) for ref in gone]
                    await trio.to_thread.run_sync(self.conn.delete_many, keys, abandon_on_cancel=True)
                    for ref in gone:
                        self._written.pop(ref, None)
                        self._retracted.discard(ref)
            except LeaseNotFound:
                self._wake.set()  # the keepalive task finds out and registers again, then we rewrite
                await trio.sleep(BACKOFF_FIRST)
                continue
            except StoreError as exc:
                if not failing:
                    log.warning("node %s cannot share health results (%s); retrying", self.node_id, exc)
                    failing = True
                self._wake.set()
                await trio.sleep(delay)
                delay = min(delay * 2, BACKOFF_MAX)
                continue
            delay, failing = BACKOFF_FIRST, False

    def _next_refresh(self) -> float:
        if self.lease_id is None:
            return math.inf
        latest = self._latest
        oldest = min(
            (w.at for ref, w in self._written.items() if ref in latest and latest[ref].at > w.checked_at),
            default=math.inf,
        )  # nothing new to refresh with: publish() wakes the loop when a result comes
        return oldest + self.refresh_interval

    async def _age_loop(self) -> None:
        """Observations age with no event: look again every refresh interval, so a silent
        checker's word is dropped at most that long after it got too old."""
        while True:
            await trio.sleep(self.refresh_interval)
            self._update_covering(list(self._health))
            for ref in list(self._health):
                self._reconsider(ref)

    def _all_silent(self, ref: BackendRef, now: float) -> bool:
        """Every checker of this backend (this node not among them) spoke once and fell silent."""
        checkers = self.checkers(*ref)
        observations = self._health.get(ref, {})
        return (
            bool(checkers)
            and self.node_id not in checkers
            and all(c in observations and now >= observations[c].stale_at for c in checkers)
        )

    def _update_covering(self, refs: Iterable[BackendRef]) -> None:
        """Start or stop checking ``refs`` here as their checkers fall silent or speak again.

        With no checker's word there is no verdict: rather than keep the backend's state
        forever, this node checks it itself, as a node without a lease does."""
        now = trio.current_time()
        changed = False
        for ref in refs:
            silent = self._all_silent(ref, now)
            if silent and ref not in self._covering:
                self._covering.add(ref)
                log.warning("pool %s backend %s: every checker (%s) fell silent; node %s checks it itself",
                            ref[0], ref[1], ", ".join(self.checkers(*ref)), self.node_id)
                changed = True
            elif not silent and ref in self._covering:
                self._covering.discard(ref)
                log.info("pool %s backend %s: its checkers speak again; node %s stops checking it",
                         ref[0], ref[1], self.node_id)
                changed = True
        if changed:
            self._assignments_changed()

    def _health_key(self, ref: BackendRef) -> str:
        return f"{self.health_prefix}{ref[0]}/{ref[1]}/{self.node_id}"

    def _health_value(self, ref: BackendRef, obs: Observation) -> bytes:
        every = max(self.refresh_interval, self._period.get(ref[0], 0.0))
        return json.dumps({"ok": obs.ok, "reason": obs.reason, "at": round(self._wall(), 3), "every": every}).encode()

    # ------------------------------------------------------------------ following etcd
    async def _follow(
        self,
        prefix: str,
        reset: Callable[[list[KeyValue]], None],
        change: Callable[[KeyEvent], None],
        what: str,
    ) -> None:
        """Read everything under ``prefix``, then follow its watch; again after any failure."""
        delay, failing = BACKOFF_FIRST, False
        while True:
            try:
                kvs, revision = await trio.to_thread.run_sync(self.conn.get_prefix, prefix, abandon_on_cancel=True)
                reset(kvs)
                if failing:
                    log.info("%s: etcd reachable again, following from revision %d", what, revision)
                delay, failing = BACKOFF_FIRST, False
                await self._watch(prefix, revision, change)
            except Compacted as exc:
                log.info("%s: %s; reading it all again", what, exc)
                continue
            except StoreError as exc:
                if not failing:
                    log.warning("%s: %s; keeping the last view, retrying", what, exc)
                    failing = True
            await trio.sleep(delay)
            delay = min(delay * 2, BACKOFF_MAX)

    async def _watch(self, prefix: str, revision: int, change: Callable[[KeyEvent], None]) -> None:
        def each(batch: list[KeyEvent]) -> None:
            for event in batch:
                change(event)

        await follow_watch(lambda stop: self.conn.watch_prefix(prefix, revision + 1, stop), each)

    def _bad(self, key: str, revision: int, why: str) -> None:
        if (key, revision) not in self._logged_bad:
            self._logged_bad.add((key, revision))
            log.warning("%s (revision %d) skipped: %s", key, revision, why)

    # ------------------------------------------------------------------ nodes
    def _parse_node(self, key: str, value: bytes, lease: int, revision: int) -> tuple[str, dict[str, Any]] | None:
        node_id = key[len(self.node_prefix):]
        if not NAME_RE.fullmatch(node_id):
            self._bad(key, revision, "not a node id")
            return None
        if not lease:
            # a node key outlives its node only if someone wrote it by hand: it would never check
            self._bad(key, revision, "not bound to a lease (written by hand?); delete it with etcdctl del")
            return None
        try:
            info = json.loads(value)
        except ValueError as exc:
            self._bad(key, revision, f"not JSON ({exc})")
            return None
        if not isinstance(info, dict) or info.get("id") != node_id:
            self._bad(key, revision, f'not a node record with "id": "{node_id}"')
            return None
        return node_id, info

    def _reset_nodes(self, kvs: list[KeyValue]) -> None:
        nodes = {}
        for kv in kvs:
            parsed = self._parse_node(kv.key, kv.value, kv.lease, kv.mod_revision)
            if parsed is not None:
                nodes[parsed[0]] = parsed[1]
        self._set_nodes(nodes)

    def _node_changed(self, event: KeyEvent) -> None:
        nodes = dict(self.nodes)
        if event.value is None:
            nodes.pop(event.key[len(self.node_prefix):], None)
        else:
            parsed = self._parse_node(event.key, event.value, event.lease, event.revision)
            if parsed is None:
                return
            nodes[parsed[0]] = parsed[1]
        self._set_nodes(nodes)

    def _set_nodes(self, nodes: dict[str, dict[str, Any]]) -> None:
        old = self.live_nodes
        self.nodes = nodes
        self.live_nodes = frozenset(nodes)
        joined, left = sorted(self.live_nodes - old), sorted(old - self.live_nodes)
        for node in joined:
            log.info("node %s joined the cluster", node)
            for callback in self._on_join:
                callback(node)
        for node in left:
            log.info("node %s left the cluster (its key was deleted or its lease expired)", node)
            for callback in self._on_leave:
                callback(node)
        if joined or left:
            self._assignments_changed()

    def _assignments_changed(self) -> None:
        for ref in list(self._latest):
            if not self.assigned(*ref):
                self.retract(ref[0], [ref[1]])
        for callback in self._on_assignment:
            callback()
        for ref in set(self._health) | set(self._told):
            self._reconsider(ref)

    # ------------------------------------------------------------------ shared health
    def _parse_health(
        self, key: str, value: bytes, revision: int, *, full_read: bool = False
    ) -> tuple[BackendRef, SharedObservation] | None:
        parts = key[len(self.health_prefix):].split("/")
        if len(parts) != 3 or not all(parts):
            self._bad(key, revision, "not a health key <pool>/<backend>/<node>")
            return None
        pool, backend, node = parts
        try:
            data = json.loads(value)
            at = float(data.get("at", 0.0))
            every = float(data.get("every", self.refresh_interval))
            if not (math.isfinite(every) and every > 0):
                raise ValueError(f'"every" must be a positive number of seconds, got {data.get("every")!r}')
            # Seen now; a full read ages it by its wall-clock "at" (never younger than now).
            seen = trio.current_time() - (max(0.0, self._wall() - at) if full_read else 0.0)
            obs = SharedObservation(node, data["ok"], str(data.get("reason", "")), at, seen, every)
            if not isinstance(obs.ok, bool):
                raise TypeError('"ok" is not true or false')
        except (ValueError, TypeError, KeyError) as exc:
            self._bad(key, revision, f'not a health observation {{"ok": bool, "reason": str, "at": time}} ({exc!r})')
            return None
        return (pool, backend), obs

    def _reset_health(self, kvs: list[KeyValue]) -> None:
        health: dict[BackendRef, dict[str, SharedObservation]] = {}
        for kv in kvs:
            parsed = self._parse_health(kv.key, kv.value, kv.mod_revision, full_read=True)
            if parsed is not None:
                ref, obs = parsed
                health.setdefault(ref, {})[obs.node] = obs
        old = self._health
        self._health = health
        self._update_covering(set(old) | set(health) | self._covering)
        for ref in set(old) | set(health):
            self._reconsider(ref)

    def _health_changed(self, event: KeyEvent) -> None:
        if event.value is None:
            parts = event.key[len(self.health_prefix):].split("/")
            if len(parts) != 3:
                return
            ref, node = (parts[0], parts[1]), parts[2]
            observations = self._health.get(ref, {})
            observations.pop(node, None)
            if not observations:
                self._health.pop(ref, None)
        else:
            parsed = self._parse_health(event.key, event.value, event.revision)
            if parsed is None:
                return
            ref, obs = parsed
            self._health.setdefault(ref, {})[obs.node] = obs
        if ref in self._covering:
            self._update_covering([ref])  # a checker spoke again (or went): maybe stop covering
        self._reconsider(ref)

    def _reconsider(self, ref: BackendRef) -> None:
        """Tell the callbacks when the cluster's verdict on a backend we do not check changed."""
        pool, backend = ref
        if self.assigned(pool, backend):
            self._told.pop(ref, None)  # our own checker drives it
            return
        observations = self._health.get(ref)
        if observations is None:
            self._told.pop(ref, None)  # nobody speaks about it any more (pool or backend gone)
            return
        checkers = self.checkers(pool, backend)
        up = self._verdict(observations, checkers)
        if up is None or self._told.get(ref) == up:
            return
        self._told[ref] = up
        reason = _describe(up, checkers, observations, trio.current_time())
        log.info("pool %s backend %s is %s for the cluster: %s", pool, backend, "up" if up else "down", reason)
        for callback in self._on_verdict:
            callback(pool, backend, up, reason)


def _describe(up: bool, checkers: list[str], observations: dict[str, SharedObservation], now: float) -> str:
    spoken = [observations[n] for n in checkers if n in observations and now < observations[n].stale_at]
    silent = [n for n in checkers if n in observations and now >= observations[n].stale_at]
    agreeing = [o for o in spoken if o.ok == up]
    detail = "; ".join(f"{o.node}: {o.reason}" for o in spoken)
    if silent:
        detail += f"; silent, ignored: {', '.join(silent)}"
    return f"{'up' if up else 'down'} on {len(agreeing)} of {len(checkers) - len(silent)} checkers ({detail})"
