"""The pure parts of bench.cpu_ab: ABBA order, paired ratios, py-spy shares, the summary."""

from __future__ import annotations

from pathlib import Path

from bench.cpu_ab import shares, summarize, variant_list
from bench.measure import L7Row, interleaved, median_run, paired_ratios, ratio_spread, round_order


def test_rounds_alternate_forward_and_backward() -> None:
    names = ["a", "b", "haproxy"]
    assert [round_order(names, r) for r in range(4)] == [
        ["a", "b", "haproxy"], ["haproxy", "b", "a"], ["a", "b", "haproxy"], ["haproxy", "b", "a"],
    ]


def test_variants_are_named_for_what_differs_and_a_repeated_one_is_numbered() -> None:
    here = Path(".")
    one = variant_list([("worktree", here)], ["py"], ["plain"])
    assert one == [("worktree", here, "py", "plain")]
    aab = variant_list([("worktree", here)], ["py"], ["plain", "protections", "plain"])
    assert [v[0] for v in aab] == ["worktree [plain]", "worktree [protections]", "worktree [plain] #2"]
    assert [v[3] for v in aab] == ["plain", "protections", "plain"]
    two = variant_list([("a", here), ("b", here)], ["p1", "p2"], ["plain"])
    assert [v[0] for v in two] == ["a (p1)", "a (p2)", "b (p1)", "b (p2)"]


def test_paired_ratios_are_b_over_a_round_by_round() -> None:
    assert paired_ratios([100.0, 80.0], [90.0, 88.0]) == [0.9, 1.1]


def test_shares_count_self_and_inclusive_by_function_with_short_paths() -> None:
    raw = [
        "main (/x/lbnode/cli.py:10);serve (/x/.venv/lib/python3.11/site-packages/trio/_core/_run.py:5) 3\n",
        "main (/x/lbnode/cli.py:10);send_all (/x/lbnode/sockio.py:99) 1\n",
        "\n",
    ]
    total, self_c, incl = shares(raw)
    assert total == 4
    assert self_c == {"serve (trio/_core/_run.py)": 3, "send_all (lbnode/sockio.py)": 1}
    assert incl["main (lbnode/cli.py)"] == 4


def test_summary_gives_median_range_and_ratio_to_haproxy() -> None:
    lines = summarize({"a": [90.0, 100.0, 110.0], "haproxy": [20.0, 25.0, 30.0]})
    assert lines[0] == "a: median 100.0 us/request (range 90.0-110.0, 3 runs), 4.00 x haproxy"
    assert lines[1].startswith("haproxy: median 25.0")


def test_interleaved_runs_every_name_in_abba_order() -> None:
    calls: list[str] = []

    def run(name: str) -> int:
        calls.append(name)
        return len(calls)

    assert interleaved(["a", "b"], 3, run) == {"a": [1, 4, 5], "b": [2, 3, 6]}
    assert calls == ["a", "b", "b", "a", "a", "b"]


def test_median_run_is_the_median_by_cpu_with_every_run_counted() -> None:
    runs = [L7Row("f", cpu_us_per_req=cpu, rps=1000.0 / cpu, requests=100, errors=e)
            for cpu, e in ((3.0, 0), (1.0, 2), (2.0, 0))]
    row = median_run(runs)
    assert row.cpu_us_per_req == 2.0 and row.requests == 300 and row.errors == 2
    assert row.note == "3 runs, CPU µs/req 1.0-3.0"
    assert median_run(runs[:2]).cpu_us_per_req == 1.0  # the lower middle of an even number
    direct = [L7Row("d", rps=r) for r in (5.0, 9.0, 7.0)]
    assert median_run(direct).rps == 7.0 and median_run(direct).note == "3 runs, req/s 5-9"
    assert median_run([*runs, L7Row("f", failed="wrk: boom")]).failed == "wrk: boom"


def test_ratio_spread_pairs_the_rounds() -> None:
    a = [L7Row("h", cpu_us_per_req=c) for c in (10.0, 10.0, 20.0)]
    b = [L7Row("f", cpu_us_per_req=c) for c in (30.0, 40.0, 50.0)]
    assert ratio_spread(a, b) == "3.00x (2.50-4.00) over 3 rounds"
    assert ratio_spread(a[:1], b[:1]) == ""
