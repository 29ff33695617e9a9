"""The names that `top -H`, `ps -L`, `pidstat -t` and /proc show for a VM's threads and processes.

Without them a run is a row of "vmsuper": the supervisor's main thread, one runner thread per
VCPU (the one that calls KVM_RUN) and one worker process per VCPU. Named, each VCPU's pair
can be told apart and watched, pinned or profiled: `vcpu3-runner`, `vcpu3-worker`.
"""

from __future__ import annotations

from typing import Final

from vmsuper.shared.prctl import PR_SET_NAME, prctl

__all__ = ["MAX_NAME", "name_this_thread", "runner_name", "worker_name"]

MAX_NAME: Final = 15
"""The kernel keeps at most this many characters of a name (TASK_COMM_LEN less its NUL)."""


def runner_name(vcpu: int) -> str:
    return f"vcpu{vcpu}-runner"


def worker_name(vcpu: int) -> str:
    return f"vcpu{vcpu}-worker"


def name_this_thread(name: str) -> None:
    """Name the calling thread (in a process's only thread: the process).

    By prctl rather than by writing /proc/thread-self/comm: a runner names itself while the
    VM already runs, and a file opened then would be an fd of the supervisor's that comes and
    goes under a plugin that counts them. A name is only an aid: a refusal changes nothing."""
    prctl(PR_SET_NAME, name.encode("ascii", "replace")[:MAX_NAME])
