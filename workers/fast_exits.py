"""The worker's side of the C exit loop (`hotpath.vms_worker_loop`): its context, its copy of
the reserved ranges, and what Python needs when the loop hands an exit back.

The C loop serves only what `VcpuProtocol.io_access` would answer with a plain Wait{Io} or
nothing at all; whatever else happens it returns, and the worker carries on in Python with the
same state it would have had (see `VcpuWorker._run_fast`). It reads the ranges from an array
this object builds from the shared table's snapshot, and gives up on any exit made after the
table's generation moved on, so the worker rebuilds the array before the next call.
"""

from __future__ import annotations

import ctypes

from vmsuper.shared import hotpath
from vmsuper.shared.abi import ExitKind
from vmsuper.shared.shm_counts import RangeCounts
from vmsuper.shared.shm_doorbell import Doorbell
from vmsuper.shared.shm_mailbox import Mailbox
from vmsuper.shared.shm_slot import VcpuSlot
from vmsuper.shared.shm_table import TableReader
from vmsuper.workers.vcpu_channel import MAX_REQUEST, MAX_REQUEST_FDS, Channel, PipeChannel
from vmsuper.workers.vcpu_protocol import VcpuProtocol

__all__ = ["FastExits"]

assert int(ExitKind.UNRESERVED) == 5 and int(ExitKind.ASYNC_WRITE) == 4  # hotpath.c's order


class FastExits:
    """One worker's C loop: call `run()` until it returns something for Python."""

    def __init__(
        self,
        *,
        run_address: int,
        run_size: int,
        mailbox: Mailbox,
        doorbell: Doorbell,
        slot: VcpuSlot,
        reader: TableReader,
        channel: Channel,
        range_counts: RangeCounts,
    ) -> None:
        self._reader = reader
        self._live = range_counts
        self._buffer = ctypes.create_string_buffer(MAX_REQUEST + 1)
        request_efd, done_efd = doorbell.fds()
        fds = channel.fds()
        self._array = hotpath.ranges(())
        self.context = hotpath.WorkerContext(
            run=run_address,
            run_size=run_size,
            mail=mailbox.head_address(),
            request_efd=request_efd,
            done_efd=done_efd,
            done_seen=ctypes.addressof(doorbell.done_seen),
            counters=slot.cell_address("counters"),
            run_state=slot.cell_address("run_state"),
            stats=slot.cell_address("stats"),
            table_gen=reader.gen_address,
            known_gen=(1 << 64) - 1,  # odd: never a published generation
            ranges=self._array,
            n_ranges=0,
            range_counts=range_counts.counts_address(),
            pipes=isinstance(channel, PipeChannel),
            in_fd=fds[0],
            out_fd=fds[-1],
            buf=ctypes.addressof(self._buffer),
            max_request=MAX_REQUEST,
            max_fds=MAX_REQUEST_FDS,
            spin_ns=doorbell.spin_ns,
            wake_fd=doorbell.wake_fd,
            state=0,
        )
        self._pointer = self.context
        self._loop = hotpath.library.vms_worker_loop

    def run(self, protocol: VcpuProtocol) -> hotpath.WorkerResult:
        """Run the guest and serve its plain exits until one needs Python."""
        if self._reader.gen_changed(self.context.known_gen):
            self._describe_table(protocol)
        return hotpath.WorkerResult(self._loop(self._pointer))

    def request(self) -> bytes:
        """The request the loop read but did not serve (REQUEST, REFUSED)."""
        return self._buffer.raw[: self.context.request_len]

    def forwarded_area(self, page: memoryview) -> memoryview | None:
        """The data area of the access the loop forwarded: where a read's answer goes."""
        context = self.context
        if context.fwd_is_write:
            return None
        return page[context.fwd_offset : context.fwd_offset + context.fwd_length]

    def collect(self, protocol: VcpuProtocol) -> None:
        """Add the loop's per-range counts to the protocol's (for the exit-count record)."""
        for rng, count in self._live.take_c_counts():
            protocol.add_range_count(rng, count)

    def _describe_table(self, protocol: VcpuProtocol) -> None:
        self.collect(protocol)
        snapshot = self._reader.snapshot()
        ranges = list(snapshot.ranges())  # IOPORT (0) first, each space by start
        self._live.describe(ranges)
        ranges = self._live.ranges  # the C loop sees no more ranges than the counters hold
        array = hotpath.ranges(ranges)
        context = self.context
        context.ranges = array
        context.n_ranges = len(ranges)
        hint = snapshot.hint
        context.hint_set = hint is not None and hint.is_set
        context.hint_space = hint.space if hint is not None else 0
        context.hint_address = hint.address if hint is not None else 0
        context.known_gen = snapshot.gen
        self._array = array
