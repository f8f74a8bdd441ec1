"""The VIP claimer against a real etcd on loopback, with the addresses recorded instead of configured.

No namespaces needed: what reaches the wire is covered by test_vip_failover.py; here the
election, the planned hand-off and fencing are pinned with their timings.
"""

from __future__ import annotations

import signal
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio

from lbnode.cluster.etcd import EtcdConnection
from lbnode.cluster.membership import ClusterAgent
from lbnode.cluster.vips import FREE_GRACE, HANDOFF_LINGER, VipClaimer
from lbnode.model import VipSpec
from tests.integration.etcd_helpers import EtcdCluster

VIPS = [VipSpec("10.77.0.100", 24, "eth0"), VipSpec("10.77.0.101", 24, "eth0")]


class RecordedAddresses:
    """What the claimer would have done to the interface: current addresses and a timed log."""

    def __init__(self) -> None:
        self.present: set[str] = set()
        self.log: list[tuple[float, str, str]] = []  # (monotonic time, "add" | "remove" | "announce", vip)

    def _note(self, what: str, vip: VipSpec) -> None:
        self.log.append((time.monotonic(), what, vip.address))

    def add(self, vip: VipSpec) -> None:
        self.present.add(vip.address)
        self._note("add", vip)

    def remove(self, vip: VipSpec) -> None:
        self.present.discard(vip.address)
        self._note("remove", vip)

    def announce(self, vip: VipSpec) -> None:
        self._note("announce", vip)


@asynccontextmanager
async def node(etcd: EtcdCluster, node_id: str, ttl: float) -> AsyncIterator[tuple[VipClaimer, RecordedAddresses]]:
    settings = etcd.settings(lease_ttl=ttl, prefix="/claimer")
    conn = EtcdConnection(etcd.endpoints)
    agent = ClusterAgent(settings, node_id, {}, connection=conn)
    addresses = RecordedAddresses()
    claimer = VipClaimer(settings, node_id, conn, agent, vips=VIPS, addresses=addresses)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(agent.run)
            await nursery.start(claimer.run)
            yield claimer, addresses
            nursery.cancel_scope.cancel()
    finally:
        conn.close()


async def wait_until(condition, timeout: float, message: str) -> float:  # type: ignore[no-untyped-def]
    started = trio.current_time()
    with trio.move_on_after(timeout):
        while not condition():
            await trio.sleep(0.02)
        return trio.current_time() - started
    raise AssertionError(message)


async def test_two_nodes_hold_one_vip_each_and_a_planned_stop_hands_off_at_once(etcd: EtcdCluster) -> None:
    moves: list[tuple[str, str | None, str | None]] = []
    async with node(etcd, "a", 2.0) as (a, a_addr), node(etcd, "b", 2.0) as (b, b_addr):
        b.on_moved(lambda vip, old, new: moves.append((vip, old, new)))
        await wait_until(lambda: len(a.held) == 1 and len(b.held) == 1, 10, f"not one each: {a.held} {b.held}")
        assert a_addr.present | b_addr.present == {"10.77.0.100", "10.77.0.101"}
        assert a_addr.present.isdisjoint(b_addr.present)
        assert [w for _, w, _ in a_addr.log].count("announce") >= 1  # GARP after each add
        (a_vip,) = a.held
        released_at = time.monotonic()
        await a.release_all()
        assert a_addr.present == set()
        assert len(b.held) == 2  # release_all returns once b holds what a had
        # make-before-break: b added the address before a removed it, and a did not linger long
        b_added = next(t for t, what, vip in b_addr.log if what == "add" and vip == a_vip and t >= released_at)
        a_removed = next(t for t, what, vip in a_addr.log if what == "remove" and vip == a_vip and t >= released_at)
        assert b_added < a_removed <= b_added + HANDOFF_LINGER + 0.2
        # and a sent no gratuitous ARP once it began handing off (it would take clients back)
        assert not [t for t, what, vip in a_addr.log if what == "announce" and t >= released_at]
        assert b_added - released_at < FREE_GRACE / 2  # a watch round trip: b was told a stopped accepting VIPs
        assert any(new == "b" and old in (None, "a") for _, old, new in moves)


async def test_fencing_drops_vips_before_the_lease_can_expire_and_takes_them_back_when_etcd_answers(
    etcd: EtcdCluster,
) -> None:
    """etcd stops answering (TTL 4 s): once renewal has failed for TTL/2 the VIPs go, before the
    lease could expire; etcd answers again in time, and the same VIPs come back without moving."""
    ttl = 4.0
    async with node(etcd, "a", ttl) as (a, a_addr), node(etcd, "b", ttl) as (b, b_addr):
        await wait_until(lambda: len(a.held) == 1 and len(b.held) == 1, 10, "not one each")
        before = {**{v: "a" for v in a.held}, **{v: "b" for v in b.held}}
        member = etcd.members[0]
        assert member.popen is not None
        last_keepalive = min(a.agent.lease_expires_at, b.agent.lease_expires_at) - ttl
        member.popen.send_signal(signal.SIGSTOP)
        stopped_at = trio.current_time()
        try:
            # renewal is due TTL/3 after the last keepalive; fenced TTL/2 after that
            fenced_by = last_keepalive + ttl * (1 / 3 + 1 / 2)
            await wait_until(lambda: not a_addr.present and not b_addr.present, fenced_by - stopped_at + 0.3,
                             "VIPs still held after renewal failed for half the TTL")
            dropped = trio.current_time()
            assert dropped < last_keepalive + ttl - 0.3  # well before either lease could expire
            await trio.sleep(0.3)
            assert not a_addr.present and not b_addr.present, "a VIP was added while etcd was silent"
        finally:
            member.popen.send_signal(signal.SIGCONT)
        back = await wait_until(lambda: len(a.held) == 1 and len(b.held) == 1, 5, "VIPs not taken back")
        after = {**{v: "a" for v in a.held}, **{v: "b" for v in b.held}}
        assert after == before  # their keys survived (the lease did not expire): nobody moved
        print(f"fenced {dropped - stopped_at:.2f}s after etcd went silent ({dropped - last_keepalive:.2f}s after "
              f"the last keepalive); VIPs back {back:.2f}s after etcd resumed")
