"""Typed bindings to the KVM API (x86_64): kernel structs, ioctl numbers, thin fd wrappers.

Everything vmsuper passes to or reads from the kernel goes through this module, so every
struct is defined once, with the exact layout of `<linux/kvm.h>` (tests/test_kvm_layout.py
compiles a C program against the installed header and compares every size, offset and
number). Ioctl numbers are computed from the `_IO/_IOR/_IOW/_IOWR` encoding with the struct's
`ctypes.sizeof`, never pasted.

Calls go through libc's `ioctl` via ctypes, which releases the GIL (runner threads block in
`KVM_RUN` concurrently) and takes any 64-bit address, including one into shared memory.
A failed call raises `KvmError`, an `OSError` carrying the errno and the ioctl's name.

`Kvm`, `Vm` and `Vcpu` each own one fd, in the style of rust-vmm's kvm-ioctls. The rare exits
(Hyper-V, shutdown, internal error, failed entry, hlt) are decoded from the mmapped `kvm_run`
page into small immutable records (`decode_exit`); I/O and MMIO exits are decoded by the exit
engine in C (`hotpath.c`, `vms_decode_access`).

KVM binds a VM to the process that created it: VM and VCPU ioctls from any other process,
a forked child included, fail with `EIO`. A child can still `mmap` an inherited VCPU fd
(`map_run`) and read and write the shared `kvm_run` page.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import mmap
import os
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any, Final, Self, TypeAlias, TypeVar

from vmsuper.shared.records import Record

if TYPE_CHECKING:
    from ctypes import _CData

    Argument: TypeAlias = _CData | int | bytearray | memoryview | mmap.mmap | None

u8 = ctypes.c_uint8
u16 = ctypes.c_uint16
u32 = ctypes.c_uint32
u64 = ctypes.c_uint64
s32 = ctypes.c_int32
s64 = ctypes.c_int64

# ---------------------------------------------------------------------------------------------
# ioctl number encoding (asm-generic/ioctl.h)

_IOC_NRBITS: Final = 8
_IOC_TYPEBITS: Final = 8
_IOC_SIZEBITS: Final = 14
_IOC_NRSHIFT: Final = 0
_IOC_TYPESHIFT: Final = _IOC_NRSHIFT + _IOC_NRBITS
_IOC_SIZESHIFT: Final = _IOC_TYPESHIFT + _IOC_TYPEBITS
_IOC_DIRSHIFT: Final = _IOC_SIZESHIFT + _IOC_SIZEBITS
_IOC_NONE: Final = 0
_IOC_WRITE: Final = 1
_IOC_READ: Final = 2

CType: TypeAlias = "type[ctypes.Structure] | type[ctypes.Union] | type[ctypes._SimpleCData[Any]]"


def _IOC(direction: int, type_: int, nr: int, size: int) -> int:
    if size >= 1 << _IOC_SIZEBITS:
        raise ValueError(f"ioctl argument size {size} does not fit the encoding")
    return (
        (direction << _IOC_DIRSHIFT)
        | (type_ << _IOC_TYPESHIFT)
        | (nr << _IOC_NRSHIFT)
        | (size << _IOC_SIZESHIFT)
    )


def _IO(type_: int, nr: int) -> int:
    return _IOC(_IOC_NONE, type_, nr, 0)


def _IOR(type_: int, nr: int, arg: CType) -> int:
    return _IOC(_IOC_READ, type_, nr, ctypes.sizeof(arg))


def _IOW(type_: int, nr: int, arg: CType) -> int:
    return _IOC(_IOC_WRITE, type_, nr, ctypes.sizeof(arg))


def _IOWR(type_: int, nr: int, arg: CType) -> int:
    return _IOC(_IOC_READ | _IOC_WRITE, type_, nr, ctypes.sizeof(arg))


# ---------------------------------------------------------------------------------------------
# Structures (asm/kvm.h for x86, then linux/kvm.h). Anonymous C members get a ctypes name
# listed in `_anonymous_`, so `level.irq` works as in C; their types are named after the path.


class kvm_regs(ctypes.Structure):
    _fields_ = [
        (name, u64)
        for name in (
            *("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp"),
            *("r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15"),
            *("rip", "rflags"),
        )
    ]


class kvm_segment(ctypes.Structure):
    _fields_ = [
        ("base", u64),
        ("limit", u32),
        ("selector", u16),
        ("type", u8),
        ("present", u8),
        ("dpl", u8),
        ("db", u8),
        ("s", u8),
        ("l", u8),
        ("g", u8),
        ("avl", u8),
        ("unusable", u8),
        ("padding", u8),
    ]


class kvm_dtable(ctypes.Structure):
    _fields_ = [("base", u64), ("limit", u16), ("padding", u16 * 3)]


KVM_NR_INTERRUPTS: Final = 256


class kvm_sregs(ctypes.Structure):
    _fields_ = [
        *((name, kvm_segment) for name in ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt")),
        ("gdt", kvm_dtable),
        ("idt", kvm_dtable),
        ("cr0", u64),
        ("cr2", u64),
        ("cr3", u64),
        ("cr4", u64),
        ("cr8", u64),
        ("efer", u64),
        ("apic_base", u64),
        ("interrupt_bitmap", u64 * ((KVM_NR_INTERRUPTS + 63) // 64)),
    ]


class kvm_fpu(ctypes.Structure):
    _fields_ = [
        ("fpr", (u8 * 16) * 8),
        ("fcw", u16),
        ("fsw", u16),
        ("ftwx", u8),
        ("pad1", u8),
        ("last_opcode", u16),
        ("last_ip", u64),
        ("last_dp", u64),
        ("xmm", (u8 * 16) * 16),
        ("mxcsr", u32),
        ("pad2", u32),
    ]


class kvm_debugregs(ctypes.Structure):
    _fields_ = [
        ("db", u64 * 4),
        ("dr6", u64),
        ("dr7", u64),
        ("flags", u64),
        ("reserved", u64 * 9),
    ]


KVM_APIC_REG_SIZE: Final = 0x400


class kvm_lapic_state(ctypes.Structure):
    # C declares `char regs[]`; unsigned bytes are easier to handle and have the same layout.
    _fields_ = [("regs", u8 * KVM_APIC_REG_SIZE)]


class kvm_mp_state(ctypes.Structure):
    _fields_ = [("mp_state", u32)]


KVM_MAX_XCRS: Final = 16


class kvm_xcr(ctypes.Structure):
    _fields_ = [("xcr", u32), ("reserved", u32), ("value", u64)]


class kvm_xcrs(ctypes.Structure):
    _fields_ = [
        ("nr_xcrs", u32),
        ("flags", u32),
        ("xcrs", kvm_xcr * KVM_MAX_XCRS),
        ("padding", u64 * 16),
    ]


class kvm_vcpu_events_exception(ctypes.Structure):
    _fields_ = [
        ("injected", u8),
        ("nr", u8),
        ("has_error_code", u8),
        ("pending", u8),
        ("error_code", u32),
    ]


class kvm_vcpu_events_interrupt(ctypes.Structure):
    _fields_ = [("injected", u8), ("nr", u8), ("soft", u8), ("shadow", u8)]


class kvm_vcpu_events_nmi(ctypes.Structure):
    _fields_ = [("injected", u8), ("pending", u8), ("masked", u8), ("pad", u8)]


class kvm_vcpu_events_smi(ctypes.Structure):
    _fields_ = [("smm", u8), ("pending", u8), ("smm_inside_nmi", u8), ("latched_init", u8)]


class kvm_vcpu_events_triple_fault(ctypes.Structure):
    _fields_ = [("pending", u8)]


class kvm_vcpu_events(ctypes.Structure):
    _fields_ = [
        ("exception", kvm_vcpu_events_exception),
        ("interrupt", kvm_vcpu_events_interrupt),
        ("nmi", kvm_vcpu_events_nmi),
        ("sipi_vector", u32),
        ("flags", u32),
        ("smi", kvm_vcpu_events_smi),
        ("triple_fault", kvm_vcpu_events_triple_fault),
        ("reserved", u8 * 26),
        ("exception_has_payload", u8),
        ("exception_payload", u64),
    ]


class kvm_msr_entry(ctypes.Structure):
    _fields_ = [("index", u32), ("reserved", u32), ("data", u64)]


class kvm_msrs(ctypes.Structure):
    """Header only: `entries` is C's flexible array; use `msrs_buffer(n)` for a real one."""

    _fields_ = [("nmsrs", u32), ("pad", u32), ("entries", kvm_msr_entry * 0)]


