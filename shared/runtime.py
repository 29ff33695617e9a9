"""The host-wide runtime folder of vmsuper: where live runs publish themselves (`run.json`
entries, see supervisor/runinfo.py) and where the pytest plugin's capacity guard keeps its slot
files (vmsuper/capacity.py)."""

from __future__ import annotations

import os

TYPE_CHECKING = False  # `vmsuper run` reads the runtime folder before it imports typing
if TYPE_CHECKING:
    from pathlib import Path
    from typing import Final

__all__ = [
    "RUNTIME_VARIABLE",
    "RuntimeDirError",
    "make_runtime_dir",
    "runtime_dir",
    "runtime_folder",
]

RUNTIME_VARIABLE: Final = "VMSUPER_RUNTIME_DIR"
"""Overrides the runtime folder (tests use it to see only their own runs)."""


class RuntimeDirError(Exception):
    """The runtime folder exists but belongs to another user."""


def runtime_dir() -> Path:
    """The runtime folder (`runtime_folder`)."""
    from pathlib import Path

    return Path(runtime_folder())


def runtime_folder() -> str:
    """``/run/vmsuper`` as root, else ``$XDG_RUNTIME_DIR/vmsuper``, else
    ``<tmp>/vmsuper-<uid>``; `VMSUPER_RUNTIME_DIR` wins. A string: the served `vmsuper run`
    looks for its server here before it imports anything it can do without (pathlib)."""
    override = os.environ.get(RUNTIME_VARIABLE)
    if override:
        return override
    if os.geteuid() == 0:
        return "/run/vmsuper"
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg:
        return os.path.join(xdg, "vmsuper")
    import tempfile  # here: the only case that needs it (a few ms of `vmsuper run`'s start-up)

    return os.path.join(tempfile.gettempdir(), f"vmsuper-{os.geteuid()}")


def make_runtime_dir(path: Path) -> Path:
    """Create `path` (mode 0700) if needed and check this user owns it; returns it."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    owner = path.stat().st_uid
    if owner != os.geteuid():
        raise RuntimeDirError(f"runtime folder {path} belongs to uid {owner}, not to this user")
    return path
