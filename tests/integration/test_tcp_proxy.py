"""The L4 proxy over real loopback sockets: bytes intact, half-close, failover, limits, drain."""

from __future__ import annotations

import hashlib
import logging
import os
import random
import socket
import struct
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from functools import partial
from typing import Any

import pytest
import trio

from lbnode.demo_backend import BackendStats, pattern_bytes, serve_demo_backend
from lbnode.listen import BindError
from lbnode.model import Address, Listener, parse_config
from lbnode.runtime import BackendState, Snapshot
from lbnode.tcp.proxy import serve_tcp_listener
from lbnode.tcp.pump import PIPES, SPLICE_AVAILABLE, PipePool
from tests.conftest import free_port

HOST = "127.0.0.1"
PUMPS = [
    pytest.param(True, id="splice", marks=pytest.mark.skipif(not SPLICE_AVAILABLE, reason="Linux only")),
    pytest.param(False, id="copy"),
]


def build(
    ports: list[int],
    *,
    max_connections: int | None = None,
    tcp_idle: float = 600.0,
    connect: float = 2.0,
    retries: int = 2,
    backend_max_connections: int | None = None,
    queue_timeout: float = 5.0,
) -> tuple[Listener, Snapshot]:
    listener: dict[str, Any] = {"name": "l4", "protocol": "tcp", "bind": "127.0.0.1:1", "pool": "p"}
    if max_connections is not None:
        listener["max_connections"] = max_connections
    config = parse_config(
        {
            "node": {"id": "n1"},
            "pools": [
                {
                    "name": "p",
                    "backends": [
                        {"address": f"{HOST}:{p}", "name": f"b{i}"}
                        | ({"max_connections": backend_max_connections} if backend_max_connections else {})
                        for i, p in enumerate(ports)
                    ],
                    "timeouts": {"connect": connect, "tcp_idle": tcp_idle},
                    "retries": retries,
                    "queue_timeout": queue_timeout,
                }
            ],
            "listeners": [listener],
        }
    )
    snapshot = Snapshot.build(config, rng=random.Random(0))
    # Port 0 is not valid in a config file; tests ask the kernel for a free one.
    return replace(config.listeners[0], bind=Address(HOST, 0)), snapshot


async def start_proxy(nursery: trio.Nursery, listener: Listener, snapshot: Snapshot, **kw: Any) -> int:
    port: int = await nursery.start(partial(serve_tcp_listener, listener, lambda: snapshot, **kw))
    return port


async def start_server(nursery: trio.Nursery, handler: Callable[[trio.SocketStream], Awaitable[None]]) -> int:
    listeners = await nursery.start(partial(trio.serve_tcp, handler, 0, host=HOST))
    port: int = listeners[0].socket.getsockname()[1]
    return port


async def echo(stream: trio.SocketStream) -> None:
    """Echo until the client half-closes, then half-close back."""
    try:
        async for data in stream:
            await stream.send_all(data)
        await stream.send_eof()
    except trio.BrokenResourceError:
        pass
    finally:
        await stream.aclose()


@contextmanager
def blackhole() -> Iterator[int]:
    """A port whose accept queue is full, so a connect neither succeeds nor fails."""
    with socket.socket() as lsock, socket.socket() as filler:
        lsock.bind((HOST, 0))
        lsock.listen(0)
        filler.connect(lsock.getsockname())
        yield int(lsock.getsockname()[1])


async def read_all(stream: trio.SocketStream) -> bytes:
    parts = []
    while data := await stream.receive_some(1 << 20):
        parts.append(data)
    return b"".join(parts)


async def http_get(port: int, path: str = "/") -> tuple[bytes, bytes]:
    """One request on a new connection through the proxy: (head, body)."""
    stream = await trio.open_tcp_stream(HOST, port)
    with trio.fail_after(5):
        await stream.send_all(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        data = await read_all(stream)
    await stream.aclose()
    head, _, body = data.partition(b"\r\n\r\n")
    return head, body


def backend_of(head: bytes) -> str:
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"x-backend:"):
            return line.split(b":", 1)[1].strip().decode()
    raise AssertionError(f"no X-Backend in {head!r}")


@pytest.mark.parametrize("splice", PUMPS)
async def test_bytes_round_trip_intact(nursery: trio.Nursery, splice: bool) -> None:
    listener, snapshot = build([await start_server(nursery, echo)])
    port = await start_proxy(nursery, listener, snapshot, use_splice=splice)
    payload = os.urandom(6 * 1024 * 1024)
    stream = await trio.open_tcp_stream(HOST, port)

    async def upload() -> None:
        for i in range(0, len(payload), 1 << 20):
            await stream.send_all(payload[i : i + (1 << 20)])
        await stream.send_eof()

    with trio.fail_after(10):
        async with trio.open_nursery() as n:
            n.start_soon(upload)
            echoed = await read_all(stream)
    await stream.aclose()
    assert hashlib.sha256(echoed).hexdigest() == hashlib.sha256(payload).hexdigest()


