"""The byte pump of an L4 session: both directions in the session's own task.

Owns moving bytes between a session's two sockets (``os.splice`` through a pipe on Linux,
recv/send for TLS and elsewhere), the one readiness wait that covers both (in the run's
``lbnode.sockio.KeptWaits``, which sets the session's readiness bits),
the idle timeout of every session (``IdleWatch``) and the spare splice pipes (``PipePool``).
It never parses the bytes, never chooses a backend, never blocks the Trio thread: every
socket is non-blocking and a wait parks the session's task. The wait is an epoll's: Linux
only, as the node's data plane is (splice, socket filters, SCM_RIGHTS hand-over).
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
from typing import Any, Protocol

import trio

from lbnode.sockio import KeptWaits, PerRun, StreamSocket, current_deadlines, half_close

log = logging.getLogger("lbnode.tcp")

# Zero-copy is Linux-only; FULCRUM_TCP_NO_SPLICE=1 forces the copy path (benchmarks, tests).
SPLICE_AVAILABLE = sys.platform == "linux" and hasattr(os, "splice")
SPLICE_DEFAULT = SPLICE_AVAILABLE and os.environ.get("FULCRUM_TCP_NO_SPLICE", "") not in ("1", "true")
# Pipe between the two sockets: larger pipes mean fewer splice calls per GiB. 1 MiB
# is Linux's default /proc/sys/fs/pipe-max-size for unprivileged processes.
PIPE_SIZE = 1024 * 1024
_SPLICE_FLAGS = getattr(os, "SPLICE_F_MOVE", 1) | getattr(os, "SPLICE_F_NONBLOCK", 2)
_F_SETPIPE_SZ = 1031  # fcntl.F_SETPIPE_SZ, spelled out for Pythons that lack the name
# recv/send buffer, per direction.
COPY_BUFFER = 256 * 1024
# A read with recv on the splice path (``_read_small``): a usual request or small response
# whole, and less than any pipe holds (64 KiB at least), so what the other side does not take
# at once fits in one.
FIRST_READ = 16 * 1024
# A session whose sockets never run dry yields to the scheduler after this many bytes
# without a wait, so one fast session cannot starve the accept loop and the others.
YIELD_EVERY_BYTES = 16 * 1024 * 1024
# The idle watch looks at the activity counter this many times per idle period,
# so an idle session is closed between tcp_idle and 1.25 * tcp_idle.
IDLE_CHECKS_PER_PERIOD = 4
# SO_LINGER {on, 0}: close() sends RST, so the peer of a broken session sees an
# abort instead of a clean end that would pass a truncated stream off as whole.
_LINGER_ABORT = struct.pack("ii", 1, 0)

# A session's readiness bits: side 0 is the client, side 1 the backend.
_IN = (1, 2)  # the side has bytes (or its end, or an error) to read
_OUT = (4, 8)  # the side's socket has room to write
_ANY_OUT = 4 | 8
# Kept for a reader that stops at a short recv (``_read_small``): the end of the side's stream
# has been reported, so a short read may not have been followed by an edge. _END: its FIN
# (EPOLLRDHUP or EPOLLHUP, no error), so its last bytes are in; _ERR: an error (a reset).
_END = (16, 32)
_ERR = (64, 128)
# A session's sockets wait in the run's ``KeptWaits`` (lbnode.sockio, ``watch_session``):
# edge-triggered, each added once for the session's life (one epoll_ctl), where Trio's
# one-shot registrations are armed again before every wait; an edge is reported for every
# arrival, so a reader that ran dry (EAGAIN) cannot miss one. EPOLLOUT only once a write had
# to wait: otherwise every ACK would be an event.


class Cancellable(Protocol):
    """What ``IdleWatch`` cuts: a session's ``_Activity``, or a ``trio.CancelScope``."""

    def cancel(self) -> None: ...


