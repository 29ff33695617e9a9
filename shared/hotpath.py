"""The C half of the per-exit path (`hotpath.c`), loaded with ctypes.

Each exit used to cost four process wake-ups (runner -> worker -> plugin and back) and about
20 us of Python; crosvm's layout pays two wake-ups and no interpreter. The C library keeps
vmsuper's layout but removes both costs where it can:

- bells: the worker/runner hand-off polls shared memory for a moment before sleeping on its
  eventfd, so a hand-off between two busy processes needs no wake-up at all;
- the runner thread's `KVM_RUN` loop, run without the GIL;
- the worker's loop over plain I/O and MMIO exits: Wait{Io} out, Resume{data} back.

Anything else goes back to Python (see `hotpath.c`). The library is built with the package
(`setup.py`); it has no Python API, so ctypes calls it directly and releases the GIL for the
whole call.
"""

from __future__ import annotations

import ctypes
import enum
import errno
import importlib.machinery
from pathlib import Path
from typing import Any, Final

__all__ = [
    "ABI",
    "HISTOGRAM_BUCKETS",
    "HotpathError",
    "Range",
    "RunnerContext",
    "RunnerResult",
    "VcpuStats",
    "WorkerContext",
    "WorkerResult",
    "bell_ring",
    "bell_wait",
    "encode_io_wait",
    "find_range",
    "library",
    "plain_resume",
    "take_signal",
    "trap_syscalls",
    "watch_signal",
]

ABI: Final = 2
"""Must equal VMS_ABI in hotpath.c: a stale build is refused rather than misread."""


class HotpathError(ImportError):
    """The C library is missing or does not match this Python code."""


def _library_path() -> Path:
    here = Path(__file__).parent
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        candidate = here / f"_hotpath{suffix}"
        if candidate.exists():
            return candidate
    raise HotpathError(
        f"vmsuper's C library (_hotpath*.so) is not built in {here}: reinstall the package "
        "(`pip install -e .`, or `./dev test`, which does it when hotpath.c changes)"
    )


class RunnerContext(ctypes.Structure):
    """`struct vms_runner`."""

    _fields_ = [
        ("vcpu_fd", ctypes.c_int64),
        ("run", ctypes.c_void_p),
        ("mail", ctypes.c_void_p),
        ("request_efd", ctypes.c_int64),
        ("done_efd", ctypes.c_int64),
        ("request_seen", ctypes.c_void_p),
        ("pause_seq", ctypes.c_void_p),
        ("delivered_seq", ctypes.c_void_p),
        ("hold_runs", ctypes.c_int64),
        ("stopping", ctypes.c_int64),
        ("spin_ns", ctypes.c_uint64),
        ("error", ctypes.c_int64),
    ]


class Range(ctypes.Structure):
    """`struct vms_range`: one reserved range, in an array sorted by (space, start)."""

    _fields_ = [
        ("start", ctypes.c_uint64),
        ("length", ctypes.c_uint64),
        ("space", ctypes.c_uint64),
        ("async_write", ctypes.c_uint64),
    ]


HISTOGRAM_BUCKETS: Final = 48
"""VMS_BUCKETS in hotpath.c: log2 buckets of nanoseconds, up to 2**47 ns (39 hours)."""


class VcpuStats(ctypes.Structure):
    """`struct vms_stats`: one VCPU's statistics block in shared memory (shm.py places it)."""

    _fields_ = [
        ("wait_since", ctypes.c_uint64),
        ("responses", ctypes.c_uint64),
        ("response_sum_ns", ctypes.c_uint64),
        ("response_max_ns", ctypes.c_uint64),
        ("buckets", ctypes.c_uint64 * HISTOGRAM_BUCKETS),
    ]


