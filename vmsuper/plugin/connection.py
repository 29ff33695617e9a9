"""The main connection: VM-wide requests over the SOCK_SEQPACKET socket from CROSVM_SOCKET.

One request per datagram, one response back, fds as SCM_RIGHTS. Every response must carry the
same oneof case as its request, even on failure (PROTOCOL.md); anything else is a
`ProtocolError`. A non-zero errno becomes `PluginError`.

A `Connection` may be shared by threads: each request/response pair holds a lock. More
connections (`new_connection`) let threads talk to the server without waiting for each
other; all connections of one plugin share the object id space and the VCPU list, and the
VCPU channels are closed when the last connection is closed.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import ipaddress
import mmap
import os
import socket
import threading
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Self, TypeVar

from vmsuper.shared import kvm, wire
from vmsuper.shared import plugin_pb2 as pb

from .channel import channels_from_fds, close_quietly
from .errors import ConnectionClosedError, PluginError, ProtocolError
from .ids import IdAllocator
from .model import (
    CpuidEntry,
    IrqchipRoute,
    IrqRoute,
    MsiRoute,
    NetConfig,
    RegHint,
    Space,
    check_space,
    check_uint,
)
from .objects import DIRTY_PAGE_SIZE, IoEvent, IrqEvent, Memory
from .responses import MAIN_LOG, checked_response
from .structs import StructLike, struct_from_bytes, struct_to_bytes
from .vcpu import Vcpu

if TYPE_CHECKING:
    from types import TracebackType

S = TypeVar("S", bound=ctypes.Structure)

SOCKET_ENV = "CROSVM_SOCKET"
MAX_RESPONSE = 64 << 20
"""Largest response accepted: a dirty bitmap of 2 TiB of memory fits."""
MEMFD_NAME = "vmsuper-guest-memory"
MAC_LENGTH = 6
IOEVENT_LENGTHS = (0, 1, 2, 4, 8)

StateSet = pb.MainRequest.StateSet


class _Shared:
    """What all connections of one plugin process share."""

    def __init__(self) -> None:
        self.ids = IdAllocator()
        self.lock = threading.Lock()
        self.vcpus: list[Vcpu] | None = None
        self.open_connections = 0


class Connection:
    """A main connection to the server (crosvm's ``struct crosvm``)."""

    def __init__(self, sock: socket.socket, *, _shared: _Shared | None = None) -> None:
        """Wrap a connected SOCK_SEQPACKET socket (owned from now on).

        Prefer `from_env`; ``_shared`` is for `new_connection`.
        """
        if sock.type != socket.SOCK_SEQPACKET:
            raise PluginError(errno.EPROTOTYPE, "main socket is not SOCK_SEQPACKET", "connect")
        self._sock = sock
        self._lock = threading.Lock()
        self._closed = False
        self._shared = _shared if _shared is not None else _Shared()
        with self._shared.lock:
            self._shared.open_connections += 1

    @classmethod
    def from_fd(cls, fd: int) -> Connection:
        """Take over `fd`, a connected SOCK_SEQPACKET socket, and make it close-on-exec."""
        try:
            sock = socket.socket(fileno=fd)
        except OSError as exc:
            code = exc.errno if exc.errno is not None else errno.EBADF
            raise PluginError(code, f"fd {fd} is not a usable socket", "connect") from exc
        try:
            sock.set_inheritable(False)
            return cls(sock)
        except BaseException:
            sock.close()
            raise

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Connection:
        """Connect through the socket whose fd number is in ``CROSVM_SOCKET``.

        Missing variable → PluginError(ENOTCONN); not a non-negative number → EINVAL.
        """
        env = os.environ if environ is None else environ
        value = env.get(SOCKET_ENV)
        if value is None:
            raise PluginError(errno.ENOTCONN, f"{SOCKET_ENV} is not set", "connect")
        try:
            fd = int(value)
        except ValueError:
            fd = -1
        if fd < 0:
            raise PluginError(errno.EINVAL, f"{SOCKET_ENV}={value!r} is not an fd", "connect")
        return cls.from_fd(fd)

    def __repr__(self) -> str:
        return f"<Connection fd={-1 if self._closed else self._sock.fileno()}>"

    def fileno(self) -> int:
        return self._sock.fileno()

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Close this connection (idempotent); closing the last one closes the VCPU channels.

        Objects created here are not destroyed: the server keeps them until the VM goes down.
        """
        if self._closed:
            return
        self._closed = True
        self._sock.close()
        shared = self._shared
        with shared.lock:
            shared.open_connections -= 1
            vcpus = shared.vcpus if shared.open_connections == 0 else None
            if vcpus is not None:
                shared.vcpus = None
        for vcpu in vcpus or ():
            vcpu.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # --- connections, VCPUs, start -----------------------------------------------------------

    def new_connection(self) -> Connection:
        """A new, independent main connection sharing ids and VCPUs with this one."""
        _, fds = self._transact(
            pb.MainRequest(new_connection=pb.MainRequest.NewConnection()), expect_fds=1
        )
        try:
            sock = socket.socket(fileno=fds[0])
        except OSError:
            os.close(fds[0])
            raise
        try:
            return Connection(sock, _shared=self._shared)
        except BaseException:
            sock.close()
            raise

    def get_vcpus(self) -> list[Vcpu]:
        """The VCPUs, in order. Fetched once per plugin; every call returns the same objects.

        The transport is recognised from the fds (sockets: one per VCPU; pipes: two per VCPU).
        Each VCPU's first Wait is sent at once, so its fd can be polled before `start`.
        """
        shared = self._shared
        with shared.lock:
            if shared.vcpus is not None:
                return list(shared.vcpus)
            _, fds = self._transact(
                pb.MainRequest(get_vcpus=pb.MainRequest.GetVcpus()),
                expect_fds=None,
                max_fds=wire.SCM_MAX_FD,
            )
            vcpus = [Vcpu(i, ch) for i, ch in enumerate(channels_from_fds(fds))]
            try:
                for vcpu in vcpus:
                    vcpu.send_initial_wait()
            except BaseException:
                for vcpu in vcpus:
                    vcpu.close()
                raise
            shared.vcpus = vcpus
            return list(vcpus)

    def get_vcpu(self, index: int) -> Vcpu:
        """VCPU `index`; IndexError if there is no such VCPU."""
        vcpus = self.get_vcpus()
        if not 0 <= index < len(vcpus):
            raise IndexError(f"no VCPU {index}: the VM has {len(vcpus)}")
        return vcpus[index]

    def start(self) -> None:
        """Create the VCPUs and run the VM; each VCPU's first event is `Init`."""
        self._transact(pb.MainRequest(start=pb.MainRequest.Start()))

    def pause_vcpus(self, cpu_mask: int, user: int = 0) -> None:
        """Make each VCPU in `cpu_mask` (bit n = VCPU n) stop with a `User(user)` event."""
        request = pb.MainRequest()
        request.pause_vcpus.cpu_mask = check_uint("cpu_mask", cpu_mask, 64)
        request.pause_vcpus.user = check_uint("user", user, 64)
        request.pause_vcpus.SetInParent()
        self._transact(request)

    # --- queries -----------------------------------------------------------------------------

    def get_shutdown_eventfd(self) -> int:
        """An fd of the VM's shutdown eventfd (signalled when the VM shuts down).

        Every call returns a new fd of the same eventfd; the caller owns it and must close it.
        """
        _, fds = self._transact(
            pb.MainRequest(get_shutdown_eventfd=pb.MainRequest.GetShutdownEventfd()),
            expect_fds=1,
        )
        return fds[0]

    def check_extension(self, extension: int) -> bool:
        """Whether KVM supports `extension` (a ``KVM_CAP_*`` number) on this VM."""
        request = pb.MainRequest()
        request.check_extension.extension = check_uint("extension", extension, 32)
        request.check_extension.SetInParent()
        response, _ = self._transact(request)
        return response.check_extension.has_extension

    def get_supported_cpuid(self) -> list[CpuidEntry]:
        """``KVM_GET_SUPPORTED_CPUID``."""
        request = pb.MainRequest(get_supported_cpuid=pb.MainRequest.CpuidRequest())
        response, _ = self._transact(request)
        return [CpuidEntry.from_proto(e) for e in response.get_supported_cpuid.entries]

    def get_emulated_cpuid(self) -> list[CpuidEntry]:
        """``KVM_GET_EMULATED_CPUID``."""
        request = pb.MainRequest(get_emulated_cpuid=pb.MainRequest.CpuidRequest())
        response, _ = self._transact(request)
        return [CpuidEntry.from_proto(e) for e in response.get_emulated_cpuid.entries]

    def get_msr_index_list(self) -> list[int]:
        """``KVM_GET_MSR_INDEX_LIST``."""
        request = pb.MainRequest(get_msr_index_list=pb.MainRequest.MsrListRequest())
        response, _ = self._transact(request)
        return list(response.get_msr_index_list.indices)

    def get_net_config(self) -> NetConfig:
        """The VM's tap fd (owned by the caller) and host MAC / IPv4 address / netmask.

        The wire carries the addresses as fixed32 whose in-memory (little-endian) bytes are
        the address in network order, i.e. a C ``in_addr.s_addr``.
        """
        response, fds = self._transact(
            pb.MainRequest(get_net_config=pb.MainRequest.GetNetConfig()), expect_fds=1
        )
        config = response.get_net_config
        if len(config.host_mac_address) != MAC_LENGTH:
            os.close(fds[0])
            raise ProtocolError(
                f"host MAC of {len(config.host_mac_address)} bytes", "get_net_config"
            )
        return NetConfig(
            tap_fd=fds[0],
            host_mac=bytes(config.host_mac_address),
            host_ipv4=ipaddress.IPv4Address(config.host_ipv4_address.to_bytes(4, "little")),
            netmask=ipaddress.IPv4Address(config.netmask.to_bytes(4, "little")),
        )

    # --- address ranges, interrupts, hints ---------------------------------------------------

    def reserve_range(
        self, space: Space | int, start: int, length: int, *, async_write: bool = False
    ) -> None:
        """Claim [start, start + length) of `space`: guest accesses there become `Io` events.

        With ``async_write``, writes there do not stop the VCPU (``Io.no_resume``).
        """
        if check_uint("length", length, 64) == 0:
            raise ValueError("length must be positive (release_range releases a range)")
        self._reserve(space, start, length, async_write)

    def release_range(self, space: Space | int, start: int) -> None:
        """Release the reserved range that starts at `start`."""
        self._reserve(space, start, 0, False)

    def _reserve(self, space: Space | int, start: int, length: int, async_write: bool) -> None:
        request = pb.MainRequest()
        reserve = request.reserve_range
        reserve.space = check_space(space).value
        reserve.start = check_uint("start", start, 64)
        reserve.length = length
        reserve.async_write = async_write
        reserve.SetInParent()
        self._transact(request)

    def set_irq(self, irq_id: int, active: bool) -> None:
        """Set the level of interrupt line `irq_id` (``KVM_IRQ_LINE``)."""
        request = pb.MainRequest()
        request.set_irq.irq_id = check_uint("irq_id", irq_id, 32)
        request.set_irq.active = active
        request.set_irq.SetInParent()
        self._transact(request)

    def set_irq_routing(self, routes: Iterable[IrqRoute]) -> None:
        """Replace the GSI routing table."""
        request = pb.MainRequest()
        table = request.set_irq_routing
        table.SetInParent()
        for route in routes:
            entry = table.routes.add(irq_id=check_uint("irq_id", route.irq_id, 32))
            if isinstance(route, IrqchipRoute):
                entry.irqchip.irqchip = check_uint("irqchip", route.irqchip, 32)
                entry.irqchip.pin = check_uint("pin", route.pin, 32)
                entry.irqchip.SetInParent()
            elif isinstance(route, MsiRoute):
                entry.msi.address = check_uint("address", route.address, 64)
                entry.msi.data = check_uint("data", route.data, 32)
                entry.msi.SetInParent()
            else:
                raise TypeError(f"not an IrqchipRoute or MsiRoute: {route!r}")
        self._transact(request)

    def set_call_hint(
        self,
        space: Space | int,
        address: int,
        on_write: bool,
        hints: Sequence[RegHint] = (),
    ) -> None:
        """Ask for registers to come eagerly with `Io` events at (space, address).

        Registers (regs always; sregs/debugregs per the first matching `RegHint`) arrive with
        the event, so `Vcpu.get_regs` & co. answer without a round trip. One hint at a time:
        this replaces the previous one.
        """
        if check_uint("address", address, 64) == 0:
            raise ValueError("address 0 clears the hint: use clear_call_hint()")
        self._call_hint(check_space(space), address, on_write, hints)

    def clear_call_hint(self) -> None:
        """Remove the call hint."""
        self._call_hint(Space.IOPORT, 0, False, ())

    def _call_hint(
        self, space: Space, address: int, on_write: bool, hints: Sequence[RegHint]
    ) -> None:
        request = pb.MainRequest()
        hint = request.set_call_hint
        hint.space = space.value
        hint.address = address
        hint.on_write = on_write
        hint.hints.extend(h.to_proto() for h in hints)
        hint.SetInParent()
        self._transact(request)

    def set_identity_map_addr(self, address: int) -> None:
        """``KVM_SET_IDENTITY_MAP_ADDR`` (only meaningful before `start`)."""
        request = pb.MainRequest()
        request.set_identity_map_addr.address = check_uint("address", address, 32)
        request.set_identity_map_addr.SetInParent()
        self._transact(request)

    # --- VM state ----------------------------------------------------------------------------

    def get_pic_state(self, primary: bool) -> kvm.kvm_pic_state:
        """State of the primary (PIC0) or secondary (PIC1) interrupt controller."""
        return self._get_state(
            kvm.kvm_pic_state, pb.MainRequest.PIC0 if primary else pb.MainRequest.PIC1
        )

    def set_pic_state(self, primary: bool, state: StructLike) -> None:
        self._set_state(
            kvm.kvm_pic_state, pb.MainRequest.PIC0 if primary else pb.MainRequest.PIC1, state
        )

    def get_ioapic_state(self) -> kvm.kvm_ioapic_state:
        return self._get_state(kvm.kvm_ioapic_state, pb.MainRequest.IOAPIC)

    def set_ioapic_state(self, state: StructLike) -> None:
        self._set_state(kvm.kvm_ioapic_state, pb.MainRequest.IOAPIC, state)

    def get_pit_state(self) -> kvm.kvm_pit_state2:
        return self._get_state(kvm.kvm_pit_state2, pb.MainRequest.PIT)

    def set_pit_state(self, state: StructLike) -> None:
        self._set_state(kvm.kvm_pit_state2, pb.MainRequest.PIT, state)

    def get_clock(self) -> kvm.kvm_clock_data:
        return self._get_state(kvm.kvm_clock_data, pb.MainRequest.CLOCK)

    def set_clock(self, clock: StructLike) -> None:
        self._set_state(kvm.kvm_clock_data, pb.MainRequest.CLOCK, clock)

    def _get_state(self, cls: type[S], state_set: StateSet) -> S:
        request = pb.MainRequest()
        request.get_state.set = state_set
        request.get_state.SetInParent()
        response, _ = self._transact(request)
        return struct_from_bytes(cls, response.get_state.state, "get_state")

    def _set_state(
        self, cls: type[ctypes.Structure], state_set: StateSet, value: StructLike
    ) -> None:
        request = pb.MainRequest()
        request.set_state.set = state_set
        request.set_state.state = struct_to_bytes(cls, value)
        request.set_state.SetInParent()
        self._transact(request)

    # --- objects -----------------------------------------------------------------------------

    def create_io_event(
        self, space: Space | int, address: int, length: int = 0, datamatch: int = 0
    ) -> IoEvent:
        """An eventfd signalled by guest writes at (space, address), without a VCPU exit.

        ``length`` 0 matches any write; 1/2/4/8 match only writes of that size whose value is
        ``datamatch``.
        """
        space = check_space(space)
        check_uint("address", address, 64)
        if length not in IOEVENT_LENGTHS:
            raise ValueError(f"length must be one of {IOEVENT_LENGTHS}, got {length!r}")
        if length == 0 and datamatch != 0:
            raise ValueError("datamatch needs a length (1, 2, 4 or 8)")
        check_uint("datamatch", datamatch, 8 * length or 64)
        request = pb.MainRequest()
        io_event = request.create.io_event
        io_event.space = space.value
        io_event.address = address
        io_event.length = length
        io_event.datamatch = datamatch
        io_event.SetInParent()
        ident, fds = self._create(request, expect_fds=1)
        return IoEvent(self, ident, fds[0], space, address, length, datamatch)

    def create_memory(
        self,
        start: int,
        length: int,
        *,
        read_only: bool = False,
        dirty_log: bool = False,
        fd: int | None = None,
        offset: int = 0,
    ) -> Memory:
        """Guest memory at guest-physical `start`, `length` bytes, mapped writable for the plugin.

        Without `fd` the SDK makes a sealed memfd of `length` bytes (owned by the Memory).
        With `fd` (still owned by the caller), [offset, offset + length) of it is used; the
        server requires it to be a memfd sealed with ``F_SEAL_SHRINK``. `offset` and `length`
        must be multiples of 4 KiB. ``dirty_log`` enables `Memory.dirty_log`.
        """
        check_uint("start", start, 64)
        if check_uint("length", length, 64) == 0 or length % DIRTY_PAGE_SIZE:
            raise ValueError(f"length must be a positive multiple of 4 KiB, got {length:#x}")
        if check_uint("offset", offset, 64) % DIRTY_PAGE_SIZE:
            raise ValueError(f"offset must be a multiple of 4 KiB, got {offset:#x}")
        owns_fd = fd is None
        if fd is None:
            if offset:
                raise ValueError("offset applies only to a caller-provided fd")
            fd = sealed_memfd(length)
        try:
            mapping = _map(fd, length, offset)
        except BaseException:
            if owns_fd:
                os.close(fd)
            raise
        request = pb.MainRequest()
        memory = request.create.memory
        memory.offset = offset
        memory.start = start
        memory.length = length
        memory.read_only = read_only
        memory.dirty_log = dirty_log
        memory.SetInParent()
        try:
            ident, _ = self._create(request, expect_fds=0, send_fds=(fd,))
        except BaseException:
            mapping.close()
            if owns_fd:
                os.close(fd)
            raise
        return Memory(
            self,
            ident,
            memfd=fd,
            owns_fd=owns_fd,
            offset=offset,
            start=start,
            length=length,
            read_only=read_only,
            dirty_logging=dirty_log,
            mapping=mapping,
        )

    def create_irq_event(self, irq_id: int) -> IrqEvent:
        """A trigger/resample eventfd pair bound to GSI `irq_id` (``KVM_IRQFD``, resample)."""
        request = pb.MainRequest()
        irq_event = request.create.irq_event
        irq_event.irq_id = check_uint("irq_id", irq_id, 32)
        irq_event.resample = True
        ident, fds = self._create(request, expect_fds=2)
        return IrqEvent(self, ident, irq_id, fds[0], fds[1])

    def destroy(self, ident: int) -> None:
        """Destroy object `ident`; its id becomes free for reuse.

        Prefer the objects' own ``destroy``, which also closes their fds.
        """
        request = pb.MainRequest()
        request.destroy.id = check_uint("id", ident, 32)
        request.destroy.SetInParent()
        try:
            self._transact(request)
        except PluginError as exc:
            if exc.errno == errno.ENOENT:  # the server has no such object: the id is free
                self._shared.ids.free(ident)
            raise
        self._shared.ids.free(ident)

    def memory_dirty_log(self, ident: int) -> bytes:
        """The raw dirty bitmap of memory object `ident` (see `Memory.dirty_log`)."""
        request = pb.MainRequest()
        request.dirty_log.id = check_uint("id", ident, 32)
        request.dirty_log.SetInParent()
        response, _ = self._transact(request)
        return bytes(response.dirty_log.bitmap)

    def _create(
        self, request: pb.MainRequest, *, expect_fds: int, send_fds: Sequence[int] = ()
    ) -> tuple[int, list[int]]:
        """Send a Create with a fresh id; on failure the id goes back to the pool.

        If the server created the object but answered with the wrong fds, the object is
        destroyed again (best effort) so the id is really free.
        """
        ids = self._shared.ids
        ident = ids.alloc()
        request.create.id = ident
        try:
            _, fds = self._transact(request, send_fds=send_fds, expect_fds=None)
        except BaseException:
            ids.free(ident)
            raise
        if len(fds) != expect_fds:
            close_quietly(fds)
            try:
                self.destroy(ident)
            except OSError:
                ids.free(ident)
            raise ProtocolError(f"expected {expect_fds} fds, got {len(fds)}", "create")
        return ident, fds

    # --- transport ---------------------------------------------------------------------------

    def _transact(
        self,
        request: pb.MainRequest,
        *,
        send_fds: Sequence[int] = (),
        expect_fds: int | None = 0,
        max_fds: int = wire.MAX_FDS,
    ) -> tuple[pb.MainResponse, list[int]]:
        """Send `request`, return the checked response and its fds (owned by the caller).

        ``expect_fds`` is the exact fd count of a successful answer (None: any). On any
        error the received fds are closed.
        """
        case = request.WhichOneof("message")
        assert case is not None, "request without a message"
        if self._closed:
            raise PluginError(errno.EBADF, "connection is closed", case)
        data = request.SerializeToString()
        with self._lock:
            try:
                wire.send_datagram(self._sock, data, send_fds)
                datagram = wire.recv_datagram(self._sock, max_size=MAX_RESPONSE, max_fds=max_fds)
            except (BrokenPipeError, ConnectionResetError) as exc:
                raise ConnectionClosedError(request=case) from exc
            except wire.MessageTooLarge as exc:
                raise PluginError(errno.EMSGSIZE, str(exc), case) from exc
            except wire.WireError as exc:
                raise ProtocolError(f"bad response datagram: {exc}", case) from exc
        if datagram is None:
            raise ConnectionClosedError(request=case)
        try:
            response = checked_response(datagram.data, pb.MainResponse(), case, case, log=MAIN_LOG)
            if expect_fds is not None and len(datagram.fds) != expect_fds:
                raise ProtocolError(
                    f"expected {expect_fds} fds with the response, got {len(datagram.fds)}", case
                )
        except BaseException:
            datagram.close_fds()
            raise
        return response, datagram.fds


def sealed_memfd(length: int, name: str = MEMFD_NAME) -> int:
    """A close-on-exec memfd of `length` bytes sealed against shrinking (what Create needs)."""
    fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, length)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _map(fd: int, length: int, offset: int) -> mmap.mmap:
    """Shared mapping of the memory, writable when the fd allows it."""
    try:
        return mmap.mmap(
            fd, length, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=offset
        )
    except PermissionError:
        return mmap.mmap(fd, length, mmap.MAP_SHARED, mmap.PROT_READ, offset=offset)
