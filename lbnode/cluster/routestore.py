"""Routes in the pool store: ``{prefix}/routes/<listener>/<name>`` in etcd, ``state_dir/routes.json`` standalone.

Owns how a route is written to a store (its node.toml table as JSON, the same keys, parsed
again by ``lbnode.model.route_from_dict`` on every read: no code per route key here), the
compare-revision writes and the watches. Blocking and thread-safe; never touches the data plane.
"""

from __future__ import annotations

import json
import logging
import threading
from collections import deque
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from lbnode.cluster.etcd import EtcdConnection, KeyEvent, watch_with_resync
from lbnode.cluster.store import (
    AlreadyExists,
    Conflict,
    NotFound,
    RouteEvent,
    RouteRecord,
    RouteResync,
    StopFlag,
    StoreError,
    Unavailable,
    follow_history,
)
from lbnode.model import NAME_RE, ConfigError, ConfigFileError, route_from_dict
from lbnode.routing import Route
from lbnode.statedir import write_atomic

log = logging.getLogger("lbnode.cluster")

FILE_NAME = "routes.json"
FORMAT = 1  # bumped if the layout of routes.json ever changes
# Changes kept for file watchers that fall behind; older ones get a resync instead.
HISTORY = 1024


def encode_route(route: Route) -> bytes:
    """The stored value: the route's table as JSON (sorted keys: equal routes, equal bytes)."""
    return json.dumps(dict(route.spec), sort_keys=True, separators=(",", ":")).encode()


def decode_route(listener: str, name: str, value: bytes | object, path: str = "route") -> Route:
    """A stored value back into a validated route; ConfigError (naming the key) otherwise."""
    data = json.loads(value) if isinstance(value, bytes) else value
    route = route_from_dict(data, path)
    if route.name != name:
        raise ConfigError(f"{path}.name", f'"{route.name}" does not match the key (expected "{name}")')
    if not NAME_RE.fullmatch(listener):
        raise ConfigError(f"{path}.listener", f'"{listener}" is not a listener name')
    return route


def _describe(listener: str, name: str) -> str:
    return f'route "{name}" of listener "{listener}"'


# --------------------------------------------------------------------------- etcd


class EtcdRoutes:
    """``RouteStore`` over etcd. Writes compare revisions exactly as pool writes do. A value
    that is not a valid route (written with etcdctl) is logged once, naming the key, and
    skipped: nodes keep serving its last valid version."""

    def __init__(self, conn: EtcdConnection, prefix: str) -> None:
        self.conn = conn
        self.prefix = f"{prefix}/routes/"
        self._logged_bad: set[tuple[str, int]] = set()
        self._bad_lock = threading.Lock()

    def key(self, listener: str, name: str) -> str:
        return f"{self.prefix}{listener}/{name}"

    def _split_key(self, key: str) -> tuple[str, str] | None:
        listener, sep, name = key[len(self.prefix):].partition("/")
        if not sep or not NAME_RE.fullmatch(listener) or not NAME_RE.fullmatch(name):
            return None
        return listener, name

    def list_routes(self) -> tuple[list[RouteRecord], int]:
        kvs, revision = self.conn.get_prefix(self.prefix)
        records = [r for kv in kvs if (r := self._decode(kv.key, kv.value, kv.mod_revision)) is not None]
        return records, revision

    def get_route(self, listener: str, name: str) -> RouteRecord:
        kv = self.conn.get(self.key(listener, name))
        if kv is None:
            raise NotFound(f"{_describe(listener, name)} does not exist")
        try:
            return RouteRecord(listener, decode_route(listener, name, kv.value), kv.mod_revision)
        except (ValueError, ConfigError) as exc:
            raise StoreError(f"{kv.key}: the stored route is not valid ({exc}); replace it with lbctl routes "
                             f"apply, or delete it with `etcdctl del {kv.key}`") from None

    def put_route(self, listener: str, route: Route, expected_revision: int | None = None) -> RouteRecord:
        done, revision = self.conn.write_if(
            f"write {_describe(listener, route.name)}", self.key(listener, route.name), encode_route(route),
            expected_revision,
        )
        if not done:
            raise _refusal(listener, route.name, expected_revision, revision)
        return RouteRecord(listener, route, revision)

    def delete_route(self, listener: str, name: str, expected_revision: int | None = None) -> None:
        done, revision = self.conn.write_if(
            f"delete {_describe(listener, name)}", self.key(listener, name), None, expected_revision
        )
        if not done:
            raise _refusal(listener, name, expected_revision, revision)

    def watch_routes(self, after_revision: int, stop: StopFlag) -> Iterator[RouteEvent | RouteResync]:
        def resync() -> tuple[RouteResync, int]:
            records, revision = self.list_routes()
            return RouteResync(tuple(records), revision), revision

        yield from watch_with_resync(self.conn, self.prefix, after_revision, stop, "route", self._event, resync)

    def _event(self, change: KeyEvent) -> RouteEvent | None:
        where = self._split_key(change.key)
        if where is None:
            return None
        if change.value is None:
            return RouteEvent(*where, None, change.revision)
        record = self._decode(change.key, change.value, change.revision)
        return None if record is None else RouteEvent(*where, record, change.revision)

    def _decode(self, key: str, value: bytes, revision: int) -> RouteRecord | None:
        try:
            where = self._split_key(key)
            if where is None:
                raise ValueError("the key is not <listener>/<name>")
            return RouteRecord(where[0], decode_route(*where, value), revision)
        except (ValueError, ConfigError) as exc:  # foreign data: the data's fault
            with self._bad_lock:
                first = (key, revision) not in self._logged_bad
                self._logged_bad.add((key, revision))
            if first:
                log.warning("%s (revision %d) is not a valid route, skipped: %s; nodes keep its last valid "
                            "version. Fix it with lbctl routes apply, or `etcdctl del %s`", key, revision, exc, key)
            return None


