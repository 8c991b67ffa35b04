"""A search's results, read back from MLflow (the single record; `forgetless report` rebuilds from it too): the trials,
the best one, the Pareto front, the edge-of-range warnings and the result table. The files and tags a search's
summary logs are in `summary`."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import yaml

from forgetless.config import ConfigError
from forgetless.platform.tracking import mlflow_runs as tracking
from forgetless.platform.analysis.results import Trajectory, records_frame
from forgetless.platform.tuning import front as pareto
from forgetless.platform.tuning.objective import REPORT_SPLIT, SELECTION_SPLIT
from forgetless.platform.tuning.record import STATUS_TAG, TRIAL_TAG
from forgetless.search_config import DEFAULT_TRADE_OFF, STOP_POINT, metric_name


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
class ParetoFront:
    """The trials no other finished trial beats on every objective (on validation data), best on the first objective
    first; each carries its test-split numbers."""

    trade_off: list[tuple[str, str]]  # (metric, max|min) pairs the front is computed on
    trials: list[TrialResult]

    @property
    def trial_ids(self) -> list[str]:
        return [t.trial_id for t in self.trials]

    def records(self) -> list[dict[str, Any]]:
        """One record per front point: trial id, searched values, every trade-off metric on val (chosen on) and test
        (reported), status, epochs and MLflow run id."""
        return [{**pareto.front_record(t, self.trade_off), "status": t.status, "epochs": t.epochs,
                 "mlflow_run_id": t.mlflow_run_id} for t in self.trials]

    def to_pandas(self):
        """`records()` as a pandas DataFrame indexed by trial id (pandas must be installed)."""
        return records_frame(self.records(), "trial_id")

    def __len__(self) -> int:
        return len(self.trials)


@dataclass
class SearchResult:
    """A finished search: every trial, the best one (best objective among the trials that trained to the end) and the
    Pareto front of the trials on the search's trade-off (its `objectives`, or target/acc vs source/forgetting)."""

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
    trade_off: list[tuple[str, str]] = field(default_factory=lambda: [tuple(p) for p in DEFAULT_TRADE_OFF])
    multi_objective: bool = False  # a Pareto search (`search.objectives`): the trade-off is its objectives
    space: dict[str, Any] = field(default_factory=dict)  # each searched dimension (a list, or a range as a dict)

    @property
    def best(self) -> TrialResult | None:
        """Single objective: the best objective among finished trials. A Pareto search: the front point best on its
        first objective (one end of the front; `pareto()` is the answer)."""
        if self.multi_objective:
            front = self.pareto().trials
            return front[0] if front else None
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

    def pareto(self) -> ParetoFront:
        """The non-dominated finished trials on `trade_off`, computed on validation data."""
        return ParetoFront(list(self.trade_off), pareto.front_trials(self.trials, self.trade_off))

    def edge_warnings(self) -> list[str]:
        """A line per searched dimension where the chosen value (the best trial's, or a Pareto search's front
        points') sits at the edge of its range: widen the range."""
        if self.multi_objective:
            return pareto.edge_flags(self.pareto().trials, self.space, "front points")
        return pareto.edge_flags([self.best] if self.best else [], self.space, "the best trial")

    def table(self) -> str:
        return format_search_table(self)

    def records(self) -> list[dict[str, Any]]:
        """One record per trial: id, status, epochs, objective (the value of `self.objective`), every searched parameter,
        every metric, and whether it is on the Pareto front (`pareto`)."""
        on_front = pareto.front_mask(self.trials, self.trade_off)
        return [{"trial_id": t.trial_id, "status": t.status, "epochs": t.epochs, "objective": t.objective,
                 **t.params, **t.metrics, "pareto": front, "mlflow_run_id": t.mlflow_run_id}
                for t, front in zip(self.trials, on_front)]

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
    trade_off = _trade_off(params.get(TRADE_OFF_PARAM))
    multi = objective.startswith("pareto ")
    mode = trade_off[0][1] if multi else objective.split(" ", 1)[0]
    return SearchResult(params.get("search.name", parent.info.run_name), trials, mode, objective, parent_run_id, uri,
                        keys, {int(h.step): h.value for h in history}, trade_off=trade_off, multi_objective=multi,
                        space=_space(params, keys))


TRADE_OFF_PARAM = "search.pareto_on"  # the parent's param naming the front's metrics, e.g. "max target/acc, min ..."


