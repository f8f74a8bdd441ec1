"""HTTP/2 towards clients, the pure half: the h2 connection's settings, and the conversions
between an HTTP/2 stream and the HTTP/1.1 heads the proxy works with (RFC 9113 section 8).

Owns what the RFCs require of a gateway between the two versions (pseudo-header fields to a
request line and Host, Cookie fields joined, connection-specific fields dropped, a body of
unknown length sent chunked), the gRPC status of the node's own answers, and the token
buckets that bound what a client may make the node do per second. Pure: no sockets, no clock.
"""

from __future__ import annotations

from collections import deque
from urllib.parse import quote

from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.settings import SettingCodes, Settings

from lbnode.http.headers import HOP_BY_HOP, BadRequest, Headers, RequestHead, ResponseHead
from lbnode.model import Http2Settings

# What a client sends first on an HTTP/2 connection (RFC 9113 3.4): how an h2c listener
# tells prior-knowledge HTTP/2 from HTTP/1.1 (no HTTP/1.1 request starts with "PRI *").
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
# The version string of an HTTP/2 request head: what the access log prints (HTTP/2) and
# Via says ("2 fulcrum", RFC 9110 7.6.3). The HTTP/1 parser never makes it (it says "2.0").
VERSION = "2"
# The connection's receive window: the streams' windows together may use this much before
# the client must wait for us to read (the RFC's 65,535 would let one stream fill it).
CONNECTION_WINDOW_STREAMS = 4

# Response fields an HTTP/2 response may not carry (RFC 9113 8.2.2), plus Via's
# companions that only meant something to the HTTP/1.1 hop.
_NOT_IN_H2 = HOP_BY_HOP


# New client streams between two of h2's walks over all its streams (see OpenStreamsBound).
WALK_EVERY = 64


class OpenStreamsBound(H2Connection):
    """h2's connection, without its walk over every stream at each new client stream.

    h2 counts the client's open streams, to check them against MAX_CONCURRENT_STREAMS, by
    walking all the streams it holds each time a HEADERS frame opens one (``_open_streams``,
    which also forgets the closed ones): with 100 streams in flight, 100 steps per request,
    4% of a stream's CPU under h2load. Here the last count plus the streams opened since is
    an upper bound of the open ones (streams only close in between); the exact walk runs
    when that bound would reach the limit, so the check decides exactly as h2's, and every
    ``WALK_EVERY`` streams, so that closed streams are still forgotten."""

    _open_bound = 0
    _since_walk = 0

    @property
    def open_inbound_streams(self) -> int:
        # Read by h2 just before it opens a client stream (or refuses it as one too many).
        if self._since_walk >= WALK_EVERY or self._open_bound >= self.local_settings.max_concurrent_streams:
            self._open_bound = self._open_streams(1)  # client-initiated streams: odd ids
            self._since_walk = 0
        value = self._open_bound
        self._open_bound += 1
        self._since_walk += 1
        return value


def new_connection(settings: Http2Settings) -> H2Connection:
    """A server-side h2 connection announcing ``settings`` (sent by ``initiate_connection``).

    The values are set as current at once, not when the client acknowledges them: a client
    may not exceed them before it has seen them only if they are no lower than the RFC's
    defaults, which is why the model keeps initial_window >= 65,535."""
    # Inbound fields are validated (h2's checks are what refuses malformed and smuggling
    # requests) but not normalised: h2's only inbound normalisation joins Cookie fields, which
    # request_head does anyway (one generator over every field of every request less). Our
    # own outbound fields are built valid: neither checked nor normalised again.
    config = H2Configuration(client_side=False, header_encoding=None, validate_inbound_headers=True,
                             normalize_inbound_headers=False, validate_outbound_headers=False,
                             normalize_outbound_headers=False)
    conn = OpenStreamsBound(config)
    conn.local_settings = Settings(client=False, initial_values={
        SettingCodes.MAX_CONCURRENT_STREAMS: settings.max_concurrent_streams,
        SettingCodes.INITIAL_WINDOW_SIZE: settings.initial_window,
        SettingCodes.MAX_FRAME_SIZE: settings.max_frame_size,
        SettingCodes.MAX_HEADER_LIST_SIZE: settings.max_header_list_size,
        SettingCodes.ENABLE_PUSH: 0,
    })
    conn.max_inbound_frame_size = settings.max_frame_size
    conn.decoder.max_header_list_size = settings.max_header_list_size
    conn.initiate_connection()
    # A stream beyond the announced limit: h2 would end the whole connection (PROTOCOL_ERROR),
    # where RFC 9113 5.1.2 lets the server refuse that stream alone. So h2 is told a limit
    # twice the announced one, and the session refuses (REFUSED_STREAM) what lies between;
    # beyond twice, the client ignores SETTINGS outright and loses its connection.
    conn.local_settings._settings[SettingCodes.MAX_CONCURRENT_STREAMS] = deque([2 * settings.max_concurrent_streams])
    extra = settings.initial_window * CONNECTION_WINDOW_STREAMS - 65535
    if extra > 0:
        conn.increment_flow_control_window(min(extra, 2**31 - 1 - 65535))
    return conn


