"""The signals a node handles while it runs, and ignores from the moment it stops handling them.

``trio.open_signal_receiver`` puts back each signal's previous disposition when it is left: for
SIGTERM, SIGHUP and SIGUSR1 the default action (terminate), for SIGINT Python's
KeyboardInterrupt. A node leaves its receiver as it stops, and then still has its exit to go
through (Trio's run ending, the interpreter's shutdown). A signal that lands there, a second
Ctrl-C, a SIGTERM repeated by a process manager, a log rotation's SIGUSR1, killed the process:
its exit status became "killed by signal" (-15, -2) instead of the node's own.
``receiver`` ignores the signals first, so that what the receiver puts back is "ignored":
until the receiver is open the node is not started yet (a signal then acts as always), while
it is open the node handles them, and after it the process only exits.
"""

from __future__ import annotations

import signal
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager

import trio


@contextmanager
def receiver(*signums: int) -> Iterator[AsyncIterator[int]]:
    """``trio.open_signal_receiver(*signums)``, the signals ignored once it is left.

    Only in the main thread of the process's one Trio run (as Trio's receiver itself); a child
    process started while it is open gets each signal at its default, as usual (a handler is
    not inherited across exec; "ignored" is, so none should be started after it is left)."""
    for signum in signums:
        signal.signal(signum, signal.SIG_IGN)
    with trio.open_signal_receiver(*signums) as received:
        yield received
