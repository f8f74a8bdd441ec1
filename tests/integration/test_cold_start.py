"""Static stability on a cold start: a cluster node restarted while etcd is down serves the
configuration it last applied from etcd (cached in state_dir), says it is stale, and follows
etcd again once it answers. Real etcd, real lbnode processes, real backends and clients."""

from __future__ import annotations

import json
import stat
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

import httpx
import trio

from lbnode.cluster.etcd import CALL_TIMEOUT, MAX_DEADLINE_ATTEMPTS, EtcdStore
from lbnode.cluster.lastconfig import FILE_NAME, LastConfig, encode
from lbnode.cluster.store import PoolRecord, StoreError
from lbnode.config import load_config_text
from lbnode.model import Address, Backend, Pool
from lbnode.node import FIRST_READ_WAIT, LbNode
from tests.conftest import free_port, spawn_backend, start_backends, wait_port
from tests.integration.etcd_helpers import etcd_cluster

# Propagation of one change through etcd's watch to a node: milliseconds; this is the margin
# for 2 busy cores (other test runs on the same machine).
FOLLOW = 10.0


def _config(tmp_path: Path, etcd_endpoints: list[str], http: int, admin: int) -> Path:
    endpoints = ", ".join(f'"{e}"' for e in etcd_endpoints)
    path = tmp_path / "n1.toml"
    path.write_text(f"""
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
""")  # no [[pools]]: p0 lives in etcd only
    return path


def _served(port: int, n: int = 12) -> Counter[str]:
    """Which backends answered ``n`` real requests (the demo backend names itself in X-Backend)."""
    seen: Counter[str] = Counter()
    with httpx.Client(timeout=5) as client:
        for _ in range(n):
            r = client.get(f"http://127.0.0.1:{port}/")
            seen[f"{r.status_code} {r.headers.get('x-backend', r.text.strip()[:60])}"] += 1
    return seen


def _status(admin: int) -> dict:
    return httpx.get(f"http://127.0.0.1:{admin}/status", timeout=5).json()


def _eventually(check, what: str, timeout: float = FOLLOW):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"{what} within {timeout}s"
        time.sleep(0.05)


def test_a_node_restarted_while_etcd_is_down_serves_its_cached_pools_marked_stale_until_etcd_answers(
    spawn, tmp_path: Path, etcd
) -> None:
    a, b = spawn_backend(spawn, "a"), spawn_backend(spawn, "b")
    store = EtcdStore(etcd.settings())
    store.create_pool(Pool(name="p0", backends=(Backend(Address("127.0.0.1", a)), Backend(Address("127.0.0.1", b)))))
    http, admin = free_port(), free_port()
    config = _config(tmp_path, list(etcd.endpoints), http, admin)
    node = spawn("-m", "lbnode.cli", "run", "--config", str(config), name="n1")
    wait_port(admin)
    assert _served(http) == Counter({"200 a": 6, "200 b": 6})
    status = _status(admin)
    assert status["config"]["source"] == "store" and status["config"]["stale"] is False
    cache = tmp_path / "state" / FILE_NAME
    _eventually(cache.exists, "the applied configuration is cached")
    assert stat.S_IMODE(cache.stat().st_mode) == 0o600
    saved = json.loads(cache.read_text())
    assert [p["spec"]["name"] for p in saved["pools"]] == ["p0"]
    assert node.terminate() == 0

    etcd.members[0].kill()
    node = spawn("-m", "lbnode.cli", "run", "--config", str(config), name="n1-cold")
    wait_port(admin)
    # Real requests through the restarted node reach p0's backends: nothing is 503.
    assert _served(http) == Counter({"200 a": 6, "200 b": 6})
    config_status = _status(admin)["config"]
    assert config_status["source"] == "cache" and config_status["stale"] is True
    assert config_status["revision"] == saved["revision"] and config_status["file"] == str(cache)
    assert config_status["saved_at"].endswith("Z")
    log = node.log()
    assert "serving the cached configuration" in log and "may be stale" in log and str(cache) in log

    etcd.members[0].start()
    etcd.members[0].wait_healthy()
    record = _eventually(lambda: _try(lambda: store.get_pool("p0")), "etcd answers again")
    store.update_pool(replace(record.pool, backends=record.pool.backends[:1]), record.revision)
    _eventually(lambda: _status(admin)["config"]["stale"] is False, "the node follows etcd again")
    config_status = _status(admin)["config"]
    assert config_status["source"] == "store" and config_status["revision"] > saved["revision"]
    assert _served(http) == Counter({"200 a": 12})
    assert "replaces the cached one" in node.log()
    # ...and the change is cached in turn.
    _eventually(lambda: len(json.loads(cache.read_text())["pools"][0]["spec"]["backends"]) == 1, "the change is cached")
    # etcd lost while the node runs: it serves on, and /status says the configuration may be stale.
    etcd.members[0].kill()
    _eventually(lambda: _status(admin)["config"]["stale"] is True, "stale while etcd is down")
    assert _status(admin)["config"]["source"] == "store" and _served(http) == Counter({"200 a": 12})
    etcd.members[0].start()
    etcd.members[0].wait_healthy()
    _eventually(lambda: _status(admin)["config"]["stale"] is False, "fresh again once etcd answers")
    assert node.terminate() == 0


