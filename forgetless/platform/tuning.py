"""Ray Tune searches over pre-training stop points, learning rates and any searchable config field.

The flow: validate the search (before Ray starts) -> pre-train the source once (`runner.pretrain` reuses an identical
trajectory) -> one Ray Tune trial per point of the space. A trial is a plain function that builds and fits a Ray Train
`TorchTrainer` through `runner.transfer` (DeepSpeed in every worker, init weights = the trial's stop point) and forwards
every epoch's metrics to Tune with a `TuneReportCallback`, so ASHA can stop poor trials early. Trials never use
`Tuner(trainer)` or `Trainer.restore`: resuming a killed search restores the *Tune* experiment, and each unfinished
trial re-runs its deterministic Ray Train run name, which resumes from that run's latest checkpoint.

MLflow: one parent run per search (space, objective, result table, plots); each trial's rank 0 creates its child run.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from forgetless import storage
from forgetless.config import (
    ConfigError,
    ExperimentConfig,
    load_config,
    select_strategy,
)
from forgetless.console import say
from forgetless.hashing import short_hash
from forgetless.platform import tracking
from forgetless.platform.results import Trajectory
from forgetless.search_config import (
    OBJECTIVE_METRICS,
    STOP_POINT,
    RangeSpec,
    SearchConfig,
)

OBJECTIVE = "objective"  # the Tune metric every trial reports (per epoch, on validation data)
TRIAL_EPOCH = "trial_epoch"  # ASHA's time attribute: epochs this trial has trained
LR_KEY = "train.lr"
# Fields a trial may change. Everything that shapes pre-training (source, backbone, pretrain, seed) is shared by all
# trials, and scaling decides how many trials fit at once, so those are not searchable.
SEARCHABLE_ROOTS = ("train", "strategy", "targets", "deepspeed", "evaluation")
TRIAL_DRIVER_MEMORY = 64 * 2**20  # bytes Tune reserves for each trial's driver function (it only waits)
TRIAL_TAG = "forgetless.search.trial_id"
SEARCH_TAG = "forgetless.search.name"
STATUS_TAG = "forgetless.search.status"


# ---------------------------------------------------------------------------------------------------------------------
# validation (no Ray needed)


@dataclass
class SearchPlan:
    """A validated search: the experiment narrowed to the trials' strategy, and the stop points to search."""

    name: str
    cfg: ExperimentConfig  # one strategy, `search` removed: the base every trial's config derives from
    search: SearchConfig
    stop_points: list[int]

    @property
    def max_t(self) -> int:
        return self.search.asha.max_t or self.cfg.train.epochs


def planned_stop_points(cfg: ExperimentConfig) -> list[int]:
    """The epochs pre-training saves as stop points: θ⁰, every `checkpoint_every` epochs, and the last."""
    p = cfg.pretrain
    return sorted({0, p.epochs, *range(p.checkpoint_every, p.epochs + 1, p.checkpoint_every)})


def field_path(key: str) -> str:
    """`strategy.<param>` is shorthand for the (single) strategy's params; other keys are config paths."""
    root, _, rest = key.partition(".")
    return f"strategies.0.params.{rest}" if root == "strategy" else key


def _check_field(base: ExperimentConfig, key: str) -> None:
    root, _, rest = key.partition(".")
    data = base.model_dump(mode="json")
    if root not in SEARCHABLE_ROOTS:
        hint = ""
        if key in data.get("train", {}):
            hint = f" (did you mean train.{key}?)"
        elif root in data:
            hint = (f" ({root} is shared by every trial: it shapes pre-training or decides how many trials fit, so it "
                    f"cannot vary within one search)")
        raise ConfigError(f"search.space: {key!r} is not a searchable field{hint}; search {STOP_POINT} and fields "
                          f"under {', '.join(SEARCHABLE_ROOTS)} (e.g. train.lr, strategy.<param>)")
    if root == "strategy":
        from forgetless.strategies import get_strategy_class

        s = base.strategies[0]
        known = sorted(get_strategy_class(s.name).Config.model_fields)
        if rest not in known:
            raise ConfigError(f"search.space: {key!r}: strategy {s.name!r} has no parameter {rest!r}; its parameters: "
                              f"{known or 'none'}")
        return
    node: Any = data
    walked = []
    for part in key.split("."):
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(f"search.space: {key!r}: {'.'.join(walked)} has {len(node)} entries; {part!r} is "
                                  f"not an index of it")
            node = node[int(part)]
        elif isinstance(node, dict) and part in node:
            node = node[part]
        else:
            where = ".".join(walked) or "the config"
            fields = sorted(node) if isinstance(node, dict) else []
            raise ConfigError(f"search.space: {key!r} is not a config field: {where} has no {part!r}; its fields: "
                              f"{fields}")
        walked.append(part)
    if isinstance(node, (dict, list)):
        raise ConfigError(f"search.space: {key!r} is a whole section; search its fields (e.g. {key}.<field>)")


