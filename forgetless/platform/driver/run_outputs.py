"""MLflow artifacts of a finished strategy run (driver side): the accuracy matrix, curves and plots, the summary
metrics, the descriptions and the exported model.
"""
from __future__ import annotations

import dataclasses
import json
import sys
import tempfile
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from forgetless import storage
from forgetless.config import ExperimentConfig
from forgetless.platform.analysis.metric_names import logged_under_old_names
from forgetless.platform.analysis.results import StrategyResult, summary_metrics
from forgetless.platform.tracking import mlflow_runs as tracking
from forgetless.platform.tracking import model_export, plots
from forgetless.platform.tracking import run_descriptions as review
from forgetless.platform.worker import shared_tasks, timing
from forgetless.platform.worker.model_io import build_model, load_torch_file
from forgetless.platform.worker.checkpoint_io import MODEL_FILE
from forgetless.strategies import get_strategy_class, make_strategy
from forgetless.strategies.base import task_infos


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
        review.set_description(uri, res.mlflow_run_id, description)
        log_summary(uri, res.mlflow_run_id, summary, files.model_id, description)
    # The run ends when its training ended, not when the last strategy's artifacts are logged; a run reused from an
    # earlier invocation keeps the end time it had.
    c = tracking.client(uri)
    c.set_terminated(res.mlflow_run_id, "FINISHED", end_time=c.get_run(res.mlflow_run_id).info.end_time
                     or res.ended_at_ms)


def log_summary(uri: str, run_id: str, summary: dict[str, float], model_id: str | None, description: str) -> None:
    """Each summary metric once per run, at step 0. With a logged model, the one write links it to the model:
    MLflow records a model-linked metric on its run as well, so logging it on the run too doubled every point. A run
    re-used from an earlier invocation keeps the summary points it has (logged by the invocation that trained it); one
    logged under the old metric definitions is left whole (a second step-0 `acc_pct` would contradict the first) and
    tagged so, and readers map its names (analysis/metric_names.metrics_from_mlflow, docs/metrics.md)."""
    c = tracking.client(uri)
    have = c.get_run(run_id).data.metrics
    if logged_under_old_names(have):
        c.set_tag(run_id, OLD_DEFINITIONS_TAG, OLD_DEFINITIONS_NOTE)
        return
    new = {k: v for k, v in summary.items() if k not in have}
    if model_id is None:
        tracking.log_metrics(uri, run_id, new, step=0)
    else:
        model_export.describe_model(uri, run_id, model_id, description + MODEL_IO_NOTE, new)


OLD_DEFINITIONS_TAG = "forgetless.metric_definitions"
OLD_DEFINITIONS_NOTE = ("old: summary metrics logged before the standard definitions (acc_pct and bwt_pp counted the "
                        "source); docs/metrics.md, Old names")


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
