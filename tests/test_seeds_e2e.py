"""A compare over two seeds on a real embedded Ray cluster (2 CPUs): 1-worker runs, so the two seeds' runs go side by
side (fan-out), and the parent MLflow run holds the aggregates."""
import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e


def test_two_seeds_run_side_by_side_and_aggregate(ray_session, workdir, tiny_config):
    import forgetless
    from mlflow.tracking import MlflowClient

    from forgetless.platform.worker.job import RunState

    cfg = tiny_config(scaling={"num_workers": 1}, train={"epochs": 1, "lr": 0.01, "batch_size": 64},
                      pretrain={"epochs": 1, "checkpoint_every": 1, "lr": 0.01, "batch_size": 64})
    out = forgetless.compare(cfg, seeds=[0, 1])

    assert out.seeds == [0, 1]
    assert [(r.label, r.seed) for r in out.results] == [("finetune", 0), ("finetune", 1)]
    a, b = out.runs("finetune")
    # each seed pre-trained its own backbone: the source accuracy before transfer differs
    assert a.accuracy_matrix[0, 0] != b.accuracy_matrix[0, 0]
    header, _, row = out.table().splitlines()[:3]
    assert row.split()[:2] == ["finetune", "2"] and "±" in row
    summary = out.summary_records()[0]
    assert summary["n"] == 2
    assert summary["acc/mean"] == pytest.approx((a.metrics["acc"] + b.metrics["acc"]) / 2)

    c = MlflowClient(out.tracking_uri)
    children = c.search_runs([out.experiment_id], f"tags.`mlflow.parentRunId` = '{out.parent_run_id}'")
    by_name = {r.info.run_name: r for r in children}
    assert set(by_name) == {"pretrain (seed 0)", "pretrain (seed 1)", "finetune (seed 0)", "finetune (seed 1)"}
    # fanned out: the two seeds' finetune runs were in flight at once (the cluster fits two 1-worker runs): each was
    # submitted before the other returned. (The driver's clocks: the MLflow child runs only cover the seconds after
    # each run's workers started, which two 4 s runs need not share.)
    def in_flight(r):
        submitted = RunState.from_json(Path(r.checkpoint_uri, "state.json").read_text()).submitted_at
        return submitted, submitted + r.wall_seconds

    (s0, e0), (s1, e1) = in_flight(a), in_flight(b)
    assert s0 < e1 and s1 < e0
    parent = c.get_run(out.parent_run_id)
    assert parent.data.tags["forgetless.seeds"] == "0,1"
    assert parent.data.metrics["finetune/n"] == 2
    assert parent.data.metrics["finetune/acc_pct/mean"] == pytest.approx(100 * summary["acc/mean"])
    assert "finetune/forgetting/max_pp/sd" in parent.data.metrics
    seeds_file = Path(c.download_artifacts(out.parent_run_id, "seeds.json", str(workdir)))
    saved = json.loads(seeds_file.read_text())
    assert [r["seed"] for r in saved["per_seed"]] == [0, 1] and saved["summary"][0]["n"] == 2
    assert "±" in parent.data.tags["mlflow.note.content"]
