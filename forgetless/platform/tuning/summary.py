"""What a finished search leaves on its MLflow parent run, and what `forgetless report` rebuilds from MLflow alone:
the result table (text + JSON), the figures (target accuracy vs stop point, the stop point x lr heatmap, every trial
with the Pareto front drawn), an offline HTML page with all of them, the parent's description listing the front, the
`forgetless.pareto` tag on every trial's run and the edge-of-range tag on the parent."""
from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

from forgetless.console import say
from forgetless.platform.tracking import html_report, plots
from forgetless.platform.tracking import mlflow_runs as tracking
from forgetless.platform.tracking import run_descriptions
from forgetless.platform.tuning import front as pareto
from forgetless.platform.tuning.objective import REPORT_SPLIT, SELECTION_SPLIT
from forgetless.platform.tuning.record import with_retries
from forgetless.platform.tuning.results import SearchResult, describe_trade_off

PARETO_FIGURE = "pareto_front.png"
DESCRIBED_FRONT_POINTS = 30  # rows of the front in the parent's description (an MLflow tag holds 8,000 characters)


def _pareto_figure(res: SearchResult, path: Path) -> Path:
    """Every finished trial on the trade-off's first two metrics (validation), the front drawn, its test values
    tied to it."""
    axes = res.trade_off[:2]
    finished = [t for t in res.trials if t.status == "finished"
                and all(t.metrics.get(f"{SELECTION_SPLIT}/{m}") is not None for m, _ in axes)]
    mask = pareto.front_mask(finished, res.trade_off)
    points = [[t.metrics[f"{SELECTION_SPLIT}/{m}"] for m, _ in axes] for t in finished]
    reported = [[t.metrics.get(f"{REPORT_SPLIT}/{m}", math.nan) for m, _ in axes] for t in finished]
    return plots.plot_pareto_front(f"{res.name}: {len(finished)} finished trials, Pareto front", axes, points, mask,
                                   [t.trial_id for t in finished], path, reported)


def _json_summary(res: SearchResult) -> dict:
    return {"name": res.name, "objective": res.objective, "best": res.best.__dict__ if res.best else None,
            "pareto_on": res.trade_off, "multi_objective": res.multi_objective,
            "pareto_front": res.pareto().records(), "edge_warnings": res.edge_warnings(),
            "trial_epochs": res.trial_epochs, "source_acc_by_stop_point": res.source_acc_by_stop_point,
            "trials": [t.__dict__ for t in res.trials]}


def _write_summary(res: SearchResult, d: Path) -> list[Path]:
    files = [d / "search_results.txt", d / "search_results.json", d / "target_vs_stop_point.png",
             d / "stop_point_lr_heatmap.png", d / PARETO_FIGURE, d / html_report.SEARCH_REPORT_FILE]
    table = res.table()
    files[0].write_text(table + "\n")
    files[1].write_text(json.dumps(_json_summary(res), indent=1, default=str))
    plots.plot_target_vs_stop_point(res, files[2])
    plots.plot_heatmap(res, files[3])
    _pareto_figure(res, files[4])
    html_report.write_search_report(files[5], f"{res.name}: search results", table,
                                    {"every finished trial, the Pareto front drawn (validation; hollow: the front "
                                     "points' test values)": files[4],
                                     "target test accuracy vs stop point": files[2],
                                     "objective of each stop point x learning rate": files[3]},
                                    res.edge_warnings())
    return files


def _pct(v: float | None) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.1f}"


def description(res: SearchResult) -> str:
    """The parent run's description (markdown): the objective, the front with its validation and test numbers, the
    edge-of-range warnings."""
    front = res.pareto()
    head = "| trial | " + " | ".join(res.space_keys) + " | " + " | ".join(
        f"{m} % ({s})" for m, _ in res.trade_off for s in (SELECTION_SPLIT, REPORT_SPLIT)) + " |"
    rows = [head, "|" + "---|" * (1 + len(res.space_keys) + 2 * len(res.trade_off))]
    for t in front.trials[:DESCRIBED_FRONT_POINTS]:
        values = [str(t.params.get(k)) for k in res.space_keys]
        numbers = [_pct(t.metrics.get(f"{s}/{m}")) for m, _ in res.trade_off for s in (SELECTION_SPLIT, REPORT_SPLIT)]
        rows.append(f"| {t.trial_id} | " + " | ".join(values + numbers) + " |")
    if len(front) > DESCRIBED_FRONT_POINTS:
        rows.append(f"\n... and {len(front) - DESCRIBED_FRONT_POINTS} more front points (search_results.json)")
    kind = "Pareto search" if res.multi_objective else f"objective {res.objective}"
    lines = [f"**forgetless tune** `{res.name}`: {len(res.trials)} trials, {kind}.", "",
             f"**Pareto front** on {describe_trade_off(res.trade_off)}: {len(front)} of "
             f"{sum(t.status == 'finished' for t in res.trials)} finished trials, chosen on {SELECTION_SPLIT}idation "
             f"data; the {REPORT_SPLIT} columns are reported (never used to choose). Its runs carry the tag "
             f"`{pareto.PARETO_TAG}=true`.", "", *rows]
    warnings = res.edge_warnings()
    if warnings:
        lines += ["", "**Widen the range:**", *[f"- {w}" for w in warnings]]
    return "\n".join(lines)


def _log_summary(res: SearchResult, files: list[Path]) -> None:
    uri, parent = res.tracking_uri, res.parent_run_id
    c = tracking.client(uri)
    for f in files:
        with_retries(c.log_artifact, parent, str(f))
    if res.best:
        with_retries(tracking.log_metrics, uri, parent,
                     {"best/objective": res.best.objective, "best/stop_point": res.best.stop_point,
                      "search/trial_epochs": res.trial_epochs, "search/pareto_size": len(res.pareto())}, step=0)
    # Every trial's tag is (re)written: a resumed search can push an earlier front point off the front.
    for t, on in zip(res.trials, pareto.front_mask(res.trials, res.trade_off)):
        with_retries(c.set_tag, t.mlflow_run_id, pareto.PARETO_TAG, "true" if on else "false")
    warnings = res.edge_warnings()
    with_retries(c.set_tag, parent, pareto.EDGE_TAG, "; ".join(warnings) if warnings else "none")
    with_retries(run_descriptions.set_description, uri, parent, description(res))


def log_search_summary(res: SearchResult, out_dir: Path | None = None, log: bool = True) -> list[Path]:
    """The result table (text + JSON), the figures and the HTML page; written to `out_dir` and (log=True) logged on
    the parent run with the front's tags and description. Edge-of-range warnings also go to the console."""
    for w in res.edge_warnings():
        say(f"warning: {w}")
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(out_dir or tmp)
        d.mkdir(parents=True, exist_ok=True)
        files = _write_summary(res, d)
        if log:
            _log_summary(res, files)
        return files if out_dir else []
