"""The busy VCPUs of every vmsuper run of this user on the host: a page each run's polling gate
writes its own count to and reads the others' from.

A gate counts its own VM's busy VCPUs (supervisor/poll_gate.py, `BusyVcpus`); K one-VCPU VMs
started together each count one, find a CPU for each of their two pollers, and poll until the
host's pressure turns them off, then try again at each hold's end: spells of 2K pollers taking
turns at the CPUs, which kept batches of two VMs behind `poll_us = 0`. On the board each gate
sees the others' busy VCPUs too, and polls only while every busy VCPU of the host would have a
CPU for each of its pollers.

The board is `<runtime folder>/busy-vcpus` (see `vmsuper.shared.runtime`): `SLOTS` slots of
(pid, busy VCPUs, stamp: CLOCK_MONOTONIC ns of the last write). A run takes the first slot it
can lock (an open-file-description lock, which the kernel drops when the run's process ends,
however it ends) and writes only there; a count whose stamp is older than the reader's
`stale_ns` is ignored, so a run killed before it cleared its slot stops counting by itself.
The page is read and written with `pread` and `pwrite` (two system calls a reading), not
mapped: a board truncated under the runs reads as empty, where a mapping would kill each of
them with SIGBUS. Reads are not atomic with writes: a torn slot costs one reading's decision.

Only the user's own runs can write the board (the folder is the user's, mode 0700; the file is
refused unless a regular file of the user's, mode 0600), and a writer can only turn the
readers' polling off (they then go as with `poll_us = 0`) or leave it to the pressure alone, as
before the board. A VCPU worker closes the board's fd when it is confined, like every fd not
its own. Runs whose `poll_us` is 0 have no gate and write nothing (the pressure still counts
them).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
import struct
import time
from collections.abc import Callable
from pathlib import Path
from typing import Final

from vmsuper.shared.runtime import RuntimeDirError, make_runtime_dir, runtime_dir

__all__ = ["BOARD_NAME", "SLOT", "SLOTS", "BusyBoard", "board_path"]

BOARD_NAME: Final = "busy-vcpus"
SLOT: Final = struct.Struct("<IIQ")
"""pid, busy VCPUs, stamp (CLOCK_MONOTONIC ns)."""
SLOTS: Final = 256
SIZE: Final = SLOTS * SLOT.size  # one page
_FLOCK: Final = struct.Struct("hhqqi4x")  # struct flock on x86-64 (l_type .. l_pid)


def board_path() -> str:
    """Where this user's board is: in the runtime folder."""
    return str(runtime_dir() / BOARD_NAME)


def _lock_slot(fd: int, index: int) -> bool:
    """Take slot `index`'s lock (the open file description's, not the process's: two boards in
    one process take two slots); False if another holds it."""
    flock = _FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, index * SLOT.size, SLOT.size, 0)
    try:
        fcntl.fcntl(fd, fcntl.F_OFD_SETLK, flock)
    except OSError as exc:
        if exc.errno in (errno.EAGAIN, errno.EACCES):
            return False
        raise
    return True


class BusyBoard:
    """This run's slot on the board and its view of the others' (see the module doc)."""

    def __init__(
        self, fd: int, *, stale_ns: int, clock: Callable[[], int] = time.monotonic_ns
    ) -> None:
        """`fd`: the board's file, open for reading and writing; the board owns it (and with
        it the slot's lock)."""
        self._fd = fd
        self._stale_ns = stale_ns
        self._clock = clock
        self._pid = os.getpid()
        try:
            if os.fstat(fd).st_size < SIZE:
                os.ftruncate(fd, SIZE)  # a new board; never shrinks one (a racing opener's)
            self.slot: int | None = next((i for i in range(SLOTS) if _lock_slot(fd, i)), None)
            """This run's slot; None when all are taken (it still reads the others')."""
        except OSError:
            os.close(fd)
            raise
        self.publish(0)

    @classmethod
    def open(
        cls, path: str, *, stale_ns: int, clock: Callable[[], int] = time.monotonic_ns
    ) -> BusyBoard | None:
        """The board at `path` (created if absent, with its folder); None if it cannot be used:
        the folder or the file is another user's, the file is not a regular file of mode 0600,
        or the system refuses (the gate then decides from the pressure and its own VM alone)."""
        try:
            make_runtime_dir(Path(path).parent)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except (OSError, RuntimeDirError):
            return None
        try:
            info = os.fstat(fd)
        except OSError:
            info = None
        if (
            info is None
            or not stat.S_ISREG(info.st_mode)
            or info.st_uid != os.geteuid()
            or stat.S_IMODE(info.st_mode) != 0o600
        ):
            os.close(fd)
            return None
        try:
            return cls(fd, stale_ns=stale_ns, clock=clock)
        except OSError:
            return None

    def publish(self, busy: int) -> None:
        """Write this run's count of busy VCPUs, stamped now."""
        if self._fd >= 0 and self.slot is not None:
            entry = SLOT.pack(self._pid, busy, self._clock())
            with contextlib.suppress(OSError):  # advice only: a failed write costs a reading
                os.pwrite(self._fd, entry, self.slot * SLOT.size)

    def others(self) -> int:
        """The busy VCPUs of the other runs, as their last fresh writes say."""
        if self._fd < 0:
            return 0
        try:
            page = os.pread(self._fd, SIZE, 0)
        except OSError:
            return 0  # advice only: as if nobody else were busy
        oldest = self._clock() - self._stale_ns
        total = 0
        whole = len(page) - len(page) % SLOT.size  # a board cut short reads as that much
        used = -(-len(page.rstrip(b"\0")) // SLOT.size) * SLOT.size  # slots past it are empty
        for index, (pid, busy, stamp) in enumerate(SLOT.iter_unpack(page[: min(whole, used)])):
            if busy and pid and stamp >= oldest and index != self.slot:
                total += busy
        return total

    def close(self) -> None:
        """Clear this run's slot and let it go (idempotent)."""
        if self._fd < 0:
            return
        if self.slot is not None:
            with contextlib.suppress(OSError):
                os.pwrite(self._fd, bytes(SLOT.size), self.slot * SLOT.size)
        os.close(self._fd)  # and with it the slot's lock
        self._fd = -1
