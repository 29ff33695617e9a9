"""One VCPU's slot and statistics block in the shared region: the pause hand-off between the
supervisor and the VCPU's worker, the run state, the exit counters, why it stopped, and the
plugin's response times (`VcpuSlot`); `read_vcpu` reads them all, also for `vmsuper stats`.

Each cell has one writer process and is read or written as one aligned 8-byte ``memcpy``;
the pause hand-off relies on x86-64's store order (see `VcpuSlot`).
"""

from __future__ import annotations

import mmap
import threading
import time
from typing import Final, NamedTuple

from vmsuper.shared import abi
from vmsuper.shared.abi import (
    HISTOGRAM_BUCKETS,
    STOP_REASON_SIZE,
    ExitKind,
    RunState,
)
from vmsuper.shared.shm_layout import Layout, RegionMemory
from vmsuper.shared.shm_mailbox import read_poll_ns

_U64_MASK: Final = (1 << 64) - 1


# Slot (`struct vms_slot`): 64-bit cells, then the stop reason text.
_SLOT_SIZE: Final = abi.SLOT.size
_C_PAUSE_SEQ: Final = abi.SLOT.cell("pause_seq")
_C_PAUSE_TOKEN: Final = abi.SLOT.cell("pause_token")  # two cells: seq s's token is at s & 1
_C_DELIVERED: Final = abi.SLOT.cell("delivered_seq")
_C_RUN_STATE: Final = abi.SLOT.cell("run_state")
_C_COUNTERS: Final = abi.SLOT.cell("counters")
_C_TRAPPED_SYSCALL: Final = abi.SLOT.cell("trapped_syscall")  # hotpath.c's SIGSYS handler
_C_RUNNER_SERVED: Final = abi.SLOT.cell("runner_served")  # written by the runner's C loop
_STOP_REASON_OFF: Final = abi.SLOT.offset("stop_reason")

# Statistics block (`struct vms_stats`).
_S_WAIT_SINCE: Final = abi.STATS.cell("wait_since")
_S_RESPONSES: Final = abi.STATS.cell("responses")
_S_SUM: Final = abi.STATS.cell("response_sum_ns")
_S_MAX: Final = abi.STATS.cell("response_max_ns")
_S_BUCKETS: Final = abi.STATS.cell("buckets")


class VcpuSlot:
    """One VCPU's pause request, run state and exit counters.

    Pause hand-off (supervisor writes `pause_seq` and the tokens, the worker `delivered_seq`):
    `request_pause` stores the token in cell `(seq + 1) & 1`, then bumps `seq`. `take_pause`
    reads `s1 = seq`, the token in cell `s1 & 1`, then `s2 = seq`, and retries if they differ.
    That cell is next overwritten by request `s1 + 2`, whose token store comes after the store
    of `seq = s1 + 1` (request order, TSO), so a reader that saw the overwrite sees `s2 != s1`.
    A later request overwrites an earlier one not yet taken; the worker always takes the latest.
    """

    def __init__(self, memory: RegionMemory, index: int) -> None:
        self.index = index
        self._mm = memory.mm
        self._q = memory.q
        off = memory.layout.slot(index)
        cell = off // 8
        self._seq = cell + _C_PAUSE_SEQ
        self._token = cell + _C_PAUSE_TOKEN
        self._delivered = cell + _C_DELIVERED
        self._state = cell + _C_RUN_STATE
        self._counters = cell + _C_COUNTERS
        self._trapped = cell + _C_TRAPPED_SYSCALL
        self._runner_served = cell + _C_RUNNER_SERVED
        self._reason = off + _STOP_REASON_OFF
        self._layout = memory.layout
        self._lock = threading.Lock()
        self._base = memory.address
        stats = memory.layout.stats(index) // 8
        self._wait_since = stats + _S_WAIT_SINCE
        self._responses = stats + _S_RESPONSES
        self._sum = stats + _S_SUM
        self._max = stats + _S_MAX
        self._buckets = stats + _S_BUCKETS

    def cell_address(self, cell: str) -> int:
        """The address of `pause_seq`, `delivered_seq`, `run_state`, `counters` (the first
        counter; `ExitKind` indexes them), `stats` (the VCPU's `struct vms_stats`),
        `trapped_syscall` (see `trapped_syscall`) or `runner_served`, for the C code in
        `hotpath`."""
        index = {
            "pause_seq": self._seq,
            "delivered_seq": self._delivered,
            "run_state": self._state,
            "counters": self._counters,
            "stats": self._wait_since - _S_WAIT_SINCE,
            "trapped_syscall": self._trapped,
            "runner_served": self._runner_served,
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

    def exits(self) -> int:
        """Exits of every kind so far (the polling gate's measure of how busy the VCPU is)."""
        return sum(self._q[self._counters : self._counters + len(ExitKind)])

    @property
    def runner_served(self) -> int:
        """Exits the VCPU's runner served without waking its worker (counted in `counters`
        too): unreserved accesses, async writes, and accesses whose Wait it sent itself."""
        return self._q[self._runner_served]

    def reading(self) -> VcpuReading:
        """This VCPU's state, counters and statistics as they are now."""
        return read_vcpu(self._q, self._mm, self._layout, self.index)


class VcpuReading(NamedTuple):
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
    runner_served: int = 0
    """Exits its runner served without waking the worker (counted among `exits` too)."""
    poll_ns: int = 0
    """The polling window its runner and worker have now (its mailbox's, which the
    supervisor's polling gate sets: 0 while polling is off)."""


_WAITING_STATES: Final = frozenset({RunState.INIT, RunState.WAITING_PLUGIN, RunState.PAUSED})


def read_vcpu(q: memoryview, mm: mmap.mmap, layout: Layout, index: int) -> VcpuReading:
    """VCPU `index`'s slot and statistics block in the region `mm` (as cells: `q`)."""
    slot = layout.slot(index)
    state_cell = slot // 8 + _C_RUN_STATE
    counters = slot // 8 + _C_COUNTERS
    reason = slot + _STOP_REASON_OFF
    stats = layout.stats(index) // 8 + _S_WAIT_SINCE
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
        runner_served=q[slot // 8 + _C_RUNNER_SERVED],
        poll_ns=read_poll_ns(mm, layout.mailbox(index)),
    )