def request_head(fields: list[tuple[bytes, bytes]], end_stream: bool) -> RequestHead:
    """The HTTP/1.1-shaped head of an HTTP/2 request (h2 already checked the pseudo-header
    fields' presence, order and form, and refused connection-specific fields).

    :authority becomes Host (a Host the client sent too must name the same authority);
    Cookie fields are joined with "; " (RFC 9113 8.2.3); a request whose body length is
    unknown (no content-length, not ended with its head) goes to the backend chunked."""
    method = target = authority = b""
    host = None
    cookies: list[bytes] = []
    headers: Headers = []
    has_length = False
    for name, value in fields:
        if name[:1] == b":":
            if name == b":method":
                method = value
            elif name == b":path":
                target = value
            elif name == b":authority":
                authority = value
            elif name == b":protocol":
                raise BadRequest("extended CONNECT (:protocol) is not supported", 501)
            continue
        if name == b"cookie":
            cookies.append(value)
            continue
        if name == b"host":
            host = value
        elif name == b"content-length":
            has_length = True
        headers.append((name, value))
    if method == b"CONNECT":
        raise BadRequest("CONNECT is not supported", status=405)
    if authority:
        if host is not None and host.lower() != authority.lower():
            raise BadRequest("Host and :authority name different hosts")
        if host is None:
            headers.insert(0, (b"host", authority))
    elif host is None:
        raise BadRequest("missing :authority and Host")
    if cookies:
        headers.append((b"cookie", b"; ".join(cookies)))
    if not end_stream and not has_length:
        headers.append((b"transfer-encoding", b"chunked"))  # re-framed for the backend by check_request
    return RequestHead(method, target, VERSION, headers, True, False)


def response_fields(head: ResponseHead) -> list[tuple[bytes, bytes]]:
    """The HEADERS of a response the proxy serialised for HTTP/1.1: :status first, names
    in lower case, connection-specific fields (and any the Connection field named) left out."""
    drop = _NOT_IN_H2 | head.connection_tokens if head.connection_tokens else _NOT_IN_H2
    out = [(b":status", b"%d" % head.status)]
    for name, value in head.headers:
        lname = name.lower()
        if lname not in drop:
            out.append((lname, value))
    return out


def trailer_fields(trailers: Headers) -> list[tuple[bytes, bytes]]:
    return [(n.lower(), v) for n, v in trailers if n.lower() not in _NOT_IN_H2]


def is_grpc(fields: list[tuple[bytes, bytes]]) -> bool:
    """A gRPC call (content-type application/grpc, +proto, +json...)."""
    for name, value in fields:
        if name == b"content-type":
            return value.startswith(b"application/grpc")
    return False


# gRPC status codes (grpc/doc/statuscodes.md) of the node's own HTTP answers. The node knows
# why it answered, so it says more than the generic HTTP-to-gRPC table clients apply.
GRPC_UNKNOWN = 2
GRPC_DEADLINE_EXCEEDED = 4
GRPC_RESOURCE_EXHAUSTED = 8
GRPC_INTERNAL = 13
GRPC_UNAVAILABLE = 14
_GRPC_STATUS = {
    400: GRPC_INTERNAL,  # a malformed request: what grpc-go answers a bad frame with
    408: GRPC_DEADLINE_EXCEEDED,
    413: GRPC_RESOURCE_EXHAUSTED,
    429: GRPC_RESOURCE_EXHAUSTED,  # a rate limit: the client may try later
    431: GRPC_RESOURCE_EXHAUSTED,
    501: 12,  # UNIMPLEMENTED
    502: GRPC_UNAVAILABLE,
    503: GRPC_UNAVAILABLE,  # no backend up, all busy, pool gone: retryable by the client
    504: GRPC_DEADLINE_EXCEEDED,
}


def grpc_status(http_status: int) -> int:
    return _GRPC_STATUS.get(http_status, GRPC_UNKNOWN)


def grpc_local_answer(http_status: int, reason: str) -> list[tuple[bytes, bytes]]:
    """A trailers-only gRPC response (one HEADERS frame ending the stream): HTTP 200, the
    status and the reason percent-encoded as grpc-message must be (PROTOCOL-HTTP2.md)."""
    return [
        (b":status", b"200"),
        (b"content-type", b"application/grpc"),
        (b"grpc-status", b"%d" % grpc_status(http_status)),
        (b"grpc-message", quote(reason, safe=" !\"#$&'()*+,-./:;<=>?@[\\]^_`{|}~").encode("ascii")),
    ]


class TokenBucket:
    """``burst`` events at once, refilled at ``rate`` a second: what a client may ask of one
    connection (stream resets, PINGs, SETTINGS) before the node closes it."""

    __slots__ = ("rate", "burst", "tokens", "last")

    def __init__(self, rate: float, burst: float) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = burst
        self.last = 0.0

    def take(self, now: float) -> bool:
        """One event at ``now``: False when the bucket is empty (the limit bites)."""
        tokens = min(self.burst, self.tokens + (now - self.last) * self.rate)
        self.last = now
        if tokens < 1.0:
            self.tokens = tokens
            return False
        self.tokens = tokens - 1.0
        return True
