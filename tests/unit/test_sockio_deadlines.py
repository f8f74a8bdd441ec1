"""Timeouts of socket waits without cancel scopes (``lbnode.sockio.Deadlines``)."""

from __future__ import annotations

import socket

import pytest
import trio

from lbnode.sockio import Deadlines, current_deadlines, recv_within, send_all
from tests.conftest import nonblocking_pair


async def test_recv_within_gives_none_once_the_timeout_passed() -> None:
    a, b = nonblocking_pair()
    with a, b:
        start = trio.current_time()
        assert await recv_within(a, 100, 0.2, expect_wait=True) is None
        assert 0.2 <= trio.current_time() - start < 1.0
        # The socket is still usable after a deadline struck.
        b.send(b"later")
        assert await recv_within(a, 100, 1.0) == b"later"


async def test_data_before_the_deadline_is_returned() -> None:
    a, b = nonblocking_pair()
    with a, b:

        async def answer() -> None:
            await trio.sleep(0.05)
            b.send(b"hello")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(answer)
            assert await recv_within(a, 100, 5.0, expect_wait=True) == b"hello"


async def test_a_timer_sleeping_to_a_later_deadline_wakes_for_an_earlier_one() -> None:
    a, b = nonblocking_pair()
    c, d = nonblocking_pair()
    with a, b, c, d:
        results: dict[str, object] = {}

        async def wait(name: str, sock: socket.socket, timeout: float) -> None:
            results[name] = (await recv_within(sock, 100, timeout, expect_wait=True), trio.current_time())

        start = trio.current_time()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(wait, "long", a, 30.0)
            await trio.sleep(0.01)
            nursery.start_soon(wait, "short", c, 0.1)
            await trio.sleep(0.5)
            b.send(b"x")
        assert results["short"][0] is None  # type: ignore[index]
        assert results["short"][1] - start < 1.0  # type: ignore[index]
        assert results["long"][0] == b"x"  # type: ignore[index]


async def test_fire_ends_an_armed_wait_now() -> None:
    a, b = nonblocking_pair()
    with a, b:
        deadlines = current_deadlines()
        entry = deadlines.arm(a, trio.current_time() + 60)

        async def drain_soon() -> None:
            await trio.sleep(0.05)
            deadlines.fire(entry)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(drain_soon)
            with pytest.raises(trio.ClosedResourceError):
                await trio.lowlevel.wait_readable(a)
        assert deadlines.disarm(entry) is True


async def test_a_writer_on_the_same_socket_sees_a_failed_send_when_the_read_deadline_strikes() -> None:
    a, b = nonblocking_pair()
    with a, b:
        a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        errors: list[BaseException] = []

        async def writer() -> None:
            try:
                await send_all(a, b"x" * (4 << 20), timeout=30)
            except OSError as exc:
                errors.append(exc)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(writer)
            assert await recv_within(a, 100, 0.1, expect_wait=True) is None
        assert len(errors) == 1 and isinstance(errors[0], ConnectionAbortedError)


async def test_disarmed_entries_do_not_pile_up() -> None:
    a, b = nonblocking_pair()
    with a, b:
        deadlines = Deadlines()
        now = trio.current_time()
        for i in range(10 * Deadlines.PRUNE_AFTER):
            deadlines.disarm(deadlines.arm(a, now + 60 + i))
        assert len(deadlines._heap) <= 2 * Deadlines.PRUNE_AFTER + 2
        live = deadlines.arm(a, now + 1)
        assert live in deadlines._heap
        deadlines.disarm(live)
