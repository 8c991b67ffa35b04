"""What a search writes on its trials' MLflow runs (tags, params, metrics), from several processes at once."""
from __future__ import annotations

import math
import time
from typing import Any, Callable

from forgetless.platform.tracking import mlflow_runs as tracking
from forgetless.platform.tuning.objective import OBJECTIVE, TRIAL_EPOCH

TRIAL_TAG = "forgetless.search.trial_id"
SEARCH_TAG = "forgetless.search.name"
STATUS_TAG = "forgetless.search.status"


def with_retries(fn: Callable, *args, attempts: int = 6, **kwargs):
    """Call `fn`, retrying while the SQLite store is locked by another trial's writer.

    MLflow already sets SQLite's busy_timeout (20 s); this covers the rest (a lock held longer while several trials
    start at once), with exponential backoff. Other errors are raised at once."""
    for i in range(attempts):
        try:
            return fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - filtered just below
            transient = "database is locked" in str(e) or getattr(e, "error_code", "") == "TEMPORARILY_UNAVAILABLE"
            if not transient or i == attempts - 1:
                raise
            time.sleep(0.5 * 2**i)


def mark_trial(uri: str, run_id: str, name: str, trial_id: str, params: dict[str, Any], status: str,
               values: dict[str, float]) -> None:
    """Tag a trial's child run as part of search `name` and log its searched values and its result: one read and
    one batch write (a round trip each to a tracking server). A run marked before (a resumed search) keeps its
    params (they cannot change) and its result points (each is logged once, at step 0); its tags are updated."""
    from mlflow.entities import Metric, RunTag

    c = tracking.client(uri)
    have = with_retries(c.get_run, run_id).data
    tags = [RunTag(k, v) for k, v in {TRIAL_TAG: trial_id, SEARCH_TAG: name, STATUS_TAG: status}.items()]
    searched = tracking.new_params({f"search.{k}": v for k, v in params.items()}, have.params)
    metrics = {f"search/{k}": v for k, v in values.items()
               if isinstance(v, (int, float)) and k not in (OBJECTIVE, TRIAL_EPOCH)}
    metrics["search/objective"] = values[OBJECTIVE]
    metrics["search/trial_epochs"] = values[TRIAL_EPOCH]
    ts = int(time.time() * 1000)
    points = [Metric(k, float(v), ts, 0) for k, v in metrics.items()
              if k not in have.metrics and v is not None and not math.isnan(float(v))]
    with_retries(c.log_batch, run_id, metrics=points, params=searched, tags=tags)
