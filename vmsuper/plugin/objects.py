"""Objects the plugin creates in the VM: I/O eventfds, guest memory, irq eventfds.

Each holds its id and its fds, and `destroy` undoes it on the server before closing the fds
(destroy first: the kernel registration refers to the fd). They are context managers that
destroy on exit. `destroy` is idempotent.
"""

from __future__ import annotations

import mmap
import os
from typing import TYPE_CHECKING, Self

from .errors import ProtocolError
from .model import Space

if TYPE_CHECKING:
    from types import TracebackType

    from .connection import Connection

DIRTY_PAGE_SIZE = 4096
"""The dirty log has one bit per 4 KiB page, whatever the host page size."""


def dirty_log_size(length: int) -> int:
    """Bytes of the dirty bitmap of `length` bytes of memory: ceil(pages / 8)."""
    pages = -(-length // DIRTY_PAGE_SIZE)
    return -(-pages // 8)


class _Created:
    """What every created object shares: its id, its connection, destroy-once."""

    def __init__(self, conn: Connection, ident: int) -> None:
        self._conn = conn
        self._id = ident
        self._destroyed = False

    @property
    def id(self) -> int:
        """The object id (chosen by this SDK, shared by all connections of the plugin)."""
        return self._id

    @property
    def destroyed(self) -> bool:
        return self._destroyed

    def destroy(self) -> None:
        """Destroy the object on the server, then release the local resources."""
        if self._destroyed:
            return
        self._conn.destroy(self._id)
        self._destroyed = True
        self._release()

    def _release(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.destroy()


class IoEvent(_Created):
    """An eventfd the kernel signals on guest writes to (space, address) — no VCPU exit."""

    def __init__(
        self,
        conn: Connection,
        ident: int,
        fd: int,
        space: Space,
        address: int,
        length: int,
        datamatch: int,
    ) -> None:
        super().__init__(conn, ident)
        self.fd = fd
        self.space = space
        self.address = address
        self.length = length
        self.datamatch = datamatch

    def __repr__(self) -> str:
        return f"<IoEvent id={self._id} {self.space.name} {self.address:#x} fd={self.fd}>"

    def fileno(self) -> int:
        return self.fd

    def read(self) -> int:
        """Consume the counter: how many matching writes happened since the last read.

        Blocks while it is zero unless the fd was made non-blocking.
        """
        return os.eventfd_read(self.fd)

    def _release(self) -> None:
        os.close(self.fd)


class IrqEvent(_Created):
    """A pair of eventfds bound to a GSI: write `trigger_fd` to raise it; the kernel signals
    `resample_fd` when the guest acknowledges a level-triggered interrupt."""

    def __init__(
        self, conn: Connection, ident: int, irq_id: int, trigger_fd: int, resample_fd: int
    ):
        super().__init__(conn, ident)
        self.irq_id = irq_id
        self.trigger_fd = trigger_fd
        self.resample_fd = resample_fd

    def __repr__(self) -> str:
        return (
            f"<IrqEvent id={self._id} irq={self.irq_id} fds={self.trigger_fd},{self.resample_fd}>"
        )

    def trigger(self) -> None:
        """Raise the interrupt."""
        os.eventfd_write(self.trigger_fd, 1)

    def read_resample(self) -> int:
        """Consume the resample counter (blocks while zero unless the fd is non-blocking)."""
        return os.eventfd_read(self.resample_fd)

    def _release(self) -> None:
        try:
            os.close(self.trigger_fd)
        finally:
            os.close(self.resample_fd)


class Memory(_Created):
    """Guest memory backed by a memfd, with a writable shared mapping for the plugin.

    ``mmap`` maps the same bytes the guest sees at ``start`` (shared mapping of
    [offset, offset + length) of ``memfd``). The memfd is owned (closed on destroy) only when
    the SDK created it.
    """

    def __init__(
        self,
        conn: Connection,
        ident: int,
        *,
        memfd: int,
        owns_fd: bool,
        offset: int,
        start: int,
        length: int,
        read_only: bool,
        dirty_logging: bool,
        mapping: mmap.mmap,
    ) -> None:
        super().__init__(conn, ident)
        self.memfd = memfd
        self.owns_fd = owns_fd
        self.offset = offset
        self.start = start
        self.length = length
        self.read_only = read_only
        self.dirty_logging = dirty_logging
        self.mmap = mapping

    def __repr__(self) -> str:
        return f"<Memory id={self._id} [{self.start:#x}, {self.start + self.length:#x})>"

    def dirty_log(self) -> bytes:
        """The dirty bitmap since the last call: bit n of byte n // 8 is page n (4 KiB)."""
        bitmap = self._conn.memory_dirty_log(self._id)
        expected = dirty_log_size(self.length)
        if len(bitmap) != expected:
            raise ProtocolError(
                f"dirty bitmap of {len(bitmap)} bytes for {self.length} bytes of memory "
                f"(expected {expected})",
                "dirty_log",
            )
        return bitmap

    def _release(self) -> None:
        try:
            self.mmap.close()
        except BufferError:
            pass  # views of the mapping still exist; it is unmapped when they go away
        finally:
            if self.owns_fd:
                os.close(self.memfd)
