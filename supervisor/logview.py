"""`vmsuper logs DIR`: read a run's JSON-lines logs as one timeline, a live tail, or a summary.

DIR holds ``supervisor.jsonl`` and one ``vcpu-N.jsonl`` per VCPU worker (see
`vmsuper.shared.logs`). Records of all files are merged by timestamp. Filters:

- ``--vcpu N`` (repeatable): only records about those VCPUs (a record's ``vcpu`` field, or for
  a worker's file, its VCPU); the supervisor's own records carry no VCPU and are left out.
- ``--event NAME`` (repeatable): event names, exact or shell-style globs (``vcpu_*``).
- ``--level LEVEL``: the minimum level.
- ``--since T`` / ``--until T``: T is an ISO 8601 timestamp (UTC unless it names a zone) or a
  number of seconds after the run's first record (``--since 2.5``).

``--follow`` prints what is there, then polls every 0.2 s for new lines and new VCPU files until
the supervisor writes ``run_finished`` (exit 0) or the user interrupts (exit 130).

``--summary`` reports the run's outcome (the supervisor's ``run_finished`` record: ``status``,
``reason``) and, per VCPU, the exit counts each worker logs at shutdown in one
``vcpu_exit_counts`` record (``exits``: kind -> count, ``ranges``: reserved range -> count).
Only ``--vcpu`` and ``--json`` apply to it.

Malformed lines are reported on stderr with file and line number and skipped. Exit status:
0 done, 1 no such folder or no logs in it, 2 bad arguments, 130 interrupted.
"""

from __future__ import annotations

import argparse
import fnmatch
import heapq
import json
import os
import re
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import IO, Any, TextIO

from vmsuper.shared.logs import LEVELS, SUPERVISOR_LOG, format_text

POLL_INTERVAL = 0.2
MAX_MALFORMED_REPORTS = 10
_VCPU_FILE = re.compile(r"vcpu-(\d+)\.jsonl")
_LEVEL_RANK = {name: i for i, name in enumerate(LEVELS)}


class LogViewError(Exception):
    """The folder cannot be read as a run's logs (exit status 1)."""


@dataclass(frozen=True)
class TimeBound:
    """An absolute instant, or seconds after the run's first record."""

    at: datetime | None = None
    offset: float | None = None

    def resolve(self, first: datetime) -> datetime:
        if self.at is not None:
            return self.at
        assert self.offset is not None
        return first + timedelta(seconds=self.offset)


