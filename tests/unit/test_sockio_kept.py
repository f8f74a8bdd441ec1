"""Read waits on sockets kept registered in the run's own epoll set (``lbnode.sockio.KeptWaits``).

Real socket pairs; each test pins what a caller of ``recv_within`` (the backend's response)
or ``ClientConn.fill_before`` (a client's next request) relies on.
"""

from __future__ import annotations

import os
import socket

import pytest
import trio

from lbnode.sockio import current_deadlines, recv_within
from tests.conftest import nonblocking_pair


async def _send_after(delay: float, sock: socket.socket, data: bytes) -> None:
    """``data`` on ``sock`` after ``delay`` seconds: a peer that answers while the test waits."""
    await trio.sleep(delay)
    sock.send(data)


async def test_a_kept_wait_gets_the_data_and_the_socket_stays_registered() -> None:
    a, b = nonblocking_pair()
    kept = current_deadlines().kept
    with a, b:
        for n in range(3):  # the same socket, waited on again and again: registered once

            async def answer(n: int = n) -> None:
                await trio.sleep(0.02)
                b.send(b"reply %d" % n)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(answer)
                assert await recv_within(a, 100, 5.0, expect_wait=True) == b"reply %d" % n
        assert kept._kept[a.fileno()] is a


async def test_a_kept_wait_ends_at_its_deadline_and_the_socket_still_works() -> None:
    a, b = nonblocking_pair()
    with a, b:
        start = trio.current_time()
        assert await recv_within(a, 100, 0.2, expect_wait=True) is None
        # The deadline's 0.2 s; 0.8 s of margin for a scheduler turn on 2 busy cores.
        assert 0.2 <= trio.current_time() - start < 1.0
        b.send(b"later")
        assert await recv_within(a, 100, 1.0, expect_wait=True) == b"later"


async def test_a_fired_deadline_ends_a_kept_wait_with_closed_resource_error() -> None:
    a, b = nonblocking_pair()
    deadlines = current_deadlines()
    with a, b:
        entry = deadlines.arm(a, trio.current_time() + 60)

        async def drain_soon() -> None:
            await trio.sleep(0.05)
            deadlines.fire(entry)  # what HttpProxy.drain does to an idle keep-alive connection

        async with trio.open_nursery() as nursery:
            nursery.start_soon(drain_soon)
            with trio.fail_after(5), pytest.raises(trio.ClosedResourceError):
                await deadlines.kept.wait_readable(a)
        assert deadlines.disarm(entry) is True
        b.send(b"still usable")
        assert await recv_within(a, 100, 1.0, expect_wait=True) == b"still usable"


async def test_a_cancelled_kept_wait_is_forgotten_and_the_next_wait_gets_the_data() -> None:
    a, b = nonblocking_pair()
    kept = current_deadlines().kept
    with a, b:
        with trio.move_on_after(0.05) as scope:
            await kept.wait_readable(a)
        assert scope.cancelled_caught
        assert a.fileno() not in kept._waiting  # no waiter left behind for a later edge to wake
        b.send(b"after the cancel")
        assert await recv_within(a, 100, 1.0, expect_wait=True) == b"after the cancel"


async def test_a_second_reader_of_one_socket_is_refused() -> None:
    a, b = nonblocking_pair()
    kept = current_deadlines().kept
    with a, b:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(kept.wait_readable, a)
            await trio.sleep(0.02)
            with pytest.raises(trio.BusyResourceError):
                await kept.wait_readable(a)
            b.send(b"x")
        assert a.recv(10) == b"x"


