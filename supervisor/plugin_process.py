"""Starting the plugin as the supervisor's direct child, and taking its exit status.

The plugin inherits exactly one extra fd, its end of the first main socket, named by
CROSVM_SOCKET as crosvm did. Its stdin is /dev/null and its stdout and stderr are pipes that
the supervisor reads (see plugin_output.py): it never holds vmsuper's terminal. It runs in a
session of its own, so a terminal's signals (Ctrl-C, a hang-up) and signals to vmsuper's
process group (`timeout`, `kill -- -PGID`) reach vmsuper alone, which decides when the plugin
ends: shutdown eventfd, grace period, SIGKILL. It dies with the supervisor
(PR_SET_PDEATHSIG), so a killed vmsuper never leaves a plugin behind.

Sandboxed (see sandbox.py), the direct child is bwrap, which runs the plugin in its own pid
namespace and dies with the supervisor too (--die-with-parent takes the whole namespace with
it); the pid and pidfd here are bwrap's. bwrap passes the plugin's exit code through and
reports a death by signal N as exit code 128+N, as shells do; `poll` and `wait` turn such a
code back into a death by signal N, so the outcome reads as it would without the sandbox.
vmsuper's exit status is the same number either way. Before executing bwrap, the child enters
the sandbox (`Sandbox.enter`): a root supervisor's child becomes the plugin's user.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import resource
import select
import signal
import subprocess
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from vmsuper.supervisor.sandbox import Sandbox

PR_SET_PDEATHSIG = 1
NAMESPACE_EXIT_TIMEOUT = 5.0
_libc = ctypes.CDLL(None, use_errno=True)


class PluginStartError(Exception):
    """The plugin could not be executed (missing, not executable, bad interpreter...)."""


def _child_setup(
    open_files: int | None,
    before_exec: Callable[[], None] | None,
    enter: Callable[[], None] | None = None,
) -> None:
    """Runs in the plugin's process between fork and exec. `before_exec` runs first, with the
    supervisor's rights (joining the run's cgroup needs them); then `enter`, the sandbox's
    change of user, which clears the parent-death signal, so that is set after it."""
    if before_exec is not None:
        before_exec()
    if enter is not None:
        enter()
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if open_files is not None:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (open_files, open_files))
        except (OSError, ValueError):
            # Above the hard limit of an unprivileged supervisor: as close as it may go.
            hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
            resource.setrlimit(resource.RLIMIT_NOFILE, (min(open_files, hard), hard))
    # Restore what the supervisor changed for itself, so the plugin starts with defaults.
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGPIPE):
        signal.signal(sig, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_SETMASK, set())


class PluginProcess:
    """A running plugin: pid, pidfd for the event loop, and the read ends of its stdout and
    stderr (non-blocking)."""

    def __init__(self, proc: subprocess.Popen[bytes], *, sandbox: Sandbox | None = None) -> None:
        self._proc = proc
        self._sandbox = sandbox
        self.sandboxed = sandbox is not None
        self._namespace_pidfds: list[int] = []
        self.pid = proc.pid
        self.pidfd = os.pidfd_open(proc.pid)
        assert proc.stderr is not None and proc.stdout is not None
        self.stderr_fd = proc.stderr.fileno()
        self.stdout_fd = proc.stdout.fileno()
        os.set_blocking(self.stderr_fd, False)
        os.set_blocking(self.stdout_fd, False)
        self.wait_status: int | None = None

    @classmethod
    def spawn(
        cls,
        path: Path,
        args: Sequence[str],
        env: Mapping[str, str],
        socket_fd: int,
        *,
        wrapper: Sequence[str] = (),
        sandbox: Sandbox | None = None,
        open_files: int | None = None,
        before_exec: Callable[[], None] | None = None,
        wait: bool = True,
    ) -> PluginProcess:
        """Start the plugin, behind `wrapper` (an argv prefix) and in `sandbox` if given.

        Sandboxed, this returns once the sandbox is set up and the plugin about to run (see
        `wait_started`); `wait=False` returns at once, for the caller to call `wait_started`
        after work of its own. `open_files` becomes the plugin's RLIMIT_NOFILE (soft and hard).
        `before_exec` runs in the child before it executes anything (it joins the plugin's
        cgroup); if it fails, nothing is executed.
        """
        full_env = dict(os.environ)
        full_env.update(env)
        full_env["CROSVM_SOCKET"] = str(socket_fd)
        with contextlib.ExitStack() as stack:
            prefix, fds = list(wrapper), [socket_fd]
            if sandbox is not None:
                bwrap, seccomp_fd = stack.enter_context(sandbox.launch())
                prefix, fds = [*bwrap, *sandbox.starter(), *prefix], [socket_fd, seccomp_fd]
            try:
                proc = subprocess.Popen(
                    [*prefix, str(path), *args],
                    env=full_env,
                    pass_fds=fds,
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    start_new_session=True,
                    preexec_fn=functools.partial(
                        _child_setup,
                        open_files,
                        before_exec,
                        sandbox.enter if sandbox is not None else None,
                    ),
                )
            except OSError as exc:
                raise PluginStartError(f"cannot start plugin {path}: {exc.strerror}") from exc
            except subprocess.SubprocessError as exc:  # before_exec failed
                raise PluginStartError(f"cannot start plugin {path}: set-up failed: {exc}") from exc
        plugin = cls(proc, sandbox=sandbox)
        if wait:
            try:
                plugin.wait_started()
            except BaseException:
                plugin.close()
                raise
        return plugin

    def wait_started(self) -> None:
        """Sandboxed, wait until the sandbox is set up and the plugin about to run (see
        `Sandbox.starter`), so that one that cannot be set up is a `SandboxError` (a
        `PluginStartError`) naming the cause, not a plugin that seems to exit with status 1;
        the sandbox is killed and reaped then. Unsandboxed, returns at once."""
        if self._sandbox is None:
            return
        try:
            self._sandbox.wait_started(
                self.stderr_fd, lambda: os.waitstatus_to_exitcode(self.wait())
            )
        except BaseException:
            self.kill()
            self.wait()
            raise

    def poll(self) -> int | None:
        """Reap the plugin if it has exited; returns its raw wait status."""
        if self.wait_status is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid == self.pid:
                self.wait_status = self._reaped(status)
        return self.wait_status

    def kill(self) -> None:
        """SIGKILL the plugin; sandboxed, bwrap's pid-namespace init too, so that the whole
        namespace goes, and `wait` can wait until it has."""
        if self.wait_status is None:
            if self.sandboxed and not self._namespace_pidfds:
                self._namespace_pidfds = _child_pidfds(self.pid)
                for fd in self._namespace_pidfds:
                    with contextlib.suppress(ProcessLookupError):
                        signal.pidfd_send_signal(fd, signal.SIGKILL)
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)

    def wait(self) -> int:
        if self.wait_status is None:
            _, status = os.waitpid(self.pid, 0)
            self.wait_status = self._reaped(status)
        return self.wait_status

    def _reaped(self, status: int) -> int:
        self._proc.returncode = os.waitstatus_to_exitcode(status)
        # A pid namespace's init exits only after every process in it is gone.
        for fd in self._namespace_pidfds:
            poller = select.poll()  # not select: the fd's number may pass FD_SETSIZE
            poller.register(fd, select.POLLIN)
            poller.poll(NAMESPACE_EXIT_TIMEOUT * 1000)
            os.close(fd)
        self._namespace_pidfds = []
        return unwrap_status(status) if self.sandboxed else status

    def close(self) -> None:
        """Close the fds held for the plugin (once: a second call does nothing)."""
        for fd in self._namespace_pidfds:
            os.close(fd)
        self._namespace_pidfds = []
        if self.pidfd >= 0:
            os.close(self.pidfd)
            self.pidfd = -1
        for stream in (self._proc.stdout, self._proc.stderr):
            if stream is not None:
                stream.close()


def unwrap_status(status: int) -> int:
    """bwrap's wait status -> the plugin's: exit code 128+N (N a signal) becomes signal N."""
    if os.WIFEXITED(status):
        code = os.WEXITSTATUS(status)
        if 128 < code < 128 + signal.NSIG:
            return code - 128  # the wait status of a process killed by that signal
    return status


def _child_pidfds(pid: int) -> list[int]:
    """pidfds of `pid`'s children (bwrap's: the init of the plugin's pid namespace)."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            children = [int(word) for word in f.read().split()]
    except OSError:
        return []
    fds = []
    for child in children:
        with contextlib.suppress(ProcessLookupError):
            fds.append(os.pidfd_open(child))
    return fds
