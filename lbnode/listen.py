"""Listening sockets and the accept loop shared by the L7 and L4 listeners.

Owns binding (with errors that name the address), the connection caps (per
listener and, through a parent gate, per node), and surviving overload the way trio's serve_listeners does: on
EMFILE/ENFILE/ENOMEM/ENOBUFS log once, sleep, go on; never crash or spin.
Connection handlers run in a nursery that outlives the accept loop, so a
drain can stop accepting while in-flight connections finish.
"""

from __future__ import annotations

import errno
import functools
import logging
import socket as stdsocket
import struct
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import trio

from lbnode.model import Address

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
# Connections taken per wakeup of an accept loop (HAProxy's tune.maxaccept, 64 by default):
# each readiness wait costs a Trio park and an epoll_ctl, so a batch saves them under a stream
# of new connections; bounded so that the handlers already started get the loop between batches.
ACCEPT_BATCH = 16

Handler = Callable[[stdsocket.socket, str], Awaitable[None]]


class BindError(Exception):
    """A listener could not bind; the message names the address and the reason."""


def bind_tcp(address: Address, backlog: int, what: str) -> stdsocket.socket:
    family = stdsocket.AF_INET6 if ":" in address.host else stdsocket.AF_INET
    raw = stdsocket.socket(family, stdsocket.SOCK_STREAM)
    try:
        raw.setsockopt(stdsocket.SOL_SOCKET, stdsocket.SO_REUSEADDR, 1)
        if family == stdsocket.AF_INET6:
            # IPv6 only, whatever net.ipv6.bindv6only says (as nginx): a dual-stack [::] would
            # take IPv4 clients as ::ffff:a.b.c.d (in X-Forwarded-For and affinity keys) and
            # keep a 0.0.0.0 listener from binding the same port.
            raw.setsockopt(stdsocket.IPPROTO_IPV6, stdsocket.IPV6_V6ONLY, 1)
        # Inherited by every accepted connection (see nodelay_inherited): none sets it itself.
        raw.setsockopt(stdsocket.IPPROTO_TCP, stdsocket.TCP_NODELAY, 1)
        raw.bind((address.host, address.port))
        raw.listen(backlog)
    except OSError as exc:
        raw.close()
        reason = "address already in use" if exc.errno == errno.EADDRINUSE else (exc.strerror or str(exc))
        raise BindError(f"{what}: cannot listen on {address}: {reason}") from None
    raw.setblocking(False)
    return raw


@dataclass(frozen=True, slots=True)
class Bound:
    """Where the node actually listens (ports may have been 0 in tests): the node
reports it, the control API and admin endpoint read it.."""

    listeners: dict[str, tuple[str, int]]
    admin: tuple[str, int] | None


class ConnectionGate:
    """Counts a listener's open connections and caps them; above the cap the kernel backlog
    holds clients (the accept loop stops calling accept).

    A listener's gate may have a ``parent``: the node's gate (``[node] max_connections``),
    shared by every listener, so a connection needs room in both. The admin endpoint and
    the control API take no part in it: a flood of clients must not lock out the operator
    who comes to look at it. Only accepted connections count: an accept loop waiting for a
    client holds no place (with several listeners it would hold one each, and a cap of 1
    could starve a listener while nothing is open).
    """

    def __init__(self, limit: int | None, parent: ConnectionGate | None = None) -> None:
        self.limit = limit
        self.in_use = 0
        self._parent = parent
        self._room = trio.lowlevel.ParkingLot()  # accept loops waiting for a place here
        self.accepted = 0  # connections accepted since start (for /metrics, read at scrape time)

    @property
    def open(self) -> int:
        """Connections being served now (for /metrics)."""
        return self.in_use

    def has_room(self) -> bool:
        if self.limit is not None and self.in_use >= self.limit:
            return False
        return self._parent is None or self._parent.has_room()

    async def wait_room(self) -> None:
        """Until this gate and its parent have room (another listener may take it first)."""
        while True:
            if self.limit is not None and self.in_use >= self.limit:
                await self._room.park()
            elif self._parent is not None and not self._parent.has_room():
                await self._parent.wait_room()
            else:
                return

    def set_limit(self, limit: int | None) -> None:
        """A reload's new cap; connections above a lowered one stay (no new ones until below)."""
        self.limit = limit
        self._room.unpark_all()

    def take(self) -> None:
        """One more open connection; only right after ``has_room`` said yes (no await between)."""
        self.in_use += 1
        if self._parent is not None:
            self._parent.take()

    def release(self) -> None:
        self.in_use -= 1
        # Every waiter looks again (a node gate's waiters are one accept loop per listener).
        # Nearly always there is none: unpark_all would still cost ~50 instructions a connection.
        if len(self._room):
            self._room.unpark_all()
        if self._parent is not None:
            self._parent.release()


