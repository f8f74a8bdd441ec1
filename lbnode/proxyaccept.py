"""PROXY protocol on the wire: a listener that takes the header from a balancer in front, and
the addresses of the client connection a task serves, for a pool that sends its own header on.

Owns reading the header before anything else reads the connection (TLS handshake, ClientHello,
HTTP): only the header's bytes are taken off the socket (peeked first, then consumed exactly),
so the next reader finds the client's first byte where it expects it. Owns the trust check,
the deadline and the counters of refused connections. Parsing is ``lbnode.proxyproto``'s.
"""

from __future__ import annotations

import contextvars
import logging
import socket as stdsocket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import trio

from lbnode.logthrottle import LogThrottle
from lbnode.model import Listener
from lbnode.proxyproto import (
    DEFAULT_MAX_V2_LENGTH,
    V2_FIXED,
    Endpoint,
    Error,
    Parsed,
    encode,
    parse_proxy_header,
)

log = logging.getLogger("lbnode.proxyproto")

# Why a connection on a proxy_protocol listener was closed before its own protocol began
# (the label values of fulcrum_proxy_protocol_errors_total, all shown from the start).
ERROR_REASONS = ("untrusted", "malformed", "timeout", "closed")

Handler = Callable[[stdsocket.socket, str], Awaitable[None]]

# The client connection the current task serves, as the balancer in front saw it: (source,
# destination). Set by ``ProxyHeaderReceiver`` for the handler it calls (each connection runs
# in its own task, so each sees its own); unset, the socket's own endpoints are the truth.
_RECEIVED: contextvars.ContextVar[tuple[Endpoint, Endpoint] | None] = contextvars.ContextVar(
    "lbnode.proxyaccept.received", default=None
)


@dataclass(frozen=True, slots=True)
class Broken(Error):
    """The peer closed or reset the connection before its header was complete."""


def client_endpoints(sock: stdsocket.socket) -> tuple[Endpoint, Endpoint]:
    """(client, the address it connected to) of the connection ``sock`` serves: the ones a
    PROXY header gave this task, else the socket's peer and local addresses."""
    received = _RECEIVED.get()
    if received is not None:
        return received
    peer, local = sock.getpeername(), sock.getsockname()
    return (peer[0], peer[1]), (local[0], local[1])


def client_port(sock: stdsocket.socket) -> int:
    """The client's port for the access log: the PROXY header's when one was received,
    else the socket peer's (0 when the client is gone already)."""
    received = _RECEIVED.get()
    if received is not None:
        return received[0][1]
    try:
        peer = sock.getpeername()
    except OSError:
        return 0
    return peer[1] if isinstance(peer, tuple) else 0


def header_for(version: str, sock: stdsocket.socket) -> bytes:
    """The header a pool with ``send_proxy = version`` writes first on a backend connection
    opened for the client connection ``sock``."""
    return encode(version, *client_endpoints(sock))


class ProxyHeaderReceiver:
    """Wraps a listener's handler: ``handle(sock, peer_ip)`` refuses peers outside the
    trusted networks, reads the header within ``[listeners.timeouts] header``, then calls
    ``inner(sock, client_ip)`` with the client the header names (the peer itself for a v2
    LOCAL command or v1 UNKNOWN: the balancer's own connection, such as its health check)."""

    def __init__(
        self, listener: Listener, inner: Handler, *, max_v2_length: int = DEFAULT_MAX_V2_LENGTH,
        clock: Callable[[], float] = trio.current_time,
    ) -> None:
        assert listener.proxy_protocol is not None
        self.listener = listener
        self.settings = listener.proxy_protocol
        self.inner = inner
        self.max_v2_length = max_v2_length
        self.clock = clock
        # For /metrics, read at scrape time.
        self.errors = dict.fromkeys(ERROR_REASONS, 0)
        self.headers = {1: 0, 2: 0}  # headers accepted, by version
        # An untrusted scanner or a broken balancer must not turn into a flood of log lines.
        self._logged = LogThrottle(window=10.0, burst=5)

    async def handle(self, sock: stdsocket.socket, peer_ip: str) -> None:
        if not self.settings.trusts(peer_ip):
            self._refuse("untrusted", peer_ip, "not in proxy_protocol.trusted; closing without reading")
            return
        timeout = self.listener.timeouts.header
        result: Parsed | Error | None = None
        with trio.move_on_after(timeout):
            result = await read_proxy_header(sock, self.max_v2_length)
        if result is None:
            self._refuse("timeout", peer_ip, f"no complete PROXY protocol header within {timeout:g}s")
            return
        if isinstance(result, Error):
            reason = "closed" if isinstance(result, Broken) else "malformed"
            self._refuse(reason, peer_ip, result.reason)
            return
        self.headers[result.version] += 1
        if result.source is None or result.dest is None:  # LOCAL, UNKNOWN: the peer is the client
            await self.inner(sock, peer_ip)
            return
        token = _RECEIVED.set((result.source, result.dest))
        try:
            await self.inner(sock, result.source[0])
        finally:
            _RECEIVED.reset(token)

    def _refuse(self, reason: str, peer_ip: str, detail: str) -> None:
        self.errors[reason] += 1
        left_out = self._logged.admit(reason, self.clock())
        if left_out is not None:
            more = f" ({left_out} more not logged)" if left_out else ""
            level = logging.INFO if reason == "closed" else logging.WARNING
            log.log(level, "listener %s: %s: %s%s", self.listener.name, peer_ip, detail, more)


async def read_proxy_header(sock: stdsocket.socket, max_v2_length: int = DEFAULT_MAX_V2_LENGTH) -> Parsed | Error:
    """Take the PROXY header off ``sock`` and not one byte more; the caller bounds the time.

    Each round peeks at what has arrived and judges it with what was already taken. A
    complete header: only its own bytes are consumed (the client's first bytes stay in the
    kernel for whoever reads next). Still incomplete: every byte seen is the header's
    (``parse_proxy_header`` promises it), so they are consumed before waiting again, and
    the wait cannot wake up at once on bytes already seen. The result's ``rest`` is what was
    peeked behind the header: still in the kernel, for the next reader."""
    taken = bytearray()
    limit = V2_FIXED + max_v2_length  # no header is longer (a v1 line is at most 107 bytes)
    while True:
        try:
            peeked = sock.recv(limit - len(taken), stdsocket.MSG_PEEK)
        except BlockingIOError:
            await trio.lowlevel.wait_readable(sock)
            continue
        except OSError as exc:
            return Broken(f"connection broken after {len(taken)} bytes of the header: {exc.strerror or exc}")
        if not peeked:
            return Broken(f"connection closed after {len(taken)} bytes, before a complete PROXY protocol header")
        result = parse_proxy_header(bytes(taken) + peeked, max_v2_length)
        if isinstance(result, Error):
            return result
        count = result.length - len(taken) if isinstance(result, Parsed) else len(peeked)
        while count:  # bytes already peeked: the kernel has them, these reads do not wait
            try:
                got = sock.recv(count)
            except OSError as exc:
                return Broken(f"connection broken while its header was read: {exc.strerror or exc}")
            if not got:
                return Broken("connection closed while its header was read")
            taken += got
            count -= len(got)
        if isinstance(result, Parsed):
            return result
        await trio.lowlevel.wait_readable(sock)
