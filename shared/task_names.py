"""The names that `top -H`, `ps -L`, `pidstat -t` and /proc show for a VM's threads and processes.

Without them a run is a row of "vmsuper": the supervisor's main thread, one runner thread per
VCPU (the one that calls KVM_RUN) and one worker process per VCPU. Named, each VCPU's pair
can be told apart and watched, pinned or profiled: `vcpu3-runner`, `vcpu3-worker`.
"""

from __future__ import annotations

import contextlib
from typing import Final

__all__ = ["MAX_NAME", "name_this_thread", "runner_name", "worker_name"]

MAX_NAME: Final = 15
"""The kernel keeps at most this many characters of a name (TASK_COMM_LEN less its NUL)."""


def runner_name(vcpu: int) -> str:
    return f"vcpu{vcpu}-runner"


def worker_name(vcpu: int) -> str:
    return f"vcpu{vcpu}-worker"


def name_this_thread(name: str) -> None:
    """Name the calling thread (in a process's only thread: the process). A name is only an
    aid, so a /proc that refuses it changes nothing else."""
    with (
        contextlib.suppress(OSError),
        open("/proc/thread-self/comm", "w", encoding="ascii", errors="replace") as comm,
    ):
        comm.write(name[:MAX_NAME])
