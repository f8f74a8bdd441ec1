"""One request to a ``protocol = "h2"`` pool's backend, for a client of either version.

``H2Transport`` is the ``PoolTransport`` (``lbnode.http.proxy``) of such pools: the proxy chose
the backend, counts, retries and answers errors exactly as for HTTP/1.1 backends
(``HttpProxy._forward``); this replaces only the exchange: the head it made for an
HTTP/1.1 backend is parsed back and sent as HTTP/2 fields, the body streams both ways at
once (gRPC's bidirectional calls), and the response goes to the client as the HTTP/1.1 the
proxy writes (chunked, trailers included: an HTTP/2 client gets them as trailers again).
"""

from __future__ import annotations

from collections.abc import Callable

import h2.events as ev
import trio

from lbnode.http.framing import End, RequestReader
from lbnode.http.headers import (
    REQUEST_ID,
    BadRequest,
    RequestHead,
    ResponseHead,
    client_response_head,
    encode_trailers,
    replace_response_header,
    response_has_no_body,
)
from lbnode.http.proxy import (
    VIA_NAME,
    Attempt,
    ClientConn,
    ClientGone,
    HttpProxy,
    OnHead,
    RetryStatus,
    UpstreamError,
    chunk,
)
from lbnode.http2.upstream import ALPN, BackendGone, H2Backend, Stream, request_fields
from lbnode.runtime import BackendState, PoolRuntime
from lbnode.sockio import ConnectFailed

# gRPC's status fields: in the trailers of a response that has a body, or with the head of a
# trailers-only one; an HTTP/1.1 hop carries them as chunked trailers in both cases.
_TRAILER_ONLY = frozenset({b"grpc-status", b"grpc-message", b"grpc-status-details-bin"})


class _Opening:
    """A connection to one backend being opened: requests that need one meanwhile wait for it
    instead of each opening (and, over TLS, handshaking) their own."""

    __slots__ = ("done", "failed")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.failed: ConnectFailed | None = None


class H2Transport:
    """The HTTP/2 connections of one listener's proxy to the backends of its h2 pools (by each
    backend's upstream key), and the exchange over them."""

    def __init__(self) -> None:
        self.backends: dict[str, list[H2Backend]] = {}
        self._opening: dict[str, _Opening] = {}

    async def exchange(
        self, proxy: HttpProxy, conn: ClientConn, head: RequestHead, pool: PoolRuntime, backend: BackendState,
        request_bytes: bytes, body: list[bytes | End] | None, now: float, status_retry: frozenset[int],
        may_retry: Callable[[], bool], on_head: OnHead | None, attempt: Attempt,
    ) -> bool:
        """Returns whether the client connection may carry another request (HTTP/1.1)."""
        sent = [False]  # the response head went to the client
        deadline = grpc_deadline(head, now)
        if deadline is None:
            return await _exchange(self, proxy, conn, head, pool, backend, request_bytes, body, status_retry,
                                   may_retry, on_head, sent, attempt)
        # The call's own deadline: past it the client has given up, so the backend's stream is reset
        # and the client told DEADLINE_EXCEEDED (if it has not had the response head yet).
        with trio.move_on_at(deadline):
            return await _exchange(self, proxy, conn, head, pool, backend, request_bytes, body, status_retry,
                                   may_retry, on_head, sent, attempt)
        raise UpstreamError(f"grpc-timeout of {deadline - now:g}s passed", 504, responded=sent[0])

    async def connection(self, proxy: HttpProxy, backend: BackendState, pool: PoolRuntime) -> H2Backend:
        """A connection to ``backend`` with room for one more stream (opened if none has): TLS
        with ALPN ``h2`` required when the pool has ``[pools.tls]``, else cleartext."""
        key = backend.upstream_key
        conns = self.backends.setdefault(key, [])
        while True:
            for up in conns:
                if up.usable and up.still_open():
                    return up  # (any PING/SETTINGS acks still_open produced go with the request's HEADERS)
            opening = self._opening.get(key)
            if opening is None:
                break
            # Another request is opening one (a burst of calls to a cold backend): share it. Its
            # failure is ours too, rather than a queue of connects each waiting its timeout.
            await opening.done.wait()
            if opening.failed is not None:
                raise ConnectFailed(opening.failed.reason, opening.failed.timed_out)
        for up in conns:
            if up.broken is not None and not up.streams:
                up.close()
        conns[:] = [c for c in conns if c.broken is None or c.streams]
        spec = pool.spec
        opening = self._opening[key] = _Opening()
        try:
            up_conn = await proxy.node.upstreams.connect(backend.spec.address, spec.timeouts.connect, spec.tls,
                                                         key, alpn=ALPN if spec.tls is not None else ())
        except ConnectFailed as exc:
            opening.failed = exc
            raise
        finally:
            del self._opening[key]
            opening.done.set()  # cancelled (the client went away): the next in line opens one
        up = H2Backend(up_conn.sock, key)
        conns.append(up)
        return up


