"""Structured logs: one JSON object per line, one file per process.

The supervisor writes ``supervisor.jsonl`` and each VCPU worker ``vcpu-N.jsonl`` in the run's
log folder. Every record has ``timestamp`` (ISO 8601 UTC, always with microseconds so records
sort as text), ``level``, ``pid``, ``vcpu`` (when the process or the call has one) and
``event`` (the event name), then the call's own fields.

Each record is written with a single unbuffered ``write`` to a file opened for append, so a
crash (even SIGKILL) loses nothing and processes sharing a file never interleave within a
line. Records below the level are dropped before anything is rendered, so ``log.debug`` on
the hot path costs a method call and a comparison.

The loggers here are vmsuper's own, a few lines over ``json``: a logging library (structlog
with the ``logging`` and ``pickle`` it imports) cost about a tenth of every `vmsuper run`'s
start-up for the little used of it. A logger holds only its bound fields; the level, the file
and the process's pid and vcpu live in one state object that every logger reads at each call,
so re-configuring (a forked worker switching to its own file and level) reaches loggers made
before it.

A few records are kept at every level, because `vmsuper logs --summary` and ``--follow`` are
built on them: the supervisor's ``run_started`` and ``run_finished`` and each worker's
``vcpu_exit_counts``. They are written through `essential_logger`, which skips the level filter.

While a run is live its supervisor holds a shared `flock` on ``supervisor.jsonl`` (the lock
goes with the process, even on SIGKILL), so a reader tells a live run from a dead one with
`run_is_live` without trusting a pid that may have been reused.
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import json
import os
import sys
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

SUPERVISOR_LOG = "supervisor.jsonl"
LEVELS = ("debug", "info", "warning", "error", "critical")
_LEVEL_NUMBERS = {"debug": 10, "info": 20, "warning": 30, "error": 40, "critical": 50}
_FIXED_FIELDS = ("timestamp", "level", "pid", "vcpu", "event")
_KEEP_ALL = 0
"""The threshold of `essential_logger`: below every level."""


def vcpu_log_name(vcpu: int) -> str:
    """The log file name of VCPU worker `vcpu`."""
    return f"vcpu-{vcpu}.jsonl"


class _State:
    """What every logger reads at each call; replaced field by field on re-configuration."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.vcpu: int | None = None
        self.min_level = _LEVEL_NUMBERS["info"]
        self.echo_stderr = False
        self.file: io.FileIO | None = None
        self.lock = threading.Lock()


_state = _State()


def _take_over_after_fork() -> None:
    """In a forked child, make the state this process's: its pid, and a fresh lock (a thread
    of the parent may have held the old one at fork time; the child has no such thread).
    Called by `configure_logging` and `close_logging`, the caller's explicit steps, rather than
    by a fork hook installed when this module is imported."""
    if _state.pid != os.getpid():
        _state.pid = os.getpid()
        _state.lock = threading.Lock()


