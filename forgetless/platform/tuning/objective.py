"""What a search optimises: a weighted sum of accuracy metrics (one objective), or several metrics each with a
direction (a Pareto search). Per epoch on validation data and, at the end of a trial, on the test split."""
from __future__ import annotations

from dataclasses import dataclass

from forgetless.search_config import SearchConfig, metric_name

OBJECTIVE = "objective"  # the scalar every trial reports (per epoch, on validation data)
TRIAL_EPOCH = "trial_epoch"  # ASHA's time attribute: epochs this trial has trained
SELECTION_SPLIT = "val"  # trials are compared and selected on this split's metrics ...
REPORT_SPLIT = "test"  # ... and each trial's numbers are reported on this one


@dataclass
class Objective:
    """A weighted sum of accuracy metrics; `source_before` is the source accuracy of the trial's stop point."""

    weights: dict[str, float]
    source_before: float | None

    def metrics(self, target_acc: float, source_acc: float, source_before: float | None = None) -> dict[str, float]:
        """Every objective metric (search_config.OBJECTIVE_METRICS, by its standard name) and the weighted objective."""
        before = self.source_before if source_before is None else source_before
        values = {
            "target/acc": target_acc,
            "source/acc": source_acc,
            "source/retention": source_acc / before if before else float("nan"),
            "source/forgetting": before - source_acc if before is not None else float("nan"),
        }
        values["objective"] = sum(w * values[metric_name(m)] for m, w in self.weights.items())
        return values


def tune_metrics(values: dict[str, float], prefix: str) -> dict[str, float]:
    """`values` under `prefix/`, without the objective (reported on its own, as OBJECTIVE)."""
    return {f"{prefix}/{k}": v for k, v in values.items() if k != "objective"}


def scalar_weights(search: SearchConfig) -> dict[str, float]:
    """The weights of the scalar OBJECTIVE a trial reports. A Pareto search has no single objective: the scalar is its
    first objective (what the progress lines and the heatmap show); the front is computed from all of them."""
    if search.objectives is not None:
        return {search.objectives[0].metric: 1.0}
    return search.weights()


def scalar_mode(search: SearchConfig) -> str:
    return search.objectives[0].direction if search.objectives is not None else search.mode


def tune_metric_and_mode(search: SearchConfig) -> tuple[str | list[str], str | list[str]]:
    """What Tune's searcher optimises: the scalar objective, or (a Pareto search) each objective's validation
    metric with its direction."""
    if search.objectives is None:
        return OBJECTIVE, search.mode
    return ([f"{SELECTION_SPLIT}/{o.metric}" for o in search.objectives], [o.direction for o in search.objectives])
