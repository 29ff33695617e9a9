"""Where a VM's threads run: exits with the runner threads and workers placed on CPUs by hand,
against the scheduler's own placement.

A VCPU has three actors: the supervisor's runner thread (`vcpuN-runner`), its worker process
(`vcpuN-worker`) and the plugin. Pinning them (`sched_setaffinity`) could turn a cross-CPU
wake-up into a switch on one CPU, or keep two pollers off each other's CPU; it could also
leave VMs that do not know of each other crowded on the same CPUs. This section measures each
case instead of guessing. The native plugin runs in `profile` mode: every VCPU stops at its
START exit, the harness pins the named threads and processes, and the loop's exits are timed
from there (the plugin itself is left to the scheduler). Placements:

- `free`: nothing pinned (vmsuper's own behaviour);
- `apart`: each VCPU's runner and worker on two CPUs of their own, the runner on the first;
- `paired`: each VCPU's runner and worker on one CPU, VCPU i on CPU i;
- `per-vm`: with several VMs, VM k's runner and worker on CPU k (a placement that needs the
  VMs to know of each other); `apart` with several VMs is what VMs placed each on their own
  would do: the same CPUs for all.

Per run: µs per exit, each VCPU's loop over its exits, averaged over the VCPUs and VMs. `x
free` is a row's median over its scenario's `free` median. The CPUs are the first ones this
process may use; a machine with a single CPU has nothing to place, and the section is empty.
"""

from __future__ import annotations

import functools
import os
import threading
from pathlib import Path
from typing import Any, Final

import psutil

from vmsuper.shared import task_names

from .concurrent import batch
from .context import Bench
from .stats import paired_ratio, rounds, summarize
from .vmrun import RunError, RunResult, run_vm

EXITS_FACTOR: Final = 4  # 20,000 exits per VCPU with the default 5,000
TRANSPORT: Final = "pipes"  # crosvm's, and the one of the goals
MEET_TIMEOUT_S: Final = 60.0

SCENARIOS: Final[tuple[tuple[int, int, tuple[str, ...]], ...]] = (
    # (VMs, VCPUs each, placements)
    (1, 1, ("free", "apart", "paired")),
    (1, 2, ("free", "paired")),
    (2, 1, ("free", "apart", "per-vm")),
    (4, 1, ("free", "per-vm")),
)
QUICK_MAX_VMS: Final = 2


def plan(placement: str, vm: int, vcpus: int, cpus: list[int]) -> dict[int, tuple[int, int]]:
    """VCPU -> (its runner's CPU, its worker's CPU) for VM number `vm`; {} for `free`."""
    n = len(cpus)
    if placement == "free":
        return {}
    if placement == "apart":
        return {i: (cpus[2 * i % n], cpus[(2 * i + 1) % n]) for i in range(vcpus)}
    if placement == "paired":
        return {i: (cpus[i % n], cpus[i % n]) for i in range(vcpus)}
    if placement == "per-vm":
        return {i: (cpus[(vm + i) % n], cpus[(vm + i) % n]) for i in range(vcpus)}
    raise ValueError(f"unknown placement {placement!r}")


def placed(where: dict[int, tuple[int, int]]) -> list[list[int]]:
    """A plan as JSON: per VCPU, [its runner's CPU, its worker's CPU] ([] for `free`)."""
    return [list(where[vcpu]) for vcpu in sorted(where)]


def find_tasks(supervisor_pid: int, vcpus: int) -> dict[int, tuple[int, int]]:
    """VCPU -> (its runner thread's id, its worker's pid), by their names."""
    runners: dict[str, int] = {}
    for task in Path(f"/proc/{supervisor_pid}/task").iterdir():
        try:
            runners[(task / "comm").read_text().rstrip("\n")] = int(task.name)
        except (OSError, ValueError):
            continue
    workers = {p.name(): p.pid for p in psutil.Process(supervisor_pid).children()}
    found = {}
    for i in range(vcpus):
        runner = runners.get(task_names.runner_name(i))
        worker = workers.get(task_names.worker_name(i))
        if runner is None or worker is None:
            raise RunError(f"VCPU {i}: no {task_names.runner_name(i)} thread or worker found")
        found[i] = (runner, worker)
    return found


