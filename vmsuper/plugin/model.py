"""Plain values exchanged with the server: address spaces, CPUID entries, routes, hints."""

from __future__ import annotations

import enum
import ipaddress
from dataclasses import dataclass

from vmsuper.shared import plugin_pb2 as pb

U32_MAX = (1 << 32) - 1
U64_MAX = (1 << 64) - 1


def check_uint(name: str, value: int, bits: int) -> int:
    """Reject what the wire cannot carry with a precise error, before anything is sent."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, not {type(value).__name__}")
    if not 0 <= value < (1 << bits):
        raise ValueError(f"{name} must fit in {bits} unsigned bits, got {value:#x}")
    return value


class Space(enum.IntEnum):
    """Address space of a reserved range, I/O event or call hint (the schema's AddressSpace)."""

    IOPORT = pb.IOPORT
    MMIO = pb.MMIO


def check_space(value: Space | int) -> Space:
    try:
        return Space(value)
    except ValueError:
        raise ValueError(f"unknown address space {value!r} (IOPORT=0, MMIO=1)") from None


@dataclass(frozen=True, slots=True)
class CpuidEntry:
    """One CPUID leaf; ``has_index`` marks ``index`` (ECX input) as significant."""

    function: int
    index: int = 0
    eax: int = 0
    ebx: int = 0
    ecx: int = 0
    edx: int = 0
    has_index: bool = False

    def __post_init__(self) -> None:
        for name in ("function", "index", "eax", "ebx", "ecx", "edx"):
            check_uint(name, getattr(self, name), 32)

    @classmethod
    def from_proto(cls, entry: pb.CpuidEntry) -> CpuidEntry:
        return cls(
            function=entry.function,
            index=entry.index,
            eax=entry.eax,
            ebx=entry.ebx,
            ecx=entry.ecx,
            edx=entry.edx,
            has_index=entry.has_index,
        )

    def to_proto(self) -> pb.CpuidEntry:
        return pb.CpuidEntry(
            function=self.function,
            has_index=self.has_index,
            index=self.index,
            eax=self.eax,
            ebx=self.ebx,
            ecx=self.ecx,
            edx=self.edx,
        )


@dataclass(frozen=True, slots=True)
class NetConfig:
    """The VM's tap device and host-side addressing.

    The caller owns ``tap_fd`` and must close it.
    """

    tap_fd: int
    host_mac: bytes
    host_ipv4: ipaddress.IPv4Address
    netmask: ipaddress.IPv4Address

    @property
    def network(self) -> ipaddress.IPv4Network:
        """The host address's network (address and netmask together)."""
        return ipaddress.IPv4Network(f"{self.host_ipv4}/{self.netmask}", strict=False)


@dataclass(frozen=True, slots=True)
class IrqchipRoute:
    """Route GSI ``irq_id`` to ``pin`` of in-kernel ``irqchip`` (0/1 PIC, 2 IOAPIC)."""

    irq_id: int
    irqchip: int
    pin: int


@dataclass(frozen=True, slots=True)
class MsiRoute:
    """Route GSI ``irq_id`` to an MSI write of ``data`` at ``address``."""

    irq_id: int
    address: int
    data: int


IrqRoute = IrqchipRoute | MsiRoute


@dataclass(frozen=True, slots=True)
class RegHint:
    """One detail of the call hint: which registers to match and what to send eagerly.

    A register left as None is not compared. The first detail whose compared registers all
    match decides whether sregs and debugregs go along with the regs.
    """

    rax: int | None = None
    rbx: int | None = None
    rcx: int | None = None
    rdx: int | None = None
    send_sregs: bool = False
    send_debugregs: bool = False

    def to_proto(self) -> pb.MainRequest.SetCallHint.RegHint:
        hint = pb.MainRequest.SetCallHint.RegHint(
            send_sregs=self.send_sregs, send_debugregs=self.send_debugregs
        )
        for name in ("rax", "rbx", "rcx", "rdx"):
            value = getattr(self, name)
            if value is not None:
                setattr(hint, name, check_uint(name, value, 64))
                setattr(hint, f"match_{name}", True)
        return hint
