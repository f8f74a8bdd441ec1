"""The pool store over etcd, and the etcd connection every cluster module shares.

Owns the etcd client (failover across endpoints, a short deadline per call), the mapping
of etcd failures to store errors, and the ``{prefix}/pools/`` keys. Blocking: call it from
threads, never from Trio directly; it never touches the data plane.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import etcd3
import grpc
from etcd3 import etcdrpc
from etcd3 import exceptions as etcd_errors
from etcd3.etcdrpc import kv_pb2
from etcd3.utils import prefix_range_end

from lbnode.cluster.store import (
    AlreadyExists,
    Conflict,
    NotFound,
    PoolEvent,
    PoolRecord,
    Resync,
    StopFlag,
    StoreError,
    Unavailable,
)
from lbnode.model import NAME_RE, ClusterSettings, ConfigError, Pool, pool_from_dict, pool_to_dict

log = logging.getLogger("lbnode.cluster")

T = TypeVar("T")

# One attempt of an etcd call (its gRPC deadline). A healthy etcd answers in milliseconds.
CALL_TIMEOUT = 2.0
# At most this many attempts of one call may end in a deadline: enough to ride out a leader
# election (a write sent during one hangs until its deadline, then works on the new leader;
# elections take 1-2 s with etcd's defaults), short enough that a control-API request is told
# "unavailable" within about 4 s when etcd has no quorum.
MAX_DEADLINE_ATTEMPTS = 2
# Quick "no leader" answers are retried this often while the call's time lasts.
LEADERLESS_RETRY_PAUSE = 0.1
# An endpoint that failed is skipped this long while the others are tried; when every
# endpoint has failed, the oldest failure is tried again at once (so one etcd that
# restarts is found again on the next call, not after the library's 300 s default).
FAILED_ENDPOINT_SKIP = 5.0
# After a watch broke, before it is opened again: a flapping member must not make us spin.
WATCH_RETRY_PAUSE = 0.2
# gRPC channel settings. Reconnect backoff capped at 1 s (gRPC's default grows to 120 s, far
# too long to notice that etcd is back); keepalive pings find a dead peer behind a silent
# partition (etcd accepts pings every 5 s or more).
CHANNEL_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 3_000),
    ("grpc.http2.max_pings_without_data", 0),
]
# etcd cancels a watch carrying this metadata when its member loses the leader, instead of
# leaving it silently stuck on a member cut off from the cluster (clientv3's WithRequireLeader).
REQUIRE_LEADER = (("hasleader", "true"),)


class Compacted(StoreError):
    """A watch started before etcd's compacted revision: its history is gone, read everything again."""

    def __init__(self, prefix: str, start_revision: int, compact_revision: int) -> None:
        super().__init__(
            f"etcd history of {prefix} before revision {compact_revision} was compacted "
            f"(watch wanted it from {start_revision})"
        )
        self.compact_revision = compact_revision


class LeaseNotFound(StoreError):
    """The lease a write or keepalive named has expired (or was revoked)."""


@dataclass(frozen=True, slots=True)
class KeyValue:
    key: str
    value: bytes
    mod_revision: int
    lease: int  # 0 when not bound to a lease


@dataclass(frozen=True, slots=True)
class KeyEvent:
    """One change seen by a watch; ``value`` is None when the key was deleted or its lease expired."""

    key: str
    value: bytes | None
    revision: int
    lease: int = 0  # the lease the key is bound to after a put (0: none, or a delete)


def parse_endpoint(url: str) -> tuple[str, int, bool]:
    """``http(s)://host:port`` into (host, port, TLS)."""
    parts = urlsplit(url if "://" in url else f"http://{url}")
    if parts.scheme not in ("http", "https"):
        raise ValueError(f'etcd endpoint "{url}": the scheme must be http:// or https://')
    if parts.hostname is None or parts.port is None:
        raise ValueError(f'etcd endpoint "{url}" is not like "https://127.0.0.1:2379"')
    return parts.hostname, parts.port, parts.scheme == "https"


