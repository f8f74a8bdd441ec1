"""The gRPC control API server: Pools, Backends, Certificates, Routes and Cluster servicers, health and reflection.

Owns translating messages into store writes and node reads, and domain errors
into status codes. Never pokes the data plane: writes go to the store and
reach every node (this one too) through its watch. Runs in gRPC's own thread
pool; it reads Trio state only through ``trio.from_thread`` with the run's token.
"""

from __future__ import annotations

import functools
import ipaddress
import logging
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import grpc
import trio
from cryptography import x509
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from lbnode import __version__
from lbnode.admin.metrics import CODE_CLASSES
from lbnode.api.certificates import certificate_message
from lbnode.api.fulcrum.v1 import control_pb2 as pb
from lbnode.api.fulcrum.v1 import control_pb2_grpc as rpc
from lbnode.api.pools import backend_dict, pool_dict, pool_message
from lbnode.cluster.store import (
    AlreadyExists,
    Conflict,
    NotFound,
    PoolRecord,
    PoolStore,
    Unavailable,
)
from lbnode.control import backends as edits
from lbnode.control import roles
from lbnode.control.events import (
    BackendHealthChange,
    CertificateChange,
    EventHub,
    NodeChange,
    PoolChange,
    Published,
    RouteChange,
    StreamEnded,
    Subscription,
    VipMove,
)
from lbnode.control.routes import RouteControl
from lbnode.histogram import BUCKETS, Histogram
from lbnode.listen import BindError, Bound
from lbnode.model import NAME_RE, ConfigError, ControlSettings, pool_from_dict
from lbnode.tls.certs import Certificate, CertificateError, expiry, load_certificate

if TYPE_CHECKING:  # the node imports this module: no import cycle at run time
    from lbnode.cluster.sync import StoreFollower
    from lbnode.model import Config
    from lbnode.runtime import Snapshot

log = logging.getLogger("lbnode.control")

# WatchEvents streams each hold a worker thread for their lifetime: cap them,
# and keep workers beyond the cap so that unary calls are never starved.
MAX_WATCH_STREAMS = 16
UNARY_WORKERS = 8
# Seconds calls in flight may take to finish when the server stops.
STOP_GRACE = 2.0
# How often a stream with nothing to send checks that its client is still there.
STREAM_POLL = 0.5
# Largest chain or key PutCertificate takes. A chain of ten RSA-4096 certificates is about
# 20 KiB; the cap keeps a CA bundle or a binary pasted by mistake out of etcd, whose values
# go to every node.
MAX_PEM_BYTES = 128 * 1024

SERVICE_NAMES = tuple(s.full_name for s in pb.DESCRIPTOR.services_by_name.values())

_CODES: tuple[tuple[type[Exception], grpc.StatusCode], ...] = (
    (ConfigError, grpc.StatusCode.INVALID_ARGUMENT),
    (CertificateError, grpc.StatusCode.INVALID_ARGUMENT),
    (NotFound, grpc.StatusCode.NOT_FOUND),
    (AlreadyExists, grpc.StatusCode.ALREADY_EXISTS),
    (Conflict, grpc.StatusCode.ABORTED),
    (Unavailable, grpc.StatusCode.UNAVAILABLE),
    (trio.RunFinishedError, grpc.StatusCode.UNAVAILABLE),
)
_DOMAIN_ERRORS = tuple(kind for kind, _ in _CODES)


class ControlSetupError(BindError):
    """The control API cannot start (unreadable certificate, address in use): one line for operators."""


class NodeView(Protocol):
    """What the control API reads from a node (``LbNode`` satisfies it); Trio-thread state."""

    config: Config
    bound: Bound | None
    follower: StoreFollower | None
    events: EventHub

    @property
    def snapshot(self) -> Snapshot: ...

    @property
    def draining(self) -> bool: ...

    def drain(self) -> list[str]: ...


R = TypeVar("R")


