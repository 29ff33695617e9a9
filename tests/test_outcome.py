"""The exit-status table (supervisor/outcome.py): one pure function, every row."""

from __future__ import annotations

import signal

from vmsuper.supervisor import outcome


def _exited(code: int) -> int:
    return code << 8


def test_the_table_keeps_timeouts_apart_from_failures() -> None:
    statuses = {
        outcome.EXIT_TIMED_OUT,
        outcome.EXIT_SUPERVISOR_FAILED,
        outcome.EXIT_VCPU_FAILED,
        outcome.EXIT_CONFIG_ERROR,
    }
    assert len(statuses) == 4
    # As GNU timeout: 124 timed out, 125 the wrapper failed.
    assert outcome.EXIT_TIMED_OUT == 124
    assert outcome.EXIT_SUPERVISOR_FAILED == 125
    assert outcome.EXIT_VCPU_FAILED == 126


def test_a_timeout_wins_over_the_plugin_s_clean_exit() -> None:
    status, reason = outcome.decide(outcome.timed_out(1.5), _exited(0))
    assert (status, reason) == (124, "timed out after 1.5 s")
    assert outcome.timed_out(2.0).reason == "timed out after 2 s"


def test_the_first_cause_wins_and_the_plugin_decides_otherwise() -> None:
    assert outcome.decide(outcome.vcpu_failure("vcpu 0: x"), _exited(0)) == (126, "vcpu 0: x")
    assert outcome.decide(None, _exited(3)) == (3, "plugin exited with status 3")
    assert outcome.decide(None, signal.SIGKILL) == (137, "plugin killed by SIGKILL")
    assert outcome.decide(outcome.stopped_by_signal(signal.SIGTERM), _exited(0))[0] == 143
