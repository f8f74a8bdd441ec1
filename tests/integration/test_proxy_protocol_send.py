"""Pools with ``send_proxy``: Fulcrum writes the PROXY header to HAProxy listening with
``accept-proxy``, whose HTTP frontend puts the addresses it learnt into request headers for a
real backend (``X-Src: %[src]``...). L7 and L4, v1 and v2, IPv4 and IPv6 clients, health checks."""

from __future__ import annotations

import socket
from pathlib import Path

import httpx
import pytest
import trio

from tests.conftest import listener_toml, node_toml, pool_toml, start_backends, start_node
from tests.haproxy import free_port, running_haproxy
from tests.integration.test_metrics import scrape, wait_until
from tests.integration.test_proxy_protocol import ACCEPT, echoed, in_front
from tests.promtext import value
from tests.tlsclient import client_context, get
from tests.tlsgen import make_ca, make_leaf


def behind(port: int, port6: int, app: str) -> str:
    """HAProxy taking PROXY headers (only) and telling the app what they said."""
    return (
        "frontend behind\n    mode http\n"
        f"    bind 127.0.0.1:{port} accept-proxy\n    bind [::1]:{port6} accept-proxy\n"
        "    http-request set-header X-Src %[src]\n    http-request set-header X-Src-Port %[src_port]\n"
        "    http-request set-header X-Dst %[dst]\n    http-request set-header X-Dst-Port %[dst_port]\n"
        "    default_backend app\n"
        f"backend app\n    mode http\n    server app {app}\n"
    )


async def raw_get(source: str, host: str, port: int) -> tuple[dict[str, str], int]:
    """One request from ``source`` (Connection: close): what /echo saw, and our own port."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = trio.socket.socket(family)
    with sock:
        await sock.bind((source, 0))
        await sock.connect((host, port))
        await sock.send(b"GET /echo HTTP/1.1\r\nHost: a.example\r\nConnection: close\r\n\r\n")
        answer = b""
        with trio.fail_after(10):  # a loopback exchange through two proxies: milliseconds
            while chunk := await sock.recv(65536):
                answer += chunk
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200"), answer
        return echoed(body.decode()), sock.getsockname()[1]


@pytest.mark.parametrize("version", ["v1", "v2"])
async def test_l7_backends_learn_the_client_and_the_address_it_reached(nursery, tmp_path: Path, version: str):
    (app,) = await start_backends(nursery, "app")
    hp, hp6 = free_port(), free_port("::1")
    node, bound = await start_node(nursery, node_toml(
        listener_toml("front", "http", "web"), listener_toml("front6", "http", "web", bind="[::1]:0"),
        pool_toml("web", [f"127.0.0.1:{hp}"], send_proxy=version)))
    port, port6 = bound.listeners["front"][1], bound.listeners["front6"][1]
    async with running_haproxy(tmp_path, behind(hp, hp6, app.address), [("127.0.0.1", hp), ("::1", hp6)]):
        seen, client_port = await raw_get("127.0.0.5", "127.0.0.1", port)
        assert (seen["x-src"], seen["x-src-port"]) == ("127.0.0.5", str(client_port))
        assert (seen["x-dst"], seen["x-dst-port"]) == ("127.0.0.1", str(port))
        seen, client_port = await raw_get("::1", "::1", port6)
        assert (seen["x-src"], seen["x-src-port"]) == ("::1", str(client_port))
        assert (seen["x-dst"], seen["x-dst-port"]) == ("::1", str(port6))


async def test_l7_upstream_connections_are_reused_by_their_own_client_only(nursery, tmp_path: Path):
    (app,) = await start_backends(nursery, "app")
    hp, hp6 = free_port(), free_port("::1")
    node, bound = await start_node(nursery, node_toml(
        listener_toml("front", "http", "web"), pool_toml("web", [f"127.0.0.1:{hp}"], send_proxy="v2")))
    port = bound.listeners["front"][1]

    def two_clients_in_turn() -> list[tuple[str, str]]:
        """Two keep-alive clients at once, their requests interleaved: each time one asks, the
        other's backend connection is idle and would be taken if idle connections were shared."""
        with (httpx.Client(timeout=30, transport=httpx.HTTPTransport(local_address="127.0.0.5")) as a,
              httpx.Client(timeout=30, transport=httpx.HTTPTransport(local_address="127.0.0.6")) as b):
            url = f"http://127.0.0.1:{port}/echo"
            return [(echoed(a.get(url).text)["x-src"], echoed(b.get(url).text)["x-src"]) for _ in range(3)]

    async with running_haproxy(tmp_path, behind(hp, hp6, app.address), [("127.0.0.1", hp)]):
        opened = node.upstreams.opened
        assert await trio.to_thread.run_sync(two_clients_in_turn) == [("127.0.0.5", "127.0.0.6")] * 3
        # One backend connection per client, each reused for that client's 3 requests.
        assert node.upstreams.opened == opened + 2

        async def none_idle() -> bool:
            return node.upstreams.idle_count() == 0

        # A client connection's private upstreams close with it: none is left idling.
        await wait_until(none_idle, "the private upstream connections closed with their clients")