@dataclass(frozen=True, slots=True)
class EtcdTls:
    """PEM bytes for https:// endpoints: the CA that signed etcd's certificates, our client certificate."""

    ca: bytes
    cert: bytes | None = None  # None: no client certificate (etcd with --client-cert-auth refuses us)
    key: bytes | None = None

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(root_certificates=self.ca, private_key=self.key, certificate_chain=self.cert)


def load_tls(settings: ClusterSettings) -> EtcdTls | None:
    """Reads and checks ``cluster.etcd_ca/etcd_cert/etcd_key``; None for http:// endpoints.

    Raises ConfigError naming the key (``cluster.etcd_key: cannot read /etc/...: Permission denied``).
    """
    if not settings.etcd_tls:
        return None
    assert settings.etcd_ca is not None  # parse_config requires it with https://
    ca = _read_pem(settings.etcd_ca, "etcd_ca", "certificate")
    cert = None if settings.etcd_cert is None else _read_pem(settings.etcd_cert, "etcd_cert", "certificate")
    key = None if settings.etcd_key is None else _read_pem(settings.etcd_key, "etcd_key", "key")
    return EtcdTls(ca, cert, key)


def _read_pem(path: str, key: str, kind: str) -> bytes:
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"cluster.{key}", f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        if kind == "key":
            load_pem_private_key(data, password=None)
        else:
            x509.load_pem_x509_certificates(data)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"cluster.{key}", f"{path} is not a PEM {kind} without a passphrase ({exc})") from None
    return data


# How long a thread blocked in a gRPC call waits before it looks at its call again. gRPC's
# own is 0.1 s (grpc._common.MAXIMUM_WAIT_TIMEOUT, so that the main thread's signal
# handlers run while it waits); see quiet_grpc_waits.
GRPC_WAIT_POLL = 1.0


def quiet_grpc_waits() -> bool:
    """Make the threads blocked in gRPC calls wake once a second instead of ten times.

    A thread that iterates a gRPC stream (each etcd watch) or waits for a unary answer wakes
    every 0.1 s, only so that *the main thread's* signal handlers can run while it is the one
    waiting (grpc/grpc#19481). In lbnode the main thread runs Trio and every etcd call runs in
    a worker thread, where no signal handler ever runs: each of those wakes takes the GIL from
    the data plane's thread for nothing (a cluster member idles with half a dozen watches).
    At worst a Ctrl-C that lands while the main thread itself waits on gRPC (before Trio has
    started) is handled within a second. The setting is private to gRPC: returns False,
    changing nothing, if this gRPC does not have it (tests/unit/test_etcd_waits.py fails then).
    """
    from grpc import _common

    if not isinstance(getattr(_common, "MAXIMUM_WAIT_TIMEOUT", None), float):
        return False
    _common.MAXIMUM_WAIT_TIMEOUT = GRPC_WAIT_POLL
    return True


def connect(settings: ClusterSettings) -> EtcdConnection:
    """The node's connection to etcd, from ``[cluster]``; warns once when it is plain http."""
    tls = load_tls(settings)
    if tls is None:
        log.warning(
            "etcd over plain http (%s): anyone on the network path can read and rewrite pools, "
            "affinity and keys; use https:// endpoints with cluster.etcd_ca, etcd_cert and etcd_key",
            ", ".join(settings.etcd),
        )
    return EtcdConnection(settings.etcd, tls=tls)


