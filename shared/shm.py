"""The shared-memory region between the supervisor and its forked VCPU workers.

One anonymous `MAP_SHARED` mapping, made before the workers are forked, so every process sees
the same pages at the same address. It holds, each part in a module of its own:

- the reserved ranges and the call hint (`shm_table`: `SharedTable` writes, `TableReader`
  reads), published under a seqlock so a worker keeps a parsed copy and pays one integer read
  per exit to know it is still current;
- one `VcpuSlot` per VCPU (`shm_slot`): the pending pause token, the run state, exit counters,
  and the statistics block: since when the VCPU waits on the plugin, and a log2 histogram of
  the plugin's response times;
- one `Mailbox` per VCPU (`shm_mailbox`): the ioctl a worker asks its runner thread to make,
  with an argument area whose address the runner hands straight to the kernel, and the
  doorbell that hands it over (`shm_doorbell`);
- one `RangeCounts` per VCPU (`shm_counts`): the exits it forwarded per reserved range, live.

Where each lies is `shm_layout`'s: the header and the table, then one page-aligned block per
VCPU (so a worker can keep only its own: `SharedRegion.confine_to`). Every struct in it, and
the enums the C hot path shares, are defined once in `abi.py` (which generates the C header
`vms_abi.h`). This module is the region as a whole: `SharedRegion` makes and maps it,
`RegionView` maps another process's read-only.

The mapping is a sealed memfd (it cannot grow or shrink), so that `vmsuper stats` can map the
same pages read-only through ``/proc/<pid>/fd/<fd>`` (`RegionView`) while the run goes on.

Memory ordering. Every field has a single writer process (the table, `pause_seq` and the pause
tokens: the supervisor; `delivered_seq`, the run state and the counters: the VCPU's worker).
The seqlocks (the table, a VCPU's range counts) are written, and the table read, by C
functions with C11 atomics and fences (`seqlock.c`), one order for every writer. The rest
(the pause hand-off of `shm_slot`) relies on x86-64's TSO model: a CPU's stores become
visible to others in program order, and loads are not reordered with older loads. Every
64-bit cell is 8-byte aligned and read or written through a ``memoryview`` cast to ``Q``,
which CPython does as one 8-byte ``memcpy`` (a single ``mov``), so no cell is ever seen
half-written. Distinct Python operations are separate calls into C, so the compiler cannot
reorder them either. Hand-offs through the mailbox are ordered by the doorbell's bells,
whose ring and wait are sequentially consistent atomic operations in C (`hotpath.c`).

Everything is little-endian (the host's order; checked at import).
"""

from __future__ import annotations

import ctypes
import fcntl
import mmap
import os
import sys
from types import TracebackType
from typing import Final

from vmsuper.shared import libc_mmap
from vmsuper.shared.ranges import Range
from vmsuper.shared.shm_counts import RangeCounts, read_range_counts
from vmsuper.shared.shm_layout import (
    DEFAULT_MAX_HINTS,
    DEFAULT_MAX_RANGES,
    HEADER,
    MEMFD_NAME,
    Layout,
    RegionMemory,
    ShmError,
    check_header,
)
from vmsuper.shared.shm_mailbox import Mailbox
from vmsuper.shared.shm_slot import VcpuReading, VcpuSlot, read_vcpu
from vmsuper.shared.shm_table import SharedTable, TableReader

if sys.byteorder != "little":  # pragma: no cover - vmsuper runs on x86-64 only
    raise ImportError("vmsuper's shared-memory layout assumes a little-endian host")


