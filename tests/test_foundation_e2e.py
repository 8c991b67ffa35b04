"""End to end on a real embedded Ray cluster: 2 workers, DeepSpeed ZeRO-2 on CPU, a real SQLite MLflow store."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch


pytestmark = pytest.mark.e2e


def _client():
    from mlflow.tracking import MlflowClient

    return MlflowClient(f"sqlite:///{Path('mlflow.db').resolve()}")


def test_compare_tracks_everything_and_linear_probe_keeps_source(ray_session, workdir, tiny_config):
    import forgetless

    cfg = tiny_config(strategies=["finetune", "linear_probe"], tracking={"log_model": True})
    out = forgetless.compare(cfg)

    lp, ft = out["linear_probe"], out["finetune"]
    for r in (lp, ft):
        assert r.accuracy_matrix.shape == (2, 2)
        assert 0.0 <= r.accuracy_matrix.min() and r.accuracy_matrix.max() <= 1.0
    # linear probing cannot move the backbone or the source head: exactly zero source forgetting
    assert lp.accuracy_matrix[1, 0] == lp.accuracy_matrix[0, 0]
    assert lp.metrics["forgetting/max"] == 0.0
    # both start from the same pre-trained checkpoint
    assert ft.accuracy_matrix[0, 0] == lp.accuracy_matrix[0, 0]
    assert ft.accuracy_matrix[1, 1] > 0.5  # the target was learned (5 classes, chance 0.2)
    # the finetuned backbone moved, the linear probe's did not
    from forgetless.platform.driver.run_outputs import load_model
    from forgetless.platform.worker.model_io import load_torch_file
    from forgetless.config import load_config

    pre = load_torch_file(out.trajectory.final().uri)
    ft_model, _ = load_model(load_config(cfg), ft)
    lp_model, _ = load_model(load_config(cfg), lp)
    key = "backbone.body.1.weight"
    assert torch.equal(lp_model.state_dict()[key], pre[key])
    assert not torch.equal(ft_model.state_dict()[key], pre[key])

    # where the run's time went: every part measured, the worker's parts within the run's wall time
    from forgetless.platform.worker import timing

    assert set(timing.PARTS) <= set(ft.seconds), set(timing.PARTS) - set(ft.seconds)
    in_fit = sum(v for k, v in ft.seconds.items() if k not in ("read_back", "mlflow_artifacts", "model_logging"))
    assert 0 < ft.seconds["training"] < in_fit <= ft.wall_seconds + 1.0
    assert ft.seconds["training"] == pytest.approx(ft.train_seconds)

    # the pre-training trajectory: a stop point every epoch, θ⁰ included
    assert [sp.epoch for sp in out.trajectory.stop_points] == [0, 1, 2]
    assert all(Path(sp.uri).exists() for sp in out.trajectory.stop_points)

    c = _client()
    parent = c.get_run(out.parent_run_id)
    assert parent.info.status == "FINISHED"
    children = c.search_runs([out.experiment_id], f"tags.`mlflow.parentRunId` = '{out.parent_run_id}'")
    by_name = {r.info.run_name: r for r in children}
    assert set(by_name) == {"pretrain", "finetune", "linear_probe"}
    run = by_name["finetune"]
    assert run.data.tags["strategy"] == "finetune" and run.data.tags["fidelity"] == "confirmed"
    for m in ("acc_pct", "acc_with_source_pct", "source/forgetting_pp", "forgetting/max_pp", "steps_to/90",
              "aulc_pct", "source/retention_pct"):
        assert m in run.data.metrics, m
    assert "bwt_pp" not in run.data.metrics  # one target: BWT is undefined (docs/metrics.md)
    # per-epoch curves: one point before training and one per epoch
    assert len(c.get_metric_history(run.info.run_id, "val/target/acc")) == 1 + cfg["train"]["epochs"]
    assert len(c.get_metric_history(run.info.run_id, "val/source/acc")) >= 3
    arts = {a.path for a in c.list_artifacts(run.info.run_id)}
    assert {"accuracy_matrix.json", "accuracy_matrix.png", "curves.png", "history.json"} <= arts
    R = json.loads(Path(c.download_artifacts(run.info.run_id, "accuracy_matrix.json")).read_text())["R"]
    assert np.allclose(R, ft.accuracy_matrix)
    assert "comparison_curves.png" in {a.path for a in c.list_artifacts(out.parent_run_id)}
    # each strategy's model is logged in the run's experiment, named after it, and loads back (pt2: no pickle)
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{Path('mlflow.db').resolve()}")
    models = {m.name: m for m in mlflow.search_logged_models(experiment_ids=[out.experiment_id], output_format="list")}
    assert {n: m.source_run_id for n, m in models.items()} == {"finetune": by_name["finetune"].info.run_id,
                                                               "linear_probe": by_name["linear_probe"].info.run_id}
    # the model page's Description says what it is and how it did
    note = models["finetune"].tags["mlflow.note.content"]
    assert note.startswith("**finetune**") and "ACC " in note and "source forgetting" in note \
        and "every task head's logits" in note
    loaded = mlflow.pytorch.load_model(f"models:/{models['finetune'].model_id}")
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():  # every task's logits side by side: the source head's 5 columns, then the target's 5
        assert torch.allclose(loaded(x), torch.cat([ft_model(x, 0), ft_model(x, 1)], dim=1), atol=1e-5)

    # running the same config again reuses the pre-training and the finished runs (nothing retrained)
    again = forgetless.compare(cfg)
    assert again.trajectory.reused
    assert np.array_equal(again["finetune"].accuracy_matrix, ft.accuracy_matrix)
    # read from the finished runs without starting Ray Train again: the same driver-measured wall time comes back
    assert again["finetune"].wall_seconds == ft.wall_seconds and again["linear_probe"].wall_seconds == lp.wall_seconds


def test_zero3_run_on_a_cnn(ray_session, workdir, tiny_config):
    import forgetless

    from forgetless.config import load_config
    from forgetless.data import build_stream

    cfg = tiny_config(backbone={"name": "cnn2d", "params": {"channels": [8, 16]}},
                      deepspeed={"zero_stage": 3, "gradient_accumulation_steps": 2},
                      strategies=["lp_ft"], train={"epochs": 2, "lr": 0.01, "batch_size": 32})
    cfg["strategies"] = [{"name": "lp_ft", "params": {"probe_epochs": 1}}]
    res = forgetless.run(cfg)
    assert res.accuracy_matrix.shape == (2, 2)
    assert [p["phase"] for p in res.phase_log] == ["probe", "finetune"]
    assert res.accuracy_matrix[1, 1] > res.accuracy_matrix[0, 1]  # it learned the target
    # Steps count optimizer updates, not micro-batches: an epoch is cut into global batches of 32 x 2 workers x 2
    # micro-batches (data/sharding.py), each one update, the epoch's partial last one included when it splits evenly.
    from forgetless.data.sharding import batch_plan, epoch_steps

    n_train = len(build_stream(load_config(cfg).source, load_config(cfg).targets)[1].x_train)
    per_epoch = epoch_steps(n_train, batch_plan(32, 2, 2, 2))
    assert n_train % 128 and per_epoch == n_train // 128 + 1  # the tail step is counted (a plain n // 128 would not)
    assert [p["steps"] for p in res.phase_log] == [p["epochs"] * per_epoch for p in res.phase_log]