class EtcdConnection:
    """A failover client for a list of etcd endpoints, with every failure mapped to a store error.

    Thread-safe: gRPC channels are, and the failover bookkeeping only flips endpoints
    between "in use" and "failed". ``call_retried`` says which failures are retried where.
    """

    def __init__(self, endpoints: Sequence[str], *, timeout: float = CALL_TIMEOUT, tls: EtcdTls | None = None) -> None:
        if not endpoints:
            raise ValueError("at least one etcd endpoint is required")
        self.endpoints = tuple(endpoints)
        self.timeout = timeout
        self.tls = tls is not None
        self._tls = tls
        eps = []
        for url in self.endpoints:
            host, port, secure = parse_endpoint(url)
            if secure and tls is None:
                raise ValueError(f'etcd endpoint "{url}": https:// needs the CA (cluster.etcd_ca)')
            eps.append(
                etcd3.Endpoint(
                    host, port, secure=secure, creds=tls.credentials() if secure and tls else None,
                    time_retry=FAILED_ENDPOINT_SKIP, opts=CHANNEL_OPTIONS,
                )
            )
        self.client = etcd3.MultiEndpointEtcd3Client(endpoints=eps, timeout=timeout, failover=True)
        self._preferred = eps[0].netloc
        self._closed = False
        self._prefer_first()

    def __repr__(self) -> str:
        return f"EtcdConnection({', '.join(self.endpoints)})"

    def with_timeout(self, timeout: float) -> EtcdConnection:
        """Another connection to the same members with the same TLS credentials and another
        per-call deadline (keepalives and revocations must not wait out a call stuck on a
        member that lost its leader)."""
        return EtcdConnection(self.endpoints, timeout=timeout, tls=self._tls)

    # ------------------------------------------------------------------ calls
    def call(self, what: str, fn: Callable[[etcd3.MultiEndpointEtcd3Client], T]) -> T:
        """``fn(client)`` with failover; ``what`` names the operation in error messages."""
        return self.call_retried(what, fn)[0]

    def call_retried(self, what: str, fn: Callable[[etcd3.MultiEndpointEtcd3Client], T]) -> tuple[T, bool]:
        """``fn(client)`` with failover, and whether an earlier attempt may have been applied.

        - A member that refuses the connection: the next member is tried at once; when
          every member refused, ``Unavailable`` at once (etcd is down: no waiting).
        - A member that answers "no leader": retried after a short pause (an election).
        - No answer within the deadline: tried again on another member, at most
          ``MAX_DEADLINE_ATTEMPTS`` deadlines in all. Such an attempt may still have been
          applied, hence the flag: a compare-and-swap write retried after it checks
          whether the value it finds is its own.
        """
        started = time.monotonic()
        budget = MAX_DEADLINE_ATTEMPTS * self.timeout
        refused = deadlines = 0
        maybe_applied = False
        reason = "no endpoint answered"
        while True:
            self._pick_endpoint()
            try:
                return fn(self.client), maybe_applied
            except etcd_errors.NoServerAvailableError:
                break
            except (etcd_errors.ConnectionTimeoutError, grpc.RpcError) as exc:
                if isinstance(exc, grpc.RpcError) and not _server_deadline(exc):
                    raise self._refused(what, exc) from None
                # our deadline, or etcd's own context deadline (UNKNOWN "context deadline exceeded")
                deadlines += 1
                maybe_applied = True
                reason = f"no answer within {self.timeout:g}s (no quorum, partition or overload){_details(exc)}"
                if deadlines >= MAX_DEADLINE_ATTEMPTS:
                    break
            except (etcd_errors.ConnectionFailedError, etcd_errors.InternalServerError) as exc:
                details = _details(exc)
                if "etcdserver:" in details:
                    # the member answered: it is up but has no leader (an election, or no quorum)
                    maybe_applied = maybe_applied or "timed out" in details
                    reason = f"no leader{details}"
                    self.client.endpoint_in_use.last_failed = 0  # reachable: try it again, not skip it
                    if time.monotonic() - started + LEADERLESS_RETRY_PAUSE >= budget:
                        break
                    time.sleep(LEADERLESS_RETRY_PAUSE)
                else:
                    refused += 1
                    reason = f"unreachable{details}{_tls_hint(details) if self.tls else ''}"
                    if refused >= len(self.endpoints):
                        break
            if time.monotonic() - started >= budget:
                break
        raise Unavailable(f"etcd unavailable ({', '.join(self.endpoints)}): {what}: {reason}")

    def _refused(self, what: str, exc: grpc.RpcError) -> StoreError:
        code = exc.code()
        details = exc.details() or ""
        if code == grpc.StatusCode.NOT_FOUND and "lease" in details:
            return LeaseNotFound(f"{what}: {details}")
        if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
            return Unavailable(
                f"etcd refused {what}: {details} (NOSPACE alarm: compact and defragment etcd, "
                "then `etcdctl alarm disarm`)"
            )
        if code in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED):
            return Unavailable(f"etcd refused {what}: {details} (etcd authentication is not supported yet)")
        return Unavailable(f"etcd refused {what}: {code.name}: {details}")

    def _prefer_first(self) -> None:
        """Use the first endpoint whenever it has not failed lately (the library starts on a
        random one and stays wherever a failure sent it). List a node's own member first: it
        lives and dies with the node, so a node never waits on a dead host's member while its
        own answers."""
        client = self.client
        if client._current_endpoint_label != self._preferred and not client.endpoints[self._preferred].is_failed():
            client._current_endpoint_label = self._preferred  # the library's own setter: drops old stubs

    def _pick_endpoint(self) -> None:
        """Before each call or watch: the first endpoint if it is usable; when every endpoint
        has failed, the oldest failure is tried again at once."""
        self._prefer_first()
        endpoints = list(self.client.endpoints.values())
        if all(ep.is_failed() for ep in endpoints):
            min(endpoints, key=lambda ep: ep.last_failed).last_failed = 0

    def get(self, key: str) -> KeyValue | None:
        response = self.call(f"read {key}", lambda c: c.get_response(key))
        if not response.kvs:
            return None
        return _key_value(response.kvs[0])

    def get_prefix(self, prefix: str) -> tuple[list[KeyValue], int]:
        """Every key under ``prefix`` and the store revision they were read at (linearizable)."""
        response = self.call(f"read {prefix}", lambda c: c.get_prefix_response(prefix))
        return [_key_value(kv) for kv in response.kvs], int(response.header.revision)

    def latest_mod_revision(self, prefix: str) -> int:
        """The newest ``mod_revision`` among the keys under ``prefix`` (0: none): one key, no value."""
        response = self.call(
            f"read {prefix}",
            lambda c: c.get_prefix_response(prefix, sort_order="descend", sort_target="mod", keys_only=True, limit=1),
        )
        return int(response.kvs[0].mod_revision) if response.kvs else 0

    def put(self, key: str, value: bytes, lease: int = 0) -> int:
        """Write ``key``; returns the store revision of the write."""
        response = self.call(f"write {key}", lambda c: c.put(key, value, lease=lease or None))
        return int(response.header.revision)

    def put_many(self, items: Sequence[tuple[str, bytes]], lease: int = 0) -> None:
        """Several puts in one transaction (etcd allows 128 operations per transaction)."""
        if not items:
            return
        self.call(
            f"write {len(items)} keys",
            lambda c: c.transaction(
                compare=[], success=[c.transactions.put(k, v, lease=lease or None) for k, v in items], failure=[]
            ),
        )

    def delete_many(self, keys: Sequence[str]) -> None:
        if not keys:
            return
        self.call(
            f"delete {len(keys)} keys",
            lambda c: c.transaction(compare=[], success=[c.transactions.delete(k) for k in keys], failure=[]),
        )

    def write_if(
        self, what: str, key: str, value: bytes | None, expected_revision: int | None, *, must_exist: bool = False
    ) -> tuple[bool, int]:
        """Put ``value`` at ``key`` (``None``: delete the key) only if the key is at
        ``expected_revision``: 0 means absent, ``None`` any revision (absent too, unless
        ``must_exist``; a delete always needs the key). Returns (done, revision): after a put
        the key's new mod revision, after a delete 0, after a refused compare the key's current
        mod revision (0: absent). A call retried after a lost answer counts as done when its
        first attempt had already been applied (the key holds ``value``, or is gone).
        """

        def txn(c: etcd3.MultiEndpointEtcd3Client) -> tuple[bool, list[Any]]:
            t = c.transactions
            compare = []
            if expected_revision == 0:
                compare.append(t.create(key) == 0)
            else:
                if must_exist or value is None or expected_revision is not None:
                    compare.append(t.create(key) > 0)
                if expected_revision is not None:
                    compare.append(t.mod(key) == expected_revision)
            success = [t.delete(key)] if value is None else [t.put(key, value), t.get(key)]
            return c.transaction(compare=compare, success=success, failure=[t.get(key)])  # type: ignore[no-any-return]

        (ok, responses), maybe_applied = self.call_retried(what, txn)
        current = responses[-1]
        if value is None:
            return (True, 0) if ok or (maybe_applied and not current) else (False, _mod_revision(current))
        if ok or (maybe_applied and _holds(current, value)):
            return True, _mod_revision(current)
        return False, _mod_revision(current)

    def grant(self, ttl: int) -> tuple[int, int]:
        """A new lease: (id, granted TTL in seconds; etcd may raise it to its minimum)."""
        lease = self.call(f"grant a {ttl}s lease", lambda c: c.lease(ttl))
        return int(lease.id), int(lease.ttl)

    def keepalive(self, lease_id: int) -> int:
        """Refresh a lease; returns its TTL, 0 when etcd no longer knows it (expired)."""
        responses = self.call(f"keep lease {lease_id:x} alive", lambda c: list(c.refresh_lease(lease_id)))
        return int(responses[0].TTL) if responses else 0

    def revoke(self, lease_id: int) -> None:
        """End a lease now: every key bound to it is deleted at once."""
        try:
            self.call(f"revoke lease {lease_id:x}", lambda c: c.revoke_lease(lease_id))
        except LeaseNotFound:
            pass

    def agree_on_secret(self, path: str, proposal: bytes, after_delete: str) -> tuple[bytes, bool]:
        """The cluster-wide secret at ``path`` (hex) and whether ``proposal`` became it: the first
        writer wins (a create with ``create_revision == 0``), everyone else reads the winner's.

        ``StoreError`` when etcd fails (retry); ``ValueError`` when the stored value is not a
        key of ``proposal``'s size (``after_delete`` says what happens once an operator deletes it).
        """
        value = proposal.hex().encode()

        def txn(c: etcd3.MultiEndpointEtcd3Client) -> tuple[bool, list[Any]]:
            t = c.transactions
            return c.transaction(  # type: ignore[no-any-return]
                compare=[t.create(path) == 0], success=[t.put(path, value)], failure=[t.get(path)]
            )

        ok, responses = self.call(f"create the secret {path}", txn)
        if ok:
            return proposal, True
        if not responses[0]:
            raise StoreError(f"{path} was deleted while being read")  # retried
        stored = bytes(responses[0][0][0])
        try:
            key = bytes.fromhex(stored.decode("ascii").strip())
        except ValueError:
            key = b""
        if len(key) != len(proposal):
            raise ValueError(
                f"{path} does not hold {2 * len(proposal)} hex digits; delete it (`etcdctl del {path}`) "
                f"and {after_delete}"
            )
        return key, key == proposal

    def compact(self, revision: int) -> None:
        self.call(f"compact to revision {revision}", lambda c: c.compact(revision, physical=True))

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.client.close()

    # ------------------------------------------------------------------ watch
    def watch_prefix(self, prefix: str, start_revision: int, stop: StopFlag) -> Iterator[list[KeyEvent]]:
        """Changes under ``prefix`` from ``start_revision`` on, one list per etcd response, until ``stop``.

        Raises ``Compacted`` when etcd no longer has that history, ``Unavailable`` when the
        stream breaks (member down, leader lost); returns quietly once ``stop`` is set. The
        stream is opened here on the gRPC stub (not etcd3's Watcher, which never reports a
        broken stream to its callbacks), so a failure always reaches the caller.
        """
        self._pick_endpoint()
        try:
            channel = self.client.channel
        except etcd_errors.NoServerAvailableError:
            raise Unavailable(f"etcd unavailable ({', '.join(self.endpoints)}): watch {prefix}: no endpoint") from None
        endpoint = self.client.endpoint_in_use
        key = prefix.encode()
        create = etcdrpc.WatchRequest(
            create_request=etcdrpc.WatchCreateRequest(
                key=key, range_end=prefix_range_end(key), start_revision=start_revision
            )
        )
        # Set when the stream is over: ``stop`` was set (which also cancels it), or it ended.
        over = threading.Event()

        def requests() -> Iterator[Any]:
            yield create
            # gRPC reads this generator in a thread of its own, which waits here while the stream
            # lasts. No timeout: a poll for ``stop`` would wake the thread ten times a second for
            # nothing, each time taking the GIL from the data plane's thread.
            over.wait()

        call = etcdrpc.WatchStub(channel).Watch(requests(), metadata=REQUIRE_LEADER)

        def stopped() -> None:
            over.set()
            call.cancel()

        forget = stop.on_set(stopped)  # at once if ``stop`` is set already
        try:
            for response in call:
                if response.compact_revision:
                    raise Compacted(prefix, start_revision, int(response.compact_revision))
                if response.canceled:
                    if stop.is_set():
                        return
                    raise Unavailable(
                        f"etcd at {endpoint.netloc} cancelled the watch on {prefix}: "
                        f"{response.cancel_reason or 'no reason given'}"
                    )
                if response.events:
                    yield [_key_event(ev) for ev in response.events]
        except grpc.RpcError as exc:
            if stop.is_set() or exc.code() == grpc.StatusCode.CANCELLED:
                return
            if exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                endpoint.fail()  # the next call or watch tries another member first
            details = exc.details() or ""
            raise Unavailable(
                f"etcd watch on {prefix} at {endpoint.netloc} broke: {details}{_tls_hint(details) if self.tls else ''}"
            ) from None
        finally:
            forget()
            over.set()
            call.cancel()


