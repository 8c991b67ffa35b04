"""Metric names: the table's columns, runs logged under the old names read (and reported) under today's, and each
summary metric logged once per run. Real MLflow stores in a temporary folder; no Ray."""
from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest

from forgetless.cli import main
from forgetless.platform.analysis import metrics as M
from forgetless.platform.analysis.results import (StrategyResult, format_table, metrics_from_mlflow, read_metrics,
                                                  summary_metrics)
from forgetless.platform.driver.run_outputs import log_summary
from forgetless.platform.tracking import html_report as report_html
from forgetless.platform.tracking import mlflow_runs as tracking

R_ONE_TARGET = [[0.98, 0.20], [0.90, 0.95]]
R_THREE_TARGETS = [[0.90, 0.1, 0.1, 0.1], [0.80, 0.60, 0.15, 0.20], [0.85, 0.90, 0.70, 0.25], [0.50, 0.70, 0.80, 0.90]]
# what forgetless stored for R_ONE_TARGET before the standard definitions (fractions): `acc` and `bwt` counted the
# source, `forgetting/first` repeated -BWT, `target/final_acc` was today's ACC
OLD_ONE_TARGET = {"acc": 0.925, "avg_inc_acc": (0.98 + (0.90 + 0.95) / 2) / 2, "bwt": -0.08, "forgetting/max": 0.08,
                  "forgetting/first": 0.08, "source/retention": 0.90 / 0.98, "source/acc_before": 0.98,
                  "source/acc_after": 0.90, "target/final_acc": 0.95, "steps_to/90": 10.0, "steps_to/95": 20.0,
                  "aulc": 0.7, "source/auc": 0.94, "trainable_params/max": 100.0}


def _result(R, label: str = "finetune") -> StrategyResult:
    r = StrategyResult(label=label, strategy=label, task_names=["src"] + [f"t{j}" for j in range(1, len(R))],
                       accuracy_matrix=np.asarray(R), history=[], phase_log=[], trainable_params={}, global_step=10,
                       wall_seconds=5.0, train_seconds=4.0, mlflow_run_id=None, checkpoint_uri=None,
                       evaluation="task_incremental")
    r.metrics = {**M.summarize(R), "steps_to/90": 10.0, "trainable_params/max": 100.0}
    return r


def _cells(table: str) -> dict[str, str]:
    """The first row of a table, by header."""
    header, _, row = table.splitlines()[:3]
    return dict(zip(re.split(r"\s{2,}", header.strip()), re.split(r"\s{2,}", row.strip())))


def test_the_table_shows_acc_bwt_and_the_sources_forgetting():
    one = _cells(format_table([_result(R_ONE_TARGET)]))
    assert (one["ACC %"], one["source forgetting pp"], one["BWT pp"]) == ("95.0", "8.0", "-")
    assert "forgetting pp" not in one  # with one target Chaudhry's forgetting is the source's: no second column
    three = _cells(format_table([_result(R_THREE_TARGETS)]))
    assert (three["ACC %"], three["BWT pp"], three["source forgetting pp"]) == ("80.0", "10.0", "40.0")
    assert three["forgetting pp"] == f"{100 * 0.5 / 3:.1f}"  # (0.40 + 0.20 - 0.10) / 3, the source included


def test_old_names_read_as_todays_names_and_definitions():
    today = read_metrics(OLD_ONE_TARGET, R_ONE_TARGET)
    assert today["acc"] == 0.95 and today["acc_with_source"] == 0.925
    assert math.isnan(today["bwt"])  # recomputed from R: one target, undefined (the old -0.08 was the source's loss)
    assert today["source/forgetting"] == pytest.approx(0.08) and today["avg_inc_acc"] == pytest.approx(0.95)
    assert "forgetting/first" not in today and "target/final_acc" not in today
    assert today["steps_to/90"] == 10.0 and today["forgetting/max"] == pytest.approx(0.08)  # unchanged names stay
    # without R the renamed numbers still read; the redefined ones are left out rather than mislabelled
    no_matrix = read_metrics(OLD_ONE_TARGET)
    assert no_matrix["acc"] == 0.95 and "bwt" not in no_matrix and "avg_inc_acc" not in no_matrix
    new = M.summarize(R_ONE_TARGET)
    assert read_metrics(new) == new  # today's names pass through


def test_old_language_model_names_read_as_losses_and_ratios():
    old = {"target/final_acc": 0.4, "forgetting/first": 0.1, "forgetting/perplexity_increase": 2.0,
           "forgetting/perplexity_ratio": 1.2, "source/perplexity_before": 10.0, "source/perplexity_after": 12.0,
           "target/final_perplexity": 20.0}
    today = read_metrics(old, [[0.5, 0.1], [0.4, 0.4]])
    assert today["source/loss_increase"] == pytest.approx(math.log(1.2)) and today["source/perplexity_ratio"] == \
        pytest.approx(1.2)
    assert today["target/corpus_mean_perplexity"] == 20.0  # one target corpus: the old mean was over that one
    assert "forgetting/perplexity_increase" not in today
    several = read_metrics(old, R_THREE_TARGETS)  # several corpora: the old arithmetic means are not today's numbers
    assert "target/corpus_mean_perplexity" not in several and "forgetting/perplexity_ratio" not in several


