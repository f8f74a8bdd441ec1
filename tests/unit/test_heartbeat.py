"""The heartbeat rules (lbnode.cluster.heartbeat), pure: datagrams, echoes, fencing and revocation.

The property test runs whole clusters of ``Heartbeats`` on a simulated LAN (own clock offset
per node, random loss, delay, one-way cuts, stalled senders) and checks the safety rule:
whenever a node may revoke a holder, that holder stopped counting on its VIPs at least
DETECT_AFTER - FENCE_AFTER earlier, less the simulation's step.
"""

from __future__ import annotations

import math
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lbnode.cluster.heartbeat import (
    DETECT_AFTER,
    FENCE_AFTER,
    HEARTBEAT_INTERVAL,
    STABLE_AFTER,
    Heartbeat,
    Heartbeats,
    Report,
    seal,
    unseal,
)

KEY = bytes(range(32))
LEASES = {"a": 10, "b": 20, "c": 30, "d": 40, "e": 50}


def cluster(names: list[str], now: float = 100.0) -> dict[str, Heartbeats]:
    states = {n: Heartbeats(n, LEASES[n], now) for n in names}
    for s in states.values():
        s.set_peers({n: LEASES[n] for n in names}, now)
    return states


def exchange(states: dict[str, Heartbeats], now: float, cut: set[tuple[str, str]] = frozenset()) -> None:  # type: ignore[assignment]
    """Every node sends every other one a heartbeat, through the datagram format (MAC and all)."""
    beats = {n: seal(KEY, s.message(now)) for n, s in states.items()}
    for sender, data in beats.items():
        for receiver, state in states.items():
            if receiver != sender and (sender, receiver) not in cut:
                beat = unseal(KEY, data)
                assert beat is not None
                state.received(beat, now + 0.001)


def run(states: dict[str, Heartbeats], start: float, seconds: float, cut: set[tuple[str, str]] = frozenset()) -> float:  # type: ignore[assignment]
    t = start
    while t < start + seconds:
        exchange(states, t, cut)
        t += HEARTBEAT_INTERVAL
    return t


# ---------------------------------------------------------------------- datagrams


def test_a_datagram_round_trips_and_a_wrong_key_or_a_flipped_bit_is_refused() -> None:
    beat = Heartbeat("n1", 0x1234, 17.5, {"n2": Report(3.25, 0.1), "n3": Report(None, 2.0)})
    data = seal(KEY, beat)
    assert unseal(KEY, data) == beat
    assert unseal(bytes(32), data) is None
    for i in range(len(data)):
        flipped = bytearray(data)
        flipped[i] ^= 0x01
        assert unseal(KEY, bytes(flipped)) is None, f"byte {i} flipped and still accepted"
    assert unseal(KEY, b"") is None
    assert unseal(KEY, data[:20]) is None


def test_a_well_signed_body_that_is_not_a_heartbeat_is_refused() -> None:
    import hashlib
    import hmac

    for body in (b"[]", b"{}", b'{"n":"n1","l":"1","t":1,"p":{}}', b'{"n":"bad name!","l":1,"t":1,"p":{}}',
                 b'{"n":"n1","l":1,"t":NaN,"p":{}}', b'{"n":"n1","l":1,"t":1,"p":{"n2":[1]}}', b"\xff"):
        assert unseal(KEY, b"FHB1" + hmac.new(KEY, body, hashlib.sha256).digest() + body) is None


def test_replays_reordered_unknown_and_old_lease_heartbeats_are_dropped() -> None:
    states = cluster(["a", "b", "c"])
    a, b = states["a"], states["b"]
    first = b.message(100.0)
    assert a.received(first, 100.001)
    assert not a.received(first, 100.002), "the same heartbeat twice"
    later = b.message(100.1)
    earlier = b.message(100.05)
    assert a.received(later, 100.101)
    assert not a.received(earlier, 100.102), "sent before one already taken"
    assert not a.received(Heartbeat("z", 1, 100.2), 100.2), "not a claimer"
    assert not a.received(Heartbeat("b", 99, 100.3), 100.3), "b's claimer key names another lease"


