"""VcpuSet against real KVM: forked VCPU workers, runner threads, and a plugin played by the
test itself, speaking raw protobuf over the channel ends (both transports).

Guests run in real mode at 0x1000 (CS = DS = 0), except the triple-fault one (protected mode
with an empty IDT: `ud2` cannot be delivered). Ports 0x3f8..0x3ff and MMIO 0xd0000..0xd0fff
are reserved, port 0x80 is reserved for async writes; 0x60/0x64 and MMIO 0xe0000 are not.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import errno
import fcntl
import functools
import json
import mmap
import os
import queue
import select
import signal
import socket
import struct
import subprocess
import sys
import textwrap
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

import psutil
import pytest
from engine_constants import engine_constant
from held_fds import fds_on

from vmsuper.shared import kvm, task_names, wire
from vmsuper.shared.abi import RANGE_COUNTS, STATS, RunState
from vmsuper.shared.asm import assemble
from vmsuper.shared.plugin_pb2 import CpuidEntry, VcpuRequest, VcpuResponse
from vmsuper.shared.ranges import CallHint, RangeTable, RegHint, Space
from vmsuper.shared.runtime import RUNTIME_VARIABLE
from vmsuper.shared.shm import SharedRegion
from vmsuper.supervisor import vcpus as vcpus_module
from vmsuper.supervisor.busy_board import BusyBoard, board_path
from vmsuper.supervisor.low_latency import LATENCY_FILE
from vmsuper.supervisor.poll_gate import PollGate
from vmsuper.supervisor.runners import KICK_SIGNAL
from vmsuper.supervisor.vcpus import VcpuSet, VcpuSetError
from vmsuper.workers.vcpu_protocol import STATE_SETS, StateSet
from vmsuper.workers.worker_status import WorkerStatus

pytestmark = pytest.mark.kvm

LOAD = 0x1000
MEMORY_SIZE = 0x10000
SERIAL = 0x3F8
ASYNC_PORT = 0x80
MMIO_BASE = 0xD0000
MAX_VCPUS = 4
TIMEOUT = 10.0
TRANSPORTS = ["socket", "pipes"]

HALT = "cli\nhlt\n"

# -- the machine ------------------------------------------------------------------------------


class Machine:
    """A VM with 64 KiB of memory at 0, the shared region, and at most one VcpuSet."""

    def __init__(self, log_dir: Path, *, poll_ns: int = 0) -> None:
        self.log_dir = log_dir
        self.poll_ns = poll_ns
        self.system = kvm.Kvm()
        self.vm = self.system.create_vm()
        self.vm.set_identity_map_addr(0xFFFB_C000)
        self.vm.set_tss_addr(0xFFFB_D000)
        self.vm.create_irqchip()
        self.vm.create_pit2(kvm.KVM_PIT_SPEAKER_DUMMY)
        self.memory = mmap.mmap(-1, MEMORY_SIZE)
        self._pinned: Any = ctypes.c_char.from_buffer(self.memory)
        self.vm.set_user_memory_region(0, 0, 0, MEMORY_SIZE, ctypes.addressof(self._pinned))
        self.region = SharedRegion.create(MAX_VCPUS)
        self.table = RangeTable()
        self.table.reserve(Space.IOPORT, SERIAL, 8)
        self.table.reserve(Space.IOPORT, ASYNC_PORT, 1, async_write=True)
        self.table.reserve(Space.MMIO, MMIO_BASE, 0x1000)
        self.hint: CallHint | None = None
        self.publish()
        self.vcpus: VcpuSet | None = None
        self.ends: list[PluginEnd] = []

    def publish(self) -> None:
        self.region.table.publish(self.table, self.hint)

    def load(self, source: str, bits: int = 16) -> None:
        code = assemble(source, bits=bits, origin=LOAD)
        self.memory[LOAD : LOAD + len(code)] = code

    def make_vcpus(
        self, count: int, transport: str, log_level: str = "info", *, low_latency: bool = False
    ) -> VcpuSet:
        assert self.vcpus is None
        self.vcpus = VcpuSet(
            self.vm,
            count=count,
            transport=cast(Any, transport),
            region=self.region,
            mmap_size=self.system.vcpu_mmap_size(),
            log_dir=self.log_dir,
            log_level=log_level,
            poll_ns=self.poll_ns,
            low_latency=low_latency,
        )
        fds = self.vcpus.plugin_fds()
        per_vcpu = 1 if transport == "socket" else 2
        self.ends = [
            PluginEnd(transport, fds[i * per_vcpu : (i + 1) * per_vcpu]) for i in range(count)
        ]
        return self.vcpus

    def start(self, count: int, transport: str, log_level: str = "info") -> VcpuSet:
        vcpus = self.make_vcpus(count, transport, log_level)
        for end in self.ends:  # as crosvm's client does: the first Wait goes out at once
            end.send(VcpuRequest(wait=VcpuRequest.Wait()))
        vcpus.start()
        return vcpus

    def records(self, vcpu: int) -> list[dict[str, Any]]:
        path = self.log_dir / f"vcpu-{vcpu}.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()]

    def close(self) -> None:
        if self.vcpus is not None:
            self.vcpus.shutdown()
            self.vcpus.close_plugin_fds()
        for end in self.ends:
            end.close()
        self.region.close()
        self.vm.close()
        self.system.close()
        del self._pinned
        self.memory.close()


EXIT_PATHS: dict[str, int] = {
    "sleep": 0,
    "poll": 50_000,
}
"""poll_ns: every test runs with the worker and its runner polling for each other and not, so
the bells both sleep and spin."""


@pytest.fixture(params=list(EXIT_PATHS))
def machine(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Machine]:
    m = Machine(tmp_path / "logs", poll_ns=EXIT_PATHS[request.param])
    try:
        yield m
    finally:
        m.close()


# -- the plugin's end of a channel ------------------------------------------------------------


class ChannelClosed(Exception):
    pass


class PluginEnd:
    """The plugin side of one VCPU channel (its own dups of the fds the set hands out)."""

    def __init__(self, transport: str, fds: list[int]) -> None:
        self.transport = transport
        self.fds = [os.dup(fd) for fd in fds]
        self._queue: deque[bytes] = deque()
        self._decoder = wire.DelimitedDecoder()
        self.batches: list[int] = []
        self._sock = socket.socket(fileno=self.fds[0]) if transport == "socket" else None

    @property
    def read_fd(self) -> int:
        return self.fds[0] if self.transport == "socket" else self.fds[1]

    def send_raw(self, data: bytes, fds: list[int] | None = None) -> None:
        if self._sock is not None:
            wire.send_datagram(self._sock, data, fds or [])
        else:
            assert not fds
            os.write(self.fds[0], data)

    def send(self, request: VcpuRequest) -> None:
        self.send_raw(request.SerializeToString())

    def _read(self, timeout: float) -> None:
        ready, _, _ = select.select([self.read_fd], [], [], timeout)
        if not ready:
            raise TimeoutError(f"no response within {timeout} s")
        if self._sock is not None:
            datagram = wire.recv_datagram(self._sock)
            if datagram is None:
                raise ChannelClosed
            self._queue.append(datagram.data)
            self.batches.append(1)
            return
        chunk = os.read(self.read_fd, 1 << 20)
        if not chunk:
            raise ChannelClosed
        messages = self._decoder.feed(chunk)
        self.batches.append(len(messages))
        self._queue.extend(messages)

    def recv(self, timeout: float = TIMEOUT) -> VcpuResponse:
        if not self._queue:
            self._read(timeout)
        while not self._queue:  # a pipe read may end inside a message
            self._read(timeout)
        return VcpuResponse.FromString(self._queue.popleft())

    def call(self, request: VcpuRequest) -> VcpuResponse:
        self.send(request)
        response = self.recv()
        case = request.WhichOneof("message")
        assert response.WhichOneof("message") == case, (case, response)
        return response

    def at_eof(self, timeout: float = TIMEOUT) -> bool:
        try:
            self.recv(timeout)
        except ChannelClosed:
            return True
        return False

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
            self.fds = self.fds[1:]
        for fd in self.fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.fds = []


def wait_request() -> VcpuRequest:
    return VcpuRequest(wait=VcpuRequest.Wait())


def resume(data: bytes = b"", **kwargs: bytes) -> VcpuRequest:
    return VcpuRequest(resume=VcpuRequest.Resume(data=data, **kwargs))


def wire_set(state_set: int) -> VcpuRequest.StateSet:
    return cast("VcpuRequest.StateSet", state_set)


def get_state(end: PluginEnd, state_set: int) -> VcpuResponse:
    return end.call(VcpuRequest(get_state=VcpuRequest.GetState(set=wire_set(state_set))))


def set_state(end: PluginEnd, state_set: int, blob: bytes) -> VcpuResponse:
    request = VcpuRequest.SetState(set=wire_set(state_set), state=blob)
    return end.call(VcpuRequest(set_state=request))


def flat(segment: kvm.kvm_segment, selector: int, code: bool) -> None:
    segment.base, segment.limit, segment.selector = 0, 0xFFFF_FFFF, selector
    segment.type = 0xB if code else 0x3
    segment.present, segment.dpl, segment.db, segment.s, segment.l, segment.g = 1, 0, 1, 1, 0, 1


def init(end: PluginEnd, vcpu: int, *, rbx: int = 0, protected: bool = False) -> None:
    """The plugin's side of Init (the first Wait was already sent): place the VCPU at LOAD,
    make VCPUs other than 0 runnable. Does not resume."""
    response = end.recv()
    assert response.errno == 0 and response.wait.WhichOneof("exit") == "init"
    regs = kvm.kvm_regs(rip=LOAD, rflags=0x2, rsp=0x8000, rbx=rbx)
    assert set_state(end, StateSet.REGS, bytes(regs)).errno == 0
    sregs = kvm.kvm_sregs.from_buffer_copy(get_state(end, StateSet.SREGS).get_state.state)
    if protected:
        flat(sregs.cs, 0x8, code=True)
        for segment in (sregs.ds, sregs.es, sregs.ss, sregs.fs, sregs.gs):
            flat(segment, 0x10, code=False)
        sregs.idt.base, sregs.idt.limit = 0, 0
        sregs.cr0 |= 1
    else:
        for segment in (sregs.cs, sregs.ds, sregs.es, sregs.ss):
            segment.base, segment.selector = 0, 0
    assert set_state(end, StateSet.SREGS, bytes(sregs)).errno == 0
    if vcpu > 0:
        runnable = kvm.kvm_mp_state(kvm.KVM_MP_STATE_RUNNABLE)
        assert set_state(end, StateSet.MP, bytes(runnable)).errno == 0


def boot(machine: Machine, source: str, transport: str) -> PluginEnd:
    """Load `source`, start one VCPU on `transport`, finish its Init and resume it: the
    plugin's end of its channel, the guest running."""
    machine.load(source)
    machine.start(1, transport)
    end = machine.ends[0]
    init(end, 0)
    end.send(resume())
    return end


