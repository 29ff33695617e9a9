"""Odd file descriptors for a plugin to attach to its requests, and how many a process holds.

A plugin can attach any fd to any request; only Create.memory takes one (a memfd sealed
against shrinking). The kinds here are what a hostile or careless plugin has at hand.
"""

from __future__ import annotations

import contextlib
import enum
import fcntl
import os
import socket
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from vmsuper.shared.plugin_pb2 import MainRequest

from .hostile import PAGE, Chooser, pick, takes_memfd

F_ADD_SEALS = 1033
F_SEAL_SHRINK = 0x0002
F_SEAL_GROW = 0x0004
F_SEAL_WRITE = 0x0008
F_SEAL_FUTURE_WRITE = 0x0010
MAX_MEMFD_SIZE = 1 << 24


class FdKind(enum.Enum):
    """What a plugin can attach to a request."""

    SEALED_MEMFD = "sealed memfd"  # F_SEAL_SHRINK: what Create.memory wants
    SEALED_GROW_MEMFD = "memfd sealed against shrinking and growing"
    WRITE_SEALED_MEMFD = "memfd sealed against writes (cannot be mapped writable)"
    FUTURE_WRITE_SEALED_MEMFD = "memfd sealed against future writes (mapped read-only only)"
    UNSEALED_MEMFD = "memfd without seals"
    UNSEALABLE_MEMFD = "memfd made without MFD_ALLOW_SEALING"
    EVENTFD = "eventfd"
    PIPE_READ = "read end of a pipe"
    PIPE_WRITE = "write end of a pipe"
    SOCKET = "SOCK_SEQPACKET socket"
    DEV_NULL = "/dev/null"
    PATH = "O_PATH fd of /"


@dataclass(frozen=True)
class FdSpec:
    kind: FdKind
    size: int = 0
    """For memfds: the file's size."""


def fd_spec(ch: Chooser, wanted_size: int | None = None) -> FdSpec:
    """A random fd; given `wanted_size` (what a Create.memory maps), mostly a sealed memfd of
    that size."""
    if wanted_size is not None and 0 <= wanted_size <= MAX_MEMFD_SIZE and ch.integer(0, 3):
        return FdSpec(FdKind.SEALED_MEMFD, wanted_size)
    kind = pick(ch, list(FdKind))
    size = pick(ch, (0, PAGE, 0x1001, 0x2000, 0x10000, ch.integer(0, 1 << 20)))
    return FdSpec(kind, size)


def fd_specs(ch: Chooser, request: MainRequest | None, most: int = 6) -> list[FdSpec]:
    """The fds to attach to a request: none mostly, one for a Create.memory mostly."""
    wanted = None
    if takes_memfd(request):
        assert request is not None
        wanted = request.create.memory.offset + request.create.memory.length
        count = 1 if ch.integer(0, 5) else ch.integer(0, most)
    else:
        count = 0 if ch.integer(0, 5) else ch.integer(1, most)
    return [fd_spec(ch, wanted) for _ in range(count)]


@dataclass
class OpenedFds:
    """Fds made from specs: `sent` go with the request, `kept` are ours (the far ends)."""

    sent: list[int] = field(default_factory=list)
    kept: list[int] = field(default_factory=list)

    def close_kept(self) -> None:
        for fd in self.kept:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.kept.clear()


def _memfd(size: int, seals: int, sealing: bool = True) -> int:
    flags = os.MFD_CLOEXEC | (os.MFD_ALLOW_SEALING if sealing else 0)
    fd = os.memfd_create("hostile", flags)
    try:
        os.ftruncate(fd, size)
        if seals:
            fcntl.fcntl(fd, F_ADD_SEALS, seals)
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_fd(spec: FdSpec, opened: OpenedFds) -> None:
    kind, size = spec.kind, spec.size
    if kind is FdKind.SEALED_MEMFD:
        opened.sent.append(_memfd(size, F_SEAL_SHRINK))
    elif kind is FdKind.SEALED_GROW_MEMFD:
        opened.sent.append(_memfd(size, F_SEAL_SHRINK | F_SEAL_GROW))
    elif kind is FdKind.WRITE_SEALED_MEMFD:
        opened.sent.append(_memfd(size, F_SEAL_SHRINK | F_SEAL_WRITE))
    elif kind is FdKind.FUTURE_WRITE_SEALED_MEMFD:
        opened.sent.append(_memfd(size, F_SEAL_SHRINK | F_SEAL_FUTURE_WRITE))
    elif kind is FdKind.UNSEALED_MEMFD:
        opened.sent.append(_memfd(size, 0))
    elif kind is FdKind.UNSEALABLE_MEMFD:
        opened.sent.append(_memfd(size, 0, sealing=False))
    elif kind is FdKind.EVENTFD:
        opened.sent.append(os.eventfd(0, os.EFD_CLOEXEC))
    elif kind in (FdKind.PIPE_READ, FdKind.PIPE_WRITE):
        r, w = os.pipe2(os.O_CLOEXEC)
        sent, kept = (r, w) if kind is FdKind.PIPE_READ else (w, r)
        opened.sent.append(sent)
        opened.kept.append(kept)
    elif kind is FdKind.SOCKET:
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        opened.sent.append(a.detach())
        opened.kept.append(b.detach())
    elif kind is FdKind.DEV_NULL:
        opened.sent.append(os.open("/dev/null", os.O_RDWR | os.O_CLOEXEC))
    else:
        opened.sent.append(os.open("/", os.O_PATH | os.O_CLOEXEC))


@contextlib.contextmanager
def opened_fds(specs: Sequence[FdSpec]) -> Iterator[OpenedFds]:
    """Open the fds of `specs`; on leaving, close our far ends (the sent ones belong to
    whoever they were handed to)."""
    opened = OpenedFds()
    try:
        for spec in specs:
            open_fd(spec, opened)
    except BaseException:
        opened.kept += opened.sent
        opened.close_kept()
        raise
    try:
        yield opened
    finally:
        opened.close_kept()


def fd_count(pid: int | str = "self") -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def fd_kinds(pid: int | str = "self") -> list[str]:
    """What each of a process's fds is, sorted, with inode numbers left out ("socket",
    "anon_inode:[eventfd]", "/dev/kvm"): an fd opened and another closed shows, where a
    count would not, and a failure names what differs."""
    kinds = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except FileNotFoundError:
            continue  # closed while listed
        kinds.append(target.split(":[")[0] if target.startswith(("socket:[", "pipe:[")) else target)
    return sorted(kinds)


def memfd_mappings(pid: int | str = "self") -> int:
    """Mappings of memfds in a process (guest memory the supervisor mapped)."""
    with open(f"/proc/{pid}/maps") as maps:
        return sum("/memfd:" in line for line in maps)
