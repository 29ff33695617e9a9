"""The PC machine: i440FX/PIIX3 devices on one bus, PC memory, and the VCPU's event loop.

`PcMachine` creates the memory and devices and claims their ranges on a connection; `run`
serves the VCPUs, one thread each, until a device ends the run, and returns the exit status.
Devices are sans-I/O: this is where their actions happen (interrupts through irqfds, memory
remaps, serial output, the end of the run).
"""

from __future__ import annotations

import os
import queue
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import BinaryIO

from vmsuper.devices import (
    I8042,
    Actions,
    AtaChannel,
    Bus,
    Cmos,
    DebugCon,
    DebugExit,
    Disk,
    ExitRun,
    FwCfg,
    I440fxHost,
    Log,
    PciHost,
    Piix3Ide,
    Piix3Isa,
    PortA,
    RemapMemory,
    ResetRequest,
    SetIrq,
    Transmit,
    Uart16550,
)
from vmsuper.devices.uart import COM1
from vmsuper.plugin import Connection, Init, Io, IrqEvent, User, Vcpu

from . import smbios
from .cpuid import cpuid_for_vcpu
from .memory import PcMemory
from .sampler import SAMPLE_TOKEN, Samples, start_sampling

IDE_BOOT_PATH = "/pci@i0cf8/*@1,1/drive@0/disk@0"
IRQ_LINES = (1, 4, 12, 14)
RESET_STATUS = 0  # like QEMU with -no-reboot: a reset request ends the run normally


@dataclass
class PcOptions:
    firmware: bytes
    disk: Disk
    ram_size: int
    cpus: int = 1  # one per VCPU of the VM
    serial_files: list[BinaryIO] = field(default_factory=list)
    serial_input: int | None = None  # fd to read COM1 input from, or None
    debugcon: bool = False
    sample_interval_s: float = 0.0  # > 0: sample the guest's instruction pointer
    log: Callable[[str], None] = lambda text: print(text, file=sys.stderr, flush=True)


