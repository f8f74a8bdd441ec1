"""PROXY protocol with HAProxy as the peer: HAProxy in front sending ``send-proxy`` and
``send-proxy-v2`` to Fulcrum listeners with ``[listeners.proxy_protocol]``; real clients, real
sockets. HAProxy connects to Fulcrum from 127.0.0.9 (``source``), the clients from other
loopback addresses: an address a backend sees is the client's only if the header carried it."""

from __future__ import annotations

import random
import socket
import time
from pathlib import Path

import httpx
import pytest
import trio

from lbnode.proxyaccept import read_proxy_header
from lbnode.proxyproto import Error, Parsed, encode_v1, encode_v2, parse_proxy_header
from tests.conftest import listener_toml, node_toml, pool_toml, start_backends, start_node
from tests.haproxy import free_port, running_haproxy
from tests.integration.test_metrics import promtool_check, scrape, wait_until
from tests.integration.test_tls_passthrough import curl, tls_setup
from tests.promtext import value
from tests.tlsclient import client_context, get
from tests.tlsgen import make_ca, make_leaf

HAPROXY_SOURCE = "127.0.0.9"  # where HAProxy connects to Fulcrum from: the only trusted peer
ACCEPT = f'[listeners.proxy_protocol]\naccept = true\ntrusted = ["{HAPROXY_SOURCE}/32"]\n'


def in_front(name: str, fulcrum_port: int, send: str, port: int, port6: int | None = None) -> str:
    """A TCP frontend (an L4 balancer) whose server is a Fulcrum listener, with ``send``."""
    binds = f"    bind 127.0.0.1:{port}\n" + (f"    bind [::1]:{port6}\n" if port6 else "")
    return (f"frontend {name}\n    mode tcp\n{binds}    default_backend {name}_fulcrum\n"
            f"backend {name}_fulcrum\n    mode tcp\n"
            f"    server fulcrum 127.0.0.1:{fulcrum_port} {send} source {HAPROXY_SOURCE}\n")


def get_from(url: str, source: str | None = None, **kwargs: object) -> httpx.Response:
    transport = httpx.HTTPTransport(local_address=source) if source else None
    with httpx.Client(timeout=30, transport=transport) as client:
        return client.get(url, **kwargs)  # type: ignore[arg-type]


def echoed(body: str) -> dict[str, str]:
    """The request headers the demo backend's /echo saw."""
    out = {}
    for line in body.split("\n\n")[0].splitlines()[1:]:
        k, _, v = line.partition(": ")
        out[k.lower()] = v
    return out


@pytest.mark.parametrize("send", ["send-proxy", "send-proxy-v2"])
async def test_haproxy_in_front_the_backend_sees_the_client_in_x_forwarded_for(nursery, tmp_path: Path, send: str):
    (a,) = await start_backends(nursery, "a")
    node, bound = await start_node(nursery, node_toml(
        listener_toml("front", "http", "web", extra=ACCEPT), pool_toml("web", [a.address])))
    port, admin = bound.listeners["front"][1], bound.admin[1]
    hp, hp6 = free_port(), free_port("::1")
    async with running_haproxy(tmp_path, in_front("lb", port, send, hp, hp6), [("127.0.0.1", hp), ("::1", hp6)]):
        for url, client in ((f"http://127.0.0.1:{hp}/echo", "127.0.0.1"), (f"http://[::1]:{hp6}/echo", "::1")):

            def two_requests(url: str = url) -> list[httpx.Response]:
                with httpx.Client(timeout=30) as c:  # keep-alive: one header, two requests
                    return [c.get(url), c.get(url)]

            for r in await trio.to_thread.run_sync(two_requests):
                assert r.status_code == 200, r.text
                assert echoed(r.text)["x-forwarded-for"] == client, r.text
    _, s = await scrape(admin)
    version = "v2" if send.endswith("v2") else "v1"
    assert value(s, "fulcrum_proxy_protocol_headers_total", listener="front", version=version) == 2
    assert value(s, "fulcrum_proxy_protocol_errors_total", listener="front", reason="malformed") == 0


