"""Disk backings: a raw image written in place, or through an in-memory overlay (snapshot)."""

from pathlib import Path

import pytest

from vmsuper.devices import DiskError, ImageDisk, MemoryDisk
from vmsuper.devices.disk import SECTOR


def image(tmp_path: Path, sectors: int = 4) -> Path:
    path = tmp_path / "disk.img"
    path.write_bytes(b"".join(bytes([n]) * SECTOR for n in range(sectors)))
    return path


def test_writes_go_to_the_file(tmp_path: Path) -> None:
    path = image(tmp_path)
    disk = ImageDisk(str(path))
    assert disk.sectors == 4
    disk.write(1, b"\xaa" * SECTOR * 2)
    disk.flush()
    assert disk.read(0, 4) == b"\0" * SECTOR + b"\xaa" * SECTOR * 2 + b"\3" * SECTOR
    assert path.read_bytes()[SECTOR : 3 * SECTOR] == b"\xaa" * SECTOR * 2
    disk.close()


def test_snapshot_keeps_writes_in_memory(tmp_path: Path) -> None:
    path = image(tmp_path)
    before = path.read_bytes()
    disk = ImageDisk(str(path), snapshot=True)
    disk.write(2, b"\x55" * SECTOR)
    disk.flush()
    assert disk.read(1, 3) == b"\1" * SECTOR + b"\x55" * SECTOR + b"\3" * SECTOR
    assert path.read_bytes() == before
    disk.close()


@pytest.mark.parametrize("size", [0, 700])
def test_sizes_that_are_not_whole_sectors_are_refused(tmp_path: Path, size: int) -> None:
    path = tmp_path / "odd.img"
    path.write_bytes(bytes(size))
    with pytest.raises(DiskError, match=f"{size} bytes, not a positive multiple of 512"):
        ImageDisk(str(path))
    with pytest.raises(DiskError):
        MemoryDisk(bytes(size))


def test_a_missing_image_is_named(tmp_path: Path) -> None:
    with pytest.raises(DiskError, match=r"cannot open disk image .*nothing\.img"):
        ImageDisk(str(tmp_path / "nothing.img"))
