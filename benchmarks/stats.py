"""Summaries of repeated measurements: median, min and max (means hide the outliers that
matter on a shared machine, and medians resist them), and the values themselves in the order
they were measured, so that two rows measured in the same rounds can be compared round by
round (`paired_ratio`)."""

from __future__ import annotations

import statistics
from collections.abc import Iterator, Sequence
from typing import NotRequired, TypedDict


class Summary(TypedDict):
    median: float
    min: float
    max: float
    runs: int
    values: NotRequired[list[float]]  # absent from results of before it was kept


def rounds(repeat: int, count: int) -> Iterator[list[int]]:
    """The order of `count` keys in each of `repeat` rounds: as listed, then reversed, and so
    on. Whichever of two keys runs second in a round pays for it on this machine; taking turns
    spreads that over both, for the medians and for `paired_ratio`."""
    for n in range(repeat):
        order = list(range(count))
        yield order if n % 2 == 0 else order[::-1]


def summarize(values: Sequence[float]) -> Summary:
    if not values:
        raise ValueError("nothing to summarize")
    return {
        "median": float(statistics.median(values)),
        "min": float(min(values)),
        "max": float(max(values)),
        "runs": len(values),
        "values": [float(v) for v in values],
    }


def ratio(numerator: float, denominator: float) -> float | None:
    return numerator / denominator if denominator > 0 else None


def paired_ratio(numerator: Summary, denominator: Summary) -> float | None:
    """The median of the round-by-round ratios of two rows measured in the same rounds; the
    ratio of their medians when either summary lacks its values (older results).

    Between full runs here the machine's speed drifts by more than the few per cent two paths
    of one section differ by; each round runs both within seconds of each other, so each
    round's ratio carries little of that drift, and their median even less."""
    ours, theirs = numerator.get("values"), denominator.get("values")
    if ours and theirs and len(ours) == len(theirs) and all(v > 0 for v in theirs):
        return float(statistics.median(a / b for a, b in zip(ours, theirs, strict=True)))
    return ratio(numerator["median"], denominator["median"])
