"""The control API client: one call, tried on each endpoint in turn while they are UNAVAILABLE.

Owns channels, credentials and turning gRPC failures into ``ControlError``
(status code name and details, one line). Never talks to etcd.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import grpc

from lbctl.settings import Settings
from lbnode.api.fulcrum.v1 import control_pb2 as pb
from lbnode.api.fulcrum.v1 import control_pb2_grpc as rpc

STUBS: dict[str, Callable[[grpc.Channel], Any]] = {
    "Pools": rpc.PoolsStub,
    "Backends": rpc.BackendsStub,
    "Cluster": rpc.ClusterStub,
    "Certificates": rpc.CertificatesStub,
    "Routes": rpc.RoutesStub,
}


class ControlError(Exception):
    """A failed call: ``code`` is the gRPC status code name (NOT_FOUND, ABORTED...)."""

    def __init__(self, code: str, details: str) -> None:
        super().__init__(f"{code}: {details}")
        self.code = code
        self.details = details


class ControlClient:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._channels: dict[str, grpc.Channel] = {}
        self._preferred = 0  # the endpoint that answered last

    def close(self) -> None:
        for channel in self._channels.values():
            channel.close()
        self._channels.clear()

    def __enter__(self) -> ControlClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _channel(self, endpoint: str) -> grpc.Channel:
        channel = self._channels.get(endpoint)
        if channel is None:
            tls = self.settings.tls
            if tls is None:
                channel = grpc.insecure_channel(endpoint)
            else:
                credentials = grpc.ssl_channel_credentials(
                    root_certificates=tls.ca, private_key=tls.key, certificate_chain=tls.cert
                )
                channel = grpc.secure_channel(endpoint, credentials)
            self._channels[endpoint] = channel
        return channel

    def _order(self) -> list[int]:
        n = len(self.settings.endpoints)
        return [(self._preferred + i) % n for i in range(n)]

    def call(self, service: str, method: str, request: Any) -> Any:
        """One unary call; the next endpoint is tried only when one is UNAVAILABLE."""
        failures = []
        for i in self._order():
            endpoint = self.settings.endpoints[i]
            stub = STUBS[service](self._channel(endpoint))
            try:
                response = getattr(stub, method)(request, timeout=self.settings.timeout)
            except grpc.RpcError as exc:
                code: grpc.StatusCode = exc.code()
                if code == grpc.StatusCode.UNAVAILABLE:
                    failures.append(f"{endpoint}: {exc.details()}")
                    continue
                raise ControlError(code.name, exc.details() or "") from None
            self._preferred = i
            return response
        raise ControlError("UNAVAILABLE", "; ".join(failures))

    def call_each(self, endpoints: list[str], service: str, method: str, request: Any,
                  timeout: float) -> dict[str, Any]:
        """The same unary call to every endpoint at once (not a failover: each node answers for
        itself); each endpoint maps to its response or to the ControlError it failed with."""
        futures = {e: getattr(STUBS[service](self._channel(e)), method).future(request, timeout=timeout)
                   for e in endpoints}
        out: dict[str, Any] = {}
        for endpoint, future in futures.items():
            try:
                out[endpoint] = future.result()
            except grpc.RpcError as exc:
                out[endpoint] = ControlError(exc.code().name, exc.details() or "")
        return out

    def watch(self, on_start: Callable[[str], None] | None = None) -> Iterator[pb.Event]:
        """WatchEvents from the first endpoint that answers; ``on_start(endpoint)`` once it streams.

        Only a stream that could not start moves on to the next endpoint; one
        that breaks later ends with ControlError (the caller re-lists and watches again).
        """
        failures = []
        for i in self._order():
            endpoint = self.settings.endpoints[i]
            stream = STUBS["Cluster"](self._channel(endpoint)).WatchEvents(pb.WatchEventsRequest())
            try:
                stream.initial_metadata()  # headers: the server has subscribed, nothing later is missed
                if stream.done() and stream.code() == grpc.StatusCode.UNAVAILABLE:
                    failures.append(f"{endpoint}: {stream.details()}")
                    continue
                self._preferred = i
                if on_start is not None:
                    on_start(endpoint)
                yield from stream
                return
            except grpc.RpcError as exc:
                raise ControlError(exc.code().name, exc.details() or "") from None
            finally:
                stream.cancel()
        raise ControlError("UNAVAILABLE", "; ".join(failures))
