"""`vmsuper stats`: one snapshot of a run's VCPUs and processes, live or from its logs.

A live run (one whose `run.json` names a supervisor that still runs, see `runinfo`) is read
from its shared-memory region, mapped read-only: per VCPU its state and for how long it has
waited on the plugin, its exit counters by kind and by reserved range and, from a second
reading `interval` later, exits per second, and the plugin's response times (percentiles from
the log2 histogram the exit engine keeps). psutil adds CPU time and USS of the supervisor,
each VCPU worker and the plugin.

A finished run (a log folder without a live run.json) gives its final figures instead: the
exit counts by kind and by reserved range that each worker logged at shutdown, and the run's
outcome.

The JSON form (`--json`) is documented in docs/stats.md and only ever grows: fields are added,
never renamed or removed, while `format` stays 1.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import psutil

from vmsuper.shared.abi import RunState
from vmsuper.shared.shm import RegionView
from vmsuper.shared.shm_layout import ShmError
from vmsuper.shared.shm_slot import VcpuReading
from vmsuper.supervisor import runinfo
from vmsuper.supervisor.runinfo import RunInfo, RunInfoError
from vmsuper.workers.vcpu_protocol import range_label

__all__ = [
    "FORMAT",
    "ProcessFigures",
    "RunSnapshot",
    "StatsError",
    "VcpuFigures",
    "main",
    "percentile_ns",
    "snapshot",
    "state_name",
]

FORMAT: Final = 1
DEFAULT_INTERVAL: Final = 0.5
PERCENTILES: Final = (("p50", 0.50), ("p90", 0.90), ("p99", 0.99))
STATE_NAMES: Final = {
    RunState.NOT_STARTED: "not_started",
    RunState.INIT: "init",
    RunState.RUNNING: "in_guest",
    RunState.WAITING_PLUGIN: "waiting_plugin",
    RunState.PAUSED: "paused",
    RunState.STOPPED: "stopped",
}


def state_name(state: RunState | int) -> str:
    """The documented name of a run state ("unknown(N)" for a value no state has)."""
    if isinstance(state, RunState):
        return STATE_NAMES[state]
    return f"unknown({state})"


class StatsError(Exception):
    """The run named on the command line cannot be found or read."""


def percentile_ns(buckets: Sequence[int], fraction: float, max_ns: int) -> int | None:
    """The `fraction` percentile of a log2 histogram: the upper bound of the bucket where the
    count reaches it (so within a factor of two above the truth), never above `max_ns`."""
    total = sum(buckets)
    if total == 0:
        return None
    rank = fraction * total
    seen = 0
    for bucket, count in enumerate(buckets):
        seen += count
        if count and seen >= rank:
            return min(1 << bucket, max_ns)
    return max_ns


@dataclass
class VcpuFigures:
    vcpu: int
    state: str
    waiting_s: float | None
    exits: dict[str, int]
    exits_per_second: float | None
    ranges: dict[str, int] | None
    responses: int
    response_s: dict[str, float | None]
    stop_reason: str
    buckets: tuple[int, ...] | None = None
    """The response-time histogram (log2 buckets of ns, see `abi.HISTOGRAM_BUCKETS`)."""
    response_sum_ns: int = 0
    served_by_runner: int | None = None
    """Exits the runner served without waking the worker (live runs only)."""
    poll_window_s: float | None = None
    """How long the runner and the worker poll before they sleep, now: `poll_us`, or 0 while
    the polling gate has it off (live runs only)."""

    @property
    def total(self) -> int:
        return sum(self.exits.values())

    def to_dict(self) -> dict[str, Any]:
        return {
            "vcpu": self.vcpu,
            "state": self.state,
            "waiting_s": self.waiting_s,
            "exits": {
                "total": self.total,
                "by_kind": self.exits,
                "by_range": self.ranges,
                "per_second": self.exits_per_second,
                "served_by_runner": self.served_by_runner,
            },
            "response": {
                "count": self.responses,
                **self.response_s,
                "buckets": None if self.buckets is None else list(self.buckets),
            },
            "poll_window_s": self.poll_window_s,
            "stop_reason": self.stop_reason,
        }


@dataclass
class ProcessFigures:
    role: str
    """"supervisor", "vcpu_worker" or "plugin"."""
    pid: int
    vcpu: int | None = None
    cpu_s: float | None = None
    """User plus system CPU time; None if unreadable (e.g. a sandboxed plugin's other uid)."""
    uss_bytes: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "role": self.role,
            "pid": self.pid,
            "vcpu": self.vcpu,
            "cpu_s": self.cpu_s,
            "uss_bytes": self.uss_bytes,
        }


