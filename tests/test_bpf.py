"""shared/bpf.py: the system call table against the kernel headers, and the assembler."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from bpf_vm import run_filter, well_formed

from vmsuper.shared import bpf

UNISTD = Path("/usr/include/x86_64-linux-gnu/asm/unistd_64.h")


def test_the_syscall_table_is_the_kernel_headers() -> None:
    header = {
        m[1]: int(m[2]) for m in re.finditer(r"#define __NR_(\w+)\s+(\d+)", UNISTD.read_text())
    }
    assert len(header) > 300, "no x86-64 system call numbers in the header"
    # Every call the header has, with its number; beyond it only newer calls, above its last.
    assert {name: bpf.SYSCALLS[name] for name in header if name in bpf.SYSCALLS} == header
    assert set(header) <= set(bpf.SYSCALLS)
    newer = set(bpf.SYSCALLS) - set(header)
    assert all(bpf.SYSCALLS[name] > max(header.values()) for name in newer)


def test_syscall_names() -> None:
    assert bpf.syscall_name(0) == "read"
    assert bpf.syscall_name(257) == "openat"
    assert bpf.syscall_name(100_000) == "syscall 100000"


def test_build_filter_dispatches_by_number_and_architecture() -> None:
    allow: bpf.Program = [bpf.ret(bpf.SECCOMP_RET_ALLOW)]
    errno_: bpf.Program = [bpf.ret(bpf.SECCOMP_RET_ERRNO | 1)]
    program = bpf.build_filter(
        {1: allow, 2: allow, 7: errno_}, [bpf.ret(bpf.SECCOMP_RET_TRAP)], foreign=0
    )
    well_formed(program)
    verdicts = [run_filter(program, nr) for nr in range(10)]
    trap, ok, err = bpf.SECCOMP_RET_TRAP, bpf.SECCOMP_RET_ALLOW, bpf.SECCOMP_RET_ERRNO | 1
    assert verdicts == [trap, ok, ok, trap, trap, trap, trap, err, trap, trap]
    assert run_filter(program, 1, arch=0x40000003) == 0
    assert run_filter(program, bpf.X32_SYSCALL_BIT | 1) == 0


def test_a_jump_too_far_is_refused() -> None:
    far: bpf.Program = [bpf.Insn(bpf.BPF_JEQ_K, 0, jt="end"), *[bpf.ret(0)] * 300]
    far += ["end", bpf.ret(0)]
    with pytest.raises(ValueError, match="out of range"):
        bpf.assemble(far)
