"""/metrics of a three-node cluster with VIPs (recorded, not added to an interface): every node
sees the three nodes, and the VIPs held add up to the VIPs configured."""

from __future__ import annotations

import time
from pathlib import Path

import httpx

from tests.conftest import Proc, free_port, wait_port
from tests.integration.etcd_helpers import etcd_cluster, require_etcd
from tests.integration.test_cluster_lbctl import certs_init
from tests.integration.test_vip_api import NODES, RUN_RECORDED, VIPS, _node_toml, _spawn
from tests.promtext import parse, value

# Nodes join through etcd within a lease TTL (2 s) and the VIPs are placed right after;
# 30 s is the margin for three nodes starting at once on 2 busy cores.
SETTLE = 30.0


def _metrics(admin: int) -> dict:
    r = httpx.get(f"http://127.0.0.1:{admin}/metrics", timeout=10)
    assert r.status_code == 200, r.text
    return parse(r.text)


def test_every_node_sees_the_cluster_and_the_vips_held_add_up(tmp_path: Path) -> None:
    require_etcd()
    procs: list[Proc] = []
    try:
        with etcd_cluster(tmp_path, size=1) as etcd:
            certs = certs_init(tmp_path / "certs")
            backend = free_port()
            procs.append(_spawn(tmp_path, "backend", ["-m", "lbnode.demo_backend", "--port", str(backend)]))
            admins = []
            for node_id in NODES:
                ports = {"http": free_port(), "control": free_port()}
                admin = free_port()
                text = _node_toml(tmp_path, node_id, etcd, certs, f"127.0.0.1:{backend}", ports)
                text = text.replace(f'id = "{node_id}"\n', f'id = "{node_id}"\nadmin = "127.0.0.1:{admin}"\n', 1)
                config = tmp_path / f"{node_id}.toml"
                config.write_text(text)
                procs.append(_spawn(tmp_path, node_id, ["-c", RUN_RECORDED, "run", "--config", str(config)]))
                admins.append(admin)
            for admin, proc in zip(admins, procs[1:], strict=True):
                try:
                    wait_port(admin, timeout=SETTLE)
                except TimeoutError:
                    raise AssertionError(f"a node did not start:\n{proc.log()[-3000:]}") from None
            deadline = time.monotonic() + SETTLE
            while True:
                views = [_metrics(a) for a in admins]
                nodes = [value(v, "fulcrum_cluster_nodes") for v in views]
                held = [value(v, "fulcrum_cluster_vips_held") for v in views]
                if nodes == [3, 3, 3] and sum(held) == len(VIPS):
                    break
                if time.monotonic() >= deadline:
                    logs = "\n".join(p.log()[-1500:] for p in procs[1:])
                    raise AssertionError(f"nodes seen {nodes}, VIPs held {held} after {SETTLE}s\n{logs}")
                time.sleep(0.2)
            for v in views:
                assert value(v, "fulcrum_cluster_lease_held") == 1
                assert value(v, "fulcrum_cluster_etcd_reachable") == 1
    finally:
        for proc in procs:
            if proc.popen.poll() is None:
                proc.popen.kill()
                proc.popen.wait(10)