def test_a_heartbeat_delayed_on_the_way_is_dropped() -> None:
    states = cluster(["a", "b", "c"])
    a, b = states["a"], states["b"]
    assert a.received(b.message(100.0), 100.001)  # sets the quickest transit seen
    assert not a.received(b.message(100.1), 100.6), "arrived 0.5 s after it was sent"
    assert a.received(b.message(100.7), 100.702)


# ---------------------------------------------------------------------- the rules


def test_with_two_claimers_or_fewer_the_rule_is_off() -> None:
    for names in (["a"], ["a", "b"]):
        states = cluster(names)
        # nobody ever heard anybody: still no fence and no revocation
        for s in states.values():
            assert s.may_hold(200.0) and s.fence_deadline(200.0) == math.inf
            assert not any(s.missing(n, 200.0) for n in names)


def test_a_fresh_cluster_confirms_every_holder_after_the_stable_time() -> None:
    states = cluster(["a", "b", "c"])
    assert not states["a"].may_hold(100.0)  # nobody echoed yet: no VIP
    t = run(states, 100.0, STABLE_AFTER + 3 * HEARTBEAT_INTERVAL)
    for name, s in states.items():
        assert s.confirmed(t) == set(states) - {name}
        assert s.may_hold(t)
        assert not any(s.missing(n, t) for n in states if n != name)


def test_a_silent_holder_fences_before_the_others_may_revoke_it() -> None:
    states = cluster(["a", "b", "c"])
    t = run(states, 100.0, 1.0)
    others = {k: v for k, v in states.items() if k != "a"}
    # a dies (or its heartbeats are dropped): a hears b and c, they do not hear a
    fenced_at = revoked_at = None
    while revoked_at is None:
        exchange(states, t, cut={("a", "b"), ("a", "c")})
        if fenced_at is None and not states["a"].may_hold(t):
            fenced_at = t
        if all(s.missing("a", t) for s in others.values()):
            revoked_at = t
        t += 0.01
        assert t < 104, "never revoked"
    assert fenced_at is not None and revoked_at - fenced_at >= DETECT_AFTER - FENCE_AFTER - 0.11
    assert revoked_at - 101.0 <= DETECT_AFTER + 2 * HEARTBEAT_INTERVAL


def test_an_isolated_peer_is_missing_for_everyone_and_does_not_vote_alone() -> None:
    states = cluster(["a", "b", "c"])
    t = run(states, 100.0, 1.0)
    cut = {(x, y) for x in states for y in states if x != y and "c" in (x, y)}
    t = run(states, t, 1.0, cut)
    assert states["a"].missing("c", t) and states["b"].missing("c", t)
    # c hears nobody: alone it is no majority, and it fences
    assert not states["c"].missing("a", t) and not states["c"].may_hold(t)
    assert states["a"].may_hold(t) and states["b"].may_hold(t)


def test_the_holder_needs_a_majority_of_five() -> None:
    states = cluster(["a", "b", "c", "d", "e"])
    t = run(states, 100.0, 1.0)
    # a still reaches b only: one confirmation of the two it needs
    cut = {(x, y) for x in states for y in states if x != y and "a" in (x, y) and {x, y} != {"a", "b"}}
    t = run(states, t, 1.0, cut)
    assert not states["a"].may_hold(t)
    # c, d, e miss a (three: a majority of five) and b still hears it: revocable
    assert states["c"].missing("a", t)
    # a reaches b and c: two confirmations, and only d and e miss it
    cut = {(x, y) for x in states for y in states if x != y and "a" in (x, y) and {x, y} - {"a"} <= {"d", "e"}}
    t = run(states, t, 1.0, cut)
    assert states["a"].may_hold(t)
    assert not states["d"].missing("a", t)


