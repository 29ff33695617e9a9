"""Compile the benchmark's C programs (the native plugin, the reference) with the system cc.

Binaries are cached under `$XDG_CACHE_HOME/vmsuper/bench` (default `~/.cache/vmsuper/bench`),
named by the sha256 of the source and the flags, and written under a temporary name then
renamed, so concurrent runs never execute a half-written file.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Final

SOURCES: Final = Path(__file__).resolve().parent
CFLAGS: Final = ("-O2", "-std=gnu11", "-Wall", "-Wextra", "-Werror", "-pthread")
_TIMEOUT_S: Final = 120


class BuildError(Exception):
    """A C program did not compile (or there is no compiler); the message has cc's output."""


@dataclass(frozen=True)
class Programs:
    native_plugin: Path
    reference: Path


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "vmsuper" / "bench"


def compiler() -> str:
    for name in (os.environ.get("CC", ""), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return name
    raise BuildError("no C compiler found (install gcc, or set CC)")


def build(name: str) -> Path:
    """The executable built from `benchmarks/<name>.c`, compiled once per source version."""
    source = SOURCES / f"{name}.c"
    cc = compiler()
    text = source.read_bytes()
    key = hashlib.sha256(b"\0".join([cc.encode(), *map(str.encode, CFLAGS), text])).hexdigest()
    target = cache_dir() / f"{name}-{key[:16]}"
    if os.access(target, os.X_OK):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{name}-", dir=target.parent)
    os.close(fd)
    try:
        done = subprocess.run(
            [cc, *CFLAGS, "-o", tmp, str(source)],
            capture_output=True,
            text=True,
            timeout=_TIMEOUT_S,
            check=False,
        )
        if done.returncode != 0:
            raise BuildError(f"{cc} failed on {source.name}:\n{done.stderr.strip()}")
        os.chmod(tmp, 0o755)
        os.replace(tmp, target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    return target


def build_all() -> Programs:
    return Programs(native_plugin=build("native_plugin"), reference=build("reference"))
