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

bwrap exits as soon as its namespace's init reports the plugin's exit status, without waiting
for that init, so the init (and with it the CPU time of the plugin it reaped) would go to the
host's init. So while a sandboxed plugin runs, the supervisor is a child subreaper: the
orphaned init becomes its child, and it reaps it after bwrap, so that every process of the run
is reaped by vmsuper and the plugin's CPU time counts in vmsuper's (`time vmsuper run`, a
parent's RUSAGE_CHILDREN).
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import functools
import json
import os
import resource
import select
import signal
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

from vmsuper.shared.prctl import (
    PR_GET_CHILD_SUBREAPER,
    PR_SET_CHILD_SUBREAPER,
    PR_SET_PDEATHSIG,
    prctl,
)

if TYPE_CHECKING:
    from vmsuper.supervisor.sandbox import Sandbox

NAMESPACE_EXIT_TIMEOUT = 5.0
EXEC_FAILED = 127  # the child's exit status when it could not execute anything (as a shell's)


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
    prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if open_files is not None:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (open_files, open_files))
        except (OSError, ValueError):
            # Above the hard limit of an unprivileged supervisor: as close as it may go.
            hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
            resource.setrlimit(resource.RLIMIT_NOFILE, (min(open_files, hard), hard))
    # Restore what the supervisor (and Python) changed for itself, so the plugin starts with
    # defaults.
    for sig in (
        signal.SIGTERM,
        signal.SIGINT,
        signal.SIGHUP,
        signal.SIGUSR1,
        signal.SIGPIPE,
        signal.SIGXFSZ,
    ):
        signal.signal(sig, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_SETMASK, set())


class _Child:
    """A forked child on its way to exec: its pid, the read ends of its stdout and stderr, and
    of the pipe on which it reports why it could not execute (EOF alone: it did)."""

    def __init__(self, pid: int, stdout_fd: int, stderr_fd: int, report_fd: int) -> None:
        self.pid = pid
        self.stdout_fd = stdout_fd
        self.stderr_fd = stderr_fd
        self.report_fd = report_fd


def _fork_exec(
    argv: Sequence[str], env: Mapping[str, str], pass_fds: Sequence[int], setup: Callable[[], None]
) -> _Child:
    """Fork; the child runs `setup`, then executes `argv`. What kept it from executing comes
    back on the child's `report_fd` (`PluginProcess._wait_for_exec`)."""
    opened: list[int] = []
    try:
        null = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        opened.append(null)
        out_r, out_w = os.pipe2(os.O_CLOEXEC)
        opened += (out_r, out_w)
        err_r, err_w = os.pipe2(os.O_CLOEXEC)
        opened += (err_r, err_w)
        report_r, report_w = os.pipe2(os.O_CLOEXEC)
        opened += (report_r, report_w)
        pid = os.fork()
    except BaseException:
        for fd in opened:
            os.close(fd)
        raise
    if pid == 0:  # pragma: no cover - the child, until it executes
        _become(argv, env, (null, out_w, err_w), pass_fds, report_w, setup)
    for fd in (null, out_w, err_w, report_w):
        os.close(fd)
    return _Child(pid, out_r, err_r, report_r)


def _become(
    argv: Sequence[str],
    env: Mapping[str, str],
    stdio: tuple[int, int, int],
    pass_fds: Sequence[int],
    report_fd: int,
    setup: Callable[[], None],
) -> NoReturn:
    """The forked child: stdio, only `pass_fds` besides, a session of its own, `setup`, then
    exec. Never returns: a failure is reported as "<stage>\0<reason>" on `report_fd`."""
    stage = "set-up"
    try:
        signal.set_wakeup_fd(-1)  # the supervisor's, whose fd number is closed below
        # Copies above 2 first: a pipe's fd may itself be 0, 1 or 2 if vmsuper's were closed.
        high = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 3) for fd in stdio]
        for target, fd in enumerate(high):
            os.dup2(fd, target)  # inheritable
        os.setsid()
        setup()
        # As subprocess's close_fds (after the set-up, as there): only stdio and `pass_fds`.
        keep = sorted({0, 1, 2, report_fd, *pass_fds})
        ends = [*keep[1:], max(os.sysconf("SC_OPEN_MAX"), keep[-1] + 1)]
        for low, above in zip(keep, ends, strict=True):
            os.closerange(low + 1, above)
        for fd in pass_fds:
            os.set_inheritable(fd, True)
        stage = "exec"
        os.execvpe(argv[0], list(argv), dict(env))
    except BaseException as exc:
        said = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc) or repr(exc)
        with contextlib.suppress(BaseException):
            os.write(report_fd, f"{stage}\0{said}".encode(errors="replace"))
    finally:
        os._exit(EXEC_FAILED)


