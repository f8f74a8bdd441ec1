"""`make soak` (not in CI): a 3-node cluster on loopback under steady load for SOAK_MINUTES, with
a backend restarted, the pool changed and one node restarted every few minutes.

Owns the processes it starts (etcd, demo backends, lbnode; all killed at exit, whatever
happened), the paced client that records every failed request with its node and time, the
planned events with their windows, and the sampler of /proc and etcd's status. The verdicts
are bench/soak_report.py's (pure). Writes bench/results/soak-latest.md. Talks to 127.0.0.1 only.

etcd, the nodes' processes and lbctl's environment come from the integration tests' helpers
(tests/), so the soak starts its cluster exactly as they do.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import dataclasses
import http.client
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from bench.soak_report import (
    EtcdKey,
    EtcdSample,
    FailedRequest,
    NodeLoad,
    PlannedEvent,
    Sample,
    SoakRun,
    classify_fd,
    parse_tcp_sockets,
    render,
    targets_met,
)
from tests.conftest import REPO, Proc, free_port, wait_port
from tests.integration.etcd_helpers import ETCD, EtcdCluster, etcd_cluster
from tests.integration.test_cluster_lbctl import Procs, lbctl_env

HOST = "127.0.0.1"  # the only address the soak talks to
NODES = ("n1", "n2", "n3")
RESTARTED = "n3"  # the node restarted every few minutes; n1 and n2 live the whole soak
BACKENDS = ("a", "b", "c")  # in the pool from the start; each restarted in turn
SPARE = "d"  # added to and removed from the pool by the pool changes
POOL = "web"
RATE = 240.0  # requests/s over the three nodes: steady and moderate on 2 shared cores
WORKERS_PER_NODE = 4  # keep-alive connections per node, each paced at its share of RATE
# A connection is closed after this many requests, so accepts and closes are soaked too
# (a descriptor leaked per connection shows in the fds): about 2.4 new connections/s.
CONNECTION_REQUESTS = 100
REQUEST_TIMEOUT = 5.0  # a request taking longer counts as failed
HEALTH_INTERVAL = 0.1  # [pools.health]: a dead backend is seen down after interval x fall
HEALTH_FALL = 2
DRAIN_TIMEOUT = 2.0  # [node] drain_timeout: a restarted node stops within it
LEASE_TTL = 2.0
BACKEND_DOWN = 2.0  # how long a restarted backend stays down: many health intervals
# Design margin added after every event for 2 cores shared with other work: a health verdict,
# a watch event or a drain may land this much later than on an idle machine.
SLACK = 1.0
# The errors each kind of event may cause by design. A backend dying mid-answer: 502 (a
# request it had not started answering is retried elsewhere); a pool change: 502 for a request
# in flight to a removed backend; a node restart: its clients' connections refused or closed,
# and 503 from the draining node.
BACKEND_ERRORS = frozenset({"status 502", "status 504"})
POOL_ERRORS = frozenset({"status 502"})
NODE_ERRORS = frozenset({"ConnectionRefusedError", "ConnectionResetError", "RemoteDisconnected",
                         "BrokenPipeError", "status 503"})
SAMPLE_EVERY = 10.0  # seconds between samples of /proc and etcd's status
WARMUP_SHARE = 0.10  # the first 10 % of the soak warms up; no event in it, nor in the last 10 %
RESTART_WARMUP = 60.0  # a restarted node's own warm-up (capped by the soak's)
MINUTES_PER_CYCLE = 5.0  # one event of each kind per 5 minutes (at least one of each)
SETTLE_TIMEOUT = 15.0
# A restarted node checks some backends itself and takes the others' state from the cluster's
# verdict, which it reads at start: a backend still "unknown" this long after is reported.
UNKNOWN_GRACE = 3.0  # an event's effect not seen by every node by then fails the soak
RESULTS = REPO / "bench" / "results" / "soak-latest.md"


def log(msg: str) -> None:
    print(f"[soak {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- schedule


def schedule(duration: float, warmup: float) -> list[tuple[float, str]]:
    """(time, kind) of every planned event, evenly spread between the warm-up and the quiet end."""
    cycles = max(1, round(duration / 60 / MINUTES_PER_CYCLE))
    kinds = ["backend restart", "pool change", "node restart"] * cycles
    span = duration - 2 * warmup
    return [(warmup + (i + 0.5) * span / len(kinds), kind) for i, kind in enumerate(kinds)]


def growth_window(duration: float) -> float:
    """Each end of a growth is the median over this long: 5 % of the soak, 20-60 s."""
    return min(60.0, max(20.0, duration * 0.05))


# --------------------------------------------------------------------------- processes


def node_config(node_id: str, ports: dict[str, int], etcd: EtcdCluster, backends: dict[str, int],
                state_dir: Path) -> str:
    endpoints = ", ".join(f'"{e}"' for e in etcd.endpoints)
    pool_backends = "".join(f'  [[pools.backends]]\n  name = "{n}"\n  address = "{HOST}:{backends[n]}"\n'
                            for n in BACKENDS)
    return f"""
