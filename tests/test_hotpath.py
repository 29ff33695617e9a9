"""The exit engine's pieces on their own: its structs against the ctypes mirrors, its
protobuf encoding and parsing against protobuf and the Python oracles (tests/wire_oracle.py),
its range lookup against the range table, its signal watch, and its bells.

The loops themselves run in tests/test_vcpus.py (real KVM) and tests/test_vcpu_worker.py
(scripted exits, checked against the protocol oracle).
"""

from __future__ import annotations

import ctypes
import os
import signal
import threading
import time
from collections.abc import Iterator
from types import FrameType

import pytest
from fuzz.wire_oracle import plain_resume_data, wire_fields
from hypothesis import given
from hypothesis import strategies as st

from vmsuper.shared import hotpath
from vmsuper.shared.plugin_pb2 import VcpuRequest, VcpuResponse
from vmsuper.shared.ranges import RangeTable, Space
from vmsuper.shared.shm import Doorbell, Mailbox, SharedRegion, drain_wakeup_pipe


@pytest.mark.parametrize(
    ("which", "mirror"),
    [
        (0, hotpath.RunnerContext),
        (1, hotpath.Range),
        (2, hotpath.WorkerContext),
        (3, hotpath.VcpuStats),
        (4, hotpath.Access),
    ],
)
def test_structs_match_their_ctypes_mirrors(which: int, mirror: type[ctypes.Structure]) -> None:
    c_layout = hotpath.layout(hotpath.library, which)
    assert c_layout == hotpath.struct_layout(mirror)
    assert len(c_layout) == len(mirror._fields_) + 1  # every field, and the size


# -- encoding and parsing ---------------------------------------------------------------------

u64 = st.integers(min_value=0, max_value=(1 << 64) - 1)


@given(
    space=st.sampled_from([Space.IOPORT, Space.MMIO]),
    address=u64,
    is_write=st.booleans(),
    no_resume=st.booleans(),
    data=st.binary(max_size=300),
)
def test_wait_io_encoding_is_protobufs_canonical_one(
    space: int, address: int, is_write: bool, no_resume: bool, data: bytes
) -> None:
    expected = VcpuResponse()
    io = expected.wait.io
    io.SetInParent()
    io.space = space  # type: ignore[assignment]
    io.address, io.is_write, io.no_resume, io.data = address, is_write, no_resume, data
    encoded = hotpath.encode_io_wait(space, address, is_write, no_resume, data)
    assert VcpuResponse.FromString(encoded) == expected
    # The canonical encoding (which protobuf's serializer need not produce, so it is checked
    # against the wire format itself): fields in number order, no proto3 default written.
    [(wait, wait_body)] = wire_fields(encoded)
    assert wait == (2, 2) and isinstance(wait_body, bytes)  # VcpuResponse.wait
    [(io_field, io_body)] = wire_fields(wait_body)
    assert io_field == (2, 2) and isinstance(io_body, bytes)  # Wait.io
    fields = wire_fields(io_body)
    numbers = [number for (number, _), _ in fields]
    assert numbers == sorted(set(numbers)), "fields out of order, or repeated"
    assert all(value not in (0, b"") for _, value in fields), "a proto3 default was written"


def test_wire_fields_reads_the_canonical_form() -> None:
    # space=1, address=0x3f8, data=b"hi", by hand from the wire format's rules.
    io = b"\x08\x01" + b"\x10\xf8\x07" + b"\x2a\x02hi"
    assert wire_fields(io) == [((1, 0), 1), ((2, 0), 0x3F8), ((5, 2), b"hi")]
    assert (
        hotpath.encode_io_wait(1, 0x3F8, False, False, b"hi")
        == b"\x12" + bytes([len(io) + 2]) + b"\x12" + bytes([len(io)]) + io
    )


@given(data=st.binary(max_size=300))
def test_plain_resume_reads_what_clients_send(data: bytes) -> None:
    request = VcpuRequest(resume=VcpuRequest.Resume(data=data)).SerializeToString()
    assert hotpath.plain_resume(request) == data


@given(raw=st.binary(max_size=40))
def test_plain_resume_accepts_only_plain_resumes(raw: bytes) -> None:
    found = hotpath.plain_resume(raw)
    if found is None:
        return
    request = VcpuRequest.FromString(raw)
    assert request.WhichOneof("message") == "resume"
    assert request.resume == VcpuRequest.Resume(data=found)


def test_plain_resume_leaves_the_rest_to_protobuf() -> None:
    with_regs = VcpuRequest(resume=VcpuRequest.Resume(data=b"x", regs=bytes(144)))
    for request in (with_regs, VcpuRequest(wait=VcpuRequest.Wait())):
        assert hotpath.plain_resume(request.SerializeToString()) is None
    assert hotpath.plain_resume(b"\x12\x05\x0a\x03ab") is None  # cut short
    assert hotpath.plain_resume(b"\x12\x02\x0a\x00\x00") is None  # trailing byte


