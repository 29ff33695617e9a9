"""Section e's measure of a held VM's cost, without KVM: the per-thread counters it sums."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

# The harness is not installed: it runs from the checkout, as `python -m benchmarks`.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.memory import thread_counters
from benchmarks.vmrun import RunError


def test_thread_counters_sum_cpu_time_and_switches_over_every_thread() -> None:
    done = threading.Event()
    helper = threading.Thread(target=done.wait)  # a second thread, alive while counted
    helper.start()
    try:
        cpu_ns, switches = thread_counters([os.getpid()])
        sum(range(200_000))  # CPU time of this thread
        time.sleep(0.001)  # and a voluntary switch
        later_cpu_ns, later_switches = thread_counters([os.getpid()])
    finally:
        done.set()
        helper.join()
    assert 0 < cpu_ns < later_cpu_ns
    assert 0 < switches < later_switches


def test_a_process_that_ended_is_a_run_error() -> None:
    child = subprocess.Popen([sys.executable, "-c", ""])
    child.wait()
    with pytest.raises(RunError, match=f"process {child.pid} of the held VM ended"):
        thread_counters([child.pid])
