"""One VCPU's reserved ranges as its exit engine looks them up, with the forwarded exits per
range, live in the shared region for `vmsuper stats`: its worker writes them (`RangeCounts`)
under a seqlock of its own, anyone reads them (`read_range_counts`).
"""

from __future__ import annotations

import os
from typing import Final

from vmsuper.shared import abi, hotpath
from vmsuper.shared.ranges import Range, Space
from vmsuper.shared.shm_layout import Layout, RegionMemory, ShmError

# Range counts (`struct vms_range_counts`): generation and count, then max_ranges ranges
# (`struct vms_counted_range`: space, start, length, async_write), then max_ranges counters.
_RC_GEN: Final = abi.RANGE_COUNTS.cell("gen")
_RC_COUNT: Final = abi.RANGE_COUNTS.cell("count")
_RC_SOURCE: Final = tuple(
    abi.RANGE_COUNTS.cell(name)
    for name in ("table_gen", "hint_set", "hint_space", "hint_address", "hint_on_write")
)
_NO_TABLE: Final = (1 << 64) - 1  # odd: never a published generation
_RC_RANGES: Final = abi.RANGE_COUNTS.size // 8
_RC_RANGE_CELLS: Final = abi.COUNTED_RANGE.size // 8


def _range_key(rng: Range) -> int:
    return rng.start | rng.space << 64


class RangeCounts:
    """One VCPU's reserved ranges and forwarded exits per range, kept live for `vmsuper stats`.

    Only the VCPU's worker writes it. `describe` lays out the ranges of the table the worker
    uses (under a seqlock: generation odd while it writes), carrying each range's count over
    by (space, start). The exit engine looks accesses up in these very ranges
    (`ranges_address`: the worker's one copy of the table) and adds one to a range's counter
    for each exit it forwards (`counts_address`): these cells are the counts' one home, which
    the worker's exit-count record reads (`counts`).
    """

    def __init__(self, memory: RegionMemory, index: int) -> None:
        layout = memory.layout
        self._q = memory.q
        base = layout.range_counts(index) // 8
        self._gen = base + _RC_GEN
        self._gen_address = memory.address + self._gen * 8
        self._count = base + _RC_COUNT
        self._base = base
        self._head_address = memory.address + base * 8
        self._ranges_cell = base + _RC_RANGES
        self._counts = self._ranges_cell + layout.max_ranges * _RC_RANGE_CELLS
        self._max = layout.max_ranges
        self._address = memory.address + self._counts * 8
        self._ranges_address = memory.address + self._ranges_cell * 8
        self._ranges: list[Range] = []

    @property
    def max_ranges(self) -> int:
        """How many ranges the block holds."""
        return self._max

    def counts_address(self) -> int:
        """Where the counters lie (one u64 per described range, in order), for the C loop."""
        return self._address

    def ranges_address(self) -> int:
        """Where the described ranges lie (`struct vms_counted_range`, in order), for the C
        loop's lookup."""
        return self._ranges_address

    def head_address(self) -> int:
        """Where `struct vms_range_counts` lies: the runner reads which table and call hint
        the ranges come from there."""
        return self._head_address

    def describe(
        self,
        ranges: list[Range],
        *,
        table_gen: int = _NO_TABLE,
        hint: tuple[int, int, int] | None = None,
    ) -> None:
        """Count exits of `ranges` (in this order) from now on; at most max_ranges of them.

        `table_gen` is the generation of the table they come from and `hint` its call hint
        (space, address, on_write), or None: with them the runner serves exits itself (the
        default, an odd generation, matches no table)."""
        q = self._q
        ranges = ranges[: self._max]
        old = {_range_key(r): q[self._counts + i] for i, r in enumerate(self._ranges)}
        hotpath.seq_begin(self._gen_address)
        try:
            for i, rng in enumerate(ranges):
                cell = self._ranges_cell + _RC_RANGE_CELLS * i
                q[cell] = rng.space
                q[cell + 1] = rng.start
                q[cell + 2] = rng.length
                q[cell + 3] = int(rng.async_write)
                q[self._counts + i] = old.get(_range_key(rng), 0)
            q[self._count] = len(ranges)
            source = (table_gen, 1, *hint) if hint is not None else (table_gen, 0, 0, 0, 0)
            for cell, value in zip(_RC_SOURCE, source, strict=True):
                q[self._base + cell] = value
        finally:
            hotpath.seq_end(self._gen_address)
        self._ranges = ranges

    @property
    def ranges(self) -> list[Range]:
        return list(self._ranges)

    def counts(self) -> list[tuple[Range, int]]:
        """Each described range with its count (the worker's own view: no seqlock needed)."""
        q = self._q
        return [(rng, q[self._counts + i]) for i, rng in enumerate(self._ranges)]


def read_range_counts(q: memoryview, layout: Layout, index: int) -> list[tuple[Range, int]]:
    """A consistent copy of a VCPU's `RangeCounts` (retried while its worker describes)."""
    base = layout.range_counts(index) // 8
    ranges_cell = base + _RC_RANGES
    counts_cell = ranges_cell + layout.max_ranges * _RC_RANGE_CELLS
    for _ in range(1000):
        gen = q[base + _RC_GEN]
        if gen & 1:
            os.sched_yield()
            continue
        count = min(q[base + _RC_COUNT], layout.max_ranges)
        cells = q[ranges_cell : ranges_cell + _RC_RANGE_CELLS * count].tolist()
        counts = q[counts_cell : counts_cell + count].tolist()
        if q[base + _RC_GEN] == gen:
            found = []
            for i in range(count):
                space, start, length, async_write = cells[4 * i : 4 * i + 4]
                try:
                    rng = Range(Space(space), start, length, bool(async_write))
                    found.append((rng, counts[i]))
                except ValueError:
                    continue
            return found
    raise ShmError(f"VCPU {index}'s range counts kept changing while read")
