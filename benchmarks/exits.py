"""Exit figures: round trips through vmsuper (a), the C reference (b), async writes and
ioeventfd writes (c).

Round trips of the native plugin are also measured along the other exit path (`context.PATHS`:
no polling), on one VCPU and on two, interleaved with the default ones: the default path must
never be slower than `poll_us = 0` (`report.targets`). Crosvm's architecture (the reference's
`pipe` mode), which the goals compare every row with, runs in (a)'s rounds as well, beside the
rows of its VCPU count and latency setting, so that each round gives a ratio of two runs
seconds apart (`crosvm_us_per_exit`; `report.add_ratios`).

Every figure comes from the clocks of the program that sees the exits: the plugin for vmsuper
runs, the VCPU threads for the reference. A run covers the guest's START exit to its DONE
exit: `exits` loop writes plus the DONE write, hence the `exits + 1` below.
"""

from __future__ import annotations

import itertools
import statistics
from collections.abc import Callable, Iterable
from typing import Any, Final

from .concurrent import children_cpu_s
from .context import DEFAULT_PATH, PATHS, PLUGINS, TRANSPORTS, Bench
from .machine import held_low_latency
from .stats import rounds, summarize
from .vmrun import RunError, run_command, run_vm

VCPU_COUNTS = (1, 2)
REFERENCE_MODES = ("inline", "pipe", "socket", "relay", "forward", "forward_socket")
CROSVM_MODE: Final = "pipe"  # crosvm's architecture: the reference the goals compare with
ASYNC_FACTOR = 2  # async and ioeventfd writes are cheaper: run more of them per measurement
# The plugin whose rows of (a) are measured along every exit path (see PATHS), not only the
# default one.
VARIANT_PLUGIN = "native"


def rates(report: dict[str, Any], *, counted: str = "exits") -> tuple[float, float]:
    """(microseconds per exit and VCPU, exits per second over all VCPUs) of one run.

    `counted` is "exits" when the plugin saw every loop write, "ioevents" when the kernel
    counted them in an eventfd. Raises RunError if the count is not what the guest did.
    """
    expected = int(report["expected_exits"])
    vcpus = report["vcpus"]
    for index, vcpu in enumerate(vcpus):
        if vcpu["other_exits"] or not vcpu["t_first"] or not vcpu["t_done"]:
            raise RunError(f"VCPU {index} did not run the loop cleanly: {vcpu}")
        if counted == "exits" and vcpu["exits"] != expected:
            raise RunError(f"VCPU {index} saw {vcpu['exits']} loop exits, expected {expected}")
    total = expected * len(vcpus)
    if counted == "ioevents" and report["ioevents"] != total:
        raise RunError(f"the eventfd counted {report['ioevents']} writes, expected {total}")
    per_exit = statistics.mean((v["t_done"] - v["t_first"]) / (expected + 1) for v in vcpus)
    span = max(v["t_done"] for v in vcpus) - min(v["t_first"] for v in vcpus)
    return per_exit * 1e6, total / span


def _row(key: dict[str, Any], samples: Iterable[tuple[float, float]], unit: str) -> dict[str, Any]:
    per, rate = zip(*samples, strict=True)
    return {**key, f"us_per_{unit}": summarize(per), f"{unit}s_per_s": summarize(rate)}


def _collect(
    bench: Bench,
    keys: list[dict[str, Any]],
    measure: Callable[[dict[str, Any]], tuple[float, float]],
    unit: str = "exit",
) -> list[dict[str, Any]]:
    """Measure every key `repeat` times, interleaved so slow drifts hit every key alike, in
    the reverse order every other round (`rounds`)."""
    samples: dict[int, list[tuple[float, float]]] = {i: [] for i in range(len(keys))}
    for order in rounds(bench.repeat, len(keys)):
        for i in order:
            samples[i].append(measure(keys[i]))
    return [_row(key, samples[i], unit) for i, key in enumerate(keys)]


def exit_keys(low_latency: Iterable[bool]) -> list[dict[str, Any]]:
    """Every setting of (a): both plugins, transports and VCPU counts on vmsuper's default
    path, and the native plugin along every other path too (right after its default row), so
    that both come from the same interleaved runs."""
    keys = []
    for ll, p, t, v in itertools.product(low_latency, PLUGINS, TRANSPORTS, VCPU_COUNTS):
        paths = PATHS if p == VARIANT_PLUGIN else (DEFAULT_PATH,)
        keys += [
            {"plugin": p, "transport": t, "vcpus": v, "low_latency": ll, "path": path}
            for path in paths
        ]
    return keys


def _setting(key: dict[str, Any]) -> tuple[bool, int]:
    return key["low_latency"], key["vcpus"]


