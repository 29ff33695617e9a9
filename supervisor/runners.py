"""Runner threads: the supervisor-side hands of the VCPU workers.

KVM accepts VCPU ioctls only from the process that created the VM, so each VCPU has a thread
here that waits on its doorbell, executes the one ioctl its worker posted in the shared
mailbox, stores the result and rings back. The ioctl goes through ctypes, which releases the
GIL, so runners sit in `KVM_RUN` concurrently; between ioctls a runner holds the GIL for a
few lines only.

A runner executes only an allowlist of VCPU ioctls and checks that the argument the kernel
will read or write lies inside the mailbox: a worker cannot make it do anything else.

Kicks: `kick()` sends `KICK_SIGNAL` to the runner thread. Its Python handler does nothing;
what matters is that the signal interrupts the thread's `KVM_RUN` (which returns EINTR and is
not restarted). A kick that lands just before the thread enters the guest is covered by
`kvm_run.immediate_exit`, which `VcpuSet.pause` sets before kicking and the runner sets
itself whenever a pause is pending.
"""

from __future__ import annotations

import ctypes
import errno
import os
import signal
import struct
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any, Final

from vmsuper.shared import hotpath, kvm, task_names
from vmsuper.shared.abi import MAILBOX_ARG_SIZE
from vmsuper.shared.shm_counts import RangeCounts
from vmsuper.shared.shm_doorbell import Doorbell
from vmsuper.shared.shm_mailbox import Mailbox
from vmsuper.shared.shm_slot import VcpuSlot
from vmsuper.supervisor import runner_seccomp

__all__ = [
    "ALLOWED_IOCTLS",
    "KICK_SIGNAL",
    "RUNNER_BLOCKED",
    "RunnerExits",
    "VcpuRunner",
    "check_argument",
    "install_kick_handler",
    "uninstall_kick_handler",
]

KICK_SIGNAL: Final = signal.SIGUSR1
"""Interrupts a runner's `KVM_RUN`. SIGUSR1 rather than a realtime signal: kicks need not
queue (one pending kick is as good as ten), and a standard signal cannot pile up against
RLIMIT_SIGPENDING when a plugin pauses thousands of times."""

_FIXED_SIZE: Final[dict[int, int]] = {
    kvm.KVM_GET_REGS: ctypes.sizeof(kvm.kvm_regs),
    kvm.KVM_SET_REGS: ctypes.sizeof(kvm.kvm_regs),
    kvm.KVM_GET_SREGS: ctypes.sizeof(kvm.kvm_sregs),
    kvm.KVM_SET_SREGS: ctypes.sizeof(kvm.kvm_sregs),
    kvm.KVM_GET_FPU: ctypes.sizeof(kvm.kvm_fpu),
    kvm.KVM_SET_FPU: ctypes.sizeof(kvm.kvm_fpu),
    kvm.KVM_GET_DEBUGREGS: ctypes.sizeof(kvm.kvm_debugregs),
    kvm.KVM_SET_DEBUGREGS: ctypes.sizeof(kvm.kvm_debugregs),
    kvm.KVM_GET_LAPIC: ctypes.sizeof(kvm.kvm_lapic_state),
    kvm.KVM_SET_LAPIC: ctypes.sizeof(kvm.kvm_lapic_state),
    kvm.KVM_GET_MP_STATE: ctypes.sizeof(kvm.kvm_mp_state),
    kvm.KVM_SET_MP_STATE: ctypes.sizeof(kvm.kvm_mp_state),
    kvm.KVM_GET_XCRS: ctypes.sizeof(kvm.kvm_xcrs),
    kvm.KVM_SET_XCRS: ctypes.sizeof(kvm.kvm_xcrs),
    kvm.KVM_GET_VCPU_EVENTS: ctypes.sizeof(kvm.kvm_vcpu_events),
    kvm.KVM_SET_VCPU_EVENTS: ctypes.sizeof(kvm.kvm_vcpu_events),
    kvm.KVM_ENABLE_CAP: ctypes.sizeof(kvm.kvm_enable_cap),
}
"""Ioctls whose argument is one fixed-size struct: the posted argument must be exactly it."""

