"""The comparison report: one self-contained HTML page (plotly, its JavaScript inlined, so it opens offline) with the
findings and table, the target learning curves of all strategies on one chart, the source-retention curves, the
accuracy matrices side by side on a diverging scale centred on row 0, and a learning-vs-forgetting scatter.

Logged on the parent run of `forgetless compare` as `comparison_report.html`; `forgetless report RUN_ID --html`
rebuilds it from MLflow.
"""
from __future__ import annotations

import html
import json
import math
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import plotly.graph_objects as go
import plotly.io as pio
from plotly.subplots import make_subplots

from forgetless.errors import ConfigError
from forgetless.platform.analysis import tradeoff
from forgetless.platform.tracking import run_descriptions as review
from forgetless.platform.tracking import artifacts
from forgetless.platform.tracking import mlflow_runs as tracking
from forgetless.platform.analysis.results import CompareResult, format_table, read_metrics

REPORT_FILE = "comparison_report.html"
COMPARISON_FILE = "comparison.json"
HISTORY_FILE = "history.json"


@dataclass
class StrategyView:
    """What the report reads of one strategy (a StrategyResult, or its run read back from MLflow)."""

    label: str
    metrics: dict[str, float]
    accuracy_matrix: list[list[float]]
    task_names: list[str]
    history: list[dict]
    phase_log: list[dict] = field(default_factory=list)
    mlflow_run_id: str | None = None
    wall_seconds: float = math.nan


@dataclass
class ComparisonView:
    name: str
    strategies: list[StrategyView]

    @classmethod
    def of(cls, out: CompareResult) -> "ComparisonView":
        several = len(out.seeds) > 1  # one curve, heatmap and point per run: `finetune (seed 1)`
        return cls(out.name, [StrategyView(r.run_label(several), r.metrics, r.accuracy_matrix.tolist(), r.task_names,
                                           r.history, r.phase_log, r.mlflow_run_id, r.wall_seconds)
                              for r in out.results])


def load_comparison(uri: str, parent_run_id: str) -> ComparisonView:
    """A finished comparison read back from MLflow: the parent's comparison.json and each child's history.json."""
    c = tracking.client(uri)
    parent = c.get_run(parent_run_id)
    if parent.data.tags.get("forgetless.command") not in ("compare", "run"):
        raise ConfigError(f"report --html: run {parent_run_id} is not the parent run of `forgetless compare` or "
                          f"`forgetless run` (tags.forgetless.command = "
                          f"{parent.data.tags.get('forgetless.command')!r})")
    with tempfile.TemporaryDirectory() as d:
        rows = json.loads(artifacts.download(c, parent_run_id, COMPARISON_FILE, d).read_text())
        views = []
        for i, row in enumerate(rows):
            hist = json.loads(artifacts.download(c, row["mlflow_run_id"], HISTORY_FILE, f"{d}/{i}").read_text())
            wall = c.get_run(row["mlflow_run_id"]).data.metrics.get("wall_seconds", math.nan)
            # a comparison logged before the standard metric definitions is read under today's (results.read_metrics)
            views.append(StrategyView(row["label"], read_metrics(row["metrics"], row["R"]), row["R"],
                                      row["task_names"], hist["history"],
                                      hist.get("phases", []), row["mlflow_run_id"], wall))
    name = parent.data.tags.get("forgetless.name", parent.info.run_name)
    return ComparisonView(name, views)


# ---------------------------------------------------------------------------------------------------------------------
# figures


def _target_of(h: dict) -> str:
    return str(max(h["stage"], 1))


def learning_figure(view: ComparisonView) -> go.Figure:
    """Target validation accuracy (the task of each stage) vs optimizer steps, every strategy on one chart."""
    fig = go.Figure()
    for s in view.strategies:
        fig.add_trace(go.Scatter(x=[h["step"] for h in s.history], y=[100 * h["acc"][_target_of(h)] for h in s.history],
                                 mode="lines+markers", name=s.label))
    fig.update_layout(title="Learning: target validation accuracy", xaxis_title="optimizer steps",
                      yaxis_title="target validation accuracy (%)", height=420)
    return fig


def retention_figure(view: ComparisonView) -> go.Figure:
    """Source validation accuracy as a percentage of where it started, every strategy on one chart."""
    fig = go.Figure()
    for s in view.strategies:
        start = s.history[0]["acc"]["0"] if s.history else 1.0
        fig.add_trace(go.Scatter(x=[h["step"] for h in s.history],
                                 y=[100 * h["acc"]["0"] / start if start else math.nan for h in s.history],
                                 mode="lines+markers", name=s.label))
    fig.add_hline(y=100, line_dash="dot", line_color="grey")
    fig.update_layout(title="Forgetting: source retention (validation accuracy / its value before training)",
                      xaxis_title="optimizer steps", yaxis_title="source retention (%)", height=420)
    return fig