[node]
id = "{node_id}"
admin = "{HOST}:{ports['admin']}"
state_dir = "{state_dir}"
drain_timeout = "{DRAIN_TIMEOUT:g}s"
workers = 1

[cluster]
etcd = [{endpoints}]
lease_ttl = "{LEASE_TTL:g}s"

[control]
bind = "{HOST}:{ports['control']}"
insecure = true

[[listeners]]
name = "front"
protocol = "http"
bind = "{HOST}:{ports['http']}"
pool = "{POOL}"

[[pools]]
name = "{POOL}"
  [pools.health]
  type = "http"
  path = "/healthz"
  interval = "{HEALTH_INTERVAL * 1000:g}ms"
  fall = {HEALTH_FALL}
  rise = 1
{pool_backends}"""


@dataclass
class Node:
    id: str
    ports: dict[str, int]
    config: Path
    proc: Proc
    generation: int = 1

    @property
    def label(self) -> str:
        """The process's name in the samples: n3, then n3 #2 after its first restart."""
        return self.id if self.generation == 1 else f"{self.id} #{self.generation}"

    def status(self) -> dict:  # type: ignore[type-arg]
        conn = http.client.HTTPConnection(HOST, self.ports["admin"], timeout=2)
        try:
            conn.request("GET", "/status")
            return json.loads(conn.getresponse().read())  # type: ignore[no-any-return]
        finally:
            conn.close()

    def backends(self) -> dict[str, dict]:  # type: ignore[type-arg]
        """The pool's backends as this node's /status shows them, by id."""
        pool = next((p for p in self.status()["pools"] if p["name"] == POOL), None)
        return {b["id"]: b for b in pool["backends"]} if pool else {}


