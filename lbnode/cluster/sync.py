"""Following a pool store: every change becomes a new snapshot on this node.

Owns the one-way flow store -> node: a first full read, then a watch run in
one thread that hands events to Trio through a memory channel. The data plane
never waits on it: while the store is unreachable the node serves on its last
snapshot, logs once, and retries with backoff (static stability). A cluster
node's node.toml pools seed the store here, in the same thread as the first read.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace

import trio

from lbnode.cluster.store import AlreadyExists, PoolEvent, PoolRecord, PoolStore, Resync, StoreError
from lbnode.cluster.watch import follow_watch
from lbnode.model import Config, Pool

log = logging.getLogger("lbnode.cluster")

# Retry delays after the store failed: short first, never hammering a sick etcd.
BACKOFF_FIRST = 0.2
BACKOFF_MAX = 5.0


class StoreFollower:
    """Keeps ``apply(config)`` fed with the store's pools; ``revision`` is the last one applied."""

    def __init__(
        self,
        store: PoolStore,
        base: Callable[[], Config],
        apply: Callable[[Config], None],
        *,
        seed: Sequence[Pool] = (),
    ) -> None:
        self.store = store
        self._base = base  # the node's config (listeners, node settings) to put the pools into
        self._apply = apply
        # Pools created in the store if absent, before the first read (a pool already there
        # is left as it is); retried with the read until the store answers.
        self._seed: Sequence[Pool] | None = seed or None
        self.pools: dict[str, PoolRecord] = {}
        self.revision = 0
        self.synced = trio.Event()  # set after the first full read
        self.settled = trio.Event()  # set after the first read succeeded or failed
        self.failing = False  # the store could not be read or watched, and has not answered since
        self._on_change: list[Callable[[str, PoolRecord | None], None]] = []
        self._on_applied: list[Callable[[Mapping[str, PoolRecord], int], None]] = []

    def subscribe(self, callback: Callable[[str, PoolRecord | None], None]) -> None:
        """``callback(name, record)`` after each applied change (None: deleted)."""
        self._on_change.append(callback)

    def on_applied(self, callback: Callable[[Mapping[str, PoolRecord], int], None]) -> None:
        """``callback(pools, revision)`` after each configuration applied from the store."""
        self._on_applied.append(callback)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        started = False
        delay = BACKOFF_FIRST
        failing = False
        while True:
            try:
                records, revision = await trio.to_thread.run_sync(self._seed_and_list, abandon_on_cancel=True)
                self._replace_all(records, revision)
                if failing:
                    log.info("pool store reachable again; following changes from revision %d", revision)
                failing, delay = False, BACKOFF_FIRST
                self.failing = False
                if not started:
                    started = True
                    self.settled.set()
                    task_status.started()
                await self._watch()
            except StoreError as exc:
                if not failing:
                    if self.synced.is_set():
                        log.warning("pool store unavailable (%s); serving the last configuration", exc)
                    else:
                        log.warning("pool store unavailable at start (%s); following it once it answers", exc)
                    failing = True
                self.failing = True
                if not started:
                    started = True
                    self.settled.set()
                    task_status.started()
            await trio.sleep(delay)
            delay = min(delay * 2, BACKOFF_MAX)

    def _seed_and_list(self) -> tuple[list[PoolRecord], int]:
        """In a worker thread: seed (once it works), then read every pool."""
        if self._seed is not None:
            for pool in self._seed:
                try:
                    self.store.create_pool(pool)
                except AlreadyExists:
                    pass
            self._seed = None
        return self.store.list_pools()

    async def _watch(self) -> None:
        await follow_watch(lambda stop: self.store.watch_pools(self.revision, stop), self._on_event)

    def _on_event(self, event: PoolEvent | Resync) -> None:
        if isinstance(event, Resync):
            self._replace_all(list(event.records), event.revision)
        else:
            self._change(event)

    def _replace_all(self, records: list[PoolRecord], revision: int) -> None:
        old = self.pools
        self.pools = {r.pool.name: r for r in records}
        self.revision = revision
        self._push()
        self.synced.set()
        for name in set(old) | set(self.pools):
            if old.get(name) != self.pools.get(name):
                self._notify(name, self.pools.get(name))

    def _change(self, event: PoolEvent) -> None:
        if event.record is None:
            self.pools.pop(event.name, None)
        else:
            self.pools[event.name] = event.record
        self.revision = max(self.revision, event.revision)
        self._push()
        self._notify(event.name, event.record)

    def _push(self) -> None:
        pools: tuple[Pool, ...] = tuple(r.pool for _, r in sorted(self.pools.items()))
        self._apply(replace(self._base(), pools=pools))
        for callback in self._on_applied:
            callback(self.pools, self.revision)

    def _notify(self, name: str, record: PoolRecord | None) -> None:
        for callback in self._on_change:
            callback(name, record)
