"""Failures of vmsuper's own give 125 and one line on stderr: never a traceback, never a status
the plugin could have chosen (1..123), never "bad config" (2) once the config was read."""

from __future__ import annotations

import errno
import json
import os
import select
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest
from held_fds import vm_fds

from vmsuper.shared import logs
from vmsuper.supervisor import machine, outcome, runner, runner_seccomp
from vmsuper.supervisor.config import Config, load_config
from vmsuper.supervisor.machine import Machine
from vmsuper.supervisor.runner import INFORMATIONAL
from vmsuper.testing import VmSpec, write_python_plugin


def _vmsuper_run(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "vmsuper", "run", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )


def _one_line(stderr: str) -> str:
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if not line.startswith(INFORMATIONAL)]
    assert len(lines) == 1, stderr
    return lines[0]


@pytest.mark.kvm
@pytest.mark.parametrize("sandbox", [False, True], ids=["unsandboxed", "sandboxed"])
def test_a_script_without_a_shebang_is_an_exec_format_error(tmp_path: Path, sandbox: bool) -> None:
    marker = tmp_path / "ran"
    script = tmp_path / "plugin.sh"
    script.write_text(f"echo ran > {marker}\nexit 0\n")
    script.chmod(0o755)
    config = tmp_path / "vm.toml"
    config.write_text(VmSpec(sandbox=sandbox).to_toml(script, tmp_path / "logs"))
    result = _vmsuper_run(config)
    assert result.returncode == outcome.EXIT_SUPERVISOR_FAILED, result.stderr
    line = _one_line(result.stderr)
    assert line == f"vmsuper: cannot start plugin {script}: Exec format error (exit status 125)"
    assert not marker.exists()  # no shell ran it


@pytest.mark.parametrize(
    "where",
    ["under-a-file", "in-proc"],
)
def test_a_log_folder_that_cannot_be_made_is_125_and_one_line(tmp_path: Path, where: str) -> None:
    plugin = write_python_plugin(tmp_path, "import sys\nsys.exit(0)\n")
    if where == "under-a-file":
        (tmp_path / "file").write_text("")
        log_dir = tmp_path / "file" / "logs"
        said = "Not a directory"
    else:
        log_dir = Path("/proc/vmsuper-no-such-dir/logs")
        said = "No such file or directory"
    config = tmp_path / "vm.toml"
    config.write_text(VmSpec(sandbox=False).to_toml(plugin, log_dir))
    result = _vmsuper_run(config)
    assert result.returncode == outcome.EXIT_SUPERVISOR_FAILED, result.stderr
    line = _one_line(result.stderr)
    assert line == f"vmsuper: cannot create the log folder {log_dir}: {said} (exit status 125)"


