"""One `vmsuper serve` for a test session (the pytest plugin's `--vmsuper-serve`).

A `vmsuper run` spends most of its start on the interpreter and its imports; a suite that runs
many VMs pays that for each. This starts a server on a socket of its own in a private folder
and names it in `VMSUPER_SERVE_SOCKET`, so every `vmsuper run` the session starts (xdist's
workers too: they inherit the variable) is forked by the server instead. Runs elsewhere on the
host, and the user's own server in the runtime folder, are left alone. The server dies with
the process that started it (parent-death signal), so a killed session leaves nothing behind.
The benchmarks' served rows use one too, without naming it to every run (`export=False`).
"""

from __future__ import annotations

import contextlib
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from vmsuper.shared.prctl import PR_SET_PDEATHSIG, prctl
from vmsuper.supervisor.serve_client import SERVE_VARIABLE, SOCKET_NAME, SOCKET_VARIABLE

START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 10.0
_LISTENING = "vmsuper serve: listening on "


class SessionServerError(Exception):
    """The server did not start; the message has what it said."""


def _die_with_parent() -> None:  # pragma: no cover - runs in the child, before exec
    prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


class SessionServer:
    """A started server; `env` is what hands a `vmsuper run` to it, set in this process's
    environment (for every run it starts) unless `export` is false. `stop` ends both."""

    def __init__(self, *, export: bool = True) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix="vmsuper-serve-"))
        self.socket = self.folder / SOCKET_NAME
        self.env = {SOCKET_VARIABLE: str(self.socket)}
        self._exported = export
        self._previous = os.environ.get(SOCKET_VARIABLE)
        env = dict(os.environ, **self.env)
        env.pop(SERVE_VARIABLE, None)
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "vmsuper", "serve"],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                preexec_fn=_die_with_parent,
            )
        except OSError as exc:
            shutil.rmtree(self.folder, ignore_errors=True)
            raise SessionServerError(f"cannot start vmsuper serve: {exc}") from exc
        banner = self._first_line()
        if not banner.startswith(_LISTENING):
            said = banner + self._stop()
            raise SessionServerError(f"vmsuper serve did not start: {said.strip() or 'no word'}")
        if export:
            os.environ.update(self.env)

    def _first_line(self) -> str:
        """The server's first line on stderr (it says it listens once its imports are done),
        or as much as it said in START_TIMEOUT_S."""
        assert self.proc.stderr is not None
        fd = self.proc.stderr.fileno()
        said = b""
        deadline = time.monotonic() + START_TIMEOUT_S
        while b"\n" not in said:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
                break
            chunk = os.read(fd, 4096)
            if not chunk:
                break
            said += chunk
        return said.decode(errors="replace")

    def stop(self) -> str:
        """Stop the server (it takes no more runs, and ends once its runs have), put the
        variable back and remove the folder; returns what the server said."""
        if self._exported:
            os.environ.pop(SOCKET_VARIABLE, None)
            if self._previous is not None:
                os.environ[SOCKET_VARIABLE] = self._previous
        return self._stop()

    def _stop(self) -> str:
        """SIGTERM: no more runs; a second one (should a run hang) stops the runs too; then
        SIGKILL. Only the process is waited for: a process it left behind may hold its stderr."""
        try:
            for sig in (signal.SIGTERM, signal.SIGTERM, signal.SIGKILL):
                if self.proc.poll() is None:
                    self.proc.send_signal(sig)
                try:
                    self.proc.wait(timeout=STOP_TIMEOUT_S)
                    break
                except subprocess.TimeoutExpired:
                    continue
            return self._said_since().decode(errors="replace")
        finally:
            assert self.proc.stderr is not None
            self.proc.stderr.close()
            with contextlib.suppress(OSError):
                shutil.rmtree(self.folder)

    def _said_since(self) -> bytes:
        """What the server's stderr holds now, without waiting for more."""
        assert self.proc.stderr is not None
        fd = self.proc.stderr.fileno()
        os.set_blocking(fd, False)
        said = b""
        with contextlib.suppress(BlockingIOError):
            while chunk := os.read(fd, 65536):
                said += chunk
        return said
