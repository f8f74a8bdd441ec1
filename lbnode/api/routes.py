"""Route messages <-> the node.toml route schema (the ``[[listeners.routes]]`` table as a dict).

Owns the mapping only: listener and name as fields, the rest of the table as JSON in
``spec_json``. Never validates a route itself: ``lbnode.model.route_from_dict`` does, so the
API, lbctl and the config file report errors alike.
"""

from __future__ import annotations

import json
from collections.abc import Collection
from typing import Any

from lbnode.api.fulcrum.v1 import control_pb2 as pb
from lbnode.model import ConfigError, missing_pools
from lbnode.routing import Route


def route_message(listener: str, route: Route, revision: int = 0, pools: Collection[str] | None = None) -> pb.Route:
    """``pools``: the pools that exist (None: do not say which are missing)."""
    spec = {k: v for k, v in route.spec.items() if k != "name"}
    return pb.Route(
        listener=listener,
        name=route.name,
        spec_json=json.dumps(spec, sort_keys=True) if spec else "",
        revision=revision,
        pools=list(route.pools),
        missing_pools=missing_pools(route, pools) if pools is not None else [],
    )


def route_dict(msg: pb.Route, path: str = "route") -> dict[str, Any]:
    """A route message as its table (name included); ConfigError (keyed under ``path``) if spec_json is unusable."""
    data: dict[str, Any] = {}
    if msg.spec_json.strip():
        try:
            spec = json.loads(msg.spec_json)
        except ValueError as exc:
            raise ConfigError(f"{path}.spec_json", f"is not JSON: {exc}") from None
        if not isinstance(spec, dict):
            raise ConfigError(f"{path}.spec_json", "must be a JSON object of route settings")
        for key in ("name", "listener"):
            if key in spec:
                raise ConfigError(f"{path}.spec_json.{key}", f"set it in the Route message field {key!r}")
        data.update(spec)
    data["name"] = msg.name
    return data


def message_route_dict(msg: pb.Route) -> dict[str, Any]:
    """What a client shows for a route message: listener, name, revision, then the table."""
    data = route_dict(msg)
    out: dict[str, Any] = {"listener": msg.listener, "name": data.pop("name"), "revision": msg.revision}
    out.update(data)
    if msg.missing_pools:
        out["missing_pools"] = list(msg.missing_pools)
    return out