async def accept_loop(
    sock: stdsocket.socket,
    handler: Handler,
    handlers: trio.Nursery,
    gate: ConnectionGate,
    name: str,
) -> None:
    """Accept until cancelled; each connection runs ``handler`` in ``handlers``.

    The caller cancels this loop to stop accepting; ``handlers`` belongs to the
    caller, so the connections already accepted carry on. While ``gate`` is full
    nothing is accepted: clients wait in the kernel's backlog (then get refused by
    the kernel once it is full), never half-served.
    """
    capacity_logged = False
    # False until the queue was found empty once, if the listener lacked TCP_NODELAY.
    queued_have_nodelay = nodelay_inherited(sock)
    # What socket.accept() does, less its reading of the listener's family and type back as
    # enums for every connection (~110 Python instructions a connection): the C accept (the
    # same accept4 call) and a socket object for the descriptor, with the listener's
    # family, type and protocol taken once here.
    raw_accept: Callable[[], tuple[int, Any]] = sock._accept  # type: ignore[attr-defined]
    new_socket = functools.partial(stdsocket.socket, sock.family, sock.type, sock.proto)
    while True:
        if not gate.has_room():
            await gate.wait_room()
        # Always a park until the next epoll report, also with connections queued: a turn of
        # the scheduler between batches, so a flood of new connections starves no other task.
        await trio.lowlevel.wait_readable(sock)
        # Take what the kernel's queue holds, up to ACCEPT_BATCH, before waiting again: under a
        # stream of new connections one readiness wait then serves several accepts.
        for _ in range(ACCEPT_BATCH):
            if not gate.has_room():
                break  # another listener took the node's last place meanwhile
            try:
                fd, peer = raw_accept()
            except BlockingIOError:
                queued_have_nodelay = True
                break  # the queue is empty (or the client went away before we took it)
            except OSError as exc:
                if exc.errno in ACCEPT_CAPACITY_ERRNOS:
                    if not capacity_logged:
                        log.error("listener %s: accept failed (%s); backing off", name, errno.errorcode[exc.errno])
                        capacity_logged = True
                    await trio.sleep(ACCEPT_CAPACITY_SLEEP)
                    break
                if exc.errno in ACCEPT_PEER_ERRNOS:
                    continue  # that one client is gone; the listener is fine
                raise
            conn = new_socket(fileno=fd)
            gate.take()
            capacity_logged = False
            conn.setblocking(False)
            if not queued_have_nodelay:
                _set_nodelay(conn)
            _start_handler(sock, conn, peer, handler, handlers, gate)
        # No checkpoint here: the readiness wait above is one (it parks even when the socket is
        # readable already); another was a scheduler turn more per batch, so per connection
        # when they come one at a time.


async def accept_pending(
    sock: stdsocket.socket,
    handler: Handler,
    handlers: trio.Nursery,
    gate: ConnectionGate,
) -> int:
    """Accept the connections already in the kernel's queue (a drain, before closing); how many.

    Only as many as the gates have room for now: waiting for a place would hold the drain
    (and its deadline) up behind connections that may last; the rest are refused when the
    listener closes, and their clients try again elsewhere.
    """
    n = 0
    queued_have_nodelay = nodelay_inherited(sock)
    await trio.lowlevel.checkpoint()
    while gate.has_room():
        try:
            conn, peer = sock.accept()
        except OSError:  # BlockingIOError: the queue is empty; anything else: nothing more to take
            return n
        gate.take()
        conn.setblocking(False)
        if not queued_have_nodelay:
            _set_nodelay(conn)
        _start_handler(sock, conn, peer, handler, handlers, gate)
        n += 1
    return n


