"""A search's answer as a trade-off: which finished trials are not dominated on validation data (their Pareto front,
computed by the one Pareto function of `analysis.pareto`), which chosen values sit at the edge of their searched range
("widen the range"), and what MLflow shows of both (tags on the runs, the parent's description).

Selection on validation, report on test: the front is computed from each trial's `val/<metric>` at its last epoch;
each front point carries its `test/<metric>` numbers, which are reported and never used to choose.
"""
from __future__ import annotations

import math
from typing import Any, Protocol, Sequence

from forgetless.platform.analysis.pareto import pareto_front, pareto_mask
from forgetless.platform.tuning.objective import REPORT_SPLIT, SELECTION_SPLIT
from forgetless.search_config import STOP_POINT

PARETO_TAG = "forgetless.pareto"  # "true" on the MLflow run of every trial on the front, "false" on the others
EDGE_TAG = "forgetless.search.edge"  # on the parent run: the chosen values at a range's edge, or "none"
EDGE_SHARE = 0.05  # a value drawn from a range within its outer 5 % (log scale for a log range) is at its edge


class Trial(Protocol):
    """What the front reads of a trial (a `results.TrialResult`)."""

    trial_id: str
    params: dict[str, Any]
    status: str
    metrics: dict[str, float]


def selection_point(t: Trial, trade_off: Sequence[tuple[str, str]]) -> dict[str, float | None]:
    """The trial's values of the trade-off's metrics on the selection (validation) split; None for a trial that did
    not train to the end (its numbers are not comparable, so it is never on the front)."""
    if t.status != "finished":
        return {m: None for m, _ in trade_off}
    return {m: t.metrics.get(f"{SELECTION_SPLIT}/{m}") for m, _ in trade_off}


def front_trials(trials: Sequence[Trial], trade_off: Sequence[tuple[str, str]]) -> list[Trial]:
    """The non-dominated finished trials, best on the first objective first."""
    points = [selection_point(t, trade_off) for t in trials]
    return [trials[i] for i in pareto_front(points, list(trade_off))] if trials else []


def front_mask(trials: Sequence[Trial], trade_off: Sequence[tuple[str, str]]) -> list[bool]:
    return pareto_mask([selection_point(t, trade_off) for t in trials], list(trade_off))


def front_record(t: Trial, trade_off: Sequence[tuple[str, str]]) -> dict[str, Any]:
    """One front point: its searched values, each trade-off metric on validation (chosen on) and test (reported)."""
    out: dict[str, Any] = {"trial_id": t.trial_id, **t.params}
    for m, _ in trade_off:
        out[f"{SELECTION_SPLIT}/{m}"] = t.metrics.get(f"{SELECTION_SPLIT}/{m}")
        out[f"{REPORT_SPLIT}/{m}"] = t.metrics.get(f"{REPORT_SPLIT}/{m}")
    return out


# ---------------------------------------------------------------------------------------------------------------------
# edges of the searched ranges


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and not (isinstance(v, float) and math.isnan(v))


def _range_edge(value: float, dim: dict[str, Any]) -> str | None:
    low, high = float(dim["low"]), float(dim["high"])
    if dim.get("log"):
        value, low, high = math.log(value), math.log(low), math.log(high)
    share = (value - low) / (high - low)
    return "bottom" if share <= EDGE_SHARE else "top" if share >= 1 - EDGE_SHARE else None


def edge_of(value: Any, dim: Any) -> str | None:
    """'bottom' or 'top' when `value` sits at that edge of the searched dimension `dim` (a list of numbers, or a range
    {low, high, log, integer}); None inside it, and for categorical dimensions (no edge to widen)."""
    if not _is_number(value):
        return None
    if isinstance(dim, dict) and "low" in dim and "high" in dim:
        return _range_edge(float(value), dim)
    if isinstance(dim, list) and all(_is_number(x) for x in dim) and len(set(dim)) >= 2:
        return "bottom" if value == min(dim) else "top" if value == max(dim) else None
    return None


def _shown_range(dim: Any) -> str:
    if isinstance(dim, dict):
        return f"[{float(dim['low']):g}, {float(dim['high']):g}]" + (" (log)" if dim.get("log") else "")
    return f"[{min(dim):g}, {max(dim):g}]"


def _widen_hint(key: str, edge: str) -> str:
    if key == STOP_POINT and edge == "top":
        return "widen the range (pre-train longer, or save later stop points)"
    return "widen the range"


def edge_flags(chosen: Sequence[Trial], space: dict[str, Any], what: str) -> list[str]:
    """One line per searched dimension where a chosen trial's value sits at an edge of its searched range: a value
    chosen at the edge may be better still outside it. `what` names the chosen trials ('the best trial', 'front
    points'). Stop point 0 (no pre-training) is a natural lower edge, not flagged."""
    lines = []
    for key, dim in space.items():
        at_edge: dict[tuple[str, Any], list[str]] = {}
        for t in chosen:
            value = t.params.get(key)
            edge = edge_of(value, dim)
            if edge and not (key == STOP_POINT and edge == "bottom" and value == 0):
                at_edge.setdefault((edge, value), []).append(t.trial_id)
        for (edge, value), ids in sorted(at_edge.items(), key=lambda kv: str(kv[0])):
            shown = f"{value:g}" if isinstance(value, float) else str(value)
            who = what if len(chosen) == 1 else f"{what} {', '.join(ids)}"
            lines.append(f"{who}: {key}={shown} is at the {edge} of the searched range {_shown_range(dim)}: "
                         f"{_widen_hint(key, edge)}")
    return lines