def _refusal(listener: str, name: str, expected_revision: int | None, now: int) -> StoreError:
    if not now:
        return NotFound(f"{_describe(listener, name)} does not exist")
    if expected_revision == 0:
        return AlreadyExists(f"{_describe(listener, name)} already exists (revision {now})")
    return Conflict(f"{_describe(listener, name)} changed since revision {expected_revision} (now at {now}): "
                    "read it again and retry")


# --------------------------------------------------------------------------- state_dir


class FileRoutes:
    """``RouteStore`` in ``state_dir/routes.json``, seeded with node.toml's routes only when
    the file does not exist yet (as pools.json is). One revision counter for the file; each
    route's revision is the counter at its last write; writes are atomic."""

    def __init__(self, state_dir: Path | str, seed: Sequence[tuple[str, Route]] = ()) -> None:
        self.path = Path(state_dir) / FILE_NAME
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._history: deque[RouteEvent] = deque(maxlen=HISTORY)
        if self.path.exists():
            self._routes, self._revision = self._load()
            seeded = {(li, r.name): r.spec for li, r in seed}
            if seeded != {k: r.route.spec for k, r in self._routes.items()}:
                log.warning("the config file's [[listeners.routes]] differ from %s, which wins: the file seeds "
                            "the store only once; change routes with lbctl (lbctl routes apply, lbctl apply -f)",
                            self.path)
        else:
            self._revision = 1 if seed else 0
            self._routes = {(li, r.name): RouteRecord(li, r, self._revision) for li, r in seed}
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._write(self._routes, self._revision)
            except OSError as exc:
                raise ConfigFileError(f"{self.path}: cannot create the route store: {exc.strerror or exc}") from None
        self._oldest = self._revision  # watchers asking for anything older get a resync

    def list_routes(self) -> tuple[list[RouteRecord], int]:
        with self._lock:
            return [self._routes[k] for k in sorted(self._routes)], self._revision

    def get_route(self, listener: str, name: str) -> RouteRecord:
        with self._lock:
            return self._get(listener, name)

    def put_route(self, listener: str, route: Route, expected_revision: int | None = None) -> RouteRecord:
        with self._lock:
            existing = self._routes.get((listener, route.name))
            if expected_revision == 0 and existing is not None:
                raise AlreadyExists(f"{_describe(listener, route.name)} already exists (revision {existing.revision})")
            if expected_revision:
                self._check(self._get(listener, route.name), expected_revision)
            record = RouteRecord(listener, route, self._revision + 1)
            self._save((listener, route.name), record)
            return record

    def delete_route(self, listener: str, name: str, expected_revision: int | None = None) -> None:
        with self._lock:
            record = self._get(listener, name)
            if expected_revision is not None:
                self._check(record, expected_revision)
            self._save((listener, name), None)

    def watch_routes(self, after_revision: int, stop: StopFlag) -> Iterator[RouteEvent | RouteResync]:
        return follow_history(
            self._changed, stop, after_revision, lambda: (self._oldest, self._revision, self._history),
            lambda: RouteResync(tuple(self._routes[k] for k in sorted(self._routes)), self._revision))

    # ------------------------------------------------------------------ internals
    def _get(self, listener: str, name: str) -> RouteRecord:
        record = self._routes.get((listener, name))
        if record is None:
            raise NotFound(f"{_describe(listener, name)} does not exist")
        return record

    @staticmethod
    def _check(record: RouteRecord, expected_revision: int) -> None:
        if record.revision != expected_revision:
            raise Conflict(f"{_describe(*record.key)} changed since revision {expected_revision} "
                           f"(now at {record.revision}): read it again and retry")

    def _save(self, key: tuple[str, str], record: RouteRecord | None) -> None:
        """Memory changes only once the file did: a failed write changes nothing."""
        revision = self._revision + 1
        routes = dict(self._routes)
        if record is None:
            del routes[key]
        else:
            routes[key] = record
        try:
            self._write(routes, revision)
        except OSError as exc:
            raise Unavailable(f"cannot write {self.path}: {exc.strerror or exc}") from None
        self._routes, self._revision = routes, revision
        self._history.append(RouteEvent(key[0], key[1], record, revision))
        if len(self._history) == HISTORY:
            self._oldest = self._history[0].revision - 1
        self._changed.notify_all()

    def _write(self, routes: dict[tuple[str, str], RouteRecord], revision: int) -> None:
        document = {
            "format": FORMAT,
            "revision": revision,
            "routes": [
                {"listener": k[0], "revision": routes[k].revision, "spec": dict(routes[k].route.spec)}
                for k in sorted(routes)
            ],
        }
        write_atomic(self.path, (json.dumps(document, indent=2) + "\n").encode())

    def _load(self) -> tuple[dict[tuple[str, str], RouteRecord], int]:
        where = str(self.path)
        try:
            document: Any = json.loads(self.path.read_bytes())
        except OSError as exc:
            raise ConfigFileError(f"{where}: cannot read: {exc.strerror or exc}") from None
        except ValueError as exc:
            raise ConfigFileError(f"{where}: not valid JSON ({exc}); restore it or remove it to reseed from "
                                  "the config file") from None
        if not isinstance(document, dict) or document.get("format") != FORMAT:
            raise ConfigFileError(f"{where}: not a Fulcrum route store (format {FORMAT})")
        revision, entries = document.get("revision"), document.get("routes")
        if not isinstance(revision, int) or not isinstance(entries, list):
            raise ConfigFileError(f"{where}: missing revision or routes")
        try:
            records = decode_route_entries(entries, "routes")
        except ConfigError as exc:
            raise ConfigFileError(f"{where}: {exc}") from None
        return {r.key: r for r in records}, revision


def decode_route_entries(entries: list[Any], path: str) -> list[RouteRecord]:
    """``[{listener, revision, spec}]`` (routes.json, the cache in state_dir) into records;
    ConfigError naming the entry otherwise (a route twice included)."""
    records: dict[tuple[str, str], RouteRecord] = {}
    for i, entry in enumerate(entries):
        key = f"{path}[{i}]"
        if not isinstance(entry, dict) or not isinstance(entry.get("revision"), int) \
                or not isinstance(entry.get("listener"), str):
            raise ConfigError(key, "expected {listener, revision, spec}")
        spec = entry.get("spec")
        name = spec.get("name") if isinstance(spec, dict) else None
        if not isinstance(name, str):
            raise ConfigError(f"{key}.spec.name", "is required")
        route = decode_route(entry["listener"], name, spec, f"{key}.spec")
        record = RouteRecord(entry["listener"], route, entry["revision"])
        if record.key in records:
            raise ConfigError(key, f"{_describe(*record.key)} appears twice")
        records[record.key] = record
    return list(records.values())
