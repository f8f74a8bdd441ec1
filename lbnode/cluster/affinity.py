"""Session affinity shared through etcd: each pool's table of session key -> backend, and the cookie key.

Owns ``{prefix}/affinity/<pool>/<key>`` (entries bound to a few bucketed TTL leases, so that
idle sessions vanish without one lease per entry) and ``{prefix}/secrets/cookie-key`` (agreed
once, then followed: an operator's rotation is taken at once). Never
blocks the data plane: tables answer from a local cache kept by one watch; every etcd call
runs in a worker thread from background tasks; with etcd down the tables work locally and
catch up when it answers.

Wiring (what ``LbNode`` does; all calls from the Trio thread): ``ClusterAffinity`` is the
``SharedAffinity`` handed to ``Snapshot.build``; ``await nursery.start(affinity.run)``; after
each snapshot, ``affinity.retain(tables in use)`` stops the tables of removed pools.
"""

from __future__ import annotations

import json
import logging
import math
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote

import etcd3
import trio

from lbnode.affinity import (
    KEY_BYTES,
    AffinityTable,
    CookieKeyring,
    check_table_limits,
    load_older_keys,
    load_or_create_key,
    save_older_keys,
)
from lbnode.cluster.etcd import Compacted, EtcdConnection, KeyEvent, KeyValue, LeaseNotFound
from lbnode.cluster.store import StoreError
from lbnode.cluster.watch import follow_watch
from lbnode.model import Affinity, ClusterSettings

log = logging.getLogger("lbnode.cluster")

# Retry delays after etcd failed: short first, never hammering a sick etcd.
BACKOFF_FIRST = 0.2
BACKOFF_MAX = 5.0
# Keys per transaction (etcd allows 128 operations per branch; a write adds one read).
TXN_MAX_KEYS = 100
# A new bucket lease every idle_timeout / BUCKETS_PER_IDLE (the bucket width), TTL = idle_timeout
# + width: an entry lives between idle_timeout and idle_timeout + 2 widths after its last use,
# with a handful of leases per pool and node instead of one per entry.
BUCKETS_PER_IDLE = 4
# Floor of the bucket width: a tiny idle_timeout must not grant a lease on every write.
MIN_BUCKET = 0.25
# Locally an entry nobody has used or written for its lease TTL + this is dropped even though
# etcd never said so (etcd down, watch broken); with etcd up its watch deletes it first (etcd
# checks lease expiry every 0.5 s), so the cache never forgets a session etcd still holds.
LOCAL_SLACK = 1.0
# A batch of lease moves refused because one entry changed meanwhile is sent again (without
# that entry) at most this many times in a row.
TOUCH_RETRIES = 3

# A stopping node writes the sessions it bound last for at most this long.
FINAL_FLUSH = 0.5

# What a table still owes etcd for a key.
CREATE, REPLACE, DELETE = "create", "replace", "delete"


def escape_key(session_key: str) -> str:
    """A session key as one etcd path segment: percent-encoded (``/`` too), IPs stay readable."""
    return quote(session_key, safe="", errors="surrogatepass")


def unescape_key(segment: str) -> str:
    return unquote(segment, errors="surrogatepass")


def encode_entry(backend_id: str, node_id: str) -> bytes:
    return json.dumps({"backend": backend_id, "node": node_id}, sort_keys=True, separators=(",", ":")).encode()


def decode_entry(value: bytes) -> str | None:
    """The backend id of an entry's value; None if it is not one."""
    try:
        data = json.loads(value)
    except ValueError:
        return None
    backend = data.get("backend") if isinstance(data, dict) else None
    return backend if isinstance(backend, str) and backend else None


class _Entry:
    """One session key in the local cache."""

    __slots__ = ("backend", "used", "seen", "revision", "expires")

    def __init__(self, backend: str, used: float, seen: float, revision: int, expires: float) -> None:
        self.backend = backend
        self.used = used  # last local get/put (Trio clock); -inf if only learned from etcd
        self.seen = seen  # last time etcd showed it written (by anyone)
        self.revision = revision  # mod_revision of the value held here; 0: not in etcd as far as we know
        self.expires = expires  # lower bound of when its lease ends (Trio clock); 0: unknown


