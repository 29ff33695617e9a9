"""Least privilege for a VCPU worker: what a forked worker gives up before it serves the plugin.

A worker parses the plugin's bytes (in Python and in `hotpath.c`); if that code can be
subverted, the worker must hold nothing worth having. Once everything it needs is open and
mapped, `confine` makes the worker:

1. check it holds no KVM fd but its own VCPU's (no `/dev/kvm`, no VM fd, no other VCPU's),
   unmap every shared mapping it inherited from the supervisor but its region and its own
   `kvm_run` page (the other VCPUs' pages, guest memory), keep only its own VCPU's block of
   the region (`SharedRegion.confine_to`), and take /dev/null for stdin;
2. become non-dumpable (no core file, no ptrace by other processes of its user) with
   `RLIMIT_CORE` 0;
3. drop every capability: the bounding set (when it may), the ambient set, and, as root, its
   supplementary groups, then switch to an unprivileged user (`[vm] worker_user`), which empties
   the effective and permitted sets; the inheritable set is cleared last, and all are checked;
4. set `no_new_privs`, and die with the supervisor again (a credential change clears
   `PR_SET_PDEATHSIG`; the parent is checked once more);
5. install a seccomp allowlist (`ALLOWED`, with why each call is there) over the whole process.

A call outside the list is trapped: `hotpath.c` stores its number in the worker's slot and the
worker dies by SIGSYS; the supervisor reports `worker killed by seccomp (syscall NAME)` (see
`describe_seccomp_kill`). Executable mappings are refused too (`mmap`/`mprotect` with
PROT_EXEC): a subverted worker can load no new code. After the filter the worker opens no file
and starts no thread (fds a plugin passes are closed in place, `wire.close_received_in_place`):
tracebacks it logs name file, line and function but carry no source text (`linecache` is told
not to read files), and everything it imports is imported before.

Firecracker's jailer and per-thread filters are the model; here the worker is a process of its
own, so the filter covers the process (TSYNC), and the other VCPUs' memory goes away too: a
write into another VCPU's mailbox or slot is a SIGSEGV.

`MISBEHAVE_VARIABLE` is a test-only hook: the supervisor reads it from its own environment
(the plugin cannot set that) and a worker told to misbehave does so right after confinement,
so the tests can prove each barrier on a real run.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import linecache
import mmap
import os
import re
import resource
import signal
from collections.abc import Mapping
from typing import Any, Final

from vmsuper.shared import bpf, hotpath, kvm, wire
from vmsuper.shared.libc_calls import check
from vmsuper.shared.prctl import (
    PR_CAP_AMBIENT,
    PR_CAP_AMBIENT_CLEAR_ALL,
    PR_CAPBSET_DROP,
    PR_SET_DUMPABLE,
    PR_SET_NO_NEW_PRIVS,
    PR_SET_PDEATHSIG,
    prctl,
)
from vmsuper.shared.shm import SharedRegion
from vmsuper.shared.shm_slot import VcpuSlot

__all__ = [
    "ALLOWED",
    "MISBEHAVE_VARIABLE",
    "MISBEHAVIOURS",
    "WORKER_USERS",
    "Confinement",
    "ConfinementError",
    "build_filter",
    "confine",
    "describe_seccomp_kill",
    "misbehave",
    "misbehaviour_from_environment",
]

WORKER_USERS: Final = ("vmsuper-worker", "nobody")
"""Who a root supervisor's workers run as when `[vm] worker_user` is not set: the first of
these the host has."""

MISBEHAVE_VARIABLE: Final = "VMSUPER_TEST_WORKER_MISBEHAVE"
"""Test-only: ``VCPU:ACTION`` makes that VCPU's worker do `ACTION` right after confinement."""
MISBEHAVIOURS: Final = ("open", "ioctl", "kill", "exec_mapping", "write_other")

