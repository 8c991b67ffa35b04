"""Paired statistics over seeds (analysis/paired.py), checked against hand-computed values."""
import math

import pytest

from forgetless.platform.analysis.paired import (PairedDifference, bootstrap_interval, format_paired_table,
                                                 paired_difference, paired_differences, paired_t_pvalue, verdict)


def _records(values: dict[str, list[float]], metric: str = "acc", seeds=(0, 1, 2)) -> list[dict]:
    return [{"label": label, "seed": s, metric: v} for label, vals in values.items() for s, v in zip(seeds, vals)]


def test_paired_t_pvalue_by_hand():
    # differences 1, 2, 3: mean 2, sd 1, t = 2 / (1 / sqrt 3) = 2 sqrt 3, df 2. The t(2) CDF is
    # 1/2 + t / (2 sqrt(t² + 2)), so p = 2 (1/2 - 2 sqrt 3 / (2 sqrt 14)) = 1 - sqrt(12 / 14) = 0.07418
    p = paired_t_pvalue([11.0, 12.0, 13.0], [10.0, 10.0, 10.0])
    assert p == pytest.approx(1 - math.sqrt(12 / 14), rel=1e-9)
    assert paired_t_pvalue([10.0, 10.0, 10.0], [11.0, 12.0, 13.0]) == pytest.approx(p)  # two-sided


def test_paired_t_pvalue_degenerate_cases():
    assert math.isnan(paired_t_pvalue([1.0], [0.0]))  # one pair: nothing to test
    assert math.isnan(paired_t_pvalue([1.0, 2.0], [1.0, 2.0]))  # every difference 0
    assert paired_t_pvalue([2.0, 3.0], [1.0, 2.0]) == 0.0  # every difference the same, not 0: t = inf
    assert paired_t_pvalue([0.25, 0.15], [0.30, 0.20]) == 0.0  # the same up to float noise


def test_bootstrap_interval_by_hand():
    # two differences 0 and 2: a resample's mean is 0 (1/4), 1 (1/2) or 2 (1/4), so the 2.5th and 97.5th
    # percentiles are 0 and 2
    assert bootstrap_interval([0.0, 2.0]) == (0.0, 2.0)
    assert bootstrap_interval([0.5, 0.5, 0.5]) == (0.5, 0.5)
    low, high = bootstrap_interval([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    assert 1.0 < low < 3.5 < high < 6.0  # around the mean 3.5, inside the range of the data
    assert bootstrap_interval([1.0, 2.0, 3.0, 4.0, 5.0, 6.0]) == (low, high)  # fixed generator: reproducible
    assert all(math.isnan(v) for v in bootstrap_interval([]))


def test_paired_difference_pairs_by_seed():
    records = _records({"finetune": [0.70, 0.80, 0.60], "lwf": [0.72, 0.83, 0.64]})
    d = paired_difference(records, "lwf", "finetune", "acc")
    # per-seed differences 0.02, 0.03, 0.04: mean 0.03, sd 0.01
    assert d.n == 3 and d.seeds == (0, 1, 2)
    assert d.mean == pytest.approx(0.03) and d.sd == pytest.approx(0.01)
    assert d.p_value == pytest.approx(paired_t_pvalue([0.72, 0.83, 0.64], [0.70, 0.80, 0.60]))
    assert d.ci_low == pytest.approx(0.02) and d.ci_high == pytest.approx(0.04)  # the extreme resample means
    # read as two means the runs overlap widely (sd 0.1 each); paired, every seed favours lwf


def test_paired_difference_uses_only_seeds_both_have():
    records = _records({"finetune": [0.5, 0.6, math.nan], "ewc": [0.7, 0.9, 0.8]})
    records.append({"label": "ewc", "seed": 7, "acc": 0.1})  # a seed the reference never ran
    d = paired_difference(records, "ewc", "finetune", "acc")
    assert d.seeds == (0, 1) and d.n == 2 and d.mean == pytest.approx(0.25)
    assert paired_difference(records, "ewc", "finetune", "bwt") is None  # no run defines it


def test_paired_differences_every_strategy_and_defined_metric():
    records = [{"label": lb, "seed": s, "acc": a, "source/forgetting": f}
               for lb, s, a, f in [("finetune", 0, 0.7, 0.30), ("finetune", 1, 0.8, 0.20),
                                   ("lwf", 0, 0.6, 0.05), ("lwf", 1, 0.7, 0.10),
                                   ("ewc", 0, 0.7, 0.25), ("ewc", 1, 0.8, 0.15)]]
    diffs = paired_differences(records, "finetune")
    assert [(d.label, d.metric) for d in diffs] == [("lwf", "acc"), ("lwf", "source/forgetting"),
                                                    ("ewc", "acc"), ("ewc", "source/forgetting")]
    lwf_forgetting = diffs[1]
    assert lwf_forgetting.mean == pytest.approx(-0.175) and lwf_forgetting.better == "lower"


def _diff(mean, p, low, high, better="higher"):
    return PairedDifference("a", "b", "acc", better, 5, mean, 0.01, p, low, high, (0, 1, 2, 3, 4))


def test_verdict_needs_the_test_and_the_interval():
    assert verdict(_diff(0.03, 0.01, 0.01, 0.05)) == "better"
    assert verdict(_diff(-0.03, 0.01, -0.05, -0.01)) == "worse"
    assert verdict(_diff(-0.03, 0.01, -0.05, -0.01, better="lower")) == "better"  # forgets less
    assert verdict(_diff(0.03, 0.20, 0.01, 0.05)) == "not shown"  # the t-test does not reject
    assert verdict(_diff(0.03, 0.01, -0.01, 0.05)) == "not shown"  # the interval holds 0
    assert verdict(_diff(0.03, math.nan, 0.03, 0.03)) == "not shown"


def test_format_paired_table():
    records = _records({"finetune": [0.70, 0.80, 0.60], "lwf": [0.72, 0.83, 0.64]})
    text = format_paired_table(paired_differences(records, "finetune"))
    header, _, row = text.splitlines()
    assert "p (paired t)" in header and "95% CI" in header
    assert row.split()[:4] == ["lwf", "ACC", "3", "+3.0"] and "± 1.0" in row
    assert format_paired_table([]) == ""
