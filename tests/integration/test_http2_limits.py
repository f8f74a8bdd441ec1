"""HTTP/2 attacks a listener must survive (issue 14): each closes the abusive connection (or
bounds what it costs), counts it in /metrics, and another client is served meanwhile."""

from __future__ import annotations

import logging
import socket
import subprocess

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
import hpack
import pytest
import trio
from h2.errors import ErrorCodes
from hyperframe.frame import ContinuationFrame, HeadersFrame

from lbnode.admin.metrics import render
from tests.conftest import listener_toml, node_toml, pool_toml, start_backends, start_node

H2C = "  [listeners.http2]\n  enabled = true\n"
REQUEST = [(":method", "GET"), (":scheme", "http"), (":authority", "t.example"), (":path", "/")]


def client() -> h2.connection.H2Connection:
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    return conn


def read_until_closed(sock: socket.socket, conn: h2.connection.H2Connection, limit: float = 10.0) -> list[object]:
    """Every event until the node closes the connection (GOAWAY then EOF)."""
    sock.settimeout(limit)
    events: list[object] = []
    while True:
        try:
            data = sock.recv(65536)
        except ConnectionResetError:
            break
        if not data:
            break
        try:
            events += conn.receive_data(data)
        except h2.exceptions.ProtocolError:
            break
    return events


def goaway_code(events: list[object]) -> int | None:
    codes = [e.error_code for e in events if isinstance(e, h2.events.ConnectionTerminated)]
    return codes[0] if codes else None


async def other_client_served(port: int) -> None:
    r = await trio.to_thread.run_sync(lambda: subprocess.run(
        ["curl", "-sS", "--max-time", "10", "--http2-prior-knowledge", "-w", "%{http_code}", "-o", "/dev/null",
         f"http://127.0.0.1:{port}/"], capture_output=True, timeout=20))
    assert r.stdout == b"200", r.stderr


def limit_metric(node: object, kind: str) -> int:
    for line in render(node).decode().splitlines():
        if line.startswith("fulcrum_http2_limit_closes_total{") and f'kind="{kind}"' in line:
            return int(float(line.rsplit(" ", 1)[1]))
    return 0


async def start(nursery: trio.Nursery, extra: str = "") -> tuple[object, int, list]:
    backends = await start_backends(nursery, "alpha")
    node, bound = await start_node(nursery, node_toml(
        pool_toml("web", [b.address for b in backends]),
        listener_toml("plain", "http", "web", extra=H2C + extra),
    ))
    return node, bound.listeners["plain"][1], backends


async def test_rapid_reset_closes_the_connection_and_spares_the_backend() -> None:
    async with trio.open_nursery() as nursery:
        node, port, backends = await start(nursery)

        def attack() -> list[object]:
            conn = client()
            with socket.create_connection(("127.0.0.1", port)) as sock:
                # 5,000 requests each reset at once: CVE-2023-44487's pattern, in one write.
                for i in range(5000):
                    sid = 2 * i + 1
                    conn.send_headers(sid, [*REQUEST[:3], (":path", "/slow?ms=2000")])
                    conn.reset_stream(sid)
                try:
                    sock.sendall(conn.data_to_send())
                except OSError:
                    pass  # closed under us: the limit bit before all of it was read
                return read_until_closed(sock, conn)

        events = await trio.to_thread.run_sync(attack)
        assert goaway_code(events) == ErrorCodes.ENHANCE_YOUR_CALM
        assert limit_metric(node, "rapid_reset") == 1
        # The burst (200) and what started before the resets were read: far from 5,000.
        assert backends[0].stats.requests <= 400
        await other_client_served(port)
        nursery.cancel_scope.cancel()


async def test_ping_flood_from_a_client_that_does_not_read() -> None:
    async with trio.open_nursery() as nursery:
        node, port, _ = await start(nursery)

        def attack() -> None:
            conn = client()
            with socket.create_connection(("127.0.0.1", port)) as sock:
                for i in range(20000):
                    conn.ping(i.to_bytes(8, "big"))
                sock.settimeout(10)
                try:
                    sock.sendall(conn.data_to_send())  # 340 KB of PINGs, none of the answers read
                except OSError:
                    pass
                read_until_closed(sock, conn)

        await trio.to_thread.run_sync(attack)
        assert limit_metric(node, "control_frames") == 1
        await other_client_served(port)
        nursery.cancel_scope.cancel()


