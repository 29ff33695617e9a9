"""The VCPU worker and its exit engine against a fake runner and a fake plugin (no KVM, no
fork).

The engine is the real one (`hotpath.vms_worker_loop`) over a real shared region, doorbell
and socket; the fake runner is a thread that answers the doorbell the way the supervisor's
runner does, and for each KVM_RUN writes the next scripted exit into an anonymous page laid
out as `kvm_run`, the way KVM would. So the exits this host cannot produce (Hyper-V, failed
entry...) are covered, and the engine's decisions are checked against the protocol oracle
(tests/protocol_driver.py).
"""

from __future__ import annotations

import ctypes
import errno
import gc
import mmap
import os
import signal
import socket
import struct
import threading
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import pytest
from fuzz.protocol_driver import DrivenProtocol
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vmsuper.shared import kvm
from vmsuper.shared.plugin_pb2 import VcpuRequest, VcpuResponse
from vmsuper.shared.ranges import CallHint, Range, RangeTable, RegHint, Space
from vmsuper.shared.shm import SharedRegion
from vmsuper.shared.shm_doorbell import Doorbell
from vmsuper.shared.shm_mailbox import OP_RUN
from vmsuper.workers.exit_engine import ExitEngine
from vmsuper.workers.mailbox_calls import MailboxCalls
from vmsuper.workers.vcpu_channel import VcpuChannel
from vmsuper.workers.vcpu_protocol import Phase
from vmsuper.workers.vcpu_worker import VcpuWorker, hcall_result_offset
from vmsuper.workers.worker_process import WorkerSignals
from vmsuper.workers.worker_status import WorkerStatus, describe_exit

PAGE = 3 * mmap.PAGESIZE
IO_DATA = mmap.PAGESIZE
SERIAL = Range(Space.IOPORT, 0x3F8, 8)
ASYNC = Range(Space.IOPORT, 0x80, 1, async_write=True)
MMIO = Range(Space.MMIO, 0xD000_0000, 0x1000)


class Log:
    def __init__(self) -> None:
        self.records: list[tuple[str, str, dict[str, Any]]] = []

    def __getattr__(self, level: str) -> Callable[..., None]:
        def record(event: str, **fields: Any) -> None:
            self.records.append((level, event, fields))

        return record


Step = Callable[[kvm.kvm_run], int]
REGS = kvm.kvm_regs(rip=0x1234, rax=1)


class FakeRunner:
    """The supervisor's runner thread, scripted: each KVM_RUN takes the next step."""

    def __init__(self, region: SharedRegion, doorbell: Doorbell, run: kvm.kvm_run) -> None:
        self.mailbox = region.mailbox(0)
        self.doorbell = doorbell
        self.run = run
        self.steps: deque[Step] = deque()
        self.overrun = False
        self.calls: list[int] = []
        self._stop = False
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def start(self, steps: list[Step]) -> None:
        self.steps.extend(steps)
        self._thread.start()

    def stop(self) -> None:
        self._stop = True
        self.doorbell.ring_request()
        self._thread.join(10)

    def _serve(self) -> None:
        mailbox = self.mailbox
        while True:
            self.doorbell.wait_request()
            if self._stop:
                return
            op, length = mailbox.request()
            if op == OP_RUN:
                if self.steps:
                    err = self.steps.popleft()(self.run)
                else:  # the worker ran the guest more often than scripted
                    self.overrun = True
                    err = reason(kvm.KVM_EXIT_SHUTDOWN)(self.run)
                mailbox.complete(-1 if err else 0, err)
            else:
                self.calls.append(op)
                if op == kvm.KVM_GET_REGS:
                    mailbox.arg_view()[:length] = bytes(REGS)
                    mailbox.complete(0, 0)
                elif op in (kvm.KVM_GET_SREGS, kvm.KVM_GET_DEBUGREGS):
                    mailbox.arg_view()[:length] = b"\x5a" * length
                    mailbox.complete(0, 0)
                else:
                    mailbox.complete(-1, errno.ENOTTY)
            self.doorbell.ring_done()