def _candidates(dim: list[Any] | RangeSpec) -> list[Any]:
    if isinstance(dim, RangeSpec):
        return [int(dim.low), int(dim.high)] if dim.integer else [dim.low, dim.high]
    return list(dim)


def validate_search(cfg: ExperimentConfig, search: SearchConfig | None = None) -> SearchPlan:
    """Every check that can run before Ray starts; raises ConfigError naming the field and the fix."""
    search = search or cfg.search
    if search is None:
        raise ConfigError("search: the config has no `search:` section; add one (see docs/tune.md) or pass "
                          "search=... to forgetless.tune")
    base = select_strategy(cfg, search.strategy).model_copy(update={"search": None})
    planned = planned_stop_points(cfg)
    dim = search.space.get(STOP_POINT, "all")
    if dim == "all":
        stop_points = planned
    else:
        missing = [e for e in dim if e not in planned]
        if missing:
            raise ConfigError(
                f"search.space.{STOP_POINT}: no stop point at epoch {missing[0]}; pre-training "
                f"(pretrain.epochs={cfg.pretrain.epochs}, pretrain.checkpoint_every={cfg.pretrain.checkpoint_every}) "
                f"saves epochs {planned}; pick from those or change the pretrain schedule")
        stop_points = sorted(set(dim))
    for key, d in search.space.items():
        if key == STOP_POINT:
            continue
        _check_field(base, key)
        for value in _candidates(d):
            try:
                trial_config(base, {key: value, STOP_POINT: stop_points[0]}, "check")
            except ConfigError as e:
                raise ConfigError(f"search.space.{key}: value {value!r} is not valid: {e}") from None
    max_t = search.asha.max_t or base.train.epochs
    if search.scheduler == "asha" and search.asha.grace_period >= max_t:
        raise ConfigError(f"search.asha.grace_period ({search.asha.grace_period}) must be smaller than a trial's "
                          f"epochs ({max_t}), or ASHA can never stop a trial early; lower it or raise train.epochs")
    return SearchPlan(search_name(base, search), base, search, stop_points)


def search_name(base: ExperimentConfig, search: SearchConfig) -> str:
    """Deterministic: the same experiment and search give the same name (and so the same Tune experiment folder)."""
    relevant = {"experiment": base.model_dump(mode="json", exclude={"tracking", "ray_address", "storage"}),
                "search": search.model_dump(mode="json")}
    return f"{base.name}-search-{short_hash(relevant)}"


def trial_config(base: ExperimentConfig, params: dict[str, Any], trial_id: str) -> ExperimentConfig:
    """The experiment config of one trial: the base with the trial's values; the strategy label names the trial (it
    becomes the MLflow child run's name and, through it, the trial's deterministic Ray Train run name)."""
    overrides = [f"{field_path(k)}={json.dumps(v)}" for k, v in params.items() if k != STOP_POINT]
    cfg = load_config(base, overrides) if overrides else base
    s = cfg.strategies[0]
    label = f"{s.display_name()}-sp{params[STOP_POINT]}-{trial_id}"
    return cfg.with_strategies([s.model_copy(update={"label": label})])