class SpawnCounter(trio.abc.Instrument):
    """Counts the Trio tasks started while it is installed."""

    def __init__(self) -> None:
        self.spawned = 0

    def task_spawned(self, task: trio.lowlevel.Task) -> None:
        self.spawned += 1


@pytest.mark.parametrize("splice", PUMPS)
async def test_a_session_runs_in_one_task(nursery: trio.Nursery, splice: bool) -> None:
    """Both directions are pumped by the session's own task (lbnode.tcp.pump): the accept loop
    starts one task per connection and the session starts none (the run's SessionPoller and
    IdleWatch tasks start with the first session, before the count)."""
    listener, snapshot = build([await start_server(nursery, echo)])
    port = await start_proxy(nursery, listener, snapshot, use_splice=splice)

    def blocking_session(payload: bytes) -> bytes:
        with socket.create_connection((HOST, port), timeout=5) as client:
            client.sendall(payload)
            client.shutdown(socket.SHUT_WR)
            received = b""
            while data := client.recv(65536):
                received += data
        return received

    async def session(payload: bytes) -> bytes:
        # The client in a thread: no Trio task of its own in the count.
        return await trio.to_thread.run_sync(blocking_session, payload)

    assert await session(b"warm-up") == b"warm-up"
    counter = SpawnCounter()
    trio.lowlevel.add_instrument(counter)
    try:
        # Each session: the echo server's task for its connection, and the proxy's one.
        for i in range(10):
            payload = os.urandom(1000 + i)
            assert await session(payload) == payload
    finally:
        trio.lowlevel.remove_instrument(counter)
    assert counter.spawned == 10 * (1 + 1)


@pytest.mark.parametrize("splice", PUMPS)
async def test_a_conversation_turn_by_turn_backend_first(nursery: trio.Nursery, splice: bool) -> None:
    """A protocol where the backend speaks first and each side waits for the other's line
    (SMTP-like): every turn needs the session to wait on the side that was silent so far."""

    async def greeter(stream: trio.SocketStream) -> None:
        await stream.send_all(b"220 hello\n")
        n = 0
        async for data in stream:
            n += 1
            await stream.send_all(b"250 " + data)
        await stream.send_all(f"221 bye after {n}\n".encode())
        await stream.aclose()

    listener, snapshot = build([await start_server(nursery, greeter)])
    port = await start_proxy(nursery, listener, snapshot, use_splice=splice)
    stream = await trio.open_tcp_stream(HOST, port)
    with trio.fail_after(5):
        assert await stream.receive_some(100) == b"220 hello\n"
        for i in range(30):
            await stream.send_all(f"line {i}\n".encode())
            assert await stream.receive_some(100) == f"250 line {i}\n".encode()
        await stream.send_eof()
        assert await read_all(stream) == b"221 bye after 30\n"
    await stream.aclose()


@pytest.mark.parametrize("splice", PUMPS)
async def test_a_client_that_reads_late_gets_every_byte(nursery: trio.Nursery, splice: bool) -> None:
    """8 MiB from the backend fill the client's socket (and the pipe) long before the client
    reads: the session waits for room on the client's side, then goes on."""
    answer = os.urandom(8 * 1024 * 1024)

    async def talker(stream: trio.SocketStream) -> None:
        await stream.send_all(answer)
        await stream.aclose()

    listener, snapshot = build([await start_server(nursery, talker)])
    port = await start_proxy(nursery, listener, snapshot, use_splice=splice)
    stream = await trio.open_tcp_stream(HOST, port)
    await trio.sleep(0.3)
    with trio.fail_after(10):
        received = await read_all(stream)
    await stream.aclose()
    assert hashlib.sha256(received).digest() == hashlib.sha256(answer).digest()