@dataclass
class RunSnapshot:
    log_dir: str
    live: bool
    pid: int | None = None
    host: str | None = None
    config: str | None = None
    started_at: str | None = None
    interval_s: float | None = None
    vcpus: list[VcpuFigures] = field(default_factory=list)
    processes: list[ProcessFigures] = field(default_factory=list)
    outcome: dict[str, Any] | None = None
    """Finished runs: {"status", "reason"} from the run_finished record (None if absent)."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "log_dir": self.log_dir,
            "live": self.live,
            "pid": self.pid,
            "host": self.host,
            "config": self.config,
            "started_at": self.started_at,
            "interval_s": self.interval_s,
            "vcpus": [v.to_dict() for v in self.vcpus],
            "processes": [p.to_dict() for p in self.processes],
            "outcome": self.outcome,
        }


def _figures(
    vcpu: int,
    first: VcpuReading,
    last: VcpuReading,
    elapsed: float | None,
    ranges: dict[str, int] | None = None,
) -> VcpuFigures:
    state = state_name(last.state)
    rate = None
    if elapsed:
        rate = (sum(last.exits.values()) - sum(first.exits.values())) / elapsed
    response: dict[str, float | None] = {
        name: _seconds(percentile_ns(last.buckets, fraction, last.response_max_ns))
        for name, fraction in PERCENTILES
    }
    response["max_s"] = _seconds(last.response_max_ns) if last.responses else None
    response["mean_s"] = (
        _seconds(last.response_sum_ns // last.responses) if last.responses else None
    )
    return VcpuFigures(
        vcpu=vcpu,
        state=state,
        waiting_s=_seconds(last.waiting_ns),
        exits=last.exits,
        exits_per_second=rate,
        ranges=ranges,
        responses=last.responses,
        response_s={(k if k.endswith("_s") else f"{k}_s"): v for k, v in response.items()},
        stop_reason=last.stop_reason,
        buckets=last.buckets,
        response_sum_ns=last.response_sum_ns,
        served_by_runner=last.runner_served,
        poll_window_s=last.poll_ns / 1e9,
    )


def _seconds(ns: int | None) -> float | None:
    return None if ns is None else ns / 1e9


def _process_pids(log_dir: Path) -> tuple[dict[int, int], int | None]:
    """(VCPU -> worker pid, plugin pid) from the supervisor's log."""
    workers: dict[int, int] = {}
    plugin = None
    try:
        lines = (log_dir / "supervisor.jsonl").read_text(errors="replace").splitlines()
    except OSError:
        return workers, plugin
    for line in lines:
        if '"plugin_started"' not in line and '"vcpu_workers_started"' not in line:
            continue
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if record.get("event") == "plugin_started" and isinstance(record.get("plugin_pid"), int):
            plugin = record["plugin_pid"]
        elif record.get("event") == "vcpu_workers_started":
            pids = record.get("workers")
            if isinstance(pids, list):
                workers = {i: p for i, p in enumerate(pids) if isinstance(p, int)}
    return workers, plugin


def _measure(figures: ProcessFigures) -> ProcessFigures:
    try:
        process = psutil.Process(figures.pid)
        with process.oneshot():
            times = process.cpu_times()
            figures.cpu_s = times.user + times.system
            figures.uss_bytes = process.memory_full_info().uss
    except (psutil.Error, OSError):
        pass
    return figures


def _processes(info: RunInfo) -> list[ProcessFigures]:
    workers, plugin = _process_pids(Path(info.log_dir))
    found = [ProcessFigures("supervisor", info.pid)]
    found += [ProcessFigures("vcpu_worker", pid, vcpu=v) for v, pid in sorted(workers.items())]
    if plugin is not None:
        found.append(ProcessFigures("plugin", plugin))
    return [_measure(p) for p in found]


def _range_labels(view: RegionView, vcpu: int) -> dict[str, int] | None:
    try:
        return {range_label(rng): count for rng, count in view.range_counts(vcpu)}
    except ShmError:  # its worker kept laying out new tables: no consistent copy
        return None


