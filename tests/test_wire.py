"""Framing and fd passing over real SOCK_SEQPACKET socketpairs and real pipes."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import socket
import struct
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from vmsuper.shared import plugin_pb2, wire
from vmsuper.shared.wire import (
    MAX_MESSAGE,
    PIPE_SIZE,
    Datagram,
    DelimitedDecoder,
    FramingError,
    MessageTooLarge,
    TooManyFds,
    encode_delimited,
    encode_varint,
    enlarge_pipe,
    read_plain,
    recv_datagram,
    send_datagram,
    write_all,
)

# --- helpers -------------------------------------------------------------------------------


def open_fds() -> set[int]:
    return {int(name) for name in os.listdir("/proc/self/fd")}


def same_file(a: int, b: int) -> bool:
    sa, sb = os.fstat(a), os.fstat(b)
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


def send_big(sock: socket.socket, data: bytes) -> None:
    """Send a datagram over the default socket buffer size, or skip where that is impossible.

    Without CAP_NET_ADMIN the send buffer cannot grow past net.core.wmem_max.
    """
    try:
        send_datagram(sock, data)
    except MessageTooLarge:
        if os.geteuid() == 0:
            raise
        pytest.skip(f"net.core.wmem_max too small to send {len(data)} bytes unprivileged")


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with a, b:
        yield a, b


@pytest.fixture
def files(tmp_path: Path) -> Iterator[list[int]]:
    """Ten distinct open files to pass around."""
    fds = []
    for i in range(10):
        path = tmp_path / f"f{i}"
        path.write_bytes(bytes([i]))
        fds.append(os.open(path, os.O_RDWR | os.O_CLOEXEC))
    yield fds
    for fd in fds:
        os.close(fd)


@pytest.fixture
def pipe() -> Iterator[tuple[int, int]]:
    r, w = os.pipe()
    yield r, w
    for fd in (r, w):
        try:
            os.close(fd)
        except OSError as exc:  # a test may close an end itself
            assert exc.errno == errno.EBADF


# --- datagrams -----------------------------------------------------------------------------


@pytest.mark.parametrize("count", [0, 1, 2, 3, 7, 10])
def test_round_trip_with_fds_both_ways(
    pair: tuple[socket.socket, socket.socket], files: list[int], count: int
) -> None:
    a, b = pair
    for sender, receiver in ((a, b), (b, a)):
        payload = b"request %d" % count
        send_datagram(sender, payload, files[:count])
        got = recv_datagram(receiver)
        assert got is not None
        try:
            assert got.data == payload
            assert len(got.fds) == count
            for sent, received in zip(files[:count], got.fds, strict=True):
                assert received != sent
                assert same_file(sent, received)
                assert not os.get_inheritable(received)  # close-on-exec
                assert fcntl.fcntl(received, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
        finally:
            got.close_fds()
        # The sender keeps its own fds.
        for fd in files[:count]:
            os.fstat(fd)


def test_received_fd_is_the_same_open_file(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    r, w = os.pipe()
    try:
        send_datagram(a, b"x", [w])
        got = recv_datagram(b)
        assert got is not None
        os.write(got.fds[0], b"through the copy")
        got.close_fds()
        assert os.read(r, 100) == b"through the copy"
    finally:
        os.close(r)
        os.close(w)


def test_one_mebibyte_accepted(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    payload = os.urandom(MAX_MESSAGE)
    send_big(a, payload)  # grows the send buffer as needed
    got = recv_datagram(b)
    assert got is not None
    assert got.data == payload
    assert got.fds == []


def test_oversized_refused_and_connection_stays_usable(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    a, b = pair
    send_big(a, b"\x01" * (MAX_MESSAGE + 1))
    send_datagram(a, b"next")
    with pytest.raises(MessageTooLarge) as info:
        recv_datagram(b)
    assert info.value.size == MAX_MESSAGE + 1
    assert info.value.limit == MAX_MESSAGE
    got = recv_datagram(b)
    assert got is not None
    assert got.data == b"next"


def test_limit_is_inclusive(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    send_datagram(a, b"12345")
    send_datagram(a, b"123456")
    got = recv_datagram(b, max_size=5)
    assert got is not None
    assert got.data == b"12345"
    with pytest.raises(MessageTooLarge):
        recv_datagram(b, max_size=5)


def test_fds_of_oversized_datagram_are_closed(
    pair: tuple[socket.socket, socket.socket], files: list[int]
) -> None:
    a, b = pair
    send_datagram(a, b"x" * 100, files[:5])
    send_datagram(a, b"small", files[:1])
    before = open_fds()
    with pytest.raises(MessageTooLarge):
        recv_datagram(b, max_size=99)
    assert open_fds() == before
    got = recv_datagram(b, max_size=99)
    assert got is not None
    assert got.data == b"small"
    assert same_file(got.fds[0], files[0])
    got.close_fds()
    assert open_fds() == before


@pytest.mark.parametrize(("sent", "limit"), [(5, 4), (4, 3), (1, 0), (10, 1), (33, 32)])
def test_too_many_fds_refused_and_nothing_leaked(
    pair: tuple[socket.socket, socket.socket], files: list[int], sent: int, limit: int
) -> None:
    # (4, 3): the control buffer for 3 fds is padded to room for 4, so the count must be
    # checked, not only MSG_CTRUNC.
    a, b = pair
    fds = (files * 4)[:sent]  # repeats are fine: each becomes a new fd on arrival
    send_datagram(a, b"with fds", fds)
    send_datagram(a, b"after", fds[:limit])
    before = open_fds()
    with pytest.raises(TooManyFds) as info:
        recv_datagram(b, max_fds=limit)
    assert info.value.limit == limit
    assert info.value.count > limit
    assert open_fds() == before
    got = recv_datagram(b, max_fds=limit)
    assert got is not None
    assert got.data == b"after"
    assert len(got.fds) == limit
    got.close_fds()
    assert open_fds() == before


def test_exactly_max_fds_accepted(
    pair: tuple[socket.socket, socket.socket], files: list[int]
) -> None:
    a, b = pair
    send_datagram(a, b"x", files[:3])
    got = recv_datagram(b, max_fds=3)
    assert got is not None
    assert len(got.fds) == 3
    got.close_fds()


def test_hang_up_is_none_every_time(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    send_datagram(a, b"last words")
    a.close()
    got = recv_datagram(b)
    assert got is not None
    assert got.data == b"last words"
    assert recv_datagram(b) is None
    assert recv_datagram(b) is None


def test_zero_length_datagram_is_a_hang_up_and_its_fds_are_closed(
    pair: tuple[socket.socket, socket.socket], files: list[int]
) -> None:
    a, b = pair
    send_datagram(a, b"", files[:3])
    before = open_fds()
    assert recv_datagram(b) is None
    assert open_fds() == before
    # It was consumed: what follows is still there for a caller that keeps reading.
    send_datagram(a, b"more")
    got = recv_datagram(b)
    assert got is not None
    assert got.data == b"more"


def test_nonblocking_empty_queue_raises_blocking_io(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    a, b = pair
    b.setblocking(False)
    with pytest.raises(BlockingIOError):
        recv_datagram(b)
    send_datagram(a, b"now")
    got = recv_datagram(b)
    assert got is not None
    assert got.data == b"now"
    with pytest.raises(BlockingIOError):
        recv_datagram(b)


def test_blocking_receive_waits_for_a_datagram(
    pair: tuple[socket.socket, socket.socket], files: list[int]
) -> None:
    a, b = pair
    received: list[Datagram | None] = []
    reader = threading.Thread(target=lambda: received.append(recv_datagram(b)))
    reader.start()
    send_datagram(a, b"late", files[:2])
    reader.join(timeout=30)
    assert not reader.is_alive()
    got = received[0]
    assert got is not None
    assert got.data == b"late"
    assert len(got.fds) == 2
    got.close_fds()


def test_send_refuses_more_fds_than_the_kernel_takes(
    pair: tuple[socket.socket, socket.socket], files: list[int]
) -> None:
    a, b = pair
    with pytest.raises(TooManyFds) as info:
        send_datagram(a, b"x", [files[0]] * (wire.SCM_MAX_FD + 1))
    assert info.value.limit == wire.SCM_MAX_FD
    b.setblocking(False)
    with pytest.raises(BlockingIOError):  # nothing was sent
        recv_datagram(b)


def test_send_to_closed_peer_raises(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    b.close()
    with pytest.raises(BrokenPipeError):
        send_datagram(a, b"nobody listens")


def test_negative_limits_rejected(pair: tuple[socket.socket, socket.socket]) -> None:
    _, b = pair
    with pytest.raises(ValueError):
        recv_datagram(b, max_size=-1)
    with pytest.raises(ValueError):
        recv_datagram(b, max_fds=-1)


def test_real_main_request_round_trip(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    request = plugin_pb2.MainRequest()
    request.reserve_range.start = 0x3F8
    request.reserve_range.length = 8
    send_datagram(a, request.SerializeToString())
    got = recv_datagram(b)
    assert got is not None
    assert plugin_pb2.MainRequest.FromString(got.data) == request


def test_close_fds_is_idempotent(files: list[int]) -> None:
    got = Datagram(b"", [os.dup(files[0]), os.dup(files[1])])
    fds = list(got.fds)
    got.close_fds()
    got.close_fds()
    assert got.fds == []
    for fd in fds:
        with pytest.raises(OSError):
            os.fstat(fd)


def test_close_fds_closes_the_rest_when_one_fails(files: list[int]) -> None:
    good = os.dup(files[0])
    bad = os.dup(files[1])
    os.close(bad)
    got = Datagram(b"", [bad, good])
    with pytest.raises(OSError):
        got.close_fds()
    with pytest.raises(OSError):
        os.fstat(good)


# --- pipes: plain requests -----------------------------------------------------------------


def test_read_plain_one_request_per_read(pipe: tuple[int, int]) -> None:
    r, w = pipe
    request = plugin_pb2.VcpuRequest()
    request.get_state.set = plugin_pb2.VcpuRequest.SREGS
    os.write(w, request.SerializeToString())
    data = read_plain(r)
    assert data is not None
    assert plugin_pb2.VcpuRequest.FromString(data) == request


def test_read_plain_end_of_file(pipe: tuple[int, int]) -> None:
    r, w = pipe
    os.write(w, b"abc")
    os.close(w)
    assert read_plain(r) == b"abc"
    assert read_plain(r) is None


def test_read_plain_limit(pipe: tuple[int, int]) -> None:
    r, w = pipe
    os.write(w, b"x" * 10)
    assert read_plain(r, max_size=10) == b"x" * 10
    os.write(w, b"y" * 11)
    with pytest.raises(MessageTooLarge) as info:
        read_plain(r, max_size=10)
    assert info.value.size == 11
    assert info.value.limit == 10


def test_read_plain_buffer_is_reused_safely(pipe: tuple[int, int]) -> None:
    r, w = pipe
    os.write(w, b"a" * 1000)
    first = read_plain(r, max_size=1000)
    os.write(w, b"b" * 5)
    second = read_plain(r, max_size=10)
    os.set_blocking(w, False)
    written = os.write(w, b"c" * 70000)  # a default pipe takes 64 KiB of it
    third = read_plain(r, max_size=100_000)
    assert first == b"a" * 1000  # not overwritten by later reads
    assert second == b"b" * 5
    assert third == b"c" * written


def test_read_plain_nonblocking_empty(pipe: tuple[int, int]) -> None:
    r, _ = pipe
    os.set_blocking(r, False)
    with pytest.raises(BlockingIOError):
        read_plain(r)


# --- varints and delimited messages --------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "encoded"),
    [
        (0, b"\x00"),
        (1, b"\x01"),
        (127, b"\x7f"),
        (128, b"\x80\x01"),
        (300, b"\xac\x02"),
        (16383, b"\xff\x7f"),
        (16384, b"\x80\x80\x01"),
        (MAX_MESSAGE, b"\x80\x80\x40"),
        ((1 << 64) - 1, b"\xff" * 9 + b"\x01"),
    ],
)
def test_encode_varint_known_values(value: int, encoded: bytes) -> None:
    assert encode_varint(value) == encoded


@pytest.mark.parametrize("value", [1, 127, 128, 300, 1 << 35, (1 << 64) - 1])
def test_encode_varint_matches_protobuf(value: int) -> None:
    message = plugin_pb2.MainRequest.ReserveRange(start=value)
    assert message.SerializeToString() == b"\x10" + encode_varint(value)  # field 2, varint


@pytest.mark.parametrize("value", [-1, 1 << 64])
def test_encode_varint_out_of_range(value: int) -> None:
    with pytest.raises(ValueError):
        encode_varint(value)


@pytest.mark.parametrize("size", [1, 127, 128, 70000])
def test_encode_delimited_matches_protobuf_bytes_field(size: int) -> None:
    payload = os.urandom(size)
    message = plugin_pb2.MainResponse.GetState(state=payload)
    assert message.SerializeToString() == b"\x0a" + encode_delimited(payload)  # field 1, LEN


def test_encode_delimited_empty() -> None:
    assert encode_delimited(b"") == b"\x00"


# --- DelimitedDecoder ----------------------------------------------------------------------


def stream_of(messages: list[bytes]) -> bytes:
    return b"".join(encode_delimited(m) for m in messages)


def test_several_messages_in_one_feed() -> None:
    messages = [b"one", b"", b"three" * 50, b"\x00\x80\xff"]
    decoder = DelimitedDecoder()
    assert decoder.feed(stream_of(messages)) == messages
    assert decoder.at_boundary
    assert decoder.pending == 0


def test_every_split_position() -> None:
    messages = [b"a" * 200, b"", b"bc", b"d" * 130]  # 2-byte varints at both ends
    stream = stream_of(messages)
    for cut in range(len(stream) + 1):
        decoder = DelimitedDecoder()
        got = decoder.feed(stream[:cut])
        assert decoder.pending + sum(len(encode_delimited(m)) for m in got) == cut
        assert decoder.at_boundary == (decoder.pending == 0)
        got += decoder.feed(stream[cut:])
        assert got == messages, cut
        assert decoder.at_boundary


def test_every_pair_of_split_positions_in_a_varint_heavy_stream() -> None:
    messages = [b"", b"x" * 128, b"", b"y" * 16384, b"z"]  # 1-, 2- and 3-byte lengths
    stream = stream_of(messages)
    interesting = [i for i in range(len(stream) + 1) if i < 140 or i > len(stream) - 10]
    for first in interesting:
        for second in interesting:
            if second < first:
                continue
            decoder = DelimitedDecoder()
            got = decoder.feed(stream[:first])
            got += decoder.feed(stream[first:second])
            got += decoder.feed(stream[second:])
            assert got == messages, (first, second)


def test_byte_at_a_time() -> None:
    messages = [b"hello", b"", b"w" * 300]
    decoder = DelimitedDecoder()
    got: list[bytes] = []
    for byte in stream_of(messages):
        got += decoder.feed(bytes([byte]))
    assert got == messages
    assert decoder.at_boundary


def test_partial_message_is_pending() -> None:
    decoder = DelimitedDecoder()
    assert decoder.feed(b"\x05abc") == []
    assert decoder.pending == 4
    assert not decoder.at_boundary
    assert decoder.feed(b"de\x01") == [b"abcde"]
    assert decoder.pending == 1
    assert decoder.feed(b"f") == [b"f"]
    assert decoder.at_boundary


def test_feed_accepts_bytearray_and_memoryview() -> None:
    decoder = DelimitedDecoder()
    assert decoder.feed(bytearray(b"\x02ab\x01")) == [b"ab"]
    assert decoder.feed(memoryview(b"c\x00")) == [b"c", b""]
    wide = memoryview(bytes([3, 1, 2, 3])).cast("B", (2, 2))  # any contiguous buffer
    assert decoder.feed(wide) == [b"\x01\x02\x03"]


def test_messages_are_independent_of_later_feeds() -> None:
    decoder = DelimitedDecoder()
    data = bytearray(b"\x03abc\x02d")
    got = decoder.feed(data)
    data[1:4] = b"XYZ"
    got += decoder.feed(b"e")
    assert got == [b"abc", b"de"]


def test_ten_byte_varint_is_valid() -> None:
    # Non-canonical but legal: 0 written in ten bytes.
    decoder = DelimitedDecoder()
    assert decoder.feed(b"\x80" * 9 + b"\x00" + b"\x01z") == [b"", b"z"]


def test_varint_over_ten_bytes_is_a_framing_error() -> None:
    decoder = DelimitedDecoder()
    assert decoder.feed(b"\x80" * 9) == []  # could still be valid
    with pytest.raises(FramingError):
        decoder.feed(b"\x80")
    with pytest.raises(FramingError):  # the stream stays out of step
        decoder.feed(b"\x00")
    assert decoder.pending == 0


def test_huge_declared_length_fails_at_once() -> None:
    decoder = DelimitedDecoder()
    with pytest.raises(FramingError):
        decoder.feed(encode_varint(MAX_MESSAGE + 1))  # no body needed to know


def test_partial_length_already_over_the_limit_fails_at_once() -> None:
    decoder = DelimitedDecoder(max_size=100)
    with pytest.raises(FramingError):
        decoder.feed(b"\xff")  # 127 so far, and more bytes only add


def test_length_at_the_limit_is_accepted() -> None:
    decoder = DelimitedDecoder(max_size=300)
    payload = b"p" * 300
    assert decoder.feed(encode_delimited(payload)) == [payload]
    with pytest.raises(FramingError):
        decoder.feed(encode_delimited(payload + b"q"))


def test_valid_messages_before_garbage_in_separate_feeds_are_kept() -> None:
    decoder = DelimitedDecoder(max_size=10)
    assert decoder.feed(b"\x01a") == [b"a"]
    with pytest.raises(FramingError):
        decoder.feed(b"\x0b")


def test_real_vcpu_responses_coalesced_in_one_read(pipe: tuple[int, int]) -> None:
    r, w = pipe
    responses = []
    for address in (0x60, 0x64, 0x3F8):
        response = plugin_pb2.VcpuResponse()
        response.wait.io.address = address
        response.wait.io.is_write = True
        response.wait.io.no_resume = True
        response.wait.io.data = b"\x01"
        responses.append(response)
    for response in responses:
        write_all(w, encode_delimited(response.SerializeToString()))
    decoder = DelimitedDecoder()
    got = decoder.feed(os.read(r, PIPE_SIZE))
    assert [plugin_pb2.VcpuResponse.FromString(m) for m in got] == responses


def test_negative_decoder_limit_rejected() -> None:
    with pytest.raises(ValueError):
        DelimitedDecoder(max_size=-1)


# --- pipes: size and whole writes ----------------------------------------------------------


def test_enlarge_pipe(pipe: tuple[int, int]) -> None:
    r, w = pipe
    size = enlarge_pipe(w)
    assert size >= PIPE_SIZE
    assert fcntl.fcntl(r, fcntl.F_GETPIPE_SZ) == size


def test_enlarge_pipe_falls_back_to_the_allowed_maximum(
    pipe: tuple[int, int], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    r, w = pipe
    allowed = 128 * 1024
    real_fcntl = fcntl.fcntl

    def limited(fd: int, cmd: int, arg: int = 0) -> int:
        if cmd == fcntl.F_SETPIPE_SZ and arg > allowed:
            raise PermissionError(errno.EPERM, "over pipe-max-size")
        return real_fcntl(fd, cmd, arg)

    limit_file = tmp_path / "pipe-max-size"
    limit_file.write_text(f"{allowed}\n")
    monkeypatch.setattr(wire, "_PIPE_MAX_SIZE_PATH", limit_file)
    monkeypatch.setattr(wire.fcntl, "fcntl", limited)
    assert enlarge_pipe(w, PIPE_SIZE) == allowed
    assert real_fcntl(r, fcntl.F_GETPIPE_SZ) == allowed


def test_enlarge_pipe_fallback_never_shrinks(
    pipe: tuple[int, int], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    r, w = pipe
    assert enlarge_pipe(w, 128 * 1024) == 128 * 1024
    real_fcntl = fcntl.fcntl

    def refused(fd: int, cmd: int, arg: int = 0) -> int:
        if cmd == fcntl.F_SETPIPE_SZ:
            raise PermissionError(errno.EPERM, "quota")
        return real_fcntl(fd, cmd, arg)

    limit_file = tmp_path / "pipe-max-size"
    limit_file.write_text("65536\n")
    monkeypatch.setattr(wire, "_PIPE_MAX_SIZE_PATH", limit_file)
    monkeypatch.setattr(wire.fcntl, "fcntl", refused)
    assert enlarge_pipe(w) == 128 * 1024
    limit_file.write_text("1048576\n")  # allowed, but the kernel still refuses (user quota)
    assert enlarge_pipe(w) == 128 * 1024
    assert real_fcntl(r, fcntl.F_GETPIPE_SZ) == 128 * 1024


def test_write_all_whole_message_in_one_read(pipe: tuple[int, int]) -> None:
    r, w = pipe
    enlarge_pipe(w)
    message = encode_delimited(os.urandom(200_000))
    write_all(w, message)
    assert os.read(r, PIPE_SIZE + 1) == message


def test_write_all_larger_than_the_pipe_nonblocking(pipe: tuple[int, int]) -> None:
    r, w = pipe
    os.set_blocking(w, False)
    data = os.urandom(1 << 20)  # 16 times a default pipe: partial writes and waits
    chunks: list[bytes] = []

    def drain() -> None:
        while chunk := os.read(r, 10_000):
            chunks.append(chunk)

    reader = threading.Thread(target=drain)
    reader.start()
    try:
        write_all(w, data)
    finally:
        os.close(w)
        reader.join(timeout=60)
    assert not reader.is_alive()
    assert b"".join(chunks) == data


def test_write_all_to_closed_reader(pipe: tuple[int, int]) -> None:
    r, w = pipe
    os.close(r)
    with pytest.raises(BrokenPipeError):
        write_all(w, b"x")


# --- fds received and not kept ------------------------------------------------------------------


def test_a_received_socket_is_closed_without_lingering() -> None:
    """A peer's TCP socket with SO_LINGER and a full send queue: closing what we were sent
    turns lingering off (the peer's copy shows it) and never waits on the caller's thread."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname())
        server, _ = listener.accept()
        with server:
            client.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                while True:
                    client.send(b"z" * 65536)
            client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 60))
            sent = os.dup(client.fileno())  # what arrived with a request
            wire.close_received(sent)
            assert wire.wait_for_closes(10.0)
            with pytest.raises(OSError):
                os.fstat(sent)
            linger = client.getsockopt(socket.SOL_SOCKET, socket.SO_LINGER, 8)
            assert struct.unpack("ii", linger)[0] == 0  # l_onoff: off (l_linger is kept)
            client.close()  # lingering is off for this last close too: it returns at once


def test_other_received_fds_are_closed_at_once() -> None:
    r, w = os.pipe()
    wire.close_received(r)
    with pytest.raises(OSError):
        os.fstat(r)
    os.close(w)
