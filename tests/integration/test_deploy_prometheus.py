"""deploy/prometheus and the `prometheus_targets` role: the role, run by ansible-playbook on
localhost against an inventory of lbnode hosts, writes a file_sd file that promtool accepts
together with the shipped scrape config, a scrape job with the nodes' admin token and TLS that
promtool accepts, and refuses nodes Prometheus could not reach."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO
from tests.integration.test_ansible_units import ANSIBLE_PLAYBOOK, ROLES

PROMETHEUS_YML = REPO / "deploy" / "prometheus" / "prometheus.yml"
PROMTOOL = shutil.which("promtool")  # Debian's prometheus package: `make sysdeps-test` installs it
SHIPPED_TARGETS = "/etc/prometheus/file_sd/fulcrum.yml"


def run_role(tmp_path: Path, inventory: str, variables: dict[str, object]) -> subprocess.CompletedProcess[str]:
    """The role on localhost (group `prometheus`), the lbnode hosts only in the inventory."""
    assert ANSIBLE_PLAYBOOK is not None, "ansible-playbook is not installed: make venv installs ansible-core"
    certs = tmp_path / "controller-certs"  # what the lbnode role leaves on the controller
    if not (certs / "admin.token").exists():
        subprocess.run([str(Path(sys.executable).parent / "lbctl"), "certs", "init", "--dir", str(certs),
                        "--nodes", "lb1"], check=True, capture_output=True)
        (certs / "admin.token").write_text(secrets.token_hex(32) + "\n")
    # the Prometheus host's files under tmp_path, owned by whoever runs the test
    variables = {"prometheus_targets_certs_dir": str(certs),
                 "prometheus_targets_secrets_dir": str(tmp_path / "prometheus" / "fulcrum"),
                 "prometheus_targets_scrape_config_file": str(tmp_path / "prometheus" / "scrape_configs" / "fulcrum.yml"),
                 "prometheus_targets_secrets_owner": os.getuid(), "prometheus_targets_secrets_group": os.getgid(),
                 "prometheus_targets_owner": os.getuid(), "prometheus_targets_group_owner": os.getgid(),
                 "prometheus_targets_validate": f"{PROMTOOL} check config %s",
                 "prometheus_targets_reload": ""} | variables  # no systemd unit here: see the reload test
    (tmp_path / "inventory.ini").write_text(inventory)
    play = [{"hosts": "prometheus", "gather_facts": False, "roles": ["prometheus_targets"]}]
    (tmp_path / "play.yml").write_text(json.dumps(play))
    env = dict(os.environ, ANSIBLE_HOME=str(tmp_path / "ah"), ANSIBLE_ROLES_PATH=str(ROLES),
               ANSIBLE_LOCALHOST_WARNING="False", ANSIBLE_NOCOLOR="1")
    return subprocess.run(
        [ANSIBLE_PLAYBOOK, "-i", str(tmp_path / "inventory.ini"), "-e", json.dumps(variables),
         str(tmp_path / "play.yml")], capture_output=True, text=True, env=env, timeout=120)


def promtool_check_config(tmp_path: Path, targets: Path) -> subprocess.CompletedProcess[str]:
    """promtool on the shipped config, its file_sd path pointed at ``targets`` (it checks that file too)."""
    assert PROMTOOL is not None, "promtool missing: run `make sysdeps-test` (Debian package prometheus)"
    text = PROMETHEUS_YML.read_text()
    assert text.count(SHIPPED_TARGETS) == 1, "the shipped config reads the role's default file"
    config = tmp_path / "prometheus.yml"
    config.write_text(text.replace(SHIPPED_TARGETS, str(targets)))
    return subprocess.run([PROMTOOL, "check", "config", str(config)], capture_output=True, text=True, timeout=60)


INVENTORY = f"""
[prometheus]
monitor ansible_connection=local ansible_python_interpreter={sys.executable}

