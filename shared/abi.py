"""The shared-memory ABI between vmsuper's Python and its C hot path, defined once, here.

Every struct that lies in the shared region (the region header, the table, a VCPU's slot,
mailbox head and bells, statistics block and range counts) and every enum both languages use
(`Space`, `ExitKind`, `RunState`, the C loops' result codes) is declared below. The Python
side reads its offsets from these objects; the C side includes `vms_abi.h`, generated from
them (``python -m vmsuper.shared.abi > shared/vms_abi.h``, or ``./dev abi``) and committed,
whose ``_Static_assert``s hold the C compiler's layout to the one computed here. The cffi
build declares the same structs and enums from here too (`cdef`). A test regenerates the
header and fails on any difference.

Standard library only, and nothing of vmsuper's: the build loads this file on its own, and
`vmsuper stats` reads a live run's region with no compiled code at all.
"""

from __future__ import annotations

import enum
import struct
import sys
from collections.abc import Iterable, Sequence
from typing import Final

# -- enums ------------------------------------------------------------------------------------


class Space(enum.IntEnum):
    """An address space of the guest; the values are the schema's `AddressSpace`."""

    IOPORT = 0
    MMIO = 1


class ExitKind(enum.IntEnum):
    """Exit categories a worker counts (the slot's `counters`, by this index)."""

    IO_IN = 0
    IO_OUT = 1
    MMIO_READ = 2
    MMIO_WRITE = 3
    ASYNC_WRITE = 4
    UNRESERVED = 5
    USER = 6
    HYPERV = 7
    OTHER = 8


class RunState(enum.IntEnum):
    """What a VCPU is doing, as its worker last reported (for logs and shutdown)."""

    NOT_STARTED = 0
    INIT = 1
    RUNNING = 2
    WAITING_PLUGIN = 3
    PAUSED = 4
    STOPPED = 5


class RunnerResult(enum.IntEnum):
    """Why `vms_runner_loop` returned."""

    STOP = 1
    CALL = 2
    """Another ioctl than KVM_RUN is posted: Python checks and makes it."""
    HELD_RUN = 3
    """The first KVM_RUN, held while `hold_runs` is set (the Init barrier); the next call
    makes it."""
    INTERRUPTED = 4
    FAILED = 5


class WorkerResult(enum.IntEnum):
    """Why `vms_worker_loop` returned (also what `vms_send` and `vms_receive` return besides
    0); the event is in the context (`access`, `range_index`, `delivered`, `response_ns`)."""

    RUN_RESULT = 1
    """KVM_RUN failed (EINTR for a pause...): `error` says why."""
    EXIT = 2
    """An exit that is not I/O or MMIO: Python decodes it (`kvm.decode_exit`)."""
    REQUEST = 3
    """The reply to a forwarded access was not a plain Resume: the request is in the buffer."""
    REFUSED = 4
    """... or came in a form refused with an errno (`refusal`)."""
    INTERRUPTED = 5
    HUNGUP = 6
    FAILED = 7
    """The channel failed: `error` says why."""
    TOO_LARGE = 8
    """Pipes: a request over max_request, the stream is out of step."""
    BELL_FAILED = 9
    TABLE = 10
    """The range table changed: describe it again; the exit is handled on the next call."""
    HINTED = 11
    """`access` is at the call hint: Python sends Wait{Io} with registers and serves the
    plugin until its Resume (`vms_finish_access`)."""
    DONE = 12
    """`report_exits`: `access` was completed (Python logs it), then call again."""


class Delivered(enum.IntEnum):
    """What became of the engine's last access (its context's `delivered`)."""

    NONE = 0
    """Unreserved (or a read of an async range): handled without the plugin."""
    WAIT = 1
    """Sent as Wait{Io}; the VCPU waits for the plugin's Resume."""
    NO_RESUME = 2
    """An async write, sent with no_resume."""


class Forward(enum.IntEnum):
    """Whether a runner may serve its VCPU's next exit itself (the mailbox's `forward`).

    The worker offers it (OK) before it rings for a KVM_RUN; a runner that forwards an access
    to the plugin claims it (OK to SENT, by compare-and-swap) before it sends the Wait, and
    the worker then reads the plugin's reply. A worker that finds the plugin writing while
    nothing was claimed withdraws the offer (OK to NO, by compare-and-swap)."""

    NO = 0
    OK = 1
    SENT = 2


class Sleeping(enum.IntEnum):
    """How a bell's waiter sleeps (its `sleeping`), so that the ring wakes it the right way."""

    AWAKE = 0
    ON_PIPE = 1
    """In a read of the bell's pipe: the ring writes it."""
    IN_READ = 2
    """A worker in the read of its plugin's channel, while its runner may serve the exit
    (`hotpath.c`'s await_run): the runner's ring sends it `WAKE_SIGNAL` through its pidfd."""


