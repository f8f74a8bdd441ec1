"""The VIP claimer against a real etcd on loopback, with the addresses recorded instead of configured.

No namespaces needed: what reaches the wire is covered by test_vip_failover.py; here the
election, the planned hand-off and fencing are pinned with their timings.
"""

from __future__ import annotations

import signal
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio

from lbnode.cluster.etcd import EtcdConnection
from lbnode.cluster.membership import KEEPALIVE_FRACTION, KEEPALIVE_TIMEOUT, ClusterAgent
from lbnode.cluster.vips import FENCE_FRACTION, FREE_GRACE, HANDOFF_LINGER, VipClaimer
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


class StallingRelay:
    """A TCP relay to one etcd member that can stop passing bytes (both ways) without closing
    anything: a call through it waits out its deadline, as one sent to a member that still
    forwards to a dead etcd leader does."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.port = 0
        self._flowing = trio.Event()
        self._flowing.set()

    def stall(self) -> None:
        if self._flowing.is_set():
            self._flowing = trio.Event()

    def resume(self) -> None:
        self._flowing.set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started()
        await trio.serve_listeners(self._relay, listeners)

    async def _relay(self, client: trio.SocketStream) -> None:
        async with client, await trio.open_tcp_stream("127.0.0.1", self.upstream_port) as server:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._pump, client, server, nursery.cancel_scope)
                await self._pump(server, client, nursery.cancel_scope)

    async def _pump(self, source: trio.SocketStream, sink: trio.SocketStream, scope: trio.CancelScope) -> None:
        try:
            while data := await source.receive_some(65536):
                await self._flowing.wait()
                await sink.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        scope.cancel()


@asynccontextmanager
async def node(etcd: EtcdCluster, node_id: str, ttl: float, *, vips: list[VipSpec] = VIPS,
               keepalive_port: int | None = None) -> AsyncIterator[tuple[VipClaimer, RecordedAddresses]]:
    """A claimer with its agent; ``keepalive_port``: the agent's keepalives go there instead."""
    settings = etcd.settings(lease_ttl=ttl, prefix="/claimer")
    conn = EtcdConnection(etcd.endpoints)
    keepalive_conn = (EtcdConnection([f"http://127.0.0.1:{keepalive_port}"], timeout=KEEPALIVE_TIMEOUT)
                      if keepalive_port is not None else None)
    agent = ClusterAgent(settings, node_id, {}, connection=conn, keepalive_connection=keepalive_conn)
    addresses = RecordedAddresses()
    claimer = VipClaimer(settings, node_id, conn, agent, vips=vips, addresses=addresses)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(agent.run)
            await nursery.start(claimer.run)
            yield claimer, addresses
            nursery.cancel_scope.cancel()
    finally:
        conn.close()
        if keepalive_conn is not None:
            keepalive_conn.close()


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
        # GARP after each add: sent right after ``held`` shows the VIP, one worker-thread hop
        # later (netlink), so wait for it (a run beside the CI checked it before it came)
        await wait_until(lambda: [w for _, w, _ in a_addr.log].count("announce") >= 1, 2,
                         f"no GARP after the add: {a_addr.log}")
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


