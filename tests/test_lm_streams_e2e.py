"""End to end: a stream of three language corpora (prose -> python_code -> python_tests) with general-ability suites
(`eval_tasks:`), fine-tuning and replay of the prose, on a tiny GPT-2, 2 Ray Train workers under DeepSpeed ZeRO-3 (replay
keeps the model partitioned), MLflow: full 3x3 matrices, per-corpus curves, the suites' curves, rows and forgetting,
and the suites' sharded scores equal to one process scoring the final model."""
from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

sys.path.insert(0, str(Path(__file__).parent))
from test_language_models import make_tiny_decoder

from forgetless.config import load_config

MC = "stdlib_docstrings"


def three_corpora(folder: Path, heldout: Path) -> dict:
    task = {"kind": "causal_lm", "block_size": 32, "max_train_blocks": 48, "max_eval_blocks": 8}
    return {
        "name": "lm3", "seed": 0,
        "source": {**task, "dataset": "prose"},
        "targets": [{**task, "dataset": "python_code"}, {**task, "dataset": "python_tests"}],
        "eval_tasks": [{"kind": "multiple_choice", "dataset": MC, "max_items": 8, "max_tokens": 48},
                       {"kind": "causal_lm", "dataset": str(heldout), "name": "heldout", "block_size": 32,
                        "max_eval_blocks": 4}],
        "backbone": {"name": f"hf:{folder}"},
        "pretrain": {"epochs": 1, "checkpoint_every": 1, "batch_size": 16},
        "train": {"epochs": 1, "lr": 0.003, "batch_size": 8},
        "strategies": ["finetune", {"name": "replay", "params": {"share": 0.25, "replay_tasks": ["prose"],
                                                                 "memory_size": 8}}],
        "scaling": {"num_workers": 2}, "deepspeed": {"zero_stage": 3}, "tracking": {"log_model": False},
    }


def heldout_corpus(path: Path) -> Path:
    """A small held-out text corpus (blank-line separated documents) none of the stream's corpora holds."""
    words = ["river", "stone", "light", "garden", "window", "morning", "letter", "music", "winter", "harbour"]
    docs = [" ".join(words[(i * 7 + k) % len(words)] for k in range(120)) for i in range(12)]
    path.write_text("\n\n".join(docs))
    return path


def scored_in_one_process(cfg, checkpoint_uri: str) -> dict:
    from forgetless.data import build_stream
    from forgetless.data.eval_suites import build_eval_suites
    from forgetless.platform.worker.evaluation import evaluate_suites
    from forgetless.platform.worker.model_io import build_model, load_torch_file
    from forgetless.storage import join
    from forgetless.strategies import make_strategy
    from forgetless.strategies.base import task_infos

    s = cfg.strategies[1]
    model = build_model(cfg, task_infos(build_stream(cfg.source, cfg.targets)), make_strategy(s.name, s.params, 1, 0.1))
    model.load_state_dict(load_torch_file(join(checkpoint_uri, "model.pt")))
    return evaluate_suites(model, build_eval_suites(cfg.eval_tasks), "test", 0, 1, torch.device("cpu"))


@pytest.mark.e2e
@pytest.mark.slow  # about 3 minutes on 2 cores (pre-training, two strategies over three corpora, 2 workers each)
def test_three_corpora_with_suites_end_to_end(ray_session, workdir, tmp_path):
    import forgetless
    from forgetless.platform.tracking import mlflow_runs as tracking

    folder = make_tiny_decoder(tmp_path / "tiny-gpt2")
    cfg = load_config(three_corpora(folder, heldout_corpus(tmp_path / "heldout.txt")))
    out = forgetless.compare(cfg)
    client = tracking.client(out.tracking_uri)
    for res in out.results:
        R, L = res.accuracy_matrix, res.loss_matrix
        assert R.shape == L.shape == (3, 3), res.label
        assert L[1, 1] < L[0, 1] and L[2, 2] < L[1, 2], res.label  # each corpus is learned in its stage
        run_id = res.mlflow_run_id
        for corpus in ("prose", "python_code", "python_tests"):  # a curve per corpus, from the point before training
            assert len(client.get_metric_history(run_id, f"val/task/{corpus}/perplexity")) >= 3
        for name, metric in ((MC, "acc"), (MC, "acc_norm"), ("heldout", "perplexity")):
            assert len(client.get_metric_history(run_id, f"val/eval/{name}/{metric}")) >= 3  # every evaluation point
            assert len(client.get_metric_history(run_id, f"test/eval/{name}/{metric}")) == 3  # a column of R
        rows = [m.value for m in sorted(client.get_metric_history(run_id, f"test/eval/{MC}/acc"), key=lambda m: m.step)]
        assert all(0.0 <= v <= 1.0 for v in rows)
        forgetting = client.get_run(run_id).data.metrics[f"eval/{MC}/forgetting"]
        assert forgetting == pytest.approx(rows[0] - rows[-1])
        ppl = sorted(client.get_metric_history(run_id, "test/eval/heldout/perplexity"), key=lambda m: m.step)
        assert client.get_run(run_id).data.metrics["eval/heldout/perplexity_ratio"] == pytest.approx(
            ppl[-1].value / ppl[0].value, rel=1e-5)
        assert res.metrics[f"eval/{MC}/forgetting"] == pytest.approx(forgetting)  # from the run's eval rows
    assert f"{MC} forgetting pp" in out.table() and "heldout forgetting pp" in out.table()
    # the 2 workers' sharded scores of the last row are what one process computes on the final model
    replay = next(r for r in out.results if r.strategy == "replay")
    alone = scored_in_one_process(cfg, replay.checkpoint_uri)
    final = client.get_run(replay.mlflow_run_id).data.metrics
    assert final[f"test/eval/{MC}/acc"] == pytest.approx(alone[MC]["acc"])
    assert math.log(final["test/eval/heldout/perplexity"]) == pytest.approx(alone["heldout"]["loss"], rel=1e-4)
