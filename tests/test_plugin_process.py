"""Starting the plugin (supervisor/plugin_process.py, unsandboxed here): the spawn returns
once the child has executed the plugin, and what kept it from executing is a
`PluginStartError` naming the cause, with the child reaped."""

from __future__ import annotations

import os
import select
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from vmsuper.supervisor.plugin_process import PluginProcess, PluginStartError
from vmsuper.testing import write_python_plugin

TIMEOUT = 30.0


@pytest.fixture
def socket_fd() -> Iterator[int]:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with ours, theirs:
        yield theirs.fileno()


def read_all(fd: int) -> bytes:
    """Everything on a non-blocking pipe until its writer is gone."""
    said = b""
    while select.select([fd], [], [], TIMEOUT)[0]:
        chunk = os.read(fd, 4096)
        if not chunk:
            return said
        said += chunk
    raise AssertionError(f"the pipe stayed open for {TIMEOUT} s")


def no_zombie_children() -> bool:
    return all(c.status() != psutil.STATUS_ZOMBIE for c in psutil.Process().children())


def test_the_spawn_returns_once_the_plugin_is_executed(tmp_path: Path, socket_fd: int) -> None:
    # The child's set-up (joining a cgroup, in a run) says it has begun, then waits for a byte
    # that a thread sends only after it has seen that the spawn has not returned meanwhile.
    plugin = write_python_plugin(tmp_path, "import sys\nprint(sys.argv[1:])\nsys.exit(7)\n")
    begun_r, begun_w = os.pipe()
    go_r, go_w = os.pipe()
    returned = threading.Event()
    seen: list[bool] = []

    def held() -> None:
        os.write(begun_w, b"x")
        if not select.select([go_r], [], [], TIMEOUT)[0]:
            raise TimeoutError("never told to go on")

    def release() -> None:
        if select.select([begun_r], [], [], TIMEOUT)[0]:
            seen.append(returned.is_set())
        os.write(go_w, b"x")

    releaser = threading.Thread(target=release)
    releaser.start()
    try:
        process = PluginProcess.spawn(plugin, ["an arg"], {}, socket_fd, before_exec=held)
        returned.set()
        try:
            assert "an arg" in psutil.Process(process.pid).cmdline()  # executed by now
            assert read_all(process.stdout_fd) == b"['an arg']\n"
            assert os.waitstatus_to_exitcode(process.wait()) == 7
        finally:
            process.kill()
            process.wait()
            process.close()
    finally:
        releaser.join()
        for fd in (begun_r, begun_w, go_r, go_w):
            os.close(fd)
    assert seen == [False]


def test_the_plugin_inherits_stdio_and_its_socket_only(tmp_path: Path, socket_fd: int) -> None:
    leaked = os.open(os.devnull, os.O_RDONLY)  # inheritable, as a C library might leave one
    os.set_inheritable(leaked, True)
    plugin = write_python_plugin(
        tmp_path,
        """
        import os

        def is_open(fd):
            try:
                os.fstat(fd)
            except OSError:
                return False
            return True

        print(*[fd for fd in range(1024) if is_open(fd)], os.environ["CROSVM_SOCKET"])
        """,
    )
    try:
        process = PluginProcess.spawn(plugin, [], {}, socket_fd)
        try:
            *fds, named = read_all(process.stdout_fd).split()
            assert [int(fd) for fd in fds] == sorted([0, 1, 2, socket_fd])
            assert int(named) == socket_fd
            assert process.wait() == 0
        finally:
            process.close()
    finally:
        os.close(leaked)


def test_an_interpreter_that_is_missing_is_a_start_error(tmp_path: Path, socket_fd: int) -> None:
    plugin = tmp_path / "plugin.sh"
    plugin.write_text("#!/nonexistent/interpreter\n")
    plugin.chmod(0o755)
    with pytest.raises(PluginStartError) as info:
        PluginProcess.spawn(plugin, [], {}, socket_fd)
    assert str(info.value) == f"cannot start plugin {plugin}: No such file or directory"
    assert no_zombie_children()


def test_a_set_up_that_fails_executes_nothing(tmp_path: Path, socket_fd: int) -> None:
    marker = tmp_path / "ran"
    plugin = write_python_plugin(tmp_path, f"open({str(marker)!r}, 'w').close()\n")

    def fails() -> None:
        raise OSError(28, "No space left on device")

    with pytest.raises(PluginStartError) as info:
        PluginProcess.spawn(plugin, [], {}, socket_fd, before_exec=fails)
    said = f"cannot start plugin {plugin}: set-up failed: No space left on device"
    assert str(info.value) == said
    assert not marker.exists()
    assert no_zombie_children()


def test_a_child_without_a_pidfd_is_killed_and_reaped(
    tmp_path: Path, socket_fd: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    plugin = write_python_plugin(tmp_path, "import signal\nwhile True:\n    signal.pause()\n")

    def out_of_fds(pid: int, flags: int = 0) -> int:
        raise OSError(24, "Too many open files")

    monkeypatch.setattr(os, "pidfd_open", out_of_fds)
    with pytest.raises(PluginStartError) as info:
        PluginProcess.spawn(plugin, [], {}, socket_fd)
    assert str(info.value) == f"cannot start plugin {plugin}: Too many open files"
    assert [c for c in psutil.Process().children() if str(plugin) in c.cmdline()] == []
    assert no_zombie_children()