def parse_time_bound(text: str) -> TimeBound:
    """``12.5`` (seconds after the first record) or an ISO 8601 timestamp (UTC if no zone)."""
    try:
        seconds = float(text)
    except ValueError:
        pass
    else:
        if not seconds >= 0 or seconds == float("inf"):
            raise argparse.ArgumentTypeError(f"expected seconds >= 0, got {text!r}")
        return TimeBound(offset=seconds)
    try:
        at = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected an ISO 8601 timestamp or seconds after the first record, got {text!r}"
        ) from None
    return TimeBound(at=at if at.tzinfo else at.replace(tzinfo=UTC))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `vmsuper logs`, shared by the CLI and `main`."""
    parser.add_argument("dir", type=Path, metavar="DIR", help="the run's log folder")
    parser.add_argument(
        "--vcpu", type=int, action="append", metavar="N", help="only this VCPU (repeatable)"
    )
    parser.add_argument(
        "--event",
        action="append",
        metavar="NAME",
        help="only this event; exact or a glob like 'vcpu_*' (repeatable)",
    )
    parser.add_argument("--level", choices=LEVELS, help="minimum level")
    parser.add_argument(
        "--since",
        type=parse_time_bound,
        metavar="T",
        help="from T: ISO 8601 (UTC unless zoned) or seconds after the first record",
    )
    parser.add_argument("--until", type=parse_time_bound, metavar="T", help="up to T, as --since")
    parser.add_argument(
        "--follow",
        "-f",
        action="store_true",
        help="keep printing new records until the run finishes (or Ctrl-C)",
    )
    parser.add_argument(
        "--summary", action="store_true", help="the run's outcome and exit counts per VCPU"
    )
    parser.add_argument("--json", action="store_true", help="print JSON lines (or a JSON summary)")


@dataclass
class Record:
    time: datetime
    data: dict[str, Any]
    raw: str
    file_index: int
    lineno: int

    @property
    def key(self) -> tuple[datetime, int, int]:
        return (self.time, self.file_index, self.lineno)


class _Malformed:
    """Reports skipped lines on stderr, at most MAX_MALFORMED_REPORTS per file."""

    def __init__(self, err: TextIO) -> None:
        self.err = err
        self.counts: dict[Path, int] = {}

    def report(self, path: Path, lineno: int, why: str) -> None:
        count = self.counts.get(path, 0) + 1
        self.counts[path] = count
        if count <= MAX_MALFORMED_REPORTS:
            self.err.write(f"vmsuper logs: {path}:{lineno}: skipped malformed line ({why})\n")
        if count == MAX_MALFORMED_REPORTS:
            self.err.write(f"vmsuper logs: {path}: further malformed lines are not reported\n")


class _LogFile:
    """One log file read incrementally: complete lines only, unless the writer is done."""

    def __init__(self, path: Path, index: int, malformed: _Malformed) -> None:
        self.path = path
        self.index = index
        match = _VCPU_FILE.fullmatch(path.name)
        self.vcpu = int(match[1]) if match else None
        self.malformed = malformed
        self.file: IO[bytes] = path.open("rb")
        self.partial = b""
        self.lineno = 0

    def close(self) -> None:
        self.file.close()

    def records(self, *, final: bool) -> Iterator[Record]:
        """Records in the lines written so far; with `final`, a last unterminated line too."""
        while True:
            chunk = self.file.readline()
            if not chunk:
                break
            line = self.partial + chunk
            if not line.endswith(b"\n"):
                self.partial = line
                break
            self.partial = b""
            record = self._parse(line)
            if record is not None:
                yield record
        if final and self.partial:
            line, self.partial = self.partial, b""
            record = self._parse(line)
            if record is not None:
                yield record

    def _parse(self, line: bytes) -> Record | None:
        self.lineno += 1
        text = line.decode("utf-8", errors="replace").rstrip("\r\n")
        if not text.strip():
            return None
        result = self._decode(text)
        if isinstance(result, str):
            self.malformed.report(self.path, self.lineno, result)
            return None
        return result

    def _decode(self, text: str) -> Record | str:
        """The record on this line, or why it is not one."""
        try:
            data = json.loads(text)
        except ValueError:
            return "not JSON"
        if not isinstance(data, dict):
            return "not a JSON object"
        stamp = data.get("timestamp")
        if not isinstance(stamp, str):
            return "no timestamp"
        try:
            when = datetime.fromisoformat(stamp)
        except ValueError:
            return f"bad timestamp {stamp!r}"
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        if self.vcpu is not None:
            data.setdefault("vcpu", self.vcpu)
        return Record(when, data, text, self.index, self.lineno)


class _Folder:
    """The log files of one run folder; new VCPU files are picked up on `discover`."""

    def __init__(self, path: Path, malformed: _Malformed) -> None:
        if not path.exists():
            raise LogViewError(f"no such folder: {path}")
        if not path.is_dir():
            raise LogViewError(f"not a folder: {path}")
        self.path = path
        self.malformed = malformed
        self.files: dict[str, _LogFile] = {}

    def discover(self) -> None:
        names = [
            entry.name
            for entry in self.path.iterdir()
            if entry.name == SUPERVISOR_LOG or _VCPU_FILE.fullmatch(entry.name)
        ]
        for name in sorted(names, key=_file_order):
            if name not in self.files:
                try:
                    self.files[name] = _LogFile(self.path / name, len(self.files), self.malformed)
                except OSError as exc:
                    raise LogViewError(f"cannot read {self.path / name}: {exc.strerror}") from None

    def close(self) -> None:
        for file in self.files.values():
            file.close()

    def read(self, *, final: bool) -> list[Record]:
        batch = [r for f in self.files.values() for r in f.records(final=final)]
        batch.sort(key=lambda r: r.key)
        return batch

    def stream(self) -> Iterator[Record]:
        """All records of all files, merged by time without loading whole files."""
        return heapq.merge(
            *(f.records(final=True) for f in self.files.values()), key=lambda r: r.key
        )


def _file_order(name: str) -> tuple[int, int]:
    match = _VCPU_FILE.fullmatch(name)
    return (1, int(match[1])) if match else (0, 0)


@dataclass
class _Filter:
    vcpus: set[int] | None
    events: list[str] | None
    min_rank: int | None
    since: TimeBound | None
    until: TimeBound | None
    first: datetime | None = None
    since_at: datetime | None = field(default=None, init=False)
    until_at: datetime | None = field(default=None, init=False)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> _Filter:
        return cls(
            vcpus=set(args.vcpu) if args.vcpu else None,
            events=args.event or None,
            min_rank=_LEVEL_RANK[args.level] if args.level else None,
            since=args.since,
            until=args.until,
        )

    def accepts(self, record: Record) -> bool:
        if self.first is None:
            self.first = record.time
            self.since_at = self.since.resolve(record.time) if self.since else None
            self.until_at = self.until.resolve(record.time) if self.until else None
        data = record.data
        if self.vcpus is not None and data.get("vcpu") not in self.vcpus:
            return False
        if self.events is not None:
            event = str(data.get("event", ""))
            if not any(fnmatch.fnmatchcase(event, pattern) for pattern in self.events):
                return False
        if self.min_rank is not None:
            rank = _LEVEL_RANK.get(str(data.get("level")), len(LEVELS))
            if rank < self.min_rank:
                return False
        if self.since_at is not None and record.time < self.since_at:
            return False
        return not (self.until_at is not None and record.time > self.until_at)


def run(
    args: argparse.Namespace,
    *,
    out: TextIO | None = None,
    err: TextIO | None = None,
    poll_interval: float = POLL_INTERVAL,
) -> int:
    """Carry out `vmsuper logs` with parsed arguments; returns the exit status."""
    out = out if out is not None else sys.stdout
    err = err if err is not None else sys.stderr
    if args.summary and (args.follow or args.event or args.level or args.since or args.until):
        err.write("vmsuper logs: error: --summary takes only --vcpu and --json\n")
        return 2
    malformed = _Malformed(err)
    folder: _Folder | None = None
    try:
        folder = _Folder(args.dir, malformed)
        folder.discover()
        if not folder.files:
            raise LogViewError(
                f"no logs in {args.dir} (expected {SUPERVISOR_LOG} and vcpu-N.jsonl files)"
            )
        if args.summary:
            summary = summarize(folder.stream(), vcpus=set(args.vcpu) if args.vcpu else None)
            files = [f.vcpu for f in folder.files.values() if f.vcpu is not None]
            summary.seen.update(v for v in files if not args.vcpu or v in args.vcpu)
            out.write(summary.to_json() + "\n" if args.json else summary.to_text())
            return 0
        select = _Filter.from_args(args)
        if args.follow:
            return _follow(folder, select, args.json, out, poll_interval)
        _emit(folder.stream(), select, args.json, out)
        return 0
    except LogViewError as exc:
        err.write(f"vmsuper logs: error: {exc}\n")
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        _silence_stdout(out)
        return 0
    finally:
        if folder is not None:
            folder.close()


def _emit(records: Iterable[Record], select: _Filter, as_json: bool, out: TextIO) -> None:
    for record in records:
        if select.accepts(record):
            out.write((record.raw if as_json else format_text(record.data)) + "\n")


def _follow(
    folder: _Folder, select: _Filter, as_json: bool, out: TextIO, poll_interval: float
) -> int:
    while True:
        folder.discover()
        batch = folder.read(final=False)
        finished = any(_is_run_finished(r, folder) for r in batch)
        if finished:
            # run_finished is the supervisor's last record, but a worker's last lines may
            # have landed after its file was read in this round.
            folder.discover()
            batch = sorted(batch + folder.read(final=True), key=lambda r: r.key)
        _emit(batch, select, as_json, out)
        out.flush()
        if finished:
            return 0
        time.sleep(poll_interval)


def _is_run_finished(record: Record, folder: _Folder) -> bool:
    supervisor = folder.files.get(SUPERVISOR_LOG)
    return (
        supervisor is not None
        and record.file_index == supervisor.index
        and record.data.get("event") == "run_finished"
    )


def _silence_stdout(out: TextIO) -> None:
    """After the reader of a pipe went away, keep Python's exit-time flush quiet."""
    if out is sys.stdout:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)


