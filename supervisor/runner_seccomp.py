"""A seccomp filter for each runner thread (`supervisor/runners.py`), installed by the thread
itself when it starts.

A runner executes what its VCPU's worker posts in the shared mailbox, so a worker that could
subvert it would act with the supervisor's privileges. Its filter lets it do only a runner's
job: KVM ioctls on its own VCPU's fd (`KVM_RUN` and the allowlist `runners.ALLOWED_IOCTLS`),
the bells (pipe reads and writes, `poll`, `futex`, `sched_yield`, and the wake-up signal
to its own worker through its pidfd), memory, signals, its log records and ending the thread.
Unlike a worker's filter it covers this thread only (no TSYNC): the supervisor's other threads
open files, fork and make VM ioctls. A call outside the list fails with EPERM rather than
killing anything: the thread runs inside the supervisor, which must still shut down cleanly,
and a failed call ends up as a failed runner (`runner_failed`), which stops the run.
Firecracker's per-thread VCPU filters are the model.
"""

from __future__ import annotations

import ctypes
import errno
from collections.abc import Iterable
from typing import Final

from vmsuper.shared import abi, bpf, kvm
from vmsuper.shared.libc_calls import check
from vmsuper.shared.prctl import PR_SET_NO_NEW_PRIVS, prctl

__all__ = ["ALLOWED", "build_filter", "confine_thread"]

ALLOWED: Final = (
    "read",  # the bells' pipes
    "write",  # the bells' pipes, log records, the signal wake-up pipe, Waits to the plugin (pipes)
    "poll",  # a bell's sleep
    "ppoll",
    "futex",  # the GIL, locks, the Init barrier
    "sched_yield",  # a bell's polling
    "clock_gettime",
    "gettimeofday",
    "mmap",  # memory (never PROT_EXEC)
    "mprotect",
    "munmap",
    "mremap",
    "madvise",
    "brk",
    "rt_sigprocmask",
    "rt_sigreturn",  # the kick signal's handler
    "restart_syscall",
    "getpid",
    "gettid",
    "exit",  # the end of the thread
)
_PROT_EXEC: Final = 0x4
_SECCOMP_SET_MODE_FILTER: Final = 1
_libc = ctypes.CDLL(None, use_errno=True)


def build_filter(
    vcpu_fd: int,
    ioctls: Iterable[int],
    send_fd: int | None = None,
    wake_pidfd: int | None = None,
) -> bytes:
    """The filter of the runner of `vcpu_fd`: `ALLOWED`, `ioctl` on `vcpu_fd` with `KVM_RUN`
    or one of `ioctls`, `mmap`/`mprotect` without PROT_EXEC, `sendto` on `send_fd` only (its
    socket to the plugin, for the exits it serves), `pidfd_send_signal` of `abi.WAKE_SIGNAL`
    only, on `wake_pidfd` only (its worker), with no siginfo and no flags; anything else gets
    EPERM (and another architecture's entry points kill the process)."""
    nr = bpf.SYSCALLS
    eperm = bpf.SECCOMP_RET_ERRNO | errno.EPERM
    allow: bpf.Program = [bpf.ret(bpf.SECCOMP_RET_ALLOW)]
    verdicts: dict[int, bpf.Program] = {nr[name]: allow for name in ALLOWED}
    no_exec: bpf.Program = [
        bpf.load(bpf.offset_arg_low(2)),
        bpf.Insn(bpf.BPF_JSET_K, _PROT_EXEC, jt="refuse"),
        bpf.ret(bpf.SECCOMP_RET_ALLOW),
        "refuse",
        bpf.ret(eperm),
    ]
    verdicts[nr["mmap"]] = verdicts[nr["mprotect"]] = no_exec
    # fd and request are ints to the kernel: the low halves are the whole of them.
    verdicts[nr["ioctl"]] = [
        bpf.load(bpf.offset_arg_low(0)),
        bpf.Insn(bpf.BPF_JEQ_K, vcpu_fd, jf="refuse"),
        bpf.load(bpf.offset_arg_low(1)),
        *(
            bpf.Insn(bpf.BPF_JEQ_K, request, jt="allow")
            for request in sorted({kvm.KVM_RUN, *ioctls})
        ),
        "refuse",
        bpf.ret(eperm),
        "allow",
        bpf.ret(bpf.SECCOMP_RET_ALLOW),
    ]
    if send_fd is not None:
        verdicts[nr["sendto"]] = [
            bpf.load(bpf.offset_arg_low(0)),
            bpf.Insn(bpf.BPF_JEQ_K, send_fd, jt="allow"),
            bpf.ret(eperm),
            "allow",
            bpf.ret(bpf.SECCOMP_RET_ALLOW),
        ]
    if wake_pidfd is not None:
        # The pidfd and the signal are ints (their low halves are all of them); the siginfo
        # pointer and the flags must be zero whole.
        exact = (
            (bpf.offset_arg_low(0), wake_pidfd),
            (bpf.offset_arg_low(1), abi.WAKE_SIGNAL),
            (bpf.offset_arg_low(2), 0),
            (bpf.offset_arg_high(2), 0),
            (bpf.offset_arg_low(3), 0),
            (bpf.offset_arg_high(3), 0),
        )
        verdicts[nr["pidfd_send_signal"]] = [
            *(
                insn
                for offset, value in exact
                for insn in (bpf.load(offset), bpf.Insn(bpf.BPF_JEQ_K, value, jf="refuse"))
            ),
            bpf.ret(bpf.SECCOMP_RET_ALLOW),
            "refuse",
            bpf.ret(eperm),
        ]
    return bpf.build_filter(verdicts, [bpf.ret(eperm)], foreign=bpf.SECCOMP_RET_KILL_PROCESS)


def confine_thread(program: bytes) -> None:
    """Install `program` (from `build_filter`) on the calling thread only (with no_new_privs,
    also this thread's only, so an unprivileged supervisor may install it too)."""
    check(prctl(PR_SET_NO_NEW_PRIVS, 1), "PR_SET_NO_NEW_PRIVS")
    fprog, _buffer = bpf.fprog(program)
    installed = _libc.syscall(
        bpf.SYSCALLS["seccomp"], _SECCOMP_SET_MODE_FILTER, 0, ctypes.byref(fprog)
    )
    check(installed, "seccomp(SECCOMP_SET_MODE_FILTER)")
