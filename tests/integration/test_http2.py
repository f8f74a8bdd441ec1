"""HTTP/2 towards clients (issue 14): ALPN h2 on https listeners, h2c with prior knowledge on
http listeners, every stream balanced on its own; real clients (curl, nghttp, h2load, grpcio)."""

from __future__ import annotations

import dataclasses
import re
import socket
import subprocess
from pathlib import Path

import h2.config
import h2.connection
import h2.events
import pytest
import trio

from tests.conftest import listener_toml, node_toml, pool_toml, start_backends, start_node
from tests.tlsgen import make_ca, make_leaf

H2C = "  [listeners.http2]\n  enabled = true\n"


@dataclasses.dataclass
class Pki:
    ca: Path
    www: tuple[Path, Path]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    d = tmp_path_factory.mktemp("pki")
    ca = make_ca()
    (d / "ca.pem").write_bytes(ca.cert_pem)
    return Pki(ca=d / "ca.pem", www=make_leaf(ca, ["www.example.com"]).write(d, "www"))


def config(pki: Pki, backends, pool_extra: dict | None = None, https_extra: str = "", http_extra: str = H2C) -> str:
    return node_toml(
        pool_toml("web", [b.address for b in backends], **(pool_extra or {})),
        f'[[certificates]]\nname = "www"\ncert = "{pki.www[0]}"\nkey = "{pki.www[1]}"\n',
        listener_toml("secure", "https", "web",
                      extra='  [listeners.tls]\n  certificates = ["www"]\n' + https_extra),
        listener_toml("plain", "http", "web", extra=http_extra),
    )


def curl(*args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["curl", "-sS", "--max-time", "10", *args], capture_output=True, timeout=20)


async def run(*cmd: str, timeout: float = 60) -> subprocess.CompletedProcess[bytes]:
    return await trio.to_thread.run_sync(lambda: subprocess.run(list(cmd), capture_output=True, timeout=timeout))


async def test_curl_negotiates_h2_by_alpn_and_http11_still_works(pki: Pki) -> None:
    async with trio.open_nursery() as nursery:
        backends = await start_backends(nursery, "alpha")
        node, bound = await start_node(nursery, config(pki, backends))
        port = bound.listeners["secure"][1]
        base = ["--cacert", str(pki.ca), "--resolve", f"www.example.com:{port}:127.0.0.1"]
        url = f"https://www.example.com:{port}/echo?x=1"
        r = await trio.to_thread.run_sync(lambda: curl(*base, "--http2", "-w", "\n%{http_version} %{http_code}",
                                                        "-H", "Cookie: a=1", "-H", "Cookie: b=2", url))
        out = r.stdout.decode()
        assert out.endswith("\n2 200"), (out, r.stderr)
        # What the HTTP/1.1 backend got: an HTTP/1.1 request line, Host from :authority, the
        # two Cookie fields joined (RFC 9113 8.2.3), forwarded headers, Via naming HTTP/2.
        assert out.startswith("GET /echo?x=1 HTTP/1.1\n")
        lines = out.lower().splitlines()
        assert f"host: www.example.com:{port}" in lines
        assert "cookie: a=1; b=2" in lines
        assert "x-forwarded-proto: https" in lines
        assert "via: 2 fulcrum" in lines
        # A POST body over h2 (no content-length: curl sends one; the echo returns it whole).
        body = b"x" * 300_000
        r = await trio.to_thread.run_sync(lambda: subprocess.run(
            ["curl", "-sS", "--max-time", "10", *base, "--http2", "--data-binary", "@-", url],
            input=body, capture_output=True, timeout=20))
        assert r.stdout.endswith(body), r.stderr
        r = await trio.to_thread.run_sync(lambda: curl(*base, "--http1.1", "-w", "\n%{http_version}", url))
        assert r.stdout.decode().endswith("\n1.1")
        proxy = node.http_proxies["secure"]
        assert proxy.h2_connections == 2 and proxy.h2_streams == 2  # type: ignore[attr-defined]
        nursery.cancel_scope.cancel()


async def test_h2c_prior_knowledge_on_an_http_listener(pki: Pki) -> None:
    async with trio.open_nursery() as nursery:
        backends = await start_backends(nursery, "alpha")
        _, bound = await start_node(nursery, config(pki, backends))
        port = bound.listeners["plain"][1]
        url = f"http://127.0.0.1:{port}/echo"
        r = await trio.to_thread.run_sync(lambda: curl("--http2-prior-knowledge", "-w", "\n%{http_version}", url))
        out = r.stdout.decode()
        assert out.endswith("\n2") and "X-Forwarded-Proto: http\n" in out, (out, r.stderr)
        r = await trio.to_thread.run_sync(lambda: curl("-w", "\n%{http_version}", url))
        assert r.stdout.decode().endswith("\n1.1")
        nursery.cancel_scope.cancel()


