"""Pool messages <-> the node.toml pool schema (plain dicts that ``pool_from_dict`` validates).

Owns the mapping only: explicit fields for name, algorithm and backends, the
rest of a pool as JSON in ``spec_json``. Never validates a pool itself: the
model does, so the API, lbctl and the config file report errors alike.
"""

from __future__ import annotations

import json
from typing import Any

from lbnode.api.fulcrum.v1 import control_pb2 as pb
from lbnode.model import ConfigError, Pool, pool_to_dict

# Carried by Pool message fields, so spec_json must not set them too.
EXPLICIT_KEYS = ("name", "algorithm", "backends")


def pool_message(pool: Pool, revision: int = 0) -> pb.Pool:
    data = pool_to_dict(pool)
    backends = [backend_message(b) for b in data.pop("backends", [])]
    data.pop("name")
    algorithm = data.pop("algorithm", pool.algorithm)
    return pb.Pool(
        name=pool.name,
        algorithm=algorithm,
        backends=backends,
        spec_json=json.dumps(data, sort_keys=True) if data else "",
        revision=revision,
    )


def backend_message(entry: dict[str, Any]) -> pb.Backend:
    """One backend table (as ``pool_to_dict`` writes it) as a message."""
    msg = pb.Backend(address=entry["address"], name=entry.get("name", ""), admin=entry.get("admin", ""))
    for key in ("weight", "max_inflight", "max_connections"):
        if key in entry:
            setattr(msg, key, entry[key])
    return msg


def backend_dict(msg: pb.Backend) -> dict[str, Any]:
    """A backend message as a backend table; absent fields stay absent (defaults apply)."""
    entry: dict[str, Any] = {"address": msg.address}
    if msg.HasField("weight"):
        entry["weight"] = msg.weight
    if msg.name:
        entry["name"] = msg.name
    if msg.admin:
        entry["admin"] = msg.admin
    for key in ("max_inflight", "max_connections"):
        if msg.HasField(key):
            entry[key] = getattr(msg, key)
    return entry


def pool_dict(msg: pb.Pool, path: str = "pool") -> dict[str, Any]:
    """A pool message as a ``[[pools]]`` table; ConfigError (keyed under ``path``) if spec_json is unusable."""
    data: dict[str, Any] = {}
    if msg.spec_json.strip():
        try:
            spec = json.loads(msg.spec_json)
        except ValueError as exc:
            raise ConfigError(f"{path}.spec_json", f"is not JSON: {exc}") from None
        if not isinstance(spec, dict):
            raise ConfigError(f"{path}.spec_json", "must be a JSON object of pool settings")
        for key in EXPLICIT_KEYS:
            if key in spec:
                raise ConfigError(f"{path}.spec_json.{key}", f"set it in the Pool message field {key!r}")
        data.update(spec)
    data["name"] = msg.name
    if msg.algorithm:
        data["algorithm"] = msg.algorithm
    data["backends"] = [backend_dict(b) for b in msg.backends]
    return data


def message_pool_dict(msg: pb.Pool) -> dict[str, Any]:
    """What a client shows for a pool message: the node.toml table, plus its revision."""
    data = pool_dict(msg)
    ordered: dict[str, Any] = {"name": data.pop("name"), "revision": msg.revision}
    ordered["algorithm"] = data.pop("algorithm", "round_robin")
    backends = data.pop("backends")
    ordered.update(data)
    ordered["backends"] = backends
    return ordered
