"""TLS passthrough with SNI routing on a tcp listener: real TLS backends, real clients (curl, openssl, ssl)."""

from __future__ import annotations

import hashlib
import os
import socket
import ssl
import time
from pathlib import Path

import pytest
import trio

from tests.conftest import listener_toml, node_toml, pool_toml, start_backends, start_node
from tests.tlsutil import Ca, TlsBackend, make_ca, start_tls_backend
from tests.unit.test_clienthello import HELLO, reframe

NAMES = {"a": ["a.example.com"], "b": ["b.example.com"], "wild": ["*.wild.example.com"], "dflt": ["other.test"]}


async def tls_setup(nursery: trio.Nursery, tmp_path: Path, listener_extra: str = "", **listener: object
                    ) -> tuple[Ca, dict[str, TlsBackend], int, object]:
    ca = make_ca(tmp_path, "backends")
    backends = {
        name: await start_tls_backend(nursery, name, ca.issue(tmp_path, name, names)) for name, names in NAMES.items()
    }
    routes = (
        '[[listeners.sni_routes]]\nserver_name = "a.example.com"\npool = "a"\n'
        '[[listeners.sni_routes]]\nserver_name = "B.Example.com"\npool = "b"\n'
        '[[listeners.sni_routes]]\nserver_name = "*.wild.example.com"\npool = "wild"\n'
    )
    toml = node_toml(
        listener_toml("edge", "tcp", "dflt", extra=routes + listener_extra, **listener),
        *(pool_toml(name, [b.address]) for name, b in backends.items()),
    )
    node, bound = await start_node(nursery, toml)
    return ca, backends, bound.listeners["edge"][1], node


async def curl(port: int, name: str, ca: Path) -> str:
    result = await trio.run_process(
        ["curl", "-sS", "--max-time", "10", "--resolve", f"{name}:{port}:127.0.0.1", "--cacert", str(ca),
         f"https://{name}:{port}/"],
        capture_stdout=True, capture_stderr=True, check=False,
    )
    assert result.returncode == 0, result.stderr.decode()
    return result.stdout.decode()


async def test_each_server_name_reaches_its_pool_with_curl(nursery: trio.Nursery, tmp_path: Path) -> None:
    ca, backends, port, _ = await tls_setup(nursery, tmp_path)
    assert await curl(port, "a.example.com", ca.path) == "a"
    assert await curl(port, "b.example.com", ca.path) == "b"  # route written in mixed case
    assert await curl(port, "x.wild.example.com", ca.path) == "wild"
    # An unknown name goes to the listener's pool.
    assert await curl(port, "other.test", ca.path) == "dflt"
    # The backend itself saw the client's SNI: the handshake is theirs, not ours.
    assert backends["a"].stats.server_names == ["a.example.com"]
    assert backends["wild"].stats.server_names == ["x.wild.example.com"]


async def test_openssl_s_client_with_servername(nursery: trio.Nursery, tmp_path: Path) -> None:
    ca, _, port, _ = await tls_setup(nursery, tmp_path)
    result = await trio.run_process(
        ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-servername", "b.example.com",
         "-CAfile", str(ca.path), "-verify_return_error", "-verify_hostname", "b.example.com", "-quiet"],
        stdin=b"GET / HTTP/1.1\r\nHost: b.example.com\r\nConnection: close\r\n\r\n",
        capture_stdout=True, capture_stderr=True, check=False,
    )
    assert result.returncode == 0, result.stderr.decode()
    assert b"X-Backend: b\r\n" in result.stdout and result.stdout.endswith(b"\r\n\r\nb")


