"""The pure parts of bench.opcount: areas, per-request figures, the comparison, the summary."""

from __future__ import annotations

import pytest

from bench.opcount import area, compare, main, per_request, report


def test_functions_are_put_in_lbnode_trio_or_other() -> None:
    assert area("lbnode/http/proxy.py:_exchange") == "lbnode"
    assert area("trio/_core/_run.py:unrolled_run") == "trio"
    assert area("outcome/_impl.py:unwrap") == "trio"
    assert area("<attrs generated methods outcome._impl.Value>:__init__") == "trio"
    assert area("<string>:__init__") == "other"


def test_the_summary_gives_the_total_by_area_and_the_top_functions() -> None:
    counts = per_request({"lbnode/a.py:f": 300, "trio/b.py:g": 150, "<string>:__init__": 30}, 3)
    lines = report("x", counts, top=2)
    assert lines[0] == "x: 160 instructions per request (lbnode 100, trio 50, other 10)"
    assert lines[1:] == ["    100.0  lbnode/a.py:f", "     50.0  trio/b.py:g"]


def test_the_comparison_lists_the_largest_changes_first_and_leaves_out_noise() -> None:
    a = {"f": 100.0, "g": 50.0, "h": 10.0}
    b = {"f": 80.0, "g": 50.2, "k": 5.0}
    assert compare(a, b, top=10) == ["    -20.0  f", "    -10.0  h", "     +5.0  k"]


def test_garbage_collections_are_reported_per_1000_requests_and_left_out_of_the_instructions() -> None:
    counts = per_request({"lbnode/a.py:f": 2000, "gc:collections of generation 0": 3,
                          "gc:collections of generation 1": 0, "gc:collections of generation 2": 0}, 1000)
    lines = report("x", counts, top=5)
    assert lines[0] == "x: 2 instructions per request (lbnode 2, trio 0, other 0)"
    assert lines[1] == "  garbage collections per 1000 requests, generations 0/1/2: 3.00/0.00/0.00"
    assert lines[2:] == ["      2.0  lbnode/a.py:f"]


def test_new_connection_modes_report_per_connection() -> None:
    counts = per_request({"lbnode/a.py:f": 600, "gc:collections of generation 0": 0}, 3)
    lines = report("x", counts, top=1, unit="connection")
    assert lines[0] == "x: 200 instructions per connection (lbnode 200, trio 0, other 0)"
    assert lines[1] == "  garbage collections per 1000 connections, generations 0/1/2: 0.00"


def test_calls_mode_says_calls() -> None:
    lines = report("HEAD", {"trio/_core/_run.py:reschedule": 7.5, "lbnode/http/proxy.py:handle": 2.0}, 5,
                           what="calls")
    assert lines[0] == "HEAD: 10 calls per request (lbnode 2, trio 8, other 0)"


@pytest.mark.parametrize("argv", [["--protections", "--cluster"], ["--policy", "least_connections", "--cluster"],
                                  ["--protections", "--policy", "random"]])
def test_one_comparison_at_a_time(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert "--protections, --cluster, --policy: one comparison at a time" in capsys.readouterr().err