class Pumped(StreamSocket, Protocol):
    """A socket the pump moves bytes between: ``socket.socket``, ``ssl.SSLSocket``, and the
    backend TLS connection ``lbnode.tls.upstream.TlsSocket``."""

    def recv_into(self, buffer: bytearray, nbytes: int = 0, /) -> int: ...

    def setsockopt(self, level: int, option: int, value: int | bytes, /) -> None: ...


class _Activity:
    """One session's state, shared by its pump, the run's ``IdleWatch`` and ``KeptWaits``."""

    __slots__ = ("chunks", "broken", "ended", "scope", "idle", "last_seen", "last_change", "done",
                 "ready", "wants", "task", "cut", "registered")

    def __init__(self) -> None:
        self.chunks = 0  # bumped on every chunk moved either way
        self.broken = False  # a direction hit an error (reset, broken pipe)
        self.ended: str | None = None  # why the session was cut (None: both sides ended cleanly)
        # Kept by IdleWatch: what to cut and the idle period, the count it last saw and when
        # that count last moved, and whether the session is over (its heap entry is then dead).
        self.scope: Cancellable | None = None
        self.idle = 0.0
        self.last_seen = 0
        self.last_change = 0.0
        self.done = False
        # Kept with KeptWaits (watch_session): the readiness bits seen (_IN, _OUT; a pump clears one when
        # its call says EAGAIN), the ones the parked pump waits for, its task while parked.
        self.ready = 0
        self.wants = 0
        self.task: trio.lowlevel.Task | None = None
        self.cut = False  # the idle watch ended the session
        self.registered = 0  # _IN of a socket in the run's KeptWaits, _OUT if with EPOLLOUT

    def cancel(self) -> None:
        """The idle watch's cut: the pump stops at its next look (at once if it is parked)."""
        self.cut = True
        task = self.task
        if task is not None:
            self.task = None
            trio.lowlevel.reschedule(task)

    def _abort(self, raise_cancel: Any) -> trio.lowlevel.Abort:
        self.task = None  # cancelled from outside (a drain's deadline, the listener stopping)
        return trio.lowlevel.Abort.SUCCEEDED


class _Broken(Exception):
    """A call on one side's socket failed: the session is cut (``side`` 0: client, 1: backend)."""

    def __init__(self, side: int, exc: OSError) -> None:
        super().__init__(side, exc)
        self.side = side
        self.exc = exc


async def pump_session(
    client: Pumped, upstream: Pumped, idle: float, splice: bool, tally: list[int],
    moved: list[int] | None = None,
) -> str | None:
    """Move bytes both ways until both directions ended, one broke, or the pair idled; the bytes
    moved are added to ``tally`` (the listener's) and ``moved`` (the session's), [from the client,
    to the client], as they go. Returns None for a clean end, else why it ended.

    A direction that ends (its source's EOF) half-closes the other socket (TLS: close_notify)
    while the other direction goes on; when it is the last one, a plain socket is left for the
    caller's close to end, which sends the same FIN (the read side is drained by then, so close
    does not reset). ``splice``: both are plain sockets (no TLS) on Linux."""
    activity = _Activity()
    moved = moved if moved is not None else [0, 0]
    watch = current_idle_watch()
    poller = current_deadlines().kept
    fds = (client.fileno(), upstream.fileno())
    watch.watch(activity, idle, activity, trio.current_time())
    try:
        if splice:
            await _splice_both(activity, (client, upstream), fds, poller, tally, moved)
        else:
            await _copy_both(activity, (client, upstream), fds, poller, tally, moved)
    except _Broken as broken:
        log.debug("tcp session broken: %s", _describe(broken.exc))
        activity.broken = True
        activity.ended = f"{'backend' if broken.side else 'client'}: {_describe(broken.exc)}"
    finally:
        watch.forget(activity)
        registered = activity.registered
        if registered & _IN[0]:
            poller.unwatch_session(fds[0])
        if registered & _IN[1]:
            poller.unwatch_session(fds[1])
    if activity.broken:
        for sock in (client, upstream):
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_ABORT)
            except OSError:
                pass  # already reset by the peer; close() will do
    return activity.ended


