"""The Ray Train worker function: one plain loop for the source pre-training and for every transfer strategy.

It knows nothing of strategy names: it asks the strategy for phases, extra loss terms and hooks, builds one DeepSpeed
engine per phase, shards data by rank, evaluates every task of the stream (sharded and all-reduced), and on every
checkpoint has every rank save its DeepSpeed shard and report, so that re-running the same run name resumes where it
stopped. What it is told is a `WorkerJob`; what it checkpoints is a `RunState` (both in worker_job.py).
"""
from __future__ import annotations

import time
from contextlib import nullcontext
from typing import Callable

import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from forgetless import console
from forgetless.backbones import TransferModel
from forgetless.data import build_stream
from forgetless.data.kinds import CAUSAL_LM
from forgetless.data.sharding import derive_seed, shard_batches
from forgetless.platform.analysis.metrics import perplexity
from forgetless.platform.worker import engine as ds
from forgetless.platform.worker import library_logs as quiet
from forgetless.platform.worker import op_builds as build_locks
from forgetless.platform.worker import eval_tasks, shared_tasks, timing
from forgetless.platform.worker.checkpoint_io import (
    FINAL_CHECKPOINT,
    restore,
    resume_optimizer,
    resumes_optimizer_shards,
    save_checkpoint,
)
from forgetless.platform.worker.engine import (
    destroy_engine,
    engine_zero_stage,
    ensure_accelerator_env,
    full_state_dict,
    make_engine,
    weight_access,
)
from forgetless.platform.worker.evaluation import evaluate
from forgetless.platform.worker.job import RunState, WorkerJob
from forgetless.platform.worker.model_io import (
    build_model,
    load_pretrained,
    load_torch_file,
    mapped_torch_file,
)
from forgetless.platform.worker.step_budget import budget_spent, budgeted_phase, skip_phase
from forgetless.platform.worker.run_reporting import (
    detail,
    log,
    WORKERS_METRIC,
    log_metrics,
    note_worker_count,
    report_progress,
    start_tracking,
)
from forgetless.platform.worker.worker_run import WorkerRun, keeps_partitions
from forgetless.strategies import make_strategy
from forgetless.strategies.base import Phase, PrepareContext, TrainingData, task_infos
from forgetless.strategies.training import set_train_mode, train_step


def train_worker(job: WorkerJob) -> None:
    """Entry point of every Ray Train worker: restore or start, train each stage of the job, finish."""
    startup = {"start_workers": time.time() - job.submitted_at} if job.submitted_at else {}
    quiet.quiet_worker_output()
    with timing.timed(startup, "distributed_init"):
        ensure_accelerator_env(job.use_gpu)
        init_process_group(job.use_gpu)
    with timing.timed(startup, "model_build"):
        run = open_run(job)
        resumed = restore(run)
        if not resumed and job.init_weights:
            load_initial_weights(run)
    if run.state.submitted_at == job.submitted_at:  # a worker group Ray Train restarted: the first one counted it
        startup.pop("start_workers", None)
    run.state.submitted_at = job.submitted_at
    for part, value in startup.items():  # after restore: the restored state holds the earlier invocations' parts
        timing.add(run.state.seconds, part, value)
    note_worker_count(run)  # an elastic run's resize: a line, and tags start_tracking sets
    with timing.timed(run.state.seconds, "tracking"):
        start_tracking(run)
    report_progress(run)
    if run.state.finished:
        log(run, "already finished; nothing to do")
        save_checkpoint(run, {"finished": 1}, FINAL_CHECKPOINT)
        return
    if not resumed:
        before_training(run)
    for stage in job.stages:
        if stage < run.state.stage or (stage == run.state.stage and run.state.stage_done):
            continue
        if stage > run.state.stage:
            run.state.enter_stage(stage)
        train_stage(run, stage)
    run.state.finished = True
    detail(run, f"finished after {run.state.global_step} optimizer steps")
    save_checkpoint(run, {"finished": 1, "global_step": run.state.global_step}, FINAL_CHECKPOINT)
    report_progress(run)


