"""Non-blocking stdlib sockets driven by Trio's readiness waits: the data plane's I/O.

Owns the few primitives every listener uses (accept, connect, receive, send
everything) on plain ``socket.socket`` objects. Each tries the system call
first and only parks in ``trio.lowlevel.wait_readable/wait_writable`` (or, for the
response wait of ``recv_within``, ``KeptWaits``) when the kernel says EAGAIN; a
timeout scope is created only on that slow path.
This is what keeps Python's cost per request low (see bench/). Never decides
anything about HTTP or balancing.

``recv_some`` and ``send_all`` also take a non-blocking ``ssl.SSLSocket`` (TLS listeners):
OpenSSL's want-read/want-write become the same readiness waits; the plain path pays
nothing for it (an ``except`` clause costs only when it catches). They, ``recv_within``,
``half_close`` and ``Deadlines`` take any ``StreamSocket``, which the backend TLS
connection (``lbnode.tls.upstream.TlsSocket``) is too.

Also owns ``Deadlines``: timeouts for the waits that happen on nearly every
request (a keep-alive client's next request, a backend's response) without a
Trio cancel scope each. Entering and leaving a cancel scope costs several
microseconds; arming a deadline here is one heap push. See ``Deadlines``.

And ``TrickleWaits``: one task that waits for every socket whose data trickles in (a
request head sent a few bytes at a time, slowloris), so that a burst of such bytes
wakes their tasks a bounded batch at a time instead of all in one Trio batch.

And ``KeptWaits``: the two read waits of a keep-alive request (the client's next request,
the backend's response) on sockets registered once in an epoll set of our own, instead of
Trio's per-wait ``EPOLLONESHOT`` re-arm. See ``KeptWaits``.
"""

from __future__ import annotations

import errno
import heapq
import logging
import math
import select
import socket
import ssl
from collections.abc import Callable
from typing import Any, Generic, Protocol, TypeVar

import trio

from lbnode.model import Address
from lbnode.trioloop import run_clock

log = logging.getLogger("lbnode.sockio")


class StreamSocket(Protocol):
    """What these primitives use of a connected socket: ``socket.socket``, ``ssl.SSLSocket``
    and ``lbnode.tls.upstream.TlsSocket`` all have it (a protocol, so that this module needs
    no import of lbnode.tls). ``fileno`` is for Trio's readiness waits."""

    def fileno(self) -> int: ...

    def recv(self, size: int, /) -> bytes: ...

    def send(self, data: bytes | memoryview, /) -> int: ...

    def shutdown(self, how: int, /) -> None: ...


class SendTimeout(Exception):
    """The peer did not read for the whole timeout."""


