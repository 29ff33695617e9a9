"""Fuzz target: the VCPU protocol state machine (`VcpuProtocol`), driven as its worker drives it.

Each input is a sequence of events for one VCPU: requests from the plugin (hostile valid
messages, damaged ones, garbage; sometimes refused by the worker for their form), and, while
the VCPU runs, guest exits (port and MMIO accesses around reserved and async ranges, Hyper-V
exits, pauses), with reserved ranges and the call hint changing in between and the fake VCPU
refusing ioctls now and then. A model of the contract (the table in vcpu_protocol.py) says
what each event must produce; the only exception allowed out is `ResumeFailed` for a Resume
whose register state cannot be applied, which stops the VCPU.

Long run (see docs/fuzzing.md)::

    .venv/bin/python -m tests.fuzz.vcpu_target -runs=1000000
"""

from __future__ import annotations

import contextlib
import errno
import struct
import sys
from dataclasses import dataclass, field

from google.protobuf.message import DecodeError

from vmsuper.shared import hotpath, kvm
from vmsuper.shared.abi import MAILBOX_ARG_SIZE
from vmsuper.shared.plugin_pb2 import VcpuRequest, VcpuResponse
from vmsuper.shared.ranges import CallHint, Range, RangeError, RangeTable, RegHint, Space
from vmsuper.workers.vcpu_protocol import (
    HV_CPUID_MAX_ENTRIES,
    STATE_SETS,
    CallFailed,
    Phase,
    ResumeFailed,
    VcpuProtocol,
    plain_resume_data,
)

from .hostile import (
    INTERESTING_U64,
    U64_MAX,
    VCPU_CASES,
    Chooser,
    FdpChooser,
    encoded,
    instrument,
    load_atheris,
    pick,
    u64,
    vcpu_request,
)

GET_REQUESTS = {entry[0]: state_set for state_set, entry in STATE_SETS.items()}
SET_REQUESTS = {entry[1]: state_set for state_set, entry in STATE_SETS.items()}
RESPONSE_CASES = frozenset(f.name for f in VcpuResponse.DESCRIPTOR.oneofs_by_name["message"].fields)
SYNIC_CAPS = frozenset((kvm.KVM_CAP_HYPERV_SYNIC, kvm.KVM_CAP_HYPERV_SYNIC2))
KNOWN_MSRS = frozenset((0x10, 0x174, 0x175, 0x176, 0xC000_0080, 0xC000_0100))
ANCHORS = (0, 0x3F8, 0x600, 0xCF8, 0xFFFF, 0xD000_0000, 0xFEE0_0000, U64_MAX - 7)
"""Addresses the ranges, the hint and the accesses cluster around (so they meet)."""
VCPU_CASE_MIX: tuple[str | None, ...] = (
    *(case for case in VCPU_CASES if case != "shutdown"), None, "resume", "resume", "resume",
)  # fmt: skip
"""Every case but Shutdown (which ends a sequence: it comes rarely, on its own), with more
Resumes: only running VCPUs make exits."""


class ModelMismatch(AssertionError):
    """What the state machine did is not what the contract says."""


def expect(condition: bool, what: str) -> None:
    if not condition:
        raise ModelMismatch(what)