async def test_settings_flood_closes_the_connection() -> None:
    async with trio.open_nursery() as nursery:
        node, port, _ = await start(nursery)

        def attack() -> int | None:
            conn = client()
            with socket.create_connection(("127.0.0.1", port)) as sock:
                for _ in range(2000):
                    conn.update_settings({h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: 10})
                try:
                    sock.sendall(conn.data_to_send())
                except OSError:
                    pass
                return goaway_code(read_until_closed(sock, conn))

        assert await trio.to_thread.run_sync(attack) == ErrorCodes.ENHANCE_YOUR_CALM
        assert limit_metric(node, "control_frames") == 1
        await other_client_served(port)
        nursery.cancel_scope.cancel()


def raw_headers(conn: h2.connection.H2Connection, sid: int, block: bytes, end_headers: bool = True) -> bytes:
    frame = HeadersFrame(sid)
    frame.data = block
    frame.flags.add("END_STREAM")
    if end_headers:
        frame.flags.add("END_HEADERS")
    return frame.serialize()


async def test_hpack_bomb_and_huge_header_block_are_refused() -> None:

    async with trio.open_nursery() as nursery:
        node, port, backends = await start(nursery)

        def attack(block: bytes) -> int | None:
            conn = client()
            with socket.create_connection(("127.0.0.1", port)) as sock:
                sock.sendall(conn.data_to_send() + raw_headers(conn, 1, block))
                return goaway_code(read_until_closed(sock, conn))

        encoder = hpack.Encoder()
        base = encoder.encode(REQUEST)
        # The bomb: a 4,000-byte value put in the dynamic table, then referenced 1,000 times
        # (1 byte each): 4 MB of header list from 5 KB on the wire.
        bomb = base + encoder.encode([("x-bomb", "a" * 4000)]) + bytes([0x80 | 62]) * 1000
        assert await trio.to_thread.run_sync(attack, bomb) == ErrorCodes.ENHANCE_YOUR_CALM
        assert limit_metric(node, "header_list_size") == 1
        huge = hpack.Encoder().encode([*REQUEST, ("x-huge", "b" * 100_000)])  # over max_header_list_size (64 KiB)
        code = await trio.to_thread.run_sync(attack, huge)
        assert code in (ErrorCodes.ENHANCE_YOUR_CALM, ErrorCodes.FRAME_SIZE_ERROR)
        assert limit_metric(node, "header_list_size") + limit_metric(node, "protocol_error") == 2
        assert backends[0].stats.requests == 0
        await other_client_served(port)
        nursery.cancel_scope.cancel()


async def test_continuation_flood_is_cut_at_64_frames() -> None:
    async with trio.open_nursery() as nursery:
        node, port, _ = await start(nursery)

        def attack() -> int | None:
            conn = client()
            block = hpack.Encoder().encode(REQUEST)
            data = conn.data_to_send() + raw_headers(conn, 1, block, end_headers=False)
            for _ in range(10000):  # never END_HEADERS: a header block that never ends
                cont = ContinuationFrame(1)
                cont.data = b"\x40\x01a\x01b"  # one small literal field each
                data += cont.serialize()
            with socket.create_connection(("127.0.0.1", port)) as sock:
                try:
                    sock.sendall(data)
                except OSError:
                    pass
                return goaway_code(read_until_closed(sock, conn))


        assert await trio.to_thread.run_sync(attack) == ErrorCodes.PROTOCOL_ERROR
        assert limit_metric(node, "continuation") == 1
        await other_client_served(port)
        nursery.cancel_scope.cancel()


def rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


async def test_zero_window_client_costs_bounded_memory_and_others_are_served() -> None:
    async with trio.open_nursery() as nursery:
        node, port, _ = await start(nursery)
        stalled = trio.Event()
        done = trio.Event()

        def slow_reader() -> None:
            # Window 0 for every stream, 8 downloads of 100 MB each, and never a WINDOW_UPDATE.
            conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
            conn.local_settings = h2.settings.Settings(client=True, initial_values={
                h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 0})
            conn.initiate_connection()
            with socket.create_connection(("127.0.0.1", port)) as sock:
                for i in range(8):
                    conn.send_headers(2 * i + 1, [*REQUEST[:3], (":path", "/bytes?n=100000000")], end_stream=True)
                sock.sendall(conn.data_to_send())
                trio.from_thread.run_sync(stalled.set)
                trio.from_thread.run(done.wait)

        before = rss_kib()
        nursery.start_soon(trio.to_thread.run_sync, slow_reader)
        await stalled.wait()
        await trio.sleep(2.0)  # loopback moves 800 MB in well under this if nothing holds it back
        grown = rss_kib() - before
        # Held per stream: one backend read (64 KiB) and the socket buffers; 30 MB is far under
        # the 800 MB offered, and above what the test process itself allocates meanwhile.
        assert grown < 30 * 1024, grown
        sent = node.http_proxies["plain"].io[1]
        assert sent < 1_000_000  # SETTINGS and HEADERS only: no DATA went out with a zero window
        await other_client_served(port)
        done.set()
        nursery.cancel_scope.cancel()


