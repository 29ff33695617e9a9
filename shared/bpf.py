"""Seccomp filters in classic BPF: an assembler, a dispatch on the system call number, and the
x86-64 system call table.

Both of vmsuper's filters are built here: the sandboxed plugin's (`supervisor/seccomp.py`) and
the VCPU workers' (`workers/confine.py`). A filter is a map from system call number to a
verdict (a short program ending in a return), plus one verdict for every other number; the
dispatch is a binary search over runs of numbers with the same verdict, so a call costs about
ten comparisons, not one per listed name. Only x86-64 system calls reach the search: another
architecture's entry points (32-bit `int 0x80`) and the x32 ABI get the `foreign` verdict,
since their numbers differ and a filter on x86-64 numbers would not hold for them.

Why not libseccomp: its Python bindings (pyseccomp, through ctypes) take about 120 ms to import
and 20 ms to build a filter, against well under a millisecond here, and vmsuper builds one at
every start and in every VCPU worker. The programs are small enough to check completely: the
tests run them in a BPF interpreter for every system call number, and compare `SYSCALLS` with
the kernel headers.
"""

from __future__ import annotations

import ctypes
import itertools
import struct
from collections.abc import Iterator, Mapping
from typing import Final, NamedTuple

AUDIT_ARCH_X86_64: Final = 0xC000003E
X32_SYSCALL_BIT: Final = 0x40000000

# Return values (linux/seccomp.h); the low 16 bits of RET_ERRNO carry the errno.
SECCOMP_RET_KILL_PROCESS: Final = 0x80000000
SECCOMP_RET_TRAP: Final = 0x00030000
SECCOMP_RET_ERRNO: Final = 0x00050000
SECCOMP_RET_ALLOW: Final = 0x7FFF0000

# struct seccomp_data: int nr; u32 arch; u64 instruction_pointer; u64 args[6] (little endian).
OFFSET_NR: Final = 0
OFFSET_ARCH: Final = 4


def offset_arg_low(index: int) -> int:
    """Offset of the low 32 bits of system call argument `index`."""
    return 16 + 8 * index


def offset_arg_high(index: int) -> int:
    """Offset of the high 32 bits of system call argument `index`."""
    return offset_arg_low(index) + 4


# Classic BPF opcodes (linux/filter.h).
BPF_LD_W_ABS: Final = 0x20
BPF_JEQ_K: Final = 0x15
BPF_JGE_K: Final = 0x35
BPF_JSET_K: Final = 0x45
BPF_RET_K: Final = 0x06
BPF_MAXINSNS: Final = 4096


class Insn(NamedTuple):  # not a dataclass: cheaper to create at every start
    code: int
    k: int
    jt: str | None = None  # label to jump to when true (conditional jumps only)
    jf: str | None = None  # label when false; None = the next instruction


Program = list["Insn | str"]
"""Instructions and labels (plain strings: the position of the next instruction)."""


def ret(value: int) -> Insn:
    return Insn(BPF_RET_K, value)


def load(offset: int) -> Insn:
    return Insn(BPF_LD_W_ABS, offset)


def assemble(program: Program) -> bytes:
    """Resolve labels and pack `struct sock_filter` entries."""
    labels: dict[str, int] = {}
    insns: list[Insn] = []
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

    fields: list[int] = []
    for i, insn in enumerate(insns):
        fields += (insn.code, jump(i, insn.jt), jump(i, insn.jf), insn.k)
    return struct.pack("<" + "HBBI" * len(insns), *fields)


def _runs(verdicts: Mapping[int, Program], default: Program) -> list[tuple[int, Program]]:
    """(first number, verdict) for each run of numbers with the same verdict (compared by
    identity), from 0 on; the last run goes on to every higher number."""
    runs: list[tuple[int, Program]] = []
    for nr in range(max(verdicts) + 2):
        verdict = verdicts.get(nr, default)
        if not runs or runs[-1][1] is not verdict:
            runs.append((nr, verdict))
    return runs


def _search(runs: list[tuple[int, Program]], labels: Iterator[int]) -> Program:
    """A binary search on the number (already loaded) that ends in each run's verdict."""
    if len(runs) == 1:
        verdict = runs[0][1]
        if len(verdict) == 1:
            return verdict
        tag = next(labels)  # the verdict's own labels, made unique: it may appear twice
        return [
            f"{item}.{tag}" if isinstance(item, str) else _relabel(item, tag) for item in verdict
        ]
    middle = len(runs) // 2
    high = f"high.{next(labels)}"
    return [
        Insn(BPF_JGE_K, runs[middle][0], jt=high),
        *_search(runs[:middle], labels),
        high,
        *_search(runs[middle:], labels),
    ]


