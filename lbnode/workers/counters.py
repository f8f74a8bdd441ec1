"""A worker's counters as one document, and the supervisor's sum of its workers' documents.

What a user reads stays per node: ``/metrics``, ``/status`` and ``lbctl status`` show the
sum over the workers. A worker answers with its whole exposition (``admin.metrics.render``)
and its backends' and pools' counters; the supervisor adds them up at scrape time. Only the
families the data path counts are summed (``DATA_PLANE``); health, admin state, weights,
the configuration and the cluster are the supervisor's own. Pure: no I/O.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from lbnode.admin.counted import listener_counters
from lbnode.admin.metrics import render
from lbnode.histogram import Histogram
from lbnode.runtime import Snapshot

# Metric families whose samples are the sum of the workers' (the supervisor serves no
# request, so its own are zero or absent): the listeners, HTTP/1 and HTTP/2, TLS, PROXY
# protocol, access log, mirroring, and what the data path counts per backend and per pool.
DATA_PLANE_PREFIXES = (
    "fulcrum_listener_", "fulcrum_http_", "fulcrum_http2_", "fulcrum_tcp_", "fulcrum_proxy_protocol_",
    "fulcrum_access_log_", "fulcrum_tls_", "fulcrum_pool_", "fulcrum_mirror_", "fulcrum_affinity_hits_total",
    "fulcrum_affinity_misses_total",
)
DATA_PLANE_BACKEND = (
    "fulcrum_backend_requests_total", "fulcrum_backend_responses_total", "fulcrum_backend_response_seconds",
    "fulcrum_backend_failures_total", "fulcrum_backend_inflight_requests", "fulcrum_backend_open_connections",
)


# The families the supervisor keeps itself, shown as it has them: health and its checks,
# admin state, weights, ejections (the supervisor decides them), the configuration, the
# cluster agent, the affinity table (the node's, kept by the supervisor) and draining.
SUPERVISOR_FAMILIES = frozenset({
    "fulcrum_affinity_table_entries", "fulcrum_backend_admin_state", "fulcrum_backend_ejected",
    "fulcrum_backend_ejections_total", "fulcrum_backend_health", "fulcrum_backend_weight",
    "fulcrum_cluster_etcd_reachable", "fulcrum_cluster_lease_held", "fulcrum_cluster_lease_renewal_failures_total",
    "fulcrum_cluster_lease_renewals_total", "fulcrum_cluster_nodes", "fulcrum_cluster_store_revision",
    "fulcrum_cluster_vips_held", "fulcrum_cluster_watch_lag_seconds", "fulcrum_config_revision",
    "fulcrum_config_stale", "fulcrum_config_version", "fulcrum_health_check_duration_seconds",
    "fulcrum_health_checks_total", "fulcrum_node_draining",
})


# The node's own CPU and memory: the supervisor's figure plus every worker's (the others are
# the workers' sum alone, or the supervisor's alone).
NODE_FAMILIES = frozenset({"fulcrum_node_cpu_seconds_total", "fulcrum_node_resident_memory_bytes"})


def summed(family: str) -> bool:
    return family.startswith(DATA_PLANE_PREFIXES) or family in DATA_PLANE_BACKEND or family in NODE_FAMILIES


def counters_document(node: Any) -> dict[str, Any]:
    """What a worker answers to COUNTERS: its exposition text and its pools' counters."""
    pools: dict[str, Any] = {}
    snap: Snapshot = node.snapshot
    for name, pool in snap.pools.items():
        pools[name] = {
            "queue": len(pool.waiters),
            "retries": pool.stats.retries,
            "backends": {
                b.id: {
                    "inflight": b.inflight, "connections": b.connections, "requests": b.requests,
                    "failures": b.failures, "responses": list(b.responses),
                    "histogram": [list(b.response_seconds.counts), b.response_seconds.sum],
                }
                for b in pool.backends
            },
        }
    return {"metrics": render(node).decode(), "pools": pools, "listeners": listener_counters(node),
            "open": node.connection_gate.in_use}  # (its listeners', and those of removed ones still draining)