def _varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


RESUME_EDGES = [
    b"",
    b"\x12",
    b"\x12\x00",
    b"\x12\x02\x0a\x00",
    b"\x12\x03\x0a\x01z",
    b"\x12\x03\x0a\x01",  # cut short
    b"\x12\x04\x0a\x01zz",  # data shorter than Resume says
    b"\x12\x03\x12\x01z",  # Resume.regs, not data
    b"\x0a\x00",  # Wait, not Resume
    b"\x12\x80\x00",  # a long but valid varint for 0
    b"\x12" + b"\xff" * 9 + b"\x01",  # 2**64 - 1: longer than the message
    b"\x12" + b"\x80" * 9 + b"\x02",  # over 64 bits
    b"\x12" + b"\x80" * 10,  # never ends
    b"\x12\x83\x80\x80\x80\x80\x80\x80\x80\x80\x02\x0a\x01z",  # 3 + 2**64 (wraps in C)
]


@pytest.mark.parametrize("request_", RESUME_EDGES)
def test_plain_resume_edges_match_python(request_: bytes) -> None:
    assert hotpath.plain_resume(request_) == plain_resume_data(request_)


@given(st.binary(max_size=40))
def test_plain_resume_of_any_bytes_matches_python(request_: bytes) -> None:
    assert hotpath.plain_resume(request_) == plain_resume_data(request_)


@given(st.binary(max_size=200), st.binary(max_size=3))
def test_plain_resume_of_resumes_matches_python(data: bytes, tail: bytes) -> None:
    body = b"\x0a" + _varint(len(data)) + data
    for request_ in (
        b"\x12" + _varint(len(body)) + body,
        b"\x12" + _varint(len(body)) + body + tail,
    ):
        assert hotpath.plain_resume(request_) == plain_resume_data(request_)


@given(
    st.lists(
        st.tuples(
            st.sampled_from([Space.IOPORT, Space.MMIO]),
            st.integers(0, 0x1_0000),
            st.integers(1, 0x100),
            st.booleans(),
        ),
        max_size=20,
    ),
    st.lists(st.tuples(st.sampled_from([Space.IOPORT, Space.MMIO]), st.integers(0, 0x1_0200))),
)
def test_range_lookup_matches_the_table(
    wanted: list[tuple[Space, int, int, bool]], probes: list[tuple[Space, int]]
) -> None:
    table = RangeTable()
    for space, start, length, async_write in wanted:
        if table.lookup(space, start) is None and table.lookup(space, start + length - 1) is None:
            try:
                table.reserve(space, start, length, async_write)
            except Exception:  # an overlap in between: skip it
                continue
    ranges = list(table.ranges())
    array = (hotpath.Range * max(1, len(ranges)))(
        *(hotpath.Range(r.start, r.length, r.space, r.async_write) for r in ranges)
    )
    for space, address in [*probes, *((r.space, r.start) for r in ranges)]:
        index = int(hotpath.library.vms_find_range(array, len(ranges), space, address))
        expected = table.lookup(space, address)
        assert (ranges[index] if index >= 0 else None) == expected


# -- bells ------------------------------------------------------------------------------------


@pytest.fixture
def region() -> Iterator[SharedRegion]:
    shared = SharedRegion.create(1)
    try:
        yield shared
    finally:
        shared.close()


def wait_until_sleeping(mailbox: Mailbox, which: int) -> None:
    """Until the bell's waiter sleeps on its eventfd (it has polled and given up)."""
    deadline = time.monotonic() + 30
    while not mailbox.bell_sleeping(which):
        assert time.monotonic() < deadline, "the waiter never went to sleep"
        time.sleep(0.001)


@pytest.mark.parametrize("spin_ns", [0, 200_000])
def test_a_bell_wakes_its_waiter_in_another_thread(region: SharedRegion, spin_ns: int) -> None:
    mailbox = region.mailbox(0)
    with Doorbell(mailbox, spin_ns=spin_ns) as bell:
        # Rung before the wait, or (most likely) while it polls: no sleep needed.
        for ringer in (None, threading.Thread(target=bell.ring_request)):
            if ringer is None:
                bell.ring_request()
            else:
                ringer.start()
            assert bell.wait_request() == 1
            if ringer is not None:
                ringer.join()
        # Rung once the waiter sleeps: the ring must write its eventfd.
        got: list[int] = []
        waiter = threading.Thread(target=lambda: got.append(bell.wait_request()))
        waiter.start()
        try:
            wait_until_sleeping(mailbox, 0)
        finally:
            bell.ring_request()
            waiter.join(30)
        assert got == [1]
        assert not mailbox.bell_sleeping(0)


