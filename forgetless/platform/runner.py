"""The driver: validate, start (or join) Ray, pre-train once, run each strategy as a Ray Train job, track in MLflow.

Run identity follows Ray Train V2: `RunConfig(storage_path, name)` with a deterministic name (experiment name, strategy
label and a hash of everything that shapes the run), so re-running the same config resumes from the latest checkpoint.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import re
import signal
import sys
import tempfile
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import numpy as np
import ray
import torch
from ray._private.utils import get_num_cpus  # the CPU count ray.init gives an embedded cluster
from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig

from forgetless import storage
from forgetless.backbones import TransferModel, build_backbone, is_builtin_backbone
from forgetless.config import ConfigError, ExperimentConfig, StrategyConfig
from forgetless import console
from forgetless.console import say
from forgetless.data import build_stream
from forgetless.hashing import short_hash
from forgetless.platform import (build_locks, checkpoints, fanout, model_export, plots, progress, reaper, report_html,
                                 lean_trainer, review, shared_tasks, timing, tracking, watchdog)
from forgetless.platform import metrics as M
from forgetless.platform.engine import check_deepspeed_extra
from forgetless.platform.model_io import build_model, load_pretrained, load_torch_file
from forgetless.platform.ports import free_port
from forgetless.platform.results import (CompareResult, StopPoint, StrategyResult, Trajectory, mean_sd,
                                         summary_metrics)
from forgetless.platform.train_loop import FINAL_CHECKPOINT, MODEL_FILE, STATE_FILE, train_worker
from forgetless.platform.worker_job import CheckpointPolicy, RunState, StopPointRef, WorkerJob
from forgetless.strategies import available_strategies, get_strategy_class, make_strategy
from forgetless.strategies.base import check_trajectory_ends, task_infos

TRAJECTORY_FILE = "trajectory.json"
STOP_POINT_PREFIX = "stop_point_e"
STOP_POINT_FORMAT = STOP_POINT_PREFIX + "{epoch:04d}"  # the checkpoint names of the pre-training's stop points
WALL_FILE = "driver_wall.json"  # wall time of a finished transfer, measured by the driver


# ---------------------------------------------------------------------------------------------------------------------
# checks that must pass before anything starts


def preflight(cfg: ExperimentConfig) -> str:
    """Everything that can be checked without starting Ray; returns the resolved tracking URI."""
    _check_strategies(cfg)
    if cfg.deepspeed.extra:
        try:
            check_deepspeed_extra(cfg.deepspeed, cfg.scaling.use_gpu)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    # storage first: a missing bucket or wrong credentials is the likeliest cluster error, and the clearest
    storage.preflight(cfg.storage)
    weights = None
    if cfg.backbone.weights:
        storage.check_readable(cfg.backbone.weights, "backbone.weights")
        weights = _load_user_weights(cfg.backbone.weights)
    uri = tracking.resolve_tracking_uri(cfg.tracking.tracking_uri)
    tracking.check_reachable(uri)
    # The tasks are built once here too, so a bad class id or an unreadable file fails before Ray starts.
    try:
        tasks = build_stream(cfg.source, cfg.targets)
    except (ValueError, OSError) as e:
        raise ConfigError(f"tasks: {e}") from None
    shared_tasks.remember(cfg, tasks)  # the runs' workers read these from the object store instead of rebuilding
    _check_builtin_model(cfg, tasks, weights)
    for s in cfg.strategies:  # the strategies' own whole-experiment checks (e.g. a permutation spec exists)
        try:
            make_strategy(s.name, s.params, cfg.train.epochs, cfg.train.lr).check(cfg, tasks, load_torch_file)
        except (ValueError, OSError) as e:
            raise ConfigError(f"strategies[{s.display_name()}]: {e}") from None
    return uri


def _check_strategies(cfg: ExperimentConfig) -> None:
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
        if cfg.deepspeed.partitions_only and not cls.works_on_partitions:
            keep = [n for n in available_strategies() if get_strategy_class(n).works_on_partitions
                    and get_strategy_class(n).transfer]
            raise ConfigError(
                f"strategies[{s.display_name()}]: {s.name} reads or rewrites whole weights outside the engine, so "
                f"under ZeRO-3 every worker would build and gather the full model, which deepspeed.partitions_only "
                f"refuses; strategies that stay partitioned: {keep} (or set deepspeed.partitions_only: false)")
        if cls.supported_backbones is not None and not any(cfg.backbone.name.startswith(b)
                                                           for b in cls.supported_backbones):
            raise ConfigError(f"strategies[{s.display_name()}]: {s.name} does not support backbone "
                              f"{cfg.backbone.name!r}; supported: {list(cls.supported_backbones)}")
        if cfg.evaluation == "task_incremental" and not cls.has_per_task_parts:
            raise ConfigError(f"evaluation: {s.name} keeps no per-task parts, so task-incremental evaluation does not "
                              f"apply; set evaluation: class_incremental")


_SAVE_HINT = "save the weights with torch.save(model.state_dict(), PATH)"


def _load_user_weights(uri: str) -> dict[str, torch.Tensor]:
    """backbone.weights as the workers will load it (torch.load, weights_only=True), here, before anything starts."""
    try:
        state = load_torch_file(uri)
    except Exception as e:  # noqa: BLE001 - torch.load raises a different type for each kind of file it cannot read
        if str(e).startswith("Weights only load failed"):
            refused = re.search(r"(?i)unsupported global:? (?:GLOBAL )?([\w.]+)", str(e))
            what = f" ({refused.group(1)})" if refused else ""
            raise ConfigError(f"backbone.weights: {uri} holds pickled Python objects{what}, which forgetless never "
                              f"unpickles (torch.load with weights_only=True); {_SAVE_HINT}") from None
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise ConfigError(f"backbone.weights: {uri} is not a PyTorch weights file ({type(e).__name__}: {first}); "
                          f"{_SAVE_HINT}") from None
    if not (isinstance(state, dict) and state and all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                      for k, v in state.items())):
        what = f"a {type(state).__name__}" + (f" of {len(state)} item(s)" if hasattr(state, "__len__") else "")
        raise ConfigError(f"backbone.weights: {uri} holds {what}, not a state dict (parameter names to tensors); "
                          f"{_SAVE_HINT}")
    return state


def _check_builtin_model(cfg: ExperimentConfig, tasks, weights: dict[str, torch.Tensor] | None) -> None:
    """Build a built-in backbone on the tasks' inputs once (milliseconds) and load backbone.weights into it: a shape
    the backbone cannot take or weights of another architecture fail here, not in every worker after Ray started.
    (hf:, timm:, torchvision: backbones are checked by their own config checks; building one here would cost more.)"""
    if not is_builtin_backbone(cfg.backbone.name):
        return
    infos = task_infos(tasks)
    try:
        backbone = build_backbone(cfg.backbone.name, infos[0].input_shape, cfg.backbone.params).eval()
        with torch.no_grad():
            for shape in sorted({t.input_shape for t in infos}):
                backbone(torch.zeros(2, *shape))
    except (ValueError, RuntimeError) as e:
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise ConfigError(f"backbone: {cfg.backbone.name} with params {cfg.backbone.params} cannot take the tasks' "
                          f"inputs {sorted({t.input_shape for t in infos})} ({first}); change backbone.params or "
                          f"the backbone") from None
    if weights is not None:
        try:
            load_pretrained(TransferModel(backbone, [t.num_classes for t in infos]), weights)
        except (ValueError, RuntimeError) as e:  # torch's size-mismatch message spans lines: one line, shortened
            problem = " ".join(str(e).split())[:300]
            raise ConfigError(f"backbone.weights: {problem}; give weights saved from this backbone with these "
                              f"backbone.params") from None


def ensure_ray(cfg: ExperimentConfig) -> None:
    """Connect to cfg.ray_address / RAY_ADDRESS, or start an embedded local cluster; no-op if Ray is initialized."""
    if not ray.is_initialized():
        address = cfg.ray_address or os.environ.get("RAY_ADDRESS")
        if not address:
            check_embedded_resources(cfg)
        init_ray(address, cfg.scaling.use_gpu)


def init_ray(address: str | None, use_gpu: bool, num_cpus: int | None = None) -> None:
    """ray.init as every forgetless driver does it (benchmarks too, so they measure the same platform)."""
    env = {"PYTHONUNBUFFERED": "1", **controller_poll_env()}
    if console.verbose():
        env[console.VERBOSE_VARIABLE] = "1"
    if not use_gpu:
        env["DS_ACCELERATOR"] = "cpu"
    say(f"starting Ray ({'connecting to ' + address if address else 'embedded local cluster'})")
    # An embedded cluster: Ray starts worker processes at nice 15, so where the training workers fill the cores Ray's
    # own processes (raylet, GCS, dashboard, the Train controller) take CPU from them first: benchmarks/overhead.py
    # measured a 1.30x slower training loop at nice 15 with 2 workers on 2 cores (1.00x with a core left free). The
    # training workers are the job here, so they run at normal priority. (A cluster started with `ray start` keeps its
    # own setting: RAY_worker_niceness=0 in the environment of `ray start` does the same there.)
    system_config = None if address else {"worker_niceness": 0}
    global _EMBEDDED_CLUSTER
    _EMBEDDED_CLUSTER = not address
    if address:
        # A driver that runs as a Ray job already has its job's variables, and Ray refuses a driver runtime env that
        # sets one of them again (e.g. FORGETLESS_VERBOSE from `forgetless --verbose submit`): leave those out.
        env = {k: v for k, v in env.items() if os.environ.get(k) != v}
        ray.init(address=address, runtime_env={"env_vars": env}, log_to_driver=True, logging_level="ERROR",
                 configure_logging=True)
    else:
        _init_embedded_ray(env, num_cpus, system_config)
    # ray.init makes SIGTERM call sys.exit. `ray job stop` / `forgetless jobs stop` send SIGTERM, and a stop should end
    # the run the way Ctrl-C does: during a fit Ray Train's SIGINT handler aborts the run gracefully (its registered
    # checkpoints kept, so the same command resumes), elsewhere Python raises KeyboardInterrupt; either way the MLflow
    # parent run is marked KILLED (tracking.end_status). Only the main thread may set a handler.
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _sigterm_as_sigint)


# Whether this process started the Ray cluster it is connected to (init_ray): then fits clean their own placement
# groups up (lean_trainer) instead of starting Ray Train's cleaner process for each run.
_EMBEDDED_CLUSTER = False
# Set in the runtime env of an embedded cluster, so its processes (a Tune trial's, which runs a fit) know it too.
EMBEDDED_VARIABLE = "FORGETLESS_EMBEDDED_CLUSTER"


def on_embedded_cluster() -> bool:
    """Whether this process runs on (or started) an embedded cluster: one machine, no autoscaler to ask."""
    return _EMBEDDED_CLUSTER or os.environ.get(EMBEDDED_VARIABLE) == "1"


# Ray Train's controller collects reports (and commits checkpoints) once per health-check poll, 2 s by default; every
# epoch's checkpoint waits for its commit (so that a lost worker resumes from it), so that interval was a fixed cost
# of every epoch (benchmarks/fixed_cost.py). Polling two workers every 0.2 s costs the controller little.
CONTROLLER_POLL_VARIABLE = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
CONTROLLER_POLL_S = "0.2"


def controller_poll_env() -> dict[str, str]:
    """The controller's poll interval for the job's processes (a value the user set wins)."""
    return {CONTROLLER_POLL_VARIABLE: os.environ.get(CONTROLLER_POLL_VARIABLE, CONTROLLER_POLL_S)}


def _init_embedded_ray(env: dict[str, str], num_cpus: int | None, system_config: dict) -> None:
    """Start an embedded cluster that everything it starts can find without guessing: Ray Train's helper actors
    look a cluster up by address (RAY_ADDRESS, else any cluster on the machine: "Found multiple active Ray instances"
    when another one runs), so the GCS port is chosen here and RAY_ADDRESS given to every worker. DeepSpeed's C++ ops
    are built into this environment's own folder (build_locks). A watcher process ends the cluster's processes if
    this driver is killed (reaper).

    The cluster's variables (`env` and those above) are in this process's environment while `ray.init` starts the
    raylet, and so in that of every worker process the raylet starts; they are not a job runtime_env. A worker
    process with a runtime_env of its own (a job's applies to every task and actor) is started through Ray's
    setup_worker.py: one more Python start and `import ray` before the worker's own (~0.5 s wall, ~1 CPU-s each on
    2 cores, measured), and it is not given a process of the idle pool Ray starts beside the raylet. This process's
    environment is restored once the cluster runs."""
    gcs_port = free_port()
    env = {**env, "RAY_ADDRESS": f"{ray.util.get_node_ip_address()}:{gcs_port}", EMBEDDED_VARIABLE: "1",
           "TORCH_EXTENSIONS_DIR": build_locks.use_private_extensions_dir(),
           # Ray Train starts a preemption-watcher actor (one more process) for every worker group; nothing drains the
           # node of an embedded cluster, so it would only cost a process start per run (a value the user set wins)
           PREEMPTION_WATCHER_VARIABLE: os.environ.get(PREEMPTION_WATCHER_VARIABLE, "0"),
           # what Ray Train gives its controller (the Train controller runs blocking calls in its event loop by design)
           lean_trainer.BLOCKING_GET_WARNING_VARIABLE: os.environ.get(lean_trainer.BLOCKING_GET_WARNING_VARIABLE,
                                                                        lean_trainer.BLOCKING_GET_WARNING_DEFAULT)}
    dashboard = console.ray_dashboard()
    if not dashboard:
        # Nothing reads an embedded cluster's Ray metrics (no Prometheus scrapes a cluster that lives for one run);
        # collecting them kept the dashboard agent busy ingesting every process's histograms (docs/performance.md)
        system_config = {**system_config, "enable_metrics_collection": False}
    with temporary_environment({**env, GCS_PORT_VARIABLE: str(gcs_port)}):  # GCS_PORT_VARIABLE: read by ray.init
        # address="local": a new cluster, whatever RAY_ADDRESS (set above, for the workers) or another cluster on
        # this machine says
        context = ray.init(address="local", num_cpus=num_cpus, log_to_driver=True, logging_level="ERROR",
                           configure_logging=True, _system_config=system_config, include_dashboard=dashboard)
    lean_trainer.CONTROLLER_HOSTS.cluster_environment(ray.get_runtime_context().gcs_address, env)
    if dashboard:
        say(f"Ray dashboard: http://{context.dashboard_url}")
    actual = ray.get_runtime_context().gcs_address
    if actual != env["RAY_ADDRESS"]:
        say(f"the embedded Ray cluster is at {actual}, not {env['RAY_ADDRESS']} as its workers were told; another Ray "
            f"cluster on this machine may be picked up by Ray Train's helpers")
    # (a private attribute: Ray has no public call for the session's name, which tells this cluster's processes apart)
    reaper.start(Path(ray._private.worker._global_node.get_session_dir_path()).name)


@contextmanager
def temporary_environment(variables: dict[str, str]):
    """These variables set in this process's environment inside the block, the earlier values back after it."""
    saved = {k: os.environ.get(k) for k in variables}
    os.environ.update(variables)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


