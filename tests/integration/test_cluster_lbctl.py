"""The cluster as an operator drives it: real etcd, three real ``lbnode run`` processes with the
control API on mutual TLS (certificates from ``lbctl certs init``), real demo backends, and lbctl
run as a subprocess for every command.

The tests that share one cluster (``cluster`` fixture: 1 etcd member, nodes n1-n3) run in file
order; the one that stops a node comes last among them. The 3-member etcd test has its own.

A listener may name a pool that node.toml does not define (it answers 503 until the pool is
created through the API), and lbctl's refusal of a certificate is one line on stderr.
"""

from __future__ import annotations

import http.client
import json
import math
import os
import signal
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
import httpx
import pytest

from lbnode.api.fulcrum.v1 import control_pb2 as pb
from lbnode.api.fulcrum.v1 import control_pb2_grpc as rpc
from tests.conftest import REPO, Proc, free_port, wait_port
from tests.integration.etcd_helpers import etcd_cluster, require_etcd

TTL = 2.0  # node lease
PROPAGATION = 5.0  # the longest any change may take to reach a node (it takes milliseconds)
NODES = ("n1", "n2", "n3")


# --------------------------------------------------------------------------- processes


class Procs:
    """Processes started for a module-scoped fixture; all killed at its end."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.procs: list[Proc] = []

    def spawn(self, *args: str, name: str) -> Proc:
        log_path = self.directory / f"{name}-{len(self.procs)}.log"
        with open(log_path, "wb") as log:
            env = dict(os.environ, PYTHONUNBUFFERED="1")
            popen = subprocess.Popen([sys.executable, *args], stdout=log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, cwd=self.directory, env=env)
        proc = Proc(popen, log_path)
        self.procs.append(proc)
        return proc

    def kill_all(self) -> None:
        for proc in self.procs:
            if proc.popen.poll() is None:
                proc.popen.kill()
                proc.popen.wait(10)


def lbctl_env(home: Path) -> dict[str, str]:
    """No LBCTL_* variable nor user config file may change what the flags say."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LBCTL_")}
    env["XDG_CONFIG_HOME"] = str(home / "no-config")
    return env


@dataclass
class Certs:
    dir: Path

    def flags(self, ca_from: Path | None = None) -> list[str]:
        return ["--ca", str((ca_from or self.dir) / "ca.pem"), "--cert", str(self.dir / "client.pem"),
                "--key", str(self.dir / "client.key")]


def certs_init(directory: Path) -> Certs:
    done = subprocess.run([sys.executable, "-m", "lbctl.cli", "certs", "init", "--dir", str(directory),
                           "--nodes", ",".join(NODES)], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert done.returncode == 0, done.stderr
    return Certs(directory)


@dataclass
class Node:
    id: str
    http: int
    admin: int
    control: int
    config: Path
    proc: Proc
    late: int | None = None  # the listener on pool "api" (not in node.toml), when lbnode accepts one

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.control}"

    def status(self) -> dict:
        # http.client, not httpx.get: a new httpx client builds an SSL context (tens of ms),
        # which would be measured as propagation time.
        conn = http.client.HTTPConnection("127.0.0.1", self.admin, timeout=2)
        try:
            conn.request("GET", "/status")
            return json.loads(conn.getresponse().read())
        finally:
            conn.close()

    def pool(self, name: str = "web") -> dict | None:
        return next((p for p in self.status()["pools"] if p["name"] == name), None)


@dataclass
class Cluster:
    etcd: object
    certs: Certs
    home: Path
    backends: dict[str, str]  # name -> address
    nodes: list[Node] = field(default_factory=list)
    late_refused: str = ""  # why lbnode refused a listener on a pool that is not in node.toml

    def lbctl(self, *args: str, endpoints: list[Node] | None = None, flags: list[str] | None = None,
              ) -> subprocess.CompletedProcess[str]:
        eps = [a for n in (endpoints or self.nodes[:1]) for a in ("--endpoint", n.endpoint)]
        return subprocess.run(
            [sys.executable, "-m", "lbctl.cli", *eps, *(self.certs.flags() if flags is None else flags), *args],
            capture_output=True, text=True, cwd=REPO, timeout=60, env=lbctl_env(self.home),
        )

    def ok(self, *args: str, endpoints: list[Node] | None = None) -> str:
        done = self.lbctl(*args, endpoints=endpoints)
        assert done.returncode == 0, f"lbctl {' '.join(args)} exited {done.returncode}: {done.stderr}"
        return done.stdout

    def stub(self, node: Node, stub: type) -> tuple[grpc.Channel, object]:
        d = self.certs.dir
        credentials = grpc.ssl_channel_credentials(
            root_certificates=(d / "ca.pem").read_bytes(), private_key=(d / "client.key").read_bytes(),
            certificate_chain=(d / "client.pem").read_bytes(),
        )
        channel = grpc.secure_channel(node.endpoint, credentials)
        return channel, stub(channel)


