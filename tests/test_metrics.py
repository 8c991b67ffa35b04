"""Every metric of docs/metrics.md against matrices computed by hand: one target and three targets, the metrics
that count the source and those that do not."""
import math

import numpy as np
import pytest

from forgetless.platform.analysis import metrics as M
from forgetless.platform.analysis.results import summary_metrics

# one target; rows: before, after t1
R1 = [[0.98, 0.20],
      [0.91, 0.95]]

# source + 3 targets; rows: before, after t1, after t2, after t3
R4 = [
    [0.90, 0.10, 0.10, 0.10],
    [0.80, 0.60, 0.15, 0.20],
    [0.85, 0.90, 0.70, 0.25],  # t1 improves after t2 trains; the source recovers a little
    [0.50, 0.70, 0.80, 0.90],
]


def test_acc_averages_the_targets_and_acc_with_source_every_column():
    assert M.final_accuracy(R1) == pytest.approx(0.95)
    assert M.accuracy_with_source(R1) == pytest.approx((0.91 + 0.95) / 2)
    assert M.final_accuracy(R4) == pytest.approx((0.70 + 0.80 + 0.90) / 3)
    assert M.accuracy_with_source(R4) == pytest.approx((0.50 + 0.70 + 0.80 + 0.90) / 4)


def test_average_incremental_accuracy_over_the_targets_seen_so_far():
    assert M.average_incremental_accuracy(R1) == pytest.approx(0.95)
    # stages 1..3 over targets 1..i: [0.6], [0.9, 0.7], [0.7, 0.8, 0.9]; the source and row 0 never count
    assert M.average_incremental_accuracy(R4) == pytest.approx((0.6 + 0.8 + 0.8) / 3)


def test_bwt_is_over_the_targets_and_undefined_for_one():
    assert math.isnan(M.backward_transfer(R1))  # the source's loss is not BWT: source_forgetting says it
    # j = 1: 0.70 - 0.60; j = 2: 0.80 - 0.70 (the source's 0.50 - 0.90 does not count)
    assert M.backward_transfer(R4) == pytest.approx(0.1)


def test_fwt_against_the_probe_baseline():
    assert math.isnan(M.forward_transfer_vs_probe(R1))
    # j = 2: R[1][2] - R[0][2] = 0.15 - 0.10; j = 3: R[2][3] - R[0][3] = 0.25 - 0.10
    assert M.forward_transfer_vs_probe(R4) == pytest.approx((0.05 + 0.15) / 2)


def test_chaudhry_forgetting_counts_the_source_and_never_an_untrained_head():
    assert M.forgetting_max(R1) == pytest.approx(0.98 - 0.91)  # one target: the source's drop
    # j = 0 (source): max(0.90, 0.80, 0.85) - 0.50 = 0.40; j = 1: max(0.60, 0.90) - 0.70 = 0.20;
    # j = 2: max(0.70) - 0.80 = -0.10 (rows 0 and 1 of task 2 are its untrained head)
    assert M.forgetting_max(R4) == pytest.approx((0.40 + 0.20 - 0.10) / 3)
    lucky = np.array(R4)
    lucky[0, 2] = lucky[1, 2] = 0.99  # an untrained head scoring high before its stage changes nothing
    assert M.forgetting_max(lucky) == pytest.approx(M.forgetting_max(R4))


def test_the_sources_own_forgetting_and_retention():
    assert M.source_forgetting(R1) == pytest.approx(0.07)
    assert M.source_retention(R1) == pytest.approx(0.91 / 0.98)
    # the drop from its best before the last stage (0.90, row 0), not from row T-1
    assert M.source_forgetting(R4) == pytest.approx(0.90 - 0.50)
    assert M.source_retention(R4) == pytest.approx(0.50 / 0.90)


def test_summarize_names_each_metric_once():
    s = M.summarize(R4)
    assert set(s) == {"acc", "acc_with_source", "avg_inc_acc", "bwt", "forgetting/max", "source/forgetting",
                      "source/retention", "source/acc_before", "source/acc_after"}
    # FWT compares heads that have not trained yet (every strategy gives a task a fresh head): not reported
    assert "fwt" not in s and "forgetting/first" not in s and "target/final_acc" not in s
    assert s["acc"] == pytest.approx(0.8) and s["source/acc_after"] == 0.5
    assert math.isnan(M.summarize(R1)["bwt"])


