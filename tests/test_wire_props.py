"""Property tests for wire framing: any chunking, any garbage, any payload with any fds."""

from __future__ import annotations

import itertools
import os
import socket

from hypothesis import given, settings
from hypothesis import strategies as st

from vmsuper.shared.wire import (
    MAX_VARINT_LEN,
    DelimitedDecoder,
    FramingError,
    encode_delimited,
    encode_varint,
    recv_datagram,
    send_datagram,
)

SETTINGS = settings(max_examples=150, deadline=None)

messages_st = st.lists(st.binary(max_size=600), max_size=12)


def rechunk(stream: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({min(c, len(stream)) for c in cuts})
    bounds = [0, *points, len(stream)]
    return [stream[a:b] for a, b in itertools.pairwise(bounds)]


def decode_varint(data: bytes) -> tuple[int, int]:
    value = 0
    for i, byte in enumerate(data):
        value |= (byte & 0x7F) << (7 * i)
        if not byte & 0x80:
            return value, i + 1
    raise AssertionError("unterminated varint")


@SETTINGS
@given(st.integers(min_value=0, max_value=(1 << 64) - 1))
def test_varint_round_trip(value: int) -> None:
    encoded = encode_varint(value)
    assert len(encoded) <= MAX_VARINT_LEN
    assert decode_varint(encoded) == (value, len(encoded))


@SETTINGS
@given(messages_st, st.lists(st.integers(min_value=0, max_value=8000), max_size=20))
def test_any_chunking_round_trips(messages: list[bytes], cuts: list[int]) -> None:
    stream = b"".join(encode_delimited(m) for m in messages)
    decoder = DelimitedDecoder(max_size=600)
    got: list[bytes] = []
    for chunk in rechunk(stream, cuts):
        got += decoder.feed(chunk)
    assert got == messages
    assert decoder.at_boundary
    assert decoder.pending == 0


@SETTINGS
@given(messages_st, st.integers(min_value=1, max_value=600))
def test_truncated_stream_keeps_only_the_tail_pending(messages: list[bytes], drop: int) -> None:
    stream = b"".join(encode_delimited(m) for m in messages)
    cut = max(0, len(stream) - drop)
    decoder = DelimitedDecoder(max_size=600)
    got = decoder.feed(stream[:cut])
    assert got == messages[: len(got)]
    assert decoder.pending == cut - sum(len(encode_delimited(m)) for m in got)
    assert decoder.pending < 600 + MAX_VARINT_LEN


def outcome(decoder: DelimitedDecoder, chunks: list[bytes]) -> tuple[list[bytes], bool]:
    """Messages from feeding `chunks` one by one, and whether a FramingError ended it."""
    got: list[bytes] = []
    for chunk in chunks:
        try:
            got += decoder.feed(chunk)
        except FramingError:
            return got, True
        assert decoder.pending < decoder.max_size + MAX_VARINT_LEN
    return got, False


@SETTINGS
@given(
    st.binary(max_size=2000),
    st.integers(min_value=0, max_value=300),
    st.lists(st.integers(min_value=0, max_value=2000), max_size=10),
)
def test_garbage_yields_messages_or_framing_error(
    garbage: bytes, max_size: int, cuts: list[int]
) -> None:
    whole, whole_failed = outcome(DelimitedDecoder(max_size), [garbage])
    split, split_failed = outcome(DelimitedDecoder(max_size), rechunk(garbage, cuts))
    bytewise, bytewise_failed = outcome(
        DelimitedDecoder(max_size), [garbage[i : i + 1] for i in range(len(garbage))]
    )
    # Where the reads fall never changes the verdict, nor the messages before an error.
    assert whole_failed == split_failed == bytewise_failed
    assert split == bytewise[: len(split)]
    if not whole_failed:
        assert whole == split == bytewise
    assert all(len(m) <= max_size for m in bytewise)


@SETTINGS
@given(st.binary(min_size=1, max_size=4096), st.integers(min_value=0, max_value=8))
def test_datagram_with_fds_round_trips(payload: bytes, fd_count: int) -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    r, w = os.pipe()
    try:
        fds = [r if i % 2 else w for i in range(fd_count)]
        send_datagram(a, payload, fds)
        got = recv_datagram(b, max_fds=8)
        assert got is not None
        try:
            assert got.data == payload
            assert len(got.fds) == fd_count
            for sent, received in zip(fds, got.fds, strict=True):
                assert received not in (r, w)
                assert os.fstat(received).st_ino == os.fstat(sent).st_ino
        finally:
            got.close_fds()
    finally:
        a.close()
        b.close()
        os.close(r)
        os.close(w)
