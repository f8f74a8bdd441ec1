"""The admin endpoint's answers to bad input, over raw sockets: a real node, bytes on the wire."""

from __future__ import annotations

from tests.conftest import (
    listener_toml,
    node_toml,
    pool_toml,
    raw_exchange,
    start_backends,
    start_node,
)


def status_line(response: bytes) -> bytes:
    return response.split(b"\r\n", 1)[0]


def header(response: bytes, name: bytes) -> bytes | None:
    head = response.split(b"\r\n\r\n", 1)[0]
    for line in head.split(b"\r\n")[1:]:
        n, _, v = line.partition(b":")
        if n.strip().lower() == name.lower():
            return v.strip()
    return None


async def start_admin(nursery) -> int:  # type: ignore[no-untyped-def]
    (a,) = await start_backends(nursery, "a")
    _, bound = await start_node(nursery, node_toml(listener_toml("front", "http", "web"), pool_toml("web", [a.address])))
    return bound.admin[1]


async def test_a_request_with_a_body_is_refused_with_413(nursery):
    admin = await start_admin(nursery)
    sized = await raw_exchange(admin, b"GET /status HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello")
    assert status_line(sized) == b"HTTP/1.1 413 Content Too Large"
    assert b"no request body" in sized
    chunked = await raw_exchange(
        admin, b"GET /metrics HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
    )
    assert status_line(chunked) == b"HTTP/1.1 413 Content Too Large"
    # an empty body is no body: curl -d '' or a client that always sends the header
    for zero in (b"0", b"00"):
        empty = await raw_exchange(admin, b"GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: " + zero + b"\r\n\r\n")
        assert status_line(empty) == b"HTTP/1.1 200 OK" and empty.endswith(b"ok\n")


async def test_wrong_method_gets_405_with_allow_and_unknown_path_404(nursery):
    admin = await start_admin(nursery)
    post = await raw_exchange(admin, b"POST /status HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}")
    assert status_line(post) == b"HTTP/1.1 405 Method Not Allowed"
    assert header(post, b"allow") == b"GET, HEAD"
    delete = await raw_exchange(admin, b"DELETE /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status_line(delete) == b"HTTP/1.1 405 Method Not Allowed"
    for path in (b"/nope", b"/status/", b"/healthz/x", b"/../etc/passwd", b"/static/../server.py"):
        missing = await raw_exchange(admin, b"GET " + path + b" HTTP/1.1\r\nHost: x\r\n\r\n")
        assert status_line(missing) == b"HTTP/1.1 404 Not Found", path
    garbage = await raw_exchange(admin, b"NOT HTTP AT ALL\r\n\r\n")
    assert status_line(garbage) == b"HTTP/1.1 400 Bad Request"
    head = await raw_exchange(admin, b"HEAD /status HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status_line(head) == b"HTTP/1.1 200 OK" and head.endswith(b"\r\n\r\n")
    assert int(header(head, b"content-length") or 0) > 0
