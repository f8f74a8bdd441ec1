"""A small LAN in network namespaces for the multi-host tests: one bridge, N node hosts, a client, a backend.

Owns creating and always deleting the namespaces (``{prefix}-lan`` holds the bridge ``br0``;
every other namespace has one ``eth0`` in 10.77.0.0/24 and in the unique-local fd00:77::/64,
plugged into it), the etcd cluster
(one member on each node host, as in production: losing a host loses its member too) and
the processes started inside them. Never touches the root namespace's links or addresses.

    python -m tests.cluster.topology up --nodes 3     # prints the prefix; stays up
    python -m tests.cluster.topology down PREFIX      # deletes what `up` made
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

SUBNET = "10.77.0"
CLIENT_IP = f"{SUBNET}.50"
BACKEND_IP = f"{SUBNET}.60"
# IPv6 on the same LAN (unique-local: inside these namespaces only): each member's address
# ends as its IPv4 address does (10.77.0.11 -> fd00:77::11).
SUBNET6 = "fd00:77:"
# Quick elections (as tests/integration/etcd_helpers.py): a 2 s lease TTL is then allowed.
ETCD_HEARTBEAT_MS = 50
ETCD_ELECTION_MS = 500


def node_ip(i: int) -> str:
    """Node ``i`` (1-based) is 10.77.0.1i."""
    return f"{SUBNET}.{10 + i}"


def ipv6_of(address: str) -> str:
    """The member's IPv6 address from its IPv4 one."""
    return f"{SUBNET6}:{address.rsplit('.', 1)[1]}"


