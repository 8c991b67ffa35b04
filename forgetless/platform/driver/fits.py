"""One Ray Train run: the TorchTrainer fit of a WorkerJob (pre-training or one strategy's transfer), its deterministic
name (the run's identity: re-running the same name resumes), and its result read back from the final checkpoint.
"""
from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path

import numpy as np
import ray
from ray.train import (
    CheckpointConfig,
    FailureConfig,
    LoggingConfig,
    RunConfig,
    ScalingConfig,
    WorkerGroupError,
)

from forgetless import console, storage
from forgetless.config import ConfigError, ExperimentConfig, StrategyConfig
from forgetless.console import say
from forgetless.platform.analysis import metrics as M
from forgetless.platform.analysis.results import StopPoint, StrategyResult, Trajectory
from forgetless.platform.driver import progress_board as progress
from forgetless.platform.driver import run_failures
from forgetless.platform.driver import ray_cluster, watchdog
from forgetless.platform.driver import trainer as lean_trainer
from forgetless.platform.tracking import mlflow_runs as tracking
from forgetless.platform.worker import checkpoints, shared_tasks, timing
from forgetless.platform.worker.failure_log import train_worker_logging_failures
from forgetless.platform.worker import op_builds as build_locks
from forgetless.platform.worker.job import (
    CheckpointPolicy,
    RunState,
    StopPointRef,
    WorkerJob,
)
from forgetless.platform.worker.checkpoint_io import FINAL_CHECKPOINT, MODEL_FILE, STATE_FILE
from forgetless.platform.worker.engine import engine_zero_stage
from forgetless.strategies import get_strategy_class
from forgetless.strategies.base import check_trajectory_ends


TRAJECTORY_FILE = "trajectory.json"


STOP_POINT_PREFIX = "stop_point_e"


STOP_POINT_FORMAT = STOP_POINT_PREFIX + "{epoch:04d}"  # the checkpoint names of the pre-training's stop points


WALL_FILE = "driver_wall.json"  # wall time of a finished transfer, measured by the driver


# How often an elastic run's controller may look for room to grow (it grows only right after a checkpoint, so this
# only bounds how often it asks): Ray's default is 60 s.
ELASTIC_CHECK_S = 5.0


def fit(cfg: ExperimentConfig, job: WorkerJob, keep_all_checkpoints: bool, callbacks: list | None = None):
    """Build and fit a TorchTrainer (Train V2). Re-running the same `job.run_name` resumes from its latest checkpoint.
    `callbacks`: Ray Train UserCallbacks (a Tune trial passes one that forwards each report to Tune)."""
    # Workers run in a folder of Ray Train's own: a relative storage path means the driver's folder, so they are given
    # the absolute one (they write each checkpoint's manifest under it and restore from it).
    job = dataclasses.replace(job, config=job.config.model_copy(update={"storage": storage.normalize(cfg.storage)}),
                              tasks=shared_tasks.share(job.config))
    try:
        return _fit(cfg, job, keep_all_checkpoints, callbacks)
    except WorkerGroupError as e:
        # one line on the console (run, worker, message); the tracebacks in the run's failure.log
        raise run_failures.worker_failure(job.run_name, storage.join(job.config.storage, job.run_name), e) from None


