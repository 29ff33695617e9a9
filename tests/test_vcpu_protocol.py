"""The VCPU protocol state machine, against a fake VCPU (no KVM, no sockets)."""

from __future__ import annotations

import ctypes
import errno
import struct
from dataclasses import dataclass, field
from typing import cast

import pytest
from fuzz.protocol_driver import DrivenProtocol

from vmsuper.shared import kvm
from vmsuper.shared.plugin_pb2 import CpuidEntry, VcpuRequest, VcpuResponse
from vmsuper.shared.ranges import CallHint, Range, RangeTable, RegHint, Space
from vmsuper.workers.vcpu_protocol import (
    HV_CPUID_MAX_ENTRIES,
    STATE_SETS,
    Answer,
    Call,
    CallFailed,
    LocalProtocolError,
    Phase,
    Resume,
    ResumeFailed,
    Send,
    StateSet,
    VcpuProtocol,
    range_label,
)

SET_REQUESTS = {entry[1]: state_set for state_set, entry in STATE_SETS.items()}
GET_REQUESTS = {entry[0]: state_set for state_set, entry in STATE_SETS.items()}


@dataclass
class FakeVcpu:
    """Implements the VCPU ioctls the protocol uses, on plain Python state."""

    state: dict[int, bytes] = field(
        default_factory=lambda: {s: bytes([s + 1]) * size for s, (_, _, size) in STATE_SETS.items()}
    )
    msrs: dict[int, int] = field(default_factory=lambda: {0x10: 111, 0x174: 222})
    cpuid: list[tuple[int, ...]] = field(default_factory=list)
    hv_cpuid: list[tuple[int, ...]] = field(default_factory=list)
    enabled_caps: list[int] = field(default_factory=list)
    refuse: dict[int, int] = field(default_factory=dict)  # request -> errno
    log: list[int] = field(default_factory=list)

    def call(self, request: int, arg: bytes | bytearray) -> tuple[int, bytes]:
        self.log.append(request)
        if request in self.refuse:
            raise CallFailed(self.refuse[request], request)
        if request in GET_REQUESTS:
            assert len(arg) == STATE_SETS[GET_REQUESTS[request]][2]
            return 0, self.state[GET_REQUESTS[request]]
        if request in SET_REQUESTS:
            assert len(arg) == STATE_SETS[SET_REQUESTS[request]][2]
            self.state[SET_REQUESTS[request]] = bytes(arg)
            return 0, bytes(arg)
        out = bytearray(arg)
        (count,) = struct.unpack_from("<I", arg)
        if request == kvm.KVM_GET_MSRS:
            for i in range(count):
                (index,) = struct.unpack_from("<I", arg, 8 + 16 * i)
                if index not in self.msrs:
                    return i, bytes(out)
                struct.pack_into("<Q", out, 8 + 16 * i + 8, self.msrs[index])
            return count, bytes(out)
        if request == kvm.KVM_SET_MSRS:
            for i in range(count):
                index, data = struct.unpack_from("<I4xQ", arg, 8 + 16 * i)
                if index not in self.msrs:
                    return i, bytes(out)
                self.msrs[index] = data
            return count, bytes(out)
        if request == kvm.KVM_SET_CPUID2:
            self.cpuid = [struct.unpack_from("<7I", arg, 8 + 40 * i) for i in range(count)]
            return 0, bytes(out)
        if request == kvm.KVM_GET_SUPPORTED_HV_CPUID:
            assert count == HV_CPUID_MAX_ENTRIES
            struct.pack_into("<I", out, 0, len(self.hv_cpuid))
            for i, entry in enumerate(self.hv_cpuid):
                struct.pack_into("<7I", out, 8 + 40 * i, *entry)
            return 0, bytes(out)
        if request == kvm.KVM_ENABLE_CAP:
            assert len(arg) == ctypes.sizeof(kvm.kvm_enable_cap)
            self.enabled_caps.append(count)
            return 0, bytes(out)
        raise AssertionError(f"unexpected ioctl {kvm.ioctl_name(request)}")


