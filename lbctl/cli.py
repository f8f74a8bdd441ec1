"""``lbctl``: the Fulcrum control CLI, a gRPC client of the nodes' control API (never etcd).

Owns the commands and turning every failure into one line on stderr and a
non-zero exit (the gRPC status code name and its details): no tracebacks.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lbctl import __version__
from lbctl.failure import Failure

EXIT_ERROR = 1
EXIT_USAGE = 2  # argparse's own code for a bad command line


# --------------------------------------------------------------------------- parser


def _connection_options(parser: argparse.ArgumentParser, default: Any, *, client_files: bool = True) -> None:
    """The options of every command; ``default`` SUPPRESS on subcommands so they may follow it too.

    ``client_files=False`` leaves out --cert/--key (``certs put`` uses them for the certificate
    it sends; lbctl's own then go before the command, or in LBCTL_CERT/LBCTL_KEY or lbctl.toml)."""
    parser.add_argument("--endpoint", "-e", action="append", metavar="HOST:PORT", default=default,
                        help="a node's control API (repeat or comma-separate; the next is tried when one is down)")
    parser.add_argument("--output", "-o", choices=("table", "json"), default=default, help="table (default) or json")
    parser.add_argument("--ca", metavar="FILE", default=default, help="the cluster CA certificate (PEM)")
    if client_files:
        parser.add_argument("--cert", metavar="FILE", default=default, help="this client's certificate (PEM)")
        parser.add_argument("--key", metavar="FILE", default=default, help="this client's private key (PEM)")
    parser.add_argument("--insecure", action="store_true", default=default if default is not None else False,
                        help="plain text, no certificates (labs and tests only)")
    parser.add_argument("--timeout", type=float, metavar="SECONDS", default=default, help="per call (default 10)")
    parser.add_argument("--config", type=Path, metavar="FILE", default=default,
                        help="lbctl.toml (default ~/.config/fulcrum/lbctl.toml)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lbctl",
        description="Fulcrum control CLI: talks to the control API of the lbnode nodes (gRPC, mutual TLS).",
        epilog="Endpoints and certificates also come from LBCTL_ENDPOINTS, LBCTL_CA, LBCTL_CERT, LBCTL_KEY, "
        "LBCTL_INSECURE, or ~/.config/fulcrum/lbctl.toml (flags win, then variables, then the file).",
    )
    parser.add_argument("--version", action="version", version=f"lbctl {__version__}")
    _connection_options(parser, None)
    common = argparse.ArgumentParser(add_help=False)
    _connection_options(common, argparse.SUPPRESS)

    without_client_files = argparse.ArgumentParser(add_help=False)
    _connection_options(without_client_files, argparse.SUPPRESS, client_files=False)

    def command(group: Any, name: str, help_text: str, func: Callable[..., int],
                parent: argparse.ArgumentParser = common, **defaults: Any) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = group.add_parser(name, help=help_text, description=help_text, parents=[parent])
        p.set_defaults(func=func, **defaults)
        return p

    from lbctl.declare import cmd_apply, cmd_routes_delete, cmd_routes_list, cmd_routes_show

    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    command(sub, "status", "the answering node: configuration revision and backend health", cmd_status)
    p = command(sub, "nodes", "the nodes of the cluster, their listeners and health (or: nodes drain NODE)", cmd_nodes)
    node_actions = p.add_subparsers(dest="nodes_command", metavar="ACTION")
    command(node_actions, "list", "the nodes of the cluster, their listeners and health", cmd_nodes)
    p = command(node_actions, "drain", "a node releases its VIPs, stops accepting, lets connections in flight "
                "finish, then exits 0 (what SIGTERM does)", cmd_nodes_drain)
    p.add_argument("node", help="the node id (lbctl nodes)")
    command(sub, "vips", "every VIP, the node holding it and since when", cmd_vips)
    p = command(sub, "top", "live view of the pools and backends of every node (summed): requests/s, errors, "
                "p50/p99 latency; redrawn each interval until Ctrl-C. -o json: one snapshot", cmd_top)
    p.add_argument("--interval", "-n", type=float, default=1.0, metavar="SECONDS",
                   help="seconds between refreshes, over which rates are computed (default 1)")

    pools = sub.add_parser("pools", help="list, show, create, delete pools").add_subparsers(
        dest="pools_command", metavar="ACTION", required=True
    )
    command(pools, "list", "every pool", cmd_pools_list)
    command(pools, "show", "one pool: settings and backends", cmd_pools_show).add_argument("name")
    p = command(pools, "create", "create the pool(s) of a file (node.toml pool schema)", cmd_pools_create)
    p.add_argument("-f", "--file", required=True, help="TOML ([[pools]] or one pool), .json, or - for stdin")
    p = command(pools, "delete", "delete a pool", cmd_pools_delete)
    p.add_argument("name")
    p.add_argument("--revision", type=int, help="only if the pool is still at this revision")

    p = command(sub, "apply", "make the store's pools, routes and certificates match a file: shows the diff, "
                "then applies it (a second run changes nothing)", cmd_apply)
    p.add_argument("-f", "--file", required=True, help="[[pools]] (node.toml schema), [[routes]] (listener, name and "
                   "the keys of [[listeners.routes]]), [[certificates]] (name, cert, key: PEM files)")
    p.add_argument("--prune", action="store_true", help="also delete the objects of each kind the file has a "
                   "section for that are not in it (routes = [] prunes every route)")
    p.add_argument("--dry-run", action="store_true", help="show the diff, change nothing")

    routes = sub.add_parser("routes", help="list, show, apply, delete L7 routes").add_subparsers(
        dest="routes_command", metavar="ACTION", required=True
    )
    p = command(routes, "list", "every route, in the order each listener tries them; a route naming a pool "
                "that does not exist is flagged (its requests answer 503)", cmd_routes_list)
    p.add_argument("--listener", "-l", default="", help="only this listener's routes")
    p = command(routes, "show", "one route: its table as stored", cmd_routes_show)
    p.add_argument("listener")
    p.add_argument("name")
    p = command(routes, "apply", "make the store's routes match the [[routes]] of a file (diff, then apply)",
                cmd_apply, routes_only=True)
    p.add_argument("-f", "--file", required=True, help="[[routes]] tables: listener, name and the keys of "
                   "[[listeners.routes]]")
    p.add_argument("--prune", action="store_true", help="also delete routes that are not in the file")
    p.add_argument("--dry-run", action="store_true", help="show the diff, change nothing")
    p = command(routes, "delete", "delete a route", cmd_routes_delete)
    p.add_argument("listener")
    p.add_argument("name")
    p.add_argument("--revision", type=int, help="only if the route is still at this revision")

    backends = sub.add_parser("backends", help="add, remove, weight, drain, enable, disable a backend").add_subparsers(
        dest="backends_command", metavar="ACTION", required=True
    )
    p = command(backends, "add", "add a backend to a pool", cmd_backends_add)
    p.add_argument("pool")
    p.add_argument("address", help="HOST:PORT")
    p.add_argument("--weight", type=int)
    p.add_argument("--name")
    p.add_argument("--max-inflight", type=int)
    p.add_argument("--max-connections", type=int)
    for action, help_text in (
        ("remove", "remove a backend"),
        ("drain", "no new sessions; sessions in progress finish"),
        ("enable", "take new sessions again"),
        ("disable", "no traffic at all"),
    ):
        p = command(backends, action, help_text, cmd_backends_simple, action=action)
        p.add_argument("pool")
        p.add_argument("backend", help="its name, or its address")
    p = command(backends, "weight", "set a backend's weight (0-1000; 0 = no new sessions)", cmd_backends_weight)
    p.add_argument("pool")
    p.add_argument("backend", help="its name, or its address")
    p.add_argument("weight", type=int)

    command(sub, "watch", "stream pool, backend health, node, VIP and certificate events until Ctrl-C", cmd_watch)

    certs = sub.add_parser("certs", help="TLS certificates of the listeners (put, list, show, delete), "
                           "and certificates for the control API (init)").add_subparsers(
        dest="certs_command", metavar="ACTION", required=True
    )
    p = command(certs, "put", "store a certificate for the listeners (create, or replace: a rotation); every "
                "node serves it to new handshakes without a reload. lbctl's own --cert/--key go before `certs`",
                cmd_certs_put, parent=without_client_files)
    p.add_argument("name", help="the certificate's name, as [listeners.tls] certificates names it")
    p.add_argument("--cert", dest="cert_file", required=True, metavar="FILE",
                   help="PEM chain: the certificate first, then its intermediates")
    p.add_argument("--key", dest="key_file", required=True, metavar="FILE", help="its PEM private key (no passphrase)")
    p.add_argument("--revision", type=int, help="replace only if it is still at this revision (0: only create)")
    command(certs, "list", "every certificate: names, issuer, expiry, the listeners using it", cmd_certs_list)
    command(certs, "show", "one certificate's details (never its key)", cmd_certs_show).add_argument("name")
    p = command(certs, "delete", "remove a certificate from the store", cmd_certs_delete)
    p.add_argument("name")
    p.add_argument("--revision", type=int, help="only if it is still at this revision")
    p = command(certs, "init", "a cluster CA, one certificate per node, admin and read-only client certificates",
                cmd_certs_init, offline=True)
    p.add_argument("--dir", required=True, type=Path)
    p.add_argument("--nodes", default="", help="node names, comma-separated: n1,n2,n3 "
                   "(may be left out with --etcd-members: etcd certificates only)")
    p.add_argument("--hosts", action="append", default=[], metavar="NODE=ADDR,...",
                   help="extra addresses or DNS names per node, e.g. n1=192.0.2.11,n2=192.0.2.12")
    p.add_argument("--etcd-members", action="append", default=[], metavar="MEMBER=ADDR,...",
                   help="also etcd's own CA, member and client certificates in DIR/etcd/, "
                        "e.g. m1=192.0.2.1,m2=192.0.2.2,m3=192.0.2.3")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    try:
        if getattr(args, "offline", False):
            return int(args.func(args, None))
        from lbctl.client import ControlClient
        from lbctl.settings import SettingsError, resolve

        try:
            settings = resolve(
                endpoints=args.endpoint, ca=args.ca, cert=args.cert, key=args.key, insecure=args.insecure,
                output=args.output, timeout=args.timeout, config_path=args.config,
            )
        except SettingsError as exc:
            raise Failure(str(exc)) from None
        args.output = settings.output
        with ControlClient(settings) as client:
            return int(args.func(args, client))
    except Failure as exc:
        print(f"lbctl: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `lbctl ... | head`
        return 0


# --------------------------------------------------------------------------- helpers


def _call(client: Any, service: str, method: str, request: Any) -> Any:
    from lbctl.client import ControlError

    try:
        return client.call(service, method, request)
    except ControlError as exc:
        raise Failure(str(exc)) from None


def _pool_dict(msg: Any) -> dict[str, Any]:
    from lbnode.api.pools import message_pool_dict

    return message_pool_dict(msg)


def _json(args: argparse.Namespace) -> bool:
    return bool(args.output == "json")


def _done(args: argparse.Namespace, pool_msg: Any, line: str) -> int:
    """A write's result: the pool as written (json) or one line saying what happened."""
    from lbctl.output import emit_json

    if _json(args):
        emit_json(_pool_dict(pool_msg))
    else:
        print(line)
    return 0


# --------------------------------------------------------------------------- commands


def cmd_status(args: argparse.Namespace, client: Any) -> int:
    from lbctl.output import emit_json, message_dict, table
    from lbnode.api.fulcrum.v1 import control_pb2 as pb

    status = _call(client, "Cluster", "Status", pb.StatusRequest())
    if _json(args):
        emit_json(message_dict(status))
        return 0
    state = "draining" if status.draining else "serving"
    print(f"node {status.node_id}: {state}, revision {status.config_revision}, "
          f"snapshot {status.snapshot_version}, {status.pools_count} pools")
    rows = []
    for pool in status.pools:
        for b in pool.backends:
            health = b.health + (f" ({b.health_reason})" if b.health_reason else "")
            ejected = f"ejected {b.ejected_for:g}s" if b.ejected_for > 0 else ""
            rows.append([pool.name, b.id, b.address, b.weight, b.admin, health, b.inflight, b.connections,
                         b.requests, b.failures, ejected])
    table(["POOL", "BACKEND", "ADDRESS", "WEIGHT", "ADMIN", "HEALTH", "INFLIGHT", "CONNS", "REQUESTS",
           "FAILURES", ""], rows)
    return 0


def cmd_nodes(args: argparse.Namespace, client: Any) -> int:
    from lbctl.client import ControlError
    from lbctl.output import emit_json, message_dict, table
    from lbnode.api.fulcrum.v1 import control_pb2 as pb

    listed = _call(client, "Cluster", "ListNodes", pb.ListNodesRequest())
    # The node that answers knows itself in full, the others only as they registered in etcd
    # (id, version, control address): each of them is asked for its own listeners, health and
    # revision, at once, so that none is shown with zeros it does not have.
    nodes = {n.id: n for n in listed.nodes}
    unreachable: dict[str, str] = {}
    asked = {_reachable(n.control_address, client.settings.endpoints): n.id
             for n in listed.nodes if n.control_address and not n.listeners}
    if asked:
        timeout = min(client.settings.timeout, 2.0)
        answers = client.call_each(list(asked), "Cluster", "ListNodes", pb.ListNodesRequest(), timeout)
        for endpoint, answer in answers.items():
            node_id = asked[endpoint]
            own = None if isinstance(answer, ControlError) else next(
                (n for n in answer.nodes if n.id == node_id), None)
            if own is None:
                unreachable[node_id] = f"{endpoint}: {answer}" if isinstance(answer, ControlError) else \
                    f"{endpoint} answered as another node"
            else:
                nodes[node_id] = own
    if _json(args):
        emit_json([dict(message_dict(n), **({"unreachable": unreachable[n.id]} if n.id in unreachable else {}))
                   for n in sorted(nodes.values(), key=lambda n: n.id)])
        return 0
    rows = []
    for n in sorted(nodes.values(), key=lambda n: n.id):
        if n.id in unreachable:
            rows.append([n.id, "unreachable", n.control_address, "-", unreachable[n.id], "-", n.version])
            continue
        listeners = ", ".join(f"{li.name} {li.protocol} {li.address} -> {li.pool}" for li in n.listeners)
        h = n.health
        health = f"{h.up} up, {h.down} down" + (f", {h.unknown} unknown" if h.unknown else "")
        rows.append([n.id, "draining" if n.draining else "serving", n.control_address, n.config_revision,
                     f"{h.pools} pools, {h.backends} backends: {health}", listeners, n.version])
    table(["NODE", "STATE", "CONTROL", "REVISION", "HEALTH", "LISTENERS", "VERSION"], rows)
    return 0


def cmd_nodes_drain(args: argparse.Namespace, client: Any) -> int:
    import dataclasses

    from lbctl.client import ControlClient
    from lbctl.output import emit_json, message_dict
    from lbnode.api.fulcrum.v1 import control_pb2 as pb

    nodes = _call(client, "Cluster", "ListNodes", pb.ListNodesRequest())
    found = next((n for n in nodes.nodes if n.id == args.node), None)
    if found is None:
        known = ", ".join(n.id for n in nodes.nodes) or "none"
        raise Failure(f"no live node {args.node} (live nodes: {known})")
    if not found.control_address:
        raise Failure(f"node {args.node} has no control API address in its registration: drain it with SIGTERM")
    endpoint = _reachable(found.control_address, client.settings.endpoints)
    with ControlClient(dataclasses.replace(client.settings, endpoints=(endpoint,))) as direct:
        done = _call(direct, "Cluster", "DrainNode", pb.DrainNodeRequest(node_id=args.node))
    if _json(args):
        emit_json(message_dict(done))
    else:
        vips = f"; releasing VIPs {', '.join(done.vips)}" if done.vips else ""
        print(f"node {done.node_id} ({endpoint}): draining, exits once connections in flight finish{vips}")
    return 0


def _reachable(control_address: str, endpoints: tuple[str, ...]) -> str:
    """A node's control address as lbctl can call it: a wildcard bind takes the host lbctl was given."""
    host, _, port = control_address.rpartition(":")
    if host.strip("[]") in ("0.0.0.0", "::", "") and endpoints:
        given, _, _ = endpoints[0].rpartition(":")
        return f"{given}:{port}"
    return control_address


# Below this, the Status calls of a refresh (one per node) take a visible share of the interval.
MIN_TOP_INTERVAL = 0.2


def cmd_top(args: argparse.Namespace, client: Any) -> int:
    import time

    from lbctl import top
    from lbctl.client import ControlError
    from lbnode.api.fulcrum.v1 import control_pb2 as pb

    if not args.interval >= MIN_TOP_INTERVAL:
        raise Failure(f"--interval: at least {MIN_TOP_INTERVAL} seconds, got {args.interval}")
    # a node that does not answer within two intervals is shown as such rather than stalling the view
    timeout = min(client.settings.timeout, max(2.0, 2 * args.interval))
    samples = 0

    def sample() -> top.Sample:
        nonlocal samples
        samples += 1
        try:
            listed = client.call("Cluster", "ListNodes", pb.ListNodesRequest())
        except ControlError as exc:
            if samples == 1:
                raise Failure(str(exc)) from None
            return top.Sample(time.time(), {}, {"(no node answers)": str(exc)})
        unreachable = {n.id: "no control API address in its registration" for n in listed.nodes
                       if not n.control_address}
        endpoints = {_reachable(n.control_address, client.settings.endpoints): n.id
                     for n in listed.nodes if n.control_address}
        started, started_wall = time.monotonic(), time.time()
        answers = client.call_each(list(endpoints), "Cluster", "Status", pb.StatusRequest(), timeout)
        # each node read its counters within the call: its middle is the sample's time
        at, wall = (started + time.monotonic()) / 2, (started_wall + time.time()) / 2
        nodes = {}
        for endpoint, answer in answers.items():
            if isinstance(answer, ControlError):
                unreachable[endpoints[endpoint]] = f"{endpoint}: {answer}"
            else:
                nodes[answer.node_id] = top.node_sample(answer, at)
        return top.Sample(wall, nodes, unreachable)

    return top.run(sample, interval=args.interval, as_json=_json(args))


def cmd_vips(args: argparse.Namespace, client: Any) -> int:
    from lbctl.output import emit_json, message_dict, table
    from lbnode.api.fulcrum.v1 import control_pb2 as pb

    vips = _call(client, "Cluster", "ListVips", pb.ListVipsRequest())
    if _json(args):
        emit_json([message_dict(v) for v in vips.vips])
        return 0
    rows = []
    for v in vips.vips:
        since = v.since.ToDatetime(tzinfo=datetime.UTC).isoformat(timespec="seconds") if v.HasField("since") else ""
        rows.append([f"{v.address}/{v.prefixlen}", v.interface, v.holder or "(free)", since])
    table(["VIP", "INTERFACE", "HOLDER", "SINCE"], rows)
    return 0


def cmd_pools_list(args: argparse.Namespace, client: Any) -> int:
    from lbctl.output import emit_json, table
    from lbnode.api.fulcrum.v1 import control_pb2 as pb

    response = _call(client, "Pools", "ListPools", pb.ListPoolsRequest())
    if _json(args):
        emit_json({"revision": response.revision, "pools": [_pool_dict(p) for p in response.pools]})
        return 0
    rows = []
    for p in response.pools:
        admin: dict[str, int] = {}
        for b in p.backends:
            if b.admin and b.admin != "enabled":
                admin[b.admin] = admin.get(b.admin, 0) + 1
        extra = "".join(f", {n} {state}" for state, n in sorted(admin.items()))
        rows.append([p.name, p.algorithm, f"{len(p.backends)}{extra}", p.revision])
    table(["NAME", "ALGORITHM", "BACKENDS", "REVISION"], rows)
    return 0


def cmd_pools_show(args: argparse.Namespace, client: Any) -> int:
    from lbctl.output import emit_json, table
    from lbnode.api.fulcrum.v1 import control_pb2 as pb

    msg = _call(client, "Pools", "GetPool", pb.GetPoolRequest(name=args.name))
    data = _pool_dict(msg)
    if _json(args):
        emit_json(data)
        return 0
    backends = data.pop("backends")
    print(f"pool {data.pop('name')} (revision {data.pop('revision')})")
    for key, value in data.items():
        print(f"  {key} = {json.dumps(value)}")
    rows = [
        [b.get("name", ""), b["address"], b.get("weight", 1), b.get("admin", "enabled"),
         b.get("max_inflight", ""), b.get("max_connections", "")]
        for b in backends
    ]
    table(["NAME", "ADDRESS", "WEIGHT", "ADMIN", "MAX_INFLIGHT", "MAX_CONNECTIONS"], rows)
    return 0


def _load(path: str) -> list[Any]:
    from lbctl.apply import PoolsFileError, load_pools_file

    try:
        return load_pools_file(path)
    except PoolsFileError as exc:
        raise Failure(str(exc)) from None


def cmd_pools_create(args: argparse.Namespace, client: Any) -> int:
    from lbctl.output import emit_json
    from lbnode.api.fulcrum.v1 import control_pb2 as pb
    from lbnode.api.pools import pool_message

    created = []
    for pool in _load(args.file):
        msg = _call(client, "Pools", "CreatePool", pb.CreatePoolRequest(pool=pool_message(pool)))
        created.append(msg)
        if not _json(args):
            print(f"pool {msg.name} created (revision {msg.revision})")
    if _json(args):
        emit_json([_pool_dict(m) for m in created])
    return 0


def cmd_pools_delete(args: argparse.Namespace, client: Any) -> int:
    from lbctl.output import emit_json
    from lbnode.api.fulcrum.v1 import control_pb2 as pb

    request = pb.DeletePoolRequest(name=args.name)
    if args.revision is not None:
        request.expected_revision = args.revision
    _call(client, "Pools", "DeletePool", request)
    if _json(args):
        emit_json({"deleted": args.name})
    else:
        print(f"pool {args.name} deleted")
    return 0


def cmd_backends_add(args: argparse.Namespace, client: Any) -> int:
    from lbnode.api.fulcrum.v1 import control_pb2 as pb

    backend = pb.Backend(address=args.address, name=args.name or "")
    for key in ("weight", "max_inflight", "max_connections"):
        value = getattr(args, key)
        if value is not None:
            if value < 0:
                raise Failure(f"--{key.replace('_', '-')}: must be >= 0, got {value}")
            setattr(backend, key, value)
    msg = _call(client, "Backends", "AddBackend", pb.AddBackendRequest(pool=args.pool, backend=backend))
    return _done(args, msg, f"pool {msg.name}: backend {args.name or args.address} added (revision {msg.revision})")


_SIMPLE: dict[str, tuple[str, str]] = {
    "remove": ("RemoveBackend", "removed"),
    "drain": ("Drain", "draining"),
    "enable": ("Enable", "enabled"),
    "disable": ("Disable", "disabled"),
}


def cmd_backends_simple(args: argparse.Namespace, client: Any) -> int:
    from lbnode.api.fulcrum.v1 import control_pb2 as pb

    method, word = _SIMPLE[args.action]
    msg = _call(client, "Backends", method, pb.BackendRequest(pool=args.pool, backend=args.backend))
    return _done(args, msg, f"pool {msg.name}: backend {args.backend} {word} (revision {msg.revision})")


def cmd_backends_weight(args: argparse.Namespace, client: Any) -> int:
    from lbnode.api.fulcrum.v1 import control_pb2 as pb

    if args.weight < 0:
        raise Failure(f"weight: must be >= 0, got {args.weight}")
    msg = _call(client, "Backends", "SetWeight",
                pb.SetWeightRequest(pool=args.pool, backend=args.backend, weight=args.weight))
    return _done(args, msg, f"pool {msg.name}: backend {args.backend} weight {args.weight} (revision {msg.revision})")


def cmd_watch(args: argparse.Namespace, client: Any) -> int:
    from lbctl.client import ControlError
    from lbctl.output import emit_json, message_dict

    def started(endpoint: str) -> None:
        print(f"watching events from {endpoint} (Ctrl-C to stop)", file=sys.stderr, flush=True)

    try:
        for event in client.watch(started):
            if _json(args):
                emit_json(message_dict(event), compact=True)
            else:
                print(describe_event(event), flush=True)
    except ControlError as exc:
        raise Failure(str(exc)) from None
    except KeyboardInterrupt:
        return 0
    raise Failure("the event stream ended: the node is stopping")


def describe_event(event: Any) -> str:
    when = event.time.ToDatetime(tzinfo=datetime.UTC).isoformat(timespec="milliseconds")
    kind = event.WhichOneof("event")
    if kind == "pool":
        change = event.pool.DESCRIPTOR.fields_by_name["change"].enum_type.values_by_number[event.pool.change].name
        return f"{when} {event.node_id} pool {event.pool.name} {change.lower()} (revision {event.pool.revision})"
    if kind == "backend_health":
        h = event.backend_health
        return f"{when} {event.node_id} backend {h.pool}/{h.backend} {h.old} -> {h.new}: {h.reason}"
    if kind == "node":
        change = event.node.DESCRIPTOR.fields_by_name["change"].enum_type.values_by_number[event.node.change].name
        return f"{when} {event.node_id} node {event.node.node_id} {change.lower()}"
    if kind == "vip_moved":
        m = event.vip_moved
        return f"{when} {event.node_id} vip {m.vip} moved {m.old_holder or '(free)'} -> {m.new_holder or '(free)'}"
    if kind == "certificate":
        c = event.certificate
        change = c.DESCRIPTOR.fields_by_name["change"].enum_type.values_by_number[c.change].name.lower()
        detail = "" if not c.fingerprint else (
            f", sha256 {c.fingerprint[:16]}..., not after "
            f"{c.not_after.ToDatetime(tzinfo=datetime.UTC).strftime('%Y-%m-%d %H:%M UTC')}")
        return f"{when} {event.node_id} certificate {c.name} {change} (revision {c.revision}{detail})"
    if kind == "route":
        r = event.route
        change = r.DESCRIPTOR.fields_by_name["change"].enum_type.values_by_number[r.change].name.lower()
        return f"{when} {event.node_id} route {r.listener}/{r.name} {change} (revision {r.revision})"
    return f"{when} {event.node_id} unknown event"


def _read_pem(path: str, option: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise Failure(f"{option}: cannot read {path}: {exc.strerror or exc}") from None


def _utc(ts: Any) -> str:
    when: datetime.datetime = ts.ToDatetime(tzinfo=datetime.UTC)  # a protobuf Timestamp
    return when.strftime("%Y-%m-%d %H:%M UTC")


def _expiry_text(msg: Any, now: datetime.datetime) -> str:
    """``ok``, ``expiring (4.9 days left)`` or ``expired (2.0 days ago)``."""
    if msg.expiry == "ok":
        return "ok"
    days = (msg.not_after.ToDatetime(tzinfo=datetime.UTC) - now).total_seconds() / 86400
    return f"{msg.expiry} ({days:.1f} days left)" if days > 0 else f"{msg.expiry} ({-days:.1f} days ago)"


def _names_text(names: Any, most: int = 3) -> str:
    names = list(names)
    more = f" (+{len(names) - most})" if len(names) > most else ""
    return ", ".join(names[:most]) + more


def cmd_certs_put(args: argparse.Namespace, client: Any) -> int:
    from lbctl.output import emit_json, message_dict
    from lbnode.api.fulcrum.v1 import control_pb2 as pb

    request = pb.PutCertificateRequest(
        name=args.name, chain_pem=_read_pem(args.cert_file, "--cert"), key_pem=_read_pem(args.key_file, "--key")
    )
    if args.revision is not None:
        request.expected_revision = args.revision
    msg = _call(client, "Certificates", "PutCertificate", request)
    if _json(args):
        emit_json(message_dict(msg))
        return 0
    now = datetime.datetime.now(datetime.UTC)
    print(f"certificate {msg.name} stored (revision {msg.revision}): {_names_text(msg.names)}; {msg.key_type}; "
          f"not after {_utc(msg.not_after)}: {_expiry_text(msg, now)}")
    return 0


def cmd_certs_list(args: argparse.Namespace, client: Any) -> int:
    from lbctl.output import emit_json, message_dict, table
    from lbnode.api.fulcrum.v1 import control_pb2 as pb

    response = _call(client, "Certificates", "ListCertificates", pb.ListCertificatesRequest())
    if _json(args):
        emit_json({"revision": response.revision, "certificates": [message_dict(c) for c in response.certificates]})
        return 0
    now = datetime.datetime.now(datetime.UTC)
    rows = [
        [c.name, _names_text(c.names), c.issuer, _utc(c.not_after), _expiry_text(c, now),
         ", ".join(c.listeners) or "-", c.source, c.revision or "-"]
        for c in response.certificates
    ]
    table(["NAME", "NAMES", "ISSUER", "NOT AFTER", "EXPIRY", "LISTENERS", "SOURCE", "REVISION"], rows)
    return 0


def cmd_certs_show(args: argparse.Namespace, client: Any) -> int:
    from lbctl.output import emit_json, message_dict
    from lbnode.api.fulcrum.v1 import control_pb2 as pb

    c = _call(client, "Certificates", "GetCertificate", pb.GetCertificateRequest(name=args.name))
    if _json(args):
        emit_json(message_dict(c))
        return 0
    origin = f"store, revision {c.revision}" if c.source == "store" else "node.toml of this node"
    fields = [
        ("names", ", ".join(c.names)),
        ("subject", c.subject),
        ("issuer", c.issuer),
        ("not before", _utc(c.not_before)),
        ("not after", f"{_utc(c.not_after)}: {_expiry_text(c, datetime.datetime.now(datetime.UTC))}"),
        ("key type", c.key_type),
        ("fingerprint", f"sha256 {c.fingerprint}"),
        ("chain", f"{c.chain_length} certificate{'s' if c.chain_length != 1 else ''} (leaf first)"),
        ("listeners", ", ".join(c.listeners) or "none on this node"),
    ]
    print(f"certificate {c.name} ({origin})")
    for label, value in fields:
        print(f"  {label:<12} {value}")
    return 0


def cmd_certs_delete(args: argparse.Namespace, client: Any) -> int:
    from lbctl.output import emit_json
    from lbnode.api.fulcrum.v1 import control_pb2 as pb

    request = pb.DeleteCertificateRequest(name=args.name)
    if args.revision is not None:
        request.expected_revision = args.revision
    _call(client, "Certificates", "DeleteCertificate", request)
    if _json(args):
        emit_json({"deleted": args.name})
    else:
        print(f"certificate {args.name} deleted")
    return 0


def cmd_certs_init(args: argparse.Namespace, client: Any) -> int:
    from lbctl.certs import CertsError, init_certs, init_etcd_certs, parse_hosts, parse_members
    from lbctl.output import emit_json, table

    nodes = [n.strip() for n in args.nodes.split(",") if n.strip()]
    if not nodes and not args.etcd_members:
        raise Failure("--nodes: give at least one node name, e.g. --nodes n1,n2,n3 (or --etcd-members)")
    try:
        hosts = parse_hosts(args.hosts, nodes)
        members = parse_members(args.etcd_members)
        written = init_certs(args.dir, nodes, hosts) if nodes else []
        if members:
            written += init_etcd_certs(args.dir / "etcd", members)
    except CertsError as exc:
        raise Failure(str(exc)) from None
    except OSError as exc:
        raise Failure(f"{args.dir}: {exc.strerror or exc}") from None
    if args.output == "json":
        emit_json([{"path": str(w.path), "what": w.what} for w in written])
    else:
        table(["FILE", "WHAT"], [[str(w.path), w.what] for w in written])
    return 0


if __name__ == "__main__":
    sys.exit(main())
