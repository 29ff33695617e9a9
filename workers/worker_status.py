"""How a VCPU worker process ends: its exit statuses and the sentence for each.

The worker ends with `os._exit(status)`; the supervisor reaps it and, with the reason the worker
stored in its shared slot, says what happened (`describe_exit`). `supervisor/outcome.py`
decides vmsuper's own exit status from these.
"""

from __future__ import annotations

import enum
import os
import signal
from typing import Final

__all__ = ["STATUS_MEANINGS", "WorkerStatus", "describe_exit"]


class WorkerStatus(enum.IntEnum):
    """Exit statuses of a VCPU worker process."""

    CLEAN = 0
    """The plugin hung up or sent Shutdown, or the supervisor stopped the worker."""
    GUEST_SHUTDOWN = 10
    """The guest shut down (`KVM_EXIT_SHUTDOWN`, e.g. a triple fault)."""
    INTERNAL_ERROR = 11
    """KVM reported an internal error (`KVM_EXIT_INTERNAL_ERROR`, e.g. emulation failed)."""
    FAILED_ENTRY = 12
    """The hardware refused to enter the guest (`KVM_EXIT_FAIL_ENTRY`)."""
    HALTED = 13
    """The guest halted with no in-kernel irqchip to wake it (`KVM_EXIT_HLT`)."""
    PLUGIN_FAILURE = 14
    """The channel to the plugin failed or the plugin broke the protocol beyond an errno."""
    UNEXPECTED = 15
    """An unexpected exception in the worker (a bug; the traceback is in its log)."""
    UNHANDLED_EXIT = 16
    """The guest made an exit vmsuper does not handle."""
    RUN_FAILED = 17
    """`KVM_RUN` itself failed with an errno other than EINTR/EAGAIN."""
    SETUP_FAILED = 18
    """The worker could not set itself up after fork (or its supervisor was already gone)."""
    TRANSPORT_MISMATCH = 19
    """The plugin speaks the other VCPU transport than the config says."""


STATUS_MEANINGS: Final[dict[int, str]] = {
    WorkerStatus.CLEAN: "stopped cleanly",
    WorkerStatus.GUEST_SHUTDOWN: "guest shut down (triple fault)",
    WorkerStatus.INTERNAL_ERROR: "KVM internal error",
    WorkerStatus.FAILED_ENTRY: "guest entry failed",
    WorkerStatus.HALTED: "guest halted",
    WorkerStatus.PLUGIN_FAILURE: "plugin channel failure",
    WorkerStatus.UNEXPECTED: "unexpected error in the VCPU worker",
    WorkerStatus.UNHANDLED_EXIT: "unhandled exit",
    WorkerStatus.RUN_FAILED: "KVM_RUN failed",
    WorkerStatus.SETUP_FAILED: "VCPU worker setup failed",
    WorkerStatus.TRANSPORT_MISMATCH: "VCPU transport mismatch",
}


def describe_exit(wait_status: int, stop_reason: str = "") -> str | None:
    """A sentence for a worker's wait status (the caller names the VCPU, as in "vcpu 1:
    worker exited with status 14 (...)"); None for a clean stop."""
    if os.WIFEXITED(wait_status):
        code = os.WEXITSTATUS(wait_status)
        if code == WorkerStatus.CLEAN:
            return None
        meaning = STATUS_MEANINGS.get(code, "unknown exit status")
        if stop_reason.startswith(meaning):
            meaning = stop_reason  # it already says what the status means, and more
        elif stop_reason:
            meaning = f"{meaning}: {stop_reason}"
        return f"worker exited with status {code} ({meaning})"
    if os.WIFSIGNALED(wait_status):
        number = os.WTERMSIG(wait_status)
        try:
            name = signal.Signals(number).name
        except ValueError:
            name = f"signal {number}"
        return f"worker was killed by signal {number} ({name})"
    return f"worker ended with wait status {wait_status:#x}"