class ConnectFailed(Exception):
    """A backend could not be reached; ``reason`` is for the log line."""

    def __init__(self, reason: str, timed_out: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.timed_out = timed_out


async def recv_some(sock: StreamSocket, size: int) -> bytes:
    """Up to ``size`` bytes; b"" at EOF. A cancellation point only when it has to wait."""
    while True:
        try:
            return sock.recv(size)
        except (BlockingIOError, ssl.SSLWantReadError):
            await trio.lowlevel.wait_readable(sock)
        except ssl.SSLWantWriteError:  # TLS: a record to send first (the peer is not reading)
            await trio.lowlevel.wait_writable(sock)


async def recv_within(
    sock: StreamSocket,
    size: int,
    timeout: float,
    *,
    expect_wait: bool = False,
    deadlines: Deadlines | None = None,
    kept: bool = True,
) -> bytes | None:
    """Like ``recv_some``; None if nothing arrived within ``timeout`` seconds.

    ``expect_wait``: the peer cannot have answered yet (a request just sent),
    so skip the first, certainly failing, system call.

    The timeout is a ``Deadlines`` one: while this waits, a write wait on the
    same socket in another task ends with ``trio.ClosedResourceError`` if the
    timeout strikes (``send_all`` turns that into an ``OSError``). ``deadlines``: the
    run's ``current_deadlines()``, if the caller has it at hand. ``kept``: a plain socket
    waits in the run's ``KeptWaits`` (registered once); False: in Trio's (see
    ``lbnode.http.proxy.ClientConn.kept_waits`` for when that is cheaper)."""
    if not expect_wait:
        try:
            return sock.recv(size)
        except BlockingIOError:
            pass
    if deadlines is None:
        deadlines = current_deadlines()
    # A plain socket waits in the run's KeptWaits (registered once) if ``kept``; a TLS one in Trio's.
    wait = deadlines.kept.wait_readable if kept and type(sock) is socket.socket else trio.lowlevel.wait_readable
    entry = deadlines.arm(sock, deadlines.now() + timeout)
    try:
        while True:
            # The wait of the Deadlines docstring (a scope-free timeout: once per request).
            # A kept wait may end with nothing to read (edge-triggered): the loop reads again.
            try:
                await wait(sock)
            except trio.ClosedResourceError:
                if not entry[3]:
                    raise
                return None
            try:
                return sock.recv(size)
            except BlockingIOError:
                continue
    finally:
        deadlines.disarm(entry)


def try_send(sock: StreamSocket, data: bytes) -> int:
    """One send that does not wait: how much of ``data`` the kernel took (0 when it took
    nothing, or when an ``SSLSocket`` wants to be retried with the same buffer, which
    ``send_all`` does). Nearly every send of a request is taken whole, so callers try this
    first and call ``send_all`` (a coroutine, with a timeout) for what is left:
    ``send_all(sock, data)`` when it returned 0, or a ``memoryview`` of the rest."""
    try:
        return sock.send(data)
    except (BlockingIOError, ssl.SSLWantWriteError, ssl.SSLWantReadError):
        return 0


async def send_all(sock: StreamSocket, data: bytes | memoryview, timeout: float | None = None) -> None:
    """Send everything; raises SendTimeout if the peer stops reading for ``timeout``.

    On an ``SSLSocket`` a send that has to wait is retried with the same buffer, as OpenSSL
    requires (it then reports the whole buffer sent)."""
    wait = trio.lowlevel.wait_writable
    try:
        sent = sock.send(data)
    except (BlockingIOError, ssl.SSLWantWriteError):
        sent = 0
    except ssl.SSLWantReadError:
        sent, wait = 0, trio.lowlevel.wait_readable
    if sent == len(data):
        return
    view = memoryview(data)[sent:]
    with trio.move_on_after(timeout if timeout is not None else math.inf) as scope:
        while view:
            try:
                await wait(sock)
            except trio.ClosedResourceError:
                # A read timeout on this socket struck in another task (Deadlines.fire):
                # the connection is being given up, as if the peer had reset it.
                raise ConnectionAbortedError(errno.ECONNABORTED, "connection given up after a timeout") from None
            wait = trio.lowlevel.wait_writable
            try:
                sent = sock.send(view)
            except (BlockingIOError, ssl.SSLWantWriteError):
                continue
            except ssl.SSLWantReadError:
                wait = trio.lowlevel.wait_readable
                continue
            view = view[sent:]
    if scope.cancelled_caught:
        raise SendTimeout(f"peer did not read for {timeout:g}s")


def half_close(sock: StreamSocket) -> None:
    """No more bytes this way: a FIN on a plain socket. On TLS, a close_notify, the socket
    left open for what the peer still sends (TLS 1.3 allows it; a 1.2 peer closes); if
    OpenSSL reports the TLS shutdown complete at once, the whole connection ends."""
    if isinstance(sock, ssl.SSLSocket):
        try:
            sock.unwrap()  # sends close_notify; non-blocking, it then wants the peer's
        except (ssl.SSLError, OSError, ValueError):
            return
        # Unwrapped: the socket would now read raw TLS bytes. Nothing more comes this way.
        sock.shutdown(socket.SHUT_RDWR)
        return
    sock.shutdown(socket.SHUT_WR)


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
    """A connected non-blocking socket with TCP_NODELAY, or ConnectFailed.

    ``timeout`` bounds the name's resolution and the connect. The connect's wait is timed
    by ``Deadlines`` rather than a cancel scope: an L4 session connects once, and entering
    and leaving a scope was a sixth of a short session's Python instructions. A host name
    (rare: backends are addresses) is resolved inside a scope. The socket is created
    non-blocking (``SOCK_NONBLOCK``: no ``ioctl`` after it)."""
    deadline = trio.current_time() + timeout
    resolved = _numeric(address)
    if resolved is None:
        with trio.move_on_at(deadline):
            resolved = await _resolve(address)
        if resolved is None:
            raise ConnectFailed(f"connect timeout after {timeout:g}s", timed_out=True)
    family, sockaddr = resolved
    try:
        sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
    except OSError as exc:  # EMFILE and friends: this node is out of sockets
        raise ConnectFailed(f"cannot open a socket: {exc.strerror}") from None
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        err = sock.connect_ex(sockaddr)
        if err == errno.EINPROGRESS:
            # Asked again at once: a backend on this host (or near enough) has answered the
            # SYN inside the first call, and Linux reports the completed connect (0, then
            # EISCONN) or its refusal here. One system call instead of a readiness wait (a
            # scheduler turn and two epoll_ctl for a descriptor new to Trio); EALREADY: wait.
            err = sock.connect_ex(sockaddr)
            if err == errno.EISCONN:
                err = 0
        if err in (errno.EALREADY, errno.EINPROGRESS):
            deadlines = current_deadlines()
            entry = deadlines.arm(sock, deadline)
            try:
                await trio.lowlevel.wait_writable(sock)
            except trio.ClosedResourceError:
                if not entry[3]:
                    raise
                raise ConnectFailed(f"connect timeout after {timeout:g}s", timed_out=True) from None
            finally:
                deadlines.disarm(entry)
            err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            raise ConnectFailed(_describe(err))
        return sock
    except BaseException:
        sock.close()
        raise


def _numeric(address: Address) -> tuple[int, tuple[object, ...]] | None:
    """The family and address of an IP literal (no lookup), or None for a host name."""
    host = address.host
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            socket.inet_pton(family, host)
        except OSError:
            continue
        return family, (host, address.port)
    return None


async def _resolve(address: Address) -> tuple[int, tuple[object, ...]]:
    host = address.host
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


class Deadlines:
    """Timeouts for readiness waits, one heap entry per wait instead of a cancel scope.

    ``arm`` pushes ``[deadline, seq, sock, fired]`` on a heap; ``disarm`` only
    blanks the socket (lazy deletion, as in Trio's own deadline heap, pruned
    when blanks dominate). One timer task per Trio run sleeps until the
    earliest live deadline and fires what is due: firing calls
    ``trio.lowlevel.notify_closing(sock)`` and the same of the run's ``KeptWaits``,
    which end every wait on that socket with ``trio.ClosedResourceError``. So a fired deadline is only for
    a socket that is about to be given up or answered with a timeout; the
    waiter tells a fired wait from a real close by the ``fired`` flag. The
    timer's own scope is moved only when a deadline earlier than the one it
    sleeps to is armed, which with a fixed timeout per listener or pool is rare.

    A wait goes: ``entry = arm(sock, deadline)``, ``await
    trio.lowlevel.wait_readable(sock)`` (a ``ClosedResourceError`` with
    ``entry[3]`` set means the deadline struck), ``disarm(entry)`` in a
    ``finally`` (see ``recv_within``). If the deadline strikes just after the
    socket became readable, the wait simply ends normally: the data wins.
    """

    # Disarmed entries tolerated in the heap before it is rebuilt without them.
    PRUNE_AFTER = 1000

    def __init__(self) -> None:
        self._heap: list[list[Any]] = []
        self.now = run_clock()  # this run's clock, one call (made in the run: see PerRun)
        self.kept = KeptWaits()  # this run's kept waits: a fired deadline ends theirs too
        self._seq = 0
        self._blank = 0  # disarmed entries still in the heap
        self._timer: trio.CancelScope | None = None  # the timer task's sleep, while it sleeps
        self._timer_at = math.inf  # its deadline (kept here: the scope's property is slower)
        self._running = False

    def arm(self, sock: StreamSocket, deadline: float) -> list[Any]:
        """Start the clock on a wait on ``sock``; pass the result to ``disarm`` when it ends."""
        self._seq += 1
        entry = [deadline, self._seq, sock, False]
        heapq.heappush(self._heap, entry)
        timer = self._timer
        if timer is not None:
            if deadline < self._timer_at:
                timer.deadline = self._timer_at = deadline
        elif not self._running:
            self._running = True
            trio.lowlevel.spawn_system_task(self._run, name="lbnode.sockio.Deadlines")
        # else: the timer is awake and looks at the heap before it sleeps again.
        return entry

    def disarm(self, entry: list[Any]) -> bool:
        """The wait is over; True if its deadline had fired (or ``fire`` was called)."""
        if entry[2] is not None:
            entry[2] = None
            self._blank += 1
            if self._blank > self.PRUNE_AFTER and 2 * self._blank > len(self._heap):
                self._heap[:] = [e for e in self._heap if e[2] is not None]
                heapq.heapify(self._heap)
                self._blank = 0
        fired: bool = entry[3]
        return fired

    def fire(self, entry: list[Any]) -> None:
        """End the wait now, as if its deadline had passed (e.g. to close idle connections)."""
        sock = entry[2]
        if sock is not None:
            entry[2] = None
            self._blank += 1  # still in the heap
            self._strike(entry, sock)

    def _strike(self, entry: list[Any], sock: StreamSocket) -> None:
        entry[3] = True
        try:
            trio.lowlevel.notify_closing(sock)
        except (OSError, ValueError) as exc:  # a socket closed behind our back: nothing waits on it
            log.debug("deadline on a closed socket: %s", exc)
        self.kept.notify_closing(sock)

    async def _run(self) -> None:
        heap = self._heap
        while True:
            now = self.now()
            while heap:
                entry = heap[0]
                if entry[2] is None:
                    heapq.heappop(heap)
                    self._blank -= 1
                elif entry[0] <= now:
                    heapq.heappop(heap)
                    sock = entry[2]
                    entry[2] = None
                    self._strike(entry, sock)
                else:
                    break
            self._timer_at = heap[0][0] if heap else math.inf
            with trio.CancelScope(deadline=self._timer_at) as scope:
                self._timer = scope
                try:
                    await trio.sleep_forever()
                finally:
                    self._timer = None


T = TypeVar("T")


class PerRun(Generic[T]):
    """One ``make()`` per Trio run, made at its first use: how every run-wide helper here
    and in lbnode.tcp.pump (Deadlines, TrickleWaits, the L4 poller and idle watch) is held."""

    __slots__ = ("_var", "_make")

    def __init__(self, name: str, make: Callable[[], T]) -> None:
        self._var: trio.lowlevel.RunVar[T | None] = trio.lowlevel.RunVar(name)
        self._make = make

    def get(self) -> T:
        """The running Trio run's (made now if it is its first use)."""
        value = self._var.get(None)
        if value is None:
            value = self._make()
            self._var.set(value)
        return value

    def made(self) -> T | None:
        """The running Trio run's if it was made already; None otherwise, and outside a run."""
        return self._var.get(None) if trio.lowlevel.in_trio_run() else None


_DEADLINES = PerRun("lbnode.sockio.deadlines", Deadlines)
current_deadlines = _DEADLINES.get  # the Deadlines of the running Trio run


class TrickleWaits:
    """Readiness waits with a deadline for sockets that send a few bytes at a time.

    Trio runs every task that became runnable in one batch before it looks at the
    sockets again, so when 10,000 slowloris connections each send a byte every few
    seconds, hundreds of their tasks can wake together and an ordinary client's
    ready request waits behind all of them (docs/performance.md, "Slow clients").
    Here the sockets sit in one epoll set of our own, watched by one system task
    that wakes at most ``BATCH`` waiting tasks, then lets the rest of the run go
    (a checkpoint) before it takes the next ones. A wait costs an ``epoll_ctl`` to
    register the socket (edge-triggered) and one to remove it, and one heap push for
    its deadline, and needs no cancel scope; the deadline is checked by the same task.

    The waits are for the rest of a line-oriented head (HTTP/1.1), which nothing but a
    line end can complete: with ``line_ends`` (the run's, ``current_trickle_waits()``)
    bytes that arrive on a plain socket are looked at where they lie (``MSG_PEEK``) and
    the task is woken only when they hold a ``\n``, reach ``PEEK_BYTES`` (a head too
    long, for the parser to refuse) or the peer closed or failed (``EPOLLRDHUP``). A
    slowloris byte then costs the watcher a peek, not a wake-up of its task: no task
    step and no new coroutine objects, which, 2,000-3,000 a second at 10,000 attackers,
    kept the garbage collector's young generation at ~100,000 live objects and made
    every gen-0 collection a 75 ms pause (docs/performance.md). TLS sockets are woken on
    any data (their bytes are records, not text). A head the parser would refuse
    mid-line is refused at its next line end (or with a 408 at the header timeout)
    instead of at once.

    ``wait(sock, deadline)``: True when ``sock`` is readable as above (or at EOF or in
    error: the read that follows finds out), False once ``deadline`` passed.
    Linux only (epoll), as is the node.
    """

    # Tasks woken per turn of the watcher: at ~20 us each (a read, the parser, the next wait),
    # about 0.5 ms of the loop before others get it again.
    BATCH = 24
    # Finished waits tolerated in the deadline heap before it is rebuilt without them.
    PRUNE_AFTER = 1000
    # Bytes waiting without a line end that wake the task anyway: the parser refuses a head
    # over max_header_bytes (431), so it must see a long line; well under a socket's buffer.
    PEEK_BYTES = 4096

    def __init__(self, line_ends: bool = True) -> None:
        self._epoll = select.epoll()
        self._line_ends = line_ends
        # fd -> its wait: [deadline, seq, task, readable, fd, the socket to peek or None]
        self._waiting: dict[int, list[Any]] = {}
        self._heap: list[list[Any]] = []  # the same entries by deadline; finished ones have task None
        self._done = 0  # finished entries still in the heap
        self._seq = 0
        self._timer: trio.CancelScope | None = None  # the watcher's wait, while it waits
        self._running = False

    async def wait(self, sock: StreamSocket, deadline: float) -> bool:
        fd = sock.fileno()
        # Edge-triggered: bytes left unread after a peek report nothing more until new ones
        # come (registering reports what is there already).
        try:
            self._epoll.register(fd, _TRICKLE_EVENTS)
        except FileExistsError:  # left registered (a wait that ended oddly): arm it again
            self._epoll.modify(fd, _TRICKLE_EVENTS)
        self._seq += 1
        peek = sock if self._line_ends and type(sock) is socket.socket else None
        entry: list[Any] = [deadline, self._seq, trio.lowlevel.current_task(), False, fd, peek]
        self._waiting[fd] = entry
        heapq.heappush(self._heap, entry)
        timer = self._timer
        if timer is not None:
            if deadline < timer.deadline:
                timer.deadline = deadline
        elif not self._running:
            self._running = True
            trio.lowlevel.spawn_system_task(self._run, name="lbnode.sockio.TrickleWaits")

        def abort(_: object) -> trio.lowlevel.Abort:  # cancelled (the node stopping): forget the wait
            self._finish(entry)
            return trio.lowlevel.Abort.SUCCEEDED

        await trio.lowlevel.wait_task_rescheduled(abort)
        readable: bool = entry[3]
        return readable

    def _finish(self, entry: list[Any]) -> None:
        """The wait is over, its entry left in the heap (lazy deletion, as in ``Deadlines``)."""
        fd = entry[4]
        if self._waiting.get(fd) is entry:
            del self._waiting[fd]
            self._forget(fd)
        entry[2] = entry[5] = None  # the entry may wait in the heap till its deadline: not the socket
        self._done += 1
        if self._done > self.PRUNE_AFTER and 2 * self._done > len(self._heap):
            self._heap[:] = [e for e in self._heap if e[2] is not None]
            heapq.heapify(self._heap)
            self._done = 0

    def _forget(self, fd: int) -> None:
        """No wait on ``fd`` any more: out of the epoll set, so its next bytes cost nothing here."""
        try:
            self._epoll.unregister(fd)
        except (OSError, ValueError):  # closed already (the kernel dropped it), or the set closed
            pass

    @classmethod
    def _complete(cls, sock: socket.socket) -> bool:
        """Are the bytes waiting on ``sock`` worth its task's turn: a line end, a lot, or the end?"""
        try:
            data = sock.recv(cls.PEEK_BYTES, socket.MSG_PEEK)
        except BlockingIOError:
            return False  # nothing after all: the next bytes report again
        except OSError:
            return True  # reset or failed: the task's read finds out
        return not data or len(data) >= cls.PEEK_BYTES or b"\n" in data

    async def _run(self) -> None:
        heap, waiting, epoll = self._heap, self._waiting, self._epoll
        try:
            while True:
                # Deadlines first, a batch at a time too: connections accepted together expire together.
                woken = 0
                now = trio.current_time()
                while heap and woken < self.BATCH:
                    entry = heap[0]
                    if entry[2] is None:
                        heapq.heappop(heap)
                        self._done -= 1
                    elif entry[0] <= now:
                        heapq.heappop(heap)
                        task, entry[2], entry[5] = entry[2], None, None
                        if waiting.get(entry[4]) is entry:
                            del waiting[entry[4]]
                            self._forget(entry[4])
                        trio.lowlevel.reschedule(task)  # readable stays False
                        woken += 1
                    else:
                        break
                if woken:
                    await trio.lowlevel.checkpoint()  # the woken tasks, and everyone else, run now
                    continue
                with trio.CancelScope(deadline=heap[0][0] if heap else math.inf) as timer:
                    self._timer = timer
                    try:
                        await trio.lowlevel.wait_readable(epoll.fileno())
                    finally:
                        self._timer = None
                for fd, events in epoll.poll(0, self.BATCH):
                    ready = waiting.get(fd)
                    if ready is not None and (ready[5] is None or events & _PEER_DONE or self._complete(ready[5])):
                        task = ready[2]
                        ready[3] = True
                        self._finish(ready)
                        trio.lowlevel.reschedule(task)
                        woken += 1
                if woken:
                    await trio.lowlevel.checkpoint()
        finally:
            epoll.close()


# Read readiness, edge-triggered; and the peer's FIN, reset or an error, which a peek can
# miss behind bytes still unread.
_TRICKLE_EVENTS = select.EPOLLIN | select.EPOLLRDHUP | select.EPOLLET
_PEER_DONE = select.EPOLLRDHUP | select.EPOLLHUP | select.EPOLLERR

current_trickle_waits = PerRun("lbnode.sockio.trickle_waits", TrickleWaits).get


class KeptWaits:
    """Read waits on sockets that stay registered in one epoll set of ours for their life.

    Trio's ``wait_readable`` makes a waiter record for the socket, re-arms it with
    ``epoll_ctl(EPOLL_CTL_MOD, EPOLLONESHOT)`` and forgets the record on wake-up: about
    650 Python instructions and a system call per wait, and a keep-alive request has two
    (docs/performance.md). HAProxy registers a socket once. Here a socket is registered
    (``EPOLLIN | EPOLLRDHUP | EPOLLET``) at its first wait and stays so. The set is polled
    without blocking right after each of Trio's own I/O waits (an instrument's
    ``after_io_wait``, while anyone waits here), and the parked tasks whose sockets are
    readable are rescheduled there: they run in the batch Trio takes next, as if its own
    epoll had woken them, and a busy node's turns cost one more ``epoll_wait`` each,
    shared by every socket that became readable. One dispatcher task keeps the set's fd in
    Trio's epoll for when Trio would block (an idle node), takes the edges nobody waits for,
    and while the hook finds something stays runnable instead of re-arming its Trio wait.
    If Trio ever drops the hook (one that raised), the dispatcher's own poll still wakes
    every waiter, a turn later.

    Edge-triggered: an edge that comes while nobody waits is kept (``_EDGE``) and
    ends the socket's next wait at once, so a caller that skips its first read (a response
    that cannot be there yet) cannot miss bytes or a close that came before it waited. A
    wait may therefore end with nothing to read: every caller reads and waits again on
    EAGAIN. A socket is known by the object, not only its fd number: a closed socket's fd
    reused by a new one is registered afresh (the kernel dropped the old one from the set
    when it closed it), and ``forget`` before a close lets the object go at once.

    ``notify_closing`` ends a wait with ``trio.ClosedResourceError``, as Trio's does; a
    fired ``Deadlines`` entry calls it, so timeouts work as for Trio's waits. Cancellation
    forgets the waiter. Plain ``socket.socket`` only: a TLS socket's readiness is not its
    records' (``pending()``), and writes keep Trio's waits.

    The sockets of L4 sessions (lbnode.tcp.pump) wait in the same set, by another rule
    (``watch_session``): a session parks its one task for whichever of its two sockets'
    readiness bits it needs, the poll sets the bits and reschedules the task when they are
    ones it wants, and the pump, which knows its sockets' state, reads its own way (TLS ones
    too). One set, one dispatcher and one hook serve both.
    """

    # Events taken per poll: more than a loaded node's turn has (16-1000 connections).
    MAX_EVENTS = 1024

    def __init__(self) -> None:
        self._epoll = select.epoll()
        self._kept: dict[int, StreamSocket] = {}  # fd -> the socket registered under it
        # fd -> an L4 session's socket (watch_session): (the session, its side's bits:
        # readable, writable, at its end, in error)
        self._sessions: dict[int, tuple[SessionBits, int, int, int, int]] = {}
        # fd -> [parked task, ended by notify_closing]; or _EDGE: an edge no wait has taken yet
        self._waiting: dict[int, list[Any]] = {}
        self._running = False
        self._busy = False  # a poll found something this turn: the dispatcher stays runnable
        self._hook: _PollAfterIoWait | None = None  # polls after Trio's I/O waits, once running

    async def wait_readable(self, sock: StreamSocket) -> None:
        """Until ``sock`` may be readable (or at EOF, or in error); see the class docstring."""
        fd = sock.fileno()
        waiting = self._waiting
        if self._kept.get(fd) is not sock:
            self._keep(fd, sock)
        else:
            entry = waiting.get(fd)
            if entry is _EDGE:
                del waiting[fd]
                return  # an edge came while nobody waited: the caller's read finds out
            if entry is not None:
                raise trio.BusyResourceError("another task is already reading this socket")
        entry = [trio.lowlevel.current_task(), False]
        waiting[fd] = entry
        if not self._running:
            self._running = True
            trio.lowlevel.spawn_system_task(self._run, name="lbnode.sockio.KeptWaits")

        def abort(_: object) -> trio.lowlevel.Abort:  # cancelled: forget the waiter, keep the socket
            if waiting.get(fd) is entry:
                del waiting[fd]
            return trio.lowlevel.Abort.SUCCEEDED

        await trio.lowlevel.wait_task_rescheduled(abort)
        if entry[1]:
            raise trio.ClosedResourceError("the socket's wait was ended (a timeout or a close)")

    def _keep(self, fd: int, sock: StreamSocket) -> None:
        """Register ``sock`` under ``fd`` (a new socket, or a new one on a closed one's fd)."""
        if self._waiting.get(fd) is _EDGE:  # an edge of the old socket
            del self._waiting[fd]
        self._sessions.pop(fd, None)  # (a session's socket had the number; its pump forgets it first)
        try:
            self._epoll.register(fd, _KEPT_EVENTS)
        except FileExistsError:  # the old socket under this fd is still open (not closed by us)
            self._epoll.modify(fd, _KEPT_EVENTS)
        self._kept[fd] = sock

    def forget(self, sock: StreamSocket) -> None:
        """``sock`` is about to be closed: out of the set, and its object let go."""
        fd = sock.fileno()
        if fd >= 0 and self._kept.get(fd) is sock:
            del self._kept[fd]
            if self._waiting.get(fd) is _EDGE:
                del self._waiting[fd]
            try:
                self._epoll.unregister(fd)
            except (OSError, ValueError):  # the set closed with its run
                pass

    def watch_session(self, fd: int, entry: tuple[SessionBits, int, int, int, int], writable: bool) -> None:
        """Report ``fd``'s readiness to an L4 session (lbnode.tcp.pump) as bits: ``entry`` is the
        session and the bits of its socket's side (readable, writable, at its end, in error);
        the dispatcher and the hook set them and reschedule the session's parked task when
        they are ones it ``wants``. ``writable``: room to write is reported too (EPOLLOUT). For
        a watched ``fd``, arms it again (EPOLL_CTL_MOD) with ``writable``. The session's
        socket leaves the set when it is closed; ``unwatch_session`` before that."""
        flags = _SESSION_OUT if writable else _KEPT_EVENTS
        sessions = self._sessions
        if fd in sessions:
            self._epoll.modify(fd, flags)
            return
        if self._kept.pop(fd, None) is not None and self._waiting.get(fd) is _EDGE:
            del self._waiting[fd]  # (a plain socket had the number, closed without ``forget``)
        try:
            self._epoll.register(fd, flags)
        except FileExistsError:  # a descriptor of an ended session, not closed yet, had the number
            self._epoll.modify(fd, flags)
        sessions[fd] = entry
        if not self._running:
            self._running = True
            trio.lowlevel.spawn_system_task(self._run, name="lbnode.sockio.KeptWaits")

    def unwatch_session(self, fd: int) -> None:
        """The session is done with ``fd`` (about to be closed, which takes it out of the set)."""
        self._sessions.pop(fd, None)

    def notify_closing(self, sock: StreamSocket) -> None:
        """End the wait on ``sock``, if one is parked here, with ``trio.ClosedResourceError``."""
        fd = sock.fileno()
        entry = self._waiting.get(fd)
        if entry is not None and entry is not _EDGE and self._kept.get(fd) is sock:
            del self._waiting[fd]
            entry[1] = True
            trio.lowlevel.reschedule(entry[0])

    def poll(self) -> None:
        """Wake the tasks whose sockets became readable, and the sessions whose bits they
        wait for (what the dispatcher and the hook do)."""
        events = self._epoll.poll(0, self.MAX_EVENTS)
        if events:
            waiting, sessions, reschedule = self._waiting, self._sessions, trio.lowlevel.reschedule
            for fd, ev in events:
                session = sessions.get(fd)
                if session is not None:
                    bits, in_bit, out_bit, end_bit, err_bit = session
                    if ev & _IN_EVENTS:
                        bits.ready |= in_bit
                        if ev & _ERR_EVENTS:
                            bits.ready |= err_bit
                        elif ev & _END_EVENTS:
                            bits.ready |= end_bit
                    if ev & _OUT_EVENTS:
                        bits.ready |= out_bit
                    task = bits.task
                    if task is not None and bits.ready & bits.wants:
                        bits.task = None
                        reschedule(task)
                    continue
                entry = waiting.get(fd)
                if entry is None:
                    waiting[fd] = _EDGE
                elif entry is not _EDGE:
                    del waiting[fd]
                    reschedule(entry[0])
            self._busy = True

    async def _run(self) -> None:
        epoll = self._epoll
        hook = self._hook = _PollAfterIoWait(self)
        trio.lowlevel.add_instrument(hook)
        try:
            while True:
                await trio.lowlevel.wait_readable(epoll.fileno())
                self.poll()  # the hook has polled already, unless nobody waited: keep those edges
                while self._busy:
                    # The hook polls after each of Trio's I/O waits, before the turn's batch is
                    # taken: while it finds something, this task stays runnable (so Trio does
                    # not block) instead of re-arming its Trio wait.
                    self._busy = False
                    await trio.lowlevel.checkpoint()
        finally:
            try:
                trio.lowlevel.remove_instrument(hook)
            except KeyError:  # Trio dropped it (a hook that raised)
                pass
            epoll.close()


class _PollAfterIoWait(trio.abc.Instrument):
    """Polls the kept set after each of Trio's own I/O waits, so that a task woken there runs in
    the batch Trio is about to take, as a task woken by Trio's own epoll does, not one turn
    later as one woken by the dispatcher task would."""

    def __init__(self, kept: KeptWaits) -> None:
        self.kept = kept

    def after_io_wait(self, timeout: float) -> None:
        kept = self.kept
        if kept._waiting or kept._sessions:  # nobody waits: the edges stay in the set for the dispatcher
            kept.poll()


# The waiting entry of a socket that had an edge while nobody waited (its next wait ends at once).
_EDGE: list[Any] = [None, False]
# Read readiness and the peer's FIN (EPOLLHUP and EPOLLERR are always reported), edge-triggered.
_KEPT_EVENTS = select.EPOLLIN | select.EPOLLRDHUP | select.EPOLLET
# An L4 session's socket that had to wait for room to write: that too.
_SESSION_OUT = _KEPT_EVENTS | select.EPOLLOUT
# What an event says of a session's socket: something to read (bytes, its end, an error), its
# end (the peer's FIN, or both directions down), room to write.
_IN_EVENTS = select.EPOLLIN | select.EPOLLRDHUP | select.EPOLLHUP | select.EPOLLERR
_END_EVENTS = select.EPOLLRDHUP | select.EPOLLHUP
_ERR_EVENTS = select.EPOLLERR
_OUT_EVENTS = select.EPOLLOUT | select.EPOLLHUP | select.EPOLLERR


class SessionBits(Protocol):
    """An L4 session as ``KeptWaits.watch_session`` sees it (lbnode.tcp.pump's ``_Activity``)."""

    ready: int  # the readiness bits seen
    wants: int  # the bits its parked task waits for
    task: trio.lowlevel.Task | None  # that task, while parked


def forget_kept(sock: StreamSocket) -> None:
    """Before closing ``sock``: out of the running Trio run's ``KeptWaits`` (nothing outside a run)."""
    deadlines = _DEADLINES.made()
    if deadlines is not None:
        deadlines.kept.forget(sock)
