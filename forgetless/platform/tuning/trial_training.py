"""Training one trial: fine-tune from the trial's stop point through `fits.transfer` (a Ray Train run, every epoch's
objective forwarded to Tune by objective_report.ObjectiveReport), then log the trial's result on its MLflow run and
return it.

It runs in the slot's `TrialRunner` (tuning/trial_runner.py), a process of the search's driver that imports this
module once, as it starts; where the slot has no runner, in the trial's own process.
"""
from __future__ import annotations

import os
from contextlib import nullcontext
from typing import Any

from forgetless import storage
from forgetless.config import ExperimentConfig
from forgetless.platform.analysis.results import StrategyResult, Trajectory
from forgetless.platform.driver import fits, run_outputs
from forgetless.platform.driver import trainer as lean_trainer
from forgetless.platform.tracking import mlflow_runs as tracking
from forgetless.platform.tuning.objective import OBJECTIVE, TRIAL_EPOCH, Objective, tune_metrics
from forgetless.platform.tuning.plan import trial_config
from forgetless.platform.tuning.record import mark_trial, with_retries
from forgetless.platform.tuning.objective_report import ObjectiveReport, stop_requested
from forgetless.platform.worker import timing
from forgetless.search_config import STOP_POINT


def train_trial(params: dict[str, Any], context: dict[str, Any], trial_id: str, forward, host=None
                ) -> dict[str, float] | None:
    """Train one trial and log it; returns what the trial reports to Tune (None: ASHA stopped it, its last epoch
    report is its result). `forward`: the trial's TuneReportCallback; `host`: the slot's ControllerHost (the fit's
    controller runs there, as the trial's: the driver aborts it there if the trial process dies)."""
    # Relative paths in the config mean the folder `forgetless tune` ran in (Tune runs a trial in a folder of its own).
    os.chdir(context["cwd"])
    cfg = trial_config(ExperimentConfig(**context["config"]), params, trial_id)
    sp = Trajectory.from_dict(context["trajectory"]).at(params[STOP_POINT])
    objective = Objective(context["weights"], sp.source_val_acc)
    target = tracking.TrackingTarget(**context["tracking"])
    report = ObjectiveReport(objective, trial_id, context["slots"], forward, in_host=host is not None)
    try:
        with lean_trainer.controllers_in(host, owner=trial_id) if host is not None else nullcontext():
            res = fits.transfer(cfg, cfg.strategies[0], sp.uri, target, callbacks=[report])
    except Exception:
        if stop_requested(context["slots"], trial_id):
            # ASHA stopped it and its run aborted: the trial ends here, its last epoch report is its result (the
            # driver closes its MLflow run from it).
            return None
        raise
    res.compute_metrics()
    final = _final_metrics(res, objective)
    if res.mlflow_run_id:
        mark_trial(target.tracking_uri, res.mlflow_run_id, context["search_name"], trial_id, params, "finished",
                   final)
        with_retries(run_outputs.log_strategy_artifacts, cfg, res, target.tracking_uri)
    return final


def progress_uri(params: dict[str, Any], context: dict[str, Any], trial_id: str) -> str:
    """Where the trial's Ray Train run writes its progress file (worker/progress_file.py)."""
    cfg = trial_config(ExperimentConfig(**context["config"]), params, trial_id)
    return storage.join(storage.normalize(cfg.storage), fits.transfer_run_name(cfg, cfg.strategies[0]))


def _final_metrics(res: StrategyResult, objective: Objective) -> dict[str, float]:
    """A finished trial's result: the objective on validation data at its last epoch, and on the test split."""
    last = res.history[-1]  # the last evaluation of the last stage: what the per-epoch reports ended on
    # A stop point without a recorded source accuracy (θ⁰ of some trajectories): the source before training is the
    # run's own first evaluation, so every trial has a validation forgetting and can be on the front.
    before = objective.source_before if objective.source_before is not None else res.history[0]["acc"]["0"]
    val = objective.metrics(last["acc"][str(last["stage"])], last["acc"]["0"], source_before=before)
    R = res.accuracy_matrix  # test split: row 0 = the stop point before target training, last row = after
    test = objective.metrics(float(R[-1, 1:].mean()), float(R[-1, 0]), source_before=float(R[0, 0]))
    epochs = sum(p["epochs"] for p in res.phase_log if p["stage"] >= 1)
    # where the trial's Ray Train run spent its time (benchmarks/trial_cost.py compares it with a compare run's)
    seconds = {"seconds/training": res.seconds.get("training", 0.0), "seconds/fixed": timing.fixed_cost(res.seconds)}
    return {OBJECTIVE: val["objective"], TRIAL_EPOCH: epochs, "test/objective": test["objective"],
            **tune_metrics(val, "val"), **tune_metrics(test, "test"), **seconds, "search/finished": 1.0}
