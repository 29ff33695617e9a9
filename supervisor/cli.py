"""The `vmsuper` command: run a VM from a config, check the host, read a run's logs.

Exit statuses of `vmsuper run`: the runner's own status once the config is loaded; 2 for a bad
command line or a bad config file (the same as argparse's usage errors, since both are "fix
your input"); 125 for an internal error the runner did not catch itself; 130 when interrupted
before the runner takes over.

Start-up time counts (it is on the way to the plugin's first request), so each command
imports only what it uses: `check` and `logs` are handed their arguments before the main
parser is built; only `run` imports the config's modules (msgspec's among them: `--version`,
`--help`, `logs`, `stats` and `top` would wait on them for nothing), loads the config and hands
it to supervisor/launch.py, which starts the plugin and only then imports the runner.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, cast

from vmsuper import __version__
from vmsuper.supervisor.entry import exit_now
from vmsuper.workers.limits import MAX_VCPUS

if TYPE_CHECKING:
    from vmsuper.supervisor.config import Config

USAGE_ERROR = 2
INTERNAL_ERROR = 125
"""As outcome.EXIT_SUPERVISOR_FAILED (not imported here: `check` and `logs` need no runner)."""
INTERRUPTED = 130

# Command-line flag (argparse dest) -> the config key it overrides.
OVERRIDES = {
    "vcpus": "vm.vcpus",
    "low_latency": "vm.low_latency",
    "timeout": "vm.timeout",
    "transport": "plugin.vcpu_transport",
    "grace_period": "plugin.grace_period",
    "sandbox": "plugin.sandbox",
    "log_dir": "log.dir",
    "log_level": "log.level",
}


def _vcpu_count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if not 1 <= value <= MAX_VCPUS:
        raise argparse.ArgumentTypeError(f"expected an integer from 1 to {MAX_VCPUS}, got {text!r}")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected seconds >= 0, got {text!r}")
    return value


def _formatter(prog: str) -> argparse.HelpFormatter:
    """argparse's help formatter at the width argparse would take, without the shutil import
    its default makes (argparse makes a formatter for every argument it adds, and every run
    would pay the import): the COLUMNS variable, else the terminal's width, else 80; less 2."""
    try:
        columns = int(os.environ["COLUMNS"])
    except (KeyError, ValueError):
        columns = 0
    if columns <= 0:
        try:
            columns = os.get_terminal_size(sys.__stdout__.fileno()).columns  # type: ignore[union-attr]
        except (AttributeError, ValueError, OSError):
            columns = 0
    return argparse.HelpFormatter(prog, width=(columns or 80) - 2)


@functools.cache  # made once per process; `vmsuper serve` makes it before it forks its runs
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        formatter_class=_formatter,
        prog="vmsuper",
        description="A KVM host for plugin VMMs speaking crosvm's plugin protocol.",
    )
    parser.add_argument("--version", action="version", version=f"vmsuper {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser(
        "run",
        formatter_class=_formatter,
        help="run a VM and its plugin as a config file describes",
        description="Run a VM and its plugin as CONFIG describes. Flags override config keys.",
        epilog=(
            "exit status: the run's status (see the docs); 2 if the command line or the config"
            " is wrong; 130 if interrupted before the run starts"
        ),
    )
    run.add_argument("config", type=Path, metavar="CONFIG", help="the run's TOML config file")
    run.add_argument(
        "--vcpus", type=_vcpu_count, metavar="N", help=f"VCPUs, 1..{MAX_VCPUS} ([vm] vcpus)"
    )
    run.add_argument(
        "--log-dir",
        type=Path,
        metavar="DIR",
        help="log folder, relative to the current directory; may use {name}, {time}, {pid}"
        " ([log] dir)",
    )
    run.add_argument(
        "--log-level", choices=("debug", "info", "warning", "error"), help="([log] level)"
    )
    run.add_argument(
        "--transport",
        choices=("socket", "pipes"),
        help="the plugin's VCPU transport ([plugin] vcpu_transport)",
    )
    run.add_argument(
        "--grace-period",
        type=_seconds,
        metavar="S",
        help="seconds from shutdown to SIGKILL of the plugin ([plugin] grace_period)",
    )
    run.add_argument(
        "--timeout",
        type=_seconds,
        metavar="SECONDS",
        help="shut the run down after this many seconds, as for SIGTERM, and exit with"
        " status 124; 0: no limit ([vm] timeout)",
    )
    run.add_argument(
        "--low-latency",
        action=argparse.BooleanOptionalAction,
        help="hold /dev/cpu_dma_latency at 0 while VCPUs run ([vm] low_latency)",
    )
    run.add_argument(
        "--sandbox",
        action=argparse.BooleanOptionalAction,
        help="run the plugin in a bubblewrap sandbox ([plugin] sandbox)",
    )

    # These parse their own arguments (see `main`); listed here for `vmsuper --help`.
    commands.add_parser(
        "check",
        help="check that this host can run vmsuper (see 'vmsuper check --help')",
        add_help=False,
    )
    commands.add_parser(
        "logs",
        help="show, follow or summarize a run's logs",
        add_help=False,
    )
    commands.add_parser(
        "stats", help="one snapshot of live or finished runs' counters", add_help=False
    )
    commands.add_parser("top", help="a live view of every VCPU of every run", add_help=False)
    commands.add_parser(
        "serve",
        help="keep a supervisor ready, so that this user's runs start sooner",
        add_help=False,
    )
    return parser


