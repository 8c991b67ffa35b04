"""The driver: validate, start (or join) Ray, pre-train once, run each strategy as a Ray Train job, track in MLflow.

Run identity follows Ray Train V2: `RunConfig(storage_path, name)` with a deterministic name (experiment name, strategy
label and a hash of everything that shapes the run), so re-running the same config resumes from the latest checkpoint.
"""
from __future__ import annotations

import json
import math
import os
import signal
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable

import numpy as np
import ray
from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from forgetless import storage
from forgetless.config import ConfigError, ExperimentConfig, StrategyConfig
from forgetless.console import say
from forgetless.data import build_stream
from forgetless.platform import plots, tracking
from forgetless.platform.model_io import build_model, load_torch_file
from forgetless.platform.results import CompareResult, StopPoint, StrategyResult, Trajectory
from forgetless.platform.train_loop import FINAL_CHECKPOINT, MODEL_FILE, STATE_FILE, train_worker
from forgetless.platform.worker_job import CheckpointPolicy, RunState, StopPointRef, WorkerJob
from forgetless.strategies import get_strategy_class, make_strategy
from forgetless.strategies.base import check_trajectory_ends, task_infos

TRAJECTORY_FILE = "trajectory.json"
STOP_POINT_PREFIX = "stop_point_e"
STOP_POINT_FORMAT = STOP_POINT_PREFIX + "{epoch:04d}"  # the checkpoint names of the pre-training's stop points
WALL_FILE = "driver_wall.json"  # wall time of a finished transfer, measured by the driver


# ---------------------------------------------------------------------------------------------------------------------
# checks that must pass before anything starts


def preflight(cfg: ExperimentConfig) -> str:
    """Everything that can be checked without starting Ray; returns the resolved tracking URI."""
    for s in cfg.strategies:
        cls = get_strategy_class(s.name)
        if not cls.transfer:
            raise ConfigError(f"strategies[{s.display_name()}]: {s.name} is the platform's own source pre-training, "
                              f"not a transfer strategy; configure it under pretrain: and list transfer strategies")
        if cfg.deepspeed.zero_stage > cls.max_zero_stage:
            raise ConfigError(
                f"strategies[{s.display_name()}]: {s.name} supports DeepSpeed ZeRO stage <= {cls.max_zero_stage} "
                f"(it reads weights outside a module's forward); set deepspeed.zero_stage to {cls.max_zero_stage}"
            )
        if cls.supported_backbones is not None and not any(cfg.backbone.name.startswith(b)
                                                           for b in cls.supported_backbones):
            raise ConfigError(f"strategies[{s.display_name()}]: {s.name} does not support backbone "
                              f"{cfg.backbone.name!r}; supported: {list(cls.supported_backbones)}")
        if cfg.evaluation == "task_incremental" and not cls.has_per_task_parts:
            raise ConfigError(f"evaluation: {s.name} keeps no per-task parts, so task-incremental evaluation does not "
                              f"apply; set evaluation: class_incremental")
    # storage first: a missing bucket or wrong credentials is the likeliest cluster error, and the clearest
    storage.preflight(cfg.storage)
    if cfg.backbone.weights:
        storage.check_readable(cfg.backbone.weights, "backbone.weights")
    uri = tracking.resolve_tracking_uri(cfg.tracking.tracking_uri)
    tracking.check_reachable(uri)
    # The tasks are built once here too, so a bad class id or an unreadable file fails before Ray starts.
    try:
        tasks = build_stream(cfg.source, cfg.targets)
    except (ValueError, OSError) as e:
        raise ConfigError(f"tasks: {e}") from None
    for s in cfg.strategies:  # the strategies' own whole-experiment checks (e.g. a permutation spec exists)
        try:
            make_strategy(s.name, s.params, cfg.train.epochs, cfg.train.lr).check(cfg, tasks, load_torch_file)
        except (ValueError, OSError) as e:
            raise ConfigError(f"strategies[{s.display_name()}]: {e}") from None
    return uri


