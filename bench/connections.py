"""The ``connections`` section: new connections per second, L7 and L4, Fulcrum vs HAProxy.

wrk with ``Connection: close`` opens a fresh connection for every request: through the
http listener that is a new client connection per request (backend connections stay
pooled); through the tcp listener a new TCP session, with a new backend connection, per
request. The figure is the balancer's CPU per connection, and its inverse relative to
HAProxy's: the rate one core of each would sustain (issue 13's per-core targets).

``render_connections`` and ``evaluate_connections`` are pure; the section starts processes.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from bench.configs import SMALL_PATH
from bench.harness import Context, Proc, try_proc
from bench.measure import (
    L7Row,
    interleaved,
    measure_l7,
    median_run,
    progress,
    ratio_spread,
    too_many_errors,
)
from bench.tables import DASH, fail_text, fmt_num, render_table

CLOSE = "Connection: close"
# Fulcrum's new connections per second per core, as a share of HAProxy's (1 thread).
L7_RATE_TARGET = 0.6
L4_RATE_TARGET = 0.5


@dataclass
class ConnRow:
    path: str  # "L7" or "L4"
    fulcrum: L7Row
    haproxy: L7Row
    target: float


def rate_ratio(fulcrum_cpu: float | None, haproxy_cpu: float | None) -> float | None:
    """Connections per core-second of Fulcrum over HAProxy's: HAProxy's CPU per connection
    over Fulcrum's."""
    if not fulcrum_cpu or not haproxy_cpu:
        return None
    return haproxy_cpu / fulcrum_cpu


def status_of(row: ConnRow) -> str:
    f, h = row.fulcrum, row.haproxy
    if f.failed or h.failed:
        return "not measured"
    ratio = rate_ratio(f.cpu_us_per_req, h.cpu_us_per_req)
    if ratio is None:
        return "not measured"
    if too_many_errors(f.errors, f.requests):
        return f"not met ({f.errors} errors in {f.requests} requests)"
    return "met" if ratio >= row.target else "not met"


def render_connections(rows: Sequence[ConnRow]) -> str:
    out = []
    for row in rows:
        for r in (row.fulcrum, row.haproxy):
            if r.failed:
                out.append([row.path, r.name, fail_text(r.failed)] + [DASH] * 5)
                continue
            is_fulcrum = r is row.fulcrum
            ratio = rate_ratio(row.fulcrum.cpu_us_per_req, row.haproxy.cpu_us_per_req)
            out.append([
                row.path,
                r.name,
                fmt_num(r.rps, 0, thousands=True),
                fmt_num(r.cpu_us_per_req, 1),
                f"{ratio:.2f}x" if is_fulcrum and ratio is not None else DASH,
                f">= {row.target}x" if is_fulcrum else DASH,
                status_of(row) if is_fulcrum else DASH,
                str(r.errors) + (f" ({r.note})" if r.note else ""),
            ])
    return render_table(
        ["Path", "Balancer", "conn/s", "CPU µs/conn", "conn per core vs HAProxy", "Goal", "Status", "errors"],
        out,
        align="llrrrlll",
    )


def _run_close(ctx: Context, balancers: dict[str, tuple[Callable[[], Proc], int]], name: str) -> L7Row:
    """One measured run of a new connection per request through balancer ``name``."""
    getter, port = balancers[name]
    proc, err = try_proc(getter)
    row = L7Row(name, failed=err) if proc is None else measure_l7(
        ctx, name, port, [proc.pid], ctx.opts.variant_duration, ctx.opts.variant_warmup, headers=[CLOSE]
    )
    progress(row)
    return row


def section_connections(ctx: Context) -> str:
    ctx.backends()
    o = ctx.opts
    rows: list[ConnRow] = []
    spreads: list[str] = []
    for path, f_port, h_port, target in (
        ("L7", ctx.ports.fulcrum_web, ctx.ports.haproxy_web, L7_RATE_TARGET),
        ("L4", ctx.ports.fulcrum_bulk, ctx.ports.haproxy_bulk, L4_RATE_TARGET),
    ):
        balancers: dict[str, tuple[Callable[[], Proc], int]] = {
            "Fulcrum": (ctx.fulcrum, f_port), "HAProxy": (ctx.haproxy, h_port)}
        runs = interleaved(list(balancers), o.rounds, functools.partial(_run_close, ctx, balancers))
        rows.append(ConnRow(path, median_run(runs["Fulcrum"]), median_run(runs["HAProxy"]), target))
        if spread := ratio_spread(runs["Fulcrum"], runs["HAProxy"]):
            spreads.append(f"{path} {spread}")
    ctx.results["connections"] = rows
    return (
        render_connections(rows)
        + "\n\n"
        + f"`wrk -t{o.threads} -c{o.connections} -d{o.variant_duration:g}s -H '{CLOSE}'` on GET {SMALL_PATH}: "
        "a new connection per request. L7: Fulcrum's http listener and HAProxy's mode http "
        "(backend connections pooled by both); L4: Fulcrum's tcp listener and HAProxy's mode tcp "
        "(a new backend connection per request too). CPU µs/conn = the balancer's CPU over the run "
        "divided by the requests completed; conn per core vs HAProxy = HAProxy's CPU per "
        f"connection over Fulcrum's (the rate each would sustain on one core). {o.rounds} rounds, "
        "the two in turn (ABBA), each row its median run by CPU per connection (the range in "
        "errors' column)"
        + (f"; conn per core vs HAProxy, round by round: {'; '.join(spreads)}" if spreads else "")
        + ". For a change's effect use `python -m bench.cpu_ab --mode close|l4` (docs/performance.md)."
    )