def add_up(snapshot: Snapshot, documents: Iterable[dict[str, Any]]) -> dict[str, int]:
    """The workers' backend counters written into the supervisor's own ``BackendState``s
    (which count nothing themselves), so every reader of the snapshot (``/status``, ``lbctl
    status``, the status page) shows the node's sum; returns each pool's queue length."""
    docs = list(documents)
    queues: dict[str, int] = {}
    for name, pool in snapshot.pools.items():
        queues[name] = 0
        for b in pool.backends:
            b.inflight = b.connections = b.requests = b.failures = 0
            b.responses = [0] * 6
            b.response_seconds = Histogram()
        pool.stats.retries = 0
        by_id = {b.id: b for b in pool.backends}
        for doc in docs:
            theirs = doc.get("pools", {}).get(name)
            if theirs is None:
                continue
            queues[name] += theirs["queue"]
            pool.stats.retries += theirs["retries"]
            for backend_id, c in theirs["backends"].items():
                mine = by_id.get(backend_id)
                if mine is None:
                    continue  # a backend removed meanwhile
                b = mine
                b.inflight += c["inflight"]
                b.connections += c["connections"]
                b.requests += c["requests"]
                b.failures += c["failures"]
                b.responses = [x + y for x, y in zip(b.responses, c["responses"], strict=True)]
                counts, total = c["histogram"]
                h = b.response_seconds
                h.counts = [x + y for x, y in zip(h.counts, counts, strict=True)]
                h.sum += total
    return queues


# A listener's /status counters (lbnode.admin.counted.listener_counters), by section: what a
# worker counted since it started (kept by ``Retired`` when it dies) and what it has now (gone
# with it: open connections, handshakes under way, entries buffered). Each section may also
# name its listener's settings (the access log's path and format), the same in every worker.
_SECTIONS = {
    "connections": (("accepted",), ("open",)),
    "tls": (("handshakes", "resumed"), ("in_progress",)),
    "access_log": (("written", "dropped"), ("buffered",)),
}
_SETTINGS = ("path", "format")
# What a dead worker's reading says of now only: its gauges, and the ticket key it used.
_NOW = frozenset(g for _, gauges in _SECTIONS.values() for g in gauges) | {"ticket_key"}


