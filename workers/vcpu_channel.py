"""The worker's end of one VCPU channel: the two transports, as `receive`/`send` of whole
encoded messages.

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

import errno
import socket
from typing import Final, Protocol

from vmsuper.shared import wire

__all__ = [
    "MAX_REQUEST",
    "MAX_REQUEST_FDS",
    "Channel",
    "ChannelFailed",
    "HungUp",
    "PipeChannel",
    "Refused",
    "SocketChannel",
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


class Channel(Protocol):
    """One VCPU channel, worker side."""

    def fds(self) -> tuple[int, ...]: ...

    def receive(self) -> bytes | None:
        """The next request; None when the plugin hung up. Raises `Refused`, `ChannelFailed`."""
        ...

    def send(self, data: bytes) -> None:
        """Send one encoded response. Raises `HungUp`, `ChannelFailed`."""
        ...


_HANGUP_ERRORS: Final = (BrokenPipeError, ConnectionResetError)


class SocketChannel:
    """SOCK_SEQPACKET: one plain message per datagram, both ways."""

    def __init__(self, fd: int) -> None:
        self._sock = socket.socket(fileno=fd)

    def fds(self) -> tuple[int, ...]:
        return (self._sock.fileno(),)

    def receive(self) -> bytes | None:
        try:
            datagram = wire.recv_datagram(self._sock, max_size=MAX_REQUEST, max_fds=MAX_REQUEST_FDS)
        except wire.MessageTooLarge as exc:
            raise Refused(None, errno.EMSGSIZE, str(exc)) from None
        except wire.TooManyFds as exc:
            raise Refused(None, errno.EINVAL, str(exc)) from None
        except _HANGUP_ERRORS:
            return None
        except (OSError, wire.WireError) as exc:
            raise ChannelFailed(f"receive failed: {exc}") from exc
        if datagram is None:
            return None
        if datagram.fds:
            count = len(datagram.fds)
            datagram.close_fds()
            raise Refused(datagram.data, errno.EINVAL, f"request came with {count} fds")
        return datagram.data

    def send(self, data: bytes) -> None:
        try:
            wire.send_datagram(self._sock, data)
        except _HANGUP_ERRORS as exc:
            raise HungUp(str(exc)) from exc
        except (OSError, wire.WireError) as exc:
            raise ChannelFailed(f"send failed: {exc}") from exc


class PipeChannel:
    """Two pipes: plain requests, one per read; length-delimited responses."""

    def __init__(self, request_fd: int, response_fd: int) -> None:
        self._request_fd = request_fd
        self._response_fd = response_fd

    def fds(self) -> tuple[int, ...]:
        return (self._request_fd, self._response_fd)

    def receive(self) -> bytes | None:
        try:
            return wire.read_plain(self._request_fd, max_size=MAX_REQUEST)
        except wire.MessageTooLarge as exc:
            # The rest of the request may still be in the pipe: the stream is out of step.
            raise ChannelFailed(f"request too large: {exc}") from exc
        except OSError as exc:
            raise ChannelFailed(f"read failed: {exc}") from exc

    def send(self, data: bytes) -> None:
        try:
            wire.write_all(self._response_fd, wire.encode_delimited(data))
        except _HANGUP_ERRORS as exc:
            raise HungUp(str(exc)) from exc
        except OSError as exc:
            raise ChannelFailed(f"write failed: {exc}") from exc