def _relabel(insn: Insn, tag: int) -> Insn:
    if insn.jt is None and insn.jf is None:
        return insn
    return Insn(
        insn.code,
        insn.k,
        None if insn.jt is None else f"{insn.jt}.{tag}",
        None if insn.jf is None else f"{insn.jf}.{tag}",
    )


def build_filter(verdicts: Mapping[int, Program], default: Program, *, foreign: int) -> bytes:
    """A filter program: `verdicts` by x86-64 system call number, `default` for every other
    number, the return value `foreign` for another architecture or the x32 ABI.

    A verdict used for several numbers should be one object (runs are found by identity)."""
    program: Program = [
        load(OFFSET_ARCH),
        Insn(BPF_JEQ_K, AUDIT_ARCH_X86_64, jt="x86-64"),
        ret(foreign),
        "x86-64",
        load(OFFSET_NR),
        Insn(BPF_JGE_K, X32_SYSCALL_BIT, jf="search"),
        ret(foreign),
        "search",
        *_search(_runs(verdicts, default), itertools.count()),
    ]
    code = assemble(program)
    if len(code) // 8 > BPF_MAXINSNS:
        raise ValueError(f"filter of {len(code) // 8} instructions, over {BPF_MAXINSNS}")
    return code


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def fprog(code: bytes) -> tuple[_SockFprog, ctypes.Array[ctypes.c_char]]:
    """`struct sock_fprog` for `code`, with the buffer it points to (keep both alive)."""
    buffer = ctypes.create_string_buffer(code, len(code))
    return _SockFprog(len(code) // 8, ctypes.addressof(buffer)), buffer


def syscall_name(nr: int) -> str:
    """The x86-64 name of system call `nr` ("syscall N" for a number this table lacks)."""
    return SYSCALL_NAMES.get(nr, f"syscall {nr}")


SYSCALLS: Final[dict[str, int]] = {
    # Every x86-64 system call (asm/unistd_64.h; the tests compare both ways with the header).
    "read": 0,
    "write": 1,
    "open": 2,
    "close": 3,
    "stat": 4,
    "fstat": 5,
    "lstat": 6,
    "poll": 7,
    "lseek": 8,
    "mmap": 9,
    "mprotect": 10,
    "munmap": 11,
    "brk": 12,
    "rt_sigaction": 13,
    "rt_sigprocmask": 14,
    "rt_sigreturn": 15,
    "ioctl": 16,
    "pread64": 17,
    "pwrite64": 18,
    "readv": 19,
    "writev": 20,
    "access": 21,
    "pipe": 22,
    "select": 23,
    "sched_yield": 24,
    "mremap": 25,
    "msync": 26,
    "mincore": 27,
    "madvise": 28,
    "shmget": 29,
    "shmat": 30,
    "shmctl": 31,
    "dup": 32,
    "dup2": 33,
    "pause": 34,
    "nanosleep": 35,
    "getitimer": 36,
    "alarm": 37,
    "setitimer": 38,
    "getpid": 39,
    "sendfile": 40,
    "socket": 41,
    "connect": 42,
    "accept": 43,
    "sendto": 44,
    "recvfrom": 45,
    "sendmsg": 46,
    "recvmsg": 47,
    "shutdown": 48,
    "bind": 49,
    "listen": 50,
    "getsockname": 51,
    "getpeername": 52,
    "socketpair": 53,
    "setsockopt": 54,
    "getsockopt": 55,
    "clone": 56,
    "fork": 57,
    "vfork": 58,
    "execve": 59,
    "exit": 60,
    "wait4": 61,
    "kill": 62,
    "uname": 63,
    "semget": 64,
    "semop": 65,
    "semctl": 66,
    "shmdt": 67,
    "msgget": 68,
    "msgsnd": 69,
    "msgrcv": 70,
    "msgctl": 71,
    "fcntl": 72,
    "flock": 73,
    "fsync": 74,
    "fdatasync": 75,
    "truncate": 76,
    "ftruncate": 77,
    "getdents": 78,
    "getcwd": 79,
    "chdir": 80,
    "fchdir": 81,
    "rename": 82,
    "mkdir": 83,
    "rmdir": 84,
    "creat": 85,
    "link": 86,
    "unlink": 87,
    "symlink": 88,
    "readlink": 89,
    "chmod": 90,
    "fchmod": 91,
    "chown": 92,
    "fchown": 93,
    "lchown": 94,
    "umask": 95,
    "gettimeofday": 96,
    "getrlimit": 97,
    "getrusage": 98,
    "sysinfo": 99,
    "times": 100,
    "ptrace": 101,
    "getuid": 102,
    "syslog": 103,
    "getgid": 104,
    "setuid": 105,
    "setgid": 106,
    "geteuid": 107,
    "getegid": 108,
    "setpgid": 109,
    "getppid": 110,
    "getpgrp": 111,
    "setsid": 112,
    "setreuid": 113,
    "setregid": 114,
    "getgroups": 115,
    "setgroups": 116,
    "setresuid": 117,
    "getresuid": 118,
    "setresgid": 119,
    "getresgid": 120,
    "getpgid": 121,
    "setfsuid": 122,
    "setfsgid": 123,
    "getsid": 124,
    "capget": 125,
    "capset": 126,
    "rt_sigpending": 127,
    "rt_sigtimedwait": 128,
    "rt_sigqueueinfo": 129,
    "rt_sigsuspend": 130,
    "sigaltstack": 131,
    "utime": 132,
    "mknod": 133,
    "uselib": 134,
    "personality": 135,
    "ustat": 136,
    "statfs": 137,
    "fstatfs": 138,
    "sysfs": 139,
    "getpriority": 140,
    "setpriority": 141,
    "sched_setparam": 142,
    "sched_getparam": 143,
    "sched_setscheduler": 144,
    "sched_getscheduler": 145,
    "sched_get_priority_max": 146,
    "sched_get_priority_min": 147,
    "sched_rr_get_interval": 148,
    "mlock": 149,
    "munlock": 150,
    "mlockall": 151,
    "munlockall": 152,
    "vhangup": 153,
    "modify_ldt": 154,
    "pivot_root": 155,
    "_sysctl": 156,
    "prctl": 157,
    "arch_prctl": 158,
    "adjtimex": 159,
    "setrlimit": 160,
    "chroot": 161,
    "sync": 162,
    "acct": 163,
    "settimeofday": 164,
    "mount": 165,
    "umount2": 166,
    "swapon": 167,
    "swapoff": 168,
    "reboot": 169,
    "sethostname": 170,
    "setdomainname": 171,
    "iopl": 172,
    "ioperm": 173,
    "create_module": 174,
    "init_module": 175,
    "delete_module": 176,
    "get_kernel_syms": 177,
    "query_module": 178,
    "quotactl": 179,
    "nfsservctl": 180,
    "getpmsg": 181,
    "putpmsg": 182,
    "afs_syscall": 183,
    "tuxcall": 184,
    "security": 185,
    "gettid": 186,
    "readahead": 187,
    "setxattr": 188,
    "lsetxattr": 189,
    "fsetxattr": 190,
    "getxattr": 191,
    "lgetxattr": 192,
    "fgetxattr": 193,
    "listxattr": 194,
    "llistxattr": 195,
    "flistxattr": 196,
    "removexattr": 197,
    "lremovexattr": 198,
    "fremovexattr": 199,
    "tkill": 200,
    "time": 201,
    "futex": 202,
    "sched_setaffinity": 203,
    "sched_getaffinity": 204,
    "set_thread_area": 205,
    "io_setup": 206,
    "io_destroy": 207,
    "io_getevents": 208,
    "io_submit": 209,
    "io_cancel": 210,
    "get_thread_area": 211,
    "lookup_dcookie": 212,
    "epoll_create": 213,
    "epoll_ctl_old": 214,
    "epoll_wait_old": 215,
    "remap_file_pages": 216,
    "getdents64": 217,
    "set_tid_address": 218,
    "restart_syscall": 219,
    "semtimedop": 220,
    "fadvise64": 221,
    "timer_create": 222,
    "timer_settime": 223,
    "timer_gettime": 224,
    "timer_getoverrun": 225,
    "timer_delete": 226,
    "clock_settime": 227,
    "clock_gettime": 228,
    "clock_getres": 229,
    "clock_nanosleep": 230,
    "exit_group": 231,
    "epoll_wait": 232,
    "epoll_ctl": 233,
    "tgkill": 234,
    "utimes": 235,
    "vserver": 236,
    "mbind": 237,
    "set_mempolicy": 238,
    "get_mempolicy": 239,
    "mq_open": 240,
    "mq_unlink": 241,
    "mq_timedsend": 242,
    "mq_timedreceive": 243,
    "mq_notify": 244,
    "mq_getsetattr": 245,
    "kexec_load": 246,
    "waitid": 247,
    "add_key": 248,
    "request_key": 249,
    "keyctl": 250,
    "ioprio_set": 251,
    "ioprio_get": 252,
    "inotify_init": 253,
    "inotify_add_watch": 254,
    "inotify_rm_watch": 255,
    "migrate_pages": 256,
    "openat": 257,
    "mkdirat": 258,
    "mknodat": 259,
    "fchownat": 260,
    "futimesat": 261,
    "newfstatat": 262,
    "unlinkat": 263,
    "renameat": 264,
    "linkat": 265,
    "symlinkat": 266,
    "readlinkat": 267,
    "fchmodat": 268,
    "faccessat": 269,
    "pselect6": 270,
    "ppoll": 271,
    "unshare": 272,
    "set_robust_list": 273,
    "get_robust_list": 274,
    "splice": 275,
    "tee": 276,
    "sync_file_range": 277,
    "vmsplice": 278,
    "move_pages": 279,
    "utimensat": 280,
    "epoll_pwait": 281,
    "signalfd": 282,
    "timerfd_create": 283,
    "eventfd": 284,
    "fallocate": 285,
    "timerfd_settime": 286,
    "timerfd_gettime": 287,
    "accept4": 288,
    "signalfd4": 289,
    "eventfd2": 290,
    "epoll_create1": 291,
    "dup3": 292,
    "pipe2": 293,
    "inotify_init1": 294,
    "preadv": 295,
    "pwritev": 296,
    "rt_tgsigqueueinfo": 297,
    "perf_event_open": 298,
    "recvmmsg": 299,
    "fanotify_init": 300,
    "fanotify_mark": 301,
    "prlimit64": 302,
    "name_to_handle_at": 303,
    "open_by_handle_at": 304,
    "clock_adjtime": 305,
    "syncfs": 306,
    "sendmmsg": 307,
    "setns": 308,
    "getcpu": 309,
    "process_vm_readv": 310,
    "process_vm_writev": 311,
    "kcmp": 312,
    "finit_module": 313,
    "sched_setattr": 314,
    "sched_getattr": 315,
    "renameat2": 316,
    "seccomp": 317,
    "getrandom": 318,
    "memfd_create": 319,
    "kexec_file_load": 320,
    "bpf": 321,
    "execveat": 322,
    "userfaultfd": 323,
    "membarrier": 324,
    "mlock2": 325,
    "copy_file_range": 326,
    "preadv2": 327,
    "pwritev2": 328,
    "pkey_mprotect": 329,
    "pkey_alloc": 330,
    "pkey_free": 331,
    "statx": 332,
    "io_pgetevents": 333,
    "rseq": 334,
    "pidfd_send_signal": 424,
    "io_uring_setup": 425,
    "io_uring_enter": 426,
    "io_uring_register": 427,
    "open_tree": 428,
    "move_mount": 429,
    "fsopen": 430,
    "fsconfig": 431,
    "fsmount": 432,
    "fspick": 433,
    "pidfd_open": 434,
    "clone3": 435,
    "close_range": 436,
    "openat2": 437,
    "pidfd_getfd": 438,
    "faccessat2": 439,
    "process_madvise": 440,
    "epoll_pwait2": 441,
    "mount_setattr": 442,
    "quotactl_fd": 443,
    "landlock_create_ruleset": 444,
    "landlock_add_rule": 445,
    "landlock_restrict_self": 446,
    "memfd_secret": 447,
    "process_mrelease": 448,
    "futex_waitv": 449,
    "set_mempolicy_home_node": 450,
    # Newer than Debian 12's headers (6.1); tests check them against any header that has them.
    "cachestat": 451,
    "fchmodat2": 452,
    "map_shadow_stack": 453,
    "futex_wake": 454,
    "futex_wait": 455,
    "futex_requeue": 456,
    "statmount": 457,
    "listmount": 458,
    "lsm_get_self_attr": 459,
    "lsm_set_self_attr": 460,
    "lsm_list_modules": 461,
    "mseal": 462,
    "setxattrat": 463,
    "getxattrat": 464,
    "listxattrat": 465,
    "removexattrat": 466,
    "open_tree_attr": 467,
    "file_getattr": 468,
    "file_setattr": 469,
}
SYSCALL_NAMES: Final[dict[int, str]] = {nr: name for name, nr in SYSCALLS.items()}
assert len(SYSCALL_NAMES) == len(SYSCALLS)