GCS_PORT_VARIABLE = "RAY_GCS_SERVER_PORT"
PREEMPTION_WATCHER_VARIABLE = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"


def _sigterm_as_sigint(signum, frame) -> None:
    signal.raise_signal(signal.SIGINT)


def check_embedded_resources(cfg: ExperimentConfig) -> None:
    """Before starting an embedded cluster: it gets this machine's CPUs (Ray's own count, which honours container
    limits) and the GPUs torch sees (CUDA_VISIBLE_DEVICES honoured, as Ray does), so a run it cannot place is refused
    before Ray starts."""
    _check_capacity(cfg, float(get_num_cpus()), float(torch.cuda.device_count()),
                    "this machine (the embedded Ray cluster)")


def _check_capacity(cfg: ExperimentConfig, cpus: float, gpus: float, where: str) -> None:
    need_cpu = cfg.scaling.num_workers * cfg.scaling.cpus_per_worker
    if cpus < need_cpu:
        raise ConfigError(f"scaling: {cfg.scaling.num_workers} workers x {cfg.scaling.cpus_per_worker} CPU need "
                          f"{need_cpu:g} CPUs but {where} has {cpus:g}; lower scaling.num_workers or "
                          f"scaling.cpus_per_worker")
    if cfg.scaling.use_gpu and gpus < cfg.scaling.num_workers:
        raise ConfigError(f"scaling.use_gpu: {cfg.scaling.num_workers} workers need {cfg.scaling.num_workers} GPUs but "
                          f"{where} has {gpus:g}; set scaling.use_gpu: false or run on a cluster with GPUs")


