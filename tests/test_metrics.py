"""Metrics against matrices computed by hand."""
import math

import numpy as np
import pytest

from forgetless.platform.analysis import metrics as M

# source + 2 targets; rows: before, after t1, after t2
R3 = [
    [0.90, 0.10, 0.20],
    [0.70, 0.80, 0.30],
    [0.60, 0.50, 0.90],
]


def test_final_and_incremental_accuracy():
    assert M.final_accuracy(R3) == pytest.approx((0.6 + 0.5 + 0.9) / 3)
    # rows: [0.9], [0.7, 0.8], [0.6, 0.5, 0.9]
    assert M.average_incremental_accuracy(R3) == pytest.approx((0.9 + 0.75 + (2.0 / 3)) / 3)


def test_bwt_fwt():
    # BWT over j in {0, 1}: (0.6-0.9) + (0.5-0.8) = -0.6 -> mean -0.3
    assert M.backward_transfer(R3) == pytest.approx(-0.3)
    # FWT over j = 2 only: R[1][2] - R[0][2] = 0.3 - 0.2
    assert M.forward_transfer(R3) == pytest.approx(0.1)


def test_forgetting_max_vs_first_differ_when_a_task_improves_later():
    R = [
        [0.9, 0.1, 0.1, 0.1],
        [0.8, 0.6, 0.1, 0.1],
        [0.7, 0.9, 0.2, 0.1],  # task 1 improves after learning task 2 (an improvement, not forgetting)
        [0.5, 0.7, 0.8, 0.9],
    ]
    # max: j=0: max(0.9,0.8,0.7)-0.5=0.4; j=1: max(0.6,0.9)-0.7=0.2; j=2: 0.2-0.8=-0.6 -> mean 0.0
    assert M.forgetting_max(R) == pytest.approx((0.4 + 0.2 - 0.6) / 3)
    # first: j=0: 0.9-0.5=0.4; j=1: 0.6-0.7=-0.1; j=2: 0.2-0.8=-0.6
    assert M.forgetting_first(R) == pytest.approx((0.4 - 0.1 - 0.6) / 3)


def test_single_transfer_forgetting_is_source_loss():
    R = [[0.98, 0.2], [0.91, 0.95]]
    assert M.forgetting_max(R) == pytest.approx(0.07)
    assert M.forgetting_first(R) == pytest.approx(0.07)
    assert M.backward_transfer(R) == pytest.approx(-0.07)
    assert M.source_retention(R) == pytest.approx(0.91 / 0.98)
    assert math.isnan(M.forward_transfer(R))


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


def test_summarize_names():
    s = M.summarize(R3)
    for key in ("acc", "avg_inc_acc", "bwt", "forgetting/max", "forgetting/first", "source/retention",
                "source/acc_before", "source/acc_after", "target/final_acc"):
        assert key in s
    # FWT compares heads that have not trained yet (every strategy gives a task a fresh head): not reported
    assert "fwt" not in s
    assert s["target/final_acc"] == pytest.approx(0.7)
