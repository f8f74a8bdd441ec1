"""The soak's verdicts from what it recorded: which failed requests a planned event explains,
how much each process grew after its warm-up, and the Markdown report.

Pure: no I/O and no clock. The runner (bench/soak.py) passes every time in seconds since the
soak began, so the tests in tests/unit/test_soak_report.py build their own timelines.
"""

from __future__ import annotations

import statistics
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from bench.tables import DASH, fmt_num, render_table

GROWTH_TARGET = 0.10  # RSS and open descriptors after warm-up: growth under 10 % (issue 10)
MAX_LISTED = 50  # unexplained failures listed one by one; the rest are counted


@dataclass(frozen=True)
class PlannedEvent:
    """Something the soak did on purpose, and whom its clients may see it hurt.

    ``margin`` is how long after ``end`` its effects may still show by design (a health
    verdict needs interval x fall, a drain its drain timeout): a failure inside
    [start, end + margin] on one of ``nodes`` is explained by it.
    """

    kind: str  # "backend restart", "pool change", "node restart"
    what: str  # e.g. "backend b", "add backend d", "node n3"
    start: float
    end: float
    margin: float
    nodes: frozenset[str]  # nodes whose clients may see it
    # Backends it touches; None: any (a node restart hurts whatever that node was sending to).
    backends: frozenset[str] | None = None
    # The errors it can cause by design, by kind ("status 502", "ConnectionRefusedError"; see
    # error_kind); None: any. A pool change never empties a pool: its window does not excuse
    # a 503 "no backend available" that happens to fall in it.
    errors: frozenset[str] | None = None

    def explains(self, failure: FailedRequest) -> bool:
        if failure.node not in self.nodes:
            return False
        if self.errors is not None and error_kind(failure.error) not in self.errors:
            return False
        if self.backends is not None and failure.backend is not None and failure.backend not in self.backends:
            return False  # a backend answered, and not one this event touched
        # The request's life overlaps the window: one sent just before a restart fails during it.
        return failure.sent <= self.end + self.margin and failure.done >= self.start


@dataclass(frozen=True)
class FailedRequest:
    """One request the client did not get a 200 for."""

    sent: float
    done: float
    node: str
    error: str  # "status 502", or the exception ("ConnectionRefusedError: ...")
    backend: str | None = None  # the backend whose answer it was, when one answered


@dataclass(frozen=True)
class Attribution:
    failure: FailedRequest
    event: PlannedEvent | None  # None: no planned event explains it

    @property
    def explained(self) -> bool:
        return self.event is not None


def attribute(failures: Iterable[FailedRequest], events: Sequence[PlannedEvent]) -> list[Attribution]:
    """Each failure with the first planned event that explains it (or none)."""
    return [Attribution(f, next((e for e in events if e.explains(f)), None)) for f in failures]


@dataclass(frozen=True)
class Sample:
    """One process's resident memory and open descriptors at time ``t``."""

    t: float
    process: str  # "n1", "n3 #2" (the second process of node n3), "etcd"
    rss_bytes: int
    fds: int
    fd_kinds: dict[str, int] = field(default_factory=dict)  # the fds by what they are (classify_fd)


TCP_LISTEN = "0A"  # the state column of /proc/net/tcp


def parse_tcp_sockets(text: str) -> dict[int, tuple[int, int, str]]:
    """``/proc/net/tcp`` (or tcp6) -> {socket inode: (local port, remote port, state)}."""
    out: dict[int, tuple[int, int, str]] = {}
    for line in text.splitlines()[1:]:
        f = line.split()
        if len(f) < 10:
            continue
        out[int(f[9])] = (int(f[1].rsplit(":", 1)[1], 16), int(f[2].rsplit(":", 1)[1], 16), f[3])
    return out


def classify_fd(target: str, sockets: Mapping[int, tuple[int, int, str]], served: Mapping[int, str],
                reached: Mapping[int, str]) -> str:
    """What one descriptor is, from its /proc/PID/fd link: a TCP socket by the port it serves
    (``served``: local port -> role) or reaches (``reached``: remote port -> role)."""
    if target.startswith("socket:["):
        sock = sockets.get(int(target[8:-1]))
        if sock is None:
            return "other sockets (unix, udp)"
        local, remote, state = sock
        if state == TCP_LISTEN:
            return "listening"
        return served.get(local) or reached.get(remote) or "other tcp"
    if target.startswith("pipe:"):
        return "pipes"
    if target.startswith("anon_inode:"):
        return "anon inodes (epoll, eventfd)"
    return "files"


