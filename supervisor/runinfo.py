"""Where a running supervisor can be found: its `run.json`.

A supervisor writes the same small JSON document twice while it runs: into its log folder, and
as ``<pid>.json`` into the host's runtime folder, so `vmsuper stats` and `vmsuper top` can find
one run by its log folder or pid, or every run on the host. The document says who the run is
(pid, the process's start time, config, log folder) and how to map its counters read-only (the
shared-memory region's memfd, as ``/proc/<pid>/fd/<fd>``).

Both copies are written atomically (a temporary file, then `rename`) and removed at a clean
shutdown. A supervisor killed outright leaves them behind: an entry whose pid is gone, or now
belongs to a process started at another time, is dead; readers skip it and `remove_dead` (called
by every new run and every reader of the runtime folder) deletes it.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Final, NamedTuple

from vmsuper.shared.runtime import (
    RUNTIME_VARIABLE,
    RuntimeDirError,
    make_runtime_dir,
    runtime_dir,
)

__all__ = [
    "FORMAT",
    "RUNTIME_VARIABLE",
    "RUN_FILE",
    "RunInfo",
    "RunInfoError",
    "find_runs",
    "load",
    "publish",
    "remove_dead",
    "runtime_dir",
    "start_ticks",
    "withdraw",
]

FORMAT: Final = 1
RUN_FILE: Final = "run.json"


class RunInfoError(Exception):
    """A run.json is missing, unreadable or not one vmsuper wrote."""


class RunInfo(NamedTuple):
    """One run, as its supervisor published it."""

    pid: int
    start_ticks: int
    """The supervisor's start in clock ticks after boot (``/proc/<pid>/stat``): with the pid,
    it tells the run apart from a later process that reuses the pid."""
    start_time: float
    """The same in seconds since the epoch."""
    started_at: str
    """The same, in ISO 8601 UTC, for people."""
    host: str
    config: str | None
    log_dir: str
    vcpus: int
    shm_fd: int
    """The region's memfd in the supervisor: map ``/proc/<pid>/fd/<shm_fd>`` read-only."""
    format: int = FORMAT

    def to_json(self) -> str:
        return json.dumps(self._asdict(), indent=1) + "\n"

    @classmethod
    def from_json(cls, text: str, where: str) -> RunInfo:
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise RunInfoError(f"{where}: not JSON: {exc}") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise RunInfoError(f"{where}: not a run.json of format {FORMAT}")
        try:
            info = cls(**data)
        except TypeError as exc:
            raise RunInfoError(f"{where}: unexpected fields: {exc}") from None
        types: dict[str, Any] = {
            "pid": int,
            "start_ticks": int,
            "start_time": (int, float),
            "started_at": str,
            "host": str,
            "config": (str, type(None)),
            "log_dir": str,
            "vcpus": int,
            "shm_fd": int,
        }
        for name, kind in types.items():
            if not isinstance(getattr(info, name), kind):
                raise RunInfoError(f"{where}: field {name!r} has the wrong type")
        return info

    def is_alive(self) -> bool:
        """Whether the supervisor that wrote this still runs (same pid, same start)."""
        return self.pid > 0 and start_ticks(self.pid) == self.start_ticks


def start_ticks(pid: int) -> int | None:
    """When process `pid` started, in clock ticks after boot; None if there is no such
    process (a zombie counts as gone: it runs nothing)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    fields = stat[stat.rfind(b")") + 2 :].split()  # the name may hold spaces and parentheses
    if fields[0] == b"Z":
        return None
    return int(fields[19])


def _boot_time() -> float:
    with open("/proc/stat", "rb") as f:
        for line in f:
            if line.startswith(b"btime "):
                return float(line.split()[1])
    raise RunInfoError("/proc/stat has no btime")


def _write_atomically(path: Path, text: str) -> None:
    # A name of this process's own rather than tempfile's (whose import, with random's, costs
    # every `vmsuper run` a few ms at start-up). Whatever a dead process of the same pid left
    # there (a file, a link) is removed first, and the new file is created afresh, 0600.
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(temporary)
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


def publish(*, log_dir: Path, config: Path | None, vcpus: int, shm_fd: int) -> list[Path]:
    """Write this process's run.json into `log_dir` and the runtime folder (first removing
    dead entries there); returns the paths written, for `withdraw`.

    A runtime folder that cannot be used costs only the host-wide listing: the log folder's
    copy is still written, and the error is raised only if neither could be."""
    pid = os.getpid()
    ticks = start_ticks(pid)
    assert ticks is not None
    started = _boot_time() + ticks / os.sysconf("SC_CLK_TCK")
    info = RunInfo(
        pid=pid,
        start_ticks=ticks,
        start_time=started,
        started_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        host=socket.gethostname(),
        config=str(config.resolve()) if config is not None else None,
        log_dir=str(log_dir.resolve()),
        vcpus=vcpus,
        shm_fd=shm_fd,
    )
    text = info.to_json()
    written: list[Path] = []
    _write_atomically(log_dir / RUN_FILE, text)
    written.append(log_dir / RUN_FILE)
    folder = runtime_dir()
    with contextlib.suppress(OSError, RunInfoError, RuntimeDirError):
        make_runtime_dir(folder)
        remove_dead(folder)
        _write_atomically(folder / f"{pid}.json", text)
        written.append(folder / f"{pid}.json")
    return written


def withdraw(paths: list[Path]) -> None:
    """Remove what `publish` wrote (a clean shutdown)."""
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def load(path: Path) -> RunInfo:
    try:
        text = path.read_text()
    except OSError as exc:
        raise RunInfoError(f"cannot read {path}: {exc.strerror}") from None
    return RunInfo.from_json(text, str(path))


def _entries(folder: Path) -> Iterator[tuple[Path, RunInfo | None]]:
    try:
        names = sorted(os.listdir(folder))
    except FileNotFoundError:
        return
    for name in names:
        if not name.endswith(".json") or name.startswith("."):
            continue
        path = folder / name
        try:
            yield path, load(path)
        except RunInfoError:
            yield path, None


def remove_dead(folder: Path | None = None) -> list[Path]:
    """Delete the entries of runs that are gone (and unreadable ones); returns them."""
    removed = []
    for path, info in _entries(folder or runtime_dir()):
        if info is None or not info.is_alive():
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            removed.append(path)
    return removed


def find_runs(folder: Path | None = None) -> list[RunInfo]:
    """Every live run of the runtime folder, oldest first; dead entries are removed."""
    folder = folder or runtime_dir()
    remove_dead(folder)
    runs = [info for _, info in _entries(folder) if info is not None and info.is_alive()]
    return sorted(runs, key=lambda r: (r.start_ticks, r.pid))
