"""The systemd units of the roles, rendered by ansible-playbook's template module (this machine
has no systemd: tests/cluster/test_ansible.py runs the `pidfile` manager)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

ROLES = REPO / "deploy" / "ansible" / "roles"
VENV_BIN = Path(sys.executable).parent
ANSIBLE_PLAYBOOK = shutil.which("ansible-playbook", path=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}")

COMMON = {
    "lbnode_id": "n1", "lbnode_user": "fulcrum", "lbnode_group": "fulcrum", "lbnode_venv": "/opt/fulcrum/venv",
    "lbnode_config_dir": "/etc/fulcrum", "lbnode_drain_timeout": 30, "lbnode_vip_interface": "eth0",
}


def render(tmp_path: Path, template: Path, variables: dict[str, object]) -> str:
    if ANSIBLE_PLAYBOOK is None:
        pytest.fail("ansible-playbook is not installed: it is a test dependency (`make venv` installs ansible-core)")
    out = tmp_path / "rendered"
    play = [{"hosts": "localhost", "gather_facts": False, "vars": variables,
             "tasks": [{"ansible.builtin.template": {"src": str(template), "dest": str(out)}}]}]
    (tmp_path / "play.yml").write_text(json.dumps(play))
    env = dict(os.environ, ANSIBLE_HOME=str(tmp_path / "ah"), ANSIBLE_LOCALHOST_WARNING="False", ANSIBLE_NOCOLOR="1")
    done = subprocess.run(
        [ANSIBLE_PLAYBOOK, "-i", "localhost,", "-c", "local", "-e", f"ansible_python_interpreter={sys.executable}",
         str(tmp_path / "play.yml")], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    return out.read_text()


def test_lbnode_unit_with_vips_grants_the_capabilities_sets_arp_announce_and_signals_the_node_only(
    tmp_path: Path,
) -> None:
    unit = render(tmp_path, ROLES / "lbnode/templates/lbnode.service.j2", COMMON | {
        "lbnode_vips": [{"address": "203.0.113.100/24"}, {"address": "203.0.113.101/24", "interface": "bond0"},
                        {"address": "203.0.113.102/24"}]})
    lines = unit.splitlines()
    assert "AmbientCapabilities=CAP_NET_BIND_SERVICE CAP_NET_ADMIN CAP_NET_RAW" in lines
    assert [line for line in lines if line.startswith("ExecStartPre=")] == [
        "ExecStartPre=+/bin/sh -c 'echo 2 > /proc/sys/net/ipv4/conf/eth0/arp_announce'",
        "ExecStartPre=+/bin/sh -c 'echo 2 > /proc/sys/net/ipv4/conf/bond0/arp_announce'",
    ]
    assert "KillMode=mixed" in lines and "KillSignal=SIGTERM" in lines
    assert "ExecStart=/opt/fulcrum/venv/bin/lbnode run --config /etc/fulcrum/node.toml" in lines
    assert "ExecReload=/opt/fulcrum/venv/bin/lbnode reload --config /etc/fulcrum/node.toml" in lines


def test_lbnode_unit_without_vips_asks_for_nothing_more(tmp_path: Path) -> None:
    unit = render(tmp_path, ROLES / "lbnode/templates/lbnode.service.j2", COMMON | {"lbnode_vips": []})
    assert "AmbientCapabilities=CAP_NET_BIND_SERVICE" in unit.splitlines()
    assert "ExecStartPre" not in unit and "CAP_NET_ADMIN" not in unit


def _node_toml(tmp_path: Path, vips: list[dict[str, str]]) -> dict[str, object]:
    """node.toml as the lbnode role renders it, with the role's own heartbeat defaults."""
    import tomllib

    import yaml

    defaults = yaml.safe_load((ROLES / "lbnode/defaults/main.yml").read_text())
    text = render(tmp_path, ROLES / "lbnode/templates/node.toml.j2", COMMON | {
        "ansible_host": "192.0.2.11", "lbnode_admin": "", "lbnode_state_dir": "/var/lib/fulcrum",
        "lbnode_etcd_endpoints": ["http://192.0.2.11:2379"], "lbnode_lease_ttl": "5s", "lbnode_health_checkers": 2,
        "lbnode_vips": vips, "lbnode_control_bind": "0.0.0.0:7443", "lbnode_listeners": [], "lbnode_pools": [],
        "lbnode_heartbeat": defaults["lbnode_heartbeat"], "lbnode_heartbeat_port": defaults["lbnode_heartbeat_port"],
        "lbnode_etcd_tls": False,  # plain endpoints here: etcd over TLS is rendered and checked by test_ansible.py
        "lbnode_workers": defaults["lbnode_workers"],
    })
    return tomllib.loads(text)


