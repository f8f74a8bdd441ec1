"""The ``cluster`` section: a cluster member against a standalone node under the main L7
load, how fast a pool change written through one node's control API reaches the
``/status`` of three nodes (issue 5), and how fast a route change reaches the requests
of three nodes (issue 15). Needs etcd; skipped with a note without it.
"""

from __future__ import annotations

import http.client
import json
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path

from bench.configs import HOST, SMALL_PATH, fulcrum_config
from bench.harness import ETCD, Context, StartError, http_get, pick_port, port_accepts, ports_of
from bench.tables import DASH, fmt_num, render_table
from bench.variants import (
    CORE_NOTE,
    Variant,
    abba,
    compare_runs,
    order_text,
    render_comparison,
    render_runs,
    run_all,
    spread_text,
)

CLUSTER_TARGET = 0.05  # cluster member vs standalone: req/s at most 5 % below, CPU/req 5 % above
PROPAGATION_TARGET = 0.5  # seconds: p99 of a pool (route) change reaching every node's /status (requests)
PROPAGATION_CHANGES = 50
PROPAGATION_TIMEOUT = 5.0  # seconds: a change not seen by every node by then counts as failed
# etcd key prefix of the propagation nodes' pools; the L7 runs use CLUSTER_L7_PREFIX
# (bench.variants), so neither sees the other's pools.
CLUSTER_PROPAGATION_PREFIX = "/fulcrum-bench-propagation/v1"
# The route the route propagation flips: on the "web" listener, for SMALL_PATH, to pool web
# either plainly or as a one-sided sticky split, which sets this cookie: every request shows
# which version of the route a node used, and every answer is nginx's 200.
PROBE_ROUTE = "probe"
PROBE_COOKIE = f"FULCRUM_SPLIT_{PROBE_ROUTE}="


STANDALONE = Variant("standalone")
CLUSTERED = Variant("cluster member", cluster=True)


def cluster_runs(rounds: int = 1) -> list[tuple[str, Variant]]:
    """Standalone, cluster, cluster, standalone, ``rounds`` times. (ABBA)"""
    return abba(STANDALONE, CLUSTERED, rounds)


@dataclass
class Propagation:
    """Pool changes written through one node's control API, and when every node showed them."""

    nodes: int
    kind: str = "pool"  # "pool": SetWeight seen in /status; "route": PutRoute seen in requests
    # Seconds per change: the SetWeight call until it returned; from its return until every
    # node's /status shows the change; from the call until every node shows it.
    write_s: list[float] = field(default_factory=list)
    propagation_s: list[float] = field(default_factory=list)
    total_s: list[float] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)  # refused writes, changes not seen in time

    @property
    def attempted(self) -> int:
        return len(self.total_s) + len(self.failed)


