"""What a process holds open: VM fds a run must close before it ends, a device's fds."""

from __future__ import annotations

import os


def fds_on(target: str, pid: int | None = None) -> int:
    """How many fds of this process (or `pid`) are open on `target` (as /proc links name it)."""
    folder = f"/proc/{pid or 'self'}/fd"
    count = 0
    for name in os.listdir(folder):
        try:
            count += os.readlink(f"{folder}/{name}") == target
        except FileNotFoundError:  # the listing's own fd, or one closed since
            continue
    return count


def vm_fds() -> int:
    """How many VM fds this process holds."""
    return fds_on("anon_inode:kvm-vm")
