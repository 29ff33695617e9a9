"""Block storage behind a disk controller: a raw image file, or the same with a write overlay.

This is the one place where a device model does file I/O: a controller calls `read` and
`write` synchronously, as a real disk answers its controller. Tests use `MemoryDisk`.
"""

from __future__ import annotations

import os
from typing import Protocol

SECTOR = 512


class DiskError(ValueError):
    """The image cannot be used as a disk; the message names the file and why."""


class Disk(Protocol):
    sectors: int

    def read(self, lba: int, count: int) -> bytes: ...

    def write(self, lba: int, data: bytes) -> None: ...

    def flush(self) -> None: ...


class MemoryDisk:
    """A disk in a bytearray (tests, scratch disks)."""

    def __init__(self, data: bytes | bytearray) -> None:
        if len(data) % SECTOR or not data:
            raise DiskError(f"a disk is a positive multiple of {SECTOR} bytes, not {len(data)}")
        self.data = bytearray(data)
        self.sectors = len(data) // SECTOR

    def read(self, lba: int, count: int) -> bytes:
        return bytes(self.data[lba * SECTOR : (lba + count) * SECTOR])

    def write(self, lba: int, data: bytes) -> None:
        self.data[lba * SECTOR : lba * SECTOR + len(data)] = data

    def flush(self) -> None:
        pass


class ImageDisk:
    """A raw image file; with ``snapshot`` writes stay in memory and the file is never written."""

    def __init__(self, path: str, *, snapshot: bool = False) -> None:
        self.path = path
        self.snapshot = snapshot
        flags = os.O_RDONLY if snapshot else os.O_RDWR
        try:
            self.fd = os.open(path, flags | os.O_CLOEXEC)
        except OSError as exc:
            raise DiskError(f"cannot open disk image {path}: {exc.strerror}") from None
        size = os.fstat(self.fd).st_size
        if size == 0 or size % SECTOR:
            os.close(self.fd)
            raise DiskError(
                f"disk image {path} is {size} bytes, not a positive multiple of {SECTOR}"
            )
        self.sectors = size // SECTOR
        self.overlay: dict[int, bytes] = {}

    def read(self, lba: int, count: int) -> bytes:
        data = bytearray(os.pread(self.fd, count * SECTOR, lba * SECTOR))
        for i in range(count):
            sector = self.overlay.get(lba + i)
            if sector is not None:
                data[i * SECTOR : (i + 1) * SECTOR] = sector
        return bytes(data)

    def write(self, lba: int, data: bytes) -> None:
        if self.snapshot:
            for i in range(len(data) // SECTOR):
                self.overlay[lba + i] = data[i * SECTOR : (i + 1) * SECTOR]
        else:
            os.pwrite(self.fd, data, lba * SECTOR)

    def flush(self) -> None:
        if not self.snapshot:
            os.fsync(self.fd)

    def close(self) -> None:
        os.close(self.fd)
