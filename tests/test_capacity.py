"""The host-wide VCPU capacity guard: unit checks, and two real pytest sessions sharing it."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from vmsuper.capacity import CapacityError, CapacityGuard, default_max_vcpus

DEADLINE = 60.0


def test_slots_are_shared_and_all_or_nothing(tmp_path: Path) -> None:
    guard = CapacityGuard(2, tmp_path / "capacity")
    other = CapacityGuard(2, tmp_path / "capacity")  # another process's view of the same files
    with guard.acquire(1) as first:
        assert not first.waited and len(first.fds) == 1
        with other.acquire(1) as second:
            assert len(second.fds) == 1
            with pytest.raises(TimeoutError):
                other.acquire(1, timeout=0.1)
        with pytest.raises(TimeoutError):
            other.acquire(2, timeout=0.1)  # one slot is free, but the VM needs two
        with other.acquire(1, timeout=DEADLINE) as third:
            assert len(third.fds) == 1
    with other.acquire(8) as everything:  # more VCPUs than the cap: all of it
        assert len(everything.fds) == 2
        with pytest.raises(TimeoutError):
            guard.acquire(1, timeout=0.1)


def test_slots_come_back_when_their_holder_dies(tmp_path: Path) -> None:
    folder = tmp_path / "capacity"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(f"""
                import sys
                from pathlib import Path
                from vmsuper.capacity import CapacityGuard
                lease = CapacityGuard(1, Path({str(folder)!r})).acquire(1)
                print("held", flush=True)
                sys.stdin.read()
            """),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline() == "held\n"
        guard = CapacityGuard(1, folder)
        with pytest.raises(TimeoutError):
            guard.acquire(1, timeout=0.1)
        holder.kill()
        holder.wait()
        with guard.acquire(1, timeout=DEADLINE) as lease:
            assert len(lease.fds) == 1
    finally:
        holder.kill()
        holder.wait()


def test_the_cap_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VMSUPER_MAX_VCPUS", "3")
    assert default_max_vcpus() == 3
    monkeypatch.setenv("VMSUPER_MAX_VCPUS", "0")
    with pytest.raises(CapacityError, match="VMSUPER_MAX_VCPUS"):
        default_max_vcpus()
    monkeypatch.delenv("VMSUPER_MAX_VCPUS")
    assert default_max_vcpus() == os.cpu_count()


# Each session's test runs one VM whose plugin records when it ran, and waits (up to a few
# seconds) for the other session's VM to be running too: without the guard the two VMs
# overlap for sure; with a cap of one VCPU the second starts only after the first ended.
SUITE = '''
import os, time
from pathlib import Path
from vmsuper.testing import VmSpec, write_python_plugin

PLUGIN = """
import os, sys, time
from pathlib import Path
from vmsuper.plugin import Connection
marks, me, peer = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
conn = Connection.from_env()
(marks / (me + ".start")).write_text(str(time.monotonic_ns()))
end = time.monotonic() + 3
while not (marks / (peer + ".start")).exists() and time.monotonic() < end:
    time.sleep(0.01)
(marks / (me + ".end")).write_text(str(time.monotonic_ns()))
"""


def test_one_vm(vmsuper, tmp_path):
    marks = Path(os.environ["MARKS"])
    me, peer = os.environ["ME"], os.environ["PEER"]
    plugin = write_python_plugin(tmp_path, PLUGIN)
    result = vmsuper.run(plugin, VmSpec(sandbox=False, args=[str(marks), me, peer]))
    assert result.status == 0, result.stderr
'''


def _session(tmp_path: Path, name: str, peer: str, *extra: str) -> subprocess.Popen[str]:
    folder = tmp_path / name
    folder.mkdir()
    (folder / "test_suite.py").write_text(SUITE)
    env = {
        **os.environ,
        "MARKS": str(tmp_path / "marks"),
        "ME": name,
        "PEER": peer,
        "VMSUPER_RUNTIME_DIR": str(tmp_path / "runtime"),
    }
    env.pop("VMSUPER_MAX_VCPUS", None)
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            f"--junitxml={folder / 'report.xml'}",
            f"--rootdir={folder}",
            *extra,
            str(folder / "test_suite.py"),
        ],
        cwd=folder,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _interval(marks: Path, name: str) -> tuple[int, int]:
    return int((marks / f"{name}.start").read_text()), int((marks / f"{name}.end").read_text())


def _waits(tmp_path: Path, name: str) -> list[float]:
    tree = ET.parse(tmp_path / name / "report.xml")
    return [
        float(prop.get("value", "nan"))
        for prop in tree.iter("property")
        if prop.get("name") == "vmsuper_capacity_wait_s"
    ]


@pytest.mark.kvm
def test_two_sessions_never_run_vms_at_once_with_a_cap_of_one(tmp_path: Path) -> None:
    (tmp_path / "marks").mkdir()
    sessions = [
        _session(tmp_path, "a", "b", "--vmsuper-max-vcpus", "1"),
        _session(tmp_path, "b", "a", "--vmsuper-max-vcpus", "1"),
    ]
    for session in sessions:
        out, _ = session.communicate(timeout=120)
        assert session.returncode == 0, out
    a, b = _interval(tmp_path / "marks", "a"), _interval(tmp_path / "marks", "b")
    first, second = sorted([a, b])
    assert first[1] < second[0], f"VMs overlapped: {a} and {b}"
    waits = _waits(tmp_path, "a") + _waits(tmp_path, "b")
    assert len(waits) == 1 and waits[0] > 0  # the second one said it waited