def wait_readable(fd: int, timeout: float = TIMEOUT) -> None:
    ready, _, _ = select.select([fd], [], [], timeout)
    assert ready, f"fd {fd} not readable within {timeout} s"


def wait_until(predicate: Callable[[], bool], what: str, timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


def io_of(response: VcpuResponse) -> VcpuResponse.Wait.Io:
    assert response.errno == 0, response
    assert response.wait.WhichOneof("exit") == "io", response
    return response.wait.io


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


# -- Init and the barrier ---------------------------------------------------------------------

WRITE_RBX_AND_HALT = f"""
    mov %bl, %al
    mov ${SERIAL}, %dx
    out %al, %dx
    {HALT}
"""


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("count", [1, 2, 4])
def test_init_then_every_vcpu_runs_after_all_resumed(
    machine: Machine, transport: str, count: int
) -> None:
    machine.load(WRITE_RBX_AND_HALT)
    vcpus = machine.start(count, transport)
    for i, end in enumerate(machine.ends):
        init(end, i, rbx=0x40 + i)
    # All but the last resumed: none may enter the guest yet.
    for end in machine.ends[:-1]:
        end.send(resume())
    slots = [machine.region.slot(i) for i in range(count - 1)]
    wait_until(lambda: all(s.run_state == RunState.RUNNING for s in slots), "resumed workers")
    for end in machine.ends[:-1]:
        with pytest.raises(TimeoutError):
            end.recv(timeout=0.2)
    for i in range(count - 1):
        assert sum(machine.region.slot(i).counters().values()) == 0
    machine.ends[-1].send(resume())
    for i, end in enumerate(machine.ends):
        io = io_of(end.recv())
        assert (io.space, io.address, io.is_write, io.data) == (0, SERIAL, True, bytes([0x40 + i]))
    assert vcpus.started


def task_name(path: str) -> str:
    return Path(path).read_text().rstrip("\n")


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_each_runner_and_worker_is_named_after_its_vcpu(machine: Machine, transport: str) -> None:
    machine.load(WRITE_RBX_AND_HALT)
    own_name = task_name("/proc/thread-self/comm")
    vcpus = machine.start(2, transport)
    for i, end in enumerate(machine.ends):
        init(end, i)  # the worker's answers and the runner's ioctls: both are past their naming
    threads = [task_name(f"/proc/self/task/{tid}/comm") for tid in os.listdir("/proc/self/task")]
    assert sorted(n for n in threads if n.startswith("vcpu")) == ["vcpu0-runner", "vcpu1-runner"]
    assert task_name("/proc/thread-self/comm") == own_name  # the caller keeps its own
    workers = {vcpu: task_name(f"/proc/{pid}/comm") for vcpu, pid in vcpus.worker_pids().items()}
    assert workers == {0: "vcpu0-worker", 1: "vcpu1-worker"}


def write_pressure(path: Path, stall_us: int) -> None:
    path.write_text(f"some avg10=0.00 avg60=0.00 avg300=0.00 total={stall_us}\n")


@pytest.mark.parametrize(("stall_us", "polling"), [(0, True), (10**12, False)])
def test_vcpus_poll_from_the_start_only_if_the_host_was_calm_while_the_vm_was_set_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stall_us: int, polling: bool
) -> None:
    pressure = tmp_path / "cpu"
    write_pressure(pressure, 0)
    gate = functools.partial(PollGate, pressure_file=str(pressure))
    monkeypatch.setattr(vcpus_module, "PollGate", gate)
    machine = Machine(tmp_path / "logs", poll_ns=50_000)
    try:
        machine.load(HALT)
        vcpus = machine.make_vcpus(1, "pipes")  # the gate's baseline
        write_pressure(pressure, stall_us)  # since then: calm, or busy all along
        machine.ends[0].send(VcpuRequest(wait=VcpuRequest.Wait()))
        vcpus.start()  # the first reading, before any VCPU polls; nobody ticks the gate here
        assert machine.region.mailbox(0).poll_ns == (50_000 if polling else 0)
        init(machine.ends[0], 0)
    finally:
        machine.close()


