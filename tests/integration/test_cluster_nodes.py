"""A cluster as operators run it: a real etcd, three real lbnode processes, real backends and clients."""

from __future__ import annotations

import json
import statistics
import threading
import time
from dataclasses import replace
from pathlib import Path

import httpx

from lbnode.cluster.etcd import EtcdConnection, EtcdStore
from lbnode.model import Backend, parse_address
from tests.conftest import free_port, spawn_backend, wait_port

TTL = 2.0


def _node(spawn, tmp_path: Path, etcd, node_id: str, backend_ports: list[int], *, health: bool = True) -> dict:
    http, admin = free_port(), free_port()
    health_table = '  [pools.health]\n  type = "http"\n  path = "/healthz"\n  interval = "100ms"\n  fall = 2\n  rise = 1\n' if health else ""
    backends = "".join(f'  [[pools.backends]]\n  address = "127.0.0.1:{p}"\n' for p in backend_ports)
    endpoints = ", ".join(f'"{e}"' for e in etcd.endpoints)
    config = tmp_path / f"{node_id}.toml"
    config.write_text(
        f"""
[node]
id = "{node_id}"
admin = "127.0.0.1:{admin}"
state_dir = "{tmp_path / node_id}"
drain_timeout = "2s"
workers = 1

[cluster]
etcd = [{endpoints}]
lease_ttl = "{TTL:g}s"

[[listeners]]
name = "web"
protocol = "http"
bind = "127.0.0.1:{http}"
pool = "web"

[[pools]]
name = "web"
{health_table}{backends}"""
    )
    proc = spawn("-m", "lbnode.cli", "run", "--config", str(config), name=node_id)
    wait_port(http)
    return {"id": node_id, "http": http, "admin": admin, "proc": proc}


# One kept-alive client: a new connection per poll (~30 ms here) would be measured as propagation.
_ADMIN = httpx.Client(timeout=2)


def _status(node: dict) -> dict:
    return _ADMIN.get(f"http://127.0.0.1:{node['admin']}/status").json()


def _backend_ids(node: dict, pool: str = "web") -> list[str]:
    for p in _status(node)["pools"]:
        if p["name"] == pool:
            return [b["id"] for b in p["backends"]]
    return []


def _store(etcd) -> EtcdStore:
    return EtcdStore(etcd.settings(lease_ttl=TTL), connection=EtcdConnection(etcd.endpoints))


def test_pool_changes_reach_every_node_and_are_served(spawn, tmp_path, etcd):
    ports = [spawn_backend(spawn, n) for n in ("a", "b", "c")]
    nodes = [_node(spawn, tmp_path, etcd, f"n{i}", ports[:1], health=False) for i in range(1, 4)]
    store = _store(etcd)
    # A new pool written once is served by all three nodes.
    record = store.get_pool("web")
    store.update_pool(
        replace(record.pool, backends=tuple(Backend(parse_address(f"127.0.0.1:{p}", "t")) for p in ports)),
        record.revision,
    )
    deadline = time.monotonic() + 5
    for node in nodes:
        while len(_backend_ids(node)) != 3:
            assert time.monotonic() < deadline, f"{node['id']} never saw the change"
            time.sleep(0.02)
        names = {httpx.get(f"http://127.0.0.1:{node['http']}/", timeout=5).text.strip() for _ in range(6)}
        assert names == {"a", "b", "c"}
    # Propagation of 50 changes: time from the write until every node's snapshot shows it.
    delays = []
    for i in range(50):
        record = store.get_pool("web")
        weight = 1 + i % 5
        changed = replace(record.pool, backends=(replace(record.pool.backends[0], weight=weight), *record.pool.backends[1:]))
        start = time.monotonic()
        store.update_pool(changed, record.revision)
        for node in nodes:
            while True:
                pool = next(p for p in _status(node)["pools"] if p["name"] == "web")
                if pool["backends"][0]["weight"] == weight:
                    break
                assert time.monotonic() - start < 5, "change not propagated within 5 s"
                time.sleep(0.005)
        delays.append(time.monotonic() - start)
    delays.sort()
    p50, p99 = statistics.median(delays), delays[int(len(delays) * 0.99) - 1]
    print(f"\npropagation to 3 nodes over 50 changes: p50 {p50 * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms, max {delays[-1] * 1000:.0f} ms")
    assert p99 < 0.5