async def test_a_claim_while_keepalives_fail_is_followed_by_a_renewal_and_the_vip_is_not_fenced(
    etcd: EtcdCluster,
) -> None:
    """The host-loss pattern, made deterministic: node a's keepalives hang (their member is
    stalled, as one forwarding to a dead etcd leader) while the rest of etcd answers; b hands
    its VIP over and a wins it with its renewal overdue. The renewal a makes right after the
    claim, through the connection that answered it, moves its fencing deadline: a keeps the
    VIP past the deadline its stuck keepalives left, without a drop and a take-back."""
    ttl = 2.0
    relay = StallingRelay(etcd.members[0].client_port)
    async with trio.open_nursery() as relays:
        await relays.start(relay.run)
        async with node(etcd, "b", ttl, vips=VIPS[:1]) as (b, b_addr):
            await wait_until(lambda: bool(b.held), 10, "b never took the VIP")
            async with node(etcd, "a", ttl, vips=VIPS[:1], keepalive_port=relay.port) as (a, a_addr):
                await wait_until(lambda: "a" in b.claimers and b.holders.get(VIPS[0].address) is not None
                                 and "b" in a.claimers, 10, "a never joined")
                # right after one of a's keepalives answered, its member goes silent
                expires = a.agent.lease_expires_at
                await wait_until(lambda: a.agent.lease_expires_at != expires, ttl, "no keepalive answered")
                relay.stall()
                last_ok = a.agent.lease_expires_at - ttl
                stuck_deadline = a.lease_fence_deadline()
                assert stuck_deadline == pytest.approx(last_ok + ttl * (KEEPALIVE_FRACTION + FENCE_FRACTION))
                # past the keepalive's due time (TTL/3): a's renewal is overdue when it claims
                await trio.sleep_until(last_ok + ttl * 0.4)
                assert a.lease_fence_deadline() == stuck_deadline, "a keepalive went through the stalled member"
                handed_at = trio.current_time()
                relays.start_soon(b.release_all)
                await wait_until(lambda: a_addr.present == {VIPS[0].address}, 2, "a never took the VIP")
                claimed_at = trio.current_time()
                added = max(t for t, w, _ in a_addr.log if w == "add")
                # a watch event, a round and a claim (tens of ms) before the old deadline, 0.87 s
                # after the hand-off began: else this test shows nothing
                assert claimed_at < stuck_deadline, f"a claimed too late: {claimed_at - handed_at:.2f}s"
                # The fence loop would have acted at the old deadline; 0.3 s more is for 2 busy
                # cores. The renewal was sent after the claim answered, so the lease cannot end
                # before a TTL after the hand-off began, and the new deadline is TTL/6 before that.
                await trio.sleep_until(stuck_deadline + 0.3)
                assert a_addr.present == {VIPS[0].address}, f"a fenced the VIP it had just won: {a_addr.log}"
                assert a.lease_fence_deadline() >= handed_at + ttl * (KEEPALIVE_FRACTION + FENCE_FRACTION)
                relay.resume()
                renewals = a.agent.lease_renewals
                await wait_until(lambda: a.agent.lease_renewals > renewals, ttl, "keepalives never answered again")
                await trio.sleep(ttl / 2)
                assert not [w for t, w, _ in a_addr.log if w == "remove" and t >= added], f"a dropped it: {a_addr.log}"
                assert a_addr.present == {VIPS[0].address} and not b_addr.present
                print(f"claimed {claimed_at - handed_at:.2f}s after the hand-off began, "
                      f"{stuck_deadline - claimed_at:.2f}s before the stuck keepalives' fencing deadline; "
                      f"deadline moved to {a.lease_fence_deadline() - stuck_deadline:+.2f}s by the renewal")
        relays.cancel_scope.cancel()


def holders_seen(moves: list[tuple[str, str | None, str | None]], vip: str) -> list[str]:
    """The holders of ``vip`` one node's moves went through, in order (free in between left out)."""
    seen: list[str] = []
    for name, before, after in moves:
        for holder in (before, after):
            if name == vip and holder is not None and (not seen or seen[-1] != holder):
                seen.append(holder)
    return seen


