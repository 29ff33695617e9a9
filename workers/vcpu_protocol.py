"""The VCPU half of the plugin protocol, as a state machine that does no I/O of its own.

A `VcpuProtocol` is fed what happens on one VCPU — a request the plugin sent (bytes), an exit
the guest made, a pause the supervisor asked for — and answers with the encoded response to
send, if any, while its `phase` says what the worker does next. It never touches a socket,
a pipe or KVM: ioctls go through the `VcpuCalls` it is given (the worker's mailbox to its
runner thread; a fake in tests) and reserved ranges come from a `RangeSource` (the shared
table). Framing (plain datagrams, length-delimited pipe writes) is the worker's business.

Transitions (every request gets exactly one response, except `Resume` and `Shutdown`):

=========  ===========================  =========================================  =========
phase      input                        output                                     next
=========  ===========================  =========================================  =========
INIT       Wait                         Wait{Init}                                 SERVING
INIT       any other request            that case, errno EPROTO (Init stays due)   INIT
SERVING    Resume                       none; regs/sregs/debugregs applied, the    RUNNING
                                        read data stored into the exit
SERVING    Get/SetState, Get/SetMsrs,   that case, errno 0 or the failure          SERVING
           SetCpuid, get_hyperv_cpuid,
           EnableCapability
SERVING    Wait                         Wait, errno EPROTO (nothing is pending)    SERVING
INIT,      Shutdown                     none                                       STOPPED
SERVING
INIT,      empty oneof                  empty response, errno ENOTTY               same
SERVING    undecodable bytes            empty response, errno EBADMSG              same
RUNNING    reserved access (sync),      Wait{Io} (+ regs per the call hint),       SERVING
           Hyper-V exit, pause          Wait{HypervCall/HypervSynic}, Wait{User}
RUNNING    write in an async range      Wait{Io, no_resume}                        RUNNING
RUNNING    unreserved access, or a      none (writes dropped, reads zero-filled)   RUNNING
           read in an async range
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
from collections.abc import Callable
from typing import Any, Final, Protocol

from google.protobuf.message import DecodeError

from vmsuper.shared import kvm
from vmsuper.shared.plugin_pb2 import VcpuRequest, VcpuResponse
from vmsuper.shared.ranges import CallHint, Range, Space
from vmsuper.shared.wire import encode_varint

__all__ = [
    "HV_CPUID_MAX_ENTRIES",
    "STATE_SETS",
    "CallFailed",
    "LocalProtocolError",
    "Phase",
    "PluginProtocolError",
    "RangeSource",
    "ResumeFailed",
    "StateSet",
    "VcpuCalls",
    "VcpuProtocol",
    "encode_io_wait",
    "plain_resume_data",
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


class VcpuCalls(Protocol):
    """Runs one ioctl on this VCPU (in the process that owns the VM)."""

    def call(self, request: int, arg: bytes | bytearray) -> tuple[int, bytes]:
        """Run `request` with a copy of `arg` as its argument; return the ioctl's result and
        the argument bytes afterwards (same length). Raise `CallFailed` on failure."""
        ...


class RangeSource(Protocol):
    """The reserved ranges and the call hint as this worker currently sees them."""

    def lookup(self, space: Space, addr: int) -> Range | None: ...

    @property
    def hint(self) -> CallHint | None: ...


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


_SMALL_VARINTS: Final = tuple(bytes((n,)) for n in range(128))


def _varint(value: int) -> bytes:
    if value < 0x80:
        return _SMALL_VARINTS[value]
    if value < 0x4000:  # ports, lengths of register blocks
        return bytes((value & 0x7F | 0x80, value >> 7))
    return encode_varint(value)


def _bytes_field(tag: bytes, value: bytes) -> bytes:
    return tag + _varint(len(value)) + value


def encode_io_wait(
    space: int,
    address: int,
    is_write: bool,
    no_resume: bool,
    data: bytes,
    regs: bytes = b"",
    sregs: bytes = b"",
    debugregs: bytes = b"",
) -> bytes:
    """`VcpuResponse{wait: {io: {...}}}` encoded by hand, byte for byte what protobuf makes
    (fields in number order, proto3 defaults left out): this is every forwarded exit, and
    building it through message objects costs several times as much."""
    body = b""
    if space:
        body = b"\x08" + _varint(space)  # space = 1
    if address:
        body += b"\x10" + _varint(address)  # address = 2
    if is_write:
        body += b"\x18\x01"  # is_write = 3
    if no_resume:
        body += b"\x20\x01"  # no_resume = 4
    if data:
        body += _bytes_field(b"\x2a", data)  # data = 5
    if regs:
        body += _bytes_field(b"\x32", regs)  # regs = 6
    if sregs:
        body += _bytes_field(b"\x3a", sregs)  # sregs = 7
    if debugregs:
        body += _bytes_field(b"\x42", debugregs)  # debugregs = 8
    # Wait.io = 2 inside VcpuResponse.wait = 2.
    return _bytes_field(b"\x12", _bytes_field(b"\x12", body))


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    """(value, next position) of the varint at `pos`; (-1, pos) if it is cut short or long."""
    value = 0
    shift = 0
    end = min(len(data), pos + 10)
    while pos < end:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7
    return -1, pos


def plain_resume_data(request: bytes) -> bytes | None:
    """The data of a request that is exactly `Resume{data}` in the canonical encoding (what
    every client sends to answer an exit), else None: anything else, however valid, takes
    the general protobuf path."""
    if request[:1] != b"\x12":  # VcpuRequest.resume = 2
        return None
    length, pos = _read_varint(request, 1)
    if length != len(request) - pos:
        return None
    if length == 0:
        return b""
    if request[pos] != 0x0A:  # Resume.data = 1, and nothing else
        return None
    size, start = _read_varint(request, pos + 1)
    if size != len(request) - start:
        return None
    return request[start:]


def range_label(rng: Range) -> str:
    """How a reserved range is named in logs and counters: ``ioport:0x3f8+8``."""
    return f"{rng.space.name.lower()}:{rng.start:#x}+{rng.length}"


Handler = Callable[[Any, VcpuResponse], int]
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

    def __init__(self, calls: VcpuCalls, ranges: RangeSource, *, log: Any = None) -> None:
        self.phase = Phase.INIT
        self._calls = calls
        self._ranges = ranges
        self._log = log
        # Reused for every message: building a fresh protobuf object per exit costs more than
        # clearing one.
        self._request = VcpuRequest()
        self._response = VcpuResponse()
        self._read_area: memoryview | None = None
        # Exits per reserved range that went to the plugin, keyed by space and start (an int
        # hashes faster than a Range).
        self._counts: dict[int, int] = {}
        self._counted: dict[int, Range] = {}
        self.last_refusal: str | None = None
        """Why the last failed request failed (also logged)."""
        self.last_range: Range | None = None
        """The reserved range of the last access `io_access` counted."""

    # -- requests ------------------------------------------------------------------------------

    def receive_request(self, data: bytes) -> bytes | None:
        """Handle one request from the plugin; return the encoded response (None: no response
        is due, after Resume or Shutdown). Raises `ResumeFailed` for a Resume whose register
        state cannot be applied."""
        phase = self.phase
        if phase is Phase.SERVING:
            resume_data = plain_resume_data(data)
            if resume_data is not None:
                self._finish_resume(resume_data)
                return None
        elif phase is not Phase.INIT:
            raise LocalProtocolError(f"a request was read while the VCPU is {phase.value}")
        request = self._request
        try:
            request.ParseFromString(data)
        except DecodeError as exc:
            return self._refuse(
                None, errno.EBADMSG, f"undecodable request ({len(data)} bytes)", exc
            )
        case = request.WhichOneof("message")
        if case is None:
            return self._refuse(None, errno.ENOTTY, "request without a message")
        if case == "shutdown":
            self.phase = Phase.STOPPED
            return None
        if phase is Phase.INIT:
            if case != "wait":
                return self._refuse(case, errno.EPROTO, f"{case} before the Init wait")
            self.phase = Phase.SERVING
            response = self._response
            response.Clear()
            response.wait.init.SetInParent()
            return response.SerializeToString()
        if case == "resume":
            self._resume(request.resume)
            return None
        if case == "wait":
            return self._refuse(case, errno.EPROTO, "wait while no wait reason is pending")
        response = self._response
        response.Clear()
        getattr(response, case).SetInParent()
        handler: Handler = getattr(self, _HANDLERS[case])
        try:
            code = handler(getattr(request, case), response)
        except CallFailed as exc:
            code = exc.errno
            self._note(case, code, str(exc))
        if code:
            response.errno = code
        return response.SerializeToString()

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

    def _resume(self, resume: VcpuRequest.Resume) -> None:
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
                self._calls.call(set_request, blob)
            except CallFailed as exc:
                raise ResumeFailed(f"Resume carried {name} that KVM refused: {exc}") from exc
        self._finish_resume(resume.data)

    def _finish_resume(self, data: bytes) -> None:
        area = self._read_area
        if area is not None:
            self._read_area = None
            _fill(area, data)
        self.phase = Phase.RUNNING

    # -- state requests (each returns the errno for the response, 0 on success) --------------

    def _get_state(self, request: VcpuRequest.GetState, response: VcpuResponse) -> int:
        entry = STATE_SETS.get(request.set)
        if entry is None:
            return self._invalid("get_state", f"unknown state set {request.set}")
        get_request, _, size = entry
        _, out = self._calls.call(get_request, bytes(size))
        response.get_state.state = out
        return 0

    def _set_state(self, request: VcpuRequest.SetState, response: VcpuResponse) -> int:
        entry = STATE_SETS.get(request.set)
        if entry is None:
            return self._invalid("set_state", f"unknown state set {request.set}")
        _, set_request, size = entry
        if len(request.state) != size:
            name = StateSet(request.set).name
            return self._invalid("set_state", f"{len(request.state)} bytes of {name}, not {size}")
        self._calls.call(set_request, request.state)
        return 0

    def _get_msrs(self, request: VcpuRequest.GetMsrs, response: VcpuResponse) -> int:
        indices = request.entry_indices
        count = len(indices)
        buf = bytearray(_COUNT_HEADER.size + count * _MSR_ENTRY.size)
        _COUNT_HEADER.pack_into(buf, 0, count)
        for i, index in enumerate(indices):
            _MSR_ENTRY.pack_into(buf, _COUNT_HEADER.size + i * _MSR_ENTRY.size, index, 0)
        done, out = self._calls.call(kvm.KVM_GET_MSRS, buf)
        if done != count:
            # KVM stops at the first MSR it cannot read; a short answer must not pass for a
            # whole one (the client would take the missing values as read).
            return self._invalid(
                "get_msrs", f"KVM read {done} of {count} MSRs; MSR {indices[done]:#x} failed"
            )
        values = memoryview(out)[_COUNT_HEADER.size :].cast("Q")[1::2]
        response.get_msrs.entry_data.extend(values.tolist())
        return 0

    def _set_msrs(self, request: VcpuRequest.SetMsrs, response: VcpuResponse) -> int:
        entries = request.entries
        count = len(entries)
        buf = bytearray(_COUNT_HEADER.size + count * _MSR_ENTRY.size)
        _COUNT_HEADER.pack_into(buf, 0, count)
        for i, entry in enumerate(entries):
            offset = _COUNT_HEADER.size + i * _MSR_ENTRY.size
            _MSR_ENTRY.pack_into(buf, offset, entry.index, entry.data)
        done, _ = self._calls.call(kvm.KVM_SET_MSRS, buf)
        if done != count:
            return self._invalid(
                "set_msrs",
                f"KVM wrote {done} of {count} MSRs; MSR {entries[done].index:#x} failed",
            )
        return 0

    def _set_cpuid(self, request: VcpuRequest.SetCpuid, response: VcpuResponse) -> int:
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
        self._calls.call(kvm.KVM_SET_CPUID2, buf)
        return 0

    def _get_hyperv_cpuid(self, request: VcpuRequest.CpuidRequest, response: VcpuResponse) -> int:
        buf = bytearray(_COUNT_HEADER.size + HV_CPUID_MAX_ENTRIES * _CPUID_ENTRY.size)
        _COUNT_HEADER.pack_into(buf, 0, HV_CPUID_MAX_ENTRIES)
        _, out = self._calls.call(kvm.KVM_GET_SUPPORTED_HV_CPUID, buf)
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
    ) -> int:
        cap = request.capability
        if cap not in _SYNIC_CAPS:
            return self._invalid("enable_capability", f"capability {cap} is not a SynIC one")
        self._calls.call(kvm.KVM_ENABLE_CAP, _ENABLE_CAP.pack(cap, 0))
        return 0

    def _invalid(self, case: str, why: str) -> int:
        self._note(case, errno.EINVAL, why)
        return errno.EINVAL

    # -- exits -----------------------------------------------------------------------------------

    def io_access(
        self, space: Space, address: int, is_write: bool, data: memoryview
    ) -> bytes | None:
        """The guest accessed `address` in `space`; `data` is the exit's data area in the run
        page (what was written, or where the value read goes). Returns the wait reason to send,
        or None when the access is handled here (unreserved: a read is zero-filled)."""
        if self.phase is not Phase.RUNNING:
            raise LocalProtocolError(f"an exit was reported while the VCPU is {self.phase.value}")
        ranges = self._ranges
        rng = ranges.lookup(space, address)
        if rng is None or (rng.async_write and not is_write):
            if not is_write:
                data[:] = bytes(len(data))
            return None
        self.last_range = rng
        key = rng.start | rng.space << 64
        counts = self._counts
        count = counts.get(key, 0)
        if not count:
            self._counted[key] = rng
        counts[key] = count + 1
        if is_write:
            payload = data.tobytes()
            if rng.async_write:
                return encode_io_wait(space, address, True, True, payload)
            self._read_area = None
        else:
            payload = bytes(len(data))
            self._read_area = data
        self.phase = Phase.SERVING
        hint = ranges.hint
        if hint is not None and hint.matches(space, address, is_write):
            return self._hinted_wait(space, address, is_write, payload, hint)
        return encode_io_wait(space, address, is_write, False, payload)

    def forwarded(self, read_area: memoryview | None) -> None:
        """The C exit loop sent Wait{Io} for an access (`read_area`: where a read's answer
        goes) and hands the reply over: the same state `io_access` would have left."""
        if self.phase is not Phase.RUNNING:
            raise LocalProtocolError(f"an exit was reported while the VCPU is {self.phase.value}")
        self.phase = Phase.SERVING
        self._read_area = read_area

    def add_range_count(self, rng: Range, count: int) -> None:
        """Add `count` forwarded exits of `rng` (counted by the C exit loop)."""
        key = rng.start | rng.space << 64
        if key not in self._counts:
            self._counted[key] = rng
            self._counts[key] = 0
        self._counts[key] += count

    def _hinted_wait(
        self, space: Space, address: int, is_write: bool, payload: bytes, hint: CallHint
    ) -> bytes:
        regs = self._fetch(StateSet.REGS)
        send_sregs, send_debugregs = hint.extra_state(*_FIRST_FOUR_REGS.unpack_from(regs))
        sregs = self._fetch(StateSet.SREGS) if send_sregs else b""
        debugregs = self._fetch(StateSet.DEBUGREGS) if send_debugregs else b""
        return encode_io_wait(space, address, is_write, False, payload, regs, sregs, debugregs)

    def _fetch(self, state_set: StateSet) -> bytes:
        get_request, _, size = STATE_SETS[state_set]
        return self._calls.call(get_request, bytes(size))[1]

    def hyperv_call(self, input: int, params0: int, params1: int, result: memoryview) -> bytes:
        """A Hyper-V hypercall exit; the first 8 bytes of Resume.data go into `result`."""
        response = self._begin_wait()
        call = response.wait.hyperv_call
        call.SetInParent()
        call.input = input
        call.params0 = params0
        call.params1 = params1
        self._read_area = result
        return response.SerializeToString()

    def hyperv_synic(self, msr: int, control: int, evt_page: int, msg_page: int) -> bytes:
        """A Hyper-V SynIC exit (the guest wrote a SynIC MSR)."""
        response = self._begin_wait()
        synic = response.wait.hyperv_synic
        synic.SetInParent()
        synic.msr = msr
        synic.control = control
        synic.evt_page = evt_page
        synic.msg_page = msg_page
        return response.SerializeToString()

    def pause(self, token: int) -> bytes:
        """The VCPU left the guest for a pause request carrying `token`."""
        response = self._begin_wait()
        user = response.wait.user
        user.SetInParent()
        user.user = token
        return response.SerializeToString()

    def _begin_wait(self) -> VcpuResponse:
        if self.phase is not Phase.RUNNING:
            raise LocalProtocolError(f"an exit was reported while the VCPU is {self.phase.value}")
        self.phase = Phase.SERVING
        self._read_area = None
        response = self._response
        response.Clear()
        return response

    @property
    def range_counts(self) -> dict[Range, int]:
        """Exits per reserved range that went to the plugin (a range reserved again at the
        same start counts as the one first seen)."""
        return {self._counted[key]: count for key, count in self._counts.items()}

    def range_count_labels(self) -> dict[str, int]:
        """`range_counts` keyed by `range_label`, for the exit-count log record."""
        return {range_label(rng): count for rng, count in self.range_counts.items()}


def _fill(area: memoryview, data: bytes) -> None:
    """Copy the plugin's answer into an exit's data area: at most its size, zero-padded."""
    size = len(area)
    n = min(size, len(data))
    if n:
        area[:n] = data[:n]
    if n < size:
        area[n:] = bytes(size - n)
