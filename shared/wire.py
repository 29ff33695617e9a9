"""Message framing for the plugin protocol, and the thin socket/pipe helpers that move it.

The two transports frame messages differently because their readers differ:

- **SOCK_SEQPACKET sockets** (main connections, and VCPU channels in `socket` mode) keep
  message boundaries: one datagram is one plain encoded message, file descriptors ride along
  as `SCM_RIGHTS`. The receive buffer is sized per datagram (`MSG_PEEK | MSG_TRUNC`), so any
  request up to the limit is accepted and a larger one is refused without losing the
  connection. A zero-length read is a hang-up.
- **Pipes** (VCPU channels in `pipes` mode, what crosvm's client library speaks) are byte
  streams. Requests are plain: the client has at most one request in flight (it writes one,
  then reads; a `Resume` is answered by the next wait reason), so one `read` sees exactly one
  request. Responses are *length-delimited* (protobuf varint
  length, then the message), because async writes produce unsolicited responses and the client
  may find several of them queued in a single `read`; it splits them by their lengths.
  `DelimitedDecoder` is that splitter, sans-I/O, for anything that reads responses.

Pipes are enlarged (`enlarge_pipe`) so a whole response fits and is written by one `write`:
the client parses only what one `read` returns and rejects a response cut short.

The served `vmsuper run` imports this module before it hands its run over
(supervisor/serve_client.py), so it takes the C modules under `socket` and `threading`
(`_socket`, `_thread`: the same socket objects, locks and thread-local storage) rather than those
modules, whose enums, classes and own imports would cost that command a good part of its start,
and packs fds with `struct` (`array` imports `collections`).
"""

from __future__ import annotations

import _socket
import _thread
import errno
import fcntl
import os
import select
import stat
import struct
import time

TYPE_CHECKING = False
if TYPE_CHECKING:
    import threading
    from collections.abc import Iterable, Sequence

__all__ = [
    "MAX_FDS",
    "MAX_MESSAGE",
    "MAX_VARINT_LEN",
    "PIPE_SIZE",
    "SCM_MAX_FD",
    "Datagram",
    "DelimitedDecoder",
    "FramingError",
    "MessageTooLarge",
    "NoRoomForFds",
    "TooManyFds",
    "WireError",
    "close_received",
    "close_received_in_place",
    "encode_delimited",
    "encode_varint",
    "enlarge_pipe",
    "peer_credentials",
    "read_plain",
    "recv_datagram",
    "send_datagram",
    "wait_for_closes",
    "write_all",
]

MAX_MESSAGE = 1 << 20
"""Default size limit of one message: requests up to 1 MiB must be accepted."""

MAX_FDS = 32
"""Default limit of fds received with one datagram (what crosvm's client accepts, too)."""

SCM_MAX_FD = 253
"""The kernel's limit of fds in one `SCM_RIGHTS` message."""

MAX_VARINT_LEN = 10
"""A protobuf varint encodes at most 64 bits, in at most 10 bytes."""

PIPE_SIZE = 256 * 1024
"""Pipe buffer size for VCPU channels: crosvm's client reads responses 256 KiB at a time."""

# A string, not a Path: the served `vmsuper run` imports this module, and pathlib costs its start.
_PIPE_MAX_SIZE_PATH = "/proc/sys/fs/pipe-max-size"
_FD_SIZE = struct.calcsize("i")
_PEEK_FLAGS = _socket.MSG_PEEK | _socket.MSG_TRUNC
_SO_SNDBUFFORCE = getattr(_socket, "SO_SNDBUFFORCE", 32)  # <asm-generic/socket.h>; not in Python


class WireError(Exception):
    """A message could not be framed, sent or received as the transport requires."""


class MessageTooLarge(WireError):
    """A message exceeds the size limit; it was consumed (and its fds closed) or not sent.

    For a pipe, `size` is only what one read returned, a lower bound of the real size.
    """

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(f"message of {size} bytes exceeds the limit of {limit} bytes")
        self.size = size
        self.limit = limit


