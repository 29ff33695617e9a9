"""Starting the plugin (supervisor/plugin_process.py, unsandboxed here): the spawn returns
before the child has executed anything, and what kept it from executing comes out later as a
`PluginStartError`, with the child reaped."""

from __future__ import annotations

import os
import select
import socket
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


def test_the_spawn_does_not_wait_for_the_child_s_set_up(tmp_path: Path, socket_fd: int) -> None:
    # The child's set-up (joining a cgroup, in a run) waits here for a byte the test sends only
    # once the spawn has returned: a spawn that waited for the exec would see it time out first.
    plugin = write_python_plugin(tmp_path, "import sys\nprint(sys.argv[1:])\nsys.exit(7)\n")
    go_r, go_w = os.pipe()

    def held() -> None:
        if not select.select([go_r], [], [], TIMEOUT)[0]:
            raise TimeoutError("never told to go on")

    try:
        process = PluginProcess.spawn(
            plugin, ["an arg"], {}, socket_fd, before_exec=held, wait=False
        )
        try:
            # Still this interpreter, in its set-up: the plugin's argv is not there yet.
            assert "an arg" not in psutil.Process(process.pid).cmdline()
            os.write(go_w, b"x")
            process.wait_started()
            assert read_all(process.stdout_fd) == b"['an arg']\n"
            assert os.waitstatus_to_exitcode(process.wait()) == 7
        finally:
            process.kill()
            process.wait()
            process.close()
    finally:
        os.close(go_r)
        os.close(go_w)


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
