"""A search's trials train before Tune starts their processes (the search's driver starts them: the early starts).

Where the search's driver lent its slots trial runners (tuning/trial_runner.py), a trial's training does not wait for
its Tune process: the driver starts it in a free slot's runner as Tune adds the trial (`StartsTrainingFirst`, the
search's Tune scheduler: `on_trial_add` runs before Tune asks for the trial's process), and the trial's process, once
Tune has started it, follows the training under way (trial.follow_in_runner). `EarlyStart`, a Tune callback, starts
the pending trials that found no free slot as they were added, once one is free.

The first trials of a search also keep their process waiting until their run is past its start-up: its first epoch
has ended (its progress file says so) or its training has ended, for at most HOLD_MAX_S. A trial's process is a fresh
Ray worker that imports Ray Tune (~1.4 CPU-s) and only relays what the run reports; started beside the run's own
fresh worker processes, it slowed their start-up by ~1 s on 2 cores, the CPU-bound part of a run (docs/tune.md, "A
trial's fixed cost"). Held, the trial is PAUSED in Tune (as Tune's HyperBand pauses trials), and the scheduler hands it
back (`choose_trial_to_run`) when its run is past its start-up: its epoch reports wait in the runner meanwhile, and
reach Tune (and ASHA) when the process follows. Trials added after a trial of the search has ended are not held: the
ended trial's process serves them (reuse_actors), and Tune would end that process while no trial is pending for it.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import ray
from ray import tune
from ray.exceptions import RayError
from ray.tune.experiment import Trial
from ray.tune.schedulers import FIFOScheduler

from forgetless.platform.tuning.slots import slots_actor

HOLD_MAX_S = 30.0  # the longest a trial's process waits for its run (Tune warns when no trial runs for 60 s)
PAST_STARTUP_ASK_S = 2.0  # how long one `past_startup` call waits in the runner
HELD_WAIT_S = 0.1  # how long the scheduler waits for a held trial's run when nothing else is live (Tune's loop step)


@dataclass
class _Held:
    trial: Trial
    runner: Any  # the slot's TrialRunner (actor handle)
    since: float  # time.monotonic() when held
    started: Any  # the ref of the runner's `start` call
    asking: Any = None  # the outstanding runner.past_startup call (an object ref), if any


class EarlyStarts:
    """The early starts of one search its driver runs now, and the trials they hold (`EARLY_STARTS`)."""

    def __init__(self, slots: str, context: dict[str, Any]):
        self.slots = slots  # name of the search's TrialSlots actor
        self.context = context  # the search's trial context (driver._trial_context)
        self.started: set[str] = set()
        self.held: dict[str, _Held] = {}
        self.hold_new = True  # until a trial of the search ends (its process then serves the next ones)

    def start(self, trial: Trial) -> tuple[bool, Any]:
        """Start the trial's training in a free slot's runner. (False, None): no slot is free (the next step tries
        again); (True, (runner, the ref of its `start` call)): started; (True, None): the slot has no runner (the
        trial's own process trains it)."""
        actor = slots_actor(self.slots)
        if not ray.get(actor.acquire.remote(trial.trial_id)):
            return False, None
        self.started.add(trial.trial_id)
        host, runner = ray.get(actor.lent_to.remote(trial.trial_id))  # (object refs of the handles)
        if runner is None:
            return True, None
        runner = ray.get(runner)
        started = runner.start.remote(dict(trial.config), self.context, trial.trial_id, host)  # not waited on
        return True, (runner, started)

    def hold(self, trial: Trial, runner, started) -> None:
        trial.set_status(Trial.PAUSED)
        self.held[trial.trial_id] = _Held(trial, runner, time.monotonic(), started)

    def release_one(self, wait_s: float) -> Trial | None:
        """A held trial whose run is past its start-up (or that was held HOLD_MAX_S), no longer held; None if none
        is, after waiting up to `wait_s` for one. A runner that fails to answer releases its trial (its process
        then finds out)."""
        for h in self.held.values():
            if h.asking is None:
                h.asking = h.runner.past_startup.remote(h.trial.trial_id, PAST_STARTUP_ASK_S, h.started)
        answered, _ = ray.wait([h.asking for h in self.held.values()], num_returns=1, timeout=wait_s)
        for trial_id, h in self.held.items():
            past = time.monotonic() - h.since > HOLD_MAX_S
            if h.asking in answered:
                try:
                    past = ray.get(h.asking) or past
                except RayError:
                    past = True
                h.asking = None
            if past:
                del self.held[trial_id]
                return h.trial
        return None


# The early starts of each search this driver runs now whose slots were lent runners, by the name of its slots actor
# (driver._run registers them; a scheduler or callback Tune restores from a killed search's state finds none there,
# and starts and holds nothing).
EARLY_STARTS: dict[str, EarlyStarts] = {}


class StartsTrainingFirst(FIFOScheduler):
    """FIFO scheduling, with the search's early starts: a trial Tune adds starts training in a free slot's runner at
    once, and while no trial of the search has ended it is held (PAUSED) until its run is past its start-up. The
    search's ASHA scheduler (driver.FinishingASHA) extends it too."""

    def __init__(self, slots: str, **kwargs):
        super().__init__(**kwargs)
        self.slots = slots  # name of the search's TrialSlots actor

    def on_trial_add(self, tune_controller, trial: Trial) -> None:
        super().on_trial_add(tune_controller, trial)
        starts = EARLY_STARTS.get(self.slots)
        if starts is None or trial.status != Trial.PENDING or trial.trial_id in starts.started:
            return
        _, in_runner = starts.start(trial)
        if in_runner is not None and starts.hold_new:
            starts.hold(trial, *in_runner)

    def on_trial_complete(self, tune_controller, trial: Trial, result: dict) -> None:
        super().on_trial_complete(tune_controller, trial, result)
        self._a_trial_ended()

    def on_trial_error(self, tune_controller, trial: Trial) -> None:
        super().on_trial_error(tune_controller, trial)
        self._a_trial_ended()

    def on_trial_remove(self, tune_controller, trial: Trial) -> None:
        super().on_trial_remove(tune_controller, trial)
        self._a_trial_ended()

    def _a_trial_ended(self) -> None:
        starts = EARLY_STARTS.get(self.slots)
        if starts is not None:
            starts.hold_new = False

    def choose_trial_to_run(self, tune_controller) -> Trial | None:
        """A held trial whose run is past its start-up first; else FIFO's choice among the others."""
        starts = EARLY_STARTS.get(self.slots)
        held = starts.held if starts is not None else {}
        trials = tune_controller.get_trials()
        if held:
            # Only held trials live: Tune's loop has no event to wait on and would spin, so the wait is here.
            only_held = all(t.trial_id in held for t in trials if t.status in (Trial.PENDING, Trial.RUNNING,
                                                                                Trial.PAUSED))
            released = starts.release_one(HELD_WAIT_S if only_held else 0.0)
            if released is not None:
                return released
        for status in (Trial.PENDING, Trial.PAUSED):
            for trial in trials:
                if trial.status == status and trial.trial_id not in held:
                    return trial
        return None


class EarlyStart(tune.Callback):
    """Starts the pending trials the scheduler could not start as Tune added them (every slot was taken), once a
    slot is free: not held, since Tune has asked for their processes already. A trial that finds no free slot here
    waits for one in its own process, as before. Trials never wait for each other on this: Tune has at most as many
    trials pending as the search has slots (max_concurrent_trials), and a restored search's trials, which bypass
    that limit, all get a process of their own."""

    def __init__(self, slots: str):
        self.slots = slots  # name of the search's TrialSlots actor

    def on_step_begin(self, iteration, trials, **info):
        starts = EARLY_STARTS.get(self.slots)
        if starts is None:
            return
        for trial in trials:
            if trial.status == Trial.PENDING and trial.trial_id not in starts.started:
                if not starts.start(trial)[0]:
                    return  # every slot is taken: the next step tries again
