"""The SMBIOS tables vmsuper-pc hands SeaBIOS through fw_cfg: layouts, handles, checksums."""

import struct

import pytest

from vmsuper.pc import smbios

# Formatted lengths (header included) from the SMBIOS specification.
SPEC_LENGTHS = {1: 0x1B, 3: 0x15, 4: 0x20, 16: 0x0F, 17: 0x15, 19: 0x0F, 32: 0x0B, 127: 0x04}


def parse(tables: bytes) -> list[tuple[int, int, int, bytes, list[str]]]:
    """(type, length, handle, formatted, strings) of each structure; checks the framing."""
    structures = []
    offset = 0
    while offset < len(tables):
        kind, length, handle = struct.unpack_from("<BBH", tables, offset)
        formatted = tables[offset + 4 : offset + length]
        end = tables.index(b"\0\0", offset + length)
        area = tables[offset + length : end]
        strings = [s.decode() for s in area.split(b"\0")] if area else []
        structures.append((kind, length, handle, formatted, strings))
        offset = end + 2
    assert offset == len(tables)
    return structures


def test_structures_have_the_specified_lengths_unique_handles_and_end_with_127():
    _, tables = smbios.smbios_files(ram_size=128 << 20, cpus=2)
    structures = parse(tables)
    assert [s[0] for s in structures] == [1, 3, 4, 4, 16, 17, 19, 32, 127]
    for kind, length, *_ in structures:
        assert length == SPEC_LENGTHS[kind], kind
    handles = [s[2] for s in structures]
    assert len(set(handles)) == len(handles)


def test_strings_and_references():
    _, tables = smbios.smbios_files(ram_size=3 << 30, cpus=2)
    by_type: dict[int, list[tuple[int, bytes, list[str]]]] = {}
    for kind, _, handle, formatted, strings in parse(tables):
        by_type.setdefault(kind, []).append((handle, formatted, strings))
    (_, system, strings), *_ = by_type[1]
    assert strings == ["vmsuper", "vmsuper-pc"] and system[:2] == b"\x01\x02"
    assert [s[2][0] for s in by_type[4]] == ["CPU 0", "CPU 1"]
    ((array, memory, _),) = by_type[16]
    assert struct.unpack_from("<I", memory, 3) == (3 << 20,)  # capacity in KiB
    ((_, dimm, _),) = by_type[17]
    assert struct.unpack_from("<H", dimm) == (array,)
    assert struct.unpack_from("<H", dimm, 8) == (3072,)  # MiB
    ((_, mapping, _),) = by_type[19]
    assert struct.unpack("<IIHB", mapping) == (0, (3 << 20) - 1, array, 1)


@pytest.mark.parametrize("cpus", [1, 4])
def test_the_anchor_describes_the_table_and_its_checksums_hold(cpus: int):
    anchor, tables = smbios.smbios_files(ram_size=128 << 20, cpus=cpus)
    assert len(anchor) == 0x1F
    assert anchor[:4] == b"_SM_" and anchor[0x10:0x15] == b"_DMI_"
    assert anchor[5] == 0x1F and anchor[6:8] == b"\x02\x04"
    assert sum(anchor[:0x10]) % 256 == 0
    assert sum(anchor[0x10:]) % 256 == 0
    length, address, count = struct.unpack_from("<HIH", anchor, 0x16)
    assert (length, address) == (len(tables), 0)
    structures = parse(tables)
    assert count == len(structures)
    biggest = struct.unpack_from("<H", anchor, 8)[0]
    sizes = []
    offset = 0
    for _ in structures:
        size = tables.index(b"\0\0", offset + tables[offset + 1]) + 2 - offset
        sizes.append(size)
        offset += size
    assert biggest == max(sizes)


def test_a_structure_without_strings_ends_in_two_nuls():
    assert smbios.Structure(32, bytes(7)).encode(5) == bytes([32, 11, 5, 0]) + bytes(7) + b"\0\0"
    assert smbios.Structure(1, b"x", ("a",)).encode(1) == b"\x01\x05\x01\x00xa\0\0"