def nodelay_inherited(sock: stdsocket.socket) -> bool:
    """TCP_NODELAY on a listening socket, so that the connections accepted from it have it;
    False if it was not there yet: the connections already queued then lack it.

    Linux copies the listener's options to each connection when its handshake completes
    (tests/integration/test_accept_batch.py), which saves a setsockopt per connection: the
    proxies send a response head as soon as it is whole and must not wait on Nagle.
    ``bind_tcp`` sets it before ``listen``; a socket handed over by a node that did not
    (an older version) gets it here, and the accept loop sets it on each connection it
    takes until it first finds the queue empty. Not a TCP socket: nothing to do."""
    if sock.family not in (stdsocket.AF_INET, stdsocket.AF_INET6):
        return True
    if sock.getsockopt(stdsocket.IPPROTO_TCP, stdsocket.TCP_NODELAY):
        return True
    sock.setsockopt(stdsocket.IPPROTO_TCP, stdsocket.TCP_NODELAY, 1)
    return False


def _set_nodelay(conn: stdsocket.socket) -> None:
    conn.setsockopt(stdsocket.IPPROTO_TCP, stdsocket.TCP_NODELAY, 1)


def _start_handler(
    listener: stdsocket.socket,
    conn: stdsocket.socket,
    peer: object,
    handler: Handler,
    handlers: trio.Nursery,
    gate: ConnectionGate,
) -> None:
    """An accepted connection, rid of its listener's filter, handed to ``handler`` in ``handlers``."""
    _unfilter(listener, conn)
    client_ip = peer[0] if isinstance(peer, tuple) else str(peer)
    gate.accepted += 1
    handlers.start_soon(_run_handler, handler, conn, client_ip, gate)


# Classic BPF, for a filter on a listening socket (SO_ATTACH_FILTER; the kernel copies it).
_SO_ATTACH_FILTER, _SO_DETACH_FILTER = 26, 27
_SKF_NET_OFF = -0x100000 & 0xFFFFFFFF  # loads relative to the IP header (data starts at TCP's)
_LDB, _LDW, _LDLEN, _TAX = 0x30, 0x20, 0x80, 0x07
_RSH, _LSH, _AND = 0x74, 0x64, 0x54
_JA, _JEQ, _JGTX, _RET = 0x05, 0x15, 0x2D, 0x06
_TCP_SYN, _TCP_RST, _TCP_ACK = 0x02, 0x04, 0x10

Insn = tuple[int, int, int, int]  # (code, jt, jf, k)
# Listeners that have had a filter: an accepted socket inherits its listener's filter (the
# kernel clones it), so the accept paths take it off theirs (see ``_unfilter``).
_FILTERED: set[int] = set()


def vip_filter(handing_off: Sequence[str], taking_over: Sequence[str]) -> list[Insn]:
    """A classic BPF program for a listener while VIPs move; it passes everything else.

    - To a VIP in ``handing_off``: bare SYNs are dropped (no new connection here).
    - To a VIP in ``taking_over``: segments with neither payload nor SYN nor RST are dropped
      (ACKs and FINs of connections this host does not have).

    IPv4 and IPv6 VIPs alike: the IP version picks which destination address is compared (one
    word, or four in turn). A listener sees SYNs, the packets that complete handshakes, and
    packets of connections no socket has (which it would answer with a reset). The handshakes
    under way still complete: their last ACK is not a SYN, and when it is dropped by the
    second rule, the first data segment completes it instead.
    """
    targets = [(a, "refuse") for a in handing_off] + [(a, "quiet") for a in taking_over]
    v4 = [(a, label) for a, label in targets if ":" not in a]
    v6 = [(a, label) for a, label in targets if ":" in a]
    code: list[tuple[int, int | str, int | str, int | str]] = [
        (_LDB, 0, 0, _SKF_NET_OFF),  # IP version
        (_RSH, 0, 0, 4),
        (_JEQ, 0, "ipv4", 6),
        (_JA, 0, 0, "ipv6"),
    ]
    labels: dict[str, int] = {"ipv4": len(code)}
    # Conditional jumps reach 255 instructions at most: every jump to a label is a JA (32 bits),
    # skipped over when the condition fails, so any number of VIPs fits.
    code.append((_JEQ, 1, 0, 4))
    code.append((_JA, 0, 0, "accept"))  # neither IPv4 nor IPv6: pass
    code.append((_LDW, 0, 0, (_SKF_NET_OFF + 16) & 0xFFFFFFFF))  # destination address
    for address, label in v4:
        code.append((_JEQ, 0, 1, _ipv4(address)))
        code.append((_JA, 0, 0, label))
    code.append((_JA, 0, 0, "accept"))
    labels["ipv6"] = len(code)
    for n, (address, label) in enumerate(v6):
        words = struct.unpack("!4I", stdsocket.inet_pton(stdsocket.AF_INET6, address))
        for w, word in enumerate(words):  # destination address: bytes 24-39 of the IPv6 header
            code.append((_LDW, 0, 0, (_SKF_NET_OFF + 24 + 4 * w) & 0xFFFFFFFF))
            code.append((_JEQ, 0, f"not{n}", word))
        code.append((_JA, 0, 0, label))
        labels[f"not{n}"] = len(code)
    code.append((_JA, 0, 0, "accept"))
    labels["refuse"] = len(code)
    code += [
        (_LDB, 0, 0, 13),  # TCP flags (loads without SKF_NET_OFF start at the TCP header)
        (_AND, 0, 0, _TCP_SYN | _TCP_ACK),
        (_JEQ, "drop", "accept", _TCP_SYN),
    ]
    labels["quiet"] = len(code)
    code += [
        (_LDB, 0, 0, 13),
        (_AND, 0, 0, _TCP_SYN | _TCP_RST),
        (_JEQ, 0, "accept", 0),  # a SYN or a reset: pass
        (_LDB, 0, 0, 12),  # TCP header length: (data offset >> 4) * 4
        (_RSH, 0, 0, 4),
        (_LSH, 0, 0, 2),
        (_TAX, 0, 0, 0),
        (_LDLEN, 0, 0, 0),  # TCP header + payload
        (_JGTX, "accept", "drop", 0),
    ]
    labels["accept"] = len(code)
    code.append((_RET, 0, 0, 0xFFFFFFFF))
    labels["drop"] = len(code)
    code.append((_RET, 0, 0, 0))

    def jump(i: int, target: int | str) -> int:
        if not isinstance(target, str):
            return target
        offset = labels[target] - (i + 1)
        if not 0 <= offset <= 255:  # conditional jumps are 8 bits, forward only
            raise ValueError(f"VIP filter: a jump of {offset} instructions ({len(targets)} VIPs moving)")
        return offset

    prog = []
    for i, (op, jt, jf, k) in enumerate(code):
        if op == _JA:
            prog.append((op, 0, 0, labels[k] - (i + 1) if isinstance(k, str) else k))
        else:
            assert isinstance(k, int)
            prog.append((op, jump(i, jt), jump(i, jf), k))
    return prog


