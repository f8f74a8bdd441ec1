"""``[node] workers = 2`` with a ``protocol = "h2"`` pool over TLS (issue 14): the workers get the
pool's protocol and TLS settings in their CONFIG message and speak HTTP/2 over TLS to a grpcio
backend. Real processes: ``lbnode run`` (the supervisor and its workers); the backend is a
grpcio server with TLS in this process; clients are grpcio channels, a new connection each.
"""

from __future__ import annotations

from pathlib import Path

import grpc

from tests.conftest import free_port, listener_toml, pool_toml
from tests.grpcbackend import GrpcBackend
from tests.integration.test_workers import Spawn, start_node
from tests.tlsutil import make_ca


def test_workers_reach_an_h2_tls_pool(spawn: Spawn, tmp_path: Path) -> None:
    ca = make_ca(tmp_path, "backends")
    backend = GrpcBackend("g1", tls=ca.issue(tmp_path, "g1", ["api.internal"]))
    try:
        port = free_port()
        pool = pool_toml("p", [str(backend.address)], protocol="h2",
                         _extra=f'  [pools.tls]\n  enabled = true\n  ca = "{ca.path}"\n  server_name = "api.internal"\n')
        listener = listener_toml("web", "http", "p", bind=f"127.0.0.1:{port}",
                                 extra="  [listeners.http2]\n  enabled = true\n")
        start_node(spawn, tmp_path, backend.port, pool=pool, listener=listener)
        names = []
        for _ in range(10):  # a connection each: the workers take turns accepting
            with grpc.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.use_local_subchannel_pool", 1),
                                                                     ("grpc.enable_http_proxy", 0)]) as channel:
                names.append(channel.unary_unary("/test.Who/Name")(b"", timeout=10))
        assert names == [b"g1"] * 10
    finally:
        backend.stop()
