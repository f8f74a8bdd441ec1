"""Real etcd servers for the integration tests: one member, or a 3-member cluster, on loopback ports.

Owns starting ``etcd`` (quick elections, data under the test's tmp dir), waiting until it
serves, killing and restarting members. Never leaves a process behind: ``etcd_cluster``
kills every member on exit, whatever happened.
"""

from __future__ import annotations

import json
import shutil
import signal
import ssl
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from lbnode.model import ClusterSettings
from tests.conftest import free_port

ETCD = shutil.which("etcd") or "/usr/bin/etcd"
# Elections in about half a second (etcd's defaults are 100 ms / 1 s): kill-a-member tests
# stay short. Lease TTLs of 1 s are then allowed (etcd's minimum is 1.5 x election timeout).
HEARTBEAT_MS = 50
ELECTION_MS = 500


def require_etcd() -> None:
    """`make test` installs etcd (sysdeps-test): its absence fails the test, it is never a skip."""
    if not Path(ETCD).exists():
        pytest.fail("etcd is not installed (Debian package etcd-server): run `make test`, or `make sysdeps-test` first")


@dataclass
class EtcdMember:
    name: str
    client_port: int
    peer_port: int
    data_dir: Path
    log_path: Path
    initial_cluster: str = ""
    # TLS for clients and peers, client certificates required: the directory of
    # `lbctl certs init --etcd-members` (ca.pem, NAME.pem/.key, client.pem/.key).
    tls: Path | None = None
    popen: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def scheme(self) -> str:
        return "http" if self.tls is None else "https"

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.peer_port}"

    @property
    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def start(self) -> None:
        """Start (or restart, keeping the data dir) this member; does not wait for it."""
        assert not self.alive, f"etcd member {self.name} is already running"
        args = [
            ETCD,
            "--name", self.name,
            "--data-dir", str(self.data_dir),
            "--listen-client-urls", self.url,
            "--advertise-client-urls", self.url,
            "--listen-peer-urls", self.peer_url,
            "--initial-advertise-peer-urls", self.peer_url,
            "--initial-cluster", self.initial_cluster,
            "--initial-cluster-state", "new",
            "--initial-cluster-token", "fulcrum-test",
            "--heartbeat-interval", str(HEARTBEAT_MS),
            "--election-timeout", str(ELECTION_MS),
            "--logger", "zap",
            "--log-outputs", "stderr",
            "--log-level", "warn",
        ]
        if self.tls is not None:
            cert, key, ca = (str(self.tls / f) for f in (f"{self.name}.pem", f"{self.name}.key", "ca.pem"))
            args += [
                "--cert-file", cert, "--key-file", key, "--trusted-ca-file", ca, "--client-cert-auth",
                "--peer-cert-file", cert, "--peer-key-file", key, "--peer-trusted-ca-file", ca,
                "--peer-client-cert-auth",
            ]
        log = open(self.log_path, "ab")
        self.popen = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        log.close()

    def kill(self) -> None:
        """SIGKILL: the member dies as in a crash (no goodbye to its peers)."""
        if self.popen is not None and self.popen.poll() is None:
            self.popen.send_signal(signal.SIGKILL)
            self.popen.wait(10)

    def healthy(self) -> bool:
        """etcd's /health: true once the member has a leader and no alarm."""
        context = None
        if self.tls is not None:
            context = ssl.create_default_context(cafile=str(self.tls / "ca.pem"))
            context.load_cert_chain(str(self.tls / "client.pem"), str(self.tls / "client.key"))
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=0.5, context=context) as response:
                return bool(json.loads(response.read()).get("health") == "true")
        except (OSError, ValueError):
            return False

    def wait_healthy(self, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive:
                raise RuntimeError(f"etcd member {self.name} exited:\n{self.log()[-3000:]}")
            if self.healthy():
                return
            time.sleep(0.05)
        raise TimeoutError(f"etcd member {self.name} not healthy after {timeout}s:\n{self.log()[-3000:]}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


@dataclass
class EtcdCluster:
    members: list[EtcdMember]
    tls: Path | None = None  # see EtcdMember.tls

    @property
    def endpoints(self) -> tuple[str, ...]:
        return tuple(m.url for m in self.members)

    def settings(self, prefix: str = "/fulcrum/v1", lease_ttl: float = 2.0, health_checkers: int = 2) -> ClusterSettings:
        files: dict[str, str] = {}
        if self.tls is not None:
            files = {k: str(self.tls / f) for k, f in
                     (("etcd_ca", "ca.pem"), ("etcd_cert", "client.pem"), ("etcd_key", "client.key"))}
        return ClusterSettings(etcd=self.endpoints, lease_ttl=lease_ttl, health_checkers=health_checkers,
                               prefix=prefix, **files)

    def member_at(self, netloc: str) -> EtcdMember:
        """The member serving ``host:port`` (as etcd3's ``Endpoint.netloc`` names it)."""
        for m in self.members:
            if netloc.endswith(f":{m.client_port}"):
                return m
        raise KeyError(netloc)

    def wait_healthy(self, timeout: float = 15.0) -> None:
        for m in self.members:
            if m.alive:
                m.wait_healthy(timeout)

    def kill_all(self) -> None:
        for m in self.members:
            m.kill()


# free_port() hands back a port nothing holds at that moment; another process (any outgoing
# connection's ephemeral port) may take it before etcd binds it. Then we try new ports.
PORT_RACE_ATTEMPTS = 3


@contextmanager
def etcd_cluster(base_dir: Path, size: int = 1, *, tls: bool = False) -> Iterator[EtcdCluster]:
    """``size`` etcd members on free loopback ports, healthy on entry, all killed on exit.

    ``tls``: clients and peers on TLS with client certificates required, certificates from
    ``lbctl certs init --etcd-members`` in ``base_dir/etcd-tls`` (EtcdCluster.tls).
    """
    require_etcd()
    tls_dir = None
    if tls:
        from lbctl.certs import init_etcd_certs

        tls_dir = base_dir / "etcd-tls"
        init_etcd_certs(tls_dir, {f"m{i}": [] for i in range(size)})
    for attempt in range(1, PORT_RACE_ATTEMPTS + 1):
        members = []
        for i in range(size):
            name = f"m{i}"
            data_dir = base_dir / f"etcd-{name}"
            shutil.rmtree(data_dir, ignore_errors=True)  # a member of a failed attempt may have made it
            members.append(
                EtcdMember(
                    name=name,
                    client_port=free_port(),
                    peer_port=free_port(),
                    data_dir=data_dir,
                    log_path=base_dir / f"etcd-{name}.log",
                    tls=tls_dir,
                )
            )
        initial = ",".join(f"{m.name}={m.peer_url}" for m in members)
        cluster = EtcdCluster(members, tls_dir)
        try:
            for m in members:
                m.initial_cluster = initial
                m.start()
            cluster.wait_healthy()
        except RuntimeError:
            cluster.kill_all()
            if attempt < PORT_RACE_ATTEMPTS and any(
                not m.alive and "address already in use" in m.log() for m in members
            ):
                continue  # a port was taken between free_port() and etcd's bind
            raise
        except BaseException:
            cluster.kill_all()
            raise
        try:
            yield cluster
        finally:
            cluster.kill_all()
        return
