"""The benchmark harness keeps working: one quick run must produce every figure.

Timings are never asserted (they depend on the machine); only that each section ran, that
every figure is a finite number, and that the summaries are consistent.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from vmsuper.supervisor.config import VmConfig

ROOT = Path(__file__).resolve().parent.parent
PATHS = ("c+poll", "c")
SECTIONS = {
    "exits",
    "reference",
    "async",
    "ioeventfd",
    "cpu",
    "startup",
    "memory",
    "concurrent",
    "placement",
}
# The figures each section's rows must all carry (summaries unless noted).
FIGURES = {
    "exits": ("us_per_exit", "exits_per_s", "crosvm_us_per_exit"),
    "reference": ("us_per_exit", "exits_per_s", "cpu_us_per_exit"),
    "concurrent": ("wall_s", "cpu_s", "cpu_us_per_exit"),
    "placement": ("us_per_exit",),
    "async": ("us_per_exit", "exits_per_s"),
    "ioeventfd": ("us_per_write", "writes_per_s"),
    "cpu": (
        "wall_us",
        "supervisor_main_us",
        "supervisor_runner_us",
        "vcpu_worker_us",
        "plugin_us",
        "total_us",
        "crosvm_cpu_us",
        "transport_cpu_us",
    ),
}


def check_summary(name: str, summary: Any, *, difference: bool = False) -> None:
    """A summary of times; `difference`: of one timing minus another (an import's run minus a
    bare interpreter's), which a loaded machine can make negative in a one-run quick bench."""
    assert isinstance(summary, dict), f"{name} is not a summary: {summary!r}"
    values = [summary["min"], summary["median"], summary["max"]]
    assert all(isinstance(v, float) and math.isfinite(v) for v in values), name
    assert difference or values[0] >= 0, name
    assert values == sorted(values), f"{name}: min <= median <= max fails: {values}"
    assert summary["runs"] >= 1


@pytest.fixture
def results(tmp_path: Path) -> dict[str, Any]:
    """One quick harness run (function-scoped, so the KVM gate is checked before it starts)."""
    out = tmp_path / "bench.json"
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--out", str(out), "--work", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=280,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    assert "Targets" in done.stdout
    loaded: dict[str, Any] = json.loads(out.read_text())
    return loaded


@pytest.mark.kvm
@pytest.mark.timeout(300)  # every section once; slow when the machine is busy
def test_quick_run_reports_every_figure(results: dict[str, Any]) -> None:
    machine = results["machine"]
    assert machine["cpu_model"] and machine["kernel"] and machine["python"]
    assert machine["nproc"] >= 1
    assert set(results["sections"]) == SECTIONS
    sections = results["sections"]

    for name, keys in FIGURES.items():
        assert sections[name], f"section {name} is empty"
        for row in sections[name]:
            for key in keys:
                check_summary(f"{name}.{key}", row[key])

    assert set(results["settings"]["paths"]) == set(PATHS)
    exits = sections["exits"]
    combos = [(r["plugin"], r["transport"], r["vcpus"], r["low_latency"], r["path"]) for r in exits]
    defaults = itertools.product(("native", "sdk"), ("socket", "pipes"), (1, 2), (False, True))
    # Every setting along the default path; the native plugin's along every path.
    variants = itertools.product(("native",), ("socket", "pipes"), (1, 2), (False, True), PATHS)
    expected = {(*key, "c+poll") for key in defaults} | set(variants)
    assert sorted(combos) == sorted(expected)
    for row in exits:
        for ratio in ("vs_crosvm", "vs_crosvm_socket", "vs_relay", "vs_forward", "vs_floor"):
            assert isinstance(row[ratio], float) and row[ratio] > 0, (ratio, row)
    modes = {(r["mode"], r["low_latency"]) for r in sections["reference"]}
    all_modes = ("inline", "pipe", "socket", "relay", "forward", "forward_socket")
    assert modes == set(itertools.product(all_modes, (False, True)))

    cpu = [(r["transport"], r["low_latency"], r["path"]) for r in sections["cpu"]]
    assert sorted(cpu) == sorted(
        itertools.product(("socket", "pipes"), (False, True), ("c+poll", "c"))
    )

    for row in sections["cpu"]:
        if row["low_latency"] is not None:
            for cpu_ratio in ("cpu_vs_crosvm", "cpu_vs_transport"):
                assert isinstance(row[cpu_ratio], float) and row[cpu_ratio] > 0, (cpu_ratio, row)

    # K VMs at once (2 in a quick run): vmsuper along both paths, and the reference's layouts;
    # and the long batch of 4 VMs, five times as many exits each.
    batches = {(r["what"], r["vms"], r["transport"], r["path"]) for r in sections["concurrent"]}
    assert batches == {
        *itertools.product(("vmsuper",), (2,), ("socket", "pipes"), ("c+poll", "c")),
        ("vmsuper, served", 2, "pipes", "c+poll"),
        *itertools.product(("reference",), (2,), ("pipes",), ("pipe", "relay", "forward")),
        ("reference", 2, "socket", "forward_socket"),
        *itertools.product(("vmsuper",), (4,), ("pipes",), ("c+poll", "c")),
        ("vmsuper, served", 4, "pipes", "c+poll"),
        *itertools.product(("reference",), (4,), ("pipes",), ("pipe", "forward")),
    }
    exits = {r["length"]: r["exits_each"] for r in sections["concurrent"]}
    assert exits["long"] == 5 * exits["short"]
    for row in sections["concurrent"]:
        ratios = {
            "vmsuper": (
                "wall_vs_reference",
                "cpu_vs_reference",
                "wall_vs_forward",
                "cpu_vs_forward",
            ),
            "vmsuper, served": ("wall_vs_reference", "cpu_vs_reference", "wall_vs_forward"),
            "reference": () if row["path"] == "pipe" else ("wall_vs_reference", "cpu_vs_reference"),
        }[row["what"]]
        for name in ratios:
            assert isinstance(row[name], float) and row[name] > 0, (name, row)

    # Pinned by hand (each pin read back from the kernel by the harness), up to 2 VMs when quick.
    placed = {(r["vms"], r["vcpus"], r["placement"]): r for r in sections["placement"]}
    assert set(placed) == {
        (1, 1, "free"),
        (1, 1, "apart"),
        (1, 1, "paired"),
        (1, 2, "free"),
        (1, 2, "paired"),
        (2, 1, "free"),
        (2, 1, "apart"),
        (2, 1, "per-vm"),
    }
    first, second = sorted(os.sched_getaffinity(0))[:2]
    assert placed[(2, 1, "per-vm")]["cpus"] == [[[first, first]], [[second, second]]]
    assert placed[(1, 1, "apart")]["cpus"] == [[[first, second]]]
    for (_, _, how), placed_row in placed.items():
        if how != "free":
            assert isinstance(placed_row["vs_free"], float) and placed_row["vs_free"] > 0

    startup = {(r["plugin"], r.get("low_latency")): r for r in sections["startup"]}
    for ll in (False, True):
        for key in ("to_first_request_ms", "to_first_exit_ms", "run_ms"):
            check_summary(key, startup[("native", ll)][key])
        check_summary("trivial run_ms", startup[("trivial", ll)]["run_ms"])
        check_summary("trivial run_cpu_ms", startup[("trivial", ll)]["run_cpu_ms"])
        # The same, handed to a `vmsuper serve` that the section starts.
        check_summary(
            "served first request", startup[("native, served", ll)]["to_first_request_ms"]
        )
        for key in ("run_ms", "run_cpu_ms"):
            check_summary(f"served trivial {key}", startup[("trivial, served", ll)][key])
    served = [t for t in results["targets"] if "served by vmsuper serve" in t["target"]]
    assert len(served) == 5, served  # start-up's 4, and the long batch's
    differences = (
        "python: supervisor imports",
        "python: imports before the plugin's spawn",
        "python: msgspec import, as a run does",
        "python: structlog import, as a run does",
    )
    for name in (
        "python: bare interpreter",
        *differences,
        "vmsuper --version",
        "sandbox: the plugin's spawn, set-up to main",
        "kvm: a run's VM made (TSS, irqchip, PIT)",
        "kvm: that VM closed",
    ):
        check_summary(name, startup[(name, None)]["run_ms"], difference=name in differences)

    memory = [r for r in sections["memory"] if "vcpus" in r]
    assert {(r["vcpus"], r["low_latency"]) for r in memory} == {
        (1, False),
        (16, False),
        (1, True),
        (16, True),
    }
    for row in memory:
        for key in (
            "supervisor_uss_mib",
            "supervisor_pss_mib",
            "worker_uss_mib",
            "total_pss_mib",
            "start_ms",
            "held_cpu_ms_per_s",
            "held_switches_per_s",
        ):
            check_summary(key, row[key])
        assert row["worker_uss_mib"]["runs"] == row["vcpus"]  # one sample per worker
    growth = [r for r in sections["memory"] if "growth" in r]
    assert len(growth) == 2
    for row in growth:
        assert math.isfinite(row["per_added_vcpu_uss_mib"])
        assert math.isfinite(row["per_added_vcpu_pss_mib"])

    targets = results["targets"]
    # Along the default path: 1-VCPU exits (4), 2-VCPU exits with low latency (2), each
    # native exit setting against poll_us 0 (8), CPU per exit (4), default against poll_us 0
    # for each batch and transport (2, and 1 long), start-up (4, and 4 served), worker memory
    # (1), the long batch of 4 VMs against the references (1, and 1 served). The 8-VM ratios
    # need a full run.
    assert len(targets) == 32, [t["target"] for t in targets]
    assert all(isinstance(t["measured"], float) and isinstance(t["met"], bool) for t in targets)


# Loads the config the harness generates for each exit path with vmsuper's own loader.
_PATH_CONFIGS = """
import json, sys
from pathlib import Path
from benchmarks.context import PATHS
from benchmarks.vmrun import RunSpec, config_toml
from vmsuper.supervisor.config import load_config
folder = Path(sys.argv[1])
found = {}
for name, settings in PATHS.items():
    config = folder / f"{name}.toml"
    spec = RunSpec(plugin=["/bin/true"], low_latency=True, **settings)
    config.write_text(config_toml(spec, [], folder / "logs"))
    vm = load_config(config, check_plugin=False).vm
    found[name] = [vm.poll_us, vm.low_latency]
print(json.dumps(found))
"""


def test_each_exit_path_reaches_the_vm_config(tmp_path: Path) -> None:
    """The default path leaves vmsuper's defaults alone; the others set exactly their keys."""
    done = subprocess.run(
        [sys.executable, "-c", _PATH_CONFIGS, str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    defaults = VmConfig()
    assert json.loads(done.stdout) == {
        "c+poll": [defaults.poll_us, True],
        "c": [0, True],
    }


def test_the_python_rows_time_no_interpreter_teardown(tmp_path: Path) -> None:
    """`vmsuper run` ends with os._exit, so the start-up section's Python rows time
    interpreters that end so too: an atexit handler of the timed statement never runs."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))  # the harness runs from the checkout, uninstalled
    from benchmarks.startup import _python_command

    marker = tmp_path / "teardown-ran"
    statement = f"import atexit\natexit.register(open, {str(marker)!r}, 'w')"
    subprocess.run(_python_command(statement), check=True, timeout=60)
    assert not marker.exists()
    subprocess.run([sys.executable, "-c", statement], check=True, timeout=60)
    assert marker.exists()  # the same statement with a teardown: the check can fail
