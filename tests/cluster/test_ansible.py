"""deploy/ansible for real: ``ansible-playbook site.yml`` over SSH against three hosts in network namespaces.

The hosts n1-n3 are the node namespaces of ``topology.lan(3)`` (10.77.0.11-13 on one bridge),
each running its own sshd (``tests/cluster/sshhosts.py``). The controller (ansible-playbook,
and lbctl) runs in the ``cli`` namespace and logs in as root with the test's key; the backends
run in ``be``. Only the network is per host: the filesystem is shared, so each host keeps its
own root dir under tmp (config, data, pid and log dirs), and the roles use their ``pidfile``
service manager (start-stop-daemon): a daemon started over SSH stays in the namespace of that
host's sshd, which puts each etcd member and lbnode in its host's network. The role installs
the wheel of ``make wheel`` (built here into tmp) with constraints.txt's pins into n1's own
venv; n2 and n3 share this test's venv (``lbnode_venv_install: false``): three installs would
take three times as long. The namespaces reach no package index, so the test first downloads
the wheel's pinned dependencies into a wheelhouse from the root namespace, and n1's pip
installs from it alone.
The nodes share one VIP; at the end every process the playbook started is stopped through its
pid file, then the LAN's teardown ends sshd, the backends and anything else in the namespaces.
Skipped unless root with working ``ip netns``, sshd, etcd and ansible-playbook.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.cluster import sshhosts, topology
from tests.cluster.topology import Lan
from tests.integration.etcd_helpers import ETCD, require_etcd

REPO = Path(__file__).resolve().parents[2]
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
VIP = "10.77.0.100"
HTTP_PORT = 8080
BACKENDS = {"a": f"{topology.BACKEND_IP}:9000", "b": f"{topology.BACKEND_IP}:9001"}


@dataclass
class Host:
    name: str
    root: Path
    http: int = HTTP_PORT
    wheelhouse: Path | None = None  # the role installs Fulcrum into this host's own venv from it
    wheel_dir: Path | None = None  # where `make wheel` put the wheel the role installs

    @property
    def address(self) -> str:
        return topology.node_ip(int(self.name[1:]))

    @property
    def control_endpoint(self) -> str:
        return f"{self.address}:7443"

    @property
    def admin_endpoint(self) -> str:
        return f"{self.address}:7070"

    @property
    def certs(self) -> Path:
        """Where the playbook put this node's certificates."""
        return self.root / "etc" / "fulcrum" / "certs"

    @property
    def own_venv(self) -> Path:
        return self.root / "opt" / "fulcrum" / "venv"

    def host_vars(self) -> dict[str, object]:
        r = self.root
        return {
            "ansible_host": self.address,
            "etcd_config_dir": str(r / "etc" / "etcd"),
            "etcd_data_dir": str(r / "var" / "lib" / "etcd"),
            "etcd_run_dir": str(r / "run"),
            "etcd_log_dir": str(r / "log"),
            "lbnode_config_dir": str(r / "etc" / "fulcrum"),
            "lbnode_state_dir": str(r / "var" / "lib" / "fulcrum"),
            "lbnode_run_dir": str(r / "run"),
            "lbnode_log_dir": str(r / "log"),
            "lbnode_control_bind": self.control_endpoint,
            # reachable from the controller: the role then turns admin TLS on (and the token, always)
            "lbnode_admin": self.admin_endpoint,
            # One process per node: the test finds each node by its pid file and reads one log;
            # the role's default ("auto") is rendered and checked by test_ansible_units.py.
            "lbnode_workers": 1,
            "lbnode_listeners": [
                {
                    "name": "web",
                    "protocol": "http",
                    "bind": f"0.0.0.0:{self.http}",
                    "pool": "web",
                    "timeouts": {"idle": "30s"},
                }
            ],
        } | (
            {
                "lbnode_venv_install": True,
                "lbnode_venv": str(self.own_venv),
                "lbnode_wheel_dir": str(self.wheel_dir),
                "lbnode_pip_extra_args": f"--no-index --find-links {self.wheelhouse}",
            }
            if self.wheelhouse is not None
            else {}
        )


