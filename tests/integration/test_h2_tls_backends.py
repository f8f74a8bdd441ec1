"""HTTP/2 over TLS to the backends (issue 14): ``protocol = "h2"`` with ``[pools.tls]``.

Real backends: an h2-over-TLS server on the ``h2`` package (tests/h2tlsbackend.py) and a
grpcio server with ``ssl_server_credentials``; real clients: httpx (HTTP/1.1), curl (HTTP/2
with prior knowledge), grpcio over an https listener.
"""

from __future__ import annotations

import logging
import subprocess
from pathlib import Path

import grpc
import httpx
import pytest
import trio

from lbnode.node import LbNode
from tests.conftest import http_get, listener_toml, node_toml, pool_toml, start_node
from tests.grpcbackend import GrpcBackend
from tests.h2tlsbackend import start_h2_tls_backend
from tests.tlsutil import get_refused_by_backend_tls, make_ca

H2C = "  [listeners.http2]\n  enabled = true\n"


def tls_table(**settings: object) -> str:
    lines = ["  [pools.tls]", "  enabled = true"]
    lines += [f'  {key} = "{value}"' for key, value in settings.items()]
    return "\n".join(lines) + "\n"


async def h2_node(nursery: trio.Nursery, addresses: list[str], tls: str, extra: str = "") -> tuple[LbNode, int]:
    toml = node_toml(listener_toml("web", "http", "p", extra=H2C),
                     pool_toml("p", addresses, protocol="h2", retries=0, _extra=tls + extra))
    node, bound = await start_node(nursery, toml)
    return node, bound.listeners["web"][1]