def max_concurrent_trials(cfg: ExperimentConfig, search: SearchConfig, resources: dict[str, float]) -> int:
    """How many trials run at once: what the cluster fits (workers x CPUs/GPUs per trial), or the user's lower cap."""
    sc = cfg.scaling
    need_cpu = sc.num_workers * sc.cpus_per_worker
    fits = int(resources.get("CPU", 0) // need_cpu)
    if sc.use_gpu:
        fits = min(fits, int(resources.get("GPU", 0) // sc.num_workers))
    what = f"{sc.num_workers} workers x {sc.cpus_per_worker:g} CPU{' + 1 GPU' if sc.use_gpu else ''}"
    have = f"{resources.get('CPU', 0):g} CPUs" + (f" and {resources.get('GPU', 0):g} GPUs" if sc.use_gpu else "")
    if fits < 1:
        raise ConfigError(f"scaling: one trial needs {what} but the Ray cluster has {have}; lower scaling.num_workers "
                          f"or scaling.cpus_per_worker")
    if search.max_concurrent_trials is not None and search.max_concurrent_trials > fits:
        raise ConfigError(f"search.max_concurrent_trials: {search.max_concurrent_trials} trials of {what} each do not "
                          f"fit the Ray cluster ({have}); at most {fits} fit at once: lower it to {fits} or leave it "
                          f"unset")
    return search.max_concurrent_trials or fits


# ---------------------------------------------------------------------------------------------------------------------
# the objective


@dataclass
class Objective:
    """A weighted sum of accuracy metrics; `source_before` is the source accuracy of the trial's stop point."""

    weights: dict[str, float]
    source_before: float | None

    def metrics(self, target_acc: float, source_acc: float, source_before: float | None = None) -> dict[str, float]:
        before = self.source_before if source_before is None else source_before
        values = {
            "target/acc": target_acc,
            "source/acc": source_acc,
            "source/retention": source_acc / before if before else float("nan"),
            "forgetting": before - source_acc if before is not None else float("nan"),
        }
        values["objective"] = sum(w * values[m] for m, w in self.weights.items())
        return values


def _tune_metrics(values: dict[str, float], prefix: str) -> dict[str, float]:
    return {f"{prefix}/{k}": v for k, v in values.items() if k != "objective"}


def _make_report_callback(objective: Objective, trial_id: str, slots: str):
    """A TuneReportCallback that forwards each epoch's report with the objective added. The accuracy-matrix row and
    the final marker carry no epoch metrics: the trial reports its own summary after `fit` instead.

    It runs in the Ray Train controller. Once ASHA has decided to stop the trial (see `_scheduler`), it aborts the
    run at the next report: the controller shuts the workers down and removes their placement group, and the trial
    function returns. (Had Tune stopped the trial itself, it would kill the trial process: the controller dies with
    it and the workers' placement group, with its CPUs, is never released, so the next trials wait forever.)"""
    from ray.tune.integration.ray_train import TuneReportCallback

    class ObjectiveReport(TuneReportCallback):
        def __init__(self):
            super().__init__()
            self.epochs = 0

        def after_report(self, run_context, metrics, checkpoint):
            import ray

            m = metrics[0]
            if "target/acc" not in m:
                return
            self.epochs += 1
            values = objective.metrics(m["target/acc"], m["source/acc"])
            out = {**m, OBJECTIVE: values["objective"], TRIAL_EPOCH: self.epochs, **_tune_metrics(values, "val")}
            super().after_report(run_context, [out], checkpoint)
            if ray.get(ray.get_actor(slots).should_stop.remote(trial_id)):
                ray.get_runtime_context().current_actor.abort.remote()

    return ObjectiveReport()


# ---------------------------------------------------------------------------------------------------------------------
# MLflow writes from several processes at once


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


# ---------------------------------------------------------------------------------------------------------------------
# one trial (runs in a Ray Tune trial actor)


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


def _start_slots(name: str, n: int):
    """Start the search's TrialSlots actor. Trials and the driver's callback find it by name (a name, unlike an actor
    handle, stays valid in the callbacks a resumed search restores); the driver keeps the handle, which keeps the
    actor alive."""
    import ray

    actor_name = f"forgetless-slots-{name}"
    return actor_name, ray.remote(num_cpus=0)(TrialSlots).options(name=actor_name, get_if_exists=True).remote(n)


def _trial(params: dict[str, Any], context: dict[str, Any]) -> None:
    import ray
    import ray.tune

    # Tune runs a trial in its own folder; relative paths in the config mean the folder `forgetless tune` ran in.
    os.chdir(context["cwd"])
    trial_id = ray.tune.get_context().get_trial_id()
    slots = ray.get_actor(context["slots"])
    while not ray.get(slots.acquire.remote(trial_id)):
        time.sleep(1.0)
    try:
        _train_trial(params, context, trial_id)
    finally:
        ray.get(slots.release.remote(trial_id))


def _train_trial(params: dict[str, Any], context: dict[str, Any], trial_id: str) -> None:
    import ray
    import ray.tune

    from forgetless.platform import runner

    cfg = trial_config(ExperimentConfig(**context["config"]), params, trial_id)
    sp = Trajectory.from_dict(context["trajectory"]).at(params[STOP_POINT])
    objective = Objective(context["weights"], sp.source_val_acc)
    target = tracking.TrackingTarget(**context["tracking"])
    try:
        res = runner.transfer(cfg, cfg.strategies[0], sp.uri, target,
                              callbacks=[_make_report_callback(objective, trial_id, context["slots"])])
    except Exception:
        if ray.get(ray.get_actor(context["slots"]).should_stop.remote(trial_id)):
            # ASHA stopped it and its run aborted: the trial ends here, its last epoch report is its result (the
            # driver closes its MLflow run from it).
            return
        raise
    res.compute_metrics()
    last = res.history[-1]  # the last evaluation of the last stage: what the per-epoch reports ended on
    val = objective.metrics(last["acc"][str(last["stage"])], last["acc"]["0"])
    R = res.accuracy_matrix  # test split: row 0 = the stop point before target training, last row = after
    test = objective.metrics(float(R[-1, 1:].mean()), float(R[-1, 0]), source_before=float(R[0, 0]))
    epochs = sum(p["epochs"] for p in res.phase_log if p["stage"] >= 1)
    final = {OBJECTIVE: val["objective"], TRIAL_EPOCH: epochs, "test/objective": test["objective"],
             **_tune_metrics(val, "val"), **_tune_metrics(test, "test"), "search/finished": 1.0}
    if res.mlflow_run_id:
        _mark_trial(target.tracking_uri, res.mlflow_run_id, context["search_name"], trial_id, params, "finished",
                    final)
        with_retries(runner.log_strategy_artifacts, cfg, res, target.tracking_uri)
    ray.tune.report(final)


def _mark_trial(uri: str, run_id: str, name: str, trial_id: str, params: dict[str, Any], status: str,
                values: dict[str, float]) -> None:
    c = tracking.client(uri)
    for k, v in {TRIAL_TAG: trial_id, SEARCH_TAG: name, STATUS_TAG: status}.items():
        with_retries(c.set_tag, run_id, k, v)
    with_retries(tracking.log_params, uri, run_id, {f"search.{k}": v for k, v in params.items()})
    metrics = {f"search/{k}": v for k, v in values.items()
               if isinstance(v, (int, float)) and k not in (OBJECTIVE, TRIAL_EPOCH)}
    metrics["search/objective"] = values[OBJECTIVE]
    metrics["search/trial_epochs"] = values[TRIAL_EPOCH]
    with_retries(tracking.log_metrics, uri, run_id, metrics, step=0)


# ---------------------------------------------------------------------------------------------------------------------
# the search (driver)


def _domain(dim: list[Any] | RangeSpec, searcher: str):
    from ray import tune

    if isinstance(dim, RangeSpec):
        if dim.integer:
            return tune.lograndint(int(dim.low), int(dim.high) + 1) if dim.log else tune.randint(int(dim.low),
                                                                                                  int(dim.high) + 1)
        return tune.loguniform(dim.low, dim.high) if dim.log else tune.uniform(dim.low, dim.high)
    return tune.grid_search(list(dim)) if searcher == "grid" else tune.choice(list(dim))


def param_space(plan: SearchPlan) -> dict[str, Any]:
    space = {STOP_POINT: _domain(plan.stop_points, plan.search.searcher)}
    for key, dim in plan.search.space.items():
        if key != STOP_POINT:
            space[key] = _domain(dim, plan.search.searcher)
    return space


def _search_alg(search: SearchConfig, concurrency: int):
    from ray.tune.search.basic_variant import BasicVariantGenerator

    if search.searcher == "optuna":
        import optuna
        from ray.tune.search.optuna import OptunaSearch

        # TuneConfig.max_concurrent_trials wraps this searcher in a ConcurrencyLimiter.
        return OptunaSearch(sampler=optuna.samplers.TPESampler(seed=search.seed))
    # Tune ignores TuneConfig.max_concurrent_trials for a BasicVariantGenerator it is handed: set it here.
    return BasicVariantGenerator(random_state=search.seed, max_concurrent=concurrency)


def _scheduler(plan: SearchPlan, slots: str):
    from ray.tune.schedulers import (
        AsyncHyperBandScheduler,
        FIFOScheduler,
        TrialScheduler,
    )

    if plan.search.scheduler == "fifo":
        return FIFOScheduler()

    class FinishingASHA(AsyncHyperBandScheduler):
        """ASHA's rungs and cutoffs, with two changes. A trial at its last epoch is never stopped: it still reports its
        test accuracy matrix and logs its artifacts (stock ASHA stops it at max_t, before that). And a trial ASHA
        stops is not killed by Tune but asked to stop: its Ray Train run aborts cleanly at its next report
        (see _make_report_callback), which releases the run's workers and their placement group."""

        def on_trial_result(self, tune_controller, trial, result):
            import ray

            if result.get(TRIAL_EPOCH, 0) >= plan.max_t:
                return TrialScheduler.CONTINUE
            action = super().on_trial_result(tune_controller, trial, result)
            if action == TrialScheduler.STOP:
                ray.get(ray.get_actor(slots).request_stop.remote(trial.trial_id))
                return TrialScheduler.CONTINUE
            return action

    a = plan.search.asha
    return FinishingASHA(time_attr=TRIAL_EPOCH, max_t=plan.max_t, grace_period=a.grace_period,
                         reduction_factor=a.reduction_factor)


def _progress_callback(slots: str):
    from ray.tune import Callback

    def release(trial_id: str) -> None:
        import ray

        # Normally the trial frees its slot itself; this covers a trial process that died.
        try:
            ray.get_actor(slots).release.remote(trial_id)
        except ValueError:  # no such actor: the search is over
            pass

    class Progress(Callback):
        def on_trial_complete(self, iteration, trials, trial, **info):
            release(trial.trial_id)
            r = trial.last_result or {}
            done = "finished" if r.get("search/finished") else f"stopped early after {r.get(TRIAL_EPOCH, '?')} epochs"
            shown = ", ".join(f"{k}={v}" for k, v in trial.config.items())
            say(f"trial {trial.trial_id} ({shown}) {done}: objective {r.get(OBJECTIVE, float('nan')):.4f}")

        def on_trial_error(self, iteration, trials, trial, **info):
            release(trial.trial_id)
            say(f"trial {trial.trial_id} failed: see {trial.local_path or trial.path}")

    return Progress()


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


def run_search(config, search: SearchConfig | dict | None = None, resume: bool = False,
               overrides: list[str] | None = None) -> "SearchResult":
    """Validate, pre-train once, run the Tune search, log the summary on the MLflow parent run."""
    from ray import tune

    from forgetless.platform import runner

    cfg = load_config(config, overrides)
    if isinstance(search, dict):
        try:
            search = SearchConfig(**search)
        except Exception as e:  # pydantic's ValidationError, reworded like every config error
            from forgetless.config import _first_error

            raise ConfigError(f"search: {_first_error(e)}") from None
    plan = validate_search(cfg, search)
    uri = runner.preflight(plan.cfg)
    root = storage.normalize(cfg.storage)
    tune_path = storage.join(root, plan.name)
    exists = tune.Tuner.can_restore(tune_path)
    if exists and not resume:
        raise ConfigError(f"search {plan.name} already ran (Tune experiment {tune_path}); pass --resume "
                          f"(resume=True) to finish or reload it, or delete that folder to start over")
    runner.ensure_ray(plan.cfg)
    runner.check_resources(plan.cfg)
    import ray

    concurrency = max_concurrent_trials(plan.cfg, plan.search, ray.cluster_resources())
    slots, _slots_handle = _start_slots(plan.name, concurrency)
    exp_id = tracking.ensure_experiment(uri, cfg.tracking.experiment)
    parent = _parent_run(uri, exp_id, plan.name, resume)
    target = tracking.TrackingTarget(uri, exp_id, parent)
    say(f"search {plan.name}: MLflow parent run {parent} in {uri}; up to {concurrency} trial(s) at once")
    t0 = time.perf_counter()
    try:
        _log_search_definition(uri, parent, plan)
        traj = runner.pretrain(plan.cfg, target)
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
        context = {"config": plan.cfg.model_copy(update={"storage": root}).model_dump(mode="json"),
                   "trajectory": traj.to_dict(), "tracking": target.to_dict(), "weights": plan.search.weights(),
                   "search_name": plan.name, "cwd": os.getcwd(), "slots": slots}
        # The trial function itself only waits on its Ray Train run, so it asks for no CPU (a CPU per trial would
        # starve the run's own workers); Tune needs some resource per trial, so it reserves a little memory. The
        # workers hold the CPUs/GPUs, and max_concurrent_trials keeps the started trials within what the cluster fits.
        trainable = tune.with_resources(tune.with_parameters(_trial, context=context),
                                        {"cpu": 0, "memory": TRIAL_DRIVER_MEMORY})
        if exists:
            say(f"resuming search {plan.name} from {tune_path}: finished trials are kept, unfinished ones continue "
                f"from their last checkpoint")
            tuner = tune.Tuner.restore(tune_path, trainable, resume_unfinished=True, resume_errored=True)
        else:
            tuner = tune.Tuner(
                trainable, param_space=param_space(plan),
                tune_config=tune.TuneConfig(metric=OBJECTIVE, mode=plan.search.mode, search_alg=_search_alg(plan.search, concurrency),
                                            scheduler=_scheduler(plan, slots), num_samples=plan.search.num_samples,
                                            # (a ConcurrencyLimiter for Optuna; the grid/random generator
                                            # already has its own limit)
                                            max_concurrent_trials=concurrency if plan.search.searcher == "optuna"
                                            else None),
                run_config=tune.RunConfig(name=plan.name, storage_path=root, verbose=0,
                                          callbacks=[_progress_callback(slots)],
                                          failure_config=tune.FailureConfig(max_failures=0)),
            )
        t_tune = time.perf_counter()
        # Read by Tune's controller when fit() starts; set only for this fit, unless the user set it. Trials reserve
        # no CPU, so Tune would stage every pending trial at once and start them in whatever order their placement
        # groups come up; staging only as many as can run keeps the searcher's order (a grid runs in grid order,
        # ASHA's rungs fill in that order).
        env = {"TUNE_MAX_PENDING_TRIALS_PG": str(concurrency)}
        previous = {k: os.environ.get(k) for k in env}
        os.environ.update({k: v for k, v in env.items() if previous[k] is None})
        try:
            grid = tuner.fit()
        finally:
            for k, v in previous.items():
                if v is None:
                    os.environ.pop(k, None)
        tune_seconds = time.perf_counter() - t_tune
        _finalize_unfinished(grid, plan, traj, target)
        out = load_search(uri, parent)
        out.trajectory = traj
        out.wall_seconds, out.tune_seconds = time.perf_counter() - t0, tune_seconds
        if out.best is None:
            errors = [str(r.error) for r in grid if r.error]
            raise RuntimeError(f"search {plan.name}: no trial finished" + (f"; first error: {errors[0]}" if errors else ""))
        log_search_summary(out)
        tracking.client(uri).set_terminated(parent, "FINISHED")
        return out
    except BaseException as e:
        tracking.client(uri).set_terminated(parent, tracking.end_status(e))
        raise


def _log_search_definition(uri: str, parent: str, plan: SearchPlan) -> None:
    s = plan.search
    params = {"search.name": plan.name, "search.searcher": s.searcher, "search.scheduler": s.scheduler,
              "search.objective": s.describe_objective(), "search.num_samples": s.num_samples,
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
            "objective": s.describe_objective(), "objective_metrics": {k: OBJECTIVE_METRICS[k] for k in s.weights()},
        }, indent=1))
        with_retries(tracking.client(uri).log_artifact, parent, str(Path(d, "search.json")))


def _finalize_unfinished(grid, plan: SearchPlan, traj: Trajectory, target: tracking.TrackingTarget) -> None:
    """Trials ASHA stopped (or that failed) never reached their own summary: close their MLflow child runs here."""
    uri = target.tracking_uri
    for r in grid:
        m = r.metrics or {}
        if m.get("search/finished"):
            continue
        params, trial_id = dict(r.config), m.get("trial_id")
        if trial_id is None:
            continue  # it never reported, so it never got as far as an MLflow run
        run_name = _run_name(plan, params, trial_id)
        run_id = tracking.find_unfinished_run(uri, target.experiment_id, run_name)
        if run_id is None:
            continue
        status = "error" if r.error else "stopped_early"
        values = {OBJECTIVE: m.get(OBJECTIVE, float("nan")), TRIAL_EPOCH: m.get(TRIAL_EPOCH, 0)}
        values.update({k: v for k, v in m.items() if k.startswith("val/")})
        _mark_trial(uri, run_id, plan.name, trial_id, params, status, values)
        with_retries(tracking.client(uri).set_terminated, run_id, "FAILED" if r.error else "KILLED")


def _run_name(plan: SearchPlan, params: dict[str, Any], trial_id: str) -> str:
    from forgetless.platform.runner import transfer_run_name

    cfg = trial_config(plan.cfg, params, trial_id)
    return transfer_run_name(cfg, cfg.strategies[0])


# ---------------------------------------------------------------------------------------------------------------------
# results: read back from MLflow (the single record; `forgetless report` rebuilds from it too)


@dataclass
class TrialResult:
    trial_id: str
    params: dict[str, Any]  # stop_point and every searched field
    status: str  # finished | stopped_early | error
    epochs: int
    objective: float  # on validation data, at the trial's last epoch
    metrics: dict[str, float]  # val/* (last epoch) and, for finished trials, test/* (accuracy matrix)
    mlflow_run_id: str

    @property
    def stop_point(self) -> int:
        return int(self.params[STOP_POINT])


@dataclass
class SearchResult:
    """A finished search: every trial, the best one (best objective among the trials that trained to the end)."""

    name: str
    trials: list[TrialResult]
    mode: str
    objective: str
    parent_run_id: str
    tracking_uri: str
    space_keys: list[str]
    source_acc_by_stop_point: dict[int, float] = field(default_factory=dict)
    trajectory: Trajectory | None = None
    wall_seconds: float | None = None  # the whole call: validation, pre-training (or its reuse), trials, summary
    tune_seconds: float | None = None  # the trials alone (this invocation's Tuner.fit)

    @property
    def best(self) -> TrialResult | None:
        finished = [t for t in self.trials if t.status == "finished" and not math.isnan(t.objective)]
        if not finished:
            return None
        sign = 1.0 if self.mode == "max" else -1.0
        return max(finished, key=lambda t: sign * t.objective)

    @property
    def best_config(self) -> dict[str, Any]:
        return dict(self.best.params) if self.best else {}

    @property
    def trial_epochs(self) -> int:
        """Epochs trained over all trials: the search's compute, in units of one trial-epoch."""
        return sum(t.epochs for t in self.trials)

    def table(self) -> str:
        return format_search_table(self)


def load_search(uri: str, parent_run_id: str) -> SearchResult:
    """Rebuild a search's results from its MLflow parent run and the trials' child runs."""
    c = tracking.client(uri)
    parent = c.get_run(parent_run_id)
    if parent.data.tags.get("forgetless.command") != "tune":
        raise ConfigError(f"run {parent_run_id} is not a forgetless search (tags.forgetless.command = "
                          f"{parent.data.tags.get('forgetless.command')!r}); pass the parent run of `forgetless tune`")
    children = c.search_runs([parent.info.experiment_id],
                             filter_string=f"tags.`{tracking.PARENT_TAG}` = '{parent_run_id}'", max_results=10000)
    params = parent.data.params
    keys = sorted(k[len("search.space."):] for k in params if k.startswith("search.space."))
    keys = [STOP_POINT] + [k for k in keys if k != STOP_POINT]
    trials = []
    for run in children:
        tags = run.data.tags
        if TRIAL_TAG not in tags:
            continue  # the pre-training run
        p = {k[len("search."):]: _parse(v) for k, v in run.data.params.items() if k.startswith("search.")}
        m = run.data.metrics
        metrics = {k[len("search/"):]: v for k, v in m.items() if k.startswith(("search/val/", "search/test/"))}
        trials.append(TrialResult(tags[TRIAL_TAG], {k: p.get(k) for k in keys}, tags.get(STATUS_TAG, "unknown"),
                                  int(m.get("search/trial_epochs", 0)), m.get("search/objective", float("nan")),
                                  metrics, run.info.run_id))
    trials.sort(key=lambda t: t.trial_id)
    history = c.get_metric_history(parent_run_id, "trajectory/source_acc")
    objective = params.get("search.objective", "max target/acc")
    return SearchResult(params.get("search.name", parent.info.run_name), trials, objective.split(" ", 1)[0],
                        objective, parent_run_id, uri, keys, {int(h.step): h.value for h in history})


def _parse(v: str) -> Any:
    import yaml

    try:
        return yaml.safe_load(v)
    except yaml.YAMLError:
        return v


def _pct(v: float | None) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.1f}"