def describe_trade_off(trade_off: list[tuple[str, str]]) -> str:
    return ", ".join(f"{d} {m}" for m, d in trade_off)


def _trade_off(described: str | None) -> list[tuple[str, str]]:
    if not described:  # a search logged before fronts were marked
        return [tuple(p) for p in DEFAULT_TRADE_OFF]
    pairs = [part.strip().split(" ", 1) for part in described.split(",")]
    return [(metric_name(m), d) for d, m in pairs]


def _space(params: dict[str, str], keys: list[str]) -> dict[str, Any]:
    """Each searched dimension as the parent run logged it; `stop_point: all` is the stop points searched."""
    space = {k: _parse(params.get(f"search.space.{k}", "null")) for k in keys}
    if space.get(STOP_POINT) in (None, "all"):
        space[STOP_POINT] = _parse(params.get("search.stop_points", "null"))
    return {k: v for k, v in space.items() if v is not None}


def _trial_result(run, keys: list[str]) -> TrialResult:
    """One trial, from its MLflow child run: its searched values (for `keys`), status and result."""
    tags = run.data.tags
    p = {k[len("search."):]: _parse(v) for k, v in run.data.params.items() if k.startswith("search.")}
    m = run.data.metrics
    metrics = {_standard(k[len("search/"):]): v for k, v in m.items() if k.startswith(("search/val/", "search/test/"))}
    return TrialResult(tags[TRIAL_TAG], {k: p.get(k) for k in keys}, tags.get(STATUS_TAG, "unknown"),
                       int(m.get("search/trial_epochs", 0)), m.get("search/objective", float("nan")), metrics,
                       run.info.run_id)


def _standard(key: str) -> str:
    """`val/forgetting` (a search logged under an older name) read as `val/source/forgetting`."""
    split, _, name = key.partition("/")
    return f"{split}/{metric_name(name)}"


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


def _metric_columns(res: SearchResult) -> list[tuple[str, str]]:
    """(header, metric key) of the value columns: the trade-off's metrics on validation (what the front is computed
    on), then the test split's target, source and forgetting (what is reported)."""
    chosen = [(f"{m} % ({SELECTION_SPLIT})", f"{SELECTION_SPLIT}/{m}") for m, _ in res.trade_off]
    reported = [(f"{label} % ({REPORT_SPLIT})", f"{REPORT_SPLIT}/{m}") for label, m in
                (("target", "target/acc"), ("source", "source/acc"), ("forgetting", "source/forgetting"))]
    return chosen + reported


def _table_row(t: TrialResult, keys: list[str], best: TrialResult | None, on_front: bool,
               columns: list[tuple[str, str]]) -> list[str]:
    return [("* " if best and t.trial_id == best.trial_id else "  ") + t.trial_id,
            *[f"{t.params.get(k):g}" if isinstance(t.params.get(k), float) else str(t.params.get(k)) for k in keys],
            t.status, str(t.epochs), "-" if math.isnan(t.objective) else f"{t.objective:.4f}",
            *[_pct(t.metrics.get(key)) for _, key in columns], "P" if on_front else ""]


def _table_footer(res: SearchResult) -> list[str]:
    trade_off = describe_trade_off(res.trade_off)
    if res.multi_objective:
        lines = [f"objectives: {trade_off} (Pareto search; objective column = the first); P = on the Pareto front "
                 f"(non-dominated on {SELECTION_SPLIT}idation data, last epoch); * = front point best on the first "
                 f"objective; {REPORT_SPLIT} columns are reported, never used to choose"]
    else:
        lines = [f"objective: {res.objective} ({SELECTION_SPLIT}idation, last epoch); * = best finished trial; "
                 f"P = on the Pareto front of {trade_off} ({SELECTION_SPLIT}idation); {REPORT_SPLIT} columns are "
                 f"reported, never used to choose"]
    return lines + [f"! {w}" for w in res.edge_warnings()]


def format_search_table(res: SearchResult) -> str:
    keys = res.space_keys
    columns = _metric_columns(res)
    headers = ["trial", *keys, "status", "epochs", "objective", *[h for h, _ in columns], "pareto"]
    front = set(res.pareto().trial_ids)
    trials = sorted(res.trials, key=lambda t: tuple(_sort_key(t.params.get(k)) for k in keys))
    best = res.best
    rows = [_table_row(t, keys, best, t.trial_id in front, columns) for t in trials]
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows)]

    def line(cells: list[str]) -> str:
        return "  ".join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(r) for r in rows] + _table_footer(res))
