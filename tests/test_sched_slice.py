"""The runner threads' longer slice (supervisor/sched_slice.py), on this host's kernel: each
case runs in a thread of its own, as a runner does, so the test process keeps its slice."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from vmsuper.supervisor import runner_seccomp, sched_slice

T = TypeVar("T")


def slice_of(tid: int) -> int:
    """The thread's slice in ns, as the kernel's own record of it shows."""
    for line in Path(f"/proc/self/task/{tid}/sched").read_text().splitlines():
        if line.startswith("se.slice"):
            return int(line.split(":")[1])
    raise AssertionError(f"no se.slice for thread {tid}")


def in_a_thread(body: Callable[[], T]) -> T:
    results: list[T] = []
    errors: list[BaseException] = []

    def main() -> None:
        try:
            results.append(body())
        except BaseException as exc:  # re-raised in the test's thread
            errors.append(exc)

    thread = threading.Thread(target=main)
    thread.start()
    thread.join(30)
    if errors:
        raise errors[0]
    return results[0]


def test_the_slice_doubles_and_the_nice_value_stays() -> None:
    def body() -> tuple[int, int | None, int, int]:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, 5)  # a thread's own nice value
        before = slice_of(tid)
        got = sched_slice.lengthen_slice()
        return before, got, slice_of(tid), os.getpriority(os.PRIO_PROCESS, tid)

    before, got, after, nice = in_a_thread(body)
    assert got == after == sched_slice.SLICE_FACTOR * before
    assert nice == 5
    assert os.sched_getscheduler(0) == os.SCHED_OTHER


def test_a_thread_under_the_idle_policy_is_left_alone() -> None:
    def body() -> tuple[int | None, int]:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))  # this thread only
        return sched_slice.lengthen_slice(), os.sched_getscheduler(0)

    assert in_a_thread(body) == (None, os.SCHED_IDLE)


def test_a_refused_call_leaves_the_default_and_raises_nothing() -> None:
    # A runner's own filter refuses sched_setattr (EPERM), as a container's policy might.
    # The confined thread cannot read /proc itself: this thread reads it while that one waits.
    done, release = threading.Event(), threading.Event()
    got: list[int | None] = []

    def confined() -> None:
        runner_seccomp.confine_thread(0, ())  # ioctl on fd 0 at most: nothing else matters
        got.append(sched_slice.lengthen_slice())
        done.set()
        release.wait(30)

    thread = threading.Thread(target=confined)
    thread.start()
    try:
        assert done.wait(30)
        after = slice_of(thread.native_id or 0)
    finally:
        release.set()
        thread.join(30)
    assert got == [None]
    assert after == slice_of(threading.get_native_id())  # the default, as this thread's