@dataclass
class FakeVcpu:
    """The VCPU ioctls on plain state, refusing the ones in `refuse`; it asserts that every
    argument has the shape its ioctl needs, as the kernel would read it."""

    state: dict[int, bytes] = field(
        default_factory=lambda: {s: bytes([s + 1]) * size for s, (_, _, size) in STATE_SETS.items()}
    )
    msrs: dict[int, int] = field(default_factory=lambda: dict.fromkeys(KNOWN_MSRS, 7))
    hv_entries: int = 0
    refuse: dict[int, int] = field(default_factory=dict)
    calls: list[int] = field(default_factory=list)

    def call(self, request: int, arg: bytes | bytearray) -> tuple[int, bytes]:
        self.calls.append(request)
        if len(arg) > MAILBOX_ARG_SIZE:  # what MailboxCalls does
            raise CallFailed(errno.E2BIG, request)
        if request in self.refuse:
            raise CallFailed(self.refuse[request], request)
        if request in GET_REQUESTS:
            state_set = GET_REQUESTS[request]
            expect(len(arg) == STATE_SETS[state_set][2], "get with a misfit buffer")
            return 0, self.state[state_set]
        if request in SET_REQUESTS:
            state_set = SET_REQUESTS[request]
            expect(len(arg) == STATE_SETS[state_set][2], "set with a misfit buffer")
            self.state[state_set] = bytes(arg)
            return 0, bytes(arg)
        out = bytearray(arg)
        (count,) = struct.unpack_from("<I", arg)
        if request in (kvm.KVM_GET_MSRS, kvm.KVM_SET_MSRS):
            expect(len(arg) == 8 + 16 * count, "MSR buffer does not match its count")
            for i in range(count):
                index, data = struct.unpack_from("<I4xQ", arg, 8 + 16 * i)
                if index not in self.msrs:
                    return i, bytes(out)
                if request == kvm.KVM_SET_MSRS:
                    self.msrs[index] = data
                else:
                    struct.pack_into("<Q", out, 16 + 16 * i, self.msrs[index])
            return count, bytes(out)
        if request == kvm.KVM_SET_CPUID2:
            expect(len(arg) == 8 + 40 * count, "CPUID buffer does not match its count")
            return 0, bytes(out)
        if request == kvm.KVM_GET_SUPPORTED_HV_CPUID:
            expect(count == HV_CPUID_MAX_ENTRIES and len(arg) == 8 + 40 * count, "HV buffer")
            struct.pack_into("<I", out, 0, self.hv_entries)
            for i in range(self.hv_entries):
                struct.pack_into("<7I", out, 8 + 40 * i, 0x4000_0000 + i, i, i & 1, 1, 2, 3, 4)
            return 0, bytes(out)
        if request == kvm.KVM_ENABLE_CAP:
            expect(count in SYNIC_CAPS, f"KVM_ENABLE_CAP of capability {count}")
            return 0, bytes(out)
        raise ModelMismatch(f"unexpected ioctl {kvm.ioctl_name(request)}")

    def regs4(self) -> tuple[int, int, int, int]:
        rax, rbx, rcx, rdx = struct.unpack_from("<4Q", self.state[VcpuRequest.REGS])
        return rax, rbx, rcx, rdx


class FakeRanges:
    """The shared range table and hint as a worker sees them."""

    def __init__(self) -> None:
        self.table = RangeTable()
        self.hint: CallHint | None = None

    def lookup(self, space: Space, addr: int) -> Range | None:
        return self.table.lookup(space, addr)


def near_anchor(ch: Chooser) -> int:
    return min(max(pick(ch, ANCHORS) + ch.integer(-8, 8), 0), U64_MAX)


def access_address(ch: Chooser, ranges: FakeRanges, space: Space) -> int:
    """Mostly inside (or just past) a reserved range, else near an anchor."""
    held = list(ranges.table.ranges(space))
    if held and ch.integer(0, 3):
        rng = pick(ch, held)
        return min(rng.start + ch.integer(0, min(rng.length, 16)), U64_MAX)
    return near_anchor(ch)


def change_ranges(ch: Chooser, ranges: FakeRanges, vcpu: FakeVcpu) -> None:
    """What the main worker may do meanwhile: reserve, release, set or clear the hint."""
    space = pick(ch, list(Space))
    what = ch.integer(0, 3)
    if what <= 1:
        length = 0 if what == 1 else pick(ch, (1, 2, 8, 0x1000, ch.integer(1, 64)))
        with contextlib.suppress(RangeError):
            ranges.table.reserve(space, near_anchor(ch), length, async_write=ch.boolean())
        return
    if what == 2:
        ranges.hint = None
        return
    rax, rbx, rcx, rdx = vcpu.regs4()
    hints = tuple(
        RegHint(
            match_rax=ch.boolean(),
            match_rbx=ch.boolean(),
            match_rcx=ch.boolean(),
            match_rdx=ch.boolean(),
            rax=rax if ch.boolean() else u64(ch),
            rbx=rbx if ch.boolean() else u64(ch),
            rcx=rcx if ch.boolean() else u64(ch),
            rdx=rdx if ch.boolean() else u64(ch),
            send_sregs=ch.boolean(),
            send_debugregs=ch.boolean(),
        )
        for _ in range(ch.integer(0, 3))
    )
    ranges.hint = CallHint(space, access_address(ch, ranges, space), ch.boolean(), hints)


