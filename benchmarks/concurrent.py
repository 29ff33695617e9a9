"""Many VMs at once: K one-VCPU VMs started together, against K copies of the C reference.

Users run vmsuper as parallel test suites do: more busy VMs than cores. Each batch starts K
runs of the native plugin's exit loop at the same moment (threads, one `vmsuper run` each)
and waits for all of them; the C reference runs the same way in four modes: `pipe` (crosvm's
architecture: a VCPU thread and a plugin process over pipes), and `relay` and `forward`, the
floor in C of vmsuper's process layout (a VCPU thread, a worker process, the plugin process)
with four wake-ups per exit (every exit through the worker) and three (the VCPU thread writes
the exit to the plugin and the worker reads the reply, as vmsuper's runner and worker serve a
plain exit), and `forward_socket`, the same over a socket pair (vmsuper's socket transport).
Batches of every kind are interleaved, so drifts of the
machine's speed hit them alike. K is 1, 2, 4 and 8, with 4 N exits each; one long batch of 4
VMs with 20 N exits each (pipes) weighs each run's start-up less.

Per batch:
- wall: from starting the first run to the end of the last, start-up included;
- CPU: user + system time of everything the batch ran (the runs and every process below them,
  all reaped), from this process's RUSAGE_CHILDREN.

vmsuper runs along its default path and with `poll_us = 0`, because polling, which pays off
on an idle machine, is what could hurt when no core is free.

Every row but the `pipe` reference's gets its figures over `pipe`'s with as many VMs
(`*_vs_reference`); vmsuper's rows also over the `forward` of their transport's
(`*_vs_forward`: `forward_socket` for the socket rows): how far vmsuper is from the floor of
its own layout. All batches run in the same rounds, so each ratio is taken round by round
(`stats.paired_ratio`).
"""

from __future__ import annotations

import functools
import itertools
import resource
import threading
import time
from collections.abc import Callable
from typing import Any, Final

from .context import DEFAULT_PATH, PATHS, TRANSPORTS, Bench
from .served import SERVED, Served
from .stats import paired_ratio, rounds, summarize
from .vmrun import RunError, run_command, run_vm

VM_COUNTS: Final = (1, 2, 4, 8)
QUICK_VM_COUNTS: Final = (2,)
EXITS_FACTOR: Final = 4  # 20,000 exits per VM with the default 5,000
# One longer batch, where each run's start-up weighs less: 4 VMs of 100,000 exits each (the
# default 5,000 times 20), pipes only.
LONG_VMS: Final = 4
LONG_EXITS_FACTOR: Final = 20
CONCURRENT_PATHS: Final = (DEFAULT_PATH, "c")
# The C reference's modes, each a row (its `path`); `pipe` is the one every row is compared with.
REFERENCE_MODES: Final = ("pipe", "relay", "forward", "forward_socket")
# The `forward` reference of each transport: the floor of vmsuper's layout over it.
FORWARD_MODE: Final = {"pipes": "forward", "socket": "forward_socket"}


def children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def batch(
    jobs: list[Callable[[], object]], also_cpu: Callable[[], float] | None = None
) -> tuple[float, float]:
    """Run `jobs` at once, one thread each; (wall seconds, CPU seconds of what they ran, with
    `also_cpu`'s growth: the CPU time of processes that are not this one's children).

    Raises the first job's error after every job has ended.
    """
    errors: list[BaseException] = []
    start = threading.Barrier(len(jobs) + 1)

    def body(job: Callable[[], object]) -> None:
        start.wait()
        try:
            job()
        except BaseException as exc:  # reported below, once all have ended
            errors.append(exc)

    threads = [threading.Thread(target=body, args=(job,)) for job in jobs]
    for thread in threads:
        thread.start()
    others = also_cpu or (lambda: 0.0)
    cpu_before = children_cpu_s() + others()
    t0 = time.monotonic()
    start.wait()
    for thread in threads:
        thread.join()
    wall = time.monotonic() - t0
    cpu = children_cpu_s() + others() - cpu_before
    if errors:
        raise errors[0]
    return wall, cpu


