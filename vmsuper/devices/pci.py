"""PCI configuration mechanism #1 (ports 0xcf8/0xcfc) and the config space of PCI functions.

`PciHost` is the host bridge's I/O face: the address register at 0xcf8 selects bus, device,
function and register, the data window 0xcfc-0xcff reads and writes that function's config
space. Port 0xcf9, inside the same block, is the PIIX's reset control register (as on real
chipsets and in QEMU): writing bit 2 asks for a reset. Only bus 0 exists; an absent function
reads as all ones, which is how a guest learns it is absent.

`PciFunction` is 256 bytes of config space with a mask of the bits the guest may write; I/O
BARs size themselves through that mask (write all ones, read back the size).
"""

from __future__ import annotations

from collections.abc import Sequence

from .base import NO_ACTIONS, Actions, Device, PortRange, Reply, ResetRequest, value_bytes

CONFIG_ADDRESS = 0xCF8
RESET_CONTROL = 0xCF9
CONFIG_DATA = 0xCFC
ENABLE = 1 << 31

VENDOR_ID = 0x00
DEVICE_ID = 0x02
COMMAND = 0x04
REVISION = 0x08
CLASS_PROG = 0x09
HEADER_TYPE = 0x0E
BAR0 = 0x10
SUBSYSTEM_VENDOR_ID = 0x2C
SUBSYSTEM_ID = 0x2E
INTERRUPT_LINE = 0x3C
INTERRUPT_PIN = 0x3D

HEADER_MULTIFUNCTION = 0x80
COMMAND_WRITABLE = 0x0547  # I/O, memory, bus master, parity, SERR, INTx disable
RESET_CPU = 0x04
RESET_HARD = 0x02


class PciFunction:
    """One function's config space. Subclasses add registers by widening `writable`."""

    def __init__(
        self,
        *,
        vendor: int,
        device: int,
        class_code: int,
        revision: int = 0,
        header_type: int = 0,
        subsystem: tuple[int, int] = (0, 0),
        interrupt_pin: int = 0,
    ) -> None:
        self.config = bytearray(256)
        self.writable = bytearray(256)
        self.config[VENDOR_ID : VENDOR_ID + 2] = vendor.to_bytes(2, "little")
        self.config[DEVICE_ID : DEVICE_ID + 2] = device.to_bytes(2, "little")
        self.config[REVISION] = revision
        self.config[CLASS_PROG : CLASS_PROG + 3] = class_code.to_bytes(3, "little")
        self.config[HEADER_TYPE] = header_type
        self.config[SUBSYSTEM_VENDOR_ID : SUBSYSTEM_VENDOR_ID + 2] = subsystem[0].to_bytes(
            2, "little"
        )
        self.config[SUBSYSTEM_ID : SUBSYSTEM_ID + 2] = subsystem[1].to_bytes(2, "little")
        self.config[INTERRUPT_PIN] = interrupt_pin
        self.set_writable(COMMAND, COMMAND_WRITABLE.to_bytes(2, "little"))
        self.set_writable(0x0C, b"\xff\xff")  # cache line size, latency timer
        self.set_writable(INTERRUPT_LINE, b"\xff")

    def set_writable(self, offset: int, mask: bytes) -> None:
        self.writable[offset : offset + len(mask)] = mask

    def add_io_bar(self, index: int, size: int) -> None:
        """An I/O BAR of `size` bytes (a power of two, at least 4)."""
        offset = BAR0 + 4 * index
        self.config[offset : offset + 4] = (1).to_bytes(4, "little")
        self.set_writable(offset, (~(size - 1) & 0xFFFFFFFC).to_bytes(4, "little"))

    def bar(self, index: int) -> int:
        offset = BAR0 + 4 * index
        return int.from_bytes(self.config[offset : offset + 4], "little") & ~0x3

    def read_config(self, offset: int, length: int) -> bytes:
        return bytes(self.config[offset : offset + length])

    def write_config(self, offset: int, data: bytes) -> Actions:
        for i, byte in enumerate(data):
            mask = self.writable[offset + i]
            old = self.config[offset + i]
            self.config[offset + i] = (old & ~mask) | (byte & mask)
        return self.config_written(offset, len(data))

    def config_written(self, offset: int, length: int) -> Actions:
        """Hook for registers with side effects (PAM); `config` already holds the new bytes."""
        return NO_ACTIONS


class PciHost(Device):
    """Config mechanism #1 for bus 0, plus the reset control register at 0xcf9."""

    name = "pci"

    def __init__(self) -> None:
        self.address = 0
        self.reset_control = 0
        self.functions: dict[tuple[int, int], PciFunction] = {}

    def attach(self, device: int, function: int, pci_function: PciFunction) -> PciFunction:
        if not (0 <= device < 32 and 0 <= function < 8):
            raise ValueError(f"no PCI slot {device:#x}.{function}")
        if (device, function) in self.functions:
            raise ValueError(f"PCI slot {device:#x}.{function} is taken")
        self.functions[(device, function)] = pci_function
        return pci_function

    def ranges(self) -> Sequence[PortRange]:
        return (PortRange(CONFIG_ADDRESS, 8),)

    def read(self, address: int, length: int) -> Reply:
        if address == CONFIG_ADDRESS and length == 4:
            return Reply(value_bytes(self.address, 4))
        if address == RESET_CONTROL and length == 1:
            return Reply(bytes([self.reset_control]))
        if address >= CONFIG_DATA:
            return Reply(self._read_data(address - CONFIG_DATA, length))
        return Reply(b"\xff" * length)

    def write(self, address: int, data: bytes) -> Actions:
        if address == CONFIG_ADDRESS and len(data) == 4:
            self.address = int.from_bytes(data, "little") & 0x80FFFFFC
            return NO_ACTIONS
        if address == RESET_CONTROL and len(data) == 1:
            self.reset_control = data[0] & RESET_HARD
            if data[0] & RESET_CPU:
                return (ResetRequest(f"port {RESET_CONTROL:#x} = {data[0]:#04x}"),)
            return NO_ACTIONS
        if address >= CONFIG_DATA:
            target = self._target(address - CONFIG_DATA, len(data))
            if target is not None:
                function, offset = target
                return function.write_config(offset, data)
        return NO_ACTIONS

    def _target(self, window: int, length: int) -> tuple[PciFunction, int] | None:
        if not self.address & ENABLE or window + length > 4:
            return None
        bus = (self.address >> 16) & 0xFF
        device = (self.address >> 11) & 0x1F
        function = (self.address >> 8) & 0x7
        found = self.functions.get((device, function)) if bus == 0 else None
        if found is None:
            return None
        return found, (self.address & 0xFC) + window

    def _read_data(self, window: int, length: int) -> bytes:
        target = self._target(window, length)
        if target is None:
            return b"\xff" * length
        function, offset = target
        return function.read_config(offset, length)