def percentile(values: Iterable[float], q: float) -> float | None:
    """Nearest-rank percentile (``q`` in 0-100) of ``values``; None when empty. The p99 of
    50 samples is the largest, the p50 the 25th smallest."""
    ordered = sorted(values)
    if not ordered:
        return None
    rank = max(1, -(-q * len(ordered) // 100))  # ceil(q/100 * n), at least the first
    return ordered[min(int(rank), len(ordered)) - 1]


def status_weight(doc: object, pool: str, backend_id: str) -> int | None:
    """The weight of ``backend_id`` in ``pool`` in an admin ``/status`` document; None when
    the document, the pool or the backend is not there."""
    if not isinstance(doc, dict):
        return None
    for p in doc.get("pools") or []:
        if isinstance(p, dict) and p.get("name") == pool:
            for b in p.get("backends") or []:
                if isinstance(b, dict) and b.get("id") == backend_id:
                    w = b.get("weight")
                    return w if isinstance(w, int) else None
    return None


def render_propagation(p: Propagation, limit: float = PROPAGATION_TARGET) -> str:
    """p50 / p99 / max of the three timings; the target (p99 below ``limit`` seconds, every
    change seen by every node) on the two propagation rows."""
    goal = f"p99 < {limit * 1000:.0f} ms"
    out = []
    if p.kind == "route":
        call, seen = "PutRoute", f"all {p.nodes} nodes route requests by it"
    else:
        call, seen = "SetWeight", f"all {p.nodes} nodes' /status show it"
    for figure, values, has_goal in (
        (f"{call} through node 1's control API (until it returned)", p.write_s, False),
        (f"write returned -> {seen}", p.propagation_s, True),
        (f"write issued -> {seen}", p.total_s, True),
    ):
        p50, p99 = percentile(values, 50), percentile(values, 99)
        top = max(values) if values else None
        if not has_goal:
            status = "information"
        elif p99 is None:
            status = "not met (no change measured)"
        elif p.failed:
            status = f"not met ({len(p.failed)} of {p.attempted} changes failed)"
        else:
            status = "met" if p99 < limit else "not met"
        ms = [None if v is None else v * 1000 for v in (p50, p99, top)]
        out.append(
            [figure, f"{len(values)}/{p.attempted}"]
            + [fmt_num(v, 1) for v in ms]
            + [goal if has_goal else DASH, status]
        )
    return render_table(
        ["Figure", "changes", "p50 ms", "p99 ms", "max ms", "goal", "status"],
        out,
        align="lrrrrll",
    )


def _admin_status(port: int) -> object:
    try:
        status, body = http_get(port, "/status", timeout=2.0)
        return json.loads(body) if status == 200 else None
    except (OSError, http.client.HTTPException, ValueError):
        return None


def probe_sticky(port: int) -> bool | None:
    """Did this node answer GET SMALL_PATH by the sticky version of the probe route (its split
    cookie set)? None when the request failed."""
    conn = http.client.HTTPConnection(HOST, port, timeout=2.0)
    try:
        conn.request("GET", SMALL_PATH, headers={"Host": "bench"})
        resp = conn.getresponse()
        resp.read()
        cookies = resp.headers.get_all("Set-Cookie") or []
        return any(c.startswith(PROBE_COOKIE) for c in cookies)
    except (OSError, http.client.HTTPException):
        return None
    finally:
        conn.close()


def probe_route_spec(sticky: bool) -> str:
    """The probe route's table as JSON (name aside): plain, or a sticky split with one side."""
    if sticky:
        return json.dumps({"path_prefix": SMALL_PATH, "split": [{"pool": "web", "weight": 1}], "sticky": True})
    return json.dumps({"path_prefix": SMALL_PATH, "pool": "web"})


def measure_propagation(
    ctx: Context, nodes: int = 3, changes: int = PROPAGATION_CHANGES
) -> tuple[Propagation, Propagation]:
    """``nodes`` cluster members on ``ctx.etcd()`` (own ports, their own etcd prefix, control
    API in plain text); ``changes`` weight changes of one backend written through node 1's
    control API (SetWeight, alternating 2 and 3), each timed until every node's admin
    ``/status`` shows it; then ``changes`` changes of a route written the same way
    (PutRoute, alternating plain and sticky), each timed until a request to every node shows
    it. The nodes are stopped afterwards."""
    try:
        import grpc

        from lbnode.api.fulcrum.v1 import control_pb2 as pb
        from lbnode.api.fulcrum.v1 import control_pb2_grpc as rpc
    except ImportError as exc:
        raise StartError(f"cannot import the control API client: {exc}") from None
    url = ctx.etcd()
    ctx.backends()
    taken = set(ports_of(ctx.ports))
    keys: list[str] = []
    admins: list[int] = []
    webs: list[int] = []
    control = 0
    backend = f"{HOST}:{ctx.ports.backends[0]}"
    result = Propagation(nodes)
    routes = Propagation(nodes, kind="route")
    try:
        for i in range(1, nodes + 1):
            web, bulk, admin, ctl = (pick_port(27500 + 10 * i + k, taken) for k in range(4))
            ports = replace(ctx.ports, fulcrum_web=web, fulcrum_bulk=bulk, fulcrum_admin=admin)
            config = fulcrum_config(
                ports,
                node_id=f"n{i}",
                state_dir=str(ctx.tmp / f"cluster-n{i}-state"),
                etcd=[url],
                etcd_prefix=CLUSTER_PROPAGATION_PREFIX,
                control_port=ctl,
            )
            key = f"fulcrum-cluster-n{i}"
            keys.append(key)
            # The control port is gRPC's socket (AF_INET6, v4-mapped: not in the
            # /proc/net/tcp that wait_ready reads), so it is waited for below.
            ctx.fulcrum(config, key=key, ready_ports=[web, bulk], admin_port=admin)
            admins.append(admin)
            webs.append(web)
            control = control or ctl
        deadline = time.monotonic() + ctx.opts.start_timeout
        while not port_accepts(control):
            if time.monotonic() > deadline:
                raise StartError(f"node 1's control API on {HOST}:{control} does not accept")
            time.sleep(0.05)
        while not all(status_weight(_admin_status(a), "web", backend) for a in admins):
            if time.monotonic() > deadline:
                raise StartError("the cluster nodes did not show pool web from etcd")
            time.sleep(0.05)
        with grpc.insecure_channel(f"{HOST}:{control}") as channel:
            stub = rpc.BackendsStub(channel)

            def set_weight(weight: int) -> None:
                stub.SetWeight(
                    pb.SetWeightRequest(pool="web", backend=backend, weight=weight), timeout=10
                )

            try:
                set_weight(5)  # unmeasured: opens the channel, warms the path
            except grpc.RpcError as exc:
                raise StartError(f"SetWeight: {exc.code().name}: {exc.details()}") from None
            for i in range(changes):
                weight = 2 + i % 2  # alternating: every change is a write
                t0 = time.perf_counter()
                try:
                    set_weight(weight)
                except grpc.RpcError as exc:
                    result.failed.append(f"change {i}: {exc.code().name}: {exc.details()}")
                    continue
                t1 = time.perf_counter()
                waiting = list(admins)
                while waiting and time.perf_counter() - t1 < PROPAGATION_TIMEOUT:
                    waiting = [
                        a
                        for a in waiting
                        if status_weight(_admin_status(a), "web", backend) != weight
                    ]
                    if waiting:
                        time.sleep(0.002)
                if waiting:
                    result.failed.append(
                        f"change {i}: {len(waiting)} nodes not showing it after {PROPAGATION_TIMEOUT:g} s"
                    )
                    continue
                t2 = time.perf_counter()
                result.write_s.append(t1 - t0)
                result.propagation_s.append(t2 - t1)
                result.total_s.append(t2 - t0)
            _measure_routes(channel, webs, changes, routes)
    finally:
        for key in keys:
            ctx.stop(key)
    return result, routes


def _measure_routes(channel: object, webs: list[int], changes: int, result: Propagation) -> None:
    """The route half of ``measure_propagation``, on its nodes and channel."""
    import grpc

    from lbnode.api.fulcrum.v1 import control_pb2 as pb
    from lbnode.api.fulcrum.v1 import control_pb2_grpc as rpc

    stub = rpc.RoutesStub(channel)

    def put(sticky: bool) -> None:
        route = pb.Route(listener="web", name=PROBE_ROUTE, spec_json=probe_route_spec(sticky))
        stub.PutRoute(pb.PutRouteRequest(route=route), timeout=10)

    try:
        put(False)  # unmeasured: creates the route, warms the path
    except grpc.RpcError as exc:
        result.failed.append(f"PutRoute: {exc.code().name}: {exc.details()}")
        return
    for i in range(changes):
        sticky = i % 2 == 0  # alternating: every change is a write the requests show
        t0 = time.perf_counter()
        try:
            put(sticky)
        except grpc.RpcError as exc:
            result.failed.append(f"change {i}: {exc.code().name}: {exc.details()}")
            continue
        t1 = time.perf_counter()
        waiting = list(webs)
        while waiting and time.perf_counter() - t1 < PROPAGATION_TIMEOUT:
            waiting = [w for w in waiting if probe_sticky(w) is not sticky]
            if waiting:
                time.sleep(0.002)
        if waiting:
            result.failed.append(f"change {i}: {len(waiting)} nodes not routing by it after {PROPAGATION_TIMEOUT:g} s")
            continue
        t2 = time.perf_counter()
        result.write_s.append(t1 - t0)
        result.propagation_s.append(t2 - t1)
        result.total_s.append(t2 - t0)


def section_cluster(ctx: Context) -> str:
    if not Path(ETCD).exists():
        return (
            f"skipped: etcd is not installed ({ETCD}; Debian package etcd-server, which "
            "`make sysdeps-test` installs). Nothing was measured."
        )
    runs = cluster_runs(ctx.opts.variant_rounds)
    o = ctx.opts
    rows = run_all(ctx, runs, "cluster", duration=o.duration, warmup=o.warmup)
    ctx.results["cluster"] = rows
    standalone = [r for r, (_, v) in zip(rows, runs, strict=True) if v == STANDALONE]
    clustered = [r for r, (_, v) in zip(rows, runs, strict=True) if v == CLUSTERED]
    comparison = compare_runs(standalone, clustered, CLUSTER_TARGET, "standalone", "cluster member")
    ctx.results["cluster_comparison"] = comparison
    print(
        f"  propagation: 3 cluster nodes, {PROPAGATION_CHANGES} changes",
        file=sys.stderr,
        flush=True,
    )
    try:
        prop, route_prop = measure_propagation(ctx)
        ctx.results["propagation"] = prop
        ctx.results["route_propagation"] = route_prop
        prop_text = render_propagation(prop)
        if prop.failed:
            prop_text += "\n\nFailed changes: " + "; ".join(prop.failed[:5])
        prop_text += "\n\n" + render_propagation(route_prop)
        if route_prop.failed:
            prop_text += "\n\nFailed route changes: " + "; ".join(route_prop.failed[:5])
    except StartError as exc:
        prop_text = f"failed: {exc}"
    return (
        render_runs(rows)
        + "\n\n"
        + render_comparison(comparison, "standalone", "cluster member")
        + "\n\n"
        + f"Target: a cluster member no more than {CLUSTER_TARGET * 100:.0f} % below a standalone "
        "node (req/s at least, CPU per request at most that far off; p99 for information). "
        f"Same wrk command and durations as the main L7 section (`wrk -t{o.threads} "
        f"-c{o.connections} -d{o.duration:g}s --latency` on GET {SMALL_PATH} after a "
        f"{o.warmup:g} s warm-up), each run on a freshly started lbnode pinned as there. "
        "The cluster member's node.toml is the standalone one plus `[cluster]` on a "
        "one-member etcd the benchmark starts in its temp dir (unpinned; running during "
        "every run, idle in the standalone ones): its pools are seeded into etcd and "
        "followed through a watch, and it keeps a lease alive (node key, every TTL/3 of the "
        "default 5 s). No health checks, so no observations are published. "
        + order_text("standalone", "cluster", o.variant_rounds)
        + spread_text(standalone, "Standalone")
        + " "
        + spread_text(clustered, "Cluster member")
        + CORE_NOTE
        + "\n\n### Control-plane propagation\n\n"
        + prop_text
        + "\n\n"
        + f"Three cluster members (own ports and etcd prefix, unmeasured by wrk, the machine "
        f"otherwise idle) follow the same etcd. {PROPAGATION_CHANGES} changes of one "
        "backend's weight (alternating 2 and 3, so each is a write) go through node 1's "
        "control API (gRPC `Backends/SetWeight`, plain text on loopback, one channel kept "
        "open); after each, the admin `/status` of every node is polled (every 2 ms) until "
        "all show the new weight. Percentiles are nearest-rank: the p99 of 50 changes is "
        f"the slowest. A change not seen by every node within {PROPAGATION_TIMEOUT:g} s "
        "fails the target. Then, on the same nodes and channel, "
        f"{PROPAGATION_CHANGES} changes of a route (`Routes/PutRoute` on listener web, "
        f"route `{PROBE_ROUTE}` for {SMALL_PATH} to pool web, alternating a plain route and a "
        "one-sided sticky split, whose answers carry its cookie): after each, a new request "
        "to every node is sent (every 2 ms) until all answer by the new version of the route. "
        "Nothing else runs on the nodes meanwhile."
    )
