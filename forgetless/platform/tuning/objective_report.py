"""The Ray Train callback that forwards each epoch's objective of a trial's run to Tune (issue 31).

A module of its own, light on purpose (Ray Train's callback base, the objective, the slots actor's name lookup; no Ray
Tune, no torch, no MLflow): Ray Train V2 sends the run's whole RunConfig, its callbacks included, to every worker of
the run, so each worker imports the module of this class to unpickle it. In trial.py, which imports Ray Tune, that cost
each worker of every trial ~0.3 CPU-s while the run started (docs/tune.md, "A trial's fixed cost")."""
from __future__ import annotations

from typing import Any

import ray
from ray.train import UserCallback

from forgetless.platform.tuning.objective import OBJECTIVE, TRIAL_EPOCH, Objective, tune_metrics
from forgetless.platform.tuning.slots import slots_actor


def stop_requested(slots, trial_id: str) -> bool:
    """Has ASHA asked this trial to stop (see driver.FinishingASHA)? `slots`: the search's slots actor."""
    return ray.get(slots_actor(slots).should_stop.remote(trial_id))


class ObjectiveReport(UserCallback):
    """Forwards each epoch's report with the objective added to Tune, through `forward`: the slot runner's
    `ReportMailbox` (trial_runner.py), which the trial's process follows, or where the trial trains in its own process a
    TuneReportCallback made there, in its Tune session. The accuracy-matrix row and the final marker carry no epoch
    metrics: the trial reports its own summary after `fit` instead.

    It runs in the Ray Train controller. Once ASHA has decided to stop the trial (see driver.FinishingASHA), it aborts
    the run at the next report: the controller shuts the workers down and removes their placement group, and the
    trial function returns. (Had Tune stopped the trial itself, it would kill the trial process: the controller dies
    with it and the workers' placement group, with its CPUs, is never released, so the next trials wait forever.)
    `in_host`: the controller runs in the slot's ControllerHost, whose process outlives the run (`abort_fit`)."""

    def __init__(self, objective: Objective, trial_id: str, slots: Any, forward: Any,
                 in_host: bool = False):
        self.objective = objective
        self.trial_id = trial_id
        self.slots = slots
        self.forward = forward
        self.in_host = in_host
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
        self.forward.after_report(run_context, [out], checkpoint)
        if stop_requested(self.slots, self.trial_id):
            controller = ray.get_runtime_context().current_actor  # (not waited on: it runs in this actor's loop)
            if self.in_host:
                controller.abort_fit.remote(self.trial_id)
            else:
                controller.abort.remote()