def io_exit(port: int, is_write: bool, data: bytes, count: int = 1) -> Step:
    def step(run: kvm.kvm_run) -> int:
        run.exit_reason = kvm.KVM_EXIT_IO
        run.io.direction = kvm.KVM_EXIT_IO_OUT if is_write else kvm.KVM_EXIT_IO_IN
        run.io.size, run.io.count = len(data) // count, count
        run.io.port, run.io.data_offset = port, IO_DATA
        ctypes.memmove(ctypes.addressof(run) + IO_DATA, data, len(data))
        return 0

    return step


def mmio_exit(address: int, is_write: bool, data: bytes) -> Step:
    def step(run: kvm.kvm_run) -> int:
        run.exit_reason = kvm.KVM_EXIT_MMIO
        run.mmio.phys_addr, run.mmio.len, run.mmio.is_write = address, len(data), is_write
        ctypes.memmove(ctypes.addressof(run.mmio.data), data.ljust(8, b"\0"), 8)
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


Request = VcpuRequest | bytes | tuple[VcpuRequest, int]
"""A request the fake plugin sends: a message, raw bytes, or a message with that many fds."""


class Rig:
    def __init__(self, *ranges: Range, hint: CallHint | None = None) -> None:
        self.region = SharedRegion.create(1)
        self.table = RangeTable()
        for rng in ranges or (SERIAL, ASYNC, MMIO):
            self.table.reserve(rng.space, rng.start, rng.length, rng.async_write)
        self.region.table.publish(self.table, hint)
        self.mapping = mmap.mmap(-1, PAGE)
        self.run = kvm.kvm_run.from_buffer(self.mapping)
        self.page = memoryview(self.mapping)
        self.log = Log()
        self.doorbell = Doorbell(self.region.mailbox(0))
        self.runner = FakeRunner(self.region, self.doorbell, self.run)
        self.plugin, worker_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.worker_fd = worker_end.detach()
        engine = ExitEngine(
            run_address=ctypes.addressof(self.run),
            run_size=PAGE,
            mailbox=self.region.mailbox(0),
            doorbell=self.doorbell,
            slot=self.region.slot(0),
            reader=self.region.reader(),
            channel=VcpuChannel((self.worker_fd,)),
            range_counts=self.region.range_counts(0),
            report_exits=True,
        )
        self.worker = VcpuWorker(
            vcpu=0,
            engine=engine,
            calls=MailboxCalls(self.region.mailbox(0), self.doorbell),
            slot=self.region.slot(0),
            run=self.run,
            log=self.log,
            debug=True,
        )
        self.sent: list[VcpuResponse] = []

    def serve(self, requests: Sequence[Request], steps: list[Step]) -> WorkerStatus:
        """Queue the plugin's requests (then its hang-up), run the worker to its end."""
        sender = threading.Thread(target=self._send_all, args=(requests,), daemon=True)
        sender.start()
        self.runner.start(steps)
        try:
            status = self.worker.serve()
        finally:
            self.runner.stop()
            sender.join(10)
        assert not self.runner.overrun, "the worker ran the guest more often than scripted"
        assert not self.runner.steps, "scripted exits left over"
        self.plugin.setblocking(False)
        while True:
            try:
                data = self.plugin.recv(1 << 20)
            except BlockingIOError:
                break
            if not data:
                break
            self.sent.append(VcpuResponse.FromString(data))
        return status

    def _send_all(self, requests: Sequence[Request]) -> None:
        for request in requests:
            fds = 0
            if isinstance(request, tuple):
                request, fds = request
            data = request if isinstance(request, bytes) else request.SerializeToString()
            if fds:
                with open("/dev/null", "rb") as null:
                    socket.send_fds(self.plugin, [data], [null.fileno()] * fds)
            else:
                self.plugin.send(data)
        self.plugin.shutdown(socket.SHUT_WR)  # the plugin is done: the worker sees a hang-up

    def exit_records(self) -> list[dict[str, Any]]:
        return [f for level, event, f in self.log.records if event == "exit"]

    def close(self) -> None:
        self.plugin.close()
        os.close(self.worker_fd)
        self.doorbell.close()
        self.page.release()
        del self.worker, self.runner, self.run
        gc.collect()  # exceptions and their tracebacks may still reach the run page
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


