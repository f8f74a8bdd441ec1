"""TLS to the backends ([pools.tls]): L7 upstreams, L4 sessions and health checks against real TLS servers."""

from __future__ import annotations

import hashlib
import logging
import os
import socket
from pathlib import Path

import pytest
import trio

from lbnode.config import ConfigFileError, load_config_text
from lbnode.node import LbNode
from tests.conftest import http_get, listener_toml, node_toml, pool_toml, start_node
from tests.tlsutil import get_refused_by_backend_tls, make_ca, start_tls_backend


def tls_table(**settings: object) -> str:
    lines = ["  [pools.tls]"]
    settings.setdefault("enabled", True)
    for key, value in settings.items():
        lines.append(f"  {key} = " + (("true" if value else "false") if isinstance(value, bool) else f'"{value}"'))
    return "\n".join(lines) + "\n"


async def l7_node(nursery: trio.Nursery, addresses: list[str], tls: str, health: str = "") -> tuple[LbNode, str]:
    toml = node_toml(listener_toml("web", "http", "p"), pool_toml("p", addresses, _extra=tls + health))
    node, bound = await start_node(nursery, toml)
    return node, f"http://127.0.0.1:{bound.listeners['web'][1]}"


async def test_verified_backend_serves_and_keeps_its_tls_connection(nursery: trio.Nursery, tmp_path: Path) -> None:
    ca = make_ca(tmp_path, "backends")
    backend = await start_tls_backend(nursery, "a", ca.issue(tmp_path, "a", ["127.0.0.1"]))
    node, url = await l7_node(nursery, [backend.address], tls_table(ca=ca.path))
    for _ in range(5):
        response = await http_get(url + "/")
        assert response.status_code == 200 and response.text == "a"
    # One handshake for five requests: the pooled keep-alive connection stays TLS.
    assert backend.stats.handshakes == 1 and backend.stats.requests == 5
    assert node.upstreams.opened == 1


async def test_server_name_is_sent_and_verified(nursery: trio.Nursery, tmp_path: Path) -> None:
    ca = make_ca(tmp_path, "backends")
    backend = await start_tls_backend(nursery, "a", ca.issue(tmp_path, "a", ["api.internal"]))
    _, url = await l7_node(nursery, [backend.address], tls_table(ca=ca.path, server_name="api.internal"))
    response = await http_get(url + "/")
    assert response.status_code == 200 and response.text == "a"
    assert backend.stats.server_names == ["api.internal"]


