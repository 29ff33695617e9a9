"""Hostile plugin input: valid messages with extreme values, garbage bytes, and odd fds.

Every generator takes its decisions from a `Chooser`, so the same code drives atheris (choices
read from libFuzzer's bytes), hypothesis (draws it can shrink) and a seeded `random.Random`
(a plugin process flooding a real supervisor). Messages are built from the schema's
descriptors, so a field added to plugin.proto is fuzzed without touching this file; `TWEAKS`
only biases the fields whose meaning decides how deep a request gets (ids, sizes, alignment).
"""

from __future__ import annotations

import ctypes
import gc
import importlib
import random
import types
from collections.abc import Callable, Sequence
from typing import Any, Protocol, TypeVar, cast

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from vmsuper.shared import kvm
from vmsuper.shared.plugin_pb2 import MainRequest, VcpuRequest

T = TypeVar("T")

U64_MAX = (1 << 64) - 1
U32_MAX = (1 << 32) - 1
PAGE = 0x1000
BULK = 16
"""Repeated fields longer than this are filled from one template, not element by element."""

INTERESTING_U64 = (
    0, 1, 2, 0xFFF, PAGE, 0x2000, 0x10000, 0x7FFF_FFFF, 0x8000_0000, U32_MAX, 1 << 32,
    (1 << 63) - 1, 1 << 63, U64_MAX - PAGE + 1, U64_MAX - 1, U64_MAX,
)  # fmt: skip
INTERESTING_U32 = tuple(v for v in INTERESTING_U64 if v <= U32_MAX)
INTERESTING_I32 = (0, 1, 2, 3, 4, 5, 7, 8, 99, -1, -(1 << 31), (1 << 31) - 1)
OBJECT_IDS = (0, 1, 2, 3, U32_MAX)
"""A small id pool, so creates collide (EEXIST) and destroys find their objects."""


class Chooser(Protocol):
    """Where a generator's decisions come from."""

    def integer(self, low: int, high: int) -> int:
        """An integer in [low, high]."""
        ...

    def boolean(self) -> bool: ...

    def blob(self, max_size: int) -> bytes:
        """Up to `max_size` arbitrary bytes."""
        ...


class RandomChooser:
    """A `Chooser` over `random.Random` (seeded: a failing run can be replayed)."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)

    def integer(self, low: int, high: int) -> int:
        return self.rng.randint(low, high)

    def boolean(self) -> bool:
        return self.rng.random() < 0.5

    def blob(self, max_size: int) -> bytes:
        return self.rng.randbytes(self.rng.randint(0, max_size))


def pick(ch: Chooser, options: Sequence[T]) -> T:
    return options[ch.integer(0, len(options) - 1)]


def u64(ch: Chooser) -> int:
    return pick(ch, INTERESTING_U64) if ch.boolean() else ch.integer(0, U64_MAX)


def u32(ch: Chooser) -> int:
    return pick(ch, INTERESTING_U32) if ch.boolean() else ch.integer(0, U32_MAX)


def page_multiple(ch: Chooser, max_pages: int = 32) -> int:
    """Mostly small page-aligned values (what gets past the checks), sometimes anything."""
    choice = ch.integer(0, 7)
    if choice == 0:
        return u64(ch)
    if choice == 1:
        return ch.integer(0, 0x3FFFF)  # often unaligned
    return ch.integer(0, max_pages) * PAGE


def guest_start(ch: Chooser) -> int:
    """Where memory goes: one of a few 64 KiB-spaced places (so slots overlap), or anything."""
    return ch.integer(0, 7) * 0x10000 if ch.integer(0, 3) else page_multiple(ch, 1 << 20)


def memory_length(ch: Chooser) -> int:
    return pick(ch, (PAGE, 0x2000, 0x10000)) if ch.integer(0, 3) else page_multiple(ch, 16)


def memory_offset(ch: Chooser) -> int:
    return 0 if ch.boolean() else page_multiple(ch, 4)


def enum_value(ch: Chooser, descriptor: FieldDescriptor) -> int:
    """A defined value mostly; proto3 enums are open, so any int32 can arrive."""
    assert descriptor.enum_type is not None
    if ch.integer(0, 3):
        return pick(ch, sorted(descriptor.enum_type.values_by_number))
    return pick(ch, INTERESTING_I32) if ch.boolean() else ch.integer(-(1 << 31), (1 << 31) - 1)


def sized(ch: Chooser, size: int) -> bytes:
    """Exactly `size` bytes (arbitrary contents), or a near miss, or nothing."""
    choice = ch.integer(0, 5)
    if choice == 0:
        return b""
    if choice == 1:
        return ch.blob(size + 8)
    data = ch.blob(size)
    data += bytes(size - len(data))
    return data[: size - 1] if choice == 2 else data


def _small_count(ch: Chooser) -> int:
    return ch.integer(0, 3)


def _count_or(*big: int) -> Callable[[Chooser], int]:
    """A repeated field's length: usually small, sometimes one of `big` (limits)."""

    def count(ch: Chooser) -> int:
        return pick(ch, big) if ch.integer(0, 7) == 0 else _small_count(ch)

    return count


