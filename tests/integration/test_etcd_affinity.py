"""Shared affinity tables and the cluster cookie key against a real etcd.

Each ``ClusterAffinity`` here stands for one node (its own etcd connection and state_dir);
two of them on the same prefix are two nodes of one cluster. Run with ``-s`` to see the
measured figures (propagation between nodes, expiry after the idle timeout).
"""

from __future__ import annotations

import logging
import stat
import statistics
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import trio

from lbnode.affinity import CookieSealer, load_older_keys, load_or_create_key
from lbnode.cluster.affinity import ClusterAffinity, EtcdAffinityTable, escape_key
from lbnode.cluster.etcd import EtcdConnection
from lbnode.cluster.store import Unavailable
from lbnode.model import Affinity
from tests.integration.etcd_helpers import EtcdCluster

PREFIX = "/fulcrum/v1"


@asynccontextmanager
async def _node(
    etcd: EtcdCluster, tmp_path: Path, node_id: str, *, idle: float = 30.0, max_entries: int = 1000, wait: bool = True
) -> AsyncIterator[tuple[ClusterAffinity, EtcdAffinityTable]]:
    """One node's shared affinity with a ``source_ip`` table for pool ``web``, running."""
    shared = ClusterAffinity(etcd.settings(), node_id, tmp_path / node_id, connection=EtcdConnection(etcd.endpoints))
    table = shared.table("web", Affinity(mode="source_ip", idle_timeout=idle, max_entries=max_entries), None)
    assert isinstance(table, EtcdAffinityTable)
    async with trio.open_nursery() as nursery:
        await nursery.start(shared.run)
        if wait:
            with trio.fail_after(5):
                await shared.following.wait()
        yield shared, table
        nursery.cancel_scope.cancel()


def _stored(conn: EtcdConnection, session_key: str, pool: str = "web") -> bytes | None:
    """The entry's value in etcd (None: absent, or etcd not answering yet)."""
    try:
        kv = conn.get(f"{PREFIX}/affinity/{pool}/{escape_key(session_key)}")
    except Unavailable:
        return None
    return None if kv is None else kv.value


def _now() -> float:
    return trio.current_time()


async def _until(predicate, timeout: float, what: str) -> float:  # type: ignore[no-untyped-def]
    """Poll ``predicate`` every millisecond; the seconds it took."""
    start = trio.current_time()
    while not predicate():
        assert trio.current_time() - start < timeout, f"{what}: not within {timeout}s"
        await trio.sleep(0.001)
    return trio.current_time() - start


async def test_an_entry_made_on_one_node_is_served_by_the_other(etcd, tmp_path) -> None:
    async with _node(etcd, tmp_path, "n1") as (_, a), _node(etcd, tmp_path, "n2") as (_, b):
        delays = []
        for i in range(50):
            key = f"198.18.2.{i}"
            assert a.put_if_absent(key, f"backend-{i % 3}", _now()) == f"backend-{i % 3}"
            delays.append(await _until(lambda k=key, i=i: b.get(k, _now()) == f"backend-{i % 3}", 2.0, key))
        delays.sort()
        p50, p99 = statistics.median(delays), delays[int(len(delays) * 0.99) - 1]
        print(f"\naffinity entry node 1 -> node 2 over 50 entries: p50 {p50 * 1000:.1f} ms, "
              f"p99 {p99 * 1000:.1f} ms, max {delays[-1] * 1000:.1f} ms")
        assert p99 < 0.5
        assert len(b) == 50
        # Session keys that are not path-safe are escaped, and come back as they were.
        odd = "sess/ion id ü%2F"
        a.put_if_absent(odd, "backend-x", _now())
        await _until(lambda: b.get(odd, _now()) == "backend-x", 2.0, "escaped key")


async def test_a_moved_session_and_a_forgotten_one_reach_the_other_node(etcd, tmp_path) -> None:
    async with _node(etcd, tmp_path, "n1") as (_, a), _node(etcd, tmp_path, "n2") as (_, b):
        a.put_if_absent("198.18.12.1", "down-now", _now())
        await _until(lambda: b.get("198.18.12.1", _now()) == "down-now", 2.0, "first write")
        b.replace("198.18.12.1", "elsewhere", _now())  # its backend failed on node 2: the session moves
        await _until(lambda: a.get("198.18.12.1", _now()) == "elsewhere", 2.0, "replace")
        a.delete("198.18.12.1")
        await _until(lambda: b.get("198.18.12.1", _now()) is None, 2.0, "delete")