class PluginProcess:
    """A running plugin: pid, pidfd for the event loop, and the read ends of its stdout and
    stderr (non-blocking)."""

    def __init__(
        self, child: _Child, path: Path, *, sandbox: Sandbox | None = None, info_fd: int = -1
    ) -> None:
        self._path = path
        self._sandbox = sandbox
        self.sandboxed = sandbox is not None
        # Sandboxed: where bwrap writes its namespace init's pid, and then a pidfd of that init.
        self._info_fd = info_fd
        self._init_pidfd = -1
        self._adopting = False  # this made the process a subreaper, to undo once reaped
        self.pid = child.pid
        self.pidfd = os.pidfd_open(child.pid)
        self.stderr_fd = child.stderr_fd
        self.stdout_fd = child.stdout_fd
        self._report_fd = child.report_fd
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

        This returns once the plugin (sandboxed: the sandbox, set up) is about to run (see
        `wait_started`); `wait=False` returns once the child has executed (sandboxed: bwrap),
        for the caller to call `wait_started` after work of its own. A child that could not
        execute raises `PluginStartError` with the cause (subprocess.Popen, which this does
        without, says only that the set-up failed). `open_files` becomes the plugin's RLIMIT_NOFILE
        (soft and hard). `before_exec` runs in the child before it executes anything (it joins
        the plugin's cgroup); if it fails, nothing is executed.
        """
        full_env = dict(os.environ)
        full_env.update(env)
        full_env["CROSVM_SOCKET"] = str(socket_fd)
        adopting = sandbox is not None and _set_subreaper(True)
        try:
            plugin = cls._start(
                path, args, full_env, socket_fd, wrapper, sandbox, open_files, before_exec
            )
        except BaseException:
            if adopting:
                _set_subreaper(False)
            raise
        plugin._adopting = adopting
        try:
            # As subprocess does. Running on while the child joins its cgroup and enters the
            # sandbox saved a run tens of ms when joining a v1 cgroup waited for an RCU grace
            # period (no longer: cgroups.join_file), but measured here it left the plugin off
            # the CPU of its VCPU's runner (and the runner beside the worker) more often, which
            # slowed a short run's exits by more.
            plugin._wait_for_exec()
            if wait:
                plugin.wait_started()
        except BaseException:
            plugin.close()
            raise
        return plugin

    @classmethod
    def _start(
        cls,
        path: Path,
        args: Sequence[str],
        full_env: Mapping[str, str],
        socket_fd: int,
        wrapper: Sequence[str],
        sandbox: Sandbox | None,
        open_files: int | None,
        before_exec: Callable[[], None] | None,
    ) -> PluginProcess:
        """Fork and execute the plugin (sandboxed: bwrap) for `spawn`."""
        info_fd = -1
        # `stack` closes what the child inherited; `info_owner` the info pipe's read end,
        # unless the plugin takes it.
        with contextlib.ExitStack() as stack, contextlib.ExitStack() as info_owner:
            prefix, fds = list(wrapper), [socket_fd]
            if sandbox is not None:
                info_fd, info_write = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
                info_owner.callback(os.close, info_fd)
                stack.callback(os.close, info_write)
                bwrap, seccomp_fd = stack.enter_context(sandbox.launch(info_write))
                prefix = [*bwrap, *sandbox.starter(), *prefix]
                fds = [socket_fd, seccomp_fd, info_write]
            setup = functools.partial(
                _child_setup, open_files, before_exec, sandbox.enter if sandbox else None
            )
            try:
                child = _fork_exec([*prefix, str(path), *args], full_env, fds, setup)
            except OSError as exc:
                raise PluginStartError(f"cannot start plugin {path}: {exc.strerror}") from exc
            try:
                plugin = cls(child, path, sandbox=sandbox, info_fd=info_fd)
            except BaseException as exc:  # no pidfd (out of fds): the child is not left behind
                with contextlib.suppress(ProcessLookupError):
                    os.kill(child.pid, signal.SIGKILL)
                os.waitpid(child.pid, 0)
                for fd in (child.stdout_fd, child.stderr_fd, child.report_fd):
                    os.close(fd)
                if isinstance(exc, OSError):
                    msg = f"cannot start plugin {path}: {exc.strerror}"
                    raise PluginStartError(msg) from exc
                raise
            info_owner.pop_all()
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
            self._take_namespace_init()
        except BaseException:
            self.kill()
            self.wait()
            raise

    def _wait_for_exec(self) -> None:
        """Wait until the child has executed the plugin (sandboxed: bwrap); if it could not,
        reap it and raise `PluginStartError` with the reason."""
        if self._report_fd < 0:
            return
        said = b""
        try:
            while chunk := os.read(self._report_fd, 4096):
                said += chunk
        finally:
            os.close(self._report_fd)
            self._report_fd = -1
        if not said:
            return
        self.wait()
        stage, _, reason = said.decode(errors="replace").partition("\0")
        if stage == "exec":
            raise PluginStartError(f"cannot start plugin {self._path}: {reason}")
        raise PluginStartError(f"cannot start plugin {self._path}: set-up failed: {reason}")

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
            self._take_namespace_init()
            if self._init_pidfd >= 0:
                with contextlib.suppress(ProcessLookupError):
                    signal.pidfd_send_signal(self._init_pidfd, signal.SIGKILL)
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)

    def wait(self) -> int:
        if self.wait_status is None:
            _, status = os.waitpid(self.pid, 0)
            self.wait_status = self._reaped(status)
        return self.wait_status

    def _reaped(self, status: int) -> int:
        # A pid namespace's init exits only after every process in it is gone; with bwrap
        # gone, it is this subreaper's child.
        self._take_namespace_init()
        fd, self._init_pidfd = self._init_pidfd, -1
        if fd >= 0:
            poller = select.poll()  # not select: the fd's number may pass FD_SETSIZE
            poller.register(fd, select.POLLIN)
            if poller.poll(NAMESPACE_EXIT_TIMEOUT * 1000):
                with contextlib.suppress(ChildProcessError):
                    os.waitid(os.P_PIDFD, fd, os.WEXITED)
            os.close(fd)
        self._stop_adopting()
        return unwrap_status(status) if self.sandboxed else status

    def _take_namespace_init(self) -> None:
        """A pidfd of the plugin's pid-namespace init, once bwrap has named it on the info
        fd (it does before the init starts the plugin); kept only while the pid is still
        bwrap's child or this process's, so never a recycled pid."""
        if self._info_fd < 0:
            return
        try:
            said = os.read(self._info_fd, 4096)
        except BlockingIOError:
            return  # not yet: bwrap has not made its namespace
        os.close(self._info_fd)
        self._info_fd = -1
        try:
            pid = int(json.loads(said)["child-pid"])
            fd = os.pidfd_open(pid)
        except (ValueError, KeyError, TypeError, OSError):
            return  # bwrap ended before it made its namespace
        if _parent_of(pid) in (self.pid, os.getpid()):
            self._init_pidfd = fd
        else:
            os.close(fd)

    def _stop_adopting(self) -> None:
        if self._adopting:
            self._adopting = False
            _set_subreaper(False)

    def close(self) -> None:
        """Close the fds held for the plugin (once: a second call does nothing)."""
        self._stop_adopting()
        for fd in (self._info_fd, self._init_pidfd):
            if fd >= 0:
                os.close(fd)
        self._info_fd = self._init_pidfd = -1
        if self.pidfd >= 0:
            os.close(self.pidfd)
            self.pidfd = -1
        for fd in (self._report_fd, self.stdout_fd, self.stderr_fd):
            if fd >= 0:
                os.close(fd)
        self._report_fd = self.stdout_fd = self.stderr_fd = -1


def unwrap_status(status: int) -> int:
    """bwrap's wait status -> the plugin's: exit code 128+N (N a signal) becomes signal N."""
    if os.WIFEXITED(status):
        code = os.WEXITSTATUS(status)
        if 128 < code < 128 + signal.NSIG:
            return code - 128  # the wait status of a process killed by that signal
    return status


def _set_subreaper(on: bool) -> bool:
    """Adopt this process's orphaned descendants, or stop (see the module's docstring; forked
    children, the VCPU workers, do not inherit it). Returns whether that changed anything."""
    was = ctypes.c_int()
    prctl(PR_GET_CHILD_SUBREAPER, ctypes.byref(was))
    if bool(was.value) == on:
        return False
    if prctl(PR_SET_CHILD_SUBREAPER, int(on)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return True


def _parent_of(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rpartition(")")[2].split()[1])
    except (OSError, ValueError, IndexError):
        return None
