"""The CMOS RTC and NVRAM at ports 0x70/0x71: the clock, status registers and what a PC BIOS
reads from its 128 bytes (memory sizes, CPU count, boot order).

The clock reads the host's time (UTC, as QEMU's default) in the format status register B asks
for (BCD or binary, 12 or 24 hour). The update-in-progress flag is never set, and alarms and
periodic interrupts (IRQ 8) are not modelled.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from .base import NO_ACTIONS, Actions, Device, PortRange, Reply

INDEX_PORT = 0x70
DATA_PORT = 0x71
NMI_DISABLE = 0x80

SECONDS = 0x00
MINUTES = 0x02
HOURS = 0x04
WEEKDAY = 0x06
DAY = 0x07
MONTH = 0x08
YEAR = 0x09
STATUS_A = 0x0A
STATUS_B = 0x0B
STATUS_C = 0x0C
STATUS_D = 0x0D
FLOPPY_TYPE = 0x10
EQUIPMENT = 0x14
BASE_MEMORY_LOW = 0x15  # KiB below 640 KiB
EXTENDED_MEMORY_LOW = 0x17  # KiB from 1 MiB to 64 MiB (also at 0x30)
EXTENDED_MEMORY2_LOW = 0x30
CENTURY = 0x32
HIGH_MEMORY_LOW = 0x34  # 64 KiB blocks from 16 MiB to 4 GiB
BOOT_FLAGS1 = 0x38  # bit 0: skip the floppy boot-sector check; high nibble: third device
ABOVE_4G_LOW = 0x5B  # 64 KiB blocks above 4 GiB (3 bytes)
BOOT_FLAGS2 = 0x3D  # first and second boot device
SMP_COUNT = 0x5F  # CPUs minus one

STATUS_B_24H = 0x02
STATUS_B_BINARY = 0x04
STATUS_B_SET = 0x80
STATUS_D_VALID = 0x80

BOOT_HARD_DISK = 0x02
MIB = 1 << 20
GIB4 = 1 << 32

Clock = Callable[[], time.struct_time]


def _utc() -> time.struct_time:
    return time.gmtime()


class Cmos(Device):
    """The RTC/NVRAM chip; `ram_below_4g`/`ram_above_4g` and `cpus` fill the BIOS fields."""

    name = "cmos"

    def __init__(
        self,
        *,
        ram_below_4g: int,
        ram_above_4g: int = 0,
        cpus: int = 1,
        clock: Clock = _utc,
    ) -> None:
        self.clock = clock
        self.index = 0
        self.nvram = bytearray(128)
        self.nvram[STATUS_A] = 0x26  # 32.768 kHz time base, 1024 Hz rate
        self.nvram[STATUS_B] = STATUS_B_24H
        self.nvram[STATUS_D] = STATUS_D_VALID
        self.nvram[BASE_MEMORY_LOW : BASE_MEMORY_LOW + 2] = (640).to_bytes(2, "little")
        extended_kib = min(max(ram_below_4g - MIB, 0) // 1024, 0xFFFF)
        for at in (EXTENDED_MEMORY_LOW, EXTENDED_MEMORY2_LOW):
            self.nvram[at : at + 2] = extended_kib.to_bytes(2, "little")
        high_blocks = min(max(ram_below_4g - 16 * MIB, 0) >> 16, 0xFFFF)
        self.nvram[HIGH_MEMORY_LOW : HIGH_MEMORY_LOW + 2] = high_blocks.to_bytes(2, "little")
        above_blocks = min(ram_above_4g >> 16, 0xFFFFFF)
        self.nvram[ABOVE_4G_LOW : ABOVE_4G_LOW + 3] = above_blocks.to_bytes(3, "little")
        self.nvram[SMP_COUNT] = max(cpus - 1, 0) & 0xFF
        self.nvram[EQUIPMENT] = 0x06  # math coprocessor, PS/2 mouse port; no floppy
        self.nvram[BOOT_FLAGS1] = 0x01
        self.nvram[BOOT_FLAGS2] = BOOT_HARD_DISK

    def ranges(self) -> Sequence[PortRange]:
        return (PortRange(INDEX_PORT, 2),)

    def read(self, address: int, length: int) -> Reply:
        if address == INDEX_PORT:
            return Reply(bytes([0xFF]) * length)  # the index register is write-only
        return Reply(bytes([self.read_register(self.index)]) * length)

    def write(self, address: int, data: bytes) -> Actions:
        if address == INDEX_PORT:
            self.index = data[0] & 0x7F  # bit 7 masks NMIs: nothing to mask here
            if len(data) > 1:  # `outw` to 0x70 also writes the data port
                self.write_register(self.index, data[1])
        else:
            for byte in data:
                self.write_register(self.index, byte)
        return NO_ACTIONS

    def read_register(self, index: int) -> int:
        if index <= YEAR or index == CENTURY:
            return self._time_field(index)
        if index == STATUS_C:
            value = self.nvram[STATUS_C]
            self.nvram[STATUS_C] = 0  # reading acknowledges pending interrupts
            return value
        return self.nvram[index]

    def write_register(self, index: int, value: int) -> None:
        if index in (STATUS_C, STATUS_D):
            return  # read-only
        if index == STATUS_A:
            value &= 0x7F  # UIP is read-only
        self.nvram[index] = value

    def _time_field(self, index: int) -> int:
        if index in (1, 3, 5):  # alarms
            return self.nvram[index]
        now = self.clock()
        status_b = self.nvram[STATUS_B]
        hour = now.tm_hour
        pm = 0
        if index == HOURS and not status_b & STATUS_B_24H:
            pm = 0x80 if hour >= 12 else 0
            hour = hour % 12 or 12
        value = {
            SECONDS: now.tm_sec,
            MINUTES: now.tm_min,
            HOURS: hour,
            WEEKDAY: (now.tm_wday + 1) % 7 + 1,  # Sunday is 1
            DAY: now.tm_mday,
            MONTH: now.tm_mon,
            YEAR: now.tm_year % 100,
            CENTURY: now.tm_year // 100,
        }[index]
        if not status_b & STATUS_B_BINARY:
            value = (value // 10) << 4 | value % 10
        return value | pm