async def test_an_entry_deleted_in_etcd_is_told_to_on_forgotten(etcd, tmp_path) -> None:
    """What a supervisor relays to its workers: an entry etcd deleted (another node ended the
    session, an operator removed it) is dropped and told, whoever chose it."""
    conn = EtcdConnection(etcd.endpoints)
    async with _node(etcd, tmp_path, "n1") as (_, a), _node(etcd, tmp_path, "n2") as (shared, b):
        forgotten: list[tuple[str, str]] = []
        shared.on_forgotten(lambda pool, key: forgotten.append((pool, key)))
        a.put_if_absent("198.18.13.1", "theirs", _now())  # another node's
        b.put_if_absent("198.18.13.2", "ours", _now())  # this node's own
        await _until(lambda: b.get("198.18.13.1", _now()) == "theirs", 2.0, "another node's entry")
        await _until(lambda: _stored(conn, "198.18.13.2") is not None, 2.0, "this node's entry written")
        conn.delete_many([f"{PREFIX}/affinity/web/{escape_key(k)}" for k in ("198.18.13.1", "198.18.13.2")])
        await _until(lambda: len(forgotten) == 2, 2.0, "both deletes told")
        assert sorted(forgotten) == [("web", "198.18.13.1"), ("web", "198.18.13.2")]
        assert b.get("198.18.13.1", _now()) is None and b.get("198.18.13.2", _now()) is None
        # Written and deleted at once by someone else: learned from the watch, then forgotten.
        learned: list[tuple[str, str, str]] = []
        shared.on_learned(lambda pool, key, backend: learned.append((pool, key, backend)))
        conn.put(f"{PREFIX}/affinity/web/{escape_key('198.18.13.3')}", b'{"backend":"x","node":"n9"}')
        conn.delete_many([f"{PREFIX}/affinity/web/{escape_key('198.18.13.3')}"])
        await _until(lambda: len(forgotten) == 3, 2.0, "the third delete told")
        assert learned == [("web", "198.18.13.3", "x")] and forgotten[-1] == ("web", "198.18.13.3")


async def test_each_node_keeps_at_most_max_entries_of_the_shared_table(etcd, tmp_path) -> None:
    async with _node(etcd, tmp_path, "n1") as (_, a), _node(etcd, tmp_path, "n2", max_entries=10) as (_, b):
        for i in range(30):
            a.put_if_absent(f"198.18.14.{i}", "x", _now())
        await _until(lambda: b.get("198.18.14.29", _now()) == "x", 2.0, "last entry")
        assert len(a) == 30 and len(b) == 10 and b.evictions == 20
        assert b.get("198.18.14.0", _now()) is None  # the least recently used went first


async def test_first_writer_wins_and_the_other_node_adopts_its_entry(etcd, tmp_path) -> None:
    conn = EtcdConnection(etcd.endpoints)
    async with _node(etcd, tmp_path, "n1") as (_, a), _node(etcd, tmp_path, "n2") as (_, b):
        agreed = []
        for i in range(20):
            key = f"198.18.4.{i}"
            # Both nodes see the session at once: each local choice stands for its own request...
            assert a.put_if_absent(key, "a", _now()) == "a"
            assert b.put_if_absent(key, "b", _now()) == "b"
            # ...then etcd's first writer wins everywhere.
            took = await _until(
                lambda k=key: a.get(k, _now()) == b.get(k, _now()) and _stored(conn, k) is not None, 2.0, key
            )
            winner = a.get(key, _now())
            assert winner in ("a", "b")
            assert f'"backend":"{winner}"'.encode() in (_stored(conn, key) or b"")
            agreed.append(took)
        print(f"\nsame new session on two nodes at once, 20 times: both agree after "
              f"{statistics.median(agreed) * 1000:.1f} ms (median), {max(agreed) * 1000:.1f} ms (max)")
        assert max(agreed) < 1.0
        assert a.adopted + b.adopted == 20  # the loser of every race gave its choice up
        # A node that writes later adopts the existing entry and never overwrites it.
        a.put_if_absent("198.18.5.1", "a", _now())
        await _until(lambda: _stored(conn, "198.18.5.1") is not None, 2.0, "write")
        b._entries.clear()  # as if node 2 had evicted it: it does not know the entry
        assert b.put_if_absent("198.18.5.1", "b", _now()) == "b"
        await _until(lambda: b.get("198.18.5.1", _now()) == "a", 2.0, "adoption")
        assert b"\"backend\":\"a\"" in (_stored(conn, "198.18.5.1") or b"")


