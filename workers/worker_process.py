"""A VCPU worker's process: becoming one after fork, and ending with a status.

`enter_worker` runs in the freshly forked child: it keeps only the fds the worker needs,
leaves vmsuper's session, installs the worker's signal handling (`WorkerSignals`, which can be
taken back), opens the worker's own log, builds the engine and the worker, gives up what it
does not need (`confine`), serves, and ends with `os._exit(status)` (`worker_status`). The
reason is logged (error level, with details) and stored in the VCPU's shared slot before
exiting, where `describe_exit` finds it.
"""

from __future__ import annotations

import contextlib
import ctypes
import faulthandler
import gc
import os
import signal
import sys
import traceback
from pathlib import Path
from types import FrameType
from typing import Any, Final, NoReturn

from vmsuper.shared import hotpath, kvm, logs, task_names
from vmsuper.shared.prctl import PR_SET_PDEATHSIG, prctl
from vmsuper.shared.shm import SharedRegion
from vmsuper.shared.shm_doorbell import Doorbell
from vmsuper.workers import confine
from vmsuper.workers.exit_engine import ExitEngine
from vmsuper.workers.mailbox_calls import MailboxCalls
from vmsuper.workers.vcpu_channel import VcpuChannel
from vmsuper.workers.vcpu_worker import VcpuWorker
from vmsuper.workers.worker_status import WorkerStatus

__all__ = [
    "STOP_SIGNALS",
    "WorkerSignals",
    "WorkerSpec",
    "build_worker",
    "close_fds_except",
    "enter_worker",
]


class WorkerSpec:
    """Everything a forked worker needs, all inherited across fork."""

    __slots__ = (
        "channel_fds",
        "confinement",
        "doorbell",
        "log_level",
        "log_path",
        "mmap_size",
        "region",
        "vcpu",
        "vcpu_fd",
    )
    vcpu: int
    vcpu_fd: int
    mmap_size: int
    channel_fds: tuple[int, ...]
    """(socket,) or (request pipe read end, response pipe write end)."""
    doorbell: Doorbell
    region: SharedRegion
    log_path: Path
    log_level: str
    confinement: confine.Confinement
    """What the worker gives up before serving (`workers/confine.py`): always confined."""

    def __init__(
        self,
        vcpu: int,
        vcpu_fd: int,
        mmap_size: int,
        channel_fds: tuple[int, ...],
        doorbell: Doorbell,
        region: SharedRegion,
        log_path: Path,
        log_level: str,
        confinement: confine.Confinement | None = None,
    ) -> None:
        self.vcpu = vcpu
        self.vcpu_fd = vcpu_fd
        self.mmap_size = mmap_size
        self.channel_fds = channel_fds
        self.doorbell = doorbell
        self.region = region
        self.log_path = log_path
        self.log_level = log_level
        self.confinement = confine.Confinement() if confinement is None else confinement


