"""The C reference (benchmarks/reference.c) in each of its modes: every VCPU runs the guest's
loop, every exit is counted, and every child process ends and is reaped (else the reference
fails or hangs past the timeout)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

# The harness is not installed: it runs from the checkout, as `python -m benchmarks`.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import concurrent, exits, guest
from benchmarks.build import build
from benchmarks.vmrun import run_command

LOOP_EXITS = 200
MODES = ("inline", "pipe", "socket", "relay", "forward", "forward_socket")


def reference_argv(mode: str, vcpus: int | str, folder: Path) -> list[str]:
    return [
        str(build("reference")),
        mode,
        str(vcpus),
        str(LOOP_EXITS),
        str(guest.write_guest(LOOP_EXITS, folder)),
        *guest.port_args(),
    ]


def test_the_harness_runs_every_mode() -> None:
    assert set(exits.REFERENCE_MODES) == set(MODES)
    assert set(concurrent.REFERENCE_MODES) == {"pipe", "relay", "forward", "forward_socket"}


@pytest.mark.kvm
@pytest.mark.timeout(120)
@pytest.mark.parametrize("vcpus", [1, 2])
@pytest.mark.parametrize("mode", MODES)
def test_each_mode_reports_every_exit_of_every_vcpu(mode: str, vcpus: int, tmp_path: Path) -> None:
    report = run_command(reference_argv(mode, vcpus, tmp_path), timeout=60)
    assert report["bench"] == "reference"
    assert report["mode"] == mode
    assert report["expected_exits"] == LOOP_EXITS
    assert [v["exits"] for v in report["vcpus"]] == [LOOP_EXITS] * vcpus
    per_exit_us, exits_per_s = exits.rates(report)  # raises unless every VCPU ran cleanly
    assert per_exit_us > 0 and exits_per_s > 0


def test_bad_arguments_are_refused_by_name(tmp_path: Path) -> None:
    cases = {
        "unknown mode hop": reference_argv("hop", 1, tmp_path),
        "VCPUS must be 1..64": reference_argv("forward", 0, tmp_path),
        "usage: reference inline|pipe|socket|relay|forward|forward_socket": [
            str(build("reference")),
            "forward",
        ],
    }
    for message, argv in cases.items():
        done = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
        assert done.returncode == 1, message
        assert message in done.stderr and done.stdout == "", done.stderr
