"""Structured logs: one JSON object per line, one file per process.

The supervisor writes ``supervisor.jsonl`` and each VCPU worker ``vcpu-N.jsonl`` in the run's
log folder. Every record has ``timestamp`` (ISO 8601 UTC, always with microseconds so records
sort as text), ``level``, ``pid``, ``vcpu`` (when the process or the call has one) and
``event`` (the event name), then the call's own fields. ``exc_info=True`` (as
``log.exception`` sets) adds the current exception's traceback as ``exception``.

Each record is written with a single unbuffered ``write`` to a file opened for append, so a
crash (even SIGKILL) loses nothing and processes sharing a file never interleave within a
line. Records below the level are dropped before anything is formatted, so ``log.debug`` on
the hot path costs a method call and a comparison.

The configuration is global to a process and every logger reads it at each call, so
re-configuring (a forked worker switching to its own file and level) reaches loggers made
before. Until `configure_logging` is called, records of level info and up go to stderr.

This is a small logger of its own rather than a logging library's: it is on the path of every
`vmsuper run` start, and the one this replaced (structlog) imports asyncio, a third of the
supervisor's import time.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys
import threading
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

SUPERVISOR_LOG = "supervisor.jsonl"
LEVELS = ("debug", "info", "warning", "error", "critical")
DEBUG, INFO, WARNING, ERROR, CRITICAL = 10, 20, 30, 40, 50
_LEVEL_NUMBERS = dict(zip(LEVELS, (DEBUG, INFO, WARNING, ERROR, CRITICAL), strict=True))
_FIXED_FIELDS = ("timestamp", "level", "pid", "vcpu", "event")
_TIME_FORMAT = "%Y-%m-%dT%H:%M:%S.%fZ"


def vcpu_log_name(vcpu: int) -> str:
    """The log file name of VCPU worker `vcpu`."""
    return f"vcpu-{vcpu}.jsonl"


class _State:
    """What every logger reads at each call; changed field by field on re-configuration."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.vcpu: int | None = None
        self.min_level = INFO
        self.echo_stderr = False
        self.file: io.FileIO | None = None
        self.lock = threading.Lock()


_state = _State()


def _after_fork_in_child() -> None:
    # A thread of the parent may have held the lock at fork time; the child has no such thread.
    _state.pid = os.getpid()
    _state.lock = threading.Lock()


os.register_at_fork(after_in_child=_after_fork_in_child)


def _write_line(line: str) -> None:
    data = (line + "\n").encode()
    with _state.lock:
        file = _state.file
        if file is None:
            sys.stderr.write(data.decode())
            return
        view = memoryview(data)
        while view:
            written = file.write(view)
            view = view[written or 0 :]


def _exception_text(exc_info: Any) -> str | None:
    """The traceback `exc_info` names: an exception, an exc_info tuple, or true for the
    exception being handled; None if there is none."""
    if isinstance(exc_info, BaseException):
        exc_info = (type(exc_info), exc_info, exc_info.__traceback__)
    elif not (isinstance(exc_info, tuple) and len(exc_info) == 3):
        exc_info = sys.exc_info() if exc_info else (None, None, None)
    if not isinstance(exc_info[1], BaseException):
        return None
    import traceback  # only when there is a traceback to format

    return "".join(traceback.format_exception(*exc_info)).removesuffix("\n")


def _emit(level: str, context: Mapping[str, Any], event: str, fields: dict[str, Any]) -> None:
    record = {**context, **fields}
    record["event"] = event
    record["level"] = level
    record["timestamp"] = datetime.now(UTC).strftime(_TIME_FORMAT)
    if "exc_info" in record:
        text = _exception_text(record.pop("exc_info"))
        if text is not None:
            record["exception"] = text
    record.setdefault("pid", _state.pid)
    if _state.vcpu is not None:
        record.setdefault("vcpu", _state.vcpu)
    # The fixed fields first, for readable lines.
    ordered = {key: record.pop(key) for key in _FIXED_FIELDS if key in record}
    ordered.update(record)
    if _state.echo_stderr:
        # A closed or broken stderr must not stop the log file.
        with contextlib.suppress(OSError, ValueError):
            sys.stderr.write(format_text(ordered) + "\n")
    _write_line(json.dumps(ordered, default=repr))


class Logger:
    """Writes records: ``log.info("event_name", key=value, ...)``, with its bound fields."""

    __slots__ = ("_context",)

    def __init__(self, context: Mapping[str, Any] | None = None) -> None:
        self._context = dict(context or {})

    def bind(self, **fields: Any) -> Logger:
        """A logger that adds `fields` to every record (a call's own fields win)."""
        return Logger({**self._context, **fields})

    def debug(self, event: str, **fields: Any) -> None:
        if _state.min_level <= DEBUG:
            _emit("debug", self._context, event, fields)

    def info(self, event: str, **fields: Any) -> None:
        if _state.min_level <= INFO:
            _emit("info", self._context, event, fields)

    def warning(self, event: str, **fields: Any) -> None:
        if _state.min_level <= WARNING:
            _emit("warning", self._context, event, fields)

    def error(self, event: str, **fields: Any) -> None:
        if _state.min_level <= ERROR:
            _emit("error", self._context, event, fields)

    def critical(self, event: str, **fields: Any) -> None:
        if _state.min_level <= CRITICAL:
            _emit("critical", self._context, event, fields)

    def exception(self, event: str, **fields: Any) -> None:
        """An error record with the traceback of the exception being handled."""
        fields.setdefault("exc_info", True)
        self.error(event, **fields)


def configure_logging(
    path: Path,
    *,
    level: str,
    vcpu: int | None = None,
    echo_stderr: bool = False,
) -> Logger:
    """Send this process's records to `path` (appended, created with its folder if needed).

    Call it again after fork with the worker's own file and `vcpu`; the previous file is closed.
    `echo_stderr` also prints each record as a readable line on stderr.
    """
    name = level.lower()
    if name not in _LEVEL_NUMBERS:
        raise ValueError(f"unknown log level {level!r}; expected one of {', '.join(LEVELS)}")
    path.parent.mkdir(parents=True, exist_ok=True)
    file = io.FileIO(path, "a")
    with _state.lock:
        old, _state.file = _state.file, file
        _state.pid = os.getpid()
        _state.vcpu = vcpu
        _state.min_level = _LEVEL_NUMBERS[name]
        _state.echo_stderr = echo_stderr
    if old is not None:
        old.close()
    return get_logger()


def close_logging() -> None:
    """Close the log file (at exit, or in tests); later records go to stderr."""
    with _state.lock:
        old, _state.file = _state.file, None
        _state.echo_stderr = False
    if old is not None:
        old.close()


def get_logger(**initial: object) -> Logger:
    """A logger bound to `initial` fields, following the current configuration."""
    return Logger(initial)


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