_COUNTED: Final[dict[int, int]] = {
    kvm.KVM_GET_MSRS: ctypes.sizeof(kvm.kvm_msr_entry),
    kvm.KVM_SET_MSRS: ctypes.sizeof(kvm.kvm_msr_entry),
    kvm.KVM_SET_CPUID2: ctypes.sizeof(kvm.kvm_cpuid_entry2),
    kvm.KVM_GET_SUPPORTED_HV_CPUID: ctypes.sizeof(kvm.kvm_cpuid_entry2),
}
"""Ioctls whose argument is a 32-bit count, 4 bytes of padding, then count entries of this
size: the kernel trusts the count, so the entries must fit in what was posted."""

_COUNT: Final = struct.Struct("<I")
_HEADER_SIZE: Final = 8

ALLOWED_IOCTLS: Final = frozenset((*_FIXED_SIZE, *_COUNTED))
"""Every ioctl a worker may ask for besides KVM_RUN."""


def check_argument(op: int, arg: bytes | bytearray | memoryview, length: int) -> int:
    """0 if ioctl `op` may run with the posted argument (`length` bytes of `arg`), else the
    errno of the refusal: EPERM for an ioctl off the allowlist, EINVAL for an argument that
    does not match the ioctl's struct (or whose entries would overrun what was posted)."""
    size = _FIXED_SIZE.get(op)
    if size is not None:
        return 0 if length == size else errno.EINVAL  # never beyond the mailbox: all are small
    entry = _COUNTED.get(op)
    if entry is None:
        return errno.EPERM
    if not _HEADER_SIZE <= length <= MAILBOX_ARG_SIZE:
        return errno.EINVAL
    (count,) = _COUNT.unpack_from(arg, 0)
    return 0 if _HEADER_SIZE + count * entry <= length else errno.EINVAL


_SYNCHRONOUS: Final = frozenset(
    (
        signal.SIGSEGV,
        signal.SIGBUS,
        signal.SIGFPE,
        signal.SIGILL,
        signal.SIGTRAP,
        signal.SIGABRT,
        signal.SIGSYS,
    )
)
RUNNER_BLOCKED: Final = frozenset(signal.valid_signals() - {KICK_SIGNAL} - _SYNCHRONOUS)
"""Signals a runner thread blocks: process-directed ones (SIGCHLD, SIGTERM...) then go to
the main thread, whose event loop handles them, instead of interrupting a `KVM_RUN` for
nothing. Only the kick (and faults, which cannot be deferred) reach a runner."""


def _on_kick(signum: int, frame: object) -> None:
    """Nothing to do: the signal's job was to interrupt a runner's ioctl."""


def install_kick_handler() -> signal.Handlers | Callable[[int, FrameType | None], Any] | int | None:
    """Give KICK_SIGNAL a no-op Python handler (main thread only): with the default action the
    signal would kill the process, and with SIG_IGN it would not interrupt `KVM_RUN`. Returns
    the handler it replaced, for `uninstall_kick_handler`."""
    return signal.signal(KICK_SIGNAL, _on_kick)


def uninstall_kick_handler(
    previous: signal.Handlers | Callable[[int, FrameType | None], Any] | int | None,
) -> None:
    """Put back the handler `install_kick_handler` replaced (main thread only), unless
    someone installed another one since."""
    if signal.getsignal(KICK_SIGNAL) is _on_kick:
        signal.signal(KICK_SIGNAL, signal.SIG_DFL if previous is None else previous)


