"""When a node handles its signals: from the moment ``run`` reports it serves, not one
scheduler turn later.

A CI run at 0a44015 sent SIGINT to a node right after its "listener ... on" line and got
Python's KeyboardInterrupt (exit 1, a traceback): the receiver was opened by a task started
with ``start_soon``, which only ran at the node's first wait, after the listeners served and
the line was logged. In-process here, so the check is exact: the handlers are looked at the
moment the node reports it serves (its ``task_status.started``), without a signal sent at a
lucky moment.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from typing import Any

import pytest
import trio

from lbnode.config import load_config_text
from lbnode.node import LbNode
from tests.conftest import listener_toml, node_toml, pool_toml

HANDLED = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGHUP)


@pytest.fixture
def restored_handlers() -> Iterator[None]:
    """The node leaves the signals ignored (it exits after); the rest of the suite wants them back."""
    before = {signum: signal.getsignal(signum) for signum in HANDLED}
    try:
        yield
    finally:
        for signum, handler in before.items():
            signal.signal(signum, handler)


def handlers() -> dict[str, Any]:
    return {signal.Signals(signum).name: signal.getsignal(signum) for signum in HANDLED}


async def test_a_node_handles_its_signals_once_it_reports_it_serves(restored_handlers: None) -> None:
    toml = node_toml(pool_toml("p", ["127.0.0.1:9"]), listener_toml("web", "http", "p"))
    node = LbNode(load_config_text(toml, "test.toml"))
    at_start: dict[str, Any] = {}
    async with trio.open_nursery() as nursery:

        async def run(task_status: trio.TaskStatus[Any]) -> None:
            class Reporting:
                def started(self, value: Any = None) -> None:
                    at_start.update(handlers())  # before any other task of the node runs again
                    task_status.started(value)

            await node.run(task_status=Reporting())  # type: ignore[arg-type]  # handle_signals: True, as `lbnode run`

        await nursery.start(run)
        # Trio's receiver installs one handler, the same function, for the four; the default
        # action (SIG_DFL) or Trio's KeyboardInterrupt for SIGINT mean the node is not handling
        # them yet (the code before the fix gave exactly that).
        first = at_start["SIGTERM"]
        assert callable(first) and all(h is first for h in at_start.values()), at_start
        node.stop()
    after = handlers()
    assert after == {name: signal.SIG_IGN for name in after}  # what lands in the exit is ignored
