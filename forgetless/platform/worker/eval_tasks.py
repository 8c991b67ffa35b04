"""The config's `eval_tasks:` inside a worker: built once per run, scored at every evaluation point (curves
`val/eval/<name>/<metric>`), and at the end of every stage (the suites' columns of R, `state.eval_rows`, logged as
`test/eval/<name>/<metric>` with the forgetting so far, `eval/<name>/forgetting`)."""
from __future__ import annotations

from forgetless.data.eval_suites import build_eval_suites
from forgetless.platform.analysis.eval_tasks import eval_task_forgetting
from forgetless.platform.worker import timing
from forgetless.platform.worker.evaluation import evaluate_suites
from forgetless.platform.worker.worker_run import WorkerRun


def suites(run: WorkerRun) -> list:
    """The run's eval tasks, built on first use (every rank builds the same)."""
    if run.eval_suites is None:
        run.eval_suites = build_eval_suites(run.job.config.eval_tasks)
    return run.eval_suites


def score(run: WorkerRun, split: str) -> dict[str, dict[str, float]]:
    """{suite: {metric: value}}; every rank must call it (sharded forwards, summed over ranks)."""
    if not run.job.config.eval_tasks or run.job.mode == "pretrain":  # the suites measure the transfers
        return {}
    with timing.timed(run.state.seconds, "evaluation"):
        return evaluate_suites(run.model, suites(run), split, run.rank, run.world, run.device)


def as_metrics(scores: dict[str, dict[str, float]], prefix: str) -> dict[str, float]:
    return {f"{prefix}/{name}/{metric}": value for name, values in scores.items() for metric, value in values.items()}


def curve_point(run: WorkerRun, prefix: str) -> dict[str, float]:
    """The suites at an evaluation point: kept in the point's history record (under "eval") and returned as curves."""
    scores = score(run, "val")
    if scores:
        run.state.history[-1]["eval"] = scores
    return as_metrics(scores, f"{prefix}val/eval")


def row(run: WorkerRun, prefix: str) -> dict[str, float]:
    """The suites' columns of the row of R just measured, and each suite's forgetting since row 0."""
    scores = score(run, "test")
    if not scores:
        return {}
    run.state.eval_rows.append(scores)
    return {**as_metrics(scores, f"{prefix}test/eval"), **eval_task_forgetting(run.state.eval_rows)}
