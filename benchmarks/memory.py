"""(e) Memory: USS and PSS of the supervisor and of each VCPU worker while the VM runs, their
growth from 1 to many VCPUs, and the time to start that many; and what the held VM costs
while it waits: CPU time and wake-ups per second.

The native plugin runs in `hold` mode: every VCPU stops at its first exit, the plugin reports,
and the harness measures the processes before letting the plugin (and so the VM) end. USS is
what a process would give back if it died; PSS also charges it its share of shared pages (the
workers are forked from the supervisor, so most of their pages are shared with it): the sum of
the PSS figures is what the whole VM host costs.

A VM whose VCPUs wait (on the plugin, a device, a test's next step) should cost nothing, and
many such VMs at once nothing either: the harness lets the held VM settle for `SETTLE_S`, then
reads, over `IDLE_WINDOW_S`, the CPU time of every thread of the supervisor and its workers
(`/proc/.../schedstat`, in ns) and their context switches (each a wake-up from a sleep, or a
preemption).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Final

import psutil

from .context import Bench
from .stats import summarize
from .vmrun import RunError, RunResult, run_vm

MIB: Final = 1024 * 1024
VCPU_COUNTS: Final = (1, 16)
SETTLE_S: Final = 0.5
IDLE_WINDOW_S: Final = 1.0


def split_children(run: RunResult, vcpus: int) -> tuple[list[psutil.Process], list[psutil.Process]]:
    """(VCPU workers, the plugin's processes) among the supervisor's descendants.

    Workers are forked without exec, so their command line is the supervisor's; the rest is
    the plugin, behind its sandbox (bwrap, in its own pid namespace: the pid the plugin
    reports is not a host pid).
    """
    supervisor = psutil.Process(run.supervisor_pid)
    command = supervisor.cmdline()
    workers: list[psutil.Process] = []
    plugin: list[psutil.Process] = []
    for child in supervisor.children():
        if child.cmdline() == command:
            workers.append(child)
        else:
            plugin += [child, *child.children(recursive=True)]
    if len(workers) != vcpus:
        raise RunError(f"expected {vcpus} VCPU workers, found {len(workers)}")
    return workers, plugin


def sample(run: RunResult, workers: list[psutil.Process]) -> dict[str, Any]:
    """USS/PSS of the supervisor and its VCPU workers."""
    sup = psutil.Process(run.supervisor_pid).memory_full_info()
    infos = [w.memory_full_info() for w in workers]
    return {
        "supervisor_uss": sup.uss / MIB,
        "supervisor_pss": sup.pss / MIB,
        "worker_uss": [i.uss / MIB for i in infos],
        "worker_pss": [i.pss / MIB for i in infos],
    }


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


def _context_switches(pid: int) -> int:
    """Voluntary and involuntary context switches so far, over every live thread of `pid`."""
    switches = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            status = (task / "status").read_text()
        except OSError:
            continue  # a thread that ended meanwhile
        switches += sum(
            int(line.split()[1]) for line in status.splitlines() if "ctxt_switches:" in line
        )
    return switches


def thread_counters(pids: list[int]) -> tuple[float, int]:
    """(CPU seconds, context switches) so far, summed over every thread of `pids`."""
    cpu_s, switches = 0.0, 0
    for pid in pids:
        try:
            cpu_s += sum(task_seconds(pid).values())
            switches += _context_switches(pid)
        except FileNotFoundError:
            raise RunError(f"process {pid} of the held VM ended while it was measured") from None
    return cpu_s, switches


def idle_cost(
    run: RunResult, workers: list[psutil.Process], *, quick: bool = False
) -> dict[str, float]:
    """CPU ms and context switches per second of the held VM's supervisor and workers (see the
    module doc); `quick` waits a fifth as long."""
    pids = [run.supervisor_pid, *(w.pid for w in workers)]
    scale = 0.2 if quick else 1.0
    time.sleep(SETTLE_S * scale)
    cpu_before, switches_before = thread_counters(pids)
    start = time.monotonic()
    time.sleep(IDLE_WINDOW_S * scale)
    cpu_after, switches_after = thread_counters(pids)
    seconds = time.monotonic() - start
    return {
        "held_cpu_ms_per_s": (cpu_after - cpu_before) * 1e3 / seconds,
        "held_switches_per_s": (switches_after - switches_before) / seconds,
    }


def memory(bench: Bench) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for ll in bench.low_latency:
        by_count: dict[int, dict[str, Any]] = {}
        for vcpus in VCPU_COUNTS:
            samples: list[dict[str, Any]] = []
            start_ms: list[float] = []
            running_ms: list[float] = []
            for _ in range(bench.repeat):
                got: dict[str, Any] = {}

                def measure(
                    run: RunResult,
                    line: dict[str, Any],
                    got: dict[str, Any] = got,
                    vcpus: int = vcpus,
                ) -> None:
                    workers, _ = split_children(run, vcpus)
                    got.update(sample(run, workers))
                    got.update(idle_cost(run, workers, quick=bench.quick))

                spec = bench.spec("native", "hold", vcpus=vcpus, low_latency=ll, holds=1)
                run = run_vm(spec, bench.folder(f"memory-{vcpus}"), while_held=measure)
                samples.append(got)
                last_first = max(v["t_first"] for v in run.report["vcpus"])
                start_ms.append((last_first - run.report["t_start_sent"]) * 1e3)
                running_ms.append((last_first - run.t_exec) * 1e3)
            worker_uss = [u for s in samples for u in s["worker_uss"]]
            worker_pss = [u for s in samples for u in s["worker_pss"]]
            total_uss = [s["supervisor_uss"] + sum(s["worker_uss"]) for s in samples]
            total_pss = [s["supervisor_pss"] + sum(s["worker_pss"]) for s in samples]
            row = {
                "vcpus": vcpus,
                "low_latency": ll,
                "supervisor_uss_mib": summarize([s["supervisor_uss"] for s in samples]),
                "supervisor_pss_mib": summarize([s["supervisor_pss"] for s in samples]),
                "worker_uss_mib": summarize(worker_uss),
                "worker_pss_mib": summarize(worker_pss),
                "total_uss_mib": summarize(total_uss),
                "total_pss_mib": summarize(total_pss),
                "held_cpu_ms_per_s": summarize([s["held_cpu_ms_per_s"] for s in samples]),
                "held_switches_per_s": summarize([s["held_switches_per_s"] for s in samples]),
                "start_ms": summarize(start_ms),
                "exec_to_running_ms": summarize(running_ms),
            }
            by_count[vcpus] = row
            rows.append(row)
        low, high = by_count[VCPU_COUNTS[0]], by_count[VCPU_COUNTS[-1]]
        added = VCPU_COUNTS[-1] - VCPU_COUNTS[0]

        def grew(key: str, low: dict[str, Any] = low, high: dict[str, Any] = high) -> float:
            return float(high[key]["median"] - low[key]["median"])

        rows.append(
            {
                "growth": f"{VCPU_COUNTS[0]}->{VCPU_COUNTS[-1]} VCPUs",
                "low_latency": ll,
                "total_uss_growth_mib": grew("total_uss_mib"),
                "total_pss_growth_mib": grew("total_pss_mib"),
                "per_added_vcpu_uss_mib": grew("total_uss_mib") / added,
                "per_added_vcpu_pss_mib": grew("total_pss_mib") / added,
                "supervisor_uss_growth_mib": grew("supervisor_uss_mib"),
            }
        )
    return rows