class EtcdAffinityTable:
    """``AffinityTable`` shared by every node through ``{prefix}/affinity/<pool>/``.

    Answers from a local cache (an ``OrderedDict`` in least-recently-used order, bound by
    ``max_entries``, evictions counted). ``put_if_absent`` stands at once and queues a
    ``create_revision == 0`` write; when etcd shows that another node wrote the key first,
    the cache adopts its entry (``adopted`` counts those). ``get`` on an entry whose lease
    would end within ``idle_timeout`` queues a move to the current bucket lease (batched, at
    most every bucket width); an entry nobody uses expires with its lease. The watch that
    feeds ``on_put``/``on_delete``/``reset`` is ``ClusterAffinity``'s; ``run`` writes.
    """

    def __init__(
        self,
        conn: EtcdConnection,
        prefix: str,
        pool: str,
        node_id: str,
        idle_timeout: float,
        max_entries: int,
        *,
        clock: Callable[[], float] = trio.current_time,
    ) -> None:
        self.conn = conn
        self.pool = pool
        self.node_id = node_id
        self.key_prefix = f"{prefix}/affinity/{pool}/"
        self._clock = clock
        self.evictions = 0
        self.expirations = 0
        self.adopted = 0  # local choices given up for another node's earlier entry
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._pending: dict[str, str] = {}  # key -> what to write, not sent yet
        self._in_flight: dict[str, str] = {}  # key -> what is being written now
        self._deferred: dict[str, tuple[str, int, int]] = {}  # events seen while our replace was on its way
        self._touched: set[str] = set()  # keys used since their lease was last moved
        self._wake = trio.Event()
        self._next_touch = 0.0
        self._lease: int | None = None  # the current bucket lease
        self._lease_started = 0.0
        self._leases: dict[int, float] = {}  # our bucket leases -> when they end at the earliest
        self._scope: trio.CancelScope | None = None
        self.stopped = False
        self.writing_failed = False  # the last write to etcd failed (it is being retried)
        self.lease_ttl = 0
        # Told (key, backend) when etcd shows an entry this node did not choose: another node's,
        # or one that won over ours. A supervisor passes them on to its workers.
        self.on_learned: Callable[[str, str], None] | None = None
        # Told the key when etcd deleted an entry and this table dropped it (a session another
        # node, an operator or its lease ended): a supervisor's workers drop their copies too.
        self.on_forgotten: Callable[[str], None] | None = None
        self.configure(idle_timeout, max_entries)

    def configure(self, idle_timeout: float, max_entries: int) -> None:
        """New limits from a pool change; the entries stay."""
        check_table_limits(idle_timeout, max_entries)
        self.idle_timeout = idle_timeout
        self.max_entries = max_entries
        self.bucket = max(idle_timeout / BUCKETS_PER_IDLE, MIN_BUCKET)
        ttl = math.ceil(idle_timeout + self.bucket)
        if ttl != self.lease_ttl:
            self._lease = None  # the next write takes a lease with the new TTL
        self.lease_ttl = ttl
        self.local_expiry = ttl + LOCAL_SLACK

    def __repr__(self) -> str:
        return f"EtcdAffinityTable({self.key_prefix!r}, {len(self._entries)} entries)"

    # ------------------------------------------------------------------ the data plane
    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str, now: float) -> str | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        if now - max(entry.used, entry.seen) >= self.local_expiry:
            self._drop(key)
            self.expirations += 1
            return None
        entry.used = now
        self._entries.move_to_end(key)
        if entry.expires < now + self.idle_timeout and key not in self._touched:
            if not self._touched:
                self._wake.set()  # the writer sleeps without a deadline while nothing is touched
            self._touched.add(key)
        return entry.backend

    def put_if_absent(self, key: str, backend_id: str, now: float) -> str:
        existing = self.get(key, now)
        if existing is not None:
            return existing
        self._insert(key, _Entry(backend_id, now, now, 0, 0.0), now)
        self._queue(key, CREATE)
        return backend_id

    def replace(self, key: str, backend_id: str, now: float) -> None:
        entry = self._entries.get(key)
        if entry is None:
            self._insert(key, _Entry(backend_id, now, now, 0, 0.0), now)
        else:
            entry.backend, entry.used = backend_id, now
            self._entries.move_to_end(key)
        self._deferred.pop(key, None)
        self._queue(key, REPLACE)

    def delete(self, key: str) -> None:
        if key in self._entries:
            self._drop(key)
        self._queue(key, DELETE)

    def items(self, now: float) -> list[tuple[str, str]]:
        """The entries that stand now (key, backend), for a worker that starts."""
        return [(k, e.backend) for k, e in self._entries.items() if now - max(e.used, e.seen) < self.local_expiry]

    def _queue(self, key: str, op: str) -> None:
        self._pending[key] = op
        self._wake.set()

    def _insert(self, key: str, entry: _Entry, now: float) -> None:
        entries = self._entries
        # Entries nobody used or wrote for too long go first (least recently active first).
        while entries:
            oldest, e = next(iter(entries.items()))
            if now - max(e.used, e.seen) < self.local_expiry:
                break
            self._drop(oldest)
            self.expirations += 1
        entries[key] = entry
        entries.move_to_end(key)
        while len(entries) > self.max_entries:
            oldest = next(iter(entries))
            self._drop(oldest)
            self.evictions += 1

    def _drop(self, key: str) -> None:
        del self._entries[key]
        self._touched.discard(key)
        self._deferred.pop(key, None)
        if self._pending.get(key) in (CREATE, REPLACE):
            del self._pending[key]

    def _owed(self, key: str) -> str | None:
        """The write this node still owes etcd for ``key`` (the newest one)."""
        return self._pending.get(key) or self._in_flight.get(key)

    # ------------------------------------------------------------------ what etcd shows
    def on_put(self, key: str, backend_id: str, revision: int, lease: int) -> None:
        """etcd holds ``backend_id`` for ``key`` at ``revision`` (watch, full read, failed write)."""
        entry = self._entries.get(key)
        if entry is not None and revision <= entry.revision:
            return  # already known (our own write, acknowledged first)
        owed = self._owed(key)
        if owed == REPLACE:
            self._deferred[key] = (backend_id, revision, lease)  # our write lands after it
            return
        if owed == DELETE:
            return
        now = self._clock()
        if owed == CREATE and self._pending.get(key) == CREATE:
            del self._pending[key]  # the key exists: our create would lose
        expires = self._lease_end(lease, now)
        if entry is None:
            self._insert(key, _Entry(backend_id, -math.inf, now, revision, expires), now)
            if self.on_learned is not None:
                self.on_learned(key, backend_id)
            return
        changed = entry.backend != backend_id
        if owed == CREATE and changed:
            self.adopted += 1
            log.debug("pool %s: session %r adopts backend %s written first by another node (was %s)",
                      self.pool, key, backend_id, entry.backend)
        entry.backend, entry.revision, entry.expires, entry.seen = backend_id, revision, expires, now
        self._entries.move_to_end(key)
        if changed and self.on_learned is not None:
            self.on_learned(key, backend_id)

    def on_delete(self, key: str, revision: int) -> None:
        """etcd deleted ``key`` at ``revision`` (its lease ended, or someone deleted it)."""
        entry = self._entries.get(key)
        if entry is not None and revision > entry.revision:
            self._vanished(key, entry)

    def reset(self, found: dict[str, tuple[str, int, int]]) -> None:
        """A full read of the pool's entries: ``{key: (backend id, mod_revision, lease)}``."""
        for key, entry in list(self._entries.items()):
            if key not in found and entry.revision > 0:
                self._vanished(key, entry)
        for key, (backend_id, revision, lease) in found.items():
            self.on_put(key, backend_id, revision, lease)

    def _vanished(self, key: str, entry: _Entry) -> None:
        if self._owed(key) in (CREATE, REPLACE):
            return  # our write puts it back
        now = self._clock()
        if now - entry.used < self.idle_timeout and entry.expires <= now:
            # Its lease may have ended, yet it was used here within idle_timeout: the move to a
            # newer lease came too late (etcd was away, or another node's lease ended sooner
            # than estimated). The session is alive: write it again. (Before its lease could
            # end, a delete is someone's decision, and stands.)
            entry.revision, entry.expires = 0, 0.0
            self._queue(key, CREATE)
            return
        self._drop(key)
        self.expirations += 1
        if self.on_forgotten is not None:
            self.on_forgotten(key)

    def _lease_end(self, lease: int, now: float) -> float:
        end = self._leases.get(lease)
        if end is not None:
            return end
        # Another node's bucket lease: written within the last bucket width onto a lease that
        # ends at least idle_timeout after that write, unless the watch lags more than a width.
        return now + self.idle_timeout - self.bucket if lease else 0.0

    # ------------------------------------------------------------------ writing
    def stop(self) -> None:
        self.stopped = True
        if self._scope is not None:
            self._scope.cancel()

    async def run(self) -> None:
        """Write what the data plane queued, until ``stop`` or cancellation.

        A node that stops gets a last short chance to write the sessions it just bound,
        so that the other nodes honour them (never when the table itself was dropped).
        """
        try:
            with trio.CancelScope() as self._scope:
                if self.stopped:
                    return
                await self._write_loop()
        finally:
            if self._pending and not self.stopped and not self.writing_failed:
                with trio.CancelScope(shield=True), trio.move_on_after(FINAL_FLUSH):
                    try:
                        await self._write_pending()
                    except StoreError:
                        pass  # etcd is away: the sessions stay this node's (gone with it)

    async def _write_loop(self) -> None:
        delay = BACKOFF_FIRST
        while True:
            now = self._clock()
            touches_due = bool(self._touched) and now >= self._next_touch
            if not self._pending and not touches_due:
                with trio.move_on_at(self._next_touch if self._touched else math.inf):
                    await self._wake.wait()
                self._wake = trio.Event()
                continue
            try:
                await self._write_pending()
                if touches_due:
                    self._next_touch = now + self.bucket
                    await self._write_touches()
            except LeaseNotFound:
                self._lease = None  # ended while etcd was away: the next try takes a new one
                await trio.sleep(BACKOFF_FIRST)
                continue
            except StoreError as exc:
                if not self.writing_failed:
                    log.warning("affinity of pool %s: cannot write to etcd (%s); the local choices stand, "
                                "retrying", self.pool, exc)
                    self.writing_failed = True
                await trio.sleep(delay)
                delay = min(delay * 2, BACKOFF_MAX)
                continue
            if self.writing_failed:
                log.info("affinity of pool %s: writing to etcd again", self.pool)
                self.writing_failed = False
            delay = BACKOFF_FIRST

    async def _current_lease(self) -> tuple[int, float]:
        """The bucket lease for writes now, and when it ends at the earliest (Trio clock)."""
        now = self._clock()
        if self._lease is not None and now < self._lease_started + self.bucket:
            return self._lease, self._leases[self._lease]
        lease_id, granted = await trio.to_thread.run_sync(self.conn.grant, self.lease_ttl, abandon_on_cancel=True)
        for old in [lid for lid, end in self._leases.items() if end < now]:
            del self._leases[old]
        self._lease, self._lease_started = lease_id, now
        self._leases[lease_id] = now + granted  # granted after we asked: a lower bound
        return lease_id, now + granted

    async def _write_pending(self) -> None:
        ops, self._pending = self._pending, {}
        self._in_flight = ops
        try:
            for key in [k for k, op in ops.items() if op != DELETE and k not in self._entries]:
                del ops[key]  # evicted meanwhile
            creates = [k for k, op in ops.items() if op == CREATE]
            replaces = [k for k, op in ops.items() if op == REPLACE]
            deletes = [k for k, op in ops.items() if op == DELETE]
            if creates or replaces:
                lease, ends = await self._current_lease()
                for chunk in _chunks(creates):
                    await self._create(chunk, lease, ends)
                    for key in chunk:
                        del ops[key]
                for chunk in _chunks(replaces):
                    await self._put(chunk, lease, ends)
                    for key in chunk:
                        del ops[key]
            for chunk in _chunks(deletes):
                keys = [self.key_prefix + escape_key(k) for k in chunk]
                await trio.to_thread.run_sync(self.conn.delete_many, keys, abandon_on_cancel=True)
                for key in chunk:
                    del ops[key]
        finally:
            self._in_flight = {}
            for key, op in ops.items():  # not written: again next time, unless something newer is queued
                self._pending.setdefault(key, op)

    def _items(self, keys: Sequence[str]) -> list[tuple[str, str, str, bytes]]:
        """(key, etcd key, backend id, value) for entries in the cache."""
        out = []
        for key in keys:
            backend = self._entries[key].backend
            out.append((key, self.key_prefix + escape_key(key), backend, encode_entry(backend, self.node_id)))
        return out

    async def _create(self, keys: list[str], lease: int, ends: float) -> None:
        """First writer wins: one transaction; keys that exist already are adopted."""
        items = self._items(keys)

        def txn(c: etcd3.MultiEndpointEtcd3Client) -> tuple[bool, list[Any]]:
            t = c.transactions
            return c.transaction(  # type: ignore[no-any-return]
                compare=[t.create(ek) == 0 for _, ek, _, _ in items],
                success=[t.put(ek, v, lease=lease) for _, ek, _, v in items] + [t.get(items[0][1])],
                failure=[t.get(ek) for _, ek, _, _ in items],
            )

        ok, responses = await trio.to_thread.run_sync(
            self.conn.call, f"create {len(items)} affinity entries of pool {self.pool}", txn, abandon_on_cancel=True
        )
        if ok:
            revision = int(responses[-1][0][1].mod_revision)
            for key, _, backend, _ in items:
                self._written(key, backend, revision, ends)
            return
        for (key, _, _, _), found in zip(items, responses, strict=True):
            if found:
                self._adopt(key, found)
            else:
                self._pending.setdefault(key, CREATE)  # free after all: only another key was taken

    async def _put(self, keys: list[str], lease: int, ends: float) -> None:
        """Replaced entries: the last writer wins (the session's backend was unusable)."""
        items = self._items(keys)

        def txn(c: etcd3.MultiEndpointEtcd3Client) -> tuple[bool, list[Any]]:
            t = c.transactions
            return c.transaction(  # type: ignore[no-any-return]
                compare=[],
                success=[t.put(ek, v, lease=lease) for _, ek, _, v in items] + [t.get(items[0][1])],
                failure=[],
            )

        _, responses = await trio.to_thread.run_sync(
            self.conn.call, f"write {len(items)} affinity entries of pool {self.pool}", txn, abandon_on_cancel=True
        )
        revision = int(responses[-1][0][1].mod_revision)
        for key, _, backend, _ in items:
            self._written(key, backend, revision, ends)

    async def _write_touches(self) -> None:
        """Move the entries used since their lease was last moved onto the current lease."""
        due = []
        for key in list(self._touched):
            entry = self._entries.get(key)
            if entry is None or entry.revision == 0 or entry.expires >= entry.used + self.idle_timeout:
                self._touched.discard(key)  # gone, not written yet (its write takes a fresh lease), or covered
            elif key not in self._pending:
                due.append(key)
        if not due:
            return
        lease, ends = await self._current_lease()
        for chunk in _chunks(due):
            for _ in range(TOUCH_RETRIES):
                chunk = [k for k in chunk if k in self._entries and k not in self._pending]
                if not chunk:
                    break
                chunk = await self._move(chunk, lease, ends)

    async def _move(self, keys: list[str], lease: int, ends: float) -> list[str]:
        """Re-put entries onto ``lease`` unless they changed; returns the keys to try again."""
        items = [(*item, self._entries[item[0]].revision) for item in self._items(keys)]

        def txn(c: etcd3.MultiEndpointEtcd3Client) -> tuple[bool, list[Any]]:
            t = c.transactions
            return c.transaction(  # type: ignore[no-any-return]
                compare=[t.mod(ek) == rev for _, ek, _, _, rev in items],
                success=[t.put(ek, v, lease=lease) for _, ek, _, v, _ in items] + [t.get(items[0][1])],
                failure=[t.get(ek) for _, ek, _, _, _ in items],
            )

        ok, responses = await trio.to_thread.run_sync(
            self.conn.call, f"refresh {len(items)} affinity entries of pool {self.pool}", txn, abandon_on_cancel=True
        )
        if ok:
            revision = int(responses[-1][0][1].mod_revision)
            for key, _, backend, _, _ in items:
                self._written(key, backend, revision, ends)
                entry = self._entries.get(key)
                if entry is None or entry.expires >= entry.used + self.idle_timeout:
                    self._touched.discard(key)
            return []
        again = []
        for (key, _, _, _, rev), found in zip(items, responses, strict=True):
            entry = self._entries.get(key)
            if entry is None:
                continue
            if not found:
                self._vanished(key, entry)  # its lease ended before we moved it
            elif int(found[0][1].mod_revision) == rev:
                again.append(key)  # unchanged: refused because of another key
            else:
                self._adopt(key, found)  # changed meanwhile: moved with the new revision next time
        return again

    def _adopt(self, key: str, found: list[Any]) -> None:
        value, meta = found[0]
        backend = decode_entry(bytes(value))
        if backend is not None:
            self.on_put(key, backend, int(meta.mod_revision), int(meta.lease_id))

    def _written(self, key: str, backend: str, revision: int, ends: float) -> None:
        """Our write of ``backend`` for ``key`` landed at ``revision``."""
        entry = self._entries.get(key)
        deferred = self._deferred.pop(key, None)
        if entry is None:
            return
        if revision > entry.revision:
            if key not in self._pending:
                entry.backend = backend  # (a replace queued since keeps its own choice)
            entry.revision, entry.expires, entry.seen = revision, ends, self._clock()
        if deferred is not None and deferred[1] > entry.revision and key not in self._pending:
            self.on_put(key, *deferred)  # another node wrote after us while ours was on its way