def _translating(method: Callable[..., R]) -> Callable[..., R]:
    """Domain errors -> status codes; the message is the error's own text (it names the field)."""

    @functools.wraps(method)
    def handler(self: Any, request: Any, context: grpc.ServicerContext) -> R:
        try:
            return method(self, request, context)
        except _DOMAIN_ERRORS as exc:
            code = next(c for kind, c in _CODES if isinstance(exc, kind))
            message = "the node is stopping" if isinstance(exc, trio.RunFinishedError) else str(exc)
            context.abort(code, message)
            raise  # abort raised already; this keeps type checkers content

    return handler


def _auth_values(context: grpc.ServicerContext, key: str) -> list[bytes]:
    """One property of the call's auth context (e.g. "x509_pem_cert"); none: []. grpc gives
    a list of values per key, where types-grpcio says one ``bytes``: hence the Any."""
    values: Any = context.auth_context().get(key)
    return values or []


def _who(context: grpc.ServicerContext) -> str:
    """The caller for the audit log: its certificate's common name, and where it called from."""
    names = _auth_values(context, "x509_common_name")
    peer = context.peer()
    return f"{names[0].decode(errors='replace')} ({peer})" if names else peer


class RoleGate(grpc.ServerInterceptor):
    """Checks every call against ``roles.RPC_ROLES`` before its handler runs.

    Refusals are PERMISSION_DENIED naming the role the call needs and who the caller
    is; a method missing from the table is refused to everyone (fail closed).
    """

    def __init__(self, settings: ControlSettings) -> None:
        self.insecure = settings.insecure
        self.admins = settings.admins
        self.readers = settings.readers

    def intercept_service(self, continuation: Callable[..., Any], details: grpc.HandlerCallDetails) -> Any:
        handler = continuation(details)
        if handler is None or self.insecure:  # plain text: no certificates, no roles (logged at start)
            return handler
        method = details.method
        needed = roles.RPC_ROLES.get(method)

        def check(context: grpc.ServicerContext) -> None:
            caller = self.caller(context)
            if needed is None:
                message = f"{method} is not in the control API's role table: refused to everyone"
            elif caller.may(needed):
                return
            else:
                message = f"{method} needs the {needed} role; {caller.describe()}"
            log.warning("refused %s to %s (%s)", method, caller.name or "?", context.peer())
            context.abort(grpc.StatusCode.PERMISSION_DENIED, message)

        def guarded(behavior: Callable[..., Any]) -> Callable[..., Any]:
            def run(request: Any, context: grpc.ServicerContext) -> Any:
                check(context)
                return behavior(request, context)

            return run

        for kind, make in (
            ("unary_unary", grpc.unary_unary_rpc_method_handler),
            ("unary_stream", grpc.unary_stream_rpc_method_handler),
            ("stream_unary", grpc.stream_unary_rpc_method_handler),
            ("stream_stream", grpc.stream_stream_rpc_method_handler),
        ):
            behavior = getattr(handler, kind)
            if behavior is not None:
                return make(
                    guarded(behavior),
                    request_deserializer=handler.request_deserializer,
                    response_serializer=handler.response_serializer,
                )
        return handler

    def caller(self, context: grpc.ServicerContext) -> roles.Caller:
        pems = _auth_values(context, "x509_pem_cert")
        if not pems:  # cannot happen with require_client_auth; refuse rather than guess
            return roles.Caller("", None, "no client certificate")
        return roles.role_of(pems[0], self.admins, self.readers)


def _required(value: str, field: str) -> str:
    if not value:
        raise ConfigError(field, "is required")
    return value


# --------------------------------------------------------------------------- Pools


