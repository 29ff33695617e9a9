#!/usr/bin/env python3
"""The demo plugin: two VCPUs, a serial port, and a computation checked by the host.

It gives the VM 64 KiB of memory holding the guest program (hello_guest.S, assembled at
start-up), emulates the transmit and line-status registers of a 16550 UART at 0x3f8, prints
what each VCPU writes there line by line, and checks the sum VCPU 0 computes.
"""

from __future__ import annotations

import sys
import threading
from pathlib import Path

from vmsuper.plugin import Connection, Init, Io, Space, Vcpu
from vmsuper.shared import kvm
from vmsuper.shared.asm import assemble

LOAD_ADDRESS = 0x1000
ENTRY_POINTS = (0x1000, 0x1010)
STACK_TOPS = (0x8000, 0x7000)
SERIAL = 0x3F8
SERIAL_LSR = SERIAL + 5
LSR_TRANSMIT_EMPTY = 0x60  # THRE | TEMT: the transmitter is always ready
RESULT_PORT = 0x500
DONE_PORT = 0x501
EXPECTED = sum(i * i for i in range(1, 101))


class Demo:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.result: int | None = None
        self.done = threading.Semaphore(0)

    def say(self, text: str) -> None:
        with self.lock:
            print(text, flush=True)

    def set_up_vcpu(self, vcpu: Vcpu) -> None:
        """Real mode at CS = DS = SS = 0, starting at this VCPU's entry point."""
        sregs = vcpu.get_sregs()
        for seg in (sregs.cs, sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss):
            seg.base = 0
            seg.selector = 0
        vcpu.set_sregs(sregs)
        regs = kvm.kvm_regs()
        regs.rip = ENTRY_POINTS[vcpu.index]
        regs.rsp = STACK_TOPS[vcpu.index]
        regs.rflags = 0x2
        vcpu.set_regs(regs)
        if vcpu.index != 0:
            # With the in-kernel irqchip, application processors wait for INIT/SIPI: start
            # this one directly instead.
            vcpu.set_mp_state(kvm.kvm_mp_state(mp_state=kvm.KVM_MP_STATE_RUNNABLE))

    def serve(self, vcpu: Vcpu) -> None:
        line = bytearray()
        while True:
            event = vcpu.wait()
            if isinstance(event, Init):
                self.set_up_vcpu(vcpu)
                vcpu.resume()
            elif isinstance(event, Io) and event.is_write:
                if event.address == SERIAL:
                    line += event.data
                    if line.endswith(b"\n"):
                        self.say(f"vcpu {vcpu.index}: {line.decode().rstrip()}")
                        line.clear()
                elif event.address == RESULT_PORT:
                    self.result = int.from_bytes(event.data, "little")
                vcpu.resume()
                if event.address == DONE_PORT:
                    self.done.release()
                    return
            elif isinstance(event, Io):
                reply = LSR_TRANSMIT_EMPTY if event.address == SERIAL_LSR else 0
                vcpu.resume(bytes([reply]) + bytes(event.length - 1))
            else:
                vcpu.resume()


def main() -> int:
    guest = assemble((Path(__file__).parent / "hello_guest.S").read_text(), origin=LOAD_ADDRESS)
    conn = Connection.from_env()
    memory = conn.create_memory(0, 0x10000)
    memory.mmap[LOAD_ADDRESS : LOAD_ADDRESS + len(guest)] = guest
    conn.reserve_range(Space.IOPORT, SERIAL, 8)
    conn.reserve_range(Space.IOPORT, RESULT_PORT, 2)
    vcpus = conn.get_vcpus()
    demo = Demo()
    threads = [threading.Thread(target=demo.serve, args=(v,), daemon=True) for v in vcpus]
    for thread in threads:
        thread.start()
    conn.start()
    for _ in vcpus:
        demo.done.acquire()
    ok = demo.result == EXPECTED
    verdict = "correct" if ok else f"WRONG, expected {EXPECTED}"
    demo.say(f"vcpu 0 computed the sum of squares 1..100 = {demo.result}: {verdict}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