class HintFlag(enum.IntFlag):
    """The table head's `hint_flags`."""

    SET = 1
    ON_WRITE = 2


class RegHintFlag(enum.IntFlag):
    """A register hint's `flags`."""

    MATCH_RAX = 1
    MATCH_RBX = 2
    MATCH_RCX = 4
    MATCH_RDX = 8
    SEND_SREGS = 16
    SEND_DEBUGREGS = 32


ENUMS: Final[dict[type[enum.IntEnum | enum.IntFlag], tuple[str, str]]] = {
    # Python enum: (C enum tag, prefix of its constants).
    Space: ("vms_space", "SPACE_"),
    ExitKind: ("vms_exit_kind", "K_"),
    RunState: ("vms_run_state", "RUN_STATE_"),
    RunnerResult: ("vms_runner_result", "R_"),
    WorkerResult: ("vms_worker_result", "W_"),
    Delivered: ("vms_delivered", "DELIVERED_"),
    Forward: ("vms_forward", "FORWARD_"),
    Sleeping: ("vms_sleeping", "BELL_"),
    HintFlag: ("vms_hint_flag", "HINT_"),
    RegHintFlag: ("vms_reg_hint_flag", "REG_HINT_"),
}

# -- structs ----------------------------------------------------------------------------------

_SCALARS: Final = {
    # C type: (size, struct module code)
    "uint8_t": (1, "B"),
    "char": (1, "c"),
    "uint16_t": (2, "H"),
    "uint32_t": (4, "I"),
    "int32_t": (4, "i"),
    "uint64_t": (8, "Q"),
    "int64_t": (8, "q"),
}


class Field:
    """One member of a shared-memory `Struct` (a plain class: a dataclass would compile its
    methods at every start-up)."""

    __slots__ = ("count", "ctype", "doc", "name")
    name: Final[str]
    ctype: Final[str]
    """A scalar of `_SCALARS`, or another `Struct` by its C name ("struct vms_bell")."""
    count: Final[int]
    """An array of this many (0: not an array)."""
    doc: Final[str]

    def __init__(self, name: str, ctype: str, count: int = 0, doc: str = "") -> None:
        self.name = name
        self.ctype = ctype
        self.count = count
        self.doc = doc


class Struct:
    """A C struct laid out as the C compiler lays it out on x86-64 (natural alignment)."""

    def __init__(self, name: str, doc: str, fields: Sequence[Field]) -> None:
        self.name = name
        self.ctype = f"struct {name}"
        self.doc = doc
        self.fields = tuple(fields)
        self._offsets: dict[str, int] = {}
        offset = 0
        align = 1
        for f in self.fields:
            size, field_align = _size_align(f.ctype)
            offset = round_up(offset, field_align)
            self._offsets[f.name] = offset
            offset += size * max(1, f.count)
            align = max(align, field_align)
        self.align = align
        self.size = round_up(offset, align)
        _STRUCTS[self.ctype] = self

    def offset(self, name: str) -> int:
        """The byte offset of field `name`."""
        return self._offsets[name]

    def cell(self, name: str) -> int:
        """The offset of 64-bit field `name` in 8-byte cells (Python reads them as ``Q``)."""
        offset = self._offsets[name]
        assert offset % 8 == 0, f"{self.name}.{name} is not a 64-bit cell"
        return offset // 8

    def field(self, name: str) -> Field:
        return next(f for f in self.fields if f.name == name)

    def codec(self, names: Iterable[str]) -> struct.Struct:
        """A `struct.Struct` that packs the named scalar fields, in this order of offsets,
        from the first one's offset (padding between them is skipped)."""
        chosen = sorted((self._offsets[n], self.field(n)) for n in names)
        start = chosen[0][0]
        fmt, at = "<", start
        for offset, f in chosen:
            size, code = _SCALARS[f.ctype]
            gap = offset - at
            fmt += (f"{gap}x" if gap > 1 else "x" * gap) + code * max(1, f.count)
            at = offset + size * max(1, f.count)
        return struct.Struct(fmt)

    def c_definition(self) -> str:
        lines = [f"/* {self.doc} */", f"{self.ctype} {{"]
        for f in self.fields:
            array = f"[{f.count}]" if f.count else ""
            note = f" /* {f.doc} */" if f.doc else ""
            lines.append(f"    {f.ctype} {f.name}{array};{note}")
        lines.append("};")
        return "\n".join(lines)

    def c_asserts(self) -> str:
        checks = [(f"offsetof({self.ctype}, {f.name})", self._offsets[f.name]) for f in self.fields]
        checks.append((f"sizeof({self.ctype})", self.size))
        return "\n".join(f'_Static_assert({what} == {value}, "{what}");' for what, value in checks)


_STRUCTS: dict[str, Struct] = {}


