"""One VCPU's forwarded exits per reserved range, live in the shared region for `vmsuper
stats`: its worker writes them (`RangeCounts`) under a seqlock of its own, anyone reads them
(`read_range_counts`).
"""

from __future__ import annotations

import os
from typing import Final

from vmsuper.shared import abi, hotpath
from vmsuper.shared.ranges import Range, Space
from vmsuper.shared.shm_layout import Layout, RegionMemory, ShmError

# Range counts (`struct vms_range_counts`): generation and count, then max_ranges ranges
# (`struct vms_counted_range`: space, start, length), then max_ranges counters.
_RC_GEN: Final = abi.RANGE_COUNTS.cell("gen")
_RC_COUNT: Final = abi.RANGE_COUNTS.cell("count")
_RC_RANGES: Final = abi.RANGE_COUNTS.size // 8
_RC_RANGE_CELLS: Final = abi.COUNTED_RANGE.size // 8


def _range_key(rng: Range) -> int:
    return rng.start | rng.space << 64


class RangeCounts:
    """One VCPU's forwarded exits per reserved range, kept live for `vmsuper stats`.

    Only the VCPU's worker writes it. `describe` lays out the ranges of the table the worker
    uses (under a seqlock: generation odd while it writes), carrying each range's count over
    by (space, start); then each forwarded exit adds one to its range's counter: the C exit
    loop through `counts_address`, Python through `add`. The worker's exit-count record is
    fed by `take_c_counts`, which returns what the C loop added since the last call.
    """

    def __init__(self, memory: RegionMemory, index: int) -> None:
        layout = memory.layout
        self._q = memory.q
        base = layout.range_counts(index) // 8
        self._gen = base + _RC_GEN
        self._gen_address = memory.address + self._gen * 8
        self._count = base + _RC_COUNT
        self._ranges_cell = base + _RC_RANGES
        self._counts = self._ranges_cell + layout.max_ranges * _RC_RANGE_CELLS
        self._max = layout.max_ranges
        self._address = memory.address + self._counts * 8
        self._ranges: list[Range] = []
        self._index: dict[int, int] = {}
        self._collected: list[int] = []

    def counts_address(self) -> int:
        """Where the counters lie (one u64 per described range, in order), for the C loop."""
        return self._address

    def describe(self, ranges: list[Range]) -> None:
        """Count exits of `ranges` (in this order) from now on; at most max_ranges of them."""
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
                q[self._counts + i] = old.get(_range_key(rng), 0)
            q[self._count] = len(ranges)
        finally:
            hotpath.seq_end(self._gen_address)
        self._ranges = ranges
        self._index = {_range_key(r): i for i, r in enumerate(ranges)}
        self._collected = [q[self._counts + i] for i in range(len(ranges))]

    @property
    def ranges(self) -> list[Range]:
        return list(self._ranges)

    def add(self, rng: Range) -> None:
        """One exit of `rng` forwarded by Python (not a described range: not counted here)."""
        i = self._index.get(_range_key(rng))
        if i is not None:
            self._q[self._counts + i] += 1
            self._collected[i] += 1

    def take_c_counts(self) -> list[tuple[Range, int]]:
        """The exits the C loop counted per range since the last call (or `describe`)."""
        q, taken = self._q, []
        for i, rng in enumerate(self._ranges):
            now = q[self._counts + i]
            if now != self._collected[i]:
                taken.append((rng, now - self._collected[i]))
                self._collected[i] = now
        return taken


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
                space, start, length = cells[3 * i : 3 * i + 3]
                try:
                    found.append((Range(Space(space), start, length, False), counts[i]))
                except ValueError:
                    continue
            return found
    raise ShmError(f"VCPU {index}'s range counts kept changing while read")