async def test_idle_entries_vanish_with_their_lease_and_used_ones_stay(etcd, tmp_path) -> None:
    idle = 1.0  # buckets of 0.25 s, leases of ceil(1.25) = 2 s
    conn = EtcdConnection(etcd.endpoints)
    async with _node(etcd, tmp_path, "n1", idle=idle) as (_, a), _node(etcd, tmp_path, "n2", idle=idle) as (_, b):
        a.put_if_absent("198.18.6.1", "idle", _now())
        a.put_if_absent("198.18.6.2", "busy", _now())
        await _until(lambda: _stored(conn, "198.18.6.1") and _stored(conn, "198.18.6.2"), 2.0, "writes")
        written = trio.current_time()
        await _until(lambda: b.get("198.18.6.2", _now()) == "busy", 2.0, "propagation")
        # Node 2 keeps using the busy session; nobody uses the idle one.
        gone_after = None
        while trio.current_time() - written < 4 * idle + 1:
            assert b.get("198.18.6.2", _now()) == "busy"
            if gone_after is None and _stored(conn, "198.18.6.1") is None:
                gone_after = trio.current_time() - written
            await trio.sleep(0.05)
        assert gone_after is not None, "the idle entry is still in etcd"
        print(f"\nidle_timeout {idle:g}s: unused entry deleted by etcd {gone_after:.2f}s after its write")
        # The lease TTL is idle + one bucket, rounded up to whole seconds; etcd checks every 0.5 s.
        assert idle <= gone_after <= a.lease_ttl + 1.5
        assert a.get("198.18.6.1", _now()) is None and b.get("198.18.6.1", _now()) is None  # the watch told both
        assert _stored(conn, "198.18.6.2") is not None  # used by node 2: alive after 5 idle timeouts
        assert a.get("198.18.6.2", _now()) == "busy"
        # Once nobody uses it, the busy one goes too.
        last_use = trio.current_time()
        took = await _until(lambda: _stored(conn, "198.18.6.2") is None, idle + 2 * a.bucket + 2.0, "expiry")
        print(f"idle_timeout {idle:g}s: entry deleted {took:.2f}s after its last use")
        await _until(lambda: len(a) == 0 and len(b) == 0, 1.0, "caches emptied by the watch")
        assert trio.current_time() - last_use >= idle


async def test_etcd_down_the_table_keeps_working_locally_and_catches_up(etcd, tmp_path, caplog) -> None:
    caplog.set_level(logging.INFO, logger="lbnode.cluster")
    member = etcd.members[0]
    async with _node(etcd, tmp_path, "n1") as (_, a):
        a.put_if_absent("198.18.8.1", "before", _now())
        conn = EtcdConnection(etcd.endpoints)
        await _until(lambda: _stored(conn, "198.18.8.1") is not None, 2.0, "write")
        member.kill()
        start = time.monotonic()
        assert a.get("198.18.8.1", _now()) == "before"
        assert a.put_if_absent("198.18.8.2", "x", _now()) == "x"
        assert a.put_if_absent("198.18.8.2", "y", _now()) == "x"
        a.replace("198.18.8.1", "moved", _now())
        assert a.get("198.18.8.1", _now()) == "moved"
        assert time.monotonic() - start < 0.01  # no call waited for etcd
        await trio.sleep(2.0)  # writes fail and are retried meanwhile
        assert a.get("198.18.8.2", _now()) == "x" and a.writing_failed
        member.start()
        member.wait_healthy()
        took = await _until(
            lambda: b'"moved"' in (_stored(conn, "198.18.8.1") or b"")
            and _stored(conn, "198.18.8.2") is not None
            and not a.writing_failed,
            10.0,
            "catch-up",
        )
        print(f"\netcd back: queued affinity writes landed {took:.2f}s after it was healthy")
    warnings = [r for r in caplog.records if "cannot write to etcd" in r.getMessage()]
    assert len(warnings) == 1  # logged once, however many retries
    assert any("writing to etcd again" in r.getMessage() for r in caplog.records)


async def test_a_node_started_with_etcd_down_serves_locally_then_follows(etcd, tmp_path) -> None:
    member = etcd.members[0]
    async with _node(etcd, tmp_path, "n1") as (_, a):
        a.put_if_absent("198.18.10.1", "from-n1", _now())
        conn = EtcdConnection(etcd.endpoints)
        await _until(lambda: _stored(conn, "198.18.10.1") is not None, 2.0, "write")
        member.kill()
        async with _node(etcd, tmp_path, "n2", wait=False) as (shared, b):
            assert b.put_if_absent("198.18.10.2", "from-n2", _now()) == "from-n2"
            assert b.get("198.18.10.1", _now()) is None  # never read: etcd is down
            member.start()
            member.wait_healthy()
            with trio.fail_after(10):
                await shared.following.wait()
            await _until(lambda: b.get("198.18.10.1", _now()) == "from-n1", 2.0, "full read")
            await _until(lambda: a.get("198.18.10.2", _now()) == "from-n2", 10.0, "n2's queued write")


