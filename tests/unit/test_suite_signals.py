"""The suite's children can be stopped with Ctrl-C however the suite was started (conftest.py)."""

from __future__ import annotations

import subprocess
import sys


def test_a_child_of_the_suite_gets_keyboard_interrupt_on_sigint() -> None:
    """Holds when the suite itself was started with SIGINT ignored, e.g. as a background job of
    a script: without conftest.py's handler, this child would print SIG_IGN, and every test
    that stops lbctl or lbnode with Ctrl-C would wait for it in vain."""
    out = subprocess.run(
        [sys.executable, "-c", "import signal; print(signal.getsignal(signal.SIGINT) is signal.default_int_handler)"],
        capture_output=True, text=True, timeout=30, check=True,
    ).stdout
    assert out.strip() == "True"