def ensure_ray(cfg: ExperimentConfig) -> None:
    """Connect to cfg.ray_address / RAY_ADDRESS, or start an embedded local cluster; no-op if Ray is initialized."""
    if not ray.is_initialized():
        init_ray(cfg.ray_address or os.environ.get("RAY_ADDRESS"), cfg.scaling.use_gpu)


def init_ray(address: str | None, use_gpu: bool, num_cpus: int | None = None) -> None:
    """ray.init as every forgetless driver does it (benchmarks too, so they measure the same platform)."""
    env = {"PYTHONUNBUFFERED": "1"}
    if not use_gpu:
        env["DS_ACCELERATOR"] = "cpu"
    say(f"starting Ray ({'connecting to ' + address if address else 'embedded local cluster'})")
    # An embedded cluster: Ray starts worker processes at nice 15, so where the training workers fill the cores Ray's
    # own processes (raylet, GCS, dashboard, the Train controller) take CPU from them first: benchmarks/overhead.py
    # measured a 1.30x slower training loop at nice 15 with 2 workers on 2 cores (1.00x with a core left free). The
    # training workers are the job here, so they run at normal priority. (A cluster started with `ray start` keeps its
    # own setting: RAY_worker_niceness=0 in the environment of `ray start` does the same there.)
    system_config = None if address else {"worker_niceness": 0}
    ray.init(address=address, num_cpus=None if address else num_cpus, runtime_env={"env_vars": env},
             log_to_driver=True, logging_level="ERROR", configure_logging=True, _system_config=system_config)
    # ray.init makes SIGTERM call sys.exit. `ray job stop` / `forgetless jobs stop` send SIGTERM, and a stop should end
    # the run the way Ctrl-C does: during a fit Ray Train's SIGINT handler aborts the run gracefully (its registered
    # checkpoints kept, so the same command resumes), elsewhere Python raises KeyboardInterrupt; either way the MLflow
    # parent run is marked KILLED (tracking.end_status). Only the main thread may set a handler.
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _sigterm_as_sigint)


def _sigterm_as_sigint(signum, frame) -> None:
    signal.raise_signal(signal.SIGINT)


def check_resources(cfg: ExperimentConfig) -> None:
    total = ray.cluster_resources()
    need_cpu = cfg.scaling.num_workers * cfg.scaling.cpus_per_worker
    if total.get("CPU", 0) < need_cpu:
        raise ConfigError(f"scaling: {cfg.scaling.num_workers} workers x {cfg.scaling.cpus_per_worker} CPU need "
                          f"{need_cpu:g} CPUs but the Ray cluster has {total.get('CPU', 0):g}; lower "
                          f"scaling.num_workers or scaling.cpus_per_worker")
    if cfg.scaling.use_gpu and total.get("GPU", 0) < cfg.scaling.num_workers:
        raise ConfigError(f"scaling.use_gpu: {cfg.scaling.num_workers} workers need {cfg.scaling.num_workers} GPUs but "
                          f"the Ray cluster has {total.get('GPU', 0):g}")
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if len(nodes) > 1 and not storage.is_s3(cfg.storage):
        # Workers on other nodes would write checkpoints to their own disks, and a resumed run would not find them.
        raise ConfigError(f"storage: the Ray cluster has {len(nodes)} nodes but storage is the local folder "
                          f"{storage.normalize(cfg.storage)!r}, which the other nodes cannot read; use shared "
                          f"storage: storage: s3://BUCKET/PREFIX")


# ---------------------------------------------------------------------------------------------------------------------
# one Ray Train run


