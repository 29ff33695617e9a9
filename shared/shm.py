"""The shared-memory region between the supervisor and its forked VCPU workers.

One anonymous `MAP_SHARED` mapping, made before the workers are forked, so every process sees
the same pages at the same address. It holds:

- the reserved ranges and the call hint (`SharedTable` writes, `TableReader` reads), published
  under a seqlock so a worker keeps a parsed copy and pays one integer read per exit to know it
  is still current;
- one `VcpuSlot` per VCPU: the pending pause token, the run state, exit counters;
- one `Mailbox` per VCPU: the ioctl a worker asks its runner thread to make, with an argument
  area whose address the runner hands straight to the kernel;
- one statistics block per VCPU: since when the VCPU waits on the plugin, and a log2
  histogram of the plugin's response times;
- one `RangeCounts` per VCPU: the exits it forwarded per reserved range, live.

Every struct in it, and the enums the C hot path shares, are defined once in `abi.py` (which
generates the C header `vms_abi.h`); this module takes its offsets from there.

The mapping is a sealed memfd (it cannot grow or shrink), so that `vmsuper stats` can map the
same pages read-only through ``/proc/<pid>/fd/<fd>`` (`RegionView`) while the run goes on.

Memory ordering. Every field has a single writer process (the table, `pause_seq` and the pause
tokens: the supervisor; `delivered_seq`, the run state and the counters: the VCPU's worker).
The seqlocks (the table, a VCPU's range counts) are written, and the table read, by C
functions with C11 atomics and fences (`seqlock.c`), one order for every writer. The other
protocols below rely on x86-64's TSO model: a CPU's stores become visible to others in
program order, and loads are not reordered with older loads. Every 64-bit cell is 8-byte
aligned and read or written through a ``memoryview`` cast to ``Q``, which CPython does as one
8-byte ``memcpy`` (a single ``mov``), so no cell is ever seen half-written. Distinct Python
operations are separate calls into C, so the compiler cannot reorder them either. Hand-offs
through the mailbox are ordered by the doorbell's bells, whose ring and wait are sequentially
consistent atomic operations in C (`hotpath.c`).

Everything is little-endian (the host's order; checked at import).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import mmap
import os
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from types import TracebackType
from typing import Final

from vmsuper.shared import abi, hotpath
from vmsuper.shared.abi import (
    HISTOGRAM_BUCKETS,
    MAILBOX_ARG_SIZE,
    STOP_REASON_SIZE,
    ExitKind,
    RunState,
)
from vmsuper.shared.ranges import CallHint, Range, RangeError, RangeTable, RegHint, Space
from vmsuper.shared.ranges import find_range as _find_range

if sys.byteorder != "little":  # pragma: no cover - vmsuper runs on x86-64 only
    raise ImportError("vmsuper's shared-memory layout assumes a little-endian host")

MAGIC: Final = abi.MAGIC
VERSION: Final = abi.VERSION
DEFAULT_MAX_RANGES: Final = 1024
DEFAULT_MAX_HINTS: Final = 16
OP_RUN: Final = 0
"""Mailbox op meaning KVM_RUN; any other op is the ioctl request number itself."""

_U64_MASK: Final = (1 << 64) - 1
_U32_MASK: Final = (1 << 32) - 1
_CACHE_LINE: Final = abi.CACHE_LINE

_HEADER = abi.REGION_HEADER.codec(f.name for f in abi.REGION_HEADER.fields)
MEMFD_NAME: Final = "vmsuper-shm"
"""The name of the region's memfd (``/proc/<pid>/fd/<fd>`` links to ``/memfd:vmsuper-shm``)."""

# Table area (`struct vms_table`): the seqlock generation alone on a line, then the payload:
# its head, the register hints, the ranges.
_PAYLOAD_OFF: Final = abi.TABLE_PAYLOAD
_PAYLOAD_HEAD = abi.TABLE.codec(["count", "n_hints", "hint_space", "hint_flags", "hint_address"])
_REG_HINT = abi.REG_HINT.codec(["flags", "rax", "rbx", "rcx", "rdx"])
_RANGE = abi.TABLE_RANGE.codec(["space", "async_write", "start", "length"])

