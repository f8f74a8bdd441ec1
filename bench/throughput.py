"""The side-by-side sections: L7 keep-alive (``l7``) and L4 bulk (``l4``) through Fulcrum,
HAProxy and nginx, and the ``targets`` they are held to (Fulcrum against HAProxy).

The renderers and ``evaluate_targets`` are pure; the sections start processes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from bench.configs import BULK_PATH, SMALL_PATH
from bench.harness import Context, Proc, try_proc
from bench.measure import (
    MAX_ERROR_SHARE,
    L4Row,
    L7Row,
    interleaved,
    measure_bulk,
    measure_l7,
    median_run,
    progress,
    ratio_spread,
)
from bench.tables import DASH, fail_text, fmt_num, fmt_ratio, render_table

# Targets from the project brief: (key, figure, goal text, test on ratio = Fulcrum / HAProxy).
L7_CPU_TARGET = 3.5  # Fulcrum L7 CPU per request <= 3.5x HAProxy's
L4_BULK_TARGET = 0.9  # Fulcrum L4 bulk GB/s >= 0.9x HAProxy's


def render_l7(rows: Sequence[L7Row], ref: str = "HAProxy") -> str:
    base = next((r for r in rows if r.name == ref and not r.failed), None)
    out = []
    for r in rows:
        if r.failed:
            out.append([r.name, fail_text(r.failed)] + [DASH] * 7)
            continue
        errs = str(r.errors) if r.errors else "0"
        out.append(
            [
                r.name,
                fmt_num(r.rps, 0, thousands=True),
                fmt_num(r.p50_ms, 2),
                fmt_num(r.p99_ms, 2),
                fmt_num(r.cpu_us_per_req, 1),
                fmt_ratio(r.cpu_us_per_req, base.cpu_us_per_req if base else None),
                fmt_ratio(r.rps, base.rps if base else None),
                fmt_num(r.backend_cpu_us_per_req, 1),
                errs + (f" ({r.note})" if r.note else ""),
            ]
        )
    return render_table(
        [
            "Balancer",
            "req/s",
            "p50 ms",
            "p99 ms",
            "CPU µs/req",
            "CPU vs HAProxy",
            "req/s vs HAProxy",
            "backend µs/req",
            "errors",
        ],
        out,
    )


def render_l4(rows: Sequence[L4Row], ref: str = "HAProxy") -> str:
    base = next((r for r in rows if r.name == ref and not r.failed), None)
    out = []
    for r in rows:
        if r.failed:
            out.append([r.name, fail_text(r.failed)] + [DASH] * 3)
            continue
        out.append(
            [
                r.name,
                fmt_num(r.gbps, 2),
                fmt_ratio(r.gbps, base.gbps if base else None),
                fmt_num(r.cpu_ms_per_gb, 0),
                f"{r.downloads}" + (f" ({r.note})" if r.note else ""),
            ]
        )
    return render_table(["Path", "GB/s", "vs HAProxy", "balancer CPU ms/GB", "downloads"], out)


@dataclass
class TargetResult:
    name: str
    fulcrum: str
    haproxy: str
    ratio: str
    goal: str
    status: str


def evaluate_targets(l7: Sequence[L7Row] | None, l4: Sequence[L4Row] | None) -> list[TargetResult]:
    """The two targets: met / not met / not measured, from the section results."""

    def pick(rows: Sequence[L7Row] | Sequence[L4Row] | None, name: str) -> L7Row | L4Row | None:
        return next((r for r in rows if r.name == name), None) if rows is not None else None

    out = []
    for title, rows, attr, unit, goal, limit, higher_ok in (
        (
            "L7 CPU per request",
            l7,
            "cpu_us_per_req",
            "µs/req",
            f"<= {L7_CPU_TARGET}x",
            L7_CPU_TARGET,
            False,
        ),
        ("L4 bulk throughput", l4, "gbps", "GB/s", f">= {L4_BULK_TARGET}x", L4_BULK_TARGET, True),
    ):
        if rows is None:
            out.append(
                TargetResult(title, DASH, DASH, DASH, goal, "not measured (section skipped)")
            )
            continue
        f, h = pick(rows, "Fulcrum"), pick(rows, "HAProxy")
        fv = getattr(f, attr) if f and not f.failed else None
        hv = getattr(h, attr) if h and not h.failed else None
        digits = 1 if unit == "µs/req" else 2
        fs = f"{fv:.{digits}f} {unit}" if fv is not None else ("failed" if f else DASH)
        hs = f"{hv:.{digits}f} {unit}" if hv is not None else ("failed" if h else DASH)
        if hv is None or hv == 0:
            out.append(TargetResult(title, fs, hs, DASH, goal, "not met (no HAProxy figure)"))
        elif fv is None:
            out.append(TargetResult(title, fs, hs, DASH, goal, "not met (no Fulcrum figure)"))
        else:
            ratio = fv / hv
            ok = ratio >= limit if higher_ok else ratio <= limit
            status = "met" if ok else "not met"
            # Cheap error responses must not pass for cheap proxying.
            errors, requests = getattr(f, "errors", 0), getattr(f, "requests", 0)
            if ok and errors and errors > MAX_ERROR_SHARE * max(requests, 1):
                status = f"not met ({errors} errors in {requests} requests)"
            out.append(TargetResult(title, fs, hs, f"{ratio:.2f}x", goal, status))
    return out


def render_targets(targets: Sequence[TargetResult]) -> str:
    return render_table(
        ["Target", "Fulcrum", "HAProxy", "Fulcrum / HAProxy", "Goal", "Status"],
        [[t.name, t.fulcrum, t.haproxy, t.ratio, t.goal, t.status] for t in targets],
        align="lrrrll",
    )


def section_l7(ctx: Context) -> str:
    ctx.backends()
    balancers: dict[str, tuple[Callable[[], Proc] | None, int]] = {
        "Fulcrum": (ctx.fulcrum, ctx.ports.fulcrum_web),
        "HAProxy": (ctx.haproxy, ctx.ports.haproxy_web),
        "nginx": (ctx.nginx_lb, ctx.ports.nginx_web),
        "direct (no balancer)": (None, ctx.ports.backends[0]),
    }

    def run(name: str) -> L7Row:
        getter, port = balancers[name]
        if getter is None:
            row = measure_l7(ctx, name, port, [])
        else:
            proc, err = try_proc(getter)
            row = L7Row(name, failed=err) if proc is None else measure_l7(ctx, name, port, [proc.pid])
        progress(row)
        return row

    o = ctx.opts
    runs = interleaved(list(balancers), o.rounds, run)
    rows = [median_run(r) for r in runs.values()]
    ctx.results["l7"] = rows
    spread = ratio_spread(runs["HAProxy"], runs["Fulcrum"])
    return (
        render_l7(rows)
        + "\n\n"
        + f"`wrk -t{o.threads} -c{o.connections} -d{o.duration:g}s --latency` on GET {SMALL_PATH} "
        f"(100-byte body, HTTP/1.1 keep-alive), after a {o.warmup:g} s unmeasured warm-up; "
        f"{o.rounds} rounds, the balancers in turn (forward, then backward: ABBA), each row its "
        "median run by CPU per request (the range in errors' column). "
        + (f"Fulcrum's CPU per request over HAProxy's, round by round: {spread}. " if spread else "")
        + "Latency is under full closed-loop load, so it mostly mirrors throughput. "
        "CPU µs/req = the balancer's (utime+stime) over the run, all threads and child processes, "
        "from /proc/PID/stat, divided by the requests wrk completed; backend µs/req is the same "
        "for the backend nginx. Round robin over 3 backends; direct = wrk to one backend."
    )


def section_l4(ctx: Context) -> str:
    ctx.backends()
    rows: list[L4Row] = []
    for name, getter, port in (
        ("Fulcrum", ctx.fulcrum, ctx.ports.fulcrum_bulk),
        ("HAProxy", ctx.haproxy, ctx.ports.haproxy_bulk),
        ("HAProxy, splice-response (info)", ctx.haproxy, ctx.ports.haproxy_bulk_splice),
    ):
        proc, err = try_proc(getter)
        rows.append(
            L4Row(name, failed=err) if proc is None else measure_bulk(ctx, name, port, [proc.pid])
        )
        progress(rows[-1])
    rows.append(measure_bulk(ctx, "direct (no balancer)", ctx.ports.backends[0], []))
    progress(rows[-1])
    ctx.results["l4"] = rows
    return (
        render_l4(rows)
        + "\n\n"
        + f"GET {BULK_PATH} (64 MiB, nginx sendfile) over a fresh connection each time, "
        f"repeated for {ctx.opts.bulk_duration:g} s (at least {ctx.opts.bulk_min_downloads}) by a "
        "Python socket client reading into a 4 MiB buffer; GB/s = 10^9 bytes of body per second "
        "of wall time including connect. Fulcrum: tcp listener; HAProxy: mode tcp, "
        "option splice-auto (the reference for the target). The splice-response row is the same "
        "HAProxy process with splicing forced on the response direction, for information: "
        "splice-auto only splices when its heuristics call a stream fast, which may be never here. "
        "balancer CPU ms/GB = balancer CPU per 10^9 bytes moved."
    )


def section_targets(ctx: Context) -> str:
    targets = evaluate_targets(ctx.results.get("l7"), ctx.results.get("l4"))  # type: ignore[arg-type]
    ctx.results["targets"] = targets
    return render_targets(targets)
