"""protocol = "tls": TLS terminated at L4, plain TCP to the backend, bytes moved both ways."""

from __future__ import annotations

import hashlib
import os
import socket
import ssl
import threading
from pathlib import Path

import pytest
import trio

from tests.conftest import listener_toml, node_toml, pool_toml, start_backends, start_node
from tests.tlsclient import client_context
from tests.tlsgen import make_ca, make_leaf


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    d = tmp_path_factory.mktemp("pki")
    ca = make_ca()
    (d / "ca.pem").write_bytes(ca.cert_pem)
    crt, key = make_leaf(ca, ["db.example.com"]).write(d, "db")
    return d / "ca.pem", crt, key


async def echo_server(task_status=trio.TASK_STATUS_IGNORED) -> None:
    """A plain TCP backend that echoes everything, then closes after the client's EOF."""

    async def handler(stream: trio.SocketStream) -> None:
        async with stream:
            while data := await stream.receive_some(65536):
                await stream.send_all(data)

    await trio.serve_tcp(handler, 0, host="127.0.0.1", task_status=task_status)


def config(pki, backend: str) -> str:
    _, crt, key = pki
    return node_toml(
        pool_toml("db", [backend]),
        f'[[certificates]]\nname = "db"\ncert = "{crt}"\nkey = "{key}"\n',
        listener_toml("db", "tls", "db", extra='  [listeners.tls]\n  certificates = ["db"]\n'),
    )


def tls_connect(port: int, ca: Path) -> ssl.SSLSocket:
    raw = socket.create_connection(("127.0.0.1", port), timeout=30)
    return client_context(ca).wrap_socket(raw, server_hostname="db.example.com")


async def test_tls_listener_echoes_8_mib_both_ways_then_closes(pki) -> None:
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(echo_server)
        backend_port = listeners[0].socket.getsockname()[1]
        node, bound = await start_node(nursery, config(pki, f"127.0.0.1:{backend_port}"))
        port = bound.listeners["db"][1]
        payload = os.urandom(8 * 1024 * 1024)

        def client() -> str:
            sock = tls_connect(port, pki[0])
            received = bytearray()

            def reader() -> None:
                while len(received) < len(payload) and (chunk := sock.recv(65536)):
                    received.extend(chunk)

            t = threading.Thread(target=reader)
            t.start()
            sock.sendall(payload)
            t.join(60)
            assert not t.is_alive()
            sock.close()
            return hashlib.sha256(received).hexdigest()

        digest = await trio.to_thread.run_sync(client)
        assert digest == hashlib.sha256(payload).hexdigest()
        tcp = node.tcp_proxies["db"]
        with trio.fail_after(5):  # the client's close ends the session (both ways) at once
            while tcp.active:  # type: ignore[attr-defined]
                await trio.sleep(0.01)
        assert tcp.total == 1  # type: ignore[attr-defined]
        assert node.tls_terminators["db"].handshakes == 1
        nursery.cancel_scope.cancel()


async def test_tls_listener_in_front_of_an_http_backend(pki) -> None:
    async with trio.open_nursery() as nursery:
        backends = await start_backends(nursery, "alpha")
        _, bound = await start_node(nursery, config(pki, backends[0].address))
        port = bound.listeners["db"][1]

        def client() -> bytes:
            sock = tls_connect(port, pki[0])
            sock.sendall(b"GET /bytes?n=3000000 HTTP/1.1\r\nHost: db\r\nConnection: close\r\n\r\n")
            out = bytearray()
            while chunk := sock.recv(65536):
                out.extend(chunk)
            sock.close()
            return bytes(out)

        data = await trio.to_thread.run_sync(client)
        head, _, body = data.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200") and len(body) == 3_000_000
        assert b"X-Forwarded-Proto" not in head  # L4: the bytes are not touched
        nursery.cancel_scope.cancel()
