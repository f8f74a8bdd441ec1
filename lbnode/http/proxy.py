"""The L7 listener: one client connection at a time, requests forwarded to backends.

Owns moving bytes between a client and the backends with keep-alive on both
sides, streaming bodies, 100-continue, upgrades, retries of requests that are
safe to send again, and the responses the node makes itself (400, 408, 431,
502, 503, 504). Framing is in ``framing``, header rules in ``headers``, the
choice of backend in the pool's policy: this module only calls them.
"""

from __future__ import annotations

import logging
import random
import socket as stdsocket
import ssl
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol, cast

import trio

from lbnode.accesslog import Entry, ListenerAccessLog
from lbnode.balance import PickContext
from lbnode.balance.keys import extract_hash_key
from lbnode.histogram import Histogram
from lbnode.http.actions import answer, edit_request, edit_response, fixed_answer, redirect_location
from lbnode.http.framing import End, ParseError, RequestReader, ResponseReader, Upgrade
from lbnode.http.headers import (
    DROP_REQUEST_ID,
    IDEMPOTENT_METHODS,
    REQUEST_ID,
    BadRequest,
    RequestHead,
    ResponseHead,
    check_request,
    client_request_id,
    client_response_head,
    encode_trailers,
    local_authority,
    local_response,
    replace_response_header,
    response_has_no_body,
    upstream_request_head,
)
from lbnode.http.mirror import Mirrors
from lbnode.http.upstream import UpstreamConn, UpstreamPool
from lbnode.limits import RateLimiter, retry_after_seconds
from lbnode.logthrottle import LogThrottle
from lbnode.model import Listener
from lbnode.proxyaccept import client_port, header_for
from lbnode.routing import RequestFacts, Route, RouteTable, choose_pool, client_allowed
from lbnode.runtime import BackendState, PoolRuntime, Snapshot
from lbnode.sockio import (
    ConnectFailed,
    Deadlines,
    SendTimeout,
    StreamSocket,
    current_deadlines,
    current_trickle_waits,
    half_close,
    recv_some,
    recv_within,
    send_all,
    try_send,
)
from lbnode.trioloop import run_clock

log = logging.getLogger("lbnode.http")

# Bytes asked of the kernel per read: one large read per event loop turn. Python
# allocates a buffer of this size for each recv() and shrinks it afterwards, so it
# stays under glibc's default mmap threshold (128 KiB): above it, every read could
# cost an mmap, a page fault and a munmap (~13 us here, more than the read itself).
RECV_SIZE = 64 * 1024
# Name we add to Via: a pseudonym, so the node's host name does not leak.
VIA_NAME = "fulcrum"


class Node(Protocol):
    """What a listener needs from the node that runs it."""

    @property
    def snapshot(self) -> Snapshot: ...

    @property
    def draining(self) -> bool: ...

    upstreams: UpstreamPool


class ClientGone(Exception):
    """The client went away or stalled; nothing can be sent to it any more."""


