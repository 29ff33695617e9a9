"""Structured logs: one JSON object per line, one file per process.

The supervisor writes ``supervisor.jsonl`` and each VCPU worker ``vcpu-N.jsonl`` in the run's
log folder. Every record has ``timestamp`` (ISO 8601 UTC, always with microseconds so records
sort as text), ``level``, ``pid``, ``vcpu`` (when the process or the call has one) and
``event`` (the event name), then the call's own fields.

Each record is written with a single unbuffered ``write`` to a file opened for append, so a
crash (even SIGKILL) loses nothing and processes sharing a file never interleave within a
line. Records below the level are dropped by structlog's filtering logger before any
processing, so ``log.debug`` on the hot path costs a method call.

structlog's configuration is global to a process and loggers cache it on first use, so
re-configuring (a forked worker switching to its own file) must reach loggers that are
already cached: the processors and the output sink here are fixed objects whose state is
swapped, rather than new objects. (The one exception: a cached logger keeps the level filter
it was made with, so lowering the level later does not reach it; raising it does.)

A few records are kept at every level, because `vmsuper logs --summary` and ``--follow`` are
built on them: the supervisor's ``run_started`` and ``run_finished`` and each worker's
``vcpu_exit_counts``. They are written through `essential_logger`, which skips the level filter.

While a run is live its supervisor holds a shared `flock` on ``supervisor.jsonl`` (the lock
goes with the process, even on SIGKILL), so a reader tells a live run from a dead one with
`run_is_live` without trusting a pid that may have been reused.

The files are opened by shared/log_files.py, which imports no structlog: a run opens its log
there before it starts the plugin, and hands the file to `log_to` once structlog is in.
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import json
import os
import sys
import threading
from collections.abc import Mapping, MutableMapping
from pathlib import Path
from typing import Any

from vmsuper.shared.deferred_imports import NotInstalled, OnFirstUse
from vmsuper.shared.log_files import SUPERVISOR_LOG, open_log

# Modules structlog imports at the top of its package but vmsuper never uses: asyncio, for its
# async logging methods (``ainfo`` and the like); its standard library integration
# (`structlog.stdlib`, which subclasses logging's classes) and its deprecated thread-local
# context (`structlog.threadlocal`), which its package imports only to offer them; logging,
# which `structlog.processors` imports for its type annotations alone.
_DEFERRED_BY_STRUCTLOG = ("asyncio", "structlog.stdlib", "structlog.threadlocal", "logging")


def _import_structlog_lightly() -> None:
    """Import structlog without what only its console renderer and async methods need.

    structlog's console renderer imports rich when it can, about 100 ms that every
    `vmsuper run` would pay at start-up; the JSON logs written here never use it. So the
    import happens with rich hidden, and rich stays importable for everything after.

    Its package also imports asyncio (with ssl, about a tenth of the supervisor's imports)
    for async methods vmsuper does not use, and more that vmsuper does not use
    (`_DEFERRED_BY_STRUCTLOG`). structlog gets a stand-in for each instead
    (`deferred_imports.OnFirstUse`), which imports the real module on first use, so
    what needs them still works; once structlog is in, the stand-ins leave `sys.modules` and
    any later import gets the real module. Should a structlog release read one of them at
    import, its stand-in imports it then: correct, only no faster (tests/test_cli.py would
    notice).
    """
    if "structlog" in sys.modules:
        return
    with OnFirstUse(*_DEFERRED_BY_STRUCTLOG), NotInstalled("rich"):
        import structlog  # noqa: F401


_import_structlog_lightly()

import structlog  # noqa: E402
from structlog.typing import FilteringBoundLogger  # noqa: E402

LEVELS = ("debug", "info", "warning", "error", "critical")
_LEVEL_NUMBERS = {name: structlog.processors.NAME_TO_LEVEL[name] for name in LEVELS}
_FIXED_FIELDS = ("timestamp", "level", "pid", "vcpu", "event")


def vcpu_log_name(vcpu: int) -> str:
    """The log file name of VCPU worker `vcpu`."""
    return f"vcpu-{vcpu}.jsonl"


class _State:
    """What the processors and the sink read; replaced field by field on re-configuration."""

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


class _Sink:
    """The wrapped logger every structlog logger writes to; the file behind it can change."""

    def msg(self, message: str) -> None:
        data = (message + "\n").encode()
        with _state.lock:
            file = _state.file
            if file is None:
                sys.stderr.write(data.decode())
                return
            view = memoryview(data)
            while view:
                written = file.write(view)
                view = view[written or 0 :]

    debug = info = warning = warn = error = critical = exception = fatal = log = msg


_SINK = _Sink()


def _sink_factory(*_args: object) -> _Sink:
    return _SINK


def _drop_below_level(_logger: object, method: str, event: MutableMapping[str, Any]) -> Any:
    # Loggers cached before a re-configuration keep their old filtering class; this keeps a
    # raised level effective for them too.
    if structlog.processors.NAME_TO_LEVEL.get(method, 100) < _state.min_level:
        raise structlog.DropEvent
    return event


def _order_fields(_logger: object, _method: str, event: MutableMapping[str, Any]) -> Any:
    """Put the fixed fields first (readable lines) and add pid and vcpu."""
    event.setdefault("pid", _state.pid)
    if _state.vcpu is not None:
        event.setdefault("vcpu", _state.vcpu)
    ordered = {key: event.pop(key) for key in _FIXED_FIELDS if key in event}
    ordered.update(event)
    return ordered


def _echo(_logger: object, _method: str, event: MutableMapping[str, Any]) -> Any:
    if _state.echo_stderr:
        # A closed or broken stderr must not stop the log file.
        with contextlib.suppress(OSError, ValueError):
            sys.stderr.write(format_text(event) + "\n")
    return event


_KEPT_PROCESSORS: list[Any] = [
    structlog.processors.add_log_level,
    structlog.processors.TimeStamper(fmt="%Y-%m-%dT%H:%M:%S.%fZ", utc=True),
    structlog.processors.format_exc_info,
    _order_fields,
    _echo,
    structlog.processors.JSONRenderer(),
]
_PROCESSORS: list[Any] = [_drop_below_level, *_KEPT_PROCESSORS]


def configure_logging(
    path: Path,
    *,
    level: str,
    vcpu: int | None = None,
    echo_stderr: bool = False,
    mark_live: bool = False,
) -> FilteringBoundLogger:
    """Send this process's records to `path` (appended, created with its folder if needed).

    Call it again after fork with the worker's own file and `vcpu`; the previous file is closed.
    `echo_stderr` also prints each record as a readable line on stderr. `mark_live` holds a
    shared lock on the file while it stays open (the supervisor's: see `run_is_live`).
    """
    _level_number(level)  # before anything is created
    return log_to(
        open_log(path, mark_live=mark_live), level=level, vcpu=vcpu, echo_stderr=echo_stderr
    )


def log_to(
    file: io.FileIO, *, level: str, vcpu: int | None = None, echo_stderr: bool = False
) -> FilteringBoundLogger:
    """As `configure_logging`, to a file opened already (`log_files.open_log`), which this
    process's records then own."""
    number = _level_number(level)
    _take_over_after_fork()
    with _state.lock:
        old, _state.file = _state.file, file
        _state.pid = os.getpid()
        _state.vcpu = vcpu
        _state.min_level = number
        _state.echo_stderr = echo_stderr
    if old is not None:
        old.close()
    structlog.configure(
        processors=_PROCESSORS,
        wrapper_class=structlog.make_filtering_bound_logger(number),
        logger_factory=_sink_factory,
        cache_logger_on_first_use=True,
    )
    return get_logger()


def _level_number(level: str) -> int:
    name = level.lower()
    if name not in _LEVEL_NUMBERS:
        raise ValueError(f"unknown log level {level!r}; expected one of {', '.join(LEVELS)}")
    return _LEVEL_NUMBERS[name]


def close_logging() -> None:
    """Close the log file (at exit, or in tests); later records go to stderr."""
    _take_over_after_fork()
    with _state.lock:
        old, _state.file = _state.file, None
        _state.echo_stderr = False
    if old is not None:
        old.close()


def get_logger(**initial: object) -> FilteringBoundLogger:
    """A logger bound to `initial` fields, following the current configuration."""
    logger: FilteringBoundLogger = structlog.get_logger(**initial)
    return logger


def essential_logger() -> FilteringBoundLogger:
    """A logger whose records are written whatever the level (to the current file).

    Only for the few records a run's summary is built from: a run logged at ``warning`` must
    still say that it started, how it ended and what each VCPU did.
    """
    logger: FilteringBoundLogger = structlog.wrap_logger(
        _SINK,
        processors=_KEPT_PROCESSORS,
        wrapper_class=structlog.make_filtering_bound_logger(0),
        cache_logger_on_first_use=False,
    )
    return logger


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