def _sort_key(v: Any) -> tuple:
    return (0, v, "") if isinstance(v, (int, float)) else (1, 0, str(v))


def format_search_table(res: SearchResult) -> str:
    keys = res.space_keys
    headers = ["trial", *keys, "status", "epochs", "objective", "target % (test)", "source % (test)",
               "forgetting % (test)"]
    best = res.best
    rows = []
    for t in sorted(res.trials, key=lambda t: tuple(_sort_key(t.params.get(k)) for k in keys)):
        rows.append([("* " if best and t.trial_id == best.trial_id else "  ") + t.trial_id,
                     *[f"{t.params.get(k):g}" if isinstance(t.params.get(k), float) else str(t.params.get(k))
                       for k in keys],
                     t.status, str(t.epochs), "-" if math.isnan(t.objective) else f"{t.objective:.4f}",
                     _pct(t.metrics.get("test/target/acc")), _pct(t.metrics.get("test/source/acc")),
                     _pct(t.metrics.get("test/forgetting"))])
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows)]
    line = lambda cells: "  ".join(str(c).rjust(w) if i else str(c).ljust(w)  # noqa: E731
                                   for i, (c, w) in enumerate(zip(cells, widths)))
    foot = f"objective: {res.objective} (validation, last epoch); * = best finished trial"
    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(r) for r in rows] + [foot])