class FakeRanges:
    def __init__(self, *ranges: Range, hint: CallHint | None = None) -> None:
        self.table = RangeTable()
        for r in ranges:
            self.table.reserve(r.space, r.start, r.length, r.async_write)
        self.hint = hint

    def lookup(self, space: Space, addr: int) -> Range | None:
        return self.table.lookup(space, addr)


def wire_set(n: int) -> VcpuRequest.StateSet:
    """A StateSet number as the schema's type (any int can arrive on the wire)."""
    return cast("VcpuRequest.StateSet", n)


def encode(**kwargs: object) -> bytes:
    return VcpuRequest(**kwargs).SerializeToString()  # type: ignore[arg-type]


def decode(data: bytes | None) -> VcpuResponse:
    assert data is not None
    return VcpuResponse.FromString(data)


def make(
    *ranges: Range, hint: CallHint | None = None, vcpu: FakeVcpu | None = None
) -> tuple[DrivenProtocol, FakeVcpu]:
    vcpu = vcpu or FakeVcpu()
    return DrivenProtocol(vcpu, FakeRanges(*ranges, hint=hint)), vcpu


def serving(*ranges: Range, hint: CallHint | None = None) -> tuple[DrivenProtocol, FakeVcpu]:
    proto, vcpu = make(*ranges, hint=hint)
    proto.receive_request(encode(wait=VcpuRequest.Wait()))
    assert proto.phase is Phase.SERVING
    return proto, vcpu


def running(*ranges: Range, hint: CallHint | None = None) -> tuple[DrivenProtocol, FakeVcpu]:
    proto, vcpu = serving(*ranges, hint=hint)
    assert proto.receive_request(encode(resume=VcpuRequest.Resume())) is None
    assert proto.phase is Phase.RUNNING
    return proto, vcpu


# -- Init -------------------------------------------------------------------------------------


def test_first_wait_is_answered_with_init() -> None:
    proto, _ = make()
    response = decode(proto.receive_request(encode(wait=VcpuRequest.Wait())))
    assert response.errno == 0
    assert response.WhichOneof("message") == "wait"
    assert response.wait.WhichOneof("exit") == "init"
    assert proto.phase is Phase.SERVING


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("get_state", VcpuRequest.GetState(set=VcpuRequest.REGS)),
        ("set_state", VcpuRequest.SetState(set=VcpuRequest.MP, state=bytes(4))),
        ("get_msrs", VcpuRequest.GetMsrs(entry_indices=[0x10])),
        ("set_msrs", VcpuRequest.SetMsrs()),
        ("set_cpuid", VcpuRequest.SetCpuid()),
        ("get_hyperv_cpuid", VcpuRequest.CpuidRequest()),
        ("enable_capability", VcpuRequest.EnableCapability(capability=123)),
    ],
)
def test_requests_before_the_init_wait_get_eproto_with_their_case(
    case: str, message: object
) -> None:
    proto, vcpu = make()
    response = decode(proto.receive_request(encode(**{case: message})))
    assert response.errno == errno.EPROTO
    assert response.WhichOneof("message") == case
    assert vcpu.log == []
    assert proto.phase is Phase.INIT
    # Init is still due.
    response = decode(proto.receive_request(encode(wait=VcpuRequest.Wait())))
    assert response.wait.WhichOneof("exit") == "init"


def test_resume_before_the_init_wait_is_refused_and_init_stays_due() -> None:
    proto, _ = make()
    response = decode(proto.receive_request(encode(resume=VcpuRequest.Resume())))
    assert response.errno == errno.EPROTO
    assert response.WhichOneof("message") is None
    assert proto.phase is Phase.INIT


def test_wait_with_nothing_pending_is_eproto() -> None:
    proto, _ = serving()
    response = decode(proto.receive_request(encode(wait=VcpuRequest.Wait())))
    assert response.errno == errno.EPROTO
    assert response.WhichOneof("message") == "wait"
    assert response.wait.WhichOneof("exit") is None
    assert proto.phase is Phase.SERVING


