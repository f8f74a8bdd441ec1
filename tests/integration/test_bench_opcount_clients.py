"""bench.opcount's clients against a real loopback server: the new-connection client opens one
connection per exchange, says Connection: close, and reads until the server closes; the
tls-new one does the same over a new TLS connection (full handshake) each time."""

from __future__ import annotations

import dataclasses
import socket
import ssl
import threading
from pathlib import Path

from bench.configs import HOST, Ports
from bench.opcount import Client, NewConnectionClient, NewTlsClient, client_for
from bench.tls import _certificate

RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"


def _server(close: bool) -> tuple[socket.socket, list[bytes], list[int]]:
    """Answers every request with RESPONSE; closes after each when ``close``. Records the
    requests, and the connection each came on (its number)."""
    lsock = socket.create_server((HOST, 0))
    heads: list[bytes] = []
    conns: list[int] = []

    def run() -> None:
        while True:
            try:
                conn, _ = lsock.accept()
            except OSError:
                return
            n = len(set(conns)) + 1
            with conn:
                while True:
                    data = conn.recv(65536)
                    if not data:
                        break
                    heads.append(data)  # each request comes in one piece on loopback
                    conns.append(n)
                    conn.sendall(RESPONSE)
                    if close:
                        break

    threading.Thread(target=run, daemon=True).start()
    return lsock, heads, conns


def _ports(web: int, bulk: int) -> Ports:
    fields = {f.name: 0 for f in dataclasses.fields(Ports)}
    fields.update(fulcrum_web=web, fulcrum_bulk=bulk, backends=[])
    return Ports(**fields)  # type: ignore[arg-type]


def test_close_and_l4_clients_open_a_connection_per_exchange_and_wait_for_the_close() -> None:
    web, web_heads, web_conns = _server(close=True)
    bulk, bulk_heads, bulk_conns = _server(close=True)
    try:
        ports = _ports(web.getsockname()[1], bulk.getsockname()[1])
        for mode, heads, conns in (("close", web_heads, web_conns), ("l4", bulk_heads, bulk_conns)):
            client = client_for(mode, ports)
            assert isinstance(client, NewConnectionClient)
            for _ in range(3):
                client.one()  # returns only once the server has closed (else it would hang)
            assert conns == [1, 2, 3]  # one connection each
            assert all(b"\r\nConnection: close\r\n" in h for h in heads)
    finally:
        web.close()
        bulk.close()


def test_keepalive_client_sends_every_request_on_one_connection() -> None:
    web, heads, conns = _server(close=False)
    try:
        client = client_for("keepalive", _ports(web.getsockname()[1], 0))
        assert isinstance(client, Client)
        for _ in range(3):
            client.one()
        client.close()
        assert conns == [1, 1, 1]
        assert not any(b"Connection: close" in h for h in heads)
    finally:
        web.close()


def test_tls_new_client_makes_a_full_handshake_per_exchange_with_sni_host_and_close(tmp_path: Path) -> None:
    """A real TLS server (the bench's certificate): each exchange is a new connection, a full
    handshake (the server sees no resumed session although it issues tickets), SNI bench.test,
    Host bench.test and Connection: close; the client returns only once the server closed."""
    cert, key, _ = _certificate(tmp_path)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    names: list[str | None] = []
    ctx.sni_callback = lambda sslobj, name, _ctx: names.append(name)  # type: ignore[func-returns-value]
    lsock = socket.create_server((HOST, 0))
    heads: list[bytes] = []
    reused: list[bool] = []

    def run() -> None:
        while True:
            try:
                raw, _ = lsock.accept()
            except OSError:
                return
            with ctx.wrap_socket(raw, server_side=True) as conn:
                heads.append(conn.recv(65536))
                reused.append(conn.session_reused)
                conn.sendall(RESPONSE)

    threading.Thread(target=run, daemon=True).start()
    try:
        client = client_for("tls-new", _ports(lsock.getsockname()[1], 0))
        assert isinstance(client, NewTlsClient)
        for _ in range(3):
            client.one()
        assert reused == [False, False, False]
        assert names == ["bench.test"] * 3
        assert all(h.startswith(b"GET /small HTTP/1.1\r\n") and b"\r\nHost: bench.test\r\n" in h
                   and b"\r\nConnection: close\r\n" in h for h in heads)
    finally:
        lsock.close()
