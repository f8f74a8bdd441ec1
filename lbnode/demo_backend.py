"""Demo HTTP/1.1 backends: a small, fast Trio server used by ``lbnode demo`` and the tests.

Owns the demo endpoints (name, /slow, /status, /echo, /bytes, /sink, /healthz, /ws,
/close) and their live counters. It must never buffer a large body whole: bodies
are streamed in both directions, so a 1 GiB upload or download runs in bounded memory.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import logging
import struct
import sys
from collections import deque
from dataclasses import dataclass, field
from http import HTTPStatus
from urllib.parse import parse_qs

import httptools
import trio

log = logging.getLogger("lbnode.demo")

# Largest read from a client socket; bigger reads mean fewer parser calls per MiB.
RECV_SIZE = 256 * 1024
# /bytes pattern: byte i of a download is PATTERN[i % 16], so a client can check it.
PATTERN = b"0123456789abcdef"
# /bytes write size: big enough to keep per-write overhead low, small enough to bound memory.
BYTES_PIECE = 256 * 1024
_BYTES_BLOCK = PATTERN * (BYTES_PIECE // len(PATTERN))
# /echo buffers a body up to this size and answers with Content-Length; larger or
# unknown-length bodies are streamed back chunked as they arrive.
ECHO_BUFFER_LIMIT = 1024 * 1024
# RFC 6455 section 1.3: the GUID appended to Sec-WebSocket-Key.
WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
# Largest WebSocket frame payload we accept; the demo only echoes small messages.
WS_MAX_PAYLOAD = 16 * 1024 * 1024


def pattern_bytes(n: int, offset: int = 0) -> bytes:
    """The first ``n`` bytes a ``/bytes`` download yields, starting at ``offset``."""
    start = offset % len(PATTERN)
    reps = (start + n) // len(PATTERN) + 1
    return (PATTERN * reps)[start : start + n]


@dataclass
class BackendStats:
    """Live counters of one demo backend, readable by in-process tests."""

    requests: int = 0  # request heads received (counted before the answer is sent)
    inflight: int = 0  # requests being answered right now
    max_inflight: int = 0
    connections: int = 0  # client connections open right now
    total_connections: int = 0
    paths: dict[str, int] = field(default_factory=dict)  # requests per path


class BadRequest(Exception):
    """The client broke HTTP/1.1 framing; answered with 400 and a close."""


@dataclass(slots=True)
class RequestHead:
    method: str
    target: str
    version: str  # "1.0" | "1.1"
    headers: list[tuple[bytes, bytes]]
    keep_alive: bool
    upgrade: bool = False  # httptools saw Connection: upgrade (the rest is raw bytes)

    def header(self, name: bytes) -> bytes | None:
        name = name.lower()
        for k, v in self.headers:
            if k.lower() == name:
                return v
        return None

    @property
    def path(self) -> str:
        return self.target.split("?", 1)[0]

    def query(self, name: str) -> str | None:
        _, _, qs = self.target.partition("?")
        values = parse_qs(qs).get(name)
        return values[0] if values else None


_END = object()  # end of the current request's body


class _Connection:
    """One client connection: httptools callbacks turned into a queue of events.

    Events are a ``RequestHead``, body ``bytes`` pieces, then ``_END``. The socket is
    read only when the queue is empty, so a slow consumer slows the client down.
    """

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.parser = httptools.HttpRequestParser(self)
        self.events: deque[object] = deque()
        self.eof = False
        self.upgrade_data = b""  # bytes after an upgrade request head
        self.upgraded = False
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        # per request: body finished, and whether "100 Continue" is owed
        self.body_done = True
        self.expect_continue = False

    # httptools callbacks
    def on_message_begin(self) -> None:
        self._url = b""
        self._headers = []

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        p = self.parser
        self.events.append(
            RequestHead(
                method=p.get_method().decode("latin-1"),
                target=self._url.decode("latin-1"),
                version=p.get_http_version(),
                headers=self._headers,
                keep_alive=p.should_keep_alive(),
                upgrade=p.should_upgrade(),
            )
        )

    def on_body(self, body: bytes) -> None:
        self.events.append(body)

    def on_message_complete(self) -> None:
        self.events.append(_END)

    async def next_event(self) -> object:
        """The next event, reading the socket as needed; ``None`` at a clean EOF."""
        while not self.events:
            if self.eof or self.upgraded:
                return None
            data = await self.stream.receive_some(RECV_SIZE)
            if not data:
                self.eof = True
                continue
            try:
                self.parser.feed_data(data)
            except httptools.HttpParserUpgrade as exc:
                self.upgraded = True
                self.upgrade_data = data[exc.args[0] :]
                if not self.events or self.events[-1] is not _END:
                    self.events.append(_END)
            except httptools.HttpParserError as exc:
                raise BadRequest(str(exc)) from None
        return self.events.popleft()

    async def read_body(self) -> bytes | None:
        """The next piece of the current request body, or ``None`` when it has ended."""
        if self.body_done:
            return None
        if self.expect_continue:
            self.expect_continue = False
            if not self.events or self.events[0] is not _END:
                await self.stream.send_all(b"HTTP/1.1 100 Continue\r\n\r\n")
        event = await self.next_event()
        if event is None:
            raise trio.BrokenResourceError("client closed during the request body")
        if event is _END:
            self.body_done = True
            return None
        assert isinstance(event, bytes)
        return event

    async def drain_body(self) -> int:
        total = 0
        while (piece := await self.read_body()) is not None:
            total += len(piece)
        return total


def _response_head(
    status: int,
    name: str,
    headers: list[tuple[str, str]],
    keep_alive: bool,
    close_header: bool = True,
) -> bytes:
    try:
        reason = HTTPStatus(status).phrase
    except ValueError:
        reason = "Unknown"
    lines = [f"HTTP/1.1 {status} {reason}", f"X-Backend: {name}"]
    lines += [f"{k}: {v}" for k, v in headers]
    if not keep_alive and close_header:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


class _Server:
    def __init__(self, name: str, stats: BackendStats) -> None:
        self.name = name
        self.stats = stats
        self.name_body = f"{name}\n".encode()

    async def handle_connection(self, stream: trio.SocketStream) -> None:
        stats = self.stats
        stats.connections += 1
        stats.total_connections += 1
        conn = _Connection(stream)
        try:
            keep_alive = True
            while keep_alive:
                event = await conn.next_event()
                if event is None:
                    return
                if not isinstance(event, RequestHead):
                    raise BadRequest("body without a request head")
                keep_alive = await self._serve_request(conn, event)
        except BadRequest as exc:
            log.debug("bad request from client: %s", exc)
            try:
                body = b"bad request\n"
                head = _response_head(
                    400, self.name, [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))], False
                )
                await stream.send_all(head + body)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # client went away; nothing to answer
        finally:
            stats.connections -= 1
            await trio.aclose_forcefully(stream)

    async def _serve_request(self, conn: _Connection, head: RequestHead) -> bool:
        """Answer one request; returns whether the connection may carry another."""
        stats = self.stats
        stats.requests += 1
        path = head.path
        stats.paths[path] = stats.paths.get(path, 0) + 1
        stats.inflight += 1
        stats.max_inflight = max(stats.max_inflight, stats.inflight)
        conn.body_done = False
        expect = head.header(b"expect")
        conn.expect_continue = expect is not None and expect.lower() == b"100-continue"
        try:
            if path == "/ws" and head.upgrade:
                await self._websocket(conn, head)
                return False
            if head.upgrade:
                # Not an endpoint that upgrades: answer normally, then the bytes that
                # follow are not HTTP any more, so the connection ends.
                head.keep_alive = False
            if path == "/echo":
                return await self._echo(conn, head)
            if path == "/sink":
                return await self._sink(conn, head)
            await conn.drain_body()
            if path == "/slow":
                ms = _int_or(head.query("ms"), 0)
                await trio.sleep(max(ms, 0) / 1000)
                return await self._simple(conn, head, 200, self.name_body)
            if path.startswith("/status/"):
                return await self._status(conn, head, path[len("/status/") :])
            if path == "/bytes":
                return await self._bytes(conn, head)
            if path == "/healthz":
                return await self._simple(conn, head, 200, b"ok\n")
            if path == "/ws":
                return await self._simple(conn, head, 426, b"websocket upgrade required\n",
                                          [("Upgrade", "websocket")])
            if path == "/close":
                await self._simple(conn, head, 200, self.name_body, close_header=False)
                return False
            return await self._simple(conn, head, 200, self.name_body)
        finally:
            stats.inflight -= 1

    async def _simple(
        self,
        conn: _Connection,
        head: RequestHead,
        status: int,
        body: bytes,
        extra: list[tuple[str, str]] | None = None,
        close_header: bool = True,
        content_type: str = "text/plain",
    ) -> bool:
        keep_alive = head.keep_alive
        headers = [("Content-Type", content_type), ("Content-Length", str(len(body)))]
        if extra:
            headers += extra
        if keep_alive and head.version == "1.0":
            headers.append(("Connection", "keep-alive"))
        data = _response_head(status, self.name, headers, keep_alive, close_header)
        if head.method != "HEAD":
            data += body
        await conn.stream.send_all(data)
        return keep_alive

    async def _status(self, conn: _Connection, head: RequestHead, code_text: str) -> bool:
        code = _int_or(code_text, 0)
        if not 200 <= code <= 599:
            return await self._simple(conn, head, 400, b"status must be 200-599\n")
        if code in (204, 304):
            keep_alive = head.keep_alive
            await conn.stream.send_all(_response_head(code, self.name, [], keep_alive))
            return keep_alive
        return await self._simple(conn, head, code, self.name_body)

    async def _bytes(self, conn: _Connection, head: RequestHead) -> bool:
        n = _int_or(head.query("n"), 0)
        if n < 0:
            return await self._simple(conn, head, 400, b"n must be >= 0\n")
        keep_alive = head.keep_alive
        headers = [("Content-Type", "application/octet-stream"), ("Content-Length", str(n))]
        if keep_alive and head.version == "1.0":
            headers.append(("Connection", "keep-alive"))
        send_all = conn.stream.send_all
        await send_all(_response_head(200, self.name, headers, keep_alive))
        if head.method == "HEAD":
            return keep_alive
        block = memoryview(_BYTES_BLOCK)
        remaining = n
        while remaining >= BYTES_PIECE:
            await send_all(block)
            remaining -= BYTES_PIECE
        if remaining:
            await send_all(block[:remaining])
        return keep_alive

    async def _echo(self, conn: _Connection, head: RequestHead) -> bool:
        lines = [f"{head.method} {head.target} HTTP/{head.version}"]
        lines += [f"{k.decode('latin-1')}: {v.decode('latin-1')}" for k, v in head.headers]
        preamble = ("\n".join(lines) + "\n\n").encode("latin-1")
        keep_alive = head.keep_alive
        length = _int_or((head.header(b"content-length") or b"").decode("latin-1"), -1)
        small = 0 <= length <= ECHO_BUFFER_LIMIT
        if head.header(b"transfer-encoding") is None and length < 0:
            small = True  # no body at all
        if small or head.version == "1.0":
            # Known small body (or a 1.0 client that cannot take chunked): buffer it.
            parts = [preamble]
            while (piece := await conn.read_body()) is not None:
                parts.append(piece)
            return await self._simple(conn, head, 200, b"".join(parts))
        # Large or unknown length: stream it back as it arrives. The client must
        # read the answer while it uploads, as with any streaming echo.
        headers = [("Content-Type", "text/plain"), ("Transfer-Encoding", "chunked")]
        send_all = conn.stream.send_all
        await send_all(_response_head(200, self.name, headers, keep_alive) + _chunk(preamble))
        while (piece := await conn.read_body()) is not None:
            await send_all(_chunk(piece))
        await send_all(b"0\r\n\r\n")
        return keep_alive

    async def _sink(self, conn: _Connection, head: RequestHead) -> bool:
        digest = hashlib.sha256()
        total = 0
        while (piece := await conn.read_body()) is not None:
            digest.update(piece)
            total += len(piece)
        body = json.dumps({"bytes": total, "sha256": digest.hexdigest()}).encode() + b"\n"
        return await self._simple(conn, head, 200, body, content_type="application/json")

    async def _websocket(self, conn: _Connection, head: RequestHead) -> None:
        key = head.header(b"sec-websocket-key")
        upgrade = (head.header(b"upgrade") or b"").lower()
        if key is None or upgrade != b"websocket":
            head.keep_alive = False
            await self._simple(conn, head, 400, b"websocket handshake needs Upgrade and a key\n")
            return
        accept = base64.b64encode(hashlib.sha1(key.strip() + WS_GUID).digest()).decode()
        headers = [("Upgrade", "websocket"), ("Connection", "Upgrade"), ("Sec-WebSocket-Accept", accept)]
        await conn.stream.send_all(_response_head(101, self.name, headers, True))
        await _websocket_echo(conn.stream, bytearray(conn.upgrade_data))


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%b\r\n" % (len(data), data)


def _int_or(text: str | None, default: int) -> int:
    try:
        return int(text) if text is not None else default
    except ValueError:
        return default


async def _websocket_echo(stream: trio.SocketStream, buf: bytearray) -> None:
    """Echo each frame's payload back unmasked with the same opcode; ping gets pong."""

    async def need(n: int) -> bool:
        while len(buf) < n:
            data = await stream.receive_some(RECV_SIZE)
            if not data:
                return False
            buf.extend(data)
        return True

    while await need(2):
        b0, b1 = buf[0], buf[1]
        opcode = b0 & 0x0F
        masked = b1 & 0x80
        length = b1 & 0x7F
        pos = 2
        if length == 126:
            if not await need(4):
                return
            (length,) = struct.unpack_from("!H", buf, 2)
            pos = 4
        elif length == 127:
            if not await need(10):
                return
            (length,) = struct.unpack_from("!Q", buf, 2)
            pos = 10
        if length > WS_MAX_PAYLOAD:
            return
        mask_len = 4 if masked else 0
        if not await need(pos + mask_len + length):
            return
        payload = bytes(buf[pos + mask_len : pos + mask_len + length])
        if masked:
            payload = _unmask(payload, bytes(buf[pos : pos + 4]))
        del buf[: pos + mask_len + length]
        out_opcode = 0xA if opcode == 0x9 else opcode
        await stream.send_all(_ws_frame(b0 & 0x80 | out_opcode, payload))
        if opcode == 0x8:
            return


