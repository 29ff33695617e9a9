"""The VM's life and end: exit statuses, the grace period, signals, and nothing left behind."""

from __future__ import annotations

import errno
import json
import os
import signal
import time
from pathlib import Path

import psutil
import pytest
from rawplugin import WAIT_FOR_SHUTDOWN, plugin_source

from vmsuper.testing import VmRunner, VmSpec, finish, write_python_plugin

pytestmark = pytest.mark.kvm


def descendants_gone(processes: list[psutil.Process]) -> bool:
    """None of `processes` runs any more (a zombie counts as gone). psutil.Process remembers
    its start time, so a pid reused by a new process does not count as the old one."""
    return not [p for p in processes if p.is_running() and _not_zombie(p.pid)]


def release(fifo: Path, timeout: float = 30) -> None:
    """Let a plugin go on that blocks opening `fifo` for reading (once it gets there)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        except OSError as exc:  # ENXIO: no reader yet
            if exc.errno != errno.ENXIO or time.monotonic() > deadline:
                return
            time.sleep(0.01)
            continue
        os.close(fd)
        return


def _not_zombie(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ("sys.exit(0)", 0),
        ("sys.exit(3)", 3),
        ("os.kill(os.getpid(), signal.SIGKILL)", 128 + 9),
        ("import signal as s; os.kill(os.getpid(), s.SIGSEGV)", 128 + 11),
    ],
)
def test_plugin_exit_maps_to_status(tmp_path: Path, body: str, expected: int) -> None:
    plugin = write_python_plugin(tmp_path, "import os, sys, signal\n" + body + "\n")
    result = VmRunner(tmp_path / "runs").run(plugin)
    assert result.status == expected, result.stderr
    finished = [r for r in result.records() if r["event"] == "run_finished"]
    assert finished and finished[-1]["status"] == expected


def test_plugin_stderr_is_echoed_and_logged_and_stdout_passes(tmp_path: Path) -> None:
    plugin = write_python_plugin(
        tmp_path,
        "import sys\nprint('to stdout')\nprint('first line', file=sys.stderr)\n"
        "sys.stderr.write('no newline at end')\n",
    )
    result = VmRunner(tmp_path / "runs").run(plugin)
    assert result.status == 0
    assert "to stdout" in result.stdout
    assert "first line" in result.stderr and "no newline at end" in result.stderr
    lines = [r["line"] for r in result.records() if r["event"] == "plugin_stderr"]
    assert lines == ["first line", "no newline at end"]


def test_missing_plugin_is_a_clear_config_error(tmp_path: Path) -> None:
    result = VmRunner(tmp_path / "runs").run(tmp_path / "nope.py")
    assert result.status == 2
    assert "[plugin] path" in result.stderr


def test_plugin_is_a_direct_child_and_may_signal_its_parent(tmp_path: Path) -> None:
    body = """
    RESULTS["parent_cmdline"] = open(f"/proc/{os.getppid()}/cmdline").read()
    os.kill(os.getppid(), signal.SIGTERM)
    time.sleep(30)
    """
    plugin = write_python_plugin(tmp_path, "import signal\n" + plugin_source(body))
    # Unsandboxed: in the sandbox's pid namespace the plugin's parent is not vmsuper.
    result = VmRunner(tmp_path / "runs").run(plugin, VmSpec(grace_period=0.5, sandbox=False))
    assert result.status == 128 + signal.SIGTERM
    events = result.events()
    assert "signal_received" in events and "plugin_killed" in events


def test_grace_period_then_sigkill_when_plugin_ignores_shutdown(tmp_path: Path) -> None:
    body = """
    import signal
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    print(json.dumps({"pid": os.getpid()}), flush=True)
    while True:
        time.sleep(1)
    """
    plugin = write_python_plugin(tmp_path, plugin_source(body))
    # Unsandboxed: the test looks the plugin up by the pid it reports (a host pid).
    spec = VmSpec(grace_period=0.3, sandbox=False)
    proc, config, logs = VmRunner(tmp_path / "runs").start(plugin, spec)
    assert proc.stdout is not None
    plugin_pid = json.loads(proc.stdout.readline())["pid"]
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    result = finish(proc, config, logs, timeout=30)
    assert result.status == 128 + signal.SIGTERM
    assert time.monotonic() - started >= 0.3
    assert not _not_zombie(plugin_pid)
    assert "plugin_killed" in result.events()


def test_sigint_shuts_down_cleanly_with_all_children_reaped(tmp_path: Path) -> None:
    plugin = write_python_plugin(tmp_path, plugin_source(WAIT_FOR_SHUTDOWN))
    # Unsandboxed: the count of vmsuper's children would include bwrap's own processes.
    spec = VmSpec(vcpus=2, sandbox=False)
    proc, config, logs = VmRunner(tmp_path / "runs").start(plugin, spec)
    try:
        assert proc.stdout is not None
        json.loads(proc.stdout.readline())
        children = psutil.Process(proc.pid).children(recursive=True)
        assert len(children) == 3  # the plugin and two VCPU workers
        proc.send_signal(signal.SIGINT)
        result = finish(proc, config, logs, timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert result.status == 128 + signal.SIGINT
    assert descendants_gone(children)


def test_plugin_exit_with_running_vcpus_reaps_workers(tmp_path: Path) -> None:
    sync = tmp_path / "sync"
    sync.mkdir()
    fifo = sync / "go"
    os.mkfifo(fifo)
    body = f"""
    call(req(start=pb.MainRequest.Start()))
    print(json.dumps({{"pid": os.getpid()}}), flush=True)
    with open({str(fifo)!r}) as go:  # until the test has seen the processes
        go.read()
    sys.exit(4)
    """
    plugin = write_python_plugin(tmp_path, plugin_source(body))
    spec = VmSpec(vcpus=2, mounts=[(sync, None, False)])
    proc, config, logs = VmRunner(tmp_path / "runs").start(plugin, spec)
    try:
        assert proc.stdout is not None
        json.loads(proc.stdout.readline())
        vmsuper = psutil.Process(proc.pid)
        # The plugin (or, sandboxed, its bwrap) and the two VCPU workers, all running.
        direct = vmsuper.children()
        assert len(direct) == 3
        assert all(_not_zombie(child.pid) for child in direct)
        children = vmsuper.children(recursive=True)
    finally:
        release(fifo)
    result = finish(proc, config, logs, timeout=30)
    assert result.status == 4
    assert descendants_gone(children)
    assert not vmsuper.is_running()  # vmsuper itself exited


def test_no_fd_of_the_run_reaches_the_plugin_except_its_socket(tmp_path: Path) -> None:
    body = """
    links = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            links[int(name)] = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            pass  # the directory fd of listdir itself
    RESULTS["fds"] = {str(fd): link for fd, link in links.items() if fd > 2}
    RESULTS["socket_fd"] = MAIN.fileno()
    report()
    """
    plugin = write_python_plugin(tmp_path, plugin_source(body))
    result = VmRunner(tmp_path / "runs").run(plugin)
    assert result.status == 0, result.stderr
    found = json.loads(result.stdout.splitlines()[-1])
    assert list(found["fds"]) == [str(found["socket_fd"])]
    assert found["fds"][str(found["socket_fd"])].startswith("socket:")


def test_vmsuper_sigkill_takes_the_plugin_and_workers_with_it(tmp_path: Path) -> None:
    body = """
    call(req(start=pb.MainRequest.Start()))
    print(json.dumps({"pid": os.getpid()}), flush=True)
    while True:
        time.sleep(1)
    """
    plugin = write_python_plugin(tmp_path, plugin_source(body))
    proc, _config, _logs = VmRunner(tmp_path / "runs").start(plugin, VmSpec(vcpus=2))
    assert proc.stdout is not None
    json.loads(proc.stdout.readline())
    children = psutil.Process(proc.pid).children(recursive=True)
    assert len(children) >= 3  # the plugin (and its sandbox) and two VCPU workers
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 10
    while not descendants_gone(children) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert descendants_gone(children)


@pytest.mark.parametrize("low_latency", [True, False])
def test_low_latency_holds_cpu_dma_latency_once_the_vcpus_start(
    tmp_path: Path, low_latency: bool
) -> None:
    body = """
    def held():
        fd_dir = f"/proc/{os.getppid()}/fd"
        links = []
        for name in os.listdir(fd_dir):
            try:
                links.append(os.readlink(f"{fd_dir}/{name}"))
            except OSError:
                pass
        return "/dev/cpu_dma_latency" in links

    RESULTS["before_start"] = held()
    call(req(start=pb.MainRequest.Start()))
    RESULTS["after_start"] = held()
    report()
    """
    plugin = write_python_plugin(tmp_path, plugin_source(body))
    # Unsandboxed: the plugin looks at its parent's fds.
    spec = VmSpec(sandbox=False, low_latency=low_latency)
    result = VmRunner(tmp_path / "runs").run(plugin, spec)
    assert result.status == 0, result.stderr
    seen = json.loads(result.stdout.splitlines()[-1])
    assert seen == {"before_start": False, "after_start": low_latency}
