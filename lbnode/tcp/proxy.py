"""L4 TCP proxy: backend choice with connect failover, then each session's pump.

Owns the backend socket of a session; moving the bytes is ``lbnode.tcp.pump``'s, accepting
``lbnode.listen``'s. It must never parse the bytes it moves (a passthrough listener reads
only the ClientHello), nor block the Trio thread: every socket is non-blocking.
"""

from __future__ import annotations

import logging
import socket
import ssl
import time
from collections.abc import Callable
from typing import Protocol

import trio

from lbnode.accesslog import Entry, ListenerAccessLog
from lbnode.balance import PickContext
from lbnode.listen import ConnectionGate, Handler, accept_loop, bind_tcp
from lbnode.model import Listener, choose_sni_pool
from lbnode.proxyaccept import ProxyHeaderReceiver, client_port, header_for
from lbnode.runtime import BackendState, PoolRuntime, Snapshot
from lbnode.sockio import ConnectFailed, SendTimeout, recv_some, send_all
from lbnode.tcp.pump import SPLICE_AVAILABLE, SPLICE_DEFAULT, pump_session
from lbnode.tls.clienthello import NEED_MORE, ClientHello, ClientHelloReader, Malformed, NotTls
from lbnode.tls.upstream import TlsSocket, open_backend

log = logging.getLogger("lbnode.tcp")

# One read of the ClientHello: a whole hello of a usual client (0.5-2 KiB) in one call.
HELLO_READ = 16 * 1024


class SnapshotSource(Protocol):
    """Where a proxy reads the current snapshot (``LbNode`` is one)."""

    @property
    def snapshot(self) -> Snapshot: ...


