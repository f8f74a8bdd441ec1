"""Claimer heartbeats: who hears whom, directly over UDP, so that a dead VIP holder loses its lease at once.

Owns the pure rules (``Heartbeats``: what to send, what a datagram proves, when a holder must
fence, when a holder may be revoked) and the datagram format (HMAC-SHA256 under the cluster
key). Pure: no I/O, no clock reads; every ``now`` is the caller's monotonic clock (Trio time).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field

from lbnode.model import NAME_RE

# Each claimer sends every peer one datagram this often (a lost one costs nothing: the next
# one says the same, fresher). Twice VRRPv3's fast rate: an echo then comes back within 50 ms
# plus the transit, which leaves most of FENCE_AFTER to ride out a peer that the CPU left
# waiting. About 200 bytes and one HMAC per datagram: 20 per second per peer is nothing.
HEARTBEAT_INTERVAL = 0.05
# A holder keeps its VIPs only while enough peers echoed one of its own heartbeats sent less
# than this long ago (its own clock: no clock sync). An echo normally arrives 0-0.05 s after
# the heartbeat it answers (the peer's next heartbeat): a peer may lose several datagrams in
# a row, or wait about 0.4 s for a CPU (2 cores at a load of 10, as when the test suites of
# several branches run at once), before the holder drops its VIPs for nothing.
FENCE_AFTER = 0.45
# A peer counts a holder as missing after hearing nothing from it this long. SAFETY MARGIN:
# a holder's last echo from that peer is of a heartbeat the peer received at least
# DETECT_AFTER before it revokes, so the holder stops counting it at least
# DETECT_AFTER - FENCE_AFTER = 0.4 s before the revocation: that is the time the holder has
# to notice and take its addresses off (a sleep_until that overruns and a netlink call;
# tens of milliseconds usually, a few hundred when a Trio loop serving traffic shares 2
# busy cores). Larger than the stall FENCE_AFTER tolerates: safety before availability.
DETECT_AFTER = 0.85
# Another peer's "I have not heard H for X" counts towards revoking H only while the
# heartbeat that said it was sent less than this long ago (estimated on our clock, see
# ``Peer.offset``): a report may be overtaken by the peer hearing H again.
REPORT_FRESH = 0.25
# A peer confirms the holder only after its echoes have been fresh (within FENCE_AFTER)
# without a break this long. Must exceed REPORT_FRESH: a peer that reported "missing" and
# then heard the holder again cannot be counted by both sides at once (docs/vips.md).
STABLE_AFTER = 0.3
# Datagrams older than this on arrival (estimated like reports) are dropped: a delayed
# heartbeat would carry stale reports. Replays are dropped by the sender time alone.
MAX_AGE = REPORT_FRESH
# Below this many claimers no majority can form without the holder: lease-only failover.
MIN_CLAIMERS = 3
# When a claimer key vanishes, the holder goes on counting the claimers it saw for this long.
# The peers see the same etcd change a little later (a watch, a round: ROUND_INTERVAL at most)
# and may go on counting the reports of a peer whose lease just changed for REPORT_FRESH;
# until then they may revoke under the larger count, so the holder must still need the
# confirmations that count asks for. A peer whose own lease ended stops revoking when it sees
# its claimer key gone (a watch event), or within a keepalive (TTL/3). Costs nothing while a
# majority of the old count still answers.
HOLD_DOWN = 3.0

MAGIC = b"FHB1"
MAC_SIZE = 32  # HMAC-SHA256
KEY_SIZE = 32
MAX_DATAGRAM = 65_000


@dataclass(frozen=True, slots=True)
class Report:
    """What the sender knows of one peer when it sent the heartbeat."""

    echo: float | None  # the peer's own send time of its last heartbeat the sender received
    silence: float  # how long the sender had not heard that peer


@dataclass(frozen=True, slots=True)
class Heartbeat:
    node: str
    lease: int
    sent: float  # the sender's monotonic clock
    reports: Mapping[str, Report] = field(default_factory=dict)


def seal(key: bytes, beat: Heartbeat) -> bytes:
    """The datagram: magic, HMAC-SHA256 of the body under ``key``, a JSON body."""
    body = json.dumps(
        {"n": beat.node, "l": beat.lease, "t": beat.sent,
         "p": {node: [r.echo, r.silence] for node, r in beat.reports.items()}},
        separators=(",", ":"),
    ).encode()
    return MAGIC + hmac.new(key, body, hashlib.sha256).digest() + body


def unseal(key: bytes, datagram: bytes) -> Heartbeat | None:
    """The heartbeat in ``datagram``, or None when it is not one or its MAC does not match."""
    if len(datagram) < len(MAGIC) + MAC_SIZE or not datagram.startswith(MAGIC):
        return None
    mac, body = datagram[len(MAGIC):len(MAGIC) + MAC_SIZE], datagram[len(MAGIC) + MAC_SIZE:]
    if not hmac.compare_digest(mac, hmac.new(key, body, hashlib.sha256).digest()):
        return None
    try:
        data = json.loads(body)
        node, lease, sent = data["n"], data["l"], data["t"]
        reports = {}
        for peer, (echo, silence) in data["p"].items():
            if not isinstance(peer, str) or not _number(silence) or not (echo is None or _number(echo)):
                return None
            reports[peer] = Report(None if echo is None else float(echo), float(silence))
    except (ValueError, KeyError, TypeError, AttributeError):
        return None
    if not isinstance(node, str) or not NAME_RE.fullmatch(node) or type(lease) is not int or not _number(sent):
        return None
    return Heartbeat(node, lease, float(sent), reports)


def _number(x: object) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def majority(n: int) -> int:
    return n // 2 + 1


class Peer:
    """What this node knows of one peer, for the peer's current lease."""

    __slots__ = ("lease", "known_since", "last_sent", "heard", "offset", "echo", "confirmed_since",
                 "reports", "report_sent", "claimers")

    def __init__(self, lease: int, now: float) -> None:
        self.lease = lease
        self.known_since = now  # silence counts from here until we first hear it
        self.last_sent = -math.inf  # its clock: replays and reordered datagrams are dropped
        self.heard = -math.inf  # our clock, when its last heartbeat arrived
        # min(arrival - sent) over its heartbeats: its clock's offset plus the quickest transit.
        # sent + offset estimates when it sent (our clock), never earlier than it did.
        self.offset = math.inf
        self.echo = -math.inf  # the latest of OUR send times it echoed
        self.confirmed_since = math.inf  # our clock: start of the unbroken run of fresh echoes
        self.reports: Mapping[str, Report] = {}
        self.report_sent = -math.inf  # our clock, estimated: when it sent ``reports``
        self.claimers: frozenset[str] = frozenset()  # the claimers it knew when it last spoke (itself too)


