"""The shared region: table publishing under a seqlock, pause hand-off, counters, mailboxes.

Cross-process tests fork a child that reports through its exit status (0 = all checks passed).
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import mmap
import os
import select
import signal
import stat
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from vmsuper.shared import abi, hotpath
from vmsuper.shared.abi import MAILBOX_ARG_SIZE, ExitKind, RunState
from vmsuper.shared.ranges import CallHint, Range, RangeError, RangeTable, RegHint, Space
from vmsuper.shared.shm import RegionView, SharedRegion
from vmsuper.shared.shm_doorbell import Doorbell
from vmsuper.shared.shm_layout import ShmError
from vmsuper.shared.shm_mailbox import OP_RUN
from vmsuper.shared.shm_slot import VcpuSlot

U64_MASK = (1 << 64) - 1
CHILD_DEADLINE = 30.0  # seconds a child waits for its peer before giving up with an error code


@pytest.fixture
def region() -> Iterator[SharedRegion]:
    shared = SharedRegion.create(2, max_ranges=512)
    yield shared
    shared.close()


@contextmanager
def forked(body: Callable[[], int], deadline_s: float | None = None) -> Iterator[list[int | None]]:
    """Run `body` in a forked child; the yielded list receives the child's exit code on exit
    (None: it had not ended `deadline_s` seconds after the block, and was killed).

    A failure in the parent kills the child, so no process is left behind.
    """
    pid = os.fork()
    if pid == 0:
        code = 100
        try:
            code = body()
        except BaseException:
            traceback.print_exc()
            code = 101
        finally:
            sys.stderr.flush()
            os._exit(code)
    result: list[int | None] = []
    try:
        yield result
    except BaseException:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        raise
    ended = True
    if deadline_s is not None:
        pidfd = os.pidfd_open(pid)
        try:
            ended = bool(select.select([pidfd], [], [], deadline_s)[0])
        finally:
            os.close(pidfd)
        if not ended:
            os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    result.append(os.waitstatus_to_exitcode(status) if ended else None)


def sample_table() -> RangeTable:
    table = RangeTable()
    table.reserve(Space.IOPORT, 0x3F8, 8)
    table.reserve(Space.IOPORT, 0x80, 1, async_write=True)
    table.reserve(Space.MMIO, 0xFED0_0000, 0x1000)
    return table


SAMPLE_HINT = CallHint(
    Space.IOPORT,
    0x80,
    on_write=True,
    hints=(
        RegHint(match_rax=True, rax=U64_MASK, send_sregs=True),
        RegHint(match_rbx=True, match_rdx=True, rbx=2, rdx=4, send_debugregs=True),
    ),
)


def test_publish_and_refresh_round_trip(region: SharedRegion) -> None:
    reader = region.reader()
    assert reader.lookup(Space.IOPORT, 0x3F8) is None
    assert reader.hint is None
    assert not reader.refresh()
    table = sample_table()
    gen = region.table.publish(table, SAMPLE_HINT)
    assert gen == region.table.gen and gen % 2 == 0 and gen > 0
    assert reader.refresh()
    assert not reader.refresh()
    assert reader.gen == gen
    snap = reader.snapshot()
    assert list(snap.ranges()) == list(table.ranges())
    assert len(snap) == 3
    assert reader.lookup(Space.IOPORT, 0x3FF) == Range(Space.IOPORT, 0x3F8, 8, False)
    assert reader.lookup(Space.IOPORT, 0x400) is None
    assert reader.lookup(Space.IOPORT, 0x80) == Range(Space.IOPORT, 0x80, 1, True)
    assert reader.lookup(Space.MMIO, 0x3F8) is None
    assert reader.lookup(Space.MMIO, 0xFED0_0FFF) is not None
    assert reader.hint == SAMPLE_HINT
    # Clearing the hint: None and address 0 both publish "no hint".
    region.table.publish(table, CallHint(Space.MMIO, 0, False, (RegHint(),)))
    assert reader.hint is None
    table.reserve(Space.IOPORT, 0x3F8, 0)
    region.table.publish(table, None)
    assert reader.lookup(Space.IOPORT, 0x3F8) is None
    assert len(reader.snapshot()) == 2


def test_lookup_notices_a_new_generation_without_refresh(region: SharedRegion) -> None:
    reader = region.reader()
    table = RangeTable()
    for n in range(5):
        table.reserve(Space.MMIO, n * 0x1000, 0x10)
        region.table.publish(table, None)
        assert reader.lookup(Space.MMIO, n * 0x1000 + 0xF) == Range(Space.MMIO, n * 0x1000, 0x10)


def test_publish_beyond_capacity_changes_nothing() -> None:
    with SharedRegion.create(1, max_ranges=2, max_hints=1) as shared:
        reader = shared.reader()
        table = RangeTable()
        for start in range(3):
            table.reserve(Space.IOPORT, start, 1)
        with pytest.raises(RangeError) as info:
            shared.table.publish(table, None)
        assert info.value.errno == errno.ENOSPC
        table.reserve(Space.IOPORT, 2, 0)
        with pytest.raises(RangeError) as info:
            shared.table.publish(table, CallHint(Space.IOPORT, 1, False, (RegHint(), RegHint())))
        assert info.value.errno == errno.E2BIG
        assert shared.table.gen == 0
        assert not reader.refresh()
        shared.table.publish(table, CallHint(Space.IOPORT, 1, False, (RegHint(),)))
        assert reader.refresh() and len(reader.snapshot()) == 2


def test_reader_keeps_its_copy_while_the_next_publish_is_under_way(region: SharedRegion) -> None:
    table = sample_table()
    region.table.publish(table, None)
    reader = region.reader()
    q = memoryview(region.mmap).cast("Q")
    gen_cell = region.table._gen  # the seqlock word, as the writer sees it mid-publish
    try:
        q[gen_cell] += 1
        # The copy is the last completed publish: answered at once, no waiting for the writer.
        assert not reader.refresh()
        assert reader.lookup(Space.IOPORT, 0x3F8) is not None
        q[gen_cell] += 1
    finally:
        q.release()
    assert reader.refresh()


def test_forked_child_sees_later_publishes_and_pause_tokens(region: SharedRegion) -> None:
    ready_r, ready_w = os.pipe()
    go_r, go_w = os.pipe()

    def child() -> int:
        reader = region.reader()
        slot = region.slot(1)
        if reader.lookup(Space.IOPORT, 0x3F8) is not None or slot.take_pause() is not None:
            return 2
        os.write(ready_w, b"r")
        if os.read(go_r, 1) != b"g":
            return 3
        if reader.lookup(Space.IOPORT, 0x3FC) != Range(Space.IOPORT, 0x3F8, 8, False):
            return 4
        if reader.hint != SAMPLE_HINT:
            return 5
        if not slot.pause_pending() or slot.take_pause() != 0xDEAD_BEEF_0000_0001:
            return 6
        if slot.take_pause() is not None or region.slot(0).take_pause() is not None:
            return 7
        return 0

    try:
        with forked(child) as code:
            assert os.read(ready_r, 1) == b"r"
            region.table.publish(sample_table(), SAMPLE_HINT)
            region.slot(1).request_pause(0xDEAD_BEEF_0000_0000)
            region.slot(1).request_pause(0xDEAD_BEEF_0000_0001)  # overwrites the first
            os.write(go_w, b"g")
    finally:
        for fd in (ready_r, ready_w, go_r, go_w):
            os.close(fd)
    assert code == [0]
    assert not region.slot(1).pause_pending()
    assert region.slot(1).delivered_seq == region.slot(1).pause_seq == 2


def pattern_table(i: int) -> tuple[RangeTable, CallHint]:
    """Published version `i`: every field derived from `i`, so a torn mix cannot pass."""
    table = RangeTable()
    for k in range(1 + (i * 37) % 300):
        space = Space((i + k) & 1)
        table.reserve(space, (k << 24) + i, 1 + (i * 7 + k) % 1000, async_write=(i + k) % 3 == 0)
    hints = tuple(
        RegHint(match_rax=bool(k & 1), rax=i, rbx=k, send_sregs=bool(i & 1)) for k in range(i % 6)
    )
    return table, CallHint(Space(i & 1), i + 1, bool(i & 2), hints)


def test_seqlock_readers_never_see_a_torn_table(region: SharedRegion) -> None:
    versions = [pattern_table(i) for i in range(64)]
    expected = [(list(t.ranges()), h) for t, h in versions]
    final = len(versions) - 1
    publishes = 3000

    def child() -> int:
        reader = region.reader()
        deadline = time.monotonic() + CHILD_DEADLINE
        last_gen = -1
        while time.monotonic() < deadline:
            snap = reader.snapshot()
            if snap.hint is None:
                continue  # nothing published yet
            i = snap.hint.address - 1
            if not 0 <= i <= final or (list(snap.ranges()), snap.hint) != expected[i]:
                return 2
            if snap.gen < last_gen:
                return 3
            last_gen = snap.gen
            if snap.gen == 2 * (publishes + 1):
                return 0 if i == final else 4
        return 5

    with forked(child) as code:
        for n in range(publishes):
            region.table.publish(*versions[n % final])
        region.table.publish(*versions[final])
    assert code == [0]


def token_for(seq: int) -> int:
    return (seq * 0x9E37_79B9_7F4A_7C15) & U64_MASK


def test_pause_tokens_are_taken_latest_first_and_once(region: SharedRegion) -> None:
    requests = 100_000
    slot = region.slot(0)

    def child() -> int:
        deadline = time.monotonic() + CHILD_DEADLINE
        last = 0
        while time.monotonic() < deadline:
            token = slot.take_pause()
            if token is None:
                continue
            seq = slot.delivered_seq
            if seq <= last:
                return 2  # a sequence number taken twice, or going backwards
            if token != token_for(seq):
                return 3  # not the token that was latest when seq was current
            last = seq
            if seq == requests:
                return 0
        return 4

    with forked(child) as code:
        for seq in range(1, requests + 1):
            slot.request_pause(token_for(seq))
    assert code == [0]
    assert not slot.pause_pending()


def test_pause_token_must_be_u64(region: SharedRegion) -> None:
    with pytest.raises(ValueError):
        region.slot(0).request_pause(1 << 64)
    assert not region.slot(0).pause_pending()


def test_counters_run_state_and_stop_reason_from_a_child(region: SharedRegion) -> None:
    slot = region.slot(1)
    assert slot.run_state is RunState.NOT_STARTED
    assert set(slot.counters().values()) == {0}

    def child() -> int:
        slot.run_state = RunState.RUNNING
        for _ in range(3):
            slot.count(ExitKind.IO_OUT)
        slot.count(ExitKind.HYPERV)
        slot.stop("triple fault at rip 0x1000 — shutdown")
        return 0

    with forked(child) as code:
        pass
    assert code == [0]
    counters = slot.counters()
    assert counters["io_out"] == 3 and counters["hyperv"] == 1
    assert sum(counters.values()) == 4
    assert set(counters) == {k.name.lower() for k in ExitKind}
    assert slot.run_state is RunState.STOPPED
    assert slot.stop_reason == "triple fault at rip 0x1000 — shutdown"
    assert region.slot(0).counters()["io_out"] == 0


def test_long_stop_reason_is_truncated(region: SharedRegion) -> None:
    region.slot(0).stop("é" * 200)
    assert region.slot(0).stop_reason == "é" * 63  # 126 bytes: whole characters only


def test_mailbox_arg_address_works_with_ctypes(region: SharedRegion) -> None:
    box = region.mailbox(1)
    addr = box.arg_address()
    assert addr != region.mailbox(0).arg_address()
    box.post(0xAE80, b"\x01\x02\x03")
    assert box.request() == (0xAE80, 3)
    assert ctypes.string_at(addr, 3) == b"\x01\x02\x03"
    ctypes.memmove(addr + MAILBOX_ARG_SIZE - 4, b"tail", 4)
    view = box.arg_view()
    try:
        assert len(view) == MAILBOX_ARG_SIZE
        assert bytes(view[-4:]) == b"tail"
        view[:2] = b"ok"
    finally:
        view.release()
    assert box.read_arg(3) == b"ok\x03"
    box.complete(-1, errno.EINTR)
    assert box.result() == (-1, errno.EINTR)
    box.post(OP_RUN)
    assert box.request() == (OP_RUN, 0)
    assert box.result() == (0, 0)
    box.post(0x1234, length=16)
    assert box.request() == (0x1234, 16)


def test_mailbox_rejects_bad_requests(region: SharedRegion) -> None:
    box = region.mailbox(0)
    with pytest.raises(ShmError):
        box.post(1, bytes(MAILBOX_ARG_SIZE + 1))
    with pytest.raises(ValueError):
        box.post(1 << 32)
    with pytest.raises(ValueError):
        box.post(1, b"x", length=1)
    with pytest.raises(IndexError):
        region.mailbox(2)
    with pytest.raises(IndexError):
        region.slot(-1)


def test_mailbox_round_trip_with_a_forked_worker(region: SharedRegion) -> None:
    box = region.mailbox(0)
    with Doorbell(box) as bell:

        def child() -> int:
            box.post(0xC008_AE88, b"hello world")
            bell.ring_request()
            bell.wait_done()
            if box.result() != (11, 0):
                return 2
            return 0 if box.read_arg(11) == b"HELLO WORLD" else 3

        with forked(child) as code:
            assert bell.wait_request() == 1
            op, length = box.request()
            assert op == 0xC008_AE88
            data = ctypes.string_at(box.arg_address(), length)
            ctypes.memmove(box.arg_address(), data.upper(), length)
            box.complete(length, 0)
            bell.ring_done()
        assert code == [0]


def test_doorbell_counts_and_closes(region: SharedRegion) -> None:
    bell = Doorbell(region.mailbox(0))
    fds = [*bell.runner_fds(), *bell.worker_fds()]
    bell.ring_request()
    bell.ring_request()
    assert bell.wait_request() == 2
    bell.ring_done()
    assert bell.wait_done() == 1
    bell.close()
    bell.close()
    for fd in fds:
        with pytest.raises(OSError):
            os.fstat(fd)


def test_a_worker_s_doorbell_leaves_the_runner_s_ends_alone(region: SharedRegion) -> None:
    """A worker closes every fd but its own before it runs (the runner's ends among them), so
    its doorbell must not close those numbers again: they may name other files by then."""
    bell = Doorbell(region.mailbox(0))
    runner_ends = bell.runner_fds()
    worker_ends = bell.worker_fds()
    bell.leave_runner_ends()
    assert bell.runner_fds() == (-1, -1)
    bell.close()
    for fd in worker_ends:
        with pytest.raises(OSError):
            os.fstat(fd)
    for fd in runner_ends:
        os.fstat(fd)  # still open: not the doorbell's to close any more
        os.close(fd)


def test_each_side_holds_the_ends_of_the_doorbell_s_pipes_it_uses(region: SharedRegion) -> None:
    """A bell is a pipe (its write wakes the reader as a synchronous wake-up, an eventfd's
    does not: shared/shm_doorbell.py): each side reads the one it waits on, blocking, and
    writes the one it rings, without blocking."""
    with Doorbell(region.mailbox(0)) as bell:
        request_read, done_write = bell.runner_fds()
        request_write, done_read = bell.worker_fds()
        for read_end, write_end in ((request_read, request_write), (done_read, done_write)):
            assert stat.S_ISFIFO(os.fstat(read_end).st_mode)
            assert os.fstat(read_end).st_ino == os.fstat(write_end).st_ino  # one pipe
            assert fcntl.fcntl(read_end, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDONLY
            assert fcntl.fcntl(write_end, fcntl.F_GETFL) & os.O_ACCMODE == os.O_WRONLY
            assert os.get_blocking(read_end)
            assert not os.get_blocking(write_end)
            assert os.get_inheritable(read_end) is os.get_inheritable(write_end) is False
            # One page: the least a pipe takes of its user's pipe quota.
            assert fcntl.fcntl(read_end, fcntl.F_GETPIPE_SZ) == os.sysconf("SC_PAGE_SIZE")


@pytest.mark.parametrize("with_wake_fd", [False, True])
def test_a_bell_whose_write_ends_are_all_closed_fails_its_waiter(
    region: SharedRegion, with_wake_fd: bool
) -> None:
    """No ring can come once every write end of a bell's pipe is closed: the waiter gets EPIPE
    rather than sleeping for ever or spinning on the pipe's end of file. (It waits in a child,
    so that a wait that does not end fails the test instead of hanging it.)"""

    def waiter() -> int:
        bell = Doorbell(region.mailbox(0))
        request_read, _ = bell.runner_fds()
        request_write, _ = bell.worker_fds()
        wake_read, _ = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        os.close(request_write)  # the bell's only write end
        try:
            hotpath.bell_wait(
                bell.request_bell,
                request_read,
                bell.request_seen,
                0,
                wake_read if with_wake_fd else -1,
            )
        except OSError as exc:
            return 0 if exc.errno == errno.EPIPE else 2
        return 3

    with forked(waiter, deadline_s=10.0) as code:
        pass
    assert code != [None], "the waiter still waits on a bell that nothing can ring"
    assert code == [0]


def test_a_ring_does_not_block_on_a_full_pipe(region: SharedRegion) -> None:
    """A waiter that sleeps and never reads (a worker killed in its sleep, say) cannot stall
    its ringer: once the pipe is full, a ring still counts and returns."""
    box = region.mailbox(0)
    with Doorbell(box) as bell:
        write_end, _ = bell.worker_fds()  # the request bell's, which the worker rings
        assert not os.get_blocking(write_end)  # else the rings below would block for good
        capacity = fcntl.fcntl(write_end, fcntl.F_GETPIPE_SZ)
        sleeping_at = box.bells_address() + abi.BELL.offset("sleeping")
        ctypes.c_uint32.from_address(sleeping_at).value = abi.Sleeping.ON_PIPE
        rings = capacity + 10
        for _ in range(rings):
            bell.ring_request()
        assert bell.wait_request() == rings


def test_attach_checks_the_header(region: SharedRegion) -> None:
    other = SharedRegion.attach(region.mmap)
    try:
        region.table.publish(sample_table(), None)
        assert other.vcpus == 2
        assert other.reader().lookup(Space.IOPORT, 0x3F8) is not None
        assert other.mailbox(1).arg_address() == region.mailbox(1).arg_address()
    finally:
        other.close()
    assert not region.mmap.closed  # attached regions leave unmapping to the owner
    with mmap.mmap(-1, region.size) as blank:
        with pytest.raises(ShmError, match="magic"):
            SharedRegion.attach(blank)
        blank[:128] = region.mmap[:128]  # the header (72 bytes) and then some
        blank[4:8] = (99).to_bytes(4, "little")
        with pytest.raises(ShmError, match="version"):
            SharedRegion.attach(blank)
    with mmap.mmap(-1, mmap.PAGESIZE) as small:
        small[:128] = region.mmap[:128]
        with pytest.raises(ShmError, match="smaller"):
            SharedRegion.attach(small)


def test_create_validates_dimensions() -> None:
    with pytest.raises(ValueError):
        SharedRegion.create(0)
    with pytest.raises(ValueError):
        SharedRegion.create(1, max_ranges=-1)


def test_close_refuses_while_a_view_is_held_and_is_idempotent() -> None:
    shared = SharedRegion.create(1)
    view = shared.mailbox(0).arg_view()
    with pytest.raises(ShmError):
        shared.close()
    view.release()
    shared.close()
    shared.close()
    assert shared.mmap.closed


# -- statistics and the read-only view ---------------------------------------------------------


def engine_over(slot: VcpuSlot) -> Any:
    """The exit engine's context over `slot`'s run state and statistics, as a worker's is: the
    engine is their only writer (`vms_begin_wait`, `vms_resumed`)."""
    return hotpath.WorkerContext(
        run_state=slot.cell_address("run_state"), stats=slot.cell_address("stats")
    )


def test_a_wait_on_an_exit_lands_in_the_histogram_and_init_or_a_pause_do_not(
    region: SharedRegion,
) -> None:
    slot = region.slot(1)
    engine = engine_over(slot)
    for state in (RunState.INIT, RunState.PAUSED, RunState.WAITING_PLUGIN):
        hotpath.library.vms_begin_wait(engine, state)
        reading = slot.reading()
        assert reading.state is state
        assert reading.waiting_ns is not None and reading.waiting_ns >= 0
        hotpath.library.vms_resumed(engine)
        assert slot.run_state is RunState.RUNNING
        assert slot.reading().waiting_ns is None
    reading = slot.reading()
    assert reading.responses == 1
    assert sum(reading.buckets) == 1
    (bucket,) = [b for b, n in enumerate(reading.buckets) if n]
    assert reading.response_max_ns == reading.response_sum_ns
    assert reading.response_max_ns.bit_length() == bucket
    assert region.slot(0).reading().responses == 0


def test_region_view_maps_the_memfd_read_only(region: SharedRegion) -> None:
    slot = region.slot(1)
    slot.count(ExitKind.IO_OUT)
    hotpath.library.vms_begin_wait(engine_over(slot), RunState.PAUSED)
    with RegionView.open(os.getpid(), region.fd) as view:
        assert view.vcpus == 2
        reading = view.reading(1)
        assert reading.state is RunState.PAUSED
        assert reading.exits["io_out"] == 1
        slot.count(ExitKind.IO_OUT)  # the view sees the same pages, as they change
        assert view.reading(1).exits["io_out"] == 2
        # Each VCPU's polling window, as the polling gate sets it in the VCPU's mailbox.
        region.mailbox(1).poll_ns = 123_000
        assert (view.reading(0).poll_ns, view.reading(1).poll_ns) == (0, 123_000)
        with pytest.raises(TypeError):
            view._mm[0:1] = b"x"  # mapped PROT_READ
        with pytest.raises(IndexError):
            view.reading(2)


def test_region_view_refuses_an_fd_that_is_not_a_region(tmp_path: Path) -> None:
    with open(tmp_path / "f", "wb") as f, pytest.raises(ShmError):
        RegionView.open(os.getpid(), f.fileno())


def test_range_counts_are_the_engines_cells_and_carry_over(region: SharedRegion) -> None:
    a = Range(Space.IOPORT, 0x10, 1)
    b = Range(Space.MMIO, 0x1000, 0x100)
    c = Range(Space.MMIO, 0x2000, 0x100)
    live = region.range_counts(1)
    live.describe([a, b])
    counters = (ctypes.c_uint64 * 2).from_address(live.counts_address())
    counters[1] += 3  # the engine counts three exits of b
    counters[0] += 1  # and one of a
    assert live.counts() == [(a, 1), (b, 3)]
    with RegionView.open(os.getpid(), region.fd) as view:
        assert view.range_counts(1) == [(a, 1), (b, 3)]
        assert view.range_counts(0) == []
        live.describe([b, c])  # a new table: b keeps its count
        assert view.range_counts(1) == [(b, 3), (c, 0)]


def _region_mappings(fd_name: str = "memfd:vmsuper-shm") -> list[tuple[int, int]]:
    """[start, end) of this process's mappings of the region's memfd."""
    found = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        if fd_name in line:
            start, end = (int(x, 16) for x in line.split()[0].split("-"))
            found.append((start, end))
    return found


def test_each_vcpu_has_one_page_aligned_block() -> None:
    with SharedRegion.create(3) as region:
        base = ctypes.addressof(ctypes.c_char.from_buffer(region.mmap))
        blocks = []
        for i in range(3):
            cells = [
                region.mailbox(i).arg_address(),
                region.slot(i).cell_address("pause_seq"),
                region.slot(i).cell_address("stats"),
                region.range_counts(i).counts_address(),
            ]
            start = min(cells) - base
            blocks.append(start)
            assert start % mmap.PAGESIZE == 0 or (start - 64) % mmap.PAGESIZE == 0
        assert blocks == sorted(blocks)
        assert region.reader().gen_address - base < blocks[0]


def test_a_confined_worker_maps_only_its_own_block_and_the_table() -> None:
    """After `confine_to(1)` in a forked child, VCPU 1's objects and the table work, VCPU 0's
    block is gone: touching it kills the child with SIGSEGV."""
    with SharedRegion.create(2) as region:
        table = RangeTable()
        table.reserve(Space.IOPORT, 0x3F8, 8)
        region.table.publish(table, None)
        other = region.slot(0)
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:
            status = 1
            try:
                os.close(read_end)
                before = len(_region_mappings())
                region.confine_to(1)
                slot = region.slot(1)
                slot.count(ExitKind.IO_IN)
                engine = engine_over(slot)
                hotpath.library.vms_begin_wait(engine, RunState.WAITING_PLUGIN)
                hotpath.library.vms_resumed(engine)
                region.mailbox(1).post(0x1234, b"arg")
                region.range_counts(1).describe(list(table.ranges()))
                assert region.reader().lookup(Space.IOPORT, 0x3F9) is not None
                with pytest.raises(ShmError):
                    region.slot(0)
                assert region.fd == -1
                mapped = _region_mappings()
                base = ctypes.addressof(ctypes.c_char.from_buffer(region.mmap))
                own = region.mailbox(1).arg_address() - 64  # the mailbox opens the block
                assert mapped[0][0] == base and mapped[0][1] <= region.slot(1).cell_address(
                    "pause_seq"
                )
                assert mapped[1:] == [(own, base + region.size)]
                os.write(write_end, f"{before} {len(mapped)}\n".encode())
                other.count(ExitKind.IO_IN)  # VCPU 0's block: SIGSEGV
            except BaseException as exc:
                os.write(write_end, f"failed: {exc!r}\n".encode())
            finally:
                os._exit(status)
        os.close(write_end)
        with os.fdopen(read_end) as reports:
            said = reports.read()
        _, status = os.waitpid(pid, 0)
        assert said.split() == ["1", "2"], said  # the table's block and VCPU 1's
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGSEGV, said
        # The parent's mapping is untouched.
        assert region.slot(0).counters()["io_in"] == 0
        assert region.slot(1).counters()["io_in"] == 1