@dataclass
class Summary:
    """What `--summary` reports: the outcome and per-VCPU exit counts."""

    status: int | None = None
    reason: str | None = None
    finished: bool = False
    exits: dict[int, dict[str, int]] = field(default_factory=dict)
    ranges: dict[int, dict[str, int]] = field(default_factory=dict)
    seen: set[int] = field(default_factory=set)

    def to_json(self) -> str:
        run = {"status": self.status, "reason": self.reason} if self.finished else None
        vcpus = {
            str(v): {"exits": self.exits.get(v, {}), "ranges": self.ranges.get(v, {})}
            for v in sorted(self.exits)
        }
        return json.dumps({"run": run, "vcpus": vcpus, "missing": self.missing()})

    def missing(self) -> list[int]:
        return sorted(self.seen - set(self.exits))

    def to_text(self) -> str:
        lines = []
        if self.finished:
            lines.append(f"run finished: status {self.status} ({self.reason})")
        else:
            lines.append("run: no run_finished record (still running, or the supervisor died)")
        vcpus = sorted(self.exits)
        if vcpus:
            kinds = sorted({k for v in vcpus for k in self.exits[v]})
            lines += ["", "exits by kind:"]
            lines += _table(
                ["vcpu", *kinds, "total"],
                [[f"vcpu{v}", *(self.exits[v].get(k, 0) for k in kinds)] for v in vcpus],
            )
            names = sorted({r for v in vcpus for r in self.ranges.get(v, {})})
            if names:
                lines += ["", "exits by reserved range:"]
                lines += _table(
                    ["range", *(f"vcpu{v}" for v in vcpus), "total"],
                    [[n, *(self.ranges.get(v, {}).get(n, 0) for v in vcpus)] for n in names],
                )
        else:
            lines += ["", "no exit counts recorded"]
        missing = self.missing()
        if missing:
            names_missing = ", ".join(f"vcpu{v}" for v in missing)
            lines += ["", f"no exit counts from {names_missing} (worker did not shut down cleanly)"]
        return "\n".join(lines) + "\n"


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    """Rows of a label then numbers, with a total column and a total row."""
    full = [[*row, sum(row[1:])] for row in rows]
    if len(full) > 1:
        full.append(["total", *(sum(col) for col in list(zip(*full, strict=True))[1:])])
    cells = [header, *([str(c) for c in row] for row in full)]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    return [
        "  "
        + "  ".join(
            c.ljust(widths[i]) if i == 0 else c.rjust(widths[i]) for i, c in enumerate(row)
        ).rstrip()
        for row in cells
    ]


