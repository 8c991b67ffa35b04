"""A search's results, read back from MLflow (the single record; `forgetless report` rebuilds from it too): the trials,
the best one, the result table, and the summary files logged on the parent run."""
from __future__ import annotations

import json
import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from forgetless.config import ConfigError
from forgetless.platform.tracking import plots
from forgetless.platform.tracking import mlflow_runs as tracking
from forgetless.platform.analysis.results import Trajectory, records_frame
from forgetless.platform.tuning.record import STATUS_TAG, TRIAL_TAG, with_retries
from forgetless.search_config import STOP_POINT


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

    def records(self) -> list[dict[str, Any]]:
        """One record per trial: id, status, epochs, objective (the value of `self.objective`), every searched parameter
        and every metric."""
        return [{"trial_id": t.trial_id, "status": t.status, "epochs": t.epochs, "objective": t.objective,
                 **t.params, **t.metrics, "mlflow_run_id": t.mlflow_run_id} for t in self.trials]

    def to_pandas(self):
        """`records()` as a pandas DataFrame indexed by trial id (pandas must be installed)."""
        return records_frame(self.records(), "trial_id")


# ---------------------------------------------------------------------------------------------------------------------
# read back


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
    # Every child but the pre-training run is a trial.
    trials = sorted((_trial_result(run, keys) for run in children if TRIAL_TAG in run.data.tags),
                    key=lambda t: t.trial_id)
    history = c.get_metric_history(parent_run_id, "trajectory/source_acc")
    objective = params.get("search.objective", "max target/acc")
    return SearchResult(params.get("search.name", parent.info.run_name), trials, objective.split(" ", 1)[0],
                        objective, parent_run_id, uri, keys, {int(h.step): h.value for h in history})


def _trial_result(run, keys: list[str]) -> TrialResult:
    """One trial, from its MLflow child run: its searched values (for `keys`), status and result."""
    tags = run.data.tags
    p = {k[len("search."):]: _parse(v) for k, v in run.data.params.items() if k.startswith("search.")}
    m = run.data.metrics
    metrics = {k[len("search/"):]: v for k, v in m.items() if k.startswith(("search/val/", "search/test/"))}
    return TrialResult(tags[TRIAL_TAG], {k: p.get(k) for k in keys}, tags.get(STATUS_TAG, "unknown"),
                       int(m.get("search/trial_epochs", 0)), m.get("search/objective", float("nan")), metrics,
                       run.info.run_id)


def _parse(v: str) -> Any:
    try:
        return yaml.safe_load(v)
    except yaml.YAMLError:
        return v


# ---------------------------------------------------------------------------------------------------------------------
# the table and the summary files


def _pct(v: float | None) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.1f}"


def _sort_key(v: Any) -> tuple:
    return (0, v, "") if isinstance(v, (int, float)) else (1, 0, str(v))


def _table_row(t: TrialResult, keys: list[str], best: TrialResult | None) -> list[str]:
    return [("* " if best and t.trial_id == best.trial_id else "  ") + t.trial_id,
            *[f"{t.params.get(k):g}" if isinstance(t.params.get(k), float) else str(t.params.get(k)) for k in keys],
            t.status, str(t.epochs), "-" if math.isnan(t.objective) else f"{t.objective:.4f}",
            _pct(t.metrics.get("test/target/acc")), _pct(t.metrics.get("test/source/acc")),
            _pct(t.metrics.get("test/forgetting"))]


def format_search_table(res: SearchResult) -> str:
    keys = res.space_keys
    headers = ["trial", *keys, "status", "epochs", "objective", "target % (test)", "source % (test)",
               "forgetting % (test)"]
    trials = sorted(res.trials, key=lambda t: tuple(_sort_key(t.params.get(k)) for k in keys))
    best = res.best
    rows = [_table_row(t, keys, best) for t in trials]
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows)]

    def line(cells: list[str]) -> str:
        return "  ".join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    foot = f"objective: {res.objective} (validation, last epoch); * = best finished trial"
    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(r) for r in rows] + [foot])


def _write_summary(res: SearchResult, d: Path) -> list[Path]:
    files = [d / "search_results.txt", d / "search_results.json", d / "target_vs_stop_point.png",
             d / "stop_point_lr_heatmap.png"]
    files[0].write_text(res.table() + "\n")
    files[1].write_text(json.dumps({
        "name": res.name, "objective": res.objective, "best": res.best.__dict__ if res.best else None,
        "trial_epochs": res.trial_epochs, "source_acc_by_stop_point": res.source_acc_by_stop_point,
        "trials": [t.__dict__ for t in res.trials]}, indent=1, default=str))
    plots.plot_target_vs_stop_point(res, files[2])
    plots.plot_heatmap(res, files[3])
    return files


def _log_summary(res: SearchResult, files: list[Path]) -> None:
    c = tracking.client(res.tracking_uri)
    for f in files:
        with_retries(c.log_artifact, res.parent_run_id, str(f))
    if res.best:
        with_retries(tracking.log_metrics, res.tracking_uri, res.parent_run_id,
                     {"best/objective": res.best.objective, "best/stop_point": res.best.stop_point,
                      "search/trial_epochs": res.trial_epochs}, step=0)


def log_search_summary(res: SearchResult, out_dir: Path | None = None, log: bool = True) -> list[Path]:
    """The result table (text + JSON) and the two figures; written to `out_dir` and logged on the parent run."""
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(out_dir or tmp)
        d.mkdir(parents=True, exist_ok=True)
        files = _write_summary(res, d)
        if log:
            _log_summary(res, files)
        return files if out_dir else []