def _state_bytes(sizes: dict[int, int]) -> Callable[[Chooser, Message], bytes]:
    """The `state` of a SetState: the exact size of its set mostly."""

    def state(ch: Chooser, message: Any) -> bytes:
        size = sizes.get(message.set)
        return ch.blob(64) if size is None else sized(ch, size)

    return state


def _resume_state(state_set: int) -> Callable[[Chooser, Message], bytes]:
    size = ctypes.sizeof(_VCPU_STATE_TYPES[state_set])

    def state(ch: Chooser, message: Message) -> bytes:
        # Mostly empty (nothing to apply): a wrong size stops the VCPU, as documented.
        return sized(ch, size) if ch.integer(0, 7) == 0 else b""

    return state


MAIN_STATE_SIZES: dict[int, int] = {
    MainRequest.PIC0: ctypes.sizeof(kvm.kvm_pic_state),
    MainRequest.PIC1: ctypes.sizeof(kvm.kvm_pic_state),
    MainRequest.IOAPIC: ctypes.sizeof(kvm.kvm_ioapic_state),
    MainRequest.PIT: ctypes.sizeof(kvm.kvm_pit_state2),
    MainRequest.CLOCK: ctypes.sizeof(kvm.kvm_clock_data),
}
_VCPU_STATE_TYPES: dict[int, Any] = {
    VcpuRequest.REGS: kvm.kvm_regs,
    VcpuRequest.SREGS: kvm.kvm_sregs,
    VcpuRequest.FPU: kvm.kvm_fpu,
    VcpuRequest.DEBUGREGS: kvm.kvm_debugregs,
    VcpuRequest.LAPIC: kvm.kvm_lapic_state,
    VcpuRequest.MP: kvm.kvm_mp_state,
    VcpuRequest.XCREGS: kvm.kvm_xcrs,
    VcpuRequest.EVENTS: kvm.kvm_vcpu_events,
}
VCPU_STATE_SIZES: dict[int, int] = {k: ctypes.sizeof(v) for k, v in _VCPU_STATE_TYPES.items()}

ValueTweak = Callable[[Chooser, Message], Any]
TWEAKS: dict[str, ValueTweak] = {
    "vmsuper.MainRequest.Create.id": lambda ch, _m: pick(ch, OBJECT_IDS),
    "vmsuper.MainRequest.Destroy.id": lambda ch, _m: pick(ch, OBJECT_IDS),
    "vmsuper.MainRequest.MemoryDirtyLog.id": lambda ch, _m: pick(ch, OBJECT_IDS),
    "vmsuper.MainRequest.Create.Memory.offset": lambda ch, _m: memory_offset(ch),
    "vmsuper.MainRequest.Create.Memory.start": lambda ch, _m: guest_start(ch),
    "vmsuper.MainRequest.Create.Memory.length": lambda ch, _m: memory_length(ch),
    "vmsuper.MainRequest.Create.IoEvent.length": lambda ch, _m: pick(ch, (0, 1, 2, 3, 4, 8, 16)),
    "vmsuper.MainRequest.ReserveRange.length": lambda ch, _m: pick(ch, (0, 1, 8, PAGE, U64_MAX)),
    "vmsuper.MainRequest.SetState.state": _state_bytes(MAIN_STATE_SIZES),
    "vmsuper.MainRequest.SetIdentityMapAddr.address": lambda ch, _m: page_multiple(ch, 1 << 20),
    "vmsuper.MainRequest.PauseVcpus.cpu_mask": lambda ch, _m: pick(ch, (0, 1, 2, 3, U64_MAX)),
    "vmsuper.VcpuRequest.SetState.state": _state_bytes(VCPU_STATE_SIZES),
    "vmsuper.VcpuRequest.Resume.regs": _resume_state(VcpuRequest.REGS),
    "vmsuper.VcpuRequest.Resume.sregs": _resume_state(VcpuRequest.SREGS),
    "vmsuper.VcpuRequest.Resume.debugregs": _resume_state(VcpuRequest.DEBUGREGS),
    "vmsuper.VcpuRequest.Resume.data": lambda ch, _m: ch.blob(16),
}
"""Field full name -> how its value is chosen (instead of the generic rule for its type)."""

