"""A VCPU worker: the event dispatch of the forked process that serves one VCPU's channel.

The per-exit work is the engine's (`exit_engine`, over `hotpath.vms_worker_loop`): it runs the
guest, decodes every I/O and MMIO exit, looks up its range, counts it, and answers everything
plain itself. This loop takes what the engine hands back — a decoded event, or a rare exit —
asks the protocol state machine (`VcpuProtocol`, sans-I/O) what to do, and carries out its
actions: ioctls through the runner (`MailboxCalls`), messages on the channel, the answer into
the run page. It also keeps the VCPU's log (`vcpu-N.jsonl`).

Per `KVM_RUN` return: a real exit is handled first (an I/O exit must be answered, and with
`immediate_exit` set the next `KVM_RUN` completes that I/O in the kernel before it returns
`EINTR`, so a pause is never delivered while KVM still owes the guest the result of an I/O it
reported); only an `EINTR` return takes the pending pause token. The runner sets
`immediate_exit` before entering the guest whenever a pause is pending, so a pause that
arrives while the worker serves the plugin is delivered right after the next Resume, exactly
once.

How the process starts and ends is `worker_process`; its exit statuses are `worker_status`.
"""

from __future__ import annotations

import ctypes
import errno
import os
import time
from typing import Any

from vmsuper.shared import hotpath, kvm
from vmsuper.shared.abi import ExitKind, RunState
from vmsuper.shared.hotpath import Delivered, WorkerResult
from vmsuper.shared.ranges import Space
from vmsuper.shared.shm_doorbell import drain_wakeup_pipe
from vmsuper.shared.shm_slot import VcpuSlot
from vmsuper.workers.exit_engine import ExitEngine
from vmsuper.workers.fault_report import regs_record, sregs_record
from vmsuper.workers.framing_check import PIPES_FIX, length_delimited_request
from vmsuper.workers.mailbox_calls import MailboxCalls
from vmsuper.workers.vcpu_channel import (
    ChannelFailed,
    HungUp,
    Refused,
    VcpuChannel,
    channel_error,
)
from vmsuper.workers.vcpu_protocol import (
    Answer,
    CallFailed,
    Phase,
    PluginProtocolError,
    Resume,
    Steps,
    VcpuProtocol,
    carry_out,
)
from vmsuper.workers.worker_status import WorkerStatus

__all__ = ["Stop", "VcpuWorker", "hcall_result_offset"]


class Stop(Exception):
    """Ends the run loop with a status and a reason."""

    def __init__(self, status: WorkerStatus, reason: str, **details: Any) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.details = details


def hcall_result_offset(run: kvm.kvm_run) -> int:
    """Where `kvm_run.hyperv.u.hcall.result` lies in the page (the hypercall's answer)."""
    return (
        ctypes.addressof(run.hyperv.u.hcall)
        - ctypes.addressof(run)
        + kvm.kvm_hyperv_exit_hcall.result.offset
    )


def _hex(values: tuple[int, ...]) -> list[str]:
    return [f"{value:#x}" for value in values]


