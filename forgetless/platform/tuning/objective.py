"""The objective a search optimises: a weighted sum of accuracy metrics, per epoch on validation data and, at the end
of a trial, on the test split."""
from __future__ import annotations

from dataclasses import dataclass

OBJECTIVE = "objective"  # the Tune metric every trial reports (per epoch, on validation data)
TRIAL_EPOCH = "trial_epoch"  # ASHA's time attribute: epochs this trial has trained


@dataclass
class Objective:
    """A weighted sum of accuracy metrics; `source_before` is the source accuracy of the trial's stop point."""

    weights: dict[str, float]
    source_before: float | None

    def metrics(self, target_acc: float, source_acc: float, source_before: float | None = None) -> dict[str, float]:
        before = self.source_before if source_before is None else source_before
        values = {
            "target/acc": target_acc,
            "source/acc": source_acc,
            "source/retention": source_acc / before if before else float("nan"),
            "forgetting": before - source_acc if before is not None else float("nan"),
        }
        values["objective"] = sum(w * values[m] for m, w in self.weights.items())
        return values


def tune_metrics(values: dict[str, float], prefix: str) -> dict[str, float]:
    """`values` under `prefix/`, without the objective (reported on its own, as OBJECTIVE)."""
    return {f"{prefix}/{k}": v for k, v in values.items() if k != "objective"}
