"""The cluster demo's signals: a Ctrl-C that lands while the demo exits, after its cleanup, does
not kill it (its exit status stays the demo's)."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

# Signals as the demo's main uses them, then its exit; "ready" once the handlers are in place.
CHILD = """
import sys
from lbnode.demo_cluster import Signals
signals = Signals()
print("ready", flush=True)
signals.ignore_from_now()
sys.exit(0)
"""


def exit_status_under_ctrl_c() -> int:
    """The child's exit status while SIGINT is sent again and again from "ready" until it is gone,
    so that one lands during the interpreter's shutdown (where Python puts SIGINT's default
    action back on a signal with a handler: before the fix, every run here died with -2)."""
    child = subprocess.Popen([sys.executable, "-c", CHILD], cwd=REPO, stdout=subprocess.PIPE)
    assert child.stdout is not None
    assert child.stdout.readline() == b"ready\n"
    while child.poll() is None:
        try:
            child.send_signal(signal.SIGINT)
        except ProcessLookupError:
            break
    return child.wait(timeout=30)


def test_a_ctrl_c_during_the_exit_after_cleanup_leaves_the_exit_status_alone() -> None:
    assert [exit_status_under_ctrl_c() for _ in range(10)] == [0] * 10