def init_process_group(use_gpu: bool) -> None:
    # DeepSpeed builds its C++ ops here on first use, under a lock a killed build leaves behind: a folder of this
    # environment, and a bounded wait on its locks that names a stale one (torch would wait on it forever).
    build_locks.use_private_extensions_dir()
    build_locks.wait_for_build_locks()
    # deferred: DeepSpeed picks its accelerator when first imported, after ensure_accelerator_env has set it
    import deepspeed

    with quiet.prints_hidden():  # "DeepSpeed ... op built successfully", as it loads its C++ op
        deepspeed.init_distributed(dist_backend="nccl" if use_gpu else "gloo")


def open_run(job: WorkerJob) -> WorkerRun:
    """Build this worker's tasks, strategy and model (identical on every rank) and a fresh run state."""
    cfg = job.config
    ctx = ray.train.get_context()
    tasks = (shared_tasks.fetch(job.tasks) if job.tasks is not None else build_stream(cfg.source, cfg.targets))[
        : job.num_tasks]
    infos = task_infos(tasks)
    strategy = make_strategy(job.strategy.name, job.strategy.params, job.optim.epochs, job.optim.lr)
    construction = nullcontext()
    if keeps_partitions(job, strategy):
        construction = ds.partitioned_construction(
            ds.deepspeed_config(cfg.deepspeed, job.optim.batch_size, ctx.get_world_size(), job.use_gpu))
    with construction:
        model = build_model(cfg, infos, strategy)
    device = ray.train.torch.get_device()
    model.to(device)
    state = RunState(task_names=[t.name for t in tasks], stage=job.stages[0])
    return WorkerRun(job, ctx.get_world_rank(), ctx.get_world_size(), device, tasks, infos, strategy, model, state)


def load_initial_weights(run: WorkerRun) -> None:
    """The job's starting weights (the pre-trained model): on partitions, each rank copies its own slices out of the
    memory-mapped file, so no rank reads the whole model into memory."""
    if not run.partitioned:
        load_pretrained(run.model, load_torch_file(run.job.init_weights))
        return
    with mapped_torch_file(run.job.init_weights) as state:
        load_pretrained(run.model, state, lambda sd: ds.load_full_into_partitions(run.model, sd, run.rank))


def forwards_outside_engine(run: WorkerRun):
    """A context in which the model's forward works with no engine: on partitions, each layer gathers its weights
    for its forward (every rank must run the same forwards); otherwise the weights are whole already."""
    return ds.gathering_forward(run.model) if run.partitioned and run.engine is None else nullcontext()


def before_training(run: WorkerRun) -> None:
    """What the strategy keeps of the starting model, then the first measurements (and θ⁰ where a trajectory starts)."""
    first = run.job.stages[0]
    prepare_strategy(run)
    strategy_data_hook(run, "after_source", 0)
    if first > 0:
        # Row 0 of R: the pre-trained model before any target training.
        log_metrics(run, record_row(run, first - 1))
    # The first point of every curve, measured as of the stage the run starts from (the targets' fresh heads).
    eval_point(run, max(first - 1, 0), None, "before", 0)
    policy = run.job.checkpoints
    if policy.at_start:
        save_checkpoint(run, {"epoch": 0, "global_step": 0}, policy.name(first, 0, 0))


def train_stage(run: WorkerRun, stage: int) -> None:
    """Every phase of one task, then the strategy's after-task hook and the task's row of the accuracy matrix."""
    task = run.infos[stage]
    state = run.state
    run.phases_in_stage = len(run.strategy.phases(run.model, task))
    for p in range(run.phases_in_stage):
        if p < state.phase or (p == state.phase and state.phase_done):
            continue
        if p > state.phase:
            state.enter_phase(p)
        # Fresh phase objects: the model is rebuilt between phases (their parameter lists must be its own).
        phase = budgeted_phase(run, stage, run.strategy.phases(run.model, task)[p], p == run.phases_in_stage - 1)
        if budget_spent(run.job.step_budget, state.stage_step):
            skip_phase(run, stage, phase)
            continue
        train_phase(run, stage, p, phase)
        state.phase_done = True
        release_engine(run)
    strategy_data_hook(run, "after_task", stage)
    row = record_row(run, stage)
    state.stage_done = True
    log_metrics(run, row)
    policy = run.job.checkpoints
    if policy.stage_end_format is not None:
        save_checkpoint(run, {**row, "global_step": state.global_step}, policy.stage_end_format.format(stage=stage))


