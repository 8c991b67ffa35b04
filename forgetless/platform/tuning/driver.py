"""The search driver: validate, pre-train the source once, run one Ray Tune trial per point of the space, close the
trials that never finished, and log the summary on the search's MLflow parent run.

Trials never use `Tuner(trainer)` or `Trainer.restore`: resuming a killed search restores the *Tune* experiment, and
each unfinished trial re-runs its deterministic Ray Train run name, which resumes from that run's latest checkpoint.
"""
from __future__ import annotations

import json
import os
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import ray
from ray import tune
from ray.exceptions import GetTimeoutError, RayActorError
from ray.tune.schedulers import AsyncHyperBandScheduler, TrialScheduler

from forgetless import console, storage
from forgetless.config import ConfigError, _first_error, load_config
from forgetless.console import say
from forgetless.platform.driver import trainer as lean_trainer
from forgetless.platform.driver import fits, preflight, ray_cluster
from forgetless.platform.tracking import mlflow_runs as tracking
from forgetless.platform.analysis.results import Trajectory
# (EarlyStart: also what a search saved before early_start.py existed unpickles, as driver.EarlyStart)
from forgetless.platform.tuning.early_start import EARLY_STARTS, EarlyStart, EarlyStarts, StartsTrainingFirst
from forgetless.platform.tuning.objective import (
    OBJECTIVE,
    SELECTION_SPLIT,
    TRIAL_EPOCH,
    scalar_mode,
    scalar_weights,
)
from forgetless.platform.tuning.plan import (
    SearchPlan,
    max_concurrent_trials,
    param_space,
    search_alg,
    trial_config,
    validate_search,
)
from forgetless.platform.tuning.record import SEARCH_TAG, mark_trial, with_retries
from forgetless.platform.tuning.results import TRADE_OFF_PARAM, SearchResult, describe_trade_off, load_search
from forgetless.platform.tuning.summary import log_search_summary
from forgetless.platform.tuning.slots import close_slots, slots_actor, slots_opened, start_slots
from forgetless.platform.tuning.trial import run_trial
from forgetless.platform.tuning.trial_runner import TRIAL_RUNNERS
from forgetless.search_config import OBJECTIVE_METRICS, STOP_POINT, RangeSpec, SearchConfig

TRIAL_DRIVER_MEMORY = 64 * 2**20  # bytes Tune reserves for each trial's driver function (it only waits)


# ---------------------------------------------------------------------------------------------------------------------
# Tune's scheduler and callback (they run in the driver)


class FinishingASHA(StartsTrainingFirst, AsyncHyperBandScheduler):
    """ASHA's rungs and cutoffs, with two changes. A trial at its last epoch is never stopped: it still reports its
    test accuracy matrix and logs its artifacts (stock ASHA stops it at max_t, before that). And a trial ASHA stops is
    not killed by Tune but asked to stop: its Ray Train run aborts cleanly at its next report (see
    objective_report.ObjectiveReport), which releases the run's workers and their placement group. Trials start
    training first, as with FIFO (early_start.StartsTrainingFirst)."""

    def __init__(self, slots: str, max_t: int, grace_period: int, reduction_factor: float):
        super().__init__(slots, time_attr=TRIAL_EPOCH, max_t=max_t, grace_period=grace_period,
                         reduction_factor=reduction_factor)
        self.last_epoch = max_t

    def on_trial_result(self, tune_controller, trial, result):
        if result.get(TRIAL_EPOCH, 0) >= self.last_epoch:
            return TrialScheduler.CONTINUE
        action = super().on_trial_result(tune_controller, trial, result)
        if action == TrialScheduler.STOP:
            ray.get(slots_actor(self.slots).request_stop.remote(trial.trial_id))
            return TrialScheduler.CONTINUE
        return action


def _scheduler(plan: SearchPlan, slots: str):
    if plan.search.scheduler == "fifo":
        return StartsTrainingFirst(slots)
    a = plan.search.asha
    return FinishingASHA(slots, plan.max_t, a.grace_period, a.reduction_factor)


ABORT_TIMEOUT_S = 60.0  # how long aborting a dead trial's fit in its slot's controller host may take