def _register(activity: _Activity, wants: int, fds: tuple[int, int], poller: KeptWaits) -> None:
    """The sockets a wait for ``wants`` needs join the run's KeptWaits (once each), and a socket
    that has to wait for room to write is armed for EPOLLOUT again at each such wait: TCP
    reports new room only to a writer it marked as waiting (SOCK_NOSPACE); its poll marks
    it, and the epoll_ctl runs that poll (and reports the room at once if there is some by
    then), where whether a kernel's EAGAIN marks it too is not to be relied on across
    versions. Writes that have to wait are rare in a short session; a bulk one pays the
    epoll_ctl that Trio's one-shot wait for room cost."""
    registered = activity.registered
    for side in (0, 1):
        out = wants & _OUT[side]
        if out or wants & _IN[side] & ~registered:
            poller.watch_session(fds[side], (activity, _IN[side], _OUT[side], _END[side], _ERR[side]),
                                 bool(out or registered & _OUT[side]))
            registered |= _IN[side] | out
    activity.registered = registered


async def _splice_both(
    activity: _Activity, socks: tuple[Pumped, Pumped], fds: tuple[int, int], poller: KeptWaits,
    tally: list[int], moved: list[int],
) -> None:
    """Both directions, socket -> pipe -> socket with os.splice (the bytes never enter Python),
    each until its source is empty or its destination full, then one wait for what either needs."""
    splice = os.splice
    flags = _SPLICE_FLAGS
    current_task = trio.lowlevel.current_task
    wait_task_rescheduled = trio.lowlevel.wait_task_rescheduled
    pipes: list[tuple[int, int] | None] = [None, None]
    in_pipe = [0, 0]  # bytes in each direction's pipe
    going = [True, True]  # direction 0: client -> backend, 1: backend -> client
    small = [True, True]  # still read with recv (_read_small): no read has filled FIRST_READ
    # The client's first bytes are usually in when its session starts (they came with or
    # right after the handshake, and the backend's connect took a while): read at once.
    activity.ready = _IN[0]
    since_wait = 0
    try:
        while True:
            wants = 0
            for d in (0, 1):
                if not going[d]:
                    continue
                n = in_pipe[d]
                in_bit = _IN[d]
                if not n and not activity.ready & in_bit:
                    wants |= in_bit  # nothing to move this way yet
                    continue
                o = 1 - d
                src, dst = fds[d], fds[o]
                while True:
                    if n:
                        try:
                            n -= splice(pipes[d][0], dst, n, flags=flags)  # type: ignore[index]
                        except BlockingIOError:
                            activity.ready &= ~_OUT[o]
                            wants |= _OUT[o]
                            break
                        except OSError as exc:
                            raise _Broken(o, exc) from None
                        if n:
                            continue
                    if not activity.ready & in_bit:
                        wants |= in_bit
                        break
                    if small[d]:
                        n = _read_small(activity, d, socks, pipes, going, small, tally, moved)
                        if n < 0:
                            n = 0
                            break  # this direction ended
                        continue
                    pipe = pipes[d]
                    if pipe is None:
                        pipe = pipes[d] = PIPES.take()
                    try:
                        n = splice(src, pipe[1], PIPE_SIZE, flags=flags)
                    except BlockingIOError:
                        # The pipe is always drained before this call: the source is empty.
                        activity.ready &= ~in_bit
                        wants |= in_bit
                        break
                    except OSError as exc:
                        raise _Broken(d, exc) from None
                    if not n:
                        _end(socks, going, d)  # half-close; the last direction leaves it to close()
                        break
                    activity.chunks += 1
                    tally[d] += n  # per chunk (up to a pipe's 1 MiB): counted as taken from the source
                    moved[d] += n
                    since_wait += n
                    if since_wait >= YIELD_EVERY_BYTES:
                        since_wait = 0
                        in_pipe[d] = n
                        await trio.lowlevel.checkpoint()
                in_pipe[d] = n
            if not wants or activity.cut:
                return  # both directions ended, or the idle watch cut the session while it yielded
            if wants & ~activity.registered or wants & _ANY_OUT:
                _register(activity, wants, fds, poller)
            activity.wants = wants
            activity.task = current_task()
            await wait_task_rescheduled(activity._abort)
            if activity.cut:
                return
            since_wait = 0
    except _Broken:
        in_pipe[0] = in_pipe[1] = -1  # the pipes may hold bytes: closed, not kept
        raise
    finally:
        for d in (0, 1):
            pipe = pipes[d]
            if pipe is not None:
                PIPES.give_back(pipe, empty=in_pipe[d] == 0)


