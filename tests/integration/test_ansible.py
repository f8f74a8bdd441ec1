"""deploy/ansible for real: ``ansible-playbook site.yml`` against three hosts on this machine.

Each host (n1-n3) is ``ansible_connection=local`` with its own root dir under tmp_path (config,
data, pid and log dirs) and its own loopback ports, and uses the roles' ``pidfile`` service
manager (start-stop-daemon), so no systemd is needed. The role installs Fulcrum from this
checkout into n1's own venv; n2 and n3 share this test's venv (``lbnode_venv_install: false``):
three installs would take three times as long.
Every process the playbook started is found through its pid file and stopped at the end.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.conftest import REPO, free_port, wait_port
from tests.integration.etcd_helpers import ETCD, require_etcd

PLAYBOOK_DIR = REPO / "deploy" / "ansible"
HOSTS = ("n1", "n2", "n3")
VENV_BIN = Path(sys.executable).parent
ANSIBLE_PLAYBOOK = shutil.which(
    "ansible-playbook", path=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}"
)
ANSIBLE_LINT = shutil.which(
    "ansible-lint", path=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}"
)
PLAYBOOK_TIMEOUT = 180  # one run takes ~15-30 s; a hung task must not hang the suite


@dataclass
class Host:
    name: str
    root: Path
    etcd_client: int
    etcd_peer: int
    http: int
    admin: int
    control: int
    install: bool = False  # the role installs Fulcrum into this host's own venv

    @property
    def control_endpoint(self) -> str:
        return f"127.0.0.1:{self.control}"

    @property
    def certs(self) -> Path:
        """Where the playbook put this node's certificates."""
        return self.root / "etc" / "fulcrum" / "certs"

    def host_vars(self) -> dict[str, object]:
        r = self.root
        return {
            "ansible_host": "127.0.0.1",
            "etcd_client_port": self.etcd_client,
            "etcd_peer_port": self.etcd_peer,
            "etcd_config_dir": str(r / "etc" / "etcd"),
            "etcd_data_dir": str(r / "var" / "lib" / "etcd"),
            "etcd_run_dir": str(r / "run"),
            "etcd_log_dir": str(r / "log"),
            "lbnode_config_dir": str(r / "etc" / "fulcrum"),
            "lbnode_state_dir": str(r / "var" / "lib" / "fulcrum"),
            "lbnode_run_dir": str(r / "run"),
            "lbnode_log_dir": str(r / "log"),
            "lbnode_admin": f"127.0.0.1:{self.admin}",
            "lbnode_control_bind": f"127.0.0.1:{self.control}",
            "lbnode_listeners": [
                {
                    "name": "web",
                    "protocol": "http",
                    "bind": f"127.0.0.1:{self.http}",
                    "pool": "web",
                    "timeouts": {"idle": "30s"},
                }
            ],
        } | (
            {
                "lbnode_venv_install": True,
                "lbnode_venv": str(self.own_venv),
                "lbnode_source": str(REPO),
            }
            if self.install
            else {}
        )

    @property
    def own_venv(self) -> Path:
        return self.root / "opt" / "fulcrum" / "venv"