def test_a_new_lease_of_ours_starts_confirmation_over() -> None:
    states = cluster(["a", "b", "c"])
    t = run(states, 100.0, 1.0)
    states["a"].set_lease(11, t)
    assert not states["a"].may_hold(t)


def test_a_peer_that_registers_again_under_a_new_lease_keeps_confirming_the_holder() -> None:
    """A CI run: n1's host died, n3 took the VIP, and n2, whose first keepalive fell in the etcd
    election, lost its lease and registered again at once. n2 was n3's one confirmer left
    (n1 still counted for the hold-down), and as a new peer it confirmed nothing for
    STABLE_AFTER: n3 fenced and the VIP was on nobody for 0.3 s. Its echoes now carry over."""
    from lbnode.cluster.heartbeat import HOLD_DOWN

    states = cluster(["a", "b", "c"])
    t = run(states, 100.0, 1.0)
    del states["c"]  # c's host died; its key went (a counts it for the hold-down)
    for s in states.values():
        s.set_peers({n: LEASES[n] for n in "ab"}, t)
    t = run(states, t, 0.5)
    assert states["a"].may_hold(t)
    states["b"].set_lease(21, t)  # b lost its lease and registered again
    states["a"].set_peers({}, t + 0.001)  # its claimer key went ...
    states["a"].set_peers({"b": 21}, t + 0.004)  # ... and came back, a watch event later
    start = t
    while t < start + 2 * STABLE_AFTER:
        exchange(states, t)
        assert states["a"].may_hold(t), f"a fenced {t - start:.2f}s after b's new lease"
        t += HEARTBEAT_INTERVAL
    assert t < start + HOLD_DOWN  # all of it while c still counts


def test_echoes_carried_over_are_dropped_when_our_own_lease_changes() -> None:
    states = cluster(["a", "b", "c"])
    t = run(states, 100.0, 1.0)
    states["a"].set_peers({"c": LEASES["c"]}, t)  # b's key went ...
    states["a"].set_lease(11, t)  # ... and ours changed: no echo so far is of our new lease
    states["a"].set_peers({"b": 21, "c": LEASES["c"]}, t)
    assert states["a"].confirmed(t) == set()