@pytest.mark.parametrize("before_init", [True, False])
def test_shutdown_stops_without_a_response(before_init: bool) -> None:
    proto, _ = make() if before_init else serving()
    assert proto.receive_request(encode(shutdown=VcpuRequest.Shutdown())) is None
    assert proto.phase is Phase.STOPPED
    with pytest.raises(LocalProtocolError):
        proto.receive_request(encode(wait=VcpuRequest.Wait()))


def test_empty_request_is_enotty() -> None:
    proto, _ = serving()
    response = decode(proto.receive_request(b""))
    assert response.errno == errno.ENOTTY
    assert response.WhichOneof("message") is None
    assert proto.phase is Phase.SERVING


@pytest.mark.parametrize("garbage", [b"\xff\xff\xff", b"\x0a\x05ab", b"\x12\x80"])
def test_undecodable_request_is_ebadmsg_and_changes_nothing(garbage: bytes) -> None:
    proto, _ = make()
    response = decode(proto.receive_request(garbage))
    assert response.errno == errno.EBADMSG
    assert response.WhichOneof("message") is None
    assert proto.phase is Phase.INIT
    assert proto.last_refusal is not None and "undecodable" in proto.last_refusal


def test_refuse_request_keeps_the_case_and_acts_on_nothing() -> None:
    proto, vcpu = serving()
    data = encode(set_state=VcpuRequest.SetState(set=VcpuRequest.MP, state=bytes(4)))
    response = decode(proto.refuse_request(data, errno.EINVAL, "came with fds"))
    assert response.errno == errno.EINVAL
    assert response.WhichOneof("message") == "set_state"
    assert vcpu.log == []
    response = decode(proto.refuse_request(b"\xff", errno.EINVAL, "came with fds"))
    assert response.WhichOneof("message") is None


def test_requests_while_running_are_a_local_error() -> None:
    proto, _ = running()
    with pytest.raises(LocalProtocolError):
        proto.receive_request(encode(wait=VcpuRequest.Wait()))


# -- Get/SetState -----------------------------------------------------------------------------