class RunnerExits:
    """What a runner needs to serve exits itself (see `hotpath.c`, "exits the runner serves
    without the worker"): its VCPU's range counts (the worker's lookup table), the table's
    generation, and its own fd to write to the plugin without blocking (`send_fd`, owned by
    the caller; on the pipes transport, `pipes`), and the worker's pidfd (`worker_pidfd`,
    owned by the caller), through which the runner wakes a worker that sleeps in the read of
    the plugin's channel while the runner may serve its exit. Immutable."""

    __slots__ = (
        "pipes",
        "range_counts",
        "run_size",
        "send_fd",
        "table_gen_address",
        "worker_pidfd",
    )
    range_counts: Final[RangeCounts]
    table_gen_address: Final[int]
    send_fd: Final[int]
    pipes: Final[bool]
    run_size: Final[int]
    """Bytes of the VCPU's mapping (the run page and what follows it)."""
    worker_pidfd: Final[int]

    def __init__(
        self,
        range_counts: RangeCounts,
        table_gen_address: int,
        send_fd: int,
        pipes: bool,
        run_size: int,
        worker_pidfd: int,
    ) -> None:
        self.range_counts = range_counts
        self.table_gen_address = table_gen_address
        self.send_fd = send_fd
        self.pipes = pipes
        self.run_size = run_size
        self.worker_pidfd = worker_pidfd

    def context_fields(self, slot: VcpuSlot) -> dict[str, Any]:
        return {
            "forwarding": 1,
            "run_size": self.run_size,
            "table_gen": self.table_gen_address,
            "range_head": self.range_counts.head_address(),
            "ranges": self.range_counts.ranges_address(),
            "range_counts": self.range_counts.counts_address(),
            "max_ranges": self.range_counts.max_ranges,
            "counters": slot.cell_address("counters"),
            "run_state": slot.cell_address("run_state"),
            "stats": slot.cell_address("stats"),
            "served": slot.cell_address("runner_served"),
            "pipes": int(self.pipes),
            "out_fd": self.send_fd,
            "wake_pidfd": self.worker_pidfd,
        }