# ---------------------------------------------------------------------- safety, simulated


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(3, 5),
    seed=st.integers(0, 2**32 - 1),
    loss=st.floats(0.0, 0.6),
    max_delay=st.floats(0.0, 0.4),
    stall=st.floats(0.0, 0.5),
    relets=st.floats(0.0, 0.003),
)
def test_never_holder_and_revoked_at_once(
    n: int, seed: int, loss: float, max_delay: float, stall: float, relets: float,
) -> None:
    """Random loss, delays, one-way cuts that come and go, senders that stall, nodes that take
    a new lease (registered again, or restarted with nothing kept; ``relets``: the chance per
    node and 10 ms step, up to about 3 times in the 12 s), which every other node learns a
    watch event later, its claimer key gone for a moment first or not: whenever any node
    may revoke a holder, the holder has not been allowed to hold for DETECT_AFTER - FENCE_AFTER
    (the margin for its own lateness), less the 10 ms step."""
    rng = random.Random(seed)
    names = list(LEASES)[:n]
    offsets = {name: rng.uniform(-1000, 1000) for name in names}  # unrelated monotonic clocks
    step = 0.01
    leases = dict(LEASES)
    states = {name: Heartbeats(name, leases[name], 50.0 + offsets[name]) for name in names}
    for s in states.values():
        s.set_peers({name: leases[name] for name in names}, 50.0 + offsets[s.node_id])
    known = {name: {other: leases[other] for other in names} for name in names}  # claimer keys as each sees them
    key_events: list[tuple[float, str, str, int | None]] = []  # (when, observer, node, its lease or None: gone)
    next_send = {name: 50.0 + rng.uniform(0, HEARTBEAT_INTERVAL) for name in names}
    in_flight: list[tuple[float, str, Heartbeat]] = []
    cut: set[tuple[str, str]] = set()
    # real time each node last was allowed to hold, by lease: a revocation ends the lease the
    # voter knows, and VIPs held under another one (a new process's) are not touched by it
    last_allowed: dict[tuple[str, int], float] = {}
    t = 50.0
    while t < 62.0:
        if rng.random() < 0.01:  # the links change now and then: one-way cuts come and go
            cut = {(x, y) for x in names for y in names if x != y and rng.random() < 0.3}
        for name in names:
            if rng.random() < relets:
                leases[name] += 100
                if rng.random() < 0.5:
                    states[name].set_lease(leases[name], t + offsets[name])  # the same process
                else:  # a new process: nothing of the old one's view
                    states[name] = Heartbeats(name, leases[name], t + offsets[name])
                    states[name].set_peers({o: ln for o, ln in known[name].items() if o != name}, t + offsets[name])
                for other in names:
                    if other != name:
                        seen = t + rng.uniform(0.0, 0.1)  # a watch event (a round at most)
                        if rng.random() < 0.5:  # the old key's deletion seen first
                            key_events.append((seen, other, name, None))
                            seen += rng.uniform(0.0, 0.05)
                        key_events.append((seen, other, name, leases[name]))
        due = sorted(e for e in key_events if e[0] <= t)
        key_events = [e for e in key_events if e[0] > t]
        for _, observer, node, lease in due:
            if lease is None:
                known[observer].pop(node, None)
            else:
                known[observer][node] = lease
            states[observer].set_peers({o: ln for o, ln in known[observer].items() if o != observer},
                                       t + offsets[observer])
        for name in names:
            if t >= next_send[name]:
                beat = states[name].message(t + offsets[name])
                for other in names:
                    if other != name and (name, other) not in cut and rng.random() >= loss:
                        in_flight.append((t + rng.uniform(0, max_delay), other, beat))
                # a busy core: sometimes the next heartbeat is late
                next_send[name] = t + HEARTBEAT_INTERVAL + (rng.uniform(0, stall) if rng.random() < 0.1 else 0)
        arrived = [m for m in in_flight if m[0] <= t]
        in_flight = [m for m in in_flight if m[0] > t]
        rng.shuffle(arrived)  # reordering
        for _, receiver, beat in arrived:
            states[receiver].received(beat, t + offsets[receiver])
        for name in names:
            if states[name].may_hold(t + offsets[name]):
                last_allowed[(name, states[name].lease)] = t
        for voter in names:
            for holder in names:
                if holder != voter and states[voter].missing(holder, t + offsets[voter]):
                    lease = states[voter].peers[holder].lease
                    held = last_allowed.get((holder, lease), -math.inf)
                    assert t - held >= DETECT_AFTER - FENCE_AFTER - step, (
                        f"{voter} may revoke {holder}'s lease {lease} at {t:.2f}, which held until {held:.2f}")
        t += step


# ---------------------------------------------------------------------- configuration


def _cluster_config(heartbeat: object) -> object:
    from lbnode.model import parse_config

    return parse_config({"node": {"id": "n1"}, "cluster": {"etcd": ["http://127.0.0.1:2379"], "heartbeat": heartbeat}})


def test_heartbeat_config_is_an_address_of_this_host() -> None:
    from lbnode.model import Address

    config = _cluster_config("192.0.2.11:7946")
    assert config.cluster.heartbeat == Address("192.0.2.11", 7946)  # type: ignore[attr-defined]
    from lbnode.model import parse_config

    assert parse_config({"node": {"id": "n1"}, "cluster": {"etcd": ["http://127.0.0.1:2379"]}}).cluster.heartbeat is None  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("192.0.2.11", "is not host:port"),
        ("0.0.0.0:7946", "not a wildcard"),
        ("[::]:7946", "not a wildcard"),
        ("lb1.example:7946", "not a name"),
        ("192.0.2.11:0", "out of range"),
        (7946, "expected a string host:port"),
    ],
)
def test_heartbeat_config_errors_name_the_key(value: object, message: str) -> None:
    from lbnode.model import ConfigError

    with pytest.raises(ConfigError) as info:
        _cluster_config(value)
    assert "cluster.heartbeat" in str(info.value) and message in str(info.value), str(info.value)