class PoolsServicer(rpc.PoolsServicer):
    def __init__(self, store: PoolStore) -> None:
        self.store = store

    @_translating
    def CreatePool(self, request: pb.CreatePoolRequest, context: grpc.ServicerContext) -> pb.Pool:
        record = self.store.create_pool(pool_from_dict(pool_dict(request.pool), "pool"))
        log.info("pool %s created by %s (revision %d)", record.pool.name, _who(context), record.revision)
        return pool_message(record.pool, record.revision)

    @_translating
    def GetPool(self, request: pb.GetPoolRequest, context: grpc.ServicerContext) -> pb.Pool:
        record = self.store.get_pool(_required(request.name, "name"))
        return pool_message(record.pool, record.revision)

    @_translating
    def ListPools(self, request: pb.ListPoolsRequest, context: grpc.ServicerContext) -> pb.ListPoolsResponse:
        records, revision = self.store.list_pools()
        return pb.ListPoolsResponse(
            pools=[pool_message(r.pool, r.revision) for r in sorted(records, key=lambda r: r.pool.name)],
            revision=revision,
        )

    @_translating
    def UpdatePool(self, request: pb.UpdatePoolRequest, context: grpc.ServicerContext) -> pb.Pool:
        pool = pool_from_dict(pool_dict(request.pool), "pool")
        expected = request.expected_revision if request.HasField("expected_revision") else None
        record = self.store.update_pool(pool, expected)
        log.info("pool %s updated by %s (revision %d)", pool.name, _who(context), record.revision)
        return pool_message(record.pool, record.revision)

    @_translating
    def DeletePool(self, request: pb.DeletePoolRequest, context: grpc.ServicerContext) -> pb.DeletePoolResponse:
        expected = request.expected_revision if request.HasField("expected_revision") else None
        self.store.delete_pool(_required(request.name, "name"), expected)
        log.info("pool %s deleted by %s", request.name, _who(context))
        return pb.DeletePoolResponse()


# --------------------------------------------------------------------------- Backends


class BackendsServicer(rpc.BackendsServicer):
    def __init__(self, store: PoolStore) -> None:
        self.store = store

    @_translating
    def AddBackend(self, request: pb.AddBackendRequest, context: grpc.ServicerContext) -> pb.Pool:
        record = edits.add_backend(self.store, _required(request.pool, "pool"), backend_dict(request.backend))
        return self._done(record, context, f"backend {request.backend.name or request.backend.address} added")

    @_translating
    def RemoveBackend(self, request: pb.BackendRequest, context: grpc.ServicerContext) -> pb.Pool:
        record = edits.remove_backend(self.store, _required(request.pool, "pool"), request.backend)
        return self._done(record, context, f"backend {request.backend} removed")

    @_translating
    def SetWeight(self, request: pb.SetWeightRequest, context: grpc.ServicerContext) -> pb.Pool:
        record = edits.set_weight(self.store, _required(request.pool, "pool"), request.backend, request.weight)
        return self._done(record, context, f"backend {request.backend} weight {request.weight}")

    @_translating
    def Drain(self, request: pb.BackendRequest, context: grpc.ServicerContext) -> pb.Pool:
        return self._admin(request, context, "draining")

    @_translating
    def Enable(self, request: pb.BackendRequest, context: grpc.ServicerContext) -> pb.Pool:
        return self._admin(request, context, "enabled")

    @_translating
    def Disable(self, request: pb.BackendRequest, context: grpc.ServicerContext) -> pb.Pool:
        return self._admin(request, context, "disabled")

    def _admin(self, request: pb.BackendRequest, context: grpc.ServicerContext, admin: str) -> pb.Pool:
        record = edits.set_admin(self.store, _required(request.pool, "pool"), request.backend, admin)
        return self._done(record, context, f"backend {request.backend} {admin}")

    @staticmethod
    def _done(record: PoolRecord, context: grpc.ServicerContext, what: str) -> pb.Pool:
        log.info("pool %s: %s by %s (revision %d)", record.pool.name, what, _who(context), record.revision)
        return pool_message(record.pool, record.revision)


# --------------------------------------------------------------------------- Certificates


def _utcnow() -> datetime:
    return datetime.now(UTC)


