"""A `vmsuper serve` for the benchmarks' served rows: `vmsuper.session_server`'s, on a socket
of its own in a private folder, named only to the runs handed to it (`env`).

Served runs are the server's children, not the harness's: their CPU time is read from the
server's /proc entry (its reaped children's), to be added to the commands' own.
"""

from __future__ import annotations

import os

from vmsuper.session_server import SessionServer, SessionServerError
from vmsuper.supervisor.serve_client import SERVE_VARIABLE

from .vmrun import RunError

__all__ = ["Served"]


class Served:
    """A running `vmsuper serve` while in its block; `env` hands a `vmsuper run` to it."""

    def __enter__(self) -> Served:
        try:
            self._server = SessionServer(export=False)
        except SessionServerError as exc:
            raise RunError(str(exc)) from exc
        self.env = {**self._server.env, SERVE_VARIABLE: "1"}
        return self

    def children_cpu_s(self) -> float:
        """CPU time of the server's reaped children (its runs), from /proc (cutime, cstime)."""
        with open(f"/proc/{self._server.proc.pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
        return (int(fields[13]) + int(fields[14])) / os.sysconf("SC_CLK_TCK")

    def __exit__(self, *_exc: object) -> None:
        self._server.stop()
