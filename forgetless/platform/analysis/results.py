"""Result objects returned by the Python API and printed by the CLI."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from forgetless.platform.analysis import metrics as M
from forgetless.platform.analysis import paired as paired_stats
from forgetless.platform.analysis import tradeoff
from forgetless.platform.analysis.eval_tasks import eval_columns, eval_task_forgetting
# the metric names (MLflow's and the old ones) live in metric_names; results re-exports what callers import from it
from forgetless.platform.analysis.metric_names import (  # noqa: F401 - re-exported
    SUMMARY_METRICS, metrics_from_mlflow, read_metrics, summary_metrics)


@dataclass
class StopPoint:
    epoch: int
    uri: str  # the consolidated model file (model.pt) of this checkpoint
    source_val_acc: float | None


@dataclass
class Trajectory:
    """The pre-training trajectory: stop points θ^e of the source run, ordered by epoch (θ⁰ first)."""

    run_name: str
    uri: str
    stop_points: list[StopPoint]
    mlflow_run_id: str | None = None
    reused: bool = False

    def final(self) -> StopPoint:
        return self.stop_points[-1]

    def at(self, epoch: int) -> StopPoint:
        for sp in self.stop_points:
            if sp.epoch == epoch:
                return sp
        raise KeyError(f"no stop point at epoch {epoch}; available: {[s.epoch for s in self.stop_points]}")

    def to_dict(self) -> dict[str, Any]:
        return {"run_name": self.run_name, "uri": self.uri,
                "stop_points": [sp.__dict__ for sp in self.stop_points], "mlflow_run_id": self.mlflow_run_id}

    @classmethod
    def from_dict(cls, d: dict[str, Any], reused: bool = False) -> "Trajectory":
        return cls(d["run_name"], d["uri"], [StopPoint(**s) for s in d["stop_points"]], d.get("mlflow_run_id"), reused)


@dataclass
class StrategyResult:
    """One strategy on one stream: the accuracy matrix, the curves, and the metrics derived from them."""

    label: str
    strategy: str
    task_names: list[str]
    accuracy_matrix: np.ndarray
    history: list[dict]
    phase_log: list[dict]
    trainable_params: dict[str, int]
    global_step: int
    wall_seconds: float
    train_seconds: float
    mlflow_run_id: str | None
    checkpoint_uri: str | None
    evaluation: str
    tags: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    ended_at_ms: int | None = None  # when its training ended (the child run's end time), epoch milliseconds
    seconds: dict[str, float] = field(default_factory=dict)  # where the run's wall time went (platform/worker/timing.py)
    seed: int = 0
    task_kind: str = "classification"  # data/kinds.py; causal_lm: R holds next-token accuracy
    score: str = "accuracy"  # what R holds (ExperimentConfig.score): accuracy or token_probability = exp(-test loss)
    # L[i][j]: test mean loss on task j after stage i (per token for causal_lm; nats, lower is better), shaped like R
    loss_matrix: np.ndarray | None = None
    # the config's eval_tasks (general-ability suites), row for row with R: {suite: {metric: value}}
    eval_rows: list[dict] = field(default_factory=list)

    def record(self) -> dict[str, Any]:
        """A flat dict for scripts and DataFrames: label, strategy, seed, every metric (metric names as keys), the wall
        and training seconds, optimizer steps, the MLflow run id and the final checkpoint."""
        return {"label": self.label, "strategy": self.strategy, "seed": self.seed, **self.metrics,
                "wall_seconds": self.wall_seconds,
                "train_seconds": self.train_seconds, "global_step": self.global_step,
                "mlflow_run_id": self.mlflow_run_id, "checkpoint_uri": self.checkpoint_uri}

    def run_label(self, with_seed: bool) -> str:
        """The label, with the seed where a comparison ran several (`finetune (seed 1)`: its MLflow run's name)."""
        return f"{self.label} (seed {self.seed})" if with_seed else self.label

    def curve(self, task: int, stage: int | None = None) -> tuple[list[int], list[float]]:
        """(steps, val acc) of a task; with `stage`, only that stage's points, steps counted from its start."""
        pts = [h for h in self.history if stage is None or h["stage"] in (stage, stage - 1)]
        if stage is not None:
            start = max([h["step"] for h in self.history if h["stage"] == stage - 1] or [0])
            pts = [h for h in pts if h["step"] >= start]
            return [h["step"] - start for h in pts], [h["acc"][str(task)] for h in pts]
        return [h["step"] for h in pts], [h["acc"][str(task)] for h in pts]

    def best_target_acc(self, stage: int) -> float:
        """The best validation accuracy the task of `stage` reached while it was trained (learning-speed thresholds
        are fractions of the best any compared strategy reached)."""
        return max(self.curve(stage, stage)[1])

    def compute_metrics(self, reference_best: dict[int, float] | None = None) -> dict[str, float]:
        """Matrix metrics + learning speed. `reference_best[stage]` is the best target val acc any compared strategy
        reached on that stage (thresholds are 90% / 95% of it); default: this run's own best."""
        out = M.summarize(self.accuracy_matrix)
        if self.task_kind == "causal_lm" and self.loss_matrix is not None and len(self.loss_matrix):
            out.update(M.summarize_losses(self.loss_matrix))
        out.update(eval_task_forgetting(self.eval_rows))
        T = len(self.task_names) - 1
        for pct in (90, 95):
            steps = []
            for s in range(1, T + 1):
                st, acc = self.curve(s, s)
                best = (reference_best or {}).get(s, max(acc))
                steps.append(M.steps_to_threshold(st, acc, pct / 100.0 * best))
            out[f"steps_to/{pct}"] = float("nan") if any(v is None for v in steps) else float(np.mean(steps))
        out["aulc"] = float(np.mean([M.area_under_curve(*self.curve(s, s)) for s in range(1, T + 1)]))
        out["source/auc"] = M.area_under_curve(*self.curve(0))
        out["trainable_params/max"] = float(max(self.trainable_params.values() or [0]))
        out["wall_seconds"] = self.wall_seconds
        out["train_seconds"] = self.train_seconds
        out["optimizer_steps"] = float(self.global_step)
        self.metrics = out
        return out


@dataclass
class CompareResult:
    """Several strategies on the same stream, each seed from its own pre-trained checkpoint (one seed: `seeds=[seed]`).
    `results` holds one StrategyResult per strategy and seed, seed by seed in the config's strategy order."""

    name: str
    results: list[StrategyResult]
    trajectory: Trajectory | None  # the first seed's pre-training
    parent_run_id: str | None
    tracking_uri: str
    experiment_id: str | None = None
    seeds: list[int] = field(default_factory=lambda: [0])
    reference: str | None = None  # the strategy paired statistics compare with (ExperimentConfig.reference_label)

    def __getitem__(self, label: str) -> StrategyResult:
        """The strategy's result (its first seed's; `runs(label)` gives every seed's)."""
        runs = self.runs(label)
        if not runs:
            raise KeyError(label)
        return runs[0]

    def runs(self, label: str) -> list[StrategyResult]:
        return [r for r in self.results if r.label == label]

    def labels(self) -> list[str]:
        return list(dict.fromkeys(r.label for r in self.results))

    def table(self) -> str:
        """The comparison table; with several seeds every column is mean ± sd over the seeds, with n."""
        if len(self.seeds) == 1:
            return format_table(self.results) + "\n" + TABLE_CAPTION
        return (format_seed_table(self.results) + "\n" + TABLE_CAPTION
                + paired_section(self.results, self.reference_label()))

    def records(self) -> list[dict[str, Any]]:
        """One record per strategy and seed: label, strategy, seed, every metric, times, MLflow run, and `pareto`
        (whether the strategy is on the learning-vs-forgetting front; with several seeds, of the means)."""
        return tradeoff.with_pareto([r.record() for r in self.results])

    def reference_label(self) -> str:
        """The strategy the paired statistics compare with: `reference`, else finetune where listed, else the first."""
        labels = self.labels()
        return self.reference or ("finetune" if "finetune" in labels else labels[0])

    def paired(self) -> list[paired_stats.PairedDifference]:
        """Each strategy − the reference, seed by seed, on the headline metrics (analysis/paired.py); none with one
        seed."""
        if len(self.seeds) < 2:
            return []
        return paired_stats.paired_differences(self.records(), self.reference_label())

    def summary_records(self) -> list[dict[str, Any]]:
        """One record per strategy over its seeds: label, strategy, n, and `<metric>/mean`, `<metric>/sd`."""
        return aggregate_records(self.records())

    def to_pandas(self, summary: bool = False):
        """`records()` (or `summary_records()`) as a pandas DataFrame (pandas must be installed): indexed by label,
        and by label and seed when the comparison ran several seeds."""
        if summary:
            return records_frame(self.summary_records(), "label")
        return records_frame(self.records(), "label" if len(self.seeds) == 1 else ["label", "seed"])


# what aggregate_records leaves out: identifiers, not measurements
NOT_AGGREGATED = ("label", "strategy", "seed", "mlflow_run_id", "checkpoint_uri", "pareto")


def mean_sd(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1) of the values that are numbers; sd is nan below two values."""
    vals = np.asarray([v for v in values if v is not None and not math.isnan(v)], dtype=float)
    if vals.size == 0:
        return math.nan, math.nan
    return float(vals.mean()), float(vals.std(ddof=1)) if vals.size > 1 else math.nan


def aggregate_records(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per label (in first-seen order): n runs, and the mean and sample sd of every numeric column over them."""
    out = []
    for label in dict.fromkeys(r["label"] for r in records):
        group = [r for r in records if r["label"] == label]
        row: dict[str, Any] = {"label": label, "strategy": group[0]["strategy"], "n": len(group)}
        for key in group[0]:
            if key in NOT_AGGREGATED or not all(isinstance(r.get(key), (int, float)) for r in group):
                continue
            row[f"{key}/mean"], row[f"{key}/sd"] = mean_sd([float(r[key]) for r in group])
        if "pareto" in group[0]:
            row["pareto"] = group[0]["pareto"]
        out.append(row)
    return out


def records_frame(records: list[dict[str, Any]], index: str):
    """Records as a pandas DataFrame; pandas is not a forgetless dependency, so a missing one is said plainly."""
    try:
        # deferred: optional (Ray's data extra brings it); only callers of to_pandas need it
        import pandas as pd
    except ImportError:
        raise ImportError("to_pandas() needs pandas: pip install pandas (records() gives the same rows as "
                          "dicts)") from None
    return pd.DataFrame.from_records(records).set_index(index)


def _fmt(v: float | None, pct: bool = False) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{100 * v:.1f}" if pct else f"{v:.0f}" if abs(v) >= 100 or float(v).is_integer() else f"{v:.2f}"


# the table's columns: header, metric key, shown as a percentage (docs/metrics.md defines each). ACC and BWT are over
# the targets (BWT "-" with one target); the source's own loss is its own column; Chaudhry's forgetting (every task
# before the last, the source included) only where there are several targets: with one it is the source's forgetting.
TABLE_COLUMNS = [("ACC %", "acc", True), ("source before %", "source/acc_before", True),
                 ("source after %", "source/acc_after", True), ("source forgetting pp", "source/forgetting", True),
                 ("BWT pp", "bwt", True), ("steps to 90%", "steps_to/90", False),
                 ("trainable", "trainable_params/max", False)]
SEVERAL_TARGETS_COLUMNS = [("forgetting pp", "forgetting/max", True)]
# causal-LM streams add perplexity columns after BWT (their accuracies are next-token accuracies)
PERPLEXITY_COLUMNS = [("target ppl", "target/corpus_mean_perplexity", False),
                      ("source ppl before", "source/perplexity_before", False),
                      ("source ppl after", "source/perplexity_after", False),
                      ("source loss increase", "source/loss_increase", False)]


def table_columns(results: list) -> list[tuple[str, str, bool]]:
    """The columns of the comparison table of `results` (StrategyResults, or anything with `metrics` and
    `task_names`)."""
    lm = any("source/loss_increase" in r.metrics for r in results)
    several = any(len(getattr(r, "task_names", ())) > 2 for r in results)
    return (TABLE_COLUMNS[:4] + (SEVERAL_TARGETS_COLUMNS if several else []) + TABLE_COLUMNS[4:5]
            + (PERPLEXITY_COLUMNS if lm else []) + eval_columns(results) + TABLE_COLUMNS[5:])


def format_table(results: list[StrategyResult]) -> str:
    """The comparison table; causal-LM streams add perplexity columns (accuracies are then next-token accuracies)."""
    columns = table_columns(results)
    headers = ["strategy"] + [h for h, _, _ in columns] + ["wall s"]
    rows = [[r.label] + [_fmt(r.metrics.get(key), pct) for _, key, pct in columns] + [f"{r.wall_seconds:.1f}"]
            for r in results]
    front = tradeoff.front_mask([r.metrics for r in results])
    headers += PROTOCOL_HEADERS
    rows = [row + [_fmt(r.metrics.get(STEPS_KEY)), tradeoff.mark(on)] for row, r, on in zip(rows, results, front)]
    return _align(headers, rows)


def format_seed_table(results: list[StrategyResult]) -> str:
    """One row per strategy: every column as mean ± sd over its seeds, and n (CompareResult.table adds the caption
    and the paired differences)."""
    columns = table_columns(results)
    headers = ["strategy", "n"] + [h for h, _, _ in columns] + ["wall s"]
    rows = []
    for row in aggregate_records([r.record() for r in results]):
        cells = [_fmt_mean_sd(row.get(f"{key}/mean"), row.get(f"{key}/sd"), pct) for _, key, pct in columns]
        rows.append([row["label"], str(row["n"])] + cells
                    + [_fmt_mean_sd(row["wall_seconds/mean"], row["wall_seconds/sd"], False)])
    return _align(headers + PROTOCOL_HEADERS, protocol_seed_rows(results, rows))


# the protocol's columns after every table's own (docs/protocol.md): optimizer steps over all phases, and the front
STEPS_KEY = "optimizer_steps"
PROTOCOL_HEADERS = ["steps", "pareto"]
TABLE_CAPTION = ("Test split: every accuracy (the accuracy matrix R); selections (stop rules, early stopping, "
                 "trajectory steps) on validation data. steps: optimizer steps over all phases. "
                 + tradeoff.CAPTION + ".")


def protocol_seed_rows(results: list[StrategyResult], rows: list[list[str]]) -> list[list[str]]:
    """The seed table's rows with the steps (mean, ± sd where the seeds differ) and the front of the means."""
    records = tradeoff.with_pareto([r.record() for r in results])
    out = []
    for row, agg in zip(rows, aggregate_records(records)):
        mean, sd = agg.get(f"{STEPS_KEY}/mean"), agg.get(f"{STEPS_KEY}/sd")
        steps = _fmt(mean) if sd is None or math.isnan(sd) or sd == 0 else _fmt_mean_sd(mean, sd, False)
        out.append(row + [steps, tradeoff.mark(agg["pareto"])])
    return out


def paired_section(results: list[StrategyResult], reference: str) -> str:
    """Below the seed table: the paired differences from the reference (analysis/paired.py), or nothing with one
    strategy."""
    diffs = paired_stats.paired_differences([r.record() for r in results], reference)
    if not diffs:
        return ""
    return "\n\n" + paired_stats.paired_caption(reference) + "\n" + paired_stats.format_paired_table(diffs)


def _fmt_mean_sd(mean: float | None, sd: float | None, pct: bool) -> str:
    if mean is None or math.isnan(mean):
        return "-"
    if sd is None or math.isnan(sd):
        return _fmt(mean, pct)
    scale = 100.0 if pct else 1.0
    decimals = 1 if pct or abs(mean) < 100 else 0
    return f"{scale * mean:.{decimals}f} ± {scale * sd:.{decimals}f}"


def _align(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows)]
    line = lambda cells: "  ".join(str(c).rjust(w) if i else str(c).ljust(w)  # noqa: E731
                                   for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(r) for r in rows])