async def test_rate_limit_and_source_ip_affinity_follow_the_proxied_client(nursery, tmp_path: Path):
    a, b = await start_backends(nursery, "a", "b")
    node, bound = await start_node(nursery, node_toml(
        listener_toml("limited", "http", "web", extra=ACCEPT + "[listeners.rate_limit]\nrate = 0.01\nburst = 1\n"),
        listener_toml("sticky", "http", "sessions", extra=ACCEPT),
        pool_toml("web", [a.address]),
        pool_toml("sessions", [a.address, b.address], _extra='[pools.affinity]\nmode = "source_ip"\n'),
    ))
    limited, sticky = bound.listeners["limited"][1], bound.listeners["sticky"][1]
    hp1, hp2 = free_port(), free_port()
    config = in_front("limited", limited, "send-proxy-v2", hp1) + in_front("sticky", sticky, "send-proxy", hp2)
    async with running_haproxy(tmp_path, config, [("127.0.0.1", hp1), ("127.0.0.1", hp2)]):

        def status(source: str) -> int:
            return get_from(f"http://127.0.0.1:{hp1}/", source).status_code

        # A burst of 1 per client: each client's second request is refused, not the other
        # client's first (keyed by HAProxy's address, both would share one bucket).
        codes = [await trio.to_thread.run_sync(status, src) for src in ("127.0.0.5", "127.0.0.5", "127.0.0.6")]
        assert codes == [200, 429, 200]

        def served_by(source: str) -> str:
            return get_from(f"http://127.0.0.1:{hp2}/", source).text

        # Two clients, two sessions: round robin places them on both backends, and each one
        # stays on its own (one session for HAProxy's address would put both on one backend).
        first = {src: await trio.to_thread.run_sync(served_by, src) for src in ("127.0.0.5", "127.0.0.6")}
        assert len(set(first.values())) == 2, first
        for _ in range(3):
            for src, backend in first.items():
                assert await trio.to_thread.run_sync(served_by, src) == backend


async def test_the_header_comes_before_the_tls_handshake_on_https(nursery, tmp_path: Path):
    ca = make_ca()
    (tmp_path / "ca.pem").write_bytes(ca.cert_pem)
    cert, key = make_leaf(ca, ["www.example.com"]).write(tmp_path, "www")
    (a,) = await start_backends(nursery, "a")
    tls = '[listeners.tls]\ncertificates = ["www"]\n'
    node, bound = await start_node(nursery, node_toml(
        f'[[certificates]]\nname = "www"\ncert = "{cert}"\nkey = "{key}"\n',
        listener_toml("secure", "https", "web", extra=tls + ACCEPT), pool_toml("web", [a.address])))
    hp = free_port()
    async with running_haproxy(tmp_path, in_front("lb", bound.listeners["secure"][1], "send-proxy-v2", hp),
                               [("127.0.0.1", hp)]):
        status, _, body, names = await trio.to_thread.run_sync(
            get, "www.example.com", hp, client_context(tmp_path / "ca.pem"), "/echo")
    assert status == 200 and names == ["www.example.com"]
    seen = echoed(body.decode())
    assert seen["x-forwarded-for"] == "127.0.0.1" and seen["x-forwarded-proto"] == "https"


async def test_the_header_comes_before_the_client_hello_on_sni_passthrough(nursery, tmp_path: Path):
    ca, backends, port, node = await tls_setup(nursery, tmp_path, listener_extra=ACCEPT)
    hp = free_port()
    async with running_haproxy(tmp_path, in_front("lb", port, "send-proxy", hp), [("127.0.0.1", hp)]):
        # The ClientHello is read after the header, and the backend's handshake is the client's own.
        assert await curl(hp, "a.example.com", ca.path) == "a"
        assert await curl(hp, "x.wild.example.com", ca.path) == "wild"
    assert backends["a"].stats.server_names == ["a.example.com"]
    assert node.proxy_receivers["edge"].headers == {1: 2, 2: 0}


