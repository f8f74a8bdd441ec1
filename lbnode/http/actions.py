"""What a route does to a request besides choosing its pool: the node's own answers
(``redirect``, ``fixed_response``), the request's header edits and rewrites on the way to
the backend, and the response's header edits on the way back.

Pure: heads in, heads or bytes out; no sockets, no clock. The proxy decides when each
applies (``lbnode.http.proxy``); what a route may say is validated in ``lbnode.model``.
"""

from __future__ import annotations

from http import HTTPStatus

from lbnode.http.headers import Headers, RequestHead, ResponseHead
from lbnode.routing import FixedResponse, HeaderEdits, Redirect, Route

_DEFAULT_PORTS = {"http": 80, "https": 443}


def reason_phrase(status: int) -> bytes:
    try:
        return HTTPStatus(status).phrase.encode()
    except ValueError:
        return b""


def redirect_location(redirect: Redirect, head: RequestHead, proto: str) -> bytes | None:
    """The Location of a ``redirect``: the request's URL with the configured parts replaced,
    or None when the request names no host and the redirect gives none (a 400 then).

    The port: ``redirect.port`` if given; else the request's own, unless the scheme or the
    host changes (a port of the old scheme or host would be wrong for the new one)."""
    scheme = redirect.scheme or proto
    raw = head.authority if head.authority is not None else head.header(b"host")
    req_host, req_port = _split_authority(raw.decode("latin-1").strip().lower() if raw else "")
    host = redirect.host or req_host
    if not host:
        return None
    port = redirect.port
    if port is None and redirect.host is None and scheme == proto:
        port = req_port
    authority = host if port is None or port == _DEFAULT_PORTS[scheme] else f"{host}:{port}"
    path = redirect.path if redirect.path is not None else head.path
    query = f"?{head.query}" if redirect.keep_query and head.query else ""
    return f"{scheme}://{authority}{path}{query}".encode("latin-1")


def _split_authority(authority: str) -> tuple[str, int | None]:
    """("host", port or None) of a Host value; an IPv6 literal keeps its brackets."""
    if authority.startswith("["):
        end = authority.find("]")
        host, rest = authority[: end + 1], authority[end + 1:]
        port = rest[1:] if rest.startswith(":") else ""
    else:
        host, _, port = authority.partition(":")
    return host, int(port) if port.isdigit() and 0 < int(port) < 65536 else None


def answer(status: int, body: bytes, content_type: bytes | None, extra: Headers, *, close: bool,
           head_only: bool) -> bytes:
    """A whole response the node sends itself for a route: a redirect (``body`` empty) or a
    ``fixed_response``."""
    lines = [b"HTTP/1.1 %d %b\r\n" % (status, reason_phrase(status))]
    if content_type is not None:
        lines.append(b"Content-Type: " + content_type + b"\r\n")
    lines.append(b"Content-Length: %d\r\n" % len(body))
    for n, v in extra:
        lines.append(n + b": " + v + b"\r\n")
    if close:
        lines.append(b"Connection: close\r\n")
    lines.append(b"\r\n")
    if body and not head_only:
        lines.append(body)
    return b"".join(lines)


def fixed_answer(fixed: FixedResponse, extra: Headers, *, close: bool, head_only: bool) -> bytes:
    content_type = fixed.content_type.encode("latin-1") if fixed.body or fixed.status not in (204, 304) else None
    return answer(fixed.status, fixed.body, content_type, extra, close=close, head_only=head_only)


def edit_request(head: RequestHead, route: Route) -> None:
    """Apply the route's ``request_headers`` and ``rewrite`` to the head about to be sent.

    Called after routing (conditions saw the client's request) and before the head is
    serialised; the access log keeps the client's target (it holds the bytes it was given)."""
    edits = route.request_headers
    if edits is not None:
        head.headers = _edited(head.headers, edits)
        head.forward = None  # upstream_request_head serialises ``headers`` instead
    prefix = route.rewrite_path_prefix
    if prefix is not None and route.path_prefix is not None and head.path.startswith(route.path_prefix):
        path = prefix + head.path[len(route.path_prefix):]
        if not path.startswith("/"):
            path = "/" + path
        head.target = (path + ("?" + head.query if head.query else "")).encode("latin-1")
    if route.rewrite_host is not None:
        head.forward_host = route.rewrite_host.encode("latin-1")


def edit_response(resp: ResponseHead, edits: HeaderEdits) -> None:
    """Apply the route's ``response_headers`` to a backend's response head."""
    resp.headers = _edited(resp.headers, edits)
    resp.forward = None  # client_response_head serialises ``headers`` instead


def _edited(headers: Headers, edits: HeaderEdits) -> Headers:
    dropped = edits.dropped
    out = [(n, v) for n, v in headers if n.lower().decode("latin-1") not in dropped] if dropped else list(headers)
    out += [(n.encode("latin-1"), v.encode("latin-1")) for n, v in edits.set]
    out += [(n.encode("latin-1"), v.encode("latin-1")) for n, v in edits.add]
    return out
