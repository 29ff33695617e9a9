"""A run's log folder and the liveness lock on its supervisor log, without structlog.

`vmsuper run` makes its log folder before it starts the plugin, and imports structlog
(shared/logs.py) only once the plugin is starting, so that import overlaps the plugin's own
start instead of delaying it.
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import os
from pathlib import Path

SUPERVISOR_LOG = "supervisor.jsonl"


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
