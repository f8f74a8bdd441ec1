"""TLS protocol settings of a listener, seen by real clients: versions, ciphers, ALPN, RSA+ECDSA,
renegotiation, resumption, the handshake timeout and the cap on handshakes in progress."""

from __future__ import annotations

import socket
import ssl
import subprocess
import time
from pathlib import Path

import pytest
import trio
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.conftest import listener_toml, node_toml, pool_toml, start_backends, start_node
from tests.tlsclient import client_context
from tests.tlsgen import make_ca, make_leaf


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("pki")
    ca = make_ca()
    (d / "ca.pem").write_bytes(ca.cert_pem)
    ec = make_leaf(ca, ["www.example.com"]).write(d, "ec")
    rsa = make_leaf(ca, ["www.example.com"], kind="rsa").write(d, "rsa")
    return {"dir": d, "ca": d / "ca.pem", "ec": ec[0], "ec_key": ec[1], "rsa": rsa[0], "rsa_key": rsa[1]}


def config(pki: dict[str, Path], backend: str, tls_extra: str = "") -> str:
    certs = (f'[[certificates]]\nname = "ec"\ncert = "{pki["ec"]}"\nkey = "{pki["ec_key"]}"\n'
             f'[[certificates]]\nname = "rsa"\ncert = "{pki["rsa"]}"\nkey = "{pki["rsa_key"]}"\n')
    tls = '  [listeners.tls]\n  certificates = ["ec", "rsa"]\n' + tls_extra
    return node_toml(pool_toml("web", [backend]), certs, listener_toml("secure", "https", "web", extra=tls))


def handshake(port: int, ctx: ssl.SSLContext, session: ssl.SSLSession | None = None) -> ssl.SSLSocket:
    raw = socket.create_connection(("127.0.0.1", port), timeout=20)
    return ctx.wrap_socket(raw, server_hostname="www.example.com", session=session)


def request(sock: ssl.SSLSocket) -> bytes:
    sock.sendall(b"GET / HTTP/1.1\r\nHost: www.example.com\r\nConnection: close\r\n\r\n")
    out = b""
    while chunk := sock.recv(65536):
        out += chunk
    return out


def ctx_with(pki, *, maxv=None, minv=None, ciphers=None) -> ssl.SSLContext:
    ctx = client_context(pki["ca"])
    if maxv:
        ctx.maximum_version = maxv
    if minv:
        ctx.minimum_version = minv
    if ciphers:
        ctx.set_ciphers(ciphers)
    return ctx


async def test_versions_ciphers_alpn_and_key_types(pki) -> None:
    async with trio.open_nursery() as nursery:
        backends = await start_backends(nursery, "a")
        node, bound = await start_node(nursery, config(pki, backends[0].address))
        port = bound.listeners["secure"][1]
        tls = node.tls_terminators["secure"]

        def check() -> None:
            # TLS 1.3 and 1.2 by default; ALPN h2 when offered (issue 14), http/1.1 when it alone is.
            ctx = ctx_with(pki)
            ctx.set_alpn_protocols(["h2", "http/1.1"])
            s2 = handshake(port, ctx)
            assert s2.version() == "TLSv1.3" and s2.selected_alpn_protocol() == "h2"
            s2.close()
            ctx = ctx_with(pki)
            ctx.set_alpn_protocols(["http/1.1"])
            s13 = handshake(port, ctx)
            assert s13.version() == "TLSv1.3" and s13.selected_alpn_protocol() == "http/1.1"
            assert request(s13).startswith(b"HTTP/1.1 200")
            s12 = handshake(port, ctx_with(pki, maxv=ssl.TLSVersion.TLSv1_2))
            assert s12.version() == "TLSv1.2" and s12.cipher()[0] == "ECDHE-ECDSA-AES128-GCM-SHA256"
            s12.close()
            # An RSA-only TLS 1.2 client gets the RSA certificate for the same name, others ECDSA.
            rsa_only = handshake(port, ctx_with(pki, maxv=ssl.TLSVersion.TLSv1_2, ciphers="ECDHE-RSA-AES256-GCM-SHA384"))
            key = x509.load_der_x509_certificate(rsa_only.getpeercert(binary_form=True)).public_key()
            assert isinstance(key, rsa.RSAPublicKey)
            rsa_only.close()
            # A TLS 1.2 suite outside the profile (CBC) is refused.
            with pytest.raises(ssl.SSLError):
                handshake(port, ctx_with(pki, maxv=ssl.TLSVersion.TLSv1_2, ciphers="ECDHE-ECDSA-AES128-SHA256"))

        await trio.to_thread.run_sync(check)
        await trio.sleep(0.2)  # the node's side of the refused handshake
        assert tls.failures == {"no_shared_cipher": 1}
        nursery.cancel_scope.cancel()


