"""The reserved ranges and the call hint in the shared region: the main worker publishes them
(`SharedTable`), every VCPU worker reads them (`TableReader`) on every exit.

A seqlock: the generation is odd while a publish writes, so a reader keeps a parsed copy
(`TableSnapshot`) and pays one integer read per exit to know it is still current. The
publish and the copy are C functions with C11 atomics and fences (`seqlock.c`, through
`hotpath`), so the order holds whatever the CPU's memory model.
"""

from __future__ import annotations

import errno
import os
import threading
import time
from collections.abc import Iterator
from typing import Final

from vmsuper.shared import abi, hotpath
from vmsuper.shared.ranges import CallHint, Range, RangeError, RangeTable, RegHint, Space
from vmsuper.shared.ranges import find_range as _find_range
from vmsuper.shared.shm_layout import RegionMemory

# Table area (`struct vms_table`): the seqlock generation alone on a line, then the payload:
# its head, the register hints, the ranges.
_PAYLOAD_OFF: Final = abi.TABLE_PAYLOAD
_PAYLOAD_HEAD = abi.TABLE.codec(["count", "n_hints", "hint_space", "hint_flags", "hint_address"])
_REG_HINT = abi.REG_HINT.codec(["flags", "rax", "rbx", "rcx", "rdx"])
_RANGE = abi.TABLE_RANGE.codec(["space", "async_write", "start", "length"])


class TableSnapshot:
    """One published version of the ranges and hint, parsed; immutable once built."""

    __slots__ = ("_ranges", "_starts", "count", "gen", "hint")

    def __init__(self, gen: int, ranges: list[Range], hint: CallHint | None) -> None:
        self.gen = gen
        self.hint = hint
        self.count = len(ranges)
        self._ranges: dict[Space, list[Range]] = {
            space: sorted((r for r in ranges if r.space == space), key=lambda r: r.start)
            for space in Space
        }
        self._starts = {space: [r.start for r in rs] for space, rs in self._ranges.items()}

    def lookup(self, space: Space, addr: int) -> Range | None:
        return _find_range(self._starts[space], self._ranges[space], addr)

    def ranges(self, space: Space | None = None) -> Iterator[Range]:
        for sp in Space if space is None else (space,):
            yield from self._ranges[sp]

    def __len__(self) -> int:
        return self.count


class SharedTable:
    """Writer side of the ranges and hint (the supervisor's main worker)."""

    def __init__(self, memory: RegionMemory) -> None:
        self._mm = memory.mm
        self._q = memory.q
        self._gen = memory.layout.table // 8
        self._gen_address = memory.address + memory.layout.table
        self._payload_address = self._gen_address + _PAYLOAD_OFF
        self.max_ranges = memory.layout.max_ranges
        self.max_hints = memory.layout.max_hints
        self._lock = threading.Lock()

    @property
    def gen(self) -> int:
        return self._q[self._gen]

    def publish(self, table: RangeTable, hint: CallHint | None) -> int:
        """Make `table` and `hint` (None or address 0: no hint) what every worker sees next.

        Returns the new generation. Raises `RangeError` (ENOSPC / E2BIG) when the table or the
        hint holds more than the region has room for; then nothing changes.
        """
        payload = self._encode(table, hint)
        with self._lock:
            return hotpath.seq_publish(self._gen_address, self._payload_address, payload)

    def _encode(self, table: RangeTable, hint: CallHint | None) -> bytes:
        ranges = list(table.ranges())
        if len(ranges) > self.max_ranges:
            raise RangeError(
                errno.ENOSPC, f"{len(ranges)} ranges exceed the region's {self.max_ranges}"
            )
        if hint is not None and not hint.is_set:
            hint = None
        reg_hints = () if hint is None else hint.hints
        if len(reg_hints) > self.max_hints:
            raise RangeError(
                errno.E2BIG, f"{len(reg_hints)} register hints exceed the limit of {self.max_hints}"
            )
        hints_size = self.max_hints * _REG_HINT.size
        out = bytearray(_PAYLOAD_HEAD.size + hints_size + len(ranges) * _RANGE.size)
        if hint is None:
            _PAYLOAD_HEAD.pack_into(out, 0, len(ranges), 0, 0, 0, 0)
        else:
            flags = abi.HintFlag.SET | (abi.HintFlag.ON_WRITE if hint.on_write else 0)
            _PAYLOAD_HEAD.pack_into(
                out, 0, len(ranges), len(reg_hints), hint.space, flags, hint.address
            )
        off = _PAYLOAD_HEAD.size
        for rh in reg_hints:
            _REG_HINT.pack_into(out, off, _reg_hint_flags(rh), rh.rax, rh.rbx, rh.rcx, rh.rdx)
            off += _REG_HINT.size
        off = _PAYLOAD_HEAD.size + hints_size
        for r in ranges:
            _RANGE.pack_into(out, off, r.space, r.async_write, r.start, r.length)
            off += _RANGE.size
        return bytes(out)