class CertificatesServicer(rpc.CertificatesServicer):
    """Certificates in the store. Validates before it writes; never returns nor logs a key.

    Also shows the answering node's view: which of its listeners name each certificate,
    and its node.toml certificates the store does not override (source "config"). Node
    state is read on the Trio thread (``token``); ``now`` is the wall clock for expiry.
    """

    def __init__(
        self, store: PoolStore, node: NodeView, token: trio.lowlevel.TrioToken, now: Callable[[], datetime] = _utcnow
    ) -> None:
        self.store = store
        self.node = node
        self.token = token
        self.now = now

    @_translating
    def PutCertificate(self, request: pb.PutCertificateRequest, context: grpc.ServicerContext) -> pb.Certificate:
        name = _certificate_name(request.name)
        for field, value in (("chain_pem", request.chain_pem), ("key_pem", request.key_pem)):
            if not value:
                raise ConfigError(field, "is required (PEM)")
            if len(value) > MAX_PEM_BYTES:
                raise ConfigError(field, f"is {len(value)} bytes; at most {MAX_PEM_BYTES} are accepted")
        cert = load_certificate(name, request.chain_pem, request.key_pem)
        expected = request.expected_revision if request.HasField("expected_revision") else None
        record = self.store.certificates.put_certificate(cert, expected)
        state = expiry(cert, self.now())
        log.info(
            "certificate %s put by %s (revision %d): %s, %s, not after %s, sha256 %s",
            name, _who(context), record.revision, ", ".join(cert.names), cert.key_type,
            cert.not_after.isoformat(), cert.fingerprint,
        )
        # An expiring or expired one is stored all the same (operators decide); every node that
        # serves it logs the WARNING (lbnode.tls.expiry_warnings), this one included.
        users, _ = self._node_view()
        return certificate_message(cert, expiry=state, revision=record.revision, listeners=users.get(name, ()),
                                   with_chain=True)

    @_translating
    def GetCertificate(self, request: pb.GetCertificateRequest, context: grpc.ServicerContext) -> pb.Certificate:
        name = _required(request.name, "name")
        users, from_file = self._node_view()
        try:
            record = self.store.certificates.get_certificate(name)
        except NotFound:
            cert = from_file.get(name)
            if cert is None:
                raise
            return certificate_message(cert, expiry=expiry(cert, self.now()), source="config",
                                       listeners=users.get(name, ()), with_chain=True)
        cert = record.certificate
        return certificate_message(cert, expiry=expiry(cert, self.now()), revision=record.revision,
                                   listeners=users.get(name, ()), with_chain=True)

    @_translating
    def ListCertificates(
        self, request: pb.ListCertificatesRequest, context: grpc.ServicerContext
    ) -> pb.ListCertificatesResponse:
        records, revision = self.store.certificates.list_certificates()
        users, from_file = self._node_view()
        now = self.now()
        messages = {
            r.certificate.name: certificate_message(r.certificate, expiry=expiry(r.certificate, now),
                                                    revision=r.revision, listeners=users.get(r.certificate.name, ()))
            for r in records
        }
        for name, cert in from_file.items():
            if name not in messages:
                messages[name] = certificate_message(cert, expiry=expiry(cert, now), source="config",
                                                     listeners=users.get(name, ()))
        return pb.ListCertificatesResponse(certificates=[messages[n] for n in sorted(messages)], revision=revision)

    @_translating
    def DeleteCertificate(
        self, request: pb.DeleteCertificateRequest, context: grpc.ServicerContext
    ) -> pb.DeleteCertificateResponse:
        name = _required(request.name, "name")
        expected = request.expected_revision if request.HasField("expected_revision") else None
        try:
            self.store.certificates.delete_certificate(name, expected)
        except NotFound:
            if name in self._node_view()[1]:
                raise NotFound(
                    f'certificate "{name}" is not in the store: it comes from [[certificates]] in this node\'s '
                    "node.toml; remove it there"
                ) from None
            raise
        log.info("certificate %s deleted by %s", name, _who(context))
        return pb.DeleteCertificateResponse()

    def _node_view(self) -> tuple[dict[str, list[str]], dict[str, Certificate]]:
        """The listeners of this node naming each certificate, and its node.toml certificates."""

        def read() -> tuple[dict[str, list[str]], dict[str, Certificate]]:
            node = self.node
            users: dict[str, list[str]] = {}
            for li in node.config.listeners:
                for name in li.tls.certificates if li.tls is not None else ():
                    users.setdefault(name, []).append(li.name)
            files = node.follower.file_certificates if node.follower is not None else node.config.certificates
            return users, {c.name: c for c in files}

        return trio.from_thread.run_sync(read, trio_token=self.token)


