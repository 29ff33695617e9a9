"""A guest KVM cannot run: the cause named, the registers and instruction recorded.

`int3` in protected mode with an empty IDT is a real reproducer on hosts whose KVM cannot
deliver the breakpoint and falls back to emulating it: a KVM internal error, suberror 1
(emulation failure), carrying the instruction bytes.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from vmsuper.shared import kvm
from vmsuper.shared.asm import assemble
from vmsuper.supervisor import outcome
from vmsuper.supervisor.runner import INFORMATIONAL
from vmsuper.testing import VmRunner, VmSpec, write_python_plugin

pytestmark = pytest.mark.kvm

LOAD = 0x1000

PLUGIN = """
import os, sys
from vmsuper.plugin import Connection, Init
from vmsuper.shared import kvm

LOAD = 0x1000
conn = Connection.from_env()
memory = conn.create_memory(0, 0x10000)
code = open(sys.argv[1], "rb").read()
memory.mmap[LOAD:LOAD + len(code)] = code
(vcpu,) = conn.get_vcpus()
shutdown = conn.get_shutdown_eventfd()
conn.start()


def flat(segment, selector, code):
    segment.base, segment.limit, segment.selector = 0, 0xFFFFFFFF, selector
    segment.type = 0xB if code else 0x3
    segment.present, segment.dpl, segment.db, segment.s, segment.l, segment.g = 1, 0, 1, 1, 0, 1


event = vcpu.wait()
assert isinstance(event, Init)
sregs = vcpu.get_sregs()
flat(sregs.cs, 0x8, True)
for segment in (sregs.ds, sregs.es, sregs.ss, sregs.fs, sregs.gs):
    flat(segment, 0x10, False)
sregs.idt.base, sregs.idt.limit = 0, 0
sregs.cr0 |= 1
vcpu.set_sregs(sregs)
vcpu.set_regs(kvm.kvm_regs(rip=LOAD, rsp=0x8000, rflags=2, rax=0x1234))
vcpu.resume()
os.eventfd_read(shutdown)
"""


@pytest.mark.parametrize("log_level", ["info", "debug"], ids=["engine", "engine-reporting"])
def test_int3_in_protected_mode_names_the_emulation_failure(tmp_path: Path, log_level: str) -> None:
    binary = tmp_path / "guest.bin"
    binary.write_bytes(assemble("nop\nint3\n", bits=32, origin=LOAD))
    plugin = write_python_plugin(tmp_path, PLUGIN)
    spec = VmSpec(args=[str(binary)], log_level=log_level, timeout=30)
    result = VmRunner(tmp_path / "runs").run(plugin, spec)
    assert result.status == outcome.EXIT_VCPU_FAILED, result.stderr
    lines = [line for line in result.stderr.splitlines() if _said(line)]
    assert len(lines) == 1, result.stderr
    assert "KVM internal error: emulation failure (suberror 1) at rip 0x1001" in lines[0]
    assert re.search(r"instruction bytes cc\b", lines[0]), lines[0]
    assert "KVM internal error: KVM internal error" not in lines[0]

    (stopped,) = [r for r in result.vcpu_records(0) if r["event"] == "stopped"]
    assert stopped["level"] == "error"
    assert stopped["suberror"] == kvm.KVM_INTERNAL_ERROR_EMULATION
    assert stopped["suberror_name"] == "emulation failure"
    assert stopped["insn_bytes"].split()[0] == "cc"
    assert stopped["rip"] == "0x1001"
    assert stopped["regs"]["rip"] == "0x1001" and stopped["regs"]["rax"] == "0x1234"
    assert stopped["sregs"]["cr0"] != "0x0" and int(stopped["sregs"]["cr0"], 16) & 1
    assert stopped["sregs"]["cs"]["selector"] == "0x8"


def _said(line: str) -> bool:
    """vmsuper's own lines on stderr that report a cause."""
    return line.startswith("vmsuper:") and not line.startswith(INFORMATIONAL)
