"""A VCPU worker: the forked process that serves one VCPU's channel to the plugin.

It owns that VCPU's protocol state (`VcpuProtocol`), decodes exits from its own mapping of
the VCPU's `kvm_run` page, and keeps the VCPU's log (`vcpu-N.jsonl`). KVM refuses VCPU
ioctls from any process but the VM's creator, so every ioctl, `KVM_RUN` included, is posted
to the VCPU's mailbox in shared memory and executed by that VCPU's runner thread in the
supervisor (one doorbell ring each way).

The run loop, per `KVM_RUN` return: a real exit is handled first (an I/O exit must be
answered, and with `immediate_exit` set the next `KVM_RUN` completes that I/O in the kernel
before it returns `EINTR`, so a pause is never delivered while KVM still owes the guest the
result of an I/O it reported); only an `EINTR` return takes the pending pause token. The
runner sets `immediate_exit` before entering the guest whenever a pause is pending, so a
pause that arrives while the worker serves the plugin is delivered right after the next
Resume, exactly once.

The process ends with `os._exit(status)`: 0 for a clean stop (the plugin hung up or sent
Shutdown, or the supervisor sent SIGTERM), else one of `WorkerStatus`. The reason is logged
(error level, with details) and stored in the VCPU's shared slot before exiting, where
`describe_exit` finds it.
"""

from __future__ import annotations

import contextlib
import ctypes
import enum
import errno
import faulthandler
import gc
import os
import signal
import struct
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, Final, NoReturn, Protocol

from vmsuper.shared import hotpath, kvm, logs
from vmsuper.shared.abi import ExitKind, RunState
from vmsuper.shared.hotpath import WorkerResult
from vmsuper.shared.ranges import Space
from vmsuper.shared.shm import SharedRegion
from vmsuper.shared.shm_counts import RangeCounts
from vmsuper.shared.shm_doorbell import Doorbell, drain_wakeup_pipe
from vmsuper.shared.shm_layout import ShmError
from vmsuper.shared.shm_mailbox import OP_RUN, Mailbox
from vmsuper.shared.shm_slot import VcpuSlot
from vmsuper.shared.shm_table import TableReader
from vmsuper.workers import confine
from vmsuper.workers.fast_exits import FastExits
from vmsuper.workers.fault_report import regs_record, sregs_record
from vmsuper.workers.framing_check import PIPES_FIX, length_delimited_request
from vmsuper.workers.vcpu_channel import (
    MAX_REQUEST,
    Channel,
    ChannelFailed,
    HungUp,
    PipeChannel,
    Refused,
    SocketChannel,
)
from vmsuper.workers.vcpu_protocol import (
    CallFailed,
    Phase,
    PluginProtocolError,
    RangeSource,
    VcpuCalls,
    VcpuProtocol,
)

__all__ = [
    "STATUS_MEANINGS",
    "STOP_SIGNALS",
    "MailboxCalls",
    "RunnerCalls",
    "VcpuWorker",
    "WorkerSpec",
    "WorkerStatus",
    "close_fds_except",
    "describe_exit",
    "enter_worker",
    "hcall_result_offset",
]


class WorkerStatus(enum.IntEnum):
    """Exit statuses of a VCPU worker process."""

    CLEAN = 0
    """The plugin hung up or sent Shutdown, or the supervisor stopped the worker."""
    GUEST_SHUTDOWN = 10
    """The guest shut down (`KVM_EXIT_SHUTDOWN`, e.g. a triple fault)."""
    INTERNAL_ERROR = 11
    """KVM reported an internal error (`KVM_EXIT_INTERNAL_ERROR`, e.g. emulation failed)."""
    FAILED_ENTRY = 12
    """The hardware refused to enter the guest (`KVM_EXIT_FAIL_ENTRY`)."""
    HALTED = 13
    """The guest halted with no in-kernel irqchip to wake it (`KVM_EXIT_HLT`)."""
    PLUGIN_FAILURE = 14
    """The channel to the plugin failed or the plugin broke the protocol beyond an errno."""
    UNEXPECTED = 15
    """An unexpected exception in the worker (a bug; the traceback is in its log)."""
    UNHANDLED_EXIT = 16
    """The guest made an exit vmsuper does not handle."""
    RUN_FAILED = 17
    """`KVM_RUN` itself failed with an errno other than EINTR/EAGAIN."""
    SETUP_FAILED = 18
    """The worker could not set itself up after fork (or its supervisor was already gone)."""
    TRANSPORT_MISMATCH = 19
    """The plugin speaks the other VCPU transport than the config says."""


