"""shared/kvm.py against the kernel's own header, plus its in-memory behaviour.

A C program generated from the ctypes definitions prints `sizeof`/`offsetof` of every struct
and field (nested and anonymous members by their C path), the bit pattern of every bitfield,
and the value of every constant and ioctl number; it is compiled against
`/usr/include/linux/kvm.h` and its output compared with what ctypes computes.
"""

from __future__ import annotations

import ctypes
import errno
import pickle
import re
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from vmsuper.shared import kvm

# Every kernel struct the module mirrors, by its C name. Helper types (named anonymous
# members such as kvm_run_io) are reached through these.
ROOTS: list[type[ctypes.Structure]] = [
    kvm.kvm_regs,
    kvm.kvm_segment,
    kvm.kvm_dtable,
    kvm.kvm_sregs,
    kvm.kvm_fpu,
    kvm.kvm_debugregs,
    kvm.kvm_lapic_state,
    kvm.kvm_mp_state,
    kvm.kvm_xcr,
    kvm.kvm_xcrs,
    kvm.kvm_vcpu_events,
    kvm.kvm_msr_entry,
    kvm.kvm_msrs,
    kvm.kvm_msr_list,
    kvm.kvm_cpuid_entry2,
    kvm.kvm_cpuid2,
    kvm.kvm_pic_state,
    kvm.kvm_ioapic_state,
    kvm.kvm_irqchip,
    kvm.kvm_pit_channel_state,
    kvm.kvm_pit_state2,
    kvm.kvm_pit_config,
    kvm.kvm_clock_data,
    kvm.kvm_irq_level,
    kvm.kvm_irq_routing_irqchip,
    kvm.kvm_irq_routing_msi,
    kvm.kvm_irq_routing_hv_sint,
    kvm.kvm_irq_routing_entry,
    kvm.kvm_irq_routing,
    kvm.kvm_irqfd,
    kvm.kvm_ioeventfd,
    kvm.kvm_userspace_memory_region,
    kvm.kvm_dirty_log,
    kvm.kvm_enable_cap,
    kvm.kvm_debug_exit_arch,
    kvm.kvm_hyperv_exit,
    kvm.kvm_sync_regs,
    kvm.kvm_run,
]

_SIGNED_CODES = set("bhilq")
_UNSIGNED_CODES = set("BHILQ")


@dataclass(frozen=True)
class Member:
    path: str
    offset: int
    size: int  # 0 for a flexible array member (C cannot take its sizeof)
    signed: int  # 1 signed, 0 unsigned, -1 not a scalar integer
    flexible: bool


@dataclass(frozen=True)
class BitField:
    path: str
    width: int


def _is_aggregate(ctype: Any) -> bool:
    return isinstance(ctype, type) and issubclass(ctype, ctypes.Structure | ctypes.Union)


def _is_array(ctype: Any) -> bool:
    return isinstance(ctype, type) and issubclass(ctype, ctypes.Array)


def _signedness(ctype: Any) -> int:
    code = getattr(ctype, "_type_", None)
    if isinstance(code, str) and code in _SIGNED_CODES:
        return 1
    if isinstance(code, str) and code in _UNSIGNED_CODES:
        return 0
    return -1


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def walk(cls: Any, prefix: str = "", base: int = 0) -> Iterator[Member | BitField]:
    """Every member of `cls`, by C path, with ctypes' offset from the root and size."""
    anonymous = set(getattr(cls, "_anonymous_", ()))
    for entry in cls._fields_:
        name, ctype = entry[0], entry[1]
        offset = base + getattr(cls, name).offset
        path = prefix if name in anonymous else _join(prefix, name)
        if len(entry) == 3:
            yield BitField(path, entry[2])
            continue
        if name not in anonymous:
            flexible = _is_array(ctype) and ctype._length_ == 0
            size = 0 if flexible else ctypes.sizeof(ctype)
            yield Member(path, offset, size, _signedness(ctype), flexible)
        yield from _walk_type(ctype, path, offset)


