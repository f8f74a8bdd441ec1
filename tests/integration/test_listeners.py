"""ListenerSet (lbnode/listeners.py): serve, swap and stop listeners on real sockets, in one Trio run."""

from __future__ import annotations

import socket as stdsocket
from collections.abc import Callable

import pytest
import trio

from lbnode.listen import ConnectionGate, Handler, bind_tcp
from lbnode.listeners import ListenerSet, ListenerSlot
from lbnode.model import Listener, Table, parse_listener


def listener(name: str, port: int = 0) -> Listener:
    return parse_listener(Table({"name": name, "protocol": "tcp", "bind": f"127.0.0.1:{port}", "pool": "p"}, "l"))


def answering(word: bytes, release: trio.Event) -> Handler:
    """A handler that reads one byte, waits for ``release``, then answers ``word``."""

    async def handle(sock: stdsocket.socket, client_ip: str) -> None:
        await trio.lowlevel.wait_readable(sock)
        sock.recv(1)
        await release.wait()
        sock.send(word)

    return handle


async def ask(port: int) -> bytes:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(b"?")
        return await stream.receive_some(16)


async def test_swap_keeps_the_socket_and_lets_the_old_handler_finish() -> None:
    release_a, release_b = trio.Event(), trio.Event()
    words = {"a": answering(b"A", release_a), "b": answering(b"B", release_b)}
    current = ["a"]
    retired: list[str] = []

    def build(li: Listener, slot: ListenerSlot) -> tuple[Handler, list[Callable[[], None]]]:
        name = current[0]
        return words[name], [lambda: retired.append(name)]

    listeners = ListenerSet(build, ConnectionGate(None), lambda: 5.0)
    sock = bind_tcp(listener("x").bind, 16, "x")
    port = sock.getsockname()[1]
    async with trio.open_nursery() as nursery:
        listeners.nursery = nursery
        listeners.serve(listener("x"), sock)
        old_answer: list[bytes] = []

        async def old_client() -> None:
            old_answer.append(await ask(port))

        nursery.start_soon(old_client)
        await trio.sleep(0.2)  # accepted by the "a" handler, waiting for release_a
        current[0] = "b"
        slot = listeners.swap("127.0.0.1:0/x", listener("x"))
        assert slot.sock is sock and sock.fileno() >= 0 and retired == ["a"]
        release_b.set()
        assert await ask(port) == b"B"  # a new connection: the new handler
        release_a.set()
        await trio.sleep(0.2)
        assert old_answer == [b"A"]  # the connection in flight finished on the old one
        listeners.stop("127.0.0.1:0/x")
        assert retired == ["a", "b"]
    assert sock.fileno() == -1
    with pytest.raises(OSError):
        await ask(port)


async def test_stop_takes_the_queued_connections_before_closing() -> None:
    release = trio.Event()
    release.set()

    def build(li: Listener, slot: ListenerSlot) -> tuple[Handler, list[Callable[[], None]]]:
        return answering(b"A", release), []

    listeners = ListenerSet(build, ConnectionGate(None), lambda: 5.0)
    sock = bind_tcp(listener("x").bind, 16, "x")
    port = sock.getsockname()[1]
    # Connected (the kernel completed the handshakes) before the stop, accepted by nobody yet.
    clients = [stdsocket.create_connection(("127.0.0.1", port)) for _ in range(3)]
    for c in clients:
        c.send(b"?")
    async with trio.open_nursery() as nursery:
        listeners.nursery = nursery
        listeners.serve(listener("x"), sock)
        listeners.stop("127.0.0.1:0/x")
    for c in clients:
        c.settimeout(5)
        assert c.recv(16) == b"A"
        c.close()