@dataclass
class Cluster:
    procs: Procs
    etcd: EtcdCluster
    backend_ports: dict[str, int]
    backends: dict[str, Proc] = field(default_factory=dict)
    nodes: dict[str, Node] = field(default_factory=dict)
    # Held while a node's process is swapped, so a sample never names the new process the old way.
    swap: threading.Lock = field(default_factory=threading.Lock)

    def start_backend(self, name: str) -> None:
        port = self.backend_ports[name]
        self.backends[name] = self.procs.spawn("-m", "lbnode.demo_backend", "--name", name, "--port", str(port),
                                               name=f"backend-{name}")
        wait_port(port)

    def start_node(self, node_id: str) -> Node:
        node = self.nodes.get(node_id)
        if node is None:
            ports = {"http": free_port(), "admin": free_port(), "control": free_port()}
            config = self.procs.directory / f"{node_id}.toml"
            config.write_text(node_config(node_id, ports, self.etcd, self.backend_ports,
                                          self.procs.directory / node_id))
            node = Node(node_id, ports, config, self._spawn_node(node_id, config))
            self.nodes[node_id] = node
        else:  # a restart: same ports, same config, a new process
            proc = self._spawn_node(node_id, node.config)
            with self.swap:
                node.proc, node.generation = proc, node.generation + 1
        for port in node.ports.values():
            wait_port(port, timeout=SETTLE_TIMEOUT)
        return node

    def _spawn_node(self, node_id: str, config: Path) -> Proc:
        return self.procs.spawn("-m", "lbnode.cli", "run", "--config", str(config), name=node_id)

    def lbctl(self, *args: str) -> None:
        endpoints = [a for n in self.nodes.values() for a in ("--endpoint", f"{HOST}:{n.ports['control']}")]
        done = subprocess.run([sys.executable, "-m", "lbctl.cli", "--insecure", *endpoints, *args],
                              capture_output=True, text=True, cwd=REPO, timeout=60,
                              env=lbctl_env(self.procs.directory))
        if done.returncode != 0:
            raise RuntimeError(f"lbctl {' '.join(args)} exited {done.returncode}: {done.stderr.strip()}")

    def wait_all(self, check: Callable[[dict[str, dict]], bool], what: str) -> None:  # type: ignore[type-arg]
        """Until every node's pool passes ``check`` (its backends by id)."""
        deadline = time.monotonic() + SETTLE_TIMEOUT
        for node in self.nodes.values():
            while True:
                try:
                    if check(node.backends()):
                        break
                except (OSError, ValueError):
                    pass  # a node starting: its admin port answers a moment later
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{what}: not seen by {node.id} within {SETTLE_TIMEOUT:g} s")
                time.sleep(0.05)


def all_up(names: set[str]) -> Callable[[dict[str, dict]], bool]:  # type: ignore[type-arg]
    return lambda backends: set(backends) == names and all(b["state"] == "up" for b in backends.values())


# --------------------------------------------------------------------------- load


class Client:
    """Keep-alive connections to every node, each paced at its share of the rate (open loop:
    a slow answer does not lower the rate; slots missed by more than one interval are dropped,
    never sent in a burst). Every request that is not a 200 is recorded."""

    def __init__(self, ports: dict[str, int], rate: float, t0: float) -> None:
        self.ports = ports
        self.interval = WORKERS_PER_NODE * len(ports) / rate
        self.t0 = t0
        self.stop = threading.Event()
        self.failures: list[FailedRequest] = []
        self.loads: list[NodeLoad] = []  # one per worker, added up per node at the end
        self.served_by: Counter[str] = Counter()
        self.dropped_slots = 0
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        for node in self.ports:
            for w in range(WORKERS_PER_NODE):
                load = NodeLoad(node)
                self.loads.append(load)
                offset = self.interval * (w + len(self._threads) / (WORKERS_PER_NODE * len(self.ports)))
                t = threading.Thread(target=self._run, args=(node, load, offset), daemon=True,
                                     name=f"soak-{node}-{w}")
                self._threads.append(t)
                t.start()

    def join(self) -> list[NodeLoad]:
        self.stop.set()
        for t in self._threads:
            t.join(REQUEST_TIMEOUT + 5)
        per_node = {n: NodeLoad(n) for n in self.ports}
        for load in self.loads:
            total = per_node[load.node]
            total.sent += load.sent
            total.ok += load.ok
            total.latencies_ms.extend(load.latencies_ms)
        return list(per_node.values())

    def _run(self, node: str, load: NodeLoad, offset: float) -> None:
        conn: http.client.HTTPConnection | None = None
        used = 0
        next_at = time.monotonic() + offset
        while not self.stop.is_set():
            now = time.monotonic()
            if next_at > now:
                if self.stop.wait(next_at - now):
                    break
            elif now - next_at > self.interval:
                self.dropped_slots += int((now - next_at) / self.interval)
                next_at = now
            next_at += self.interval
            if conn is not None and used >= CONNECTION_REQUESTS:
                conn.close()
                conn = None
            if conn is None:
                conn, used = http.client.HTTPConnection(HOST, self.ports[node], timeout=REQUEST_TIMEOUT), 0
            conn = self._request(conn, node, load)
            used += 1

    def _request(self, conn: http.client.HTTPConnection, node: str,
                 load: NodeLoad) -> http.client.HTTPConnection | None:
        """One GET; the connection to reuse, or None when it must be opened again."""
        sent = time.monotonic()
        load.sent += 1
        try:
            conn.request("GET", "/", headers={"Host": "soak"})
            response = conn.getresponse()
            body = response.read()
        except (OSError, http.client.HTTPException) as exc:
            conn.close()
            self.failures.append(FailedRequest(sent - self.t0, time.monotonic() - self.t0, node,
                                               f"{type(exc).__name__}: {exc}"))
            return None
        done = time.monotonic()
        if response.status != 200:
            self.failures.append(FailedRequest(sent - self.t0, done - self.t0, node,
                                               f"status {response.status}: {body[:80]!r}"))
        else:
            load.ok += 1
            load.latencies_ms.append((done - sent) * 1000)
            self.served_by[body.decode(errors="replace").strip()] += 1
        if response.will_close:
            conn.close()
            return None
        return conn


