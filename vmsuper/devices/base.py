"""What every device model is: a sans-I/O object fed guest accesses, returning data and actions.

A device never touches KVM, a socket or a file descriptor. The machine (`vmsuper.pc`) hands it
each access in its ranges through a `Bus` and performs the actions it returns: raise an
interrupt line, remap memory, end the run. That keeps every device testable with plain calls.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

from vmsuper.plugin.model import Space


@dataclass(frozen=True, slots=True)
class PortRange:
    """Addresses a device claims: `length` bytes from `start` in `space`.

    ``async_write`` asks for writes that do not stop the VCPU (see the plugin guide): only for
    write-only registers, because reads in such a range never reach the device.
    """

    start: int
    length: int
    space: Space = Space.IOPORT
    async_write: bool = False

    @property
    def end(self) -> int:
        return self.start + self.length


@dataclass(frozen=True, slots=True)
class SetIrq:
    """Drive interrupt line `line` (an ISA IRQ / GSI) to `level`."""

    line: int
    level: bool


@dataclass(frozen=True, slots=True)
class ExitRun:
    """End the run with exit status `status`; `reason` says why (for the log)."""

    status: int
    reason: str


@dataclass(frozen=True, slots=True)
class ResetRequest:
    """The guest asked for a machine reset; `source` names the register it used."""

    source: str


@dataclass(frozen=True, slots=True)
class RemapMemory:
    """The device changed what guest memory looks like (PAM); the machine re-reads its map."""

    device: str


@dataclass(frozen=True, slots=True)
class Transmit:
    """Bytes a device sends out of the machine (a serial port's output)."""

    source: str
    data: bytes


@dataclass(frozen=True, slots=True)
class Log:
    """A line for the machine's log (a debug console, a device's complaint)."""

    source: str
    text: str


Action = SetIrq | ExitRun | ResetRequest | RemapMemory | Transmit | Log
Actions = tuple[Action, ...]
NO_ACTIONS: Actions = ()


@dataclass(frozen=True, slots=True)
class Reply:
    """The answer to a read: the bytes the guest sees (little-endian) and actions."""

    data: bytes
    actions: Actions = NO_ACTIONS


class Device:
    """Base class of device models.

    A subclass sets `name`, returns its `ranges()`, and overrides `read` and `write`. Both get
    the absolute address; ``length`` of a read may exceed the register width when the guest
    uses string I/O (``rep insb``): a device that allows it (a data port) returns that many
    bytes, others repeat their answer per element or zero-fill.
    """

    name: ClassVar[str] = "device"

    def ranges(self) -> Sequence[PortRange]:
        raise NotImplementedError

    def read(self, address: int, length: int) -> Reply:
        return Reply(bytes(length))

    def write(self, address: int, data: bytes) -> Actions:
        return NO_ACTIONS


def value_bytes(value: int, length: int) -> bytes:
    """`value` as `length` little-endian bytes, truncated to fit (the width of a register)."""
    return (value & ((1 << (8 * length)) - 1)).to_bytes(length, "little")