class kvm_msr_list(ctypes.Structure):
    """Header only; see `msr_list_buffer(n)`."""

    _fields_ = [("nmsrs", u32), ("indices", u32 * 0)]


class kvm_cpuid_entry2(ctypes.Structure):
    _fields_ = [
        ("function", u32),
        ("index", u32),
        ("flags", u32),
        ("eax", u32),
        ("ebx", u32),
        ("ecx", u32),
        ("edx", u32),
        ("padding", u32 * 3),
    ]


class kvm_cpuid2(ctypes.Structure):
    """Header only; see `cpuid2_buffer(n)`."""

    _fields_ = [("nent", u32), ("padding", u32), ("entries", kvm_cpuid_entry2 * 0)]


class kvm_pic_state(ctypes.Structure):
    _fields_ = [
        (name, u8)
        for name in (
            *("last_irr", "irr", "imr", "isr", "priority_add", "irq_base", "read_reg_select"),
            *("poll", "special_mask", "init_state", "auto_eoi", "rotate_on_auto_eoi"),
            *("special_fully_nested_mode", "init4", "elcr", "elcr_mask"),
        )
    ]


KVM_IOAPIC_NUM_PINS: Final = 24


class kvm_ioapic_redirtbl_fields(ctypes.Structure):
    _fields_ = [
        ("vector", u8),
        ("delivery_mode", u8, 3),
        ("dest_mode", u8, 1),
        ("delivery_status", u8, 1),
        ("polarity", u8, 1),
        ("remote_irr", u8, 1),
        ("trig_mode", u8, 1),
        ("mask", u8, 1),
        ("reserve", u8, 7),
        ("reserved", u8 * 4),
        ("dest_id", u8),
    ]


class kvm_ioapic_redirtbl(ctypes.Union):
    _fields_ = [("bits", u64), ("fields", kvm_ioapic_redirtbl_fields)]


class kvm_ioapic_state(ctypes.Structure):
    _fields_ = [
        ("base_address", u64),
        ("ioregsel", u32),
        ("id", u32),
        ("irr", u32),
        ("pad", u32),
        ("redirtbl", kvm_ioapic_redirtbl * KVM_IOAPIC_NUM_PINS),
    ]


class kvm_irqchip_chip(ctypes.Union):
    _fields_ = [("dummy", u8 * 512), ("pic", kvm_pic_state), ("ioapic", kvm_ioapic_state)]


class kvm_irqchip(ctypes.Structure):
    _fields_ = [("chip_id", u32), ("pad", u32), ("chip", kvm_irqchip_chip)]


class kvm_pit_channel_state(ctypes.Structure):
    _fields_ = [
        ("count", u32),
        ("latched_count", u16),
        ("count_latched", u8),
        ("status_latched", u8),
        ("status", u8),
        ("read_state", u8),
        ("write_state", u8),
        ("write_latch", u8),
        ("rw_mode", u8),
        ("mode", u8),
        ("bcd", u8),
        ("gate", u8),
        ("count_load_time", s64),
    ]


class kvm_pit_state2(ctypes.Structure):
    _fields_ = [
        ("channels", kvm_pit_channel_state * 3),
        ("flags", u32),
        ("reserved", u32 * 9),
    ]


class kvm_pit_config(ctypes.Structure):
    _fields_ = [("flags", u32), ("pad", u32 * 15)]


class kvm_clock_data(ctypes.Structure):
    _fields_ = [
        ("clock", u64),
        ("flags", u32),
        ("pad0", u32),
        ("realtime", u64),
        ("host_tsc", u64),
        ("pad", u32 * 4),
    ]


class kvm_irq_level_u(ctypes.Union):
    _fields_ = [("irq", u32), ("status", s32)]


class kvm_irq_level(ctypes.Structure):
    _anonymous_ = ("u",)
    _fields_ = [("u", kvm_irq_level_u), ("level", u32)]


class kvm_irq_routing_irqchip(ctypes.Structure):
    _fields_ = [("irqchip", u32), ("pin", u32)]


class kvm_irq_routing_msi_u(ctypes.Union):
    _fields_ = [("pad", u32), ("devid", u32)]


class kvm_irq_routing_msi(ctypes.Structure):
    _anonymous_ = ("u",)
    _fields_ = [
        ("address_lo", u32),
        ("address_hi", u32),
        ("data", u32),
        ("u", kvm_irq_routing_msi_u),
    ]


class kvm_irq_routing_hv_sint(ctypes.Structure):
    _fields_ = [("vcpu", u32), ("sint", u32)]


class kvm_irq_routing_entry_u(ctypes.Union):
    _fields_ = [
        ("irqchip", kvm_irq_routing_irqchip),
        ("msi", kvm_irq_routing_msi),
        ("hv_sint", kvm_irq_routing_hv_sint),
        ("pad", u32 * 8),
    ]


class kvm_irq_routing_entry(ctypes.Structure):
    _fields_ = [
        ("gsi", u32),
        ("type", u32),
        ("flags", u32),
        ("pad", u32),
        ("u", kvm_irq_routing_entry_u),
    ]


class kvm_irq_routing(ctypes.Structure):
    """Header only; see `irq_routing_buffer(n)`."""

    _fields_ = [("nr", u32), ("flags", u32), ("entries", kvm_irq_routing_entry * 0)]


class kvm_irqfd(ctypes.Structure):
    _fields_ = [
        ("fd", u32),
        ("gsi", u32),
        ("flags", u32),
        ("resamplefd", u32),
        ("pad", u8 * 16),
    ]


class kvm_ioeventfd(ctypes.Structure):
    _fields_ = [
        ("datamatch", u64),
        ("addr", u64),
        ("len", u32),
        ("fd", s32),
        ("flags", u32),
        ("pad", u8 * 36),
    ]


class kvm_userspace_memory_region(ctypes.Structure):
    _fields_ = [
        ("slot", u32),
        ("flags", u32),
        ("guest_phys_addr", u64),
        ("memory_size", u64),
        ("userspace_addr", u64),
    ]


class kvm_dirty_log_u(ctypes.Union):
    _fields_ = [("dirty_bitmap", ctypes.c_void_p), ("padding2", u64)]


class kvm_dirty_log(ctypes.Structure):
    _anonymous_ = ("u",)
    _fields_ = [("slot", u32), ("padding1", u32), ("u", kvm_dirty_log_u)]


class kvm_enable_cap(ctypes.Structure):
    _fields_ = [("cap", u32), ("flags", u32), ("args", u64 * 4), ("pad", u8 * 64)]


class kvm_debug_exit_arch(ctypes.Structure):
    _fields_ = [("exception", u32), ("pad", u32), ("pc", u64), ("dr6", u64), ("dr7", u64)]


class kvm_hyperv_exit_synic(ctypes.Structure):
    _fields_ = [
        ("msr", u32),
        ("pad2", u32),
        ("control", u64),
        ("evt_page", u64),
        ("msg_page", u64),
    ]


class kvm_hyperv_exit_hcall(ctypes.Structure):
    _fields_ = [("input", u64), ("result", u64), ("params", u64 * 2)]


class kvm_hyperv_exit_syndbg(ctypes.Structure):
    _fields_ = [
        ("msr", u32),
        ("pad2", u32),
        ("control", u64),
        ("status", u64),
        ("send_page", u64),
        ("recv_page", u64),
        ("pending_page", u64),
    ]


class kvm_hyperv_exit_u(ctypes.Union):
    _fields_ = [
        ("synic", kvm_hyperv_exit_synic),
        ("hcall", kvm_hyperv_exit_hcall),
        ("syndbg", kvm_hyperv_exit_syndbg),
    ]