@dataclass
class Deployment:
    tmp: Path
    hosts: list[Host]
    backends: dict[str, str]  # name -> address
    certs_dir: Path  # on the "controller"
    first_run: subprocess.CompletedProcess[str] | None = None

    def inventory(self) -> Path:
        common = {
            "ansible_connection": "local",
            "ansible_python_interpreter": sys.executable,
            # the service manager without systemd; processes run as this test's user
            "etcd_service_manager": "pidfile",
            "lbnode_service_manager": "pidfile",
            "etcd_install_package": False,
            "etcd_binary": ETCD,
            "etcd_user": "root",
            "etcd_group": "root",
            # quick elections: the cluster forms in about a second
            "etcd_heartbeat_interval": 50,
            "etcd_election_timeout": 500,
            "lbnode_venv_install": False,
            "lbnode_venv": str(VENV_BIN.parent),
            "lbnode_create_user": False,
            "lbnode_user": "root",
            "lbnode_group": "root",
            "lbnode_drain_timeout": 1,
            "lbnode_lease_ttl": "2s",
            "lbnode_certs_dir": str(self.certs_dir),
            "lbnode_certs_lbctl": str(VENV_BIN / "lbctl"),
            "lbnode_pools": [
                {
                    "name": "web",
                    "retries": 2,
                    "timeouts": {"connect": "1s"},
                    "health": {"type": "http", "path": "/", "interval": "1s"},
                    "backends": [{"address": a, "name": n} for n, a in self.backends.items()],
                }
            ],
        }
        hosts = {h.name: h.host_vars() for h in self.hosts}
        inventory = {
            "all": {
                "vars": common,
                "children": {
                    "etcd": {"hosts": hosts},
                    "lbnode": {"hosts": {h.name: {} for h in self.hosts}},
                },
            }
        }
        path = self.tmp / "inventory.yml"
        path.write_text(json.dumps(inventory, indent=1))  # JSON is YAML
        return path

    def playbook(self, name: str = "site.yml") -> subprocess.CompletedProcess[str]:
        env = dict(
            os.environ,
            ANSIBLE_HOME=str(self.tmp / "ansible-home"),
            ANSIBLE_LOCAL_TEMP=str(self.tmp / "ansible-tmp"),
            ANSIBLE_NOCOLOR="1",
            ANSIBLE_RETRY_FILES_ENABLED="0",
            PYTHONUNBUFFERED="1",
        )
        env.pop("ANSIBLE_CONFIG", None)
        done = subprocess.run(
            [ANSIBLE_PLAYBOOK, "-i", str(self.inventory()), str(PLAYBOOK_DIR / name)],
            capture_output=True,
            text=True,
            cwd=self.tmp,
            env=env,
            timeout=PLAYBOOK_TIMEOUT,
        )
        with (self.tmp / "playbook.log").open("a") as log:
            log.write(done.stdout + done.stderr)
        assert done.returncode == 0, (
            f"ansible-playbook exited {done.returncode}:\n{done.stdout[-6000:]}\n{done.stderr[-3000:]}\n{self.logs()}"
        )
        return done

    def lbctl(self, *args: str, via: Host) -> object:
        flags = [
            "--ca",
            str(via.certs / "ca.pem"),
            "--cert",
            str(self.certs_dir / "client.pem"),
            "--key",
            str(self.certs_dir / "client.key"),
        ]
        env = {k: v for k, v in os.environ.items() if not k.startswith("LBCTL_")}
        env["XDG_CONFIG_HOME"] = str(self.tmp / "no-config")
        done = subprocess.run(
            [
                str(VENV_BIN / "lbctl"),
                "--endpoint",
                via.control_endpoint,
                *flags,
                "-o",
                "json",
                *args,
            ],
            capture_output=True,
            text=True,
            timeout=60,
            env=env,
        )
        assert done.returncode == 0, f"lbctl {' '.join(args)} via {via.name}: {done.stderr}"
        return json.loads(done.stdout)

    def pids(self) -> dict[str, int]:
        """The processes the playbook started, by pid file (relative to tmp)."""
        return {
            str(p.relative_to(self.tmp)): int(p.read_text().strip() or 0)
            for p in sorted(self.tmp.glob("n*/run/*.pid"))
        }

    def logs(self) -> str:
        return "\n".join(
            f"--- {p.relative_to(self.tmp)}\n{p.read_text(errors='replace')[-2000:]}"
            for p in sorted(self.tmp.glob("n*/log/*.log"))
        )


