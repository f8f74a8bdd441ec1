"""Routes managed once for the whole cluster, end to end: a real etcd, three real ``lbnode run``
processes with an http listener, lbctl and gRPC clients through node 1, and real HTTP clients
(http.client, keep-alive) on every node.

Tests share one cluster (module fixture) and run in file order.
"""

from __future__ import annotations

import http.client
import json
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest

from lbnode.api.fulcrum.v1 import control_pb2 as pb
from lbnode.api.fulcrum.v1 import control_pb2_grpc as rpc
from tests.conftest import REPO, free_port, wait_port
from tests.integration.etcd_helpers import etcd_cluster, require_etcd
from tests.integration.test_cluster_lbctl import (
    NODES,
    Certs,
    Procs,
    certs_init,
    lbctl_env,
    percentile,
    refusal,
)

TTL = 2.0  # node lease
# Store write -> etcd watch -> a new snapshot with the listener's new route table -> the next
# request: milliseconds by design (one etcd event, one snapshot build). 0.5 s is the bound of
# the pool and certificate propagation tests on the same path: about 50x the design, for two
# busy cores.
PROPAGATION_P99 = 0.5
CHANGES_MEASURED = 30
CHANGES_UNDER_LOAD = 10
CLIENTS_PER_NODE = 1


@dataclass
class Node:
    id: str
    http: int
    control: int
    proc: object

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.control}"


@dataclass
class Cluster:
    certs: Certs
    home: Path
    nodes: list[Node] = field(default_factory=list)

    def lbctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "lbctl.cli", "--endpoint", self.nodes[0].endpoint, *self.certs.flags(), *args],
            capture_output=True, text=True, cwd=REPO, timeout=60, env=lbctl_env(self.home),
        )

    def routes_stub(self) -> tuple[grpc.Channel, rpc.RoutesStub]:
        d = self.certs.dir
        credentials = grpc.ssl_channel_credentials(
            root_certificates=(d / "ca.pem").read_bytes(), private_key=(d / "client.key").read_bytes(),
            certificate_chain=(d / "client.pem").read_bytes(),
        )
        channel = grpc.secure_channel(self.nodes[0].endpoint, credentials)
        return channel, rpc.RoutesStub(channel)


def _node_config(directory: Path, node_id: str, etcd, certs: Certs, a: str, b: str) -> tuple[str, dict[str, int]]:  # type: ignore[no-untyped-def]
    ports = {"http": free_port(), "control": free_port()}
    endpoints = ", ".join(f'"{e}"' for e in etcd.endpoints)
    text = f"""
[node]
id = "{node_id}"
state_dir = "{directory / node_id}"
drain_timeout = "1s"
workers = 1

[cluster]
etcd = [{endpoints}]
lease_ttl = "{TTL:g}s"

[control]
bind = "127.0.0.1:{ports['control']}"
ca = "{certs.dir / 'ca.pem'}"
cert = "{certs.dir / f'{node_id}.pem'}"
key = "{certs.dir / f'{node_id}.key'}"

[[listeners]]
name = "front"
protocol = "http"
bind = "127.0.0.1:{ports['http']}"
pool = "web"
  [[listeners.routes]]
  name = "seeded"
  path_prefix = "/seeded/"
  pool = "api"

[[pools]]
name = "web"
  [[pools.backends]]
  address = "{a}"

[[pools]]
name = "api"
  [[pools.backends]]
  address = "{b}"
"""
    return text, ports


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    require_etcd()
    directory = tmp_path_factory.mktemp("cluster-routes")
    procs = Procs(directory)
    try:
        with etcd_cluster(directory, size=1) as etcd:
            certs = certs_init(directory / "control-certs")
            backends = {}
            for name in ("a", "b"):
                backends[name] = free_port()
                procs.spawn("-m", "lbnode.demo_backend", "--name", name, "--port", str(backends[name]),
                            name=f"backend-{name}")
            c = Cluster(certs, directory)
            for node_id in NODES:
                text, ports = _node_config(directory, node_id, etcd, certs, f"127.0.0.1:{backends['a']}",
                                           f"127.0.0.1:{backends['b']}")
                config = directory / f"{node_id}.toml"
                config.write_text(text)
                proc = procs.spawn("-m", "lbnode.cli", "run", "--config", str(config), name=node_id)
                c.nodes.append(Node(node_id, ports["http"], ports["control"], proc))
            for node in c.nodes:
                for port in (node.http, node.control):
                    try:
                        wait_port(port, timeout=20)
                    except TimeoutError:
                        raise AssertionError(f"{node.id} did not start:\n{node.proc.log()[-3000:]}") from None  # type: ignore[attr-defined]
            for port in backends.values():
                wait_port(port)
            yield c
    finally:
        procs.kill_all()