_REG_HINT_FLAGS: Final = {
    "match_rax": abi.RegHintFlag.MATCH_RAX,
    "match_rbx": abi.RegHintFlag.MATCH_RBX,
    "match_rcx": abi.RegHintFlag.MATCH_RCX,
    "match_rdx": abi.RegHintFlag.MATCH_RDX,
    "send_sregs": abi.RegHintFlag.SEND_SREGS,
    "send_debugregs": abi.RegHintFlag.SEND_DEBUGREGS,
}


def _reg_hint_flags(rh: RegHint) -> int:
    return sum(int(flag) for name, flag in _REG_HINT_FLAGS.items() if getattr(rh, name))


def _reg_hint_from(flags: int, rax: int, rbx: int, rcx: int, rdx: int) -> RegHint:
    named = {name: bool(flags & flag) for name, flag in _REG_HINT_FLAGS.items()}
    return RegHint(rax=rax, rbx=rbx, rcx=rcx, rdx=rdx, **named)


class TableReader:
    """Reader side of the ranges and hint (a VCPU worker): a cached snapshot, checked per use.

    `lookup`, `hint` and `snapshot()` first compare the shared generation with the cached one
    (one 8-byte read); only a change costs a copy and a parse. For a consistent pair of range
    and hint on one exit, take `snapshot()` once and ask it both.
    """

    # Spins before yielding the CPU while the writer is mid-publish, then sleep between tries.
    _SPINS = 100
    _YIELDS = 100
    _SLEEP = 50e-6

    def __init__(self, memory: RegionMemory) -> None:
        layout = memory.layout
        self._mm = memory.mm
        self._q = memory.q
        self._gen_idx = layout.table // 8
        self.gen_address = memory.address + self._gen_idx * 8
        """Where the generation lies, for the C loop in `hotpath`."""
        self._payload = layout.table + _PAYLOAD_OFF
        self._payload_address = self.gen_address + _PAYLOAD_OFF
        self._hints_len = layout.max_hints * _REG_HINT.size
        self._copy = bytearray(
            _PAYLOAD_HEAD.size + self._hints_len + layout.max_ranges * _RANGE.size
        )
        self._max_ranges = layout.max_ranges
        self._max_hints = layout.max_hints
        self._snap = TableSnapshot(0, [], None)
        self._gen = -1  # nothing read yet
        self.retries = 0
        """How many copies were thrown away because a publish overlapped them."""
        self.refresh()

    def refresh(self) -> bool:
        """Re-read the table if a newer one was published; True when the snapshot changed."""
        if self._q[self._gen_idx] == self._gen:
            return False
        return self._reload()

    def snapshot(self) -> TableSnapshot:
        if self._q[self._gen_idx] != self._gen:
            self._reload()
        return self._snap

    def lookup(self, space: Space, addr: int) -> Range | None:
        if self._q[self._gen_idx] != self._gen:
            self._reload()
        return self._snap.lookup(space, addr)

    @property
    def hint(self) -> CallHint | None:
        if self._q[self._gen_idx] != self._gen:
            self._reload()
        return self._snap.hint

    def gen_changed(self, known: int) -> bool:
        """Whether the shared generation differs from `known` (one 8-byte read)."""
        return bool(self._q[self._gen_idx] != known)

    @property
    def gen(self) -> int:
        """The generation of the cached snapshot."""
        return self._snap.gen

    def _reload(self) -> bool:
        q, gi, copy = self._q, self._gen_idx, self._copy
        waits = 0
        while True:
            if q[gi] == self._gen:
                return False
            gen = hotpath.seq_read(self.gen_address, self._payload_address, copy)
            if gen is not None:
                break
            now = q[gi]
            if now & 1:
                if now - 1 == self._gen:
                    # A publish is under way, and the cached copy is the last one completed:
                    # still the current truth until that publish returns.
                    return False
                waits += 1
                self._wait(waits)
            else:
                self.retries += 1
        if gen == self._gen:
            return False
        head = bytes(copy[: _PAYLOAD_HEAD.size])
        self._snap = self._parse(gen, head, bytes(copy[_PAYLOAD_HEAD.size :]))
        self._gen = gen
        return True

    def _wait(self, waits: int) -> None:
        if waits < self._SPINS:
            return
        if waits < self._SPINS + self._YIELDS:
            os.sched_yield()
        else:
            time.sleep(self._SLEEP)

    def _parse(self, gen: int, head: bytes, body: bytes) -> TableSnapshot:
        count, n_hints, hint_space, flags, address = _PAYLOAD_HEAD.unpack(head)
        count = min(count, self._max_ranges)
        hint = None
        if flags & abi.HintFlag.SET:
            n_hints = min(n_hints, self._max_hints)
            reg_hints = tuple(
                _reg_hint_from(*fields)
                for fields in _REG_HINT.iter_unpack(body[: n_hints * _REG_HINT.size])
            )
            hint = CallHint(
                Space(hint_space), address, bool(flags & abi.HintFlag.ON_WRITE), reg_hints
            )
        rbytes = body[self._hints_len : self._hints_len + count * _RANGE.size]
        ranges = [
            Range(Space(space), start, length, bool(async_write))
            for space, async_write, start, length in _RANGE.iter_unpack(rbytes)
        ]
        return TableSnapshot(gen, ranges, hint)
