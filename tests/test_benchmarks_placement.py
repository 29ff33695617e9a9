"""The placement section's plans and ratios (the pinning itself runs in test_benchmarks.py)."""

from __future__ import annotations

from typing import Any

import pytest

from benchmarks.placement import add_ratios, placed, plan
from benchmarks.stats import summarize

CPUS = [2, 5]


def test_free_pins_nothing() -> None:
    assert plan("free", 0, 2, CPUS) == {}
    assert placed(plan("free", 0, 2, CPUS)) == []


def test_apart_gives_runner_and_worker_a_cpu_each() -> None:
    assert plan("apart", 0, 1, CPUS) == {0: (2, 5)}
    assert plan("apart", 3, 1, CPUS) == {0: (2, 5)}  # every VM alike: they do not coordinate
    assert plan("apart", 0, 2, [0, 1, 2, 3]) == {0: (0, 1), 1: (2, 3)}


def test_paired_keeps_a_vcpus_runner_and_worker_together_one_cpu_per_vcpu() -> None:
    assert plan("paired", 0, 2, CPUS) == {0: (2, 2), 1: (5, 5)}
    assert plan("paired", 0, 3, CPUS) == {0: (2, 2), 1: (5, 5), 2: (2, 2)}


def test_per_vm_spreads_the_vms_over_the_cpus() -> None:
    assert [plan("per-vm", vm, 1, CPUS) for vm in range(3)] == [
        {0: (2, 2)},
        {0: (5, 5)},
        {0: (2, 2)},
    ]
    assert placed(plan("per-vm", 1, 2, CPUS)) == [[5, 5], [2, 2]]


def test_an_unknown_placement_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown placement 'anywhere'"):
        plan("anywhere", 0, 1, CPUS)


def row(vms: int, vcpus: int, placement: str, us: float) -> dict[str, Any]:
    return {"vms": vms, "vcpus": vcpus, "placement": placement, "us_per_exit": summarize([us])}


def test_each_row_is_compared_with_its_own_scenarios_free_row() -> None:
    rows = [
        row(1, 1, "free", 10.0),
        row(1, 1, "paired", 20.0),
        row(1, 2, "free", 40.0),
        row(1, 2, "paired", 30.0),
        row(2, 1, "apart", 50.0),  # no free row in its scenario: no ratio
    ]
    add_ratios(rows)
    assert [r.get("vs_free") for r in rows] == [None, 2.0, None, 0.75, None]
