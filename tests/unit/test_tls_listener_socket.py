"""lbnode.tls.context.ListenerSocket: the accepted connection's SSLSocket with direct recv, send
and pending behaves as the stdlib's on a real TLS connection (socket pair, real handshake);
``wrap_accepted`` makes the same object as ``wrap_socket`` for an accepted TCP connection."""

from __future__ import annotations

import errno
import select
import socket
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from lbnode.model import ListenerTls
from lbnode.tls.certs import load_certificate
from lbnode.tls.context import ListenerSocket, certificate_context, listener_context, wrap_accepted
from tests.tlsgen import make_ca, make_leaf


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[tuple[ssl.SSLSocket, ssl.SSLSocket, socket.socket]]:
    """(server side over ListenerSocket, client side, the client's raw socket) after a handshake."""
    leaf = make_leaf(make_ca(), ["www.test"])
    settings = ListenerTls(certificates=("www",))
    server_ctx = listener_context(settings, ("http/1.1",))
    chosen = certificate_context((load_certificate("www", leaf.cert_pem, leaf.key_pem),), settings, ("http/1.1",))

    def switch(sock: ssl.SSLObject, _name: str | None, _ctx: ssl.SSLContext) -> None:
        sock.context = chosen

    server_ctx.sni_callback = switch
    client_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client_ctx.check_hostname, client_ctx.verify_mode = False, ssl.CERT_NONE
    a, b = socket.socketpair()
    server = server_ctx.wrap_socket(a, server_side=True, do_handshake_on_connect=False)
    client = client_ctx.wrap_socket(b, server_hostname="www.test", do_handshake_on_connect=False)
    t = threading.Thread(target=client.do_handshake)
    t.start()
    server.do_handshake()
    t.join()
    server.setblocking(False)
    yield server, client, b
    server.close()
    client.close()


def test_listener_context_wraps_in_listener_socket(pair: tuple[ssl.SSLSocket, ssl.SSLSocket, socket.socket]) -> None:
    server, _, _ = pair
    assert type(server) is ListenerSocket


def test_recv_send_pending_and_want_read(pair: tuple[ssl.SSLSocket, ssl.SSLSocket, socket.socket]) -> None:
    server, client, _ = pair
    with pytest.raises(ssl.SSLWantReadError):
        server.recv(100)  # nothing sent yet: OpenSSL's want-read, as the stdlib raises it
    assert server.pending() == 0
    client.sendall(b"GET / HTTP/1.1\r\n\r\n")
    client.sendall(b"x" * 50)  # a second record
    got = b""
    while len(got) < 18 + 50:
        try:
            got += server.recv(10)  # a part of a record: the rest is pending in OpenSSL
        except ssl.SSLWantReadError:
            continue
        if len(got) == 10:
            assert server.pending() == 8
    assert got == b"GET / HTTP/1.1\r\n\r\n" + b"x" * 50
    assert server.send(b"HTTP/1.1 200 OK\r\n\r\n") == 19
    assert client.recv(100) == b"HTTP/1.1 200 OK\r\n\r\n"


def test_a_tcp_end_without_close_notify_reads_as_eof(
    pair: tuple[ssl.SSLSocket, ssl.SSLSocket, socket.socket],
) -> None:
    server, client, _ = pair
    client.shutdown(socket.SHUT_WR)  # SSLSocket.shutdown: a FIN, no close_notify (a "ragged" EOF)
    while True:
        try:
            assert server.recv(100) == b""
            break
        except ssl.SSLWantReadError:
            continue


def test_flags_and_unwrapped_sockets_take_the_stdlib_path(
    pair: tuple[ssl.SSLSocket, ssl.SSLSocket, socket.socket],
) -> None:
    server, _, _ = pair
    with pytest.raises(ValueError, match="non-zero flags"):
        server.recv(10, socket.MSG_PEEK)
    with pytest.raises(ValueError, match="non-zero flags"):
        server.send(b"x", socket.MSG_DONTWAIT)