def fit(cfg: ExperimentConfig, job: WorkerJob, keep_all_checkpoints: bool, callbacks: list | None = None):
    """Build and fit a TorchTrainer (Train V2). Re-running the same `job.run_name` resumes from its latest checkpoint.
    `callbacks`: Ray Train UserCallbacks (a Tune trial passes one that forwards each report to Tune)."""
    trainer = TorchTrainer(
        train_worker,
        train_loop_config=job,
        scaling_config=ScalingConfig(num_workers=cfg.scaling.num_workers, use_gpu=cfg.scaling.use_gpu,
                                     resources_per_worker={"CPU": cfg.scaling.cpus_per_worker}),
        run_config=RunConfig(
            name=job.run_name,
            **storage.ray_storage(cfg.storage),
            checkpoint_config=CheckpointConfig(num_to_keep=None if keep_all_checkpoints else 3),
            failure_config=FailureConfig(max_failures=0),
            callbacks=callbacks,
            # Ray Train's own INFO lines (one per checkpoint and rank) drown the progress lines; warnings still show.
            logging_config=LoggingConfig(log_level=os.environ.get("FORGETLESS_RAY_TRAIN_LOG_LEVEL", "WARNING")),
        ),
    )
    return trainer.fit()


def _read_state(result) -> RunState:
    with result.checkpoint.as_directory() as d:
        return RunState.from_json(Path(d, STATE_FILE).read_text())


def _checkpoint_uri(cfg: ExperimentConfig, run_name: str, checkpoint) -> str:
    return storage.join(storage.normalize(cfg.storage), run_name, Path(checkpoint.path).name)


def pretrain_run_name(cfg: ExperimentConfig) -> str:
    return f"{cfg.name}-pretrain-{cfg.pretrain_key()}"


def transfer_run_name(cfg: ExperimentConfig, strategy: StrategyConfig) -> str:
    return f"{cfg.name}-{strategy.display_name()}-{cfg.transfer_key(strategy)}"


def pretrain_job(cfg: ExperimentConfig, target: tracking.TrackingTarget) -> WorkerJob:
    """The source pre-training as a run of the `source_pretrain` strategy on stage 0; its checkpoints are the stop
    points of the trajectory (θ⁰ first, then every `pretrain.checkpoint_every` epochs and the last)."""
    return WorkerJob(
        config=cfg, run_name=pretrain_run_name(cfg), display_name="pretrain", mode="pretrain",
        strategy=StrategyConfig(name="source_pretrain", params={"head_only": bool(cfg.backbone.weights)}),
        optim=cfg.pretrain, num_tasks=1, stages=[0], class_incremental=False,
        checkpoints=CheckpointPolicy(STOP_POINT_FORMAT, every_epochs=cfg.pretrain.checkpoint_every, at_start=True),
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
        tracking=target, init_weights=init_weights,
        trajectory=trajectory_stop_points(cfg, strategy, trajectory) if needs_trajectory else [])


def pretrain(cfg: ExperimentConfig, target: tracking.TrackingTarget) -> Trajectory:
    """Pre-train the source (or reuse the trajectory of an identical earlier pre-training)."""
    run_name = pretrain_run_name(cfg)
    traj_uri = storage.join(storage.normalize(cfg.storage), run_name, TRAJECTORY_FILE)
    if storage.exists(traj_uri):
        say(f"reusing pre-training trajectory {traj_uri}")
        return Trajectory.from_dict(json.loads(storage.read_bytes(traj_uri)), reused=True)
    what = "training a source head on the given backbone" if cfg.backbone.weights else "pre-training from scratch"
    say(f"{what}: {cfg.source.display_name()} for {cfg.pretrain.epochs} epochs, stop point every "
        f"{cfg.pretrain.checkpoint_every} (Ray Train run {run_name})")
    result = fit(cfg, pretrain_job(cfg, target), keep_all_checkpoints=True)
    state = _read_state(result)
    stop_points = []
    for ckpt, metrics in result.best_checkpoints:
        name = Path(ckpt.path).name
        if name.startswith(STOP_POINT_PREFIX):
            stop_points.append(StopPoint(int(name[len(STOP_POINT_PREFIX):]), storage.join(
                _checkpoint_uri(cfg, run_name, ckpt), MODEL_FILE), metrics.get("source/acc")))
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
             trajectory: Trajectory | None = None) -> StrategyResult:
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
    say(f"strategy {strategy.display_name()}: Ray Train run {run_name} ({cfg.scaling.num_workers} workers, "
        f"DeepSpeed ZeRO-{cfg.deepspeed.zero_stage})")
    job = transfer_job(cfg, strategy, init_weights, target, trajectory)
    t0 = time.perf_counter()
    result = fit(cfg, job, keep_all_checkpoints=False, callbacks=callbacks)
    wall = time.perf_counter() - t0
    state = _read_state(result)
    if state.finished:
        storage.write_bytes(storage.join(run_uri, WALL_FILE), json.dumps({"wall_seconds": wall}).encode())
    return _strategy_result(cfg, strategy, state, wall, _checkpoint_uri(cfg, run_name, result.checkpoint))


