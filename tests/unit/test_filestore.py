"""The standalone pool store: revisions, conflicts, persistence, seeding once, watch order, races."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import pytest

from lbnode.cluster.filestore import FileStore
from lbnode.cluster.store import (
    AlreadyExists,
    Conflict,
    NotFound,
    PoolEvent,
    Resync,
    StopFlag,
    Unavailable,
)
from lbnode.config import ConfigFileError
from lbnode.model import Address, Backend, Pool


def pool(name: str, *ports: int, **settings: object) -> Pool:
    return Pool(name=name, backends=tuple(Backend(Address("127.0.0.1", p)) for p in ports), **settings)  # type: ignore[arg-type]


def test_seeded_from_config_pools_when_the_file_does_not_exist(tmp_path: Path) -> None:
    store = FileStore(tmp_path, [pool("web", 8001), pool("api", 9001)])
    records, revision = store.list_pools()
    assert [r.pool.name for r in records] == ["api", "web"]
    assert revision == 1 and all(r.revision == 1 for r in records)
    assert (tmp_path / "pools.json").exists()


def test_crud_bumps_one_store_wide_revision(tmp_path: Path) -> None:
    store = FileStore(tmp_path, [])
    assert store.list_pools() == ([], 0)
    web = store.create_pool(pool("web", 8001))
    api = store.create_pool(pool("api", 9001))
    assert (web.revision, api.revision) == (1, 2)
    updated = store.update_pool(pool("web", 8001, 8002), expected_revision=1)
    assert updated.revision == 3
    assert store.get_pool("web") == updated
    assert store.get_pool("api").revision == 2  # untouched pools keep their revision
    store.delete_pool("api", expected_revision=2)
    records, revision = store.list_pools()
    assert [r.pool.name for r in records] == ["web"] and revision == 4


def test_errors_name_the_pool(tmp_path: Path) -> None:
    store = FileStore(tmp_path, [pool("web", 8001)])
    with pytest.raises(AlreadyExists, match='pool "web" already exists'):
        store.create_pool(pool("web"))
    with pytest.raises(NotFound, match='pool "nope" not found'):
        store.get_pool("nope")
    with pytest.raises(NotFound, match='pool "nope" not found'):
        store.update_pool(pool("nope"), None)
    with pytest.raises(NotFound, match='pool "nope" not found'):
        store.delete_pool("nope")


def test_stale_revision_is_a_conflict_and_changes_nothing(tmp_path: Path) -> None:
    store = FileStore(tmp_path, [pool("web", 8001)])
    store.update_pool(pool("web", 8002), expected_revision=1)
    with pytest.raises(Conflict, match=r'pool "web" changed since revision 1 \(now at revision 2\)'):
        store.update_pool(pool("web", 8003), expected_revision=1)
    with pytest.raises(Conflict):
        store.delete_pool("web", expected_revision=1)
    assert store.get_pool("web").pool == pool("web", 8002)
    # None = unconditional
    assert store.update_pool(pool("web", 8004), None).revision == 3


def test_changes_survive_reopening_and_the_seed_is_used_only_once(tmp_path: Path) -> None:
    seed = [pool("web", 8001)]
    store = FileStore(tmp_path, seed)
    store.update_pool(pool("web", 8001, 8002, algorithm="least_connections"), 1)
    store.create_pool(pool("api", 9001))
    store.delete_pool("api")
    again = FileStore(tmp_path, seed)  # a restart with the same node.toml
    records, revision = again.list_pools()
    assert [r.pool for r in records] == [pool("web", 8001, 8002, algorithm="least_connections")]
    assert revision == 4 and records[0].revision == 2
    assert again.create_pool(pool("api")).revision == 5  # the counter carries on


def test_deleting_every_pool_does_not_reseed(tmp_path: Path) -> None:
    store = FileStore(tmp_path, [pool("web", 8001)])
    store.delete_pool("web")
    assert FileStore(tmp_path, [pool("web", 8001)]).list_pools()[0] == []


def test_file_is_private_and_written_atomically(tmp_path: Path) -> None:
    store = FileStore(tmp_path, [pool("web", 8001)])
    store.create_pool(pool("api", 9001))
    path = tmp_path / "pools.json"
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    document = json.loads(path.read_text())
    assert document["revision"] == 2
    assert [p["spec"]["name"] for p in document["pools"]] == ["api", "web"]
    # no temp file left behind (routes.json: the route store, created beside it)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pools.json", "routes.json"]


def test_a_failed_write_leaves_memory_and_file_unchanged(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = FileStore(tmp_path, [pool("web", 8001)])
    before = (tmp_path / "pools.json").read_bytes()

    def full_disk(*args: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(Unavailable, match="No space left on device"):
        store.create_pool(pool("api"))
    monkeypatch.undo()
    assert [r.pool.name for r in store.list_pools()[0]] == ["web"]
    assert (tmp_path / "pools.json").read_bytes() == before
    assert store.create_pool(pool("api")).revision == 2


def test_a_corrupt_file_is_one_clear_error(tmp_path: Path) -> None:
    (tmp_path / "pools.json").write_text("{not json")
    with pytest.raises(ConfigFileError, match=r"pools\.json: not valid JSON"):
        FileStore(tmp_path, [])
    (tmp_path / "pools.json").write_text(
        json.dumps({"format": 1, "revision": 1, "pools": [{"revision": 1, "spec": {"name": "web", "backends": [{"address": "x"}]}}]})
    )
    with pytest.raises(ConfigFileError, match=r'pools\[0\]\.spec\.backends\[0\]\.address: "x" is not host:port'):
        FileStore(tmp_path, [])


def collect(store: FileStore, after: int, count: int) -> list[PoolEvent | Resync]:
    stop = StopFlag()
    events: list[PoolEvent | Resync] = []
    for event in store.watch_pools(after, stop):
        events.append(event)
        if len(events) == count:
            stop.set()
    return events


def test_watch_delivers_changes_in_order(tmp_path: Path) -> None:
    store = FileStore(tmp_path, [])
    got: list[PoolEvent | Resync] = []
    stop = StopFlag()

    def watch() -> None:
        for event in store.watch_pools(0, stop):
            got.append(event)

    thread = threading.Thread(target=watch)
    thread.start()
    store.create_pool(pool("web", 8001))
    store.create_pool(pool("api", 9001))
    store.update_pool(pool("web", 8002), 1)
    store.delete_pool("api")
    deadline = threading.Event()
    for _ in range(50):
        if len(got) == 4:
            break
        deadline.wait(0.02)
    stop.set()
    thread.join(timeout=1)  # the stop wakes its wait at once; 1 s for a thread on a busy machine
    assert not thread.is_alive()
    assert [(e.name, e.revision, e.record is None) for e in got if isinstance(e, PoolEvent)] == [
        ("web", 1, False), ("api", 2, False), ("web", 3, False), ("api", 4, True),
    ]
    assert got[2].record is not None and got[2].record.pool == pool("web", 8002)  # type: ignore[union-attr]


def test_watch_after_a_revision_skips_what_came_before(tmp_path: Path) -> None:
    store = FileStore(tmp_path, [])
    store.create_pool(pool("web"))
    store.create_pool(pool("api"))
    events = collect(store, 1, 1)
    assert [(e.name, e.revision) for e in events if isinstance(e, PoolEvent)] == [("api", 2)]


def test_watch_from_before_the_store_opened_starts_with_a_resync(tmp_path: Path) -> None:
    FileStore(tmp_path, [pool("web", 8001)]).create_pool(pool("api"))
    reopened = FileStore(tmp_path, [])
    (event,) = collect(reopened, 0, 1)
    assert isinstance(event, Resync)
    assert event.revision == 2 and [r.pool.name for r in event.records] == ["api", "web"]


def test_watch_returns_when_stopped_while_idle(tmp_path: Path) -> None:
    store = FileStore(tmp_path, [])
    stop = StopFlag()
    thread = threading.Thread(target=lambda: list(store.watch_pools(0, stop)))
    thread.start()
    stop.set()
    thread.join(timeout=0.5)
    assert not thread.is_alive()


def test_an_idle_watch_waits_without_a_timeout_and_its_stop_wakes_it(tmp_path: Path) -> None:
    """An idle watch used to wake every 0.1 s to look at its stop event (each wake taking the
    GIL from the data plane's thread); now it waits on the store until a change or the stop."""
    store = FileStore(tmp_path, [])
    waits: list[float | None] = []

    class Recording(threading.Condition):
        def wait(self, timeout: float | None = None) -> bool:
            waits.append(timeout)
            return super().wait(timeout)

    store._changed = Recording(store._lock)
    stop = StopFlag()
    thread = threading.Thread(target=lambda: list(store.watch_pools(0, stop)))
    thread.start()
    for _ in range(500):  # up to 5 s for the thread to start and wait on a busy machine
        if waits:
            break
        time.sleep(0.01)
    store.create_pool(pool("web"))  # a change wakes it too, and it waits again
    for _ in range(500):
        if len(waits) == 2:
            break
        time.sleep(0.01)
    stop.set()
    thread.join(timeout=5)  # the stop notifies the wait; 5 s for a thread on a busy machine
    assert not thread.is_alive()
    assert waits == [None, None]


def test_concurrent_updates_from_the_same_revision_exactly_one_wins(tmp_path: Path) -> None:
    store = FileStore(tmp_path, [pool("web", 8001)])
    barrier = threading.Barrier(8)
    outcomes: list[str] = []

    def writer(port: int) -> None:
        barrier.wait()
        try:
            store.update_pool(pool("web", port), expected_revision=1)
            outcomes.append(f"won {port}")
        except Conflict:
            outcomes.append("conflict")

    threads = [threading.Thread(target=writer, args=(9000 + i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [o for o in outcomes if o.startswith("won")]
    assert len(winners) == 1 and outcomes.count("conflict") == 7
    port = int(winners[0].split()[1])
    assert store.get_pool("web").pool == pool("web", port) and store.get_pool("web").revision == 2
