"""The sandboxed plugin's seccomp filter: a deny-list compiled to classic BPF by hand.

bwrap installs the program (``--seccomp FD``) right before it executes the plugin, so the
plugin, and everything it starts, runs under it. It is a deny-list, as Docker's and Flatpak's
are, because a plugin may be any program in any language: it blocks what a VMM client never
needs and what gives the kernel's rarer, riskier surfaces to untrusted code (new namespaces,
BPF, perf, io_uring, userfaultfd, keyrings, ptrace, modules, mounts, time, reboot, and
typing into a terminal with TIOCSTI). Everything else is allowed.

Only x86-64 system calls pass: the x32 ABI and 32-bit entry points are refused wholesale, since
their numbers differ and a filter on x86-64 numbers would not hold for them.
"""

from __future__ import annotations

import errno
import struct
from typing import NamedTuple

AUDIT_ARCH_X86_64 = 0xC000003E
X32_SYSCALL_BIT = 0x40000000

SECCOMP_RET_ALLOW = 0x7FFF0000
SECCOMP_RET_ERRNO = 0x00050000

# struct seccomp_data: int nr; u32 arch; u64 instruction_pointer; u64 args[6] (little endian).
OFFSET_NR = 0
OFFSET_ARCH = 4


def offset_arg_low(index: int) -> int:
    """Offset of the low 32 bits of system call argument `index`."""
    return 16 + 8 * index


# Classic BPF opcodes (linux/filter.h).
BPF_LD_W_ABS = 0x20
BPF_JEQ_K = 0x15
BPF_JGE_K = 0x35
BPF_JSET_K = 0x45
BPF_RET_K = 0x06

# x86-64 system call numbers (asm/unistd_64.h; checked against the header by the tests).
DENIED: dict[str, int] = {
    "ptrace": 101,
    "syslog": 103,
    "uselib": 134,
    "vhangup": 153,
    "modify_ldt": 154,
    "pivot_root": 155,
    "chroot": 161,
    "acct": 163,
    "settimeofday": 164,
    "mount": 165,
    "umount2": 166,
    "swapon": 167,
    "swapoff": 168,
    "reboot": 169,
    "iopl": 172,
    "ioperm": 173,
    "init_module": 175,
    "delete_module": 176,
    "quotactl": 179,
    "nfsservctl": 180,
    "lookup_dcookie": 212,
    "clock_settime": 227,
    "kexec_load": 246,
    "add_key": 248,
    "request_key": 249,
    "keyctl": 250,
    "perf_event_open": 298,
    "fanotify_init": 300,
    "name_to_handle_at": 303,
    "open_by_handle_at": 304,
    "clock_adjtime": 305,
    "setns": 308,
    "process_vm_readv": 310,
    "process_vm_writev": 311,
    "kcmp": 312,
    "finit_module": 313,
    "kexec_file_load": 320,
    "bpf": 321,
    "userfaultfd": 323,
    "io_uring_setup": 425,
    "io_uring_enter": 426,
    "io_uring_register": 427,
    "open_tree": 428,
    "move_mount": 429,
    "fsopen": 430,
    "fsconfig": 431,
    "fsmount": 432,
    "fspick": 433,
    "pidfd_getfd": 438,
    "mount_setattr": 442,
    "quotactl_fd": 443,
}
NR_IOCTL = 16
NR_CLONE = 56
NR_UNSHARE = 272
NR_CLONE3 = 435

# clone()/unshare() flags that make a new namespace. CLONE_NEWTIME (0x80) is only a namespace
# flag for unshare(): in clone()'s flags those bits are the exit signal.
CLONE_NAMESPACE_FLAGS = (
    0x00020000  # CLONE_NEWNS
    | 0x02000000  # CLONE_NEWCGROUP
    | 0x04000000  # CLONE_NEWUTS
    | 0x08000000  # CLONE_NEWIPC
    | 0x10000000  # CLONE_NEWUSER
    | 0x20000000  # CLONE_NEWPID
    | 0x40000000  # CLONE_NEWNET
)
CLONE_NEWTIME = 0x00000080
# Terminal ioctls that inject input or reach the console (asm-generic/ioctls.h).
TIOCSTI = 0x5412
TIOCLINUX = 0x541C


class _Insn(NamedTuple):  # not a dataclass: cheaper to create at every start
    code: int
    k: int
    jt: str | None = None  # label to jump to when true (conditional jumps only)
    jf: str | None = None  # label when false; None = the next instruction


def _ret(value: int) -> _Insn:
    return _Insn(BPF_RET_K, value)


def _load(offset: int) -> _Insn:
    return _Insn(BPF_LD_W_ABS, offset)


def _assemble(program: list[_Insn | str]) -> bytes:
    """Resolve labels (plain strings in the list) and pack `struct sock_filter` entries."""
    labels: dict[str, int] = {}
    insns: list[_Insn] = []
    for item in program:
        if isinstance(item, str):
            labels[item] = len(insns)
        else:
            insns.append(item)

    def jump(at: int, label: str | None) -> int:
        if label is None:
            return 0
        offset = labels[label] - at - 1
        if not 0 <= offset <= 255:
            raise ValueError(f"jump to {label} out of range ({offset})")
        return offset

    return b"".join(
        struct.pack("<HBBI", insn.code, jump(i, insn.jt), jump(i, insn.jf), insn.k)
        for i, insn in enumerate(insns)
    )


def build_filter() -> bytes:
    """The filter program, ready for ``bwrap --seccomp FD``."""
    eperm = SECCOMP_RET_ERRNO | errno.EPERM
    enosys = SECCOMP_RET_ERRNO | errno.ENOSYS
    program: list[_Insn | str] = [
        _load(OFFSET_ARCH),
        _Insn(BPF_JEQ_K, AUDIT_ARCH_X86_64, jf="enosys"),
        _load(OFFSET_NR),
        _Insn(BPF_JGE_K, X32_SYSCALL_BIT, jt="enosys"),
        *(_Insn(BPF_JEQ_K, nr, jt="eperm") for nr in sorted(DENIED.values())),
        # clone3 passes its flags in memory, out of the filter's reach: ENOSYS makes the C
        # library fall back to clone(), whose flags the filter can read.
        _Insn(BPF_JEQ_K, NR_CLONE3, jt="enosys"),
        _Insn(BPF_JEQ_K, NR_CLONE, jt="clone"),
        _Insn(BPF_JEQ_K, NR_UNSHARE, jt="unshare"),
        _Insn(BPF_JEQ_K, NR_IOCTL, jt="ioctl"),
        _ret(SECCOMP_RET_ALLOW),
        "clone",
        _load(offset_arg_low(0)),
        _Insn(BPF_JSET_K, CLONE_NAMESPACE_FLAGS, jt="eperm"),
        _ret(SECCOMP_RET_ALLOW),
        "unshare",
        _load(offset_arg_low(0)),
        _Insn(BPF_JSET_K, CLONE_NAMESPACE_FLAGS | CLONE_NEWTIME, jt="eperm"),
        _ret(SECCOMP_RET_ALLOW),
        "ioctl",
        # The kernel reads the request number as 32 bits, so the low half is the whole of it.
        _load(offset_arg_low(1)),
        _Insn(BPF_JEQ_K, TIOCSTI, jt="eperm"),
        _Insn(BPF_JEQ_K, TIOCLINUX, jt="eperm"),
        _ret(SECCOMP_RET_ALLOW),
        "eperm",
        _ret(eperm),
        "enosys",
        _ret(enosys),
    ]
    return _assemble(program)
