"""The listener counters /status shows for a node with workers (lbnode.workers.counters):
the workers' sums, a dead worker's counts kept without its gauges, and the ticket key
"shared" only if every live worker says so."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import lbnode.admin.metrics
from lbnode.workers.counters import (
    SUPERVISOR_FAMILIES,
    Retired,
    add_up_listeners,
    merge_metrics,
    summed,
)


def _doc(handshakes: int, resumed: int, in_progress: int, failures: dict[str, int], key: str,
         written: int, dropped: int, buffered: int) -> dict[str, Any]:
    return {"listeners": {
        "web": {
            "connections": {"open": in_progress + 2, "accepted": handshakes},
            "tls": {"handshakes": handshakes, "resumed": resumed, "in_progress": in_progress,
                    "failures": failures, "ticket_key": key},
            "access_log": {"path": "/var/log/web.log", "format": "json", "written": written,
                           "dropped": dropped, "buffered": buffered},
        },
        "plain": {"access_log": {"path": "/var/log/plain.log", "format": "combined", "written": 5,
                                 "dropped": 0, "buffered": 1}},
        "tcp": {},
    }}


def test_live_workers_add_up() -> None:
    one = _doc(10, 4, 1, {"eof": 2}, "shared", 30, 1, 2)
    two = _doc(7, 1, 0, {"eof": 1, "protocol": 3}, "shared", 20, 0, 5)
    assert add_up_listeners([one, two]) == {
        "web": {
            "connections": {"open": 5, "accepted": 17},
            "tls": {"handshakes": 17, "resumed": 5, "in_progress": 1, "failures": {"eof": 3, "protocol": 3},
                    "ticket_key": "shared"},
            "access_log": {"path": "/var/log/web.log", "format": "json", "written": 50, "dropped": 1, "buffered": 7},
        },
        "plain": {"access_log": {"path": "/var/log/plain.log", "format": "combined", "written": 10, "dropped": 0,
                                 "buffered": 2}},
        "tcp": {},
    }


def test_one_worker_with_its_own_ticket_key_makes_the_node_own() -> None:
    docs = [_doc(1, 0, 0, {}, "shared", 0, 0, 0), _doc(1, 0, 0, {}, "own", 0, 0, 0), _doc(1, 0, 0, {}, "shared", 0, 0, 0)]
    assert add_up_listeners(docs)["web"]["tls"]["ticket_key"] == "own"


def test_a_dead_workers_counts_stay_and_its_gauges_go() -> None:
    retired = Retired()
    retired.add(_doc(10, 4, 3, {"eof": 2}, "own", 30, 1, 9))
    retired.add(_doc(5, 0, 1, {"reset": 1}, "own", 4, 0, 2))  # a second death
    live = _doc(2, 1, 1, {"eof": 1}, "shared", 6, 0, 1)
    total = add_up_listeners([live, retired.document()])
    # A dead worker's in-progress handshakes and buffered entries are gone; its "own" key is not
    # today's (the live workers' say "shared").
    assert total["web"] == {
        "connections": {"open": 3, "accepted": 17},  # the dead ones' open connections are gone
        "tls": {"handshakes": 17, "resumed": 5, "in_progress": 1, "failures": {"eof": 3, "reset": 1},
                "ticket_key": "shared"},
        "access_log": {"path": "/var/log/web.log", "format": "json", "written": 40, "dropped": 1, "buffered": 1},
    }
    assert total["plain"]["access_log"]["written"] == 15


def test_no_document_no_listener() -> None:
    assert add_up_listeners([]) == {}
    assert Retired().document()["listeners"] == {}


def test_every_metric_family_is_either_summed_over_the_workers_or_the_supervisors_own() -> None:
    """A family added to /metrics must be placed: one the data path counts and the
    supervisor does not sum shows nothing on a node with workers (as fulcrum_http2_* and
    fulcrum_mirror_* did); one the supervisor keeps must not be summed (its workers' zeros)."""
    source = (Path(lbnode.admin.metrics.__file__)).read_text()
    families = set(re.findall(r'out\.(?:add|histogram)\(\s*"(fulcrum_[a-z0-9_]+)"', source))
    assert len(families) >= 60  # (the pattern still finds them)
    assert set(re.findall(r'"(fulcrum_[a-z0-9_]+)"', source)) == families  # no family named another way
    unplaced = sorted(f for f in families if not summed(f) and f not in SUPERVISOR_FAMILIES)
    both = sorted(f for f in families if summed(f) and f in SUPERVISOR_FAMILIES)
    assert not unplaced and not both, (unplaced, both)
    assert SUPERVISOR_FAMILIES <= families  # none left over from a family that is gone


def test_the_nodes_cpu_and_memory_are_the_supervisors_plus_the_workers() -> None:
    def exposition(cpu: float, rss: int) -> str:
        return ("# HELP fulcrum_node_cpu_seconds_total CPU.\n# TYPE fulcrum_node_cpu_seconds_total counter\n"
                f"fulcrum_node_cpu_seconds_total {cpu}\n"
                "# HELP fulcrum_node_resident_memory_bytes RSS.\n# TYPE fulcrum_node_resident_memory_bytes gauge\n"
                f"fulcrum_node_resident_memory_bytes {rss}\n")

    supervisor = exposition(2.5, 40_000_000)
    retired = Retired()
    retired.add({"metrics": exposition(7.25, 90_000_000)})  # a worker that died: its CPU stays, its memory goes
    merged = merge_metrics(supervisor, [exposition(10.0, 60_000_000), exposition(20.0, 70_000_000),
                                        retired.document()["metrics"]])
    assert "fulcrum_node_cpu_seconds_total 39.75\n" in merged
    assert "fulcrum_node_resident_memory_bytes 170000000\n" in merged
    # No worker answered: the supervisor's own.
    assert "fulcrum_node_cpu_seconds_total 2.5\n" in merge_metrics(supervisor, [])
