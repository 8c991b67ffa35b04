"""Seeds (mean ± sd tables and aggregates) and the fan-out of independent runs; no Ray needed (the cluster's resources
are given as a dict). The end-to-end path (a real compare over two seeds, two runs at once) is in
test_seeds_e2e.py."""
from __future__ import annotations

import math
import re
import threading
import time

import numpy as np
import pytest

from forgetless.config import ConfigError, load_config
from forgetless.platform.driver import parallel_runs as fanout
from forgetless.platform.analysis.results import (CompareResult, StrategyResult, aggregate_records, format_seed_table,
                                         mean_sd)
from forgetless.platform.driver.runner import seed_aggregate_metrics


def _cfg(*overrides: str):
    return load_config("examples/digits_transfer.yaml", list(overrides))


def _result(label: str, seed: int, target: float, forgetting: float) -> StrategyResult:
    r = StrategyResult(label=label, strategy=label, task_names=["src", "tgt"], accuracy_matrix=np.zeros((2, 2)),
                       history=[], phase_log=[], trainable_params={}, global_step=10, wall_seconds=30.0 + seed,
                       train_seconds=1.0, mlflow_run_id=None, checkpoint_uri=None, evaluation="task_incremental",
                       seed=seed)
    r.metrics = {"acc": target, "source/acc_before": 0.9, "source/acc_after": 0.9 - forgetting,
                 "forgetting/max": forgetting, "source/forgetting": forgetting, "bwt": math.nan, "steps_to/90": 5.0,
                 "trainable_params/max": 100.0, "wall_seconds": 30.0 + seed, "train_seconds": 1.0}
    return r


def test_mean_and_sample_sd_by_hand():
    mean, sd = mean_sd([0.80, 0.90, 1.00])
    assert mean == pytest.approx(0.90)
    assert sd == pytest.approx(0.10)  # sqrt(((-.1)^2 + 0 + .1^2) / (3 - 1))
    assert math.isnan(mean_sd([0.5])[1])  # one value: no spread
    assert mean_sd([0.5, float("nan"), 0.7])[0] == pytest.approx(0.6)  # a metric a run could not measure is left out


def test_aggregate_records_groups_by_label_in_order():
    rows = aggregate_records([_result("finetune", s, t, f).record()
                              for s, t, f in [(0, 0.8, 0.2), (1, 0.9, 0.4)]]
                             + [_result("linear_probe", 0, 0.7, 0.0).record()])
    assert [r["label"] for r in rows] == ["finetune", "linear_probe"]
    ft = rows[0]
    assert ft["n"] == 2
    assert ft["acc/mean"] == pytest.approx(0.85)
    assert ft["forgetting/max/sd"] == pytest.approx(math.sqrt(0.02))
    assert "seed/mean" not in ft and "mlflow_run_id/mean" not in ft  # identifiers are not averaged
    assert rows[1]["n"] == 1 and math.isnan(rows[1]["acc/sd"])


def test_seed_table_shows_mean_sd_and_n():
    results = [_result("finetune", 0, 0.80, 0.20), _result("finetune", 1, 0.90, 0.40)]
    table = format_seed_table(results)
    header, _, row = table.splitlines()
    assert "n" in header.split()
    assert row.split()[0] == "finetune" and row.split()[1] == "2"
    assert "85.0 ± 7.1" in row  # target acc: mean 85 %, sd 7.07 pp
    assert "30.0 ± 14.1" in row  # the source's forgetting: 20 and 40 points
    cells = dict(zip(re.split(r"\s{2,}", header), re.split(r"\s{2,}", row)))
    assert cells["BWT pp"] == "-"  # undefined with one target, on every seed
    out = CompareResult("x", results, None, None, "sqlite:///x.db", seeds=[0, 1])
    assert out.table().startswith(table + "\nTest split: ")  # then its caption (and paired differences)
    assert [r["seed"] for r in out.records()] == [0, 1]
    assert out["finetune"].seed == 0 and len(out.runs("finetune")) == 2


def test_parent_aggregates_use_the_child_runs_metric_names():
    out = CompareResult("x", [_result("finetune", 0, 0.80, 0.20), _result("finetune", 1, 0.90, 0.40)], None, None,
                        "sqlite:///x.db", seeds=[0, 1])
    agg = seed_aggregate_metrics(out)
    assert agg["finetune/n"] == 2
    assert agg["finetune/acc_pct/mean"] == pytest.approx(85.0)
    assert agg["finetune/source/forgetting_pp/sd"] == pytest.approx(100 * math.sqrt(0.02))  # full precision
    assert "finetune/bwt_pp/mean" not in agg  # undefined with one target: not logged


def test_seeds_in_yaml_and_their_checks():
    cfg = _cfg("seeds=[3, 4]")
    assert cfg.seed_list() == [3, 4]
    assert cfg.for_seed(4).seed == 4 and cfg.for_seed(4).seeds is None
    assert _cfg().seed_list() == [0]
    with pytest.raises(ConfigError, match="repeats a seed"):
        _cfg("seeds=[1, 1]")
    # the seeds of an invocation and its concurrency are not part of a run's identity (resume stays)
    s = cfg.strategies[0]
    assert cfg.transfer_key(s) == _cfg().for_seed(0).transfer_key(s) != cfg.for_seed(4).transfer_key(s)
    assert _cfg("scaling.max_concurrent=3").transfer_key(s) == _cfg().transfer_key(s)


def test_concurrency_is_what_the_cluster_fits_capped_by_the_knob():
    two_workers = _cfg("scaling.num_workers=2")
    assert fanout.concurrency(two_workers, runs=3, cluster={"CPU": 2.0}) == 1  # a laptop: one after another
    assert fanout.concurrency(two_workers, runs=3, cluster={"CPU": 8.0}) == 3  # no more than there are runs
    assert fanout.concurrency(two_workers, runs=9, cluster={"CPU": 8.0}) == 4
    capped = _cfg("scaling.num_workers=1", "scaling.max_concurrent=2")
    assert fanout.concurrency(capped, runs=5, cluster={"CPU": 8.0}) == 2
    gpu = _cfg("scaling.num_workers=2", "scaling.use_gpu=true")
    assert fanout.runs_that_fit(gpu, {"CPU": 64.0, "GPU": 4.0}) == 2


def test_run_all_keeps_order_and_never_exceeds_the_concurrency():
    lock, running, peak = threading.Lock(), [0], [0]

    def call(i: int):
        def run():
            with lock:
                running[0] += 1
                peak[0] = max(peak[0], running[0])
            time.sleep(0.05 * (5 - i))  # later calls finish first
            with lock:
                running[0] -= 1
            return i
        return run

    seen = []
    assert fanout.run_all([call(i) for i in range(5)], 2, on_done=seen.append) == [0, 1, 2, 3, 4]
    assert peak[0] == 2
    assert sorted(seen) == [0, 1, 2, 3, 4] and seen != [0, 1, 2, 3, 4]  # reported as they finished


def test_run_all_stops_starting_after_a_failure_and_raises_it():
    started = []

    def call(i: int):
        def run():
            started.append(i)
            if i == 0:
                raise RuntimeError("run 0 failed")
            time.sleep(0.2)
            return i
        return run

    with pytest.raises(RuntimeError, match="run 0 failed"):
        fanout.run_all([call(i) for i in range(6)], 2)
    assert len(started) < 6  # the ones not started when the failure came never start


def test_run_all_sequential_is_in_the_calling_thread():
    threads = []
    fanout.run_all([lambda: threads.append(threading.current_thread())] * 2, 1)
    assert threads == [threading.main_thread()] * 2
