"""Listening sockets and the accept loop shared by the L7 and L4 listeners.

Owns binding (with errors that name the address), the per-listener connection
cap, and surviving overload the way trio's serve_listeners does: on
EMFILE/ENFILE/ENOMEM/ENOBUFS log once, sleep, go on; never crash or spin.
Connection handlers run in a nursery that outlives the accept loop, so a
drain can stop accepting while in-flight connections finish.
"""

from __future__ import annotations

import errno
import logging
import socket as stdsocket
import struct
from collections.abc import Awaitable, Callable, Sequence

import trio

from lbnode.model import Address
from lbnode.sockio import accept

log = logging.getLogger("lbnode.listen")

# Errors that mean "the system is out of capacity right now", not "this socket is broken".
ACCEPT_CAPACITY_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}
# accept(2) on Linux passes on network errors of the pending connection: skip it.
ACCEPT_PEER_ERRNOS = {
    errno.ECONNABORTED, errno.EPROTO, errno.EPERM, errno.ENETDOWN, errno.ENOPROTOOPT,
    errno.EHOSTDOWN, errno.ENONET, errno.EHOSTUNREACH, errno.EOPNOTSUPP, errno.ENETUNREACH,
}
# How long to back off after a capacity error: long enough to let connections close.
ACCEPT_CAPACITY_SLEEP = 0.1

Handler = Callable[[stdsocket.socket, str], Awaitable[None]]


class BindError(Exception):
    """A listener could not bind; the message names the address and the reason."""


def bind_tcp(address: Address, backlog: int, what: str) -> stdsocket.socket:
    family = stdsocket.AF_INET6 if ":" in address.host else stdsocket.AF_INET
    raw = stdsocket.socket(family, stdsocket.SOCK_STREAM)
    try:
        raw.setsockopt(stdsocket.SOL_SOCKET, stdsocket.SO_REUSEADDR, 1)
        raw.bind((address.host, address.port))
        raw.listen(backlog)
    except OSError as exc:
        raw.close()
        reason = "address already in use" if exc.errno == errno.EADDRINUSE else (exc.strerror or str(exc))
        raise BindError(f"{what}: cannot listen on {address}: {reason}") from None
    raw.setblocking(False)
    return raw


class ConnectionGate:
    """Caps a listener's open connections; above the cap the kernel backlog holds clients."""

    def __init__(self, limit: int | None) -> None:
        self._limiter = trio.CapacityLimiter(limit) if limit else None

    async def acquire(self, token: object) -> None:
        if self._limiter is not None:
            await self._limiter.acquire_on_behalf_of(token)

    def release(self, token: object) -> None:
        if self._limiter is not None:
            self._limiter.release_on_behalf_of(token)

    @property
    def in_use(self) -> int:
        return int(self._limiter.borrowed_tokens) if self._limiter is not None else 0


async def accept_loop(
    sock: stdsocket.socket,
    handler: Handler,
    handlers: trio.Nursery,
    gate: ConnectionGate,
    name: str,
) -> None:
    """Accept until cancelled; each connection runs ``handler`` in ``handlers``.

    The caller cancels this loop to stop accepting; ``handlers`` belongs to the
    caller, so the connections already accepted carry on.
    """
    capacity_logged = False
    while True:
        token = object()
        await gate.acquire(token)
        try:
            conn, peer = await accept(sock)
        except OSError as exc:
            gate.release(token)
            if exc.errno in ACCEPT_CAPACITY_ERRNOS:
                if not capacity_logged:
                    log.error("listener %s: accept failed (%s); backing off", name, errno.errorcode[exc.errno])
                    capacity_logged = True
                await trio.sleep(ACCEPT_CAPACITY_SLEEP)
                continue
            if exc.errno in ACCEPT_PEER_ERRNOS:
                continue  # that one client is gone; the listener is fine
            raise
        except BaseException:
            gate.release(token)
            raise
        capacity_logged = False
        # accept() that never waits would starve every other task under a connection flood.
        await trio.lowlevel.checkpoint()
        client_ip = peer[0] if isinstance(peer, tuple) else str(peer)
        handlers.start_soon(_run_handler, handler, conn, client_ip, gate, token)