def check_resources(cfg: ExperimentConfig) -> None:
    """Right after connecting: a run the cluster cannot place would wait for resources forever."""
    total = ray.cluster_resources()
    _check_capacity(cfg, total.get("CPU", 0), total.get("GPU", 0), "the Ray cluster")
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
    # Workers run in a folder of Ray Train's own: a relative storage path means the driver's folder, so they are given
    # the absolute one (they write each checkpoint's manifest under it and restore from it).
    job = dataclasses.replace(job, config=job.config.model_copy(update={"storage": storage.normalize(cfg.storage)}),
                              tasks=shared_tasks.share(job.config))
    return lean_trainer.fit(
        train_worker, embedded_cluster=on_embedded_cluster(), started_it=_EMBEDDED_CLUSTER,
        train_loop_config=job,
        scaling_config=ScalingConfig(num_workers=cfg.scaling.num_workers, use_gpu=cfg.scaling.use_gpu,
                                     resources_per_worker={"CPU": cfg.scaling.cpus_per_worker}),
        run_config=RunConfig(
            name=job.run_name,
            **storage.ray_storage(cfg.storage),
            checkpoint_config=CheckpointConfig(num_to_keep=None if keep_all_checkpoints else 3),
            # A lost worker (preemption, OOM, node loss): Ray Train restarts the worker group, which resumes from the
            # latest intact checkpoint (train_loop.restore).
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
        tracking=target, init_weights=init_weights,
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
    with progress.board().watch(job.display_name, storage.join(storage.normalize(cfg.storage), run_name)):
        result = fit(cfg, job, keep_all_checkpoints=True)
    state = _read_state(result)
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
    say(f"strategy {strategy.display_name()}: Ray Train run {run_name} ({cfg.scaling.num_workers} workers, "
        f"DeepSpeed ZeRO-{cfg.deepspeed.zero_stage})")
    job = dataclasses.replace(transfer_job(cfg, strategy, init_weights, target, trajectory), submitted_at=time.time(),
                              display_name=run_label or strategy.display_name())
    # wall time sums every invocation of the run (a resumed one included); the watch says when the run stalls
    clock = watchdog.WallClock(storage.join(run_uri, WALL_FILE))
    with watchdog.RunWatch(run_name, run_uri, clock, lambda: _stall_hints(cfg)), \
            progress.board().watch(job.display_name, run_uri):
        result = fit(cfg, job, keep_all_checkpoints=False, callbacks=callbacks)
    returned = time.time()
    state = _read_state(result)
    timing.add(state.seconds, "finish", returned - (state.saved_at or returned))
    timing.add(state.seconds, "read_back", time.time() - returned)
    wall = clock.write(finished=state.finished)
    return _strategy_result(cfg, strategy, state, wall, _checkpoint_uri(cfg, run_name, result.checkpoint))


def _stall_hints(cfg: ExperimentConfig) -> str:
    """What a run that makes no progress may be waiting for, as far as the driver can see."""
    need = cfg.scaling.num_workers * cfg.scaling.cpus_per_worker
    free = ray.available_resources().get("CPU", 0.0)
    hints = [f"Free CPUs in the Ray cluster: {free:g} (this run's workers take {need:g} while they run)"]
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
    )


# ---------------------------------------------------------------------------------------------------------------------
# MLflow artifacts of a finished strategy run (driver side: plots and the exported model)


def log_strategy_artifacts(cfg: ExperimentConfig, res: StrategyResult, uri: str) -> None:
    """The driver's part of a strategy run (its metrics computed): `log_run_files` then `finish_run_outputs`."""
    if res.mlflow_run_id is not None:
        finish_run_outputs(cfg, res, uri, log_run_files(cfg, res, uri))


@dataclasses.dataclass
class RunFiles:
    """What `log_run_files` logged: the logged model's id (None without one) and the seconds per timing part."""
    model_id: str | None
    seconds: dict[str, float]


def log_run_files(cfg: ExperimentConfig, res: StrategyResult, uri: str) -> RunFiles:
    """What a strategy run's MLflow run gets that depends on no other run: the accuracy matrix and curves (files and
    plots), the context tags and the model (without its description). A compare does it in the background as each
    run returns, while the next ones train (RunOutputs)."""
    seconds: dict[str, float] = {}
    with timing.timed(seconds, "mlflow_artifacts"):
        _log_run_files(res, uri)
    model_id = None
    if cfg.tracking.log_model and res.checkpoint_uri:
        with timing.timed(seconds, "model_logging"):
            model_id = log_model(cfg, res, uri)
    return RunFiles(model_id, seconds)


def finish_run_outputs(cfg: ExperimentConfig, res: StrategyResult, uri: str, files: RunFiles) -> None:
    """What needs the comparison (res.metrics, relative to the best run): summary metrics at step 0 (one bar per run in
    MLflow's charts) and the descriptions of the run and its model; then the run ends at its training's end."""
    for part, value in files.seconds.items():
        timing.add(res.seconds, part, value)
    summary = summary_metrics(res.metrics)
    description = review.child_description(res, _strategy_doc(res.strategy))
    with timing.timed(res.seconds, "mlflow_artifacts"):
        tracking.log_metrics(uri, res.mlflow_run_id, summary, step=0)
        review.set_description(uri, res.mlflow_run_id, description)
        if files.model_id is not None:
            model_export.describe_model(uri, res.mlflow_run_id, files.model_id, description + MODEL_IO_NOTE, summary)
    # The run ends when its training ended, not when the last strategy's artifacts are logged; a run reused from an
    # earlier invocation keeps the end time it had.
    c = tracking.client(uri)
    c.set_terminated(res.mlflow_run_id, "FINISHED", end_time=c.get_run(res.mlflow_run_id).info.end_time
                     or res.ended_at_ms)


MODEL_IO_NOTE = ("\n\nInput: a batch of the tasks' inputs; output: every task head's logits, concatenated (the model's "
                 "metadata names each head's slice).")


class RunOutputs:
    """`log_run_files` of each finished run in one background thread, while the driver waits on later runs (its
    torch.export and plotting took ~12 CPU-seconds after the demo's last run); `finish` waits for a run's files
    and adds what needs the comparison."""

    def __init__(self, cfg: ExperimentConfig, uri: str):
        self._cfg, self._uri = cfg, uri
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="forgetless-run-files")
        self._files: dict[int, Future] = {}

    def run_returned(self, res: StrategyResult) -> None:
        if res.mlflow_run_id is not None:
            self._files[id(res)] = self._pool.submit(log_run_files, self._cfg, res, self._uri)

    def finish(self, res: StrategyResult) -> None:
        if res.mlflow_run_id is not None:
            finish_run_outputs(self._cfg, res, self._uri, self._files.pop(id(res)).result())

    def close(self) -> None:
        """After a failure: the files already queued are still written (a run's record stays complete)."""
        self._pool.shutdown(wait=True)


