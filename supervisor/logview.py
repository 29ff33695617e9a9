"""vmsuper logs [DIR]: read a run's JSON-lines logs as one timeline, a live tail, or a summary.

DIR holds 'supervisor.jsonl' and one 'vcpu-N.jsonl' per VCPU worker (see
vmsuper.shared.logs). DIR may also be a folder of run folders (such as 'runs'): the latest
run in it is read. Without DIR, the latest run in the default log root is read: 'runs'
beside the config, looked for in the current folder and in each folder right below it
('configs/runs' for the demo). 'vmsuper run' prints its log folder on stderr when it starts.

Records of all files are merged by timestamp. Filters:

- --vcpu N (repeatable): only records about those VCPUs (a record's 'vcpu' field, or for a
  worker's file, its VCPU); the supervisor's own records carry no VCPU and are left out.
  A VCPU the run does not have is an error.
- --event NAME (repeatable): event names, exact or shell-style globs ('vcpu_*'). A name or
  glob that no record of the run has is an error (with --follow, a warning: it may come).
- --level LEVEL: the minimum level.
- --since T / --until T: T is an ISO 8601 timestamp (UTC unless it names a zone) or a number
  of seconds after the run's first record (--since 2.5).

--follow prints what is there, then polls every 0.2 s for new lines and new VCPU files. It
returns 0 once the supervisor has written 'run_finished', 1 if the supervisor is gone without
writing it (killed, or crashed), and 130 when interrupted (Ctrl-C).

--summary reports the run's outcome (the supervisor's 'run_finished' record: status and
cause), or that it is still running, or that its supervisor died; then per VCPU its run time,
exits and exits per second, and the exits by kind and by reserved range, from the
'vcpu_exit_counts' record each worker writes when it stops. These records are written at every
log level. Only --vcpu and --json apply to it.

Malformed lines are reported on stderr with file and line number and skipped. Exit status:
0 done, 1 no such folder, no logs in it, or (--follow) the supervisor died; 2 bad arguments,
130 interrupted.
"""

from __future__ import annotations

import argparse
import fnmatch
import heapq
import io
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

from vmsuper.shared.logs import LEVELS, SUPERVISOR_LOG, format_text, run_is_live

