"""Non-blocking stdlib sockets driven by Trio's readiness waits: the data plane's I/O.

Owns the few primitives every listener uses (accept, connect, receive, send
everything) on plain ``socket.socket`` objects. Each tries the system call
first and only parks in ``trio.lowlevel.wait_readable/wait_writable`` when
the kernel says EAGAIN; a timeout scope is created only on that slow path.
This is what keeps Python's cost per request low (see bench/). Never decides
anything about HTTP or balancing.
"""

from __future__ import annotations

import errno
import socket

import trio

from lbnode.model import Address


class SendTimeout(Exception):
    """The peer did not read for the whole timeout."""


class ConnectFailed(Exception):
    """A backend could not be reached; ``reason`` is for the log line."""

    def __init__(self, reason: str, timed_out: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.timed_out = timed_out


async def recv_some(sock: socket.socket, size: int) -> bytes:
    """Up to ``size`` bytes; b"" at EOF. A cancellation point only when it has to wait."""
    while True:
        try:
            return sock.recv(size)
        except BlockingIOError:
            await trio.lowlevel.wait_readable(sock)


async def recv_within(sock: socket.socket, size: int, timeout: float, *, expect_wait: bool = False) -> bytes | None:
    """Like ``recv_some``; None if nothing arrived within ``timeout`` seconds.

    ``expect_wait``: the peer cannot have answered yet (a request just sent),
    so skip the first, certainly failing, system call."""
    if not expect_wait:
        try:
            return sock.recv(size)
        except BlockingIOError:
            pass
    with trio.move_on_after(timeout):
        while True:
            await trio.lowlevel.wait_readable(sock)
            try:
                return sock.recv(size)
            except BlockingIOError:
                continue
    return None


async def send_all(sock: socket.socket, data: bytes | memoryview, timeout: float | None = None) -> None:
    """Send everything; raises SendTimeout if the peer stops reading for ``timeout``."""
    try:
        sent = sock.send(data)
    except BlockingIOError:
        sent = 0
    if sent == len(data):
        return
    view = memoryview(data)[sent:]
    with trio.move_on_after(timeout if timeout is not None else float("inf")) as scope:
        while view:
            await trio.lowlevel.wait_writable(sock)
            try:
                sent = sock.send(view)
            except BlockingIOError:
                continue
            view = view[sent:]
    if scope.cancelled_caught:
        raise SendTimeout(f"peer did not read for {timeout:g}s")


async def accept(listener: socket.socket) -> tuple[socket.socket, object]:
    while True:
        try:
            conn, peer = listener.accept()
        except BlockingIOError:
            await trio.lowlevel.wait_readable(listener)
            continue
        conn.setblocking(False)
        return conn, peer


async def connect(address: Address, timeout: float) -> socket.socket:
    """A connected non-blocking socket with TCP_NODELAY, or ConnectFailed."""
    with trio.move_on_after(timeout) as scope:
        family, sockaddr = await _resolve(address)
        try:
            sock = socket.socket(family, socket.SOCK_STREAM)
        except OSError as exc:  # EMFILE and friends: this node is out of sockets
            raise ConnectFailed(f"cannot open a socket: {exc.strerror}") from None
        try:
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            err = sock.connect_ex(sockaddr)
            if err == errno.EINPROGRESS:
                await trio.lowlevel.wait_writable(sock)
                err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                raise ConnectFailed(_describe(err))
            return sock
        except BaseException:
            sock.close()
            raise
    assert scope.cancelled_caught
    raise ConnectFailed(f"connect timeout after {timeout:g}s", timed_out=True)


async def _resolve(address: Address) -> tuple[int, tuple[object, ...]]:
    host = address.host
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            socket.inet_pton(family, host)
        except OSError:
            continue
        return family, (host, address.port)
    try:
        infos = await trio.socket.getaddrinfo(host, address.port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise ConnectFailed(f"cannot resolve {host}: {exc.strerror}") from None
    family, _, _, _, sockaddr = infos[0]
    return family, sockaddr


def _describe(err: int) -> str:
    if err == errno.ECONNREFUSED:
        return "connection refused"
    if err == errno.ETIMEDOUT:
        return "connect timed out"
    if err in (errno.EHOSTUNREACH, errno.ENETUNREACH):
        return "host unreachable"
    return errno.errorcode.get(err, str(err)).lower().replace("_", " ")