class PcMachine:
    """One PC on a connection: build it, then `run` it."""

    def __init__(self, conn: Connection, options: PcOptions) -> None:
        self.conn = conn
        self.options = options
        self.lock = threading.Lock()
        self.exits: Counter[str] = Counter()
        self.memory = PcMemory(conn, ram_size=options.ram_size, firmware=options.firmware)
        self.host_bridge = I440fxHost()
        pci = PciHost()
        pci.attach(0, 0, self.host_bridge)
        pci.attach(1, 0, Piix3Isa())
        pci.attach(1, 1, Piix3Ide())
        self.uart = Uart16550(COM1, async_transmit=options.serial_input is None)
        fw_cfg = FwCfg.for_pc(
            ram_below_4g=options.ram_size,
            cpus=options.cpus,
            boot_order=[IDE_BOOT_PATH],
            serial_console=COM1,
            memory=self.memory.guest_ram,
        )
        anchor, tables = smbios.smbios_files(ram_size=options.ram_size, cpus=options.cpus)
        fw_cfg.add_file(smbios.ANCHOR_NAME, anchor)
        fw_cfg.add_file(smbios.TABLES_NAME, tables)
        self.bus = Bus(
            [
                pci,
                self.uart,
                Cmos(ram_below_4g=options.ram_size, cpus=options.cpus),
                fw_cfg,
                AtaChannel(options.disk),
                I8042(),
                PortA(),
                DebugExit(),
            ]
        )
        if options.debugcon:
            self.bus.add(DebugCon())
        for claimed, _ in self.bus.ranges():
            conn.reserve_range(
                claimed.space, claimed.start, claimed.length, async_write=claimed.async_write
            )
        self.irqs: dict[int, IrqEvent] = {line: conn.create_irq_event(line) for line in IRQ_LINES}
        self.memory.window.apply(self.host_bridge.segments())
        self.samples = Samples()
        self.supported_cpuid = conn.get_supported_cpuid()
        self.started = 0.0  # perf_counter() when the VCPU loops started
        self.handling_s = 0.0  # time from an I/O exit's arrival to its answer
        self.stop_sampling = threading.Event()

    # --- actions -----------------------------------------------------------------------------

    def perform(self, actions: Actions) -> int | None:
        """Carry out device actions; returns an exit status when one ends the run."""
        status = None
        for action in actions:
            if isinstance(action, Transmit):
                self._serial_out(action.data)
            elif isinstance(action, SetIrq):
                irq = self.irqs.get(action.line)
                if irq is not None and action.level:
                    irq.trigger()  # ISA lines are edge-triggered: a rising edge interrupts
            elif isinstance(action, RemapMemory):
                self.memory.window.apply(self.host_bridge.segments())
            elif isinstance(action, Log):
                self.options.log(f"{action.source}: {action.text}")
            elif isinstance(action, ExitRun):
                self.options.log(f"vmsuper-pc: {action.reason}: exit status {action.status}")
                status = action.status if status is None else status
            elif isinstance(action, ResetRequest):
                self.options.log(f"vmsuper-pc: the guest asked for a reset ({action.source})")
                status = RESET_STATUS if status is None else status
        return status

    def _serial_out(self, data: bytes) -> None:
        os.write(sys.stdout.fileno(), data)
        for file in self.options.serial_files:
            file.write(data)
            file.flush()

    # --- the VCPU ----------------------------------------------------------------------------

    def set_up_vcpu(self, vcpu: Vcpu) -> None:
        """The CPUID KVM supports with the VCPU's APIC ID; registers stay at reset (first fetch
        at 0xfffffff0). VCPUs after the first wait in the in-kernel local APIC until the
        firmware wakes them (INIT, then SIPI), as application processors do."""
        vcpu.set_cpuid(cpuid_for_vcpu(self.supported_cpuid, vcpu.index))

    def handle(self, event: Io) -> tuple[bytes, int | None]:
        """Serve one access: (data for a read, exit status if the run ends)."""
        with self.lock:
            if event.is_write:
                self.exits[self._label(event)] += 1
                return b"", self.perform(self.bus.write(event.space, event.address, event.data))
            self.exits[self._label(event)] += 1
            reply = self.bus.read(event.space, event.address, event.length)
            return reply.data, self.perform(reply.actions)

    def _label(self, event: Io) -> str:
        device = self.bus.find(event.space, event.address)
        return device.name if device is not None else f"{event.space.name}:{event.address:#x}"

    def run(self, vcpus: Sequence[Vcpu]) -> int:
        """Serve the VCPUs until a device ends the run; the exit status.

        Each VCPU is served on its own (daemon) thread; the run ends when any of them sees a
        device end it (or its channel fail), and the process exits then.
        """
        if self.options.serial_input is not None:
            threading.Thread(target=self._read_input, daemon=True).start()
        if self.options.sample_interval_s > 0:
            start_sampling(self.conn, self.options.sample_interval_s, self.stop_sampling)
        self.started = time.perf_counter()
        ended: queue.SimpleQueue[int | BaseException] = queue.SimpleQueue()
        for vcpu in vcpus:
            threading.Thread(
                target=self._serve_to, args=(vcpu, ended), name=f"vcpu-{vcpu.index}", daemon=True
            ).start()
        try:
            outcome = ended.get()
        finally:
            self.stop_sampling.set()
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    def _serve_to(self, vcpu: Vcpu, ended: queue.SimpleQueue[int | BaseException]) -> None:
        try:
            ended.put(self._serve(vcpu))
        except BaseException as exc:  # handed to the thread that waits
            ended.put(exc)

    def _serve(self, vcpu: Vcpu) -> int:
        while True:
            event = vcpu.wait()
            if isinstance(event, Io):
                handling = time.perf_counter()
                data, status = self.handle(event)
                if status is not None:
                    return status
                if not event.no_resume:
                    vcpu.resume(data)
                with self.lock:
                    self.handling_s += time.perf_counter() - handling
            elif isinstance(event, Init):
                self.set_up_vcpu(vcpu)
                vcpu.resume()
            elif isinstance(event, User) and event.user == SAMPLE_TOKEN:
                self.samples.add(vcpu.get_sregs().cs.base, vcpu.get_regs().rip)
                vcpu.resume()
            else:
                vcpu.resume()

    def _read_input(self) -> None:
        fd = self.options.serial_input
        assert fd is not None
        while True:
            try:
                data = os.read(fd, 256)
            except OSError:
                return
            if not data:
                return
            with self.lock:
                self.perform(self.uart.receive(data))

    def exit_summary(self) -> str:
        counts = ", ".join(f"{name} {count}" for name, count in self.exits.most_common())
        summary = f"exits by device: {counts}; memory remaps: {self.memory.window.remaps}"
        if self.started:
            run_s = time.perf_counter() - self.started
            summary += (
                f"; handling exits: {1000 * self.handling_s:.0f} ms of {run_s:.2f} s "
                f"({100 * self.handling_s / run_s:.1f}%)"
            )
        if self.options.sample_interval_s > 0:
            summary += f"; {self.samples.summary()}"
        return summary
