"""Runs of one Fulcrum config at a time under the main L7 load, and their comparison.

A ``Variant`` is an lbnode config (policy, affinity, protections, cluster) plus the
client it gets; ``run_variant`` starts it on Fulcrum's ports, measures it and stops it.
The policies, protections, metrics and cluster sections are built from these.
"""

from __future__ import annotations

import http.client
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from bench.configs import HOST, SMALL_PATH, Ports, fulcrum_config
from bench.harness import Context, StartError, try_proc
from bench.measure import L7Row, measure_l7, progress, too_many_errors
from bench.tables import DASH, fail_text, fmt_num, render_table

# etcd key prefix of a cluster-member variant's pools; the cluster section's propagation
# nodes use another (CLUSTER_PROPAGATION_PREFIX), so neither sees the other's pools.
CLUSTER_L7_PREFIX = "/fulcrum-bench-l7/v1"
# A fixed AES-GCM key for the cookie-affinity runs (a test key, not a secret).
AFFINITY_KEY = "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f"


@dataclass(frozen=True)
class Variant:
    """One Fulcrum configuration of the policies, protections, metrics or cluster section,
    and the client it gets: ``client`` is "" (plain wrk, as in the main L7 section),
    "x-user" (a wrk Lua script giving each request one of 1024 ``X-User`` values) or
    "cookie" (wrk sends the affinity cookie a first response set)."""

    name: str
    algorithm: str = "round_robin"
    hash_key: str | None = None
    weights: tuple[int, ...] | None = None
    affinity: bool = False  # [pools.affinity] mode = "cookie" with AFFINITY_KEY
    protections: bool = False  # see configs.PROTECTIONS
    client: str = ""
    cluster: bool = False  # a cluster member: [cluster] on the given etcd (CLUSTER_L7_PREFIX)
    access_log: bool = False  # [listeners.access_log] to a file beside the state_dir
    workers: int = 1  # [node] workers
    routes: int = 0  # [[listeners.routes]] of the http listener (configs.route_tables)

    def config(self, ports: Ports, state_dir: str | None = None, etcd: Sequence[str] = ()) -> str:
        if self.cluster and not etcd:
            raise ValueError(f"variant {self.name!r} is a cluster member: give the etcd URLs")
        return fulcrum_config(
            ports,
            self.algorithm,
            state_dir=state_dir,
            hash_key=self.hash_key,
            weights=self.weights,
            affinity_key=AFFINITY_KEY if self.affinity else None,
            protections=self.protections,
            etcd=etcd if self.cluster else (),
            etcd_prefix=CLUSTER_L7_PREFIX if self.cluster else None,
            access_log=f"{state_dir or '.'}.access.log" if self.access_log else None,
            workers=self.workers,
            routes=self.routes,
        )


BASELINE = Variant("round_robin")

T = TypeVar("T")


# wrk Lua script for client "x-user". A request function makes wrk build each request
# in Lua (cheap next to the balancer; wrk runs on its own CPU).
X_USER_LUA = """\
-- Each request carries "X-User: u<n mod 1024>": 1024 distinct consistent_hash keys.
local n = 0
request = function()
  n = n + 1
  return wrk.format(nil, nil, {["X-User"] = "u" .. (n % 1024)})
end
"""


def mean_figure(rows: Iterable[L7Row], attr: str) -> float | None:
    """Mean of ``attr`` over the rows that did not fail and have it; None when none has."""
    vals = [getattr(r, attr) for r in rows if not r.failed and getattr(r, attr) is not None]
    return sum(vals) / len(vals) if vals else None


def spread(rows: Iterable[L7Row], attr: str = "rps") -> float | None:
    """(max - min) / mean of ``attr`` over the measured rows; None with fewer than two."""
    vals: list[float] = [getattr(r, attr) for r in rows if not r.failed and getattr(r, attr) is not None]
    if len(vals) < 2 or sum(vals) == 0:
        return None
    return (max(vals) - min(vals)) / (sum(vals) / len(vals))


def core_percent(row: L7Row) -> float | None:
    """How much of a core the balancer used during the run: req/s x CPU s/req x 100.
    Near the usual figure when the balancer had its pinned core to itself; clearly
    lower when something else ran there (or the balancer sat waiting)."""
    if row.failed or row.rps is None or row.cpu_us_per_req is None:
        return None
    return row.rps * row.cpu_us_per_req / 1e4


def ratio_status(ratio: float | None, limit: float, higher_ok: bool, missing: str) -> str:
    """``met`` / ``not met`` for ``ratio`` against ``limit``; ``not met (missing)`` without it."""
    if ratio is None:
        return f"not met ({missing})"
    return "met" if (ratio >= limit if higher_ok else ratio <= limit) else "not met"