class VcpuWorker:
    """The event loop of one VCPU (the process setup is `worker_process.enter_worker`).

    `run` is the struct view of the VCPU's `kvm_run` mapping: rare exits are decoded from it
    and a hypercall's answer written into it; the engine does the rest of the page.
    """

    def __init__(
        self,
        *,
        vcpu: int,
        engine: ExitEngine,
        calls: MailboxCalls,
        slot: VcpuSlot,
        run: kvm.kvm_run,
        log: Any,
        essential: Any = None,
        debug: bool = False,
    ) -> None:
        self.vcpu = vcpu
        self.engine = engine
        self.channel: VcpuChannel = engine.channel
        self.log = log
        self.essential = essential if essential is not None else log
        """Writes the records kept at every level (`logs.essential_logger`)."""
        self.slot = slot
        self.calls = calls
        self.protocol = VcpuProtocol(log=log)
        self._debug = debug
        self._run = run
        self._hcall_result = ctypes.addressof(run) + hcall_result_offset(run)
        self.stop_status = WorkerStatus.CLEAN
        self.stop_reason = "not started"
        self.running_since: float | None = None
        """`time.monotonic()` when the VCPU first entered the guest."""

    def serve(self) -> WorkerStatus:
        """Serve the channel until the VCPU stops; the status to exit with."""
        log = self.log
        self.engine.begin_wait(RunState.INIT)
        log.info("worker_started", transport=self.channel.transport)
        try:
            self._serve_until_resume()
            log.info("init_done")
            log.info("running")
            self.running_since = time.monotonic()
            self._run_loop()
        except Stop as stop:
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

    # -- carrying out the protocol's actions -------------------------------------------------

    def _send(self, data: bytes) -> None:
        try:
            self.channel.send(data)
        except HungUp as exc:
            raise Stop(WorkerStatus.CLEAN, "the plugin closed the channel", error=str(exc)) from exc
        except ChannelFailed as exc:
            raise Stop(WorkerStatus.PLUGIN_FAILURE, str(exc)) from exc

    def _perform(self, steps: Steps) -> None:
        """Carry out a protocol input's actions, in order, feeding each Call's result back."""
        carry_out(steps, self.calls.call, self._send, self._resume)

    def _resume(self, action: Resume) -> None:
        engine = self.engine
        if action.answer is Answer.ACCESS:
            engine.finish_access(action.data)
            return
        if action.answer is Answer.HCALL_RESULT:
            data = action.data[:8].ljust(8, b"\0")
            ctypes.memmove(self._hcall_result, data, 8)
        engine.resumed()

    # -- serving the plugin ----------------------------------------------------------------

    def _serve_until_resume(self, first: bytes | None = None) -> None:
        """Answer requests (`first`, if the engine already read one, then the channel's)
        until the plugin resumes the VCPU (or the channel ends).

        The slot already says what the VCPU waits for (INIT, WAITING_PLUGIN or PAUSED), and
        keeps saying it until the Resume; the watchdog and `vmsuper stats` read it."""
        protocol = self.protocol
        channel = self.channel
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
                    raise Stop(WorkerStatus.PLUGIN_FAILURE, str(exc)) from exc
            if data is None:
                raise Stop(WorkerStatus.CLEAN, "the plugin closed the channel")
            if protocol.phase is Phase.INIT:
                self._check_framing(data)
            self._perform(protocol.receive_request(data))
            phase = protocol.phase
            if phase is Phase.RUNNING:
                return
            if phase is Phase.STOPPED:
                raise Stop(WorkerStatus.CLEAN, "the plugin sent Shutdown")

    def _check_framing(self, data: bytes) -> None:
        """Stop with the fix when the first request is framed for the pipes transport while
        this channel is a socket (see `framing_check`)."""
        if self.channel.pipes:
            return
        inner = length_delimited_request(data)
        if inner is None:
            return
        raise Stop(
            WorkerStatus.TRANSPORT_MISMATCH,
            # The fix first: the shared slot keeps 127 bytes of this.
            f"plugin speaks the pipes VCPU transport: set {PIPES_FIX}"
            f" (length-delimited {inner} on VCPU {self.vcpu}'s socket)",
            request_bytes=len(data),
        )

    # -- the engine's events -----------------------------------------------------------------

    def _run_loop(self) -> None:
        """The one run loop: the engine serves what it can; each result it returns is an event
        handled here, then the engine goes on."""
        engine = self.engine
        context = engine.context
        protocol = self.protocol
        while True:
            result = engine.run()
            if result is WorkerResult.DONE:
                self._log_access()
            elif result is WorkerResult.TABLE:
                continue  # the engine now has the new table; it handles the exit next
            elif result is WorkerResult.EXIT:
                self._rare_exit()
            elif result is WorkerResult.RUN_RESULT:
                self._run_failed(int(context.error))
            elif result is WorkerResult.INTERRUPTED:
                # The signal's handler runs before the next call (and may end the loop).
                hotpath.take_signal()
                drain_wakeup_pipe(int(context.wake_fd))
            elif result is WorkerResult.HINTED:
                self._hinted_access()
            elif result is WorkerResult.REQUEST:
                protocol.access_forwarded()
                self._serve_access(self.channel.request())
            elif result is WorkerResult.REFUSED:
                protocol.access_forwarded()
                refused = channel_error(result, context, self.channel.request())
                assert isinstance(refused, Refused)
                self._send(protocol.refuse_request(refused.data or b"", refused.code, refused.why))
                self._serve_access()
            elif result is WorkerResult.HUNGUP:
                raise Stop(WorkerStatus.CLEAN, "the plugin closed the channel")
            elif result in (WorkerResult.TOO_LARGE, WorkerResult.FAILED):
                raise Stop(WorkerStatus.PLUGIN_FAILURE, str(channel_error(result, context)))
            else:
                err = int(context.error)
                raise Stop(
                    WorkerStatus.UNEXPECTED, f"doorbell failed: [Errno {err}] {os.strerror(err)}"
                )

    def _hinted_access(self) -> None:
        """An access at the call hint: the protocol fetches the registers and sends Wait{Io},
        then serves the plugin until its Resume."""
        access = self.engine.access
        hint = self.engine.hint
        assert hint is not None
        data = ctypes.string_at(int(self._run_address() + access.offset), int(access.length))
        self._perform(
            self.protocol.hinted_access(
                Space(access.space), int(access.address), bool(access.is_write), data, hint
            )
        )
        self._serve_access()

    def _run_address(self) -> int:
        return ctypes.addressof(self._run)

    def _serve_access(self, first: bytes | None = None) -> None:
        """The plugin's reply to a forwarded access was for the protocol: serve until its
        Resume (which answers the access), then log the exit at debug level."""
        try:
            self._serve_until_resume(first)
        except Stop:
            if self._debug:
                self._log_access(resumed=False)
            raise
        if self._debug:
            self._log_access()

    def _log_access(self, *, resumed: bool = True) -> None:
        """At debug level, the record of each I/O or MMIO exit once it is complete: its data
        (what the guest wrote, or the value the plugin gave a read) and ``response_us``, the
        time from delivering the exit to the plugin's Resume (None for an exit not forwarded,
        or an async write, which has no Resume)."""
        context = self.engine.context
        access = context.access
        delivered = Delivered(context.delivered)
        fields: dict[str, Any]
        if access.space == Space.IOPORT:
            fields = {
                "kind": "io",
                "port": f"{access.address:#x}",
                "size": int(access.size),
                "count": int(access.count),
            }
        else:
            fields = {"kind": "mmio", "address": f"{access.address:#x}", "length": int(access.size)}
        fields["is_write"] = bool(access.is_write)
        if not resumed:
            fields["resumed"] = False
        waited = delivered is Delivered.WAIT and resumed
        data = ctypes.string_at(self._run_address() + int(access.offset), int(access.length))
        self.log.debug(
            "exit",
            **fields,
            forwarded=delivered is not Delivered.NONE,
            data=data.hex(),
            response_us=round(int(context.response_ns) / 1000, 1) if waited else None,
        )

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
            self.engine.begin_wait(RunState.PAUSED)
            self._send(answer)
            self._serve_until_resume()
        elif err != errno.EAGAIN:  # EAGAIN: an uninitialized VCPU woke up (INIT/SIPI)
            raise Stop(
                WorkerStatus.RUN_FAILED,
                f"KVM_RUN failed: [Errno {err}] {os.strerror(err)}",
                errno=err,
            )

    def _rare_exit(self) -> None:
        """An exit that is not I/O or MMIO: decoded here, by `kvm.decode_exit`."""
        exit_ = kvm.decode_exit(self._run)
        protocol = self.protocol
        if isinstance(exit_, kvm.HypervHcallExit):
            self.slot.count(ExitKind.HYPERV)
            answer = protocol.hyperv_call(exit_.input, exit_.params0, exit_.params1)
            if self._debug:
                self.log.debug("exit", kind="hyperv_call", input=exit_.input)
        elif isinstance(exit_, kvm.HypervSynicExit):
            self.slot.count(ExitKind.HYPERV)
            answer = protocol.hyperv_synic(exit_.msr, exit_.control, exit_.evt_page, exit_.msg_page)
            if self._debug:
                self.log.debug("exit", kind="hyperv_synic", msr=f"{exit_.msr:#x}")
        else:
            self.slot.count(ExitKind.OTHER)
            raise self._fatal_exit(exit_)
        self.engine.begin_wait(RunState.WAITING_PLUGIN)
        self._send(answer)
        self._serve_until_resume()

    def _fatal_exit(self, exit_: kvm.Exit) -> Stop:
        rip, state = self._registers()
        if isinstance(exit_, kvm.ShutdownExit):
            return Stop(
                WorkerStatus.GUEST_SHUTDOWN, "guest shut down (triple fault)", rip=rip, **state
            )
        if isinstance(exit_, kvm.HltExit):
            return Stop(
                WorkerStatus.HALTED, "guest halted (no in-kernel irqchip)", rip=rip, **state
            )
        if isinstance(exit_, kvm.InternalErrorExit):
            instruction = exit_.insn_bytes.hex(" ")
            reason = f"KVM internal error: {exit_.name} (suberror {exit_.suberror})"
            reason += f" at rip {rip}" if rip is not None else ""
            if instruction:  # KVM's fetch window: up to 15 bytes, the first 8 say enough here
                more = " ..." if len(exit_.insn_bytes) > 8 else ""
                reason += f", instruction bytes {exit_.insn_bytes[:8].hex(' ')}{more}"
            return Stop(
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
            return Stop(
                WorkerStatus.FAILED_ENTRY,
                reason,
                hardware_reason=f"{exit_.reason:#x}",
                cpu=exit_.cpu,
                rip=rip,
                **state,
            )
        exit_reason = exit_.reason if isinstance(exit_, kvm.OtherExit) else -1
        return Stop(
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
        since = self.running_since
        self.essential.info(
            "vcpu_exit_counts",
            vcpu=self.vcpu,
            exits=self.slot.counters(),
            ranges=self.engine.range_counts(),
            run_seconds=None if since is None else round(time.monotonic() - since, 6),
        )
