"""The ATA channel: detection, IDENTIFY, PIO reads and writes in LBA28, CHS and LBA48."""

import struct

from vmsuper.devices import AtaChannel, MemoryDisk, SetIrq
from vmsuper.devices import ata as a
from vmsuper.devices.disk import SECTOR

BASE = a.PRIMARY


def disk(sectors: int = 2048) -> MemoryDisk:
    data = bytearray(sectors * SECTOR)
    for lba in range(sectors):
        data[lba * SECTOR : lba * SECTOR + 4] = struct.pack("<I", lba)
    return MemoryDisk(data)


def reg(dev: AtaChannel, offset: int) -> int:
    return dev.read(BASE + offset, 1).data[0]


def out(dev: AtaChannel, offset: int, value: int):
    return dev.write(BASE + offset, bytes([value]))


def command(dev: AtaChannel, cmd: int, *, count: int, lba: int, device: int = a.DEVICE_LBA):
    out(dev, a.DEVICE, device | ((lba >> 24) & 0xF))
    out(dev, a.SECTOR_COUNT, count)
    out(dev, a.LBA_LOW, lba & 0xFF)
    out(dev, a.LBA_MID, (lba >> 8) & 0xFF)
    out(dev, a.LBA_HIGH, (lba >> 16) & 0xFF)
    return out(dev, a.STATUS_COMMAND, cmd)


def test_detection_as_seabios_probes_it():
    dev = AtaChannel(disk())
    out(dev, a.DEVICE, 0xA0)
    out(dev, a.SECTOR_COUNT, 0x55)
    out(dev, a.LBA_LOW, 0xAA)
    assert (reg(dev, a.SECTOR_COUNT), reg(dev, a.LBA_LOW), reg(dev, a.DEVICE)) == (0x55, 0xAA, 0xA0)
    assert reg(dev, a.STATUS_COMMAND) == a.READY
    out(dev, a.DEVICE, 0xB0)  # device 1 is absent: everything reads zero
    out(dev, a.SECTOR_COUNT, 0x55)
    assert reg(dev, a.SECTOR_COUNT) == 0
    assert reg(dev, a.STATUS_COMMAND) == 0
    assert dev.read(a.PRIMARY_CONTROL, 1).data == b"\0"


def test_soft_reset_sets_busy_then_the_ata_signature():
    dev = AtaChannel(disk())
    dev.write(a.PRIMARY_CONTROL, bytes([a.CONTROL_SRST | a.CONTROL_NIEN]))
    assert reg(dev, a.STATUS_COMMAND) & a.STATUS_BSY
    dev.write(a.PRIMARY_CONTROL, bytes([a.CONTROL_NIEN]))
    assert reg(dev, a.STATUS_COMMAND) == a.READY
    assert [reg(dev, r) for r in (a.SECTOR_COUNT, a.LBA_LOW, a.LBA_MID, a.LBA_HIGH)] == [1, 1, 0, 0]


def test_identify_packet_is_aborted_and_identify_describes_the_disk():
    dev = AtaChannel(disk())
    out(dev, a.DEVICE, 0xA0)
    out(dev, a.STATUS_COMMAND, 0xA1)
    assert reg(dev, a.STATUS_COMMAND) & a.STATUS_ERR
    assert reg(dev, a.ERROR_FEATURES) == a.ERROR_ABORT
    out(dev, a.STATUS_COMMAND, a.CMD_IDENTIFY)
    assert reg(dev, a.STATUS_COMMAND) == a.READY | a.STATUS_DRQ
    words = struct.unpack("<256H", dev.read(BASE, 512).data)
    assert reg(dev, a.STATUS_COMMAND) == a.READY
    assert words[0] == 0x0040
    assert (words[1], words[3], words[6]) == (2, 16, 63)
    assert words[60] | words[61] << 16 == 2048
    assert words[83] & (1 << 10)
    assert words[100] == 2048
    model = bytes(b for w in words[27:47] for b in w.to_bytes(2, "big")).decode().strip()
    assert model == a.MODEL


