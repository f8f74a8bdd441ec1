"""``GET /metrics``: the node's counters in the Prometheus text exposition format (0.0.4).

Owns turning the plain integers the data path keeps (listeners, pools, backends, TLS, the
cluster agent) into text, at scrape time only. Never changes them and never adds work to
the request path: everything here runs when Prometheus asks.

Written here rather than with prometheus_client: no dependency, about two hundred lines,
and the client library's model (a locked metric object updated per event) would put
formatting-ready objects and their locks on the request path; ours reads what is there.
"""

from __future__ import annotations

import gc
import math
import os
import resource
from collections.abc import Iterable
from typing import Any

from lbnode.histogram import BUCKETS, Histogram

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

Labels = tuple[tuple[str, str], ...]
Sample = tuple[Labels, float | int]

# Status classes a response is counted under: index status // 100 of the data path's lists
# (index 0 collects anything outside 1xx..5xx, which httptools lets through).
CODE_CLASSES = ("other", "1xx", "2xx", "3xx", "4xx", "5xx")
HEALTH_STATES = ("up", "down", "unknown")
ADMIN_STATES = ("enabled", "draining", "disabled")
_LE = tuple(repr(b) for b in BUCKETS) + ("+Inf",)
_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _value(v: float | int) -> str:
    if isinstance(v, int):
        return str(v)
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    if math.isnan(v):
        return "NaN"
    return repr(v)


def _labels(labels: Labels) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in labels) + "}"


class Exposition:
    """Families in the order added; a family without samples is left out."""

    def __init__(self) -> None:
        self._lines: list[str] = []

    def add(self, name: str, kind: str, help_text: str, samples: Iterable[Sample]) -> None:
        body = [f"{name}{_labels(labels)} {_value(v)}" for labels, v in samples]
        if body:
            self._lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", *body]

    def histogram(self, name: str, help_text: str, items: Iterable[tuple[Labels, Histogram]]) -> None:
        body = []
        for labels, h in items:
            cumulative = h.cumulative()
            for le, count in zip(_LE, cumulative, strict=True):
                body.append(f"{name}_bucket{_labels((*labels, ('le', le)))} {count}")
            body.append(f"{name}_sum{_labels(labels)} {_value(h.sum)}")
            body.append(f"{name}_count{_labels(labels)} {cumulative[-1]}")
        if body:
            self._lines += [f"# HELP {name} {help_text}", f"# TYPE {name} histogram", *body]

    def text(self) -> bytes:
        return ("\n".join(self._lines) + "\n").encode()


def render(node: Any) -> bytes:
    """The whole exposition for ``node`` (an ``LbNode``; attributes a test node lacks are skipped)."""
    out = Exposition()
    _node(out, node)
    _listeners(out, node)
    _pools(out, node)
    _cluster(out, node)
    _process(out)
    return out.text()


def _node(out: Exposition, node: Any) -> None:
    snap = node.snapshot
    out.add("fulcrum_node_draining", "gauge", "1 while the node drains (stops accepting, finishes what is in flight).",
            [((), int(node.draining))])
    out.add("fulcrum_config_version", "gauge", "Configuration snapshots applied on this node since start.",
            [((), snap.version)])
    source = getattr(node, "config_source", None)
    if source is not None:
        doc = source.document()
        follower = getattr(node, "follower", None)
        stale = bool(doc.get("stale")) or (follower is not None and follower.failing)
        out.add("fulcrum_config_stale", "gauge",
                "1 while the node serves a cached or file configuration because the store could not be read.",
                [((), int(stale))])
        if doc.get("revision") is not None:
            out.add("fulcrum_config_revision", "gauge", "etcd revision of the configuration this node serves.",
                    [((), int(doc["revision"]))])


