"""The standalone pool store: ``state_dir/pools.json`` (and certificates.json, routes.json), for a node without etcd.

Owns the pools a standalone node serves once the control API may change them:
revisions, conflict checks, atomic writes (temp file, fsync, rename) and a
watch for the node to follow. Seeded from node.toml only when the file does
not exist yet. Never touches the data plane; blocking and thread-safe.
"""

from __future__ import annotations

import json
import logging
import threading
from collections import deque
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from lbnode.cluster.certstore import FileCertificates
from lbnode.cluster.routestore import FileRoutes
from lbnode.cluster.store import (
    AlreadyExists,
    Conflict,
    NotFound,
    PoolEvent,
    PoolRecord,
    Resync,
    StopFlag,
    Unavailable,
    follow_history,
)
from lbnode.model import ConfigError, ConfigFileError, Pool, pool_from_dict, pool_to_dict
from lbnode.routing import Route
from lbnode.statedir import write_atomic

log = logging.getLogger("lbnode.cluster")

FILE_NAME = "pools.json"
FORMAT = 1  # bumped if the layout of pools.json ever changes
# Changes kept for watchers that fall behind; older ones get a Resync instead.
HISTORY = 1024


class FileStore:
    """Pools in one JSON file; each write bumps a store-wide revision counter."""

    def __init__(self, state_dir: Path | str, seed: Sequence[Pool], seed_routes: Sequence[tuple[str, Route]] = ()) -> None:
        self.path = Path(state_dir) / FILE_NAME
        # Certificates and routes keep their own files (and revision counters) beside pools.json.
        self.certificates = FileCertificates(state_dir)
        self.routes = FileRoutes(state_dir, seed_routes)
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._history: deque[PoolEvent] = deque(maxlen=HISTORY)
        if self.path.exists():
            self._pools, self._revision = self._load()
            log.info("pools from %s (revision %d)", self.path, self._revision)
            if {p.name: p for p in seed} != {n: r.pool for n, r in self._pools.items()}:
                log.warning(
                    "the config file's [[pools]] differ from %s, which wins: the file seeds the store "
                    "only once; change pools with lbctl (e.g. lbctl apply -f pools.toml)", self.path,
                )
        else:
            self._revision = 1 if seed else 0
            self._pools = {p.name: PoolRecord(p, self._revision) for p in seed}
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._write(self._pools, self._revision)
            except OSError as exc:
                raise ConfigFileError(f"{self.path}: cannot create the pool store: {exc.strerror or exc}") from None
            log.info("pool store %s created from the config file's %d pools", self.path, len(seed))
        # Watchers asking for anything older than this get a Resync.
        self._oldest = self._revision

    # ------------------------------------------------------------------ reads
    def list_pools(self) -> tuple[list[PoolRecord], int]:
        with self._lock:
            return [self._pools[n] for n in sorted(self._pools)], self._revision

    def get_pool(self, name: str) -> PoolRecord:
        with self._lock:
            return self._get(name)

    def latest_pool_revision(self) -> int:
        with self._lock:
            return max((r.revision for r in self._pools.values()), default=0)

    # ------------------------------------------------------------------ writes
    def create_pool(self, pool: Pool) -> PoolRecord:
        with self._lock:
            existing = self._pools.get(pool.name)
            if existing is not None:
                raise AlreadyExists(f'pool "{pool.name}" already exists (revision {existing.revision})')
            record = PoolRecord(pool, self._revision + 1)
            self._save(pool.name, record)
            return record

    def update_pool(self, pool: Pool, expected_revision: int | None) -> PoolRecord:
        with self._lock:
            self._check(self._get(pool.name), expected_revision)
            record = PoolRecord(pool, self._revision + 1)
            self._save(pool.name, record)
            return record

    def delete_pool(self, name: str, expected_revision: int | None = None) -> None:
        with self._lock:
            self._check(self._get(name), expected_revision)
            self._save(name, None)

    # ------------------------------------------------------------------ watch
    def watch_pools(self, after_revision: int, stop: StopFlag) -> Iterator[PoolEvent | Resync]:
        return follow_history(
            self._changed, stop, after_revision, lambda: (self._oldest, self._revision, self._history),
            lambda: Resync(tuple(self._pools[n] for n in sorted(self._pools)), self._revision))

    # ------------------------------------------------------------------ internals
    def _get(self, name: str) -> PoolRecord:
        record = self._pools.get(name)
        if record is None:
            raise NotFound(f'pool "{name}" not found')
        return record

    @staticmethod
    def _check(record: PoolRecord, expected_revision: int | None) -> None:
        if expected_revision is not None and record.revision != expected_revision:
            raise Conflict(
                f'pool "{record.pool.name}" changed since revision {expected_revision} '
                f"(now at revision {record.revision}); read it again and retry"
            )

    def _save(self, name: str, record: PoolRecord | None) -> None:
        """Write the store with ``name`` set to ``record`` (None: deleted) at the next revision.

        Memory changes only once the file did: a failed write changes nothing."""
        revision = self._revision + 1
        pools = dict(self._pools)
        if record is None:
            del pools[name]
        else:
            pools[name] = record
        try:
            self._write(pools, revision)
        except OSError as exc:
            raise Unavailable(f"cannot write {self.path}: {exc.strerror or exc}") from None
        self._pools, self._revision = pools, revision
        self._history.append(PoolEvent(name, record, revision))
        if len(self._history) == HISTORY:
            self._oldest = self._history[0].revision - 1
        self._changed.notify_all()

    def _write(self, pools: dict[str, PoolRecord], revision: int) -> None:
        document = {
            "format": FORMAT,
            "revision": revision,
            "pools": [
                {"revision": pools[n].revision, "spec": pool_to_dict(pools[n].pool)} for n in sorted(pools)
            ],
        }
        # 0600 (write_atomic's default): specs may carry affinity cookie keys.
        write_atomic(self.path, (json.dumps(document, indent=2) + "\n").encode())

    def _load(self) -> tuple[dict[str, PoolRecord], int]:
        where = str(self.path)
        try:
            document: Any = json.loads(self.path.read_bytes())
        except OSError as exc:
            raise ConfigFileError(f"{where}: cannot read: {exc.strerror or exc}") from None
        except ValueError as exc:
            raise ConfigFileError(f"{where}: not valid JSON ({exc}); restore it or remove it to reseed from the config file") from None
        if not isinstance(document, dict) or document.get("format") != FORMAT:
            raise ConfigFileError(f"{where}: not a Fulcrum pool store (format {FORMAT})")
        revision = document.get("revision")
        entries = document.get("pools")
        if not isinstance(revision, int) or not isinstance(entries, list):
            raise ConfigFileError(f"{where}: missing revision or pools")
        pools: dict[str, PoolRecord] = {}
        for i, entry in enumerate(entries):
            if not isinstance(entry, dict) or not isinstance(entry.get("revision"), int):
                raise ConfigFileError(f"{where}: pools[{i}]: expected {{revision, spec}}")
            try:
                pool = pool_from_dict(entry.get("spec"), f"pools[{i}].spec")
            except ConfigError as exc:
                raise ConfigFileError(f"{where}: {exc}") from None
            if pool.name in pools:
                raise ConfigFileError(f'{where}: pools[{i}]: pool "{pool.name}" appears twice')
            pools[pool.name] = PoolRecord(pool, entry["revision"])
        return pools, revision