def _read_small(
    activity: _Activity, d: int, socks: tuple[Pumped, Pumped], pipes: list[tuple[int, int] | None],
    going: list[bool], small: list[bool], tally: list[int], moved: list[int],
) -> int:
    """One read of direction ``d`` with recv and send instead of through a pipe, while its reads
    are short (a request, a response: most sessions never fill FIRST_READ; the first read that
    does turns the direction to splice for good). Its pipe is empty when this is called.

    A recv that returns less than it asked for has taken all the kernel held, so, unlike a
    splice (which can stop when the pipe's slots run out), it needs no second call to see
    EAGAIN before the session waits: whatever arrives after the set's last look at the
    socket is a new edge, and what was there by then the look reported. So if that look saw
    the peer's FIN (``_END``: EPOLLRDHUP or EPOLLHUP, no error), the FIN is behind these
    bytes: the direction ends without the read that would return b""; an error (``_ERR``)
    is read for (it comes after the bytes). What the other
    side does not take at once goes into the direction's pipe (an empty pipe holds 64 KiB at
    least) for the splice loop to send on. Returns the bytes left in the pipe, or -1 when
    the direction ended."""
    o = 1 - d
    try:
        data = socks[d].recv(FIRST_READ)
    except BlockingIOError:
        activity.ready &= ~_IN[d]
        return 0
    except OSError as exc:
        raise _Broken(d, exc) from None
    if not data:
        _end(socks, going, d)
        return -1
    n = len(data)
    activity.chunks += 1
    tally[d] += n
    moved[d] += n
    at_end = False
    ready = activity.ready
    if n == FIRST_READ:
        small[d] = False  # maybe more: splice from now on
    elif ready & _ERR[d]:
        pass  # read again: the error comes after these bytes
    elif ready & _END[d]:
        at_end = True
    else:
        activity.ready = ready & ~_IN[d]
    try:
        sent = socks[o].send(data)
    except BlockingIOError:
        sent = 0
    except OSError as exc:
        raise _Broken(o, exc) from None
    if sent < n:
        pipe = pipes[d]
        if pipe is None:
            pipe = pipes[d] = PIPES.take()
        os.write(pipe[1], data[sent:])  # its FIN, if at_end, is read after (the _IN bit stays)
        return n - sent
    if at_end:
        _end(socks, going, d)
        return -1
    return 0


def _end(socks: tuple[Pumped, Pumped], going: list[bool], d: int) -> None:
    """Direction ``d``'s source sent its FIN: half-close the other socket, unless this was the
    last direction (then the caller's close sends the same FIN)."""
    going[d] = False
    if going[1 - d]:
        _shutdown(socks[1 - d], 1 - d)