def train_phase(run: WorkerRun, stage: int, p: int, phase: Phase) -> None:
    """One DeepSpeed engine, epochs until the phase's end or its stop rule; a checkpoint as the policy says."""
    state, job = run.state, run.job
    with timing.timed(state.seconds, "engine_init"):
        run.engine = make_engine(run.model, phase, *engine_batch(run), run.world, job.use_gpu)
    # ds_numel: under ZeRO-3 a parameter's local tensor is an empty partition once the engine exists.
    n_trainable = sum(getattr(prm, "ds_numel", prm.numel()) for prm in phase.trainable())
    state.trainable_params[f"{stage}/{phase.name}"] = n_trainable
    resume_optimizer(run)
    detail(run, f"stage {stage} ({run.infos[stage].name}) phase {phase.name}: {n_trainable} trainable parameters, "
                f"{phase.epochs} epochs")
    # the validation losses this phase has seen, for its stop rule (resumed runs continue the list)
    val_losses = [h["loss"][str(stage)] for h in state.history if h["stage"] == stage and h["phase"] == phase.name]
    for epoch in range(state.epoch, phase.epochs):
        train_loss, stop = train_epoch(run, stage, p, phase, epoch, val_losses)
        metrics = eval_point(run, stage, train_loss, phase.name, epoch + 1)
        if not evaluates_within_epochs(run, phase):
            stop = stops_after(phase, val_losses, last_val_loss(run, stage)) or stop
        state.epoch = epoch + 1
        state.phase_done = stop or epoch + 1 == phase.epochs
        if state.phase_done:
            state.phase_log.append({"stage": stage, "phase": phase.name, "epochs": epoch + 1, "steps": state.phase_step,
                                    "stopped_early": stop, "end_step": state.global_step,
                                    "budget_spent": budget_spent(job.step_budget, state.stage_step)})
        if console.verbose():  # otherwise the driver shows it (platform/driver/progress_board.py)
            shown = {k.removeprefix("pretrain/"): round(v, 4) for k, v in metrics.items()
                     if k.endswith(("val/source/acc", "val/target/acc", "train/loss"))}
            log(run, f"stage {stage} phase {phase.name} epoch {epoch + 1}/{phase.epochs} step {state.global_step} "
                     f"{shown}")
        report_progress(run, (p, phase, metrics))
        if job.checkpoints.due(epoch + 1, state.phase_done):
            save_checkpoint(run, {**metrics, "epoch": epoch + 1, "global_step": state.global_step},
                            job.checkpoints.name(stage, p, epoch + 1))
        if stop:
            why = "the step budget is spent" if budget_spent(job.step_budget, state.stage_step) else "its stop rule"
            log(run, f"phase {phase.name} ended early at step {state.phase_step}: {why}")
            break


def engine_batch(run: WorkerRun) -> tuple:
    """The optimizer settings and DeepSpeed section an engine gets at this worker count: the micro-batch and gradient
    accumulation of the batch plan (the config's at its most workers; more accumulation, or smaller micro-batches, at
    fewer), so that an optimizer step always averages the config's global batch; and the ZeRO stage it runs at
    (engine.engine_zero_stage: ZeRO-0 for a one-worker ZeRO-1/2 run, unless the phase resumes ZeRO-1/2's optimizer
    shards)."""
    plan, cfg = run.batch_plan(), run.job.config
    stage = engine_zero_stage(cfg.deepspeed, cfg.scaling.worker_counts(), run.job.use_gpu)
    if resumes_optimizer_shards(run):  # written at ZeRO-1/2 (by a forgetless before the one-worker rule): read them so
        stage = cfg.deepspeed.zero_stage
    return (run.job.optim.model_copy(update={"batch_size": plan.micro_batch}),
            cfg.deepspeed.model_copy(update={"gradient_accumulation_steps": plan.accumulation, "zero_stage": stage}))


