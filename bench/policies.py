"""The ``policies`` section: Fulcrum once per balancing policy, against round robin
run first and again last (issue: no policy costs more than 5 % of throughput).
"""

from __future__ import annotations

from collections.abc import Sequence

from bench.harness import Context
from bench.measure import L7Row, too_many_errors
from bench.tables import DASH, fail_text, fmt_num, fmt_ratio, render_table
from bench.variants import (
    BASELINE,
    CORE_NOTE,
    Variant,
    core_percent,
    mean_figure,
    ratio_of,
    ratio_status,
    run_all,
    spread_text,
    variant_load_text,
)

POLICY_TARGET = 0.95  # every policy's L7 req/s >= 0.95x round robin's (in the same run)


POLICY_VARIANTS: tuple[Variant, ...] = (
    Variant("weighted_round_robin (weights 1,2,3)", "weighted_round_robin", weights=(1, 2, 3)),
    Variant("random", "random"),
    Variant("least_connections", "least_connections"),
    Variant("least_loaded", "least_loaded"),
    Variant("least_latency", "least_latency"),
    Variant("source_hash", "source_hash"),
    Variant("consistent_hash, hash_key path", "consistent_hash", hash_key="path"),
    Variant(
        "consistent_hash, hash_key header:X-User",
        "consistent_hash",
        hash_key="header:X-User",
        client="x-user",
    ),
    Variant("cookie affinity, no cookie sent", affinity=True),
    Variant("cookie affinity, cookie sent", affinity=True, client="cookie"),
)


def policy_runs() -> list[tuple[str, Variant]]:
    """The policies section's runs in order: round robin first and again last (its
    mean is the baseline, so a drift of the machine during the section shows up as
    the gap between the two), every other variant once in between."""
    return (
        [(f"{BASELINE.name} (1st)", BASELINE)]
        + [(v.name, v) for v in POLICY_VARIANTS]
        + [(f"{BASELINE.name} (2nd)", BASELINE)]
    )


def policy_statuses(
    rows: Sequence[L7Row], baseline: Sequence[str], limit: float = POLICY_TARGET
) -> list[str]:
    """Per row: ``baseline``, ``met`` (req/s >= ``limit`` x the mean of the baseline rows,
    errors within ``MAX_ERROR_SHARE``) or ``not met (...)``."""
    b_rps = mean_figure([r for r in rows if r.name in baseline], "rps")
    out = []
    for r in rows:
        if r.name in baseline:
            out.append("baseline (failed)" if r.failed else "baseline")
        elif r.failed:
            out.append("not met (failed)")
        else:
            status = ratio_status(ratio_of(r.rps, b_rps), limit, True, "no round_robin figure")
            if status == "met" and too_many_errors(r.errors, r.requests):
                status = f"not met ({r.errors} errors in {r.requests} requests)"
            out.append(status)
    return out


def render_policies(
    rows: Sequence[L7Row], baseline: Sequence[str], limit: float = POLICY_TARGET
) -> str:
    """The per-policy table: every row against the mean of the ``baseline`` rows (the
    round robin runs); the target is on throughput: req/s >= ``limit`` x baseline.
    Ratios have 3 decimals, so a row just under the goal does not read as on it."""
    base = [r for r in rows if r.name in baseline]
    b_rps, b_cpu = mean_figure(base, "rps"), mean_figure(base, "cpu_us_per_req")
    goal = f">= {limit:.2f}x"
    statuses = policy_statuses(rows, baseline, limit)
    out = []
    for r, status in zip(rows, statuses, strict=True):
        is_base = r.name in baseline
        if r.failed:
            out.append([r.name, fail_text(r.failed)] + [DASH] * 8 + [status])
            continue
        out.append(
            [
                r.name,
                fmt_num(r.rps, 0, thousands=True),
                fmt_num(r.p50_ms, 2),
                fmt_num(r.p99_ms, 2),
                fmt_num(r.cpu_us_per_req, 1),
                fmt_num(core_percent(r), 0),
                fmt_ratio(r.cpu_us_per_req, b_cpu, 3),
                fmt_ratio(r.rps, b_rps, 3),
                (str(r.errors) if r.errors else "0") + (f" ({r.note})" if r.note else ""),
                DASH if is_base else goal,
                status,
            ]
        )
    return render_table(
        [
            "Policy",
            "req/s",
            "p50 ms",
            "p99 ms",
            "CPU µs/req",
            "core %",
            "CPU vs round_robin",
            "throughput vs round_robin",
            "errors",
            "goal",
            "status",
        ],
        out,
        align="lrrrrrrrrll",
    )


def section_policies(ctx: Context) -> str:
    runs = policy_runs()
    rows = run_all(ctx, runs, "policy")
    ctx.results["policies"] = rows
    base_names = [label for label, v in runs if v == BASELINE]
    base_rows = [r for r in rows if r.name in base_names]
    measured = [r for r in rows if r.name not in base_names]
    met = policy_statuses(rows, base_names).count("met")
    return (
        render_policies(rows, base_names)
        + "\n\n"
        + f"Target: no policy costs more than {(1 - POLICY_TARGET) * 100:.0f} % of throughput "
        f"against round_robin (req/s >= {POLICY_TARGET:.2f}x): met by {met} of {len(measured)}. "
        + variant_load_text(ctx)
        + "Round robin runs first and again last; the ratios are against the mean of the two "
        "(the machine is shared and noisy; nothing is re-run or dropped). "
        + spread_text(base_rows, "The two round_robin runs")
        + CORE_NOTE
        + " Every row sends the same path from the same client IP, so source_hash and "
        "consistent_hash on `path` send every request to one backend (the backends are one "
        "nginx worker, so this does not change backend capacity). consistent_hash on "
        "`header:X-User` gets a wrk Lua script that sends one of 1024 X-User values per request "
        "(about 14 more request bytes, requests built in Lua on wrk's CPU). Cookie affinity "
        "(round robin underneath, a fixed 64-hex key): with no cookie sent, as wrk does, every "
        "request is a new session, so every response carries a freshly sealed Set-Cookie; the "
        '"cookie sent" row replays one cookie (wrk -H) so every request is unsealed and '
        "sticks to one backend. Weighted round robin uses weights 1, 2, 3."
    )