def pin(run: RunResult, where: dict[int, tuple[int, int]]) -> None:
    """Pin each VCPU's runner and worker, and check that the kernel holds them there."""
    tasks = find_tasks(run.supervisor_pid, len(where))
    for vcpu, cpus in where.items():
        for task, cpu in zip(tasks[vcpu], cpus, strict=True):
            os.sched_setaffinity(task, {cpu})
            if os.sched_getaffinity(task) != {cpu}:
                raise RunError(f"VCPU {vcpu}: task {task} is not held to CPU {cpu}")


def per_exit_us(run: RunResult) -> list[float]:
    """Each VCPU's µs per loop exit, from the end of the START pause to DONE."""
    vcpus = run.report["vcpus"]
    return [(v["t_done"] - v["t_first"]) / v["exits"] * 1e6 for v in vcpus]


def _measure(
    bench: Bench, vms: int, vcpus: int, placement: str, cpus: list[int], exits: int
) -> float:
    meet = threading.Barrier(vms)
    spec = bench.spec("native", "profile", exits, transport=TRANSPORT, vcpus=vcpus, holds=2)
    figures: list[float] = []

    def at_pause(vm: int, run: RunResult, line: dict[str, Any]) -> None:
        if line.get("phase") != "start":
            return
        pin(run, plan(placement, vm, vcpus, cpus))
        try:  # every VM's loop starts at once, as when they share the machine for real
            meet.wait(MEET_TIMEOUT_S)
        except threading.BrokenBarrierError:
            raise RunError("another VM of the batch did not reach its START pause") from None

    def job(vm: int) -> None:
        folder = bench.folder(f"placement-{vms}x{vcpus}-{placement}-{vm}")
        try:
            run = run_vm(spec, folder, while_held=functools.partial(at_pause, vm))
        except BaseException:
            meet.abort()
            raise
        seen = [v["exits"] for v in run.report["vcpus"]]
        if seen != [exits] * vcpus:
            raise RunError(f"the run saw {seen} loop exits, expected {[exits] * vcpus}")
        figures.extend(per_exit_us(run))

    batch([functools.partial(job, vm) for vm in range(vms)])
    return sum(figures) / len(figures)


def placement(bench: Bench) -> list[dict[str, Any]]:
    cpus = sorted(os.sched_getaffinity(0))[:2]
    if len(cpus) < 2:
        return []
    exits = bench.exits * EXITS_FACTOR
    keys = [
        (vms, vcpus, p)
        for vms, vcpus, places in SCENARIOS
        if not (bench.quick and vms > QUICK_MAX_VMS)
        for p in places
    ]
    samples: dict[tuple[int, int, str], list[float]] = {k: [] for k in keys}
    for order in rounds(bench.repeat, len(keys)):
        for key in (keys[i] for i in order):
            samples[key].append(_measure(bench, *key, cpus, exits))
    rows = [
        {
            "vms": vms,
            "vcpus": vcpus,
            "placement": p,
            "cpus": [placed(plan(p, vm, vcpus, cpus)) for vm in range(vms)],
            "transport": TRANSPORT,
            "exits_each": exits,
            "us_per_exit": summarize(samples[(vms, vcpus, p)]),
        }
        for vms, vcpus, p in keys
    ]
    add_ratios(rows)
    return rows


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """Each row over the `free` row of its scenario, round by round (`vs_free`)."""
    free = {(r["vms"], r["vcpus"]): r for r in rows if r["placement"] == "free"}
    for row in rows:
        base = free.get((row["vms"], row["vcpus"]))
        if base is not None and base is not row:
            row["vs_free"] = paired_ratio(row["us_per_exit"], base["us_per_exit"])
