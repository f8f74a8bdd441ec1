"""The pure parts of bench.cpu_ab: ABBA order, paired ratios, py-spy shares, the summary."""

from __future__ import annotations

from bench.cpu_ab import paired_ratios, round_order, shares, summarize


def test_rounds_alternate_forward_and_backward() -> None:
    names = ["a", "b", "haproxy"]
    assert [round_order(names, r) for r in range(4)] == [
        ["a", "b", "haproxy"], ["haproxy", "b", "a"], ["a", "b", "haproxy"], ["haproxy", "b", "a"],
    ]


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
