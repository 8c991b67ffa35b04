"""Learning vs forgetting in a comparison: which strategies are on the Pareto front of the target score (ACC, higher
is better) against the source's forgetting (lower is better). No single ranking orders a trade-off; the front says
which strategies no other beats on both. With several seeds the front is computed on each strategy's means over its
seeds. The dominance computation is analysis/pareto.py's (one for compare, tune and the reports). Pure.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from forgetless.platform.analysis.pareto import MAX, MIN, pareto_mask

LEARNING = "acc"  # mean test accuracy over the targets after the last stage (metrics.py, docs/metrics.md)
FORGETTING = "source/forgetting"  # the source's test accuracy lost over the stream
OBJECTIVES = [(LEARNING, MAX), (FORGETTING, MIN)]
PARETO_MARK = "*"
CAPTION = (f"pareto {PARETO_MARK}: not dominated on ACC (higher is better) vs source forgetting (lower is better)")


def front_mask(metrics: Sequence[Mapping[str, float]]) -> list[bool]:
    """For each run's metrics, whether it is on the learning-vs-forgetting front."""
    return pareto_mask(list(metrics), OBJECTIVES)


def _mean(values: list[float]) -> float:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    return sum(vals) / len(vals) if vals else math.nan


def label_means(records: Sequence[Mapping]) -> dict[str, dict[str, float]]:
    """Per label (first-seen order), the mean over its runs (seeds) of each objective."""
    out: dict[str, dict[str, float]] = {}
    for label in dict.fromkeys(r["label"] for r in records):
        group = [r for r in records if r["label"] == label]
        out[label] = {name: _mean([r.get(name, math.nan) for r in group]) for name, _ in OBJECTIVES}
    return out


def label_front(records: Sequence[Mapping]) -> dict[str, bool]:
    """Per label, whether its means over its seeds are on the front (one seed: its one run)."""
    means = label_means(records)
    return dict(zip(means, front_mask(list(means.values()))))


def with_pareto(records: list[dict]) -> list[dict]:
    """The records (label, metrics...) each with `pareto`: whether its strategy is on the front."""
    front = label_front(records)
    return [{**r, "pareto": front[r["label"]]} for r in records]


def mark(on_front: bool) -> str:
    return PARETO_MARK if on_front else ""
