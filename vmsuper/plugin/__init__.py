"""Client library for plugins written in Python: the counterpart of crosvm's ``crosvm.h``.

A plugin connects with `Connection.from_env()` (the socket from ``CROSVM_SOCKET``), sets the
VM up (memory, reserved ranges, interrupts), calls `Connection.start()`, and runs each VCPU's
event loop: ``event = vcpu.wait()`` … handle it … ``vcpu.resume(data)``.

Everything blocks and no thread is started: use one thread per VCPU, or an event loop over
`Vcpu.fileno()` (checking `Vcpu.has_pending()`), `Connection.fileno()` and the eventfds.
Failures the server reports raise `PluginError` (an OSError with the server's errno).
"""

from .connection import Connection, sealed_memfd
from .errors import ConnectionClosedError, PluginError, ProtocolError, VcpuStateError
from .events import HypervCall, HypervSynic, Init, Io, User, VcpuEvent
from .model import CpuidEntry, IrqchipRoute, IrqRoute, MsiRoute, NetConfig, RegHint, Space
from .objects import IoEvent, IrqEvent, Memory, dirty_log_size
from .vcpu import Vcpu

__all__ = [
    "Connection",
    "ConnectionClosedError",
    "CpuidEntry",
    "HypervCall",
    "HypervSynic",
    "Init",
    "Io",
    "IoEvent",
    "IrqEvent",
    "IrqRoute",
    "IrqchipRoute",
    "Memory",
    "MsiRoute",
    "NetConfig",
    "PluginError",
    "ProtocolError",
    "RegHint",
    "Space",
    "User",
    "Vcpu",
    "VcpuEvent",
    "VcpuStateError",
    "dirty_log_size",
    "sealed_memfd",
]
