"""The PC's view of guest RAM for DMA: guest-physical addresses, RAM only (no KVM)."""

import os

import pytest

from vmsuper.devices.fw_cfg import GuestMemoryError
from vmsuper.pc.memory import GuestRam
from vmsuper.plugin import sealed_memfd

MIB = 1 << 20


def test_reads_and_writes_land_at_their_guest_physical_offset():
    fd = sealed_memfd(2 * MIB, "test-ram")
    try:
        ram = GuestRam(fd, 2 * MIB)
        ram.write(0x7000, b"low")
        ram.write(MIB + 0x10, b"high")
        assert os.pread(fd, 3, 0x7000) == b"low"
        assert ram.read(MIB + 0x10, 4) == b"high"
        assert ram.read(2 * MIB - 1, 1) == b"\0"
    finally:
        os.close(fd)


@pytest.mark.parametrize(
    ("address", "length"),
    [(0x9FFFF, 2), (0xA0000, 1), (0xF0000, 4), (0xFFFFF, 2), (2 * MIB - 1, 2), (4 << 30, 1)],
)
def test_the_legacy_window_and_beyond_ram_are_refused(address: int, length: int):
    fd = sealed_memfd(2 * MIB, "test-ram")
    try:
        ram = GuestRam(fd, 2 * MIB)
        with pytest.raises(GuestMemoryError, match="is not RAM"):
            ram.read(address, length)
        with pytest.raises(GuestMemoryError):
            ram.write(address, bytes(length))
    finally:
        os.close(fd)
