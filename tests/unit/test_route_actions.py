"""A route's actions on heads (lbnode.http.actions), pure: redirect Locations, the node's own
answers, header edits and rewrites on the parsed request as the proxy forwards it."""

from __future__ import annotations

from typing import Any

import pytest

from lbnode.http.actions import edit_request, edit_response, fixed_answer, redirect_location
from lbnode.http.framing import RequestReader, ResponseReader
from lbnode.http.headers import (
    RequestHead,
    ResponseHead,
    check_request,
    client_response_head,
    upstream_request_head,
)
from lbnode.routing import Redirect, Route
from tests.unit.test_routes import routes


def parsed(raw: bytes) -> RequestHead:
    reader = RequestReader(65536)
    reader.feed(raw)
    head = reader.events.popleft()
    assert isinstance(head, RequestHead)
    check_request(head)
    return head


def route(**table: Any) -> Route:
    (r,) = routes(table)
    return r


@pytest.mark.parametrize(("redirect", "request_line", "host", "proto", "location"), [
    (Redirect(scheme="https"), b"/a?b=1", b"shop.example:8080", "http", b"https://shop.example/a?b=1"),
    (Redirect(scheme="https", port=8443), b"/a", b"shop.example", "http", b"https://shop.example:8443/a"),
    (Redirect(path="/x"), b"/a?b=1", b"shop.example:8080", "http", b"http://shop.example:8080/x?b=1"),
    (Redirect(path="/x", keep_query=False), b"/a?b=1", b"shop.example", "https", b"https://shop.example/x"),
    (Redirect(host="new.example"), b"/a", b"shop.example:8080", "http", b"http://new.example/a"),
    (Redirect(port=80), b"/a", b"shop.example:8080", "http", b"http://shop.example/a"),
    (Redirect(scheme="http"), b"/", b"[2001:db8::1]:8443", "https", b"http://[2001:db8::1]/"),
    (Redirect(path="/x"), b"/", b"[2001:db8::1]:8443", "https", b"https://[2001:db8::1]:8443/x"),
])
def test_redirect_location(redirect: Redirect, request_line: bytes, host: bytes, proto: str, location: bytes) -> None:
    head = parsed(b"GET " + request_line + b" HTTP/1.1\r\nHost: " + host + b"\r\n\r\n")
    assert redirect_location(redirect, head, proto) == location


def test_redirect_without_any_host_has_no_location() -> None:
    head = parsed(b"GET / HTTP/1.0\r\n\r\n")
    assert redirect_location(Redirect(path="/x"), head, "http") is None
    assert redirect_location(Redirect(host="a.example"), head, "http") == b"http://a.example/"


def test_fixed_answer_bytes() -> None:
    fixed = route(fixed_response={"status": 503, "body": "down for maintenance\n"}).fixed_response
    assert fixed is not None
    data = fixed_answer(fixed, [(b"X-Request-Id", b"r1")], close=False, head_only=False)
    assert data == (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain; charset=utf-8\r\n"
                    b"Content-Length: 21\r\nX-Request-Id: r1\r\n\r\ndown for maintenance\n")
    assert fixed_answer(fixed, [], close=True, head_only=True).endswith(b"Connection: close\r\n\r\n")


def test_edits_and_rewrites_in_the_head_sent_to_the_backend() -> None:
    r = route(path_prefix="/api/", pool="a", rewrite={"path_prefix": "/v2/", "host": "in.example"},
              request_headers={"set": {"X-Env": "canary"}, "add": {"X-Tag": "r"}, "remove": ["x-secret"]})
    head = parsed(b"GET /api/users?id=1 HTTP/1.1\r\nHost: Shop.example\r\nX-Env: a\r\nx-env: b\r\nX-Tag: c\r\n"
                  b"X-Secret: s\r\nX-Forwarded-For: 192.0.2.1\r\nContent-Length: 0\r\n\r\n")
    edit_request(head, r)
    sent = upstream_request_head(head, "198.51.100.9", "http", "fulcrum").split(b"\r\n")
    assert sent[0] == b"GET /v2/users?id=1 HTTP/1.1"
    assert b"Host: in.example" in sent and b"X-Forwarded-Host: Shop.example" in sent
    assert [f for f in sent if f.lower().startswith(b"x-env")] == [b"X-Env: canary"]
    assert [f for f in sent if f.lower().startswith(b"x-tag")] == [b"X-Tag: c", b"X-Tag: r"]
    assert not any(f.lower().startswith(b"x-secret") for f in sent)
    assert b"X-Forwarded-For: 192.0.2.1, 198.51.100.9" in sent and b"Content-Length: 0" in sent


def test_host_rewrite_of_an_absolute_form_request_keeps_its_authority_as_the_forwarded_host() -> None:
    head = parsed(b"GET http://other.example/x HTTP/1.1\r\nHost: h\r\n\r\n")
    edit_request(head, route(pool="a", rewrite={"host": "in.example:81"}))
    sent = upstream_request_head(head, "198.51.100.9", "http", "fulcrum").split(b"\r\n")
    assert [f for f in sent if f.lower().startswith(b"host:")] == [b"Host: in.example:81"]
    assert b"X-Forwarded-Host: other.example" in sent


def test_response_edits() -> None:
    reader = ResponseReader(b"GET")
    reader.feed(b"HTTP/1.1 200 OK\r\nServer: x\r\nX-Powered-By: y\r\nCache-Control: max-age=60\r\n"
                b"Content-Length: 0\r\n\r\n")
    resp = reader.events.popleft()
    assert isinstance(resp, ResponseHead)
    edits = route(pool="a", response_headers={"set": {"Cache-Control": "no-store"}, "remove": ["server",
                                                                                           "X-Powered-By"]})
    assert edits.response_headers is not None
    edit_response(resp, edits.response_headers)
    sent = client_response_head(resp, "fulcrum", keep_alive=True, chunked=False, client_version="1.1").split(b"\r\n")
    assert b"Cache-Control: no-store" in sent and b"Content-Length: 0" in sent
    assert not any(f.lower().startswith((b"server", b"x-powered-by", b"cache-control: max")) for f in sent)