async def test_bytes_and_eof_that_come_while_nobody_waits_end_the_next_wait() -> None:
    # Edge-triggered: the edge of bytes that arrive between two waits is reported once, to
    # nobody; a caller that skips its first read (a response just asked for) must not hang.
    a, b = nonblocking_pair()
    c, d = nonblocking_pair()
    with a, b, c, d:
        for sock, peer in ((a, b), (c, d)):  # registered by a first wait
            peer.send(b"first")
            assert await recv_within(sock, 100, 1.0, expect_wait=True) == b"first"
        b.send(b"unannounced")
        d.close()
        await trio.sleep(0.1)  # the dispatcher polls both edges meanwhile (several turns)
        with trio.fail_after(5):  # the timeouts below are 30 s: an answer comes from the edges
            assert await recv_within(a, 100, 30.0, expect_wait=True) == b"unannounced"
            assert await recv_within(c, 100, 30.0, expect_wait=True) == b""


async def _socket_on_fd(fd: int) -> tuple[socket.socket, socket.socket]:
    """A new socket pair whose first socket has file descriptor ``fd`` (just freed)."""
    held = []
    try:
        for _ in range(50):
            a, b = nonblocking_pair()
            if a.fileno() == fd:
                return a, b
            held.append(a)
            held.append(b)
    finally:
        for s in held:
            s.close()
    pytest.fail(f"fd {fd} was not reused")


async def test_a_closed_sockets_fd_reused_by_a_new_socket_gets_the_new_sockets_data() -> None:
    old, old_peer = nonblocking_pair()
    kept = current_deadlines().kept
    old_peer.send(b"old data")
    assert await recv_within(old, 100, 1.0, expect_wait=True) == b"old data"
    fd = old.fileno()
    old.close()  # closed without forget(): the kernel drops it from the set
    new, new_peer = await _socket_on_fd(fd)
    with new, new_peer, old_peer:
        with trio.fail_after(5):
            assert await recv_within(new, 100, 0.2, expect_wait=True) is None  # nothing for it yet

        async with trio.open_nursery() as nursery:
            nursery.start_soon(_send_after, 0.05, new_peer, b"new data")
            with trio.fail_after(5):
                assert await recv_within(new, 100, 30.0, expect_wait=True) == b"new data"
        assert kept._kept[fd] is new


async def test_a_reused_fd_whose_old_socket_lives_on_elsewhere_gives_no_stale_data() -> None:
    # The old socket's file stays open through a dup (as a socket handed to another process
    # would): the kernel keeps its registration, whose events carry the same fd number.
    old, old_peer = nonblocking_pair()
    old_peer.send(b"old data")
    assert await recv_within(old, 100, 1.0, expect_wait=True) == b"old data"
    fd = old.fileno()
    dup = os.dup(fd)
    old.close()
    new, new_peer = await _socket_on_fd(fd)
    try:
        with new, new_peer, old_peer:

            async def both() -> None:
                await trio.sleep(0.05)
                old_peer.send(b"stale")  # an edge of the old file, under the new socket's fd
                await trio.sleep(0.1)
                new_peer.send(b"fresh")

            async with trio.open_nursery() as nursery:
                nursery.start_soon(both)
                with trio.fail_after(5):
                    # A wake-up by the old file's edge reads nothing and waits again.
                    assert await recv_within(new, 100, 30.0, expect_wait=True) == b"fresh"
            assert os.read(dup, 100) == b"stale"  # still there for the other holder
    finally:
        os.close(dup)


async def test_forget_before_close_lets_the_socket_go() -> None:
    a, b = nonblocking_pair()
    kept = current_deadlines().kept
    with b:
        b.send(b"x")
        assert await recv_within(a, 100, 1.0, expect_wait=True) == b"x"
        fd = a.fileno()
        kept.forget(a)
        a.close()
        assert fd not in kept._kept
        kept.forget(a)  # closed already (fileno -1): nothing to do


class _Turns(trio.abc.Instrument):
    """Counts Trio's scheduler turns (one I/O wait each)."""

    def __init__(self) -> None:
        self.count = 0

    def before_io_wait(self, timeout: float) -> None:
        self.count += 1