# Slot (`struct vms_slot`): 64-bit cells, then the stop reason text.
_SLOT_SIZE: Final = abi.SLOT.size
_C_PAUSE_SEQ: Final = abi.SLOT.cell("pause_seq")
_C_PAUSE_TOKEN: Final = abi.SLOT.cell("pause_token")  # two cells: seq s's token is at s & 1
_C_DELIVERED: Final = abi.SLOT.cell("delivered_seq")
_C_RUN_STATE: Final = abi.SLOT.cell("run_state")
_C_COUNTERS: Final = abi.SLOT.cell("counters")
_C_TRAPPED_SYSCALL: Final = abi.SLOT.cell("trapped_syscall")  # hotpath.c's SIGSYS handler
_STOP_REASON_OFF: Final = abi.SLOT.offset("stop_reason")

# Mailbox (`struct vms_mail`): op, arg_len, ret, errno; then the doorbell's two bells; the
# argument area starts on the next line.
_MAIL_HEAD = abi.MAIL.codec(["op", "length", "ret", "err"])
_MAIL_BELLS_OFF: Final = abi.MAIL.offset("request")
_BELL_SIZE: Final = abi.MAIL.offset("done") - abi.MAIL.offset("request")
_BELL_SLEEPING_OFF: Final = abi.BELL.offset("sleeping")
_MAIL_ARG_OFF: Final = abi.MAILBOX_ARG_OFFSET
_MAIL_STRIDE: Final = _MAIL_ARG_OFF + MAILBOX_ARG_SIZE

# Statistics block (`struct vms_stats`).
_STATS_STRIDE: Final = abi.round_up(abi.STATS.size, _CACHE_LINE)
_S_WAIT_SINCE: Final = abi.STATS.cell("wait_since")
_S_RESPONSES: Final = abi.STATS.cell("responses")
_S_SUM: Final = abi.STATS.cell("response_sum_ns")
_S_MAX: Final = abi.STATS.cell("response_max_ns")
_S_BUCKETS: Final = abi.STATS.cell("buckets")

# Range counts (`struct vms_range_counts`): generation and count, then max_ranges ranges
# (`struct vms_counted_range`: space, start, length), then max_ranges counters.
_RC_GEN: Final = abi.RANGE_COUNTS.cell("gen")
_RC_COUNT: Final = abi.RANGE_COUNTS.cell("count")
_RC_RANGES: Final = abi.RANGE_COUNTS.size // 8
_RC_RANGE_CELLS: Final = abi.COUNTED_RANGE.size // 8


class ShmError(Exception):
    """The region is malformed or was asked for something its layout cannot hold."""


_round_up = abi.round_up


class _Layout:
    """Offsets of every part of the region, computed once from its dimensions."""

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
        self.table = _round_up(_HEADER.size, _CACHE_LINE)
        self.hints = self.table + _PAYLOAD_OFF + _PAYLOAD_HEAD.size
        self.ranges = self.hints + max_hints * _REG_HINT.size
        table_end = self.ranges + max_ranges * _RANGE.size
        self.slots = _round_up(table_end, _CACHE_LINE)
        self.mailboxes = _round_up(self.slots + vcpus * _SLOT_SIZE, mmap.PAGESIZE)
        self.stats = self.mailboxes + vcpus * _MAIL_STRIDE
        self.range_counts = self.stats + vcpus * _STATS_STRIDE
        self.range_counts_stride = _round_up(
            abi.RANGE_COUNTS.size + max_ranges * (abi.COUNTED_RANGE.size + 8), _CACHE_LINE
        )
        self.size = self.range_counts + vcpus * self.range_counts_stride

    def header(self) -> bytes:
        return _HEADER.pack(
            MAGIC,
            VERSION,
            self.vcpus,
            self.max_ranges,
            self.max_hints,
            0,
            self.size,
            self.table,
            self.slots,
            self.mailboxes,
            self.stats,
            self.range_counts,
        )


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

    def __init__(self, region: SharedRegion) -> None:
        self._mm = region._mm
        self._q = region._q
        self._gen = region._layout.table // 8
        self._gen_address = region._base_address + region._layout.table
        self._payload_address = self._gen_address + _PAYLOAD_OFF
        self.max_ranges = region._layout.max_ranges
        self.max_hints = region._layout.max_hints
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

    def __init__(self, region: SharedRegion) -> None:
        layout = region._layout
        self._mm = region._mm
        self._q = region._q
        self._gen_idx = layout.table // 8
        self.gen_address = region._base_address + self._gen_idx * 8
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


