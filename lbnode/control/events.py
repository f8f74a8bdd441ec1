"""Fan-out of what a node sees happen (pools, backend health, nodes, VIP moves, certificates) to WatchEvents streams.

Owns one bounded queue per subscriber, and the last few events for the status page. ``publish`` is called on the Trio thread
and never blocks or waits on a reader: a stream that falls too far behind is
ended (its client re-lists and watches again) instead of slowing the node.
"""

from __future__ import annotations

import itertools
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Protocol

from lbnode.cluster.store import CertificateRecord, PoolRecord, RouteRecord

if TYPE_CHECKING:
    from lbnode.cluster.sync import StoreFollower
    from lbnode.health.state import Transition

# Events a stream may lag behind before it is ended (a reader stalled for minutes).
BACKLOG = 1024
# Events kept for the status page's "recent events" (GET /status/page.json): a screenful.
# A reader who wants every event follows WatchEvents; this is only what just happened.
RECENT = 50


@dataclass(frozen=True, slots=True)
class PoolChange:
    name: str
    change: str  # "created" | "updated" | "deleted"
    record: PoolRecord | None  # None when deleted
    revision: int  # store revision of the change


@dataclass(frozen=True, slots=True)
class BackendHealthChange:
    pool: str
    backend: str  # backend id
    old: str  # "up" | "down" | "unknown"
    new: str
    reason: str


@dataclass(frozen=True, slots=True)
class NodeChange:
    node_id: str
    change: str  # "joined" | "left"


@dataclass(frozen=True, slots=True)
class VipMove:
    vip: str
    old_holder: str | None  # None: it was free
    new_holder: str | None  # None: it is free now


@dataclass(frozen=True, slots=True)
class CertificateChange:
    name: str
    change: str  # "added" | "rotated" | "deleted"
    fingerprint: str  # of the new certificate ("" when deleted)
    not_after: datetime | None  # of the new certificate (None when deleted)
    revision: int  # store revision of the change


@dataclass(frozen=True, slots=True)
class RouteChange:
    listener: str
    name: str
    change: str  # "created" | "updated" | "deleted"
    revision: int  # store revision of the change


ControlEvent = PoolChange | BackendHealthChange | NodeChange | VipMove | CertificateChange | RouteChange


class ClusterMembers(Protocol):
    """What ``follow_cluster`` needs of the cluster agent."""

    def on_join(self, callback: Callable[[str], object]) -> None: ...

    def on_leave(self, callback: Callable[[str], object]) -> None: ...


@dataclass(frozen=True, slots=True)
class Published:
    seq: int  # increasing per hub; a gap means a stream lost events
    time: float  # wall clock (Unix seconds) when it was published
    event: ControlEvent


class StreamEnded(Exception):
    """The subscription is over: closed by the server, or ``overflowed`` (the reader fell behind)."""

    def __init__(self, overflowed: bool) -> None:
        super().__init__("fell behind" if overflowed else "closed")
        self.overflowed = overflowed


_END = object()


class Subscription:
    """One reader's queue; read it from one thread with ``get``."""

    def __init__(self, hub: EventHub, backlog: int) -> None:
        self._hub = hub
        self._queue: queue.Queue[object] = queue.Queue(backlog + 1)  # +1: room for the end marker
        self._backlog = backlog
        self.overflowed = False
        self.closed = False
        self._ended = False  # the reader has seen the end marker

    def get(self, timeout: float) -> Published | None:
        """The next event, or None after ``timeout`` seconds; StreamEnded once closed."""
        if self._ended:
            raise StreamEnded(self.overflowed)
        try:
            item = self._queue.get(timeout=timeout)
        except queue.Empty:
            return None
        if item is _END:
            self._ended = True
            raise StreamEnded(self.overflowed)
        assert isinstance(item, Published)
        return item

    def close(self) -> None:
        """End the subscription (any thread); a blocked ``get`` returns at once."""
        self._hub._remove(self)
        self._end()

    def _offer(self, item: Published) -> None:
        if self.closed:
            return
        if self._queue.qsize() >= self._backlog:
            self.overflowed = True
            self._hub._remove(self)
            self._end()
            return
        self._queue.put_nowait(item)

    def _end(self) -> None:
        if not self.closed:
            self.closed = True
            try:
                self._queue.put_nowait(_END)
            except queue.Full:  # cannot happen: one slot is kept for the marker
                pass


