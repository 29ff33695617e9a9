"""The VCPU half of the plugin protocol, as a state machine that does no I/O at all.

A `VcpuProtocol` is fed what happens on one VCPU — a request the plugin sent (bytes), an event
the exit engine hands over (an access it forwarded, one at the call hint, a Hyper-V exit, a
pause) — and answers with *actions* for the worker to carry out: `Call` (run this allowlisted
VCPU ioctl with this argument and send me the result), `Send` (these bytes to the plugin) and
`Resume` (the plugin resumed the VCPU; this data answers the pending exit). It never touches a
socket, a pipe, KVM or the run page, so it is tested without any of them
(tests/test_vcpu_protocol.py). Methods that may need an ioctl are generators of actions: the
worker sends each `Call`'s result back in (`generator.send`), or throws `CallFailed` in.

Plain exits never reach this object: the C engine (`hotpath.c`) decodes every I/O and MMIO
exit, looks up its range, answers unreserved accesses and async writes, sends Wait{Io} and
reads a plain Resume{data} itself. It tells the protocol what it delivered (`access_forwarded`)
only when the plugin's reply is some other request, which is served here.

Transitions (every request gets exactly one response, except `Resume` and `Shutdown`):

=========  ===========================  =========================================  =========
phase      input                        output                                     next
=========  ===========================  =========================================  =========
INIT       Wait                         Wait{Init}                                 SERVING
INIT       any other request            that case, errno EPROTO (Init stays due)   INIT
SERVING    Resume                       Calls setting regs/sregs/debugregs, then   RUNNING
                                        Resume(data, where the answer goes)
SERVING    Get/SetState, Get/SetMsrs,   Calls, then that case, errno 0 or the      SERVING
           SetCpuid, get_hyperv_cpuid,  failure
           EnableCapability
SERVING    Wait                         Wait, errno EPROTO (nothing is pending)    SERVING
INIT,      Shutdown                     none                                       STOPPED
SERVING
INIT,      empty oneof                  empty response, errno ENOTTY               same
SERVING    undecodable bytes            empty response, errno EBADMSG              same
RUNNING    access forwarded by the      none (the engine sent Wait{Io})            SERVING
           engine
RUNNING    access at the call hint      Calls getting regs (and sregs/debugregs    SERVING
                                        per the hint), then Wait{Io} with them
RUNNING    Hyper-V exit, pause          Wait{HypervCall/HypervSynic}, Wait{User}   SERVING
=========  ===========================  =========================================  =========

`Shutdown` has no response case in the schema, so it is honoured in any serving phase rather
than refused. A Resume whose regs, sregs or debugregs cannot be applied cannot be answered
either (Resume has no response): the VCPU must not run on with state the plugin did not
intend, so that is a `ResumeFailed`, and the worker stops the VCPU (as crosvm did).

Errno values are positive on the wire (the client library negates them). Every response
carries the oneof case of its request, failures included, because the client treats a
response without the expected case as a protocol error.

Two error types, after h11: `LocalProtocolError` is vmsuper misusing this object (a bug),
`PluginProtocolError` is the plugin breaking the protocol beyond what an errno can answer.
"""

from __future__ import annotations

import ctypes
import enum
import errno
import os
import struct
from collections.abc import Callable, Generator
from typing import Any, Final, TypeAlias

from google.protobuf.message import DecodeError

from vmsuper.shared import kvm
from vmsuper.shared.plugin_pb2 import VcpuRequest, VcpuResponse
from vmsuper.shared.ranges import CallHint, Range, Space
from vmsuper.shared.records import Record

__all__ = [
    "HV_CPUID_MAX_ENTRIES",
    "STATE_SETS",
    "Action",
    "Answer",
    "Call",
    "CallFailed",
    "LocalProtocolError",
    "Phase",
    "PluginProtocolError",
    "Resume",
    "ResumeFailed",
    "Send",
    "StateSet",
    "Steps",
    "VcpuProtocol",
    "carry_out",
    "range_label",
]