def _backend(procs: Procs, name: str) -> str:
    port = free_port()
    procs.spawn("-m", "lbnode.demo_backend", "--name", name, "--port", str(port), name=f"backend-{name}")
    return f"127.0.0.1:{port}"


def _node_config(directory: Path, node_id: str, etcd, certs: Certs, web: list[str], *, late: bool) -> tuple[str, dict]:
    ports = {"http": free_port(), "admin": free_port(), "control": free_port(), "late": free_port() if late else None}
    endpoints = ", ".join(f'"{e}"' for e in etcd.endpoints)
    backends = "".join(f'  [[pools.backends]]\n  address = "{a}"\n' for a in web)
    late_listener = (
        f'[[listeners]]\nname = "late"\nprotocol = "http"\nbind = "127.0.0.1:{ports["late"]}"\npool = "api"\n\n'
        if late else ""
    )
    text = f"""
[node]
id = "{node_id}"
admin = "127.0.0.1:{ports['admin']}"
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

{late_listener}[[pools]]
name = "web"
{backends}"""
    return text, ports


def _start_nodes(procs: Procs, directory: Path, etcd, certs: Certs, web: list[str], *, late: bool) -> list[Node]:
    nodes = []
    for node_id in NODES:  # all three start at once, then we wait for them
        text, ports = _node_config(directory, node_id, etcd, certs, web, late=late)
        config = directory / f"{node_id}.toml"
        config.write_text(text)
        proc = procs.spawn("-m", "lbnode.cli", "run", "--config", str(config), name=node_id)
        nodes.append(Node(node_id, ports["http"], ports["admin"], ports["control"], config, proc, ports["late"]))
    for node in nodes:
        for port in (node.http, node.admin, node.control):
            try:
                wait_port(port, timeout=20)
            except TimeoutError:
                raise AssertionError(f"{node.id} did not start:\n{node.proc.log()[-3000:]}") from None
    eventually(lambda: all(n.pool("web") is not None for n in nodes), "every node follows etcd")
    return nodes


def _late_listener_refusal(directory: Path, etcd, certs: Certs) -> str:
    """'' when ``lbnode check`` accepts a listener whose pool is not in node.toml, else its error."""
    text, _ = _node_config(directory, "n1", etcd, certs, ["127.0.0.1:1"], late=True)
    probe = directory / "probe.toml"
    probe.write_text(text)
    done = subprocess.run([sys.executable, "-m", "lbnode.cli", "check", "--config", str(probe)],
                          capture_output=True, text=True, cwd=REPO, timeout=60)
    return "" if done.returncode == 0 else (done.stderr or done.stdout).strip()


def eventually(check, what: str, timeout: float = PROPAGATION) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"not after {timeout:g}s: {what}"
        time.sleep(0.02)


def served(port: int, requests: int = 6) -> set[str]:
    """The backend names (the demo backend's body), or 'status N' for an answer that is not 200."""
    out = set()
    with httpx.Client(timeout=5) as client:
        for _ in range(requests):
            r = client.get(f"http://127.0.0.1:{port}/")
            out.add(r.text.strip() if r.status_code == 200 else f"status {r.status_code}")
    return out


def weight_of(node: Node, backend: str, pool: str = "web") -> int | None:
    p = node.pool(pool)
    if p is None:
        return None
    return next((b["weight"] for b in p["backends"] if b["id"] == backend), None)


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile (p99 of 50 samples is the largest)."""
    return sorted_values[max(0, math.ceil(q / 100 * len(sorted_values)) - 1)]


def refusal(done: subprocess.CompletedProcess[str]) -> tuple[str, list[str]]:
    """lbctl's error line (exit 1, no traceback, nothing on stdout), and any other stderr lines."""
    assert done.returncode == 1, f"exit {done.returncode}: {done.stdout} {done.stderr}"
    assert "Traceback" not in done.stderr and done.stdout == ""
    lines = done.stderr.splitlines()
    assert lines and lines[-1].startswith("lbctl: ") and sum(ln.startswith("lbctl: ") for ln in lines) == 1, lines
    return lines[-1], lines[:-1]


def one_line_refusal(done: subprocess.CompletedProcess[str]) -> str:
    line, others = refusal(done)
    assert others == [], done.stderr
    return line


