"""A run's time limit (`--timeout`, `[vm] timeout`): on expiry the run shuts down as for
SIGTERM — shutdown eventfd, grace period, every child reaped — and exits with 124."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
from rawplugin import plugin_source

from vmsuper.supervisor import outcome
from vmsuper.testing import VmRunner, VmSpec, write_python_plugin

pytestmark = pytest.mark.kvm

# Starts two VCPUs (left in Init), reports its pid, then waits for the shutdown eventfd.
WAITS_FOR_SHUTDOWN = """
call(req(start=pb.MainRequest.Start()))
_, fds = call(req(get_shutdown_eventfd=pb.MainRequest.GetShutdownEventfd()))
print(json.dumps({"pid": os.getpid()}), flush=True)
os.eventfd_read(fds[0])  # blocks until the VM shuts down
print("shutdown seen", flush=True)
sys.exit(0)
"""

IGNORES_EVERYTHING = """
import signal
signal.signal(signal.SIGTERM, signal.SIG_IGN)
print(json.dumps({"pid": os.getpid()}), flush=True)
while True:
    signal.pause()  # until a signal ends it
"""


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_timeout_signals_shutdown_and_exits_124(tmp_path: Path) -> None:
    plugin = write_python_plugin(tmp_path, plugin_source(WAITS_FOR_SHUTDOWN))
    # A long grace period: on a busy host the plugin may start only after the limit is over.
    spec = VmSpec(vcpus=2, timeout=1, grace_period=10, sandbox=False)
    result = VmRunner(tmp_path / "runs").run(plugin, spec, timeout=30)
    assert result.status == outcome.EXIT_TIMED_OUT == 124, result.stderr
    assert "vmsuper: timed out after 1 s" in result.stderr
    # The plugin saw the shutdown eventfd and exited 0 on its own: the timeout still wins.
    assert "shutdown seen" in result.stdout
    assert "timed_out" in result.events()
    finished = [r for r in result.records() if r["event"] == "run_finished"]
    assert finished[-1]["status"] == 124
    assert "plugin_killed" not in result.events()
    pid = json.loads(result.stdout.splitlines()[0])["pid"]
    assert _gone(pid)


def test_timeout_flag_overrides_the_config_and_kills_after_the_grace_period(
    tmp_path: Path,
) -> None:
    plugin = write_python_plugin(tmp_path, plugin_source(IGNORES_EVERYTHING))
    runner = VmRunner(tmp_path / "runs")
    folder = runner.folder()
    config = folder / "vm.toml"
    # The config says no limit; the flag sets one.
    spec = VmSpec(grace_period=0.2, sandbox=False, timeout=0)
    config.write_text(spec.to_toml(plugin, folder / "logs"))
    proc = subprocess.run(
        [sys.executable, "-m", "vmsuper", "run", "--timeout", "0.5", str(config)],
        capture_output=True,
        text=True,
        timeout=30,
        stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 124, proc.stderr
    assert "vmsuper: timed out after 0.5 s" in proc.stderr
    records = [json.loads(line) for line in (folder / "logs/supervisor.jsonl").open()]
    events = [r["event"] for r in records]
    assert "timed_out" in events and "plugin_killed" in events
    # From the log: the limit may be over before the plugin has printed anything.
    (started,) = [r for r in records if r["event"] == "plugin_started"]
    assert _gone(started["plugin_pid"])


def test_a_run_that_ends_in_time_keeps_its_own_status(tmp_path: Path) -> None:
    plugin = write_python_plugin(tmp_path, "import sys\nsys.exit(3)\n")
    result = VmRunner(tmp_path / "runs").run(plugin, VmSpec(timeout=30), timeout=30)
    assert result.status == 3, result.stderr
    assert "timed_out" not in result.events()