def _certificate_name(value: str) -> str:
    if not NAME_RE.fullmatch(_required(value, "name")):
        raise ConfigError("name", f'"{value}" is not a name (letters, digits, "_", ".", "-"; at most 63)')
    return value


# --------------------------------------------------------------------------- Routes


class RoutesServicer(rpc.RoutesServicer):
    def __init__(self, store: PoolStore, node: NodeView, token: trio.lowlevel.TrioToken) -> None:
        self.routes = RouteControl(store, node, token)

    @_translating
    def ListRoutes(self, request: pb.ListRoutesRequest, context: grpc.ServicerContext) -> pb.ListRoutesResponse:
        return self.routes.list_routes(request)

    @_translating
    def GetRoute(self, request: pb.GetRouteRequest, context: grpc.ServicerContext) -> pb.Route:
        return self.routes.get_route(request)

    @_translating
    def PutRoute(self, request: pb.PutRouteRequest, context: grpc.ServicerContext) -> pb.Route:
        return self.routes.put_route(request, _who(context))

    @_translating
    def DeleteRoute(self, request: pb.DeleteRouteRequest, context: grpc.ServicerContext) -> pb.DeleteRouteResponse:
        self.routes.delete_route(request, _who(context))
        return pb.DeleteRouteResponse()


# --------------------------------------------------------------------------- Cluster


