"""The sandboxed plugin's seccomp filter: an allowlist compiled to classic BPF by hand.

bwrap installs the program (``--seccomp FD``) right before it executes the plugin, so the
plugin, and everything it starts, runs under it. It is an allowlist in the spirit of Docker's
default profile: the system calls that ordinary programs in any language make (`ALLOWED`) pass;
a few of them only with arguments the filter can read (`socket` and `socketpair` for the
families in `SOCKET_FAMILIES`, `clone` and `unshare` without namespace flags, `ioctl` without
terminal input injection). What vmsuper refuses on purpose (`DENIED`: new namespaces, BPF, perf,
io_uring, userfaultfd, keyrings, ptrace, modules, mounts, time, reboot...) fails with EPERM;
any other system call, unknown or newer than this list, fails with ENOSYS, as on an older
kernel, so that C libraries and runtimes take their fallbacks (clone3 -> clone, for one). A
socket of a family not in the list fails with EAFNOSUPPORT, as for a family the kernel lacks:
AF_VSOCK, AF_PACKET, AF_BLUETOOTH, AF_ALG and the rest are not isolated, or not needed, by the
sandbox's network namespace.

Only x86-64 system calls pass: the x32 ABI and 32-bit entry points get ENOSYS wholesale. The
program is built by `shared/bpf.py` (which says why not libseccomp); the tests run it in a BPF
interpreter for every system call number.
"""

from __future__ import annotations

import errno

from vmsuper.shared.bpf import (
    BPF_JEQ_K,
    BPF_JSET_K,
    SECCOMP_RET_ALLOW,
    SECCOMP_RET_ERRNO,
    Insn,
    Program,
    load,
    offset_arg_low,
    ret,
)
from vmsuper.shared.bpf import build_filter as build_program

# x86-64 system call numbers (asm/unistd_64.h; checked against the header by the tests).
# Allowed without looking at the arguments: Docker's default list for x86-64, less what DENIED
# names and the calls with their own rules below.
ALLOWED: dict[str, int] = {
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
    "setsockopt": 54,
    "getsockopt": 55,
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
    "getuid": 102,
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
    "statfs": 137,
    "fstatfs": 138,
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
    "prctl": 157,
    "arch_prctl": 158,
    "adjtimex": 159,
    "setrlimit": 160,
    "sync": 162,
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
    "clock_gettime": 228,
    "clock_getres": 229,
    "clock_nanosleep": 230,
    "exit_group": 231,
    "epoll_wait": 232,
    "epoll_ctl": 233,
    "tgkill": 234,
    "utimes": 235,
    "mq_open": 240,
    "mq_unlink": 241,
    "mq_timedsend": 242,
    "mq_timedreceive": 243,
    "mq_notify": 244,
    "mq_getsetattr": 245,
    "waitid": 247,
    "ioprio_set": 251,
    "ioprio_get": 252,
    "inotify_init": 253,
    "inotify_add_watch": 254,
    "inotify_rm_watch": 255,
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
    "set_robust_list": 273,
    "get_robust_list": 274,
    "splice": 275,
    "tee": 276,
    "sync_file_range": 277,
    "vmsplice": 278,
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
    "recvmmsg": 299,
    "fanotify_mark": 301,
    "prlimit64": 302,
    "syncfs": 306,
    "sendmmsg": 307,
    "getcpu": 309,
    "sched_setattr": 314,
    "sched_getattr": 315,
    "renameat2": 316,
    "seccomp": 317,
    "getrandom": 318,
    "memfd_create": 319,
    "execveat": 322,
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
    "pidfd_open": 434,
    "close_range": 436,
    "openat2": 437,
    "faccessat2": 439,
    "epoll_pwait2": 441,
    "landlock_create_ruleset": 444,
    "landlock_add_rule": 445,
    "landlock_restrict_self": 446,
    "memfd_secret": 447,
    "process_mrelease": 448,
    "futex_waitv": 449,
}
# Refused with EPERM, whatever the arguments.
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
# Allowed, with rules on their arguments.
NR_IOCTL = 16
NR_SOCKET = 41
NR_SOCKETPAIR = 53
NR_CLONE = 56
NR_UNSHARE = 272
# Not allowed (ENOSYS): clone3 passes its flags in memory, out of the filter's reach, and the C
# library then falls back to clone(), whose flags the filter can read.
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