class FramingError(WireError):
    """The byte stream cannot be split into messages: the channel is out of step for good."""


class TooManyFds(WireError):
    """A datagram carried more fds than allowed; every one that arrived was closed.

    `count` is how many arrived, a lower bound when the kernel had to drop some.
    """

    def __init__(self, count: int, limit: int) -> None:
        super().__init__(f"datagram carried {count} or more fds, the limit is {limit}")
        self.count = count
        self.limit = limit


class NoRoomForFds(TooManyFds):
    """The kernel could not give the receiver the fds a datagram carried: the receiving
    process is at its open-file limit (EMFILE). Every one that arrived was closed; `data` is
    the datagram's bytes, so that the refusal can say what it refuses."""

    def __init__(self, count: int, limit: int, data: bytes = b"") -> None:
        WireError.__init__(
            self, f"no room for the datagram's fds: {count} of them arrived (open-file limit)"
        )
        self.count = count
        self.limit = limit
        self.data = data


def _close_all(fds: Iterable[int]) -> None:
    """Close every fd, even when closing one fails; the first failure is raised at the end."""
    failure: OSError | None = None
    for fd in fds:
        try:
            close_received(fd)
        except OSError as exc:
            failure = failure or exc
    if failure is not None:
        raise failure


_NO_LINGER = struct.pack("ii", 0, 0)


def close_received(fd: int) -> None:
    """Close an fd that came from a peer, without waiting on it.

    The last close of a socket with SO_LINGER set waits until its send queue drains or the
    linger time ends (a peer can make that many seconds). Lingering is turned off first, so
    the close returns at once and the kernel sends what is queued on its own; and since the
    peer could turn it back on through a copy that it closes at just the wrong moment, a
    socket is closed on a short-lived thread of its own, which is all such a close can hold
    up. Closing the other kinds a peer can pass (memfds, pipes, eventfds...) does not wait.
    After `close_received_in_place`, every fd is closed at once on the calling thread.
    """
    if _in_place:
        os.close(fd)
        return
    try:
        is_socket = stat.S_ISSOCK(os.fstat(fd).st_mode)
    except OSError:
        is_socket = False
    if not is_socket:
        os.close(fd)
        return
    import contextlib  # these two only here: see the module's docstring
    import threading

    try:
        sock = _socket.socket(fileno=fd)
    except OSError:
        pass
    else:
        with contextlib.suppress(OSError):
            sock.setsockopt(_socket.SOL_SOCKET, _socket.SO_LINGER, _NO_LINGER)
        sock.detach()

    closer = threading.Thread(target=_close_quietly, args=(fd,), name="close-socket", daemon=True)
    with _closers_lock:
        _closers.add(closer)
    try:
        closer.start()
    except RuntimeError:  # no thread to be had: close here
        with _closers_lock:
            _closers.discard(closer)
        os.close(fd)


_in_place = False


def close_received_in_place() -> None:
    """Make `close_received` close fds at once, on the caller's thread: for a process that may
    start no thread nor look at an fd (a confined VCPU worker, `workers/confine.py`), where a
    close that lingers holds up only the sending plugin's own VCPU, as in `hotpath.c`."""
    global _in_place
    _in_place = True


_closers: set[threading.Thread] = set()
_closers_lock = _thread.allocate_lock()


def _close_quietly(fd: int) -> None:
    import threading  # imported already: this runs on a thread close_received started

    try:
        os.close(fd)
    except OSError:
        pass
    finally:
        with _closers_lock:
            _closers.discard(threading.current_thread())


def wait_for_closes(timeout: float) -> bool:
    """Wait until every close `close_received` handed to a thread has returned; False if
    one still has not after `timeout` seconds (for checks that count open fds)."""
    deadline = time.monotonic() + timeout
    with _closers_lock:
        pending = list(_closers)
    for closer in pending:
        closer.join(max(0.0, deadline - time.monotonic()))
    with _closers_lock:
        return not _closers


