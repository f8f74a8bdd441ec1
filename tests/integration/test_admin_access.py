"""[admin] token_file and client certificates on a real node's admin endpoint, with real clients."""

from __future__ import annotations

import socket
import ssl
from pathlib import Path

import pytest
import trio

from lbnode.config import ConfigFileError, load_config_text
from tests.conftest import (
    listener_toml,
    node_toml,
    pool_toml,
    raw_exchange,
    start_backends,
    start_node,
)
from tests.tlsgen import make_ca, make_leaf

TOKEN = "9f2c4e6a8b0d1f3e5a7c9b1d3f5e7a9c"  # 32 hex characters, as `openssl rand -hex 16` prints


def status_line(response: bytes) -> bytes:
    return response.split(b"\r\n", 1)[0]


async def start_with(nursery, admin_table: str) -> int:  # type: ignore[no-untyped-def]
    (a,) = await start_backends(nursery, "a")
    _, bound = await start_node(nursery, node_toml(
        listener_toml("front", "http", "web"), pool_toml("web", [a.address]), admin_table))
    return bound.admin[1]


def get(path: str, authorization: str | None = None) -> bytes:
    auth = f"Authorization: {authorization}\r\n" if authorization is not None else ""
    return f"GET {path} HTTP/1.1\r\nHost: x\r\n{auth}\r\n".encode()


async def test_token_is_required_everywhere_but_healthz(nursery, tmp_path: Path):
    (tmp_path / "admin.token").write_text(TOKEN + "\n")  # a trailing newline, as `echo` writes it
    admin = await start_with(nursery, f'[admin]\ntoken_file = "{tmp_path / "admin.token"}"\n')
    for path in ("/status", "/metrics", "/", "/status/page.json", "/static/status.js", "/nope"):
        none = await raw_exchange(admin, get(path))
        assert status_line(none) == b"HTTP/1.1 401 Unauthorized", path
        assert b'\r\nWWW-Authenticate: Bearer realm="fulcrum-admin"\r\n' in none
        wrong = await raw_exchange(admin, get(path, "Bearer " + TOKEN[:-1] + "0"))
        assert status_line(wrong) == b"HTTP/1.1 401 Unauthorized", path
        assert b'error="invalid_token"' in wrong
    for bad in ("Basic " + TOKEN, TOKEN, "Bearer", "Bearer " + TOKEN + "0", "Bearer " + TOKEN[:16]):
        assert status_line(await raw_exchange(admin, get("/status", bad))) == b"HTTP/1.1 401 Unauthorized", bad
    for path in ("/status", "/metrics", "/", "/status/page.json"):
        right = await raw_exchange(admin, get(path, "Bearer " + TOKEN))
        assert status_line(right) == b"HTTP/1.1 200 OK", path
    assert status_line(await raw_exchange(admin, get("/status", "bearer " + TOKEN))) == b"HTTP/1.1 200 OK"
    assert status_line(await raw_exchange(admin, get("/nope", "Bearer " + TOKEN))) == b"HTTP/1.1 404 Not Found"
    healthz = await raw_exchange(admin, get("/healthz"))
    assert status_line(healthz) == b"HTTP/1.1 200 OK" and healthz.endswith(b"ok\n")


@pytest.fixture
def pki(tmp_path: Path) -> dict[str, Path]:
    ca, other_ca = make_ca("Admin CA"), make_ca("Some other CA")
    paths: dict[str, Path] = {}
    paths["cert"], paths["key"] = make_leaf(ca, ["localhost"]).write(tmp_path, "server")
    paths["client"], paths["client_key"] = make_leaf(ca, [], cn="operator", client=True).write(tmp_path, "client")
    paths["stranger"], paths["stranger_key"] = make_leaf(other_ca, [], cn="stranger", client=True).write(tmp_path, "x")
    (tmp_path / "ca.crt").write_bytes(ca.cert_pem)
    paths["ca"] = tmp_path / "ca.crt"
    return paths


def tls_get(port: int, ca: Path, path: str, cert: tuple[Path, Path] | None = None) -> bytes:
    """One request over TLS (blocking: call it from a worker thread)."""
    ctx = ssl.create_default_context(cafile=str(ca))
    if cert is not None:
        ctx.load_cert_chain(*cert)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
            ctx.wrap_socket(raw, server_hostname="localhost") as s:
        s.sendall(get(path))
        out = b""
        while chunk := s.recv(65536):
            out += chunk
        return out


