"""``[node] workers = 2`` in a cluster (issue 13): state that other nodes write to etcd.

Real processes: a real etcd, ``lbnode run`` twice (node ``a1`` a single process, node ``t1``
a supervisor with two workers), demo backends, clients on raw sockets from distinct
loopback source addresses (so that ``source_ip`` affinity sees distinct clients and the
worker that accepted each connection is read from /proc).
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import httpx

from tests.conftest import free_port, listener_toml, node_toml, pool_toml, spawn_backend, wait_port
from tests.integration.test_node_process import wait_until
from tests.integration.test_workers import Conn, Spawn, owner, start_node

# How long an entry node a1 wrote may take to reach t1's workers: etcd's watch to t1's
# supervisor, then one socket hop to each worker (milliseconds unloaded); 1 s of margin for
# two busy cores.
PROPAGATION = 1.0
CLIENTS = [f"127.0.0.{n}" for n in range(20, 60)]


def _cluster(etcd: object) -> str:
    endpoints = ", ".join(f'"{e}"' for e in etcd.endpoints)  # type: ignore[attr-defined]
    return f'\n[cluster]\netcd = [{endpoints}]\nlease_ttl = "2s"\n'


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
    a1_port = free_port()
    a1_config = tmp_path / "a1.toml"
    a1_config.write_text(node_toml(
        pool, listener_toml("web", "http", "p", bind=f"127.0.0.1:{a1_port}"), node_id="a1", admin=None,
        workers=1, node_extra=f'state_dir = "{tmp_path / "a1"}"\n',
    ) + _cluster(etcd))
    spawn("-m", "lbnode.cli", "run", "--config", str(a1_config), name="a1")
    wait_port(a1_port)
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
