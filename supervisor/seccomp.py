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
    SYSCALLS,
    Insn,
    Program,
    load,
    offset_arg_low,
    ret,
)
from vmsuper.shared.bpf import build_filter as build_program

# System calls by name; their x86-64 numbers come from `bpf.SYSCALLS` (checked against the
# kernel headers by the tests). Allowed without looking at the arguments: Docker's default
# list for x86-64, less what DENIED names and the calls with their own rules below.
ALLOWED: dict[str, int] = {
    name: SYSCALLS[name]
    for name in (
        "read",
        "write",
        "open",
        "close",
        "stat",
        "fstat",
        "lstat",
        "poll",
        "lseek",
        "mmap",
        "mprotect",
        "munmap",
        "brk",
        "rt_sigaction",
        "rt_sigprocmask",
        "rt_sigreturn",
        "pread64",
        "pwrite64",
        "readv",
        "writev",
        "access",
        "pipe",
        "select",
        "sched_yield",
        "mremap",
        "msync",
        "mincore",
        "madvise",
        "shmget",
        "shmat",
        "shmctl",
        "dup",
        "dup2",
        "pause",
        "nanosleep",
        "getitimer",
        "alarm",
        "setitimer",
        "getpid",
        "sendfile",
        "connect",
        "accept",
        "sendto",
        "recvfrom",
        "sendmsg",
        "recvmsg",
        "shutdown",
        "bind",
        "listen",
        "getsockname",
        "getpeername",
        "setsockopt",
        "getsockopt",
        "fork",
        "vfork",
        "execve",
        "exit",
        "wait4",
        "kill",
        "uname",
        "semget",
        "semop",
        "semctl",
        "shmdt",
        "msgget",
        "msgsnd",
        "msgrcv",
        "msgctl",
        "fcntl",
        "flock",
        "fsync",
        "fdatasync",
        "truncate",
        "ftruncate",
        "getdents",
        "getcwd",
        "chdir",
        "fchdir",
        "rename",
        "mkdir",
        "rmdir",
        "creat",
        "link",
        "unlink",
        "symlink",
        "readlink",
        "chmod",
        "fchmod",
        "chown",
        "fchown",
        "lchown",
        "umask",
        "gettimeofday",
        "getrlimit",
        "getrusage",
        "sysinfo",
        "times",
        "getuid",
        "getgid",
        "setuid",
        "setgid",
        "geteuid",
        "getegid",
        "setpgid",
        "getppid",
        "getpgrp",
        "setsid",
        "setreuid",
        "setregid",
        "getgroups",
        "setgroups",
        "setresuid",
        "getresuid",
        "setresgid",
        "getresgid",
        "getpgid",
        "setfsuid",
        "setfsgid",
        "getsid",
        "capget",
        "capset",
        "rt_sigpending",
        "rt_sigtimedwait",
        "rt_sigqueueinfo",
        "rt_sigsuspend",
        "sigaltstack",
        "utime",
        "mknod",
        "statfs",
        "fstatfs",
        "getpriority",
        "setpriority",
        "sched_setparam",
        "sched_getparam",
        "sched_setscheduler",
        "sched_getscheduler",
        "sched_get_priority_max",
        "sched_get_priority_min",
        "sched_rr_get_interval",
        "mlock",
        "munlock",
        "mlockall",
        "munlockall",
        "prctl",
        "arch_prctl",
        "adjtimex",
        "setrlimit",
        "sync",
        "gettid",
        "readahead",
        "setxattr",
        "lsetxattr",
        "fsetxattr",
        "getxattr",
        "lgetxattr",
        "fgetxattr",
        "listxattr",
        "llistxattr",
        "flistxattr",
        "removexattr",
        "lremovexattr",
        "fremovexattr",
        "tkill",
        "time",
        "futex",
        "sched_setaffinity",
        "sched_getaffinity",
        "set_thread_area",
        "io_setup",
        "io_destroy",
        "io_getevents",
        "io_submit",
        "io_cancel",
        "get_thread_area",
        "epoll_create",
        "epoll_ctl_old",
        "epoll_wait_old",
        "remap_file_pages",
        "getdents64",
        "set_tid_address",
        "restart_syscall",
        "semtimedop",
        "fadvise64",
        "timer_create",
        "timer_settime",
        "timer_gettime",
        "timer_getoverrun",
        "timer_delete",
        "clock_gettime",
        "clock_getres",
        "clock_nanosleep",
        "exit_group",
        "epoll_wait",
        "epoll_ctl",
        "tgkill",
        "utimes",
        "mq_open",
        "mq_unlink",
        "mq_timedsend",
        "mq_timedreceive",
        "mq_notify",
        "mq_getsetattr",
        "waitid",
        "ioprio_set",
        "ioprio_get",
        "inotify_init",
        "inotify_add_watch",
        "inotify_rm_watch",
        "openat",
        "mkdirat",
        "mknodat",
        "fchownat",
        "futimesat",
        "newfstatat",
        "unlinkat",
        "renameat",
        "linkat",
        "symlinkat",
        "readlinkat",
        "fchmodat",
        "faccessat",
        "pselect6",
        "ppoll",
        "set_robust_list",
        "get_robust_list",
        "splice",
        "tee",
        "sync_file_range",
        "vmsplice",
        "utimensat",
        "epoll_pwait",
        "signalfd",
        "timerfd_create",
        "eventfd",
        "fallocate",
        "timerfd_settime",
        "timerfd_gettime",
        "accept4",
        "signalfd4",
        "eventfd2",
        "epoll_create1",
        "dup3",
        "pipe2",
        "inotify_init1",
        "preadv",
        "pwritev",
        "rt_tgsigqueueinfo",
        "recvmmsg",
        "fanotify_mark",
        "prlimit64",
        "syncfs",
        "sendmmsg",
        "getcpu",
        "sched_setattr",
        "sched_getattr",
        "renameat2",
        "seccomp",
        "getrandom",
        "memfd_create",
        "execveat",
        "membarrier",
        "mlock2",
        "copy_file_range",
        "preadv2",
        "pwritev2",
        "pkey_mprotect",
        "pkey_alloc",
        "pkey_free",
        "statx",
        "io_pgetevents",
        "rseq",
        "pidfd_send_signal",
        "pidfd_open",
        "close_range",
        "openat2",
        "faccessat2",
        "epoll_pwait2",
        "landlock_create_ruleset",
        "landlock_add_rule",
        "landlock_restrict_self",
        "memfd_secret",
        "process_mrelease",
        "futex_waitv",
    )
}
# Refused with EPERM, whatever the arguments.
DENIED: dict[str, int] = {
    name: SYSCALLS[name]
    for name in (
        "ptrace",
        "syslog",
        "uselib",
        "vhangup",
        "modify_ldt",
        "pivot_root",
        "chroot",
        "acct",
        "settimeofday",
        "mount",
        "umount2",
        "swapon",
        "swapoff",
        "reboot",
        "iopl",
        "ioperm",
        "init_module",
        "delete_module",
        "quotactl",
        "nfsservctl",
        "lookup_dcookie",
        "clock_settime",
        "kexec_load",
        "add_key",
        "request_key",
        "keyctl",
        "perf_event_open",
        "fanotify_init",
        "name_to_handle_at",
        "open_by_handle_at",
        "clock_adjtime",
        "setns",
        "process_vm_readv",
        "process_vm_writev",
        "kcmp",
        "finit_module",
        "kexec_file_load",
        "bpf",
        "userfaultfd",
        "io_uring_setup",
        "io_uring_enter",
        "io_uring_register",
        "open_tree",
        "move_mount",
        "fsopen",
        "fsconfig",
        "fsmount",
        "fspick",
        "pidfd_getfd",
        "mount_setattr",
        "quotactl_fd",
    )
}
# Allowed, with rules on their arguments.
NR_IOCTL = SYSCALLS["ioctl"]
NR_SOCKET = SYSCALLS["socket"]
NR_SOCKETPAIR = SYSCALLS["socketpair"]
NR_CLONE = SYSCALLS["clone"]
NR_UNSHARE = SYSCALLS["unshare"]
# Not allowed (ENOSYS): clone3 passes its flags in memory, out of the filter's reach, and the C
# library then falls back to clone(), whose flags the filter can read.
NR_CLONE3 = SYSCALLS["clone3"]

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
