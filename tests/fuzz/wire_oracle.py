"""Python readings of the wire forms the exit engine handles by hand, kept only as oracles.

The engine (`hotpath.c`) encodes Wait{Io} and reads a plain Resume{data} itself; these are
the independent Python versions the tests hold it to (tests/test_hotpath.py, the VCPU fuzz
target), alongside protobuf's own encoding and decoding.
"""

from __future__ import annotations


def read_varint(data: bytes, pos: int) -> tuple[int, int]:
    """(value, next position) of the varint at `pos`; (-1, pos) if it is cut short or long."""
    value = 0
    shift = 0
    end = min(len(data), pos + 10)
    while pos < end:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7
    return -1, pos


def plain_resume_data(request: bytes) -> bytes | None:
    """The data of a request that is exactly `Resume{data}` in the canonical encoding (what
    every client sends to answer an exit), else None."""
    if request[:1] != b"\x12":  # VcpuRequest.resume = 2
        return None
    length, pos = read_varint(request, 1)
    if length != len(request) - pos:
        return None
    if length == 0:
        return b""
    if request[pos] != 0x0A:  # Resume.data = 1, and nothing else
        return None
    size, start = read_varint(request, pos + 1)
    if size != len(request) - start:
        return None
    return request[start:]


def wire_fields(data: bytes) -> list[tuple[tuple[int, int], int | bytes]]:
    """((field number, wire type), value) of each field of an encoded message, in order:
    varints (type 0) as integers, length-delimited fields (type 2) as bytes."""
    fields: list[tuple[tuple[int, int], int | bytes]] = []
    pos = 0
    while pos < len(data):
        key, pos = _canonical_varint(data, pos)
        number, wire_type = key >> 3, key & 7
        value: int | bytes
        if wire_type == 0:
            value, pos = _canonical_varint(data, pos)
        elif wire_type == 2:
            size, pos = _canonical_varint(data, pos)
            value, pos = data[pos : pos + size], pos + size
            assert len(value) == size, "cut short"
        else:
            raise AssertionError(f"unexpected wire type {wire_type}")
        fields.append(((number, wire_type), value))
    return fields


def _canonical_varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            assert byte or shift == 7, "a varint with a redundant zero byte"
            return value, pos