def test_etcd_down_under_load_causes_no_client_errors_and_changes_flow_again(spawn, tmp_path, etcd):
    ports = [spawn_backend(spawn, n) for n in ("a", "b")]
    node = _node(spawn, tmp_path, etcd, "n1", ports)
    url = f"http://127.0.0.1:{node['http']}/"
    errors: list[str] = []
    done = threading.Event()
    served = [0]

    def load() -> None:
        with httpx.Client(timeout=5) as client:
            while not done.is_set():
                try:
                    r = client.get(url)
                    if r.status_code != 200:
                        errors.append(f"status {r.status_code}")
                    served[0] += 1
                except httpx.HTTPError as exc:
                    errors.append(repr(exc))
                time.sleep(0.005)

    threads = [threading.Thread(target=load) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        time.sleep(0.5)
        member = etcd.members[0]
        member.kill()  # etcd entirely gone
        time.sleep(TTL + 1.5)  # longer than the lease: the node must not care
        member.start()
        member.wait_healthy()
        time.sleep(0.5)
    finally:
        done.set()
        for t in threads:
            t.join(10)
    assert served[0] > 100
    assert errors == []
    assert "pool store unavailable" in node["proc"].log()
    # Changes flow again after etcd is back.
    store = _store(etcd)
    deadline = time.monotonic() + 10
    while True:
        try:
            record = store.get_pool("web")
            store.update_pool(replace(record.pool, backends=record.pool.backends[:1]), record.revision)
            break
        except Exception:
            assert time.monotonic() < deadline
            time.sleep(0.2)
    while len(_backend_ids(node)) != 1:
        assert time.monotonic() < deadline, "the node did not follow etcd after it came back"
        time.sleep(0.05)


def test_a_killed_node_leaves_the_cluster_within_the_ttl_and_its_backends_get_new_checkers(spawn, tmp_path, etcd):
    ports = [spawn_backend(spawn, n) for n in ("a", "b", "c", "d")]
    nodes = [_node(spawn, tmp_path, etcd, f"n{i}", ports) for i in range(1, 4)]
    conn = EtcdConnection(etcd.endpoints)

    def checkers() -> dict[str, set[str]]:
        kvs, _ = conn.get_prefix("/fulcrum/v1/health/web/")
        out: dict[str, set[str]] = {}
        for kv in kvs:
            _, backend, node_id = kv.key.rsplit("/", 2)
            out.setdefault(backend, set()).add(node_id)
        return out

    def live() -> set[str]:
        kvs, _ = conn.get_prefix("/fulcrum/v1/nodes/")
        return {json.loads(kv.value)["id"] for kv in kvs}

    deadline = time.monotonic() + 10
    while not (live() == {"n1", "n2", "n3"} and len(checkers()) == 4 and all(len(c) == 2 for c in checkers().values())):
        assert time.monotonic() < deadline, f"cluster did not settle: {live()} {checkers()}"
        time.sleep(0.1)
    victim = next(n for n in nodes if any("n1" in c for c in checkers().values()) and n["id"] == "n1")
    victim["proc"].popen.kill()  # kill -9: no goodbye, the lease must expire
    killed_at = time.monotonic()
    while "n1" in live():
        assert time.monotonic() - killed_at < TTL + 1.5, "node key outlived its lease"
        time.sleep(0.05)
    gone_after = time.monotonic() - killed_at
    while True:
        view = checkers()
        if all("n1" not in c and len(c) == 2 for c in view.values()) and len(view) == 4:
            break
        assert time.monotonic() - killed_at < TTL + 3, f"backends not re-checked: {view}"
        time.sleep(0.05)
    print(f"\nnode key gone {gone_after:.2f}s after kill -9 (TTL {TTL:g}s); all backends have 2 live checkers "
          f"{time.monotonic() - killed_at:.2f}s after")
    # The survivors still serve.
    for node in nodes[1:]:
        assert httpx.get(f"http://127.0.0.1:{node['http']}/", timeout=5).status_code == 200