class UpstreamError(Exception):
    """The exchange with a backend failed.

    ``responded`` tells whether any response byte reached us (then the request
    cannot be retried); ``status`` is what the client gets if it is not retried.
    """

    def __init__(self, reason: str, status: int = 502, responded: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status
        self.responded = responded


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%b\r\n" % (len(data), data)


@dataclass(slots=True)
class Attempt:
    """One try of a request on one backend, as a ``PoolTransport`` reports it: ``status`` is the
    backend's response status once its head arrived (0: none), counted by the proxy."""

    status: int = 0


class PoolTransport(Protocol):
    """How requests reach the backends of a pool whose ``protocol`` is not ``http1`` (``"h2"``:
    ``lbnode.http2.exchange.H2Transport``), given to ``HttpProxy`` by whoever builds it.

    The proxy does everything around one try, for every protocol alike: it chose the backend,
    counts the request in flight and its response (``attempt.status``), fills the access log
    entry's backend, and retries or answers on what ``exchange`` raises: ``ConnectFailed``
    (nothing reached the backend), ``RetryStatus`` (a ``status_retry`` answer, when
    ``may_retry()``), ``UpstreamError`` (with ``responded`` once the client has response
    bytes). ``exchange`` sends the request (``request_bytes``: the HTTP/1.1 head the proxy made
    for a backend, with the body when ``body`` is not None; else the body is still to be read
    from ``conn``), writes the response to ``conn`` as HTTP/1.1, calls ``on_head`` on its head,
    and returns whether the client connection may carry another request.
    """

    async def exchange(
        self, proxy: HttpProxy, conn: ClientConn, head: RequestHead, pool: PoolRuntime, backend: BackendState,
        request_bytes: bytes, body: list[bytes | End] | None, now: float, status_retry: frozenset[int],
        may_retry: Callable[[], bool], on_head: OnHead | None, attempt: Attempt,
    ) -> bool: ...


class ClientConn:
    """One accepted client connection and the request stream parsed from it."""

    __slots__ = (
        "sock", "ip", "reader", "eof", "served", "idle_wait", "pick_context", "deadlines", "trickle_waits", "forwarded", "io",
        "wait_readable",
        "private_upstreams",
        "received", "sent", "port", "tls_version", "sni", "entry", "mark_time", "mark_in", "mark_out",
        "request_id", "request_id_line", "request_id_drop", "route_pool", "route_cookie", "route",
    )

    def __init__(
        self, sock: stdsocket.socket, ip: str, max_header_bytes: int, forwarded: bytes = b"",
        io: list[int] | None = None,
    ) -> None:
        self.sock = sock
        self.io = io if io is not None else [0, 0]  # the listener's [bytes in, bytes out], for /metrics
        self.ip = ip
        self.forwarded = forwarded  # header lines the listener adds to every request of this connection
        self.pick_context = PickContext(client_ip=ip)
        self.deadlines = current_deadlines()  # the timeouts of this Trio run's waits
        self.trickle_waits = current_trickle_waits()  # the run's waits for heads that come in parts
        # The wait for the next request: Trio's for the first (``kept_waits``).
        self.wait_readable: Callable[[StreamSocket], Awaitable[None]] = trio.lowlevel.wait_readable
        self.reader = RequestReader(max_header_bytes)
        self.eof = False
        self.served = 0
        self.idle_wait: list[Any] | None = None  # the armed Deadlines entry while waiting between requests
        # Upstream idle keys of this connection alone (send_proxy pools), emptied when it ends.
        self.private_upstreams: list[str] | None = None
        self.received = 0  # bytes of this connection (the access log's bytes_in and bytes_out)
        self.sent = 0
        # Access log ([listeners.access_log]): the entry of the request being served, and where the
        # previous one ended (its bytes and time are this one's start).
        self.port = 0
        self.tls_version: str | None = None
        self.sni: str | None = None
        self.entry: Entry | None = None
        self.mark_time = 0.0
        self.mark_in = 0
        self.mark_out = 0
        # request_id = true: the current request's X-Request-Id; the line that adds it to the head
        # sent to the backend (b"" when the client's own is forwarded); the client field to drop.
        self.request_id: bytes | None = None
        self.request_id_line = b""
        self.request_id_drop: frozenset[bytes] = _NO_DROP
        # The pool the current request was routed to, and the Set-Cookie of a sticky split
        # that drew a side for it (added to the backend's response).
        self.route_pool = ""
        self.route_cookie: tuple[bytes, bytes] | None = None
        self.route: Route | None = None  # the route that took the current request (its actions apply)

    async def fill(self) -> None:
        """Read once from the client into the parser."""
        try:
            data = await recv_some(self.sock, RECV_SIZE)
        except OSError as exc:
            raise ClientGone(f"client read failed: {exc}") from None
        self._take(data)

    def try_fill(self) -> bool:
        """Read once from the client if that needs no wait; False if there was nothing to read."""
        try:
            data = self.sock.recv(RECV_SIZE)
        except BlockingIOError:
            return False
        except OSError as exc:
            raise ClientGone(f"client read failed: {exc}") from None
        self._take(data)
        return True

    def kept_waits(self) -> None:
        """The connection is kept alive (its first request is served): from now on a plain
        socket waits for the next request in the run's ``KeptWaits`` (registered once, no epoll
        re-arm per request), as the backend's responses to its requests do (``_relay_response``).
        Not before: for a connection that carries one request (``Connection: close``, a
        handshake per request) a kept wait costs more than Trio's (a registration, and the
        dispatcher's turns), measured in docs/performance.md. A TLS socket stays with Trio's
        waits: its records are not its bytes (``pending()``)."""
        if type(self.sock) is stdsocket.socket:
            self.wait_readable = self.deadlines.kept.wait_readable

    async def fill_before(self, deadline: float) -> bool:
        """Wait for data and read it; False if ``deadline`` passed (or the wait was ``fire``d).

        No cancel scope: this runs for nearly every request of a keep-alive
        connection, and nothing else waits on the client socket meanwhile. The wait may end
        with nothing to read (``KeptWaits`` is edge-triggered): the caller's loop waits again."""
        deadlines = self.deadlines
        armed = self.idle_wait = deadlines.arm(self.sock, deadline)
        try:
            await self.wait_readable(self.sock)
        except trio.ClosedResourceError:
            if not armed[3]:
                raise ClientGone("client socket closed") from None
            return False
        finally:
            self.idle_wait = None
            deadlines.disarm(armed)
        self.try_fill()  # readable: a rare spurious wake-up just means another turn
        return True

    async def fill_head_before(self, deadline: float) -> bool:
        """Like ``fill_before``, for the rest of a head that came in part: such a client may be
        one of thousands sending a byte every few seconds, so the wait is ``TrickleWaits``'
        (which wakes them a batch at a time) rather than a readiness wait of this task."""
        if not await self.trickle_waits.wait(self.sock, deadline):
            return False
        self.try_fill()
        return True

    def _take(self, data: bytes) -> None:
        if data:
            n = len(data)
            self.io[0] += n
            self.received += n
            self.reader.feed(data)
        else:
            self.eof = True
            self.reader.feed_eof()

    async def send(self, data: bytes, timeout: float) -> None:
        n = len(data)
        self.io[1] += n  # counted as handed over: a client that stops reading still took some
        self.sent += n
        try:
            sent = try_send(self.sock, data)
            if sent != n:  # rare: usually the kernel takes it all, and no send_all coroutine is made
                await send_all(self.sock, memoryview(data)[sent:] if sent else data, timeout)
        except OSError as exc:
            raise ClientGone(f"client write failed: {exc}") from None
        except SendTimeout:
            raise ClientGone(f"client did not read for {timeout:g}s") from None

    def answered_locally(self, status: int, reason: str) -> None:
        """The node answers this request itself (``HttpProxy._refuse``): nothing to do for an
        HTTP/1.1 connection; an HTTP/2 stream turns it into a gRPC status for a gRPC call."""

    async def body_event(self, timeout: float) -> bytes | End:
        """Next piece of the current request's body, or its End."""
        events = self.reader.events
        while not events:
            if self.eof:
                raise ClientGone("client closed the connection mid-body")
            with trio.move_on_after(timeout) as scope:
                await self.fill()
            if scope.cancelled_caught:
                raise BadRequest(f"no request body data for {timeout:g}s", status=408)
        ev = events.popleft()
        if isinstance(ev, (bytes, End)):  # noqa: UP038 (a tuple: `bytes | End` would be built per call)
            return ev
        if isinstance(ev, ParseError):
            raise BadRequest(ev.reason, ev.status)
        raise BadRequest("unexpected data in request body")


class TlsClientConn(ClientConn):
    """A client connection over a non-blocking ``ssl.SSLSocket`` (https listeners).

    OpenSSL may hold a decrypted record that the kernel no longer shows as readable, so a
    wait first looks at ``pending()``; want-read/want-write are the plain socket's EAGAIN."""

    __slots__ = ()

    def try_fill(self) -> bool:
        try:
            data = self.sock.recv(RECV_SIZE)
        except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
            return False
        except OSError as exc:
            raise ClientGone(f"client read failed: {exc}") from None
        self._take(data)
        return True

    async def fill_before(self, deadline: float) -> bool:
        if self.sock.pending():  # type: ignore[attr-defined]
            self.try_fill()
            return True
        return await super().fill_before(deadline)

    async def fill_head_before(self, deadline: float) -> bool:
        if self.sock.pending():  # type: ignore[attr-defined]
            self.try_fill()
            return True
        return await super().fill_head_before(deadline)


class HttpProxy:
    """Serves one ``[[listeners]]`` entry with ``protocol = "http"`` or ``"https"`` (whose
    connections arrive here after ``lbnode.tls.terminate`` completed their handshake)."""

    def __init__(
        self,
        listener: Listener,
        node: Node,
        clock: Callable[[], float] | None = None,
        wall_clock: Callable[[], float] = time.time,
        port: int | None = None,
        access_log: ListenerAccessLog | None = None,
        rng: random.Random | None = None,
        transports: Mapping[str, PoolTransport] | None = None,
    ) -> None:
        self.listener = listener
        # How requests reach pools whose protocol is not http1, by protocol ("h2"); the node
        # gives every L7 listener its own, as a pool may change protocol at any time.
        self.transports: Mapping[str, PoolTransport] = transports or {}
        # Used only when the node's snapshot has no table for this listener (tests' plain nodes);
        # otherwise routes come from the snapshot, which a route change swaps whole.
        self.routes = RouteTable(listener.routes)
        self.default_pool = listener.pool  # where requests no route matches go
        self.rng = rng or random.Random()  # weighted split: the side of a request (not sticky)
        self.access_log = access_log
        self.node = node
        self.clock = clock if clock is not None else run_clock()  # the run's (trioloop), one call
        self.wall_clock = wall_clock  # affinity cookies expire in wall-clock time, valid on every node
        self.proto = "https" if listener.protocol == "https" else "http"
        # X-Forwarded-Port: the port the client connected to (the bound one when bind said 0).
        self.forwarded_port = b"X-Forwarded-Port: %d\r\n" % (port if port is not None else listener.bind.port)
        tls = listener.tls
        self.hsts: list[tuple[bytes, bytes]] = (
            [(b"Strict-Transport-Security", tls.hsts.encode())] if tls is not None and tls.hsts else []
        )
        self.redirects = 0  # requests answered with the redirect to https
        # Requests a route's redirect or fixed_response answered, by status (local, for /metrics).
        self.route_answers: dict[int, int] = {}
        # Copies run in the node's nursery (attached by the node); a reload's new settings take the
        # previous ones' (carry_counters), so copies and their counters go on.
        self.mirrors = Mirrors(lambda: node.snapshot, node.upstreams, listener.routes)
        self._idle: set[ClientConn] = set()
        # A reload replaced or removed this listener: each connection closes after the response
        # it is serving or the next one (Connection: close), so its client opens a new one, to
        # the new settings. Idle ones are not closed under a client that may be sending.
        self.retired = False
        self.local_responses: dict[int, int] = {}  # status -> count, for tests and metrics
        # Local answers are counted in full above; the log takes a few per status per 10 s, so a
        # flood of 429s, 408s or 400s does not turn into a flood of log lines (lbnode/logthrottle.py).
        self._refusals_logged = LogThrottle(window=10.0, burst=5)
        # For /metrics, read at scrape time (plain integers: the data path never formats or locks).
        self.requests = 0  # request heads received
        self.backend_responses = [0] * 6  # backends' responses relayed, by status // 100
        self.request_seconds = Histogram()  # head received to response sent, local answers included
        self.io = [0, 0]  # bytes received from and sent to clients (TLS: decrypted)
        rl = listener.rate_limit
        self.rate_limiter = RateLimiter(rl.rate, rl.burst) if rl is not None else None

    def carry_counters(self, previous: HttpProxy) -> None:
        """A reload replaced ``previous`` (same listener): /metrics goes on from its counts
        instead of from zero. The tallies are shared from now on; the two plain counts are
        copied, so requests ``previous`` finishes after the reload go uncounted there."""
        self.requests, self.redirects = previous.requests, previous.redirects
        self.backend_responses, self.local_responses = previous.backend_responses, previous.local_responses
        self.request_seconds, self.io = previous.request_seconds, previous.io

    def route_like(self, successor: HttpProxy) -> None:
        """A reload replaced this listener's settings: the requests still to come on our
        connections (at most one each: they close after it) are routed by the new routes, to
        pools the new configuration has; a pool the reload removed would answer 503."""
        self.routes, self.default_pool = successor.routes, successor.default_pool

    def retire(self) -> None:
        """A reload replaced this listener's settings, or removed it (see ``retired``)."""
        self.retired = True

    def drain(self) -> None:
        """Stop keep-alive: close idle connections now, the others after their response.

        Idle means between two requests. A connection still waiting for its first request
        was just accepted and its request is on its way: closing it would lose that request
        (a planned VIP hand-off lost one that way), so it keeps its header timeout, is
        answered, and then closed like the others."""
        for conn in list(self._idle):
            if conn.idle_wait is not None and conn.served:
                conn.deadlines.fire(conn.idle_wait)

    # ------------------------------------------------------------------ connection
    async def handle(self, sock: stdsocket.socket, client_ip: str, tls_headers: bytes | None = None) -> None:
        """A plain connection; or (``tls_headers`` not None) one whose TLS handshake is done,
        with the client certificate's header lines (b"" when none). The socket has TCP_NODELAY
        from its listener (``lbnode.listen.nodelay_inherited``)."""
        if tls_headers is None:
            conn = ClientConn(sock, client_ip, self.listener.max_header_bytes, self.forwarded_port, self.io)
        else:
            conn = TlsClientConn(sock, client_ip, self.listener.max_header_bytes, self.forwarded_port + tls_headers,
                                 self.io)
        clock = self.clock
        access = self.access_log
        request_id = self.listener.request_id
        if access is not None:
            conn.port = client_port(sock)
            conn.mark_time = clock()
            if tls_headers is not None:
                conn.tls_version = sock.version()  # type: ignore[attr-defined]
                conn.sni = getattr(sock, "fulcrum_sni", None)  # set by the SNI callback (lbnode.tls.context)
        try:
            while True:
                head = await self._read_head(conn)
                if head is None:
                    return
                self.requests += 1
                started = clock()
                if request_id:
                    _assign_request_id(conn, head)
                if access is not None:
                    conn.entry = self._entry(conn, head, started)
                keep = await self._serve_request(conn, head)
                now = clock()
                self.request_seconds.observe(now - started)
                if conn.entry is not None:
                    self._log_entry(conn, now)
                if not keep:
                    return
                conn.served += 1
                if conn.served == 1:
                    conn.kept_waits()
                if self.node.draining or self.retired:
                    return
        except ClientGone as exc:
            log.debug("listener %s: %s: %s", self.listener.name, client_ip, exc)
            if conn.entry is not None and conn.entry.reason is None:
                conn.entry.reason = str(exc)
        except BadRequest as exc:
            await self._refuse(conn, None, exc.status, exc.reason)
        finally:
            if conn.entry is not None:
                self._log_entry(conn, clock())
            if conn.served:  # registered in KeptWaits only once kept alive (ClientConn.kept_waits)
                conn.deadlines.kept.forget(sock)  # the listener closes it next
            conn.reader.close()
            if conn.private_upstreams:
                self.node.upstreams.discard(conn.private_upstreams)

    async def serve_one(self, conn: ClientConn, head: RequestHead) -> bool:
        """One request as ``handle`` serves each of a connection's: counted, its request id,
        its access log entry, forwarded. For a connection that carries requests otherwise
        (one HTTP/2 stream each, ``lbnode.http2``); True if the connection may go on."""
        clock = self.clock
        self.requests += 1
        started = clock()
        if self.listener.request_id:
            _assign_request_id(conn, head)
        if self.access_log is not None:
            conn.entry = self._entry(conn, head, started)
        keep = await self._serve_request(conn, head)
        now = clock()
        self.request_seconds.observe(now - started)
        if conn.entry is not None:
            self._log_entry(conn, now)
        return keep

    def finish_entry(self, conn: ClientConn) -> None:
        """Log the entry of a request that ended abruptly (the client went away)."""
        if conn.entry is not None:
            self._log_entry(conn, self.clock())

    async def refuse(self, conn: ClientConn, status: int, reason: str) -> None:
        """A local answer outside a request's own path (a protocol error found on its body)."""
        await self._refuse(conn, None, status, reason)

    # ------------------------------------------------------------------ access log
    def _entry(self, conn: ClientConn, head: RequestHead | None, started: float) -> Entry:
        """The access log entry of a request (head None: one the node could not parse)."""
        wall = self.wall_clock() if head is not None else self.wall_clock() - (self.clock() - started)
        entry = Entry(wall, started, self.proto, conn.ip, conn.port)
        entry.tls_version = conn.tls_version
        entry.sni = conn.sni
        if head is not None:
            entry.method = head.method
            entry.target = head.target
            entry.version = head.version
            entry.request_id = conn.request_id
            for name, value in head.headers:  # one pass for both (the head was just received: started is now)
                if len(name) == 10 and name.lower() == b"user-agent":
                    entry.user_agent = value
                elif len(name) == 7 and name.lower() == b"referer":
                    entry.referer = value
        return entry

    def _log_entry(self, conn: ClientConn, now: float) -> None:
        """The request is done: its duration and bytes, and the entry to the listener's log."""
        entry = conn.entry
        assert entry is not None and self.access_log is not None
        conn.entry = None
        entry.duration = now - entry.started
        if entry.status is None:
            entry.status = 0  # nothing was sent: the client (or the exchange) went away first
        entry.bytes_in = conn.received - conn.mark_in
        entry.bytes_out = conn.sent - conn.mark_out
        conn.mark_in, conn.mark_out, conn.mark_time = conn.received, conn.sent, now
        self.access_log.add(entry)

    async def _read_head(self, conn: ClientConn) -> RequestHead | None:
        """The next request head, or None when the client is done (EOF, idle, drain)."""
        timeouts = self.listener.timeouts
        events = conn.reader.events
        head_deadline: float | None = None
        if conn.served == 0:
            head_deadline = self.clock() + timeouts.header
            if not events and not conn.eof:
                # A new connection's first request is usually there already: read it
                # without a wait. After a response, no: nothing ran since we sent it, so
                # the client cannot have answered (a pipelined request is in ``events``).
                conn.try_fill()
        while not events:
            if conn.eof:
                return None
            if conn.reader.mid_message:
                if head_deadline is None:
                    head_deadline = self.clock() + timeouts.header
                if not await conn.fill_head_before(head_deadline):
                    raise BadRequest(f"request head not received within {timeouts.header:g}s", status=408)
                continue
            if self.node.draining and conn.served:
                return None
            self._idle.add(conn)
            try:
                if head_deadline is not None:
                    # A new connection's first bytes, not there when it was accepted: a slowloris
                    # attacker's come in bursts with its peers', so this wait is TrickleWaits' too
                    # (drain ends only the waits of connections that were served: not this one).
                    received = await conn.fill_head_before(head_deadline)
                else:
                    received = await conn.fill_before(self.clock() + timeouts.idle)
            finally:
                self._idle.discard(conn)
            if not received:
                if conn.served == 0 and not self.node.draining:
                    raise BadRequest(f"request head not received within {timeouts.header:g}s", status=408)
                return None  # keep-alive idle timeout or drain: close quietly
        ev = events.popleft()
        if isinstance(ev, RequestHead):
            return ev
        if isinstance(ev, ParseError):
            raise BadRequest(ev.reason, ev.status)
        raise BadRequest("malformed request")

    async def _refuse(self, conn: ClientConn, head: RequestHead | None, status: int, reason: str,
                      close: bool = True, extra: list[tuple[bytes, bytes]] | None = None) -> None:
        """Answer with a response of our own, logged; close unless told otherwise."""
        conn.answered_locally(status, reason)
        self.local_responses[status] = self.local_responses.get(status, 0) + 1
        what = f"{head.method.decode()} {head.target[:200].decode('latin-1')}" if head else "-"
        left_out = self._refusals_logged.admit(status, self.clock())
        if left_out is not None:
            more = f" ({left_out} more {status}s not logged)" if left_out else ""
            log.warning("listener %s: %s %s -> %d %s%s", self.listener.name, conn.ip, what, status, reason, more)
        if self.access_log is not None:
            entry = conn.entry
            if entry is None:  # no request head (malformed, or not received in time)
                entry = conn.entry = self._entry(conn, None, conn.mark_time)
            entry.status = status
            entry.reason = reason
        if self.hsts:
            extra = (extra or []) + self.hsts
        if conn.request_id is not None and head is not None:
            extra = (extra or []) + [(REQUEST_ID, conn.request_id)]
        data = local_response(status, reason, close=close, extra=extra,
                              head_only=head is not None and head.method == b"HEAD")
        try:
            await conn.send(data, self.listener.timeouts.idle)
        except ClientGone:
            pass

    # ------------------------------------------------------------------ one request
    async def _serve_request(self, conn: ClientConn, head: RequestHead) -> bool:
        """Forward one request and its response; True if the connection stays open."""
        try:
            check_request(head)
        except BadRequest as exc:
            await self._refuse(conn, head, exc.status, exc.reason)
            return False
        entry = conn.entry
        if entry is not None:
            entry.host = head.host
        if self.listener.redirect_https is not None:
            return await self._redirect_https(conn, head)
        now = self.clock()  # read again only after something that waits; _forward's too
        if self.rate_limiter is not None:
            wait = self.rate_limiter.take(conn.ip, now)
            if wait > 0:
                rate = self.listener.rate_limit.rate  # type: ignore[union-attr]
                return await self._refuse_unread(conn, head, 429, f"rate limit of {rate:g}/s exceeded",
                                                 [(b"Retry-After", b"%d" % retry_after_seconds(wait))])
        snapshot = self.node.snapshot
        pool_name = self._route(conn, head, snapshot.routes.get(self.listener.name, self.routes))
        if conn.route is not None:
            answered = await self._route_actions(conn, head, conn.route)
            if answered is not None:
                return answered
        if entry is not None:
            entry.pool = pool_name
        pool = snapshot.pools.get(pool_name)
        if pool is None:
            # Deleted through the control API while this listener still names it.
            return await self._refuse_unread(conn, head, 503, f"pool {pool_name} is not configured")
        body: list[bytes | End] | None = None
        if head.has_body:
            body = await self._buffer_body(conn, head, pool)
            now = self.clock()
        else:
            events = conn.reader.events
            if events and type(events[0]) is End:
                events.popleft()  # the usual case: the End came with the head, no need to wait
            else:
                await self._expect_end(conn)
                now = self.clock()
            body = []
        spec = pool.spec
        ctx = conn.pick_context  # the client's address only: one per connection
        session = None
        if spec.algorithm == "consistent_hash" or pool.stickiness is not None:

            def header(name: str) -> str | None:
                value = head.header(name.encode("latin-1"))
                return None if value is None else value.decode("latin-1")

            if spec.algorithm == "consistent_hash":
                hash_key = extract_hash_key(spec.hash_key, conn.ip, head.path, head.query, header)
                ctx = PickContext(client_ip=conn.ip, hash_key=hash_key)
            if pool.stickiness is not None:
                bound_to, key = pool.stickiness.remembered(conn.ip, header, now, self.wall_clock())
                session = Session(key, bound_to)
        return await self._forward(conn, head, pool, ctx, body, now, session)

    async def _refuse_unread(
        self, conn: ClientConn, head: RequestHead, status: int, reason: str,
        extra: list[tuple[bytes, bytes]] | None = None,
    ) -> bool:
        """Answer before reading the body: the connection only goes on if there is none."""
        keep = await self._end_unread(conn, head)
        await self._refuse(conn, head, status, reason, close=not keep, extra=extra)
        return keep

    async def _end_unread(self, conn: ClientConn, head: RequestHead) -> bool:
        """Before an answer given without reading a body: whether the connection can go on
        (only without a body, kept alive and not an upgrade), and if so its request's end read."""
        keep = not head.has_body and head.keep_alive and not head.upgrade
        if keep:
            await self._expect_end(conn)
        return keep

    async def _redirect_https(self, conn: ClientConn, head: RequestHead) -> bool:
        """308 to the same URL over https: 308, not 301, so that a POST stays a POST."""
        port = self.listener.redirect_https
        host = (head.host or "").rsplit(":", 1)[0] if not (head.host or "").endswith("]") else head.host
        if not host:
            return await self._refuse_unread(conn, head, 400, "a Host header is required to redirect to https")
        authority = host if port == 443 else f"{host}:{port}"
        target = head.target
        if not target.startswith(b"/"):  # absolute-form (http://host/path): keep the path only
            slash = target.find(b"/", target.find(b"//") + 2)
            target = target[slash:] if slash >= 0 else b"/"
        location = b"https://" + authority.encode("latin-1") + target
        keep = await self._end_unread(conn, head)
        self.redirects += 1
        extra = [(b"Location", location)]
        if conn.request_id is not None:
            extra.append((REQUEST_ID, conn.request_id))
        if conn.entry is not None:
            conn.entry.status = 308
            conn.entry.reason = "redirect to https"
        data = local_response(308, "use https", close=not keep, extra=extra, head_only=head.method == b"HEAD")
        await conn.send(data, self.listener.timeouts.idle)
        return keep

    def _route(self, conn: ClientConn, head: RequestHead, routes: RouteTable) -> str:
        """The pool of this request (kept on ``conn``, with any split cookie to set), by
        ``routes``: the table of the snapshot the request is served with."""
        conn.route_cookie = None
        conn.route = None
        pool = self.default_pool
        if routes:
            facts = RequestFacts(head.method, head.host, head.path, head.query, head.headers, conn.ip)
            route = routes.match(facts)
            if route is not None and route.acts:
                conn.route = route
            if route is not None and not route.answers_itself:
                pool, cookie_value = choose_pool(route, facts, self.rng)
                if cookie_value is not None and route.split is not None and route.split.cookie is not None:
                    conn.route_cookie = (b"Set-Cookie", self._split_cookie(route.split.cookie, cookie_value))
        conn.route_pool = pool
        return pool

    async def _route_actions(self, conn: ClientConn, head: RequestHead, route: Route) -> bool | None:
        """The route's actions before the request goes on: True/False (keep the connection?)
        when the node answered itself (403, redirect, fixed_response), None to forward it,
        its head edited (request_headers, rewrite). Actions: lbnode.http.actions."""
        where = f"routes[{route.name}]"  # a node.toml route without a name: its place, "0", "1"...
        if route.allow_cidrs or route.deny_cidrs:
            facts = RequestFacts(head.method, head.host, head.path, head.query, head.headers, conn.ip)
            if not client_allowed(route, facts):
                return await self._refuse_unread(conn, head, 403, f"client {conn.ip} is not allowed by {where}")
        if route.redirect is not None:
            location = redirect_location(route.redirect, head, self.proto)
            if location is None:
                return await self._refuse_unread(conn, head, 400, "a Host header is required to redirect")
            return await self._answer(conn, head, route.redirect.status, f"redirect by {where}",
                                      [(b"Location", location)], route)
        if route.fixed_response is not None:
            return await self._answer(conn, head, route.fixed_response.status, f"fixed_response of {where}", [],
                                      route)
        edit_request(head, route)
        return None

    async def _answer(self, conn: ClientConn, head: RequestHead, status: int, reason: str,
                      extra: list[tuple[bytes, bytes]], route: Route) -> bool:
        """A route's own answer: logged with ``reason`` (the access log's mark of a local answer,
        as for the node's errors) and counted as a local response; no Via."""
        keep = await self._end_unread(conn, head)
        self.route_answers[status] = self.route_answers.get(status, 0) + 1
        if conn.entry is not None:
            conn.entry.status = status
            conn.entry.reason = reason
        extra = extra + self.hsts
        if conn.request_id is not None:
            extra.append((REQUEST_ID, conn.request_id))
        head_only = head.method == b"HEAD"
        if route.fixed_response is not None:
            data = fixed_answer(route.fixed_response, extra, close=not keep, head_only=head_only)
        else:
            data = answer(status, b"", None, extra, close=not keep, head_only=head_only)
        await conn.send(data, self.listener.timeouts.idle)
        return keep

    def _split_cookie(self, name: str, pool: str) -> bytes:
        # A session cookie: the side is kept while the browser runs, and a new one drawn after.
        secure = "; Secure" if self.proto == "https" else ""
        return f"{name}={pool}; Path=/; HttpOnly; SameSite=Lax{secure}".encode("latin-1")

    async def _expect_end(self, conn: ClientConn) -> None:
        ev = await conn.body_event(self.listener.timeouts.body)
        if not isinstance(ev, End):
            raise BadRequest("request body where none was announced")

    async def _buffer_body(self, conn: ClientConn, head: RequestHead, pool: PoolRuntime) -> list[bytes | End] | None:
        """The whole body if it is small enough to keep for a retry, else None (stream it)."""
        limit = pool.spec.retry_buffer_bytes
        events = conn.reader.events
        # Already received with the head (the common case for small bodies)?
        size = 0
        for i, ev in enumerate(events):
            if isinstance(ev, bytes):
                size += len(ev)
                if size > limit:
                    break
            elif isinstance(ev, End):
                # Only bytes came before End: anything else ended this loop.
                return cast("list[bytes | End]", [events.popleft() for _ in range(i + 1)])
            elif isinstance(ev, ParseError):
                # Already known to be malformed: refuse before anything reaches a backend.
                raise BadRequest(ev.reason, ev.status)
            else:
                break
        if head.expect_continue or head.content_length is None or head.content_length > limit:
            return None
        taken: list[bytes | End] = []
        while True:
            ev = await conn.body_event(self.listener.timeouts.body)
            taken.append(ev)
            if isinstance(ev, End):
                return taken

    def _local_authority(self, conn: ClientConn) -> bytes:
        """The Host for a request that has none: the address the client connected to."""
        try:
            name = conn.sock.getsockname()
        except OSError:
            return b""
        return local_authority(name[0], name[1], self.proto)

    async def _forward(
        self,
        conn: ClientConn,
        head: RequestHead,
        pool: PoolRuntime,
        ctx: PickContext,
        body: list[bytes | End] | None,
        now: float,
        session: Session | None = None,
    ) -> bool:
        """Try backends until one answers; relay its response. ``now``: the clock, read since the
        request last waited."""
        spec = pool.spec
        tried: set[int] = set()
        retries_left = spec.retries
        fresh_retry_used = False
        last: UpstreamError | None = None
        budget = pool.retry_budget
        budget.record_request(now)
        extra = conn.forwarded + conn.request_id_line if conn.request_id_line else conn.forwarded
        # HTTP/1.0 without Host (rare): the Host it goes upstream with
        default_host = self._local_authority(conn) if head.host is None and head.authority is None else b""
        request_bytes = upstream_request_head(head, conn.ip, self.proto, VIA_NAME, extra, conn.request_id_drop,
                                              default_host)
        if body:
            request_bytes += self._encode_body(head, body)
        route = conn.route
        if route is not None and route.mirror is not None and self.rng.random() * 100 < route.mirror.percent:
            self._mirror(conn, head, route, request_bytes if body is not None else None, body)
        # Only a request we can send again, and whose method allows it, may be retried on a status.
        status_retry = pool.retry_on if body is not None and head.method in IDEMPOTENT_METHODS else _NO_STATUSES

        def may_retry() -> bool:
            return retries_left > 0 and budget.try_acquire(self.clock())

        # A session bound to a backend that can still serve it goes there first.
        preferred = None
        if session is not None:
            preferred = pool.sticky(session.bound_to, now)
            if preferred is not None:
                pool.stats.affinity_hits += 1
            else:
                pool.stats.affinity_misses += 1
        backend: BackendState | None
        while True:
            exclude = frozenset(tried) if tried else _NO_INDEXES
            if preferred is not None:
                backend, preferred = preferred, None
            else:
                backend = pool.choose(ctx, now, exclude, retry=bool(tried) or fresh_retry_used)
            if backend is None and pool.saturated(now, exclude):
                # Every usable backend is at max_inflight: wait our turn (FIFO).
                while backend is None and pool.saturated(now, exclude):
                    if not await pool.wait_for_room(now + spec.queue_timeout if not tried else now):
                        break
                    now = self.clock()
                    backend = pool.choose(ctx, now, exclude, retry=bool(tried) or fresh_retry_used)
                if backend is None and last is None:
                    await self._refuse(conn, head, 503, f"all backends of pool {spec.name} are busy",
                                       close=not self._can_continue(conn, head, body),
                                       extra=[(b"Retry-After", b"%d" % max(1, round(spec.queue_timeout)))])
                    return self._can_continue(conn, head, body)
            if backend is None:
                if last is None:
                    await self._refuse(conn, head, 503, f"no backend available in pool {spec.name}",
                                       close=not self._can_continue(conn, head, body),
                                       extra=[(b"Retry-After", b"1")])
                    return self._can_continue(conn, head, body)
                break
            try:
                return await self._exchange(conn, head, pool, backend, request_bytes, body, now,
                                            status_retry, may_retry, session)
            except ConnectFailed as exc:
                log.warning("pool %s: backend %s: %s", spec.name, backend.id, exc.reason)
                now = self.clock()
                pool.report(backend, "timeout" if exc.timed_out else "connect_error", now)
                last = UpstreamError(f"backend {backend.id}: {exc.reason}", 504 if exc.timed_out else 502)
                # Nothing reached any backend: moving the request elsewhere adds no load,
                # so it is limited by `retries` only, not by the retry budget (HAProxy's redispatch).
                if retries_left <= 0:
                    break
            except _RetryFresh:
                # A pooled connection the backend had closed: one free retry on a new one.
                now = self.clock()
                if not fresh_retry_used:
                    fresh_retry_used = True
                    pool.stats.retries += 1
                    continue
                last = UpstreamError(f"backend {backend.id} closed the connection", 502)
                pool.report(backend, "reset", now)
                if not may_retry():
                    break
            except RetryStatus as exc:
                # may_retry() already allowed (and counted) this retry.
                log.info("pool %s: backend %s answered %d; retrying elsewhere", spec.name, backend.id, exc.status)
                now = self.clock()
                pool.report(backend, "http_5xx", now)
                last = UpstreamError(f"backend {backend.id} answered {exc.status}", exc.status)
            except UpstreamError as exc:
                log.warning("pool %s: backend %s: %s", spec.name, backend.id, exc.reason)
                now = self.clock()
                pool.report(backend, "timeout" if exc.status == 504 else "reset", now)
                if exc.responded:
                    if conn.entry is not None:
                        conn.entry.reason = exc.reason
                    return False  # the client has part of a response: all we can do is close
                if body is None or exc.status == 504:
                    # A streamed body is gone, and a slow backend may still act on the request.
                    await self._refuse(conn, head, exc.status, exc.reason)
                    return False
                last = exc
                if not may_retry():
                    break
            tried.add(backend.index)
            retries_left -= 1
            pool.stats.retries += 1
        assert last is not None
        await self._refuse(conn, head, last.status, last.reason)
        return False

    def _mirror(self, conn: ClientConn, head: RequestHead, route: Route, request_bytes: bytes | None,
                body: list[bytes | End] | None) -> None:
        """Hand a copy to the route's mirror (never waits); a body over its max_body_bytes, or
        streamed (not in hand), is not copied (counted as dropped, reason "body")."""
        mirror = route.mirror
        assert mirror is not None
        if body and sum(len(ev) for ev in body if isinstance(ev, bytes)) > mirror.max_body_bytes:
            request_bytes = None
        self.mirrors.submit(route.name, mirror, request_bytes, head.method, conn.ip, conn.sock)

    def _can_continue(self, conn: ClientConn, head: RequestHead, body: object) -> bool:
        """After a local response, may the connection serve another request?"""
        return body is not None and head.keep_alive and not head.upgrade

    @staticmethod
    def _encode_body(head: RequestHead, body: list[bytes | End]) -> bytes:
        if not head.chunked:
            return b"".join(ev for ev in body if isinstance(ev, bytes))
        out = []
        for ev in body:
            out.append(chunk(ev) if isinstance(ev, bytes) else encode_trailers(ev.trailers))
        return b"".join(out)

    def _session_hook(self, pool: PoolRuntime, backend: BackendState, session: Session) -> OnHead:
        """Once the backend answered: bind the session to it and tell the client if needed."""

        def on_head(resp: ResponseHead) -> list[tuple[bytes, bytes]]:
            stickiness = pool.stickiness
            if stickiness is None:
                return []
            now = self.clock()
            stickiness.bind(session.key, backend.id, session.bound_to, now)
            stickiness.learn(resp.headers, backend.id, now)
            return stickiness.response_headers(backend.id, session.bound_to, self.wall_clock(), self.proto == "https")

        return on_head

    # ------------------------------------------------------------------ exchange
    async def _exchange(
        self,
        conn: ClientConn,
        head: RequestHead,
        pool: PoolRuntime,
        backend: BackendState,
        request_bytes: bytes,
        body: list[bytes | End] | None,
        now: float,
        status_retry: frozenset[int] = frozenset(),
        may_retry: Callable[[], bool] = lambda: False,
        session: Session | None = None,
    ) -> bool:
        spec = pool.spec
        on_head = self._session_hook(pool, backend, session) if session is not None else None
        if spec.protocol != "http1":
            return await self._exchange_by(self._transport(pool), conn, head, pool, backend, request_bytes, body,
                                           now, status_retry, may_retry, on_head)
        upstreams = self.node.upstreams
        self._attempt_started(conn, pool, backend, now)
        started = now  # (read by the caller just before; the latency includes any connect)
        reusable = False
        status = 0
        up: UpstreamConn | None = None
        try:
            key, preamble = backend.upstream_key, b""
            if spec.send_proxy is not None:
                key, preamble = _private_upstream(conn, key, spec.send_proxy)
            up = upstreams.take(key, now)
            if up is None:
                up = await upstreams.connect(backend.spec.address, spec.timeouts.connect, spec.tls, key, preamble)
            timeouts = spec.timeouts
            if body is not None:
                # Whole request in hand: send it, then read the response (one coroutine
                # less on the way to every response wait than the streaming case).
                await self._send_request(up, request_bytes, timeouts.response)
                result, reusable, status = await self._relay_response(
                    conn, head, up, timeouts.response, _done, status_retry, may_retry, on_head
                )
            else:
                result, reusable, status = await self._exchange_streaming(
                    conn, head, up, request_bytes, timeouts.response, may_retry, on_head
                )
            return result
        finally:
            end = self._attempt_ended(pool, backend, started, status)
            if up is not None:
                if reusable:
                    upstreams.give_back(up, end, spec.max_idle_per_backend)
                else:
                    up.close()

    def _attempt_started(self, conn: ClientConn, pool: PoolRuntime, backend: BackendState, now: float) -> None:
        """A try on ``backend`` begins (every protocol): counted in flight before connecting, so
        that requests arriving together see each other instead of all passing max_inflight while
        their connects are under way; the access log entry names the backend."""
        backend.inflight += 1
        pool.started(backend)
        entry = conn.entry
        if entry is not None:
            entry.backend = backend.id
            entry.attempts += 1
            entry.backend_start = now
            entry.backend_time = None

    def _attempt_ended(self, pool: PoolRuntime, backend: BackendState, started: float, status: int) -> float:
        """The try is over (answered or failed): out of flight, its response counted; returns the time."""
        backend.inflight -= 1
        end = self.clock()
        pool.finished(backend, end - started, end)
        if status:
            if status >= 500 or pool.outlier is not None:  # (a success without outlier detection: nothing to do)
                pool.report(backend, "http_5xx" if status >= 500 else None, end)
            kind = status // 100 if status < 600 else 0
            backend.responses[kind] += 1
            self.backend_responses[kind] += 1
            backend.response_seconds.observe(end - started)
        return end

    def _transport(self, pool: PoolRuntime) -> PoolTransport:
        transport = self.transports.get(pool.spec.protocol)
        if transport is None:  # a listener built without it: never send HTTP/1.1 to such a pool
            raise UpstreamError(f'pool {pool.spec.name}: protocol "{pool.spec.protocol}" is not served here', 502)
        return transport

    async def _exchange_by(
        self, transport: PoolTransport, conn: ClientConn, head: RequestHead, pool: PoolRuntime,
        backend: BackendState, request_bytes: bytes, body: list[bytes | End] | None, now: float,
        status_retry: frozenset[int], may_retry: Callable[[], bool], on_head: OnHead | None,
    ) -> bool:
        """One try over a ``PoolTransport``, with the same bookkeeping as an HTTP/1.1 one."""
        self._attempt_started(conn, pool, backend, now)
        attempt = Attempt()
        try:
            return await transport.exchange(self, conn, head, pool, backend, request_bytes, body, now, status_retry,
                                            may_retry, on_head, attempt)
        finally:
            self._attempt_ended(pool, backend, now, attempt.status)

    @staticmethod
    async def _send_request(up: UpstreamConn, request_bytes: bytes, timeout: float) -> None:
        """Send the request head (and the body we have) to the backend."""
        try:
            sent = try_send(up.sock, request_bytes)
            if sent != len(request_bytes):
                await send_all(up.sock, memoryview(request_bytes)[sent:] if sent else request_bytes, timeout)
        except OSError as exc:
            if up.reused:
                raise _RetryFresh() from None
            raise UpstreamError(f"send failed: {exc}") from None
        except SendTimeout:
            raise UpstreamError(f"backend did not read the request for {timeout:g}s", 504) from None

    async def _exchange_streaming(
        self,
        conn: ClientConn,
        head: RequestHead,
        up: UpstreamConn,
        request_head: bytes,
        response_timeout: float,
        may_retry: Callable[[], bool],
        on_head: OnHead | None,
    ) -> tuple[bool, bool, int]:
        """Send the head, then stream the body while relaying the response (100-continue,
        early answers). Returns (keep client, reuse upstream, response status)."""
        await self._send_request(up, request_head, response_timeout)
        # Errors are carried out of the nursery by hand so that callers see plain
        # exceptions, not ExceptionGroups.
        state = _BodyState()
        relay_error: Exception | None = None
        result = (False, False, 0)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._stream_body, conn, head, up, state, nursery.cancel_scope)
            try:
                result = await self._relay_response(
                    conn, head, up, response_timeout, lambda: state.done, _NO_STATUSES, may_retry, on_head
                )
            except _RetryFresh:
                relay_error = UpstreamError("backend closed the connection before responding")
            except Exception as exc:
                relay_error = exc
            finally:
                nursery.cancel_scope.cancel()
        if state.error is not None:
            raise state.error
        if relay_error is not None:
            raise relay_error
        keep_client, reuse, status = result
        return keep_client and state.done, reuse and state.done, status

    async def _stream_body(
        self, conn: ClientConn, head: RequestHead, up: UpstreamConn, state: _BodyState, scope: trio.CancelScope
    ) -> None:
        timeout = self.listener.timeouts.body
        try:
            while True:
                ev = await conn.body_event(timeout)
                if isinstance(ev, bytes):
                    data = chunk(ev) if head.chunked else ev
                else:
                    data = encode_trailers(ev.trailers) if head.chunked else b""
                if data:
                    try:
                        await send_all(up.sock, data, self.listener.timeouts.body)
                    except (OSError, SendTimeout):
                        # The backend stopped reading (e.g. it answered early): its response decides.
                        state.upstream_closed = True
                        return
                if isinstance(ev, End):
                    state.done = True
                    return
        except (BadRequest, ClientGone) as exc:
            state.error = exc
            scope.cancel()

    async def _relay_response(
        self,
        conn: ClientConn,
        head: RequestHead,
        up: UpstreamConn,
        response_timeout: float,
        request_done: Callable[[], bool],
        status_retry: frozenset[int],
        may_retry: Callable[[], bool],
        on_head: OnHead | None = None,
    ) -> tuple[bool, bool, int]:
        reader = up.response_reader(head.method)
        events = reader.events
        responded = False
        write_timeout = self.listener.timeouts.idle
        fill = self._fill_response
        deadlines = conn.deadlines
        kept = conn.served > 0  # a kept-alive client's responses wait in KeptWaits (ClientConn.kept_waits)

        # Head (after any 1xx interim responses, which a 1.1 client gets too).
        while True:
            while not events:
                if not await fill(up, reader, response_timeout, responded, deadlines, kept):
                    if not responded and up.reused:
                        raise _RetryFresh()
                    raise UpstreamError("backend closed the connection before responding", responded=responded)
            ev = events.popleft()
            if isinstance(ev, ParseError):
                raise UpstreamError(f"invalid response: {ev.reason}", 502, responded=responded)
            if not isinstance(ev, ResponseHead):
                raise UpstreamError("invalid response", 502, responded=responded)
            responded = True
            if ev.status == 101 or ev.status >= 200:
                resp = ev
                break
            # interim response: its End follows immediately
            while not events:
                if not await fill(up, reader, response_timeout, True, deadlines, kept):
                    raise UpstreamError("backend closed after an interim response", responded=True)
            events.popleft()
            if head.version == "1.1":
                await conn.send(b"HTTP/1.1 %d %b\r\n\r\n" % (ev.status, ev.reason or b"Continue"), write_timeout)

        entry = conn.entry
        if entry is not None:
            entry.status = resp.status
            entry.backend_time = self.clock() - entry.backend_start
        if resp.status in status_retry and may_retry():
            raise RetryStatus(resp.status)
        if conn.route is not None and conn.route.response_headers is not None:
            edit_response(resp, conn.route.response_headers)  # before the node's own fields: they win
        if on_head is not None:
            resp.add_headers(on_head(resp))
        if conn.route_cookie is not None:
            resp.add_headers([conn.route_cookie])
        if self.hsts:
            resp.add_headers(self.hsts)
        if conn.request_id is not None:
            replace_response_header(resp, REQUEST_ID, conn.request_id)

        if resp.status == 101:
            if not head.upgrade:
                raise UpstreamError("101 Switching Protocols without an upgrade request", 502, responded=True)
            await self._tunnel(conn, head, up, resp, reader)
            return False, False, 101

        no_body = response_has_no_body(head.method, resp.status)
        close_delimited = not no_body and resp.content_length is None and not resp.chunked
        keep_client = (
            head.keep_alive
            and not close_delimited
            and request_done()
            and not head.upgrade
            and not self.node.draining
            and not self.retired
        )
        chunked = resp.chunked and not no_body
        out: list[bytes] = [
            client_response_head(resp, VIA_NAME, keep_alive=keep_client, chunked=chunked, client_version=head.version)
        ]
        finished = False
        while True:
            while events:
                ev = events.popleft()
                if isinstance(ev, bytes):
                    out.append(chunk(ev) if chunked else ev)
                elif isinstance(ev, End):
                    if chunked:
                        out.append(encode_trailers(ev.trailers))
                    finished = True
                    break
                else:
                    # Garbage mid-body: the client already has the head, so all we can do is cut.
                    if out:
                        await conn.send(b"".join(out), write_timeout)
                    raise ClientGone(f"backend sent an invalid body: {getattr(ev, 'reason', ev)}")
            if out:
                await conn.send(out[0] if len(out) == 1 else b"".join(out), write_timeout)
                out.clear()
            if finished:
                break
            if not await fill(up, reader, response_timeout, True, deadlines, kept):
                if close_delimited:
                    break
                raise ClientGone("backend closed the connection mid-response")
        reuse = finished and resp.keep_alive and not close_delimited and not reader.broken
        return keep_client, reuse, resp.status

    @staticmethod
    async def _fill_response(
        up: UpstreamConn, reader: ResponseReader, timeout: float, responded: bool, deadlines: Deadlines, kept: bool
    ) -> bool:
        """Read once from the backend into ``reader``; False at EOF. ``kept``: wait in KeptWaits."""
        try:
            data = await recv_within(
                up.sock, RECV_SIZE, timeout, expect_wait=not responded, deadlines=deadlines, kept=kept
            )
        except OSError as exc:
            if not responded and up.reused:
                raise _RetryFresh() from None
            raise UpstreamError(f"read failed: {exc}", responded=responded) from None
        if data is None:
            raise UpstreamError(f"no response within {timeout:g}s", 504, responded=responded)
        if not data:
            return False
        reader.feed(data)
        return True

    async def _tunnel(
        self, conn: ClientConn, head: RequestHead, up: UpstreamConn, resp: ResponseHead, reader: ResponseReader
    ) -> None:
        """Relay 101 and then bytes both ways until both sides are done (WebSocket)."""
        upstream_rest = b""
        while reader.events:
            ev = reader.events.popleft()
            if isinstance(ev, Upgrade):
                upstream_rest = ev.rest
        client_rest = b""
        while conn.reader.events:
            ev2 = conn.reader.events.popleft()
            if isinstance(ev2, Upgrade):
                client_rest = ev2.rest
        await conn.send(
            client_response_head(resp, VIA_NAME, keep_alive=True, chunked=False, client_version=head.version)
            + upstream_rest,
            self.listener.timeouts.idle,
        )
        if client_rest:
            await send_all(up.sock, client_rest)
        pool = self.node.snapshot.pools.get(conn.route_pool)
        idle = pool.spec.timeouts.tcp_idle if pool is not None else 600.0
        await pump_both_ways(conn.sock, up.sock, idle)


