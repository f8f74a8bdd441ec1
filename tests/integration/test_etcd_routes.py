"""Routes in etcd (``{prefix}/routes/<listener>/<name>``) against a real etcd: the stored value,
revisions, watch and resync, garbage written with etcdctl."""

from __future__ import annotations

import itertools
import json
import logging
import queue
import threading
from collections.abc import Iterator

import pytest

from lbnode.cluster.etcd import EtcdStore
from lbnode.cluster.routestore import EtcdRoutes
from lbnode.cluster.store import (
    AlreadyExists,
    Conflict,
    NotFound,
    RouteEvent,
    RouteResync,
    StopFlag,
    StoreError,
)
from lbnode.model import route_from_dict
from tests.integration.etcd_helpers import EtcdCluster, etcd_cluster

_prefixes = itertools.count()


@pytest.fixture(scope="module")
def shared_etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdCluster]:
    with etcd_cluster(tmp_path_factory.mktemp("etcd")) as cluster:
        yield cluster


@pytest.fixture
def pool_store(shared_etcd: EtcdCluster) -> Iterator[EtcdStore]:
    s = EtcdStore(shared_etcd.settings(prefix=f"/routes{next(_prefixes)}"))
    yield s
    s.close()


@pytest.fixture
def store(pool_store: EtcdStore) -> EtcdRoutes:
    return pool_store.routes  # type: ignore[return-value]


def route(name: str, **table: object):  # type: ignore[no-untyped-def]
    return route_from_dict({"name": name, "pool": "web", **table})


class Watch:
    def __init__(self, store: EtcdRoutes, after: int) -> None:
        self.items: queue.Queue[object] = queue.Queue()
        self.stop = StopFlag()
        self.thread = threading.Thread(target=self._run, args=(store, after), daemon=True)
        self.thread.start()

    def _run(self, store: EtcdRoutes, after: int) -> None:
        try:
            for item in store.watch_routes(after, self.stop):
                self.items.put(item)
        except BaseException as exc:  # handed to the test
            self.items.put(exc)

    def next(self) -> RouteEvent | RouteResync:
        item = self.items.get(timeout=5)
        if isinstance(item, BaseException):
            raise item
        return item  # type: ignore[return-value]

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        assert not self.thread.is_alive()


def test_the_value_is_the_route_table_and_writes_compare_revisions(store: EtcdRoutes) -> None:
    api = route("api", path_prefix="/api/", headers=[{"name": "X-Beta", "present": True}])
    created = store.put_route("front", api, expected_revision=0)
    raw = store.conn.get(store.key("front", "api"))
    assert raw is not None and raw.key.endswith("/routes/front/api") and raw.mod_revision == created.revision
    assert json.loads(raw.value) == {"name": "api", "path_prefix": "/api/", "pool": "web",
                                     "headers": [{"name": "X-Beta", "present": True}]}
    assert store.get_route("front", "api") == created
    with pytest.raises(AlreadyExists, match=rf'route "api" of listener "front" already exists \(revision {created.revision}\)'):
        store.put_route("front", route("api", path="/x"), expected_revision=0)
    with pytest.raises(Conflict, match=rf"changed since revision {created.revision - 1} "):
        store.put_route("front", route("api", path="/x"), expected_revision=created.revision - 1)
    with pytest.raises(NotFound):
        store.put_route("front", route("other"), expected_revision=created.revision)
    updated = store.put_route("front", route("api", path="/x"), expected_revision=created.revision)
    assert store.list_routes()[0] == [updated]
    store.delete_route("front", "api", updated.revision)
    with pytest.raises(NotFound, match='route "api" of listener "front" does not exist'):
        store.get_route("front", "api")


def test_watch_delivers_changes_in_order_then_resyncs_after_compaction(store: EtcdRoutes, pool_store: EtcdStore) -> None:
    _, revision = store.list_routes()
    watch = Watch(store, revision)
    try:
        a = store.put_route("front", route("a"))
        pool_store.conn.put(pool_store.key("x"), b"{}")  # a pool key: not this watch's business
        b = store.put_route("front", route("a", path="/b"))
        store.delete_route("front", "a")
        assert watch.next() == RouteEvent("front", "a", a, a.revision)
        assert watch.next() == RouteEvent("front", "a", b, b.revision)
        gone = watch.next()
        assert isinstance(gone, RouteEvent) and gone.record is None and gone.revision > b.revision
    finally:
        watch.close()
    last = store.put_route("front", route("z"))
    store.conn.compact(last.revision)
    watch = Watch(store, revision)  # its history is gone
    try:
        resync = watch.next()
        assert isinstance(resync, RouteResync) and resync.records == (last,)
    finally:
        watch.close()


def test_garbage_is_logged_once_and_skipped(store: EtcdRoutes, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    _, revision = store.list_routes()
    watch = Watch(store, revision)
    try:
        good = store.put_route("front", route("good"))
        store.conn.put(store.key("front", "junk"), b"{not json")
        store.conn.put(store.key("front", "regex"), b'{"name": "regex", "path_regex": "(a+)+", "pool": "web"}')
        store.conn.put(store.key("front", "renamed"), b'{"name": "good", "pool": "web"}')
        last = store.put_route("front", route("last"))
        assert watch.next() == RouteEvent("front", "good", good, good.revision)
        assert watch.next() == RouteEvent("front", "last", last, last.revision)
        assert store.list_routes()[0] == [good, last]
    finally:
        watch.close()
    for name, reason in (("junk", "Expecting property name"), ("regex", "route.path_regex"),
                         ("renamed", 'route.name: "good" does not match the key (expected "renamed")')):
        lines = [r.getMessage() for r in caplog.records if store.key("front", name) in r.getMessage()]
        assert len(lines) == 1, lines  # the watch and the list saw it: logged once
        assert reason in lines[0]
    with pytest.raises(StoreError, match=f"{store.key('front', 'regex')}: the stored route is not valid"):
        store.get_route("front", "regex")
