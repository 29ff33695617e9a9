"""A `vmsuper serve` for the benchmarks' served rows: `vmsuper.session_server`'s, on a socket
of its own in a private folder, named only to the runs handed to it (`env`).

Served runs are the server's children, not the harness's: their CPU time is read from the
server's /proc entry (its reaped children's), to be added to the commands' own.
"""

from __future__ import annotations

from typing import Final

import psutil

from vmsuper.session_server import SessionServer, SessionServerError
from vmsuper.supervisor.serve_client import SERVE_VARIABLE

from .vmrun import RunError

__all__ = ["NATIVE_SERVED", "SERVED", "TRIVIAL_SERVED", "Served"]

# The rows of runs handed to the server: in the concurrent section (`what`), in the start-up
# section (`plugin`).
SERVED: Final = "vmsuper, served"
NATIVE_SERVED: Final = "native, served"
TRIVIAL_SERVED: Final = "trivial, served"


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
        """CPU time of the server's reaped children (its runs)."""
        times = psutil.Process(self._server.proc.pid).cpu_times()
        return float(times.children_user + times.children_system)

    def __exit__(self, *_exc: object) -> None:
        self._server.stop()
