"""What this process counted per listener, read when someone asks: ``/status``, the live status
page, and a worker's answer to its supervisor's COUNTERS (which adds the workers up,
``lbnode.workers.counters.add_up_listeners``). Reads the node's objects; changes nothing.
"""

from __future__ import annotations

from typing import Any


def listener_counters(node: Any) -> dict[str, dict[str, Any]]:
    """What this process counted per listener, as /status shows it: its client connections
    (``connections``: open now, accepted since start), its TLS handshakes (``tls``) and its
    access log's entries (``access_log``), for the listeners that have them."""
    out: dict[str, dict[str, Any]] = {}
    access_logs = getattr(node, "access_logs", {})
    gates = getattr(node, "connection_gates", {})
    for name, li in node.snapshot.listeners.items():
        entry: dict[str, Any] = {}
        gate = gates.get(name)
        if gate is not None:
            entry["connections"] = {"open": gate.open, "accepted": gate.accepted}
        terminator = getattr(node, "tls_terminators", {}).get(name)
        if terminator is not None:
            entry["tls"] = terminator.status()
        access = access_logs.get(name)
        if access is not None and li.access_log is not None:
            entry["access_log"] = {
                "path": li.access_log.path, "format": access.format, "written": access.written,
                "dropped": access.dropped, "buffered": len(access.entries),
            }
        if entry:
            out[name] = entry
    return out


def node_listener_counters(node: Any) -> dict[str, dict[str, Any]]:
    """The node's counters per listener: a supervisor serves no connection, so its are its
    workers', summed at each read (``worker_listeners``, by ``refresh_counters``); a single
    process's are its own."""
    summed: dict[str, dict[str, Any]] | None = getattr(node, "worker_listeners", None)
    return listener_counters(node) if summed is None else summed
