"""wrk's output: ``parse_wrk`` turns the stdout of ``wrk --latency`` into figures.

Pure: no I/O. Running wrk is ``bench.measure.run_wrk``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field


class WrkParseError(ValueError):
    pass


@dataclass
class WrkResult:
    requests: int
    seconds: float
    rps: float
    latency_ms: dict[int, float]  # percentile -> milliseconds (50, 75, 90, 99)
    non_2xx_3xx: int = 0
    socket_errors: dict[str, int] = field(default_factory=dict)

    @property
    def errors(self) -> int:
        return self.non_2xx_3xx + sum(self.socket_errors.values())


_TIME_UNITS_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0, "h": 3_600_000.0}


def parse_time_ms(token: str) -> float:
    """A wrk time like ``535.20us``, ``1.23ms``, ``2.00s`` or ``1.00m`` in milliseconds."""
    m = re.fullmatch(r"([0-9]+(?:\.[0-9]+)?)(us|ms|s|m|h)", token.strip())
    if not m:
        raise WrkParseError(f"not a wrk time: {token!r}")
    return float(m.group(1)) * _TIME_UNITS_MS[m.group(2)]


def parse_wrk(text: str) -> WrkResult:
    """Parse the stdout of ``wrk --latency``. Raises ``WrkParseError`` when a figure is missing."""
    m = re.search(r"^\s*(\d+) requests in ([0-9.]+)(us|ms|s|m|h),", text, re.M)
    if not m:
        raise WrkParseError("no 'N requests in T' line in wrk output")
    requests = int(m.group(1))
    seconds = parse_time_ms(m.group(2) + m.group(3)) / 1000.0
    m = re.search(r"^Requests/sec:\s*([0-9.]+)", text, re.M)
    if not m:
        raise WrkParseError("no 'Requests/sec' line in wrk output")
    rps = float(m.group(1))
    latency: dict[int, float] = {}
    dist = text.split("Latency Distribution", 1)
    if len(dist) == 2:
        for pm in re.finditer(r"^\s*(\d+)%\s+(\S+)\s*$", dist[1], re.M):
            latency[int(pm.group(1))] = parse_time_ms(pm.group(2))
    if 50 not in latency or 99 not in latency:
        raise WrkParseError("no latency distribution in wrk output (run with --latency)")
    non2xx = 0
    m = re.search(r"Non-2xx or 3xx responses:\s*(\d+)", text)
    if m:
        non2xx = int(m.group(1))
    sock: dict[str, int] = {}
    m = re.search(r"Socket errors:(.*)$", text, re.M)
    if m:
        for em in re.finditer(r"(\w+)\s+(\d+)", m.group(1)):
            sock[em.group(1)] = int(em.group(2))
    return WrkResult(requests, seconds, rps, latency, non2xx, sock)