def _private_upstream(conn: ClientConn, key: str, send_proxy: str) -> tuple[str, bytes]:
    """The idle key and PROXY header of a backend connection for this client connection.

    Such a connection told the backend who its client is, so it must never carry another
    client's request: it idles under a key of this client connection's own (HAProxy, too,
    reuses a connection only for the same PROXY header) and is closed when the client
    connection ends. Keep-alive to the backend still works within one client connection."""
    try:
        preamble = header_for(send_proxy, conn.sock)
    except OSError as exc:  # getpeername: the client has gone
        raise ClientGone(f"client gone before its request was sent: {exc}") from None
    key = f"{key} proxy {preamble.hex()}"
    if conn.private_upstreams is None:
        conn.private_upstreams = [key]
    elif key not in conn.private_upstreams:
        conn.private_upstreams.append(key)
    return key, preamble


@dataclass(slots=True)
class Session:
    """A request's session for affinity: its table key and the backend it is bound to."""

    key: str | None
    bound_to: str | None


OnHead = Callable[[ResponseHead], list[tuple[bytes, bytes]]]
_NO_DROP: frozenset[bytes] = frozenset()


def _assign_request_id(conn: ClientConn, head: RequestHead) -> None:
    """request_id = true: the client's X-Request-Id if valid (forwarded as it is), else a new
    one (a random UUID, as Envoy makes them) that replaces any invalid one on the way."""
    rid, sent = client_request_id(head)
    if rid is not None:
        conn.request_id, conn.request_id_line, conn.request_id_drop = rid, b"", _NO_DROP
        return
    rid = str(uuid.uuid4()).encode()
    conn.request_id = rid
    conn.request_id_line = b"X-Request-Id: " + rid + b"\r\n"
    conn.request_id_drop = DROP_REQUEST_ID if sent else _NO_DROP