def _log_run_files(res: StrategyResult, uri: str) -> None:
    c = tracking.client(uri)
    with tempfile.TemporaryDirectory() as d:
        Path(d, "accuracy_matrix.json").write_text(json.dumps({
            "task_names": res.task_names, "rows": ["before"] + [f"after {n}" for n in res.task_names[1:]],
            "R": res.accuracy_matrix.tolist(), "evaluation": res.evaluation,
            "convention": f"R[i][j] = test {res.score} on task j after stage i; task 0 = source, row 0 = before "
                          "targets",
        }, indent=1))
        Path(d, "history.json").write_text(json.dumps({"history": res.history, "phases": res.phase_log}))
        plots.accuracy_matrix_heatmap(res.accuracy_matrix, res.task_names, f"{res.label}: {res.score} matrix",
                                      Path(d, "accuracy_matrix.png"))
        plots.learning_curves(res.history, res.task_names, f"{res.label}: learning and forgetting curves",
                              Path(d, "curves.png"), phases=res.phase_log)
        for f in ("accuracy_matrix.json", "accuracy_matrix.png", "history.json", "curves.png"):
            c.log_artifact(res.mlflow_run_id, str(Path(d, f)))
    review.set_tags(uri, res.mlflow_run_id, review.context_tags())


def _strategy_doc(name: str) -> str | None:
    """The docstring of a strategy's module: its one-line summary opens it."""
    return sys.modules[get_strategy_class(name).__module__].__doc__


