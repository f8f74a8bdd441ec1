"""EtcdStore against a real etcd: revisions, no lost updates, the watch, resync, garbage, outages."""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from lbnode.cluster import etcd
from lbnode.cluster.etcd import CALL_TIMEOUT, MAX_DEADLINE_ATTEMPTS, EtcdStore
from lbnode.cluster.store import (
    AlreadyExists,
    Conflict,
    NotFound,
    PoolEvent,
    PoolRecord,
    Resync,
    StopFlag,
    StoreError,
    Unavailable,
)
from lbnode.model import Address, Affinity, Backend, HealthCheck, Pool, PoolTimeouts
from tests.integration.etcd_helpers import EtcdCluster, etcd_cluster

_prefixes = itertools.count()


@pytest.fixture(scope="module")
def shared_etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdCluster]:
    """One etcd for the tests that do not stop it; each test gets its own key prefix."""
    with etcd_cluster(tmp_path_factory.mktemp("etcd")) as cluster:
        yield cluster


@pytest.fixture
def store(shared_etcd: EtcdCluster) -> Iterator[EtcdStore]:
    s = EtcdStore(shared_etcd.settings(prefix=f"/test{next(_prefixes)}"))
    yield s
    s.close()


def backend(port: int, **kw: object) -> Backend:
    return Backend(Address("127.0.0.1", port), **kw)  # type: ignore[arg-type]


def web(*ports: int) -> Pool:
    return Pool(name="web", backends=tuple(backend(p) for p in ports))


class WatchThread:
    """Runs ``watch_pools`` in a thread (as the node does) and queues what it yields."""

    def __init__(self, store: EtcdStore, after_revision: int, stop: StopFlag | None = None) -> None:
        self.items: queue.Queue[PoolEvent | Resync | BaseException] = queue.Queue()
        self.stop = StopFlag() if stop is None else stop
        self.thread = threading.Thread(target=self._run, args=(store, after_revision), daemon=True)
        self.thread.start()

    def _run(self, store: EtcdStore, after_revision: int) -> None:
        try:
            for item in store.watch_pools(after_revision, self.stop):
                self.items.put(item)
        except BaseException as exc:  # handed to the test, which fails on it
            self.items.put(exc)

    def next(self, timeout: float = 5.0) -> PoolEvent | Resync:
        item = self.items.get(timeout=timeout)
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> float:
        """Stop the watch; returns how long the thread took to end."""
        started = time.monotonic()
        self.stop.set()
        self.thread.join(5)
        assert not self.thread.is_alive()
        return time.monotonic() - started


# --------------------------------------------------------------------------- CRUD and revisions


def test_create_get_list_update_delete_with_revisions(store: EtcdStore) -> None:
    created = store.create_pool(web(8001))
    assert created.revision > 0
    assert store.get_pool("web") == created
    records, revision = store.list_pools()
    assert records == [created] and revision >= created.revision

    with pytest.raises(AlreadyExists, match='pool "web" already exists'):
        store.create_pool(web(9999))

    updated = store.update_pool(web(8001, 8002), created.revision)
    assert updated.revision > created.revision
    assert store.get_pool("web") == updated

    unconditional = store.update_pool(web(8003), None)
    assert store.get_pool("web") == unconditional

    store.delete_pool("web", unconditional.revision)
    with pytest.raises(NotFound, match='pool "web" does not exist'):
        store.get_pool("web")
    with pytest.raises(NotFound):
        store.update_pool(web(8001), None)
    with pytest.raises(NotFound):
        store.update_pool(web(8001), unconditional.revision)
    with pytest.raises(NotFound):
        store.delete_pool("web")


def test_a_full_pool_spec_round_trips(store: EtcdStore) -> None:
    pool = Pool(
        name="api",
        backends=(backend(8001, weight=3, name="a1"), backend(8002, admin="draining", max_inflight=10)),
        algorithm="consistent_hash",
        hash_key="header:X-User",
        timeouts=PoolTimeouts(connect=1.5, response=10.0),
        affinity=Affinity(mode="cookie", key=bytes(range(32)), ttl=600.0),
        health=HealthCheck(type="http", path="/healthz", interval=1.0, expect_status=((200, 204), (301, 301))),
        retry_on=(502, 503),
        slow_start=5.0,
    )
    record = store.create_pool(pool)
    assert store.get_pool("api").pool == pool
    assert store.list_pools()[0] == [record]