def _details(exc: BaseException) -> str:
    cause = exc if isinstance(exc, grpc.RpcError) else exc.__context__
    details = cause.details() if isinstance(cause, grpc.RpcError) else ""
    return f" ({details})" if details else ""


def _tls_hint(details: str) -> str:
    """What a TLS failure to etcd means for the operator (gRPC says it in OpenSSL's words)."""
    if "CERTIFICATE_VERIFY_FAILED" in details:
        return (": TLS: etcd's certificate is not trusted: is it signed by the CA in cluster.etcd_ca, "
                "and valid for the endpoint's address?")
    if any(sign in details for sign in ("BAD_CERTIFICATE", "TSI_DATA_CORRUPTED", "CERTIFICATE_REQUIRED")):
        return (": TLS: etcd refused this node's client certificate (cluster.etcd_cert, etcd_key): "
                "missing, or not signed by the CA etcd trusts (--trusted-ca-file)")
    return ""


def _server_deadline(exc: grpc.RpcError) -> bool:
    """etcd passes its context's deadline error through as UNKNOWN."""
    return exc.code() == grpc.StatusCode.UNKNOWN and "deadline exceeded" in (exc.details() or "")


def _key_value(kv: Any) -> KeyValue:
    return KeyValue(kv.key.decode(errors="replace"), bytes(kv.value), int(kv.mod_revision), int(kv.lease))


