"""bench/tls.py's pure parts: the configs it gives lbnode and HAProxy."""

from __future__ import annotations

from pathlib import Path

from bench.tls import _certificate, fulcrum_tls_config, haproxy_tls_config
from lbnode.config import load_config_text


def test_configs(tmp_path: Path) -> None:
    cert, key, pem = _certificate(tmp_path)
    config = load_config_text(fulcrum_tls_config([9001, 9002], 8443, 8444, cert, key, 8445))
    assert [li.protocol for li in config.listeners] == ["https", "tls"]
    assert config.certificates[0].key_type == "ECDSA P-256"
    assert (pem.stat().st_mode & 0o777) == 0o600
    text = haproxy_tls_config([9001, 9002], 8443, pem, 8445)
    assert f"bind 127.0.0.1:8443 ssl crt {pem} alpn http/1.1" in text and "nbthread 1" in text
    assert f"bind 127.0.0.1:8445 ssl crt {pem}\n" in text


def test_s_time_request_is_one_http10_request_with_a_host() -> None:
    # openssl s_time -www PATH sends "GET PATH HTTP/1.0\r\n\r\n"; without a Host line nginx
    # answered 400 to the head lbnode forwards and closed the backend connection each time.
    from bench.tls import S_TIME_REQUEST
    from lbnode.http.framing import RequestReader
    from lbnode.http.headers import RequestHead

    reader = RequestReader(8192)
    reader.feed(f"GET {S_TIME_REQUEST} HTTP/1.0\r\n\r\n".encode())
    head = reader.events.popleft()
    assert isinstance(head, RequestHead)
    assert (head.method, head.target, head.version) == (b"GET", b"/small", "1.0")
    assert (b"Host", b"bench.test") in head.headers
    assert len(reader.events) == 1  # the End of a body-less request, nothing after it


def test_s_time_status_is_the_status_line_of_the_answer(tmp_path: Path) -> None:
    # A real TLS server on loopback answering what nginx answered lbnode before the Host fix.
    import socket
    import ssl
    import threading

    from bench.tls import S_TIME_REQUEST, s_time_status

    cert, key, _ = _certificate(tmp_path)
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(cert, key)
    listener = socket.create_server(("127.0.0.1", 0))
    got: list[bytes] = []

    def serve() -> None:
        conn, _ = listener.accept()
        with server_ctx.wrap_socket(conn, server_side=True) as tls:
            data = b""
            while b"\r\n\r\n" not in data:
                data += tls.recv(4096)
            got.append(data)
            tls.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")

    t = threading.Thread(target=serve)
    t.start()
    try:
        assert s_time_status(listener.getsockname()[1]) == b"HTTP/1.1 400 Bad Request"
    finally:
        t.join(5)
        listener.close()
    assert got == [f"GET {S_TIME_REQUEST} HTTP/1.0\r\n\r\n".encode()]