# Socket families a plugin may create (linux/socket.h): local sockets, IP on the sandbox's own
# loopback, and route netlink, which the C library's getaddrinfo (AI_ADDRCONFIG) and
# if_nameindex read. Any other family -> EAFNOSUPPORT; netlink of another protocol ->
# EPROTONOSUPPORT.
AF_UNIX = 1
AF_INET = 2
AF_INET6 = 10
AF_NETLINK = 16
NETLINK_ROUTE = 0
SOCKET_FAMILIES = (AF_UNIX, AF_INET, AF_INET6)
SOCKET_ERRNO = errno.EAFNOSUPPORT
NETLINK_ERRNO = errno.EPROTONOSUPPORT

RET_ALLOW = SECCOMP_RET_ALLOW
RET_EPERM = SECCOMP_RET_ERRNO | errno.EPERM
RET_ENOSYS = SECCOMP_RET_ERRNO | errno.ENOSYS


# -- the rules of the calls that look at their arguments -------------------------------------


def _flags_rule(refused: int) -> Program:
    return [
        load(offset_arg_low(0)),
        Insn(BPF_JSET_K, refused, jt="eperm"),
        ret(RET_ALLOW),
        "eperm",
        ret(RET_EPERM),
    ]


def _ioctl_rule() -> Program:
    # The kernel reads the request number as 32 bits, so the low half is the whole of it.
    return [
        load(offset_arg_low(1)),
        Insn(BPF_JEQ_K, TIOCSTI, jt="eperm"),
        Insn(BPF_JEQ_K, TIOCLINUX, jt="eperm"),
        ret(RET_ALLOW),
        "eperm",
        ret(RET_EPERM),
    ]


def _socket_rule() -> Program:
    # The family and the protocol are ints: the kernel ignores the high halves.
    return [
        load(offset_arg_low(0)),
        *(Insn(BPF_JEQ_K, family, jt="allow") for family in SOCKET_FAMILIES),
        Insn(BPF_JEQ_K, AF_NETLINK, jt="netlink"),
        ret(SECCOMP_RET_ERRNO | SOCKET_ERRNO),
        "netlink",
        load(offset_arg_low(2)),
        Insn(BPF_JEQ_K, NETLINK_ROUTE, jt="allow"),
        ret(SECCOMP_RET_ERRNO | NETLINK_ERRNO),
        "allow",
        ret(RET_ALLOW),
    ]


def _rules() -> dict[int, Program]:
    """The verdict of each listed number: a program that ends in a return."""
    # One object each: runs compare verdicts by identity.
    allow: Program = [ret(RET_ALLOW)]
    eperm: Program = [ret(RET_EPERM)]
    verdicts: dict[int, Program] = dict.fromkeys(ALLOWED.values(), allow)
    verdicts.update(dict.fromkeys(DENIED.values(), eperm))
    verdicts[NR_CLONE] = _flags_rule(CLONE_NAMESPACE_FLAGS)
    verdicts[NR_UNSHARE] = _flags_rule(CLONE_NAMESPACE_FLAGS | CLONE_NEWTIME)
    verdicts[NR_IOCTL] = _ioctl_rule()
    verdicts[NR_SOCKET] = verdicts[NR_SOCKETPAIR] = _socket_rule()
    return verdicts


def build_filter() -> bytes:
    """The filter program, ready for ``bwrap --seccomp FD``; unlisted numbers get ENOSYS."""
    return build_program(_rules(), [ret(RET_ENOSYS)], foreign=RET_ENOSYS)
