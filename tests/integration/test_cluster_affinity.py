"""Affinity across a cluster as clients see it: a real etcd, two ``lbnode run`` processes, real backends.

A session bound through node 1 is honoured by node 2: through the shared table
(``source_ip``), and through the cluster cookie key that came from etcd (``cookie`` with
no configured key). Run with ``-s`` to see how long an entry took to reach node 2.
"""

from __future__ import annotations

import time
from pathlib import Path

import httpx

from lbnode.affinity import COOKIE_KEY_FILE
from lbnode.cluster.affinity import decode_entry, escape_key
from lbnode.cluster.etcd import EtcdConnection
from tests.conftest import free_port, spawn_backend, wait_port

PROPAGATION = 2.0  # an entry or the cookie key must reach the other node within this


def _node(spawn, tmp_path: Path, etcd, node_id: str, ports: list[int]) -> dict:
    """A node with listener ``web`` (pool ``web``, source_ip) and ``app`` (pool ``app``, cookie, no key)."""
    web, app = free_port(), free_port()
    backends = "".join(f'  [[pools.backends]]\n  address = "127.0.0.1:{p}"\n' for p in ports)
    endpoints = ", ".join(f'"{e}"' for e in etcd.endpoints)
    config = tmp_path / f"{node_id}.toml"
    config.write_text(
        f"""
[node]
id = "{node_id}"
state_dir = "{tmp_path / node_id}"
drain_timeout = "1s"
workers = 1

[cluster]
etcd = [{endpoints}]
lease_ttl = "2s"

[[listeners]]
name = "web"
protocol = "http"
bind = "127.0.0.1:{web}"
pool = "web"

[[listeners]]
name = "app"
protocol = "http"
bind = "127.0.0.1:{app}"
pool = "app"

[[pools]]
name = "web"
  [pools.affinity]
  mode = "source_ip"
{backends}
[[pools]]
name = "app"
  [pools.affinity]
  mode = "cookie"
{backends}"""
    )
    proc = spawn("-m", "lbnode.cli", "run", "--config", str(config), name=node_id)
    wait_port(web)
    wait_port(app)
    return {"id": node_id, "web": web, "app": app, "proc": proc}


def _get(port: int, source: str = "127.0.0.1", cookies: dict[str, str] | None = None) -> httpx.Response:
    """One request from ``source`` (any 127.x address: a distinct client for source_ip)."""
    transport = httpx.HTTPTransport(local_address=source)
    with httpx.Client(transport=transport, timeout=5, cookies=cookies) as client:
        return client.get(f"http://127.0.0.1:{port}/")


def test_a_source_ip_session_made_through_node_1_is_honoured_by_node_2(spawn, tmp_path, etcd):
    ports = {name: spawn_backend(spawn, name) for name in ("a", "b")}
    n1 = _node(spawn, tmp_path, etcd, "n1", list(ports.values()))
    n2 = _node(spawn, tmp_path, etcd, "n2", list(ports.values()))
    conn = EtcdConnection(etcd.endpoints)
    key = f"/fulcrum/v1/affinity/web/{escape_key('127.0.0.1')}"

    bound = _get(n1["web"]).text.strip()
    served = time.monotonic()
    # The entry is in etcd, naming the backend node 1 chose.
    while (kv := conn.get(key)) is None:
        assert time.monotonic() - served < PROPAGATION, "node 1 never wrote the entry"
        time.sleep(0.005)
    in_etcd = time.monotonic() - served
    assert decode_entry(kv.value) == f"127.0.0.1:{ports[bound]}"
    assert kv.lease != 0  # bound to a TTL lease: it goes when idle
    # Node 2 sends 127.0.0.1 to the same backend, although its own round robin would not.
    fresh = iter(f"127.0.0.{i}" for i in range(2, 250))
    attempts = 0
    while True:
        attempts += 1
        # New clients until node 2's last fresh pick was the bound backend: with two backends
        # in rotation, its next fresh pick would be the other one.
        while _get(n2["web"], next(fresh)).text.strip() != bound:
            pass
        if _get(n2["web"]).text.strip() == bound:
            break
        assert time.monotonic() - served < PROPAGATION, "node 2 never honoured node 1's entry"
    honoured = time.monotonic() - served
    print(f"\nsource_ip entry: in etcd {in_etcd * 1000:.0f} ms after node 1 answered, honoured by node 2 "
          f"after {honoured * 1000:.0f} ms (attempt {attempts})")
    assert all(_get(n2["web"]).text.strip() == bound for _ in range(5))
    assert all(_get(n1["web"]).text.strip() == bound for _ in range(3))
    # Both nodes share one entry: node 2 adopted node 1's, it wrote no other.
    kvs, _ = conn.get_prefix("/fulcrum/v1/affinity/web/")
    assert decode_entry(next(kv for kv in kvs if kv.key == key).value) == f"127.0.0.1:{ports[bound]}"


def test_a_cookie_set_by_node_1_is_honoured_by_node_2_with_the_cluster_key(spawn, tmp_path, etcd):
    ports = {name: spawn_backend(spawn, name) for name in ("a", "b", "c")}
    n1 = _node(spawn, tmp_path, etcd, "n1", list(ports.values()))
    n2 = _node(spawn, tmp_path, etcd, "n2", list(ports.values()))
    conn = EtcdConnection(etcd.endpoints)

    deadline = time.monotonic() + PROPAGATION
    while True:
        first = _get(n1["app"])
        assert "FULCRUM" in first.cookies
        bound = first.text.strip()
        # Node 2 opens node 1's cookie: same backend, and no new cookie to replace it.
        again = _get(n2["app"], cookies={"FULCRUM": first.cookies["FULCRUM"]})
        if again.text.strip() == bound and "set-cookie" not in again.headers:
            break
        assert time.monotonic() < deadline, "node 2 never honoured node 1's cookie"
        time.sleep(0.05)
    cookie = first.cookies["FULCRUM"]
    for node in (n2, n1, n2):
        r = _get(node["app"], cookies={"FULCRUM": cookie})
        assert r.text.strip() == bound and "set-cookie" not in r.headers
    # The key came from etcd: one node's own key became the cluster key, the other switched to it.
    stored = conn.get("/fulcrum/v1/secrets/cookie-key")
    assert stored is not None
    own = {n: (tmp_path / n / COOKIE_KEY_FILE).read_text().strip() for n in ("n1", "n2")}
    assert own["n1"] != own["n2"] and stored.value.decode() in own.values()
    switched = [n for n in (n1, n2) if "switched to the cluster key" in n["proc"].log()]
    assert len(switched) == 1 and own[switched[0]["id"]] != stored.value.decode()
