"""docs/performance.md's figures are rendered from the committed run's JSON, never typed."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks import docs, report


def test_the_documented_figures_are_the_committed_run() -> None:
    results = json.loads(docs.RESULTS.read_text())
    assert not results["settings"]["quick"]
    document = docs.DOC.read_text()
    assert docs.splice(document, docs.render(results)) == document, (
        "docs/performance.md's figures differ from docs/performance.json:"
        " run python -m benchmarks.docs"
    )


def test_every_section_of_the_committed_run_is_rendered() -> None:
    results = json.loads(docs.RESULTS.read_text())
    rendered = docs.render(results)
    for name in results["sections"]:
        assert f"### {docs.report.TITLES[name]}" in rendered
    verdicts = rendered.count("| met |") + rendered.count("| **missed")
    assert verdicts == len(results["targets"])


def test_splice_replaces_only_the_generated_part() -> None:
    document = f"intro\n{docs.BEGIN}\nold figures\n{docs.END}\nafter\n"
    assert docs.splice(document, "new") == f"intro\n{docs.BEGIN}\nnew\n{docs.END}\nafter\n"
    with pytest.raises(docs.DocsError):
        docs.splice("no markers here", "new")


def test_main_renders_the_committed_file_given_by_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Given the committed JSON itself it renders it; given another run it copies it first."""
    run = json.loads(docs.RESULTS.read_text())
    (tmp_path / "docs").mkdir()
    results, document = tmp_path / "docs" / "performance.json", tmp_path / "docs" / "performance.md"
    monkeypatch.setattr(docs, "ROOT", tmp_path)
    monkeypatch.setattr(docs, "RESULTS", results)
    monkeypatch.setattr(docs, "DOC", document)
    results.write_text(json.dumps(run))
    document.write_text(f"intro\n{docs.BEGIN}\n{docs.END}\n")
    assert docs.main([str(results)]) == 0
    assert docs.render(run) in document.read_text()

    newer = tmp_path / "newer.json"
    run["settings"]["date"] = "2027-01-01"
    newer.write_text(json.dumps(run))
    assert docs.main([str(newer)]) == 0
    assert json.loads(results.read_text())["settings"]["date"] == "2027-01-01"
    assert "Run of 2027-01-01" in document.read_text()


def _median(value: float) -> dict[str, float]:
    return {"median": value}


def test_cpu_ratios_are_taken_over_crosvm_pipes_and_over_the_same_transport() -> None:
    refs = [
        {"mode": mode, "vcpus": vcpus, "low_latency": False, "cpu_us_per_exit": _median(cpu)}
        for mode, vcpus, cpu in (("pipe", 1, 20.0), ("socket", 1, 25.0), ("pipe", 2, 99.0))
    ]
    rows = [
        {"transport": t, "low_latency": False, "total_us": _median(40.0)}
        for t in ("pipes", "socket")
    ]
    report.add_cpu_ratios(rows, refs)
    pipes, socket = rows
    assert (pipes["cpu_vs_crosvm"], pipes["cpu_vs_transport"]) == (2.0, 2.0)
    assert (socket["cpu_vs_crosvm"], socket["cpu_vs_transport"]) == (2.0, 1.6)


def _exit_row(plugin: str, transport: str, vcpus: int, path: str, us: float) -> dict[str, object]:
    return {
        "plugin": plugin,
        "transport": transport,
        "vcpus": vcpus,
        "low_latency": True,
        "path": path,
        "us_per_exit": _median(us),
        "vs_crosvm": us / 20.0,
    }


