"""``[node] workers = 2`` in a cluster (issue 13): state that other nodes write to etcd.

Real processes: a real etcd, ``lbnode run`` twice (node ``a1`` a single process, node ``t1``
a supervisor with two workers), demo backends, clients on raw sockets from distinct
loopback source addresses (so that ``source_ip`` affinity sees distinct clients and the
worker that accepted each connection is read from /proc). What the tests write to etcd
themselves is what an operator would (``etcdctl put``/``del``): a rotated cookie key, a
removed session.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import httpx

from lbnode.affinity import CookieSealer
from lbnode.cluster.affinity import decode_entry, escape_key
from lbnode.cluster.etcd import EtcdConnection
from tests.conftest import (
    Proc,
    free_port,
    listener_toml,
    node_toml,
    pool_toml,
    spawn_backend,
    wait_port,
)
from tests.integration.test_node_process import wait_log, wait_until
from tests.integration.test_workers import Conn, Spawn, WorkersNode, owner, start_node

# How long an entry node a1 wrote may take to reach t1's workers: etcd's watch to t1's
# supervisor, then one socket hop to each worker (milliseconds unloaded); 1 s of margin for
# two busy cores.
PROPAGATION = 1.0
CLIENTS = [f"127.0.0.{n}" for n in range(20, 60)]


COOKIE_KEY = "/fulcrum/v1/secrets/cookie-key"


def _cluster(etcd: object) -> str:
    endpoints = ", ".join(f'"{e}"' for e in etcd.endpoints)  # type: ignore[attr-defined]
    return f'\n[cluster]\netcd = [{endpoints}]\nlease_ttl = "2s"\n'


def _a1(spawn: Spawn, tmp_path: Path, etcd: object, pool: str) -> tuple[Proc, int]:
    """Node a1: one process (workers = 1) serving ``pool`` on listener ``web``; (process, port)."""
    port = free_port()
    config = tmp_path / "a1.toml"
    config.write_text(node_toml(
        pool, listener_toml("web", "http", "p", bind=f"127.0.0.1:{port}"), node_id="a1", admin=None,
        workers=1, node_extra=f'state_dir = "{tmp_path / "a1"}"\n',
    ) + _cluster(etcd))
    proc = spawn("-m", "lbnode.cli", "run", "--config", str(config), name="a1")
    wait_port(port)
    return proc, port


def _each_worker(node: WorkersNode, check: Callable[[Conn], None], each: int = 2, limit: int = 80) -> None:
    """``check`` on new connections until every worker has passed it on ``each`` of them (the
    kernel picks the worker that accepts: connections are opened until both had theirs)."""
    pids = node.worker_pids()
    done = dict.fromkeys(pids, 0)
    for _ in range(limit):
        conn = Conn(node.port)
        try:
            check(conn)
            pid = owner(conn, pids, node.port)
        finally:
            conn.sock.close()
        assert pid is not None, "a connection no worker holds"
        done[pid] += 1
        if all(n >= each for n in done.values()):
            return
    raise AssertionError(f"after {limit} connections, checked per worker: {done}")


def test_a_client_another_node_pinned_keeps_its_backend_on_whichever_worker_takes_it(
    spawn: Spawn, tmp_path: Path, etcd: object,
) -> None:
    """Forty clients pinned by node a1 (source_ip, round robin over two backends) then come to
    node t1 (two workers) in the reverse order, each on a new connection: every first request
    on t1 reaches the backend a1 chose, on both workers. Without the entries pushed from the
    supervisor to the workers, each worker's round robin would place them afresh (reversed,
    the alternation a1 used is out of step with any fresh one). Then a worker is killed: the
    process that takes its slot starts with every entry the supervisor holds, and places
    none of the forty afresh."""
    ports = {name: spawn_backend(spawn, name) for name in ("a", "b")}
    pool = pool_toml("p", [f"127.0.0.1:{p}" for p in ports.values()], _extra='[pools.affinity]\nmode = "source_ip"\n')
    _, a1_port = _a1(spawn, tmp_path, etcd, pool)
    (tmp_path / "t1").mkdir()
    t1 = start_node(spawn, tmp_path / "t1", ports["a"], pool=pool, extra=_cluster(etcd))

    pinned: dict[str, str] = {}
    for source in CLIENTS:
        with httpx.Client(transport=httpx.HTTPTransport(local_address=source), timeout=5) as client:
            pinned[source] = client.get(f"http://127.0.0.1:{a1_port}/").text.strip()
    assert set(pinned.values()) == {"a", "b"}, pinned
    time.sleep(PROPAGATION)

    def visit(order: list[str]) -> None:
        pids = t1.worker_pids()
        served: dict[str, tuple[int | None, str]] = {}
        for source in order:
            conn = Conn(t1.port, source)
            status, _, body = conn.exchange("/")
            assert status == 200
            served[source] = (owner(conn, pids, t1.port), body.decode().strip())
            conn.sock.close()
        wrong = {s: (pinned[s], got) for s, (_, got) in served.items() if got != pinned[s]}
        assert not wrong, f"{len(wrong)} of {len(order)} clients left the backend a1 pinned: {wrong}"
        by_worker = {pid: sum(1 for p, _ in served.values() if p == pid) for pid in pids}
        assert all(by_worker.values()), f"the kernel gave every connection to one worker: {by_worker}"

    visit(list(reversed(CLIENTS)))
    wait_until(lambda: t1.status()["spare_worker"] == "ready", 20, "the spare worker ready")
    victim = t1.worker_pids()[0]
    os.kill(victim, signal.SIGKILL)
    wait_until(lambda: all(w["serving"] and w["pid"] != victim for w in t1.status()["workers"]), 5,
               "the killed worker replaced")
    visit(CLIENTS[1::2] + CLIENTS[0::2])  # out of a1's alternation again


def _cookie(response_headers: dict[bytes, bytes]) -> str | None:
    value = response_headers.get(b"set-cookie")
    return value.decode().split(";", 1)[0].split("=", 1)[1] if value is not None else None


def test_a_rotated_cluster_cookie_key_reaches_every_worker_and_a_worker_started_later(
    spawn: Spawn, tmp_path: Path, etcd: object,
) -> None:
    """Cookie affinity, no configured key: a1 and t1 (two workers) agree on the cluster key
    (t1 starts second: its workers were given t1's own key before the agreement). An operator
    rotates the key in etcd (no configuration change): a cookie a1 seals under the new key,
    and one it sealed before the rotation, keep their backend on both of t1's workers (no new
    cookie), and so on a worker started after the rotation. Without the key pushed to the
    workers, each would set a new cookie on another backend's choice."""
    ports = {name: spawn_backend(spawn, name) for name in ("a", "b", "c")}
    pool = pool_toml("p", [f"127.0.0.1:{p}" for p in ports.values()], _extra='[pools.affinity]\nmode = "cookie"\n')
    a1, a1_port = _a1(spawn, tmp_path, etcd, pool)
    wait_log(a1, "cookie key: this node's key is now the cluster key", timeout=10)
    (tmp_path / "t1").mkdir()
    t1 = start_node(spawn, tmp_path / "t1", ports["a"], pool=pool, extra=_cluster(etcd))
    wait_log(t1.proc, "cookie key: switched to the cluster key", timeout=10)
    etcd_conn = EtcdConnection(etcd.endpoints)  # type: ignore[attr-defined]

    def issued_by_a1() -> tuple[str, str]:
        r = httpx.get(f"http://127.0.0.1:{a1_port}/", timeout=5)
        assert r.status_code == 200 and "FULCRUM" in r.cookies
        return r.cookies["FULCRUM"], r.text.strip()

    before = [issued_by_a1() for _ in range(3)]  # three backends in rotation: each one once
    new_key = os.urandom(32)
    etcd_conn.put(COOKIE_KEY, new_key.hex().encode())
    wait_log(a1, "cookie key: the cluster key .* changed", timeout=PROPAGATION + 4)
    wait_log(t1.proc, "cookie key: the cluster key .* changed", timeout=PROPAGATION + 4)
    after = [issued_by_a1() for _ in range(3)]
    assert all(CookieSealer(new_key).open(c, time.time()) is not None for c, _ in after), "a1 did not rotate"
    assert {b for _, b in after} == {"a", "b", "c"}
    time.sleep(PROPAGATION)  # the supervisor's push: one socket hop to each worker

    def honoured(conn: Conn) -> None:
        for cookie, bound in before + after:
            status, headers, body = conn.exchange("/", {b"cookie": f"FULCRUM={cookie}".encode()})
            assert status == 200
            assert (body.decode().strip(), _cookie(headers)) == (bound, None), "a cookie of a1 not honoured"
        # What a worker seals now opens under the new key (any node honours it).
        status, headers, _ = conn.exchange("/")
        fresh = _cookie(headers)
        assert status == 200 and fresh is not None and CookieSealer(new_key).open(fresh, time.time()) is not None

    _each_worker(t1, honoured)
    wait_until(lambda: t1.status()["spare_worker"] == "ready", 20, "the spare worker ready")
    victim = t1.worker_pids()[0]
    os.kill(victim, signal.SIGKILL)
    wait_until(lambda: all(w["serving"] and w["pid"] != victim for w in t1.status()["workers"]), 5,
               "the killed worker replaced")
    _each_worker(t1, honoured)


