"""The CMOS/RTC model: clock in BCD and binary, status registers, BIOS memory fields."""

import time

from vmsuper.devices import Cmos
from vmsuper.devices import cmos as c

NOW = time.struct_time((2026, 12, 4, 21, 7, 9, 4, 338, 0))  # a Friday, 21:07:09


def reg(dev: Cmos, index: int) -> int:
    dev.write(c.INDEX_PORT, bytes([index | c.NMI_DISABLE]))
    return dev.read(c.DATA_PORT, 1).data[0]


def make(**kw) -> Cmos:
    return Cmos(ram_below_4g=kw.pop("ram", 128 << 20), clock=lambda: NOW, **kw)


def test_time_reads_in_bcd_by_default():
    dev = make()
    got = [reg(dev, i) for i in (c.SECONDS, c.MINUTES, c.HOURS, c.DAY, c.MONTH, c.YEAR)]
    assert got == [0x09, 0x07, 0x21, 0x04, 0x12, 0x26]
    assert reg(dev, c.CENTURY) == 0x20
    assert reg(dev, c.WEEKDAY) == 6  # Friday, with Sunday = 1


def test_binary_and_12_hour_modes_follow_status_b():
    dev = make()
    dev.write(c.INDEX_PORT, bytes([c.STATUS_B]))
    dev.write(c.DATA_PORT, bytes([c.STATUS_B_BINARY]))
    assert reg(dev, c.HOURS) == 0x80 | 9  # 9 PM
    assert reg(dev, c.MINUTES) == 7


def test_status_registers():
    dev = make()
    assert reg(dev, c.STATUS_A) & 0x80 == 0  # never updating
    assert reg(dev, c.STATUS_D) == c.STATUS_D_VALID
    dev.write(c.INDEX_PORT, bytes([c.STATUS_D]))
    dev.write(c.DATA_PORT, b"\x00")
    assert reg(dev, c.STATUS_D) == c.STATUS_D_VALID  # read-only


def test_memory_size_fields():
    dev = make(ram=32 << 20, cpus=2)
    assert reg(dev, 0x15) | reg(dev, 0x16) << 8 == 640
    extended = (32 << 20) - (1 << 20)
    assert reg(dev, 0x30) | reg(dev, 0x31) << 8 == extended // 1024
    assert reg(dev, 0x17) | reg(dev, 0x18) << 8 == extended // 1024
    assert reg(dev, 0x34) | reg(dev, 0x35) << 8 == ((32 - 16) << 20) >> 16
    assert reg(dev, c.SMP_COUNT) == 1
    assert reg(dev, c.BOOT_FLAGS2) == c.BOOT_HARD_DISK


def test_extended_memory_saturates_and_nvram_is_writable():
    dev = make(ram=2048 << 20)
    assert reg(dev, 0x30) | reg(dev, 0x31) << 8 == 0xFFFF
    dev.write(c.INDEX_PORT, b"\x50")
    dev.write(c.DATA_PORT, b"\xab")
    assert reg(dev, 0x50) == 0xAB


def test_outw_to_the_index_port_sets_the_index_then_writes_the_data_port():
    dev = make(ram=32 << 20)
    dev.write(c.INDEX_PORT, bytes([0x51 | c.NMI_DISABLE, 0xCD]))
    assert reg(dev, 0x51) == 0xCD
