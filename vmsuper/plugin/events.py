"""Why a VCPU stopped: the wait reasons of the VCPU protocol as frozen dataclasses.

`Vcpu.wait` returns one of these. Every event except an `Io` with ``no_resume`` leaves the VCPU
stopped until `Vcpu.resume`; state may be read and written in between.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from vmsuper.shared import plugin_pb2 as pb

from .errors import ProtocolError
from .model import Space


@dataclass(frozen=True, slots=True)
class Init:
    """The first event of every VCPU: set its initial state, then resume."""


@dataclass(frozen=True, slots=True)
class Io:
    """An access to a reserved range.

    For a write, ``data`` holds what the guest wrote; for a read it is zeros whose length is the
    access length, and the value read is given to `Vcpu.resume`. ``no_resume`` marks a write to
    an async-write range: the VCPU already went on, and must not be resumed.
    """

    space: Space
    address: int
    is_write: bool
    no_resume: bool
    data: bytes

    @property
    def length(self) -> int:
        """Bytes accessed (all elements of a string I/O)."""
        return len(self.data)


@dataclass(frozen=True, slots=True)
class User:
    """The VCPU was paused by `Connection.pause_vcpus`; ``user`` is the token given there."""

    user: int


@dataclass(frozen=True, slots=True)
class HypervCall:
    """A Hyper-V hypercall; the 8-byte result is given to `Vcpu.resume`."""

    input: int
    params: tuple[int, int] = field(default=(0, 0))


@dataclass(frozen=True, slots=True)
class HypervSynic:
    """The guest changed a Hyper-V SynIC MSR."""

    msr: int
    control: int
    evt_page: int
    msg_page: int


VcpuEvent = Init | Io | User | HypervCall | HypervSynic

HYPERV_RESULT_SIZE = 8


def event_from_proto(wait: pb.VcpuResponse.Wait) -> VcpuEvent:
    """Decode a wait reason; a Wait without one is a protocol error."""
    kind = wait.WhichOneof("exit")
    if kind == "init":
        return Init()
    if kind == "io":
        io = wait.io
        try:
            space = Space(io.space)
        except ValueError:
            raise ProtocolError(f"I/O exit in unknown address space {io.space}", "wait") from None
        return Io(space, io.address, io.is_write, io.no_resume, bytes(io.data))
    if kind == "user":
        return User(wait.user.user)
    if kind == "hyperv_call":
        call = wait.hyperv_call
        return HypervCall(call.input, (call.params0, call.params1))
    if kind == "hyperv_synic":
        synic = wait.hyperv_synic
        return HypervSynic(synic.msr, synic.control, synic.evt_page, synic.msg_page)
    raise ProtocolError("Wait response without a wait reason", "wait")


def resume_data(event: VcpuEvent, data: bytes) -> bytes:
    """The Resume ``data`` for `event`: a read's value or a hypercall's result, zero-padded.

    Padding to the exact size makes the bytes the guest sees independent of how much the
    plugin gave; giving data where the event takes none is a bug and rejected.
    """
    if isinstance(event, Io) and not event.is_write:
        size = len(event.data)
    elif isinstance(event, HypervCall):
        size = HYPERV_RESULT_SIZE
    else:
        if data:
            raise ValueError(f"resume data given for {type(event).__name__}, which takes none")
        return b""
    if len(data) > size:
        raise ValueError(f"resume data is {len(data)} bytes, the access is {size}")
    return bytes(data).ljust(size, b"\0")
