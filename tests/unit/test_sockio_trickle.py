"""One watcher for the sockets whose data trickles in (``lbnode.sockio.TrickleWaits``)."""

from __future__ import annotations

import socket

import trio

from lbnode.sockio import TrickleWaits, current_trickle_waits
from tests.conftest import nonblocking_pair


async def test_a_wait_ends_true_when_data_comes_and_again_on_the_same_socket() -> None:
    a, b = nonblocking_pair()
    with a, b:
        waits = current_trickle_waits()
        for byte in (b"G\n", b"E\n"):  # the second wait registers the socket again

            async def send_soon(data: bytes = byte) -> None:
                await trio.sleep(0.05)
                b.send(data)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(send_soon)
                assert await waits.wait(a, trio.current_time() + 5.0) is True
            assert a.recv(10) == byte


async def test_bytes_without_a_line_end_leave_the_task_asleep_until_one_comes() -> None:
    a, b = nonblocking_pair()
    with a, b:
        waits = current_trickle_waits()
        ended: list[float] = []

        async def wait() -> None:
            assert await waits.wait(a, trio.current_time() + 10.0) is True
            ended.append(trio.current_time())

        async with trio.open_nursery() as nursery:
            nursery.start_soon(wait)
            for piece in (b"X-Slow: ", b"a", b"a"):  # a slowloris header value, a piece at a time
                b.send(piece)
                await trio.sleep(0.05)
            assert not ended, "woken by bytes that cannot complete a head"
            sent = trio.current_time()
            b.send(b"\r\n")
        assert ended[0] >= sent
        assert a.recv(100) == b"X-Slow: aa\r\n"  # peeked at, never taken: the task reads it all


async def test_a_wait_on_bytes_without_a_line_end_ends_false_at_its_deadline() -> None:
    a, b = nonblocking_pair()
    with a, b:
        waits = current_trickle_waits()
        start = trio.current_time()
        b.send(b"GET /slow HTTP/1.1")
        assert await waits.wait(a, start + 0.2) is False
        assert 0.2 <= trio.current_time() - start < 1.0  # 0.8 s of margin for a loaded host


async def test_the_peer_closing_or_a_long_line_wakes_the_task_without_a_line_end() -> None:
    a, b = nonblocking_pair()
    c, d = nonblocking_pair()
    with a, b, c, d:
        waits = current_trickle_waits()
        b.send(b"GET /par")
        b.shutdown(socket.SHUT_WR)  # its EOF: the task's read must see it
        assert await waits.wait(a, trio.current_time() + 5.0) is True
        d.send(b"x" * TrickleWaits.PEEK_BYTES)  # for the parser to refuse (431), not to wait on
        assert await waits.wait(c, trio.current_time() + 5.0) is True


async def test_without_line_ends_any_byte_wakes_the_task() -> None:
    a, b = nonblocking_pair()
    with a, b:
        waits = TrickleWaits(line_ends=False)
        b.send(b"G")
        assert await waits.wait(a, trio.current_time() + 5.0) is True


async def test_a_wait_ends_false_at_its_deadline_and_an_earlier_one_wakes_the_watcher() -> None:
    a, b = nonblocking_pair()
    c, d = nonblocking_pair()
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
            b.send(b"x\n")
        assert ended["short"][0] is False
        assert 0.2 <= ended["short"][1] - start < 1.0  # 0.8 s of margin for a loaded host
        assert ended["long"][0] is True


class _Turns(trio.abc.Instrument):
    """Marks each time the run goes back to the kernel for I/O: what ran between two marks was one batch."""

    def __init__(self, log: list[str]) -> None:
        self.log = log

    def before_io_wait(self, timeout: float) -> None:
        self.log.append("poll")


async def test_a_burst_of_ready_sockets_wakes_their_tasks_a_batch_at_a_time() -> None:
    pairs = [nonblocking_pair() for _ in range(3 * TrickleWaits.BATCH)]
    try:
        waits = current_trickle_waits()
        log: list[str] = []

        async def waiter(sock: socket.socket) -> None:
            assert await waits.wait(sock, trio.current_time() + 10.0)
            log.append("slow")

        async with trio.open_nursery() as nursery:
            for a, _ in pairs:
                nursery.start_soon(waiter, a)
            await trio.sleep(0.1)  # all parked
            for _, b in pairs:
                b.send(b"a\r\n")
            turns = _Turns(log)
            trio.lowlevel.add_instrument(turns)
        trio.lowlevel.remove_instrument(turns)
        assert log.count("slow") == len(pairs)
        # Between two polls of the kernel, at most one batch of them ran: a ready ordinary
        # connection waits behind BATCH slow ones at most, not behind the whole burst.
        per_turn = [len(run) for run in "".join("s" if e == "slow" else "|" for e in log).split("|")]
        assert max(per_turn) <= TrickleWaits.BATCH, per_turn
        assert sum(1 for n in per_turn if n) >= 3
    finally:
        for a, b in pairs:
            a.close()
            b.close()


async def test_a_cancelled_wait_is_forgotten() -> None:
    a, b = nonblocking_pair()
    with a, b:
        waits = current_trickle_waits()
        with trio.move_on_after(0.05):
            await waits.wait(a, trio.current_time() + 30.0)
        b.send(b"x\n")
        await trio.sleep(0.05)  # nobody waits on it now: nothing breaks
        # Registered again, the socket reports the data still unread at once.
        assert await waits.wait(a, trio.current_time() + 5.0) is True
        assert a.recv(10) == b"x\n"