@pytest.mark.skipif(not SPLICE_AVAILABLE, reason="Linux only")
async def test_sessions_one_after_another_reuse_pipes_bytes_intact(nursery: trio.Nursery) -> None:
    """Each session's splice pipes go back to PIPES when empty; the next sessions take them, and
    must get their own bytes only (a payload differing per session would show a stale byte)."""
    listener, snapshot = build([await start_server(nursery, echo)])
    port = await start_proxy(nursery, listener, snapshot, use_splice=True)
    for i in range(6):
        payload = os.urandom(200_000 + i)
        stream = await trio.open_tcp_stream(HOST, port)
        with trio.fail_after(10):
            await stream.send_all(payload)
            await stream.send_eof()
            echoed = await read_all(stream)
        await stream.aclose()
        assert echoed == payload
        with trio.fail_after(5):  # the proxy's side of the session ends just after ours
            while not PIPES._spare:
                await trio.sleep(0.01)


def test_pipe_pool_keeps_empty_pipes_up_to_its_size_and_closes_the_rest() -> None:
    pool = PipePool(keep=1)
    first, second, third = pool.take(), pool.take(), pool.take()
    pool.give_back(first, empty=True)
    pool.give_back(second, empty=True)  # over keep: closed
    pool.give_back(third, empty=False)  # may hold bytes: closed
    assert pool.take() == first
    for fd in (*second, *third):
        with pytest.raises(OSError):
            os.fstat(fd)
    os.close(first[0])
    os.close(first[1])


@pytest.mark.parametrize("splice", PUMPS)
async def test_download_from_demo_backend_intact(nursery: trio.Nursery, splice: bool) -> None:
    backend_port = await nursery.start(serve_demo_backend, "a", HOST, 0)
    listener, snapshot = build([backend_port])
    port = await start_proxy(nursery, listener, snapshot, use_splice=splice)
    n = 16 * 1024 * 1024 + 5
    head, body = await http_get(port, f"/bytes?n={n}")
    assert head.startswith(b"HTTP/1.1 200 ")
    assert hashlib.sha256(body).digest() == hashlib.sha256(pattern_bytes(n)).digest()


@pytest.mark.parametrize("splice", PUMPS)
async def test_half_close_client_still_receives_the_full_answer(nursery: trio.Nursery, splice: bool) -> None:
    answer_tail = os.urandom(1024 * 1024)

    async def digest_then_answer(stream: trio.SocketStream) -> None:
        # Answers only after the client's EOF arrived through the proxy.
        received = hashlib.sha256()
        async for data in stream:
            received.update(data)
        await stream.send_all(received.digest() + answer_tail)
        await stream.aclose()

    listener, snapshot = build([await start_server(nursery, digest_then_answer)])
    port = await start_proxy(nursery, listener, snapshot, use_splice=splice)
    request = os.urandom(2 * 1024 * 1024)
    stream = await trio.open_tcp_stream(HOST, port)
    with trio.fail_after(10):
        await stream.send_all(request)
        await stream.send_eof()
        answer = await read_all(stream)
    await stream.aclose()
    assert answer == hashlib.sha256(request).digest() + answer_tail


