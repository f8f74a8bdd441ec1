"""Backend edits (add, remove, weight, drain/enable/disable) as read-modify-writes of a pool.

Owns finding a backend by id or address and retrying a write that lost a
race with another writer. Validation is the model's (``pool_from_dict``);
storage is the store's. Blocking (store calls): run it in a worker thread.
"""

from __future__ import annotations

import random
import re
import time
from collections.abc import Callable
from typing import Any

from lbnode.cluster.store import AlreadyExists, Conflict, NotFound, PoolRecord, PoolStore
from lbnode.model import ConfigError, pool_from_dict, pool_to_dict

# Attempts of one read-modify-write before Conflict reaches the caller: enough
# for a handful of operators (or scripts) at once, few enough to fail fast on a write storm.
ATTEMPTS = 8
# Pause before a retry, times the attempt number, randomised so that writers who
# collided do not collide again in lockstep.
RETRY_PAUSE = 0.005

Edit = Callable[[list[dict[str, Any]]], bool]  # changes the backend tables in place; False = nothing to do


class BackendNotFound(NotFound):
    pass


def add_backend(store: PoolStore, pool_name: str, entry: dict[str, Any]) -> PoolRecord:
    """Append a backend (a ``[[pools.backends]]`` table); AlreadyExists if its id is taken."""
    # Validated alone first, so errors name the request's backend and not its future index.
    try:
        backend = pool_from_dict({"name": pool_name, "backends": [entry]}, "pool").backends[0]
    except ConfigError as exc:
        raise _rekey(exc, 0) from None

    def edit(backends: list[dict[str, Any]]) -> bool:
        for existing in backends:
            if _id(existing) == backend.id:
                raise AlreadyExists(f'pool "{pool_name}" already has backend "{backend.id}"')
        backends.append(entry)
        return True

    return edit_backends(store, pool_name, edit)


def remove_backend(store: PoolStore, pool_name: str, ref: str) -> PoolRecord:
    def edit(backends: list[dict[str, Any]]) -> bool:
        del backends[find_backend(pool_name, backends, ref)]
        return True

    return edit_backends(store, pool_name, edit)


def set_weight(store: PoolStore, pool_name: str, ref: str, weight: int) -> PoolRecord:
    return _set(store, pool_name, ref, "weight", weight, default=1)


def set_admin(store: PoolStore, pool_name: str, ref: str, admin: str) -> PoolRecord:
    """``admin`` is enabled, draining or disabled (validated by the model)."""
    return _set(store, pool_name, ref, "admin", admin, default="enabled")


def _set(store: PoolStore, pool_name: str, ref: str, key: str, value: object, default: object) -> PoolRecord:
    def edit(backends: list[dict[str, Any]]) -> bool:
        entry = backends[find_backend(pool_name, backends, ref)]
        if entry.get(key, default) == value:
            return False
        entry[key] = value
        return True

    return edit_backends(store, pool_name, edit)


def edit_backends(store: PoolStore, pool_name: str, edit: Edit) -> PoolRecord:
    """Read the pool, ``edit`` its backend tables, write it back at the revision read.

    Retried when another writer changed the pool in between (the edit is
    applied again to what they wrote); the record as it is when nothing changed.
    """
    for attempt in range(ATTEMPTS):
        record = store.get_pool(pool_name)
        data = pool_to_dict(record.pool)
        backends: list[dict[str, Any]] = data["backends"]
        before = [dict(b) for b in backends]
        if not edit(backends):
            return record
        try:
            pool = pool_from_dict(data, "pool")
        except ConfigError as exc:
            changed = [i for i, b in enumerate(backends) if i >= len(before) or b != before[i]]
            raise _rekey(exc, changed[0] if changed else None) from None
        if pool == record.pool:
            return record
        try:
            return store.update_pool(pool, record.revision)
        except Conflict:
            if attempt == ATTEMPTS - 1:
                raise
            time.sleep(random.uniform(0, RETRY_PAUSE * (attempt + 1)))
    raise AssertionError("unreachable")


def find_backend(pool_name: str, backends: list[dict[str, Any]], ref: str) -> int:
    """Index of the backend whose id (name, else address) or address is ``ref``."""
    ref = ref.strip()
    if not ref:
        raise ConfigError("backend", "is required (a backend name or address)")
    for i, entry in enumerate(backends):
        if _id(entry) == ref:
            return i
    by_address = [i for i, entry in enumerate(backends) if entry["address"] == ref]
    if len(by_address) == 1:
        return by_address[0]
    if by_address:
        names = ", ".join(_id(backends[i]) for i in by_address)
        raise ConfigError("backend", f'"{ref}" is the address of {len(by_address)} backends ({names}): name one')
    raise BackendNotFound(f'pool "{pool_name}" has no backend "{ref}"')


def _id(entry: dict[str, Any]) -> str:
    return str(entry.get("name") or entry["address"])


def _rekey(exc: ConfigError, index: int | None) -> ConfigError:
    """``pool.backends[3].weight`` -> ``backend.weight``: the field of the request, not of the stored pool."""
    if index is None:
        return exc
    key = re.sub(rf"^pool\.backends\[{index}\]", "backend", exc.key)
    return ConfigError(key, exc.reason)