COUNTS: dict[str, Callable[[Chooser], int]] = {
    # KVM takes 4096 routes; the main worker's limit is the same.
    "vmsuper.MainRequest.SetIrqRouting.routes": _count_or(4096, 4097),
    # The shared table holds 16 register hints.
    "vmsuper.MainRequest.SetCallHint.hints": _count_or(16, 17),
    # Beyond the 64 KiB mailbox of a VCPU's runner.
    "vmsuper.VcpuRequest.GetMsrs.entry_indices": _count_or(4095, 4096),
    "vmsuper.VcpuRequest.SetMsrs.entries": _count_or(4095, 4096),
    "vmsuper.VcpuRequest.SetCpuid.entries": _count_or(256, 1700),
}
"""Repeated field full name -> how many elements it gets (default: 0..3)."""

_C = FieldDescriptor


def _scalar(ch: Chooser, fd: FieldDescriptor, message: Message) -> Any:
    tweak = TWEAKS.get(fd.full_name)
    cpp = fd.cpp_type
    if tweak is not None:
        value = tweak(ch, message)
        return value & U32_MAX if cpp == _C.CPPTYPE_UINT32 else value
    if cpp == _C.CPPTYPE_BOOL:
        return ch.boolean()
    if cpp == _C.CPPTYPE_UINT64:
        return u64(ch)
    if cpp == _C.CPPTYPE_UINT32:
        return u32(ch)
    if cpp == _C.CPPTYPE_INT32:
        return pick(ch, INTERESTING_I32) if ch.boolean() else ch.integer(-(1 << 31), (1 << 31) - 1)
    if cpp == _C.CPPTYPE_INT64:
        return ch.integer(-(1 << 63), (1 << 63) - 1)
    if cpp == _C.CPPTYPE_ENUM:
        return enum_value(ch, fd)
    if cpp == _C.CPPTYPE_STRING:
        return ch.blob(48)
    raise TypeError(f"no generator for field {fd.full_name} (cpp type {cpp})")


def fill(ch: Chooser, message: Message, depth: int = 0) -> None:
    """Give `message` hostile field values: each field set or left at its default, one member
    (or none) of each oneof, repeated fields of a few or of limit-testing lengths."""
    descriptor = message.DESCRIPTOR
    chosen: set[str] = set()
    for oneof in descriptor.oneofs:
        options = [f.name for f in oneof.fields]
        which = ch.integer(0, len(options))  # len(options): none of them
        if which < len(options):
            chosen.add(options[which])
    # Descriptor order is field-number order: a SetState's `set` is chosen before its `state`.
    for fd in descriptor.fields:
        if fd.containing_oneof is not None:
            if fd.name not in chosen:
                continue
        elif not ch.integer(0, 3):
            continue  # left at its default (absent on the wire)
        _fill_field(ch, message, cast(FieldDescriptor, fd), depth)


def _fill_field(ch: Chooser, message: Message, fd: FieldDescriptor, depth: int) -> None:
    name = fd.name
    if fd.is_repeated:
        count = COUNTS.get(fd.full_name, _small_count)(ch)
        target = getattr(message, name)
        if fd.cpp_type == _C.CPPTYPE_MESSAGE:
            template = None
            for i in range(count):
                element = target.add()
                if i < BULK:
                    fill(ch, element, depth + 1)
                    template = element
                elif template is not None:
                    element.CopyFrom(template)
        else:
            first = [_scalar(ch, fd, message) for _ in range(min(count, BULK))]
            target.extend(first)
            if count > BULK and first:
                target.extend(first[i % len(first)] for i in range(count - BULK))
        return
    if fd.cpp_type == _C.CPPTYPE_MESSAGE:
        sub = getattr(message, name)
        sub.SetInParent()
        if depth < 4:
            fill(ch, sub, depth + 1)
        return
    setattr(message, name, _scalar(ch, fd, message))