# ---------------------------------------------------------------------- claimers coming and going


def test_a_holder_that_does_not_know_a_new_claimer_yet_is_not_revoked() -> None:
    """a's view lags: it knows b only (n = 2, rule off, lease-only), b and c know all three."""
    states = cluster(["a", "b", "c"])
    states["a"] = Heartbeats("a", LEASES["a"], 100.0)
    states["a"].set_peers({"b": LEASES["b"]}, 100.0)
    t = run(states, 100.0, 1.0)
    assert states["a"].may_hold(t)  # two claimers in its view: lease-only
    t = run(states, t, 1.0, cut={("a", "b"), ("a", "c")})
    assert states["a"].may_hold(t)
    assert not states["b"].missing("a", t) and not states["c"].missing("a", t)


def test_after_a_claimer_key_vanishes_the_holder_counts_it_for_the_hold_down() -> None:
    from lbnode.cluster.heartbeat import HOLD_DOWN

    states = cluster(["a", "b", "c"])
    t = run(states, 100.0, 1.0)
    # c's key vanished in a's view; b's view lags. a still needs one confirmation
    states["a"].set_peers({"b": LEASES["b"]}, t)
    assert states["a"].applies(t) and states["a"].may_hold(t)
    t = run(states, t, 1.0, cut={("a", "b"), ("a", "c")})
    assert not states["a"].may_hold(t), "a fenced: b, with c's fresh reports, may still revoke it"
    t = run(states, t, HOLD_DOWN, cut={("a", "b"), ("a", "c")})
    assert states["a"].may_hold(t), "two claimers left, after the hold-down: lease-only"


# ---------------------------------------------------------------------- hand-over (lbnode run --takeover)


def test_a_new_process_with_the_handed_over_state_is_confirmed_at_once_and_replays_still_drop() -> None:
    """The holder's state goes to a new process of the same node (JSON, same clock): it stays
    confirmed by its peers with no STABLE_AFTER wait, its fence deadline is the same, and a
    peer's heartbeat it had already taken is still a replay."""
    import json

    from lbnode.cluster.heartbeat import export_state, restore_state

    states = cluster(["a", "b", "c"])
    t = run(states, 100.0, 1.0)
    old = states["a"]
    assert old.confirmed(t) == {"b", "c"}
    saved = json.loads(json.dumps(export_state(old)))  # over the command socket
    last_from_b = seal(KEY, states["b"].message(t - HEARTBEAT_INTERVAL))
    new = Heartbeats("a", LEASES["a"], t + 0.02)  # what a fresh start would have: nothing confirmed
    new.set_peers({n: LEASES[n] for n in "abc"}, t + 0.02)
    assert new.confirmed(t + 0.02) == set() and new.fence_deadline(t + 0.02) == -math.inf
    restore_state(new, saved)
    assert new.confirmed(t + 0.02) == {"b", "c"}
    assert new.fence_deadline(t + 0.02) == old.fence_deadline(t + 0.02)
    beat = unseal(KEY, last_from_b)
    assert beat is not None and not new.received(beat, t + 0.02)
    states["a"] = new
    t = run(states, t + 0.05, 1.0)  # the peers go on confirming the new process
    assert new.confirmed(t) == {"b", "c"} and states["b"].confirmed(t) == {"a", "c"}


def test_a_handed_over_state_of_another_lease_is_not_taken() -> None:
    from lbnode.cluster.heartbeat import export_state, restore_state

    states = cluster(["a", "b", "c"])
    t = run(states, 100.0, 1.0)
    saved = export_state(states["a"])
    new = Heartbeats("a", 99, t)  # the lease ended meanwhile: a new registration
    restore_state(new, saved)
    assert new.peers == {} and new.started == t