async def test_each_stream_is_balanced_on_its_own(pki: Pki) -> None:
    async with trio.open_nursery() as nursery:
        backends = await start_backends(nursery, "alpha", "beta", "gamma")
        node, bound = await start_node(nursery, config(pki, backends, {"algorithm": "round_robin"}))
        port = bound.listeners["plain"][1]
        # nghttp: 30 requests as concurrent streams of ONE connection.
        r = await run("nghttp", "-m", "30", f"http://127.0.0.1:{port}/")
        assert r.returncode == 0, r.stderr
        assert [b.stats.requests for b in backends] == [10, 10, 10]
        assert node.http_proxies["plain"].h2_connections == 1  # type: ignore[attr-defined]
        nursery.cancel_scope.cancel()


async def test_a_slow_backend_does_not_hold_the_other_streams(pki: Pki) -> None:
    async with trio.open_nursery() as nursery:
        backends = await start_backends(nursery, "alpha")
        _, bound = await start_node(nursery, config(pki, backends))
        port = bound.listeners["plain"][1]
        # One connection: a 3 s request, then 20 quick ones; nghttp prints each stream's end time.
        r = await run("nghttp", "-s", f"http://127.0.0.1:{port}/slow?ms=3000",
                      *[f"http://127.0.0.1:{port}/?{i}" for i in range(20)])
        assert r.returncode == 0, r.stderr
        ends = {}
        for line in r.stdout.decode().splitlines():
            m = re.search(r"\+\s*([\d.]+)(ms|us|s)\s+.*?(\S+)$", line)
            if m and "/" in m.group(3):
                value = float(m.group(1)) / {"ms": 1000, "us": 1e6, "s": 1}[m.group(2)]
                ends[m.group(3)] = value
        slow = [v for k, v in ends.items() if "slow" in k]
        quick = [v for k, v in ends.items() if "slow" not in k]
        assert slow and len(quick) == 20, r.stdout
        # The quick ones end long before the slow one (3 s; margin: 2 s for the busy host).
        assert max(quick) < 1.0 and slow[0] >= 2.9, ends
        nursery.cancel_scope.cancel()


async def test_h2load_over_tls_all_requests_succeed(pki: Pki) -> None:
    async with trio.open_nursery() as nursery:
        backends = await start_backends(nursery, "alpha", "beta")
        node, bound = await start_node(nursery, config(pki, backends))
        port = bound.listeners["secure"][1]
        r = await run("h2load", "-n", "2000", "-c", "4", "-m", "20", f"https://127.0.0.1:{port}/", timeout=120)
        out = r.stdout.decode()
        assert "requests: 2000 total, 2000 started, 2000 done, 2000 succeeded" in out, out
        assert "h2" in out.split("Application protocol:")[1].split()[0]
        assert sum(b.stats.requests for b in backends) == 2000
        assert node.http_proxies["secure"].h2_streams == 2000  # type: ignore[attr-defined]
        nursery.cancel_scope.cancel()


async def test_grpc_client_gets_unavailable_when_no_backend_is_up(pki: Pki) -> None:
    import grpc

    async with trio.open_nursery() as nursery:
        # A pool whose only backend refuses connections (nothing listens on a closed port).
        from tests.conftest import free_port

        dead = free_port()
        node, bound = await start_node(nursery, node_toml(
            pool_toml("api", [f"127.0.0.1:{dead}"], retries=0),
            listener_toml("plain", "http", "api", extra=H2C),
        ))
        port = bound.listeners["plain"][1]

        def call() -> tuple[object, str]:
            with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
                method = channel.unary_unary("/demo.Echo/Say", request_serializer=None, response_deserializer=None)
                try:
                    method(b"hello", timeout=5)
                except grpc.RpcError as exc:
                    return exc.code(), exc.details()
            return None, ""

        code, details = await trio.to_thread.run_sync(call)
        assert code == grpc.StatusCode.UNAVAILABLE, (code, details)
        assert "backend" in details  # the node's reason, not "Received http2 header with status: 503"
        nursery.cancel_scope.cancel()


