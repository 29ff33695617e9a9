"""Fault injection: SIGKILL to the plugin, to a VCPU worker, and to vmsuper itself, at random
points of a busy run.

The run is as busy as a plugin can make it: two VCPUs loop over a stream of async writes with
a synchronous write every 64th, the plugin pauses both VCPUs over and over, reads VCPU state
at every stop and VM state on the main connection, and the VM has a tap. Whatever is killed,
and whenever: no process of the run survives, the tap goes, and the exit status names the
cause (128+9 for the plugin, 126 with "vcpu N" on stderr for a VCPU worker). Points are
random delays after the run is busy, seeded so a failure names its iteration.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import select
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
from fuzz.processes import (
    all_gone,
    descendants,
    read_json_line,
    taps_of,
    vms_taps,
)
from hostcaps import required_strictly, tap_unusable_reason

from vmsuper.shared.asm import assemble
from vmsuper.supervisor import outcome
from vmsuper.testing import VmResult, VmRunner, VmSpec, finish, write_python_plugin

pytestmark = pytest.mark.kvm

LOAD = 0x1000
NET = {"host_ip": "100.115.92.5", "netmask": "255.255.255.252", "mac": "de:21:e8:47:6b:6a"}
ITERATIONS = int(os.environ.get("FAULT_ITERATIONS", "3"))
LONGEST_DELAY = 0.4

GUEST = """
/*
 * Both VCPUs, 16-bit real mode at 0x1000: an endless stream of writes to port 0x620
 * (reserved with async writes: the VCPU goes on at once), and after every 64th a write to
 * port 0x600 (reserved: the VCPU waits until the plugin resumes it).
 */
        mov     $0x620, %dx
        xor     %ax, %ax
stream:
        out     %al, %dx                # async write
        inc     %ax
        test    $0x3f, %al
        jnz     stream
        mov     $0x600, %dx
        out     %al, %dx                # synchronous write
        mov     $0x620, %dx
        jmp     stream
"""

BUSY_PLUGIN = """
import json, os, sys, threading, time
from vmsuper.plugin import Connection, Init, Io
from vmsuper.plugin import Space
from vmsuper.shared import kvm

conn = Connection.from_env()
memory = conn.create_memory(0, 0x10000)
with open(sys.argv[1], "rb") as f:
    code = f.read()
memory.mmap[0x1000:0x1000 + len(code)] = code
conn.reserve_range(Space.IOPORT, 0x600, 1)
conn.reserve_range(Space.IOPORT, 0x620, 1, async_write=True)
shutdown = conn.get_shutdown_eventfd()
vcpus = conn.get_vcpus()
async_writes = [0] * len(vcpus)
stops = [0] * len(vcpus)


def exit_at_shutdown():
    os.eventfd_read(shutdown)  # written by the supervisor when the VM shuts down
    os._exit(0)


def serve(vcpu):
    i = vcpu.index
    try:
        while True:
            event = vcpu.wait()
            if isinstance(event, Io) and event.no_resume:
                async_writes[i] += 1
                continue
            stops[i] += 1
            if isinstance(event, Init):
                sregs = vcpu.get_sregs()
                for seg in (sregs.cs, sregs.ds, sregs.es, sregs.ss):
                    seg.base = 0
                    seg.selector = 0
                vcpu.set_sregs(sregs)
                vcpu.set_regs(kvm.kvm_regs(rip=0x1000, rflags=2))
                if i:
                    vcpu.set_mp_state(kvm.kvm_mp_state(mp_state=kvm.KVM_MP_STATE_RUNNABLE))
            else:  # a pause or the synchronous write: read state while stopped
                vcpu.get_regs()
                vcpu.get_fpu()
            vcpu.resume()
    except Exception:
        threading.Event().wait()  # the channel closed: wait for the shutdown eventfd


threading.Thread(target=exit_at_shutdown, daemon=True).start()
for vcpu in vcpus:
    threading.Thread(target=serve, args=(vcpu,), daemon=True).start()
conn.start()
token = 0
reported = False
try:
    while True:
        token += 1
        conn.pause_vcpus((1 << len(vcpus)) - 1, token)
        conn.get_clock()
        conn.get_pic_state(True)
        if not reported and min(async_writes) >= 64 and min(stops) >= 4:
            print(json.dumps({"busy": os.getpid(), "pauses": token}), flush=True)
            reported = True
        time.sleep(0.001)
except Exception:
    threading.Event().wait()
