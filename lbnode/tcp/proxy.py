"""L4 TCP proxy: backend choice with connect failover, and the byte pump of each session.

Owns the backend socket of a session and moves bytes between it and the client
(``os.splice`` through a pipe on Linux, recv/send elsewhere); accepting is
``lbnode.listen``'s. It must never parse the bytes it moves, nor block the Trio
thread: every socket is non-blocking and waited on through trio.
"""

from __future__ import annotations

import heapq
import logging
import math
import os
import socket
import ssl
import struct
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import trio

from lbnode.accesslog import Entry, ListenerAccessLog
from lbnode.balance import PickContext
from lbnode.listen import ConnectionGate, Handler, accept_loop, bind_tcp
from lbnode.model import Listener, choose_sni_pool
from lbnode.proxyaccept import ProxyHeaderReceiver, client_port, header_for
from lbnode.runtime import BackendState, PoolRuntime, Snapshot
from lbnode.sockio import ConnectFailed, SendTimeout, half_close, recv_some, send_all
from lbnode.tls.clienthello import NEED_MORE, ClientHello, ClientHelloReader, Malformed, NotTls
from lbnode.tls.upstream import TlsSocket, open_backend

log = logging.getLogger("lbnode.tcp")

# Zero-copy is Linux-only; FULCRUM_TCP_NO_SPLICE=1 forces the copy path (benchmarks, tests).
SPLICE_AVAILABLE = sys.platform == "linux" and hasattr(os, "splice")
SPLICE_DEFAULT = SPLICE_AVAILABLE and os.environ.get("FULCRUM_TCP_NO_SPLICE", "") not in ("1", "true")
# Pipe between the two sockets: larger pipes mean fewer splice calls per GiB. 1 MiB
# is Linux's default /proc/sys/fs/pipe-max-size for unprivileged processes.
PIPE_SIZE = 1024 * 1024
_SPLICE_FLAGS = getattr(os, "SPLICE_F_MOVE", 1) | getattr(os, "SPLICE_F_NONBLOCK", 2)
_F_SETPIPE_SZ = 1031  # fcntl.F_SETPIPE_SZ, spelled out for Pythons that lack the name
# recv/send fallback buffer, per direction.
COPY_BUFFER = 256 * 1024
# A pump that never finds its source empty yields to the scheduler after this many
# bytes, so one fast session cannot starve the accept loop and the others.
YIELD_EVERY_BYTES = 16 * 1024 * 1024
# The idle watchdog looks at the activity counter this many times per idle period,
# so an idle session is closed between tcp_idle and 1.25 * tcp_idle.
IDLE_CHECKS_PER_PERIOD = 4
# One read of the ClientHello: a whole hello of a usual client (0.5-2 KiB) in one call.
HELLO_READ = 16 * 1024
# SO_LINGER {on, 0}: close() sends RST, so the peer of a broken session sees an
# abort instead of a clean end that would pass a truncated stream off as whole.
_LINGER_ABORT = struct.pack("ii", 1, 0)


class SnapshotSource(Protocol):
    """Where a proxy reads the current snapshot (``LbNode`` is one)."""

    @property
    def snapshot(self) -> Snapshot: ...


@dataclass(slots=True)
class _Activity:
    """Shared by a session's two pumps and the run's ``IdleWatch``."""

    chunks: int = 0  # bumped on every chunk moved either way
    broken: bool = False  # a pump hit an error (reset, broken pipe)
    ended: str | None = None  # why the session was cut (None: both sides ended cleanly)
    # Kept by IdleWatch: the session's scope and idle period, the count it last saw and when
    # that count last moved, and whether the session is over (its heap entry is then dead).
    scope: trio.CancelScope | None = None
    idle: float = 0.0
    last_seen: int = 0
    last_change: float = 0.0
    done: bool = False


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
            ended = await _pump_session(client, upstream, pool.spec.timeouts.tcp_idle, splice, self.io, moved)
            if entry is not None:
                entry.reason = ended
        finally:
            self.active -= 1
            backend.connections -= 1
            # least_latency learns from the connect time: a session's length says
            # nothing about the backend's speed.
            pool.finished(backend, connect_time, trio.current_time())
            # A plain close, no trio.lowlevel.notify_closing: no task waits on the socket any
            # more (the pumps' nursery has ended, the connect's deadline is disarmed), and
            # notify_closing's EPOLL_CTL_DEL was a system call per session for nothing (the
            # kernel drops a closed descriptor from the epoll set; Trio kept no entry for it
            # once its last wait ended). The client socket is closed the same way.
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