async def test_wrong_ca_is_refused_with_502_naming_pool_and_backend(
    nursery: trio.Nursery, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ca, other = make_ca(tmp_path, "backends"), make_ca(tmp_path, "other")
    backend = await start_tls_backend(nursery, "a", ca.issue(tmp_path, "a", ["127.0.0.1"]))
    node, url = await l7_node(nursery, [backend.address], tls_table(ca=other.path))
    await get_refused_by_backend_tls(url + "/", caplog, "p", backend.address,
                                     "certificate verify failed: unable to get local issuer certificate")
    assert backend.stats.requests == 0
    state = node.snapshot.pools["p"].backends[0]
    assert state.failures >= 1  # reported like a refused connect (passive health)


async def test_name_mismatch_is_refused_and_verify_false_accepts_it(nursery: trio.Nursery, tmp_path: Path) -> None:
    ca = make_ca(tmp_path, "backends")
    backend = await start_tls_backend(nursery, "a", ca.issue(tmp_path, "a", ["somewhere.else"]))
    _, url = await l7_node(nursery, [backend.address], tls_table(ca=ca.path))
    response = await http_get(url + "/")
    assert response.status_code == 502 and "certificate verify failed: IP address mismatch" in response.text
    _, url2 = await l7_node(nursery, [backend.address], tls_table(verify=False))
    response = await http_get(url2 + "/")
    assert response.status_code == 200 and response.text == "a"


async def test_backend_mtls_needs_the_client_certificate(nursery: trio.Nursery, tmp_path: Path) -> None:
    ca, clients = make_ca(tmp_path, "backends"), make_ca(tmp_path, "clients")
    backend = await start_tls_backend(nursery, "a", ca.issue(tmp_path, "a", ["127.0.0.1"]), client_ca=clients.path)
    _, url = await l7_node(nursery, [backend.address], tls_table(ca=ca.path))
    assert (await http_get(url + "/")).status_code == 502  # no client certificate: the backend refuses
    assert backend.stats.requests == 0
    client = clients.issue(tmp_path, "fulcrum-node", ["fulcrum-node"], client=True)
    _, url2 = await l7_node(nursery, [backend.address], tls_table(ca=ca.path, cert=client.cert, key=client.key))
    response = await http_get(url2 + "/")
    assert response.status_code == 200 and response.text == "a"
    assert backend.stats.client_subjects[-1] == "fulcrum-node"


@pytest.mark.parametrize("check_type", ["http", "tcp"])
async def test_health_check_over_tls_marks_a_bad_certificate_down(
    nursery: trio.Nursery, tmp_path: Path, check_type: str
) -> None:
    ca, rogue = make_ca(tmp_path, "backends"), make_ca(tmp_path, "rogue")
    good = await start_tls_backend(nursery, "good", ca.issue(tmp_path, "good", ["127.0.0.1"]))
    bad = await start_tls_backend(nursery, "bad", rogue.issue(tmp_path, "bad", ["127.0.0.1"]))
    health = f'  [pools.health]\n  type = "{check_type}"\n  interval = "200ms"\n  timeout = "2s"\n  fall = 1\n  rise = 1\n'
    node, url = await l7_node(nursery, [good.address, bad.address], tls_table(ca=ca.path), health)
    good_state, bad_state = node.snapshot.pools["p"].backends
    # fall = 1 at 200 ms (+10% jitter): the first probe lands within 0.22 s; 10 s covers a loaded machine.
    with trio.fail_after(10):
        while bad_state.health != "down":
            await trio.sleep(0.05)
    assert "TLS: certificate verify failed" in bad_state.health_reason
    with trio.fail_after(10):
        while good_state.health != "up":
            await trio.sleep(0.05)
    if check_type == "http":
        assert good.stats.requests >= 1  # the check's request went over TLS
    assert {(await http_get(url + "/")).text for _ in range(4)} == {"good"}


async def test_tcp_listener_re_encrypts_to_a_tls_pool(nursery: trio.Nursery, tmp_path: Path) -> None:
    ca = make_ca(tmp_path, "backends")
    backend = await start_tls_backend(nursery, "a", ca.issue(tmp_path, "a", ["127.0.0.1"]))
    toml = node_toml(listener_toml("l4", "tcp", "p"), pool_toml("p", [backend.address], _extra=tls_table(ca=ca.path)))
    _, bound = await start_node(nursery, toml)
    port = bound.listeners["l4"][1]
    payload = os.urandom(2 * 1024 * 1024)

    def plain_client() -> bytes:
        with socket.create_connection(("127.0.0.1", port), timeout=20) as sock:
            received = bytearray()
            sock.sendall(b"ECHO\n")
            for i in range(0, len(payload), 128 * 1024):
                part = payload[i : i + 128 * 1024]
                sock.sendall(part)
                want = i + len(part)
                while len(received) < want:
                    received += sock.recv(1 << 20)
            sock.shutdown(socket.SHUT_WR)  # half-close: the backend sees the end and closes too
            while data := sock.recv(1 << 20):
                received += data
            return bytes(received)

    for _ in range(2):
        echoed = await trio.to_thread.run_sync(plain_client)
        assert hashlib.sha256(echoed).digest() == hashlib.sha256(payload).digest()
    assert backend.stats.handshakes == 2
    assert backend.stats.resumed == 1  # the second session resumed the first one's TLS session


def test_config_errors_name_the_key(tmp_path: Path) -> None:
    ca = make_ca(tmp_path, "backends")
    base = node_toml(listener_toml("web", "http", "p"), "{pool}")

    def error(tls: str) -> str:
        with pytest.raises(ConfigFileError) as err:
            load_config_text(base.replace("{pool}", pool_toml("p", ["127.0.0.1:1"], _extra=tls)), "node.toml")
        return str(err.value)

    assert error(tls_table(ca=tmp_path / "missing.pem")) == (
        f"node.toml: pools[0].tls.ca: cannot load {tmp_path / 'missing.pem'}: no such file or directory")
    (tmp_path / "junk.pem").write_text("not a certificate\n")
    assert error(tls_table(ca=tmp_path / "junk.pem")).startswith("node.toml: pools[0].tls.ca: cannot load")
    client = ca.issue(tmp_path, "c", ["c"], client=True)
    other = ca.issue(tmp_path, "d", ["d"], client=True)
    assert error(tls_table(cert=client.cert, key=other.key)).startswith(
        "node.toml: pools[0].tls.cert: cannot load")  # key does not match the certificate
    assert error(tls_table(cert=client.cert)) == (
        "node.toml: pools[0].tls.key: is required with cert (a client certificate needs both)")
    assert error(tls_table(ca=ca.path, verify=False)) == (
        "node.toml: pools[0].tls.ca: has no use with verify = false (remove one of them)")
    assert error(tls_table(server_name="bad name")) == 'node.toml: pools[0].tls.server_name: "bad name" is not a host name'
    assert error(tls_table(sni="x")) == "node.toml: pools[0].tls.sni: unknown key"
    config = load_config_text(base.replace("{pool}", pool_toml("p", ["127.0.0.1:1"], _extra=tls_table(enabled=False))))
    assert config.pools[0].tls is None


async def test_tls_socket_send_all_survives_a_backend_that_reads_late(nursery: trio.Nursery, tmp_path: Path) -> None:
    """The kernel takes part of the ciphertext only: the rest must still leave, in order."""
    from lbnode.model import Address, PoolTls
    from lbnode.sockio import recv_some, send_all
    from lbnode.tls.upstream import TlsSocket, open_backend
    from tests.tlsutil import server_context

    ca = make_ca(tmp_path, "backends")
    ctx = server_context(ca.issue(tmp_path, "a", ["127.0.0.1"]))

    async def late_reader(stream: trio.SSLStream[trio.SocketStream]) -> None:
        await stream.do_handshake()
        await trio.sleep(0.5)  # the client's socket buffers fill meanwhile
        digest = hashlib.sha256()
        while data := await stream.receive_some(1 << 20):
            digest.update(data)
        await stream.send_all(digest.digest())
        await stream.aclose()

    listeners = await trio.open_ssl_over_tcp_listeners(0, ctx, host="127.0.0.1")
    # A small, fixed receive buffer (inherited by accepted sockets, no autotuning): the
    # backend's kernel cannot swallow the payload while the backend does not read.
    listeners[0].transport_listener.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    await nursery.start(trio.serve_listeners, late_reader, listeners)
    port = listeners[0].transport_listener.socket.getsockname()[1]
    payload = os.urandom(16 * 1024 * 1024)
    conn = await open_backend(Address("127.0.0.1", port), 5.0, PoolTls(ca=str(ca.path)))
    assert isinstance(conn, TlsSocket)
    conn.raw.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * 1024)
    try:
        with trio.fail_after(30):
            await send_all(conn, payload)
            conn.shutdown(socket.SHUT_WR)
            answer = b""
            while data := await recv_some(conn, 65536):  # type: ignore[arg-type]
                answer += data
    finally:
        conn.close()
    assert answer == hashlib.sha256(payload).digest()


