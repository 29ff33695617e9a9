"""A `vmsuper serve` for the benchmarks' served rows, in a runtime folder of its own (made in
the temporary folder and removed with the server).

Served runs are the server's children, not the harness's: their CPU time is read from the
server's /proc entry (its reaped children's), to be added to the commands' own.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

from vmsuper.supervisor.serve_client import SERVE_VARIABLE

from .vmrun import RunError, vmsuper_command

__all__ = ["Served"]


class Served:
    """A running `vmsuper serve`; `env` hands a `vmsuper run` to it."""

    def __init__(self) -> None:
        # Short: a unix socket's path has room for about 100 bytes only.
        self._runtime = Path(tempfile.mkdtemp(prefix="vmsuper-bench-serve-"))
        self.env = {"VMSUPER_RUNTIME_DIR": str(self._runtime), SERVE_VARIABLE: "1"}
        self._proc: subprocess.Popen[str] | None = None

    def __enter__(self) -> Served:
        self._proc = subprocess.Popen(
            [*vmsuper_command(), "serve"],
            env={**os.environ, **self.env},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert self._proc.stderr is not None
        banner = self._proc.stderr.readline()  # written once it is ready
        if "listening on" not in banner:
            self.__exit__()
            raise RunError(f"vmsuper serve did not start: {banner.strip()}")
        return self

    def children_cpu_s(self) -> float:
        """CPU time of the server's reaped children (its runs), from /proc (cutime, cstime)."""
        assert self._proc is not None
        with open(f"/proc/{self._proc.pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
        return (int(fields[13]) + int(fields[14])) / os.sysconf("SC_CLK_TCK")

    def __exit__(self, *_exc: object) -> None:
        if self._proc is not None:
            if self._proc.poll() is None:
                self._proc.send_signal(signal.SIGTERM)
            try:
                self._proc.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.communicate()
        shutil.rmtree(self._runtime, ignore_errors=True)
