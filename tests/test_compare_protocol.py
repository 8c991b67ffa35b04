"""The protocol in compare's outputs, without Ray: the steps and Pareto columns and the split caption of the table,
`pareto` in records(), the front on per-strategy means with several seeds, and the paired differences below the seed
table (docs/protocol.md)."""
from __future__ import annotations

import math
import re

import numpy as np
import pytest

from forgetless.platform.analysis import tradeoff
from forgetless.platform.analysis.results import CompareResult, StrategyResult


def _result(label: str, seed: int, acc: float, forgetting: float, steps: int = 20) -> StrategyResult:
    r = StrategyResult(label=label, strategy=label, task_names=["src", "tgt"], accuracy_matrix=np.zeros((2, 2)),
                       history=[], phase_log=[], trainable_params={}, global_step=steps, wall_seconds=3.0,
                       train_seconds=1.0, mlflow_run_id=None, checkpoint_uri=None, evaluation="task_incremental",
                       seed=seed)
    r.metrics = {"acc": acc, "source/acc_before": 0.9, "source/acc_after": 0.9 - forgetting,
                 "source/forgetting": forgetting, "forgetting/max": forgetting, "bwt": math.nan,
                 "steps_to/90": 5.0, "trainable_params/max": 100.0, "optimizer_steps": float(steps)}
    return r


def _cells(table: str) -> list[dict[str, str]]:
    header, _, *rows = [re.split(r"\s{2,}", line.strip()) for line in table.splitlines()]
    return [dict(zip(header, row + [""] * (len(header) - len(row)))) for row in rows]


def test_front_by_hand():
    # a: best ACC; b: least forgetting; c: dominated by a (lower ACC, more forgetting); d: equal to b
    points = [{"acc": 0.9, "source/forgetting": 0.3}, {"acc": 0.7, "source/forgetting": 0.05},
              {"acc": 0.8, "source/forgetting": 0.35}, {"acc": 0.7, "source/forgetting": 0.05}]
    assert tradeoff.front_mask(points) == [True, True, False, True]


def test_one_seed_table_has_steps_pareto_and_the_split():
    results = [_result("finetune", 0, 0.90, 0.30), _result("lwf", 0, 0.70, 0.05, steps=18),
               _result("ewc", 0, 0.80, 0.35)]
    out = CompareResult("x", results, None, None, "sqlite:///x.db", seeds=[0])
    text = out.table()
    grid, caption = text.rsplit("\n", 1)
    cells = {c["strategy"]: c for c in _cells(grid)}
    assert {k: c["pareto"] for k, c in cells.items()} == {"finetune": "*", "lwf": "*", "ewc": ""}
    assert cells["lwf"]["steps"] == "18" and cells["finetune"]["steps"] == "20"
    assert "Test split" in caption and "validation" in caption
    assert [r["pareto"] for r in out.records()] == [True, True, False]
    assert out.paired() == []  # one seed: nothing to pair


def test_several_seeds_front_on_means_and_paired_differences():
    # ewc's seed 1 alone would be on the front (0.95 ACC); its means (0.85, 0.35) are dominated by finetune's
    # (0.90, 0.30); lwf forgets less than finetune on every seed
    results = [_result("finetune", 0, 0.90, 0.30), _result("lwf", 0, 0.70, 0.05), _result("ewc", 0, 0.75, 0.40),
               _result("finetune", 1, 0.90, 0.30), _result("lwf", 1, 0.72, 0.08), _result("ewc", 1, 0.95, 0.30)]
    out = CompareResult("x", results, None, None, "sqlite:///x.db", seeds=[0, 1])
    assert {r["label"]: r["pareto"] for r in out.records()} == {"finetune": True, "lwf": True, "ewc": False}
    assert {r["label"]: r["pareto"] for r in out.summary_records()} == {"finetune": True, "lwf": True, "ewc": False}
    assert "pareto/mean" not in out.summary_records()[0]
    diffs = {(d.label, d.metric): d for d in out.paired()}
    assert set(diffs) == {("lwf", "acc"), ("lwf", "source/forgetting"), ("ewc", "acc"),
                          ("ewc", "source/forgetting")}  # BWT: undefined with one target, left out
    forgets = diffs[("lwf", "source/forgetting")]
    assert forgets.reference == "finetune" and forgets.n == 2
    assert forgets.mean == pytest.approx(((0.05 - 0.30) + (0.08 - 0.30)) / 2)
    assert forgets.sd == pytest.approx(math.sqrt(2 * 0.015 ** 2))
    text = out.table()
    assert "Paired differences from finetune" in text
    paired_rows = [line for line in text.splitlines() if line.startswith("lwf ") and "source forgetting" in line]
    assert len(paired_rows) == 1 and "-23.5 ± 2.1" in paired_rows[0]


