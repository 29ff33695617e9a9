"""What the compiled hot path is built from, and the digest that tells a stale build.

`hotpath_build.py` compiles the digest of these files into the module; `hotpath` compares it
with the files beside it (when they are there: an installed wheel has only the module), so a
module built from other sources is refused with the command that rebuilds it. Standard
library only: the build loads this file on its own, before vmsuper is importable.
"""

from __future__ import annotations

import binascii
from pathlib import Path
from typing import Final

SOURCES: Final = (
    "hotpath.c",
    "hotpath.h",
    "seqlock.c",
    "vms_abi.h",
    "abi.py",
    "hotpath_build.py",
    "hotpath_source.py",
)
"""The files of `vmsuper.shared` the module is built from."""


def digest(directory: Path) -> int:
    """A 63-bit digest of `SOURCES` in `directory` (fits a C integer constant as it is):
    the CRC-32 of the files, each after its name, and that of the same bytes reversed.

    Each CRC catches every change within 32 consecutive bits, and a pair of them misses other
    changes far more rarely than one: enough to tell a stale build, which needs no
    cryptographic hash (`hashlib` loaded OpenSSL, milliseconds of every start-up; protobuf
    loads binascii anyway)."""
    data = b"".join(
        name.encode() + b"\0" + (directory / name).read_bytes() + b"\0" for name in SOURCES
    )
    return binascii.crc32(data) << 31 | binascii.crc32(data[::-1]) >> 1