# --------------------------------------------------------------------------- the shared cluster


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    require_etcd()
    directory = tmp_path_factory.mktemp("cluster-lbctl")
    procs = Procs(directory)
    try:
        with etcd_cluster(directory, size=1) as etcd:
            certs = certs_init(directory / "certs")
            backends = {name: _backend(procs, name) for name in ("a", "b", "c")}
            refused = _late_listener_refusal(directory, etcd, certs)
            for address in backends.values():
                wait_port(int(address.rsplit(":", 1)[1]))
            c = Cluster(etcd, certs, directory, backends, late_refused=refused)
            c.nodes = _start_nodes(procs, directory, etcd, certs, [backends["a"]], late=not refused)
            yield c
    finally:
        procs.kill_all()


def test_a_pool_created_with_lbctl_is_served_by_every_node_503_until_then(cluster: Cluster) -> None:
    a, b = cluster.backends["a"], cluster.backends["b"]
    for node in cluster.nodes:
        assert served(node.http) == {"a"}  # seeded from node.toml
    assert cluster.ok("pools", "delete", "web").strip() == "pool web deleted"
    eventually(lambda: all(served(n.http, 2) == {"status 503"} for n in cluster.nodes),
               "every node answers 503 once the pool is gone")
    body = httpx.get(f"http://127.0.0.1:{cluster.nodes[2].http}/", timeout=5).text
    assert "pool web is not configured" in body

    pool_file = cluster.home / "web.toml"
    pool_file.write_text(f'[[pools]]\nname = "web"\n[[pools.backends]]\naddress = "{a}"\n'
                         f'[[pools.backends]]\naddress = "{b}"\n')
    out = cluster.ok("pools", "create", "-f", str(pool_file))
    assert out.startswith("pool web created (revision ")
    eventually(lambda: all(served(n.http) == {"a", "b"} for n in cluster.nodes),
               "every node serves the created pool over both backends")


def test_a_listener_on_a_pool_not_created_yet_answers_503_until_lbctl_creates_it(cluster: Cluster) -> None:
    assert not cluster.late_refused, f"lbnode refused a listener whose pool is not in node.toml: {cluster.late_refused}"
    c = cluster.backends["c"]
    for node in cluster.nodes:
        assert node.late is not None and served(node.late, 2) == {"status 503"}
    pool_file = cluster.home / "api.toml"
    pool_file.write_text(f'name = "api"\n[[backends]]\naddress = "{c}"\n')
    cluster.ok("pools", "create", "-f", str(pool_file))
    eventually(lambda: all(served(n.late, 4) == {"c"} for n in cluster.nodes),  # type: ignore[arg-type]
               "every node's late listener serves pool api")


def test_propagation_of_50_lbctl_changes_through_node_1(cluster: Cluster) -> None:
    a = cluster.backends["a"]
    delays, commands = [], []
    for i in range(50):
        weight = 2 + i % 2  # alternating, so every command writes
        started = time.monotonic()
        done = cluster.lbctl("backends", "weight", "web", a, str(weight))
        returned = time.monotonic()
        assert done.returncode == 0, done.stderr
        commands.append(returned - started)
        waiting = list(cluster.nodes)
        while waiting:
            waiting = [n for n in waiting if weight_of(n, a) != weight]
            assert time.monotonic() - returned < PROPAGATION, f"{[n.id for n in waiting]} never showed weight {weight}"
            if waiting:
                time.sleep(0.002)
        delays.append(time.monotonic() - returned)
    delays.sort()
    p50, p99 = statistics.median(delays), percentile(delays, 99)
    print(f"\nlbctl -> node 1 -> etcd -> 3 nodes' /status, 50 changes: p50 {p50 * 1000:.0f} ms, "
          f"p99 {p99 * 1000:.0f} ms, max {delays[-1] * 1000:.0f} ms "
          f"(lbctl command itself: median {statistics.median(commands) * 1000:.0f} ms)")
    assert p99 < 0.5