class WorkerContext(ctypes.Structure):
    """`struct vms_worker`."""

    _fields_ = [
        ("run", ctypes.c_void_p),
        ("run_size", ctypes.c_uint64),
        ("mail", ctypes.c_void_p),
        ("request_efd", ctypes.c_int64),
        ("done_efd", ctypes.c_int64),
        ("done_seen", ctypes.c_void_p),
        ("counters", ctypes.c_void_p),
        ("run_state", ctypes.c_void_p),
        ("stats", ctypes.c_void_p),
        ("table_gen", ctypes.c_void_p),
        ("known_gen", ctypes.c_uint64),
        ("ranges", ctypes.c_void_p),
        ("n_ranges", ctypes.c_uint64),
        ("range_counts", ctypes.c_void_p),
        ("hint_set", ctypes.c_uint64),
        ("hint_space", ctypes.c_uint64),
        ("hint_address", ctypes.c_uint64),
        ("pipes", ctypes.c_uint64),
        ("in_fd", ctypes.c_int64),
        ("out_fd", ctypes.c_int64),
        ("buf", ctypes.c_void_p),
        ("max_request", ctypes.c_uint64),
        ("max_fds", ctypes.c_uint64),
        ("spin_ns", ctypes.c_uint64),
        ("wake_fd", ctypes.c_int64),
        ("state", ctypes.c_uint64),
        ("error", ctypes.c_int64),
        ("request_len", ctypes.c_uint64),
        ("refusal", ctypes.c_uint64),
        ("fds", ctypes.c_uint64),
        ("fwd_space", ctypes.c_uint64),
        ("fwd_address", ctypes.c_uint64),
        ("fwd_is_write", ctypes.c_uint64),
        ("fwd_offset", ctypes.c_uint64),
        ("fwd_length", ctypes.c_uint64),
    ]


class RunnerResult(enum.IntEnum):
    """Why `vms_runner_loop` returned."""

    STOP = 1
    CALL = 2
    """Another ioctl than KVM_RUN is posted: Python checks and makes it."""
    HELD_RUN = 3
    """The first KVM_RUN, held while `hold_runs` is set (the Init barrier)."""
    INTERRUPTED = 4
    FAILED = 5


class WorkerResult(enum.IntEnum):
    """Why `vms_worker_loop` returned."""

    RUN_RESULT = 1
    EXIT = 2
    REQUEST = 3
    REFUSED = 4
    INTERRUPTED = 5
    HUNGUP = 6
    FAILED = 7
    TOO_LARGE = 8
    BELL_FAILED = 9


def layout(lib: ctypes.CDLL, which: int) -> dict[str, int]:
    """A C struct's field offsets by name, and its size under "sizeof" (see `vms_layout`)."""
    names = ctypes.c_char_p()
    table = ctypes.POINTER(ctypes.c_uint64)()
    count = lib.vms_layout(which, ctypes.byref(names), ctypes.byref(table))
    fields = (names.value or b"").decode().split()
    offsets = [table[i] for i in range(count)]
    if len(fields) + 1 != count:
        raise HotpathError(f"the C library describes layout {which} inconsistently")
    return {**dict(zip(fields, offsets, strict=False)), "sizeof": offsets[-1]}


def struct_layout(struct: type[ctypes.Structure]) -> dict[str, int]:
    """The same for a ctypes mirror."""
    fields = {name: getattr(struct, name).offset for name, *_ in struct._fields_}
    return {**fields, "sizeof": ctypes.sizeof(struct)}


_c = ctypes
_SIGNATURES: Final[dict[str, tuple[list[Any], Any]]] = {
    # name: (argument types, result type), as declared in hotpath.c.
    "vms_abi": ([], _c.c_int),
    "vms_layout": (
        [_c.c_int, _c.POINTER(_c.c_char_p), _c.POINTER(_c.POINTER(_c.c_uint64))],
        _c.c_size_t,
    ),
    "vms_watch_signal": ([_c.c_int], _c.c_int),
    "vms_take_signal": ([], _c.c_int),
    "vms_bell_ring": ([_c.c_void_p, _c.c_int], _c.c_int),
    "vms_bell_wait": ([_c.c_void_p, _c.c_int, _c.c_void_p, _c.c_uint64, _c.c_int], _c.c_int),
    "vms_runner_loop": ([_c.POINTER(RunnerContext)], _c.c_int),
    "vms_worker_loop": ([_c.POINTER(WorkerContext)], _c.c_int),
    "vms_find_range": ([_c.c_void_p, _c.c_uint64, _c.c_uint64, _c.c_uint64], _c.c_int64),
    "vms_encode_io_wait": (
        [_c.c_char_p, _c.c_uint64, _c.c_uint64, _c.c_int, _c.c_int, _c.c_char_p, _c.c_size_t],
        _c.c_size_t,
    ),
    "vms_plain_resume": (
        [_c.c_char_p, _c.c_size_t, _c.POINTER(_c.c_size_t), _c.POINTER(_c.c_size_t)],
        _c.c_int,
    ),
    # Confinement (workers/confine.py): name the system call a seccomp trap stopped.
    "vms_trap_syscalls": ([_c.c_void_p], _c.c_int),
}