@dataclass(frozen=True)
class Growth:
    """A process from the end of its warm-up to its last sample, each end the median of the
    samples of one ``window`` (a single sample would make a passing connection count)."""

    process: str
    since: float | None = None  # start of the first window; None: not measured
    until: float | None = None
    rss_base: float | None = None
    rss_end: float | None = None
    fds_base: float | None = None
    fds_end: float | None = None
    rss_peak: int | None = None  # the largest sample after warm-up
    why_not: str = ""  # why it was not measured

    @property
    def measured(self) -> bool:
        return self.since is not None

    @property
    def rss_growth(self) -> float | None:
        return _ratio(self.rss_base, self.rss_end)

    @property
    def fds_growth(self) -> float | None:
        return _ratio(self.fds_base, self.fds_end)

    def meets(self, target: float = GROWTH_TARGET) -> bool:
        return all(g is not None and g < target for g in (self.rss_growth, self.fds_growth))


def _ratio(base: float | None, end: float | None) -> float | None:
    if base is None or end is None or base <= 0:
        return None
    return (end - base) / base


def growth(samples: Iterable[Sample], warmed_at: Mapping[str, float], window: float) -> list[Growth]:
    """Growth of each process of ``warmed_at`` (process -> end of its own warm-up).

    Measured only when its samples after warm-up span at least two windows; a process
    restarted too often to get there is reported with ``why_not``.
    """
    by_process: dict[str, list[Sample]] = {}
    for s in samples:
        by_process.setdefault(s.process, []).append(s)
    out = []
    for process, warm in warmed_at.items():
        after = sorted((s for s in by_process.get(process, []) if s.t >= warm), key=lambda s: s.t)
        if not after or after[-1].t - after[0].t < 2 * window:
            lived = after[-1].t - warm if after else 0.0
            out.append(Growth(process, why_not=f"{lived:.0f} s of samples after warm-up, "
                                                f"under two windows of {window:.0f} s"))
            continue
        first = [s for s in after if s.t < after[0].t + window]
        last = [s for s in after if s.t > after[-1].t - window]
        out.append(Growth(
            process, since=after[0].t, until=after[-1].t,
            rss_base=statistics.median(s.rss_bytes for s in first),
            rss_end=statistics.median(s.rss_bytes for s in last),
            fds_base=statistics.median(s.fds for s in first),
            fds_end=statistics.median(s.fds for s in last),
            rss_peak=max(s.rss_bytes for s in after),
        ))
    return out


@dataclass(frozen=True)
class EtcdSample:
    """etcd's maintenance status at time ``t``."""

    t: float
    revision: int
    db_size: int  # bytes of the database file
    db_size_in_use: int  # bytes holding live data (the rest is free pages, until a defrag)


@dataclass(frozen=True)
class EtcdKey:
    """A key alive in etcd at the end: ``version`` counts its writes since it was created."""

    key: str
    version: int
    create_revision: int
    mod_revision: int


def key_group(key: str, prefix: str = "/fulcrum/v1/") -> str:
    """The kind of a key: its first segment under the prefix (pools, nodes, health, ...)."""
    if not key.startswith(prefix):
        return "/" + key.lstrip("/").split("/", 1)[0]
    return prefix + key[len(prefix):].split("/", 1)[0]


@dataclass
class NodeLoad:
    """What the client saw of one node."""

    node: str
    sent: int = 0
    ok: int = 0
    latencies_ms: list[float] = field(default_factory=list)  # successful requests

    def percentile(self, q: float) -> float | None:
        if not self.latencies_ms:
            return None
        ordered = sorted(self.latencies_ms)
        return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


@dataclass
class SoakRun:
    """Everything one soak recorded, with the settings it ran with."""

    minutes: float
    rate: float  # requests/s the client aimed at, all nodes together
    warmup: float  # seconds
    window: float  # seconds: the growth windows
    loads: list[NodeLoad]
    events: list[PlannedEvent]
    failures: list[FailedRequest]
    samples: list[Sample]
    warmed_at: dict[str, float]  # process -> end of its warm-up
    etcd: list[EtcdSample]
    setup: list[str] = field(default_factory=list)  # lines describing the topology and the host
    wall_clock: str = ""  # "2026-12-04 12:40 UTC"
    lbnode_processes: frozenset[str] = frozenset()  # the processes the growth target is judged on
    etcd_keys: list[EtcdKey] = field(default_factory=list)  # every key at the end
    notes: list[str] = field(default_factory=list)  # lines after the verdicts (node logs, ...)
    unsettled: list[str] = field(default_factory=list)  # events whose change no node showed in time


