"""The benchmark plugin written on the Python SDK (`vmsuper.plugin`): the same modes, arguments
and JSON report as `native_plugin.c`, so the two can be compared run for run.

    python sdk_plugin.py trivial
    python sdk_plugin.py MODE EXITS GUEST_BIN START_PORT LOOP_PORT DONE_PORT [FIFO]

Run as a script by vmsuper (the harness makes the interpreter the plugin executable), so it
imports nothing from the `benchmarks` package.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from vmsuper.plugin import Connection, Init, Io, IoEvent, Space, Vcpu
from vmsuper.shared import kvm

LOAD_ADDRESS = 0x1000
MEMORY_SIZE = 0x10000
MODES = ("loop", "async", "ioevent", "hold")


@dataclass
class VcpuTimes:
    t_init: float = 0.0
    t_first: float = 0.0
    t_done: float = 0.0
    exits: int = 0
    other_exits: int = 0


@dataclass(frozen=True)
class Ports:
    start: int
    loop: int
    done: int


def set_up(vcpu: Vcpu) -> None:
    """Real mode at CS = DS = SS = 0 from LOAD_ADDRESS; application processors made runnable."""
    sregs = vcpu.get_sregs()
    for seg in (sregs.cs, sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss):
        seg.base = 0
        seg.selector = 0
    vcpu.set_sregs(sregs)
    regs = kvm.kvm_regs()
    regs.rip = LOAD_ADDRESS
    regs.rflags = 0x2
    vcpu.set_regs(regs)
    if vcpu.index != 0:
        vcpu.set_mp_state(kvm.kvm_mp_state(mp_state=kvm.KVM_MP_STATE_RUNNABLE))


def serve(vcpu: Vcpu, ports: Ports, hold: bool, times: VcpuTimes) -> None:
    """Answer this VCPU's exits until DONE (or START when holding), timing them."""
    monotonic = time.monotonic
    while True:
        event = vcpu.wait()
        now = monotonic()
        if isinstance(event, Init):
            times.t_init = now
            set_up(vcpu)
            vcpu.resume()
            continue
        if not isinstance(event, Io):
            times.other_exits += 1
            vcpu.resume()
            continue
        if event.address == ports.loop:
            times.exits += 1
        elif event.address == ports.start:
            times.t_first = now
            if hold:
                return
        elif event.address == ports.done:
            times.t_done = now
            return  # left stopped: the plugin exits next
        else:
            times.other_exits += 1
        if not event.no_resume:
            vcpu.resume()


def main(argv: list[str]) -> int:
    t_main = time.monotonic()
    if argv == ["trivial"]:
        return 0
    if not 6 <= len(argv) <= 7 or argv[0] not in MODES:
        print(f"usage: sdk_plugin.py {'|'.join(MODES)} EXITS GUEST START LOOP DONE [FIFO]")
        return 2
    mode = argv[0]
    expected = int(argv[1], 0)
    guest = Path(argv[2]).read_bytes()
    ports = Ports(*(int(a, 0) for a in argv[3:6]))
    fifo = argv[6] if len(argv) == 7 else None

    t_first_request = time.monotonic()
    conn = Connection.from_env()
    memory = conn.create_memory(0, MEMORY_SIZE)
    memory.mmap[LOAD_ADDRESS : LOAD_ADDRESS + len(guest)] = guest
    conn.reserve_range(Space.IOPORT, ports.start, 1)
    conn.reserve_range(Space.IOPORT, ports.done, 1)
    io_event: IoEvent | None = None
    if mode in ("loop", "async"):
        conn.reserve_range(Space.IOPORT, ports.loop, 1, async_write=mode == "async")
    elif mode == "ioevent":
        io_event = conn.create_io_event(Space.IOPORT, ports.loop)
    vcpus = conn.get_vcpus()
    times = [VcpuTimes() for _ in vcpus]
    threads = [
        threading.Thread(target=serve, args=(v, ports, mode == "hold", t), daemon=True)
        for v, t in zip(vcpus, times, strict=True)
    ]
    for thread in threads:
        thread.start()
    t_start_sent = time.monotonic()
    conn.start()
    t_started = time.monotonic()
    for thread in threads:
        thread.join()
    t_all_done = time.monotonic()
    report = {
        "bench": "sdk",
        "mode": mode,
        "pid": os.getpid(),
        "expected_exits": expected,
        "t_main": t_main,
        "t_first_request": t_first_request,
        "t_start_sent": t_start_sent,
        "t_started": t_started,
        "t_all_done": t_all_done,
        "ioevents": io_event.read() if io_event is not None else 0,
        "vcpus": [asdict(t) for t in times],
    }
    print(json.dumps(report), flush=True)
    if fifo is not None:
        with open(fifo, "rb") as f:
            f.read(1)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