class VcpuSlot:
    """One VCPU's pause request, run state and exit counters.

    Pause hand-off (supervisor writes `pause_seq` and the tokens, the worker `delivered_seq`):
    `request_pause` stores the token in cell `(seq + 1) & 1`, then bumps `seq`. `take_pause`
    reads `s1 = seq`, the token in cell `s1 & 1`, then `s2 = seq`, and retries if they differ.
    That cell is next overwritten by request `s1 + 2`, whose token store comes after the store
    of `seq = s1 + 1` (request order, TSO), so a reader that saw the overwrite sees `s2 != s1`.
    A later request overwrites an earlier one not yet taken; the worker always takes the latest.
    """

    def __init__(self, region: SharedRegion, index: int) -> None:
        self.index = index
        self._mm = region._mm
        self._q = region._q
        off = region._layout.slots + index * _SLOT_SIZE
        cell = off // 8
        self._seq = cell + _C_PAUSE_SEQ
        self._token = cell + _C_PAUSE_TOKEN
        self._delivered = cell + _C_DELIVERED
        self._state = cell + _C_RUN_STATE
        self._counters = cell + _C_COUNTERS
        self._trapped = cell + _C_TRAPPED_SYSCALL
        self._reason = off + _STOP_REASON_OFF
        self._lock = threading.Lock()
        self._base = region._base_address
        stats = (region._layout.stats + index * _STATS_STRIDE) // 8
        self._wait_since = stats + _S_WAIT_SINCE
        self._responses = stats + _S_RESPONSES
        self._sum = stats + _S_SUM
        self._max = stats + _S_MAX
        self._buckets = stats + _S_BUCKETS

    def cell_address(self, cell: str) -> int:
        """The address of `pause_seq`, `delivered_seq`, `run_state`, `counters` (the first
        counter; `ExitKind` indexes them), `stats` (the VCPU's `struct vms_stats`) or
        `trapped_syscall` (see `trapped_syscall`), for the C code in `hotpath`."""
        index = {
            "pause_seq": self._seq,
            "delivered_seq": self._delivered,
            "run_state": self._state,
            "counters": self._counters,
            "stats": self._wait_since - _S_WAIT_SINCE,
            "trapped_syscall": self._trapped,
        }[cell]
        return self._base + index * 8

    # Supervisor side.
    def request_pause(self, token: int) -> None:
        """Record `token` for the worker to deliver as `User{user}` (the caller kicks the VCPU)."""
        if not 0 <= token <= _U64_MASK:
            raise ValueError(f"pause token {token} is not a 64-bit unsigned value")
        q = self._q
        with self._lock:
            seq = q[self._seq]
            q[self._token + ((seq + 1) & 1)] = token
            q[self._seq] = (seq + 1) & _U64_MASK

    def pause_pending(self) -> bool:
        return self._q[self._seq] != self._q[self._delivered]

    @property
    def pause_seq(self) -> int:
        return self._q[self._seq]

    @property
    def delivered_seq(self) -> int:
        return self._q[self._delivered]

    # Worker side.
    def take_pause(self) -> int | None:
        """The latest pause token not yet taken, marking it taken; None when none is pending."""
        q = self._q
        if q[self._seq] == q[self._delivered]:
            return None
        while True:
            s1 = q[self._seq]
            token = q[self._token + (s1 & 1)]
            if q[self._seq] == s1:
                q[self._delivered] = s1
                return token

    @property
    def run_state(self) -> RunState:
        return RunState(self._q[self._state])

    @run_state.setter
    def run_state(self, state: RunState) -> None:
        self._q[self._state] = RunState(state)

    def begin_wait(self, state: RunState) -> None:
        """Enter a state that waits on the plugin (INIT, WAITING_PLUGIN, PAUSED), noting when
        (CLOCK_MONOTONIC, a vDSO call: no system call per exit)."""
        self._q[self._wait_since] = time.monotonic_ns()
        self._q[self._state] = state

    def resumed(self) -> None:
        """The plugin resumed the VCPU: enter RUNNING; a wait on an exit (WAITING_PLUGIN, not
        Init or a pause) adds its length to the response-time histogram."""
        q = self._q
        if q[self._state] == RunState.WAITING_PLUGIN:
            took = max(0, time.monotonic_ns() - q[self._wait_since])
            q[self._buckets + min(took.bit_length(), HISTOGRAM_BUCKETS - 1)] += 1
            q[self._responses] += 1
            q[self._sum] += took
            if took > q[self._max]:
                q[self._max] = took
        q[self._state] = RunState.RUNNING

    def stop(self, reason: str) -> None:
        """Record why the VCPU stopped (truncated to fit), then enter STOPPED."""
        raw = reason.encode("utf-8", "replace")[: STOP_REASON_SIZE - 1]
        raw = raw.decode("utf-8", "ignore").encode()  # never cut a character in half
        self._mm[self._reason : self._reason + STOP_REASON_SIZE] = raw.ljust(
            STOP_REASON_SIZE, b"\0"
        )
        self._q[self._state] = RunState.STOPPED

    @property
    def stop_reason(self) -> str:
        raw = self._mm[self._reason : self._reason + STOP_REASON_SIZE]
        return raw.split(b"\0", 1)[0].decode("utf-8", "replace")

    @property
    def trapped_syscall(self) -> int | None:
        """The system call the worker's seccomp filter stopped it for (`workers/confine.py`),
        if it did: the SIGSYS handler in `hotpath.c` stores the number + 1."""
        value = self._q[self._trapped]
        return value - 1 if value else None

    def count(self, kind: ExitKind) -> None:
        """Add one exit of `kind` (only the worker writes its counters)."""
        self._q[self._counters + kind] += 1

    def counters(self) -> dict[str, int]:
        q, base = self._q, self._counters
        return {kind.name.lower(): q[base + kind] for kind in ExitKind}

    def reading(self) -> VcpuReading:
        """This VCPU's state, counters and statistics as they are now."""
        return _read_stats(
            self._q, self._state, self._counters, self._wait_since, self._reason, self._mm
        )


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

    def __init__(self, region: SharedRegion, index: int) -> None:
        layout = region._layout
        self._q = region._q
        base = (layout.range_counts + index * layout.range_counts_stride) // 8
        self._gen = base + _RC_GEN
        self._gen_address = region._base_address + self._gen * 8
        self._count = base + _RC_COUNT
        self._ranges_cell = base + _RC_RANGES
        self._counts = self._ranges_cell + layout.max_ranges * _RC_RANGE_CELLS
        self._max = layout.max_ranges
        self._address = region._base_address + self._counts * 8
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