def _timestamp() -> str:
    """Now, as ``YYYY-mm-ddTHH:MM:SS.ffffffZ`` (UTC, always with microseconds)."""
    ns = time.time_ns()
    seconds, micros = divmod(ns // 1000, 1_000_000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{micros:06d}Z"


def _exception_text(exc_info: object) -> str | None:
    """The traceback an ``exc_info`` field asks for: True (the exception being handled), an
    exception, or a ``sys.exc_info()`` tuple; None when there is none."""
    import traceback  # only records that carry a traceback need it

    if isinstance(exc_info, BaseException):
        return "".join(traceback.format_exception(exc_info))
    if isinstance(exc_info, tuple):
        exc_info = exc_info[1]
        return None if exc_info is None else _exception_text(exc_info)
    if exc_info:
        exc = sys.exception()
        return None if exc is None else "".join(traceback.format_exception(exc))
    return None


def _write(line: str) -> None:
    """One rendered record to the current file, in one write; to stderr when there is none."""
    data = (line + "\n").encode()
    with _state.lock:
        file = _state.file
        if file is None:
            sys.stderr.write(line + "\n")
            return
        view = memoryview(data)
        while view:
            written = file.write(view)
            view = view[written or 0 :]


class Logger:
    """A logger: ``log.info("event_name", key=value, ...)`` writes one record.

    ``exception`` is ``error`` with the traceback of the exception being handled; any call
    may pass ``exc_info`` (True, an exception or a ``sys.exc_info()`` tuple) to add one as
    the ``exception`` field. Fields bound at creation (`get_logger`) come in every record.
    """

    __slots__ = ("_bound", "_threshold")

    def __init__(self, bound: dict[str, Any], *, threshold: int | None = None) -> None:
        self._bound = bound
        self._threshold = threshold
        """None: the configured level; `_KEEP_ALL`: every record."""

    def bind(self, **fields: Any) -> Logger:
        """A logger like this one with `fields` added to every record."""
        return Logger({**self._bound, **fields}, threshold=self._threshold)

    def _log(self, level: int, name: str, event: str, fields: dict[str, Any]) -> None:
        threshold = _state.min_level if self._threshold is None else self._threshold
        if level < threshold:
            return
        record: dict[str, Any] = {"timestamp": _timestamp(), "level": name, "pid": _state.pid}
        vcpu = fields.pop("vcpu", self._bound.get("vcpu", _state.vcpu))
        if vcpu is not None:
            record["vcpu"] = vcpu
        record["event"] = event
        record.update(self._bound)
        record.update(fields)
        if "exc_info" in record:
            text = _exception_text(record.pop("exc_info"))
            if text is not None:
                record["exception"] = text
        if _state.echo_stderr:
            # A closed or broken stderr must not stop the log file.
            with contextlib.suppress(OSError, ValueError):
                sys.stderr.write(format_text(record) + "\n")
        _write(json.dumps(record, default=repr))

    def debug(self, event: str, **fields: Any) -> None:
        self._log(10, "debug", event, fields)

    def info(self, event: str, **fields: Any) -> None:
        self._log(20, "info", event, fields)

    def warning(self, event: str, **fields: Any) -> None:
        self._log(30, "warning", event, fields)

    def error(self, event: str, **fields: Any) -> None:
        self._log(40, "error", event, fields)

    def exception(self, event: str, **fields: Any) -> None:
        fields.setdefault("exc_info", True)
        self._log(40, "error", event, fields)

    def critical(self, event: str, **fields: Any) -> None:
        self._log(50, "critical", event, fields)


def configure_logging(
    path: Path,
    *,
    level: str,
    vcpu: int | None = None,
    echo_stderr: bool = False,
    mark_live: bool = False,
) -> Logger:
    """Send this process's records to `path` (appended, created with its folder if needed).

    Call it again after fork with the worker's own file and `vcpu`; the previous file is closed.
    `echo_stderr` also prints each record as a readable line on stderr. `mark_live` holds a
    shared lock on the file while it stays open (the supervisor's: see `run_is_live`).
    """
    name = level.lower()
    if name not in _LEVEL_NUMBERS:
        raise ValueError(f"unknown log level {level!r}; expected one of {', '.join(LEVELS)}")
    make_private_folder(path.parent)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
    if os.fstat(fd).st_mode & 0o777 != 0o600:  # a file left by an earlier run in a fixed folder
        os.fchmod(fd, 0o600)
    file = io.FileIO(fd, "a")
    if mark_live:
        fcntl.flock(file.fileno(), fcntl.LOCK_SH)
    _take_over_after_fork()
    with _state.lock:
        old, _state.file = _state.file, file
        _state.pid = os.getpid()
        _state.vcpu = vcpu
        _state.min_level = _LEVEL_NUMBERS[name]
        _state.echo_stderr = echo_stderr
    if old is not None:
        old.close()
    return get_logger()


def make_private_folder(path: Path) -> None:
    """Create `path` and its missing parents for this user only (0700): logs hold whatever
    the plugin wrote on stderr, secrets included. An existing `path` is made 0700 too."""
    missing = []
    for folder in (path, *path.parents):
        if folder.exists():
            break
        missing.append(folder)
    for folder in reversed(missing):
        with contextlib.suppress(FileExistsError):
            folder.mkdir(mode=0o700)
    if path.stat().st_mode & 0o777 != 0o700:
        with contextlib.suppress(PermissionError):  # another user's folder: theirs to protect
            os.chmod(path, 0o700)


def close_logging() -> None:
    """Close the log file (at exit, or in tests); later records go to stderr."""
    _take_over_after_fork()
    with _state.lock:
        old, _state.file = _state.file, None
        _state.echo_stderr = False
    if old is not None:
        old.close()


def get_logger(**initial: object) -> Logger:
    """A logger bound to `initial` fields, following the current configuration."""
    return Logger(dict(initial))


def essential_logger() -> Logger:
    """A logger whose records are written whatever the level (to the current file).

    Only for the few records a run's summary is built from: a run logged at ``warning`` must
    still say that it started, how it ended and what each VCPU did.
    """
    return Logger({}, threshold=_KEEP_ALL)


def run_is_live(folder: Path) -> bool:
    """Whether the supervisor that writes `folder`'s ``supervisor.jsonl`` is still running.

    False for a finished or dead run, and for a folder without that file.
    """
    try:
        file = io.FileIO(folder / SUPERVISOR_LOG, "r")
    except OSError:
        return False
    with file:
        try:
            fcntl.flock(file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(file.fileno(), fcntl.LOCK_UN)
        return False


def format_text(record: Mapping[str, Any]) -> str:
    """One record as a readable line: ``HH:MM:SS.ffffff  vcpu1  info     event  key=value``."""
    stamp = str(record.get("timestamp", ""))
    clock = stamp[11:26] if len(stamp) >= 26 and stamp[10] == "T" else stamp
    vcpu = record.get("vcpu")
    who = "super" if vcpu is None else f"vcpu{vcpu}"
    level = str(record.get("level", ""))
    event = str(record.get("event", ""))
    extras = "".join(
        f"  {key}={_text_value(value)}" for key, value in record.items() if key not in _FIXED_FIELDS
    )
    return f"{clock}  {who:<6} {level:<8} {event}{extras}"


def _text_value(value: object) -> str:
    if isinstance(value, str):
        if value and not any(c.isspace() or c in "\"'=" for c in value):
            return value
        return json.dumps(value)
    if isinstance(value, str | int | float | bool | list | dict) or value is None:
        return json.dumps(value, separators=(",", ":"), default=repr)
    return repr(value)
