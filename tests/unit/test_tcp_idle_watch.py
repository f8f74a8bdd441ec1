"""IdleWatch: the idle timeout of every TCP session in one task (lbnode.tcp.pump). Mock clock:
the bounds come from the design (checked IDLE_CHECKS_PER_PERIOD times per idle period)."""

from __future__ import annotations

import trio
import trio.testing

from lbnode.tcp.pump import IDLE_CHECKS_PER_PERIOD, IdleWatch, _Activity


async def test_an_idle_session_is_cut_between_idle_and_one_and_a_quarter_idle(
    autojump_clock: trio.testing.MockClock,
) -> None:
    watch = IdleWatch()
    activity = _Activity()
    start = trio.current_time()
    with trio.CancelScope() as scope:
        watch.watch(activity, 10.0, scope, start)
        await trio.sleep_forever()
    elapsed = trio.current_time() - start
    assert 10.0 <= elapsed <= 10.0 * (1 + 1 / IDLE_CHECKS_PER_PERIOD)
    assert activity.ended == "idle for 10s"
    watch.forget(activity)  # after the cut: nothing left to count
    assert len(watch) == 0


async def test_a_session_that_moves_bytes_is_not_cut(autojump_clock: trio.testing.MockClock) -> None:
    watch = IdleWatch()
    activity = _Activity()
    with trio.CancelScope() as scope:
        watch.watch(activity, 10.0, scope, trio.current_time())
        for _ in range(10):  # 50 s of a chunk every 5 s
            await trio.sleep(5.0)
            activity.chunks += 1
        watch.forget(activity)
    assert not scope.cancelled_caught
    assert activity.ended is None


async def test_sessions_of_different_idle_periods_each_get_their_own(autojump_clock: trio.testing.MockClock) -> None:
    watch = IdleWatch()
    cut_at: dict[float, float] = {}
    start = trio.current_time()

    async def session(idle: float) -> None:
        with trio.CancelScope() as scope:
            watch.watch(_Activity(), idle, scope, trio.current_time())
            await trio.sleep_forever()
        cut_at[idle] = trio.current_time() - start

    async with trio.open_nursery() as nursery:
        nursery.start_soon(session, 100.0)
        nursery.start_soon(session, 2.0)  # armed after a later one: the watch wakes earlier
    assert 2.0 <= cut_at[2.0] <= 2.5
    assert 100.0 <= cut_at[100.0] <= 125.0


async def test_short_sessions_do_not_pile_up_in_the_heap(autojump_clock: trio.testing.MockClock) -> None:
    watch = IdleWatch()
    for _ in range(5 * IdleWatch.PRUNE_AFTER):
        activity = _Activity()
        with trio.CancelScope() as scope:
            watch.watch(activity, 600.0, scope, trio.current_time())
            watch.forget(activity)
    assert len(watch) <= 2 * IdleWatch.PRUNE_AFTER + 2