# --------------------------------------------------------------------------- sampling


def rss_and_fds(pid: int) -> tuple[int, list[str]] | None:
    """VmRSS (bytes) and the open descriptors' links of a live process, from /proc."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        links = []
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):  # closed meanwhile
                links.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
    except OSError:
        return None  # it just exited
    rss = next((int(line.split()[1]) * 1024 for line in status.splitlines() if line.startswith("VmRSS:")), None)
    return None if rss is None else (rss, links)


def tcp_sockets() -> dict[int, tuple[int, int, str]]:
    out: dict[int, tuple[int, int, str]] = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            out.update(parse_tcp_sockets(Path(table).read_text()))
    return out


def etcd_keys(url: str) -> list[EtcdKey]:
    """Every key in etcd with its version and revisions (gRPC gateway range over all keys)."""
    body = json.dumps({"key": base64.b64encode(b"\0").decode(), "range_end": base64.b64encode(b"\0").decode(),
                       "keys_only": True}).encode()
    request = urllib.request.Request(f"{url}/v3/kv/range", data=body, method="POST")
    with urllib.request.urlopen(request, timeout=5) as response:
        doc = json.loads(response.read())
    return [EtcdKey(base64.b64decode(kv["key"]).decode(errors="replace"), int(kv.get("version", 0)),
                    int(kv.get("create_revision", 0)), int(kv.get("mod_revision", 0))) for kv in doc.get("kvs", [])]


def etcd_status(url: str) -> tuple[int, int, int] | None:
    """Revision, db size and db size in use from etcd's gRPC gateway (maintenance status)."""
    request = urllib.request.Request(f"{url}/v3/maintenance/status", data=b"{}", method="POST")
    try:
        with urllib.request.urlopen(request, timeout=2) as response:
            doc = json.loads(response.read())
    except (OSError, ValueError):
        return None
    return int(doc["header"]["revision"]), int(doc["dbSize"]), int(doc.get("dbSizeInUse", 0))