@pytest.mark.parametrize("state_set", list(StateSet))
def test_state_round_trip(state_set: StateSet) -> None:
    proto, vcpu = serving()
    size = STATE_SETS[state_set][2]
    blob = bytes(range(256)) * (size // 256) + bytes(range(size % 256))
    response = decode(
        proto.receive_request(
            encode(set_state=VcpuRequest.SetState(set=wire_set(state_set), state=blob))
        )
    )
    assert (response.errno, response.WhichOneof("message")) == (0, "set_state")
    assert vcpu.state[state_set] == blob
    response = decode(
        proto.receive_request(encode(get_state=VcpuRequest.GetState(set=wire_set(state_set))))
    )
    assert (response.errno, response.WhichOneof("message")) == (0, "get_state")
    assert response.get_state.state == blob


@pytest.mark.parametrize("state_set", list(StateSet))
@pytest.mark.parametrize("delta", [-1, 1])
def test_set_state_of_the_wrong_size_is_einval(state_set: StateSet, delta: int) -> None:
    proto, vcpu = serving()
    blob = bytes(STATE_SETS[state_set][2] + delta)
    response = decode(
        proto.receive_request(
            encode(set_state=VcpuRequest.SetState(set=wire_set(state_set), state=blob))
        )
    )
    assert (response.errno, response.WhichOneof("message")) == (errno.EINVAL, "set_state")
    assert vcpu.log == []


def test_unknown_state_set_is_einval() -> None:
    proto, vcpu = serving()
    for case, message in (
        ("get_state", VcpuRequest.GetState(set=wire_set(99))),
        ("set_state", VcpuRequest.SetState(set=wire_set(99), state=b"x")),
    ):
        response = decode(proto.receive_request(encode(**{case: message})))
        assert (response.errno, response.WhichOneof("message")) == (errno.EINVAL, case)
    assert vcpu.log == []


def test_kvm_failure_is_reported_with_its_errno() -> None:
    proto, vcpu = serving()
    vcpu.refuse[kvm.KVM_GET_LAPIC] = errno.ENXIO
    response = decode(
        proto.receive_request(encode(get_state=VcpuRequest.GetState(set=VcpuRequest.LAPIC)))
    )
    assert (response.errno, response.WhichOneof("message")) == (errno.ENXIO, "get_state")
    assert response.get_state.state == b""


# -- MSRs, CPUID, capabilities ----------------------------------------------------------------


def test_get_msrs_answers_in_request_order() -> None:
    proto, _ = serving()
    request = VcpuRequest.GetMsrs(entry_indices=[0x174, 0x10, 0x174])
    response = decode(proto.receive_request(encode(get_msrs=request)))
    assert (response.errno, response.WhichOneof("message")) == (0, "get_msrs")
    assert list(response.get_msrs.entry_data) == [222, 111, 222]


def test_partial_msr_read_is_an_error_not_a_short_success() -> None:
    proto, _ = serving()
    request = VcpuRequest.GetMsrs(entry_indices=[0x10, 0xDEAD, 0x174])
    response = decode(proto.receive_request(encode(get_msrs=request)))
    assert (response.errno, response.WhichOneof("message")) == (errno.EINVAL, "get_msrs")
    assert list(response.get_msrs.entry_data) == []
    assert proto.last_refusal is not None and "0xdead" in proto.last_refusal


def test_set_msrs_and_partial_write() -> None:
    proto, vcpu = serving()
    ok = VcpuRequest.SetMsrs(entries=[VcpuRequest.MsrEntry(index=0x10, data=1 << 63)])
    response = decode(proto.receive_request(encode(set_msrs=ok)))
    assert (response.errno, response.WhichOneof("message")) == (0, "set_msrs")
    assert vcpu.msrs[0x10] == 1 << 63
    partial = VcpuRequest.SetMsrs(
        entries=[
            VcpuRequest.MsrEntry(index=0x174, data=5),
            VcpuRequest.MsrEntry(index=0xBAD, data=6),
        ]
    )
    response = decode(proto.receive_request(encode(set_msrs=partial)))
    assert (response.errno, response.WhichOneof("message")) == (errno.EINVAL, "set_msrs")


def test_set_cpuid_flags_significant_indices() -> None:
    proto, vcpu = serving()
    request = VcpuRequest.SetCpuid(
        entries=[
            CpuidEntry(function=0, index=7, eax=1, ebx=2, ecx=3, edx=4),
            CpuidEntry(function=7, has_index=True, index=1, eax=5, ebx=6, ecx=7, edx=8),
        ]
    )
    response = decode(proto.receive_request(encode(set_cpuid=request)))
    assert (response.errno, response.WhichOneof("message")) == (0, "set_cpuid")
    flag = kvm.KVM_CPUID_FLAG_SIGNIFCANT_INDEX
    assert vcpu.cpuid == [(0, 0, 0, 1, 2, 3, 4), (7, 1, flag, 5, 6, 7, 8)]


def test_get_hyperv_cpuid() -> None:
    proto, vcpu = serving()
    flag = kvm.KVM_CPUID_FLAG_SIGNIFCANT_INDEX
    vcpu.hv_cpuid = [(0x40000000, 0, 0, 1, 2, 3, 4), (0x40000001, 2, flag, 5, 6, 7, 8)]
    response = decode(proto.receive_request(encode(get_hyperv_cpuid=VcpuRequest.CpuidRequest())))
    assert (response.errno, response.WhichOneof("message")) == (0, "get_hyperv_cpuid")
    entries = [
        (e.function, e.has_index, e.index, e.eax, e.ebx, e.ecx, e.edx)
        for e in response.get_hyperv_cpuid.entries
    ]
    assert entries == [(0x40000000, False, 0, 1, 2, 3, 4), (0x40000001, True, 2, 5, 6, 7, 8)]


def test_get_hyperv_cpuid_failure_keeps_the_case() -> None:
    proto, vcpu = serving()
    vcpu.refuse[kvm.KVM_GET_SUPPORTED_HV_CPUID] = errno.ENOTTY
    response = decode(proto.receive_request(encode(get_hyperv_cpuid=VcpuRequest.CpuidRequest())))
    assert (response.errno, response.WhichOneof("message")) == (errno.ENOTTY, "get_hyperv_cpuid")


@pytest.mark.parametrize(
    ("cap", "expected"),
    [
        (kvm.KVM_CAP_HYPERV_SYNIC, 0),
        (kvm.KVM_CAP_HYPERV_SYNIC2, 0),
        (kvm.KVM_CAP_IRQCHIP, errno.EINVAL),
        (kvm.KVM_CAP_HYPERV, errno.EINVAL),
    ],
)
def test_enable_capability_only_for_synic(cap: int, expected: int) -> None:
    proto, vcpu = serving()
    request = VcpuRequest.EnableCapability(capability=cap)
    response = decode(proto.receive_request(encode(enable_capability=request)))
    assert (response.errno, response.WhichOneof("message")) == (expected, "enable_capability")
    assert vcpu.enabled_caps == ([cap] if expected == 0 else [])


# -- Resume -----------------------------------------------------------------------------------


def test_resume_applies_regs_sregs_debugregs_in_order() -> None:
    proto, vcpu = serving()
    regs, sregs, dregs = (bytes([n]) * STATE_SETS[s][2] for n, s in ((7, 0), (8, 1), (9, 3)))
    resume = VcpuRequest.Resume(regs=regs, sregs=sregs, debugregs=dregs)
    assert proto.receive_request(encode(resume=resume)) is None
    assert vcpu.log == [kvm.KVM_SET_REGS, kvm.KVM_SET_SREGS, kvm.KVM_SET_DEBUGREGS]
    assert vcpu.state[StateSet.REGS] == regs
    assert vcpu.state[StateSet.SREGS] == sregs
    assert vcpu.state[StateSet.DEBUGREGS] == dregs
    assert proto.phase is Phase.RUNNING


def test_resume_with_misfit_regs_fails_loudly() -> None:
    proto, vcpu = serving()
    with pytest.raises(ResumeFailed, match="sregs"):
        proto.receive_request(encode(resume=VcpuRequest.Resume(sregs=b"short")))
    assert vcpu.log == []


def test_resume_with_regs_kvm_refuses_fails_loudly() -> None:
    proto, vcpu = serving()
    vcpu.refuse[kvm.KVM_SET_SREGS] = errno.EINVAL
    with pytest.raises(ResumeFailed, match="KVM refused"):
        proto.receive_request(encode(resume=VcpuRequest.Resume(sregs=bytes(312))))


# -- exits ------------------------------------------------------------------------------------

SERIAL = Range(Space.IOPORT, 0x3F8, 8)
ASYNC = Range(Space.IOPORT, 0x80, 1, async_write=True)
MMIO = Range(Space.MMIO, 0xD000_0000, 0x1000)


def test_reserved_port_write_is_forwarded_with_its_data() -> None:
    proto, _ = running(SERIAL)
    data = bytearray(b"hi")
    response = decode(proto.io_access(Space.IOPORT, 0x3F9, True, memoryview(data)))
    assert response.errno == 0
    io = response.wait.io
    assert (io.space, io.address, io.is_write, io.no_resume, io.data) == (
        0,
        0x3F9,
        True,
        False,
        b"hi",
    )
    assert io.regs == io.sregs == io.debugregs == b""
    assert proto.phase is Phase.SERVING
    # The data of a write's Resume is ignored.
    proto.receive_request(encode(resume=VcpuRequest.Resume(data=b"zz")))
    assert data == b"hi"
    assert proto.range_counts == {SERIAL: 1}


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        (b"\x11\x22\x33\x44", b"\x11\x22\x33\x44"),
        (b"\x11\x22\x33\x44\x55\x66", b"\x11\x22\x33\x44"),
        (b"\x11", b"\x11\x00\x00\x00"),
        (b"", b"\x00\x00\x00\x00"),
    ],
)
def test_reserved_read_gets_zeros_then_the_resume_data(answer: bytes, expected: bytes) -> None:
    proto, _ = running(MMIO)
    area = bytearray(b"\xee" * 4)
    response = decode(proto.io_access(Space.MMIO, 0xD000_0010, False, memoryview(area)))
    io = response.wait.io
    assert (io.space, io.address, io.is_write, io.data) == (1, 0xD000_0010, False, bytes(4))
    assert area == b"\xee" * 4  # untouched until the plugin answers
    proto.receive_request(encode(resume=VcpuRequest.Resume(data=answer)))
    assert area == expected
    assert proto.phase is Phase.RUNNING


