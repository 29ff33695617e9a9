"""The one way a C library call made through ctypes reports its failure.

A call returns nonzero (with errno set) on failure; `check` turns that into an `OSError`
whose message names the call in the caller's terms ("PR_SET_NO_NEW_PRIVS: Invalid argument").
"""

from __future__ import annotations

import ctypes
import os

__all__ = ["check"]


def check(result: int, what: str) -> None:
    """Raise `OSError(errno, "what: strerror")` if `result`, a C call's return, is nonzero."""
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