async def test_the_first_node_creates_the_cookie_key_and_the_others_adopt_it(etcd, tmp_path) -> None:
    conn = EtcdConnection(etcd.endpoints)
    own = {n: load_or_create_key(tmp_path / n) for n in ("n1", "n2", "n3")}
    assert len(set(own.values())) == 3
    async with _node(etcd, tmp_path, "n1") as (s1, _):
        ring1 = s1.cookie_keyring()
        with trio.fail_after(5):
            await s1.cookie_key_agreed.wait()
        assert ring1.key == own["n1"]  # the first node's own key became the cluster key
        stored = conn.get(f"{PREFIX}/secrets/cookie-key")
        assert stored is not None and stored.lease == 0 and bytes.fromhex(stored.value.decode()) == own["n1"]
        async with _node(etcd, tmp_path, "n2") as (s2, _), _node(etcd, tmp_path, "n3") as (s3, _):
            ring2, ring3 = s2.cookie_keyring(), s3.cookie_keyring()
            sealed_before = ring2.seal("b1", time.time() + 60)  # under n2's own key, before the switch
            with trio.fail_after(5):
                await s2.cookie_key_agreed.wait()
                await s3.cookie_key_agreed.wait()
            assert ring2.key == ring3.key == own["n1"] and s2.cookie_key_from == "etcd"
            # Any node opens any node's cookie; n2 still opens what it sealed before the switch.
            cookie = ring1.seal("b2", time.time() + 60)
            assert ring2.open(cookie, time.time()) == ring3.open(cookie, time.time()) == "b2"
            assert ring2.open(sealed_before, time.time()) == "b1"
            assert CookieSealer(own["n1"]).open(ring3.seal("b3", time.time() + 60), time.time()) == "b3"


async def test_a_rotated_cluster_key_is_taken_by_every_node_and_the_old_one_still_opens(
    etcd, tmp_path, caplog,
) -> None:
    """An operator writes a new cluster key (``etcdctl put``): every node seals under it within
    a watch round trip and says so (``on_cookie_key``: a supervisor tells its workers), and
    still opens cookies sealed under the keys it replaced. A value that is not a key is
    ignored and logged, naming the key; a deleted key is written again with the key in use."""
    caplog.set_level(logging.INFO, logger="lbnode.cluster")
    conn = EtcdConnection(etcd.endpoints)
    path = f"{PREFIX}/secrets/cookie-key"
    async with _node(etcd, tmp_path, "n1") as (s1, _), _node(etcd, tmp_path, "n2") as (s2, _):
        told: dict[str, list[list[bytes]]] = {"n1": [], "n2": []}
        s1.on_cookie_key(lambda ring: told["n1"].append(ring.keys()))
        s2.on_cookie_key(lambda ring: told["n2"].append(ring.keys()))
        ring1, ring2 = s1.cookie_keyring(), s2.cookie_keyring()
        with trio.fail_after(5):
            await s1.cookie_key_agreed.wait()
            await s2.cookie_key_agreed.wait()
        old = ring1.key
        assert ring2.key == old
        sealed_before = ring2.seal("b1", time.time() + 60)
        new = bytes(range(100, 132))
        conn.put(path, new.hex().encode())
        await _until(lambda: ring1.key == new and ring2.key == new, 2.0, "the rotated key on both nodes")
        assert told["n1"][-1][:2] == [new, old] and told["n2"][-1][:2] == [new, old]
        assert ring1.open(sealed_before, time.time()) == "b1"
        assert CookieSealer(new).open(ring2.seal("b2", time.time() + 60), time.time()) == "b2"
        told_so_far = {n: len(t) for n, t in told.items()}

        conn.put(path, b"not a key")
        await _until(lambda: any("secrets/cookie-key" in r.getMessage() and "hex digits" in r.getMessage()
                                 for r in caplog.records), 2.0, "the bad value logged")
        assert ring1.key == ring2.key == new and {n: len(t) for n, t in told.items()} == told_so_far

        conn.delete_many([path])
        await _until(lambda: (kv := conn.get(path)) is not None and kv.value == new.hex().encode(), 2.0,
                     "the key in use written again")
        assert ring1.key == ring2.key == new and {n: len(t) for n, t in told.items()} == told_so_far


