"""A worker's affinity tables: its own, kept in step with the other workers' through the
supervisor (first writer wins there, as etcd does between nodes).

A session a worker places (``put``) or moves (``replace``) goes to the supervisor at the next
loop turn; the supervisor keeps the entry that stands and sends it to every worker, the one
that placed it included (it adopts the winner if another worker placed the key first). Keys
a worker serves from its table are reported once a second (``touch``), so the copies on the
other workers and the supervisor's stay alive as long as the session is. The request never
waits for any of this; until the winner arrives, the local choice stands.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import trio

from lbnode.affinity import AffinityTable, CookieKeyring, MemoryAffinityTable, load_or_create_key
from lbnode.model import Affinity

# How often the keys served from a worker's tables are reported (a set of keys; each reported
# once per interval however many requests it had). Idle timeouts are minutes in practice and
# seconds in tests: a copy elsewhere is at most this much older than the session.
TOUCH_INTERVAL = 1.0


class BroadcastTable(MemoryAffinityTable):
    """``MemoryAffinityTable`` that reports what it learns to the worker's ``WorkerAffinity``."""

    def __init__(self, pool: str, spec: Affinity, shared: WorkerAffinity) -> None:
        super().__init__(spec.idle_timeout, spec.max_entries)
        self.pool = pool
        self._shared = shared

    def get(self, key: str, now: float) -> str | None:
        backend_id = super().get(key, now)
        if backend_id is not None:
            self._shared.touched.add((self.pool, key))
        return backend_id

    def put_if_absent(self, key: str, backend_id: str, now: float) -> str:
        existing = MemoryAffinityTable.get(self, key, now)
        if existing is not None:
            return existing
        self._insert(key, backend_id, now)
        self._shared.learned(self.pool, key, backend_id, "put")
        return backend_id

    def replace(self, key: str, backend_id: str, now: float) -> None:
        super().replace(key, backend_id, now)
        self._shared.learned(self.pool, key, backend_id, "replace")

    def adopt(self, key: str, backend_id: str, now: float) -> None:
        """The entry that stands at the supervisor (no report back)."""
        MemoryAffinityTable.replace(self, key, backend_id, now)

    def touch(self, key: str, now: float) -> None:
        MemoryAffinityTable.get(self, key, now)

    def forget(self, key: str) -> None:
        """etcd deleted the entry (no report back): the next request is balanced afresh."""
        MemoryAffinityTable.delete(self, key)


class WorkerAffinity:
    """The ``SharedAffinity`` a worker gives its pools: broadcast tables and the node's cookie key."""

    def __init__(self, state_dir: Path) -> None:
        self._state_dir = state_dir
        self._keyring: CookieKeyring | None = None
        self.tables: dict[str, BroadcastTable] = {}
        self.outgoing: list[list[str]] = []  # [pool, key, backend, "put" | "replace"]
        self.touched: set[tuple[str, str]] = set()
        self.wakeup = trio.Event()

    def table(self, pool: str, spec: Affinity, previous: AffinityTable | None) -> AffinityTable:
        if isinstance(previous, BroadcastTable) and previous.pool == pool:
            previous.idle_timeout, previous.max_entries = spec.idle_timeout, spec.max_entries
            table = previous
        else:
            table = BroadcastTable(pool, spec, self)
        self.tables[pool] = table
        return table

    def cookie_keyring(self) -> CookieKeyring:
        """The supervisor's key when it sends one (a cluster's), else the node's state_dir key
        (which the supervisor created before any worker started)."""
        if self._keyring is None:
            self._keyring = CookieKeyring(load_or_create_key(self._state_dir))
        return self._keyring

    def use_cookie_keys(self, keys_hex: list[str] | None) -> None:
        """The supervisor's cluster keyring (``CookieKeyring.keys()``, in CONFIG, RELOAD and
        COOKIE_KEY): seal under the first, open under all of them, as every node does."""
        if keys_hex:
            keys = [bytes.fromhex(k) for k in keys_hex]
            if self._keyring is None:
                self._keyring = CookieKeyring(keys[0])
            self._keyring.follow(keys)

    def learned(self, pool: str, key: str, backend_id: str, op: str) -> None:
        self.outgoing.append([pool, key, backend_id, op])
        self.wakeup.set()

    def take(self) -> list[list[str]]:
        out, self.outgoing = self.outgoing, []
        self.wakeup = trio.Event()
        return out

    def take_touched(self) -> list[list[str]]:
        out = [[pool, key] for pool, key in self.touched]
        self.touched = set()
        return out

    def adopt(
        self, entries: list[list[Any]], touched: list[list[str]], now: float, forget: list[list[str]] | None = None,
    ) -> None:
        """What the supervisor says stands (``set``), keys in use on another worker, and entries
        etcd deleted (``forget``: another node ended the session, an operator removed it)."""
        for pool, key, backend_id in entries:
            table = self.tables.get(pool)
            if table is not None:
                table.adopt(key, backend_id, now)
        for pool, key in forget or []:
            table = self.tables.get(pool)
            if table is not None:
                table.forget(key)
        for pool, key in touched:
            table = self.tables.get(pool)
            if table is not None:
                table.touch(key, now)
