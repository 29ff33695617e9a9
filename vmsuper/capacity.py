"""A host-wide cap on the VCPUs that test VMs run at once, across processes and sessions.

The cap is N slot files in ``<runtime folder>/capacity/`` (see `vmsuper.shared.runtime`),
each held with `flock`: a VM takes as many slots as it has VCPUs (all N if it has more), and
gives them back when it ends. The kernel drops a `flock` when its file is closed, so a test
process that dies frees its slots at once: nothing to clean up, no stale lock. pytest-xdist
workers and separate pytest sessions on one host share the same files, so together they never
run more than N VCPUs (every party must use the same N; the default is the CPU count).

Taking slots is all or nothing, under a gate (one more `flock`ed file): only the gate's holder
waits for slots, and a holder of slots never waits for anything, so two VMs can never each
hold part of what the other needs. The gate is taken in the kernel's order of arrival.
"""

from __future__ import annotations

import fcntl
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from vmsuper.shared.runtime import make_runtime_dir, runtime_dir

__all__ = [
    "MAX_VCPUS_VARIABLE",
    "CapacityError",
    "CapacityGuard",
    "Lease",
    "default_max_vcpus",
]

MAX_VCPUS_VARIABLE: Final = "VMSUPER_MAX_VCPUS"
POLL: Final = 0.02
"""Seconds between looks at the slots while the gate's holder waits for enough of them."""


class CapacityError(Exception):
    """The cap is not a positive integer, or the slot folder cannot be used."""


def default_max_vcpus() -> int:
    """`VMSUPER_MAX_VCPUS` if set, else the host's CPU count."""
    text = os.environ.get(MAX_VCPUS_VARIABLE)
    if text is None or text == "":
        return os.cpu_count() or 1
    return parse_max_vcpus(text, MAX_VCPUS_VARIABLE)


def parse_max_vcpus(text: str, where: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise CapacityError(f"{where} must be a positive integer, got {text!r}")
    return value


@dataclass
class Lease:
    """Slots held for one VM; `release` (or closing the process) gives them back."""

    fds: list[int]
    waited_s: float
    """How long taking the slots waited (0.0 if they were free)."""
    released: bool = field(default=False)

    @property
    def waited(self) -> bool:
        return self.waited_s > 0.0

    def release(self) -> None:
        if self.released:
            return
        self.released = True
        for fd in self.fds:
            os.close(fd)  # drops the flock
        self.fds.clear()

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class CapacityGuard:
    """At most `max_vcpus` VCPUs of VMs at once on this host (see the module docstring)."""

    def __init__(self, max_vcpus: int, folder: Path | None = None) -> None:
        if max_vcpus < 1:
            raise CapacityError(f"max_vcpus must be at least 1, got {max_vcpus}")
        self.max_vcpus = max_vcpus
        self.folder = folder if folder is not None else runtime_dir() / "capacity"

    def _open(self, name: str) -> int:
        try:
            make_runtime_dir(self.folder)
            return os.open(self.folder / name, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except (OSError, ValueError) as exc:
            raise CapacityError(f"cannot use the capacity folder {self.folder}: {exc}") from None

    def acquire(self, vcpus: int, *, timeout: float | None = None) -> Lease:
        """Take min(`vcpus`, max_vcpus) slots, waiting as long as it takes (or `timeout`
        seconds, then TimeoutError)."""
        wanted = max(1, min(vcpus, self.max_vcpus))
        started = time.monotonic()
        waited = False
        gate = self._open("gate")
        try:
            try:
                fcntl.flock(gate, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                waited = True
                self._lock_gate(gate, started, timeout)
            held: list[int] = []
            try:
                while True:
                    self._take_free(held, wanted)
                    if len(held) == wanted:
                        break
                    waited = True
                    if timeout is not None and time.monotonic() - started > timeout:
                        raise TimeoutError(
                            f"no {wanted} free VCPU slots of {self.max_vcpus} in {timeout} s"
                        )
                    time.sleep(POLL)
            except BaseException:
                for fd in held:
                    os.close(fd)
                raise
        finally:
            os.close(gate)  # also unlocks it
        return Lease(held, time.monotonic() - started if waited else 0.0)

    def _lock_gate(self, gate: int, started: float, timeout: float | None) -> None:
        if timeout is None:
            fcntl.flock(gate, fcntl.LOCK_EX)
            return
        while True:
            try:
                fcntl.flock(gate, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                if time.monotonic() - started > timeout:
                    raise TimeoutError(f"the capacity gate stayed taken for {timeout} s") from None
                time.sleep(POLL)

    def _take_free(self, held: list[int], wanted: int) -> None:
        """Add free slots to `held` (fds of locked slot files) until it has `wanted`."""
        taken = {os.fstat(fd).st_ino for fd in held}
        for index in range(self.max_vcpus):
            if len(held) == wanted:
                return
            fd = self._open(f"slot-{index}")
            if os.fstat(fd).st_ino in taken:
                os.close(fd)
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            taken.add(os.fstat(fd).st_ino)
            held.append(fd)