class Sampler:
    """Every SAMPLE_EVERY seconds: each lbnode process and etcd from /proc, and etcd's status."""

    def __init__(self, cluster: Cluster, t0: float) -> None:
        self.cluster = cluster
        self.t0 = t0
        self.samples: list[Sample] = []
        self.etcd: list[EtcdSample] = []
        self.stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="soak-sampler")

    def start(self) -> None:
        self._thread.start()

    def join(self) -> None:
        self.stop.set()
        self._thread.join(10)
        self.sample()  # the last one, at the very end

    def _run(self) -> None:
        while not self.stop.wait(SAMPLE_EVERY):
            self.sample()

    def sample(self) -> None:
        t = time.monotonic() - self.t0
        c = self.cluster
        member = c.etcd.members[0]
        with c.swap:
            procs = [(n.label, n.proc.pid, n) for n in list(c.nodes.values()) if n.proc.popen.poll() is None]
        sockets = tcp_sockets()
        # Remote ports, by what they are: every node's admin and control, the backends, etcd.
        reached = {n.ports[k]: "other nodes" for n in c.nodes.values() for k in ("admin", "control")}
        reached |= {port: "backends" for port in c.backend_ports.values()} | {member.client_port: "etcd"}
        for label, pid, node in procs:
            got = rss_and_fds(pid)
            if got is None:
                continue
            served = {node.ports["http"]: "clients", node.ports["admin"]: "admin clients",
                      node.ports["control"]: "control API clients"}
            kinds = Counter(classify_fd(link, sockets, served, reached) for link in got[1])
            self.samples.append(Sample(t, label, got[0], len(got[1]), dict(kinds)))
        if member.popen is not None and (got := rss_and_fds(member.popen.pid)) is not None:
            self.samples.append(Sample(t, "etcd", got[0], len(got[1])))
        status = etcd_status(member.url)
        if status is not None:
            self.etcd.append(EtcdSample(t, *status))


# --------------------------------------------------------------------------- events


