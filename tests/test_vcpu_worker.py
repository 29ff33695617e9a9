"""The VCPU worker's loops against a fake runner and channel (no KVM, no fork).

The fake runner writes each scripted exit into an anonymous page laid out as `kvm_run`, the
way KVM would, so the exits this host cannot produce (Hyper-V, failed entry...) are covered.
"""

from __future__ import annotations

import ctypes
import errno
import gc
import mmap
import struct
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from vmsuper.shared import kvm
from vmsuper.shared.plugin_pb2 import VcpuRequest, VcpuResponse
from vmsuper.shared.ranges import RangeTable, Space
from vmsuper.shared.shm import SharedRegion
from vmsuper.workers.vcpu_channel import Refused
from vmsuper.workers.vcpu_protocol import CallFailed
from vmsuper.workers.vcpu_worker import (
    VcpuWorker,
    WorkerStatus,
    describe_exit,
    hcall_result_offset,
)

PAGE = 3 * mmap.PAGESIZE
IO_DATA = mmap.PAGESIZE


class Log:
    def __init__(self) -> None:
        self.records: list[tuple[str, str, dict[str, Any]]] = []

    def __getattr__(self, level: str) -> Callable[..., None]:
        def record(event: str, **fields: Any) -> None:
            self.records.append((level, event, fields))

        return record


class FakeChannel:
    def __init__(self, *requests: VcpuRequest | bytes | Refused | None) -> None:
        self.requests: deque[VcpuRequest | bytes | Refused | None] = deque(requests)
        self.sent: list[VcpuResponse] = []

    def fds(self) -> tuple[int, ...]:
        return ()

    def receive(self) -> bytes | None:
        if not self.requests:
            return None  # the plugin hung up
        request = self.requests.popleft()
        if isinstance(request, Refused):
            raise request
        if isinstance(request, VcpuRequest):
            return request.SerializeToString()
        return request

    def send(self, data: bytes) -> None:
        self.sent.append(VcpuResponse.FromString(data))


Step = Callable[[kvm.kvm_run], int]


class FakeRunner:
    def __init__(self, run: kvm.kvm_run, steps: list[Step]) -> None:
        self.runs = run
        self.steps = deque(steps)
        self.regs = kvm.kvm_regs(rip=0x1234)

    def run(self) -> int:
        assert self.steps, "the worker ran the guest more often than scripted"
        return self.steps.popleft()(self.runs)

    def call(self, request: int, arg: bytes | bytearray) -> tuple[int, bytes]:
        if request == kvm.KVM_GET_REGS:
            return 0, bytes(self.regs)
        if request == kvm.KVM_SET_REGS:
            self.regs = kvm.kvm_regs.from_buffer_copy(arg)
            return 0, bytes(arg)
        raise CallFailed(errno.ENOTTY, request)


def io_exit(port: int, is_write: bool, data: bytes) -> Step:
    def step(run: kvm.kvm_run) -> int:
        run.exit_reason = kvm.KVM_EXIT_IO
        run.io.direction = kvm.KVM_EXIT_IO_OUT if is_write else kvm.KVM_EXIT_IO_IN
        run.io.size, run.io.count, run.io.port, run.io.data_offset = len(data), 1, port, IO_DATA
        ctypes.memmove(ctypes.addressof(run) + IO_DATA, data, len(data))
        return 0

    return step


def hcall_exit(input_: int, params0: int, params1: int) -> Step:
    def step(run: kvm.kvm_run) -> int:
        run.exit_reason = kvm.KVM_EXIT_HYPERV
        run.hyperv.type = kvm.KVM_EXIT_HYPERV_HCALL
        hcall = run.hyperv.u.hcall
        hcall.input, hcall.result = input_, 0xFFFF
        hcall.params[0], hcall.params[1] = params0, params1
        return 0

    return step


def synic_exit(msr: int, control: int, evt_page: int, msg_page: int) -> Step:
    def step(run: kvm.kvm_run) -> int:
        run.exit_reason = kvm.KVM_EXIT_HYPERV
        run.hyperv.type = kvm.KVM_EXIT_HYPERV_SYNIC
        synic = run.hyperv.u.synic
        synic.msr, synic.control, synic.evt_page, synic.msg_page = msr, control, evt_page, msg_page
        return 0

    return step


def reason(exit_reason: int, **fields: int) -> Step:
    def step(run: kvm.kvm_run) -> int:
        run.exit_reason = exit_reason
        if exit_reason == kvm.KVM_EXIT_INTERNAL_ERROR:
            run.internal.suberror = fields["suberror"]
            run.internal.ndata = 1
            run.internal.data[0] = 0xAB
        if exit_reason == kvm.KVM_EXIT_FAIL_ENTRY:
            run.fail_entry.hardware_entry_failure_reason = fields["hw"]
        return 0

    return step


