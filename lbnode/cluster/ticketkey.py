"""The TLS session ticket key every node of a cluster seals and opens tickets with, from etcd.

A client that resumes its session on another node (its VIP moved, a DNS round robin, a
reconnection the balancer in front sent elsewhere) skips the full handshake there too:
``{prefix}/secrets/tls-ticket-key`` holds one random key (lbnode.tls.ticketkeys: 80 bytes)
and when it was made. The first node to find it absent creates it; every node follows it
with one watch. A key older than ``lifetime`` (12 h, as each process's own keys were: a
stolen key opens the resumptions recorded under it, so it must not live long) is replaced
by the first node to see that, with a compare on its revision so that one write wins; the
others take the winner's. Tickets sealed under the replaced key get full handshakes.

A value that is not such a key (an operator's mistake) is logged, naming the key and its
revision, never its content, and replaced with a new key the same way. While etcd does not
answer, a node keeps the key it has (or, before the first answer, OpenSSL's own per
listener) and retries.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable

import trio

from lbnode.cluster.etcd import Compacted, EtcdConnection, KeyEvent, KeyValue
from lbnode.cluster.store import StoreError
from lbnode.cluster.watch import follow_watch
from lbnode.model import ClusterSettings
from lbnode.tls.ticketkeys import TICKET_KEY_BYTES, TICKET_KEY_LIFETIME

log = logging.getLogger("lbnode.cluster")

BACKOFF_FIRST = 0.2
BACKOFF_MAX = 5.0


def encode(key: bytes, created: float) -> bytes:
    return json.dumps({"key": key.hex(), "created": int(created)}).encode()


def decode(value: bytes) -> tuple[bytes, float]:
    """(key, creation time) of a stored value; ValueError saying what is wrong (never the key)."""
    try:
        record = json.loads(value)
        key = bytes.fromhex(record["key"])
        created = float(record["created"])
    except (ValueError, TypeError, KeyError):
        raise ValueError('not {"key": "<hex>", "created": <unix time>}') from None
    if len(key) != TICKET_KEY_BYTES:
        raise ValueError(f"the key is {len(key)} bytes, not {TICKET_KEY_BYTES}")
    return key, created


class ClusterTicketKey:
    """Follows (creates, rotates) the cluster's ticket key; ``on_key(callback)`` hears each new one."""

    def __init__(
        self,
        settings: ClusterSettings,
        conn: EtcdConnection,
        *,
        lifetime: float = TICKET_KEY_LIFETIME,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.path = f"{settings.prefix}/secrets/tls-ticket-key"
        self.conn = conn
        self.lifetime = lifetime
        self._wall = wall
        self.key: bytes | None = None  # the key in use; None until etcd first answered
        self.rotations = 0  # keys this node wrote (the first included)
        self._callbacks: list[Callable[[bytes], None]] = []
        self._logged_bad: set[int] = set()

    def on_key(self, callback: Callable[[bytes], None]) -> None:
        self._callbacks.append(callback)
        if self.key is not None:
            callback(self.key)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        delay, failing = BACKOFF_FIRST, False
        while True:
            try:
                stored = await trio.to_thread.run_sync(self.conn.get, self.path, abandon_on_cancel=True)
                due = self._take(stored)
                if due <= self._wall():
                    await self._write_new(stored)
                    continue
                if failing:
                    log.info("TLS ticket key: etcd answers again")
                delay, failing = BACKOFF_FIRST, False
                assert stored is not None  # (_take makes an absent key due at once)
                with trio.move_on_after(due - self._wall()):
                    await self._until_changed(stored.mod_revision)
            except Compacted:
                continue
            except StoreError as exc:
                if not failing:
                    log.warning("TLS ticket key: cannot follow %s (%s); %s, retrying", self.path, exc,
                                "keeping the key in use" if self.key is not None else
                                "each listener seals tickets with its own key meanwhile")
                    failing = True
                await trio.sleep(delay)
                delay = min(delay * 2, BACKOFF_MAX)

    def _take(self, stored: KeyValue | None) -> float:
        """Use the stored key if it is one; when the next one is due (now: absent or not a key)."""
        if stored is None:
            return 0.0
        try:
            key, created = decode(stored.value)
        except ValueError as exc:
            if stored.mod_revision not in self._logged_bad:
                self._logged_bad.add(stored.mod_revision)
                log.error("TLS ticket key: %s (revision %d) is %s; writing a new key", self.path,
                          stored.mod_revision, exc)
            return 0.0
        if key != self.key:
            self.key = key
            for callback in self._callbacks:
                callback(key)
        return created + self.lifetime

    async def _write_new(self, stored: KeyValue | None) -> None:
        """A new random key, if the stored one is still the one seen (else another node's write won)."""
        key = os.urandom(TICKET_KEY_BYTES)
        done, _ = await trio.to_thread.run_sync(
            self.conn.write_if, "write a new TLS ticket key", self.path, encode(key, self._wall()),
            0 if stored is None else stored.mod_revision, abandon_on_cancel=True,
        )
        if done:
            self.rotations += 1
            log.info("TLS ticket key: wrote a new key to %s%s", self.path, "" if stored is None else " (rotation)")

    async def _until_changed(self, revision: int) -> None:
        """Until the key changes or is deleted after ``revision``."""
        changed = trio.Event()
        path = self.path

        def each(batch: list[KeyEvent]) -> None:
            if any(event.key == path for event in batch):
                changed.set()

        await follow_watch(lambda stop: self.conn.watch_prefix(path, revision + 1, stop), each, changed)
        if not changed.is_set():
            raise StoreError("the watch ended")  # retried after a pause
