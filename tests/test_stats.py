"""`vmsuper stats` and `vmsuper top` against real runs; run.json publishing and cleaning."""

from __future__ import annotations

import json
import os
import pty
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from liveplugin import DEADLINE, LiveVm, wait_for
from prometheus_client.parser import text_string_to_metric_families

from vmsuper.supervisor import runinfo
from vmsuper.supervisor.busy_board import BOARD_NAME
from vmsuper.supervisor.stats import percentile_ns
from vmsuper.testing import VmSpec


@pytest.fixture
def runtime(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A runtime folder of this test's own, so it sees only its own runs."""
    folder = tmp_path / "runtime"
    monkeypatch.setenv(runinfo.RUNTIME_VARIABLE, str(folder))
    return folder


@pytest.fixture
def live_vm(tmp_path: Path, runtime: Path) -> Any:
    vm = LiveVm(tmp_path / "vm")
    try:
        yield vm
    finally:
        vm.close()
    assert vm.proc.returncode == 0


def stats(*args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "vmsuper", "stats", *args],
        capture_output=True,
        text=True,
        timeout=DEADLINE,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def stats_json(*args: str) -> dict[str, Any]:
    document: dict[str, Any] = json.loads(stats("--json", *args))
    assert document["format"] == 1
    return document


def only_vcpu(document: dict[str, Any]) -> dict[str, Any]:
    (run,) = document["runs"]
    (vcpu,) = run["vcpus"]
    assert isinstance(vcpu, dict)
    return vcpu


# -- live runs -------------------------------------------------------------------------------


@pytest.mark.kvm
def test_exit_count_rises_between_two_calls(live_vm: LiveVm, runtime: Path) -> None:
    first = stats_json("--interval", "0", str(live_vm.log_dir))
    later: list[dict[str, Any]] = []

    def rose() -> bool:  # a second call, by pid, sees more exits (2+: one was answered)
        later[:] = [stats_json("--interval", "0", str(live_vm.proc.pid))]
        return bool(only_vcpu(later[0])["exits"]["total"] > only_vcpu(first)["exits"]["total"] + 1)

    wait_for(rose, "the exit count to rise")
    (run,) = first["runs"]
    assert run["live"] and run["pid"] == live_vm.proc.pid
    assert run["config"] == str(live_vm.config.resolve())
    assert only_vcpu(later[0])["exits"]["by_kind"]["io_out"] > 0
    assert only_vcpu(later[0])["response"]["count"] > 0
    # The default poll_us (50) while the host is calm, 0 while the polling gate has it off.
    assert only_vcpu(later[0])["poll_window_s"] in (50e-6, 0.0)
    assert "poll us" in stats("--interval", "0", str(live_vm.log_dir))  # the table's column
    assert only_vcpu(stats_json("--interval", "0"))["exits"]["total"] > 0  # every live run
    roles = {p["role"] for p in run["processes"]}
    assert roles == {"supervisor", "vcpu_worker", "plugin"}
    assert all(p["cpu_s"] is not None and p["uss_bytes"] for p in run["processes"])
    assert (live_vm.log_dir / "run.json").exists()
    assert (runtime / f"{live_vm.proc.pid}.json").exists()


@pytest.mark.kvm
def test_states_while_waiting_on_the_plugin_and_paused(live_vm: LiveVm) -> None:
    running = only_vcpu(stats_json("--interval", "0", str(live_vm.log_dir)))
    assert running["state"] in ("in_guest", "waiting_plugin")  # it alternates, fast
    live_vm.send("hold")
    live_vm.wait_mark("holding")
    held = only_vcpu(stats_json("--interval", "0.1", str(live_vm.log_dir)))
    assert held["state"] == "waiting_plugin"
    assert held["waiting_s"] > 0
    assert held["exits"]["per_second"] == 0  # no exit while the plugin holds this one
    later = only_vcpu(stats_json("--interval", "0", str(live_vm.log_dir)))
    assert later["waiting_s"] > held["waiting_s"]
    # Every exit went to the plugin's one range (the C loop counted them in shared memory).
    assert held["exits"]["by_range"] == {"ioport:0x10+1": held["exits"]["by_kind"]["io_out"]}
    # Some by the runner alone (how many depends on the plugin's speed: hotpath.c).
    served = held["exits"]["served_by_runner"]
    assert isinstance(served, int) and 0 <= served < held["exits"]["total"]
    responses = held["response"]["count"]
    live_vm.send("release")
    live_vm.send("pause")
    live_vm.wait_mark("paused")
    paused = only_vcpu(stats_json("--interval", "0", str(live_vm.log_dir)))
    assert paused["state"] == "paused"
    assert paused["exits"]["by_kind"]["user"] == 1
    # The held exit counted once its Resume came, with at least the time it was held.
    assert paused["response"]["count"] > responses
    assert paused["response"]["max_s"] >= later["waiting_s"]
    live_vm.send("release")
    wait_for(
        lambda: only_vcpu(stats_json("--interval", "0", str(live_vm.log_dir)))["state"] != "paused",
        "the VCPU to leave the pause",
    )


@pytest.mark.kvm
def test_polling_shows_as_off_while_the_host_s_cpus_are_short(live_vm: LiveVm) -> None:
    """The polling gate reads the kernel's CPU pressure (supervisor/poll_gate.py): with more
    busy processes than CPUs it turns the VCPU's polling off, and `vmsuper stats` says so.
    The busy processes run at the lowest priority: they wait for the CPUs (the pressure)
    without taking much from the tests running beside this one."""
    assert os.path.exists("/proc/pressure/cpu"), "this kernel gives no CPU pressure figures"
    spin = "import os\nos.nice(19)\nwhile True: pass"
    hogs = [
        subprocess.Popen([sys.executable, "-c", spin]) for _ in range(2 * (os.cpu_count() or 1) + 2)
    ]
    try:
        wait_for(
            lambda: (
                only_vcpu(stats_json("--interval", "0", str(live_vm.log_dir)))["poll_window_s"] == 0
            ),
            "the VCPU's polling to stop on a busy host",
        )
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()


@pytest.mark.kvm
def test_live_range_counts_while_the_engine_reports_every_exit(
    tmp_path: Path, runtime: Path
) -> None:
    vm = LiveVm(tmp_path / "vm", VmSpec(sandbox=False, log_level="debug"))
    try:
        vm.send("hold")
        vm.wait_mark("holding")
        held = only_vcpu(stats_json("--interval", "0", str(vm.log_dir)))
        assert held["state"] == "waiting_plugin"
        io_out = held["exits"]["by_kind"]["io_out"]
        assert io_out > 0
        assert held["exits"]["by_range"] == {"ioport:0x10+1": io_out}
    finally:
        vm.close()
    assert vm.proc.returncode == 0


@pytest.mark.kvm
def test_prometheus_output_parses(live_vm: LiveVm) -> None:
    text = stats("--prometheus", "--interval", "0.1", str(live_vm.log_dir))
    families = {family.name: family for family in text_string_to_metric_families(text)}
    exits = {
        sample.labels["kind"]: sample.value
        for sample in families["vmsuper_vcpu_exits"].samples
        if sample.name == "vmsuper_vcpu_exits_total"
    }
    assert exits["io_out"] > 0
    histogram = families["vmsuper_vcpu_plugin_response_seconds"]
    counts = [s for s in histogram.samples if s.name.endswith("_count")]
    assert counts and counts[0].value > 0
    states = [s for s in families["vmsuper_vcpu_state"].samples if s.value == 1]
    assert len(states) == 1
    assert states[0].labels["pid"] == str(live_vm.proc.pid)
    (window,) = families["vmsuper_vcpu_poll_window_seconds"].samples
    assert window.value in (50e-6, 0.0)
    roles = {s.labels["role"] for s in families["vmsuper_process_uss_bytes"].samples}
    assert roles == {"supervisor", "vcpu_worker", "plugin"}


_ESCAPES = re.compile(rb"\x1b\[[0-9;?]*[A-Za-z]|\x1b[()][A-Z0-9]|\r")


def _screen(master: int, until: re.Pattern[bytes], deadline: float) -> bytes:
    """Read the terminal until `until` shows up in its text (escapes removed)."""
    seen = b""
    end = time.monotonic() + deadline
    while not until.search(_ESCAPES.sub(b"", seen)):
        if time.monotonic() > end:
            raise AssertionError(f"screen never showed {until.pattern!r}:\n{seen.decode()}")
        try:
            seen += os.read(master, 65536)
        except OSError:  # EIO: the other side closed
            break
    return _ESCAPES.sub(b"", seen)


@pytest.mark.kvm
def test_top_renders_a_live_run_and_quits_on_q(live_vm: LiveVm) -> None:
    pid = live_vm.proc.pid
    live_vm.send("hold")
    live_vm.wait_mark("holding")
    master, slave = pty.openpty()
    env = {**os.environ, "COLUMNS": "140", "LINES": "30", "TERM": "xterm"}
    top = subprocess.Popen(
        [sys.executable, "-m", "vmsuper", "top", "--interval", "0.2"],
        stdin=slave,
        stdout=slave,
        stderr=slave,
        env=env,
        start_new_session=True,
    )
    os.close(slave)
    try:
        row = re.compile(rb"\b%d\b[^\n]*\b0\b[^\n]*waiting_plugin" % pid)
        screen = _screen(master, row, DEADLINE)
        assert b"sorted by exits/s" in screen
        assert b"poll us" in screen  # each VCPU's polling window of the moment
        os.write(master, b"s")
        _screen(master, re.compile(rb"sorted by waiting"), DEADLINE)
        os.write(master, b"q")
        assert top.wait(timeout=DEADLINE) == 0
    finally:
        if top.poll() is None:
            os.killpg(top.pid, signal.SIGKILL)
            top.wait()
        os.close(master)


# -- finished runs and run.json --------------------------------------------------------------


@pytest.mark.kvm
def test_a_run_cleans_dead_entries_withdraws_its_own_and_stats_reads_its_logs(
    tmp_path: Path, runtime: Path
) -> None:
    ticks = runinfo.start_ticks(os.getpid())
    assert ticks is not None
    dead = _entry(runtime, os.getpid(), ticks + 1)  # left behind by a run that was killed
    vm = LiveVm(tmp_path / "vm")
    try:
        wait_for(lambda: (runtime / f"{vm.proc.pid}.json").exists(), "the runtime entry")
        assert not dead.exists()  # the new run cleaned it up
        wait_for(lambda: only_vcpu(stats_json("--interval", "0"))["exits"]["total"] > 0, "an exit")
    finally:
        vm.close()
    assert vm.proc.returncode == 0
    assert not (vm.log_dir / "run.json").exists()
    # Withdrawn: only the busy VCPUs' board stays, shared by the runs to come.
    assert [path.name for path in runtime.iterdir()] == [BOARD_NAME]
    (run,) = stats_json(str(vm.log_dir))["runs"]
    assert not run["live"]
    assert run["outcome"]["status"] == 0
    (vcpu,) = run["vcpus"]
    assert vcpu["exits"]["total"] > 0
    assert vcpu["exits"]["by_range"] == {"ioport:0x10+1": vcpu["exits"]["by_kind"]["io_out"]}


def _entry(folder: Path, pid: int, ticks: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    info = runinfo.RunInfo(
        pid=pid,
        start_ticks=ticks,
        start_time=0.0,
        started_at="1970-01-01T00:00:00Z",
        host="host",
        config=None,
        log_dir=str(folder),
        vcpus=1,
        shm_fd=3,
    )
    path = folder / f"{pid}.json"
    path.write_text(info.to_json())
    return path


def test_dead_entries_are_ignored_and_removed(runtime: Path) -> None:
    gone = subprocess.Popen(["true"])
    gone.wait()  # reaped: its pid names no process now (or, rarely, a newer one)
    own_ticks = runinfo.start_ticks(os.getpid())
    assert own_ticks is not None
    dead = _entry(runtime, gone.pid, 1)
    reused = _entry(runtime, os.getpid(), own_ticks + 1)  # the pid of a process started later
    garbage = runtime / "12345.json"
    garbage.write_text("{not json")
    assert "no live vmsuper runs" in stats()
    assert not dead.exists() and not reused.exists() and not garbage.exists()


def test_a_live_entry_is_kept(runtime: Path) -> None:
    ticks = runinfo.start_ticks(os.getpid())
    assert ticks is not None
    entry = _entry(runtime, os.getpid(), ticks)
    assert [info.pid for info in runinfo.find_runs()] == [os.getpid()]
    assert entry.exists()


def test_a_dead_log_folder_entry_reads_as_finished(tmp_path: Path, runtime: Path) -> None:
    folder = tmp_path / "logs"
    _entry(folder, 2**22 + 1, 1).rename(folder / "run.json")
    (folder / "supervisor.jsonl").write_text(
        json.dumps(
            {
                "timestamp": "2026-01-01T00:00:00.000000Z",
                "level": "info",
                "event": "run_finished",
                "status": 3,
                "reason": "why",
            }
        )
        + "\n"
    )
    (run,) = stats_json(str(folder))["runs"]
    assert not run["live"] and run["outcome"] == {"status": 3, "reason": "why"}


def test_percentiles_come_from_log2_buckets() -> None:
    buckets = [0] * 48
    buckets[10] = 50  # [512, 1024) ns
    buckets[20] = 49
    buckets[30] = 1
    assert percentile_ns(buckets, 0.5, 2**30) == 1 << 10
    assert percentile_ns(buckets, 0.9, 2**30) == 1 << 20
    assert percentile_ns(buckets, 0.99, 2**30) == 1 << 20
    assert percentile_ns(buckets, 1.0, 700_000_000) == 700_000_000  # capped at the maximum
    assert percentile_ns([0] * 48, 0.5, 0) is None


def test_run_json_is_written_whole_over_a_dead_process_s_leftover(tmp_path: Path) -> None:
    target = tmp_path / runinfo.RUN_FILE
    leftover = tmp_path / f".{target.name}.{os.getpid()}.tmp"
    leftover.write_text("half a file from a dead process of the same pid")
    runinfo._write_atomically(target, '{"a": 1}')
    assert target.read_text() == '{"a": 1}'
    assert (target.stat().st_mode & 0o777) == 0o600
    assert not leftover.exists()


def test_run_json_is_not_written_through_a_leftover_link(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("kept")
    target = tmp_path / runinfo.RUN_FILE
    (tmp_path / f".{target.name}.{os.getpid()}.tmp").symlink_to(victim)
    runinfo._write_atomically(target, '{"a": 1}')
    assert victim.read_text() == "kept"
    assert target.read_text() == '{"a": 1}'
    assert not target.is_symlink()