def targets_met(run: SoakRun) -> bool:
    """Every failure explained, every event settled, every judged node under the growth target."""
    judged = [g for g in growth(run.samples, run.warmed_at, run.window) if g.process in run.lbnode_processes]
    return (all(a.explained for a in attribute(run.failures, run.events)) and not run.unsettled
            and bool(judged) and all(g.meets() for g in judged))


def _mib(v: float | None) -> str:
    return DASH if v is None else f"{v / 1048576:.1f}"


def _kib(v: float | None) -> str:
    return DASH if v is None else f"{v / 1024:,.0f}"


def _pct(v: float | None) -> str:
    return DASH if v is None else f"{v * 100:+.1f}%"


def _etcd_at(samples: Sequence[EtcdSample], t: float) -> EtcdSample | None:
    after = [s for s in samples if s.t >= t]
    return min(after, key=lambda s: s.t) if after else None


def render(run: SoakRun) -> str:
    """The Markdown report: requests, events, unexplained failures, growth, etcd, verdicts."""
    attributions = attribute(run.failures, run.events)
    unexplained = [a for a in attributions if not a.explained]
    growths = growth(run.samples, run.warmed_at, run.window)
    lines = [f"# Fulcrum soak: {run.minutes:g} minutes", ""]
    if run.wall_clock:
        lines.append(f"- started: {run.wall_clock}")
    lines += [f"- {s}" for s in run.setup]
    lines += [f"- load: {run.rate:g} requests/s aimed at, spread evenly over the nodes; warm-up "
              f"{run.warmup:.0f} s; growth windows {run.window:.0f} s", ""]
    lines += ["## Requests", "", _render_loads(run.loads, attributions), ""]
    lines += ["## Planned events", "", _render_events(run.events, attributions), ""]
    lines += ["## Unexplained failures", ""]
    lines += [_render_unexplained(unexplained) if unexplained else "None.", ""]
    lines += ["## Memory and descriptors after warm-up", "", _render_growth(growths, run.lbnode_processes), ""]
    kinds = _render_fd_kinds(run.samples, run.warmed_at, sorted(run.lbnode_processes))
    if kinds:
        lines += ["Open descriptors by kind, first sample after warm-up -> last sample:", "", kinds, ""]
    lines += ["## etcd", "", _render_etcd(run), ""]
    lines += ["## Targets", "", _render_verdicts(run, unexplained, growths)]
    if run.notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in run.notes]
    return "\n".join(lines) + "\n"


def _render_loads(loads: Sequence[NodeLoad], attributions: Sequence[Attribution]) -> str:
    explained = Counter(a.failure.node for a in attributions if a.explained)
    unexplained = Counter(a.failure.node for a in attributions if not a.explained)
    rows = []
    for load in [*loads, _total(loads)]:
        node = load.node
        rows.append([node, f"{load.sent:,}", f"{load.ok:,}",
                     sum(explained.values()) if node == "all" else explained[node],
                     sum(unexplained.values()) if node == "all" else unexplained[node],
                     fmt_num(load.percentile(0.5), 2), fmt_num(load.percentile(0.99), 2),
                     fmt_num(max(load.latencies_ms) if load.latencies_ms else None, 1)])
    return render_table(["node", "sent", "200 OK", "failed, explained", "failed, unexplained",
                         "p50 ms", "p99 ms", "max ms"], rows)


def _total(loads: Sequence[NodeLoad]) -> NodeLoad:
    return NodeLoad("all", sum(x.sent for x in loads), sum(x.ok for x in loads),
                    [v for x in loads for v in x.latencies_ms])


def _render_events(events: Sequence[PlannedEvent], attributions: Sequence[Attribution]) -> str:
    per_event: dict[int, Counter[str]] = {}
    for a in attributions:
        if a.event is not None:
            per_event.setdefault(id(a.event), Counter())[error_kind(a.failure.error)] += 1
    rows = []
    for e in events:
        seen = per_event.get(id(e), Counter())
        rows.append([f"{e.start:.1f}", f"{e.end - e.start:.1f}", f"{e.margin:.1f}", e.kind, e.what,
                     ", ".join(sorted(e.nodes)), sum(seen.values()),
                     "; ".join(f"{k} x{v}" for k, v in seen.most_common()) or DASH])
    return render_table(["start s", "took s", "margin s", "event", "what", "nodes", "failures",
                         "of which"], rows, "rrrlllrl")


def error_kind(error: str) -> str:
    """The class of an error, without the details that differ per request."""
    return error.split(":", 1)[0]