async def test_client_certificate_is_required_everywhere_but_healthz(nursery, pki):
    admin = await start_with(nursery, f'[admin]\ncert = "{pki["cert"]}"\nkey = "{pki["key"]}"\nclient_ca = "{pki["ca"]}"\n')

    def run(path: str, cert: tuple[Path, Path] | None = None) -> bytes:
        return tls_get(admin, pki["ca"], path, cert)

    operator = (pki["client"], pki["client_key"])
    for path in ("/status", "/metrics", "/"):
        assert status_line(await trio.to_thread.run_sync(run, path, operator)) == b"HTTP/1.1 200 OK", path
        # no certificate: the handshake completes (so /healthz stays open), the request is refused
        refused = await trio.to_thread.run_sync(run, path)
        assert status_line(refused) == b"HTTP/1.1 403 Forbidden" and b"client certificate" in refused
    assert status_line(await trio.to_thread.run_sync(run, "/healthz")) == b"HTTP/1.1 200 OK"
    # a certificate another CA signed fails the handshake itself (TLS 1.3: at the first read)
    with pytest.raises((ssl.SSLError, ConnectionResetError)):
        await trio.to_thread.run_sync(run, "/healthz", (pki["stranger"], pki["stranger_key"]))
    # plain HTTP to a TLS endpoint gets no HTTP answer (OpenSSL's alert, then a reset or a close)
    try:
        plain = await raw_exchange(admin, get("/healthz"))
    except trio.BrokenResourceError:
        plain = b""
    assert b"HTTP/1.1" not in plain


async def test_token_and_client_certificate_together(nursery, pki, tmp_path: Path):
    (tmp_path / "t").write_text(TOKEN)
    admin = await start_with(nursery, f'[admin]\ntoken_file = "{tmp_path / "t"}"\ncert = "{pki["cert"]}"\n'
                                      f'key = "{pki["key"]}"\nclient_ca = "{pki["ca"]}"\n')
    operator = (pki["client"], pki["client_key"])
    # the certificate alone is not enough: the token is asked too
    no_token = await trio.to_thread.run_sync(tls_get, admin, pki["ca"], "/status", operator)
    assert status_line(no_token) == b"HTTP/1.1 401 Unauthorized"


@pytest.mark.parametrize(("admin_table", "expected"), [
    ('token_file = "{d}/missing"', 'admin.token_file: {d}/missing: no such file'),
    ('token_file = "{d}/short"', "admin.token_file: {d}/short: the token has 5 characters, at least 16"),
    ('token_file = "{d}/spaced"', "admin.token_file: {d}/spaced: the token must be one word"),
    ('cert = "{d}/x.crt"', "admin.key: is required: cert and key go together"),
    ('client_ca = "{d}/ca.crt"', "admin.client_ca: client certificates need TLS"),
    ('cert = "{d}/missing.crt"\nkey = "{d}/missing.key"', "admin.cert: {d}/missing.crt: no such file"),
    ('tokenfile = "x"', "admin.tokenfile: unknown key"),
])
def test_bad_admin_settings_are_one_line_naming_the_key(tmp_path: Path, admin_table: str, expected: str):
    (tmp_path / "short").write_text("abcde\n")
    (tmp_path / "spaced").write_text("two words that are long enough\n")
    text = node_toml(pool_toml("web", ["127.0.0.1:1"])) + "[admin]\n" + admin_table.format(d=tmp_path) + "\n"
    with pytest.raises(ConfigFileError) as err:
        load_config_text(text, "node.toml")
    assert str(err.value).startswith("node.toml: " + expected.format(d=tmp_path)), str(err.value)
    assert "\n" not in str(err.value)


def test_admin_table_without_an_admin_endpoint_is_refused(tmp_path: Path):
    (tmp_path / "t").write_text(TOKEN)
    text = node_toml(pool_toml("web", ["127.0.0.1:1"]), admin=None) + f'[admin]\ntoken_file = "{tmp_path / "t"}"\n'
    with pytest.raises(ConfigFileError, match=r"^node.toml: admin: node.admin is not set"):
        load_config_text(text, "node.toml")
