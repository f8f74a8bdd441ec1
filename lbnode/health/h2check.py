"""``http`` health checks of ``protocol = "h2"`` pools: one HTTP/2 request on a fresh connection.

Owns the HTTP/2 side of such a check: the client preface, one stream with the check's method,
path and Host (as ``:authority``), and the answer turned into ``(passed, reason)`` judged as
the HTTP/1.1 check judges its answer (status ranges, ``expect_body``). Never opens, wraps or
closes the connection (checker.py does, with the pool's TLS and ALPN ``h2``) and never bounds
time itself: the caller's Trio scope (the check's timeout) does.
"""

from __future__ import annotations

import h2.events as ev
import h2.exceptions
import h2.settings
import trio
from h2.config import H2Configuration
from h2.connection import H2Connection

from lbnode.model import Address, HealthCheck

# A health answer's header list fits in this (as MAX_HEAD_BYTES for HTTP/1.1). h2 refuses a
# bigger one (a ProtocolError, named in the reason) once the backend has acknowledged our
# SETTINGS; before that, h2's own 64 KiB bound applies.
MAX_HEADER_LIST_BYTES = 16 * 1024
# expect_body is searched in this much of the body (as the HTTP/1.1 check).
MAX_BODY_BYTES = 64 * 1024
# One receive; a health answer is a few frames.
RECEIVE_BYTES = 16 * 1024
# A reason quotes at most this much of what a backend that does not speak HTTP/2 answered.
MAX_QUOTE = 60


async def h2_http_check(
    stream: trio.abc.Stream, address: Address, check: HealthCheck, *, tls: bool
) -> tuple[bool, str]:
    """Send the check's request as HTTP/2 over ``stream`` (TLS with ALPN ``h2`` already
    selected, or cleartext: prior knowledge) and judge the answer."""
    conn = H2Connection(H2Configuration(client_side=True, header_encoding=None))
    conn.local_settings = h2.settings.Settings(client=True, initial_values={
        h2.settings.SettingCodes.ENABLE_PUSH: 0,
        h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: MAX_HEADER_LIST_BYTES,
    })
    conn.initiate_connection()
    stream_id = conn.get_next_available_stream_id()
    authority = check.host or str(address)
    conn.send_headers(stream_id, [
        (b":method", check.method.encode("latin-1")),
        (b":scheme", b"https" if tls else b"http"),
        (b":authority", authority.encode("latin-1")),
        (b":path", check.path.encode("latin-1")),
        (b"user-agent", b"fulcrum-health"),
        (b"accept", b"*/*"),
    ], end_stream=True)
    await stream.send_all(conn.data_to_send())
    answer = _Answer(keep_body=check.expect_body is not None and check.method != "HEAD")
    first = True
    while not answer.done:
        data = await stream.receive_some(RECEIVE_BYTES)
        if not data:
            if first:
                return False, "connection closed before the response"
            if answer.status is None:
                return False, "connection closed before the response head"
            if answer.keep_body:
                return False, "connection closed in the middle of the response body"
            break
        if first and data.startswith(b"HTTP/"):
            return False, _not_h2(data)
        first = False
        try:
            events = conn.receive_data(data)
        except h2.exceptions.ProtocolError as exc:
            return False, f"HTTP/2 protocol error from the backend: {exc}"
        failure = answer.take(events, stream_id, conn)
        if failure is not None:
            return False, failure
        pending = conn.data_to_send()  # SETTINGS ACK, WINDOW_UPDATEs for the body read
        if pending and not answer.done:
            await stream.send_all(pending)
    assert answer.status is not None
    if not any(lo <= answer.status <= hi for lo, hi in check.expect_status):
        return False, f"status {answer.status}"
    if answer.keep_body:
        assert check.expect_body is not None
        if check.expect_body.encode() not in answer.body:
            return False, f"body does not contain {check.expect_body!r}"
    return True, f"status {answer.status}"


class _Answer:
    """What the backend has answered on the check's stream so far."""

    def __init__(self, keep_body: bool) -> None:
        self.keep_body = keep_body
        self.status: int | None = None
        self.ended = False
        self.body = bytearray()

    @property
    def done(self) -> bool:
        if self.ended:
            return True
        if self.status is None:
            return False
        return not self.keep_body or len(self.body) >= MAX_BODY_BYTES

    def take(self, events: list[ev.Event], stream_id: int, conn: H2Connection) -> str | None:
        """Note the events of the check's stream; a reason if the backend failed it."""
        for event in events:
            if isinstance(event, ev.ResponseReceived) and event.stream_id == stream_id:
                self.status = _status(event.headers)
            elif isinstance(event, ev.DataReceived):
                if event.stream_id == stream_id and self.keep_body:
                    self.body += event.data[: MAX_BODY_BYTES - len(self.body)]
                # The window back, so that a body larger than the initial window can come.
                conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif isinstance(event, ev.StreamEnded) and event.stream_id == stream_id:
                self.ended = True
            elif isinstance(event, ev.StreamReset) and event.stream_id == stream_id:
                return f"the backend reset the stream ({_code(event.error_code)})"
            elif isinstance(event, ev.ConnectionTerminated) and not self.done:
                # A GOAWAY whose last stream id is below the check's: the request was not processed.
                if (event.last_stream_id or 0) < stream_id or event.error_code:
                    return f"the backend closed the connection (GOAWAY {_code(event.error_code)})"
        return None


def _status(headers: list[tuple[bytes, bytes]] | None) -> int:
    # h2 has checked that a response's :status is present and first; its value is three digits.
    return int(dict(headers or ())[b":status"])


def _code(code: object) -> str:
    return getattr(code, "name", None) or str(code)


def _not_h2(data: bytes | bytearray) -> str:
    """The line for a cleartext backend that answered the HTTP/2 preface in HTTP/1.x."""
    line = data.split(b"\r\n", 1)[0][:MAX_QUOTE].decode("latin-1")
    return (f'the backend does not speak h2 (prior knowledge: it answered "{line}"); '
            "the pool's protocol needs it")
