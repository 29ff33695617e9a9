"""Build the PC demo disk: a boot sector (demo_boot.S) and a line of text in sector 1.

    python -m vmsuper.pc.demo_disk OUTPUT [--size BYTES]

The boot sector is assembled from source with GNU as (`vmsuper.shared.asm`) at set-up.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from importlib import resources
from pathlib import Path

from vmsuper.shared.asm import assemble

BOOT_ADDRESS = 0x7C00
SECTOR = 512
DEFAULT_SIZE = 1 << 20
MESSAGE = b"Hello from sector 1 of the vmsuper PC demo disk!\r\n"


def boot_sector(source: str) -> bytes:
    """Assemble a boot sector from `source`, its own code and data, followed by `print` (a
    string to COM1: `boot_print.S`) and the boot signature; it must fit in 512 bytes."""
    tail = resources.files("vmsuper.pc").joinpath("boot_print.S").read_text()
    code = assemble(source.rstrip("\n") + "\n\n" + tail, bits=16, origin=BOOT_ADDRESS)
    if len(code) != SECTOR or code[-2:] != b"\x55\xaa":
        raise ValueError(f"a boot sector is 512 bytes ending in 55 aa, got {len(code)} bytes")
    return code


def disk_image(boot: bytes, sectors: dict[int, bytes], size: int = DEFAULT_SIZE) -> bytes:
    """`size` bytes: `boot` in sector 0, and each of `sectors` at its number."""
    image = bytearray(size)
    image[:SECTOR] = boot
    for number, data in sectors.items():
        image[number * SECTOR : number * SECTOR + len(data)] = data
    return bytes(image)


def demo_image(size: int = DEFAULT_SIZE) -> bytes:
    source = resources.files("vmsuper.pc").joinpath("demo_boot.S").read_text()
    return disk_image(boot_sector(source), {1: MESSAGE + b"\0"}, size)


def write_atomically(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def main() -> None:
    parser = argparse.ArgumentParser(description="Build the vmsuper PC demo disk.")
    parser.add_argument("output", type=Path)
    parser.add_argument("--size", type=int, default=DEFAULT_SIZE)
    args = parser.parse_args()
    write_atomically(args.output, demo_image(args.size))


if __name__ == "__main__":
    main()