class TcpProxy:
    """Serves the connections of one ``protocol = "tcp"`` listener.

    ``handle(sock, client_ip)`` is the handler for ``lbnode.listen.accept_loop``:
    it picks a backend from ``node.snapshot`` (failing over on refused or timed-out
    connects, at most ``retries + 1`` backends), then pumps bytes both ways until
    both sides are done, one breaks, or nothing moved for the pool's ``tcp_idle``.
    The caller owns and closes the client socket.
    """

    def __init__(
        self, listener: Listener, node: SnapshotSource, *, use_splice: bool | None = None,
        access_log: ListenerAccessLog | None = None, wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.listener = listener
        self.node = node
        self.access_log = access_log
        self.wall_clock = wall_clock
        self.use_splice = SPLICE_DEFAULT if use_splice is None else (use_splice and SPLICE_AVAILABLE)
        self.active = 0  # sessions with a backend right now
        self.total = 0  # sessions that reached a backend since start
        self.failed = 0  # clients closed because no backend could be reached
        self.io = [0, 0]  # bytes received from and sent to clients (TLS: decrypted), for /metrics
        # TLS passthrough: clients closed before a pool was chosen, by reason
        # ("hello_timeout", "malformed", "non_tls", "reset"), for tests and metrics.
        self.refused: dict[str, int] = {}

    def carry_counters(self, previous: TcpProxy) -> None:
        """A reload replaced ``previous`` (same listener): /metrics goes on from its counts.
        Bytes and refusals are shared from now on; sessions ``previous`` still serves stay out
        of ``active`` (they end there), and the ones it completes after the reload go uncounted."""
        self.total, self.failed = previous.total, previous.failed
        self.io, self.refused = previous.io, previous.refused

    async def handle(self, client: socket.socket, client_ip: str, tls_headers: bytes | None = None) -> None:
        """``client`` may be an ``ssl.SSLSocket`` whose handshake is done (``protocol = "tls"``):
        then the bytes are copied through userspace (no splice: they must be decrypted).
        ``client`` has TCP_NODELAY from its listener (``lbnode.listen.nodelay_inherited``)."""
        if self.access_log is None:
            await self._serve(client, client_ip, None)
            return
        entry = Entry(self.wall_clock(), trio.current_time(), self.listener.protocol, client_ip, client_port(client))
        if isinstance(client, ssl.SSLSocket):
            entry.tls_version = client.version()
            entry.sni = getattr(client, "fulcrum_sni", None)  # set by the SNI callback (lbnode.tls.context)
        try:
            await self._serve(client, client_ip, entry)
        finally:
            entry.duration = trio.current_time() - entry.started
            self.access_log.add(entry)

    async def _serve(self, client: socket.socket, client_ip: str, entry: Entry | None) -> None:
        listener = self.listener
        pool_name = listener.pool
        first_bytes = b""
        if listener.reads_client_hello:
            routed = await self._route_by_hello(client, client_ip, entry)
            if routed is None:
                return
            pool_name, first_bytes = routed
        if entry is not None:
            entry.pool = pool_name
        pool = self.node.snapshot.pools.get(pool_name)
        if pool is None:
            log.warning("listener %s: pool %s is not configured; closing client %s",
                        listener.name, pool_name, client_ip)
            self.failed += 1
            if entry is not None:
                entry.reason = f"pool {pool_name} is not configured"
            return
        connected = await self._connect_backend(pool, client_ip, client, entry)
        if connected is None:
            self.failed += 1
            return
        upstream, backend, connect_time = connected
        self.active += 1
        self.total += 1
        pool.started(backend)
        # this session's bytes ([from the client, to the client]) for its access log entry
        moved = [0, 0]
        try:
            if first_bytes:
                self.io[0] += len(first_bytes)  # the ClientHello read to route by SNI
                moved[0] += len(first_bytes)
                try:
                    await send_all(upstream, first_bytes, pool.spec.timeouts.tcp_idle)
                except (OSError, SendTimeout) as exc:
                    log.warning("listener %s: backend %s of pool %s broke before the ClientHello was sent: %s",
                                listener.name, backend.id, pool.spec.name, exc)
                    if entry is not None:
                        entry.reason = f"backend broke before the ClientHello was sent: {exc}"
                    return
            # TLS on either side (a tls listener, [pools.tls]) is en/decrypted in Python: no splice.
            splice = self.use_splice and not isinstance(client, ssl.SSLSocket) and not isinstance(upstream, TlsSocket)
            ended = await pump_session(client, upstream, pool.spec.timeouts.tcp_idle, splice, self.io, moved)
            if entry is not None:
                entry.reason = ended
        finally:
            self.active -= 1
            backend.connections -= 1
            # least_latency learns from the connect time: a session's length says
            # nothing about the backend's speed.
            pool.finished(backend, connect_time, trio.current_time())
            # A plain close, no trio.lowlevel.notify_closing: no task waits on the socket any
            # more (the pump has returned and unwatched its sockets, the connect's
            # deadline is disarmed), and notify_closing's EPOLL_CTL_DEL was a system call per
            # session for nothing (the kernel drops a closed descriptor from every epoll set,
            # Trio's and the run's KeptWaits; Trio kept no entry for it once its last wait
            # ended). The client socket is closed the same way.
            upstream.close()
            if entry is not None:
                entry.bytes_in, entry.bytes_out = moved

    async def _route_by_hello(
        self, client: socket.socket, client_ip: str, entry: Entry | None = None
    ) -> tuple[str, bytes] | None:
        """Read the ClientHello (without decrypting it) and choose the pool by its server name.

        Returns the pool and every byte read so far (to forward as is), or None if
        the client was refused: no hello within ``timeouts.header``, a malformed one,
        a non-TLS first byte with ``non_tls = "close"``. The first byte decides "not TLS".
        """
        listener = self.listener
        reader = ClientHelloReader()
        timeout = listener.timeouts.header
        result = reader.result
        with trio.move_on_after(timeout):
            while result is NEED_MORE:
                try:
                    data = await recv_some(client, HELLO_READ)
                except OSError as exc:
                    log.info("listener %s: %s: connection broken before the ClientHello was complete: %s",
                             listener.name, client_ip, _describe(exc))
                    self._refuse("reset", entry, f"connection broken before the ClientHello: {_describe(exc)}")
                    return None
                result = reader.feed(data) if data else reader.feed_eof()
        if entry is not None:
            entry.bytes_in = len(reader.buffered)  # what a refused client sent (a routed one: recounted)
        if result is NEED_MORE:
            log.warning("listener %s: %s: no ClientHello within %gs (%d bytes received); closing",
                        listener.name, client_ip, timeout, len(reader.buffered))
            self._refuse("hello_timeout", entry, f"no ClientHello within {timeout:g}s")
            return None
        if isinstance(result, Malformed):
            log.warning("listener %s: %s: malformed ClientHello: %s; closing", listener.name, client_ip, result.reason)
            self._refuse("malformed", entry, f"malformed ClientHello: {result.reason}")
            return None
        if isinstance(result, NotTls):
            if listener.non_tls == "close":
                log.info("listener %s: %s: first byte 0x%02x is not TLS; closing (non_tls = \"close\")",
                         listener.name, client_ip, reader.buffered[0])
                self._refuse("non_tls", entry, "not TLS (non_tls = \"close\")")
                return None
            return listener.pool, bytes(reader.buffered)
        assert isinstance(result, ClientHello)
        if entry is not None:
            entry.sni = result.server_name  # passthrough: the name the client asked for (not decrypted)
        pool = choose_sni_pool(listener.sni_routes, result.server_name)
        return (listener.pool if pool is None else pool), bytes(reader.buffered)

    def _refuse(self, kind: str, entry: Entry | None = None, reason: str = "") -> None:
        self.refused[kind] = self.refused.get(kind, 0) + 1
        if entry is not None:
            entry.reason = reason or kind

    async def _connect_backend(
        self, pool: PoolRuntime, client_ip: str, client: socket.socket, entry: Entry | None = None
    ) -> tuple[socket.socket | TlsSocket, BackendState, float] | None:
        """Connect to the pool's choice, then to the next ones when it refuses or times out.

        On success the backend's ``connections`` counter has been incremented
        (``handle`` decrements it when the session ends). With ``send_proxy`` the backend
        gets the client's PROXY header before any byte of the client's.
        """
        name = self.listener.name
        spec = pool.spec
        preamble = b""
        if spec.send_proxy is not None:
            try:
                preamble = header_for(spec.send_proxy, client)
            except OSError as exc:  # getpeername: the client has gone already
                log.info("listener %s: %s: client gone before a backend was chosen: %s", name, client_ip, _describe(exc))
                return None
        # At L4 only the client address is known: it is the key of consistent_hash
        # (whatever hash_key says) and of source_ip affinity; other affinity modes need L7.
        hash_key = client_ip.encode() if spec.algorithm == "consistent_hash" else None
        ctx = PickContext(client_ip=client_ip, hash_key=hash_key)
        stickiness = pool.stickiness if pool.stickiness is not None and pool.stickiness.mode == "source_ip" else None
        bound_to = stickiness.remembered(client_ip, _no_headers, trio.current_time(), 0.0)[0] if stickiness else None
        # (sticky() of None is None: no clock read for the sessions that are bound to nothing)
        preferred = pool.sticky(bound_to, trio.current_time()) if bound_to is not None else None
        if stickiness is not None:
            if preferred is not None:
                pool.stats.affinity_hits += 1
            else:
                pool.stats.affinity_misses += 1
        timeout = spec.timeouts.connect
        tried: set[int] = set()
        backend: BackendState | None
        while len(tried) <= spec.retries:
            # One clock read per attempt: the choice and the connect's start are the same moment
            # (nothing waits between them but a queue for room, which reads the clock again).
            now = trio.current_time()
            if preferred is not None:
                backend, preferred = preferred, None
            else:
                exclude = frozenset(tried)
                backend = pool.choose(ctx, now, exclude, retry=bool(tried))
                # Every usable backend at max_connections: wait in the pool's FIFO queue.
                deadline = now + spec.queue_timeout
                while backend is None and not tried and pool.saturated(now, exclude):
                    if not await pool.wait_for_room(deadline):
                        log.warning("listener %s: all backends of pool %s at max_connections for %gs; closing client %s",
                                    name, spec.name, spec.queue_timeout, client_ip)
                        if entry is not None:
                            entry.reason = f"all backends of pool {spec.name} are busy"
                        return None
                    now = trio.current_time()
                    backend = pool.choose(ctx, now, exclude)
            if backend is None:
                break
            tried.add(backend.index)
            if entry is not None:
                entry.backend = backend.id
                entry.attempts += 1
            # Counted while connecting too, so Backend.max_connections holds under a burst.
            backend.connections += 1
            start = now
            try:
                upstream = await open_backend(backend.spec.address, timeout, spec.tls, preamble)
            except (ConnectFailed, OSError) as exc:
                backend.connections -= 1
                timed_out = isinstance(exc, ConnectFailed) and exc.timed_out
                reason = exc.reason if isinstance(exc, ConnectFailed) else (exc.strerror or str(exc))
                log.warning("listener %s: backend %s of pool %s failed: %s",
                            name, backend.id, pool.spec.name, reason)
                pool.report(backend, "timeout" if timed_out else "connect_error", trio.current_time())
                continue
            except BaseException:
                backend.connections -= 1
                raise
            now = trio.current_time()
            pool.report(backend, None, now)
            if stickiness is not None:
                stickiness.bind(client_ip, backend.id, bound_to, now)
            if entry is not None:
                entry.backend_time = now - start
            return upstream, backend, now - start
        if tried:
            log.warning("listener %s: no backend of pool %s reachable (%d tried); closing client %s",
                        name, pool.spec.name, len(tried), client_ip)
            if entry is not None:
                entry.reason = f"no backend of pool {pool.spec.name} reachable ({len(tried)} tried)"
        else:
            log.warning("listener %s: pool %s has no usable backend; closing client %s",
                        name, pool.spec.name, client_ip)
            if entry is not None:
                entry.reason = f"no backend available in pool {pool.spec.name}"
        return None


class _CallableSource:
    def __init__(self, get_snapshot: Callable[[], Snapshot]) -> None:
        self._get = get_snapshot

    @property
    def snapshot(self) -> Snapshot:
        return self._get()


async def serve_tcp_listener(
    listener: Listener,
    get_snapshot: Callable[[], Snapshot],
    *,
    stop_accepting: trio.Event | None = None,
    use_splice: bool | None = None,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Bind and serve one ``protocol = "tcp"`` listener on its own until cancelled.

    ``task_status.started(port)`` reports the bound port once listening (port 0 in
    ``listener.bind`` picks a free one). When ``stop_accepting`` is set the listening
    socket is closed and this returns once the open sessions have ended; cancel the
    surrounding scope to cut them (drain timeout). ``use_splice=False`` forces the
    recv/send pump. A bind failure raises ``lbnode.listen.BindError`` naming the address.
    """
    proxy = TcpProxy(listener, _CallableSource(get_snapshot), use_splice=use_splice)
    lsock = bind_tcp(listener.bind, listener.backlog, f"listener {listener.name}")
    try:
        async with trio.open_nursery() as sessions:
            async with trio.open_nursery() as acceptor:
                if stop_accepting is not None:
                    acceptor.start_soon(_cancel_when_set, stop_accepting, acceptor.cancel_scope)
                gate = ConnectionGate(listener.max_connections)
                handler: Handler = proxy.handle
                if listener.proxy_protocol is not None:
                    handler = ProxyHeaderReceiver(listener, handler).handle
                acceptor.start_soon(accept_loop, lsock, handler, sessions, gate, listener.name)
                task_status.started(lsock.getsockname()[1])
            # Draining: refuse new connections at once instead of leaving them queued.
            lsock.close()
    finally:
        lsock.close()


async def _cancel_when_set(event: trio.Event, scope: trio.CancelScope) -> None:
    await event.wait()
    scope.cancel()


def _no_headers(name: str) -> None:
    return None


def _describe(exc: OSError) -> str:
    return exc.strerror or str(exc) or type(exc).__name__
