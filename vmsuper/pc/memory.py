"""Guest memory of the PC: RAM, the firmware ROM, and the PAM-controlled legacy window.

One sealed memfd holds all RAM; another the firmware image. Guest-physical layout:

- RAM 0-0x9ffff and 1 MiB up to the RAM size (at most 3 GiB, all below the PCI hole);
- 0xa0000-0xbffff: nothing (no VGA);
- 0xc0000-0xfffff: per PAM segment, the RAM behind it (read-write or read-only), the
  firmware's low alias (read-only), or nothing — see `shadow`;
- the firmware image read-only just below 4 GiB, where the CPU fetches its first instruction.

`ShadowWindow.apply` keeps one memory object per run of segments of one kind, and re-creates
only the runs that changed, destroying the old memory objects first (KVM slots may not
overlap); the VCPU is stopped in the PAM write while this happens, so the guest sees the new
map from its next instruction.
"""

from __future__ import annotations

import mmap
import os

from vmsuper.devices.chipset import PamSegment
from vmsuper.devices.fw_cfg import GuestMemoryError
from vmsuper.plugin import Connection, Memory, sealed_memfd

from . import shadow

MIB = 1 << 20
GIB4 = 1 << 32
LOW_RAM_END = 0xA0000
HIGH_RAM_START = 0x100000
LOW_ALIAS_SIZE = 0x20000


class PcMemory:
    """Creates and owns the RAM and ROM memory objects of one PC."""

    def __init__(self, conn: Connection, *, ram_size: int, firmware: bytes) -> None:
        self.conn = conn
        self.ram_size = ram_size
        self.firmware_size = len(firmware)
        self.ram_fd = sealed_memfd(ram_size, "vmsuper-pc-ram")
        self.rom_fd = sealed_memfd(len(firmware), "vmsuper-pc-rom")
        os.pwrite(self.rom_fd, firmware, 0)
        self.objects: list[Memory] = [
            conn.create_memory(0, LOW_RAM_END, fd=self.ram_fd),
            conn.create_memory(
                HIGH_RAM_START, ram_size - HIGH_RAM_START, fd=self.ram_fd, offset=HIGH_RAM_START
            ),
            conn.create_memory(GIB4 - len(firmware), len(firmware), read_only=True, fd=self.rom_fd),
        ]
        alias = min(len(firmware), LOW_ALIAS_SIZE)
        self.window = ShadowWindow(self, rom_alias_start=shadow.WINDOW_END - alias)
        self.guest_ram = GuestRam(self.ram_fd, ram_size)

    def ram(self) -> Memory:
        """The object holding low RAM; its ``mmap`` is the plugin's view of guest RAM from 0."""
        return self.objects[0]

    def map_backing(self, backing: shadow.Backing) -> Memory | None:
        if backing.kind is shadow.Kind.NONE:
            return None
        if backing.kind is shadow.Kind.ROM:
            offset = self.firmware_size - (shadow.WINDOW_END - backing.start)
            return self.conn.create_memory(
                backing.start, backing.length, read_only=True, fd=self.rom_fd, offset=offset
            )
        return self.conn.create_memory(
            backing.start,
            backing.length,
            read_only=backing.kind is shadow.Kind.RAM_READ_ONLY,
            fd=self.ram_fd,
            offset=backing.start,
        )


class GuestRam:
    """The plugin's view of the guest's RAM, for devices that do DMA (fw_cfg).

    One shared mapping of the RAM file, whose offsets are guest-physical addresses; only
    0-0x9ffff and 1 MiB up to the RAM size are RAM for DMA (not the legacy window).
    """

    def __init__(self, ram_fd: int, ram_size: int) -> None:
        self.view = mmap.mmap(ram_fd, ram_size)
        self.areas = ((0, LOW_RAM_END), (HIGH_RAM_START, ram_size))

    def _check(self, address: int, length: int) -> None:
        if not any(start <= address and address + length <= end for start, end in self.areas):
            raise GuestMemoryError(f"{address:#x}+{length:#x} is not RAM")

    def read(self, address: int, length: int) -> bytes:
        self._check(address, length)
        return self.view[address : address + length]

    def write(self, address: int, data: bytes) -> None:
        self._check(address, len(data))
        self.view[address : address + len(data)] = data


class ShadowWindow:
    """The memory objects of 0xc0000-0xfffff, kept in step with the PAM registers."""

    def __init__(self, memory: PcMemory, *, rom_alias_start: int) -> None:
        self.memory = memory
        self.rom_alias_start = rom_alias_start
        self.current: dict[shadow.Backing, Memory | None] = {}
        self.remaps = 0

    def apply(self, segments: list[PamSegment]) -> int:
        """Make the window match `segments`; returns how many memory objects it destroyed
        and created."""
        wanted = shadow.coalesce(shadow.plan(segments, rom_alias_start=self.rom_alias_start))
        requests = 0
        for backing in [backing for backing in self.current if backing not in wanted]:
            old = self.current.pop(backing)
            if old is not None:
                old.destroy()
                requests += 1
        for backing in [backing for backing in wanted if backing not in self.current]:
            new = self.current[backing] = self.memory.map_backing(backing)
            requests += new is not None
        self.remaps += requests
        return requests
