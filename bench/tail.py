"""Tail latency under one slow backend: Fulcrum's ``least_latency`` beside HAProxy's ``leastconn``.

Three backends, one answering 20 ms late (``bench.slow_backend``), 16 closed-loop wrk
connections at full speed. Runs alternate Fulcrum, HAProxy, Fulcrum, ... (three each),
so that a drift of the machine hits both alike; the table gives every run and the
medians. Target (issue 10): Fulcrum's median p99 <= 0.5x HAProxy's best p99 of the same
run, with under 1% of requests reaching the slow backend. Talks to 127.0.0.1 only.

Each round also runs both balancers in front of the two fast backends alone (the slow one
still running, idle): the floor, what p99 is on this machine with no slow backend at all. A
p99 near the floor is the harness's and the balancer's own queueing on 2 cores, not the
slow backend's doing; the target is read against it (``render``).
"""

from __future__ import annotations

import dataclasses
import http.client
import os
import statistics
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from bench.configs import HOST
from bench.harness import Context, StartError, pick_port
from bench.measure import L7Row, run_wrk
from bench.procstat import process_tree, tree_cpu_seconds
from bench.tables import fmt_num, render_table

CONNECTIONS = 16  # the scenario: 16 closed-loop connections
FLOOR = ", fast backends only"  # the name's suffix of the floor rows
DELAY_MS = 20.0  # the slow backend's extra latency
ROUNDS = 3  # runs per balancer, interleaved
TAIL_TARGET = 0.5  # Fulcrum p99 <= 0.5x HAProxy's best p99
SLOW_SHARE_TARGET = 0.01  # under 1% of requests to the slow backend


def fulcrum_tail_config(port: int, admin: int, backends: Sequence[int], state_dir: str) -> str:
    servers = "".join(f'  [[pools.backends]]\n  address = "{HOST}:{p}"\n' for p in backends)
    return f"""\
[node]
id = "bench-tail"
admin = "{HOST}:{admin}"
state_dir = "{state_dir}"
workers = 1

[[listeners]]
name = "web"
protocol = "http"
bind = "{HOST}:{port}"
pool = "web"

[[pools]]
name = "web"
algorithm = "least_latency"
{servers}"""


def haproxy_tail_config(port: int, backends: Sequence[int]) -> str:
    servers = "".join(f"    server b{i} {HOST}:{p}\n" for i, p in enumerate(backends, 1))
    return f"""\
global
    nbthread 1
    maxconn 4096

defaults
    mode http
    timeout connect 5s
    timeout client 60s
    timeout server 60s

frontend web
    option http-keep-alive
    bind {HOST}:{port}
    default_backend web

backend web
    option http-keep-alive
    http-reuse always
    balance leastconn
{servers}"""


def _served(port: int) -> int:
    conn = http.client.HTTPConnection(HOST, port, timeout=5)
    try:
        conn.request("GET", "/__count")
        return int(conn.getresponse().read())
    finally:
        conn.close()


def run(ctx: Context) -> str:
    taken = set(ctx.ports.backends) | {ctx.ports.fulcrum_web, ctx.ports.fulcrum_admin, ctx.ports.haproxy_web}
    slow_port = pick_port(27500, taken)
    fulcrum_port, fulcrum_admin = pick_port(27510, taken), pick_port(27511, taken)
    haproxy_port = pick_port(27520, taken)
    fast = ctx.backends()  # nginx: answers at once on every backend port
    backends = [ctx.ports.backends[0], ctx.ports.backends[1], slow_port]
    slow = ctx.spawn("slow-backend", ctx._pinned([sys.executable, str(ctx.repo / "bench" / "slow_backend.py"),
                                                  "--port", str(slow_port), "--delay-ms", str(DELAY_MS)], ctx.client_cpu))
    slow.wait_ready([slow_port], ctx.opts.start_timeout)
    floor_ports = (pick_port(27530, taken), pick_port(27531, taken), pick_port(27540, taken))
    balancers: list[tuple[str, int, int]] = []
    for variant, pool, (port, admin, hport) in (("", backends, (fulcrum_port, fulcrum_admin, haproxy_port)),
                                                (FLOOR, backends[:2], floor_ports)):
        key = "tail" if not variant else "tail-floor"
        fulcrum = ctx.fulcrum(
            fulcrum_tail_config(port, admin, pool, str(ctx.tmp / f"{key}-state")),
            key=f"fulcrum-{key}", ready_ports=[port], admin_port=admin,
        )
        balancers.append((f"Fulcrum least_latency{variant}", port, fulcrum.pid))
        conf = ctx.tmp / f"haproxy-{key}.cfg"
        conf.write_text(haproxy_tail_config(hport, pool))
        haproxy = ctx.spawn(f"haproxy-{key}", ["haproxy", "-f", str(conf), "-db"], pin_balancer=True)
        haproxy.wait_ready([hport], ctx.opts.start_timeout)
        balancers.append((f"HAProxy leastconn{variant}", hport, haproxy.pid))
    opts = dataclasses.replace(ctx.opts, connections=CONNECTIONS)
    run_ctx = _WithOptions(ctx, opts)
    rows: list[tuple[str, L7Row, float | None]] = []
    with _on_cpu([fast.pid], ctx.client_cpu):
        _rounds(run_ctx, rows, balancers, slow_port)
    del fast
    for key in ("tail", "tail-floor"):
        ctx.stop(f"fulcrum-{key}")
        ctx.stop(f"haproxy-{key}")
    ctx.stop("slow-backend")
    return render(rows)


