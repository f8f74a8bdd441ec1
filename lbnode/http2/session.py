"""One HTTP/2 client connection: the Trio loop around the h2 state machine.

Owns reading frames into h2, writing what h2 produced, and a task per stream that runs the
listener's per-request logic (``HttpProxy.serve_one``: routes, policy, affinity, limits,
retries, access log) with a ``StreamConn`` standing in for a client connection. Both
directions are bounded: a stream's request body waits in at most its receive window (h2
refuses more), and a response waits for the stream's send window and for the socket's
buffer to drain below ``WRITE_HIGH_WATER`` before the next piece is read from the backend.
The conversions and limits themselves are in ``protocol`` (pure).
"""

from __future__ import annotations

import logging
import socket as stdsocket
from typing import Any, Protocol

import h2.events as ev
import h2.exceptions
import trio
from h2.errors import ErrorCodes
from hyperframe.frame import GoAwayFrame

from lbnode.accesslog import ListenerAccessLog
from lbnode.http.framing import End, ParseError, RequestReader, ResponseReader
from lbnode.http.headers import (
    BadRequest,
    RequestHead,
    ResponseHead,
    local_response,
    response_has_no_body,
)
from lbnode.http.proxy import ClientConn, ClientGone, Node
from lbnode.http2.protocol import (
    TokenBucket,
    grpc_local_answer,
    is_grpc,
    new_connection,
    request_head,
    response_fields,
    trailer_fields,
)
from lbnode.model import Listener
from lbnode.sockio import SendTimeout, current_deadlines, current_trickle_waits, recv_some, send_all


class Server(Protocol):
    """What a session needs of the listener's proxy (``Http2Proxy``)."""

    listener: Listener
    node: Node
    access_log: ListenerAccessLog | None
    io: list[int]
    local_responses: dict[int, int]
    h2_connections: int
    h2_streams: int
    h2_limits: dict[str, int]

    async def serve_one(self, conn: ClientConn, head: RequestHead) -> bool: ...

    def finish_entry(self, conn: ClientConn) -> None: ...

    async def refuse(self, conn: ClientConn, status: int, reason: str) -> None: ...

log = logging.getLogger("lbnode.http2")

_NO_DROP: frozenset[bytes] = frozenset()  # a stream's request_id_drop until the proxy sets one

RECV_SIZE = 64 * 1024  # as the HTTP/1.1 listener: one large read per loop turn
# Bytes h2 produced that the client has not taken yet, above which no stream adds DATA and
# no more frames are read (a client that stops reading while flooding PINGs gets no more
# PING answers queued): one write of this size is what a socket takes at once anyway.
WRITE_HIGH_WATER = 256 * 1024
# After the last stream of a closing connection: time left for its last frames (GOAWAY) to go.
FLUSH_WAIT = 1.0


class StreamBody(RequestReader):
    """The request body events of one stream, filled by the session (no HTTP/1 parser)."""

    def __init__(self) -> None:  # noqa: D107 (RequestReader's parser is not made)
        from collections import deque

        self.events = deque()
        self.broken = False
        self._parser = None
        self._in_head = False
        self._head_bytes = 0

    def feed(self, data: bytes) -> None:
        raise AssertionError("an HTTP/2 stream's body is not parsed")

    def feed_eof(self) -> None:
        pass

    def close(self) -> None:
        pass


def _plain_end(events: Any) -> bool:
    """Whether the next event is the end of the response without trailers (taken if so)."""
    if events and type(events[0]) is End and not events[0].trailers:
        events.popleft()
        return True
    return False


