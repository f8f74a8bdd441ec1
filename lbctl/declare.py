"""``lbctl apply`` and ``lbctl routes``: read the store, plan with ``lbctl.apply``, print, write.

Owns carrying a plan out through the control API (in an order that never leaves a route
naming a missing pool, each write at the revision the plan read) and the route commands.
The plan itself is ``lbctl.apply``'s (pure); connection handling and errors are ``lbctl.cli``'s.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from typing import Any

from lbctl.cli import _call, _json
from lbctl.failure import Failure


def _load_apply(path: str) -> Any:
    from lbctl.apply import PoolsFileError, load_apply_file

    try:
        return load_apply_file(path)
    except PoolsFileError as exc:
        raise Failure(str(exc)) from None


def cmd_apply(args: argparse.Namespace, client: Any) -> int:
    from lbctl.apply import (
        Desired,
        FullPlan,
        Plan,
        check_route_targets,
        make_plan,
        plan_certificates,
        plan_routes,
    )
    from lbctl.output import emit_json
    from lbnode.api.fulcrum.v1 import control_pb2 as pb
    from lbnode.api.pools import pool_dict
    from lbnode.api.routes import route_dict
    from lbnode.model import ConfigError, pool_from_dict, route_from_dict

    desired = _load_apply(args.file)
    if getattr(args, "routes_only", False):  # lbctl routes apply: the file's routes, nothing else
        desired = Desired(None, desired.routes or [], None)
    listed = _call(client, "Pools", "ListPools", pb.ListPoolsRequest())
    current = {m.name: (pool_from_dict(pool_dict(m)), m.revision) for m in listed.pools}
    pools = (make_plan(desired.pools, current, listed.revision, prune=args.prune) if desired.pools is not None
             else Plan((), listed.revision))
    try:
        check_route_targets(desired, pools, set(current))
    except ConfigError as exc:
        raise Failure(f"{args.file}: {exc}") from None
    routes: tuple[Any, ...] = ()
    if desired.routes is not None:
        stored = _call(client, "Routes", "ListRoutes", pb.ListRoutesRequest())
        now = {(m.listener, m.name): (route_from_dict(route_dict(m)), m.revision) for m in stored.routes}
        routes = plan_routes(desired.routes, now, prune=args.prune)
    certificates: tuple[Any, ...] = ()
    if desired.certificates is not None:
        certs = _call(client, "Certificates", "ListCertificates", pb.ListCertificatesRequest())
        wanted = {c.name: c.fingerprint for c in desired.certificates}
        in_store: dict[str, tuple[str, bytes, int]] = {}
        for c in certs.certificates:
            if c.source != "store":
                continue  # node.toml's: a certificate of the file of that name is stored (and wins)
            chain = b""
            if wanted.get(c.name) == c.fingerprint:  # the same leaf: is the chain the same too?
                got = _call(client, "Certificates", "GetCertificate", pb.GetCertificateRequest(name=c.name))
                chain = got.chain_pem.encode()
            in_store[c.name] = (c.fingerprint, chain, c.revision)
        certificates = plan_certificates(desired.certificates, in_store, prune=args.prune)
    plan = FullPlan(pools, routes, certificates)
    as_json = _json(args)
    if not as_json:
        _print_plan(plan, args.file)
    done: list[str] = []
    report: dict[str, Any] = _report(plan.pools.pools, lambda p: p.name) if desired.pools is not None or not (
        routes or certificates) else {}
    for kind, steps in (("routes", routes), ("certificates", certificates)):
        if steps:
            report[kind] = _report(steps, lambda s: "/".join(s.key))
    report["applied"] = False
    if args.dry_run or not plan.writes:
        if as_json:
            emit_json(report)
        elif args.dry_run and plan.writes:
            print("dry run: nothing applied")
        return 0
    for step in plan.writes:
        label = step.label
        try:
            _write_step(client, step)
        except Failure as exc:
            so_far = f" (applied before it: {', '.join(done)})" if done else " (nothing applied)"
            raise Failure(f"{step.action} {label}: {exc}{so_far}") from None
        # created api, updated route public/api: pools keep their bare names
        done.append(f"{step.action}d {step.name if label.startswith('pool ') else label}")
    report["applied"] = True
    if as_json:
        emit_json(report)
    else:
        print(f"applied: {', '.join(done)}")
    return 0


def _report(items: Any, name: Callable[[Any], str]) -> dict[str, Any]:
    def named(action: str) -> list[str]:
        return [name(p) for p in items if p.action == action]

    return {
        "created": named("create"),
        "updated": [{"name": name(p), "revision": p.revision, "changes": list(p.changes)}
                    for p in items if p.action == "update"],
        "deleted": named("delete"),
        "unchanged": named("unchanged"),
        "kept": named("keep"),
    }


def _write_step(client: Any, step: Any) -> None:
    """One write of an apply plan, at the revision the plan read (no lost updates)."""
    from lbnode.api.fulcrum.v1 import control_pb2 as pb
    from lbnode.api.pools import pool_message
    from lbnode.api.routes import route_message

    if step.kind == "pool":
        if step.action == "create":
            _call(client, "Pools", "CreatePool", pb.CreatePoolRequest(pool=pool_message(step.pool)))
        elif step.action == "update":
            _call(client, "Pools", "UpdatePool",
                  pb.UpdatePoolRequest(pool=pool_message(step.pool), expected_revision=step.revision))
        else:
            _call(client, "Pools", "DeletePool", pb.DeletePoolRequest(name=step.name, expected_revision=step.revision))
    elif step.kind == "route":
        listener, name = step.key
        if step.action == "delete":
            _call(client, "Routes", "DeleteRoute",
                  pb.DeleteRouteRequest(listener=listener, name=name, expected_revision=step.revision))
        else:
            _call(client, "Routes", "PutRoute",
                  pb.PutRouteRequest(route=route_message(listener, step.payload), expected_revision=step.revision))
    else:
        (name,) = step.key
        if step.action == "delete":
            _call(client, "Certificates", "DeleteCertificate",
                  pb.DeleteCertificateRequest(name=name, expected_revision=step.revision))
        else:
            _call(client, "Certificates", "PutCertificate",
                  pb.PutCertificateRequest(name=name, chain_pem=step.payload.chain_pem, key_pem=step.payload.key_pem,
                                           expected_revision=step.revision))


def cmd_routes_list(args: argparse.Namespace, client: Any) -> int:
    from lbctl.output import emit_json, table
    from lbnode.api.fulcrum.v1 import control_pb2 as pb
    from lbnode.api.routes import message_route_dict

    response = _call(client, "Routes", "ListRoutes", pb.ListRoutesRequest(listener=args.listener))
    if _json(args):
        emit_json({"revision": response.revision, "routes": [message_route_dict(m) for m in response.routes]})
        return 0
    rows = []
    for m in response.routes:
        data = message_route_dict(m)
        match = " ".join(f"{k}={json.dumps(v)}" for k, v in data.items()
                         if k not in ("listener", "name", "revision", "pool", "split", "sticky", "priority",
                                      "missing_pools")) or "(any request)"
        pools = ", ".join(m.pools)
        if m.missing_pools:
            pools += f"  MISSING POOL {', '.join(m.missing_pools)}: 503"
        rows.append([m.listener, m.name, data.get("priority", 0), match, pools, m.revision])
    table(["LISTENER", "NAME", "PRIORITY", "MATCH", "POOLS", "REVISION"], rows)
    return 0


def cmd_routes_show(args: argparse.Namespace, client: Any) -> int:
    from lbctl.output import emit_json
    from lbnode.api.fulcrum.v1 import control_pb2 as pb
    from lbnode.api.routes import message_route_dict

    msg = _call(client, "Routes", "GetRoute", pb.GetRouteRequest(listener=args.listener, name=args.name))
    data = message_route_dict(msg)
    if _json(args):
        emit_json(data)
        return 0
    print(f"route {data.pop('name')} of listener {data.pop('listener')} (revision {data.pop('revision')})")
    missing = data.pop("missing_pools", [])
    for key, value in data.items():
        print(f"  {key} = {json.dumps(value)}")
    if missing:
        print(f"  MISSING POOL {', '.join(missing)}: its requests answer 503 (pool ... is not configured)")
    return 0


def cmd_routes_delete(args: argparse.Namespace, client: Any) -> int:
    from lbctl.output import emit_json
    from lbnode.api.fulcrum.v1 import control_pb2 as pb

    request = pb.DeleteRouteRequest(listener=args.listener, name=args.name)
    if args.revision is not None:
        request.expected_revision = args.revision
    _call(client, "Routes", "DeleteRoute", request)
    if _json(args):
        emit_json({"deleted": {"listener": args.listener, "name": args.name}})
    else:
        print(f"route {args.name} of listener {args.listener} deleted")
    return 0


def _print_plan(plan: Any, source: str) -> None:
    marks = {"create": "+", "update": "~", "delete": "-", "unchanged": "=", "keep": "!"}
    for p in (*plan.pools.pools, *plan.certificates, *plan.routes):
        mark = marks[p.action]
        label = p.label
        if p.action == "create":
            print(f"{mark} {label}: create")
        elif p.action == "update":
            print(f"{mark} {label}: update (revision {p.revision})")
        elif p.action == "delete":
            print(f"{mark} {label}: delete (revision {p.revision})")
        elif p.action == "unchanged":
            print(f"{mark} {label}: unchanged")
        else:
            print(f"{mark} {label}: not in {source}; kept (--prune deletes it)")
        for line in p.changes:
            print(f"    {line}")
    counts = ", ".join(f"{plan.count(a)} {w}" for a, w in (
        ("create", "to create"), ("update", "to update"), ("delete", "to delete"), ("unchanged", "unchanged")))
    print("no changes" if not plan.writes else counts)