class EventHub:
    """Events of one node, handed to every current subscriber. Thread-safe; ``publish`` never blocks."""

    def __init__(self, backlog: int = BACKLOG, recent: int = RECENT) -> None:
        # Reentrant: an overflowing subscriber removes itself from inside publish.
        self._lock = threading.RLock()
        self._subscribers: set[Subscription] = set()
        self._seq = itertools.count(1)
        self._backlog = backlog
        self._pool_revisions: dict[str, int] = {}  # pools this node serves, to tell created from updated
        self._recent: deque[Published] = deque(maxlen=recent)

    # ------------------------------------------------------------------ producers
    def publish(self, event: ControlEvent) -> None:
        with self._lock:
            item = Published(next(self._seq), time.time(), event)
            self._recent.append(item)
            for sub in list(self._subscribers):
                sub._offer(item)

    def follow(self, follower: StoreFollower) -> None:
        """Publish every pool change the node applies from its store (best before ``follower.run``)."""
        with self._lock:
            for name, record in follower.pools.items():  # already applied: later changes are updates
                self._pool_revisions.setdefault(name, record.revision)
        follower.subscribe(lambda name, record: self.pool_changed(name, record, follower.revision))
        follower.subscribe_certificates(
            lambda name, old, new: self.certificate_changed(name, old, new, follower.certificate_revision)
        )
        follower.subscribe_routes(self.route_changed)

    def route_changed(self, listener: str, name: str, old: RouteRecord | None, new: RouteRecord | None) -> None:
        """A store route change the node applied (``StoreFollower.subscribe_routes``)."""
        change = "deleted" if new is None else "updated" if old is not None else "created"
        revision = new.revision if new is not None else old.revision if old is not None else 0
        self.publish(RouteChange(listener, name, change, revision))

    def certificate_changed(
        self, name: str, old: CertificateRecord | None, new: CertificateRecord | None, revision: int
    ) -> None:
        """A store certificate change the node applied (``StoreFollower.subscribe_certificates``)."""
        if new is None:
            self.publish(CertificateChange(name, "deleted", "", None, revision))
            return
        cert = new.certificate
        change = "rotated" if old is not None else "added"
        self.publish(CertificateChange(name, change, cert.fingerprint, cert.not_after, new.revision))

    def pool_changed(self, name: str, record: PoolRecord | None, revision: int) -> None:
        """A pool change the node applied (``StoreFollower.subscribe`` callback; None: deleted)."""
        with self._lock:
            known = name in self._pool_revisions
            if record is None:
                self._pool_revisions.pop(name, None)
            else:
                self._pool_revisions[name] = record.revision
                revision = record.revision
        if record is None:
            if known:
                self.publish(PoolChange(name, "deleted", None, revision))
            return
        self.publish(PoolChange(name, "updated" if known else "created", record, revision))

    def follow_cluster(self, agent: ClusterMembers) -> None:
        """Publish node joins and leaves seen by the cluster agent (``ClusterAgent``)."""
        agent.on_join(lambda node_id: self.publish(NodeChange(node_id, "joined")))
        agent.on_leave(lambda node_id: self.publish(NodeChange(node_id, "left")))

    def vip_moved(self, vip: str, old_holder: str | None, new_holder: str | None) -> None:
        """A VIP changed hands in etcd (``VipClaimer.on_moved`` callback)."""
        self.publish(VipMove(vip, old_holder, new_holder))

    def backend_health(self, pool: str, backend_id: str, transition: Transition) -> None:
        """An active health check moved a backend up or down (``HealthChecker`` on_transition)."""
        self.publish(BackendHealthChange(pool, backend_id, transition.old, transition.new, transition.reason))

    def cluster_health(self, pool: str, backend_id: str, old: str, new: str, reason: str) -> None:
        """The cluster's checkers moved a backend this node does not check itself up or down."""
        self.publish(BackendHealthChange(pool, backend_id, old, new, f"cluster verdict: {reason}"))

    # ------------------------------------------------------------------ consumers
    def recent(self) -> list[Published]:
        """The last ``recent`` events published, oldest first (kept whether anyone subscribes or not)."""
        with self._lock:
            return list(self._recent)

    def subscribe(self) -> Subscription:
        sub = Subscription(self, self._backlog)
        with self._lock:
            self._subscribers.add(sub)
        return sub

    @property
    def subscribers(self) -> int:
        with self._lock:
            return len(self._subscribers)

    def _remove(self, sub: Subscription) -> None:
        with self._lock:
            self._subscribers.discard(sub)

