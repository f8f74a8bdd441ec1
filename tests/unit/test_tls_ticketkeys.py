"""Session ticket keys set through ctypes (lbnode.tls.ticketkeys): two server contexts with the
same key resume each other's sessions, over real sockets, in TLS 1.3 and 1.2; a context with
another key does not; the layout check refuses a pointer that is not the context's."""

from __future__ import annotations

import os
import socket
import ssl
import threading
from pathlib import Path

import pytest

from lbnode.tls import ticketkeys
from lbnode.tls.ticketkeys import TICKET_KEY_BYTES, Unsupported, set_ticket_key
from tests.tlsgen import make_ca, make_leaf

NAME = "www.example.com"


def _server(ctx: ssl.SSLContext) -> tuple[int, threading.Thread]:
    """A TLS server on a free loopback port answering one connection: reads a line, writes 'ok'."""
    listener = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        with listener:
            raw, _ = listener.accept()
            with ctx.wrap_socket(raw, server_side=True) as tls:
                tls.recv(100)
                tls.sendall(b"ok")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return listener.getsockname()[1], thread


def _connect(client: ssl.SSLContext, server: ssl.SSLContext, session: ssl.SSLSession | None = None) -> tuple[ssl.SSLSession, bool]:
    port, thread = _server(server)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        with client.wrap_socket(raw, server_hostname=NAME, session=session) as tls:
            tls.sendall(b"hi\n")
            assert tls.recv(100) == b"ok"  # (a TLS 1.3 client has its tickets once it read data)
            got, reused = tls.session, tls.session_reused
    thread.join(5)
    assert got is not None
    return got, reused


@pytest.fixture(scope="module")
def directory(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """www.crt and www.key for NAME, and ca.pem that issued them."""
    ca = make_ca()
    directory = tmp_path_factory.mktemp("ticketkeys")
    make_leaf(ca, [NAME]).write(directory, "www")
    (directory / "ca.pem").write_bytes(ca.cert_pem)
    return directory


def _servers(directory: Path, *keys: bytes | None) -> list[ssl.SSLContext]:
    """A server context per key (None: OpenSSL's own keys)."""
    out = []
    for key in keys:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(directory / "www.crt", directory / "www.key")
        if key is not None:
            set_ticket_key(ctx, key)
        out.append(ctx)
    return out


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_3, ssl.TLSVersion.TLSv1_2])
def test_contexts_with_one_key_resume_each_others_sessions(directory: Path, version: ssl.TLSVersion) -> None:
    assert ticketkeys.unsupported() is None
    shared = os.urandom(TICKET_KEY_BYTES)
    a, b, other, own = _servers(directory, shared, shared, os.urandom(TICKET_KEY_BYTES), None)
    client = ssl.create_default_context(cafile=str(directory / "ca.pem"))
    client.maximum_version = version
    session, reused = _connect(client, a)
    assert not reused
    assert _connect(client, b, session)[1]  # another context (node, worker) with the same key
    assert _connect(client, a, session)[1]
    assert not _connect(client, other, session)[1]  # another key: a full handshake, no error
    assert not _connect(client, own, session)[1]  # OpenSSL's own keys


def test_a_key_of_another_size_is_refused() -> None:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    with pytest.raises(ValueError, match="80 bytes, not 32"):
        set_ticket_key(ctx, b"k" * 32)


def test_a_pointer_that_is_not_the_contexts_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """The check before each use: an SSL_CTX whose options are not the context's is not written."""
    real = ticketkeys._pointer
    other = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    other.options |= ssl.OP_NO_TICKET  # its options differ from ctx's
    monkeypatch.setattr(ticketkeys, "_pointer", lambda ctx: real(other))
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    with pytest.raises(Unsupported, match="did not match its options"):
        set_ticket_key(ctx, os.urandom(TICKET_KEY_BYTES))