def _listeners(out: Exposition, node: Any) -> None:
    gates = getattr(node, "connection_gates", {})
    http = getattr(node, "http_proxies", {})
    tcp = getattr(node, "tcp_proxies", {})
    tls = getattr(node, "tls_terminators", {})

    def per(items: dict[str, Any], attr: str) -> list[Sample]:
        return [((("listener", name),), getattr(obj, attr)) for name, obj in sorted(items.items())]

    out.add("fulcrum_listener_connections_accepted_total", "counter", "Client connections accepted.",
            per(gates, "accepted"))
    out.add("fulcrum_listener_connections_open", "gauge", "Client connections being served.", per(gates, "open"))

    out.add("fulcrum_http_requests_total", "counter", "HTTP request heads received.", per(http, "requests"))
    responses: list[Sample] = []
    for name, proxy in sorted(http.items()):
        local = [0] * 6
        for status, n in proxy.local_responses.items():
            local[status // 100 if status < 600 else 0] += n
        local[3] += proxy.redirects
        for status, n in getattr(proxy, "route_answers", {}).items():
            local[status // 100 if status < 600 else 0] += n
        for source, counts in (("backend", proxy.backend_responses), ("local", local)):
            for i, n in enumerate(counts):
                if n or i in (2, 5):  # 2xx and 5xx always shown: an error ratio needs both series
                    responses.append(((("listener", name), ("source", source), ("code", CODE_CLASSES[i])), n))
    out.add("fulcrum_http_responses_total", "counter",
            "HTTP responses sent to clients by status class; source=backend relayed, source=local the node's own.",
            responses)
    out.add("fulcrum_http_rate_limited_total", "counter",
            "Requests refused with 429 by the listener's [listeners.rate_limit] (also in the local 4xx).",
            [((("listener", n),), p.local_responses.get(429, 0)) for n, p in sorted(http.items())
             if p.rate_limiter is not None])
    mirrors = [(name, pos, st) for name, p in sorted(http.items()) if hasattr(p, "mirrors")
               for pos, st in sorted(p.mirrors.stats.items())]
    out.add("fulcrum_mirror_requests_total", "counter",
            "Request copies a route's mirror sent, by result: answered (the response was read and dropped) or "
            "failed (no backend, connect error, timeout, broken response).",
            [((("listener", n), ("route", str(pos)), ("pool", st.pool), ("result", r)), c)
             for n, pos, st in mirrors for r, c in (("answered", st.answered), ("failed", st.failed))])
    out.add("fulcrum_mirror_dropped_total", "counter",
            "Request copies not sent, by reason: full (the route's max_inflight copies under way), body (larger "
            "than max_body_bytes, or streamed), no_pool, stopped.",
            [((("listener", n), ("route", str(pos)), ("pool", st.pool), ("reason", r)), c)
             for n, pos, st in mirrors for r, c in st.dropped.items()])
    out.add("fulcrum_mirror_inflight", "gauge", "Request copies under way to the route's mirror pool.",
            [((("listener", n), ("route", str(pos)), ("pool", st.pool)), st.inflight) for n, pos, st in mirrors])
    out.histogram("fulcrum_http_request_duration_seconds",
                  "Time from a request head received to its response sent (or refused).",
                  [((("listener", name),), p.request_seconds) for name, p in sorted(http.items())])
    out.add("fulcrum_http_received_bytes_total", "counter", "Bytes received from HTTP clients (after TLS).",
            [((("listener", n),), p.io[0]) for n, p in sorted(http.items())])
    out.add("fulcrum_http_sent_bytes_total", "counter", "Bytes sent to HTTP clients (before TLS).",
            [((("listener", n),), p.io[1]) for n, p in sorted(http.items())])

    h2 = {n: p for n, p in http.items() if hasattr(p, "h2_streams")}
    out.add("fulcrum_http2_connections_total", "counter", "Client connections that spoke HTTP/2.",
            per(h2, "h2_connections"))
    out.add("fulcrum_http2_streams_total", "counter", "HTTP/2 requests (streams) received.", per(h2, "h2_streams"))
    out.add("fulcrum_http2_limit_closes_total", "counter",
            "HTTP/2 limits that bit, by kind: connections closed (rapid_reset, control_frames, header_list_size, "
            "continuation, concurrent_streams, protocol_error) and streams refused alone (refused_stream).",
            [((("listener", n), ("kind", k)), c) for n, p in sorted(h2.items()) for k, c in sorted(p.h2_limits.items())])

    out.add("fulcrum_tcp_sessions_total", "counter", "L4 sessions that reached a backend.", per(tcp, "total"))
    out.add("fulcrum_tcp_sessions_open", "gauge", "L4 sessions open with a backend.", per(tcp, "active"))
    out.add("fulcrum_tcp_received_bytes_total", "counter", "Bytes received from L4 clients (after TLS).",
            [((("listener", n),), p.io[0]) for n, p in sorted(tcp.items())])
    out.add("fulcrum_tcp_sent_bytes_total", "counter", "Bytes sent to L4 clients (before TLS).",
            [((("listener", n),), p.io[1]) for n, p in sorted(tcp.items())])
    out.add("fulcrum_tcp_connect_failures_total", "counter",
            "L4 clients closed because no backend of the pool could be reached.", per(tcp, "failed"))
    out.add("fulcrum_tcp_refused_total", "counter",
            "L4 clients closed before routing (ClientHello not readable), by reason.",
            [((("listener", n), ("reason", r)), c) for n, p in sorted(tcp.items()) for r, c in sorted(p.refused.items())])

    pp = getattr(node, "proxy_receivers", {})
    out.add("fulcrum_proxy_protocol_headers_total", "counter",
            "PROXY protocol headers accepted from the balancer in front, by version.",
            [((("listener", n), ("version", f"v{v}")), c) for n, r in sorted(pp.items()) for v, c in sorted(r.headers.items())])
    out.add("fulcrum_proxy_protocol_errors_total", "counter",
            "Connections closed before their PROXY protocol header was accepted, by reason "
            "(untrusted peer, malformed header, timeout, closed by the peer).",
            [((("listener", n), ("reason", why)), c) for n, r in sorted(pp.items()) for why, c in r.errors.items()])

    logs = getattr(node, "access_logs", {})
    out.add("fulcrum_access_log_written_total", "counter", "Access log entries written.", per(logs, "written"))
    out.add("fulcrum_access_log_dropped_total", "counter",
            "Access log entries dropped: the buffer was full (the writer was behind) or the write failed.",
            per(logs, "dropped"))

    out.add("fulcrum_tls_handshakes_total", "counter", "TLS handshakes completed.", per(tls, "handshakes"))
    out.add("fulcrum_tls_resumed_handshakes_total", "counter", "Completed TLS handshakes that resumed a session.",
            per(tls, "resumed"))
    out.add("fulcrum_tls_handshakes_in_progress", "gauge", "TLS handshakes under way.", per(tls, "in_progress"))
    out.add("fulcrum_tls_handshake_failures_total", "counter", "TLS handshakes that failed, by reason.",
            [((("listener", n), ("reason", r)), c) for n, t in sorted(tls.items()) for r, c in sorted(t.failures.items())])


def _pools(out: Exposition, node: Any) -> None:
    import trio

    snap = node.snapshot
    now = trio.current_time()
    checkers = getattr(node, "health_checkers", {})
    pools = sorted(snap.pools.items())
    backends = [(name, pool, b, (("pool", name), ("backend", b.id))) for name, pool in pools for b in pool.backends]

    out.add("fulcrum_backend_requests_total", "counter", "Requests (L7) and sessions (L4) sent to the backend.",
            [(lb, b.requests) for _, _, b, lb in backends])
    out.add("fulcrum_backend_responses_total", "counter", "Responses the backend sent that were relayed, by status class.",
            [((*lb, ("code", CODE_CLASSES[i])), n)
             for _, _, b, lb in backends for i, n in enumerate(b.responses) if n or i in (2, 5)])
    out.histogram("fulcrum_backend_response_seconds",
                  "Time from picking the backend (connect included) to the end of its response.",
                  [(lb, b.response_seconds) for _, _, b, lb in backends])
    out.add("fulcrum_backend_failures_total", "counter",
            "Failed attempts (connect error, timeout, reset, 5xx) seen by the passive checks.",
            [(lb, b.failures) for _, _, b, lb in backends])
    out.add("fulcrum_backend_inflight_requests", "gauge", "L7 requests in flight to the backend.",
            [(lb, b.inflight) for _, _, b, lb in backends])
    out.add("fulcrum_backend_open_connections", "gauge", "L4 sessions open to the backend.",
            [(lb, b.connections) for _, _, b, lb in backends])
    out.add("fulcrum_backend_health", "gauge", "1 for the backend's current health state (up, down, unknown).",
            [((*lb, ("state", s)), int(b.health == s)) for _, _, b, lb in backends for s in HEALTH_STATES])
    out.add("fulcrum_backend_admin_state", "gauge",
            "1 for the admin state an operator set (enabled, draining, disabled), 0 for the others.",
            [((*lb, ("state", s)), int(b.admin == s)) for _, _, b, lb in backends for s in ADMIN_STATES])
    out.add("fulcrum_backend_weight", "gauge", "The backend's configured weight.",
            [(lb, b.spec.weight) for _, _, b, lb in backends])
    out.add("fulcrum_backend_ejected", "gauge", "1 while the backend is ejected by passive checks on this node.",
            [(lb, int(now < b.ejected_until)) for _, _, b, lb in backends])
    out.add("fulcrum_backend_ejections_total", "counter", "Outlier ejections of the backend ([pools.outlier]).",
            [(lb, pool.outlier.ejections(b.id)) for _, pool, b, lb in backends if pool.outlier is not None])
    checks: list[Sample] = []
    for name, _, b, lb in backends:
        checker = checkers.get(name)
        state = checker.states.get(b.id) if checker is not None else None
        if state is not None:
            checks += [((*lb, ("result", "passed")), state.passed), ((*lb, ("result", "failed")), state.checks - state.passed),
                       ((*lb, ("result", "inconclusive")), state.inconclusive)]
    out.add("fulcrum_health_checks_total", "counter", "Active health checks this node ran, by result.", checks)
    durations = []
    for name, _, b, lb in backends:
        checker = checkers.get(name)
        state = checker.states.get(b.id) if checker is not None else None
        if state is not None:
            durations.append((lb, state.durations))
    out.histogram("fulcrum_health_check_duration_seconds", "Time an active health check took (timeouts included).",
                  durations)

    per_pool = [((("pool", name),), pool) for name, pool in pools]
    out.add("fulcrum_pool_queue_length", "gauge", "Requests waiting for a backend with room.",
            [(lb, len(p.waiters)) for lb, p in per_pool])
    out.add("fulcrum_pool_queue_timeouts_total", "counter", "Requests that waited queue_timeout in vain.",
            [(lb, p.stats.queue_timeouts) for lb, p in per_pool])
    out.add("fulcrum_pool_queue_full_total", "counter", "Requests turned away because max_queue were waiting.",
            [(lb, p.stats.queue_full) for lb, p in per_pool])
    out.add("fulcrum_pool_retries_total", "counter", "Requests sent again after a failed attempt.",
            [(lb, p.stats.retries) for lb, p in per_pool])
    out.add("fulcrum_pool_retry_budget_exhausted_total", "counter", "Retries refused by the pool's retry budget.",
            [(lb, p.retry_budget.refused) for lb, p in per_pool])
    sticky = [(lb, p) for lb, p in per_pool if p.stickiness is not None]
    out.add("fulcrum_affinity_hits_total", "counter", "Requests sent to the backend their session is bound to.",
            [(lb, p.stats.affinity_hits) for lb, p in sticky])
    out.add("fulcrum_affinity_misses_total", "counter",
            "Requests of a pool with affinity that had no usable binding (new session, backend gone).",
            [(lb, p.stats.affinity_misses) for lb, p in sticky])
    out.add("fulcrum_affinity_table_entries", "gauge", "Sessions in the pool's affinity table (table modes).",
            [(lb, len(p.stickiness.table)) for lb, p in sticky if p.stickiness.table is not None])


def _cluster(out: Exposition, node: Any) -> None:
    agent = getattr(node, "agent", None)
    if agent is None:
        return
    follower = getattr(node, "follower", None)
    if follower is not None:
        out.add("fulcrum_cluster_etcd_reachable", "gauge",
                "1 while the configuration store (etcd) answers this node.", [((), int(not follower.failing))])
        out.add("fulcrum_cluster_store_revision", "gauge",
                "Newest pool revision read from the store (once a second); compare fulcrum_config_revision.",
                [((), follower.lag.store_revision)])
        out.add("fulcrum_cluster_watch_lag_seconds", "gauge",
                "How long the node has been behind a pool change the store has (0: caught up; 1 s resolution).",
                [((), round(follower.watch_lag(), 3))])
    out.add("fulcrum_cluster_lease_held", "gauge", "1 while the node holds its etcd lease (registered).",
            [((), int(agent.lease_id is not None))])
    out.add("fulcrum_cluster_lease_renewals_total", "counter", "Lease keepalives etcd answered.",
            [((), agent.lease_renewals)])
    out.add("fulcrum_cluster_lease_renewal_failures_total", "counter", "Lease keepalives that failed.",
            [((), agent.lease_renewal_failures)])
    out.add("fulcrum_cluster_nodes", "gauge", "Live nodes this node sees in the cluster (itself included).",
            [((), len(agent.live_nodes))])
    vips = getattr(node, "vips", None)
    if vips is not None:
        out.add("fulcrum_cluster_vips_held", "gauge", "Virtual IPs this node holds.", [((), len(vips.held))])


def _process(out: Exposition) -> None:
    """The usual process_* and python_gc_* names (those of the official clients), so stock
    dashboards work: this process's. And the node's CPU and memory (``fulcrum_node_*``): the
    same figures here, which a supervisor adds its workers' to (lbnode.workers.counters)."""
    times = os.times()
    cpu = times.user + times.system
    out.add("process_cpu_seconds_total", "counter", "User and system CPU time spent.", [((), cpu)])
    out.add("fulcrum_node_cpu_seconds_total", "counter",
            "User and system CPU time spent by the node: every process (with workers: the supervisor, "
            "its workers, and the workers that died, as last read).", [((), cpu)])
    try:
        with open("/proc/self/statm") as f:
            rss = int(f.read().split()[1]) * _PAGE_SIZE
        out.add("process_resident_memory_bytes", "gauge", "Resident memory size.", [((), rss)])
        out.add("fulcrum_node_resident_memory_bytes", "gauge",
                "Resident memory of the node's processes, added up (with workers: the supervisor and its workers).",
                [((), rss)])
        out.add("process_open_fds", "gauge", "Open file descriptors.", [((), len(os.listdir("/proc/self/fd")))])
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/stat") as f:
            boot = next(int(line.split()[1]) for line in f if line.startswith("btime "))
        out.add("process_start_time_seconds", "gauge", "Start time of the process since the Unix epoch.",
                [((), boot + start_ticks / _CLOCK_TICKS)])
    except (OSError, ValueError, StopIteration):
        pass  # not Linux: the rest still answers
    out.add("process_max_fds", "gauge", "Limit on open file descriptors.",
            [((), resource.getrlimit(resource.RLIMIT_NOFILE)[0])])
    stats = gc.get_stats()
    out.add("python_gc_collections_total", "counter", "Garbage collections, by generation.",
            [((("generation", str(i)),), s["collections"]) for i, s in enumerate(stats)])
    out.add("python_gc_objects_collected_total", "counter", "Objects collected by the garbage collector.",
            [((("generation", str(i)),), s["collected"]) for i, s in enumerate(stats)])
    out.add("python_gc_objects_uncollectable_total", "counter", "Uncollectable objects found by the collector.",
            [((("generation", str(i)),), s["uncollectable"]) for i, s in enumerate(stats)])
