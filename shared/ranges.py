"""Reserved I/O port / MMIO ranges and the call hint, as plain values (no I/O).

The main worker owns one `RangeTable` and edits it on `ReserveRange`; the VCPU workers only ever
see published snapshots of it (see `vmsuper.shared.shm_table`). The reservation rules are crosvm's,
errno for errno, because existing plugins test for them.
"""

from __future__ import annotations

import errno
from bisect import bisect_right
from collections.abc import Iterator, Sequence
from typing import Final

from vmsuper.shared.abi import Space
from vmsuper.shared.records import Record

__all__ = [
    "U64_LIMIT",
    "CallHint",
    "Range",
    "RangeError",
    "RangeTable",
    "RegHint",
    "Space",
    "find_range",
]

U64_LIMIT = 1 << 64
"""One past the largest 64-bit address or register value."""


class RangeError(OSError):
    """A reservation or hint the rules refuse; `.errno` is what the plugin gets on the wire."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(code, message)


def _check_u64(name: str, value: int) -> None:
    if not 0 <= value < U64_LIMIT:
        raise RangeError(errno.EINVAL, f"{name} {value:#x} is not a 64-bit unsigned value")


def _check_space(space: int) -> Space:
    try:
        return Space(space)
    except ValueError:
        raise RangeError(errno.EINVAL, f"unknown address space {space}") from None


class Range(Record):
    """`[start, start + length)` in `space`; `async_write`: writes there need no reply.

    Immutable, as are the hints below: `Record`s, not frozen dataclasses (shared/records.py).
    """

    __slots__ = __match_args__ = ("space", "start", "length", "async_write")
    space: Final[Space]
    start: Final[int]
    length: Final[int]
    async_write: Final[bool]

    def __init__(self, space: Space, start: int, length: int, async_write: bool = False) -> None:
        self.space = space
        self.start = start
        self.length = length
        self.async_write = async_write

    @property
    def end(self) -> int:
        """The first address past the range."""
        return self.start + self.length

    def contains(self, addr: int) -> bool:
        return self.start <= addr < self.start + self.length


def find_range(starts: Sequence[int], ranges: Sequence[Range], addr: int) -> Range | None:
    """The range holding `addr`, given disjoint `ranges` sorted by start and their `starts`.

    Shared by the mutable table and the workers' snapshots, so both answer the same way.
    """
    i = bisect_right(starts, addr) - 1
    if i >= 0:
        found = ranges[i]
        if addr - found.start < found.length:
            return found
    return None


class RangeTable:
    """The reserved ranges of both address spaces, kept sorted by start for O(log n) lookups."""

    def __init__(self, max_ranges: int | None = None) -> None:
        if max_ranges is not None and max_ranges < 0:
            raise ValueError(f"max_ranges must not be negative, got {max_ranges}")
        self.max_ranges = max_ranges
        self._starts: dict[Space, list[int]] = {space: [] for space in Space}
        self._ranges: dict[Space, list[Range]] = {space: [] for space in Space}
        self._count = 0

    def reserve(self, space: int, start: int, length: int, async_write: bool = False) -> None:
        """Claim `[start, start + length)`, or with `length` 0 release the range at `start`.

        Errors, in crosvm's order: release of a start that begins no range -> ENOENT; `start`
        inside a reserved range -> EPERM; `start + length` not below 2**64 -> EINVAL; any other
        overlap -> EPERM; the table full -> ENOSPC. Malformed numbers -> EINVAL.
        """
        space = _check_space(space)
        _check_u64("start", start)
        _check_u64("length", length)
        starts = self._starts[space]
        ranges = self._ranges[space]
        if length == 0:
            self._release(space, start)
            return
        held = find_range(starts, ranges, start)
        if held is not None:
            raise RangeError(
                errno.EPERM,
                f"{space.name} {start:#x} lies in the reserved {held.start:#x}+{held.length:#x}",
            )
        if start + length >= U64_LIMIT:
            raise RangeError(
                errno.EINVAL, f"{space.name} range {start:#x}+{length:#x} overflows 64 bits"
            )
        i = bisect_right(starts, start)
        if i < len(starts) and starts[i] < start + length:
            raise RangeError(
                errno.EPERM,
                f"{space.name} range {start:#x}+{length:#x} overlaps the one at {starts[i]:#x}",
            )
        if self.max_ranges is not None and self._count >= self.max_ranges:
            raise RangeError(errno.ENOSPC, f"no room for more than {self.max_ranges} ranges")
        starts.insert(i, start)
        ranges.insert(i, Range(space, start, length, bool(async_write)))
        self._count += 1

    def _release(self, space: Space, start: int) -> None:
        starts = self._starts[space]
        i = bisect_right(starts, start) - 1
        if i < 0 or starts[i] != start:
            raise RangeError(errno.ENOENT, f"no {space.name} range starts at {start:#x}")
        del starts[i]
        del self._ranges[space][i]
        self._count -= 1

    def lookup(self, space: Space, addr: int) -> Range | None:
        """The reserved range of `space` that holds `addr`, if any."""
        return find_range(self._starts[space], self._ranges[space], addr)

    def ranges(self, space: Space | None = None) -> Iterator[Range]:
        """Every range (of one space, or IOPORT then MMIO), in order of start."""
        for sp in Space if space is None else (space,):
            yield from self._ranges[sp]

    def __len__(self) -> int:
        return self._count


class RegHint(Record):
    """Which extra state to send with a hinted exit, chosen by the values of rax..rdx."""

    __slots__ = __match_args__ = (
        "match_rax",
        "match_rbx",
        "match_rcx",
        "match_rdx",
        "rax",
        "rbx",
        "rcx",
        "rdx",
        "send_sregs",
        "send_debugregs",
    )
    match_rax: Final[bool]
    match_rbx: Final[bool]
    match_rcx: Final[bool]
    match_rdx: Final[bool]
    rax: Final[int]
    rbx: Final[int]
    rcx: Final[int]
    rdx: Final[int]
    send_sregs: Final[bool]
    send_debugregs: Final[bool]

    def __init__(
        self,
        match_rax: bool = False,
        match_rbx: bool = False,
        match_rcx: bool = False,
        match_rdx: bool = False,
        rax: int = 0,
        rbx: int = 0,
        rcx: int = 0,
        rdx: int = 0,
        send_sregs: bool = False,
        send_debugregs: bool = False,
    ) -> None:
        self.match_rax = match_rax
        self.match_rbx = match_rbx
        self.match_rcx = match_rcx
        self.match_rdx = match_rdx
        self.rax = rax
        self.rbx = rbx
        self.rcx = rcx
        self.rdx = rdx
        self.send_sregs = send_sregs
        self.send_debugregs = send_debugregs
        for name in ("rax", "rbx", "rcx", "rdx"):
            _check_u64(name, getattr(self, name))

    def applies(self, rax: int, rbx: int, rcx: int, rdx: int) -> bool:
        """True when every register this entry matches on has its value."""
        return (
            (not self.match_rax or self.rax == rax)
            and (not self.match_rbx or self.rbx == rbx)
            and (not self.match_rcx or self.rcx == rcx)
            and (not self.match_rdx or self.rdx == rdx)
        )


class CallHint(Record):
    """The plugin's hint that an I/O exit at one address wants the registers sent eagerly.

    `address` 0 means "no hint" (that is how `SetCallHint` clears it): such a hint matches
    nothing.
    """

    __slots__ = __match_args__ = ("space", "address", "on_write", "hints")
    space: Final[Space]
    address: Final[int]
    on_write: Final[bool]
    hints: Final[tuple[RegHint, ...]]

    def __init__(
        self, space: Space, address: int, on_write: bool, hints: tuple[RegHint, ...] = ()
    ) -> None:
        self.space = _check_space(space)
        self.address = address
        self.on_write = on_write
        self.hints = tuple(hints)
        _check_u64("address", address)

    @property
    def is_set(self) -> bool:
        return self.address != 0

    def matches(self, space: Space, address: int, is_write: bool) -> bool:
        """Whether an exit at (`space`, `address`) in direction `is_write` gets the registers."""
        return (
            self.address != 0
            and address == self.address
            and space == self.space
            and is_write == self.on_write
        )

    def extra_state(self, rax: int, rbx: int, rcx: int, rdx: int) -> tuple[bool, bool]:
        """(send_sregs, send_debugregs) from the first `RegHint` that applies, else neither."""
        for hint in self.hints:
            if hint.applies(rax, rbx, rcx, rdx):
                return hint.send_sregs, hint.send_debugregs
        return False, False
