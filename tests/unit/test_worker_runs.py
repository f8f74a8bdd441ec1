"""The supervisor's sum of its workers' runs of passive failures (lbnode/workers/outliers.py)."""

from __future__ import annotations

from lbnode.workers.outliers import NodeRuns


def test_runs_add_up_over_workers_and_a_success_resets_only_its_worker() -> None:
    runs = NodeRuns()
    assert runs.report(0, "p", "b1", 2) == 2
    assert runs.report(1, "p", "b1", 1) == 3
    assert runs.report(0, "p", "b1", 3) == 4  # a run is the worker's current count, not a delta
    assert runs.report(1, "p", "b1", 0) == 3  # worker 1 saw a success
    assert runs.report(1, "p", "b2", 5) == 5  # another backend: its own sum


def test_an_ejection_and_a_dead_worker_clear_what_they_end() -> None:
    runs = NodeRuns()
    runs.report(0, "p", "b1", 2)
    runs.report(1, "p", "b1", 2)
    runs.clear("p", "b1")
    assert runs.report(0, "p", "b1", 1) == 1
    runs.report(1, "p", "b1", 2)
    runs.forget_worker(1)
    assert runs.report(0, "p", "b1", 1) == 1