def train_epoch(run: WorkerRun, stage: int, p: int, phase: Phase, epoch: int,
                val_losses: list[float]) -> tuple[float, bool]:
    """This rank's shard of the task, one train_step per micro-batch; returns (mean train loss, stop the phase)."""
    state, task, data = run.state, run.infos[stage], run.tasks[stage]
    every = phase.eval_every_steps or run.job.optim.eval_every_steps
    set_train_mode(run.model, phase)
    t0 = time.perf_counter()
    seed = derive_seed(run.job.config.seed, stage, p, epoch)
    generator = torch.Generator().manual_seed(seed)  # the phase's augmentation draws from it
    weights = weight_access(run.model, run.zero_stage)
    losses: list[float] = []
    stop = False
    own = shard_batches(data.x_train, data.y_train, run.batch_plan(), run.rank, seed)
    for xb, yb in run.strategy.train_batches(run.model, task, own, training_data(run, seed)):
        loss, updated = train_step(run.engine, run.model, run.strategy, phase, task, xb.to(run.device),
                                   yb.to(run.device), generator, weights)
        losses.append(loss)
        if not updated:  # steps count optimizer updates, not micro-batches (gradient accumulation)
            continue
        state.global_step += 1
        state.phase_step += 1
        state.stage_step += 1
        if every and state.phase_step % every == 0:
            eval_point(run, stage, sum(losses[-every:]) / len(losses[-every:]), phase.name, epoch)
            set_train_mode(run.model, phase)
            if stops_after(phase, val_losses, last_val_loss(run, stage)):
                stop = True
                break
        if phase.max_steps is not None and state.phase_step >= phase.max_steps:
            stop = True
            break
        if budget_spent(run.job.step_budget, state.stage_step):  # the evaluation at the stop follows (train_phase)
            stop = True
            break
    elapsed = time.perf_counter() - t0
    state.train_seconds += elapsed
    timing.add(state.seconds, "training", elapsed)
    return sum(losses) / max(1, len(losses)), stop


def training_data(run: WorkerRun, epoch_seed: int) -> TrainingData:
    """The stream's training splits (only those) for a strategy that mixes other examples into a task's batches."""
    return TrainingData([t.split("train") for t in run.tasks], run.rank, run.world, run.job.config.seed, epoch_seed)


def evaluates_within_epochs(run: WorkerRun, phase: Phase) -> bool:
    return bool(phase.eval_every_steps or run.job.optim.eval_every_steps)


def stops_after(phase: Phase, val_losses: list[float], val_loss: float) -> bool:
    """Record an evaluation's validation loss and ask the phase's stop rule whether the phase is over."""
    val_losses.append(val_loss)
    return phase.stop_rule is not None and phase.stop_rule(val_losses)


def last_val_loss(run: WorkerRun, stage: int) -> float:
    return run.state.history[-1]["loss"][str(stage)]


def eval_point(run: WorkerRun, stage: int, train_loss: float | None, phase_name: str, epoch: int) -> dict[str, float]:
    """Validation accuracy and loss of every task: one point of every curve, logged and kept in the history.

    Curve names say split and task (`val/target/acc`, `val/task/<name>/acc`, `train/loss`); the pre-training run's are
    under `pretrain/` so they never share a chart with the transfers'. The target of a point is the task of its stage;
    the "before" point (stage 0) of a transfer measures the first target's fresh head, where its curve starts."""
    with timing.timed(run.state.seconds, "evaluation"), forwards_outside_engine(run):
        res = evaluate(run.model, run.tasks, "val", stage, run.job.class_incremental, run.rank, run.world,
                       run.device)
    run.state.history.append({"step": run.state.global_step, "stage": stage, "phase": phase_name, "epoch": epoch,
                              "acc": {str(j): a for j, (a, _) in res.items()},
                              "loss": {str(j): loss for j, (_, loss) in res.items()}, "train_loss": train_loss})
    prefix = curve_prefix(run)
    metrics: dict[str, float] = {f"{prefix}val/source/acc": res[0][0], f"{prefix}val/source/loss": res[0][1]}
    if len(run.tasks) > 1:  # a stream with targets: the target is the task of the current stage
        target = max(stage, 1)
        metrics[f"{prefix}val/target/acc"] = res[target][0]
        metrics[f"{prefix}val/target/loss"] = res[target][1]
    for j, (acc, _) in res.items():
        metrics[f"{prefix}val/task/{run.infos[j].name}/acc"] = acc
    metrics.update(per_corpus_perplexity(run, res, "val"))
    with forwards_outside_engine(run):  # the config's eval_tasks (general-ability suites), never trained
        metrics.update(eval_tasks.curve_point(run, prefix))
    if train_loss is not None:
        metrics[f"{prefix}train/loss"] = train_loss
    metrics[f"{prefix}{WORKERS_METRIC}"] = float(run.world)
    log_metrics(run, metrics)
    return metrics


def curve_prefix(run: WorkerRun) -> str:
    return "pretrain/" if run.job.mode == "pretrain" else ""


