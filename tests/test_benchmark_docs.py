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
    assert rendered.count("| met |") + rendered.count("| **missed** |") == len(results["targets"])


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


def test_cpu_ratios_are_taken_over_crosvm_pipes_and_over_the_same_transport() -> None:
    def summary(value: float) -> dict[str, float]:
        return {"median": value}

    refs = [
        {"mode": mode, "vcpus": vcpus, "low_latency": False, "cpu_us_per_exit": summary(cpu)}
        for mode, vcpus, cpu in (("pipe", 1, 20.0), ("socket", 1, 25.0), ("pipe", 2, 99.0))
    ]
    rows = [
        {"transport": t, "low_latency": False, "total_us": summary(40.0)}
        for t in ("pipes", "socket")
    ]
    report.add_cpu_ratios(rows, refs)
    pipes, socket = rows
    assert (pipes["cpu_vs_crosvm"], pipes["cpu_vs_transport"]) == (2.0, 2.0)
    assert (socket["cpu_vs_crosvm"], socket["cpu_vs_transport"]) == (2.0, 1.6)
