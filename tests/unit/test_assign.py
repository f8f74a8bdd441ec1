"""Rendezvous assignment of backends to checker nodes, and the majority verdict (pure, no etcd)."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from lbnode.cluster.assign import backend_key, checkers_for, cluster_verdict, fresh_verdict

BACKENDS = [backend_key(f"pool{i % 7}", f"192.0.2.{i % 250}:{8080 + i // 250}") for i in range(1000)]
NODES = [f"node-{c}" for c in "abcde"]


def test_same_answer_whatever_the_order_of_live_nodes() -> None:
    shuffled = NODES[:]
    random.Random(1).shuffle(shuffled)
    for key in BACKENDS[:200]:
        assert checkers_for(key, NODES, 2) == checkers_for(key, shuffled, 2) == checkers_for(key, set(NODES), 2)


def test_checkers_are_distinct_live_nodes_and_at_most_k() -> None:
    for key in BACKENDS[:100]:
        chosen = checkers_for(key, NODES, 2)
        assert len(chosen) == len(set(chosen)) == 2
        assert set(chosen) <= set(NODES)
    assert sorted(checkers_for("p/b", ["x", "y"], 5)) == ["x", "y"]
    assert checkers_for("p/b", [], 2) == []


def test_k_below_one_is_refused() -> None:
    with pytest.raises(ValueError):
        checkers_for("p/b", NODES, 0)


@pytest.mark.parametrize(("nodes", "k"), [(3, 1), (3, 2), (5, 2), (8, 3)])
def test_each_node_checks_about_k_over_n_of_the_backends(nodes: int, k: int) -> None:
    live = NODES[:nodes] if nodes <= len(NODES) else [f"n{i}" for i in range(nodes)]
    load = Counter(node for key in BACKENDS for node in checkers_for(key, live, k))
    expected = len(BACKENDS) * k / nodes
    assert set(load) == set(live)
    for node, count in load.items():
        assert abs(count - expected) <= 0.15 * expected, (node, count, expected)


def test_a_node_leaving_only_moves_the_backends_it_checked() -> None:
    before = {key: checkers_for(key, NODES, 2) for key in BACKENDS}
    gone = "node-c"
    after = {key: checkers_for(key, [n for n in NODES if n != gone], 2) for key in BACKENDS}
    moved = 0
    for key in BACKENDS:
        if gone in before[key]:
            moved += 1
            kept = [n for n in before[key] if n != gone]
            assert kept[0] in after[key]  # the surviving checker keeps checking
            assert gone not in after[key]
        else:
            assert after[key] == before[key]
    assert moved == sum(1 for key in BACKENDS if gone in before[key]) > 0


def test_a_node_joining_only_takes_backends_for_itself() -> None:
    small = NODES[:4]
    for key in BACKENDS:
        old, new = checkers_for(key, small, 2), checkers_for(key, NODES, 2)
        if "node-e" not in new:
            assert new == old
        else:
            assert len(set(new) & set(old)) == 1  # it replaced exactly one checker


def test_no_verdict_until_a_checker_has_spoken() -> None:
    assert cluster_verdict({}, ["a", "b"]) is None
    assert cluster_verdict({"c": False}, ["a", "b"]) is None  # c is not a checker: stale, ignored
    assert cluster_verdict({"a": False}, []) is None


@pytest.mark.parametrize(
    ("observations", "checkers", "up"),
    [
        ({"a": True}, ["a", "b"], True),
        ({"a": False}, ["a"], False),  # the only checker says down
        ({"a": False}, ["a", "b"], True),  # 1 of 2 is no majority (b has not spoken)
        ({"a": False, "b": True}, ["a", "b"], True),  # split: not ejected for everyone
        ({"a": False, "b": False}, ["a", "b"], False),
        ({"a": False, "b": False}, ["a", "b", "c"], False),  # 2 of 3
        ({"a": False, "b": True, "c": True}, ["a", "b", "c"], True),
        ({"a": False, "x": False, "y": False}, ["a", "b", "c"], True),  # x, y are not checkers
    ],
)
def test_down_only_when_a_majority_of_checkers_say_so(
    observations: dict[str, bool], checkers: list[str], up: bool
) -> None:
    assert cluster_verdict(observations, checkers) is up


def test_a_silent_checkers_last_word_is_ignored_and_the_others_decide() -> None:
    now = 100.0
    fresh, old = now + 1.0, now  # stale_at: in the future, or reached
    # a said up and fell silent; b says down: down (b alone is counted), not a split vote
    assert fresh_verdict({"a": (True, old), "b": (False, fresh)}, ["a", "b"], now) is False
    # both speak: the split vote is up, as before
    assert fresh_verdict({"a": (True, fresh), "b": (False, fresh)}, ["a", "b"], now) is True
    # a silent "down" does not keep a backend down that b sees up
    assert fresh_verdict({"a": (False, old), "b": (True, fresh)}, ["a", "b"], now) is True
    # everyone silent: no verdict (the node keeps what it has)
    assert fresh_verdict({"a": (False, old), "b": (False, old)}, ["a", "b"], now) is None
    # a checker that has not spoken yet still counts: one "down" of 2 is no majority
    assert fresh_verdict({"a": (False, fresh)}, ["a", "b"], now) is True
    # 3 checkers, one silent: 2 fresh downs of 2 counted
    assert fresh_verdict({"a": (True, old), "b": (False, fresh), "c": (False, fresh)}, ["a", "b", "c"], now) is False