# The allowlist: every system call a confined worker's loops make, Python's and hotpath.c's.
ALLOWED: Final[Mapping[str, str]] = {
    "read": "channel pipes, the bells' pipes, the signal wake-up pipe",
    "write": "channel pipes, the bells' pipes, the worker's log file, stderr",
    "readv": "pipes transport: a length-delimited request read with its prefix (wire.py)",
    "writev": "pipes transport: a response written with its prefix",
    "recvmsg": "socket transport: requests and the fds they carry (hotpath.c, Python)",
    "sendmsg": "socket transport: responses (hotpath.c)",
    "recvfrom": "socket transport: Python's socket.recv",
    "sendto": "socket transport: Python's socket.send",
    "getsockname": "repr() of the channel's socket (Python warns of it unclosed at exit)",
    "getpeername": "repr() of the channel's socket, as for getsockname",
    "close": "fds a plugin passes with a request are closed at once",
    "poll": "a bell's sleep on its pipe and the wake-up pipe (hotpath.c)",
    "ppoll": "the same, where the C library implements poll with ppoll",
    "futex": "the interpreter's locks",
    "sched_yield": "a bell's polling yields the CPU",
    "clock_gettime": "response times (the vDSO, but a clock source without it makes a call)",
    "gettimeofday": "log timestamps, where the vDSO cannot serve them",
    "mmap": "memory allocation (never PROT_EXEC)",
    "mprotect": "memory allocation (never PROT_EXEC)",
    "munmap": "memory allocation",
    "mremap": "memory allocation (realloc of large blocks)",
    "madvise": "memory allocation (free returns memory)",
    "brk": "memory allocation",
    "rt_sigaction": "Python installs handlers (SIGTERM at the end); never for SIGSYS (kills)",
    "rt_sigprocmask": "Python unblocks the stop signals; hotpath.c's SIGSYS handler",
    "rt_sigreturn": "return from every signal handler",
    "restart_syscall": "a call interrupted by a signal is restarted",
    "getpid": "the C library's raise() and Python's faulthandler",
    "gettid": "the C library's raise()",
    "tgkill": "raise() and abort() signal the worker itself (only itself)",
    "exit": "the end of the process (exit of the last thread)",
    "exit_group": "the end of the process (os._exit)",
}

_CAP_SETPCAP = 8
_CAPABILITY_VERSION_3 = 0x20080522
_SECCOMP_SET_MODE_FILTER = 1
_SECCOMP_FILTER_FLAG_TSYNC = 1
_PROT_EXEC = 0x4
_KVM_LINK = re.compile(r"anon_inode:kvm-vcpu:(\d+)|anon_inode:kvm-vm|/dev/kvm")
_MAPPING = re.compile(  # a line of /proc/self/maps
    r"(?P<start>[0-9a-f]+)-(?P<end>[0-9a-f]+) [-r][-w][-x](?P<shared>[sp])"
    r" \S+ \S+ \S+ *(?P<path>.*)"
)

_libc = ctypes.CDLL(None, use_errno=True)


class ConfinementError(Exception):
    """The worker could not give up a privilege; it must not serve the plugin then."""


class Confinement:
    """What the supervisor decides for its workers (in each `WorkerSpec`). Immutable; a plain
    class because a frozen dataclass would compile its methods at every start-up."""

    __slots__ = ("gid", "misbehave", "uid")
    uid: Final[int | None]
    """Switch to this uid and `gid` (a root supervisor); None: stay the invoking user."""
    gid: Final[int | None]
    misbehave: Final[str | None]
    """Test-only (`MISBEHAVE_VARIABLE`): one of `MISBEHAVIOURS`, done right after confinement."""

    def __init__(
        self, uid: int | None = None, gid: int | None = None, misbehave: str | None = None
    ) -> None:
        self.uid = uid
        self.gid = gid
        self.misbehave = misbehave


def misbehaviour_from_environment(vcpu: int, environ: Mapping[str, str]) -> str | None:
    """The misbehaviour `MISBEHAVE_VARIABLE` asks of VCPU `vcpu`'s worker, if any (tests only).

    Raises ValueError when the variable is set but malformed."""
    value = environ.get(MISBEHAVE_VARIABLE)
    if not value:
        return None
    target, _, action = value.partition(":")
    if not target.isdigit() or action not in MISBEHAVIOURS:
        raise ValueError(
            f"{MISBEHAVE_VARIABLE}={value!r}: expected VCPU:ACTION, ACTION one of "
            + ", ".join(MISBEHAVIOURS)
        )
    return action if int(target) == vcpu else None


def describe_seccomp_kill(trapped_syscall: int | None) -> str:
    """Why a worker killed by SIGSYS died: the system call its filter trapped, if it says."""
    if trapped_syscall is None:
        return "worker killed by seccomp (SIGSYS)"
    return f"worker killed by seccomp (syscall {bpf.syscall_name(trapped_syscall)})"


# -- the filter --------------------------------------------------------------------------------