async def test_a_client_that_stops_reading_the_socket_costs_bounded_memory() -> None:
    async with trio.open_nursery() as nursery:
        node, port, _ = await start(nursery)
        stalled = trio.Event()
        done = trio.Event()

        def no_reader() -> None:
            # Windows as large as HTTP/2 allows, so only the node's own bound holds the data back:
            # 4 downloads of 200 MB, and the socket never read.
            conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
            conn.local_settings = h2.settings.Settings(client=True, initial_values={
                h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 2**31 - 1})
            conn.initiate_connection()
            conn.increment_flow_control_window(2**31 - 1 - 65535)
            with socket.create_connection(("127.0.0.1", port)) as sock:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
                for i in range(4):
                    conn.send_headers(2 * i + 1, [*REQUEST[:3], (":path", "/bytes?n=200000000")], end_stream=True)
                sock.sendall(conn.data_to_send())
                trio.from_thread.run_sync(stalled.set)
                trio.from_thread.run(done.wait)

        before = rss_kib()
        nursery.start_soon(trio.to_thread.run_sync, no_reader)
        await stalled.wait()
        await trio.sleep(2.0)
        grown = rss_kib() - before
        # Held: the kernel's socket buffers, 256 KiB of frames in the node, one 64 KiB read per
        # stream; 30 MB is far under the 800 MB offered.
        assert grown < 30 * 1024, grown
        sent = node.http_proxies["plain"].io[1]
        assert sent < 20_000_000, sent  # what the kernel took before the client's buffer filled
        await other_client_served(port)
        done.set()
        nursery.cancel_scope.cancel()


async def test_a_stalled_stream_does_not_starve_another_on_the_same_connection() -> None:
    async with trio.open_nursery() as nursery:
        _, port, _ = await start(nursery)

        def two_streams() -> int:
            conn = client()
            # A connection window larger than the streams' (as nghttp2 and browsers size it), so
            # the client leaves room for other streams while one is not read.
            conn.increment_flow_control_window(16 * 1024 * 1024)
            with socket.create_connection(("127.0.0.1", port)) as sock:
                conn.send_headers(1, [*REQUEST[:3], (":path", "/bytes?n=50000000")], end_stream=True)  # never read
                conn.send_headers(3, [*REQUEST[:3], (":path", "/bytes?n=5000000")], end_stream=True)
                sock.sendall(conn.data_to_send())
                sock.settimeout(20)
                got = 0
                while True:
                    data = sock.recv(65536)
                    assert data, "connection closed"
                    for event in conn.receive_data(data):
                        if isinstance(event, h2.events.DataReceived) and event.stream_id == 3:
                            got += len(event.data)
                            conn.acknowledge_received_data(event.flow_controlled_length, 3)
                        elif isinstance(event, h2.events.StreamEnded) and event.stream_id == 3:
                            return got
                    out = conn.data_to_send()
                    if out:
                        sock.sendall(out)

        # Stream 1 takes at most its own 64 KiB window; stream 3's data keeps flowing meanwhile.
        assert await trio.to_thread.run_sync(two_streams) == 5_000_000
        nursery.cancel_scope.cancel()


async def test_drain_sends_goaway_and_lets_the_streams_in_flight_finish() -> None:
    async with trio.open_nursery() as nursery:
        node, port, backends = await start(nursery)
        result: list[subprocess.CompletedProcess[bytes]] = []

        async def run_call() -> None:
            # nghttp -v prints the frames: the GOAWAY must come before the answer, not end it.
            result.append(await trio.to_thread.run_sync(lambda: subprocess.run(
                ["nghttp", "-v", f"http://127.0.0.1:{port}/slow?ms=1000"], capture_output=True, timeout=20)))

        async with trio.open_nursery() as calls:
            calls.start_soon(run_call)
            with trio.fail_after(5):
                while not backends[0].stats.inflight:  # the request reached the backend
                    await trio.sleep(0.01)
            node.stop()
        out = result[0].stdout.decode()
        assert result[0].returncode == 0, out
        goaway = out.find("recv GOAWAY frame")
        assert goaway >= 0 and "last_stream_id=1" in out[goaway:goaway + 200], out
        assert "error_code=NO_ERROR" in out[goaway:goaway + 200]
        status = out.find(":status: 200")
        assert goaway < status, out  # announced at once, then the answer in full
        assert out.rstrip().endswith("alpha") or "alpha" in out[status:]
        nursery.cancel_scope.cancel()