async def _exchange(
    transport: H2Transport, proxy: HttpProxy, conn: ClientConn, head: RequestHead, pool: PoolRuntime,
    backend: BackendState, request_bytes: bytes, body: list[bytes | End] | None, status_retry: frozenset[int],
    may_retry: Callable[[], bool], on_head: OnHead | None, sent: list[bool], attempt: Attempt,
) -> bool:
    spec = pool.spec
    timeout = spec.timeouts.response
    up = await transport.connection(proxy, backend, pool)
    reader = RequestReader(len(request_bytes) + 1)
    reader.feed(request_bytes)
    fwd = reader.events.popleft()
    reader.close()
    assert isinstance(fwd, RequestHead)
    empty = body is not None and not any(isinstance(e, bytes) and e for e in body)
    stream = up.open(request_fields(fwd, b"https" if spec.tls is not None else b"http"), end=empty)
    try:
        if body is not None:
            if not empty:
                # HEADERS and the whole body in one write (send_body flushes): a gRPC unary call
                # is one write to the backend, not one per frame (issue 14).
                data = b"".join(e for e in body if isinstance(e, bytes))
                await _send(up, stream, data, True, timeout)
            else:
                await up.flush(timeout)
            return await _response(proxy, conn, head, up, stream, timeout, status_retry, may_retry, on_head, _done,
                                   sent, attempt)
        await up.flush(timeout)  # the body streams: the HEADERS go now
        done = [False]
        error: list[Exception] = []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_stream_body, proxy, conn, up, stream, done, error, nursery.cancel_scope)
            try:
                keep = await _response(proxy, conn, head, up, stream, timeout, _NONE, may_retry, on_head,
                                       lambda: done[0], sent, attempt)
            finally:
                if not done[0]:
                    nursery.cancel_scope.cancel()
        if error:
            raise error[0]
        return keep and done[0]
    finally:
        up.forget(stream)
        with trio.CancelScope(shield=True), trio.move_on_after(1.0):
            await up.flush(timeout)  # the RST_STREAM of a call given up (client gone, cancelled)
        if up.broken is not None and not up.streams:
            up.close()


_NONE: frozenset[int] = frozenset()
# grpc-timeout units (PROTOCOL-HTTP2.md): hours, minutes, seconds, milli-, micro-, nanoseconds.
_GRPC_UNITS = {b"H": 3600.0, b"M": 60.0, b"S": 1.0, b"m": 1e-3, b"u": 1e-6, b"n": 1e-9}


def grpc_deadline(head: RequestHead, now: float) -> float | None:
    """When a gRPC call's ``grpc-timeout`` runs out (None: no valid one)."""
    value = head.header(b"grpc-timeout")
    if value is None or not 2 <= len(value) <= 9 or not value[:-1].isdigit():
        return None
    unit = _GRPC_UNITS.get(value[-1:])
    return None if unit is None else now + int(value[:-1]) * unit


def _done() -> bool:
    return True


async def _send(up: H2Backend, stream: Stream, data: bytes, end: bool, timeout: float) -> None:
    try:
        await up.send_body(stream, data, end, timeout)
    except BackendGone as exc:
        raise UpstreamError(exc.reason, 502, responded=not exc.before_response) from None