STATUS_MEANINGS: Final[dict[int, str]] = {
    WorkerStatus.CLEAN: "stopped cleanly",
    WorkerStatus.GUEST_SHUTDOWN: "guest shut down (triple fault)",
    WorkerStatus.INTERNAL_ERROR: "KVM internal error",
    WorkerStatus.FAILED_ENTRY: "guest entry failed",
    WorkerStatus.HALTED: "guest halted",
    WorkerStatus.PLUGIN_FAILURE: "plugin channel failure",
    WorkerStatus.UNEXPECTED: "unexpected error in the VCPU worker",
    WorkerStatus.UNHANDLED_EXIT: "unhandled exit",
    WorkerStatus.RUN_FAILED: "KVM_RUN failed",
    WorkerStatus.SETUP_FAILED: "VCPU worker setup failed",
    WorkerStatus.TRANSPORT_MISMATCH: "VCPU transport mismatch",
}


def describe_exit(vcpu: int, wait_status: int, stop_reason: str = "") -> str | None:
    """A sentence for a worker's wait status; None for a clean stop."""
    if os.WIFEXITED(wait_status):
        code = os.WEXITSTATUS(wait_status)
        if code == WorkerStatus.CLEAN:
            return None
        meaning = STATUS_MEANINGS.get(code, "unknown exit status")
        if stop_reason.startswith(meaning):
            meaning = stop_reason  # it already says what the status means, and more
        elif stop_reason:
            meaning = f"{meaning}: {stop_reason}"
        return f"VCPU {vcpu} worker exited with status {code} ({meaning})"
    if os.WIFSIGNALED(wait_status):
        number = os.WTERMSIG(wait_status)
        try:
            name = signal.Signals(number).name
        except ValueError:
            name = f"signal {number}"
        return f"VCPU {vcpu} worker was killed by signal {number} ({name})"
    return f"VCPU {vcpu} worker ended with wait status {wait_status:#x}"


# -- ioctls through the runner ----------------------------------------------------------------


class MailboxCalls:
    """`VcpuCalls` over the shared mailbox: the runner thread in the supervisor makes the call."""

    def __init__(self, mailbox: Mailbox, doorbell: Doorbell) -> None:
        self._mailbox = mailbox
        self._doorbell = doorbell

    def call(self, request: int, arg: bytes | bytearray) -> tuple[int, bytes]:
        mailbox = self._mailbox
        try:
            mailbox.post(request, arg)
        except ShmError as exc:  # more than the mailbox holds
            raise CallFailed(errno.E2BIG, request) from exc
        self._doorbell.ring_request()
        self._doorbell.wait_done()
        ret, err = mailbox.result()
        if err:
            raise CallFailed(err, request)
        return ret, mailbox.read_arg(len(arg))

    def run(self) -> int:
        """Enter the guest once; the errno of `KVM_RUN` (0: an exit to handle)."""
        self._mailbox.post(OP_RUN)
        self._doorbell.ring_request()
        self._doorbell.wait_done()
        return self._mailbox.result()[1]


# -- the worker -------------------------------------------------------------------------------


@dataclass
class WorkerSpec:
    """Everything a forked worker needs, all inherited across fork."""

    vcpu: int
    vcpu_fd: int
    mmap_size: int
    channel_fds: tuple[int, ...]
    """(socket,) or (request pipe read end, response pipe write end)."""
    doorbell: Doorbell
    region: SharedRegion
    log_path: Path
    log_level: str
    fast_exits: bool = True
    """Serve plain I/O and MMIO exits in C (`FastExits`); never at debug level, which logs
    every exit."""
    confinement: confine.Confinement = field(default_factory=confine.Confinement)
    """What the worker gives up before serving (`workers/confine.py`): always confined."""


class _Stop(Exception):
    """Ends the run loop with a status and a reason."""

    def __init__(self, status: WorkerStatus, reason: str, **details: Any) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.details = details