def _fit(cfg: ExperimentConfig, job: WorkerJob, keep_all_checkpoints: bool, callbacks: list | None):
    return lean_trainer.fit(
        train_worker_logging_failures, embedded_cluster=ray_cluster.on_embedded_cluster(),
        started_it=ray_cluster.started_embedded_cluster(),
        # an elastic run grows once a checkpoint is complete (its manifest is written last); not after the final one
        **({"grow_marker": checkpoints.MANIFEST_FILE, "final_checkpoint": FINAL_CHECKPOINT}
           if lean_trainer.replaceable() else {}),
        train_loop_config=job,
        # an elastic run (num_workers: [MIN, MAX]) is Ray Train's elastic worker group: started with what fits,
        # restarted on fewer when a node is lost, grown back at a checkpoint when room returns
        # (_compat/ray_train.CheckpointBoundaryElasticPolicy)
        scaling_config=ScalingConfig(num_workers=cfg.scaling.ray_num_workers(), use_gpu=cfg.scaling.use_gpu,
                                     resources_per_worker={"CPU": cfg.scaling.cpus_per_worker},
                                     **({"elastic_resize_monitor_interval_s": ELASTIC_CHECK_S}
                                        if cfg.scaling.elastic else {})),
        run_config=RunConfig(
            name=job.run_name,
            **storage.ray_storage(cfg.storage),
            checkpoint_config=CheckpointConfig(num_to_keep=None if keep_all_checkpoints else 3),
            # A lost worker (preemption, OOM, node loss): Ray Train restarts the worker group, which resumes from the
            # latest intact checkpoint (checkpoint_io.restore).
            failure_config=FailureConfig(max_failures=cfg.fault_tolerance.max_failures),
            callbacks=callbacks,
            # Ray Train's own INFO lines (one per checkpoint and rank) drown the progress lines; warnings still show.
            logging_config=LoggingConfig(log_level="INFO" if console.verbose() else "WARNING"),
        ),
    )


def _read_state(result) -> RunState:
    """The state of the run's last checkpoint (its final one), verified against its manifest."""
    with result.checkpoint.as_directory() as d:
        problem = checkpoints.verify_folder(d)
        if problem:
            raise RuntimeError(f"the last checkpoint of the run, {result.checkpoint.path}, is damaged: {problem}")
        return RunState.from_json(Path(d, STATE_FILE).read_text())


def _checkpoint_uri(cfg: ExperimentConfig, run_name: str, checkpoint) -> str:
    return storage.join(storage.normalize(cfg.storage), run_name, Path(checkpoint.path).name)


def pretrain_run_name(cfg: ExperimentConfig) -> str:
    return f"{cfg.name}-pretrain-{cfg.pretrain_key()}"


def describe_zero(cfg: ExperimentConfig) -> str:
    """The run's DeepSpeed stage as its start line says it: the configured one, and the one its engines run at where
    they differ (engine.engine_zero_stage)."""
    spec = cfg.deepspeed
    stage = engine_zero_stage(spec, cfg.scaling.worker_counts(), cfg.scaling.use_gpu)
    return f"DeepSpeed ZeRO-{spec.zero_stage}" + (
        "" if stage == spec.zero_stage else f", run as ZeRO-{stage}: one worker has nothing to partition")


def transfer_run_name(cfg: ExperimentConfig, strategy: StrategyConfig) -> str:
    return f"{cfg.name}-{strategy.display_name()}-{cfg.transfer_key(strategy)}"


def pretrain_job(cfg: ExperimentConfig, target: tracking.TrackingTarget) -> WorkerJob:
    """The source pre-training as a run of the `source_pretrain` strategy on stage 0; its checkpoints are the stop
    points of the trajectory (θ⁰ first, then every `pretrain.checkpoint_every` epochs and the last)."""
    return WorkerJob(
        config=cfg, run_name=pretrain_run_name(cfg), display_name="pretrain", mode="pretrain",
        strategy=StrategyConfig(name="source_pretrain", params={"head_only": bool(cfg.backbone.weights)}),
        optim=cfg.pretrain, num_tasks=1, stages=[0], class_incremental=False,
        checkpoints=CheckpointPolicy(STOP_POINT_FORMAT, every_epochs=cfg.pretrain.checkpoint_every, at_start=True,
                                     exports_model=True),
        tracking=target, init_weights=cfg.backbone.weights)


def transfer_job(cfg: ExperimentConfig, strategy: StrategyConfig, init_weights: str, target: tracking.TrackingTarget,
                 trajectory: Trajectory | None) -> WorkerJob:
    """One strategy over the target stream (stages 1..T), starting from the pre-trained weights."""
    needs_trajectory = get_strategy_class(strategy.name).needs_trajectory
    return WorkerJob(
        config=cfg, run_name=transfer_run_name(cfg, strategy), display_name=strategy.display_name(), mode="transfer",
        strategy=strategy, optim=cfg.train, num_tasks=len(cfg.targets) + 1, stages=list(range(1, len(cfg.targets) + 1)),
        class_incremental=cfg.evaluation == "class_incremental",
        checkpoints=CheckpointPolicy("checkpoint_s{stage}_p{phase}_e{epoch:04d}",
                                     stage_end_format="checkpoint_s{stage}_done"),
        tracking=target, init_weights=init_weights, step_budget=cfg.train.step_budget,
        trajectory=trajectory_stop_points(cfg, strategy, trajectory) if needs_trajectory else [])


