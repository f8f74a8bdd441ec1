"""``lbctl top``: the pools and backends of every node, refreshed each second, from Status calls.

Owns turning two samples of the nodes' cumulative counters into rates and recent latency
quantiles, and drawing them: pure functions (no I/O, no clock: times are passed in), except
``run``, the loop that samples, sleeps and writes. The nodes keep only counters since their
start; every rate here is the difference between two samples divided by the time between
them, summed over the nodes that answered both. The calls themselves are lbctl.cli's.
"""

from __future__ import annotations

import datetime
import io
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, TextIO

from lbctl.output import emit_json, table

# Terminal control (ECMA-48): the alternate screen keeps the shell's screen to give back on
# exit, as top(1) does; home + erase redraws in place; the cursor is hidden while drawing.
ENTER_SCREEN = "\x1b[?1049h\x1b[?25l"
LEAVE_SCREEN = "\x1b[?25h\x1b[?1049l"
REDRAW = "\x1b[H\x1b[2J"


@dataclass(frozen=True, slots=True)
class BackendCounters:
    """One backend on one node at one moment (cumulative counters as the node keeps them)."""

    address: str
    health: str
    admin: str
    inflight: int
    connections: int
    requests: int
    failures: int
    responses: Mapping[str, int]  # status class -> relayed responses
    bounds: tuple[float, ...]  # histogram upper bounds, seconds (+Inf implied)
    counts: tuple[int, ...]  # cumulative per bound, then the total


@dataclass(frozen=True, slots=True)
class NodeSample:
    node: str
    at: float  # monotonic seconds, the middle of the call that read it
    backends: Mapping[tuple[str, str], BackendCounters]  # (pool, backend id) ->
    pools: Mapping[str, tuple[int, int]]  # pool -> (queue length, retries)


@dataclass(frozen=True, slots=True)
class Sample:
    """Every node that answered at one refresh, and those that did not (node -> why)."""

    wall: float  # time.time() of the refresh, for the header
    nodes: Mapping[str, NodeSample]
    unreachable: Mapping[str, str] = field(default_factory=dict)


def node_sample(status: Any, at: float) -> NodeSample:
    """A StatusResponse (fulcrum.v1) as counters."""
    backends = {}
    pools = {}
    for pool in status.pools:
        pools[pool.name] = (pool.queue_length, pool.retries)
        for b in pool.backends:
            h = b.response_seconds
            backends[(pool.name, b.id)] = BackendCounters(
                address=b.address, health=b.health, admin=b.admin, inflight=b.inflight, connections=b.connections,
                requests=b.requests, failures=b.failures, responses={r.code: r.count for r in b.responses},
                bounds=tuple(h.bounds), counts=tuple(h.counts),
            )
    return NodeSample(status.node_id, at, backends, pools)


def increase(before: int, after: int) -> int:
    """A counter's increase; a counter that went down restarted (the node, or the backend
    re-added), so all of ``after`` is new, as Prometheus' rate() counts a reset."""
    return after - before if after >= before else after


def quantile(q: float, bounds: tuple[float, ...], counts: Iterable[int]) -> float | None:
    """The q-quantile of cumulative bucket counts, interpolated linearly inside its bucket
    (Prometheus' histogram_quantile); None without observations. Above the last bound: that bound."""
    cumulative = list(counts)
    if not cumulative or cumulative[-1] <= 0:
        return None
    rank = q * cumulative[-1]
    for i, c in enumerate(cumulative):
        if c >= rank and c > 0:
            if i >= len(bounds):
                return bounds[-1] if bounds else None
            lower = bounds[i - 1] if i > 0 else 0.0
            below = cumulative[i - 1] if i > 0 else 0
            inside = c - below
            return lower + (bounds[i] - lower) * ((rank - below) / inside if inside else 1.0)
    return bounds[-1] if bounds else None


