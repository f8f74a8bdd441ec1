"""lbnode.tls.context.ListenerSocket: the accepted connection's SSLSocket with direct recv, send
and pending behaves as the stdlib's on a real TLS connection (socket pair, real handshake)."""

from __future__ import annotations

import socket
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from lbnode.model import ListenerTls
from lbnode.tls.certs import load_certificate
from lbnode.tls.context import ListenerSocket, certificate_context, listener_context
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