def _load() -> ctypes.CDLL:
    lib = ctypes.CDLL(str(_library_path()), use_errno=True)
    for name, (argtypes, restype) in _SIGNATURES.items():
        function = getattr(lib, name)
        function.argtypes = argtypes
        function.restype = restype
    if lib.vms_abi() != ABI:
        raise HotpathError(
            f"vmsuper's C library has ABI {lib.vms_abi()}, this code needs {ABI}: rebuild it "
            "(`pip install -e .`)"
        )
    for which, struct in enumerate((RunnerContext, Range, WorkerContext, VcpuStats)):
        if layout(lib, which) != struct_layout(struct):
            raise HotpathError(
                f"the C library's struct layout differs from {struct.__name__}: rebuild it "
                "(`pip install -e .`)"
            )
    return lib


library: Final = _load()
_bell_ring = library.vms_bell_ring
_bell_wait = library.vms_bell_wait


def watch_signal(signum: int) -> None:
    """Let the C loops see `signum` before they block (call after `signal.signal` for it).

    A handler in front of Python's notes the signal and calls Python's; a loop that finds it
    noted returns INTERRUPTED instead of sleeping, so Python runs the handler. Python's own
    waits have the same guarantee from PEP 475."""
    err = library.vms_watch_signal(signum)
    if err:
        raise OSError(-err, f"cannot watch signal {signum}")


def take_signal() -> bool:
    """Whether a watched signal came since the last call."""
    return bool(library.vms_take_signal())


def bell_ring(bell: int, efd: int) -> None:
    """Ring the bell at address `bell` (its waiter sleeps on `efd`)."""
    err = _bell_ring(bell, efd)
    if err:
        raise OSError(-err, f"ringing a bell failed: {err}")


def bell_wait(bell: int, efd: int, seen: ctypes.c_uint32, spin_ns: int, wake_fd: int = -1) -> None:
    """Wait until the bell rang since `seen` (which is updated). Raises InterruptedError when
    a signal came while it slept (with `wake_fd`, the read end of the process's
    `signal.set_wakeup_fd` pipe, also one that came while it polled): the caller drains that
    pipe and decides whether to wait again."""
    err = _bell_wait(bell, efd, ctypes.addressof(seen), spin_ns, wake_fd)
    if err == -errno.EINTR:
        raise InterruptedError(errno.EINTR, "a signal came while waiting on a bell")
    if err:
        raise OSError(-err, f"waiting on a bell failed: {err}")


def find_range(ranges: ctypes.Array[Range], space: int, address: int) -> int:
    """Index of the range holding (`space`, `address`) in `ranges`, or -1 (for tests)."""
    return int(library.vms_find_range(ranges, len(ranges), space, address))


def encode_io_wait(space: int, address: int, is_write: bool, no_resume: bool, data: bytes) -> bytes:
    """The C encoding of Wait{Io} (for tests: it must equal the Python one)."""
    out = ctypes.create_string_buffer(len(data) + 64)
    n = library.vms_encode_io_wait(out, space, address, is_write, no_resume, data, len(data))
    return out.raw[:n]


def plain_resume(request: bytes) -> bytes | None:
    """The C reading of a plain Resume{data} (for tests: it must equal the Python one)."""
    offset = ctypes.c_size_t()
    length = ctypes.c_size_t()
    if not library.vms_plain_resume(request, len(request), offset, length):
        return None
    return request[offset.value : offset.value + length.value]


def trap_syscalls(cell: int) -> None:
    """Catch SIGSYS from a seccomp trap: the trapped system call's number + 1 goes into the
    64-bit cell at address `cell`, then the process dies by SIGSYS (`workers/confine.py`'s
    filter kills it for resetting the handler). Call it before installing the filter."""
    err = library.vms_trap_syscalls(cell)
    if err:
        raise OSError(-err, "cannot catch SIGSYS")
