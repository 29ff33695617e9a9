"""prctl(2): the options vmsuper sets on its own processes and threads, numbered once.

The supervisor adopts the sandbox's orphans (the child subreaper); the plugin's child, before
its exec, and every VCPU worker die with the supervisor (the parent-death signal); the workers
and the runner threads confine themselves (no_new_privs, no core dumps, no capabilities); and
the runners and workers name themselves. tests/test_prctl.py checks each number against the
kernel's <linux/prctl.h>.

`prctl` is the C library's call, as is: the caller reads its result and `ctypes.get_errno()`
and says what failed in its own terms (a worker that cannot confine itself must not serve).
"""

from __future__ import annotations

import ctypes
from typing import Final

__all__ = [
    "PR_CAPBSET_DROP",
    "PR_CAP_AMBIENT",
    "PR_CAP_AMBIENT_CLEAR_ALL",
    "PR_GET_CHILD_SUBREAPER",
    "PR_SET_CHILD_SUBREAPER",
    "PR_SET_DUMPABLE",
    "PR_SET_NAME",
    "PR_SET_NO_NEW_PRIVS",
    "PR_SET_PDEATHSIG",
    "prctl",
]

PR_SET_PDEATHSIG: Final = 1
PR_SET_DUMPABLE: Final = 4
PR_SET_NAME: Final = 15
PR_CAPBSET_DROP: Final = 24
PR_SET_CHILD_SUBREAPER: Final = 36
PR_GET_CHILD_SUBREAPER: Final = 37
PR_SET_NO_NEW_PRIVS: Final = 38
PR_CAP_AMBIENT: Final = 47
PR_CAP_AMBIENT_CLEAR_ALL: Final = 4

_libc = ctypes.CDLL(None, use_errno=True)


def prctl(option: int, arg2: object = 0, arg3: int = 0, arg4: int = 0, arg5: int = 0) -> int:
    """prctl(option, arg2, ...): 0 or the option's value, -1 with errno set on failure."""
    result: int = _libc.prctl(option, arg2, arg3, arg4, arg5)
    return result