class kvm_hyperv_exit(ctypes.Structure):
    _fields_ = [("type", u32), ("pad1", u32), ("u", kvm_hyperv_exit_u)]


class kvm_sync_regs(ctypes.Structure):
    _fields_ = [("regs", kvm_regs), ("sregs", kvm_sregs), ("events", kvm_vcpu_events)]


class kvm_run_hw(ctypes.Structure):
    _fields_ = [("hardware_exit_reason", u64)]


class kvm_run_fail_entry(ctypes.Structure):
    _fields_ = [("hardware_entry_failure_reason", u64), ("cpu", u32)]


class kvm_run_ex(ctypes.Structure):
    _fields_ = [("exception", u32), ("error_code", u32)]


class kvm_run_io(ctypes.Structure):
    _fields_ = [
        ("direction", u8),
        ("size", u8),
        ("port", u16),
        ("count", u32),
        ("data_offset", u64),
    ]


class kvm_run_debug(ctypes.Structure):
    _fields_ = [("arch", kvm_debug_exit_arch)]


class kvm_run_mmio(ctypes.Structure):
    _fields_ = [("phys_addr", u64), ("data", u8 * 8), ("len", u32), ("is_write", u8)]


class kvm_run_hypercall(ctypes.Structure):
    _fields_ = [
        ("nr", u64),
        ("args", u64 * 6),
        ("ret", u64),
        ("longmode", u32),
        ("pad", u32),
    ]


class kvm_run_tpr_access(ctypes.Structure):
    _fields_ = [("rip", u64), ("is_write", u32), ("pad", u32)]


class kvm_run_internal(ctypes.Structure):
    _fields_ = [("suberror", u32), ("ndata", u32), ("data", u64 * 16)]


class kvm_run_emulation_failure(ctypes.Structure):
    """The overlay of `internal` for suberror KVM_INTERNAL_ERROR_EMULATION (ABI, unlike the
    other suberrors' data): `flags` says which fields hold data. In C, `insn_size` and
    `insn_bytes` sit in an anonymous struct inside an anonymous union; the paths are the same."""

    _fields_ = [
        ("suberror", u32),
        ("ndata", u32),
        ("flags", u64),
        ("insn_size", u8),
        ("insn_bytes", u8 * 15),
    ]


class kvm_run_system_event_u(ctypes.Union):
    _fields_ = [("flags", u64), ("data", u64 * 16)]


class kvm_run_system_event(ctypes.Structure):
    _anonymous_ = ("u",)
    _fields_ = [("type", u32), ("ndata", u32), ("u", kvm_run_system_event_u)]


class kvm_run_eoi(ctypes.Structure):
    _fields_ = [("vector", u8)]


class kvm_run_msr(ctypes.Structure):
    _fields_ = [
        ("error", u8),
        ("pad", u8 * 7),
        ("reason", u32),
        ("index", u32),
        ("data", u64),
    ]


class kvm_run_notify(ctypes.Structure):
    _fields_ = [("flags", u32)]


class kvm_run_exit(ctypes.Union):
    """The anonymous exit-data union of `struct kvm_run` (x86 members)."""

    _fields_ = [
        ("hw", kvm_run_hw),
        ("fail_entry", kvm_run_fail_entry),
        ("ex", kvm_run_ex),
        ("io", kvm_run_io),
        ("debug", kvm_run_debug),
        ("mmio", kvm_run_mmio),
        ("hypercall", kvm_run_hypercall),
        ("tpr_access", kvm_run_tpr_access),
        ("internal", kvm_run_internal),
        ("emulation_failure", kvm_run_emulation_failure),
        ("system_event", kvm_run_system_event),
        ("eoi", kvm_run_eoi),
        ("hyperv", kvm_hyperv_exit),
        ("msr", kvm_run_msr),
        ("notify", kvm_run_notify),
        ("padding", u8 * 256),
    ]


SYNC_REGS_SIZE_BYTES: Final = 2048


class kvm_run_s(ctypes.Union):
    _fields_ = [("regs", kvm_sync_regs), ("padding", u8 * SYNC_REGS_SIZE_BYTES)]


class kvm_run(ctypes.Structure):
    """The page shared with the kernel per VCPU (`mmap` of the VCPU fd at offset 0)."""

    _anonymous_ = ("exit",)
    _fields_ = [
        ("request_interrupt_window", u8),
        ("immediate_exit", u8),
        ("padding1", u8 * 6),
        ("exit_reason", u32),
        ("ready_for_interrupt_injection", u8),
        ("if_flag", u8),
        ("flags", u16),
        ("cr8", u64),
        ("apic_base", u64),
        ("exit", kvm_run_exit),
        ("kvm_valid_regs", u64),
        ("kvm_dirty_regs", u64),
        ("s", kvm_run_s),
    ]


# ---------------------------------------------------------------------------------------------
# Variable-length buffers: C's flexible arrays, given a concrete length.


@functools.lru_cache(maxsize=128)
def _sized_type(
    header: type[ctypes.Structure], element: type[ctypes.Structure] | type[u32], n: int
) -> type[ctypes.Structure]:
    """A copy of `header` whose trailing flexible array has room for `n` elements."""
    *fixed, last = header._fields_
    fields = [*fixed, (last[0], element * n)]
    return type(f"{header.__name__}_{n}", (ctypes.Structure,), {"_fields_": fields})


def _buffer(
    header: type[ctypes.Structure],
    element: type[ctypes.Structure] | type[u32],
    count_field: str,
    n: int,
) -> Any:
    if n < 0:
        raise ValueError(f"a {header.__name__} buffer needs a non-negative count, not {n}")
    buf = _sized_type(header, element, n)()
    setattr(buf, count_field, n)
    return buf


def msrs_buffer(n: int) -> Any:
    """A `struct kvm_msrs` with room for `n` entries and `nmsrs = n`."""
    return _buffer(kvm_msrs, kvm_msr_entry, "nmsrs", n)


def msr_list_buffer(n: int) -> Any:
    """A `struct kvm_msr_list` with room for `n` indices and `nmsrs = n`."""
    return _buffer(kvm_msr_list, u32, "nmsrs", n)


def cpuid2_buffer(n: int) -> Any:
    """A `struct kvm_cpuid2` with room for `n` entries and `nent = n`."""
    return _buffer(kvm_cpuid2, kvm_cpuid_entry2, "nent", n)


def irq_routing_buffer(n: int) -> Any:
    """A `struct kvm_irq_routing` with room for `n` entries and `nr = n`."""
    return _buffer(kvm_irq_routing, kvm_irq_routing_entry, "nr", n)


# ---------------------------------------------------------------------------------------------
# Constants (names and values as in the kernel headers; checked by tests/test_kvm_layout.py)

KVMIO: Final = 0xAE
KVM_API_VERSION: Final = 12

KVM_PIO_PAGE_OFFSET: Final = 1
KVM_COALESCED_MMIO_PAGE_OFFSET: Final = 2

