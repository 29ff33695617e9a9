"""What the legacy window 0xc0000-0xfffff shows, segment by segment, from the PAM attributes.

Pure planning: `plan` turns the host bridge's PAM segments into `Backing`s, `coalesce` joins
neighbours of one kind (so that the window takes a few memory slots, not 13, and a PAM write
re-creates few), and the machine (`memory.ShadowWindow`) makes the memory slots. The rules,
as QEMU applies them on i440FX:

- read and write enabled: the RAM behind the segment, writable;
- read enabled only: that RAM, read-only (writes are dropped: the BIOS is write-protected);
- read disabled: reads go to the ROM side: the last 128 KiB of the firmware image for
  0xe0000-0xfffff (as at power-on), nothing (reads of zeros) below 0xe0000. Writes there are
  dropped, also in the write-only mode (writes to RAM, reads from ROM) that a BIOS does not use.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from vmsuper.devices.chipset import PAM_READ, PAM_WRITE, PamSegment

WINDOW_START = 0xC0000
WINDOW_END = 0x100000
ROM_ALIAS_START = 0xE0000  # where the firmware's last 128 KiB appears below 1 MiB


class Kind(enum.Enum):
    RAM = "ram"
    RAM_READ_ONLY = "ram-ro"
    ROM = "rom"
    NONE = "none"


@dataclass(frozen=True, slots=True)
class Backing:
    start: int
    length: int
    kind: Kind

    @property
    def end(self) -> int:
        return self.start + self.length


def plan(segments: list[PamSegment], *, rom_alias_start: int = ROM_ALIAS_START) -> list[Backing]:
    """The backing of every PAM segment; `rom_alias_start` is where the firmware alias begins
    (0xe0000 for a 128 KiB or larger image, 0xf0000 for a 64 KiB one)."""
    backings = []
    for segment in segments:
        if segment.attributes & PAM_READ:
            kind = Kind.RAM if segment.attributes & PAM_WRITE else Kind.RAM_READ_ONLY
        elif segment.start >= rom_alias_start:
            kind = Kind.ROM
        else:
            kind = Kind.NONE
        backings.append(Backing(segment.start, segment.length, kind))
    return backings


def coalesce(backings: list[Backing]) -> list[Backing]:
    """`backings` (in address order) with adjacent ones of the same kind joined; RAM and the
    firmware alias are contiguous in their files, so a joined range is one memory object."""
    joined: list[Backing] = []
    for backing in backings:
        last = joined[-1] if joined else None
        if last is not None and last.kind is backing.kind and last.end == backing.start:
            joined[-1] = Backing(last.start, last.length + backing.length, last.kind)
        else:
            joined.append(backing)
    return joined
