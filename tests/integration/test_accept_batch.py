"""accept_loop takes the connections waiting in the kernel's queue in batches (ACCEPT_BATCH per
readiness wait), and the connection gate still bounds what it takes. Real sockets on loopback."""

from __future__ import annotations

import socket

import trio

from lbnode.listen import ACCEPT_BATCH, ConnectionGate, accept_loop


def _listener() -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    sock.setblocking(False)
    return sock


async def test_a_queue_longer_than_a_batch_is_served_whole() -> None:
    lsock = _listener()
    port = lsock.getsockname()[1]
    queued = ACCEPT_BATCH * 2 + 3  # more than one batch: the loop must come back for the rest
    clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(queued)]
    served: list[str] = []
    done = trio.Event()

    async def handler(conn: socket.socket, client_ip: str) -> None:
        served.append(client_ip)
        if len(served) == queued:
            done.set()

    try:
        async with trio.open_nursery() as handlers:
            handlers.start_soon(accept_loop, lsock, handler, handlers, ConnectionGate(None), "t")
            with trio.fail_after(5):  # all are queued already: one loop turn each batch
                await done.wait()
            handlers.cancel_scope.cancel()
    finally:
        for c in clients:
            c.close()
        lsock.close()
    assert served == ["127.0.0.1"] * queued


async def test_a_batch_stops_at_the_gate() -> None:
    lsock = _listener()
    port = lsock.getsockname()[1]
    clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(5)]
    gate = ConnectionGate(2)
    release = trio.Event()
    running = 0
    most = 0

    async def handler(conn: socket.socket, client_ip: str) -> None:
        nonlocal running, most
        running += 1
        most = max(most, running)
        await release.wait()
        running -= 1

    try:
        async with trio.open_nursery() as handlers:
            handlers.start_soon(accept_loop, lsock, handler, handlers, gate, "t")
            with trio.fail_after(5):
                while gate.accepted < 2:
                    await trio.sleep(0.01)
            await trio.sleep(0.1)  # room for a batch that ignored the gate to take a third
            assert gate.accepted == 2
            release.set()
            with trio.fail_after(5):
                while gate.accepted < 5:
                    await trio.sleep(0.01)
            handlers.cancel_scope.cancel()
    finally:
        for c in clients:
            c.close()
        lsock.close()
    assert most == 2
