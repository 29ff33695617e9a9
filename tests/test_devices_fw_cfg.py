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