def test_unreserved_accesses_are_handled_here() -> None:
    proto, _ = running(SERIAL)
    area = bytearray(b"\xee" * 2)
    assert proto.io_access(Space.IOPORT, 0x60, False, memoryview(area)) is None
    assert area == bytes(2)
    assert proto.io_access(Space.IOPORT, 0x60, True, memoryview(bytearray(b"x"))) is None
    assert proto.io_access(Space.MMIO, 0x3F8, True, memoryview(bytearray(b"x"))) is None
    assert proto.phase is Phase.RUNNING
    assert proto.range_counts == {}


def test_async_write_goes_on_without_waiting_and_async_read_is_unreserved() -> None:
    proto, _ = running(ASYNC)
    for value in (b"\x01", b"\x02"):
        response = decode(proto.io_access(Space.IOPORT, 0x80, True, memoryview(bytearray(value))))
        io = response.wait.io
        assert (io.is_write, io.no_resume, io.data) == (True, True, value)
        assert proto.phase is Phase.RUNNING
    area = bytearray(b"\xff")
    assert proto.io_access(Space.IOPORT, 0x80, False, memoryview(area)) is None
    assert area == b"\x00"
    assert proto.range_counts == {ASYNC: 2}


def test_string_io_forwards_every_byte() -> None:
    proto, _ = running(SERIAL)
    area = bytearray(12)
    response = decode(proto.io_access(Space.IOPORT, 0x3F8, False, memoryview(area)))
    assert response.wait.io.data == bytes(12)
    proto.receive_request(encode(resume=VcpuRequest.Resume(data=b"abcdefghijkl")))
    assert area == b"abcdefghijkl"