class Events:
    """The planned events, each logged with its window: what the client may see it cause."""

    def __init__(self, cluster: Cluster, t0: float) -> None:
        self.cluster = cluster
        self.t0 = t0
        self.done: list[PlannedEvent] = []
        self.warmed_at: dict[str, float] = {}  # restarted processes: the end of their own warm-up
        self.unsettled: list[str] = []
        self.restart_warmup = RESTART_WARMUP
        self._backend_turn = 0
        self._pool_turn = 0

    def now(self) -> float:
        return time.monotonic() - self.t0

    def run(self, kind: str) -> PlannedEvent:
        """Do one event. One that does not settle (a node never sees the change) is recorded
        as such, for the verdict, and the soak goes on."""
        start = self.now()
        try:
            event = {"backend restart": self.restart_backend, "pool change": self.change_pool,
                     "node restart": self.restart_node}[kind]()
        except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
            event = PlannedEvent(kind, f"did not settle: {exc}", start, self.now(), SLACK, frozenset(self.cluster.nodes))
            self.unsettled.append(f"{kind} at {start:.0f} s: {exc}")
        self.done.append(event)
        log(f"{event.kind}: {event.what}, {event.start:.1f}-{event.end:.1f} s")
        return event

    def restart_backend(self) -> PlannedEvent:
        """Stop a backend (SIGTERM), leave it down for many health intervals, start it again;
        over once every node has it up."""
        name = BACKENDS[self._backend_turn % len(BACKENDS)]
        self._backend_turn += 1
        c = self.cluster
        start = self.now()
        c.backends[name].terminate()
        time.sleep(BACKEND_DOWN)
        c.start_backend(name)
        c.wait_all(lambda bs: name in bs and bs[name]["state"] == "up", f"backend {name} up again")
        return PlannedEvent("backend restart", f"backend {name}", start, self.now(),
                            HEALTH_INTERVAL * HEALTH_FALL + SLACK, frozenset(c.nodes), frozenset({name}),
                            BACKEND_ERRORS)

    def change_pool(self) -> PlannedEvent:
        """lbctl, in turn: add the spare backend, remove it, weight 3 on a, weight 1 on a; over
        once every node's /status shows it. Each pair restores the pool, so a soak with an even
        number of changes (30 minutes: 6) ends with the pool and its connections as they began."""
        turn = self._pool_turn % 4
        self._pool_turn += 1
        c = self.cluster
        start = self.now()
        if turn == 0:
            what, touched = f"add backend {SPARE}", SPARE
            c.lbctl("backends", "add", POOL, f"{HOST}:{c.backend_ports[SPARE]}", "--name", SPARE)
            c.wait_all(lambda bs: SPARE in bs, what)
        elif turn == 1:
            what, touched = f"remove backend {SPARE}", SPARE
            c.lbctl("backends", "remove", POOL, SPARE)
            c.wait_all(lambda bs: SPARE not in bs, what)
        else:
            weight = 3 if turn == 2 else 1
            what, touched = f"weight {weight} on backend {BACKENDS[0]}", BACKENDS[0]
            c.lbctl("backends", "weight", POOL, BACKENDS[0], str(weight))
            c.wait_all(lambda bs: bs[BACKENDS[0]]["weight"] == weight, what)
        return PlannedEvent("pool change", what, start, self.now(), SLACK, frozenset(c.nodes), frozenset({touched}),
                            POOL_ERRORS)

    def restart_node(self) -> PlannedEvent:
        """SIGTERM the node (it drains), start it again on the same ports; over once it serves
        the pool as the others do with no backend down. Only that node's clients may see it.

        A backend still "unknown" on it (it serves one, awaiting a verdict) once the others
        agree is named in the event: the node missed a verdict."""
        c = self.cluster
        node = c.nodes[RESTARTED]
        start = self.now()
        code = node.proc.terminate(timeout=DRAIN_TIMEOUT + SETTLE_TIMEOUT)
        what = f"node {RESTARTED}" + ("" if code == 0 else f" (exited {code} on SIGTERM)")
        c.start_node(RESTARTED)
        expected = set(c.nodes["n1"].backends())  # the pool as the nodes that stayed up serve it
        c.wait_all(lambda bs: set(bs) == expected and all(b["state"] != "down" for b in bs.values()),
                   f"node {RESTARTED} back with the pool of the others")
        end = self.now()
        time.sleep(UNKNOWN_GRACE)
        unknown = sorted(i for i, b in node.backends().items() if b["state"] == "unknown")
        if unknown:
            what += f"; still unknown on {RESTARTED} {UNKNOWN_GRACE:g} s later: backend {', '.join(unknown)}"
        self.warmed_at[node.label] = end + self.restart_warmup
        return PlannedEvent("node restart", what, start, end, SLACK, frozenset({RESTARTED}), errors=NODE_ERRORS)


# --------------------------------------------------------------------------- the soak


def run_soak(minutes: float, rate: float, directory: Path) -> SoakRun:
    duration = minutes * 60
    warmup = duration * WARMUP_SHARE
    wall_clock = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    load_start = os.getloadavg()
    procs = Procs(directory)
    with etcd_cluster(directory, size=1) as etcd:
        try:
            return _run(minutes, rate, duration, warmup, procs, etcd, wall_clock, load_start)
        finally:
            procs.kill_all()