def _render_unexplained(unexplained: Sequence[Attribution]) -> str:
    rows = [[f"{a.failure.sent:.3f}", f"{a.failure.done - a.failure.sent:.3f}", a.failure.node,
             a.failure.backend or DASH, a.failure.error] for a in unexplained[:MAX_LISTED]]
    table = render_table(["sent s", "took s", "node", "backend", "error"], rows, "rrlll")
    more = len(unexplained) - MAX_LISTED
    return table + (f"\n\n... and {more} more." if more > 0 else "")


def _render_growth(growths: Sequence[Growth], judged: frozenset[str]) -> str:
    rows = []
    for g in growths:
        if not g.measured:
            rows.append([g.process, DASH, DASH, DASH, DASH, DASH, DASH, DASH, f"not measured: {g.why_not}"])
            continue
        note = "target" if g.process in judged else "shown, not judged"
        rows.append([g.process, f"{g.since:.0f}-{g.until:.0f}", _mib(g.rss_base), _mib(g.rss_end),
                     _pct(g.rss_growth), _mib(g.rss_peak), f"{g.fds_base:g} -> {g.fds_end:g}",
                     _pct(g.fds_growth), note])
    return render_table(["process", "measured s", "RSS MiB after warm-up", "RSS MiB at end", "RSS growth",
                         "RSS MiB peak", "open fds", "fds growth", "note"], rows, "lrrrrrrrl")


def _render_fd_kinds(samples: Sequence[Sample], warmed_at: Mapping[str, float], processes: Sequence[str]) -> str:
    ends: dict[str, tuple[Sample, Sample]] = {}
    for p in processes:
        after = sorted((s for s in samples if s.process == p and s.t >= warmed_at.get(p, 0.0) and s.fd_kinds),
                       key=lambda s: s.t)
        if after:
            ends[p] = (after[0], after[-1])
    if not ends:
        return ""
    kinds = sorted({k for first, last in ends.values() for k in (*first.fd_kinds, *last.fd_kinds)})
    rows = [[k, *(f"{first.fd_kinds.get(k, 0)} -> {last.fd_kinds.get(k, 0)}" for first, last in ends.values())]
            for k in kinds]
    return render_table(["fds", *ends], rows)


def _render_etcd(run: SoakRun) -> str:
    if not run.etcd:
        return "No etcd status was read."
    first, last = run.etcd[0], run.etcd[-1]
    warm = _etcd_at(run.etcd, run.warmup) or first
    rows = [[label, f"{s.t:.0f}", f"{s.revision:,}", _kib(s.db_size), _kib(s.db_size_in_use)]
            for label, s in (("first sample", first), ("after warm-up", warm), ("end", last))]
    table = render_table(["when", "t s", "revision", "db size KiB", "db in use KiB"], rows, "lrrrr")
    span_h = (last.t - warm.t) / 3600
    rate = f"{(last.revision - warm.revision) / span_h:,.0f} revisions/hour" if span_h > 0 else DASH
    out = table + f"\n\nAfter warm-up: {last.revision - warm.revision:,} revisions ({rate}), " \
                  f"database {_kib(warm.db_size)} -> {_kib(last.db_size)} KiB (no compaction: etcd keeps every revision)."
    if run.etcd_keys:
        out += "\n\nKeys alive at the end, by kind (a key deleted and created again counts from its last creation):\n\n"
        out += _render_keys(run.etcd_keys)
    return out


def _render_keys(keys: Sequence[EtcdKey]) -> str:
    groups: dict[str, list[EtcdKey]] = {}
    for k in keys:
        groups.setdefault(key_group(k.key), []).append(k)
    rows = [[g, len(ks), sum(k.version for k in ks), max(k.mod_revision for k in ks)]
            for g, ks in sorted(groups.items())]
    return render_table(["keys", "count", "writes since created", "last written at revision"], rows)


def _render_verdicts(run: SoakRun, unexplained: Sequence[Attribution], growths: Sequence[Growth]) -> str:
    lines = [f"- Failed requests not explained by a planned event: **{len(unexplained)}** (target 0): "
             + ("**met**" if not unexplained else "**not met**")]
    lines.append(f"- Planned events that did not settle: **{len(run.unsettled)}**"
                 + "".join(f"; {u}" for u in run.unsettled))
    judged = [g for g in growths if g.process in run.lbnode_processes and g.measured]
    for g in judged:
        lines.append(f"- {g.process}: RSS {_pct(g.rss_growth)}, open fds {_pct(g.fds_growth)} after "
                     f"warm-up (target under {GROWTH_TARGET * 100:.0f}%): "
                     + ("**met**" if g.meets() else "**not met**"))
    if not judged:
        lines.append("- Growth: no lbnode process lived long enough after warm-up to be measured.")
    return "\n".join(lines)
