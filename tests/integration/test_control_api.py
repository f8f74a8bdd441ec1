"""The control API of a standalone node, end to end: lbctl -> gRPC -> FileStore -> watch -> data plane.

Every test runs a real LbNode following a real FileStore, the real gRPC server
on an ephemeral 127.0.0.1 port, and lbctl's real ``main`` (in a worker thread,
so the node keeps serving) or lbctl as a subprocess. Traffic goes through the
node's L7 listener to real demo backends.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import trio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from lbctl.certs import init_certs
from lbctl.cli import main as lbctl_main
from lbnode.api.fulcrum.v1 import control_pb2 as pb
from lbnode.api.fulcrum.v1 import control_pb2_grpc as rpc
from lbnode.cluster.filestore import FileStore
from lbnode.config import load_config_text
from lbnode.control.events import EventHub
from lbnode.control.server import serve_control
from lbnode.model import Address, ControlSettings
from lbnode.node import Bound, LbNode
from tests.conftest import (
    FAULTHANDLER_ENV,
    REPO,
    Proc,
    exit_code_or_stacks,
    free_port,
    listener_toml,
    node_toml,
    pool_toml,
    start_backends,
)

# How long a change may take to go store -> watch -> snapshot (it takes milliseconds).
PROPAGATION = 5.0


# --------------------------------------------------------------------------- fixtures


@dataclass
class Certs:
    dir: Path

    def flags(self, *, client: str = "client") -> list[str]:
        return ["--ca", str(self.dir / "ca.pem"), "--cert", str(self.dir / f"{client}.pem"),
                "--key", str(self.dir / f"{client}.key")]

    def settings(self) -> ControlSettings:
        return ControlSettings(bind=Address("127.0.0.1", 0), ca=str(self.dir / "ca.pem"),
                               cert=str(self.dir / "n1.pem"), key=str(self.dir / "n1.key"))


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    directory = tmp_path_factory.mktemp("certs")
    init_certs(directory, ["n1"], {})
    return Certs(directory)


@pytest.fixture(scope="module")
def other_ca(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    directory = tmp_path_factory.mktemp("other-ca")
    init_certs(directory, ["n1"], {})
    return Certs(directory)


@pytest.fixture(autouse=True)
def _no_lbctl_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in list(os.environ):
        if name.startswith("LBCTL_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "no-config"))


INSECURE = ControlSettings(bind=Address("127.0.0.1", 0), insecure=True)


@dataclass
class ControlNode:
    node: LbNode
    bound: Bound
    port: int
    store: FileStore
    flags: list[str]

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def http(self) -> str:
        host, port = self.bound.listeners["front"]
        return f"http://{host}:{port}"

    async def lbctl(self, *args: str) -> tuple[int, str, str]:
        return await lbctl(*self.flags, "-e", self.endpoint, *args)

    async def ok(self, *args: str) -> str:
        code, out, err = await self.lbctl(*args)
        assert code == 0, f"lbctl {' '.join(args)} exited {code}: {err}"
        return out

    def channel(self) -> grpc.Channel:
        return grpc.insecure_channel(self.endpoint)


async def start_control_node(
    nursery: trio.Nursery,
    state_dir: Path,
    pools_toml: str,
    *,
    settings: ControlSettings = INSECURE,
    flags: list[str] | None = None,
) -> ControlNode:
    config = load_config_text(
        node_toml(pools_toml, listener_toml("front", "http", "web"), node_id="n1",
                  node_extra=f'state_dir = "{state_dir}"\n'),
        "test.toml",
    )
    store = FileStore(state_dir, config.pools)
    node = LbNode(config, store)
    bound = await nursery.start(lambda task_status: node.run(handle_signals=False, task_status=task_status))
    port = await nursery.start(serve_control, settings, store, node)
    return ControlNode(node, bound, port, store, ["--insecure"] if flags is None else flags)


async def lbctl(*args: str) -> tuple[int, str, str]:
    """lbctl's real main() in a worker thread (the node keeps serving): exit code, stdout, stderr."""

    def run() -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = lbctl_main(list(args))
            except SystemExit as exc:  # argparse
                code = int(exc.code or 0)
        return code, out.getvalue(), err.getvalue()

    return await trio.to_thread.run_sync(run)


async def eventually(check: Callable[[], Awaitable[bool]], what: str, timeout: float = PROPAGATION) -> None:
    deadline = trio.current_time() + timeout
    while not await check():
        if trio.current_time() > deadline:
            raise AssertionError(f"not after {timeout}s: {what}")
        await trio.sleep(0.02)


async def served_by(url: str, requests: int = 8) -> set[str]:
    def run() -> set[str]:
        import httpx

        names = set()
        with httpx.Client(timeout=10) as client:
            for _ in range(requests):
                r = client.get(url)
                names.add(r.headers.get("x-backend", f"status {r.status_code}"))
        return names

    return await trio.to_thread.run_sync(run)


async def serves(node: ControlNode, expected: set[str]) -> None:
    async def check() -> bool:
        return await served_by(node.http + "/") == expected

    await eventually(check, f"requests reach exactly {sorted(expected)}")


# --------------------------------------------------------------------------- pools


