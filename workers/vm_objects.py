"""The objects a plugin creates with MainRequest.Create, each knowing how to undo itself.

One table keyed by the client's id holds every kind (memory slots, ioeventfds, irqfds), so
Destroy and shutdown treat them alike. Every constructor either fully succeeds or leaves
nothing behind: no mapping, no slot, no registered fd.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import stat
from collections.abc import Iterator

from vmsuper.shared import kvm, libc_mmap
from vmsuper.shared.ranges import Space
from vmsuper.workers.limits import Limits

F_GET_SEALS = 1034
F_SEAL_SHRINK = 0x0002
PAGE_SIZE = 4096
U64_LIMIT = 1 << 64


PROT_READ = 0x1
PROT_WRITE = 0x2
MAP_SHARED = 0x01


class ObjectError(OSError):
    """A Create/Destroy that cannot be carried out; `errno` goes back on the wire."""

    def __init__(self, err: int, message: str) -> None:
        super().__init__(err, message)


class VmObject:
    """Base of every plugin-created object."""

    kind = "object"

    def destroy(self, vm: kvm.Vm) -> None:
        raise NotImplementedError


class MemoryObject(VmObject):
    """A memfd range mapped into the supervisor and registered as a KVM memory slot."""

    kind = "memory"

    def __init__(
        self,
        slot: int,
        guest_start: int,
        length: int,
        host_address: int,
        dirty_log: bool,
        read_only: bool,
    ) -> None:
        self.slot = slot
        self.guest_start = guest_start
        self.length = length
        self.host_address = host_address
        self.dirty_log = dirty_log
        self.read_only = read_only

    def destroy(self, vm: kvm.Vm) -> None:
        region = kvm.kvm_userspace_memory_region(
            slot=self.slot,
            flags=0,
            guest_phys_addr=self.guest_start,
            memory_size=0,
            userspace_addr=self.host_address,
        )
        try:
            kvm.ioctl(vm.fd, kvm.KVM_SET_USER_MEMORY_REGION, region)
        finally:
            libc_mmap.munmap(self.host_address, self.length)

    def dirty_bitmap(self, vm: kvm.Vm) -> bytes:
        """KVM's dirty bitmap, trimmed to exactly ceil(pages / 8) bytes as the client expects."""
        if not self.dirty_log:
            raise ObjectError(errno.EINVAL, "memory object was created without dirty_log")
        pages = (self.length + PAGE_SIZE - 1) // PAGE_SIZE
        words = (pages + 63) // 64
        buf = (ctypes.c_uint64 * max(words, 1))()
        log = kvm.kvm_dirty_log(slot=self.slot)
        log.dirty_bitmap = ctypes.addressof(buf)
        kvm.ioctl(vm.fd, kvm.KVM_GET_DIRTY_LOG, log)
        return bytes(buf)[: (pages + 7) // 8]


class IoEventObject(VmObject):
    """An eventfd that KVM signals, in-kernel, on a guest write to (space, address)."""

    kind = "io_event"

    def __init__(self, fd: int, space: Space, address: int, length: int, datamatch: int) -> None:
        self.fd = fd
        self.space = space
        self.address = address
        self.length = length
        self.datamatch = datamatch

    def _ioeventfd(self, deassign: bool) -> kvm.kvm_ioeventfd:
        flags = 0
        if self.space == Space.IOPORT:
            flags |= kvm.KVM_IOEVENTFD_FLAG_PIO
        if self.length:
            flags |= kvm.KVM_IOEVENTFD_FLAG_DATAMATCH
        if deassign:
            flags |= kvm.KVM_IOEVENTFD_FLAG_DEASSIGN
        return kvm.kvm_ioeventfd(
            datamatch=self.datamatch, addr=self.address, len=self.length, fd=self.fd, flags=flags
        )

    def register(self, vm: kvm.Vm) -> None:
        kvm.ioctl(vm.fd, kvm.KVM_IOEVENTFD, self._ioeventfd(deassign=False))

    def destroy(self, vm: kvm.Vm) -> None:
        try:
            kvm.ioctl(vm.fd, kvm.KVM_IOEVENTFD, self._ioeventfd(deassign=True))
        finally:
            os.close(self.fd)


class IrqEventObject(VmObject):
    """A trigger eventfd and a resample eventfd wired to a GSI with KVM_IRQFD."""

    kind = "irq_event"

    def __init__(self, irq_id: int, trigger_fd: int, resample_fd: int) -> None:
        self.irq_id = irq_id
        self.trigger_fd = trigger_fd
        self.resample_fd = resample_fd

    def _irqfd(self, deassign: bool) -> kvm.kvm_irqfd:
        if deassign:
            return kvm.kvm_irqfd(
                fd=self.trigger_fd, gsi=self.irq_id, flags=kvm.KVM_IRQFD_FLAG_DEASSIGN
            )
        return kvm.kvm_irqfd(
            fd=self.trigger_fd,
            gsi=self.irq_id,
            flags=kvm.KVM_IRQFD_FLAG_RESAMPLE,
            resamplefd=self.resample_fd,
        )

    def register(self, vm: kvm.Vm) -> None:
        kvm.ioctl(vm.fd, kvm.KVM_IRQFD, self._irqfd(deassign=False))

    def destroy(self, vm: kvm.Vm) -> None:
        try:
            kvm.ioctl(vm.fd, kvm.KVM_IRQFD, self._irqfd(deassign=True))
        finally:
            os.close(self.trigger_fd)
            os.close(self.resample_fd)


class ObjectTable:
    """Every live object by id, plus the memory-slot allocator."""

    def __init__(self, limits: Limits | None = None) -> None:
        self.limits = Limits() if limits is None else limits
        self._objects: dict[int, VmObject] = {}
        self._free_slots: list[int] = []
        self._next_slot = 0
        self.guest_memory = 0

    def __len__(self) -> int:
        return len(self._objects)

    def __contains__(self, obj_id: int) -> bool:
        return obj_id in self._objects

    def items(self) -> Iterator[tuple[int, VmObject]]:
        return iter(list(self._objects.items()))

    def get(self, obj_id: int) -> VmObject | None:
        return self._objects.get(obj_id)

    def check_new(self, obj_id: int) -> None:
        if obj_id in self._objects:
            raise ObjectError(errno.EEXIST, f"object id {obj_id} is in use")
        if len(self._objects) >= self.limits.objects:
            raise ObjectError(errno.ENOSPC, f"object limit ({self.limits.objects}) reached")

    def add(self, obj_id: int, obj: VmObject) -> None:
        self._objects[obj_id] = obj

    def remove(self, obj_id: int) -> VmObject:
        obj = self._objects.pop(obj_id, None)
        if obj is None:
            raise ObjectError(errno.ENOENT, f"no object with id {obj_id}")
        if isinstance(obj, MemoryObject):
            self._free_slots.append(obj.slot)
            self.guest_memory -= obj.length
        return obj

    def allocate_slot(self) -> int:
        if self._free_slots:
            self._free_slots.sort()
            return self._free_slots.pop(0)
        if self._next_slot >= self.limits.memory_slots:
            raise ObjectError(errno.ENOSPC, "memory slot limit reached")
        self._next_slot += 1
        return self._next_slot - 1

    def release_slot(self, slot: int) -> None:
        self._free_slots.append(slot)


def create_memory(
    vm: kvm.Vm,
    table: ObjectTable,
    memfd: int,
    *,
    offset: int,
    start: int,
    length: int,
    read_only: bool,
    dirty_log: bool,
) -> MemoryObject:
    """Map [offset, offset+length) of a sealed memfd and register it at guest `start`."""
    if offset + length >= U64_LIMIT or start + length >= U64_LIMIT:
        raise ObjectError(errno.EOVERFLOW, "offset/start + length overflows 64 bits")
    # Only a memfd is guest memory; anything else (a socket, a pipe, a device) is refused
    # before it is used, as an fd without the seal.
    mode = os.fstat(memfd).st_mode
    if not stat.S_ISREG(mode):
        raise ObjectError(
            errno.EPERM, f"memory fd is not a memfd (file type {stat.S_IFMT(mode):#o})"
        )
    try:
        seals = fcntl.fcntl(memfd, F_GET_SEALS)
    except OSError as exc:
        raise ObjectError(errno.EPERM, f"memory fd cannot carry seals: {exc.strerror}") from exc
    if not seals & F_SEAL_SHRINK:
        raise ObjectError(errno.EPERM, "memory fd lacks F_SEAL_SHRINK")
    size = os.fstat(memfd).st_size
    if length == 0 or offset + length > size:
        raise ObjectError(errno.EINVAL, f"range {offset:#x}+{length:#x} is beyond the file's end")
    if offset % PAGE_SIZE or length % PAGE_SIZE or start % PAGE_SIZE:
        raise ObjectError(errno.EINVAL, "offset, start and length must be page-aligned")
    if table.guest_memory + length > table.limits.guest_memory:
        raise ObjectError(errno.ENOSPC, "guest memory limit reached")
    slot = table.allocate_slot()
    prot = PROT_READ if read_only else PROT_READ | PROT_WRITE
    address = libc_mmap.mmap(None, length, prot, MAP_SHARED, memfd, offset)
    if address is None or address == libc_mmap.MAP_FAILED:
        err = ctypes.get_errno()
        table.release_slot(slot)
        raise ObjectError(err, f"mmap of the memory fd failed: {os.strerror(err)}")
    flags = (kvm.KVM_MEM_READONLY if read_only else 0) | (
        kvm.KVM_MEM_LOG_DIRTY_PAGES if dirty_log else 0
    )
    region = kvm.kvm_userspace_memory_region(
        slot=slot, flags=flags, guest_phys_addr=start, memory_size=length, userspace_addr=address
    )
    try:
        kvm.ioctl(vm.fd, kvm.KVM_SET_USER_MEMORY_REGION, region)
    except kvm.KvmError:
        table.release_slot(slot)
        libc_mmap.munmap(address, length)
        raise
    table.guest_memory += length
    return MemoryObject(slot, start, length, address, dirty_log, read_only)


def new_eventfd() -> int:
    """Blocking on purpose: the plugin shares the open file and may read it blocking."""
    return os.eventfd(0, os.EFD_CLOEXEC)
