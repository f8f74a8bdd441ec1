"""The ``accesslog`` section: Fulcrum with ``[listeners.access_log]`` writing a JSON line per
request to a file, against no access log (issue 12 sets no figure; runs off, on, on, off).
"""

from __future__ import annotations

from bench.harness import Context
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

# Issue 12 sets no figure for the access log; ours: a JSON line per request to a file costs at
# most 10 % more CPU per request (the line is formatted and written, in the same process).
ACCESS_LOG_TARGET = 0.10

UNLOGGED = Variant("access log off")
LOGGED = Variant("access log on", access_log=True)


def access_log_runs(rounds: int = 1) -> list[tuple[str, Variant]]:
    """Off, on, on, off, ``rounds`` times. (ABBA)"""
    return abba(UNLOGGED, LOGGED, rounds)


def section_access_log(ctx: Context) -> str:
    runs = access_log_runs(ctx.opts.variant_rounds)
    rows = run_all(ctx, runs, "accesslog")
    off = [r for r, (_, v) in zip(rows, runs, strict=True) if v == UNLOGGED]
    on = [r for r, (_, v) in zip(rows, runs, strict=True) if v == LOGGED]
    comparison = compare_runs(off, on, ACCESS_LOG_TARGET, "access log off", "access log on")
    ctx.results["access_log_comparison"] = comparison
    return (
        render_runs(rows)
        + "\n\n"
        + render_comparison(comparison, "off", "on")
        + "\n\n"
        + f"Target (ours; issue 12 sets none): with `[listeners.access_log]` writing a JSON line "
        f"per request to a file, CPU per request at most {ACCESS_LOG_TARGET * 100:.0f} % above "
        "(and req/s at most that far below) the runs without. The writer's thread formats and "
        "writes in lbnode's process: its CPU is in the figures. "
        + variant_load_text(ctx)
        + order_text("off", "on", ctx.opts.variant_rounds)
        + spread_text(off, "Off")
        + " "
        + spread_text(on, "On")
        + CORE_NOTE
    )