def record_row(run: WorkerRun, stage: int) -> dict[str, float]:
    """Row `stage` of the accuracy matrix R: test accuracy on every task of the stream, logged as
    `test/task/<name>/acc` at the step the stage ended (row 0, before any target training, at step 0)."""
    with timing.timed(run.state.seconds, "evaluation"), forwards_outside_engine(run):
        res = evaluate(run.model, run.tasks, "test", stage, run.job.class_incremental, run.rank, run.world,
                       run.device)
    row = [res[j][0] for j in range(len(run.tasks))]
    run.state.R.append(row)
    run.state.L.append([res[j][1] for j in range(len(run.tasks))])
    out = {f"{curve_prefix(run)}test/task/{run.infos[j].name}/acc": acc for j, acc in enumerate(row)}
    with forwards_outside_engine(run):  # the eval tasks' columns of this row and their forgetting so far
        out.update(eval_tasks.row(run, curve_prefix(run)))
    return {**out, **per_corpus_perplexity(run, res, "test")}


def per_corpus_perplexity(run: WorkerRun, res: dict[int, tuple[float, float]], split: str) -> dict[str, float]:
    """`<split>/task/<name>/perplexity` of every causal-LM task (exp of its mean token loss; lower is better)."""
    return {f"{curve_prefix(run)}{split}/task/{run.infos[j].name}/perplexity": perplexity(loss)
            for j, (_, loss) in res.items() if run.infos[j].kind == CAUSAL_LM}


def all_reduce_mean(world: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """In-place mean of a tensor over ranks (every rank must call it)."""

    def mean(t: torch.Tensor) -> torch.Tensor:
        if world > 1:
            dist.all_reduce(t)
            t /= world
        return t

    return mean


def prepare_strategy(run: WorkerRun) -> None:
    """The strategy's `prepare` hook (every rank, full weights, no engine yet), with the source data, a sharded
    source evaluation, and, for a strategy that needs it, the pre-training trajectory's state dicts."""
    cfg, src = run.job.config, run.tasks[0]

    def source_accuracy(model: TransferModel) -> float:
        with forwards_outside_engine(run):
            return evaluate(model, run.tasks[:1], "val", 0, False, run.rank, run.world, run.device)[0][0]

    trajectory = None
    if run.strategy.needs_trajectory:
        trajectory = [(sp.epoch, load_torch_file(sp.uri)) for sp in run.job.trajectory]
    run.strategy.prepare(run.model, PrepareContext(
        rank=run.rank, world=run.world, device=run.device, source_train=(src.x_train, src.y_train),
        all_reduce_mean=all_reduce_mean(run.world), source_accuracy=source_accuracy, log=lambda msg: log(run, msg),
        log_metrics=lambda metrics, step: log_metrics(run, metrics, step), load_weights=load_torch_file,
        pretrain=cfg.pretrain, final_epoch=cfg.pretrain.epochs, trajectory=trajectory))


def strategy_data_hook(run: WorkerRun, hook: str, stage: int) -> None:
    """Call the strategy's `after_task` / `after_source` with this rank's training shard of task `stage` and a
    cross-rank mean (every rank calls it, so collectives inside match)."""
    data, device = run.tasks[stage], run.device
    seed = derive_seed(run.job.config.seed, stage, 10**6)

    def batches():
        return ((x.to(device), y.to(device)) for x, y in
                shard_batches(data.x_train, data.y_train, run.batch_plan(), run.rank, seed))

    getattr(run.strategy, hook)(run.model, run.infos[stage], batches, all_reduce_mean(run.world))


def release_engine(run: WorkerRun) -> None:
    """End of a phase: back to a plain model on full weights (gathered under ZeRO-3, fp32), so the next phase's
    surgery, the strategy's after-task hook and evaluation all see full weights, and the next engine starts
    from an unpartitioned module. On partitions (`run.partitioned`) nothing is gathered: the engine goes, the
    partitioned module stays."""
    if run.engine is None:
        return
    if run.partitioned:
        # The module keeps its partitions (updated by the last step); the next phase's engine starts from them.
        destroy_engine(run.engine)
        run.engine = None
        return
    with timing.timed(run.state.seconds, "engine_init"):
        full = full_state_dict(run.model, run.zero_stage)
        run.engine = None
        run.model = build_model(run.job.config, run.infos, run.strategy)
        run.model.load_state_dict(full)
        run.model.to(run.device)
