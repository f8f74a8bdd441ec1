"""Passive failures per node, not per worker: each worker's current run of failures added up.

Every worker's outlier detector counts what it sees (and ejects at once when its own run
reaches ``consecutive_failures``). Every ``EJECTION_SCAN`` a worker reports the runs that
changed; the supervisor keeps the latest from each worker here and ejects on every worker
when their sum reaches the threshold. The sum is the node's failures since each worker's
own last success: a success on one worker resets only that worker's run, so with N workers
a node may eject a backend whose failures were interleaved with another worker's successes
(with one worker it is exact). Pure: no I/O, no clock.
"""

from __future__ import annotations


class NodeRuns:
    """(pool, backend) -> {worker index: its current run of failures}."""

    def __init__(self) -> None:
        self._runs: dict[tuple[str, str], dict[int, int]] = {}

    def report(self, worker: int, pool: str, backend: str, run: int) -> int:
        """A worker's current run for a backend; returns the node's (every worker's added up)."""
        runs = self._runs.setdefault((pool, backend), {})
        if run > 0:
            runs[worker] = run
        else:
            runs.pop(worker, None)
        return sum(runs.values())

    def clear(self, pool: str, backend: str) -> None:
        """The backend was ejected: every worker starts again from zero."""
        self._runs.pop((pool, backend), None)

    def forget_worker(self, worker: int) -> None:
        """A worker died: its runs die with it (its replacement starts from zero)."""
        for runs in self._runs.values():
            runs.pop(worker, None)