class Phase(enum.Enum):
    """Where a VCPU is in the protocol; it tells the worker what to do next."""

    INIT = "init"
    """The Init reason is due: the only valid request is the plugin's first Wait."""
    SERVING = "serving"
    """A wait reason was delivered: serve state requests until Resume."""
    RUNNING = "running"
    """Resumed: run the guest and report its exits."""
    STOPPED = "stopped"
    """The plugin sent Shutdown: nothing more is served on this channel."""


class LocalProtocolError(Exception):
    """vmsuper used the state machine wrongly (e.g. an exit reported while serving): a bug."""


class PluginProtocolError(Exception):
    """The plugin broke the protocol in a way no response can answer: the VCPU must stop."""


class ResumeFailed(PluginProtocolError):
    """A Resume carried register state that could not be applied."""


class CallFailed(Exception):
    """A VCPU ioctl failed; `errno` is the kernel's (or the runner's refusal)."""

    def __init__(self, code: int, request: int) -> None:
        super().__init__(f"{kvm.ioctl_name(request)} failed: [Errno {code}] {os.strerror(code)}")
        self.errno = code
        self.request = request


class Answer(enum.Enum):
    """Where the data of the Resume that ends a wait goes."""

    ACCESS = "access"
    """The forwarded access's data area (a read's value; a write's answer is dropped)."""
    HCALL_RESULT = "hcall_result"
    """`kvm_run.hyperv.u.hcall.result`: the hypercall's answer (8 bytes)."""


class Call(Record):
    """Action: run VCPU ioctl `request` with a copy of `arg`; its result, (return value,
    argument bytes afterwards), is sent back into the generator, a failure thrown in as
    `CallFailed`.

    The actions are immutable values: `Record`s, not frozen dataclasses (shared/records.py).
    """

    __slots__ = __match_args__ = ("request", "arg")
    request: Final[int]
    arg: Final[bytes | bytearray]

    def __init__(self, request: int, arg: bytes | bytearray) -> None:
        self.request = request
        self.arg = arg


class Send(Record):
    """Action: send these encoded bytes to the plugin."""

    __slots__ = __match_args__ = ("data",)
    data: Final[bytes]

    def __init__(self, data: bytes) -> None:
        self.data = data


class Resume(Record):
    """Action: the plugin resumed the VCPU; `data` answers the pending exit, into `answer`
    (None: nothing takes it)."""

    __slots__ = __match_args__ = ("data", "answer")
    data: Final[bytes]
    answer: Final[Answer | None]

    def __init__(self, data: bytes, answer: Answer | None) -> None:
        self.data = data
        self.answer = answer


Action: TypeAlias = Call | Send | Resume
Steps: TypeAlias = Generator[Action, tuple[int, bytes], None]
"""What the protocol's inputs return: actions, in order, for the worker to carry out."""


def carry_out(
    steps: Steps,
    call: Callable[[int, bytes | bytearray], tuple[int, bytes]],
    send: Callable[[bytes], None],
    resume: Callable[[Resume], None],
) -> None:
    """Carry out a protocol input's actions in order: each `Call` through `call`, whose result
    (or `CallFailed`) goes back into `steps`; each `Send` and `Resume` to its handler."""
    try:
        action = next(steps)
        while True:
            if isinstance(action, Call):
                try:
                    result = call(action.request, action.arg)
                except CallFailed as exc:
                    action = steps.throw(exc)
                    continue
                action = steps.send(result)
                continue
            if isinstance(action, Send):
                send(action.data)
            else:
                resume(action)
            action = next(steps)
    except StopIteration:
        pass


class StateSet(enum.IntEnum):
    """`VcpuRequest.StateSet`: which piece of VCPU state a Get/SetState means."""

    REGS = VcpuRequest.REGS
    SREGS = VcpuRequest.SREGS
    FPU = VcpuRequest.FPU
    DEBUGREGS = VcpuRequest.DEBUGREGS
    LAPIC = VcpuRequest.LAPIC
    MP = VcpuRequest.MP
    XCREGS = VcpuRequest.XCREGS
    EVENTS = VcpuRequest.EVENTS


