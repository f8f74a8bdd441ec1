"""/metrics for TLS handshakes (failures by reason) and L4 sessions, with real clients."""

from __future__ import annotations

import ssl
from pathlib import Path

import trio

from tests.conftest import (
    free_port,
    listener_toml,
    node_toml,
    pool_toml,
    raw_exchange,
    start_backends,
    start_node,
)
from tests.integration.test_metrics import promtool_check, scrape, wait_until
from tests.promtext import total, value
from tests.tlsclient import client_context, get
from tests.tlsgen import make_ca, make_leaf


async def test_tls_handshakes_and_l4_sessions_are_counted(nursery, tmp_path: Path) -> None:
    ca = make_ca()
    (tmp_path / "ca.pem").write_bytes(ca.cert_pem)
    cert, key = make_leaf(ca, ["www.example.com"]).write(tmp_path, "www")
    (a,) = await start_backends(nursery, "a")
    dead = f"127.0.0.1:{free_port()}"  # nothing listens there
    node, bound = await start_node(nursery, node_toml(
        pool_toml("web", [a.address]),
        pool_toml("gone", [dead], retries=0),
        f'[[certificates]]\nname = "www"\ncert = "{cert}"\nkey = "{key}"\n',
        listener_toml("secure", "https", "web", extra='  [listeners.tls]\n  certificates = ["www"]\n'),
        listener_toml("l4", "tcp", "web"),
        listener_toml("l4gone", "tcp", "gone"),
    ))
    admin = bound.admin[1]
    secure, l4, l4gone = (bound.listeners[n][1] for n in ("secure", "l4", "l4gone"))

    ctx = client_context(tmp_path / "ca.pem")
    for _ in range(2):
        assert (await trio.to_thread.run_sync(get, "www.example.com", secure, ctx, "/"))[0] == 200
    # plain HTTP to the TLS port: the handshake fails (not a TLS ClientHello); what the client
    # reads (an alert, then a reset for the unread bytes) is not what this test is about
    try:
        await raw_exchange(secure, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    except trio.BrokenResourceError:
        pass

    # a client that does not trust the certificate gives up with an alert
    def distrust() -> str:
        try:
            get("www.example.com", secure, ssl.create_default_context(), "/")
        except ssl.SSLError as exc:
            return str(exc)
        return "handshake succeeded"

    assert "CERTIFICATE_VERIFY_FAILED" in await trio.to_thread.run_sync(distrust)

    request = b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    response = await raw_exchange(l4, request)
    assert response.startswith(b"HTTP/1.1 200")
    node.tcp_proxies["l4"].use_splice = False  # the next session takes the copy path (TLS's, non-Linux)
    assert await raw_exchange(l4, request) == response
    stream = await trio.open_tcp_stream("127.0.0.1", l4gone)
    with trio.fail_after(10):  # connect refused at once on loopback; 10 s is for busy cores
        assert await stream.receive_some(100) == b""  # closed: no backend could be reached
    await stream.aclose()

    async def settled() -> bool:
        s = (await scrape(admin))[1]
        return (total(s, "fulcrum_tls_handshake_failures_total", listener="secure") == 2
                and value(s, "fulcrum_tcp_sessions_open", listener="l4") == 0
                and total(s, "fulcrum_listener_connections_open") == 0)

    await wait_until(settled, "the failed handshakes counted and every connection closed")
    r, s = await scrape(admin)
    await promtool_check(r.text)
    assert value(s, "fulcrum_tls_handshakes_total", listener="secure") == 2
    failures = {dict(ls)["reason"]: v for (n, ls), v in s.items() if n == "fulcrum_tls_handshake_failures_total"}
    assert failures == {"not_tls": 1, "client_alert": 1}, failures
    assert value(s, "fulcrum_listener_connections_accepted_total", listener="secure") == 4
    assert value(s, "fulcrum_listener_connections_accepted_total", listener="l4") == 2
    assert value(s, "fulcrum_http_responses_total", listener="secure", source="backend", code="2xx") == 2
    assert value(s, "fulcrum_tcp_sessions_total", listener="l4") == 2
    assert value(s, "fulcrum_tcp_connect_failures_total", listener="l4") == 0
    assert value(s, "fulcrum_tcp_received_bytes_total", listener="l4") == 2 * len(request)
    assert value(s, "fulcrum_tcp_sent_bytes_total", listener="l4") == 2 * len(response)
    assert value(s, "fulcrum_tcp_sessions_total", listener="l4gone") == 0
    assert value(s, "fulcrum_tcp_connect_failures_total", listener="l4gone") == 1
    assert value(s, "fulcrum_backend_failures_total", pool="gone", backend=dead) == 1
    # the L4 sessions count as requests of the backend, beside the two https requests
    assert value(s, "fulcrum_backend_requests_total", pool="web", backend=a.address) == 4