async def test_min_version_and_ciphers_tighten(pki) -> None:
    async with trio.open_nursery() as nursery:
        backends = await start_backends(nursery, "a")
        extra = '  min_version = "1.3"\n'
        node, bound = await start_node(nursery, config(pki, backends[0].address, extra))
        port = bound.listeners["secure"][1]

        def check() -> None:
            with pytest.raises(ssl.SSLError):
                handshake(port, ctx_with(pki, maxv=ssl.TLSVersion.TLSv1_2))
            assert handshake(port, ctx_with(pki)).version() == "TLSv1.3"

        await trio.to_thread.run_sync(check)
        await trio.sleep(0.2)
        assert node.tls_terminators["secure"].failures == {"version": 1}
        nursery.cancel_scope.cancel()
    async with trio.open_nursery() as nursery:
        backends = await start_backends(nursery, "a")
        extra = '  ciphers = "ECDHE-ECDSA-AES256-GCM-SHA384"\n'
        node, bound = await start_node(nursery, config(pki, backends[0].address, extra))
        port = bound.listeners["secure"][1]

        def check2() -> None:
            tls12 = ssl.TLSVersion.TLSv1_2
            with pytest.raises(ssl.SSLError):
                handshake(port, ctx_with(pki, maxv=tls12, ciphers="ECDHE-ECDSA-AES128-GCM-SHA256"))
            assert handshake(port, ctx_with(pki, maxv=tls12)).cipher()[0] == "ECDHE-ECDSA-AES256-GCM-SHA384"

        await trio.to_thread.run_sync(check2)
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
async def test_session_resumption_on_a_node(pki, version) -> None:
    async with trio.open_nursery() as nursery:
        backends = await start_backends(nursery, "a")
        node, bound = await start_node(nursery, config(pki, backends[0].address))
        port = bound.listeners["secure"][1]
        ctx = ctx_with(pki, maxv=version, minv=version)

        def check() -> None:
            first = handshake(port, ctx)
            assert request(first).startswith(b"HTTP/1.1 200")  # TLS 1.3 tickets come after the handshake
            session = first.session
            first.close()
            second = handshake(port, ctx, session=session)
            assert second.session_reused
            assert request(second).startswith(b"HTTP/1.1 200")

        await trio.to_thread.run_sync(check)
        assert node.tls_terminators["secure"].resumed == 1
        nursery.cancel_scope.cancel()


async def test_renegotiation_is_refused(pki) -> None:
    async with trio.open_nursery() as nursery:
        backends = await start_backends(nursery, "a")
        _, bound = await start_node(nursery, config(pki, backends[0].address))
        port = bound.listeners["secure"][1]

        def s_client() -> subprocess.CompletedProcess[str]:
            # "R" on a line of its own asks s_client to renegotiate (TLS 1.2 only).
            return subprocess.run(
                ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-servername", "www.example.com",
                 "-tls1_2", "-CAfile", str(pki["ca"])],
                input="R\n", capture_output=True, text=True, timeout=30)

        proc = await trio.to_thread.run_sync(s_client)
        out = proc.stdout + proc.stderr
        assert "Verify return code: 0 (ok)" in out  # the first handshake succeeded
        assert "RENEGOTIATING" in out
        assert "no renegotiation" in out, out[-2000:]  # OpenSSL's alert from the node
        nursery.cancel_scope.cancel()


def half_client_hello() -> bytes:
    """The first 40 bytes of a real ClientHello: a client that stalls mid-handshake."""
    inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ssl.create_default_context().wrap_bio(inc, out, server_hostname="www.example.com")
    try:
        obj.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return out.read()[:40]


async def test_handshake_timeout_and_cap(pki) -> None:
    async with trio.open_nursery() as nursery:
        backends = await start_backends(nursery, "a")
        extra = '  handshake_timeout = "1s"\n  max_handshakes = 2\n'
        node, bound = await start_node(nursery, config(pki, backends[0].address, extra))
        port = bound.listeners["secure"][1]
        tls = node.tls_terminators["secure"]
        ctx = ctx_with(pki)

        def stall() -> float:
            start = time.monotonic()
            with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
                s.sendall(half_client_hello())
                assert s.recv(100) == b""  # closed by the node, nothing sent
            return time.monotonic() - start

        def good_after(delay: float) -> float:
            time.sleep(delay)
            start = time.monotonic()
            assert request(handshake(port, ctx)).startswith(b"HTTP/1.1 200")
            return time.monotonic() - start

        results: dict[str, float] = {}

        async def run(name: str, fn, *args) -> None:
            results[name] = await trio.to_thread.run_sync(fn, *args)

        async with trio.open_nursery() as clients:
            clients.start_soon(run, "stall1", stall)
            clients.start_soon(run, "stall2", stall)
            clients.start_soon(run, "good", good_after, 0.4)
            await trio.sleep(0.3)
            assert tls.in_progress == 2  # the two stalled ones hold both slots
        # Stalled clients are closed at the 1 s timeout (margin: 2 s for a loaded machine).
        assert 0.9 <= results["stall1"] < 3.0 and 0.9 <= results["stall2"] < 3.0
        # The good client waited for a slot (about 0.6 s), then was served within its own timeout.
        assert 0.3 <= results["good"] < 1.0 + 2.0
        assert tls.failures == {"timeout": 2}
        assert tls.handshakes == 1
        nursery.cancel_scope.cancel()


async def test_ticket_keys_are_replaced_after_their_lifetime(pki) -> None:
    async with trio.open_nursery() as nursery:
        backends = await start_backends(nursery, "a")
        node, bound = await start_node(nursery, config(pki, backends[0].address))
        port = bound.listeners["secure"][1]
        now = [0.0]
        tls = node.tls_terminators["secure"]
        # A clock the test moves; keys live 100 (fake) seconds from now.
        tls.clock, tls.ticket_key_lifetime = (lambda: now[0]), 100.0
        tls.new_ticket_keys()
        ctx = ctx_with(pki, maxv=ssl.TLSVersion.TLSv1_3)

        def connect_with(session):
            s = handshake(port, ctx, session=session)
            assert request(s).startswith(b"HTTP/1.1 200")
            return s.session, s.session_reused

        session, _ = await trio.to_thread.run_sync(connect_with, None)
        now[0] = 99.0
        session, reused = await trio.to_thread.run_sync(connect_with, session)
        assert reused  # within the keys' lifetime: resumed
        now[0] = 101.0
        _, reused = await trio.to_thread.run_sync(connect_with, session)
        assert not reused  # new keys: the old ticket is refused, a full handshake instead
        nursery.cancel_scope.cancel()