async def test_pool_from_the_store_with_an_unreadable_ca_fails_its_connects(
    nursery: trio.Nursery, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Pools from the control API skip the load-time file check: the request says why it failed."""
    from lbnode.model import parse_config

    ca = make_ca(tmp_path, "backends")
    backend = await start_tls_backend(nursery, "a", ca.issue(tmp_path, "a", ["127.0.0.1"]))
    missing = tmp_path / "gone.pem"
    config = parse_config({
        "node": {"id": "n1"},
        "pools": [{"name": "p", "backends": [{"address": backend.address}], "tls": {"ca": str(missing)}}],
        "listeners": [{"name": "web", "protocol": "http", "bind": "127.0.0.1:0", "pool": "p"}],
    })
    node = LbNode(config)
    bound = await nursery.start(lambda task_status: node.run(handle_signals=False, task_status=task_status))
    with caplog.at_level(logging.WARNING):
        response = await http_get(f"http://127.0.0.1:{bound.listeners['web'][1]}/")
    assert response.status_code == 502
    assert f"pools.tls.ca: cannot load {missing}: no such file or directory" in response.text
    assert backend.stats.handshakes == 0


async def test_idle_pooled_tls_connection_is_checked_and_reused(nursery: trio.Nursery, tmp_path: Path) -> None:
    """After PEEK_AFTER_IDLE a pooled connection is checked before reuse; for TLS the check
    goes through TlsSocket.still_open (TLS records without data, e.g. tickets, do not count)."""
    from lbnode.http.upstream import PEEK_AFTER_IDLE

    ca = make_ca(tmp_path, "backends")
    backend = await start_tls_backend(nursery, "a", ca.issue(tmp_path, "a", ["127.0.0.1"]))
    node, url = await l7_node(nursery, [backend.address], tls_table(ca=ca.path))
    assert (await http_get(url + "/")).text == "a"
    await trio.sleep(PEEK_AFTER_IDLE + 0.2)  # idle long enough to be checked before reuse
    assert (await http_get(url + "/")).text == "a"
    assert backend.stats.handshakes == 1 and node.upstreams.opened == 1 and backend.stats.requests == 2


async def test_websocket_upgrade_tunnels_over_the_tls_upstream(nursery: trio.Nursery, tmp_path: Path) -> None:
    ca = make_ca(tmp_path, "backends")
    backend = await start_tls_backend(nursery, "a", ca.issue(tmp_path, "a", ["127.0.0.1"]))
    _, url = await l7_node(nursery, [backend.address], tls_table(ca=ca.path))
    port = int(url.rsplit(":", 1)[1])
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    payload = os.urandom(512 * 1024)
    with trio.fail_after(20):
        await stream.send_all(b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                              b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
        got = b""
        while b"\r\n\r\n" not in got:
            got += await stream.receive_some(65536)
        head, _, echoed = got.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101 ")
        echoed_parts = bytearray(echoed)

        async def read_back() -> None:
            while len(echoed_parts) < len(payload):
                data = await stream.receive_some(1 << 20)
                assert data, "tunnel closed early"
                echoed_parts.extend(data)

        async with trio.open_nursery() as n:
            n.start_soon(read_back)
            await stream.send_all(payload)
    await stream.aclose()
    assert hashlib.sha256(bytes(echoed_parts)).digest() == hashlib.sha256(payload).digest()