async def test_the_end_of_a_response_rides_on_its_last_frame(pki: Pki) -> None:
    async with trio.open_nursery() as nursery:
        backends = await start_backends(nursery, "alpha")
        _, bound = await start_node(nursery, config(pki, backends))
        port = bound.listeners["plain"][1]

        def frames() -> dict[int, list[tuple[str, bytes]]]:
            # GET (a body), HEAD and a 204 (none): what frames each stream got, in order.
            conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
            conn.initiate_connection()
            base = [(":scheme", "http"), (":authority", "t.example")]
            for sid, method, path in ((1, "GET", "/"), (3, "HEAD", "/"), (5, "GET", "/status/204")):
                conn.send_headers(sid, [(":method", method), (":path", path), *base], end_stream=True)
            got: dict[int, list[tuple[str, bytes]]] = {1: [], 3: [], 5: []}
            with socket.create_connection(("127.0.0.1", port)) as sock:
                sock.sendall(conn.data_to_send())
                sock.settimeout(10)
                ended = 0
                while ended < 3:
                    data = sock.recv(65536)
                    assert data, "connection closed"
                    for event in conn.receive_data(data):
                        if isinstance(event, h2.events.ResponseReceived):
                            got[event.stream_id].append(("headers", dict(event.headers)[b":status"]))
                            if event.stream_ended is not None:
                                got[event.stream_id].append(("end on headers", b""))
                        elif isinstance(event, h2.events.DataReceived):
                            got[event.stream_id].append(("data", event.data))
                            if event.stream_ended is not None:
                                got[event.stream_id].append(("end on data", b""))
                        elif isinstance(event, h2.events.StreamEnded):
                            ended += 1
                    sock.sendall(conn.data_to_send())
            return got

        got = await trio.to_thread.run_sync(frames)
        # END_STREAM on the last DATA frame (no empty DATA frame after it), or on HEADERS when
        # the response has no body: one frame less per request.
        assert got[1] == [("headers", b"200"), ("data", b"alpha\n"), ("end on data", b"")], got
        assert got[3] == [("headers", b"200"), ("end on headers", b"")], got
        assert got[5] == [("headers", b"204"), ("end on headers", b"")], got
        nursery.cancel_scope.cancel()


async def test_streams_one_after_another_reuse_parsers_and_every_answer_is_whole(pki: Pki) -> None:
    async with trio.open_nursery() as nursery:
        backends = await start_backends(nursery, "alpha")
        _, bound = await start_node(nursery, config(pki, backends))
        port = bound.listeners["plain"][1]

        def one_by_one() -> list[tuple[bytes, bytes]]:
            # One connection, one stream at a time, so that each response is parsed by the parser
            # the stream before gave back: after a HEAD (cut short: a new parser), a 204, a body
            # of many DATA frames, and plain answers.
            conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
            conn.initiate_connection()
            answers: list[tuple[bytes, bytes]] = []
            with socket.create_connection(("127.0.0.1", port)) as sock:
                sock.settimeout(10)
                for i, (method, path) in enumerate([("GET", "/"), ("HEAD", "/"), ("GET", "/"), ("GET", "/status/204"),
                                                    ("GET", "/bytes?n=100000"), ("GET", "/"), ("HEAD", "/"),
                                                    ("GET", "/")]):
                    sid = 2 * i + 1
                    conn.send_headers(sid, [(":method", method), (":scheme", "http"), (":authority", "t.example"),
                                            (":path", path)], end_stream=True)
                    sock.sendall(conn.data_to_send())
                    status, body, ended = b"", b"", False
                    while not ended:
                        data = sock.recv(65536)
                        assert data, "connection closed"
                        for event in conn.receive_data(data):
                            if isinstance(event, h2.events.ResponseReceived):
                                status = dict(event.headers)[b":status"]
                            elif isinstance(event, h2.events.DataReceived):
                                body += event.data
                                conn.acknowledge_received_data(event.flow_controlled_length, sid)
                            elif isinstance(event, h2.events.StreamEnded) and event.stream_id == sid:
                                ended = True
                        sock.sendall(conn.data_to_send())
                    answers.append((status, body if len(body) < 100 else b"%d bytes" % len(body)))
            return answers

        assert await trio.to_thread.run_sync(one_by_one) == [
            (b"200", b"alpha\n"), (b"200", b""), (b"200", b"alpha\n"), (b"204", b""), (b"200", b"100000 bytes"),
            (b"200", b"alpha\n"), (b"200", b""), (b"200", b"alpha\n")]
        nursery.cancel_scope.cancel()