class Datagram:
    """One received datagram: its bytes and the fds (close-on-exec) that came with it."""

    __slots__ = ("data", "fds")

    def __init__(self, data: bytes, fds: list[int] | None = None) -> None:
        self.data = data
        self.fds: list[int] = [] if fds is None else fds

    def close_fds(self) -> None:
        """Close every fd still held; safe to call twice."""
        fds, self.fds = self.fds, []
        _close_all(fds)


# --- SOCK_SEQPACKET datagrams --------------------------------------------------------------


def _peek_size(sock: _socket.socket) -> int:
    """The length of the next datagram, without consuming it (0: hang-up or empty datagram).

    Blocks on a blocking socket; raises BlockingIOError on a non-blocking one with nothing
    queued. With `MSG_TRUNC`, Linux returns the datagram's real length, not the bytes copied.
    A one-byte buffer is needed: Python skips the system call for an empty one.
    """
    return sock.recv_into(bytearray(1), 1, _PEEK_FLAGS)


def _fds_of(ancdata: list[tuple[int, int, bytes]]) -> list[int]:
    fds: list[int] = []
    for level, kind, payload in ancdata:
        if level == _socket.SOL_SOCKET and kind == _socket.SCM_RIGHTS:
            fds.extend(struct.unpack_from(f"{len(payload) // _FD_SIZE}i", payload))
    return fds


_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


def peer_credentials(sock: _socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of a connected unix socket's peer, as the kernel took them at connect."""
    return _UCRED.unpack(sock.getsockopt(_socket.SOL_SOCKET, _socket.SO_PEERCRED, _UCRED.size))


def recv_datagram(
    sock: _socket.socket, *, max_size: int = MAX_MESSAGE, max_fds: int = MAX_FDS
) -> Datagram | None:
    """Receive one datagram from a SOCK_SEQPACKET socket; None means the peer hung up.

    A zero-length datagram counts as a hang-up too (the protocol has no empty message on
    sockets); fds that came with it are closed. A refused datagram (too large, too many fds)
    is consumed whole and its fds closed, so the connection stays usable: MessageTooLarge or
    TooManyFds (NoRoomForFds when this process has no fd left for them) is raised.
    Non-blocking sockets with nothing queued raise BlockingIOError.
    Non-`SCM_RIGHTS` control messages (credentials) are ignored.
    """
    if max_size < 0 or max_fds < 0:
        raise ValueError(f"limits must not be negative: max_size={max_size} max_fds={max_fds}")
    size = _peek_size(sock)
    # CMSG_SPACE rounds up to the alignment, so room for max_fds may hold one more: the
    # count is checked below as well as MSG_CTRUNC.
    ancbufsize = _socket.CMSG_SPACE(max_fds * _FD_SIZE) if max_fds else 0
    data, ancdata, flags, _ = sock.recvmsg(
        size if size <= max_size else 0, ancbufsize, _socket.MSG_CMSG_CLOEXEC
    )
    fds = _fds_of(ancdata)
    if size > max_size:
        _close_all(fds)
        raise MessageTooLarge(size, max_size)
    if size == 0:
        _close_all(fds)
        return None
    if flags & _socket.MSG_CTRUNC or len(fds) > max_fds:
        _close_all(fds)
        if flags & _socket.MSG_CTRUNC and max_fds > 0 and len(fds) < max_fds:
            # There was room in the buffer for more: the kernel failed to install the rest.
            raise NoRoomForFds(len(fds), max_fds, data)
        raise TooManyFds(len(fds) + 1 if flags & _socket.MSG_CTRUNC else len(fds), max_fds)
    if flags & _socket.MSG_TRUNC:
        # Only another reader of the same socket can swap the datagram after the peek.
        _close_all(fds)
        raise FramingError(f"datagram longer than the {size} bytes peeked: socket shared?")
    return Datagram(data, fds)


def _grow_send_buffer(sock: _socket.socket, size: int) -> None:
    """Let `sock` send a datagram of `size` bytes (the kernel refuses one above SO_SNDBUF).

    SO_SNDBUFFORCE (CAP_NET_ADMIN) ignores net.core.wmem_max; SO_SNDBUF is capped by it.
    """
    wanted = size + 4096
    try:
        sock.setsockopt(_socket.SOL_SOCKET, _SO_SNDBUFFORCE, wanted)
    except PermissionError:
        sock.setsockopt(_socket.SOL_SOCKET, _socket.SO_SNDBUF, wanted)


def send_datagram(sock: _socket.socket, data: bytes, fds: Sequence[int] = ()) -> None:
    """Send `data` as one datagram with `fds` attached as SCM_RIGHTS (the fds stay open here).

    A datagram larger than the socket's send buffer makes the buffer grow once; if the kernel
    still refuses, MessageTooLarge. A full peer queue blocks (or raises BlockingIOError).
    """
    if len(fds) > SCM_MAX_FD:
        raise TooManyFds(len(fds), SCM_MAX_FD)
    ancdata = (
        [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, struct.pack(f"{len(fds)}i", *fds))] if fds else []
    )
    try:
        sent = sock.sendmsg([data], ancdata)
    except OSError as exc:
        if exc.errno != errno.EMSGSIZE:
            raise
        _grow_send_buffer(sock, len(data))
        try:
            sent = sock.sendmsg([data], ancdata)
        except OSError as again:
            if again.errno != errno.EMSGSIZE:
                raise
            limit = sock.getsockopt(_socket.SOL_SOCKET, _socket.SO_SNDBUF)
            raise MessageTooLarge(len(data), limit) from again
    if sent != len(data):  # SOCK_SEQPACKET sends all or nothing; anything else is a misuse.
        raise WireError(f"sent {sent} of {len(data)} bytes: not a datagram socket?")


