"""HTTP/1.1 message heads and the header rules a proxy applies to them.

Owns the pure part of L7: the head objects the framing layer produces, the
checks that stop request smuggling beyond what llhttp already rejects, the
hop-by-hop and forwarded-header rules, and the serialisation of heads and of
responses the node makes itself. Pure: no sockets, no clock.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

Headers = list[tuple[bytes, bytes]]

# RFC 9110 section 7.6.1: connection-specific fields a proxy must not forward,
# plus the ones the Connection header names. Transfer-Encoding is re-framed by us.
HOP_BY_HOP = frozenset(
    {b"connection", b"keep-alive", b"proxy-connection", b"te", b"transfer-encoding", b"upgrade"}
)
# Connection may name any field, but never these: dropping them would change
# the framing or routing of the message we forward (a smuggling lever).
NEVER_DROPPED = frozenset({b"content-length", b"host", b"transfer-encoding"})

# Methods whose requests carry no meaning in a body but may still send one.
IDEMPOTENT_METHODS = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"})

REASONS = {
    100: "Continue",
    101: "Switching Protocols",
    200: "OK",
    204: "No Content",
    301: "Moved Permanently",
    302: "Found",
    303: "See Other",
    304: "Not Modified",
    307: "Temporary Redirect",
    308: "Permanent Redirect",
    400: "Bad Request",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    413: "Content Too Large",
    417: "Expectation Failed",
    429: "Too Many Requests",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    501: "Not Implemented",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
    505: "HTTP Version Not Supported",
}


class BadRequest(Exception):
    """The client broke the protocol; answered with ``status`` and the connection closed."""

    def __init__(self, reason: str, status: int = 400) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status


@dataclass(slots=True)
class RequestHead:
    method: bytes
    target: bytes
    version: str  # "1.0" | "1.1"
    headers: Headers
    keep_alive: bool
    upgrade: bool
    # Derived by ``check_request``:
    host: str | None = None
    path: str = "/"
    query: str = ""
    content_length: int | None = None
    chunked: bool = False
    expect_continue: bool = False
    connection_tokens: frozenset[bytes] = field(default_factory=frozenset)
    # Filled by the parser as the fields arrive (None when the head was built otherwise):
    # ``noted``: (lower-case name, value) of the fields in REQUEST_NOTED, in order;
    # ``forward``: the other fields, plus the forwarded noted ones, already serialised
    # ("name", ": ", "value", CRLF pieces) for the head sent to the backend.
    noted: Headers | None = None
    forward: list[bytes] | None = None
    # The authority of an absolute-form target (``GET http://a.example/x``): it replaces
    # the Host header on the way to the backend (RFC 9112 3.2.2). None for origin-form.
    authority: bytes | None = None
    # A route's ``rewrite.host``: the Host sent to the backend (X-Forwarded-Host keeps the
    # client's). None: the client's Host (or the authority) goes as it came.
    forward_host: bytes | None = None

    def header(self, name: bytes) -> bytes | None:
        """First value of a header, by lower-case name."""
        for n, v in self.headers:
            if n.lower() == name:
                return v
        return None

    @property
    def has_body(self) -> bool:
        return self.chunked or bool(self.content_length)


@dataclass(slots=True)
class ResponseHead:
    status: int
    reason: bytes
    version: str
    headers: Headers
    keep_alive: bool
    content_length: int | None = None
    chunked: bool = False
    connection_tokens: frozenset[bytes] = field(default_factory=frozenset)
    # Filled by the parser (None when the head was built otherwise): the fields that are
    # not in RESPONSE_NOT_FORWARDED, serialised as in ``RequestHead.forward``, and the
    # values of the Via and Upgrade fields it left out.
    forward: list[bytes] | None = None
    vias: list[bytes] = field(default_factory=list)
    upgrade_value: bytes = b""

    def add_headers(self, extra: Headers) -> None:
        """Fields the node adds to what the backend sent (e.g. an affinity cookie)."""
        self.headers.extend(extra)
        if self.forward is not None:
            for n, v in extra:
                self.forward += (n, b": ", v, b"\r\n")


# Request fields the parser notes (lower-case name -> also forwarded as they are?): the
# ones ``check_request`` validates, and the ones ``upstream_request_head`` drops or merges.
REQUEST_NOTED = {
    b"host": True,
    b"content-length": True,
    b"expect": True,
    b"transfer-encoding": False,
    b"connection": False,
    b"keep-alive": False,
    b"proxy-connection": False,
    b"te": False,
    b"upgrade": False,
    b"x-forwarded-for": False,
    b"x-forwarded-proto": False,
    b"x-forwarded-host": False,
    b"x-forwarded-port": False,
    # the verified client certificate (lbnode.tls.terminate): never taken from a client
    b"x-client-cert-subject": False,
    b"x-client-cert-sans": False,
    b"via": False,
}
# Response fields never forwarded as they are: hop-by-hop ones, and Via (we append to it).
RESPONSE_NOT_FORWARDED = HOP_BY_HOP | {b"via"}


def _tokens_of(value: bytes) -> list[bytes]:
    """The options of one Connection field value, lower-case."""
    if b"," not in value:
        token = value.strip().lower()
        return [token] if token else []
    return [t.strip().lower() for t in value.split(b",") if t.strip()]


def check_request(head: RequestHead) -> None:
    """Validate what llhttp leaves to us and fill in the derived fields.

    llhttp already rejects CL+TE, duplicate Content-Length, bad chunk sizes,
    bare CR/LF, NUL, obs-fold and whitespace before the colon. We add: the only
    accepted Transfer-Encoding is a lone ``chunked`` (we re-frame the body, so
    ``gzip, chunked`` could not be forwarded faithfully), exactly one Host on
    HTTP/1.1, a version we speak (llhttp parses ``HTTP/2.0`` and such as well), and a
    target we can route.
    """
    if head.version not in SUPPORTED_VERSIONS:
        # Never forwarded: the backend would answer a version the client did not speak.
        raise BadRequest(f"HTTP/{head.version} is not supported (HTTP/1.0 and HTTP/1.1 are)", status=505)
    hosts: list[bytes] = []
    te_seen = False
    tokens: list[bytes] = []
    fields = head.noted
    if fields is None:
        fields = [(n.lower(), v) for n, v in head.headers]
    for name, v in fields:
        if name == b"host":
            hosts.append(v)
        elif name == b"transfer-encoding":
            if te_seen or v.strip().lower() != b"chunked":
                raise BadRequest(f"unsupported Transfer-Encoding {v.decode('latin-1')!r}")
            te_seen = True
        elif name == b"content-length":
            # llhttp checked the digits; two headers were rejected as duplicates.
            head.content_length = int(v)
        elif name == b"expect":
            if v.strip().lower() == b"100-continue":
                head.expect_continue = True
            else:
                raise BadRequest(f"unsupported Expect {v.decode('latin-1')!r}", status=417)
        elif name == b"connection":
            tokens += _tokens_of(v)
    head.chunked = te_seen
    if head.upgrade and (te_seen or head.content_length):
        # httptools ends an upgrade request at its head: a body would go upstream as a head
        # announcing content that never follows, or as the first bytes of the new protocol.
        raise BadRequest("an upgrade request with a body is not supported")
    if len(hosts) > 1:
        raise BadRequest("more than one Host header")
    if not hosts and head.version == "1.1":
        raise BadRequest("missing Host header")
    target = head.target
    if head.method == b"CONNECT":
        raise BadRequest("CONNECT is not supported", status=405)
    if target[:1] == b"/":
        pass  # origin-form, nearly every request: none of the tests below applies
    elif target[:8].lower().startswith((b"http://", b"https://")):
        # absolute-form: its authority replaces the Host header (RFC 9112 3.2.2), for
        # routing and for the backend, which gets the origin-form of the target.
        rest = target.split(b"://", 1)[1]
        end = len(rest)
        for sep in (b"/", b"?"):
            i = rest.find(sep)
            if 0 <= i < end:
                end = i
        authority, target = rest[:end], rest[end:]
        if not authority or b"@" in authority:
            raise BadRequest(f"request target {head.target[:64].decode('latin-1')!r} has no host, or user info")
        if not target.startswith(b"/"):
            target = b"/" + target  # "http://a.example" or "http://a.example?q": path "/"
        hosts = [authority]
        head.authority = authority
        head.target = target
    elif not (target == b"*" and head.method == b"OPTIONS"):
        raise BadRequest(f"unsupported request target {target[:64].decode('latin-1')!r}")
    if hosts:
        head.host = _host_name(hosts[0])
    raw_path, _, raw_query = target.partition(b"?")
    head.path = raw_path.decode("latin-1")
    head.query = raw_query.decode("latin-1")
    head.connection_tokens = frozenset(tokens) if tokens else _NO_TOKENS


_NO_TOKENS: frozenset[bytes] = frozenset()
# HTTP versions the node speaks; any other (HTTP/2.0 on an HTTP/1 connection, HTTP/1.2) gets 505.
# "2" is an HTTP/2 stream's head (lbnode.http2): llhttp never makes it (it says "2.0").
SUPPORTED_VERSIONS = frozenset({"1.0", "1.1", "2"})

# Host field value -> host name for routing. Clients send the same few values again and
# again; the table is emptied when full, so it stays small whatever they send.
_host_names: dict[bytes, str] = {}
_HOST_NAMES_MAX = 1024


def _host_name(raw: bytes) -> str:
    """The host of a Host field (or absolute-form authority): lower-case, port removed."""
    host = _host_names.get(raw)
    if host is not None:
        return host
    host = raw.strip().decode("latin-1").lower()
    if host.startswith("["):
        end = host.find("]")
        host = host[: end + 1] if end > 0 else host
    elif ":" in host:
        host = host.rsplit(":", 1)[0]
    if len(_host_names) >= _HOST_NAMES_MAX:
        _host_names.clear()
    _host_names[raw] = host
    return host


def _dropped(tokens: frozenset[bytes]) -> frozenset[bytes]:
    return HOP_BY_HOP | (tokens - NEVER_DROPPED)


_FORWARDED_FIELDS = frozenset({
    b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host", b"x-forwarded-port",
    b"x-client-cert-subject", b"x-client-cert-sans", b"via",
})
_via_values: dict[tuple[str, str], bytes] = {}


def _via_value(version: str, via: str) -> bytes:
    """``1.1 fulcrum``: what we add to Via, made once per (version, name)."""
    value = _via_values.get((version, via))
    if value is None:
        value = _via_values[(version, via)] = f"{version} {via}".encode()
    return value


# Whole lines made once: ``Via: 1.1 fulcrum`` by (version, name); ``X-Forwarded-For: ip`` and
# ``X-Forwarded-Proto: proto`` by (client address, proto), emptied when full like _host_names.
_VIA_LINES: dict[tuple[str, str], bytes] = {}
_XFF_LINES: dict[tuple[str, str], bytes] = {}
_XFF_LINES_MAX = 4096


def _via_line(version: str, via: str) -> bytes:
    line = _VIA_LINES[(version, via)] = b"Via: %b\r\n" % _via_value(version, via)
    return line


def _proto_line(proto: str) -> bytes:
    return b"X-Forwarded-Proto: %b\r\n" % proto.encode()


def _xff_line(client_ip: str, proto: str) -> bytes:
    if len(_XFF_LINES) >= _XFF_LINES_MAX:
        _XFF_LINES.clear()
    line = _XFF_LINES[(client_ip, proto)] = b"X-Forwarded-For: %b\r\n%b" % (client_ip.encode(), _proto_line(proto))
    return line


def local_authority(ip: str, port: int, proto: str) -> bytes:
    """The authority a client reached at ``ip``, ``port`` (the accepted socket's own address):
    ``ip:port``, IPv6 in brackets, the port left out when it is the scheme's default."""
    host = f"[{ip}]" if ":" in ip else ip
    default = 443 if proto == "https" else 80
    return (host if port == default else f"{host}:{port}").encode()


def upstream_request_head(
    head: RequestHead, client_ip: str, proto: str, via: str, extra: bytes = b"", drop: frozenset[bytes] = frozenset(),
    default_host: bytes = b"",
) -> bytes:
    """The request head sent to a backend: hop-by-hop removed, forwarded headers added.

    ``extra``: whole header lines the listener adds (X-Forwarded-Port, a client certificate,
    X-Request-Id); ``drop``: more fields (lower-case) not to forward (an invalid X-Request-Id);
    ``default_host``: the Host sent for an HTTP/1.0 request that has none (``local_authority``)."""
    out = [head.method, b" ", head.target, b" HTTP/1.1\r\n"]
    xff: list[bytes] = []
    vias: list[bytes] = []
    original_host = b""
    authority = head.authority
    forward_host = head.forward_host
    host_sent = False
    if (head.forward is not None and head.connection_tokens <= HOP_BY_HOP and authority is None and not drop
            and forward_host is None):
        # The parser already set aside what is dropped here; Connection names nothing else.
        for name, v in head.noted:  # type: ignore[union-attr]
            if name == b"x-forwarded-for":
                xff.append(v)
            elif name == b"via":
                vias.append(v)
            elif name == b"host":
                original_host = v
                host_sent = True
        out += head.forward
    else:
        drop = _dropped(head.connection_tokens) | _FORWARDED_FIELDS | drop
        replace_host = forward_host if forward_host is not None else authority
        for n, v in head.headers:
            name = n.lower()
            if name in drop:
                if name == b"x-forwarded-for":
                    xff.append(v)
                elif name == b"via":
                    vias.append(v)
                continue
            if name == b"host":
                original_host = v
                if replace_host is not None:
                    # the target's authority (RFC 9112 3.2.2), or a route's rewrite, replaces it in its place
                    if not host_sent:
                        out += (b"Host: ", replace_host, b"\r\n")
                    host_sent = True
                    continue
                host_sent = True
            out += (n, b": ", v, b"\r\n")
        if authority is not None:
            original_host = authority
            if not host_sent:  # an HTTP/1.0 request without Host
                host_sent = True
                out += (b"Host: ", forward_host if forward_host is not None else authority, b"\r\n")
    if not host_sent:
        # An HTTP/1.0 request may come without Host; the HTTP/1.1 one we send may not
        # (RFC 9112 3.2). The authority the client reached is the address it connected to
        # (RFC 7230 5.5: the server's name or the connection's local address and port);
        # an empty value (unknown authority) only when that is not known. nginx and other
        # strict backends answer an empty Host with 400.
        out += (b"Host: ", forward_host or default_host, b"\r\n")
    # The usual request brings no X-Forwarded-For or Via of its own: then the two lines are
    # the same for every request of the connection (client, proto) and of the version, made
    # once and kept (small tables, like _host_names) instead of joined per request.
    if xff:
        xff.append(client_ip.encode())
        out += (b"X-Forwarded-For: ", b", ".join(xff), b"\r\n", _proto_line(proto))
    else:
        out.append(_XFF_LINES.get((client_ip, proto)) or _xff_line(client_ip, proto))
    if original_host or head.host:
        out += (b"X-Forwarded-Host: ", original_host or head.host.encode(), b"\r\n")  # type: ignore[union-attr]
    if vias:
        vias.append(_via_values.get((head.version, via)) or _via_value(head.version, via))
        out += (b"Via: ", b", ".join(vias), b"\r\n")
    else:
        out.append(_VIA_LINES.get((head.version, via)) or _via_line(head.version, via))
    if extra:
        out.append(extra)
    if head.chunked:
        out.append(b"Transfer-Encoding: chunked\r\n")
    if head.upgrade:
        upgrade = head.header(b"upgrade") or b""
        out += (b"Connection: Upgrade\r\nUpgrade: ", upgrade, b"\r\n")
    out.append(b"\r\n")
    return b"".join(out)


# X-Request-Id (listeners with request_id = true). A client's value is kept when it is one
# field of 1 to 200 visible ASCII characters other than '"' and '\\' (it goes into log lines
# and other systems' headers as it is); anything else is replaced by one the node makes.
REQUEST_ID = b"X-Request-Id"
REQUEST_ID_MAX = 200
_REQUEST_ID_RE = re.compile(rb'[!#-\[\]-~]{1,%d}' % REQUEST_ID_MAX)
DROP_REQUEST_ID = frozenset({b"x-request-id"})


def client_request_id(head: RequestHead) -> tuple[bytes | None, bool]:
    """The client's X-Request-Id if it is valid (None if not); and whether it sent any field of that name."""
    found: bytes | None = None
    count = 0
    for n, v in head.headers:
        if len(n) == 12 and n.lower() == b"x-request-id":
            count += 1
            found = v.strip()
    if count == 1 and found is not None and _REQUEST_ID_RE.fullmatch(found):
        return found, True
    return None, count > 0


def replace_response_header(head: ResponseHead, name: bytes, value: bytes) -> None:
    """Set a field of a backend's response to ``value``, removing any the backend sent."""
    lname = name.lower()
    if any(n.lower() == lname for n, _ in head.headers):
        head.headers = [(n, v) for n, v in head.headers if n.lower() != lname]
        head.forward = None  # client_response_head serialises ``headers`` instead
    head.add_headers([(name, value)])


# Status lines by (status, reason as the backend sent it), made once; emptied when full, so
# that backends sending ever new reason phrases cannot grow it.
_STATUS_LINES: dict[tuple[int, bytes], bytes] = {}
_STATUS_LINES_MAX = 256


def _status_line(status: int, reason: bytes) -> bytes:
    line = b"HTTP/1.1 %d %b\r\n" % (status, reason or REASONS.get(status, "").encode())
    if len(_STATUS_LINES) >= _STATUS_LINES_MAX:
        _STATUS_LINES.clear()
    _STATUS_LINES[(status, reason)] = line
    return line


def client_response_head(
    head: ResponseHead, via: str, *, keep_alive: bool, chunked: bool, client_version: str
) -> bytes:
    """The response head sent to the client: hop-by-hop removed, Via added, our framing."""
    is_upgrade = head.status == 101
    out = [_STATUS_LINES.get((head.status, head.reason)) or _status_line(head.status, head.reason)]
    if head.forward is not None and head.connection_tokens <= HOP_BY_HOP:
        # The parser already set aside what is dropped here; Connection names nothing else.
        out += head.forward
        vias = head.vias  # appended to below only when not empty: copied there
        upgrade_value = head.upgrade_value
    else:
        drop = _dropped(head.connection_tokens) | {b"via"}
        vias = []
        upgrade_value = b""
        for n, v in head.headers:
            name = n.lower()
            if name in drop:
                if name == b"via":
                    vias.append(v)
                elif name == b"upgrade":
                    upgrade_value = v
                continue
            out += (n, b": ", v, b"\r\n")
    if vias:
        vias = [*vias, _via_values.get((head.version, via)) or _via_value(head.version, via)]
        out += (b"Via: ", b", ".join(vias), b"\r\n")
    else:
        out.append(_VIA_LINES.get((head.version, via)) or _via_line(head.version, via))
    if chunked:
        out.append(b"Transfer-Encoding: chunked\r\n")
    if is_upgrade:
        out += (b"Connection: Upgrade\r\nUpgrade: ", upgrade_value, b"\r\n")
    elif not keep_alive:
        out.append(b"Connection: close\r\n")
    elif client_version == "1.0":
        out.append(b"Connection: keep-alive\r\n")
    out.append(b"\r\n")
    return b"".join(out)


def local_response(
    status: int,
    message: str,
    *,
    close: bool,
    extra: Headers | None = None,
    head_only: bool = False,
) -> bytes:
    """A response the node makes itself: a short text body naming the problem."""
    body = f"{status} {REASONS.get(status, '')}: {message}\n".encode()
    lines = [
        f"HTTP/1.1 {status} {REASONS.get(status, 'Error')}\r\n".encode(),
        b"Content-Type: text/plain; charset=utf-8\r\n",
        f"Content-Length: {len(body)}\r\n".encode(),
        b"Cache-Control: no-store\r\n",
    ]
    for n, v in extra or ():
        lines.append(n + b": " + v + b"\r\n")
    if close:
        lines.append(b"Connection: close\r\n")
    lines.append(b"\r\n")
    if not head_only:
        lines.append(body)
    return b"".join(lines)


def encode_trailers(trailers: Headers) -> bytes:
    """The last chunk of a chunked body with its trailer fields."""
    if not trailers:
        return b"0\r\n\r\n"
    parts = [b"0\r\n"]
    for n, v in trailers:
        parts += (n, b": ", v, b"\r\n")
    parts.append(b"\r\n")
    return b"".join(parts)


def response_has_no_body(request_method: bytes, status: int) -> bool:
    return request_method == b"HEAD" or 100 <= status < 200 or status in (204, 304)
