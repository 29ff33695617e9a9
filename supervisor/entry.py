"""The `vmsuper` command's first step: a run goes to `vmsuper serve` when one listens.

Only the hand-over's few imports come before that is known (supervisor/serve_client.py); every
other command, and a run no server takes, goes on to the full command line (supervisor/cli.py).
"""

from __future__ import annotations

import sys

INTERRUPTED = 130  # as cli.INTERRUPTED: interrupted before the run starts


def main() -> int:
    argv = sys.argv[1:]
    if argv[:1] == ["run"]:
        from vmsuper.supervisor.serve_client import hand_over

        try:
            status = hand_over(argv)
        except KeyboardInterrupt:  # before the run started: the server stops it, if any
            return INTERRUPTED
        if status is not None:
            return status
    from vmsuper.supervisor.cli import main as cli_main

    return cli_main()


if __name__ == "__main__":
    sys.exit(main())
