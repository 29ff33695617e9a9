"""One VCPU's mailbox in the shared region: the ioctl its worker asks the runner thread to make,
the argument area the runner hands straight to the kernel, and the result.
"""

from __future__ import annotations

import mmap
from typing import Final

from vmsuper.shared import abi
from vmsuper.shared.abi import (
    MAILBOX_ARG_SIZE,
)
from vmsuper.shared.shm_layout import RegionMemory, ShmError

OP_RUN: Final = 0
"""Mailbox op meaning KVM_RUN; any other op is the ioctl request number itself."""

# Mailbox (`struct vms_mail`): op, arg_len, ret, errno; then the doorbell's two bells; the
# argument area starts on the next line.
_MAIL_HEAD = abi.MAIL.codec(["op", "length", "ret", "err"])
_MAIL_BELLS_OFF: Final = abi.MAIL.offset("request")
_BELL_SIZE: Final = abi.MAIL.offset("done") - abi.MAIL.offset("request")
_BELL_SLEEPING_OFF: Final = abi.BELL.offset("sleeping")
_MAIL_ARG_OFF: Final = abi.MAILBOX_ARG_OFFSET
_MAIL_POLL = abi.MAIL.codec(["poll_ns"])
_MAIL_POLL_OFF: Final = abi.MAIL.offset("poll_ns")


def read_poll_ns(buffer: mmap.mmap, mailbox: int) -> int:
    """The polling window of the mailbox at offset `mailbox` of a region's `buffer` (also a
    read-only view of another process's region, for `vmsuper stats`)."""
    (value,) = _MAIL_POLL.unpack_from(buffer, mailbox + _MAIL_POLL_OFF)
    return int(value)


class Mailbox:
    """One VCPU's ioctl request from its worker to its runner thread, and the result.

    The worker fills the argument area (`post` copies bytes in, or write into `arg_view()`),
    posts the op and rings the doorbell; the runner reads `request()`, passes `arg_address()`
    to the ioctl, stores `complete(ret, errno)` and rings back; the worker reads `result()` and
    the argument area, which the kernel may have written.
    """

    def __init__(self, memory: RegionMemory, index: int) -> None:
        self.index = index
        self._mm = memory.mm
        self._mv = memory.mv
        self._off = memory.layout.mailbox(index)
        self._arg = self._off + _MAIL_ARG_OFF
        self._address = memory.address + self._arg
        self._bells = memory.address + self._off + _MAIL_BELLS_OFF

    def head_address(self) -> int:
        """Where the mailbox's head (op, length, result) lies, for `hotpath`."""
        return self._bells - _MAIL_BELLS_OFF

    def bells_address(self) -> int:
        """Where the doorbell's two bells lie (request, then done), for `hotpath`."""
        return self._bells

    def bell_seq(self, which: int) -> int:
        """The current sequence number of bell 0 (request) or 1 (done)."""
        start = self._off + _MAIL_BELLS_OFF + which * _BELL_SIZE
        return int.from_bytes(self._mm[start : start + 4], "little")

    def bell_sleeping(self, which: int) -> bool:
        """Whether the waiter of bell 0 (request) or 1 (done) sleeps in a read of its pipe now."""
        start = self._off + _MAIL_BELLS_OFF + which * _BELL_SIZE + _BELL_SLEEPING_OFF
        return self._mm[start : start + 4] != bytes(4)

    @property
    def poll_ns(self) -> int:
        """How long the VCPU's runner and worker poll for each other (and the worker for the
        plugin's reply) before they sleep; the supervisor sets it (`poll_gate`)."""
        return read_poll_ns(self._mm, self._off)

    @poll_ns.setter
    def poll_ns(self, value: int) -> None:
        _MAIL_POLL.pack_into(self._mm, self._off + _MAIL_POLL_OFF, value)

    def arg_address(self) -> int:
        """The argument area's address in this process (the same in every forked worker)."""
        return self._address

    def arg_view(self) -> memoryview:
        """A writable view of the whole argument area; drop it before the region is closed."""
        return self._mv[self._arg : self._arg + MAILBOX_ARG_SIZE]

    def read_arg(self, length: int) -> bytes:
        if not 0 <= length <= MAILBOX_ARG_SIZE:
            raise ValueError(f"argument length {length} outside 0..{MAILBOX_ARG_SIZE}")
        return self._mm[self._arg : self._arg + length]

    def post(
        self,
        op: int,
        arg: bytes | bytearray | memoryview | None = None,
        *,
        length: int | None = None,
    ) -> None:
        """Ask for `op` (OP_RUN or an ioctl number). `arg` is copied into the argument area;
        without it the area is used as already filled in place, `length` bytes of it."""
        if not 0 <= op < 1 << 32:
            raise ValueError(f"mailbox op {op:#x} is not a 32-bit value")
        if arg is not None:
            if length is not None:
                raise ValueError("give either arg or length, not both")
            data = memoryview(arg).cast("B")
            length = data.nbytes
            if length > MAILBOX_ARG_SIZE:
                raise ShmError(f"ioctl argument of {length} bytes exceeds {MAILBOX_ARG_SIZE}")
            self._mm[self._arg : self._arg + length] = data
        elif length is None:
            length = 0
        elif not 0 <= length <= MAILBOX_ARG_SIZE:
            raise ShmError(f"argument length {length} outside 0..{MAILBOX_ARG_SIZE}")
        _MAIL_HEAD.pack_into(self._mm, self._off, op, length, 0, 0)

    def request(self) -> tuple[int, int]:
        """(op, argument length) of the posted request."""
        op, length, _, _ = _MAIL_HEAD.unpack_from(self._mm, self._off)
        return op, length

    def complete(self, ret: int, err: int) -> None:
        """Store the ioctl's return value and errno (0 on success)."""
        op, length, _, _ = _MAIL_HEAD.unpack_from(self._mm, self._off)
        _MAIL_HEAD.pack_into(self._mm, self._off, op, length, ret, err)

    def result(self) -> tuple[int, int]:
        """(return value, errno) stored by the runner."""
        _, _, ret, err = _MAIL_HEAD.unpack_from(self._mm, self._off)
        return ret, err
