"""The concurrent section's harness without KVM: which batches run, the ratios between rows,
and the table, for results with and without the `relay` and `forward` reference rows."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

# The harness is not installed: it runs from the checkout, as `python -m benchmarks`.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import concurrent, docs, report
from benchmarks.build import Programs
from benchmarks.context import Bench


def summary(value: float) -> dict[str, Any]:
    return {"median": value, "min": value, "max": value, "runs": 1}


def row(
    what: str,
    path: str,
    wall: float,
    cpu: float,
    vms: int = 4,
    length: str = "short",
    transport: str | None = None,
) -> dict[str, Any]:
    if transport is None:
        transport = "socket" if path in ("c+poll", "c", "forward_socket") else "pipes"
    exits = 20000 if length == "short" else 100000
    return {
        "what": what,
        "vms": vms,
        "length": length,
        "transport": transport,
        "path": path,
        "exits_each": exits,
        "wall_s": summary(wall),
        "cpu_s": summary(cpu),
        "cpu_us_per_exit": summary(cpu / (exits * vms) * 1e6),
    }


def test_every_vm_count_runs_vmsuper_and_each_reference_mode(tmp_path: Path) -> None:
    bench = Bench(Programs(tmp_path / "p", tmp_path / "r"), tmp_path, 1, 1, quick=False)
    keys = concurrent.keys(bench)
    short = [k for k in keys if k["length"] == "short"]
    for vms in concurrent.VM_COUNTS:
        found = [(k["what"], k["transport"], k["path"]) for k in short if k["vms"] == vms]
        assert found == [
            ("vmsuper", "socket", "c+poll"),
            ("vmsuper", "socket", "c"),
            ("vmsuper", "pipes", "c+poll"),
            ("vmsuper", "pipes", "c"),
            ("vmsuper, served", "pipes", "c+poll"),
            ("reference", "pipes", "pipe"),
            ("reference", "pipes", "relay"),
            ("reference", "pipes", "forward"),
            ("reference", "socket", "forward_socket"),
        ]
    # One long batch of 4 VMs: vmsuper along both paths and served, against pipe and forward.
    long = [(k["what"], k["vms"], k["path"]) for k in keys if k["length"] == "long"]
    assert long == [
        ("vmsuper", 4, "c+poll"),
        ("vmsuper", 4, "c"),
        ("vmsuper, served", 4, "c+poll"),
        ("reference", 4, "pipe"),
        ("reference", 4, "forward"),
    ]
    assert {concurrent.exits_each(bench, k) for k in keys} == {4, 20}  # N = 1


def test_rows_are_compared_with_pipe_and_vmsuper_also_with_its_transport_s_forward() -> None:
    rows = [
        row("vmsuper", "c+poll", 2.0, 4.0),
        row("vmsuper", "c+poll", 2.4, 4.0, transport="pipes"),
        row("reference", "pipe", 1.0, 2.0),
        row("reference", "relay", 1.6, 3.2),
        row("reference", "forward", 1.2, 2.5),
        row("reference", "forward_socket", 1.6, 3.2),
        row(concurrent.SERVED, "c+poll", 1.5, 3.0, transport="pipes"),
    ]
    concurrent.add_ratios(rows)
    ours, ours_pipes, pipe, relay, forward, forward_socket, served = rows
    assert served["wall_vs_reference"] == pytest.approx(1.5)
    assert served["wall_vs_forward"] == pytest.approx(1.25)
    assert ours["wall_vs_reference"] == pytest.approx(2.0)
    assert ours["cpu_vs_reference"] == pytest.approx(2.0)
    assert ours["wall_vs_forward"] == pytest.approx(2.0 / 1.6)  # the socket rows: forward_socket
    assert ours["cpu_vs_forward"] == pytest.approx(4.0 / 3.2)
    assert ours_pipes["wall_vs_forward"] == pytest.approx(2.0)  # the pipes rows: forward
    assert ours_pipes["cpu_vs_forward"] == pytest.approx(1.6)
    assert relay["wall_vs_reference"] == pytest.approx(1.6)
    assert forward["cpu_vs_reference"] == pytest.approx(1.25)
    assert forward_socket["wall_vs_reference"] == pytest.approx(1.6)
    assert not {"wall_vs_reference", "wall_vs_forward"} & pipe.keys()
    references = relay.keys() | forward.keys() | forward_socket.keys()
    assert not {"wall_vs_forward", "cpu_vs_forward"} & references


def test_without_forward_rows_only_the_pipe_ratios_are_added() -> None:
    rows = [row("vmsuper", "c+poll", 2.0, 4.0), row("reference", "pipe", 1.0, 2.0)]
    rows.append(row("reference", "forward", 1.5, 3.0, vms=8))  # another VM count: not compared
    rows.append(row("reference", "forward", 1.5, 3.0, length="long"))  # more exits: neither
    concurrent.add_ratios(rows)
    assert rows[0]["wall_vs_reference"] == pytest.approx(2.0)
    assert "wall_vs_forward" not in rows[0]
    assert "wall_vs_reference" not in rows[2]


def test_only_vmsuper_rows_of_the_goals_batches_are_held_to_the_concurrent_targets() -> None:
    rows = []
    for vms, length in ((4, "short"), (4, "long"), (8, "short")):
        rows.append(row("vmsuper", "c+poll", 3.0, 4.0, vms, length))
        rows += [row("reference", mode, 1.0, 2.0, vms, length) for mode in ("pipe", "forward")]
    concurrent.add_ratios(rows)
    goals = {g["target"]: (g["limit"], g["measured"]) for g in report.targets({"concurrent": rows})}
    assert goals == {
        "4 VMs x 100,000 exits at once, socket, wall / 4 references": (1.5, pytest.approx(3.0)),
        "8 VMs x 20,000 exits at once, socket, wall / 8 references": (1.8, pytest.approx(3.0)),
    }


def test_a_batch_target_s_floor_is_its_transport_s_forward_batch_of_the_same_size() -> None:
    """The floor of a batch target is the wall of its transport's forward reference over pipe's,
    with as many VMs and exits; above the limit it makes the target out of reach, below it the
    target is merely missed."""
    rows = [
        row("vmsuper", "c+poll", 3.0, 4.0, 4, "long", transport="pipes"),
        row("reference", "pipe", 1.0, 2.0, 4, "long"),
        row("reference", "forward", 1.6, 3.0, 4, "long"),
        row("vmsuper", "c+poll", 3.0, 4.0, 8, transport="pipes"),
        row("vmsuper", "c+poll", 3.0, 4.0, 8),
        row("reference", "pipe", 1.0, 2.0, 8),
        row("reference", "forward", 1.25, 3.0, 8),
        row("reference", "forward_socket", 1.5, 3.0, 8),
        row("reference", "forward", 9.0, 9.0, 8, "long"),  # other exits: not this floor
    ]
    concurrent.add_ratios(rows)
    goals = {g["target"]: g for g in report.targets({"concurrent": rows})}
    long = goals["4 VMs x 100,000 exits at once, pipes, wall / 4 references"]
    short = goals["8 VMs x 20,000 exits at once, pipes, wall / 8 references"]
    socket = goals["8 VMs x 20,000 exits at once, socket, wall / 8 references"]
    pipes_floor = report.FORWARD_FLOOR["pipes"]
    assert (long["floor"], long["floor_of"]) == (pytest.approx(1.6), pipes_floor)
    assert report.verdict(long) == "missed (floor above the limit)"
    assert (short["floor"], short["floor_of"]) == (pytest.approx(1.25), pipes_floor)
    assert report.verdict(short) == "missed"
    assert (socket["floor"], socket["floor_of"]) == (
        pytest.approx(1.5),
        report.FORWARD_FLOOR["socket"],
    )


def test_a_batch_target_without_a_forward_batch_has_no_floor() -> None:
    rows = [row("vmsuper", "c+poll", 1.0, 4.0, 8), row("reference", "pipe", 1.0, 2.0, 8)]
    concurrent.add_ratios(rows)
    (goal,) = report.targets({"concurrent": rows})
    assert "floor" not in goal
    assert report.verdict(goal) == "met"
    assert report.floor_text(goal) == "-"


def test_results_from_before_the_long_batch_hold_8_vms_to_its_target() -> None:
    rows = [row("vmsuper", "c+poll", 3.0, 4.0, 8), row("reference", "pipe", 1.0, 2.0, 8)]
    for r in rows:
        del r["length"]
    concurrent.add_ratios(rows)
    (goal,) = report.targets({"concurrent": rows})
    assert goal["target"] == "8 VMs x 20,000 exits at once, socket, wall / 8 references"


def cells(line: str) -> list[str]:
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def test_the_table_shows_the_new_columns_empty_for_older_results() -> None:
    """Results from before the relay and forward rows render, with `-` in the new columns."""
    old = [row("vmsuper", "c+poll", 2.0, 4.0), row("reference", "pipe", 1.0, 2.0)]
    new = [
        row("vmsuper", "c+poll", 2.0, 4.0, vms=8, transport="pipes"),
        row("reference", "pipe", 1.0, 2.0, vms=8),
    ]
    new += [row("reference", "relay", 1.6, 3.2, vms=8), row("reference", "forward", 1.2, 2.4, 8)]
    concurrent.add_ratios(old)
    concurrent.add_ratios(new)
    columns = report.COLUMNS["concurrent"]
    lines = docs.markdown_table(columns, old + new).splitlines()
    head = cells(lines[0])
    table = [dict(zip(head, cells(line), strict=True)) for line in lines[2:]]
    ratios = ["x ref wall", "x ref CPU", "x forward wall", "x forward CPU"]
    assert [table[0][name] for name in ratios] == ["2.00", "2.00", "-", "-"]
    assert [table[2][name] for name in ratios] == ["2.00", "2.00", "1.67", "1.67"]
    assert [(r["path"], r["x ref wall"], r["x forward wall"]) for r in table[3:]] == [
        ("pipe", "-", "-"),
        ("relay", "1.60", "-"),
        ("forward", "1.20", "-"),
    ]
    printed = report.table(columns, old + new)  # the harness's own printout of the same rows
    assert "x forward wall" in printed and len(printed.splitlines()) == len(lines)
