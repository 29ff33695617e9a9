"""Assemble small guest programs (tests, demos) into flat binaries with GNU binutils.

`assemble(source, bits=16, origin=0x1000)` prepends `.code16`/`.code32`/`.code64`, runs
`as`, links the object with `ld -Ttext=<origin>` so that labels are absolute guest addresses
(far jumps, data pointers, `lgdt` operands), and extracts `.text` with
`objcopy -O binary`. Load the result at guest physical address `origin`. Only `.text` is
kept: put data in it too. `.org N` inside the source is relative to `origin`.

Results are cached under `$XDG_CACHE_HOME/vmsuper/asm` (default `~/.cache/vmsuper/asm`),
keyed by the sha256 of (bits, origin, source); files are written to a temporary name and
renamed, so parallel test processes never see a partial one.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Final

_MODES: Final = {
    16: (".code16", "--32", "elf_i386"),
    32: (".code32", "--32", "elf_i386"),
    64: (".code64", "--64", "elf_x86_64"),
}
# Bumped when the pipeline changes in a way that changes the output for the same input.
_PIPELINE_VERSION: Final = "1"
_TOOL_TIMEOUT_S: Final = 60
_SOURCE_NAME: Final = "<guest>"


class AssemblyError(Exception):
    """The source did not assemble or link, or binutils is missing; the message says why."""


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "vmsuper" / "asm"


def assemble(source: str, *, bits: int = 16, origin: int = 0) -> bytes:
    """Assemble GNU-syntax x86 `source` for a `bits`-bit mode, linked to run at `origin`."""
    if bits not in _MODES:
        raise ValueError(f"bits must be 16, 32 or 64, not {bits}")
    if not 0 <= origin < 1 << (32 if bits != 64 else 64):
        raise ValueError(f"origin {origin:#x} is outside the {bits}-bit address space")
    key = hashlib.sha256(f"{_PIPELINE_VERSION}\0{bits}\0{origin}\0{source}".encode()).hexdigest()
    cached = cache_dir() / f"{key}.bin"
    try:
        return cached.read_bytes()
    except OSError:
        pass
    binary = _build(source, bits, origin)
    _store(cached, binary)
    return binary


def _build(source: str, bits: int, origin: int) -> bytes:
    directive, as_flag, emulation = _MODES[bits]
    with tempfile.TemporaryDirectory(prefix="vmsuper-asm-") as tmp:
        src = Path(tmp, "guest.S")
        obj = Path(tmp, "guest.o")
        elf = Path(tmp, "guest.elf")
        out = Path(tmp, "guest.bin")
        # The line marker makes the assembler's messages count lines of `source` itself.
        src.write_text(f'{directive}\n.text\n# 1 "{_SOURCE_NAME}"\n{source}\n')
        _run(["as", as_flag, "-o", str(obj), str(src)], "assemble", tmp)
        _run(
            [
                "ld",
                "-m",
                emulation,
                "-z",
                "noexecstack",
                "-e",
                str(origin),
                f"-Ttext={origin:#x}",
                "-o",
                str(elf),
                str(obj),
            ],
            "link",
            tmp,
        )
        _run(["objcopy", "-O", "binary", "-j", ".text", str(elf), str(out)], "extract", tmp)
        return out.read_bytes()


def _run(argv: list[str], step: str, workdir: str) -> None:
    if shutil.which(argv[0]) is None:
        raise AssemblyError(f"cannot {step}: `{argv[0]}` (GNU binutils) is not installed")
    try:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=_TOOL_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise AssemblyError(f"cannot {step}: {exc}") from exc
    if result.returncode != 0:
        message = (result.stderr or result.stdout).strip().replace(workdir + os.sep, "")
        raise AssemblyError(f"{step} failed ({argv[0]} exited {result.returncode}):\n{message}")


def _store(path: Path, data: bytes) -> None:
    """Best effort: a cache that cannot be written only costs time."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".bin")
    except OSError:
        return
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