def log_search_summary(res: SearchResult, out_dir: Path | None = None, log: bool = True) -> list[Path]:
    """The result table (text + JSON) and the two figures; written to `out_dir` and logged on the parent run."""
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(out_dir or tmp)
        d.mkdir(parents=True, exist_ok=True)
        files = [d / "search_results.txt", d / "search_results.json", d / "target_vs_stop_point.png",
                 d / "stop_point_lr_heatmap.png"]
        files[0].write_text(res.table() + "\n")
        files[1].write_text(json.dumps({
            "name": res.name, "objective": res.objective, "best": res.best.__dict__ if res.best else None,
            "trial_epochs": res.trial_epochs, "source_acc_by_stop_point": res.source_acc_by_stop_point,
            "trials": [t.__dict__ for t in res.trials]}, indent=1, default=str))
        plot_target_vs_stop_point(res, files[2])
        plot_heatmap(res, files[3])
        if log:
            c = tracking.client(res.tracking_uri)
            for f in files:
                with_retries(c.log_artifact, res.parent_run_id, str(f))
            if res.best:
                with_retries(tracking.log_metrics, res.tracking_uri, res.parent_run_id,
                             {"best/objective": res.best.objective, "best/stop_point": res.best.stop_point,
                              "search/trial_epochs": res.trial_epochs}, step=0)
        return files if out_dir else []