# Where the hot exits lie in the run page (struct kvm_run: exit_reason, then the exit union).
_EXIT_REASON: Final = struct.Struct("<I")
_EXIT_REASON_OFFSET: Final = kvm.kvm_run.exit_reason.offset
_IO: Final = struct.Struct("<BBHIQ")  # direction, size, port, count, data_offset
_IO_OFFSET: Final = kvm.kvm_run.exit.offset + kvm.kvm_run_exit.io.offset
_MMIO: Final = struct.Struct("<Q8xIB")  # phys_addr, (data), len, is_write
_MMIO_OFFSET: Final = kvm.kvm_run.exit.offset + kvm.kvm_run_exit.mmio.offset
assert _IO.size == ctypes.sizeof(kvm.kvm_run_io)
assert _MMIO.size == kvm.kvm_run_mmio.is_write.offset + 1


def hcall_result_offset(run: kvm.kvm_run) -> int:
    """Where `kvm_run.hyperv.u.hcall.result` lies in the page (the hypercall's answer)."""
    return (
        ctypes.addressof(run.hyperv.u.hcall)
        - ctypes.addressof(run)
        + kvm.kvm_hyperv_exit_hcall.result.offset
    )


def _hex(values: tuple[int, ...]) -> list[str]:
    return [f"{value:#x}" for value in values]


class RunnerCalls(VcpuCalls, Protocol):
    """What the worker asks of its runner: ioctls, and entering the guest."""

    def run(self) -> int:
        """Enter the guest once; the errno of `KVM_RUN` (0: an exit to handle)."""
        ...