# --- pipes: plain requests -----------------------------------------------------------------

_read_buffers = _thread._local()


def _read_buffer(size: int) -> bytearray:
    """A reusable per-thread buffer: allocating 1 MiB per read would cost more than the read."""
    buf: bytearray | None = getattr(_read_buffers, "buf", None)
    if buf is None or len(buf) < size:
        buf = bytearray(size)
        _read_buffers.buf = buf
    return buf


def read_plain(fd: int, *, max_size: int = MAX_MESSAGE) -> bytes | None:
    """Read one plain request (one `write` of the client) from a pipe; None at end of file.

    A read that fills the limit would be ambiguous, so this reads up to `max_size + 1`
    bytes and raises MessageTooLarge if more came. The rest of an oversized request may still
    be in the pipe, so after that error the channel is out of step and must be closed.
    """
    if max_size < 0:
        raise ValueError(f"max_size must not be negative: {max_size}")
    with memoryview(_read_buffer(max_size + 1)) as view:
        count = os.readv(fd, [view[: max_size + 1]])
        if count == 0:
            return None
        if count > max_size:
            raise MessageTooLarge(count, max_size)
        return view[:count].tobytes()


# --- pipes: length-delimited responses -----------------------------------------------------


def encode_varint(value: int) -> bytes:
    """Protobuf base-128 varint of an unsigned 64-bit integer."""
    if value < 0x80:
        if value < 0:
            raise ValueError(f"a varint holds an unsigned value, not {value}")
        return bytes((value,))
    if value >= 1 << 64:
        raise ValueError(f"a varint holds at most 64 bits, not {value}")
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def encode_delimited(payload: bytes) -> bytes:
    """`payload` preceded by its length as a varint (protobuf's writeDelimitedTo)."""
    return encode_varint(len(payload)) + payload


