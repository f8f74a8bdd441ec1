"""How many writes a gRPC unary call costs through the node (issue 14: a call took twice as
long through the node as direct).

A call that reaches the node whole (HEADERS, DATA, END_STREAM in one read, as grpcio sends
it) should leave for the backend in one write, and a response that comes whole (HEADERS,
DATA, trailers) should leave for the client in one write. Each extra small write on
loopback is one more wake-up of the peer (and one more read of it) and, on a busy machine,
one more wait for a CPU. The count is read from the receiving sockets' own counters
(TCP_INFO ``tcpi_data_segs_in``): with TCP_NODELAY each write of a few hundred bytes is one
segment, so the count does not depend on when the receiver happens to read.

The backend and the client here are plain sockets with the h2 library, so that the frames
and their writes are exactly what the test says they are.
"""

from __future__ import annotations

import socket
import struct
import threading
import time

import h2.config
import h2.connection
import h2.events as ev
import trio

from tests.conftest import listener_toml, node_toml, pool_toml, start_node

H2C = "  [listeners.http2]\n  enabled = true\n"
CALLS = 6
# struct tcp_info (linux/tcp.h): tcpi_data_segs_in, the segments received that carried data.
_DATA_SEGS_IN = 152


def data_segs_in(sock: socket.socket) -> int:
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256)
    return int(struct.unpack_from("I", info, _DATA_SEGS_IN)[0])


def grpc_message(payload: bytes) -> bytes:
    return b"\0" + struct.pack(">I", len(payload)) + payload


class Backend:
    """An h2 server on a plain socket: answers every request with HEADERS, DATA and
    trailers in ONE write, and notes how many data segments each request came in."""

    def __init__(self) -> None:
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(4)
        self.port = self.listener.getsockname()[1]
        self.segments_per_request: list[int] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        conn, _ = self.listener.accept()
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        h2c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, header_encoding=None))
        h2c.initiate_connection()
        conn.sendall(h2c.data_to_send())
        last_end = None
        bodies: dict[int, bytes] = {}
        while True:
            data = conn.recv(65536)
            if not data:
                conn.close()
                return
            for event in h2c.receive_data(data):
                if isinstance(event, ev.DataReceived):
                    bodies[event.stream_id] = bodies.get(event.stream_id, b"") + event.data
                    h2c.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                elif isinstance(event, ev.StreamEnded):
                    now = data_segs_in(conn)
                    if last_end is not None:
                        self.segments_per_request.append(now - last_end)
                    sid = event.stream_id
                    if last_end is None:
                        # The node's SETTINGS ACK (sent when it reads ours, right after its first
                        # request) lands before the first answer, not in the second call's count:
                        # it takes the node well under 10 ms (margin 20x).
                        time.sleep(0.2)
                    h2c.send_headers(sid, [(b":status", b"200"), (b"content-type", b"application/grpc")])
                    h2c.send_data(sid, bodies.pop(sid, b""))
                    h2c.send_headers(sid, [(b"grpc-status", b"0")], end_stream=True)
                    # Read before the answer leaves (the node, in this process, may otherwise
                    # bring the next call in before this thread reads the counter).
                    last_end = data_segs_in(conn)
                    conn.sendall(h2c.data_to_send())
            extra = h2c.data_to_send()  # SETTINGS ACKs, WINDOW_UPDATEs
            if extra:
                conn.sendall(extra)
                last_end = data_segs_in(conn) if last_end is not None else None