async def test_http11_and_http2_clients_share_one_verified_h2_tls_connection(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    ca = make_ca(tmp_path, "backends")
    # Each answer waits 0.5 s, so that requests sent together are open on the backend together.
    backend = await start_h2_tls_backend(nursery, "a", ca.issue(tmp_path, "a", ["api.internal"]), delay=0.5)
    node, port = await h2_node(nursery, [backend.address], tls_table(ca=ca.path, server_name="api.internal"))
    url = f"http://127.0.0.1:{port}"
    first = await http_get(url + "/first")
    assert first.status_code == 200 and first.text == "a GET /first https 0\n", first.text
    assert first.headers["x-backend"] == "a"

    answers: dict[int, httpx.Response] = {}

    async def one(i: int) -> None:
        answers[i] = await http_get(f"{url}/r{i}")  # a client connection of its own each

    async with trio.open_nursery() as clients:
        for i in range(6):
            clients.start_soon(one, i)
    assert {i: (r.status_code, r.text) for i, r in answers.items()} == {
        i: (200, f"a GET /r{i} https 0\n") for i in range(6)}
    h2 = await trio.to_thread.run_sync(lambda: subprocess.run(
        ["curl", "-sS", "--max-time", "10", "--http2-prior-knowledge", "-w", "\n%{http_version}",
         "--data-binary", "hello", f"{url}/post"], capture_output=True, timeout=20))
    assert h2.stdout == b"a POST /post https 5\n\n2", h2
    # One TLS connection, verified against the pool's CA with its server_name, ALPN h2, carried
    # every request: the six sent together were open on it at once (multiplexed).
    assert backend.stats.connections == 1 and backend.stats.server_names == ["api.internal"]
    assert backend.stats.alpn == ["h2"] and backend.stats.streams == 8
    assert backend.stats.most_concurrent >= 2
    assert node.upstreams.opened == 1


async def test_a_burst_to_a_cold_backend_opens_one_connection(nursery: trio.Nursery, tmp_path: Path) -> None:
    ca = make_ca(tmp_path, "backends")
    # The backend waits 0.5 s before each handshake: the burst's requests reach the node while
    # the first connection is being opened (and any that come later find it open).
    backend = await start_h2_tls_backend(nursery, "a", ca.issue(tmp_path, "a", ["127.0.0.1"]), handshake_delay=0.5)
    node, port = await h2_node(nursery, [backend.address], tls_table(ca=ca.path))
    statuses: list[int] = []

    async def one(i: int) -> None:
        statuses.append((await http_get(f"http://127.0.0.1:{port}/{i}")).status_code)

    async with trio.open_nursery() as clients:
        for i in range(8):
            clients.start_soon(one, i)
    assert statuses == [200] * 8
    # The requests that came while the first connection was being opened waited for it.
    assert backend.stats.connections == 1 and node.upstreams.opened == 1 and backend.stats.streams == 8


async def test_a_burst_to_a_refused_backend_fails_together_on_one_handshake(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    ca, other = make_ca(tmp_path, "backends"), make_ca(tmp_path, "other")
    # 1.5 s before each handshake: the window in which the burst's eight requests must reach the
    # node to share the first attempt (a request after its failure tries afresh, rightly).
    backend = await start_h2_tls_backend(nursery, "a", ca.issue(tmp_path, "a", ["127.0.0.1"]), handshake_delay=1.5)
    slow_ok = '  [pools.timeouts]\n  connect = "10s"\n'  # the delay must not turn into a handshake timeout
    _, port = await h2_node(nursery, [backend.address], tls_table(ca=other.path), slow_ok)
    answers: list[tuple[int, str]] = []

    async def one(i: int) -> None:
        r = await http_get(f"http://127.0.0.1:{port}/{i}")
        answers.append((r.status_code, r.text))

    async with trio.open_nursery() as clients:
        for i in range(8):
            clients.start_soon(one, i)
    assert {status for status, _ in answers} == {502} and len(answers) == 8
    assert all("TLS: certificate verify failed" in text for _, text in answers)
    # The refused handshake reaches the backend's count once the node has closed; any other
    # attempt would come within its own 1.5 s handshake delay: 2.5 s covers both.
    with trio.fail_after(10):
        while backend.stats.failed_handshakes + backend.stats.connections == 0:
            await trio.sleep(0.05)
    await trio.sleep(2.5)
    assert backend.stats.failed_handshakes + backend.stats.connections == 1


async def test_backend_mtls_gets_the_pools_client_certificate(nursery: trio.Nursery, tmp_path: Path) -> None:
    ca, clients = make_ca(tmp_path, "backends"), make_ca(tmp_path, "clients")
    backend = await start_h2_tls_backend(nursery, "a", ca.issue(tmp_path, "a", ["127.0.0.1"]), client_ca=clients.path)
    _, port = await h2_node(nursery, [backend.address], tls_table(ca=ca.path))
    refused = await http_get(f"http://127.0.0.1:{port}/")
    assert refused.status_code == 502 and backend.stats.streams == 0  # no client certificate: no handshake
    client = clients.issue(tmp_path, "fulcrum-node", ["fulcrum-node"], client=True)
    _, port2 = await h2_node(nursery, [backend.address], tls_table(ca=ca.path, cert=client.cert, key=client.key))
    response = await http_get(f"http://127.0.0.1:{port2}/m")
    assert response.status_code == 200 and response.text == "a GET /m https 0\n"
    assert backend.stats.client_subjects == ["fulcrum-node"]


async def test_wrong_ca_is_refused_with_502_and_counted_as_a_connect_failure(
    nursery: trio.Nursery, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ca, other = make_ca(tmp_path, "backends"), make_ca(tmp_path, "other")
    backend = await start_h2_tls_backend(nursery, "a", ca.issue(tmp_path, "a", ["127.0.0.1"]))
    node, port = await h2_node(nursery, [backend.address], tls_table(ca=other.path))
    await get_refused_by_backend_tls(f"http://127.0.0.1:{port}/", caplog, "p", backend.address,
                                     "certificate verify failed: unable to get local issuer certificate")
    assert backend.stats.streams == 0 and backend.stats.connections == 0
    assert node.snapshot.pools["p"].backends[0].failures >= 1  # reported like a refused connect


# A server whose ALPN list has no h2 (or that has no ALPN at all) selects nothing: OpenSSL sends
# no ALPN answer when the lists do not meet.
@pytest.mark.parametrize("offered", [("http/1.1",), ()])
async def test_a_backend_that_does_not_select_h2_is_refused_with_one_clear_line(
    nursery: trio.Nursery, tmp_path: Path, caplog: pytest.LogCaptureFixture, offered: tuple[str, ...]
) -> None:
    ca = make_ca(tmp_path, "backends")
    backend = await start_h2_tls_backend(nursery, "a", ca.issue(tmp_path, "a", ["127.0.0.1"]), alpn=offered)
    node, port = await h2_node(nursery, [backend.address], tls_table(ca=ca.path))
    with caplog.at_level(logging.WARNING):
        response = await http_get(f"http://127.0.0.1:{port}/")
    line = "TLS: the backend does not speak h2 (ALPN: it selected no protocol); the pool's protocol needs it"
    assert response.status_code == 502 and line in response.text, response.text
    assert [r.getMessage() for r in caplog.records if r.getMessage().startswith("pool p:")] == [
        f"pool p: backend {backend.address}: {line}"]
    assert backend.stats.streams == 0  # the handshake, then nothing was sent
    assert node.snapshot.pools["p"].backends[0].failures >= 1


async def test_a_tcp_health_check_over_tls_marks_a_backend_without_h2_down(nursery: trio.Nursery, tmp_path: Path) -> None:
    ca = make_ca(tmp_path, "backends")
    good = await start_h2_tls_backend(nursery, "good", ca.issue(tmp_path, "good", ["127.0.0.1"]))
    plain = await start_h2_tls_backend(nursery, "plain", ca.issue(tmp_path, "plain", ["127.0.0.1"]), alpn=("http/1.1",))
    health = '  [pools.health]\n  type = "tcp"\n  interval = "100ms"\n  timeout = "2s"\n  rise = 1\n  fall = 1\n'
    node, port = await h2_node(nursery, [good.address, plain.address], tls_table(ca=ca.path), health)
    good_state, plain_state = node.snapshot.pools["p"].backends
    # fall = rise = 1 at 100 ms (+ jitter): the first probes land within ~0.2 s; 10 s covers a loaded machine.
    with trio.fail_after(10):
        while plain_state.health != "down" or good_state.health != "up":
            await trio.sleep(0.05)
    assert plain_state.health_reason == (
        "TLS: the backend does not speak h2 (ALPN: it selected no protocol); the pool's protocol needs it")
    assert good_state.health_reason == "TLS handshake completed"
    answers = [(await http_get(f"http://127.0.0.1:{port}/{i}")).text for i in range(4)]
    assert answers == [f"good GET /{i} https 0\n" for i in range(4)]


def grpc_through(port: int, ca: Path, name: str) -> grpc.Channel:
    credentials = grpc.ssl_channel_credentials(root_certificates=ca.read_bytes())
    return grpc.secure_channel(f"127.0.0.1:{port}", credentials, options=[
        ("grpc.ssl_target_name_override", name), ("grpc.use_local_subchannel_pool", 1), ("grpc.enable_http_proxy", 0)])


async def grpc_node(nursery: trio.Nursery, tmp_path: Path, listener_ca_name: str, backends: list[str],
                    tls: str, extra: str = "") -> tuple[LbNode, int, Path]:
    """A node with an https listener (its certificate from a CA of its own) to an h2 TLS pool."""
    listener_ca = make_ca(tmp_path, listener_ca_name)
    www = listener_ca.issue(tmp_path, "www", ["www.example.com"])
    toml = node_toml(
        pool_toml("g", backends, protocol="h2", retries=0, _extra=tls + extra),
        f'[[certificates]]\nname = "www"\ncert = "{www.cert}"\nkey = "{www.key}"\n',
        listener_toml("secure", "https", "g", extra='  [listeners.tls]\n  certificates = ["www"]\n'),
    )
    node, bound = await start_node(nursery, toml)
    return node, bound.listeners["secure"][1], listener_ca.path


async def test_grpc_unary_and_streaming_through_https_to_a_tls_grpc_pool_with_grpc_health(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    ca, clients = make_ca(tmp_path, "backends"), make_ca(tmp_path, "clients")
    client = clients.issue(tmp_path, "fulcrum-node", ["fulcrum-node"], client=True)
    backend = GrpcBackend("g1", tls=ca.issue(tmp_path, "g1", ["api.internal"]), client_ca=clients.path.read_bytes())
    try:
        health = '  [pools.health]\n  type = "grpc"\n  interval = "100ms"\n  timeout = "2s"\n  rise = 1\n  fall = 1\n'
        node, port, listener_ca = await grpc_node(
            nursery, tmp_path, "listener", [str(backend.address)],
            tls_table(ca=ca.path, server_name="api.internal", cert=client.cert, key=client.key), health)
        state = node.snapshot.pools["g"].backends[0]
        # rise = 1 at 100 ms (+ jitter): the first check lands within ~0.2 s; 10 s covers a loaded machine.
        with trio.fail_after(10):
            while state.health != "up":
                await trio.sleep(0.05)
        assert state.health_reason == "grpc status SERVING"  # the check went over mTLS too

        def calls() -> tuple[bytes, list[bytes], list[bytes]]:
            with grpc_through(port, listener_ca, "www.example.com") as channel:
                name = channel.unary_unary("/test.Who/Name")(b"", timeout=10)
                count = list(channel.unary_stream("/test.Who/Count")(b"3", timeout=10))
                chat = list(channel.stream_stream("/test.Who/Chat")(iter([b"x", b"yz"]), timeout=10))
                return name, count, chat

        name, count, chat = await trio.to_thread.run_sync(calls)
        assert name == b"g1" and count == [b"g1 0", b"g1 1", b"g1 2"] and chat == [b"X", b"YZ"]
        assert node.upstreams.opened == 1  # every call on one TLS h2 connection
    finally:
        await trio.to_thread.run_sync(backend.stop)


async def test_grpc_to_a_tls_pool_with_the_wrong_ca_is_unavailable_and_counted(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    ca, other = make_ca(tmp_path, "backends"), make_ca(tmp_path, "other")
    backend = GrpcBackend("g1", tls=ca.issue(tmp_path, "g1", ["127.0.0.1"]))
    try:
        node, port, listener_ca = await grpc_node(nursery, tmp_path, "listener", [str(backend.address)],
                                                  tls_table(ca=other.path))

        def call() -> grpc.RpcError:
            with grpc_through(port, listener_ca, "www.example.com") as channel:
                with pytest.raises(grpc.RpcError) as exc:
                    channel.unary_unary("/test.Who/Name")(b"", timeout=10)
                return exc.value

        error = await trio.to_thread.run_sync(call)
        assert error.code() == grpc.StatusCode.UNAVAILABLE, error
        assert "TLS: certificate verify failed" in (error.details() or ""), error.details()
        assert node.snapshot.pools["g"].backends[0].failures >= 1
    finally:
        await trio.to_thread.run_sync(backend.stop)