def _strategy_result(cfg: ExperimentConfig, strategy: StrategyConfig, state: RunState, wall: float,
                     checkpoint_uri: str) -> StrategyResult:
    cls = get_strategy_class(strategy.name)
    return StrategyResult(
        label=strategy.display_name(), strategy=strategy.name, task_names=state.task_names,
        accuracy_matrix=np.asarray(state.R, dtype=float), history=state.history, phase_log=state.phase_log,
        trainable_params=state.trainable_params, global_step=state.global_step, wall_seconds=wall,
        train_seconds=state.train_seconds, mlflow_run_id=state.mlflow_run_id,
        checkpoint_uri=checkpoint_uri, evaluation=cfg.evaluation,
        tags=cls.identity_tags(),
    )


# ---------------------------------------------------------------------------------------------------------------------
# MLflow artifacts of a finished strategy run (driver side: plots and the exported model)


def log_strategy_artifacts(cfg: ExperimentConfig, res: StrategyResult, uri: str) -> None:
    if res.mlflow_run_id is None:
        return
    c = tracking.client(uri)
    tracking.log_metrics(uri, res.mlflow_run_id, res.metrics, step=res.global_step)
    with tempfile.TemporaryDirectory() as d:
        Path(d, "accuracy_matrix.json").write_text(json.dumps({
            "task_names": res.task_names, "rows": ["before"] + [f"after {n}" for n in res.task_names[1:]],
            "R": res.accuracy_matrix.tolist(), "evaluation": res.evaluation,
            "convention": "R[i][j] = test accuracy on task j after stage i; task 0 = source, row 0 = before targets",
        }, indent=1))
        Path(d, "history.json").write_text(json.dumps({"history": res.history, "phases": res.phase_log}))
        plots.accuracy_matrix_heatmap(res.accuracy_matrix, res.task_names, f"{res.label}: accuracy matrix",
                                      Path(d, "accuracy_matrix.png"))
        plots.learning_curves(res.history, res.task_names, f"{res.label}: learning and forgetting curves",
                              Path(d, "curves.png"))
        for f in ("accuracy_matrix.json", "accuracy_matrix.png", "history.json", "curves.png"):
            c.log_artifact(res.mlflow_run_id, str(Path(d, f)))
    if cfg.tracking.log_model and res.checkpoint_uri:
        log_model(cfg, res, uri)
    c.set_terminated(res.mlflow_run_id, "FINISHED")


def load_model(cfg: ExperimentConfig, res: StrategyResult):
    """Rebuild the trained model (strategy surgery included) from the run's consolidated checkpoint."""
    s = next(s for s in cfg.strategies if s.display_name() == res.label)
    tasks = build_stream(cfg.source, cfg.targets)
    model = build_model(cfg, task_infos(tasks), make_strategy(s.name, s.params, cfg.train.epochs, cfg.train.lr))
    model.load_state_dict(load_torch_file(storage.join(res.checkpoint_uri, MODEL_FILE)))
    return model.eval(), tasks


