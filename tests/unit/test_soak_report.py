"""The soak's pure parts (bench/soak_report.py, bench/soak.py's schedule): which failures a planned
event explains, growth after warm-up, the report's verdicts. Timelines are built by hand."""

from __future__ import annotations

import dataclasses
import json

from bench.soak import growth_window, load_run, schedule
from bench.soak_report import (
    EtcdKey,
    EtcdSample,
    FailedRequest,
    NodeLoad,
    PlannedEvent,
    Sample,
    SoakRun,
    attribute,
    classify_fd,
    growth,
    key_group,
    parse_tcp_sockets,
    render,
    targets_met,
)

NODES = frozenset({"n1", "n2", "n3"})
NODE_RESTART = PlannedEvent("node restart", "node n3", start=100.0, end=103.0, margin=1.0, nodes=frozenset({"n3"}))
BACKEND_RESTART = PlannedEvent("backend restart", "backend b", start=200.0, end=202.5, margin=1.2, nodes=NODES,
                               backends=frozenset({"b"}))


def failure(t: float, node: str, took: float = 0.001, backend: str | None = None) -> FailedRequest:
    return FailedRequest(sent=t, done=t + took, node=node, error="ConnectionRefusedError: [Errno 111]",
                         backend=backend)


def test_a_failure_on_the_restarted_node_inside_its_window_is_explained() -> None:
    [a] = attribute([failure(101.0, "n3")], [NODE_RESTART, BACKEND_RESTART])
    assert a.event is NODE_RESTART


def test_a_node_restart_explains_nothing_on_the_other_nodes() -> None:
    assert not any(a.explained for a in attribute([failure(101.0, "n1"), failure(102.0, "n2")], [NODE_RESTART]))


def test_the_margin_after_an_event_explains_and_ends() -> None:
    inside, outside = attribute([failure(103.9, "n3"), failure(104.1, "n3")], [NODE_RESTART])
    assert inside.explained
    assert not outside.explained


def test_a_request_sent_before_the_event_and_failing_during_it_is_explained() -> None:
    [a] = attribute([failure(99.0, "n3", took=1.5)], [NODE_RESTART])
    assert a.explained
    [early] = attribute([failure(99.0, "n3", took=0.5)], [NODE_RESTART])  # over before the event began
    assert not early.explained


def test_a_backend_restart_is_seen_from_every_node_but_not_in_another_backends_answer() -> None:
    unknown, other, same = attribute(
        [failure(201.0, "n1"), failure(201.0, "n2", backend="a"), failure(201.0, "n3", backend="b")],
        [BACKEND_RESTART],
    )
    assert unknown.explained and same.explained
    assert not other.explained


def test_an_event_explains_only_the_errors_it_can_cause() -> None:
    pool_change = PlannedEvent("pool change", "remove backend d", start=300.0, end=300.5, margin=1.0, nodes=NODES,
                               backends=frozenset({"d"}), errors=frozenset({"status 502"}))
    cut = FailedRequest(300.2, 300.3, "n1", "status 502: b'Bad Gateway'")
    empty = FailedRequest(300.2, 300.3, "n1", "status 503: b'503 Service Unavailable: no backend available'")
    assert [a.explained for a in attribute([cut, empty], [pool_change])] == [True, False]


def samples(process: str, values: list[tuple[float, int, int]]) -> list[Sample]:
    return [Sample(t, process, rss, fds) for t, rss, fds in values]


def test_growth_compares_the_median_of_the_first_and_last_windows_after_warm_up() -> None:
    data = samples("n1", [(0, 10, 5),  # warm-up: ignored
                          (100, 100, 20), (110, 104, 40), (120, 102, 20),  # first window: 102, 20
                          (130, 105, 21),
                          (150, 108, 22), (160, 300, 22), (170, 107, 60)])  # last window: 108, 22
    [g] = growth(data, {"n1": 100.0}, window=30.0)
    assert (g.rss_base, g.rss_end, g.fds_base, g.fds_end) == (102, 108, 20, 22)
    assert g.rss_growth == (108 - 102) / 102
    assert g.fds_growth == 0.1
    assert g.rss_peak == 300
    assert not g.meets()  # 10 % is not under 10 %
    assert (g.since, g.until) == (100, 170)


def test_a_process_restarted_before_two_windows_after_its_warm_up_is_not_measured() -> None:
    data = samples("n3 #2", [(400, 100, 20), (410, 100, 20), (430, 100, 20)])
    [g] = growth(data, {"n3 #2": 400.0}, window=20.0)
    assert not g.measured and g.rss_growth is None and not g.meets()
    assert "30 s of samples after warm-up" in g.why_not
    [never] = growth([], {"n9": 0.0}, window=20.0)
    assert not never.measured