async def test_a_peer_outside_trusted_and_broken_headers_are_closed_and_counted(nursery):
    (a,) = await start_backends(nursery, "a")
    header_timeout = 0.5
    node, bound = await start_node(nursery, node_toml(
        listener_toml("front", "http", "web",
                      extra=ACCEPT + f"[listeners.timeouts]\nheader = {header_timeout}\n"),
        pool_toml("web", [a.address])))
    port, admin = bound.listeners["front"][1], bound.admin[1]
    request = b"GET /echo HTTP/1.1\r\nHost: a.example\r\nConnection: close\r\n\r\n"
    good = encode_v1(("192.0.2.7", 40000), ("198.51.100.1", 80))

    async def exchange(source: str, data: bytes, *, close_after: bool = False) -> tuple[bytes, float]:
        """Send from ``source``; what came back before the node closed, and how long that took."""
        sock = trio.socket.socket(socket.AF_INET)
        with sock:
            await sock.bind((source, 0))
            started = trio.current_time()  # before connect: the node's clock starts after this
            await sock.connect(("127.0.0.1", port))
            if data:
                await sock.send(data)
            if close_after:
                sock.shutdown(socket.SHUT_WR)
            got = b""
            with trio.fail_after(10):  # the longest case ends at the 0.5 s header timeout
                try:
                    while chunk := await sock.recv(65536):
                        got += chunk
                except ConnectionResetError:
                    pass  # closed with our bytes unread: the kernel sends a reset
            return got, trio.current_time() - started

    # From outside trusted: a valid header does not help, nothing is answered.
    assert (await exchange("127.0.0.7", good + request))[0] == b""
    # From the trusted peer: a request without a header, a broken line, a cut v2 header.
    assert (await exchange(HAPROXY_SOURCE, request))[0] == b""
    assert (await exchange(HAPROXY_SOURCE, b"PROXY TCP4 192.0.2.07 198.51.100.1 1 80\r\n" + request))[0] == b""
    assert (await exchange(HAPROXY_SOURCE, encode_v2(("192.0.2.7", 1), ("198.51.100.1", 80))[:20],
                           close_after=True))[0] == b""
    # Half a header, then silence: closed at the header timeout, not before.
    got, took = await exchange(HAPROXY_SOURCE, good[:10])
    assert got == b"" and header_timeout <= took < header_timeout + 3.0  # 3 s: margin for 2 busy cores
    # The header split over two segments is still read, and only it: the request follows intact.
    sock = trio.socket.socket(socket.AF_INET)
    with sock:
        await sock.bind((HAPROXY_SOURCE, 0))
        await sock.connect(("127.0.0.1", port))
        await sock.send(good[:9])
        await trio.sleep(0.05)
        await sock.send(good[9:] + request)
        answer = b""
        while chunk := await sock.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 200") and b"X-Forwarded-For: 192.0.2.7\n" in answer
    # A v2 LOCAL command (the peer balancer's health check): served, the peer is the client.
    got, _ = await exchange(HAPROXY_SOURCE, encode_v2(None, None) + request)
    assert got.startswith(b"HTTP/1.1 200") and f"X-Forwarded-For: {HAPROXY_SOURCE}\n".encode() in got

    async def counted() -> bool:
        _, s = await scrape(admin)
        return value(s, "fulcrum_listener_connections_open", listener="front") == 0

    await wait_until(counted, "every connection closed")
    r, s = await scrape(admin)
    await promtool_check(r.text)
    errors = {why: value(s, "fulcrum_proxy_protocol_errors_total", listener="front", reason=why)
              for why in ("untrusted", "malformed", "timeout", "closed")}
    assert errors == {"untrusted": 1, "malformed": 2, "timeout": 1, "closed": 1}
    assert value(s, "fulcrum_proxy_protocol_headers_total", listener="front", version="v1") == 1
    assert value(s, "fulcrum_proxy_protocol_headers_total", listener="front", version="v2") == 1
    assert a.stats.requests == 2  # only the two accepted headers reached the backend


async def test_the_reader_takes_the_header_and_not_one_byte_more_without_spinning():
    """read_proxy_header on a real socket pair: a header trickling in pieces, the client's
    bytes behind it left in the kernel for the next reader, no busy loop while it waits."""
    ours, theirs = socket.socketpair()
    with ours, theirs:
        ours.setblocking(False)
        header = encode_v1(("2001:db8::7", 51000), ("2001:db8::1", 443))
        result: list[object] = []

        async def read() -> None:
            result.append(await read_proxy_header(ours))

        async with trio.open_nursery() as n:
            n.start_soon(read)
            theirs.send(header[:10])
            await trio.sleep(0.05)
            cpu = time.process_time()
            await trio.sleep(0.3)  # the reader waits for more: it must not spin meanwhile
            spent = time.process_time() - cpu
            theirs.send(header[10:] + b"GET / HTTP/1.1\r\n")
        # Waiting costs next to nothing (measured 0.3 ms); a reader spinning on the peeked
        # bytes burnt 0.11 s of the 0.3 s on 2 busy cores. 30 ms: 100 times the expected cost.
        assert spent < 0.03, spent
        # (``rest`` shows what was peeked behind the header: still in the kernel, read next)
        rest = b"GET / HTTP/1.1\r\n"
        assert result == [Parsed(1, ("2001:db8::7", 51000), ("2001:db8::1", 443), len(header), rest)]
        assert ours.recv(100) == rest


