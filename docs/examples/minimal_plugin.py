#!/usr/bin/env python3
"""A minimal vmsuper plugin: one VCPU, 64 KiB of memory, a console and one question.

The guest (minimal_guest.S) prints a greeting on the console port, asks the plugin for a
number and gives back twice that number. The plugin prints the greeting and checks the
answer; its exit status becomes vmsuper's.
"""

from __future__ import annotations

import sys
from pathlib import Path

from vmsuper.plugin import Connection, Init, Io, Space, Vcpu
from vmsuper.shared import kvm
from vmsuper.shared.asm import assemble

LOAD = 0x1000  # where the guest program goes, and where the VCPU starts
MEMORY_SIZE = 0x10000
CONSOLE = 0xE9  # the guest writes its text here, one byte at a time
QUESTION = 0x500  # the guest reads its number here ...
ANSWER = 0x501  # ... and writes the doubled number here
NUMBER = 21


def set_up(vcpu: Vcpu) -> None:
    """Real mode with every segment at 0, starting at LOAD (a VCPU resets to 0xfffffff0)."""
    sregs = vcpu.get_sregs()
    for segment in (sregs.cs, sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss):
        segment.base = 0
        segment.selector = 0
    vcpu.set_sregs(sregs)  # deferred: sent along with the resume
    vcpu.set_regs(kvm.kvm_regs(rip=LOAD, rsp=0x8000, rflags=0x2))


def run(vcpu: Vcpu) -> int:
    """Serve the VCPU until the guest answers; return the answer."""
    console = bytearray()
    while True:
        event = vcpu.wait()
        if isinstance(event, Init):
            set_up(vcpu)
            vcpu.resume()
        elif isinstance(event, Io) and event.no_resume:
            console += event.data  # an async write: the guest already went on, no resume
            if console.endswith(b"\n"):
                print("guest:", console.decode().rstrip(), flush=True)
                console.clear()
        elif isinstance(event, Io) and event.address == QUESTION and not event.is_write:
            vcpu.resume(NUMBER.to_bytes(event.length, "little"))  # the value read
        elif isinstance(event, Io) and event.address == ANSWER and event.is_write:
            vcpu.resume()
            return int.from_bytes(event.data, "little")
        else:
            vcpu.resume()  # anything else in our ranges: ignore writes, reads get zeros


def main() -> int:
    guest = assemble((Path(__file__).parent / "minimal_guest.S").read_text(), origin=LOAD)
    conn = Connection.from_env()
    memory = conn.create_memory(0, MEMORY_SIZE)
    memory.mmap[LOAD : LOAD + len(guest)] = guest
    conn.reserve_range(Space.IOPORT, CONSOLE, 1, async_write=True)
    conn.reserve_range(Space.IOPORT, QUESTION, 2)
    (vcpu,) = conn.get_vcpus()
    conn.start()
    answer = run(vcpu)
    print(f"the guest doubled {NUMBER}: {answer}", flush=True)
    return 0 if answer == 2 * NUMBER else 1


if __name__ == "__main__":
    sys.exit(main())