def _release_slot(slots: str, trial_id: str) -> None:
    """Normally the trial frees its slot itself once its fit returned; this covers a trial process that died (Tune
    killed it, or it crashed): its fit still runs in the slot's controller host, which this driver owns, so it is
    aborted there (workers and placement group gone, the host kept for the slot's next trial) before the slot is
    free."""
    try:
        actor = slots_actor(slots)
    except ValueError:  # the search is over
        return
    host, _ = ray.get(actor.lent_to.remote(trial_id))  # (None: the trial holds no slot, or its slot has no host)
    if host is not None:
        host = ray.get(host)  # (an object ref of the handle: slots.start_slots)
        try:
            if ray.get(host.abort_fit.remote(trial_id), timeout=ABORT_TIMEOUT_S):
                say(f"trial {trial_id} ended while its Ray Train run ran: the run was aborted")
        except (RayActorError, GetTimeoutError) as e:
            say(f"trial {trial_id}: its Ray Train run could not be aborted in its slot's controller process "
                f"({type(e).__name__}); the slot's next trial starts a controller of its own")
    actor.release.remote(trial_id)


class Progress(tune.Callback):
    """One status line per trial that ends; frees the slot of a trial whose process died, and on this driver's
    embedded cluster the placement group its Train run held (lean_trainer.remove_groups_of_dead_processes)."""

    def __init__(self, slots: str, shown: list[str]):
        self.slots = slots  # name of the search's TrialSlots actor
        self.shown = shown  # the result keys each trial's line shows (the objective, or a Pareto search's metrics)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._free(trial)
        r = trial.last_result or {}
        done = "finished" if r.get("search/finished") else f"stopped early after {r.get(TRIAL_EPOCH, '?')} epochs"
        shown = ", ".join(f"{k}={v}" for k, v in trial.config.items())
        # (a search started before `shown` existed restores a Progress without it)
        values = ", ".join(f"{k} {r.get(k, float('nan')):.4f}" for k in getattr(self, "shown", [OBJECTIVE]))
        say(f"trial {trial.trial_id} ({shown}) {done}: {values}")

    def on_trial_error(self, iteration, trials, trial, **info):
        self._free(trial)
        say(f"trial {trial.trial_id} failed: see {trial.local_path or trial.path}")

    def _free(self, trial) -> None:
        _release_slot(self.slots, trial.trial_id)
        if ray_cluster.on_embedded_cluster():  # (elsewhere Ray Train's PlacementGroupCleaner does it)
            lean_trainer.remove_groups_of_dead_processes()


# ---------------------------------------------------------------------------------------------------------------------
# the MLflow parent run


def _parent_run(uri: str, exp_id: str, name: str, resume: bool) -> str:
    c = tracking.client(uri)
    if resume:
        runs = c.search_runs([exp_id], filter_string=f"tags.`{SEARCH_TAG}` = '{name}' and tags.`forgetless.command` = "
                                                     f"'tune'", max_results=1, order_by=["attributes.start_time DESC"])
        if runs:
            c.update_run(runs[0].info.run_id, status="RUNNING")
            return runs[0].info.run_id
    return tracking.start_parent_run(uri, exp_id, f"{name} (tune)", {
        "forgetless.command": "tune", SEARCH_TAG: name, "forgetless.name": name.rsplit("-search-", 1)[0]})


