"""Upstream connections: connect to a backend, keep idle ones for reuse.

Owns the per-backend idle pool, with its limits in the constructor (like
httpcore's pool): ``max_idle`` connections per backend, closed once idle for
``idle_timeout``; expiry is checked by timestamp on use, no background task.
Never decides which backend to use: the pool's policy does.
"""

from __future__ import annotations

import errno
import socket as stdsocket

import trio

from lbnode.model import Address


class UpstreamConn:
    __slots__ = ("sock", "raw", "key", "idle_since", "reused")

    def __init__(self, raw: stdsocket.socket, key: str) -> None:
        self.raw = raw  # the stdlib socket, for non-blocking peeks
        self.sock = trio.socket.from_stdlib_socket(raw)
        self.key = key
        self.idle_since = 0.0
        self.reused = False

    def close(self) -> None:
        self.sock.close()


class ConnectFailed(Exception):
    """The backend could not be reached; ``reason`` is for the log line."""

    def __init__(self, reason: str, timed_out: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.timed_out = timed_out


async def open_connection(address: Address, timeout: float) -> stdsocket.socket:
    """A connected, non-blocking stdlib socket with TCP_NODELAY."""
    family = stdsocket.AF_INET6 if ":" in address.host else stdsocket.AF_INET
    raw = stdsocket.socket(family, stdsocket.SOCK_STREAM)
    raw.setblocking(False)
    sock = trio.socket.from_stdlib_socket(raw)
    try:
        with trio.move_on_after(timeout) as scope:
            await sock.connect((address.host, address.port))
        if scope.cancelled_caught:
            raise ConnectFailed(f"connect timeout after {timeout:g}s", timed_out=True)
        sock.setsockopt(stdsocket.IPPROTO_TCP, stdsocket.TCP_NODELAY, 1)
    except OSError as exc:
        sock.close()
        reason = errno.errorcode.get(exc.errno or 0, "") if exc.errno else ""
        if exc.errno == errno.ECONNREFUSED:
            reason = "connection refused"
        raise ConnectFailed(reason or str(exc)) from None
    except BaseException:
        sock.close()
        raise
    return raw


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
            if now - conn.idle_since > self.idle_timeout or not _still_open(conn.raw):
                conn.close()
                continue
            conn.reused = True
            return conn
        return None

    async def connect(self, address: Address, timeout: float) -> UpstreamConn:
        raw = await open_connection(address, timeout)
        self.opened += 1
        return UpstreamConn(raw, str(address))

    def give_back(self, conn: UpstreamConn, now: float, max_idle: int | None = None) -> None:
        limit = self.max_idle if max_idle is None else max_idle
        stack = self._idle.setdefault(conn.key, [])
        if len(stack) >= limit:
            conn.close()
            return
        conn.idle_since = now
        stack.append(conn)

    def idle_count(self, key: str | None = None) -> int:
        if key is not None:
            return len(self._idle.get(key, ()))
        return sum(len(s) for s in self._idle.values())

    def close(self) -> None:
        for stack in self._idle.values():
            for conn in stack:
                conn.close()
        self._idle.clear()


def _still_open(raw: stdsocket.socket) -> bool:
    """A pooled connection the backend closed (or wrote to) must not be reused."""
    try:
        raw.recv(1, stdsocket.MSG_PEEK | stdsocket.MSG_DONTWAIT)
    except BlockingIOError:
        return True
    except OSError:
        return False
    # EOF (b"") or unexpected bytes from an idle backend: either way unusable.
    return False
