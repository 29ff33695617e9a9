"""The plugin's stdout and stderr: passed on to vmsuper's own, and kept in the run's logs, bounded.

The plugin never holds vmsuper's terminal or whatever else vmsuper's stdout is: both its
outputs are pipes that the event loop reads. Every chunk read is passed on unchanged, as it
comes, to vmsuper's stdout or stderr (that echo is not capped: it is the plugin's console, and
vmsuper's own stdout and stderr are the user's to redirect; it never blocks the loop either,
see `OutputRelay`), and is kept in the log folder:

- stderr, line by line, as `plugin_stderr` records in `supervisor.jsonl`;
- stdout, byte for byte, in `plugin-stdout.log`.

Nothing the plugin writes can grow the supervisor or its logs without bound:

- only the unfinished line is buffered, and at most `MAX_LINE` bytes of it: a longer line is
  logged in pieces of `MAX_LINE` bytes, every piece after the first with `continued: true`;
- each byte is looked at once (no re-scan of a growing buffer), and while stderr records are
  written, one turn of the event loop reads at most `LOGGED_READ` bytes of it (at most that many
  records), so a flood of bare newlines cannot hold up the main requests;
- at most `[limits] plugin_log_bytes` bytes per stream and `plugin_log_lines` records of stderr
  are logged per run. When a cap is hit, one `plugin_output_capped` record says so (and
  `plugin-stdout.log` ends with a line saying so); at the end, `plugin_output_dropped` says
  how much was not logged. The echo goes on.
"""

from __future__ import annotations

import contextlib
import os
import select
from pathlib import Path
from typing import Any, NamedTuple, Protocol

CHUNK = 65536
# Bytes of the plugin's output waiting for vmsuper's stdout or stderr before its pipe is no
# longer read; and what is written at a time once that polls writable (PIPE_BUF: a pipe with
# room for it takes it whole, without blocking).
ECHO_BUFFER = 1 << 20
ECHO_WRITE = 4096
MAX_LINE = 4096
# What one turn of the loop reads of stderr while its lines are logged: a chunk of bare
# newlines is that many records (about 30 µs each).
LOGGED_READ = 1024
STDOUT_LOG_NAME = "plugin-stdout.log"


class Piece(NamedTuple):
    """A line of output, or a piece of a long one; `continued`: it goes on the previous one."""

    data: bytes
    continued: bool = False


class LineSplitter:
    """Splits a byte stream into lines of at most `max_line` bytes (sans-I/O).

    Only the unfinished line is kept between `feed`s, never more than `max_line` bytes, and
    every byte fed is scanned once.
    """

    def __init__(self, max_line: int = MAX_LINE) -> None:
        if max_line < 1:
            raise ValueError(f"max_line must be at least 1, got {max_line}")
        self.max_line = max_line
        self._partial = bytearray()
        self._continued = False

    def feed(self, chunk: bytes) -> list[Piece]:
        pieces: list[Piece] = []
        pos, end = 0, len(chunk)
        while pos < end:
            if len(self._partial) == self.max_line:
                if chunk[pos] == 0x0A:  # the full piece ends its line exactly
                    pieces.append(self._take(continued_after=False))
                    pos += 1
                else:
                    pieces.append(self._take(continued_after=True))
                continue
            stop = min(end, pos + self.max_line - len(self._partial))
            newline = chunk.find(b"\n", pos, stop)
            if newline < 0:
                self._partial += chunk[pos:stop]
                pos = stop
            else:
                self._partial += chunk[pos:newline]
                pieces.append(self._take(continued_after=False))
                pos = newline + 1
        return pieces

    def finish(self) -> list[Piece]:
        """What is left at the end of the stream (a last line without its newline)."""
        if not self._partial:
            return []
        return [self._take(continued_after=False)]

    def _take(self, *, continued_after: bool) -> Piece:
        piece = Piece(bytes(self._partial), self._continued)
        self._partial.clear()
        self._continued = continued_after
        return piece


class Sink(Protocol):
    """Where one stream's output is kept."""

    @property
    def read_size(self) -> int:
        """The most to read from the pipe at a time: what one turn of the loop handles."""
        ...

    def write(self, chunk: bytes) -> None: ...

    def close(self) -> None: ...


class StderrRecords:
    """The plugin's stderr as `plugin_stderr` records, capped in bytes and records."""

    def __init__(self, log: Any, *, max_bytes: int, max_records: int) -> None:
        self._log = log
        self._splitter = LineSplitter()
        self._max_bytes = max_bytes
        self._max_records = max_records
        self._bytes = 0
        self._records = 0
        self._dropped = 0
        self._capped = False

    @property
    def read_size(self) -> int:
        # One record per line: a chunk of bare newlines is as many records, so while
        # records are written, one turn of the loop takes at most LOGGED_READ of them.
        return CHUNK if self._capped else LOGGED_READ

    def write(self, chunk: bytes) -> None:
        if self._capped:
            self._dropped += len(chunk)
            return
        self._log_pieces(self._splitter.feed(chunk))

    def close(self) -> None:
        if not self._capped:
            self._log_pieces(self._splitter.finish())
        if self._dropped:
            self._log.warning("plugin_output_dropped", stream="stderr", bytes=self._dropped)

    def _log_pieces(self, pieces: list[Piece]) -> None:
        for index, piece in enumerate(pieces):
            if (
                self._records >= self._max_records
                or self._bytes + len(piece.data) > self._max_bytes
            ):
                limit = (
                    "plugin_log_lines" if self._records >= self._max_records else "plugin_log_bytes"
                )
                self._capped = True
                self._dropped += sum(len(p.data) + 1 for p in pieces[index:])
                self._log.warning(
                    "plugin_output_capped",
                    stream="stderr",
                    limit=limit,
                    records=self._records,
                    bytes=self._bytes,
                )
                return
            self._records += 1
            self._bytes += len(piece.data)
            text = piece.data.decode("utf-8", "replace")
            if piece.continued:
                self._log.info("plugin_stderr", line=text, continued=True)
            else:
                self._log.info("plugin_stderr", line=text)