def _read_range_counts(q: memoryview, layout: _Layout, index: int) -> list[tuple[Range, int]]:
    """A consistent copy of a VCPU's `RangeCounts` (retried while its worker describes)."""
    base = (layout.range_counts + index * layout.range_counts_stride) // 8
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


class Mailbox:
    """One VCPU's ioctl request from its worker to its runner thread, and the result.

    The worker fills the argument area (`post` copies bytes in, or write into `arg_view()`),
    posts the op and rings the doorbell; the runner reads `request()`, passes `arg_address()`
    to the ioctl, stores `complete(ret, errno)` and rings back; the worker reads `result()` and
    the argument area, which the kernel may have written.
    """

    def __init__(self, region: SharedRegion, index: int) -> None:
        self.index = index
        self._mm = region._mm
        self._mv = region._mv
        self._off = region._layout.mailboxes + index * _MAIL_STRIDE
        self._arg = self._off + _MAIL_ARG_OFF
        self._address = region._base_address + self._arg
        self._bells = region._base_address + self._off + _MAIL_BELLS_OFF

    def head_address(self) -> int:
        """Where the mailbox's head (op, length, result) lies, for `hotpath`."""
        return self._bells - _MAIL_BELLS_OFF

    def bells_address(self) -> int:
        """Where the doorbell's two bells lie (request, then done), for `hotpath`."""
        return self._bells

    def bell_seq(self, which: int) -> int:
        """The current sequence number of bell 0 (request) or 1 (done)."""
        return int.from_bytes(
            self._mm[self._off + _MAIL_BELLS_OFF + which * _BELL_SIZE :][:4], "little"
        )

    def bell_sleeping(self, which: int) -> bool:
        """Whether the waiter of bell 0 (request) or 1 (done) sleeps on its eventfd now."""
        start = self._off + _MAIL_BELLS_OFF + which * _BELL_SIZE + _BELL_SLEEPING_OFF
        return self._mm[start : start + 4] != bytes(4)

    def arg_address(self) -> int:
        """The argument area's address in this process (the same in every forked worker)."""
        return self._address

    def arg_view(self) -> memoryview:
        """A writable view of the whole argument area; drop it before the region is closed."""
        return self._mv[self._arg : self._arg + MAILBOX_ARG_SIZE]

    def read_arg(self, length: int) -> bytes:
        if not 0 <= length <= MAILBOX_ARG_SIZE:
            raise ValueError(f"argument length {length} outside 0..{MAILBOX_ARG_SIZE}")
        return self._mm[self._arg : self._arg + length]

    def post(
        self,
        op: int,
        arg: bytes | bytearray | memoryview | None = None,
        *,
        length: int | None = None,
    ) -> None:
        """Ask for `op` (OP_RUN or an ioctl number). `arg` is copied into the argument area;
        without it the area is used as already filled in place, `length` bytes of it."""
        if not 0 <= op < 1 << 32:
            raise ValueError(f"mailbox op {op:#x} is not a 32-bit value")
        if arg is not None:
            if length is not None:
                raise ValueError("give either arg or length, not both")
            data = memoryview(arg).cast("B")
            length = data.nbytes
            if length > MAILBOX_ARG_SIZE:
                raise ShmError(f"ioctl argument of {length} bytes exceeds {MAILBOX_ARG_SIZE}")
            self._mm[self._arg : self._arg + length] = data
        elif length is None:
            length = 0
        elif not 0 <= length <= MAILBOX_ARG_SIZE:
            raise ShmError(f"argument length {length} outside 0..{MAILBOX_ARG_SIZE}")
        _MAIL_HEAD.pack_into(self._mm, self._off, op, length, 0, 0)

    def request(self) -> tuple[int, int]:
        """(op, argument length) of the posted request."""
        op, length, _, _ = _MAIL_HEAD.unpack_from(self._mm, self._off)
        return op, length

    def complete(self, ret: int, err: int) -> None:
        """Store the ioctl's return value and errno (0 on success)."""
        op, length, _, _ = _MAIL_HEAD.unpack_from(self._mm, self._off)
        _MAIL_HEAD.pack_into(self._mm, self._off, op, length, ret, err)

    def result(self) -> tuple[int, int]:
        """(return value, errno) stored by the runner."""
        _, _, ret, err = _MAIL_HEAD.unpack_from(self._mm, self._off)
        return ret, err