def _log_search_definition(uri: str, parent: str, plan: SearchPlan) -> None:
    s = plan.search
    params = {"search.name": plan.name, "search.searcher": s.searcher, "search.scheduler": s.scheduler,
              "search.objective": s.describe_objective(), "search.num_samples": s.num_samples,
              TRADE_OFF_PARAM: describe_trade_off(s.trade_off()),
              "search.strategy": plan.cfg.strategies[0].display_name(), "search.stop_points": plan.stop_points,
              **{f"search.space.{k}": (v.model_dump() if isinstance(v, RangeSpec) else v) for k, v in s.space.items()}}
    if s.scheduler == "asha":
        params.update({"search.asha.grace_period": s.asha.grace_period,
                       "search.asha.reduction_factor": s.asha.reduction_factor, "search.asha.max_t": plan.max_t})
    with_retries(tracking.log_params, uri, parent, params)
    with_retries(tracking.log_params, uri, parent, tracking.flatten("", plan.cfg.model_dump(mode="json")))
    with tempfile.TemporaryDirectory() as d:
        Path(d, "search.json").write_text(json.dumps({
            "name": plan.name, "search": s.model_dump(mode="json"), "stop_points": plan.stop_points,
            "objective": s.describe_objective(), "pareto_on": s.trade_off(),
            "objective_metrics": {k: OBJECTIVE_METRICS[k] for k, _ in s.trade_off()} | {
                k: OBJECTIVE_METRICS[k] for k in s.weights()},
        }, indent=1))
        with_retries(tracking.client(uri).log_artifact, parent, str(Path(d, "search.json")))


def _pretrain(plan: SearchPlan, target: tracking.TrackingTarget) -> Trajectory:
    """Pre-train the source once (or reuse it); log the stop points' source accuracy on the parent run."""
    uri, parent = target.tracking_uri, target.parent_run_id
    traj = fits.pretrain(plan.cfg, target)
    missing = [e for e in plan.stop_points if e not in {s.epoch for s in traj.stop_points}]
    if missing:
        raise ConfigError(f"search.space.{STOP_POINT}: the trajectory {traj.uri} has no stop point at epoch(s) "
                          f"{missing}; it has {[s.epoch for s in traj.stop_points]}")
    c = tracking.client(uri)
    with_retries(c.set_tag, parent, "forgetless.pretrain_run", traj.run_name)
    for sp in traj.stop_points:
        if sp.source_val_acc is not None:
            with_retries(tracking.log_metrics, uri, parent, {"trajectory/source_acc": sp.source_val_acc},
                         step=sp.epoch)
    return traj


# ---------------------------------------------------------------------------------------------------------------------
# the Tune experiment


@dataclass
class _Search:
    """What the driver's steps share once the search's parent run exists."""

    plan: SearchPlan
    target: tracking.TrackingTarget
    root: str  # the storage root: Tune experiments and Ray Train runs live under it
    slots: str  # name of the search's TrialSlots actor
    concurrency: int  # trials at once
    lent: bool  # the slots have this driver's trial runners and controller hosts


def _trial_context(s: _Search, traj: Trajectory) -> dict[str, Any]:
    """What every trial of the search is trained with, besides its own parameters (trial_training.train_trial)."""
    return {"config": s.plan.cfg.model_copy(update={"storage": s.root}).model_dump(mode="json"),
            "trajectory": traj.to_dict(), "tracking": s.target.to_dict(), "weights": scalar_weights(s.plan.search),
            "search_name": s.plan.name, "cwd": os.getcwd(), "slots": slots_actor(s.slots)}  # (the handle)


def _trainable(context: dict[str, Any]):
    # The trial function itself only waits on its Ray Train run, so it asks for no CPU (a CPU per trial would
    # starve the run's own workers); Tune needs some resource per trial, so it reserves a little memory. The
    # workers hold the CPUs/GPUs, and max_concurrent_trials keeps the started trials within what the cluster fits.
    return tune.with_resources(tune.with_parameters(run_trial, context=context),
                               {"cpu": 0, "memory": TRIAL_DRIVER_MEMORY})


def _progress(s: _Search) -> Progress:
    search = s.plan.search
    shown = [OBJECTIVE] if search.objectives is None else [f"{SELECTION_SPLIT}/{o.metric}" for o in search.objectives]
    return Progress(s.slots, shown)