def split_hello_request(port: int, server_name: str, cafile: Path, record_size: int | None) -> bytes:
    """A TLS client whose ClientHello leaves in 1-byte TCP segments (optionally re-cut into
    TLS records of ``record_size`` bytes first); then one request, the whole answer back."""
    ctx = ssl.create_default_context(cafile=str(cafile))
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ctx.wrap_bio(incoming, outgoing, server_hostname=server_name)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        first = True
        while True:
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                data = outgoing.read()
                if first:
                    first = False
                    if record_size is not None:
                        data = reframe(data, record_size)
                    for i in range(len(data)):
                        sock.send(data[i : i + 1])
                        time.sleep(0.001)  # each byte its own segment (TCP_NODELAY, no coalescing)
                elif data:
                    sock.sendall(data)
                chunk = sock.recv(65536)
                assert chunk, "closed during the handshake"
                incoming.write(chunk)
        sock.sendall(outgoing.read())
        tls.write(f"GET / HTTP/1.1\r\nHost: {server_name}\r\nConnection: close\r\n\r\n".encode())
        sock.sendall(outgoing.read())
        out = bytearray()
        while True:
            try:
                data = tls.read(65536)
                if not data:
                    break  # close_notify
                out += data
            except ssl.SSLWantReadError:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                incoming.write(chunk)
            except ssl.SSLZeroReturnError:
                break
        return bytes(out)


@pytest.mark.parametrize("record_size", [None, 7], ids=["one-record", "7-byte-records"])
async def test_client_hello_in_one_byte_segments(nursery: trio.Nursery, tmp_path: Path, record_size: int | None) -> None:
    ca, backends, port, _ = await tls_setup(nursery, tmp_path)
    answer = await trio.to_thread.run_sync(split_hello_request, port, "b.example.com", ca.path, record_size)
    assert answer.startswith(b"HTTP/1.1 200 OK") and answer.endswith(b"\r\n\r\nb")
    assert backends["b"].stats.handshakes == 1 and backends["a"].stats.handshakes == 0


async def test_bytes_intact_end_to_end(nursery: trio.Nursery, tmp_path: Path) -> None:
    ca, _, port, _ = await tls_setup(nursery, tmp_path)
    payload = os.urandom(3 * 1024 * 1024)

    def exchange() -> bytes:
        ctx = ssl.create_default_context(cafile=str(ca.path))
        with socket.create_connection(("127.0.0.1", port), timeout=20) as raw, \
                ctx.wrap_socket(raw, server_hostname="a.example.com") as tls:
            tls.sendall(b"ECHO\n")
            received = bytearray()
            for i in range(0, len(payload), 256 * 1024):
                tls.sendall(payload[i : i + 256 * 1024])
                while len(received) < i + min(256 * 1024, len(payload) - i):
                    received += tls.recv(1 << 20)
            return bytes(received)

    echoed = await trio.to_thread.run_sync(exchange)
    assert hashlib.sha256(echoed).digest() == hashlib.sha256(payload).digest()


