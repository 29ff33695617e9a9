"""The machine the figures were measured on, and the harness's own low-latency switch.

`[vm] low_latency` makes vmsuper hold /dev/cpu_dma_latency at 0 while its VCPUs run; the C
reference is not vmsuper, so for its low-latency figures the harness holds the same file
itself (`held_low_latency`).
"""

from __future__ import annotations

import contextlib
import os
import platform
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Final

CPU_DMA_LATENCY: Final = "/dev/cpu_dma_latency"


def _read(path: str) -> str:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return ""


def cpu_model() -> str:
    for line in _read("/proc/cpuinfo").splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name":
            return value.strip()
    return platform.processor() or "unknown"


def describe() -> dict[str, Any]:
    """What the figures depend on: CPU, kernel, Python, CPU count, idle driver, KVM."""
    return {
        "cpu_model": cpu_model(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "nproc": os.cpu_count() or 0,
        "cpuidle_driver": _read("/sys/devices/system/cpu/cpuidle/current_driver") or "none",
        "hypervisor": "yes" if " hypervisor" in f" {_read('/proc/cpuinfo')}" else "no",
        "kvm_module": next(
            (m for m in ("kvm_intel", "kvm_amd", "kvm_pvm") if Path(f"/sys/module/{m}").exists()),
            "unknown",
        ),
        "cpu_dma_latency_writable": os.access(CPU_DMA_LATENCY, os.W_OK),
    }


@contextlib.contextmanager
def held_low_latency(enabled: bool) -> Iterator[bool]:
    """Hold /dev/cpu_dma_latency at 0 while inside (if `enabled`); yields whether it is held."""
    if not enabled:
        yield False
        return
    try:
        fd = os.open(CPU_DMA_LATENCY, os.O_WRONLY | os.O_CLOEXEC)
    except OSError:
        yield False
        return
    try:
        os.write(fd, struct.pack("<i", 0))
        yield True
    finally:
        os.close(fd)
