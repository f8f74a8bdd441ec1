"""The VIP pieces of the control API against real processes: one etcd member, three ``lbnode run``
nodes with [[cluster.vips]] and the control API on mutual TLS, a demo backend, lbctl as a subprocess.

The nodes run ``lbnode run`` unchanged except that the claimer's addresses are recorded instead of
configured (``NetlinkAddresses`` is swapped for ``RecordedAddresses`` before the CLI starts), as in
tests/cluster/test_vip_claimer.py: nothing changes on this host's interfaces. What reaches the wire
is covered by tests/cluster/test_vip_failover.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx
import pytest

from lbnode.api.fulcrum.v1 import control_pb2 as pb
from lbnode.api.fulcrum.v1 import control_pb2_grpc as rpc
from tests.conftest import REPO, Proc, free_port, wait_port
from tests.integration.etcd_helpers import etcd_cluster, require_etcd
from tests.integration.test_cluster_lbctl import Certs, certs_init, eventually, lbctl_env

NODES = ("n1", "n2", "n3")
VIPS = ("203.0.113.100", "203.0.113.101", "203.0.113.102")
SLOW_MS = 2000

# `lbnode run`, with the VIP addresses recorded in memory instead of added to eth0.
RUN_RECORDED = (
    "import sys; import lbnode.cluster.vips as vips; "
    "from tests.integration.test_vip_api import RecordedAddresses; "
    "vips.NetlinkAddresses = RecordedAddresses; "
    "from lbnode.cli import main; sys.exit(main(sys.argv[1:]))"
)


class RecordedAddresses:
    """Stands in for NetlinkAddresses in the node processes: what would be on the interface."""

    def __init__(self) -> None:
        self.present: set[str] = set()

    def add(self, vip: object) -> None:
        self.present.add(str(vip))

    def remove(self, vip: object) -> None:
        self.present.discard(str(vip))

    def announce(self, vip: object) -> None:
        pass


@dataclass
class Node:
    id: str
    http: int
    control: int
    proc: Proc

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.control}"


@dataclass
class Cluster:
    certs: Certs
    home: Path
    nodes: list[Node]

    def lbctl(self, *args: str, via: Node) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "lbctl.cli", "--endpoint", via.endpoint, *self.certs.flags(), *args],
            capture_output=True, text=True, cwd=REPO, timeout=30, env=lbctl_env(self.home),
        )

    def ok(self, *args: str, via: Node) -> str:
        done = self.lbctl(*args, via=via)
        assert done.returncode == 0, f"lbctl {' '.join(args)} exited {done.returncode}: {done.stderr}"
        return done.stdout

    def vips(self, via: Node) -> dict[str, str]:
        rows = json.loads(self.ok("vips", "-o", "json", via=via))
        assert [r["address"] for r in rows] == list(VIPS), rows  # each VIP once, in address order
        return {r["address"]: r.get("holder", "") for r in rows}

    def channel(self, node: Node) -> grpc.Channel:
        d = self.certs.dir
        credentials = grpc.ssl_channel_credentials(
            root_certificates=(d / "ca.pem").read_bytes(), private_key=(d / "client.key").read_bytes(),
            certificate_chain=(d / "client.pem").read_bytes(),
        )
        return grpc.secure_channel(node.endpoint, credentials)


def _spawn(directory: Path, name: str, args: list[str]) -> Proc:
    log_path = directory / f"{name}.log"
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=str(REPO))
    with open(log_path, "wb") as log:
        popen = subprocess.Popen([sys.executable, *args], stdout=log, stderr=subprocess.STDOUT,
                                 stdin=subprocess.DEVNULL, cwd=REPO, env=env)
    return Proc(popen, log_path)


def _node_toml(directory: Path, node_id: str, etcd, certs: Certs, backend: str, ports: dict[str, int]) -> str:
    endpoints = ", ".join(f'"{e}"' for e in etcd.endpoints)
    vips = "".join(f'[[cluster.vips]]\naddress = "{v}/24"\n\n' for v in VIPS)
    return f"""
[node]
id = "{node_id}"
state_dir = "{directory / node_id}"
drain_timeout = "8s"
workers = 1

[cluster]
etcd = [{endpoints}]
lease_ttl = "2s"
vip_interface = "eth0"

{vips}[control]
bind = "127.0.0.1:{ports['control']}"
ca = "{certs.dir / 'ca.pem'}"
cert = "{certs.dir / f'{node_id}.pem'}"
key = "{certs.dir / f'{node_id}.key'}"

[[listeners]]
name = "front"
protocol = "http"
bind = "127.0.0.1:{ports['http']}"
pool = "web"

[[pools]]
name = "web"
  [[pools.backends]]
  address = "{backend}"
