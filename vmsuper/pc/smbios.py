"""SMBIOS tables for fw_cfg (``etc/smbios/smbios-anchor`` and ``etc/smbios/smbios-tables``).

QEMU hands SeaBIOS ready-made SMBIOS structures this way; SeaBIOS adds its own BIOS entry
(type 0), places the tables and fixes the entry point's address and checksums. Without them
SeaBIOS builds the tables itself, looking up dozens of ``smbios/field...`` names among its
ROM files with ``snprintf`` and clearing a 32 KiB buffer byte by byte: about a quarter of a
second of emulated instructions on a host whose KVM emulates firmware code.

Pure: `smbios_files` returns the two files' bytes. Layouts follow the SMBIOS 2.4
specification (the 2.1 entry point, ``_SM_``), structure lengths as in the specification.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass

ANCHOR_NAME = "etc/smbios/smbios-anchor"
TABLES_NAME = "etc/smbios/smbios-tables"
MANUFACTURER = "vmsuper"
PRODUCT = "vmsuper-pc"
FIRST_HANDLE = 0x100
NO_HANDLE = 0xFFFF
NO_ERROR_INFO = 0xFFFE  # "not provided"
KIB = 1 << 10
MIB = 1 << 20

_ANCHOR = struct.Struct("<4sBBBBHB5s5sBHIHB")
_HEADER = struct.Struct("<BBH")


@dataclass(frozen=True, slots=True)
class Structure:
    """One SMBIOS structure: type, formatted area (after the header) and its strings."""

    type: int
    formatted: bytes
    strings: Sequence[str] = ()

    def encode(self, handle: int) -> bytes:
        header = _HEADER.pack(self.type, _HEADER.size + len(self.formatted), handle)
        strings = b"".join(text.encode("ascii") + b"\0" for text in self.strings)
        return header + self.formatted + (strings or b"\0") + b"\0"


def system() -> Structure:
    """Type 1: who made the machine; the UUID is all zeros (present but not set)."""
    formatted = struct.pack("<BBBB16sBBB", 1, 2, 0, 0, bytes(16), 0x06, 0, 0)  # power switch
    return Structure(1, formatted, (MANUFACTURER, PRODUCT))


def chassis() -> Structure:
    """Type 3: an "other" enclosure, states safe, no contained elements."""
    formatted = struct.pack("<BBBBBBBBBIBBBB", 1, 0x01, 0, 0, 0, 3, 3, 3, 2, 0, 0, 0, 0, 0)
    return Structure(3, formatted, (MANUFACTURER,))


def processor(index: int) -> Structure:
    """Type 4: a central processor, populated and enabled, without cache structures."""
    formatted = struct.pack(
        "<BBBB8sBBHHHBBHHH",
        1,  # socket designation: string 1
        0x03,  # central processor
        0x01,  # family: other
        2,  # manufacturer: string 2
        bytes(8),  # processor id
        0,  # version: none
        0,  # voltage: unknown
        0,  # external clock: unknown
        0,  # max speed: unknown
        0,  # current speed: unknown
        0x41,  # socket populated, CPU enabled
        0x01,  # upgrade: other
        NO_HANDLE,
        NO_HANDLE,
        NO_HANDLE,
    )
    return Structure(4, formatted, (f"CPU {index}", MANUFACTURER))


def memory_array(ram_size: int) -> Structure:
    """Type 16: the system board's memory, one device, no error correction."""
    formatted = struct.pack("<BBBIHH", 0x03, 0x03, 0x03, ram_size // KIB, NO_ERROR_INFO, 1)
    return Structure(16, formatted)


def memory_device(ram_size: int, array_handle: int) -> Structure:
    """Type 17: one DIMM holding all RAM (size in MiB)."""
    size_mib = max(ram_size // MIB, 1)
    formatted = struct.pack(
        "<HHHHHBBBBBH", array_handle, NO_ERROR_INFO, 64, 64, size_mib, 0x09, 0, 1, 0, 0x07, 0x02
    )
    return Structure(17, formatted, ("DIMM 0",))


def memory_mapping(ram_size: int, array_handle: int) -> Structure:
    """Type 19: the array's address range, in KiB, ending address inclusive."""
    formatted = struct.pack("<IIHB", 0, ram_size // KIB - 1, array_handle, 1)
    return Structure(19, formatted)


def boot_information() -> Structure:
    """Type 32: no errors detected."""
    return Structure(32, bytes(7))


def end_of_table() -> Structure:
    return Structure(127, b"")


def _checksum_byte(data: bytes) -> int:
    return -sum(data) & 0xFF


def anchor(*, table_length: int, max_structure: int, structures: int) -> bytes:
    """The 31-byte SMBIOS 2.1 entry point with the table at address 0 (the firmware moves the
    table and fixes the address and both checksums)."""

    def pack(checksum: int, intermediate: int) -> bytes:
        return _ANCHOR.pack(
            b"_SM_", checksum, _ANCHOR.size, 2, 4, max_structure, 0, bytes(5), b"_DMI_",
            intermediate, table_length, 0, structures, 0x24,
        )  # fmt: skip

    intermediate = _checksum_byte(pack(0, 0)[0x10:])
    return pack(_checksum_byte(pack(0, intermediate)[:0x10]), intermediate)


def smbios_files(*, ram_size: int, cpus: int) -> tuple[bytes, bytes]:
    """(anchor, tables) describing a PC with `ram_size` bytes of RAM and `cpus` processors."""
    array_handle = FIRST_HANDLE + 1 + 1 + cpus  # after system, chassis and the processors
    structures = [
        system(),
        chassis(),
        *(processor(index) for index in range(cpus)),
        memory_array(ram_size),
        memory_device(ram_size, array_handle),
        memory_mapping(ram_size, array_handle),
        boot_information(),
        end_of_table(),
    ]
    encoded = [structure.encode(FIRST_HANDLE + i) for i, structure in enumerate(structures)]
    tables = b"".join(encoded)
    head = anchor(
        table_length=len(tables),
        max_structure=max(len(item) for item in encoded),
        structures=len(encoded),
    )
    return head, tables
