"""The ``routes`` section: CPU per request with 1,000 routes against 1 route (issue 15: within
5 %, so matching must be compiled, not a linear scan of regexes). Runs 1, 1,000, 1,000, 1.
"""

from __future__ import annotations

import statistics
import timeit
import tomllib
from collections.abc import Callable

from bench.configs import SMALL_PATH, Ports, fulcrum_config
from bench.harness import Context
from bench.tables import render_table
from bench.variants import (
    CORE_NOTE,
    Variant,
    abba,
    compare_runs,
    mean_figure,
    order_text,
    render_comparison,
    render_runs,
    run_all,
    spread_text,
    variant_load_text,
)
from lbnode.model import parse_config
from lbnode.routing import RequestFacts, Route, RouteTable, host_matches, route_matches

ROUTES_TARGET = 0.05  # issue 15: CPU per request with 1,000 routes within 5 % of 1 route
MANY = 1000

ONE_ROUTE = Variant("1 route", routes=1)
MANY_ROUTES = Variant(f"{MANY:,} routes", routes=MANY)


def route_runs(rounds: int = 1) -> list[tuple[str, Variant]]:
    """1 route, 1,000, 1,000, 1, ``rounds`` times. (ABBA)"""
    return abba(ONE_ROUTE, MANY_ROUTES, rounds)


def _tables() -> dict[int, RouteTable]:
    ports = Ports([1, 2, 3], 4, 5, 6, 7, 8, 9, 10)  # not bound: only the routes are read
    return {n: RouteTable(parse_config(tomllib.loads(fulcrum_config(ports, routes=n))).listeners[0].routes)
            for n in (1, MANY)}


def _linear(table: RouteTable, facts: RequestFacts) -> Route | None:
    """What matching would cost without the index: every route in order, every condition."""
    for i in sorted(range(len(table.routes)), key=lambda i: (-table.routes[i].priority, i)):
        route = table.routes[i]
        if host_matches(route, facts.host) and route_matches(route, facts):
            return route
    return None


def match_costs(rounds: int = 4, number: int = 20_000) -> dict[str, list[float]]:
    """µs per request of RouteTable.match (lbnode's own code, in this process) for the
    benchmark's request, 1 route and MANY in turn (ABBA, ``rounds`` times), and of a linear
    scan of the MANY routes for comparison. Each figure: the fastest of 3 repeats."""
    tables = _tables()
    headers = [(b"Host", b"127.0.0.1:8080")]

    def cost(fn: Callable[[], object], n: int) -> float:
        return min(timeit.repeat(fn, number=n, repeat=3)) / n * 1e6

    many = tables[MANY]
    out: dict[str, list[float]] = {"1 route": [], f"{MANY:,} routes": [], f"{MANY:,} routes, linear scan": []}
    for _ in range(rounds):
        for n in (1, MANY, MANY, 1):
            table = tables[n]
            assert table.match(RequestFacts(b"GET", "127.0.0.1", SMALL_PATH, "", headers, "127.0.0.1")) is not None
            label = "1 route" if n == 1 else f"{MANY:,} routes"
            out[label].append(cost(lambda t=table: t.match(  # type: ignore[misc]
                RequestFacts(b"GET", "127.0.0.1", SMALL_PATH, "", headers, "127.0.0.1")), number))
        out[f"{MANY:,} routes, linear scan"].append(cost(lambda: _linear(
            many, RequestFacts(b"GET", "127.0.0.1", SMALL_PATH, "", headers, "127.0.0.1")), 50))
    return out


def render_match_costs(costs: dict[str, list[float]]) -> str:
    rows = []
    for label, values in costs.items():
        rows.append([label, f"{statistics.median(values):.2f}", f"{min(values):.2f} - {max(values):.2f}",
                     str(len(values))])
    return render_table(["Matching alone", "µs/request (median)", "range", "figures"], rows, align="lrrr")


def section_routes(ctx: Context) -> str:
    costs = match_costs(rounds=2 if ctx.opts.quick else 4)
    runs = route_runs(ctx.opts.variant_rounds)
    rows = run_all(ctx, runs, "routes")
    one = [r for r, (_, v) in zip(rows, runs, strict=True) if v == ONE_ROUTE]
    many = [r for r, (_, v) in zip(rows, runs, strict=True) if v == MANY_ROUTES]
    comparison = compare_runs(one, many, ROUTES_TARGET, "1 route", f"{MANY:,} routes")
    ctx.results["routes_comparison"] = comparison
    one_cpu = mean_figure(one, "cpu_us_per_req")
    extra = statistics.median(costs[f"{MANY:,} routes"]) - statistics.median(costs["1 route"])
    share = f"{extra / one_cpu * 100:.1f} %" if one_cpu else "—"
    return (
        render_match_costs(costs)
        + "\n\n"
        + f"Matching {MANY:,} routes instead of 1 adds {extra:.2f} µs per request in this process "
        f"({share} of the 1-route runs' CPU per request below): the whole-node runs below cannot "
        "show a difference this small on a shared machine, the table above isolates it. A linear "
        "scan of every route (what the index replaces) is shown for comparison. Each figure is the "
        "fastest of 3 repeats of 20,000 matches, 1 and many routes interleaved.\n\n"
        + render_runs(rows)
        + "\n\n"
        + render_comparison(comparison, "1 route", f"{MANY:,} routes")
        + "\n\n"
        + f"Target (issue 15): with {MANY:,} routes, CPU per request at most "
        f"{ROUTES_TARGET * 100:.0f} % above one route (req/s at most that far below). The "
        f"{MANY:,} routes (bench/configs.py route_tables): a quarter each on exact hosts, path "
        "prefixes, path regexes (`/svc<i>/[a-z]+/[0-9]{1,12}`) and `X-Tenant` header values, "
        "none of which the request meets; the one before last (`path_prefix = \"/small\"`) takes "
        "it. One route: that route alone. Both send to the same pool. "
        + variant_load_text(ctx)
        + order_text("1", "many", ctx.opts.variant_rounds)
        + spread_text(one, "1 route")
        + " "
        + spread_text(many, f"{MANY:,} routes")
        + CORE_NOTE
    )