async def _pump_session(
    client: socket.socket, upstream: socket.socket | TlsSocket, idle: float, splice: bool, tally: list[int],
    moved: list[int] | None = None,
) -> str | None:
    """Move bytes both ways until both directions ended, one broke, or the pair idled; the bytes
    moved are added to ``tally`` (the listener's) and ``moved`` (the session's), [from the client,
    to the client], as they go. Returns None for a clean end, else why it ended."""
    activity = _Activity()
    moved = moved if moved is not None else [0, 0]
    watch = current_idle_watch()
    try:
        async with trio.open_nursery() as nursery:
            scope = nursery.cancel_scope
            watch.watch(activity, idle, scope, trio.current_time())
            nursery.start_soon(_one_way, upstream, client, 1, splice, activity, tally, moved, scope, client)
            # The client's direction runs in this task: one task less to start per session.
            await _one_way(client, upstream, 0, splice, activity, tally, moved, scope, client)
    finally:
        watch.forget(activity)
    if activity.broken:
        for sock in (client, upstream):
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_ABORT)
            except OSError:
                pass  # already reset by the peer; close() will do
    return activity.ended


async def _one_way(
    src: socket.socket | TlsSocket, dst: socket.socket | TlsSocket, slot: int, splice: bool, activity: _Activity,
    tally: list[int], moved: list[int], scope: trio.CancelScope, client: socket.socket,
) -> None:
    """One direction of a session; a broken one cancels ``scope``, the whole session."""
    try:
        if splice:
            # chosen by handle only when neither end is TLS
            assert isinstance(src, socket.socket) and isinstance(dst, socket.socket)
            await _splice_one_way(src, dst, activity, tally, moved, slot)
        else:
            await _copy_one_way(src, dst, activity, tally, moved, slot)
    except OSError as exc:
        log.debug("tcp session broken: %s", _describe(exc))
        activity.broken = True
        activity.ended = f"{'client' if src is client else 'backend'}: {_describe(exc)}"
        scope.cancel()


class IdleWatch:
    """The idle timeout of every TCP session of a Trio run, kept by one task.

    A task per session that slept and looked at the session's counter, then had to be
    cancelled when the session ended, was a good share of a short session's cost. Here a
    session is one heap entry: the watch looks at its chunk counter IDLE_CHECKS_PER_PERIOD
    times per idle period and cancels the session's scope once the counter has not moved
    for the whole period, so an idle session is closed between tcp_idle and 1.25 * tcp_idle
    (as before). A session that ends only marks itself done (lazy deletion, as in
    ``sockio.Deadlines``); its entry leaves when due, or when the heap is rebuilt because
    ended entries dominate (sessions much shorter than tcp_idle would pile up otherwise)."""

    # Ended entries tolerated in the heap before it is rebuilt without them.
    PRUNE_AFTER = 1000

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, _Activity]] = []
        self._seq = 0
        self._dead = 0  # ended sessions whose entry is still in the heap
        self._timer: trio.CancelScope | None = None  # the watch task's sleep, while it sleeps
        self._timer_at = math.inf
        self._running = False

    def __len__(self) -> int:
        return len(self._heap)

    def watch(self, activity: _Activity, idle: float, scope: trio.CancelScope, now: float) -> None:
        """Cut the session of ``scope`` when ``activity.chunks`` stays still for ``idle`` seconds."""
        activity.scope, activity.idle = scope, idle
        activity.last_seen, activity.last_change = activity.chunks, now
        due = now + idle / IDLE_CHECKS_PER_PERIOD
        self._seq += 1
        heapq.heappush(self._heap, (due, self._seq, activity))
        timer = self._timer
        if timer is not None:
            if due < self._timer_at:
                timer.deadline = self._timer_at = due
        elif not self._running:
            self._running = True
            trio.lowlevel.spawn_system_task(self._run, name="lbnode.tcp.IdleWatch")
        # else: the task is awake and looks at the heap before it sleeps again.

    def forget(self, activity: _Activity) -> None:
        """The session is over."""
        if activity.done:
            return  # cut for idleness: its entry has left the heap already
        activity.done = True
        activity.scope = None
        self._dead += 1
        heap = self._heap
        if self._dead > self.PRUNE_AFTER and 2 * self._dead > len(heap):
            heap[:] = [e for e in heap if not e[2].done]
            heapq.heapify(heap)
            self._dead = 0

    async def _run(self) -> None:
        heap = self._heap
        while True:
            now = trio.current_time()
            while heap and heap[0][0] <= now:
                _, seq, activity = heapq.heappop(heap)
                if activity.done:
                    self._dead -= 1
                    continue
                if activity.chunks != activity.last_seen:
                    activity.last_seen, activity.last_change = activity.chunks, now
                elif now >= activity.last_change + activity.idle:
                    log.debug("tcp session idle for %.1f s; closing", activity.idle)
                    activity.ended = f"idle for {activity.idle:g}s"
                    activity.done = True  # out of the heap: forget() has nothing to count
                    if activity.scope is not None:
                        activity.scope.cancel()
                    continue
                due = min(activity.last_change + activity.idle, now + activity.idle / IDLE_CHECKS_PER_PERIOD)
                heapq.heappush(heap, (due, seq, activity))
            self._timer_at = heap[0][0] if heap else math.inf
            with trio.CancelScope(deadline=self._timer_at) as scope:
                self._timer = scope
                try:
                    await trio.sleep_forever()
                finally:
                    self._timer = None


_IDLE_WATCH: trio.lowlevel.RunVar[IdleWatch | None] = trio.lowlevel.RunVar("lbnode.tcp.idle_watch")