async def test_a_takeover_that_drops_a_held_vip_hands_it_at_once_to_the_node_the_others_deal_it_to(
    etcd: EtcdCluster,
) -> None:
    """Node c holds 10.77.0.101 and is taken over (``hand_over`` / ``adopt``, as ``lbnode run
    --takeover`` does) by a claimer configured with 10.77.0.100 and 10.77.0.102 instead. Its
    claimer key says so before it deletes the dropped VIP's key, so a and b deal that VIP among
    themselves at once, both to b (a holds 10.77.0.100; c no longer takes it): b claims it
    within a watch round trip instead of after ``FREE_GRACE``, it changes hands exactly once,
    make-before-break, and c claims the added VIP. Before, rendezvous dealt it to c (that is
    why these names and addresses): nobody campaigned for FREE_GRACE, then a and b raced."""
    ttl = 2.0
    settings = etcd.settings(lease_ttl=ttl, prefix="/claimer")
    added = VipSpec("10.77.0.102", 24, "eth0")
    c_addr = RecordedAddresses()  # one host: the new process goes on with the old one's addresses
    moves: dict[str, list[tuple[str, str | None, str | None]]] = {"a": [], "b": []}
    conn = EtcdConnection(etcd.endpoints)
    try:
        async with node(etcd, "a", ttl) as (a, a_addr), trio.open_nursery() as nursery:
            # a alone first takes both; then c joins and a gives it the one rendezvous prefers c for
            await wait_until(lambda: len(a.held) == 2, 10, f"a alone did not take both VIPs: {a.held}")
            agent = ClusterAgent(settings, "c", {}, connection=conn)
            old = VipClaimer(settings, "c", conn, agent, vips=VIPS, addresses=c_addr)
            await nursery.start(agent.run)
            await nursery.start(old.run)
            await wait_until(lambda: set(a.held) == {"10.77.0.100"} and set(old.held) == {"10.77.0.101"}, 10,
                             f"not 10.77.0.100 on a and 10.77.0.101 on c: {a.held} {old.held}")
            async with node(etcd, "b", ttl) as (b, b_addr):
                a.on_moved(lambda vip, before, after: moves["a"].append((vip, before, after)))
                b.on_moved(lambda vip, before, after: moves["b"].append((vip, before, after)))
                await wait_until(lambda: all(set(x.claimers) == {"a", "b", "c"} for x in (a, b, old)), 10,
                                 "the claimers never saw each other")
                await trio.sleep(3 * 0.5)  # a few rounds of b's: nothing moves to it (2 VIPs, 3 nodes)
                # (b's first read shows it where each VIP is: a move from "free" in its view)
                assert not b.held and not moves["a"] and all(before is None for _, before, _ in moves["b"]), moves
                moves["b"].clear()
                state = await old.hand_over()
                agent_state = await agent.hand_over()
                new_agent = ClusterAgent(settings, "c", {}, connection=conn)
                new_agent.adopt(agent_state)
                new = VipClaimer(settings, "c", conn, new_agent, vips=[VIPS[0], added], addresses=c_addr)
                new.adopt(state, None)
                started = time.monotonic()
                await nursery.start(new_agent.run)
                await nursery.start(new.run)
                await wait_until(lambda: "10.77.0.101" in b_addr.present and "10.77.0.101" not in c_addr.present,
                                 3, f"10.77.0.101 did not move from c to b: {b.holders}")
                await wait_until(lambda: new.held.keys() == {added.address}, 3, f"c never took {added}: {new.held}")
                await trio.sleep(3 * 0.5)  # a few rounds more: nothing moves again
                b_added = next(t for t, what, vip in b_addr.log if what == "add" and vip == "10.77.0.101")
                c_removed = next(t for t, what, vip in c_addr.log
                                 if what == "remove" and vip == "10.77.0.101" and t >= started)
                print(f"10.77.0.101 on b {b_added - started:.3f}s after the new claimer started; off c "
                      f"{c_removed - started:.3f}s after")
                # the new claimer's start, two writes (claimer key, delete), b's watch event, a round
                # and a claim: tens of milliseconds; FREE_GRACE / 2 leaves room for 2 busy cores
                assert b_added - started < FREE_GRACE / 2, f"b took it {b_added - started:.2f}s after the start"
                assert b_added < c_removed <= b_added + HANDOFF_LINGER + 0.2, "not make-before-break"
                # Once, c -> b, in every node's view: seen as c -> free -> b, or as c -> b when one
                # read of the watch brings the release and the claim together (CI saw that on a).
                for who in ("a", "b"):
                    assert holders_seen(moves[who], "10.77.0.101") == ["c", "b"], moves
                assert not [m for ms in moves.values() for m in ms if m[0] == "10.77.0.100"], moves
                assert a_addr.present == {"10.77.0.100"} and b_addr.present == {"10.77.0.101"}
                assert c_addr.present == {added.address}
                nursery.cancel_scope.cancel()
    finally:
        conn.close()