[lbnode]
lb1 ansible_host=192.0.2.11 lbnode_admin=0.0.0.0:7070
lb2 ansible_host=192.0.2.12 lbnode_admin=198.51.100.12:9100 lbnode_id=edge-2
lb3 ansible_host=2001:db8::13 lbnode_admin=[::]:7070
lb4 ansible_host=192.0.2.14 lbnode_admin=127.0.0.1:7070 fulcrum_metrics_target=203.0.113.14:17070
"""


def test_role_writes_one_target_per_node_and_promtool_accepts_it(tmp_path: Path) -> None:
    targets = tmp_path / "file_sd" / "fulcrum.yml"
    done = run_role(tmp_path, INVENTORY, {"prometheus_targets_file": str(targets),
                                          "prometheus_targets_owner": os.getuid(),
                                          "prometheus_targets_group_owner": os.getgid(),
                                          "prometheus_targets_labels": {"cluster": "lab"}})
    assert done.returncode == 0, done.stdout + done.stderr
    assert yaml.safe_load(targets.read_text()) == [
        # a wildcard bind is scraped at the host's address, a specific bind at that address
        {"targets": ["192.0.2.11:7070"], "labels": {"cluster": "lab", "node": "lb1"}},
        {"targets": ["198.51.100.12:9100"], "labels": {"cluster": "lab", "node": "edge-2"}},
        {"targets": ["[2001:db8::13]:7070"], "labels": {"cluster": "lab", "node": "lb3"}},
        {"targets": ["203.0.113.14:17070"], "labels": {"cluster": "lab", "node": "lb4"}},
    ]
    checked = promtool_check_config(tmp_path, targets)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    # a missing file_sd file is only a WARNING: its absence would pass unseen
    assert "SUCCESS" in checked.stdout and "WARNING" not in checked.stdout + checked.stderr, checked.stdout

    again = run_role(tmp_path, INVENTORY, {"prometheus_targets_file": str(targets),
                                           "prometheus_targets_owner": os.getuid(),
                                           "prometheus_targets_group_owner": os.getgid(),
                                           "prometheus_targets_labels": {"cluster": "lab"}})
    assert again.returncode == 0 and "changed=0" in again.stdout, again.stdout


def test_promtool_rejects_a_broken_target_file(tmp_path: Path) -> None:
    # the check above can fail: promtool reads the file_sd file the config names
    broken = tmp_path / "fulcrum.yml"
    broken.write_text('- targets: ["192.0.2.11:7070"]\n  labels: {node: [1]}\n')
    assert promtool_check_config(tmp_path, broken).returncode != 0


@pytest.mark.parametrize(("admin", "why"), [
    ("", "no admin endpoint"),
    ("127.0.0.1:7070", "loopback"),
    (None, "loopback"),  # not set: the lbnode role's default, 127.0.0.1:7070
])
def test_role_refuses_a_node_whose_admin_prometheus_cannot_reach(tmp_path: Path, admin: str | None, why: str) -> None:
    setting = "" if admin is None else f" lbnode_admin={admin!r}"
    inventory = INVENTORY.split("[lbnode]")[0] + f"[lbnode]\nlb9 ansible_host=192.0.2.19{setting}\n"
    targets = tmp_path / "fulcrum.yml"
    done = run_role(tmp_path, inventory, {"prometheus_targets_file": str(targets)})
    assert done.returncode != 0
    assert "lb9: lbnode_admin is" in done.stdout and why in done.stdout, done.stdout
    assert not targets.exists()


def test_role_writes_a_scrape_job_with_the_admin_token_and_tls_promtool_accepts(tmp_path: Path) -> None:
    """The nodes' [admin] as the lbnode role sets it up (token, TLS from the cluster CA, a client
    certificate when client_ca is on): the job sends the token from a file 0640, trusts ca.pem over
    https and presents the client certificate; promtool reads every file it names."""
    targets = tmp_path / "file_sd" / "fulcrum.yml"
    certs = tmp_path / "controller-certs"
    done = run_role(tmp_path, INVENTORY, {"prometheus_targets_file": str(targets),
                                          "prometheus_targets_client_cert_src": str(certs / "reader.pem"),
                                          "prometheus_targets_client_key_src": str(certs / "reader.key")})
    assert done.returncode == 0, done.stdout + done.stderr
    scrape = tmp_path / "prometheus" / "scrape_configs" / "fulcrum.yml"
    secrets_dir = tmp_path / "prometheus" / "fulcrum"
    job = yaml.safe_load(scrape.read_text())["scrape_configs"][0]
    assert job["scheme"] == "https"
    assert job["authorization"] == {"type": "Bearer", "credentials_file": str(secrets_dir / "admin.token")}
    assert job["tls_config"] == {"ca_file": str(secrets_dir / "ca.pem"), "cert_file": str(secrets_dir / "client.pem"),
                                 "key_file": str(secrets_dir / "client.key")}
    assert job["file_sd_configs"] == [{"files": [str(targets)]}]
    assert (secrets_dir / "admin.token").read_text() == (certs / "admin.token").read_text()
    assert (secrets_dir / "ca.pem").read_text() == (certs / "ca.pem").read_text()
    for secret in ("admin.token", "client.key"):
        assert (secrets_dir / secret).stat().st_mode & 0o777 == 0o640, secret
    checked = subprocess.run([PROMTOOL, "check", "config", str(scrape)], capture_output=True, text=True, timeout=60)
    assert checked.returncode == 0 and "WARNING" not in checked.stdout + checked.stderr, checked.stdout + checked.stderr

    # the check can fail: promtool stats the token file the job names
    (secrets_dir / "admin.token").unlink()
    checked = subprocess.run([PROMTOOL, "check", "config", str(scrape)], capture_output=True, text=True, timeout=60)
    assert checked.returncode != 0 and "admin.token" in checked.stdout + checked.stderr


def test_role_without_token_and_tls_writes_a_plain_job(tmp_path: Path) -> None:
    targets = tmp_path / "file_sd" / "fulcrum.yml"
    done = run_role(tmp_path, INVENTORY, {"prometheus_targets_file": str(targets), "prometheus_targets_token": False,
                                          "prometheus_targets_tls": False})
    assert done.returncode == 0, done.stdout + done.stderr
    job = yaml.safe_load((tmp_path / "prometheus" / "scrape_configs" / "fulcrum.yml").read_text())["scrape_configs"][0]
    assert job["scheme"] == "http" and "authorization" not in job and "tls_config" not in job
    assert not (tmp_path / "prometheus" / "fulcrum").exists()


def test_prometheus_with_the_roles_job_scrapes_a_node_with_admin_token_tls_and_client_ca(
    spawn, tmp_path: Path  # type: ignore[no-untyped-def]
) -> None:
    """The job the role writes, run by a real Prometheus against a real lbnode whose [admin] is
    what the lbnode role gives it (token, certificate of the cluster CA, client_ca = that CA):
    the job's target is up; the same job without its token is down (the node answers 401)."""
    import time

    import httpx

    from tests.conftest import free_port, listener_toml, node_toml, pool_toml, wait_port

    prometheus = shutil.which("prometheus")  # the server of Debian's prometheus package
    if prometheus is None:
        pytest.fail("prometheus missing: run `make sysdeps-test` (Debian package prometheus)")
    certs = tmp_path / "controller-certs"
    done = run_role(tmp_path, INVENTORY, {"prometheus_targets_file": str(tmp_path / "file_sd" / "fulcrum.yml"),
                                          "prometheus_targets_client_cert_src": str(certs / "reader.pem"),
                                          "prometheus_targets_client_key_src": str(certs / "reader.key")})
    assert done.returncode == 0, done.stdout + done.stderr

    admin = free_port()
    config = tmp_path / "node.toml"
    config.write_text(node_toml(
        listener_toml("front", "http", "web", bind=f"127.0.0.1:{free_port()}"),
        pool_toml("web", [f"127.0.0.1:{free_port()}"]),
        # lb1.pem names 127.0.0.1 (every node certificate of `lbctl certs init` does)
        f'[admin]\ntoken_file = "{certs / "admin.token"}"\ncert = "{certs / "lb1.pem"}"\n'
        f'key = "{certs / "lb1.key"}"\nclient_ca = "{certs / "ca.pem"}"\n',
        admin=f"127.0.0.1:{admin}"))
    spawn("-m", "lbnode.cli", "run", "--config", str(config), name="node")
    wait_port(admin, timeout=30)  # a node starts in about a second; 30 s for 2 busy cores

    job = yaml.safe_load((tmp_path / "prometheus" / "scrape_configs" / "fulcrum.yml").read_text())["scrape_configs"][0]
    (tmp_path / "targets.yml").write_text(json.dumps([{"targets": [f"127.0.0.1:{admin}"]}]))
    job["file_sd_configs"] = [{"files": [str(tmp_path / "targets.yml")]}]
    assert (job["scrape_interval"], job["scrape_timeout"]) == ("15s", "10s")
    job |= {"scrape_interval": "200ms", "scrape_timeout": "200ms"}  # up is known within a second
    tokenless = {k: v for k, v in job.items() if k != "authorization"} | {"job_name": "tokenless"}
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump({"scrape_configs": [job, tokenless]}))
    port = free_port()
    spawn_prometheus = subprocess.Popen(
        [prometheus, f"--config.file={tmp_path / 'prometheus.yml'}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{port}"], stdout=open(tmp_path / "prometheus.log", "wb"),
        stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        # Prometheus spreads a job's first scrape over one interval; 30 s for 2 busy cores
        deadline = time.monotonic() + 30
        up: dict[str, str] = {}
        while set(up) != {"fulcrum", "tokenless"}:
            alive = spawn_prometheus.poll() is None
            assert alive and time.monotonic() < deadline, (tmp_path / "prometheus.log").read_text()[-3000:]
            time.sleep(0.2)
            try:
                r = httpx.get(f"http://127.0.0.1:{port}/api/v1/query", params={"query": "up"}, timeout=10)
            except httpx.TransportError:
                continue  # not listening yet
            if r.status_code == 200:
                up = {s["metric"]["job"]: s["value"][1] for s in r.json()["data"]["result"]}
        assert up == {"fulcrum": "1", "tokenless": "0"}, up
        targets = httpx.get(f"http://127.0.0.1:{port}/api/v1/targets", timeout=10).json()["data"]["activeTargets"]
        errors = {t["labels"]["job"]: t["lastError"] for t in targets}
        assert errors["fulcrum"] == "" and "401" in errors["tokenless"], errors
    finally:
        spawn_prometheus.terminate()
        spawn_prometheus.wait(timeout=30)


def test_a_changed_scrape_job_reloads_prometheus_once_and_an_unchanged_one_does_not(
    tmp_path: Path,
) -> None:
    """The role's handler, with a real Prometheus and the reload command pointed at it (SIGHUP, what
    Debian's unit sends): the run that writes the job reloads it, a second identical run does not,
    and a run with another job reloads it again."""
    import time

    import httpx

    from tests.conftest import free_port

    prometheus = shutil.which("prometheus")
    if prometheus is None:
        pytest.fail("prometheus missing: run `make sysdeps-test` (Debian package prometheus)")
    (tmp_path / "prometheus.yml").write_text("global:\n  scrape_interval: 15s\n")
    port = free_port()
    server = subprocess.Popen(
        [prometheus, f"--config.file={tmp_path / 'prometheus.yml'}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{port}"], stdout=open(tmp_path / "prometheus.log", "wb"),
        stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def last_reload() -> float | None:
        """prometheus_config_last_reload_success_timestamp_seconds, from its own /metrics."""
        try:
            text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        except httpx.TransportError:
            return None  # not listening yet
        for line in text.splitlines():
            if line.startswith("prometheus_config_last_reload_success_timestamp_seconds "):
                return float(line.split()[1])
        return None

    def wait_for_reload_after(before: float) -> float:
        deadline = time.monotonic() + 30  # a reload takes milliseconds; 30 s for 2 busy cores
        while True:
            assert server.poll() is None, (tmp_path / "prometheus.log").read_text()[-3000:]
            now = last_reload()
            if now is not None and now > before:
                return now
            assert time.monotonic() < deadline, f"no reload after {before}"
            time.sleep(0.1)

    try:
        started = wait_for_reload_after(0.0)  # the load at start counts as one
        targets = str(tmp_path / "file_sd" / "fulcrum.yml")
        reload = {"prometheus_targets_file": targets, "prometheus_targets_reload": f"kill -HUP {server.pid}"}
        # the timestamp has whole-second resolution in some versions: let a second pass
        time.sleep(1.1)
        first = run_role(tmp_path, INVENTORY, reload)
        assert first.returncode == 0, first.stdout + first.stderr
        assert "RUNNING HANDLER [prometheus_targets : Reload Prometheus]" in first.stdout
        reloaded = wait_for_reload_after(started)

        again = run_role(tmp_path, INVENTORY, reload)
        assert again.returncode == 0, again.stdout + again.stderr
        assert "RUNNING HANDLER" not in again.stdout  # nothing changed: no reload

        time.sleep(1.1)
        changed = run_role(tmp_path, INVENTORY, reload | {"prometheus_targets_scrape_interval": "30s"})
        assert changed.returncode == 0, changed.stdout + changed.stderr
        assert "RUNNING HANDLER [prometheus_targets : Reload Prometheus]" in changed.stdout
        wait_for_reload_after(reloaded)
        assert last_reload() is not None and server.poll() is None  # a reload, not a crash
    finally:
        server.terminate()
        server.wait(timeout=30)
