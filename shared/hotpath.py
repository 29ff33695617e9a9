"""The per-exit engine (`hotpath.c`), through its cffi binding.

Each exit used to cost four process wake-ups (runner -> worker -> plugin and back) and about
20 us of Python; crosvm's layout pays two wake-ups and no interpreter. The C code keeps
vmsuper's layout but removes both costs where it can:

- bells: the worker/runner hand-off polls shared memory for a moment before sleeping on its
  pipe, so a hand-off between two busy processes needs no wake-up at all;
- the runner thread's `KVM_RUN` loop, run without the GIL;
- the worker's loop over every I/O and MMIO exit: decoded, looked up, counted, and served
  when plain (Wait{Io} out, Resume{data} back), with the channel's transport.

What needs a protocol decision goes back to Python as a decoded event (see `hotpath.c`). The
package build compiles it, with the shared region's seqlocks (`seqlock.c`), into the cffi module
`vmsuper.shared._hotpath` (`hotpath.h` declares what Python uses, once, for C and for cffi;
the C compiler checks every declaration against its definition); cffi releases the GIL for
every call.

The compiled module is loaded on first use, not on import: importing this module, the shared
region's or the SDK, and `vmsuper logs`, `check`, `stats` or `--help`, never need it. A
missing or stale build raises `HotpathError`, which says how to rebuild.
"""

from __future__ import annotations

import ctypes
import errno
import importlib
from collections.abc import Iterable, Mapping
from pathlib import Path
from types import ModuleType
from typing import Any, Final, Protocol

from vmsuper.shared import hotpath_source
from vmsuper.shared.abi import Delivered, RunnerResult, WorkerResult

__all__ = [
    "Bell",
    "Delivered",
    "HotpathError",
    "RunnerContext",
    "RunnerResult",
    "WorkerContext",
    "WorkerResult",
    "bell_ring",
    "bell_wait",
    "binding",
    "catch_wake",
    "decode_access",
    "encode_io_wait",
    "find_range",
    "library",
    "plain_resume",
    "seq_begin",
    "seq_end",
    "seq_publish",
    "seq_read",
    "take_signal",
    "trap_syscalls",
    "unwatch_signal",
    "watch_signal",
]

REBUILD: Final = "rebuild it: `pip install --no-build-isolation -e .`, or `./dev test`"


class HotpathError(ImportError):
    """The compiled hot path is missing or was built from other sources than these."""


_loaded: ModuleType | None = None


def binding() -> ModuleType:
    """The compiled module (its `ffi` and `lib`), loaded and checked on the first call."""
    global _loaded
    if _loaded is None:
        _loaded = _load()
    return _loaded


def _load() -> ModuleType:
    try:
        _hotpath = importlib.import_module("vmsuper.shared._hotpath")
    except ImportError as exc:
        here = Path(__file__).parent
        # A library built before the cffi binding: Python's suffix order prefers it to the
        # abi3 module, and a rebuild leaves it there.
        stale = sorted(p.name for p in here.glob("_hotpath.cpython-*.so"))
        fix = f"remove {', '.join(stale)} from {here}, then {REBUILD}" if stale else REBUILD
        raise HotpathError(f"vmsuper's compiled hot path cannot be loaded ({exc}): {fix}") from exc
    here = Path(__file__).parent
    # Beside the sources (a checkout), the module must be built from them as they are now.
    sources_here = all((here / name).exists() for name in hotpath_source.SOURCES)
    if sources_here and hotpath_source.digest(here) != _hotpath.lib.VMS_SOURCE_DIGEST:
        raise HotpathError(
            f"vmsuper's compiled hot path was built from other sources than those in {here}: "
            + REBUILD
        )
    return _hotpath


class _Library:
    """`library.vms_*`: the C functions, loading the module on first use."""

    def __getattr__(self, name: str) -> Any:
        return getattr(binding().lib, name)


library: Final = _Library()


class _RangeLike(Protocol):
    @property
    def start(self) -> int: ...
    @property
    def length(self) -> int: ...
    @property
    def space(self) -> int: ...
    @property
    def async_write(self) -> bool: ...