def log_model(cfg: ExperimentConfig, res: StrategyResult, uri: str) -> None:
    # deferred: mlflow.pytorch is a heavy import that only model logging needs
    import mlflow
    import mlflow.pytorch

    model, tasks = load_model(cfg, res)
    mlflow.set_tracking_uri(uri)
    with mlflow.start_run(run_id=res.mlflow_run_id):
        # pickle format: the TransferModel's forward takes (inputs, task index), which torch.export cannot trace.
        mlflow.pytorch.log_model(model, name="model", serialization_format="pickle",
                                 pip_requirements=["torch", "forgetless"])


# ---------------------------------------------------------------------------------------------------------------------
# top level


def execute(cfg: ExperimentConfig, command: str,
            on_result: Callable[[StrategyResult], None] | None = None) -> CompareResult:
    """Run every strategy of `cfg` on its stream from one shared pre-trained checkpoint; one MLflow parent run."""
    uri = preflight(cfg)
    ensure_ray(cfg)
    check_resources(cfg)
    exp_id = tracking.ensure_experiment(uri, cfg.tracking.experiment)
    parent = tracking.start_parent_run(uri, exp_id, f"{cfg.name} ({command})", {
        "forgetless.command": command, "forgetless.name": cfg.name,
        "forgetless.strategies": ",".join(s.display_name() for s in cfg.strategies),
        "forgetless.evaluation": cfg.evaluation,
    })
    tracking.log_params(uri, parent, tracking.flatten("", cfg.model_dump(mode="json")))
    target = tracking.TrackingTarget(uri, exp_id, parent)
    say(f"MLflow: {uri}, experiment {cfg.tracking.experiment!r}, parent run {parent}")
    try:
        traj = pretrain(cfg, target)
        c = tracking.client(uri)
        c.set_tag(parent, "forgetless.pretrain_run", traj.run_name)
        c.set_tag(parent, "forgetless.pretrain_reused", str(traj.reused).lower())
        results = []
        for s in cfg.strategies:
            res = transfer(cfg, s, traj.final().uri, target, trajectory=traj)
            results.append(res)
            if on_result:
                on_result(res)
        # learning-speed thresholds are relative to the best target accuracy *any* strategy reached
        T = len(results[0].task_names) - 1
        best = {st: max(r.best_target_acc(st) for r in results) for st in range(1, T + 1)}
        for r in results:
            r.compute_metrics(best)
            log_strategy_artifacts(cfg, r, uri)
        out = CompareResult(cfg.name, results, traj, parent, uri, exp_id)
        _log_parent_summary(out, uri)
        c.set_terminated(parent, "FINISHED")
        return out
    except BaseException as e:
        tracking.client(uri).set_terminated(parent, tracking.end_status(e))
        raise


def _log_parent_summary(out: CompareResult, uri: str) -> None:
    c = tracking.client(uri)
    with tempfile.TemporaryDirectory() as d:
        Path(d, "comparison.txt").write_text(out.table() + "\n")
        Path(d, "comparison.json").write_text(json.dumps(
            [{"label": r.label, "strategy": r.strategy, "metrics": r.metrics, "R": r.accuracy_matrix.tolist(),
              "mlflow_run_id": r.mlflow_run_id} for r in out.results], indent=1))
        plots.comparison_curves({r.label: r.history for r in out.results}, Path(d, "comparison_curves.png"),
                                f"{out.name}: strategies compared")
        for f in ("comparison.txt", "comparison.json", "comparison_curves.png"):
            c.log_artifact(out.parent_run_id, str(Path(d, f)))
    for r in out.results:
        tracking.log_metrics(uri, out.parent_run_id, {f"{r.label}/{k}": v for k, v in r.metrics.items()
                                                     if k in ("target/final_acc", "forgetting/max", "acc", "bwt")}, step=0)