def check_plain_resume(data: bytes, decoded: VcpuRequest | None) -> None:
    """The Resume fast paths (Python's and the C loop's) must agree with each other, and with
    protobuf on every input they accept."""
    fast = plain_resume_data(data)
    in_c = hotpath.plain_resume(data)
    expect(in_c == fast, f"the C loop reads {in_c!r} from {data.hex()}, Python {fast!r}")
    if fast is None:
        return
    expect(decoded is not None, f"fast path took undecodable {data.hex()}")
    assert decoded is not None
    plain = VcpuRequest(resume=VcpuRequest.Resume(data=decoded.resume.data))
    expect(decoded == plain, f"fast path took {data.hex()}, which is not a plain Resume")
    expect(fast == decoded.resume.data, f"fast path read {fast.hex()} from {data.hex()}")


class VcpuHarness:
    """One VCPU's protocol and the model of what it must do."""

    def __init__(self) -> None:
        self.vcpu = FakeVcpu()
        self.ranges = FakeRanges()
        self.protocol = VcpuProtocol(self.vcpu, self.ranges)
        self.phase = Phase.INIT
        self.read_area: bytearray | None = None
        """The exit data a Resume answers (a read or a hypercall), if one is pending."""

    def run(self, ch: Chooser, most: int = 40) -> None:
        """A sequence of events; raises `ModelMismatch` (or what escaped) on a failure."""
        self.vcpu.hv_entries = ch.integer(0, HV_CPUID_MAX_ENTRIES)
        for _ in range(ch.integer(0, 4)):
            change_ranges(ch, self.ranges, self.vcpu)
        for _ in range(ch.integer(1, most)):
            if self.phase is Phase.STOPPED:
                return
            if ch.integer(0, 5) == 0:
                change_ranges(ch, self.ranges, self.vcpu)
            elif self.phase is Phase.RUNNING:
                self.exit(ch)
            elif not self.request(ch):
                return

    # -- requests --------------------------------------------------------------------------

    def request(self, ch: Chooser) -> bool:
        """One request; False when the VCPU stopped on a failed Resume."""
        cases = VCPU_CASE_MIX
        if ch.integer(0, 63) == 0:
            cases = ("shutdown",)
        elif self.phase is Phase.INIT and ch.boolean():
            cases = ("wait",)
        data = encoded(ch, lambda c: vcpu_request(c, cases))
        self.vcpu.refuse = {}
        if ch.integer(0, 7) == 0:
            request = pick(ch, [*GET_REQUESTS, *SET_REQUESTS, kvm.KVM_GET_MSRS, kvm.KVM_SET_MSRS])
            self.vcpu.refuse[request] = pick(ch, (errno.EINVAL, errno.EFAULT, errno.ENXIO))
        try:
            decoded: VcpuRequest | None = VcpuRequest.FromString(data)
        except DecodeError:
            decoded = None
        check_plain_resume(data, decoded)
        if ch.integer(0, 15) == 0:
            code = pick(ch, (errno.EINVAL, errno.EMSGSIZE))
            refusal = self.protocol.refuse_request(data, code, "refused by the worker")
            self.check_refusal(decoded, refusal, code)
            expect(self.protocol.phase is self.phase, "a refusal changed the phase")
            return True
        phase = self.phase
        calls_before = len(self.vcpu.calls)
        try:
            answer = self.protocol.receive_request(data)
        except ResumeFailed:
            expect(decoded is not None and self.resume_must_fail(decoded), "unwarranted")
            return False
        case = None if decoded is None else decoded.WhichOneof("message")
        if decoded is None or case is None:
            self.check_refusal(decoded, answer, errno.EBADMSG if decoded is None else errno.ENOTTY)
        elif case == "shutdown":
            expect(answer is None, "Shutdown was answered")
            self.phase = Phase.STOPPED
        elif phase is Phase.INIT:
            self.at_init(decoded, answer)
        elif case == "resume":
            self.resumed(decoded, answer)
        elif case == "wait":
            self.check_refusal(decoded, answer, errno.EPROTO)
        else:
            self.served(decoded, answer)
        expect(self.protocol.phase is self.phase, f"phase {self.protocol.phase}, not {self.phase}")
        if self.phase is Phase.INIT or (case == "wait" and phase is Phase.SERVING):
            expect(len(self.vcpu.calls) == calls_before, f"{case} refused after an ioctl")
        return True

    def check_refusal(self, request: VcpuRequest | None, answer: bytes | None, code: int) -> None:
        expect(answer is not None, "a refused request got no response")
        assert answer is not None
        response = VcpuResponse.FromString(answer)
        case = None if request is None else request.WhichOneof("message")
        want = case if case in RESPONSE_CASES else None
        got = response.WhichOneof("message")
        expect(got == want, f"refused {case} answered with case {got}")
        expect(response.errno == code, f"refused {case}: errno {response.errno}, not {code}")
        if got == "wait":
            expect(response.wait.WhichOneof("exit") is None, "a refused Wait carried a reason")

    def at_init(self, request: VcpuRequest, answer: bytes | None) -> None:
        if request.WhichOneof("message") != "wait":
            self.check_refusal(request, answer, errno.EPROTO)
            return
        expect(answer is not None, "the Init wait got no response")
        assert answer is not None
        response = VcpuResponse.FromString(answer)
        expect(response.errno == 0 and response.wait.WhichOneof("exit") == "init", "not Init")
        self.phase = Phase.SERVING

    def resume_must_fail(self, request: VcpuRequest) -> bool:
        resume = request.resume
        for blob, state_set in (
            (resume.regs, VcpuRequest.REGS),
            (resume.sregs, VcpuRequest.SREGS),
            (resume.debugregs, VcpuRequest.DEBUGREGS),
        ):
            if not blob:
                continue
            _, set_request, size = STATE_SETS[state_set]
            if len(blob) != size or set_request in self.vcpu.refuse:
                return True
        return False

    def resumed(self, request: VcpuRequest, answer: bytes | None) -> None:
        expect(not self.resume_must_fail(request), "a Resume that had to fail went through")
        expect(answer is None, "Resume was answered")
        area = self.read_area
        if area is not None:
            data = request.resume.data[: len(area)]
            want = data + bytes(len(area) - len(data))
            expect(area == want, f"read answered with {bytes(area).hex()}, not {want.hex()}")
            self.read_area = None
        self.phase = Phase.RUNNING

    def served(self, request: VcpuRequest, answer: bytes | None) -> None:
        case = request.WhichOneof("message")
        assert case is not None
        expect(answer is not None, f"{case} got no response")
        assert answer is not None
        response = VcpuResponse.FromString(answer)
        expect(response.WhichOneof("message") == case, f"{case} answered with another case")
        err = response.errno
        expect(err >= 0, f"{case}: negative errno")
        sub = getattr(request, case)
        if case in ("get_state", "set_state"):
            entry = STATE_SETS.get(sub.set)
            if entry is None or (case == "set_state" and len(sub.state) != entry[2]):
                expect(err == errno.EINVAL, f"{case} of a bad set or size: errno {err}")
            elif case == "get_state" and err == 0:
                expect(response.get_state.state == self.vcpu.state[sub.set], "wrong state")
        elif case == "enable_capability" and sub.capability not in SYNIC_CAPS:
            expect(err == errno.EINVAL, f"enabling capability {sub.capability}: errno {err}")
        elif case in ("get_msrs", "set_msrs"):
            if case == "get_msrs":
                indices = list(sub.entry_indices)
            else:
                indices = [e.index for e in sub.entries]
            if 8 + 16 * len(indices) > MAILBOX_ARG_SIZE:
                expect(err == errno.E2BIG, f"{case} of {len(indices)} MSRs: errno {err}")
            elif not all(i in self.vcpu.msrs for i in indices):
                expect(err != 0, f"{case} of an unknown MSR passed")
            elif case == "get_msrs" and err == 0:
                values = [self.vcpu.msrs[i] for i in indices]
                expect(list(response.get_msrs.entry_data) == values, "MSR values out of order")
        elif case == "set_cpuid" and 8 + 40 * len(sub.entries) > MAILBOX_ARG_SIZE:
            expect(err == errno.E2BIG, f"set_cpuid of {len(sub.entries)} entries: errno {err}")
        elif case == "get_hyperv_cpuid" and err == 0:
            entries = response.get_hyperv_cpuid.entries
            expect(len(entries) == self.vcpu.hv_entries, "Hyper-V CPUID entries lost")
        if err:
            for name in ("get_state", "get_msrs", "get_hyperv_cpuid"):
                if case == name:
                    expect(not getattr(response, name).ListFields(), f"failed {case} has data")

    # -- exits -----------------------------------------------------------------------------

    def exit(self, ch: Chooser) -> None:
        self.vcpu.refuse = {}  # the ioctls of an exit (hint registers) do not fail
        kind = ch.integer(0, 9)
        if kind == 0:
            token = pick(ch, INTERESTING_U64)
            response = self.wait_of(self.protocol.pause(token), "user")
            expect(response.wait.user.user == token, "pause token changed")
            self.read_area = None
            self.phase = Phase.SERVING
        elif kind == 1:
            area = bytearray(b"\xee" * 8)
            args = (u64(ch), u64(ch), u64(ch))
            answer = self.protocol.hyperv_call(*args, memoryview(area))
            response = self.wait_of(answer, "hyperv_call")
            call = response.wait.hyperv_call
            expect((call.input, call.params0, call.params1) == args, "hypercall changed")
            self.read_area = area
            self.phase = Phase.SERVING
        elif kind == 2:
            msr = ch.integer(0, 0xFFFF_FFFF)
            args = (u64(ch), u64(ch), u64(ch))
            response = self.wait_of(self.protocol.hyperv_synic(msr, *args), "hyperv_synic")
            synic = response.wait.hyperv_synic
            got = (synic.msr, synic.control, synic.evt_page, synic.msg_page)
            expect(got == (msr, *args), "SynIC exit changed")
            self.read_area = None
            self.phase = Phase.SERVING
        else:
            self.io(ch)
        expect(self.protocol.phase is self.phase, f"phase {self.protocol.phase}, not {self.phase}")

    def wait_of(self, answer: bytes | None, reason: str) -> VcpuResponse:
        expect(answer is not None, f"{reason} exit sent nothing")
        assert answer is not None
        response = VcpuResponse.FromString(answer)
        expect(response.errno == 0 and response.WhichOneof("message") == "wait", "not a wait")
        got = response.wait.WhichOneof("exit")
        expect(got == reason, f"{got} exit, not {reason}")
        return response

    def io(self, ch: Chooser) -> None:
        hint = self.ranges.hint
        if hint is not None and hint.is_set and ch.integer(0, 2) == 0:
            space, address = hint.space, hint.address  # mostly in the hinted direction
            is_write = hint.on_write if ch.integer(0, 3) else not hint.on_write
        else:
            space = pick(ch, list(Space))
            address = access_address(ch, self.ranges, space)
            is_write = ch.boolean()
        size = pick(ch, (1, 2, 4, 8)) * (1 if ch.integer(0, 3) else ch.integer(1, 64))
        area = bytearray(ch.blob(size).ljust(size, b"\xee"))
        before = bytes(area)
        rng = self.ranges.lookup(space, address)
        calls_before = len(self.vcpu.calls)
        answer = self.protocol.io_access(space, address, is_write, memoryview(area))
        if rng is None or (rng.async_write and not is_write):
            expect(answer is None, "an unreserved access was forwarded")
            expect(area == (before if is_write else bytes(size)), "unreserved access data")
            return
        response = self.wait_of(answer, "io")
        io = response.wait.io
        got = (io.space, io.address, io.is_write, io.data)
        want = (space, address, is_write, before if is_write else bytes(size))
        expect(got == want, f"Io {got} for access {want}")
        expect(area == before, "the access data changed before the plugin answered")
        if rng.async_write:
            expect(io.no_resume and not io.regs, "async write waits or carries registers")
            expect(len(self.vcpu.calls) == calls_before, "async write made ioctls")
            return
        expect(not io.no_resume, "a synchronous access said no_resume")
        hinted = hint is not None and hint.matches(space, address, is_write)
        expect(bool(io.regs) == hinted, f"regs sent: {bool(io.regs)}, hinted: {hinted}")
        if hinted:
            assert hint is not None
            sregs, debugregs = hint.extra_state(*self.vcpu.regs4())
            expect((bool(io.sregs), bool(io.debugregs)) == (sregs, debugregs), "extra state")
        self.read_area = None if is_write else area
        self.phase = Phase.SERVING


def TestOneInput(data: bytes) -> None:
    """libFuzzer's entry point: one input, one sequence on a fresh VCPU."""
    atheris = load_atheris()
    VcpuHarness().run(FdpChooser(atheris.FuzzedDataProvider(data)))


def main() -> None:
    atheris = load_atheris()
    instrument(atheris)
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
