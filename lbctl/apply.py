"""Declarative pools: read a pools file, compare it with the store, say what would change.

Owns the plan (create / update / delete / unchanged / kept per pool, with
field-level changes). Pure: no network; ``cli`` lists the pools and carries
the plan out with the revisions recorded here (no lost updates).
"""

from __future__ import annotations

import json
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lbnode.model import (
    ConfigError,
    HealthCheck,
    Outlier,
    Pool,
    PoolTimeouts,
    Table,
    pool_from_dict,
    pool_to_dict,
)


class PoolsFileError(Exception):
    """An unusable pools file; ``str()`` is the one line to print (file, key path, reason)."""


def load_pools_file(path: str, *, single_path: str = "pool") -> list[Pool]:
    """``[[pools]]`` tables (the node.toml pool schema), or one pool as the whole document.

    TOML, or JSON when the name ends in ``.json``; ``-`` reads stdin as TOML.
    Validated exactly like node.toml, errors name the key: ``pools[1].backends[0].address``.
    """
    try:
        if path == "-":
            import sys

            text, name = sys.stdin.read(), "<stdin>"
        else:
            text, name = Path(path).read_text(), path
    except OSError as exc:
        raise PoolsFileError(f"{path}: {exc.strerror or exc}") from None
    try:
        data: Any = json.loads(text) if name.endswith(".json") else tomllib.loads(text)
    except (ValueError, tomllib.TOMLDecodeError) as exc:
        raise PoolsFileError(f"{name}: invalid {'JSON' if name.endswith('.json') else 'TOML'}: {exc}") from None
    try:
        if isinstance(data, dict) and "pools" not in data and "name" in data:
            return [pool_from_dict(data, single_path)]
        root = Table(data, "")
        pools = [pool_from_dict(t.data, t.path) for t in root.tables("pools")]
        root.done()
        seen: dict[str, int] = {}
        for i, pool in enumerate(pools):
            if pool.name in seen:
                raise ConfigError(f"pools[{i}].name", f'"{pool.name}" is already used by pools[{seen[pool.name]}]')
            seen[pool.name] = i
    except ConfigError as exc:
        raise PoolsFileError(f"{name}: {exc}") from None
    return pools


@dataclass(frozen=True, slots=True)
class PoolPlan:
    name: str
    action: str  # "create" | "update" | "delete" | "unchanged" | "keep" (absent from the file, no --prune)
    pool: Pool | None  # what to write (create/update)
    revision: int  # the store revision it was read at (update/delete/unchanged/keep)
    changes: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Plan:
    pools: tuple[PoolPlan, ...]
    store_revision: int

    @property
    def writes(self) -> tuple[PoolPlan, ...]:
        """Creates first, then updates, then deletes (a listener's pool is never missing in between)."""
        order = {"create": 0, "update": 1, "delete": 2}
        return tuple(sorted((p for p in self.pools if p.action in order), key=lambda p: order[p.action]))

    def count(self, action: str) -> int:
        return sum(1 for p in self.pools if p.action == action)


def make_plan(desired: list[Pool], current: dict[str, tuple[Pool, int]], store_revision: int, *, prune: bool) -> Plan:
    plans: list[PoolPlan] = []
    wanted = {p.name: p for p in desired}
    for name in sorted(set(wanted) | set(current)):
        new = wanted.get(name)
        old, revision = current.get(name, (None, 0))
        if old is None:
            assert new is not None
            plans.append(PoolPlan(name, "create", new, 0, describe_new(new)))
        elif new is None:
            plans.append(PoolPlan(name, "delete" if prune else "keep", None, revision))
        elif new == old:
            plans.append(PoolPlan(name, "unchanged", None, revision))
        else:
            plans.append(PoolPlan(name, "update", new, revision, field_changes(old, new)))
    return Plan(tuple(plans), store_revision)


def describe_new(pool: Pool) -> tuple[str, ...]:
    return tuple(f"backend {b.id}: added" for b in pool.backends)


def field_changes(old: Pool, new: Pool) -> tuple[str, ...]:
    """One line per changed setting (``health.interval: 2 -> 5``) and per backend added, removed or changed."""
    before, after = pool_to_dict(old), pool_to_dict(new)
    old_backends, new_backends = before.pop("backends"), after.pop("backends")
    lines: list[str] = []
    for key in sorted(set(before) | set(after)):
        a, b = before.get(key), after.get(key)
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict):  # a section changed: name its fields
            defaults = _SECTION_DEFAULTS.get(key, {})
            lines += _dict_changes(_flatten(a, f"{key}."), _flatten(b, f"{key}."), "", defaults)
        elif isinstance(a, dict) or isinstance(b, dict):  # a section added or removed
            lines.append(f"{key}: {_show(a, a is not None)} -> {_show(b, b is not None)}".replace("(default)", "(none)"))
        else:
            lines += _dict_changes({key: a} if key in before else {}, {key: b} if key in after else {}, "", _POOL_DEFAULTS)
    olds = {_backend_id(b): b for b in old_backends}
    news = {_backend_id(b): b for b in new_backends}
    for bid in news:
        if bid not in olds:
            lines.append(f"backend {bid}: added" + (f" ({news[bid]['address']})" if news[bid].get("name") else ""))
    for bid in olds:
        if bid not in news:
            lines.append(f"backend {bid}: removed")
    for bid in news:
        if bid in olds and olds[bid] != news[bid]:
            lines += _dict_changes(_backend_view(olds[bid]), _backend_view(news[bid]), f"backend {bid} ", {})
    common_old = [b for b in olds if b in news]
    common_new = [b for b in news if b in olds]
    if common_old != common_new:
        lines.append("backends: order changed")
    return tuple(lines)


def _backend_id(entry: dict[str, Any]) -> str:
    return str(entry.get("name") or entry["address"])


def _backend_view(entry: dict[str, Any]) -> dict[str, Any]:
    # Defaults shown explicitly, so "admin: enabled -> draining" reads naturally.
    return {"weight": 1, "admin": "enabled", **{k: v for k, v in entry.items() if k != "name"}}


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _dict_changes(old: dict[str, Any], new: dict[str, Any], prefix: str, defaults: dict[str, Any]) -> list[str]:
    """``key: old -> new``; a key left out is at its default (shown when known)."""
    lines = []
    for key in sorted(set(old) | set(new)):
        a = old.get(key, defaults.get(key))
        b = new.get(key, defaults.get(key))
        if a != b:
            lines.append(f"{prefix}{key}: {_show(a, a is not None)} -> {_show(b, b is not None)}")
    return lines


def _show(value: Any, present: bool) -> str:
    return json.dumps(value) if present else "(default)"


def _defaults(value: Any, prefix: str = "") -> dict[str, Any]:
    """The dataclass defaults of a pool or section, flattened like ``pool_to_dict`` output."""
    out = {}
    for name in value.__dataclass_fields__:
        v = getattr(value, name)
        if isinstance(v, str | int | float | bool):
            out[f"{prefix}{name}"] = v
    return out


_POOL_DEFAULTS = _defaults(Pool(name="-"))
_SECTION_DEFAULTS = {
    "timeouts": _defaults(PoolTimeouts(), "timeouts."),
    "health": _defaults(HealthCheck(), "health."),
    "outlier": _defaults(Outlier(), "outlier."),
}