def test_reference_strategy_from_the_config(tiny_config):
    from forgetless.config import load_config

    cfg = load_config(tiny_config(strategies=["finetune", "lwf"], reference_strategy="lwf"))
    assert cfg.reference_label() == "lwf"
    assert load_config(tiny_config(strategies=["lwf", "ewc"])).reference_label() == "lwf"  # no finetune: the first
    with pytest.raises(Exception, match="reference_strategy: 'ewc' is not a strategy label"):
        load_config(tiny_config(strategies=["finetune", "lwf"], reference_strategy="ewc"))
    results = [_result("finetune", s, 0.9, 0.3) for s in (0, 1)] + [_result("lwf", s, 0.7, 0.1) for s in (0, 1)]
    out = CompareResult("x", results, None, None, "sqlite:///x.db", seeds=[0, 1], reference="lwf")
    assert {d.label for d in out.paired()} == {"finetune"} and "Paired differences from lwf" in out.table()


def test_parent_metrics_carry_the_paired_differences():
    from forgetless.platform.driver.runner import seed_aggregate_metrics

    results = [_result("finetune", 0, 0.90, 0.30), _result("lwf", 0, 0.70, 0.05),
               _result("finetune", 1, 0.90, 0.30), _result("lwf", 1, 0.72, 0.08)]
    out = CompareResult("x", results, None, None, "sqlite:///x.db", seeds=[0, 1], reference="finetune")
    m = seed_aggregate_metrics(out)
    assert m["lwf/vs_finetune/acc/diff_pp_mean"] == pytest.approx(100 * (-0.20 - 0.18) / 2)
    assert m["lwf/vs_finetune/source/forgetting/n"] == 2
    assert 0 < m["lwf/vs_finetune/source/forgetting/p_value"] < 1
    assert not any(k.startswith("finetune/vs_") for k in m)  # the reference is not compared with itself


def test_parent_description_says_splits_steps_front_and_paired():
    from forgetless.platform.tracking import run_descriptions as review

    results = [_result("finetune", 0, 0.90, 0.30), _result("lwf", 0, 0.70, 0.05, steps=18),
               _result("ewc", 0, 0.80, 0.35), _result("finetune", 1, 0.88, 0.32),
               _result("lwf", 1, 0.72, 0.08, steps=18), _result("ewc", 1, 0.79, 0.36)]
    text = review.parent_description(CompareResult("x", results, None, None, "sqlite:///x.db", seeds=[0, 1]))
    assert "test split" in text and "validation data" in text
    assert "Optimizer steps over all phases: finetune 20, lwf 18, ewc 20." in text
    assert "**Pareto front** of ACC (higher) vs source forgetting (lower) on the means over seeds: **finetune**, " \
           "**lwf** (" in text
    paired_rows = [line for line in text.splitlines() if line.startswith("| ewc | source forgetting | 2 |")]
    assert len(paired_rows) == 1 and "+4.5 ± 0.7" in paired_rows[0]
    one = review.parent_description(CompareResult("x", results[:3], None, None, "sqlite:///x.db", seeds=[0]))
    assert "Paired differences" not in one and "on the means" not in one
    assert review.SPLIT_NOTE in review.child_description(results[0], "finetune: every parameter trains")


def test_report_scatter_draws_the_front_through_the_means():
    from forgetless.platform.tracking import html_report

    results = [_result("finetune", 0, 0.90, 0.30), _result("lwf", 0, 0.70, 0.05), _result("ewc", 0, 0.75, 0.40),
               _result("finetune", 1, 0.90, 0.30), _result("lwf", 1, 0.72, 0.08), _result("ewc", 1, 0.95, 0.30)]
    view = html_report.ComparisonView.of(CompareResult("x", results, None, None, "sqlite:///x.db", seeds=[0, 1]))
    traces = {t.name: t for t in html_report.scatter_figure(view).data}
    front = traces["Pareto front (means over seeds)"]
    # by increasing forgetting: lwf (6.5 pp, 71%), finetune (30 pp, 90%); ewc's mean (35, 85) is dominated
    assert list(front.x) == pytest.approx([6.5, 30.0]) and list(front.y) == pytest.approx([71.0, 90.0])
    assert list(traces["mean over seeds"].text) == ["finetune", "lwf", "ewc"]
    one = html_report.ComparisonView.of(CompareResult("x", results[3:], None, None, "sqlite:///x.db", seeds=[1]))
    traces = {t.name: t for t in html_report.scatter_figure(one).data}
    # one seed: ewc's run (30 pp, 95%) dominates finetune's (30, 90)
    assert list(traces["Pareto front"].x) == pytest.approx([8.0, 30.0]) and "mean over seeds" not in traces