async def test_mutated_headers_are_judged_by_the_node_as_by_the_parser(nursery):
    """300 headers with random cuts, flipped and inserted bytes, each sent in random pieces
    and then half-closed: the node counts each one as the pure parser judges it (accepted by
    version, malformed, or closed while incomplete), and it still serves afterwards."""
    (a,) = await start_backends(nursery, "a")
    node, bound = await start_node(nursery, node_toml(
        listener_toml("front", "http", "web", extra=ACCEPT), pool_toml("web", [a.address])))
    port, admin = bound.listeners["front"][1], bound.admin[1]
    rng = random.Random(15)  # fixed: a failure can be replayed
    request = b"GET / HTTP/1.1\r\nHost: a.example\r\nConnection: close\r\n\r\n"
    bases = [encode_v1(("192.0.2.7", 40000), ("198.51.100.1", 80)), encode_v1(("2001:db8::7", 1), ("::1", 2)),
             encode_v1(None, None), encode_v2(("192.0.2.7", 40000), ("198.51.100.1", 80)),
             encode_v2(("2001:db8::7", 1), ("::1", 2)), encode_v2(None, None)]
    expected = {"v1": 0, "v2": 0, "malformed": 0, "closed": 0}

    def mutate(data: bytes) -> bytes:
        out = bytearray(data)
        for _ in range(rng.randint(0, 3)):
            kind, at = rng.randrange(3), rng.randrange(len(out) + 1)
            if kind == 0:
                del out[at:]
            elif kind == 1 and at < len(out):
                out[at] = rng.randrange(256)
            else:
                out[at:at] = bytes([rng.randrange(256)])
        return bytes(out)

    for _ in range(300):
        data = mutate(rng.choice(bases)) + request
        verdict = parse_proxy_header(data)
        if isinstance(verdict, Parsed):
            expected[f"v{verdict.version}"] += 1
        else:
            expected["malformed" if isinstance(verdict, Error) else "closed"] += 1
        sock = trio.socket.socket(socket.AF_INET)
        with sock:
            await sock.bind((HAPROXY_SOURCE, 0))
            await sock.connect(("127.0.0.1", port))
            sent = 0
            try:
                while sent < len(data):
                    piece = rng.randint(1, len(data) - sent)
                    await sock.send(data[sent:sent + piece])
                    sent += piece
                sock.shutdown(socket.SHUT_WR)
                with trio.fail_after(10):  # answered or closed at once: every byte is in
                    while await sock.recv(65536):
                        pass
            except OSError:
                pass  # the node closed with bytes unread (a reset): no more to send or read

    async def all_closed() -> bool:
        _, s = await scrape(admin)
        return value(s, "fulcrum_listener_connections_open", listener="front") == 0

    await wait_until(all_closed, "every connection closed")
    _, s = await scrape(admin)
    seen = {v: value(s, "fulcrum_proxy_protocol_headers_total", listener="front", version=v) for v in ("v1", "v2")}
    seen |= {why: value(s, "fulcrum_proxy_protocol_errors_total", listener="front", reason=why)
             for why in ("malformed", "closed")}
    assert seen == expected, (seen, expected)
    assert min(expected.values()) > 0  # every outcome was exercised
    accepted = sum(expected[v] for v in ("v1", "v2"))
    assert a.stats.requests <= accepted  # only accepted headers can have reached the backend
    sock = trio.socket.socket(socket.AF_INET)
    with sock:  # and the node still serves
        await sock.bind((HAPROXY_SOURCE, 0))
        await sock.connect(("127.0.0.1", port))
        await sock.send(bases[0] + request)
        answer = b""
        while chunk := await sock.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 200"), answer
