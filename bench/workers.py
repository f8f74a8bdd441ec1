"""The ``workers`` section: Fulcrum with ``[node] workers = 1`` against ``workers = 2`` (a
supervisor and two worker processes), beside HAProxy with ``nbthread 1`` and ``2`` (issue 13).

Issue 13's target: CPU per request with 2 workers within 10 % of 1 worker. Runs are ABBA
for each (1, 2, 2, 1); CPU is the whole process tree's (supervisor and workers). Nothing
is pinned in this section (two workers pinned to one core measure time-sharing: 1.7x the
CPU per request of one worker on the 2-core CI host).
"""

from __future__ import annotations

import statistics

from bench.harness import Context
from bench.measure import L7Row, measure_l7, progress
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
    variant_load_text,
)

WORKERS_TARGET = 0.10  # issue 13: CPU/request with 2 workers within 10 % of 1 worker
PROJECTED_CORES = 16  # issue 13: a projection for a 16-core host

ONE = Variant("1 worker")
TWO = Variant("2 workers", workers=2)


# HAProxy's runs, in order: (label, nbthread).
HAPROXY_RUNS = (("HAProxy nbthread 1 (1st)", 1), ("HAProxy nbthread 2 (1st)", 2),
                ("HAProxy nbthread 2 (2nd)", 2), ("HAProxy nbthread 1 (2nd)", 1))


def haproxy_runs(ctx: Context) -> list[L7Row]:
    """HAProxy nbthread 1, 2, 2, 1 (``HAPROXY_RUNS``) under the same load as the Fulcrum runs."""
    o = ctx.opts
    rows = []
    for label, nbthread in HAPROXY_RUNS:
        ctx.stop("haproxy")
        ctx.stop("haproxy-nbthread2")
        try:
            proc = ctx.haproxy(nbthread)
        except Exception as exc:  # StartError, or a port still held: the row says why
            rows.append(L7Row(label, failed=str(exc)))
            continue
        rows.append(measure_l7(ctx, label, ctx.ports.haproxy_web, [proc.pid],
                               duration=o.variant_duration, warmup=o.variant_warmup))
        progress(rows[-1])
    ctx.stop("haproxy-nbthread2")
    ctx.stop("haproxy")
    return rows


def projection(two_workers: list[L7Row], haproxy_two: list[L7Row], cores: int = PROJECTED_CORES) -> str:
    """What ``cores`` cores would serve, from this run's CPU per request with two workers and
    with HAProxy's two threads (medians of the runs that did not fail), the assumptions next to it."""
    ours = [r.cpu_us_per_req for r in two_workers if not r.failed and r.cpu_us_per_req]
    theirs = [r.cpu_us_per_req for r in haproxy_two if not r.failed and r.cpu_us_per_req]
    if not ours or not theirs:
        return f"Projection for a {cores}-core host: not made (a run with two workers or two threads failed)."
    cpu, ref = statistics.median(ours), statistics.median(theirs)
    fulcrum, haproxy = cores * 1e6 / cpu, cores * 1e6 / ref
    return (
        f"Projection for a {cores}-core host running only the balancer: Fulcrum with `workers = \"auto\"` "
        f"({cores} workers) about {fulcrum:,.0f} keep-alive req/s, HAProxy with {cores} threads about "
        f"{haproxy:,.0f} ({fulcrum / haproxy:.2f}x), from this run's CPU per request with two workers "
        f"({cpu:.1f} µs, the supervisor's share included) and HAProxy's with two threads ({ref:.1f} µs). "
        "Assumptions: every core runs the balancer at that CPU per request, as two do here (clients and "
        "backends on other hosts; no contention that two cores do not already show, in the kernel's "
        "network stack or in memory); the supervisor's share stays what it is with two (it works on "
        "configuration changes and counter reads, not per request); SO_REUSEPORT spreads connections "
        "evenly enough over the workers. Workers scale the node; they do not make a request cheaper, "
        "so the ratio to HAProxy is the per-core one."
    )


def section_workers(ctx: Context) -> str:
    # Unpinned: two workers (or threads) pinned to one core measure time-sharing (measured on
    # the 2-core CI host: CPU/request 1.7x one worker's, pinned), not the split. Every process
    # of the section may use every core; the backends are started (pinned or not) as before.
    pinned = ctx.client_cpu, ctx.balancer_cpu
    ctx.stop("fulcrum")
    ctx.stop("haproxy")
    ctx.client_cpu = ctx.balancer_cpu = None
    try:
        return _section_workers(ctx)
    finally:
        ctx.client_cpu, ctx.balancer_cpu = pinned


def _section_workers(ctx: Context) -> str:
    runs = abba(ONE, TWO, ctx.opts.variant_rounds)
    rows = run_all(ctx, runs, "workers")
    one = [r for r, (_, v) in zip(rows, runs, strict=True) if v == ONE]
    two = [r for r, (_, v) in zip(rows, runs, strict=True) if v == TWO]
    comparison = compare_runs(one, two, WORKERS_TARGET, "1 worker", "2 workers")
    ctx.results["workers_comparison"] = comparison
    haproxy = haproxy_runs(ctx)
    return (
        render_runs(rows + haproxy)
        + "\n\n"
        + render_comparison(comparison, "1 worker", "2 workers")
        + "\n\n"
        + f"Target (issue 13): CPU per request with `[node] workers = 2` at most "
        f"{WORKERS_TARGET * 100:.0f} % above `workers = 1` (the CPU of lbnode's whole process "
        "tree: the supervisor and its workers). Unlike the main section nothing is pinned: wrk, "
        "the backends and the balancer share every core of the machine (two here), so req/s "
        "depends on what else runs; CPU µs/req is the figure to compare. "
        + variant_load_text(ctx)
        + order_text("1", "2", ctx.opts.variant_rounds)
        + spread_text(one, "1 worker")
        + " "
        + spread_text(two, "2 workers")
        + CORE_NOTE
        + "\n\n"
        + projection(two, [r for r, (_, n) in zip(haproxy, HAPROXY_RUNS, strict=True) if n == 2])
    )
