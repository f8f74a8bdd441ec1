"""One watcher for the sockets whose data trickles in (``lbnode.sockio.TrickleWaits``)."""

from __future__ import annotations

import socket

import trio

from lbnode.sockio import TrickleWaits, current_trickle_waits


def _pair() -> tuple[socket.socket, socket.socket]:
    a, b = socket.socketpair()
    a.setblocking(False)
    b.setblocking(False)
    return a, b


async def test_a_wait_ends_true_when_data_comes_and_again_on_the_same_socket() -> None:
    a, b = _pair()
    with a, b:
        waits = current_trickle_waits()
        for byte in (b"G", b"E"):  # the second wait re-arms the one-shot registration

            async def send_soon(data: bytes = byte) -> None:
                await trio.sleep(0.05)
                b.send(data)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(send_soon)
                assert await waits.wait(a, trio.current_time() + 5.0) is True
            assert a.recv(10) == byte


async def test_a_wait_ends_false_at_its_deadline_and_an_earlier_one_wakes_the_watcher() -> None:
    a, b = _pair()
    c, d = _pair()
    with a, b, c, d:
        waits = current_trickle_waits()
        ended: dict[str, tuple[bool, float]] = {}

        async def wait(name: str, sock: socket.socket, timeout: float) -> None:
            ended[name] = (await waits.wait(sock, trio.current_time() + timeout), trio.current_time())

        start = trio.current_time()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(wait, "long", a, 30.0)
            await trio.sleep(0.01)  # the watcher sleeps towards 30 s now
            nursery.start_soon(wait, "short", c, 0.2)
            await trio.sleep(0.6)
            b.send(b"x")
        assert ended["short"][0] is False
        assert 0.2 <= ended["short"][1] - start < 1.0  # 0.8 s of margin for a loaded host
        assert ended["long"][0] is True


async def test_a_burst_of_ready_sockets_wakes_their_tasks_a_batch_at_a_time() -> None:
    pairs = [_pair() for _ in range(3 * TrickleWaits.BATCH)]
    try:
        waits = current_trickle_waits()
        order: list[str] = []

        async def waiter(sock: socket.socket) -> None:
            assert await waits.wait(sock, trio.current_time() + 10.0)
            order.append("slow")

        async def ordinary(sock: socket.socket) -> None:
            await trio.lowlevel.wait_readable(sock)
            order.append("ordinary")

        mine, theirs = _pair()
        with mine, theirs:
            async with trio.open_nursery() as nursery:
                for a, _ in pairs:
                    nursery.start_soon(waiter, a)
                await trio.sleep(0.1)  # all parked
                for _, b in pairs:
                    b.send(b"a")
                theirs.send(b"GET")
                nursery.start_soon(ordinary, mine)
        # The ordinary task is not behind all the slow ones: at most two batches came first
        # (one the watcher had already taken when the ordinary socket became ready).
        assert order.count("slow") == len(pairs)
        assert order.index("ordinary") <= 2 * TrickleWaits.BATCH, order.index("ordinary")
    finally:
        for a, b in pairs:
            a.close()
            b.close()


async def test_a_cancelled_wait_is_forgotten() -> None:
    a, b = _pair()
    with a, b:
        waits = current_trickle_waits()
        with trio.move_on_after(0.05):
            await waits.wait(a, trio.current_time() + 30.0)
        b.send(b"x")
        await trio.sleep(0.05)  # the watcher sees the data and nobody to wake: nothing breaks
        # Re-armed, the registration reports the data still unread at once.
        assert await waits.wait(a, trio.current_time() + 5.0) is True
        assert a.recv(10) == b"x"