def add_up_listeners(documents: Iterable[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The workers' listener counters (``listeners`` of their documents) summed per listener,
    as /status shows a node's: connections open and accepted; handshakes, resumptions,
    failures by kind and handshakes in progress; access log entries written, dropped and
    buffered. Tickets are ``"shared"`` if every worker that answered seals them with the shared
    key, else ``"own"``."""
    out: dict[str, dict[str, Any]] = {}
    for doc in documents:
        for name, theirs in doc.get("listeners", {}).items():
            into = out.setdefault(name, {})
            for section, (counts, gauges) in _SECTIONS.items():
                part = theirs.get(section)
                if part is None:
                    continue
                mine = into.setdefault(section, {key: part[key] for key in _SETTINGS if key in part})
                for key in counts + gauges:
                    mine[key] = mine.get(key, 0) + part.get(key, 0)
            tls = theirs.get("tls")
            if tls is not None:
                failures = into["tls"].setdefault("failures", {})
                for kind, n in tls.get("failures", {}).items():
                    failures[kind] = failures.get(kind, 0) + n
                if "ticket_key" in tls:  # (a dead worker's counts say nothing of today's key)
                    into["tls"]["ticket_key"] = "shared" if tls["ticket_key"] == "shared" and into["tls"].get(
                        "ticket_key", "shared") == "shared" else "own"
    for entry in out.values():
        if "tls" in entry:
            entry["tls"]["failures"] = dict(sorted(entry["tls"]["failures"].items()))
    return out


def parse_exposition(text: str) -> dict[str, tuple[list[str], dict[str, float]]]:
    """Families in order: name -> (HELP and TYPE lines, sample line key -> value)."""
    families: dict[str, tuple[list[str], dict[str, float]]] = {}
    current: tuple[list[str], dict[str, float]] | None = None
    for line in text.splitlines():
        if not line:
            continue
        if line.startswith("# HELP "):
            name = line.split(" ", 3)[2]
            current = families.setdefault(name, ([], {}))
            current[0].append(line)
        elif line.startswith("# TYPE "):
            if current is not None:
                current[0].append(line)
        elif current is not None:
            key, _, value = line.rpartition(" ")
            current[1][key] = float(value)
    return families


def merge_metrics(own: str, workers: Iterable[str]) -> str:
    """The supervisor's exposition with every data-plane family replaced by the workers' sum,
    and the node's CPU and memory (``NODE_FAMILIES``) its own plus the workers'."""
    mine = parse_exposition(own)
    total: dict[str, tuple[list[str], dict[str, float]]] = {
        name: (head, dict(samples)) for name, (head, samples) in mine.items() if name in NODE_FAMILIES}
    for text in workers:
        for name, (head, samples) in parse_exposition(text).items():
            if not summed(name):
                continue
            into = total.setdefault(name, (head, {}))
            for key, value in samples.items():
                into[1][key] = into[1].get(key, 0.0) + value
    lines: list[str] = []
    for name, (head, samples) in mine.items():
        if summed(name):
            if name in total:
                head, samples = total.pop(name)
            else:
                samples = {key: 0.0 for key in samples}  # no worker answered: nothing counted
        lines += head
        lines += [f"{key} {_number(v)}" for key, v in samples.items()]
    for head, samples in total.values():  # families only the workers have (the listeners')
        lines += head
        lines += [f"{key} {_number(v)}" for key, v in samples.items()]
    return "\n".join(lines) + "\n"


def _number(value: float) -> str:
    return str(int(value)) if value.is_integer() and abs(value) < 2**53 else repr(value)


class Retired:
    """The counters of workers that died, as last read, so the node's totals never go down
    (Prometheus would take a drop for a reset). Gauges (in flight, open, queued) are not
    kept: what a dead worker had open is gone. What it counted after the last read is lost."""

    def __init__(self) -> None:
        self.pools: dict[str, Any] = {}
        self.families: dict[str, tuple[list[str], dict[str, float]]] = {}
        self.listeners: dict[str, dict[str, Any]] = {}

    def add(self, doc: dict[str, Any]) -> None:
        for name, pool in doc.get("pools", {}).items():
            into = self.pools.setdefault(name, {"queue": 0, "retries": 0, "backends": {}})
            into["retries"] += pool["retries"]
            for backend_id, c in pool["backends"].items():
                b = into["backends"].setdefault(backend_id, {
                    "inflight": 0, "connections": 0, "requests": 0, "failures": 0, "responses": [0] * 6,
                    "histogram": [[0] * len(c["histogram"][0]), 0.0],
                })
                b["requests"] += c["requests"]
                b["failures"] += c["failures"]
                b["responses"] = [x + y for x, y in zip(b["responses"], c["responses"], strict=True)]
                b["histogram"] = [[x + y for x, y in zip(b["histogram"][0], c["histogram"][0], strict=True)],
                                  b["histogram"][1] + c["histogram"][1]]
        # Its listeners' counters, without what says only how it was when it died (``_NOW``).
        counted = {name: {section: {key: value for key, value in part.items() if key not in _NOW}
                          for section, part in theirs.items()}
                   for name, theirs in doc.get("listeners", {}).items()}
        self.listeners = add_up_listeners([{"listeners": self.listeners}, {"listeners": counted}])
        for name, (head, samples) in parse_exposition(doc.get("metrics", "")).items():
            if not summed(name) or any(line.endswith(" gauge") for line in head if line.startswith("# TYPE ")):
                continue
            into_family = self.families.setdefault(name, (head, {}))
            for key, value in samples.items():
                into_family[1][key] = into_family[1].get(key, 0.0) + value

    def document(self) -> dict[str, Any]:
        lines: list[str] = []
        for head, samples in self.families.values():
            lines += head
            lines += [f"{key} {_number(v)}" for key, v in samples.items()]
        return {"pools": self.pools, "metrics": "\n".join(lines) + "\n", "listeners": self.listeners}