def _new_tuner(s: _Search, trainable, callbacks: list[tune.Callback]) -> tune.Tuner:
    search = s.plan.search
    # A Pareto search gives its metrics to the searcher itself (Tune's metric/mode take one metric); a grid or random
    # search of several objectives optimises nothing, and the front is computed from MLflow afterwards.
    metric, mode = (OBJECTIVE, scalar_mode(search)) if search.objectives is None else (None, None)
    return tune.Tuner(
        trainable, param_space=param_space(s.plan),
        tune_config=tune.TuneConfig(metric=metric, mode=mode, search_alg=search_alg(search, s.concurrency),
                                    scheduler=_scheduler(s.plan, s.slots), num_samples=search.num_samples,
                                    # (a ConcurrencyLimiter for Optuna; the grid/random generator
                                    # already has its own limit)
                                    max_concurrent_trials=s.concurrency if search.searcher == "optuna" else None,
                                    # a finished trial's process serves the next trial (Tune resets it): no process
                                    # start and Ray Tune import per trial
                                    reuse_actors=True),
        run_config=tune.RunConfig(name=s.plan.name, storage_path=s.root, verbose=0,
                                  callbacks=[_progress(s), *callbacks],
                                  failure_config=tune.FailureConfig(max_failures=0)),
    )


@contextmanager
def _tune_environment(concurrency: int) -> Iterator[None]:
    """Variables Tune reads when fit() starts; set only for this fit, unless the user set them.

    TUNE_MAX_PENDING_TRIALS_PG: trials reserve no CPU, so Tune would stage every pending trial at once and start them
    in whatever order their placement groups come up; staging only as many as can run keeps the searcher's order (a
    grid runs in grid order, ASHA's rungs fill in that order).
    RAY_AIR_NEW_OUTPUT=0 (unless `forgetless --verbose`): Tune's newer console output prints an experiment box, the
    results folder and a TensorBoard hint to stdout as a search starts whatever `verbose=0` says; its older one is
    silent at verbose=0. forgetless prints its own status lines, and stdout is for the result."""
    env = {"TUNE_MAX_PENDING_TRIALS_PG": str(concurrency)}
    if not console.verbose():
        env[TUNE_NEW_OUTPUT_VARIABLE] = "0"
    with ray_cluster.temporary_environment({k: v for k, v in env.items() if k not in os.environ}):  # a user's value wins
        yield


TUNE_NEW_OUTPUT_VARIABLE = "RAY_AIR_NEW_OUTPUT"


def _run_name(plan: SearchPlan, params: dict[str, Any], trial_id: str) -> str:
    cfg = trial_config(plan.cfg, params, trial_id)
    return fits.transfer_run_name(cfg, cfg.strategies[0])


def _finalize_unfinished(grid, plan: SearchPlan, target: tracking.TrackingTarget) -> None:
    """Trials ASHA stopped (or that failed) never reached their own summary: close their MLflow child runs here."""
    uri = target.tracking_uri
    for r in grid:
        m = r.metrics or {}
        if m.get("search/finished"):
            continue
        params, trial_id = dict(r.config), m.get("trial_id")
        if trial_id is None:
            continue  # it never reported, so it never got as far as an MLflow run
        run_id = tracking.find_unfinished_run(uri, target.experiment_id, _run_name(plan, params, trial_id))
        if run_id is None:
            continue
        status = "error" if r.error else "stopped_early"
        values = {OBJECTIVE: m.get(OBJECTIVE, float("nan")), TRIAL_EPOCH: m.get(TRIAL_EPOCH, 0)}
        values.update({k: v for k, v in m.items() if k.startswith("val/")})
        mark_trial(uri, run_id, plan.name, trial_id, params, status, values)
        with_retries(tracking.client(uri).set_terminated, run_id, "FAILED" if r.error else "KILLED")


