"""A real gRPC backend for health-check tests: grpcio's server with grpc_health.v1's HealthServicer.

Besides the health service (statuses set per service with ``set``), it answers
``/test.Who/Name`` with its name (``Count`` streams ``name 0``, ``name 1``...; ``Chat`` echoes
each message upper-cased), so a test sees which backend a connection reached, and
records the peer (client address and port) of every health check, so a test sees how many
connections its checks used. ``health=False`` leaves the health service out (UNIMPLEMENTED);
``stall=True`` makes Check never answer.
"""

from __future__ import annotations

import threading
from concurrent import futures
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from lbnode.model import Address
from tests.tlsutil import CertFiles

WHO_METHOD = "/test.Who/Name"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
UNKNOWN = health_pb2.HealthCheckResponse.UNKNOWN


class _RecordingHealth(health.HealthServicer):
    def __init__(self, backend: GrpcBackend) -> None:
        super().__init__()
        self._backend = backend

    def Check(self, request: health_pb2.HealthCheckRequest, context: Any) -> Any:  # noqa: N802 (grpc's name)
        self._backend.peers.append(context.peer())
        if self._backend.stall:
            self._backend.released.wait()  # until stop(): the client gives up first
            context.abort(grpc.StatusCode.UNAVAILABLE, "stopped")
        return super().Check(request, context)


class GrpcBackend:
    def __init__(
        self,
        name: str,
        *,
        health: bool = True,
        stall: bool = False,
        tls: CertFiles | None = None,
        client_ca: bytes | None = None,
        port: int = 0,
        host: str = "127.0.0.1",
    ) -> None:
        self.name = name
        self.host = host
        self.stall = stall
        self.peers: list[str] = []
        self.released = threading.Event()
        self.health: _RecordingHealth | None = None
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        if health:
            self.health = _RecordingHealth(self)
            health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        who = grpc.unary_unary_rpc_method_handler(lambda _request, _context: name.encode())
        # Server streaming: b"3" -> b"name 0", b"name 1", b"name 2"; bidirectional: each message upper-cased.
        count = grpc.unary_stream_rpc_method_handler(
            lambda request, _context: (b"%s %d" % (name.encode(), i) for i in range(int(request))))
        chat = grpc.stream_stream_rpc_method_handler(lambda requests, _context: (r.upper() for r in requests))
        self.server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
            "test.Who", {"Name": who, "Count": count, "Chat": chat}),))
        bind = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        if tls is None:
            self.port = self.server.add_insecure_port(bind)
        else:
            credentials = grpc.ssl_server_credentials(
                [(tls.key.read_bytes(), tls.cert.read_bytes())],
                root_certificates=client_ca,
                require_client_auth=client_ca is not None,
            )
            self.port = self.server.add_secure_port(bind, credentials)
        assert self.port, f"grpc backend {name}: cannot bind {bind}"
        self.server.start()

    @property
    def address(self) -> Address:
        return Address(self.host, self.port)

    def set(self, service: str, status: int) -> None:
        assert self.health is not None
        self.health.set(service, status)  # type: ignore[arg-type]

    def stop(self) -> None:
        self.released.set()
        self.server.stop(grace=None).wait(5)


def who(port: int) -> str:
    """Which backend a new connection to ``port`` (a listener of the node) reaches."""
    with grpc.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.use_local_subchannel_pool", 1),
                                                             ("grpc.enable_http_proxy", 0)]) as channel:
        answer: bytes = channel.unary_unary(WHO_METHOD)(b"", timeout=5)
        return answer.decode()
