"""What the PC's legacy window shows for each PAM setting (the plan, without KVM)."""

from vmsuper.devices import pam_segments
from vmsuper.pc.shadow import Kind, plan


def kinds(pam: bytes, **kw) -> dict[int, Kind]:
    return {b.start: b.kind for b in plan(pam_segments(pam), **kw)}


def test_power_on_shows_the_firmware_alias_and_nothing_below():
    shown = kinds(bytes(7))
    assert shown[0xF0000] is Kind.ROM
    assert all(shown[a] is Kind.ROM for a in (0xE0000, 0xE4000, 0xE8000, 0xEC000))
    assert all(shown[a] is Kind.NONE for a in range(0xC0000, 0xE0000, 0x4000))


def test_seabios_shadowing_sequence():
    writable = kinds(bytes([0x30]) + b"\x33" * 6)
    assert set(writable.values()) == {Kind.RAM}
    # make_bios_readonly: ROMs up to 0xe8000 read-only, one RAM segment left writable.
    locked = kinds(bytes([0x10, 0x11, 0x11, 0x11, 0x11, 0x11, 0x31]))
    assert locked[0xF0000] is Kind.RAM_READ_ONLY
    assert locked[0xE8000] is Kind.RAM_READ_ONLY
    assert locked[0xEC000] is Kind.RAM


def test_write_only_reads_from_rom_and_a_small_image_aliases_less():
    assert kinds(bytes([0x20, 0, 0, 0, 0, 0, 0]))[0xF0000] is Kind.ROM
    small = kinds(bytes(7), rom_alias_start=0xF0000)
    assert small[0xEC000] is Kind.NONE
    assert small[0xF0000] is Kind.ROM
