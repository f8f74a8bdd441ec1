"""gRPC through the node (issue 14): grpcio clients, a pool of grpcio servers reached over
HTTP/2 (protocol = "h2"), every kind of call, statuses and trailers, a backend killed mid-call."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent import futures

import grpc
import pytest
import trio

from tests.conftest import free_port, listener_toml, node_toml, pool_toml, start_node

H2C = "  [listeners.http2]\n  enabled = true\n"
SERVICE = "demo.Echo"


class Server:
    """A grpcio server answering with its name: generic handlers on raw bytes (no .proto)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.port = free_port()
        self.calls = 0
        self.cancelled = threading.Event()
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
        handlers = {
            "Say": grpc.unary_unary_rpc_method_handler(self.say),
            "Count": grpc.unary_stream_rpc_method_handler(self.count),
            "Sum": grpc.stream_unary_rpc_method_handler(self.sum),
            "Chat": grpc.stream_stream_rpc_method_handler(self.chat),
            "Fail": grpc.unary_unary_rpc_method_handler(self.fail),
            "Slow": grpc.unary_unary_rpc_method_handler(self.slow),
        }
        self.server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
        self.server.add_insecure_port(f"127.0.0.1:{self.port}")
        self.server.start()

    def say(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        self.calls += 1
        return self.name.encode() + b":" + request

    def count(self, request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        self.calls += 1
        n, delay = (int(x) for x in request.split(b","))
        for i in range(n):
            if not context.is_active():
                self.cancelled.set()
                return
            yield b"%s %d" % (self.name.encode(), i)
            time.sleep(delay / 1000)

    def sum(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
        self.calls += 1
        return b"%d" % sum(int(r) for r in requests)

    def chat(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        self.calls += 1
        for r in requests:
            yield r.upper()

    def slow(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        self.calls += 1
        end = time.monotonic() + int(request) / 1000
        while time.monotonic() < end:
            if not context.is_active():
                self.cancelled.set()
                return b""
            time.sleep(0.01)
        return b"late"

    def fail(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        self.calls += 1
        context.abort(grpc.StatusCode.NOT_FOUND, "no such thing: " + request.decode())
        return b""


@pytest.fixture
def servers() -> Iterator[list[Server]]:
    out = [Server("a"), Server("b")]
    yield out
    for s in out:
        s.server.stop(0)


def config(servers: list[Server]) -> str:
    return node_toml(
        pool_toml("grpc", [f"127.0.0.1:{s.port}" for s in servers], algorithm="round_robin", protocol="h2"),
        listener_toml("plain", "http", "grpc", extra=H2C),
    )


def method(channel: grpc.Channel, kind: str, name: str):  # type: ignore[no-untyped-def]
    return getattr(channel, kind)(f"/{SERVICE}/{name}")


async def test_all_four_kinds_of_call_spread_per_call_with_statuses(servers: list[Server]) -> None:
    async with trio.open_nursery() as nursery:
        _, bound = await start_node(nursery, config(servers))
        port = bound.listeners["plain"][1]

        def calls() -> None:
            with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
                # Unary: 20 calls on ONE client connection, balanced per call.
                say = method(ch, "unary_unary", "Say")
                answers = [say(b"%d" % i, timeout=10) for i in range(20)]
                assert sorted(a.split(b":")[0] for a in answers) == [b"a"] * 10 + [b"b"] * 10
                assert all(a.split(b":")[1] == b"%d" % i for i, a in enumerate(answers))
                # Server streaming, client streaming, bidirectional.
                got = list(method(ch, "unary_stream", "Count")(b"5,0", timeout=10))
                assert len(got) == 5 and got[4].endswith(b" 4")
                assert method(ch, "stream_unary", "Sum")(iter([b"1", b"2", b"39"]), timeout=10) == b"42"
                assert list(method(ch, "stream_stream", "Chat")(iter([b"x", b"yz"]), timeout=10)) == [b"X", b"YZ"]
                # A backend's error status and message reach the client (trailers passed through).
                with pytest.raises(grpc.RpcError) as exc:
                    method(ch, "unary_unary", "Fail")(b"k", timeout=10)
                assert exc.value.code() == grpc.StatusCode.NOT_FOUND
                assert exc.value.details() == "no such thing: k"

        await trio.to_thread.run_sync(calls)
        assert servers[0].calls == servers[1].calls == 12
        nursery.cancel_scope.cancel()


async def test_a_backend_killed_mid_stream_fails_only_its_calls(servers: list[Server]) -> None:
    async with trio.open_nursery() as nursery:
        _, bound = await start_node(nursery, config(servers))
        port = bound.listeners["plain"][1]

        def scenario() -> tuple[object, list[bytes], bytes, Server]:
            with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
                count = method(ch, "unary_stream", "Count")
                doomed = count(b"1000,20", timeout=30)
                survivor = count(b"50,20", timeout=30)  # round robin: on the other one, same client connection
                first = next(doomed)
                victim = next(s for s in servers if first.startswith(s.name.encode() + b" "))
                victim.server.stop(0)
                code = None
                try:
                    for _ in doomed:
                        pass
                except grpc.RpcError as exc:
                    code = exc.code()
                rest = list(survivor)
                after = method(ch, "unary_unary", "Say")(b"again", timeout=10)
                return code, rest, after, victim

        code, rest, after, victim = await trio.to_thread.run_sync(scenario)
        other = b"b" if victim.name == "a" else b"a"
        assert code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL, grpc.StatusCode.CANCELLED,
                        grpc.StatusCode.UNKNOWN), code
        assert len(rest) == 50 and all(r.startswith(other + b" ") for r in rest)
        assert after.startswith(other + b":")
        nursery.cancel_scope.cancel()


async def test_an_http11_client_reaches_an_h2_backend(servers: list[Server]) -> None:
    import struct
    import subprocess

    async with trio.open_nursery() as nursery:
        _, bound = await start_node(nursery, config(servers))
        port = bound.listeners["plain"][1]
        frame = b"\x00" + struct.pack(">I", 2) + b"hi"  # one gRPC message: not compressed, 2 bytes
        r = await trio.to_thread.run_sync(lambda: subprocess.run(
            ["curl", "-sS", "--http1.1", "--max-time", "10", "-D", "-", "-H", "content-type: application/grpc",
             "--data-binary", "@-", f"http://127.0.0.1:{port}/{SERVICE}/Say"],
            input=frame, capture_output=True, timeout=20))
        out = r.stdout
        head, _, body = out.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200") and b"Transfer-Encoding: chunked" in head, out
        # The length-prefixed answer, then the trailers, which curl -D prints after the body.
        assert body[:5] == b"\x00\x00\x00\x00\x04" and body[5:9] in (b"a:hi", b"b:hi"), body
        assert body[9:].startswith(b"grpc-status: 0\r\n"), body
        nursery.cancel_scope.cancel()


async def test_cancellation_and_grpc_timeout_reach_the_backend(servers: list[Server]) -> None:
    import struct
    import subprocess

    async with trio.open_nursery() as nursery:
        _, bound = await start_node(nursery, config(servers))
        port = bound.listeners["plain"][1]

        def cancel() -> None:
            with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
                call = method(ch, "unary_stream", "Count")(b"1000,20", timeout=30)
                next(call)
                call.cancel()  # RST_STREAM(CANCEL) to the node, which resets the backend's stream
                assert any(s.cancelled.wait(5) for s in servers)  # the server saw its call end early

        await trio.to_thread.run_sync(cancel)
        for s in servers:
            s.cancelled.clear()
        # grpc-timeout enforced by the node itself (curl keeps no deadline of its own): a call
        # that takes 5 s gets DEADLINE_EXCEEDED after 300 ms, and the backend's call is cancelled.
        frame = b"\x00" + struct.pack(">I", 4) + b"5000"
        started = time.monotonic()
        r = await trio.to_thread.run_sync(lambda: subprocess.run(
            ["curl", "-sS", "--http2-prior-knowledge", "--max-time", "10", "-D", "-", "-H", "content-type: application/grpc",
             "-H", "grpc-timeout: 300m", "--data-binary", "@-", f"http://127.0.0.1:{port}/{SERVICE}/Slow"],
            input=frame, capture_output=True, timeout=20))
        took = time.monotonic() - started
        assert b"grpc-status: 4" in r.stdout, r.stdout
        assert took < 3.0  # 300 ms, with room for a busy host; the call itself takes 5 s
        assert await trio.to_thread.run_sync(lambda: any(s.cancelled.wait(5) for s in servers))
        nursery.cancel_scope.cancel()


async def test_grpc_over_tls_through_an_https_listener(servers: list[Server], tmp_path) -> None:  # type: ignore[no-untyped-def]
    from tests.tlsgen import make_ca, make_leaf

    ca = make_ca()
    cert, key = make_leaf(ca, ["grpc.example.com"]).write(tmp_path, "grpc")
    access_log = tmp_path / "access.log"
    async with trio.open_nursery() as nursery:
        _, bound = await start_node(nursery, node_toml(
            pool_toml("grpc", [f"127.0.0.1:{s.port}" for s in servers], protocol="h2"),
            f'[[certificates]]\nname = "c"\ncert = "{cert}"\nkey = "{key}"\n',
            listener_toml("secure", "https", "grpc",
                          extra=f'  [listeners.tls]\n  certificates = ["c"]\n'
                                f'  [listeners.access_log]\n  path = "{access_log}"\n'),
        ))
        port = bound.listeners["secure"][1]

        def calls() -> list[bytes]:
            creds = grpc.ssl_channel_credentials(root_certificates=ca.cert_pem)
            options = [("grpc.ssl_target_name_override", "grpc.example.com")]
            with grpc.secure_channel(f"127.0.0.1:{port}", creds, options=options) as ch:
                return [method(ch, "unary_unary", "Say")(b"t", timeout=10) for _ in range(4)]

        answers = await trio.to_thread.run_sync(calls)
        assert sorted(a.split(b":")[0] for a in answers) == [b"a", b"a", b"b", b"b"]
        for _ in range(50):  # the access log writer runs in its own thread
            if access_log.exists() and len(access_log.read_text().splitlines()) >= 4:
                break
            await trio.sleep(0.1)
        import json

        entries = [json.loads(line) for line in access_log.read_text().splitlines()]
        assert len(entries) == 4
        assert {e["version"] for e in entries} == {"2"} and {e["status"] for e in entries} == {200}
        assert {e["path"] for e in entries} == {f"/{SERVICE}/Say"}
        assert {e["tls_version"] for e in entries} == {"TLSv1.3"} and {e["protocol"] for e in entries} == {"https"}
        nursery.cancel_scope.cancel()


async def test_a_restarted_backend_costs_no_failed_call() -> None:
    # One backend, restarted on the same port between two calls: the node's HTTP/2 connection
    # to the old process is dead; the next call must find out before sending, not fail.
    server = Server("first")
    port_b = server.port
    async with trio.open_nursery() as nursery:
        _, bound = await start_node(nursery, node_toml(
            pool_toml("grpc", [f"127.0.0.1:{port_b}"], protocol="h2", retries=0),
            listener_toml("plain", "http", "grpc", extra=H2C),
        ))
        port = bound.listeners["plain"][1]

        def call() -> bytes:
            with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
                return method(ch, "unary_unary", "Say")(b"x", timeout=10)

        assert await trio.to_thread.run_sync(call) == b"first:x"
        server.server.stop(0)
        await trio.sleep(0.2)  # the old process's close reaches the node's socket
        again = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        again.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
            SERVICE, {"Say": grpc.unary_unary_rpc_method_handler(lambda r, c: b"second:" + r)}),))
        again.add_insecure_port(f"127.0.0.1:{port_b}")
        again.start()
        try:
            assert await trio.to_thread.run_sync(call) == b"second:x"
        finally:
            again.stop(0)
        nursery.cancel_scope.cancel()
