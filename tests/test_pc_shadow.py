"""What the PC's legacy window shows for each PAM setting (the plan, without KVM)."""

from vmsuper.devices import pam_segments
from vmsuper.pc.memory import ShadowWindow
from vmsuper.pc.shadow import Backing, Kind, coalesce, plan


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


# What SeaBIOS writes to PAM0-PAM6 while it boots (seen with vmsuper-pc): the f-segment and
# 0xc0000-0xcffff writable, then all of the window, then its code read-only, then the
# option-ROM area up to 0xebfff read-only.
SEABIOS_PAM = ["30333300000000", "30333333333333", "10111133333333", "10111111111131"]


def test_neighbours_of_one_kind_are_joined():
    runs = coalesce(plan(pam_segments(bytes.fromhex(SEABIOS_PAM[-1]))))
    assert [(run.start, run.end, run.kind) for run in runs] == [
        (0xC0000, 0xEC000, Kind.RAM_READ_ONLY),
        (0xEC000, 0xF0000, Kind.RAM),
        (0xF0000, 0x100000, Kind.RAM_READ_ONLY),
    ]
    assert coalesce(plan(pam_segments(bytes(7)))) == [
        Backing(0xC0000, 0x20000, Kind.NONE),
        Backing(0xE0000, 0x20000, Kind.ROM),
    ]


class FakeObject:
    def __init__(self, backing: Backing, live: list[Backing]) -> None:
        self.backing = backing
        self.live = live

    def destroy(self) -> None:
        self.live.remove(self.backing)


class FakeMemory:
    """Records the memory objects a window holds, and fails on an overlapping create."""

    def __init__(self) -> None:
        self.live: list[Backing] = []
        self.created = 0

    def map_backing(self, backing: Backing) -> FakeObject | None:
        if backing.kind is Kind.NONE:
            return None
        assert all(o.end <= backing.start or backing.end <= o.start for o in self.live)
        self.live.append(backing)
        self.created += 1
        return FakeObject(backing, self.live)


def test_the_window_recreates_only_changed_runs_and_never_overlaps():
    memory = FakeMemory()
    window = ShadowWindow(memory, rom_alias_start=0xE0000)  # type: ignore[arg-type]
    window.apply(pam_segments(bytes(7)))
    assert memory.live == [Backing(0xE0000, 0x20000, Kind.ROM)]
    for pam in SEABIOS_PAM:
        window.apply(pam_segments(bytes.fromhex(pam)))
    assert sorted(memory.live, key=lambda b: b.start) == [
        Backing(0xC0000, 0x2C000, Kind.RAM_READ_ONLY),
        Backing(0xEC000, 0x4000, Kind.RAM),
        Backing(0xF0000, 0x10000, Kind.RAM_READ_ONLY),
    ]
    assert memory.created == 1 + 3 + 1 + 3 + 2
    assert window.remaps == 1 + 4 + 4 + 4 + 4  # one object per segment: 5 + 6 + 12 + 10 + 14
    assert window.apply(pam_segments(bytes.fromhex(SEABIOS_PAM[-1]))) == 0
    assert window.remaps == 17