async def _copy_both(
    activity: _Activity, socks: tuple[Pumped, Pumped], fds: tuple[int, int], poller: KeptWaits,
    tally: list[int], moved: list[int],
) -> None:
    """Both directions through a buffer each (recv_into, send); the portable path, and the TLS
    one: either socket may be an ``ssl.SSLSocket`` (OpenSSL's want-read/want-write wait for
    that readiness of that socket; a send that had to wait is retried with the same bytes, as
    OpenSSL requires) or a backend's ``TlsSocket`` (BlockingIOError like a plain socket)."""
    current_task = trio.lowlevel.current_task
    wait_task_rescheduled = trio.lowlevel.wait_task_rescheduled
    bufs: list[bytearray | None] = [None, None]
    views: list[memoryview | None] = [None, None]
    sent = [0, 0]  # of each direction's buffer: bytes sent of the ``held`` received
    held = [0, 0]
    going = [True, True]
    activity.ready = _IN[0]
    since_wait = 0
    while True:
        wants = 0
        for d in (0, 1):
            if not going[d]:
                continue
            o = 1 - d
            src, dst = socks[d], socks[o]
            buf, view = bufs[d], views[d]
            if buf is None or view is None:
                buf = bufs[d] = bytearray(COPY_BUFFER)
                view = views[d] = memoryview(buf)
            while True:
                if sent[d] < held[d]:
                    try:
                        sent[d] += dst.send(view[sent[d]:held[d]])
                    except (BlockingIOError, ssl.SSLWantWriteError):
                        activity.ready &= ~_OUT[o]
                        wants |= _OUT[o]
                        break
                    except ssl.SSLWantReadError:
                        activity.ready &= ~_IN[o]
                        wants |= _IN[o]
                        break
                    except OSError as exc:
                        raise _Broken(o, exc) from None
                    continue
                if not activity.ready & _IN[d]:
                    wants |= _IN[d]
                    break
                try:
                    n = src.recv_into(buf)
                except (BlockingIOError, ssl.SSLWantReadError):
                    activity.ready &= ~_IN[d]
                    wants |= _IN[d]
                    break
                except ssl.SSLWantWriteError:
                    activity.ready &= ~_OUT[d]
                    wants |= _OUT[d]
                    break
                except OSError as exc:
                    raise _Broken(d, exc) from None
                if n == 0:
                    going[d] = False
                    if going[o] or not isinstance(dst, socket.socket) or isinstance(dst, ssl.SSLSocket):
                        _shutdown(dst, o)  # TLS: the close_notify, whichever direction is last
                    break
                activity.chunks += 1
                tally[d] += n
                moved[d] += n
                sent[d], held[d] = 0, n
                since_wait += n
                if since_wait >= YIELD_EVERY_BYTES:
                    since_wait = 0
                    await trio.lowlevel.checkpoint()
        if not wants or activity.cut:
            return
        if wants & ~activity.registered or wants & _ANY_OUT:
            _register(activity, wants, fds, poller)
        activity.wants = wants
        activity.task = current_task()
        await wait_task_rescheduled(activity._abort)
        if activity.cut:
            return
        since_wait = 0


def _shutdown(sock: StreamSocket, side: int) -> None:
    """The FIN (TLS: close_notify first) of a direction that ended; a failure breaks the session."""
    try:
        half_close(sock)
    except OSError as exc:
        raise _Broken(side, exc) from None


def _describe(exc: OSError) -> str:
    return exc.strerror or str(exc) or type(exc).__name__


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

    def watch(self, activity: _Activity, idle: float, scope: Cancellable, now: float) -> None:
        """Cut the session (``scope.cancel()``) when ``activity.chunks`` stays still for ``idle``
        seconds. ``scope`` is the activity itself for a pump (a cycle, broken by ``forget``)."""
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
        activity.scope = None
        if activity.done:
            return  # cut for idleness: its entry has left the heap already
        activity.done = True
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
                    cut, activity.scope = activity.scope, None
                    if cut is not None:
                        cut.cancel()
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


current_idle_watch = PerRun("lbnode.tcp.idle_watch", IdleWatch).get


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
