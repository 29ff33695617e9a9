"""`python -m benchmarks.docs [RESULTS.json]`: put a run's figures into docs/performance.md.

The figures in the docs are never typed in: they are rendered from the JSON of a committed
run (docs/performance.json), between two marker lines of docs/performance.md, and a test checks
that the two agree. Given a new results file, the command copies it to docs/performance.json
first; without one, it renders the committed JSON again.
"""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

from . import report

ROOT: Final = Path(__file__).resolve().parent.parent
DOC: Final = ROOT / "docs" / "performance.md"
RESULTS: Final = ROOT / "docs" / "performance.json"
BEGIN: Final = (
    "<!-- figures: begin (rendered from performance.json by python -m benchmarks.docs) -->"
)
END: Final = "<!-- figures: end -->"


class DocsError(Exception):
    """The document lacks its marker lines, or the results are not a harness run."""


def markdown_table(columns: Sequence[report.Column], rows: Sequence[report.Row]) -> str:
    lines = ["| " + " | ".join(head for head, _ in columns) + " |"]
    lines.append("| " + " | ".join("---" for _ in columns) + " |")
    for row in rows:
        lines.append("| " + " | ".join(show(row) for _, show in columns) + " |")
    return "\n".join(lines)


def render(results: dict[str, Any]) -> str:
    """The generated part of the document: the machine, then every section's table, then the
    targets with their verdicts."""
    machine = results["machine"]
    settings = results["settings"]
    load = ", ".join(f"{v:.1f}" for v in machine["loadavg_1min"])
    parts = [
        f"Run of {settings.get('date', 'an unrecorded date')} on {machine['cpu_model']},"
        f" {machine['nproc']} CPUs, Linux {machine['kernel']}, Python {machine['python']};"
        f" N = {settings['exits']} exits, {settings['repeat']} runs per figure, whole run"
        f" {settings['seconds']:.0f} s; 1-minute load average at start and end: {load}."
        " Medians with [min-max]."
    ]
    for name, rows in results["sections"].items():
        parts.append(f"### {report.TITLES[name]}\n\n{markdown_table(report.COLUMNS[name], rows)}")
    goals = results.get("targets", [])
    if goals:
        lines = [
            "### Targets (floor: what the figure cannot go below on this machine, from the same"
            " run; see Reading the figures)",
            "",
            "| target | measured | limit | floor | |",
            "| --- | --- | --- | --- | --- |",
        ]
        for g in goals:
            measured = "-" if g["measured"] is None else f"{g['measured']:.2f} {g['unit']}"
            verdict = report.verdict(g)
            shown = verdict if g["met"] else f"**{verdict}**"
            lines.append(
                f"| {g['target']} | {measured} | {g['limit']:g} {g['unit']}"
                f" | {report.floor_text(g)} | {shown} |"
            )
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


def splice(document: str, generated: str) -> str:
    """`document` with the text between its marker lines replaced by `generated`."""
    head, found, rest = document.partition(BEGIN + "\n")
    middle, found_end, tail = rest.partition(END)
    if not found or not found_end:
        raise DocsError(f"{DOC.name} lacks the lines {BEGIN!r} and {END!r}")
    del middle
    return f"{head}{BEGIN}\n{generated}\n{END}{tail}"


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) > 1 or (args and args[0].startswith("-")):
        print(__doc__, file=sys.stderr)
        return 2
    try:
        if args:
            source = Path(args[0])
            results = json.loads(source.read_text())
            if "sections" not in results or results["settings"].get("quick"):
                raise DocsError(f"{source} is not the results of a full harness run")
            if source.resolve() != RESULTS.resolve():  # the committed file itself: render it
                shutil.copyfile(source, RESULTS)
        results = json.loads(RESULTS.read_text())
        DOC.write_text(splice(DOC.read_text(), render(results)))
    except (OSError, ValueError, DocsError) as exc:
        print(f"benchmarks.docs: {exc}", file=sys.stderr)
        return 1
    print(f"rendered {RESULTS.relative_to(ROOT)} into {DOC.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
