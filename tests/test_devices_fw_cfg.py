"""The fw_cfg model: selector/data protocol, fixed items and the file directory."""

import struct

from vmsuper.devices import FwCfg
from vmsuper.devices import fw_cfg as f


def select(dev: FwCfg, key: int) -> None:
    dev.write(f.SELECTOR_PORT, struct.pack("<H", key))


def data(dev: FwCfg, length: int) -> bytes:
    return dev.read(f.DATA_PORT, length).data


def directory(dev: FwCfg) -> dict[str, tuple[int, int]]:
    select(dev, f.FILE_DIR)
    (count,) = struct.unpack(">I", data(dev, 4))
    files = {}
    for _ in range(count):
        size, key, _, name = struct.unpack(">IHH56s", data(dev, 64))
        files[name.rstrip(b"\0").decode()] = (key, size)
    return files


def test_signature_read_byte_by_byte_and_as_a_string():
    dev = FwCfg()
    select(dev, f.SIGNATURE)
    assert data(dev, 1) == b"Q"
    assert data(dev, 3) == b"EMU"
    assert data(dev, 2) == b"\0\0"  # past the end: zeros
    select(dev, f.ID)
    assert struct.unpack("<I", data(dev, 4)) == (f.ID_TRADITIONAL,)


def test_unknown_keys_read_zeros_and_arch_keys_are_distinct():
    dev = FwCfg.for_pc(ram_below_4g=1 << 27, cpus=1)
    select(dev, 0x1234)
    assert data(dev, 4) == bytes(4)
    select(dev, f.ARCH_LOCAL | f.RAM_SIZE)  # not RAM_SIZE: the x86 e820 reservations, absent
    assert data(dev, 4) == bytes(4)


def test_pc_items():
    dev = FwCfg.for_pc(
        ram_below_4g=128 << 20, cpus=1, boot_order=["/pci@i0cf8/x"], serial_console=0x3F8
    )
    select(dev, f.RAM_SIZE)
    assert struct.unpack("<Q", data(dev, 8)) == (128 << 20,)
    select(dev, f.NB_CPUS)
    assert struct.unpack("<H", data(dev, 2)) == (1,)
    select(dev, f.NOGRAPHIC)
    assert struct.unpack("<H", data(dev, 2)) == (1,)
    files = directory(dev)
    assert set(files) == {"etc/e820", "bootorder", "etc/sercon-port"}
    key, size = files["etc/e820"]
    select(dev, key)
    assert struct.unpack("<QQI", data(dev, size)) == (0, 128 << 20, f.E820_RAM)
    key, size = files["etc/sercon-port"]
    select(dev, key)
    assert data(dev, size) == b"\xf8\x03"
    key, size = files["bootorder"]
    select(dev, key)
    assert data(dev, size) == b"/pci@i0cf8/x\n"


def test_reselecting_rewinds_and_writes_are_ignored():
    dev = FwCfg()
    select(dev, f.SIGNATURE)
    data(dev, 2)
    dev.write(f.DATA_PORT, b"x")
    select(dev, f.SIGNATURE | f.WRITE_FLAG)
    assert data(dev, 4) == b"QEMU"


def test_file_names_are_checked():
    dev = FwCfg()
    dev.add_file("a", b"1")
    for name in ("a", "x" * 56):
        try:
            dev.add_file(name, b"")
        except ValueError:
            continue
        raise AssertionError(f"{name!r} was accepted")


class FakeRam:
    """`size` bytes of guest RAM from address 0."""

    def __init__(self, size: int = 0x10000) -> None:
        self.bytes = bytearray(size)

    def read(self, address: int, length: int) -> bytes:
        if address + length > len(self.bytes):
            raise f.GuestMemoryError("not RAM")
        return bytes(self.bytes[address : address + length])

    def write(self, address: int, data: bytes) -> None:
        if address + len(data) > len(self.bytes):
            raise f.GuestMemoryError("not RAM")
        self.bytes[address : address + len(data)] = data


REQUEST = 0x1000
BUFFER = 0x2000


def dma(dev: FwCfg, ram: FakeRam, control: int, length: int, address: int = BUFFER) -> int:
    """Run one DMA request from REQUEST; the control word the device left there."""
    ram.write(REQUEST, struct.pack(">IIQ", control, length, address))
    dev.write(f.DMA_PORT, struct.pack(">I", 0))
    dev.write(f.DMA_LOW_PORT, struct.pack(">I", REQUEST))
    return struct.unpack(">I", ram.read(REQUEST, 4))[0]


def test_dma_is_announced_and_claimed_only_with_guest_memory():
    plain = FwCfg()
    assert [r.start for r in plain.ranges()] == [f.SELECTOR_PORT]
    with_dma = FwCfg(FakeRam())
    assert [(r.start, r.length) for r in with_dma.ranges()] == [(0x510, 2), (0x514, 8)]
    select(with_dma, f.ID)
    assert struct.unpack("<I", data(with_dma, 4)) == (f.ID_TRADITIONAL | f.ID_DMA,)
    assert with_dma.read(f.DMA_PORT, 4).data + with_dma.read(f.DMA_LOW_PORT, 4).data == (
        b"QEMU CFG"
    )


def test_dma_selects_and_reads_into_guest_memory_and_zero_fills_past_the_end():
    ram = FakeRam()
    dev = FwCfg.for_pc(ram_below_4g=128 << 20, cpus=2, memory=ram)
    ram.write(BUFFER, b"\xaa" * 16)
    key = f.NB_CPUS << 16
    assert dma(dev, ram, key | f.DMA_SELECT | f.DMA_READ, 4) == 0
    assert ram.read(BUFFER, 5) == b"\x02\x00\x00\x00\xaa"
    select(dev, f.SIGNATURE)
    assert dma(dev, ram, f.DMA_READ, 2) == 0  # no select: goes on from the port's selection
    assert ram.read(BUFFER, 2) == b"QE"
    assert data(dev, 2) == b"MU"  # and the data port goes on after it


def test_dma_skip_then_read_and_writes_are_refused():
    ram = FakeRam()
    dev = FwCfg(ram)
    assert dma(dev, ram, (f.SIGNATURE << 16) | f.DMA_SELECT | f.DMA_SKIP, 3) == 0
    assert dma(dev, ram, f.DMA_READ, 1) == 0
    assert ram.read(BUFFER, 1) == b"U"
    assert dma(dev, ram, (f.SIGNATURE << 16) | f.DMA_SELECT | f.DMA_WRITE, 4) == f.DMA_ERROR
    select(dev, f.SIGNATURE)
    assert data(dev, 4) == b"QEMU"


def test_dma_outside_ram_sets_the_error_bit_or_is_dropped():
    ram = FakeRam(0x3000)
    dev = FwCfg(ram)
    control = (f.SIGNATURE << 16) | f.DMA_SELECT | f.DMA_READ
    assert dma(dev, ram, control, 4, address=0x2FFE) == f.DMA_ERROR
    before = bytes(ram.bytes)
    dev.write(f.DMA_PORT, struct.pack(">I", 1))  # the request itself at 4 GiB + REQUEST
    dev.write(f.DMA_LOW_PORT, struct.pack(">I", REQUEST))
    assert bytes(ram.bytes) == before