def _key_event(ev: Any) -> KeyEvent:
    if ev.type == kv_pb2.Event.DELETE:
        return KeyEvent(ev.kv.key.decode(errors="replace"), None, int(ev.kv.mod_revision))
    return KeyEvent(ev.kv.key.decode(errors="replace"), bytes(ev.kv.value), int(ev.kv.mod_revision), int(ev.kv.lease))


EventT = TypeVar("EventT")
ResyncT = TypeVar("ResyncT")


def watch_with_resync(
    conn: EtcdConnection,
    prefix: str,
    after_revision: int,
    stop: StopFlag,
    what: str,
    to_event: Callable[[KeyEvent], EventT | None],
    resync: Callable[[], tuple[ResyncT, int]],
) -> Iterator[EventT | ResyncT]:
    """The watch every store kind follows: changes under ``prefix`` after ``after_revision``
    (``to_event`` drops what it returns None for); after a compaction or a broken stream, a
    full read (``resync()``: the item to yield and its revision) and the watch goes on from
    there. ``Unavailable`` escapes only when that full read fails: the follower then retries
    with backoff and serves its last snapshot meanwhile."""
    start = after_revision + 1
    while not stop.is_set():
        try:
            for batch in conn.watch_prefix(prefix, start, stop):
                for change in batch:
                    start = change.revision + 1
                    event = to_event(change)
                    if event is not None:
                        yield event
        except Compacted as exc:
            log.info("%s watch: %s; reading every %s again", what, exc, what)
        except Unavailable as exc:
            if stop.is_set():
                return
            log.info("%s watch: %s; reading every %s again", what, exc, what)
            stop.wait(WATCH_RETRY_PAUSE)
        if stop.is_set():
            return
        item, revision = resync()
        yield item
        start = revision + 1