"""


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    require_etcd()
    directory = tmp_path_factory.mktemp("vip-api")
    procs: list[Proc] = []
    try:
        with etcd_cluster(directory, size=1) as etcd:
            certs = certs_init(directory / "certs")
            backend_port = free_port()
            procs.append(_spawn(directory, "backend", ["-m", "lbnode.demo_backend", "--name", "slowpoke",
                                                       "--port", str(backend_port)]))
            nodes = []
            for node_id in NODES:
                ports = {"http": free_port(), "control": free_port()}
                config = directory / f"{node_id}.toml"
                config.write_text(_node_toml(directory, node_id, etcd, certs, f"127.0.0.1:{backend_port}", ports))
                proc = _spawn(directory, node_id, ["-c", RUN_RECORDED, "run", "--config", str(config)])
                procs.append(proc)
                nodes.append(Node(node_id, ports["http"], ports["control"], proc))
            wait_port(backend_port, timeout=20)
            for node in nodes:
                for port in (node.http, node.control):
                    try:
                        wait_port(port, timeout=20)
                    except TimeoutError:
                        raise AssertionError(f"{node.id} did not start:\n{node.proc.log()[-3000:]}") from None
            yield Cluster(certs, directory, nodes)
    finally:
        for proc in procs:
            if proc.popen.poll() is None:
                proc.popen.kill()
                proc.popen.wait(10)


def test_lbctl_vips_lists_every_vip_once_with_its_holder_from_any_node(cluster: Cluster) -> None:
    n1 = cluster.nodes[0]

    def spread() -> bool:
        holders = cluster.vips(n1)
        return sorted(holders.values()) == sorted(NODES)  # fair share: one each

    eventually(spread, "the three VIPs held one per node", timeout=10)
    views = [cluster.vips(n) for n in cluster.nodes]
    assert views[0] == views[1] == views[2]  # every node answers from the same etcd view
    table = cluster.ok("vips", via=n1).splitlines()
    assert table[0].split() == ["VIP", "INTERFACE", "HOLDER", "SINCE"]
    for vip in VIPS:
        lines = [ln for ln in table[1:] if ln.startswith(f"{vip}/24 ")]
        assert len(lines) == 1, table
        assert lines[0].split()[1:3] == ["eth0", views[0][vip]]
        assert lines[0].split()[3].startswith(time.strftime("%Y-", time.gmtime()))  # since: a UTC time
    refused = cluster.lbctl("nodes", "drain", "nobody", via=n1)
    assert refused.returncode == 1 and refused.stderr.strip() == "lbctl: no live node nobody (live nodes: n1, n2, n3)"


def test_drain_hands_the_vips_over_reports_the_move_and_lets_requests_in_flight_finish(cluster: Cluster) -> None:
    holders = cluster.vips(cluster.nodes[0])
    target = next(n for n in cluster.nodes if n.id == holders[VIPS[0]])
    others = [n for n in cluster.nodes if n is not target]
    watcher = others[0]
    its_vips = {v for v, h in holders.items() if h == target.id}

    # a node drains only itself: asked for another node, it names where to call
    with cluster.channel(watcher) as channel:
        with pytest.raises(grpc.RpcError) as refused:
            rpc.ClusterStub(channel).DrainNode(pb.DrainNodeRequest(node_id=target.id), timeout=5)
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert target.endpoint in (refused.value.details() or "")

    # WatchEvents on a node that stays
    events: list[pb.Event] = []
    channel = cluster.channel(watcher)
    stream = rpc.ClusterStub(channel).WatchEvents(pb.WatchEventsRequest())
    stream.initial_metadata()  # subscribed: nothing published from here on is missed

    def read() -> None:
        try:
            for event in stream:
                events.append(event)
        except grpc.RpcError:
            pass

    reader = threading.Thread(target=read, daemon=True)
    reader.start()

    # a slow request in flight on the node about to drain
    answer: dict[str, object] = {}

    def slow() -> None:
        try:
            r = httpx.get(f"http://127.0.0.1:{target.http}/slow?ms={SLOW_MS}", timeout=15)
            answer["status"], answer["body"] = r.status_code, r.text.strip()
        except httpx.HTTPError as exc:
            answer["error"] = repr(exc)

    client = threading.Thread(target=slow, daemon=True)
    client.start()
    time.sleep(0.5)  # the request has reached the backend

    try:
        started = time.monotonic()
        out = cluster.ok("nodes", "drain", target.id, via=watcher)  # lbctl finds its control API
        assert f"node {target.id} ({target.endpoint}): draining" in out, out
        for vip in its_vips:
            assert vip in out, out

        def moved_away() -> bool:
            now = cluster.vips(watcher)
            return all(now[v] and now[v] != target.id for v in VIPS)

        eventually(moved_away, f"{target.id}'s VIPs held by the other nodes", timeout=5)
        moved_in = time.monotonic() - started
        assert moved_in < SLOW_MS / 1000, f"VIPs moved only after {moved_in:.2f}s: not released at once"
        eventually(lambda: all(any(e.WhichOneof("event") == "vip_moved" and e.vip_moved.vip == v
                                   and e.vip_moved.new_holder not in ("", target.id) for e in events)
                               for v in its_vips),
                   "VipMoved events on the watch", timeout=5)
        assert any(e.vip_moved.old_holder == target.id for e in events if e.WhichOneof("event") == "vip_moved")
        assert all(e.node_id == watcher.id for e in events)

        client.join(15)
        assert answer == {"status": 200, "body": "slowpoke"}, answer
        assert target.proc.popen.wait(15) == 0, target.proc.log()[-3000:]
        final = cluster.vips(watcher)
        assert sorted(final.values()) != [] and set(final.values()) <= {n.id for n in others}
        assert sorted(final.values()).count(others[0].id) in (1, 2)  # spread over both, none left free

        # lbctl watch prints the move as one line
        line = next(e for e in events if e.WhichOneof("event") == "vip_moved")
        from lbctl.cli import describe_event

        assert f"vip {line.vip_moved.vip} moved " in describe_event(line)
    finally:
        stream.cancel()
        channel.close()
        reader.join(5)