def build_filter(pid: int) -> bytes:
    """The worker's filter: `ALLOWED` pass (`tgkill` only to process `pid`, `mmap` and
    `mprotect` only without PROT_EXEC), `rt_sigaction(SIGSYS)` kills the process, and every
    other call, or another architecture, traps or kills (see the module doc)."""
    nr = bpf.SYSCALLS
    allow: bpf.Program = [bpf.ret(bpf.SECCOMP_RET_ALLOW)]
    trap: bpf.Program = [bpf.ret(bpf.SECCOMP_RET_TRAP)]
    verdicts: dict[int, bpf.Program] = {nr[name]: allow for name in ALLOWED}
    no_exec = _arg_rule(2, bpf.BPF_JSET_K, _PROT_EXEC, bpf.SECCOMP_RET_TRAP)
    verdicts[nr["mmap"]] = verdicts[nr["mprotect"]] = no_exec
    verdicts[nr["rt_sigaction"]] = _arg_rule(
        0, bpf.BPF_JEQ_K, signal.SIGSYS, bpf.SECCOMP_RET_KILL_PROCESS
    )
    only_itself: bpf.Program = [
        bpf.load(bpf.offset_arg_low(0)),
        bpf.Insn(bpf.BPF_JEQ_K, pid, jt="allow"),
        bpf.ret(bpf.SECCOMP_RET_TRAP),
        "allow",
        bpf.ret(bpf.SECCOMP_RET_ALLOW),
    ]
    verdicts[nr["tgkill"]] = only_itself
    return bpf.build_filter(verdicts, trap, foreign=bpf.SECCOMP_RET_KILL_PROCESS)


def _arg_rule(index: int, test: int, value: int, otherwise: int) -> bpf.Program:
    """Allow the call unless the low half of argument `index` passes `test` against `value`."""
    return [
        bpf.load(bpf.offset_arg_low(index)),
        bpf.Insn(test, value, jt="refuse"),
        bpf.ret(bpf.SECCOMP_RET_ALLOW),
        "refuse",
        bpf.ret(otherwise),
    ]


# -- the steps ---------------------------------------------------------------------------------


def confine(
    vcpu: int, confinement: Confinement, region: SharedRegion, slot: VcpuSlot
) -> dict[str, Any]:
    """Confine this worker process (see the module doc); what it did, for the log.

    Call it once everything the worker needs is open, mapped and imported. Raises
    `ConfinementError` (the worker must then exit) if any step fails."""
    try:
        # The compiled engine loads on first use; the worker's user may not be able to read
        # the installation (a checkout in a private folder), so it is loaded while it still can.
        hotpath.binding()
        vcpu_fd = _check_fds(vcpu)
        unmapped = _unmap_shared_mappings(vcpu, slot.cell_address("pause_seq"))
        _no_terminal_input()
        # Test-only: where a subverted worker would write into another VCPU's block.
        other_block = None
        if confinement.misbehave == "write_other":
            other_block = region.mailbox((vcpu + 1) % region.vcpus).head_address()
        # The region's memfd went with every other fd the worker does not use, right after
        # fork (`close_fds_except`): its number is stale, maybe reused, and must not be closed.
        region.fd = -1
        region.confine_to(vcpu)
        check(prctl(PR_SET_DUMPABLE, 0), "PR_SET_DUMPABLE")
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        parent = os.getppid()
        _drop_capabilities(confinement)
        check(prctl(PR_SET_NO_NEW_PRIVS, 1), "PR_SET_NO_NEW_PRIVS")
        check(prctl(PR_SET_PDEATHSIG, signal.SIGKILL), "PR_SET_PDEATHSIG")
        if os.getppid() != parent:
            raise ConfinementError(f"the supervisor (pid {parent}) is gone")
        facts = {
            "uid": os.getuid(),
            "gid": os.getgid(),
            "mappings_unmapped": unmapped,
            "vcpu_fd": vcpu_fd,
            "parent": parent,
            "other_block": other_block,
        }
        _read_no_source_files()
        wire.close_received_in_place()
        hotpath.trap_syscalls(slot.cell_address("trapped_syscall"))
        _install_filter(build_filter(os.getpid()))
    except OSError as exc:
        raise ConfinementError(f"cannot confine the VCPU worker: {exc}") from exc
    return facts


def _check_fds(vcpu: int) -> int | None:
    """Refuse to go on holding a KVM fd other than this VCPU's own (read before the user
    switch: /proc/self/fd of a non-dumpable process is root's); the VCPU's own fd, if held."""
    own = None
    for name in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{name}")
        except FileNotFoundError:  # the listing's own fd
            continue
        found = _KVM_LINK.fullmatch(target)
        if found and not (found[1] is not None and int(found[1]) == vcpu):
            raise ConfinementError(f"the VCPU worker holds fd {name} -> {target}")
        if found:
            own = int(name)
    return own