def load_model(cfg: ExperimentConfig, res: StrategyResult):
    """Rebuild the trained model (strategy surgery included) from the run's consolidated checkpoint."""
    s = next(s for s in cfg.strategies if s.display_name() == res.label)
    tasks = shared_tasks.built_stream(cfg)
    model = build_model(cfg, task_infos(tasks), make_strategy(s.name, s.params, cfg.train.epochs, cfg.train.lr))
    model.load_state_dict(load_torch_file(storage.join(res.checkpoint_uri, MODEL_FILE)))
    return model.eval(), tasks


def log_model(cfg: ExperimentConfig, res: StrategyResult, uri: str) -> str:
    """The trained model as a logged model named after the strategy, at the run's final step (pt2 format)."""
    model, tasks = load_model(cfg, res)
    return model_export.log_strategy_model(uri, res.mlflow_run_id, res.label, model, tasks, res.global_step)


# ---------------------------------------------------------------------------------------------------------------------
# top level


def execute(cfg: ExperimentConfig, command: str, on_result: Callable[[StrategyResult], None] | None = None,
            seeds: list[int] | None = None) -> CompareResult:
    """Run every strategy of `cfg` on its stream, per seed (`seeds`, else the config's `seeds`/`seed`) from that seed's
    pre-trained checkpoint; independent runs side by side where the cluster has room (fanout); one MLflow parent run."""
    if seeds:
        cfg = cfg.model_copy(update={"seeds": list(seeds)})
    seed_list = cfg.seed_list()
    uri = preflight(cfg)
    _start_ray(cfg, uri)
    target = _open_parent(cfg, command, uri)
    try:
        out = _run_seeds(cfg, seed_list, target, on_result)
        _log_parent_summary(out, uri)
        tracking.flush_buffered(uri)  # metric points an MLflow outage kept on disk
        tracking.client(uri).set_terminated(target.parent_run_id, "FINISHED")
        return out
    except BaseException as e:
        tracking.client(uri).set_terminated(target.parent_run_id, tracking.end_status(e))
        raise