def live_snapshots(infos: Sequence[RunInfo], interval: float) -> list[RunSnapshot]:
    """Read live runs twice, `interval` seconds apart (0: once, no rates): every run's first
    reading, one wait, every run's second reading."""
    views: list[RegionView] = []
    try:
        for info in infos:
            try:
                views.append(RegionView.open(info.pid, info.shm_fd))
            except (OSError, ShmError) as exc:
                raise StatsError(f"cannot map the counters of run {info.pid}: {exc}") from None
        start = time.monotonic()
        first = [[view.reading(v) for v in range(view.vcpus)] for view in views]
        elapsed = None
        last = first
        if interval > 0 and views:
            time.sleep(interval)
            last = [[view.reading(v) for v in range(view.vcpus)] for view in views]
            elapsed = time.monotonic() - start
        ranges = [[_range_labels(view, v) for v in range(view.vcpus)] for view in views]
    finally:
        for view in views:
            view.close()
    return [
        RunSnapshot(
            log_dir=info.log_dir,
            live=True,
            pid=info.pid,
            host=info.host,
            config=info.config,
            started_at=info.started_at,
            interval_s=elapsed,
            vcpus=[
                _figures(v, a, b, elapsed, by_range)
                for v, (a, b, by_range) in enumerate(zip(before, after, run_ranges, strict=True))
            ],
            processes=_processes(info),
        )
        for info, before, after, run_ranges in zip(infos, first, last, ranges, strict=True)
    ]


def finished_snapshot(log_dir: Path) -> RunSnapshot:
    """A finished run's final figures: `vmsuper logs --summary --json` of its folder (the
    exit-count records each worker wrote at shutdown, and the outcome)."""
    from vmsuper.supervisor import logview

    parser = argparse.ArgumentParser()
    logview.add_arguments(parser)
    out, err = io.StringIO(), io.StringIO()
    if logview.run(parser.parse_args([str(log_dir), "--summary", "--json"]), out=out, err=err):
        raise StatsError(err.getvalue().strip().removeprefix("vmsuper logs: error: "))
    summary = json.loads(out.getvalue())
    snap = RunSnapshot(log_dir=str(log_dir.resolve()), live=False, outcome=summary["run"])
    vcpus = {int(v): counts for v, counts in summary["vcpus"].items()}
    for vcpu in sorted({*vcpus, *summary["missing"]}):
        counts = vcpus.get(vcpu)
        snap.vcpus.append(
            VcpuFigures(
                vcpu=vcpu,
                state="stopped" if counts is not None else "unknown",
                waiting_s=None,
                exits=counts["exits"] if counts is not None else {},
                exits_per_second=None,
                ranges=counts["ranges"] if counts is not None else None,
                responses=0,
                response_s={f"{name}_s": None for name in ("p50", "p90", "p99", "max", "mean")},
                stop_reason="",
            )
        )
    return snap


def resolve(target: str) -> RunInfo | Path:
    """A RUN argument: a pid or a log folder -> its live RunInfo, or the folder if finished."""
    if target.isdigit():
        pid = int(target)
        for info in runinfo.find_runs():
            if info.pid == pid:
                return info
        raise StatsError(f"no live vmsuper run with pid {pid} in {runinfo.runtime_dir()}")
    folder = Path(target)
    if not folder.is_dir():
        raise StatsError(f"not a log folder or a pid: {target}")
    path = folder / runinfo.RUN_FILE
    if path.exists():
        try:
            info = runinfo.load(path)
        except RunInfoError as exc:
            raise StatsError(str(exc)) from None
        if info.is_alive():
            return info
    return folder


def snapshot(targets: Sequence[str], interval: float) -> list[RunSnapshot]:
    """Snapshots of the named runs, or of every live run on the host with none named."""
    resolved = [resolve(t) for t in targets] if targets else list(runinfo.find_runs())
    live = iter(live_snapshots([r for r in resolved if isinstance(r, RunInfo)], interval))
    return [next(live) if isinstance(r, RunInfo) else finished_snapshot(r) for r in resolved]


# -- output -----------------------------------------------------------------------------------