async def accept_pending(
    sock: stdsocket.socket,
    handler: Handler,
    handlers: trio.Nursery,
    gate: ConnectionGate,
) -> int:
    """Accept the connections already in the kernel's queue (a drain, before closing); how many."""
    n = 0
    while True:
        token = object()
        await gate.acquire(token)
        try:
            conn, peer = sock.accept()
        except OSError:  # BlockingIOError: the queue is empty; anything else: nothing more to take
            gate.release(token)
            return n
        conn.setblocking(False)
        client_ip = peer[0] if isinstance(peer, tuple) else str(peer)
        handlers.start_soon(_run_handler, handler, conn, client_ip, gate, token)
        n += 1


# Classic BPF, for a filter on a listening socket (SO_ATTACH_FILTER; the kernel copies it).
_SO_ATTACH_FILTER, _SO_DETACH_FILTER = 26, 27
_SKF_NET_OFF = -0x100000 & 0xFFFFFFFF  # loads relative to the IP header (data starts at TCP's)
_LDB, _LDW, _RSH, _AND, _JEQ, _RET = 0x30, 0x20, 0x74, 0x54, 0x15, 0x06
_TCP_SYN, _TCP_ACK = 0x02, 0x10


def syn_filter(addresses: Sequence[str]) -> list[tuple[int, int, int, int]]:
    """A classic BPF program (code, jt, jf, k) that drops IPv4 SYNs to ``addresses``, passes the rest.

    Only a listener sees SYNs and the last ACK of each handshake; the ACKs pass, so the
    handshakes already under way complete, and no connection is left half open.
    """
    n = len(addresses)
    accept, drop = 7 + n, 8 + n
    prog = [
        (_LDB, 0, 0, _SKF_NET_OFF),  # 0: IP version
        (_RSH, 0, 0, 4),
        (_JEQ, 0, accept - 3, 4),  # 2: not IPv4 -> pass
        (_LDB, 0, 0, 13),  # 3: TCP flags
        (_AND, 0, 0, _TCP_SYN | _TCP_ACK),
        (_JEQ, 0, accept - 6, _TCP_SYN),  # 5: not a bare SYN -> pass
        (_LDW, 0, 0, (_SKF_NET_OFF + 16) & 0xFFFFFFFF),  # 6: destination address
    ]
    for i, address in enumerate(addresses):
        prog.append((_JEQ, drop - (8 + i), 0, int.from_bytes(stdsocket.inet_aton(address), "big")))
    prog += [(_RET, 0, 0, 0xFFFFFFFF), (_RET, 0, 0, 0)]  # accept, drop
    return prog


def refuse_new_connections(sock: stdsocket.socket, addresses: Sequence[str]) -> None:
    """The kernel drops new connections' SYNs to ``addresses`` on this listener, silently.

    For a VIP about to move: clients send their SYN again a second later and reach the new
    holder. A handshake completed here just before the move would be cut instead (the
    client's next packet reaches the new holder, which does not know the connection).
    Connections already accepted, and other addresses, are not affected. Each call replaces
    the last; with no addresses, the listener takes every connection again.
    """
    import ctypes

    if sock.family != stdsocket.AF_INET:
        return
    if not addresses:
        try:
            sock.setsockopt(stdsocket.SOL_SOCKET, _SO_DETACH_FILTER, 0)
        except OSError as exc:
            if exc.errno != errno.ENOENT:  # no filter attached
                raise
        return
    prog = syn_filter(addresses)
    buf = ctypes.create_string_buffer(b"".join(struct.pack("HBBI", *insn) for insn in prog))
    sock.setsockopt(stdsocket.SOL_SOCKET, _SO_ATTACH_FILTER, struct.pack("HL", len(prog), ctypes.addressof(buf)))


async def _run_handler(
    handler: Handler, conn: stdsocket.socket, client_ip: str, gate: ConnectionGate, token: object
) -> None:
    try:
        await handler(conn, client_ip)
    finally:
        conn.close()
        gate.release(token)