async def test_a_task_woken_by_a_kept_wait_runs_in_the_turn_trio_would_run_it() -> None:
    # The kept set is polled right after Trio's own I/O wait (an instrument's after_io_wait),
    # so a woken task is in the batch Trio takes next, as if Trio's epoll had woken it; not
    # one turn later, after the dispatcher task's own turn.
    a, b = nonblocking_pair()
    c, d = nonblocking_pair()
    turns = _Turns()
    with a, b, c, d:
        b.send(b"x")  # registered by a first wait
        assert await recv_within(a, 10, 1.0, expect_wait=True) == b"x"
        woke: dict[str, int] = {}

        async def kept_reader() -> None:
            await recv_within(a, 10, 5.0, expect_wait=True)
            woke["kept"] = turns.count

        async def trio_reader() -> None:
            await trio.lowlevel.wait_readable(c)
            woke["trio"] = turns.count

        trio.lowlevel.add_instrument(turns)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(kept_reader)
                nursery.start_soon(trio_reader)
                await trio.sleep(0.05)
                b.send(b"y")  # both readable before the next I/O wait
                d.send(b"y")
        finally:
            trio.lowlevel.remove_instrument(turns)
        assert woke["kept"] == woke["trio"], woke


async def test_kept_waits_still_end_if_trio_drops_the_polling_hook() -> None:
    # Trio removes an instrument whose hook raised; the dispatcher's own poll then wakes waiters.
    a, b = nonblocking_pair()
    kept = current_deadlines().kept
    with a, b:
        b.send(b"x")
        assert await recv_within(a, 10, 1.0, expect_wait=True) == b"x"
        assert kept._hook is not None
        trio.lowlevel.remove_instrument(kept._hook)

        async def answer() -> None:
            await trio.sleep(0.05)
            b.send(b"after the hook")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(answer)
            with trio.fail_after(5):
                assert await recv_within(a, 100, 30.0, expect_wait=True) == b"after the hook"


class _Session:
    """What ``watch_session`` needs of an L4 session (lbnode.tcp.pump's ``_Activity``)."""

    def __init__(self) -> None:
        self.ready = 0
        self.wants = 0
        self.task: trio.lowlevel.Task | None = None

    async def wait(self, wants: int) -> None:
        self.wants = wants
        if not self.ready & wants:
            self.task = trio.lowlevel.current_task()
            await trio.lowlevel.wait_task_rescheduled(lambda _: trio.lowlevel.Abort.SUCCEEDED)


async def test_an_l4_session_waits_in_the_same_set_and_its_fd_may_then_serve_a_plain_wait() -> None:
    """A session's socket reports its side's bits (readable, then the peer's FIN as the end
    bit); once the session unwatched and closed it, a plain socket on the same fd number
    waits there as any other (and the other way round)."""
    kept = current_deadlines().kept
    a, b = nonblocking_pair()
    session = _Session()
    fd = a.fileno()
    kept.watch_session(fd, (session, 1, 4, 16, 64), False)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(_send_after, 0.02, b, b"x")
        with trio.fail_after(5):
            await session.wait(1)
    assert session.ready & 1 and a.recv(10) == b"x"
    session.ready = 0
    b.close()
    with trio.fail_after(5):
        await session.wait(1)
    assert session.ready & 16  # the end: the peer's FIN came with the readiness
    kept.unwatch_session(fd)
    a.close()
    c, d = nonblocking_pair()  # likely a's number again; either way, a plain kept wait works
    with c, d:
        d.send(b"plain")
        assert await recv_within(c, 100, 5.0, expect_wait=True) == b"plain"
        assert c.fileno() not in kept._sessions
        kept.forget(c)
        e = _Session()
        kept.watch_session(c.fileno(), (e, 2, 8, 32, 128), True)  # now a session's, writable too
        with trio.fail_after(5):
            await e.wait(8)  # room to write: at once
        assert e.ready & 8 and c.fileno() not in kept._kept
        kept.unwatch_session(c.fileno())
