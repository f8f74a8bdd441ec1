"""Trio's run loop, made cheaper where the data path meets it on every request: the check for
instruments (``fast_instruments``) and the clock (``run_clock``).

At every task step, every task it schedules and every I/O wait, Trio's run loop asks whether
an instrument wants that hook (``"before_task_step" in runner.instruments``) so as to skip
the hooks nobody installed. In the Trio this was written against (0.35) that table,
``Instruments``, is a ``collections.UserDict``, whose ``__contains__`` is a Python function:
each of those checks is a Python call, about 14 per keep-alive request and 23 per new L4
connection (what ``bench.opcount`` lists as ``collections/__init__.py:__contains__``).
``fast_instruments`` gives the running loop the same table as a ``dict``, whose ``in`` is
dict's own lookup, in C. Adding, removing and calling instruments stay Trio's own functions,
unchanged, on the same entries.

It reaches into Trio's runner, which is not public, so it checks what it finds: a table that is
a ``dict`` already (as in older Trio versions) is left, and anything it does not recognise is
left as it is and reported (the loop then runs as Trio made it, only slower).

``trio.current_time()`` is three Python calls: the public function, the runner's method, the
clock's. A request reads the clock about six times (deadlines, the backend's response time,
the rate limiter...). ``run_clock`` gives the clock's own bound ``current_time``, one call,
through public API only; it is the same clock the run's deadlines use, for as long as the run
lasts, so an object that lives in one run (a listener's proxy, the run's ``Deadlines``) takes
it once.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any

import trio

log = logging.getLogger("lbnode.trioloop")


@functools.cache
def _dict_table() -> type[dict[str, dict[Any, None]]] | str:
    """The dict class standing in for Trio's ``Instruments``, or why there is none."""
    try:
        from trio._core._instrumentation import Instruments
    except ImportError as exc:
        return f"trio has no Instruments class ({exc})"
    methods = {name: getattr(Instruments, name, None) for name in ("add_instrument", "remove_instrument", "call")}
    missing = [name for name, fn in methods.items() if not callable(fn)]
    if missing:
        return f"trio's Instruments lacks {', '.join(missing)}"

    class DictInstruments(dict[str, dict[Any, None]]):
        """Trio's ``Instruments`` as a dict: its methods read and write ``self.data``, which
        is the dict itself here (an attribute, not a property: ``call`` reads it at every
        hook it calls)."""

        add_instrument = methods["add_instrument"]
        remove_instrument = methods["remove_instrument"]
        call = methods["call"]

        def __init__(self, data: dict[str, dict[Any, None]]) -> None:
            super().__init__(data)
            self.data = self  # a cycle, for the run's life

    return DictInstruments


def fast_instruments() -> bool:
    """In a Trio run: its instruments table becomes a dict with the same entries (see the
    module). True if the table is a dict now (made one, or one already)."""
    from trio._core._run import GLOBAL_RUN_CONTEXT

    runner = getattr(GLOBAL_RUN_CONTEXT, "runner", None)
    if runner is None:
        raise RuntimeError("fast_instruments() must be called in a Trio run")
    table = getattr(runner, "instruments", None)
    if isinstance(table, dict):
        return True
    cls = _dict_table()
    data = getattr(table, "data", None)
    if isinstance(cls, str) or not isinstance(data, dict) or "_all" not in data:
        log.info("Trio's instrument table kept as it is (%s): each task step costs a Python call more",
                 cls if isinstance(cls, str) else f"a {type(table).__name__} without the expected entries")
        return False
    runner.instruments = cls(data)  # the same per-hook dicts, under the same keys
    return True


def run_clock() -> Callable[[], float]:
    """The running Trio run's ``current_time``, one call (``trio.current_time`` outside a run,
    which then raises when called outside one, as it always did)."""
    try:
        return trio.lowlevel.current_clock().current_time
    except RuntimeError:
        return trio.current_time
