"""One VCPU's channel: wait for exits, read and write its state, resume it.

The VCPU protocol in short: the client sends Wait once, the server answers Init when the VM
starts; from then on the VCPU is *stopped* in an event until `resume`, and the next event
arrives unsolicited. Writes to async-write ranges arrive as `Io` events with ``no_resume``:
the VCPU never stopped for them.

Registers (regs, sregs, debugregs) get special care because they are the hot path of I/O
handling, as in crosvm's client library:

- sets are *deferred*: kept here and carried by the next Resume, so "read registers, change
  them, resume" costs one round trip. A deferred set is sent on its own (SetState) only when
  something could tell the difference: a get of any register set, `get_msrs`, or any call
  that changes VCPU state — so the VCPU always sees changes in program order;
- registers sent eagerly with an `Io` event (the call hint) answer gets without a round trip
  until the VCPU resumes or something that might change them is sent.

A `Vcpu` is not thread-safe: use each one from one thread at a time (one thread per VCPU is
the usual shape of a plugin). It starts no threads; an event loop polls `fileno()` for
readability, but must call `wait` while `has_pending()` is true, because responses read
ahead of time (pipes) no longer make the fd readable.
"""

from __future__ import annotations

import ctypes
from collections.abc import Iterable, Mapping, Sequence
from typing import TypeVar

from vmsuper.shared import kvm
from vmsuper.shared import plugin_pb2 as pb

from .channel import VcpuChannel
from .errors import ProtocolError, VcpuStateError
from .events import Io, VcpuEvent, event_from_proto, resume_data
from .model import CpuidEntry, check_uint
from .responses import checked_response, vcpu_log
from .structs import StructLike, struct_from_bytes, struct_to_bytes

S = TypeVar("S", bound=ctypes.Structure)

StateSet = pb.VcpuRequest.StateSet
REGS = pb.VcpuRequest.REGS
SREGS = pb.VcpuRequest.SREGS
DEBUGREGS = pb.VcpuRequest.DEBUGREGS

DEFERRED: dict[StateSet, type[ctypes.Structure]] = {
    REGS: kvm.kvm_regs,
    SREGS: kvm.kvm_sregs,
    DEBUGREGS: kvm.kvm_debugregs,
}
"""The register sets whose sets ride on Resume, in the order the server applies them."""