def pretrain(cfg: ExperimentConfig, target: tracking.TrackingTarget, run_label: str | None = None) -> Trajectory:
    """Pre-train the source (or reuse the trajectory of an identical earlier pre-training). `run_label`: the MLflow
    run's name (default `pretrain`)."""
    run_name = pretrain_run_name(cfg)
    traj_uri = storage.join(storage.normalize(cfg.storage), run_name, TRAJECTORY_FILE)
    if storage.exists(traj_uri):
        say(f"reusing pre-training trajectory {traj_uri}")
        return Trajectory.from_dict(json.loads(storage.read_bytes(traj_uri)), reused=True)
    what = "training a source head on the given backbone" if cfg.backbone.weights else "pre-training from scratch"
    say(f"{what}: {cfg.source.display_name()} for {cfg.pretrain.epochs} epochs, stop point every "
        f"{cfg.pretrain.checkpoint_every}, seed {cfg.seed} (Ray Train run {run_name})")
    job = pretrain_job(cfg, target)
    job = dataclasses.replace(job, display_name=run_label or job.display_name)
    with progress.board().watch(job.display_name, storage.join(storage.normalize(cfg.storage), run_name)) as shown:
        result = fit(cfg, job, keep_all_checkpoints=True)
        state = _read_state(result)
        shown.ended(state.history, state.global_step, job.stages)  # its end line: the run's own final numbers
    stop_points = []
    for ckpt, metrics in result.best_checkpoints:
        name = Path(ckpt.path).name
        if name.startswith(STOP_POINT_PREFIX):
            stop_points.append(StopPoint(int(name[len(STOP_POINT_PREFIX):]), storage.join(
                _checkpoint_uri(cfg, run_name, ckpt), MODEL_FILE), metrics.get("pretrain/val/source/acc")))
    stop_points.sort(key=lambda s: s.epoch)
    traj = Trajectory(run_name, storage.join(storage.normalize(cfg.storage), run_name), stop_points,
                      state.mlflow_run_id)
    if state.mlflow_run_id:
        tracking.client(target.tracking_uri).set_terminated(state.mlflow_run_id, "FINISHED")
    storage.write_bytes(traj_uri, json.dumps(traj.to_dict(), indent=1).encode())
    return traj


def trajectory_stop_points(cfg: ExperimentConfig, strategy: StrategyConfig,
                           trajectory: Trajectory | None) -> list[StopPointRef]:
    """The stop points handed to a strategy that needs the trajectory; θ⁰ (epoch 0) and θᵀ (the last epoch) must be
    there, checked before its training starts."""
    epochs = [sp.epoch for sp in trajectory.stop_points] if trajectory is not None else []
    try:
        check_trajectory_ends(epochs, cfg.pretrain.epochs)
    except ValueError as e:
        raise ConfigError(f"strategies[{strategy.display_name()}]: {strategy.name} needs the pre-training trajectory "
                          f"from θ⁰ to θᵀ, but {e}") from None
    return [StopPointRef(sp.epoch, sp.uri) for sp in trajectory.stop_points]