def _run(s: _Search, restore_path: str | None, t0: float) -> SearchResult:
    """Everything after the parent run exists: the definition, pre-training, the trials, the summary."""
    uri, parent = s.target.tracking_uri, s.target.parent_run_id
    _log_search_definition(uri, parent, s.plan)
    traj = _pretrain(s.plan, s.target)
    context = _trial_context(s, traj)
    trainable = _trainable(context)
    if restore_path:
        say(f"resuming search {s.plan.name} from {restore_path}: finished trials are kept, unfinished ones continue "
            f"from their last checkpoint")
        tuner = tune.Tuner.restore(restore_path, trainable, resume_unfinished=True, resume_errored=True)
    else:
        tuner = _new_tuner(s, trainable, [EarlyStart(s.slots)] if s.lent else [])
        if s.lent:
            EARLY_STARTS[s.slots] = EarlyStarts(s.slots, context)
    slots_opened(s.slots)
    t_tune = time.perf_counter()
    try:
        with _tune_environment(s.concurrency):
            grid = tuner.fit()
    finally:
        EARLY_STARTS.pop(s.slots, None)
    tune_seconds = time.perf_counter() - t_tune
    _finalize_unfinished(grid, s.plan, s.target)
    out = load_search(uri, parent)
    out.trajectory = traj
    out.wall_seconds, out.tune_seconds = time.perf_counter() - t0, tune_seconds
    if out.best is None:
        errors = [str(r.error) for r in grid if r.error]
        raise RuntimeError(f"search {s.plan.name}: no trial finished" + (f"; first error: {errors[0]}" if errors else ""))
    log_search_summary(out)
    return out


# ---------------------------------------------------------------------------------------------------------------------
# the entry point


def _search_config(search: SearchConfig | dict | None) -> SearchConfig | None:
    if not isinstance(search, dict):
        return search
    try:
        return SearchConfig(**search)
    except Exception as e:  # pydantic's ValidationError, reworded like every config error
        raise ConfigError(f"search: {_first_error(e)}") from None


def run_search(config, search: SearchConfig | dict | None = None, resume: bool = False,
               overrides: list[str] | None = None) -> SearchResult:
    """Validate, pre-train once, run the Tune search, log the summary on the MLflow parent run."""
    cfg = load_config(config, overrides)
    plan = validate_search(cfg, _search_config(search))
    uri = preflight.preflight(plan.cfg)
    root = storage.normalize(cfg.storage)
    tune_path = storage.join(root, plan.name)
    exists = tune.Tuner.can_restore(tune_path)
    if exists and not resume:
        raise ConfigError(f"search {plan.name} already ran (Tune experiment {tune_path}); pass --resume "
                          f"(resume=True) to finish or reload it, or delete that folder to start over")
    ray_cluster.ensure_ray(plan.cfg)
    ray_cluster.check_resources(plan.cfg)
    concurrency = max_concurrent_trials(plan.cfg, plan.search, ray.cluster_resources())
    # Each trial slot gets a Train controller host and a trial runner of this driver's (trial.py): a trial is trained
    # in a process that has imported forgetless already, its fit's controller in a process already started
    # (docs/tune.md, "A trial's fixed cost")
    hosts, runners = _lend(concurrency)
    # the handle keeps the actor alive until we return
    slots, _ = start_slots(plan.name, concurrency, [(h, r) for (_, h), (_, r) in zip(hosts, runners)])
    exp_id = tracking.ensure_experiment(uri, cfg.tracking.experiment)
    parent = _parent_run(uri, exp_id, plan.name, resume)
    target = tracking.TrackingTarget(uri, exp_id, parent)
    say(f"search {plan.name}: MLflow parent run {parent} in {uri}; up to {concurrency} trial(s) at once")
    t0 = time.perf_counter()
    try:
        out = _run(_Search(plan, target, root, slots, concurrency, lent=bool(runners)), tune_path if exists else None,
                   t0)
        tracking.client(uri).set_terminated(parent, "FINISHED")
        return out
    except BaseException as e:
        tracking.client(uri).set_terminated(parent, tracking.end_status(e))
        raise
    finally:  # kept for this process's next run() / compare() / tune()
        close_slots(slots)
        lean_trainer.CONTROLLER_HOSTS.take_back(hosts)
        TRIAL_RUNNERS.take_back(runners)


def _lend(n: int) -> tuple[list, list]:
    """`n` of this driver's Train controller hosts and trial runners for the trial slots, where its own fits use
    hosts (it started the embedded cluster, the Ray Train seam is on); none elsewhere (each trial then trains in its
    own process and its fit starts its own controller, as Ray Train does)."""
    if ray_cluster.started_embedded_cluster() and lean_trainer.replaceable():
        return lean_trainer.CONTROLLER_HOSTS.lend(n), TRIAL_RUNNERS.lend(n)
    return [], []