class StreamConn(ClientConn):
    """One HTTP/2 stream as the HTTP/1.1 proxy sees a client connection.

    The proxy's response bytes (HTTP/1.1, as it writes them to a socket) are parsed back by
    a ``ResponseReader`` into head, data and trailers and sent as HEADERS and DATA frames;
    its local answers to a gRPC call become a gRPC status (``local``, set by
    ``answered_locally``, which the proxy calls for each of its own answers)."""

    __slots__ = ("session", "stream_id", "method", "grpc", "local", "response", "arrived", "acked", "wake",
                 "head_sent", "ended", "close_delimited", "request_ended")

    def __init__(self, session: H2Session, stream_id: int, method: bytes, grpc: bool) -> None:  # noqa: D107
        # Every ClientConn field set here rather than by ClientConn.__init__: that one builds an
        # HTTP/1 request parser and a PickContext a stream never uses, and looks up the run's
        # deadlines, which the session has already (a third of a stream's setup; tests check
        # that no ClientConn field is left unset).
        self.sock = session.sock
        self.io = session.io
        self.ip = session.ip
        self.forwarded = session.forwarded
        self.pick_context = session.pick_context
        self.deadlines = session.deadlines
        self.trickle_waits = session.trickle_waits
        self.wait_readable = trio.lowlevel.wait_readable  # unused: the session reads the socket
        self.reader = StreamBody()
        self.eof = False
        self.served = 0
        self.idle_wait = None
        self.private_upstreams = None
        self.received = 0
        self.sent = 0
        self.port, self.tls_version, self.sni = session.port, session.tls_version, session.sni
        self.entry = None
        self.mark_time = 0.0
        self.mark_in = 0
        self.mark_out = 0
        self.request_id = None
        self.request_id_line = b""
        self.request_id_drop = _NO_DROP
        self.route_pool = ""
        self.route_cookie = None
        self.route = None
        self.session = session
        self.stream_id = stream_id
        self.method = method
        self.grpc = grpc
        self.local: tuple[int, str] | None = None
        self.response: ResponseReader | None = None
        self.arrived = 0  # request body bytes received, and handed back to the client's window
        self.acked = 0
        self.wake: trio.Event | None = None
        self.head_sent = False
        self.ended = False
        self.close_delimited = False
        self.request_ended = False  # the client ended its side (END_STREAM seen)

    def answered_locally(self, status: int, reason: str) -> None:
        self.local = (status, reason)  # a gRPC call gets it as its status

    # ------------------------------------------------------------ request body (client -> backend)
    def arrive(self, data: bytes | End) -> None:
        """The session's reader hands over a piece of body, or its end."""
        self.reader.events.append(data)
        if type(data) is End:
            self.request_ended = True
        elif isinstance(data, bytes):
            self.arrived += len(data)
            self.received += len(data)
        if self.wake is not None:
            self.wake.set()

    def ack_consumed(self) -> None:
        """Give the client back the window of the body bytes the proxy has taken."""
        waiting = sum(len(e) for e in self.reader.events if isinstance(e, bytes))
        consumed = self.arrived - waiting - self.acked
        if consumed > 0:
            self.acked += consumed
            self.session.acknowledge(consumed, self.stream_id)

    async def fill(self) -> None:
        self.ack_consumed()
        if self.reader.events or self.eof:
            return
        self.wake = trio.Event()
        try:
            await self.wake.wait()
        finally:
            self.wake = None

    def try_fill(self) -> bool:
        return False

    async def fill_before(self, deadline: float) -> bool:
        raise AssertionError("an HTTP/2 stream has one request")

    # ------------------------------------------------------------ response (backend -> client)
    async def send(self, data: bytes, timeout: float) -> None:
        """Relay a piece of the proxy's HTTP/1.1 response as HEADERS and DATA frames.

        The end of the response rides on the frame before it (END_STREAM on the last DATA, or
        on HEADERS when there is no body) rather than in an empty DATA frame of its own: one
        frame less per request, which is one h2 call and 9 bytes fewer."""
        self.sent += len(data)
        if self.ended:
            return
        if self.response is None:
            self.response = self.session.response_reader(self.method)
        self.response.feed(data)
        events = self.response.events
        session = self.session
        while events:
            item = events.popleft()
            if isinstance(item, bytes):
                if item:
                    end = _plain_end(events)
                    await session.send_data(self.stream_id, item, end, timeout)
                    if end:
                        self.ended = True
                        return
            elif isinstance(item, ResponseHead):
                if item.status < 200:
                    continue  # interim (never asked for: the proxy sends 100 to HTTP/1.1 only)
                if self.local is not None and self.grpc:
                    self.ended = True
                    session.send_headers(self.stream_id, grpc_local_answer(*self.local), True)
                    return
                no_body = response_has_no_body(self.method, item.status)
                self.close_delimited = not no_body and item.content_length is None and not item.chunked
                self.head_sent = True
                end = _plain_end(events)
                session.send_headers(self.stream_id, response_fields(item), end)
                if end:
                    self.ended = True
                    return
            elif isinstance(item, End):
                self.ended = True
                if item.trailers:
                    session.send_headers(self.stream_id, trailer_fields(item.trailers), True)
                else:
                    await session.send_data(self.stream_id, b"", True, timeout)
                return
            elif isinstance(item, ParseError):
                raise ClientGone(f"response not relayed: {item.reason}")

    def release(self) -> None:
        """The stream's task is over: its response parser goes back to the session if it
        parsed a whole response (the next stream reuses it), else it is closed."""
        reader = self.response
        if reader is not None:
            self.response = None
            self.session.reader_done(reader)

    async def finish(self, completed: bool) -> None:
        """The proxy is done with this stream: end it if its response is whole (a response
        delimited by the backend's close ends here), else reset it."""
        self.ack_consumed()
        session = self.session
        if not self.ended and completed and self.head_sent and self.close_delimited:
            self.ended = True
            try:
                await session.send_data(self.stream_id, b"", True, session.proxy.listener.timeouts.idle)
            except ClientGone:
                pass
        if not self.ended:
            session.reset(self.stream_id, ErrorCodes.INTERNAL_ERROR)
        elif not self.request_ended:
            # Answered before the request body ended (an early 4xx, say): the client may stop
            # sending it (RFC 9113 8.1).
            session.reset(self.stream_id, ErrorCodes.NO_ERROR)