class VcpuRunner:
    """The thread that makes one VCPU's ioctls for its worker."""

    def __init__(
        self,
        *,
        vcpu: int,
        vcpu_fd: int,
        run: kvm.kvm_run,
        mailbox: Mailbox,
        doorbell: Doorbell,
        slot: VcpuSlot,
        barrier: threading.Barrier,
        log: Any,
        exits: RunnerExits | None = None,
        failed_fd: int | None = None,
    ) -> None:
        """`failed_fd`: an eventfd the thread adds 1 to if it fails (see `failure`)."""
        self.vcpu = vcpu
        self._fd = vcpu_fd
        self._run = run
        self._mailbox = mailbox
        self._doorbell = doorbell
        self._slot = slot
        self._barrier = barrier
        self._log = log
        self._exits = exits
        self._failed_fd = failed_fd
        self.failure: str | None = None
        """Why the thread ended early; set before `failed_fd` is signalled."""
        self.stopping = False
        self._alive = False
        self._alive_lock = threading.Lock()
        request_fd, done_fd = doorbell.runner_fds()
        self._context = hotpath.RunnerContext(
            vcpu_fd=vcpu_fd,
            run=ctypes.addressof(run),
            mail=mailbox.head_address(),
            request_fd=request_fd,
            done_fd=done_fd,
            request_seen=ctypes.addressof(doorbell.request_seen),
            pause_seq=slot.cell_address("pause_seq"),
            delivered_seq=slot.cell_address("delivered_seq"),
            hold_runs=1,
            stopping=0,
            **(exits.context_fields(slot) if exits is not None else {"wake_pidfd": -1}),
        )
        self._thread = threading.Thread(target=self._main, name=f"vcpu{vcpu}-runner", daemon=True)

    def start(self) -> None:
        self._alive = True
        self._thread.start()

    @property
    def alive(self) -> bool:
        """True from `start` until the thread has left its loop."""
        return self._alive

    def kick(self) -> None:
        """Interrupt the thread's `KVM_RUN`, if the thread still runs."""
        with self._alive_lock:
            ident = self._thread.ident
            if self._alive and ident is not None:
                signal.pthread_kill(ident, KICK_SIGNAL)

    def stop(self) -> None:
        """Make the thread leave its loop at its next wake-up (the caller also rings and kicks;
        see `VcpuSet.shutdown`)."""
        self.stopping = True
        self._context.stopping = 1
        self._run.immediate_exit = 1

    def join(self, timeout: float) -> bool:
        """Wait for the thread to end; True if it did (or never started)."""
        if self._thread.ident is None:
            return True
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def _main(self) -> None:
        signal.pthread_sigmask(signal.SIG_BLOCK, RUNNER_BLOCKED)
        task_names.name_this_thread(task_names.runner_name(self.vcpu))
        try:
            exits = self._exits
            runner_seccomp.confine_thread(
                runner_seccomp.build_filter(
                    self._fd,
                    ALLOWED_IOCTLS,
                    send_fd=exits.send_fd if exits else None,
                    wake_pidfd=exits.worker_pidfd if exits else None,
                )
            )
            self._loop()
        except Exception as exc:
            self._failed(exc)
        finally:
            with self._alive_lock:
                self._alive = False

    def _loop(self) -> None:
        """KVM_RUN requests are served in C (`vms_runner_loop`) without the GIL, the
        `immediate_exit` re-arm included; Python makes the other ioctls and the first run
        (after the Init barrier), and decides when to stop."""
        context = self._context
        runner_loop = hotpath.library.vms_runner_loop
        mailbox = self._mailbox
        doorbell = self._doorbell
        while True:
            result = runner_loop(context)
            if self.stopping or result == hotpath.RunnerResult.STOP:
                return
            if result == hotpath.RunnerResult.INTERRUPTED:
                continue  # a kick while idle
            if result == hotpath.RunnerResult.FAILED:
                raise OSError(context.error, f"runner bell failed: {os.strerror(context.error)}")
            op, length = mailbox.request()
            if result == hotpath.RunnerResult.HELD_RUN:
                if not self._pass_barrier():
                    return
                context.hold_runs = 0
                continue  # the held run is made by the C loop, now that runs are not held
            ret, err = self._call(op, length)
            mailbox.complete(ret, err)
            doorbell.ring_done()  # the worker waits in Python for a call: never in a read

    def _pass_barrier(self) -> bool:
        """No VCPU enters the guest before every VCPU has finished its Init; False: stop."""
        try:
            self._barrier.wait()
        except threading.BrokenBarrierError:
            return False
        return not self.stopping

    def _failed(self, exc: Exception) -> None:
        """Tell the supervisor, which ends the run: the worker's next request would never be
        served. The request it may be waiting on now gets EIO, so that it stops too."""
        self._log.error("runner_failed", vcpu=self.vcpu, error=repr(exc), exc_info=True)
        self.failure = repr(exc)
        if self._failed_fd is not None:
            try:
                os.eventfd_write(self._failed_fd, 1)
            except OSError as again:
                self._log.error("runner_failed", vcpu=self.vcpu, error=repr(again))
        try:
            self._mailbox.complete(-1, errno.EIO)
            # The worker may be asleep in the read of its plugin's channel.
            self._doorbell.ring_done(self._exits.worker_pidfd if self._exits else -1)
        except Exception as again:
            self._log.error("runner_failed", vcpu=self.vcpu, error=repr(again))

    def _call(self, op: int, length: int) -> tuple[int, int]:
        refusal = check_argument(op, self._mailbox.read_arg(min(length, _HEADER_SIZE)), length)
        if refusal:
            self._log.warning(
                "ioctl_refused", vcpu=self.vcpu, ioctl=kvm.ioctl_name(op), length=length
            )
            return -1, refusal
        try:
            return kvm.ioctl(self._fd, op, self._mailbox.arg_address()), 0
        except kvm.KvmError as exc:
            return -1, exc.errno or errno.EIO
