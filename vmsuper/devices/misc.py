"""Small PC devices: isa-debug-exit, the debug console, and system control port A (0x92)."""

from __future__ import annotations

from collections.abc import Sequence

from .base import NO_ACTIONS, Actions, Device, ExitRun, Log, PortRange, Reply, ResetRequest

DEBUG_EXIT_PORT = 0xF4
DEBUGCON_PORT = 0x402
DEBUGCON_READBACK = 0xE9  # what QEMU's debugcon reads as; SeaBIOS logs there only if it does
PORT_A = 0x92
PORT_A_RESET = 0x01
PORT_A_A20 = 0x02


class DebugExit(Device):
    """QEMU's isa-debug-exit: writing v ends the run with status (v << 1) | 1.

    Writes are asynchronous: the guest is not stopped for them, and the run ends as soon as
    the machine sees the write, in order with the guest's other output.
    """

    name = "debug-exit"

    def __init__(self, base: int = DEBUG_EXIT_PORT, size: int = 4) -> None:
        self.base = base
        self.size = size

    def ranges(self) -> Sequence[PortRange]:
        return (PortRange(self.base, self.size, async_write=True),)

    def write(self, address: int, data: bytes) -> Actions:
        value = int.from_bytes(data[: self.size], "little")
        status = ((value << 1) | 1) & 0xFF
        return (ExitRun(status, f"the guest wrote {value:#x} to port {address:#x}"),)


class DebugCon(Device):
    """QEMU's debugcon at 0x402: bytes become log lines; reads give 0xe9 so that firmware
    knows the console is there. Both directions stop the VCPU (a read must be answered)."""

    name = "debugcon"

    def __init__(self, port: int = DEBUGCON_PORT) -> None:
        self.port = port
        self.line = bytearray()

    def ranges(self) -> Sequence[PortRange]:
        return (PortRange(self.port, 1),)

    def read(self, address: int, length: int) -> Reply:
        return Reply(bytes([DEBUGCON_READBACK]) * length)

    def write(self, address: int, data: bytes) -> Actions:
        lines = []
        for byte in data:
            if byte == 0x0A:
                lines.append(Log(self.name, self.line.decode(errors="replace").rstrip("\r")))
                self.line.clear()
            else:
                self.line.append(byte)
        return tuple(lines)


class PortA(Device):
    """System control port A (0x92): the fast A20 gate (bit 1) and a reset pulse (bit 0).

    The A20 bit is remembered and read back; KVM has no A20 mask, so addresses never wrap.
    """

    name = "port-a"

    def __init__(self) -> None:
        self.value = PORT_A_A20

    def ranges(self) -> Sequence[PortRange]:
        return (PortRange(PORT_A, 1),)

    def read(self, address: int, length: int) -> Reply:
        return Reply(bytes([self.value]) * length)

    def write(self, address: int, data: bytes) -> Actions:
        value = data[0]
        self.value = value & ~PORT_A_RESET
        if value & PORT_A_RESET:
            return (ResetRequest(f"port {PORT_A:#x} = {value:#04x}"),)
        return NO_ACTIONS