async def raw_session(port: int, data: bytes, wait: float = 5.0) -> tuple[bytes, float]:
    """Send ``data`` and read until the node closes; (what came back, seconds until the close)."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    start = trio.current_time()
    got = bytearray()
    try:
        await stream.send_all(data)
        with trio.fail_after(wait):
            while chunk := await stream.receive_some(65536):
                got += chunk
    except trio.BrokenResourceError:
        pass  # a reset is a close too
    finally:
        await stream.aclose()
    return bytes(got), trio.current_time() - start


async def test_non_tls_first_byte_goes_to_the_default_pool(nursery: trio.Nursery, tmp_path: Path) -> None:
    plain = (await start_backends(nursery, "plain"))[0]
    toml = node_toml(
        listener_toml("edge", "tcp", "plain",
                      extra='[[listeners.sni_routes]]\nserver_name = "a.example.com"\npool = "plain"\n'),
        pool_toml("plain", [plain.address]),
    )
    node, bound = await start_node(nursery, toml)
    answer, _ = await raw_session(bound.listeners["edge"][1], b"GET /whoami HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 200") and b"X-Backend: plain" in answer
    assert node.tcp_proxies["edge"].refused == {}


async def test_non_tls_first_byte_closed_when_configured(nursery: trio.Nursery, tmp_path: Path) -> None:
    ca, backends, port, node = await tls_setup(nursery, tmp_path, non_tls="close")
    answer, _ = await raw_session(port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert answer == b""
    assert node.tcp_proxies["edge"].refused == {"non_tls": 1}
    assert sum(b.stats.handshakes + b.stats.failed_handshakes for b in backends.values()) == 0
    assert await curl(port, "a.example.com", ca.path) == "a"  # TLS clients still served


async def test_garbage_hello_is_closed_and_counted(nursery: trio.Nursery, tmp_path: Path) -> None:
    ca, backends, port, node = await tls_setup(nursery, tmp_path)
    answer, _ = await raw_session(port, b"\x16\x03\x01\x00\x10" + b"\x02" + os.urandom(15))
    assert answer == b""
    assert node.tcp_proxies["edge"].refused == {"malformed": 1}
    assert sum(b.stats.handshakes + b.stats.failed_handshakes for b in backends.values()) == 0
    assert await curl(port, "b.example.com", ca.path) == "b"


async def test_stalled_hello_is_closed_after_the_header_timeout(nursery: trio.Nursery, tmp_path: Path) -> None:
    timeout = 0.5
    _, _, port, node = await tls_setup(nursery, tmp_path, listener_extra=f"[listeners.timeouts]\nheader = {timeout}\n")
    # A record header and the start of a 512-byte ClientHello, then nothing.
    answer, took = await raw_session(port, b"\x16\x03\x01\x02\x00\x01\x00\x01", wait=10)
    assert answer == b""
    # Closed at the timeout; the margin (1.5 s) covers a loaded 2-core machine.
    assert timeout <= took < timeout + 1.5, took
    assert node.tcp_proxies["edge"].refused == {"hello_timeout": 1}


@pytest.mark.parametrize("how", ["eof", "reset"])
async def test_client_gone_mid_hello_is_counted_and_others_unaffected(
    nursery: trio.Nursery, tmp_path: Path, how: str, caplog: pytest.LogCaptureFixture
) -> None:
    import struct

    ca, backends, port, node = await tls_setup(nursery, tmp_path)
    half = HELLO[:120]  # a record header and the first part of a real ClientHello
    sock = socket.socket()
    sock.setblocking(False)
    await trio.socket.from_stdlib_socket(sock).connect(("127.0.0.1", port))
    sock.send(half)
    await trio.sleep(0.1)  # the node has read the first part
    if how == "reset":
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    else:
        sock.shutdown(socket.SHUT_WR)
    sock.close()
    proxy = node.tcp_proxies["edge"]
    with trio.fail_after(5):  # ends at once, long before the 10 s header timeout
        while not proxy.refused:
            await trio.sleep(0.02)
    # An EOF leaves an incomplete (malformed) hello; a reset is counted as such.
    assert proxy.refused == ({"malformed": 1} if how == "eof" else {"reset": 1})
    if how == "eof":
        assert any("connection closed after 120 bytes of an incomplete ClientHello" in r.getMessage()
                   for r in caplog.records)
    assert sum(b.stats.handshakes + b.stats.failed_handshakes for b in backends.values()) == 0
    assert await curl(port, "a.example.com", ca.path) == "a"


async def test_routed_pool_fails_over_to_its_next_backend(nursery: trio.Nursery, tmp_path: Path) -> None:
    """The ClientHello is held until a backend accepted the connection, so a refused
    connect moves the whole session (hello included) to the next backend."""
    ca = make_ca(tmp_path, "backends")
    live = await start_tls_backend(nursery, "live", ca.issue(tmp_path, "live", ["a.example.com"]))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{s.getsockname()[1]}"  # nothing listens there once closed
    toml = node_toml(
        listener_toml("edge", "tcp", "a", extra='[[listeners.sni_routes]]\nserver_name = "a.example.com"\npool = "a"\n'),
        pool_toml("a", [dead, live.address]),
    )
    node, bound = await start_node(nursery, toml)
    port = bound.listeners["edge"][1]
    assert [await curl(port, "a.example.com", ca.path) for _ in range(3)] == ["live"] * 3
    assert live.stats.handshakes == 3
    assert node.snapshot.pools["a"].backends[0].failures >= 1