def _unmask(payload: bytes, mask: bytes) -> bytes:
    n = len(payload)
    key = int.from_bytes((mask * (n // 4 + 1))[:n], "big")
    return (int.from_bytes(payload, "big") ^ key).to_bytes(n, "big")


def _ws_frame(first: int, payload: bytes) -> bytes:
    n = len(payload)
    if n < 126:
        header = struct.pack("!BB", first, n)
    elif n < 65536:
        header = struct.pack("!BBH", first, 126, n)
    else:
        header = struct.pack("!BBQ", first, 127, n)
    return header + payload


async def serve_demo_backend(
    name: str,
    host: str,
    port: int,
    *,
    stats: BackendStats | None = None,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the demo endpoints on ``host:port`` until cancelled.

    ``task_status.started(port)`` reports the bound port (useful with port 0).
    """
    listeners = await trio.open_tcp_listeners(port, host=host)
    # With port 0 and a host name resolving to several addresses each listener gets
    # its own ephemeral port; keep one so the reported port is the only one.
    if port == 0 and len(listeners) > 1:
        for extra in listeners[1:]:
            await extra.aclose()
        listeners = listeners[:1]
    bound = listeners[0].socket.getsockname()[1]
    server = _Server(name, stats if stats is not None else BackendStats())
    task_status.started(bound)
    await trio.serve_listeners(server.handle_connection, listeners)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Fulcrum demo HTTP backend")
    parser.add_argument("--name", default="demo")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args(argv)

    async def run() -> None:
        async with trio.open_nursery() as nursery:
            bound = await nursery.start(serve_demo_backend, args.name, args.host, args.port)
            # One parseable line, so a parent process can learn an ephemeral port.
            print(f"listening {args.host}:{bound}", flush=True)

    try:
        trio.run(run)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