class Doorbell:
    """The hand-off of one mailbox: "request posted" (worker -> runner) and "done" (back).

    Each direction is a bell (`hotpath.c`): a sequence number and a "sleeping" flag in the
    mailbox's head, and an eventfd to sleep on. A waiter polls the number for `spin_ns`
    first, so a hand-off between two busy processes costs no wake-up; a ring writes the
    eventfd only when its waiter sleeps. Each process keeps its own last-seen numbers.
    """

    def __init__(self, mailbox: Mailbox, *, spin_ns: int = 0) -> None:
        if spin_ns < 0:
            raise ValueError(f"spin_ns must not be negative: {spin_ns}")
        self._request = os.eventfd(0, os.EFD_CLOEXEC)
        try:
            self._done = os.eventfd(0, os.EFD_CLOEXEC)
        except OSError:
            os.close(self._request)
            raise
        self.request_bell = mailbox.bells_address()
        self.done_bell = self.request_bell + _BELL_SIZE
        self.request_seen = ctypes.c_uint32(mailbox.bell_seq(0))
        self.done_seen = ctypes.c_uint32(mailbox.bell_seq(1))
        self.spin_ns = spin_ns
        self.wake_fd = -1
        """The read end of this process's `signal.set_wakeup_fd` pipe, if it has one (a VCPU
        worker): a wait then also ends for a signal that came while it polled, runs the
        handler and waits again, like an interrupted system call (PEP 475)."""
        self._closed = False

    def fds(self) -> tuple[int, int]:
        """(request fd, done fd): the eventfds the two sides sleep on."""
        return self._request, self._done

    def ring_request(self) -> None:
        hotpath.bell_ring(self.request_bell, self._request)

    def wait_request(self) -> int:
        """Block until a request is posted; the number of rings since the last wait. Raises
        InterruptedError if a signal came while it slept."""
        return self._wait(self.request_bell, self._request, self.request_seen)

    def ring_done(self) -> None:
        hotpath.bell_ring(self.done_bell, self._done)

    def wait_done(self) -> int:
        return self._wait(self.done_bell, self._done, self.done_seen)

    def _wait(self, bell: int, efd: int, seen: ctypes.c_uint32) -> int:
        before = seen.value
        while True:
            try:
                hotpath.bell_wait(bell, efd, seen, self.spin_ns, self.wake_fd)
                return (seen.value - before) & _U32_MASK
            except InterruptedError:
                if self.wake_fd < 0:
                    raise
                drain_wakeup_pipe(self.wake_fd)  # the handlers run before the next wait

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            os.close(self._request)
            os.close(self._done)

    def __enter__(self) -> Doorbell:
        return self

    def __exit__(
        self, exc: type[BaseException] | None, val: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def drain_wakeup_pipe(fd: int) -> None:
    """Empty a non-blocking `signal.set_wakeup_fd` pipe (Python already noted the signals);
    nothing for -1 (no pipe)."""
    if fd < 0:
        return
    with contextlib.suppress(BlockingIOError):
        while os.read(fd, 256):
            pass


class SharedRegion:
    """The whole region; make it with `create` before forking, use it unchanged in the child."""

    def __init__(self, mm: mmap.mmap, layout: _Layout, *, owns_mmap: bool = True) -> None:
        self._mm = mm
        self._owns_mmap = owns_mmap
        self._layout = layout
        self._mv = memoryview(mm)
        self._q = self._mv.cast("Q")
        self._cbuf: ctypes.Array[ctypes.c_char] | None = (ctypes.c_char * layout.size).from_buffer(
            mm
        )
        self._base_address = ctypes.addressof(self._cbuf)
        self.table = SharedTable(self)
        self._slots = [VcpuSlot(self, i) for i in range(layout.vcpus)]
        self._mailboxes = [Mailbox(self, i) for i in range(layout.vcpus)]
        self._closed = False
        self.fd = -1
        """The memfd behind the mapping (`create`), kept open for `vmsuper stats`; -1 if none."""

    @classmethod
    def create(
        cls,
        vcpus: int,
        *,
        max_ranges: int = DEFAULT_MAX_RANGES,
        max_hints: int = DEFAULT_MAX_HINTS,
    ) -> SharedRegion:
        layout = _Layout(vcpus, max_ranges, max_hints)
        fd = os.memfd_create(MEMFD_NAME, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(fd, layout.size)
            # A reader's mapping can never be cut short (no SIGBUS), nor the region grown.
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
            mm = mmap.mmap(fd, layout.size, flags=mmap.MAP_SHARED)
        except BaseException:
            os.close(fd)
            raise
        mm[: _HEADER.size] = layout.header()
        region = cls(mm, layout)
        region.fd = fd
        return region

    @classmethod
    def attach(cls, mm: mmap.mmap) -> SharedRegion:
        """Use a region made elsewhere (e.g. passed as a memfd), checking its header.

        `close()` then drops this object's hold on `mm` but leaves unmapping to its owner.
        """
        return cls(mm, _check_header(mm), owns_mmap=False)

    @property
    def vcpus(self) -> int:
        return self._layout.vcpus

    @property
    def size(self) -> int:
        return self._layout.size

    @property
    def mmap(self) -> mmap.mmap:
        return self._mm

    def reader(self) -> TableReader:
        return TableReader(self)

    def slot(self, index: int) -> VcpuSlot:
        return self._slots[self._check_index(index)]

    def mailbox(self, index: int) -> Mailbox:
        return self._mailboxes[self._check_index(index)]

    def range_counts(self, index: int) -> RangeCounts:
        """VCPU `index`'s live range counts (make one per worker: it keeps the worker's view)."""
        return RangeCounts(self, self._check_index(index))

    def _check_index(self, index: int) -> int:
        if not 0 <= index < self._layout.vcpus:
            raise IndexError(f"VCPU {index} outside 0..{self._layout.vcpus - 1}")
        return index

    def close(self) -> None:
        """Unmap the region in this process; views from `arg_view()` must be dropped first."""
        if self._closed:
            return
        self._cbuf = None
        self._q.release()
        self._mv.release()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if not self._owns_mmap:
            self._closed = True
            return
        try:
            self._mm.close()
        except BufferError as exc:
            raise ShmError("views into the region are still in use") from exc
        self._closed = True

    def __enter__(self) -> SharedRegion:
        return self

    def __exit__(
        self, exc: type[BaseException] | None, val: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def _check_header(mm: mmap.mmap) -> _Layout:
    if len(mm) < _HEADER.size:
        raise ShmError(f"mapping of {len(mm)} bytes is too small for a region header")
    magic, version, vcpus, max_ranges, max_hints, _, size, *offsets = _HEADER.unpack_from(mm)
    if magic != MAGIC:
        raise ShmError(f"not a vmsuper region (magic {magic:#x})")
    if version != VERSION:
        raise ShmError(f"region layout version {version}, this vmsuper speaks {VERSION}")
    try:
        layout = _Layout(vcpus, max_ranges, max_hints)
    except ValueError as exc:
        raise ShmError(f"region header is inconsistent: {exc}") from None
    expected = (
        layout.size,
        layout.table,
        layout.slots,
        layout.mailboxes,
        layout.stats,
        layout.range_counts,
    )
    if (size, *offsets) != expected:
        raise ShmError("region header's offsets do not match its dimensions")
    if len(mm) < size:
        raise ShmError(f"mapping of {len(mm)} bytes is smaller than the region ({size})")
    return layout


@dataclass(frozen=True)
class VcpuReading:
    """One reading of a VCPU's slot and statistics block (each cell read once, no lock)."""

    state: RunState | int
    """The run state; a raw int only if the cell holds no known state."""
    waiting_ns: int | None
    """How long the VCPU has waited on the plugin (INIT, WAITING_PLUGIN, PAUSED), else None."""
    exits: dict[str, int]
    """Exits by `ExitKind` name in lower case."""
    responses: int
    response_sum_ns: int
    response_max_ns: int
    buckets: tuple[int, ...]
    """`HISTOGRAM_BUCKETS` counts of plugin response times (see `HISTOGRAM_BUCKETS`)."""
    stop_reason: str


_WAITING_STATES: Final = frozenset({RunState.INIT, RunState.WAITING_PLUGIN, RunState.PAUSED})


def _read_stats(
    q: memoryview, state_cell: int, counters: int, stats: int, reason: int, mm: mmap.mmap
) -> VcpuReading:
    raw = q[state_cell]
    try:
        state: RunState | int = RunState(raw)
    except ValueError:
        state = raw
    since = q[stats]
    waiting = None
    if state in _WAITING_STATES and since:
        waiting = max(0, time.monotonic_ns() - since)
    base = stats - _S_WAIT_SINCE
    buckets = tuple(q[base + _S_BUCKETS : base + _S_BUCKETS + HISTOGRAM_BUCKETS])
    text = mm[reason : reason + STOP_REASON_SIZE].split(b"\0", 1)[0].decode("utf-8", "replace")
    return VcpuReading(
        state=state,
        waiting_ns=waiting,
        exits={kind.name.lower(): q[counters + kind] for kind in ExitKind},
        responses=q[base + _S_RESPONSES],
        response_sum_ns=q[base + _S_SUM],
        response_max_ns=q[base + _S_MAX],
        buckets=buckets,
        stop_reason=text,
    )


class RegionView:
    """A read-only mapping of another process's region, for `vmsuper stats`: it reads the
    slots and statistics blocks and never writes (the pages are mapped PROT_READ)."""

    def __init__(self, mm: mmap.mmap) -> None:
        self._mm = mm
        self._layout = _check_header(mm)
        self._q = memoryview(mm).cast("Q")

    @classmethod
    def open(cls, pid: int, fd: int) -> RegionView:
        """Map the region that process `pid` holds as `fd` (same user or root).

        Raises `ShmError` when that fd is not a vmsuper region, OSError when it cannot be
        opened (the process is gone, or belongs to someone else)."""
        path = f"/proc/{pid}/fd/{fd}"
        if not os.readlink(path).startswith(f"/memfd:{MEMFD_NAME} "):
            raise ShmError(f"{path} is not a vmsuper shared-memory region")
        handle = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            size = os.fstat(handle).st_size
            if size < _HEADER.size:
                raise ShmError(f"{path} is too small for a region ({size} bytes)")
            mm = mmap.mmap(handle, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
        finally:
            os.close(handle)
        try:
            return cls(mm)
        except BaseException:
            mm.close()
            raise

    @property
    def vcpus(self) -> int:
        return self._layout.vcpus

    def reading(self, index: int) -> VcpuReading:
        if not 0 <= index < self._layout.vcpus:
            raise IndexError(f"VCPU {index} outside 0..{self._layout.vcpus - 1}")
        slot = (self._layout.slots + index * _SLOT_SIZE) // 8
        stats = (self._layout.stats + index * _STATS_STRIDE) // 8
        return _read_stats(
            self._q,
            slot + _C_RUN_STATE,
            slot + _C_COUNTERS,
            stats + _S_WAIT_SINCE,
            (slot + _STOP_REASON_OFF // 8) * 8,
            self._mm,
        )

    def range_counts(self, index: int) -> list[tuple[Range, int]]:
        """VCPU `index`'s forwarded exits per reserved range of the table it runs with."""
        if not 0 <= index < self._layout.vcpus:
            raise IndexError(f"VCPU {index} outside 0..{self._layout.vcpus - 1}")
        return _read_range_counts(self._q, self._layout, index)

    def close(self) -> None:
        self._q.release()
        self._mm.close()

    def __enter__(self) -> RegionView:
        return self

    def __exit__(
        self, exc: type[BaseException] | None, val: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
