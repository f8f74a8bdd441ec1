"""A real HTTP/2-over-TLS backend for tests: Trio + ssl + the sans-I/O ``h2`` package.

Answers every request with its name, method, path, ``:scheme`` and the request body's
length (``name GET /x https 0``), on as many concurrent streams as the client opens. It
records what a test asserts on: SNI and ALPN of each handshake, the client certificate's
subject, connections, streams, and the most streams one connection carried at once.
``alpn`` is what the server accepts: ``("http/1.1",)`` or ``()`` make a backend that does not
speak HTTP/2 over TLS (it completes the handshake, then closes).
"""

from __future__ import annotations

import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import trio

from tests.tlsutil import CertFiles


@dataclass
class H2Stats:
    server_names: list[str | None] = field(default_factory=list)  # SNI of each handshake
    alpn: list[str | None] = field(default_factory=list)  # the protocol selected in each handshake
    client_subjects: list[str | None] = field(default_factory=list)
    failed_handshakes: int = 0
    connections: int = 0  # handshakes completed
    streams: int = 0  # requests answered
    most_concurrent: int = 0  # the most streams one connection had open at once


@dataclass
class H2TlsBackend:
    name: str
    port: int
    stats: H2Stats

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


def h2_server_context(files: CertFiles, alpn: tuple[str, ...], client_ca: Path | None, stats: H2Stats) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(files.cert, files.key)
    if alpn:
        ctx.set_alpn_protocols(list(alpn))
    if client_ca is not None:
        ctx.load_verify_locations(client_ca)
        ctx.verify_mode = ssl.CERT_REQUIRED

    def note(_obj: ssl.SSLObject, name: str | None, _ctx: ssl.SSLContext) -> None:
        stats.server_names.append(name)

    ctx.sni_callback = note  # type: ignore[assignment]
    return ctx


async def _serve(name: str, stats: H2Stats, delay: float, handshake_delay: float,
                 stream: trio.SSLStream[trio.SocketStream]) -> None:
    await trio.sleep(handshake_delay)
    try:
        await stream.do_handshake()
    except trio.BrokenResourceError:
        stats.failed_handshakes += 1
        await trio.aclose_forcefully(stream)
        return
    selected = stream.selected_alpn_protocol()
    stats.alpn.append(selected)
    peer = stream.getpeercert()
    subject = dict(x[0] for x in peer["subject"]) if peer else {}
    stats.client_subjects.append(subject.get("commonName"))
    stats.connections += 1
    if selected != "h2":
        await trio.aclose_forcefully(stream)
        return
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, header_encoding=None))
    conn.initiate_connection()
    send_lock = trio.Lock()
    heads: dict[int, dict[bytes, bytes]] = {}
    bodies: dict[int, int] = {}

    async def flush() -> None:
        async with send_lock:
            data = conn.data_to_send()
            if data:
                await stream.send_all(data)

    async def answer(stream_id: int) -> None:
        if delay:
            await trio.sleep(delay)
        head = heads.pop(stream_id)
        text = b"%s %s %s %s %d\n" % (name.encode(), head[b":method"], head[b":path"], head[b":scheme"],
                                       bodies.pop(stream_id, 0))
        stats.streams += 1
        try:
            conn.send_headers(stream_id, [(b":status", b"200"), (b"content-type", b"text/plain"),
                                          (b"content-length", b"%d" % len(text)), (b"x-backend", name.encode())])
            conn.send_data(stream_id, text, end_stream=True)
        except h2.exceptions.H2Error:
            return  # the client reset the stream meanwhile
        try:
            await flush()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    try:
        async with trio.open_nursery() as nursery:
            try:
                await flush()
                await _read_requests(stream, conn, heads, bodies, stats, nursery, answer, flush)
            except (trio.BrokenResourceError, trio.ClosedResourceError, h2.exceptions.ProtocolError):
                pass  # the client went away (a health check closes right after its handshake)
            nursery.cancel_scope.cancel()
    finally:
        await trio.aclose_forcefully(stream)


async def _read_requests(
    stream: trio.SSLStream[trio.SocketStream], conn: h2.connection.H2Connection, heads: dict[int, dict[bytes, bytes]],
    bodies: dict[int, int], stats: H2Stats, nursery: trio.Nursery, answer: Callable[[int], Awaitable[None]],
    flush: Callable[[], Awaitable[None]],
) -> None:
    while True:
        data = await stream.receive_some(65536)
        if not data:
            return
        for event in conn.receive_data(data):
            if isinstance(event, h2.events.RequestReceived):
                heads[event.stream_id] = dict(event.headers)
                stats.most_concurrent = max(stats.most_concurrent, len(heads))
            elif isinstance(event, h2.events.DataReceived):
                bodies[event.stream_id] = bodies.get(event.stream_id, 0) + len(event.data)
                conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif isinstance(event, h2.events.StreamEnded):
                nursery.start_soon(answer, event.stream_id)
            elif isinstance(event, h2.events.StreamReset):
                heads.pop(event.stream_id, None)
        await flush()


async def start_h2_tls_backend(
    nursery: trio.Nursery, name: str, files: CertFiles, *, alpn: tuple[str, ...] = ("h2",),
    client_ca: Path | None = None, delay: float = 0.0, handshake_delay: float = 0.0,
) -> H2TlsBackend:
    """Serve on a free loopback port until the nursery ends; ``delay``: each answer waits that
    long (so that concurrent requests overlap on the backend); ``handshake_delay``: each
    connection waits that long before its handshake (a slow backend to connect to)."""
    stats = H2Stats()
    ctx = h2_server_context(files, alpn, client_ca, stats)
    listeners = await nursery.start(partial(trio.serve_ssl_over_tcp, partial(_serve, name, stats, delay, handshake_delay), 0, ctx,
                                            host="127.0.0.1"))
    port: int = listeners[0].transport_listener.socket.getsockname()[1]
    return H2TlsBackend(name, port, stats)
