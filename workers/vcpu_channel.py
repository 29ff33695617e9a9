"""The worker's end of one VCPU channel: `receive`/`send` of whole encoded messages, carried
by the exit engine's C transport (`vms_receive`, `vms_send` in `hotpath.c`), the same code
the engine's own loop reads and writes with.

- socket: SOCK_SEQPACKET, one plain message per datagram both ways. A request that comes with
  file descriptors is refused (its fds closed) with EINVAL, one too large with EMSGSIZE; the
  channel stays usable.
- pipes: one plain request per read (the client writes one and waits); responses are written
  length-delimited, so the client may find several (async writes) in one read. A request too
  large for one read leaves the stream out of step: that ends the channel.

The plugin closing its end is a hang-up (`receive` returns None, `send` raises `HungUp`), not
an error: the worker stops cleanly and the supervisor decides what that means for the VM.
"""

from __future__ import annotations

import ctypes
import errno
import os
from typing import Any, Final

from vmsuper.shared import hotpath
from vmsuper.shared.hotpath import WorkerResult

__all__ = [
    "MAX_REQUEST",
    "MAX_REQUEST_FDS",
    "ChannelFailed",
    "HungUp",
    "Refused",
    "VcpuChannel",
    "channel_error",
    "refusal",
]

MAX_REQUEST: Final = 256 * 1024
"""Largest VCPU request accepted (crosvm's limit; the largest real one, SetCpuid with 256
entries, is about 10 KiB)."""

MAX_REQUEST_FDS: Final = 4
"""fds accepted (and closed) with a request on the socket transport before refusing."""


class HungUp(Exception):
    """The plugin closed its end of the channel."""


class ChannelFailed(Exception):
    """The channel cannot carry messages any more (I/O error, stream out of step)."""


class Refused(Exception):
    """A request arrived in a form that gets an error response without being acted on."""

    def __init__(self, data: bytes | None, code: int, why: str) -> None:
        super().__init__(why)
        self.data = data
        self.code = code
        self.why = why


def refusal(context: Any, data: bytes) -> Refused:
    """The `Refused` for a request the C transport refused (`WorkerResult.REFUSED`)."""
    code = int(context.refusal)
    if code == errno.EINVAL:
        why = f"request came with {context.fds} fds"
    else:
        why = f"request larger than {MAX_REQUEST} bytes"
    return Refused(data or None, code, why)


class VcpuChannel:
    """One VCPU channel, worker side, over the engine's context (a cffi `struct vms_worker`):
    the fds, the transport and the request buffer are the engine loop's own."""

    def __init__(self, fds: tuple[int, ...]) -> None:
        if len(fds) not in (1, 2):
            raise ValueError(f"a VCPU channel is one socket or two pipes, not {len(fds)} fds")
        self._fds = fds
        self.pipes = len(fds) == 2
        self.buffer = ctypes.create_string_buffer(MAX_REQUEST + 1)

    def fds(self) -> tuple[int, ...]:
        return self._fds

    def context_fields(self) -> dict[str, int]:
        """The transport's fields of the engine's context (`hotpath.WorkerContext`)."""
        return {
            "pipes": self.pipes,
            "in_fd": self._fds[0],
            "out_fd": self._fds[-1],
            "buf": ctypes.addressof(self.buffer),
            "max_request": MAX_REQUEST,
            "max_fds": MAX_REQUEST_FDS,
        }

    def attach(self, context: Any) -> None:
        """Read and write through the engine's context, made with `context_fields`."""
        self._context = context
        self._pointer = context

    @property
    def transport(self) -> str:
        return "pipes" if self.pipes else "socket"

    def request(self) -> bytes:
        """The request the last read left in the buffer."""
        return self.buffer.raw[: self._context.request_len]

    def receive(self) -> bytes | None:
        """The next request; None when the plugin hung up. Raises `Refused`, `ChannelFailed`."""
        while True:
            code = hotpath.library.vms_receive(self._pointer)
            if code != WorkerResult.INTERRUPTED:
                break  # a signal's handler ran meanwhile (PEP 475): read again
        if code == 0:
            return self.request()
        if code == WorkerResult.HUNGUP:
            return None
        raise channel_error(code, self._context, self.request())

    def send(self, data: bytes) -> None:
        """Send one encoded response. Raises `HungUp`, `ChannelFailed`."""
        code = hotpath.library.vms_send(self._pointer, data, len(data))
        if code == WorkerResult.HUNGUP:
            err = int(self._context.error)
            raise HungUp(f"[Errno {err}] {os.strerror(err)}")
        if code:
            raise channel_error(code, self._context)


def channel_error(code: int, context: Any, request: bytes = b"") -> Refused | ChannelFailed:
    """What a C transport code other than 0 and HUNGUP means (`vms_receive`, `vms_send`, or
    the engine loop reading a reply)."""
    if code == WorkerResult.REFUSED:
        return refusal(context, request)
    if code == WorkerResult.TOO_LARGE:
        # The rest of the request may still be in the pipe: the stream is out of step.
        return ChannelFailed(f"request too large: over {MAX_REQUEST} bytes")
    if code == WorkerResult.FAILED:
        err = int(context.error)
        return ChannelFailed(f"channel I/O failed: [Errno {err}] {os.strerror(err)}")
    return ChannelFailed(f"unexpected channel result {code}")