"""


@pytest.fixture(scope="module")
def net() -> dict[str, str] | None:
    reason = tap_unusable_reason()
    if reason is None:
        return NET
    if required_strictly():
        pytest.fail(reason)
    return None  # the run goes without a tap; everything else is still checked


@pytest.fixture
def busy_run(tmp_path: Path, net: dict[str, str] | None) -> tuple[VmRunner, Path, VmSpec]:
    guest = tmp_path / "guest.bin"
    guest.write_bytes(assemble(GUEST, bits=16, origin=LOAD))
    plugin = write_python_plugin(tmp_path, BUSY_PLUGIN)
    spec = VmSpec(vcpus=2, args=[str(guest)], net=net, grace_period=1.0)
    return VmRunner(tmp_path / "runs"), plugin, spec


def worker_pids(log_dir: Path) -> list[int]:
    """The VCPU workers' pids in VCPU order, as the supervisor logged them at Start."""
    for line in (log_dir / "supervisor.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record.get("event") == "vcpu_workers_started":
            return [int(pid) for pid in record["workers"]]
    raise AssertionError("no vcpu_workers_started record")


@dataclass
class Busy:
    """A run that reached its busy state, and its processes."""

    proc: subprocess.Popen[str]
    config: Path
    logs: Path
    workers: list[int]
    """VCPU worker pids, in VCPU order."""
    plugin: int
    """The plugin's pid (bwrap's when sandboxed: the supervisor's other direct child)."""
    family: set[int]
    """Every descendant of the supervisor seen so far."""

    def finish(self) -> VmResult:
        return finish(self.proc, self.config, self.logs, timeout=60)


@contextlib.contextmanager
def busy(runner: VmRunner, plugin: Path, spec: VmSpec) -> Iterator[Busy]:
    """Start a run and wait until it is busy. If the block fails, vmsuper is killed at once,
    so the failure is reported instead of a wait for a run that nobody ends."""
    proc, config, logs = runner.start(plugin, spec)
    try:
        read_json_line(proc)
        workers = worker_pids(logs)
        children = {child.pid for child in psutil.Process(proc.pid).children()}
        others = children - set(workers)
        assert set(workers) <= children and len(others) == 1, (children, workers)
        yield Busy(proc, config, logs, workers, others.pop(), descendants(proc.pid))
    except BaseException:
        proc.kill()
        proc.communicate()
        raise


@pytest.mark.parametrize("victim", ["plugin", "vcpu_worker", "vmsuper"])
def test_sigkill_at_a_random_point_leaves_nothing(
    busy_run: tuple[VmRunner, Path, VmSpec], net: dict[str, str] | None, victim: str
) -> None:
    runner, plugin, spec = busy_run
    rng = random.Random(f"sigkill-{victim}")
    taps_before = vms_taps()
    supervisors: list[int] = []
    for iteration in range(ITERATIONS):
        delay = rng.uniform(0, LONGEST_DELAY)
        vcpu = rng.randrange(spec.vcpus)
        where = f"iteration {iteration}, {delay:.3f} s after the run was busy"
        with busy(runner, plugin, spec) as run:
            supervisors.append(run.proc.pid)
            if net is not None:
                assert taps_of(run.proc.pid), "no tap while running: the check after is moot"
            time.sleep(delay)
            run.family |= descendants(run.proc.pid)
            pid = {"plugin": run.plugin, "vcpu_worker": run.workers[vcpu], "vmsuper": run.proc.pid}
            os.kill(pid[victim], signal.SIGKILL)
        result = run.finish()
        assert all_gone(run.family), f"{where}: processes left behind"
        assert not taps_of(run.proc.pid), f"{where}: the tap outlived the run"
        if victim == "plugin":
            assert result.status == 128 + signal.SIGKILL, f"{where}: {result.stderr}"
        elif victim == "vcpu_worker":
            assert result.status == outcome.EXIT_VCPU_FAILED, f"{where}: {result.stderr}"
            assert f"vcpu {vcpu}" in result.stderr, f"{where}: {result.stderr}"
        else:
            assert result.status == -signal.SIGKILL, f"{where}: {result.stderr}"
    # New vms* devices after the runs: only other tests' (running in parallel), none of ours.
    ours = {f"vms{pid:06x}" for pid in supervisors}
    assert not {tap for tap in vms_taps() - taps_before if tap[:9] in ours}


def wait_stopped(pid: int, timeout: float = 10) -> None:
    """Wait until every thread of `pid` is stopped (SIGSTOP takes effect asynchronously)."""
    deadline = time.monotonic() + timeout
    while True:
        states = set()
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError):
                states.add((task / "stat").read_text().rsplit(")", 1)[1].split()[0])
        if states <= {"T", "t"}:
            return
        assert time.monotonic() < deadline, f"process {pid} did not stop: {states}"
        time.sleep(0.01)


def kill_and_wait(pid: int, timeout: float = 10) -> None:
    """SIGKILL `pid` and wait until its death is what its parent's pidfd reports (for a
    process with threads that is when the last one is gone, not when the leader is)."""
    pidfd = os.pidfd_open(pid)
    try:
        os.kill(pid, signal.SIGKILL)
        ready, _, _ = select.select([pidfd], [], [], timeout)
        assert ready, f"process {pid} did not die"
    finally:
        os.close(pidfd)


@pytest.mark.parametrize(
    ("victims", "status"),
    [(("worker 0", "worker 1"), outcome.EXIT_VCPU_FAILED), (("plugin", "worker 1"), 137)],
    ids=["two_workers", "plugin_then_worker"],
)
def test_deaths_seen_at_once_are_each_handled(
    busy_run: tuple[VmRunner, Path, VmSpec], victims: tuple[str, str], status: int
) -> None:
    """Several deaths reported by one wake-up of the event loop (the supervisor was not
    scheduled meanwhile; SIGSTOP makes that certain): the first decides the status, the
    others are taken as they come, and none is an internal error."""
    with busy(*busy_run) as run:
        pids = {"plugin": run.plugin, "worker 0": run.workers[0], "worker 1": run.workers[1]}
        os.kill(run.proc.pid, signal.SIGSTOP)
        try:
            wait_stopped(run.proc.pid)
            for victim in victims:  # in this order: each is dead before the next is killed
                kill_and_wait(pids[victim])
        finally:
            os.kill(run.proc.pid, signal.SIGCONT)
    result = run.finish()
    assert all_gone(run.family)
    errors = [r.get("error") for r in result.records() if r["event"] == "internal_error"]
    assert (result.status, errors) == (status, []), result.stderr
    # The plugin's requests after the shutdown began do not watch the VCPUs all over again.
    assert [r["event"] for r in result.records()].count("vcpus_started") == 1
