"""What a worker tells the outside (world rank 0 only): its MLflow child run and metrics, the progress file the
driver's board reads, and its console lines.
"""
from __future__ import annotations

import sys
import time

from forgetless import console, storage
from forgetless.platform.tracking import mlflow_runs as tracking
from forgetless.platform.tracking import run_descriptions as review
from forgetless.platform.worker import progress_file as progress
from forgetless.platform.worker import timing
from forgetless.platform.worker.worker_run import WorkerRun
from forgetless.strategies.base import Phase


WORKERS_METRIC = "ray/workers"  # the worker count, a point at every evaluation (a resize shows as a step)


def note_worker_count(run: WorkerRun) -> str | None:
    """Every rank, as a worker group starts: record its worker count in the run's state when it differs from the
    previous group's (the first group's too). Returns the console line of a resize (None if the count is unchanged or
    this is the first group); rank 0 prints it."""
    records = run.state.workers
    before = records[-1]["workers"] if records else None
    if before == run.world:
        return None
    records.append({"step": run.state.global_step, "workers": run.world, "at": time.time()})
    if before is None:
        return None
    if run.world < before:
        why = "a worker or its node was lost (or the cluster has no room for more)"
    else:
        why = "room returned in the cluster"
    line = (f"resized: {before} -> {run.world} workers at step {run.state.global_step}: {why}; the global batch, "
            f"learning-rate schedule and data order are unchanged")
    log(run, line)
    return line


def worker_tags(run: WorkerRun) -> dict[str, str]:
    """The MLflow tags of the run's worker counts: `forgetless.workers` (the current), `forgetless.resizes` (how
    many) and `forgetless.resize.N` for each (when, from how many to how many, at which step)."""
    records = run.state.workers
    tags = {"forgetless.workers": str(run.world), "forgetless.resizes": str(max(0, len(records) - 1))}
    for n, (a, b) in enumerate(zip(records, records[1:]), start=1):
        when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(b["at"]))
        why = "node lost" if b["workers"] < a["workers"] else "room returned"
        tags[f"forgetless.resize.{n}"] = f"{a['workers']} -> {b['workers']} workers at step {b['step']}, {when} ({why})"
    return tags


def start_tracking(run: WorkerRun) -> None:
    """Create (or, on resume, reopen) this run's MLflow child run under the invocation's parent."""
    if run.rank != 0:
        return
    job = run.job
    tags = {tracking.RUN_KEY_TAG: job.run_name, "forgetless.mode": job.mode,
            "forgetless.evaluation": job.config.evaluation, "forgetless.run_name": job.run_name,
            **run.strategy.tags(), **worker_tags(run)}
    params = tracking.flatten("", job.config.model_dump(mode="json", exclude={"strategies"}))
    params.update(tracking.flatten("strategy", job.strategy.model_dump(mode="json")))
    params["ray.num_workers"] = run.world
    known_run_id = run.state.mlflow_run_id
    run.state.mlflow_run_id = tracking.open_child_run(job.tracking, job.run_name, job.display_name, tags, params,
                                                      known_run_id)
    uri, run_id = job.tracking.tracking_uri, run.state.mlflow_run_id
    try:
        if known_run_id is None:  # a resumed run has its datasets already
            review.log_task_datasets(uri, run_id, run.tasks)
        review.start_system_metrics(uri, run_id)
    except Exception as e:  # noqa: BLE001 - what a reviewer reads must never stop training
        log(run, f"could not log datasets or system metrics to MLflow: {str(e).splitlines()[0][:200]}")


def log_metrics(run: WorkerRun, metrics: dict[str, float], step: int | None = None) -> None:
    if run.rank == 0:
        with timing.timed(run.state.seconds, "tracking"):
            tracking.log_metrics(run.job.tracking.tracking_uri, run.state.mlflow_run_id, metrics,
                                 step=run.state.global_step if step is None else step)


def report_progress(run: WorkerRun, at: tuple[int, Phase, dict[str, float]] | None = None) -> None:
    """Rank 0: the run's progress.json for the driver's live view (`at`: the phase index, phase and metrics of the
    epoch just ended; None: where the run stands, at its start or end). Never stops training."""
    if run.rank != 0:
        return
    state, job = run.state, run.job
    p, phase, metrics = at if at is not None else (state.phase, None, {})
    if at is not None:
        val = lambda task: next((v for k, v in metrics.items() if k.endswith(f"val/{task}/acc")), None)  # noqa: E731
        target, source = val("target"), val("source")
    else:  # a start or an end: the run's last evaluation (its final numbers at the end; the resume point's on resume)
        target, source = progress.final_accuracies(state.history)
    record = progress.progress_record(
        job.display_name, state.stage, job.stages, phase.name if phase else ("done" if state.finished else "-"), p,
        run.phases_in_stage, state.epoch, phase.epochs if phase else state.epoch, state.global_step, target, source,
        finished=state.finished, resumed_from=state.resumed_from)
    try:
        progress.write_progress(storage.join(storage.normalize(job.config.storage), job.run_name), record)
    except Exception as e:  # noqa: BLE001 - a progress line is not worth a run
        warn(run, f"could not write progress.json: {str(e).splitlines()[0][:200]}")


def log(run: WorkerRun, msg: str) -> None:
    if run.rank == 0:
        # Not print(): Ray Train patches print on workers to both echo the line and log it, so every line would
        # reach the driver twice. stderr, as the driver's own status lines: stdout carries only the results
        # (the table, or --json).
        sys.stderr.write(f"[forgetless {run.job.display_name}] {msg}\n")
        sys.stderr.flush()


def detail(run: WorkerRun, msg: str) -> None:
    """A line only `--verbose` shows: what the driver's progress view and the table already say (phase, steps)."""
    if console.verbose():
        log(run, msg)


def warn(run: WorkerRun, msg: str) -> None:
    if run.rank == 0:
        sys.stderr.write(f"[forgetless {run.job.display_name}] warning: {msg}\n")
        sys.stderr.flush()