def _start_ray(cfg: ExperimentConfig, uri: str) -> None:
    """Connect to the configured cluster, or start the embedded one; then check the run fits in it."""
    if not ray.is_initialized() and not (cfg.ray_address or os.environ.get("RAY_ADDRESS")):
        # an embedded run's workers build DeepSpeed's ops on this machine: a stale build lock is named now, not
        # after Ray started (the workers wait on it too, bounded, wherever they run)
        build_locks.use_private_extensions_dir()
        build_locks.wait_for_build_locks()
        check_embedded_resources(cfg)  # a run the machine cannot place: refused before anything starts or is written
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="forgetless-open-store") as pool:
            store_opened = pool.submit(tracking.open_store, uri)  # beside the cluster's start: neither needs the other
            init_ray(None, cfg.scaling.use_gpu)
            store_opened.result()  # (a store that cannot be opened fails here as it would in _open_parent)
    else:
        ensure_ray(cfg)
    check_resources(cfg)


def _open_parent(cfg: ExperimentConfig, command: str, uri: str) -> tracking.TrackingTarget:
    exp_id = tracking.ensure_experiment(uri, cfg.tracking.experiment)
    review.set_model_training_view(uri, exp_id)  # MLflow opens it in the model-training view, not the GenAI one
    parent = tracking.start_parent_run(uri, exp_id, f"{cfg.name} ({command})", {
        "forgetless.command": command, "forgetless.name": cfg.name,
        "forgetless.config_hash": short_hash(cfg.model_dump(mode="json")),
        "forgetless.strategies": ",".join(s.display_name() for s in cfg.strategies),
        "forgetless.evaluation": cfg.evaluation, "forgetless.seeds": ",".join(map(str, cfg.seed_list())),
    })
    tracking.log_params(uri, parent, tracking.flatten("", cfg.model_dump(mode="json")))
    say(f"MLflow: {uri}, experiment {cfg.tracking.experiment!r}, parent run {parent}")
    return tracking.TrackingTarget(uri, exp_id, parent)


