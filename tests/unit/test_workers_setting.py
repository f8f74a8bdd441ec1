"""``[node] workers``: an integer >= 1 or "auto" (the cores this process may use: its CPU
affinity, capped by a cgroup v2 quota); anything else is an error that names the key."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from lbnode.model import ConfigError, available_cores, parse_config


def _config(**node: object) -> dict[str, object]:
    return {"node": {"id": "n1", **node}}


def test_default_is_one_worker_per_available_core() -> None:
    assert parse_config(_config()).node.workers == available_cores()
    assert parse_config(_config()).node.workers == parse_config(_config(workers="auto")).node.workers
    assert parse_config(_config(workers=1)).node.workers == 1  # how a node stays one process


def test_a_number_of_workers() -> None:
    assert parse_config(_config(workers=3)).node.workers == 3


@pytest.mark.parametrize(("value", "reason"), [
    (0, 'node.workers: must be >= 1 or "auto", got 0'),
    (-2, 'node.workers: must be >= 1 or "auto", got -2'),
    ("many", 'node.workers: expected an integer >= 1 or "auto", got a string'),
    (True, 'node.workers: expected an integer >= 1 or "auto", got a boolean'),
    (1.5, 'node.workers: expected an integer >= 1 or "auto", got a number'),
])
def test_a_wrong_value_names_the_key(value: object, reason: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(_config(workers=value))
    assert str(err.value) == reason


def test_auto_is_the_cores_this_process_may_use() -> None:
    assert parse_config(_config(workers="auto")).node.workers == available_cores()
    assert 1 <= available_cores() <= len(os.sched_getaffinity(0))


def test_a_cgroup_quota_caps_auto(tmp_path: Path) -> None:
    cpu_max = tmp_path / "cpu.max"
    cpu_max.write_text("50000 100000\n")  # half a core: one worker
    assert available_cores(cpu_max) == 1
    cpu_max.write_text("150000 100000\n")  # 1.5 cores: rounded up, within the affinity mask
    assert available_cores(cpu_max) == min(2, len(os.sched_getaffinity(0)))
    cpu_max.write_text("max 100000\n")  # no quota: the affinity mask alone
    assert available_cores(cpu_max) == len(os.sched_getaffinity(0))
    assert available_cores(tmp_path / "absent") == len(os.sched_getaffinity(0))