async def test_pools_create_get_list_update_delete_through_lbctl(nursery: trio.Nursery, tmp_path: Path) -> None:
    a, b = await start_backends(nursery, "a", "b")
    cn = await start_control_node(nursery, tmp_path / "state", pool_toml("web", [a.address]))
    api = tmp_path / "api.toml"
    api.write_text(f'name = "api"\nalgorithm = "least_connections"\n[[backends]]\naddress = "{b.address}"\nname = "b"\n'
                   '[health]\ntype = "http"\npath = "/healthz"\ninterval = "5s"\n')
    assert (await cn.ok("pools", "create", "-f", str(api))).strip() == "pool api created (revision 2)"

    listed = json.loads(await cn.ok("-o", "json", "pools", "list"))
    assert listed["revision"] == 2
    assert [(p["name"], p["revision"]) for p in listed["pools"]] == [("api", 2), ("web", 1)]
    shown = json.loads(await cn.ok("pools", "show", "api", "-o", "json"))  # options after the command work too
    assert shown == {
        "name": "api", "revision": 2, "algorithm": "least_connections",
        "health": {"type": "http", "path": "/healthz", "interval": 5.0},
        "backends": [{"address": b.address, "name": "b"}],
    }
    table = await cn.ok("pools", "list")
    assert table.splitlines()[0].split() == ["NAME", "ALGORITHM", "BACKENDS", "REVISION"]
    assert table.splitlines()[1].split() == ["api", "least_connections", "1", "2"]
    assert "health = " in await cn.ok("pools", "show", "api")

    # The node serves what the store says (the listener's pool "web" here).
    await serves(cn, {"a"})
    # Update = a pool file again, through apply (the declarative path) ...
    web = tmp_path / "web.toml"
    web.write_text(pool_toml("web", [b.address]))
    await cn.ok("apply", "-f", str(web))
    await serves(cn, {"b"})
    assert cn.store.get_pool("web").revision == 3

    assert (await cn.ok("pools", "delete", "api")).strip() == "pool api deleted"
    code, _, err = await cn.lbctl("pools", "show", "api")
    assert code == 1 and err.strip() == 'lbctl: NOT_FOUND: pool "api" not found'
    code, _, err = await cn.lbctl("pools", "create", "-f", str(api))
    assert code == 0
    code, _, err = await cn.lbctl("pools", "create", "-f", str(api))
    assert code == 1 and err.startswith('lbctl: ALREADY_EXISTS: pool "api" already exists')


async def test_a_stale_revision_is_aborted(nursery: trio.Nursery, tmp_path: Path) -> None:
    a, b = await start_backends(nursery, "a", "b")
    cn = await start_control_node(nursery, tmp_path / "state", pool_toml("web", [a.address]))
    stub = rpc.PoolsStub(cn.channel())
    read = stub.GetPool(pb.GetPoolRequest(name="web"))
    assert read.revision == 1
    await cn.ok("backends", "add", "web", b.address, "--name", "b")  # someone else writes first
    read.ClearField("backends")
    with pytest.raises(grpc.RpcError) as caught:
        stub.UpdatePool(pb.UpdatePoolRequest(pool=read, expected_revision=read.revision))
    assert caught.value.code() == grpc.StatusCode.ABORTED
    assert caught.value.details() == 'pool "web" changed since revision 1 (now at revision 2); read it again and retry'
    code, _, err = await cn.lbctl("pools", "delete", "web", "--revision", "1")
    assert code == 1 and err.startswith('lbctl: ABORTED: pool "web" changed since revision 1')
    assert len(cn.store.get_pool("web").pool.backends) == 2  # nothing lost


async def test_an_invalid_pool_is_invalid_argument_naming_the_field(nursery: trio.Nursery, tmp_path: Path) -> None:
    a = (await start_backends(nursery, "a"))[0]
    cn = await start_control_node(nursery, tmp_path / "state", pool_toml("web", [a.address]))
    stub = rpc.PoolsStub(cn.channel())

    def rejected(pool: pb.Pool) -> tuple[grpc.StatusCode, str]:
        with pytest.raises(grpc.RpcError) as caught:
            stub.CreatePool(pb.CreatePoolRequest(pool=pool))
        return caught.value.code(), caught.value.details()

    bad_address = pb.Pool(name="api", backends=[pb.Backend(address="nope")])
    assert rejected(bad_address) == (grpc.StatusCode.INVALID_ARGUMENT, 'pool.backends[0].address: "nope" is not host:port')
    bad_spec = pb.Pool(name="api", spec_json='{"health": {"interval": "soon"}}')
    code, details = rejected(bad_spec)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith('pool.health.interval: "soon" is not a duration')
    assert rejected(pb.Pool(name="api", spec_json='{"typo": 1}'))[1] == "pool.typo: unknown key"
    assert rejected(pb.Pool(name="api", algorithm="fastest"))[1].startswith('pool.algorithm: "fastest" is not one of')

    # Through lbctl: the server's words for a backend, the file's key path for a file.
    code, _, err = await cn.lbctl("backends", "add", "web", "127.0.0.1:99999")
    assert code == 1
    assert err.strip() == 'lbctl: INVALID_ARGUMENT: backend.address: "127.0.0.1:99999": port 99999 is out of range 1-65535'
    code, _, err = await cn.lbctl("backends", "weight", "web", a.address, "5000")
    assert code == 1 and err.strip() == "lbctl: INVALID_ARGUMENT: backend.weight: must be <= 1000, got 5000"
    bad = tmp_path / "bad.toml"
    bad.write_text('[[pools]]\nname = "api"\n[[pools.backends]]\naddress = "nope"\n')
    code, _, err = await cn.lbctl("apply", "-f", str(bad))
    assert code == 1 and err.strip() == f'lbctl: {bad}: pools[0].backends[0].address: "nope" is not host:port'
    assert [r.pool.name for r in cn.store.list_pools()[0]] == ["web"]