async def test_a_restarted_node_still_opens_cookies_sealed_under_the_keys_it_replaced(etcd, tmp_path) -> None:
    """The keys a node's keyring replaced (its own key for the cluster's, then the cluster key
    an operator rotated) are kept in its state_dir, mode 0600: restarted, even with etcd down,
    it still opens the cookies sealed under them, as the nodes that did not restart do."""
    conn = EtcdConnection(etcd.endpoints)
    path = f"{PREFIX}/secrets/cookie-key"
    first, rotated = bytes(range(32)), bytes(range(100, 132))
    conn.put(path, first.hex().encode())
    own = load_or_create_key(tmp_path / "n1")
    async with _node(etcd, tmp_path, "n1") as (shared, _):
        ring = shared.cookie_keyring()
        sealed_own = ring.seal("b0", time.time() + 60)  # before the switch to the cluster key
        with trio.fail_after(5):
            await shared.cookie_key_agreed.wait()
        sealed_first = ring.seal("b1", time.time() + 60)
        conn.put(path, rotated.hex().encode())
        await _until(lambda: ring.key == rotated, 2.0, "the rotated key")
    kept = tmp_path / "n1" / "cookie.key.older"
    assert stat.S_IMODE(kept.stat().st_mode) == 0o600
    assert load_older_keys(tmp_path / "n1") == [first, own]
    member = etcd.members[0]
    member.kill()
    async with _node(etcd, tmp_path, "n1", wait=False) as (shared, _):
        ring = shared.cookie_keyring()
        assert ring.key == own and shared.cookie_key_from == "state_dir"
        assert ring.open(sealed_first, time.time()) == "b1" and ring.open(sealed_own, time.time()) == "b0"
        member.start()
        member.wait_healthy()
        with trio.fail_after(10):
            await shared.cookie_key_agreed.wait()
        assert ring.key == rotated and ring.keys()[1:] == [own, first]
        assert ring.open(sealed_first, time.time()) == "b1"
    assert load_older_keys(tmp_path / "n1") == [own, first]


async def test_with_etcd_down_at_start_the_node_seals_with_its_own_key_then_switches(etcd, tmp_path, caplog) -> None:
    caplog.set_level(logging.INFO, logger="lbnode.cluster")
    conn = EtcdConnection(etcd.endpoints)
    cluster_key = bytes(range(32))
    conn.put(f"{PREFIX}/secrets/cookie-key", cluster_key.hex().encode())
    member = etcd.members[0]
    member.kill()
    own = load_or_create_key(tmp_path / "n1")
    async with _node(etcd, tmp_path, "n1", wait=False) as (shared, _):
        ring = shared.cookie_keyring()
        await trio.sleep(1.0)
        assert ring.key == own and shared.cookie_key_from == "state_dir"
        member.start()
        member.wait_healthy()
        with trio.fail_after(10):
            await shared.cookie_key_agreed.wait()
        assert ring.key == cluster_key and shared.cookie_key_from == "etcd"
    messages = [r.getMessage() for r in caplog.records]
    assert sum("cookie key: cannot reach etcd" in m for m in messages) == 1
    assert sum("switched to the cluster key" in m for m in messages) == 1


async def test_configured_keys_win_and_standalone_stays_in_memory(etcd, tmp_path) -> None:
    from lbnode.affinity import MemoryAffinityTable, Stickiness

    shared = ClusterAffinity(etcd.settings(), "n1", tmp_path / "n1", connection=EtcdConnection(etcd.endpoints))
    configured = Affinity(mode="cookie", key=b"k" * 32)
    s = Stickiness.build(configured, tmp_path, None, pool="web", shared=shared)
    assert s.cookie_key == b"k" * 32 and shared._keyring is None  # the cluster key is not even fetched
    assert isinstance(Stickiness.build(Affinity(mode="source_ip"), tmp_path, None).table, MemoryAffinityTable)
    t1 = Stickiness.build(Affinity(mode="header:X-Session"), tmp_path, None, pool="web", shared=shared)
    t2 = Stickiness.build(Affinity(mode="header:X-Session", idle_timeout=5), tmp_path, t1, pool="web", shared=shared)
    assert isinstance(t1.table, EtcdAffinityTable) and t2.table is t1.table and t1.table.idle_timeout == 5
    t3 = Stickiness.build(Affinity(mode="source_ip"), tmp_path, t2, pool="web", shared=shared)
    assert t3.table is not t1.table and t1.table.stopped  # a new mode: a new table