def regs_with(rax: int, rbx: int = 0) -> bytes:
    return struct.pack("<4Q", rax, rbx, 0, 0) + bytes(STATE_SETS[StateSet.REGS][2] - 32)


def test_call_hint_sends_regs_and_per_hint_extra_state() -> None:
    hint = CallHint(
        Space.IOPORT,
        0x3F8,
        on_write=True,
        hints=(
            RegHint(match_rax=True, rax=1, send_sregs=True),
            RegHint(match_rax=True, rax=2, send_debugregs=True),
        ),
    )
    for rax, want_sregs, want_dregs in ((1, True, False), (2, False, True), (3, False, False)):
        proto, vcpu = running(SERIAL, hint=hint)
        vcpu.state[StateSet.REGS] = regs_with(rax)
        response = decode(proto.io_access(Space.IOPORT, 0x3F8, True, memoryview(bytearray(b"x"))))
        io = response.wait.io
        assert io.regs == vcpu.state[StateSet.REGS]
        assert (io.sregs == vcpu.state[StateSet.SREGS]) is want_sregs
        assert (io.debugregs == vcpu.state[StateSet.DEBUGREGS]) is want_dregs
        assert bool(io.sregs) is want_sregs and bool(io.debugregs) is want_dregs


def test_call_hint_needs_address_space_and_direction() -> None:
    hint = CallHint(Space.IOPORT, 0x3F8, on_write=True, hints=(RegHint(send_sregs=True),))
    proto, vcpu = running(SERIAL, ASYNC, MMIO, hint=hint)
    one = memoryview(bytearray(1))
    for space, address, is_write in (
        (Space.IOPORT, 0x3F9, True),  # other address
        (Space.IOPORT, 0x3F8, False),  # other direction
    ):
        response = decode(proto.io_access(space, address, is_write, one))
        assert response.wait.io.regs == b""
        proto.receive_request(encode(resume=VcpuRequest.Resume()))
    assert vcpu.log == []