# ---------------------------------------------------------------------------------------------------------------------
# figures


def _lr_of(t: TrialResult, res: SearchResult) -> Any:
    return t.params.get(LR_KEY) if LR_KEY in res.space_keys else "config"


def _best_per_cell(res: SearchResult, finished_only: bool) -> dict[tuple[int, Any], TrialResult]:
    # Several trials can share a (stop point, lr) cell (other searched fields, repeats): show the best of them.
    sign = 1.0 if res.mode == "max" else -1.0
    cells: dict[tuple[int, Any], TrialResult] = {}
    for t in res.trials:
        if (finished_only and t.status != "finished") or math.isnan(t.objective):
            continue
        key = (t.stop_point, _lr_of(t, res))
        if key not in cells or sign * t.objective > sign * cells[key].objective:
            cells[key] = t
    return cells


def plot_target_vs_stop_point(res: SearchResult, path: Path) -> Path:
    """Target test accuracy vs stop point, one line per learning rate; the stop points' source accuracy on a second
    axis (the paper's picture: source accuracy keeps rising while the best starting point for the target is earlier)."""
    import matplotlib.pyplot as plt

    from forgetless.platform import plots  # noqa: F401 - selects the headless backend

    cells = _best_per_cell(res, finished_only=True)
    fig, ax = plt.subplots(figsize=(8, 4.8))
    lrs = sorted({lr for _, lr in cells}, key=str)
    for lr in lrs:
        pts = sorted((sp, t.metrics.get("test/target/acc", float("nan"))) for (sp, l), t in cells.items() if l == lr)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"lr={lr:g}" if isinstance(lr, float)
                else f"lr={lr}")
    ax.set_xlabel("pre-training stop point (epoch)")
    ax.set_ylabel("target test accuracy (finished trials)")
    ax.grid(alpha=0.3)
    ax2 = ax.twinx()
    src = sorted(res.source_acc_by_stop_point.items())
    if src:
        ax2.plot([s[0] for s in src], [s[1] for s in src], color="grey", ls="--", marker=".",
                 label="source val acc of the stop point")
        ax2.set_ylabel("source validation accuracy", color="grey")
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, fontsize=8, loc="lower right")
    ax.set_title(f"{res.name}: target accuracy vs stop point")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_heatmap(res: SearchResult, path: Path) -> Path:
    """Objective (validation) of every stop point x learning rate cell; early-stopped trials are marked."""
    import matplotlib.pyplot as plt
    import numpy as np

    from forgetless.platform import plots  # noqa: F401 - selects the headless backend

    cells = _best_per_cell(res, finished_only=False)
    sps = sorted({sp for sp, _ in cells})
    lrs = sorted({lr for _, lr in cells}, key=lambda v: (isinstance(v, str), v if not isinstance(v, str) else 0))
    grid = np.full((len(lrs), len(sps)), np.nan)
    for (sp, lr), t in cells.items():
        grid[lrs.index(lr), sps.index(sp)] = t.objective
    fig, ax = plt.subplots(figsize=(1.0 * len(sps) + 3, 0.7 * len(lrs) + 2))
    im = ax.imshow(grid, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(sps)), [str(s) for s in sps])
    ax.set_yticks(range(len(lrs)), [f"{lr:g}" if isinstance(lr, float) else str(lr) for lr in lrs])
    ax.set_xlabel("pre-training stop point (epoch)")
    ax.set_ylabel("learning rate")
    for (sp, lr), t in cells.items():
        txt = f"{t.objective:.3f}" + ("" if t.status == "finished" else f"\nstop@{t.epochs}")
        ax.text(sps.index(sp), lrs.index(lr), txt, ha="center", va="center", fontsize=7,
                color="w" if np.nanmean(grid) > t.objective else "k")
    fig.colorbar(im, ax=ax, label=f"objective ({res.objective})")
    ax.set_title(f"{res.name}: stop point x learning rate")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
