"""Routes as store objects: the stored table is parsed by the file's own parser (names, order,
validation), and the standalone file store keeps them with revisions, conflicts and a watch."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lbnode.cluster.routestore import FileRoutes, decode_route, encode_route
from lbnode.cluster.store import (
    AlreadyExists,
    Conflict,
    NotFound,
    RouteEvent,
    RouteResync,
    StopFlag,
)
from lbnode.config import load_config_text
from lbnode.model import (
    ConfigError,
    ConfigFileError,
    check_route_pools,
    missing_pools,
    route_from_dict,
)
from lbnode.routing import RouteTable, route_order


def route(**table: object):  # type: ignore[no-untyped-def]
    return route_from_dict({"pool": "web", **table})


def test_a_route_without_a_name_in_node_toml_is_named_after_its_place() -> None:
    config = load_config_text("""
[node]
id = "n1"
[[pools]]
name = "web"
[[pools]]
name = "api"
[[listeners]]
name = "public"
protocol = "http"
bind = "127.0.0.1:0"
pool = "web"
  [[listeners.routes]]
  path_prefix = "/a/"
  pool = "api"
  [[listeners.routes]]
  name = "images"
  path_prefix = "/img/"
  pool = "api"
  [[listeners.routes]]
  path_prefix = "/b/"
  pool = "api"
""")
    assert [r.name for r in config.listeners[0].routes] == ["0", "images", "2"]
    assert config.listeners[0].routes[1].spec == {"name": "images", "path_prefix": "/img/", "pool": "api"}


def test_two_routes_of_a_listener_with_one_name_are_refused_naming_the_key() -> None:
    text = """
[node]
id = "n1"
[[pools]]
name = "web"
[[listeners]]
name = "public"
protocol = "http"
bind = "127.0.0.1:0"
pool = "web"
  [[listeners.routes]]
  path = "/x"
  pool = "web"
  [[listeners.routes]]
  name = "0"
  path = "/y"
  pool = "web"
