"""HTTP/2 to a backend (``protocol = "h2"`` pools): one connection carries many requests.

Owns the client side of an h2 connection to one backend and the streams on it. There is no
background task per connection: a request waiting for its response reads the socket for
every stream of the connection (one reader at a time, the others wait for what it hands
them), so the connection lives exactly as long as requests use it. Request bodies go out as
the backend's windows allow; response data is handed back to the backend's window only as
the client takes it, so a slow client slows only its own stream. The connection is plain
TCP or, for a pool with ``[pools.tls]``, a ``TlsSocket`` whose handshake offered ALPN ``h2``
and got it (``lbnode.tls.upstream``): everything here reads and writes it the same way.
"""

from __future__ import annotations

import socket as stdsocket
from collections import deque

import h2.events as ev
import h2.exceptions
import trio
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes

from lbnode.http.headers import HOP_BY_HOP, RequestHead
from lbnode.sockio import SendTimeout, recv_some, send_all
from lbnode.tls.upstream import TlsSocket

RECV_SIZE = 64 * 1024
# Streams a connection carries at most before another is opened (the backend may say fewer).
STREAMS_PER_CONNECTION = 100
# The receive window per stream, and for the whole connection: how much response data may wait
# in the node for clients that read slowly.
STREAM_WINDOW = 256 * 1024
CONNECTION_WINDOW = 4 * 1024 * 1024
# What a pool with [pools.tls] offers in ALPN, and requires the backend to select (RFC 9113 3.2).
ALPN = ("h2",)


class BackendGone(Exception):
    """The connection to the backend failed or the backend reset the stream."""

    def __init__(self, reason: str, before_response: bool) -> None:
        super().__init__(reason)
        self.reason = reason
        self.before_response = before_response


class Stream:
    """One request on a backend connection: what the reader handed it."""

    __slots__ = ("id", "events", "reset", "ended")

    def __init__(self, stream_id: int) -> None:
        self.id = stream_id
        self.events: deque[ev.Event] = deque()
        self.reset: str | None = None
        self.ended = False