KVM_CAP_IRQCHIP: Final = 0
KVM_CAP_HLT: Final = 1
KVM_CAP_USER_MEMORY: Final = 3
KVM_CAP_SET_TSS_ADDR: Final = 4
KVM_CAP_EXT_CPUID: Final = 7
KVM_CAP_NR_VCPUS: Final = 9
KVM_CAP_NR_MEMSLOTS: Final = 10
KVM_CAP_PIT: Final = 11
KVM_CAP_MP_STATE: Final = 14
KVM_CAP_SYNC_MMU: Final = 16
KVM_CAP_USER_NMI: Final = 22
KVM_CAP_IRQ_ROUTING: Final = 25
KVM_CAP_IRQ_INJECT_STATUS: Final = 26
KVM_CAP_IRQFD: Final = 32
KVM_CAP_PIT2: Final = 33
KVM_CAP_PIT_STATE2: Final = 35
KVM_CAP_IOEVENTFD: Final = 36
KVM_CAP_SET_IDENTITY_MAP_ADDR: Final = 37
KVM_CAP_ADJUST_CLOCK: Final = 39
KVM_CAP_INTERNAL_ERROR_DATA: Final = 40
KVM_CAP_VCPU_EVENTS: Final = 41
KVM_CAP_HYPERV: Final = 44
KVM_CAP_DEBUGREGS: Final = 50
KVM_CAP_ENABLE_CAP: Final = 54
KVM_CAP_XSAVE: Final = 55
KVM_CAP_XCRS: Final = 56
KVM_CAP_MAX_VCPUS: Final = 66
KVM_CAP_SIGNAL_MSI: Final = 77
KVM_CAP_READONLY_MEM: Final = 81
KVM_CAP_IRQFD_RESAMPLE: Final = 82
KVM_CAP_EXT_EMUL_CPUID: Final = 95
KVM_CAP_ENABLE_CAP_VM: Final = 98
KVM_CAP_IOEVENTFD_NO_LENGTH: Final = 100
KVM_CAP_CHECK_EXTENSION_VM: Final = 105
KVM_CAP_SPLIT_IRQCHIP: Final = 121
KVM_CAP_IOEVENTFD_ANY_LENGTH: Final = 122
KVM_CAP_HYPERV_SYNIC: Final = 123
KVM_CAP_MAX_VCPU_ID: Final = 128
KVM_CAP_IMMEDIATE_EXIT: Final = 136
KVM_CAP_HYPERV_SYNIC2: Final = 148
KVM_CAP_HYPERV_CPUID: Final = 167
KVM_CAP_SYS_HYPERV_CPUID: Final = 191

KVM_EXIT_UNKNOWN: Final = 0
KVM_EXIT_EXCEPTION: Final = 1
KVM_EXIT_IO: Final = 2
KVM_EXIT_HYPERCALL: Final = 3
KVM_EXIT_DEBUG: Final = 4
KVM_EXIT_HLT: Final = 5
KVM_EXIT_MMIO: Final = 6
KVM_EXIT_IRQ_WINDOW_OPEN: Final = 7
KVM_EXIT_SHUTDOWN: Final = 8
KVM_EXIT_FAIL_ENTRY: Final = 9
KVM_EXIT_INTR: Final = 10
KVM_EXIT_SET_TPR: Final = 11
KVM_EXIT_TPR_ACCESS: Final = 12
KVM_EXIT_NMI: Final = 16
KVM_EXIT_INTERNAL_ERROR: Final = 17
KVM_EXIT_SYSTEM_EVENT: Final = 24
KVM_EXIT_IOAPIC_EOI: Final = 26
KVM_EXIT_HYPERV: Final = 27
KVM_EXIT_X86_RDMSR: Final = 29
KVM_EXIT_X86_WRMSR: Final = 30
KVM_EXIT_DIRTY_RING_FULL: Final = 31
KVM_EXIT_X86_BUS_LOCK: Final = 33
KVM_EXIT_NOTIFY: Final = 37

KVM_EXIT_IO_IN: Final = 0
KVM_EXIT_IO_OUT: Final = 1

KVM_EXIT_HYPERV_SYNIC: Final = 1
KVM_EXIT_HYPERV_HCALL: Final = 2
KVM_EXIT_HYPERV_SYNDBG: Final = 3

KVM_INTERNAL_ERROR_EMULATION: Final = 1
KVM_INTERNAL_ERROR_SIMUL_EX: Final = 2
KVM_INTERNAL_ERROR_DELIVERY_EV: Final = 3
KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON: Final = 4
KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES: Final = 1 << 0

INTERNAL_ERROR_NAMES: Final[dict[int, str]] = {
    KVM_INTERNAL_ERROR_EMULATION: "emulation failure",
    KVM_INTERNAL_ERROR_SIMUL_EX: "simultaneous exception",
    KVM_INTERNAL_ERROR_DELIVERY_EV: "event delivery failed",
    KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON: "unexpected exit reason",
}
"""What each `KVM_INTERNAL_ERROR_*` suberror means (linux/kvm.h), for messages."""

VMX_ENTRY_FAILURE: Final = 1 << 31
"""Set in `fail_entry.hardware_entry_failure_reason` on Intel for a VM-entry failure; the low
16 bits are then the basic exit reason (Intel SDM vol. 3, "VM-Entry Failures")."""
VMX_ENTRY_FAILURE_NAMES: Final[dict[int, str]] = {
    33: "invalid guest state",
    34: "MSR loading failed",
    41: "machine-check event",
}


def entry_failure_name(hardware_reason: int) -> str | None:
    """What a failed entry's hardware reason means, where known (Intel's entry failures)."""
    if hardware_reason & VMX_ENTRY_FAILURE and hardware_reason < 1 << 32:
        return VMX_ENTRY_FAILURE_NAMES.get(hardware_reason & 0xFFFF)
    return None


KVM_SYSTEM_EVENT_SHUTDOWN: Final = 1
KVM_SYSTEM_EVENT_RESET: Final = 2
KVM_SYSTEM_EVENT_CRASH: Final = 3

KVM_MEM_LOG_DIRTY_PAGES: Final = 1 << 0
KVM_MEM_READONLY: Final = 1 << 1

KVM_IRQFD_FLAG_DEASSIGN: Final = 1 << 0
KVM_IRQFD_FLAG_RESAMPLE: Final = 1 << 1

KVM_IOEVENTFD_FLAG_DATAMATCH: Final = 1 << 0
KVM_IOEVENTFD_FLAG_PIO: Final = 1 << 1
KVM_IOEVENTFD_FLAG_DEASSIGN: Final = 1 << 2

KVM_IRQ_ROUTING_IRQCHIP: Final = 1
KVM_IRQ_ROUTING_MSI: Final = 2
KVM_IRQ_ROUTING_HV_SINT: Final = 4

KVM_MSI_VALID_DEVID: Final = 1 << 0

KVM_CPUID_FLAG_SIGNIFCANT_INDEX: Final = 1 << 0
KVM_CPUID_FLAG_STATEFUL_FUNC: Final = 1 << 1
KVM_CPUID_FLAG_STATE_READ_NEXT: Final = 1 << 2

KVM_MP_STATE_RUNNABLE: Final = 0
KVM_MP_STATE_UNINITIALIZED: Final = 1
KVM_MP_STATE_INIT_RECEIVED: Final = 2
KVM_MP_STATE_HALTED: Final = 3
KVM_MP_STATE_SIPI_RECEIVED: Final = 4
KVM_MP_STATE_STOPPED: Final = 5
KVM_MP_STATE_CHECK_STOP: Final = 6
KVM_MP_STATE_OPERATING: Final = 7
KVM_MP_STATE_LOAD: Final = 8
KVM_MP_STATE_AP_RESET_HOLD: Final = 9
KVM_MP_STATE_SUSPENDED: Final = 10

KVM_IRQCHIP_PIC_MASTER: Final = 0
KVM_IRQCHIP_PIC_SLAVE: Final = 1
KVM_IRQCHIP_IOAPIC: Final = 2
KVM_NR_IRQCHIPS: Final = 3

KVM_PIT_SPEAKER_DUMMY: Final = 1
KVM_PIT_FLAGS_HPET_LEGACY: Final = 0x00000001

KVM_CLOCK_TSC_STABLE: Final = 2
KVM_CLOCK_REALTIME: Final = 1 << 2
KVM_CLOCK_HOST_TSC: Final = 1 << 3

KVM_VCPUEVENT_VALID_NMI_PENDING: Final = 0x00000001
KVM_VCPUEVENT_VALID_SIPI_VECTOR: Final = 0x00000002
KVM_VCPUEVENT_VALID_SHADOW: Final = 0x00000004
KVM_VCPUEVENT_VALID_SMM: Final = 0x00000008

KVM_SYNC_X86_REGS: Final = 1 << 0
KVM_SYNC_X86_SREGS: Final = 1 << 1
KVM_SYNC_X86_EVENTS: Final = 1 << 2

KVM_RUN_X86_SMM: Final = 1 << 0

