"""vmsuper's exit status: one place that turns what happened into a number.

0      the plugin exited 0 and nothing failed
1-255  the plugin's own non-zero exit code, passed through (124, 125, 128+N included)
124    a VCPU stopped abnormally (guest triple fault, KVM internal error, failed entry,
       HLT without the in-kernel irqchip) or a VCPU worker died
125    a supervisor-side failure (the VM could not be set up, an internal error)
128+N  the plugin was killed by signal N, or vmsuper itself was stopped by signal N
       (SIGTERM, SIGINT, SIGHUP) and shut down cleanly
The first cause wins: a plugin that exits 0 after its VCPU triple-faulted still yields 124.
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass

EXIT_OK = 0
EXIT_VCPU_FAILED = 124
EXIT_SUPERVISOR_FAILED = 125
EXIT_CONFIG_ERROR = 2


@dataclass(frozen=True)
class Failure:
    """The first thing that went wrong, with the status it maps to."""

    status: int
    reason: str


def vcpu_failure(reason: str) -> Failure:
    return Failure(EXIT_VCPU_FAILED, reason)


def supervisor_failure(reason: str) -> Failure:
    return Failure(EXIT_SUPERVISOR_FAILED, reason)


def signal_name(signum: int) -> str:
    """SIGTERM for 15; "signal 35" for a number without a name (real-time signals)."""
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def stopped_by_signal(signum: int) -> Failure:
    return Failure(128 + signum, f"vmsuper stopped by {signal_name(signum)}")


def plugin_status(wait_status: int | None) -> tuple[int, str]:
    """Status and description of the plugin's own end, from its raw wait status."""
    if wait_status is None:
        return EXIT_SUPERVISOR_FAILED, "the plugin's exit status is unknown"
    if os.WIFSIGNALED(wait_status):
        sig = os.WTERMSIG(wait_status)
        return 128 + sig, f"plugin killed by {signal_name(sig)}"
    code = os.WEXITSTATUS(wait_status)
    return code, f"plugin exited with status {code}"


def decide(failure: Failure | None, plugin_wait_status: int | None) -> tuple[int, str]:
    """The run's exit status and reason: the first failure, else the plugin's own status."""
    if failure is not None:
        return failure.status, failure.reason
    return plugin_status(plugin_wait_status)
