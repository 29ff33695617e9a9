"""A plugin that keeps the main socket busy cannot starve the VCPUs' runner threads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vmsuper.testing import VmRunner, VmSpec, write_python_plugin

pytestmark = pytest.mark.kvm

GUEST = """
        mov     $EXITS, %cx
again:
        mov     $0x510, %dx
        out     %al, %dx                # one round trip to the plugin per iteration
        loop    again
        mov     $0x511, %dx
        out     %al, %dx                # done
halt:
        cli
        hlt
        jmp     halt
"""

PLUGIN = """
import json, threading
from vmsuper.plugin import Connection, Init, Io, Space
from vmsuper.shared import kvm
from vmsuper.shared.asm import assemble

EXITS = 500
conn = Connection.from_env()
memory = conn.create_memory(0, 0x10000)
code = assemble(GUEST.replace("EXITS", str(EXITS)), origin=0x1000)
memory.mmap[0x1000 : 0x1000 + len(code)] = code
conn.reserve_range(Space.IOPORT, 0x510, 2)
(vcpu,) = conn.get_vcpus()
done = threading.Event()
flooder = conn.new_connection()
floods = 0

def flood():
    # Main requests back to back, for as long as the guest runs.
    global floods
    while not done.is_set():
        flooder.check_extension(0)
        floods += 1

threading.Thread(target=flood, daemon=True).start()
conn.start()
exits = 0
floods_at = []  # the flood's count at the first exit and after every 100th
while True:
    event = vcpu.wait()
    if isinstance(event, Init):
        sregs = vcpu.get_sregs()
        for seg in (sregs.cs, sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss):
            seg.base = seg.selector = 0
        vcpu.set_sregs(sregs)
        vcpu.set_regs(kvm.kvm_regs(rip=0x1000, rsp=0x8000, rflags=2))
    elif isinstance(event, Io) and event.address == 0x510:
        if exits % 100 == 0:
            floods_at.append(floods)
        exits += 1
    elif isinstance(event, Io) and event.address == 0x511:
        floods_at.append(floods)
        done.set()
        break
    vcpu.resume()
print(json.dumps({"exits": exits, "floods_at": floods_at}), flush=True)
"""


def test_vcpus_run_while_a_connection_floods_main_requests(tmp_path: Path) -> None:
    source = f"GUEST = {GUEST!r}\n{PLUGIN}"
    plugin = write_python_plugin(tmp_path, source)
    result = VmRunner(tmp_path / "runs").run(plugin, VmSpec(), timeout=90)
    assert result.status == 0, result.stderr
    found = json.loads(result.stdout.splitlines()[-1])
    assert found["exits"] == 500
    # The exits were made under the flood: main requests were served between the first exit
    # and the last.
    floods_at = found["floods_at"]
    assert len(floods_at) == 6
    assert floods_at[0] < floods_at[-1], floods_at
    assert floods_at == sorted(floods_at)