def summarize(records: Iterable[Record], *, vcpus: set[int] | None = None) -> Summary:
    """Collect `run_finished` and the `vcpu_exit_counts` of the chosen VCPUs (all if None)."""
    summary = Summary()
    for record in records:
        data = record.data
        event = data.get("event")
        vcpu = data.get("vcpu")
        if event == "run_finished" and "vcpu" not in data:
            status = data.get("status")
            summary.finished = True
            summary.status = status if isinstance(status, int) else None
            summary.reason = str(data.get("reason", ""))
        if not isinstance(vcpu, int) or (vcpus is not None and vcpu not in vcpus):
            continue
        summary.seen.add(vcpu)
        if event == "vcpu_exit_counts":
            _add_counts(summary.exits.setdefault(vcpu, {}), data.get("exits"))
            _add_counts(summary.ranges.setdefault(vcpu, {}), data.get("ranges"))
    return summary


def _add_counts(into: dict[str, int], counts: object) -> None:
    if isinstance(counts, dict):
        for name, count in counts.items():
            if isinstance(count, int) and not isinstance(count, bool):
                into[str(name)] = into.get(str(name), 0) + count


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m vmsuper.supervisor.logview DIR ...`, the same as `vmsuper logs`."""
    parser = argparse.ArgumentParser(
        prog="vmsuper logs",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
