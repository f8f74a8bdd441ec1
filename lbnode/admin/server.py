"""The admin HTTP endpoint: ``GET /healthz``, ``/status`` (JSON) and ``/metrics`` (Prometheus).

Owns answering operators and outer load balancers about this node. Reads
the node's snapshot; never changes it (changes go through the control API).
"""

from __future__ import annotations

import json
import logging
import socket
from typing import Any, Protocol

import trio

from lbnode.admin import metrics
from lbnode.http.framing import RequestReader
from lbnode.http.headers import RequestHead
from lbnode.listen import ConnectionGate, accept_loop
from lbnode.runtime import Snapshot
from lbnode.sockio import SendTimeout, recv_some, send_all

log = logging.getLogger("lbnode.admin")

# Admin requests are tiny; anything bigger is not an operator's curl.
MAX_HEAD = 16 * 1024
# An admin client that sends nothing for this long is dropped.
READ_TIMEOUT = 10.0


class AdminView(Protocol):
    @property
    def snapshot(self) -> Snapshot: ...

    @property
    def draining(self) -> bool: ...


def _last_check(checker: Any, backend_id: str, now: float) -> dict[str, Any]:
    state = checker.states.get(backend_id) if checker is not None else None
    if state is None or state.last_at is None:
        return {"last_check": None}
    return {
        "last_check": {
            "ok": state.last_ok,
            "reason": state.last_reason,
            "seconds_ago": round(now - state.last_at, 3),
            "checks": state.checks,
        }
    }


def status_document(node: AdminView) -> dict[str, Any]:
    snap = node.snapshot
    now = trio.current_time()
    checkers = getattr(node, "health_checkers", {})
    pools = []
    for name, pool in snap.pools.items():
        pools.append(
            {
                "name": name,
                "algorithm": pool.spec.algorithm,
                "backends": [
                    {
                        "id": b.id,
                        "address": str(b.spec.address),
                        "weight": b.spec.weight,
                        "admin": b.admin,
                        "state": b.health,
                        "reason": b.health_reason,
                        "inflight": b.inflight,
                        "connections": b.connections,
                        "requests": b.requests,
                        "failures": b.failures,
                        "ejected_for": round(max(0.0, b.ejected_until - now), 3),
                        "ejections": pool.outlier.ejections(b.id) if pool.outlier is not None else 0,
                        **_last_check(checkers.get(name), b.id, now),
                    }
                    for b in pool.backends
                ],
                "queue": len(pool.waiters),
            }
        )
    source = getattr(node, "config_source", None)
    config = source.document() if source is not None else {"source": "file", "stale": False, "revision": None}
    follower = getattr(node, "follower", None)
    if follower is not None and follower.failing:
        config["stale"] = True  # the store stopped answering: changes made meanwhile are not here
    listeners = {}
    for name, li in snap.listeners.items():
        entry: dict[str, Any] = {"protocol": li.protocol}
        terminator = getattr(node, "tls_terminators", {}).get(name)
        if terminator is not None:
            entry["tls"] = terminator.status()
        access = getattr(node, "access_logs", {}).get(name)
        if access is not None and li.access_log is not None:
            entry["access_log"] = {
                "path": li.access_log.path, "format": access.format, "written": access.written,
                "dropped": access.dropped, "buffered": len(access.entries),
            }
        listeners[name] = entry
    gate = getattr(node, "connection_gate", None)
    return {
        "node": snap.config.node.id,
        "draining": node.draining,
        # client connections open on all listeners, and [node] max_connections (null: none)
        "connections": {
            "open": gate.in_use if gate is not None else None,
            "max": gate.limit if gate is not None else None,
        },
        "config_version": snap.version,
        # where the pools come from; "stale": true while a cluster node serves its cache
        # (or node.toml's pools) because the store could not be read
        "config": config,
        "pools": pools,
        "listeners": listeners,
        # What this node serves right now (never the key): after a rotation, every node's
        # fingerprint says whether it has the new certificate.
        "certificates": {
            name: {
                "names": list(cert.names),
                "not_after": cert.not_after.strftime("%Y-%m-%dT%H:%M:%SZ"),
                "fingerprint": cert.fingerprint,
            }
            for name, cert in sorted(snap.certificates.items())
        },
    }


def _response(status: int, body: bytes, content_type: str) -> bytes:
    reason = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed", 503: "Service Unavailable"}
    return (
        f"HTTP/1.1 {status} {reason.get(status, '')}\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\nCache-Control: no-store\r\nConnection: close\r\n\r\n"
    ).encode() + body


def answer(node: AdminView, head: RequestHead) -> bytes:
    path = head.target.split(b"?", 1)[0]
    if head.method not in (b"GET", b"HEAD"):
        return _response(405, b"only GET\n", "text/plain")
    if path == b"/healthz":
        if node.draining:
            return _response(503, b"draining\n", "text/plain")
        return _response(200, b"ok\n", "text/plain")
    if path == b"/status":
        return _response(200, json.dumps(status_document(node), indent=2).encode() + b"\n", "application/json")
    if path == b"/metrics":
        return _response(200, metrics.render(node), metrics.CONTENT_TYPE)
    return _response(404, b"not found: try /healthz, /status or /metrics\n", "text/plain")


async def _handle(node: AdminView, sock: socket.socket, client_ip: str) -> None:
    reader = RequestReader(MAX_HEAD)
    with trio.move_on_after(READ_TIMEOUT):
        try:
            while not reader.events:
                data = await recv_some(sock, 4096)
                if not data:
                    return
                reader.feed(data)
            ev = reader.events.popleft()
            if isinstance(ev, RequestHead):
                out = answer(node, ev)
                if ev.method == b"HEAD":
                    out = out.split(b"\r\n\r\n", 1)[0] + b"\r\n\r\n"
            else:
                out = _response(400, b"bad request\n", "text/plain")
            await send_all(sock, out, READ_TIMEOUT)
        except (OSError, SendTimeout) as exc:
            log.debug("admin client %s: %s", client_ip, exc)


async def serve_admin(sock: socket.socket, node: AdminView) -> None:
    async def handler(conn: socket.socket, client_ip: str) -> None:
        await _handle(node, conn, client_ip)

    async with trio.open_nursery() as handlers:
        await accept_loop(sock, handler, handlers, ConnectionGate(64), "admin")
