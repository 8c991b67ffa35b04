"""What a reviewer reads, without Ray or a server: summary metrics in the table's units, the findings and
descriptions, the figures, and the self-contained HTML report, all from hand-built results."""
from __future__ import annotations

import math

import numpy as np
import pytest

from forgetless.platform.tracking import plots

from forgetless.platform.tracking import html_report as report_html

from forgetless.platform.tracking import run_descriptions as review
from forgetless.platform.analysis.results import CompareResult, StrategyResult, summary_metrics


def _history(target: list[float], source: list[float], steps: list[int]) -> list[dict]:
    return [{"step": s, "stage": 0 if i == 0 else 1, "phase": "before" if i == 0 else "all", "epoch": i,
             "acc": {"0": a0, "1": a1}, "loss": {"0": 0.1, "1": 0.2}, "train_loss": None}
            for i, (s, a1, a0) in enumerate(zip(steps, target, source))]


def _result(label: str, R: list[list[float]], target: list[float], source: list[float]) -> StrategyResult:
    r = StrategyResult(label=label, strategy=label, task_names=["src", "tgt"], accuracy_matrix=np.asarray(R),
                       history=_history(target, source, [0, 10, 20]),
                       phase_log=[{"stage": 1, "phase": "probe", "epochs": 1, "steps": 10, "end_step": 10},
                                  {"stage": 1, "phase": "finetune", "epochs": 1, "steps": 10, "end_step": 20}],
                       trainable_params={"1/all": 100}, global_step=20, wall_seconds=12.0, train_seconds=8.0,
                       mlflow_run_id=f"run-{label}", checkpoint_uri=None, evaluation="task_incremental")
    return r


@pytest.fixture
def compared() -> CompareResult:
    # finetune forgets 8 points and reaches 90% of the best (0.9) at step 10; probe forgets nothing, reaches it at 20
    ft = _result("finetune", [[0.98, 0.2], [0.90, 0.95]], [0.2, 0.9, 0.95], [0.98, 0.93, 0.90])
    lp = _result("linear_probe", [[0.98, 0.2], [0.98, 0.85]], [0.2, 0.7, 0.85], [0.98, 0.98, 0.98])
    best = {1: max(ft.best_target_acc(1), lp.best_target_acc(1))}
    for r in (ft, lp):
        r.compute_metrics(best)
    return CompareResult("demo", [ft, lp], None, "parent-id", "sqlite:////tmp/x.db", "7")


def test_summary_metrics_are_in_the_units_their_names_say(compared):
    s = summary_metrics(compared["finetune"].metrics)
    assert s["forgetting/max_pp"] == pytest.approx(8.0)  # 0.98 - 0.90, in percentage points
    assert s["source/forgetting_pp"] == pytest.approx(8.0)
    assert s["acc_pct"] == pytest.approx(95.0)  # ACC: the target's, the source not counted
    assert s["acc_with_source_pct"] == pytest.approx((90.0 + 95.0) / 2)
    assert s["source/retention_pct"] == pytest.approx(100 * 0.90 / 0.98)  # full precision: 91.8367..., not 91.84
    assert s["steps_to/90"] == 10.0
    assert "bwt_pp" not in s  # one target: BWT is undefined, not logged
    assert "fwt" not in compared["finetune"].metrics  # fresh heads: FWT would be chance-level noise


def test_findings_name_who_forgot_most_and_who_learned_fastest(compared):
    sentences = review.findings(compared.results)
    assert sentences[0].startswith("**finetune** forgot most") and "8.0 points" in sentences[0]
    assert "**linear_probe** forgot least" in sentences[0]
    assert sentences[1].startswith("**finetune** learned fastest") and "after 10 optimizer steps" in sentences[1]
    text = review.parent_description(compared)
    assert "[finetune](#/experiments/7/runs/run-finetune?workflowType=machine_learning)" in text
    assert "| 95.0 | 98.0 | 90.0 | 8.0 | - |" in text  # ACC, source before/after, its forgetting, BWT