@dataclass
class Deployment:
    tmp: Path
    lan: Lan
    keys: sshhosts.SshKeys
    control_dir: Path  # ssh ControlPath sockets: short, a unix socket path has ~100 bytes
    hosts: list[Host]
    certs_dir: Path  # on the controller
    first_run: subprocess.CompletedProcess[str] | None = None

    def inventory(self) -> Path:
        common = {
            "ansible_user": "root",
            "ansible_ssh_private_key_file": str(self.keys.client_key),
            "ansible_ssh_common_args": " ".join(sshhosts.client_options(self.keys)),
            # the filesystem is shared: this venv's python is every host's python
            "ansible_python_interpreter": sys.executable,
            "ansible_remote_tmp": str(self.tmp / "ansible-remote-tmp"),
            # the service manager without systemd; processes run as root (the VIP needs it)
            "etcd_service_manager": "pidfile",
            "lbnode_service_manager": "pidfile",
            "etcd_install_package": False,
            "etcd_binary": ETCD,
            "etcd_user": "root",
            "etcd_group": "root",
            # quick elections: the cluster forms in about a second
            "etcd_heartbeat_interval": topology.ETCD_HEARTBEAT_MS,
            "etcd_election_timeout": topology.ETCD_ELECTION_MS,
            "lbnode_venv_install": False,
            "lbnode_venv": str(VENV_BIN.parent),
            "lbnode_create_user": False,
            "lbnode_user": "root",
            "lbnode_group": "root",
            "lbnode_drain_timeout": 1,
            "lbnode_lease_ttl": "2s",
            "lbnode_vips": [{"address": f"{VIP}/24"}],
            "lbnode_vip_interface": "eth0",
            "lbnode_certs_dir": str(self.certs_dir),
            "lbnode_certs_lbctl": str(VENV_BIN / "lbctl"),
            "etcd_certs_dir": str(self.certs_dir / "etcd"),
            "etcd_certs_lbctl": str(VENV_BIN / "lbctl"),
            "lbnode_pools": [
                {
                    "name": "web",
                    "retries": 2,
                    "timeouts": {"connect": "1s"},
                    "health": {"type": "http", "path": "/", "interval": "1s"},
                    "backends": [{"address": a, "name": n} for n, a in BACKENDS.items()],
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

    def in_cli(self, args: list[str], timeout: float, **kw: object) -> subprocess.CompletedProcess[str]:
        """Run ``args`` in the controller's namespace (cli)."""
        return subprocess.run(["ip", "netns", "exec", self.lan.ns("cli"), *args],  # type: ignore[call-overload]
                              capture_output=True, text=True, timeout=timeout, **kw)

    def playbook(self, name: str = "site.yml") -> subprocess.CompletedProcess[str]:
        env = dict(
            os.environ,
            ANSIBLE_HOME=str(self.tmp / "ansible-home"),
            ANSIBLE_LOCAL_TEMP=str(self.tmp / "ansible-tmp"),
            ANSIBLE_SSH_CONTROL_PATH_DIR=str(self.control_dir),
            ANSIBLE_HOST_KEY_CHECKING="False",
            # modules go through ssh's stdin: fewer round trips per task
            ANSIBLE_PIPELINING="True",
            ANSIBLE_NOCOLOR="1",
            ANSIBLE_RETRY_FILES_ENABLED="0",
            PYTHONUNBUFFERED="1",
        )
        env.pop("ANSIBLE_CONFIG", None)
        done = self.in_cli(
            [ANSIBLE_PLAYBOOK, "-i", str(self.inventory()), str(PLAYBOOK_DIR / name)],  # type: ignore[list-item]
            timeout=PLAYBOOK_TIMEOUT,
            cwd=self.tmp,
            env=env,
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
        done = self.in_cli(
            [str(VENV_BIN / "lbctl"), "--endpoint", via.control_endpoint, *flags, "-o", "json", *args],
            timeout=60,
            env=env,
        )
        assert done.returncode == 0, f"lbctl {' '.join(args)} via {via.name}: {done.stderr}"
        return json.loads(done.stdout)

    def served(self, address: str, requests: int = 8) -> set[str]:
        """GET http://address/ from the cli namespace, ``requests`` times, one connection each:
        the backend names (the demo backend's body), or 'status N' for an answer that is not 200."""
        done = self.in_cli([sys.executable, "-c", CLIENT, f"http://{address}/", str(requests)], timeout=60)
        assert done.returncode == 0, f"GET http://{address}/ from cli: {done.stderr[-2000:]}"
        return set(done.stdout.split())

    def holders(self) -> set[str]:
        return self.lan.holders(VIP, HOSTS)

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


# Run by the cli namespace's python: one request per connection, the body (or status) per line.
CLIENT = """
import sys, urllib.error, urllib.request
for _ in range(int(sys.argv[2])):
    try:
        with urllib.request.urlopen(sys.argv[1], timeout=5) as r:
            print(r.read().decode().strip())
    except urllib.error.HTTPError as e:
        print(f"status_{e.code}")
"""


def recap(output: str) -> dict[str, dict[str, int]]:
    """PLAY RECAP counters per host: {'n1': {'ok': 12, 'changed': 0, ...}}."""
    out = {}
    for line in output.split("PLAY RECAP", 1)[1].splitlines():
        m = re.match(r"^(\S+)\s+:\s+(.*)$", line.strip())
        if m:
            out[m.group(1)] = {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", m.group(2))}
    return out


def eventually(check: Callable[[], bool], what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"not after {timeout:g}s: {what}"
        time.sleep(0.1)


def _stop_by_pid_files(tmp: Path) -> None:
    """Stop every process whose pid file the playbook wrote under tmp: the nodes, then etcd
    (a node stopping while etcd is up leaves the cluster and releases its VIP cleanly, and
    quickly). etcd gets SIGKILL: its data is thrown away, and members stopped gracefully all
    at once spend ~6 s trying to hand leadership to each other."""
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


def _wait_http(lan: Lan, address: str, log: Path) -> None:
    deadline = time.monotonic() + 15
    while lan.run("cli", ["curl", "-s", "-m", "0.5", "-o", "/dev/null", f"http://{address}/"]).returncode != 0:
        assert time.monotonic() < deadline, f"backend {address} never answered:\n{log.read_text()[-2000:]}"
        time.sleep(0.1)


def _wheel(dist: Path) -> Path:
    """``make wheel`` of this checkout into ``dist`` (the role's lbnode_wheel_dir for n1)."""
    done = subprocess.run(["make", "-C", str(REPO), "wheel", f"DIST={dist}", f"VENV={VENV_BIN.parent}"],
                          capture_output=True, text=True, timeout=PLAYBOOK_TIMEOUT)
    assert done.returncode == 0, f"make wheel:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    (wheel,) = dist.glob("fulcrum_lb-*.whl")
    return wheel


def _wheelhouse(dest: Path, wheel: Path) -> Path:
    """The wheel's dependencies at constraints.txt's versions, fetched from the root namespace
    (which reaches the package index; the hosts do not)."""
    done = subprocess.run(
        [sys.executable, "-m", "pip", "download", "-q", "--disable-pip-version-check", "--dest", str(dest),
         "-c", str(REPO / "constraints.txt"), str(wheel)],
        capture_output=True, text=True, timeout=PLAYBOOK_TIMEOUT,
    )
    assert done.returncode == 0, f"pip download (the wheelhouse n1 installs from):\n{done.stderr[-3000:]}"
    return dest


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    reason = topology.netns_unavailable()  # root and network namespaces: not something `make test` gives
    if reason is not None:
        pytest.skip(reason)
    reason = sshhosts.sshd_unavailable()  # openssh-server: `make test` installs it (sysdeps-test)
    if reason is not None:
        pytest.fail(reason)
    if ANSIBLE_PLAYBOOK is None:
        pytest.fail("ansible-playbook is not installed: it is a test dependency (`make venv` installs ansible-core)")
    require_etcd()
    tmp = tmp_path_factory.mktemp("ansible")
    wheel = _wheel(tmp / "dist")
    wheelhouse = _wheelhouse(tmp / "wheels", wheel)
    control_dir = Path(tempfile.mkdtemp(prefix="fxa-", dir="/tmp"))
    try:
        with topology.lan(len(HOSTS)) as lan:
            try:
                keys = sshhosts.make_keys(tmp / "ssh")
                for name in HOSTS:
                    sshhosts.start_sshd(lan, name, keys, tmp)
                for name, address in BACKENDS.items():
                    log = tmp / f"backend-{name}.log"
                    port = address.rsplit(":", 1)[1]
                    lan.spawn("be", [sys.executable, "-m", "lbnode.demo_backend", "--name", name,
                                     "--host", "0.0.0.0", "--port", port], log_path=log, cwd=tmp)
                for name, address in BACKENDS.items():
                    _wait_http(lan, address, tmp / f"backend-{name}.log")
                for name in HOSTS:
                    sshhosts.wait_ready(lan, "cli", name, keys, tmp)
                hosts = [Host(name, tmp / name, wheelhouse=wheelhouse if name == "n1" else None,
                              wheel_dir=wheel.parent if name == "n1" else None) for name in HOSTS]
                d = Deployment(tmp, lan, keys, control_dir, hosts, tmp / "controller-certs")
                d.first_run = d.playbook()
                yield d
            finally:
                _stop_by_pid_files(tmp)
    finally:
        shutil.rmtree(control_dir, ignore_errors=True)


def test_the_playbook_runs_three_etcd_members_and_three_nodes(deployment: Deployment) -> None:
    counters = recap(deployment.first_run.stdout)  # type: ignore[union-attr]
    assert set(counters) >= set(HOSTS), counters
    assert all(c["failed"] == 0 and c["unreachable"] == 0 for c in counters.values()), counters
    pids = deployment.pids()
    assert sorted(pids) == sorted(
        f"{h}/run/{svc}.pid" for h in HOSTS for svc in ("etcd-fulcrum", "lbnode")
    ), pids
    assert all(Path(f"/proc/{pid}").exists() for pid in pids.values()), pids
    for host in deployment.hosts:
        # started once: the handlers run before the start tasks, not after
        assert "SIGTERM" not in (host.root / "log" / "lbnode.log").read_text()
        # each daemon runs in its host's network: that of the sshd it was started through
        for svc in ("etcd-fulcrum", "lbnode"):
            assert os.readlink(f"/proc/{pids[f'{host.name}/run/{svc}.pid']}/ns/net") == _netns_link(
                deployment.lan, host.name
            ), f"{host.name}'s {svc} is not in {deployment.lan.ns(host.name)}"
        # a node talks to its own etcd member first
        toml = (host.root / "etc" / "fulcrum" / "node.toml").read_text()
        assert f'etcd = ["https://{host.address}:2379", ' in toml, toml
        # etcd serves clients and peers only over TLS, with client certificates
        conf = (host.root / "etc" / "etcd" / "etcd.conf.yml").read_text()
        assert f'listen-peer-urls: "https://{host.address}:2380"' in conf
        assert conf.count("client-cert-auth: true") == 2, conf


def _netns_link(lan: Lan, member: str) -> str:
    """What /proc/PID/ns/net reads for a process in ``member``'s namespace."""
    done = lan.run(member, ["readlink", "/proc/self/ns/net"])
    return done.stdout.strip()


def test_the_role_installs_the_wheel_at_the_pinned_versions_and_the_node_runs_from_it(
    deployment: Deployment,
) -> None:
    n1 = deployment.hosts[0]
    assert n1.wheelhouse is not None and (n1.own_venv / "bin" / "lbnode").exists()
    # the wheel of `make wheel`, copied to the host with constraints.txt, installed from there
    packages = n1.root / "opt" / "fulcrum" / "packages"
    assert n1.wheel_dir is not None
    (wheel,) = (p.name for p in n1.wheel_dir.glob("fulcrum_lb-*.whl"))
    assert sorted(p.name for p in packages.iterdir()) == sorted([wheel, "constraints.txt"])
    listed = subprocess.run([str(n1.own_venv / "bin" / "python"), "-m", "pip", "list", "--format", "json"],
                            capture_output=True, text=True, timeout=60)
    installed = {p["name"].lower(): p for p in json.loads(listed.stdout)}
    assert "fulcrum" not in installed and installed["fulcrum-lb"].get("editable_project_location") is None
    direct = next((n1.own_venv / "lib").glob("python3*/site-packages/fulcrum_lb-*.dist-info/direct_url.json"))
    assert json.loads(direct.read_text())["url"] == f"file://{packages / wheel}"
    pinned = dict(re.findall(r"^([A-Za-z0-9_.-]+)==([^\s;]+)\s*$", (REPO / "constraints.txt").read_text(), re.M))
    for name in ("grpcio", "protobuf", "trio", "python3-etcd3", "cryptography", "httptools"):
        assert installed[name]["version"] == pinned[name], (name, installed[name], pinned[name])
    assert f"{n1.own_venv}/bin/lbnode" in _cmdline(deployment.pids()["n1/run/lbnode.pid"])
    shared = f"{VENV_BIN}/lbnode"  # lbnode_venv_install: false
    assert shared in _cmdline(deployment.pids()["n2/run/lbnode.pid"])


def test_the_certificates_are_distributed_without_the_ca_key(deployment: Deployment) -> None:
    ca = (deployment.certs_dir / "ca.pem").read_bytes()
    etcd_ca = (deployment.certs_dir / "etcd" / "ca.pem").read_bytes()
    assert etcd_ca != ca  # etcd's own CA: no control-API certificate gets into etcd
    for host in deployment.hosts:
        names = sorted(p.name for p in host.certs.iterdir())
        assert names == sorted(["ca.pem", f"{host.name}.pem", f"{host.name}.key",
                                "etcd-ca.pem", "etcd-client.pem", "etcd-client.key",
                                "admin.token", "admin.pem", "admin.key"])
        assert (host.certs / "ca.pem").read_bytes() == ca
        assert (host.certs / "etcd-ca.pem").read_bytes() == etcd_ca
        assert (host.certs / "admin.token").read_bytes() == (deployment.certs_dir / "admin.token").read_bytes()
        for key in (f"{host.name}.key", "etcd-client.key", "admin.token", "admin.key"):
            assert (host.certs / key).stat().st_mode & 0o777 == 0o600
        pki = host.root / "etc" / "etcd" / "pki"  # the etcd member's
        assert sorted(p.name for p in pki.iterdir()) == sorted(["ca.pem", f"{host.name}.pem", f"{host.name}.key"])
        assert (pki / f"{host.name}.key").stat().st_mode & 0o777 == 0o600


def test_etcd_refuses_a_client_without_its_certificate(deployment: Deployment) -> None:
    n1 = deployment.hosts[0]
    url = f"https://{n1.address}:2379/health"
    pki = deployment.certs_dir / "etcd"
    with_cert = deployment.in_cli(["curl", "-sS", "-m", "5", "--cacert", str(pki / "ca.pem"), "--cert",
                                   str(pki / "client.pem"), "--key", str(pki / "client.key"), url], timeout=30)
    assert with_cert.returncode == 0 and '"health":"true"' in with_cert.stdout, with_cert.stderr
    without = deployment.in_cli(["curl", "-sS", "-m", "5", "--cacert", str(pki / "ca.pem"), url], timeout=30)
    assert without.returncode != 0 and '"health"' not in without.stdout
    # a control-API client certificate (another CA) is refused too
    control = deployment.in_cli(["curl", "-sS", "-m", "5", "--cacert", str(pki / "ca.pem"), "--cert",
                                 str(deployment.certs_dir / "client.pem"), "--key",
                                 str(deployment.certs_dir / "client.key"), url], timeout=30)
    assert control.returncode != 0 and '"health"' not in control.stdout


def test_the_admin_endpoint_wants_the_token_over_tls(deployment: Deployment) -> None:
    """What the role's [admin] defaults give a node whose admin endpoint the network reaches:
    /status over https (a certificate of the cluster CA naming the node's address) with the
    cluster's token 200, without it or with another 401; /healthz stays open to probes."""
    token = (deployment.certs_dir / "admin.token").read_text().strip()

    def get(host: Host, path: str, *headers: str) -> tuple[int, str]:
        flags = [arg for h in headers for arg in ("-H", h)]
        done = deployment.in_cli(["curl", "-sS", "-m", "5", "--cacert", str(deployment.certs_dir / "ca.pem"),
                                  "-o", "/dev/stderr", "-w", "%{http_code}", *flags,
                                  f"https://{host.admin_endpoint}{path}"], timeout=30)
        assert done.returncode == 0, f"curl {path} on {host.name}: {done.stderr}"
        return int(done.stdout), done.stderr

    for host in deployment.hosts:
        assert get(host, "/status")[0] == 401
        assert get(host, "/metrics", "Authorization: Bearer " + "x" * 64)[0] == 401
        status, body = get(host, "/status", f"Authorization: Bearer {token}")
        assert status == 200 and host.name in body, body[:500]
        assert get(host, "/metrics", f"Authorization: Bearer {token}")[0] == 200
        assert get(host, "/healthz")[0] == 200
    # plain http is not served: the token never crosses the network in clear text
    plain = deployment.in_cli(["curl", "-sS", "-m", "5", "-o", "/dev/null", "-w", "%{http_code}",
                               f"http://{deployment.hosts[0].admin_endpoint}/healthz"], timeout=30)
    assert plain.stdout != "200", plain.stdout


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


def test_one_node_holds_the_vip_and_it_serves_the_pool(deployment: Deployment) -> None:
    eventually(lambda: len(deployment.holders()) == 1, f"exactly one of n1-n3 holds {VIP}")
    (holder,) = deployment.holders()

    def lbctl_names_holder() -> bool:
        vips: list[dict] = deployment.lbctl("vips", via=deployment.hosts[0])  # type: ignore[assignment]
        return [(v["address"], v.get("holder", "")) for v in vips] == [(VIP, holder)]

    eventually(lbctl_names_holder, f"lbctl vips names {holder} as the holder of {VIP}")
    assert deployment.served(f"{VIP}:{HTTP_PORT}") == {"a", "b"}
    assert deployment.holders() == {holder}


def test_every_node_listener_serves_the_pool(deployment: Deployment) -> None:
    for host in deployment.hosts:
        assert deployment.served(f"{host.address}:{host.http}") == {"a", "b"}, f"{host.name}'s listener"


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
    n2.http = HTTP_PORT + 1
    run = deployment.playbook()
    counters = recap(run.stdout)
    assert (
        counters["n2"]["changed"] >= 2
        and counters["n1"]["changed"] == counters["n3"]["changed"] == 0
    ), counters
    after = deployment.pids()
    changed = {k for k in before if before[k] != after[k]}
    assert changed == {"n2/run/lbnode.pid"}, (before, after)
    assert deployment.served(f"{n2.address}:{n2.http}") == {"a", "b"}
    # the VIP (perhaps handed off by n2 as it stopped) is held by one node again
    eventually(lambda: len(deployment.holders()) == 1, f"exactly one of n1-n3 holds {VIP} again")


def test_ansible_lint_passes_on_the_roles_and_playbook(tmp_path: Path) -> None:
    if ANSIBLE_LINT is None:
        pytest.fail("ansible-lint is not installed: it is a test dependency (`make venv` installs it)")
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