class StdoutFile:
    """The plugin's stdout, byte for byte, in a file of at most `max_bytes` bytes (plus one
    line saying it was capped)."""

    def __init__(self, path: Path, log: Any, *, max_bytes: int) -> None:
        self.path = path
        self._log = log
        self._max_bytes = max_bytes
        self._written = 0
        self._dropped = 0
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)

    @property
    def read_size(self) -> int:
        return CHUNK

    def write(self, chunk: bytes) -> None:
        room = self._max_bytes - self._written
        if room <= 0:
            self._dropped += len(chunk)
            return
        kept = chunk[:room]
        _write_all(self._fd, kept)
        self._written += len(kept)
        if len(kept) < len(chunk):
            self._dropped += len(chunk) - len(kept)
            note = f"\n[vmsuper: {self.path.name} stops here: [limits] plugin_log_bytes]\n"
            _write_all(self._fd, note.encode())
            self._log.warning(
                "plugin_output_capped",
                stream="stdout",
                limit="plugin_log_bytes",
                bytes=self._written,
            )

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if self._dropped:
            self._log.warning("plugin_output_dropped", stream="stdout", bytes=self._dropped)


class OutputRelay:
    """One of the plugin's output pipes: each chunk to `echo_fd` as is, and to `sink`.

    The echo never blocks the loop: what `echo_fd` (vmsuper's stdout or stderr: a terminal
    the user paused, a pipe nobody reads) cannot take at once waits in a buffer, written in
    pieces of `ECHO_WRITE` bytes whenever `echo_fd` polls writable (`pump_echo`). While more
    than `ECHO_BUFFER` bytes wait, the plugin's pipe is not read (`wants_input`): the plugin's
    own writes block, not vmsuper.
    """

    def __init__(self, fd: int, echo_fd: int, sink: Sink) -> None:
        self.fd = fd
        self.echo_fd = echo_fd
        self._sink = sink
        self._echo = bytearray()
        self._echo_broken = False
        self._closed = False

    @property
    def wants_input(self) -> bool:
        return len(self._echo) < ECHO_BUFFER

    @property
    def echo_pending(self) -> bool:
        return bool(self._echo)

    @property
    def closed(self) -> bool:
        """The plugin's end is closed and the sink flushed (see `close`)."""
        return self._closed

    def read(self) -> bool:
        """Take one chunk of what the pipe holds; False once the plugin's end is closed."""
        return self._read_chunk() is not None

    def pump_echo(self) -> None:
        """Write what waits for `echo_fd`, as long as it takes it without blocking."""
        while self._echo and _writable(self.echo_fd):
            try:
                written = os.write(self.echo_fd, self._echo[:ECHO_WRITE])
            except BlockingIOError:
                return
            except OSError:  # vmsuper's stdout or stderr is gone (a closed terminal or pipe)
                self._echo_broken = True
                self._echo.clear()
                return
            del self._echo[:written]

    def drain(self) -> None:
        """At the end: everything still waiting or left in the pipe, waiting for `echo_fd`
        if it must (the plugin is gone by then; vmsuper's own output is the user's)."""
        self._flush_echo()
        while self._read_chunk():
            self._flush_echo()

    def close(self) -> None:
        """Flush the sink (a last line without newline) and close it; the pipe is the
        plugin process's to close."""
        if not self._closed:
            self._closed = True
            self._sink.close()

    def _read_chunk(self) -> bytes | None:
        """The chunk passed on; b"" when nothing is there yet, None at the end."""
        try:
            chunk = os.read(self.fd, self._sink.read_size)
        except BlockingIOError:
            return b""
        except OSError:
            return None
        if not chunk:
            return None
        if not self._echo_broken:
            self._echo += chunk
            self.pump_echo()
        self._sink.write(chunk)
        return chunk

    def _flush_echo(self) -> None:
        if self._echo:
            with contextlib.suppress(OSError):
                _write_all(self.echo_fd, self._echo)
            self._echo.clear()


def _writable(fd: int) -> bool:
    poller = select.poll()
    poller.register(fd, select.POLLOUT)
    events = poller.poll(0)
    if events and events[0][1] & (select.POLLERR | select.POLLNVAL):
        return True  # the write says what is wrong
    return bool(events)


def _write_all(fd: int, data: bytes | bytearray) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