POLL_INTERVAL = 0.2
DEFAULT_LOG_ROOT = "runs"
"""Where `vmsuper run` puts run folders by default, beside the config (config.DEFAULT_LOG_DIR)."""
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
    parser.add_argument(
        "dir",
        type=Path,
        nargs="?",
        metavar="DIR",
        help="the run's log folder, or a folder of runs (its latest is read);"
        " default: the latest run in ./runs or ./*/runs",
    )
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
        help="keep printing new records; returns when the run finishes (0), when its"
        " supervisor is gone without finishing (1), or on Ctrl-C (130)",
    )
    parser.add_argument(
        "--summary",
        action="store_true",
        help="the run's outcome (or that it is live), and per VCPU its run time and exits",
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
        path = resolve_run_folder(args.dir, err)
        folder = _Folder(path, malformed)
        folder.discover()
        if not folder.files:
            raise LogViewError(
                f"no logs in {path} (expected {SUPERVISOR_LOG} and vcpu-N.jsonl files)"
            )
        facts = _RunFacts.read(folder, events=bool(args.event) and not args.summary)
        problem = facts.check_vcpus(args.vcpu)
        if problem is None and not args.summary:
            problem = facts.check_events(args.event, warn_only=args.follow, err=err)
        if problem is not None:
            err.write(f"vmsuper logs: error: {problem}\n")
            return 2
        if args.summary:
            summary = summarize(folder.stream(), vcpus=set(args.vcpu) if args.vcpu else None)
            summary.seen.update(v for v in facts.vcpus if not args.vcpu or v in args.vcpu)
            summary.live = not summary.finished and run_is_live(path)
            summary.now = datetime.now(UTC)
            out.write(summary.to_json() + "\n" if args.json else summary.to_text())
            return 0
        select = _Filter.from_args(args)
        if args.follow:
            return _follow(folder, select, args.json, out, err, poll_interval)
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


def _has_logs(folder: Path) -> bool:
    return (folder / SUPERVISOR_LOG).is_file() or any(
        _VCPU_FILE.fullmatch(p.name) for p in folder.glob("vcpu-*.jsonl")
    )


def _run_started_at(folder: Path) -> tuple[float, str]:
    """Sort key of a run folder: its first supervisor record's time, else the file's mtime."""
    path = folder / SUPERVISOR_LOG
    try:
        with path.open("rb") as f:
            first = json.loads(f.readline())
        when = datetime.fromisoformat(first["timestamp"])
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        return when.timestamp(), folder.name
    except (OSError, ValueError, KeyError, TypeError):
        pass
    try:
        return path.stat().st_mtime, folder.name
    except OSError:
        return 0.0, folder.name


def latest_run(roots: Sequence[Path]) -> Path | None:
    """The run folder (one holding logs) directly in any of `roots` that started last."""
    runs = [
        entry
        for root in roots
        if root.is_dir()
        for entry in root.iterdir()
        if entry.is_dir() and _has_logs(entry)
    ]
    return max(runs, key=_run_started_at, default=None)


def default_log_roots(cwd: Path) -> list[Path]:
    """``./runs`` and ``./*/runs``: where the default log folder lands for a config here or
    one folder down."""
    below = sorted(p / DEFAULT_LOG_ROOT for p in cwd.iterdir() if p.is_dir())
    return [cwd / DEFAULT_LOG_ROOT, *(p for p in below if p.is_dir())]


def resolve_run_folder(given: Path | None, err: TextIO, cwd: Path | None = None) -> Path:
    """The run folder to read: `given` itself, the latest run in it, or the latest run in the
    default log roots; says on `err` which run it picked when it picked one."""
    if given is not None:
        if not given.is_dir() or _has_logs(given):
            return given  # _Folder reports a missing folder or a file
        found = latest_run([given])
        if found is None:
            return given  # reported as a folder without logs
    else:
        cwd = cwd if cwd is not None else Path.cwd()
        roots = default_log_roots(cwd)
        found = latest_run(roots)
        if found is None:
            looked = ", ".join(str(r) for r in roots if r.is_dir()) or "none of them exists"
            raise LogViewError(
                f"no run folders in the default log roots ./{DEFAULT_LOG_ROOT} and"
                f" ./*/{DEFAULT_LOG_ROOT} below {cwd} (looked in: {looked}); give the run's"
                " folder (vmsuper run prints it when it starts)"
            )
    err.write(f"vmsuper logs: reading the latest run, {found}\n")
    return found


@dataclass
class _RunFacts:
    """What the run has, for checking --vcpu and --event against it."""

    vcpus: set[int]
    events: set[str]

    @classmethod
    def read(cls, folder: _Folder, *, events: bool) -> _RunFacts:
        """The VCPUs (log files, and the count in run_started); with `events`, every event
        name in the logs (a pass over all of them, so only when --event asks)."""
        vcpus = {f.vcpu for f in folder.files.values() if f.vcpu is not None}
        names: set[str] = set()
        quiet = _Folder(folder.path, _Malformed(io.StringIO()))
        try:
            quiet.discover()
            supervisor = quiet.files.get(SUPERVISOR_LOG)
            for record in supervisor.records(final=True) if supervisor else ():
                data = record.data
                count = data.get("vcpus")
                if data.get("event") == "run_started" and isinstance(count, int):
                    vcpus.update(range(count))
                    break
            if events:
                quiet.close()
                quiet = _Folder(folder.path, _Malformed(io.StringIO()))
                quiet.discover()
                names = {str(r.data.get("event", "")) for r in quiet.stream()}
        finally:
            quiet.close()
        return cls(vcpus, names)

    def check_vcpus(self, wanted: list[int] | None) -> str | None:
        unknown = sorted(set(wanted or ()) - self.vcpus)
        if not unknown:
            return None
        names = ", ".join(str(v) for v in unknown)
        have = _vcpu_list(self.vcpus) if self.vcpus else "no VCPU logs yet"
        return f"no VCPU {names} in this run (it has {have})"

    def check_events(
        self, patterns: list[str] | None, *, warn_only: bool, err: TextIO
    ) -> str | None:
        unknown = [
            p for p in patterns or () if not any(fnmatch.fnmatchcase(e, p) for e in self.events)
        ]
        if not unknown:
            return None
        names = ", ".join(repr(p) for p in unknown)
        problem = f"no record of this run has event {names}; its events: " + ", ".join(
            sorted(self.events)
        )
        if warn_only:
            err.write(f"vmsuper logs: warning: {problem} (following: it may still come)\n")
            return None
        return problem


def _vcpu_list(vcpus: set[int]) -> str:
    ordered = sorted(vcpus)
    if ordered == list(range(ordered[0], ordered[-1] + 1)) and len(ordered) > 2:
        return f"VCPUs {ordered[0]}-{ordered[-1]}"
    return ("VCPU " if len(ordered) == 1 else "VCPUs ") + ", ".join(str(v) for v in ordered)


def _emit(records: Iterable[Record], select: _Filter, as_json: bool, out: TextIO) -> None:
    for record in records:
        if select.accepts(record):
            out.write((record.raw if as_json else format_text(record.data)) + "\n")


def _follow(
    folder: _Folder,
    select: _Filter,
    as_json: bool,
    out: TextIO,
    err: TextIO,
    poll_interval: float,
) -> int:
    # A supervisor opens its log a moment before it locks it: a run counts as dead only
    # when it looked so on two polls in a row.
    dead_polls = 0
    while True:
        live = run_is_live(folder.path)
        dead_polls = 0 if live else dead_polls + 1
        folder.discover()
        batch = folder.read(final=False)
        finished = any(_is_run_finished(r, folder) for r in batch)
        if finished or dead_polls >= 2:
            # run_finished is the supervisor's last record, but a worker's last lines may
            # have landed after its file was read in this round.
            folder.discover()
            batch = sorted(batch + folder.read(final=True), key=lambda r: r.key)
            finished = finished or any(_is_run_finished(r, folder) for r in batch)
        _emit(batch, select, as_json, out)
        out.flush()
        if finished:
            return 0
        if dead_polls >= 2:
            err.write(
                "vmsuper logs: the supervisor is gone without a run_finished record"
                " (it was killed or crashed)\n"
            )
            return 1
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
    """What `--summary` reports: the outcome and, per VCPU, run time and exit counts."""

    status: int | None = None
    reason: str | None = None
    finished: bool = False
    live: bool = False
    """No run_finished yet, and the supervisor still runs (set by the caller)."""
    supervisor_pid: int | None = None
    started: datetime | None = None
    now: datetime | None = None
    """When the summary is made: a live VCPU's run time so far is measured to it."""
    exits: dict[int, dict[str, int]] = field(default_factory=dict)
    ranges: dict[int, dict[str, int]] = field(default_factory=dict)
    run_seconds: dict[int, float] = field(default_factory=dict)
    running_since: dict[int, datetime] = field(default_factory=dict)
    seen: set[int] = field(default_factory=set)

    def seconds(self, vcpu: int) -> float | None:
        """How long the VCPU ran: from its counts record, or so far for a live run."""
        if vcpu in self.run_seconds:
            return self.run_seconds[vcpu]
        since = self.running_since.get(vcpu)
        if self.live and since is not None and self.now is not None:
            return max(0.0, (self.now - since).total_seconds())
        return None

    def totals(self, vcpu: int) -> tuple[int | None, float | None]:
        """(exits, exits per second) of a VCPU; None where not known."""
        if vcpu not in self.exits:
            return None, None
        total = sum(self.exits[vcpu].values())
        seconds = self.seconds(vcpu)
        rate = total / seconds if seconds else None
        return total, rate

    def to_json(self) -> str:
        run = {"status": self.status, "reason": self.reason} if self.finished else None
        vcpus = {}
        for v in sorted(self.seen | set(self.exits)):
            total, rate = self.totals(v)
            vcpus[str(v)] = {
                "run_seconds": self.seconds(v),
                "total": total,
                "exits_per_second": rate,
                "exits": self.exits.get(v, {}),
                "ranges": self.ranges.get(v, {}),
            }
        return json.dumps(
            {
                "run": run,
                "live": self.live,
                "supervisor_pid": self.supervisor_pid,
                "vcpus": vcpus,
                "missing": self.missing(),
            }
        )

    def missing(self) -> list[int]:
        """VCPUs whose worker should have written its counts and did not."""
        if self.live:
            return []
        return sorted(self.seen - set(self.exits))

    def _run_line(self) -> str:
        if self.finished:
            return f"run finished: status {self.status} ({self.reason})"
        pid = f" (supervisor pid {self.supervisor_pid})" if self.supervisor_pid else ""
        if self.live:
            return f"run: live{pid}; exit counts come when each VCPU's worker stops"
        return f"run: no run_finished record, and the supervisor{pid} is gone (killed or crashed)"

    def to_text(self) -> str:
        lines = [self._run_line()]
        every = sorted(self.seen | set(self.exits))
        if every:
            lines += ["", "per VCPU:"]
            lines += _plain_table(
                ["vcpu", "run time", "exits", "exits/s"],
                [[f"vcpu{v}", *self._vcpu_cells(v)] for v in every],
            )
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
        elif not self.live:
            lines += ["", "no exit counts recorded"]
        missing = self.missing()
        if missing:
            names_missing = ", ".join(f"vcpu{v}" for v in missing)
            lines += ["", f"no exit counts from {names_missing} (worker did not shut down cleanly)"]
        return "\n".join(lines) + "\n"

    def _vcpu_cells(self, vcpu: int) -> list[str]:
        seconds = self.seconds(vcpu)
        total, rate = self.totals(vcpu)
        if seconds is None:
            run_time = "-"
        else:
            run_time = f"{seconds:.3f} s" + (" so far" if vcpu not in self.run_seconds else "")
        return [
            run_time,
            "-" if total is None else str(total),
            "-" if rate is None else f"{rate:.1f}",
        ]


def _plain_table(header: list[str], rows: list[list[str]]) -> list[str]:
    """Rows of a label then values, right-aligned, without totals."""
    cells = [header, *rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    return [
        "  "
        + "  ".join(
            c.ljust(widths[i]) if i == 0 else c.rjust(widths[i]) for i, c in enumerate(row)
        ).rstrip()
        for row in cells
    ]


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    """Rows of a label then numbers, with a total column and a total row."""
    full = [[*row, sum(row[1:])] for row in rows]
    if len(full) > 1:
        full.append(["total", *(sum(col) for col in list(zip(*full, strict=True))[1:])])
    return _plain_table(header, [[str(c) for c in row] for row in full])


def summarize(records: Iterable[Record], *, vcpus: set[int] | None = None) -> Summary:
    """Collect `run_started`, `run_finished`, and the `running` and `vcpu_exit_counts`
    records of the chosen VCPUs (all if None)."""
    summary = Summary()
    for record in records:
        data = record.data
        event = data.get("event")
        vcpu = data.get("vcpu")
        if event == "run_started" and "vcpu" not in data:
            pid = data.get("pid")
            summary.supervisor_pid = pid if isinstance(pid, int) else None
            summary.started = record.time
        if event == "run_finished" and "vcpu" not in data:
            status = data.get("status")
            summary.finished = True
            summary.status = status if isinstance(status, int) else None
            summary.reason = str(data.get("reason", ""))
        if not isinstance(vcpu, int) or (vcpus is not None and vcpu not in vcpus):
            continue
        summary.seen.add(vcpu)
        if event == "running":
            summary.running_since.setdefault(vcpu, record.time)
        elif event == "vcpu_exit_counts":
            _add_counts(summary.exits.setdefault(vcpu, {}), data.get("exits"))
            _add_counts(summary.ranges.setdefault(vcpu, {}), data.get("ranges"))
            seconds = data.get("run_seconds")
            if isinstance(seconds, int | float) and not isinstance(seconds, bool):
                summary.run_seconds[vcpu] = summary.run_seconds.get(vcpu, 0.0) + float(seconds)
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
