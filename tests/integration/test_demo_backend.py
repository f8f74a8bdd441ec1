"""The demo backend over real loopback sockets: every endpoint, keep-alive, pipelining."""

from __future__ import annotations

import hashlib
import json
import os
import struct
import subprocess
import sys
from functools import partial

import httptools
import httpx
import pytest
import trio

from lbnode.demo_backend import BackendStats, pattern_bytes, serve_demo_backend

HOST = "127.0.0.1"


class Response:
    def __init__(self) -> None:
        self.status = 0
        self.headers: dict[str, str] = {}
        self.body = bytearray()
        self.complete = False


class RawClient:
    """A raw HTTP/1.1 client: sends bytes as given, parses responses in order."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.done: list[Response] = []
        self._current = Response()
        self._parser = httptools.HttpResponseParser(self)
        self.eof = False

    @classmethod
    async def connect(cls, port: int) -> RawClient:
        return cls(await trio.open_tcp_stream(HOST, port))

    # httptools callbacks
    def on_message_begin(self) -> None:
        self._current = Response()

    def on_status(self, status: bytes) -> None:
        self._current.status = self._parser.get_status_code()

    def on_header(self, name: bytes, value: bytes) -> None:
        self._current.headers[name.decode().lower()] = value.decode()

    def on_headers_complete(self) -> None:
        self._current.status = self._parser.get_status_code()

    def on_body(self, body: bytes) -> None:
        self._current.body += body

    def on_message_complete(self) -> None:
        self._current.complete = True
        self.done.append(self._current)

    async def send(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def responses(self, n: int) -> list[Response]:
        while len(self.done) < n:
            data = await self.stream.receive_some(65536)
            if not data:
                self.eof = True
                self._parser.feed_data(b"")
                break
            self._parser.feed_data(data)
        out, self.done = self.done[:n], self.done[n:]
        assert len(out) == n, f"connection closed after {len(out)} of {n} responses"
        return out

    async def response(self) -> Response:
        return (await self.responses(1))[0]

    async def at_eof(self) -> bool:
        with trio.move_on_after(2):
            return await self.stream.receive_some(1) == b""
        return False


@pytest.fixture
async def backend(nursery: trio.Nursery) -> tuple[int, BackendStats]:
    stats = BackendStats()
    port = await nursery.start(partial(serve_demo_backend, "alpha", HOST, 0, stats=stats))
    return port, stats


def get(path: str, extra: str = "") -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: x\r\n{extra}\r\n".encode()


async def test_root_answers_name_with_backend_header(backend: tuple[int, BackendStats]) -> None:
    port, stats = backend
    r = await trio.to_thread.run_sync(httpx.get, f"http://{HOST}:{port}/")
    assert r.status_code == 200
    assert r.text == "alpha\n"
    assert r.headers["x-backend"] == "alpha"
    assert r.headers["content-length"] == "6"
    assert stats.requests == 1


async def test_unknown_path_answers_name(backend: tuple[int, BackendStats]) -> None:
    port, _ = backend
    c = await RawClient.connect(port)
    await c.send(get("/no/such/thing?x=1"))
    r = await c.response()
    assert (r.status, bytes(r.body)) == (200, b"alpha\n")


async def test_slow_waits_the_given_milliseconds(backend: tuple[int, BackendStats]) -> None:
    port, _ = backend
    c = await RawClient.connect(port)
    start = trio.current_time()
    await c.send(get("/slow?ms=150"))
    r = await c.response()
    assert trio.current_time() - start >= 0.15
    assert bytes(r.body) == b"alpha\n"


async def test_status_answers_that_status(backend: tuple[int, BackendStats]) -> None:
    port, _ = backend
    c = await RawClient.connect(port)
    await c.send(get("/status/503") + get("/status/204") + get("/status/404") + get("/status/abc"))
    r503, r204, r404, bad = await c.responses(4)
    assert (r503.status, bytes(r503.body)) == (503, b"alpha\n")
    assert (r204.status, bytes(r204.body)) == (204, b"")
    assert r404.status == 404
    assert bad.status == 400


async def test_healthz_answers_ok(backend: tuple[int, BackendStats]) -> None:
    port, _ = backend
    c = await RawClient.connect(port)
    await c.send(get("/healthz"))
    r = await c.response()
    assert (r.status, bytes(r.body)) == (200, b"ok\n")


async def test_echo_returns_request_line_headers_and_body(backend: tuple[int, BackendStats]) -> None:
    port, _ = backend
    c = await RawClient.connect(port)
    await c.send(
        b"POST /echo?q=1 HTTP/1.1\r\nHost: x\r\nX-Custom: Yes\r\nContent-Length: 5\r\n\r\nhello"
    )
    r = await c.response()
    assert r.status == 200
    assert r.headers["content-length"] == str(len(r.body))
    assert bytes(r.body) == (
        b"POST /echo?q=1 HTTP/1.1\nHost: x\nX-Custom: Yes\nContent-Length: 5\n\nhello"
    )


async def test_echo_streams_a_large_chunked_upload_back(backend: tuple[int, BackendStats]) -> None:
    port, _ = backend
    c = await RawClient.connect(port)
    body = os.urandom(3 * 1024 * 1024)

    async def upload() -> None:
        await c.send(b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
        for i in range(0, len(body), 100_000):
            piece = body[i : i + 100_000]
            await c.send(b"%x\r\n%b\r\n" % (len(piece), piece))
        await c.send(b"0\r\n\r\n")

    async with trio.open_nursery() as n:
        n.start_soon(upload)
        r = await c.response()
    assert r.headers["transfer-encoding"] == "chunked"
    head, _, echoed = bytes(r.body).partition(b"\n\n")
    assert head.startswith(b"POST /echo HTTP/1.1\n")
    assert hashlib.sha256(echoed).digest() == hashlib.sha256(body).digest()


async def test_bytes_returns_n_pattern_bytes(backend: tuple[int, BackendStats]) -> None:
    port, _ = backend
    n = 5 * 1024 * 1024 + 7
    c = await RawClient.connect(port)
    await c.send(get(f"/bytes?n={n}") + get("/bytes?n=0"))
    big, empty = await c.responses(2)
    assert big.headers["content-length"] == str(n)
    assert hashlib.sha256(big.body).digest() == hashlib.sha256(pattern_bytes(n)).digest()
    assert bytes(big.body[:20]) == b"0123456789abcdef0123"
    assert (empty.status, bytes(empty.body)) == (200, b"")


async def test_sink_counts_and_hashes_a_chunked_upload(backend: tuple[int, BackendStats]) -> None:
    port, _ = backend
    body = os.urandom(2 * 1024 * 1024 + 3)
    c = await RawClient.connect(port)
    await c.send(b"PUT /sink HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
    for i in range(0, len(body), 65536):
        piece = body[i : i + 65536]
        await c.send(b"%x\r\n%b\r\n" % (len(piece), piece))
    await c.send(b"0\r\n\r\n")
    r = await c.response()
    assert r.headers["content-type"] == "application/json"
    assert json.loads(r.body) == {"bytes": len(body), "sha256": hashlib.sha256(body).hexdigest()}


async def test_sink_with_content_length_via_httpx(backend: tuple[int, BackendStats]) -> None:
    port, _ = backend
    body = b"x" * 100_000
    r = await trio.to_thread.run_sync(partial(httpx.post, f"http://{HOST}:{port}/sink", content=body))
    assert r.json() == {"bytes": 100_000, "sha256": hashlib.sha256(body).hexdigest()}


async def test_expect_100_continue_is_sent_before_the_body(backend: tuple[int, BackendStats]) -> None:
    port, _ = backend
    c = await RawClient.connect(port)
    await c.send(
        b"POST /expect HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 4\r\n\r\n"
    )
    interim = b""
    with trio.fail_after(2):
        while b"\r\n\r\n" not in interim:
            interim += await c.stream.receive_some(1024)
    assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
    await c.send(b"data")
    r = await c.response()
    assert (r.status, bytes(r.body)) == (200, b"alpha\n")


async def test_websocket_upgrade_then_frames_are_echoed(backend: tuple[int, BackendStats]) -> None:
    port, _ = backend
    key = b"dGhlIHNhbXBsZSBub25jZQ=="  # the handshake example of RFC 6455 section 1.3
    stream = await trio.open_tcp_stream(HOST, port)
    await stream.send_all(
        b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
        b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: " + key + b"\r\n\r\n"
    )
    buf = b""
    while b"\r\n\r\n" not in buf:
        buf += await stream.receive_some(4096)
    head, _, buf = buf.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 101 ")
    assert b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=" in head

    def frame(opcode: int, payload: bytes) -> bytes:
        mask = os.urandom(4)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        n = len(payload)
        size = struct.pack("!B", 0x80 | n) if n < 126 else struct.pack("!BH", 0x80 | 126, n)
        return bytes([0x80 | opcode]) + size + mask + masked

    await stream.send_all(frame(0x1, b"hello") + frame(0x2, bytes(range(256)) * 4))
    want = b"\x81\x05hello" + b"\x82\x7e\x04\x00" + bytes(range(256)) * 4
    with trio.fail_after(2):
        while len(buf) < len(want):
            buf += await stream.receive_some(65536)
    assert buf == want
    await stream.send_all(frame(0x8, b"\x03\xe8"))
    with trio.fail_after(2):
        tail = b""
        while chunk := await stream.receive_some(100):
            tail += chunk
    assert tail == b"\x88\x02\x03\xe8"
    await stream.aclose()


async def test_close_endpoint_closes_without_connection_header(backend: tuple[int, BackendStats]) -> None:
    port, _ = backend
    c = await RawClient.connect(port)
    await c.send(get("/close"))
    r = await c.response()
    assert bytes(r.body) == b"alpha\n"
    assert "connection" not in r.headers
    assert await c.at_eof()


async def test_keep_alive_serves_many_requests_on_one_connection(backend: tuple[int, BackendStats]) -> None:
    port, stats = backend
    c = await RawClient.connect(port)
    for _ in range(5):
        await c.send(get("/"))
        r = await c.response()
        assert r.status == 200
    assert stats.requests == 5
    assert stats.total_connections == 1


async def test_connection_close_is_honoured(backend: tuple[int, BackendStats]) -> None:
    port, _ = backend
    c = await RawClient.connect(port)
    await c.send(get("/", "Connection: close\r\n"))
    r = await c.response()
    assert r.headers["connection"] == "close"
    assert await c.at_eof()


async def test_http_1_0_closes_after_the_answer(backend: tuple[int, BackendStats]) -> None:
    port, _ = backend
    c = await RawClient.connect(port)
    await c.send(b"GET / HTTP/1.0\r\n\r\n")
    r = await c.response()
    assert (r.status, bytes(r.body)) == (200, b"alpha\n")
    assert await c.at_eof()


async def test_pipelined_requests_are_answered_in_order(backend: tuple[int, BackendStats]) -> None:
    port, _ = backend
    c = await RawClient.connect(port)
    await c.send(
        get("/slow?ms=50")
        + b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc"
        + get("/status/404")
        + get("/healthz")
    )
    slow, echo, missing, health = await c.responses(4)
    assert bytes(slow.body) == b"alpha\n"
    assert bytes(echo.body).endswith(b"\n\nabc")
    assert missing.status == 404
    assert bytes(health.body) == b"ok\n"


async def test_malformed_request_gets_400_and_close(backend: tuple[int, BackendStats]) -> None:
    port, _ = backend
    c = await RawClient.connect(port)
    await c.send(b"GET / HTTP/1.1\r\nBad Header\r\n\r\n")
    r = await c.response()
    assert r.status == 400
    assert await c.at_eof()


async def test_stats_track_inflight_requests(backend: tuple[int, BackendStats]) -> None:
    port, stats = backend

    async def one() -> None:
        c = await RawClient.connect(port)
        await c.send(get("/slow?ms=200"))
        await c.response()

    async with trio.open_nursery() as n:
        for _ in range(3):
            n.start_soon(one)
        await trio.sleep(0.1)
        assert stats.inflight == 3
    assert stats.inflight == 0
    assert stats.max_inflight == 3
    assert stats.paths["/slow"] == 3


async def test_standalone_runner_serves_until_killed() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "lbnode.demo_backend", "--name", "solo", "--port", "0"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = await trio.to_thread.run_sync(proc.stdout.readline)
        assert line.startswith("listening 127.0.0.1:")
        port = int(line.rsplit(":", 1)[1])
        r = await trio.to_thread.run_sync(httpx.get, f"http://{HOST}:{port}/")
        assert (r.text, r.headers["x-backend"]) == ("solo\n", "solo")
    finally:
        proc.kill()
        proc.wait()
