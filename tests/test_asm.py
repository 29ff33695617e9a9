"""shared/asm.py: flat binaries from GNU as, absolute labels via the origin, and the cache."""

from __future__ import annotations

from pathlib import Path

import pytest

from vmsuper.shared import asm


@pytest.fixture(autouse=True)
def cache_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "cache"
    monkeypatch.setenv("XDG_CACHE_HOME", str(home))
    return home


def test_sixteen_bit_code_is_encoded_for_real_mode() -> None:
    # mov $imm16, %ax has no operand-size prefix only in 16-bit code.
    assert asm.assemble("mov $0x1234, %ax\nhlt\n") == bytes.fromhex("b83412f4")
    assert asm.assemble("mov $0x1234, %ax\n", bits=32) == bytes.fromhex("66b83412")


def test_sixty_four_bit_code() -> None:
    assert asm.assemble("mov $1, %rax\n", bits=64) == bytes.fromhex("48c7c001000000")


def test_origin_makes_labels_absolute() -> None:
    source = "jmp end\n.org 0x10\ntarget: .word target\nend: ljmp $0, $target\n"
    at_zero = asm.assemble(source)
    at_origin = asm.assemble(source, origin=0x7C00)
    assert len(at_zero) == len(at_origin) == 0x10 + 2 + 5
    assert at_zero[0x10:0x12] == (0x10).to_bytes(2, "little")
    assert at_origin[0x10:0x12] == (0x7C10).to_bytes(2, "little")
    assert at_origin[0x12:] == bytes([0xEA]) + (0x7C10).to_bytes(2, "little") + bytes(2)
    # Relative jumps do not depend on where the code is loaded.
    assert at_zero[:2] == at_origin[:2]


def test_origin_beyond_sixteen_bit_reach_is_a_link_error() -> None:
    with pytest.raises(asm.AssemblyError, match="link failed"):
        asm.assemble("here: .word here\n", origin=0x1_0000)


def test_bad_source_reports_the_assembler_message_and_line() -> None:
    with pytest.raises(asm.AssemblyError) as info:
        asm.assemble("nop\nfrobnicate %eax\n")
    message = str(info.value)
    assert "assemble failed" in message
    assert ":2: Error: no such instruction: `frobnicate %eax'" in message
    assert "vmsuper-asm-" not in message  # no temporary paths in messages


def test_undefined_label_is_an_error() -> None:
    with pytest.raises(asm.AssemblyError, match="undefined reference to `nowhere'"):
        asm.assemble("jmp nowhere\n")


@pytest.mark.parametrize(("kwargs", "match"), [({"bits": 8}, "bits"), ({"origin": -1}, "origin")])
def test_bad_parameters(kwargs: dict[str, int], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        asm.assemble("nop\n", **kwargs)


def test_results_are_cached_and_served_without_binutils(
    cache_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    code = asm.assemble("cli\nhlt\n", origin=0x1000)
    files = list((cache_home / "vmsuper" / "asm").iterdir())
    assert [f.read_bytes() for f in files] == [code]
    assert not any(f.name.startswith(".tmp-") for f in files)
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    assert asm.assemble("cli\nhlt\n", origin=0x1000) == code
    # A different origin is a different key: it needs the tools, which are gone.
    with pytest.raises(asm.AssemblyError, match=r"`as` .* is not installed"):
        asm.assemble("cli\nhlt\n", origin=0x2000)


def test_unwritable_cache_only_costs_time(cache_home: Path) -> None:
    cache_home.parent.mkdir(parents=True, exist_ok=True)
    cache_home.write_text("a file where the cache folder should be")
    assert asm.assemble("nop\n") == b"\x90"
    assert asm.assemble("nop\n") == b"\x90"
