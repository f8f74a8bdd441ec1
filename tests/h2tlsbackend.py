"""A real HTTP/2 backend for tests, over TLS or cleartext: Trio + ssl + the sans-I/O ``h2`` package.

Answers every request with its name, method, path, ``:scheme`` and the request body's
length (``name GET /x https 0``), with the backend's ``status`` (200 unless a test changes
it), on as many concurrent streams as the client opens. It records what a test asserts on:
SNI and ALPN of each handshake, the client certificate's subject, connections, streams, each
request's fields, and the most streams one connection carried at once. ``alpn`` is what the
server accepts: ``("http/1.1",)`` or ``()`` make a backend that does not speak HTTP/2 over TLS
(it completes the handshake, then closes). ``start_h2c_backend`` serves HTTP/2 with prior
knowledge on cleartext and nothing else (as a grpcio server): an HTTP/1.1 request is no preface.
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
    requests: list[dict[bytes, bytes]] = field(default_factory=list)  # each request's fields, as received


@dataclass
class H2TlsBackend:
    name: str
    port: int
    stats: H2Stats
    answer: Answer
    scope: trio.CancelScope  # cancelled by stop()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def status(self) -> int:
        return self.answer.status

    @status.setter
    def status(self, value: int) -> None:
        self.answer.status = value

    def stop(self) -> None:
        """Close the listening socket and every connection (a backend that stopped)."""
        self.scope.cancel()


@dataclass
class Answer:
    """What every request gets; a test changes it while the backend runs."""

    status: int = 200


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


async def _serve(name: str, stats: H2Stats, answer_with: Answer, delay: float, handshake_delay: float,
                 stream: trio.SSLStream[trio.SocketStream] | trio.SocketStream) -> None:
    if isinstance(stream, trio.SSLStream):
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
    else:
        stats.connections += 1
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
            head_only = head[b":method"] == b"HEAD"  # the fields a GET would have, no body (RFC 9110 9.3.2)
            conn.send_headers(stream_id, [(b":status", b"%d" % answer_with.status), (b"content-type", b"text/plain"),
                                          (b"content-length", b"%d" % len(text)), (b"x-backend", name.encode())],
                              end_stream=head_only)
            if not head_only:
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
                pass  # the client went away (a health check closes right after its handshake), or spoke no HTTP/2
            nursery.cancel_scope.cancel()
    finally:
        await trio.aclose_forcefully(stream)


async def _read_requests(
    stream: trio.abc.Stream, conn: h2.connection.H2Connection, heads: dict[int, dict[bytes, bytes]],
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
                stats.requests.append(dict(event.headers))
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
    stats, answer = H2Stats(), Answer()
    ctx = h2_server_context(files, alpn, client_ca, stats)
    serve = partial(_serve, name, stats, answer, delay, handshake_delay)
    scope = trio.CancelScope()
    listeners = await nursery.start(_in_scope, scope, partial(trio.serve_ssl_over_tcp, serve, 0, ctx, host="127.0.0.1"))
    port: int = listeners[0].transport_listener.socket.getsockname()[1]
    return H2TlsBackend(name, port, stats, answer, scope)


async def start_h2c_backend(nursery: trio.Nursery, name: str, *, delay: float = 0.0) -> H2TlsBackend:
    """The same backend on cleartext with prior knowledge (``:scheme`` is what the client sends);
    ``delay`` as above."""
    stats, answer = H2Stats(), Answer()
    scope = trio.CancelScope()
    serve = partial(_serve, name, stats, answer, delay, 0.0)
    listeners = await nursery.start(_in_scope, scope, partial(trio.serve_tcp, serve, 0, host="127.0.0.1"))
    bound: int = listeners[0].socket.getsockname()[1]
    return H2TlsBackend(name, bound, stats, answer, scope)


async def _in_scope(scope: trio.CancelScope, serve: Callable[..., Awaitable[object]],
                    task_status: trio.TaskStatus[object]) -> None:
    """Run a ``trio.serve_*`` under ``scope``: cancelling it closes the listeners and connections."""
    with scope:
        await serve(task_status=task_status)