class ClusterServicer(rpc.ClusterServicer):
    """Node reads hop onto the Trio thread (``token``); events come from the node's hub."""

    def __init__(self, node: NodeView, token: trio.lowlevel.TrioToken, control_address: str) -> None:
        self.node = node
        self.token = token
        self.control_address = control_address
        self._streams = threading.BoundedSemaphore(MAX_WATCH_STREAMS)
        self._lock = threading.Lock()
        self._subscriptions: set[Subscription] = set()
        self._closing = False

    def _on_trio(self, fn: Callable[[], R]) -> R:
        return trio.from_thread.run_sync(fn, trio_token=self.token)

    @_translating
    def ListNodes(self, request: pb.ListNodesRequest, context: grpc.ServicerContext) -> pb.ListNodesResponse:
        return pb.ListNodesResponse(nodes=self._on_trio(self._nodes))

    @_translating
    def Status(self, request: pb.StatusRequest, context: grpc.ServicerContext) -> pb.StatusResponse:
        refresh = getattr(self.node, "refresh_counters", None)  # a supervisor adds up its workers' first
        if refresh is not None:
            trio.from_thread.run(refresh, trio_token=self.token)
        return self._on_trio(self._status_message)

    @_translating
    def ListVips(self, request: pb.ListVipsRequest, context: grpc.ServicerContext) -> pb.ListVipsResponse:
        return self._on_trio(self._vips_message)

    @_translating
    def DrainNode(self, request: pb.DrainNodeRequest, context: grpc.ServicerContext) -> pb.DrainNodeResponse:
        wanted = _required(request.node_id, "node_id")
        me = self._on_trio(lambda: self.node.config.node.id)
        if wanted != me:
            peers = self._on_trio(lambda: getattr(getattr(self.node, "agent", None), "nodes", None) or {})
            info = peers.get(wanted)
            where = str(info.get("control", "")) if isinstance(info, dict) else ""
            hint = f"call {where}" if where else "it is not a live node of this cluster (lbctl nodes)"
            context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"this is node {me}, not {wanted}: a node drains only itself; {hint}",
            )
        log.info("drain requested over the control API by %s", _who(context))
        held = self._on_trio(self.node.drain)
        return pb.DrainNodeResponse(node_id=me, vips=held)

    def WatchEvents(self, request: pb.WatchEventsRequest, context: grpc.ServicerContext) -> Iterator[pb.Event]:
        if not self._streams.acquire(blocking=False):
            context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"this node serves at most {MAX_WATCH_STREAMS} event streams at once",
            )
        sub = None
        try:
            with self._lock:
                if self._closing:
                    context.abort(grpc.StatusCode.UNAVAILABLE, "the node is stopping")
                sub = self.node.events.subscribe()
                self._subscriptions.add(sub)
            context.add_callback(sub.close)  # client gone: wake the loop below at once
            # Headers go out once the subscription exists: a client that waits
            # for them sees every event published after that.
            node_id = self._on_trio(lambda: self.node.config.node.id)
            context.send_initial_metadata(())
            while True:
                try:
                    item = sub.get(STREAM_POLL)
                except StreamEnded as end:
                    if end.overflowed:
                        context.abort(
                            grpc.StatusCode.RESOURCE_EXHAUSTED,
                            "this stream fell behind and lost events: list again and watch again",
                        )
                    return
                if item is not None:
                    yield _event_message(item, node_id)
                elif not context.is_active():
                    return
        finally:
            if sub is not None:
                with self._lock:
                    self._subscriptions.discard(sub)
                sub.close()
            self._streams.release()

    def close_streams(self) -> None:
        """End every WatchEvents stream (the server is stopping); new ones are refused."""
        with self._lock:
            self._closing = True
            subs = list(self._subscriptions)
        for sub in subs:
            sub.close()

    # These run on the Trio thread: plain reads, no awaits.
    def _nodes(self) -> list[pb.Node]:
        """This node in full; in a cluster, the other live nodes as they registered (``agent.nodes``)."""
        me = self._node_message()
        peers = getattr(getattr(self.node, "agent", None), "nodes", None) or {}
        others = [
            pb.Node(id=node_id, version=str(info.get("version", "")), control_address=str(info.get("control", "")))
            for node_id, info in sorted(peers.items())
            if node_id != me.id and isinstance(info, dict)
        ]
        return sorted([me, *others], key=lambda n: n.id)

    def _node_message(self) -> pb.Node:
        node = self.node
        snap = node.snapshot
        health = pb.HealthSummary(pools=len(snap.pools))
        for pool in snap.pools.values():
            for b in pool.backends:
                health.backends += 1
                if b.health == "up":
                    health.up += 1
                elif b.health == "down":
                    health.down += 1
                else:
                    health.unknown += 1
        bound = node.bound.listeners if node.bound is not None else {}
        listeners = []
        for name, li in snap.listeners.items():
            host, port = bound.get(name, (li.bind.host, li.bind.port))
            address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
            listeners.append(pb.Listener(name=name, protocol=li.protocol, address=address, pool=li.pool))
        return pb.Node(
            id=snap.config.node.id,
            control_address=self.control_address,
            listeners=listeners,
            health=health,
            draining=node.draining,
            config_revision=node.follower.revision if node.follower is not None else 0,
            version=__version__,
        )

    def _vips_message(self) -> pb.ListVipsResponse:
        node = self.node
        msg = pb.ListVipsResponse(node_id=node.config.node.id)
        claimer = getattr(node, "vips", None)
        if claimer is None:
            return msg
        for address in sorted(claimer.vips, key=_address_key):
            spec = claimer.vips[address]
            vip = pb.Vip(address=address, prefixlen=spec.prefixlen, interface=spec.interface)
            holder = claimer.holders.get(address)
            if holder is not None:
                vip.holder = holder.node
                if holder.since > 0:
                    vip.since.FromNanoseconds(int(holder.since * 1e9))
            msg.vips.append(vip)
        return msg

    def _status_message(self) -> pb.StatusResponse:
        node = self.node
        snap = node.snapshot
        now = trio.current_time()
        queues: dict[str, int] = getattr(node, "worker_queues", {})  # a supervisor's workers', summed
        pools = []
        for name in sorted(snap.pools):
            pool = snap.pools[name]
            pools.append(
                pb.PoolStatus(
                    name=name,
                    algorithm=pool.spec.algorithm,
                    backends=[
                        pb.BackendStatus(
                            id=b.id,
                            address=str(b.spec.address),
                            weight=b.spec.weight,
                            admin=b.admin,
                            health=b.health,
                            health_reason=b.health_reason,
                            inflight=b.inflight,
                            connections=b.connections,
                            requests=b.requests,
                            failures=b.failures,
                            ejected_for=round(max(0.0, b.ejected_until - now), 3),
                            responses=response_counts(b.responses),
                            response_seconds=histogram_message(b.response_seconds),
                        )
                        for b in pool.backends
                    ],
                    queue_length=queues.get(name, len(pool.waiters)),
                    retries=pool.stats.retries,
                )
            )
        return pb.StatusResponse(
            node_id=snap.config.node.id,
            config_revision=node.follower.revision if node.follower is not None else 0,
            snapshot_version=snap.version,
            pools_count=len(snap.pools),
            pools=pools,
            draining=node.draining,
        )