def keys(bench: Bench) -> list[dict[str, Any]]:
    """Every batch's kind: what runs, how many VMs, and `length` (short: 4 N exits each, long:
    20 N)."""
    counts = QUICK_VM_COUNTS if bench.quick else VM_COUNTS
    found: list[dict[str, Any]] = []
    for vms in counts:
        short = {"vms": vms, "length": "short"}
        for transport, path in itertools.product(TRANSPORTS, CONCURRENT_PATHS):
            found.append({"what": "vmsuper", **short, "transport": transport, "path": path})
        found.append({"what": SERVED, **short, "transport": "pipes", "path": DEFAULT_PATH})
        for mode in REFERENCE_MODES:
            transport = "socket" if mode == FORWARD_MODE["socket"] else "pipes"
            found.append({"what": "reference", **short, "transport": transport, "path": mode})
    long = {"vms": LONG_VMS, "length": "long", "transport": "pipes"}
    for path in CONCURRENT_PATHS:
        found.append({"what": "vmsuper", **long, "path": path})
    found.append({"what": SERVED, **long, "path": DEFAULT_PATH})
    for mode in ("pipe", "forward"):
        found.append({"what": "reference", **long, "path": mode})
    return found


def exits_each(bench: Bench, key: dict[str, Any]) -> int:
    return bench.exits * (LONG_EXITS_FACTOR if key["length"] == "long" else EXITS_FACTOR)


def concurrent(bench: Bench) -> list[dict[str, Any]]:
    all_keys = keys(bench)
    samples: dict[int, list[tuple[float, float]]] = {i: [] for i in range(len(all_keys))}
    with Served() as served:
        for order in rounds(bench.repeat, len(all_keys)):
            for i in order:
                key = all_keys[i]
                exits = exits_each(bench, key)
                if key["what"] == SERVED:
                    jobs = _jobs(bench, key, exits, served.env)
                    samples[i].append(batch(jobs, served.children_cpu_s))
                else:
                    samples[i].append(batch(_jobs(bench, key, exits)))
    rows = []
    for i, key in enumerate(all_keys):
        exits = exits_each(bench, key)
        walls, cpus = zip(*samples[i], strict=True)
        rows.append(
            {
                **key,
                "exits_each": exits,
                "wall_s": summarize(list(walls)),
                "cpu_s": summarize(list(cpus)),
                "cpu_us_per_exit": summarize([c / (exits * key["vms"]) * 1e6 for c in cpus]),
            }
        )
    add_ratios(rows)
    return rows


def _jobs(
    bench: Bench, key: dict[str, Any], exits: int, env: dict[str, str] | None = None
) -> list[Callable[[], object]]:
    if key["what"] == "reference":
        argv = bench.reference(key["path"], 1, exits)
        return [lambda: _check_reference(run_command(argv), exits) for _ in range(key["vms"])]
    spec = bench.spec(
        "native", "loop", exits, transport=key["transport"], env=env or {}, **PATHS[key["path"]]
    )
    served = "-served" if key["what"] == SERVED else ""
    name = f"concurrent-{key['vms']}x{exits}-{key['transport']}-{key['path']}{served}"
    folders = [bench.folder(f"{name}-{n}") for n in range(key["vms"])]
    return [functools.partial(run_vm, spec, folder) for folder in folders]


def _check_reference(report: dict[str, Any], exits: int) -> None:
    seen = [v["exits"] for v in report["vcpus"]]
    if seen != [exits]:
        raise RunError(f"the reference saw {seen} loop exits, expected [{exits}]")


def references_by_batch(rows: list[dict[str, Any]]) -> dict[tuple[int, int, str], Any]:
    """The reference rows by (VMs, exits each, mode): the batch a row is compared with."""
    return {(r["vms"], r["exits_each"], r["path"]): r for r in rows if r["what"] == "reference"}


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """Wall and CPU time over the reference's with as many VMs and exits, round by round: every
    other row's over `pipe`'s (`*_vs_reference`), vmsuper's also over the `forward` of its
    transport (`*_vs_forward`)."""
    references = references_by_batch(rows)
    for row in rows:
        compared = [("pipe", "reference")]
        if row["what"] in ("vmsuper", SERVED):
            compared.append((FORWARD_MODE[row["transport"]], "forward"))
        for mode, name in compared:
            ref = references.get((row["vms"], row["exits_each"], mode))
            if ref is None or ref is row:
                continue
            row[f"wall_vs_{name}"] = paired_ratio(row["wall_s"], ref["wall_s"])
            row[f"cpu_vs_{name}"] = paired_ratio(row["cpu_s"], ref["cpu_s"])