def test_a_session_deleted_in_etcd_is_balanced_afresh_on_every_worker(
    spawn: Spawn, tmp_path: Path, etcd: object,
) -> None:
    """Sixteen clients pinned by a1 (source_ip) reach t1's workers through the supervisor's
    relay, and are served from the workers' copies. Their entries are then deleted in etcd
    (as an operator, or a node ending the sessions, would): within one relay every worker
    has dropped its copy, so each client's next request on t1, on the keep-alive connection
    a worker already served it on, is balanced afresh (t1 places it and writes the new entry
    to etcd under its own name, naming the backend that answered). A worker still holding its
    copy would serve from it and write nothing (a key it only uses is never written again
    once etcd deleted it: t1's supervisor dropped it too)."""
    ports = {name: spawn_backend(spawn, name) for name in ("a", "b")}
    pool = pool_toml("p", [f"127.0.0.1:{p}" for p in ports.values()], _extra='[pools.affinity]\nmode = "source_ip"\n')
    _, a1_port = _a1(spawn, tmp_path, etcd, pool)
    (tmp_path / "t1").mkdir()
    t1 = start_node(spawn, tmp_path / "t1", ports["a"], pool=pool, extra=_cluster(etcd))
    etcd_conn = EtcdConnection(etcd.endpoints)  # type: ignore[attr-defined]
    clients = CLIENTS[:16]
    keys = {source: f"/fulcrum/v1/affinity/p/{escape_key(source)}" for source in clients}

    def written(source: str) -> dict[str, str] | None:
        kv = etcd_conn.get(keys[source])
        return None if kv is None else json.loads(kv.value)  # type: ignore[no-any-return]

    pinned: dict[str, str] = {}
    for source in clients:
        with httpx.Client(transport=httpx.HTTPTransport(local_address=source), timeout=5) as client:
            pinned[source] = client.get(f"http://127.0.0.1:{a1_port}/").text.strip()
    wait_until(lambda: all((written(s) or {}).get("node") == "a1" for s in clients), PROPAGATION,
               "a1's entries in etcd")
    time.sleep(PROPAGATION)  # ... and on t1's workers

    pids = t1.worker_pids()
    conns: dict[str, tuple[Conn, int | None]] = {}
    for source in clients:
        conn = Conn(t1.port, source)
        status, _, body = conn.exchange("/")
        assert (status, body.decode().strip()) == (200, pinned[source])
        conns[source] = (conn, owner(conn, pids, t1.port))
    by_worker = {pid: [s for s, (_, p) in conns.items() if p == pid] for pid in pids}
    assert all(by_worker.values()), f"the kernel gave every connection to one worker: {by_worker}"

    etcd_conn.delete_many(list(keys.values()))
    # One relay: etcd's watch to t1's supervisor, then one socket hop to each worker
    # (milliseconds unloaded); PROPAGATION has 1 s of margin for two busy cores.
    time.sleep(PROPAGATION)
    answered: dict[str, str] = {}
    for source, (conn, _) in conns.items():
        status, _, body = conn.exchange("/")
        assert status == 200
        answered[source] = body.decode().strip()
        conn.sock.close()
    # t1's supervisor writes a session its workers placed in the background (milliseconds).
    wait_until(lambda: all(written(s) is not None for s in clients), PROPAGATION,
               "every session placed again (a worker served a deleted entry from its copy)")
    for pid, sources in by_worker.items():
        for source in sources:
            entry = written(source)
            assert entry is not None and entry["node"] == "t1", f"worker {pid}: {source} not placed afresh: {entry}"
            assert decode_entry(json.dumps(entry).encode()) == f"127.0.0.1:{ports[answered[source]]}"
