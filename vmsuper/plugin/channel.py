"""The two VCPU channel transports, behind one small interface.

`GetVcpus` answers with fds only, so the transport is told apart by what the fds are: sockets
(one SOCK_SEQPACKET socket per VCPU, one message per datagram both ways) or pipes (two per
VCPU: the end the plugin writes requests to, then the end it reads length-delimited responses
from). Pipes may deliver several responses in one read, so their channel keeps a queue;
`has_pending` tells an event loop that polling the fd would miss one.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import stat
from collections import deque
from collections.abc import Iterable
from typing import Protocol

from vmsuper.shared import wire

from .errors import ConnectionClosedError, PluginError, ProtocolError

MAX_RESPONSE = wire.MAX_MESSAGE
READ_CHUNK = 64 * 1024


class VcpuChannel(Protocol):
    """Moves encoded VcpuRequests out and VcpuResponses in; blocking."""

    def fileno(self) -> int:
        """The fd that becomes readable when a response arrives."""
        ...

    def send(self, data: bytes) -> None: ...

    def recv(self) -> bytes:
        """One encoded response; ConnectionClosedError when the server hung up."""
        ...

    def has_pending(self) -> bool:
        """True if a response is already buffered (recv will not block)."""
        ...

    def close(self) -> None: ...


def _closed(exc: OSError) -> bool:
    return isinstance(exc, BrokenPipeError | ConnectionResetError)


class SocketChannel:
    """A VCPU channel over one SOCK_SEQPACKET socket."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock

    def fileno(self) -> int:
        return self._sock.fileno()

    def send(self, data: bytes) -> None:
        try:
            wire.send_datagram(self._sock, data)
        except wire.WireError as exc:
            raise PluginError(errno.EMSGSIZE, str(exc), "vcpu") from exc
        except OSError as exc:
            if _closed(exc):
                raise ConnectionClosedError(request="vcpu") from exc
            raise

    def recv(self) -> bytes:
        try:
            datagram = wire.recv_datagram(self._sock, max_size=MAX_RESPONSE, max_fds=0)
        except ConnectionResetError as exc:
            raise ConnectionClosedError(request="vcpu") from exc
        except wire.WireError as exc:
            raise ProtocolError(f"bad VCPU response datagram: {exc}", "vcpu") from exc
        if datagram is None:
            raise ConnectionClosedError(request="vcpu")
        return datagram.data

    def has_pending(self) -> bool:
        return False

    def close(self) -> None:
        self._sock.close()


class PipeChannel:
    """A VCPU channel over two pipes: plain requests out, length-delimited responses in."""

    def __init__(self, write_fd: int, read_fd: int) -> None:
        self._write_fd = write_fd
        self._read_fd = read_fd
        self._decoder = wire.DelimitedDecoder(MAX_RESPONSE)
        self._queue: deque[bytes] = deque()

    def fileno(self) -> int:
        return self._read_fd

    def send(self, data: bytes) -> None:
        try:
            wire.write_all(self._write_fd, data)
        except BrokenPipeError as exc:
            raise ConnectionClosedError(request="vcpu") from exc

    def recv(self) -> bytes:
        while not self._queue:
            chunk = os.read(self._read_fd, READ_CHUNK)
            if not chunk:
                raise ConnectionClosedError(request="vcpu")
            try:
                self._queue.extend(self._decoder.feed(chunk))
            except wire.WireError as exc:
                raise ProtocolError(f"bad VCPU response framing: {exc}", "vcpu") from exc
        return self._queue.popleft()

    def has_pending(self) -> bool:
        return bool(self._queue)

    def close(self) -> None:
        fds = [fd for fd in (self._write_fd, self._read_fd) if fd >= 0]
        self._write_fd = self._read_fd = -1
        for fd in fds:
            os.close(fd)


def channels_from_fds(fds: list[int]) -> list[VcpuChannel]:
    """Build one channel per VCPU from the fds of a GetVcpus response (taking them over).

    All sockets: one channel per fd. All FIFOs, an even number: pairs (write end, read end).
    Anything else is a protocol error, and every fd is closed.
    """
    try:
        modes = [os.fstat(fd).st_mode for fd in fds]
        if fds and all(stat.S_ISSOCK(mode) for mode in modes):
            for fd in fds:
                if _socket_type(fd) != socket.SOCK_SEQPACKET:
                    raise ProtocolError(f"VCPU socket fd {fd} is not SOCK_SEQPACKET", "get_vcpus")
            return [SocketChannel(socket.socket(fileno=fd)) for fd in fds]
        if fds and len(fds) % 2 == 0 and all(stat.S_ISFIFO(mode) for mode in modes):
            return [PipeChannel(fds[i], fds[i + 1]) for i in range(0, len(fds), 2)]
    except BaseException:
        close_quietly(fds)
        raise
    close_quietly(fds)
    raise ProtocolError(
        f"GetVcpus returned {len(fds)} fds that are neither all sockets nor pairs of pipes",
        "get_vcpus",
    )


def _socket_type(fd: int) -> int:
    """The socket type of `fd`, leaving the fd open and unowned."""
    sock = socket.socket(fileno=fd)
    try:
        return sock.type
    finally:
        sock.detach()


def close_quietly(fds: Iterable[int]) -> None:
    """Close fds on an error path, where a second error would hide the first."""
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)