# --------------------------------------------------------------------------- backends


async def test_backend_commands_change_what_the_node_serves(nursery: trio.Nursery, tmp_path: Path) -> None:
    a, b = await start_backends(nursery, "a", "b")
    cn = await start_control_node(nursery, tmp_path / "state", pool_toml("web", [a.address]))
    await serves(cn, {"a"})

    out = await cn.ok("backends", "add", "web", b.address, "--name", "b")
    assert out.strip() == "pool web: backend b added (revision 2)"
    await serves(cn, {"a", "b"})

    await cn.ok("backends", "drain", "web", a.address)  # by address
    await serves(cn, {"b"})
    status = json.loads(await cn.ok("-o", "json", "status"))
    admin = {b_["id"]: b_["admin"] for b_ in status["pools"][0]["backends"]}
    assert admin == {a.address: "draining", "b": "enabled"}

    await cn.ok("backends", "enable", "web", a.address)
    await serves(cn, {"a", "b"})
    await cn.ok("backends", "disable", "web", "b")  # by name
    await serves(cn, {"a"})
    await cn.ok("backends", "enable", "web", "b")
    await cn.ok("backends", "weight", "web", a.address, "0")
    await serves(cn, {"b"})
    await cn.ok("backends", "remove", "web", "b")
    await cn.ok("backends", "weight", "web", a.address, "1")
    await serves(cn, {"a"})

    # Idempotent: enabling an enabled backend writes nothing.
    revision = cn.store.get_pool("web").revision
    await cn.ok("backends", "enable", "web", a.address)
    assert cn.store.get_pool("web").revision == revision
    code, _, err = await cn.lbctl("backends", "drain", "web", "nope")
    assert code == 1 and err.strip() == 'lbctl: NOT_FOUND: pool "web" has no backend "nope"'
    code, _, err = await cn.lbctl("backends", "add", "web", a.address)
    assert code == 1 and err.strip() == f'lbctl: ALREADY_EXISTS: pool "web" already has backend "{a.address}"'


async def test_concurrent_backend_edits_are_retried_and_none_is_lost(nursery: trio.Nursery, tmp_path: Path) -> None:
    cn = await start_control_node(nursery, tmp_path / "state", pool_toml("web", ["127.0.0.1:1"]))
    addresses = [f"127.0.0.1:{2000 + i}" for i in range(6)]

    def add(address: str) -> int:
        with cn.channel() as channel:
            stub = rpc.BackendsStub(channel)
            return stub.AddBackend(pb.AddBackendRequest(pool="web", backend=pb.Backend(address=address))).revision

    async with trio.open_nursery() as writers:
        for address in addresses:
            writers.start_soon(trio.to_thread.run_sync, add, address)
    stored = [str(b.address) for b in cn.store.get_pool("web").pool.backends]
    assert sorted(stored) == sorted(["127.0.0.1:1", *addresses])
    assert cn.store.get_pool("web").revision == 7  # one write each, no lost update


def test_a_stalled_event_stream_is_ended_instead_of_slowing_the_node() -> None:
    from lbnode.control.events import BackendHealthChange, StreamEnded

    hub = EventHub(backlog=3)
    stalled, reader = hub.subscribe(), hub.subscribe()
    for i in range(5):  # never blocks, whoever reads or not
        hub.publish(BackendHealthChange("web", f"b{i}", "up", "down", "timeout"))
        assert reader.get(0) is not None
    assert hub.subscribers == 1 and stalled.overflowed
    got = [stalled.get(0) for _ in range(3)]
    assert [e.event.backend for e in got if e is not None] == ["b0", "b1", "b2"]
    with pytest.raises(StreamEnded) as ended:
        stalled.get(0)
    assert ended.value.overflowed


# --------------------------------------------------------------------------- apply