# Limits the kernel applies but does not export (arch/x86/include/asm/kvm_host.h and
# include/linux/kvm_host.h); used to size buffers and to bound retries.
MAX_CPUID_ENTRIES: Final = 256
MAX_IRQ_ROUTES: Final = 4096
_MAX_GROWN_ENTRIES: Final = 1 << 16

# ---------------------------------------------------------------------------------------------
# ioctl numbers. `IOCTL_NAMES` maps each number back to its name for error messages.

IOCTLS: Final[dict[str, int]] = {}


def _define(name: str, number: int) -> int:
    if name in IOCTLS or number in IOCTLS.values():
        raise ImportError(f"{name} ({number:#x}) is defined twice")
    IOCTLS[name] = number
    return number


# /dev/kvm
KVM_GET_API_VERSION: Final = _define("KVM_GET_API_VERSION", _IO(KVMIO, 0x00))
KVM_CREATE_VM: Final = _define("KVM_CREATE_VM", _IO(KVMIO, 0x01))
KVM_GET_MSR_INDEX_LIST: Final = _define("KVM_GET_MSR_INDEX_LIST", _IOWR(KVMIO, 0x02, kvm_msr_list))
KVM_CHECK_EXTENSION: Final = _define("KVM_CHECK_EXTENSION", _IO(KVMIO, 0x03))
KVM_GET_VCPU_MMAP_SIZE: Final = _define("KVM_GET_VCPU_MMAP_SIZE", _IO(KVMIO, 0x04))
KVM_GET_SUPPORTED_CPUID: Final = _define("KVM_GET_SUPPORTED_CPUID", _IOWR(KVMIO, 0x05, kvm_cpuid2))
KVM_GET_EMULATED_CPUID: Final = _define("KVM_GET_EMULATED_CPUID", _IOWR(KVMIO, 0x09, kvm_cpuid2))

# VM fd
KVM_CREATE_VCPU: Final = _define("KVM_CREATE_VCPU", _IO(KVMIO, 0x41))
KVM_GET_DIRTY_LOG: Final = _define("KVM_GET_DIRTY_LOG", _IOW(KVMIO, 0x42, kvm_dirty_log))
KVM_SET_USER_MEMORY_REGION: Final = _define(
    "KVM_SET_USER_MEMORY_REGION", _IOW(KVMIO, 0x46, kvm_userspace_memory_region)
)
KVM_SET_TSS_ADDR: Final = _define("KVM_SET_TSS_ADDR", _IO(KVMIO, 0x47))
KVM_SET_IDENTITY_MAP_ADDR: Final = _define("KVM_SET_IDENTITY_MAP_ADDR", _IOW(KVMIO, 0x48, u64))
KVM_CREATE_IRQCHIP: Final = _define("KVM_CREATE_IRQCHIP", _IO(KVMIO, 0x60))
KVM_IRQ_LINE: Final = _define("KVM_IRQ_LINE", _IOW(KVMIO, 0x61, kvm_irq_level))
KVM_GET_IRQCHIP: Final = _define("KVM_GET_IRQCHIP", _IOWR(KVMIO, 0x62, kvm_irqchip))
KVM_SET_IRQCHIP: Final = _define("KVM_SET_IRQCHIP", _IOR(KVMIO, 0x63, kvm_irqchip))
KVM_IRQ_LINE_STATUS: Final = _define("KVM_IRQ_LINE_STATUS", _IOWR(KVMIO, 0x67, kvm_irq_level))
KVM_SET_GSI_ROUTING: Final = _define("KVM_SET_GSI_ROUTING", _IOW(KVMIO, 0x6A, kvm_irq_routing))
KVM_IRQFD: Final = _define("KVM_IRQFD", _IOW(KVMIO, 0x76, kvm_irqfd))
KVM_CREATE_PIT2: Final = _define("KVM_CREATE_PIT2", _IOW(KVMIO, 0x77, kvm_pit_config))
KVM_IOEVENTFD: Final = _define("KVM_IOEVENTFD", _IOW(KVMIO, 0x79, kvm_ioeventfd))
KVM_SET_CLOCK: Final = _define("KVM_SET_CLOCK", _IOW(KVMIO, 0x7B, kvm_clock_data))
KVM_GET_CLOCK: Final = _define("KVM_GET_CLOCK", _IOR(KVMIO, 0x7C, kvm_clock_data))
KVM_GET_PIT2: Final = _define("KVM_GET_PIT2", _IOR(KVMIO, 0x9F, kvm_pit_state2))
KVM_SET_PIT2: Final = _define("KVM_SET_PIT2", _IOW(KVMIO, 0xA0, kvm_pit_state2))
KVM_ENABLE_CAP: Final = _define("KVM_ENABLE_CAP", _IOW(KVMIO, 0xA3, kvm_enable_cap))

# VCPU fd
KVM_RUN: Final = _define("KVM_RUN", _IO(KVMIO, 0x80))
KVM_GET_REGS: Final = _define("KVM_GET_REGS", _IOR(KVMIO, 0x81, kvm_regs))
KVM_SET_REGS: Final = _define("KVM_SET_REGS", _IOW(KVMIO, 0x82, kvm_regs))
KVM_GET_SREGS: Final = _define("KVM_GET_SREGS", _IOR(KVMIO, 0x83, kvm_sregs))
KVM_SET_SREGS: Final = _define("KVM_SET_SREGS", _IOW(KVMIO, 0x84, kvm_sregs))
KVM_GET_MSRS: Final = _define("KVM_GET_MSRS", _IOWR(KVMIO, 0x88, kvm_msrs))
KVM_SET_MSRS: Final = _define("KVM_SET_MSRS", _IOW(KVMIO, 0x89, kvm_msrs))
KVM_GET_FPU: Final = _define("KVM_GET_FPU", _IOR(KVMIO, 0x8C, kvm_fpu))
KVM_SET_FPU: Final = _define("KVM_SET_FPU", _IOW(KVMIO, 0x8D, kvm_fpu))
KVM_GET_LAPIC: Final = _define("KVM_GET_LAPIC", _IOR(KVMIO, 0x8E, kvm_lapic_state))
KVM_SET_LAPIC: Final = _define("KVM_SET_LAPIC", _IOW(KVMIO, 0x8F, kvm_lapic_state))
KVM_SET_CPUID2: Final = _define("KVM_SET_CPUID2", _IOW(KVMIO, 0x90, kvm_cpuid2))
KVM_GET_CPUID2: Final = _define("KVM_GET_CPUID2", _IOWR(KVMIO, 0x91, kvm_cpuid2))
KVM_GET_MP_STATE: Final = _define("KVM_GET_MP_STATE", _IOR(KVMIO, 0x98, kvm_mp_state))
KVM_SET_MP_STATE: Final = _define("KVM_SET_MP_STATE", _IOW(KVMIO, 0x99, kvm_mp_state))
KVM_NMI: Final = _define("KVM_NMI", _IO(KVMIO, 0x9A))
KVM_GET_VCPU_EVENTS: Final = _define("KVM_GET_VCPU_EVENTS", _IOR(KVMIO, 0x9F, kvm_vcpu_events))
KVM_SET_VCPU_EVENTS: Final = _define("KVM_SET_VCPU_EVENTS", _IOW(KVMIO, 0xA0, kvm_vcpu_events))
KVM_GET_DEBUGREGS: Final = _define("KVM_GET_DEBUGREGS", _IOR(KVMIO, 0xA1, kvm_debugregs))
KVM_SET_DEBUGREGS: Final = _define("KVM_SET_DEBUGREGS", _IOW(KVMIO, 0xA2, kvm_debugregs))
KVM_GET_XCRS: Final = _define("KVM_GET_XCRS", _IOR(KVMIO, 0xA6, kvm_xcrs))
KVM_SET_XCRS: Final = _define("KVM_SET_XCRS", _IOW(KVMIO, 0xA7, kvm_xcrs))
KVM_GET_SUPPORTED_HV_CPUID: Final = _define(
    "KVM_GET_SUPPORTED_HV_CPUID", _IOWR(KVMIO, 0xC1, kvm_cpuid2)
)

IOCTL_NAMES: Final[dict[int, str]] = {number: name for name, number in IOCTLS.items()}


