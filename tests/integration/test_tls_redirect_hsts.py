"""redirect_https on http listeners (308, method/path/query kept) and HSTS on https listeners."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
import trio

from tests.conftest import (
    listener_toml,
    node_toml,
    pool_toml,
    raw_exchange,
    start_backends,
    start_node,
)
from tests.tlsclient import client_context, get
from tests.tlsgen import make_ca, make_leaf


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    d = tmp_path_factory.mktemp("pki")
    ca = make_ca()
    (d / "ca.pem").write_bytes(ca.cert_pem)
    crt, key = make_leaf(ca, ["www.example.com"]).write(d, "www")
    return d / "ca.pem", crt, key


async def test_redirect_https_keeps_method_path_and_query(nursery) -> None:
    backends = await start_backends(nursery, "a")
    node, bound = await start_node(nursery, node_toml(
        pool_toml("web", [backends[0].address]),
        listener_toml("to443", "http", "web", redirect_https=True),
        listener_toml("to8443", "http", "web", redirect_https=8443),
    ))
    p443, p8443 = bound.listeners["to443"][1], bound.listeners["to8443"][1]

    def calls() -> list[httpx.Response]:
        with httpx.Client(timeout=10, follow_redirects=False) as c:
            return [
                c.post(f"http://127.0.0.1:{p443}/a/b?x=1&y=%20", headers={"Host": "www.example.com:8080"}, content=b"body"),
                c.get(f"http://127.0.0.1:{p8443}/", headers={"Host": "www.example.com"}),
                c.head(f"http://127.0.0.1:{p443}/h", headers={"Host": "[2001:db8::1]:80"}),
            ]

    post, get8443, head = await trio.to_thread.run_sync(calls)
    assert post.status_code == 308
    assert post.headers["location"] == "https://www.example.com/a/b?x=1&y=%20"
    assert get8443.headers["location"] == "https://www.example.com:8443/"
    assert head.status_code == 308 and head.headers["location"] == "https://[2001:db8::1]/h" and head.content == b""
    assert backends[0].stats.requests == 0  # nothing reached a backend
    # Keep-alive goes on after a redirect: two requests on one connection, two answers.
    data = await raw_exchange(p443, b"GET /1 HTTP/1.1\r\nHost: h\r\n\r\nGET /2 HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
    assert data.count(b"HTTP/1.1 308") == 2 and b"Location: https://h/2" in data
    assert node.http_proxies["to443"].redirects == 4


async def test_hsts_on_proxied_and_local_responses(nursery, pki) -> None:
    ca, crt, key = pki
    backends = await start_backends(nursery, "a")
    tls = '  [listeners.tls]\n  certificates = ["www"]\n  hsts = "max-age=31536000; includeSubDomains"\n'
    routes = '  [[listeners.routes]]\n  path_prefix = "/empty/"\n  pool = "empty"\n'
    _, bound = await start_node(nursery, node_toml(
        pool_toml("web", [backends[0].address]),
        pool_toml("empty", []),
        f'[[certificates]]\nname = "www"\ncert = "{crt}"\nkey = "{key}"\n',
        listener_toml("secure", "https", "web", extra=tls + routes),
        listener_toml("plain", "http", "web"),
    ))
    port = bound.listeners["secure"][1]
    ctx = client_context(ca)
    status, headers, _, _ = await trio.to_thread.run_sync(get, "www.example.com", port, ctx, "/")
    assert status == 200 and headers["strict-transport-security"] == "max-age=31536000; includeSubDomains"
    status, headers, _, _ = await trio.to_thread.run_sync(get, "www.example.com", port, ctx, "/empty/x")
    assert status == 503 and headers["strict-transport-security"] == "max-age=31536000; includeSubDomains"
    plain = await trio.to_thread.run_sync(lambda: httpx.get(f"http://127.0.0.1:{bound.listeners['plain'][1]}/", timeout=10))
    assert "strict-transport-security" not in plain.headers  # never over plain http (RFC 6797)