def exits(bench: Bench) -> list[dict[str, Any]]:
    """(a) Round trips: each loop write stops the VCPU until the plugin resumes it.

    Each round also runs crosvm's architecture once per setting (latency, VCPUs), right after
    that setting's rows, and every row keeps that reference's figures as `crosvm_us_per_exit`.
    """
    keys = exit_keys(bench.low_latency)
    crosvm_keys = [
        {"mode": CROSVM_MODE, "vcpus": v, "low_latency": ll}
        for ll, v in itertools.product(bench.low_latency, VCPU_COUNTS)
    ]

    def measure(key: dict[str, Any]) -> tuple[float, float]:
        if "mode" in key:
            return rates(run_reference(bench, key)[0])
        spec = bench.spec(
            key["plugin"],
            "loop",
            bench.exits,
            vcpus=key["vcpus"],
            transport=key["transport"],
            low_latency=key["low_latency"],
            **PATHS[key["path"]],
        )
        name = f"exits-{key['plugin']}-{key['transport']}-{key['vcpus']}-{key['path']}"
        return rates(run_vm(spec, bench.folder(name)).report)

    # Each setting's rows, then its reference (a stable sort); the rows return in keys' order.
    ordered = sorted(keys + crosvm_keys, key=_setting)
    measured = dict(zip(map(id, ordered), _collect(bench, ordered, measure), strict=True))
    crosvm = {_setting(key): measured[id(key)]["us_per_exit"] for key in crosvm_keys}
    rows = [measured[id(key)] for key in keys]
    for row in rows:
        row["crosvm_us_per_exit"] = crosvm[_setting(row)]
    return rows


def run_reference(
    bench: Bench, key: dict[str, Any], exits: int | None = None
) -> tuple[dict[str, Any], float]:
    """One run of the C reference in `key`'s mode (`exits` loop writes, or N): its report,
    and its CPU time per exit (every thread and process of the run, from RUSAGE_CHILDREN)."""
    count = bench.exits if exits is None else exits
    with held_low_latency(key["low_latency"]):
        before = children_cpu_s()
        report = run_command(bench.reference(key["mode"], key["vcpus"], count))
        spent = children_cpu_s() - before
    return report, spent / ((count + 1) * key["vcpus"]) * 1e6


def reference(bench: Bench) -> list[dict[str, Any]]:
    """(b) The C reference: exits handled in the VCPU thread, or by a plugin process.

    Its CPU time per exit (every thread and process of a run, from RUSAGE_CHILDREN) is the
    bill vmsuper's `cpu` section is compared with.
    """
    keys = [
        {"mode": m, "vcpus": v, "low_latency": ll}
        for ll, m, v in itertools.product(bench.low_latency, REFERENCE_MODES, VCPU_COUNTS)
    ]
    cpu: list[list[float]] = [[] for _ in keys]

    def measure(key: dict[str, Any]) -> tuple[float, float]:
        report, cpu_per_exit = run_reference(bench, key)
        cpu[keys.index(key)].append(cpu_per_exit)
        return rates(report)

    rows = _collect(bench, keys, measure)
    for row, samples in zip(rows, cpu, strict=True):
        row["cpu_us_per_exit"] = summarize(samples)
    return rows


def async_writes(bench: Bench) -> list[dict[str, Any]]:
    """(c) Writes to an async_write range: the VCPU goes on, the plugin only drains."""
    count = bench.exits * ASYNC_FACTOR
    keys = [
        {"plugin": p, "transport": t, "vcpus": 1, "low_latency": ll}
        for ll, p, t in itertools.product(bench.low_latency, PLUGINS, TRANSPORTS)
    ]

    def measure(key: dict[str, Any]) -> tuple[float, float]:
        spec = bench.spec(
            key["plugin"],
            "async",
            count,
            transport=key["transport"],
            low_latency=key["low_latency"],
        )
        folder = bench.folder(f"async-{key['plugin']}-{key['transport']}")
        return rates(run_vm(spec, folder).report)

    return _collect(bench, keys, measure)


def ioeventfd(bench: Bench) -> list[dict[str, Any]]:
    """(c) Writes to an io_event's port: the kernel signals the eventfd, nobody exits."""
    count = bench.exits * ASYNC_FACTOR
    keys = [{"vcpus": 1, "low_latency": ll} for ll in bench.low_latency]

    def measure(key: dict[str, Any]) -> tuple[float, float]:
        spec = bench.spec("native", "ioevent", count, low_latency=key["low_latency"])
        return rates(run_vm(spec, bench.folder("ioeventfd")).report, counted="ioevents")

    return _collect(bench, keys, measure, unit="write")