def _unmap_shared_mappings(vcpu: int, region_address: int) -> int:
    """Unmap every shared mapping the worker inherited but does not use: the other VCPUs'
    `kvm_run` pages and the guest memory the supervisor had mapped (the plugin's memfds),
    all but the region holding `region_address` and this VCPU's `kvm_run`; how many.
    (Their Python objects are never used nor collected in the worker.)"""
    with open("/proc/self/maps") as maps:
        found = [_MAPPING.match(line.rstrip("\n")) for line in maps]
    own = f"anon_inode:kvm-vcpu:{vcpu}"
    count = 0
    for match in found:
        if match is None or match["shared"] != "s":
            continue
        start, end = int(match["start"], 16), int(match["end"], 16)
        if match["path"] == own or start <= region_address < end:
            continue
        check(_libc.munmap(ctypes.c_void_p(start), ctypes.c_size_t(end - start)), "munmap")
        count += 1
    return count


def _no_terminal_input() -> None:
    """stdin becomes /dev/null: vmsuper's may be the user's terminal, and a worker has no
    business reading what is typed there (stdout and stderr stay, for tracebacks)."""
    null = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.dup2(null, 0, inheritable=False)
    finally:
        os.close(null)


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [
        ("effective", ctypes.c_uint32),
        ("permitted", ctypes.c_uint32),
        ("inheritable", ctypes.c_uint32),
    ]


def _capabilities() -> tuple[int, int, int]:
    """(effective, permitted, inheritable) of this thread, 64 bits each."""
    header = _CapHeader(_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    check(_libc.capget(ctypes.byref(header), data), "capget")
    return tuple(
        getattr(data[0], field) | getattr(data[1], field) << 32
        for field in ("effective", "permitted", "inheritable")
    )


def _drop_capabilities(confinement: Confinement) -> None:
    effective, _, _ = _capabilities()
    if effective >> _CAP_SETPCAP & 1:
        # Without CAP_SETPCAP the set cannot shrink; it only bounds what an exec could gain,
        # and the worker can exec nothing (no_new_privs, the filter).
        with open("/proc/sys/kernel/cap_last_cap") as last:
            top = int(last.read())
        for cap in range(top + 1):
            check(prctl(PR_CAPBSET_DROP, cap), f"PR_CAPBSET_DROP {cap}")
    cleared = prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL) == 0
    if not cleared and ctypes.get_errno() != errno.EINVAL:  # EINVAL: no ambient capabilities
        check(-1, "PR_CAP_AMBIENT_CLEAR_ALL")
    if confinement.uid is not None and confinement.gid is not None:
        os.setgroups([])
        os.setresgid(confinement.gid, confinement.gid, confinement.gid)
        os.setresuid(confinement.uid, confinement.uid, confinement.uid)
    header = _CapHeader(_CAPABILITY_VERSION_3, 0)
    check(_libc.capset(ctypes.byref(header), (_CapData * 2)()), "capset")
    if any(_capabilities()):
        raise ConfinementError(f"capabilities left after dropping them: {_capabilities()}")


def _read_no_source_files() -> None:
    """Tracebacks logged under the filter must not open their source files: linecache keeps
    what it has and reads nothing more."""

    def check_nothing(filename: str | None = None) -> None:
        return None

    def read_nothing(filename: str, module_globals: Any = None) -> list[str]:
        return []

    linecache.checkcache = check_nothing
    linecache.updatecache = read_nothing


def _install_filter(code: bytes) -> None:
    program, _buffer = bpf.fprog(code)
    nr = bpf.SYSCALLS["seccomp"]
    result = _libc.syscall(
        nr, _SECCOMP_SET_MODE_FILTER, _SECCOMP_FILTER_FLAG_TSYNC, ctypes.byref(program)
    )
    check(result, "seccomp(SECCOMP_SET_MODE_FILTER)")


# -- test-only misbehaviour ----------------------------------------------------------------------


def misbehave(action: str, vcpu: int, region: SharedRegion, confined: Mapping[str, Any]) -> None:
    """Do what a subverted worker might (`MISBEHAVE_VARIABLE`, tests only); a confined worker
    does not come back from any of these. `confined`: what `confine` returned."""
    if action == "open":
        os.close(os.open("/etc/passwd", os.O_RDONLY))
    elif action == "ioctl":
        fcntl.ioctl(confined["vcpu_fd"], kvm.KVM_RUN)
    elif action == "kill":
        os.kill(confined["parent"], signal.SIGTERM)
    elif action == "exec_mapping":
        mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_EXEC)
    elif action == "write_other":  # through an address taken before confinement
        ctypes.memset(confined["other_block"], 0xFF, 8)