HEATMAPS_PER_ROW = 5  # a compare of 5 strategies x 5 seeds has 25 matrices: a grid, not one row of slivers


def heatmaps_figure(view: ComparisonView) -> go.Figure:
    """Each strategy's R as the change from row 0 in percentage points, in a grid of up to HEATMAPS_PER_ROW per row
    on one diverging scale centred on 0 (so a few points of forgetting are visible); the cells print the accuracies."""
    n = len(view.strategies)
    cols = min(n, HEATMAPS_PER_ROW)
    grid_rows = math.ceil(n / cols)
    fig = make_subplots(rows=grid_rows, cols=cols, subplot_titles=[s.label for s in view.strategies],
                        horizontal_spacing=0.06, vertical_spacing=min(0.12, 0.5 / grid_rows))
    changes = [[[100 * (v - r0) for v, r0 in zip(row, s.accuracy_matrix[0])] for row in s.accuracy_matrix]
               for s in view.strategies]
    span = max([1.0] + [abs(v) for ch in changes for row in ch for v in row])
    for i, (s, change) in enumerate(zip(view.strategies, changes)):
        rows = ["before"] + [f"after {t}" for t in s.task_names[1:len(s.accuracy_matrix)]]
        text = [[f"{100 * v:.1f}%" + ("" if r == 0 else f" ({change[r][j]:+.1f})") for j, v in enumerate(row)]
                for r, row in enumerate(s.accuracy_matrix)]
        fig.add_trace(go.Heatmap(z=change, x=s.task_names, y=rows, text=text, texttemplate="%{text}",
                                 colorscale="RdBu", zmid=0, zmin=-span, zmax=span, showscale=i == n - 1,
                                 colorbar={"title": "pp vs row 0"},
                                 hovertemplate="%{y}, %{x}: %{text}<extra></extra>"),
                      row=i // cols + 1, col=i % cols + 1)
    fig.update_yaxes(autorange="reversed")
    fig.update_layout(title="Accuracy matrices (test): change from the pre-trained model, percentage points",
                      height=grid_rows * (300 + 30 * max(len(s.accuracy_matrix) for s in view.strategies)))
    return fig


def scatter_figure(view: ComparisonView) -> go.Figure:
    """Each strategy a point: the source's forgetting (x) vs ACC, the final target accuracy (y); the best corner is top
    left."""
    fig = go.Figure()
    for s in view.strategies:
        fig.add_trace(go.Scatter(x=[100 * s.metrics["source/forgetting"]], y=[100 * s.metrics["acc"]],
                                 mode="markers+text", text=[s.label], textposition="top center", name=s.label,
                                 marker={"size": 14}))
    add_front(fig, view)
    fig.update_layout(title="Learning vs forgetting (test split)",
                      xaxis_title="source forgetting (percentage points)", yaxis_title="ACC: final target accuracy (%)",
                      height=420)
    return fig


SEED_SUFFIX = re.compile(r" \(seed -?\d+\)$")  # results.StrategyResult.run_label's suffix


def strategy_points(view: ComparisonView) -> list[dict]:
    """One record per run: its strategy's label (without the seed suffix), ACC and the source's forgetting."""
    return [{"label": SEED_SUFFIX.sub("", s.label), tradeoff.LEARNING: s.metrics.get(tradeoff.LEARNING, math.nan),
             tradeoff.FORGETTING: s.metrics.get(tradeoff.FORGETTING, math.nan)} for s in view.strategies]


def add_front(fig: go.Figure, view: ComparisonView) -> None:
    """The Pareto front of ACC vs source forgetting (analysis/tradeoff.py) drawn through its strategies, by increasing
    forgetting; with several seeds it joins the strategies' means over seeds, each drawn as an open diamond."""
    records = strategy_points(view)
    means, front = tradeoff.label_means(records), tradeoff.label_front(records)
    several = len(records) > len(means)
    if several:
        fig.add_trace(go.Scatter(x=[100 * m[tradeoff.FORGETTING] for m in means.values()],
                                 y=[100 * m[tradeoff.LEARNING] for m in means.values()], mode="markers+text",
                                 text=list(means), textposition="bottom center", name="mean over seeds",
                                 marker={"size": 16, "symbol": "diamond-open", "color": "black"}))
    on = sorted((100 * m[tradeoff.FORGETTING], 100 * m[tradeoff.LEARNING]) for lb, m in means.items() if front[lb])
    fig.add_trace(go.Scatter(x=[x for x, _ in on], y=[y for _, y in on], mode="lines+markers",
                             name="Pareto front" + (" (means over seeds)" if several else ""),
                             line={"dash": "dash", "color": "black"}, marker={"size": 6, "color": "black"}))


# ---------------------------------------------------------------------------------------------------------------------
# the page


def _table_html(view: ComparisonView) -> str:
    head = ("<tr><th>strategy</th><th>ACC %</th><th>source before %</th><th>source after %</th>"
            "<th>source forgetting pp</th><th>BWT pp</th><th>steps to 90%</th></tr>")
    rows = []
    for s in view.strategies:
        m = s.metrics
        cells = [f"{100 * m[k]:.1f}" if not math.isnan(m.get(k, math.nan)) else "-" for k in
                 ("acc", "source/acc_before", "source/acc_after", "source/forgetting", "bwt")]
        steps = "-" if math.isnan(m["steps_to/90"]) else f"{m['steps_to/90']:.0f}"
        rows.append("<tr><td>" + html.escape(s.label) + "</td>" + "".join(f"<td>{c}</td>" for c in cells)
                    + f"<td>{steps}</td></tr>")
    return f"<table id='comparison'>{head}{''.join(rows)}</table>"


def _markdown_bold(sentence: str) -> str:
    parts = html.escape(sentence).split("**")
    return "".join(f"<b>{p}</b>" if i % 2 else p for i, p in enumerate(parts))


def render(view: ComparisonView) -> str:
    figures = [learning_figure(view), retention_figure(view), heatmaps_figure(view), scatter_figure(view)]
    # the first figure carries plotly.js inline (no CDN: the page opens offline); the others reuse it
    divs = [pio.to_html(f, full_html=False, include_plotlyjs=(i == 0), config={"displaylogo": False})
            for i, f in enumerate(figures)]
    findings = "".join(f"<li>{_markdown_bold(s)}</li>" for s in review.findings(view.strategies))
    title = html.escape(f"{view.name}: strategies compared")
    return ("<!DOCTYPE html><html><head><meta charset='utf-8'><title>" + title + "</title><style>"
            "body{font-family:sans-serif;margin:24px;max-width:1400px}table{border-collapse:collapse}"
            "td,th{border:1px solid #ccc;padding:4px 10px;text-align:right}td:first-child{text-align:left}"
            "</style></head><body><h1>" + title + "</h1><ul id='findings'>" + findings + "</ul>"
            + _table_html(view) + "".join(divs) + "</body></html>")


def write_report(view: ComparisonView, path: Path) -> Path:
    path.write_text(render(view), encoding="utf-8")
    return path


def format_view_table(view: ComparisonView) -> str:
    """The comparison table as `forgetless compare` prints it (format_table reads label, metrics, wall_seconds)."""
    return format_table(view.strategies)


# ---------------------------------------------------------------------------------------------------------------------
# a search's report (forgetless tune): its table, warnings and figures on one offline page

SEARCH_REPORT_FILE = "search_report.html"


def render_search_report(title: str, table_text: str, figures: dict[str, Path],
                         notes: list[str] | None = None) -> str:
    """One self-contained page: the search's table as text, its notes (e.g. edge-of-range warnings) and its PNG
    figures inlined (base64), so it opens offline."""
    import base64

    imgs = "".join(f"<figure><img alt='{html.escape(caption)}' src='data:image/png;base64,"
                   f"{base64.b64encode(Path(png).read_bytes()).decode()}'><figcaption>{html.escape(caption)}"
                   f"</figcaption></figure>" for caption, png in figures.items() if Path(png).exists())
    items = "".join(f"<li>{html.escape(n)}</li>" for n in notes or [])
    return ("<!DOCTYPE html><html><head><meta charset='utf-8'><title>" + html.escape(title) + "</title><style>"
            "body{font-family:sans-serif;margin:24px;max-width:1400px}pre{font-size:12px}img{max-width:100%}"
            "</style></head><body><h1>" + html.escape(title) + "</h1>"
            + (f"<ul id='notes'>{items}</ul>" if items else "")
            + "<pre id='search-table'>" + html.escape(table_text) + "</pre>" + imgs + "</body></html>")


def write_search_report(path: Path, title: str, table_text: str, figures: dict[str, Path],
                        notes: list[str] | None = None) -> Path:
    path.write_text(render_search_report(title, table_text, figures, notes), encoding="utf-8")
    return path