def to_json(snaps: Sequence[RunSnapshot]) -> str:
    return json.dumps({"format": FORMAT, "runs": [s.to_dict() for s in snaps]}, indent=1)


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.3f}"


def to_text(snaps: Sequence[RunSnapshot]) -> str:
    if not snaps:
        return f"no live vmsuper runs (runtime folder {runinfo.runtime_dir()})\n"
    lines: list[str] = []
    for snap in snaps:
        if snap.live:
            lines.append(f"run {snap.pid} on {snap.host}, started {snap.started_at}")
        else:
            outcome = snap.outcome
            what = f"status {outcome['status']} ({outcome['reason']})" if outcome else "no outcome"
            lines.append(f"finished run: {what}")
        lines.append(f"  logs: {snap.log_dir}")
        header = [
            "vcpu",
            "state",
            "waiting ms",
            "exits",
            "exits/s",
            "p50 ms",
            "p99 ms",
            "max ms",
            "poll us",
        ]
        rows = [header]
        for v in snap.vcpus:
            rate = "-" if v.exits_per_second is None else f"{v.exits_per_second:.0f}"
            rows.append(
                [
                    str(v.vcpu),
                    v.state,
                    _ms(v.waiting_s),
                    str(v.total),
                    rate,
                    _ms(v.response_s["p50_s"]),
                    _ms(v.response_s["p99_s"]),
                    _ms(v.response_s["max_s"]),
                    "-" if v.poll_window_s is None else f"{v.poll_window_s * 1e6:.0f}",
                ]
            )
        lines += _columns(rows)
        kinds = sorted({k for v in snap.vcpus for k, n in v.exits.items() if n})
        if kinds:
            lines.append("  exits by kind:")
            lines += _columns(
                [
                    ["vcpu", *kinds],
                    *([str(v.vcpu), *(str(v.exits.get(k, 0)) for k in kinds)] for v in snap.vcpus),
                ]
            )
        for v in snap.vcpus:
            if v.ranges:
                lines.append(f"  vcpu {v.vcpu} exits by reserved range:")
                lines += _columns([[name, str(n)] for name, n in sorted(v.ranges.items())])
        if snap.processes:
            lines.append("  processes:")
            rows = [["role", "pid", "cpu s", "uss MiB"]]
            for p in snap.processes:
                role = p.role if p.vcpu is None else f"{p.role} {p.vcpu}"
                cpu = "-" if p.cpu_s is None else f"{p.cpu_s:.2f}"
                uss = "-" if p.uss_bytes is None else f"{p.uss_bytes / 2**20:.1f}"
                rows.append([role, str(p.pid), cpu, uss])
            lines += _columns(rows)
        lines.append("")
    return "\n".join(lines)


def _columns(rows: list[list[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return [
        "    "
        + "  ".join(
            c.ljust(widths[i]) if i < 2 else c.rjust(widths[i]) for i, c in enumerate(row)
        ).rstrip()
        for row in rows
    ]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vmsuper stats",
        description="Print one snapshot of a run's VCPUs and processes: live from its shared "
        "memory, or a finished run's final figures from its logs.",
    )
    parser.add_argument(
        "runs",
        nargs="*",
        metavar="RUN",
        help="a log folder or a supervisor pid; none: every live run on this host",
    )
    form = parser.add_mutually_exclusive_group()
    form.add_argument("--json", action="store_true", help="JSON (see docs/stats.md)")
    form.add_argument(
        "--prometheus", action="store_true", help="the Prometheus text exposition format"
    )
    parser.add_argument(
        "--interval",
        type=float,
        default=DEFAULT_INTERVAL,
        metavar="S",
        help=f"seconds between the two readings that give exits/s (default {DEFAULT_INTERVAL})",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not 0 <= args.interval <= 60:
        print("vmsuper stats: error: --interval must be within 0..60 s", file=sys.stderr)
        return 2
    try:
        snaps = snapshot(args.runs, args.interval)
    except StatsError as exc:
        print(f"vmsuper stats: error: {exc}", file=sys.stderr)
        return 1
    if args.json:
        sys.stdout.write(to_json(snaps) + "\n")
    elif args.prometheus:
        from vmsuper.supervisor import stats_prometheus

        sys.stdout.write(stats_prometheus.exposition(snaps))
    else:
        sys.stdout.write(to_text(snaps))
    return 0