def test_ui_link_lands_on_the_parent_run_in_the_model_training_view():
    assert review.ui_link("http://mlflow:5000/", "3", "abc") == \
        "http://mlflow:5000/#/experiments/3/runs/abc?workflowType=machine_learning"
    assert review.ui_link("sqlite:////x/mlflow.db", "3", "abc").startswith(review.DEFAULT_UI + "/#/experiments/3/")


def test_phase_switches_mark_where_lp_ft_starts_fine_tuning(compared):
    assert plots.phase_switches(compared["finetune"].phase_log) == [(10, "probe -> finetune")]


def test_figures_are_written(compared, tmp_path):
    r = compared["finetune"]
    plots.accuracy_matrix_heatmap(r.accuracy_matrix, r.task_names, "R", tmp_path / "R.png")
    plots.comparison_curves({x.label: x.history for x in compared.results}, tmp_path / "c.png", "t",
                            phases={x.label: x.phase_log for x in compared.results})
    assert (tmp_path / "R.png").stat().st_size > 1000 and (tmp_path / "c.png").stat().st_size > 1000


def test_html_report_is_self_contained_and_carries_the_numbers(compared, tmp_path):
    view = report_html.ComparisonView.of(compared)
    path = report_html.write_report(view, tmp_path / report_html.REPORT_FILE)
    text = path.read_text()
    assert "<script src=" not in text  # plotly.js is inline: no CDN, opens offline
    assert text.count('class="plotly-graph-div"') == 4
    assert "8.0" in text and "95.0" in text and "learned fastest" in text
    fig = report_html.heatmaps_figure(view)
    heat = fig.data[0]
    assert heat.zmid == 0 and heat.zmin == -heat.zmax  # diverging, centred on row 0
    assert heat.z[1][0] == pytest.approx(-8.0)  # finetune's source lost 8 points
    scatter = report_html.scatter_figure(view)
    runs, front = scatter.data[:2], scatter.data[2]  # one point per strategy, then the Pareto front through them
    assert [(t.x[0], t.y[0]) for t in runs] == [pytest.approx((8.0, 95.0)), pytest.approx((0.0, 85.0))]
    assert front.name == "Pareto front" and list(front.x) == pytest.approx([0.0, 8.0])  # neither dominates
    assert not math.isnan(view.strategies[0].metrics["aulc"])


def test_results_come_as_records_and_a_dataframe(compared):
    records = compared.records()
    assert [r["label"] for r in records] == ["finetune", "linear_probe"]
    assert records[0]["forgetting/max"] == pytest.approx(0.08) and records[1]["forgetting/max"] == pytest.approx(0.0)
    assert records[0]["mlflow_run_id"] == "run-finetune" and records[0]["wall_seconds"] == 12.0
    pd = pytest.importorskip("pandas")  # pandas comes with Ray's data extra; forgetless does not need it
    frame = compared.to_pandas()
    assert isinstance(frame, pd.DataFrame) and list(frame.index) == ["finetune", "linear_probe"]
    assert frame.loc["finetune", "acc"] == pytest.approx(0.95)


def test_many_runs_get_a_grid_of_heatmaps(tmp_path):
    # 5 strategies x 5 seeds: one row of 25 plots is more than plotly can space (the compare of
    # benchmarks/repro_strategies.py --seeds 0 1 2 3 4 failed on it); a grid of 5 per row renders
    runs = []
    for i in range(25):
        r = _result(f"s{i}", [[0.98, 0.2], [0.90 - i / 100, 0.95]], [0.2, 0.9, 0.95], [0.98, 0.93, 0.90])
        r.compute_metrics({1: 0.95})
        runs.append(r)
    view = report_html.ComparisonView.of(CompareResult("many", runs, None, "p", "sqlite:////tmp/x.db", "7"))
    fig = report_html.heatmaps_figure(view)
    assert len(fig.data) == 25
    assert {(t.xaxis, t.yaxis) for t in fig.data} == {(f"x{i}" if i > 1 else "x", f"y{i}" if i > 1 else "y")
                                                    for i in range(1, 26)}
    assert report_html.write_report(view, tmp_path / report_html.REPORT_FILE).exists()
