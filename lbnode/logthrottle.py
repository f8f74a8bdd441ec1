"""How many lines of one kind the log takes: a flood must not become a log flood.

A node under attack answers thousands of requests a second itself (429 from a rate
limit, 408 to slowloris connections, 400 to garbage); one WARNING per answer would
turn every attack into a disk and CPU attack on the log. ``LogThrottle`` lets the
first ``burst`` lines of a kind through in each ``window`` and counts the rest; the
next line of that kind says how many were left out. The answers themselves are
counted in full in ``/metrics`` (``fulcrum_http_responses_total{source="local"}``).

Pure: no I/O and no clock reads; every ``now`` is passed in. The kinds are a bounded
set chosen by the caller (a status code per listener), never a client's address.
"""

from __future__ import annotations

from collections.abc import Hashable


class LogThrottle:
    """At most ``burst`` lines per kind per ``window`` seconds; the rest counted."""

    __slots__ = ("window", "burst", "_kinds")

    def __init__(self, window: float = 10.0, burst: int = 5) -> None:
        if not window > 0 or burst < 1:
            raise ValueError(f"need window > 0 and burst >= 1, got window={window} burst={burst}")
        self.window = window
        self.burst = burst
        # kind -> [window start, lines let through in it, lines left out since the last one let through]
        self._kinds: dict[Hashable, list[float]] = {}

    def admit(self, kind: Hashable, now: float) -> int | None:
        """None: leave this line out. Otherwise log it, saying how many were left out before it."""
        state = self._kinds.get(kind)
        if state is None or now - state[0] >= self.window or now < state[0]:
            left_out = int(state[2]) if state is not None else 0
            self._kinds[kind] = [now, 1, 0]
            return left_out
        if state[1] < self.burst:
            state[1] += 1
            left_out, state[2] = int(state[2]), 0
            return left_out
        state[2] += 1
        return None