def test_call_hint_never_applies_to_async_writes() -> None:
    hint = CallHint(Space.IOPORT, 0x80, on_write=True)
    proto, vcpu = running(ASYNC, hint=hint)
    response = decode(proto.io_access(Space.IOPORT, 0x80, True, memoryview(bytearray(1))))
    assert response.wait.io.no_resume and response.wait.io.regs == b""
    assert vcpu.log == []


def test_pause_sends_the_token_and_waits_for_resume() -> None:
    proto, _ = running()
    response = decode(proto.pause((1 << 64) - 1))
    assert response.wait.WhichOneof("exit") == "user"
    assert response.wait.user.user == (1 << 64) - 1
    assert proto.phase is Phase.SERVING
    response = decode(
        proto.receive_request(encode(get_state=VcpuRequest.GetState(set=VcpuRequest.MP)))
    )
    assert response.errno == 0
    proto.receive_request(encode(resume=VcpuRequest.Resume()))
    assert proto.phase is Phase.RUNNING


def test_hyperv_call_result_comes_from_resume_data() -> None:
    proto, _ = running()
    result = bytearray(8)
    response = decode(proto.hyperv_call(0x1234, 5, 6, memoryview(result)))
    call = response.wait.hyperv_call
    assert (call.input, call.params0, call.params1) == (0x1234, 5, 6)
    proto.receive_request(encode(resume=VcpuRequest.Resume(data=struct.pack("<Q", 0xABCDEF))))
    assert struct.unpack("<Q", result) == (0xABCDEF,)


def test_hyperv_synic() -> None:
    proto, _ = running()
    response = decode(proto.hyperv_synic(0x40000080, 1, 0x2000, 0x3000))
    synic = response.wait.hyperv_synic
    assert (synic.msr, synic.control, synic.evt_page, synic.msg_page) == (
        0x40000080,
        1,
        0x2000,
        0x3000,
    )
    assert proto.phase is Phase.SERVING


def test_exits_outside_running_are_local_errors() -> None:
    proto, _ = serving()
    with pytest.raises(LocalProtocolError):
        proto.protocol.access_forwarded()
    with pytest.raises(LocalProtocolError):
        proto.pause(1)
    with pytest.raises(LocalProtocolError):
        proto.hyperv_call(1, 2, 3, bytearray(8))


def test_range_label() -> None:
    assert range_label(SERIAL) == "ioport:0x3f8+8"
    assert range_label(MMIO) == "mmio:0xd0000000+4096"


# -- the actions themselves: what the protocol asks of the worker, in order --------------------


def steps_of(proto: VcpuProtocol, data: bytes) -> list[object]:
    """Drive `receive_request` by hand: each Call answered with zeros of its size."""
    steps = proto.receive_request(data)
    actions: list[object] = []
    try:
        action = next(steps)
        while True:
            actions.append(action)
            if isinstance(action, Call):
                action = steps.send((0, bytes(len(action.arg))))
            else:
                action = next(steps)
    except StopIteration:
        pass
    return actions


def running_protocol() -> VcpuProtocol:
    proto = VcpuProtocol()
    steps_of(proto, encode(wait=VcpuRequest.Wait()))
    steps_of(proto, encode(resume=VcpuRequest.Resume()))
    assert proto.phase is Phase.RUNNING
    return proto


def test_actions_are_values_of_every_field() -> None:
    """Equal (and of equal hashes) when of one kind and every field is, different when any one
    differs; printed field by field."""
    actions: list[object] = [Call(1, b"a"), Send(b"a"), Resume(b"a", None)]
    assert [hash(a) for a in actions] == [
        hash(Call(1, b"a")),
        hash(Send(b"a")),
        hash(Resume(b"a", None)),
    ]
    assert actions == [Call(1, b"a"), Send(b"a"), Resume(b"a", None)]
    for different in (
        Call(2, b"a"),
        Call(1, b"b"),
        Send(b"b"),
        Resume(b"b", None),
        Resume(b"a", Answer.ACCESS),
    ):
        assert different not in actions, different
    assert Call(1, bytearray(b"a")) == Call(1, b"a")
    assert repr(actions) == (
        "[Call(request=1, arg=b'a'), Send(data=b'a'), Resume(data=b'a', answer=None)]"
    )