def transfer(cfg: ExperimentConfig, strategy: StrategyConfig, init_weights: str,
             target: tracking.TrackingTarget, callbacks: list | None = None,
             trajectory: Trajectory | None = None, run_label: str | None = None) -> StrategyResult:
    """One strategy's Ray Train run (or the result of the identical finished one). `run_label`: the MLflow child
    run's name (default: the strategy's label)."""
    run_name = transfer_run_name(cfg, strategy)
    run_uri = storage.join(storage.normalize(cfg.storage), run_name)
    final_state_uri = storage.join(run_uri, FINAL_CHECKPOINT, STATE_FILE)
    if callbacks is None and storage.exists(final_state_uri):
        # The identical run finished before (same config hash): read its result instead of starting Ray Train workers
        # that would only load the final checkpoint and stop. (Tune trials pass callbacks and always run.)
        state = RunState.from_json(storage.read_bytes(final_state_uri))
        if state.finished and tracking.run_exists(target.tracking_uri, state.mlflow_run_id):
            say(f"strategy {strategy.display_name()}: reusing the finished run {run_name}")
            wall_uri = storage.join(run_uri, WALL_FILE)
            wall = json.loads(storage.read_bytes(wall_uri))["wall_seconds"] if storage.exists(wall_uri) else math.nan
            return _strategy_result(cfg, strategy, state, wall, storage.join(run_uri, FINAL_CHECKPOINT))
    say(f"strategy {strategy.display_name()}: Ray Train run {run_name} ({cfg.scaling.describe_workers()}, "
        f"{describe_zero(cfg)})")
    job = dataclasses.replace(transfer_job(cfg, strategy, init_weights, target, trajectory), submitted_at=time.time(),
                              display_name=run_label or strategy.display_name())
    # wall time sums every invocation of the run (a resumed one included); the watch says when the run stalls
    clock = watchdog.WallClock(storage.join(run_uri, WALL_FILE))
    with watchdog.RunWatch(run_name, run_uri, clock, lambda: _stall_hints(cfg)), \
            progress.board().watch(job.display_name, run_uri) as shown:
        result = fit(cfg, job, keep_all_checkpoints=False, callbacks=callbacks)
        returned = time.time()
        state = _read_state(result)
        shown.ended(state.history, state.global_step, job.stages)  # its end line: the run's own final numbers
    timing.add(state.seconds, "finish", returned - (state.saved_at or returned))
    timing.add(state.seconds, "read_back", time.time() - returned)
    wall = clock.write(finished=state.finished)
    return _strategy_result(cfg, strategy, state, wall, _checkpoint_uri(cfg, run_name, result.checkpoint))


def _stall_hints(cfg: ExperimentConfig) -> str:
    """What a run that makes no progress may be waiting for, as far as the driver can see."""
    need = cfg.scaling.fewest_workers * cfg.scaling.cpus_per_worker
    free = ray.available_resources().get("CPU", 0.0)
    hints = [f"Free CPUs in the Ray cluster: {free:g} (this run's workers take {need:g} while they run"
             + (f", at its fewest: {cfg.scaling.describe_workers()}" if cfg.scaling.elastic else "") + ")"]
    locks = build_locks.present_locks()
    if locks:
        hints.append(f"DeepSpeed op build locks present: {', '.join(map(str, locks))} (workers wait on them, "
                     f"bounded by FORGETLESS_BUILD_LOCK_WAIT_S)")
    return "; ".join(hints) + "."


def _strategy_result(cfg: ExperimentConfig, strategy: StrategyConfig, state: RunState, wall: float,
                     checkpoint_uri: str) -> StrategyResult:
    cls = get_strategy_class(strategy.name)
    return StrategyResult(
        label=strategy.display_name(), strategy=strategy.name, task_names=state.task_names,
        accuracy_matrix=M.score_matrix(state.R, state.L, cfg.score),
        history=state.history, phase_log=state.phase_log,
        trainable_params=state.trainable_params, global_step=state.global_step, wall_seconds=wall,
        train_seconds=state.train_seconds, mlflow_run_id=state.mlflow_run_id,
        checkpoint_uri=checkpoint_uri, evaluation=cfg.evaluation,
        tags=cls.identity_tags(), ended_at_ms=int(time.time() * 1000),  # called as the Ray Train run returns
        seconds=dict(state.seconds), seed=cfg.seed,
        task_kind=cfg.source.kind, score=cfg.score,
        loss_matrix=np.asarray(state.L, dtype=float) if len(state.L) == len(state.R) else None,
        eval_rows=list(state.eval_rows),
    )