class Vcpu:
    """Client side of one VCPU channel (see the module docstring for the rules)."""

    def __init__(self, index: int, channel: VcpuChannel) -> None:
        self._index = index
        self._channel = channel
        self._event: VcpuEvent | None = None
        self._waited = False
        self._closed = False
        self._pending: dict[StateSet, bytes] = {}
        self._cache: dict[StateSet, bytes] = {}

    def __repr__(self) -> str:
        if self._closed:
            state = "closed"
        elif self._event is not None:
            state = f"stopped in {self._event!r}"
        else:
            state = "running"
        return f"<Vcpu {self._index} {state}>"

    @property
    def index(self) -> int:
        """The VCPU's number (its position in `Connection.get_vcpus`)."""
        return self._index

    @property
    def event(self) -> VcpuEvent | None:
        """The event the VCPU is stopped in, or None while it runs."""
        return self._event

    def fileno(self) -> int:
        """The fd that turns readable when an event arrives (the response pipe, or the socket)."""
        return self._channel.fileno()

    def has_pending(self) -> bool:
        """True if an event was already read ahead: `wait` will return it without blocking."""
        return self._channel.has_pending()

    # --- the event cycle ---------------------------------------------------------------------

    def send_initial_wait(self) -> None:
        """Send the one Wait of the protocol; done once, when the VCPU list is fetched.

        Sending it early lets an event loop poll `fileno()` before the first `wait`; the
        server holds it unanswered until the VM starts.
        """
        if not self._waited:
            self._waited = True
            self._channel.send(pb.VcpuRequest(wait=pb.VcpuRequest.Wait()).SerializeToString())

    def wait(self) -> VcpuEvent:
        """Block until the next event and return it.

        Raises VcpuStateError if the VCPU is stopped (resume it first), ConnectionClosedError
        when the server closed the channel (the VM is shutting down).
        """
        self._check_open("wait")
        if self._event is not None:
            raise VcpuStateError(
                f"VCPU {self._index} is stopped in {self._event!r}: resume() it first", "wait"
            )
        self.send_initial_wait()
        response = self._recv("wait", "wait")
        event = event_from_proto(response.wait)
        if isinstance(event, Io) and event.no_resume:
            if not event.is_write:
                raise ProtocolError("a read came with no_resume (only writes can)", "wait")
            return event
        self._cache = self._eager_registers(response.wait)
        self._pending = {}
        self._event = event
        return event

    def resume(self, data: bytes = b"") -> None:
        """Let the stopped VCPU go on; ``data`` is a read's value or a hypercall's result.

        For a read, ``data`` may be shorter than the access (zero-padded), never longer; other
        events take no data. Deferred register sets go along in the same message. There is no
        answer: the next event arrives through `wait`.
        """
        self._check_open("resume")
        event = self._event
        if event is None:
            raise VcpuStateError(f"VCPU {self._index} is not stopped: nothing to resume", "resume")
        request = pb.VcpuRequest()
        resume = request.resume
        resume.data = resume_data(event, data)
        resume.regs = self._pending.get(REGS, b"")
        resume.sregs = self._pending.get(SREGS, b"")
        resume.debugregs = self._pending.get(DEBUGREGS, b"")
        self._channel.send(request.SerializeToString())
        self._pending = {}
        self._cache = {}
        self._event = None

    def shutdown(self) -> None:
        """Ask the server to stop serving this channel, then close it."""
        self._check_open("shutdown")
        try:
            self._channel.send(
                pb.VcpuRequest(shutdown=pb.VcpuRequest.Shutdown()).SerializeToString()
            )
        finally:
            self.close()

    def close(self) -> None:
        """Close the channel's fds (idempotent). The server sees a hang-up."""
        if not self._closed:
            self._closed = True
            self._event = None
            self._channel.close()

    # --- registers (deferred sets, hint cache) -----------------------------------------------

    def get_regs(self) -> kvm.kvm_regs:
        return self._get_register(kvm.kvm_regs, REGS, "get_regs")

    def set_regs(self, regs: StructLike) -> None:
        """Deferred: carried by the next Resume (or sent before a call that could observe it)."""
        self._set_register(kvm.kvm_regs, REGS, regs, "set_regs")

    def get_sregs(self) -> kvm.kvm_sregs:
        return self._get_register(kvm.kvm_sregs, SREGS, "get_sregs")

    def set_sregs(self, sregs: StructLike) -> None:
        """Deferred, like `set_regs`."""
        self._set_register(kvm.kvm_sregs, SREGS, sregs, "set_sregs")

    def get_debugregs(self) -> kvm.kvm_debugregs:
        return self._get_register(kvm.kvm_debugregs, DEBUGREGS, "get_debugregs")

    def set_debugregs(self, debugregs: StructLike) -> None:
        """Deferred, like `set_regs`."""
        self._set_register(kvm.kvm_debugregs, DEBUGREGS, debugregs, "set_debugregs")

    # --- other state (one round trip each) ---------------------------------------------------

    def get_fpu(self) -> kvm.kvm_fpu:
        return self._get_state(kvm.kvm_fpu, pb.VcpuRequest.FPU, "get_fpu")

    def set_fpu(self, fpu: StructLike) -> None:
        self._set_state(kvm.kvm_fpu, pb.VcpuRequest.FPU, fpu, "set_fpu")

    def get_xcrs(self) -> kvm.kvm_xcrs:
        return self._get_state(kvm.kvm_xcrs, pb.VcpuRequest.XCREGS, "get_xcrs")

    def set_xcrs(self, xcrs: StructLike) -> None:
        self._set_state(kvm.kvm_xcrs, pb.VcpuRequest.XCREGS, xcrs, "set_xcrs")

    def get_lapic(self) -> kvm.kvm_lapic_state:
        return self._get_state(kvm.kvm_lapic_state, pb.VcpuRequest.LAPIC, "get_lapic")

    def set_lapic(self, lapic: StructLike) -> None:
        self._set_state(kvm.kvm_lapic_state, pb.VcpuRequest.LAPIC, lapic, "set_lapic")

    def get_mp_state(self) -> kvm.kvm_mp_state:
        return self._get_state(kvm.kvm_mp_state, pb.VcpuRequest.MP, "get_mp_state")

    def set_mp_state(self, mp_state: StructLike) -> None:
        self._set_state(kvm.kvm_mp_state, pb.VcpuRequest.MP, mp_state, "set_mp_state")

    def get_vcpu_events(self) -> kvm.kvm_vcpu_events:
        return self._get_state(kvm.kvm_vcpu_events, pb.VcpuRequest.EVENTS, "get_vcpu_events")

    def set_vcpu_events(self, events: StructLike) -> None:
        self._set_state(kvm.kvm_vcpu_events, pb.VcpuRequest.EVENTS, events, "set_vcpu_events")

    def get_msrs(self, indices: Sequence[int]) -> list[int]:
        """Values of the MSRs `indices`, in the same order; a partial answer is an error."""
        request = pb.VcpuRequest()
        request.get_msrs.entry_indices.extend(check_uint("msr index", i, 32) for i in indices)
        response = self._transact(request, "get_msrs", flush=True, changes=False)
        values = list(response.get_msrs.entry_data)
        if len(values) != len(indices):
            raise ProtocolError(
                f"asked for {len(indices)} MSRs, the server returned {len(values)}", "get_msrs"
            )
        return values

    def set_msrs(self, entries: Mapping[int, int] | Iterable[tuple[int, int]]) -> None:
        """Write MSRs, given as {index: value} or (index, value) pairs, in order."""
        pairs = entries.items() if isinstance(entries, Mapping) else entries
        request = pb.VcpuRequest()
        for index, value in pairs:
            request.set_msrs.entries.add(
                index=check_uint("msr index", index, 32), data=check_uint("msr value", value, 64)
            )
        request.set_msrs.SetInParent()
        self._transact(request, "set_msrs", flush=True, changes=True)

    def set_cpuid(self, entries: Iterable[CpuidEntry]) -> None:
        """Set the CPUID the guest sees on this VCPU (replaces the whole table)."""
        request = pb.VcpuRequest()
        request.set_cpuid.entries.extend(entry.to_proto() for entry in entries)
        request.set_cpuid.SetInParent()
        self._transact(request, "set_cpuid", flush=True, changes=True)

    def get_hyperv_cpuid(self) -> list[CpuidEntry]:
        """The Hyper-V CPUID leaves KVM supports for this VCPU."""
        request = pb.VcpuRequest(get_hyperv_cpuid=pb.VcpuRequest.CpuidRequest())
        response = self._transact(request, "get_hyperv_cpuid", flush=False, changes=False)
        return [CpuidEntry.from_proto(e) for e in response.get_hyperv_cpuid.entries]

    def enable_capability(self, capability: int) -> None:
        """Enable a VCPU capability (the server allows the Hyper-V SynIC ones)."""
        request = pb.VcpuRequest()
        request.enable_capability.capability = check_uint("capability", capability, 32)
        request.enable_capability.SetInParent()
        self._transact(request, "enable_capability", flush=True, changes=True)

    # --- internals ---------------------------------------------------------------------------

    def _check_open(self, name: str) -> None:
        if self._closed:
            raise VcpuStateError(f"VCPU {self._index} channel is closed", name)

    def _check_stopped(self, name: str) -> None:
        self._check_open(name)
        if self._event is None:
            raise VcpuStateError(
                f"VCPU {self._index} is running: state is only reachable while it is stopped "
                "in an event",
                name,
            )

    def _eager_registers(self, wait: pb.VcpuResponse.Wait) -> dict[StateSet, bytes]:
        if wait.WhichOneof("exit") != "io":
            return {}
        io = wait.io
        cache: dict[StateSet, bytes] = {}
        for state_set, data in ((REGS, io.regs), (SREGS, io.sregs), (DEBUGREGS, io.debugregs)):
            if data:
                cls = DEFERRED[state_set]
                struct_from_bytes(cls, data, "wait")  # size check
                cache[state_set] = bytes(data)
        return cache

    def _get_register(self, cls: type[S], state_set: StateSet, name: str) -> S:
        self._check_stopped(name)
        self._flush(name)
        cached = self._cache.get(state_set)
        if cached is not None:
            return cls.from_buffer_copy(cached)
        return self._get_state(cls, state_set, name)

    def _set_register(
        self, cls: type[ctypes.Structure], state_set: StateSet, value: StructLike, name: str
    ) -> None:
        self._check_stopped(name)
        data = struct_to_bytes(cls, value)
        self._cache.pop(state_set, None)
        self._pending.pop(state_set, None)  # re-insert: the latest set goes last
        self._pending[state_set] = data

    def _flush(self, name: str) -> None:
        """Send deferred register sets now, in the order the server would apply them."""
        for state_set in DEFERRED:
            data = self._pending.pop(state_set, None)
            if data is not None:
                request = pb.VcpuRequest()
                request.set_state.set = state_set
                request.set_state.state = data
                request.set_state.SetInParent()
                self._send_recv(request, "set_state", name)

    def _get_state(self, cls: type[S], state_set: StateSet, name: str) -> S:
        request = pb.VcpuRequest()
        request.get_state.set = state_set
        request.get_state.SetInParent()
        response = self._transact(request, name, flush=True, changes=False)
        return struct_from_bytes(cls, response.get_state.state, name)

    def _set_state(
        self, cls: type[ctypes.Structure], state_set: StateSet, value: StructLike, name: str
    ) -> None:
        request = pb.VcpuRequest()
        request.set_state.set = state_set
        request.set_state.state = struct_to_bytes(cls, value)
        self._transact(request, name, flush=True, changes=True)

    def _transact(
        self, request: pb.VcpuRequest, name: str, *, flush: bool, changes: bool
    ) -> pb.VcpuResponse:
        """One request/response while stopped.

        ``flush`` sends deferred sets first (the request could observe or override them);
        ``changes`` drops the eager register cache (the request may change registers).
        """
        self._check_stopped(name)
        if flush:
            self._flush(name)
        if changes:
            self._cache = {}
        case = request.WhichOneof("message")
        assert case is not None
        return self._send_recv(request, case, name)

    def _send_recv(self, request: pb.VcpuRequest, case: str, name: str) -> pb.VcpuResponse:
        self._channel.send(request.SerializeToString())
        return self._recv(case, name)

    def _recv(self, case: str, name: str) -> pb.VcpuResponse:
        return checked_response(
            self._channel.recv(), pb.VcpuResponse(), case, name, log=vcpu_log(self._index)
        )