MAIN_CASES: tuple[str, ...] = tuple(
    f.name for f in MainRequest.DESCRIPTOR.oneofs_by_name["message"].fields
)
VCPU_CASES: tuple[str, ...] = tuple(
    f.name for f in VcpuRequest.DESCRIPTOR.oneofs_by_name["message"].fields
)


MAIN_CASE_MIX: tuple[str | None, ...] = (
    *MAIN_CASES, None, "create", "create", "create", "destroy", "destroy", "dirty_log",
)  # fmt: skip
"""Every case, and more of those whose effect later requests act on (objects)."""


def main_request(ch: Chooser, cases: Sequence[str | None] = MAIN_CASE_MIX) -> MainRequest:
    """A MainRequest of one of `cases` (None: no message at all), its fields hostile."""
    request = MainRequest()
    case = pick(ch, cases)
    if case is not None:
        sub = getattr(request, case)
        sub.SetInParent()
        fill(ch, sub, 1)
    return request


def vcpu_request(ch: Chooser, cases: Sequence[str | None] = (*VCPU_CASES, None)) -> VcpuRequest:
    request = VcpuRequest()
    case = pick(ch, cases)
    if case is not None:
        sub = getattr(request, case)
        sub.SetInParent()
        fill(ch, sub, 1)
    return request


def takes_memfd(request: MainRequest | None) -> bool:
    """Whether `request` is a Create.memory, the one request that carries an fd."""
    return (
        request is not None
        and request.WhichOneof("message") == "create"
        and request.create.WhichOneof("constructor") == "memory"
    )


def mutate(ch: Chooser, data: bytes) -> bytes:
    """Damage an encoded message: cut it, flip a byte, insert or append garbage."""
    how = ch.integer(0, 4)
    if how == 0 or not data:
        return data + ch.blob(8)
    at = ch.integer(0, len(data) - 1)
    if how == 1:
        return data[:at]
    if how == 2:
        return data[:at] + bytes([data[at] ^ ch.integer(1, 255)]) + data[at + 1 :]
    if how == 3:
        return data[:at] + ch.blob(4) + data[at:]
    return data + data  # a message twice: fields merge, the last oneof member wins


def encoded(ch: Chooser, build: Callable[[Chooser], Message]) -> bytes:
    """Bytes for one request: mostly a hostile valid message, else damaged or raw garbage."""
    mode = ch.integer(0, 7)
    if mode == 0:
        return ch.blob(64)
    data = build(ch).SerializeToString()
    return mutate(ch, data) if mode == 1 else data


class FdpChooser:
    """A `Chooser` over atheris' `FuzzedDataProvider` (libFuzzer's bytes decide). Once the
    input runs out every choice is its lowest option, so sequences end on their own."""

    def __init__(self, provider: Any) -> None:
        self._fdp = provider

    def integer(self, low: int, high: int) -> int:
        return int(self._fdp.ConsumeIntInRange(low, high))

    def boolean(self) -> bool:
        return bool(self._fdp.ConsumeBool())

    def blob(self, max_size: int) -> bytes:
        return bytes(self._fdp.ConsumeBytes(self._fdp.ConsumeIntInRange(0, max_size)))


def load_atheris() -> Any:
    """atheris, imported only where a target runs under it (it is a test extra, untyped)."""
    return importlib.import_module("atheris")


def instrument(atheris: Any, prefix: str = "vmsuper.") -> int:
    """Give atheris coverage of vmsuper's own Python code (not of everything loaded, which
    takes many seconds); returns how many functions were instrumented."""
    funcs = [
        obj
        for obj in gc.get_objects()
        if isinstance(obj, types.FunctionType) and (obj.__module__ or "").startswith(prefix)
    ]
    for func in funcs:
        atheris.instrument_func(func)
    return len(funcs)