def ratio_of(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


@dataclass
class Comparison:
    figure: str
    without: str
    with_: str
    ratio: str
    goal: str
    status: str
    by_round: str = DASH  # each round's ratio, in run order


def ordinal(n: int) -> str:
    """1st, 2nd, 3rd, 4th, ..., 11th, 12th, 13th, ..., 21st."""
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def abba_labelled(a_name: str, a: T, b_name: str, b: T, rounds: int = 1) -> list[tuple[str, T]]:
    """``rounds`` times ``a``, ``b``, ``b``, ``a``, each run labelled with its side's count:
    a steady drift of the machine weighs on both sides alike within a round, each round
    gives one ratio (``round_ratios``), and the rounds' spread shows this run's noise."""
    runs: list[tuple[str, T]] = []
    for r in range(rounds):
        first, second = ordinal(2 * r + 1), ordinal(2 * r + 2)
        runs += [(f"{a_name} ({first})", a), (f"{b_name} ({first})", b),
                 (f"{b_name} ({second})", b), (f"{a_name} ({second})", a)]
    return runs


def abba(a: Variant, b: Variant, rounds: int = 1) -> list[tuple[str, Variant]]:
    """``abba_labelled`` for two variants, named by their names."""
    return abba_labelled(a.name, a, b.name, b, rounds)


def round_ratios(base: Sequence[L7Row], other: Sequence[L7Row], attr: str) -> list[float]:
    """One ratio per round of ABBA runs: the mean of ``other``'s two runs of the round over
    ``base``'s (the rows of each side in run order, two a round); a round where a side has
    no figure gives none. A side of one run (no ABBA) pairs run with run."""
    size = 2 if len(base) > 1 and len(other) > 1 else 1
    out = []
    for i in range(0, min(len(base), len(other)), size):
        ratio = ratio_of(mean_figure(other[i:i + size], attr), mean_figure(base[i:i + size], attr))
        if ratio is not None:
            out.append(ratio)
    return out


def order_text(a_name: str, b_name: str, rounds: int) -> str:
    """How the runs were ordered and compared, for a section's notes."""
    times = "once" if rounds == 1 else f"{rounds} times"
    return (
        f"Runs in the order {a_name}, {b_name}, {b_name}, {a_name}, {times} (a steady drift of "
        "the machine weighs on both sides alike); a round's ratio is between the means of its "
        "two runs of each, the ratio shown is the median of the rounds' (each in the by-round "
        "column: their spread is this run's noise, and a goal inside it is not a result); "
        "nothing is re-run or dropped. "
    )


def compare_runs(
    without: Sequence[L7Row],
    with_: Sequence[L7Row],
    limit: float,
    base_name: str,
    other_name: str,
) -> list[Comparison]:
    """The ``other_name`` runs (``with_``) against the ``base_name`` runs (``without``), both
    in run order: the median of the rounds' ratios (``round_ratios``) at most ``limit`` below
    for req/s, at most ``limit`` above for CPU µs/req (both targets), p99 for information;
    the means of all runs beside them. Too many errors in the ``with_`` runs fail both."""
    errors = sum(r.errors for r in with_ if not r.failed)
    requests = sum(r.requests for r in with_ if not r.failed)
    bad = too_many_errors(errors, requests)
    out = []
    for figure, attr, digits, higher_ok in (
        ("req/s", "rps", 0, True),
        ("CPU µs/req", "cpu_us_per_req", 1, False),
        ("p99 ms", "p99_ms", 2, None),
    ):
        a, b = mean_figure(without, attr), mean_figure(with_, attr)
        by_round = round_ratios(without, with_, attr)
        ratio = statistics.median(by_round) if by_round else None
        if higher_ok is None:
            goal, status = DASH, "information"
        else:
            goal_ratio = 1 - limit if higher_ok else 1 + limit
            goal = f">= {goal_ratio:.2f}x" if higher_ok else f"<= {goal_ratio:.2f}x"
            missing = f"no figure {base_name}" if a is None else f"no figure {other_name}"
            status = ratio_status(ratio, goal_ratio, higher_ok, missing)
            if status == "met" and bad:
                status = f"not met ({errors} errors in {requests} requests)"
            elif len(by_round) > 1 and min(by_round) < goal_ratio < max(by_round):
                status += " (goal inside the rounds' spread)"
        out.append(
            Comparison(
                figure,
                fmt_num(a, digits, thousands=True),
                fmt_num(b, digits, thousands=True),
                DASH if ratio is None else f"{ratio:.3f}x",
                goal,
                status,
                " ".join(f"{r:.3f}" for r in by_round) or DASH,
            )
        )
    return out


def render_runs(rows: Sequence[L7Row]) -> str:
    """A plain table of L7 runs (no ratios)."""
    out = []
    for r in rows:
        if r.failed:
            out.append([r.name, fail_text(r.failed)] + [DASH] * 5)
            continue
        out.append(
            [
                r.name,
                fmt_num(r.rps, 0, thousands=True),
                fmt_num(r.p50_ms, 2),
                fmt_num(r.p99_ms, 2),
                fmt_num(r.cpu_us_per_req, 1),
                fmt_num(core_percent(r), 0),
                (str(r.errors) if r.errors else "0") + (f" ({r.note})" if r.note else ""),
            ]
        )
    return render_table(["Run", "req/s", "p50 ms", "p99 ms", "CPU µs/req", "core %", "errors"], out)


def render_comparison(
    rows: Sequence[Comparison], base: str = "without", other: str = "with"
) -> str:
    return render_table(
        ["Figure", f"{base} (mean)", f"{other} (mean)", f"{other} / {base} (median)", "by round",
         "goal", "status"],
        [[c.figure, c.without, c.with_, c.ratio, c.by_round, c.goal, c.status] for c in rows],
        align="lrrrlll",
    )


def cookie_from_set_cookie(values: Iterable[str], name: str = "FULCRUM") -> str | None:
    """``NAME=value`` from the first ``Set-Cookie`` header value that sets ``name``."""
    for v in values:
        first = v.split(";", 1)[0].strip()
        k, eq, val = first.partition("=")
        if eq and k.strip() == name and val:
            return f"{name}={val.strip()}"
    return None


def affinity_cookie(port: int, timeout: float = 5.0) -> str | None:
    """``FULCRUM=value`` from the Set-Cookie of one ``GET /small`` through ``port``."""
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        conn.request("GET", SMALL_PATH, headers={"Host": "bench"})
        resp = conn.getresponse()
        resp.read()
        return cookie_from_set_cookie(resp.headers.get_all("Set-Cookie") or [])
    finally:
        conn.close()


def run_variant(
    ctx: Context,
    label: str,
    variant: Variant,
    key: str,
    duration: float | None = None,
    warmup: float | None = None,
) -> L7Row:
    """Start lbnode with ``variant``'s config on the usual Fulcrum ports (stopping the
    main section's lbnode first), measure it like the main L7 section with the
    shorter ``variant_duration`` (or ``duration``/``warmup`` when given), stop it.
    A cluster variant joins ``ctx.etcd()``."""
    ctx.stop("fulcrum")  # frees the ports; a later section starts it again
    try:
        etcd = [ctx.etcd()] if variant.cluster else []
    except StartError as exc:
        return L7Row(label, failed=str(exc))
    config = variant.config(ctx.ports, state_dir=str(ctx.tmp / f"{key}-state"), etcd=etcd)
    port = ctx.ports.fulcrum_web
    try:
        proc, err = try_proc(lambda: ctx.fulcrum(config, key=key))
        if proc is None:
            return L7Row(label, failed=err or "did not start")
        script: Path | None = None
        headers: tuple[str, ...] = ()
        if variant.client == "x-user":
            script = ctx.tmp / "x-user.lua"
            script.write_text(X_USER_LUA)
        elif variant.client == "cookie":
            try:
                cookie = affinity_cookie(port)
            except (OSError, http.client.HTTPException) as exc:
                return L7Row(label, failed=f"GET {SMALL_PATH} for the cookie: {exc}")
            if cookie is None:
                return L7Row(label, failed="no FULCRUM cookie in the response")
            headers = (f"Cookie: {cookie}",)
        o = ctx.opts
        return measure_l7(
            ctx,
            label,
            port,
            [proc.pid],
            duration=o.variant_duration if duration is None else duration,
            warmup=o.variant_warmup if warmup is None else warmup,
            script=script,
            headers=headers,
        )
    finally:
        ctx.stop(key)


def run_all(
    ctx: Context,
    runs: Sequence[tuple[str, Variant]],
    prefix: str,
    duration: float | None = None,
    warmup: float | None = None,
) -> list[L7Row]:
    ctx.backends()
    rows: list[L7Row] = []
    for i, (label, variant) in enumerate(runs):
        rows.append(run_variant(ctx, label, variant, f"fulcrum-{prefix}-{i}", duration, warmup))
        progress(rows[-1])
    return rows


def variant_load_text(ctx: Context) -> str:
    o = ctx.opts
    return (
        f"Same load as the main L7 section (`wrk -t{o.threads} -c{o.connections} --latency` on "
        f"GET {SMALL_PATH}, 3 backends), shorter: {o.variant_duration:g} s measured after a "
        f"{o.variant_warmup:g} s warm-up per run, each run on a freshly started lbnode (pinned "
        "as in the main section) with only the pool's policy or protections changed. "
    )


CORE_NOTE = (
    " core % = req/s x CPU µs/req: the share of its pinned core lbnode used; a run well "
    "below the others had less CPU (other work on the machine, or waiting), which lowers "
    "its req/s but not its CPU µs/req, the steadier measure of cost."
)


def spread_text(rows: Sequence[L7Row], what: str) -> str:
    sp = spread(rows)
    figures = ", ".join(fmt_num(r.rps, 0, thousands=True) for r in rows if not r.failed)
    if sp is None:
        return f"{what}: {figures or 'no figure'} req/s."
    return (
        f"{what}: {figures} req/s, {sp * 100:.1f} % apart: differences of that order "
        "are within this run's noise."
    )
