"""`[vm] low_latency`: /dev/cpu_dma_latency held at 0 while the VM's VCPUs run.

While the file is open with 0 written to it, the kernel's idle governor keeps every CPU of the
host in shallow idle states, so that a wake-up takes microseconds rather than tens: what a
VCPU's hand-offs want, at a cost in power that every other process of the host shares. So the
VCPU set holds it from the plugin's Start to the run's shutdown (supervisor/vcpus.py): not
while the plugin sets the VM up, and not at all for a plugin that never starts the VCPUs. A
run that held it throughout also waited longer for its VM's release at the end
(docs/performance.md, "Start-up").
"""

from __future__ import annotations

import os
import struct
from typing import Any, Final

LATENCY_FILE: Final = "/dev/cpu_dma_latency"


class LatencyHold:
    """The request for shallow idle states, held from `take` to `release` (both idempotent)."""

    def __init__(self, path: str = LATENCY_FILE) -> None:
        self._path = path
        self._fd = -1

    @property
    def held(self) -> bool:
        return self._fd >= 0

    def take(self, log: Any) -> bool:
        """Hold the request; a refusal is logged (`low_latency_unavailable`, with the reason)
        and the run goes on without it (False)."""
        if self._fd >= 0:
            return True
        fd = -1
        try:
            fd = os.open(self._path, os.O_WRONLY | os.O_CLOEXEC)
            os.write(fd, struct.pack("<i", 0))
        except OSError as exc:
            if fd >= 0:  # opened, but the request was refused: the fd would hold nothing
                os.close(fd)
            log.warning("low_latency_unavailable", error=str(exc))
            return False
        self._fd = fd
        return True

    def release(self) -> None:
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)
