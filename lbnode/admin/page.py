"""The live status page: ``GET /`` (static files shipped in the package) and ``GET /status/page.json``.

Owns what the page is given: the node, its listeners, pools and backends with their raw
counters and latency buckets, the cluster's nodes and VIP holders, and recent events. Reads
the node at request time; keeps no state and never changes the node. Rates, error ratios and
p50/p99 are computed by the browser from two consecutive samples (docs/status-page.md): each
viewer gets its own window (its refresh interval) and the node keeps nothing per viewer.
"""

from __future__ import annotations

import time
from importlib import resources
from typing import Any

import trio

from lbnode.admin.counted import node_listener_counters
from lbnode.control.events import (
    BackendHealthChange,
    CertificateChange,
    NodeChange,
    PoolChange,
    Published,
    VipMove,
)
from lbnode.histogram import BUCKETS

# The page's files, by request path. A fixed table: no part of a request path ever names a
# file, so nothing outside it can be served. Read once: they are part of the installed package.
_STATIC = {
    b"/": ("status.html", "text/html; charset=utf-8"),
    b"/static/status.js": ("status.js", "text/javascript; charset=utf-8"),
    b"/static/status.css": ("status.css", "text/css; charset=utf-8"),
}
_cache: dict[bytes, tuple[bytes, str]] = {}

# Everything the page uses comes from the node itself; no inline script or style runs, so
# even a name that escaped the page's text-only rendering could not execute.
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self'; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)


def static_file(path: bytes) -> tuple[bytes, str] | None:
    """(body, content type) of one of the page's files, or None if ``path`` is not one."""
    if path not in _STATIC:
        return None
    if path not in _cache:
        name, content_type = _STATIC[path]
        body = resources.files("lbnode.admin").joinpath("static", name).read_bytes()
        _cache[path] = (body, content_type)
    return _cache[path]


def event_entry(published: Published) -> dict[str, Any]:
    """One recent event as the page lists it: when, what kind, about what, and what happened."""
    ev = published.event
    entry: dict[str, Any] = {"seq": published.seq, "time": round(published.time, 3)}
    if isinstance(ev, BackendHealthChange):
        entry.update(kind="health", subject=f"{ev.pool}/{ev.backend}", detail=f"{ev.old} -> {ev.new}: {ev.reason}")
    elif isinstance(ev, PoolChange):
        entry.update(kind="pool", subject=ev.name, detail=f"{ev.change} (revision {ev.revision})")
    elif isinstance(ev, VipMove):
        entry.update(kind="vip", subject=ev.vip, detail=f"{ev.old_holder or 'free'} -> {ev.new_holder or 'free'}")
    elif isinstance(ev, NodeChange):
        entry.update(kind="node", subject=ev.node_id, detail=ev.change)
    elif isinstance(ev, CertificateChange):
        entry.update(kind="certificate", subject=ev.name, detail=f"{ev.change} {ev.fingerprint[:16]}".rstrip())
    else:  # a kind added to ControlEvent later: listed, not lost
        entry.update(kind=type(ev).__name__, subject="", detail=repr(ev))
    return entry


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _listeners(node: Any) -> list[dict[str, Any]]:
    snap = node.snapshot
    bound = node.bound.listeners if getattr(node, "bound", None) is not None else {}
    counted = node_listener_counters(node)
    out = []
    for name, li in snap.listeners.items():
        host, port = bound.get(name, (li.bind.host, li.bind.port))
        conns = counted.get(name, {}).get("connections", {})
        out.append({
            "name": name,
            "protocol": li.protocol,
            "address": _address(host, port),
            "pool": li.pool,
            "tls": li.tls is not None,
            "open": conns.get("open", 0),
            "accepted": conns.get("accepted", 0),
        })
    return out


def _pools(node: Any) -> list[dict[str, Any]]:
    snap = node.snapshot
    now = trio.current_time()
    queues = getattr(node, "worker_queues", {})  # a supervisor's: its workers' queues, summed
    out = []
    for name in sorted(snap.pools):
        pool = snap.pools[name]
        out.append({
            "name": name,
            "algorithm": pool.spec.algorithm,
            "queue": queues.get(name, len(pool.waiters)),
            "backends": [
                {
                    "id": b.id,
                    "address": str(b.spec.address),
                    "health": b.health,
                    "reason": b.health_reason,
                    "admin": b.admin,
                    "weight": b.spec.weight,
                    "ejected": now < b.ejected_until,
                    "inflight": b.inflight,
                    "connections": b.connections,
                    # counters since start: the page turns two samples into rates and ratios
                    "requests": b.requests,
                    "failures": b.failures,
                    # response time per bucket (not cumulative), BUCKETS then above the last bound
                    "latency_counts": list(b.response_seconds.counts),
                }
                for b in pool.backends
            ],
        })
    return out


def _cluster(node: Any) -> dict[str, Any] | None:
    agent = getattr(node, "agent", None)
    if agent is None:
        return None
    me = node.snapshot.config.node.id
    follower = getattr(node, "follower", None)
    known = dict(agent.nodes)
    nodes = []
    for node_id in sorted(set(known) | set(agent.live_nodes) | {me}):
        info = known.get(node_id)
        info = info if isinstance(info, dict) else {}
        nodes.append({
            "id": node_id,
            "self": node_id == me,
            "live": node_id in agent.live_nodes,
            "version": str(info.get("version", "")),
            "host": str(info.get("host", "")),
            "addresses": [str(a) for a in info.get("addresses", [])] if isinstance(info.get("addresses"), list) else [],
        })
    return {
        "etcd_reachable": follower is None or not follower.failing,
        "lease_held": agent.lease_id is not None,
        "nodes": nodes,
    }


def _vips(node: Any) -> list[dict[str, Any]]:
    claimer = getattr(node, "vips", None)
    if claimer is None:
        return []
    out = []
    for address in sorted(claimer.vips):
        holder = claimer.holders.get(address)
        out.append({
            "address": address,
            "holder": holder.node if holder is not None else None,
            "since": round(holder.since, 3) if holder is not None and holder.since > 0 else None,
            "held_here": address in claimer.held,
        })
    return out


def page_document(node: Any) -> dict[str, Any]:
    """What ``GET /status/page.json`` answers. Reads local state only: answers while the node
    drains and while etcd is down (then ``cluster.etcd_reachable`` is false)."""
    snap = node.snapshot
    events = getattr(node, "events", None)
    source = getattr(node, "config_source", None)
    config = source.document() if source is not None else {"source": "file", "stale": False, "revision": None}
    follower = getattr(node, "follower", None)
    if follower is not None and follower.failing:
        config["stale"] = True
    return {
        "node": snap.config.node.id,
        "time": round(time.time(), 3),  # wall clock, for "updated at" and the events' ages
        "draining": node.draining,
        "config": config,
        "latency_bounds": list(BUCKETS),
        "listeners": _listeners(node),
        "pools": _pools(node),
        "cluster": _cluster(node),
        "vips": _vips(node),
        "events": [event_entry(p) for p in reversed(events.recent())] if events is not None else [],
    }