@contextmanager
def _on_cpu(roots: list[int], cpu: int | None) -> Iterator[None]:
    """The backends (nginx's processes) on the client's CPU while the rounds run, as wrk and
    the slow backend are: at saturation the balancer is CPU-bound on its own core, and a
    backend scheduled there preempts it for a scheduler slice (milliseconds), which sets the
    p99 of a single-threaded balancer. Both balancers get the same core to themselves."""
    if cpu is None:
        yield
        return
    pids = list(process_tree(roots[0])) if roots else []
    old = {}
    for pid in pids:
        try:
            old[pid] = os.sched_getaffinity(pid)
            os.sched_setaffinity(pid, {cpu})
        except OSError:
            pass
    try:
        yield
    finally:
        for pid, cpus in old.items():
            try:
                os.sched_setaffinity(pid, cpus)
            except OSError:
                pass


def _rounds(run_ctx: object, rows: list[tuple[str, L7Row, float | None]], balancers: list[tuple[str, int, int]],
            slow_port: int) -> None:
    for round_ in range(1, ROUNDS + 1):
        for name, port, pid in balancers:
            row, share = _measure(run_ctx, f"{name} ({round_})", port, pid, slow_port)
            rows.append((name, row, share))
            p99 = fmt_num(row.p99_ms, 2) if not row.failed else row.failed
            print(f"  {row.name}: p99 {p99} ms, slow share {fmt_num((share or 0) * 100, 2)}%",
                  file=sys.stderr, flush=True)


class _WithOptions:
    """``ctx`` with other options (the connection count), for ``run_wrk``."""

    def __init__(self, ctx: Context, opts: object) -> None:
        self._ctx = ctx
        self.opts = opts

    def __getattr__(self, name: str) -> object:
        return getattr(self._ctx, name)


def _measure(ctx: object, name: str, port: int, pid: int, slow_port: int) -> tuple[L7Row, float | None]:
    c: Context = ctx  # type: ignore[assignment]
    try:
        run_wrk(c, port, c.opts.warmup)
        served0, cpu0 = _served(slow_port), tree_cpu_seconds([pid])
        res = run_wrk(c, port, c.opts.duration)
        served1, cpu1 = _served(slow_port), tree_cpu_seconds([pid])
    except (StartError, OSError, ValueError, http.client.HTTPException) as exc:
        return L7Row(name, failed=str(exc)), None
    if res.requests == 0:
        return L7Row(name, failed="no requests completed"), None
    row = L7Row(name, rps=res.rps, p50_ms=res.latency_ms[50], p99_ms=res.latency_ms[99],
                cpu_us_per_req=(cpu1 - cpu0) * 1e6 / res.requests, requests=res.requests, errors=res.errors)
    return row, (served1 - served0) / res.requests


def render(rows: Sequence[tuple[str, L7Row, float | None]]) -> str:
    table = render_table(
        ["Run", "req/s", "p50 ms", "p99 ms", "to the slow backend", "CPU µs/req", "errors"],
        [[r.name, fmt_num(r.rps, 0, thousands=True), fmt_num(r.p50_ms, 2), fmt_num(r.p99_ms, 2),
          "—" if share is None else f"{share * 100:.2f}%", fmt_num(r.cpu_us_per_req), r.errors if not r.failed else r.failed]
         for _, r, share in rows],
        "lrrrrrr",
    )
    def p99s(prefix: str, floor: bool) -> list[float]:
        return [r.p99_ms for n, r, _ in rows if n.startswith(prefix) and n.endswith(FLOOR) == floor
                and r.p99_ms is not None and not r.errors]

    ours, theirs = p99s("Fulcrum", False), p99s("HAProxy", False)
    floor_ours, floor_theirs = p99s("Fulcrum", True), p99s("HAProxy", True)
    shares = [s for n, r, s in rows if n.startswith("Fulcrum") and not n.endswith(FLOOR) and s is not None]
    lines = [table, ""]
    if ours and theirs:
        ratio = statistics.median(ours) / min(theirs)
        ok = ratio <= TAIL_TARGET and shares and max(shares) < SLOW_SHARE_TARGET
        lines.append(
            f"Fulcrum p99 median {statistics.median(ours):.2f} ms (runs {min(ours):.2f}-{max(ours):.2f}), "
            f"HAProxy best {min(theirs):.2f} ms (runs {min(theirs):.2f}-{max(theirs):.2f}): "
            f"**{ratio:.2f}x** (target <= {TAIL_TARGET}x); Fulcrum's share to the slow backend "
            f"{min(shares) * 100:.2f}-{max(shares) * 100:.2f}% (target < 1%): "
            + ("**met**" if ok else "**not met**")
        )
    else:
        lines.append("Target not evaluated: a balancer has no successful run.")
    if floor_ours and floor_theirs:
        lines.append(
            f"\nFloor (the two fast backends alone): Fulcrum p99 median {statistics.median(floor_ours):.2f} ms "
            f"(runs {min(floor_ours):.2f}-{max(floor_ours):.2f}), HAProxy median {statistics.median(floor_theirs):.2f} ms "
            f"(runs {min(floor_theirs):.2f}-{max(floor_theirs):.2f}). With the slow backend, Fulcrum's p99 is "
            f"{statistics.median(ours) / statistics.median(floor_ours):.2f}x its floor and HAProxy's "
            f"{statistics.median(theirs) / statistics.median(floor_theirs):.2f}x its own."
            if ours and theirs else "\nFloor rows: see the table.")
    return "\n".join(lines)
