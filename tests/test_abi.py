"""The shared-memory ABI's single source (`abi.py`) against its two consumers: the committed
C header must be what abi.py generates, the C compiler must lay every struct out as abi.py
computes (the header's asserts, and the cffi module's offsets), and hotpath.c must define
none of it itself."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from vmsuper.shared import abi, hotpath

SHARED = Path(abi.__file__).resolve().parent
HEADER = SHARED / "vms_abi.h"


def test_the_committed_header_is_what_abi_py_generates() -> None:
    assert HEADER.read_text() == abi.header(), (
        f"shared/vms_abi.h is stale: regenerate it with `{abi.COMMAND}` (or `./dev abi`)"
    )


def test_the_module_generates_the_header(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "vmsuper.shared.abi"], capture_output=True, text=True, cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == abi.header()


@pytest.mark.parametrize("struct", abi.STRUCTS, ids=lambda s: s.name)
def test_the_compiled_module_lays_out_each_struct_as_abi_py(struct: abi.Struct) -> None:
    ffi = hotpath.binding().ffi
    for field in struct.fields:
        assert ffi.offsetof(struct.ctype, field.name) == struct.offset(field.name), field.name
    assert ffi.sizeof(struct.ctype) == struct.size
    assert ffi.alignof(struct.ctype) == struct.align


def test_the_compiled_module_has_abi_py_enums_and_constants() -> None:
    lib = hotpath.binding().lib
    for enum_type, (_, prefix) in abi.ENUMS.items():
        for member in enum_type:
            assert getattr(lib, f"{prefix}{member.name}") == member, member
    for name, value in abi.CONSTANTS.items():
        assert getattr(lib, name) == value, name


def _compile(tmp_path: Path, header: str) -> subprocess.CompletedProcess[str]:
    (tmp_path / "vms_abi.h").write_text(header)
    source = tmp_path / "check.c"
    source.write_text('#include "vms_abi.h"\n')
    return subprocess.run(
        ["cc", "-std=gnu11", "-fsyntax-only", "-I", str(tmp_path), str(source)],
        capture_output=True,
        text=True,
    )


def test_the_header_asserts_catch_a_layout_the_compiler_disagrees_with(tmp_path: Path) -> None:
    assert _compile(tmp_path, abi.header()).returncode == 0
    # As if abi.py had computed the mailbox's result at another offset than C puts it.
    wrong = abi.header().replace(
        "offsetof(struct vms_mail, ret) == 8", "offsetof(struct vms_mail, ret) == 12"
    )
    assert wrong != abi.header()
    done = _compile(tmp_path, wrong)
    assert done.returncode != 0
    assert "offsetof(struct vms_mail, ret)" in done.stderr


@pytest.mark.parametrize("name", ["hotpath.c", "hotpath.h"])
def test_hotpath_c_defines_none_of_the_shared_structs_and_enums(name: str) -> None:
    source = (SHARED / name).read_text()
    included = "hotpath.h" if name == "hotpath.c" else "vms_abi.h"
    assert f'#include "{included}"' in source
    for struct in abi.STRUCTS:
        assert not re.search(rf"{struct.ctype}\s*{{", source), struct.name
    for enum_type, (_, prefix) in abi.ENUMS.items():
        for member in enum_type:
            assert not re.search(rf"\b{prefix}{member.name}\s*=", source), member
    assert "#define VMS_BUCKETS" not in source


def test_the_contexts_and_prototypes_are_declared_once_in_hotpath_h() -> None:
    """hotpath.c defines the loops' contexts nowhere but through hotpath.h, which is also
    cffi's cdef: a second declaration could drift from the first."""
    source = (SHARED / "hotpath.c").read_text()
    header = (SHARED / "hotpath.h").read_text()
    for struct in ("vms_runner", "vms_access", "vms_worker"):
        assert re.search(rf"struct {struct}\s*{{", header), struct
        assert not re.search(rf"struct {struct}\s*{{", source), struct
    build = (SHARED / "hotpath_build.py").read_text()
    assert "struct vms_" not in build and "int vms_" not in build


def test_codecs_pack_the_fields_at_their_offsets() -> None:
    assert abi.MAIL.codec(["op", "length", "ret", "err"]).format == "<IIqi"
    assert abi.TABLE_RANGE.codec(["space", "async_write", "start", "length"]).format == "<BB6xQQ"
    assert abi.SLOT.offset("stop_reason") + abi.STOP_REASON_SIZE == abi.SLOT.size == 256