def _new(struct: str, fields: Mapping[str, Any]) -> Any:
    """A zeroed C `struct`, filled from `fields`; a pointer field may be given as an address."""
    ffi = binding().ffi
    types = dict(ffi.typeof(f"struct {struct}").fields)
    values = {}
    for name, value in fields.items():
        ctype = types[name].type
        if ctype.kind == "pointer" and isinstance(value, int):
            value = ffi.cast(ctype, value)
        values[name] = value
    return ffi.new(f"struct {struct} *", values)


def RunnerContext(**fields: Any) -> Any:
    """A new `struct vms_runner` for `vms_runner_loop` (fields by name; pointers as addresses).
    Read and set its fields as attributes; pass it to `library.vms_runner_loop` as it is."""
    return _new("vms_runner", fields)


def WorkerContext(**fields: Any) -> Any:
    """A new `struct vms_worker` for `vms_worker_loop`, as `RunnerContext`."""
    return _new("vms_worker", fields)


def watch_signal(signum: int) -> None:
    """Let the C loops see `signum` before they block (call after `signal.signal` for it).

    A handler in front of Python's notes the signal and calls Python's; a loop that finds it
    noted returns INTERRUPTED instead of sleeping, so Python runs the handler. Python's own
    waits have the same guarantee from PEP 475."""
    err = library.vms_watch_signal(signum)
    if err:
        raise OSError(-err, f"cannot watch signal {signum}")


def unwatch_signal(signum: int) -> None:
    """Undo `watch_signal`: the handler it found is installed again."""
    err = library.vms_unwatch_signal(signum)
    if err:
        raise OSError(-err, f"cannot unwatch signal {signum}")


def catch_wake() -> None:
    """Install the handler of `abi.WAKE_SIGNAL` that wakes a worker asleep in the read of its
    plugin's channel (a worker whose runner may serve its exits)."""
    err = library.vms_catch_wake()
    if err:
        raise OSError(-err, "cannot catch the wake-up signal")


def take_signal() -> bool:
    """Whether a watched signal came since the last call."""
    return bool(library.vms_take_signal())


class Bell:
    """One bell (`struct vms_bell` at `address`), waited on with this process's last-seen
    number `seen`: its pointers are made once, for a hand-off that may come every exit."""

    __slots__ = ("_bell", "_ring", "_seen", "_wait", "address", "seen")

    def __init__(self, address: int, seen: ctypes.c_uint32) -> None:
        module = binding()
        self.address = address
        self.seen = seen
        self._bell = module.ffi.cast("struct vms_bell *", address)
        self._seen = module.ffi.cast("uint32_t *", ctypes.addressof(seen))
        self._ring = module.lib.vms_bell_ring
        self._wait = module.lib.vms_bell_wait

    def ring(self, write_fd: int, pidfd: int = -1) -> None:
        """Ring it (its waiter sleeps in a read of the pipe whose write end is `write_fd`; a
        worker asleep in a read of its plugin's channel is sent `abi.WAKE_SIGNAL` through
        `pidfd`, its pidfd, if there is one)."""
        err = self._ring(self._bell, write_fd, pidfd)
        if err:
            raise OSError(-err, f"ringing a bell failed: {err}")

    def wait(self, read_fd: int, spin_ns: int, wake_fd: int = -1) -> None:
        """Wait until it rang since `seen` (which is updated), polling for up to `spin_ns`,
        then sleeping in a read of `read_fd`, its pipe's read end. Raises InterruptedError when
        a signal came while it slept (with `wake_fd`, the read end of the process's
        `signal.set_wakeup_fd` pipe, also one that came while it polled): the caller drains
        that pipe and decides whether to wait again."""
        err = self._wait(self._bell, read_fd, self._seen, spin_ns, wake_fd)
        if err == -errno.EINTR:
            raise InterruptedError(errno.EINTR, "a signal came while waiting on a bell")
        if err:
            raise OSError(-err, f"waiting on a bell failed: {err}")