class Client:
    """One keep-alive HTTP/1.1 connection to a node (reopened if the node closes it)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)

    def get(self, path: str) -> tuple[int, str, bytes]:
        for attempt in (1, 2):
            try:
                self.conn.request("GET", path)
                r = self.conn.getresponse()
                body = r.read()
                if r.getheader("connection", "").lower() == "close":
                    self.conn.close()
                return r.status, r.getheader("x-backend", ""), body
            except (ConnectionError, http.client.HTTPException):
                self.conn.close()
                if attempt == 2:
                    raise
        raise AssertionError("not reached")


def wait_routed(clients: list[Client], path: str, backend: str, since: float, limit: float = 5.0) -> float:
    """Seconds from ``since`` until every node sent ``path`` to ``backend``."""
    waiting = list(clients)
    while waiting:
        waiting = [c for c in waiting if c.get(path)[1] != backend]
        assert time.monotonic() - since < limit, f"nodes on {[c.port for c in waiting]} never sent {path} to {backend}"
    return time.monotonic() - since


def route(name: str, pool: str, path_prefix: str, **more: object) -> pb.Route:
    return pb.Route(listener="front", name=name, spec_json=json.dumps({"path_prefix": path_prefix, "pool": pool, **more}))


# --------------------------------------------------------------------------- tests


def test_node_toml_routes_seed_once_and_a_route_applied_through_node_1_is_served_by_every_node(
    cluster: Cluster, tmp_path: Path
) -> None:
    clients = [Client(n.http) for n in cluster.nodes]
    listed = cluster.lbctl("-o", "json", "routes", "list")
    assert listed.returncode == 0, listed.stderr
    assert [(r["listener"], r["name"]) for r in json.loads(listed.stdout)["routes"]] == [("front", "seeded")]
    wait_routed(clients, "/seeded/x", "b", time.monotonic(), limit=10)
    desired = tmp_path / "routes.toml"
    desired.write_text('[[routes]]\nlistener = "front"\nname = "api"\npath_prefix = "/api/"\npool = "api"\n')
    done = cluster.lbctl("routes", "apply", "-f", str(desired))
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == "applied: created route front/api"
    took = wait_routed(clients, "/api/x", "b", time.monotonic())
    print(f"\nroutes apply (lbctl): routed by 3 nodes {took * 1000:.0f} ms after lbctl returned")
    again = cluster.lbctl("routes", "apply", "-f", str(desired))
    assert again.returncode == 0 and again.stdout.splitlines()[-1] == "no changes", again.stdout
    # python -m lbctl.cli: a refusal is one line, exit 1, no traceback
    line, _ = refusal(cluster.lbctl("routes", "show", "front", "nope"))
    assert line == 'lbctl: NOT_FOUND: route "nope" of listener "front" does not exist'


def test_propagation_of_route_changes_to_three_nodes(cluster: Cluster) -> None:
    clients = [Client(n.http) for n in cluster.nodes]
    channel, stub = cluster.routes_stub()
    from_call, from_return, calls = [], [], []
    try:
        for i in range(CHANGES_MEASURED):
            pool, backend = ("web", "a") if i % 2 == 0 else ("api", "b")
            started = time.monotonic()
            stub.PutRoute(pb.PutRouteRequest(route=route("api", pool, "/api/")), timeout=10)
            returned = time.monotonic()
            calls.append(returned - started)
            wait_routed(clients, "/api/x", backend, returned)
            from_return.append(time.monotonic() - returned)
            from_call.append(time.monotonic() - started)
    finally:
        channel.close()
    from_return.sort()
    from_call.sort()
    print(f"\nPutRoute -> etcd -> 3 nodes routing by it, {CHANGES_MEASURED} changes: after the call returned "
          f"p50 {statistics.median(from_return) * 1000:.0f} ms, p99 {percentile(from_return, 99) * 1000:.0f} ms, "
          f"max {from_return[-1] * 1000:.0f} ms; from the call's start p50 {statistics.median(from_call) * 1000:.0f} ms, "
          f"p99 {percentile(from_call, 99) * 1000:.0f} ms (the call itself: median "
          f"{statistics.median(calls) * 1000:.0f} ms)")
    assert percentile(from_call, 99) < PROPAGATION_P99


def test_route_changes_under_load_fail_no_request_on_any_node(cluster: Cluster) -> None:
    stop = threading.Event()
    seen: Counter[str] = Counter()
    failures: list[str] = []
    lock = threading.Lock()

    def load(port: int) -> None:
        client = Client(port)
        while not stop.is_set():
            try:
                status, backend, _ = client.get("/api/x")
                if status != 200:
                    raise ConnectionError(f"status {status}")
                with lock:
                    seen[backend] += 1
            except Exception as exc:  # any failure at all is what the test counts
                with lock:
                    failures.append(f"127.0.0.1:{port}: {type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=load, args=(n.http,), daemon=True)
               for n in cluster.nodes for _ in range(CLIENTS_PER_NODE)]
    for t in threads:
        t.start()
    clients = [Client(n.http) for n in cluster.nodes]
    channel, stub = cluster.routes_stub()
    try:
        for i in range(CHANGES_UNDER_LOAD):
            pool, backend = ("web", "a") if i % 2 == 0 else ("api", "b")
            stub.PutRoute(pb.PutRouteRequest(route=route("api", pool, "/api/")), timeout=10)
            wait_routed(clients, "/api/x", backend, time.monotonic())
            time.sleep(0.2)  # let the load run on each version a while
    finally:
        stop.set()
        for t in threads:
            t.join(10)
        channel.close()
    print(f"\nroute changes under load: {CHANGES_UNDER_LOAD} changes, {sum(seen.values())} requests by "
          f"{len(threads)} keep-alive clients ({dict(seen)}), {len(failures)} failed")
    assert failures == []
    assert seen["a"] > 0 and seen["b"] > 0


def test_a_route_whose_pool_is_deleted_answers_503_on_every_node_and_is_flagged(cluster: Cluster, tmp_path: Path) -> None:
    pool_file = tmp_path / "temp.toml"
    pool_file.write_text(f'name = "temp"\n[[backends]]\naddress = "127.0.0.1:{free_port()}"\n')
    assert cluster.lbctl("pools", "create", "-f", str(pool_file)).returncode == 0
    channel, stub = cluster.routes_stub()
    try:
        stub.PutRoute(pb.PutRouteRequest(route=route("temp", "temp", "/temp/")), timeout=10)
    finally:
        channel.close()
    deleted = cluster.lbctl("pools", "delete", "temp")
    assert deleted.returncode == 0, deleted.stderr
    clients = [Client(n.http) for n in cluster.nodes]
    deadline = time.monotonic() + 5
    answers: list[tuple[int, str, bytes]] = []
    while time.monotonic() < deadline:
        answers = [c.get("/temp/x") for c in clients]
        if all(a[0] == 503 for a in answers):
            break
    assert [a[2] for a in answers] == [b"503 Service Unavailable: pool temp is not configured\n"] * 3, answers
    listed = cluster.lbctl("routes", "list")
    row = next(line for line in listed.stdout.splitlines() if line.split()[:2] == ["front", "temp"])
    assert "MISSING POOL temp: 503" in row