STATE_SETS: Final[dict[int, tuple[int, int, int]]] = {
    StateSet.REGS: (kvm.KVM_GET_REGS, kvm.KVM_SET_REGS, ctypes.sizeof(kvm.kvm_regs)),
    StateSet.SREGS: (kvm.KVM_GET_SREGS, kvm.KVM_SET_SREGS, ctypes.sizeof(kvm.kvm_sregs)),
    StateSet.FPU: (kvm.KVM_GET_FPU, kvm.KVM_SET_FPU, ctypes.sizeof(kvm.kvm_fpu)),
    StateSet.DEBUGREGS: (
        kvm.KVM_GET_DEBUGREGS,
        kvm.KVM_SET_DEBUGREGS,
        ctypes.sizeof(kvm.kvm_debugregs),
    ),
    StateSet.LAPIC: (kvm.KVM_GET_LAPIC, kvm.KVM_SET_LAPIC, ctypes.sizeof(kvm.kvm_lapic_state)),
    StateSet.MP: (kvm.KVM_GET_MP_STATE, kvm.KVM_SET_MP_STATE, ctypes.sizeof(kvm.kvm_mp_state)),
    StateSet.XCREGS: (kvm.KVM_GET_XCRS, kvm.KVM_SET_XCRS, ctypes.sizeof(kvm.kvm_xcrs)),
    StateSet.EVENTS: (
        kvm.KVM_GET_VCPU_EVENTS,
        kvm.KVM_SET_VCPU_EVENTS,
        ctypes.sizeof(kvm.kvm_vcpu_events),
    ),
}
"""StateSet -> (get ioctl, set ioctl, exact size of the kernel struct)."""

HV_CPUID_MAX_ENTRIES: Final = 64
"""Room offered to KVM_GET_SUPPORTED_HV_CPUID (KVM reports about a dozen leaves)."""

_SYNIC_CAPS: Final = frozenset((kvm.KVM_CAP_HYPERV_SYNIC, kvm.KVM_CAP_HYPERV_SYNIC2))

# struct kvm_msrs / kvm_cpuid2 headers and entries, struct kvm_enable_cap.
_COUNT_HEADER: Final = struct.Struct("<I4x")
_MSR_ENTRY: Final = struct.Struct("<I4xQ")
_CPUID_ENTRY: Final = struct.Struct("<7I12x")
_ENABLE_CAP: Final = struct.Struct("<II32x64x")
_FIRST_FOUR_REGS: Final = struct.Struct("<4Q")  # rax, rbx, rcx, rdx open struct kvm_regs

assert _MSR_ENTRY.size == ctypes.sizeof(kvm.kvm_msr_entry)
assert _CPUID_ENTRY.size == ctypes.sizeof(kvm.kvm_cpuid_entry2)
assert _ENABLE_CAP.size == ctypes.sizeof(kvm.kvm_enable_cap)

# Request cases whose response has the same case; Resume and Shutdown have none.
_RESPONSE_CASE_NAMES: Final = frozenset(
    field.name for field in VcpuResponse.DESCRIPTOR.oneofs_by_name["message"].fields
)


def range_label(rng: Range) -> str:
    """How a reserved range is named in logs and counters: ``ioport:0x3f8+8``."""
    return f"{rng.space.name.lower()}:{rng.start:#x}+{rng.length}"


Handler = Callable[[Any, VcpuResponse], Generator[Action, tuple[int, bytes], int]]
_HANDLERS: Final = {
    case: f"_{case}"
    for case in (
        "get_state",
        "set_state",
        "get_msrs",
        "set_msrs",
        "set_cpuid",
        "get_hyperv_cpuid",
        "enable_capability",
    )
}
"""Request case -> the method that serves it (looked up per request: no reference cycle)."""


