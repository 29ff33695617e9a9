"""The harness's summaries without KVM: the order of each round, the values a summary keeps, and
the round-by-round ratio that the targets comparing two rows of one section use."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

# The harness is not installed: it runs from the checkout, as `python -m benchmarks`.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import concurrent, report
from benchmarks.stats import Summary, paired_ratio, rounds, summarize

# Two rows measured in the same three rounds, the machine slower in each: round by round the
# default path is the faster in two of three (10/11, 20/19, 40/44), the medians (20 over 19)
# say it is the slower.
DEFAULT = [10.0, 20.0, 40.0]
UNPOLLED = [11.0, 19.0, 44.0]


def test_rounds_take_turns_at_the_order() -> None:
    assert list(rounds(4, 3)) == [[0, 1, 2], [2, 1, 0], [0, 1, 2], [2, 1, 0]]
    assert list(rounds(0, 3)) == []


def test_a_summary_keeps_its_values_in_the_order_measured() -> None:
    summary = summarize([3, 1, 2])
    assert summary == {"median": 2.0, "min": 1.0, "max": 3.0, "runs": 3, "values": [3.0, 1.0, 2.0]}


def test_the_paired_ratio_is_the_median_of_the_rounds_ratios() -> None:
    paired = paired_ratio(summarize(DEFAULT), summarize(UNPOLLED))
    assert paired == pytest.approx(10.0 / 11.0)  # the median of 10/11, 20/19 and 40/44
    assert paired != pytest.approx(20.0 / 19.0)


def test_without_values_of_equal_length_the_ratio_of_the_medians_is_taken() -> None:
    older: Summary = {"median": 19.0, "min": 11.0, "max": 44.0, "runs": 3}  # before the values
    assert paired_ratio(summarize(DEFAULT), older) == pytest.approx(20.0 / 19.0)
    shorter = summarize(UNPOLLED[:2])
    assert paired_ratio(summarize(DEFAULT), shorter) == pytest.approx(20.0 / 15.0)
    zero = summarize([0.0, 19.0, 44.0])  # no ratio of a zero: the medians
    assert paired_ratio(summarize(DEFAULT), zero) == pytest.approx(20.0 / 19.0)


def _exit_row(path: str, values: list[float]) -> dict[str, Any]:
    return {
        "plugin": "native",
        "transport": "pipes",
        "vcpus": 2,
        "low_latency": True,
        "path": path,
        "us_per_exit": summarize(values),
        "vs_crosvm": 1.0,
    }


def test_an_exit_row_is_held_to_its_poll_us_0_row_round_by_round() -> None:
    rows = [_exit_row("c+poll", DEFAULT), _exit_row("c", UNPOLLED)]
    (goal,) = [g for g in report.targets({"exits": rows}) if "poll_us 0" in g["target"]]
    assert goal["measured"] == pytest.approx(10.0 / 11.0)
    assert goal["met"] is True


def _batch(path: str, values: list[float]) -> dict[str, Any]:
    summary = summarize(values)
    return {
        "what": "vmsuper",
        "vms": 8,
        "length": "short",
        "transport": "pipes",
        "path": path,
        "exits_each": 20000,
        "wall_s": summary,
        "cpu_s": summary,
        "cpu_us_per_exit": summary,
    }


def test_a_batch_is_held_to_its_poll_us_0_batch_round_by_round() -> None:
    rows = [_batch("c+poll", DEFAULT), _batch("c", UNPOLLED)]
    concurrent.add_ratios(rows)
    goals = {g["target"]: g for g in report.targets({"concurrent": rows})}
    goal = goals["8 VMs x 20,000 exits at once, pipes, default wall / poll_us 0 wall"]
    assert goal["measured"] == pytest.approx(10.0 / 11.0)
    assert goal["met"] is True
