"""/metrics of a cluster node (real etcd, a real lbnode process): lease, store reachability,
config revision; a scrape still answers with etcd down and shows it."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import httpx

from lbnode.cluster.etcd import EtcdStore
from lbnode.model import Address, Backend, Pool
from tests.conftest import free_port, spawn_backend, wait_port
from tests.integration.test_metrics import PROMTOOL
from tests.promtext import parse, value

# A lease of 2 s is kept alive every third of it; etcd's loss is seen by the next keepalive or
# watch call. Seconds on an idle machine: 15 s is the margin for 2 busy cores.
FOLLOW = 15.0


def _metrics(admin: int) -> tuple[str, dict]:
    r = httpx.get(f"http://127.0.0.1:{admin}/metrics", timeout=10)
    assert r.status_code == 200, r.text
    return r.text, parse(r.text)


def _eventually(admin: int, check, what: str):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + FOLLOW
    while True:
        text, samples = _metrics(admin)
        if check(samples):
            return text, samples
        assert time.monotonic() < deadline, f"{what} within {FOLLOW}s"
        time.sleep(0.1)


def _promtool(text: str) -> None:
    assert PROMTOOL is not None, "promtool missing: run `make sysdeps-test` (Debian package prometheus)"
    done = subprocess.run([PROMTOOL, "check", "metrics"], input=text.encode(), capture_output=True, timeout=60)
    assert done.returncode == 0 and not done.stdout.strip(), (done.stdout + done.stderr).decode()


def test_cluster_metrics_follow_etcd_and_a_scrape_answers_while_it_is_down(spawn, tmp_path: Path, etcd) -> None:
    a = spawn_backend(spawn, "a")
    store = EtcdStore(etcd.settings())
    record = store.create_pool(Pool(name="p0", backends=(Backend(Address("127.0.0.1", a)),)))
    http, admin = free_port(), free_port()
    endpoints = ", ".join(f'"{e}"' for e in etcd.endpoints)
    config = tmp_path / "n1.toml"
    config.write_text(f"""
[node]
id = "n1"
admin = "127.0.0.1:{admin}"
state_dir = "{tmp_path / 'state'}"
drain_timeout = "1s"
workers = 1

[cluster]
etcd = [{endpoints}]
lease_ttl = "2s"

[[listeners]]
name = "web"
protocol = "http"
bind = "127.0.0.1:{http}"
pool = "p0"
""")
    node = spawn("-m", "lbnode.cli", "run", "--config", str(config), name="n1")
    wait_port(admin)
    _, up = _eventually(admin, lambda s: value(s, "fulcrum_cluster_lease_renewals_total") >= 1,
                        "a lease keepalive answered")
    assert value(up, "fulcrum_cluster_etcd_reachable") == 1
    assert value(up, "fulcrum_cluster_lease_held") == 1
    assert value(up, "fulcrum_cluster_nodes") == 1
    assert value(up, "fulcrum_config_stale") == 0
    assert value(up, "fulcrum_config_revision") >= record.revision
    _eventually(admin, lambda s: value(s, "fulcrum_cluster_store_revision") == record.revision,
                "the store's newest pool revision read (once a second)")
    assert value(up, "fulcrum_cluster_watch_lag_seconds") == 0
    assert value(up, "fulcrum_cluster_lease_renewal_failures_total") == 0
    assert value(up, "fulcrum_backend_health", pool="p0", backend=f"127.0.0.1:{a}", state="up") == 1

    etcd.members[0].kill()
    text, down = _eventually(
        admin,
        lambda s: value(s, "fulcrum_cluster_etcd_reachable") == 0
        and value(s, "fulcrum_cluster_lease_renewal_failures_total") >= 1,
        "etcd seen down by the store follower and the keepalive",
    )
    _promtool(text)
    assert value(down, "fulcrum_config_stale") == 1
    assert httpx.get(f"http://127.0.0.1:{http}/", timeout=10).status_code == 200  # serving on

    etcd.members[0].start()
    etcd.members[0].wait_healthy()
    _eventually(admin, lambda s: value(s, "fulcrum_cluster_etcd_reachable") == 1 and value(s, "fulcrum_config_stale") == 0,
                "etcd reachable again")
    assert node.terminate() == 0
