"""The last configuration a cluster node applied from etcd, kept in ``state_dir/last-config.json``.

Owns that file: its format, its validation, and writing it (atomically, 0600, off the
request path, bursts coalesced) so that a node restarted while etcd is unreachable can
serve what it served before (static stability). Never decides when the cache is served.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import trio

from lbnode.cluster.certstore import certificate_document, certificate_from_document
from lbnode.cluster.routestore import decode_route_entries
from lbnode.cluster.store import CertificateRecord, PoolRecord, RouteRecord
from lbnode.model import ConfigError, pool_from_dict, pool_to_dict
from lbnode.statedir import write_atomic
from lbnode.tls.certs import CertificateError

log = logging.getLogger("lbnode.cluster")

FILE_NAME = "last-config.json"
# Bumped only for a change older readers would misread. New sections ("routes",
# "certificates") are new top-level keys: a reader ignores the sections it does not know.
FORMAT = 1
# After a change, wait this long before writing: a burst (an `lbctl apply -f` of many pools
# is one etcd event per pool) becomes one write. A crash in that window leaves a cache that
# is at most this much older, which is still the configuration of a moment ago.
COALESCE = 0.5


class CacheError(Exception):
    """The file is not a usable cache; the message names the file and what is wrong."""


@dataclass(frozen=True, slots=True)
class CachedConfig:
    pools: tuple[PoolRecord, ...]
    revision: int  # the store revision the pools were applied at
    saved_at: float  # wall-clock seconds
    prefix: str = ""  # the [cluster] prefix the pools were read under
    # the store's certificates (private keys included: the file is 0600, as the store's own)
    certificates: tuple[CertificateRecord, ...] = ()
    # the store's routes; None: the cache was written before routes were stored (or before
    # the node first read them): the listeners keep node.toml's
    routes: tuple[RouteRecord, ...] | None = None

    @property
    def saved_at_iso(self) -> str:
        return iso(self.saved_at)


def iso(wall: float) -> str:
    return datetime.fromtimestamp(wall, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def encode(
    pools: Mapping[str, PoolRecord],
    revision: int,
    saved_at: float,
    prefix: str = "",
    certificates: Mapping[str, CertificateRecord] | None = None,
    routes: Mapping[tuple[str, str], RouteRecord] | None = None,
) -> bytes:
    certificates = certificates or {}
    document: dict[str, Any] = {
        "format": FORMAT,
        "source": "etcd",
        "prefix": prefix,
        "revision": revision,
        "saved_at": saved_at,
        "pools": [{"revision": pools[n].revision, "spec": pool_to_dict(pools[n].pool)} for n in sorted(pools)],
        "certificates": [
            {"revision": certificates[n].revision, "certificate": certificate_document(certificates[n].certificate)}
            for n in sorted(certificates)
        ],
    }
    if routes is not None:
        document["routes"] = [
            {"listener": k[0], "revision": routes[k].revision, "spec": dict(routes[k].route.spec)} for k in sorted(routes)
        ]
    return (json.dumps(document, indent=2) + "\n").encode()


def decode(data: bytes, where: str) -> CachedConfig:
    """Parse and validate a cache file with the model's own validation; ``CacheError`` otherwise."""
    try:
        document: Any = json.loads(data)
    except ValueError as exc:
        raise CacheError(f"{where}: not valid JSON ({exc})") from None
    if not isinstance(document, dict):
        raise CacheError(f"{where}: expected a JSON object")
    if document.get("format") != FORMAT:
        raise CacheError(f"{where}: format {document.get('format')!r} is not {FORMAT} (written by another version?)")
    revision, saved_at, entries = document.get("revision"), document.get("saved_at"), document.get("pools")
    prefix = document.get("prefix", "")
    if not isinstance(prefix, str):
        raise CacheError(f"{where}: prefix: expected a string")
    if not isinstance(revision, int) or isinstance(revision, bool):
        raise CacheError(f"{where}: revision: expected an integer")
    if not isinstance(saved_at, int | float) or isinstance(saved_at, bool):
        raise CacheError(f"{where}: saved_at: expected wall-clock seconds")
    if not isinstance(entries, list):
        raise CacheError(f"{where}: pools: expected a list")
    pools: dict[str, PoolRecord] = {}
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or not isinstance(entry.get("revision"), int):
            raise CacheError(f"{where}: pools[{i}]: expected {{revision, spec}}")
        try:
            pool = pool_from_dict(entry.get("spec"), f"pools[{i}].spec")
        except ConfigError as exc:
            raise CacheError(f"{where}: {exc}") from None
        if pool.name in pools:
            raise CacheError(f'{where}: pools[{i}]: pool "{pool.name}" appears twice')
        pools[pool.name] = PoolRecord(pool, entry["revision"])
    certificates: dict[str, CertificateRecord] = {}
    cert_entries = document.get("certificates", [])  # absent in caches written before certificates
    if not isinstance(cert_entries, list):
        raise CacheError(f"{where}: certificates: expected a list")
    for i, entry in enumerate(cert_entries):
        document_ = entry.get("certificate") if isinstance(entry, dict) else None
        name = document_.get("name") if isinstance(document_, dict) else None
        if not isinstance(entry, dict) or not isinstance(entry.get("revision"), int) or not isinstance(name, str):
            raise CacheError(f"{where}: certificates[{i}]: expected {{revision, certificate: {{name, chain, key}}}}")
        try:
            cert = certificate_from_document(document_, name)
        except CertificateError as exc:  # one line, never the key
            raise CacheError(f'{where}: certificates[{i}] ("{name}"): {exc}') from None
        if name in certificates:
            raise CacheError(f'{where}: certificates[{i}]: certificate "{name}" appears twice')
        certificates[name] = CertificateRecord(cert, entry["revision"])
    routes: tuple[RouteRecord, ...] | None = None
    route_entries = document.get("routes")  # absent in caches written before routes were stored
    if route_entries is not None:
        if not isinstance(route_entries, list):
            raise CacheError(f"{where}: routes: expected a list")
        try:
            routes = tuple(sorted(decode_route_entries(route_entries, "routes"), key=lambda r: r.key))
        except ConfigError as exc:
            raise CacheError(f"{where}: {exc}") from None
    return CachedConfig(
        tuple(pools[n] for n in sorted(pools)), revision, float(saved_at), prefix,
        tuple(certificates[n] for n in sorted(certificates)), routes,
    )


