"""Finding a command on PATH, as `shutil.which` does on Linux.

vmsuper's own, because a run's start-up would otherwise import shutil (with the compression
modules shutil imports) for this alone: the plugin's bare name in the config, bwrap, and a
script's ``#!/usr/bin/env`` command are looked up on every sandboxed run.
"""

from __future__ import annotations

import os

__all__ = ["which"]


def which(name: str, path: str | None = None) -> str | None:
    """The executable file `name` names on `path` (a PATH value; None: the environment's),
    or None; a name with a "/" is checked as it is, not looked up."""
    if os.sep in name:
        return name if _is_executable_file(name) else None
    if path is None:
        path = os.environ.get("PATH", os.defpath)
    for folder in path.split(os.pathsep):
        if not folder:
            continue
        candidate = os.path.join(folder, name)
        if _is_executable_file(candidate):
            return candidate
    return None


def _is_executable_file(path: str) -> bool:
    return os.path.exists(path) and os.access(path, os.X_OK) and not os.path.isdir(path)
