"""What the test's own process holds: VM fds a run must close before it ends."""

from __future__ import annotations

import os


def vm_fds() -> int:
    """How many VM fds this process holds."""
    count = 0
    for name in os.listdir("/proc/self/fd"):
        try:
            count += os.readlink(f"/proc/self/fd/{name}") == "anon_inode:kvm-vm"
        except FileNotFoundError:  # the listing's own fd, closed by now
            continue
    return count