def _run(minutes: float, rate: float, duration: float, warmup: float, procs: Procs, etcd: EtcdCluster,
         wall_clock: str, load_start: tuple[float, float, float]) -> SoakRun:
    cluster = Cluster(procs, etcd, {n: free_port() for n in (*BACKENDS, SPARE)})
    for name in (*BACKENDS, SPARE):
        cluster.start_backend(name)
    for node_id in NODES:
        cluster.start_node(node_id)
    cluster.wait_all(all_up(set(BACKENDS)), "the pool with every backend up")
    log(f"cluster up: etcd {etcd.endpoints[0]}, nodes "
        + ", ".join(f"{n.id} :{n.ports['http']}" for n in cluster.nodes.values()))

    t0 = time.monotonic()
    client = Client({n.id: n.ports["http"] for n in cluster.nodes.values()}, rate, t0)
    sampler = Sampler(cluster, t0)
    events = Events(cluster, t0)
    events.restart_warmup = min(warmup, RESTART_WARMUP)
    sampler.sample()
    client.start()
    sampler.start()
    try:
        for at, kind in schedule(duration, warmup):
            pause = at - events.now()
            if pause > 0:
                time.sleep(pause)
            events.run(kind)
        time.sleep(max(0.0, duration - events.now()))
    finally:
        sampler.join()  # its last sample while the client still runs: like the others
        loads = client.join()
    keys = etcd_keys(etcd.members[0].url)
    exits = {n.id: _stop(n.proc) for n in cluster.nodes.values()}
    log(f"done: {sum(x.sent for x in loads):,} requests, {len(client.failures)} failed; node exits {exits}")

    warmed_at = {n: warmup for n in (*NODES, "etcd")} | events.warmed_at
    # The target is judged on the nodes that lived the whole soak. A process of the restarted
    # node lives a few minutes, its windows straddle pool changes (a backend more or less is a
    # descriptor more or less): shown, not judged.
    lbnode_processes = frozenset(n for n in NODES if n != RESTARTED)
    load_end = os.getloadavg()
    setup = [
        f"Fulcrum: git {_git_head()}",
        f"host: {os.cpu_count()} CPUs, Linux {platform.release()}, Python {platform.python_version()}; "
        f"load average at start {' '.join(f'{x:.2f}' for x in load_start)}, at end "
        f"{' '.join(f'{x:.2f}' for x in load_end)} (other work on the machine shares its cores)",
        f"cluster: one etcd ({_etcd_version()}), nodes {', '.join(NODES)} (lbnode processes; "
        f"{RESTARTED} is the one restarted), control API and lbctl in plain text; pool `{POOL}` with "
        f"demo backends {', '.join(BACKENDS)} (+ {SPARE} added and removed), health checks every "
        f"{HEALTH_INTERVAL * 1000:g} ms, fall {HEALTH_FALL}; drain_timeout {DRAIN_TIMEOUT:g} s; lease TTL {LEASE_TTL:g} s",
        f"client: {WORKERS_PER_NODE} keep-alive connections per node (http.client, one thread each), "
        f"GET /, {REQUEST_TIMEOUT:g} s timeout, no retries; "
        f"{client.dropped_slots} slots dropped because the client fell behind",
        "responses per backend: " + ", ".join(f"{k} {v:,}" for k, v in sorted(client.served_by.items())),
        "node exit codes on the final SIGTERM: " + ", ".join(f"{k} {v}" for k, v in exits.items()),
    ]
    return SoakRun(minutes=minutes, rate=rate, warmup=warmup, window=growth_window(duration), loads=loads,
                   events=events.done, failures=sorted(client.failures, key=lambda f: f.sent),
                   samples=sampler.samples, warmed_at=warmed_at, etcd=sampler.etcd, setup=setup,
                   wall_clock=wall_clock, lbnode_processes=lbnode_processes, etcd_keys=keys,
                   unsettled=events.unsettled,
                   notes=[log_tally(p) for p in procs.procs if p.log_path.name.startswith(NODES)])


def log_tally(proc: Proc) -> str:
    """A node process's log in one line: its WARNING and ERROR lines by logger, tracebacks."""
    counts: Counter[str] = Counter()
    for line in proc.log().splitlines():
        parts = line.split()
        if len(parts) > 3 and parts[2] in ("WARNING", "ERROR", "CRITICAL"):
            counts[f"{parts[2]} {parts[3].rstrip(':')}"] += 1
        elif line.startswith("Traceback"):
            counts["Traceback"] += 1
    tally = ", ".join(f"{k} x{v}" for k, v in sorted(counts.items())) or "nothing at WARNING or above"
    return f"log of {proc.log_path.stem}: {tally}"


