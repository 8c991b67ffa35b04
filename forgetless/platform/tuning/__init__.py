"""Ray Tune searches over pre-training stop points, learning rates and any searchable config field.

The flow: validate the search (before Ray starts) -> pre-train the source once (`fits.pretrain` reuses an identical
trajectory) -> one Ray Tune trial per point of the space. A trial is a plain function that holds one of the search's
slots and has the slot's trial runner (a process of the driver's) fit a Ray Train `TorchTrainer` through
`fits.transfer` (DeepSpeed in every worker, init weights = the trial's stop point), whose controller runs in the slot's
controller host; every epoch's metrics go to Tune through a `TuneReportCallback`, so ASHA can stop poor trials early.

MLflow: one parent run per search (space, objective, result table, plots); each trial's rank 0 creates its child run.

One concept a module:
  plan       validation, each trial's config, the Tune search space and searcher (no Ray needed to validate)
  objective  the weighted objective and its metrics
  record     the MLflow tags and metrics of a search's trials, and retries for concurrent SQLite writers
  slots      the slot actor: at most n trials at once, each with the runner and controller host lent to its slot
  trial      the Ray Train report callback and the trial function (light: a trial process imports it)
  trial_runner  the driver's runner processes that train a slot's trials (light: a trial process unpickles them)
  trial_training  training one trial (fits.transfer, its MLflow run), in the slot's runner
  driver     run_search: scheduler, progress callback, parent run, unfinished trials
  front      the Pareto front of a search's trials (analysis.pareto on validation data), edge-of-range flags
  results    TrialResult, SearchResult, ParetoFront, load_search, the table
  summary    the files, tags and description a finished search logs on its parent run (and `report` rebuilds)
The figures are in `forgetless.platform.tracking.plots`.
"""
from __future__ import annotations

import importlib

# The names below, imported on first use: a Tune trial process (and the Train controller) imports tuning.trial, which
# must not bring in the driver side with this package (torch, MLflow: tuning/trial.py).
_WHERE = {
    "run_search": "driver",
    **dict.fromkeys(["EDGE_TAG", "PARETO_TAG", "edge_flags", "edge_of"], "front"),
    **dict.fromkeys(["OBJECTIVE", "TRIAL_EPOCH", "Objective"], "objective"),
    **dict.fromkeys(["SEARCHABLE_ROOTS", "SearchPlan", "field_path", "max_concurrent_trials", "param_space",
                     "planned_stop_points", "search_alg", "search_name", "trial_config", "validate_search"], "plan"),
    **dict.fromkeys(["SEARCH_TAG", "STATUS_TAG", "TRIAL_TAG", "with_retries"], "record"),
    **dict.fromkeys(["ParetoFront", "SearchResult", "TrialResult", "format_search_table", "load_search"], "results"),
    "log_search_summary": "summary",
}


def __getattr__(name: str):
    if name == "_search_alg":  # the name tests/test_tune.py uses
        name = "search_alg"
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)


__all__ = [
    "OBJECTIVE", "TRIAL_EPOCH", "Objective",
    "SEARCHABLE_ROOTS", "SearchPlan", "field_path", "max_concurrent_trials", "param_space", "planned_stop_points",
    "search_alg", "search_name", "trial_config", "validate_search",
    "SEARCH_TAG", "STATUS_TAG", "TRIAL_TAG", "with_retries",
    "ParetoFront", "SearchResult", "TrialResult", "format_search_table", "load_search", "log_search_summary",
    "EDGE_TAG", "PARETO_TAG", "edge_flags", "edge_of",
    "run_search",
]