def test_a_corrupt_cache_is_one_error_naming_the_file_and_the_node_serves_its_config_file(spawn, tmp_path: Path, etcd) -> None:
    http, admin = free_port(), free_port()
    config = _config(tmp_path, list(etcd.endpoints), http, admin)
    (tmp_path / "state").mkdir(mode=0o700)
    cache = tmp_path / "state" / FILE_NAME
    cache.write_text('{"format": 1, "prefix": "/fulcrum/v1", "revision": 9, "saved_at": 1.0, "pools": [{"revision": 3, "spec": {"name": "p0", "backends": [{"address": "nowhere"}]}}]}')
    etcd.members[0].kill()
    node = spawn("-m", "lbnode.cli", "run", "--config", str(config), name="n1")
    wait_port(admin)
    r = httpx.get(f"http://127.0.0.1:{http}/", timeout=5)
    assert r.status_code == 503 and "p0" in r.text  # node.toml has no p0: nothing to serve it with
    assert _status(admin)["config"] == {"source": "file", "stale": True, "revision": None}
    errors = [line for line in node.log().splitlines() if str(cache) in line]
    assert len(errors) == 1 and "pools[0].spec.backends[0].address" in errors[0] and "ignored" in errors[0]
    assert node.popen.poll() is None  # never a crash


def test_a_node_restarted_while_etcd_is_down_serves_its_cached_routes(spawn, tmp_path: Path, etcd) -> None:
    from lbnode.model import route_from_dict

    a, b = spawn_backend(spawn, "a"), spawn_backend(spawn, "b")
    store = EtcdStore(etcd.settings())
    store.create_pool(Pool(name="p0", backends=(Backend(Address("127.0.0.1", a)),)))
    store.create_pool(Pool(name="p1", backends=(Backend(Address("127.0.0.1", b)),)))
    store.routes.put_route("web", route_from_dict({"name": "r", "path_prefix": "/r/", "pool": "p1"}))
    http, admin = free_port(), free_port()
    config = _config(tmp_path, list(etcd.endpoints), http, admin)  # node.toml has no routes
    node = spawn("-m", "lbnode.cli", "run", "--config", str(config), name="n1")
    wait_port(admin)

    def routed() -> str:
        r = httpx.get(f"http://127.0.0.1:{http}/r/x", timeout=5)
        return f"{r.status_code} {r.headers.get('x-backend', '')}"

    _eventually(lambda: routed() == "200 b", "the store's route is served")
    cache = tmp_path / "state" / FILE_NAME
    _eventually(lambda: cache.exists() and json.loads(cache.read_text()).get("routes"), "the routes are cached")
    assert json.loads(cache.read_text())["routes"][0]["spec"] == {"name": "r", "path_prefix": "/r/", "pool": "p1"}
    assert node.terminate() == 0

    etcd.members[0].kill()
    node = spawn("-m", "lbnode.cli", "run", "--config", str(config), name="n1-cold")
    wait_port(admin)
    assert _status(admin)["config"]["source"] == "cache"
    assert routed() == "200 b"  # the cached route, to the cached pool
    assert _served(http, 4) == Counter({"200 a": 4})  # the rest: the listener's pool
    assert node.terminate() == 0


def _try(fn):  # type: ignore[no-untyped-def]
    try:
        return fn()
    except Exception:
        return None


async def test_start_up_does_not_wait_on_an_etcd_without_quorum(tmp_path: Path) -> None:
    """After a power cut etcd may be up without a quorum: one member of three, no leader. A read
    then hangs up to MAX_DEADLINE_ATTEMPTS x CALL_TIMEOUT; the node serves its cache after
    FIRST_READ_WAIT instead, and its requests get 200s."""
    with etcd_cluster(tmp_path, size=3) as cluster:
        cluster.members[1].kill()
        cluster.members[2].kill()
        lone = cluster.members[0].url
        async with trio.open_nursery() as nursery:
            (backend,) = await start_backends(nursery, "a")
            state = tmp_path / "state"
            state.mkdir()
            p0 = Pool(name="p0", backends=(Backend(Address("127.0.0.1", backend.port)),))
            (state / FILE_NAME).write_bytes(encode({"p0": PoolRecord(p0, 5)}, 5, time.time(), "/fulcrum/v1"))
            config = load_config_text(f"""
[node]
id = "n1"
state_dir = "{state}"
[cluster]
etcd = ["{lone}"]
[[listeners]]
name = "web"
protocol = "http"
bind = "127.0.0.1:0"
pool = "p0"
""", "test.toml")
            assert config.cluster is not None
            store = EtcdStore(config.cluster)
            # The premise: this etcd holds a read far longer than the node may wait.
            t0 = trio.current_time()
            try:
                await trio.to_thread.run_sync(store.list_pools)
            except StoreError:
                pass
            read_took = trio.current_time() - t0
            assert read_took > FIRST_READ_WAIT + 1.0, f"a leaderless read failed after {read_took:.2f}s"
            node = LbNode(config, store=store, last_config=LastConfig(state, prefix=config.cluster.prefix))
            started = trio.current_time()
            bound = await nursery.start(lambda task_status: node.run(handle_signals=False, task_status=task_status))
            took = trio.current_time() - started
            r = await trio.to_thread.run_sync(lambda: httpx.get(f"http://127.0.0.1:{bound.listeners['web'][1]}/", timeout=5))
            assert r.status_code == 200 and r.headers["x-backend"] == "a"
            assert node.config_source.source == "cache" and node.config_source.stale
            print(f"\nserving {took:.2f}s after start beside a leaderless etcd (bound {FIRST_READ_WAIT:g}s; "
                  f"one read there took {read_took:.2f}s, at most {MAX_DEADLINE_ATTEMPTS * CALL_TIMEOUT:g}s)")
            # Margin for 2 busy cores: start-up itself takes milliseconds.
            assert took < FIRST_READ_WAIT + 1.0
            nursery.cancel_scope.cancel()  # the node and the backend