def test_low_latency_is_held_from_start_to_shutdown(tmp_path: Path) -> None:
    machine = Machine(tmp_path / "logs")
    try:
        machine.load(HALT)
        vcpus = machine.make_vcpus(1, "pipes", low_latency=True)
        assert not fds_on(LATENCY_FILE)  # the plugin may take its time before Start
        machine.ends[0].send(VcpuRequest(wait=VcpuRequest.Wait()))
        vcpus.start()
        assert fds_on(LATENCY_FILE) == 1
        init(machine.ends[0], 0)  # the worker is confined by now: its inherited copy is closed
        assert not any(fds_on(LATENCY_FILE, pid) for pid in vcpus.worker_pids().values())
        vcpus.shutdown()
        assert not fds_on(LATENCY_FILE)
    finally:
        machine.close()


def test_naming_a_thread_opens_no_file() -> None:
    """A runner names itself while the plugin may be counting the supervisor's fds: no fd may
    come and go. With no fd left to open, the name must still be set."""
    script = textwrap.dedent(
        """
        import os, resource, threading
        from vmsuper.shared import task_names

        def named():
            free = os.open("/dev/null", os.O_RDONLY)  # the lowest free fd number
            os.close(free)
            soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
            resource.setrlimit(resource.RLIMIT_NOFILE, (free, hard))  # no fd can be opened
            task_names.name_this_thread("vcpu7-runner")
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
            with open("/proc/thread-self/comm") as comm:
                print(comm.read().strip())

        thread = threading.Thread(target=named)
        thread.start()
        thread.join()
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
    )
    assert out.stdout.strip() == "vcpu7-runner", out.stderr


def test_task_names_fit_the_kernel() -> None:
    for vcpu in (0, 9, 255, 999):
        assert len(task_names.runner_name(vcpu)) <= task_names.MAX_NAME
        assert len(task_names.worker_name(vcpu)) <= task_names.MAX_NAME


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_requests_out_of_order_get_eproto(machine: Machine, transport: str) -> None:
    machine.load(HALT)
    machine.make_vcpus(1, transport)
    end = machine.ends[0]
    assert machine.vcpus is not None
    machine.vcpus.start()
    response = get_state(end, StateSet.REGS)  # before the Init wait
    assert response.errno == errno.EPROTO
    response = end.call(wait_request())
    assert response.wait.WhichOneof("exit") == "init"
    response = end.call(wait_request())  # nothing pending
    assert response.errno == errno.EPROTO and response.wait.WhichOneof("exit") is None
    assert get_state(end, StateSet.REGS).errno == 0


# -- state, MSRs, CPUID, capabilities ---------------------------------------------------------


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_vcpu_state_round_trips_and_wrong_sizes(machine: Machine, transport: str) -> None:
    machine.load(HALT)
    machine.start(1, transport)
    end = machine.ends[0]
    init(end, 0)
    for state_set in StateSet:
        size = STATE_SETS[state_set][2]
        blob = get_state(end, state_set).get_state.state
        assert len(blob) == size, state_set
        assert set_state(end, state_set, blob).errno == 0, state_set
        assert get_state(end, state_set).get_state.state == blob, state_set
        for wrong in (blob[:-1], blob + b"\0", b""):
            response = set_state(end, state_set, wrong)
            assert response.errno == errno.EINVAL, state_set
    regs = kvm.kvm_regs.from_buffer_copy(get_state(end, StateSet.REGS).get_state.state)
    regs.r15 = 0x1122_3344_5566_7788
    assert set_state(end, StateSet.REGS, bytes(regs)).errno == 0
    again = kvm.kvm_regs.from_buffer_copy(get_state(end, StateSet.REGS).get_state.state)
    assert again.r15 == 0x1122_3344_5566_7788
    assert get_state(end, 42).errno == errno.EINVAL


IA32_SYSENTER_CS = 0x174
IA32_SYSENTER_ESP = 0x175
NO_SUCH_MSR = 0x0BAD_0000


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_msrs(machine: Machine, transport: str) -> None:
    machine.load(HALT)
    machine.start(1, transport)
    end = machine.ends[0]
    init(end, 0)
    entries = [
        VcpuRequest.MsrEntry(index=IA32_SYSENTER_CS, data=0x10),
        VcpuRequest.MsrEntry(index=IA32_SYSENTER_ESP, data=0x8000),
    ]
    response = end.call(VcpuRequest(set_msrs=VcpuRequest.SetMsrs(entries=entries)))
    assert response.errno == 0
    indices = [IA32_SYSENTER_ESP, IA32_SYSENTER_CS]
    response = end.call(VcpuRequest(get_msrs=VcpuRequest.GetMsrs(entry_indices=indices)))
    assert response.errno == 0
    assert list(response.get_msrs.entry_data) == [0x8000, 0x10]
    # KVM stops at the MSR it cannot read: that must come back as an error.
    indices = [IA32_SYSENTER_CS, NO_SUCH_MSR, IA32_SYSENTER_ESP]
    response = end.call(VcpuRequest(get_msrs=VcpuRequest.GetMsrs(entry_indices=indices)))
    assert response.errno == errno.EINVAL
    assert list(response.get_msrs.entry_data) == []
    bad = [VcpuRequest.MsrEntry(index=NO_SUCH_MSR, data=1)]
    response = end.call(VcpuRequest(set_msrs=VcpuRequest.SetMsrs(entries=bad)))
    assert response.errno == errno.EINVAL


CPUID_REPORT = f"""
    xor %eax, %eax
    xor %ecx, %ecx
    cpuid
    mov ${SERIAL}, %dx           /* cpuid wrote edx */
    out %eax, %dx
    mov $4, %eax
    mov $1, %ecx
    cpuid
    mov %ebx, %eax
    mov ${SERIAL}, %dx
    out %eax, %dx
    {HALT}
"""


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_set_cpuid_reaches_the_guest(machine: Machine, transport: str) -> None:
    machine.load(CPUID_REPORT)
    machine.start(1, transport)
    end = machine.ends[0]
    init(end, 0)
    entries = [
        CpuidEntry(function=0, eax=0x0D, ebx=1, ecx=2, edx=3),
        CpuidEntry(function=4, has_index=True, index=0, ebx=0xAAAA),
        CpuidEntry(function=4, has_index=True, index=1, ebx=0x5566_7788),
    ]
    response = end.call(VcpuRequest(set_cpuid=VcpuRequest.SetCpuid(entries=entries)))
    assert response.errno == 0
    too_many = [CpuidEntry(function=0x8000_0000 + i) for i in range(300)]
    response = end.call(VcpuRequest(set_cpuid=VcpuRequest.SetCpuid(entries=too_many)))
    assert response.errno == errno.E2BIG  # KVM's own limit, reported as such
    end.send(resume())
    assert io_of(end.recv()).data == struct.pack("<I", 0x0D)
    end.send(resume())
    assert io_of(end.recv()).data == struct.pack("<I", 0x5566_7788)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_capabilities(machine: Machine, transport: str) -> None:
    machine.load(HALT)
    machine.start(1, transport)
    end = machine.ends[0]
    init(end, 0)
    request = VcpuRequest.EnableCapability(capability=kvm.KVM_CAP_IRQCHIP)
    response = end.call(VcpuRequest(enable_capability=request))
    assert response.errno == errno.EINVAL
    response = end.call(VcpuRequest(get_hyperv_cpuid=VcpuRequest.CpuidRequest()))
    if machine.system.check_extension(kvm.KVM_CAP_HYPERV_CPUID):
        assert response.errno == 0 and len(response.get_hyperv_cpuid.entries) > 0
    else:
        assert response.errno != 0 and len(response.get_hyperv_cpuid.entries) == 0


def test_hyperv_synic_capability(machine: Machine) -> None:
    if not machine.system.check_extension(kvm.KVM_CAP_HYPERV_SYNIC):
        pytest.skip("KVM_CAP_HYPERV_SYNIC is not available on this host")
    machine.load(HALT)
    machine.start(1, "socket")
    end = machine.ends[0]
    init(end, 0)
    request = VcpuRequest.EnableCapability(capability=kvm.KVM_CAP_HYPERV_SYNIC)
    assert end.call(VcpuRequest(enable_capability=request)).errno == 0


# -- I/O exits --------------------------------------------------------------------------------

PORTS = f"""
    mov ${SERIAL + 1}, %dx
    in %dx, %al                  /* reserved read: the plugin answers */
    inc %al
    dec %dx
    out %al, %dx                 /* echo + 1 */
    in $0x60, %al                /* unreserved read: zero */
    out %al, %dx
    out %al, $0x64               /* unreserved write: dropped */
    mov ${SERIAL + 2}, %dx
    in %dx, %ax                  /* 16-bit reserved read */
    mov ${SERIAL}, %dx
    out %ax, %dx
    cld
    mov $msg, %si
    mov $5, %cx
    rep outsb                    /* string write */
    mov $buf, %di
    mov $3, %cx
    mov ${SERIAL + 1}, %dx
    rep insb                     /* string read */
    mov $buf, %si
    mov $3, %cx
    mov ${SERIAL}, %dx
    rep outsb
    {HALT}
msg: .ascii "hello"
buf: .byte 0, 0, 0
"""


def serve_reads(end: PluginEnd, answers: dict[int, deque[int]], until: int) -> bytes:
    """Answer reserved reads from per-port byte streams; collect what is written to SERIAL
    until `until` bytes came."""
    written = b""
    while len(written) < until:
        io = io_of(end.recv())
        if io.is_write:
            assert io.address == SERIAL
            written += io.data
            end.send(resume(b"\xcc" * len(io.data)))  # ignored for a write
        else:
            assert io.data == bytes(len(io.data))
            answer = bytes(answers[io.address].popleft() for _ in io.data)
            end.send(resume(answer))
    return written


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_port_io(machine: Machine, transport: str) -> None:
    machine.load(PORTS)
    machine.start(1, transport)
    end = machine.ends[0]
    init(end, 0)
    end.send(resume())
    answers = {SERIAL + 1: deque(b"\x5a" + b"xyz"), SERIAL + 2: deque(b"\xef\xbe")}
    written = serve_reads(end, answers, until=1 + 1 + 2 + 5 + 3)
    assert written == b"\x5b" + b"\x00" + b"\xef\xbe" + b"hello" + b"xyz"
    slot = machine.region.slot(0)
    counts = slot.counters()
    assert counts["unreserved"] == 2
    assert counts["io_in"] >= 3 and counts["io_out"] >= 5
    # The first exit comes back to the worker, which describes the table; without polling the
    # runner serves every later one itself (the worker only reads the plugin's replies). With
    # polling, the plain accesses of a plugin as slow as this test's go through the worker
    # (hotpath.c, REPLY_POLL_MAX_NS), the unreserved ones never.
    if machine.poll_ns == 0:
        assert slot.runner_served == sum(counts.values()) - 1
    else:
        assert counts["unreserved"] <= slot.runner_served <= sum(counts.values()) - 1


PROBE_EVERY = engine_constant("REPLY_PROBE_EVERY")
WRITES = 3 * PROBE_EVERY
WRITE_LOOP = f"""
    mov ${SERIAL}, %dx
    mov ${WRITES}, %cx
1:  out %al, %dx
    loop 1b
    {HALT}
"""


@pytest.mark.parametrize("window_ns", [0, 10_000_000])
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_plugin_s_speed_is_judged_by_the_replies_polled_for(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, transport: str, window_ns: int
) -> None:
    """The rule for slow plugins (hotpath.c, REPLY_POLL_MAX_NS) judges a plugin by the
    replies the worker polled for: a reply it slept through also times its own wake-up, and
    would keep a fast plugin judged slow. This test's plugin is slow (it answers each exit no
    sooner than the cap after it came: being Python is not slow enough on every host): with
    polling it is judged so, each reply counting at most the cap, and while it is slow the
    worker still polls for the reply to one exit in PROBE_EVERY (a probe), to see whether it
    became fast (tests/test_hotpath.py checks what a probe's answer does). Without polling,
    nothing judges it. The window is the largest `poll_us`, so that a busy host does not make
    the worker sleep through the replies, and the polling gate reads a calm host."""
    pressure = tmp_path / "cpu"
    write_pressure(pressure, 0)
    monkeypatch.setattr(
        vcpus_module, "PollGate", functools.partial(PollGate, pressure_file=str(pressure))
    )
    machine = Machine(tmp_path / "logs", poll_ns=window_ns)
    try:
        machine.load(WRITE_LOOP)
        machine.start(1, transport)
        judge_the_plugin(machine)
    finally:
        machine.close()


def judge_the_plugin(machine: Machine) -> None:
    end = machine.ends[0]
    init(end, 0)
    end.send(resume())
    slot = machine.region.slot(0)
    recent = ctypes.c_uint64.from_address(
        slot.cell_address("stats") + STATS.offset("recent_response_ns")
    )
    bar, cap = engine_constant("REPLY_POLL_MAX_NS"), engine_constant("REPLY_SAMPLE_MAX_NS")
    # Read and written while the worker waits for the reply, so the worker cannot write it:
    # from then on, only a reply polled for (a probe's) can move it.
    unlikely = 1 << 40
    for index in range(WRITES):
        io = io_of(end.recv())
        came = time.monotonic_ns()
        assert (io.address, io.is_write) == (SERIAL, True)
        if index == PROBE_EVERY and machine.poll_ns:
            assert bar <= recent.value <= cap  # judged slow long since, and capped
            recent.value = unlikely
        while time.monotonic_ns() - came < cap:
            pass  # a slow plugin's work
        end.send(resume())
    wait_until(lambda: slot.reading().responses == WRITES, "the worker to take the last reply")
    if machine.poll_ns == 0:
        # The runner sent every exit but the first, and the worker slept through each reply.
        assert slot.runner_served == WRITES - 1
        assert recent.value == 0
    else:
        # Its exits went through the worker since, which polled for a few replies: the probes.
        assert bar <= recent.value < unlikely


def test_a_vm_s_gate_counts_the_busy_vcpus_of_the_user_s_other_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The user's board in the runtime folder (supervisor/busy_board.py): another run's busy
    VCPU, written there as its supervisor would, and this VM's exiting VCPU would have four
    pollers on two CPUs: no polling, though the host is calm. This VM's count goes on the
    board for the other; once the other is gone, polling is back."""
    monkeypatch.setenv(RUNTIME_VARIABLE, str(tmp_path / "runtime"))
    pressure = tmp_path / "cpu"
    write_pressure(pressure, 0)
    monkeypatch.setattr(
        vcpus_module, "PollGate", functools.partial(PollGate, pressure_file=str(pressure), cpus=2)
    )
    other = BusyBoard.open(board_path(), stale_ns=60 * 10**9)
    assert other is not None
    # Each exit is worth 10 ms: 100 between two ticks make a VCPU busy unless the ticks are
    # more than 2 s apart.
    window = 10_000_000
    machine = Machine(tmp_path / "logs", poll_ns=window)
    try:
        machine.load(WRITE_LOOP)
        vcpus = machine.start(1, "pipes")
        end, mailbox = machine.ends[0], machine.region.mailbox(0)
        init(end, 0)
        for others, polling in [(1, False), (0, True), (1, False)]:
            other.publish(others)
            for _ in range(100):
                end.send(resume())
                assert io_of(end.recv()).address == SERIAL
            vcpus.poll_gate.tick()
            assert mailbox.poll_ns == (window if polling else 0), others
            assert other.others() == 1  # this VM's busy VCPU
        end.send(resume())
    finally:
        machine.close()
        other.close()


MMIO = f"""
    mov ${MMIO_BASE >> 4}, %bx
    mov %bx, %ds
    movb (0x10), %al             /* reserved MMIO reads of 1, 2 and 4 bytes, echoed */
    movb %al, (0x20)
    movw (0x30), %ax
    movw %ax, (0x40)
    movl (0x50), %eax
    movl %eax, (0x60)
    mov $0xe000, %bx
    mov %bx, %ds
    movl (0), %eax               /* unreserved MMIO read: zero */
    movl %eax, (4)               /* unreserved MMIO write: dropped */
    mov ${MMIO_BASE >> 4}, %bx
    mov %bx, %ds
    movl %eax, (0x70)
    {HALT}
"""


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_mmio(machine: Machine, transport: str) -> None:
    machine.load(MMIO)
    machine.start(1, transport)
    end = machine.ends[0]
    init(end, 0)
    end.send(resume())
    answers = {0x10: b"\x77", 0x30: b"\x34\x12", 0x50: b"\x0d\xf0\xfe\xca"}
    seen = []
    for _ in range(7):
        io = io_of(end.recv())
        assert io.space == Space.MMIO
        offset = io.address - MMIO_BASE
        seen.append((offset, io.is_write, io.data))
        end.send(resume(b"" if io.is_write else answers[offset] + b"junk"))
    assert seen == [
        (0x10, False, b"\0"),
        (0x20, True, b"\x77"),
        (0x30, False, b"\0\0"),
        (0x40, True, b"\x34\x12"),
        (0x50, False, b"\0\0\0\0"),
        (0x60, True, b"\x0d\xf0\xfe\xca"),
        (0x70, True, b"\0\0\0\0"),
    ]


ASYNC_BURST = f"""
    xor %al, %al
    mov $20, %cx
1:  out %al, ${ASYNC_PORT}
    inc %al
    loop 1b
    in ${ASYNC_PORT}, %al        /* a read there is unreserved: zero */
    mov ${SERIAL}, %dx
    out %al, %dx                 /* sync write: the worker waits for the plugin */
    {HALT}
"""


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_async_writes_do_not_wait_and_coalesce(machine: Machine, transport: str) -> None:
    end = boot(machine, ASYNC_BURST, transport)
    slot = machine.region.slot(0)
    # The VCPU runs through all the async writes without an answer, up to the sync write.
    wait_until(
        lambda: slot.counters()["io_out"] == 1 and slot.run_state == RunState.WAITING_PLUGIN,
        "the sync write",
    )
    end.batches.clear()
    ios = [io_of(end.recv()) for _ in range(21)]
    for value, io in enumerate(ios[:20]):
        assert (io.address, io.is_write, io.no_resume, io.data) == (
            ASYNC_PORT,
            True,
            True,
            bytes([value]),
        )
    assert (ios[20].address, ios[20].no_resume, ios[20].data) == (SERIAL, False, b"\0")
    if transport == "pipes":
        assert end.batches[0] > 1  # several delimited responses in one read
    assert slot.counters()["async_write"] == 20
    assert slot.runner_served >= 20  # the async writes never woke the worker


EARLY = f"""
    mov ${SERIAL + 1}, %dx
    in %dx, %al
    mov %al, %bl
    in %dx, %al                  /* its answer was sent before its Wait */
    mov ${SERIAL}, %dx
    out %al, %dx
    mov %bl, %al
    out %al, %dx
    {HALT}
"""


def test_a_reply_sent_early_answers_the_next_wait(machine: Machine) -> None:
    """A client that answers before it is asked (on the socket, where each datagram stays one
    request) gets what it would get without the runner serving exits: its early Resume
    answers the next Wait, which the plugin still receives."""
    end = boot(machine, EARLY, "socket")
    first = io_of(end.recv())
    assert (first.address, first.is_write) == (SERIAL + 1, False)
    end.send(resume(b"\x11"))
    end.send(resume(b"\x22"))  # early: before the second read's Wait
    second = io_of(end.recv())
    assert (second.address, second.is_write) == (SERIAL + 1, False)
    written = []
    for _ in range(2):
        io = io_of(end.recv())
        written.append(io.data)
        end.send(resume())
    assert written == [b"\x22", b"\x11"]
    assert machine.region.slot(0).counters()["io_in"] == 2


UNRESERVED_LOOP = """
1:  mov $0x200, %dx
    in %dx, %al                  /* unreserved: the runner gives zero and runs on */
    jmp 1b
"""


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_forged_range_count_keeps_the_runner_within_the_block(
    machine: Machine, transport: str
) -> None:
    """The worker writes its RangeCounts block and the runner looks accesses up in it: a
    subverted worker's count far beyond the block must not take the runner (a thread of the
    supervisor, here of this very process) out of it."""
    boot(machine, UNRESERVED_LOOP, transport)
    slot = machine.region.slot(0)
    wait_until(lambda: slot.runner_served > 10, "the runner serving exits")
    head = machine.region.range_counts(0).head_address()
    ctypes.c_uint64.from_address(head + RANGE_COUNTS.offset("count")).value = 1 << 62
    served = slot.runner_served
    wait_until(lambda: slot.runner_served > served + 1000, "more exits after the forgery")
    served = slot.runner_served  # counted after the exit's kind: read first
    assert slot.counters()["unreserved"] >= served


HINTED = f"""
    mov ${SERIAL}, %dx
    mov $0x1234, %ax
    out %al, %dx                 /* matches the hint and its RegHint: regs + sregs */
    mov $0x99, %ax
    out %al, %dx                 /* matches the hint only: regs */
    in %dx, %al                  /* other direction: nothing */
    {HALT}
"""


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_call_hint_sends_registers_with_the_wait(machine: Machine, transport: str) -> None:
    machine.hint = CallHint(
        Space.IOPORT,
        SERIAL,
        on_write=True,
        hints=(RegHint(match_rax=True, rax=0x1234, send_sregs=True),),
    )
    machine.publish()
    machine.load(HINTED)
    machine.start(1, transport)
    end = machine.ends[0]
    init(end, 0)
    end.send(resume())
    first = io_of(end.recv())
    assert kvm.kvm_regs.from_buffer_copy(first.regs).rax == 0x1234
    sregs = kvm.kvm_sregs.from_buffer_copy(first.sregs)
    assert sregs.cs.base == 0
    assert first.debugregs == b""
    regs = kvm.kvm_regs.from_buffer_copy(first.regs)
    regs.rax = 0x99  # a Resume's regs are applied before the guest goes on
    end.send(resume(regs=bytes(regs)))
    second = io_of(end.recv())
    assert kvm.kvm_regs.from_buffer_copy(second.regs).rax == 0x99
    assert second.sregs == b"" and second.debugregs == b""
    end.send(resume())
    third = io_of(end.recv())
    assert not third.is_write and third.regs == b""


# -- pause ------------------------------------------------------------------------------------

ECHO_LOOP = f"""
    mov ${SERIAL + 1}, %dx
1:  in %dx, %al
    inc %al
    dec %dx
    out %al, %dx
    inc %dx
    jmp 1b
"""


class LoopPlugin(threading.Thread):
    """Serves one VCPU running ECHO_LOOP: answers each read with a counter, checks the echo,
    records pause tokens (optionally holding the VCPU paused until released)."""

    def __init__(self, end: PluginEnd, tokens: queue.Queue[tuple[int, int]], vcpu: int) -> None:
        super().__init__(daemon=True)
        self.end = end
        self.tokens = tokens
        self.vcpu = vcpu
        self.hold = threading.Event()
        self.hold.set()
        self.stop = False
        self.errors: list[str] = []
        self.rounds = 0

    def run(self) -> None:
        counter = 0
        try:
            while not self.stop:
                try:
                    response = self.end.recv(timeout=0.1)
                except TimeoutError:
                    continue
                exit_ = response.wait.WhichOneof("exit")
                if exit_ == "user":
                    self.tokens.put((self.vcpu, response.wait.user.user))
                    self.hold.wait()
                    self.end.send(resume())
                    continue
                io = response.wait.io
                if io.is_write:
                    if io.data != bytes([(counter + 1) & 0xFF]):
                        self.errors.append(f"echo {io.data!r} after {counter}")
                    counter = (counter + 7) & 0xFF
                    self.rounds += 1
                    self.end.send(resume())
                else:
                    self.end.send(resume(bytes([counter])))
        except ChannelClosed:
            pass
        except Exception as exc:
            self.errors.append(repr(exc))


def start_loop(machine: Machine, count: int, transport: str) -> list[LoopPlugin]:
    machine.load(ECHO_LOOP)
    machine.start(count, transport)
    for i, end in enumerate(machine.ends):
        init(end, i)
    tokens: queue.Queue[tuple[int, int]] = queue.Queue()
    plugins = [LoopPlugin(end, tokens, i) for i, end in enumerate(machine.ends)]
    for plugin in plugins:
        plugin.start()
    for end in machine.ends:
        end.send(resume())
    return plugins


def stop_loop(plugins: list[LoopPlugin]) -> None:
    for plugin in plugins:
        plugin.stop = True
        plugin.hold.set()
    for plugin in plugins:
        plugin.join(TIMEOUT)
        assert not plugin.is_alive()
        assert plugin.errors == []


@pytest.mark.parametrize(("transport", "count"), [("socket", 1), ("pipes", 1), ("pipes", 2)])
def test_every_pause_is_delivered_once_with_its_token(
    machine: Machine, transport: str, count: int
) -> None:
    plugins = start_loop(machine, count, transport)
    tokens = plugins[0].tokens
    assert machine.vcpus is not None
    wait_until(lambda: all(p.rounds > 3 for p in plugins), "the guests to loop")
    all_bits = (1 << 64) - 1  # bits beyond the VCPU count are ignored
    sent = []
    for n in range(300):
        token = (n * 0x9E37_79B9_7F4A_7C15 + 1) & ((1 << 64) - 1)
        sent.append(token)
        machine.vcpus.pause(all_bits if n % 2 else (1 << count) - 1, token)
        got = sorted(tokens.get(timeout=TIMEOUT) for _ in range(count))
        assert got == [(i, token) for i in range(count)]
    rounds = [p.rounds for p in plugins]
    wait_until(lambda: all(p.rounds > r + 3 for p, r in zip(plugins, rounds, strict=True)), "io")
    assert tokens.empty()  # exactly once
    assert len(set(sent)) == len(sent)
    stop_loop(plugins)
    assert machine.region.slot(0).counters()["user"] == 300


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_pauses_while_paused_are_delivered_after_resume_latest_only(
    machine: Machine, transport: str
) -> None:
    plugins = start_loop(machine, 1, transport)
    plugin = plugins[0]
    assert machine.vcpus is not None
    plugin.hold.clear()
    machine.vcpus.pause(1, 111)
    assert plugin.tokens.get(timeout=TIMEOUT) == (0, 111)
    machine.vcpus.pause(1, 222)  # while paused: overwritten before delivery
    machine.vcpus.pause(1, 333)
    plugin.hold.set()
    assert plugin.tokens.get(timeout=TIMEOUT) == (0, 333)
    rounds = plugin.rounds
    wait_until(lambda: plugin.rounds > rounds + 3, "the guest to go on")
    assert plugin.tokens.empty()
    stop_loop(plugins)


def test_pause_before_start_is_delivered_after_init(machine: Machine) -> None:
    machine.load("1: jmp 1b\n")
    vcpus = machine.make_vcpus(1, "socket")
    vcpus.pause(1, 77)
    end = machine.ends[0]
    end.send(wait_request())
    vcpus.start()
    init(end, 0)
    end.send(resume())
    response = end.recv()
    assert response.wait.WhichOneof("exit") == "user" and response.wait.user.user == 77


# -- stopping ---------------------------------------------------------------------------------


def wait_worker(machine: Machine, vcpu: int) -> str | None:
    assert machine.vcpus is not None
    wait_readable(machine.vcpus.worker_pidfds()[vcpu])
    return machine.vcpus.worker_exited(vcpu)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_triple_fault_stops_the_worker_with_its_status(machine: Machine, transport: str) -> None:
    machine.load("ud2\n", bits=32)
    machine.start(1, transport)
    end = machine.ends[0]
    init(end, 0, protected=True)
    end.send(resume())
    reason = wait_worker(machine, 0)
    assert reason is not None
    assert reason.startswith(f"worker exited with status {WorkerStatus.GUEST_SHUTDOWN.value}")
    assert "triple fault" in reason
    assert end.at_eof()
    stopped = [r for r in machine.records(0) if r["event"] == "stopped"]
    assert stopped[-1]["level"] == "error" and stopped[-1]["status"] == 10
    assert stopped[-1]["rip"] is not None


def test_killed_worker_is_reported_with_the_signal(machine: Machine) -> None:
    machine.load("1: jmp 1b\n")
    vcpus = machine.start(1, "pipes")
    init(machine.ends[0], 0)
    machine.ends[0].send(resume())
    wait_until(lambda: machine.region.slot(0).run_state == RunState.RUNNING, "running")
    os.kill(vcpus.worker_pids()[0], signal.SIGKILL)
    reason = wait_worker(machine, 0)
    assert reason == "worker was killed by signal 9 (SIGKILL)"
    assert vcpus.worker_exited(0) == reason  # reaped once, remembered


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_shutdown_request_stops_the_worker_cleanly(machine: Machine, transport: str) -> None:
    machine.load(HALT)
    machine.start(1, transport)
    end = machine.ends[0]
    init(end, 0)
    end.send(VcpuRequest(shutdown=VcpuRequest.Shutdown()))
    assert wait_worker(machine, 0) is None
    assert end.at_eof()
    assert machine.region.slot(0).stop_reason == "the plugin sent Shutdown"


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_plugin_hanging_up_stops_the_worker_cleanly(machine: Machine, transport: str) -> None:
    machine.load(HALT)
    vcpus = machine.start(1, transport)
    init(machine.ends[0], 0)
    vcpus.close_plugin_fds()
    machine.ends[0].close()
    assert wait_worker(machine, 0) is None
    assert machine.region.slot(0).stop_reason == "the plugin closed the channel"


def test_the_kick_handler_is_the_sets_only_while_it_runs(machine: Machine) -> None:
    """SIGUSR1 (the runners' kick) is process-wide state: the set installs its handler and
    puts back what was there once its runners are gone."""

    def ours(signum: int, frame: object) -> None:
        pass

    previous = signal.signal(KICK_SIGNAL, ours)
    try:
        machine.load(HALT)
        vcpus = machine.make_vcpus(1, "socket")
        assert signal.getsignal(KICK_SIGNAL) is not ours
        vcpus.shutdown()
        assert signal.getsignal(KICK_SIGNAL) is ours
    finally:
        signal.signal(KICK_SIGNAL, previous)


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("blocked", ["on_plugin", "in_guest", "at_barrier", "in_init"])
def test_shutdown_unblocks_everything_and_leaves_nothing(
    machine: Machine, transport: str, blocked: str
) -> None:
    baseline = fd_count()
    machine.load(f"mov ${SERIAL}, %dx\nout %al, %dx\n1: jmp 1b\n")
    vcpus = machine.start(2, transport)
    workers = [psutil.Process(pid) for pid in vcpus.worker_pids().values()]
    if blocked != "in_init":
        for i, end in enumerate(machine.ends):
            init(end, i)
        machine.ends[0].send(resume())
        if blocked != "at_barrier":
            machine.ends[1].send(resume())
            for end in machine.ends:
                io_of(end.recv())
            if blocked == "in_guest":
                for end in machine.ends:
                    end.send(resume())
                wait_until(lambda: machine.region.slot(1).run_state == RunState.RUNNING, "run")
    vcpus.shutdown(timeout=5.0)
    assert [vcpus.worker_exited(i) for i in range(2)] == [None, None]  # SIGTERM: clean
    vcpus.shutdown()  # idempotent
    vcpus.close_plugin_fds()
    for end in machine.ends:
        end.close()
    assert not any(w.is_running() and w.status() != psutil.STATUS_ZOMBIE for w in workers)
    assert psutil.Process().children() == []
    assert fd_count() == baseline
    assert not any(t.name.startswith("vcpu") for t in threading.enumerate())
    for i in range(2):
        events = [r["event"] for r in machine.records(i)]
        assert "stopped" in events and events[-1] == "vcpu_exit_counts"


def test_shutdown_without_start_closes_the_channels(machine: Machine) -> None:
    baseline = fd_count()
    vcpus = machine.make_vcpus(3, "pipes")
    gate = 2 if machine.poll_ns else 0  # the polling gate's pressure file and busy board
    failures = 1  # the runners' failure eventfd
    # pipes, doorbells (two pipes each), test's dups
    assert fd_count() == baseline + 3 * 4 + 3 * 4 + 3 * 2 + gate + failures
    vcpus.shutdown()
    for end in machine.ends:
        end.close()
    assert fd_count() == baseline
    with pytest.raises(VcpuSetError):
        vcpus.start()


def test_start_refuses_with_other_threads(machine: Machine) -> None:
    vcpus = machine.make_vcpus(1, "socket")
    gate = threading.Event()
    other = threading.Thread(target=gate.wait)
    other.start()
    try:
        with pytest.raises(VcpuSetError) as info:
            vcpus.start()
        assert info.value.errno == errno.EBUSY
    finally:
        gate.set()
        other.join()
    assert not vcpus.started
    vcpus.start()
    assert vcpus.started


# -- worker process hygiene and logs ----------------------------------------------------------


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_worker_keeps_only_its_own_fds(machine: Machine, transport: str) -> None:
    machine.load(HALT)
    vcpus = machine.start(2, transport)
    for i, end in enumerate(machine.ends):
        init(end, i)
    for vcpu, pid in vcpus.worker_pids().items():
        targets = sorted(
            os.readlink(f"/proc/{pid}/fd/{fd}")
            for fd in os.listdir(f"/proc/{pid}/fd")
            if int(fd) > 2
        )
        channel = ["socket"] if transport == "socket" else ["pipe", "pipe"]
        wakeup_pipe = ["pipe", "pipe"]  # the worker's signal.set_wakeup_fd pipe
        bells = ["pipe", "pipe"]  # its ends of the doorbell's two pipes
        kinds = sorted(
            "socket" if t.startswith("socket:") else "pipe" if t.startswith("pipe:") else t
            for t in targets
        )
        expected = sorted(
            [
                *channel,
                *wakeup_pipe,
                *bells,
                f"anon_inode:kvm-vcpu:{vcpu}",
                str(machine.log_dir / f"vcpu-{vcpu}.jsonl"),
            ]
        )
        assert kinds == expected, targets
        # One end of each pipe but the wake-up pipe: of a bell's, the runner's end stays with
        # the runner.
        ends_held = collections.Counter(t for t in targets if t.startswith("pipe:"))
        assert sorted(ends_held.values()) == [1] * (len(ends_held) - 1) + [2], targets


@pytest.mark.parametrize("level", ["info", "debug"])
def test_logs_lifecycle_counts_and_debug_exits(machine: Machine, level: str) -> None:
    machine.load(PORTS)
    machine.start(1, "pipes", log_level=level)
    end = machine.ends[0]
    init(end, 0)
    end.send(resume())
    answers = {SERIAL + 1: deque(b"\x5a" + b"xyz"), SERIAL + 2: deque(b"\xef\xbe")}
    serve_reads(end, answers, until=12)
    assert machine.vcpus is not None
    machine.vcpus.shutdown()
    records = machine.records(0)
    events = [r["event"] for r in records]
    for event in ("worker_started", "init_done", "running", "stopped", "vcpu_exit_counts"):
        assert event in events
    assert all(r["vcpu"] == 0 for r in records)
    counts = records[-1]
    assert counts["event"] == "vcpu_exit_counts"
    assert counts["ranges"]["ioport:0x3f8+8"] >= 8
    assert counts["exits"]["unreserved"] == 2
    exits = [r for r in records if r["event"] == "exit"]
    served = machine.region.slot(0).runner_served
    if level == "debug":
        assert len(exits) >= 10 and exits[0]["kind"] == "io"
        assert served == 0  # the worker logs every exit, so it serves them all
    else:
        assert exits == []
        assert served > 0


def test_socket_request_with_fds_is_refused_and_fds_closed(machine: Machine) -> None:
    machine.load(HALT)
    machine.start(1, "socket")
    end = machine.ends[0]
    init(end, 0)
    r, w = os.pipe()
    try:
        request = VcpuRequest(get_state=VcpuRequest.GetState(set=VcpuRequest.MP))
        end.send_raw(request.SerializeToString(), fds=[r])
        response = end.recv()
        assert response.errno == errno.EINVAL and response.WhichOneof("message") == "get_state"
        os.close(r)
        r = -1
        # The worker closed its copy: the read end is gone everywhere, so a write fails.
        with pytest.raises(BrokenPipeError):
            os.write(w, b"x")
    finally:
        if r >= 0:
            os.close(r)
        os.close(w)
    end.send_raw(b"\xff\xff")
    response = end.recv()
    assert response.errno == errno.EBADMSG and response.WhichOneof("message") is None
    assert get_state(end, StateSet.MP).errno == 0


ORPHAN_SUPERVISOR = """
import mmap, os, signal, subprocess, sys
from pathlib import Path
from vmsuper.shared import kvm
from vmsuper.shared.shm import SharedRegion
from vmsuper.supervisor.vcpus import VcpuSet

system = kvm.Kvm()
vm = system.create_vm()
vm.create_irqchip()
region = SharedRegion.create(2)
vcpus = VcpuSet(vm, count=2, transport="pipes", region=region,
                mmap_size=system.vcpu_mmap_size(), log_dir=Path(sys.argv[1]), log_level="info")
vcpus.start()
# Someone else holds the plugin's ends, so the workers never see their channels close.
holder = subprocess.Popen(["sleep", "60"], pass_fds=vcpus.plugin_fds())
print("PIDS", holder.pid, *vcpus.worker_pids().values(), flush=True)
sys.stdin.readline()
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_workers_die_with_their_supervisor(tmp_path: Path) -> None:
    supervisor = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(ORPHAN_SUPERVISOR), str(tmp_path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    holder, workers = -1, []
    try:
        assert supervisor.stdout is not None and supervisor.stdin is not None
        line = supervisor.stdout.readline()
        while line and not line.startswith("PIDS "):
            line = supervisor.stdout.readline()
        holder, *pids = (int(pid) for pid in line.split()[1:])
        workers = [psutil.Process(pid) for pid in pids]
        assert len(workers) == 2

        def serving(vcpu: int) -> bool:
            log = tmp_path / f"vcpu-{vcpu}.jsonl"
            return log.exists() and "worker_started" in log.read_text()

        wait_until(lambda: serving(0) and serving(1), "the workers to serve")
        supervisor.stdin.write("go\n")
        supervisor.stdin.flush()
        assert supervisor.wait(TIMEOUT) == -signal.SIGKILL
        # PR_SET_PDEATHSIG: the kernel kills each worker when the supervisor dies, though
        # their channels stay open (the holder has the plugin's ends).
        wait_until(lambda: all(_gone(w) for w in workers), "orphaned workers to die")
    finally:
        if supervisor.poll() is None:
            supervisor.kill()
            supervisor.wait()
        for pid in (holder, *(w.pid for w in workers if not _gone(w))):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)


def _gone(process: psutil.Process) -> bool:
    try:
        return process.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


# -- what the C exit loop hands back to Python ------------------------------------------------

ECHO = f"""
1:  mov ${SERIAL + 1}, %dx
    in %dx, %al                  /* a reserved read, answered by the plugin */
    mov ${SERIAL}, %dx
    out %al, %dx                 /* echoed back */
    jmp 1b
"""


def echo_read(end: PluginEnd) -> None:
    """The guest's next exit is the reserved read."""
    io = io_of(end.recv())
    assert (io.address, io.is_write, io.data) == (SERIAL + 1, False, b"\0")


def echo_written(end: PluginEnd, expected: int) -> None:
    io = io_of(end.recv())
    assert (io.address, io.is_write, io.data) == (SERIAL, True, bytes([expected]))
    end.send(resume())


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_requests_while_an_exit_waits_then_resume(machine: Machine, transport: str) -> None:
    """Any request but a plain Resume{data}, while a forwarded exit waits, is served as usual
    (the C loop hands it over), and a Resume carrying registers is applied."""
    machine.load(ECHO)
    machine.start(1, transport)
    end = machine.ends[0]
    init(end, 0)
    end.send(resume())
    echo_read(end)
    regs = kvm.kvm_regs.from_buffer_copy(get_state(end, StateSet.REGS).get_state.state)
    assert regs.rdx == SERIAL + 1
    end.send_raw(b"\xff\xff")  # undecodable: EBADMSG, and the exit still waits
    assert end.recv().errno == errno.EBADMSG
    end.send(resume(b"\x41"))
    io = io_of(end.recv())
    assert (io.address, io.is_write, io.data) == (SERIAL, True, b"\x41")
    regs = kvm.kvm_regs.from_buffer_copy(get_state(end, StateSet.REGS).get_state.state)
    regs.rcx = 0x77
    end.send(resume(regs=bytes(regs)))  # a Resume carrying registers: applied
    echo_read(end)
    assert kvm.kvm_regs.from_buffer_copy(get_state(end, StateSet.REGS).get_state.state).rcx == 0x77
    end.send(resume(b"\x43\x44"))  # more data than the access: only its size is used
    echo_written(end, 0x43)
    echo_read(end)
    end.send(resume())  # no data: the read gives zero
    echo_written(end, 0)


def test_socket_refusals_while_an_exit_waits(machine: Machine) -> None:
    machine.load(ECHO)
    machine.start(1, "socket")
    end = machine.ends[0]
    init(end, 0)
    end.send(resume())
    echo_read(end)
    r, w = os.pipe()
    try:
        end.send_raw(resume(b"\x50").SerializeToString(), fds=[r])
        refused = end.recv()
        assert refused.errno == errno.EINVAL and refused.WhichOneof("message") is None
        end.send_raw(b"\x12\x00", fds=[r, r, r, r, r])  # more fds than accepted
        assert end.recv().errno == errno.EINVAL
    finally:
        os.close(r)
        os.close(w)
    assert end._sock is not None
    end._sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
    end.send_raw(resume(b"\x51" * (300 * 1024)).SerializeToString())
    assert end.recv().errno == errno.EMSGSIZE
    end.send(resume(b"\x52"))  # the exit waited through all of it
    echo_written(end, 0x52)


def test_pipes_request_too_large_while_an_exit_waits_stops_the_worker(machine: Machine) -> None:
    machine.load(ECHO)
    machine.start(1, "pipes")
    end = machine.ends[0]
    init(end, 0)
    end.send(resume())
    echo_read(end)
    # A pipe large enough that the worker's one read finds more than a request may hold.
    fcntl.fcntl(end.fds[0], fcntl.F_SETPIPE_SZ, 1 << 20)
    end.send_raw(bytes(300 * 1024))
    status = wait_worker(machine, 0)
    assert status is not None and "status 14" in status, status
    assert "too large" in machine.region.slot(0).stop_reason


RESERVE_LATER = f"""
1:  mov $0x70, %dx
    out %al, %dx                 /* not reserved at first */
    mov ${SERIAL}, %dx
    out %al, %dx
    inc %al
    jmp 1b
"""


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_ranges_and_hint_published_while_running_apply_at_once(
    machine: Machine, transport: str
) -> None:
    machine.load(RESERVE_LATER)
    machine.start(1, transport)
    end = machine.ends[0]
    init(end, 0)
    end.send(resume())
    first = io_of(end.recv())
    assert (first.address, first.regs) == (SERIAL, b"")
    machine.table.reserve(Space.IOPORT, 0x70, 1)
    machine.publish()
    end.send(resume())
    io = io_of(end.recv())
    assert (io.address, io.data) == (0x70, bytes([first.data[0] + 1]))
    machine.hint = CallHint(Space.IOPORT, SERIAL, on_write=True, hints=())
    machine.publish()
    end.send(resume())
    hinted = io_of(end.recv())
    assert hinted.address == SERIAL and len(hinted.regs) == ctypes.sizeof(kvm.kvm_regs)
    machine.table.reserve(Space.IOPORT, 0x70, 0)  # released
    machine.hint = None
    machine.publish()
    end.send(resume())
    plain = io_of(end.recv())
    assert (plain.address, plain.regs) == (SERIAL, b"")
    end.send(resume())
    assert io_of(end.recv()).address == SERIAL  # 0x70 is no longer forwarded
    assert machine.vcpus is not None
    machine.vcpus.shutdown()
    counts = machine.records(0)[-1]
    assert counts["event"] == "vcpu_exit_counts"
    assert counts["ranges"] == {"ioport:0x3f8+8": 4, "ioport:0x70+1": 1}
    assert counts["exits"]["io_out"] == 5 and counts["exits"]["unreserved"] >= 2
