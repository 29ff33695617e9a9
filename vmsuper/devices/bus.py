"""Route a VCPU's I/O and MMIO accesses to the device that claims the address."""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Iterator

from vmsuper.plugin.model import Space

from .base import NO_ACTIONS, Actions, Device, PortRange, Reply


class BusError(ValueError):
    """Two devices claim overlapping addresses."""


class Bus:
    """Devices by address range, in both address spaces; lookup is a bisect.

    Accesses nobody claims read as all ones for I/O ports (an ISA bus with nothing on it) and
    zeros for MMIO, and writes to them are dropped: the guest's view of an empty slot.
    """

    def __init__(self, devices: Iterable[Device] = ()) -> None:
        self._starts: dict[Space, list[int]] = {Space.IOPORT: [], Space.MMIO: []}
        self._entries: dict[Space, list[tuple[PortRange, Device]]] = {
            Space.IOPORT: [],
            Space.MMIO: [],
        }
        self.devices: list[Device] = []
        for device in devices:
            self.add(device)

    def add(self, device: Device) -> Device:
        for claimed in device.ranges():
            self._insert(claimed, device)
        self.devices.append(device)
        return device

    def _insert(self, claimed: PortRange, device: Device) -> None:
        starts = self._starts[claimed.space]
        entries = self._entries[claimed.space]
        index = bisect.bisect_left(starts, claimed.start)
        neighbours = entries[max(index - 1, 0) : index + 1]
        for other, owner in neighbours:
            if other.start < claimed.end and claimed.start < other.end:
                raise BusError(
                    f"{device.name} claims {claimed.space.name} {claimed.start:#x}+"
                    f"{claimed.length:#x}, which overlaps {owner.name}'s {other.start:#x}+"
                    f"{other.length:#x}"
                )
        starts.insert(index, claimed.start)
        entries.insert(index, (claimed, device))

    def ranges(self) -> Iterator[tuple[PortRange, Device]]:
        """Every claimed range with its device, in address order (to reserve them)."""
        for space in (Space.IOPORT, Space.MMIO):
            yield from self._entries[space]

    def find(self, space: Space, address: int) -> Device | None:
        starts = self._starts[space]
        index = bisect.bisect_right(starts, address) - 1
        if index < 0:
            return None
        claimed, device = self._entries[space][index]
        return device if address < claimed.end else None

    def read(self, space: Space, address: int, length: int) -> Reply:
        device = self.find(space, address)
        if device is None:
            return Reply(b"\xff" * length if space == Space.IOPORT else bytes(length))
        return device.read(address, length)

    def write(self, space: Space, address: int, data: bytes) -> Actions:
        device = self.find(space, address)
        if device is None:
            return NO_ACTIONS
        return device.write(address, data)
