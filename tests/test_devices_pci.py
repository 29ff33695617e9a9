"""PCI configuration mechanism #1, config space masks, the chipset functions and PAM."""

import struct

from vmsuper.devices import (
    I440fxHost,
    PciHost,
    Piix3Ide,
    Piix3Isa,
    RemapMemory,
    ResetRequest,
    chipset,
    pci,
)
from vmsuper.devices.chipset import PAM_READ, PAM_WRITE, pam_segments


def machine() -> PciHost:
    host = PciHost()
    host.attach(0, 0, I440fxHost())
    host.attach(1, 0, Piix3Isa())
    host.attach(1, 1, Piix3Ide())
    return host


def address(device: int, function: int, offset: int, bus: int = 0) -> bytes:
    value = pci.ENABLE | bus << 16 | device << 11 | function << 8 | (offset & 0xFC)
    return struct.pack("<I", value)


def config_read(host: PciHost, device: int, function: int, offset: int, length: int) -> int:
    host.write(pci.CONFIG_ADDRESS, address(device, function, offset))
    reply = host.read(pci.CONFIG_DATA + (offset & 3), length)
    return int.from_bytes(reply.data, "little")


def config_write(host: PciHost, device: int, function: int, offset: int, data: bytes):
    host.write(pci.CONFIG_ADDRESS, address(device, function, offset))
    return host.write(pci.CONFIG_DATA + (offset & 3), data)


def test_ids_that_seabios_checks():
    host = machine()
    assert config_read(host, 0, 0, pci.VENDOR_ID, 4) == 0x1237_8086
    assert config_read(host, 0, 0, pci.SUBSYSTEM_VENDOR_ID, 2) == 0x1AF4
    assert config_read(host, 0, 0, pci.SUBSYSTEM_ID, 2) == 0x1100
    assert config_read(host, 1, 0, pci.DEVICE_ID, 2) == 0x7000
    assert config_read(host, 1, 0, pci.HEADER_TYPE, 1) & pci.HEADER_MULTIFUNCTION
    assert config_read(host, 1, 1, pci.DEVICE_ID, 2) == 0x7010
    assert config_read(host, 1, 1, pci.REVISION, 4) >> 8 == 0x010180
    assert config_read(host, 1, 1, pci.CLASS_PROG, 4) == 0xFFFFFFFF  # crosses the dword


def test_absent_functions_and_other_buses_read_all_ones():
    host = machine()
    assert config_read(host, 5, 0, 0, 4) == 0xFFFFFFFF
    host.write(pci.CONFIG_ADDRESS, address(0, 0, 0, bus=1))
    assert host.read(pci.CONFIG_DATA, 2).data == b"\xff\xff"
    host.write(pci.CONFIG_ADDRESS, struct.pack("<I", 0))  # enable bit clear
    assert host.read(pci.CONFIG_DATA, 4).data == b"\xff" * 4


def test_address_register_reads_back_and_byte_offsets_work():
    host = machine()
    host.write(pci.CONFIG_ADDRESS, address(0, 0, 0x59))
    assert host.read(pci.CONFIG_ADDRESS, 4).data == address(0, 0, 0x58)
    assert config_read(host, 0, 0, 0x02, 2) == 0x1237
    assert config_read(host, 0, 0, 0x03, 1) == 0x12


def test_read_only_registers_keep_their_value():
    host = machine()
    config_write(host, 0, 0, pci.VENDOR_ID, b"\0\0\0\0")
    assert config_read(host, 0, 0, pci.VENDOR_ID, 4) == 0x1237_8086
    config_write(host, 1, 1, pci.COMMAND, b"\xff\xff")
    assert config_read(host, 1, 1, pci.COMMAND, 2) == pci.COMMAND_WRITABLE


def test_io_bar_sizes_itself_and_takes_an_address():
    host = machine()
    bar4 = pci.BAR0 + 16
    config_write(host, 1, 1, bar4, b"\xff" * 4)
    assert config_read(host, 1, 1, bar4, 4) == 0xFFFFFFF1  # 16 bytes of I/O
    config_write(host, 1, 1, bar4, struct.pack("<I", 0xC000))
    assert config_read(host, 1, 1, bar4, 4) == 0xC001


def test_pam_writes_remap_and_decode_into_segments():
    host = machine()
    bridge = host.functions[(0, 0)]
    assert isinstance(bridge, I440fxHost)
    actions = config_write(host, 0, 0, 0x58, struct.pack("<I", 0x00_33_30_00))
    assert actions == (RemapMemory("i440fx"),)
    assert config_write(host, 0, 0, 0x50, b"\x00") == ()  # not PAM: nothing to remap
    segments = bridge.segments()
    assert len(segments) == 13
    f_segment = segments[-1]
    assert (f_segment.start, f_segment.length, f_segment.attributes) == (
        0xF0000,
        0x10000,
        PAM_READ | PAM_WRITE,
    )
    assert (segments[0].start, segments[0].attributes) == (0xC0000, PAM_READ | PAM_WRITE)
    assert (segments[1].start, segments[1].attributes) == (0xC4000, PAM_READ | PAM_WRITE)
    assert all(s.attributes == 0 for s in segments[2:-1])
    config_write(host, 0, 0, 0x59, b"\xff")  # reserved bits of PAM0 stay clear
    assert config_read(host, 0, 0, 0x59, 1) == 0x30


def test_pam_segment_order():
    pam = bytes([0x10, 0x21, 0, 0, 0, 0, 0x13])
    segments = pam_segments(pam)
    assert [(s.start, s.attributes) for s in segments if s.attributes] == [
        (0xC0000, 1),
        (0xC4000, 2),
        (0xE8000, 3),
        (0xEC000, 1),
        (0xF0000, 1),
    ]
    assert len(pam) == chipset.PAM_COUNT


def test_reset_control_register():
    host = machine()
    assert host.write(pci.RESET_CONTROL, b"\x02") == ()
    assert host.read(pci.RESET_CONTROL, 1).data == b"\x02"
    (action,) = host.write(pci.RESET_CONTROL, b"\x06")
    assert isinstance(action, ResetRequest)
    assert "0xcf9" in action.source


def test_slots_are_checked():
    host = machine()
    for slot in ((0, 0), (32, 0), (0, 8)):
        try:
            host.attach(*slot, Piix3Isa())
        except ValueError:
            continue
        raise AssertionError(f"slot {slot} was accepted")