async def test_apply_shows_the_diff_applies_it_and_a_second_run_changes_nothing(nursery: trio.Nursery, tmp_path: Path) -> None:
    a, b = await start_backends(nursery, "a", "b")
    cn = await start_control_node(
        nursery, tmp_path / "state", pool_toml("web", [a.address]) + pool_toml("old", [a.address])
    )
    desired = tmp_path / "pools.toml"
    desired.write_text(
        pool_toml("web", [a.address, b.address], algorithm="least_connections", _extra='[pools.health]\ninterval = "1s"\n')
        + pool_toml("api", [b.address])
    )
    dry = await cn.ok("apply", "-f", str(desired), "--dry-run")
    assert "dry run: nothing applied" in dry
    assert cn.store.list_pools()[1] == 1

    out = await cn.ok("apply", "-f", str(desired))
    lines = out.splitlines()
    assert "+ pool api: create" in lines
    assert "~ pool web: update (revision 1)" in lines
    assert '    algorithm: "round_robin" -> "least_connections"' in lines
    assert "    health: (none) -> {\"interval\": 1.0}" in lines
    assert f"    backend {b.address}: added" in lines
    assert f"! pool old: not in {desired}; kept (--prune deletes it)" in lines
    assert "1 to create, 1 to update, 0 to delete, 0 unchanged" in lines
    assert lines[-1] == "applied: created api, updated web"
    assert cn.store.get_pool("web").pool.algorithm == "least_connections"
    await serves(cn, {"a", "b"})

    again = await cn.ok("apply", "-f", str(desired))
    assert again.splitlines()[-1] == "no changes"
    assert "= pool web: unchanged" in again

    report = json.loads(await cn.ok("-o", "json", "apply", "-f", str(desired), "--prune"))
    assert report == {"created": [], "updated": [], "deleted": ["old"], "unchanged": ["api", "web"],
                      "kept": [], "applied": True}
    assert [r.pool.name for r in cn.store.list_pools()[0]] == ["api", "web"]


# --------------------------------------------------------------------------- cluster


async def test_status_and_nodes_show_this_node(nursery: trio.Nursery, tmp_path: Path) -> None:
    a = (await start_backends(nursery, "a"))[0]
    dead = f"127.0.0.1:{free_port()}"
    cn = await start_control_node(
        nursery, tmp_path / "state",
        pool_toml("web", [a.address, dead], _extra='[pools.health]\ninterval = "100ms"\nfall = 1\n'),
    )
    status = json.loads(await cn.ok("-o", "json", "status"))
    assert status["node_id"] == "n1" and status["pools_count"] == 1 and status["config_revision"] == 1
    assert isinstance(status["snapshot_version"], int)

    async def dead_is_down() -> bool:
        s = json.loads(await cn.ok("-o", "json", "status"))
        health = {b_["address"]: b_["health"] for b_ in s["pools"][0]["backends"]}
        return health == {a.address: "up", dead: "down"}

    await eventually(dead_is_down, "the health checker marks the dead backend down")
    table = await cn.ok("status")
    assert table.startswith("node n1: serving, revision 1")
    assert any(line.split()[:6] == ["web", dead, dead, "1", "enabled", "down"] for line in table.splitlines())

    nodes = json.loads(await cn.ok("-o", "json", "nodes"))
    assert len(nodes) == 1
    (node,) = nodes
    host, port = cn.bound.listeners["front"]
    assert node["id"] == "n1" and node["control_address"] == cn.endpoint
    assert node["listeners"] == [{"name": "front", "protocol": "http", "address": f"{host}:{port}", "pool": "web"}]
    assert node["health"] == {"pools": 1, "backends": 2, "up": 1, "down": 1, "unknown": 0}
    assert "n1" in (await cn.ok("nodes")).splitlines()[1]


