"""The i440FX/PIIX3 PC chipset's PCI functions: host bridge with PAM, ISA bridge, IDE.

The IDs and subsystem IDs are QEMU's, because SeaBIOS recognises the machine by them (the
host bridge's subsystem 1af4:1100 says "QEMU", its device 1237 "i440fx").

PAM (Programmable Attribute Map, config registers 0x59-0x5f of the host bridge) decides for
each segment of 0xc0000-0xfffff whether reads and writes go to RAM or to the ROM / PCI side.
A BIOS copies itself into RAM there and write-protects it ("shadowing"); the machine turns the
attributes into memory slots (`vmsuper.pc.shadow`).
"""

from __future__ import annotations

from dataclasses import dataclass

from .base import NO_ACTIONS, Actions, RemapMemory
from .pci import HEADER_MULTIFUNCTION, PciFunction

INTEL = 0x8086
QEMU_SUBSYSTEM = (0x1AF4, 0x1100)

PAM0 = 0x59
PAM_COUNT = 7
SMRAM = 0x72

PAM_READ = 0x1
PAM_WRITE = 0x2


@dataclass(frozen=True, slots=True)
class PamSegment:
    """A piece of 0xc0000-0xfffff and its attribute bits (PAM_READ | PAM_WRITE)."""

    start: int
    length: int
    attributes: int


def pam_segments(pam: bytes) -> list[PamSegment]:
    """The 13 segments of the legacy window from the 7 PAM bytes.

    PAM0's high nibble covers 0xf0000-0xfffff (64 KiB); every other nibble one 16 KiB segment
    from 0xc0000 up, low nibble first.
    """
    segments = []
    for index in range(1, PAM_COUNT):
        for half in (0, 1):
            start = 0xC0000 + ((index - 1) * 2 + half) * 0x4000
            segments.append(PamSegment(start, 0x4000, (pam[index] >> (4 * half)) & 0x3))
    segments.append(PamSegment(0xF0000, 0x10000, (pam[0] >> 4) & 0x3))
    return segments


class I440fxHost(PciFunction):
    """00.0, the host bridge; a PAM write becomes a `RemapMemory` action."""

    name = "i440fx"

    def __init__(self) -> None:
        super().__init__(
            vendor=INTEL,
            device=0x1237,
            class_code=0x060000,
            revision=0x02,
            subsystem=QEMU_SUBSYSTEM,
        )
        self.set_writable(0x50, b"\xff" * 9)  # PMCCFG, DRAMC, DRAMT, PAM0-6
        self.set_writable(PAM0, b"\x30" + b"\x33" * (PAM_COUNT - 1))
        self.set_writable(SMRAM, b"\x78")
        self.config[SMRAM] = 0x02

    @property
    def pam(self) -> bytes:
        return bytes(self.config[PAM0 : PAM0 + PAM_COUNT])

    def segments(self) -> list[PamSegment]:
        return pam_segments(self.pam)

    def config_written(self, offset: int, length: int) -> Actions:
        if offset < PAM0 + PAM_COUNT and offset + length > PAM0:
            return (RemapMemory(self.name),)
        return NO_ACTIONS


class Piix3Isa(PciFunction):
    """01.0, the ISA bridge (PIRQ routing registers, nothing behind them here)."""

    name = "piix3-isa"

    def __init__(self) -> None:
        super().__init__(
            vendor=INTEL,
            device=0x7000,
            class_code=0x060100,
            header_type=HEADER_MULTIFUNCTION,
            subsystem=QEMU_SUBSYSTEM,
        )
        self.set_writable(0x40, b"\xff" * 0xC0)
        self.config[0x60:0x64] = b"\x80" * 4  # PIRQA-D routed nowhere


class Piix3Ide(PciFunction):
    """01.1, the IDE controller in legacy mode (ports 0x1f0/0x170), bus-master BAR4."""

    name = "piix3-ide"

    def __init__(self) -> None:
        super().__init__(
            vendor=INTEL,
            device=0x7010,
            class_code=0x010180,  # IDE, legacy mode on both channels, bus-master capable
            subsystem=QEMU_SUBSYSTEM,
        )
        self.add_io_bar(4, 16)
        self.set_writable(0x40, b"\xff" * 0x10)  # IDE timing registers