def test_summary_metrics_keep_full_precision_and_leave_undefined_out():
    R = [[0.90, 0.1, 0.1], [0.85, 0.60, 0.1], [0.80, 0.5833333333, 0.7]]
    logged = summary_metrics(M.summarize(R))
    assert logged["bwt_pp"] == pytest.approx(100 * (0.5833333333 - 0.60), abs=1e-9)  # -1.6666667, not -1.67
    assert logged["bwt_pp"] != round(logged["bwt_pp"], 2)
    assert logged["source/forgetting_pp"] == pytest.approx(10.0)
    assert "bwt_pp" not in summary_metrics(M.summarize(R1))  # one target: BWT undefined, not logged


# Loss matrices: L[i][j] = test mean token loss (nats) on corpus j after stage i; perplexities chosen round
P1 = [[10, 50],
      [12, 20]]
P4 = [[10, 50, 40, 30],
      [12, 20, 40, 30],
      [15, 25, 16, 30],
      [20, 50, 64, 8]]


def test_language_model_metrics_average_losses_and_multiply_perplexities():
    s = M.summarize_losses(np.log(P1))
    assert s["source/loss_before"] == pytest.approx(math.log(10)) and s["source/loss_after"] == pytest.approx(
        math.log(12))
    assert s["source/loss_increase"] == pytest.approx(math.log(1.2))
    assert (s["source/perplexity_before"], s["source/perplexity_after"]) == (pytest.approx(10), pytest.approx(12))
    assert s["source/perplexity_ratio"] == pytest.approx(1.2)
    assert s["target/corpus_mean_loss"] == pytest.approx(math.log(20))
    assert s["target/corpus_mean_perplexity"] == pytest.approx(20)
    assert s["forgetting/loss_increase"] == pytest.approx(math.log(1.2))  # one target: the source's increase
    assert s["forgetting/perplexity_ratio"] == pytest.approx(1.2)


def test_language_model_aggregates_over_three_target_corpora():
    s = M.summarize_losses(np.log(P4))
    # exp of the mean loss = geometric mean of 64, 50 and 8 (the arithmetic mean of perplexities would be 40.67)
    assert s["target/corpus_mean_loss"] == pytest.approx((math.log(50) + math.log(64) + math.log(8)) / 3)
    assert s["target/corpus_mean_perplexity"] == pytest.approx((50 * 64 * 8) ** (1 / 3))
    # each earlier corpus from just after it was learned: source 10 -> 20, t1 20 -> 50, t2 16 -> 64
    assert s["forgetting/loss_increase"] == pytest.approx((math.log(2) + math.log(2.5) + math.log(4)) / 3)
    assert s["forgetting/perplexity_ratio"] == pytest.approx((2 * 2.5 * 4) ** (1 / 3))
    assert s["source/loss_increase"] == pytest.approx(math.log(2)) and s["source/perplexity_ratio"] == \
        pytest.approx(2.0)
    assert M.loss_increase(np.log(P4)) == pytest.approx(s["forgetting/loss_increase"])


def test_perplexity_of_a_diverged_model_is_inf():
    assert M.perplexity(1000.0) == math.inf and M.perplexity(0.0) == 1.0


def test_steps_to_threshold_and_auc():
    steps, acc = [0, 10, 20, 30], [0.1, 0.5, 0.85, 0.9]
    assert M.steps_to_threshold(steps, acc, 0.8) == 20
    assert M.steps_to_threshold(steps, acc, 0.95) is None
    # trapezoids: (0.1+0.5)/2*10 + (0.5+0.85)/2*10 + (0.85+0.9)/2*10 = 3 + 6.75 + 8.75 = 18.5 over 30
    assert M.area_under_curve(steps, acc) == pytest.approx(18.5 / 30)
    assert M.area_under_curve([5], [0.4]) == pytest.approx(0.4)


def test_bad_matrices_are_rejected():
    with pytest.raises(ValueError):
        M.final_accuracy([[0.5, 0.5]])
    with pytest.raises(ValueError):
        M.final_accuracy(np.zeros((2, 3)))
    with pytest.raises(ValueError):
        M.steps_to_threshold([1, 2], [0.1], 0.5)
