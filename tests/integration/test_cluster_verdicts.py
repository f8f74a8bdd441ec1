"""A node takes the cluster's health verdict on a backend it does not check itself even when
the verdict reached it before the pool did (make soak saw a restarted node keep such a backend
"unknown" for 22 s: the verdict was handed over 1 ms before the pool and dropped).

A real node process and a real etcd; the checker is a real ClusterAgent in this process that
publishes its check results as a node's agent does (it is node "a" of the cluster).
"""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import trio

from lbnode.cluster.assign import backend_key, checkers_for
from lbnode.cluster.etcd import EtcdStore
from lbnode.cluster.membership import ClusterAgent
from lbnode.health.state import Observation
from lbnode.model import Backend, HealthCheck, Pool, parse_address
from tests.conftest import free_port, wait_port

# The node reads etcd at start and follows its watches: milliseconds; 15 s for 2 busy cores.
FOLLOW = 15.0


async def _status(admin: int) -> dict:  # type: ignore[type-arg]
    def get() -> dict:  # type: ignore[type-arg]
        r = httpx.get(f"http://127.0.0.1:{admin}/status", timeout=10)
        assert r.status_code == 200
        return r.json()  # type: ignore[no-any-return]

    return await trio.to_thread.run_sync(get)


async def _until(check, what: str) -> dict:  # type: ignore[no-untyped-def,type-arg]
    deadline = time.monotonic() + FOLLOW
    while True:
        doc = await check()
        if doc is not None:
            return doc  # type: ignore[no-any-return]
        assert time.monotonic() < deadline, f"{what} within {FOLLOW:g}s"
        await trio.sleep(0.05)


async def test_a_verdict_that_arrives_before_its_pool_is_applied_when_the_pool_comes(
    spawn, tmp_path: Path, etcd, nursery
) -> None:
    settings = etcd.settings(prefix="/verdicts", health_checkers=1)
    # A backend that node "a" checks when a and c are both live (rendezvous, one checker).
    backend_id = next(f"198.51.100.{i}:80" for i in range(1, 255)
                      if checkers_for(backend_key("web", f"198.51.100.{i}:80"), ["a", "c"], 1) == ["a"])
    agent = ClusterAgent(settings, "a", {"addresses": ["127.0.0.1:1"]}, refresh_interval=60)
    await nursery.start(agent.run)
    agent.publish(Observation(backend_id, True, "status 200", trio.current_time()), "web")

    admin = free_port()
    config = tmp_path / "c.toml"
    endpoints = ", ".join(f'"{e}"' for e in etcd.endpoints)
    # c's node.toml has its own pool only: "web" will come from etcd, after c has started.
    config.write_text(
        f'[node]\nid = "c"\nadmin = "127.0.0.1:{admin}"\nstate_dir = "{tmp_path / "state"}"\nworkers = 1\n'
        f'[cluster]\netcd = [{endpoints}]\nprefix = "/verdicts"\nlease_ttl = "2s"\nhealth_checkers = 1\n'
        f'[[listeners]]\nname = "web"\nprotocol = "http"\nbind = "127.0.0.1:{free_port()}"\npool = "own"\n'
        f'[[pools]]\nname = "own"\n  [[pools.backends]]\n  address = "127.0.0.1:{free_port()}"\n')
    spawn("-m", "lbnode.cli", "run", "--config", str(config), name="c")
    wait_port(admin)

    async def both_live() -> dict | None:  # type: ignore[type-arg]
        return True if agent.live_nodes == {"a", "c"} else None  # type: ignore[return-value]

    await _until(both_live, "a and c live")
    await trio.sleep(1.0)  # c has read a's observation (its agent's first read and watch): the verdict is told
    store = EtcdStore(settings)
    try:
        await trio.to_thread.run_sync(store.create_pool, Pool(
            name="web", backends=(Backend(parse_address(backend_id, "backend")),),
            health=HealthCheck(type="tcp", interval=0.1, timeout=0.5)))
    finally:
        store.close()

    async def web_backend() -> dict | None:  # type: ignore[type-arg]
        doc = await _status(admin)
        pools = {p["name"]: p for p in doc.get("pools", [])}
        return pools.get("web")  # type: ignore[no-any-return]

    web = await _until(web_backend, "the pool from etcd on c")
    deadline = time.monotonic() + FOLLOW
    while web["backends"][0]["state"] != "up":
        assert time.monotonic() < deadline, f"c kept {web['backends'][0]} without the cluster's verdict"
        await trio.sleep(0.05)
        web = await web_backend()  # type: ignore[assignment]
    nursery.cancel_scope.cancel()