def test_the_protocol_only_returns_actions() -> None:
    proto = VcpuProtocol()
    [init] = steps_of(proto, encode(wait=VcpuRequest.Wait()))
    assert isinstance(init, Send) and decode(init.data).wait.WhichOneof("exit") == "init"
    get = encode(get_state=VcpuRequest.GetState(set=VcpuRequest.REGS))
    call, send = steps_of(proto, get)
    assert isinstance(call, Call)
    assert call == Call(kvm.KVM_GET_REGS, bytes(STATE_SETS[StateSet.REGS][2]))
    assert isinstance(send, Send) and decode(send.data).get_state.state == bytes(len(call.arg))
    regs = bytes(STATE_SETS[StateSet.REGS][2])
    actions = steps_of(proto, encode(resume=VcpuRequest.Resume(data=b"ab", regs=regs)))
    assert actions == [Call(kvm.KVM_SET_REGS, regs), Resume(b"ab", None)]
    assert proto.phase is Phase.RUNNING


def test_a_failed_call_is_thrown_in_and_answered_with_its_errno() -> None:
    proto = VcpuProtocol()
    steps_of(proto, encode(wait=VcpuRequest.Wait()))
    steps = proto.receive_request(encode(get_state=VcpuRequest.GetState(set=VcpuRequest.FPU)))
    call = next(steps)
    assert isinstance(call, Call) and call.request == kvm.KVM_GET_FPU
    send = steps.throw(CallFailed(errno.EFAULT, call.request))
    assert isinstance(send, Send)
    response = decode(send.data)
    assert response.WhichOneof("message") == "get_state" and response.errno == errno.EFAULT
    with pytest.raises(StopIteration):
        next(steps)


def test_a_forwarded_access_is_answered_into_its_data_area() -> None:
    proto = running_protocol()
    proto.access_forwarded()
    assert proto.phase is Phase.SERVING
    [get, send] = steps_of(proto, encode(get_state=VcpuRequest.GetState(set=VcpuRequest.MP)))
    assert isinstance(get, Call) and isinstance(send, Send)
    actions = steps_of(proto, encode(resume=VcpuRequest.Resume(data=b"\x2a")))
    assert actions == [Resume(b"\x2a", Answer.ACCESS)]
    assert proto.phase is Phase.RUNNING


def test_a_hinted_access_fetches_registers_before_it_sends() -> None:
    proto = running_protocol()
    hint = CallHint(Space.IOPORT, 0x3F8, on_write=False, hints=(RegHint(send_debugregs=True),))
    steps = proto.hinted_access(Space.IOPORT, 0x3F8, False, b"\xff\xff", hint)
    regs_call = next(steps)
    assert regs_call == Call(kvm.KVM_GET_REGS, bytes(STATE_SETS[StateSet.REGS][2]))
    regs = regs_with(7)
    dregs_call = steps.send((0, regs))
    assert isinstance(dregs_call, Call) and dregs_call.request == kvm.KVM_GET_DEBUGREGS
    send = steps.send((0, b"\x01" * len(dregs_call.arg)))
    assert isinstance(send, Send)
    io = decode(send.data).wait.io
    assert (io.address, io.is_write, io.data, io.regs) == (0x3F8, False, bytes(2), regs)
    assert io.debugregs == b"\x01" * len(dregs_call.arg) and io.sregs == b""
    assert proto.phase is Phase.SERVING
    assert steps_of(proto, encode(resume=VcpuRequest.Resume(data=b"z"))) == [
        Resume(b"z", Answer.ACCESS)
    ]


def test_a_hypercall_is_answered_into_its_result() -> None:
    proto = running_protocol()
    proto.hyperv_call(1, 2, 3)
    assert steps_of(proto, encode(resume=VcpuRequest.Resume(data=b"12345678"))) == [
        Resume(b"12345678", Answer.HCALL_RESULT)
    ]
    proto.pause(5)
    assert steps_of(proto, encode(resume=VcpuRequest.Resume(data=b"x"))) == [Resume(b"x", None)]
