"""Virtual IPs: which node holds each VIP, the etcd election per VIP, and the addresses on the wire.

Owns the pure placement rule (``plan``: fair share with hysteresis over rendezvous hashing),
the ``{prefix}/vips/<address>`` keys (created with ``create_revision == 0``, bound to the
node lease), fencing (a node whose lease renewal has failed for TTL/2 drops every VIP at
once, before the lease can expire; each claim is followed by a renewal, so a VIP just won
while the keepalives lag is not fenced for it), the claimer heartbeats over UDP (``[cluster] heartbeat``: a
majority that misses a holder revokes its lease; a holder short of confirmations fences, see
``lbnode.cluster.heartbeat``), and adding/removing the addresses with netlink plus a gratuitous ARP (IPv4) or an unsolicited
neighbour advertisement (IPv6).
Never blocks the data plane: etcd, netlink and raw-socket calls run in threads.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import logging
import math
import os
import signal
import socket
import struct
import subprocess
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, Protocol

import trio

from lbnode import stopsignals
from lbnode.cluster import heartbeat, vipguard
from lbnode.cluster.assign import checkers_for
from lbnode.cluster.etcd import EtcdConnection, KeyEvent, KeyValue
from lbnode.cluster.membership import KEEPALIVE_FRACTION
from lbnode.cluster.store import StoreError
from lbnode.cluster.watch import follow_watch
from lbnode.cluster.wire import NetlinkAddresses, announce_from_primary
from lbnode.model import NAME_RE, Address, ClusterSettings, ConfigError, VipSpec, parse_address

log = logging.getLogger("lbnode.cluster.vips")

# Without a wake-up (watch event, node joined/left), placement is looked at this often:
# it bounds how late a missed event is noticed and when ``FREE_GRACE`` fires.
ROUND_INTERVAL = 0.5
# A VIP nobody holds is first left to the node the placement picks; past this, every live
# node campaigns for it (that node may not run a claimer, or may be stuck): availability first.
FREE_GRACE = 1.0
# Fencing: once the lease renewal has failed for this fraction of the TTL (counted from when
# it was due, KEEPALIVE_FRACTION of the TTL after the last answered keepalive), the VIPs go.
# The lease expires in etcd a TTL after that keepalive at the earliest: TTL/6 later (and etcd
# extends every lease on a leader change), so they are gone before another node can win them.
# Counting from the due time lets the survivors ride out an etcd leader election (0.5-1 s)
# without dropping their own VIPs.
FENCE_FRACTION = 0.5
# A keepalive unanswered this long after it was due counts as late (for the log of a renewal
# after a claim): a healthy etcd answers in milliseconds, a failing attempt takes 0.5 s.
LATE_RENEWAL = 0.2
# Gratuitous ARPs (IPv6: unsolicited neighbour advertisements) after adding an address, at
# these delays (s): one may be lost on a busy LAN, and the later ones correct a neighbour that
# a planned hand-off's old holder answered while both hosts had the address (see HANDOFF_LINGER).
GARP_DELAYS = (0.0, 0.2, 0.5, 1.0)
# Planned hand-off (drain, stop, rebalancing) is make-before-break: the old holder deletes its
# key but keeps the address, serving, until etcd shows the new holder's key; then this long
# more (the new holder adds the address and sends its first GARP a few ms after its key), so
# a connection attempt never finds the VIP on nobody. An unplanned loss never overlaps.
HANDOFF_LINGER = 0.25
# After adding a VIP, this long the node does not answer packets of connections it does not
# have with a reset: they are the old holder's, in flight when clients moved to us (planned
# hand-off), and their answers still reach the client from there. Short: a server-speaks-first
# client connecting meanwhile waits for the next SYN-ACK retransmission (1 s).
TAKEOVER_QUIET = 1.0
# A released VIP nobody takes within this long loses its address anyway (no other node takes
# VIPs: a one-node cluster, or every other node draining).
HANDOFF_TIMEOUT = 2.0
# Retry delays after etcd failed.
BACKOFF_FIRST = 0.2
BACKOFF_MAX = 2.0
# A node whose address change failed (interface missing, no permission) stops taking VIPs
# this long, so that the VIPs are not dealt to a node that cannot put them on the wire.
BROKEN_PAUSE = 30.0

# Deadline of one attempt to revoke a missing holder's lease. When the holder's host had the
# etcd leader, a call sent meanwhile to a member that still forwards to the dead leader hangs
# until its deadline (2 s for ordinary calls); a short one fails and is tried again at the
# next heartbeat, and reaches the new leader one election (0.5-1 s) after the loss. A
# healthy etcd answers in milliseconds.
REVOKE_TIMEOUT = 0.5
# A claimer fenced by heartbeats (not by its lease) this long deletes its VIP keys, so that the
# others can take them: when they hear it but it does not hear them, nobody revokes it. Longer
# than the others take to revoke a holder they miss (DETECT_AFTER, a report, an etcd call), and
# than a short stall: then the same VIPs come back to it instead of moving.
FENCED_RELEASE = 1.5
# Linux SO_TIMESTAMPNS (asm-generic/socket.h; Python's socket module does not name it): the
# kernel stamps each heartbeat datagram with its arrival time (CLOCK_REALTIME, a timespec).
SO_TIMESTAMPNS = 35
_TIMESPEC = struct.Struct("=qq")
# Longest pause between two checks of a fenced claimer for the end of its fence.
FENCED_POLL = 0.05

MovedCallback = Callable[[str, "str | None", "str | None"], object]  # (vip, old holder, new holder)


# ---------------------------------------------------------------------- configuration


# ---------------------------------------------------------------------- placement (pure)


def fair_share(n_vips: int, n_nodes: int) -> tuple[int, int]:
    """(floor, ceil) of VIPs per node when ``n_vips`` are spread over ``n_nodes``."""
    if n_nodes <= 0:
        return 0, n_vips
    return n_vips // n_nodes, -(-n_vips // n_nodes)


def preference(vip: str, nodes: Collection[str]) -> list[str]:
    """The nodes in rendezvous order for ``vip``, best first (the same on every node)."""
    return checkers_for(f"vip/{vip}", nodes, max(1, len(nodes)))


@dataclass(frozen=True, slots=True)
class Plan:
    campaign: tuple[str, ...] = ()  # free VIPs this node should try to create the key of
    release: tuple[str, ...] = ()  # VIPs this node holds and should hand off


def deal(free: Sequence[str], able: Mapping[str, Collection[str]], count: Mapping[str, int], ceil: int) -> dict[str, str]:
    """Who each free VIP goes to: the same answer on every node from the same view.

    The VIPs fewest candidates take go first (a VIP only one node takes is its before the
    others fill its share), then in address order; each to the taker with the fewest VIPs
    (held and dealt) below ``ceil``, ties in rendezvous order. When every taker of a VIP is at
    the ceiling already, a VIP dealt earlier moves along a chain of takers to one below it
    (the shortest chain, found breadth-first), so a VIP is not dealt over the ceiling and
    handed off again right after (two moves) while a placement within the shares exists;
    when none exists, the VIP goes over the ceiling to its least loaded taker."""
    load = dict(count)
    owner: dict[str, str] = {}
    ranks = {v: {node: i for i, node in enumerate(preference(v, able[v]))} for v in free}
    for vip in sorted(free, key=lambda v: (len(able[v]), v)):
        rank = ranks[vip]
        takers = sorted(able[vip], key=lambda c: (load[c], rank[c]))
        winner = next((c for c in takers if load[c] < ceil), None)
        if winner is None:
            winner = _make_room(takers, owner, able, load, ceil)
            if winner is None:
                winner = takers[0]
                load[winner] += 1
        else:
            load[winner] += 1
        owner[vip] = winner
    return owner


def _make_room(
    starts: list[str], owner: dict[str, str], able: Mapping[str, Collection[str]], load: dict[str, int], ceil: int,
) -> str | None:
    """A chain start -> (a VIP dealt to it) -> another of that VIP's takers -> ... ending at a
    node below ``ceil``: the VIPs along it move one step (``owner``, and ``load`` of the last
    node), and the start, which kept its load, is returned to take one more; None if no chain."""
    parent: dict[str, tuple[str, str] | None] = dict.fromkeys(starts)
    queue = list(starts)
    for node in queue:  # breadth-first: the list grows as it is walked
        for vip in sorted(v for v, o in owner.items() if o == node):
            for other in sorted(able[vip]):
                if other in parent:
                    continue
                parent[other] = (node, vip)
                if load[other] < ceil:
                    load[other] += 1
                    step: tuple[str, str] | None = (node, vip)
                    receiver = other
                    while step is not None:
                        giver, moved = step
                        owner[moved] = receiver
                        receiver = giver
                        step = parent[giver]
                    return receiver
                queue.append(other)
    return None


def plan(
    me: str,
    vips: Sequence[str],
    holders: Mapping[str, str],
    candidates: Collection[str],
    urgent: Collection[str] = (),
    takes: Mapping[str, Collection[str]] | None = None,
) -> Plan:
    """What node ``me`` should do, given who holds which VIP and which nodes run a claimer.

    ``vips``: every VIP the candidates take (the same list on every node: the union of their
    claimer keys). ``takes``: the VIPs each candidate takes (configures); a candidate it does
    not name takes every VIP of ``vips``. A VIP's *takers* are the candidates that take it.

    - Free VIPs are dealt out (``deal``: the most constrained first, each to the taker with
      the fewest VIPs below the ceiling share, ties in rendezvous order, moving earlier deals
      along to make room rather than going over the ceiling); ``me`` campaigns for those it
      is dealt, and for any free VIP it takes in ``urgent`` (free for too long: anyone may
      take it). A VIP that no candidate takes is left alone.
    - Hand-off only when no VIP is free, one VIP per round: a node above the ceiling gives
      back its extras that another taker below the ceiling can have; otherwise the
      candidate with the most VIPs gives one to a candidate below the floor that takes it,
      choosing the VIP rendezvous prefers most for that node. A node between floor and
      ceiling never moves anything: no flapping when counts are uneven by one, and a
      returning node takes only what brings it to the floor.

    Every node computes the same answer from the same view; etcd settles the races when
    views differ (the create compares ``create_revision == 0``).
    """
    cands = set(candidates) | {me}
    named = takes or {}

    def takers(vip: str) -> set[str]:
        return {c for c in cands if c not in named or vip in named[c]}

    able = {vip: takers(vip) for vip in vips}
    # a candidate that takes none of these VIPs has no share of them
    cands = {c for c in cands if any(c in t for t in able.values())} | {me}
    floor, ceil = fair_share(len(vips), len(cands))
    count = dict.fromkeys(cands, 0)
    for vip in vips:
        holder = holders.get(vip)
        if holder in count:
            count[holder] += 1
    free = [v for v in vips if v not in holders and able[v]]
    if free:
        dealt = deal(free, able, count, ceil)
        return Plan(campaign=tuple(v for v in free if dealt[v] == me or (v in urgent and me in able[v])))
    held: dict[str, list[str]] = {c: sorted(v for v in vips if holders.get(v) == c) for c in cands}
    mine = held[me]
    if count[me] > ceil:
        # keep what no other taker below the ceiling can have, then the ones rendezvous
        # prefers us for most; give back the rest
        def movable(vip: str) -> bool:
            return any(count[c] < ceil for c in able[vip] - {me})

        mine.sort(key=lambda v: (movable(v), preference(v, cands).index(me)))
        return Plan(release=tuple(v for v in mine[ceil:] if movable(v)))
    needy = sorted((c for c in cands if count[c] < floor), key=lambda c: (count[c], c))
    if not needy or count[me] <= floor:
        return Plan()
    # the donor: the candidate with the most VIPs (above the floor) that holds one a needy
    # candidate takes; the receiver: the neediest such candidate
    for donor in sorted((c for c in cands if count[c] > floor), key=lambda c: (count[c], c), reverse=True):
        for receiver in needy:
            gifts = [v for v in held[donor] if receiver in able[v]]
            if gifts:
                if donor != me:
                    return Plan()
                # the VIP whose rendezvous order ranks the receiver highest among its other takers
                return Plan(release=(min(gifts, key=lambda v: (preference(v, able[v] - {me}).index(receiver), v)),))
    return Plan()


# ---------------------------------------------------------------------- addresses on the wire


class Addresses(Protocol):
    """Adds and removes VIP addresses on this host (netlink in production, a dict in tests)."""

    def add(self, vip: VipSpec) -> None: ...
    def remove(self, vip: VipSpec) -> None: ...
    def announce(self, vip: VipSpec) -> None: ...


# ---------------------------------------------------------------------- the claimer


@dataclass(frozen=True, slots=True)
class Holder:
    node: str
    since: float  # wall clock when it took the VIP
    lease: int


class VipClaimer:
    """Campaigns for VIPs in etcd and keeps the addresses of the VIPs this node holds.

    Wiring (from the Trio thread): ``await nursery.start(claimer.run)`` after the agent's
    ``run``; VIPs are dealt only among nodes whose ``{prefix}/vip-claimers/<node>`` key (bound
    to their lease, written here) says they accept VIPs, each VIP among those whose key lists
    it (the VIPs their configuration takes). On a planned stop or drain:
    ``await claimer.release_all()`` (the keys first; each address stays until the next node
    holds the VIP, so no connection attempt is lost). ``held`` maps each VIP address this
    node holds to the wall-clock time it took it; ``holders`` is the cluster's view.
    """

    def __init__(
        self,
        settings: ClusterSettings,
        node_id: str,
        conn: EtcdConnection,
        agent: Any,  # ClusterAgent: lease_id, lease_ttl, lease_expires_at, live_nodes, nodes
        interface_override: str | None = None,
        *,
        vips: Sequence[VipSpec] | None = None,
        addresses: Addresses | None = None,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        configured = tuple(vips if vips is not None else getattr(settings, "vips", ()))
        if interface_override:
            configured = tuple(VipSpec(v.address, v.prefixlen, interface_override) for v in configured)
        self.vips = {v.address: v for v in configured}
        self.settings = settings
        self.node_id = node_id
        self.conn = conn
        self.agent = agent
        self.prefix = f"{settings.prefix}/vips/"
        self.claimer_prefix = f"{settings.prefix}/vip-claimers/"
        self._read_prefix = f"{settings.prefix}/vip"  # both of the above in one read and one watch
        self._addresses = addresses
        self._wall = wall_clock
        self.held: dict[str, float] = {}
        self.holders: dict[str, Holder] = {}
        self._raw: dict[str, bytes] = {}  # each VIP key's value as read
        self._values: dict[str, bytes] = {}  # what we wrote in each key we created
        self._free_since: dict[str, float] = {}
        self._on_moved: list[MovedCallback] = []
        self._wake = trio.Event()
        self._lock = trio.Lock()  # one address change at a time (fencing vs. a round)
        self.claimers: dict[str, bool] = {}  # node -> accepting VIPs, from the claimer keys
        # node -> the VIPs it takes, from the claimer keys (None: a key that does not say, written
        # by an older lbnode: it takes every VIP)
        self.claimer_vips: dict[str, frozenset[str] | None] = {}
        # (lease, accepting, VIPs) of our claimer key as we last wrote it
        self._announced: tuple[int, bool, tuple[str, ...]] | None = None
        self._broken_until = -math.inf
        self._held_lease: int | None = None  # the lease our held VIPs' keys are bound to
        self._draining = False
        self._fenced_logged = False
        self._confirming = False  # a renewal after a claim is under way (``_confirm_lease``)
        self._handing_off: set[str] = set()  # released VIPs whose address stays until a new holder
        self._taking_over: set[str] = set()  # VIPs added less than TAKEOVER_QUIET ago
        self._on_moving: list[Callable[[frozenset[str], frozenset[str]], object]] = []
        self._nursery: trio.Nursery | None = None
        # heartbeats (``[cluster] heartbeat``): off without an address (lease-only failover)
        self.heartbeat_address: Address | None = getattr(settings, "heartbeat", None)
        self.heartbeats: heartbeat.Heartbeats | None = None  # made by ``run`` once the socket is bound
        self.heartbeat_key_path = f"{settings.prefix}/secrets/heartbeat-key"
        self._heartbeat_key: bytes | None = None
        self._heartbeat_socket: trio.socket.SocketType | None = None
        self._heartbeat_std: socket.socket | None = None
        self._heartbeat_fenced_since: float | None = None  # fenced by heartbeats (lease fine) since
        self.peer_heartbeats: dict[str, tuple[str, int, int]] = {}  # node -> (ip, port, lease)
        self._revoked: set[int] = set()  # leases this node revoked (once each)
        self.revocations = 0
        self._revoke_conn: EtcdConnection | None = None  # short deadlines: see REVOKE_TIMEOUT
        self._confirmed_logged: list[str] = []
        self._waiting_logged: dict[int, str] = {}  # holder lease -> why it is not revoked yet (logged)
        # lbnode run --takeover (``hand_over`` in the old process, ``prepare``/``adopt`` in the new)
        self._guard: subprocess.Popen[bytes] | None = None  # the VIP guard this process started
        # the write ends of the replaced process's guards' stdin, and the VIPs those guards cover
        self._guard_pipes: list[int] = []
        self._pipes_guard: set[str] = set()
        self._adopted: dict[str, Any] | None = None
        self._adopted_heartbeat: socket.socket | None = None
        self._adopted_heartbeats: Mapping[str, object] | None = None
        self._handing_over = False
        # VIPs the replaced process held that this configuration dropped: released at once,
        # make-before-break (their address and interface come with the hand-over)
        self._dropped: dict[str, VipSpec] = {}
        # Set while a takeover is not finished: if this process fails, the one it replaces takes
        # the VIPs back, so ending ``run`` must leave keys and addresses as they are.
        self.keep_on_exit = False
        self._run_scope: trio.CancelScope | None = None
        self._run_done = trio.Event()

    def on_moved(self, callback: MovedCallback) -> None:
        """``callback(vip, old_holder, new_holder)`` when etcd shows a VIP changing hands (None: free)."""
        self._on_moved.append(callback)

    def on_moving(self, callback: Callable[[frozenset[str], frozenset[str]], object]) -> None:
        """``callback(handing_off, taking_over)`` whenever either set of moving VIPs changes.

        ``handing_off``: from just before each key is deleted until the address is gone; the
        node refuses new connections to those VIPs meanwhile. ``taking_over``: for
        ``TAKEOVER_QUIET`` after adding an address; the node does not reset the connections
        it does not have (the old holder's, still in flight). See
        ``lbnode.listen.set_vip_filter``.
        """
        self._on_moving.append(callback)

    def _moving_changed(self, moving: set[str], add: Collection[str] = (), remove: Collection[str] = ()) -> None:
        """Update ``moving`` (``_handing_off`` or ``_taking_over``); tell the callbacks if it changed."""
        before = set(moving)
        moving.update(add)
        moving.difference_update(remove)
        if moving != before:
            for callback in self._on_moving:
                callback(frozenset(self._handing_off), frozenset(self._taking_over))

    def _handing_off_changed(self, add: Collection[str] = (), remove: Collection[str] = ()) -> None:
        self._moving_changed(self._handing_off, add, remove)

    def key(self, vip: str) -> str:
        return self.prefix + vip

    def wake(self) -> None:
        self._wake.set()

    # ------------------------------------------------------------------ fencing
    def lease_fence_deadline(self) -> float:
        """Trio time after which the lease rule forbids holding any VIP (-inf: already)."""
        agent = self.agent
        if agent.lease_id is None or agent.lease_expires_at is None or not agent.lease_ttl:
            return -math.inf
        return float(agent.lease_expires_at - agent.lease_ttl * (1 - KEEPALIVE_FRACTION - FENCE_FRACTION))

    def heartbeat_fence_deadline(self) -> float:
        """Trio time after which the heartbeat rule forbids holding any VIP (inf: off)."""
        if self.heartbeats is None:
            return math.inf
        return self.heartbeats.fence_deadline(trio.current_time())

    def fence_deadline(self) -> float:
        """Trio time after which this node must not hold any VIP (-inf: already). Both rules apply."""
        return min(self.lease_fence_deadline(), self.heartbeat_fence_deadline())

    def fenced(self) -> bool:
        return trio.current_time() >= self.fence_deadline()

    def lease_fenced(self) -> bool:
        return trio.current_time() >= self.lease_fence_deadline()

    async def _fence_loop(self) -> None:
        while True:
            deadline = self.fence_deadline()
            if self.held and self._held_lease != self.agent.lease_id:
                # a new lease means the old one is gone, and our keys with it
                await self._drop_all("the lease they were bound to is gone")
                continue
            if trio.current_time() < deadline:
                self._heartbeat_fenced_since = None
                if self._fenced_logged:
                    log.info("node %s: fence lifted; taking part in the VIP election again", self.node_id)
                    self.wake()  # put back what etcd still says is ours, or campaign
                self._fenced_logged = False
                await trio.sleep_until(min(deadline, trio.current_time() + ROUND_INTERVAL))
                continue
            by_lease = self.lease_fenced()
            if self.held and not by_lease and self._take_pending_heartbeats():
                continue  # heartbeats waiting in the socket while we were late: they may confirm us
            if self.held:
                if by_lease:
                    log.warning("node %s: lease renewal failing for %.1fs (half its TTL): dropping VIPs %s at once",
                                self.node_id, self.agent.lease_ttl * FENCE_FRACTION, ", ".join(sorted(self.held)))
                else:
                    log.warning("node %s: fewer than a majority of the claimers confirmed hearing this node "
                                "within %gs (heartbeats): dropping VIPs %s at once", self.node_id,
                                heartbeat.FENCE_AFTER, ", ".join(sorted(self.held)))
                await self._drop_all("fenced")
            elif not self._fenced_logged:
                if by_lease:
                    log.info("node %s: no valid lease; not campaigning for VIPs until etcd answers", self.node_id)
                else:
                    log.info("node %s: not heard by a majority of the claimers (heartbeats); not campaigning "
                             "for VIPs until they confirm this node again", self.node_id)
            if not self._fenced_logged:
                self.wake()  # the round says so in our claimer key ("accepting": false)
            self._fenced_logged = True
            if not by_lease and self._values:
                now = trio.current_time()
                if self._heartbeat_fenced_since is None:
                    self._heartbeat_fenced_since = now
                elif now - self._heartbeat_fenced_since >= FENCED_RELEASE:
                    log.warning("node %s: still not confirmed by a majority after %gs: releasing VIPs %s in etcd "
                                "so that the others take them", self.node_id, FENCED_RELEASE,
                                ", ".join(sorted(self._values)))
                    for vip, value in list(self._values.items()):
                        try:
                            await self._delete_if_ours(vip, value)
                        except StoreError as exc:
                            log.warning("node %s: could not release VIP %s (%s)", self.node_id, vip, exc)
            await trio.sleep(FENCED_POLL)  # fenced: look again soon for a renewed lease or confirmations

    # ------------------------------------------------------------------ run
    async def prepare(self, guard_pipes: Sequence[int] = (), guard_vips: Sequence[str] = ()) -> None:
        """Netlink, the VIP guard and the ARP setting: what ``run`` needs first (about half a
        second of imports). A takeover calls it before the old process stops claiming, so that
        the hand-off window holds none of it. ``guard_pipes``: the old process's guards (the
        write ends of their stdin), which cover ``guard_vips``: this process keeps them open
        for as long as it lives (each guard removes its addresses once no process holds its
        pipe), and starts a guard of its own only if some VIP of ours is not covered."""
        if self._addresses is not None:
            return
        self._addresses = await trio.to_thread.run_sync(NetlinkAddresses)
        # real addresses: a guard process takes them off the wire if this process dies
        self._guard_pipes += guard_pipes
        self._pipes_guard |= set(guard_vips)
        if self._guard is None and not {v.arg for v in self.vips.values()} <= self._pipes_guard:
            self._guard = await trio.to_thread.run_sync(vipguard.start, tuple(self.vips.values()))
        for interface in sorted({v.interface for v in self.vips.values()}):
            setting = f"net.ipv4.conf.{interface}.arp_announce=2"
            try:
                if announce_from_primary(interface):
                    log.info("node %s: set %s (ARP requests from the primary address, never a VIP)",
                             self.node_id, setting)
            except (OSError, ValueError) as exc:
                log.warning("node %s: cannot set %s (%s); set it (sysctl) so that this host's ARP requests "
                            "never name a VIP, or a planned hand-off may send clients back here",
                            self.node_id, setting, exc)

    def adopt(self, state: Mapping[str, Any] | None, heartbeat_socket: socket.socket | None) -> None:
        """Before ``run``: go on as holder of what the replaced process held (``hand_over``),
        under the lease the agent adopted. Only VIPs whose key is bound to that lease carry
        over; the fencing deadlines go on from the same state (same Trio clock), so a hand-off
        window longer than what the old process had left fences here at once."""
        if heartbeat_socket is not None:
            self._adopted_heartbeat = heartbeat_socket
        if not state or state.get("lease") is None or state.get("lease") != self.agent.lease_id:
            return
        self._adopted = dict(state)

    def _take_adopted(self) -> None:
        state = self._adopted
        if state is None:
            return
        self._adopted = None
        specs = dict(state.get("specs") or {})
        for vip, arg in specs.items():
            if vip not in self.vips and vip in dict(state.get("held", {})):
                self._dropped[vip] = VipSpec.from_arg(str(arg))  # held, but not ours to keep: released in _run
        for vip, value in dict(state.get("values", {})).items():
            if vip in self.vips or vip in self._dropped:
                self._values[vip] = str(value).encode()
        for vip, since in dict(state.get("held", {})).items():
            if (vip in self.vips or vip in self._dropped) and vip in self._values:
                self.held[vip] = float(since)
        if self.held:
            self._held_lease = self.agent.lease_id
            for vip, since in self.held.items():  # no "moved" event: etcd's view has not changed
                self.holders[vip] = Holder(self.node_id, since, self._held_lease)
        self.claimers = {str(k): bool(v) for k, v in dict(state.get("claimers", {})).items()}
        self.peer_heartbeats = {str(k): (str(v[0]), int(v[1]), int(v[2]))
                                for k, v in dict(state.get("peers", {})).items()}
        announced = state.get("announced")
        if isinstance(announced, list) and len(announced) == 3:
            self._announced = (int(announced[0]), bool(announced[1]), tuple(map(str, announced[2])))
        # else (none, or an older process's [lease, accepting], which does not say which VIPs):
        # written again at the first round
        key = state.get("heartbeat_key")
        if isinstance(key, str):
            self._heartbeat_key = bytes.fromhex(key)  # no round trip to agree on it again
        saved = state.get("heartbeats")
        if isinstance(saved, dict):
            self._adopted_heartbeats = saved
        if self.held:
            log.info("node %s: holding VIPs %s as the process it replaces did (no move)", self.node_id,
                     ", ".join(sorted(self.held)))

    async def hand_over(self) -> dict[str, Any]:
        """``lbnode run --takeover``: stop claiming (no rounds, fencing, heartbeats or etcd writes
        from this process once this returns) but leave the keys and the addresses as they are,
        and return what the new process needs to go on as their holder (``adopt``)."""
        self._handing_over = True
        if self._run_scope is not None:
            self._run_scope.cancel()
        await self._run_done.wait()
        state: dict[str, Any] = {
            "lease": self._held_lease if self.held else self.agent.lease_id,
            "held": dict(self.held),
            "specs": {vip: self._spec(vip).arg for vip in self.held},  # a new node.toml may drop one
            "values": {vip: value.decode() for vip, value in self._values.items()},
            "claimers": dict(self.claimers),
            "peers": {node: list(peer) for node, peer in self.peer_heartbeats.items()},
            "announced": ([*self._announced[:2], list(self._announced[2])]
                          if self._announced is not None else None),
            "heartbeat_key": self._heartbeat_key.hex() if self._heartbeat_key is not None else None,
            "heartbeats": heartbeat.export_state(self.heartbeats) if self.heartbeats is not None else None,
        }
        log.info("node %s: VIPs %s handed to the new process (addresses and keys stay)", self.node_id,
                 ", ".join(sorted(self.held)) or "(none)")
        self.held = {}
        self._values = {}
        return state

    def guard_pipes(self) -> list[int]:
        """The descriptors whose closing makes a VIP guard act (for a takeover to share)."""
        own = [self._guard.stdin.fileno()] if self._guard is not None and self._guard.stdin is not None else []
        return own + self._guard_pipes

    def heartbeat_fd(self) -> int | None:
        return self._heartbeat_std.fileno() if self._heartbeat_std is not None else None

    def guarded(self) -> list[str]:
        """The VIPs our guards cover (``VipSpec.arg``)."""
        own = {v.arg for v in self.vips.values()} if self._guard is not None else set()
        return sorted(own | self._pipes_guard)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self._run_done = trio.Event()
        self._handing_over = False
        try:
            with trio.CancelScope() as self._run_scope:
                await self._run(task_status)
        finally:
            self._run_done.set()

    async def _run(self, task_status: trio.TaskStatus[None]) -> None:
        await self.prepare()
        self._take_adopted()
        # a VIP left on our interface by a crashed run is not ours until etcd says so
        for vip in self.vips.values():
            if vip.address not in self.held:
                await self._netlink(self._addresses.remove, vip)  # type: ignore[union-attr]
        if self.heartbeat_address is not None:
            if self._adopted_heartbeat is not None:
                self._heartbeat_socket = self._use_heartbeat(self._adopted_heartbeat)
                self._adopted_heartbeat = None
            else:
                self._heartbeat_socket = await self._bind_heartbeat(self.heartbeat_address)
            self._revoke_conn = self.conn.with_timeout(REVOKE_TIMEOUT)
            self.heartbeats = heartbeat.Heartbeats(self.node_id, self.agent.lease_id or 0, trio.current_time())
            if self._adopted_heartbeats is not None:
                heartbeat.restore_state(self.heartbeats, self._adopted_heartbeats)
                self._adopted_heartbeats = None
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._fence_loop)
                if self._heartbeat_socket is not None:
                    nursery.start_soon(self._heartbeat_loop, self._heartbeat_socket)
                nursery.start_soon(self._watch_loop)
                nursery.start_soon(self._round_loop)
                self._nursery = nursery
                if any(vip in self.held for vip in self._dropped):
                    nursery.start_soon(self._release_dropped)
                if hasattr(self.agent, "on_assignment_change"):
                    self.agent.on_assignment_change(self.wake)
                task_status.started()
        finally:
            handed = self._handing_over or self.keep_on_exit
            if not handed:
                with trio.CancelScope(shield=True), trio.move_on_after(self.conn.timeout * 2):
                    await self.release_all()
            close = getattr(self._addresses, "close", None)
            if close is not None:
                close()
            self._addresses = None
            if handed:  # the new process reads it now; ours is kept in case the takeover is abandoned
                self._adopted_heartbeat, self._heartbeat_socket, self._heartbeat_std = self._heartbeat_std, None, None
            elif self._heartbeat_socket is not None:
                self._heartbeat_socket.close()
                self._heartbeat_socket = self._heartbeat_std = None
            if self._revoke_conn is not None:
                self._revoke_conn.close()
            if not handed:
                # after a hand-over the guard stays: the new process holds its pipe too, and the
                # addresses are its now (a guard told to stop would take them off)
                if self._guard is not None:
                    with trio.CancelScope(shield=True):
                        await trio.to_thread.run_sync(vipguard.stop, self._guard)
                    self._guard = None
                for fd in self._guard_pipes:
                    os.close(fd)
                self._guard_pipes, self._pipes_guard = [], set()

    async def _release_dropped(self) -> None:
        """Hand the held VIPs this configuration dropped (takeover) to the other nodes,
        make-before-break. Our claimer key says first which VIPs we take now: every other node
        reads it in the same etcd view that shows the VIP free (it was written before the key
        was deleted), so they deal it among themselves at once, all to the same node, instead
        of waiting ``FREE_GRACE`` for us (docs/vips.md, "Which VIPs a node takes")."""
        lease = self.agent.lease_id
        if lease is not None:
            try:
                await self._announce(lease)
            except StoreError as exc:
                log.warning("node %s: could not say which VIPs it takes now (%s); the others take the dropped "
                            "ones after %gs", self.node_id, exc, FREE_GRACE)
        for vip in sorted(self._dropped):
            if vip in self.held:
                log.info("node %s: VIP %s is not in this configuration: handing it to another node "
                         "(make-before-break)", self.node_id, vip)
                await self._release(vip)

    @property
    def accepting(self) -> bool:
        """Does this node take VIPs? Not while draining, nor for a while after an address failed,
        nor while a majority of the claimers does not confirm hearing it (the others then deal
        the VIPs among themselves at once instead of waiting FREE_GRACE for it)."""
        now = trio.current_time()
        return not self._draining and now >= self._broken_until and now < self.heartbeat_fence_deadline()

    async def release_all(self) -> None:
        """Planned stop or drain: say so, delete our keys, hand every address over; campaign no more.

        The other claimers see this node stop accepting first, so they deal its VIPs among
        themselves at once instead of waiting ``FREE_GRACE`` for it. Each address stays (and
        this node keeps serving it) until the new holder's key shows up, plus
        ``HANDOFF_LINGER``; at most ``HANDOFF_TIMEOUT``. Whatever happens, including
        cancellation, no address is left on the interface when this returns.
        """
        self._draining = True
        try:
            lease = self.agent.lease_id
            if lease is not None:
                try:
                    await self._announce(lease)
                except StoreError as exc:
                    log.warning("node %s: could not announce its drain (%s)", self.node_id, exc)
            self._handing_off_changed(add=[vip for vip in self._values if vip in self.held])
            released = []
            for vip, value in list(self._values.items()):
                try:
                    await self._delete_if_ours(vip, value)
                    released.append(vip)
                except StoreError as exc:
                    log.warning("node %s: could not release VIP %s in etcd (%s); it goes when the lease expires",
                                self.node_id, vip, exc)
            async with trio.open_nursery() as handoffs:
                for vip in released:
                    if vip in self.held:
                        handoffs.start_soon(self._hand_off, vip)
        finally:
            with trio.CancelScope(shield=True):
                await self._drop_all("released (stop or drain)")
            self._handing_off_changed(remove=set(self._handing_off))

    async def _hand_off(self, vip: str) -> None:
        """Keep ``vip``'s address (its key is already deleted) until another node holds it."""
        self._handing_off_changed(add=[vip])
        try:
            with trio.move_on_after(HANDOFF_TIMEOUT) as waiting:
                while vip in self.held:
                    h = self.holders.get(vip)
                    if h is not None and h.node != self.node_id:
                        break
                    if self._draining:  # the rounds do not read while we drain: read here
                        await trio.sleep(0.03)
                        await self._read_holders()
                    else:  # the rounds read on every watch event
                        await trio.sleep(0.02)
            if waiting.cancelled_caught:
                log.warning("node %s: nobody took VIP %s within %gs; dropping it anyway",
                            self.node_id, vip, HANDOFF_TIMEOUT)
            else:
                await trio.sleep(HANDOFF_LINGER)
            await self._drop(vip, f"handed off to {self.holders[vip].node}" if vip in self.holders else "released")
        finally:
            self._handing_off_changed(remove=[vip])

    async def _read_holders(self) -> None:
        try:
            kvs, _ = await trio.to_thread.run_sync(self.conn.get_prefix, self.prefix, abandon_on_cancel=True)
        except StoreError:
            return
        self._set_holders(kvs)

    async def _watch_loop(self) -> None:
        """The watch only wakes the rounds up; each round reads every key afresh."""
        delay = BACKOFF_FIRST
        while True:
            try:
                _, revision = await trio.to_thread.run_sync(self.conn.get_prefix, self._read_prefix,
                                                            abandon_on_cancel=True)
                delay = BACKOFF_FIRST

                def changed(batch: list[KeyEvent]) -> None:
                    self.wake()

                await follow_watch(partial(self.conn.watch_prefix, self._read_prefix, revision + 1), changed)
            except StoreError:
                pass  # the rounds log etcd failures; the watch just tries again
            await trio.sleep(delay)
            delay = min(delay * 2, BACKOFF_MAX)

    async def _round_loop(self) -> None:
        delay, failing = BACKOFF_FIRST, False
        while True:
            with trio.move_on_after(ROUND_INTERVAL):
                await self._wake.wait()
            self._wake = trio.Event()
            if self._draining or self.lease_fenced():
                continue  # (fenced by heartbeats only: the round still reads and announces)
            try:
                await self._round()
            except StoreError as exc:
                if not failing:
                    log.warning("node %s: VIP election: %s; retrying", self.node_id, exc)
                    failing = True
                await trio.sleep(delay)
                delay = min(delay * 2, BACKOFF_MAX)
                continue
            if failing:
                log.info("node %s: VIP election: etcd answers again", self.node_id)
            delay, failing = BACKOFF_FIRST, False

    async def _round(self) -> None:
        lease = self.agent.lease_id
        kvs, _ = await trio.to_thread.run_sync(self.conn.get_prefix, self._read_prefix, abandon_on_cancel=True)
        self._set_holders([kv for kv in kvs if kv.key.startswith(self.prefix)])
        self._set_claimers([kv for kv in kvs if kv.key.startswith(self.claimer_prefix)])
        if self._draining or self.lease_fenced() or lease is None or lease != self.agent.lease_id:
            return
        # announced even while fenced by heartbeats: the peers must know our lease to hear us again
        await self._announce(lease)
        if self.fenced():
            return
        now = trio.current_time()
        # what the addresses must match: our keys under our current lease (a VIP being handed
        # off keeps its address until its new holder has it)
        for vip in list(self.held):
            if vip in self._handing_off:
                continue
            h = self.holders.get(vip)
            if h is None or h.node != self.node_id or h.lease != lease:
                await self._drop(vip, "its key is gone or held by another node")
        for vip, h in self.holders.items():
            if vip not in self.vips:
                continue  # a VIP this configuration dropped (takeover): being released, never taken back
            if h.node == self.node_id and h.lease == lease and vip not in self._values and vip in self._raw:
                # bound to our lease, so ours: a campaign whose answer was lost (cancelled), or
                # one the process we took over from made as it handed over
                log.info("node %s: VIP %s's key is bound to our lease: ours", self.node_id, vip)
                self._values[vip] = self._raw[vip]
        for vip, h in self.holders.items():
            if vip not in self.vips:
                continue
            if h.node == self.node_id and h.lease == lease and vip not in self.held and vip in self._values:
                await self._add(vip, h.since)  # still ours after a short fence: etcd never lost it
        for vip in self.vips:
            if vip in self.holders:
                self._free_since.pop(vip, None)
            else:
                self._free_since.setdefault(vip, now)
        if not self.accepting:
            return
        urgent = {v for v, t in self._free_since.items() if now - t >= FREE_GRACE}
        candidates = self._candidates()
        takes = self._takes(candidates)
        every = set().union(*takes.values())  # the same list on every node: from the claimer keys
        decision = plan(
            self.node_id,
            sorted(every),
            {v: h.node for v, h in self.holders.items() if v in every},
            candidates,
            urgent,
            takes,
        )
        for vip in decision.release:
            if vip in self.vips and vip not in self._handing_off:  # a dropped VIP is on its way already
                await self._release(vip)
        for vip in decision.campaign:
            if vip in self.vips and vip not in self._handing_off:
                await self._campaign(vip, lease)

    def _candidates(self) -> set[str]:
        """Nodes whose claimer key says they take VIPs (the key goes with their lease)."""
        return {node for node, accepting in self.claimers.items() if accepting} | {self.node_id}

    def _takes(self, candidates: Collection[str]) -> dict[str, frozenset[str]]:
        """The VIPs each candidate takes, by its claimer key; ours are our configuration's. A
        key that does not say (an older lbnode) is read as taking the VIPs we take."""
        ours = frozenset(self.vips)
        takes = {self.node_id: ours}
        for node in set(candidates) - {self.node_id}:
            listed = self.claimer_vips.get(node)
            takes[node] = ours if listed is None else listed
        return takes

    def _set_claimers(self, kvs: list[KeyValue]) -> None:
        claimers = {}
        vips: dict[str, frozenset[str] | None] = {}
        peers: dict[str, tuple[str, int, int]] = {}
        for kv in kvs:
            node = kv.key[len(self.claimer_prefix):]
            if not NAME_RE.fullmatch(node) or not kv.lease:
                continue
            try:
                data = json.loads(kv.value)
                claimers[node] = bool(data.get("accepting", False))
            except (ValueError, AttributeError):
                continue
            listed = data.get("vips")
            vips[node] = (frozenset(listed) if isinstance(listed, list) and all(isinstance(v, str) for v in listed)
                          else None)
            raw = data.get("heartbeat")
            if isinstance(raw, str) and node != self.node_id:
                try:
                    address = parse_address(raw, f"{kv.key}: heartbeat")
                except ConfigError:
                    continue  # a claimer that cannot be heard is no heartbeat peer (not counted)
                peers[node] = (address.host, address.port, kv.lease)
        self.claimers = claimers
        self.claimer_vips = vips
        self.peer_heartbeats = peers
        if self.heartbeats is not None:
            self.heartbeats.set_peers({node: lease for node, (_, _, lease) in peers.items()}, trio.current_time())

    async def _announce(self, lease: int) -> None:
        """Our claimer key, bound to our lease: {"accepting": bool, "vips": [the VIPs we take]};
        written when it changed."""
        accepting = self.accepting
        vips = tuple(sorted(self.vips))
        if (self._announced == (lease, accepting, vips) and self.claimers.get(self.node_id) == accepting
                and self.claimer_vips.get(self.node_id) == frozenset(vips)):
            return
        data: dict[str, object] = {"accepting": accepting, "vips": list(vips)}
        if self.heartbeat_address is not None:
            data["heartbeat"] = str(self.heartbeat_address)
        value = json.dumps(data).encode()
        await trio.to_thread.run_sync(self.conn.put, self.claimer_prefix + self.node_id, value, lease,
                                      abandon_on_cancel=True)
        self._announced = (lease, accepting, vips)
        self.claimers[self.node_id] = accepting
        self.claimer_vips[self.node_id] = frozenset(vips)

    def _set_holders(self, kvs: list[KeyValue]) -> None:
        holders: dict[str, Holder] = {}
        raw: dict[str, bytes] = {}
        for kv in kvs:
            vip = kv.key[len(self.prefix):]
            try:
                data = json.loads(kv.value)
                holder = Holder(str(data["node"]), float(data.get("since", 0.0)), kv.lease)
            except (ValueError, TypeError, KeyError):
                log.warning('%s: not a VIP holder {"node": ..., "since": ...}; skipped (etcdctl del %s)', kv.key, kv.key)
                continue
            if not NAME_RE.fullmatch(holder.node):
                continue
            holders[vip] = holder
            raw[vip] = kv.value
        self._raw = raw
        old = self.holders
        self.holders = holders
        for vip in sorted(set(old) | set(holders)):
            self._moved(vip, old[vip].node if vip in old else None, holders[vip].node if vip in holders else None)

    def _set_holder(self, vip: str, holder: Holder) -> None:
        """Our own successful campaign, before the next read shows it."""
        old = self.holders.get(vip)
        self.holders[vip] = holder
        self._moved(vip, old.node if old else None, holder.node)

    def _moved(self, vip: str, before: str | None, after: str | None) -> None:
        if before != after:
            log.info("VIP %s: %s -> %s", vip, before or "(free)", after or "(free)")
            for callback in self._on_moved:
                callback(vip, before, after)

    # ------------------------------------------------------------------ heartbeats
    async def _bind_heartbeat(self, address: Address) -> trio.socket.SocketType:
        family = socket.AF_INET6 if ":" in address.host else socket.AF_INET
        std = socket.socket(family, socket.SOCK_DGRAM)
        try:
            std.bind((address.host, address.port))
        except OSError as exc:
            std.close()
            raise ConfigError("cluster.heartbeat", f'cannot bind "{address}" ({exc.strerror}): use an address of '
                              "this host and a free UDP port") from None
        std.setblocking(False)
        try:
            std.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        except OSError:
            pass  # arrival taken when read instead: a late process drops more heartbeats as old
        self._heartbeat_std = std  # the same socket, for ``_take_pending_heartbeats``
        log.info("node %s: claimer heartbeats on udp %s", self.node_id, address)
        return trio.socket.from_stdlib_socket(std)

    def _use_heartbeat(self, std: socket.socket) -> trio.socket.SocketType:
        """The replaced process's heartbeat socket (same port, same kernel timestamps setting)."""
        std.setblocking(False)
        self._heartbeat_std = std
        log.info("node %s: claimer heartbeats on udp %s (socket taken over)", self.node_id, self.heartbeat_address)
        return trio.socket.from_stdlib_socket(std)

    def _take_pending_heartbeats(self) -> bool:
        """Take the heartbeats already waiting in the socket, at once; True if that lifted the
        fence. A holder whose own process was late (a busy core) would otherwise fence on
        echoes it has received but not read yet."""
        state, key, std = self.heartbeats, self._heartbeat_key, self._heartbeat_std
        if state is None or key is None or std is None:
            return False
        taken = 0
        while taken < 1000:
            try:
                datagram, ancillary, _, _ = std.recvmsg(heartbeat.MAX_DATAGRAM, socket.CMSG_SPACE(16))
            except OSError:  # BlockingIOError: nothing more waiting
                break
            taken += 1
            beat = heartbeat.unseal(key, datagram)
            if beat is not None:
                state.received(beat, _arrival(ancillary))
        return taken > 0 and not self.fenced()

    async def _heartbeat_loop(self, sock: trio.socket.SocketType) -> None:
        """Agree on the cluster key, then send every HEARTBEAT_INTERVAL and take what arrives."""
        delay, failing = BACKOFF_FIRST, False
        while self._heartbeat_key is None:
            try:
                self._heartbeat_key, _ = await trio.to_thread.run_sync(
                    self.conn.agree_on_secret, self.heartbeat_key_path, os.urandom(heartbeat.KEY_SIZE),
                    "the nodes agree on a new one as they restart", abandon_on_cancel=True)
            except StoreError as exc:
                if not failing:
                    log.warning("node %s: heartbeat key: %s; retrying (fenced meanwhile when 3+ claimers)",
                                self.node_id, exc)
                    failing = True
            except ValueError as exc:
                log.error("node %s: heartbeat key: %s", self.node_id, exc)
                delay = BACKOFF_MAX
            if self._heartbeat_key is None:
                await trio.sleep(delay)
                delay = min(delay * 2, BACKOFF_MAX)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._receive_heartbeats, sock, self._heartbeat_key)
            await self._send_heartbeats(sock, self._heartbeat_key)

    async def _send_heartbeats(self, sock: trio.socket.SocketType, key: bytes) -> None:
        state = self.heartbeats
        assert state is not None
        tick = trio.current_time()
        while True:
            now = trio.current_time()
            if self.agent.lease_id is not None:
                state.set_lease(self.agent.lease_id, now)
                datagram = heartbeat.seal(key, state.message(now))
                for node, (host, port, _) in list(self.peer_heartbeats.items()):
                    try:
                        await sock.sendto(datagram, (host, port))
                    except OSError as exc:  # no route (our link is down): the peers will miss us
                        log.debug("node %s: heartbeat to %s: %s", self.node_id, node, exc)
            confirmed = sorted(state.confirmed(now))
            if confirmed != self._confirmed_logged:
                log.info("node %s: heartbeats confirmed by %s (%d claimers)", self.node_id,
                         ", ".join(confirmed) or "nobody", state.claimers)
                self._confirmed_logged = confirmed
            self._revoke_missing(now)
            # a fixed rhythm; after a stall, start again from now rather than send a burst
            tick = max(tick + heartbeat.HEARTBEAT_INTERVAL, now)
            await trio.sleep_until(tick)

    async def _receive_heartbeats(self, sock: trio.socket.SocketType, key: bytes) -> None:
        state = self.heartbeats
        assert state is not None
        while True:
            try:
                datagram, ancillary, _, _ = await sock.recvmsg(heartbeat.MAX_DATAGRAM, socket.CMSG_SPACE(16))
            except OSError:
                await trio.sleep(heartbeat.HEARTBEAT_INTERVAL)  # e.g. ICMP port unreachable from a peer
                continue
            beat = heartbeat.unseal(key, datagram)
            if beat is not None:
                state.received(beat, _arrival(ancillary))

    def _revoke_missing(self, now: float) -> None:
        """Revoke the lease of every VIP holder a majority of the claimers misses (once per lease)."""
        state = self.heartbeats
        if state is None or self._nursery is None or self.lease_fenced() or self.node_id not in self.claimers:
            # without a valid lease of our own (our claimer key goes with it), our view of the
            # claimers may be stale
            return
        live = {h.lease for h in self.holders.values()}
        self._revoked &= live
        self._waiting_logged = {lease: why for lease, why in self._waiting_logged.items() if lease in live}
        for h in self.holders.values():
            peer = self.peer_heartbeats.get(h.node)
            if h.node == self.node_id or peer is None or peer[2] != h.lease or h.lease in self._revoked:
                continue
            why_not = state.why_not_missing(h.node, now)
            if why_not is not None:
                if h.node in state.peers and state.silence(h.node, now) >= heartbeat.DETECT_AFTER:
                    if self._waiting_logged.get(h.lease) != why_not:
                        log.info("node %s: VIP holder %s not heard for %.2fs, not revoked yet: %s",
                                 self.node_id, h.node, state.silence(h.node, now), why_not)
                        self._waiting_logged[h.lease] = why_not
                continue
            self._revoked.add(h.lease)
            log.warning("node %s: VIP holder %s not heard for %.2fs, nor by a majority of the claimers: "
                        "revoking its lease %x (its VIPs free at once)", self.node_id, h.node,
                        state.silence(h.node, now), h.lease)
            self._nursery.start_soon(self._revoke, h.node, h.lease)

    async def _revoke(self, node: str, lease: int) -> None:
        conn = self._revoke_conn or self.conn
        try:
            await trio.to_thread.run_sync(conn.revoke, lease, abandon_on_cancel=True)
        except StoreError as exc:
            log.info("node %s: could not revoke the lease of %s yet (%s); trying again", self.node_id, node, exc)
            self._revoked.discard(lease)  # the next heartbeat tick tries again, if it is still missing
            return
        log.info("node %s: revoked lease %x of %s", self.node_id, lease, node)
        self.revocations += 1
        self.wake()

    # ------------------------------------------------------------------ etcd
    async def _campaign(self, vip: str, lease: int | None) -> None:
        if lease is None:
            return
        key = self.key(vip)
        since = self._wall()
        value = json.dumps({"node": self.node_id, "since": round(since, 3)}, sort_keys=True).encode()

        def txn(c: Any) -> tuple[bool, list[Any]]:
            return c.transaction(  # type: ignore[no-any-return]
                compare=[c.transactions.create(key) == 0],
                success=[c.transactions.put(key, value, lease=lease)],
                failure=[c.transactions.get(key)],
            )

        (ok, responses), maybe_applied = await trio.to_thread.run_sync(
            self.conn.call_retried, f"campaign for VIP {vip}", txn, abandon_on_cancel=True
        )
        if not ok and not (maybe_applied and responses and responses[-1] and bytes(responses[-1][0][0]) == value):
            return  # another node was faster
        self._values[vip] = value
        self._set_holder(vip, Holder(self.node_id, since, lease))
        if self._nursery is not None and not self._confirming:
            self._confirming = True
            self._nursery.start_soon(self._confirm_lease, vip, lease)
        if self._draining or self.fenced() or lease != self.agent.lease_id:
            return  # the next round (or the lease) settles it; no address while fenced
        if not await self._add(vip, since):
            # a key without the address on the wire would be a black hole: give it back, and
            # stop taking VIPs for a while (our claimer key says so at the next round)
            self._broken_until = trio.current_time() + BROKEN_PAUSE
            await self._delete_if_ours(vip, value)

    async def _confirm_lease(self, vip: str, lease: int) -> None:
        """Renew our lease at once after winning ``vip``, through the connection that just
        answered the claim, and let only that answer move the fencing deadline.

        After a host loss that took etcd's leader with it, the claim (sent as soon as the dead
        holder was revoked) can succeed while our keepalives are still failing: they were sent
        to a member still forwarding to the dead leader and wait out their deadline. The lease
        rule would then fence the VIP we just took and take it back once a keepalive answers:
        no holder for a moment after a good failover. The claim itself proves nothing about
        our lease's remaining time (a put under a lease does not extend it, and etcd accepts
        one under a lease that has expired but is not revoked yet); a renewal's answer does,
        as any keepalive's (docs/vips.md, "Fencing")."""
        try:
            agent = self.agent
            # for the log only: the keepalive was due (TTL/3 after the last answer) and has not
            # been answered for longer than a healthy etcd takes (milliseconds)
            overdue = (agent.lease_expires_at is not None and agent.lease_ttl
                       and trio.current_time() >= agent.lease_expires_at - agent.lease_ttl * (1 - KEEPALIVE_FRACTION)
                       + LATE_RENEWAL)
            before = self.lease_fence_deadline()
            renewed = await agent.renew(lease)
            if overdue:
                if renewed:
                    log.info("node %s: lease %x renewed after claiming VIP %s while its keepalives were late; "
                             "fencing deadline %+.2fs", self.node_id, lease, vip,
                             self.lease_fence_deadline() - before)
                else:
                    log.info("node %s: lease %x not renewed after claiming VIP %s either; fencing as due",
                             self.node_id, lease, vip)
        finally:
            self._confirming = False

    async def _release(self, vip: str) -> None:
        """Hand ``vip`` to another node to balance the VIPs: make-before-break, as on a drain."""
        value = self._values.get(vip)
        if value is not None:
            self._handing_off_changed(add=[vip])  # new connections refused before anyone can take it
            try:
                await self._delete_if_ours(vip, value)
            except BaseException:
                self._handing_off_changed(remove=[vip])
                raise
        if self._nursery is not None and vip in self.held:
            self._nursery.start_soon(self._hand_off, vip)
        else:
            await self._drop(vip, "handed off to balance the VIPs")

    async def _delete_if_ours(self, vip: str, value: bytes) -> None:
        key = self.key(vip)

        def txn(c: Any) -> tuple[bool, list[Any]]:
            return c.transaction(  # type: ignore[no-any-return]
                compare=[c.transactions.value(key) == value], success=[c.transactions.delete(key)], failure=[]
            )

        await trio.to_thread.run_sync(self.conn.call, f"release VIP {vip}", txn, abandon_on_cancel=True)
        self._values.pop(vip, None)

    # ------------------------------------------------------------------ addresses
    async def _netlink(self, fn: Callable[[VipSpec], None], vip: VipSpec) -> bool:
        try:
            await trio.to_thread.run_sync(fn, vip)
            return True
        except OSError as exc:
            log.error("node %s: VIP %s on %s: %s", self.node_id, vip, vip.interface, exc)
            return False

    async def _add(self, vip: str, since: float) -> bool:
        """Put the VIP on the wire; False when the address could not be added."""
        assert self._addresses is not None
        spec = self.vips[vip]
        async with self._lock:
            if self._draining or self.fenced() or vip in self.held:
                return True
            self._moving_changed(self._taking_over, add=[vip])
            if not await self._netlink(self._addresses.add, spec):
                self._moving_changed(self._taking_over, remove=[vip])
                return False
            self.held[vip] = since
            self._held_lease = self.agent.lease_id
            log.info("node %s now holds VIP %s on %s", self.node_id, spec, spec.interface)
        await self._netlink(self._addresses.announce, spec)
        if self._nursery is not None:
            self._nursery.start_soon(self._announce_again, vip, spec, trio.current_time())
        else:
            self._moving_changed(self._taking_over, remove=[vip])
        return True

    async def _announce_again(self, vip: str, spec: VipSpec, added: float) -> None:
        """The later gratuitous ARPs of ``GARP_DELAYS``, while we still hold ``vip``; the end of
        its ``TAKEOVER_QUIET``."""
        assert self._addresses is not None
        try:
            for delay in sorted({*GARP_DELAYS[1:], TAKEOVER_QUIET}):
                await trio.sleep_until(added + delay)
                if delay >= TAKEOVER_QUIET:
                    self._moving_changed(self._taking_over, remove=[vip])
                if vip not in self.held or vip in self._handing_off:
                    return  # a late GARP from the old holder would take clients back from the new one
                if delay in GARP_DELAYS:
                    await self._netlink(self._addresses.announce, spec)
        finally:
            self._moving_changed(self._taking_over, remove=[vip])

    async def _drop(self, vip: str, why: str) -> None:
        assert self._addresses is not None
        async with self._lock:
            if vip not in self.held:
                return
            await self._netlink(self._addresses.remove, self._spec(vip))
            del self.held[vip]
            log.info("node %s dropped VIP %s: %s", self.node_id, vip, why)

    def _spec(self, vip: str) -> VipSpec:
        """A VIP's address and interface: configured, or dropped by a takeover's node.toml."""
        return self.vips.get(vip) or self._dropped[vip]

    async def _drop_all(self, why: str) -> None:
        if self._addresses is None:
            return
        for vip in list(self.held):
            await self._drop(vip, why)


