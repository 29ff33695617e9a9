"""An ATA (IDE) channel in PIO mode: a hard disk as device 0, nothing as device 1.

Command block at `base` (0x1f0: data, error/features, sector count, LBA low/mid/high or
sector/cylinder, device/head, status/command), control block at `control` (0x3f6: alternate
status / device control). Commands: IDENTIFY DEVICE, READ/WRITE SECTORS (LBA28 or CHS) and
their EXT forms (LBA48), INITIALIZE DEVICE PARAMETERS, FLUSH CACHE, SET FEATURES and a few
no-ops; everything else (IDENTIFY PACKET DEVICE included) is aborted, which is how a BIOS
learns the drive is not ATAPI. Data moves through the data port, a sector at a time; string
I/O moves as much as the guest asks in one access.

The interrupt (IRQ 14) is raised when a sector is ready and when a command ends, unless
device control nIEN is set, and dropped when the guest reads the status register. With no
drive selected every register reads zero, as QEMU answers for an empty position.
"""

from __future__ import annotations

from collections.abc import Sequence

from .base import NO_ACTIONS, Actions, Device, PortRange, Reply, SetIrq, value_bytes
from .disk import SECTOR, Disk

PRIMARY = 0x1F0
PRIMARY_CONTROL = 0x3F6
PRIMARY_IRQ = 14

DATA = 0
ERROR_FEATURES = 1
SECTOR_COUNT = 2
LBA_LOW = 3
LBA_MID = 4
LBA_HIGH = 5
DEVICE = 6
STATUS_COMMAND = 7

STATUS_ERR = 0x01
STATUS_DRQ = 0x08
STATUS_DSC = 0x10
STATUS_DRDY = 0x40
STATUS_BSY = 0x80
READY = STATUS_DRDY | STATUS_DSC

ERROR_ABORT = 0x04
DEVICE_DEV1 = 0x10
DEVICE_LBA = 0x40
CONTROL_NIEN = 0x02
CONTROL_SRST = 0x04

CMD_READ_SECTORS = (0x20, 0x21)
CMD_READ_SECTORS_EXT = 0x24
CMD_WRITE_SECTORS = (0x30, 0x31)
CMD_WRITE_SECTORS_EXT = 0x34
CMD_VERIFY = (0x40, 0x41, 0x42)
CMD_EXECUTE_DIAGNOSTIC = 0x90
CMD_INITIALIZE_PARAMETERS = 0x91
CMD_IDENTIFY = 0xEC
CMD_FLUSH = (0xE7, 0xEA)
CMD_CHECK_POWER = 0xE5
CMD_NO_DATA_OK = (0xE0, 0xE1, 0xE2, 0xE3, 0xEF, 0xC6, 0x10)  # power, SET FEATURES, recalibrate

MODEL = "VMSUPER HARDDISK"
SERIAL = "VMS00001"
FIRMWARE = "0.1"


