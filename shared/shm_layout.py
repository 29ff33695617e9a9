"""The shared region's layout: where each part lies, from the region's dimensions and the
structs of `abi.py`, and the header that records it.

The region is a sequence of page-aligned blocks: the header and the table first, then one
block per VCPU holding its mailbox, slot, statistics block and range counts, so a VCPU's
worker can keep only its own block and the table mapped (`SharedRegion.confine_to`).
"""

from __future__ import annotations

import mmap
from typing import Final, NamedTuple

from vmsuper.shared import abi
from vmsuper.shared.abi import (
    MAILBOX_ARG_SIZE,
)

MAGIC: Final = abi.MAGIC
VERSION: Final = abi.VERSION
DEFAULT_MAX_RANGES: Final = 1024
DEFAULT_MAX_HINTS: Final = 16
_CACHE_LINE: Final = abi.CACHE_LINE

HEADER: Final = abi.REGION_HEADER.codec(f.name for f in abi.REGION_HEADER.fields)
"""`struct vms_region_header`, every field."""
MEMFD_NAME: Final = "vmsuper-shm"
"""The name of the region's memfd (``/proc/<pid>/fd/<fd>`` links to ``/memfd:vmsuper-shm``)."""


class ShmError(Exception):
    """The region is malformed or was asked for something its layout cannot hold."""


_round_up = abi.round_up


class Layout:
    """Offsets of every part of the region, computed once from its dimensions.

    Page-aligned blocks: the header and the table first, then one block per VCPU holding its
    mailbox, slot, statistics block and range counts, so that a VCPU's worker can keep its
    own block and the table mapped and nothing else (`SharedRegion.confine_to`).
    """

    def __init__(self, vcpus: int, max_ranges: int, max_hints: int) -> None:
        if vcpus <= 0:
            raise ValueError(f"a region needs at least one VCPU, got {vcpus}")
        if not 0 <= max_ranges < 1 << 32:
            raise ValueError(f"max_ranges out of range: {max_ranges}")
        if not 0 <= max_hints < 1 << 16:
            raise ValueError(f"max_hints out of range: {max_hints}")
        self.vcpus = vcpus
        self.max_ranges = max_ranges
        self.max_hints = max_hints
        self.table = _round_up(HEADER.size, _CACHE_LINE)
        self.hints = self.table + abi.TABLE.size
        self.ranges = self.hints + max_hints * abi.REG_HINT.size
        table_end = self.ranges + max_ranges * abi.TABLE_RANGE.size
        self.blocks = _round_up(table_end, mmap.PAGESIZE)
        # Offsets in a VCPU's block.
        self.mailbox_offset = 0
        self.slot_offset = _round_up(abi.MAILBOX_ARG_OFFSET + MAILBOX_ARG_SIZE, _CACHE_LINE)
        self.stats_offset = _round_up(self.slot_offset + abi.SLOT.size, _CACHE_LINE)
        self.range_counts_offset = _round_up(self.stats_offset + abi.STATS.size, _CACHE_LINE)
        counts_size = abi.RANGE_COUNTS.size + max_ranges * (abi.COUNTED_RANGE.size + 8)
        self.block_size = _round_up(self.range_counts_offset + counts_size, mmap.PAGESIZE)
        self.size = self.blocks + vcpus * self.block_size

    def block(self, index: int) -> int:
        """Where VCPU `index`'s block starts."""
        return self.blocks + index * self.block_size

    def mailbox(self, index: int) -> int:
        return self.block(index) + self.mailbox_offset

    def slot(self, index: int) -> int:
        return self.block(index) + self.slot_offset

    def stats(self, index: int) -> int:
        return self.block(index) + self.stats_offset

    def range_counts(self, index: int) -> int:
        return self.block(index) + self.range_counts_offset

    def header_fields(self) -> tuple[int, ...]:
        """`struct vms_region_header`, field by field."""
        return (
            MAGIC,
            VERSION,
            self.vcpus,
            self.max_ranges,
            self.max_hints,
            0,
            self.size,
            self.table,
            self.blocks,
            self.block_size,
            self.mailbox_offset,
            self.slot_offset,
            self.stats_offset,
            self.range_counts_offset,
        )

    def header(self) -> bytes:
        return HEADER.pack(*self.header_fields())


def check_header(mm: mmap.mmap) -> Layout:
    """The layout a region's header records, checked against its dimensions and `mm`."""
    if len(mm) < HEADER.size:
        raise ShmError(f"mapping of {len(mm)} bytes is too small for a region header")
    fields = HEADER.unpack_from(mm)
    magic, version, vcpus, max_ranges, max_hints, _, size = fields[:7]
    if magic != MAGIC:
        raise ShmError(f"not a vmsuper region (magic {magic:#x})")
    if version != VERSION:
        raise ShmError(f"region layout version {version}, this vmsuper speaks {VERSION}")
    try:
        layout = Layout(vcpus, max_ranges, max_hints)
    except ValueError as exc:
        raise ShmError(f"region header is inconsistent: {exc}") from None
    if fields != layout.header_fields():
        raise ShmError("region header's offsets do not match its dimensions")
    if len(mm) < size:
        raise ShmError(f"mapping of {len(mm)} bytes is smaller than the region ({size})")
    return layout


class RegionMemory(NamedTuple):
    """A mapped region as its parts use it: the mapping, views of it, where it lies in this
    process, and its layout."""

    mm: mmap.mmap
    mv: memoryview
    q: memoryview
    """The whole region as 64-bit cells."""
    address: int
    layout: Layout
