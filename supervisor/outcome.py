"""vmsuper's exit status: one place that turns what happened into a number.

0      the plugin exited 0 and nothing failed
1-255  the plugin's own non-zero exit code, passed through (124, 125, 128+N included)
124    the run timed out (`--timeout`, `[vm] timeout`) and shut down cleanly
125    a supervisor-side failure (the VM could not be set up, the plugin could not be started,
       the log folder could not be made, an internal error)
126    a VCPU stopped abnormally (guest triple fault, KVM internal error, failed entry,
       HLT without the in-kernel irqchip) or a VCPU worker died
128+N  the plugin was killed by signal N, or vmsuper itself was stopped by signal N
       (SIGTERM, SIGINT, SIGHUP) and shut down cleanly; 137 (SIGKILL) also when the plugin hit
       the memory or process limit of its cgroup
124 and 125 mean what they mean to users of GNU `timeout` (timed out; the wrapper itself
failed), so a script that wraps a run in either reads the statuses the same way. The first
cause wins: a plugin that exits 0 after its VCPU triple-faulted still yields 126.
"""

from __future__ import annotations

import os
import signal
from typing import NamedTuple

from vmsuper.workers.worker_status import WorkerStatus

EXIT_OK = 0
EXIT_TIMED_OUT = 124
EXIT_SUPERVISOR_FAILED = 125
EXIT_VCPU_FAILED = 126
EXIT_CONFIG_ERROR = 2


class Failure(NamedTuple):
    """The first thing that went wrong, with the status it maps to."""

    status: int
    reason: str


def vcpu_failure(reason: str) -> Failure:
    return Failure(EXIT_VCPU_FAILED, reason)


def worker_failure(vcpu: int, reason: str, worker_code: int | None, stop_reason: str) -> Failure:
    """A VCPU worker that stopped for `reason`: an abnormal VCPU stop, except a plugin that
    speaks the other VCPU transport, which vmsuper could not run as configured (its stop
    reason says the fix)."""
    if worker_code == WorkerStatus.TRANSPORT_MISMATCH:
        return Failure(EXIT_SUPERVISOR_FAILED, stop_reason)
    return Failure(EXIT_VCPU_FAILED, f"vcpu {vcpu}: {reason}")


def supervisor_failure(reason: str) -> Failure:
    return Failure(EXIT_SUPERVISOR_FAILED, reason)


def plugin_limit_reached(reason: str) -> Failure:
    """The plugin hit a limit of its cgroup and was killed with SIGKILL: 128+9, as a plugin
    killed by SIGKILL, with the reason naming the limit."""
    return Failure(128 + signal.SIGKILL, reason)


def timed_out(seconds: float) -> Failure:
    return Failure(EXIT_TIMED_OUT, f"timed out after {seconds:g} s")


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
