"""The Routes servicer: routes in the store, validated before anything is written.

Owns the checks a route gets beyond its own table (``lbnode.model.route_from_dict``): its
listener is an http or https listener of the answering node, and every pool it names exists
in the store. Never pokes the data plane: nodes learn a change from their watch.
"""

from __future__ import annotations

import logging
from typing import Protocol

import trio

from lbnode.api.fulcrum.v1 import control_pb2 as pb
from lbnode.api.routes import route_dict, route_message
from lbnode.cluster.store import PoolStore
from lbnode.model import (
    L7_PROTOCOLS,
    NAME_RE,
    Config,
    ConfigError,
    check_route_pools,
    route_from_dict,
)
from lbnode.routing import route_order


class NodeConfig(Protocol):
    """What routes read of the node (``LbNode``, the server's ``NodeView``): its listeners."""

    config: Config

log = logging.getLogger("lbnode.control")


def _name(value: str, field: str) -> str:
    if not value:
        raise ConfigError(field, "is required")
    if not NAME_RE.fullmatch(value):
        raise ConfigError(field, f'"{value}" is not a valid name (letters, digits, "_", "-", "."; at most 63)')
    return value


class RouteControl:
    """What the Routes RPCs do; ``lbnode.control.server.RoutesServicer`` maps their errors to
    status codes. ``who`` names the caller in the audit log."""

    def __init__(self, store: PoolStore, node: NodeConfig, token: trio.lowlevel.TrioToken) -> None:
        self.store = store
        self.node = node
        self.token = token

    def _pool_names(self) -> set[str]:
        records, _ = self.store.list_pools()
        return {r.pool.name for r in records}

    def _l7_listeners(self) -> dict[str, str]:
        """This node's listeners and their protocols (read on the Trio thread)."""

        def read() -> dict[str, str]:
            return {li.name: li.protocol for li in self.node.config.listeners}

        return trio.from_thread.run_sync(read, trio_token=self.token)

    def list_routes(self, request: pb.ListRoutesRequest) -> pb.ListRoutesResponse:
        records, revision = self.store.routes.list_routes()
        pools = self._pool_names()
        by_listener: dict[str, list[pb.Route]] = {}
        for listener in sorted({r.listener for r in records}):
            if request.listener and listener != request.listener:
                continue
            mine = {r.route.name: r for r in records if r.listener == listener}
            by_listener[listener] = [route_message(listener, route, mine[route.name].revision, pools)
                                     for route in route_order(r.route for r in mine.values())]
        return pb.ListRoutesResponse(routes=[m for ms in by_listener.values() for m in ms], revision=revision)

    def get_route(self, request: pb.GetRouteRequest) -> pb.Route:
        record = self.store.routes.get_route(_name(request.listener, "listener"), _name(request.name, "name"))
        return route_message(record.listener, record.route, record.revision, self._pool_names())

    def put_route(self, request: pb.PutRouteRequest, who: str) -> pb.Route:
        msg = request.route
        listener = _name(msg.listener, "route.listener")
        _name(msg.name, "route.name")
        route = route_from_dict(route_dict(msg), "route")
        protocol = self._l7_listeners().get(listener)
        if protocol is None:
            raise ConfigError("route.listener", f'listener "{listener}" is not defined on this node')
        if protocol not in L7_PROTOCOLS:
            raise ConfigError("route.listener", f'listener "{listener}" is "{protocol}": routes need an http or '
                              "https listener")
        pools = self._pool_names()
        check_route_pools(route, pools, "route")
        expected = request.expected_revision if request.HasField("expected_revision") else None
        record = self.store.routes.put_route(listener, route, expected)
        log.info("route %s of listener %s put by %s (revision %d)", route.name, listener, who, record.revision)
        return route_message(listener, record.route, record.revision, pools)

    def delete_route(self, request: pb.DeleteRouteRequest, who: str) -> None:
        listener, name = _name(request.listener, "listener"), _name(request.name, "name")
        expected = request.expected_revision if request.HasField("expected_revision") else None
        self.store.routes.delete_route(listener, name, expected)
        log.info("route %s of listener %s deleted by %s", name, listener, who)