def test_each_native_exit_setting_on_the_default_path_is_held_to_its_poll_us_0_row() -> None:
    """The default path must never be slower than `poll_us = 0`: on one VCPU and on two, each
    transport, as measured in the same interleaved runs; a setting without its `c` row (an
    older run's two VCPUs) and the sdk plugin's rows have no such target."""
    rows = [
        _exit_row("native", "pipes", 2, "c+poll", 24.0),
        _exit_row("native", "pipes", 2, "c", 30.0),
        _exit_row("native", "socket", 2, "c+poll", 33.0),
        _exit_row("native", "socket", 2, "c", 30.0),
        _exit_row("native", "pipes", 1, "c+poll", 20.0),  # no `c` row
        _exit_row("sdk", "pipes", 2, "c+poll", 60.0),
        _exit_row("sdk", "pipes", 2, "c", 50.0),
    ]
    goals = {
        g["target"]: g
        for g in report.targets({"exits": rows})
        if g["target"].endswith("poll_us 0 per exit low_latency")
    }
    pipes = goals.pop(
        "native plugin pipes, 2 VCPUs, default per exit / poll_us 0 per exit low_latency"
    )
    socket = goals.pop(
        "native plugin socket, 2 VCPUs, default per exit / poll_us 0 per exit low_latency"
    )
    assert goals == {}
    assert (pipes["limit"], pipes["measured"], pipes["met"]) == (1.0, pytest.approx(0.8), True)
    assert (socket["measured"], socket["met"]) == (pytest.approx(1.1), False)


def _startup_rows(**medians: float) -> list[dict[str, object]]:
    return [{"plugin": name, "run_ms": _median(ms)} for name, ms in medians.items()]


def test_a_direct_run_s_start_up_targets_have_python_and_sandbox_parts_as_floor() -> None:
    """exec to the first request cannot beat the interpreter, the imports before the spawn and
    the sandbox's start; a whole run, the interpreter and all imports (its VM's release, made
    short, is left out: report.py). Served runs have none."""
    rows = _startup_rows(
        **{
            "python: bare interpreter": 25.0,
            "python: imports before the plugin's spawn": 60.0,
            "sandbox: the plugin's spawn, set-up to main": 10.0,
            "python: supervisor imports": 80.0,
            "kvm: that VM closed": 20.0,  # not part of any floor: see report.TRIVIAL_RUN_FLOOR
        }
    )
    for plugin in ("native", "native, served"):
        rows.append({"plugin": plugin, "to_first_request_ms": _median(100.0), "run_ms": _median(1)})
    for plugin in ("trivial", "trivial, served"):
        rows.append({"plugin": plugin, "run_ms": _median(110.0)})
    goals = {g["target"]: g for g in report.targets({"startup": rows})}
    first = goals["exec to the plugin's first request"]
    assert first["floor"] == 95.0
    assert first["floor_of"] == (
        "the interpreter + the imports before the spawn + the sandbox's start"
    )
    assert report.verdict(first) == "missed (floor above the limit)"
    whole = goals["whole run of a trivial plugin"]
    assert (whole["floor"], whole["floor_of"]) == (105.0, "the interpreter + all imports")
    assert report.verdict(whole) == "met"
    assert "floor" not in goals["exec to the plugin's first request, served by vmsuper serve"]
    assert "floor" not in goals["whole run of a trivial plugin, served by vmsuper serve"]
    # A run without the parts (an older one, or --only) has no floor.
    (alone,) = report.targets({"startup": [r for r in rows if r["plugin"] == "trivial"]})
    assert "floor" not in alone


def test_the_targets_table_shows_each_floor_and_why_a_target_is_out_of_reach() -> None:
    results = json.loads(docs.RESULTS.read_text())
    results["targets"] = [
        {"target": "a", "limit": 1.5, "measured": 1.2, "unit": "x", "met": True},
        {
            "target": "b",
            "limit": 1.5,
            "measured": 1.7,
            "unit": "x",
            "met": False,
            "floor": 1.6,
            "floor_of": "the forward layout in C",
        },
        {"target": "c", "limit": 90.0, "measured": 95.0, "unit": "ms", "met": False},
    ]
    rendered = docs.render(results)
    assert "| a | 1.20 x | 1.5 x | - | met |" in rendered
    assert (
        "| b | 1.70 x | 1.5 x | 1.60 x (the forward layout in C)"
        " | **missed (floor above the limit)** |"
    ) in rendered
    assert "| c | 95.00 ms | 90 ms | - | **missed** |" in rendered
