"""StopFlag: a watch's stop flag that runs its callbacks (a stream's cancel) when set."""

from __future__ import annotations

import threading

from lbnode.cluster.store import StopFlag


def test_set_runs_each_callback_once_and_the_flag_reads_set() -> None:
    flag = StopFlag()
    ran: list[str] = []
    flag.on_set(lambda: ran.append("a"))
    flag.on_set(lambda: ran.append("b"))
    assert ran == [] and not flag.is_set()
    flag.set()
    assert ran == ["a", "b"] and flag.is_set()
    flag.set()  # again: nothing runs twice
    assert ran == ["a", "b"]


def test_a_callback_registered_after_the_flag_was_set_runs_at_once() -> None:
    flag = StopFlag()
    flag.set()
    ran: list[str] = []
    flag.on_set(lambda: ran.append("late"))
    assert ran == ["late"]


def test_a_forgotten_callback_does_not_run() -> None:
    flag = StopFlag()
    ran: list[str] = []
    forget = flag.on_set(lambda: ran.append("gone"))
    flag.on_set(lambda: ran.append("kept"))
    forget()
    forget()  # twice is harmless
    flag.set()
    assert ran == ["kept"]


def test_set_from_another_thread_wakes_a_waiter_and_runs_the_callbacks_there() -> None:
    flag = StopFlag()
    ran_in: list[str] = []
    flag.on_set(lambda: ran_in.append(threading.current_thread().name))
    setter = threading.Thread(target=flag.set, name="setter")
    setter.start()
    assert flag.wait(10)  # 10 s: a thread start on 2 busy cores takes milliseconds
    setter.join(10)
    assert ran_in == ["setter"]