def client_calls(port: int) -> tuple[list[bytes], list[int]]:
    """CALLS unary calls one after another on one connection, each written as grpcio does
    (HEADERS, DATA, an empty DATA with END_STREAM, in one write); per call, the answer and
    the data segments it came in."""
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.settimeout(10)
    h2c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
    h2c.initiate_connection()
    sock.sendall(h2c.data_to_send())
    answers: list[bytes] = []
    segments: list[int] = []
    for i in range(CALLS):
        sid = h2c.get_next_available_stream_id()
        h2c.send_headers(sid, [(b":method", b"POST"), (b":scheme", b"http"), (b":authority", b"grpc"),
                               (b":path", b"/demo.Echo/Say"), (b"content-type", b"application/grpc"),
                               (b"te", b"trailers")])
        h2c.send_data(sid, grpc_message(b"call %d" % i))
        h2c.end_stream(sid)
        # Read before the call leaves: the node runs in this process and may take the GIL
        # at sendall and answer before this thread reads the counter (CI counted 0 so).
        before = data_segs_in(sock)
        sock.sendall(h2c.data_to_send())
        body = b""
        ended = False
        while not ended:
            data = sock.recv(65536)
            assert data, "the node closed the connection"
            for event in h2c.receive_data(data):
                if isinstance(event, ev.DataReceived):
                    body += event.data
                    h2c.acknowledge_received_data(event.flow_controlled_length, sid)
                elif isinstance(event, ev.StreamEnded) and event.stream_id == sid:
                    ended = True
        segments.append(data_segs_in(sock) - before)
        answers.append(body)
        extra = h2c.data_to_send()  # SETTINGS ACK, WINDOW_UPDATEs: before the next call's count
        if extra:
            sock.sendall(extra)
    sock.close()
    return answers, segments


async def test_a_whole_unary_call_crosses_the_node_in_one_write_each_way() -> None:
    backend = Backend()
    async with trio.open_nursery() as nursery:
        _, bound = await start_node(nursery, node_toml(
            pool_toml("grpc", [f"127.0.0.1:{backend.port}"], protocol="h2"),
            listener_toml("plain", "http", "grpc", extra=H2C)))
        port = bound.listeners["plain"][1]
        answers, segments = await trio.to_thread.run_sync(client_calls, port)
        nursery.cancel_scope.cancel()
    assert answers == [grpc_message(b"call %d" % i) for i in range(CALLS)]
    # The first call also carries the connections' prefaces and SETTINGS: counted from the second.
    assert backend.segments_per_request == [1] * (CALLS - 1)
    assert segments[1:] == [1] * (CALLS - 1)


async def test_calls_larger_than_the_backends_window_arrive_whole() -> None:
    """The HEADERS now wait for the body to be queued (one write): a body larger than the
    backend's window must still go, HEADERS first, as the window opens. An HTTP/1.1 POST of
    200 KB with a Content-Length is buffered whole (the pool's retry buffer is 1 MiB), over
    grpcio's 64 KiB initial window; grpcio calls of 200 KB and 3 MB stream (a gRPC client
    sends no length). Each is echoed back whole."""
    import subprocess

    import grpc

    from tests.integration.test_grpc import SERVICE, Server

    server = Server("a")
    try:
        async with trio.open_nursery() as nursery:
            _, bound = await start_node(nursery, node_toml(
                pool_toml("grpc", [f"127.0.0.1:{server.port}"], protocol="h2", retry_buffer_bytes=1 << 20),
                listener_toml("plain", "http", "grpc", extra=H2C)))
            port = bound.listeners["plain"][1]

            def calls() -> list[bytes]:
                with grpc.insecure_channel(f"127.0.0.1:{port}",
                                           options=[("grpc.max_receive_message_length", 8 << 20)]) as ch:
                    say = ch.unary_unary(f"/{SERVICE}/Say")
                    return [say(bytes([65 + i]) * size, timeout=20) for i, size in enumerate((200_000, 3_000_000))]

            answers = await trio.to_thread.run_sync(calls)
            r = await trio.to_thread.run_sync(lambda: subprocess.run(
                ["curl", "-sS", "--http1.1", "--max-time", "20", "-H", "content-type: application/grpc",
                 "--data-binary", "@-", f"http://127.0.0.1:{port}/{SERVICE}/Say"],
                input=grpc_message(b"C" * 200_000), capture_output=True, timeout=30))
            nursery.cancel_scope.cancel()
    finally:
        server.server.stop(0)
    assert answers == [b"a:" + b"A" * 200_000, b"a:" + b"B" * 3_000_000]
    assert r.stdout == grpc_message(b"a:" + b"C" * 200_000), (r.stdout[:100], r.stderr)