def test_lbnode_role_turns_heartbeats_on_with_vips_at_the_hosts_address(tmp_path: Path) -> None:
    from lbnode.model import Address, parse_config

    data = _node_toml(tmp_path, [{"address": "203.0.113.100/24"}])
    assert data["cluster"]["heartbeat"] == "192.0.2.11:7946"  # type: ignore[index]
    cluster = parse_config(data).cluster
    assert cluster is not None and cluster.heartbeat == Address("192.0.2.11", 7946)


def test_lbnode_role_without_vips_leaves_heartbeats_off(tmp_path: Path) -> None:
    assert "heartbeat" not in _node_toml(tmp_path, [])["cluster"]  # type: ignore[operator]


def test_lbnode_role_runs_lbnodes_default_workers(tmp_path: Path) -> None:
    """The role writes ``workers = "auto"`` unless told otherwise: one worker per core the node
    may use, as lbnode itself defaults to."""
    from lbnode.model import available_cores, parse_config

    data = _node_toml(tmp_path, [])
    assert data["node"]["workers"] == "auto"  # type: ignore[index]
    assert parse_config(data).node.workers == available_cores()


def run_install_tasks(tmp_path: Path, variables: dict[str, object]) -> subprocess.CompletedProcess[str]:
    """The lbnode role's install.yml on localhost with the role's defaults and ``variables``."""
    assert ANSIBLE_PLAYBOOK is not None, "ansible-playbook is not installed: make venv installs ansible-core"
    play = [{"hosts": "localhost", "gather_facts": False,
             "vars_files": [str(ROLES / "lbnode/defaults/main.yml")],
             "tasks": [{"ansible.builtin.include_tasks": str(ROLES / "lbnode/tasks/install.yml")}]}]
    (tmp_path / "play.yml").write_text(json.dumps(play))
    env = dict(os.environ, ANSIBLE_HOME=str(tmp_path / "ah"), ANSIBLE_LOCALHOST_WARNING="False", ANSIBLE_NOCOLOR="1")
    return subprocess.run(
        [ANSIBLE_PLAYBOOK, "-i", "localhost,", "-c", "local", "-e", f"ansible_python_interpreter={sys.executable}",
         "-e", json.dumps(variables),  # extra vars: above the defaults file loaded as vars_files
         str(tmp_path / "play.yml")], capture_output=True, text=True, env=env, timeout=120)


def test_the_role_refuses_a_package_index_name_and_a_missing_wheel(tmp_path: Path) -> None:
    venv = {"lbnode_venv": str(tmp_path / "venv")}
    done = run_install_tasks(tmp_path, venv | {"lbnode_source": "fulcrum"})
    assert done.returncode != 0
    assert 'lbnode_source: "fulcrum" is not an absolute path on the host' in done.stdout, done.stdout
    empty = tmp_path / "dist"
    empty.mkdir()
    done = run_install_tasks(tmp_path, venv | {"lbnode_wheel_dir": str(empty)})
    assert done.returncode != 0
    assert f"lbnode_wheel_dir: {empty} holds 0 fulcrum_lb-*.whl files" in done.stdout, done.stdout
    assert not (tmp_path / "venv").exists()  # refused before anything was installed


