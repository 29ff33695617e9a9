"""`python -m benchmarks`: run the sections, print the tables, write every figure as JSON."""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Final

from vmsuper.shared.asm import AssemblyError
from vmsuper.supervisor.serve_client import SERVE_VARIABLE

from . import concurrent, cpu, exits, machine, memory, pc, placement, report, startup
from .build import BuildError, build_all
from .context import PATHS, Bench
from .vmrun import RunError

Section = Callable[[Bench], list[dict[str, Any]]]

# In run order; the reference runs right after the exits it is compared with.
SECTIONS: Final[dict[str, Section]] = {
    "exits": exits.exits,
    "reference": exits.reference,
    "async": exits.async_writes,
    "ioeventfd": exits.ioeventfd,
    "cpu": cpu.cpu,
    "startup": startup.startup,
    "memory": memory.memory,
    "concurrent": concurrent.concurrent,
    "placement": placement.placement,
    "pc": pc.pc,
}
# Sections --quick leaves out: each boot of the PC machine takes seconds, beside QEMU too.
NOT_QUICK: Final = frozenset({"pc"})
DEFAULT_EXITS: Final = 5000
DEFAULT_REPEAT: Final = 5
QUICK_EXITS: Final = 50
QUICK_REPEAT: Final = 1
RESULTS: Final = Path(__file__).resolve().parent / "results"


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Measure vmsuper on this machine's KVM (see docs/performance.md).",
    )
    parser.add_argument(
        "--quick", action="store_true", help="tiny runs that only check the harness works"
    )
    parser.add_argument(
        "--exits", type=_positive, metavar="N", help=f"guest loop length [{DEFAULT_EXITS}]"
    )
    parser.add_argument(
        "--repeat", type=_positive, metavar="K", help=f"runs per figure [{DEFAULT_REPEAT}]"
    )
    parser.add_argument(
        "--out", type=Path, metavar="FILE", help="JSON output [benchmarks/results/bench-TIME.json]"
    )
    parser.add_argument(
        "--only",
        nargs="+",
        choices=list(SECTIONS),
        metavar="NAME",
        help=f"run only these sections: {', '.join(SECTIONS)}",
    )
    parser.add_argument(
        "--work", type=Path, metavar="DIR", help="keep each run's config and logs in DIR"
    )
    return parser


def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    quick: bool = args.quick
    # Every run is its command's own, even where a `vmsuper serve` listens; the start-up
    # section starts a server of its own for its served rows.
    os.environ[SERVE_VARIABLE] = "0"
    # Mounted into the sandbox, whose plugin runs as an unprivileged user: it must enter the
    # folder to read the guests there (tempfile makes it 0700).
    work.chmod(0o755)
    bench = Bench(
        programs=build_all(),
        work=work,
        exits=args.exits or (QUICK_EXITS if quick else DEFAULT_EXITS),
        repeat=args.repeat or (QUICK_REPEAT if quick else DEFAULT_REPEAT),
        quick=quick,
    )
    names = [
        n
        for n in SECTIONS
        if (args.only is None and not (quick and n in NOT_QUICK))
        or (args.only is not None and n in args.only)
    ]
    load_before = os.getloadavg()[0]
    started = time.monotonic()
    sections: dict[str, list[dict[str, Any]]] = {}
    seconds: dict[str, float] = {}
    for name in names:
        print(f"running {name}...", end="", file=sys.stderr, flush=True)
        section_start = time.monotonic()
        sections[name] = SECTIONS[name](bench)
        seconds[name] = round(time.monotonic() - section_start, 1)
        print(f" {seconds[name]} s", file=sys.stderr, flush=True)
    if "exits" in sections:
        report.add_ratios(sections["exits"], sections.get("reference", []))
    if "cpu" in sections:
        report.add_cpu_ratios(sections["cpu"], sections.get("reference", []))
    return {
        # Other work on the machine skews every figure: the load says how quiet it was.
        "machine": {**machine.describe(), "loadavg_1min": [load_before, os.getloadavg()[0]]},
        "settings": {
            "date": time.strftime("%Y-%m-%d"),
            "exits": bench.exits,
            "async_exits": bench.exits * exits.ASYNC_FACTOR,
            "repeat": bench.repeat,
            "quick": quick,
            # The `[vm]` settings behind each row's `path` ({}: vmsuper's defaults).
            "paths": PATHS,
            "sections": names,
            "seconds": round(time.monotonic() - started, 1),
            "section_seconds": seconds,
        },
        "sections": sections,
        "targets": report.targets(sections),
    }


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out: Path = args.out or RESULTS / time.strftime("bench-%Y%m%d-%H%M%S.json")
    try:
        if args.work is not None:
            args.work.mkdir(parents=True, exist_ok=True)
            results = run(args, Path(tempfile.mkdtemp(prefix="bench-", dir=args.work)))
        else:
            with tempfile.TemporaryDirectory(prefix="vmsuper-bench-") as tmp:
                results = run(args, Path(tmp))
    except (AssemblyError, BuildError, RunError) as exc:
        print(f"benchmarks: {exc}", file=sys.stderr)
        return 1
    m = results["machine"]
    print(f"{m['cpu_model']}, {m['nproc']} CPUs, Linux {m['kernel']}, Python {m['python']}")
    print(report.render(results["sections"], results["targets"]))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nfigures written to {out}")
    return 0