async def test_refusing_backend_is_skipped_for_the_next(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    live = await nursery.start(serve_demo_backend, "live", HOST, 0)
    listener, snapshot = build([free_port(), live])
    port = await start_proxy(nursery, listener, snapshot)
    with caplog.at_level(logging.WARNING, logger="lbnode.tcp"):
        served = [backend_of((await http_get(port))[0]) for _ in range(4)]
    assert served == ["live"] * 4
    dead_state, live_state = snapshot.pools["p"].backends
    assert dead_state.failures >= 1 and live_state.failures == 0  # reported for passive health
    assert any("backend b0 of pool p failed" in r.getMessage() for r in caplog.records)
    assert all(r.exc_info is None for r in caplog.records)


async def test_backend_that_times_out_is_skipped_for_the_next(nursery: trio.Nursery) -> None:
    live = await nursery.start(serve_demo_backend, "live", HOST, 0)
    with blackhole() as dead:
        listener, snapshot = build([dead, live], connect=0.2)
        port = await start_proxy(nursery, listener, snapshot)
        start = trio.current_time()
        # Round robin over two backends: one of two connections goes to the dead one first.
        served = [backend_of((await http_get(port))[0]) for _ in range(2)]
    assert served == ["live", "live"]
    assert snapshot.pools["p"].backends[0].failures >= 1
    assert 0.2 <= trio.current_time() - start < 2


async def test_all_backends_refusing_closes_the_client(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    listener, snapshot = build([free_port(), free_port()])
    port = await start_proxy(nursery, listener, snapshot)
    with caplog.at_level(logging.WARNING, logger="lbnode.tcp"):
        stream = await trio.open_tcp_stream(HOST, port)
        with trio.fail_after(2):
            assert await read_all(stream) == b""
        await stream.aclose()
    assert any("no backend of pool p reachable (2 tried)" in r.getMessage() for r in caplog.records)
    assert all(b.connections == 0 for b in snapshot.pools["p"].backends)


async def test_idle_session_is_closed_after_tcp_idle(nursery: trio.Nursery) -> None:
    listener, snapshot = build([await start_server(nursery, echo)], tcp_idle=0.3)
    port = await start_proxy(nursery, listener, snapshot)
    stream = await trio.open_tcp_stream(HOST, port)
    # Traffic every 0.1 s keeps the session open past tcp_idle...
    for _ in range(6):
        await trio.sleep(0.1)
        await stream.send_all(b"x")
        assert await stream.receive_some(10) == b"x"
    # ...and silence closes it.
    start = trio.current_time()
    with trio.fail_after(2):
        assert await stream.receive_some(10) == b""
    assert 0.25 <= trio.current_time() - start <= 0.6
    await stream.aclose()
    assert snapshot.pools["p"].backends[0].connections == 0


async def test_max_connections_holds_the_excess_until_a_slot_frees(nursery: trio.Nursery) -> None:
    listener, snapshot = build([await start_server(nursery, echo)], max_connections=2)
    port = await start_proxy(nursery, listener, snapshot)
    backend: BackendState = snapshot.pools["p"].backends[0]

    async def ping(stream: trio.SocketStream, data: bytes) -> bytes:
        await stream.send_all(data)
        return await stream.receive_some(10)

    first = await trio.open_tcp_stream(HOST, port)
    second = await trio.open_tcp_stream(HOST, port)
    assert await ping(first, b"1") == b"1"
    assert await ping(second, b"2") == b"2"
    third = await trio.open_tcp_stream(HOST, port)  # completes in the kernel backlog
    await third.send_all(b"3")
    with trio.move_on_after(0.3) as waited:
        await third.receive_some(10)
    assert waited.cancelled_caught, "third connection served beyond max_connections"
    assert backend.connections == 2
    await first.aclose()
    with trio.fail_after(2):
        assert await third.receive_some(10) == b"3"
    assert backend.connections == 2
    for s in (second, third):
        await s.aclose()


async def test_backend_max_connections_queues_the_excess_fifo(nursery: trio.Nursery) -> None:
    listener, snapshot = build([await start_server(nursery, echo)], backend_max_connections=1)
    port = await start_proxy(nursery, listener, snapshot)
    backend: BackendState = snapshot.pools["p"].backends[0]
    first = await trio.open_tcp_stream(HOST, port)
    await first.send_all(b"1")
    assert await first.receive_some(10) == b"1"
    waiting = await trio.open_tcp_stream(HOST, port)  # accepted, then queued for the backend
    await waiting.send_all(b"2")
    with trio.move_on_after(0.3) as held:
        await waiting.receive_some(10)
    assert held.cancelled_caught, "second connection reached a backend at max_connections"
    assert backend.connections == 1
    await first.aclose()  # frees the slot: the queued connection goes through
    with trio.fail_after(2):
        assert await waiting.receive_some(10) == b"2"
    await waiting.aclose()


async def test_backend_max_connections_queue_timeout_closes_the_client(nursery: trio.Nursery) -> None:
    listener, snapshot = build([await start_server(nursery, echo)], backend_max_connections=1, queue_timeout=0.3)
    port = await start_proxy(nursery, listener, snapshot)
    first = await trio.open_tcp_stream(HOST, port)
    await first.send_all(b"1")
    assert await first.receive_some(10) == b"1"
    late = await trio.open_tcp_stream(HOST, port)
    start = trio.current_time()
    with trio.fail_after(3):
        assert await late.receive_some(10) == b""  # closed after the queue timeout
    assert 0.25 <= trio.current_time() - start < 2
    await first.aclose()
    await late.aclose()


async def test_connections_spread_over_backends(nursery: trio.Nursery) -> None:
    stats = [BackendStats() for _ in range(3)]
    ports = [
        await nursery.start(partial(serve_demo_backend, f"n{i}", HOST, 0, stats=s)) for i, s in enumerate(stats)
    ]
    listener, snapshot = build(ports)
    port = await start_proxy(nursery, listener, snapshot)
    served = [backend_of((await http_get(port))[0]) for _ in range(9)]
    assert sorted(served) == sorted(["n0", "n1", "n2"] * 3)
    assert [s.requests for s in stats] == [3, 3, 3]


async def test_backend_connections_counter_follows_the_session(nursery: trio.Nursery) -> None:
    listener, snapshot = build([await start_server(nursery, echo)])
    port = await start_proxy(nursery, listener, snapshot)
    backend = snapshot.pools["p"].backends[0]
    stream = await trio.open_tcp_stream(HOST, port)
    await stream.send_all(b"hi")
    assert await stream.receive_some(10) == b"hi"
    assert (backend.connections, backend.requests) == (1, 1)
    await stream.aclose()
    with trio.fail_after(2):
        while backend.connections:
            await trio.sleep(0.01)


async def test_port_in_use_raises_an_error_naming_the_address(nursery: trio.Nursery) -> None:
    with socket.socket() as taken:
        taken.bind((HOST, 0))
        taken.listen(1)
        used = taken.getsockname()[1]
        listener, snapshot = build([free_port()])
        with pytest.raises(BindError, match=f"listener l4: cannot listen on 127.0.0.1:{used}: address already in use"):
            await serve_tcp_listener(replace(listener, bind=Address(HOST, used)), lambda: snapshot)


async def test_stop_accepting_lets_open_sessions_finish(nursery: trio.Nursery) -> None:
    listener, snapshot = build([await start_server(nursery, echo)])
    stop = trio.Event()
    returned = trio.Event()

    async def run(task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        await serve_tcp_listener(listener, lambda: snapshot, stop_accepting=stop, task_status=task_status)
        returned.set()

    port = await nursery.start(run)
    open_session = await trio.open_tcp_stream(HOST, port)
    await open_session.send_all(b"a")
    assert await open_session.receive_some(10) == b"a"
    stop.set()
    await trio.sleep(0.05)
    with pytest.raises(OSError):
        await trio.open_tcp_stream(HOST, port)
    await open_session.send_all(b"b")
    assert await open_session.receive_some(10) == b"b"
    assert not returned.is_set()
    await open_session.aclose()
    with trio.fail_after(2):
        await returned.wait()


async def test_cancelling_the_listener_mid_connect_releases_the_backend() -> None:
    with blackhole() as dead:
        listener, snapshot = build([dead], connect=5.0)
        backend = snapshot.pools["p"].backends[0]
        async with trio.open_nursery() as nursery:
            port = await start_proxy(nursery, listener, snapshot)
            client = await trio.open_tcp_stream(HOST, port)
            with trio.fail_after(2):
                while backend.connections == 0:  # the proxy is waiting on the connect
                    await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
        assert backend.connections == 0
        with trio.fail_after(2):
            assert await read_all(client) == b""
        await client.aclose()


async def test_tcp_listener_served_by_a_node(nursery: trio.Nursery) -> None:
    from tests.conftest import listener_toml, node_toml, pool_toml, start_backends, start_node

    backends = await start_backends(nursery, "x", "y")
    node, bound = await start_node(
        nursery,
        node_toml(
            pool_toml("p", [b.address for b in backends]),
            listener_toml("l4", "tcp", "p"),
            admin=None,
        ),
    )
    port = bound.listeners["l4"][1]
    served = [backend_of((await http_get(port))[0]) for _ in range(4)]
    assert sorted(served) == ["x", "x", "y", "y"]
    # A graceful stop lets an open session finish.
    stream = await trio.open_tcp_stream(HOST, port)
    await stream.send_all(b"GET /bytes?n=100000 HTTP/1.1\r\n")
    with trio.fail_after(2):
        while node.tcp_proxies["l4"].active == 0:  # type: ignore[attr-defined]
            await trio.sleep(0.01)
    node.stop()
    await trio.sleep(0.05)
    with pytest.raises(OSError):
        await trio.open_tcp_stream(HOST, port)
    await stream.send_all(b"Host: x\r\nConnection: close\r\n\r\n")
    with trio.fail_after(5):
        data = await read_all(stream)
    assert data.endswith(pattern_bytes(100_000))
    await stream.aclose()


@pytest.mark.parametrize("splice", PUMPS)
async def test_a_backend_that_resets_after_its_answer_is_not_passed_off_as_a_clean_end(
    nursery: trio.Nursery, splice: bool
) -> None:
    """The answer's bytes and the reset can arrive together: the client must see the reset
    (the stream was cut), not a FIN that would make a truncated answer look whole."""

    async def answer_then_reset(stream: trio.SocketStream) -> None:
        await stream.receive_some(100)
        await stream.send_all(b"partial answer")
        stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        await stream.aclose()

    listener, snapshot = build([await start_server(nursery, answer_then_reset)])
    port = await start_proxy(nursery, listener, snapshot, use_splice=splice)
    for _ in range(5):
        stream = await trio.open_tcp_stream(HOST, port)
        await stream.send_all(b"question")
        with trio.fail_after(5), pytest.raises(trio.BrokenResourceError):
            await read_all(stream)
        await stream.aclose()
