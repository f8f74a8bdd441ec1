"""``protocol = "h2"`` pools (over TLS too) through the control API and lbctl (issue 14).

A real LbNode following a real FileStore, the real gRPC control server on loopback, lbctl's
real ``main``; the pool's backend is a grpcio server with TLS, and a grpcio client calls
through the node's h2c listener. The pool is created and changed only through lbctl: the
listener was built before the pool was h2, and must reach it over HTTP/2 anyway.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import grpc
import pytest
import trio

from lbnode.api.fulcrum.v1 import control_pb2 as pb
from lbnode.api.fulcrum.v1 import control_pb2_grpc as rpc
from lbnode.cluster.filestore import FileStore
from lbnode.config import load_config_text
from lbnode.control.server import serve_control
from lbnode.model import Address, ControlSettings
from lbnode.node import LbNode
from tests.conftest import listener_toml, node_toml, pool_toml
from tests.grpcbackend import GrpcBackend
from tests.integration.test_control_api import eventually, lbctl
from tests.tlsutil import make_ca

H2C = "  [listeners.http2]\n  enabled = true\n"
INSECURE = ControlSettings(bind=Address("127.0.0.1", 0), insecure=True)


@pytest.fixture(autouse=True)
def _no_lbctl_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in list(os.environ):
        if name.startswith("LBCTL_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "no-config"))


async def start(nursery: trio.Nursery, tmp_path: Path) -> tuple[LbNode, dict[str, int], list[str]]:
    """A node whose h2c listener "front" (and HTTP/1.1-only listener "plain") send to pool "g",
    at first an empty HTTP/1.1 pool."""
    state = tmp_path / "state"
    config = load_config_text(node_toml(pool_toml("g", []), listener_toml("front", "http", "g", extra=H2C),
                                        listener_toml("plain", "http", "g"),
                                        node_id="n1", node_extra=f'state_dir = "{state}"\n'), "test.toml")
    store = FileStore(state, config.pools)
    node = LbNode(config, store)
    bound = await nursery.start(lambda task_status: node.run(handle_signals=False, task_status=task_status))
    control = await nursery.start(serve_control, INSECURE, store, node)
    ports = {name: address[1] for name, address in bound.listeners.items()}
    return node, ports, ["--insecure", "-e", f"127.0.0.1:{control}"]


def call_name(port: int) -> bytes:
    with grpc.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.use_local_subchannel_pool", 1),
                                                             ("grpc.enable_http_proxy", 0)]) as channel:
        name: bytes = channel.unary_unary("/test.Who/Name")(b"", timeout=5)
        return name


async def test_lbctl_apply_and_create_h2_tls_pools_that_then_serve_grpc(nursery: trio.Nursery, tmp_path: Path) -> None:
    ca = make_ca(tmp_path, "backends")
    backend = GrpcBackend("g1", tls=ca.issue(tmp_path, "g1", ["api.internal"]))
    try:
        node, ports, flags = await start(nursery, tmp_path)
        pool_file = tmp_path / "g.toml"
        pool_file.write_text(
            '[[pools]]\nname = "g"\nprotocol = "h2"\n'
            f'[pools.tls]\nenabled = true\nca = "{ca.path}"\nserver_name = "api.internal"\n'
            '[pools.health]\ntype = "grpc"\ninterval = "100ms"\ntimeout = "2s"\nrise = 1\n'
            f'[[pools.backends]]\naddress = "{backend.address}"\n')
        code, out, err = await lbctl(*flags, "apply", "-f", str(pool_file))
        assert code == 0, err
        assert '    protocol: "http1" -> "h2"' in out.splitlines(), out

        async def serving() -> bool:
            pool = node.snapshot.pools["g"]
            return pool.spec.protocol == "h2" and pool.backends[0].health == "up"

        # The grpc check every 100 ms (rise = 1) over TLS: up within ~0.2 s of the change.
        await eventually(serving, "pool g is h2 and its backend up")
        assert await trio.to_thread.run_sync(call_name, ports["front"]) == b"g1"
        # An HTTP/1.1 client on a listener without HTTP/2, built before any pool was h2: the call
        # still goes to the backend over HTTP/2 (gRPC framing by hand: one empty message).
        frame = b"\x00\x00\x00\x00\x00"
        r = await trio.to_thread.run_sync(lambda: subprocess.run(
            ["curl", "-sS", "--http1.1", "--max-time", "10", "-D", "-", "-H", "content-type: application/grpc",
             "--data-binary", "@-", f"http://127.0.0.1:{ports['plain']}/test.Who/Name"],
            input=frame, capture_output=True, timeout=20))
        head, _, body = r.stdout.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200") and body.startswith(b"\x00\x00\x00\x00\x02g1grpc-status: 0"), r

        code, out, err = await lbctl(*flags, "-o", "json", "pools", "show", "g")
        assert code == 0, err
        shown = json.loads(out)
        assert shown["protocol"] == "h2"
        assert shown["tls"] == {"enabled": True, "ca": str(ca.path), "server_name": "api.internal"}
        again = await lbctl(*flags, "apply", "-f", str(pool_file))
        assert again[0] == 0 and again[1].splitlines()[-1] == "no changes"  # read back exactly as written

        # pools create: a second h2 pool from a pool file, read back through the API as written.
        other = tmp_path / "other.toml"
        other.write_text(f'name = "other"\nprotocol = "h2"\n[tls]\nca = "{ca.path}"\n'
                         f'[[backends]]\naddress = "{backend.address}"\n')
        code, out, err = await lbctl(*flags, "pools", "create", "-f", str(other))
        assert code == 0 and out.strip() == "pool other created (revision 3)", (out, err)
        created = json.loads((await lbctl(*flags, "-o", "json", "pools", "show", "other"))[1])
        assert created["protocol"] == "h2" and created["tls"] == {"enabled": True, "ca": str(ca.path)}
    finally:
        await trio.to_thread.run_sync(backend.stop)


async def test_bad_h2_pool_values_are_invalid_argument_naming_the_field(nursery: trio.Nursery, tmp_path: Path) -> None:
    _, _, flags = await start(nursery, tmp_path)
    stub = rpc.PoolsStub(grpc.insecure_channel(flags[-1]))

    def rejected(spec: dict[str, object]) -> tuple[grpc.StatusCode, str]:
        with pytest.raises(grpc.RpcError) as caught:
            stub.CreatePool(pb.CreatePoolRequest(pool=pb.Pool(name="bad", spec_json=json.dumps(spec))))
        return caught.value.code(), caught.value.details()

    code, details = rejected({"protocol": "h3"})
    assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith('pool.protocol: "h3" is not one of'), details
    assert rejected({"protocol": "h2", "send_proxy": "v2"}) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        'pool.send_proxy: is not supported with protocol = "h2" (HTTP/2 connections are shared by many '
        "clients: a PROXY header can name only one)")
    code, details = rejected({"protocol": "h2", "tls": {"enabled": True, "verfy": False}})
    assert code == grpc.StatusCode.INVALID_ARGUMENT and details == "pool.tls.verfy: unknown key", details
    code, details = rejected({"protocol": "h2", "tls": {"enabled": True, "verify": False},
                              "health": {"type": "grpc"}})
    assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith(
        'pool.tls.verify: false cannot be used with [pools.health] type = "grpc"'), details
    bad = tmp_path / "bad.toml"
    bad.write_text('[[pools]]\nname = "g"\nprotocol = "http2"\n')
    code, _, err = await lbctl(*flags, "apply", "-f", str(bad))
    assert code == 1 and err.startswith(f'lbctl: {bad}: pools[0].protocol: "http2" is not one of'), err
