"""The slowloris bench section's pure parts: HAProxy's cap under a descriptor limit, the table."""

from __future__ import annotations

import re

from bench.slowloris import ATTACKERS, Phase, Round, attackers_for, haproxy_maxconn, render


def test_haproxy_gets_what_two_descriptors_per_connection_allow_and_room_for_the_ordinary_clients() -> None:
    assert haproxy_maxconn(20_000) == 9_993  # HAProxy's own rule: 2 x maxconn + 14 <= the limit
    assert attackers_for(haproxy_maxconn(20_000)) == 9_893
    assert attackers_for(haproxy_maxconn(1_000_000)) == ATTACKERS


def _round(name: str, unloaded_ms: float, loaded_ms: float, rss_idle: int, rss_loaded: int) -> Round:
    r = Round(name)
    r.keepalive = (Phase([unloaded_ms / 1000] * 100), Phase([loaded_ms / 1000] * 100))
    r.new_conn = (Phase([unloaded_ms / 1000] * 100), Phase([loaded_ms / 1000] * 100))
    r.held, r.rss_idle, r.rss_loaded = 1024, rss_idle, rss_loaded
    return r


def test_the_verdict_takes_the_worst_ratio_and_memory_counts_from_the_first_round() -> None:
    text = render([
        _round("Fulcrum (1)", 1.0, 1.5, 10 * 2**20, 16 * 2**20),
        _round("Fulcrum (2)", 1.0, 2.5, 14 * 2**20, 16 * 2**20),  # the allocator kept round 1's memory
    ])
    assert "worst 2.50x (target < 2x): **not met**" in text
    # (16 - 10) MiB over 1,024 held in both rounds, not (16 - 14) MiB in the second.
    assert len(re.findall(r"\|\s+6\.0 \|", text)) == 4, text
