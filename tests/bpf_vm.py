"""A classic BPF interpreter for seccomp programs, run as the kernel runs them."""

from __future__ import annotations

import struct

from vmsuper.shared import bpf


def run_filter(
    program: bytes, nr: int, args: tuple[int, ...] = (), arch: int = bpf.AUDIT_ARCH_X86_64
) -> int:
    """The verdict of `program` for one system call."""
    data = struct.pack("<iIQ6Q", nr, arch, 0, *(list(args) + [0] * 6)[:6])
    insns = [struct.unpack_from("<HBBI", program, 8 * i) for i in range(len(program) // 8)]
    accumulator, pc = 0, 0
    for _ in range(len(insns)):  # jumps only go forward
        code, jt, jf, k = insns[pc]
        pc += 1
        if code == bpf.BPF_RET_K:
            return k
        if code == bpf.BPF_LD_W_ABS:
            (accumulator,) = struct.unpack_from("<I", data, k)
            continue
        taken = {
            bpf.BPF_JEQ_K: accumulator == k,
            bpf.BPF_JGE_K: accumulator >= k,
            bpf.BPF_JSET_K: bool(accumulator & k),
        }[code]
        pc += jt if taken else jf
    raise AssertionError("ran off the end of the program")


def well_formed(program: bytes) -> list[tuple[int, int, int, int]]:
    """The instructions, after checking every jump lands inside and the last one returns."""
    assert len(program) % 8 == 0
    count = len(program) // 8
    insns = [struct.unpack_from("<HBBI", program, 8 * i) for i in range(count)]
    for i, (code, jt, jf, _k) in enumerate(insns):
        if code & 0x07 == 0x05:  # BPF_JMP: both targets inside the program
            assert i + 1 + max(jt, jf) < count
    assert insns[-1][0] == bpf.BPF_RET_K
    assert insns[0] == (bpf.BPF_LD_W_ABS, 0, 0, bpf.OFFSET_ARCH)
    assert count <= bpf.BPF_MAXINSNS
    return insns