def recap(output: str) -> dict[str, dict[str, int]]:
    """PLAY RECAP counters per host: {'n1': {'ok': 12, 'changed': 0, ...}}."""
    out = {}
    for line in output.split("PLAY RECAP", 1)[1].splitlines():
        m = re.match(r"^(\S+)\s+:\s+(.*)$", line.strip())
        if m:
            out[m.group(1)] = {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", m.group(2))}
    return out


def served(port: int, requests: int = 8) -> set[str]:
    """The backend names (the demo backend's body), or 'status N' for an answer that is not 200."""
    out = set()
    with httpx.Client(timeout=5) as client:
        for _ in range(requests):
            r = client.get(f"http://127.0.0.1:{port}/")
            out.add(r.text.strip() if r.status_code == 200 else f"status {r.status_code}")
    return out


def eventually(check: Callable[[], bool], what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"not after {timeout:g}s: {what}"
        time.sleep(0.1)


def _stop_by_pid_files(tmp: Path) -> None:
    """Stop every process whose pid file the playbook wrote under tmp: the nodes, then etcd
    (a node stopping while etcd is up leaves the cluster cleanly, and quickly). etcd gets
    SIGKILL: its data is thrown away, and members stopped gracefully all at once spend ~6 s
    trying to hand leadership to each other."""
    _stop(tmp, "n*/run/lbnode.pid", signal.SIGTERM)
    _stop(tmp, "n*/run/*.pid", signal.SIGKILL)


def _stop(tmp: Path, pattern: str, sig: signal.Signals) -> None:
    """Send sig, then SIGKILL after 10 s, to the processes of the pid files matching pattern.

    Only a process whose command line names tmp is signalled: a stale pid file must not
    kill an unrelated process that got the same pid.
    """
    pids = []
    for pid_file in tmp.glob(pattern):
        try:
            pid = int(pid_file.read_text().strip())
            cmdline = _cmdline(pid)
        except (OSError, ValueError):
            continue
        if str(tmp) in cmdline:
            os.kill(pid, sig)
            pids.append(pid)
    deadline = time.monotonic() + 10
    for pid in pids:
        while _running(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if _running(pid):
            os.kill(pid, signal.SIGKILL)


def _cmdline(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")


def _running(pid: int) -> bool:
    """Alive and not a zombie (the playbook's processes are daemons: init reaps them)."""
    try:
        return not Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[-1].startswith("Z")
    except OSError:
        return False


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    if ANSIBLE_PLAYBOOK is None:
        pytest.skip("ansible-playbook is not installed (pip install ansible-core)")
    require_etcd()
    tmp = tmp_path_factory.mktemp("ansible")
    backends: list[subprocess.Popen[bytes]] = []
    try:
        addresses = {}
        for name in ("a", "b"):
            port = free_port()
            with open(tmp / f"backend-{name}.log", "wb") as log:
                backends.append(
                    subprocess.Popen(
                        [
                            sys.executable,
                            "-m",
                            "lbnode.demo_backend",
                            "--name",
                            name,
                            "--port",
                            str(port),
                        ],
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        stdin=subprocess.DEVNULL,
                        cwd=tmp,
                    )
                )
            addresses[name] = f"127.0.0.1:{port}"
        for address in addresses.values():
            wait_port(int(address.rsplit(":", 1)[1]))
        hosts = [
            Host(
                name,
                tmp / name,
                free_port(),
                free_port(),
                free_port(),
                free_port(),
                free_port(),
                install=name == "n1",
            )
            for name in HOSTS
        ]
        d = Deployment(tmp, hosts, addresses, tmp / "controller-certs")
        d.first_run = d.playbook()
        yield d
    finally:
        _stop_by_pid_files(tmp)
        for popen in backends:
            popen.kill()
            popen.wait(10)


def test_the_playbook_runs_three_etcd_members_and_three_nodes(deployment: Deployment) -> None:
    counters = recap(deployment.first_run.stdout)  # type: ignore[union-attr]
    assert set(counters) >= set(HOSTS), counters
    assert all(c["failed"] == 0 and c["unreachable"] == 0 for c in counters.values()), counters
    pids = deployment.pids()
    assert sorted(pids) == sorted(
        f"{h}/run/{svc}.pid" for h in HOSTS for svc in ("etcd-fulcrum", "lbnode")
    ), pids
    assert all(Path(f"/proc/{pid}").exists() for pid in pids.values()), pids
    for host in HOSTS:  # started once: the handlers run before the start tasks, not after
        assert "SIGTERM" not in (deployment.tmp / host / "log" / "lbnode.log").read_text()


def test_the_role_installs_fulcrum_into_a_venv_and_the_node_runs_from_it(
    deployment: Deployment,
) -> None:
    n1, n2 = deployment.hosts[:2]
    assert n1.install and (n1.own_venv / "bin" / "lbnode").exists()
    assert f"{n1.own_venv}/bin/lbnode" in _cmdline(deployment.pids()["n1/run/lbnode.pid"])
    shared = f"{VENV_BIN}/lbnode"  # lbnode_venv_install: false
    assert shared in _cmdline(deployment.pids()["n2/run/lbnode.pid"])


def test_the_certificates_are_distributed_without_the_ca_key(deployment: Deployment) -> None:
    ca = (deployment.certs_dir / "ca.pem").read_bytes()
    for host in deployment.hosts:
        names = sorted(p.name for p in host.certs.iterdir())
        assert names == sorted(["ca.pem", f"{host.name}.pem", f"{host.name}.key"])
        assert (host.certs / "ca.pem").read_bytes() == ca
        assert (host.certs / f"{host.name}.key").stat().st_mode & 0o777 == 0o600


def test_lbctl_sees_three_healthy_nodes_through_every_node(deployment: Deployment) -> None:
    def three_healthy(via: Host) -> bool:
        # the answering node reports its health summary; the others as they registered in etcd
        nodes: list[dict] = deployment.lbctl("nodes", via=via)  # type: ignore[assignment]
        return (
            sorted(n["id"] for n in nodes) == list(HOSTS)
            and all(not n["draining"] and n.get("health", {}).get("down", 0) == 0 for n in nodes)
            and next(n for n in nodes if n["id"] == via.name)["health"]["up"] == 2
        )

    for host in deployment.hosts:
        eventually(
            lambda h=host: three_healthy(h),
            f"lbctl nodes via {host.name} lists n1-n3, serving, nothing down",
        )
        status = deployment.lbctl("status", via=host)
        assert status["node_id"] == host.name  # type: ignore[index]
        backends = {b["id"]: b for p in status["pools"] for b in p["backends"]}  # type: ignore[index]
        assert sorted(backends) == ["a", "b"]
        assert all(b["health"] != "down" and b["admin"] == "enabled" for b in backends.values()), (
            backends
        )


def test_every_node_listener_serves_the_pool(deployment: Deployment) -> None:
    for host in deployment.hosts:
        assert served(host.http) == {"a", "b"}, f"{host.name}'s listener"


def test_a_second_run_changes_nothing_and_restarts_nothing(deployment: Deployment) -> None:
    before = deployment.pids()
    second = deployment.playbook()
    counters = recap(second.stdout)
    assert {h: c["changed"] for h, c in counters.items() if h in HOSTS} == dict.fromkeys(
        HOSTS, 0
    ), second.stdout[-4000:]
    assert all(c["failed"] == 0 for c in counters.values()), counters
    assert deployment.pids() == before


def test_a_changed_listener_restarts_only_that_node_through_the_handler(
    deployment: Deployment,
) -> None:
    # last in the file: it moves n2's listener to another port
    n2 = deployment.hosts[1]
    before = deployment.pids()
    n2.http = free_port()
    run = deployment.playbook()
    counters = recap(run.stdout)
    assert (
        counters["n2"]["changed"] >= 2
        and counters["n1"]["changed"] == counters["n3"]["changed"] == 0
    ), counters
    after = deployment.pids()
    changed = {k for k in before if before[k] != after[k]}
    assert changed == {"n2/run/lbnode.pid"}, (before, after)
    assert served(n2.http) == {"a", "b"}


def test_ansible_lint_passes_on_the_roles_and_playbook(tmp_path: Path) -> None:
    if ANSIBLE_LINT is None:
        pytest.skip("ansible-lint is not installed (pip install ansible-lint)")
    # A copy outside the repository, and a home of its own: ansible-lint writes a cache
    # (.ansible/) into the project it lints and into the home directory.
    shutil.copytree(PLAYBOOK_DIR, tmp_path / "ansible")
    env = dict(
        os.environ,
        HOME=str(tmp_path),
        ANSIBLE_HOME=str(tmp_path / ".ansible"),
        XDG_CACHE_HOME=str(tmp_path / ".cache"),
        NO_COLOR="1",
    )
    done = subprocess.run(
        [ANSIBLE_LINT, "--offline", "--profile", "production"],
        capture_output=True,
        text=True,
        cwd=tmp_path / "ansible",
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