class LastConfig:
    """``note()`` each applied configuration; ``run()`` writes the newest one, coalesced."""

    def __init__(self, state_dir: Path | str, *, prefix: str = "", wall: Callable[[], float] = time.time) -> None:
        self.path = Path(state_dir) / FILE_NAME
        # The [cluster] prefix: a cache read under another one (another cluster) is not ours.
        self.prefix = prefix
        self._wall = wall
        self._pending: tuple[
            dict[str, PoolRecord], int, dict[str, CertificateRecord], dict[tuple[str, str], RouteRecord] | None
        ] | None = None
        self._dirty = trio.Event()
        self._failing = False
        self.writes = 0  # files written (tests count coalescing with it)

    def load(self) -> CachedConfig | None:
        """The cached configuration; None when there is none or it is unusable (logged once, as an error)."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            log.error("%s: cannot read the cached configuration (%s); ignored", self.path, exc.strerror or exc)
            return None
        try:
            cached = decode(data, str(self.path))
        except CacheError as exc:
            log.error("%s; the cached configuration is ignored (it is rewritten once etcd answers)", exc)
            return None
        if cached.prefix != self.prefix:
            log.error("%s: written for [cluster] prefix %r, this node uses %r: the cached configuration is "
                      "ignored (it is rewritten once etcd answers)", self.path, cached.prefix, self.prefix)
            return None
        return cached

    def note(
        self, pools: Mapping[str, PoolRecord], revision: int, certificates: Mapping[str, CertificateRecord] | None = None,
        routes: Mapping[tuple[str, str], RouteRecord] | None = None,
    ) -> None:
        """The node applied this from the store (called on the Trio thread; never blocks)."""
        self._pending = (dict(pools), revision, dict(certificates or {}), None if routes is None else dict(routes))
        self._dirty.set()

    async def run(self) -> None:
        try:
            while True:
                await self._dirty.wait()
                await trio.sleep(COALESCE)
                self._dirty = trio.Event()
                pending, self._pending = self._pending, None
                if pending is not None:
                    # fsync takes milliseconds to seconds on a busy disk: never on the Trio thread
                    await trio.to_thread.run_sync(self._write, *pending)
        finally:
            if self._pending is not None:  # stopping inside the coalescing window: keep the newest
                self._write(*self._pending)

    def _write(
        self, pools: dict[str, PoolRecord], revision: int, certificates: dict[str, CertificateRecord],
        routes: dict[tuple[str, str], RouteRecord] | None,
    ) -> None:
        try:
            write_atomic(self.path, encode(pools, revision, self._wall(), self.prefix, certificates, routes))
        except OSError as exc:
            if not self._failing:
                log.warning("cannot write the configuration cache %s (%s); a restart while etcd is "
                            "unreachable would serve an older one", self.path, exc.strerror or exc)
            self._failing = True
            return
        self._failing = False
        self.writes += 1
