"""bench.opcount's clients against a real loopback server: the new-connection client opens one
connection per exchange, says Connection: close, and reads until the server closes."""

from __future__ import annotations

import dataclasses
import socket
import threading

from bench.configs import HOST, Ports
from bench.opcount import Client, NewConnectionClient, client_for

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