class H2Session:
    """One client connection speaking HTTP/2 (after ALPN h2, or an h2c preface)."""

    def __init__(self, proxy: Server, sock: stdsocket.socket, ip: str, forwarded: bytes,
                 tls: bool) -> None:
        settings = proxy.listener.http2
        assert settings is not None
        self.proxy = proxy
        self.sock = sock
        self.ip = ip
        self.forwarded = forwarded
        self.io = proxy.io
        self.pick_context = ClientConn(sock, ip, 1024).pick_context
        self.deadlines = current_deadlines()  # the run's, shared by the streams (StreamConn)
        self.trickle_waits = current_trickle_waits()
        self.port = 0
        self.tls_version: str | None = None
        self.sni: str | None = None
        if proxy.access_log is not None:
            from lbnode.proxyaccept import client_port

            self.port = client_port(sock)
            if tls:
                self.tls_version = sock.version()  # type: ignore[attr-defined]
                self.sni = getattr(sock, "fulcrum_sni", None)
        self.h2 = new_connection(settings)
        self.max_streams = settings.max_concurrent_streams
        self.streams: dict[int, tuple[StreamConn, trio.CancelScope]] = {}
        self.changed = trio.lowlevel.ParkingLot()  # windows opened, buffer drained, streams reset
        self.out: list[bytes] = []
        self.out_bytes = 0  # produced by h2, not yet written to the socket
        self.out_ready = trio.Event()
        self._scope: trio.CancelScope | None = None
        self._read_scope = trio.CancelScope()  # cancelled when closing and the last stream has ended
        self.limited = False  # a limit bit: the connection is being closed
        self.closing = False  # GOAWAY sent: no new streams, close when the last one ends
        # Response parsers of the streams that ended with a whole response, for the next ones
        # (one parser is built per concurrent stream, not per request; see ResponseReader).
        self.readers: list[ResponseReader] = []
        self.resets = TokenBucket(settings.max_resets_per_second, settings.max_resets_per_second)
        self.control = TokenBucket(settings.max_control_frames_per_second, settings.max_control_frames_per_second)
        self._output()

    def response_reader(self, method: bytes) -> ResponseReader:
        if self.readers:
            reader = self.readers.pop()
            reader.start(method)
            return reader
        return ResponseReader(method)

    def reader_done(self, reader: ResponseReader) -> None:
        if reader.done and not reader.broken and len(self.readers) < self.max_streams:
            self.readers.append(reader)
        else:
            reader.close()

    # ------------------------------------------------------------ output
    def _output(self) -> None:
        data = self.h2.data_to_send()
        if data:
            self.out.append(data)
            self.out_bytes += len(data)
            self.out_ready.set()

    async def _writer(self) -> None:
        timeout = self.proxy.listener.timeouts.idle
        while True:
            if not self.out:
                self.out_ready = trio.Event()
                await self.out_ready.wait()
                continue
            data = self.out[0] if len(self.out) == 1 else b"".join(self.out)
            self.out.clear()
            try:
                await send_all(self.sock, data, timeout)
            except (OSError, SendTimeout) as exc:  # the client is gone or stalled: so is every stream
                log.debug("listener %s: %s: write failed: %s", self.proxy.listener.name, self.ip, exc)
                self._cancel_all()
                return
            self.io[1] += len(data)
            self.out_bytes -= len(data)
            self.changed.unpark_all()

    def send_headers(self, stream_id: int, fields: list[tuple[bytes, bytes]], end: bool) -> None:
        try:
            self.h2.send_headers(stream_id, fields, end_stream=end)
        except h2.exceptions.StreamClosedError:
            raise ClientGone("the client reset the stream") from None
        except h2.exceptions.ProtocolError:  # h2 is CLOSED: the client sent GOAWAY (h2load does at its end)
            raise ClientGone("the client closed the connection (GOAWAY)") from None
        self._output()

    async def send_data(self, stream_id: int, data: bytes, end: bool, timeout: float) -> None:
        """Send ``data`` as the stream's and the connection's windows allow; ClientGone when
        the client has not opened a window (or read from the socket) for ``timeout``."""
        h2conn = self.h2
        pos = 0
        size = len(data)
        deadline = trio.current_time() + timeout
        while True:
            left = size - pos
            try:
                n = min(left, h2conn.local_flow_control_window(stream_id), h2conn.max_outbound_frame_size)
            except (h2.exceptions.StreamClosedError, KeyError):
                raise ClientGone("the client reset the stream") from None
            if (n > 0 or left == 0) and self.out_bytes < WRITE_HIGH_WATER:
                try:
                    h2conn.send_data(stream_id, data[pos:pos + n] if n != size else data,
                                     end_stream=end and n == left)
                except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
                    raise ClientGone("the client reset the stream") from None
                self._output()
                pos += n
                if pos == size:
                    return
                continue
            with trio.move_on_at(deadline) as scope:
                await self.changed.park()
            if scope.cancelled_caught:
                raise ClientGone(f"client did not read for {timeout:g}s")

    def acknowledge(self, size: int, stream_id: int) -> None:
        self.h2.acknowledge_received_data(size, stream_id)
        self._output()

    def reset(self, stream_id: int, code: ErrorCodes) -> None:
        try:
            self.h2.reset_stream(stream_id, code)
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            return
        self._output()

    def goaway(self, code: ErrorCodes = ErrorCodes.NO_ERROR) -> None:
        """No new streams; the connection closes when the open ones are done (drain), or at
        once with an error code (a limit: the caller cancels the streams)."""
        if self.closing:
            return
        self.closing = True
        last = self.h2.highest_inbound_stream_id
        if code != ErrorCodes.NO_ERROR:
            self.h2.close_connection(code, last_stream_id=last)
            self._output()
            return
        # Graceful: the GOAWAY frame is written by hand, as h2's close_connection would put its
        # state machine in CLOSED and refuse the responses of the streams still in flight.
        frame = GoAwayFrame(0)
        frame.last_stream_id = last
        frame.error_code = ErrorCodes.NO_ERROR
        self._output()
        data = frame.serialize()
        self.out.append(data)
        self.out_bytes += len(data)
        self.out_ready.set()

    # ------------------------------------------------------------ the connection
    async def run(self) -> None:
        self.proxy.h2_connections += 1
        try:
            async with trio.open_nursery() as nursery:
                self._scope = nursery.cancel_scope
                nursery.start_soon(self._writer)
                try:
                    with self._read_scope:
                        await self._read(nursery, b"")
                    # Let the streams finish (drain), then the writer flush what they wrote.
                    while self.streams:
                        await self.changed.park()
                    with trio.move_on_after(FLUSH_WAIT):
                        while self.out_bytes:
                            await self.changed.park()
                finally:
                    nursery.cancel_scope.cancel()
        finally:  # every stream's task has ended: no parser comes back any more
            for reader in self.readers:
                reader.close()  # (a parser and its reader refer to each other)
            self.readers.clear()

    def _cancel_all(self) -> None:
        """The connection is unusable: end every stream's task and the session."""
        if self._scope is not None:
            self._scope.cancel()

    def _limit(self, kind: str) -> None:
        """A limit bit: counted, and the connection closed with ENHANCE_YOUR_CALM (at once:
        its open streams end too, and nothing more it sent is read)."""
        if self.limited:
            return
        self.limited = True
        self.proxy.h2_limits[kind] = self.proxy.h2_limits.get(kind, 0) + 1
        log.info("listener %s: %s: HTTP/2 %s limit, closing the connection", self.proxy.listener.name, self.ip, kind)
        self.goaway(ErrorCodes.ENHANCE_YOUR_CALM)

    async def _read(self, nursery: trio.Nursery, data: bytes) -> None:
        idle = self.proxy.listener.timeouts.idle
        clock = trio.current_time
        while True:
            if data:
                try:
                    events = self.h2.receive_data(data)
                except h2.exceptions.ProtocolError as exc:
                    kind = "protocol_error"
                    if isinstance(exc, h2.exceptions.DenialOfServiceError):
                        kind = "header_list_size"
                    elif isinstance(exc, h2.exceptions.TooManyStreamsError):
                        kind = "concurrent_streams"
                    elif "continuation" in str(exc).lower():
                        kind = "continuation"
                    self.proxy.h2_limits[kind] = self.proxy.h2_limits.get(kind, 0) + 1
                    log.debug("listener %s: %s: HTTP/2 %s: %s", self.proxy.listener.name, self.ip, kind, exc)
                    self._output()  # h2 wrote its GOAWAY
                    self.closing = True
                    for _, scope in self.streams.values():
                        scope.cancel()
                    return
                for event in events:
                    self._event(event, nursery, clock())
                    if self.limited:
                        self._output()
                        for _, scope in self.streams.values():
                            scope.cancel()
                        return
                self._output()
                if self.closing and not self.streams:
                    return
            while self.out_bytes >= WRITE_HIGH_WATER:
                await self.changed.park()  # the client is not reading what it asked for
            try:
                if self.streams:
                    await trio.lowlevel.checkpoint()
                    data = await recv_some(self.sock, RECV_SIZE)
                else:
                    with trio.move_on_after(idle):
                        data = await recv_some(self.sock, RECV_SIZE)
                        if not data:
                            return
                        self.io[0] += len(data)
                        continue
                    self.goaway()  # idle: tell the client before closing
                    return
            except OSError as exc:  # a reset, a TLS error: as the end of the connection
                log.debug("listener %s: %s: read failed: %s", self.proxy.listener.name, self.ip, exc)
                data = b""
            if not data:
                for _, scope in self.streams.values():
                    scope.cancel()
                return
            self.io[0] += len(data)

    def _event(self, event: Any, nursery: trio.Nursery, now: float) -> None:
        t = type(event)
        if t is ev.RequestReceived:
            self._start_stream(event, nursery)
        elif t is ev.DataReceived:
            entry = self.streams.get(event.stream_id)
            padding = event.flow_controlled_length - len(event.data)
            if entry is None:
                self.h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            else:
                if padding:
                    self.h2.acknowledge_received_data(padding, event.stream_id)
                if event.data:
                    entry[0].arrive(event.data)
                elif not self.control.take(now):  # empty DATA frames cost us and give nothing
                    self._limit("control_frames")
        elif t is ev.StreamEnded:
            entry = self.streams.get(event.stream_id)
            if entry is not None:
                entry[0].arrive(End([]))
        elif t is ev.TrailersReceived:
            entry = self.streams.get(event.stream_id)
            if entry is not None:
                entry[0].arrive(End([(n, v) for n, v in event.headers]))
        elif t is ev.StreamReset:
            entry = self.streams.get(event.stream_id)
            if entry is not None:
                entry[1].cancel()
            if event.remote_reset and not self.resets.take(now):
                self._limit("rapid_reset")
            self.changed.unpark_all()
        elif t is ev.WindowUpdated or t is ev.RemoteSettingsChanged:
            if t is ev.RemoteSettingsChanged and not self.control.take(now):
                self._limit("control_frames")
            self.changed.unpark_all()
        elif t is ev.PingReceived:
            if not self.control.take(now):
                self._limit("control_frames")
        elif t is ev.ConnectionTerminated:
            self.closing = True

    def _start_stream(self, event: ev.RequestReceived, nursery: trio.Nursery) -> None:
        stream_id = event.stream_id
        fields = event.headers
        if self.closing:
            self.reset(stream_id, ErrorCodes.REFUSED_STREAM)
            return
        if len(self.streams) >= self.max_streams:  # (h2 allows twice as many: protocol.new_connection)
            self.proxy.h2_limits["refused_stream"] = self.proxy.h2_limits.get("refused_stream", 0) + 1
            self.reset(stream_id, ErrorCodes.REFUSED_STREAM)
            return
        grpc = is_grpc(fields)
        try:
            head = request_head(fields, event.stream_ended is not None)
        except BadRequest as exc:
            self.proxy.local_responses[exc.status] = self.proxy.local_responses.get(exc.status, 0) + 1
            method = next((v for n, v in fields if n == b":method"), b"GET")
            conn = StreamConn(self, stream_id, method, grpc)
            conn.local = (exc.status, exc.reason)
            scope = trio.CancelScope()
            self.streams[stream_id] = (conn, scope)
            nursery.start_soon(self._answer, conn, scope, local_response(exc.status, exc.reason, close=False))
            return
        conn = StreamConn(self, stream_id, head.method, grpc)
        # (An END_STREAM on the head comes as a StreamEnded event of the same batch, next.)
        scope = trio.CancelScope()
        self.streams[stream_id] = (conn, scope)
        self.proxy.h2_streams += 1
        nursery.start_soon(self._serve, conn, scope, head)

    async def _serve(self, conn: StreamConn, scope: trio.CancelScope, head: Any) -> None:
        proxy = self.proxy
        try:
            with scope:
                completed = False
                try:
                    await proxy.serve_one(conn, head)
                    completed = True
                except ClientGone as exc:
                    log.debug("listener %s: %s stream %d: %s", proxy.listener.name, self.ip, conn.stream_id, exc)
                    if conn.entry is not None and conn.entry.reason is None:
                        conn.entry.reason = str(exc)
                except BadRequest as exc:  # found on the request body (a timeout, a bad length)
                    await proxy.refuse(conn, exc.status, exc.reason)
                    completed = True
                except Exception:  # a bug: this stream fails, not the connection's other streams
                    log.exception("listener %s: %s stream %d failed", proxy.listener.name, self.ip, conn.stream_id)
                await conn.finish(completed)
        finally:
            if conn.entry is not None:
                if scope.cancelled_caught and conn.entry.reason is None:
                    conn.entry.reason = "the client reset the stream"
                proxy.finish_entry(conn)
            if conn.private_upstreams:
                proxy.node.upstreams.discard(conn.private_upstreams)
            conn.ack_consumed()
            self.streams.pop(conn.stream_id, None)
            self._output()
            self._stream_ended(conn)

    def _stream_ended(self, conn: StreamConn) -> None:
        """A stream's task ended: its parser freed, who waits on it woken, and no more reading
        once the connection is closing (GOAWAY either way) and this was the last one."""
        conn.release()
        self.changed.unpark_all()
        if self.closing and not self.streams:
            self._read_scope.cancel()

    async def _answer(self, conn: StreamConn, scope: trio.CancelScope, data: bytes) -> None:
        try:
            with scope:
                try:
                    await conn.send(data, self.proxy.listener.timeouts.idle)
                except ClientGone:
                    pass
                await conn.finish(True)
        finally:
            self.streams.pop(conn.stream_id, None)
            self._stream_ended(conn)