async def test_the_last_stream_id_is_served_and_the_client_moves_on() -> None:
    async with trio.open_nursery() as nursery:
        _, port, _ = await start(nursery)

        def last_id() -> tuple[int, bool]:
            # Stream ids only grow: a client that jumps to the last one (2^31 - 1) can open no more
            # on this connection (RFC 9113 5.1.1). The node serves it and stays sound.
            conn = client()
            last = 2**31 - 1
            with socket.create_connection(("127.0.0.1", port)) as sock:
                conn.send_headers(last, REQUEST, end_stream=True)
                sock.sendall(conn.data_to_send())
                sock.settimeout(10)
                status = 0
                while True:
                    data = sock.recv(65536)
                    assert data
                    for event in conn.receive_data(data):
                        if isinstance(event, h2.events.ResponseReceived):
                            status = int(dict(event.headers)[b":status"])
                        elif isinstance(event, h2.events.StreamEnded):
                            try:
                                conn.get_next_available_stream_id()
                                more = True
                            except h2.exceptions.NoAvailableStreamIDError:
                                more = False
                            return status, more

        assert await trio.to_thread.run_sync(last_id) == (200, False)
        await other_client_served(port)
        nursery.cancel_scope.cancel()


async def test_streams_beyond_the_limit_are_refused_alone() -> None:
    async with trio.open_nursery() as nursery:
        node, port, backends = await start(nursery)

        def too_many() -> tuple[int, int, int | None]:
            # 150 streams at once before reading the node's SETTINGS (max 100): the 50 beyond
            # are refused (RST_STREAM REFUSED_STREAM, safe to retry), the connection goes on.
            conn = client()
            with socket.create_connection(("127.0.0.1", port)) as sock:
                for i in range(150):
                    conn.send_headers(2 * i + 1, [*REQUEST[:3], (":path", "/slow?ms=300")], end_stream=True)
                sock.sendall(conn.data_to_send())
                sock.settimeout(10)
                ok = refused = 0
                goaway = None
                while ok + refused < 150 and goaway is None:
                    data = sock.recv(65536)
                    assert data, "connection closed"
                    for event in conn.receive_data(data):
                        if isinstance(event, h2.events.StreamEnded):
                            ok += 1
                        elif isinstance(event, h2.events.StreamReset):
                            assert event.error_code == ErrorCodes.REFUSED_STREAM
                            refused += 1
                        elif isinstance(event, h2.events.ConnectionTerminated):
                            goaway = event.error_code
                    out = conn.data_to_send()
                    if out:
                        sock.sendall(out)
                return ok, refused, goaway

        assert await trio.to_thread.run_sync(too_many) == (100, 50, None)
        assert backends[0].stats.requests == 100
        assert limit_metric(node, "refused_stream") == 50
        nursery.cancel_scope.cancel()


async def test_a_client_goaway_with_streams_in_flight_logs_no_error(caplog: pytest.LogCaptureFixture) -> None:
    async with trio.open_nursery() as nursery:
        node, port, backends = await start(nursery)

        def goaway_then_wait() -> bytes:
            # Three requests, then GOAWAY before the answers (h2load does this when its time is
            # up), and the socket kept open until the node closes it.
            conn = client()
            with socket.create_connection(("127.0.0.1", port)) as sock:
                for sid in (1, 3, 5):
                    conn.send_headers(sid, [*REQUEST[:3], (":path", "/slow?ms=300")], end_stream=True)
                conn.close_connection()
                sock.sendall(conn.data_to_send())
                sock.settimeout(5)
                received = b""
                while data := sock.recv(65536):
                    received += data
                return received

        with caplog.at_level(logging.WARNING, logger="lbnode"):
            received = await trio.to_thread.run_sync(goaway_then_wait)
        assert backends[0].stats.requests == 3 and received  # (the node's SETTINGS at least)
        # h2 refuses to send on a connection the client said GOAWAY on: the streams end as a
        # client reset, not as a failure logged with its traceback.
        assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []
        await other_client_served(port)
        nursery.cancel_scope.cancel()