def test_stale_revision_is_a_conflict(store: EtcdStore) -> None:
    first = store.create_pool(web(8001))
    store.update_pool(web(8002), first.revision)
    with pytest.raises(Conflict, match=rf'pool "web" changed since revision {first.revision}'):
        store.update_pool(web(8003), first.revision)
    with pytest.raises(Conflict):
        store.delete_pool("web", first.revision)
    assert store.get_pool("web").pool == web(8002)


def test_a_write_whose_answer_was_lost_counts_as_done_when_retried(
    store: EtcdStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``call_retried`` may run a transaction again after its first answer was lost (a deadline
    after etcd applied it): the retry's compare then fails against our own write, and the
    write must still count as done, not as a conflict or a missing key."""
    conn = store.conn

    def applied_then_lost(what: str, fn):  # type: ignore[no-untyped-def]
        fn(conn.client)  # the first attempt reaches etcd; its answer never arrives
        return fn(conn.client), True  # the retry, answered

    created = store.create_pool(web(8001))
    monkeypatch.setattr(conn, "call_retried", applied_then_lost)

    updated = store.update_pool(web(8002), expected_revision=created.revision)
    assert updated.revision > created.revision
    assert store.get_pool("web") == updated
    again = store.create_pool(replace(web(8003), name="api"))
    assert store.get_pool("api") == again
    store.delete_pool("web", expected_revision=updated.revision)
    with pytest.raises(NotFound):
        store.get_pool("web")
    # A refusal that is not our own earlier attempt is still a refusal.
    with pytest.raises(Conflict):
        store.update_pool(replace(web(8004), name="api"), expected_revision=again.revision - 1)
    with pytest.raises(AlreadyExists):
        store.create_pool(replace(web(8005), name="api"))


def test_concurrent_updates_from_one_revision_exactly_one_wins(store: EtcdStore) -> None:
    base = store.create_pool(web(8000))
    barrier = threading.Barrier(2)
    results: dict[int, PoolRecord | StoreError] = {}

    def update(port: int) -> None:
        barrier.wait()
        try:
            results[port] = store.update_pool(web(8000, port), base.revision)
        except StoreError as exc:
            results[port] = exc

    threads = [threading.Thread(target=update, args=(p,)) for p in (8001, 8002)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [r for r in results.values() if isinstance(r, PoolRecord)]
    losers = [r for r in results.values() if not isinstance(r, PoolRecord)]
    assert len(winners) == 1 and len(losers) == 1
    assert isinstance(losers[0], Conflict)
    assert store.get_pool("web") == winners[0]


def test_read_modify_write_retries_lose_no_update(store: EtcdStore) -> None:
    """Two writers each add 5 backends, retrying on Conflict: all 10 end up in the pool."""
    store.create_pool(web())
    conflicts = 0

    def writer(first_port: int) -> None:
        nonlocal conflicts
        for port in range(first_port, first_port + 5):
            while True:
                current = store.get_pool("web")
                pool = replace(current.pool, backends=current.pool.backends + (backend(port),))
                try:
                    store.update_pool(pool, current.revision)
                    break
                except Conflict:
                    conflicts += 1

    threads = [threading.Thread(target=writer, args=(p,)) for p in (9000, 9100)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ports = sorted(b.address.port for b in store.get_pool("web").pool.backends)
    assert ports == [*range(9000, 9005), *range(9100, 9105)]


# --------------------------------------------------------------------------- watch


def test_watch_delivers_create_update_delete_in_order(store: EtcdStore) -> None:
    _, revision = store.list_pools()
    watch = WatchThread(store, revision)
    try:
        created = store.create_pool(web(8001))
        updated = store.update_pool(web(8002), created.revision)
        other = store.create_pool(replace(web(8003), name="api"))
        store.delete_pool("web")
        events = [watch.next() for _ in range(4)]
        assert events[0] == PoolEvent("web", created, created.revision)
        assert events[1] == PoolEvent("web", updated, updated.revision)
        assert events[2] == PoolEvent("api", other, other.revision)
        assert events[3].name == "web" and events[3].record is None  # type: ignore[union-attr]
        assert events[3].revision > other.revision
    finally:
        stopped_in = watch.close()
    assert stopped_in < 0.5  # the stop flag ends the watch promptly


def test_an_open_watch_waits_without_polling_and_its_stop_cancels_it(
    store: EtcdStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No thread of an open watch wakes up on a timer of ours to look at its stop flag (each
    wake would take the GIL from the data plane's thread): the flag's ``set`` cancels the
    stream. Every wait on the stop flag, and on an event the watch makes, is recorded."""
    timed: list[float | None] = []

    class RecordedEvent(threading.Event):
        def wait(self, timeout: float | None = None) -> bool:
            timed.append(timeout)
            return super().wait(timeout)

    class RecordedStop(RecordedEvent, StopFlag):  # its waits recorded as the Event's
        pass

    class Threading:  # the module etcd.py sees: threading, with the recorded Event
        Event = RecordedEvent

        def __getattr__(self, name: str) -> object:
            return getattr(threading, name)

    monkeypatch.setattr(etcd, "threading", Threading())
    _, revision = store.list_pools()
    watch = WatchThread(store, revision, RecordedStop())
    try:
        created = store.create_pool(web(8001))
        assert watch.next() == PoolEvent("web", created, created.revision)  # the stream is open
        time.sleep(0.3)  # three polls' worth of the old 0.1 s poll
    finally:
        stopped_in = watch.close()
    assert timed == [None]  # the request thread's one wait, for the stream's end
    assert stopped_in < 0.5  # the cancel ends the reader's iteration at once; 0.5 s for 2 busy cores


def test_a_watch_stopped_while_it_opens_still_ends(store: EtcdStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """The stop flag set before the stream's call exists (CI hung here once, when a thread
    polled the flag: the watch stayed open on etcd, its reader blocked for good). The opening
    is slowed so that the flag is always set first: the call is cancelled as it is made."""
    stub = etcd.etcdrpc.WatchStub

    class SlowToOpen:
        def __init__(self, channel: object) -> None:
            self.stub = stub(channel)

        def Watch(self, *args: object, **kwargs: object) -> object:  # noqa: N802 (gRPC's name)
            call = self.stub.Watch(*args, **kwargs)
            time.sleep(0.5)  # the flag was set before this call existed
            return call

    monkeypatch.setattr(etcd.etcdrpc, "WatchStub", SlowToOpen)
    stop = StopFlag()
    stop.set()
    reader = threading.Thread(target=lambda: list(store.conn.watch_prefix(store.prefix, 1, stop)), daemon=True)
    reader.start()
    reader.join(5)  # the opening's 0.5 s and a cancelled call's end: 5 s for 2 busy cores
    assert not reader.is_alive()


def test_watch_resyncs_after_its_revision_was_compacted(store: EtcdStore) -> None:
    first = store.create_pool(web(8001))
    store.update_pool(web(8002), None)
    latest = store.update_pool(web(8003), None)
    store.conn.compact(latest.revision)
    watch = WatchThread(store, first.revision)  # its history is gone
    try:
        resync = watch.next()
        assert isinstance(resync, Resync)
        assert resync.records == (latest,) and resync.revision >= latest.revision
        after = store.update_pool(web(8004), latest.revision)
        assert watch.next() == PoolEvent("web", after, after.revision)  # and it follows on
    finally:
        watch.close()


def test_garbage_in_a_pool_key_is_logged_once_and_skipped(store: EtcdStore, caplog: pytest.LogCaptureFixture) -> None:
    _, revision = store.list_pools()
    watch = WatchThread(store, revision)
    try:
        caplog.set_level(logging.WARNING, "lbnode.cluster")
        good = store.create_pool(web(8001))
        store.conn.put(store.key("junk"), b"{not json")
        store.conn.put(store.key("badspec"), b'{"name": "badspec", "algorithm": "fastest"}')
        store.conn.put(store.key("other"), b'{"name": "web"}')  # valid spec, wrong key
        last = store.update_pool(web(8002), good.revision)
        # the watch skipped the three bad values and carries on
        assert watch.next() == PoolEvent("web", good, good.revision)
        assert watch.next() == PoolEvent("web", last, last.revision)
        records, _ = store.list_pools()
        store.list_pools()
        assert records == [last]
    finally:
        watch.close()
    for name, reason in (("junk", "Expecting property name"), ("badspec", '"fastest" is not one of'),
                         ("other", "does not match the key")):
        lines = [r.getMessage() for r in caplog.records if store.key(name) in r.getMessage()]
        assert len(lines) == 1, lines  # watch + two lists: logged once
        assert reason in lines[0]
    with pytest.raises(StoreError, match=f"{store.key('junk')}: the stored pool is not valid"):
        store.get_pool("junk")
    store.delete_pool("junk")  # an operator can remove garbage through the store


# --------------------------------------------------------------------------- outages


def test_unavailable_at_once_when_etcd_is_down_and_back_after_restart(tmp_path: Path) -> None:
    with etcd_cluster(tmp_path) as etcd:
        store = EtcdStore(etcd.settings())
        try:
            record = store.create_pool(web(8001))
            watch = WatchThread(store, record.revision)
            etcd.members[0].kill()

            for op in (store.list_pools, lambda: store.get_pool("web"), lambda: store.create_pool(replace(web(), name="x")),
                       lambda: store.update_pool(web(8002), record.revision), lambda: store.delete_pool("web")):
                started = time.monotonic()
                with pytest.raises(Unavailable, match=r"etcd unavailable \(http://127\.0\.0\.1:\d+\)"):
                    op()
                elapsed = time.monotonic() - started
                assert elapsed < CALL_TIMEOUT
            print(f"\nFIGURE store: Unavailable raised {elapsed * 1000:.1f} ms after the call (etcd killed)")
            with pytest.raises(Unavailable):  # the watch ends: the follower retries with backoff
                watch.next()
            watch.close()

            etcd.members[0].start()
            started = time.monotonic()
            while True:
                try:
                    records, _ = store.list_pools()
                    break
                except Unavailable:
                    assert time.monotonic() - started < 15
                    time.sleep(0.05)
            print(f"FIGURE store: reads work again {time.monotonic() - started:.2f} s after etcd was started again")
            assert records == [record]
            store.update_pool(web(8002), record.revision)
        finally:
            store.close()


def test_three_members_one_killed_writes_go_on(tmp_path: Path) -> None:
    with etcd_cluster(tmp_path, size=3) as etcd:
        store = EtcdStore(etcd.settings())
        try:
            record = store.create_pool(web(8001))
            watch = WatchThread(store, record.revision)
            in_use = etcd.member_at(store.conn.client.endpoint_in_use.netloc)
            in_use.kill()  # the member both the client and the watch are connected to

            started = time.monotonic()
            updated = store.update_pool(web(8002), record.revision)
            print(f"\nFIGURE store: first write after the member in use was killed took "
                  f"{(time.monotonic() - started) * 1000:.0f} ms")
            assert store.get_pool("web") == updated
            # the watch moved to a live member: a Resync (which may already hold the update), then events
            seen: dict[str, PoolRecord | None] = {}
            deadline = time.monotonic() + 10
            while seen.get("web") != updated:
                item = watch.next(timeout=max(0.1, deadline - time.monotonic()))
                if isinstance(item, Resync):
                    seen = {r.pool.name: r for r in item.records}
                else:
                    seen[item.name] = item.record
            later = store.update_pool(web(8003), updated.revision)
            assert watch.next() == PoolEvent("web", later, later.revision)
            watch.close()

            # a second member down: no quorum, and the store says so within its deadline
            next(m for m in etcd.members if m.alive and m is not in_use).kill()
            started = time.monotonic()
            with pytest.raises(Unavailable, match="no answer within|unreachable|no leader"):
                store.update_pool(web(8004), later.revision)
            elapsed = time.monotonic() - started
            print(f"FIGURE store: without quorum, Unavailable after {elapsed:.2f} s")
            assert elapsed < MAX_DEADLINE_ATTEMPTS * CALL_TIMEOUT + 1.0
        finally:
            store.close()