def test_hypercall_result_goes_into_the_run_page(rig: Rig) -> None:
    requests = [WAIT, resume(), resume(struct.pack("<Q", 0x1122_3344_5566_7788))]
    status = rig.serve(requests, [hcall_exit(0x10, 1, 2), reason(kvm.KVM_EXIT_SHUTDOWN)])
    assert status == WorkerStatus.GUEST_SHUTDOWN
    call = rig.sent[1].wait.hyperv_call
    assert (call.input, call.params0, call.params1) == (0x10, 1, 2)
    assert rig.run.hyperv.u.hcall.result == 0x1122_3344_5566_7788
    offset = hcall_result_offset(rig.run)
    assert struct.unpack_from("<Q", rig.page, offset) == (0x1122_3344_5566_7788,)
    assert rig.region.slot(0).counters()["hyperv"] == 1


def test_synic_exit(rig: Rig) -> None:
    steps = [synic_exit(0x40000080, 3, 0x5000, 0x6000), reason(kvm.KVM_EXIT_HLT)]
    status = rig.serve([WAIT, resume(), resume()], steps)
    assert status == WorkerStatus.HALTED
    synic = rig.sent[1].wait.hyperv_synic
    assert (synic.msr, synic.control, synic.evt_page, synic.msg_page) == (
        0x40000080,
        3,
        0x5000,
        0x6000,
    )


def test_reserved_read_answer_lands_at_the_data_offset(rig: Rig) -> None:
    steps = [io_exit(0x3F9, False, b"\xee\xee"), reason(kvm.KVM_EXIT_HLT)]
    status = rig.serve([WAIT, resume(), resume(b"\x42\x43")], steps)
    assert status == WorkerStatus.HALTED
    assert rig.sent[1].wait.io.data == b"\0\0"
    assert bytes(rig.page[IO_DATA : IO_DATA + 2]) == b"\x42\x43"
    assert rig.worker.engine.range_counts() == {"ioport:0x3f8+8": 1}
    [record] = rig.exit_records()
    assert record["data"] == "4243" and record["forwarded"] is True
    assert record["port"] == "0x3f9" and (record["size"], record["count"]) == (2, 1)
    assert isinstance(record["response_us"], float)


def test_a_reply_that_is_another_request_is_served_then_resumes_the_access(rig: Rig) -> None:
    get_regs = VcpuRequest(get_state=VcpuRequest.GetState(set=VcpuRequest.REGS))
    steps = [mmio_exit(0xD000_0010, False, b"\xee" * 4), reason(kvm.KVM_EXIT_HLT)]
    status = rig.serve([WAIT, resume(), get_regs, resume(b"\x01\x02")], steps)
    assert status == WorkerStatus.HALTED
    assert rig.sent[2].get_state.state == bytes(REGS)
    assert bytes(rig.run.mmio.data[:4]) == b"\x01\x02\x00\x00"
    [record] = rig.exit_records()
    assert (record["kind"], record["address"], record["length"]) == ("mmio", "0xd0000010", 4)
    assert record["data"] == "01020000" and isinstance(record["response_us"], float)
    assert rig.region.slot(0).reading().responses == 1


def test_a_refused_reply_is_answered_and_the_access_still_waits(rig: Rig) -> None:
    get_mp = VcpuRequest(get_state=VcpuRequest.GetState(set=VcpuRequest.MP))
    steps = [io_exit(0x3F8, False, b"\xee"), reason(kvm.KVM_EXIT_HLT)]
    status = rig.serve([WAIT, resume(), (get_mp, 1), resume(b"\x07")], steps)
    assert status == WorkerStatus.HALTED
    refused = rig.sent[2]
    assert (refused.errno, refused.WhichOneof("message")) == (errno.EINVAL, "get_state")
    assert bytes(rig.page[IO_DATA : IO_DATA + 1]) == b"\x07"


