"""Where an exit's time goes: CPU time per exit of each process and thread on the path.

The native plugin runs in `profile` mode on one VCPU: it pauses at the guest's START exit and
again after its report, and at each pause the harness reads every thread's time on the CPU
(`/proc/PID/task/TID/schedstat`, nanoseconds). The difference, divided by the exits in
between, splits one round trip between the supervisor's main thread, its runner thread (which
also carries the KVM_RUN ioctl and so the guest and the kernel's exit handling), the VCPU
worker and the plugin. Wall time minus the sum is time nobody was running: wake-ups; a sum
above the wall time means two of them ran at once (polling for each other).

It runs along vmsuper's default exit path and along the one that never polls (`context.PATHS`),
so the figures show what polling costs and saves.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any, Final

from .context import DEFAULT_PATH, PATHS, TRANSPORTS, Bench
from .memory import split_children
from .stats import summarize
from .vmrun import RunError, RunResult, run_vm

PROFILE_FACTOR: Final = 2  # more exits than the other runs: thread times are coarse at the ends
PARTS: Final = ("supervisor_main", "supervisor_runner", "vcpu_worker", "plugin")
CPU_PATHS: Final = (DEFAULT_PATH, "c")


def task_seconds(pid: int) -> dict[int, float]:
    """Time on the CPU of each live thread of `pid`."""
    times: dict[int, float] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            times[int(task.name)] = int((task / "schedstat").read_text().split()[0]) / 1e9
        except (OSError, ValueError, IndexError):
            continue
    if not times:
        raise RunError(f"no thread times for pid {pid} (is /proc/PID/task/*/schedstat there?)")
    return times


def snapshot(run: RunResult) -> dict[str, float]:
    supervisor = task_seconds(run.supervisor_pid)
    main = supervisor.pop(run.supervisor_pid)
    (worker,), plugin = split_children(run, 1)
    return {
        "supervisor_main": main,
        "supervisor_runner": sum(supervisor.values()),
        "vcpu_worker": sum(task_seconds(worker.pid).values()),
        "plugin": sum(sum(task_seconds(p.pid).values()) for p in plugin),
    }


def cpu(bench: Bench) -> list[dict[str, Any]]:
    exits = bench.exits * PROFILE_FACTOR
    keys = list(itertools.product(bench.low_latency, TRANSPORTS, CPU_PATHS))
    samples: dict[tuple[bool, str, str], list[dict[str, float]]] = {k: [] for k in keys}
    for _ in range(bench.repeat):
        for ll, transport, path in keys:
            snapshots: list[dict[str, float]] = []

            def measure(run: RunResult, line: dict[str, Any], into: Any = snapshots) -> None:
                into.append(snapshot(run))

            spec = bench.spec(
                "native",
                "profile",
                exits,
                transport=transport,
                low_latency=ll,
                holds=2,
                **PATHS[path],
            )
            folder = bench.folder(f"cpu-{transport}-{path}")
            run = run_vm(spec, folder, while_held=measure)
            if len(snapshots) != 2:
                raise RunError(f"the profile run paused {len(snapshots)} times, not twice")
            vcpu = run.report["vcpus"][0]
            if vcpu["exits"] != exits:
                raise RunError(f"the profile run saw {vcpu['exits']} exits, expected {exits}")
            before, after = snapshots
            per_exit = {p: (after[p] - before[p]) / (exits + 1) * 1e6 for p in PARTS}
            per_exit["total"] = sum(per_exit.values())
            per_exit["wall"] = (vcpu["t_done"] - vcpu["t_first"]) / (exits + 1) * 1e6
            samples[(ll, transport, path)].append(per_exit)
    rows = []
    for ll, transport, path in keys:
        got = samples[(ll, transport, path)]
        row: dict[str, Any] = {"plugin": "native", "transport": transport, "vcpus": 1}
        row["low_latency"] = ll
        row["path"] = path
        for part in (*PARTS, "total", "wall"):
            row[f"{part}_us"] = summarize([s[part] for s in got])
        rows.append(row)
    return rows