def _chunks(keys: list[str]) -> Iterator[list[str]]:
    for i in range(0, len(keys), TXN_MAX_KEYS):
        yield keys[i:i + TXN_MAX_KEYS]


class ClusterAffinity:
    """This node's share of the cluster's affinity state (``SharedAffinity`` for ``Snapshot.build``).

    One ``EtcdAffinityTable`` per pool (kept across snapshots), all fed by one watch on
    ``{prefix}/affinity/``; the cluster cookie key from ``{prefix}/secrets/cookie-key``,
    created from this node's ``state_dir`` key by the first node that gets there, then
    followed (a rotation written there is sealed under at once). Until etcd answers, the
    node seals with its own key (``cookie_key_from`` says which is in use).
    """

    def __init__(
        self,
        settings: ClusterSettings,
        node_id: str,
        state_dir: Path,
        *,
        connection: EtcdConnection | None = None,
        clock: Callable[[], float] = trio.current_time,
    ) -> None:
        self.settings = settings
        self.node_id = node_id
        self.state_dir = Path(state_dir)
        self.conn = connection if connection is not None else EtcdConnection(settings.etcd)
        self._owns_connection = connection is None
        self.prefix = f"{settings.prefix}/affinity/"
        self.cookie_key_path = f"{settings.prefix}/secrets/cookie-key"
        self._clock = clock
        self.tables: dict[str, EtcdAffinityTable] = {}
        self._keyring: CookieKeyring | None = None
        self.cookie_key_from = "state_dir"  # "etcd" once the cluster key is in use
        self.cookie_key_agreed = trio.Event()
        self.following = trio.Event()  # set after the first full read of the tables
        self._key_wanted = trio.Event()
        self._rewatch = trio.Event()
        self._nursery: trio.Nursery | None = None
        self._logged_bad: set[tuple[str, int]] = set()
        self._on_learned: Callable[[str, str, str], None] | None = None
        self._on_forgotten: Callable[[str, str], None] | None = None
        self._on_cookie_key: Callable[[CookieKeyring], None] | None = None

    # ------------------------------------------------------------------ SharedAffinity
    def table(self, pool: str, spec: Affinity, previous: AffinityTable | None) -> AffinityTable:
        if isinstance(previous, EtcdAffinityTable) and self.tables.get(pool) is previous:
            previous.configure(spec.idle_timeout, spec.max_entries)
            return previous
        table = EtcdAffinityTable(
            self.conn, self.settings.prefix, pool, self.node_id, spec.idle_timeout, spec.max_entries, clock=self._clock
        )
        if self._on_learned is not None:
            table.on_learned = self._learned_in(pool)
        if self._on_forgotten is not None:
            table.on_forgotten = self._forgotten_in(pool)
        old = self.tables.get(pool)
        if old is not None:
            old.stop()
        self.tables[pool] = table
        if self._nursery is not None:
            self._nursery.start_soon(table.run)
            self._rewatch.set()  # read everything again: the new table starts with the pool's entries
        return table

    def cookie_keyring(self) -> CookieKeyring:
        if self._keyring is None:
            try:
                older = load_older_keys(self.state_dir)
            except (ValueError, OSError) as exc:
                log.warning("cookie key: %s; ignoring the file (cookies sealed under the keys it held get "
                            "their clients balanced afresh)", exc)
                older = []
            self._keyring = CookieKeyring(load_or_create_key(self.state_dir), older)
            self._key_wanted.set()
        return self._keyring

    def on_learned(self, callback: Callable[[str, str, str], None]) -> None:
        """``callback(pool, key, backend)`` for each entry etcd shows that this node did not
        choose itself (another node's, or one that won over this node's choice): a supervisor
        hands them to its workers, whose tables learn only from it."""
        self._on_learned = callback
        for pool, table in self.tables.items():
            table.on_learned = self._learned_in(pool)

    def _learned_in(self, pool: str) -> Callable[[str, str], None]:
        callback = self._on_learned
        assert callback is not None
        return lambda key, backend: callback(pool, key, backend)

    def on_forgotten(self, callback: Callable[[str, str], None]) -> None:
        """``callback(pool, key)`` for each entry etcd deleted that this node held (a session
        ended on another node, removed by an operator, or its lease ended): a supervisor tells
        its workers, whose copies would otherwise live on until idle."""
        self._on_forgotten = callback
        for pool, table in self.tables.items():
            table.on_forgotten = self._forgotten_in(pool)

    def _forgotten_in(self, pool: str) -> Callable[[str], None]:
        callback = self._on_forgotten
        assert callback is not None
        return lambda key: callback(pool, key)

    def on_cookie_key(self, callback: Callable[[CookieKeyring], None]) -> None:
        """``callback(keyring)`` each time the cookie key in use changes without a configuration
        change (the switch to the cluster key, an operator's rotation): a supervisor sends
        ``keyring.keys()`` to its workers, which seal and open as this node does."""
        self._on_cookie_key = callback

    def retain(self, tables: list[AffinityTable]) -> None:
        """Stop the tables not in ``tables`` (their pool was removed or lost its table mode)."""
        keep = {id(t) for t in tables}
        for pool, table in list(self.tables.items()):
            if id(table) not in keep:
                table.stop()
                del self.tables[pool]

    # ------------------------------------------------------------------ run
    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Follow and write the tables, agree on the cookie key; returns to the nursery at once."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                for table in self.tables.values():
                    nursery.start_soon(table.run)
                nursery.start_soon(self._follow)
                nursery.start_soon(self._agree_on_cookie_key)
                task_status.started()
        finally:
            self._nursery = None
            if self._owns_connection:
                self.conn.close()

    # ------------------------------------------------------------------ the cookie key
    async def _agree_on_cookie_key(self) -> None:
        """Agree on the cluster key (first writer wins), then follow it for as long as the node runs."""
        await self._key_wanted.wait()
        keyring = self._keyring
        assert keyring is not None
        key, created = await self._agree(keyring.key)
        if keyring.switch(key):
            log.info("cookie key: switched to the cluster key %s from etcd (cookies this node sealed "
                     "under its own key are still accepted here)", self.cookie_key_path)
            self._key_changed(keyring)
        elif created:
            log.info("cookie key: this node's key is now the cluster key %s", self.cookie_key_path)
        else:
            log.info("cookie key: using the cluster key %s", self.cookie_key_path)
        self.cookie_key_from = "etcd"
        self.cookie_key_agreed.set()
        await self._follow_cookie_key(keyring)

    async def _agree(self, proposal: bytes) -> tuple[bytes, bool]:
        """The cluster key and whether ``proposal`` became it, retried until etcd answers."""
        delay, failing = BACKOFF_FIRST, False
        while True:
            try:
                return await trio.to_thread.run_sync(self._create_or_read_key, proposal, abandon_on_cancel=True)
            except StoreError as exc:
                if not failing:
                    log.warning("cookie key: cannot reach etcd (%s); sealing affinity cookies with the key "
                                "in use (this node's own from %s until the first agreement) until it answers",
                                exc, self.state_dir)
                    failing = True
            except ValueError as exc:
                if not failing:
                    log.error("cookie key: %s; sealing with the key in use meanwhile", exc)
                    failing = True
                delay = BACKOFF_MAX
            await trio.sleep(delay)
            delay = min(delay * 2, BACKOFF_MAX)

    def _create_or_read_key(self, proposal: bytes) -> tuple[bytes, bool]:
        """(the cluster key, whether ours became it); first writer wins. Blocking."""
        return self.conn.agree_on_secret(
            self.cookie_key_path, proposal,
            "the next node to start writes its own (cookies sealed under the old key stop matching)",
        )

    def _key_changed(self, keyring: CookieKeyring) -> None:
        # The keys it replaced outlive a restart: the other nodes still open cookies sealed under them.
        try:
            save_older_keys(self.state_dir, keyring.keys()[1:])
        except OSError as exc:
            log.warning("cookie key: cannot keep the replaced keys in %s (%s): after a restart this node "
                        "no longer opens cookies sealed under them", self.state_dir, exc)
        if self._on_cookie_key is not None:
            self._on_cookie_key(keyring)

    async def _follow_cookie_key(self, keyring: CookieKeyring) -> None:
        """Follow ``{prefix}/secrets/cookie-key`` after the agreement: a new value (an operator's
        rotation, ``etcdctl put``) is sealed under from then on, the replaced keys still open;
        a deleted key is written again with the key in use (first writer wins, so the nodes
        agree again rather than each keeping its own)."""
        path = self.cookie_key_path
        delay, failing = BACKOFF_FIRST, False
        while True:
            try:
                kvs, revision = await trio.to_thread.run_sync(self.conn.get_prefix, path, abandon_on_cancel=True)
                stored = next((kv for kv in kvs if kv.key == path), None)
                if stored is None:
                    key, _ = await self._agree(keyring.key)
                    self._stored_key(keyring, key.hex().encode(), 0)
                    continue
                self._stored_key(keyring, stored.value, stored.mod_revision)
                delay, failing = BACKOFF_FIRST, False
                if await self._watch_cookie_key(keyring, revision):
                    log.warning("cookie key: %s was deleted; writing the key in use again", path)
                continue
            except Compacted:
                continue
            except StoreError as exc:
                if not failing:
                    log.warning("cookie key: cannot follow %s (%s); sealing under the key in use, retrying",
                                path, exc)
                    failing = True
            await trio.sleep(delay)
            delay = min(delay * 2, BACKOFF_MAX)

    async def _watch_cookie_key(self, keyring: CookieKeyring, revision: int) -> bool:
        """Take each new value of the key after ``revision``; True once it was deleted."""
        path = self.cookie_key_path
        deleted = trio.Event()

        def each(batch: list[KeyEvent]) -> None:
            for event in batch:
                if event.key != path:
                    continue  # (another key that starts with the same name)
                if event.value is None:
                    deleted.set()
                else:
                    self._stored_key(keyring, event.value, event.revision)

        await follow_watch(lambda stop: self.conn.watch_prefix(path, revision + 1, stop), each, deleted)
        return deleted.is_set()

    def _stored_key(self, keyring: CookieKeyring, value: bytes, revision: int) -> None:
        """etcd holds ``value`` as the cluster key: seal under it if it is a new one."""
        try:
            key = bytes.fromhex(value.decode("ascii").strip())
        except ValueError:  # (UnicodeDecodeError too)
            key = b""
        if len(key) != KEY_BYTES:
            self._bad(self.cookie_key_path, revision,
                      f"not {2 * KEY_BYTES} hex digits; sealing affinity cookies under the key in use")
            return
        if keyring.switch(key):
            log.info("cookie key: the cluster key %s changed (revision %d): sealing under the new key; "
                     "cookies sealed under the keys it replaced are still accepted here", self.cookie_key_path, revision)
            self._key_changed(keyring)

    # ------------------------------------------------------------------ following etcd
    async def _follow(self) -> None:
        """Read every table's entries, then follow the watch; again after a failure or a new table."""
        delay, failing = BACKOFF_FIRST, False
        while True:
            while not self.tables:
                await self._rewatch.wait()  # no pool shares a table: nothing to watch
                self._rewatch = trio.Event()
            self._rewatch = trio.Event()
            try:
                kvs, revision = await trio.to_thread.run_sync(self.conn.get_prefix, self.prefix, abandon_on_cancel=True)
                self._reset(kvs)
                if failing:
                    log.info("affinity tables: etcd reachable again, following from revision %d", revision)
                delay, failing = BACKOFF_FIRST, False
                self.following.set()
                await self._watch(revision)
                continue  # a table was added
            except Compacted as exc:
                log.info("affinity tables: %s; reading them again", exc)
                continue
            except StoreError as exc:
                if not failing:
                    log.warning("affinity tables: %s; serving from the local tables, retrying", exc)
                    failing = True
            await trio.sleep(delay)
            delay = min(delay * 2, BACKOFF_MAX)

    async def _watch(self, revision: int) -> None:
        """Hand the watch's changes to the tables until it fails (raised) or a table is added."""

        def each(batch: list[KeyEvent]) -> None:
            for event in batch:
                self._dispatch(event)

        await follow_watch(lambda stop: self.conn.watch_prefix(self.prefix, revision + 1, stop), each, self._rewatch)

    def _split(self, key: str, revision: int) -> tuple[EtcdAffinityTable, str] | None:
        pool, sep, escaped = key[len(self.prefix):].partition("/")
        if not sep:
            self._bad(key, revision, "not an affinity key <pool>/<session key>")
            return None
        table = self.tables.get(pool)
        return None if table is None else (table, unescape_key(escaped))

    def _dispatch(self, event: KeyEvent) -> None:
        found = self._split(event.key, event.revision)
        if found is None:
            return
        table, session_key = found
        if event.value is None:
            table.on_delete(session_key, event.revision)
            return
        backend = decode_entry(event.value)
        if backend is None:
            self._bad(event.key, event.revision, 'not an affinity entry {"backend": id, "node": id}')
            return
        table.on_put(session_key, backend, event.revision, event.lease)

    def _reset(self, kvs: list[KeyValue]) -> None:
        by_pool: dict[str, dict[str, tuple[str, int, int]]] = {}
        for kv in kvs:
            found = self._split(kv.key, kv.mod_revision)
            if found is None:
                continue
            backend = decode_entry(kv.value)
            if backend is None:
                self._bad(kv.key, kv.mod_revision, 'not an affinity entry {"backend": id, "node": id}')
                continue
            by_pool.setdefault(found[0].pool, {})[found[1]] = (backend, kv.mod_revision, kv.lease)
        for pool, table in self.tables.items():
            table.reset(by_pool.get(pool, {}))

    def _bad(self, key: str, revision: int, why: str) -> None:
        if (key, revision) not in self._logged_bad:
            self._logged_bad.add((key, revision))
            log.warning("%s (revision %d) skipped: %s", key, revision, why)