def _event_message(item: Published, node_id: str) -> pb.Event:
    msg = pb.Event(seq=item.seq, node_id=node_id)
    msg.time.FromNanoseconds(int(item.time * 1e9))
    event = item.event
    if isinstance(event, PoolChange):
        change = {"created": pb.PoolChanged.CREATED, "updated": pb.PoolChanged.UPDATED}.get(
            event.change, pb.PoolChanged.DELETED
        )
        msg.pool.CopyFrom(pb.PoolChanged(name=event.name, change=change, revision=event.revision))
        if event.record is not None:
            msg.pool.pool.CopyFrom(pool_message(event.record.pool, event.record.revision))
    elif isinstance(event, BackendHealthChange):
        msg.backend_health.CopyFrom(
            pb.BackendHealthChanged(
                pool=event.pool, backend=event.backend, old=event.old, new=event.new, reason=event.reason
            )
        )
    elif isinstance(event, NodeChange):
        joined_or_left = pb.NodeChanged.JOINED if event.change == "joined" else pb.NodeChanged.LEFT
        msg.node.CopyFrom(pb.NodeChanged(node_id=event.node_id, change=joined_or_left))
    elif isinstance(event, CertificateChange):
        cert_change = {"added": pb.CertificateChanged.ADDED, "rotated": pb.CertificateChanged.ROTATED}.get(
            event.change, pb.CertificateChanged.DELETED
        )
        msg.certificate.CopyFrom(
            pb.CertificateChanged(name=event.name, change=cert_change, fingerprint=event.fingerprint,
                                  revision=event.revision)
        )
        if event.not_after is not None:
            msg.certificate.not_after.FromDatetime(event.not_after)
    elif isinstance(event, RouteChange):
        route_change = {"created": pb.RouteChanged.CREATED, "updated": pb.RouteChanged.UPDATED}.get(
            event.change, pb.RouteChanged.DELETED
        )
        msg.route.CopyFrom(pb.RouteChanged(listener=event.listener, name=event.name, change=route_change,
                                           revision=event.revision))
    elif isinstance(event, VipMove):
        msg.vip_moved.CopyFrom(
            pb.VipMoved(vip=event.vip, old_holder=event.old_holder or "", new_holder=event.new_holder or "")
        )
    return msg