_NO_STATUSES: frozenset[int] = frozenset()
_NO_INDEXES: frozenset[int] = frozenset()


def _done() -> bool:
    """``request_done`` when the whole request was sent before the response was read."""
    return True


class _RetryFresh(Exception):
    """A reused upstream connection failed before any response byte."""


class RetryStatus(Exception):
    """The backend answered a status listed in retry_on; the response is dropped and retried
    (raised by the HTTP/1.1 exchange and by a ``PoolTransport``, before anything reached the client)."""

    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


class _BodyState:
    __slots__ = ("done", "error", "upstream_closed")

    def __init__(self) -> None:
        self.done = False
        self.error: BadRequest | ClientGone | None = None
        self.upstream_closed = False


async def pump_both_ways(a: StreamSocket, b: StreamSocket, idle_timeout: float) -> None:
    """Copy bytes a->b and b->a with half-close, until both directions end or go idle."""
    activity = trio.CancelScope(deadline=trio.current_time() + idle_timeout)

    async def one_way(src: StreamSocket, dst: StreamSocket) -> None:
        try:
            while True:
                data = await recv_some(src, RECV_SIZE)
                if not data:
                    break
                activity.deadline = trio.current_time() + idle_timeout
                await send_all(dst, data)
            half_close(dst)
        except OSError:
            activity.cancel()

    with activity:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(one_way, a, b)
            nursery.start_soon(one_way, b, a)