def _run_seeds(cfg: ExperimentConfig, seed_list: list[int], target: tracking.TrackingTarget,
               on_result: Callable[[StrategyResult], None] | None) -> CompareResult:
    """Pre-train per seed, then every strategy per seed; metrics relative to the best strategy of the same seed."""
    uri = target.tracking_uri
    per_seed = [cfg.for_seed(s) for s in seed_list]
    several = len(seed_list) > 1
    trajectories = fanout.run_all([functools.partial(pretrain, c, target, run_label=f"pretrain (seed {c.seed})"
                                                     if several else None) for c in per_seed],
                                  fanout.concurrency(cfg, len(per_seed)))
    c = tracking.client(uri)
    c.set_tag(target.parent_run_id, "forgetless.pretrain_run", trajectories[0].run_name)
    c.set_tag(target.parent_run_id, "forgetless.pretrain_reused", str(trajectories[0].reused).lower())
    calls = [functools.partial(transfer, sc, s, traj.final().uri, target, trajectory=traj,
                               run_label=f"{s.display_name()} (seed {sc.seed})" if several else None)
             for sc, traj in zip(per_seed, trajectories) for s in cfg.strategies]
    outputs = RunOutputs(cfg, uri)

    def returned(res: StrategyResult) -> None:
        outputs.run_returned(res)
        if on_result:
            on_result(res)

    try:
        results = fanout.run_all(calls, fanout.concurrency(cfg, len(calls)), returned)
        for seed in seed_list:
            group = [r for r in results if r.seed == seed]
            # learning-speed thresholds are relative to the best target accuracy *any* strategy reached (same seed)
            T = len(group[0].task_names) - 1
            best = {st: max(r.best_target_acc(st) for r in group) for st in range(1, T + 1)}
            for r in group:
                r.compute_metrics(best)
                outputs.finish(r)
    finally:
        outputs.close()
    return CompareResult(cfg.name, results, trajectories[0], target.parent_run_id, uri, target.experiment_id,
                         seeds=seed_list)


