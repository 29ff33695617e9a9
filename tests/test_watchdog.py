"""The stall watchdog: the logic fed samples (no KVM), then real runs whose plugin stops
answering one exit, or never resumes a VCPU from Init."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from vmsuper.shared.asm import assemble
from vmsuper.supervisor.watchdog import Phase, Sample, Stall, StallWatch, StillInInit
from vmsuper.testing import VmRunner, VmSpec, write_python_plugin

LOAD = 0x1000

# -- the logic ------------------------------------------------------------------------------


def waiting(progress: int, exit_: str = "an MMIO read at 0xd0000 (4 bytes)") -> Sample:
    return Sample(Phase.WAITING, progress, exit_)


RUNNING = Sample(Phase.OTHER, 0)


def test_one_warning_per_stall_not_a_flood() -> None:
    watch = StallWatch(threshold=2.0, started=0.0)
    assert watch.observe([waiting(7)], 0.5) == []
    assert watch.observe([waiting(7)], 2.0) == []  # 1.5 s since the first look
    assert watch.observe([waiting(7)], 2.5) == [Stall(0, "an MMIO read at 0xd0000 (4 bytes)", 2.0)]
    assert watch.observe([waiting(7)], 10.0) == []  # still the same stall: said once
    # The VCPU moved on and waits on a new exit: a new stall, timed from its first look.
    assert watch.observe([waiting(9)], 11.0) == []
    assert watch.observe([waiting(9)], 13.0) == [Stall(0, "an MMIO read at 0xd0000 (4 bytes)", 2.0)]


def test_progress_between_looks_resets_the_wait() -> None:
    watch = StallWatch(threshold=1.0, started=0.0)
    for step in range(10):  # a busy VCPU waits on the plugin at every look, never for long
        assert watch.observe([waiting(step)], float(step)) == []
    assert watch.observe([RUNNING], 10.0) == []
    assert watch.observe([waiting(20)], 10.5) == []


def test_vcpus_still_in_init_are_named_once() -> None:
    watch = StallWatch(threshold=3.0, started=1.0)
    init = Sample(Phase.INIT, 0)
    assert watch.observe([RUNNING, init, init], 3.9) == []
    found = watch.observe([RUNNING, init, init], 4.0)
    assert found == [StillInInit((1, 2), 3.0)]
    assert found[0].message().startswith("VCPUs 1, 2 still in Init 3.0 s after Start")
    assert watch.observe([RUNNING, init, init], 9.0) == []


def test_messages_name_the_vcpu_the_exit_and_the_wait() -> None:
    stall = Stall(3, "an I/O port read at 0x3f8 (1 bytes)", 5.04)
    assert stall.message() == (
        "VCPU 3 has waited 5.0 s for the plugin to answer an I/O port read at 0x3f8 (1 bytes)"
    )


# -- real runs ------------------------------------------------------------------------------

GUEST = """
        mov     $0xd000, %ax
        mov     %ax, %ds
        mov     $0x3f8, %dx
        out     %al, %dx                # answered: the plugin is alive
        mov     (0), %eax               # MMIO read at 0xd0000: nobody ever answers it
        cli
        hlt
"""

# The VCPU's thread answers the first exit, then dies with an exception on the second; the main
# thread waits for the VM to shut down, as a plugin with a crashed worker thread would.
DYING_THREAD = """
import os, sys, threading
from vmsuper.plugin import Connection, Init, Io, Space
from vmsuper.shared import kvm

LOAD = 0x1000
conn = Connection.from_env()
memory = conn.create_memory(0, 0x10000)
code = open(sys.argv[1], "rb").read()
memory.mmap[LOAD:LOAD + len(code)] = code
conn.reserve_range(Space.IOPORT, 0x3f8, 8)
conn.reserve_range(Space.MMIO, 0xd0000, 0x1000)
vcpus = conn.get_vcpus()
shutdown = conn.get_shutdown_eventfd()


def serve(vcpu):
    while True:
        event = vcpu.wait()
        if isinstance(event, Init):
            sregs = vcpu.get_sregs()
            for seg in (sregs.cs, sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss):
                seg.base = 0
                seg.selector = 0
            vcpu.set_sregs(sregs)
            vcpu.set_regs(kvm.kvm_regs(rip=LOAD, rsp=0x8000, rflags=2))
            vcpu.resume()
        elif isinstance(event, Io) and event.space == Space.MMIO:
            raise RuntimeError("this plugin's VCPU thread crashed")
        else:
            vcpu.resume()


for vcpu in vcpus[:SERVED]:
    threading.Thread(target=serve, args=(vcpu,), daemon=True).start()
conn.start()
os.eventfd_read(shutdown)
"""


def _run(tmp_path: Path, spec: VmSpec, served: int) -> tuple[int, str, list[dict[str, object]]]:
    binary = tmp_path / "guest.bin"
    binary.write_bytes(assemble(textwrap.dedent(GUEST), origin=LOAD))
    source = DYING_THREAD.replace("SERVED", str(served))
    plugin = write_python_plugin(tmp_path, source)
    spec.args = [str(binary)]
    result = VmRunner(tmp_path / "runs").run(plugin, spec, timeout=60)
    stalls = [r for r in result.records() if r["event"] == "vcpu_stalled"]
    return result.status, result.stderr, stalls


@pytest.mark.kvm
@pytest.mark.parametrize("log_level", ["info", "debug"], ids=["engine", "engine-reporting"])
@pytest.mark.parametrize("transport", ["socket", "pipes"])
def test_an_exit_nobody_answers_is_named_once(
    tmp_path: Path, log_level: str, transport: str
) -> None:
    # The time limit ends the run several looks after the stall began, even on a busy host.
    spec = VmSpec(timeout=8, stall_warning=1, log_level=log_level, poll_us=0, transport=transport)
    status, stderr, stalls = _run(tmp_path, spec, served=1)
    assert status == 124, stderr
    lines = [line for line in stderr.splitlines() if "has waited" in line]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("vmsuper: warning: VCPU 0 has waited ")
    assert lines[0].endswith(" s for the plugin to answer an MMIO read at 0xd0000 (4 bytes)")
    assert len(stalls) == 1 and stalls[0]["level"] == "warning"
    assert stalls[0]["vcpu"] == 0 and float(str(stalls[0]["waited"])) >= 1.0


@pytest.mark.kvm
def test_vcpus_the_plugin_never_serves_are_named_as_still_in_init(tmp_path: Path) -> None:
    status, stderr, stalls = _run(tmp_path, VmSpec(vcpus=3, timeout=8, stall_warning=1), served=1)
    assert status == 124, stderr
    lines = [line for line in stderr.splitlines() if "still in Init" in line]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("vmsuper: warning: VCPUs 1, 2 still in Init ")
    assert [s.get("vcpus") for s in stalls] == [[1, 2]]
    assert "has waited" not in stderr  # VCPU 0 waits at the start barrier, not on the plugin


@pytest.mark.kvm
def test_no_warning_when_disabled(tmp_path: Path) -> None:
    status, stderr, stalls = _run(tmp_path, VmSpec(timeout=2, stall_warning=0), served=1)
    assert status == 124, stderr
    assert stalls == [] and "vmsuper: warning" not in stderr
