"""A longer scheduler slice for each runner thread, so that on a busy CPU its exits' hand-offs
need no wake-up of the runner.

A plain exit goes runner -> plugin -> worker -> runner: the runner writes the Wait to the
plugin, the worker reads the reply and rings the runner's bell. When the three share a CPU,
EEVDF settles into one of two steady orders. Either the plugin's wake-up preempts the runner
right after its write, and the runner, back once the worker has rung, finds the bell rung and
enters the guest at once; or the runner is protected for its slice, goes on to sleep on its
bell, and the worker must wake it (an eventfd write, a read, a sleep and a wake-up more per
exit). Which order a run falls into hangs on timing: with equal slices either can last. The
kernel lets a woken task with a shorter slice than the running one preempt it (6.12 and later,
`sched_attr.sched_runtime` for a normal task), so a runner whose slice is twice the default
always gives way to the plugin and the worker and runs the cheaper order. Only the ordering
of wake-ups changes: the runner's weight, and so its share of a busy CPU, does not.

Kernels without custom slices report none and are left alone, as are threads under a
real-time or idle policy. Nothing here can fail a run: a refusal leaves the default slice.
"""

from __future__ import annotations

import ctypes
import os
from typing import Final

from vmsuper.shared.bpf import SYSCALLS

__all__ = ["SLICE_FACTOR", "lengthen_slice"]

SLICE_FACTOR: Final = 2
_MAX_SLICE_NS: Final = 100_000_000  # the kernel's upper bound for a custom slice
_NORMAL_POLICIES: Final = (os.SCHED_OTHER, os.SCHED_BATCH)
_SCHED_FLAG_RESET_ON_FORK: Final = 0x01
_SCHED_ATTR_SIZE_VER0: Final = 48


class _SchedAttr(ctypes.Structure):
    """`struct sched_attr` of <linux/sched/types.h>, its first version (48 bytes)."""

    _fields_ = [
        ("size", ctypes.c_uint32),
        ("sched_policy", ctypes.c_uint32),
        ("sched_flags", ctypes.c_uint64),
        ("sched_nice", ctypes.c_int32),
        ("sched_priority", ctypes.c_uint32),
        ("sched_runtime", ctypes.c_uint64),
        ("sched_deadline", ctypes.c_uint64),
        ("sched_period", ctypes.c_uint64),
    ]


_libc = ctypes.CDLL(None, use_errno=True)


def lengthen_slice(factor: int = SLICE_FACTOR) -> int | None:
    """Make the calling thread's slice `factor` times what it is, keeping its policy, nice
    value and reset-on-fork flag; returns the new slice in ns, or None where the kernel has no
    custom slices, the policy is not a normal one, or the kernel refused."""
    attr = _SchedAttr()
    if _libc.syscall(SYSCALLS["sched_getattr"], 0, ctypes.byref(attr), ctypes.sizeof(attr), 0) != 0:
        return None
    if attr.sched_policy not in _NORMAL_POLICIES or attr.sched_runtime == 0:
        return None
    slice_ns = min(attr.sched_runtime * factor, _MAX_SLICE_NS)
    wanted = _SchedAttr(
        size=_SCHED_ATTR_SIZE_VER0,
        sched_policy=attr.sched_policy,
        sched_flags=attr.sched_flags & _SCHED_FLAG_RESET_ON_FORK,
        sched_nice=attr.sched_nice,
        sched_runtime=slice_ns,
    )
    if _libc.syscall(SYSCALLS["sched_setattr"], 0, ctypes.byref(wanted), 0) != 0:
        return None
    return slice_ns