def _address_key(address: str) -> tuple[int, int]:
    """VIPs in numeric order, IPv4 before IPv6 (as text, 192.0.2.10 would come before 192.0.2.9)."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return (7, 0)
    return (ip.version, int(ip))


# --------------------------------------------------------------------------- server


def _pem(value: str | None, what: str, kind: str) -> bytes:
    """A PEM value of [control]: inline PEM text, or the path of a PEM file (checked here, not at the first client)."""
    if value is None:
        raise ControlSetupError(f"control.{what}: is required for mutual TLS (or set insecure = true)")
    if value.lstrip().startswith("-----BEGIN"):
        data, where = value.encode(), "the inline value"
    else:
        try:
            data, where = Path(value).read_bytes(), value
        except OSError as exc:
            raise ControlSetupError(f"control.{what}: cannot read {value}: {exc.strerror or exc}") from None
    try:
        if kind == "key":
            load_pem_private_key(data, password=None)
        else:
            x509.load_pem_x509_certificates(data)
    except (ValueError, TypeError) as exc:
        raise ControlSetupError(f"control.{what}: {where} is not a PEM {kind} without a passphrase ({exc})") from None
    return data


def server_credentials(settings: ControlSettings) -> grpc.ServerCredentials:
    """Mutual TLS: this node's certificate, and only clients with a certificate from the cluster CA."""
    return grpc.ssl_server_credentials(
        [(_pem(settings.key, "key", "key"), _pem(settings.cert, "cert", "certificate"))],
        root_certificates=_pem(settings.ca, "ca", "certificate"),
        require_client_auth=True,
    )


async def serve_control(
    settings: ControlSettings,
    store: PoolStore,
    node: NodeView,
    *,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the control API until cancelled; ``task_status.started(port)`` once it listens.

    Raises ControlSetupError (a BindError) for an unusable certificate or address.
    """
    token = trio.lowlevel.current_trio_token()
    credentials = None if settings.insecure else server_credentials(settings)
    executor = ThreadPoolExecutor(MAX_WATCH_STREAMS + UNARY_WORKERS, thread_name_prefix="control")
    # gRPC sets SO_REUSEPORT by default: two nodes could then share a port without an error.
    server = grpc.server(executor, interceptors=[RoleGate(settings)], options=[("grpc.so_reuseport", 0)])
    rpc.add_PoolsServicer_to_server(PoolsServicer(store), server)
    rpc.add_BackendsServicer_to_server(BackendsServicer(store), server)
    rpc.add_CertificatesServicer_to_server(CertificatesServicer(store, node, token), server)
    rpc.add_RoutesServicer_to_server(RoutesServicer(store, node, token), server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (*SERVICE_NAMES, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
        server,
    )
    address = str(settings.bind)
    try:
        if credentials is None:
            port = server.add_insecure_port(address)
        else:
            port = server.add_secure_port(address, credentials)
    except RuntimeError as exc:
        executor.shutdown(wait=False)
        raise ControlSetupError(f"control.bind: cannot listen on {address}: {exc}") from None
    if port == 0:  # older grpcio reports a failed bind this way
        executor.shutdown(wait=False)
        raise ControlSetupError(f"control.bind: cannot listen on {address}: address in use or not available")
    host = settings.bind.host
    control_address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    cluster = ClusterServicer(node, token, control_address)
    rpc.add_ClusterServicer_to_server(cluster, server)
    for name in ("", *SERVICE_NAMES):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    server.start()
    if settings.insecure:
        log.warning(
            "control API on %s WITHOUT TLS (insecure = true): anyone who reaches it can change pools",
            control_address,
        )
    else:
        log.info("control API on %s (mutual TLS, roles read/admin)", control_address)
    try:
        task_status.started(port)
        await trio.sleep_forever()
    finally:
        health_servicer.enter_graceful_shutdown()
        cluster.close_streams()
        stopped = server.stop(STOP_GRACE)
        # Handlers may still hop onto this Trio thread while they finish: wait in a thread.
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(stopped.wait, STOP_GRACE + 1.0)
        executor.shutdown(wait=False)
        log.info("control API stopped")


def response_counts(by_class: list[int]) -> list[pb.ResponseCount]:
    """A backend's per-class response counters (index = status // 100) as /metrics shows them:
    2xx and 5xx always (a client's error ratio needs both), the others when not zero."""
    return [pb.ResponseCount(code=CODE_CLASSES[i], count=n) for i, n in enumerate(by_class) if n or i in (2, 5)]


def histogram_message(h: Histogram) -> pb.Histogram:
    """Cumulative counts per bound, like the exposition's ``_bucket`` series (then +Inf)."""
    return pb.Histogram(bounds=BUCKETS, counts=h.cumulative(), sum=h.sum)
