"""One trial, in its Ray Tune trial process: wait for a slot, have the trial trained (tuning/trial_runner.py: a
fine-tune from the trial's stop point through `fits.transfer`, a Ray Train run whose every epoch's objective is
forwarded to Tune), then report the trial's result to Tune.

This module is light on purpose (Ray Tune, and of forgetless nothing of the driver side: no torch, no MLflow): a trial
process imports it. The epochs' reports are forwarded by `objective_report.ObjectiveReport`, in a module of its own
that does not import Ray Tune: the run's Train controller and every one of its workers unpickle it. Each slot of a
search has a trial runner and a Train controller host its driver keeps (started once, kept for the driver's next
search): a trial asks its slot's runner to train it (or finds it training already: the driver starts a trial as Tune
adds it, early_start.py), whose fit's controller runs in the slot's host, and reports to Tune the epochs the runner
receives (`follow_in_runner`), so that no trial process imports forgetless's driver side (~5-15 s on 2 cores), no fit
starts a controller process of its own, and the run does not wait for Tune to start the trial's process. Where the
driver has none to lend (a cluster it connected to, the Ray Train seam off) the trial trains in its own process, as
before.
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Any, Iterator

import ray
from ray import tune
from ray.exceptions import GetTimeoutError, RayActorError
from ray.tune.integration.ray_train import TuneReportCallback

from forgetless.console import say
from forgetless.platform.tuning.slots import slots_actor


def run_trial(params: dict[str, Any], context: dict[str, Any]) -> None:
    """The Tune trainable: have the trial trained while holding one of the search's slots, then report its result."""
    trial_id = tune.get_context().get_trial_id()
    with holding_a_slot(context["slots"], trial_id) as (host, runner):
        if runner is not None:
            final = follow_in_runner(runner, params, context, trial_id, host)
        else:
            # deferred: forgetless's driver side (torch, MLflow), needed here only where the slot has no runner
            from forgetless.platform.tuning.trial_training import train_trial

            # made here, in this trial's Tune session: what it forwards reaches this trial
            final = train_trial(params, context, trial_id, TuneReportCallback(), host=None)
    if final is not None:  # (None: ASHA stopped it; its last epoch report is its result)
        tune.report(final)


FOLLOW_WAIT_S = 5.0  # how long one `follow` call waits in the runner for the trial's next report


def follow_in_runner(runner, params: dict[str, Any], context: dict[str, Any], trial_id: str, host
                     ) -> dict[str, float] | None:
    """Have the slot's runner train the trial (unless the search's driver started it already: early_start.py),
    and report each epoch's metrics to Tune as the runner receives them; returns the trial's result (an error the
    training raised is raised here)."""
    ray.get(runner.start.remote(params, context, trial_id, host), timeout=READY_TIMEOUT_S)
    taken = 0
    while True:
        step = ray.get(runner.follow.remote(trial_id, taken, FOLLOW_WAIT_S), timeout=FOLLOW_WAIT_S + READY_TIMEOUT_S)
        for metrics in step["reports"]:
            tune.report(metrics)
        taken += len(step["reports"])
        if step["done"]:
            return step["final"]


# How long a slot's runner and host may take to answer: a new runner imports forgetless's driver side first (the
# driver starts it with the search, so it is usually ready before the first trial asks).
READY_TIMEOUT_S = 120.0


@contextmanager
def holding_a_slot(slots: Any, trial_id: str) -> Iterator[tuple[Any, Any]]:
    """Wait for a slot of the search `slots` (its TrialSlots actor) and hold it inside the block; yields the
    slot's (controller host, trial runner) where both answer, else (None, None). The host comes as an object ref of
    its handle, to pass on to the runner (a remote call's argument arrives as the handle): this process never
    unpickles it, which would import Ray Train's controller side (slots.py)."""
    actor = slots_actor(slots)
    while not ray.get(actor.acquire.remote(trial_id)):
        time.sleep(1.0)  # until a trial before it ends (each slot's trial is bounded by its own run)
    try:
        host, runner = ray.get(actor.lent_to.remote(trial_id))
        runner = None if runner is None else ray.get(runner)  # (its class's module is light: trial_runner.py)
        yield (host, runner) if _answers(host, runner, trial_id) else (None, None)
    finally:
        ray.get(actor.release.remote(trial_id))


def _answers(host, runner, trial_id: str) -> bool:
    if host is None or runner is None:
        return False
    try:
        ray.get(runner.ready.remote(host, trial_id), timeout=READY_TIMEOUT_S)  # (the runner asks the host)
        return True
    except (RayActorError, GetTimeoutError) as e:
        say(f"the trial slot's Train controller host or trial runner did not answer in {READY_TIMEOUT_S:.0f} s "
            f"({type(e).__name__}); this trial trains in its own process")
        return False