def _size_align(ctype: str) -> tuple[int, int]:
    if ctype in _SCALARS:
        size = _SCALARS[ctype][0]
        return size, size
    inner = _STRUCTS[ctype]
    return inner.size, inner.align


def round_up(value: int, align: int) -> int:
    return (value + align - 1) // align * align


CACHE_LINE: Final = 64
HISTOGRAM_BUCKETS: Final = 48
"""Response-time buckets: bucket b counts times of `b` significant bits in nanoseconds, i.e.
in [2**(b-1), 2**b) ns (bucket 0: 0 ns); the last one also takes everything longer (2**47 ns
is 39 hours)."""
STOP_REASON_SIZE: Final = 128
MAILBOX_ARG_SIZE: Final = 64 * 1024
"""Bytes of ioctl argument a mailbox carries: more than `kvm_cpuid2` with KVM's 256 entries
(10 KiB), `kvm_msrs` with 4000 entries, `kvm_lapic_state` or `kvm_xsave`."""
MAILBOX_ARG_OFFSET: Final = CACHE_LINE
"""Where a mailbox's argument area starts, after its head."""
WAKE_SIGNAL: Final = 23
"""SIGURG (23 on Linux): what a runner sends its worker asleep in a read (`Sleeping.IN_READ`).
Nothing else sends it (no socket here has an owner for out-of-band data), and its default
action is to ignore it, so one that reaches a process without the handler harms nothing."""

U64 = "uint64_t"

REGION_HEADER = Struct(
    "vms_region_header",
    "The region's first bytes: what it holds and where (offsets in bytes from the start).",
    [
        Field("magic", "uint32_t"),
        Field("version", "uint32_t"),
        Field("vcpus", "uint32_t"),
        Field("max_ranges", "uint32_t"),
        Field("max_hints", "uint32_t"),
        Field("pad", "uint32_t"),
        Field("size", U64),
        Field("table", U64),
        Field("vcpu_blocks", U64, doc="VCPU 0's block; each is page-aligned"),
        Field("vcpu_block_size", U64),
        Field("mailbox", U64, doc="offset in a VCPU's block"),
        Field("slot", U64, doc="offset in a VCPU's block"),
        Field("stats", U64, doc="offset in a VCPU's block"),
        Field("range_counts", U64, doc="offset in a VCPU's block"),
    ],
)

TABLE = Struct(
    "vms_table",
    "The reserved ranges and the call hint: the seqlock generation alone on its cache line, "
    "then the payload: this head, max_hints struct vms_reg_hint, max_ranges struct "
    "vms_table_range.",
    [
        Field("gen", U64, doc="odd while the supervisor writes"),
        Field("gen_line", U64, 7),
        Field("count", "uint32_t", doc="ranges"),
        Field("n_hints", "uint16_t"),
        Field("hint_space", "uint8_t"),
        Field("hint_flags", "uint8_t", doc="enum vms_hint_flag"),
        Field("hint_address", U64),
    ],
)
TABLE_PAYLOAD: Final = TABLE.offset("count")

REG_HINT = Struct(
    "vms_reg_hint",
    "One register hint of the call hint.",
    [
        Field("flags", "uint8_t", doc="enum vms_reg_hint_flag"),
        Field("pad", "uint8_t", 7),
        Field("rax", U64),
        Field("rbx", U64),
        Field("rcx", U64),
        Field("rdx", U64),
    ],
)

TABLE_RANGE = Struct(
    "vms_table_range",
    "One reserved range in the table.",
    [
        Field("space", "uint8_t"),
        Field("async_write", "uint8_t"),
        Field("pad", "uint8_t", 6),
        Field("start", U64),
        Field("length", U64),
    ],
)

SLOT = Struct(
    "vms_slot",
    "A VCPU's cells: the pause hand-off, its run state, its exit counters, why it stopped.",
    [
        Field("pause_seq", U64, doc="written by the supervisor"),
        Field("pause_token", U64, 2, doc="the token for seq s is at s & 1"),
        Field("delivered_seq", U64, doc="written by the worker"),
        Field("run_state", U64, doc="enum vms_run_state"),
        Field("counters", U64, len(ExitKind), doc="by enum vms_exit_kind"),
        Field("trapped_syscall", U64, doc="a confined worker's trapped system call + 1 (0: none)"),
        Field("runner_served", U64, doc="exits the runner served without waking the worker"),
        Field("stop_reason", "char", STOP_REASON_SIZE, doc="UTF-8, NUL-padded"),
    ],
)

BELL = Struct(
    "vms_bell",
    "One direction of a doorbell: rings so far, and how the waiter sleeps (Sleeping).",
    [Field("seq", "uint32_t"), Field("sleeping", "uint32_t")],
)