def ioctl_name(request: int) -> str:
    """The name of a known ioctl number, else its hex value (for messages)."""
    return IOCTL_NAMES.get(request, f"ioctl {request:#x}")


# ---------------------------------------------------------------------------------------------
# Errors and the raw call


class KvmError(OSError):
    """A KVM call failed; `.errno` is the kernel's errno, `.ioctl` names the call."""

    def __init__(self, errno_: int, ioctl: str) -> None:
        super().__init__(errno_, os.strerror(errno_))
        self.ioctl = ioctl

    def __str__(self) -> str:
        return f"{self.ioctl} failed: [Errno {self.errno}] {self.strerror}"

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.errno, self.ioctl))


class KvmUnavailable(KvmError):
    """The KVM device cannot be used: missing, not accessible, or not a KVM device."""

    def __init__(self, errno_: int, path: str, reason: str | None = None) -> None:
        super().__init__(errno_, "open")
        self.path = path
        self.reason = reason if reason is not None else os.strerror(errno_)

    def __str__(self) -> str:
        return f"cannot use KVM device {self.path}: {self.reason}"

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.errno, self.path, self.reason))


_libc = ctypes.CDLL(None, use_errno=True)
_libc_ioctl = _libc.ioctl
_libc_ioctl.argtypes = (ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p)
_libc_ioctl.restype = ctypes.c_int

_CDATA_TYPES = (ctypes.Structure, ctypes.Union, ctypes.Array, ctypes._SimpleCData)


def address_of(arg: Argument) -> int:
    """The address to pass for `arg`: a ctypes object or writable buffer by reference, an int
    as it is (an address or a plain value), None as 0.

    For a buffer the address stays valid only while the buffer is alive and not resized.
    """
    if arg is None:
        return 0
    if isinstance(arg, bool):
        raise TypeError("an ioctl argument cannot be a bool")
    if isinstance(arg, int):
        return arg
    if isinstance(arg, _CDATA_TYPES):
        return ctypes.addressof(arg)
    if isinstance(arg, bytearray | memoryview | mmap.mmap):
        return ctypes.addressof(ctypes.c_char.from_buffer(arg))
    raise TypeError(f"cannot pass a {type(arg).__name__} to ioctl")


def ioctl(fd: int, request: int, arg: Argument = None) -> int:
    """Call ioctl(2) without holding the GIL; return its non-negative result.

    Raises `KvmError` (errno and the ioctl's name) on failure, EINTR included, so that a
    runner kicked out of `KVM_RUN` by a signal can tell that apart from a real error.
    """
    address = address_of(arg)
    result: int = _libc_ioctl(fd, request, address)
    if result < 0:
        raise KvmError(ctypes.get_errno(), ioctl_name(request))
    return result


# ---------------------------------------------------------------------------------------------
# fd wrappers


class _FdOwner:
    """Owns one fd: closed by `close()` or on leaving a `with` block."""

    def __init__(self, fd: int) -> None:
        self._fd = fd

    @property
    def fd(self) -> int:
        if self._fd < 0:
            raise ValueError(f"{type(self).__name__} is closed")
        return self._fd

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def fileno(self) -> int:
        return self.fd

    def close(self) -> None:
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _ioctl(self, request: int, arg: Argument = None) -> int:
        return ioctl(self.fd, request, arg)


def _grow(fetch: Any, start: int) -> Any:
    """Call `fetch(n)` with n = start, 2*start, ... while the kernel answers E2BIG."""
    n = max(start, 1)
    while True:
        try:
            return fetch(n)
        except KvmError as exc:
            if exc.errno != errno.E2BIG or n >= _MAX_GROWN_ENTRIES:
                raise
            n *= 2


def _cpuid_entries(buf: Any) -> list[kvm_cpuid_entry2]:
    return [kvm_cpuid_entry2.from_buffer_copy(buf.entries[i]) for i in range(buf.nent)]


class Kvm(_FdOwner):
    """The system fd (`/dev/kvm`)."""

    def __init__(self, path: str = "/dev/kvm") -> None:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            raise KvmUnavailable(exc.errno or errno.ENODEV, path) from exc
        super().__init__(fd)
        self.path = path
        try:
            version = self.api_version()
        except KvmError as exc:
            self.close()
            raise KvmUnavailable(exc.errno or errno.ENOTTY, path, "not a KVM device") from exc
        if version != KVM_API_VERSION:
            self.close()
            raise KvmUnavailable(
                errno.ENOTSUP, path, f"KVM API version {version}, expected {KVM_API_VERSION}"
            )

    def api_version(self) -> int:
        return self._ioctl(KVM_GET_API_VERSION)

    def check_extension(self, cap: int) -> int:
        return self._ioctl(KVM_CHECK_EXTENSION, cap)

    def vcpu_mmap_size(self) -> int:
        return self._ioctl(KVM_GET_VCPU_MMAP_SIZE)

    def get_supported_cpuid(self, max_entries: int = MAX_CPUID_ENTRIES) -> list[kvm_cpuid_entry2]:
        return self._get_cpuid(KVM_GET_SUPPORTED_CPUID, max_entries)

    def get_emulated_cpuid(self, max_entries: int = MAX_CPUID_ENTRIES) -> list[kvm_cpuid_entry2]:
        return self._get_cpuid(KVM_GET_EMULATED_CPUID, max_entries)

    def _get_cpuid(self, request: int, max_entries: int) -> list[kvm_cpuid_entry2]:
        def fetch(n: int) -> list[kvm_cpuid_entry2]:
            buf = cpuid2_buffer(n)
            self._ioctl(request, buf)
            return _cpuid_entries(buf)

        result: list[kvm_cpuid_entry2] = _grow(fetch, max_entries)
        return result

    def get_msr_index_list(self) -> list[int]:
        def fetch(n: int) -> list[int]:
            buf = msr_list_buffer(n)
            self._ioctl(KVM_GET_MSR_INDEX_LIST, buf)
            return list(buf.indices[: buf.nmsrs])

        result: list[int] = _grow(fetch, 256)
        return result

    def create_vm(self, machine_type: int = 0) -> Vm:
        fd = self._ioctl(KVM_CREATE_VM, machine_type)
        try:
            mmap_size = self.vcpu_mmap_size()
        except BaseException:
            os.close(fd)
            raise
        return Vm(fd, mmap_size)


def irqchip_route(gsi: int, irqchip: int, pin: int) -> kvm_irq_routing_entry:
    """A GSI routing entry to a pin of the in-kernel PIC or IOAPIC."""
    entry = kvm_irq_routing_entry(gsi=gsi, type=KVM_IRQ_ROUTING_IRQCHIP)
    entry.u.irqchip.irqchip = irqchip
    entry.u.irqchip.pin = pin
    return entry


def msi_route(gsi: int, address: int, data: int) -> kvm_irq_routing_entry:
    """A GSI routing entry that sends an MSI (64-bit address, 32-bit data)."""
    entry = kvm_irq_routing_entry(gsi=gsi, type=KVM_IRQ_ROUTING_MSI)
    entry.u.msi.address_lo = address & 0xFFFF_FFFF
    entry.u.msi.address_hi = address >> 32
    entry.u.msi.data = data
    return entry


