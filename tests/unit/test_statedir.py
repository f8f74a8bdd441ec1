"""One node per state_dir: the flock on state_dir/lock."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from lbnode.statedir import StateDirInUse, lock_state_dir


def test_a_second_holder_is_refused_with_the_first_ones_pid_and_the_lock_goes_with_the_process(tmp_path: Path) -> None:
    state = tmp_path / "state" / "n1"
    held = lock_state_dir(state)  # creates the directory
    assert (state / "lock").read_text().strip() == str(os.getpid())
    other = subprocess.run(
        [sys.executable, "-c", "import sys; from lbnode.statedir import lock_state_dir; lock_state_dir(sys.argv[1])",
         str(state)], capture_output=True, text=True)
    assert other.returncode != 0
    assert f"is in use by another lbnode (pid {os.getpid()})" in other.stderr
    assert "give each node on a host its own state_dir" in other.stderr
    with pytest.raises(StateDirInUse):
        lock_state_dir(state)
    held.close()  # what the end of the process does
    lock_state_dir(state).close()
