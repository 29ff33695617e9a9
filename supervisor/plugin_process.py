"""Starting the plugin as the supervisor's direct child, and taking its exit status.

The plugin inherits exactly one extra fd, its end of the first main socket, named by
CROSVM_SOCKET as crosvm did. It dies with the supervisor (PR_SET_PDEATHSIG), so a killed
vmsuper never leaves a plugin behind.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True)


class PluginStartError(Exception):
    """The plugin could not be executed (missing, not executable, bad interpreter...)."""


def _die_with_parent() -> None:
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    # Restore what the supervisor changed for itself, so the plugin starts with defaults.
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGPIPE):
        signal.signal(sig, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_SETMASK, set())


class PluginProcess:
    """A running plugin: pid, pidfd for the event loop, and the read end of its stderr."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        self._proc = proc
        self.pid = proc.pid
        self.pidfd = os.pidfd_open(proc.pid)
        assert proc.stderr is not None
        self.stderr_fd = proc.stderr.fileno()
        os.set_blocking(self.stderr_fd, False)
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
    ) -> PluginProcess:
        full_env = dict(os.environ)
        full_env.update(env)
        full_env["CROSVM_SOCKET"] = str(socket_fd)
        try:
            proc = subprocess.Popen(
                [*wrapper, str(path), *args],
                env=full_env,
                pass_fds=(socket_fd,),
                stdin=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                preexec_fn=_die_with_parent,
            )
        except OSError as exc:
            raise PluginStartError(f"cannot start plugin {path}: {exc.strerror}") from exc
        return cls(proc)

    def poll(self) -> int | None:
        """Reap the plugin if it has exited; returns its raw wait status."""
        if self.wait_status is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid == self.pid:
                self.wait_status = status
                self._proc.returncode = os.waitstatus_to_exitcode(status)
        return self.wait_status

    def kill(self) -> None:
        if self.wait_status is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)

    def wait(self) -> int:
        if self.wait_status is None:
            _, status = os.waitpid(self.pid, 0)
            self.wait_status = status
            self._proc.returncode = os.waitstatus_to_exitcode(status)
        return self.wait_status

    def close(self) -> None:
        os.close(self.pidfd)
        if self._proc.stderr is not None:
            self._proc.stderr.close()