class Heartbeats:
    """The heartbeat view of one claimer: its peers (other claimers with a heartbeat address).

    - ``message(now)``: the heartbeat to send every peer now.
    - ``received(beat, now)``: take a peer's heartbeat (False: dropped as unknown, replayed or old).
    - ``confirmed(now)``: peers whose echo of our own send time is within ``FENCE_AFTER``
      (our clock) and has been for ``STABLE_AFTER``.
    - ``may_hold(now)`` / ``fence_deadline(now)``: with n claimers (n >= 3), a holder needs
      n//2 confirmations; ``fence_deadline`` is when that runs out without new echoes.
    - ``missing(node, now)``: at least n//2 + 1 claimers other than ``node`` (us included,
      others by their fresh reports) have not heard it for ``DETECT_AFTER``, and ``node`` last
      said it knew the same claimers as we do (it counted the same n).

    A holder counts n as the most claimers it knew in the last ``HOLD_DOWN``.
    """

    def __init__(self, node_id: str, lease: int, now: float) -> None:
        self.node_id = node_id
        self.lease = lease
        self.started = now  # echoes older than this are not of our heartbeats
        self.peers: dict[str, Peer] = {}
        self._counts: list[tuple[float, int]] = []  # (until when, claimer count) after a shrink
        self._left: dict[str, Peer] = {}  # peers whose claimer key went or changed lease, by node

    def set_lease(self, lease: int, now: float) -> None:
        """Our lease changed: what peers echoed was for the old one."""
        if lease != self.lease:
            self.lease = lease
            self.started = now
            for peer in self.peers.values():
                peer.echo, peer.confirmed_since = -math.inf, math.inf
            self._left.clear()

    def set_peers(self, peers: Mapping[str, int], now: float) -> None:
        """The other claimers with a heartbeat address, with their lease (from their claimer key).

        A new lease is a new peer, with one exception: its echoes of our heartbeats carry over
        (a node that lost its lease to an etcd election and registered again, or restarted,
        within ``FENCE_AFTER`` of its last echo). They stay true facts about our heartbeats,
        and the safety argument holds with them (docs/vips.md, "A peer under a new lease"); a
        holder whose one remaining confirmer re-registered no longer fences for
        ``STABLE_AFTER``. Everything else of it starts over: its reports, its silence, replays."""
        before = self.claimers
        for node in list(self.peers):
            if node not in peers or peers[node] != self.peers[node].lease:
                self._left[node] = self.peers.pop(node)
        for node, lease in peers.items():
            if node != self.node_id and node not in self.peers:
                peer = self.peers[node] = Peer(lease, now)
                left = self._left.pop(node, None)
                if left is not None:
                    peer.echo, peer.confirmed_since = left.echo, left.confirmed_since
        # an echo older than FENCE_AFTER confirms nothing: nothing left to carry over
        self._left = {node: p for node, p in self._left.items() if now - p.echo <= FENCE_AFTER}
        if self.claimers < before:
            self._counts.append((now + HOLD_DOWN, before))

    def counted(self, now: float) -> int:
        """n for the holder rule: the most claimers known within the last ``HOLD_DOWN``."""
        self._counts = [(until, n) for until, n in self._counts if until > now]
        return max([self.claimers, *(n for _, n in self._counts)])

    @property
    def claimers(self) -> int:
        return len(self.peers) + 1

    def applies(self, now: float | None = None) -> bool:
        """Is the heartbeat rule on? ``now`` for the holder (counting recent claimers too)."""
        return (self.claimers if now is None else self.counted(now)) >= MIN_CLAIMERS

    # ------------------------------------------------------------------ traffic
    def message(self, now: float) -> Heartbeat:
        reports = {
            node: Report(None if p.last_sent == -math.inf else p.last_sent, now - max(p.heard, p.known_since))
            for node, p in self.peers.items()
        }
        return Heartbeat(self.node_id, self.lease, now, reports)

    def received(self, beat: Heartbeat, now: float) -> bool:
        peer = self.peers.get(beat.node)
        if peer is None or beat.lease != peer.lease or beat.sent <= peer.last_sent:
            return False  # not a claimer we know (or an older lease of one), or a replay
        offset = min(peer.offset, now - beat.sent)
        if now - (beat.sent + offset) > MAX_AGE:
            return False  # delayed on the way: its reports are stale
        peer.offset, peer.last_sent, peer.heard = offset, beat.sent, max(peer.heard, now)
        peer.reports, peer.report_sent = beat.reports, beat.sent + offset
        peer.claimers = frozenset(beat.reports) | {beat.node}
        mine = beat.reports.get(self.node_id)
        if mine is not None and mine.echo is not None and self.started <= mine.echo <= now:
            if peer.echo + FENCE_AFTER < now:
                peer.confirmed_since = now  # the run of fresh echoes was broken: a new one starts
            peer.echo = max(peer.echo, mine.echo)
        return True

    # ------------------------------------------------------------------ holder side
    def confirmed(self, now: float) -> set[str]:
        return {
            node for node, p in self.peers.items()
            if now - p.echo <= FENCE_AFTER and now - p.confirmed_since >= STABLE_AFTER
        }

    def may_hold(self, now: float) -> bool:
        return now < self.fence_deadline(now)

    def fence_deadline(self, now: float) -> float:
        """When we must hold no VIP, unless new echoes come (-inf: now; inf: the rule is off)."""
        if not self.applies(now):
            return math.inf
        needed = majority(self.counted(now)) - 1
        expiries = sorted((self.peers[n].echo + FENCE_AFTER for n in self.confirmed(now)), reverse=True)
        if len(expiries) < needed:
            return -math.inf
        return expiries[needed - 1]

    # ------------------------------------------------------------------ peer side
    def silence(self, node: str, now: float) -> float:
        p = self.peers[node]
        return now - max(p.heard, p.known_since)

    def missing(self, node: str, now: float) -> bool:
        """May ``node``'s lease be revoked? (Only ask for holders: see docs/vips.md.)"""
        return self.why_not_missing(node, now) is None

    def why_not_missing(self, node: str, now: float) -> str | None:
        """None when ``node`` is missing for a majority; otherwise why not, for the log."""
        if not self.applies() or node not in self.peers:
            return f"{self.claimers} claimers: the heartbeat rule is off"
        ours = frozenset(self.peers) | {self.node_id}
        if self.peers[node].claimers != ours:
            # it may count n differently (a claimer joining): its rule may not match ours
            return f"it last knew claimers {sorted(self.peers[node].claimers)}, we know {sorted(ours)}"
        if self.silence(node, now) < DETECT_AFTER:
            return "we heard it lately"
        votes = 1
        for other, p in self.peers.items():
            if other == node or now - p.report_sent > REPORT_FRESH:
                continue
            report = p.reports.get(node)
            if report is not None and report.silence >= DETECT_AFTER:
                votes += 1
        needed = majority(self.claimers)
        return None if votes >= needed else f"{votes} of the {needed} claimers needed miss it"


