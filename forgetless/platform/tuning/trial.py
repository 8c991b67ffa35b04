"""One trial, run in a Ray Tune trial actor: wait for a slot, fine-tune from the trial's stop point through
`fits.transfer` (a Ray Train run), forward every epoch's objective to Tune, then report and log the trial's result.
"""
from __future__ import annotations

import os
import time
from typing import Any

import ray
from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback

from forgetless.config import ExperimentConfig
from forgetless.platform.driver import fits, run_outputs
from forgetless.platform.worker import timing
from forgetless.platform.tracking import mlflow_runs as tracking
from forgetless.platform.analysis.results import StrategyResult, Trajectory
from forgetless.platform.tuning.objective import OBJECTIVE, TRIAL_EPOCH, Objective, tune_metrics
from forgetless.platform.tuning.plan import trial_config
from forgetless.platform.tuning.record import mark_trial, with_retries
from forgetless.search_config import STOP_POINT


class TrialSlots:
    """At most `n` trials train at once (a Ray actor shared by the trials of one search).

    Tune's max_concurrent_trials only limits what the searcher suggests; trials a restored (resumed) search re-adds
    bypass it and would all start together, their Ray Train worker groups starving each other. A trial therefore
    holds a slot while it trains. The actor also carries ASHA's stop requests to the trials' Ray Train runs."""

    def __init__(self, n: int):
        self.n = n
        self.holders: set[str] = set()
        self.stopped: set[str] = set()

    def acquire(self, trial_id: str) -> bool:
        if trial_id in self.holders or len(self.holders) < self.n:
            self.holders.add(trial_id)
            return True
        return False

    def release(self, trial_id: str) -> None:
        self.holders.discard(trial_id)

    def request_stop(self, trial_id: str) -> None:
        """ASHA stopped this trial: its run aborts at its next report, then the trial frees its slot."""
        self.stopped.add(trial_id)

    def should_stop(self, trial_id: str) -> bool:
        return trial_id in self.stopped


def start_slots(name: str, n: int):
    """Start the search's TrialSlots actor. Trials and the driver's callback find it by name (a name, unlike an actor
    handle, stays valid in the callbacks a resumed search restores); the driver keeps the handle, which keeps the
    actor alive."""
    actor_name = f"forgetless-slots-{name}"
    return actor_name, ray.remote(num_cpus=0)(TrialSlots).options(name=actor_name, get_if_exists=True).remote(n)


def stop_requested(slots: str, trial_id: str) -> bool:
    """Has ASHA asked this trial to stop (see driver.FinishingASHA)?"""
    return ray.get(ray.get_actor(slots).should_stop.remote(trial_id))


class ObjectiveReport(TuneReportCallback):
    """A TuneReportCallback that forwards each epoch's report with the objective added. The accuracy-matrix row and
    the final marker carry no epoch metrics: the trial reports its own summary after `fit` instead.

    It runs in the Ray Train controller. Once ASHA has decided to stop the trial (see driver.FinishingASHA), it aborts
    the run at the next report: the controller shuts the workers down and removes their placement group, and the
    trial function returns. (Had Tune stopped the trial itself, it would kill the trial process: the controller dies
    with it and the workers' placement group, with its CPUs, is never released, so the next trials wait forever.)"""

    def __init__(self, objective: Objective, trial_id: str, slots: str):
        super().__init__()
        self.objective = objective
        self.trial_id = trial_id
        self.slots = slots
        self.epochs = 0

    def after_report(self, run_context, metrics, checkpoint):
        m = metrics[0]
        if "val/target/acc" not in m:
            return
        self.epochs += 1
        if self.objective.source_before is None:  # no recorded source accuracy of the stop point: its first report's
            self.objective.source_before = m["val/source/acc"]
        values = self.objective.metrics(m["val/target/acc"], m["val/source/acc"])
        out = {**m, OBJECTIVE: values["objective"], TRIAL_EPOCH: self.epochs, **tune_metrics(values, "val")}
        super().after_report(run_context, [out], checkpoint)
        if stop_requested(self.slots, self.trial_id):
            ray.get_runtime_context().current_actor.abort.remote()


def run_trial(params: dict[str, Any], context: dict[str, Any]) -> None:
    """The Tune trainable: train the trial while holding one of the search's slots."""
    # Tune runs a trial in its own folder; relative paths in the config mean the folder `forgetless tune` ran in.
    os.chdir(context["cwd"])
    trial_id = tune.get_context().get_trial_id()
    slots = ray.get_actor(context["slots"])
    while not ray.get(slots.acquire.remote(trial_id)):
        time.sleep(1.0)
    try:
        _train_trial(params, context, trial_id)
    finally:
        ray.get(slots.release.remote(trial_id))


def _train_trial(params: dict[str, Any], context: dict[str, Any], trial_id: str) -> None:
    cfg = trial_config(ExperimentConfig(**context["config"]), params, trial_id)
    sp = Trajectory.from_dict(context["trajectory"]).at(params[STOP_POINT])
    objective = Objective(context["weights"], sp.source_val_acc)
    target = tracking.TrackingTarget(**context["tracking"])
    try:
        res = fits.transfer(cfg, cfg.strategies[0], sp.uri, target,
                              callbacks=[ObjectiveReport(objective, trial_id, context["slots"])])
    except Exception:
        if stop_requested(context["slots"], trial_id):
            # ASHA stopped it and its run aborted: the trial ends here, its last epoch report is its result (the
            # driver closes its MLflow run from it).
            return
        raise
    res.compute_metrics()
    final = _final_metrics(res, objective)
    if res.mlflow_run_id:
        mark_trial(target.tracking_uri, res.mlflow_run_id, context["search_name"], trial_id, params, "finished",
                   final)
        with_retries(run_outputs.log_strategy_artifacts, cfg, res, target.tracking_uri)
    tune.report(final)


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
