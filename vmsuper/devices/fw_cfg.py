"""QEMU's firmware configuration device (fw_cfg) on ports 0x510/0x511, and its DMA interface.

The guest writes a 16-bit key to the selector port and reads the item's bytes one at a time
from the data port (string I/O reads many at once). Keys below 0x20 are QEMU's fixed items
(signature, RAM size, CPU count...), and named files get keys from 0x20 up, listed in the
file directory (key 0x19: a big-endian count, then 64-byte entries: size, key, name).
Reading past an item's end, or an item that does not exist, gives zeros, as in QEMU.

Given the guest's memory (`GuestMemory`), the device also offers DMA, announced by bit 1 of
the ID item: the guest writes the guest-physical address of a 16-byte request (big-endian
control, length, address) to the 64-bit big-endian register at 0x514, and the write of its
low half (0x518) runs it: select an item (control bit 3, key in the top 16 bits), then read
(bit 1) into guest memory, skip (bit 2) or write (bit 4, refused: items are read-only), and
finally store the control word back as 0, or 1 for an error. One exit per transfer, where the
data port takes two (select, read).

SeaBIOS reads its memory map (``etc/e820``), boot order (``bootorder``) and serial console
(``etc/sercon-port``) from here; `FwCfg.for_pc` builds the set a PC needs.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import Protocol

from .base import NO_ACTIONS, Actions, Device, PortRange, Reply

SELECTOR_PORT = 0x510
DATA_PORT = 0x511
DMA_PORT = 0x514  # 8 bytes, big-endian; a write of the low half (0x518) starts the transfer
DMA_LOW_PORT = DMA_PORT + 4
DMA_SIGNATURE = b"QEMU CFG"  # what the DMA register reads as

SIGNATURE = 0x00
ID = 0x01
UUID = 0x02
RAM_SIZE = 0x03
NOGRAPHIC = 0x04
NB_CPUS = 0x05
BOOT_MENU = 0x0E
MAX_CPUS = 0x0F
FILE_DIR = 0x19
FILE_FIRST = 0x20

WRITE_FLAG = 0x4000  # keys with it select an item for writing; writes are ignored
ARCH_LOCAL = 0x8000  # x86 items (ACPI, SMBIOS, e820 reservations): none here
ID_TRADITIONAL = 0x1  # the port interface
ID_DMA = 0x2  # the DMA interface

DMA_ERROR = 0x01
DMA_READ = 0x02
DMA_SKIP = 0x04
DMA_SELECT = 0x08
DMA_WRITE = 0x10
_DMA_ACCESS = struct.Struct(">IIQ")
FILE_NAME_SIZE = 56

E820_RAM = 1
E820_RESERVED = 2
_E820_ENTRY = struct.Struct("<QQI")
_DIR_ENTRY = struct.Struct(f">IHH{FILE_NAME_SIZE}s")


def e820_table(entries: Sequence[tuple[int, int, int]]) -> bytes:
    """``etc/e820``: (address, length, type) entries as QEMU packs them (20 bytes each)."""
    return b"".join(_E820_ENTRY.pack(*entry) for entry in entries)


class GuestMemoryError(Exception):
    """A guest-physical range that is not RAM."""


class GuestMemory(Protocol):
    """The guest's RAM as the DMA engine sees it."""

    def read(self, address: int, length: int) -> bytes:
        """`length` bytes at guest-physical `address`; `GuestMemoryError` outside RAM."""
        ...

    def write(self, address: int, data: bytes) -> None:
        """Store `data` at guest-physical `address`; `GuestMemoryError` outside RAM."""
        ...


