"""Client certificates (client_ca, client_auth): verified subject and SANs to the backend; a
client's own X-Client-Cert-* headers are always dropped."""

from __future__ import annotations

import socket
import ssl
from pathlib import Path

import pytest
import trio

from tests.conftest import listener_toml, node_toml, pool_toml, start_backends, start_node
from tests.tlsclient import client_context, get
from tests.tlsgen import make_ca, make_leaf

FORGED = {"X-Client-Cert-Subject": "CN=admin", "X-Client-Cert-SANs": "DNS:admin", "x-client-cert-subject": "CN=root"}


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("pki")
    server_ca, client_ca, rogue_ca = make_ca("Server CA"), make_ca("Client CA"), make_ca("Client CA")
    (d / "server-ca.pem").write_bytes(server_ca.cert_pem)
    (d / "client-ca.pem").write_bytes(client_ca.cert_pem)
    crt, key = make_leaf(server_ca, ["www.example.com"]).write(d, "www")
    alice = make_leaf(client_ca, ["alice.clients.example.com"], cn="alice", client=True).write(d, "alice")
    rogue = make_leaf(rogue_ca, ["alice.clients.example.com"], cn="alice", client=True).write(d, "rogue")
    return {"server_ca": d / "server-ca.pem", "client_ca": d / "client-ca.pem", "crt": crt, "key": key,
            "alice": alice[0], "alice_key": alice[1], "rogue": rogue[0], "rogue_key": rogue[1]}


def config(pki, backend: str, mode: str) -> str:
    tls = f'  [listeners.tls]\n  certificates = ["www"]\n  client_ca = "{pki["client_ca"]}"\n  client_auth = "{mode}"\n'
    return node_toml(
        pool_toml("web", [backend]),
        f'[[certificates]]\nname = "www"\ncert = "{pki["crt"]}"\nkey = "{pki["key"]}"\n',
        listener_toml("secure", "https", "web", extra=tls),
        listener_toml("open", "https", "web", extra='  [listeners.tls]\n  certificates = ["www"]\n'),
    )


def echoed(body: bytes) -> list[tuple[str, str]]:
    lines = body.decode().split("\n\n")[0].splitlines()[1:]
    return [(k.lower(), v) for k, _, v in (line.partition(": ") for line in lines)]


def refused(port: int, ctx: ssl.SSLContext) -> bool:
    """The handshake, or (TLS 1.3: the server judges the certificate after the client is
    done) the first read, fails."""
    try:
        with ctx.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=10),
                             server_hostname="www.example.com") as s:
            s.sendall(b"GET / HTTP/1.1\r\nHost: www.example.com\r\n\r\n")
            return s.recv(100) == b""
    except (ssl.SSLError, ConnectionResetError):
        return True


async def test_required_client_certificate(pki) -> None:
    async with trio.open_nursery() as nursery:
        backends = await start_backends(nursery, "a")
        node, bound = await start_node(nursery, config(pki, backends[0].address, "required"))
        port = bound.listeners["secure"][1]
        alice = client_context(pki["server_ca"], (pki["alice"], pki["alice_key"]))
        status, _, body, _ = await trio.to_thread.run_sync(
            lambda: get("www.example.com", port, alice, "/echo", headers=FORGED))
        assert status == 200
        seen = echoed(body)
        assert [v for k, v in seen if k == "x-client-cert-subject"] == ["CN=alice"]
        assert [v for k, v in seen if k == "x-client-cert-sans"] == ["DNS:alice.clients.example.com"]
        # Without a certificate, or with one from another CA of the same name: refused, counted.
        assert await trio.to_thread.run_sync(refused, port, client_context(pki["server_ca"]))
        rogue = client_context(pki["server_ca"], (pki["rogue"], pki["rogue_key"]))
        assert await trio.to_thread.run_sync(refused, port, rogue)
        await trio.sleep(0.2)
        assert node.tls_terminators["secure"].failures == {"client_certificate": 2}
        nursery.cancel_scope.cancel()


async def test_optional_client_certificate_and_forged_headers_stripped(pki) -> None:
    async with trio.open_nursery() as nursery:
        backends = await start_backends(nursery, "a")
        _, bound = await start_node(nursery, config(pki, backends[0].address, "optional"))
        port, open_port = bound.listeners["secure"][1], bound.listeners["open"][1]
        anonymous = client_context(pki["server_ca"])
        for p in (port, open_port):  # optional without a certificate, and a listener without client_auth
            status, _, body, _ = await trio.to_thread.run_sync(
                lambda p=p: get("www.example.com", p, anonymous, "/echo", headers=FORGED))
            assert status == 200
            assert not [k for k, _ in echoed(body) if k.startswith("x-client-cert")], body
        alice = client_context(pki["server_ca"], (pki["alice"], pki["alice_key"]))
        _, _, body, _ = await trio.to_thread.run_sync(lambda: get("www.example.com", port, alice, "/echo"))
        assert ("x-client-cert-subject", "CN=alice") in echoed(body)
        nursery.cancel_scope.cancel()
