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
    read_end, write_end = os.pipe()
    # A second thread, alive while counted: it blocks reading the empty pipe (a voluntary
    # switch) until the test writes to it.
    helper = threading.Thread(target=os.read, args=(read_end, 1))
    try:
        cpu_s, switches = thread_counters([os.getpid()])
        sum(range(200_000))  # CPU time of this thread
        helper.start()
        deadline = time.monotonic() + 10
        while (later := thread_counters([os.getpid()]))[1] <= switches:
            assert time.monotonic() < deadline, "no context switch counted in 10 s"
        later_cpu_s, later_switches = later
    finally:
        os.write(write_end, b"x")
        if helper.ident is not None:
            helper.join()
        os.close(read_end)
        os.close(write_end)
    assert 0 < cpu_s < later_cpu_s
    assert 0 < switches < later_switches


def test_a_process_that_ended_is_a_run_error() -> None:
    child = subprocess.Popen([sys.executable, "-c", ""])
    child.wait()
    with pytest.raises(RunError, match=f"process {child.pid} of the held VM ended"):
        thread_counters([child.pid])
