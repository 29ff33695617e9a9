"""A run's first steps (supervisor/launch.py) that the end-to-end runs do not reach."""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any

import psutil
import pytest
from held_fds import vm_fds
from warning_log import WarningLog

from vmsuper.shared import logs
from vmsuper.supervisor import launch as launching
from vmsuper.supervisor import machine, runner
from vmsuper.supervisor.config import Config, load_config
from vmsuper.supervisor.plugin_process import PluginProcess


def _config(folder: Path) -> Config:
    path = folder / "vm.toml"
    path.write_text(f'[plugin]\npath = "/bin/true"\n[log]\ndir = "{folder / "logs"}"\n')
    return load_config(path)


def test_pending_records_reach_the_log_in_order_once() -> None:
    """The first steps' records, kept until structlog is imported (`launch.begin`)."""
    pending = launching.PendingRecords()
    pending.warning("first", error="a")
    pending.error("second", error="b")
    log = launching.PendingRecords()  # a log that shows what it was given
    pending.write_to(log)
    pending.write_to(log)
    assert log.records == [
        ("warning", "first", {"error": "a"}),
        ("error", "second", {"error": "b"}),
    ]
    assert pending.records == []


@pytest.mark.kvm
def test_the_launch_s_vm_is_the_set_up_s_to_close_once_taken(tmp_path: Path) -> None:
    before = vm_fds()
    launch = launching.Launch(_config(tmp_path), WarningLog(), launching.StopSignals())
    launch.machine = machine.open_machine()
    taken = launch.take_machine()
    launch.close()
    assert vm_fds() == before + 1  # the launch let go of it: the set-up closes it
    taken.close()
    assert vm_fds() == before
    fresh = launch.take_machine()  # none left to take: one made then
    assert vm_fds() == before + 1
    fresh.close()
    assert vm_fds() == before


@pytest.mark.kvm
def test_a_vm_the_set_up_never_took_is_closed_with_the_launch(tmp_path: Path) -> None:
    before = vm_fds()
    launch = launching.Launch(_config(tmp_path), WarningLog(), launching.StopSignals())
    launch.machine = machine.open_machine()
    assert vm_fds() == before + 1
    launch.close()
    assert vm_fds() == before


def test_a_vm_that_could_not_be_made_fails_the_set_up_with_its_cause(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    def refuse(path: str = "/dev/kvm") -> None:
        raise OSError(errno.ENOENT, os.strerror(errno.ENOENT), path)

    with monkeypatch.context() as patched:
        patched.setattr(machine.kvm, "Kvm", refuse)
        with pytest.raises(machine.MachineError) as made:
            machine.open_machine()
    launch = launching.Launch(_config(tmp_path), WarningLog(), launching.StopSignals())
    launch.machine = made.value
    with pytest.raises(machine.MachineError, match=r"^cannot open /dev/kvm: .*No such file"):
        launch.take_machine()
    launch.close()

    # The run's set-up, handed that launch's VM, fails with the same cause.
    def take() -> machine.Machine:
        raise made.value

    run = runner.Run(config=_config(tmp_path), log=WarningLog())
    with pytest.raises(runner.SetupError, match=r"^cannot open /dev/kvm: .*No such file"):
        runner._set_up(run, take)
    run.close()


def test_a_failure_of_vmsuper_s_own_making_the_vm_is_raised_where_the_set_up_takes_it(
    tmp_path: Path,
) -> None:
    """As when the set-up made the VM: the run's generic handler reports it (a crash record)."""
    launch = launching.Launch(_config(tmp_path), WarningLog(), launching.StopSignals())
    launch.machine = ZeroDivisionError("a bug in vmsuper")
    with pytest.raises(ZeroDivisionError, match="a bug in vmsuper"):
        launch.take_machine()
    launch.close()


@pytest.mark.kvm
def test_a_failure_of_its_own_after_the_spawn_leaves_nothing_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`launch.begin` raising once the plugin runs (here: structlog's set-up) kills and reaps
    the plugin, closes the VM and unlocks the log."""
    path = tmp_path / "vm.toml"
    log_dir = tmp_path / "logs"
    path.write_text(
        f'[plugin]\npath = "/bin/sleep"\nargs = ["60"]\nsandbox = false\n[log]\ndir = "{log_dir}"\n'
    )
    config = load_config(path)
    spawned: list[PluginProcess] = []
    spawn = PluginProcess.spawn

    def spawning(*args: Any, **kwargs: Any) -> PluginProcess:
        spawned.append(spawn(*args, **kwargs))
        return spawned[-1]

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("a bug in vmsuper")

    vms = vm_fds()
    monkeypatch.setattr(PluginProcess, "spawn", spawning)
    monkeypatch.setattr(logs, "log_to", broken)
    with pytest.raises(RuntimeError, match="a bug in vmsuper"):
        launching.begin(config)
    (plugin,) = spawned
    assert not psutil.pid_exists(plugin.pid)
    assert vm_fds() == vms
    assert not logs.run_is_live(log_dir)