def test_pause_clears_immediate_exit_and_spurious_kicks_run_again(rig: Rig) -> None:
    slot = rig.region.slot(0)

    def kick() -> None:
        rig.run.immediate_exit = 1

    def pause() -> None:
        slot.request_pause(99)
        rig.run.immediate_exit = 1

    steps = [fails(errno.EINTR, kick), fails(errno.EAGAIN), fails(errno.EINTR, pause)]
    status = rig.serve([WAIT, resume(), resume()], [*steps, reason(kvm.KVM_EXIT_HLT)])
    assert status == WorkerStatus.HALTED
    assert [r.wait.WhichOneof("exit") for r in rig.sent] == ["init", "user"]
    assert rig.sent[1].wait.user.user == 99
    assert rig.run.immediate_exit == 0
    assert slot.counters()["user"] == 1


def test_async_write_goes_on_without_reading(rig: Rig) -> None:
    steps = [io_exit(0x80, True, b"\x07"), io_exit(0x80, True, b"\x08")]
    steps.append(reason(kvm.KVM_EXIT_SHUTDOWN))
    status = rig.serve([WAIT, resume()], steps)
    assert status == WorkerStatus.GUEST_SHUTDOWN
    assert [(r.wait.io.no_resume, r.wait.io.data) for r in rig.sent[1:]] == [
        (True, b"\x07"),
        (True, b"\x08"),
    ]
    assert rig.region.slot(0).counters()["async_write"] == 2
    assert [r["response_us"] for r in rig.exit_records()] == [None, None]


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
    got = rig.serve([WAIT, resume()], [step])
    worker = rig.worker
    assert got == status
    assert words in worker.stop_reason
    assert rig.region.slot(0).stop_reason == worker.stop_reason
    level, event, fields = rig.log.records[-1]
    assert (level, event, fields["status"]) == ("error", "stopped", int(status))
    if status != WorkerStatus.RUN_FAILED:
        assert fields["rip"] == "0x1234"
    described = describe_exit(int(status) << 8, worker.stop_reason)
    assert described is not None and f"status {int(status)}" in described


def test_resume_with_misfit_regs_stops_the_vcpu(rig: Rig) -> None:
    status = rig.serve([WAIT, resume(regs=b"short")], [])
    assert status == WorkerStatus.PLUGIN_FAILURE
    assert "regs" in rig.worker.stop_reason


def test_refused_requests_get_an_errno_and_serving_goes_on(rig: Rig) -> None:
    get_mp = VcpuRequest(get_state=VcpuRequest.GetState(set=VcpuRequest.MP))
    status = rig.serve([(get_mp, 1), (get_mp, 5), WAIT], [])
    assert status == WorkerStatus.CLEAN
    first, second, third = rig.sent
    assert (first.errno, first.WhichOneof("message")) == (errno.EINVAL, "get_state")
    assert (second.errno, second.WhichOneof("message")) == (errno.EINVAL, None)  # too many fds
    assert third.wait.WhichOneof("exit") == "init"


def test_shutdown_request_is_a_clean_stop(rig: Rig) -> None:
    status = rig.serve([WAIT, VcpuRequest(shutdown=VcpuRequest.Shutdown())], [])
    assert status == WorkerStatus.CLEAN
    assert rig.worker.stop_reason == "the plugin sent Shutdown"