def netns_unavailable() -> str | None:
    """Why these tests cannot run here, or None."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "iproute2 (`ip`) is not installed"
    probe = f"fxprobe-{uuid.uuid4().hex[:6]}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"`ip netns add` fails here: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=10)
    if check and result.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {result.stderr.strip()}")
    return result


@dataclass
class Lan:
    prefix: str
    members: dict[str, str]  # short name ("n1", "cli", "be") -> its address
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def ns(self, member: str) -> str:
        return f"{self.prefix}-{member}"

    @property
    def lan_ns(self) -> str:
        return f"{self.prefix}-lan"

    def spawn(self, member: str, args: Sequence[str], log_path: Path | None = None, **kw: object) -> subprocess.Popen[bytes]:
        """Start ``args`` inside ``member``'s namespace; killed at teardown whatever happens."""
        out = open(log_path, "ab") if log_path is not None else subprocess.DEVNULL
        try:
            proc = subprocess.Popen(["ip", "netns", "exec", self.ns(member), *args],
                                    stdout=kw.pop("stdout", out), stderr=out, stdin=subprocess.DEVNULL, **kw)  # type: ignore[call-overload]
        finally:
            if log_path is not None:
                out.close()
        self.procs.append(proc)
        return proc

    def run(self, member: str, args: Sequence[str], timeout: float = 10,
            input: str | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["ip", "netns", "exec", self.ns(member), *args], capture_output=True, text=True,
                              timeout=timeout, input=input)

    def addresses(self, member: str) -> set[str]:
        """IPv4 and global IPv6 addresses on ``member``'s eth0."""
        out = ip("-n", self.ns(member), "-o", "addr", "show", "dev", "eth0", "scope", "global", check=False).stdout
        return {line.split()[3].split("/")[0] for line in out.splitlines() if " inet" in line}

    def mac(self, member: str) -> str:
        """The MAC address of ``member``'s eth0, as ``ip`` prints it."""
        out = ip("-n", self.ns(member), "-o", "link", "show", "dev", "eth0").stdout
        return out.split("link/ether", 1)[1].split()[0]

    def holders(self, address: str, members: Sequence[str]) -> set[str]:
        return {m for m in members if address in self.addresses(m)}

    def cut(self, member: str) -> None:
        """Unplug ``member`` from the bridge (its own eth0 stays up: it only loses the LAN)."""
        ip("-n", self.lan_ns, "link", "set", f"v-{member}", "down")

    def plug(self, member: str) -> None:
        ip("-n", self.lan_ns, "link", "set", f"v-{member}", "up")

    def host_down(self, member: str) -> None:
        ip("-n", self.ns(member), "link", "set", "eth0", "down")

    def host_up(self, member: str, forget: Sequence[str] = ()) -> None:
        """Back up as after a reboot: addresses in ``forget`` (VIPs) are gone first."""
        for address in forget:
            ip("-n", self.ns(member), "addr", "del", f"{address}/{64 if ':' in address else 24}", "dev", "eth0",
               check=False)
        ip("-n", self.ns(member), "link", "set", "eth0", "up")

    def teardown(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
        for proc in self.procs:
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                pass
        for member in list(self.members) + ["lan"]:
            _delete_ns(self.ns(member))


def _delete_ns(name: str) -> None:
    # anything still running in it was started by us (through Lan.spawn): end it by pid
    pids = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True).stdout.split()
    for pid in pids:
        try:
            os.kill(int(pid), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass
    subprocess.run(["ip", "netns", "del", name], capture_output=True)


def build(prefix: str, n_nodes: int) -> Lan:
    members = {"cli": CLIENT_IP, "be": BACKEND_IP,
               **{f"n{i}": node_ip(i) for i in range(1, n_nodes + 1)}}
    lan = Lan(prefix, members)
    try:
        ip("netns", "add", lan.lan_ns)
        ip("-n", lan.lan_ns, "link", "add", "br0", "type", "bridge")
        ip("-n", lan.lan_ns, "link", "set", "br0", "up")
        for member, address in members.items():
            ns = lan.ns(member)
            ip("netns", "add", ns)
            ip("-n", lan.lan_ns, "link", "add", f"v-{member}", "type", "veth", "peer", "name", "eth0", "netns", ns)
            ip("-n", lan.lan_ns, "link", "set", f"v-{member}", "master", "br0", "up")
            ip("-n", ns, "addr", "add", f"{address}/24", "dev", "eth0")
            # nodad: usable at once (duplicate address detection would hold it a second)
            ip("-n", ns, "addr", "add", f"{ipv6_of(address)}/64", "dev", "eth0", "nodad")
            ip("-n", ns, "link", "set", "eth0", "up")
            ip("-n", ns, "link", "set", "lo", "up")
    except BaseException:
        lan.teardown()
        raise
    return lan


@contextmanager
def lan(n_nodes: int = 3) -> Iterator[Lan]:
    """The LAN, deleted on exit (also after a failure or Ctrl-C)."""
    built = build(f"fx{uuid.uuid4().hex[:6]}", n_nodes)
    try:
        yield built
    finally:
        built.teardown()


def etcd_url(i: int) -> str:
    """The client URL of the etcd member on node host ``i``."""
    return f"http://{node_ip(i)}:2379"


def etcd_endpoints(n_nodes: int, local: int | None = None) -> list[str]:
    """Every member's client URL; host ``local``'s own member first (a node talks to it first)."""
    order = sorted(range(1, n_nodes + 1), key=lambda i: (i != local, i))
    return [etcd_url(i) for i in order]


def etcd_member_args(i: int, n_nodes: int, data_dir: Path) -> list[str]:
    """etcd member ``e{i}`` of a cluster with one member per node host, on that host's address."""
    peers = ",".join(f"e{j}=http://{node_ip(j)}:2380" for j in range(1, n_nodes + 1))
    return [
        shutil.which("etcd") or "/usr/bin/etcd",
        "--name", f"e{i}",
        "--data-dir", str(data_dir),
        "--listen-client-urls", etcd_url(i),
        "--advertise-client-urls", etcd_url(i),
        "--listen-peer-urls", f"http://{node_ip(i)}:2380",
        "--initial-advertise-peer-urls", f"http://{node_ip(i)}:2380",
        "--initial-cluster", peers,
        "--initial-cluster-state", "new",
        "--pre-vote",  # a member back from a partition does not depose the leader (etcd 3.5 default)
        "--heartbeat-interval", str(ETCD_HEARTBEAT_MS),
        "--election-timeout", str(ETCD_ELECTION_MS),
        "--log-level", "warn",
    ]


def start_etcd(lan: Lan, n_nodes: int, base: Path, timeout: float = 20) -> None:
    """One etcd member per node host; returns once the client host finds every member healthy."""
    for i in range(1, n_nodes + 1):
        lan.spawn(f"n{i}", etcd_member_args(i, n_nodes, base / f"etcd-e{i}"), log_path=base / f"etcd-e{i}.log")
    deadline = time.monotonic() + timeout
    for i in range(1, n_nodes + 1):
        while '"true"' not in lan.run("cli", ["curl", "-s", "-m", "0.5", f"{etcd_url(i)}/health"]).stdout:
            if time.monotonic() > deadline:
                logs = "\n".join((base / f"etcd-e{j}.log").read_text(errors="replace")[-1500:]
                                 for j in range(1, n_nodes + 1))
                raise RuntimeError(f"etcd member e{i} never healthy:\n{logs}")
            time.sleep(0.1)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.cluster.topology")
    sub = parser.add_subparsers(dest="cmd", required=True)
    up = sub.add_parser("up")
    up.add_argument("--nodes", type=int, default=3)
    down = sub.add_parser("down")
    down.add_argument("prefix")
    args = parser.parse_args()
    if args.cmd == "up":
        built = build(f"fx{uuid.uuid4().hex[:6]}", args.nodes)
        print(built.prefix)
    else:
        for name in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split("\n"):
            name = name.split(" ")[0]
            if name.startswith(f"{args.prefix}-"):
                _delete_ns(name)


if __name__ == "__main__":
    main()