# ---------------------------------------------------------------------- the pool store


class EtcdStore:
    """``PoolStore`` over etcd: ``{prefix}/pools/<name>`` holds the JSON of ``pool_to_dict``.

    A pool's revision is its key's mod_revision. Creates compare ``create_revision == 0``,
    updates and deletes compare ``mod_revision`` with the revision the caller read, so no
    update is lost. A value that is not a valid pool (someone wrote it with etcdctl) is
    logged once, naming the key, and skipped: nodes keep the last valid version.
    """

    def __init__(self, settings: ClusterSettings, *, connection: EtcdConnection | None = None) -> None:
        self.settings = settings
        self.conn = connection if connection is not None else EtcdConnection(settings.etcd)
        self._owns_connection = connection is None
        self.prefix = f"{settings.prefix}/pools/"
        from lbnode.cluster.certstore import EtcdCertificates  # they build on this module
        from lbnode.cluster.routestore import EtcdRoutes

        # Certificates and routes share this store's connection: {prefix}/certs/<name>,
        # {prefix}/routes/<listener>/<name>.
        self.certificates = EtcdCertificates(self.conn, settings.prefix)
        self.routes = EtcdRoutes(self.conn, settings.prefix)
        self._logged_bad: set[tuple[str, int]] = set()  # (key, mod_revision) of invalid values logged
        self._bad_lock = threading.Lock()
        self._skipped_revision = 0  # the newest write the pool watch skipped as not a valid pool

    def close(self) -> None:
        if self._owns_connection:
            self.conn.close()

    def key(self, name: str) -> str:
        return self.prefix + name

    # ------------------------------------------------------------------ reads
    def list_pools(self) -> tuple[list[PoolRecord], int]:
        kvs, revision = self.conn.get_prefix(self.prefix)
        records = []
        for kv in kvs:
            record = self._decode(kv.key, kv.value, kv.mod_revision)
            if record is not None:
                records.append(record)
        return records, revision

    def latest_pool_revision(self) -> int:
        latest = self.conn.latest_mod_revision(self.prefix)
        # The newest write is one the watch saw and skipped (not a valid pool): nothing is
        # waiting to be applied, however far the applied revision is behind it.
        return 0 if latest == self._skipped_revision else latest

    def get_pool(self, name: str) -> PoolRecord:
        kv = self.conn.get(self.key(name))
        if kv is None:
            raise NotFound(f'pool "{name}" does not exist')
        try:
            return PoolRecord(self._parse(kv.key, kv.value), kv.mod_revision)
        except Exception as exc:  # foreign data: any failure to read it is the data's fault
            raise StoreError(
                f"{kv.key}: the stored pool is not valid ({exc}); replace it with lbctl apply, "
                f"or delete it with `etcdctl del {kv.key}`"
            ) from None

    # ------------------------------------------------------------------ writes
    def create_pool(self, pool: Pool) -> PoolRecord:
        done, revision = self.conn.write_if(f'create pool "{pool.name}"', self.key(pool.name), _encode(pool), 0)
        if not done:
            raise AlreadyExists(f'pool "{pool.name}" already exists')
        return PoolRecord(pool, revision)

    def update_pool(self, pool: Pool, expected_revision: int | None) -> PoolRecord:
        done, revision = self.conn.write_if(
            f'update pool "{pool.name}"', self.key(pool.name), _encode(pool), expected_revision, must_exist=True
        )
        if not done:
            raise self._refusal(pool.name, expected_revision, revision)
        return PoolRecord(pool, revision)

    def delete_pool(self, name: str, expected_revision: int | None = None) -> None:
        done, revision = self.conn.write_if(f'delete pool "{name}"', self.key(name), None, expected_revision)
        if not done:
            raise self._refusal(name, expected_revision, revision)

    @staticmethod
    def _refusal(name: str, expected_revision: int | None, now: int) -> StoreError:
        if not now:
            return NotFound(f'pool "{name}" does not exist')
        return Conflict(f'pool "{name}" changed since revision {expected_revision} (now at {now}): read it again and retry')

    # ------------------------------------------------------------------ watch
    def watch_pools(self, after_revision: int, stop: StopFlag) -> Iterator[PoolEvent | Resync]:
        """Changes after ``after_revision``; after a compaction or a broken stream, a ``Resync``.

        ``Unavailable`` escapes only when etcd cannot even be read for the resync: the
        follower then retries with backoff and serves its last snapshot meanwhile.
        """
        def resync() -> tuple[Resync, int]:
            records, revision = self.list_pools()
            return Resync(tuple(records), revision), revision

        yield from watch_with_resync(self.conn, self.prefix, after_revision, stop, "pool", self._event, resync)

    def _event(self, change: KeyEvent) -> PoolEvent | None:
        name = change.key[len(self.prefix):]
        if change.value is None:
            # deletes of keys that could never hold a pool are not worth an event
            return PoolEvent(name, None, change.revision) if NAME_RE.fullmatch(name) else None
        record = self._decode(change.key, change.value, change.revision)
        if record is None:
            self._skipped_revision = max(self._skipped_revision, change.revision)
            return None
        return PoolEvent(name, record, change.revision)

    # ------------------------------------------------------------------ encoding
    def _parse(self, key: str, value: bytes) -> Pool:
        name = key[len(self.prefix):]
        pool = pool_from_dict(json.loads(value), "pool")
        if pool.name != name:
            raise ConfigError("pool.name", f'"{pool.name}" does not match the key (expected "{name}")')
        return pool

    def _decode(self, key: str, value: bytes, revision: int) -> PoolRecord | None:
        try:
            return PoolRecord(self._parse(key, value), revision)
        except Exception as exc:  # foreign data: any failure to read it is the data's fault
            with self._bad_lock:
                first = (key, revision) not in self._logged_bad
                self._logged_bad.add((key, revision))
            if first:
                log.warning(
                    "%s (revision %d) is not a valid pool, skipped: %s; nodes keep its last valid "
                    "version. Fix it with lbctl apply, or `etcdctl del %s`",
                    key, revision, exc, key,
                )
            return None


def _encode(pool: Pool) -> bytes:
    return json.dumps(pool_to_dict(pool), sort_keys=True, separators=(",", ":")).encode()


def _holds(range_result: list[Any], value: bytes) -> bool:
    """Does a transaction's get (a list of (value, metadata)) show exactly ``value``?"""
    return bool(range_result) and bytes(range_result[0][0]) == value


def _mod_revision(range_result: list[Any]) -> int:
    """The mod_revision from a transaction's get (a list of (value, metadata)); 0 if the key is absent."""
    return int(range_result[0][1].mod_revision) if range_result else 0
