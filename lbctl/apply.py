"""Declarative configuration: read a file of pools, routes and certificates, compare it with the store, say what would change.

Owns the plan (create / update / delete / unchanged / kept per object, with
field-level changes). Pure but for reading the file and the certificate files it
names; no network: ``cli`` lists the store and carries the plan out with the
revisions recorded here (no lost updates).
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
    check_route_pools,
    pool_from_dict,
    pool_to_dict,
    route_from_dict,
)
from lbnode.routing import Route


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
    kind = "pool"

    @property
    def label(self) -> str:
        return f"pool {self.name}"


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


# --------------------------------------------------------------------------- pools, routes, certificates


@dataclass(frozen=True, slots=True)
class CertificateFiles:
    """A ``[[certificates]]`` entry of an apply file, read and validated (never printed: it holds a key)."""

    name: str
    chain_pem: bytes
    key_pem: bytes
    fingerprint: str


@dataclass(frozen=True, slots=True)
class Desired:
    """What an apply file asks for. A kind is ``None`` when the file has no section for it:
    then ``--prune`` leaves that kind alone (``routes = []`` asks for no routes at all)."""

    pools: list[Pool] | None
    routes: list[tuple[str, Route]] | None = None
    certificates: list[CertificateFiles] | None = None


def load_apply_file(path: str) -> Desired:
    """``[[pools]]``, ``[[routes]]`` (each with ``listener`` and ``name``, the other keys those of
    ``[[listeners.routes]]``) and ``[[certificates]]`` (``name``, ``cert``, ``key``: PEM files,
    relative to the file's directory). Validated like node.toml; errors name the file and the key."""
    text, name = _read(path)
    try:
        data: Any = json.loads(text) if name.endswith(".json") else tomllib.loads(text)
    except (ValueError, tomllib.TOMLDecodeError) as exc:
        raise PoolsFileError(f"{name}: invalid {'JSON' if name.endswith('.json') else 'TOML'}: {exc}") from None
    base = Path(path).parent if path != "-" else Path.cwd()
    try:
        if isinstance(data, dict) and "pools" not in data and "name" in data:
            return Desired([pool_from_dict(data, "pool")])
        root = Table(data, "")
        pools = [pool_from_dict(t.data, t.path) for t in root.tables("pools")] if root.has("pools") else None
        routes = _routes(root.tables("routes")) if root.has("routes") else None
        certificates = _certificates(root.tables("certificates"), base) if root.has("certificates") else None
        root.done()
        if pools is not None:
            _unique_names([p.name for p in pools], "pools")
    except ConfigError as exc:
        raise PoolsFileError(f"{name}: {exc}") from None
    return Desired(pools, routes, certificates)


def _read(path: str) -> tuple[str, str]:
    try:
        if path == "-":
            import sys

            return sys.stdin.read(), "<stdin>"
        return Path(path).read_text(), path
    except OSError as exc:
        raise PoolsFileError(f"{path}: {exc.strerror or exc}") from None


def _unique_names(names: list[str], section: str) -> None:
    seen: dict[str, int] = {}
    for i, n in enumerate(names):
        if n in seen:
            raise ConfigError(f"{section}[{i}].name", f'"{n}" is already used by {section}[{seen[n]}]')
        seen[n] = i


def _routes(tables: list[Table]) -> list[tuple[str, Route]]:
    out: list[tuple[str, Route]] = []
    seen: dict[tuple[str, str], str] = {}
    for t in tables:
        listener = t.name("listener")
        body = {k: v for k, v in t.data.items() if k != "listener"}
        route = route_from_dict(body, t.path)
        if (listener, route.name) in seen:
            raise ConfigError(t.key("name"), f'route "{route.name}" of listener "{listener}" is already '
                              f"defined by {seen[(listener, route.name)]}")
        seen[(listener, route.name)] = t.path
        out.append((listener, route))
    return out


def _certificates(tables: list[Table], base: Path) -> list[CertificateFiles]:
    from lbnode.tls.certs import CertificateError, load_certificate

    out = []
    for t in tables:
        name = t.name("name")
        pems = []
        for key in ("cert", "key"):
            file = base / t.str(key)
            try:
                pems.append(file.read_bytes())
            except OSError as exc:
                raise ConfigError(t.key(key), f"cannot read {file}: {exc.strerror or exc}") from None
        t.done()
        try:
            cert = load_certificate(name, pems[0], pems[1])
        except CertificateError as exc:
            raise ConfigError(t.path, str(exc)) from None
        out.append(CertificateFiles(name, pems[0], pems[1], cert.fingerprint))
    _unique_names([c.name for c in out], "certificates")
    return out


@dataclass(frozen=True, slots=True)
class Step:
    """One object's part of a plan; ``payload`` is what to write (a Route, CertificateFiles)."""

    kind: str  # "route" | "certificate"
    key: tuple[str, ...]  # (listener, name) | (name,)
    action: str  # as PoolPlan.action
    revision: int
    changes: tuple[str, ...] = ()
    payload: Any = None

    @property
    def label(self) -> str:
        return f"{self.kind} {'/'.join(self.key)}"


@dataclass(frozen=True, slots=True)
class FullPlan:
    """Pools (as ``Plan``), routes and certificates; ``writes`` in an order that never leaves a
    route naming a pool that is not there yet, nor a pool deleted before its routes."""

    pools: Plan
    routes: tuple[Step, ...] = ()
    certificates: tuple[Step, ...] = ()

    @property
    def writes(self) -> tuple[Any, ...]:
        def of(items: Any, action: str) -> list[Any]:
            return [i for i in items if i.action == action]

        pools = self.pools.pools
        return tuple(
            of(pools, "create") + of(pools, "update") + of(self.certificates, "create") + of(self.certificates, "update")
            + of(self.routes, "create") + of(self.routes, "update") + of(self.routes, "delete")
            + of(pools, "delete") + of(self.certificates, "delete")
        )

    def count(self, action: str) -> int:
        return self.pools.count(action) + sum(1 for s in (*self.routes, *self.certificates) if s.action == action)


def plan_routes(
    desired: list[tuple[str, Route]] | None, current: dict[tuple[str, str], tuple[Route, int]], *, prune: bool
) -> tuple[Step, ...]:
    """Routes compared by their tables (the same keys with the same values: unchanged)."""
    wanted = {(li, r.name): r for li, r in desired or []}
    steps = []
    for key in sorted(set(wanted) | (set(current) if desired is not None else set())):
        new = wanted.get(key)
        old, revision = current.get(key, (None, 0))
        if old is None:
            assert new is not None
            steps.append(Step("route", key, "create", 0, _spec_lines({}, dict(new.spec)), new))
        elif new is None:
            steps.append(Step("route", key, "delete" if prune else "keep", revision))
        elif dict(new.spec) == dict(old.spec):
            steps.append(Step("route", key, "unchanged", revision))
        else:
            steps.append(Step("route", key, "update", revision, _spec_lines(dict(old.spec), dict(new.spec)), new))
    return tuple(steps)


def _spec_lines(old: dict[str, Any], new: dict[str, Any]) -> tuple[str, ...]:
    old.pop("name", None)
    new.pop("name", None)
    lines = []
    for key in sorted(set(old) | set(new)):
        if old.get(key) != new.get(key):
            before = json.dumps(old[key]) if key in old else "(none)"
            after = json.dumps(new[key]) if key in new else "(none)"
            lines.append(f"{key}: {before} -> {after}")
    return tuple(lines)


def plan_certificates(
    desired: list[CertificateFiles] | None, current: dict[str, tuple[str, bytes, int]], *, prune: bool
) -> tuple[Step, ...]:
    """``current``: the store's certificates as (fingerprint, chain PEM, revision); a certificate
    whose leaf and chain are the same is unchanged (its key must match the leaf, so it is too)."""
    wanted = {c.name: c for c in desired or []}
    steps = []
    for name in sorted(set(wanted) | (set(current) if desired is not None else set())):
        new = wanted.get(name)
        if name not in current:
            assert new is not None
            steps.append(Step("certificate", (name,), "create", 0, (f"sha256 {new.fingerprint}",), new))
            continue
        fingerprint, chain, revision = current[name]
        if new is None:
            steps.append(Step("certificate", (name,), "delete" if prune else "keep", revision))
        elif new.fingerprint == fingerprint and new.chain_pem.strip() == chain.strip():
            steps.append(Step("certificate", (name,), "unchanged", revision))
        else:
            change = f"sha256 {fingerprint} -> {new.fingerprint}" if new.fingerprint != fingerprint else "chain changed"
            steps.append(Step("certificate", (name,), "update", revision, (change,), new))
    return tuple(steps)


def check_route_targets(desired: Desired, plan: Plan, current_pools: set[str]) -> None:
    """Every pool a route of the file names exists once the plan is applied: ConfigError naming
    ``routes[i]...`` otherwise, before anything is written."""
    pools = (current_pools | {p.name for p in desired.pools or []}) - {p.name for p in plan.pools if p.action == "delete"}
    for i, (_, route) in enumerate(desired.routes or []):
        check_route_pools(route, pools, f"routes[{i}]")
