"""Each PC VCPU's CPUID carries its own APIC ID, and nothing else changes."""

import pytest

from vmsuper.pc.cpuid import cpuid_for_vcpu
from vmsuper.plugin.model import CpuidEntry

SUPPORTED = [
    CpuidEntry(0, eax=0x1F, ebx=0x68747541),
    CpuidEntry(1, eax=0x830F10, ebx=0x00020800, ecx=0xF6D83203, edx=0x178BFBFF),
    CpuidEntry(0xB, index=0, eax=1, ebx=1, ecx=0x100, edx=0, has_index=True),
    CpuidEntry(0xB, index=1, eax=7, ebx=2, ecx=0x201, edx=0, has_index=True),
    CpuidEntry(0x1F, index=0, eax=1, ebx=1, ecx=0x100, edx=0, has_index=True),
]


def test_leaf_1_and_the_topology_leaves_say_the_vcpus_id():
    table = cpuid_for_vcpu(SUPPORTED, 3)
    assert table[1].ebx == 0x03020800  # brand index, CLFLUSH size and count kept
    assert [e.edx for e in table[2:]] == [3, 3, 3]
    assert [e.ecx for e in table[2:]] == [0x100, 0x201, 0x100]
    assert table[0] == SUPPORTED[0]
    assert cpuid_for_vcpu(SUPPORTED, 0)[1].ebx == 0x00020800


def test_an_id_beyond_xapic_is_refused():
    with pytest.raises(ValueError, match="APIC ID 256"):
        cpuid_for_vcpu(SUPPORTED, 256)