def dirty_log_size(memory_size: int, page_size: int = 4096) -> int:
    """Bytes the kernel writes for a slot's dirty bitmap: whole 64-bit words."""
    pages = -(-memory_size // page_size)
    return -(-pages // 64) * 8


class Vm(_FdOwner):
    """A VM fd. Usable only from the process that created it."""

    def __init__(self, fd: int, vcpu_mmap_size: int) -> None:
        super().__init__(fd)
        self.vcpu_mmap_size = vcpu_mmap_size

    def check_extension(self, cap: int) -> int:
        return self._ioctl(KVM_CHECK_EXTENSION, cap)

    def create_irqchip(self) -> None:
        self._ioctl(KVM_CREATE_IRQCHIP)

    def create_pit2(self, flags: int = 0) -> None:
        self._ioctl(KVM_CREATE_PIT2, kvm_pit_config(flags=flags))

    def set_tss_addr(self, addr: int) -> None:
        self._ioctl(KVM_SET_TSS_ADDR, addr)

    def set_identity_map_addr(self, addr: int) -> None:
        self._ioctl(KVM_SET_IDENTITY_MAP_ADDR, u64(addr))

    def set_user_memory_region(
        self,
        slot: int,
        flags: int,
        guest_phys_addr: int,
        memory_size: int,
        userspace_addr: int,
    ) -> None:
        """Add, change or (with `memory_size` 0) remove a memory slot."""
        region = kvm_userspace_memory_region(
            slot=slot,
            flags=flags,
            guest_phys_addr=guest_phys_addr,
            memory_size=memory_size,
            userspace_addr=userspace_addr,
        )
        self._ioctl(KVM_SET_USER_MEMORY_REGION, region)

    def ioeventfd(
        self,
        spec: kvm_ioeventfd | None = None,
        *,
        fd: int = -1,
        addr: int = 0,
        length: int = 0,
        datamatch: int | None = None,
        pio: bool = False,
        deassign: bool = False,
    ) -> None:
        """Register (or with `deassign`, remove) an eventfd signalled by guest writes.

        Either pass a ready `kvm_ioeventfd`, or the fields: `length` 0 matches any access
        size (no datamatch), 1/2/4/8 match that size and, with `datamatch`, that value.
        """
        if spec is None:
            if length not in (0, 1, 2, 4, 8):
                raise ValueError(f"ioeventfd length must be 0, 1, 2, 4 or 8, not {length}")
            if datamatch is not None and length == 0:
                raise ValueError("an ioeventfd datamatch needs a length of 1, 2, 4 or 8")
            flags = (
                (KVM_IOEVENTFD_FLAG_DATAMATCH if datamatch is not None else 0)
                | (KVM_IOEVENTFD_FLAG_PIO if pio else 0)
                | (KVM_IOEVENTFD_FLAG_DEASSIGN if deassign else 0)
            )
            spec = kvm_ioeventfd(
                datamatch=datamatch or 0, addr=addr, len=length, fd=fd, flags=flags
            )
        self._ioctl(KVM_IOEVENTFD, spec)

    def irqfd(
        self, fd: int, gsi: int, *, resample_fd: int | None = None, deassign: bool = False
    ) -> None:
        """Make writes to eventfd `fd` raise `gsi`; with `resample_fd`, level-triggered with
        an EOI notification on that eventfd (`KVM_IRQFD_FLAG_RESAMPLE`)."""
        flags = (KVM_IRQFD_FLAG_DEASSIGN if deassign else 0) | (
            KVM_IRQFD_FLAG_RESAMPLE if resample_fd is not None else 0
        )
        spec = kvm_irqfd(fd=fd, gsi=gsi, flags=flags, resamplefd=resample_fd or 0)
        self._ioctl(KVM_IRQFD, spec)

    def irq_line(self, irq: int, level: int) -> None:
        spec = kvm_irq_level(level=level)
        spec.irq = irq
        self._ioctl(KVM_IRQ_LINE, spec)

    def set_gsi_routing(self, entries: Sequence[kvm_irq_routing_entry]) -> None:
        """Replace the whole GSI routing table."""
        buf = irq_routing_buffer(len(entries))
        for i, entry in enumerate(entries):
            buf.entries[i] = entry
        self._ioctl(KVM_SET_GSI_ROUTING, buf)

    def get_irqchip(self, chip_id: int) -> kvm_irqchip:
        chip = kvm_irqchip(chip_id=chip_id)
        self._ioctl(KVM_GET_IRQCHIP, chip)
        return chip

    def set_irqchip(self, chip: kvm_irqchip) -> None:
        self._ioctl(KVM_SET_IRQCHIP, chip)

    def get_pit2(self) -> kvm_pit_state2:
        state = kvm_pit_state2()
        self._ioctl(KVM_GET_PIT2, state)
        return state

    def set_pit2(self, state: kvm_pit_state2) -> None:
        self._ioctl(KVM_SET_PIT2, state)

    def get_clock(self) -> kvm_clock_data:
        data = kvm_clock_data()
        self._ioctl(KVM_GET_CLOCK, data)
        return data

    def set_clock(self, data: kvm_clock_data) -> None:
        self._ioctl(KVM_SET_CLOCK, data)

    def get_dirty_log(self, slot: int, bitmap: int | bytearray | memoryview | mmap.mmap) -> None:
        """Fetch and reset the slot's dirty bitmap into `bitmap` (an address or a writable
        buffer of at least `dirty_log_size(slot size)` bytes: the kernel writes 64-bit words)."""
        log = kvm_dirty_log(slot=slot)
        if isinstance(bitmap, int):
            log.dirty_bitmap = bitmap
            self._ioctl(KVM_GET_DIRTY_LOG, log)
            return
        # The ctypes view keeps the buffer exported (so not resizable) until the call returns.
        holder = ctypes.c_char.from_buffer(bitmap)
        log.dirty_bitmap = ctypes.addressof(holder)
        self._ioctl(KVM_GET_DIRTY_LOG, log)
        del holder

    def enable_cap(self, cap: int, *args: int, flags: int = 0) -> None:
        self._ioctl(KVM_ENABLE_CAP, _enable_cap(cap, args, flags))

    def create_vcpu(self, vcpu_id: int) -> Vcpu:
        fd = self._ioctl(KVM_CREATE_VCPU, vcpu_id)
        return Vcpu(fd, vcpu_id, self.vcpu_mmap_size)


def _enable_cap(cap: int, args: Sequence[int], flags: int) -> kvm_enable_cap:
    if len(args) > 4:
        raise ValueError(f"KVM_ENABLE_CAP takes at most 4 arguments, got {len(args)}")
    spec = kvm_enable_cap(cap=cap, flags=flags)
    for i, value in enumerate(args):
        spec.args[i] = value
    return spec


def map_run(fd: int, size: int) -> tuple[mmap.mmap, kvm_run]:
    """Map a VCPU fd's shared pages; return the mapping and a `kvm_run` view of it.

    Works in any process holding the fd (a forked child too). Drop the view before closing the
    mapping: `mmap.close()` refuses while a ctypes view exports its buffer.
    """
    if size < ctypes.sizeof(kvm_run):
        raise ValueError(f"a VCPU mapping of {size} bytes cannot hold struct kvm_run")
    mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    return mm, kvm_run.from_buffer(mm)


_T = TypeVar("_T", bound=ctypes.Structure)


class Vcpu(_FdOwner):
    """A VCPU fd. Its ioctls work only from the process that created the VM."""

    def __init__(self, fd: int, vcpu_id: int, mmap_size: int) -> None:
        super().__init__(fd)
        self.id = vcpu_id
        self.mmap_size = mmap_size

    def map_run(self) -> tuple[mmap.mmap, kvm_run]:
        return map_run(self.fd, self.mmap_size)

    def run(self) -> None:
        """Enter the guest until the next exit. EINTR comes out as a `KvmError` too."""
        self._ioctl(KVM_RUN)

    def _get(self, request: int, struct: type[_T]) -> _T:
        value = struct()
        self._ioctl(request, value)
        return value

    def get_regs(self) -> kvm_regs:
        return self._get(KVM_GET_REGS, kvm_regs)

    def set_regs(self, regs: kvm_regs) -> None:
        self._ioctl(KVM_SET_REGS, regs)

    def get_sregs(self) -> kvm_sregs:
        return self._get(KVM_GET_SREGS, kvm_sregs)

    def set_sregs(self, sregs: kvm_sregs) -> None:
        self._ioctl(KVM_SET_SREGS, sregs)

    def get_fpu(self) -> kvm_fpu:
        return self._get(KVM_GET_FPU, kvm_fpu)

    def set_fpu(self, fpu: kvm_fpu) -> None:
        self._ioctl(KVM_SET_FPU, fpu)

    def get_debugregs(self) -> kvm_debugregs:
        return self._get(KVM_GET_DEBUGREGS, kvm_debugregs)

    def set_debugregs(self, debugregs: kvm_debugregs) -> None:
        self._ioctl(KVM_SET_DEBUGREGS, debugregs)

    def get_lapic(self) -> kvm_lapic_state:
        return self._get(KVM_GET_LAPIC, kvm_lapic_state)

    def set_lapic(self, lapic: kvm_lapic_state) -> None:
        self._ioctl(KVM_SET_LAPIC, lapic)

    def get_mp_state(self) -> kvm_mp_state:
        return self._get(KVM_GET_MP_STATE, kvm_mp_state)

    def set_mp_state(self, mp_state: kvm_mp_state) -> None:
        self._ioctl(KVM_SET_MP_STATE, mp_state)

    def get_xcrs(self) -> kvm_xcrs:
        return self._get(KVM_GET_XCRS, kvm_xcrs)

    def set_xcrs(self, xcrs: kvm_xcrs) -> None:
        self._ioctl(KVM_SET_XCRS, xcrs)

    def get_vcpu_events(self) -> kvm_vcpu_events:
        return self._get(KVM_GET_VCPU_EVENTS, kvm_vcpu_events)

    def set_vcpu_events(self, events: kvm_vcpu_events) -> None:
        self._ioctl(KVM_SET_VCPU_EVENTS, events)

    def get_msrs(self, indices: Sequence[int]) -> tuple[list[int], int]:
        """Read MSRs; return the values read (in request order) and how many were read.

        The kernel stops at the first MSR it cannot read, so `count < len(indices)` means the
        read was partial: `values` then holds only the first `count`.
        """
        buf = msrs_buffer(len(indices))
        for i, index in enumerate(indices):
            buf.entries[i].index = index
        count = self._ioctl(KVM_GET_MSRS, buf)
        return [buf.entries[i].data for i in range(count)], count

    def set_msrs(self, entries: Iterable[tuple[int, int] | kvm_msr_entry]) -> int:
        """Write MSRs given as (index, value) pairs; return how many the kernel wrote (it stops
        at the first one it refuses)."""
        items = [
            (e.index, e.data) if isinstance(e, kvm_msr_entry) else (e[0], e[1]) for e in entries
        ]
        buf = msrs_buffer(len(items))
        for i, (index, value) in enumerate(items):
            buf.entries[i].index = index
            buf.entries[i].data = value
        return self._ioctl(KVM_SET_MSRS, buf)

    def set_cpuid2(self, entries: Sequence[kvm_cpuid_entry2]) -> None:
        buf = cpuid2_buffer(len(entries))
        for i, entry in enumerate(entries):
            buf.entries[i] = entry
        self._ioctl(KVM_SET_CPUID2, buf)

    def get_supported_hv_cpuid(
        self, max_entries: int = MAX_CPUID_ENTRIES
    ) -> list[kvm_cpuid_entry2]:
        def fetch(n: int) -> list[kvm_cpuid_entry2]:
            buf = cpuid2_buffer(n)
            self._ioctl(KVM_GET_SUPPORTED_HV_CPUID, buf)
            return _cpuid_entries(buf)

        result: list[kvm_cpuid_entry2] = _grow(fetch, max_entries)
        return result

    def enable_cap(self, cap: int, *args: int, flags: int = 0) -> None:
        self._ioctl(KVM_ENABLE_CAP, _enable_cap(cap, args, flags))


# ---------------------------------------------------------------------------------------------
# Exit decoding: the rare exits. I/O and MMIO exits are the exit engine's (`hotpath.c`
# `vms_decode_access`): one decoder for the exits every plugin lives on.


class HypervSynicExit(Record):
    """Hyper-V SynIC MSR write (`KVM_EXIT_HYPERV_SYNIC`)."""

    __slots__ = __match_args__ = ("msr", "control", "evt_page", "msg_page")
    msr: Final[int]
    control: Final[int]
    evt_page: Final[int]
    msg_page: Final[int]

    def __init__(self, msr: int, control: int, evt_page: int, msg_page: int) -> None:
        self.msr = msr
        self.control = control
        self.evt_page = evt_page
        self.msg_page = msg_page


class HypervHcallExit(Record):
    """Hyper-V hypercall; the result goes into `kvm_run.hyperv.u.hcall.result`."""

    __slots__ = __match_args__ = ("input", "params0", "params1")
    input: Final[int]
    params0: Final[int]
    params1: Final[int]

    def __init__(self, input: int, params0: int, params1: int) -> None:
        self.input = input
        self.params0 = params0
        self.params1 = params1


class InternalErrorExit(Record):
    """KVM could not handle the exit itself (`KVM_EXIT_INTERNAL_ERROR`)."""

    __slots__ = __match_args__ = ("suberror", "data", "insn_bytes")
    suberror: Final[int]
    data: Final[tuple[int, ...]]
    insn_bytes: Final[bytes]
    """The instruction KVM failed to emulate, when an emulation failure carries it."""

    def __init__(self, suberror: int, data: tuple[int, ...], insn_bytes: bytes = b"") -> None:
        self.suberror = suberror
        self.data = data
        self.insn_bytes = insn_bytes

    @property
    def name(self) -> str:
        """The suberror in words ("emulation failure", ...)."""
        return INTERNAL_ERROR_NAMES.get(self.suberror, "unknown suberror")


class FailEntryExit(Record):
    """The hardware refused to enter the guest (`KVM_EXIT_FAIL_ENTRY`)."""

    __slots__ = __match_args__ = ("reason", "cpu")
    reason: Final[int]
    cpu: Final[int]

    def __init__(self, reason: int, cpu: int) -> None:
        self.reason = reason
        self.cpu = cpu


class ShutdownExit(Record):
    """The guest shut down, e.g. on a triple fault (`KVM_EXIT_SHUTDOWN`)."""

    __slots__ = ()


class HltExit(Record):
    """The guest halted (`KVM_EXIT_HLT`)."""

    __slots__ = ()


class OtherExit(Record):
    """Any other exit reason."""

    __slots__ = __match_args__ = ("reason",)
    reason: Final[int]

    def __init__(self, reason: int) -> None:
        self.reason = reason


Exit: TypeAlias = (
    HypervSynicExit
    | HypervHcallExit
    | InternalErrorExit
    | FailEntryExit
    | ShutdownExit
    | HltExit
    | OtherExit
)


def decode_exit(run: kvm_run) -> Exit:
    """Describe the exit `run` reports (read right after `KVM_RUN` returned). I/O and MMIO
    exits are not decoded here (`OtherExit`): the exit engine decodes those."""
    reason = run.exit_reason
    if reason == KVM_EXIT_HYPERV:
        hyperv = run.hyperv
        if hyperv.type == KVM_EXIT_HYPERV_SYNIC:
            synic = hyperv.u.synic
            return HypervSynicExit(synic.msr, synic.control, synic.evt_page, synic.msg_page)
        if hyperv.type == KVM_EXIT_HYPERV_HCALL:
            hcall = hyperv.u.hcall
            return HypervHcallExit(hcall.input, hcall.params[0], hcall.params[1])
        return OtherExit(reason)
    if reason == KVM_EXIT_INTERNAL_ERROR:
        internal = run.internal
        ndata = min(internal.ndata, len(internal.data))
        return InternalErrorExit(
            internal.suberror, tuple(internal.data[:ndata]), _instruction_bytes(run, ndata)
        )
    if reason == KVM_EXIT_FAIL_ENTRY:
        fail = run.fail_entry
        return FailEntryExit(fail.hardware_entry_failure_reason, fail.cpu)
    if reason == KVM_EXIT_SHUTDOWN:
        return ShutdownExit()
    if reason == KVM_EXIT_HLT:
        return HltExit()
    return OtherExit(reason)


def _instruction_bytes(run: kvm_run, ndata: int) -> bytes:
    """The bytes an emulation failure carries (flags, then size and bytes: 3 data words)."""
    failure = run.emulation_failure
    if (
        failure.suberror != KVM_INTERNAL_ERROR_EMULATION
        or ndata < 3
        or not failure.flags & KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES
    ):
        return b""
    size = min(failure.insn_size, len(failure.insn_bytes))
    return bytes(failure.insn_bytes)[:size]
