"""Ray Tune searches over pre-training stop points, learning rates and any searchable config field.

The flow: validate the search (before Ray starts) -> pre-train the source once (`fits.pretrain` reuses an identical
trajectory) -> one Ray Tune trial per point of the space. A trial is a plain function that builds and fits a Ray Train
`TorchTrainer` through `fits.transfer` (DeepSpeed in every worker, init weights = the trial's stop point) and forwards
every epoch's metrics to Tune with a `TuneReportCallback`, so ASHA can stop poor trials early.

MLflow: one parent run per search (space, objective, result table, plots); each trial's rank 0 creates its child run.

One concept a module:
  plan       validation, each trial's config, the Tune search space and searcher (no Ray needed to validate)
  objective  the weighted objective and its metrics
  record     the MLflow tags and metrics of a search's trials, and retries for concurrent SQLite writers
  trial      the slot actor, the Ray Train report callback and the trial function
  driver     run_search: scheduler, progress callback, parent run, unfinished trials
  front      the Pareto front of a search's trials (analysis.pareto on validation data), edge-of-range flags
  results    TrialResult, SearchResult, ParetoFront, load_search, the table
  summary    the files, tags and description a finished search logs on its parent run (and `report` rebuilds)
The figures are in `forgetless.platform.tracking.plots`.
"""
from __future__ import annotations

from forgetless.platform.tuning.driver import run_search
from forgetless.platform.tuning.front import EDGE_TAG, PARETO_TAG, edge_flags, edge_of
from forgetless.platform.tuning.objective import OBJECTIVE, TRIAL_EPOCH, Objective
from forgetless.platform.tuning.plan import (
    SEARCHABLE_ROOTS,
    SearchPlan,
    field_path,
    max_concurrent_trials,
    param_space,
    planned_stop_points,
    search_alg,
    search_name,
    trial_config,
    validate_search,
)
from forgetless.platform.tuning.record import SEARCH_TAG, STATUS_TAG, TRIAL_TAG, with_retries
from forgetless.platform.tuning.results import (
    ParetoFront,
    SearchResult,
    TrialResult,
    format_search_table,
    load_search,
)
from forgetless.platform.tuning.summary import log_search_summary

_search_alg = search_alg  # the name tests/test_tune.py uses

__all__ = [
    "OBJECTIVE", "TRIAL_EPOCH", "Objective",
    "SEARCHABLE_ROOTS", "SearchPlan", "field_path", "max_concurrent_trials", "param_space", "planned_stop_points",
    "search_alg", "search_name", "trial_config", "validate_search",
    "SEARCH_TAG", "STATUS_TAG", "TRIAL_TAG", "with_retries",
    "ParetoFront", "SearchResult", "TrialResult", "format_search_table", "load_search", "log_search_summary",
    "EDGE_TAG", "PARETO_TAG", "edge_flags", "edge_of",
    "run_search",
]