# ---------------------------------------------------------------------- hand-over (lbnode run --takeover)

_PEER_TIMES = ("known_since", "last_sent", "heard", "offset", "echo", "confirmed_since")


def export_state(state: Heartbeats) -> dict[str, object]:
    """What a new process of the same node needs to go on where this one stops (JSON; the times
    are Trio times, and the new process runs on the same Trio clock: ``handover.HandoverClock``).
    Reports are left out: the peers send fresh ones every HEARTBEAT_INTERVAL."""
    return {
        "lease": state.lease,
        "started": state.started,
        "counts": [[until, n] for until, n in state._counts],
        "peers": {node: {"lease": p.lease, "claimers": sorted(p.claimers), **{k: getattr(p, k) for k in _PEER_TIMES}}
                  for node, p in state.peers.items()},
    }


def restore_state(state: Heartbeats, saved: Mapping[str, object]) -> None:
    """Take over what ``export_state`` saved, for the same lease only: the peers' echoes and
    confirmations carry over, so the holder is confirmed as the old process was (not fenced
    for STABLE_AFTER while its peers' echoes build up again), and the peers' last send times,
    so a replay is still told from a fresh heartbeat."""
    if saved.get("lease") != state.lease:
        return
    state.started = float(saved["started"])  # type: ignore[arg-type]
    state._counts = [(float(until), int(n)) for until, n in saved.get("counts", [])]  # type: ignore[attr-defined]
    peers = saved.get("peers", {})
    assert isinstance(peers, dict)
    for node, raw in peers.items():
        peer = Peer(int(raw["lease"]), float(raw["known_since"]))
        for k in _PEER_TIMES:
            setattr(peer, k, float(raw[k]))
        peer.claimers = frozenset(raw.get("claimers", ()))
        state.peers[str(node)] = peer