MAIL = Struct(
    "vms_mail",
    "A mailbox's head: the ioctl a worker asks its runner for, the result, and the doorbell's "
    "two bells; the argument area follows at MAILBOX_ARG_OFFSET.",
    [
        Field("op", "uint32_t", doc="0: KVM_RUN, else the ioctl's request number"),
        Field("length", "uint32_t", doc="bytes of argument"),
        Field("ret", "int64_t"),
        Field("err", "int32_t"),
        Field("poll_ns", "uint32_t", doc="how long its runner and worker poll now (ns)"),
        Field("forward", U64, doc="enum vms_forward"),
        Field("request", "struct vms_bell"),
        Field("done", "struct vms_bell"),
    ],
)

STATS = Struct(
    "vms_stats",
    "A VCPU's statistics, read by `vmsuper stats`: since when it waits on the plugin "
    "(CLOCK_MONOTONIC ns), then the plugin's response times to exits: count, sum, max and a "
    "log2 histogram (bucket b: times of b significant bits in ns; the last takes the rest); "
    "last, a moving average of those the worker polled for, for the hot path's choices.",
    [
        Field("wait_since", U64),
        Field("responses", U64),
        Field("response_sum_ns", U64),
        Field("response_max_ns", U64),
        Field("buckets", U64, HISTOGRAM_BUCKETS),
        Field(
            "recent_response_ns",
            U64,
            doc="a moving average (by eighths), each time capped (hotpath.c: REPLY_SAMPLE_MAX_NS)",
        ),
    ],
)

RANGE_COUNTS = Struct(
    "vms_range_counts",
    "A VCPU's forwarded exits per range, under a seqlock of its worker's: this head, then "
    "max_ranges struct vms_counted_range, then max_ranges uint64_t counters. The head also "
    "says which table the ranges come from and its call hint, for the runner's lookups.",
    [
        Field("gen", U64, doc="odd while the worker writes"),
        Field("count", U64),
        Field("table_gen", U64, doc="the table's generation the ranges describe"),
        Field("hint_set", U64),
        Field("hint_space", U64),
        Field("hint_address", U64),
        Field("hint_on_write", U64),
    ],
)

COUNTED_RANGE = Struct(
    "vms_counted_range",
    "A reserved range as the worker's engine looks it up, and whose exits are counted.",
    [
        Field("space", U64),
        Field("start", U64),
        Field("length", U64),
        Field("async_write", U64, doc="1: writes go to the plugin without waiting"),
    ],
)

STRUCTS: Final = tuple(_STRUCTS.values())

MAGIC: Final = 0x48534D56  # "VMSH"
VERSION: Final = 6
"""The region's layout version: a `vmsuper stats` of another version refuses to read it."""

CONSTANTS: Final = {
    "VMS_REGION_MAGIC": MAGIC,
    "VMS_REGION_VERSION": VERSION,
    "VMS_BUCKETS": HISTOGRAM_BUCKETS,
    "VMS_STOP_REASON_SIZE": STOP_REASON_SIZE,
    "VMS_MAILBOX_ARG_OFFSET": MAILBOX_ARG_OFFSET,
    "VMS_MAILBOX_ARG_SIZE": MAILBOX_ARG_SIZE,
    "VMS_WAKE_SIGNAL": WAKE_SIGNAL,
}

# -- the C header and the cffi declarations ----------------------------------------------------

COMMAND: Final = "python -m vmsuper.shared.abi > shared/vms_abi.h"


def _c_enum(enum_type: type[enum.IntEnum | enum.IntFlag]) -> str:
    tag, prefix = ENUMS[enum_type]
    body = "".join(f"    {prefix}{m.name} = {int(m)},\n" for m in enum_type)
    return f"enum {tag} {{\n{body}}};"


def header() -> str:
    """vms_abi.h: every struct, enum and constant above, and asserts of every offset."""
    parts = [
        f"/* Generated by vmsuper/shared/abi.py: do not edit; regenerate with\n"
        f" *   {COMMAND}\n"
        f" * The layouts and values below are shared with Python; the asserts hold the\n"
        f" * compiler's layout to the one abi.py computes. */",
        "#ifndef VMS_ABI_H\n#define VMS_ABI_H\n\n#include <stddef.h>\n#include <stdint.h>",
        "\n".join(f"#define {name} {value}" for name, value in CONSTANTS.items()),
        *(_c_enum(e) for e in ENUMS),
        *(s.c_definition() for s in STRUCTS),
        *(s.c_asserts() for s in STRUCTS),
        "#endif",
    ]
    return "\n\n".join(parts) + "\n"


def cdef() -> str:
    """The same declarations for cffi (which checks them against the compiled header)."""
    parts = [f"#define {name} {value}" for name, value in CONSTANTS.items()]
    parts += [_c_enum(e) for e in ENUMS]
    parts += [s.c_definition() for s in STRUCTS]
    return "\n".join(parts) + "\n"


if __name__ == "__main__":
    sys.stdout.write(header())
