"""The names of forgetless's metrics: each summary metric's MLflow name and unit, and the old names of runs logged
before the standard definitions (docs/metrics.md defines every metric and lists the old names). Pure, no MLflow."""
from __future__ import annotations

import math

from forgetless.platform.analysis import metrics as M

# The one-number results as MLflow metrics: logged once, at step 0 (MLflow draws one bar per run for a metric with a
# single step-0 value), at full precision, in the units the comparison table prints, which the names say: `_pct`
# percent, `_pp` percentage points (a difference of two percentages); losses in nats, perplexities and ratios as they
# are. docs/metrics.md defines each. StrategyResult.metrics key (fractions) -> (MLflow name, scale)
SUMMARY_METRICS: dict[str, tuple[str, float]] = {
    "acc": ("acc_pct", 100.0),
    "acc_with_source": ("acc_with_source_pct", 100.0),
    "avg_inc_acc": ("avg_inc_acc_pct", 100.0),
    "bwt": ("bwt_pp", 100.0),
    "forgetting/max": ("forgetting/max_pp", 100.0),
    "source/forgetting": ("source/forgetting_pp", 100.0),
    "source/acc_before": ("source/acc_before_pct", 100.0),
    "source/acc_after": ("source/acc_after_pct", 100.0),
    "source/retention": ("source/retention_pct", 100.0),
    "aulc": ("aulc_pct", 100.0),
    "source/auc": ("source/auc_pct", 100.0),
    # causal-LM streams (lower is better): losses in nats, perplexity = exp(loss), metrics.summarize_losses
    "source/loss_before": ("source/loss_before", 1.0),
    "source/loss_after": ("source/loss_after", 1.0),
    "source/loss_increase": ("source/loss_increase", 1.0),
    "source/perplexity_before": ("source/perplexity_before", 1.0),
    "source/perplexity_after": ("source/perplexity_after", 1.0),
    "source/perplexity_ratio": ("source/perplexity_ratio", 1.0),
    "target/corpus_mean_loss": ("target/corpus_mean_loss", 1.0),
    "target/corpus_mean_perplexity": ("target/corpus_mean_perplexity", 1.0),
    "forgetting/loss_increase": ("forgetting/loss_increase", 1.0),
    "forgetting/perplexity_ratio": ("forgetting/perplexity_ratio", 1.0),
    "steps_to/90": ("steps_to/90", 1.0),
    "steps_to/95": ("steps_to/95", 1.0),
    "trainable_params/max": ("trainable_params/max", 1.0),
    "optimizer_steps": ("optimizer_steps", 1.0),
    "wall_seconds": ("wall_seconds", 1.0),
    "train_seconds": ("train_seconds", 1.0),
}


def summary_metrics(metrics: dict[str, float]) -> dict[str, float]:
    """`metrics` (fractions, StrategyResult.metrics) under their MLflow names, scaled, at full precision (rounding is
    for display only: stored values feed aggregates, reports and other tools). Undefined (NaN) metrics are left out."""
    out = {}
    for key, (name, scale) in SUMMARY_METRICS.items():
        v = metrics.get(key)
        if v is not None and not math.isnan(v):
            out[name] = scale * v
    return out


# Runs logged before the standard definitions (docs/metrics.md, "Old names") carry the old names: a run's metrics
# that hold one of these were written under the old definitions, where `acc` and `bwt` counted the source.
OLD_ONLY_NAMES = ("forgetting/first", "target/final_acc")
# old key -> today's key of the same number
OLD_RENAMED = {"target/final_acc": "acc", "acc": "acc_with_source"}
# old keys with no same-named number today (gone, or their definition changed): recomputed from R where it is stored,
# else left out. With one target corpus the old LM aggregates were already today's numbers (OLD_LM_SINGLE_TARGET).
OLD_REDEFINED = ("bwt", "avg_inc_acc", "forgetting/first", "forgetting/perplexity_increase",
                 "forgetting/perplexity_ratio", "target/final_perplexity")
OLD_LM_SINGLE_TARGET = {"target/final_perplexity": "target/corpus_mean_perplexity",
                        "forgetting/perplexity_ratio": "forgetting/perplexity_ratio"}


def read_metrics(stored: dict[str, float], R=None) -> dict[str, float]:
    """A run's metrics (fractions, as StrategyResult.metrics) read back from a result file or MLflow, under today's
    names and definitions whichever names they were stored under. `R`: the run's stored accuracy matrix, from which
    the redefined matrix metrics (BWT, average incremental accuracy, the source's forgetting) are recomputed."""
    if not any(k in stored for k in OLD_ONLY_NAMES):
        return dict(stored)
    out = {OLD_RENAMED.get(k, k): v for k, v in stored.items() if k not in OLD_REDEFINED}
    if R is not None and len(R):
        out.update(M.summarize(R))
        if len(R) == 2:  # one target: the old LM aggregates over target corpora were over that one corpus
            out.update({new: stored[old] for old, new in OLD_LM_SINGLE_TARGET.items() if old in stored})
    before, after = stored.get("source/perplexity_before"), stored.get("source/perplexity_after")
    if before and after:  # exact: log of a perplexity is its loss
        out.update({"source/loss_before": math.log(before), "source/loss_after": math.log(after),
                    "source/loss_increase": math.log(after / before), "source/perplexity_ratio": after / before})
    return out


# old MLflow names of the old-only keys (the others kept their MLflow names: SUMMARY_METRICS)
OLD_SUMMARY_METRICS: dict[str, tuple[str, float]] = {
    "target/final_acc": ("target/final_acc_pct", 100.0),
    "forgetting/first": ("forgetting/first_pp", 100.0),
    "forgetting/perplexity_increase": ("forgetting/perplexity_increase", 1.0),
    "target/final_perplexity": ("target/final_perplexity", 1.0),
}


def logged_under_old_names(logged: dict[str, float]) -> bool:
    """Whether a run's MLflow metrics were logged under the old definitions (it holds an old-only name): its `acc_pct`,
    `bwt_pp` and `avg_inc_acc_pct` then mean what they meant (docs/metrics.md, "Old names")."""
    return any(name in logged for name, _ in OLD_SUMMARY_METRICS.values())


def metrics_from_mlflow(logged: dict[str, float], R=None) -> dict[str, float]:
    """A run's summary metrics as MLflow holds them (`forgetting/max_pp`, ..., today's names or the old ones) as
    StrategyResult.metrics: fractions under today's names and definitions (`read_metrics`)."""
    names = {**SUMMARY_METRICS, **OLD_SUMMARY_METRICS}
    return read_metrics({key: logged[name] / scale for key, (name, scale) in names.items() if name in logged}, R)
