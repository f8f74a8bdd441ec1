"""Following a blocking etcd-style watch from Trio: one thread, one memory channel.

Owns the bridge the architecture prescribes for watches (the etcd client
blocks): the watch runs in a worker thread, each item crosses to the Trio
thread through a memory channel, and a failure comes back as a plain
StoreError, not wrapped in an ExceptionGroup. Never interprets the items.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from functools import partial
from typing import TypeVar

import trio

from lbnode.cluster.store import StopFlag, StoreError

T = TypeVar("T")

# Items in flight between the watch thread and Trio; the thread waits when it is full.
CHANNEL_SIZE = 64


async def follow_watch(
    watch: Callable[[StopFlag], Iterable[T]],
    handle: Callable[[T], None],
    until: trio.Event | None = None,
) -> None:
    """Run ``watch(stop)`` in a thread and call ``handle(item)`` on the Trio thread for each item.

    Returns when the watch ends by itself or ``until`` is set (the caller then
    watches again, e.g. with a wider scope); raises its StoreError; on
    cancellation sets ``stop`` so that the thread finishes.
    """
    send, receive = trio.open_memory_channel[T | StoreError](CHANNEL_SIZE)
    stop = StopFlag()
    token = trio.lowlevel.current_trio_token()

    def pump() -> None:
        try:
            for item in watch(stop):
                trio.from_thread.run(send.send, item, trio_token=token)
        except StoreError as exc:
            if not stop.is_set():
                trio.from_thread.run(send.send, exc, trio_token=token)
        except (trio.RunFinishedError, trio.BrokenResourceError, trio.Cancelled):
            pass  # the node stopped, or this watch was given up (its reader is gone)
        finally:
            try:
                trio.from_thread.run_sync(send.close, trio_token=token)
            except trio.RunFinishedError:
                pass

    async def cancel_when_set(event: trio.Event, scope: trio.CancelScope) -> None:
        await event.wait()
        scope.cancel()

    failure: StoreError | None = None
    try:
        with receive:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(partial(trio.to_thread.run_sync, pump, abandon_on_cancel=True))
                if until is not None:
                    nursery.start_soon(cancel_when_set, until, nursery.cancel_scope)
                async for item in receive:
                    if isinstance(item, StoreError):
                        # Raised below, outside the nursery, which would wrap it in a group.
                        failure = item
                        nursery.cancel_scope.cancel()
                        break
                    handle(item)
                nursery.cancel_scope.cancel()  # the watch ended by itself: stop waiting for `until`
    finally:
        stop.set()
    if failure is not None:
        raise failure
