"""lbnode.trioloop: Trio's instrument table as a dict. Its hook checks are no Python call any
more, and instruments installed before the swap, added or removed after it, and one that raises
behave as Trio's own table makes them behave."""

from __future__ import annotations

import logging
import sys
from types import FrameType
from typing import Any

import pytest
import trio
import trio.testing
from trio._core._run import GLOBAL_RUN_CONTEXT

from lbnode.trioloop import fast_instruments


class Steps(trio.abc.Instrument):
    """Counts task steps and I/O waits."""

    def __init__(self) -> None:
        self.steps = 0
        self.io_waits = 0

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        self.steps += 1

    def after_io_wait(self, timeout: float) -> None:
        self.io_waits += 1


class Raises(trio.abc.Instrument):
    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        raise RuntimeError("instrument failure")


async def _contains_calls(checkpoints: int) -> int:
    """Python-level ``__contains__`` calls made while this task passes ``checkpoints``
    checkpoints (Trio checks its instrument table at each task step)."""
    calls = 0

    def profile(frame: FrameType, event: str, arg: Any) -> None:
        nonlocal calls
        if event == "call" and frame.f_code.co_name == "__contains__":
            calls += 1

    sys.setprofile(profile)
    try:
        for _ in range(checkpoints):
            await trio.lowlevel.checkpoint()
    finally:
        sys.setprofile(None)
    return calls


async def test_hook_checks_are_no_python_call_after_the_swap() -> None:
    if not isinstance(GLOBAL_RUN_CONTEXT.runner.instruments, dict):
        # Trio's own table (a UserDict in the Trio of this writing): a Python call per check,
        # at least the task step's each time.
        assert await _contains_calls(20) >= 20
    assert fast_instruments()
    assert isinstance(GLOBAL_RUN_CONTEXT.runner.instruments, dict)
    assert await _contains_calls(20) == 0
    assert fast_instruments()  # a second call finds a dict and leaves it


def test_instruments_keep_working_across_the_swap(caplog: pytest.LogCaptureFixture) -> None:
    early, late = Steps(), Steps()
    seen: dict[str, int] = {}

    async def main() -> None:
        assert fast_instruments()
        n = early.steps
        await trio.sleep(0)
        assert early.steps > n  # installed with trio.run, still called
        trio.lowlevel.add_instrument(late)
        trio.lowlevel.add_instrument(late)  # twice: no-op, as in Trio
        await trio.sleep(0.01)  # a real I/O wait
        assert late.steps > 0 and late.io_waits > 0
        trio.lowlevel.remove_instrument(late)
        with pytest.raises(KeyError):
            trio.lowlevel.remove_instrument(late)
        seen["late"] = late.steps
        await trio.sleep(0)
        assert late.steps == seen["late"]  # removed: not called any more
        # One that raises is dropped and logged, the run goes on.
        trio.lowlevel.add_instrument(Raises())
        await trio.sleep(0)
        await trio.sleep(0)
        assert "before_task_step" in GLOBAL_RUN_CONTEXT.runner.instruments  # ``early`` still wants it
        seen["early"] = early.steps

    with caplog.at_level(logging.ERROR, logger="trio.abc.Instrument"):
        trio.run(main, instruments=[early])
    assert seen["early"] > 0
    assert any("instrument failure" in (r.exc_text or "") or "Raises" in r.getMessage() for r in caplog.records)


def test_outside_a_run_is_an_error() -> None:
    with pytest.raises(RuntimeError, match="in a Trio run"):
        fast_instruments()


def test_an_unknown_table_is_left_as_it_is(caplog: pytest.LogCaptureFixture) -> None:
    class Other:
        """Not Trio's table: no ``data``."""

        def __contains__(self, key: str) -> bool:
            return False

        def call(self, hookname: str, *args: object) -> None:
            pass

    result: list[object] = []

    async def main() -> None:
        runner = GLOBAL_RUN_CONTEXT.runner
        original = runner.instruments
        other = Other()
        runner.instruments = other
        try:
            result.append(fast_instruments())
            result.append(runner.instruments is other)
        finally:
            runner.instruments = original

    with caplog.at_level(logging.INFO, logger="lbnode.trioloop"):
        trio.run(main)
    assert result == [False, True]
    assert "kept as it is" in caplog.text
