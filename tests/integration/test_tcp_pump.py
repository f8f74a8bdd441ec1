"""lbnode.tcp.pump on real loopback sockets, driven directly: paths the listener tests cannot
steer (the backend's side of a session is the proxy's own socket there)."""

from __future__ import annotations

import os
import socket

import pytest
import trio

from lbnode.sockio import current_deadlines
from lbnode.tcp.pump import (
    FIRST_READ,
    SPLICE_AVAILABLE,
    _Activity,
    _copy_both,
    _splice_both,
    pump_session,
)

pytestmark = pytest.mark.skipif(not SPLICE_AVAILABLE, reason="splice path: Linux only")


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    """(connected, accepted) over loopback, both non-blocking."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        near = socket.create_connection(listener.getsockname())
        far, _ = listener.accept()
    near.setblocking(False)
    far.setblocking(False)
    return near, far


async def read_to_eof(sock: socket.socket) -> bytes:
    parts = []
    while True:
        try:
            data = sock.recv(1 << 20)
        except BlockingIOError:
            await trio.lowlevel.wait_readable(sock)
            continue
        if not data:
            return b"".join(parts)
        parts.append(data)


async def test_a_first_burst_the_backend_does_not_take_at_once_arrives_whole() -> None:
    """The client's first read goes out with send(); with the backend's socket full (a backend
    not reading yet), what it does not take waits in the direction's pipe and the splice loop
    sends it on, in order."""
    client, client_at_proxy = tcp_pair()
    backend_at_proxy, backend = tcp_pair()
    backend_at_proxy.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # as the proxy's are
    filler = b""  # the proxy's side of the backend connection full before the session starts
    while True:
        try:
            n = backend_at_proxy.send(b"f" * 4096)
        except BlockingIOError:
            break
        filler += b"f" * n
    first = os.urandom(FIRST_READ)  # the whole first read: more than the backend's side takes
    rest = os.urandom(300_000)
    client.setblocking(True)
    client.sendall(first)
    await trio.sleep(0.05)  # in the proxy's receive queue before the session starts
    tally = [0, 0]
    received = b""

    async def backend_reads_late() -> None:
        nonlocal received
        await trio.sleep(0.2)
        received = await read_to_eof(backend)

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pump_session, client_at_proxy, backend_at_proxy, 30.0, True, tally)
            nursery.start_soon(backend_reads_late)
            await trio.to_thread.run_sync(client.sendall, rest)
            client.shutdown(socket.SHUT_WR)
            while not received:
                await trio.sleep(0.01)
            backend.close()  # the backend's end: the session's other direction ends too
    assert received == filler + first + rest
    assert tally[0] == len(first) + len(rest)
    for sock in (client, client_at_proxy, backend_at_proxy):
        sock.close()


@pytest.mark.parametrize("splice", [True, False], ids=["splice", "copy"])
async def test_an_idle_cut_that_comes_while_the_pump_is_not_parked_is_not_lost(splice: bool) -> None:
    """The idle watch cuts a session through its activity: parked, the pump is woken; running
    (a yield after 16 MiB), it must see the cut before it parks again, or it would wait for
    the peers with no deadline left (the watch has dropped the session by then)."""
    client, client_at_proxy = tcp_pair()
    backend_at_proxy, backend = tcp_pair()
    activity = _Activity()
    activity.cancel()  # as IdleWatch does, with no task parked
    both = _splice_both if splice else _copy_both
    with trio.fail_after(2):
        await both(activity, (client_at_proxy, backend_at_proxy),
                   (client_at_proxy.fileno(), backend_at_proxy.fileno()), current_deadlines().kept, [0, 0], [0, 0])
    assert activity.task is None and activity.registered == 0  # it never parked
    for sock in (client, client_at_proxy, backend_at_proxy, backend):
        sock.close()
