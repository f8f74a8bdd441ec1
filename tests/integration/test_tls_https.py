"""protocol = "https": L7 over TLS with real clients (Python ssl, curl --resolve), SNI, rotation."""

from __future__ import annotations

import dataclasses
import subprocess
from pathlib import Path

import pytest
import trio

from lbnode.config import load_config_text
from tests.conftest import listener_toml, node_toml, pool_toml, start_backends, start_node
from tests.tlsclient import SniConnection, client_context, get
from tests.tlsgen import make_ca, make_leaf


@dataclasses.dataclass
class Pki:
    dir: Path
    ca: Path
    www: tuple[Path, Path]
    wild: tuple[Path, Path]
    www2: tuple[Path, Path]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    d = tmp_path_factory.mktemp("pki")
    ca = make_ca()
    (d / "ca.pem").write_bytes(ca.cert_pem)
    return Pki(
        dir=d,
        ca=d / "ca.pem",
        www=make_leaf(ca, ["www.example.com"]).write(d, "www"),
        wild=make_leaf(ca, ["*.example.com"], kind="rsa").write(d, "wild"),
        www2=make_leaf(ca, ["www.example.com"]).write(d, "www2"),
    )


def certificates_toml(pki: Pki, www: tuple[Path, Path] | None = None) -> str:
    www = www or pki.www
    return (f'[[certificates]]\nname = "www"\ncert = "{www[0]}"\nkey = "{www[1]}"\n'
            f'[[certificates]]\nname = "wild"\ncert = "{pki.wild[0]}"\nkey = "{pki.wild[1]}"\n')


TLS = '  [listeners.tls]\n  certificates = ["www", "wild"]\n'


def config_text(pki: Pki, backends, extra_listener: str = "", tls: str = TLS, www=None) -> str:
    return node_toml(
        pool_toml("web", [b.address for b in backends[:1]]),
        pool_toml("api", [b.address for b in backends[1:2]]),
        certificates_toml(pki, www),
        listener_toml("secure", "https", "web", extra=tls + '  [[listeners.routes]]\n  path_prefix = "/api/"\n  pool = "api"\n'),
        listener_toml("plain", "http", "web"),
        extra_listener,
    )


def echo_headers(body: bytes) -> dict[str, str]:
    out = {}
    for line in body.decode().split("\n\n")[0].splitlines()[1:]:
        k, _, v = line.partition(": ")
        out[k.lower()] = v
    return out


async def test_https_sni_forwarded_headers_routes_keepalive(pki: Pki) -> None:
    async with trio.open_nursery() as nursery:
        backends = await start_backends(nursery, "alpha", "beta")
        node, bound = await start_node(nursery, config_text(pki, backends))
        port = bound.listeners["secure"][1]
        ctx = client_context(pki.ca)

        status, headers, body, names = await trio.to_thread.run_sync(get, "www.example.com", port, ctx, "/echo")
        assert status == 200 and names == ["www.example.com"]
        seen = echo_headers(body)
        assert seen["x-forwarded-proto"] == "https"
        assert seen["x-forwarded-port"] == str(port)

        # Wildcard by SNI, exact beats it, an unknown name gets the default (first) certificate.
        assert (await trio.to_thread.run_sync(get, "api.example.com", port, ctx, "/"))[3] == ["*.example.com"]
        unknown = client_context()  # no verification: the default certificate does not name it
        assert (await trio.to_thread.run_sync(get, "nothing.test", port, unknown, "/"))[3] == ["www.example.com"]

        # Routes work unchanged over TLS.
        _, _, body, _ = await trio.to_thread.run_sync(get, "www.example.com", port, ctx, "/api/x")
        assert b"beta" in body

        # Keep-alive: several requests, a 2 MB upload streamed both ways, on one TLS connection.
        def keepalive() -> list[int]:
            conn = SniConnection("www.example.com", port, ctx)
            sizes = []
            try:
                for i in range(5):
                    payload = bytes([i]) * (2_000_000 if i == 2 else 10)
                    conn.request("POST", "/echo", body=payload)
                    resp = conn.getresponse()
                    data = resp.read()
                    assert resp.status == 200 and data.endswith(payload)
                    sizes.append(len(data))
            finally:
                conn.close()
            return sizes

        sizes = await trio.to_thread.run_sync(keepalive)
        assert len(sizes) == 5 and sizes[2] > 2_000_000
        # 4 single requests, then 1 or 2: when the streamed 2 MB echo answers before the upload
        # has ended, its response says Connection: close (as on a plain listener) and the
        # client reconnects; under load the upload may end first and the connection goes on.
        assert node.tls_terminators["secure"].handshakes in (5, 6)

        # The plain listener says http and its own port.
        plain = bound.listeners["plain"][1]
        import httpx

        r = await trio.to_thread.run_sync(lambda: httpx.get(f"http://127.0.0.1:{plain}/echo", timeout=10))
        seen = echo_headers(r.content)
        assert seen["x-forwarded-proto"] == "http" and seen["x-forwarded-port"] == str(plain)
        nursery.cancel_scope.cancel()