def _walk_type(ctype: Any, path: str, offset: int) -> Iterator[Member | BitField]:
    if _is_aggregate(ctype):
        yield from walk(ctype, path, offset)
    elif _is_array(ctype):
        element = ctype._type_
        if _is_aggregate(element) or _is_array(element):
            element_path = f"{path}[0]"
            yield Member(element_path, offset, ctypes.sizeof(element), -1, False)
            yield from _walk_type(element, element_path, offset)


def nested_types(cls: Any) -> Iterator[type]:
    for entry in cls._fields_:
        ctype = entry[1]
        while _is_array(ctype):
            ctype = ctype._type_
        if _is_aggregate(ctype):
            yield ctype
            yield from nested_types(ctype)


def constants() -> dict[str, int]:
    return {
        name: value
        for name, value in vars(kvm).items()
        if (name.startswith("KVM_") or name == "KVMIO")
        and isinstance(value, int)
        and not isinstance(value, bool)
    }


def _c_string(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _bitfield_mask(width: int) -> int:
    return (1 << width) - 1


def c_program() -> str:
    lines = [
        "#include <linux/kvm.h>",
        "#include <stddef.h>",
        "#include <stdio.h>",
        "#include <string.h>",
        "",
        "static void dump(const char *tag, const void *p, size_t n) {",
        "    const unsigned char *b = p;",
        '    printf("B %s ", tag);',
        '    for (size_t i = 0; i < n; i++) printf("%02x", b[i]);',
        '    printf("\\n");',
        "}",
        "",
        "int main(void) {",
    ]
    for root in ROOTS:
        c_type = f"struct {root.__name__}"
        name = root.__name__
        lines.append(f'    printf("S %s %zu\\n", {_c_string(name)}, sizeof({c_type}));')
        for item in walk(root):
            tag = _c_string(f"{name}.{item.path}")
            if isinstance(item, BitField):
                lines += [
                    "    {",
                    f"        {c_type} v;",
                    "        memset(&v, 0, sizeof v);",
                    # All ones at the header's own width: 0 - 1 wraps modulo 2**width.
                    f"        v.{item.path} = 0;",
                    f"        v.{item.path}--;",
                    f"        dump({tag}, &v, sizeof v);",
                    "    }",
                ]
                continue
            member = f"((({c_type} *)0)->{item.path})"
            size = "(size_t)0" if item.flexible else f"sizeof{member}"
            signed = "-1" if item.signed < 0 else f"(int)((__typeof__{member})-1 < 0)"
            lines.append(
                f'    printf("M %s %zu %zu %d\\n", {tag}, offsetof({c_type}, {item.path}), '
                f"{size}, {signed});"
            )
    for const_name in constants():
        lines.append(
            f'    printf("C %s %llu\\n", {_c_string(const_name)}, '
            f"(unsigned long long)({const_name}));"
        )
    lines += ["    return 0;", "}", ""]
    return "\n".join(lines)


@dataclass
class HeaderFacts:
    sizes: dict[str, int]
    members: dict[str, tuple[int, int, int]]
    bitfields: dict[str, str]
    constants: dict[str, int]


@pytest.fixture(scope="module")
def header(tmp_path_factory: pytest.TempPathFactory) -> HeaderFacts:
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        pytest.fail("a C compiler (cc) is needed to check the KVM layouts")
    if not Path("/usr/include/linux/kvm.h").exists():
        pytest.fail("/usr/include/linux/kvm.h is needed (linux-libc-dev)")
    tmp = tmp_path_factory.mktemp("kvm_layout")
    source = tmp / "layout.c"
    binary = tmp / "layout"
    source.write_text(c_program())
    build = subprocess.run(
        [compiler, "-std=gnu11", "-Wall", "-Werror", "-o", str(binary), str(source)],
        capture_output=True,
        text=True,
    )
    assert build.returncode == 0, f"layout program does not compile:\n{build.stderr[-4000:]}"
    run = subprocess.run([str(binary)], capture_output=True, text=True, check=True)
    facts = HeaderFacts({}, {}, {}, {})
    for line in run.stdout.splitlines():
        kind, name, *rest = line.split(" ")
        if kind == "S":
            facts.sizes[name] = int(rest[0])
        elif kind == "M":
            facts.members[name] = (int(rest[0]), int(rest[1]), int(rest[2]))
        elif kind == "B":
            facts.bitfields[name] = rest[0]
        elif kind == "C":
            facts.constants[name] = int(rest[0])
    return facts


def test_struct_sizes_match_the_header(header: HeaderFacts) -> None:
    ours = {root.__name__: ctypes.sizeof(root) for root in ROOTS}
    assert ours == header.sizes


def test_every_field_offset_size_and_signedness_matches(header: HeaderFacts) -> None:
    ours = {
        f"{root.__name__}.{m.path}": (m.offset, m.size, m.signed)
        for root in ROOTS
        for m in walk(root)
        if isinstance(m, Member)
    }
    assert len(ours) > 500  # the walk really reaches nested members
    mismatches = {k: (v, header.members.get(k)) for k, v in ours.items() if header.members[k] != v}
    assert mismatches == {}
    assert set(ours) == set(header.members)


def test_run_page_landmarks(header: HeaderFacts) -> None:
    # Spot checks with the C paths written out, so the walk itself is checked too.
    for path in (
        "kvm_run.immediate_exit",
        "kvm_run.exit_reason",
        "kvm_run.io.port",
        "kvm_run.io.data_offset",
        "kvm_run.mmio.data",
        "kvm_run.hyperv.u.hcall.params",
        "kvm_run.internal.data",
        "kvm_run.fail_entry.cpu",
        "kvm_run.system_event.flags",
        "kvm_run.kvm_valid_regs",
        "kvm_run.s.regs.events",
        "kvm_irq_level.irq",
        "kvm_dirty_log.dirty_bitmap",
        "kvm_msrs.entries[0].data",
    ):
        assert path in header.members
    assert (
        header.members["kvm_run.io.port"][0] == kvm.kvm_run.io.offset + kvm.kvm_run_io.port.offset
    )
    assert header.sizes["kvm_run"] == ctypes.sizeof(kvm.kvm_run)


def _set_path(obj: Any, path: str, value: int) -> None:
    parts = re.findall(r"[A-Za-z_0-9]+|\[\d+\]", path)
    for part in parts[:-1]:
        obj = obj[int(part[1:-1])] if part.startswith("[") else getattr(obj, part)
    setattr(obj, parts[-1], value)


def test_bitfields_occupy_the_same_bits(header: HeaderFacts) -> None:
    checked = 0
    for root in ROOTS:
        for item in walk(root):
            if not isinstance(item, BitField):
                continue
            value = root()
            _set_path(value, item.path, _bitfield_mask(item.width))
            assert bytes(value).hex() == header.bitfields[f"{root.__name__}.{item.path}"], item
            checked += 1
    assert checked == len(header.bitfields) > 0


def test_constants_and_ioctl_numbers_match(header: HeaderFacts) -> None:
    ours = {name: value & 0xFFFF_FFFF_FFFF_FFFF for name, value in constants().items()}
    assert ours == header.constants
    required = [
        "KVM_GET_API_VERSION",
        "KVM_CREATE_VM",
        "KVM_CHECK_EXTENSION",
        "KVM_GET_VCPU_MMAP_SIZE",
        "KVM_GET_SUPPORTED_CPUID",
        "KVM_GET_EMULATED_CPUID",
        "KVM_GET_MSR_INDEX_LIST",
        "KVM_CREATE_VCPU",
        "KVM_SET_USER_MEMORY_REGION",
        "KVM_SET_TSS_ADDR",
        "KVM_SET_IDENTITY_MAP_ADDR",
        "KVM_CREATE_IRQCHIP",
        "KVM_GET_IRQCHIP",
        "KVM_SET_IRQCHIP",
        "KVM_IRQ_LINE",
        "KVM_CREATE_PIT2",
        "KVM_GET_PIT2",
        "KVM_SET_PIT2",
        "KVM_GET_CLOCK",
        "KVM_SET_CLOCK",
        "KVM_SET_GSI_ROUTING",
        "KVM_IRQFD",
        "KVM_IOEVENTFD",
        "KVM_GET_DIRTY_LOG",
        "KVM_ENABLE_CAP",
        "KVM_RUN",
        "KVM_GET_REGS",
        "KVM_SET_REGS",
        "KVM_GET_SREGS",
        "KVM_SET_SREGS",
        "KVM_GET_FPU",
        "KVM_SET_FPU",
        "KVM_GET_DEBUGREGS",
        "KVM_SET_DEBUGREGS",
        "KVM_GET_LAPIC",
        "KVM_SET_LAPIC",
        "KVM_GET_MP_STATE",
        "KVM_SET_MP_STATE",
        "KVM_GET_XCRS",
        "KVM_SET_XCRS",
        "KVM_GET_VCPU_EVENTS",
        "KVM_SET_VCPU_EVENTS",
        "KVM_GET_MSRS",
        "KVM_SET_MSRS",
        "KVM_SET_CPUID2",
        "KVM_GET_SUPPORTED_HV_CPUID",
    ]
    for name in required:
        assert name in header.constants, name
        assert kvm.IOCTLS[name] == header.constants[name]


def test_every_defined_type_is_checked() -> None:
    reached = set(ROOTS)
    for root in ROOTS:
        reached.update(nested_types(root))
    defined = {
        value
        for value in vars(kvm).values()
        if _is_aggregate(value) and value.__module__ == kvm.__name__
    }
    assert defined - reached == set()


def test_ioctl_table_is_consistent() -> None:
    for name, number in kvm.IOCTLS.items():
        assert getattr(kvm, name) == number
        assert kvm.IOCTL_NAMES[number] == name
        assert (number >> 8) & 0xFF == kvm.KVMIO
    assert kvm.ioctl_name(kvm.KVM_RUN) == "KVM_RUN"
    assert kvm.ioctl_name(0xAEFF) == "ioctl 0xaeff"


# --- in-memory behaviour: buffers, errors, exit decoding -------------------------------------


def test_flexible_buffers_have_room_and_count() -> None:
    buf = kvm.msrs_buffer(3)
    assert buf.nmsrs == 3
    assert ctypes.sizeof(buf) == ctypes.sizeof(kvm.kvm_msrs) + 3 * ctypes.sizeof(kvm.kvm_msr_entry)
    buf.entries[2].data = 7
    assert kvm.msr_list_buffer(5).nmsrs == 5
    assert ctypes.sizeof(kvm.msr_list_buffer(5)) == 4 + 5 * 4
    assert ctypes.sizeof(kvm.cpuid2_buffer(2)) == 8 + 2 * 40
    routing = kvm.irq_routing_buffer(4096)
    assert routing.nr == 4096 and ctypes.sizeof(routing) == 8 + 4096 * 48
    with pytest.raises(ValueError, match="non-negative"):
        kvm.cpuid2_buffer(-1)


def test_kvm_error_carries_errno_and_name() -> None:
    exc = kvm.KvmError(errno.EINVAL, "KVM_SET_REGS")
    assert isinstance(exc, OSError)
    assert exc.errno == errno.EINVAL
    assert exc.ioctl == "KVM_SET_REGS"
    assert str(exc) == "KVM_SET_REGS failed: [Errno 22] Invalid argument"
    copy = pickle.loads(pickle.dumps(exc))
    assert (type(copy), copy.errno, copy.ioctl) == (kvm.KvmError, errno.EINVAL, "KVM_SET_REGS")
    missing = kvm.KvmUnavailable(errno.ENOENT, "/nowhere/kvm")
    assert isinstance(missing, kvm.KvmError)
    assert str(missing) == "cannot use KVM device /nowhere/kvm: No such file or directory"


def test_ioctl_failure_names_the_call(tmp_path: Path) -> None:
    with open(tmp_path / "plain", "w") as f, pytest.raises(kvm.KvmError) as info:
        kvm.ioctl(f.fileno(), kvm.KVM_GET_REGS, kvm.kvm_regs())
    assert info.value.errno == errno.ENOTTY
    assert str(info.value).startswith("KVM_GET_REGS failed: [Errno 25]")
    with pytest.raises(kvm.KvmError) as info:
        kvm.ioctl(-1, 0xAEFF)
    assert info.value.errno == errno.EBADF
    assert info.value.ioctl == "ioctl 0xaeff"


def test_address_of_accepts_ctypes_buffers_and_ints() -> None:
    regs = kvm.kvm_regs()
    assert kvm.address_of(regs) == ctypes.addressof(regs)
    assert kvm.address_of(0x1234) == 0x1234
    assert kvm.address_of(None) == 0
    data = bytearray(16)
    address = kvm.address_of(data)
    ctypes.memmove(address, b"\x2a", 1)
    assert data[0] == 0x2A
    with pytest.raises(TypeError):
        kvm.address_of(b"read-only")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        kvm.address_of(True)


def test_dirty_log_size_is_whole_words() -> None:
    assert kvm.dirty_log_size(4096) == 8
    assert kvm.dirty_log_size(64 * 4096) == 8
    assert kvm.dirty_log_size(65 * 4096) == 16
    assert kvm.dirty_log_size(1) == 8


def test_routes() -> None:
    chip = kvm.irqchip_route(5, kvm.KVM_IRQCHIP_IOAPIC, 5)
    assert (chip.gsi, chip.type, chip.u.irqchip.irqchip, chip.u.irqchip.pin) == (5, 1, 2, 5)
    msi = kvm.msi_route(40, 0x1_FEE0_0000, 0x4041)
    assert (msi.type, msi.u.msi.address_lo, msi.u.msi.address_hi, msi.u.msi.data) == (
        kvm.KVM_IRQ_ROUTING_MSI,
        0xFEE0_0000,
        1,
        0x4041,
    )


def _run(reason: int) -> kvm.kvm_run:
    run = kvm.kvm_run()
    run.exit_reason = reason
    return run


def test_io_and_mmio_are_left_to_the_exit_engine() -> None:
    # One decoder for them: the exit engine's (hotpath.c, tests/test_vcpu_worker.py).
    assert kvm.decode_exit(_run(kvm.KVM_EXIT_IO)) == kvm.OtherExit(kvm.KVM_EXIT_IO)
    assert kvm.decode_exit(_run(kvm.KVM_EXIT_MMIO)) == kvm.OtherExit(kvm.KVM_EXIT_MMIO)


def test_decode_hyperv_and_failures() -> None:
    run = _run(kvm.KVM_EXIT_HYPERV)
    run.hyperv.type = kvm.KVM_EXIT_HYPERV_SYNIC
    synic = run.hyperv.u.synic
    synic.msr, synic.control, synic.evt_page, synic.msg_page = 0x40000080, 1, 0x2000, 0x3000
    assert kvm.decode_exit(run) == kvm.HypervSynicExit(0x40000080, 1, 0x2000, 0x3000)
    run.hyperv.type = kvm.KVM_EXIT_HYPERV_HCALL
    hcall = run.hyperv.u.hcall
    hcall.input, hcall.params[0], hcall.params[1] = 0x10001, 5, 6
    assert kvm.decode_exit(run) == kvm.HypervHcallExit(0x10001, 5, 6)
    run.hyperv.type = kvm.KVM_EXIT_HYPERV_SYNDBG
    assert kvm.decode_exit(run) == kvm.OtherExit(kvm.KVM_EXIT_HYPERV)

    run = _run(kvm.KVM_EXIT_INTERNAL_ERROR)
    run.internal.suberror, run.internal.ndata = kvm.KVM_INTERNAL_ERROR_EMULATION, 2
    run.internal.data[0], run.internal.data[1], run.internal.data[2] = 7, 8, 9
    assert kvm.decode_exit(run) == kvm.InternalErrorExit(1, (7, 8))
    run.internal.ndata = 1000  # never trust the count beyond the array
    decoded = kvm.decode_exit(run)
    assert isinstance(decoded, kvm.InternalErrorExit) and len(decoded.data) == 16

    # An emulation failure with instruction bytes: flags, then their size and the bytes.
    run = _run(kvm.KVM_EXIT_INTERNAL_ERROR)
    failure = run.emulation_failure
    failure.suberror, failure.ndata = kvm.KVM_INTERNAL_ERROR_EMULATION, 3
    failure.flags = kvm.KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES
    failure.insn_size = 2
    failure.insn_bytes[0], failure.insn_bytes[1], failure.insn_bytes[2] = 0xCD, 0x03, 0x90
    decoded = kvm.decode_exit(run)
    assert isinstance(decoded, kvm.InternalErrorExit)
    assert (decoded.name, decoded.insn_bytes) == ("emulation failure", b"\xcd\x03")
    failure.flags = 0  # no bytes unless the flags say so
    assert kvm.decode_exit(run).insn_bytes == b""  # type: ignore[union-attr]
    failure.flags, failure.ndata = kvm.KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES, 1
    assert kvm.decode_exit(run).insn_bytes == b""  # type: ignore[union-attr]
    failure.suberror, failure.ndata = kvm.KVM_INTERNAL_ERROR_DELIVERY_EV, 3
    decoded = kvm.decode_exit(run)
    assert isinstance(decoded, kvm.InternalErrorExit)
    assert (decoded.name, decoded.insn_bytes) == ("event delivery failed", b"")

    assert kvm.entry_failure_name(0x80000021) == "invalid guest state"
    assert kvm.entry_failure_name(0x80000022) == "MSR loading failed"
    assert kvm.entry_failure_name(0x21) is None  # not an Intel entry failure
    assert kvm.entry_failure_name((1 << 64) - 1) is None  # AMD's VMEXIT_INVALID

    run = _run(kvm.KVM_EXIT_FAIL_ENTRY)
    run.fail_entry.hardware_entry_failure_reason, run.fail_entry.cpu = 0x80000021, 3
    assert kvm.decode_exit(run) == kvm.FailEntryExit(0x80000021, 3)
    assert kvm.decode_exit(_run(kvm.KVM_EXIT_SHUTDOWN)) == kvm.ShutdownExit()
    assert kvm.decode_exit(_run(kvm.KVM_EXIT_HLT)) == kvm.HltExit()
    assert kvm.decode_exit(_run(kvm.KVM_EXIT_INTR)) == kvm.OtherExit(kvm.KVM_EXIT_INTR)


def test_decoded_exits_are_values_of_every_field() -> None:
    """Equal (and of equal hashes) when of one kind and every field is, different when any one
    differs; printed field by field; the field-less kinds differ from each other."""
    exits: list[kvm.Exit] = [
        kvm.HypervSynicExit(1, 2, 3, 4),
        kvm.HypervHcallExit(1, 2, 3),
        kvm.InternalErrorExit(1, (2, 3), b"\x90"),
        kvm.FailEntryExit(1, 2),
        kvm.ShutdownExit(),
        kvm.HltExit(),
        kvm.OtherExit(1),
    ]
    for exit_ in exits:
        fields: dict[str, Any] = {name: getattr(exit_, name) for name in exit_.__match_args__}
        twin = type(exit_)(**fields)
        assert twin == exit_ and hash(twin) == hash(exit_)
        assert [e for e in exits if e == exit_] == [exit_]
        for name, value in fields.items():
            changed = value * 2 if isinstance(value, tuple | bytes) else value + 1
            assert type(exit_)(**{**fields, name: changed}) != exit_, name
    assert repr(exits[2]) == "InternalErrorExit(suberror=1, data=(2, 3), insn_bytes=b'\\x90')"
    assert repr(kvm.HltExit()) == "HltExit()"


def test_missing_device_is_a_typed_error(tmp_path: Path) -> None:
    with pytest.raises(kvm.KvmUnavailable) as info:
        kvm.Kvm(str(tmp_path / "absent"))
    assert info.value.errno == errno.ENOENT
    assert str(tmp_path / "absent") in str(info.value)
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(kvm.KvmUnavailable, match="not a KVM device"):
        kvm.Kvm(str(tmp_path / "file"))