def current_idle_watch() -> IdleWatch:
    """The ``IdleWatch`` of the running Trio run (created on first use)."""
    watch = _IDLE_WATCH.get(None)
    if watch is None:
        watch = IdleWatch()
        _IDLE_WATCH.set(watch)
    return watch


def _make_pipe() -> tuple[int, int]:
    r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        import fcntl  # POSIX-only, and only this Linux path needs it

        fcntl.fcntl(w, _F_SETPIPE_SZ, PIPE_SIZE)
    except OSError:
        # Over pipe-max-size or the per-user pipe budget: the default 64 KiB pipe
        # still works, with more splice calls per MiB.
        pass
    return r, w


class PipePool:
    """Empty pipes kept for the next sessions' splices (HAProxy keeps a pool too, tune.maxpipes).

    A new pipe costs four system calls (pipe2, F_SETPIPE_SZ, two closes), two per direction of
    every session: with short sessions that is a good share of a connection's cost. Only a
    pipe known to be empty comes back; one that may hold bytes of a broken session is closed.
    The pipes are plain descriptors that nothing waits on, so the pool may outlive a Trio run."""

    def __init__(self, keep: int) -> None:
        self.keep = keep  # spare pipes kept at most; more are closed
        self._spare: list[tuple[int, int]] = []

    def take(self) -> tuple[int, int]:
        return self._spare.pop() if self._spare else _make_pipe()

    def give_back(self, pipe: tuple[int, int], empty: bool) -> None:
        if empty and len(self._spare) < self.keep:
            self._spare.append(pipe)
        else:
            os.close(pipe[0])
            os.close(pipe[1])


# Spare pipes of this process: enough for a burst of short sessions; each holds no data
# (pages are only used while bytes are in a pipe), only its descriptors and ring.
PIPES = PipePool(keep=64)


async def _splice_one_way(
    src: socket.socket, dst: socket.socket, activity: _Activity, tally: list[int], moved: list[int], slot: int
) -> None:
    """socket -> pipe -> socket with os.splice; the bytes never enter Python."""
    splice = os.splice
    wait_readable = trio.lowlevel.wait_readable
    wait_writable = trio.lowlevel.wait_writable
    src_fd, dst_fd = src.fileno(), dst.fileno()
    pipe = PIPES.take()
    pipe_r, pipe_w = pipe
    n = 0  # bytes in the pipe: 0 whenever this returns normally or waits for the source
    try:
        since_yield = 0
        while True:
            try:
                n = splice(src_fd, pipe_w, PIPE_SIZE, flags=_SPLICE_FLAGS)
            except BlockingIOError:
                # The pipe is always drained before this call, so EAGAIN means the
                # source socket is empty.
                await wait_readable(src_fd)
                since_yield = 0
                continue
            if n == 0:
                break
            activity.chunks += 1
            tally[slot] += n  # per chunk (up to a pipe's 1 MiB): counted as taken from the source
            moved[slot] += n
            since_yield += n
            while n:
                try:
                    n -= splice(pipe_r, dst_fd, n, flags=_SPLICE_FLAGS)
                except BlockingIOError:
                    await wait_writable(dst_fd)
                    since_yield = 0
            if since_yield >= YIELD_EVERY_BYTES:
                since_yield = 0
                await trio.lowlevel.checkpoint()
        dst.shutdown(socket.SHUT_WR)
    finally:
        PIPES.give_back(pipe, empty=n == 0)


async def _copy_one_way(
    src: socket.socket | TlsSocket, dst: socket.socket | TlsSocket, activity: _Activity, tally: list[int],
    moved: list[int], slot: int,
) -> None:
    """recv_into one buffer, send it on; the portable path, and the TLS one (either socket
    may be an ``ssl.SSLSocket``: OpenSSL's want-read/want-write are EAGAIN here; a send
    that has to wait is retried with the same bytes, as OpenSSL requires; or a backend's
    ``TlsSocket``, which raises BlockingIOError like a plain socket)."""
    wait_readable = trio.lowlevel.wait_readable
    wait_writable = trio.lowlevel.wait_writable
    buf = bytearray(COPY_BUFFER)
    view = memoryview(buf)
    since_yield = 0
    while True:
        try:
            n = src.recv_into(buf)
        except (BlockingIOError, ssl.SSLWantReadError):
            await wait_readable(src)
            since_yield = 0
            continue
        except ssl.SSLWantWriteError:
            await wait_writable(src)
            continue
        if n == 0:
            break
        activity.chunks += 1
        tally[slot] += n
        moved[slot] += n
        since_yield += n
        sent = 0
        while sent < n:
            try:
                sent += dst.send(view[sent:n])
            except (BlockingIOError, ssl.SSLWantWriteError):
                await wait_writable(dst)
                since_yield = 0
            except ssl.SSLWantReadError:
                await wait_readable(dst)
        if since_yield >= YIELD_EVERY_BYTES:
            since_yield = 0
            await trio.lowlevel.checkpoint()
    half_close(dst)
