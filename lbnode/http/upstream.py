"""Upstream connections: connect to a backend, keep idle ones for reuse.

Owns the per-backend idle pool, with its limits in the constructor (like
httpcore's pool): ``max_idle`` connections per backend, closed once idle for
``idle_timeout``; expiry is checked by timestamp on use, no background task.
Never decides which backend to use: the pool's policy does.
"""

from __future__ import annotations

import socket as stdsocket

from lbnode.http.framing import ResponseReader
from lbnode.model import Address, PoolTls
from lbnode.sockio import ConnectFailed, forget_kept
from lbnode.tls.upstream import TlsSocket, open_backend

__all__ = ["ConnectFailed", "UpstreamConn", "UpstreamPool"]


# Idle time after which a pooled connection is checked for a close by the backend.
PEEK_AFTER_IDLE = 1.0


class UpstreamConn:
    __slots__ = ("sock", "key", "idle_since", "reused", "reader")

    def __init__(self, sock: stdsocket.socket | TlsSocket, key: str) -> None:
        self.sock = sock  # non-blocking stdlib socket (see lbnode.sockio), or TLS over one
        self.key = key
        self.idle_since = 0.0
        self.reused = False
        self.reader: ResponseReader | None = None  # the response parser, kept across exchanges

    def response_reader(self, request_method: bytes) -> ResponseReader:
        """The parser for the response to the request about to be sent."""
        reader = self.reader
        if reader is None:
            reader = self.reader = ResponseReader(request_method)
        else:
            reader.start(request_method)
        return reader

    def close(self) -> None:
        forget_kept(self.sock)  # registered in the run's KeptWaits by its first response wait
        self.sock.close()
        if self.reader is not None:
            self.reader.close()


class UpstreamPool:
    """Idle keep-alive connections per backend address."""

    def __init__(self, max_idle: int = 32, idle_timeout: float = 60.0) -> None:
        self.max_idle = max_idle
        self.idle_timeout = idle_timeout
        self._idle: dict[str, list[UpstreamConn]] = {}
        self.opened = 0  # connections opened since start (for tests and metrics)

    def take(self, key: str, now: float) -> UpstreamConn | None:
        """The most recently used idle connection that is still alive, if any."""
        stack = self._idle.get(key)
        while stack:
            conn = stack.pop()
            idle = now - conn.idle_since
            # A backend closes idle connections after seconds, not milliseconds: peeking at a
            # connection used a moment ago costs a system call per request for nothing (a rare
            # miss is retried on a fresh connection by the proxy).
            if idle > self.idle_timeout or (idle > PEEK_AFTER_IDLE and not _still_open(conn.sock)):
                conn.close()
                continue
            conn.reused = True
            return conn
        return None

    async def connect(
        self, address: Address, timeout: float, tls: PoolTls | None = None, key: str | None = None,
        preamble: bytes = b"", alpn: tuple[str, ...] = (),
    ) -> UpstreamConn:
        """A new connection (TLS with ``tls``, ``preamble`` written first, ``alpn`` offered and
        required); ``key`` is where it idles (default: the address)."""
        sock = await open_backend(address, timeout, tls, preamble, alpn)
        self.opened += 1
        return UpstreamConn(sock, key or str(address))

    def give_back(self, conn: UpstreamConn, now: float, max_idle: int | None = None) -> None:
        limit = self.max_idle if max_idle is None else max_idle
        stack = self._idle.get(conn.key)
        if stack is None:
            stack = self._idle[conn.key] = []
        if len(stack) >= limit:
            conn.close()
            return
        conn.idle_since = now
        stack.append(conn)

    def discard(self, keys: list[str]) -> None:
        """Close the idle connections kept under ``keys`` (private to a client connection that
        has ended: nobody else may take them, so they would idle until the backend closes them)."""
        for key in keys:
            for conn in self._idle.pop(key, ()):
                conn.close()

    def idle_count(self, key: str | None = None) -> int:
        if key is not None:
            return len(self._idle.get(key, ()))
        return sum(len(s) for s in self._idle.values())

    def close(self) -> None:
        for stack in self._idle.values():
            for conn in stack:
                conn.close()
        self._idle.clear()


def _still_open(raw: stdsocket.socket | TlsSocket) -> bool:
    """A pooled connection the backend closed (or wrote to) must not be reused."""
    if isinstance(raw, TlsSocket):
        return raw.still_open()  # the socket may hold TLS records that carry no data (tickets)
    try:
        raw.recv(1, stdsocket.MSG_PEEK | stdsocket.MSG_DONTWAIT)
    except BlockingIOError:
        return True
    except OSError:
        return False
    # EOF (b"") or unexpected bytes from an idle backend: either way unusable.
    return False
