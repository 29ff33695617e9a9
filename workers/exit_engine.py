"""The worker's handle on the per-exit engine (`hotpath.vms_worker_loop`): the C context, the
engine's copy of the reserved ranges, and the decoded events it hands back.

The engine runs the guest and serves every exit it can on its own (see `hotpath.c`); when it
returns, `run()` says why and the context holds the decoded event (`access`, `range_index`,
`delivered`, `response_ns`). Python never decodes an I/O or MMIO exit itself. The engine
looks accesses up in the VCPU's `RangeCounts` (the worker's one copy of the ranges, which
`vmsuper stats` reads too), laid out from the shared table's snapshot; an exit made after the
table's generation moved on comes back as `TABLE`, and is handled on the next `run()`, once
the ranges are laid out again.

Range counts have one home, the shared `RangeCounts` cells the engine increments; ranges a
new table no longer holds are kept (`retired`) for the exit-count record.
"""

from __future__ import annotations

import ctypes
from typing import Any

from vmsuper.shared import hotpath
from vmsuper.shared.abi import ExitKind, RunState
from vmsuper.shared.hotpath import WorkerResult
from vmsuper.shared.ranges import CallHint
from vmsuper.shared.shm_counts import RangeCounts
from vmsuper.shared.shm_doorbell import Doorbell
from vmsuper.shared.shm_mailbox import Mailbox
from vmsuper.shared.shm_slot import VcpuSlot
from vmsuper.shared.shm_table import TableReader
from vmsuper.workers.vcpu_channel import VcpuChannel
from vmsuper.workers.vcpu_protocol import range_label

__all__ = ["ExitEngine"]

assert int(ExitKind.UNRESERVED) == 5 and int(ExitKind.ASYNC_WRITE) == 4  # hotpath.c's order


class ExitEngine:
    """One worker's engine: call `run()` until it returns something for Python."""

    def __init__(
        self,
        *,
        run_address: int,
        run_size: int,
        mailbox: Mailbox,
        doorbell: Doorbell,
        slot: VcpuSlot,
        reader: TableReader,
        channel: VcpuChannel,
        range_counts: RangeCounts,
        report_exits: bool = False,
    ) -> None:
        self._reader = reader
        self._live = range_counts
        self.retired: dict[str, int] = {}
        """Counts of ranges an older table held and the current one does not, by label."""
        self.hint: CallHint | None = None
        """The call hint of the table the engine runs with."""
        request_fd, done_fd = doorbell.worker_fds()
        # Debug logging records every exit here, so the runner must not serve any.
        forwarding = not report_exits
        if forwarding:
            # While the runner may serve its exit, the loop sleeps in the read of the
            # plugin's channel, from which the runner's ring wakes it with this signal.
            hotpath.catch_wake()
        self.context = context = hotpath.WorkerContext(
            run=run_address,
            run_size=run_size,
            mail=mailbox.head_address(),
            request_fd=request_fd,
            done_fd=done_fd,
            done_seen=ctypes.addressof(doorbell.done_seen),
            counters=slot.cell_address("counters"),
            run_state=slot.cell_address("run_state"),
            stats=slot.cell_address("stats"),
            table_gen=reader.gen_address,
            known_gen=(1 << 64) - 1,  # odd: never a published generation
            ranges=range_counts.ranges_address(),
            n_ranges=0,
            range_counts=range_counts.counts_address(),
            wake_fd=doorbell.wake_fd,
            report_exits=report_exits,
            forwarding=forwarding,
            state=0,
            **channel.context_fields(),
        )
        channel.attach(context)
        self.channel = channel
        self._pointer = context
        self._loop = hotpath.library.vms_worker_loop

    context: Any
    """The engine's `struct vms_worker` (cffi): the event is read from its fields."""

    def run(self) -> WorkerResult:
        """Run the guest and serve its exits until one needs Python."""
        result = WorkerResult(self._loop(self._pointer))
        if result is WorkerResult.TABLE:
            self._describe_table()
        return result

    @property
    def access(self) -> Any:
        """The last I/O or MMIO exit the engine decoded."""
        return self.context.access

    def begin_wait(self, state: RunState) -> None:
        """The VCPU waits on the plugin (INIT, PAUSED, or WAITING_PLUGIN for a Hyper-V exit)."""
        hotpath.library.vms_begin_wait(self._pointer, int(state))

    def resumed(self) -> None:
        """The plugin resumed the VCPU from a wait that was not a forwarded access."""
        hotpath.library.vms_resumed(self._pointer)

    def finish_access(self, data: bytes) -> None:
        """The plugin resumed the forwarded access with `data` (served by the protocol)."""
        hotpath.library.vms_finish_access(self._pointer, data, len(data))

    def range_counts(self) -> dict[str, int]:
        """Forwarded exits per reserved range, by label (`range_label`), for the exit-count
        record: the live shared counters, and those of ranges no longer in the table."""
        counts = dict(self.retired)
        for rng, count in self._live.counts():
            label = range_label(rng)
            counts[label] = counts.get(label, 0) + count
        return {label: count for label, count in counts.items() if count}

    def _describe_table(self) -> None:
        snapshot = self._reader.snapshot()
        ranges = list(snapshot.ranges())  # IOPORT (0) first, each space by start
        kept = {(r.space, r.start) for r in ranges}
        for rng, count in self._live.counts():
            if (rng.space, rng.start) not in kept and count:
                label = range_label(rng)
                self.retired[label] = self.retired.get(label, 0) + count
        hint = snapshot.hint
        self.hint = hint if hint is not None and hint.is_set else None
        hint_cells = None
        if self.hint is not None:
            hint_cells = (int(self.hint.space), self.hint.address, int(self.hint.on_write))
        self._live.describe(ranges, table_gen=snapshot.gen, hint=hint_cells)
        context = self.context
        context.n_ranges = len(self._live.ranges)  # at most the max_ranges the counters hold
        context.hint_set = self.hint is not None
        context.hint_space = hint.space if hint is not None else 0
        context.hint_address = hint.address if hint is not None else 0
        context.hint_on_write = hint.on_write if hint is not None else 0
        context.known_gen = snapshot.gen