def test_a_bell_wakes_a_sleeping_waiter_in_another_process(region: SharedRegion) -> None:
    mailbox = region.mailbox(0)
    with Doorbell(mailbox) as bell:
        pid = os.fork()
        if pid == 0:
            try:
                bell.wait_request()
                bell.ring_done()
            finally:
                os._exit(0)
        try:
            wait_until_sleeping(mailbox, 0)
        finally:
            bell.ring_request()
        assert bell.wait_done() == 1
        assert os.waitpid(pid, 0)[1] == 0


def _on_usr2(signum: int, frame: FrameType | None) -> None:
    _on_usr2.calls += 1  # type: ignore[attr-defined]


_on_usr2.calls = 0  # type: ignore[attr-defined]


@pytest.fixture
def usr2_handler() -> Iterator[None]:
    previous = signal.signal(signal.SIGUSR2, _on_usr2)
    try:
        yield
    finally:
        signal.signal(signal.SIGUSR2, previous)
        hotpath.take_signal()


def test_a_signal_while_a_bell_sleeps_interrupts_it(
    region: SharedRegion, usr2_handler: None
) -> None:
    with Doorbell(region.mailbox(0)) as bell:
        sender = threading.Timer(0.02, os.kill, (os.getpid(), signal.SIGUSR2))
        sender.start()
        with pytest.raises(InterruptedError):
            hotpath.bell_wait(bell.request_bell, bell.fds()[0], bell.request_seen, 0)
        sender.join()


def test_a_signal_before_the_sleep_is_not_slept_through(
    region: SharedRegion, usr2_handler: None
) -> None:
    """A watched signal that came while nothing could be interrupted (here: before the call)
    still ends the wait, through the wake-up pipe or the noted flag."""
    calls = _on_usr2.calls  # type: ignore[attr-defined]
    hotpath.watch_signal(signal.SIGUSR2)
    with Doorbell(region.mailbox(0)) as bell:
        read_end, write_end = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        previous = signal.set_wakeup_fd(write_end, warn_on_full_buffer=False)
        try:
            signal.pthread_kill(threading.get_ident(), signal.SIGUSR2)
            assert _on_usr2.calls == calls + 1  # type: ignore[attr-defined]  # Python's handler ran
            for wake_fd in (read_end, -1):  # the pipe, then the flag alone
                with pytest.raises(InterruptedError):
                    hotpath.bell_wait(
                        bell.request_bell, bell.fds()[0], bell.request_seen, 0, wake_fd
                    )
            assert hotpath.take_signal()
            assert not hotpath.take_signal()
            drain_wakeup_pipe(read_end)
            bell.ring_request()
            hotpath.bell_wait(bell.request_bell, bell.fds()[0], bell.request_seen, 0, read_end)
        finally:
            hotpath.unwatch_signal(signal.SIGUSR2)
            signal.set_wakeup_fd(previous)
            os.close(read_end)
            os.close(write_end)


def _sigaction_handler(signum: int) -> int:
    """The address of the handler the kernel would call for `signum` (0: SIG_DFL, 1: SIG_IGN)."""
    libc = ctypes.CDLL(None, use_errno=True)
    action = (ctypes.c_char * 256)()  # struct sigaction: the handler first, the rest unread
    assert libc.sigaction(signum, None, action) == 0, ctypes.get_errno()
    return ctypes.c_void_p.from_buffer(action).value or 0


def test_a_watched_signal_can_be_unwatched(usr2_handler: None) -> None:
    """The engine's handler in front of Python's is global state: unwatching puts back
    exactly what was there, and the signal reaches Python's handler alone again."""
    pythons = _sigaction_handler(signal.SIGUSR2)
    hotpath.watch_signal(signal.SIGUSR2)
    hotpath.watch_signal(signal.SIGUSR2)  # twice: still one handler in front
    try:
        assert _sigaction_handler(signal.SIGUSR2) != pythons
        calls = _on_usr2.calls  # type: ignore[attr-defined]
        signal.pthread_kill(threading.get_ident(), signal.SIGUSR2)
        assert _on_usr2.calls == calls + 1  # type: ignore[attr-defined]
        assert hotpath.take_signal()
    finally:
        hotpath.unwatch_signal(signal.SIGUSR2)
    assert _sigaction_handler(signal.SIGUSR2) == pythons
    signal.pthread_kill(threading.get_ident(), signal.SIGUSR2)
    assert _on_usr2.calls == calls + 2  # type: ignore[attr-defined]
    assert not hotpath.take_signal()  # no longer noted
    hotpath.unwatch_signal(signal.SIGUSR2)  # unwatching what is not watched changes nothing
    assert _sigaction_handler(signal.SIGUSR2) == pythons