def default_geometry(sectors: int) -> tuple[int, int, int]:
    """(cylinders, heads, sectors per track) as QEMU guesses them for a raw disk."""
    heads, per_track = 16, 63
    cylinders = max(2, min(sectors // (heads * per_track), 16383))
    return cylinders, heads, per_track


def _ata_string(text: str, length: int) -> bytes:
    """IDENTIFY strings: space padded, two characters per word, first one in the high byte."""
    raw = text.encode().ljust(length, b" ")
    return b"".join(raw[i + 1 : i + 2] + raw[i : i + 1] for i in range(0, length, 2))


class AtaChannel(Device):
    """One channel; `disk` is device 0 (or None for an empty channel)."""

    name = "ata"

    def __init__(
        self,
        disk: Disk | None,
        *,
        base: int = PRIMARY,
        control: int = PRIMARY_CONTROL,
        irq: int = PRIMARY_IRQ,
    ) -> None:
        self.disk = disk
        self.base = base
        self.control_port = control
        self.irq = irq
        self.features = 0
        self.error = 0x01  # diagnostics passed
        self.hob = bytearray(6)  # previous writes of the LBA48 "high order" registers
        self.regs = bytearray(6)  # features..lba high, device at 6
        self.device = 0xA0
        self.status = READY if disk else 0
        self.control = 0
        self.buffer = b""
        self.position = 0
        self.writing = False
        self.next_lba = 0
        self.remaining = 0
        self.irq_level = False
        sectors = disk.sectors if disk else 0
        self.cylinders, self.heads, self.per_track = default_geometry(sectors)
        self._set_signature()

    def ranges(self) -> Sequence[PortRange]:
        return (PortRange(self.base, 8), PortRange(self.control_port, 1))

    # --- guest accesses ----------------------------------------------------------------------

    def read(self, address: int, length: int) -> Reply:
        if address == self.control_port:
            return Reply(bytes([self._status()]) * length)
        offset = address - self.base
        if offset == DATA:
            return self._read_data(length)
        if not self._present():
            return Reply(bytes(length))
        if offset == STATUS_COMMAND:
            return Reply(bytes([self.status]) * length, self._set_irq(False))
        if offset == ERROR_FEATURES:
            value = self.error
        elif offset == DEVICE:
            value = self.device
        else:
            value = self.regs[offset]
        return Reply(value_bytes(value, 1) * length)

    def write(self, address: int, data: bytes) -> Actions:
        if address == self.control_port:
            return self._write_control(data[-1])
        offset = address - self.base
        if offset == DATA:
            return self._write_data(data)
        value = data[0]
        if offset == DEVICE:
            self.device = value | 0xA0
            return NO_ACTIONS
        if offset == STATUS_COMMAND:
            return self._command(value) if self._present() else NO_ACTIONS
        if offset == ERROR_FEATURES:
            self.features = value
        self.hob[offset] = self.regs[offset]
        self.regs[offset] = value
        return NO_ACTIONS

    # --- state -------------------------------------------------------------------------------

    def _present(self) -> bool:
        return self.disk is not None and not self.device & DEVICE_DEV1

    def _status(self) -> int:
        return self.status if self._present() else 0

    def _set_signature(self) -> None:
        self.regs[SECTOR_COUNT] = 1
        self.regs[LBA_LOW] = 1
        self.regs[LBA_MID] = 0
        self.regs[LBA_HIGH] = 0

    def _set_irq(self, level: bool) -> Actions:
        if level and self.control & CONTROL_NIEN:
            level = False
        if level == self.irq_level:
            return NO_ACTIONS
        self.irq_level = level
        return (SetIrq(self.irq, level),)

    def _write_control(self, value: int) -> Actions:
        was_reset = self.control & CONTROL_SRST
        self.control = value
        if value & CONTROL_SRST:
            self.status = STATUS_BSY if self.disk else 0
            self._end_transfer()
        elif was_reset:
            self.status = READY if self.disk else 0
            self.error = 0x01
            self._set_signature()
        if value & CONTROL_NIEN:
            return self._set_irq(False)
        return NO_ACTIONS

    def _finish(self, *, error: int = 0) -> Actions:
        self._end_transfer()
        self.error = error
        self.status = READY | (STATUS_ERR if error else 0)
        return self._set_irq(True)

    def _end_transfer(self) -> None:
        self.buffer = b""
        self.position = 0
        self.remaining = 0
        self.writing = False

    # --- commands ----------------------------------------------------------------------------

    def _command(self, command: int) -> Actions:
        assert self.disk is not None
        if command == CMD_IDENTIFY:
            return self._start_read_buffer(self._identify())
        if command in CMD_READ_SECTORS or command == CMD_READ_SECTORS_EXT:
            return self._start_transfer(command == CMD_READ_SECTORS_EXT, writing=False)
        if command in CMD_WRITE_SECTORS or command == CMD_WRITE_SECTORS_EXT:
            return self._start_transfer(command == CMD_WRITE_SECTORS_EXT, writing=True)
        if command == CMD_INITIALIZE_PARAMETERS:
            self.heads = (self.device & 0x0F) + 1
            self.per_track = self.regs[SECTOR_COUNT] or self.per_track
            return self._finish()
        if command in CMD_FLUSH:
            self.disk.flush()
            return self._finish()
        if command == CMD_CHECK_POWER:
            self.regs[SECTOR_COUNT] = 0xFF  # active
            return self._finish()
        if command == CMD_EXECUTE_DIAGNOSTIC:
            self._set_signature()
            self.status = READY
            self.error = 0x01
            return self._set_irq(True)
        if command in CMD_VERIFY or command in CMD_NO_DATA_OK:
            return self._finish()
        return self._finish(error=ERROR_ABORT)

    def _address(self, ext: bool) -> tuple[int, int] | None:
        """(first LBA, sector count) of a read/write, or None if outside the disk."""
        assert self.disk is not None
        r, h = self.regs, self.hob
        if ext:
            lba = (
                r[LBA_LOW]
                | r[LBA_MID] << 8
                | r[LBA_HIGH] << 16
                | h[LBA_LOW] << 24
                | h[LBA_MID] << 32
                | h[LBA_HIGH] << 40
            )
            count = (r[SECTOR_COUNT] | h[SECTOR_COUNT] << 8) or 65536
        else:
            count = r[SECTOR_COUNT] or 256
            if self.device & DEVICE_LBA:
                lba = r[LBA_LOW] | r[LBA_MID] << 8 | r[LBA_HIGH] << 16 | (self.device & 0xF) << 24
            else:
                cylinder = r[LBA_MID] | r[LBA_HIGH] << 8
                head = self.device & 0x0F
                sector = r[LBA_LOW]
                if sector == 0 or sector > self.per_track or head >= self.heads:
                    return None
                lba = (cylinder * self.heads + head) * self.per_track + sector - 1
        if lba + count > self.disk.sectors:
            return None
        return lba, count

    def _start_transfer(self, ext: bool, *, writing: bool) -> Actions:
        assert self.disk is not None
        found = self._address(ext)
        if found is None:
            return self._finish(error=ERROR_ABORT | 0x10)  # IDNF: no such sector
        lba, count = found
        self.next_lba = lba
        self.remaining = count
        self.writing = writing
        if writing:
            self.buffer = bytes(SECTOR)
            self.position = 0
            self.status = READY | STATUS_DRQ  # no interrupt before the first sector's data
            return NO_ACTIONS
        return self._load_next_sector()

    def _load_next_sector(self) -> Actions:
        assert self.disk is not None
        self.buffer = self.disk.read(self.next_lba, 1)
        self.position = 0
        self.next_lba += 1
        self.remaining -= 1
        self.status = READY | STATUS_DRQ
        return self._set_irq(True)

    def _start_read_buffer(self, data: bytes) -> Actions:
        self.buffer = data
        self.position = 0
        self.remaining = 0
        self.writing = False
        self.status = READY | STATUS_DRQ
        return self._set_irq(True)

    def _read_data(self, length: int) -> Reply:
        if not self._present() or self.writing or not self.status & STATUS_DRQ:
            return Reply(bytes(length))
        out = bytearray()
        actions: Actions = NO_ACTIONS
        while len(out) < length and self.status & STATUS_DRQ:
            take = min(length - len(out), len(self.buffer) - self.position)
            out += self.buffer[self.position : self.position + take]
            self.position += take
            if self.position >= len(self.buffer):
                actions += self._load_next_sector() if self.remaining else self._finish()
        return Reply(bytes(out).ljust(length, b"\0"), actions)

    def _write_data(self, data: bytes) -> Actions:
        if not self._present() or not self.writing or not self.status & STATUS_DRQ:
            return NO_ACTIONS
        assert self.disk is not None
        actions: Actions = NO_ACTIONS
        sector = bytearray(self.buffer)
        done = 0
        while done < len(data) and self.writing:
            take = min(len(data) - done, SECTOR - self.position)
            sector[self.position : self.position + take] = data[done : done + take]
            self.position += take
            done += take
            if self.position == SECTOR:
                self.disk.write(self.next_lba, bytes(sector))
                self.next_lba += 1
                self.remaining -= 1
                self.position = 0
                sector = bytearray(SECTOR)
                if self.remaining:
                    actions += self._set_irq(True)
                else:
                    actions += self._finish()
        self.buffer = bytes(sector)
        return actions

    def _identify(self) -> bytes:
        assert self.disk is not None
        words = [0] * 256
        total = self.disk.sectors
        lba28 = min(total, (1 << 28) - 1)
        chs_total = self.cylinders * self.heads * self.per_track
        words[0] = 0x0040  # fixed disk
        words[1] = self.cylinders
        words[3] = self.heads
        words[6] = self.per_track
        words[47] = 0x8001  # READ/WRITE MULTIPLE: 1 sector
        words[49] = 1 << 9  # LBA
        words[50] = 0x4000
        words[53] = 0x0001  # words 54-58 valid
        words[54] = self.cylinders
        words[55] = self.heads
        words[56] = self.per_track
        words[57] = chs_total & 0xFFFF
        words[58] = chs_total >> 16
        words[60] = lba28 & 0xFFFF
        words[61] = lba28 >> 16
        words[80] = 0x00F0  # ATA/ATAPI-4 to -7
        words[82] = 0x4000
        words[83] = 0x4000 | 1 << 10  # 48-bit addressing
        words[84] = 0x4000
        words[85] = 0x4000
        words[86] = 1 << 10
        words[87] = 0x4000
        words[93] = 0x6001
        for i in range(4):
            words[100 + i] = (total >> (16 * i)) & 0xFFFF
        data = bytearray(b"".join(w.to_bytes(2, "little") for w in words))
        data[20:40] = _ata_string(SERIAL, 20)
        data[46:54] = _ata_string(FIRMWARE, 8)
        data[54:94] = _ata_string(MODEL, 40)
        return bytes(data)
