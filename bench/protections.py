"""The ``protections`` section: Fulcrum with health checks, outlier detection, limits and
a rate limit on, against the same config without them (runs without, with, with, without).
"""

from __future__ import annotations

from collections.abc import Sequence

from bench.configs import PROTECTIONS
from bench.harness import Context
from bench.measure import L7Row
from bench.variants import (
    CORE_NOTE,
    Comparison,
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

PROTECTION_TARGET = 0.05  # protections on: req/s at most 5 % below, CPU/req at most 5 % above


PLAIN = Variant("without protections")
PROTECTED = Variant("with protections", protections=True)


def protection_runs(rounds: int = 1) -> list[tuple[str, Variant]]:
    """Without, with, with, without, ``rounds`` times. (ABBA)"""
    return abba(PLAIN, PROTECTED, rounds)


def compare_protections(
    without: Sequence[L7Row], with_: Sequence[L7Row], limit: float = PROTECTION_TARGET
) -> list[Comparison]:
    """Means of the runs without and with protections: req/s at most ``limit`` below,
    CPU µs/req at most ``limit`` above (both targets), p99 for information. Too many
    errors in the runs with protections (e.g. a rate limit that triggered) fail both."""
    return compare_runs(without, with_, limit, "without protections", "with protections")


def section_protections(ctx: Context) -> str:
    runs = protection_runs(ctx.opts.variant_rounds)
    rows = run_all(ctx, runs, "protect")
    ctx.results["protections"] = rows
    without = [r for r, (_, v) in zip(rows, runs, strict=True) if v == PLAIN]
    with_ = [r for r, (_, v) in zip(rows, runs, strict=True) if v == PROTECTED]
    comparison = compare_protections(without, with_)
    ctx.results["protections_comparison"] = comparison
    pr = PROTECTIONS
    return (
        render_runs(rows)
        + "\n\n"
        + render_comparison(comparison)
        + "\n\n"
        + f"Target: with protections, no more than {PROTECTION_TARGET * 100:.0f} % below the "
        "figures without them (req/s at least, CPU per request at most that far off; p99 "
        "for information). Protections: `[pools.health]` type http, interval "
        f'{pr["health_interval"]}, path "{pr["health_path"]}"; `[pools.outlier]` with its '
        f"defaults; `max_inflight = {pr['max_inflight']}` per backend; listener "
        f"`max_connections = {pr['max_connections']}`; `[listeners.rate_limit]` rate "
        f"{pr['rate']}, burst {pr['burst']} (never triggered by this load: a 429 would count "
        "as an error). Round robin in both. "
        + variant_load_text(ctx)
        + order_text("without", "with", ctx.opts.variant_rounds)
        + spread_text(without, "Without protections")
        + " "
        + spread_text(with_, "With protections")
        + CORE_NOTE
        + " The health checks' own CPU (3 checks a second) is in the CPU figures."
    )