def _records(log_dir: Path) -> list[dict[str, object]]:
    lines = (log_dir / "supervisor.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


MakeConfig = Callable[[str], tuple[Config, Path]]


@pytest.fixture
def config_of(tmp_path: Path) -> Iterator[MakeConfig]:
    def make(source: str) -> tuple[Config, Path]:
        plugin = write_python_plugin(tmp_path, source)
        path = tmp_path / "vm.toml"
        path.write_text(VmSpec(sandbox=False).to_toml(plugin, tmp_path / "logs"))
        return load_config(path), tmp_path / "logs"

    yield make
    logs.close_logging()


@pytest.mark.parametrize("where", ["the set-up", "making the VM"])
def test_an_internal_error_in_set_up_is_125_with_a_crash_record(
    config_of: MakeConfig,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    where: str,
) -> None:
    """Making the VM comes before the rest of the set-up (supervisor/machine.py), and a bug there
    is reported as one in the set-up."""
    config, log_dir = config_of("import sys\nsys.exit(0)\n")

    def broken(*args: object) -> None:
        raise ZeroDivisionError("a bug in vmsuper")

    if where == "the set-up":
        monkeypatch.setattr(runner, "_set_up", broken)
    else:
        monkeypatch.setattr(machine, "create_machine", broken)
    assert runner.run(config) == 125
    line = _one_line(capsys.readouterr().err)
    assert line == (
        "vmsuper: internal error: ZeroDivisionError('a bug in vmsuper') (exit status 125)"
    )
    (crash,) = [r for r in _records(log_dir) if r["event"] == "crashed"]
    assert crash["level"] == "error"
    assert "Traceback" in str(crash["trace"]) and "a bug in vmsuper" in str(crash["trace"])
    finished = [r for r in _records(log_dir) if r["event"] == "run_finished"]
    assert finished[-1]["status"] == 125


def test_a_set_up_that_fails_after_the_plugin_started_kills_and_reaps_it(
    config_of: MakeConfig,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # The plugin starts before the VM is set up (supervisor/launch.py); it says its pid
    # through a FIFO, and the set-up fails once it has.
    fifo = tmp_path / "pid"
    os.mkfifo(fifo)
    config, log_dir = config_of(
        f"import os, signal\nwith open({str(fifo)!r}, 'w') as f:\n"
        "    f.write(str(os.getpid()))\nwhile True:\n    signal.pause()\n"
    )
    said: list[int] = []

    def fails(run: runner.Run, take_machine: Callable[[], Machine]) -> None:
        fd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
        try:
            assert select.select([fd], [], [], 30)[0], "the plugin never started"
            said.append(int(os.read(fd, 32)))
        finally:
            os.close(fd)
        raise runner.SetupError("no VM here")

    monkeypatch.setattr(runner, "_set_up", fails)
    vms_before = vm_fds()
    assert runner.run(config) == outcome.EXIT_SUPERVISOR_FAILED
    err = capsys.readouterr().err
    assert [line for line in err.splitlines() if not line.startswith(INFORMATIONAL)] == [
        "vmsuper: set-up failed: no VM here",
        "vmsuper: set-up failed: no VM here (exit status 125)",
    ]
    assert not psutil.pid_exists(said[0])
    assert vm_fds() == vms_before  # the VM made at launch, never taken, is closed with it
    events = [r["event"] for r in _records(log_dir)]
    assert "setup_failed" in events and "plugin_started" not in events


@pytest.mark.kvm
def test_a_stop_signal_during_set_up_ends_the_run_in_order(
    config_of: MakeConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Noted from before the plugin starts (launch.StopSignals), taken by the loop once it runs.
    config, log_dir = config_of("import signal\nwhile True:\n    signal.pause()\n")
    set_up = runner._set_up

    def signalled_meanwhile(run: runner.Run, take_machine: Callable[[], Machine]) -> None:
        set_up(run, take_machine)
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(runner, "_set_up", signalled_meanwhile)
    assert runner.run(config) == 128 + signal.SIGTERM
    records = _records(log_dir)
    assert [r["reason"] for r in records if r["event"] == "shutdown_started"] == ["signal"]
    (started,) = [r for r in records if r["event"] == "plugin_started"]
    assert not psutil.pid_exists(int(str(started["plugin_pid"])))


@pytest.mark.kvm
def test_an_internal_error_while_serving_reaps_the_plugin(
    config_of: MakeConfig, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    config, log_dir = config_of("import signal\nwhile True:\n    signal.pause()\n")

    def broken(self: runner.Supervisor) -> None:
        raise KeyError("lost")

    monkeypatch.setattr(runner.Supervisor, "_loop", broken)
    assert runner.run(config) == 125
    line = _one_line(capsys.readouterr().err)
    assert line == "vmsuper: internal error: KeyError('lost') (exit status 125)"
    records = _records(log_dir)
    assert [r["event"] for r in records].count("crashed") == 1
    (started,) = [r for r in records if r["event"] == "plugin_started"]
    pid = int(str(started["plugin_pid"]))
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


@pytest.mark.kvm
def test_a_runner_thread_that_fails_ends_the_run_with_its_cause(
    config_of: MakeConfig, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # The runner fails before its worker asks for anything, so its EIO answers no request:
    # only the supervisor can end the run with the cause (otherwise the plugin's get_regs
    # gets that stale EIO and the run ends as the plugin's failure, or it waits for ever).
    config, log_dir = config_of(
        "from vmsuper.plugin import Connection\n"
        "conn = Connection.from_env()\n"
        "conn.create_memory(0, 0x10000)\n"
        "(vcpu,) = conn.get_vcpus()\n"
        "conn.start()\n"
        "vcpu.wait()\n"
        "vcpu.get_regs()\n"
    )

    def refused(*args: object, **kwargs: object) -> None:
        raise OSError(errno.EPERM, "seccomp refused for the test")

    monkeypatch.setattr(runner_seccomp, "confine_thread", refused)
    assert runner.run(config) == outcome.EXIT_SUPERVISOR_FAILED
    line = _one_line(capsys.readouterr().err)
    assert line == (
        "vmsuper: the runner thread of VCPU 0 failed: "
        "PermissionError(1, 'seccomp refused for the test') (exit status 125)"
    )
    records = _records(log_dir)
    assert [r["reason"] for r in records if r["event"] == "shutdown_started"] == ["runner failed"]
    assert any(r["event"] == "runner_failed" and r["vcpu"] == 0 for r in records)
    (started,) = [r for r in records if r["event"] == "plugin_started"]
    pid = int(str(started["plugin_pid"]))
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


def test_the_command_turns_an_uncaught_error_into_125(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from vmsuper.supervisor import cli

    plugin = write_python_plugin(tmp_path, "import sys\nsys.exit(0)\n")
    config = tmp_path / "vm.toml"
    config.write_text(VmSpec(sandbox=False).to_toml(plugin, tmp_path / "logs"))

    def broken(config: object, config_path: object = None, launch: object = None) -> int:
        raise RuntimeError("before the log")

    monkeypatch.setattr(runner, "run", broken)
    assert cli.main(["run", str(config)]) == 125
    line = _one_line(capsys.readouterr().err)
    assert line == "vmsuper: internal error: RuntimeError('before the log') (exit status 125)"