async def test_status_carries_the_counters_a_client_needs_for_rates_and_latency(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    from lbnode.histogram import BUCKETS

    a = (await start_backends(nursery, "a"))[0]
    cn = await start_control_node(nursery, tmp_path / "state", pool_toml("web", [a.address]))

    def traffic() -> list[int]:
        import httpx

        with httpx.Client(timeout=10) as client:
            return [client.get(f"{cn.http}{path}").status_code for path in ("/", "/", "/status/503", "/slow?ms=300")]

    assert await trio.to_thread.run_sync(traffic) == [200, 200, 503, 200]
    with cn.channel() as channel:
        status = await trio.to_thread.run_sync(lambda: rpc.ClusterStub(channel).Status(pb.StatusRequest(), timeout=10))
    (pool,) = status.pools
    assert pool.queue_length == 0 and pool.retries == 0
    (b,) = pool.backends
    assert b.requests == 4 and b.failures == 1
    assert {r.code: r.count for r in b.responses} == {"2xx": 3, "5xx": 1}
    h = b.response_seconds
    assert tuple(h.bounds) == BUCKETS and len(h.counts) == len(BUCKETS) + 1
    assert list(h.counts) == sorted(h.counts) and h.counts[-1] == 4  # cumulative, then the total
    # the 300 ms response is above 250 ms (and within 10 s even on 2 busy cores); the sum holds it
    assert h.counts[BUCKETS.index(0.25)] <= 3 and h.counts[BUCKETS.index(10.0)] == 4 and h.sum >= 0.3


async def test_watch_events_delivers_pool_and_health_changes(nursery: trio.Nursery, tmp_path: Path) -> None:
    a = (await start_backends(nursery, "a"))[0]
    cn = await start_control_node(
        nursery, tmp_path / "state",
        pool_toml("web", [a.address], _extra='[pools.health]\ninterval = "100ms"\nfall = 1\n'),
    )
    stub = rpc.ClusterStub(cn.channel())
    stream = stub.WatchEvents(pb.WatchEventsRequest())
    await trio.to_thread.run_sync(stream.initial_metadata)  # subscribed from here on
    dead = f"127.0.0.1:{free_port()}"
    await cn.ok("backends", "add", "web", dead)

    def until_dead_is_down() -> list[pb.Event]:
        events = []
        for event in stream:  # backend a's own first check (unknown -> up) may come in between
            events.append(event)
            h = event.backend_health
            if event.WhichOneof("event") == "backend_health" and h.backend == dead and h.new == "down":
                return events
        return events

    with trio.fail_after(PROPAGATION):
        events = await trio.to_thread.run_sync(until_dead_is_down)
    stream.cancel()
    pools = [e for e in events if e.WhichOneof("event") == "pool"]
    assert len(pools) == 1 and pools[0].node_id == "n1"
    change = pools[0].pool
    assert change.name == "web" and change.change == pb.PoolChanged.UPDATED and change.revision == 2
    assert [b_.address for b_ in change.pool.backends] == [a.address, dead]
    h = events[-1].backend_health
    assert (h.pool, h.backend, h.old, h.new) == ("web", dead, "unknown", "down") and "refused" in h.reason
    assert events.index(pools[0]) < len(events) - 1  # the node applied the pool before checking the new backend
    assert [e.seq for e in events] == sorted(e.seq for e in events)


async def test_lbctl_watch_streams_json_lines_until_ctrl_c(nursery: trio.Nursery, tmp_path: Path) -> None:
    a = (await start_backends(nursery, "a"))[0]
    cn = await start_control_node(nursery, tmp_path / "state", pool_toml("web", [a.address]))
    proc = subprocess.Popen(
        [sys.executable, "-m", "lbctl.cli", "--insecure", "-e", cn.endpoint, "-o", "json", "watch"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO, text=True, env=FAULTHANDLER_ENV,
    )
    try:
        started = await trio.to_thread.run_sync(proc.stderr.readline)  # type: ignore[union-attr]
        assert started.startswith(f"watching events from {cn.endpoint}")
        api = tmp_path / "api.toml"
        api.write_text(f'name = "api"\n[[backends]]\naddress = "{a.address}"\n')
        await cn.ok("pools", "create", "-f", str(api))
        with trio.fail_after(PROPAGATION):
            line = await trio.to_thread.run_sync(proc.stdout.readline)  # type: ignore[union-attr]
        event = json.loads(line)
        assert event["pool"]["name"] == "api" and event["pool"]["change"] == "CREATED"
        assert event["pool"]["revision"] == 2 and event["node_id"] == "n1"
        proc.send_signal(signal.SIGINT)
        assert await trio.to_thread.run_sync(lambda: exit_code_or_stacks(proc, 10, "lbctl watch after Ctrl-C")) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


async def test_reflection_lists_the_services_and_health_answers_serving(nursery: trio.Nursery, tmp_path: Path) -> None:
    cn = await start_control_node(nursery, tmp_path / "state", pool_toml("web", ["127.0.0.1:1"]))

    def ask() -> tuple[set[str], int, int]:
        channel = cn.channel()
        reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
        replies = reflect.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
        services = {s.name for s in next(replies).list_services_response.service}
        checker = health_pb2_grpc.HealthStub(channel)
        overall = checker.Check(health_pb2.HealthCheckRequest(service="")).status
        pools = checker.Check(health_pb2.HealthCheckRequest(service="fulcrum.v1.Pools")).status
        channel.close()
        return services, overall, pools

    services, overall, pools = await trio.to_thread.run_sync(ask)
    assert {"fulcrum.v1.Pools", "fulcrum.v1.Backends", "fulcrum.v1.Cluster", "grpc.health.v1.Health",
            "grpc.reflection.v1alpha.ServerReflection"} <= services
    assert overall == pools == health_pb2.HealthCheckResponse.SERVING


# --------------------------------------------------------------------------- mutual TLS


async def test_mutual_tls_refuses_clients_without_a_cluster_certificate(
    nursery: trio.Nursery, tmp_path: Path, certs: Certs, other_ca: Certs, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="lbnode.control")
    cn = await start_control_node(nursery, tmp_path / "state", pool_toml("web", ["127.0.0.1:1"]),
                                  settings=certs.settings(), flags=certs.flags())
    out = await cn.ok("status")
    assert out.startswith("node n1:")
    await cn.ok("backends", "drain", "web", "127.0.0.1:1")
    assert any(r.getMessage().startswith("pool web: backend 127.0.0.1:1 draining by lbctl (ipv4:127.0.0.1:")
               for r in caplog.records), "writes are logged with the caller's certificate name"

    no_cert = ["--ca", str(certs.dir / "ca.pem")]
    code, _, err = await lbctl(*no_cert, "-e", cn.endpoint, "status")
    assert code == 1 and err.startswith(f"lbctl: UNAVAILABLE: {cn.endpoint}: ")
    foreign = ["--ca", str(certs.dir / "ca.pem"), "--cert", str(other_ca.dir / "client.pem"),
               "--key", str(other_ca.dir / "client.key")]
    code, _, err = await lbctl(*foreign, "-e", cn.endpoint, "status")
    assert code == 1 and err.startswith("lbctl: UNAVAILABLE")
    code, _, err = await lbctl("--insecure", "-e", cn.endpoint, "status")  # plain text to a TLS port
    assert code == 1 and err.startswith("lbctl: UNAVAILABLE")
    assert "Traceback" not in err

    # The same certificates from the environment, and from a config file with relative paths.
    env = {"LBCTL_ENDPOINTS": f"127.0.0.1:{free_port()},{cn.endpoint}",  # the first is down: the next answers
           "LBCTL_CA": str(certs.dir / "ca.pem"), "LBCTL_CERT": str(certs.dir / "client.pem"),
           "LBCTL_KEY": str(certs.dir / "client.key")}
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        assert (await lbctl("status"))[0] == 0
    config = certs.dir / "lbctl.toml"
    config.write_text(f'endpoints = ["{cn.endpoint}"]\nca = "ca.pem"\ncert = "client.pem"\nkey = "client.key"\noutput = "json"\n')
    code, out, err = await lbctl("--config", str(config), "status")
    assert code == 0, err
    assert json.loads(out)["node_id"] == "n1"


async def test_an_unreadable_certificate_is_one_line_before_serving(nursery: trio.Nursery, tmp_path: Path) -> None:
    from lbnode.listen import BindError

    cn = await start_control_node(nursery, tmp_path / "state", pool_toml("web", ["127.0.0.1:1"]))
    settings = ControlSettings(bind=Address("127.0.0.1", 0), ca=str(tmp_path / "missing.pem"),
                               cert=str(tmp_path / "missing.pem"), key=str(tmp_path / "missing.pem"))
    with pytest.raises(BindError, match=r"^control\.key: cannot read .*missing\.pem: No such file"):
        await nursery.start(serve_control, settings, cn.store, cn.node)
    busy = ControlSettings(bind=Address("127.0.0.1", cn.port), insecure=True)
    with pytest.raises(BindError, match=rf"^control\.bind: cannot listen on 127\.0\.0\.1:{cn.port}"):
        await nursery.start(serve_control, busy, cn.store, cn.node)


async def test_stopping_the_control_api_ends_event_streams_at_once(tmp_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        cn = await start_control_node(nursery, tmp_path / "state", pool_toml("web", ["127.0.0.1:1"]))
        stream = rpc.ClusterStub(cn.channel()).WatchEvents(pb.WatchEventsRequest())
        await trio.to_thread.run_sync(stream.initial_metadata)
        started = trio.current_time()
        nursery.cancel_scope.cancel()
    assert trio.current_time() - started < 1.0  # not the whole stop grace: the stream was ended, not waited for
    with trio.fail_after(5):
        rest = await trio.to_thread.run_sync(lambda: list(stream))
    assert rest == [] and stream.code() == grpc.StatusCode.OK


# --------------------------------------------------------------------------- persistence


async def test_changes_survive_a_restart_of_a_standalone_node(tmp_path: Path) -> None:
    state = tmp_path / "state"
    async with trio.open_nursery() as nursery:
        a, b = await start_backends(nursery, "a", "b")
        async with trio.open_nursery() as first:
            cn = await start_control_node(first, state, pool_toml("web", [a.address]))
            await cn.ok("backends", "add", "web", b.address, "--name", "b")
            await cn.ok("backends", "drain", "web", a.address)
            await serves(cn, {"b"})
            first.cancel_scope.cancel()
        # Same node.toml (still only backend a), same state_dir: the store wins.
        async with trio.open_nursery() as second:
            cn = await start_control_node(second, state, pool_toml("web", [a.address]))
            shown = json.loads(await cn.ok("-o", "json", "pools", "show", "web"))
            assert shown["revision"] == 3
            assert shown["backends"] == [{"address": a.address, "admin": "draining"}, {"address": b.address, "name": "b"}]
            await serves(cn, {"b"})
            second.cancel_scope.cancel()
        nursery.cancel_scope.cancel()


def test_lbctl_as_a_process_version_and_one_line_errors(tmp_path: Path) -> None:
    run = lambda *args: subprocess.run(  # noqa: E731
        [sys.executable, "-m", "lbctl.cli", *args], capture_output=True, text=True, cwd=REPO, timeout=30
    )
    version = run("--version")
    assert version.returncode == 0 and version.stdout.startswith("lbctl ")
    start = time.monotonic()
    down = run("--insecure", "-e", f"127.0.0.1:{free_port()}", "pools", "list")
    assert down.returncode == 1 and down.stdout == ""
    assert down.stderr.count("\n") == 1 and down.stderr.startswith("lbctl: UNAVAILABLE: 127.0.0.1:")
    assert time.monotonic() - start < 10
    no_tls = run("pools", "list")
    assert no_tls.returncode == 1 and no_tls.stderr.startswith("lbctl: no CA certificate")


def test_lbnode_run_keeps_api_changes_across_a_real_restart(spawn: Callable[..., Proc], tmp_path: Path) -> None:
    """``lbnode run`` with [control] and no [cluster]: pools.json in state_dir is the store."""
    from tests.integration.test_node_process import start_backend, wait_log

    a_port, b_port = start_backend(spawn, "a"), start_backend(spawn, "b")
    a, b = f"127.0.0.1:{a_port}", f"127.0.0.1:{b_port}"
    port, control = free_port(), free_port()
    config = tmp_path / "node.toml"
    config.write_text(
        node_toml(pool_toml("web", [a]), listener_toml("front", "http", "web", bind=f"127.0.0.1:{port}"),
                  node_id="n1", admin=None, node_extra=f'state_dir = "{tmp_path / "state"}"\n')
        + f'[control]\nbind = "127.0.0.1:{control}"\ninsecure = true\n'
    )

    def lbctl_process(*args: str) -> str:
        done = subprocess.run([sys.executable, "-m", "lbctl.cli", "--insecure", "-e", f"127.0.0.1:{control}", *args],
                              capture_output=True, text=True, cwd=REPO, timeout=30)
        assert done.returncode == 0, done.stderr
        return done.stdout

    def backends_serving() -> set[str]:
        import httpx

        with httpx.Client(timeout=5) as client:
            return {client.get(f"http://127.0.0.1:{port}/").headers["x-backend"] for _ in range(6)}

    def eventually_serving(expected: set[str]) -> None:
        deadline = time.monotonic() + PROPAGATION
        while backends_serving() != expected:
            assert time.monotonic() < deadline, f"not serving exactly {expected}"
            time.sleep(0.05)

    node = spawn("-m", "lbnode.cli", "run", "--config", str(config), name="node")
    wait_log(node, r"listener front: http on ")
    # [control] must be served by `lbnode run`: its absence is a regression, not a reason to skip.
    assert "control API on" in node.log(), f"lbnode run did not start the control API:\n{node.log()[-3000:]}"
    lbctl_process("backends", "add", "web", b, "--name", "b")
    lbctl_process("backends", "drain", "web", a)
    eventually_serving({"b"})
    assert node.terminate() == 0

    again = spawn("-m", "lbnode.cli", "run", "--config", str(config), name="node-again")
    wait_log(again, r"listener front: http on ")
    shown = json.loads(lbctl_process("-o", "json", "pools", "show", "web"))
    assert shown["backends"] == [{"address": a, "admin": "draining"}, {"address": b, "name": "b"}]
    eventually_serving({"b"})
    assert again.terminate() == 0


# --------------------------------------------------------------------------- roles


def tls_channel(certs: Certs, client: str, endpoint: str) -> grpc.Channel:
    credentials = grpc.ssl_channel_credentials(
        root_certificates=(certs.dir / "ca.pem").read_bytes(),
        private_key=(certs.dir / f"{client}.key").read_bytes(),
        certificate_chain=(certs.dir / f"{client}.pem").read_bytes(),
    )
    return grpc.secure_channel(endpoint, credentials)


def refusal(call: Callable[[], object]) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    return caught.value.code(), caught.value.details()


async def test_a_reader_certificate_reads_and_watches_and_every_write_is_refused_naming_the_role(
    nursery: trio.Nursery, tmp_path: Path, certs: Certs, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="lbnode.control")
    cn = await start_control_node(nursery, tmp_path / "state", pool_toml("web", ["127.0.0.1:1"]),
                                  settings=certs.settings(), flags=certs.flags())

    def as_reader() -> None:
        with tls_channel(certs, "reader", cn.endpoint) as channel:
            pools, backends = rpc.PoolsStub(channel), rpc.BackendsStub(channel)
            cluster, routes = rpc.ClusterStub(channel), rpc.RoutesStub(channel)
            assert [p.name for p in pools.ListPools(pb.ListPoolsRequest()).pools] == ["web"]
            assert list(routes.ListRoutes(pb.ListRoutesRequest()).routes) == []
            assert pools.GetPool(pb.GetPoolRequest(name="web")).name == "web"
            assert cluster.Status(pb.StatusRequest()).node_id == "n1"
            assert [n.id for n in cluster.ListNodes(pb.ListNodesRequest()).nodes] == ["n1"]
            stream = cluster.WatchEvents(pb.WatchEventsRequest())
            stream.initial_metadata()  # subscribed: the headers came
            stream.cancel()
            health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""))
            assert health.status == health_pb2.HealthCheckResponse.SERVING
            who = '"lbctl-reader" has the read role (certificate OU=read)'
            assert refusal(lambda: backends.Drain(pb.BackendRequest(pool="web", backend="127.0.0.1:1"))) == (
                grpc.StatusCode.PERMISSION_DENIED, f"/fulcrum.v1.Backends/Drain needs the admin role; {who}")
            for name, call in {
                "Pools/CreatePool": lambda: pools.CreatePool(pb.CreatePoolRequest(pool=pb.Pool(name="x"))),
                "Pools/DeletePool": lambda: pools.DeletePool(pb.DeletePoolRequest(name="web")),
                "Backends/SetWeight": lambda: backends.SetWeight(
                    pb.SetWeightRequest(pool="web", backend="127.0.0.1:1", weight=5)),
                "Cluster/DrainNode": lambda: cluster.DrainNode(pb.DrainNodeRequest(node_id="n1")),
                "Routes/PutRoute": lambda: routes.PutRoute(pb.PutRouteRequest(
                    route=pb.Route(listener="front", name="r", spec_json='{"pool": "web"}'))),
                "Routes/DeleteRoute": lambda: routes.DeleteRoute(pb.DeleteRouteRequest(listener="front", name="r")),
            }.items():
                assert refusal(call) == (grpc.StatusCode.PERMISSION_DENIED,
                                         f"/fulcrum.v1.{name} needs the admin role; {who}")

    await trio.to_thread.run_sync(as_reader)
    stored = cn.store.get_pool("web")
    assert stored.revision == 1 and stored.pool.backends[0].admin == "enabled", "nothing was written"
    assert cn.store.routes.list_routes() == ([], 0)
    assert not cn.node.draining
    assert any(r.getMessage().startswith("refused /fulcrum.v1.Cluster/DrainNode to lbctl-reader (ipv4:127.0.0.1:")
               for r in caplog.records)

    # lbctl with the reader certificate: reads work, a write is one line naming the role.
    reader = ["--ca", str(certs.dir / "ca.pem"), "--cert", str(certs.dir / "reader.pem"),
              "--key", str(certs.dir / "reader.key"), "-e", cn.endpoint]
    code, out, _ = await lbctl(*reader, "pools", "list")
    assert code == 0 and out.splitlines()[1].split()[0] == "web"
    code, _, err = await lbctl(*reader, "backends", "weight", "web", "127.0.0.1:1", "3")
    assert code == 1 and err == ("lbctl: PERMISSION_DENIED: /fulcrum.v1.Backends/SetWeight needs the admin role; "
                                 '"lbctl-reader" has the read role (certificate OU=read)\n')

    # The admin certificate (lbctl's default client.pem) writes, and the write names it.
    caplog.clear()
    assert (await cn.ok("backends", "weight", "web", "127.0.0.1:1", "3")).strip() == \
        "pool web: backend 127.0.0.1:1 weight 3 (revision 2)"
    assert any(r.getMessage().startswith("pool web: backend 127.0.0.1:1 weight 3 by lbctl (ipv4:127.0.0.1:")
               for r in caplog.records)


async def test_certificates_without_a_role_get_nothing_and_node_toml_lists_override_the_ou(
    nursery: trio.Nursery, tmp_path: Path, certs: Certs
) -> None:
    from dataclasses import replace

    settings = replace(certs.settings(), readers=frozenset({"lbctl"}), admins=frozenset({"lbctl-reader"}))
    cn = await start_control_node(nursery, tmp_path / "state", pool_toml("web", ["127.0.0.1:1"]),
                                  settings=settings, flags=certs.flags())

    def calls() -> None:
        # A node's certificate is signed by the same CA but carries no role.
        with tls_channel(certs, "n1", cn.endpoint) as channel:
            assert refusal(lambda: rpc.ClusterStub(channel).Status(pb.StatusRequest())) == (
                grpc.StatusCode.PERMISSION_DENIED,
                '/fulcrum.v1.Cluster/Status needs the read role; "n1" has no role (certificate no OU: '
                "expected OU=admin or OU=read, or its CN in control.admins / control.readers)",
            )
            # streams too (the check runs before the handler's generator starts)
            code, details = refusal(lambda: next(rpc.ClusterStub(channel).WatchEvents(pb.WatchEventsRequest())))
            assert code == grpc.StatusCode.PERMISSION_DENIED
            assert details.startswith('/fulcrum.v1.Cluster/WatchEvents needs the read role; "n1" has no role')
            reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
            code, _ = refusal(lambda: next(reflect.ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")]))))
            assert code == grpc.StatusCode.PERMISSION_DENIED
        # control.readers demotes the admin certificate; control.admins promotes the reader.
        with tls_channel(certs, "client", cn.endpoint) as channel:
            assert rpc.ClusterStub(channel).Status(pb.StatusRequest()).node_id == "n1"
            assert refusal(lambda: rpc.PoolsStub(channel).DeletePool(pb.DeletePoolRequest(name="web"))) == (
                grpc.StatusCode.PERMISSION_DENIED,
                '/fulcrum.v1.Pools/DeletePool needs the admin role; "lbctl" has the read role (listed in control.readers)',
            )
        with tls_channel(certs, "reader", cn.endpoint) as channel:
            backends = rpc.BackendsStub(channel)
            assert backends.Drain(pb.BackendRequest(pool="web", backend="127.0.0.1:1")).revision == 2

    await trio.to_thread.run_sync(calls)
    assert cn.store.get_pool("web").pool.backends[0].admin == "draining"


async def test_the_client_certificate_of_an_older_certs_init_keeps_admin_over_grpc(
    nursery: trio.Nursery, tmp_path: Path, certs: Certs
) -> None:
    from tests.unit.test_control_roles import legacy_client

    # client.pem as `lbctl certs init` wrote it before roles: CN lbctl, no OU (key written beside it).
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    for name in ("ca.pem", "ca.key"):
        (legacy / name).write_bytes((certs.dir / name).read_bytes())
    pem, key = legacy_client(legacy)
    (legacy / "client.pem").write_bytes(pem)
    (legacy / "client.key").write_bytes(key)
    cn = await start_control_node(nursery, tmp_path / "state", pool_toml("web", ["127.0.0.1:1"]),
                                  settings=certs.settings(), flags=certs.flags())

    def drain() -> int:
        with tls_channel(Certs(legacy), "client", cn.endpoint) as channel:
            return rpc.BackendsStub(channel).Drain(pb.BackendRequest(pool="web", backend="127.0.0.1:1")).revision

    assert await trio.to_thread.run_sync(drain) == 2
    assert cn.store.get_pool("web").pool.backends[0].admin == "draining"