def _raise_exit(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(0)


def _set_parent_death_signal(parent_pid: int) -> None:
    """Die with the supervisor: PR_SET_PDEATHSIG, then check the parent did not die first."""
    if prctl(PR_SET_PDEATHSIG, signal.SIGKILL) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != parent_pid:
        raise ProcessLookupError(f"the supervisor (pid {parent_pid}) is already gone")


def close_fds_except(keep: set[int]) -> None:
    """Close every fd of this process but `keep` (close_range between the kept ones)."""
    low = 0
    for fd in sorted(keep):
        if fd > low:
            os.closerange(low, fd)
        low = fd + 1
    os.closerange(low, _max_fd())


def _max_fd() -> int:
    import resource

    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard == resource.RLIM_INFINITY or hard > 1 << 20:
        return 1 << 20
    return int(hard)


STOP_SIGNALS: Final = frozenset((signal.SIGTERM, signal.SIGINT, signal.SIGHUP))
"""Blocked by the parent around `fork` and by the worker until it is set up: a SIGTERM in
that window would otherwise reach the supervisor's inherited handler (and be lost) or stop a
worker that has not opened its log yet."""


class WorkerSignals:
    """The signal handling a worker process installs, and takes back with `uninstall`.

    SIGTERM (the supervisor's stop) raises SystemExit; SIGINT is ignored and SIGCHLD, SIGHUP
    get their defaults. Signals also write to a wake-up pipe, so a wait in C that polls first
    still sees them, and `hotpath.watch_signal` puts a handler in front of Python's SIGTERM
    handler that notes the signal for the engine's channel reads.
    """

    __slots__ = ("_previous", "_previous_wakeup", "_wake_write", "_watched", "wake_read")

    def __init__(self) -> None:
        self.wake_read = -1
        self._previous: dict[int, Any] = {}
        self._wake_write = -1
        self._previous_wakeup = -1
        self._watched = False

    def install(self) -> None:
        for signum, handler in (
            (signal.SIGTERM, _raise_exit),
            (signal.SIGINT, signal.SIG_IGN),
            (signal.SIGCHLD, signal.SIG_DFL),
            (signal.SIGHUP, signal.SIG_DFL),
        ):
            self._previous[signum] = signal.signal(signum, handler)
        self.wake_read, self._wake_write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._previous_wakeup = signal.set_wakeup_fd(self._wake_write, warn_on_full_buffer=False)
        hotpath.watch_signal(signal.SIGTERM)
        self._watched = True

    def uninstall(self) -> None:
        """Put back what `install` found (the handlers, the wake-up fd) and close the pipe."""
        if self._watched:
            hotpath.unwatch_signal(signal.SIGTERM)
            self._watched = False
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()
        if self._wake_write >= 0:
            signal.set_wakeup_fd(self._previous_wakeup)
            os.close(self._wake_write)
            os.close(self.wake_read)
            self._wake_write = self.wake_read = -1


def build_worker(spec: WorkerSpec, log: Any, *, essential: Any = None) -> VcpuWorker:
    """The worker of a forked child: maps `kvm_run` from the inherited VCPU fd, and builds the
    engine over it (reporting every exit at debug level, which logs each one)."""
    # The mapping keeps a duplicate of the VCPU fd: the original is not needed any more.
    _mapping, run = kvm.map_run(spec.vcpu_fd, spec.mmap_size)
    os.close(spec.vcpu_fd)
    debug = spec.log_level.lower() == "debug"
    mailbox = spec.region.mailbox(spec.vcpu)
    slot = spec.region.slot(spec.vcpu)
    engine = ExitEngine(
        run_address=ctypes.addressof(run),
        run_size=spec.mmap_size,
        mailbox=mailbox,
        doorbell=spec.doorbell,
        slot=slot,
        reader=spec.region.reader(),
        channel=VcpuChannel(spec.channel_fds),
        range_counts=spec.region.range_counts(spec.vcpu),
        report_exits=debug,
    )
    return VcpuWorker(
        vcpu=spec.vcpu,
        engine=engine,
        calls=MailboxCalls(mailbox, spec.doorbell),
        slot=slot,
        run=run,
        log=log,
        essential=essential,
        debug=debug,
    )


def enter_worker(spec: WorkerSpec, *, parent_pid: int) -> NoReturn:
    """Become VCPU worker `spec.vcpu` in a freshly forked child (forked with `STOP_SIGNALS`
    blocked); never returns.

    Only what the worker needs survives: stdio, its VCPU fd (to map `kvm_run`), its channel
    end(s) and its doorbell's eventfds. The shared region is an anonymous shared mapping and
    needs no fd. Logging moves to the worker's own file. The worker leaves vmsuper's session
    and process group first: a terminal's Ctrl-C or hang-up, or a signal to vmsuper's process
    group (`timeout`), reaches the supervisor only, which stops the workers in order after
    the plugin's grace period. SIGTERM (the supervisor's) stops the worker cleanly.
    """
    status: int = WorkerStatus.SETUP_FAILED
    try:
        # The supervisor's wakeup fd and handlers must not fire here: their fds are about to go.
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGTERM, _raise_exit)
        os.setsid()
        _set_parent_death_signal(parent_pid)
        task_names.name_this_thread(task_names.worker_name(spec.vcpu))
        logs.close_logging()
        # Of the doorbell's pipes, the worker's ends only (the runner's are its runner's).
        keep = {0, 1, 2, spec.vcpu_fd, *spec.channel_fds, *spec.doorbell.worker_fds()}
        had_faulthandler = faulthandler.is_enabled()
        faulthandler.disable()
        close_fds_except(keep)
        spec.doorbell.leave_runner_ends()
        if had_faulthandler:
            faulthandler.enable(file=sys.__stderr__ or sys.stderr)
        # Objects inherited from the supervisor may own fds just closed; never let the cyclic
        # collector finalize them (it would close a number this process reuses).
        gc.freeze()
        signals = WorkerSignals()
        signals.install()
        spec.doorbell.wake_fd = signals.wake_read
        log = logs.configure_logging(spec.log_path, level=spec.log_level, vcpu=spec.vcpu)
        status = _run_worker(spec, log)
    except SystemExit:
        status = WorkerStatus.CLEAN
    except BaseException:
        with contextlib.suppress(BaseException):
            traceback.print_exc()
    finally:
        os._exit(status)


def _run_worker(spec: WorkerSpec, log: Any) -> int:
    worker = build_worker(spec, log, essential=logs.essential_logger())
    try:
        confined = confine.confine(spec.vcpu, spec.confinement, spec.region, worker.slot)
    except confine.ConfinementError as exc:
        log.error("stopped", reason=str(exc), status=int(WorkerStatus.SETUP_FAILED))
        worker.slot.stop(str(exc))
        return WorkerStatus.SETUP_FAILED
    log.info("worker_confined", uid=confined["uid"], gid=confined["gid"])
    if spec.confinement.misbehave is not None:
        confine.misbehave(spec.confinement.misbehave, spec.vcpu, spec.region, confined)
    status: int = WorkerStatus.UNEXPECTED
    try:
        # SIGTERM was blocked across fork and setup (see `STOP_SIGNALS`); one that came
        # meanwhile is delivered here, where it still leaves the final records.
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
        status = worker.serve()
    except SystemExit:
        status = WorkerStatus.CLEAN
        worker.stop_reason = "stopped by the supervisor (SIGTERM)"
        log.info("stopped", reason=worker.stop_reason, status=0)
        worker.slot.stop(worker.stop_reason)
    except BaseException as exc:
        status = WorkerStatus.UNEXPECTED
        worker.stop_reason = f"unexpected error: {exc!r}"
        log.error("stopped", reason=worker.stop_reason, status=int(status), exc_info=True)
        worker.slot.stop(worker.stop_reason)
    finally:
        # A second SIGTERM must not cut the last records short.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        with contextlib.suppress(Exception):
            worker.log_counts()
    return status