def test_the_etcd_role_compacts_history_and_etcd_takes_its_config(tmp_path: Path) -> None:
    """The etcd role's config file turns periodic compaction on (without it Fulcrum's health
    observations grow etcd's history until its quota refuses writes, make soak measured); a
    real etcd started from the rendered file compacts within a few retention periods."""
    import time

    from lbnode.cluster.etcd import Compacted, EtcdConnection
    from lbnode.cluster.store import StopFlag
    from tests.conftest import free_port
    from tests.integration.etcd_helpers import ETCD

    client, peer = free_port(), free_port()
    conf = render(tmp_path, ROLES / "etcd/templates/etcd.conf.yml.j2", {
        "etcd_name": "m1", "etcd_data_dir": str(tmp_path / "data"), "etcd_address": "127.0.0.1",
        "etcd_client_port": client, "etcd_peer_port": peer, "etcd_cluster_group": "all",
        "etcd_initial_cluster_token": "t", "etcd_heartbeat_interval": 100, "etcd_election_timeout": 1000,
        "etcd_log_level": "warn", "etcd_tls": False, "etcd_auto_compaction_retention": "1s",
    })
    assert "auto-compaction-mode: periodic" in conf and 'auto-compaction-retention: "1s"' in conf
    # the one member of group "all" is localhost: its peer URL is the rendered one
    (tmp_path / "etcd.yml").write_text(conf.replace("localhost=http://localhost:", "localhost=http://127.0.0.1:")
                                       .replace('name: "m1"', 'name: "localhost"'))
    proc = subprocess.Popen([ETCD, "--config-file", str(tmp_path / "etcd.yml")],
                            stdout=subprocess.DEVNULL, stderr=open(tmp_path / "etcd.log", "wb"))
    conn = EtcdConnection([f"http://127.0.0.1:{client}"])
    try:
        deadline = time.monotonic() + 20  # etcd starts in well under a second; 20 s for busy cores
        while True:
            try:
                conn.put("/t/k", b"1")
                break
            except Exception:
                assert time.monotonic() < deadline and proc.poll() is None, (tmp_path / "etcd.log").read_text()
                time.sleep(0.2)
        for i in range(5):
            conn.put("/t/k", str(i).encode())
        # Periodic mode with a retention under an hour compacts every retention period (etcd
        # 3.4: the revision of one period ago); 15 s for 2 busy cores.
        deadline = time.monotonic() + 15
        while True:
            conn.put("/t/k", b"again")
            history = conn.watch_prefix("/t/", 1, StopFlag())  # from the first revision
            try:
                next(history)  # the history is still there: its first events
            except Compacted:
                break
            finally:
                history.close()
            assert time.monotonic() < deadline, "no compaction: " + (tmp_path / "etcd.log").read_text()
            time.sleep(0.5)
    finally:
        conn.close()
        proc.kill()
        proc.wait()



def run_admin_tasks(tmp_path: Path, variables: dict[str, object]) -> subprocess.CompletedProcess[str]:
    """The lbnode role's certs.yml, then node.toml, on localhost with the role's defaults and
    ``variables``: the controller and the node are this machine (the files land in tmp_path)."""
    import getpass
    import grp

    assert ANSIBLE_PLAYBOOK is not None, "ansible-playbook is not installed: make venv installs ansible-core"
    (tmp_path / "etc" / "certs").mkdir(parents=True, exist_ok=True)
    variables = {
        "lbnode_id": "n1", "ansible_host": "192.0.2.11", "lbnode_config_dir": str(tmp_path / "etc"),
        "lbnode_certs_dir": str(tmp_path / "controller"), "lbnode_certs_lbctl": str(VENV_BIN / "lbctl"),
        "lbnode_user": getpass.getuser(), "lbnode_group": grp.getgrgid(os.getgid()).gr_name,
        "lbnode_etcd_tls": False, "lbnode_etcd_endpoints": ["http://192.0.2.11:2379"],
        "lbnode_admin": "0.0.0.0:7070",
    } | variables
    play = [{"hosts": "localhost", "gather_facts": False,
             "vars_files": [str(ROLES / "lbnode/defaults/main.yml")],
             "tasks": [{"ansible.builtin.include_tasks": str(ROLES / "lbnode/tasks/certs.yml")},
                       {"ansible.builtin.template": {"src": str(ROLES / "lbnode/templates/node.toml.j2"),
                                                     "dest": str(tmp_path / "etc" / "node.toml")}}],
             "handlers": [{"name": "Restart lbnode", "ansible.builtin.debug": {"msg": "restart"}}]}]
    (tmp_path / "play.yml").write_text(json.dumps(play))
    env = dict(os.environ, ANSIBLE_HOME=str(tmp_path / "ah"), ANSIBLE_LOCALHOST_WARNING="False", ANSIBLE_NOCOLOR="1")
    return subprocess.run(
        [ANSIBLE_PLAYBOOK, "-i", "localhost,", "-c", "local", "-e", f"ansible_python_interpreter={sys.executable}",
         "-e", json.dumps(variables), str(tmp_path / "play.yml")], capture_output=True, text=True, env=env, timeout=180)


