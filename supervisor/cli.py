"""The `vmsuper` command: run a VM from a config, check the host, read a run's logs.

Exit statuses of `vmsuper run`: the runner's own status once the config is loaded; 2 for a bad
command line or a bad config file (the same as argparse's usage errors, since both are "fix
your input"); 130 when interrupted before the runner takes over.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import cast

from vmsuper import __version__
from vmsuper.supervisor import logview
from vmsuper.supervisor.config import MAX_VCPUS, Config, ConfigError, load_config

USAGE_ERROR = 2
INTERRUPTED = 130

# Command-line flag (argparse dest) -> the config key it overrides.
OVERRIDES = {
    "vcpus": "vm.vcpus",
    "low_latency": "vm.low_latency",
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vmsuper",
        description="A KVM host for plugin VMMs speaking crosvm's plugin protocol.",
    )
    parser.add_argument("--version", action="version", version=f"vmsuper {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser(
        "run",
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
        "--low-latency",
        action=argparse.BooleanOptionalAction,
        help="hold /dev/cpu_dma_latency at 0 while VCPUs run ([vm] low_latency)",
    )
    run.add_argument(
        "--sandbox",
        action=argparse.BooleanOptionalAction,
        help="run the plugin in a bubblewrap sandbox ([plugin] sandbox)",
    )

    commands.add_parser(
        "check",
        help="check that this host can run vmsuper (see 'vmsuper check --help')",
        add_help=False,
    )

    logs = commands.add_parser(
        "logs",
        help="show, follow or summarize a run's logs",
        description=logview.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    logview.add_arguments(logs)
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
    try:
        config = load_config(args.config, overrides=overrides_from_args(args))
    except ConfigError as exc:
        print(f"vmsuper run: error: {exc}", file=sys.stderr)
        return USAGE_ERROR
    runner = importlib.import_module("vmsuper.supervisor.runner")
    run = cast(Callable[[Config], int], runner.run)
    return run(config)


def _check(argv: Sequence[str]) -> int:
    check = importlib.import_module("vmsuper.supervisor.check")
    main = cast(Callable[[list[str]], int], check.main)
    return main(list(argv))


def main(argv: Sequence[str] | None = None) -> int:
    """The `vmsuper` console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv[:1] == ["check"]:
            return _check(argv[1:])  # its own options, parsed by the check module
        args = build_parser().parse_args(argv)
        if args.command == "run":
            return _run(args)
        if args.command == "logs":
            return logview.run(args)
        raise AssertionError(f"unhandled command {args.command!r}")  # pragma: no cover
    except KeyboardInterrupt:
        return INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
