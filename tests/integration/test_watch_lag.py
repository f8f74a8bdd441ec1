"""The store follower's watch lag against a real etcd: a wedged watch shows, garbage does not.

A watch that stops delivering while etcd answers every read is the failure no reachability
gauge sees: the node serves an old configuration and looks healthy. The follower reads the
store's newest pool revision every LAG_CHECK (1 s); these tests wedge the watch (it blocks
and yields nothing, as a stalled stream would) and check that the lag shows and clears.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest
import trio

from lbnode.cluster.etcd import EtcdStore
from lbnode.cluster.store import PoolEvent, Resync
from lbnode.cluster.sync import LAG_CHECK, StoreFollower
from lbnode.model import Address, Backend, Config, NodeSettings, Pool
from tests.integration.etcd_helpers import EtcdCluster, etcd_cluster

# The lag is first seen by the first check after the write (LAG_CHECK) and the check's read
# takes milliseconds; 5 s more is the margin for 2 busy cores.
SEEN_WITHIN = LAG_CHECK + 5.0


@pytest.fixture(scope="module")
def etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdCluster]:
    with etcd_cluster(tmp_path_factory.mktemp("etcd")) as cluster:
        yield cluster


def _pool(name: str, port: int) -> Pool:
    return Pool(name=name, backends=(Backend(Address("127.0.0.1", port)),))


async def _until(check, limit: float, what: str) -> float:  # type: ignore[no-untyped-def]
    start = trio.current_time()
    with trio.fail_after(limit):
        while not check():
            await trio.sleep(0.02)
    return trio.current_time() - start


async def test_a_wedged_watch_shows_as_lag_and_a_working_one_clears_it(etcd: EtcdCluster) -> None:
    store = EtcdStore(etcd.settings(prefix="/lag1"))
    writer = EtcdStore(etcd.settings(prefix="/lag1"))
    wedged = threading.Event()  # set: the watch delivers nothing, as a stalled stream would
    real_watch = store.watch_pools

    def watch(after: int, stop: threading.Event) -> Iterator[PoolEvent | Resync]:
        for item in real_watch(after, stop):
            while wedged.is_set() and not stop.is_set():
                stop.wait(0.05)
            yield item

    store.watch_pools = watch  # type: ignore[method-assign]
    applied: list[Config] = [Config(node=NodeSettings(id="n1"), listeners=(), pools=())]
    try:
        first = writer.create_pool(_pool("web", 8001))
        async with trio.open_nursery() as nursery:
            follower = StoreFollower(store, lambda: applied[-1], applied.append)
            await nursery.start(follower.run)
            await _until(lambda: follower.revision >= first.revision, 5, "the first read")
            await trio.sleep(LAG_CHECK * 1.5)  # at least one check while caught up
            assert follower.watch_lag() == 0.0 and follower.lag.store_revision == first.revision

            wedged.set()
            second = await trio.to_thread.run_sync(writer.update_pool, _pool("web", 8002), first.revision)
            took = await _until(lambda: follower.watch_lag() > 0, SEEN_WITHIN, "the lag seen")
            await trio.sleep(0.5)
            assert follower.watch_lag() >= 0.5  # it grows while the watch is wedged
            assert follower.lag.store_revision == second.revision and follower.revision == first.revision
            print(f"\nwedged watch: lag seen {took:.2f}s after the write (check every {LAG_CHECK:g}s)")

            wedged.clear()  # the write arrives: the lag clears as it is applied
            await _until(lambda: follower.revision == second.revision, 5, "the write applied")
            assert follower.watch_lag() == 0.0
            nursery.cancel_scope.cancel()
    finally:
        store.close()
        writer.close()


async def test_garbage_in_a_pool_key_is_not_lag(etcd: EtcdCluster) -> None:
    store = EtcdStore(etcd.settings(prefix="/lag2"))
    applied: list[Config] = [Config(node=NodeSettings(id="n1"), listeners=(), pools=())]
    try:
        first = store.create_pool(_pool("web", 8001))
        async with trio.open_nursery() as nursery:
            follower = StoreFollower(store, lambda: applied[-1], applied.append)
            await nursery.start(follower.run)
            await _until(lambda: follower.revision >= first.revision, 5, "the first read")
            # Someone writes a value that is not a pool: the watch sees and skips it, so the
            # applied revision stays below the store's newest write, and nothing is pending.
            garbage = await trio.to_thread.run_sync(store.conn.put, "/lag2/pools/web", b"{not json")
            await trio.sleep(LAG_CHECK * 2.5)  # two checks at least after the write
            assert follower.revision == first.revision < garbage
            assert follower.watch_lag() == 0.0
            nursery.cancel_scope.cancel()
    finally:
        store.close()