SEED_TABLES_FILE = "seeds.json"


def seed_aggregate_metrics(out: CompareResult) -> dict[str, float]:
    """The parent run's aggregates over seeds: `<label>/<summary metric>/mean` and `/sd` (MLflow names and scales, as
    each child run's summary metrics) and `<label>/n`."""
    metrics: dict[str, float] = {}
    for label in out.labels():
        runs = [summary_metrics(r.metrics) for r in out.runs(label)]
        metrics[f"{label}/n"] = float(len(runs))
        for name in runs[0]:
            mean, sd = mean_sd([m.get(name, math.nan) for m in runs])
            metrics[f"{label}/{name}/mean"] = mean
            if not math.isnan(sd):
                metrics[f"{label}/{name}/sd"] = sd
    return {k: v for k, v in metrics.items() if not math.isnan(v)}


def _write_seed_tables(out: CompareResult, folder: Path) -> str:
    """seeds.json: every seed's record and the per-strategy mean/sd/n (what the table shows, and more)."""
    Path(folder, SEED_TABLES_FILE).write_text(json.dumps(
        {"seeds": out.seeds, "per_seed": out.records(), "summary": out.summary_records(), "table": out.table()},
        indent=1, default=float))
    return SEED_TABLES_FILE


def _log_parent_summary(out: CompareResult, uri: str) -> None:
    """The parent run's description (findings, table, links), the comparison files and the HTML report; the pre-training
    run's context; the experiment's description and model-training view."""
    c = tracking.client(uri)
    with tempfile.TemporaryDirectory() as d:
        Path(d, "comparison.txt").write_text(out.table() + "\n")
        several = len(out.seeds) > 1
        Path(d, "comparison.json").write_text(json.dumps(
            [{"label": r.run_label(several), "strategy": r.strategy, "seed": r.seed, "metrics": r.metrics,
              "R": r.accuracy_matrix.tolist(), "task_names": r.task_names, "mlflow_run_id": r.mlflow_run_id}
             for r in out.results], indent=1))
        plots.comparison_curves({r.run_label(several): r.history for r in out.results},
                                Path(d, "comparison_curves.png"), f"{out.name}: strategies compared",
                                phases={r.run_label(several): r.phase_log for r in out.results})
        report_html.write_report(report_html.ComparisonView.of(out), Path(d, report_html.REPORT_FILE))
        files = ["comparison.txt", "comparison.json", "comparison_curves.png", report_html.REPORT_FILE]
        if several:
            files.append(_write_seed_tables(out, Path(d)))
        for f in files:
            c.log_artifact(out.parent_run_id, str(Path(d, f)))
    if several:
        tracking.log_metrics(uri, out.parent_run_id, seed_aggregate_metrics(out), step=0)
    context = review.context_tags()
    review.set_tags(uri, out.parent_run_id, context)
    if out.trajectory is not None and out.trajectory.mlflow_run_id and not out.trajectory.reused:
        review.set_tags(uri, out.trajectory.mlflow_run_id, context)
        review.set_description(uri, out.trajectory.mlflow_run_id, "Source pre-training: its stop points are the "
                               "strategies' starting weights (curves under `pretrain/...`).")
    review.set_description(uri, out.parent_run_id, review.parent_description(out))
    review.set_model_training_view(uri, out.experiment_id, review.experiment_description(
        out.name, out.experiment_id, out.parent_run_id))
