"""The pool store contract: where pools, certificates and routes live (etcd in a cluster, files when standalone).

Owns the interface every store implements and the errors the control API
maps to gRPC codes. Stores are blocking and thread-safe: gRPC handler
threads call them directly; Trio code calls them through
``trio.to_thread.run_sync``; ``watch_pools`` runs in one thread and its
events are handed to Trio through a memory channel. A store never touches
the data plane: nodes learn every change, their own included, from the watch.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Protocol, TypeVar

from lbnode.model import Pool
from lbnode.routing import Route
from lbnode.tls.certs import Certificate


class StopFlag(threading.Event):
    """How a watch is told to stop: an event whose ``set`` also runs what ``on_set`` registered.

    A watch thread blocks in a call (etcd's stream) that only cancelling ends. With a plain
    event it had to poll the flag to notice it (ten times a second, each wake taking the GIL
    from the data plane's thread); with this one, setting the flag cancels the call itself.
    ``set`` may be called from any thread; a callback registered after it runs at once.
    """

    def __init__(self) -> None:
        super().__init__()
        self._callbacks_lock = threading.Lock()
        self._callbacks: list[Callable[[], None]] = []

    def on_set(self, callback: Callable[[], None]) -> Callable[[], None]:
        """Run ``callback`` when the flag is set (now, if it is); returns the way to forget it."""
        with self._callbacks_lock:
            if not self.is_set():
                self._callbacks.append(callback)
                return lambda: self._forget(callback)
        callback()
        return _nothing

    def set(self) -> None:
        with self._callbacks_lock:
            super().set()
            callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            callback()

    def _forget(self, callback: Callable[[], None]) -> None:
        with self._callbacks_lock:
            if callback in self._callbacks:
                self._callbacks.remove(callback)


def _nothing() -> None:
    return None


class StoreError(Exception):
    """Base of the errors a store raises; the message is shown to operators as is."""


class NotFound(StoreError):
    pass


class AlreadyExists(StoreError):
    pass


class Conflict(StoreError):
    """The pool changed since the revision the caller read (no lost updates)."""


class Unavailable(StoreError):
    """The store cannot take writes now (etcd unreachable, no quorum)."""


@dataclass(frozen=True, slots=True)
class PoolRecord:
    pool: Pool
    revision: int  # changes on every write of this pool (etcd: the key's mod_revision)


@dataclass(frozen=True, slots=True)
class PoolEvent:
    """A change seen by a watch: ``record`` is None when the pool was deleted."""

    name: str
    record: PoolRecord | None
    revision: int  # store revision of the change


@dataclass(frozen=True, slots=True)
class Resync:
    """The watch lost its place (error, compaction): here is everything, as of ``revision``."""

    records: tuple[PoolRecord, ...]
    revision: int


@dataclass(frozen=True, slots=True)
class CertificateRecord:
    certificate: Certificate  # validated by load_certificate on every read: the PEM is the truth
    revision: int  # changes on every write of this certificate (etcd: the key's mod_revision)


@dataclass(frozen=True, slots=True)
class CertificateEvent:
    """A change seen by a certificate watch: ``record`` is None when the certificate was deleted."""

    name: str
    record: CertificateRecord | None
    revision: int


@dataclass(frozen=True, slots=True)
class CertificateResync:
    """The certificate watch lost its place: every certificate, as of ``revision``."""

    records: tuple[CertificateRecord, ...]
    revision: int


class CertificateStore(Protocol):
    """Named certificates (chain + key) beside the pools, with the same compare-revision writes.

    Keys are secrets: a store never logs one; only the node that serves them reads them back.
    """

    def list_certificates(self) -> tuple[list[CertificateRecord], int]:
        """Every certificate, and the store revision they were read at."""

    def get_certificate(self, name: str) -> CertificateRecord: ...

    def put_certificate(self, certificate: Certificate, expected_revision: int | None = None) -> CertificateRecord:
        """Create or replace. ``expected_revision``: None = unconditional, 0 = only if absent
        (AlreadyExists otherwise), N = only if still at N (Conflict, or NotFound)."""

    def delete_certificate(self, name: str, expected_revision: int | None = None) -> None: ...

    def watch_certificates(
        self, after_revision: int, stop: StopFlag
    ) -> Iterator[CertificateEvent | CertificateResync]:
        """Like ``PoolStore.watch_pools``, for certificates."""


@dataclass(frozen=True, slots=True)
class RouteRecord:
    """One route of the store: ``route.spec`` is its node.toml table (name included), as stored."""

    listener: str
    route: Route  # parsed by lbnode.model.parse_route on every read: the spec is the truth
    revision: int  # changes on every write of this route (etcd: the key's mod_revision)

    @property
    def key(self) -> tuple[str, str]:
        return self.listener, self.route.name


@dataclass(frozen=True, slots=True)
class RouteEvent:
    """A change seen by a route watch: ``record`` is None when the route was deleted."""

    listener: str
    name: str
    record: RouteRecord | None
    revision: int


@dataclass(frozen=True, slots=True)
class RouteResync:
    """The route watch lost its place: every route, as of ``revision``."""

    records: tuple[RouteRecord, ...]
    revision: int


class RouteStore(Protocol):
    """L7 routes, keyed by listener name and route name, with the pools' compare-revision writes."""

    def list_routes(self) -> tuple[list[RouteRecord], int]:
        """Every route, and the store revision they were read at."""

    def get_route(self, listener: str, name: str) -> RouteRecord: ...

    def put_route(self, listener: str, route: Route, expected_revision: int | None = None) -> RouteRecord:
        """Create or replace. ``expected_revision``: None = unconditional, 0 = only if absent
        (AlreadyExists otherwise), N = only if still at N (Conflict, or NotFound)."""

    def delete_route(self, listener: str, name: str, expected_revision: int | None = None) -> None: ...

    def watch_routes(self, after_revision: int, stop: StopFlag) -> Iterator[RouteEvent | RouteResync]:
        """Like ``PoolStore.watch_pools``, for routes."""


class PoolStore(Protocol):
    @property
    def certificates(self) -> CertificateStore:
        """Certificates share the store's connection and life (etcd keys, or a file in
        state_dir). Read-only here, so a store may hold its own ``CertificateStore`` class."""

    @property
    def routes(self) -> RouteStore:
        """Routes too (``{prefix}/routes/<listener>/<name>``, or ``state_dir/routes.json``)."""

    def list_pools(self) -> tuple[list[PoolRecord], int]:
        """Every pool, and the store revision they were read at."""

    def get_pool(self, name: str) -> PoolRecord: ...

    def latest_pool_revision(self) -> int:
        """The revision of the newest pool write in the store (0: none); a cheap read.

        A node whose applied revision is below it has not seen that write yet: its watch
        lags. (A deletion leaves no key to read, so a missed deletion does not show here.)
        """

    def create_pool(self, pool: Pool) -> PoolRecord:
        """AlreadyExists if a pool of that name exists."""

    def update_pool(self, pool: Pool, expected_revision: int | None) -> PoolRecord:
        """Conflict unless the stored pool is still at ``expected_revision`` (None: unconditional)."""

    def delete_pool(self, name: str, expected_revision: int | None = None) -> None: ...

    def watch_pools(self, after_revision: int, stop: StopFlag) -> Iterator[PoolEvent | Resync]:
        """Changes after ``after_revision`` until ``stop`` is set; blocks, so run it in a thread.

        After an error or a compaction the watch yields a ``Resync`` with the
        full state and carries on from there.
        """


class _Revisioned(Protocol):
    @property
    def revision(self) -> int: ...


E = TypeVar("E", bound=_Revisioned)
R = TypeVar("R", bound=_Revisioned)


def follow_history(
    changed: threading.Condition,
    stop: StopFlag,
    after_revision: int,
    window: Callable[[], tuple[int, int, Iterable[E]]],
    resync: Callable[[], R],
) -> Iterator[E | R]:
    """The watch of a file-backed store (pools, certificates, routes): the events after
    ``after_revision`` in order, waiting on ``changed`` (which ``stop`` also wakes: no timed
    wait), or ``resync()`` when the cursor is older than the kept history or ahead of it
    (from another life of the file). ``window()`` gives (oldest revision kept, current
    revision, history); it and ``resync()`` run under ``changed``'s lock."""

    def wake() -> None:
        with changed:
            changed.notify_all()

    forget = stop.on_set(wake)
    try:
        cursor = after_revision
        while not stop.is_set():
            with changed:
                oldest, revision, history = window()
                batch: list[E | R]
                if cursor < oldest or cursor > revision:
                    batch = [resync()]
                else:
                    batch = [e for e in history if e.revision > cursor]
                    if not batch:
                        # Looked at under the lock that wake() takes: a stop set after this
                        # look notifies the wait below, one set before it ends the loop.
                        if not stop.is_set():
                            changed.wait()
                        continue
            for event in batch:
                if stop.is_set():
                    return
                yield event
                cursor = event.revision
    finally:
        forget()