def bell_ring(bell: int, write_fd: int) -> None:
    """Ring the bell at address `bell` (its pipe's write end: `write_fd`)."""
    Bell(bell, ctypes.c_uint32()).ring(write_fd)


def bell_wait(
    bell: int, read_fd: int, seen: ctypes.c_uint32, spin_ns: int, wake_fd: int = -1
) -> None:
    """`Bell.wait` for the bell at address `bell`."""
    Bell(bell, seen).wait(read_fd, spin_ns, wake_fd)


def seq_begin(gen: int) -> None:
    """Make the seqlock generation at address `gen` odd before writing what it guards."""
    module = binding()
    module.lib.vms_seq_begin(module.ffi.cast("uint64_t *", gen))


def seq_end(gen: int) -> int:
    """Make it even again after the writes; returns the new generation."""
    module = binding()
    return int(module.lib.vms_seq_end(module.ffi.cast("uint64_t *", gen)))


def seq_publish(gen: int, dst: int, data: bytes) -> int:
    """Write `data` at address `dst` under the seqlock at `gen`; returns the new generation."""
    module = binding()
    ffi = module.ffi
    return int(
        module.lib.vms_seq_publish(
            ffi.cast("uint64_t *", gen), ffi.cast("uint8_t *", dst), data, len(data)
        )
    )


def seq_read(gen: int, src: int, out: bytearray) -> int | None:
    """Fill `out` from address `src` as of one generation of the seqlock at `gen`, and return
    that generation; None when a write was under way or came meanwhile (`out` is torn)."""
    module = binding()
    ffi = module.ffi
    got = module.lib.vms_seq_read(
        ffi.cast("uint64_t *", gen), ffi.from_buffer(out), ffi.cast("uint8_t *", src), len(out)
    )
    return None if got & 1 else int(got)


def decode_access(run_address: int, run_size: int) -> Any | None:
    """The engine's decoding of the exit in the run page at `run_address` (a `struct
    vms_access`: space, address, is_write, offset, length, size, count), or None when it is
    not an I/O or MMIO exit (those are `kvm.decode_exit`'s)."""
    ffi = binding().ffi
    access = ffi.new("struct vms_access *")
    run = ffi.cast("struct kvm_run *", run_address)
    if not library.vms_decode_access(run, run_size, access):
        return None
    return access


def find_range(items: Iterable[_RangeLike], space: int, address: int) -> int:
    """Index of the range holding (`space`, `address`) in `items`, or -1 (for tests)."""
    rows = [(int(r.space), r.start, r.length, int(r.async_write)) for r in items]
    array = binding().ffi.new("struct vms_counted_range[]", rows or [(0, 0, 0, 0)])
    return int(library.vms_find_range(array, len(rows), space, address))


def encode_io_wait(space: int, address: int, is_write: bool, no_resume: bool, data: bytes) -> bytes:
    """The engine's encoding of Wait{Io} (for tests: it must be protobuf's canonical one)."""
    ffi = binding().ffi
    out = ffi.new("uint8_t[]", len(data) + 64)
    n = library.vms_encode_io_wait(out, space, address, is_write, no_resume, data, len(data))
    return bytes(ffi.buffer(out, n))


def plain_resume(request: bytes) -> bytes | None:
    """The engine's reading of a plain Resume{data} (for tests: it must agree with protobuf and
    the Python oracle)."""
    ffi = binding().ffi
    offset = ffi.new("size_t *")
    length = ffi.new("size_t *")
    if not library.vms_plain_resume(request, len(request), offset, length):
        return None
    return request[offset[0] : offset[0] + length[0]]


def trap_syscalls(cell: int) -> None:
    """Catch SIGSYS from a seccomp trap: the trapped system call's number + 1 goes into the
    64-bit cell at address `cell`, then the process dies by SIGSYS (`workers/confine.py`'s
    filter kills it for resetting the handler). Call it before installing the filter."""
    module = binding()
    err = module.lib.vms_trap_syscalls(module.ffi.cast("uint64_t *", cell))
    if err:
        raise OSError(-err, "cannot catch SIGSYS")