def fails(code: int, before: Callable[[], None] | None = None) -> Step:
    def step(run: kvm.kvm_run) -> int:
        if before is not None:
            before()
        return code

    return step


class Rig:
    def __init__(self) -> None:
        self.region = SharedRegion.create(1)
        table = RangeTable()
        table.reserve(Space.IOPORT, 0x3F8, 8)
        table.reserve(Space.IOPORT, 0x80, 1, async_write=True)
        self.region.table.publish(table, None)
        self.mapping = mmap.mmap(-1, PAGE)
        self.run = kvm.kvm_run.from_buffer(self.mapping)
        self.page = memoryview(self.mapping)
        self.log = Log()
        self.workers: list[VcpuWorker] = []

    def worker(self, channel: FakeChannel, steps: list[Step]) -> tuple[VcpuWorker, FakeRunner]:
        runner = FakeRunner(self.run, steps)
        worker = VcpuWorker(
            vcpu=0,
            channel=channel,
            calls=runner,
            slot=self.region.slot(0),
            ranges=self.region.reader(),
            page=self.page,
            run=self.run,
            log=self.log,
            debug=True,
        )
        self.workers.append(worker)
        return worker, runner

    def close(self) -> None:
        while self.workers:
            self.workers.pop().release()
        self.page.release()
        del self.run
        gc.collect()  # a raised Refused and its traceback form a cycle that reaches the run page
        self.mapping.close()
        self.region.close()


@pytest.fixture
def rig() -> Iterator[Rig]:
    r = Rig()
    yield r
    r.close()


WAIT = VcpuRequest(wait=VcpuRequest.Wait())


def resume(data: bytes = b"", **kwargs: bytes) -> VcpuRequest:
    return VcpuRequest(resume=VcpuRequest.Resume(data=data, **kwargs))


def serve(rig: Rig, channel: FakeChannel, steps: list[Step]) -> tuple[WorkerStatus, VcpuWorker]:
    worker, runner = rig.worker(channel, steps)
    status = worker.serve()
    assert not runner.steps, "scripted exits left over"
    return status, worker


def test_hypercall_result_goes_into_the_run_page(rig: Rig) -> None:
    channel = FakeChannel(WAIT, resume(), resume(struct.pack("<Q", 0x1122_3344_5566_7788)))
    status, _ = serve(rig, channel, [hcall_exit(0x10, 1, 2), reason(kvm.KVM_EXIT_SHUTDOWN)])
    assert status == WorkerStatus.GUEST_SHUTDOWN
    call = channel.sent[1].wait.hyperv_call
    assert (call.input, call.params0, call.params1) == (0x10, 1, 2)
    assert rig.run.hyperv.u.hcall.result == 0x1122_3344_5566_7788
    offset = hcall_result_offset(rig.run)
    assert struct.unpack_from("<Q", rig.page, offset) == (0x1122_3344_5566_7788,)
    assert rig.region.slot(0).counters()["hyperv"] == 1


def test_synic_exit(rig: Rig) -> None:
    channel = FakeChannel(WAIT, resume(), resume())
    steps = [synic_exit(0x40000080, 3, 0x5000, 0x6000), reason(kvm.KVM_EXIT_HLT)]
    status, _ = serve(rig, channel, steps)
    assert status == WorkerStatus.HALTED
    synic = channel.sent[1].wait.hyperv_synic
    assert (synic.msr, synic.control, synic.evt_page, synic.msg_page) == (
        0x40000080,
        3,
        0x5000,
        0x6000,
    )


def test_reserved_read_answer_lands_at_the_data_offset(rig: Rig) -> None:
    channel = FakeChannel(WAIT, resume(), resume(b"\x42\x43"))
    steps = [io_exit(0x3F9, False, b"\0\0"), reason(kvm.KVM_EXIT_HLT)]
    status, worker = serve(rig, channel, steps)
    assert status == WorkerStatus.HALTED
    assert channel.sent[1].wait.io.data == b"\0\0"
    assert bytes(rig.page[IO_DATA : IO_DATA + 2]) == b"\x42\x43"
    assert worker.protocol.range_count_labels() == {"ioport:0x3f8+8": 1}