def _ipv4(address: str) -> int:
    return int.from_bytes(stdsocket.inet_aton(address), "big")


def set_vip_filter(sock: stdsocket.socket, handing_off: Sequence[str], taking_over: Sequence[str] = ()) -> None:
    """While VIPs move, the kernel drops some of their packets at this listener, silently.

    ``handing_off``: new connections' SYNs. Clients send theirs again a second later and
    reach the new holder; a handshake completed here just before the move would be cut
    (the client's next packet reaches the new holder, which does not know the connection).

    ``taking_over`` (a VIP this node has just taken): the ACKs and FINs of connections it
    does not have, instead of answering them with a reset. They belong to requests still in
    flight on the old holder, whose client moved to us mid-answer; unanswered, the answer
    completes (the old holder's data still reaches the client).

    Connections already accepted, and other addresses, are not affected. Each call replaces
    the last; with nothing to filter the listener takes every packet again.
    """
    import ctypes

    if sock.family not in (stdsocket.AF_INET, stdsocket.AF_INET6):
        return
    _FILTERED.add(sock.fileno())
    if not handing_off and not taking_over:
        try:
            sock.setsockopt(stdsocket.SOL_SOCKET, _SO_DETACH_FILTER, 0)
        except OSError as exc:
            if exc.errno != errno.ENOENT:  # no filter attached
                raise
        return
    prog = vip_filter(handing_off, taking_over)
    buf = ctypes.create_string_buffer(b"".join(struct.pack("HBBI", *insn) for insn in prog))
    sock.setsockopt(stdsocket.SOL_SOCKET, _SO_ATTACH_FILTER, struct.pack("HL", len(prog), ctypes.addressof(buf)))


def _unfilter(listener: stdsocket.socket, conn: stdsocket.socket) -> None:
    """A connection accepted from a listener that has had a VIP filter drops the copy it got."""
    if _FILTERED and listener.fileno() in _FILTERED:
        try:
            conn.setsockopt(stdsocket.SOL_SOCKET, _SO_DETACH_FILTER, 0)
        except OSError as exc:
            if exc.errno != errno.ENOENT:  # none: accepted before the filter came
                raise


async def _run_handler(handler: Handler, conn: stdsocket.socket, client_ip: str, gate: ConnectionGate) -> None:
    try:
        await handler(conn, client_ip)
    finally:
        conn.close()
        gate.release()
