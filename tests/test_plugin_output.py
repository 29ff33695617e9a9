"""The plugin's output relay: line splitting, the caps of what is logged, and an echo that
never blocks (end-to-end runs are in test_hostile_plugin.py and test_terminal.py)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vmsuper.supervisor.plugin_output import (
    ECHO_BUFFER,
    LOGGED_READ,
    LineSplitter,
    OutputRelay,
    Piece,
    StderrRecords,
    StdoutFile,
)


class Log:
    """Records what would go to supervisor.jsonl."""

    def __init__(self) -> None:
        self.records: list[tuple[str, dict[str, Any]]] = []

    def info(self, event: str, **fields: Any) -> None:
        self.records.append((event, fields))

    warning = info

    def events(self, name: str) -> list[dict[str, Any]]:
        return [fields for event, fields in self.records if event == name]


def split(data: bytes, max_line: int, chunk: int) -> list[Piece]:
    splitter = LineSplitter(max_line)
    pieces = []
    for i in range(0, len(data), chunk):
        pieces += splitter.feed(data[i : i + chunk])
    return pieces + splitter.finish()


def test_lines_long_lines_and_the_last_line() -> None:
    assert split(b"a\nbb\n\nccccccc\ndddd\neeeee", 4, 100) == [
        Piece(b"a"),
        Piece(b"bb"),
        Piece(b""),
        Piece(b"cccc"),
        Piece(b"ccc", continued=True),
        Piece(b"dddd"),  # exactly max_line, then its newline: no empty continuation
        Piece(b"eeee"),
        Piece(b"e", continued=True),
    ]


@given(st.binary(max_size=300), st.integers(1, 9), st.integers(1, 50))
def test_chunking_does_not_matter_and_nothing_is_lost(
    data: bytes, max_line: int, chunk: int
) -> None:
    pieces = split(data, max_line, chunk)
    assert pieces == split(data, max_line, len(data) or 1)
    assert all(len(p.data) <= max_line and b"\n" not in p.data for p in pieces)
    # Joining the pieces back (a newline before each piece that is not a continuation)
    # gives the input, less a final newline.
    joined = b"".join(
        (b"" if p.continued or i == 0 else b"\n") + p.data for i, p in enumerate(pieces)
    )
    assert joined == data.removesuffix(b"\n")


def test_only_the_unfinished_line_is_kept() -> None:
    splitter = LineSplitter(4096)
    for _ in range(100):
        splitter.feed(b"x" * 65536)
        assert len(splitter._partial) <= 4096


def test_stderr_records_stop_at_the_byte_cap_with_one_marker() -> None:
    log = Log()
    sink = StderrRecords(log, max_bytes=10, max_records=100)
    sink.write(b"12345\n67890\nabc\nmore\n")
    sink.write(b"and more\n")
    sink.close()
    assert [r["line"] for r in log.events("plugin_stderr")] == ["12345", "67890"]
    assert log.events("plugin_output_capped") == [
        {"stream": "stderr", "limit": "plugin_log_bytes", "records": 2, "bytes": 10}
    ]
    assert log.events("plugin_output_dropped") == [{"stream": "stderr", "bytes": 9 + 9}]


def test_stderr_records_stop_at_the_record_cap() -> None:
    log = Log()
    sink = StderrRecords(log, max_bytes=1 << 20, max_records=3)
    sink.write(b"\n" * 10)
    sink.close()
    assert len(log.events("plugin_stderr")) == 3
    assert log.events("plugin_output_capped")[0]["limit"] == "plugin_log_lines"


def test_stdout_file_keeps_the_first_bytes_and_says_where_it_stops(tmp_path: Path) -> None:
    log = Log()
    sink = StdoutFile(tmp_path / "plugin-stdout.log", log, max_bytes=8)
    sink.write(b"12345")
    sink.write(b"67890")
    sink.write(b"more")
    sink.close()
    kept = (tmp_path / "plugin-stdout.log").read_bytes()
    assert kept.startswith(b"12345678\n[vmsuper: plugin-stdout.log stops here")
    assert log.events("plugin_output_capped") == [
        {"stream": "stdout", "limit": "plugin_log_bytes", "bytes": 8}
    ]
    assert log.events("plugin_output_dropped") == [{"stream": "stdout", "bytes": 2 + 4}]


@pytest.fixture
def pipes() -> Iterator[tuple[int, int, int, int]]:
    """(plugin's read end, plugin's write end, echo read end, echo write end)"""
    fds = [*os.pipe2(os.O_NONBLOCK), *os.pipe2(os.O_NONBLOCK)]
    os.set_blocking(fds[3], True)  # like a user's stdout: blocking
    yield fds[0], fds[1], fds[2], fds[3]
    for fd in fds:
        with contextlib.suppress(OSError):  # a test may have closed one
            os.close(fd)


class Collect:
    read_size = 65536

    def __init__(self) -> None:
        self.data = b""

    def write(self, chunk: bytes) -> None:
        self.data += chunk

    def close(self) -> None:
        pass


def test_an_echo_nobody_reads_waits_in_a_bounded_buffer(pipes: tuple[int, int, int, int]) -> None:
    plugin_r, plugin_w, echo_r, echo_w = pipes
    sink = Collect()
    relay = OutputRelay(plugin_r, echo_w, sink)
    while relay.wants_input:
        with contextlib.suppress(BlockingIOError):
            os.write(plugin_w, b"p" * 65536)
        assert relay.read()  # never blocks, though nobody reads echo_r
    assert relay.echo_pending
    assert ECHO_BUFFER <= len(sink.data) <= ECHO_BUFFER + 65536
    echoed = b""
    while relay.echo_pending:
        echoed += os.read(echo_r, 1 << 20)
        relay.pump_echo()
    echoed += os.read(echo_r, 1 << 20)
    assert echoed == sink.data


def test_a_closed_echo_is_dropped_and_the_log_goes_on(pipes: tuple[int, int, int, int]) -> None:
    plugin_r, plugin_w, echo_r, echo_w = pipes
    sink = Collect()
    relay = OutputRelay(plugin_r, echo_w, sink)
    os.close(echo_r)  # nobody reads the echo pipe any more: EPIPE
    os.write(plugin_w, b"still logged\n")
    assert relay.read()
    assert not relay.echo_pending and sink.data == b"still logged\n"


def test_one_turn_of_the_loop_writes_at_most_logged_read_records(
    pipes: tuple[int, int, int, int],
) -> None:
    plugin_r, plugin_w, _, echo_w = pipes
    log = Log()
    relay = OutputRelay(plugin_r, echo_w, StderrRecords(log, max_bytes=1 << 20, max_records=1500))
    os.write(plugin_w, b"\n" * 65536)
    assert relay.read()
    assert len(log.events("plugin_stderr")) == LOGGED_READ
    assert relay.read()  # the cap (1500 records) is reached here: reads grow again
    assert len(log.events("plugin_stderr")) == 1500
    assert relay.read()
    assert log.events("plugin_output_dropped") == []  # counted at close
    relay.close()
    assert log.events("plugin_output_dropped") == [{"stream": "stderr", "bytes": 65536 - 1500}]
