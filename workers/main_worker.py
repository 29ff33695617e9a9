"""Handlers for every MainRequest, run in the supervisor process by its event loop.

The worker is fed one decoded datagram (bytes + fds) and returns a `Reply` (bytes + fds to
send, and what the loop must do next); it never touches a socket itself. Every request gets a
response carrying the request's oneof case and a positive errno on failure (crosvm's client
negates it). Fds that arrive with a request that does not take them are closed, never kept.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import os
import socket
import struct
from collections.abc import Callable, Sequence
from typing import Final, Protocol

from google.protobuf.message import DecodeError

from vmsuper.shared import kvm, wire
from vmsuper.shared.plugin_pb2 import MainRequest, MainResponse
from vmsuper.shared.ranges import CallHint, RangeTable, RegHint, Space
from vmsuper.workers.limits import Limits
from vmsuper.workers.vm_objects import (
    IoEventObject,
    IrqEventObject,
    MemoryObject,
    ObjectError,
    ObjectTable,
    create_memory,
    new_eventfd,
)


class VcpuControl(Protocol):
    """What the main worker needs of the VCPU side (the supervisor's VcpuSet)."""

    started: bool

    def plugin_fds(self) -> list[int]: ...

    def start(self) -> None: ...

    def pause(self, mask: int, token: int) -> None: ...


class TablePublisher(Protocol):
    """Where reserved ranges and the call hint go so that every VCPU worker sees them."""

    def publish(self, table: RangeTable, hint: CallHint | None) -> object: ...


class NetInfo:
    """The tap handed out by GetNetConfig."""

    __slots__ = ("host_ipv4", "host_mac", "netmask", "tap_fd")
    tap_fd: Final[int]
    host_mac: Final[bytes]
    host_ipv4: Final[int]  # host byte order; sent as fixed32 in network byte order
    netmask: Final[int]

    def __init__(self, tap_fd: int, host_mac: bytes, host_ipv4: int, netmask: int) -> None:
        self.tap_fd = tap_fd
        self.host_mac = host_mac
        self.host_ipv4 = host_ipv4
        self.netmask = netmask


class RequestFailed(Exception):
    """A request refused with `err` (positive errno) and a reason for the log."""

    def __init__(self, err: int, reason: str) -> None:
        super().__init__(reason)
        self.errno = err
        self.reason = reason


class Reply:
    """What the event loop sends back, and what it must do afterwards."""

    __slots__ = ("close_after_send", "data", "error", "fds", "hang_up", "new_connection", "undo")

    def __init__(
        self,
        data: bytes,
        fds: list[int] | None = None,
        close_after_send: list[int] | None = None,
        new_connection: socket.socket | None = None,
        undo: Callable[[], None] | None = None,
        hang_up: bool = False,
        error: str | None = None,
    ) -> None:
        self.data = data
        self.fds: list[int] = [] if fds is None else fds
        # Our copies of fds that were sent only for the plugin (e.g. a new connection's far end).
        self.close_after_send: list[int] = [] if close_after_send is None else close_after_send
        self.new_connection = new_connection
        # Undoes what the request made, for a loop that finds it cannot deliver the reply.
        self.undo = undo
        # Set when nothing could be decoded: the loop closes this connection.
        self.hang_up = hang_up
        self.error = error


STATE_SIZES: dict[int, int] = {
    MainRequest.PIC0: ctypes.sizeof(kvm.kvm_pic_state),
    MainRequest.PIC1: ctypes.sizeof(kvm.kvm_pic_state),
    MainRequest.IOAPIC: ctypes.sizeof(kvm.kvm_ioapic_state),
    MainRequest.PIT: ctypes.sizeof(kvm.kvm_pit_state2),
    MainRequest.CLOCK: ctypes.sizeof(kvm.kvm_clock_data),
}
U64_LIMIT = 1 << 64


def _never_full() -> bool:
    return False


class MainWorker:
    """Every MainRequest handler; state shared by all main connections of one VM."""

    vcpu_channels_given: bool
    """Whether GetVcpus handed the plugin its VCPU channel ends (for the transport hint)."""

    def __init__(
        self,
        vm: kvm.Vm,
        system: kvm.Kvm,
        vcpus: VcpuControl,
        publisher: TablePublisher,
        shutdown_eventfd: int,
        net: NetInfo | None = None,
        limits: Limits | None = None,
        objects: ObjectTable | None = None,
        ranges: RangeTable | None = None,
        hint: CallHint | None = None,
        on_error: Callable[[str, str, int], None] | None = None,
        on_internal_error: Callable[[str, BaseException], None] | None = None,
        connections_full: Callable[[], bool] = _never_full,
        vcpu_channels_given: bool = False,
    ) -> None:
        self.vm = vm
        self.system = system
        self.vcpus = vcpus
        self.publisher = publisher
        self.shutdown_eventfd = shutdown_eventfd
        self.net = net
        self.limits = Limits() if limits is None else limits
        self.objects = ObjectTable() if objects is None else objects
        self.ranges = RangeTable() if ranges is None else ranges
        self.hint = hint
        self.on_error = on_error
        self.on_internal_error = on_internal_error
        # Asked before NewConnection: whether the connection limit is reached.
        self.connections_full = connections_full
        self.vcpu_channels_given = vcpu_channels_given
        self.objects.limits = self.limits
        if self.ranges.max_ranges is None:
            self.ranges = RangeTable(max_ranges=self.limits.reserved_ranges)
        self._handlers: dict[
            str, Callable[[MainRequest, MainResponse, list[int]], Reply | None]
        ] = {
            "create": self._create,
            "destroy": self._destroy,
            "new_connection": self._new_connection,
            "get_shutdown_eventfd": self._get_shutdown_eventfd,
            "check_extension": self._check_extension,
            "get_supported_cpuid": self._get_supported_cpuid,
            "get_emulated_cpuid": self._get_emulated_cpuid,
            "get_msr_index_list": self._get_msr_index_list,
            "get_net_config": self._get_net_config,
            "reserve_range": self._reserve_range,
            "set_irq": self._set_irq,
            "set_irq_routing": self._set_irq_routing,
            "get_state": self._get_state,
            "set_state": self._set_state,
            "set_identity_map_addr": self._set_identity_map_addr,
            "pause_vcpus": self._pause_vcpus,
            "get_vcpus": self._get_vcpus,
            "start": self._start,
            "set_call_hint": self._set_call_hint,
            "dirty_log": self._dirty_log,
        }

    # -- entry point -------------------------------------------------------------------------

    def handle(self, data: bytes, fds: Sequence[int]) -> Reply:
        """Answer one datagram. Owns `fds`: each is either kept by an object or closed."""
        fds = list(fds)
        request = MainRequest()
        try:
            request.ParseFromString(data)
        except DecodeError as exc:
            _close_all(fds)
            return Reply(b"", hang_up=True, error=f"undecodable main request: {exc}")
        response = MainResponse()
        case = request.WhichOneof("message")
        if case is None:
            _close_all(fds)
            response.errno = errno.ENOTTY
            return Reply(response.SerializeToString(), error="main request with no message")
        getattr(response, case).SetInParent()
        takes_fd = case == "create" and request.create.WhichOneof("constructor") == "memory"
        if fds and not takes_fd:
            _close_all(fds)
            response.errno = errno.EINVAL
            return Reply(response.SerializeToString(), error=f"{case}: unexpected fds")
        try:
            reply = self._handlers[case](request, response, fds)
        except RequestFailed as exc:
            return self._failed(response, case, exc.errno, exc.reason)
        except OSError as exc:  # KvmError, ObjectError, RangeError all carry the errno
            return self._failed(response, case, exc.errno or errno.EIO, str(exc))
        except Exception as exc:  # a bug here: answered, logged as ours, never fatal
            if self.on_internal_error is not None:
                self.on_internal_error(case, exc)
            return self._failed(response, case, errno.EIO, f"internal error: {exc!r}")
        if reply is not None:
            return reply
        return Reply(response.SerializeToString())

    def _failed(self, response: MainResponse, case: str, err: int, reason: str) -> Reply:
        response.errno = err
        if self.on_error is not None:
            self.on_error(case, reason, err)
        return Reply(response.SerializeToString(), error=f"{case}: {reason}")

    # -- objects -----------------------------------------------------------------------------

    def _create(self, request: MainRequest, response: MainResponse, fds: list[int]) -> Reply | None:
        create = request.create
        constructor = create.WhichOneof("constructor")
        if constructor == "memory":
            return self._create_memory(create, response, fds)
        if constructor is None:
            raise RequestFailed(errno.ENOTTY, "create without a constructor")
        self.objects.check_new(create.id)
        if constructor == "io_event":
            return self._create_io_event(create, response)
        return self._create_irq_event(create, response)

    def _create_memory(
        self, create: MainRequest.Create, response: MainResponse, fds: list[int]
    ) -> Reply | None:
        if not fds:
            raise RequestFailed(errno.EBADF, "create memory without a memfd")
        if len(fds) > 1:
            _close_all(fds)
            raise RequestFailed(errno.EINVAL, f"create memory with {len(fds)} fds")
        memfd = fds[0]
        try:
            self.objects.check_new(create.id)
            mem = create.memory
            obj = create_memory(
                self.vm,
                self.objects,
                memfd,
                offset=mem.offset,
                start=mem.start,
                length=mem.length,
                read_only=mem.read_only,
                dirty_log=mem.dirty_log,
            )
        finally:
            wire.close_received(memfd)  # the mapping keeps the memory alive
        self.objects.add(create.id, obj)
        return None

    def _create_io_event(self, create: MainRequest.Create, response: MainResponse) -> Reply:
        io = create.io_event
        if io.length not in (0, 1, 2, 4, 8):
            raise RequestFailed(errno.EINVAL, f"io_event length {io.length} is not 0/1/2/4/8")
        if io.address >= U64_LIMIT:
            raise RequestFailed(errno.EINVAL, "io_event address out of range")
        space = _space(io.space)  # before the eventfd: an unknown space leaks nothing
        fd = new_eventfd()
        obj = IoEventObject(fd, space, io.address, io.length, io.datamatch)
        try:
            obj.register(self.vm)
        except OSError:
            os.close(fd)
            raise
        self.objects.add(create.id, obj)
        return Reply(
            response.SerializeToString(),
            fds=[fd],
            undo=functools.partial(self._undo_create, create.id),
        )

    def _create_irq_event(self, create: MainRequest.Create, response: MainResponse) -> Reply:
        trigger, resample = new_eventfd(), new_eventfd()
        obj = IrqEventObject(create.irq_event.irq_id, trigger, resample)
        try:
            obj.register(self.vm)
        except OSError:
            os.close(trigger)
            os.close(resample)
            raise
        self.objects.add(create.id, obj)
        return Reply(
            response.SerializeToString(),
            fds=[trigger, resample],
            undo=functools.partial(self._undo_create, create.id),
        )

    def _undo_create(self, obj_id: int) -> None:
        """Destroy object `obj_id` again: its creator never got the reply."""
        obj = self.objects.get(obj_id)
        if obj is not None:
            self.objects.remove(obj_id)
            with contextlib.suppress(OSError):
                obj.destroy(self.vm)

    def _destroy(self, request: MainRequest, response: MainResponse, fds: list[int]) -> None:
        obj = self.objects.remove(request.destroy.id)
        obj.destroy(self.vm)

    def destroy_all(self) -> list[str]:
        """Undo every object (at shutdown); returns the failures, if any, for the log."""
        failures = []
        for obj_id, _ in self.objects.items():
            obj = self.objects.remove(obj_id)
            try:
                obj.destroy(self.vm)
            except OSError as exc:
                failures.append(f"{obj.kind} {obj_id}: {exc}")
        return failures

    def _dirty_log(self, request: MainRequest, response: MainResponse, fds: list[int]) -> None:
        obj = self.objects.get(request.dirty_log.id)
        if not isinstance(obj, MemoryObject):
            raise RequestFailed(errno.ENOENT, f"no memory object with id {request.dirty_log.id}")
        try:
            response.dirty_log.bitmap = obj.dirty_bitmap(self.vm)
        except ObjectError as exc:
            raise RequestFailed(exc.errno or errno.EINVAL, str(exc)) from exc

    # -- connections and fds -------------------------------------------------------------------

    def _new_connection(
        self, request: MainRequest, response: MainResponse, fds: list[int]
    ) -> Reply:
        if self.connections_full():
            raise RequestFailed(errno.EMFILE, f"connection limit ({self.limits.connections})")
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        ours.set_inheritable(False)
        fd = theirs.detach()
        return Reply(
            response.SerializeToString(), fds=[fd], close_after_send=[fd], new_connection=ours
        )

    def _get_shutdown_eventfd(
        self, request: MainRequest, response: MainResponse, fds: list[int]
    ) -> Reply:
        return Reply(response.SerializeToString(), fds=[self.shutdown_eventfd])

    def _get_net_config(
        self, request: MainRequest, response: MainResponse, fds: list[int]
    ) -> Reply:
        if self.net is None:
            raise RequestFailed(errno.ENODATA, "no [net] section in the config")
        cfg = response.get_net_config
        cfg.host_mac_address = self.net.host_mac
        # fixed32 fields hold the address in network byte order, as crosvm did.
        cfg.host_ipv4_address = struct.unpack("<I", struct.pack(">I", self.net.host_ipv4))[0]
        cfg.netmask = struct.unpack("<I", struct.pack(">I", self.net.netmask))[0]
        return Reply(response.SerializeToString(), fds=[self.net.tap_fd])

    # -- capabilities ---------------------------------------------------------------------------

    def _check_extension(
        self, request: MainRequest, response: MainResponse, fds: list[int]
    ) -> None:
        ret = kvm.ioctl(self.vm.fd, kvm.KVM_CHECK_EXTENSION, request.check_extension.extension)
        response.check_extension.has_extension = ret > 0

    def _fill_cpuid(
        self, target: MainResponse.CpuidResponse, entries: Sequence[kvm.kvm_cpuid_entry2]
    ) -> None:
        for e in entries:
            out = target.entries.add()
            out.function = e.function
            out.index = e.index
            out.has_index = bool(e.flags & kvm.KVM_CPUID_FLAG_SIGNIFCANT_INDEX)
            out.eax, out.ebx, out.ecx, out.edx = e.eax, e.ebx, e.ecx, e.edx

    def _get_supported_cpuid(
        self, request: MainRequest, response: MainResponse, fds: list[int]
    ) -> None:
        self._fill_cpuid(response.get_supported_cpuid, self.system.get_supported_cpuid())

    def _get_emulated_cpuid(
        self, request: MainRequest, response: MainResponse, fds: list[int]
    ) -> None:
        self._fill_cpuid(response.get_emulated_cpuid, self.system.get_emulated_cpuid())

    def _get_msr_index_list(
        self, request: MainRequest, response: MainResponse, fds: list[int]
    ) -> None:
        response.get_msr_index_list.indices.extend(self.system.get_msr_index_list())

    # -- ranges and hints -------------------------------------------------------------------------

    def _reserve_range(self, request: MainRequest, response: MainResponse, fds: list[int]) -> None:
        r = request.reserve_range
        self.ranges.reserve(_space(r.space), r.start, r.length, async_write=r.async_write)
        self.publisher.publish(self.ranges, self.hint)

    def _set_call_hint(self, request: MainRequest, response: MainResponse, fds: list[int]) -> None:
        h = request.set_call_hint
        hint: CallHint | None = None
        if h.address != 0:
            hints = tuple(
                RegHint(
                    match_rax=x.match_rax,
                    match_rbx=x.match_rbx,
                    match_rcx=x.match_rcx,
                    match_rdx=x.match_rdx,
                    rax=x.rax,
                    rbx=x.rbx,
                    rcx=x.rcx,
                    rdx=x.rdx,
                    send_sregs=x.send_sregs,
                    send_debugregs=x.send_debugregs,
                )
                for x in h.hints
            )
            hint = CallHint(_space(h.space), h.address, h.on_write, hints)
        # Published first: a hint the shared table cannot hold is refused, not half-applied.
        self.publisher.publish(self.ranges, hint)
        self.hint = hint

    # -- interrupts -------------------------------------------------------------------------------

    def _set_irq(self, request: MainRequest, response: MainResponse, fds: list[int]) -> None:
        level = kvm.kvm_irq_level(irq=request.set_irq.irq_id, level=int(request.set_irq.active))
        kvm.ioctl(self.vm.fd, kvm.KVM_IRQ_LINE, level)

    def _set_irq_routing(
        self, request: MainRequest, response: MainResponse, fds: list[int]
    ) -> None:
        routes = request.set_irq_routing.routes
        if len(routes) > self.limits.irq_routes:
            raise RequestFailed(
                errno.EINVAL, f"{len(routes)} routes, limit {self.limits.irq_routes}"
            )
        entries = []
        for route in routes:
            entry = kvm.kvm_irq_routing_entry(gsi=route.irq_id)
            kind = route.WhichOneof("route")
            if kind == "irqchip":
                entry.type = kvm.KVM_IRQ_ROUTING_IRQCHIP
                entry.u.irqchip.irqchip = route.irqchip.irqchip
                entry.u.irqchip.pin = route.irqchip.pin
            elif kind == "msi":
                entry.type = kvm.KVM_IRQ_ROUTING_MSI
                entry.u.msi.address_lo = route.msi.address & 0xFFFFFFFF
                entry.u.msi.address_hi = route.msi.address >> 32
                entry.u.msi.data = route.msi.data
            else:
                raise RequestFailed(errno.EINVAL, f"route for irq {route.irq_id} has no target")
            entries.append(entry)
        self.vm.set_gsi_routing(entries)

    # -- VM state ------------------------------------------------------------------------------

    def _get_state(self, request: MainRequest, response: MainResponse, fds: list[int]) -> None:
        which = request.get_state.set
        if which not in STATE_SIZES:
            raise RequestFailed(errno.EINVAL, f"unknown VM state set {which}")
        response.get_state.state = self._read_state(which)

    def _read_state(self, which: int) -> bytes:
        if which in (MainRequest.PIC0, MainRequest.PIC1, MainRequest.IOAPIC):
            chip = kvm.kvm_irqchip(chip_id=_CHIP_IDS[which])
            kvm.ioctl(self.vm.fd, kvm.KVM_GET_IRQCHIP, chip)
            return bytes(chip.chip)[: STATE_SIZES[which]]
        if which == MainRequest.PIT:
            pit = kvm.kvm_pit_state2()
            kvm.ioctl(self.vm.fd, kvm.KVM_GET_PIT2, pit)
            return bytes(pit)
        clock = kvm.kvm_clock_data()
        kvm.ioctl(self.vm.fd, kvm.KVM_GET_CLOCK, clock)
        return bytes(clock)

    def _set_state(self, request: MainRequest, response: MainResponse, fds: list[int]) -> None:
        which, blob = request.set_state.set, request.set_state.state
        size = STATE_SIZES.get(which)
        if size is None:
            raise RequestFailed(errno.EINVAL, f"unknown VM state set {which}")
        if len(blob) != size:
            raise RequestFailed(errno.EINVAL, f"state blob of {len(blob)} bytes, expected {size}")
        if which in (MainRequest.PIC0, MainRequest.PIC1, MainRequest.IOAPIC):
            chip = kvm.kvm_irqchip(chip_id=_CHIP_IDS[which])
            ctypes.memmove(ctypes.addressof(chip.chip), blob, size)
            kvm.ioctl(self.vm.fd, kvm.KVM_SET_IRQCHIP, chip)
        elif which == MainRequest.PIT:
            kvm.ioctl(self.vm.fd, kvm.KVM_SET_PIT2, kvm.kvm_pit_state2.from_buffer_copy(blob))
        else:
            kvm.ioctl(self.vm.fd, kvm.KVM_SET_CLOCK, kvm.kvm_clock_data.from_buffer_copy(blob))

    def _set_identity_map_addr(
        self, request: MainRequest, response: MainResponse, fds: list[int]
    ) -> None:
        if self.vcpus.started:
            raise RequestFailed(errno.EINVAL, "SetIdentityMapAddr after Start")
        addr = ctypes.c_uint64(request.set_identity_map_addr.address)
        kvm.ioctl(self.vm.fd, kvm.KVM_SET_IDENTITY_MAP_ADDR, addr)

    # -- VCPUs ---------------------------------------------------------------------------------

    def _pause_vcpus(self, request: MainRequest, response: MainResponse, fds: list[int]) -> None:
        self.vcpus.pause(request.pause_vcpus.cpu_mask, request.pause_vcpus.user)

    def _get_vcpus(self, request: MainRequest, response: MainResponse, fds: list[int]) -> Reply:
        self.vcpu_channels_given = True
        return Reply(response.SerializeToString(), fds=self.vcpus.plugin_fds())

    def _start(self, request: MainRequest, response: MainResponse, fds: list[int]) -> None:
        if self.vcpus.started:
            raise RequestFailed(errno.EINVAL, "second Start")
        self.vcpus.start()


_CHIP_IDS: dict[int, int] = {
    MainRequest.PIC0: kvm.KVM_IRQCHIP_PIC_MASTER,
    MainRequest.PIC1: kvm.KVM_IRQCHIP_PIC_SLAVE,
    MainRequest.IOAPIC: kvm.KVM_IRQCHIP_IOAPIC,
}


def _space(value: int) -> Space:
    """The schema's AddressSpace; the wire carries any int32, so others are refused here."""
    try:
        return Space(value)
    except ValueError:
        raise RequestFailed(errno.EINVAL, f"unknown address space {value}") from None


def _close_all(fds: Sequence[int]) -> None:
    """Close fds the plugin sent that nothing keeps, without waiting on any (a lingering
    socket)."""
    for fd in fds:
        with contextlib.suppress(OSError):
            wire.close_received(fd)