def test_pause_clears_immediate_exit_and_spurious_kicks_run_again(rig: Rig) -> None:
    slot = rig.region.slot(0)

    def kick() -> None:
        rig.run.immediate_exit = 1

    def pause() -> None:
        slot.request_pause(99)
        rig.run.immediate_exit = 1

    channel = FakeChannel(WAIT, resume(), resume())
    steps = [fails(errno.EINTR, kick), fails(errno.EAGAIN), fails(errno.EINTR, pause)]
    status, _ = serve(rig, channel, [*steps, reason(kvm.KVM_EXIT_HLT)])
    assert status == WorkerStatus.HALTED
    assert [r.wait.WhichOneof("exit") for r in channel.sent] == ["init", "user"]
    assert channel.sent[1].wait.user.user == 99
    assert rig.run.immediate_exit == 0
    assert slot.counters()["user"] == 1


def test_async_write_goes_on_without_reading(rig: Rig) -> None:
    channel = FakeChannel(WAIT, resume())
    steps = [io_exit(0x80, True, b"\x07"), io_exit(0x80, True, b"\x08")]
    steps.append(reason(kvm.KVM_EXIT_SHUTDOWN))
    status, _ = serve(rig, channel, steps)
    assert status == WorkerStatus.GUEST_SHUTDOWN
    assert [(r.wait.io.no_resume, r.wait.io.data) for r in channel.sent[1:]] == [
        (True, b"\x07"),
        (True, b"\x08"),
    ]
    assert rig.region.slot(0).counters()["async_write"] == 2


@pytest.mark.parametrize(
    ("step", "status", "words"),
    [
        (reason(kvm.KVM_EXIT_SHUTDOWN), WorkerStatus.GUEST_SHUTDOWN, "triple fault"),
        (
            reason(kvm.KVM_EXIT_INTERNAL_ERROR, suberror=1),
            WorkerStatus.INTERNAL_ERROR,
            "suberror 1",
        ),
        (reason(kvm.KVM_EXIT_FAIL_ENTRY, hw=0x21), WorkerStatus.FAILED_ENTRY, "0x21"),
        (reason(kvm.KVM_EXIT_HLT), WorkerStatus.HALTED, "halted"),
        (reason(kvm.KVM_EXIT_DEBUG), WorkerStatus.UNHANDLED_EXIT, "exit reason 4"),
        (fails(errno.EFAULT), WorkerStatus.RUN_FAILED, "Errno 14"),
    ],
)
def test_fatal_exits_stop_with_their_status(
    rig: Rig, step: Step, status: WorkerStatus, words: str
) -> None:
    channel = FakeChannel(WAIT, resume())
    got, worker = serve(rig, channel, [step])
    assert got == status
    assert words in worker.stop_reason
    assert rig.region.slot(0).stop_reason == worker.stop_reason
    level, event, fields = rig.log.records[-1]
    assert (level, event, fields["status"]) == ("error", "stopped", int(status))
    if status != WorkerStatus.RUN_FAILED:
        assert fields["rip"] == "0x1234"
    described = describe_exit(0, int(status) << 8, worker.stop_reason)
    assert described is not None and f"status {int(status)}" in described


def test_resume_with_misfit_regs_stops_the_vcpu(rig: Rig) -> None:
    channel = FakeChannel(WAIT, resume(regs=b"short"))
    status, worker = serve(rig, channel, [])
    assert status == WorkerStatus.PLUGIN_FAILURE
    assert "regs" in worker.stop_reason


def test_refused_requests_get_an_errno_and_serving_goes_on(rig: Rig) -> None:
    get_mp = VcpuRequest(get_state=VcpuRequest.GetState(set=VcpuRequest.MP))
    channel = FakeChannel(
        Refused(get_mp.SerializeToString(), errno.EINVAL, "came with fds"),
        Refused(None, errno.EMSGSIZE, "too large"),
        WAIT,
    )
    status, _ = serve(rig, channel, [])
    assert status == WorkerStatus.CLEAN
    first, second, third = channel.sent
    assert (first.errno, first.WhichOneof("message")) == (errno.EINVAL, "get_state")
    assert (second.errno, second.WhichOneof("message")) == (errno.EMSGSIZE, None)
    assert third.wait.WhichOneof("exit") == "init"


def test_shutdown_request_is_a_clean_stop(rig: Rig) -> None:
    channel = FakeChannel(WAIT, VcpuRequest(shutdown=VcpuRequest.Shutdown()))
    status, worker = serve(rig, channel, [])
    assert status == WorkerStatus.CLEAN
    assert worker.stop_reason == "the plugin sent Shutdown"


def test_describe_exit() -> None:
    assert describe_exit(3, 0) is None
    killed = describe_exit(3, 9)  # the wait status of a process killed by signal 9
    assert killed == "VCPU 3 worker was killed by signal 9 (SIGKILL)"
    text = describe_exit(1, 14 << 8, "write failed: EIO")
    assert text == "VCPU 1 worker exited with status 14 (plugin channel failure: write failed: EIO)"
