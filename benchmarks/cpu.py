"""Where an exit's time goes: CPU time per exit of each process and thread on the path.

The native plugin runs in `profile` mode on one VCPU: it pauses at the guest's START exit and
again after its report, and at each pause the harness reads every thread's time on the CPU
(`/proc/PID/task/TID/schedstat`, nanoseconds). The difference, divided by the exits in
between, splits one round trip between the supervisor's main thread, its runner thread (which
also carries the KVM_RUN ioctl and so the guest and the kernel's exit handling), the VCPU
worker and the plugin. Wall time minus the sum is time nobody was running: wake-ups; a sum
above the wall time means two of them ran at once (polling for each other).

It runs along vmsuper's default exit path and along the one that never polls (`context.PATHS`),
so the figures show what polling costs and saves. The C reference's `pipe` (crosvm's
architecture) and `socket` modes run in the same rounds, after the rows of their latency
setting, with as many exits: the goals compare each row's CPU per exit with theirs round by
round (`crosvm_cpu_us`, and `transport_cpu_us` for the reference of the row's transport;
`report.add_cpu_ratios`).
"""

from __future__ import annotations

import itertools
from typing import Any, Final

from .context import DEFAULT_PATH, PATHS, TRANSPORTS, Bench
from .exits import CROSVM_MODE, rates, run_reference
from .memory import split_children, task_seconds
from .stats import rounds, summarize
from .vmrun import RunError, RunResult, run_vm

PROFILE_FACTOR: Final = 2  # more exits than the other runs: thread times are coarse at the ends
PARTS: Final = ("supervisor_main", "supervisor_runner", "vcpu_worker", "plugin")
CPU_PATHS: Final = (DEFAULT_PATH, "c")
# The reference of each transport, the same architecture as crosvm's over it.
TRANSPORT_MODE: Final = {"pipes": CROSVM_MODE, "socket": "socket"}


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
    references = list(itertools.product(bench.low_latency, TRANSPORT_MODE.values()))
    # Each latency setting's rows, then its references (a stable sort).
    ordered: list[tuple[Any, ...]] = sorted(keys + references, key=lambda key: key[0])
    samples: dict[tuple[Any, ...], list[dict[str, float]]] = {k: [] for k in ordered}
    for order in rounds(bench.repeat, len(ordered)):
        for key in (ordered[i] for i in order):
            if len(key) == 2:  # (latency, reference mode); a row's is (latency, transport, path)
                samples[key].append(_reference_cpu(bench, key, exits))
            else:
                samples[key].append(_profile(bench, key, exits))
    rows = []
    for ll, transport, path in keys:
        got = samples[(ll, transport, path)]
        row: dict[str, Any] = {"plugin": "native", "transport": transport, "vcpus": 1}
        row["low_latency"] = ll
        row["path"] = path
        for part in (*PARTS, "total", "wall"):
            row[f"{part}_us"] = summarize([s[part] for s in got])
        row["crosvm_cpu_us"] = summarize([s["total"] for s in samples[(ll, CROSVM_MODE)]])
        mode = TRANSPORT_MODE[transport]
        row["transport_cpu_us"] = summarize([s["total"] for s in samples[(ll, mode)]])
        rows.append(row)
    return rows


def _reference_cpu(bench: Bench, key: tuple[Any, ...], exits: int) -> dict[str, float]:
    ll, mode = key
    report, cpu_per_exit = run_reference(
        bench, {"mode": mode, "vcpus": 1, "low_latency": ll}, exits
    )
    rates(report)  # raises unless every exit was seen
    return {"total": cpu_per_exit}


def _profile(bench: Bench, key: tuple[Any, ...], exits: int) -> dict[str, float]:
    """One profile run of the native plugin: its CPU per exit by part, and its wall time."""
    ll, transport, path = key
    snapshots: list[dict[str, float]] = []

    def measure(run: RunResult, line: dict[str, Any]) -> None:
        snapshots.append(snapshot(run))

    spec = bench.spec(
        "native", "profile", exits, transport=transport, low_latency=ll, holds=2, **PATHS[path]
    )
    run = run_vm(spec, bench.folder(f"cpu-{transport}-{path}"), while_held=measure)
    if len(snapshots) != 2:
        raise RunError(f"the profile run paused {len(snapshots)} times, not twice")
    vcpu = run.report["vcpus"][0]
    if vcpu["exits"] != exits:
        raise RunError(f"the profile run saw {vcpu['exits']} exits, expected {exits}")
    before, after = snapshots
    per_exit = {p: (after[p] - before[p]) / (exits + 1) * 1e6 for p in PARTS}
    per_exit["total"] = sum(per_exit.values())
    per_exit["wall"] = (vcpu["t_done"] - vcpu["t_first"]) / (exits + 1) * 1e6
    return per_exit