def test_read_sectors_lba28_word_by_word_and_in_strings():
    dev = AtaChannel(disk())
    command(dev, a.CMD_READ_SECTORS[0], count=2, lba=5)
    first = b"".join(dev.read(BASE, 2).data for _ in range(256))
    assert first[:4] == struct.pack("<I", 5)
    assert reg(dev, a.STATUS_COMMAND) & a.STATUS_DRQ  # the second sector is ready
    second = dev.read(BASE, 512).data
    assert second[:4] == struct.pack("<I", 6)
    assert reg(dev, a.STATUS_COMMAND) == a.READY


def test_read_in_chs_and_lba48():
    dev = AtaChannel(disk())
    # cylinder 1, head 2, sector 3 -> (1 * 16 + 2) * 63 + 2
    out(dev, a.DEVICE, 0xA0 | 2)
    out(dev, a.SECTOR_COUNT, 1)
    out(dev, a.LBA_LOW, 3)
    out(dev, a.LBA_MID, 1)
    out(dev, a.LBA_HIGH, 0)
    out(dev, a.STATUS_COMMAND, a.CMD_READ_SECTORS[0])
    assert dev.read(BASE, 512).data[:4] == struct.pack("<I", 18 * 63 + 2)
    for register, high, low in ((a.SECTOR_COUNT, 0, 1), (a.LBA_LOW, 0, 0x34), (a.LBA_MID, 0, 0x02)):
        out(dev, register, high)
        out(dev, register, low)
    out(dev, a.LBA_HIGH, 0)
    out(dev, a.LBA_HIGH, 0)
    out(dev, a.STATUS_COMMAND, a.CMD_READ_SECTORS_EXT)
    assert dev.read(BASE, 512).data[:4] == struct.pack("<I", 0x234)


def test_write_sectors_store_each_sector_and_raise_irq_14():
    backing = disk()
    dev = AtaChannel(backing)
    dev.write(a.PRIMARY_CONTROL, b"\x00")  # interrupts on
    assert command(dev, a.CMD_WRITE_SECTORS[0], count=2, lba=7) == ()
    assert reg(dev, a.STATUS_COMMAND) & a.STATUS_DRQ
    assert dev.write(BASE, b"\x11" * 512) == (SetIrq(a.PRIMARY_IRQ, True),)
    assert backing.read(7, 1) == b"\x11" * 512
    reply = dev.read(BASE + a.STATUS_COMMAND, 1)
    assert reply.actions == (SetIrq(a.PRIMARY_IRQ, False),)
    for _ in range(256):
        dev.write(BASE, b"\x22\x22")
    assert backing.read(8, 1) == b"\x22" * 512
    assert reg(dev, a.STATUS_COMMAND) == a.READY


def test_nien_keeps_the_line_low():
    dev = AtaChannel(disk())
    dev.write(a.PRIMARY_CONTROL, bytes([a.CONTROL_NIEN]))
    assert command(dev, a.CMD_READ_SECTORS[0], count=1, lba=0) == ()


def test_out_of_range_and_unknown_commands_fail():
    dev = AtaChannel(disk(16))
    command(dev, a.CMD_READ_SECTORS[0], count=2, lba=15)
    assert reg(dev, a.STATUS_COMMAND) & a.STATUS_ERR
    assert dev.read(BASE, 2).data == b"\0\0"  # no data phase
    command(dev, 0xC4, count=1, lba=0)  # READ MULTIPLE is not supported
    assert reg(dev, a.ERROR_FEATURES) == a.ERROR_ABORT


def test_an_empty_channel_reads_zero():
    dev = AtaChannel(None)
    assert reg(dev, a.STATUS_COMMAND) == 0
    out(dev, a.STATUS_COMMAND, a.CMD_IDENTIFY)
    assert dev.read(BASE, 512).data == bytes(512)
