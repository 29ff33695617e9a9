"""Device models for machines built on the plugin SDK (`vmsuper.pc` is one).

Every device is a sans-I/O object: the machine feeds it the guest's port or MMIO accesses
(through a `Bus`) and performs the actions it returns. See docs/devices.md.
"""

from .ata import AtaChannel
from .base import (
    Action,
    Actions,
    Device,
    ExitRun,
    Log,
    PortRange,
    RemapMemory,
    Reply,
    ResetRequest,
    SetIrq,
    Transmit,
)
from .bus import Bus, BusError
from .chipset import I440fxHost, PamSegment, Piix3Ide, Piix3Isa, pam_segments
from .cmos import Cmos
from .disk import Disk, DiskError, ImageDisk, MemoryDisk
from .fw_cfg import FwCfg
from .i8042 import I8042
from .misc import DebugCon, DebugExit, PortA
from .pci import PciFunction, PciHost
from .uart import Uart16550

__all__ = [
    "I8042",
    "Action",
    "Actions",
    "AtaChannel",
    "Bus",
    "BusError",
    "Cmos",
    "DebugCon",
    "DebugExit",
    "Device",
    "Disk",
    "DiskError",
    "ExitRun",
    "FwCfg",
    "I440fxHost",
    "ImageDisk",
    "Log",
    "MemoryDisk",
    "PamSegment",
    "PciFunction",
    "PciHost",
    "Piix3Ide",
    "Piix3Isa",
    "PortA",
    "PortRange",
    "RemapMemory",
    "Reply",
    "ResetRequest",
    "SetIrq",
    "Transmit",
    "Uart16550",
    "pam_segments",
]
