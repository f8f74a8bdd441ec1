"""Routes as store objects on a standalone node with [control]: lbctl routes and lbctl apply,
validation before storing, a deleted pool's 503, a swap under load, a restart.

A real LbNode following a real FileStore in state_dir, its own control API on 127.0.0.1,
real demo backends, lbctl's real main() and real HTTP clients (httpx, in worker threads).
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
import trio

from lbnode.api.fulcrum.v1 import control_pb2 as pb
from lbnode.api.fulcrum.v1 import control_pb2_grpc as rpc
from lbnode.cluster.filestore import FileStore
from lbnode.config import load_config_text
from lbnode.node import LbNode
from tests.conftest import listener_toml, node_toml, pool_toml, start_backends
from tests.integration.test_control_api import ControlNode, eventually
from tests.tlsgen import make_ca, make_leaf

SEEDED_ROUTE = '  [[listeners.routes]]\n  path_prefix = "/seeded/"\n  pool = "api"\n'


@pytest.fixture(autouse=True)
def _no_lbctl_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in list(os.environ):
        if name.startswith("LBCTL_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "no-config"))


async def start(nursery: trio.Nursery, tmp_path: Path, web: str, api: str) -> ControlNode:
    """Pools web and api, an http listener "front" (pool web) with one node.toml route, a tcp listener."""
    state = tmp_path / "state"
    config = load_config_text(
        node_toml(pool_toml("web", [web]), pool_toml("api", [api]),
                  listener_toml("front", "http", "web", extra=SEEDED_ROUTE),
                  listener_toml("raw", "tcp", "web"),
                  '[control]\nbind = "127.0.0.1:0"\ninsecure = true\n',
                  node_id="n1", node_extra=f'state_dir = "{state}"\n'),
        "test.toml",
    )
    from lbnode.model import listener_routes

    store = FileStore(state, config.pools, listener_routes(config.listeners))
    node = LbNode(config, store)
    bound = await nursery.start(lambda task_status: node.run(handle_signals=False, task_status=task_status))
    assert node.control_port is not None
    return ControlNode(node, bound, node.control_port, store, ["--insecure"])


async def get(url: str) -> httpx.Response:
    def run() -> httpx.Response:
        with httpx.Client(timeout=10) as client:
            return client.get(url)

    return await trio.to_thread.run_sync(run)


async def backend_of(cn: ControlNode, path: str) -> str:
    r = await get(cn.http + path)
    return r.headers.get("x-backend", f"status {r.status_code}")


async def goes_to(cn: ControlNode, path: str, backend: str) -> None:
    async def check() -> bool:
        return await backend_of(cn, path) == backend

    await eventually(check, f"{path} goes to {backend}")


async def put(cn: ControlNode, route: pb.Route, **kw: Any) -> Any:
    def run() -> Any:
        with cn.channel() as channel:
            try:
                return rpc.RoutesStub(channel).PutRoute(pb.PutRouteRequest(route=route, **kw), timeout=10)
            except grpc.RpcError as exc:
                return exc

    return await trio.to_thread.run_sync(run)


async def test_routes_seeded_listed_applied_idempotently_and_deleted_through_lbctl(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    a, b = await start_backends(nursery, "a", "b")
    cn = await start(nursery, tmp_path, a.address, b.address)
    # node.toml's route seeded the store, named after its place
    listed = json.loads(await cn.ok("-o", "json", "routes", "list"))
    assert listed["routes"] == [{"listener": "front", "name": "0", "revision": 1, "path_prefix": "/seeded/",
                                 "pool": "api"}]
    assert await backend_of(cn, "/seeded/x") == "b"

    desired = tmp_path / "site.toml"
    desired.write_text(
        pool_toml("web", [a.address]) + pool_toml("api", [b.address])
        + '[[routes]]\nlistener = "front"\nname = "api"\npath_prefix = "/api/"\npool = "api"\npriority = 10\n'
        + '[[routes]]\nlistener = "front"\nname = "0"\npath_prefix = "/seeded/"\npool = "web"\n'
    )
    out = await cn.ok("apply", "-f", str(desired))
    lines = out.splitlines()
    assert "+ route front/api: create" in lines and '    path_prefix: (none) -> "/api/"' in lines
    assert "~ route front/0: update (revision 1)" in lines and '    pool: "api" -> "web"' in lines
    assert "= pool web: unchanged" in lines
    assert lines[-1] == "applied: created route front/api, updated route front/0", lines
    await goes_to(cn, "/api/x", "b")
    await goes_to(cn, "/seeded/x", "a")

    again = await cn.ok("apply", "-f", str(desired))
    assert again.splitlines()[-1] == "no changes" and "= route front/api: unchanged" in again

    table = await cn.ok("routes", "list")
    assert table.splitlines()[0].split() == ["LISTENER", "NAME", "PRIORITY", "MATCH", "POOLS", "REVISION"]
    assert [row.split()[:3] for row in table.splitlines()[1:]] == [["front", "api", "10"], ["front", "0", "0"]]
    shown = await cn.ok("routes", "show", "front", "api")
    assert shown.splitlines()[0].startswith("route api of listener front (revision ")
    assert '  path_prefix = "/api/"' in shown

    # routes apply: only the file's routes; --prune deletes the others
    only = tmp_path / "routes.toml"
    only.write_text('[[routes]]\nlistener = "front"\nname = "api"\npath_prefix = "/v2/"\npool = "api"\n')
    report = json.loads(await cn.ok("-o", "json", "routes", "apply", "-f", str(only), "--prune"))
    assert report["routes"]["deleted"] == ["front/0"] and report["routes"]["updated"][0]["name"] == "front/api"
    assert report["applied"] is True and "created" not in report  # pools are not part of it
    await goes_to(cn, "/v2/x", "b")
    await goes_to(cn, "/seeded/x", "a")  # no route: the listener's pool
    assert (await cn.ok("routes", "delete", "front", "api")).strip() == "route api of listener front deleted"
    await goes_to(cn, "/v2/x", "a")
    assert json.loads(await cn.ok("-o", "json", "routes", "list"))["routes"] == []


@pytest.mark.parametrize(
    ("route", "message"),
    [
        (pb.Route(listener="front", name="r", spec_json='{"path_regex": "(a+)+$", "pool": "api"}'),
         "route.path_regex: \"(a+)+$\" repeats a repetition"),
        (pb.Route(listener="front", name="r", spec_json='{"path": "/x", "pool": "nope"}'),
         'route.pool: pool "nope" is not defined'),
        (pb.Route(listener="front", name="r", spec_json='{"split": [{"pool": "web", "weight": 1}, '
                                                        '{"pool": "gone", "weight": 1}]}'),
         'route.split[1].pool: pool "gone" is not defined'),
        (pb.Route(listener="front", name="r", spec_json='{"pool": "api", "split": [{"pool": "web", "weight": 1}]}'),
         "route.split: conflicts with pool: give one of pool, split, redirect, fixed_response"),
        (pb.Route(listener="front", name="r", spec_json='{"split": [{"pool": "web", "weight": 0}]}'),
         "route.split[0].weight: must be >= 1, got 0"),
        (pb.Route(listener="front", name="r", spec_json='{"pool": "api", "path": "x"}'),
         'route.path: "x" must start with "/"'),
        (pb.Route(listener="front", name="r", spec_json='{"pool": "api", "pth": "/x"}'), "route.pth: unknown key"),
        (pb.Route(listener="nowhere", name="r", spec_json='{"pool": "api"}'),
         'route.listener: listener "nowhere" is not defined on this node'),
        (pb.Route(listener="raw", name="r", spec_json='{"pool": "api"}'),
         'route.listener: listener "raw" is "tcp": routes need an http or https listener'),
        (pb.Route(listener="front", name="bad name", spec_json='{"pool": "api"}'), "route.name: "),
        (pb.Route(listener="front", name="r", spec_json='{"name": "x", "pool": "api"}'),
         "route.spec_json.name: set it in the Route message field 'name'"),
    ],
)
async def test_an_invalid_route_is_invalid_argument_naming_the_field_and_nothing_is_stored(
    nursery: trio.Nursery, tmp_path: Path, route: pb.Route, message: str
) -> None:
    cn = await start(nursery, tmp_path, "127.0.0.1:9", "127.0.0.1:9")
    before = (tmp_path / "state" / "routes.json").read_bytes()
    result = await put(cn, route)
    assert isinstance(result, grpc.RpcError), result
    assert result.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert result.details().startswith(message), result.details()
    assert (tmp_path / "state" / "routes.json").read_bytes() == before
    assert [r.route.name for r in cn.store.routes.list_routes()[0]] == ["0"]


async def test_a_route_whose_pool_is_deleted_answers_503_with_the_reason_and_is_flagged(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    a, b = await start_backends(nursery, "a", "b")
    cn = await start(nursery, tmp_path, a.address, b.address)
    await cn.ok("pools", "delete", "api")  # the seeded route "0" still names it

    async def refused() -> bool:
        return (await get(cn.http + "/seeded/x")).status_code == 503

    await eventually(refused, "the route's requests answer 503 once its pool is gone")
    r = await get(cn.http + "/seeded/x")
    assert r.text == "503 Service Unavailable: pool api is not configured\n"
    assert await backend_of(cn, "/other") == "a"  # the rest of the listener is served
    table = await cn.ok("routes", "list")
    assert "MISSING POOL api: 503" in table.splitlines()[1], table
    listed = json.loads(await cn.ok("-o", "json", "routes", "list"))
    assert listed["routes"][0]["missing_pools"] == ["api"]


async def test_route_swaps_under_load_fail_no_request(nursery: trio.Nursery, tmp_path: Path) -> None:
    """Clients on keep-alive connections send requests back to back while the route of /api/
    flips between the two pools 30 times: every request is answered 200 by one of them."""
    a, b = await start_backends(nursery, "a", "b")
    cn = await start(nursery, tmp_path, a.address, b.address)
    stop = threading.Event()
    results: list[tuple[int, str, float]] = []
    errors: list[str] = []

    def client() -> None:
        with httpx.Client(timeout=10) as c:
            while not stop.is_set():
                started = time.monotonic()
                try:
                    r = c.get(cn.http + "/api/x")
                except httpx.HTTPError as exc:
                    errors.append(repr(exc))
                    continue
                results.append((r.status_code, r.headers.get("x-backend", ""), time.monotonic() - started))

    async with trio.open_nursery() as clients:
        for _ in range(4):
            clients.start_soon(trio.to_thread.run_sync, client)
        await trio.sleep(0.3)
        for i in range(30):
            pool = "api" if i % 2 == 0 else "web"
            route = pb.Route(listener="front", name="api", spec_json=json.dumps({"path_prefix": "/api/", "pool": pool}))
            assert isinstance(await put(cn, route), pb.Route)
            await goes_to(cn, "/api/x", "b" if pool == "api" else "a")
        stop.set()
    assert errors == []
    assert len(results) > 100
    assert {status for status, _, _ in results} == {200}
    assert {backend for _, backend, _ in results} == {"a", "b"}
    # No request waits on a swap: a request reads the snapshot once, and a swap is one snapshot
    # build on the node's thread (milliseconds for two pools and a route). 1 s is the margin for
    # a busy 2-core host, where a request may wait for scheduler slices of the other suites.
    latencies = sorted(took for _, _, took in results)
    print(f"\n{len(results)} requests through 30 route swaps: p50 {latencies[len(latencies) // 2] * 1000:.1f} ms, "
          f"p99 {latencies[int(len(latencies) * 0.99)] * 1000:.1f} ms, max {latencies[-1] * 1000:.1f} ms")
    assert latencies[-1] < 1.0


async def test_a_restarted_node_serves_the_stored_routes_not_node_toml_again(nursery: trio.Nursery, tmp_path: Path) -> None:
    a, b = await start_backends(nursery, "a", "b")
    async with trio.open_nursery() as first:
        cn = await start(first, tmp_path, a.address, b.address)
        await cn.ok("routes", "delete", "front", "0")
        route = pb.Route(listener="front", name="kept", spec_json='{"path": "/kept", "pool": "api"}')
        assert isinstance(await put(cn, route), pb.Route)
        first.cancel_scope.cancel()
    again = await start(nursery, tmp_path, a.address, b.address)
    assert [r.name for r in again.node.snapshot.routes["front"].routes] == ["kept"]
    assert await backend_of(again, "/kept") == "b"
    assert await backend_of(again, "/seeded/x") == "a"


async def test_apply_takes_certificates_from_files_and_a_second_run_changes_nothing(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    cn = await start(nursery, tmp_path, "127.0.0.1:9", "127.0.0.1:9")
    issued = make_leaf(make_ca("Apply CA"), ["www.example.com"])
    crt, key = issued.write(tmp_path, "www")
    desired = tmp_path / "site.toml"
    desired.write_text(f'[[certificates]]\nname = "www"\ncert = "{Path(crt).name}"\nkey = "{Path(key).name}"\n')
    out = await cn.ok("apply", "-f", str(desired))
    assert "+ certificate www: create" in out and out.splitlines()[-1] == "applied: created certificate www"
    assert cn.store.certificates.get_certificate("www").certificate.names == ("www.example.com",)
    again = await cn.ok("apply", "-f", str(desired))
    assert "= certificate www: unchanged" in again and again.splitlines()[-1] == "no changes"


async def test_watch_events_tells_route_changes_as_this_node_applied_them(nursery: trio.Nursery, tmp_path: Path) -> None:
    from lbctl.cli import describe_event

    cn = await start(nursery, tmp_path, "127.0.0.1:9", "127.0.0.1:9")
    channel = cn.channel()
    stream = rpc.ClusterStub(channel).WatchEvents(pb.WatchEventsRequest())
    await trio.to_thread.run_sync(stream.initial_metadata)  # subscribed from here on
    for pool in ("api", "web"):
        assert isinstance(await put(cn, pb.Route(listener="front", name="r", spec_json=json.dumps({"pool": pool}))),
                          pb.Route)
    await cn.ok("routes", "delete", "front", "r")

    def three() -> list[pb.Event]:
        events = []
        for event in stream:
            if event.WhichOneof("event") == "route":
                events.append(event)
                if len(events) == 3:
                    return events
        return events

    with trio.fail_after(5):  # store -> watch -> snapshot takes milliseconds
        events = await trio.to_thread.run_sync(three)
    stream.cancel()
    channel.close()
    assert [(e.route.listener, e.route.name, e.route.change, e.route.revision) for e in events] == [
        ("front", "r", pb.RouteChanged.CREATED, 2),
        ("front", "r", pb.RouteChanged.UPDATED, 3),
        ("front", "r", pb.RouteChanged.DELETED, 3),
    ]
    assert describe_event(events[1]).endswith("n1 route front/r updated (revision 3)")


async def test_stored_routes_carry_their_actions(nursery: trio.Nursery, tmp_path: Path) -> None:
    """A route applied through lbctl keeps every action key (the store keeps the route's table,
    parsed by the file's parser): a redirect, a fixed answer, header edits with a path
    rewrite, a deny and a mirror all act on a node that learned them from the store only."""
    a, b = await start_backends(nursery, "a", "b")
    cn = await start(nursery, tmp_path, a.address, b.address)
    desired = tmp_path / "actions.toml"
    desired.write_text(
        pool_toml("web", [a.address]) + pool_toml("api", [b.address])
        + '[[routes]]\nlistener = "front"\nname = "old"\npath_prefix = "/old/"\n'
          'redirect = {status = 308, path = "/new/"}\n'
        + '[[routes]]\nlistener = "front"\nname = "teapot"\npath = "/tea"\n'
          'fixed_response = {status = 418, body = "short and stout", content_type = "text/plain"}\n'
        + '[[routes]]\nlistener = "front"\nname = "v2"\npath_prefix = "/v2/"\npool = "api"\n'
          'request_headers = {set = {X-Api-Version = "2"}}\nrewrite = {path_prefix = "/"}\n'
          'mirror = {pool = "web", percent = 100}\n'
        + '[[routes]]\nlistener = "front"\nname = "closed"\npath_prefix = "/closed/"\npool = "api"\n'
          'deny_cidrs = ["127.0.0.0/8"]\n'
    )
    out = await cn.ok("apply", "-f", str(desired))
    assert out.splitlines()[-1].startswith("applied: created route front/closed"), out

    async def redirected() -> bool:
        r = await get(cn.http + "/old/page?q=1")
        return r.status_code == 308
    await eventually(redirected, "the stored redirect route answers")
    r = await get(cn.http + "/old/page?q=1")
    assert r.headers["location"].endswith("/new/?q=1")  # path replaced, query kept
    tea = await get(cn.http + "/tea")
    assert (tea.status_code, tea.text, tea.headers["content-type"]) == (418, "short and stout", "text/plain")
    echoed = await get(cn.http + "/v2/echo")
    assert echoed.status_code == 200 and echoed.headers["x-backend"] == "b"
    assert echoed.text.startswith("GET /echo HTTP/1.1") and "X-Api-Version: 2" in echoed.text
    assert (await get(cn.http + "/closed/x")).status_code == 403

    async def mirrored() -> bool:  # backend a (pool web) got the copy of /v2/echo, rewritten as well
        return a.stats.paths.get("/echo", 0) >= 1
    await eventually(mirrored, "the mirror pool got a copy")