"""
    with pytest.raises(ConfigFileError, match=r'listeners\[0\]\.routes\[1\]\.name: "0" is already used by listeners\[0\]\.routes\[0\]'):
        load_config_text(text)


def test_order_is_priority_then_name_with_numbers_compared_as_numbers() -> None:
    routes = [route(name="route-10"), route(name="b", priority=5), route(name="route-2"), route(name="a"),
              route(name="10"), route(name="9")]
    assert [r.name for r in route_order(routes)] == ["b", "9", "10", "a", "route-2", "route-10"]
    # the compiled table tries them in that order too, whatever order they came in
    assert [r.name for r in RouteTable(list(reversed(routes))).candidates(None)] == \
        ["b", "9", "10", "a", "route-2", "route-10"]


@pytest.mark.parametrize(
    ("table", "key"),
    [
        ({"name": "r", "path_regex": "(a+)+$", "pool": "web"}, "route.path_regex"),
        ({"name": "r", "pool": "web", "split": [{"pool": "a", "weight": 1}]}, "route.split"),
        ({"name": "r", "split": [{"pool": "a", "weight": 0}]}, r"route.split\[0\].weight"),
        ({"name": "r", "pool": "web", "paht": "/"}, "route.paht"),
        ({"name": "bad name", "pool": "web"}, "route.name"),
        ({"pool": "web"}, "route.name"),
    ],
)
def test_an_invalid_stored_route_is_refused_naming_the_field(table: dict[str, object], key: str) -> None:
    with pytest.raises(ConfigError, match=rf"^{key}: "):
        route_from_dict(table)


def test_pools_a_route_names_are_checked_by_key() -> None:
    split = route_from_dict({"name": "s", "split": [{"pool": "web", "weight": 1}, {"pool": "gone", "weight": 1}]})
    with pytest.raises(ConfigError, match=r'^route\.split\[1\]\.pool: pool "gone" is not defined'):
        check_route_pools(split, {"web"}, "route")
    assert missing_pools(split, {"web"}) == ["gone"]
    assert missing_pools(route(name="r"), {"web"}) == []


def test_the_stored_value_is_the_table_as_json_and_reads_back_equal() -> None:
    r = route(name="api", path_prefix="/api/", headers=[{"name": "X-Beta", "present": True}], priority=3)
    value = encode_route(r)
    assert json.loads(value) == {"name": "api", "path_prefix": "/api/", "pool": "web",
                                 "headers": [{"name": "X-Beta", "present": True}], "priority": 3}
    back = decode_route("public", "api", value)
    assert back == r and back.spec == r.spec
    with pytest.raises(ConfigError, match=r'route\.name: "api" does not match the key \(expected "other"\)'):
        decode_route("public", "other", value)


def test_file_routes_seed_once_write_with_revisions_and_survive_a_restart(tmp_path: Path) -> None:
    seed = [("public", route(name="a", path="/a"))]
    store = FileRoutes(tmp_path, seed)
    records, revision = store.list_routes()
    assert [(r.listener, r.route.name, r.revision) for r in records] == [("public", "a", 1)] and revision == 1
    with pytest.raises(AlreadyExists):
        store.put_route("public", route(name="a", path="/x"), 0)
    b = store.put_route("public", route(name="b", path="/b"), 0)
    assert b.revision == 2
    with pytest.raises(Conflict, match=r'route "b" of listener "public" changed since revision 1 \(now at 2\)'):
        store.put_route("public", route(name="b", path="/c"), 1)
    store.put_route("public", route(name="b", path="/c"), 2)
    with pytest.raises(NotFound):
        store.delete_route("public", "nope")
    store.delete_route("public", "a")
    # a restart reads the file; node.toml's seed no longer applies
    again = FileRoutes(tmp_path, seed)
    assert [(r.route.name, r.route.path) for r in again.list_routes()[0]] == [("b", "/c")]
    assert (tmp_path / "routes.json").stat().st_mode & 0o777 == 0o600


def test_file_route_watch_yields_changes_after_a_revision_then_a_resync_for_a_stranger(tmp_path: Path) -> None:
    store = FileRoutes(tmp_path)
    store.put_route("public", route(name="a"))
    store.put_route("public", route(name="b"))
    store.delete_route("public", "a")
    stop = StopFlag()
    events = []
    for event in store.watch_routes(1, stop):
        events.append(event)
        if len(events) == 2:
            stop.set()
    assert [(e.name, e.record is None, e.revision) for e in events if isinstance(e, RouteEvent)] == \
        [("b", False, 2), ("a", True, 3)]
    stop = StopFlag()
    first = next(iter(store.watch_routes(99, stop)))
    assert isinstance(first, RouteResync) and [r.route.name for r in first.records] == ["b"]


async def test_the_follower_gives_each_http_listener_the_store_routes_and_logs_the_others_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import trio

    from lbnode.cluster.filestore import FileStore
    from lbnode.cluster.sync import StoreFollower

    config = load_config_text("""
[node]
id = "n1"
[control]
bind = "127.0.0.1:0"
insecure = true
[[pools]]
name = "web"
[[listeners]]
name = "front"
protocol = "http"
bind = "127.0.0.1:0"
pool = "web"
  [[listeners.routes]]
  name = "from-file"
  path = "/f"
  pool = "web"
[[listeners]]
name = "raw"
protocol = "tcp"
bind = "127.0.0.1:0"
pool = "web"
""")
    store = FileStore(tmp_path, config.pools)  # not seeded with node.toml's route: the store wins
    for listener, name in (("front", "b"), ("front", "a"), ("nowhere", "x"), ("raw", "y")):
        store.routes.put_route(listener, route(name=name))
    applied = [config]
    follower = StoreFollower(store, lambda: applied[-1], applied.append)
    async with trio.open_nursery() as nursery:
        await nursery.start(follower.run)
        await follower.settled.wait()
        store.routes.delete_route("front", "b")
        with trio.fail_after(5):
            while [r.name for r in applied[-1].listeners[0].routes] != ["a"]:
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    front, raw = applied[-1].listeners
    assert [r.name for r in front.routes] == ["a"] and raw.routes == ()
    orphans = [r.getMessage() for r in caplog.records if "is in the store, but this node has no" in r.getMessage()]
    assert sorted(orphans) == [
        'route "x" of listener "nowhere" is in the store, but this node has no http or https listener of that name: '
        "not served here",
        'route "y" of listener "raw" is in the store, but this node has no http or https listener of that name: '
        "not served here",
    ]