async def test_l4_backends_learn_the_client_even_through_haproxy_in_front(nursery, tmp_path: Path):
    (app,) = await start_backends(nursery, "app")
    hp, hp6, front = free_port(), free_port("::1"), free_port()
    node, bound = await start_node(nursery, node_toml(
        listener_toml("l4", "tcp", "web"),
        listener_toml("l4_behind_lb", "tcp", "web", extra=ACCEPT),
        pool_toml("web", [f"127.0.0.1:{hp}"], send_proxy="v1")))
    l4, chained = bound.listeners["l4"][1], bound.listeners["l4_behind_lb"][1]
    config = behind(hp, hp6, app.address) + in_front("lb", chained, "send-proxy-v2", front)
    async with running_haproxy(tmp_path, config, [("127.0.0.1", hp), ("127.0.0.1", front)]):
        # Before any client byte, the backend learns who connected to which listener.
        seen, client_port = await raw_get("127.0.0.5", "127.0.0.1", l4)
        assert (seen["x-src"], seen["x-src-port"], seen["x-dst-port"]) == ("127.0.0.5", str(client_port), str(l4))
        # Client -> HAProxy (v2) -> Fulcrum L4 -> (v1) -> HAProxy: the client HAProxy saw first.
        seen, client_port = await raw_get("127.0.0.6", "127.0.0.1", front)
        assert (seen["x-src"], seen["x-src-port"], seen["x-dst-port"]) == ("127.0.0.6", str(client_port), str(front))


@pytest.mark.parametrize("version", ["v1", "v2"])
async def test_health_checks_send_a_header_the_backend_accepts(nursery, tmp_path: Path, version: str):
    (app,) = await start_backends(nursery, "app")
    hp, hp6 = free_port(), free_port("::1")
    backend = f"127.0.0.1:{hp}"
    health = '[pools.health]\ntype = "http"\npath = "/healthz"\ninterval = "100ms"\nfall = 1\nrise = 1\n'
    node, bound = await start_node(nursery, node_toml(
        listener_toml("front", "http", "web"), pool_toml("web", [backend], send_proxy=version, _extra=health)))
    admin = bound.admin[1]
    async with running_haproxy(tmp_path, behind(hp, hp6, app.address), [("127.0.0.1", hp)]):

        async def checked() -> bool:
            s = (await scrape(admin))[1]
            return value(s, "fulcrum_health_checks_total", pool="web", backend=backend, result="passed") >= 3

        # HAProxy's accept-proxy closes a connection without a header: a check without one fails.
        await wait_until(checked, "three passing checks (100 ms apart)")
        _, s = await scrape(admin)
        assert value(s, "fulcrum_backend_health", pool="web", backend=backend, state="up") == 1
    # Checks that started while HAProxy was up all passed (those after it stopped may fail).
    assert app.stats.paths.get("/healthz", 0) >= 3


async def test_with_pools_tls_the_header_goes_before_the_handshake(nursery, tmp_path: Path):
    ca = make_ca()
    (tmp_path / "ca.pem").write_bytes(ca.cert_pem)
    leaf = make_leaf(ca, ["backend.example.com"])
    (tmp_path / "haproxy.pem").write_bytes(leaf.cert_pem + leaf.key_pem)  # HAProxy's crt: both in one
    (app,) = await start_backends(nursery, "app")
    hp = free_port()
    tls = f'[pools.tls]\nca = "{tmp_path / "ca.pem"}"\nserver_name = "backend.example.com"\n'
    node, bound = await start_node(nursery, node_toml(
        listener_toml("front", "http", "web"), listener_toml("l4", "tcp", "web"),
        pool_toml("web", [f"127.0.0.1:{hp}"], send_proxy="v2", _extra=tls)))
    config = (f"frontend behind\n    mode http\n    bind 127.0.0.1:{hp} accept-proxy ssl crt {tmp_path / 'haproxy.pem'}\n"
              "    http-request set-header X-Src %[src]\n    http-request set-header X-Tls %[ssl_fc]\n"
              f"    default_backend app\nbackend app\n    mode http\n    server app {app.address}\n")
    async with running_haproxy(tmp_path, config, [("127.0.0.1", hp)]):
        for listener in ("front", "l4"):  # L7 re-encryption, and L4 with TLS to the backend
            seen, _ = await raw_get("127.0.0.5", "127.0.0.1", bound.listeners[listener][1])
            assert (seen["x-src"], seen["x-tls"]) == ("127.0.0.5", "1"), listener


async def test_a_tls_listener_between_two_haproxies_passes_the_client_on(nursery, tmp_path: Path):
    """Client -> HAProxy (send-proxy-v2) -> Fulcrum ``protocol = "tls"`` (header, then the
    handshake) -> pool with send_proxy = "v1" -> HAProxy accept-proxy: the first client arrives."""
    ca = make_ca()
    (tmp_path / "ca.pem").write_bytes(ca.cert_pem)
    cert, key = make_leaf(ca, ["www.example.com"]).write(tmp_path, "www")
    (app,) = await start_backends(nursery, "app")
    hp, hp6, front = free_port(), free_port("::1"), free_port()
    node, bound = await start_node(nursery, node_toml(
        f'[[certificates]]\nname = "www"\ncert = "{cert}"\nkey = "{key}"\n',
        listener_toml("edge", "tls", "web", extra='[listeners.tls]\ncertificates = ["www"]\n' + ACCEPT),
        pool_toml("web", [f"127.0.0.1:{hp}"], send_proxy="v1")))
    config = behind(hp, hp6, app.address) + in_front("lb", bound.listeners["edge"][1], "send-proxy-v2", front)
    async with running_haproxy(tmp_path, config, [("127.0.0.1", hp), ("127.0.0.1", front)]):
        status, _, body, _ = await trio.to_thread.run_sync(
            get, "www.example.com", front, client_context(tmp_path / "ca.pem"), "/echo")
    assert status == 200
    # The client was 127.0.0.1 and HAProxy in front reached Fulcrum from 127.0.0.9: only the
    # chain of headers can have told the HAProxy behind about the first.
    assert echoed(body.decode())["x-src"] == "127.0.0.1"
    assert node.proxy_receivers["edge"].headers == {1: 0, 2: 1}