def overrides_from_args(args: argparse.Namespace) -> dict[str, object]:
    """The config overrides the given flags ask for; a log folder becomes absolute."""
    overrides: dict[str, object] = {}
    for dest, key in OVERRIDES.items():
        value = getattr(args, dest)
        if value is None:
            continue
        if dest == "log_dir":
            value = Path(os.path.abspath(value))
        overrides[key] = value
    return overrides


def _run(args: argparse.Namespace) -> int:
    # Here, not at the top: the config's modules (msgspec among them) are a run's alone.
    from vmsuper.supervisor.config import ConfigError, load_config

    try:
        config = load_config(args.config, overrides=overrides_from_args(args))
    except ConfigError as exc:
        print(f"vmsuper run: error: {exc}", file=sys.stderr)
        return USAGE_ERROR
    try:
        # The plugin is started first; the runner's imports overlap its start (launch.py).
        launch = importlib.import_module("vmsuper.supervisor.launch")
        run = cast("Callable[[Config, Path], int]", launch.run)
        return run(config, args.config)
    except Exception as exc:  # the runner handles its own; this is the last line of defence
        print(f"vmsuper: internal error: {exc!r} (exit status {INTERNAL_ERROR})", file=sys.stderr)
        return INTERNAL_ERROR


def _check(argv: Sequence[str]) -> int:
    check = importlib.import_module("vmsuper.supervisor.check")
    main = cast(Callable[[list[str]], int], check.main)
    return main(list(argv))


def _logs(argv: Sequence[str]) -> int:
    logview = importlib.import_module("vmsuper.supervisor.logview")
    main = cast(Callable[[list[str]], int], logview.main)
    return main(list(argv))


def _own_parser(module: str, argv: Sequence[str]) -> int:
    main = cast(Callable[[list[str]], int], importlib.import_module(module).main)
    return main(list(argv))


def main(argv: Sequence[str] | None = None) -> int:
    """The `vmsuper` command's full command line (bin/vmsuper, through `entry.main`); returns the
    exit status.

    Called as the command (no `argv`), a finished `vmsuper run` ends the process right away
    with its status (`entry.exit_now`) instead of returning.
    """
    as_command = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        # These parse their own options, in their own modules.
        if argv[:1] == ["check"]:
            return _check(argv[1:])
        if argv[:1] == ["logs"]:
            return _logs(argv[1:])
        if argv[:1] in (["stats"], ["top"], ["serve"]):
            return _own_parser(f"vmsuper.supervisor.{argv[0]}", argv[1:])
        args = build_parser().parse_args(argv)
        if args.command == "run":
            status = _run(args)
            if as_command:
                exit_now(status)
            return status
        raise AssertionError(f"unhandled command {args.command!r}")  # pragma: no cover
    except KeyboardInterrupt:
        return INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