def _arrival(ancillary: list[tuple[int, int, bytes]]) -> float:
    """When a datagram arrived, on the Trio clock: the kernel's stamp (SO_TIMESTAMPNS), so that
    a process that reads its socket late (a busy core) does not take fresh heartbeats for old
    ones. Without a stamp: now."""
    now = trio.current_time()
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS and len(data) >= _TIMESPEC.size:
            sec, nsec = _TIMESPEC.unpack_from(data)
            waited: float = time.time() - (sec + nsec / 1e9)
            return now - min(max(waited, 0.0), 10.0)
    return now


# ---------------------------------------------------------------------- a claimer alone


async def _main(args: argparse.Namespace) -> None:
    from lbnode.cluster.membership import ClusterAgent

    vips = []
    for raw in args.vip:
        iface = ipaddress.ip_interface(raw)
        vips.append(VipSpec(str(iface.ip), iface.network.prefixlen, args.interface))
    settings = ClusterSettings(etcd=tuple(args.etcd), lease_ttl=args.lease_ttl, prefix=args.prefix,
                               heartbeat=parse_address(args.heartbeat, "--heartbeat") if args.heartbeat else None)
    conn = EtcdConnection(settings.etcd)
    agent = ClusterAgent(settings, args.node, {}, connection=conn)
    claimer = VipClaimer(settings, args.node, conn, agent, vips=vips)

    async def identify(stream: trio.SocketStream) -> None:
        with trio.move_on_after(2):
            try:
                await stream.send_all(f"{args.node}\n".encode())
            except trio.BrokenResourceError:
                pass
        await stream.aclose()

    # Open before the claimer claims, and ignored once read: a SIGTERM during its start is read
    # after it, and one repeated during the release no longer kills it with the VIPs still held.
    with stopsignals.receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            await nursery.start(agent.run)
            await nursery.start(claimer.run)
            if args.serve_port:
                nursery.start_soon(trio.serve_tcp, identify, args.serve_port)
            async for _ in signals:
                break
            with trio.move_on_after(5):
                await claimer.release_all()
            nursery.cancel_scope.cancel()
    conn.close()


def main(argv: Sequence[str] | None = None) -> None:
    """A VIP claimer without a proxy: for the network-namespace tests and for trying VIPs out."""
    parser = argparse.ArgumentParser(prog="python -m lbnode.cluster.vips", description=main.__doc__)
    parser.add_argument("--etcd", action="append", required=True, help="endpoint, e.g. http://192.0.2.2:2379")
    parser.add_argument("--node", required=True)
    parser.add_argument("--interface", required=True)
    parser.add_argument("--vip", action="append", required=True, help="address/prefixlen")
    parser.add_argument("--lease-ttl", type=float, default=2.0)
    parser.add_argument("--prefix", default="/fulcrum/v1")
    parser.add_argument("--heartbeat", help="ip:port of this claimer's UDP heartbeats ([cluster] heartbeat)")
    parser.add_argument("--serve-port", type=int, default=0, help="answer every TCP connection with the node id")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    trio.run(_main, args)


if __name__ == "__main__":
    main()