async def test_curl_resolve_and_forged_forwarded_headers(pki: Pki) -> None:
    async with trio.open_nursery() as nursery:
        backends = await start_backends(nursery, "alpha", "beta")
        _, bound = await start_node(nursery, config_text(pki, backends))
        port = bound.listeners["secure"][1]

        def curl() -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                ["curl", "-sS", "--http1.1", "--resolve", f"api.example.com:{port}:127.0.0.1", "--cacert", str(pki.ca),
                 "-H", "X-Forwarded-Port: 1", "-H", "X-Forwarded-Proto: gopher", "-w", "\n%{ssl_verify_result} %{http_version}",
                 f"https://api.example.com:{port}/echo"],
                capture_output=True, text=True, timeout=30)

        proc = await trio.to_thread.run_sync(curl)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.rstrip().endswith("0 1.1")
        seen = echo_headers(proc.stdout.encode())
        assert seen["x-forwarded-proto"] == "https" and seen["x-forwarded-port"] == str(port)
        nursery.cancel_scope.cancel()


async def test_h2load_over_tls_all_requests_succeed(pki: Pki) -> None:
    # h2load (nghttp2-client) as an independent TLS client: new connections negotiating
    # http/1.1 by ALPN (h2 is not offered yet), several requests each.
    async with trio.open_nursery() as nursery:
        backends = await start_backends(nursery, "alpha", "beta")
        _, bound = await start_node(nursery, config_text(pki, backends))
        port = bound.listeners["secure"][1]

        def h2load() -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                ["h2load", "--h1", "-n", "400", "-c", "8", f"--connect-to=127.0.0.1:{port}",
                 f"https://www.example.com:{port}/"],
                capture_output=True, text=True, timeout=60)

        proc = await trio.to_thread.run_sync(h2load)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "400 total, 400 started, 400 done, 400 succeeded, 0 failed, 0 errored" in proc.stdout, proc.stdout
        assert "Application protocol: http/1.1" in proc.stdout, proc.stdout
        assert "status codes: 400 2xx" in proc.stdout, proc.stdout
        nursery.cancel_scope.cancel()


async def test_new_certificate_reaches_new_handshakes_without_reload(pki: Pki) -> None:
    async with trio.open_nursery() as nursery:
        backends = await start_backends(nursery, "alpha", "beta")
        node, bound = await start_node(nursery, config_text(pki, backends))
        port = bound.listeners["secure"][1]
        ctx = client_context(pki.ca)

        def fingerprint_and_keep() -> tuple[bytes, SniConnection]:
            conn = SniConnection("www.example.com", port, ctx)
            conn.request("GET", "/")
            conn.getresponse().read()
            return conn.sock.getpeercert(binary_form=True), conn  # type: ignore[union-attr]

        before, open_conn = await trio.to_thread.run_sync(fingerprint_and_keep)
        # What a store follower does: the same listeners, a new certificate under the same name.
        node.apply(load_config_text(config_text(pki, backends, www=pki.www2)))
        after, other = await trio.to_thread.run_sync(fingerprint_and_keep)
        from cryptography import x509

        assert x509.load_der_x509_certificate(after) == x509.load_pem_x509_certificate(pki.www2[0].read_bytes())
        assert before != after
        # The connection opened before the change goes on (no reload, nothing cut).

        def again() -> int:
            open_conn.request("GET", "/")
            status = open_conn.getresponse().status
            open_conn.close()
            other.close()
            return status

        assert await trio.to_thread.run_sync(again) == 200
        nursery.cancel_scope.cancel()


async def test_certificate_expected_from_a_store_fails_handshakes_until_it_arrives(pki: Pki, caplog) -> None:
    async with trio.open_nursery() as nursery:
        backends = await start_backends(nursery, "alpha", "beta")
        # [control] means a store may bring certificates: a missing name is not a config error.
        control = '[control]\nbind = "127.0.0.1:0"\ninsecure = true\n'
        tls = '  [listeners.tls]\n  certificates = ["later"]\n'
        text = node_toml(pool_toml("web", [backends[0].address]), control, listener_toml("secure", "https", "web", extra=tls))
        node, bound = await start_node(nursery, text)
        port = bound.listeners["secure"][1]
        ctx = client_context(pki.ca)
        with pytest.raises(OSError):
            await trio.to_thread.run_sync(get, "www.example.com", port, ctx, "/")
        await trio.sleep(0.2)
        assert node.tls_terminators["secure"].failures == {"no_certificate": 1}
        assert "TLS handshake failed (no_certificate)" in caplog.text
        # The certificate arrives (what the store follower does): the next handshake works.
        added = f'[[certificates]]\nname = "later"\ncert = "{pki.www[0]}"\nkey = "{pki.www[1]}"\n'
        node.apply(load_config_text(text + added))
        status, _, _, names = await trio.to_thread.run_sync(get, "www.example.com", port, ctx, "/")
        assert status == 200 and names == ["www.example.com"]
        nursery.cancel_scope.cancel()


async def test_drain_closes_idle_tls_keepalive_connections(pki: Pki) -> None:
    async with trio.open_nursery() as nursery:
        backends = await start_backends(nursery, "alpha", "beta")
        node, bound = await start_node(nursery, config_text(pki, backends))
        port = bound.listeners["secure"][1]
        conn = SniConnection("www.example.com", port, client_context(pki.ca))

        def first() -> int:
            conn.request("GET", "/")
            return conn.getresponse().status

        assert await trio.to_thread.run_sync(first) == 200
        start = trio.current_time()
        node.stop()
        # The idle keep-alive connection is closed at once: the client reads EOF.
        assert await trio.to_thread.run_sync(lambda: conn.sock.recv(10)) == b""  # type: ignore[union-attr]
        assert trio.current_time() - start < 2.0  # well under drain_timeout (30 s): margin for load
        conn.close()
        nursery.cancel_scope.cancel()
