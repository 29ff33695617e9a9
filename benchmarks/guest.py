"""The benchmark guest: one real-mode loop of `out` instructions between two marker ports.

Every VCPU runs the same code from `LOAD_ADDRESS`: one write to `START_PORT` (its first exit,
where the plugins start their clocks), `exits` writes to `LOOP_PORT`, one write to `DONE_PORT`
(where they stop them), then `hlt` for good. The plugins and the C reference take the ports on
their command lines, so this module is the only place they are chosen.
"""

from __future__ import annotations

from pathlib import Path
from typing import Final

from vmsuper.shared.asm import assemble

LOAD_ADDRESS: Final = 0x1000
START_PORT: Final = 0x600
LOOP_PORT: Final = 0x601
DONE_PORT: Final = 0x602
MAX_EXITS: Final = 0xFFFF_FFFF


def source(exits: int) -> str:
    """GNU as source of the loop; `loop` counts in ECX (addr32) so `exits` may exceed 65535."""
    if not 1 <= exits <= MAX_EXITS:
        raise ValueError(f"the guest loop needs 1 to {MAX_EXITS} exits, got {exits}")
    return f"""
    mov ${START_PORT:#x}, %dx
    out %al, %dx
    mov ${LOOP_PORT:#x}, %dx
    mov ${exits}, %ecx
1:  out %al, %dx
    addr32 loop 1b
    mov ${DONE_PORT:#x}, %dx
    out %al, %dx
2:  hlt
    jmp 2b
"""


def port_args() -> list[str]:
    """START LOOP DONE, as the plugins and the reference take them."""
    return [hex(START_PORT), hex(LOOP_PORT), hex(DONE_PORT)]


def write_guest(exits: int, folder: Path) -> Path:
    """Assemble the loop for `exits` and write the flat binary into `folder`."""
    path = folder / f"guest-{exits}.bin"
    if not path.exists():
        path.write_bytes(assemble(source(exits), bits=16, origin=LOAD_ADDRESS))
    return path