def _contexts(alpn: tuple[str, ...] = ("h2", "http/1.1")) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """(a listener context switching to a www.test certificate by SNI, a client context)."""
    leaf = make_leaf(make_ca(), ["www.test"])
    settings = ListenerTls(certificates=("www",))
    server_ctx = listener_context(settings, alpn)
    chosen = certificate_context((load_certificate("www", leaf.cert_pem, leaf.key_pem),), settings, alpn)

    def switch(sock: ssl.SSLObject, _name: str | None, _ctx: ssl.SSLContext) -> None:
        sock.context = chosen

    server_ctx.sni_callback = switch
    client_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client_ctx.check_hostname, client_ctx.verify_mode = False, ssl.CERT_NONE
    client_ctx.set_alpn_protocols(["h2"])
    return server_ctx, client_ctx


def _accepted() -> tuple[socket.socket, socket.socket]:
    """(an accepted non-blocking TCP socket, its client), as the accept loop hands it over."""
    with socket.create_server(("127.0.0.1", 0)) as lsock:
        client = socket.create_connection(lsock.getsockname())
        conn, _ = lsock.accept()
    conn.setblocking(False)
    return conn, client


def test_wrap_accepted_is_the_stdlibs_wrap_socket_for_a_connected_socket() -> None:
    server_ctx, _ = _contexts()
    conn, client = _accepted()
    conn2, client2 = _accepted()
    try:
        fd = conn.fileno()
        ours = wrap_accepted(server_ctx, conn)
        stdlib = server_ctx.wrap_socket(conn2, server_side=True, do_handshake_on_connect=False)
        assert type(ours) is type(stdlib) is ListenerSocket
        assert conn.fileno() == -1 and ours.fileno() == fd  # the descriptor moved over
        assert (ours.family, ours.type, ours.proto) == (stdlib.family, stdlib.type, stdlib.proto)
        assert ours.gettimeout() == stdlib.gettimeout() == 0.0
        assert ours.context is stdlib.context is server_ctx
        # Every attribute the stdlib sets on its instance has the same value on ours (there,
        # most are ListenerSocket's class defaults).
        plain = {k: v for k, v in vars(stdlib).items() if k != "_sslobj"}
        assert set(plain) >= {"_context", "_session", "_closed", "_io_refs", "_connected", "server_side",
                              "server_hostname", "do_handshake_on_connect", "suppress_ragged_eofs"}
        assert {k: getattr(ours, k) for k in plain} == plain
        assert ours._sslobj is not None and ours._sslobj.server_side  # type: ignore[attr-defined]
    finally:
        for s in (client, client2):
            s.close()


def test_a_wrapped_accepted_socket_handshakes_without_blocking_and_reports_alpn() -> None:
    server_ctx, client_ctx = _contexts()
    conn, raw = _accepted()
    server = wrap_accepted(server_ctx, conn)
    with pytest.raises(ssl.SSLWantReadError):
        server.do_handshake()  # no ClientHello yet: want-read, never a blocking wait
    client = client_ctx.wrap_socket(raw, server_hostname="www.test", do_handshake_on_connect=False)
    t = threading.Thread(target=client.do_handshake)
    t.start()
    while True:
        try:
            server.do_handshake()
            break
        except ssl.SSLWantReadError:
            select.select([server], [], [], 5)
    t.join()
    assert server.selected_alpn_protocol() == "h2" == client.selected_alpn_protocol()
    assert server.version() == "TLSv1.3" and not server.session_reused
    client.sendall(b"ping")
    select.select([server], [], [], 5)
    assert server.recv(10) == b"ping"
    server.close()
    assert server.selected_alpn_protocol() is None
    client.close()


def test_a_socket_that_is_not_connected_takes_the_stdlib_path() -> None:
    """getpeername fails (a client that reset before the handshake): the stdlib's wrap_socket,
    its checks and errors (ENOTCONN on the handshake)."""
    server_ctx, _ = _contexts()
    sock = socket.socket()
    sock.setblocking(False)
    tls = wrap_accepted(server_ctx, sock)
    with pytest.raises(OSError) as info:
        tls.do_handshake()
    assert info.value.errno == errno.ENOTCONN
    tls.close()
