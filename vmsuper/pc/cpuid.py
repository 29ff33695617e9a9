"""The CPUID each VCPU of the PC sees: KVM's supported leaves with that VCPU's APIC ID.

KVM reports one table for the whole host; a real CPU tells its own initial APIC ID in leaf 1
(EBX bits 31-24) and its x2APIC ID in leaves 0xB and 0x1F (EDX). SeaBIOS counts the CPUs it
woke by those IDs (for the MP table and ACPI), so each VCPU gets its own, as QEMU gives them.
KVM numbers the in-kernel local APICs by VCPU index, so the ID is the index.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

from vmsuper.plugin.model import CpuidEntry

FEATURES = 0x1
EXTENDED_TOPOLOGY = 0xB
EXTENDED_TOPOLOGY_V2 = 0x1F
APIC_ID_SHIFT = 24


def cpuid_for_vcpu(entries: Iterable[CpuidEntry], apic_id: int) -> list[CpuidEntry]:
    """`entries` with `apic_id` put where the CPU reports its own ID."""
    if not 0 <= apic_id <= 0xFF:
        raise ValueError(f"APIC ID {apic_id}: a PC without x2APIC takes 0..255")
    result = []
    for entry in entries:
        if entry.function == FEATURES:
            ebx = (entry.ebx & ~(0xFF << APIC_ID_SHIFT)) | (apic_id << APIC_ID_SHIFT)
            entry = dataclasses.replace(entry, ebx=ebx)
        elif entry.function in (EXTENDED_TOPOLOGY, EXTENDED_TOPOLOGY_V2):
            entry = dataclasses.replace(entry, edx=apic_id)
        result.append(entry)
    return result
