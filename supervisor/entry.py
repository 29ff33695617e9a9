"""The `vmsuper` command's first step: a run goes to `vmsuper serve` when one listens.

Only the hand-over's few imports come before that is known (supervisor/serve_client.py); every
other command, and a run no server takes, goes on to the full command line (supervisor/cli.py).
"""

from __future__ import annotations

import os
import sys

from vmsuper.supervisor import collector

TYPE_CHECKING = False  # typing costs the hand-over milliseconds (tests/test_cli.py)
if TYPE_CHECKING:
    from typing import NoReturn

INTERRUPTED = 130  # as cli.INTERRUPTED: interrupted before the run starts


def main() -> int:
    argv = sys.argv[1:]
    if argv[:1] == ["run"]:
        collector.pause()  # for the start-up's imports: see supervisor/collector.py
        from vmsuper.supervisor.serve_client import hand_over

        try:
            status = hand_over(argv)
        except KeyboardInterrupt:  # before the run started: the server stops it, if any
            return INTERRUPTED
        if status is not None:
            exit_now(status)
    from vmsuper.supervisor.cli import main as cli_main

    return cli_main()


def exit_now(status: int) -> NoReturn:
    """End the process with `status` without the interpreter's teardown, once a run is over.

    Freeing every module and object at exit releases nothing the system does not, and takes
    milliseconds: a direct run's about 20 ms (its imports), a served command's a few. By then
    the run has reaped its processes and closed its files (the log is written unbuffered), so
    only Python's own stdout and stderr buffers need flushing.
    """
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # closed, or its reader gone: nothing to keep
            continue
    os._exit(status)


if __name__ == "__main__":
    sys.exit(main())