def test_a_flat_process_meets_the_growth_target() -> None:
    data = samples("n2", [(t, 70_000_000, 25) for t in range(0, 200, 10)])
    [g] = growth(data, {"n2": 20.0}, window=30.0)
    assert g.rss_growth == 0 and g.fds_growth == 0 and g.meets()


def test_every_kind_of_event_happens_at_least_once_in_a_short_soak_and_never_in_warm_up_or_the_quiet_end() -> None:
    for minutes in (1, 3, 30):
        duration = minutes * 60.0
        warmup = duration * 0.1
        planned = schedule(duration, warmup)
        assert {k for _, k in planned} == {"backend restart", "pool change", "node restart"}
        assert all(warmup < t < duration - warmup for t, _ in planned)
        assert [t for t, _ in planned] == sorted(t for t, _ in planned)
    assert len(schedule(1800.0, 180.0)) == 18  # one of each kind every 5 minutes
    assert growth_window(180.0) == 20.0 and growth_window(1800.0) == 60.0


def test_key_group_is_the_first_segment_under_the_prefix() -> None:
    assert key_group("/fulcrum/v1/health/web/a/n1") == "/fulcrum/v1/health"
    assert key_group("/fulcrum/v1/pools/web") == "/fulcrum/v1/pools"
    assert key_group("/other/x") == "/other"


def run_with(failures: list[FailedRequest]) -> SoakRun:
    steady = [(float(t), 70_000_000, 25) for t in range(0, 181, 10)]
    return SoakRun(
        minutes=3, rate=240, warmup=18, window=20,
        loads=[NodeLoad("n1", sent=100, ok=100 - len(failures), latencies_ms=[1.0, 2.0, 3.0])],
        events=[NODE_RESTART], failures=failures,
        samples=samples("n1", steady) + samples("etcd", steady), warmed_at={"n1": 18.0, "etcd": 18.0},
        etcd=[EtcdSample(0, 5, 24576, 24576), EtcdSample(20, 10, 24576, 24576), EtcdSample(180, 300, 49152, 40960)],
        lbnode_processes=frozenset({"n1"}),
        etcd_keys=[EtcdKey("/fulcrum/v1/health/web/a/n1", 30, 5, 290)],
        notes=["log of n1-4: nothing at WARNING or above"],
    )


def test_the_report_states_each_target_and_lists_unexplained_failures() -> None:
    clean = render(run_with([failure(101.0, "n3")]))
    assert "Failed requests not explained by a planned event: **0** (target 0): **met**" in clean
    assert "n1: RSS +0.0%, open fds +0.0% after warm-up (target under 10%): **met**" in clean
    assert "ConnectionRefusedError x1" in clean  # the node restart's row says what it caused
    assert "/fulcrum/v1/health" in clean and "290 revisions" in clean
    assert "Planned events that did not settle: **0**" in clean
    assert targets_met(run_with([failure(101.0, "n3")]))
    assert not targets_met(run_with([failure(150.0, "n1")]))
    bad = render(run_with([failure(150.0, "n1")]))
    assert "**1** (target 0): **not met**" in bad
    assert "| 150.000 |" in bad  # listed with its time
    stuck = dataclasses.replace(run_with([]), unsettled=["node restart at 120 s: n3 never came back"])
    assert "did not settle: **1**; node restart at 120 s: n3 never came back" in render(stuck)


def test_a_recorded_run_renders_the_same_after_a_round_trip_through_json() -> None:
    run = run_with([failure(101.0, "n3"), failure(150.0, "n1")])
    doc = json.loads(json.dumps(dataclasses.asdict(run), default=sorted))
    assert render(load_run(doc)) == render(run)


PROC_NET_TCP = """\
  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 111 1 0
   1: 0100007F:1F90 0100007F:A000 01 00000000:00000000 00:00000000 00000000     0        0 222 1 0
   2: 0100007F:B000 0100007F:2329 01 00000000:00000000 00:00000000 00000000     0        0 333 1 0
   3: 0100007F:B001 0100007F:0929 01 00000000:00000000 00:00000000 00000000     0        0 444 1 0
"""


def test_descriptors_are_told_apart_by_the_port_they_serve_or_reach() -> None:
    sockets = parse_tcp_sockets(PROC_NET_TCP)
    assert sockets[222] == (8080, 0xA000, "01")
    served, reached = {8080: "clients"}, {9001: "backends"}
    kinds = [classify_fd(link, sockets, served, reached) for link in (
        "socket:[111]", "socket:[222]", "socket:[333]", "socket:[444]", "socket:[999]",
        "pipe:[5]", "anon_inode:[eventpoll]", "/tmp/n1.log")]
    assert kinds == ["listening", "clients", "backends", "other tcp", "other sockets (unix, udp)",
                     "pipes", "anon inodes (epoll, eventfd)", "files"]