class DelimitedDecoder:
    """Splits a stream of length-delimited messages, whatever the read boundaries.

    `feed` returns every message completed by the new bytes and keeps a partial one (cut
    anywhere, even inside its length) for the next call. A length varint over 10 bytes, or a
    length beyond `max_size`, raises FramingError as soon as it is seen, and every later
    `feed` raises too: such a stream cannot get back in step. At most `max_size + 9` bytes are
    ever held. When a feed starts at a message boundary the bytes are parsed in place, so the
    common case of whole messages per read copies nothing but the messages themselves.
    """

    __slots__ = ("_broken", "_buf", "_max_size")

    def __init__(self, max_size: int = MAX_MESSAGE) -> None:
        if max_size < 0:
            raise ValueError(f"max_size must not be negative: {max_size}")
        self._max_size = max_size
        self._buf = bytearray()
        self._broken: FramingError | None = None

    @property
    def max_size(self) -> int:
        return self._max_size

    @property
    def pending(self) -> int:
        """Bytes held back: the start of a message not yet complete."""
        return len(self._buf)

    @property
    def at_boundary(self) -> bool:
        """True when no partial message is held (the stream ends cleanly here)."""
        return not self._buf

    def feed(self, data: bytes | bytearray | memoryview) -> list[bytes]:
        """Add bytes from the stream; return the messages they complete, in order."""
        if self._broken is not None:
            raise FramingError(f"stream already out of step: {self._broken}")
        messages: list[bytes] = []
        if self._buf:
            self._buf += data
            try:
                with memoryview(self._buf) as view:
                    used = self._split(view, messages)
            except FramingError as exc:
                self._fail(exc)
                raise
            del self._buf[:used]
        else:
            with memoryview(data) as raw, raw.cast("B") as view:
                try:
                    used = self._split(view, messages)
                except FramingError as exc:
                    self._fail(exc)
                    raise
                self._buf += view[used:]
        return messages

    def _fail(self, exc: FramingError) -> None:
        self._broken = exc
        self._buf = bytearray()

    def _split(self, view: memoryview, out: list[bytes]) -> int:
        """Append each whole message in `view` to `out`; return how many bytes they took."""
        limit = self._max_size
        end = len(view)
        pos = 0
        while pos < end:
            byte = view[pos]
            start = pos + 1
            length = byte & 0x7F
            shift = 7
            while byte & 0x80:
                if start - pos == MAX_VARINT_LEN:
                    raise FramingError(f"length varint longer than {MAX_VARINT_LEN} bytes")
                if start == end:
                    if length > limit:  # more length bytes can only make it larger
                        raise FramingError(f"declared length over the limit of {limit} bytes")
                    return pos
                byte = view[start]
                start += 1
                length |= (byte & 0x7F) << shift
                shift += 7
            if length > limit:
                raise FramingError(f"declared length {length} over the limit of {limit} bytes")
            stop = start + length
            if stop > end:
                return pos
            out.append(view[start:stop].tobytes())
            pos = stop
        return pos


# --- pipes: buffer size and whole writes ---------------------------------------------------


def _pipe_max_size() -> int | None:
    try:
        with open(_PIPE_MAX_SIZE_PATH, "rb") as limit:
            return int(limit.read())
    except (OSError, ValueError):
        return None


def enlarge_pipe(fd: int, size: int = PIPE_SIZE) -> int:
    """Set the pipe's buffer to at least `size` bytes (F_SETPIPE_SZ); return the new size.

    Without CAP_SYS_RESOURCE the kernel refuses sizes over /proc/sys/fs/pipe-max-size (and
    any growth once the user's pipe quota is used up): then the largest allowed size is set,
    and a pipe is never shrunk by the fallback. The kernel rounds sizes up to a power of two
    pages, so the result may exceed `size`.
    """
    try:
        return fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, size)
    except PermissionError:
        pass
    current = fcntl.fcntl(fd, fcntl.F_GETPIPE_SZ)
    allowed = _pipe_max_size()
    if allowed is None or allowed <= current:
        return current
    try:
        return fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, min(size, allowed))
    except PermissionError:
        return current


def write_all(fd: int, data: bytes) -> None:
    """Write all of `data` to `fd`, looping over partial writes.

    A message no larger than the free pipe space goes in with one `write`, whole, so a reader
    never sees part of it. On a non-blocking fd this waits for room rather than leave a
    message half written, which would put the stream out of step.
    """
    with memoryview(data) as view:
        while view:
            try:
                written = os.write(fd, view)
            except BlockingIOError:
                poller = select.poll()
                poller.register(fd, select.POLLOUT)
                poller.poll()
                continue
            view = view[written:]