def _stop(proc: Proc) -> str:
    """SIGTERM and the exit code; a node still running after its drain is reported, then killed."""
    try:
        return str(proc.terminate(timeout=DRAIN_TIMEOUT + SETTLE_TIMEOUT))
    except subprocess.TimeoutExpired:
        return f"still running {DRAIN_TIMEOUT + SETTLE_TIMEOUT:g} s after SIGTERM"


def _git_head() -> str:
    try:
        done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=REPO, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, cwd=REPO, timeout=10).stdout.strip()
    except OSError:
        return "unknown"
    return done.stdout.strip() + (" (with uncommitted changes)" if dirty else "")


def _etcd_version() -> str:
    try:
        out = subprocess.run([ETCD, "--version"], capture_output=True, text=True, timeout=10).stdout
    except OSError:
        return "etcd"
    return out.splitlines()[0] if out else "etcd"


def load_run(doc: dict) -> SoakRun:  # type: ignore[type-arg]
    """A SoakRun back from its soak-run.json (dataclasses.asdict of it)."""
    def event(e: dict) -> PlannedEvent:  # type: ignore[type-arg]
        backends, errors = e.pop("backends"), e.pop("errors", None)
        return PlannedEvent(**{**e, "nodes": frozenset(e["nodes"])},
                            backends=None if backends is None else frozenset(backends),
                            errors=None if errors is None else frozenset(errors))

    return SoakRun(**{
        **doc,
        "loads": [NodeLoad(**x) for x in doc["loads"]],
        "events": [event(e) for e in doc["events"]],
        "failures": [FailedRequest(**f) for f in doc["failures"]],
        "samples": [Sample(**x) for x in doc["samples"]],
        "etcd": [EtcdSample(**x) for x in doc["etcd"]],
        "etcd_keys": [EtcdKey(**x) for x in doc.get("etcd_keys", [])],
        "lbnode_processes": frozenset(doc["lbnode_processes"]),
    })


def _sigterm_as_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # so every `finally` runs and no process outlives the soak


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=float(os.environ.get("SOAK_MINUTES", "30")),
                        help="length of the soak (default: $SOAK_MINUTES, else 30)")
    parser.add_argument("--rate", type=float, default=RATE, help=f"requests/s over all nodes (default {RATE:g})")
    parser.add_argument("--output", type=Path, default=RESULTS, help=f"the report (default {RESULTS})")
    parser.add_argument("--keep", action="store_true",
                        help="keep the directory of logs and data (kept anyway when a target is not met)")
    parser.add_argument("--from-json", type=Path, help="render the soak-run.json of an earlier soak, run nothing")
    args = parser.parse_args(argv)
    if args.from_json:
        run = load_run(json.loads(args.from_json.read_text()))
    else:
        if not Path(ETCD).exists():
            print("etcd is not installed (Debian package etcd-server): run `make sysdeps-test`", file=sys.stderr)
            return 2
        run = _soak_keeping_logs(args.minutes, args.rate, args.keep)
    report = render(run)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(report)
    print(report)
    return 0 if targets_met(run) else 1


def _soak_keeping_logs(minutes: float, rate: float, keep: bool) -> SoakRun:
    """The soak in a new directory, removed after it unless ``keep`` or a target is not met
    (or it failed): the logs are then what explains the report."""
    signal.signal(signal.SIGTERM, _sigterm_as_interrupt)
    directory = Path(tempfile.mkdtemp(prefix="fulcrum-soak-"))
    log(f"{minutes:g} minutes at {rate:g} requests/s; logs in {directory}")
    ok = False
    try:
        run = run_soak(minutes, rate, directory)
        # The raw record: the report can be rendered again from it (--from-json).
        (directory / "soak-run.json").write_text(json.dumps(dataclasses.asdict(run), default=sorted))
        ok = targets_met(run)
    finally:
        if ok and not keep:
            shutil.rmtree(directory, ignore_errors=True)
        else:
            log(f"logs kept in {directory}")
    return run


if __name__ == "__main__":
    sys.exit(main())