def test_two_updates_from_one_revision_through_two_nodes_one_is_aborted_nothing_lost(cluster: Cluster) -> None:
    n1, n2 = cluster.nodes[0], cluster.nodes[1]
    c = cluster.backends["c"]
    ch1, pools1 = cluster.stub(n1, rpc.PoolsStub)
    ch2, pools2 = cluster.stub(n2, rpc.PoolsStub)
    try:
        read = pools1.GetPool(pb.GetPoolRequest(name="web"), timeout=10)
        first, second = pb.Pool(), pb.Pool()
        first.CopyFrom(read)
        second.CopyFrom(read)
        first.algorithm = "least_connections"  # through node 1
        second.backends.append(pb.Backend(address=c, name="c"))  # through node 2
        barrier = threading.Barrier(2)
        results: dict[str, object] = {}

        def update(label: str, stub, pool: pb.Pool) -> None:
            barrier.wait(5)
            try:
                results[label] = stub.UpdatePool(pb.UpdatePoolRequest(pool=pool, expected_revision=read.revision),
                                                 timeout=10)
            except grpc.RpcError as exc:
                results[label] = exc

        threads = [threading.Thread(target=update, args=("n1", pools1, first)),
                   threading.Thread(target=update, args=("n2", pools2, second))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(15)
        won = [k for k, v in results.items() if isinstance(v, pb.Pool)]
        lost = [k for k, v in results.items() if isinstance(v, grpc.RpcError)]
        assert len(won) == 1 and len(lost) == 1, results
        error = results[lost[0]]
        assert error.code() == grpc.StatusCode.ABORTED  # type: ignore[union-attr]
        assert f"changed since revision {read.revision}" in error.details()  # type: ignore[union-attr]
        assert results[won[0]].revision > read.revision  # type: ignore[union-attr]
        # The loser reads again and re-applies its change: both are kept.
        stub = pools1 if lost[0] == "n1" else pools2
        again = stub.GetPool(pb.GetPoolRequest(name="web"), timeout=10)
        if lost[0] == "n1":
            again.algorithm = "least_connections"
        else:
            again.backends.append(pb.Backend(address=c, name="c"))
        stub.UpdatePool(pb.UpdatePoolRequest(pool=again, expected_revision=again.revision), timeout=10)
    finally:
        ch1.close()
        ch2.close()
    shown = json.loads(cluster.ok("-o", "json", "pools", "show", "web"))
    assert shown["algorithm"] == "least_connections"
    assert {"address": c, "name": "c"} in shown["backends"]

    def everywhere() -> bool:
        pools = [n.pool("web") for n in cluster.nodes]
        return all(p is not None and p["algorithm"] == "least_connections" and "c" in {b["id"] for b in p["backends"]}
                   for p in pools)

    eventually(everywhere, "every node shows both updates")


def test_clients_without_a_cluster_certificate_are_refused(cluster: Cluster, tmp_path: Path) -> None:
    a = cluster.backends["a"]
    before = json.loads(cluster.ok("-o", "json", "pools", "show", "web"))
    other = certs_init(tmp_path / "other-ca")  # a second `certs init`: another CA
    ca = cluster.certs.dir / "ca.pem"
    attempts = {
        "no client certificate": ["--ca", str(ca)],
        "client certificate from another CA": other.flags(ca_from=cluster.certs.dir),
        "everything from another CA": other.flags(),
        "plain text": ["--insecure"],
    }
    extra: dict[str, list[str]] = {}
    for what, flags in attempts.items():
        for args in (("status",), ("backends", "weight", "web", a, "9")):
            err, others = refusal(cluster.lbctl(*args, flags=flags))
            assert err.startswith(f"lbctl: UNAVAILABLE: {cluster.nodes[0].endpoint}: "), f"{what}: {err}"
            if others:
                extra[what] = others
    after = json.loads(cluster.ok("-o", "json", "pools", "show", "web"))
    assert after == before  # no refused write went through
    assert not extra, f"lbctl printed more than its one line: {extra}"


def test_top_sums_the_nodes_and_breaks_each_backend_down_per_node(cluster: Cluster) -> None:
    """`lbctl top` asked of n1 reads every node's Status (through ListNodes' control addresses)."""

    def requests_per_node() -> dict[str, int]:
        snap = json.loads(cluster.ok("-o", "json", "top", "--interval", "0.2"))
        assert snap["nodes"] == list(NODES) and snap["unreachable"] == {}
        (web,) = [p for p in snap["pools"] if p["name"] == "web"]
        per_node: Counter[str] = Counter()
        for backend in web["backends"]:
            assert backend["requests"] == sum(t["requests"] for t in backend["nodes"].values())
            per_node.update({node: t["requests"] for node, t in backend["nodes"].items()})
        assert web["requests"] == sum(per_node.values())  # the pool's line is the sum of its backends
        return dict(per_node)

    before = requests_per_node()
    sent = {"n1": 2, "n2": 4, "n3": 6}
    for node in cluster.nodes:
        assert "status 503" not in served(node.http, sent[node.id])
    after = requests_per_node()
    assert {n: after[n] - before.get(n, 0) for n in after} == sent


def test_nodes_shows_every_node_as_it_describes_itself(cluster: Cluster) -> None:
    """`lbctl nodes` asked of one node shows the others' listeners, health and revision too (each
    asked in turn), not the zeros of their etcd registration."""
    listed = {n["id"]: n for n in json.loads(cluster.ok("-o", "json", "nodes", endpoints=cluster.nodes[1:2]))}
    assert sorted(listed) == list(NODES)
    for node in cluster.nodes:
        got = listed[node.id]
        assert "unreachable" not in got, got
        assert [li["name"] for li in got["listeners"]] and got["health"]["pools"] >= 1, got
        assert any(li["address"].endswith(f":{node.http}") for li in got["listeners"]), got
        assert int(got.get("config_revision", 0)) > 0, got
    text = cluster.ok("nodes", endpoints=cluster.nodes[2:3])
    assert " 0 pools" not in text and "unreachable" not in text, text


def test_lbctl_uses_the_second_endpoint_when_the_first_node_is_stopped(cluster: Cluster) -> None:
    """Stops n1: keep it the last test on the shared cluster."""
    n1, n2, n3 = cluster.nodes
    a = cluster.backends["a"]
    n1.proc.popen.send_signal(signal.SIGTERM)
    assert n1.proc.popen.wait(15) == 0
    done = cluster.lbctl("backends", "weight", "web", a, "7", endpoints=[n1, n2])
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("pool web: backend ")
    status = json.loads(cluster.ok("-o", "json", "status", endpoints=[n1, n2]))
    assert status["node_id"] == "n2"
    eventually(lambda: weight_of(n2, a) == 7 and weight_of(n3, a) == 7, "the change reaches the running nodes")
    # Every endpoint down: one line, exit 1.
    n2.proc.popen.send_signal(signal.SIGTERM)
    assert n2.proc.popen.wait(15) == 0
    err = one_line_refusal(cluster.lbctl("status", endpoints=[n1, n2]))
    assert err.startswith(f"lbctl: UNAVAILABLE: {n1.endpoint}: ") and f"; {n2.endpoint}: " in err


# --------------------------------------------------------------------------- 3 etcd members


def _tcp_peers(pid: int, ports: set[int]) -> Counter[int]:
    """How many established TCP connections ``pid`` holds to each of ``ports`` on loopback."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(int(target[8:-1]))
    found: Counter[int] = Counter()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            if len(f) > 9 and f[3] == "01" and int(f[9]) in inodes:  # 01 = ESTABLISHED
                port = int(f[2].rsplit(":", 1)[1], 16)
                if port in ports:
                    found[port] += 1
    return found


def test_writes_through_lbctl_go_on_when_the_etcd_member_in_use_is_killed(tmp_path: Path) -> None:
    require_etcd()
    with etcd_cluster(tmp_path, size=3) as etcd:
        procs = Procs(tmp_path)
        try:
            certs = certs_init(tmp_path / "certs")
            a = _backend(procs, "a")
            wait_port(int(a.rsplit(":", 1)[1]))
            c = Cluster(etcd, certs, tmp_path, {"a": a})
            c.nodes = _start_nodes(procs, tmp_path, etcd, certs, [a], late=False)
            c.ok("backends", "weight", "web", a, "2")
            eventually(lambda: all(weight_of(n, a) == 2 for n in c.nodes), "the first change")
            client_ports = {m.client_port for m in etcd.members}
            used = _tcp_peers(c.nodes[0].proc.pid, client_ports)
            assert used, "node 1 holds no connection to etcd"
            port = used.most_common(1)[0][0]
            victim = next(m for m in etcd.members if m.client_port == port)
            names = {m.client_port: m.name for m in etcd.members}
            everyone = {n.id: sorted(names[p] for p in _tcp_peers(n.proc.pid, client_ports)) for n in c.nodes}
            victim.kill()
            killed = time.monotonic()
            took = []
            for i in range(10):
                weight = 3 + i % 2
                started = time.monotonic()
                done = c.lbctl("backends", "weight", "web", a, str(weight), endpoints=c.nodes)
                took.append(time.monotonic() - started)
                assert done.returncode == 0, f"write {i} after the kill: {done.stderr}"
            eventually(lambda: all(weight_of(n, a) == 4 for n in c.nodes), "the nodes follow the survivors")
            print(f"\nkilled etcd {victim.name}, node 1's member (members in use: {everyone}); "
                  f"10 lbctl writes after it: first {took[0] * 1000:.0f} ms, "
                  f"max {max(took) * 1000:.0f} ms, all done and seen by 3 nodes "
                  f"{time.monotonic() - killed:.2f} s after the kill")
        finally:
            procs.kill_all()
