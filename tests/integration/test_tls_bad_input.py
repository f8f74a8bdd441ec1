"""Bad input on an https listener: each ends only its own connection, is counted per listener
(visible in /status), and a concurrent good client is served throughout."""

from __future__ import annotations

import json
import socket
import ssl
import struct
import subprocess
import time
import urllib.request
import warnings
from pathlib import Path

import pytest
import trio

from tests.conftest import listener_toml, node_toml, pool_toml, start_backends, start_node
from tests.tlsclient import client_context, get
from tests.tlsgen import make_ca, make_leaf

HANDSHAKE_TIMEOUT = 1.0


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    d = tmp_path_factory.mktemp("pki")
    ca = make_ca()
    (d / "ca.pem").write_bytes(ca.cert_pem)
    crt, key = make_leaf(ca, ["www.example.com"]).write(d, "www")
    return d / "ca.pem", crt, key


def client_hello(version: ssl.TLSVersion | None = None) -> bytes:
    """A real ClientHello made by OpenSSL (TLS 1.0-only when asked: @SECLEVEL=0 allows it)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    if version is not None:
        ctx.set_ciphers("ALL:@SECLEVEL=0")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            ctx.minimum_version = ctx.maximum_version = version
    inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(inc, out, server_hostname="www.example.com")
    try:
        obj.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return out.read()


def exchange(port: int, data: bytes, *, reset: bool = False, half_close: bool = False) -> tuple[bytes, float]:
    """Send ``data``; then read what the node answers until it closes. (bytes, seconds)."""
    start = time.monotonic()
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    try:
        s.sendall(data)
        if reset:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            return b"", 0.0
        if half_close:
            s.shutdown(socket.SHUT_WR)
        out = b""
        try:
            while chunk := s.recv(4096):
                out += chunk
        except ConnectionResetError:
            # The node closed with the client's unread bytes in its buffer: the kernel resets.
            out += b"<reset>"
        return out, time.monotonic() - start
    finally:
        s.close()


async def test_bad_clients_end_only_their_connection(pki) -> None:
    ca, crt, key = pki
    async with trio.open_nursery() as nursery:
        backends = await start_backends(nursery, "a")
        tls = f'  [listeners.tls]\n  certificates = ["www"]\n  handshake_timeout = "{HANDSHAKE_TIMEOUT}s"\n'
        node, bound = await start_node(nursery, node_toml(
            pool_toml("web", [backends[0].address]),
            f'[[certificates]]\nname = "www"\ncert = "{crt}"\nkey = "{key}"\n',
            listener_toml("secure", "https", "web", extra=tls),
        ))
        port = bound.listeners["secure"][1]
        good_ctx = client_context(ca)
        good_done = trio.Event()
        good_results: list[int] = []

        async def good_client() -> None:
            while not good_done.is_set():
                status = (await trio.to_thread.run_sync(get, "www.example.com", port, good_ctx, "/"))[0]
                good_results.append(status)
                await trio.sleep(0.05)

        hello = client_hello()
        results: dict[str, tuple[bytes, float]] = {}

        async def bad(name: str, data: bytes, mode: str = "") -> None:
            results[name] = await trio.to_thread.run_sync(
                lambda: exchange(port, data, reset=mode == "reset", half_close=mode == "half_close"))

        def tls10_s_client() -> str:
            proc = subprocess.run(
                ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-tls1", "-cipher", "DEFAULT:@SECLEVEL=0",
                 "-servername", "www.example.com"],
                stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30)
            return proc.stdout + proc.stderr

        s_client_out: list[str] = []

        async def tls10() -> None:
            s_client_out.append(await trio.to_thread.run_sync(tls10_s_client))

        async with trio.open_nursery() as clients:
            clients.start_soon(good_client)
            async with trio.open_nursery() as bads:
                bads.start_soon(bad, "garbage", b"\xde\xad\xbe\xef" * 75)  # fixed: random bytes could pass for SSLv2
                bads.start_soon(bad, "plain_http", b"GET / HTTP/1.1\r\nHost: www.example.com\r\n\r\n")
                bads.start_soon(bad, "tls10_crafted", client_hello(ssl.TLSVersion.TLSv1))
                bads.start_soon(tls10)
                bads.start_soon(bad, "stall", hello[:40])
                # A record announced longer than what comes, then the client's FIN.
                bads.start_soon(bad, "truncated", hello[:5] + hello[5:60], "half_close")
                bads.start_soon(bad, "reset", hello[:60], "reset")
            good_done.set()

        assert good_results and set(good_results) == {200}, good_results
        # Nothing, an alert (0x15) or a reset: the connection is over, nothing else was said.
        assert results["garbage"][0][:1] in (b"", b"\x15", b"<")
        assert results["plain_http"][0][:1] in (b"", b"\x15", b"<")
        assert results["tls10_crafted"][0][:1] == b"\x15"  # a protocol_version alert
        assert "alert protocol version" in s_client_out[0] or "unsupported protocol" in s_client_out[0].lower() or \
            "wrong version" in s_client_out[0].lower(), s_client_out[0][-1500:]
        stall_data, stall_time = results["stall"]
        assert stall_data == b""
        # Closed at the handshake timeout (1 s), margin 2 s for a loaded machine.
        assert HANDSHAKE_TIMEOUT - 0.1 <= stall_time < HANDSHAKE_TIMEOUT + 2.0
        assert results["truncated"][0][:1] in (b"", b"\x15")  # closed, perhaps with an alert
        await trio.sleep(0.3)  # the node notices the reset

        tls_status = node.tls_terminators["secure"].status()
        failures = tls_status["failures"]
        assert failures["not_tls"] == 2, failures  # garbage, plain HTTP
        assert failures["version"] == 2, failures  # crafted TLS 1.0 hello, openssl s_client -tls1
        assert failures["timeout"] == 1, failures
        assert failures.get("eof", 0) + failures.get("reset", 0) == 2, failures  # truncated record, reset
        assert tls_status["in_progress"] == 0

        admin = bound.admin
        doc = await trio.to_thread.run_sync(
            lambda: json.loads(urllib.request.urlopen(f"http://127.0.0.1:{admin[1]}/status", timeout=10).read()))
        assert doc["listeners"]["secure"]["protocol"] == "https"
        assert doc["listeners"]["secure"]["tls"]["failures"] == failures
        assert doc["listeners"]["secure"]["tls"]["handshakes"] == len(good_results)
        nursery.cancel_scope.cancel()


async def test_unknown_sni_gets_the_default_certificate_from_openssl(pki) -> None:
    ca, crt, key = pki
    async with trio.open_nursery() as nursery:
        backends = await start_backends(nursery, "a")
        _, bound = await start_node(nursery, node_toml(
            pool_toml("web", [backends[0].address]),
            f'[[certificates]]\nname = "www"\ncert = "{crt}"\nkey = "{key}"\n',
            listener_toml("secure", "https", "web", extra='  [listeners.tls]\n  certificates = ["www"]\n'),
        ))
        port = bound.listeners["secure"][1]
        proc = await trio.to_thread.run_sync(lambda: subprocess.run(
            ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-servername", "unknown.test", "-CAfile", str(ca)],
            stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30))
        assert "subject=CN = www.example.com" in proc.stdout
        assert "Verify return code: 0 (ok)" in proc.stdout  # the chain is fine; the name is the client's business
        nursery.cancel_scope.cancel()