@dataclass(slots=True)
class Totals:
    """What the view shows for a backend (or a pool) over one interval, on one node or summed."""

    requests: int = 0  # cumulative
    requests_per_s: float | None = None  # None: the first refresh, nothing to compare with
    failures: int = 0
    failures_per_s: float | None = None
    responses_per_s: dict[str, float] = field(default_factory=dict)
    inflight: int = 0
    connections: int = 0
    bucket_increase: list[int] = field(default_factory=list)
    bounds: tuple[float, ...] = ()
    health: dict[str, int] = field(default_factory=dict)  # state -> nodes that see it

    def add(self, other: Totals) -> None:
        self.requests += other.requests
        self.failures += other.failures
        self.inflight += other.inflight
        self.connections += other.connections
        self.requests_per_s = _plus(self.requests_per_s, other.requests_per_s)
        self.failures_per_s = _plus(self.failures_per_s, other.failures_per_s)
        for code, r in other.responses_per_s.items():
            self.responses_per_s[code] = self.responses_per_s.get(code, 0.0) + r
        if other.bucket_increase:
            if not self.bucket_increase:
                self.bucket_increase, self.bounds = [0] * len(other.bucket_increase), other.bounds
            if self.bounds == other.bounds:  # nodes of different versions: skip rather than mix
                self.bucket_increase = [a + b for a, b in zip(self.bucket_increase, other.bucket_increase, strict=True)]
        for state, n in other.health.items():
            self.health[state] = self.health.get(state, 0) + n

    def latency(self, q: float) -> float | None:
        return quantile(q, self.bounds, self.bucket_increase)

    def error_ratio(self) -> float | None:
        if not self.requests_per_s or self.failures_per_s is None:
            return None
        return min(1.0, self.failures_per_s / self.requests_per_s)

    def as_dict(self) -> dict[str, Any]:
        return {
            "requests": self.requests, "requests_per_s": _round(self.requests_per_s),
            "failures": self.failures, "failures_per_s": _round(self.failures_per_s),
            "error_ratio": _round(self.error_ratio(), 4),
            "responses_per_s": {k: _round(v) for k, v in sorted(self.responses_per_s.items())},
            "p50_seconds": _round(self.latency(0.5), 6), "p99_seconds": _round(self.latency(0.99), 6),
            "inflight": self.inflight, "connections": self.connections, "health": dict(sorted(self.health.items())),
        }


def _plus(a: float | None, b: float | None) -> float | None:
    return b if a is None else a if b is None else a + b


def _round(v: float | None, digits: int = 3) -> float | None:
    return None if v is None else round(v, digits)


def backend_totals(cur: BackendCounters, prev: BackendCounters | None, seconds: float) -> Totals:
    """One backend on one node: counters now, rates since ``prev`` (None: no rates yet)."""
    t = Totals(requests=cur.requests, failures=cur.failures, inflight=cur.inflight, connections=cur.connections,
               health={cur.health: 1})
    if prev is None or seconds <= 0:
        return t
    t.requests_per_s = increase(prev.requests, cur.requests) / seconds
    t.failures_per_s = increase(prev.failures, cur.failures) / seconds
    t.responses_per_s = {code: increase(prev.responses.get(code, 0), n) / seconds for code, n in cur.responses.items()}
    if cur.bounds == prev.bounds and len(cur.counts) == len(prev.counts):
        # A reset anywhere resets them all: take the whole histogram as new then.
        reset = cur.counts and cur.counts[-1] < prev.counts[-1]
        t.bucket_increase = list(cur.counts) if reset else [c - p for c, p in zip(cur.counts, prev.counts, strict=True)]
        t.bounds = cur.bounds
    return t


@dataclass(slots=True)
class BackendView:
    pool: str
    backend: str
    address: str
    admin: str
    total: Totals
    nodes: dict[str, Totals]


@dataclass(slots=True)
class PoolView:
    name: str
    total: Totals
    queue_length: int
    retries: int
    retries_per_s: float | None
    backends: list[BackendView]


def view(cur: Sample, prev: Sample | None) -> list[PoolView]:
    """Pools and backends summed over the nodes of ``cur``; rates where a node is in both samples."""
    rows: dict[tuple[str, str], BackendView] = {}
    pools: dict[str, PoolView] = {}
    for node_id, ns in sorted(cur.nodes.items()):
        before = prev.nodes.get(node_id) if prev is not None else None
        seconds = ns.at - before.at if before is not None else 0.0
        for (pool, backend), counters in ns.backends.items():
            old = before.backends.get((pool, backend)) if before is not None else None
            t = backend_totals(counters, old, seconds)
            row = rows.setdefault((pool, backend), BackendView(pool, backend, counters.address, counters.admin,
                                                               Totals(), {}))
            row.total.add(t)
            row.nodes[node_id] = t
        for pool, (queue, retries) in ns.pools.items():
            pv = pools.setdefault(pool, PoolView(pool, Totals(), 0, 0, None, []))
            pv.queue_length += queue
            pv.retries += retries
            if before is not None and pool in before.pools and seconds > 0:
                pv.retries_per_s = _plus(pv.retries_per_s, increase(before.pools[pool][1], retries) / seconds)
    for (pool, _), row in sorted(rows.items()):
        pv = pools.setdefault(pool, PoolView(pool, Totals(), 0, 0, None, []))
        pv.backends.append(row)
        pv.total.add(row.total)
    return [pools[name] for name in sorted(pools)]


def interval_of(cur: Sample, prev: Sample | None) -> float | None:
    """Seconds between the samples, from the nodes in both (they are read at the same moment)."""
    if prev is None:
        return None
    spans = [ns.at - prev.nodes[n].at for n, ns in cur.nodes.items() if n in prev.nodes]
    return sum(spans) / len(spans) if spans else None