def test_mlflow_names_old_and_new_read_back_as_fractions():
    old_logged = {"acc_pct": 92.5, "target/final_acc_pct": 95.0, "forgetting/first_pp": 8.0, "bwt_pp": -8.0,
                  "forgetting/max_pp": 8.0, "steps_to/90": 10.0}
    today = metrics_from_mlflow(old_logged, R_ONE_TARGET)
    assert today["acc"] == pytest.approx(0.95) and today["acc_with_source"] == pytest.approx(0.925)
    assert math.isnan(today["bwt"]) and today["forgetting/max"] == pytest.approx(0.08)
    new = _result(R_THREE_TARGETS).metrics
    assert metrics_from_mlflow(summary_metrics(new)) == pytest.approx(new)


def _old_comparison(uri: str, tmp_path) -> str:
    """A `forgetless compare` parent and child as forgetless logged them before the standard definitions."""
    c = tracking.client(uri)
    exp = tracking.ensure_experiment(uri, "old-names")
    parent = c.create_run(exp, run_name="demo", tags={"forgetless.command": "compare", "forgetless.name": "demo"})
    child = c.create_run(exp, run_name="finetune", tags={tracking.PARENT_TAG: parent.info.run_id})
    child_id = child.info.run_id
    for name, value in {"acc_pct": 92.5, "bwt_pp": -8.0, "forgetting/max_pp": 8.0, "forgetting/first_pp": 8.0,
                        "target/final_acc_pct": 95.0, "wall_seconds": 5.0}.items():
        c.log_metric(child_id, name, value, step=0)
    history = [{"step": s, "stage": min(i, 1), "phase": "all", "epoch": i, "acc": {"0": a0, "1": a1},
                "loss": {"0": 0.1, "1": 0.2}, "train_loss": None}
               for i, (s, a0, a1) in enumerate([(0, 0.98, 0.2), (10, 0.93, 0.9), (20, 0.90, 0.95)])]
    (tmp_path / "history.json").write_text(json.dumps({"history": history, "phases": []}))
    c.log_artifact(child_id, str(tmp_path / "history.json"))
    (tmp_path / "comparison.json").write_text(json.dumps([{
        "label": "finetune", "strategy": "finetune", "seed": 0, "metrics": OLD_ONE_TARGET, "R": R_ONE_TARGET,
        "task_names": ["src", "tgt"], "mlflow_run_id": child_id}]))
    c.log_artifact(parent.info.run_id, str(tmp_path / "comparison.json"))
    return parent.info.run_id


def test_a_comparison_logged_under_the_old_names_still_reports(tmp_path, capsys):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    parent = _old_comparison(uri, tmp_path)
    view = report_html.load_comparison(uri, parent)
    assert view.strategies[0].metrics["acc"] == 0.95 and math.isnan(view.strategies[0].metrics["bwt"])
    assert main(["report", parent, "--html", "--tracking-uri", uri, "--out", str(tmp_path / "out")]) == 0
    cells = _cells(capsys.readouterr().out.strip())
    assert (cells["ACC %"], cells["source forgetting pp"], cells["BWT pp"]) == ("95.0", "8.0", "-")
    page = (tmp_path / "out" / report_html.REPORT_FILE).read_text()
    assert "<td>95.0</td><td>98.0</td><td>90.0</td><td>8.0</td><td>-</td>" in page


def test_each_summary_metric_is_logged_once_per_run(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    c = tracking.client(uri)
    exp = tracking.ensure_experiment(uri, "once")
    run_id = c.create_run(exp).info.run_id
    model_id = c.create_logged_model(exp, source_run_id=run_id, name="finetune").model_id
    summary = summary_metrics(_result(R_THREE_TARGETS).metrics)
    log_summary(uri, run_id, summary, model_id, "finetune")
    log_summary(uri, run_id, summary, model_id, "finetune")  # the run re-used by a later invocation
    for name, value in summary.items():
        points = c.get_metric_history(run_id, name)
        assert [(p.step, p.value) for p in points] == [(0, value)], name
    linked = {m.key for m in c.get_logged_model(model_id).metrics}
    assert linked == set(summary)  # the one write also links them to the model's page
    assert c.get_logged_model(model_id).tags["mlflow.note.content"].startswith("finetune")
    other = c.create_run(exp).info.run_id  # without a model
    log_summary(uri, other, summary, None, "finetune")
    assert all(len(c.get_metric_history(other, name)) == 1 for name in summary)


def test_a_reused_run_logged_under_the_old_names_is_left_whole_and_tagged(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    c = tracking.client(uri)
    run_id = c.create_run(tracking.ensure_experiment(uri, "old")).info.run_id
    old = {"acc_pct": 92.5, "bwt_pp": -8.0, "target/final_acc_pct": 95.0, "forgetting/first_pp": 8.0}
    for name, value in old.items():
        c.log_metric(run_id, name, value, step=0)
    log_summary(uri, run_id, summary_metrics(_result(R_ONE_TARGET).metrics), None, "finetune")
    run = c.get_run(run_id)
    assert run.data.metrics == old  # no second step-0 acc_pct with another meaning, nothing added beside the old
    assert run.data.tags["forgetless.metric_definitions"].startswith("old")
    assert metrics_from_mlflow(run.data.metrics, R_ONE_TARGET)["acc"] == pytest.approx(0.95)