def test_lbnode_role_gives_a_fresh_node_an_admin_token_and_tls_beyond_loopback(tmp_path: Path) -> None:
    """Defaults with lbnode_admin on every address: a token made once on the controller and
    shared by the nodes, a certificate of the cluster CA naming the address clients dial, files
    0600 for the secrets, and an [admin] section lbnode's own loader accepts (it reads the files)."""
    from cryptography import x509

    from lbnode.admin.access import load_access
    from lbnode.config import load_config

    done = run_admin_tasks(tmp_path, {})
    assert done.returncode == 0, done.stdout + done.stderr
    controller, certs = tmp_path / "controller", tmp_path / "etc" / "certs"
    token = (controller / "admin.token").read_text().strip()
    assert len(token) == 64 and token.isalnum()
    assert token not in done.stdout  # no_log: the token is never printed
    assert (certs / "admin.token").read_text().strip() == token
    for secret in ("admin.token", "admin.key"):
        assert (certs / secret).stat().st_mode & 0o777 == 0o600, secret
    assert (controller / "admin.token").stat().st_mode & 0o777 == 0o600

    config = load_config(tmp_path / "etc" / "node.toml")
    assert config.admin.token_file == str(certs / "admin.token")
    assert (config.admin.cert, config.admin.key) == (str(certs / "admin.pem"), str(certs / "admin.key"))
    assert config.admin.client_ca is None
    load_access(config.admin)  # the token and the certificate pair as the node reads them at start

    cert = x509.load_pem_x509_certificate((certs / "admin.pem").read_bytes())
    ca = x509.load_pem_x509_certificate((controller / "ca.pem").read_bytes())
    cert.verify_directly_issued_by(ca)  # the control API's CA: one ca.pem for every client
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "192.0.2.11" in [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)]

    again = run_admin_tasks(tmp_path, {})  # a second run keeps the token and the certificate
    assert again.returncode == 0 and "changed=0" in again.stdout, again.stdout
    assert (controller / "admin.token").read_text().strip() == token


def test_lbnode_role_on_loopback_sends_a_token_without_tls_and_can_turn_both_off(tmp_path: Path) -> None:
    import tomllib

    from lbnode.config import load_config

    done = run_admin_tasks(tmp_path / "a", {"lbnode_admin": "127.0.0.1:7070"})
    assert done.returncode == 0, done.stdout + done.stderr
    config = load_config(tmp_path / "a" / "etc" / "node.toml")
    assert config.admin.token_file is not None and config.admin.cert is None
    assert not (tmp_path / "a" / "controller" / "n1-admin.pem").exists()

    done = run_admin_tasks(tmp_path / "b", {"lbnode_admin_token": False, "lbnode_admin_tls": False})
    assert done.returncode == 0, done.stdout + done.stderr
    assert "admin" not in tomllib.loads((tmp_path / "b" / "etc" / "node.toml").read_text())
    assert not (tmp_path / "b" / "controller" / "admin.token").exists()


def test_lbnode_role_copies_a_client_ca_and_refuses_one_without_tls(tmp_path: Path) -> None:
    from lbnode.config import load_config

    subprocess.run([str(VENV_BIN / "lbctl"), "certs", "init", "--dir", str(tmp_path / "ops"), "--nodes", "x"],
                   check=True, capture_output=True)
    client_ca = str(tmp_path / "ops" / "ca.pem")
    done = run_admin_tasks(tmp_path / "a", {"lbnode_admin_client_ca": client_ca})
    assert done.returncode == 0, done.stdout + done.stderr
    certs = tmp_path / "a" / "etc" / "certs"
    assert load_config(tmp_path / "a" / "etc" / "node.toml").admin.client_ca == str(certs / "admin-client-ca.pem")
    assert (certs / "admin-client-ca.pem").read_text() == (tmp_path / "ops" / "ca.pem").read_text()

    done = run_admin_tasks(tmp_path / "b", {"lbnode_admin_client_ca": client_ca, "lbnode_admin_tls": False})
    assert done.returncode != 0
    assert "lbnode_admin_client_ca needs lbnode_admin_tls: true" in done.stdout, done.stdout
