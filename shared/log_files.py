"""A process's log file, opened without structlog.

`vmsuper run` opens its log before it starts the plugin, so that a log folder it cannot make
ends the run before anything has started; it imports structlog (shared/logs.py, tens of ms)
only then, while the plugin starts (supervisor/launch.py).
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import os
from pathlib import Path

SUPERVISOR_LOG = "supervisor.jsonl"


def open_log(path: Path, *, mark_live: bool = False) -> io.FileIO:
    """`path` opened for appending (created 0600, with its folder, if needed).

    `mark_live` holds a shared lock on the file while it stays open (the supervisor's: see
    `logs.run_is_live`).
    """
    make_private_folder(path.parent)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
    file = io.FileIO(fd, "a")
    try:
        if os.fstat(fd).st_mode & 0o777 != 0o600:  # left by an earlier run in a fixed folder
            os.fchmod(fd, 0o600)
        if mark_live:
            fcntl.flock(fd, fcntl.LOCK_SH)
    except BaseException:
        file.close()
        raise
    return file


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
