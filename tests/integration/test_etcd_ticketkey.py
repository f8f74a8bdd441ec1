"""The cluster's TLS session ticket key on a real etcd (lbnode.cluster.ticketkey): created once,
taken by every node, rotated once when due (one write wins), a bad value replaced and a
deleted one written again; the key itself is never logged."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio

from lbnode.cluster.etcd import EtcdConnection
from lbnode.cluster.ticketkey import ClusterTicketKey, decode
from tests.integration.etcd_helpers import EtcdCluster

PATH = "/fulcrum/v1/secrets/tls-ticket-key"


@asynccontextmanager
async def _nodes(etcd: EtcdCluster, n: int, lifetime: float) -> AsyncIterator[list[tuple[ClusterTicketKey, list[bytes]]]]:
    """``n`` followers of the key, each with the keys its callback heard."""
    nodes = []
    async with trio.open_nursery() as nursery:
        for _ in range(n):
            follower = ClusterTicketKey(etcd.settings(), EtcdConnection(etcd.endpoints), lifetime=lifetime)
            heard: list[bytes] = []
            follower.on_key(heard.append)
            await nursery.start(follower.run)
            nodes.append((follower, heard))
        yield nodes
        nursery.cancel_scope.cancel()


async def _until(predicate, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.005)


# A watch round trip on loopback is milliseconds; 2 s is the bound of the other etcd
# follow tests on this path, for two busy cores.
FOLLOW = 2.0


async def test_one_key_made_then_rotated_once_when_due_and_taken_by_every_node(etcd, caplog) -> None:  # type: ignore[no-untyped-def]
    caplog.set_level(logging.INFO, logger="lbnode.cluster")
    conn = EtcdConnection(etcd.endpoints)
    lifetime = 1.5  # due 1.5 s after it was made (created is stored in whole seconds: up to 1 s sooner)
    async with _nodes(etcd, 3, lifetime) as nodes:
        await _until(lambda: all(f.key is not None for f, _ in nodes), FOLLOW, "a key on every node")
        first = nodes[0][0].key
        assert all(f.key == first for f, _ in nodes)
        assert sum(f.rotations for f, _ in nodes) == 1  # one node created it
        stored = conn.get(PATH)
        assert stored is not None and decode(stored.value)[0] == first
        waited = trio.current_time()
        await _until(lambda: all(f.key not in (None, first) for f, _ in nodes), lifetime + FOLLOW, "the rotation")
        print(f"\nticket key rotated on 3 nodes {trio.current_time() - waited:.2f} s after the first key "
              f"was on all (due within {lifetime:g} s)")
        second = nodes[0][0].key
        assert all(f.key == second for f, _ in nodes) and sum(f.rotations for f, _ in nodes) == 2
        assert all(heard[:2] == [first, second] for _, heard in nodes)
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert first is not None and first.hex() not in text and second is not None and second.hex() not in text


async def test_a_bad_value_is_replaced_and_a_deleted_key_written_again(etcd, caplog) -> None:  # type: ignore[no-untyped-def]
    caplog.set_level(logging.INFO, logger="lbnode.cluster")
    conn = EtcdConnection(etcd.endpoints)
    async with _nodes(etcd, 2, 3600.0) as nodes:
        await _until(lambda: all(f.key is not None for f, _ in nodes), FOLLOW, "a key on every node")
        first = nodes[0][0].key
        revision = conn.put(PATH, b"not a key")
        await _until(lambda: all(f.key not in (None, first) for f, _ in nodes), FOLLOW, "a new key after the bad one")
        bad = [r.getMessage() for r in caplog.records if "is not {" in r.getMessage()]
        assert bad and all(PATH in m and f"revision {revision}" in m for m in bad)
        second = nodes[0][0].key
        assert nodes[1][0].key == second
        conn.delete_many([PATH])
        await _until(lambda: all(f.key not in (None, first, second) for f, _ in nodes), FOLLOW, "a key again")
        assert nodes[0][0].key == nodes[1][0].key
        stored = conn.get(PATH)
        assert stored is not None and decode(stored.value)[0] == nodes[0][0].key