async def _stream_body(proxy: HttpProxy, conn: ClientConn, up: H2Backend, stream: Stream, done: list[bool],
                       error: list[Exception], scope: trio.CancelScope) -> None:
    timeout = proxy.listener.timeouts.body
    try:
        while True:
            item = await conn.body_event(timeout)
            if isinstance(item, bytes):
                await _send(up, stream, item, False, timeout)
                continue
            if item.trailers:
                up.h2.send_headers(stream.id, [(n.lower(), v) for n, v in item.trailers], end_stream=True)
                await up.flush(timeout)
            else:
                await _send(up, stream, b"", True, timeout)
            done[0] = True
            return
    except (BadRequest, ClientGone) as exc:
        error.append(exc)
        scope.cancel()
    except UpstreamError:
        return  # the backend stopped taking the body (an early answer): its response decides


async def _next(up: H2Backend, stream: Stream, timeout: float, responded: bool) -> ev.Event:
    try:
        return await up.next_event(stream, timeout)
    except TimeoutError:
        raise UpstreamError(f"no response within {timeout:g}s", 504, responded=responded) from None
    except BackendGone as exc:
        raise UpstreamError(exc.reason, 502, responded=responded) from None


async def _response(
    proxy: HttpProxy, conn: ClientConn, head: RequestHead, up: H2Backend, stream: Stream, timeout: float,
    status_retry: frozenset[int], may_retry: Callable[[], bool], on_head: OnHead | None,
    request_done: Callable[[], bool], sent: list[bool], attempt: Attempt,
) -> bool:
    while True:
        event = await _next(up, stream, timeout, False)
        if isinstance(event, ev.ResponseReceived):
            break
    fields = event.headers
    status = 0
    headers: list[tuple[bytes, bytes]] = []
    trailers: list[tuple[bytes, bytes]] = []
    length: int | None = None
    trailers_only = event.stream_ended is not None
    for name, value in fields:
        if name == b":status":
            status = int(value)
        elif name[:1] != b":":
            if trailers_only and name in _TRAILER_ONLY:
                trailers.append((name, value))
                continue
            if name == b"content-length":
                length = int(value)
            headers.append((name, value))
    entry = conn.entry
    if entry is not None:
        entry.status = status
        entry.backend_time = proxy.clock() - entry.backend_start
    if status in status_retry and may_retry():
        raise RetryStatus(status)
    attempt.status = status  # counted as the backend's answer (a retried one is counted by the retry)
    no_body = response_has_no_body(head.method, status)
    chunked = not no_body and (length is None or bool(trailers))
    if chunked and length is not None:
        headers = [(n, v) for n, v in headers if n != b"content-length"]
    resp = ResponseHead(status, b"", "1.1", headers, True, content_length=None if chunked else length, chunked=chunked)
    if on_head is not None:
        resp.add_headers(on_head(resp))
    if conn.route_cookie is not None:
        resp.add_headers([conn.route_cookie])
    if proxy.hsts:
        resp.add_headers(proxy.hsts)
    if conn.request_id is not None:
        replace_response_header(resp, REQUEST_ID, conn.request_id)
    write_timeout = proxy.listener.timeouts.idle
    keep = head.keep_alive and not proxy.node.draining
    sent[0] = True
    await conn.send(client_response_head(resp, VIA_NAME, keep_alive=keep, chunked=chunked,
                                         client_version=head.version), write_timeout)
    ended = trailers_only
    while not ended:
        event = await _next(up, stream, timeout, True)
        if isinstance(event, ev.DataReceived):
            if event.data and not no_body:
                await conn.send(chunk(event.data) if chunked else event.data, write_timeout)
            up.consumed(stream, event.flow_controlled_length)
            await up.flush(timeout)
        elif isinstance(event, ev.TrailersReceived):
            trailers += [(n, v) for n, v in event.headers]
        elif isinstance(event, ev.StreamEnded):
            ended = True
    if chunked:
        await conn.send(encode_trailers(trailers), write_timeout)
    return keep and request_done()
