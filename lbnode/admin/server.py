"""The admin HTTP endpoint: ``GET /healthz``, ``/status`` (JSON), ``/metrics`` (Prometheus) and
the live status page (``/``, ``/status/page.json``, ``lbnode.admin.page``).

Owns answering operators and outer load balancers about this node. Reads
the node's snapshot; never changes it (changes go through the control API).
"""

from __future__ import annotations

import json
import logging
import socket
import ssl
from typing import Any, Protocol

import trio

from lbnode.admin import metrics, page
from lbnode.admin.access import OPEN, AdminAccess, check
from lbnode.admin.counted import node_listener_counters
from lbnode.http.framing import RequestReader
from lbnode.http.headers import RequestHead
from lbnode.listen import ConnectionGate, accept_loop
from lbnode.runtime import Snapshot
from lbnode.sockio import SendTimeout, recv_some, send_all
from lbnode.tls.terminate import close_tls, handshake

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


# Answers that show the data path's counters: with workers, the supervisor sums theirs first.
COUNTED_PATHS = (b"/status", b"/metrics", b"/status/page.json")


def status_document(node: AdminView) -> dict[str, Any]:
    snap = node.snapshot
    now = trio.current_time()
    checkers = getattr(node, "health_checkers", {})
    queues = getattr(node, "worker_queues", {})  # a supervisor's: its workers' queues, summed
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
                "queue": queues.get(name, len(pool.waiters)),
            }
        )
    source = getattr(node, "config_source", None)
    config = source.document() if source is not None else {"source": "file", "stale": False, "revision": None}
    follower = getattr(node, "follower", None)
    if follower is not None and follower.failing:
        config["stale"] = True  # the store stopped answering: changes made meanwhile are not here
    counted = node_listener_counters(node)
    listeners = {name: {"protocol": li.protocol, **counted.get(name, {})} for name, li in snap.listeners.items()}
    gate = getattr(node, "connection_gate", None)
    # A supervisor serves no connection: the sum of its workers' gates (refresh_counters).
    open_now = getattr(node, "worker_connections_open", None)
    if open_now is None:
        open_now = gate.in_use if gate is not None else None
    workers = getattr(node, "workers_status", None)  # a supervisor's worker processes
    return {
        **(workers() if workers is not None else {}),
        "node": snap.config.node.id,
        "draining": node.draining,
        # client connections open on all listeners, and [node] max_connections (null: none)
        "connections": {
            "open": open_now,
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


_REASONS = {
    200: "OK", 400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found",
    405: "Method Not Allowed", 413: "Content Too Large", 503: "Service Unavailable",
}


def _response(status: int, body: bytes, content_type: str, extra: str = "") -> bytes:
    """A whole response; ``extra``: more header lines, each ending in CRLF."""
    return (
        f"HTTP/1.1 {status} {_REASONS.get(status, '')}\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\nCache-Control: no-store\r\n{extra}Connection: close\r\n\r\n"
    ).encode() + body


# The page's files: its own policy (lbnode.admin.page), and no guessing of types.
_PAGE_HEADERS = f"Content-Security-Policy: {page.CONTENT_SECURITY_POLICY}\r\nX-Content-Type-Options: nosniff\r\n"


def has_body(head: RequestHead) -> bool:
    """The request announces a body (a non-zero Content-Length, or any Transfer-Encoding).

    Admin requests are all reads: a body is never read, so one sent anyway is refused
    rather than left unread in the socket (where a proxy in front could take it for the
    next request)."""
    for name, value in head.headers:
        lname = name.lower()
        if lname == b"transfer-encoding":
            return True
        if lname == b"content-length":
            length = value.strip()
            if not length.isdigit() or int(length) > 0:  # "00" is no body; anything unreadable is refused
                return True
    return False


def answer(node: AdminView, head: RequestHead, access: AdminAccess = OPEN, client_cert: bool = False) -> bytes:
    """The whole response to one request; ``client_cert``: the TLS peer sent a verified certificate."""
    path = head.target.split(b"?", 1)[0]
    refusal = check(access, path, head.header(b"authorization"), client_cert)
    if refusal is not None:
        return _response(refusal.status, refusal.body, "text/plain", refusal.headers)
    if head.method not in (b"GET", b"HEAD"):
        # RFC 9110 15.5.6: a 405 lists the methods the resource takes.
        return _response(405, b"admin endpoints take GET or HEAD only\n", "text/plain", "Allow: GET, HEAD\r\n")
    if has_body(head):
        return _response(413, b"admin endpoints take no request body\n", "text/plain")
    if path == b"/healthz":
        if node.draining:
            return _response(503, b"draining\n", "text/plain")
        return _response(200, b"ok\n", "text/plain")
    if path == b"/status":
        return _response(200, json.dumps(status_document(node), indent=2).encode() + b"\n", "application/json")
    if path == b"/metrics":
        # A supervisor renders its own and adds up its workers' (lbnode.supervisor).
        render_metrics = getattr(node, "render_metrics", None)
        body = render_metrics() if render_metrics is not None else metrics.render(node)
        return _response(200, body, metrics.CONTENT_TYPE)
    if path == b"/status/page.json":
        return _response(200, json.dumps(page.page_document(node)).encode(), "application/json")
    static = page.static_file(path)
    if static is not None:
        body, content_type = static
        return _response(200, body, content_type, _PAGE_HEADERS)
    return _response(404, b"not found: try /, /healthz, /status, /status/page.json or /metrics\n", "text/plain")


async def _handle(node: AdminView, sock: socket.socket, client_ip: str, access: AdminAccess) -> None:
    reader = RequestReader(MAX_HEAD)
    tls: ssl.SSLSocket | None = None
    client_cert = False
    with trio.move_on_after(READ_TIMEOUT):
        try:
            if access.tls is not None:
                # wrap_socket takes the descriptor over: ``sock`` is left detached, ``tls`` is closed below.
                tls = access.tls.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
                sock = tls
                await handshake(tls)
                client_cert = bool(tls.getpeercert(binary_form=True))  # verified, or the handshake failed
            while not reader.events:
                data = await recv_some(sock, 4096)
                if not data:
                    return
                reader.feed(data)
            ev = reader.events.popleft()
            refresh = getattr(node, "refresh_counters", None)  # a supervisor asks its workers first
            if isinstance(ev, RequestHead) and refresh is not None and ev.target.split(b"?", 1)[0] in COUNTED_PATHS:
                await refresh()
            if isinstance(ev, RequestHead):
                out = answer(node, ev, access, client_cert)
                if ev.method == b"HEAD":
                    out = out.split(b"\r\n\r\n", 1)[0] + b"\r\n\r\n"
            else:
                out = _response(400, b"bad request\n", "text/plain")
            await send_all(sock, out, READ_TIMEOUT)
        except (OSError, SendTimeout) as exc:  # ssl.SSLError is an OSError: a failed handshake ends here
            log.debug("admin client %s: %s", client_ip, exc)
        finally:
            if tls is not None:
                close_tls(tls)


async def serve_admin(sock: socket.socket, node: AdminView, access: AdminAccess = OPEN,
                      accepting: trio.CancelScope | None = None) -> None:
    """Answer admin requests on ``sock`` until cancelled; ``access``: [admin]'s token and TLS.

    ``accepting`` cancelled: no new connection is taken (a new process took the socket over),
    the ones accepted are answered (one request each, within ``READ_TIMEOUT``), then this returns."""

    async def handler(conn: socket.socket, client_ip: str) -> None:
        await _handle(node, conn, client_ip, access)

    async with trio.open_nursery() as handlers:
        with accepting if accepting is not None else trio.CancelScope():
            await accept_loop(sock, handler, handlers, ConnectionGate(64), "admin")
