"""What a VCPU's log records when the VCPU stops abnormally: its registers in readable form.

A KVM internal error or a failed entry is only useful to whoever can see where the guest was:
the general registers, the control registers and segments, and the instruction at RIP (which
an emulation failure carries itself when its flags say so). Pure formatting of kernel structs.
"""

from __future__ import annotations

from vmsuper.shared import kvm

__all__ = ["regs_record", "sregs_record"]

_SEGMENTS = ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt")


def regs_record(regs: kvm.kvm_regs) -> dict[str, str]:
    """Every general register of `kvm_regs`, in hex."""
    return {field[0]: f"{getattr(regs, field[0]):#x}" for field in regs._fields_}


def sregs_record(sregs: kvm.kvm_sregs) -> dict[str, object]:
    """Control registers, EFER, descriptor tables and segments of `kvm_sregs`, in hex."""
    record: dict[str, object] = {
        name: f"{getattr(sregs, name):#x}"
        for name in ("cr0", "cr2", "cr3", "cr4", "cr8", "efer", "apic_base")
    }
    for table in ("gdt", "idt"):
        dtable = getattr(sregs, table)
        record[table] = {"base": f"{dtable.base:#x}", "limit": f"{dtable.limit:#x}"}
    for name in _SEGMENTS:
        segment = getattr(sregs, name)
        record[name] = {
            "selector": f"{segment.selector:#x}",
            "base": f"{segment.base:#x}",
            "limit": f"{segment.limit:#x}",
            "type": segment.type,
            "dpl": segment.dpl,
            "db": segment.db,
            "l": segment.l,
            "present": segment.present,
        }
    return record