class VcpuWorker:
    """The serving and run loops of one VCPU (the process setup is `enter_worker`).

    `page` is the VCPU's `kvm_run` mapping and `run` the struct view of it: exits are read
    from them and answers written into them.
    """

    def __init__(
        self,
        *,
        vcpu: int,
        channel: Channel,
        calls: RunnerCalls,
        slot: VcpuSlot,
        ranges: RangeSource,
        page: memoryview,
        run: kvm.kvm_run,
        log: Any,
        debug: bool = False,
        fast: FastExits | None = None,
        essential: Any = None,
        range_counts: RangeCounts | None = None,
        reader: TableReader | None = None,
    ) -> None:
        self.vcpu = vcpu
        self.channel = channel
        self.log = log
        self.essential = essential if essential is not None else log
        """Writes the records kept at every level (`logs.essential_logger`)."""
        self.slot = slot
        self.calls = calls
        self.protocol = VcpuProtocol(calls, ranges, log=log)
        self._debug = debug
        self._fast = fast
        self._live = range_counts
        self._reader = reader
        self._live_gen = -1
        self._run = run
        self._page = page
        self._mmio_data = kvm.mmio_data(run)
        offset = hcall_result_offset(run)
        self._hcall_result = page[offset : offset + 8]
        self.stop_status = WorkerStatus.CLEAN
        self.stop_reason = "not started"
        self.running_since: float | None = None
        """`time.monotonic()` when the VCPU first entered the guest."""

    @classmethod
    def from_spec(cls, spec: WorkerSpec, channel: Channel, log: Any) -> VcpuWorker:
        """The worker of a forked child: maps `kvm_run` from the inherited VCPU fd."""
        # The mapping keeps a duplicate of the VCPU fd: the original is not needed any more.
        mapping, run = kvm.map_run(spec.vcpu_fd, spec.mmap_size)
        os.close(spec.vcpu_fd)
        debug = spec.log_level.lower() == "debug"
        mailbox = spec.region.mailbox(spec.vcpu)
        slot = spec.region.slot(spec.vcpu)
        reader = spec.region.reader()
        range_counts = spec.region.range_counts(spec.vcpu)
        fast = None
        if spec.fast_exits and not debug:
            fast = FastExits(
                run_address=ctypes.addressof(run),
                run_size=spec.mmap_size,
                mailbox=mailbox,
                doorbell=spec.doorbell,
                slot=slot,
                reader=reader,
                channel=channel,
                range_counts=range_counts,
            )
        return cls(
            vcpu=spec.vcpu,
            channel=channel,
            calls=MailboxCalls(mailbox, spec.doorbell),
            slot=slot,
            ranges=reader,
            page=memoryview(mapping),
            run=run,
            log=log,
            debug=debug,
            fast=fast,
            essential=logs.essential_logger(),
            range_counts=range_counts,
            reader=reader,
        )

    def release(self) -> None:
        """Drop the worker's views into the run page (before its mapping is closed)."""
        self._mmio_data.release()
        self._hcall_result.release()

    def serve(self) -> WorkerStatus:
        """Serve the channel until the VCPU stops; the status to exit with."""
        log = self.log
        self.slot.begin_wait(RunState.INIT)
        log.info(
            "worker_started", transport=type(self.channel).__name__, fast_exits=bool(self._fast)
        )
        try:
            self._serve_until_resume()
            log.info("init_done")
            log.info("running")
            self.running_since = time.monotonic()
            if self._fast is not None:
                self._run_fast(self._fast)
            else:
                self._run_loop()
        except _Stop as stop:
            self._stopped(stop.status, stop.reason, **stop.details)
        except PluginProtocolError as exc:
            self._stopped(WorkerStatus.PLUGIN_FAILURE, str(exc))
        return self.stop_status

    def _stopped(self, status: WorkerStatus, reason: str, **details: Any) -> None:
        self.stop_status = status
        self.stop_reason = reason
        if status == WorkerStatus.CLEAN:
            self.log.info("stopped", reason=reason, status=int(status), **details)
        else:
            self.log.error("stopped", reason=reason, status=int(status), **details)
        self.slot.stop(reason)

    # -- serving the plugin ----------------------------------------------------------------

    def _send(self, data: bytes) -> None:
        try:
            self.channel.send(data)
        except HungUp as exc:
            raise _Stop(
                WorkerStatus.CLEAN, "the plugin closed the channel", error=str(exc)
            ) from exc
        except ChannelFailed as exc:
            raise _Stop(WorkerStatus.PLUGIN_FAILURE, str(exc)) from exc

    def _serve_until_resume(self, first: bytes | None = None) -> None:
        """Answer requests (`first`, if the C loop already read one, then the channel's)
        until the plugin resumes the VCPU (or the channel ends).

        The slot already says what the VCPU waits for (INIT, WAITING_PLUGIN or PAUSED: see
        `VcpuSlot.begin_wait`), and keeps saying it until the Resume; the watchdog and
        `vmsuper stats` read it."""
        protocol = self.protocol
        channel = self.channel
        slot = self.slot
        while True:
            if first is not None:
                data: bytes | None = first
                first = None
            else:
                try:
                    data = channel.receive()
                except Refused as refused:
                    self._send(
                        protocol.refuse_request(refused.data or b"", refused.code, refused.why)
                    )
                    continue
                except ChannelFailed as exc:
                    raise _Stop(WorkerStatus.PLUGIN_FAILURE, str(exc)) from exc
            if data is None:
                raise _Stop(WorkerStatus.CLEAN, "the plugin closed the channel")
            if protocol.phase is Phase.INIT:
                self._check_framing(data)
            answer = protocol.receive_request(data)
            if answer is not None:
                self._send(answer)
            phase = protocol.phase
            if phase is Phase.RUNNING:
                slot.resumed()
                return
            if phase is Phase.STOPPED:
                raise _Stop(WorkerStatus.CLEAN, "the plugin sent Shutdown")

    def _check_framing(self, data: bytes) -> None:
        """Stop with the fix when the first request is framed for the pipes transport while
        this channel is a socket (see `framing_check`)."""
        if not isinstance(self.channel, SocketChannel):
            return
        inner = length_delimited_request(data)
        if inner is None:
            return
        raise _Stop(
            WorkerStatus.TRANSPORT_MISMATCH,
            # The fix first: the shared slot keeps 127 bytes of this.
            f"plugin speaks the pipes VCPU transport: set {PIPES_FIX}"
            f" (length-delimited {inner} on VCPU {self.vcpu}'s socket)",
            request_bytes=len(data),
        )

    # -- running the guest -----------------------------------------------------------------

    def _run_loop(self) -> None:
        calls = self.calls
        handle = self._handle_exit
        while True:
            err = calls.run()
            if err == 0:
                handle()
            else:
                self._run_failed(err)

    def _run_failed(self, err: int) -> None:
        """`KVM_RUN` returned an errno: a pause (EINTR), a VCPU to enter again, or the end."""
        if err == errno.EINTR:
            self._run.immediate_exit = 0
            slot = self.slot
            token = slot.take_pause()
            if token is None:
                return  # a kick whose token an earlier exit already delivered
            slot.count(ExitKind.USER)
            if self._debug:
                self.log.debug("exit", kind="user", token=token)
            answer = self.protocol.pause(token)
            slot.begin_wait(RunState.PAUSED)
            self._send(answer)
            self._serve_until_resume()
        elif err != errno.EAGAIN:  # EAGAIN: an uninitialized VCPU woke up (INIT/SIPI)
            raise _Stop(
                WorkerStatus.RUN_FAILED,
                f"KVM_RUN failed: [Errno {err}] {os.strerror(err)}",
                errno=err,
            )

    def _run_fast(self, fast: FastExits) -> None:
        """The run loop with plain exits served in C; the rest is handled as in `_run_loop`."""
        protocol = self.protocol
        context = fast.context
        while True:
            result = fast.run(protocol)
            if result is WorkerResult.EXIT:
                self._handle_exit()
            elif result is WorkerResult.RUN_RESULT:
                self._run_failed(context.error)
            elif result is WorkerResult.INTERRUPTED:
                # The signal's handler runs before the next call (and may end the loop).
                hotpath.take_signal()
                drain_wakeup_pipe(context.wake_fd)
            elif result is WorkerResult.REQUEST:
                protocol.forwarded(fast.forwarded_area(self._page))
                self._serve_until_resume(fast.request())
            elif result is WorkerResult.REFUSED:
                protocol.forwarded(fast.forwarded_area(self._page))
                why = (
                    f"request came with {context.fds} fds"
                    if context.refusal == errno.EINVAL
                    else f"request larger than {MAX_REQUEST} bytes"
                )
                self._send(protocol.refuse_request(fast.request(), context.refusal, why))
                self._serve_until_resume()
            elif result is WorkerResult.HUNGUP:
                raise _Stop(WorkerStatus.CLEAN, "the plugin closed the channel")
            elif result is WorkerResult.TOO_LARGE:
                raise _Stop(
                    WorkerStatus.PLUGIN_FAILURE, f"request too large: over {MAX_REQUEST} bytes"
                )
            elif result is WorkerResult.FAILED:
                err = context.error
                raise _Stop(
                    WorkerStatus.PLUGIN_FAILURE,
                    f"channel I/O failed: [Errno {err}] {os.strerror(err)}",
                )
            else:
                err = context.error
                raise _Stop(
                    WorkerStatus.UNEXPECTED, f"doorbell failed: [Errno {err}] {os.strerror(err)}"
                )

    def _handle_exit(self) -> None:
        # I/O and MMIO exits are the hot path: read them straight from the page (one unpack)
        # rather than through `kvm.decode_exit`, which serves the rest.
        page = self._page
        protocol = self.protocol
        (reason,) = _EXIT_REASON.unpack_from(page, _EXIT_REASON_OFFSET)
        if reason == kvm.KVM_EXIT_IO:
            direction, size, port, count, start = _IO.unpack_from(page, _IO_OFFSET)
            is_write = direction == kvm.KVM_EXIT_IO_OUT
            data = page[start : start + size * count]
            answer = protocol.io_access(Space.IOPORT, port, is_write, data)
            self._count_access(answer, ExitKind.IO_OUT if is_write else ExitKind.IO_IN)
            if self._debug:
                self._answer_logged(
                    answer, data, kind="io", port=f"{port:#x}", size=size, count=count,
                    is_write=is_write,
                )  # fmt: skip
                return
        elif reason == kvm.KVM_EXIT_MMIO:
            address, length, write_flag = _MMIO.unpack_from(page, _MMIO_OFFSET)
            is_write = bool(write_flag)
            data = self._mmio_data[: min(length, 8)]
            answer = protocol.io_access(Space.MMIO, address, is_write, data)
            self._count_access(answer, ExitKind.MMIO_WRITE if is_write else ExitKind.MMIO_READ)
            if self._debug:
                self._answer_logged(
                    answer, data, kind="mmio", address=f"{address:#x}", length=length,
                    is_write=is_write,
                )  # fmt: skip
                return
        else:
            answer = self._handle_rare_exit()
        if answer is None:
            return
        if protocol.phase is Phase.SERVING:
            self.slot.begin_wait(RunState.WAITING_PLUGIN)
            self._send(answer)
            self._serve_until_resume()
        else:
            self._send(answer)

    def _answer_logged(self, answer: bytes | None, data: memoryview, **fields: Any) -> None:
        """At debug level: deliver the exit, wait for the plugin's Resume, then log the exit.

        The record has the exit's data (what the guest wrote, or the value the plugin gave a
        read) and ``response_us``, the time from delivering the exit to the plugin's Resume
        (None for an exit not forwarded, or an async write, which has no Resume).
        """
        response_us: float | None = None
        resumed = False
        try:
            if answer is not None:
                started = time.perf_counter_ns()
                serving = self.protocol.phase is Phase.SERVING
                if serving:
                    self.slot.begin_wait(RunState.WAITING_PLUGIN)
                self._send(answer)
                if serving:
                    self._serve_until_resume()
                    response_us = round((time.perf_counter_ns() - started) / 1000, 1)
                resumed = True
        finally:
            if answer is not None and not resumed:
                fields["resumed"] = False
            self.log.debug(
                "exit",
                **fields,
                forwarded=answer is not None,
                data=bytes(data).hex(),
                response_us=response_us,
            )

    def _handle_rare_exit(self) -> bytes:
        exit_ = kvm.decode_exit(self._run)
        kind = type(exit_)
        protocol = self.protocol
        if kind is kvm.HypervHcallExit:
            assert isinstance(exit_, kvm.HypervHcallExit)
            self.slot.count(ExitKind.HYPERV)
            answer = protocol.hyperv_call(
                exit_.input, exit_.params0, exit_.params1, self._hcall_result
            )
            if self._debug:
                self.log.debug("exit", kind="hyperv_call", input=exit_.input)
        elif kind is kvm.HypervSynicExit:
            assert isinstance(exit_, kvm.HypervSynicExit)
            self.slot.count(ExitKind.HYPERV)
            answer = protocol.hyperv_synic(exit_.msr, exit_.control, exit_.evt_page, exit_.msg_page)
            if self._debug:
                self.log.debug("exit", kind="hyperv_synic", msr=f"{exit_.msr:#x}")
        else:
            self.slot.count(ExitKind.OTHER)
            raise self._fatal_exit(exit_)
        return answer

    def _count_access(self, answer: bytes | None, forwarded: ExitKind) -> None:
        if answer is None:
            self.slot.count(ExitKind.UNRESERVED)
            return
        if self.protocol.phase is Phase.RUNNING:
            self.slot.count(ExitKind.ASYNC_WRITE)
        else:
            self.slot.count(forwarded)
        live, rng = self._live, self.protocol.last_range
        if live is not None and rng is not None:
            reader = self._reader
            if self._fast is None and reader is not None and reader.gen != self._live_gen:
                # Without the C loop, nothing else lays out the live counters for a new table.
                self._live_gen = reader.gen
                live.describe(list(reader.snapshot().ranges()))
            live.add(rng)

    def _fatal_exit(self, exit_: kvm.Exit) -> _Stop:
        rip, state = self._registers()
        if isinstance(exit_, kvm.ShutdownExit):
            return _Stop(
                WorkerStatus.GUEST_SHUTDOWN, "guest shut down (triple fault)", rip=rip, **state
            )
        if isinstance(exit_, kvm.HltExit):
            return _Stop(
                WorkerStatus.HALTED, "guest halted (no in-kernel irqchip)", rip=rip, **state
            )
        if isinstance(exit_, kvm.InternalErrorExit):
            instruction = exit_.insn_bytes.hex(" ")
            reason = f"KVM internal error: {exit_.name} (suberror {exit_.suberror})"
            reason += f" at rip {rip}" if rip is not None else ""
            if instruction:  # KVM's fetch window: up to 15 bytes, the first 8 say enough here
                more = " ..." if len(exit_.insn_bytes) > 8 else ""
                reason += f", instruction bytes {exit_.insn_bytes[:8].hex(' ')}{more}"
            return _Stop(
                WorkerStatus.INTERNAL_ERROR,
                reason,
                suberror=exit_.suberror,
                suberror_name=exit_.name,
                data=_hex(exit_.data),
                insn_bytes=instruction or None,
                rip=rip,
                **state,
            )
        if isinstance(exit_, kvm.FailEntryExit):
            reason = f"guest entry failed, hardware reason {exit_.reason:#x}"
            named = kvm.entry_failure_name(exit_.reason)
            reason += f" ({named})" if named else ""
            reason += f" at rip {rip}" if rip is not None else ""
            return _Stop(
                WorkerStatus.FAILED_ENTRY,
                reason,
                hardware_reason=f"{exit_.reason:#x}",
                cpu=exit_.cpu,
                rip=rip,
                **state,
            )
        exit_reason = exit_.reason if isinstance(exit_, kvm.OtherExit) else -1
        return _Stop(
            WorkerStatus.UNHANDLED_EXIT,
            f"unhandled exit reason {exit_reason}",
            exit_reason=exit_reason,
            rip=rip,
            **state,
        )

    def _registers(self) -> tuple[str | None, dict[str, Any]]:
        """The guest's RIP (None if it cannot be read) and its registers, for the stop record."""
        state: dict[str, Any] = {}
        rip = None
        try:
            _, raw = self.calls.call(kvm.KVM_GET_REGS, bytes(ctypes.sizeof(kvm.kvm_regs)))
        except CallFailed:
            pass
        else:
            regs = kvm.kvm_regs.from_buffer_copy(raw)
            rip = f"{regs.rip:#x}"
            state["regs"] = regs_record(regs)
        try:
            _, raw = self.calls.call(kvm.KVM_GET_SREGS, bytes(ctypes.sizeof(kvm.kvm_sregs)))
        except CallFailed:
            pass
        else:
            state["sregs"] = sregs_record(kvm.kvm_sregs.from_buffer_copy(raw))
        return rip, state

    def log_counts(self) -> None:
        """The one record `vmsuper logs --summary` reads: exits by kind and by range, and
        ``run_seconds``, how long the VCPU ran (None if it never entered the guest).

        Written at every log level (`essential`)."""
        if self._fast is not None:
            self._fast.collect(self.protocol)
        since = self.running_since
        self.essential.info(
            "vcpu_exit_counts",
            vcpu=self.vcpu,
            exits=self.slot.counters(),
            ranges=self.protocol.range_count_labels(),
            run_seconds=None if since is None else round(time.monotonic() - since, 6),
        )