class H2Backend:
    """One HTTP/2 connection to a backend."""

    def __init__(self, sock: stdsocket.socket | TlsSocket, key: str) -> None:
        self.sock = sock
        self.key = key
        self.h2 = H2Connection(H2Configuration(client_side=True, header_encoding=None))
        self.h2.local_settings = h2.settings.Settings(client=True, initial_values={
            h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: STREAM_WINDOW,
            h2.settings.SettingCodes.ENABLE_PUSH: 0,
        })
        self.h2.initiate_connection()
        self.h2.increment_flow_control_window(CONNECTION_WINDOW - 65535)
        self.streams: dict[int, Stream] = {}
        self.reading = False
        self.changed = trio.lowlevel.ParkingLot()
        self.write_lock = trio.Lock()
        self.broken: str | None = None

    @property
    def usable(self) -> bool:
        if self.broken is not None or self.h2.state_machine.state.name == "CLOSED":
            return False
        limit = min(STREAMS_PER_CONNECTION, self.h2.remote_settings.max_concurrent_streams)
        return len(self.streams) < limit and self.h2.highest_outbound_stream_id < 2**31 - 1000

    def close(self) -> None:
        if self.sock.fileno() != -1:
            trio.lowlevel.notify_closing(self.sock)
            self.sock.close()

    def _fail(self, reason: str) -> None:
        self.broken = reason
        for stream in self.streams.values():
            if stream.reset is None:
                stream.reset = reason
        self.changed.unpark_all()

    async def flush(self, timeout: float) -> None:
        """Write what h2 has produced for the backend.

        Not a checkpoint when nobody else is writing and the socket takes it all (nearly
        always): a request's task goes on to queue its next frames, and the client's session
        writes them together. A yield here (the lock's) let the session's writer run between
        a response's DATA and its trailers: two writes to the client per gRPC call, each one
        more wake-up of the client (issue 14)."""
        lock = self.write_lock
        try:
            lock.acquire_nowait()
        except trio.WouldBlock:
            await lock.acquire()
        try:
            data = self.h2.data_to_send()
            if data:
                try:
                    await send_all(self.sock, data, timeout)
                except (OSError, SendTimeout) as exc:
                    self._fail(f"write to the backend failed: {exc}")
        finally:
            lock.release()

    def open(self, fields: list[tuple[bytes, bytes]], end: bool) -> Stream:
        """A new stream, its HEADERS queued, not written: the caller flushes, after queueing
        the body when it has it whole (one write for the whole request)."""
        stream_id = self.h2.get_next_available_stream_id()
        self.h2.send_headers(stream_id, fields, end_stream=end)
        stream = self.streams[stream_id] = Stream(stream_id)
        return stream

    def forget(self, stream: Stream) -> None:
        """The request is done with the stream (reset it if the backend has not ended it)."""
        self.streams.pop(stream.id, None)
        if not stream.ended and stream.reset is None and self.broken is None:
            try:
                self.h2.reset_stream(stream.id, ErrorCodes.CANCEL)
            except h2.exceptions.H2Error:
                pass

    async def next_event(self, stream: Stream, timeout: float) -> ev.Event:
        """The stream's next event, reading the connection for everyone meanwhile."""
        deadline = trio.current_time() + timeout
        while not stream.events:
            if stream.reset is not None:
                raise BackendGone(stream.reset, before_response=True)
            with trio.move_on_at(deadline) as scope:
                if self.reading:
                    await self.changed.park()
                else:
                    await self._read_once(timeout)
            if scope.cancelled_caught:
                raise TimeoutError
        return stream.events.popleft()

    async def _read_once(self, timeout: float) -> None:
        self.reading = True
        try:
            try:
                data = await recv_some(self.sock, RECV_SIZE)
            except OSError as exc:
                self._fail(f"read from the backend failed: {exc}")
                return
            self._take(data)
        finally:
            self.reading = False
            self.changed.unpark_all()
        await self.flush(timeout)

    def still_open(self) -> bool:
        """Before a new stream: take what the backend sent meanwhile without waiting (its
        close, a GOAWAY after a restart or an idle limit), so that a request is not sent on a
        connection already gone (a backend restart would fail each client's next call)."""
        if self.broken is not None:
            return False
        if self.reading:
            return True  # a request is reading it right now: alive as far as anyone knows
        try:
            data = self.sock.recv(RECV_SIZE)  # non-blocking (sockio.connect): never waits
        except BlockingIOError:
            return True
        except OSError as exc:
            self._fail(f"read from the backend failed: {exc}")
            return False
        self._take(data)
        return self.broken is None

    def _take(self, data: bytes) -> None:
        """Feed what the backend sent to h2 and hand the events to their streams."""
        if not data:
            self._fail("the backend closed the connection")
            return
        try:
            events = self.h2.receive_data(data)
        except h2.exceptions.ProtocolError as exc:
            self._fail(f"HTTP/2 protocol error from the backend: {exc}")
            return
        for event in events:
            stream = self.streams.get(getattr(event, "stream_id", 0) or 0)
            if isinstance(event, ev.StreamReset):
                if stream is not None:
                    stream.reset = f"the backend reset the stream ({event.error_code!r})"
            elif isinstance(event, ev.ConnectionTerminated):
                # GOAWAY: streams above its last id were not processed, the others go on.
                self.broken = "the backend closed the connection (GOAWAY)"
                for sid, s in self.streams.items():
                    if sid > (event.last_stream_id or 0) and s.reset is None:
                        s.reset = self.broken
            elif stream is not None and isinstance(
                    event, (ev.ResponseReceived, ev.DataReceived, ev.TrailersReceived, ev.StreamEnded,
                            ev.InformationalResponseReceived)):
                stream.events.append(event)
                if isinstance(event, ev.StreamEnded):
                    stream.ended = True
            elif isinstance(event, ev.DataReceived):  # a stream we gave up: its window back
                self.h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)

    async def send_body(self, stream: Stream, data: bytes, end: bool, timeout: float) -> None:
        """Send request body bytes as the backend's windows allow."""
        pos = 0
        deadline = trio.current_time() + timeout
        while True:
            if stream.reset is not None:
                raise BackendGone(stream.reset, before_response=not stream.events)
            left = len(data) - pos
            try:
                n = min(left, self.h2.local_flow_control_window(stream.id), self.h2.max_outbound_frame_size)
            except (h2.exceptions.StreamClosedError, KeyError):
                return  # the backend already ended the stream (an early answer): the rest is not needed
            if n > 0 or left == 0:
                self.h2.send_data(stream.id, data[pos:pos + n], end_stream=end and n == left)
                await self.flush(timeout)
                pos += n
                if pos == len(data):
                    return
                continue
            await self.flush(timeout)  # the HEADERS (see open) before waiting on the backend
            with trio.move_on_at(deadline) as scope:
                if self.reading:
                    await self.changed.park()
                else:
                    await self._read_once(timeout)  # WINDOW_UPDATEs come with the reading
            if scope.cancelled_caught:
                raise BackendGone(f"the backend did not read the request for {timeout:g}s", not stream.events)

    def consumed(self, stream: Stream, size: int) -> None:
        if size:
            try:
                self.h2.acknowledge_received_data(size, stream.id)
            except h2.exceptions.H2Error:
                pass


def request_fields(head: RequestHead, scheme: bytes) -> list[tuple[bytes, bytes]]:
    """An HTTP/1.1 head (as the proxy made it for a backend) as HTTP/2 request fields.

    Host becomes :authority; connection-specific fields are dropped; ``te: trailers`` is
    always sent, as gRPC servers require it (it only says the client accepts trailers)."""
    authority = b""
    out: list[tuple[bytes, bytes]] = []
    for name, value in head.headers:
        lname = name.lower()
        if lname == b"host":
            authority = value
        elif lname not in HOP_BY_HOP:
            out.append((lname, value))
    return [(b":method", head.method), (b":scheme", scheme), (b":authority", authority),
            (b":path", head.target), *out, (b"te", b"trailers")]