class SharedRegion:
    """The whole region; make it with `create` before forking, use it unchanged in the child."""

    def __init__(self, mm: mmap.mmap, layout: Layout, *, owns_mmap: bool = True) -> None:
        self._mm = mm
        self._owns_mmap = owns_mmap
        self._layout = layout
        self._mv = memoryview(mm)
        self._q = self._mv.cast("Q")
        self._cbuf: ctypes.Array[ctypes.c_char] | None = (ctypes.c_char * layout.size).from_buffer(
            mm
        )
        self._base_address = ctypes.addressof(self._cbuf)
        self._memory = RegionMemory(mm, self._mv, self._q, self._base_address, layout)
        self.table = SharedTable(self._memory)
        self._slots = [VcpuSlot(self._memory, i) for i in range(layout.vcpus)]
        self._mailboxes = [Mailbox(self._memory, i) for i in range(layout.vcpus)]
        self._closed = False
        self._confined_to: int | None = None
        self.fd = -1
        """The memfd behind the mapping (`create`), kept open for `vmsuper stats`; -1 if none."""

    @classmethod
    def create(
        cls,
        vcpus: int,
        *,
        max_ranges: int = DEFAULT_MAX_RANGES,
        max_hints: int = DEFAULT_MAX_HINTS,
    ) -> SharedRegion:
        layout = Layout(vcpus, max_ranges, max_hints)
        fd = os.memfd_create(MEMFD_NAME, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(fd, layout.size)
            # A reader's mapping can never be cut short (no SIGBUS), nor the region grown.
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
            mm = mmap.mmap(fd, layout.size, flags=mmap.MAP_SHARED)
        except BaseException:
            os.close(fd)
            raise
        mm[: HEADER.size] = layout.header()
        region = cls(mm, layout)
        region.fd = fd
        return region

    @classmethod
    def attach(cls, mm: mmap.mmap) -> SharedRegion:
        """Use a region made elsewhere (e.g. passed as a memfd), checking its header.

        `close()` then drops this object's hold on `mm` but leaves unmapping to its owner.
        """
        return cls(mm, check_header(mm), owns_mmap=False)

    @property
    def vcpus(self) -> int:
        return self._layout.vcpus

    @property
    def size(self) -> int:
        return self._layout.size

    @property
    def mmap(self) -> mmap.mmap:
        return self._mm

    def reader(self) -> TableReader:
        return TableReader(self._memory)

    def slot(self, index: int) -> VcpuSlot:
        return self._slots[self._check_index(index)]

    def mailbox(self, index: int) -> Mailbox:
        return self._mailboxes[self._check_index(index)]

    def range_counts(self, index: int) -> RangeCounts:
        """VCPU `index`'s live range counts (make one per worker: it keeps the worker's view)."""
        return RangeCounts(self._memory, self._check_index(index))

    def _check_index(self, index: int) -> int:
        if not 0 <= index < self._layout.vcpus:
            raise IndexError(f"VCPU {index} outside 0..{self._layout.vcpus - 1}")
        if self._confined_to is not None and index != self._confined_to:
            raise ShmError(f"this process keeps only VCPU {self._confined_to}'s block mapped")
        return index

    def confine_to(self, vcpu: int) -> None:
        """Keep only VCPU `vcpu`'s block and the header and table mapped in this process.

        For a forked VCPU worker, at start-up: every other VCPU's block (its mailbox, slot,
        statistics and range counts) is unmapped from this process, so the worker can neither
        read nor write another VCPU's state. The address range of each such block stays
        reserved as inaccessible memory (an anonymous ``PROT_NONE`` mapping put over it with
        ``MAP_FIXED``): nothing else can be mapped there, and this object can still unmap the
        whole region when it is closed. Also closes this object's memfd, if it holds it.

        Contract: after the call, `slot`, `mailbox` and `range_counts` of another VCPU raise
        `ShmError`; objects for another VCPU taken before the call (and raw addresses into
        its block) must not be used: any access kills the process with SIGSEGV. The table
        (`reader()`, `table`) and this VCPU's objects work as before. Not undone; call once,
        in a process that never needs the other VCPUs (never in the supervisor).
        """
        self._check_index(vcpu)
        if self._closed:
            raise ShmError("the region is closed")
        layout = self._layout
        for index in range(layout.vcpus):
            if index != vcpu:
                _reserve_inaccessible(self._base_address + layout.block(index), layout.block_size)
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        self._confined_to = vcpu

    @property
    def confined_to(self) -> int | None:
        """The VCPU `confine_to` kept, or None."""
        return self._confined_to

    def close(self) -> None:
        """Unmap the region in this process; views from `arg_view()` must be dropped first."""
        if self._closed:
            return
        self._cbuf = None
        self._q.release()
        self._mv.release()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if not self._owns_mmap:
            self._closed = True
            return
        try:
            self._mm.close()
        except BufferError as exc:
            raise ShmError("views into the region are still in use") from exc
        self._closed = True

    def __enter__(self) -> SharedRegion:
        return self

    def __exit__(
        self, exc: type[BaseException] | None, val: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


_PROT_NONE: Final = 0
_MAP_FIXED: Final = 0x10
_MAP_NORESERVE: Final = 0x4000


def _reserve_inaccessible(address: int, size: int) -> None:
    """Replace the pages at [address, address + size) by an inaccessible reservation."""
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_FIXED | _MAP_NORESERVE
    got = libc_mmap.mmap(address, size, _PROT_NONE, flags, -1, 0)
    if got == libc_mmap.MAP_FAILED or got != address:
        err = ctypes.get_errno()
        raise OSError(err, f"cannot unmap {size} bytes at {address:#x}: {os.strerror(err)}")


class RegionView:
    """A read-only mapping of another process's region, for `vmsuper stats`: it reads the
    slots and statistics blocks and never writes (the pages are mapped PROT_READ)."""

    def __init__(self, mm: mmap.mmap) -> None:
        self._mm = mm
        self._layout = check_header(mm)
        self._q = memoryview(mm).cast("Q")

    @classmethod
    def open(cls, pid: int, fd: int) -> RegionView:
        """Map the region that process `pid` holds as `fd` (same user or root).

        Raises `ShmError` when that fd is not a vmsuper region, OSError when it cannot be
        opened (the process is gone, or belongs to someone else)."""
        path = f"/proc/{pid}/fd/{fd}"
        if not os.readlink(path).startswith(f"/memfd:{MEMFD_NAME} "):
            raise ShmError(f"{path} is not a vmsuper shared-memory region")
        handle = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            size = os.fstat(handle).st_size
            if size < HEADER.size:
                raise ShmError(f"{path} is too small for a region ({size} bytes)")
            mm = mmap.mmap(handle, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
        finally:
            os.close(handle)
        try:
            return cls(mm)
        except BaseException:
            mm.close()
            raise

    @property
    def vcpus(self) -> int:
        return self._layout.vcpus

    def reading(self, index: int) -> VcpuReading:
        if not 0 <= index < self._layout.vcpus:
            raise IndexError(f"VCPU {index} outside 0..{self._layout.vcpus - 1}")
        return read_vcpu(self._q, self._mm, self._layout, index)

    def range_counts(self, index: int) -> list[tuple[Range, int]]:
        """VCPU `index`'s forwarded exits per reserved range of the table it runs with."""
        if not 0 <= index < self._layout.vcpus:
            raise IndexError(f"VCPU {index} outside 0..{self._layout.vcpus - 1}")
        return read_range_counts(self._q, self._layout, index)

    def close(self) -> None:
        self._q.release()
        self._mm.close()

    def __enter__(self) -> RegionView:
        return self

    def __exit__(
        self, exc: type[BaseException] | None, val: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
