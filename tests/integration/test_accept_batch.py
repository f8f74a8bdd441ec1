"""accept_loop takes the connections waiting in the kernel's queue in batches (ACCEPT_BATCH per
readiness wait), and the connection gate still bounds what it takes. Real sockets on loopback."""

from __future__ import annotations

import socket

import trio

from lbnode.listen import ACCEPT_BATCH, ConnectionGate, accept_loop, bind_tcp
from lbnode.model import Address


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


async def _nodelay_of_accepted(lsock: socket.socket, before: int, after: int) -> list[int]:
    """TCP_NODELAY of the connections accept_loop hands over: ``before`` queued before it
    starts, then ``after`` more once it has taken those (and found the queue empty)."""
    port = lsock.getsockname()[1]
    clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(before)]
    nodelay: list[int] = []
    changed = trio.Event()

    async def handler(conn: socket.socket, client_ip: str) -> None:
        nodelay.append(conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
        changed.set()

    async def until(n: int) -> None:
        nonlocal changed
        with trio.fail_after(5):  # each is connected already: a loop turn or two
            while len(nodelay) < n:
                await changed.wait()
                changed = trio.Event()

    try:
        async with trio.open_nursery() as handlers:
            handlers.start_soon(accept_loop, lsock, handler, handlers, ConnectionGate(None), "t")
            await until(before)
            await trio.sleep(0.05)  # the loop found the queue empty and waits on it again
            clients += [socket.create_connection(("127.0.0.1", port)) for _ in range(after)]
            await until(before + after)
            handlers.cancel_scope.cancel()
    finally:
        for c in clients:
            c.close()
        lsock.close()
    return nodelay


async def test_accepted_connections_inherit_tcp_nodelay_from_a_bound_listener() -> None:
    """The proxies do not set TCP_NODELAY per connection: bind_tcp sets it on the listener."""
    lsock = bind_tcp(Address("127.0.0.1", 0), 16, "test")
    assert lsock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
    assert await _nodelay_of_accepted(lsock, 2, 2) == [1, 1, 1, 1]


async def test_a_listener_without_tcp_nodelay_gets_it_and_its_queued_connections_too() -> None:
    """A listening socket from elsewhere (an older node's handover): the connections queued
    before the loop set the option lack it (Linux copies it at the handshake), so the loop
    sets it on them; the later ones inherit it."""
    lsock = _listener()
    assert lsock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 0
    assert await _nodelay_of_accepted(lsock, 3, 2) == [1, 1, 1, 1, 1]


async def test_other_tasks_run_between_batches_of_a_flood() -> None:
    """The readiness wait between two batches is a scheduler turn (it parks even with the queue
    full): a task looping on checkpoints sees the flood half taken, not only none or all."""
    lsock = _listener()
    port = lsock.getsockname()[1]
    queued = ACCEPT_BATCH * 3
    clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(queued)]
    gate = ConnectionGate(None)
    seen: set[int] = set()  # connections accepted so far, at each turn of the other task
    served = 0
    done = trio.Event()

    async def other() -> None:
        while True:
            seen.add(gate.accepted)
            await trio.lowlevel.checkpoint()

    async def handler(conn: socket.socket, client_ip: str) -> None:
        nonlocal served
        served += 1
        if served == queued:
            done.set()

    try:
        async with trio.open_nursery() as handlers:
            handlers.start_soon(other)
            handlers.start_soon(accept_loop, lsock, handler, handlers, gate, "t")
            with trio.fail_after(5):  # all are queued already: a loop turn each batch
                await done.wait()
            handlers.cancel_scope.cancel()
    finally:
        for c in clients:
            c.close()
        lsock.close()
    assert any(0 < n < queued for n in seen), seen