# -- the process ------------------------------------------------------------------------------


def _raise_exit(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(0)


def _set_parent_death_signal(parent_pid: int) -> None:
    """Die with the supervisor: PR_SET_PDEATHSIG, then check the parent did not die first."""
    libc = ctypes.CDLL(None, use_errno=True)
    pr_set_pdeathsig = 1
    if libc.prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0) != 0:
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
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        signal.signal(signal.SIGHUP, signal.SIG_DFL)
        os.setsid()
        _set_parent_death_signal(parent_pid)
        logs.close_logging()
        keep = {0, 1, 2, spec.vcpu_fd, *spec.channel_fds, *spec.doorbell.fds()}
        had_faulthandler = faulthandler.is_enabled()
        faulthandler.disable()
        close_fds_except(keep)
        if had_faulthandler:
            faulthandler.enable(file=sys.__stderr__ or sys.stderr)
        # Objects inherited from the supervisor may own fds just closed; never let the cyclic
        # collector finalize them (it would close a number this process reuses).
        gc.freeze()
        # Signals also write to this pipe, so a wait in C that polls first still sees them.
        wake_read, wake_write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(wake_write, warn_on_full_buffer=False)
        spec.doorbell.wake_fd = wake_read
        hotpath.watch_signal(signal.SIGTERM)
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
    channel: Channel
    if len(spec.channel_fds) == 1:
        channel = SocketChannel(spec.channel_fds[0])
    else:
        channel = PipeChannel(spec.channel_fds[0], spec.channel_fds[1])
    worker = VcpuWorker.from_spec(spec, channel, log)
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