def test_the_worker_signals_are_taken_back_as_they_were() -> None:
    """A worker's signal handling is process-wide state: `uninstall` restores every handler,
    the wake-up fd and the handler the engine put in front of Python's."""
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    signals = WorkerSignals()
    signals.install()
    try:
        assert signal.getsignal(signal.SIGTERM) not in (before[signal.SIGTERM], None)
        assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN
        assert signals.wake_read >= 0
    finally:
        signals.uninstall()
    assert {s: signal.getsignal(s) for s in before} == before
    assert signals.wake_read == -1
    assert signal.set_wakeup_fd(-1) == -1  # none was set, and none is now


def test_describe_exit() -> None:
    assert describe_exit(0) is None
    killed = describe_exit(9)  # the wait status of a process killed by signal 9
    assert killed == "worker was killed by signal 9 (SIGKILL)"
    text = describe_exit(14 << 8, "write failed: EIO")
    assert text == "worker exited with status 14 (plugin channel failure: write failed: EIO)"


# -- the engine against the protocol oracle -------------------------------------------------

HINT = CallHint(
    Space.IOPORT, 0x3F8, on_write=True, hints=(RegHint(match_rax=True, rax=1, send_sregs=True),)
)


class FakeVcpu:
    def call(self, request: int, arg: bytes | bytearray) -> tuple[int, bytes]:
        if request == kvm.KVM_GET_REGS:
            return 0, bytes(REGS)
        return 0, b"\x5a" * len(arg)


class TableRanges:
    def __init__(self, table: RangeTable, hint: CallHint | None) -> None:
        self.table = table
        self.hint = hint

    def lookup(self, space: Space, addr: int) -> Range | None:
        return self.table.lookup(space, addr)


ACCESSES = st.lists(
    st.tuples(
        st.sampled_from(
            [(Space.IOPORT, a) for a in (0x3F8, 0x3FF, 0x400, 0x80, 0x60)]
            + [(Space.MMIO, a) for a in (0xD000_0000, 0xD000_0FFF, 0xD000_1000, 0x3F8)]
        ),
        st.booleans(),
        st.binary(min_size=1, max_size=8),
    ),
    min_size=1,
    max_size=6,
)


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(accesses=ACCESSES, hinted=st.booleans())
def test_the_engine_decides_each_access_as_the_oracle(
    accesses: list[tuple[tuple[Space, int], bool, bytes]], hinted: bool
) -> None:
    """Any sequence of accesses: the engine sends what the oracle sends, leaves the data the
    oracle leaves, and counts per range what the oracle counts."""
    hint = HINT if hinted else None
    rig = Rig(SERIAL, ASYNC, MMIO, hint=hint)
    try:
        oracle = DrivenProtocol(FakeVcpu(), TableRanges(rig.table, hint))
        oracle.receive_request(WAIT.SerializeToString())
        oracle.receive_request(resume().SerializeToString())
        requests: list[Request] = [WAIT, resume()]
        steps: list[Step] = []
        expected: list[bytes] = []
        answers: list[bytes] = []
        for (space, address), is_write, data in accesses:
            if space == Space.MMIO:
                steps.append(mmio_exit(address, is_write, data))
            else:
                steps.append(io_exit(address, is_write, data, count=len(data)))
            area = bytearray(data)
            answer = oracle.io_access(space, address, is_write, area)
            if answer is None:
                answers.append(bytes(area))
                continue
            expected.append(answer)
            if oracle.phase is Phase.SERVING:
                reply = bytes(reversed(data))
                requests.append(resume(reply))
                oracle.receive_request(resume(reply).SerializeToString())
            answers.append(bytes(area))
        steps.append(reason(kvm.KVM_EXIT_HLT))
        assert rig.serve(requests, steps) == WorkerStatus.HALTED
        assert [r.SerializeToString() for r in rig.sent[1:]] == [
            VcpuResponse.FromString(e).SerializeToString() for e in expected
        ]
        records = rig.exit_records()
        assert [bytes.fromhex(r["data"]) for r in records] == answers
        labels = {
            f"{r.space.name.lower()}:{r.start:#x}+{r.length}": n
            for r, n in oracle.range_counts.items()
        }
        assert rig.worker.engine.range_counts() == labels
    finally:
        rig.close()