class VcpuProtocol:
    """The protocol state of one VCPU; see the module docstring for the transitions."""

    def __init__(self, *, log: Any = None) -> None:
        self.phase = Phase.INIT
        self._log = log
        # Reused for every message: building a fresh protobuf object per request costs more
        # than clearing one.
        self._request = VcpuRequest()
        self._response = VcpuResponse()
        self._answer: Answer | None = None
        self.last_refusal: str | None = None
        """Why the last failed request failed (also logged)."""

    # -- requests ------------------------------------------------------------------------------

    def receive_request(self, data: bytes) -> Steps:
        """Handle one request from the plugin: Calls as it needs them, then the response to
        `Send` (none after Resume or Shutdown) or, for a Resume, `Resume`. Raises
        `ResumeFailed` for a Resume whose register state cannot be applied."""
        phase = self.phase
        if phase is not Phase.SERVING and phase is not Phase.INIT:
            raise LocalProtocolError(f"a request was read while the VCPU is {phase.value}")
        request = self._request
        try:
            request.ParseFromString(data)
        except DecodeError as exc:
            yield Send(
                self._refuse(None, errno.EBADMSG, f"undecodable request ({len(data)} bytes)", exc)
            )
            return
        case = request.WhichOneof("message")
        if case is None:
            yield Send(self._refuse(None, errno.ENOTTY, "request without a message"))
            return
        if case == "shutdown":
            self.phase = Phase.STOPPED
            return
        if phase is Phase.INIT:
            if case != "wait":
                yield Send(self._refuse(case, errno.EPROTO, f"{case} before the Init wait"))
                return
            self.phase = Phase.SERVING
            response = self._response
            response.Clear()
            response.wait.init.SetInParent()
            yield Send(response.SerializeToString())
            return
        if case == "resume":
            yield from self._resume(request.resume)
            return
        if case == "wait":
            yield Send(self._refuse(case, errno.EPROTO, "wait while no wait reason is pending"))
            return
        response = self._response
        response.Clear()
        getattr(response, case).SetInParent()
        handler: Handler = getattr(self, _HANDLERS[case])
        try:
            code = yield from handler(getattr(request, case), response)
        except CallFailed as exc:
            code = exc.errno
            self._note(case, code, str(exc))
        if code:
            response.errno = code
        yield Send(response.SerializeToString())

    def refuse_request(self, data: bytes, code: int, why: str) -> bytes:
        """Answer a request without acting on it (e.g. it came with file descriptors): its own
        case if it decodes, errno `code`. The phase does not change."""
        try:
            case = VcpuRequest.FromString(data).WhichOneof("message")
        except DecodeError:
            case = None
        return self._refuse(case, code, why)

    def _refuse(
        self, case: str | None, code: int, why: str, exc: BaseException | None = None
    ) -> bytes:
        response = self._response
        response.Clear()
        if case in _RESPONSE_CASE_NAMES:
            getattr(response, case).SetInParent()
        response.errno = code
        self._note(case, code, why if exc is None else f"{why}: {exc}")
        return response.SerializeToString()

    def _note(self, case: str | None, code: int, why: str) -> None:
        self.last_refusal = why
        if self._log is not None:
            self._log.warning(
                "request_failed",
                request=case,
                errno=code,
                error=errno.errorcode.get(code, str(code)),
                reason=why,
            )

    def _resume(self, resume: VcpuRequest.Resume) -> Steps:
        for state_set, blob, name in (
            (StateSet.REGS, resume.regs, "regs"),
            (StateSet.SREGS, resume.sregs, "sregs"),
            (StateSet.DEBUGREGS, resume.debugregs, "debugregs"),
        ):
            if not blob:
                continue
            _, set_request, size = STATE_SETS[state_set]
            if len(blob) != size:
                raise ResumeFailed(f"Resume carried {len(blob)} bytes of {name}, not {size}")
            try:
                yield Call(set_request, blob)
            except CallFailed as exc:
                raise ResumeFailed(f"Resume carried {name} that KVM refused: {exc}") from exc
        answer, self._answer = self._answer, None
        self.phase = Phase.RUNNING
        yield Resume(resume.data, answer)

    # -- state requests (each returns the errno for the response, 0 on success) --------------

    def _get_state(
        self, request: VcpuRequest.GetState, response: VcpuResponse
    ) -> Generator[Action, tuple[int, bytes], int]:
        entry = STATE_SETS.get(request.set)
        if entry is None:
            return self._invalid("get_state", f"unknown state set {request.set}")
        get_request, _, size = entry
        _, out = yield Call(get_request, bytes(size))
        response.get_state.state = out
        return 0

    def _set_state(
        self, request: VcpuRequest.SetState, response: VcpuResponse
    ) -> Generator[Action, tuple[int, bytes], int]:
        entry = STATE_SETS.get(request.set)
        if entry is None:
            return self._invalid("set_state", f"unknown state set {request.set}")
        _, set_request, size = entry
        if len(request.state) != size:
            name = StateSet(request.set).name
            return self._invalid("set_state", f"{len(request.state)} bytes of {name}, not {size}")
        yield Call(set_request, request.state)
        return 0

    def _get_msrs(
        self, request: VcpuRequest.GetMsrs, response: VcpuResponse
    ) -> Generator[Action, tuple[int, bytes], int]:
        indices = request.entry_indices
        count = len(indices)
        buf = bytearray(_COUNT_HEADER.size + count * _MSR_ENTRY.size)
        _COUNT_HEADER.pack_into(buf, 0, count)
        for i, index in enumerate(indices):
            _MSR_ENTRY.pack_into(buf, _COUNT_HEADER.size + i * _MSR_ENTRY.size, index, 0)
        done, out = yield Call(kvm.KVM_GET_MSRS, buf)
        if done != count:
            # KVM stops at the first MSR it cannot read; a short answer must not pass for a
            # whole one (the client would take the missing values as read).
            return self._invalid(
                "get_msrs", f"KVM read {done} of {count} MSRs; MSR {indices[done]:#x} failed"
            )
        values = memoryview(out)[_COUNT_HEADER.size :].cast("Q")[1::2]
        response.get_msrs.entry_data.extend(values.tolist())
        return 0

    def _set_msrs(
        self, request: VcpuRequest.SetMsrs, response: VcpuResponse
    ) -> Generator[Action, tuple[int, bytes], int]:
        entries = request.entries
        count = len(entries)
        buf = bytearray(_COUNT_HEADER.size + count * _MSR_ENTRY.size)
        _COUNT_HEADER.pack_into(buf, 0, count)
        for i, entry in enumerate(entries):
            offset = _COUNT_HEADER.size + i * _MSR_ENTRY.size
            _MSR_ENTRY.pack_into(buf, offset, entry.index, entry.data)
        done, _ = yield Call(kvm.KVM_SET_MSRS, buf)
        if done != count:
            return self._invalid(
                "set_msrs",
                f"KVM wrote {done} of {count} MSRs; MSR {entries[done].index:#x} failed",
            )
        return 0

    def _set_cpuid(
        self, request: VcpuRequest.SetCpuid, response: VcpuResponse
    ) -> Generator[Action, tuple[int, bytes], int]:
        entries = request.entries
        buf = bytearray(_COUNT_HEADER.size + len(entries) * _CPUID_ENTRY.size)
        _COUNT_HEADER.pack_into(buf, 0, len(entries))
        for i, e in enumerate(entries):
            _CPUID_ENTRY.pack_into(
                buf,
                _COUNT_HEADER.size + i * _CPUID_ENTRY.size,
                e.function,
                e.index if e.has_index else 0,
                kvm.KVM_CPUID_FLAG_SIGNIFCANT_INDEX if e.has_index else 0,
                e.eax,
                e.ebx,
                e.ecx,
                e.edx,
            )
        yield Call(kvm.KVM_SET_CPUID2, buf)
        return 0

    def _get_hyperv_cpuid(
        self, request: VcpuRequest.CpuidRequest, response: VcpuResponse
    ) -> Generator[Action, tuple[int, bytes], int]:
        buf = bytearray(_COUNT_HEADER.size + HV_CPUID_MAX_ENTRIES * _CPUID_ENTRY.size)
        _COUNT_HEADER.pack_into(buf, 0, HV_CPUID_MAX_ENTRIES)
        _, out = yield Call(kvm.KVM_GET_SUPPORTED_HV_CPUID, buf)
        (count,) = _COUNT_HEADER.unpack_from(out, 0)
        entries = response.get_hyperv_cpuid.entries
        for i in range(min(count, HV_CPUID_MAX_ENTRIES)):
            function, index, flags, eax, ebx, ecx, edx = _CPUID_ENTRY.unpack_from(
                out, _COUNT_HEADER.size + i * _CPUID_ENTRY.size
            )
            has_index = bool(flags & kvm.KVM_CPUID_FLAG_SIGNIFCANT_INDEX)
            entries.add(
                function=function,
                has_index=has_index,
                index=index,
                eax=eax,
                ebx=ebx,
                ecx=ecx,
                edx=edx,
            )
        return 0

    def _enable_capability(
        self, request: VcpuRequest.EnableCapability, response: VcpuResponse
    ) -> Generator[Action, tuple[int, bytes], int]:
        cap = request.capability
        if cap not in _SYNIC_CAPS:
            return self._invalid("enable_capability", f"capability {cap} is not a SynIC one")
        yield Call(kvm.KVM_ENABLE_CAP, _ENABLE_CAP.pack(cap, 0))
        return 0

    def _invalid(self, case: str, why: str) -> int:
        self._note(case, errno.EINVAL, why)
        return errno.EINVAL

    # -- exits -----------------------------------------------------------------------------------

    def access_forwarded(self) -> None:
        """The engine sent Wait{Io} for an access, and the plugin's reply is for this object:
        serve until Resume, whose data answers the access."""
        self._begin_wait(Answer.ACCESS)

    def hinted_access(
        self, space: Space, address: int, is_write: bool, data: bytes, hint: CallHint
    ) -> Steps:
        """An access at the call hint (the engine has counted it): Wait{Io} with the registers,
        and the special registers and debug registers if the hint's first applying `RegHint`
        asks for them. `data` is what a write wrote (a read sends zeros of its length)."""
        self._begin_wait(Answer.ACCESS)
        _, regs = yield self._fetch(StateSet.REGS)
        send_sregs, send_debugregs = hint.extra_state(*_FIRST_FOUR_REGS.unpack_from(regs))
        sregs = (yield self._fetch(StateSet.SREGS))[1] if send_sregs else b""
        debugregs = (yield self._fetch(StateSet.DEBUGREGS))[1] if send_debugregs else b""
        response = self._response
        response.Clear()
        io = response.wait.io
        io.SetInParent()
        io.space = space  # type: ignore[assignment]
        io.address = address
        io.is_write = is_write
        io.data = data if is_write else bytes(len(data))
        io.regs = regs
        io.sregs = sregs
        io.debugregs = debugregs
        yield Send(response.SerializeToString())

    @staticmethod
    def _fetch(state_set: StateSet) -> Call:
        get_request, _, size = STATE_SETS[state_set]
        return Call(get_request, bytes(size))

    def hyperv_call(self, input: int, params0: int, params1: int) -> bytes:
        """A Hyper-V hypercall exit; the first 8 bytes of Resume.data are its result."""
        response = self._begin_wait(Answer.HCALL_RESULT)
        call = response.wait.hyperv_call
        call.SetInParent()
        call.input = input
        call.params0 = params0
        call.params1 = params1
        return response.SerializeToString()

    def hyperv_synic(self, msr: int, control: int, evt_page: int, msg_page: int) -> bytes:
        """A Hyper-V SynIC exit (the guest wrote a SynIC MSR)."""
        response = self._begin_wait(None)
        synic = response.wait.hyperv_synic
        synic.SetInParent()
        synic.msr = msr
        synic.control = control
        synic.evt_page = evt_page
        synic.msg_page = msg_page
        return response.SerializeToString()

    def pause(self, token: int) -> bytes:
        """The VCPU left the guest for a pause request carrying `token`."""
        response = self._begin_wait(None)
        user = response.wait.user
        user.SetInParent()
        user.user = token
        return response.SerializeToString()

    def _begin_wait(self, answer: Answer | None) -> VcpuResponse:
        if self.phase is not Phase.RUNNING:
            raise LocalProtocolError(f"an exit was reported while the VCPU is {self.phase.value}")
        self.phase = Phase.SERVING
        self._answer = answer
        response = self._response
        response.Clear()
        return response