class FwCfg(Device):
    """Items by key; `add_file` gives a named item the next file key. With `memory`, DMA."""

    name = "fw_cfg"

    def __init__(self, memory: GuestMemory | None = None) -> None:
        self.memory = memory
        features = ID_TRADITIONAL | (ID_DMA if memory is not None else 0)
        self.items: dict[int, bytes] = {SIGNATURE: b"QEMU", ID: struct.pack("<I", features)}
        self.files: list[tuple[str, int]] = []
        self.selected = b""
        self.offset = 0
        self.dma_high = 0  # the DMA register's high half, as last written

    @classmethod
    def for_pc(
        cls,
        *,
        ram_below_4g: int,
        cpus: int,
        boot_order: Sequence[str] = (),
        serial_console: int | None = None,
        memory: GuestMemory | None = None,
    ) -> FwCfg:
        """The items SeaBIOS reads on a PC: RAM size and map, CPUs, boot order, console."""
        fw = cls(memory)
        fw.add_item(RAM_SIZE, struct.pack("<Q", ram_below_4g))
        fw.add_item(NB_CPUS, struct.pack("<H", cpus))
        fw.add_item(MAX_CPUS, struct.pack("<H", cpus))
        fw.add_item(BOOT_MENU, struct.pack("<H", 0))
        fw.add_item(NOGRAPHIC, struct.pack("<H", 1 if serial_console is not None else 0))
        fw.add_file("etc/e820", e820_table([(0, ram_below_4g, E820_RAM)]))
        if boot_order:
            fw.add_file("bootorder", "".join(f"{entry}\n" for entry in boot_order).encode())
        if serial_console is not None:
            fw.add_file("etc/sercon-port", struct.pack("<H", serial_console))
        return fw

    def add_item(self, key: int, data: bytes) -> None:
        self.items[key] = bytes(data)

    def add_file(self, name: str, data: bytes) -> int:
        encoded = name.encode()
        if len(encoded) >= FILE_NAME_SIZE:
            raise ValueError(f"fw_cfg file name {name!r} is longer than {FILE_NAME_SIZE - 1}")
        if any(existing == name for existing, _ in self.files):
            raise ValueError(f"fw_cfg file {name!r} exists")
        key = FILE_FIRST + len(self.files)
        self.files.append((name, key))
        self.items[key] = bytes(data)
        self.items[FILE_DIR] = self._directory()
        return key

    def _directory(self) -> bytes:
        entries = [
            _DIR_ENTRY.pack(len(self.items[key]), key, 0, name.encode()) for name, key in self.files
        ]
        return struct.pack(">I", len(self.files)) + b"".join(entries)

    def ranges(self) -> Sequence[PortRange]:
        if self.memory is None:
            return (PortRange(SELECTOR_PORT, 2),)
        return (PortRange(SELECTOR_PORT, 2), PortRange(DMA_PORT, 8))

    def read(self, address: int, length: int) -> Reply:
        if address >= DMA_PORT:
            start = address - DMA_PORT
            return Reply(DMA_SIGNATURE[start : start + length].ljust(length, b"\0"))
        if address != DATA_PORT:
            return Reply(bytes(length))
        data = self.selected[self.offset : self.offset + length]
        self.offset += length
        return Reply(data.ljust(length, b"\0"))

    def write(self, address: int, data: bytes) -> Actions:
        if address == SELECTOR_PORT and len(data) >= 2:
            self._select(int.from_bytes(data[:2], "little"))
        elif address == DMA_PORT and len(data) == 4:
            self.dma_high = int.from_bytes(data, "big")
        elif address == DMA_LOW_PORT and len(data) == 4:
            self._dma((self.dma_high << 32) | int.from_bytes(data, "big"))
        return NO_ACTIONS  # data-port writes are ignored, as in QEMU since 2.4

    def _select(self, key: int) -> None:
        self.selected = self.items.get(key & ~WRITE_FLAG, b"")
        self.offset = 0

    def _dma(self, request: int) -> None:
        """Run the DMA request at guest-physical `request`; a request that is not in RAM is
        dropped (there is nowhere to report it)."""
        assert self.memory is not None
        try:
            control, length, address = _DMA_ACCESS.unpack(
                self.memory.read(request, _DMA_ACCESS.size)
            )
        except GuestMemoryError:
            return
        if control & DMA_SELECT:
            self._select(control >> 16)
        error = False
        if control & DMA_READ:
            data = self.selected[self.offset : self.offset + length]
            self.offset += len(data)
            try:
                self.memory.write(address, data.ljust(length, b"\0"))
            except GuestMemoryError:
                error = True
        elif control & DMA_WRITE:
            error = length > 0  # every item is read-only
        elif control & DMA_SKIP:
            self.offset += min(length, max(len(self.selected) - self.offset, 0))
        # The request was read from RAM, so its control word can be written back.
        self.memory.write(request, struct.pack(">I", DMA_ERROR if error else 0))