def snapshot_dict(cur: Sample, prev: Sample | None) -> dict[str, Any]:
    """``lbctl top -o json``: the sums, with each node's share under ``nodes``."""
    return {
        "time": _iso(cur.wall),
        "interval_seconds": _round(interval_of(cur, prev)),
        "nodes": sorted(cur.nodes),
        "unreachable": dict(sorted(cur.unreachable.items())),
        "pools": [
            {"name": p.name, **p.total.as_dict(), "queue_length": p.queue_length, "retries": p.retries,
             "retries_per_s": _round(p.retries_per_s),
             "backends": [{"id": b.backend, "address": b.address, "admin": b.admin, **b.total.as_dict(),
                           "nodes": {n: t.as_dict() for n, t in sorted(b.nodes.items())}} for b in p.backends]}
            for p in view(cur, prev)
        ],
    }


def _iso(wall: float) -> str:
    return datetime.datetime.fromtimestamp(wall, datetime.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _rate(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}"


def _seconds(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v * 1000:.1f}ms" if v < 1 else f"{v:.2f}s"


def _percent(v: float | None) -> str:
    return "-" if v is None else f"{v * 100:.1f}%"


def _health(states: Mapping[str, int]) -> str:
    if len(states) == 1:
        return next(iter(states))
    return ", ".join(f"{s} {n}" for s, n in sorted(states.items()))  # the nodes disagree: how many see what


HEADERS = ["POOL", "BACKEND", "HEALTH", "REQ/S", "ERR/S", "ERR%", "P50", "P99", "INFLIGHT", "CONNS", "QUEUE",
           "RETRY/S", "REQUESTS"]


def render(cur: Sample, prev: Sample | None) -> list[str]:
    """The header lines and the table: a line per pool (its backends summed), then its backends."""
    seconds = interval_of(cur, prev)
    over = f"rates over the last {seconds:.2f}s" if seconds is not None else "rates from the next refresh"
    lines = [f"lbctl top  {_iso(cur.wall)}  {len(cur.nodes)} node{'s' if len(cur.nodes) != 1 else ''} "
             f"({', '.join(sorted(cur.nodes)) or 'none'}), summed; {over}"]
    lines += [f"  {node}: not answering: {why}" for node, why in sorted(cur.unreachable.items())]
    rows: list[list[object]] = []
    for p in view(cur, prev):
        t = p.total
        rows.append([p.name, "*", _health(t.health) if t.health else "-", _rate(t.requests_per_s),
                     _rate(t.failures_per_s), _percent(t.error_ratio()), _seconds(t.latency(0.5)),
                     _seconds(t.latency(0.99)), t.inflight, t.connections, p.queue_length, _rate(p.retries_per_s),
                     t.requests])
        for b in p.backends:
            t = b.total
            health = _health(t.health) + ("" if b.admin == "enabled" else f" ({b.admin})")
            rows.append(["", b.backend, health, _rate(t.requests_per_s), _rate(t.failures_per_s),
                         _percent(t.error_ratio()), _seconds(t.latency(0.5)), _seconds(t.latency(0.99)), t.inflight,
                         t.connections, "", "", t.requests])
    out = io.StringIO()
    table(HEADERS, rows, out)
    return lines + out.getvalue().splitlines()


Sampler = Callable[[], Sample]


def run(sample: Sampler, *, interval: float, as_json: bool, out: TextIO | None = None, tty: bool | None = None) -> int:
    """The loop: a table now, then one per ``interval`` until Ctrl-C (exit 0, screen given back).

    JSON: two samples ``interval`` apart, one object, done. A terminal is redrawn in place on
    the alternate screen; anything else (a pipe, a file) gets one plain table per refresh,
    without escape codes, separated by a blank line.
    """
    out = out or sys.stdout
    if as_json:
        first = sample()
        time.sleep(interval)
        emit_json(snapshot_dict(sample(), first), out)
        return 0
    tty = out.isatty() if tty is None else tty
    prev: Sample | None = None
    try:
        if tty:
            out.write(ENTER_SCREEN)
        next_at = time.monotonic()
        while True:
            cur = sample()
            text = "\n".join(render(cur, prev)) + "\n"
            out.write(REDRAW + text if tty else text + "\n")
            out.flush()
            prev = cur
            # The next refresh on a fixed schedule (no drift), but at least half an interval after
            # this one ended: after a slow refresh (busy cores, a node slow to answer) the next
            # rates are still over at least half an interval, never over a sliver of time.
            now = time.monotonic()
            next_at = max(next_at + interval, now + interval / 2)
            time.sleep(next_at - now)
    except KeyboardInterrupt:
        return 0
    finally:
        if tty:
            out.write(LEAVE_SCREEN)
            out.flush()
